"""The splice between an application's connection and a stream (onionp2p/client/splice.py).

The splice is transport-generic, so these tests put real TCP connections on both sides
(127.0.0.1): "app" is the connection an application made to us, "stream" one we made
onward. Through the client's SOCKS port and circuits the splice is covered by
test_socks.py (a reader that stops reading stops the download), test_stream_memory.py
(what an open stream holds) and every SOCKS download in the suite.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import pytest

from onionp2p.client.splice import splice
from onionp2p.client.socksport import SocksStats


class Pair:
    """Two TCP connections through a listener: ``ours`` (reader, writer) as asyncio
    streams — what the splice gets — and ``far``, a raw non-blocking socket standing for
    the application or the destination, whose kernel buffers are kept small so that a
    side that stops reading is felt."""

    @classmethod
    async def open(cls, *, rcvbuf: int = 16384) -> Pair:
        loop = asyncio.get_running_loop()
        got: asyncio.Future = loop.create_future()

        async def accepted(reader, writer):
            got.set_result((reader, writer))

        server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        far = socket.socket()
        far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        far.setblocking(False)
        await loop.sock_connect(far, server.sockets[0].getsockname())
        self = cls()
        self.ours = await got
        self.far = far
        server.close()
        return self

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.far, data)

    async def recv_exactly(self, n: int, timeout: float = 20) -> bytes:
        loop, out = asyncio.get_running_loop(), bytearray()
        async with asyncio.timeout(timeout):
            while len(out) < n:
                chunk = await loop.sock_recv(self.far, min(1 << 16, n - len(out)))
                assert chunk, f"EOF after {len(out)} of {n} bytes"
                out += chunk
        return bytes(out)

    async def recv_to_eof(self, timeout: float = 20) -> bytes:
        loop, out = asyncio.get_running_loop(), bytearray()
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(self.far, 1 << 16):
                out += chunk
        return bytes(out)

    def close(self) -> None:
        self.far.close()
        self.ours[1].transport.abort()


@pytest.fixture
async def pairs():
    made: list[Pair] = []

    async def make(**kw) -> Pair:
        p = await Pair.open(**kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


async def test_both_ways_in_order_with_first_and_held_bytes_counted(pairs):
    app, stream = await pairs(), await pairs()
    # bytes both readers already hold when the splice starts (sent while a reply was written);
    # the stream side's 1 MB is more than its reader takes (2 x 64 KiB): the reader paused
    # its transport, and the splice must read it again
    held = b"stream-held|" + os.urandom(1_000_000)
    await app.send(b"app-held|")
    sending_held = asyncio.create_task(stream.send(held))
    await asyncio.sleep(0.3)
    assert not stream.ours[1].transport.is_reading() and not sending_held.done()
    stats = SocksStats()
    task = asyncio.create_task(splice(app.ours, stream.ours, first=b"first|", stats=stats, up="bytes_up",
                                      down="bytes_down"))
    up, down = os.urandom(3_000_000), os.urandom(3_000_000)

    async def stream_sends():
        await sending_held  # (one sender per socket)
        await stream.send(down)

    sent = asyncio.gather(app.send(up), stream_sends())
    got_up, got_down = await asyncio.gather(stream.recv_exactly(len(b"first|app-held|") + len(up)),
                                            app.recv_exactly(len(held) + len(down)))
    await sent
    assert got_up == b"first|app-held|" + up
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(held + down).digest()
    assert stats.bytes_up == len(got_up) and stats.bytes_down == len(got_down)
    assert not task.done()
    stream.far.close()  # the destination ends: the splice ends and the stream side is closed
    async with asyncio.timeout(10):
        await task
    assert stream.ours[1].transport.is_closing()
    # the caller closes the application's side; its writer still learns of it
    app.ours[1].close()
    async with asyncio.timeout(10):
        await app.ours[1].wait_closed()
    assert await app.recv_to_eof() == b""


async def test_application_eof_ends_it_and_what_was_queued_toward_it_is_delivered(pairs):
    app, stream = await pairs(rcvbuf=8192), await pairs()
    stats = SocksStats()
    task = asyncio.create_task(splice(app.ours, stream.ours, stats=stats, down="bytes_down"))
    offered = os.urandom(20_000_000)
    sending = asyncio.create_task(stream.send(offered))
    async with asyncio.timeout(10):  # the application's side is full and queues
        while app.ours[1].transport.get_write_buffer_size() == 0:
            await asyncio.sleep(0.01)
    app.far.shutdown(socket.SHUT_WR)  # the application is done sending (no half-close in tor)
    await asyncio.sleep(0.2)
    assert not task.done()  # still flushing toward the application
    copied = stats.bytes_down  # the splice copies nothing more once it ended
    reading = asyncio.create_task(app.recv_to_eof())  # it reads: everything queued arrives
    async with asyncio.timeout(10):
        await task
    app.ours[1].close()  # what the caller does after the splice: then the application sees EOF
    got = await reading
    assert stats.bytes_down == copied and len(got) == copied and got == offered[:copied]
    assert stream.ours[1].transport.is_closing()  # the stream side was closed
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)


async def test_a_side_that_stops_reading_stops_the_other_and_memory_stays_bounded(pairs):
    app, stream = await pairs(), await pairs()
    task = asyncio.create_task(splice(app.ours, stream.ours))
    ta, ts = app.ours[1].transport, stream.ours[1].transport
    for reader_side, writer_side, t_full, t_other in ((app, stream, ta, ts), (stream, app, ts, ta)):
        # ``reader_side`` reads nothing; ``writer_side`` offers 8 MB (more than the kernel's
        # socket buffers on loopback, at most 4 MiB each way by default)
        offered = os.urandom(8_000_000)
        sending = asyncio.create_task(writer_side.send(offered))
        async with asyncio.timeout(20):
            while t_other.is_reading():
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # and nothing more moves into the splice
        assert not t_other.is_reading()
        assert t_full.get_write_buffer_size() <= 64 * 1024 + 256 * 1024  # high water + one read
        assert not sending.done()
        got = await reader_side.recv_exactly(len(offered), timeout=60)  # it reads again: all arrives
        await sending
        assert hashlib.sha256(got).digest() == hashlib.sha256(offered).digest()
        assert t_other.is_reading()
    assert not task.done()
    app.far.close()
    async with asyncio.timeout(10):
        await task


async def test_flush_toward_an_application_that_never_reads_is_bounded(pairs):
    app, stream = await pairs(rcvbuf=4096), await pairs()
    task = asyncio.create_task(splice(app.ours, stream.ours, flush_timeout=1.0))
    sending = asyncio.create_task(stream.send(os.urandom(20_000_000)))
    async with asyncio.timeout(10):
        while app.ours[1].transport.get_write_buffer_size() == 0:
            await asyncio.sleep(0.01)
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    stream.far.close()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(10):
        await task
    assert 0.8 <= loop.time() - t0 <= 5
    assert app.ours[1].transport.is_closing()  # given up on: aborted


async def test_cancelled_splice_closes_the_stream_side(pairs):
    app, stream = await pairs(), await pairs()
    task = asyncio.create_task(splice(app.ours, stream.ours))
    await app.send(b"x")
    assert await stream.recv_exactly(1) == b"x"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await stream.recv_to_eof() == b""


async def test_a_side_lost_before_the_splice_began_ends_it_at_once(pairs):
    """A connection reset while the reply was being written (its reader holds the error, its
    protocol hears nothing more): the splice must not wait for it."""
    app, stream = await pairs(), await pairs()
    stream.far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.far.close()  # RST
    async with asyncio.timeout(5):
        while stream.ours[0].exception() is None:
            await asyncio.sleep(0.01)
    async with asyncio.timeout(5):
        await splice(app.ours, stream.ours)
