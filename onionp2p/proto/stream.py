"""A stream's state at one edge of a circuit (tor-spec §6, §7.4; specs/streams.md). Pure.

Theory of operation
-------------------
A stream lives at both *edges* of a circuit: at the client (where an application reads
and writes) and at the exit (where a TCP connection to the destination does). Both edges
keep the same state, so one class, :class:`Stream`, holds it for both; the rules that
act on it — counting DATA, answering with SENDMEs, packaging bytes into DATA cells while
both windows allow, pausing the local source — are in one place, the circuit core's edge
(:class:`onionp2p.proto.circuit.Edge`), which owns the streams of its circuit.

A stream belongs to one *layer*: the hop it was opened to (at the client; only that hop
may speak for it) or the relay's own edge of the circuit (at an exit). It holds

* its windows: ``package`` (DATA cells it may still send, start 500, +50 per SENDME) and
  ``deliver`` (DATA cells it will still accept; a stream SENDME goes back once it has
  dropped by 50 and the local sink is accepting data — :attr:`sink_ready`);
* ``buf``, bytes from the local source not yet cut into cells. Above
  :data:`SOURCE_HIGH_WATER` the core asks the shell to pause the source (the
  application's ``drain()`` blocks, the exit stops reading its socket) and below
  :data:`SOURCE_LOW_WATER` to resume it, so nothing is buffered without bound;
* ``end_reason``: the source reached EOF; END(reason) goes once ``buf`` is packaged.

On a layer with congestion control (proposal 324) a stream has no windows at all
(:attr:`xon`): the circuit's congestion window paces it, and the receiving edge sends
XOFF when its sink stops taking data and XON when the sink has drained. A stream
receiving XOFF stops packaging until XON. Its two windows are then set to
:data:`NO_WINDOW`, so the rules above never run out of them and never make a stream
SENDME due.

Nothing here does I/O: the object is data plus the two tiny predicates below.
"""

from __future__ import annotations

from enum import Enum

from onionp2p.proto.flowctl import DeliverWindow, PackageWindow

__all__ = ["StreamState", "Stream", "SOURCE_HIGH_WATER", "SOURCE_LOW_WATER", "NO_WINDOW"]

#: Bytes buffered from the source before the core asks to pause it, and the level at which
#: it asks to resume.
SOURCE_HIGH_WATER = 64 * 1024
SOURCE_LOW_WATER = 16 * 1024
#: The "window" of a stream under XON/XOFF flow control: more cells than a stream will
#: ever carry (2**30 cells: half a terabyte), so windows never limit it.
NO_WINDOW = 1 << 30


class StreamState(Enum):
    CONNECTING = "connecting"  # BEGIN sent (client) / connecting to the destination (exit)
    OPEN = "open"
    CLOSED = "closed"


class Stream:
    """One stream's state at one edge. See the module docstring."""

    __slots__ = ("id", "layer", "state", "package", "deliver", "buf", "source_paused", "sink_ready",
                 "sink_room", "end_reason", "bytes_sent", "bytes_received", "xon", "xoff_sent",
                 "xoff_received", "xon_rate", "tokens", "tokens_at", "drain")

    def __init__(self, stream_id: int, layer, state: StreamState = StreamState.CONNECTING):
        self.id = stream_id
        self.layer = layer  # the circuit core's Layer this stream belongs to
        self.state = state
        #: flow control by XON/XOFF (the layer runs congestion control) instead of windows
        self.xon = getattr(layer, "cc", None) is not None
        if self.xon:
            self.package = PackageWindow(NO_WINDOW, NO_WINDOW)
            self.deliver = DeliverWindow(NO_WINDOW, NO_WINDOW)
        else:
            self.package = PackageWindow.stream()
            self.deliver = DeliverWindow.stream()
        self.xoff_sent = False  # we told the other edge to stop
        self.xoff_received = False  # the other edge told us to stop
        self.xon_rate = 0  # the other edge's advisory drain rate (kB/s; 0: none given)
        #: our sink's drain rate for the XONs we send (flowctl.DrainRate, made at the first XOFF)
        self.drain = None
        #: with an advisory rate, the token bucket that paces packaging (bytes, and when
        #: it was last refilled)
        self.tokens = 0.0
        self.tokens_at = 0.0
        self.buf = bytearray()
        self.source_paused = False
        #: the local sink takes data (application reading, destination socket writable):
        #: stream SENDMEs are withheld while it is not
        self.sink_ready = True
        #: bytes the sink takes before it will stop (None: it says so itself); the core
        #: counts delivered bytes against it, so that within one run of cells it withholds
        #: SENDMEs as the sink would make it once the run is handed over
        self.sink_room: int | None = None
        self.end_reason: int | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def buffered(self) -> int:
        """Bytes from the source not yet packaged into cells."""
        return len(self.buf)

    @property
    def open(self) -> bool:
        return self.state is StreamState.OPEN
