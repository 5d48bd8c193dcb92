"""Client circuits and streams: the asyncio library API around the pure circuit core
(tor-spec §5, §6; specs/circuits.md, specs/streams.md).

Theory of operation
-------------------
:class:`OnionClient` builds circuits through a given list of relays
(:class:`~onionp2p.proto.directory.RelayInfo`). Its
:class:`~onionp2p.net.chanmgr.ChannelManager` keeps one channel per first hop; a channel
whose peer went silent can be retired (:meth:`OnionClient.retire_channel`).

A :class:`ClientCircuit` is the shell of one :class:`onionp2p.proto.circuit.ClientCircuit`
core, which holds the whole protocol: the build (CREATE2, EXTEND2, ntor), the layers, the
per-hop windows, which hop may say what, the streams' windows and SENDMEs. The shell feeds
it what arrives (runs of cells from the channel, the application's writes, timers, with
the loop's time) and carries out the actions it returns: cells to the channel, bytes to
the application, futures to resolve, events to emit.

:meth:`ClientCircuit.open_stream` returns a genuine ``(asyncio.StreamReader,
asyncio.StreamWriter)`` pair over a :class:`StreamTransport` (an ``asyncio.Transport``):
``writer.write`` hands bytes to the core, which packages DATA cells as the windows allow
and asks to pause the writer (``await writer.drain()`` blocks) above 64 KiB buffered. The
reader's own flow control (``pause_reading``) is passed to the core, which withholds
stream SENDMEs while the reader is full, so a slow reader stops the exit after 500 cells
instead of filling memory. Data of one run of cells reaches a stream's reader once.

Observers added to :attr:`OnionClient.events` receive
:class:`CircuitEvent` records (launched, extended, built, failed, closed) with reasons
and byte counts. Protocol violations by a hop (a cell it may not send) are logged once
per circuit at warning level, then at debug level.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from onionp2p.client.leanstreams import LeanStreamReaderProtocol
from onionp2p.defaults import HANDSHAKE_TIMEOUT, MAX_QUEUE_CELLS
from onionp2p.errors import CircuitError, LocalProtocolError, OnionError, StreamError
from onionp2p.listeners import Listeners
from onionp2p.log import get_logger
from onionp2p.net.chanmgr import ChannelManager
from onionp2p.net.channel import Channel
from onionp2p.proto import circuit as core
from onionp2p.proto.cells import Cell, CellCommand, Destroy, DestroyReason
from onionp2p.proto.congestion import CCParams
from onionp2p.proto.create import HopParams
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.padding import MIN_LINK_VERSION, PaddingParams, Usage, client_padding
from onionp2p.proto.relaycell import Begin, EndReason, RelayCommand, Resolved

__all__ = ["OnionClient", "ClientCircuit", "CircuitEvent", "StreamTransport"]

log = get_logger("onionp2p.client")
_circuit_ids = itertools.count(1)
_RELAY = int(CellCommand.RELAY)
_RELAY_EARLY = int(CellCommand.RELAY_EARLY)


@dataclass(frozen=True)
class CircuitEvent:
    """Something happened to a circuit. ``kind``: launched, extended, built, failed, closed."""

    kind: str
    circuit_id: int
    path: tuple[str, ...]
    reason: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    #: the circuit's control-spec PURPOSE, HS_STATE and REND_QUERY (see ClientCircuit), so that
    #: the event of a circuit already gone still says what it was
    purpose: str = "GENERAL"
    hs_state: str | None = None
    rend_query: str | None = None


def _reason_name(reason: int) -> str:
    return EndReason(reason).name if reason in EndReason._value2member_map_ else str(reason)


def _take_failure(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


class ConnectTimeoutError(StreamError):
    """No CONNECTED within our own wait (``stream_timeout``): not an END TIMEOUT from the exit."""

    def __init__(self, message: str = "stream timed out waiting for CONNECTED"):
        super().__init__(message, EndReason.TIMEOUT)


class StreamTransport(asyncio.Transport):
    """The ``asyncio.Transport`` under a client stream's reader/writer pair."""

    def __init__(self, circuit: ClientCircuit, sid: int, host: str, port: int):
        super().__init__()
        self.circuit = circuit
        self.stream_id = sid
        self.protocol: asyncio.StreamReaderProtocol | None = None
        self.connected: asyncio.Future = asyncio.get_running_loop().create_future()
        self._host, self._port = host, port
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._close_callbacks: list = []
        self._reader_buffer: bytearray | None = None  # the StreamReader's buffer, when known
        self._reader_limit = 2**16

    def add_close_callback(self, fn) -> None:
        """Call ``fn(exc)`` once when the stream is gone (exc None for a clean close)."""
        self._close_callbacks.append(fn)

    def _attach_reader(self, reader: asyncio.StreamReader, limit: int) -> None:
        buf = getattr(reader, "_buffer", None)
        self._reader_buffer = buf if isinstance(buf, bytearray) else None
        self._reader_limit = limit

    def _sink_room(self) -> int | None:
        """Bytes the reader takes before it pauses us (StreamReader pauses above 2 x limit)."""
        if self._reader_buffer is None:
            return None
        return max(0, 2 * self._reader_limit - len(self._reader_buffer))

    # what the core asks for
    def _data(self, data: bytes) -> None:
        if self.protocol is not None and not self._lost:
            self.protocol.data_received(data)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
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
        if self._closing or self._lost:
            return
        self.circuit._stream_write(self.stream_id, bytes(data))

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
        self.circuit._stream_eof(self.stream_id)
        asyncio.get_running_loop().call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self._closing = True
        self.circuit._stream_abort(self.stream_id)
        self._connection_lost(None)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.circuit._sink_ready(self.stream_id, False, None)

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.circuit._sink_ready(self.stream_id, True, self._sink_room())

    def is_reading(self) -> bool:
        return not self._reading_paused

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the stream to another protocol (:func:`onionp2p.client.splice.splice`). Only
        a ``StreamReader`` has a buffer whose room the core counts; any other protocol says
        when it is full with ``pause_reading``."""
        self.protocol = protocol
        if not isinstance(protocol, asyncio.StreamReaderProtocol):
            self._reader_buffer = None
            stream = self.circuit.core.streams.get(self.stream_id)
            if stream is not None:
                stream.sink_room = None

    def get_write_buffer_size(self) -> int:
        stream = self.circuit.core.streams.get(self.stream_id)
        return stream.buffered if stream is not None else 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        """Also ``"sink_high_water"``: how many bytes the stream's sink may hold before it
        pauses (twice the reader's limit; under congestion control tor's ``cc_xoff_client``
        cells), which :func:`~onionp2p.client.splice.splice` gives the application's socket."""
        return {"peername": (self._host, self._port), "circuit": self.circuit, "stream_id": self.stream_id,
                "sink_high_water": 2 * self._reader_limit}.get(name, default)


class ClientCircuit:
    """A circuit this client originates. Build it with :meth:`OnionClient.build_circuit`."""

    def __init__(self, client: OnionClient, chan: Channel, path: Sequence[RelayInfo]):
        self.client = client
        self.chan = chan
        self.path = tuple(path)
        self.core = core.ClientCircuit(self.path, cc=client.cc_params(), cgo=client.cgo)
        self.id = next(_circuit_ids)
        self.circ_id = chan.new_circ_id()
        self.hops: list[RelayInfo] = []
        self.state = "launched"
        self.created_at = time.time()
        self.close_reason: str | None = None
        self.isolation: object = None
        #: control-spec's PURPOSE (GENERAL, or an onion-service purpose such as HS_CLIENT_REND),
        #: HS_STATE (HSCR_JOINED ...; None outside onion services) and REND_QUERY (the onion
        #: address without ".onion" an onion-service circuit is for)
        self.purpose = "GENERAL"
        self.hs_state: str | None = None
        self.rend_query: str | None = None
        self._built: asyncio.Future = asyncio.get_running_loop().create_future()
        self._transports: dict[int, StreamTransport] = {}
        self._resolves: dict[int, asyncio.Future] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.log = log.bind(circ=self.id)
        #: onion-service messages (relay commands 32-40) from the hops: ``fn(hop, command,
        #: body)``; None drops them (the onion-service client and service set it)
        self.on_hs_message: Callable[[int, int, bytes], None] | None = None
        #: an onion service's rendezvous circuit: ``fn(stream_id, begin)`` for each BEGIN
        #: from the end-to-end hop (see :meth:`accept_streams`)
        self.on_begin: Callable[[int, Begin], None] | None = None
        self._early: dict[int, list[bytes]] = {}  # served streams not yet accepted: data so far
        chan.circuits[self.circ_id] = self

    # what the circuit manager, control port and metrics read
    bytes_sent = core.from_core("bytes_sent", "DATA payload bytes sent on this circuit")
    bytes_received = core.from_core("bytes_received", "DATA payload bytes received on this circuit")
    crypto = core.from_core("crypto")
    streams = core.from_core("streams", "Open streams' state by stream ID (proto.stream.Stream)")
    violations = core.from_core("violations", "Cells a hop sent that it may not send (dropped)")

    def transport(self, sid: int) -> StreamTransport | None:
        """The application's transport of stream ``sid`` (None once it is gone)."""
        return self._transports.get(sid)

    def _event(self, kind: str, reason: str | None = None) -> None:
        self.client.events(CircuitEvent(kind, self.id, tuple(h.nickname for h in self.hops), reason,
                                       self.bytes_sent, self.bytes_received, self.purpose, self.hs_state,
                                       self.rend_query))

    # -- building -------------------------------------------------------------------------------

    async def _build(self, timeout: float) -> None:
        self._event("launched")
        self._run(self.core.start(self._loop.time(), timeout))
        await self._built

    # -- from the channel ------------------------------------------------------------------------

    def relay_run(self, chan: Channel, data: bytes, start: int, count: int) -> None:
        """``count`` consecutive RELAY/RELAY_EARLY cells of this circuit at ``data[start + i*514:]``."""
        self._run(self.core.receive_relay(data, start, count, self._loop.time()))

    def handle_cell(self, chan: Channel, cell: Cell) -> None:
        self._run(self.core.receive_cell(cell.command, cell.payload, self._loop.time()))

    def channel_closed(self, chan: Channel) -> None:
        self._run(self.core.channel_closed())

    def queue_drained(self, chan: Channel) -> None:
        """The channel wrote out what it had queued for this circuit: streams package again."""
        if self.core.streams and not self.core.closed:
            self._update_room()
            self._run(self.core.pump(self._loop.time()))

    def _update_room(self) -> None:
        """Tell the core how many more cells it may package now: any number while the
        channel writes; while it is blocked, what is left of RELAY_QUEUE_ROOM after the cells
        already queued for this circuit (so a congestion window larger than the channel's
        queue bound never overflows it)."""
        chan = self.chan
        c = self.core
        c.blocked = chan.paused
        c.room = core.RELAY_QUEUE_ROOM - chan.queued_cells(self.circ_id) if chan.paused else core.UNLIMITED_ROOM

    def _on_timer(self) -> None:
        self._timer = None
        self._run(self.core.on_timer(self._loop.time()))

    # -- carrying out the core's actions --------------------------------------------------------

    def _run(self, actions: list) -> None:
        chan = self.chan
        for a in actions:
            t = type(a)
            if t is core.Send:
                if a.command == _RELAY or a.command == _RELAY_EARLY:
                    chan.send_payloads(self.circ_id, a.command, a.payloads)
                    if a.flush:
                        chan.flush()  # the far edge waits for this SENDME
                else:
                    for payload in a.payloads:
                        chan.send_cell(self.circ_id, a.command, payload)
            elif t is core.StreamData:
                transport = self._transports.get(a.stream_id)
                early = self._early.get(a.stream_id)
                if early is not None:  # (optimistic data before we accepted the stream)
                    early.append(a.data)
                elif transport is not None:
                    transport._data(a.data)
                    if transport._reader_buffer is not None and not transport._reading_paused \
                            and not transport._lost:
                        # the reader took it without pausing: tell the core how much more it
                        # takes (it counted this run's bytes against the room it had)
                        self._run(self.core.stream_sink_ready(a.stream_id, True, transport._sink_room(),
                                                              self._loop.time()))
            elif t is core.StreamPause or t is core.StreamResume:
                transport = self._transports.get(a.stream_id)
                if transport is not None and transport.protocol is not None and not transport._lost:
                    if t is core.StreamPause:
                        transport.protocol.pause_writing()
                    else:
                        transport.protocol.resume_writing()
            elif t is core.StreamConnected:
                transport = self._transports.get(a.stream_id)
                if transport is not None and not transport.connected.done():
                    transport.connected.set_result(None)
            elif t is core.ExitBegin:
                if self.on_begin is not None and a.begin is not None:
                    self._early[a.stream_id] = []
                    self.on_begin(a.stream_id, a.begin)
                else:
                    self._run(self.core.stream_refused(a.stream_id, EndReason.DONE))
            elif t is core.StreamClosed:
                self._early.pop(a.stream_id, None)
                transport = self._transports.pop(a.stream_id, None)
                if transport is not None and a.by_peer:
                    self._stream_gone(transport, a.reason, a.was_open)
            elif t is core.ResolveAnswer:
                fut = self._resolves.pop(a.stream_id, None)
                if fut is not None and not fut.done():
                    if a.answer is not None:
                        fut.set_result(a.answer)
                    else:
                        fut.set_exception(StreamError(f"resolve refused: {_reason_name(a.reason)}", a.reason))
            elif t is core.Violation:
                (self.log.warning if a.count == 1 else self.log.debug)(
                    "protocol violation: relay cell dropped", reason=a.reason, from_hop=a.hop,
                    relay_cmd=RelayCommand(a.command).name if a.command in RelayCommand._value2member_map_
                    else str(a.command), stream_id=a.stream_id, violations=a.count)
            elif t is core.HsMessage:
                if self.on_hs_message is not None:
                    self.on_hs_message(a.hop, a.command, a.data)
                else:
                    self.log.debug("onion-service message dropped", from_hop=a.hop, relay_cmd=a.command)
            elif t is core.HopAdded:
                self.hops.append(self.path[a.index])
                self._event("extended")
            elif t is core.Built:
                self.state = "built"
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._event("built")
                if not self._built.done():
                    self._built.set_result(None)
            elif t is core.SetTimer:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self._loop.call_at(a.deadline, self._on_timer)
            elif t is core.Closed:
                self._closed(a)
        if self.core.streams:
            self._update_room()

    def _stream_gone(self, transport: StreamTransport, reason: int, was_open: bool,
                     exc: Exception | None = None) -> None:
        fut = transport.connected
        if not fut.done():
            fut.set_exception(StreamError(f"stream refused: {_reason_name(reason)}", reason))
            fut.exception()
        transport._connection_lost(exc if exc is not None else
                                   (None if was_open else ConnectionResetError(_reason_name(reason))))

    def _closed(self, a: core.Closed) -> None:
        self.state = "failed" if a.failed else "closed"
        self.close_reason = a.reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        chan = self.chan
        chan.circuits.pop(self.circ_id, None)
        chan.drop_queue(self.circ_id)  # first: the DESTROY below must not be dropped with the queue
        if a.destroy and not chan.closed:
            chan.send_cell(self.circ_id, CellCommand.DESTROY, Destroy(DestroyReason.NONE).encode())
        if a.reason == "PROTOCOL":
            self.log.info("protocol violation; closing circuit", error=a.message)
        error = CircuitError(a.message if a.failed else f"circuit closed: {a.message}", a.reason)
        if not self._built.done():
            self._built.set_exception(CircuitError(f"circuit build failed: {a.message}", a.reason))
            self._built.exception()
        for fut in self._resolves.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        self._resolves.clear()
        transports, self._transports = self._transports, {}
        for transport in transports.values():
            self._stream_gone(transport, EndReason.DESTROY, True, ConnectionResetError(str(error)))
        self.client._circuit_gone(self)
        self._event(self.state, a.reason)

    # -- the application's side -------------------------------------------------------------------

    def _stream_write(self, sid: int, data: bytes) -> None:
        if sid in self.core.streams:
            self._run(self.core.stream_write(sid, data, self._loop.time()))

    def _stream_eof(self, sid: int) -> None:
        self._run(self.core.stream_eof(sid, EndReason.MISC, self._loop.time()))
        self._transports.pop(sid, None)

    def _stream_abort(self, sid: int) -> None:
        self._transports.pop(sid, None)
        self._run(self.core.stream_abort(sid))

    def _sink_ready(self, sid: int, ready: bool, room: int | None) -> None:
        self._run(self.core.stream_sink_ready(sid, ready, room, self._loop.time()))

    def add_virtual_hop(self, key_material: bytes, params: HopParams | None = None) -> None:
        """The end-to-end layer of an onion-service circuit past its last relay (see the core)."""
        self._run(self.core.add_virtual_hop(key_material, params))

    def expect_rendezvous(self, complete: Callable[[bytes], bytes]) -> None:
        """Add the end-to-end layer as RENDEZVOUS2 arrives: ``complete(HANDSHAKE_INFO)`` gives
        its key material (see the core's ``expect_rendezvous``)."""
        self.core.expect_rendezvous(complete)

    def send_relay(self, cmd: int, stream_id: int, data: bytes = b"", *, hop: int | None = None) -> None:
        """Originate one relay message as it is (TRUNCATE, DROP ...; tests use it to misbehave)."""
        self._run(self.core.send_relay(cmd, stream_id, data, hop=hop))

    def accept_streams(self, on_begin: Callable[[int, Begin], None]) -> None:
        """Serve streams on this rendezvous circuit, as an onion service: each BEGIN from the
        end-to-end hop calls ``on_begin(stream_id, begin)``, which answers with
        :meth:`stream_accepted` or :meth:`stream_refused` (see the core's ``accept_streams``)."""
        self.on_begin = on_begin
        self.core.accept_streams()

    def stream_accepted(self, sid: int, *, limit: int = 2**16,
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Send CONNECTED for served stream ``sid`` and return its (reader, writer); data the
        client sent before is in the reader. Raises StreamError if the stream is gone."""
        early = self._early.pop(sid, None)
        if early is None or sid not in self.core.streams or self.core.closed:
            raise StreamError("the stream was closed before it was accepted", EndReason.DONE)
        reader, protocol, transport = self._attach(sid, "", 0, limit)
        transport.connected.set_result(None)
        for chunk in early:
            transport._data(chunk)
        self._run(self.core.stream_accepted(sid, self._loop.time()))
        return reader, asyncio.StreamWriter(transport, protocol, reader, self._loop)

    def stream_refused(self, sid: int, reason: int) -> None:
        """END(``reason``) for served stream ``sid`` (its target cannot be reached)."""
        self._early.pop(sid, None)
        self._run(self.core.stream_refused(sid, reason))

    def _attach(self, sid: int, host: str, port: int, limit: int,
                ) -> tuple[asyncio.StreamReader, LeanStreamReaderProtocol, StreamTransport]:
        """The application's reader, protocol and transport for stream ``sid`` of the core."""
        loop = self._loop
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = LeanStreamReaderProtocol(reader, loop=loop)
        transport = StreamTransport(self, sid, host, port)
        transport.protocol = protocol
        transport._attach_reader(reader, limit)
        self.core.streams[sid].sink_room = transport._sink_room()
        self._transports[sid] = transport
        protocol.connection_made(transport)
        return reader, protocol, transport

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
        loop = self._loop
        self.chan.note_usage(Usage.USER_TRAFFIC)
        sid, actions = self.core.open_stream(int(command), body)
        cc = self.core.streams[sid].layer.cc
        if cc is not None:
            # The reader pausing sends XOFF, which stops the exit until our XON has crossed
            # the circuit: let it hold tor's cc_xoff_client (500 cells) before it pauses
            # (a StreamReader pauses above 2 x limit and resumes at limit).
            limit = max(limit, cc.p.xoff_bytes(exit_side=False) // 2)
        reader, protocol, transport = self._attach(sid, host, port, limit)
        self._run(actions)
        try:
            async with asyncio.timeout(timeout):
                await transport.connected
        except asyncio.TimeoutError:
            transport.abort()
            raise ConnectTimeoutError() from None
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer

    async def resolve(self, hostname: str, *, timeout: float = 30.0) -> Resolved:
        """RELAY_RESOLVE at the exit; returns the RESOLVED answers (StreamError if refused)."""
        if self.state != "built":
            raise CircuitError("circuit is not open", self.close_reason or "NONE")
        sid, actions = self.core.resolve(hostname)
        fut = self._loop.create_future()
        self._resolves[sid] = fut
        self._run(actions)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if self._resolves.pop(sid, None) is not None:
                self.core.resolve_abandoned(sid)

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the circuit (clients send reason NONE) and end its streams."""
        self._run(self.core.destroy("REQUESTED", "closed by us"))

    def _fail(self, message: str, reason: str) -> None:
        self._run(self.core.destroy(reason, message))


class OnionClient:
    """Builds circuits through given relays and keeps one channel per first hop."""

    def __init__(self, *, max_queue_cells: int = MAX_QUEUE_CELLS, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 congestion_control: bool = True, cgo: bool = True, connection_padding: str = "auto",
                 reduced_connection_padding: bool = False):
        self.circuits: dict[int, ClientCircuit] = {}
        #: channel padding (padding-spec §2): tor's ConnectionPadding (auto/0/1) and
        #: ReducedConnectionPadding
        self.connection_padding = connection_padding
        self.reduced_connection_padding = reduced_connection_padding
        self._pad_source: object = None
        self._pad_params = PaddingParams()
        self._peer_pads: dict[bytes, bool] = {}  # relay identity -> it advertises Padding=2
        #: ask exits for congestion control (proposal 324) where they offer it
        self.congestion_control = congestion_control
        #: ask every hop that offers it for CGO relay crypto (proposal 359)
        self.cgo = cgo
        #: the current consensus's network parameters (``cc_*`` ...); the node sets it
        self.consensus_params: Callable[[], Mapping[str, int]] = dict
        self._cc_source: object = None
        self._cc = CCParams()
        self.chanmgr = ChannelManager(self, handshake_timeout=handshake_timeout, max_queue_cells=max_queue_cells)
        #: circuit events: ``fn(CircuitEvent)`` (launched, extended, built, failed, closed)
        self.events = Listeners("circuit event")
        #: channel events: ``fn(kind, chan)`` with kind "connected" or "closed"
        self.channel_events = Listeners("channel")
        #: connection progress for bootstrap reporting: ``fn(step)`` with "connecting" (a new
        #: channel to a first hop is being opened) and "connected", "handshaking" (its TCP and
        #: TLS are up, the link handshake starts); the link handshake's end is channel_events'
        self.progress = Listeners("connection progress")
        self._open: set[Channel] = set()
        self.closed_bytes_read = 0
        self.closed_bytes_written = 0
        #: monotonic time bytes last arrived on any OR channel (0: never)
        self.last_read = 0.0

    def cc_params(self) -> CCParams | None:
        """Congestion-control parameters for a circuit built now (None: fixed windows)."""
        if not self.congestion_control:
            return None
        params = self.consensus_params()
        if params != self._cc_source:
            self._cc_source, self._cc = params, CCParams.from_consensus(params)
        return self._cc

    def padding_params(self) -> PaddingParams:
        """Channel padding parameters of the current consensus (nf_ito_low, ...)."""
        params = self.consensus_params()
        if params != self._pad_source:
            self._pad_source, self._pad_params = params, PaddingParams.from_consensus(params)
        return self._pad_params

    @property
    def channels(self) -> dict[bytes, Channel]:
        """Open channels that take new circuits, by the relay identity they proved."""
        return self.chanmgr.by_identity

    async def channel_to(self, relay: RelayInfo) -> Channel:
        """The channel to ``relay`` (opened once, reused while it takes circuits)."""
        if self.progress and relay.rsa_id not in self.channels:
            self.progress("connecting")
        self._peer_pads[relay.rsa_id] = relay.supports("Padding", 2)
        return await self.chanmgr.get(relay.address, relay.or_port, relay.rsa_id, relay.ed_id)

    async def build_circuit(self, path: Sequence[RelayInfo], *, timeout: float = 60.0) -> ClientCircuit:
        """Build a circuit through ``path`` (first hop first). Raises CircuitError."""
        circ, building = await self.launch_circuit(path, timeout=timeout)
        await building
        return circ

    async def launch_circuit(self, path: Sequence[RelayInfo], *, timeout: float = 60.0,
                             purpose: str = "GENERAL", hs_state: str | None = None,
                             rend_query: str | None = None,
                             ) -> tuple[ClientCircuit, asyncio.Task]:
        """Connect to the first hop and start building; return the circuit and the build task
        (which raises CircuitError if the build fails; nobody has to await it) without
        waiting for the build.
        ``purpose``, ``hs_state``, ``rend_query``: what the control port shows from the first
        CIRC event on (see :class:`ClientCircuit`)."""
        if not path:
            raise LocalProtocolError("empty path")
        try:
            chan = await asyncio.wait_for(self.channel_to(path[0]), timeout)
        except (OSError, OnionError, asyncio.TimeoutError) as exc:
            raise CircuitError(f"cannot connect to first hop: {exc or 'timeout'}", "CONNECTFAILED") from None
        circ = ClientCircuit(self, chan, path)
        circ.purpose, circ.hs_state, circ.rend_query = purpose, hs_state, rend_query
        self.circuits[circ.id] = circ
        if len(path) > 1:  # a one-hop (directory) circuit does not make the channel worth padding
            chan.note_usage(Usage.FULL_CIRCS)
        task = asyncio.get_running_loop().create_task(circ._build(timeout))
        # a caller that awaits the task gets its failure; one that gives the circuit up
        # (closes it, stops) does not, and asyncio's "never retrieved" log record would keep
        # the task's frames and the circuit alive: the failure is always taken here
        task.add_done_callback(_take_failure)
        return circ, task

    def _circuit_gone(self, circ: ClientCircuit) -> None:
        self.circuits.pop(circ.id, None)
        self.chanmgr.circuit_gone(circ.chan)

    def retire_channel(self, chan: Channel) -> None:
        """No new circuits on ``chan`` (its peer stopped answering, like tor's
        ``is_bad_for_new_circs``): the next circuit to that relay opens a new channel, and
        ``chan`` is closed as soon as its last circuit is gone."""
        self.chanmgr.retire(chan)

    async def close(self) -> None:
        for circ in list(self.circuits.values()):
            circ.close()
        await self.chanmgr.close("client closing")
        for chan in list(self._open):
            chan.close("client closing")
        await asyncio.sleep(0)

    # ChannelOwner
    def unknown_cell(self, chan: Channel, cell: Cell) -> None:
        pass  # cells for circuits we no longer know are dropped

    def channel_open(self, chan: Channel) -> None:
        self._open.add(chan)
        peer_id = chan.peer.rsa_id if chan.peer is not None else b""
        supports = self._peer_pads.get(peer_id, False) and chan.link_version >= MIN_LINK_VERSION
        state, negotiate = client_padding(self.padding_params(), peer_supports=supports,
                                          connection_padding=self.connection_padding,
                                          reduced=self.reduced_connection_padding)
        chan.start_padding(state, negotiate=negotiate, params=self.padding_params)
        self.channel_events("connected", chan)

    def channel_closed(self, chan: Channel) -> None:
        self.closed_bytes_read += chan.bytes_in
        self.closed_bytes_written += chan.bytes_out
        self._open.discard(chan)
        self.chanmgr.forget(chan)
        self.channel_events("closed", chan)

    def traffic(self) -> tuple[int, int]:
        """Bytes (read, written) on all OR channels since start."""
        live = list(self._open)
        return (self.closed_bytes_read + sum(c.bytes_in for c in live),
                self.closed_bytes_written + sum(c.bytes_out for c in live))

    def queue_overflow(self, chan: Channel, circ_id: int) -> None:
        circ = chan.circuits.get(circ_id)
        if circ is not None:
            circ._fail("outgoing queue over its bound", "RESOURCELIMIT")

    def account_read(self, chan: Channel, nbytes: int) -> None:
        # clients have no bandwidth limit; only note that the network is live (the circuit
        # build timeout does not count timeouts while nothing arrives, circuit_build_times_network_is_live)
        self.last_read = time.monotonic()

    def channel_connected(self, chan: Channel) -> bool:
        if self.progress:
            self.progress("connected")
            self.progress("handshaking")
        return True
