"""Entry guards: a small, persistent set of first hops (guard-spec; specs/pathsel.md).

Theory of operation
-------------------
Using a fresh random first hop for every circuit would, over time, hand some circuit
to every hostile relay on the network. A client therefore *samples* a few guards once,
remembers them across restarts, and builds every circuit through the first usable one.

:class:`GuardSet` keeps the **sample**: an ordered list of guards (fingerprint,
nickname, ``added_at``, ``unlisted_since``), persisted as JSON in ``state_file``
(mode 0600, written to a temporary file and atomically renamed over the old one).

* A guard is *listed* when the current consensus has it with flags ``Guard`` and
  ``Valid``; it is *usable* when it is also ``Running`` and not marked down.
* The **primary guards** are the first ``n_primary`` (default 3) listed guards of the
  sample, in sample order. :meth:`GuardSet.pick` returns the first usable primary
  guard; if none is usable it tries the other listed sampled guards, and only then
  samples one more (bandwidth-weighted, never beyond ``max_sample``).
* Refill: whenever fewer than ``n_primary`` sampled guards are listed, new ones are
  sampled from the consensus (flags ``Guard``, ``Running``, ``Valid``; weighted as tor
  samples guards: bandwidth times the consensus guard-position weights ``Wgg``/``Wgd``,
  with :func:`~onionp2p.client.pathsel.weighted_choice`; ``bw_weights`` gives the current
  consensus's ``bandwidth-weights``).
* Expiry: a guard leaves the sample ``lifetime`` (120 days) after ``added_at``, which is
  set to a random moment in the ``lifetime/10`` before the guard was really added (as
  guard-spec does, so the sample dates do not reveal when the client started); and
  when it has been unlisted for 20 days.
* Path bias (:mod:`onionp2p.client.pathbias`): each sampled guard carries its
  :class:`~onionp2p.client.pathbias.GuardPathBias` counts, persisted with it. A guard
  *disabled for path bias* (``pb_dropguards``) counts as not listed: it is never picked
  and is no primary guard (tor's ``entry_guard_passes_filter``), so the sample is refilled
  around it; it stays in the sample (and disabled) until it expires.
* Reachability is not persisted (as in tor): :meth:`mark_down` makes a guard unusable
  until a retry time taken from guard-spec's legacy schedules (primary: every 10 min for
  6 h, then 90 min for 90 h, 4 h for 3 days, then 9 h; others: 1 h, 4 h, 18 h, 36 h);
  :meth:`mark_up` clears it. If every candidate is down, all are marked retriable and
  the first listed one is returned (tor does the same, so a client whose network was
  down recovers at once).

The clock (``now``, wall-clock seconds) and the random source are injected.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onionp2p.client.pathbias import GuardPathBias
from onionp2p.client.pathsel import NoPathError, RandomSource, can_be_guard, weighted_choice
from onionp2p.log import get_logger
from onionp2p.proto.directory import RouterStatus

__all__ = ["GuardSet", "GuardEntry", "NoGuardError", "GUARD_LIFETIME", "REMOVE_UNLISTED_AFTER",
           "retry_delay"]

log = get_logger("onionp2p.guards")

DAY = 86400.0
GUARD_LIFETIME = 120 * DAY
REMOVE_UNLISTED_AFTER = 20 * DAY
MAX_SAMPLE = 20
STATE_VERSION = 1

# (failing for less than this many seconds, retry every this many seconds)
_PRIMARY_SCHEDULE = ((6 * 3600, 600), (96 * 3600, 5400), (168 * 3600, 4 * 3600), (float("inf"), 9 * 3600))
_OTHER_SCHEDULE = ((6 * 3600, 3600), (96 * 3600, 4 * 3600), (168 * 3600, 18 * 3600),
                   (float("inf"), 36 * 3600))


def retry_delay(failing_for: float, *, primary: bool) -> float:
    """Seconds until a guard that has been failing for ``failing_for`` seconds is retried."""
    for limit, delay in _PRIMARY_SCHEDULE if primary else _OTHER_SCHEDULE:
        if failing_for < limit:
            return float(delay)
    raise AssertionError("unreachable")


class NoGuardError(NoPathError):
    """No sampled or sampleable guard is usable."""

    def __init__(self, message: str, reason: str = "NOPATH"):
        super().__init__(message, reason)


@dataclass
class GuardEntry:
    """One sampled guard as persisted."""

    fingerprint: str
    nickname: str
    added_at: float
    unlisted_since: float | None = None
    #: path-bias counts (``path_bias`` in the state file)
    pb: GuardPathBias = field(default_factory=GuardPathBias)

    @classmethod
    def from_dict(cls, d: dict) -> GuardEntry:
        fp = d["fingerprint"]
        if not (isinstance(fp, str) and len(fp) == 40 and all(c in "0123456789ABCDEF" for c in fp)):
            raise ValueError("bad fingerprint")
        unlisted = d.get("unlisted_since")
        return cls(fp, str(d.get("nickname", "")), float(d["added_at"]),
                   None if unlisted is None else float(unlisted), GuardPathBias.from_dict(d.get("path_bias", {})))

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "nickname": self.nickname, "added_at": self.added_at,
                "unlisted_since": self.unlisted_since, "path_bias": self.pb.to_dict()}

    def copy(self) -> GuardEntry:
        return GuardEntry.from_dict(self.to_dict())


@dataclass
class _Down:
    failing_since: float
    retry_at: float


class GuardSet:
    """The persistent guard sample and the choice of the guard for the next circuit."""

    def __init__(self, state_file: Path | str, *, n_primary: int = 3, rng: RandomSource | None = None,
                 now: Callable[[], float] = time.time, lifetime: float = GUARD_LIFETIME,
                 max_sample: int = MAX_SAMPLE, bw_weights: Callable[[], Mapping[str, int]] | None = None):
        if n_primary < 1 or max_sample < n_primary:
            raise ValueError("need 1 <= n_primary <= max_sample")
        self.state_file = Path(state_file)
        self.n_primary = n_primary
        self.rng: RandomSource = rng if rng is not None else random.SystemRandom()
        self.now = now
        self.lifetime = lifetime
        self.max_sample = max_sample
        #: the current consensus's ``bandwidth-weights`` (none: plain bandwidth)
        self.bw_weights: Callable[[], Mapping[str, int]] = bw_weights or dict
        self._sample: list[GuardEntry] = []
        self._down: dict[str, _Down] = {}
        self._primary: set[str] = set()
        self._dirty = False
        self._load()

    # -- persistence --------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return
        try:
            data = json.loads(text)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {data.get('version')!r}")
            entries = [GuardEntry.from_dict(d) for d in data["guards"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            bad = self.state_file.with_name(self.state_file.name + ".bad")
            log.warning("guard state unreadable; starting a new sample", error=str(exc), moved_to=str(bad))
            os.replace(self.state_file, bad)
            return
        seen: set[str] = set()
        for e in entries:
            if e.fingerprint not in seen:
                seen.add(e.fingerprint)
                self._sample.append(e)

    def save(self) -> None:
        """Write the sample: 0600 temporary file, fsync, atomic rename."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        body = json.dumps({"version": STATE_VERSION, "guards": [e.to_dict() for e in self._sample]}, indent=1)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, body.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_file)
        self._dirty = False

    def mark_dirty(self) -> None:
        """Something persisted changed (path-bias counts): :meth:`save_if_dirty` writes it."""
        self._dirty = True

    def save_if_dirty(self) -> None:
        if self._dirty:
            self.save()

    # -- introspection ------------------------------------------------------------------------

    @property
    def sampled(self) -> list[GuardEntry]:
        """The sample in order (copies)."""
        return [e.copy() for e in self._sample]

    def path_bias(self, fingerprint: str) -> GuardPathBias | None:
        """The path-bias record of a sampled guard (None for any other relay)."""
        fp = fingerprint.upper()
        for e in self._sample:
            if e.fingerprint == fp:
                return e.pb
        return None

    def describe(self, fingerprint: str) -> str:
        """``nickname ($FINGERPRINT)`` of a sampled guard, as tor's ``entry_guard_describe``."""
        fp = fingerprint.upper()
        nick = next((e.nickname for e in self._sample if e.fingerprint == fp), "")
        return f"{nick} (${fp})" if nick else f"${fp}"

    def primary(self, routers: Iterable[RouterStatus]) -> list[str]:
        """Fingerprints of the current primary guards (updates the sample first)."""
        listed = self.update(routers)
        return [e.fingerprint for e in self._sample if e.fingerprint in listed][: self.n_primary]

    def is_down(self, fingerprint: str, now: float | None = None) -> bool:
        down = self._down.get(fingerprint.upper())
        return down is not None and (self.now() if now is None else now) < down.retry_at

    # -- maintenance ----------------------------------------------------------------------------

    def update(self, routers: Iterable[RouterStatus]) -> dict[str, RouterStatus]:
        """Expire, track listedness and refill against the current consensus.

        Returns the listed sampled guards by fingerprint. Saves the state if it changed.
        """
        now = self.now()
        by_fp = {rs.fingerprint: rs for rs in routers}
        changed = False
        kept: list[GuardEntry] = []
        for e in self._sample:
            rs = by_fp.get(e.fingerprint)
            listed = rs is not None and "Guard" in rs.flags and "Valid" in rs.flags
            if listed and e.unlisted_since is not None:
                e.unlisted_since, changed = None, True
            elif not listed and e.unlisted_since is None:
                e.unlisted_since, changed = now, True
            if now >= e.added_at + self.lifetime:
                log.info("guard reached its lifetime; dropping it", guard=e.nickname)
                changed = True
            elif e.unlisted_since is not None and now >= e.unlisted_since + REMOVE_UNLISTED_AFTER:
                log.info("guard unlisted too long; dropping it", guard=e.nickname)
                changed = True
            else:
                if listed and rs is not None:
                    e.nickname = rs.nickname
                kept.append(e)
        self._sample = kept
        # a guard disabled for path bias does not pass the filter: never primary, never picked
        listed = {e.fingerprint: by_fp[e.fingerprint] for e in kept
                  if e.unlisted_since is None and not e.pb.disabled}
        while len(listed) < self.n_primary and len(self._sample) < self.max_sample:
            new = self._sample_one(by_fp.values(), now)
            if new is None:
                break
            listed[new.fingerprint] = new
            changed = True
        in_order = [e.fingerprint for e in self._sample if e.fingerprint in listed]
        self._primary = set(in_order[: self.n_primary])
        if changed:
            self.save()
        return listed

    def _sample_one(self, routers: Iterable[RouterStatus], now: float) -> RouterStatus | None:
        have = {e.fingerprint for e in self._sample}
        candidates = [rs for rs in routers if can_be_guard(rs) and rs.fingerprint not in have]
        if not candidates:
            return None
        rs = weighted_choice(candidates, "guard", self.rng, self.bw_weights())
        backdate = self.rng.randrange(int(self.lifetime / 10) + 1)
        self._sample.append(GuardEntry(rs.fingerprint, rs.nickname, now - backdate))
        log.info("sampled a new guard", guard=rs.nickname, sample_size=len(self._sample))
        return rs

    # -- choosing -------------------------------------------------------------------------------

    def pick(self, routers: Iterable[RouterStatus], *, exclude: Collection[str] = ()) -> RouterStatus:
        """The guard for the next circuit: the first usable primary guard, else another one.

        ``exclude`` (fingerprints) skips guards that cannot serve this particular circuit
        (e.g. the only exit for a port); it never causes new guards to be sampled.
        Raises :class:`NoGuardError`.
        """
        routers = list(routers)
        now = self.now()
        skip = {f.upper().lstrip("$") for f in exclude}
        listed = self.update(routers)
        order = [e.fingerprint for e in self._sample if e.fingerprint in listed and e.fingerprint not in skip]

        def usable(fp: str) -> bool:
            return "Running" in listed[fp].flags and not self.is_down(fp, now)

        for fp in order:
            if usable(fp):
                return listed[fp]
        if any(usable(fp) for fp in listed):
            raise NoGuardError("every usable guard is excluded for this circuit")
        # every listed guard is down or not running: widen the sample by one
        if len(self._sample) < self.max_sample:
            new = self._sample_one(routers, now)
            if new is not None:
                self.save()
                if new.fingerprint not in skip:
                    return new
        running = [fp for fp in order if "Running" in listed[fp].flags]
        if running:
            log.info("all guards are marked down; marking them retriable")
            for fp in running:
                self._down.pop(fp, None)
            return listed[running[0]]
        raise NoGuardError("no usable guard in the consensus")

    def mark_down(self, fingerprint: str, now: float | None = None) -> None:
        """We could not connect to this guard: do not use it until its retry time."""
        fp = fingerprint.upper()
        now = self.now() if now is None else now
        prev = self._down.get(fp)
        since = prev.failing_since if prev is not None else now
        delay = retry_delay(now - since, primary=fp in self._primary)
        self._down[fp] = _Down(since, now + delay)
        log.info("guard marked down", fingerprint=fp, retry_in=delay)

    def mark_up(self, fingerprint: str) -> None:
        """We connected to this guard: it is usable again."""
        self._down.pop(fingerprint.upper(), None)
