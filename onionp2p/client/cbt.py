"""Learning when to give up on circuit construction (proposal 151, path-spec §2.4;
specs/pathsel.md "Circuit build timeouts").

Theory of operation
-------------------
A fixed build timeout is either too long (a slow or stalled path holds a client up, and an
adversary who stalls builds through relays it does not control steers circuits toward
those it does) or too short (slow networks never build anything). Like tor's
``circuitstats.c``, :class:`CircuitBuildTimes` learns the timeout from the build times the
client observes: the time from launching a circuit until its third hop answers.

* The last ``CBT_NCIRCUITS_TO_OBSERVE`` (1000) build times are kept in a circular array
  (milliseconds; an *abandoned* circuit, one that was still unbuilt when its measurement
  period ``close_ms`` ran out, is stored as :data:`CBT_BUILD_ABANDONED`).
* Once ``cbtmincircs`` (100) times are known, a Pareto distribution is fitted: ``Xm`` is the
  count-weighted average of the ``cbtnummodes`` (10) most frequent 10 ms bins (each bin
  stands for its middle, ``bin * 10 + 5`` ms), and ``alpha`` is the maximum-likelihood
  estimate ``n / (sum(ln x_i) - n ln Xm)`` over the non-abandoned times, where a time below
  ``Xm`` counts as ``Xm`` (tor's "more Pareto-like" cheat) and abandoned circuits are
  left out of ``n``, exactly as tor does.
* ``timeout_ms`` is the ``cbtquantile`` (80 %) quantile ``Xm / (1 - q) ** (1 / alpha)``,
  capped to the largest time observed and raised to ``cbtmintimeout``; ``close_ms`` (how
  long a timed-out circuit goes on building, for measurement only) is the
  ``cbtclosequantile`` (99 %) quantile, capped to twice the largest time, at least
  ``cbtinitialtimeout``.
* Network liveness: :meth:`network_is_live` is fed the time a cell last arrived. A circuit
  that is abandoned although nothing arrived since it was launched is a *non-live*
  timeout: while there is one, build times and abandonments are not recorded. Separately,
  the last ``cbtrecentcount`` (20) circuits that got past their first hop are remembered as
  timed out or not; when ``cbtmaxtimeouts`` (18) of them timed out, the network has
  changed: the history is discarded and the timeout goes back to the initial value, or is
  doubled if it already was at least that (a very slow network still gets a chance).

The object is pure: no clock (callers pass ``now``, in seconds) and no I/O; :meth:`to_state`
and :meth:`from_state` give the persisted form (the histogram, as tor's state file keeps it,
in our JSON). Methods that change the timeout return the kind of tor's BUILDTIMEOUT_SET
control event to emit (``"COMPUTED"`` or ``"RESET"``) and :meth:`event_args` its body.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from onionp2p.client.pathsel import RandomSource
from onionp2p.log import get_logger, notice
from onionp2p.proto.netparams import clamp_params

__all__ = [
    "CBT_BIN_WIDTH",
    "CBT_BUILD_ABANDONED",
    "CBT_NCIRCUITS_TO_OBSERVE",
    "CBT_RANGES",
    "STATE_VERSION",
    "CBTParams",
    "CircuitBuildTimes",
]

log = get_logger("onionp2p.cbt")

CBT_NCIRCUITS_TO_OBSERVE = 1000
CBT_BIN_WIDTH = 10  # ms
CBT_BUILD_ABANDONED = 2**31 - 2
CBT_BUILD_TIME_MAX = 2**31 - 1
CBT_SAVE_STATE_EVERY = 10
STATE_VERSION = 1
_I32 = 2**31 - 1

#: tor's defaults and bounds of each consensus parameter (networkstatus_get_param clamps)
CBT_RANGES: dict[str, tuple[int, int, int]] = {
    "cbtdisabled": (0, 0, 1),
    "cbtnummodes": (10, 1, 20),
    "cbtrecentcount": (20, 3, 1000),
    "cbtmaxtimeouts": (18, 3, 10000),
    "cbtmincircs": (100, 1, 10000),
    "cbtquantile": (80, 10, 99),
    "cbtclosequantile": (99, 10, 99),
    "cbttestfreq": (10, 1, _I32),
    "cbtmintimeout": (CBT_BIN_WIDTH, CBT_BIN_WIDTH, _I32),
    "cbtinitialtimeout": (60_000, CBT_BIN_WIDTH, _I32),
}


def _bin_to_ms(b: int) -> int:
    return b * CBT_BIN_WIDTH + CBT_BIN_WIDTH // 2


@dataclass(frozen=True)
class CBTParams:
    """The ``cbt*`` consensus parameters with tor's defaults (see :data:`CBT_RANGES`)."""

    cbtdisabled: int = 0
    cbtnummodes: int = 10
    cbtrecentcount: int = 20
    cbtmaxtimeouts: int = 18
    cbtmincircs: int = 100
    cbtquantile: int = 80
    cbtclosequantile: int = 99
    cbttestfreq: int = 10
    cbtmintimeout: int = CBT_BIN_WIDTH
    cbtinitialtimeout: int = 60_000

    @classmethod
    def from_consensus(cls, params: Mapping[str, int]) -> CBTParams:
        """The ``cbt*`` keys a consensus sets, clamped to tor's bounds, and tor's two
        cross-checks (close quantile at least the quantile, initial timeout at least the
        minimum timeout); other keys keep tor's defaults."""
        out = replace(cls(), **clamp_params(params, CBT_RANGES))
        if out.cbtclosequantile < out.cbtquantile:
            log.warning("Consensus parameter cbtclosequantile is too small, raising it", to=out.cbtquantile)
            out = replace(out, cbtclosequantile=out.cbtquantile)
        if out.cbtinitialtimeout < out.cbtmintimeout:
            log.warning("Consensus parameter cbtinitialtimeout is too small, raising it", to=out.cbtmintimeout)
            out = replace(out, cbtinitialtimeout=out.cbtmintimeout)
        return out


class CircuitBuildTimes:
    """The build-time history and the timeout learned from it. See the module docstring.

    ``initial_timeout_ms``: tor's ``circuit_build_times_get_initial_timeout`` (the configured
    CircuitBuildTimeout; ``params.cbtinitialtimeout`` when None). ``rng`` shuffles a loaded
    history (tor keeps a random subset when the state holds more than fits).
    """

    def __init__(self, params: CBTParams | None = None, *, initial_timeout_ms: float | None = None,
                 rng: RandomSource | None = None):
        self.params = params if params is not None else CBTParams()
        self._configured_initial = initial_timeout_ms
        self.rng: RandomSource = rng if rng is not None else random.SystemRandom()
        self.times: list[int] = [0] * CBT_NCIRCUITS_TO_OBSERVE  # 0: empty slot
        self.build_times_idx = 0
        self.total_build_times = 0
        self.xm = 0
        self.alpha = 0.0
        self.have_computed_timeout = False
        self.timeout_ms = self.close_ms = self.initial_timeout_ms
        self.num_circ_succeeded = 0
        self.num_circ_timeouts = 0
        self.num_circ_closed = 0
        # network liveness (tor's network_liveness_t)
        self.network_last_live = 0.0
        self.nonlive_timeouts = 0
        self.timeouts_after_firsthop: list[int] = [0] * self.params.cbtrecentcount
        self.after_firsthop_idx = 0
        #: build times added since the state was last saved (tor saves every 10)
        self.unsaved = 0

    # -- parameters -----------------------------------------------------------------------------

    @property
    def initial_timeout_ms(self) -> float:
        if self._configured_initial is not None:
            return float(max(self._configured_initial, self.params.cbtmintimeout))
        return float(self.params.cbtinitialtimeout)

    @property
    def quantile(self) -> float:
        return self.params.cbtquantile / 100.0

    @property
    def close_quantile(self) -> float:
        return self.params.cbtclosequantile / 100.0

    def set_params(self, params: CBTParams) -> None:
        """A new consensus (tor's ``circuit_build_times_new_consensus_params``): a changed
        ``cbtrecentcount`` resizes the recent-circuits window, keeping what fits."""
        if params == self.params:
            return
        n = params.cbtrecentcount
        if n != len(self.timeouts_after_firsthop):
            log.info("The consensus has changed how many circuits we track to detect network failures",
                     old=len(self.timeouts_after_firsthop), new=n)
            old = self.timeouts_after_firsthop
            self.timeouts_after_firsthop = (old + [0] * n)[:n]
            self.after_firsthop_idx = min(self.after_firsthop_idx, n - 1)
        self.params = params

    def configure_initial(self, initial_timeout_ms: float | None) -> None:
        """A new configured CircuitBuildTimeout; applies now if no timeout was learned yet."""
        self._configured_initial = initial_timeout_ms
        if not self.have_computed_timeout:
            self.timeout_ms = self.close_ms = self.initial_timeout_ms

    @property
    def enough_to_compute(self) -> bool:
        return self.total_build_times >= self.params.cbtmincircs

    # -- recording ------------------------------------------------------------------------------

    def add_time(self, ms: int) -> None:
        """Record one build time (milliseconds, or :data:`CBT_BUILD_ABANDONED`)."""
        if ms <= 0 or ms > CBT_BUILD_TIME_MAX:
            raise ValueError(f"build time out of range: {ms}")
        self.times[self.build_times_idx] = int(ms)
        self.build_times_idx = (self.build_times_idx + 1) % CBT_NCIRCUITS_TO_OBSERVE
        if self.total_build_times < CBT_NCIRCUITS_TO_OBSERVE:
            self.total_build_times += 1
        self.unsaved += 1

    def circuit_built(self, elapsed_ms: float, *, measurement: bool = False) -> str | None:
        """A circuit reached its third hop ``elapsed_ms`` after it was launched (tor's
        ``circuit_build_times_handle_completed_hop``). ``measurement``: it had already timed
        out and only went on being built to measure it. Returns "COMPUTED" when a new
        timeout was set."""
        kind = None
        if elapsed_ms < 0 or elapsed_ms > 2 * self.close_ms + 1000:
            log.info("Strange value for circuit build time; assuming clock jump", ms=round(elapsed_ms))
            return None
        if self.network_check_live():
            self.add_time(max(1, round(elapsed_ms)))
            kind = self.set_timeout()
        if not measurement:
            self.network_circ_success()
        return kind

    def network_circ_success(self) -> None:
        """A circuit completed without timing out: not a timeout after the first hop."""
        self.num_circ_succeeded += 1
        if self.num_circ_succeeded >= _I32:
            self._scale_circ_counts()
        self.timeouts_after_firsthop[self.after_firsthop_idx] = 0
        self.after_firsthop_idx = (self.after_firsthop_idx + 1) % len(self.timeouts_after_firsthop)

    def count_timeout(self, did_onehop: bool) -> str | None:
        """A circuit went past ``timeout_ms`` unbuilt (``did_onehop``: its first hop had
        answered). Returns "RESET" when too many recent circuits timed out and the timeout
        went back to (or above) the initial one."""
        self.num_circ_timeouts += 1
        if self.num_circ_timeouts >= _I32:
            self._scale_circ_counts()
        if did_onehop:
            self.timeouts_after_firsthop[self.after_firsthop_idx] = 1
            self.after_firsthop_idx = (self.after_firsthop_idx + 1) % len(self.timeouts_after_firsthop)
        return "RESET" if self.network_check_changed() else None

    def count_close(self, did_onehop: bool, start_time: float) -> bool:
        """A timed-out circuit was still unbuilt at ``close_ms`` (launched at ``start_time``):
        record it as abandoned, unless the network is not live. True if recorded."""
        self.num_circ_closed += 1
        if self.num_circ_closed >= _I32:
            self._scale_circ_counts()
        if self.network_last_live < start_time:
            self.nonlive_timeouts += 1
            if self.nonlive_timeouts == 1:
                notice("onionp2p.cbt", "onionp2p has not observed any network activity since this circuit "
                       "was launched. Disabling circuit build timeout recording.",
                       seconds=round(start_time - self.network_last_live))
        if not self.network_check_live():
            return False
        self.add_time(CBT_BUILD_ABANDONED)
        return True

    # -- network liveness -----------------------------------------------------------------------

    def network_is_live(self, now: float) -> None:
        """A cell (or a TLS handshake) arrived at ``now``."""
        if self.nonlive_timeouts > 0:
            notice("onionp2p.cbt", "onionp2p now sees network activity. Restoring circuit build timeout "
                   "recording.", down_for=round(now - self.network_last_live), attempts=self.nonlive_timeouts)
        self.network_last_live = now
        self.nonlive_timeouts = 0

    def network_check_live(self) -> bool:
        """False while there is a circuit abandoned with no network activity since its launch."""
        return self.nonlive_timeouts == 0

    def network_check_changed(self) -> bool:
        """``cbtmaxtimeouts`` of the last ``cbtrecentcount`` circuits timed out after their
        first hop: forget the history and reset (or double) the timeout. True if so."""
        timeout_count = sum(self.timeouts_after_firsthop)
        if timeout_count < self.params.cbtmaxtimeouts:
            return False
        total = self.total_build_times
        self.reset()
        self.timeouts_after_firsthop = [0] * len(self.timeouts_after_firsthop)
        self.after_firsthop_idx = 0
        initial = self.initial_timeout_ms
        if self.timeout_ms >= initial:
            if self.timeout_ms > _I32 // 2 or self.close_ms > _I32 // 2:
                log.warning("Insanely large circuit build timeout value",
                            timeout=self.timeout_ms, close=self.close_ms)
            else:
                self.timeout_ms *= 2
                self.close_ms *= 2
        else:
            self.timeout_ms = self.close_ms = initial
        notice("onionp2p.cbt", f"Your network connection speed appears to have changed. Resetting timeout to "
                   f"{round(self.timeout_ms)}ms after {timeout_count} timeouts and {total} buildtimes.")
        return True

    def reset(self) -> None:
        """Forget the history (tor's ``circuit_build_times_reset``); Xm, alpha, the timeout
        and the liveness state stay."""
        self.times = [0] * CBT_NCIRCUITS_TO_OBSERVE
        self.total_build_times = 0
        self.build_times_idx = 0
        self.have_computed_timeout = False
        self.num_circ_succeeded = self.num_circ_closed = self.num_circ_timeouts = 0

    def _scale_circ_counts(self) -> None:
        self.num_circ_succeeded //= 2
        self.num_circ_timeouts //= 2
        self.num_circ_closed //= 2

    # -- the fit --------------------------------------------------------------------------------

    def max_time(self) -> int:
        """The longest build time observed (abandoned circuits left out)."""
        return max((t for t in self.times if t != CBT_BUILD_ABANDONED), default=0)

    def histogram(self) -> list[int]:
        """Counts per ``CBT_BIN_WIDTH`` bin of the recorded (non-abandoned) times."""
        hist = [0] * (1 + self.max_time() // CBT_BIN_WIDTH)
        for t in self.times:
            if t and t != CBT_BUILD_ABANDONED:
                hist[t // CBT_BIN_WIDTH] += 1
        return hist

    def get_xm(self) -> int:
        """The count-weighted average of the ``cbtnummodes`` most frequent bins (0: no data).
        Ties go to the lowest bin, and bins are taken even once empty (tor's loop)."""
        hist = self.histogram()
        total = counts = 0
        for _ in range(self.params.cbtnummodes):
            best = 0
            for i, c in enumerate(hist):
                if c > hist[best]:
                    best = i
            counts += hist[best]
            total += _bin_to_ms(best) * hist[best]
            hist[best] = 0
        if counts == 0:
            log.warning("No valid circuit build time data", total=self.total_build_times)
            return 0
        return total // counts

    def update_alpha(self) -> bool:
        """Fit Xm and alpha (tor's ``circuit_build_times_update_alpha``). False without data."""
        self.xm = self.get_xm()
        if self.xm == 0:
            return False
        log_xm = math.log(self.xm)
        a = 0.0
        n = 0
        for x in self.times:
            if not x or x == CBT_BUILD_ABANDONED:
                continue
            a += log_xm if x < self.xm else math.log(x)
            n += 1
        a -= n * log_xm
        self.alpha = n / a if a > 0 else 0.0
        return True

    def calculate_timeout(self, quantile: float) -> float:
        """The Pareto quantile function at ``quantile`` (ms, at most INT32_MAX)."""
        ret = float(_I32)
        if self.alpha > 0:
            p = (1.0 - quantile) ** (1.0 / self.alpha)
            if p > 0:
                ret = self.xm / p
        return min(ret, float(_I32))

    def set_timeout(self) -> str | None:
        """Estimate a new timeout from the history (once there are ``cbtmincircs`` times).
        Returns "COMPUTED" when it did."""
        if not self.enough_to_compute or not self.update_alpha():
            return None
        prev = round(self.timeout_ms / 1000)
        self.timeout_ms = self.calculate_timeout(self.quantile)
        self.close_ms = self.calculate_timeout(self.close_quantile)
        max_time = self.max_time()
        if self.timeout_ms > max_time:
            self.timeout_ms = float(max_time)
        if max_time < _I32 // 2 and self.close_ms > 2 * max_time:
            self.close_ms = float(2 * max_time)
        self.close_ms = max(self.close_ms, float(self.params.cbtinitialtimeout))
        self.have_computed_timeout = True
        if self.timeout_ms < self.params.cbtmintimeout:
            log.info("Set buildtimeout to a low value; raising it to cbtmintimeout",
                     ms=self.timeout_ms, to=self.params.cbtmintimeout)
            self.timeout_ms = float(self.params.cbtmintimeout)
            if self.close_ms < self.timeout_ms:
                self.close_ms = float(self.params.cbtinitialtimeout)
        if prev != round(self.timeout_ms / 1000):
            log.info(f"Based on {self.total_build_times} circuit times, we will now assume a circuit is too "
                     f"slow to use after waiting {round(self.timeout_ms)} milliseconds.",
                     close_ms=round(self.close_ms), xm=self.xm, alpha=round(self.alpha, 4))
        return "COMPUTED"

    # -- introspection --------------------------------------------------------------------------

    def timeout_rate(self) -> float:
        """Fraction of recorded times at or beyond the timeout (tor's ``timeout_rate``)."""
        if not self.total_build_times:
            return 0.0
        return sum(1 for t in self.times if t and t >= self.timeout_ms) / self.total_build_times

    def close_rate(self) -> float:
        """Fraction of recorded circuits that were abandoned."""
        if not self.total_build_times:
            return 0.0
        return sum(1 for t in self.times if t == CBT_BUILD_ABANDONED) / self.total_build_times

    def event_args(self, kind: str) -> str:
        """The body of tor's ``650 BUILDTIMEOUT_SET <kind> ...`` event (rates over the
        circuits attempted, as tor's ``cbt_control_event_buildtimeout_set``)."""
        qnt = 1.0 if kind in ("RESET", "SUSPENDED", "DISCARD") else self.quantile
        total = float(self.num_circ_timeouts + self.num_circ_succeeded)
        t_rate = self.num_circ_timeouts / total if total >= 1 else 0.0
        c_rate = self.num_circ_closed / total if total >= 1 else 0.0
        return (f"TOTAL_TIMES={self.total_build_times} TIMEOUT_MS={int(self.timeout_ms)} XM={self.xm} "
                f"ALPHA={self.alpha:f} CUTOFF_QUANTILE={qnt:f} TIMEOUT_RATE={t_rate:f} "
                f"CLOSE_MS={int(self.close_ms)} CLOSE_RATE={c_rate:f}")

    # -- persistence ----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """The history as tor's state file keeps it (TotalBuildTimes,
        CircuitBuildAbandonedCount, CircuitBuildTimeBin "ms count" lines), as JSON."""
        hist = self.histogram()
        self.unsaved = 0
        return {"version": STATE_VERSION, "total_build_times": self.total_build_times,
                "abandoned": sum(1 for t in self.times if t == CBT_BUILD_ABANDONED),
                "bins": [[_bin_to_ms(i), c] for i, c in enumerate(hist) if c]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Take a saved history (tor's ``circuit_build_times_parse_state``): the times are
        rebuilt from the bins, shuffled, and at most 1000 kept; then the timeout is
        estimated. Raises ValueError on a corrupt state (the history stays empty)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown build-times state version {state.get('version')!r}")
        total = int(state["total_build_times"])
        abandoned = int(state.get("abandoned", 0))
        if total < 0 or abandoned < 0 or (total == 0 and abandoned > 0):
            raise ValueError("bad build-time counts")
        loaded: list[int] = []
        for entry in state.get("bins", []):
            ms, count = int(entry[0]), int(entry[1])
            if not 0 < ms <= CBT_BUILD_TIME_MAX or count < 0:
                raise ValueError("bad build-time bin")
            if len(loaded) + count + abandoned > total:
                log.warning("Too many build times in state file; stopping short", at=len(loaded) + count)
                break
            loaded.extend([ms] * count)
        loaded.extend([CBT_BUILD_ABANDONED] * abandoned)
        if len(loaded) != total:
            raise ValueError(f"build times count mismatch: read {len(loaded)}, state says {total}")
        self.reset()
        for n in range(len(loaded) - 1, 0, -1):  # Fisher-Yates, as tor
            k = self.rng.randrange(n + 1)
            loaded[k], loaded[n] = loaded[n], loaded[k]
        for ms in loaded[:CBT_NCIRCUITS_TO_OBSERVE]:
            self.add_time(ms)
        self.unsaved = 0
        self.set_timeout()
