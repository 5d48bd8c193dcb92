"""Circuit cores: the circuit protocol without I/O (tor-spec §5–§7; specs/circuits.md, streams.md).

Theory of operation
-------------------
A circuit core is the whole protocol state of one circuit at one node, in the style of
h11 and aioquic: the asyncio shell hands it what arrived — a *run* of RELAY/RELAY_EARLY
cells straight from a socket read (one cell is a run of one), another cell, a call from
the application or the destination socket, a timer that fired — together with the
current time, and gets back a list of *actions* to carry out, in order: cells to send,
bytes for a stream, an extend to launch, a timer to set, a DESTROY. The core never
touches sockets, tasks, futures or the clock. There is one data path: the run.

Two cores share one :class:`Edge`:

* :class:`ClientCircuit` — a circuit this node originates. It builds itself (CREATE2,
  then EXTEND2 hop by hop, with the ntor handshakes), removes the layers of incoming runs
  with one AES-CTR call per hop per run, and keeps a :class:`Layer` per hop: that hop's
  circuit windows. A hop speaks only for itself (tor's ``relay_lookup_conn`` /
  ``edge_uses_cpath``): stream cells count only from the hop the stream was opened to,
  EXTENDED2 only from the last hop while an extend is pending, a circuit SENDME credits
  the window of the hop that sent it. Anything else is dropped and reported
  (:class:`Violation`); it never reaches a stream. The first 8 cells past the first hop
  (and every EXTEND2) go as RELAY_EARLY.
* :class:`RelayCircuit` — a circuit at a relay: one layer of crypto between a *previous*
  side (toward the client) and a *next* side (a further relay, or nothing at the last
  hop). Forward, cells are decrypted and either recognized here (EXTEND2, TRUNCATE,
  SENDME, stream commands at the last hop) or passed on unchanged in command; backward,
  our layer is added. At the last hop the circuit is also an exit edge: its streams are
  the exit's streams.

:class:`Edge` holds the stream rules of both edges, once: a DATA cell counts against its
layer's and its stream's deliver windows, goes to the stream's sink and may make a stream
or circuit SENDME due; a SENDME credits a package window and lets streams package more;
bytes from a stream's source are cut into DATA cells while both windows (and the room
left in the channel queue) allow. A layer with congestion control (proposal 324,
:mod:`onionp2p.proto.congestion`, negotiated in the hop's ntor-v3 handshake) has a Vegas
window instead of the fixed one and SENDMEs every ``sendme_inc`` cells, which give RTT
samples (hence ``now`` in every call); its streams have no windows but XON/XOFF, sent
when the local sink stops and starts taking data. Violations raise
:class:`~onionp2p.errors.ProtocolError` inside, which close the circuit with PROTOCOL.

Actions are small slotted objects (:class:`Send`, :class:`ToPrev`, :class:`ToNext`,
:class:`StreamData`, ...). Consecutive cells of one command are gathered into one action,
so a run of relayed cells costs one action, and data for one stream within one run is
delivered once.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Callable, Sequence

from onionp2p.errors import DigestMismatch, LocalProtocolError, ProtocolError
from onionp2p.proto.cells import CellCommand, Create2, Created2, Destroy, DestroyReason
from onionp2p.proto.congestion import CCParams, Vegas
from onionp2p.proto.create import HopHandshake, HopParams, wants_cc, wants_cgo
from onionp2p.proto.flowctl import CIRCWINDOW_START, DeliverWindow, DrainRate, PackageWindow
from onionp2p.proto.relaycell import (
    RELAY_DATA_MAX,
    HS_COMMANDS,
    RELAY_HEADER_LEN,
    STREAM_COMMANDS,
    V1_DATA_MAX,
    V1_DATA_OFFSET,
    Begin,
    Connected,
    End,
    EndReason,
    Extend2,
    Extended2,
    LinkSpec,
    LinkSpecType,
    RelayCommand,
    Resolve,
    Resolved,
    Sendme,
    Truncated,
    Xoff,
    Xon,
    pack_relay,
    pack_relay_v1,
    parse_v1_header,
)
from onionp2p.proto.hopcrypto import CgoRelayCrypto, MixedClientCrypto
from onionp2p.proto.relaycrypto import HS_E2E, TOR1, ClientCrypto, RelayCrypto
from onionp2p.proto.stream import NO_WINDOW, SOURCE_HIGH_WATER, SOURCE_LOW_WATER, Stream, StreamState

__all__ = [
    # the cores and what they share
    "ClientCircuit", "RelayCircuit", "Edge", "Layer", "from_core", "extend_target_allowed",
    "MAX_RELAY_EARLY", "EXTEND_TIMEOUT", "RELAY_QUEUE_ROOM",
    # actions: cells, timers, reports
    "Send", "ToPrev", "ToNext", "SetTimer", "Violation",
    # actions at the client
    "HopAdded", "Built", "Closed", "StreamConnected", "ResolveAnswer",
    # actions at both edges
    "StreamData", "StreamClosed", "StreamPause", "StreamResume",
    # actions at a relay
    "Extend", "CancelExtend", "DetachNext", "Destroyed", "ExitBegin", "ExitResolve",
    # onion services: at a relay (intro/rendezvous point), at a client or service
    "HsRequest", "ToSplice", "HsMessage",
]

#: RELAY_EARLY cells per circuit (tor's MAX_RELAY_EARLY_CELLS_PER_CIRCUIT).
MAX_RELAY_EARLY = 8
#: Seconds a relay gives an extend (channel and CREATED2) before it destroys the circuit.
EXTEND_TIMEOUT = 30.0
#: Cells an exit may have queued toward the client before its streams stop packaging.
RELAY_QUEUE_ROOM = 64

_CELL = 514
_BODY = 509
_HDR = struct.Struct(">BHH4sH")  # relay header: command, recognized, stream, digest, length
_RELAY = int(CellCommand.RELAY)
_RELAY_EARLY = int(CellCommand.RELAY_EARLY)
_DATA = int(RelayCommand.DATA)
_SENDME = int(RelayCommand.SENDME)
_END = int(RelayCommand.END)
_BEGIN = int(RelayCommand.BEGIN)
_EXTEND2 = int(RelayCommand.EXTEND2)
_XOFF = int(RelayCommand.XOFF)
_XON = int(RelayCommand.XON)
#: "as many cells as you like": the room of an edge whose channel is writing
UNLIMITED_ROOM = 1 << 30
#: the onion-service requests a relay serves (tor's rend_process_relay_cell for OR circuits)
_HS_AT_RELAY = frozenset({RelayCommand.ESTABLISH_INTRO, RelayCommand.ESTABLISH_RENDEZVOUS,
                          RelayCommand.INTRODUCE1, RelayCommand.RENDEZVOUS1})
_FULL_DATA = _HDR.pack(_DATA, 0, 0, b"\0\0\0\0", RELAY_DATA_MAX)[:3]  # command + recognized


# -- actions -------------------------------------------------------------------------------------

class Action:
    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r:.60}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Send(Action):
    """Client: send these cells (``command``: RELAY, RELAY_EARLY, CREATE2, DESTROY) on the
    circuit's channel, one per payload; ``flush``: do not wait for the end of the turn
    (a SENDME others wait on)."""
    __slots__ = ("command", "payloads", "flush")

    def __init__(self, command: int, payloads: list, flush: bool = False):
        self.command, self.payloads, self.flush = command, payloads, flush


class ToPrev(Action):
    """Relay: send these cells toward the client."""
    __slots__ = ("command", "payloads")

    def __init__(self, command: int, payloads: list):
        self.command, self.payloads = command, payloads


class ToNext(Action):
    """Relay: send these cells away from the client, on the next hop's channel."""
    __slots__ = ("command", "payloads")

    def __init__(self, command: int, payloads: list):
        self.command, self.payloads = command, payloads


class SetTimer(Action):
    """Call the core's ``on_timer(now)`` at ``deadline`` (the clock the shell passes in)."""
    __slots__ = ("deadline",)

    def __init__(self, deadline: float):
        self.deadline = deadline


class Violation(Action):
    """A hop sent something it may not (dropped, not acted on): log it. ``count`` is the
    number of violations on this circuit so far."""
    __slots__ = ("reason", "hop", "command", "stream_id", "count")

    def __init__(self, reason: str, hop: int, command: int, stream_id: int, count: int):
        self.reason, self.hop, self.command, self.stream_id, self.count = reason, hop, command, stream_id, count


class HopAdded(Action):
    """Client: hop ``index`` answered; its layer is in place."""
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class Built(Action):
    """Client: every hop is in place; streams may be opened."""
    __slots__ = ()


class Closed(Action):
    """Client: the circuit is gone. ``reason`` is a DestroyReason name (or text);
    ``destroy``: send DESTROY (reason NONE, as clients do) on the channel; ``failed``:
    it never got built. Every stream of it is gone too (no StreamClosed follows)."""
    __slots__ = ("reason", "message", "destroy", "failed")

    def __init__(self, reason: str, message: str, destroy: bool, failed: bool):
        self.reason, self.message, self.destroy, self.failed = reason, message, destroy, failed


class StreamConnected(Action):
    """Client: CONNECTED arrived for the stream (from its hop)."""
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int):
        self.stream_id = stream_id


class StreamData(Action):
    """Bytes for the stream's sink (the application; at an exit, the destination)."""
    __slots__ = ("stream_id", "data")

    def __init__(self, stream_id: int, data: bytes):
        self.stream_id, self.data = stream_id, data


class StreamClosed(Action):
    """The stream is gone. ``by_peer``: the far edge ended it with END(``reason``);
    otherwise we did (END sent after the source's EOF and the last byte, a refusal, an
    abort). ``was_open``: it had been connected. ``abort``: nothing more will be carried
    for it (TRUNCATE): drop the local socket at once rather than flushing it."""
    __slots__ = ("stream_id", "reason", "by_peer", "was_open", "abort")

    def __init__(self, stream_id: int, reason: int, by_peer: bool, was_open: bool, abort: bool = False):
        self.stream_id, self.reason, self.by_peer, self.was_open = stream_id, reason, by_peer, was_open
        self.abort = abort


class StreamPause(Action):
    """Stop reading the stream's source: enough of it is buffered."""
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int):
        self.stream_id = stream_id


class StreamResume(Action):
    """Read the stream's source again."""
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int):
        self.stream_id = stream_id


class ResolveAnswer(Action):
    """Client: the answer to a RESOLVE (``answer`` a Resolved), or its refusal
    (``answer`` None, ``reason`` the END reason)."""
    __slots__ = ("stream_id", "answer", "reason")

    def __init__(self, stream_id: int, answer: Resolved | None, reason: int = 0):
        self.stream_id, self.answer, self.reason = stream_id, answer, reason


class Extend(Action):
    """Relay: open (or reuse) a channel to this relay, then send ``create2`` (a CREATE2
    payload) on a new circuit ID there and tell the core ``extend_attached`` — or
    ``extend_failed`` if that cannot be done."""
    __slots__ = ("host", "port", "rsa_id", "ed_id", "create2")

    def __init__(self, host: str, port: int, rsa_id: bytes, ed_id: bytes | None, create2: bytes):
        self.host, self.port, self.rsa_id, self.ed_id, self.create2 = host, port, rsa_id, ed_id, create2


class CancelExtend(Action):
    """Relay: give up the extend under way (TRUNCATE, DESTROY)."""
    __slots__ = ()


class DetachNext(Action):
    """Relay: forget the next hop; drop the cells queued for it; with ``reason``, send it
    DESTROY(reason) (after dropping the queue, so the DESTROY is not dropped with it)."""
    __slots__ = ("reason",)

    def __init__(self, reason: int | None):
        self.reason = reason


class Destroyed(Action):
    """Relay: the circuit is gone (the next hop was detached just before). Forget it on
    the previous channel, drop its queue there and, with ``destroy`` set, send
    DESTROY(destroy) toward the client; close every exit socket at once. ``reason`` is why
    (for counters), ``message`` what to log."""
    __slots__ = ("reason", "destroy", "message")

    def __init__(self, reason: int, destroy: int | None, message: str = ""):
        self.reason, self.destroy, self.message = reason, destroy, message


class ExitBegin(Action):
    """Relay (last hop): the client asks for a stream: BEGIN (``begin`` parsed) or
    BEGIN_DIR (``begin`` None). Answer with ``exit_connected`` or ``exit_refused``.
    At an onion service (a client circuit that :meth:`ClientCircuit.accept_streams`), a
    BEGIN from the end-to-end hop; answer with ``stream_accepted`` or ``stream_refused``."""
    __slots__ = ("stream_id", "begin")

    def __init__(self, stream_id: int, begin: Begin | None):
        self.stream_id, self.begin = stream_id, begin


class HsRequest(Action):
    """At a relay's last hop: an onion-service request (ESTABLISH_INTRO, ESTABLISH_RENDEZVOUS,
    INTRODUCE1, RENDEZVOUS1) for the relay's introduction / rendezvous point roles."""
    __slots__ = ("command", "data")

    def __init__(self, command: int, data: bytes):
        self.command, self.data = command, data


class ToSplice(Action):
    """At a rendezvous point: forward cells of a spliced circuit that are not ours, our
    layer removed, for the circuit it is joined to (which adds its own layer toward its
    origin: :meth:`RelayCircuit.receive_spliced`)."""
    __slots__ = ("payloads",)

    def __init__(self, payloads: list):
        self.payloads = payloads


class HsMessage(Action):
    """At a client or service: an onion-service message (commands 32-40) from hop ``hop``."""
    __slots__ = ("hop", "command", "data")

    def __init__(self, hop: int, command: int, data: bytes):
        self.hop, self.command, self.data = hop, command, data


class ExitResolve(Action):
    """Relay (last hop): RESOLVE ``hostname``; answer with ``exit_resolved`` or ``exit_refused``."""
    __slots__ = ("stream_id", "hostname")

    def __init__(self, stream_id: int, hostname: str):
        self.stream_id, self.hostname = stream_id, hostname


# -- the edge: streams and windows, once for both sides --------------------------------------------

class Layer:
    """The circuit windows between this edge and one other: a hop's, at the client (tor's
    cpath layer); the circuit's own at a relay's exit edge. ``handshake`` says how its keys
    were agreed ("ntor", "ntor-v3"), ``relay_crypto`` how its cells are protected ("tor1").
    With congestion control negotiated (:meth:`enable_cc`)
    ``cc`` is the Vegas state that replaces the fixed package window (``package`` is then
    the same object), and SENDMEs go every ``sendme_inc`` cells instead of 100."""

    __slots__ = ("index", "package", "deliver", "handshake", "relay_crypto", "cc", "v1", "data_max",
                 "data_off", "kh")

    def __init__(self, index: int, handshake: str = "ntor"):
        self.index = index
        self.handshake = handshake
        self.relay_crypto = "tor1"
        self.package: PackageWindow | Vegas = PackageWindow.circuit()
        self.deliver = DeliverWindow.circuit()
        self.cc: Vegas | None = None
        #: relay message format v1 (with CGO): DATA carries 488 bytes at offset 21, not 498 at 11
        self.v1 = False
        self.data_max = RELAY_DATA_MAX
        self.data_off = RELAY_HEADER_LEN
        #: the hop's KH (tor's rend_circ_nonce; see proto.create.HopParams), b"" if unknown
        self.kh = b""

    def set_relay_crypto(self, name: str) -> None:
        """The hop's relay crypto ("tor1" | "cgo"; CGO brings message format v1)."""
        self.relay_crypto = name
        self.v1 = name == "cgo"
        self.data_max = V1_DATA_MAX if self.v1 else RELAY_DATA_MAX
        self.data_off = V1_DATA_OFFSET if self.v1 else RELAY_HEADER_LEN

    def pack(self, cmd: int, sid: int, data: bytes = b"") -> bytearray:
        """A relay cell body in this hop's message format."""
        return pack_relay_v1(cmd, sid, data) if self.v1 else pack_relay(cmd, sid, data)

    def enable_cc(self, params: CCParams, sendme_inc: int) -> None:
        """Congestion control was negotiated for this layer (before any cell was sent)."""
        self.cc = Vegas(params, sendme_inc)
        self.package = self.cc
        self.deliver = DeliverWindow(CIRCWINDOW_START, sendme_inc)


def from_core(name: str, doc: str | None = None) -> property:
    """For the asyncio shells: a read-only attribute that is their core's ``name``."""
    return property(lambda self: getattr(self.core, name), doc=doc)


def _name(enum, value: int) -> str:
    return enum(value).name if value in enum._value2member_map_ else str(value)


class Edge:
    """The stream and flow-control rules of an edge of a circuit (see the module docstring).

    Subclasses provide how a cell is originated toward the other edge (``_originate``,
    ``_originate_data``), how many DATA cells may be packaged now (``_budget``) and what
    happens to a stream cell nobody may claim (``_no_stream``).
    """

    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}
        self.closed = False
        self.bytes_sent = 0  # DATA payload bytes originated / received on this circuit
        self.bytes_received = 0
        self._out: list = []
        self._deliveries: dict[int, list] = {}  # stream -> data received in this run, not yet given
        #: the time of the latest call that brought one (congestion control measures RTTs by it)
        self.now = 0.0
        #: cells the shell takes toward the other edge right now (its channel's room); streams
        #: package at most that many. The shell keeps it current and calls :meth:`pump` when
        #: it grows; ``blocked``: the channel is not writing (a congestion signal)
        self.room = UNLIMITED_ROOM
        self.blocked = False
        #: when a stream paced by an XON's advisory rate may package again (SetTimer asked)
        self._wake_at: float | None = None

    def _take(self) -> list:
        out, self._out = self._out, []
        return out

    # -- inbound: one rule for DATA and SENDME ------------------------------------------------------

    def _on_data(self, layer: Layer, sid: int, body, length: int, digest: bytes) -> None:
        """A DATA cell that ``layer``'s hop originated, for stream ``sid``."""
        off = layer.data_off
        self._on_data_run(layer, sid, bytes(body[off:off + length]), digest, (length,))

    def _on_data_run(self, layer: Layer, sid: int, data: bytes, tags: bytes, lengths) -> None:
        """Consecutive DATA cells that ``layer``'s hop originated, for stream ``sid``: their
        data concatenated, their digests or tags (concatenated, one size) and ``lengths``.

        As cell by cell, taken in chunks: each ends at the cell after which a window's
        SENDME is due (a circuit SENDME echoes that cell's digest) or before the cell that
        would overrun a window (ProtocolError, with the cells before it delivered)."""
        n = len(lengths)
        stream = self.streams.get(sid)
        circuit = layer.deliver
        step = len(tags) // n
        if stream is None or stream.layer is not layer:
            for i in range(n):
                due = circuit.on_data_received()  # raises ProtocolError below zero
                self._no_stream(layer, _DATA, sid)
                if due:
                    self._circuit_sendmes(layer, tags[i * step:(i + 1) * step])
                if self.closed:
                    return
            return
        deliver = stream.deliver
        i = pos = 0
        while i < n and not self.closed:
            k = min(n - i, circuit.run_room(), deliver.run_room())
            if k == 0:  # a window is empty: the next cell overruns it (ProtocolError)
                circuit.on_data_received()
                deliver.on_data_received()
            circuit.take(k)
            deliver.take(k)
            size = lengths[i] if k == 1 else sum(lengths[i:i + k])
            if size:
                chunk = data if size == len(data) else data[pos:pos + size]
                pos += size
                stream.bytes_received += size
                self.bytes_received += size
                pending = self._deliveries.get(sid)
                if pending is None:
                    self._deliveries[sid] = [chunk]
                else:
                    pending.append(chunk)
                room = stream.sink_room
                if room is not None:
                    stream.sink_room = room - size
                    if room - size <= 0:
                        stream.sink_ready = False
            i += k
            if stream.sink_ready and deliver.sendme_due():
                self._stream_sendmes(stream)
            if circuit.sendme_due():
                self._circuit_sendmes(layer, tags[(i - 1) * step:i * step])

    def _stream_sendmes(self, stream: Stream) -> None:
        deliver = stream.deliver
        while stream.sink_ready and deliver.sendme_due() and not self.closed:
            deliver.on_sendme_sent()
            self._originate(stream.layer, _SENDME, stream.id, b"")

    def _circuit_sendmes(self, layer: Layer, digest: bytes) -> None:
        deliver = layer.deliver
        while deliver.sendme_due() and not self.closed:
            deliver.on_sendme_sent()
            self._originate(layer, _SENDME, 0, Sendme(1, digest).encode())

    def _on_sendme(self, layer: Layer, sid: int, data: bytes) -> None:
        if sid == 0:  # circuit level, authenticated (v1): echoes a digest of ours
            msg = Sendme.parse(data)
            if layer.cc is not None:
                layer.cc.blocked = self.blocked
            layer.package.on_sendme(msg.digest if msg.version == 1 else None, self.now)
            for stream in list(self.streams.values()):
                if stream.layer is layer and stream.buf:
                    self._pump(stream)
            return
        stream = self.streams.get(sid)
        if stream is None or stream.layer is not layer:
            self._no_stream(layer, _SENDME, sid)
            return
        if stream.xon:  # tor: "Congestion control got stream sendme"
            raise ProtocolError("stream SENDME on a stream under congestion control")
        stream.package.on_sendme()
        self._pump(stream)

    def _on_flow(self, layer: Layer, cmd: int, sid: int, data: bytes) -> None:
        """XOFF or XON from ``layer``'s edge for stream ``sid`` (proposal 324)."""
        stream = self.streams.get(sid)
        if stream is None or stream.layer is not layer:
            self._no_stream(layer, cmd, sid)
            return
        if not stream.xon:
            self._misbehaved("XON/XOFF on a stream without congestion control", layer, cmd, sid)
            return
        if cmd == _XOFF:
            if stream.xoff_received:
                self._misbehaved("XOFF on a stream already told to stop", layer, cmd, sid)
                return
            stream.xoff_received = True
            stream.package.window = 0
            return
        try:
            rate = Xon.parse(data).kbps_ewma
        except ProtocolError:
            self._misbehaved("malformed XON", layer, cmd, sid)
            return
        # the advisory rate paces this stream's packaging, as tor's XON sets the edge's
        # token bucket (kilobytes of 1000 bytes per second; 0: no limit); burst: one second
        if rate and not stream.xon_rate:
            stream.tokens, stream.tokens_at = float(max(rate * 1000, RELAY_DATA_MAX)), self.now
        stream.xon_rate = rate
        if stream.xoff_received:
            stream.xoff_received = False
            stream.package.window = NO_WINDOW
        self._pump(stream)

    def _flush_deliveries(self, only: int | None = None) -> None:
        """Hand over the data gathered for streams in this run (one action per stream)."""
        deliveries = self._deliveries
        if only is not None:
            chunks = deliveries.pop(only, None)
            if chunks:
                self._out.append(StreamData(only, chunks[0] if len(chunks) == 1 else b"".join(chunks)))
            return
        if deliveries:
            self._deliveries = {}
            out = self._out
            streams = self.streams
            for sid, chunks in deliveries.items():
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                out.append(StreamData(sid, data))
                stream = streams.get(sid)
                drain = stream.drain if stream is not None else None
                if drain is not None and not stream.xoff_sent and not self.closed:
                    rate = drain.sink_took(len(data), self.now)  # tor: an advisory XON
                    if rate is not None:
                        self._originate(stream.layer, _XON, sid, Xon(rate).encode())

    # -- outbound: packaging -------------------------------------------------------------------------

    def stream_write(self, sid: int, data: bytes, now: float | None = None) -> list:
        """Bytes from the stream's source: package what the windows allow, buffer the rest
        (asking to pause the source above the high-water mark). ``now``, here and below:
        the time (the latest one given when None)."""
        if now is not None:
            self.now = now
        stream = self.streams.get(sid)
        if stream is None or stream.end_reason is not None:
            raise LocalProtocolError("write on a closed stream")
        stream.buf += data
        self._pump(stream)
        if not stream.source_paused and len(stream.buf) > SOURCE_HIGH_WATER:
            stream.source_paused = True
            self._out.append(StreamPause(sid))
        return self._take()

    def stream_eof(self, sid: int, reason: int, now: float | None = None) -> list:
        """The stream's source ended: END(reason) goes once every buffered byte is sent."""
        if now is not None:
            self.now = now
        stream = self.streams.get(sid)
        if stream is not None and stream.end_reason is None:
            stream.end_reason = reason
            self._pump(stream)
        return self._take()

    def stream_sink_ready(self, sid: int, ready: bool, room: int | None = None,
                          now: float | None = None) -> list:
        """The stream's sink takes data again (``ready``) or not; ``room``: bytes it takes
        before it will stop (stream SENDMEs are withheld past that). Under congestion
        control the sink stopping sends XOFF, and taking data again XON."""
        if now is not None:
            self.now = now
        stream = self.streams.get(sid)
        if stream is not None:
            stream.sink_ready = ready
            stream.sink_room = room
            if stream.xon:
                if not self.closed and ready == stream.xoff_sent:
                    stream.xoff_sent = not ready
                    drain = stream.drain
                    if ready:  # the advisory rate: the sink's drain rate (flowctl.DrainRate)
                        rate = drain.sink_drained(stream.bytes_received, self.now, room) if drain else 0
                        self._originate(stream.layer, _XON, sid, Xon(rate).encode())
                    else:
                        p = stream.layer.cc.p
                        drain = stream.drain = drain or DrainRate.from_params(p)
                        limit = p.xoff_bytes(exit_side=isinstance(self, RelayCircuit))
                        drain.sink_full(stream.bytes_received, limit, self.now)
                        self._originate(stream.layer, _XOFF, sid, Xoff().encode())
            elif ready:
                self._stream_sendmes(stream)
        return self._take()

    def pump(self, now: float | None = None) -> list:
        """The channel toward the other edge drained (``room`` grew): streams package again."""
        if now is not None:
            self.now = now
        for stream in list(self.streams.values()):
            if stream.buf and self.room > 0 and not self.closed:
                self._pump(stream)
        return self._take()

    def _pump(self, stream: Stream) -> None:
        """Package the stream's buffered bytes into DATA cells while the windows allow."""
        if stream.state is not StreamState.OPEN:
            return
        buf = stream.buf
        package = stream.package
        layer = stream.layer
        dmax = layer.data_max
        while buf and package.window > 0:
            budget = self._budget(layer)
            if budget <= 0:
                break
            k = min(package.window, budget, (len(buf) + dmax - 1) // dmax)
            if stream.xon_rate:  # paced by the other edge's advisory rate
                allowed = self._rate_allowance(stream)
                first = min(len(buf), dmax)
                if allowed < first:
                    self._wake(self.now + (first - allowed) / (stream.xon_rate * 1000))
                    break
                k = min(k, max(1, int(allowed // dmax)))
            take = min(len(buf), k * dmax)
            if stream.xon_rate:
                stream.tokens -= take
            blob = bytes(buf[:take])
            del buf[:take]
            chunks = [blob[i:i + dmax] for i in range(0, take, dmax)]
            package.window -= len(chunks)
            stream.bytes_sent += take
            self.bytes_sent += take
            self._originate_data(layer, stream.id, chunks)
            if self.closed:
                return
        if stream.source_paused and len(buf) < SOURCE_LOW_WATER:
            stream.source_paused = False
            self._out.append(StreamResume(stream.id))
        if not buf and stream.end_reason is not None:
            self._originate(layer, _END, stream.id, bytes((stream.end_reason,)))
            self._forget_stream(stream, stream.end_reason, by_peer=False)

    def _rate_allowance(self, stream: Stream) -> float:
        """Bytes the stream's token bucket allows now (refilled at its XON rate up to one
        second's worth)."""
        rate = stream.xon_rate * 1000
        stream.tokens = min(float(max(rate, RELAY_DATA_MAX)),
                            stream.tokens + max(0.0, self.now - stream.tokens_at) * rate)
        stream.tokens_at = self.now
        return stream.tokens

    def _wake(self, deadline: float) -> None:
        """A paced stream may package again at ``deadline``: ask for a timer."""
        if self._wake_at is None or deadline < self._wake_at:
            self._wake_at = deadline
            self._arm()

    def _deadline(self) -> float | None:
        """The core's own timer deadline besides pacing (a build or an extend)."""
        return None

    def _arm(self) -> None:
        """(Re)arm the shell's one timer at the earliest deadline this core has."""
        pending = [d for d in (self._deadline(), self._wake_at) if d is not None]
        if pending and not self.closed:
            self._out.append(SetTimer(min(pending)))

    def _on_wake(self, now: float) -> None:
        """Timer: paced streams whose time has come package again (asking for the next
        wake-up if they must wait again); the timer is re-armed for what is still due."""
        if self._wake_at is None:
            return
        if now < self._wake_at:
            self._arm()  # (woken for another deadline: the wake-up is still due)
            return
        self._wake_at = None
        for stream in list(self.streams.values()):
            if stream.xon_rate and stream.buf and not self.closed:
                self._pump(stream)
        if self._wake_at is None and self._deadline() is not None:
            self._arm()

    def _forget_stream(self, stream: Stream, reason: int, *, by_peer: bool, abort: bool = False) -> None:
        was_open = stream.state is StreamState.OPEN
        stream.state = StreamState.CLOSED
        stream.buf.clear()
        self._flush_deliveries(stream.id)
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        self._out.append(StreamClosed(stream.id, reason, by_peer, was_open, abort))

    # -- to be provided by the two sides ---------------------------------------------------------------

    def _originate(self, layer: Layer, cmd: int, sid: int, data: bytes) -> None:  # pragma: no cover
        raise NotImplementedError

    def _originate_data(self, layer: Layer, sid: int, chunks: list) -> None:  # pragma: no cover
        raise NotImplementedError

    def _budget(self, layer: Layer) -> int:  # pragma: no cover
        raise NotImplementedError

    def _no_stream(self, layer: Layer, cmd: int, sid: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def _misbehaved(self, reason: str, layer: Layer, cmd: int, sid: int) -> None:  # pragma: no cover
        raise NotImplementedError


# -- the client side ----------------------------------------------------------------------------------

class ClientCircuit(Edge):
    """A circuit this node originates. See the module docstring.

    ``path`` holds what the build needs of each relay (``rsa_id``, ``ed_id``,
    ``ntor_key``, ``address``, ``or_port``: a :class:`~onionp2p.proto.directory.RelayInfo`).
    Call :meth:`start`, then feed it what arrives; ``state`` goes ``building`` → ``built``
    → ``closed`` (or ``failed`` if it never got built).
    """

    def __init__(self, path: Sequence, cc: CCParams | None = None, *, cgo: bool = False) -> None:
        super().__init__()
        if not path:
            raise LocalProtocolError("empty path")
        self.path = tuple(path)
        #: congestion control parameters (None or cc_alg 0: fixed windows everywhere)
        self.cc = cc
        #: ask the hops that offer it for CGO relay crypto (it needs ``cc``)
        self.cgo = cgo
        self.crypto: ClientCrypto | MixedClientCrypto = ClientCrypto()
        self.layers: list[Layer] = []
        self.state = "building"
        self.close_reason: str | None = None
        self.violations = 0
        self.deadline: float | None = None
        self._early_left = MAX_RELAY_EARLY
        self._handshake: HopHandshake | None = None  # the hop being added
        self._resolves: dict[int, Layer] = {}  # RESOLVE stream ID -> the hop asked
        # streams we closed (END sent, RESOLVE given up) -> their hop: what that hop still
        # sends for them before its own END is no violation (tor's half-closed streams)
        self._half_closed: dict[int, Layer] = {}
        self._next_sid = int.from_bytes(os.urandom(2), "big")  # tor: crypto_rand_int(1<<16)
        # RENDEZVOUS2 -> end-to-end key material, while a rendezvous is awaited
        self._rendezvous: Callable[[bytes], bytes] | None = None
        # an onion service's rendezvous circuit: the end-to-end hop whose BEGINs it serves
        self._serving: Layer | None = None

    @property
    def n_hops(self) -> int:
        return len(self.layers)

    # -- building ---------------------------------------------------------------------------------------

    def start(self, now: float, timeout: float) -> list:
        """Send CREATE2 to the first hop; the whole build must finish by ``now + timeout``."""
        hs = self._handshake = self._hop_handshake(0)
        self._out.append(Send(int(CellCommand.CREATE2), [Create2(hs.htype, hs.onion_skin).encode()]))
        self.deadline = now + timeout
        self._out.append(SetTimer(self.deadline))
        return self._take()

    def on_timer(self, now: float) -> list:
        self.now = max(self.now, now)
        if self.state == "building" and self.deadline is not None and now >= self.deadline:
            self._close("TIMEOUT", "circuit build timed out", destroy=True)
        elif not self.closed:
            self._on_wake(now)
        return self._take()

    def _deadline(self) -> float | None:
        return self.deadline if self.state == "building" else None

    def _hop_handshake(self, index: int) -> HopHandshake:
        relay = self.path[index]
        # CGO on every hop that offers it (tor 0.4.9.12), of circuits that carry streams;
        # such a hop needs congestion control too, wherever it is on the circuit
        cgo = self.cgo and len(self.path) >= 2 and wants_cgo(relay, self.cc, True)
        cc = self.cc if cgo or wants_cc(relay, index, len(self.path), self.cc) else None
        return HopHandshake(relay, cc, cgo=cgo)

    def add_layer(self, key_material: bytes, params: HopParams | None = None) -> None:
        """A hop's keys are agreed: its crypto layer and its windows. (The build does this;
        tests call it to set up a circuit without handshakes.)"""
        self._new_layer(key_material, params)
        self._out.append(HopAdded(len(self.layers) - 1))
        if len(self.layers) == len(self.path):
            self.state = "built"
            self._out.append(Built())

    def add_virtual_hop(self, key_material: bytes, params: HopParams | None = None) -> list:
        """Add an end-to-end layer past the last relay, as onion services do after the
        rendezvous (tor's virtual hop; its keys come from the hs-ntor handshake, not from a
        relay): relay crypto "hs" (128 bytes of key material, see
        :meth:`onionp2p.proto.hs.ntor.HsCircuitKeys.key_material`) unless ``params`` says
        otherwise. Cells for it cross the rendezvous point's splice; nothing is announced."""
        if self.state != "built":
            raise LocalProtocolError("circuit is not open")
        self._new_layer(key_material, params if params is not None else HopParams(key_material, "hs-ntor",
                                                                                   relay_crypto="hs"))
        return self._take()

    def expect_rendezvous(self, complete: Callable[[bytes], bytes]) -> None:
        """Arm the client end of a rendezvous circuit: when RENDEZVOUS2 arrives from the
        last hop, ``complete(HANDSHAKE_INFO)`` gives the end-to-end key material (or raises
        HandshakeError: the circuit closes, PROTOCOL) and the virtual hop is added *before
        the next cell is decrypted*: the service may send right after its RENDEZVOUS1, and
        those cells can arrive in the same batch as RENDEZVOUS2 (tor adds the hop in the
        same call, ``hs_circuit_setup_e2e_rend_circ``). The RENDEZVOUS2 is then still
        reported (HsMessage) for the shell to go on."""
        if self.state != "built":
            raise LocalProtocolError("circuit is not open")
        self._rendezvous = complete

    def accept_streams(self) -> None:
        """Serve streams on this circuit as an onion service does on its rendezvous circuit:
        a BEGIN from the last hop (the end-to-end layer added by :meth:`add_virtual_hop`)
        opens a stream here, reported as :class:`ExitBegin` and answered with
        :meth:`stream_accepted` or :meth:`stream_refused` (tor's ``handle_hs_exit_conn``).
        A BEGIN from any other hop, RESOLVE and BEGIN_DIR stay violations; a malformed
        BEGIN is answered with END (TORPROTOCOL); a BEGIN for a stream ID in use is
        dropped, as at an exit."""
        if self.state != "built" or not self.layers or self.layers[-1].relay_crypto != "hs":
            raise LocalProtocolError("streams are served only past an end-to-end layer")
        self._serving = self.layers[-1]

    def _incoming_begin(self, layer: Layer, sid: int, data: bytes) -> None:
        if sid in self.streams or sid in self._half_closed:
            self._violation("BEGIN for a stream ID in use", layer, _BEGIN, sid)
            return
        try:
            begin = Begin.parse(data, onion_service=True)
        except ProtocolError:
            self._originate(layer, _END, sid, End(EndReason.TORPROTOCOL).encode())
            return
        stream = Stream(sid, layer)
        stream.sink_ready = False  # until the local target is connected
        self.streams[sid] = stream
        self._out.append(ExitBegin(sid, begin))

    def stream_accepted(self, sid: int, now: float | None = None) -> list:
        """The served stream's local target is connected: CONNECTED (empty, as tor's
        service sends it: no address to tell), and data flows."""
        if now is not None:
            self.now = now
        stream = self.streams.get(sid)
        if stream is not None and stream.state is StreamState.CONNECTING and not self.closed:
            self._originate(stream.layer, int(RelayCommand.CONNECTED), sid, b"")
            stream.state = StreamState.OPEN
            stream.sink_ready = True
            self._stream_sendmes(stream)
            self._pump(stream)
        return self._take()

    def stream_refused(self, sid: int, reason: int) -> list:
        """The served stream cannot be connected: END(``reason``)."""
        stream = self.streams.get(sid)
        if stream is not None and not self.closed:
            self._originate(stream.layer, _END, sid, bytes((reason,)))
            self._forget_stream(stream, reason, by_peer=False)
        return self._take()

    def _new_layer(self, key_material: bytes, params: HopParams | None) -> Layer:
        kind = params.relay_crypto if params is not None else "tor1"
        if kind == "cgo" and type(self.crypto) is ClientCrypto:
            self.crypto = MixedClientCrypto(self.crypto)  # (the tor1 hops so far carry over)
        if type(self.crypto) is ClientCrypto:
            self.crypto.add_hop(key_material, HS_E2E if kind == "hs" else TOR1)
        else:
            self.crypto.add_hop(key_material, kind)
        layer = Layer(len(self.layers))
        layer.set_relay_crypto(kind)
        if params is not None:
            layer.handshake = params.handshake
            layer.kh = params.kh
            if params.sendme_inc is not None:
                layer.enable_cc(self.cc if self.cc is not None else CCParams(), params.sendme_inc)
        self.layers.append(layer)
        return layer

    def _hop_answered(self, hdata: bytes) -> None:
        assert self._handshake is not None
        params = self._handshake.complete(hdata)  # raises HandshakeError
        self._handshake = None
        self.add_layer(params.key_material, params)
        if self.state == "built":
            return
        relay = self.path[len(self.layers)]
        hs = self._handshake = self._hop_handshake(len(self.layers))
        specs = (LinkSpec.ipv4(relay.address, relay.or_port), LinkSpec.legacy_id(relay.rsa_id),
                 LinkSpec.ed25519_id(relay.ed_id))
        self._originate(self.layers[-1], _EXTEND2, 0, Extend2(specs, hs.htype, hs.onion_skin).encode())

    # -- cells ------------------------------------------------------------------------------------------

    def receive_cell(self, command: int, payload: bytes, now: float) -> list:
        """A cell other than RELAY/RELAY_EARLY for this circuit (CREATED2, DESTROY ...)."""
        if self.state in ("closed", "failed"):
            return []
        try:
            if command == CellCommand.CREATED2:
                if self._handshake is None or self.layers:
                    raise ProtocolError("unexpected CREATED2")
                self._hop_answered(Created2.parse(payload).hdata)
            elif command == CellCommand.DESTROY:
                reason = _name(DestroyReason, Destroy.parse(payload).reason)
                self._close(reason, f"DESTROY from the network ({reason})", destroy=False)
            # anything else on a circuit of ours is dropped, as tor does
        except ProtocolError as exc:
            self._close("PROTOCOL", str(exc), destroy=True)
        return self._take()

    def receive_relay(self, data, start: int, count: int, now: float) -> list:
        """``count`` RELAY/RELAY_EARLY cells of this circuit at ``data[start + i*514:]``."""
        if self.state in ("closed", "failed"):
            return []
        self.now = now
        mv = memoryview(data)
        try:
            done = 0
            error: ProtocolError | None = None
            # while RENDEZVOUS2 is awaited, one cell at a time: it adds a layer that the
            # cells after it may need
            while self._rendezvous is not None and done < count and not self.closed:
                pos = start + done * _CELL
                if mv[pos + 4] == _RELAY_EARLY:
                    break
                self._handle_inbound([self.crypto.decrypt_inbound(mv[pos + 5:pos + _CELL])])
                done += 1
            runs = self.crypto.decrypt_runs if type(self.crypto) is MixedClientCrypto else None
            if done < count and not self.closed and runs is not None:
                # every hop CGO in C: runs of DATA for one stream come gathered
                results, taken, unrecognized = runs(data, start + done * _CELL, count - done)
                if unrecognized:
                    error = DigestMismatch("inbound relay cell not recognized by any hop")
                done += taken
                self._handle_inbound(results)
            elif done < count and not self.closed:
                bodies = []
                for pos in range(start + done * _CELL, start + count * _CELL, _CELL):
                    if mv[pos + 4] == _RELAY_EARLY:
                        break
                    bodies.append(mv[pos + 5:pos + _CELL])
                done += len(bodies)
                if bodies:
                    try:
                        results = self.crypto.decrypt_inbound_many(bodies)
                    except DigestMismatch as exc:
                        results, error = exc.partial, exc  # type: ignore[attr-defined]
                    self._handle_inbound(results)
            # the cell at ``done``, if any, is RELAY_EARLY: never toward a client (the cells
            # before it are still handled)
            if error is None and done < count and not self.closed:
                error = ProtocolError("RELAY_EARLY cell toward the client")
            if error is not None:
                raise error
        except ProtocolError as exc:
            self._flush_deliveries()
            self._close("PROTOCOL", str(exc), destroy=True)
            return self._take()
        self._flush_deliveries()
        return self._take()

    def _handle_inbound(self, results: list) -> None:
        """Act on decrypted inbound cells ``(hop, body, digest)`` and runs of DATA messages
        ``(hop, stream_id, data, tags, lengths)``, in order, until one closes the circuit.
        Raises ProtocolError for a malformed one."""
        unpack = _HDR.unpack_from
        layers = self.layers
        for item in results:
            if len(item) == 5:  # a run of DATA for one stream (_cgo_native.client_backward_runs)
                hop, sid, data, tags, lengths = item
                self._on_data_run(layers[hop], sid, data, tags, memoryview(lengths).cast("H"))
            else:
                hop, body, digest = item
                layer = layers[hop]
                if layer.v1:
                    cmd, sid, off, length = parse_v1_header(body)
                else:
                    cmd, _rec, sid, _dig, length = unpack(body)
                    off = RELAY_HEADER_LEN
                    if length > RELAY_DATA_MAX:
                        raise ProtocolError(f"relay cell length {length} exceeds {RELAY_DATA_MAX}")
                if cmd == _DATA and sid:
                    self._on_data(layer, sid, body, length, digest)
                else:
                    self._on_message(layer, cmd, sid, bytes(body[off:off + length]), digest)
            if self.closed:
                break

    def _on_message(self, layer: Layer, cmd: int, sid: int, data: bytes, digest: bytes) -> None:
        """A relay message other than DATA (or DATA on stream 0) from ``layer``'s hop."""
        if sid == 0 and cmd in STREAM_COMMANDS:
            self._violation("stream command on stream 0", layer, cmd, sid)
            if cmd == _DATA:  # still counted against its hop's window, as tor does
                if layer.deliver.on_data_received():
                    self._circuit_sendmes(layer, digest)
            return
        if cmd == _SENDME:
            self._on_sendme(layer, sid, data)
        elif cmd == _XOFF or cmd == _XON:
            self._on_flow(layer, cmd, sid, data)
        elif cmd == RelayCommand.CONNECTED:
            stream = self._stream_of(layer, cmd, sid)
            if stream is not None:
                if stream.state is not StreamState.CONNECTING:
                    self._violation("CONNECTED on an open stream", layer, cmd, sid)
                    return
                Connected.parse(data)
                stream.state = StreamState.OPEN
                self._out.append(StreamConnected(sid))
                self._pump(stream)
        elif cmd == _END:
            reason = End.parse(data).reason
            if self._resolves.get(sid) is layer:  # the exit refused our RESOLVE
                del self._resolves[sid]
                self._out.append(ResolveAnswer(sid, None, reason))
                return
            stream = self._stream_of(layer, cmd, sid)
            if stream is not None:
                self._forget_stream(stream, reason, by_peer=True)
        elif cmd == RelayCommand.RESOLVED:
            if self._resolves.get(sid) is not layer:
                self._no_stream(layer, cmd, sid)
                return
            del self._resolves[sid]
            self._out.append(ResolveAnswer(sid, Resolved.parse(data)))
        elif cmd == RelayCommand.EXTENDED2:
            last = layer is self.layers[-1]
            if self._handshake is None or not self.layers:
                if last:
                    raise ProtocolError("unexpected EXTENDED2")  # tor closes the circuit too
                self._violation("EXTENDED2 from a hop that is not extending", layer, cmd, sid)
                return
            if not last:
                self._violation("EXTENDED2 from a hop that is not the last", layer, cmd, sid)
                return
            self._hop_answered(Extended2.parse(data).hdata)
        elif cmd == RelayCommand.TRUNCATED:
            reason = _name(DestroyReason, Truncated.parse(data).reason)
            self._close(reason, "circuit truncated by the network", destroy=True)
        elif cmd in HS_COMMANDS:
            if sid:
                self._violation("onion-service message on a stream", layer, cmd, sid)
                return
            complete = self._rendezvous
            if cmd == RelayCommand.RENDEZVOUS2 and complete is not None and layer is self.layers[-1]:
                self._rendezvous = None
                key_material = complete(data)  # (RENDEZVOUS2 is HANDSHAKE_INFO alone) HandshakeError
                self._new_layer(key_material, HopParams(key_material, "hs-ntor", relay_crypto="hs"))
            self._out.append(HsMessage(layer.index, cmd, data))
        elif cmd == RelayCommand.BEGIN and self._serving is layer:
            self._incoming_begin(layer, sid, data)
        elif cmd in STREAM_COMMANDS:  # BEGIN, RESOLVE, BEGIN_DIR: never toward a client
            self._violation("stream request toward the client", layer, cmd, sid)
        # DROP, PADDING_NEGOTIATED and commands we do not know: dropped (counted in the digest)

    def _stream_of(self, layer: Layer, cmd: int, sid: int) -> Stream | None:
        stream = self.streams.get(sid)
        if stream is not None and stream.layer is layer:
            return stream
        self._no_stream(layer, cmd, sid)
        return None

    def _no_stream(self, layer: Layer, cmd: int, sid: int) -> None:
        """A stream cell no open stream of ``layer``'s hop claims. Cells racing our END on
        a stream of that hop are dropped quietly until its END arrives; anything else is a
        hop answering for a stream that is not its own."""
        if self._half_closed.get(sid) is layer:
            if cmd == _END or cmd == RelayCommand.RESOLVED:
                del self._half_closed[sid]
            return
        self._violation(f"{_name(RelayCommand, cmd)} for no stream of this hop", layer, cmd, sid)

    def _violation(self, reason: str, layer: Layer, cmd: int, sid: int) -> None:
        self.violations += 1
        self._out.append(Violation(reason, layer.index, cmd, sid, self.violations))

    _misbehaved = _violation

    # -- originating --------------------------------------------------------------------------------

    def _send(self, command: int, payloads: list, flush: bool = False) -> None:
        self.room -= len(payloads)
        out = self._out
        if out and type(out[-1]) is Send and out[-1].command == command:
            out[-1].payloads.extend(payloads)
            out[-1].flush |= flush
        else:
            out.append(Send(command, payloads, flush))

    def _originate(self, layer: Layer, cmd: int, sid: int, data: bytes) -> None:
        hop = layer.index
        # RELAY_EARLY as tor sends it (tor-spec §5.6): while the budget of 8 lasts, every
        # EXTEND2 and every cell past the first hop, so nobody can count the hops after them.
        # (Decided first: CGO's layers encrypt the cell command into the cell.)
        if self._early_left > 0 and (hop != 0 or cmd == _EXTEND2):
            self._early_left -= 1
            command = _RELAY_EARLY
        elif cmd == _EXTEND2:
            raise LocalProtocolError("no RELAY_EARLY cells left on this circuit")
        else:
            command = _RELAY
        ct, digest = self.crypto.originate(layer.pack(cmd, sid, data), hop, command)
        if cmd == _DATA:
            layer.package.on_data_sent(digest, self.now)
            self.bytes_sent += len(data)
        self._send(command, [ct], cmd == _SENDME)

    def _originate_data(self, layer: Layer, sid: int, chunks: list) -> None:
        hop = layer.index
        originate = self.crypto.originate
        on_sent = layer.package.on_data_sent
        pack = pack_relay_v1 if layer.v1 else pack_relay
        now = self.now
        early = min(self._early_left, len(chunks)) if hop != 0 else 0
        self._early_left -= early
        cts = []
        for i, chunk in enumerate(chunks):
            ct, digest = originate(pack(_DATA, sid, chunk), hop, _RELAY_EARLY if i < early else _RELAY)
            on_sent(digest, now)
            cts.append(ct)
        if early:
            self._send(_RELAY_EARLY, cts[:early])
            cts = cts[early:]
        if cts:
            self._send(_RELAY, cts)

    def _budget(self, layer: Layer) -> int:
        return min(layer.package.window, self.room)

    def send_relay(self, cmd: int, sid: int, data: bytes = b"", *, hop: int | None = None) -> list:
        """Originate one relay message to ``hop`` (default: the last), as it is: the
        low-level way to send what has no method here (TRUNCATE, DROP ...)."""
        if self.state in ("closed", "failed"):
            return []
        layer = self.layers[-1 if hop is None else hop]
        self._originate(layer, cmd, sid, data)
        return self._take()

    # -- streams ----------------------------------------------------------------------------------------

    def _new_stream_id(self) -> int:
        for _ in range(1 << 16):
            sid = self._next_sid
            self._next_sid = (sid + 1) & 0xFFFF
            if sid and sid not in self.streams and sid not in self._resolves and sid not in self._half_closed:
                return sid
        raise LocalProtocolError("no free stream ID on this circuit")

    def open_stream(self, command: int, body: bytes) -> tuple[int, list]:
        """BEGIN (``body`` an encoded Begin) or BEGIN_DIR to the last hop: the new stream's
        ID and the actions. The stream is CONNECTING until :class:`StreamConnected`."""
        if self.state != "built":
            raise LocalProtocolError("circuit is not open")
        sid = self._new_stream_id()
        layer = self.layers[-1]
        self.streams[sid] = Stream(sid, layer)
        self._originate(layer, command, sid, body)
        return sid, self._take()

    def resolve(self, hostname: str) -> tuple[int, list]:
        """RESOLVE at the last hop: the request's stream ID and the actions."""
        if self.state != "built":
            raise LocalProtocolError("circuit is not open")
        sid = self._new_stream_id()
        layer = self.layers[-1]
        self._resolves[sid] = layer
        self._originate(layer, int(RelayCommand.RESOLVE), sid, Resolve(hostname).encode())
        return sid, self._take()

    def resolve_abandoned(self, sid: int) -> None:
        """We stopped waiting for a RESOLVE: its answer may still come (not a violation)."""
        layer = self._resolves.pop(sid, None)
        if layer is not None and self.state == "built":
            self._half_closed[sid] = layer

    def stream_abort(self, sid: int, reason: int = EndReason.MISC) -> list:
        """END now (buffered bytes are dropped); the stream's hop may still send what was
        on its way."""
        stream = self.streams.get(sid)
        if stream is not None:
            if self.state == "built":
                self._originate(stream.layer, _END, sid, bytes((reason,)))
            self._forget_stream(stream, reason, by_peer=False)
        return self._take()

    def _forget_stream(self, stream: Stream, reason: int, *, by_peer: bool, abort: bool = False) -> None:
        if not by_peer and self.state == "built":
            self._half_closed[stream.id] = stream.layer
        else:
            self._half_closed.pop(stream.id, None)
        super()._forget_stream(stream, reason, by_peer=by_peer, abort=abort)

    # -- closing ----------------------------------------------------------------------------------------

    def destroy(self, reason: str = "REQUESTED", message: str = "closed by us") -> list:
        """Close the circuit from our side: DESTROY (reason NONE: clients say no more)."""
        self._close(reason, message, destroy=True)
        return self._take()

    def channel_closed(self) -> list:
        self._close("CHANNEL_CLOSED", "channel closed", destroy=False)
        return self._take()

    def _close(self, reason: str, message: str, *, destroy: bool) -> None:
        if self.state in ("closed", "failed"):
            return
        failed = self.state != "built"
        self.state = "failed" if failed else "closed"
        self.closed = True
        self.close_reason = reason
        self._deliveries.clear()
        self.streams.clear()
        self._resolves.clear()
        self._half_closed.clear()
        self._handshake = None
        if destroy:
            # a DESTROY must not wait behind cells queued before it that will never matter
            self._out = [a for a in self._out if type(a) is not Send]
        self._out.append(Closed(reason, message, destroy, failed))


# -- the relay side ---------------------------------------------------------------------------------------

def extend_target_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> bool:
    """Like tor's ExtendAllowPrivateAddresses: no private targets unless allowed."""
    if allow_private:
        return not ip.is_unspecified and not ip.is_multicast
    return ip.is_global


class RelayCircuit(Edge):
    """A circuit at a relay (see the module docstring).

    ``own_rsa_id`` and ``prev_rsa_id`` (the previous hop's proven identity, None for a
    client) keep EXTEND2 from going back; ``allow_private``: EXTEND2 may name private
    addresses; ``max_streams``: exit streams at once. ``room`` is how many more cells the
    shell will take toward the client right now (exit streams package at most that many);
    the shell keeps it current and calls :meth:`pump` when it grows.
    """

    def __init__(self, crypto: RelayCrypto | CgoRelayCrypto, *, own_rsa_id: bytes,
                 prev_rsa_id: bytes | None = None, allow_private: bool = False, max_streams: int = 500,
                 params: HopParams | None = None, cc: CCParams | None = None):
        super().__init__()
        self.crypto = crypto
        self.layer = Layer(0)  # our edge's windows, used when we are the last hop
        self.layer.set_relay_crypto(crypto.kind)
        if params is not None:
            self.layer.handshake = params.handshake
            if params.sendme_inc is not None:  # congestion control negotiated (with ``cc``)
                self.layer.enable_cc(cc if cc is not None else CCParams(), params.sendme_inc)
        self.own_rsa_id = own_rsa_id
        self.prev_rsa_id = prev_rsa_id
        self.allow_private = allow_private
        self.max_streams = max_streams
        self.has_next = False
        self.extending = False
        self.extend_deadline: float | None = None
        self.early_in = 0
        self.cells_forward = 0
        self.cells_backward = 0
        self.room = RELAY_QUEUE_ROOM
        self._resolving: set[int] = set()
        #: joined to another circuit at a rendezvous point: forward cells not ours go there
        self.spliced = False

    # -- forward: from the client's side --------------------------------------------------------------

    def receive_forward(self, data, start: int, count: int, now: float) -> list:
        """``count`` RELAY/RELAY_EARLY cells from the previous hop at ``data[start + i*514:]``.

        Each cell is decrypted with the keystream straight from the buffer; cells that are
        not ours (Recognized non-zero, or the digest check fails) are gathered and leave in
        one action; before a recognized cell is handled, those gathered so far are sent,
        so every cell leaves in the order it came.
        """
        if self.closed:
            return []
        self.now = now
        mv = memoryview(data)
        crypto = self.crypto
        if self.layer.v1:
            return self._receive_forward_cgo(mv, start, count, now)
        upd = crypto.fwd_update
        out: list = []
        out_cmd = _RELAY
        pos = start
        end = start + count * _CELL
        try:
            while pos < end:
                cmd = mv[pos + 4]
                if cmd == _RELAY_EARLY:
                    self.early_in += 1
                    if self.early_in > MAX_RELAY_EARLY:
                        self._to_next(out_cmd, out)
                        raise ProtocolError("too many RELAY_EARLY cells")
                self.cells_forward += 1
                plain = upd(mv[pos + 5:pos + _CELL])
                pos += _CELL
                if not plain[1] and not plain[2]:
                    digest = crypto.recognize_forward(plain)
                    if digest is not None:
                        if out:
                            self._to_next(out_cmd, out)
                            out = []
                        self._on_recognized(plain, digest, cmd == _RELAY_EARLY, now)
                        if self.closed:
                            return self._take()
                        continue
                if not self.has_next and not self.spliced:
                    self._to_next(out_cmd, out)
                    raise ProtocolError("unrecognized relay cell at the last hop")
                if cmd != out_cmd:
                    if out:
                        self._to_next(out_cmd, out)
                        out = []
                    out_cmd = cmd
                out.append(plain)
            self._to_next(out_cmd, out)
        except ProtocolError as exc:
            self._flush_deliveries()
            self._destroy(DestroyReason.PROTOCOL, message=f"protocol violation: {exc}")
            return self._take()
        self._flush_deliveries()
        return self._take()

    def _receive_forward_cgo(self, mv: memoryview, start: int, count: int, now: float) -> list:
        """:meth:`receive_forward` for a CGO layer: one UIV+ pass per cell both strips our
        layer and says whether the cell is ours (its command is part of the tweak)."""
        decrypt = self.crypto.decrypt_forward
        out: list = []
        out_cmd = _RELAY
        pos = start
        end = start + count * _CELL
        try:
            while pos < end:
                cmd = mv[pos + 4]
                if cmd == _RELAY_EARLY:
                    self.early_in += 1
                    if self.early_in > MAX_RELAY_EARLY:
                        self._to_next(out_cmd, out)
                        raise ProtocolError("too many RELAY_EARLY cells")
                self.cells_forward += 1
                recognized, body, tag = decrypt(mv[pos + 5:pos + _CELL], cmd)
                pos += _CELL
                if recognized:
                    if out:
                        self._to_next(out_cmd, out)
                        out = []
                    self._on_recognized(body, tag, cmd == _RELAY_EARLY, now)
                    if self.closed:
                        return self._take()
                    continue
                if not self.has_next and not self.spliced:
                    self._to_next(out_cmd, out)
                    raise ProtocolError("unrecognized relay cell at the last hop")
                if cmd != out_cmd:
                    if out:
                        self._to_next(out_cmd, out)
                        out = []
                    out_cmd = cmd
                out.append(body)
            self._to_next(out_cmd, out)
        except ProtocolError as exc:
            self._flush_deliveries()
            self._destroy(DestroyReason.PROTOCOL, message=f"protocol violation: {exc}")
            return self._take()
        self._flush_deliveries()
        return self._take()

    def _to_next(self, command: int, payloads: list) -> None:
        if payloads:
            if self.has_next:
                self._out.append(ToNext(command, payloads))
            elif self.spliced:
                self._out.append(ToSplice(payloads))

    def _on_recognized(self, body, digest: bytes, early: bool, now: float) -> None:
        if self.layer.v1:
            cmd, sid, off, length = parse_v1_header(body)
        else:
            cmd, _rec, sid, _dig, length = _HDR.unpack_from(body)
            off = RELAY_HEADER_LEN
            if length > RELAY_DATA_MAX:
                raise ProtocolError(f"relay cell length {length} exceeds {RELAY_DATA_MAX}")
        if cmd == _DATA:
            if sid == 0:
                raise ProtocolError("DATA on stream 0")
            self._on_data(self.layer, sid, body, length, digest)
            return
        data = bytes(body[off:off + length])
        if cmd == _SENDME:
            self._on_sendme(self.layer, sid, data)
        elif cmd == _XOFF or cmd == _XON:
            if sid and not self.has_next:
                self._on_flow(self.layer, cmd, sid, data)
        elif cmd == _EXTEND2:
            if not early:
                raise ProtocolError("EXTEND2 not in a RELAY_EARLY cell")
            self._extend(Extend2.parse(data), now)
        elif cmd == RelayCommand.TRUNCATE:
            self._truncate()
        elif cmd in _HS_AT_RELAY:
            if sid:
                raise ProtocolError("onion-service command on a stream")
            if self.has_next or self.extending or self.spliced:
                raise ProtocolError(f"{RelayCommand(cmd).name} on a circuit that does not end here")
            self._out.append(HsRequest(cmd, data))
            if cmd == RelayCommand.RENDEZVOUS1:
                # the cells after it in this run may already be for the joined circuit: they
                # leave as ToSplice, in order after the request (a refused RENDEZVOUS1 closes
                # the circuit, and they are dropped with it)
                self.spliced = True
        elif cmd in (RelayCommand.BEGIN, RelayCommand.BEGIN_DIR, RelayCommand.RESOLVE, _END):
            if sid == 0:
                raise ProtocolError("stream command with stream ID 0")
            if self.has_next or self.extending:
                raise ProtocolError("stream command at a middle hop")
            self._on_stream_request(cmd, sid, data)
        # DROP, onion-service messages meant for a client, anything else: dropped (it still
        # counted toward the digest), as tor does

    def _no_stream(self, layer: Layer, cmd: int, sid: int) -> None:
        """DATA or SENDME for a stream we do not have (ended, or never was): dropped, as tor does."""

    def _misbehaved(self, reason: str, layer: Layer, cmd: int, sid: int) -> None:
        """A flow-control cell that breaks the rules (a second XOFF ...): dropped, as tor does."""

    # -- exit streams ---------------------------------------------------------------------------------

    def _on_stream_request(self, cmd: int, sid: int, data: bytes) -> None:
        if cmd == _END:
            stream = self.streams.get(sid)
            if stream is not None:
                self._forget_stream(stream, End.parse(data).reason, by_peer=True)
            self._resolving.discard(sid)
            return
        if sid in self.streams or sid in self._resolving:
            return  # "Begin cell for known stream. Dropping." (tor)
        if cmd == RelayCommand.RESOLVE:
            try:
                hostname = Resolve.parse(data).hostname
            except ProtocolError:
                self._originate(self.layer, _END, sid, End(EndReason.TORPROTOCOL).encode())
                return
            self._resolving.add(sid)
            self._out.append(ExitResolve(sid, hostname))
            return
        begin = None
        if cmd == RelayCommand.BEGIN:
            try:
                begin = Begin.parse(data)
            except ProtocolError:
                self._originate(self.layer, _END, sid, End(EndReason.TORPROTOCOL).encode())
                return
        if len(self.streams) >= self.max_streams:
            self._originate(self.layer, _END, sid, End(EndReason.RESOURCELIMIT).encode())
            return
        stream = Stream(sid, self.layer)
        stream.sink_ready = False  # until the destination is connected
        self.streams[sid] = stream
        self._out.append(ExitBegin(sid, begin))

    def exit_connected(self, sid: int, connected: bytes, now: float | None = None) -> list:
        """The destination is connected: CONNECTED (``connected``: an encoded Connected)."""
        if now is not None:
            self.now = now
        stream = self.streams.get(sid)
        if stream is not None and stream.state is StreamState.CONNECTING and not self.closed:
            self._originate(self.layer, int(RelayCommand.CONNECTED), sid, connected)
            stream.state = StreamState.OPEN
            stream.sink_ready = True
            self._stream_sendmes(stream)
            self._pump(stream)
        return self._take()

    def exit_refused(self, sid: int, end: bytes) -> list:
        """The stream or RESOLVE cannot be served: END (``end``: an encoded End)."""
        if self.closed:
            return []
        stream = self.streams.get(sid)
        if stream is not None:
            self._originate(self.layer, _END, sid, end)
            self._forget_stream(stream, end[0] if end else EndReason.MISC, by_peer=False)
        elif sid in self._resolving:
            self._resolving.discard(sid)
            self._originate(self.layer, _END, sid, end)
        return self._take()

    def exit_resolved(self, sid: int, answer: bytes) -> list:
        """The answer to a RESOLVE (``answer``: an encoded Resolved)."""
        if sid in self._resolving and not self.closed:
            self._resolving.discard(sid)
            self._originate(self.layer, int(RelayCommand.RESOLVED), sid, answer)
        return self._take()

    def send_back(self, cmd: int, sid: int, data: bytes = b"") -> list:
        """Originate one relay message toward the client from this hop, as it is (the
        low-level way to send what has no method here; tests use it to play a lying hop)."""
        if not self.closed:
            self._originate(self.layer, cmd, sid, data)
        return self._take()

    def _budget(self, layer: Layer) -> int:
        return min(layer.package.window, self.room)

    # -- originating toward the client --------------------------------------------------------------

    def _to_prev(self, payloads: list) -> None:
        out = self._out
        if out and type(out[-1]) is ToPrev and out[-1].command == _RELAY:
            out[-1].payloads.extend(payloads)
        else:
            out.append(ToPrev(_RELAY, payloads))
        self.cells_backward += len(payloads)
        self.room -= len(payloads)

    def _originate(self, layer: Layer, cmd: int, sid: int, data: bytes) -> None:
        ct, digest = self.crypto.originate_backward(layer.pack(cmd, sid, data))
        if cmd == _DATA:
            layer.package.on_data_sent(digest, self.now)
            self.bytes_sent += len(data)
        self._to_prev([ct])

    def _originate_data(self, layer: Layer, sid: int, chunks: list) -> None:
        if layer.v1:
            bodies = [pack_relay_v1(_DATA, sid, c) for c in chunks]
        else:
            full = _HDR.pack(_DATA, 0, sid, b"\0\0\0\0", RELAY_DATA_MAX)
            bodies = []
            for c in chunks:
                if len(c) == RELAY_DATA_MAX:  # a full cell has no padding: header + data
                    b = bytearray(full)
                    b += c
                else:
                    b = pack_relay(_DATA, sid, c)
                bodies.append(b)
        cts, digests = self.crypto.originate_backward_many(bodies, consume=True)
        on_sent = layer.package.on_data_sent
        now = self.now
        for d in digests:
            on_sent(d, now)
        self._to_prev(cts)

    # -- backward: from the next hop ------------------------------------------------------------------

    def receive_backward(self, data, start: int, count: int, now: float) -> list:
        """``count`` cells from the next hop: our layer is added and they go toward the
        client; RELAY_EARLY toward the client is a violation."""
        if self.closed:
            return []
        mv = memoryview(data)
        upd = self.crypto.bwd_update
        out = []
        pos = start
        end = start + count * _CELL
        while pos < end:
            if mv[pos + 4] == _RELAY_EARLY:
                break
            out.append(upd(mv[pos + 5:pos + _CELL]))
            pos += _CELL
        self.cells_backward += len(out)
        if out:
            self._out.append(ToPrev(_RELAY, out))
        if pos < end:
            self._destroy(DestroyReason.PROTOCOL, message="RELAY_EARLY cell toward the client")
        return self._take()

    def splice(self) -> None:
        """Join this circuit to another at a rendezvous point (its RENDEZVOUS1 matched):
        from now on, forward cells that are not ours leave as :class:`ToSplice`."""
        self.spliced = True

    def receive_spliced(self, bodies: list) -> list:
        """Cells from the circuit this one is spliced to (its layer removed): ours is added
        as for cells from a next hop, and they go toward our client (tor: the cell
        "arrives" on this circuit in the inbound direction)."""
        if self.closed or not bodies:
            return []
        upd = self.crypto.bwd_update
        out = [upd(b) for b in bodies]
        self.cells_backward += len(out)
        self._out.append(ToPrev(_RELAY, out))
        return self._take()

    def receive_cell_prev(self, command: int, payload: bytes, now: float) -> list:
        """A cell other than RELAY/RELAY_EARLY from the previous hop."""
        if command == CellCommand.DESTROY and not self.closed:
            self._destroy(DestroyReason.DESTROYED, notify_prev=False)
        # CREATE2 on a used ID and anything else: dropped, as tor does
        return self._take()

    def receive_cell_next(self, command: int, payload: bytes, now: float) -> list:
        """A cell other than RELAY/RELAY_EARLY from the next hop."""
        if self.closed:
            return []
        if command == CellCommand.CREATED2:
            if not self.extending:
                self._destroy(DestroyReason.PROTOCOL, message="CREATED2 nobody asked for")
                return self._take()
            self.extending = False
            self.extend_deadline = None
            try:
                created = Created2.parse(payload)
            except ProtocolError:
                self._destroy(DestroyReason.PROTOCOL, message="bad CREATED2")
                return self._take()
            self._originate(self.layer, int(RelayCommand.EXTENDED2), 0, Extended2(created.hdata).encode())
        elif command == CellCommand.DESTROY:
            self.has_next = False
            self._out.append(DetachNext(None))
            self._destroy(DestroyReason.DESTROYED, notify_next=False)
        return self._take()

    # -- EXTEND2 / TRUNCATE -----------------------------------------------------------------------------

    def _extend(self, ext: Extend2, now: float) -> None:
        if self.has_next or self.extending or self.spliced:
            raise ProtocolError("EXTEND2 on a circuit that already has a next hop")
        addr = ext.find(LinkSpecType.IPV4) or ext.find(LinkSpecType.IPV6)
        rsa = ext.find(LinkSpecType.LEGACY_ID)
        ed = ext.find(LinkSpecType.ED25519_ID)
        if addr is None or rsa is None:
            raise ProtocolError("EXTEND2 needs an address and an RSA identity")
        if rsa.data == bytes(20) or (ed is not None and ed.data == bytes(32)):
            raise ProtocolError("EXTEND2 with an all-zero identity")
        host, port = addr.hostport()
        if rsa.data == self.own_rsa_id or (self.prev_rsa_id is not None and self.prev_rsa_id == rsa.data):
            raise ProtocolError("EXTEND2 back to ourselves or to the previous hop")
        if not extend_target_allowed(ipaddress.ip_address(host), self.allow_private):
            raise ProtocolError("EXTEND2 to a forbidden address")
        self.extending = True
        self.extend_deadline = now + EXTEND_TIMEOUT
        self._out.append(Extend(host, port, rsa.data, ed.data if ed else None,
                                Create2(ext.htype, ext.hdata).encode()))
        self._arm()  # (a paced stream's wake-up may be due earlier)

    def extend_attached(self) -> list:
        """The CREATE2 went out on the next hop's channel: cells may now go there."""
        if not self.closed:
            self.has_next = True
        return self._take()

    def extend_failed(self, message: str) -> list:
        if self.extending and not self.closed:
            self.extending = False
            self._destroy(DestroyReason.CONNECTFAILED, message=f"extend failed: {message}")
        return self._take()

    def on_timer(self, now: float) -> list:
        self.now = max(self.now, now)
        if self.extending and self.extend_deadline is not None and now >= self.extend_deadline:
            self.extending = False
            self._destroy(DestroyReason.CONNECTFAILED, message="extend timed out")
        elif not self.closed:
            self._on_wake(now)
        return self._take()

    def _deadline(self) -> float | None:
        return self.extend_deadline if self.extending else None

    def _truncate(self) -> None:
        if self.extending:
            self.extending = False
            self.extend_deadline = None
            self._out.append(CancelExtend())
        if self.has_next:
            self.has_next = False
            self._out.append(DetachNext(DestroyReason.REQUESTED))
        for stream in list(self.streams.values()):
            self._forget_stream(stream, EndReason.DESTROY, by_peer=False, abort=True)
        self._resolving.clear()
        self._originate(self.layer, int(RelayCommand.TRUNCATED), 0, Truncated(DestroyReason.REQUESTED).encode())

    # -- teardown -------------------------------------------------------------------------------------

    def destroy(self, reason: int, message: str = "") -> list:
        """Tear the circuit down from here (shutdown, memory limit, queue overflow)."""
        self._destroy(reason, message=message)
        return self._take()

    def channel_closed(self, prev: bool) -> list:
        """The previous (``prev``) or next hop's channel is gone."""
        if prev:
            self._destroy(DestroyReason.CHANNEL_CLOSED, notify_prev=False)
        else:
            self.has_next = False
            self._out.append(DetachNext(None))
            self._destroy(DestroyReason.CHANNEL_CLOSED, notify_next=False)
        return self._take()

    def _destroy(self, reason: int, *, notify_prev: bool = True, notify_next: bool = True,
                 message: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.extending:
            self.extending = False
            self._out.append(CancelExtend())
        # a reason we decided on goes back as is; one we were told is hidden as DESTROYED
        outward = DestroyReason.DESTROYED if reason in (DestroyReason.DESTROYED,
                                                        DestroyReason.CHANNEL_CLOSED) else reason
        if self.has_next:
            self.has_next = False
            self._out.append(DetachNext(DestroyReason.DESTROYED if notify_next else None))
        self.streams.clear()
        self._resolving.clear()
        self._deliveries.clear()
        self._out.append(Destroyed(reason, outward if notify_prev else None, message))
