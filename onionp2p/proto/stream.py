"""Streams at a circuit's edge: packaging, delivery and back-pressure (tor-spec §6, §7.4).

Theory of operation
-------------------
A stream lives at both *edges* of a circuit: at the client (where an application
reads and writes) and at the exit (where a TCP connection to the destination does).
Both edges do the same job, so one class, :class:`EdgeStream`, does it for both:

* bytes from the local *source* (application or destination socket) are buffered and
  cut into RELAY_DATA cells of at most 498 bytes while both the stream's and the
  circuit's package windows allow; when the buffer passes a high-water mark the
  source is paused (the application's ``drain()`` blocks, or the exit stops reading
  the destination socket), so nothing is buffered without bound;
* DATA cells from the circuit are counted against the stream's deliver window and
  handed to the local *sink*; a stream SENDME goes back only while the sink is
  accepting data (tor-spec: the window is at most 450 and little is pending), so a
  slow reader stops the far edge after at most 500 cells.

The object is I/O-free: the circuit passes in an ``emit(cmd, stream_id, data)``
callable (which also charges DATA cells to the circuit's package window) and a
``circ_can_send()`` predicate; the shell passes the source/sink hooks.

Batching: when the circuit can also take many DATA cells at once — ``emit_data(stream_id,
chunks)`` with ``circ_budget()`` = how many DATA cells the circuit accepts right now —
:meth:`EdgeStream.pump` cuts the buffer into as many 498-byte chunks as the windows
allow and hands them over in one call. If they are not passed, they are taken from the
object ``emit`` is bound to (its ``send_data_many`` and ``package_budget``), so the
exit and the client get the batched path without changes to their call sites. The
cells are the same as with one ``emit`` per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from onionp2p.errors import LocalProtocolError
from onionp2p.proto.flowctl import DeliverWindow, PackageWindow
from onionp2p.proto.relaycell import RELAY_DATA_MAX, RelayCommand, Sendme

__all__ = ["StreamState", "EdgeStream", "handle_sendme", "SOURCE_HIGH_WATER", "SOURCE_LOW_WATER"]

# Bytes buffered from the source before we pause it, and the level at which we resume.
SOURCE_HIGH_WATER = 64 * 1024
SOURCE_LOW_WATER = 16 * 1024


class StreamState(Enum):
    CONNECTING = "connecting"  # BEGIN sent (client) / connecting to destination (exit)
    OPEN = "open"
    CLOSED = "closed"


class EdgeStream:
    """Flow-controlled stream state at one edge. See the module docstring."""

    __slots__ = (
        "stream_id", "state", "package", "deliver", "_emit", "_circ_can_send",
        "_buf", "_source_paused", "_pause_source", "_resume_source", "_sink", "_sink_ready",
        "_send_end_on_drain", "bytes_sent", "bytes_received", "_on_close", "conn",
        "_emit_data", "_circ_budget", "hop",
    )

    def __init__(
        self,
        stream_id: int,
        *,
        emit: Callable[[int, int, bytes], None],
        circ_can_send: Callable[[], bool],
        sink: Callable[[bytes], None],
        sink_ready: Callable[[], bool] = lambda: True,
        pause_source: Callable[[], None] = lambda: None,
        resume_source: Callable[[], None] = lambda: None,
        on_close: Callable[[], None] = lambda: None,
        state: StreamState = StreamState.CONNECTING,
        conn: object = None,
        emit_data: Callable[[int, list], None] | None = None,
        circ_budget: Callable[[], int] | None = None,
    ):
        self.stream_id = stream_id
        self.state = state
        self.package = PackageWindow.stream()
        self.deliver = DeliverWindow.stream()
        self._emit = emit
        self._circ_can_send = circ_can_send
        self._buf = bytearray()
        self._source_paused = False
        self._pause_source = pause_source
        self._resume_source = resume_source
        self._sink = sink
        self._sink_ready = sink_ready
        self._send_end_on_drain: int | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._on_close = on_close
        self.conn = conn  # the shell object behind the stream (socket protocol, app transport)
        self.hop: int | None = None  # client side: the hop the stream was opened to
        if emit_data is None or circ_budget is None:
            owner = getattr(emit, "__self__", None)
            emit_data = getattr(owner, "send_data_many", None)
            circ_budget = getattr(owner, "package_budget", None)
        if emit_data is None or circ_budget is None:
            emit_data = circ_budget = None
        self._emit_data = emit_data
        self._circ_budget = circ_budget

    # -- outbound (source -> circuit) ------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes from the source not yet packaged into cells."""
        return len(self._buf)

    def write(self, data: bytes) -> None:
        """Queue bytes from the source and package what the windows allow."""
        if self.state is StreamState.CLOSED or self._send_end_on_drain is not None:
            raise LocalProtocolError("write on a closed stream")
        self._buf += data
        self.pump()
        if not self._source_paused and len(self._buf) > SOURCE_HIGH_WATER:
            self._source_paused = True
            self._pause_source()

    def pump(self) -> None:
        """Package buffered bytes into DATA cells while both windows are open."""
        if self.state is not StreamState.OPEN:
            return
        buf = self._buf
        sid = self.stream_id
        if self._emit_data is not None:
            package = self.package
            while buf and package.window > 0:
                budget = self._circ_budget()
                if budget <= 0:
                    break
                k = min(package.window, budget, (len(buf) + RELAY_DATA_MAX - 1) // RELAY_DATA_MAX)
                take = min(len(buf), k * RELAY_DATA_MAX)
                blob = bytes(buf[:take])
                del buf[:take]
                chunks = [blob[i:i + RELAY_DATA_MAX] for i in range(0, take, RELAY_DATA_MAX)]
                package.window -= len(chunks)
                self._emit_data(sid, chunks)  # the circuit accounts its own window
                self.bytes_sent += take
        else:
            while buf and self.package.window > 0 and self._circ_can_send():
                chunk = bytes(buf[:RELAY_DATA_MAX])
                del buf[:RELAY_DATA_MAX]
                self.package.window -= 1
                self._emit(RelayCommand.DATA, sid, chunk)  # the circuit accounts its own window
                self.bytes_sent += len(chunk)
        if self._source_paused and len(buf) < SOURCE_LOW_WATER:
            self._source_paused = False
            self._resume_source()
        if not buf and self._send_end_on_drain is not None:
            reason, self._send_end_on_drain = self._send_end_on_drain, None
            self._emit(RelayCommand.END, sid, bytes((reason,)))
            self.close()

    def on_sendme(self) -> None:
        """A stream SENDME arrived: grow the package window and send more."""
        self.package.on_sendme()
        self.pump()

    def finish(self, reason: int) -> None:
        """The source reached EOF: send END(reason) once all buffered bytes are packaged."""
        if self.state is StreamState.CLOSED:
            return
        self._send_end_on_drain = reason
        if self.state is StreamState.OPEN:
            self.pump()

    def mark_open(self) -> None:
        """CONNECTED received (client) / destination connected (exit)."""
        if self.state is StreamState.CONNECTING:
            self.state = StreamState.OPEN
            self.pump()

    # -- inbound (circuit -> sink) ---------------------------------------------

    def on_data(self, data: bytes) -> None:
        """A DATA cell for this stream: count it, deliver it, maybe acknowledge it.

        Raises:
            ProtocolError: the peer exceeded the stream window.
        """
        if self.state is StreamState.CLOSED:
            return  # data racing our END; tor drops it
        self.deliver.on_data_received()
        self.bytes_received += len(data)
        self._sink(data)
        self.maybe_send_sendme()

    def maybe_send_sendme(self) -> None:
        """Send stream SENDMEs while the window is low and the sink keeps up."""
        while self.state is not StreamState.CLOSED and self.deliver.sendme_due() and self._sink_ready():
            self.deliver.on_sendme_sent()
            self._emit(RelayCommand.SENDME, self.stream_id, b"")

    def close(self) -> None:
        """Forget the stream without sending anything more (END sent or received, circuit gone)."""
        if self.state is StreamState.CLOSED:
            return
        self.state = StreamState.CLOSED
        self._buf.clear()
        self._source_paused = False
        self._on_close()


def handle_sendme(package, streams: dict, stream_id: int, data: bytes) -> None:
    """A SENDME arrived at an edge (client or exit): the same rule on both sides.

    Stream 0 is the circuit-level, authenticated (v1) SENDME: grow ``package`` (the
    circuit's :class:`~onionp2p.proto.flowctl.PackageWindow`, which checks the echoed digest) and
    let every stream send again. Otherwise it is a stream SENDME for ``streams[stream_id]``.

    Raises:
        ProtocolError: malformed SENDME, unexpected SENDME or digest mismatch.
    """
    if stream_id == 0:
        msg = Sendme.parse(data)
        package.on_sendme(msg.digest if msg.version == 1 else None)
        for stream in list(streams.values()):
            stream.pump()
    elif (stream := streams.get(stream_id)) is not None:
        stream.on_sendme()
