"""The splice: bytes between an application's connection and a circuit stream, both ways,
with no task, no ``StreamReader`` and no wake-up per chunk (specs/streams.md, "Splice").

Once a stream is open (a SOCKS or HTTP CONNECT request answered, an onion service's
stream accepted and its local target connected), :func:`splice` takes over both asyncio
transports: it gives each a small protocol whose ``data_received`` writes straight into the
other transport, so a run of DATA cells reaches the application's socket in the same
call that decrypted it, and the application's bytes reach the circuit core in the call
that read them. Before, two pump tasks copied through two ``StreamReader`` buffers: each
chunk woke a task, went through a reader buffer and a future, and cost a core call to
re-announce the reader's room (specs/performance.md §4 has the profile). What one turn of
the event loop brings for one side is written in one call at the end of the turn.

Back-pressure is asyncio's own transport flow control, crossed over: when one transport's
write buffer passes its high-water mark (``pause_writing``), the splice stops reading the
other (``pause_reading``); below the low-water mark it reads again. The application's
socket gets the high-water mark the stream's reader had (``sink_high_water``: under
congestion control tor's ``cc_xoff_client``, 500 cells; low-water half of it). For a circuit stream
``pause_reading`` withholds stream SENDMEs (or sends XOFF under congestion control), so a
slow application stops the exit after one stream window; the circuit stream's own
``pause_writing`` (its send buffer over 64 KiB) stops reading the application's socket.
So nothing grows without bound on either side.

Tor streams have no half-close: when either side ends (EOF, close, connection lost) the
splice stops copying, closes the stream side (END), lets what is queued toward the
application leave for at most ``flush_timeout`` seconds (then aborts it) and tells its
owner, who closes the application's side. Bytes the ``StreamReader`` pairs already held
when the splice started (sent while the reply was being written) go first, in order.

Nothing waits on a splice: :func:`start_splice` returns at once and calls back when it is
over, so the SOCKS and HTTP CONNECT ports' connection task (its coroutine frames, its
futures) ends when the stream is open (specs/performance.md §6.4 has what that saved).
:func:`splice` is the same for a caller that awaits it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["Splice", "splice", "start_splice"]


class Splice:
    """A running splice (see :func:`start_splice`): whether it ended, and the end."""

    __slots__ = ("_end_soon", "_ended", "_finished", "_timer", "flush_timeout", "loop", "on_done", "pa",
                 "ps", "ta", "ts", "writers")

    def __init__(self, loop: asyncio.AbstractEventLoop, ta: asyncio.Transport, ts: asyncio.Transport,
                 flush_timeout: float, on_done: Callable[[], None] | None) -> None:
        self.loop = loop
        self.ta, self.ts = ta, ts
        self.flush_timeout = flush_timeout
        self.on_done = on_done
        self.pa: _Side | None = None
        self.ps: _Side | None = None
        #: the StreamWriters, kept until the end: one let go earlier would close its
        #: transport (asyncio's StreamWriter.__del__); none when they were released
        #: (``release``)
        self.writers: tuple[asyncio.StreamWriter, ...] = ()
        self._end_soon = self._ended = self._finished = False
        self._timer: asyncio.TimerHandle | None = None

    def finish(self) -> None:
        """A side ended: the splice ends at the end of this turn of the loop."""
        if not self._end_soon:
            self._end_soon = True
            self.loop.call_soon(self._end, True)

    def stop(self) -> None:
        """End now without waiting for the application's side to be flushed (cancellation,
        shutdown): the stream side is closed (END); the caller aborts or closes the other."""
        self._end(False)
        self._done()

    def drained(self) -> None:
        """The application's side has nothing queued any more, or is gone."""
        if self._timer is not None:
            self._done()

    def _end(self, flush: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if self.ps is not None:
            self.ps.flush()  # what the stream delivered in this turn still goes to the application
        self.ts.close()
        ta = self.ta
        if not flush or ta.is_closing() or not ta.get_write_buffer_size():
            self._done()
            return
        # what is queued toward the application may leave, for a bounded time: with a
        # high-water mark of 0 the transport calls resume_writing once its buffer is empty
        self._timer = self.loop.call_later(self.flush_timeout, self._flush_expired)
        ta.set_write_buffer_limits(high=0)

    def _flush_expired(self) -> None:
        self.ta.abort()
        self._done()

    def _done(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done()
        self.writers = ()


class _HandedOver(asyncio.StreamWriter):
    """A ``StreamWriter`` whose transport a splice owns (``release``): asyncio's
    ``StreamWriter.__del__`` closes the transport of a writer that is collected; this one
    is let go with its ``StreamReader`` and protocol while the transport lives on under
    the splice (which closes the stream's; its owner closes the application's)."""

    def __del__(self) -> None:
        pass


class _Side(asyncio.Protocol):
    """The protocol of one transport: what it reads goes to ``peer``; when its own write
    buffer is full, ``peer`` is not read. ``original``: the protocol it replaced, which
    still hears of the connection's loss (so ``StreamWriter.wait_closed`` works). ``app``:
    this is the application's side, the one flushed at the end.

    What arrives within one turn of the event loop is written to ``peer`` once, at the end
    of the turn (``call_soon``): a circuit delivers each run of cells of a stream as it
    decrypts it, often a cell or two at a time with many circuits busy, and one ``send()``
    per run would cost more than the copy."""

    __slots__ = ("app", "counter", "original", "peer", "pending", "sp", "stats")

    def __init__(self, sp: Splice, peer: asyncio.Transport, original: Any, stats: Any,
                 counter: str | None, app: bool) -> None:
        self.sp = sp
        self.app = app
        self.peer = peer
        self.original = original
        self.stats = stats
        self.counter = counter
        self.pending: list[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        pending = self.pending
        if pending is None:
            self.pending = [data]
            self.sp.loop.call_soon(self.flush)
        else:
            pending.append(data)

    def flush(self) -> None:
        pending, self.pending = self.pending, None
        if not pending or self.peer.is_closing():
            return  # the other side is closed (the splice ended): dropped, as tor does after END
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self.peer.write(data)
        if self.counter is not None:
            stats = self.stats
            setattr(stats, self.counter, getattr(stats, self.counter) + len(data))

    def eof_received(self) -> bool:
        self.flush()
        self.sp.finish()
        return True  # keep the transport: the splice closes it when it has flushed

    def connection_lost(self, exc: Exception | None) -> None:
        self.flush()
        self.sp.finish()
        if self.app:
            self.sp.drained()
        if self.original is not None:
            self.original.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.app:
            self.sp.drained()
        if not self.peer.is_closing():
            self.peer.resume_reading()


def _held(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What ``reader`` buffered so far (taken out of it) and whether its connection ended
    (EOF, or lost with an error): asyncio has no public call for "whatever is there,
    without waiting"."""
    buf = getattr(reader, "_buffer", None)
    data = b""
    if isinstance(buf, bytearray) and buf:
        data = bytes(buf)
        buf.clear()
    return data, reader.at_eof() or bool(getattr(reader, "_eof", False)) or reader.exception() is not None


def start_splice(app: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], *, first: bytes = b"",
                 stats: Any = None, up: str | None = None, down: str | None = None,
                 flush_timeout: float = 5.0, on_done: Callable[[], None] | None = None,
                 release: bool = False) -> Splice:
    """Start copying between ``app`` (the application's connection) and ``stream`` (a
    circuit stream, or any connection) both ways until one side ends; see the module
    docstring. Nothing waits on it: ``on_done()`` is called once, when the copying ended,
    the stream side was closed and what was queued toward the application left (or
    ``flush_timeout`` passed and the application's transport was aborted) — never before
    this returns. Then the caller closes the application's side.

    ``first``: bytes to send on ``stream`` before anything else (a request's optimistic
    data). ``stats``/``up``/``down``: attribute names on ``stats`` counting the bytes
    app -> stream and stream -> app. The replaced protocols (the reader/writer pairs')
    still hear of their connection's loss, so ``wait_closed()`` works. With ``release``
    both reader/writer pairs are let go instead (their readers, protocols, writers and
    futures: specs/performance.md §6.4), for an owner that keeps neither and only closes
    the application's transport when ``on_done()`` comes (the stream's, the splice
    closes)."""
    (a_reader, a_writer), (s_reader, s_writer) = app, stream
    ta, ts = a_writer.transport, s_writer.transport
    sp = Splice(asyncio.get_running_loop(), ta, ts, flush_timeout, on_done)
    kept = []
    for w in (a_writer, s_writer):
        if release and type(w) is asyncio.StreamWriter:
            w.__class__ = _HandedOver
        else:  # (with release, a writer of another class is kept too)
            kept.append(w)
    sp.writers = tuple(kept)
    pa = sp.pa = _Side(sp, ts, None if release else ta.get_protocol(), stats, up, app=True)
    ps = sp.ps = _Side(sp, ta, None if release else ts.get_protocol(), stats, down, app=False)
    # a circuit stream says how much its sink may hold before it pauses (so under congestion
    # control the XOFF comes at tor's cc_xoff_client): the application's socket gets that
    # high-water mark, and reading resumes at half of it
    high = ts.get_extra_info("sink_high_water")
    if high:
        ta.set_write_buffer_limits(high=high, low=high // 2)
    held_a, eof_a = _held(a_reader)
    held_s, eof_s = _held(s_reader)
    ta.set_protocol(pa)
    ts.set_protocol(ps)
    # the readers may have paused their transports (a full buffer, now taken out of them)
    for t in (ta, ts):
        if not t.is_closing() and not t.is_reading():
            t.resume_reading()
    for side, data in ((pa, first), (pa, held_a), (ps, held_s)):
        if data:
            side.data_received(data)
    if eof_a or eof_s or ta.is_closing() or ts.is_closing():
        sp.finish()  # a side ended before the splice began: its protocol will hear nothing
    return sp


async def splice(app: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], *, first: bytes = b"",
                 stats: Any = None, up: str | None = None, down: str | None = None,
                 flush_timeout: float = 5.0) -> None:
    """:func:`start_splice`, returning when it is done. Cancelled, it stops at once (:meth:`Splice.stop`). The caller closes ``app``'s writer
    afterwards."""
    done = asyncio.get_running_loop().create_future()
    sp = start_splice(app, stream, first=first, stats=stats, up=up, down=down, flush_timeout=flush_timeout,
                      on_done=lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        sp.stop()  # (cancelled: stop copying; else already done)
