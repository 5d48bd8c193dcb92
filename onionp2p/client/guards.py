"""Entry guards: tor's guard-spec (proposal 271) guard selection (specs/guards.md).

Theory of operation
-------------------
Using a fresh random first hop for every circuit would, over time, hand some circuit to
every hostile relay on the network; a client therefore keeps a small, persistent set of
guards. The hard part is what to do when guards fail: a network (or a hostile ISP) that
makes guards fail must not be able to walk the client onto guards of its choosing. So,
as in tor, the client works with nested sets (guard-spec §2):

* SAMPLED_GUARDS: the persistent *sample*, drawn bandwidth-weighted for the guard position
  (Wgg/Wgd) from the consensus's relays with Guard, Running and Valid. It only grows while
  fewer than ``guard-min-filtered-sample-size`` sampled guards are usable, and never beyond
  ``max(min(guard-max-sample-size, guard-max-sample-threshold-percent of the guards in the
  consensus), guard-min-filtered-sample-size)``. **Every guard ever used comes from it.**
* FILTERED_GUARDS: sampled guards that are listed (Guard, Valid), Running and not
  disabled for path bias; USABLE_FILTERED: those whose ``reachable`` is not ``no``.
* CONFIRMED_GUARDS: sampled guards through which a circuit (or directory fetch) once
  succeeded, in the order of confirmation (``confirmed_idx``).
* PRIMARY_GUARDS: ``guard-n-primary-guards`` (3) guards: the filtered confirmed ones in
  confirmation order, then earlier primary guards still filtered, then filtered sampled
  guards in sample order (tor's ``entry_guards_update_primary``).

Choosing (§4.6, tor's ``select_entry_guard_for_circuit``) — :meth:`GuardSelection.select`:
the first ``guard-n-primary-guards-to-use`` (1; ``guard-n-primary-dir-guards-to-use``, 3,
for directory fetches) primary guards whose ``reachable`` is not ``no`` and that pass the
circuit's restriction, one of them at random: the circuit is *usable_on_completion*.
Otherwise the first confirmed guard that is usable, not primary and not *pending* (a
circuit is already trying it), else the first such guard of the sample: the circuit is
*usable_if_no_better_guard*. If nothing is left, every guard is marked ``maybe`` and the
choice starts again from the top (tor fails that one circuit instead).

Outcomes (§4.7-4.9): a circuit whose guard cannot be reached marks it ``no``
(:meth:`circuit_failed`), retried per the schedules of :func:`retry_delay`. A circuit that
completes marks its guard ``yes`` and confirms it (:meth:`circuit_succeeded`); if it went
through a non-primary guard it becomes *waiting_for_better_guard*: it may carry streams
only once every primary guard is ``no`` and no circuit through a better guard (complete, or
usable_if_no_better_guard for less than ``guard-nonprimary-guard-connect-timeout``) is
around (:meth:`upgrade_waiting`); after ``guard-nonprimary-guard-idle-timeout`` the shell
closes it. A success through a non-primary guard after more than
``guard-internet-likely-down-interval`` without any success means the network was down,
not the primary guards: they are all marked ``maybe`` again ("when the network comes back").

:class:`GuardSelection` is the sans-IO core: every method takes ``now`` (wall-clock
seconds) and the consensus it needs; nothing reads a clock, a file or the network. GUARD
events (control-spec: NEW, UP, DOWN, DROPPED, GOOD_L, BAD_L) and "the persistent state
changed" are queued for the shell. :class:`GuardSet` is that shell: it owns the state file
(``guards.json``, our JSON with tor's state-file fields), reads the clock and the
consensus parameters, saves changes and passes events to its listeners. The circuit
manager (:mod:`onionp2p.client.circmgr`) reports circuit outcomes to it.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from onionp2p.client.pathbias import GuardPathBias
from onionp2p.client.pathsel import NodeSet, NoPathError, RandomSource, can_be_guard, weighted_choice
from onionp2p.defaults import GUARD_PARAM_RANGES, GUARD_RETRY_DIVISOR, GUARD_RETRY_DIVISOR_RANGE
from onionp2p.listeners import Listeners
from onionp2p.log import get_logger
from onionp2p.proto.directory import RouterStatus

__all__ = ["GuardSet", "GuardSelection", "GuardEntry", "GuardParams", "GuardCircuit", "NoGuardError",
           "GUARD_LIFETIME", "REMOVE_UNLISTED_AFTER", "retry_delay",
           "YES", "NO", "MAYBE", "ON_COMPLETION", "IF_NO_BETTER", "WAITING", "COMPLETE"]

log = get_logger("onionp2p.guards")

DAY = 86400.0
STATE_VERSION = 2

GUARD_LIFETIME = GUARD_PARAM_RANGES["guard-lifetime-days"][0] * DAY
REMOVE_UNLISTED_AFTER = GUARD_PARAM_RANGES["guard-remove-unlisted-guards-after-days"][0] * DAY

# reachability (guard-spec's is_reachable)
YES, NO, MAYBE = "yes", "no", "maybe"
# circuit guard states (guard-spec §4.6)
ON_COMPLETION = "usable_on_completion"
IF_NO_BETTER = "usable_if_no_better_guard"
WAITING = "waiting_for_better_guard"
COMPLETE = "complete"

# tor's get_retry_schedule: (failing for less than, primary delay, non-primary delay)
_SCHEDULE = ((6 * 3600, 600, 3600), (4 * DAY, 90 * 60, 4 * 3600), (7 * DAY, 4 * 3600, 18 * 3600),
             (float("inf"), 9 * 3600, 36 * 3600))


def retry_delay(failing_for: float, *, primary: bool, divisor: int = 1) -> float:
    """Seconds between attempts to reach a guard that has been failing for ``failing_for``
    seconds (guard-spec §4.7: primary guards every 10 min for the first 6 h, 90 min until
    4 days, 4 h until 7 days, then 9 h; others 1 h, 4 h, 18 h, 36 h)."""
    for limit, p, other in _SCHEDULE:
        if failing_for < limit:
            return (p if primary else other) / divisor
    raise AssertionError("unreachable")


class NoGuardError(NoPathError):
    """No sampled guard is usable for this circuit."""

    def __init__(self, message: str, reason: str = "NOPATH"):
        super().__init__(message, reason)


@dataclass(frozen=True)
class GuardParams:
    """The guard algorithm's parameters: tor's consensus parameters (with tor's defaults
    and bounds, :data:`GUARD_PARAM_RANGES`), then the client's overrides."""

    lifetime: float = GUARD_LIFETIME
    confirmed_min_lifetime: float = 60 * DAY
    remove_unlisted_after: float = REMOVE_UNLISTED_AFTER
    max_sample_size: int = 60
    max_sample_threshold: float = 0.20
    min_filtered_sample_size: int = 20
    n_primary: int = 3
    n_primary_to_use: int = 1
    n_primary_dir_to_use: int = 3
    internet_likely_down_interval: float = 600.0
    nonprimary_connect_timeout: float = 15.0
    nonprimary_idle_timeout: float = 600.0
    retry_divisor: int = 1

    @classmethod
    def from_consensus(cls, params: Mapping[str, int], overrides: Mapping[str, int] | None = None, *,
                       n_primary: int = 0) -> GuardParams:
        """``params``: the consensus's; ``overrides``: the client's ``guard_params`` (same
        names, same bounds, plus ``guard-retry-divisor``); ``n_primary``: tor's
        NumPrimaryGuards (0: the consensus's ``guard-n-primary-guards``)."""
        merged = {k: v for k, v in params.items() if k in GUARD_PARAM_RANGES}
        merged.update(overrides or {})
        v = {}
        for name, (default, lo, hi) in GUARD_PARAM_RANGES.items():
            v[name] = min(max(int(merged.get(name, default)), lo), hi)
        lo, hi = GUARD_RETRY_DIVISOR_RANGE
        divisor = min(max(int((overrides or {}).get(GUARD_RETRY_DIVISOR, 1)), lo), hi)
        return cls(
            lifetime=v["guard-lifetime-days"] * DAY,
            confirmed_min_lifetime=v["guard-confirmed-min-lifetime-days"] * DAY,
            remove_unlisted_after=v["guard-remove-unlisted-guards-after-days"] * DAY,
            max_sample_size=v["guard-max-sample-size"],
            max_sample_threshold=v["guard-max-sample-threshold-percent"] / 100,
            min_filtered_sample_size=v["guard-min-filtered-sample-size"],
            n_primary=n_primary or v["guard-n-primary-guards"],
            n_primary_to_use=v["guard-n-primary-guards-to-use"],
            n_primary_dir_to_use=v["guard-n-primary-dir-guards-to-use"],
            internet_likely_down_interval=float(v["guard-internet-likely-down-interval"]),
            nonprimary_connect_timeout=float(v["guard-nonprimary-guard-connect-timeout"]),
            nonprimary_idle_timeout=float(v["guard-nonprimary-guard-idle-timeout"]),
            retry_divisor=divisor,
        )

    def max_sample(self, n_guards: int) -> int:
        """tor's ``get_max_sample_size`` for a consensus with ``n_guards`` possible guards."""
        limit = min(int(n_guards * self.max_sample_threshold), self.max_sample_size)
        return max(limit, self.min_filtered_sample_size)


def _fp_ok(fp: object) -> bool:
    return isinstance(fp, str) and len(fp) == 40 and all(c in "0123456789ABCDEF" for c in fp)


def _opt_float(d: Mapping, key: str) -> float | None:
    v = d.get(key)
    return None if v is None else float(v)


@dataclass
class GuardEntry:
    """One sampled guard. Persisted: tor's state-file ``Guard`` fields (``sampled_on``,
    ``sampled_by``, ``sampled_idx``, ``listed``, ``unlisted_since``, ``confirmed_on``,
    ``confirmed_idx``) and the path-bias counts; the rest lives in memory only, as in tor."""

    fingerprint: str
    nickname: str
    sampled_on: float
    sampled_by: str = "onionp2p"
    sampled_idx: int = 0
    listed: bool = True
    unlisted_since: float | None = None
    confirmed_on: float | None = None
    confirmed_idx: int | None = None
    #: path-bias counts (``path_bias`` in the state file)
    pb: GuardPathBias = field(default_factory=GuardPathBias)
    # -- not persisted --
    reachable: str = MAYBE
    failing_since: float | None = None
    last_tried: float | None = None
    pending: bool = False
    primary: bool = False
    filtered: bool = False

    @property
    def added_at(self) -> float:
        """The state-file version 1 name of :attr:`sampled_on`."""
        return self.sampled_on

    @property
    def confirmed(self) -> bool:
        return self.confirmed_idx is not None

    @property
    def usable_filtered(self) -> bool:
        return self.filtered and self.reachable != NO

    @classmethod
    def from_dict(cls, d: dict, idx: int) -> GuardEntry:
        """Version 2 entries, and version 1 ones (``added_at``; nothing confirmed)."""
        fp = d["fingerprint"]
        if not _fp_ok(fp):
            raise ValueError("bad fingerprint")
        unlisted = _opt_float(d, "unlisted_since")
        sampled_on = float(d["sampled_on"] if "sampled_on" in d else d["added_at"])
        cidx = d.get("confirmed_idx")
        if cidx is not None and (isinstance(cidx, bool) or not isinstance(cidx, int) or cidx < 0):
            raise ValueError("bad confirmed_idx")
        confirmed_on = _opt_float(d, "confirmed_on")
        if (cidx is None) != (confirmed_on is None):
            raise ValueError("confirmed_on and confirmed_idx go together")
        return cls(fp, str(d.get("nickname", "")), sampled_on,
                   sampled_by=str(d.get("sampled_by", "onionp2p (guards.json version 1)")),
                   sampled_idx=int(d.get("sampled_idx", idx)), listed=bool(d.get("listed", unlisted is None)),
                   unlisted_since=unlisted, confirmed_on=confirmed_on, confirmed_idx=cidx,
                   pb=GuardPathBias.from_dict(d.get("path_bias", {})))

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "nickname": self.nickname, "sampled_on": self.sampled_on,
                "sampled_by": self.sampled_by, "sampled_idx": self.sampled_idx, "listed": self.listed,
                "unlisted_since": self.unlisted_since, "confirmed_on": self.confirmed_on,
                "confirmed_idx": self.confirmed_idx, "path_bias": self.pb.to_dict()}

    def copy(self) -> GuardEntry:
        return replace(self, pb=GuardPathBias.from_dict(self.pb.to_dict()))


@dataclass(eq=False)
class GuardCircuit:
    """A circuit's guard state (tor's ``circuit_guard_state_t``). ``restriction``: the guards
    this circuit could not have used (its exit's and middle's family and network), which
    a better circuit must not need either to block it."""

    guard: str
    state: str
    state_since: float
    restriction: frozenset[str] = frozenset()
    usage: str = "circuit"


class GuardSelection:
    """The sans-IO guard-spec core. See the module docstring.

    ``events`` collects ``(fingerprint, nickname, status)`` GUARD events and ``changed``
    says the persistent state changed; the shell takes both.
    """

    def __init__(self, entries: Iterable[GuardEntry] = (), *, rng: RandomSource | None = None,
                 params: GuardParams | None = None, version: str = "onionp2p"):
        self.rng: RandomSource = rng if rng is not None else random.SystemRandom()
        #: written as ``sampled_by`` of new guards (tor's ``sampled_by`` version)
        self.version = version
        self.params = params or GuardParams()
        self.entries: list[GuardEntry] = []
        seen: set[str] = set()
        for e in sorted(entries, key=lambda e: e.sampled_idx):
            if e.fingerprint not in seen:
                seen.add(e.fingerprint)
                self.entries.append(e)
        for i, e in enumerate(self.entries):
            e.sampled_idx = i
        #: tor's ExcludeNodes: sampled guards it names are not filtered (never used)
        self.exclude_nodes = NodeSet()
        self.primary: list[GuardEntry] = []
        self.last_time_on_internet: float | None = None
        self.circuits: list[GuardCircuit] = []
        self.events: list[tuple[str, str, str]] = []
        self.changed = False
        self._renumber_confirmed()

    # -- lookups -------------------------------------------------------------------------------

    def get(self, fingerprint: str) -> GuardEntry | None:
        fp = fingerprint.upper().lstrip("$")
        return next((e for e in self.entries if e.fingerprint == fp), None)

    @property
    def confirmed(self) -> list[GuardEntry]:
        """CONFIRMED_GUARDS in confirmation order."""
        return sorted((e for e in self.entries if e.confirmed), key=lambda e: e.confirmed_idx or 0)

    def _event(self, e: GuardEntry, status: str) -> None:
        self.events.append((e.fingerprint, e.nickname, status))

    def _renumber_confirmed(self) -> None:
        for i, e in enumerate(self.confirmed):
            if e.confirmed_idx != i:
                e.confirmed_idx = i
                self.changed = True

    def _randomized(self, now: float, window: float) -> float:
        """tor's ``randomize_time``: a moment within ``window`` before ``now``, so the
        dates in the state file do not tell when the client really did something."""
        return now - self.rng.randrange(int(window) + 1)

    # -- consensus -----------------------------------------------------------------------------

    def update(self, routers: Sequence[RouterStatus], now: float,
               bw_weights: Mapping[str, int] | None = None) -> dict[str, RouterStatus]:
        """A (possibly new) consensus: listedness, expiry, filter, sample expansion and the
        primary guards. Returns the filtered guards' statuses by fingerprint."""
        p = self.params
        by_fp = {rs.fingerprint: rs for rs in routers}
        kept: list[GuardEntry] = []
        for e in self.entries:
            rs = by_fp.get(e.fingerprint)
            listed = rs is not None and "Guard" in rs.flags and "Valid" in rs.flags
            if listed and not e.listed:
                e.listed, e.unlisted_since, self.changed = True, None, True
                self._event(e, "GOOD_L")
            elif not listed and e.listed:
                e.listed, self.changed = False, True
                e.unlisted_since = self._randomized(now, p.remove_unlisted_after / 5)
                self._event(e, "BAD_L")
            elif not listed and e.unlisted_since is None:
                e.unlisted_since, self.changed = now, True
            if listed and rs is not None and e.nickname != rs.nickname:
                e.nickname, self.changed = rs.nickname, True
            why = self._obsolete(e, now)
            if why:
                log.info(f"guard {why}; dropping it from the sample", guard=e.nickname)
                self._event(e, "DROPPED")
                self.changed = True
                continue
            kept.append(e)
        if len(kept) != len(self.entries):
            dropped = {e.fingerprint for e in self.entries} - {e.fingerprint for e in kept}
            self.circuits = [c for c in self.circuits if c.guard not in dropped]
            self.entries = kept
            self._renumber_confirmed()
        self._filter(by_fp)
        self._expand(routers, now, bw_weights)
        self._update_primary()
        return {e.fingerprint: by_fp[e.fingerprint] for e in self.entries if e.filtered}

    def _obsolete(self, e: GuardEntry, now: float) -> str:
        """tor's ``sampled_guards_prune_obsolete_entries``: why ``e`` leaves the sample ('' if not)."""
        p = self.params
        if not e.listed and e.unlisted_since is not None and e.unlisted_since < now - p.remove_unlisted_after:
            return "has been unlisted too long"
        if e.sampled_on < now - p.lifetime:
            if e.confirmed_on is None:
                return "was sampled long ago and never confirmed"
            if e.confirmed_on < now - p.confirmed_min_lifetime:
                return "was sampled and confirmed long ago"
        return ""

    def _filter(self, by_fp: Mapping[str, RouterStatus]) -> None:
        """FILTERED_GUARDS: listed, Running, not in ExcludeNodes and not disabled for path
        bias (tor's ``entry_guard_passes_filter``; we have no EntryNodes/bridges)."""
        for e in self.entries:
            rs = by_fp.get(e.fingerprint)
            e.filtered = (e.listed and rs is not None and "Running" in rs.flags and not e.pb.disabled
                          and not self.exclude_nodes.contains(rs))

    def _expand(self, routers: Sequence[RouterStatus], now: float,
                bw_weights: Mapping[str, int] | None) -> None:
        """tor's ``entry_guards_expand_sample``: sample new guards while fewer than
        ``min_filtered_sample_size`` sampled guards are usable, up to the maximum sample."""
        p = self.params
        eligible = [rs for rs in routers if can_be_guard(rs)]
        limit = p.max_sample(len(eligible))
        have = {e.fingerprint for e in self.entries}
        candidates = [rs for rs in eligible if rs.fingerprint not in have]
        while sum(1 for e in self.entries if e.usable_filtered) < p.min_filtered_sample_size:
            if len(self.entries) >= limit:
                log.debug("not expanding the guard sample: at its maximum", size=len(self.entries))
                return
            if not candidates:
                return
            rs = weighted_choice(candidates, "guard", self.rng, bw_weights)
            candidates.remove(rs)
            idx = max((e.sampled_idx for e in self.entries), default=-1) + 1
            e = GuardEntry(rs.fingerprint, rs.nickname, self._randomized(now, p.lifetime / 10),
                           sampled_by=self.version, sampled_idx=idx)
            e.filtered = "Running" in rs.flags and not self.exclude_nodes.contains(rs)
            self.entries.append(e)
            self.changed = True
            self._event(e, "NEW")
            log.info("sampled a new guard", guard=rs.nickname, sample_size=len(self.entries))

    def _update_primary(self) -> None:
        """tor's ``entry_guards_update_primary``: confirmed filtered guards first, then
        earlier primary guards still filtered, then filtered guards in sample order."""
        n = self.params.n_primary
        new: list[GuardEntry] = [e for e in self.confirmed if e.filtered][:n]
        for e in self.primary:
            if len(new) < n and e.filtered and e not in new and e in self.entries:
                new.append(e)
        for e in self.entries:
            if len(new) >= n:
                break
            if e.filtered and e not in new and not e.confirmed:
                new.append(e)
        if [e.fingerprint for e in new] != [e.fingerprint for e in self.primary]:
            log.info("primary guards", guards=[e.nickname for e in new])
        for e in self.entries:
            e.primary = False
        for e in new:
            e.primary = True
        self.primary = new

    # -- reachability --------------------------------------------------------------------------

    def consider_retry(self, e: GuardEntry, now: float) -> None:
        """tor's ``entry_guard_consider_retry``: a guard marked ``no`` becomes ``maybe`` once
        its retry interval has passed since the last attempt."""
        if e.reachable != NO:
            return
        since = e.failing_since if e.failing_since is not None else now
        last = e.last_tried if e.last_tried is not None else since
        if now >= last + retry_delay(now - since, primary=e.primary, divisor=self.params.retry_divisor):
            e.reachable = MAYBE

    def note_failure(self, e: GuardEntry, now: float) -> None:
        """tor's ``entry_guards_note_guard_failure``: the guard could not be reached."""
        if e.reachable != NO:
            self._event(e, "DOWN")
        e.reachable = NO
        e.pending = False
        if e.failing_since is None:
            e.failing_since = now
        e.last_tried = now  # the retry interval counts from the last failed attempt
        retry = retry_delay(now - e.failing_since, primary=e.primary, divisor=self.params.retry_divisor)
        log.info("guard is unreachable", guard=e.nickname, primary=e.primary, retry_in=retry)

    def note_success(self, e: GuardEntry, state: str, now: float) -> str:
        """tor's ``entry_guards_note_guard_success``: the guard works. Returns the circuit's
        new state (COMPLETE, or WAITING for a non-primary guard's circuit)."""
        last_online = self.last_time_on_internet
        self.last_time_on_internet = now
        if e.reachable != YES:
            self._event(e, "UP")
        e.reachable = YES
        e.failing_since = None
        e.pending = False
        if not e.confirmed:
            e.confirmed_on = self._randomized(now, self.params.lifetime / 10)
            e.confirmed_idx = max((c.confirmed_idx or 0 for c in self.confirmed), default=-1) + 1
            self.changed = True
            log.info("guard confirmed", guard=e.nickname, confirmed_idx=e.confirmed_idx)
            self._update_primary()
        if state in (ON_COMPLETION, COMPLETE) or e.primary:
            new = COMPLETE
        else:
            new = WAITING
        if not e.primary and (last_online is None
                              or last_online + self.params.internet_likely_down_interval < now):
            # nothing succeeded for a while: the network was down, not the primary guards
            self.mark_primary_maybe()
        return new

    def mark_primary_maybe(self) -> None:
        """tor's ``mark_primary_guards_maybe_reachable``."""
        for e in self.primary:
            if e.reachable == NO:
                e.reachable = MAYBE
        log.info("the network seems to be back; retrying the primary guards")

    def mark_all_maybe(self) -> None:
        """tor's ``mark_all_guards_maybe_reachable``."""
        for e in self.entries:
            if e.reachable == NO:
                e.reachable = MAYBE

    def all_primary_down(self, now: float) -> bool:
        """tor's ``entry_guards_all_primary_guards_are_down``."""
        for e in self.primary:
            self.consider_retry(e, now)
            if e.reachable != NO:
                return False
        return True

    # -- choosing --------------------------------------------------------------------------------

    def select(self, routers: Sequence[RouterStatus], now: float, *, exclude: Collection[str] = (),
               usage: str = "circuit", bw_weights: Mapping[str, int] | None = None,
               ) -> tuple[RouterStatus, GuardCircuit]:
        """The guard for a new circuit (``usage`` "circuit") or directory fetch ("dir").
        ``exclude``: fingerprints the circuit cannot use (its restriction; they are skipped,
        nothing is marked). Raises :class:`NoGuardError`."""
        skip = frozenset(f.upper().lstrip("$") for f in exclude)
        filtered = self.update(routers, now, bw_weights)
        if not filtered and not any(can_be_guard(rs) for rs in routers):
            raise NoGuardError("no usable guard in the consensus")
        for attempt in range(2):
            got = self._select(routers, now, skip, usage, bw_weights)
            if got is not None:
                e, state = got
                c = GuardCircuit(e.fingerprint, state, now, usage=usage)
                self.circuits.append(c)
                return filtered[e.fingerprint], c
            if any(e.usable_filtered and e.fingerprint in skip for e in self.entries):
                # usable guards exist, only not for this circuit: that says nothing about
                # the others' reachability (the caller tries another exit or tier)
                raise NoGuardError("every usable guard is excluded for this circuit")
            if attempt == 0:
                log.info("no sampled guard is available; marking all guards for retry")
                self.mark_all_maybe()
        raise NoGuardError("no sampled guard is usable")

    def _select(self, routers: Sequence[RouterStatus], now: float, skip: frozenset[str], usage: str,
                bw_weights: Mapping[str, int] | None) -> tuple[GuardEntry, str] | None:
        n = self.params.n_primary_to_use if usage == "circuit" else self.params.n_primary_dir_to_use
        usable: list[GuardEntry] = []
        for e in self.primary:
            if e.fingerprint in skip:
                continue
            self.consider_retry(e, now)
            if e.reachable != NO:
                usable.append(e)
                if len(usable) >= n:
                    break
        if usable:
            e = usable[self.rng.randrange(len(usable))]
            e.last_tried = now
            return e, ON_COMPLETION
        for e in self.confirmed:
            if e.primary or e.fingerprint in skip:
                continue
            self.consider_retry(e, now)
            if e.usable_filtered and not e.pending:
                e.pending, e.last_tried = True, now
                return e, IF_NO_BETTER
        for retry in range(2):
            for e in self.entries:
                if e.confirmed or e.primary or e.pending or e.fingerprint in skip:
                    continue
                self.consider_retry(e, now)
                if e.usable_filtered:
                    e.pending, e.last_tried = True, now
                    return e, IF_NO_BETTER
            if retry == 0:  # tor's first_reachable_filtered_entry_guard expands the sample first
                self._expand(routers, now, bw_weights)
        return None

    def dir_guards(self, routers: Sequence[RouterStatus], now: float,
                   bw_weights: Mapping[str, int] | None = None) -> list[RouterStatus]:
        """Guards for a directory fetch, best first (directory guards: the same sample, the
        first ``guard-n-primary-dir-guards-to-use`` usable primary guards in random order,
        else the guard :meth:`select` gives). Nothing is registered as a circuit."""
        filtered = self.update(routers, now, bw_weights)
        usable = []
        for e in self.primary:
            self.consider_retry(e, now)
            if e.reachable != NO:
                usable.append(e)
        usable = usable[: self.params.n_primary_dir_to_use]
        order: list[GuardEntry] = []
        while usable:
            order.append(usable.pop(self.rng.randrange(len(usable))))
        if order:
            return [filtered[e.fingerprint] for e in order]
        try:
            rs, c = self.select(routers, now, usage="dir", bw_weights=bw_weights)
        except NoGuardError:
            return []
        self.release(c)
        return [rs]

    # -- circuits --------------------------------------------------------------------------------

    def release(self, c: GuardCircuit) -> None:
        """The circuit is gone (or its guard was not used after all: tor's
        ``entry_guard_cancel``)."""
        if c in self.circuits:
            self.circuits.remove(c)
            e = self.get(c.guard)
            if e is not None and c.state == IF_NO_BETTER:
                e.pending = False

    def circuit_failed(self, c: GuardCircuit, now: float) -> None:
        """The circuit could not reach its guard (tor's ``entry_guard_failed``)."""
        self.release(c)
        e = self.get(c.guard)
        if e is not None:
            self.note_failure(e, now)
        c.state = "failed"

    def circuit_succeeded(self, c: GuardCircuit, now: float) -> str:
        """The circuit completed through its guard (tor's ``entry_guard_succeeded``):
        COMPLETE (use it) or WAITING (wait for a better guard)."""
        e = self.get(c.guard)
        if e is None:  # dropped from the sample meanwhile
            c.state = COMPLETE
            return COMPLETE
        c.state, c.state_since = self.note_success(e, c.state, now), now
        if c not in self.circuits:
            self.circuits.append(c)
        return c.state

    def _priority(self, fp: str) -> tuple[int, int]:
        """Lower is better (tor's ``entry_guard_has_higher_priority``): confirmed guards by
        confirmation order, then the others by sample order."""
        e = self.get(fp)
        if e is None:
            return (2, 0)
        return (0, e.confirmed_idx) if e.confirmed_idx is not None else (1, e.sampled_idx)

    def upgrade_waiting(self, now: float) -> list[GuardCircuit]:
        """tor's ``entry_guards_upgrade_waiting_circuits`` (guard-spec §4.9): the waiting
        circuits that may now be used (set to COMPLETE)."""
        waiting = [c for c in self.circuits if c.state == WAITING]
        if not waiting or not self.all_primary_down(now):
            return []
        best = min(waiting, key=lambda c: self._priority(c.guard))
        best_prio = self._priority(best.guard)
        cutoff = now - self.params.nonprimary_connect_timeout
        for c in self.circuits:
            blocks = c.state == COMPLETE or (c.state == IF_NO_BETTER and c.state_since > cutoff)
            if blocks and c.guard not in best.restriction and self._priority(c.guard) < best_prio:
                return []
        out = []
        for c in waiting:
            if self._priority(c.guard) == best_prio:
                c.state, c.state_since = COMPLETE, now
                out.append(c)
        return out

    def expired_waiting(self, now: float) -> list[GuardCircuit]:
        """Circuits that waited for a better guard longer than the idle timeout: the shell
        closes them (tor's guard-wait cutoff in ``circuit_expire_building``)."""
        cutoff = now - self.params.nonprimary_idle_timeout
        return [c for c in self.circuits if c.state == WAITING and c.state_since < cutoff]

    # -- persistence -----------------------------------------------------------------------------

    def to_state(self) -> dict:
        return {"version": STATE_VERSION, "guards": [e.to_dict() for e in self.entries]}

    @staticmethod
    def entries_from_state(data: Mapping) -> list[GuardEntry]:
        """The entries of a version 1 or 2 state (ValueError/KeyError/TypeError if bad)."""
        if data.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"unknown state version {data.get('version')!r}")
        return [GuardEntry.from_dict(d, i) for i, d in enumerate(data["guards"])]


class GuardSet:
    """The guard-spec shell: the state file, the clock, the consensus parameters, GUARD
    events. The circuit manager reports circuit outcomes here; everything else is
    :class:`GuardSelection`'s."""

    def __init__(self, state_file: Path | str, *, n_primary: int = 0, rng: RandomSource | None = None,
                 now: Callable[[], float] = time.time, max_sample: int | None = None,
                 bw_weights: Callable[[], Mapping[str, int]] | None = None,
                 params: Callable[[], Mapping[str, int]] | None = None,
                 overrides: Mapping[str, int] | None = None, version: str = "onionp2p"):
        if n_primary < 0:
            raise ValueError("n_primary must be >= 0 (0: the consensus's)")
        self.state_file = Path(state_file)
        self.now = now
        #: the current consensus's ``bandwidth-weights`` (none: plain bandwidth)
        self.bw_weights: Callable[[], Mapping[str, int]] = bw_weights or dict
        #: the current consensus's parameters
        self.consensus_params: Callable[[], Mapping[str, int]] = params or dict
        self.overrides = dict(overrides or {})
        if max_sample is not None:  # a fixed cap (tests): max and min sample size
            self.overrides.setdefault("guard-max-sample-size", max_sample)
            self.overrides.setdefault("guard-min-filtered-sample-size", max_sample)
        self.n_primary = n_primary
        #: GUARD events: ``fn(fingerprint, nickname, status)``
        self.events = Listeners("guard event")
        self._params_src: object = None
        self._dirty = False
        self.core = GuardSelection(self._load(), rng=rng, params=self._params(), version=version)
        self.core.changed = False

    @property
    def rng(self) -> RandomSource:
        return self.core.rng

    def _params(self) -> GuardParams:
        src = self.consensus_params()
        if src is not self._params_src:
            self._params_src = src
            self._cached = GuardParams.from_consensus(src, self.overrides, n_primary=self.n_primary)
        return self._cached

    # -- persistence --------------------------------------------------------------------------

    def _load(self) -> list[GuardEntry]:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return []
        try:
            return GuardSelection.entries_from_state(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            bad = self.state_file.with_name(self.state_file.name + ".bad")
            log.warning("guard state unreadable; starting a new sample", error=str(exc), moved_to=str(bad))
            os.replace(self.state_file, bad)
            return []

    def save(self) -> None:
        """Write the state: 0600 temporary file, fsync, atomic rename."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        body = json.dumps(self.core.to_state(), indent=1)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, body.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_file)
        self._dirty = self.core.changed = False

    def mark_dirty(self) -> None:
        """Something persisted changed (path-bias counts): :meth:`save_if_dirty` writes it."""
        self._dirty = True

    def save_if_dirty(self) -> None:
        if self._dirty or self.core.changed:
            self.save()

    def _flush(self) -> None:
        """After every core call: save a changed sample, pass on GUARD events."""
        if self.core.changed:
            self.save()
        events, self.core.events = self.core.events, []
        for fp, nick, status in events:
            self.events(fp, nick, status)

    # -- introspection ------------------------------------------------------------------------

    @property
    def params(self) -> GuardParams:
        return self.core.params

    @property
    def sampled(self) -> list[GuardEntry]:
        """The sample in order (copies)."""
        return [e.copy() for e in self.core.entries]

    def sampled_fingerprints(self) -> list[str]:
        return [e.fingerprint for e in self.core.entries]

    def path_bias(self, fingerprint: str) -> GuardPathBias | None:
        """The path-bias record of a sampled guard (None for any other relay)."""
        e = self.core.get(fingerprint)
        return None if e is None else e.pb

    def describe(self, fingerprint: str) -> str:
        """``nickname ($FINGERPRINT)`` of a sampled guard, as tor's ``entry_guard_describe``."""
        fp = fingerprint.upper().lstrip("$")
        e = self.core.get(fp)
        return f"{e.nickname} (${fp})" if e is not None and e.nickname else f"${fp}"

    def status(self, fingerprint: str) -> str:
        """GETINFO entry-guards status: up, down, never-connected, unusable or unlisted."""
        e = self.core.get(fingerprint)
        if e is None or not e.listed:
            return "unlisted"
        if not e.filtered:
            return "unusable"
        if self.is_down(e.fingerprint):
            return "down"
        return "up" if e.confirmed or e.reachable == YES else "never-connected"

    def update(self, routers: Iterable[RouterStatus]) -> dict[str, RouterStatus]:
        """Apply a consensus; returns the filtered sampled guards by fingerprint."""
        self.core.params = self._params()
        out = self.core.update(list(routers), self.now(), self.bw_weights())
        self._flush()
        return out

    def primary(self, routers: Iterable[RouterStatus]) -> list[str]:
        """Fingerprints of the current primary guards (after applying ``routers``)."""
        self.update(routers)
        return [e.fingerprint for e in self.core.primary]

    def confirmed(self) -> list[str]:
        return [e.fingerprint for e in self.core.confirmed]

    def is_down(self, fingerprint: str, now: float | None = None) -> bool:
        """Is the guard marked unreachable and not yet due for a retry?"""
        e = self.core.get(fingerprint)
        if e is None or e.reachable != NO:
            return False
        self.core.consider_retry(e, self.now() if now is None else now)
        return e.reachable == NO

    # -- choosing and outcomes --------------------------------------------------------------------

    def select(self, routers: Iterable[RouterStatus], *, exclude: Collection[str] = (),
               usage: str = "circuit") -> tuple[RouterStatus, GuardCircuit]:
        """The guard for a circuit and its guard state (see :meth:`GuardSelection.select`)."""
        self.core.params = self._params()
        try:
            return self.core.select(list(routers), self.now(), exclude=exclude, usage=usage,
                                    bw_weights=self.bw_weights())
        finally:
            self._flush()

    def pick(self, routers: Iterable[RouterStatus], *, exclude: Collection[str] = ()) -> RouterStatus:
        """The guard :meth:`select` would give, for a circuit that is not tracked (the
        control port's EXTENDCIRCUIT without a path)."""
        rs, c = self.select(routers, exclude=exclude)
        self.core.release(c)
        return rs

    def dir_guards(self, routers: Iterable[RouterStatus]) -> list[RouterStatus]:
        self.core.params = self._params()
        try:
            return self.core.dir_guards(list(routers), self.now(), self.bw_weights())
        finally:
            self._flush()

    def release(self, c: GuardCircuit) -> None:
        self.core.release(c)

    def circuit_failed(self, c: GuardCircuit) -> None:
        self.core.circuit_failed(c, self.now())
        self._flush()

    def circuit_succeeded(self, c: GuardCircuit) -> str:
        try:
            return self.core.circuit_succeeded(c, self.now())
        finally:
            self._flush()

    def upgrade_waiting(self) -> list[GuardCircuit]:
        return self.core.upgrade_waiting(self.now())

    def expired_waiting(self) -> list[GuardCircuit]:
        return self.core.expired_waiting(self.now())

    def mark_down(self, fingerprint: str, now: float | None = None) -> None:
        """The guard could not be reached outside a tracked circuit."""
        e = self.core.get(fingerprint)
        if e is not None:
            self.core.note_failure(e, self.now() if now is None else now)
            self._flush()

    def mark_up(self, fingerprint: str) -> None:
        """The guard worked outside a tracked circuit (a directory fetch): as a success."""
        e = self.core.get(fingerprint)
        if e is not None:
            self.core.note_success(e, COMPLETE if e.primary else IF_NO_BETTER, self.now())
            self._flush()

    def dir_result(self, fingerprint: str, ok: bool) -> None:
        """The outcome of a directory fetch through a directory guard."""
        (self.mark_up if ok else self.mark_down)(fingerprint)

