"""Congestion control: TOR_VEGAS with RTT measured from SENDMEs (proposal 324). Pure.

Theory of operation
-------------------
With congestion control negotiated for a hop (ntor-v3 CC_REQUEST / CC_RESPONSE,
proto/create.py), the sender at that edge no longer has a fixed window of 1000 cells
moved by 100. Instead:

* the receiver sends a circuit SENDME (v1, echoing the digest of the triggering cell)
  after every ``sendme_inc`` DATA cells (31 by default, 16 KiB of cells);
* the sender keeps ``inflight`` (DATA cells sent and not yet acknowledged) and a
  congestion window ``cwnd``; it may send while ``inflight < cwnd``;
* every ``sendme_inc``-th DATA cell sent is the one the next SENDME acknowledges: its
  digest is remembered (to check the SENDME, as proposal 289 asks) and so is the time it
  left; the SENDME's arrival gives a round-trip time sample;
* RTT samples are smoothed with N-EWMA, the smallest smoothed value is kept, and the
  bandwidth-delay product is estimated as ``cwnd * rtt_min / rtt_ewma`` (the congestion
  window estimator, which tor uses);
* TOR_VEGAS moves ``cwnd`` once per SENDME in slow start and once per update period after
  it: ``queue_use = cwnd - BDP``; in slow start grow by RFC 3742 limited slow start while
  the queue stays below ``gamma`` and the window is in use, else leave slow start at
  ``BDP + gamma``; afterwards shrink to ``BDP + delta - inc`` above ``delta``, by ``inc``
  above ``beta`` (or when the local link is blocked), grow by ``inc`` below ``alpha`` if
  the window was full. ``cwnd`` never falls below ``cwnd_min`` nor rises above
  ``ss_max`` in slow start.
* Time comes in as an argument (seconds, any monotonic origin); samples are kept in
  integer microseconds. A sample of zero, or one more than 5000 times the smoothed RTT
  after slow start, is taken for a stalled or jumping clock and not used (proposal 324
  "clock heuristics").

:class:`Vegas` has the interface of :class:`~onionp2p.proto.flowctl.PackageWindow`
(``window``, ``on_data_sent``, ``on_sendme``), so the circuit core uses either for a hop.
Parameters come from the consensus (``cc_*`` keys; :meth:`CCParams.from_consensus`), with
tor's defaults.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace

from onionp2p.errors import DigestMismatch
from onionp2p.proto.netparams import clamp_params

#: tor's RELAY_PAYLOAD_SIZE: the unit of its XOFF limits
RELAY_PAYLOAD_SIZE = 498

__all__ = ["CCParams", "Vegas", "n_ewma", "RANGES"]

#: proposal 324's ratio for a clock jump (or stall) between a sample and the smoothed RTT
CLOCK_JUMP_RATIO = 5000


_MAX = 2**31 - 1
#: tor's bounds for each consensus parameter; a value outside is clamped (networkstatus_get_param)
RANGES = {
    "cc_sendme_inc": (1, 255), "cc_cwnd_init": (31, 10000), "cc_cwnd_min": (31, 1000),
    "cc_cwnd_max": (500, _MAX), "cc_cwnd_inc": (1, 1000), "cc_cwnd_inc_pct_ss": (1, 500),
    "cc_cwnd_inc_rate": (1, 250), "cc_ss_max": (500, _MAX), "cc_cwnd_full_gap": (0, 32767),
    "cc_cwnd_full_minpct": (0, 100), "cc_cwnd_full_per_cwnd": (0, 1), "cc_ewma_cwnd_pct": (1, 255),
    "cc_ewma_max": (2, _MAX), "cc_ewma_ss": (2, _MAX), "cc_rtt_reset_pct": (0, 100),
    "cc_bwe_min": (2, 20), "cc_vegas_alpha_exit": (0, 1000), "cc_vegas_beta_exit": (0, 1000),
    "cc_vegas_gamma_exit": (0, 1000), "cc_vegas_delta_exit": (0, _MAX), "cc_sscap_exit": (100, _MAX),
    "cc_xoff_client": (1, 10000), "cc_xoff_exit": (1, 10000),
    "cc_xon_rate": (1, 5000), "cc_xon_change_pct": (1, 99), "cc_xon_ewma_cnt": (2, 100),
}


@dataclass(frozen=True)
class CCParams:
    """Congestion-control parameters: the consensus ``cc_*`` keys, with tor's defaults (exit
    circuits). ``cc_alg`` is ours to choose, not the consensus's (see :meth:`from_consensus`)."""

    cc_alg: int = 2  # 0: fixed windows (no congestion control); 2: TOR_VEGAS
    cc_sendme_inc: int = 31  # cells per circuit SENDME
    cc_cwnd_init: int = 124
    cc_cwnd_min: int = 124
    cc_cwnd_max: int = _MAX
    cc_cwnd_inc: int = 1  # steady-state increment (cells)
    cc_cwnd_inc_pct_ss: int = 100  # slow start: percent of sendme_inc per SENDME
    cc_cwnd_inc_rate: int = 1  # steady state: cwnd updates once per this many cwnds
    cc_ss_max: int = 5000  # slow start never goes above this
    cc_cwnd_full_gap: int = 1  # sendme_incs of slack when judging "window full"
    cc_cwnd_full_minpct: int = 75  # below this percent in use: not full
    cc_cwnd_full_per_cwnd: int = 1  # 1: re-judge "full" once per cwnd of acks
    cc_ewma_cwnd_pct: int = 50
    cc_ewma_max: int = 10
    cc_ewma_ss: int = 2
    cc_rtt_reset_pct: int = 100
    cc_bwe_min: int = 5  # accepted; only the SENDME-rate estimator uses it, which Vegas does not
    cc_vegas_alpha_exit: int = 186
    cc_vegas_beta_exit: int = 248
    cc_vegas_gamma_exit: int = 186
    cc_vegas_delta_exit: int = 310
    cc_sscap_exit: int = 600
    cc_xoff_client: int = 500  # cells of stream data buffered at a client before XOFF
    cc_xoff_exit: int = 500  # ... and at an exit
    cc_xon_rate: int = 500  # cells' worth of drained bytes between XON drain-rate samples
    cc_xon_change_pct: int = 25  # a drain rate this far (%) from the last one sent asks for an XON
    cc_xon_ewma_cnt: int = 2  # N of the drain rate's N-EWMA

    @property
    def enabled(self) -> bool:
        return self.cc_alg != 0

    def xoff_bytes(self, exit_side: bool) -> int:
        """Bytes a stream's sink may hold before XOFF (tor counts 498-byte payloads)."""
        return (self.cc_xoff_exit if exit_side else self.cc_xoff_client) * RELAY_PAYLOAD_SIZE

    @classmethod
    def from_consensus(cls, params: Mapping[str, int], *, enabled: bool = True) -> CCParams:
        """The ``cc_*`` keys a consensus sets, clamped to tor's bounds; others keep tor's
        defaults. ``cc_alg`` is not taken from the consensus: like tor 0.4.9.12, a
        consensus cannot turn congestion control off (downgrade); ``enabled`` (our own
        configuration) chooses between Vegas and fixed windows."""
        out = replace(cls(), cc_alg=2 if enabled else 0, **clamp_params(params, RANGES))
        if out.cc_cwnd_init < out.cc_cwnd_min:
            out = replace(out, cc_cwnd_init=out.cc_cwnd_min)
        return out


def n_ewma(sample: int, previous: int, n: int) -> int:
    """Proposal 324's N-EWMA, in the rearranged integer form the spec requires."""
    return (sample * 2 + previous * (n - 1)) // (n + 1)


class Vegas:
    """One hop's sending side under TOR_VEGAS (see the module docstring)."""

    __slots__ = ("p", "inc", "cwnd", "inflight", "in_slow_start", "cwnd_full", "next_cc_event",
                 "next_cwnd_event", "rtt_ewma", "rtt_min", "rtt_max", "blocked", "_was_blocked", "sent",
                 "_acks", "samples", "sendmes")

    def __init__(self, params: CCParams, sendme_inc: int | None = None):
        self.p = params
        self.inc = sendme_inc if sendme_inc is not None else params.cc_sendme_inc
        self.cwnd = params.cc_cwnd_init
        self.inflight = 0
        self.in_slow_start = True
        self.cwnd_full = False
        self.next_cc_event = 1  # tor: CWND_UPDATE_RATE, 1 in slow start
        self.next_cwnd_event = 0
        self.rtt_ewma = 0  # microseconds; 0 = no sample yet
        self.rtt_min = 0
        self.rtt_max = 0
        #: the local link toward the other edge is blocked (its queue is full): a congestion
        #: signal. The circuit core sets it before each SENDME is handled.
        self.blocked = False
        self._was_blocked = False
        self.sent = 0  # DATA cells sent on this hop
        self._acks: deque[tuple[bytes, float]] = deque()  # (digest, time) of each sendme_inc-th cell
        self.samples = 0  # RTT samples taken
        self.sendmes = 0  # SENDMEs received

    # -- the PackageWindow interface ----------------------------------------------------------

    @property
    def window(self) -> int:
        """DATA cells that may be sent now."""
        return max(0, self.cwnd - self.inflight)

    def can_send(self) -> bool:
        return self.inflight < self.cwnd

    def on_data_sent(self, digest: bytes | None = None, now: float = 0.0) -> None:
        """One DATA cell sent at ``now``; ``digest`` is its running digest."""
        self.inflight += 1
        self.sent += 1
        if self.sent % self.inc == 0:  # the cell the next SENDME will acknowledge
            self._acks.append((bytes(digest or b""), now))

    def on_sendme(self, digest: bytes | None = None, now: float = 0.0) -> None:
        """A circuit SENDME from the other edge at ``now``: check it, take an RTT sample,
        move cwnd, and take ``sendme_inc`` cells out of flight.

        Raises:
            DigestMismatch: nothing was outstanding, or the echoed digest is not the one
                of the cell it acknowledges.
        """
        if not self._acks:
            raise DigestMismatch("SENDME received but no cell was waiting for one")
        expected, sent_at = self._acks.popleft()
        if digest is None or not hmac.compare_digest(expected, bytes(digest)):
            raise DigestMismatch("SENDME v1 digest does not match the cell it acknowledges")
        self.sendmes += 1
        if self.next_cc_event:
            self.next_cc_event -= 1
        if self.next_cwnd_event:
            self.next_cwnd_event -= 1
        if self.blocked != self._was_blocked:  # blocked, or unblocked: a congestion event now
            self._was_blocked = self.blocked
            self.next_cc_event = 0
        if self._sample(int((now - sent_at) * 1_000_000)) or self.blocked:
            self._update()
        self.inflight = max(0, self.inflight - self.inc)

    # -- RTT -------------------------------------------------------------------------------

    def _ewma_n(self) -> int:
        if self.in_slow_start:
            return max(self.p.cc_ewma_ss, 2)
        return max(min(self._update_rate() * self.p.cc_ewma_cwnd_pct // 100, self.p.cc_ewma_max), 2)

    def _sample(self, rtt: int) -> bool:
        """Take an RTT sample (microseconds); False if the clock stalled or jumped ahead."""
        if rtt <= 0:
            return False
        if self.rtt_ewma and not self.in_slow_start and rtt > CLOCK_JUMP_RATIO * self.rtt_ewma:
            return False
        self.rtt_ewma = rtt if not self.rtt_ewma else n_ewma(rtt, self.rtt_ewma, self._ewma_n())
        self.rtt_max = max(self.rtt_max, rtt)
        if not self.rtt_min:
            self.rtt_min = self.rtt_ewma
        elif self.cwnd == self.p.cc_cwnd_min and not self.in_slow_start:
            # starving at the minimum window: let rtt_min rise toward the current RTT
            pct = self.p.cc_rtt_reset_pct
            hi, lo = max(self.rtt_ewma, self.rtt_min), min(self.rtt_ewma, self.rtt_min)
            self.rtt_min = pct * hi // 100 + (100 - pct) * lo // 100
        elif self.rtt_ewma < self.rtt_min:
            self.rtt_min = self.rtt_ewma
        self.samples += 1
        return True

    # -- TOR_VEGAS --------------------------------------------------------------------------

    @property
    def bdp(self) -> int:
        """The congestion-window estimate of the bandwidth-delay product (cells)."""
        if not self.rtt_ewma:
            return self.cwnd
        return self.cwnd * self.rtt_min // self.rtt_ewma

    def _sendmes_per_cwnd(self) -> int:
        return (self.cwnd + self.inc // 2) // self.inc

    def _update_rate(self) -> int:
        if self.in_slow_start:
            return 1
        step = self.p.cc_cwnd_inc_rate * self.inc
        return (self.cwnd + step // 2) // step

    def _ss_increment(self) -> int:
        """RFC 3742 limited slow start, as proposal 324 states it."""
        cap = self.p.cc_sscap_exit
        if self.cwnd <= cap:
            return (self.p.cc_cwnd_inc_pct_ss * self.inc + 50) // 100
        return max((self.inc * cap + self.cwnd) // (2 * self.cwnd), 1)

    def _update(self) -> None:
        p = self.p
        bdp = self.bdp
        queue_use = max(0, self.cwnd - bdp)
        if self.inflight + p.cc_cwnd_full_gap * self.inc >= self.cwnd:
            self.cwnd_full = True
        elif 100 * self.inflight < p.cc_cwnd_full_minpct * self.cwnd:
            self.cwnd_full = False
        if self.in_slow_start:
            if queue_use < p.cc_vegas_gamma_exit and not self.blocked:
                if self.cwnd_full:
                    inc = self._ss_increment()
                    self.cwnd += inc
                    if inc * self._sendmes_per_cwnd() <= p.cc_cwnd_inc * p.cc_cwnd_inc_rate:
                        self.in_slow_start = False
            else:  # congestion: leave slow start at the gamma threshold
                self.cwnd = bdp + p.cc_vegas_gamma_exit
                self.in_slow_start = False
            if self.cwnd >= p.cc_ss_max:
                self.cwnd = p.cc_ss_max
                self.in_slow_start = False
        elif self.next_cc_event == 0:  # after slow start: once per update period
            if queue_use > p.cc_vegas_delta_exit:
                self.cwnd = bdp + p.cc_vegas_delta_exit - p.cc_cwnd_inc
            elif queue_use > p.cc_vegas_beta_exit or self.blocked:
                self.cwnd -= p.cc_cwnd_inc
            elif self.cwnd_full and queue_use < p.cc_vegas_alpha_exit:
                self.cwnd += p.cc_cwnd_inc
            self.cwnd = max(self.cwnd, p.cc_cwnd_min)
        self.cwnd = min(self.cwnd, p.cc_cwnd_max)
        if self.next_cwnd_event == 0:
            self.next_cwnd_event = self._sendmes_per_cwnd()
        if self.next_cc_event == 0:
            self.next_cc_event = self._update_rate()
        if p.cc_cwnd_full_per_cwnd:
            if self.next_cwnd_event == self._sendmes_per_cwnd():
                self.cwnd_full = False
        elif self.next_cc_event == self._update_rate():
            self.cwnd_full = False
