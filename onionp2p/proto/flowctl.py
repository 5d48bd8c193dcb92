"""SENDME flow control windows (tor-spec §7.4; proposal 289; specs/streams.md), and the
drain rate that XON advertises under congestion control (proposal 324 §4; specs/congestion.md).

Theory of operation
-------------------
Only RELAY_DATA cells count. Each edge of a circuit keeps, per circuit and per
stream, a *package window* (how many DATA cells it may still send) and a *deliver
window* (how many it will still accept):

* circuit windows start at 1000 and move by 100; stream windows start at 500 and
  move by 50;
* the receiver sends a SENDME each time its deliver window has dropped by one
  increment, and grows the window again; a deliver window below zero means the peer
  ignored flow control, which is a protocol violation;
* the sender grows its package window by one increment per SENDME; a SENDME that
  would push the window above its start value is a protocol violation.

Circuit SENDMEs are *authenticated* (version 1): the sender remembers the running
digest of every 100th DATA cell it sends, and the receiver echoes the digest of the
cell that triggered its SENDME. A SENDME whose digest differs from the oldest one
remembered proves the peer did not really receive the cells, and kills the circuit.

These classes are pure bookkeeping: the caller passes digests in and acts on the
booleans and exceptions that come out.

XON's advisory rate
-------------------
Under congestion control a stream has no windows: the receiving edge sends XOFF when
its sink (the application's socket) holds too much, and XON when it has drained. XON
carries ``kbps_ewma``, the edge's recent *drain rate* in kilobytes (1000 bytes, not bits)
per second, which the other edge uses to pace its sending (a token bucket). 0 means
"no rate". :class:`DrainRate` computes it exactly as C tor's ``flow_control_decide_xon``
(``src/core/or/congestion_control_flow.c``): bytes written to the sink are counted
while the sink holds data; once more than ``cc_xon_rate`` cells' worth (500 × 498
bytes) have drained, a rate sample is taken and folded into an N-EWMA (``cc_xon_ewma_cnt``
= 2); XOFF clears the average (tor: "considered wrong if we got all the way to XOFF");
XON sends the average and remembers it; while no XOFF is outstanding, an average that
moved by more than ``cc_xon_change_pct`` (25 %) from the last one sent asks for an
advisory XON; a queue that stayed empty for ``cc_xon_rate`` cells' worth doubles the
average. Like tor, a sample divides the bytes of the *previous* sample period (the
current one's the first time) by the current period's length.
"""

from __future__ import annotations

import hmac
from collections import deque

from onionp2p.errors import DigestMismatch, ProtocolError

__all__ = [
    "DrainRate",
    "n_count_ewma",
    "CIRCWINDOW_START",
    "CIRCWINDOW_INCREMENT",
    "STREAMWINDOW_START",
    "STREAMWINDOW_INCREMENT",
    "PackageWindow",
    "DeliverWindow",
]

CIRCWINDOW_START = 1000
CIRCWINDOW_INCREMENT = 100
STREAMWINDOW_START = 500
STREAMWINDOW_INCREMENT = 50


class PackageWindow:
    """The sending side: may we package another DATA cell?"""

    __slots__ = ("start", "increment", "window", "authenticated", "_digests")

    def __init__(self, start: int, increment: int, *, authenticated: bool = False):
        self.start = start
        self.increment = increment
        self.window = start
        self.authenticated = authenticated
        #: digests of the cells a SENDME must echo; made on the first one (only authenticated
        #: circuit windows ever remember one, and an empty deque is ~770 bytes per stream)
        self._digests: deque[bytes] | None = None

    @classmethod
    def circuit(cls) -> PackageWindow:
        return cls(CIRCWINDOW_START, CIRCWINDOW_INCREMENT, authenticated=True)

    @classmethod
    def stream(cls) -> PackageWindow:
        return cls(STREAMWINDOW_START, STREAMWINDOW_INCREMENT)

    def can_send(self) -> bool:
        return self.window > 0

    def needs_digest(self) -> bool:
        """True if the DATA cell about to be sent is one whose digest must be remembered."""
        return self.authenticated and self.window != self.start and (self.window - 1) % self.increment == 0

    def on_data_sent(self, digest: bytes | None = None, now: float = 0.0) -> None:
        """Account one DATA cell sent; ``digest`` is its running digest (needed when
        authenticated). ``now`` is for congestion control's interface (unused here)."""
        if self.window <= 0:
            raise ProtocolError("package window exhausted")  # caller bug; never network input
        if self.needs_digest():
            if digest is None:
                raise ValueError("authenticated window needs the cell digest")
            if self._digests is None:
                self._digests = deque()
            self._digests.append(bytes(digest))
        self.window -= 1

    def on_sendme(self, digest: bytes | None = None, now: float = 0.0) -> None:
        """Account a SENDME received from the peer (``now``: unused here).

        Raises:
            ProtocolError: the SENDME would overflow the window (nothing was outstanding).
            DigestMismatch: an authenticated SENDME echoes the wrong digest (or none).
        """
        if self.window + self.increment > self.start:
            raise ProtocolError("unexpected SENDME: window would exceed its start value")
        if self.authenticated:
            if not self._digests:
                raise DigestMismatch("SENDME received but no digest is outstanding")
            expected = self._digests.popleft()
            if digest is None or len(digest) != len(expected) or not hmac.compare_digest(expected, digest):
                raise DigestMismatch("SENDME v1 digest does not match the cell it acknowledges")
        self.window += self.increment


class DeliverWindow:
    """The receiving side: count DATA cells and say when to send a SENDME."""

    __slots__ = ("start", "increment", "window", "_due_at")

    def __init__(self, start: int, increment: int):
        self.start = start
        self.increment = increment
        self.window = start
        self._due_at = start - increment  # a SENDME is due at or below this

    @classmethod
    def circuit(cls) -> DeliverWindow:
        return cls(CIRCWINDOW_START, CIRCWINDOW_INCREMENT)

    @classmethod
    def stream(cls) -> DeliverWindow:
        return cls(STREAMWINDOW_START, STREAMWINDOW_INCREMENT)

    def on_data_received(self) -> bool:
        """Account one DATA cell; True if a SENDME is due now (as :meth:`sendme_due`).

        Raises:
            ProtocolError: the peer overran the window.
        """
        window = self.window = self.window - 1
        if window < 0:
            raise ProtocolError("peer sent DATA beyond the flow-control window")
        return window <= self._due_at

    def run_room(self) -> int:
        """How many DATA cells in a row :meth:`on_data_received` would take before the one
        after which a SENDME is due or the window is empty, whichever comes first (that
        cell included; 0: the window is empty, the next cell overruns it)."""
        window = self.window
        if window <= 0:
            return 0
        due = window - self._due_at
        if due <= 0:  # due already (a stream SENDME withheld while its sink is full)
            return 1
        return min(due, window)

    def take(self, n: int) -> None:
        """Account ``n`` DATA cells at once (``n`` at most :meth:`run_room`: the caller
        checks :meth:`sendme_due` after them)."""
        self.window -= n

    def sendme_due(self) -> bool:
        """True while a SENDME should be sent (the window dropped by one increment or more)."""
        return self.window <= self._due_at

    def on_sendme_sent(self) -> None:
        self.window += self.increment


#: tor's defaults for the XON consensus parameters (congestion_control_flow.c)
XON_RATE_CELLS = 500  # cc_xon_rate: cells' worth of drained bytes between rate samples
XON_CHANGE_PCT = 25  # cc_xon_change_pct: a rate this far from the last one sent asks for an XON
XON_EWMA_CNT = 2  # cc_xon_ewma_cnt: N of the N-EWMA
_RELAY_PAYLOAD_SIZE = 498  # tor's RELAY_PAYLOAD_SIZE: the unit of cc_xon_rate
_UINT32_MAX = 2**32 - 1
_INT32_MAX = 2**31 - 1


def n_count_ewma(curr: int, prev: int, n: int) -> int:
    """tor's ``n_count_ewma``: ``curr`` when there is no average yet (``prev == 0``), else
    ``(2 curr + (n - 1) prev) / (n + 1)`` in integers."""
    if prev == 0:
        return curr
    return (2 * curr + (n - 1) * prev) // (n + 1)


class DrainRate:
    """One stream edge's sink drain rate, for the ``kbps_ewma`` of its XONs (see the module
    docstring). Times are seconds (``now``); rates kilobytes (1000 bytes) per second."""

    __slots__ = ("rate_bytes", "change_pct", "ewma_cnt", "ewma", "last_sent", "drained", "prev_drained",
                 "start_us", "_received_at_full", "_buffered_at_full")

    def __init__(self, *, xon_rate_cells: int = XON_RATE_CELLS, change_pct: int = XON_CHANGE_PCT,
                 ewma_cnt: int = XON_EWMA_CNT) -> None:
        self.rate_bytes = xon_rate_cells * _RELAY_PAYLOAD_SIZE
        self.change_pct = change_pct
        self.ewma_cnt = ewma_cnt
        self.ewma = 0  # tor: ewma_drain_rate
        self.last_sent = 0  # tor: ewma_rate_last_sent
        self.drained = 0  # bytes written since the sample period started
        self.prev_drained = 0  # the previous period's bytes
        self.start_us: int | None = None  # when the period started (µs; None: not buffering)
        self._received_at_full = 0
        self._buffered_at_full = 0

    @classmethod
    def from_params(cls, p: object) -> DrainRate:
        """From congestion-control parameters with tor's ``cc_xon_*`` fields (``CCParams``)."""
        return cls(xon_rate_cells=getattr(p, "cc_xon_rate", XON_RATE_CELLS),
                   change_pct=getattr(p, "cc_xon_change_pct", XON_CHANGE_PCT),
                   ewma_cnt=getattr(p, "cc_xon_ewma_cnt", XON_EWMA_CNT))

    def _sample(self, now_us: int) -> int:
        """tor's ``compute_drain_rate``: KB/s over the current period, at least 1; 0 if no time passed."""
        delta = now_us - (self.start_us or 0)
        if delta <= 0:
            return 0
        prev = self.prev_drained
        if prev > _INT32_MAX // 1000 or prev // delta > _INT32_MAX // 1000:
            return _INT32_MAX
        return max(1, (prev * 1000) // delta)

    def changed(self) -> bool:
        """tor's ``stream_drain_rate_changed``: the average moved more than ``change_pct`` % from
        the rate last sent (False before any was sent)."""
        if not self.last_sent:
            return False
        return (self.ewma > (100 + self.change_pct) * self.last_sent // 100
                or self.ewma < (100 - self.change_pct) * self.last_sent // 100)

    def update(self, n_written: int, buffered: int, now: float, xoff_sent: bool) -> int | None:
        """tor's ``flow_control_decide_xon``: the sink wrote ``n_written`` bytes and holds
        ``buffered``. Returns the rate of an XON to send now (the sink drained after our XOFF,
        or the rate changed enough while no XOFF is outstanding; it counts as sent), else None."""
        now_us = int(now * 1_000_000)
        if self.drained >= _UINT32_MAX - n_written:  # bound the count: halve it and its period
            self.drained //= 2
            if self.start_us is not None:
                self.start_us = now_us - (now_us - self.start_us) // 2
        self.drained += n_written
        if self.start_us is None and buffered > 0:  # the sink started buffering: a period starts
            self.start_us = now_us
            self.drained = 0
        if self.start_us is not None and self.drained > self.rate_bytes:
            if self.prev_drained == 0:
                self.prev_drained = self.drained
            rate = self._sample(now_us)
            self.prev_drained = self.drained
            if rate:
                self.ewma = n_count_ewma(rate, self.ewma, self.ewma_cnt)
                self.drained = 0
                self.start_us = None
        send = None
        if (self.changed() if not xoff_sent else buffered == 0):
            send = self.xon_sent()
        if buffered == 0:
            self.start_us = None
            if self.drained >= self.rate_bytes and self.last_sent:  # empty for a while: double it
                self.ewma = min(_INT32_MAX, 2 * self.ewma)
                self.prev_drained = self.drained
                self.drained = 0
        return send

    def xoff_sent(self) -> None:
        """We sent XOFF: the average is wrong if the sink got that full (tor clears it)."""
        self.ewma = 0

    def xon_sent(self) -> int:
        """We send an XON: the rate it carries (remembered, to notice changes)."""
        self.last_sent = self.ewma
        return self.ewma

    # -- the circuit core's view: it learns about the sink only when it fills and empties --

    def sink_full(self, received: int, buffered: int, now: float) -> None:
        """The sink stopped taking data, holding about ``buffered`` bytes (its XOFF limit: an
        exit's socket buffer and a client's reader pause just above it),
        with ``received`` bytes delivered to it so far: the XOFF goes out now. As tor's
        ``flow_control_decide_xoff``: the average is cleared and, the sink holding data, a
        drain period starts."""
        self.xoff_sent()
        self._received_at_full = received
        self._buffered_at_full = buffered
        self.update(0, buffered, now, xoff_sent=True)

    def sink_took(self, n: int, now: float) -> int | None:
        """The sink took ``n`` more bytes with no XOFF outstanding, taken as written from an
        empty queue (the core hears of a sink's queue only when it fills). tor's rules for
        an empty queue then apply: after ``cc_xon_rate`` cells' worth the average doubles,
        and once it is ``cc_xon_change_pct`` above the rate last sent, an advisory XON goes
        out with it (returned; None: nothing to send). So a rate advertised after a slow
        spell opens up again while the sink keeps up, as tor's does."""
        return self.update(n, 0, now, xoff_sent=False)

    def sink_drained(self, received: int, now: float, room: int | None = None) -> int:
        """The sink takes data again, ``received`` bytes delivered to it so far: it wrote what
        it held at :meth:`sink_full` plus what came since, less what it still holds — nothing
        (an exit's socket buffer resumes when empty) or, when the sink says it has ``room``
        bytes left before it stops, the XOFF limit minus that (a client's reader resumes
        half full). Returns the rate for the XON, which goes out now either way."""
        held = max(0, self._buffered_at_full - room) if room is not None else 0
        written = max(0, self._buffered_at_full + received - self._received_at_full - held)
        self._received_at_full = received
        rate = self.update(written, held, now, xoff_sent=True)
        self._buffered_at_full = held
        return self.xon_sent() if rate is None else rate
