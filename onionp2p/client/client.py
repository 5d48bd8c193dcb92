"""Client-side circuits and streams: the asyncio library API (tor-spec §5, §6; specs/streams.md).

Theory of operation
-------------------
:class:`OnionClient` keeps one channel per guard relay and builds circuits through a
given list of relays (:class:`~onionp2p.proto.directory.RelayInfo`): CREATE2 (ntor) to the
first, then EXTEND2 in RELAY_EARLY cells hop by hop, adding one
:class:`~onionp2p.proto.relaycrypto.ClientCrypto` layer per EXTENDED2. Connecting to a relay
(TCP and TLS, then the link handshake) is bounded by ``handshake_timeout`` each; a channel
whose peer went silent can be retired (:meth:`OnionClient.retire_channel`): it takes no
new circuits and closes once its last circuit is gone.

A built :class:`ClientCircuit` opens streams with :meth:`ClientCircuit.open_stream`,
which returns a genuine ``(asyncio.StreamReader, asyncio.StreamWriter)`` pair. Under it
is a :class:`StreamTransport` (an ``asyncio.Transport``) joined to an
:class:`~onionp2p.proto.stream.EdgeStream`: ``writer.write`` packages DATA cells as the
windows allow and ``await writer.drain()`` blocks while they do not; the reader's own
flow control (``pause_reading``) withholds stream SENDMEs, so a slow reader stops the
exit after 500 cells instead of filling memory.

Observers registered with :meth:`OnionClient.add_listener` receive
:class:`CircuitEvent` records (launched, extended, built, failed, closed) with reasons
and byte counts.

Fast path: the channel hands over runs of consecutive RELAY cells
(:meth:`ClientCircuit.relay_run`); their layers are removed hop by hop with one AES-CTR
call per hop for the whole run (:meth:`~onionp2p.proto.relaycrypto.ClientCrypto.decrypt_inbound_many`),
then each cell is handled in order. Stream data delivered during a run is collected per
stream and given to the application once at the end of the run (one
``data_received`` instead of one per cell); a SENDME originated while handling the run
is written to the channel at once instead of at the end of the loop turn, so the far
edge can send again while we are still working through the run.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from onionp2p.errors import (
    CircuitError,
    DigestMismatch,
    LocalProtocolError,
    OnionError,
    ProtocolError,
    StreamError,
)
from onionp2p.listeners import Listeners
from onionp2p.log import get_logger
from onionp2p.net import tls
from onionp2p.net.channel import Channel
from onionp2p.proto.cells import Cell, CellCommand, Create2, Created2, Destroy, DestroyReason
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.flowctl import DeliverWindow, PackageWindow
from onionp2p.proto.handshake import HTYPE_NTOR, NtorClient
from onionp2p.proto.link import PeerIdentity
from onionp2p.proto.relaycell import (
    RELAY_DATA_MAX,
    RELAY_HEADER_LEN,
    Begin,
    Connected,
    End,
    EndReason,
    Extend2,
    Extended2,
    LinkSpec,
    RelayCommand,
    Resolve,
    Resolved,
    Sendme,
    Truncated,
    pack_relay,
    unpack_relay,
)
from onionp2p.proto.relaycrypto import ClientCrypto
from onionp2p.proto.stream import EdgeStream, StreamState

_CELL = 514
_RELAY_HDR = struct.Struct(">BHH4sH")  # relaycell's relay header: cmd, recognized, stream, digest, length
_RELAY_EARLY = int(CellCommand.RELAY_EARLY)
_DATA = int(RelayCommand.DATA)
_SENDME = int(RelayCommand.SENDME)
_EXTEND2 = int(RelayCommand.EXTEND2)
#: Relay commands that belong to a stream: never valid on stream 0 (tor-spec §6.1).
_STREAM_COMMANDS = frozenset(int(c) for c in (
    RelayCommand.BEGIN, RelayCommand.DATA, RelayCommand.END, RelayCommand.CONNECTED,
    RelayCommand.RESOLVE, RelayCommand.RESOLVED, RelayCommand.BEGIN_DIR))

__all__ = ["OnionClient", "ClientCircuit", "CircuitEvent", "StreamTransport"]

log = get_logger("onionp2p.client")
_circuit_ids = itertools.count(1)
MAX_RELAY_EARLY = 8


@dataclass(frozen=True)
class CircuitEvent:
    """Something happened to a circuit. ``kind``: launched, extended, built, failed, closed."""

    kind: str
    circuit_id: int
    path: tuple[str, ...]
    reason: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


class StreamTransport(asyncio.Transport):
    """The ``asyncio.Transport`` under a client stream's reader/writer pair."""

    def __init__(self, circuit: ClientCircuit, host: str, port: int):
        super().__init__()
        self.circuit = circuit
        self.protocol: asyncio.StreamReaderProtocol | None = None
        self.edge: EdgeStream | None = None
        self._host, self._port = host, port
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._close_callbacks: list = []
        # Data of the current run of cells, handed to the protocol once per run
        # (see ClientCircuit.relay_run); bounded like StreamReader's own buffer.
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._reader_buffer: bytearray | None = None  # the StreamReader's buffer, when known
        self._pending_limit = 2 * 2**16

    def add_close_callback(self, fn) -> None:
        """Call ``fn(exc)`` once when the stream is gone (exc None for a clean close)."""
        self._close_callbacks.append(fn)

    # EdgeStream hooks
    def _sink(self, data: bytes) -> None:
        if self.protocol is not None and not self._lost:
            if not self._pending:
                self.circuit._sinks.append(self)
            self._pending.append(data)
            self._pending_len += len(data)
            # What StreamReader.feed_data would have done had this cell been fed now: pause
            # us once its buffer holds more than twice its limit (it resumes us itself).
            if not self._reading_paused:
                buffered = self._pending_len
                if self._reader_buffer is not None:
                    buffered += len(self._reader_buffer)
                if buffered > self._pending_limit:
                    self._reading_paused = True

    def _flush_sink(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_len = 0
        if self.protocol is not None and not self._lost:
            self.protocol.data_received(data)

    def _sink_ready(self) -> bool:
        return not self._reading_paused

    def _attach_reader(self, reader: asyncio.StreamReader, limit: int) -> None:
        buf = getattr(reader, "_buffer", None)
        self._reader_buffer = buf if isinstance(buf, bytearray) else None
        self._pending_limit = 2 * limit

    def _pause_source(self) -> None:
        if self.protocol is not None and not self._lost:
            self.protocol.pause_writing()

    def _resume_source(self) -> None:
        if self.protocol is not None and not self._lost:
            self.protocol.resume_writing()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._flush_sink()
        self._lost = True
        if self.protocol is not None:
            if exc is None:
                self.protocol.eof_received()
            self.protocol.connection_lost(exc)
        for fn in self._close_callbacks:
            fn(exc)
        self._close_callbacks.clear()

    # asyncio.Transport API
    def write(self, data: bytes) -> None:
        if self._closing or self.edge is None or self.edge.state is StreamState.CLOSED:
            return
        self.edge.write(bytes(data))

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        # tor has no half-close: END closes both directions. Clients send only MISC.
        self.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.edge is not None and self.edge.state is not StreamState.CLOSED:
            self.edge.finish(EndReason.MISC)
        asyncio.get_running_loop().call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self._closing = True
        if self.edge is not None and self.edge.state is not StreamState.CLOSED:
            self.circuit.send_relay(RelayCommand.END, self.edge.stream_id, End(EndReason.MISC).encode())
            self.edge.close()
        self._connection_lost(None)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self.edge is not None:
            self.edge.maybe_send_sendme()

    def is_reading(self) -> bool:
        return not self._reading_paused

    def get_write_buffer_size(self) -> int:
        return self.edge.buffered if self.edge is not None else 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return {"peername": (self._host, self._port), "circuit": self.circuit,
                "stream_id": self.edge.stream_id if self.edge else None}.get(name, default)


class ClientCircuit:
    """A circuit this client originates. Build it with :meth:`OnionClient.build_circuit`."""

    def __init__(self, client: OnionClient, chan: Channel, path: Sequence[RelayInfo]):
        self.client = client
        self.chan = chan
        self.path = tuple(path)
        self.id = next(_circuit_ids)
        self.circ_id = chan.new_circ_id()
        self.crypto = ClientCrypto()
        self.hops: list[RelayInfo] = []
        self.state = "launched"
        self.created_at = time.time()
        self.streams: dict[int, EdgeStream] = {}
        # Circuit-level windows per hop, like tor's per-cpath-layer windows: a SENDME
        # credits the window of the hop that sent it, DATA counts against its sender's.
        self.packages: list[PackageWindow] = []
        self.delivers: list[DeliverWindow] = []
        #: relay cells dropped because a hop sent what it may not (wrong hop, stream 0 ...)
        self.violations = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.close_reason: str | None = None
        self.isolation: object = None
        self._early_left = MAX_RELAY_EARLY
        self._pending: asyncio.Future | None = None
        self._resolves: dict[int, tuple[int, asyncio.Future]] = {}  # stream ID -> (hop, answer)
        # streams we closed (END sent, RESOLVE given up) -> their hop, until the far edge's
        # END/RESOLVED arrives: what it still sends for them is no violation
        self._half_closed: dict[int, int] = {}
        self._next_sid = secrets.randbelow(1 << 16)  # tor: crypto_rand_int(1<<16)
        self._sinks: list[StreamTransport] = []  # streams with data pending in this run
        self._urgent = False  # a SENDME was queued on the channel during this run
        self.log = log.bind(circ=self.id)
        chan.circuits[self.circ_id] = self

    # -- building --------------------------------------------------------------------------

    def _event(self, kind: str, reason: str | None = None) -> None:
        self.client._emit(CircuitEvent(kind, self.id, tuple(h.nickname for h in self.hops), reason,
                                       self.bytes_sent, self.bytes_received))

    def _add_hop(self, key_material: bytes) -> None:
        """A hop answered CREATED2/EXTENDED2: its crypto layer and its circuit windows."""
        self.crypto.add_hop(key_material)
        self.packages.append(PackageWindow.circuit())
        self.delivers.append(DeliverWindow.circuit())

    @property
    def package(self) -> PackageWindow:
        """The last hop's circuit package window (where streams send their DATA)."""
        return self.packages[-1]

    @property
    def deliver(self) -> DeliverWindow:
        """The last hop's circuit deliver window."""
        return self.delivers[-1]

    def _violation(self, message: str, hop: int, cmd: int, sid: int) -> None:
        """A hop sent a cell it may not send: drop it and say so (tor-spec §6; tor drops
        such cells as "dropped, unknown stream"). The application never sees it."""
        self.violations += 1
        # the first one per circuit loudly; a hop that floods them must not flood the log
        (self.log.warning if self.violations == 1 else self.log.debug)(
            "protocol violation: relay cell dropped", reason=message, from_hop=hop,
            relay_cmd=_cmd_name(cmd), stream_id=sid, violations=self.violations)

    async def _build(self, timeout: float) -> None:
        self._event("launched")
        try:
            async with asyncio.timeout(timeout):
                first = self.path[0]
                hs = NtorClient(first.rsa_id, first.ntor_key)
                self._pending = asyncio.get_running_loop().create_future()
                self.chan.send_cell(self.circ_id, CellCommand.CREATE2, Create2(HTYPE_NTOR, hs.onion_skin).encode())
                reply = await self._pending
                self._add_hop(hs.complete(Created2.parse(reply).hdata))
                self.hops.append(first)
                self._event("extended")
                for relay in self.path[1:]:
                    await self._extend(relay)
        except (OnionError, asyncio.TimeoutError) as exc:
            reason = "TIMEOUT" if isinstance(exc, asyncio.TimeoutError) else getattr(exc, "reason", "PROTOCOL")
            self._fail(str(exc) or reason, reason)
            raise CircuitError(f"circuit build failed: {exc or 'timeout'}", reason) from None
        self.state = "built"
        self._event("built")

    async def _extend(self, relay: RelayInfo) -> None:
        hs = NtorClient(relay.rsa_id, relay.ntor_key)
        specs = (LinkSpec.ipv4(relay.address, relay.or_port), LinkSpec.legacy_id(relay.rsa_id),
                 LinkSpec.ed25519_id(relay.ed_id))
        self._pending = asyncio.get_running_loop().create_future()
        self.send_relay(RelayCommand.EXTEND2, 0, Extend2(specs, HTYPE_NTOR, hs.onion_skin).encode())
        reply = await self._pending
        self._add_hop(hs.complete(Extended2.parse(reply).hdata))
        self.hops.append(relay)
        self._event("extended")

    # -- cells ------------------------------------------------------------------------------

    def send_relay(self, cmd: int, stream_id: int, data: bytes = b"", *, hop: int | None = None) -> None:
        """Originate a relay cell to ``hop`` (default: the last hop built).

        RELAY_EARLY as tor sends it (tor-spec §5.6): while the circuit's budget of 8 lasts,
        EXTEND2 and every cell addressed past the first hop go as RELAY_EARLY, so a relay
        cannot tell the circuit's length or the client's implementation by counting them.
        """
        if self.state in ("closed", "failed"):
            return
        if hop is None:
            hop = self.crypto.n_hops - 1
        ct, digest = self.crypto.originate(pack_relay(cmd, stream_id, data), hop)
        if cmd == _DATA:
            self.packages[hop].on_data_sent(digest)
            self.bytes_sent += len(data)
        elif cmd == _SENDME:
            self._urgent = True
        command = CellCommand.RELAY
        if self._early_left > 0 and (hop != 0 or cmd == _EXTEND2):
            self._early_left -= 1
            command = CellCommand.RELAY_EARLY
        elif cmd == _EXTEND2:
            raise LocalProtocolError("no RELAY_EARLY cells left on this circuit")
        self.chan.send_cell(self.circ_id, command, ct)

    def send_data_many(self, stream_id: int, chunks: list) -> None:
        """One DATA cell per chunk to the last hop: the cells of ``send_relay`` per chunk."""
        if self.state in ("closed", "failed") or not chunks:
            return
        hop = self.crypto.n_hops - 1
        originate = self.crypto.originate
        on_sent = self.packages[hop].on_data_sent
        cts = []
        for chunk in chunks:
            ct, digest = originate(pack_relay(_DATA, stream_id, chunk), hop)
            on_sent(digest)
            self.bytes_sent += len(chunk)
            cts.append(ct)
        if self._early_left > 0 and hop != 0:
            k = min(self._early_left, len(cts))
            self._early_left -= k
            self.chan.send_payloads(self.circ_id, CellCommand.RELAY_EARLY, cts[:k])
            cts = cts[k:]
        self.chan.send_payloads(self.circ_id, CellCommand.RELAY, cts)

    def package_budget(self) -> int:
        """How many DATA cells a stream may package now (the circuit's package window)."""
        return self.packages[-1].window if self.state == "built" else 0

    def relay_run(self, chan: Channel, data: bytes, start: int, count: int) -> None:
        """``count`` consecutive RELAY/RELAY_EARLY cells of this circuit at
        ``data[start + i*514:]``: handled exactly as ``handle_cell`` one by one."""
        if self.state in ("closed", "failed"):
            return
        mv = memoryview(data)
        bodies = []
        early = False
        for pos in range(start, start + count * _CELL, _CELL):
            if mv[pos + 4] == _RELAY_EARLY:
                early = True
                break
            bodies.append(mv[pos + 5:pos + _CELL])
        error: ProtocolError | None = None
        try:
            results = self.crypto.decrypt_inbound_many(bodies) if bodies else []
        except DigestMismatch as exc:
            results, error = exc.partial, exc
        except ProtocolError as exc:
            results, error = [], exc
        try:
            unpack = _RELAY_HDR.unpack_from
            delivers = self.delivers
            streams = self.streams
            for hop, body, digest in results:
                cmd, _rec, sid, _dig, length = unpack(body)
                if cmd == _DATA and length <= RELAY_DATA_MAX and sid:
                    # _relay's DATA branch, inlined for the common case
                    deliver = delivers[hop]
                    deliver.on_data_received()
                    stream = streams.get(sid)
                    if stream is not None and stream.hop == hop:
                        self.bytes_received += length
                        stream.on_data(body[RELAY_HEADER_LEN:RELAY_HEADER_LEN + length])
                    else:
                        self._no_stream(hop, cmd, sid)
                    if deliver.sendme_due():
                        self._sendmes_due(hop, digest)
                else:
                    self._relay(hop, body, digest)
                if self.state in ("closed", "failed"):
                    break
                if self._urgent:
                    self._urgent = False
                    self.chan.flush()
            if error is None and early and self.state not in ("closed", "failed"):
                error = ProtocolError("RELAY_EARLY cell toward the client")
            if error is not None:
                raise error
        except ProtocolError as exc:
            self.log.info("protocol violation; closing circuit", error=str(exc))
            self._closed(str(exc), "PROTOCOL")
        finally:
            self._urgent = False
            self._flush_sinks()

    def _flush_sinks(self) -> None:
        sinks = self._sinks
        if sinks:
            self._sinks = []
            for t in sinks:
                t._flush_sink()

    def handle_cell(self, chan: Channel, cell: Cell) -> None:
        cmd = cell.command
        try:
            if cmd == CellCommand.RELAY:
                hop, body, digest = self.crypto.decrypt_inbound(cell.payload)
                try:
                    self._relay(hop, body, digest)
                finally:
                    self._urgent = False
                    self._flush_sinks()
            elif cmd == CellCommand.CREATED2:
                if self._pending is None or self._pending.done() or self.hops:
                    raise ProtocolError("unexpected CREATED2")
                self._pending.set_result(cell.payload)
            elif cmd == CellCommand.DESTROY:
                reason = Destroy.parse(cell.payload).reason
                name = DestroyReason(reason).name if reason in DestroyReason._value2member_map_ else str(reason)
                self._closed(f"DESTROY from the network ({name})", name, send_destroy=False)
            elif cmd == CellCommand.RELAY_EARLY:
                raise ProtocolError("RELAY_EARLY cell toward the client")
        except ProtocolError as exc:
            self.log.info("protocol violation; closing circuit", error=str(exc))
            self._closed(str(exc), "PROTOCOL")

    def _relay(self, hop: int, body: bytes, digest: bytes) -> None:
        """One relay cell that hop ``hop`` originated (its layer recognized it).

        A hop speaks only for itself (tor's ``relay_lookup_conn`` / ``edge_uses_cpath``):
        stream cells count only from the hop the stream was opened to, EXTENDED2 only from
        the last hop while we extend, a circuit SENDME credits its sender's window. Cells
        that break this are dropped and logged (:meth:`_violation`); they never reach a
        stream or a waiting build.
        """
        cmd, sid, data = unpack_relay(body)
        if sid == 0 and cmd in _STREAM_COMMANDS:
            self._violation("stream command on stream 0", hop, cmd, sid)
            if cmd == RelayCommand.DATA:
                self._count_data(hop, digest)
            return
        if cmd == RelayCommand.DATA:
            stream = self.streams.get(sid)
            if stream is not None and stream.hop == hop:
                self.bytes_received += len(data)
                self.delivers[hop].on_data_received()
                stream.on_data(data)
                self._sendmes_due(hop, digest)
            else:
                self._no_stream(hop, cmd, sid)
                self._count_data(hop, digest)
        elif cmd == RelayCommand.SENDME:
            if sid == 0:
                msg = Sendme.parse(data)
                self.packages[hop].on_sendme(msg.digest if msg.version == 1 else None)
                for stream in list(self.streams.values()):
                    if stream.hop == hop:
                        stream.pump()
            elif (stream := self._stream_of(hop, cmd, sid)) is not None:
                stream.on_sendme()
        elif cmd == RelayCommand.CONNECTED:
            stream = self._stream_of(hop, cmd, sid)
            if stream is not None:
                if stream.state is not StreamState.CONNECTING:
                    self._violation("CONNECTED on an open stream", hop, cmd, sid)
                    return
                Connected.parse(data)
                stream.mark_open()
                fut = stream.conn.connected  # type: ignore[union-attr]
                if not fut.done():
                    fut.set_result(None)
        elif cmd == RelayCommand.END:
            pending = self._resolves.get(sid)
            if pending is not None and pending[0] == hop:  # the exit refused our RESOLVE
                del self._resolves[sid]
                reason = End.parse(data).reason
                if not pending[1].done():
                    pending[1].set_exception(StreamError(f"resolve refused: {_reason_name(reason)}", reason))
                return
            stream = self._stream_of(hop, cmd, sid)
            if stream is not None:
                self._stream_ended(stream, End.parse(data).reason)
        elif cmd == RelayCommand.RESOLVED:
            pending = self._resolves.get(sid)
            if pending is None or pending[0] != hop:
                self._no_stream(hop, cmd, sid)
                return
            del self._resolves[sid]
            if not pending[1].done():
                pending[1].set_result(Resolved.parse(data))
        elif cmd == RelayCommand.EXTENDED2:
            if self._pending is None or self._pending.done() or not self.hops:
                if hop == self.crypto.n_hops - 1:
                    raise ProtocolError("unexpected EXTENDED2")  # tor closes the circuit too
                self._violation("EXTENDED2 from a hop that is not extending", hop, cmd, sid)
                return
            if hop != self.crypto.n_hops - 1:
                self._violation("EXTENDED2 from a hop that is not the last", hop, cmd, sid)
                return
            self._pending.set_result(data)
        elif cmd == RelayCommand.TRUNCATED:
            reason = Truncated.parse(data).reason
            self._closed("circuit truncated by the network", DestroyReason(reason).name
                         if reason in DestroyReason._value2member_map_ else str(reason))
        elif cmd in _STREAM_COMMANDS:  # BEGIN, RESOLVE, BEGIN_DIR: never toward a client
            self._violation("stream request toward the client", hop, cmd, sid)

    def _stream_of(self, hop: int, cmd: int, sid: int) -> EdgeStream | None:
        """The stream ``sid`` if it was opened to ``hop``; otherwise None (see _no_stream)."""
        stream = self.streams.get(sid)
        if stream is not None and stream.hop == hop:
            return stream
        self._no_stream(hop, cmd, sid)
        return None

    def _no_stream(self, hop: int, cmd: int, sid: int) -> None:
        """A stream cell that matches no open stream of ``hop``. Cells racing our END on a
        stream of that hop are dropped quietly (tor's half-closed streams); anything else
        is a violation: a hop answering for a stream that is not its own."""
        if self._half_closed.get(sid) == hop:
            if cmd == RelayCommand.END or cmd == RelayCommand.RESOLVED:
                del self._half_closed[sid]  # the far edge has closed it too
            return
        self._violation(f"{_cmd_name(cmd)} for no stream of this hop", hop, cmd, sid)

    def _count_data(self, hop: int, digest: bytes) -> None:
        """A dropped DATA cell still counts against its hop's circuit window (tor does too)."""
        self.delivers[hop].on_data_received()
        self._sendmes_due(hop, digest)

    def _sendmes_due(self, hop: int, digest: bytes) -> None:
        deliver = self.delivers[hop]
        while deliver.sendme_due() and self.state not in ("closed", "failed"):
            deliver.on_sendme_sent()
            self.send_relay(RelayCommand.SENDME, 0, Sendme(1, digest).encode(), hop=hop)

    # -- streams ----------------------------------------------------------------------------------

    def _new_stream_id(self) -> int:
        for _ in range(1 << 16):
            sid = self._next_sid
            self._next_sid = (sid + 1) & 0xFFFF
            if sid and sid not in self.streams and sid not in self._resolves and sid not in self._half_closed:
                return sid
        raise StreamError("no free stream ID", EndReason.RESOURCELIMIT)

    async def open_stream(self, host: str, port: int, *, timeout: float = 60.0, flags: int = 0,
                          limit: int = 2**16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a stream to ``host:port`` resolved at the exit. Raises StreamError on END."""
        return await self._open(RelayCommand.BEGIN, Begin(host, port, flags).encode(), host, port,
                                timeout, limit)

    async def open_dir_stream(self, *, timeout: float = 60.0, limit: int = 2**16,
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """BEGIN_DIR: a stream to the last hop's directory server (speaks HTTP/1.0)."""
        return await self._open(RelayCommand.BEGIN_DIR, b"", "", 0, timeout, limit)

    async def _open(self, command: int, body: bytes, host: str, port: int, timeout: float, limit: int,
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.state != "built":
            raise CircuitError("circuit is not open", self.close_reason or "NONE")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport = StreamTransport(self, host, port)
        transport.connected = loop.create_future()  # type: ignore[attr-defined]
        sid = self._new_stream_id()
        hop = self.crypto.n_hops - 1  # the only hop that may answer for this stream

        def on_close() -> None:
            if self.streams.pop(sid, None) is not None:
                self._half_closed[sid] = hop

        edge = EdgeStream(
            sid, emit=self.send_relay, circ_can_send=self.packages[-1].can_send,
            sink=transport._sink, sink_ready=transport._sink_ready,
            pause_source=transport._pause_source, resume_source=transport._resume_source,
            on_close=on_close, conn=transport,
        )
        edge.hop = hop
        transport.edge = edge
        transport.protocol = protocol
        transport._attach_reader(reader, limit)
        self.streams[sid] = edge
        protocol.connection_made(transport)
        self.send_relay(command, sid, body)
        try:
            async with asyncio.timeout(timeout):
                await transport.connected  # type: ignore[attr-defined]
        except asyncio.TimeoutError:
            transport.abort()
            raise StreamError("stream timed out waiting for CONNECTED", EndReason.TIMEOUT) from None
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer

    def _stream_ended(self, stream: EdgeStream, reason: int, exc: Exception | None = None) -> None:
        transport: StreamTransport = stream.conn  # type: ignore[assignment]
        was_open = stream.state is StreamState.OPEN
        stream.close()
        self._half_closed.pop(stream.stream_id, None)  # the far edge ended it: nothing more comes
        fut = transport.connected  # type: ignore[attr-defined]
        if not fut.done():
            fut.set_exception(StreamError(f"stream refused: {_reason_name(reason)}", reason))
            fut.exception()
        transport._connection_lost(exc if exc is not None else
                                   (None if was_open else ConnectionResetError(_reason_name(reason))))

    async def resolve(self, hostname: str, *, timeout: float = 30.0) -> Resolved:
        """RELAY_RESOLVE at the exit; returns the RESOLVED answers."""
        if self.state != "built":
            raise CircuitError("circuit is not open", self.close_reason or "NONE")
        sid = self._new_stream_id()
        fut = asyncio.get_running_loop().create_future()
        self._resolves[sid] = (self.crypto.n_hops - 1, fut)
        self.send_relay(RelayCommand.RESOLVE, sid, Resolve(hostname).encode())
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            pending = self._resolves.pop(sid, None)
            if pending is not None and self.state == "built":
                self._half_closed[sid] = pending[0]  # its RESOLVED may still come

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the circuit (clients send reason NONE) and end its streams."""
        self._closed("closed by us", "REQUESTED")

    def channel_closed(self, chan: Channel) -> None:
        self._closed("channel closed", "CHANNEL_CLOSED", send_destroy=False)

    def _fail(self, message: str, reason: str) -> None:
        self._closed(message, reason, failed=True)

    def _closed(self, message: str, reason: str, *, send_destroy: bool = True, failed: bool = False) -> None:
        if self.state in ("closed", "failed"):
            return
        built = self.state == "built"
        self.state = "failed" if (failed or not built) else "closed"
        self.close_reason = reason
        self.chan.circuits.pop(self.circ_id, None)
        self.chan.drop_queue(self.circ_id)  # first: the DESTROY below must not be dropped with the queue
        if send_destroy and not self.chan.closed:
            self.chan.send_cell(self.circ_id, CellCommand.DESTROY, Destroy(DestroyReason.NONE).encode())
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(CircuitError(message, reason))
            self._pending.exception()
        for _hop, fut in self._resolves.values():
            if not fut.done():
                fut.set_exception(CircuitError(message, reason))
                fut.exception()
        for stream in list(self.streams.values()):
            self._stream_ended(stream, EndReason.DESTROY, ConnectionResetError(f"circuit closed: {message}"))
        self.streams.clear()
        self.client._circuit_gone(self)
        self._event(self.state, reason)


def _cmd_name(cmd: int) -> str:
    return RelayCommand(cmd).name if cmd in RelayCommand._value2member_map_ else str(cmd)


def _reason_name(reason: int) -> str:
    return EndReason(reason).name if reason in EndReason._value2member_map_ else str(reason)


class OnionClient:
    """Builds circuits through given relays and keeps one channel per first hop."""

    def __init__(self, *, max_queue_cells: int = 2500, handshake_timeout: float = 30.0):
        self.channels: dict[bytes, Channel] = {}
        self.circuits: dict[int, ClientCircuit] = {}
        self.max_queue_cells = max_queue_cells
        self.handshake_timeout = handshake_timeout
        self._connecting: dict[bytes, asyncio.Task] = {}
        self._retired: set[Channel] = set()  # out of ``channels``, open until their circuits end
        self._listeners = Listeners("circuit event")
        self._channel_listeners = Listeners("channel")
        self.closed_bytes_read = 0
        self.closed_bytes_written = 0

    def add_listener(self, fn: Callable[[CircuitEvent], None]) -> None:
        self._listeners.add(fn)

    def remove_listener(self, fn: Callable[[CircuitEvent], None]) -> None:
        self._listeners.remove(fn)

    def _emit(self, event: CircuitEvent) -> None:
        self._listeners(event)

    async def channel_to(self, relay: RelayInfo) -> Channel:
        chan = self.channels.get(relay.rsa_id)
        if chan is not None and not chan.closed:
            return chan
        task = self._connecting.get(relay.rsa_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(relay))
            self._connecting[relay.rsa_id] = task
            task.add_done_callback(lambda _t: self._connecting.pop(relay.rsa_id, None))
        return await asyncio.shield(task)

    async def _connect(self, relay: RelayInfo) -> Channel:
        """TCP and TLS within ``handshake_timeout``, then the link handshake within it too
        (the channel's own timer): a peer that accepts and never answers costs a bounded
        time, whether or not anybody still waits for this connection."""
        loop = asyncio.get_running_loop()
        expected = PeerIdentity(ed25519_id=relay.ed_id, rsa_id=relay.rsa_id)

        def protocol() -> Channel:
            return Channel(self, initiator=True, keys=None, expected=expected, peer_address=relay.address,
                           handshake_timeout=self.handshake_timeout, max_queue_cells=self.max_queue_cells)

        async with asyncio.timeout(self.handshake_timeout):  # TimeoutError is an OSError
            _t, chan = await loop.create_connection(protocol, relay.address, relay.or_port,
                                                    ssl=tls.client_context(),
                                                    ssl_handshake_timeout=self.handshake_timeout)
        try:
            await chan.ready
        except OnionError:
            chan.close()
            raise
        self.channels[relay.rsa_id] = chan
        return chan

    async def build_circuit(self, path: Sequence[RelayInfo], *, timeout: float = 60.0) -> ClientCircuit:
        """Build a circuit through ``path`` (first hop first). Raises CircuitError."""
        circ, building = await self.launch_circuit(path, timeout=timeout)
        await building
        return circ

    async def launch_circuit(self, path: Sequence[RelayInfo], *, timeout: float = 60.0,
                             ) -> tuple[ClientCircuit, asyncio.Task]:
        """Connect to the first hop and start building; return the circuit and the build task
        (which raises CircuitError if the build fails) without waiting for the build."""
        if not path:
            raise LocalProtocolError("empty path")
        try:
            chan = await asyncio.wait_for(self.channel_to(path[0]), timeout)
        except (OSError, OnionError, asyncio.TimeoutError) as exc:
            raise CircuitError(f"cannot connect to first hop: {exc or 'timeout'}", "CONNECTFAILED") from None
        circ = ClientCircuit(self, chan, path)
        self.circuits[circ.id] = circ
        task = asyncio.get_running_loop().create_task(circ._build(timeout))
        return circ, task

    def _circuit_gone(self, circ: ClientCircuit) -> None:
        self.circuits.pop(circ.id, None)
        chan = circ.chan
        if getattr(chan, "bad_for_new_circs", False) and not chan.circuits and not chan.closed:
            chan.close("retired channel has no circuits left")

    def retire_channel(self, chan: Channel) -> None:
        """No new circuits on ``chan`` (its peer stopped answering, like tor's
        ``is_bad_for_new_circs``): the next circuit to that relay opens a new channel, and
        ``chan`` is closed as soon as its last circuit is gone."""
        chan.bad_for_new_circs = True
        for rsa_id, c in list(self.channels.items()):
            if c is chan:
                del self.channels[rsa_id]
        if chan.closed:
            return
        if chan.circuits:
            self._retired.add(chan)
        else:
            chan.close("retired channel has no circuits")

    async def close(self) -> None:
        for circ in list(self.circuits.values()):
            circ.close()
        for task in list(self._connecting.values()):
            task.cancel()
        for chan in [*self.channels.values(), *self._retired]:
            chan.close("client closing")
        self.channels.clear()
        self._retired.clear()
        await asyncio.sleep(0)

    # ChannelOwner
    def unknown_cell(self, chan: Channel, cell: Cell) -> None:
        pass  # cells for circuits we no longer know are dropped

    def channel_open(self, chan: Channel) -> None:
        self._emit_channel("connected", chan)

    def channel_closed(self, chan: Channel) -> None:
        self.closed_bytes_read += chan.bytes_in
        self.closed_bytes_written += chan.bytes_out
        self._retired.discard(chan)
        for rsa_id, c in list(self.channels.items()):
            if c is chan:
                del self.channels[rsa_id]
        self._emit_channel("closed", chan)

    def add_channel_listener(self, fn: Callable[[str, Channel], None]) -> None:
        """Call ``fn(kind, chan)`` when a channel opens ("connected") or closes ("closed")."""
        self._channel_listeners.add(fn)

    def remove_channel_listener(self, fn: Callable[[str, Channel], None]) -> None:
        self._channel_listeners.remove(fn)

    def _emit_channel(self, kind: str, chan: Channel) -> None:
        self._channel_listeners(kind, chan)

    def traffic(self) -> tuple[int, int]:
        """Bytes (read, written) on all OR channels since start."""
        live = [*self.channels.values(), *self._retired]
        return (self.closed_bytes_read + sum(c.bytes_in for c in live),
                self.closed_bytes_written + sum(c.bytes_out for c in live))

    def queue_overflow(self, chan: Channel, circ_id: int) -> None:
        circ = chan.circuits.get(circ_id)
        if circ is not None:
            circ._closed("outgoing queue over its bound", "RESOURCELIMIT")

    def account_read(self, chan: Channel, nbytes: int) -> None:
        pass  # clients have no bandwidth limit

    def channel_connected(self, chan: Channel) -> bool:
        return True

