"""A wide-area-network emulator in user space: TCP proxies that add latency (specs/performance.md).

Theory of operation
-------------------
Loopback hides latency: every round trip takes microseconds, so fixed flow-control
windows never limit anything and congestion control has nothing to measure. This kernel
has no ``netem`` qdisc, so latency is made here: a :class:`DelayProxy` listens on a port
and forwards each connection to a target address, holding every chunk it reads for
``delay`` seconds (one way) before writing it on — in both directions, so a connection
through it has ``2 × delay`` more round-trip time. Byte order and EOF are kept; chunks are
not split or merged differently than TCP would.

Put one in front of a relay's ORPort (the relay listens on one port and advertises the
proxy's: ``or_advertise_port``, tor's ``NoListen``/``NoAdvertise`` pair) and every link
*to* that relay — from clients, from other relays — gets its delay; ``onionp2p testnet
--link-delay`` does that for every relay, and tools/bench_latency.py for tor's relays
too.

The proxy holds at most ``limit`` bytes per direction (queued plus not yet written): above
that it stops reading from the sender until the queue has halved, so a fast sender is
slowed by TCP back-pressure rather than filling memory — like a router's buffer, except
that nothing is dropped. It adds no bandwidth limit; :func:`measure` reports the proxy's
own round-trip time and throughput ceiling so a benchmark can show them next to its
figures.

Run as ``python -m onionp2p wan --map LISTEN_PORT:HOST:PORT:DELAY_MS [...]``; it prints
``wan ready`` once every listener is up and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from dataclasses import dataclass

from onionp2p.errors import ConfigError
from onionp2p.log import get_logger

__all__ = ["DelayProxy", "Mapping", "parse_map", "run_proxies", "measure"]

log = get_logger("onionp2p.wan")

#: bytes one direction of a connection may hold before the proxy stops reading its sender
DEFAULT_LIMIT = 8 * 1024 * 1024


@dataclass(frozen=True)
class Mapping:
    """Listen on 127.0.0.1:``listen_port``, forward to ``host``:``port`` with ``delay`` s each way."""

    listen_port: int
    host: str
    port: int
    delay: float


def parse_map(text: str) -> Mapping:
    """``LISTEN_PORT:HOST:PORT:DELAY_MS`` (ConfigError if malformed)."""
    parts = text.split(":")
    if len(parts) != 4:
        raise ConfigError(f"--map {text!r}: expected LISTEN_PORT:HOST:PORT:DELAY_MS")
    try:
        listen, port, delay_ms = int(parts[0]), int(parts[2]), float(parts[3])
    except ValueError:
        raise ConfigError(f"--map {text!r}: ports and delay must be numbers") from None
    if not (0 < listen < 65536 and 0 < port < 65536 and 0 <= delay_ms <= 10_000):
        raise ConfigError(f"--map {text!r}: ports 1-65535, delay 0-10000 ms")
    return Mapping(listen, parts[1], port, delay_ms / 1000)


class _Direction(asyncio.Protocol):
    """One side's socket: what it reads goes, ``delay`` later, to the peer side's socket."""

    def __init__(self, proxy: DelayProxy):
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: _Direction | None = None
        self.queue: deque[tuple[float, bytes | None]] = deque()  # (due time, data | None for EOF)
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.closed = False
        self.eof_passed = False  # our sender's EOF reached the peer's socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._enqueue(data)

    def eof_received(self) -> bool:
        self._enqueue(None)
        return True  # keep our write side open until the peer's data is through

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            if exc is not None:
                peer.transport.abort()
            elif not self.queue:
                peer.transport.close()
            else:
                self.queue.append((self.loop.time() + self.proxy.delay, None))

    # -- delaying ----------------------------------------------------------------------------

    def _enqueue(self, data: bytes | None) -> None:
        self.queue.append((self.loop.time() + self.proxy.delay, data))
        if data:
            self.queued += len(data)
            self.proxy.bytes_forwarded += len(data)
            if self.queued + self._peer_buffered() > self.proxy.limit and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
        if self.timer is None:
            self._schedule()

    def _peer_buffered(self) -> int:
        peer = self.peer
        return peer.transport.get_write_buffer_size() if peer and peer.transport and not peer.closed else 0

    def _schedule(self) -> None:
        self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        peer = self.peer
        now = self.loop.time()
        out = []
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is None:
                if out:
                    self._write(b"".join(out))
                    out = []
                self.eof_passed = True
                if peer and peer.transport and not peer.closed:
                    if self.closed or peer.eof_passed:  # both ways done: close both
                        peer.transport.close()
                        if self.transport is not None and not self.closed:
                            self.transport.close()
                    else:
                        peer.transport.write_eof()
                continue
            out.append(data)
            self.queued -= len(data)
        if out:
            self._write(b"".join(out))
        if self.queue:
            self._schedule()
        if self.reading_paused and self.queued + self._peer_buffered() <= self.proxy.limit // 2 \
                and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _write(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.write(data)

    def resume_writing(self) -> None:
        # our socket drained: the peer may read again if it stopped for our buffer
        peer = self.peer
        if peer is not None and peer.reading_paused and not peer.timer and not peer.closed:
            peer._flush()


class DelayProxy:
    """One listener of the emulator (see the module docstring)."""

    def __init__(self, mapping: Mapping, *, limit: int = DEFAULT_LIMIT):
        self.mapping = mapping
        self.delay = mapping.delay
        self.limit = limit
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0
        self.bytes_forwarded = 0
        self._pending: set[asyncio.Task] = set()

    async def start(self) -> DelayProxy:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Accepted(self), "127.0.0.1", self.mapping.listen_port,
                                               reuse_address=True)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._pending):
            t.cancel()

    async def _connect(self, inbound: _Direction) -> None:
        loop = asyncio.get_running_loop()
        m = self.mapping
        try:
            _t, outbound = await loop.create_connection(lambda: _Direction(self), m.host, m.port)
        except OSError as exc:
            log.info("wan: target unreachable", target=f"{m.host}:{m.port}", error=str(exc))
            if inbound.transport is not None:
                inbound.transport.abort()
            return
        inbound.peer, outbound.peer = outbound, inbound
        self.connections += 1
        if inbound.queue and inbound.timer is None:
            inbound._schedule()


class _Accepted(_Direction):
    """The client side of a proxied connection: connects to the target on arrival; what it
    reads meanwhile is queued (with its due time) and goes once the target is connected."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.ensure_future(self.proxy._connect(self))
        self.proxy._pending.add(task)
        task.add_done_callback(self.proxy._pending.discard)

    def _schedule(self) -> None:
        if self.peer is not None:
            super()._schedule()


async def run_proxies(mappings: list[Mapping], *, stop: asyncio.Event | None = None, ready=None) -> int:
    """Run one DelayProxy per mapping until ``stop`` is set (or SIGINT/SIGTERM)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    proxies = [await DelayProxy(m).start() for m in mappings]
    print("wan ready", flush=True)
    if ready is not None:
        ready(proxies)
    try:
        await stop.wait()
    finally:
        for p in proxies:
            await p.stop()
    return 0


async def measure(delay: float, *, nbytes: int = 64 * 1024 * 1024, pings: int = 20) -> dict:
    """The emulator alone: the round-trip time of a small echo through one proxy of one-way
    ``delay`` (expected: 2 × delay) and the throughput of one bulk transfer through it."""
    loop = asyncio.get_running_loop()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while data := await reader.read(1 << 20):
            got += len(data)
        writer.write(str(got).encode())
        await writer.drain()
        writer.close()

    out = {}
    for name, handler in (("echo", echo), ("sink", sink)):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with _free_socket() as listen_port:
            pass
        proxy = await DelayProxy(Mapping(listen_port, "127.0.0.1", port, delay)).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listen_port)
            if name == "echo":
                rtts = []
                for _ in range(pings):
                    t0 = loop.time()
                    writer.write(b"x")
                    await reader.readexactly(1)
                    rtts.append(loop.time() - t0)
                rtts.sort()
                out["rtt_p50_s"] = rtts[len(rtts) // 2]
                out["rtt_expected_s"] = 2 * delay
            else:
                chunk = b"\0" * (1 << 20)
                t0 = time.perf_counter()
                for _ in range(nbytes // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()
                got = int(await reader.read())
                out["throughput_bytes_per_s"] = got / (time.perf_counter() - t0)
            writer.close()
        finally:
            await proxy.stop()
            server.close()
    return out


class _free_socket:
    """A port that was free a moment ago (for the listener :func:`measure` starts)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()
