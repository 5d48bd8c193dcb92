"""What an open stream holds at the client (specs/performance.md §6, issue 16 item 5).

An idle stream through the SOCKS port must not carry objects it only needs once data is
waiting: asyncio's per-protocol deque of drain waiters (made on first use by
``client/leanstreams.py``), the digest deque of a stream's package window (only
authenticated circuit windows use it). And the lazily made deque must still do its job
when a transport pauses: ``drain()`` waits and wakes.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import socket
import struct

from conftest import wait_for

from onionp2p.client.leanstreams import LeanStreamReaderProtocol, start_server
from onionp2p.client.splice import _Side


class _Hold(asyncio.Protocol):
    """A destination that accepts and keeps connections, sending nothing."""

    held: list = []

    def connection_made(self, transport):
        self.held.append(transport)


async def _socks_open(port: int, dest_port: int) -> socket.socket:
    """SOCKS5 CONNECT with raw sockets (no asyncio protocol objects on the test's side)."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    await loop.sock_connect(s, ("127.0.0.1", port))
    await loop.sock_sendall(s, b"\x05\x01\x00")
    assert await loop.sock_recv(s, 2) == b"\x05\x00"
    await loop.sock_sendall(s, b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", dest_port))
    reply = b""
    while len(reply) < 10:
        chunk = await loop.sock_recv(s, 10 - len(reply))
        assert chunk, "SOCKS server closed"
        reply += chunk
    assert reply[1] == 0, reply
    return s


def _count(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def test_idle_streams_hold_no_deques(client_node):
    loop = asyncio.get_running_loop()
    dest = await loop.create_server(_Hold, "127.0.0.1", 0)
    dport = dest.sockets[0].getsockname()[1]
    n = 20
    socks = []
    try:
        socks.append(await _socks_open(client_node.socks_port, dport))  # the circuit is in use: warm
        await asyncio.sleep(0.3)
        gc.collect()
        deques0 = _count(collections.deque)
        plain0 = _count(asyncio.StreamReaderProtocol)
        lean0 = _count(LeanStreamReaderProtocol)
        readers0, writers0 = _count(asyncio.StreamReader), _count(asyncio.StreamWriter)
        futures0 = _count(asyncio.Future)
        sides0 = _count(_Side)
        tasks0 = len(asyncio.all_tasks())
        for _ in range(n):
            socks.append(await _socks_open(client_node.socks_port, dport))
        await asyncio.sleep(0.3)
        gc.collect()
        # no task per stream: no pump tasks copying through reader buffers, and the SOCKS
        # connection's handler ended once it handed the connection to the splice
        assert len(asyncio.all_tasks()) == tasks0
        spliced = client_node.socks._spliced
        assert len(spliced) == n + 1 and client_node.socks.stats.active == n + 1
        # both transports of each stream (SOCKS side and circuit side) are spliced: a _Side
        # protocol on each; the reader/writer pairs that did the SOCKS handshake and waited
        # for CONNECTED were let go (the splice's release), with their protocols and futures
        assert _count(_Side) - sides0 == 2 * n
        assert _count(LeanStreamReaderProtocol) - lean0 == 0
        assert _count(asyncio.StreamReaderProtocol) == plain0
        assert (_count(asyncio.StreamReader) - readers0, _count(asyncio.StreamWriter) - writers0) == (0, 0)
        assert _count(asyncio.Future) - futures0 <= n  # the circuit stream's `connected`
        transports = [t for c in client_node.client.circuits.values() for t in c._transports.values()]
        assert len(transports) == n + 1
        for t in transports:
            assert type(t.protocol) is _Side and t.protocol.original is None
            # the writers were collected without closing their transports (asyncio's
            # StreamWriter.__del__ would have)
            assert not t.is_closing() and not t.protocol.peer.is_closing()
            assert t._reader_buffer is None  # the core counts no reader room for a splice
            stream = t.circuit.core.streams[t.stream_id]
            # the SOCKS socket holds what the reader held before it pauses: under congestion
            # control tor's cc_xoff_client (500 cells), so XOFF comes where tor sends it
            assert stream.layer.cc is not None
            xoff = stream.layer.cc.p.xoff_bytes(exit_side=False)
            assert t.protocol.peer.get_write_buffer_limits() == (xoff // 2, xoff)
            socks_side = t.protocol.peer.get_protocol()
            assert type(socks_side) is _Side and socks_side.original is None
            assert stream.package._digests is None  # a stream window never remembers digests
        # ...and no stream made a deque (asyncio's own transports may, on newer Pythons: < 1 each)
        assert _count(collections.deque) - deques0 < n
        # the application closing ends each splice: the connection is closed and counted
        for s in socks[1:]:
            s.close()
        await wait_for(lambda: len(spliced) == 1 and client_node.socks.stats.active == 1, 10,
                       "the splices to end")
        await wait_for(lambda: sum(len(c._transports) for c in client_node.client.circuits.values()) == 1,
                       10, "the streams to end")
    finally:
        for s in socks:
            s.close()
        for t in _Hold.held:
            t.close()
        dest.close()


async def test_lean_protocol_drain_waits_while_paused_and_wakes():
    """A writer that outruns its peer waits in drain(); the deque appears then; the bytes
    all arrive; a connection lost while a writer waits wakes it."""
    got = asyncio.get_running_loop().create_future()
    size = 16 << 20

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proto = writer._protocol
        assert isinstance(proto, LeanStreamReaderProtocol) and proto._lean_waiters is None
        writer.write(b"x" * size)  # far beyond the socket buffers: the transport pauses
        assert proto._paused
        drain = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(0.2)
        assert not drain.done()  # waiting for the peer to read
        assert proto._lean_waiters is not None and len(proto._lean_waiters) == 1
        got.set_result(None)  # let the peer read
        await asyncio.wait_for(drain, 20)
        assert not proto._paused and len(proto._lean_waiters) == 0
        writer.write(b"y" * size)
        assert proto._paused
        drain = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(0.1)
        writer.transport.abort()  # connection lost while a writer waits: it must wake
        try:
            await asyncio.wait_for(drain, 5)
        except ConnectionResetError:
            pass
        writer.close()

    server = await start_server(handler, "127.0.0.1", 0, limit=65536)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(got, 20)
        data = await asyncio.wait_for(reader.readexactly(size), 30)
        assert data == b"x" * size
        writer.close()
    finally:
        server.close()
