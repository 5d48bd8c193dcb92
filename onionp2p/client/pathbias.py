"""Path bias detection (path-spec §7, tor's ``circpathbias.c``; specs/pathsel.md "Path bias").

Theory of operation
-------------------
A hostile guard (or a hostile network around it) can let through only the circuits whose
middle and exit it likes, by failing the others: after the client's EXTEND it destroys
circuits toward honest relays, or lets them build and then kills them before they carry
data. The client would then build its circuits through colluding relays only. Each failure
looks like ordinary network trouble, so the defence is statistical: per guard, count

* ``circ_attempts``: circuits that got past their first hop (tor counts an attempt when the
  second hop is being extended to: the guard cannot know the path before that), and
  ``circ_successes`` of them that were built;
* of the built ones: ``successful_circuits_closed`` (closed by us, or after a stream
  succeeded), ``collapsed_circuits`` (closed by the network before any use),
  ``unusable_circuits`` (streams tried, none succeeded) and ``timeouts``;
* ``use_attempts`` / ``use_successes``: circuits a stream was attached to, and those on which
  a stream succeeded (CONNECTED, RESOLVED, or an END with a real reason from the exit).

The *close success rate* is ``(successful_circuits_closed + open built circuits) /
circ_attempts`` (open circuits get the benefit of the doubt), checked once ``circ_attempts``
exceeds ``pb_mincircs`` (150): below ``pb_noticepct`` (70 %) a notice, below ``pb_warnpct``
(50 %) a warning, below ``pb_extremepct`` (30 %) an "extremely large amount" warning or,
with ``pb_dropguards`` (default 0), the guard is *disabled for path bias*: the guard set no
longer picks it, and circuits through it are refused. The *use success rate*
``(use_successes + open used circuits) / use_attempts`` is checked alike after ``pb_minuse``
(20) attempts against ``pb_noticeusepct`` (80 %) and ``pb_extremeusepct`` (60 %). Each
message is logged once per guard, with tor's wording.

So that old history fades, when ``circ_attempts`` exceeds ``pb_scalecircs`` (300) every
count is multiplied by ``pb_multfactor / pb_scalefactor`` (1/2), leaving the circuits still
open out of the scaling; ``use_attempts`` above ``pb_scaleuse`` (100) scales the use counts.

:class:`PathBias` is pure: it is told about circuit events (by an opaque circuit key) and
reads/updates each guard's :class:`GuardPathBias`, which the guard set persists with the
guard (tor keeps them in the state file's ``Guard`` lines).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from enum import IntEnum
from typing import Any

from onionp2p.log import get_logger, notice
from onionp2p.proto.netparams import clamp_params

__all__ = ["PB_RANGES", "GuardPathBias", "PBParams", "PathBias", "PathState"]

log = get_logger("onionp2p.pathbias")

_I32 = 2**31 - 1
#: tor's defaults and bounds of the consensus parameters (percentages as integers)
PB_RANGES: dict[str, tuple[int, int, int]] = {
    "pb_mincircs": (150, 5, _I32),
    "pb_noticepct": (70, 0, 100),
    "pb_warnpct": (50, 0, 100),
    "pb_extremepct": (30, 0, 100),
    "pb_dropguards": (0, 0, 1),
    "pb_scalecircs": (300, 10, _I32),
    "pb_scalefactor": (2, 2, _I32),
    "pb_multfactor": (1, 1, _I32),  # at most pb_scalefactor
    "pb_minuse": (20, 3, _I32),
    "pb_noticeusepct": (80, 0, 100),
    "pb_extremeusepct": (60, 0, 100),
    "pb_scaleuse": (100, 10, _I32),
}


@dataclass(frozen=True)
class PBParams:
    """The ``pb_*`` consensus parameters with tor's defaults (see :data:`PB_RANGES`)."""

    pb_mincircs: int = 150
    pb_noticepct: int = 70
    pb_warnpct: int = 50
    pb_extremepct: int = 30
    pb_dropguards: int = 0
    pb_scalecircs: int = 300
    pb_scalefactor: int = 2
    pb_multfactor: int = 1
    pb_minuse: int = 20
    pb_noticeusepct: int = 80
    pb_extremeusepct: int = 60
    pb_scaleuse: int = 100

    @classmethod
    def from_consensus(cls, params: Mapping[str, int]) -> PBParams:
        out = replace(cls(), **clamp_params(params, PB_RANGES))
        if out.pb_multfactor > out.pb_scalefactor:
            out = replace(out, pb_multfactor=out.pb_scalefactor)
        return out

    @property
    def scale_ratio(self) -> float:
        return self.pb_multfactor / self.pb_scalefactor


@dataclass
class GuardPathBias:
    """One guard's path-bias counts (floats: they are scaled) and flags. The counts and
    ``disabled`` are persisted; the once-per-guard message flags are not (as in tor)."""

    circ_attempts: float = 0.0
    circ_successes: float = 0.0
    successful_circuits_closed: float = 0.0
    collapsed_circuits: float = 0.0
    unusable_circuits: float = 0.0
    timeouts: float = 0.0
    use_attempts: float = 0.0
    use_successes: float = 0.0
    disabled: bool = False
    noticed: bool = False
    warned: bool = False
    extreme: bool = False
    use_noticed: bool = False
    use_extreme: bool = False

    _PERSISTED = ("circ_attempts", "circ_successes", "successful_circuits_closed", "collapsed_circuits",
                  "unusable_circuits", "timeouts", "use_attempts", "use_successes", "disabled")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in self._PERSISTED}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GuardPathBias:
        known = {f.name for f in fields(cls)}
        out = cls()
        for k in cls._PERSISTED:
            if k in d and k in known:
                v = d[k]
                if k == "disabled":
                    out.disabled = bool(v)
                else:
                    f = float(v)
                    if not 0.0 <= f <= 1e9:
                        raise ValueError(f"bad path bias count {k}={v!r}")
                    setattr(out, k, f)
        return out


class PathState(IntEnum):
    """A circuit's path-bias state (tor's ``path_state_t``), in order."""

    NEW_CIRC = 0
    BUILD_ATTEMPTED = 1
    BUILD_SUCCEEDED = 2
    USE_ATTEMPTED = 3
    USE_SUCCEEDED = 4
    USE_FAILED = 5
    ALREADY_COUNTED = 6


@dataclass
class _Circ:
    guard: str
    state: PathState = PathState.NEW_CIRC


class PathBias:
    """Path-bias accounting over the guards' :class:`GuardPathBias` records.

    ``state_of(fingerprint)``: the guard's record (None: not a sampled guard, not counted);
    ``changed(fingerprint)``: a record changed (save it soon); ``describe(fingerprint)``:
    the guard's name in log lines; ``close_cutoff()``: the build measurement cutoff in
    seconds, quoted in the messages as tor does.
    """

    def __init__(self, state_of: Callable[[str], GuardPathBias | None], params: PBParams | None = None, *,
                 changed: Callable[[str], None] = lambda fp: None,
                 describe: Callable[[str], str] = lambda fp: f"${fp}",
                 close_cutoff: Callable[[], float] = lambda: 60.0):
        self.state_of = state_of
        self.params = params if params is not None else PBParams()
        self.changed = changed
        self.describe = describe
        self.close_cutoff = close_cutoff
        self._circs: dict[Hashable, _Circ] = {}

    # -- circuit events (tor's pathbias_count_* / pathbias_check_close) -----------------------

    def build_attempt(self, circ: Hashable, guard: str) -> bool:
        """The circuit's second hop is being extended to. False: the guard is disabled for
        path bias (close the circuit)."""
        c = self._circs.get(circ)
        if c is not None and c.state != PathState.NEW_CIRC:
            return True
        pb = self.state_of(guard)
        if pb is None:
            return True
        self._circs[circ] = _Circ(guard, PathState.BUILD_ATTEMPTED)
        self._measure_close_rate(guard, pb)
        if pb.disabled:
            self._circs.pop(circ, None)
            return False
        self._scale_close_rates(guard, pb)
        pb.circ_attempts += 1
        self.changed(guard)
        return True

    def build_success(self, circ: Hashable) -> None:
        c = self._circs.get(circ)
        if c is None or c.state != PathState.BUILD_ATTEMPTED:
            return
        pb = self.state_of(c.guard)
        c.state = PathState.BUILD_SUCCEEDED
        if pb is not None:
            pb.circ_successes += 1
            self.changed(c.guard)

    def use_attempt(self, circ: Hashable) -> None:
        """A stream was attached to the circuit."""
        c = self._circs.get(circ)
        if c is None or c.state < PathState.BUILD_SUCCEEDED or c.state >= PathState.USE_ATTEMPTED:
            return
        pb = self.state_of(c.guard)
        if pb is not None:
            self._measure_use_rate(c.guard, pb)
            self._scale_use_rates(c.guard, pb)
            pb.use_attempts += 1
            self.changed(c.guard)
        c.state = PathState.USE_ATTEMPTED

    def use_success(self, circ: Hashable) -> None:
        """A stream on the circuit succeeded (counted at close, as tor does)."""
        c = self._circs.get(circ)
        if c is None or c.state >= PathState.ALREADY_COUNTED:
            return
        if c.state < PathState.USE_ATTEMPTED:
            self.use_attempt(circ)
        c.state = PathState.USE_SUCCEEDED

    def use_failed(self, circ: Hashable) -> None:
        """The exit answered a stream with an error that proves nothing good (TORPROTOCOL)."""
        c = self._circs.get(circ)
        if c is not None and PathState.USE_ATTEMPTED <= c.state < PathState.USE_FAILED:
            c.state = PathState.USE_FAILED

    def timeout(self, circ: Hashable) -> None:
        """The circuit timed out (build timeout)."""
        c = self._circs.get(circ)
        if c is None or c.state == PathState.USE_SUCCEEDED:
            return
        pb = self.state_of(c.guard)
        if pb is not None:
            pb.timeouts += 1
            self.changed(c.guard)

    def closed(self, circ: Hashable, *, remote: bool) -> None:
        """The circuit is gone; ``remote``: the network closed it (DESTROY, TRUNCATED, its
        channel failed), not us."""
        c = self._circs.pop(circ, None)
        if c is None:
            return
        pb = self.state_of(c.guard)
        if pb is None:
            return
        if c.state == PathState.BUILD_SUCCEEDED:
            if remote:
                pb.collapsed_circuits += 1
            else:
                pb.successful_circuits_closed += 1
        elif c.state in (PathState.USE_ATTEMPTED, PathState.USE_FAILED):
            # tor first sends a probe down a USE_ATTEMPTED circuit; we count it unusable at once
            pb.unusable_circuits += 1
        elif c.state == PathState.USE_SUCCEEDED:
            pb.successful_circuits_closed += 1
            pb.use_successes += 1
        else:
            return
        self.changed(c.guard)

    # -- rates ----------------------------------------------------------------------------------

    def _open_in(self, guard: str, lo: PathState, hi: PathState) -> int:
        return sum(1 for c in self._circs.values() if c.guard == guard and lo <= c.state <= hi)

    def close_success_count(self, guard: str, pb: GuardPathBias) -> float:
        return pb.successful_circuits_closed + self._open_in(guard, PathState.BUILD_SUCCEEDED,
                                                             PathState.USE_SUCCEEDED)

    def use_success_count(self, guard: str, pb: GuardPathBias) -> float:
        return pb.use_successes + self._open_in(guard, PathState.USE_ATTEMPTED, PathState.USE_SUCCEEDED)

    def _counts(self, guard: str, pb: GuardPathBias, *, use_first: bool) -> str:
        close = f"Success counts are {round(self.close_success_count(guard, pb))}/{round(pb.circ_attempts)}."
        use = f"Use counts are {round(self.use_success_count(guard, pb))}/{round(pb.use_attempts)}."
        first, second = (use, close) if use_first else (close, use)
        return (f"{first} {second} {round(pb.circ_successes)} circuits completed, "
                f"{round(pb.unusable_circuits)} were unusable, {round(pb.collapsed_circuits)} collapsed, "
                f"and {round(pb.timeouts)} timed out. "
                f"For reference, your timeout cutoff is {round(self.close_cutoff())} seconds.")

    def _measure_close_rate(self, guard: str, pb: GuardPathBias) -> None:
        p = self.params
        if pb.circ_attempts <= p.pb_mincircs:
            return
        rate = self.close_success_count(guard, pb) / pb.circ_attempts
        name = self.describe(guard)
        # tor relies on "<" so that a 0 rate disables a check
        if rate < p.pb_extremepct / 100:
            if p.pb_dropguards:
                if not pb.disabled:
                    log.warning(f"Guard {name} is failing an extremely large amount of circuits. To avoid "
                                f"potential route manipulation attacks, onionp2p has disabled use of this "
                                f"guard. {self._counts(guard, pb, use_first=False)}")
                    pb.disabled = True
                    self.changed(guard)
            elif not pb.extreme:
                pb.extreme = True
                log.warning(f"Guard {name} is failing an extremely large amount of circuits. This could "
                            f"indicate a route manipulation attack, extreme network overload, or a bug. "
                            f"{self._counts(guard, pb, use_first=False)}")
        elif rate < p.pb_warnpct / 100:
            if not pb.warned:
                pb.warned = True
                log.warning(f"Guard {name} is failing a very large amount of circuits. Most likely this "
                            f"means the network is overloaded, but it could also mean an attack against "
                            f"you or potentially the guard itself. {self._counts(guard, pb, use_first=False)}")
        elif rate < p.pb_noticepct / 100:
            if not pb.noticed:
                pb.noticed = True
                notice("onionp2p.pathbias", f"Guard {name} is failing more circuits than usual. Most likely "
                       f"this means the network is overloaded. {self._counts(guard, pb, use_first=False)}")

    def _measure_use_rate(self, guard: str, pb: GuardPathBias) -> None:
        p = self.params
        if pb.use_attempts <= p.pb_minuse:
            return
        rate = self.use_success_count(guard, pb) / pb.use_attempts
        name = self.describe(guard)
        if rate < p.pb_extremeusepct / 100:
            if p.pb_dropguards:
                if not pb.disabled:
                    log.warning(f"Guard {name} is failing to carry an extremely large amount of stream on "
                                f"its circuits. To avoid potential route manipulation attacks, onionp2p has "
                                f"disabled use of this guard. {self._counts(guard, pb, use_first=True)}")
                    pb.disabled = True
                    self.changed(guard)
            elif not pb.use_extreme:
                pb.use_extreme = True
                log.warning(f"Guard {name} is failing to carry an extremely large amount of streams on its "
                            f"circuits. This could indicate a route manipulation attack, network overload, "
                            f"bad local network connectivity, or a bug. "
                            f"{self._counts(guard, pb, use_first=True)}")
        elif rate < p.pb_noticeusepct / 100:
            if not pb.use_noticed:
                pb.use_noticed = True
                notice("onionp2p.pathbias", f"Guard {name} is failing to carry more streams on its circuits "
                       f"than usual. Most likely this means the network is overloaded or your network "
                       f"connection is poor. {self._counts(guard, pb, use_first=True)}")

    def _scale_close_rates(self, guard: str, pb: GuardPathBias) -> None:
        p = self.params
        if pb.circ_attempts <= p.pb_scalecircs:
            return
        ratio = p.scale_ratio
        opened_attempts = self._open_in(guard, PathState.BUILD_ATTEMPTED, PathState.BUILD_ATTEMPTED)
        opened_built = self._open_in(guard, PathState.BUILD_SUCCEEDED, PathState.USE_FAILED)
        pb.circ_attempts -= opened_attempts + opened_built
        pb.circ_successes -= opened_built
        for name in ("circ_attempts", "circ_successes", "timeouts", "successful_circuits_closed",
                     "collapsed_circuits", "unusable_circuits"):
            setattr(pb, name, getattr(pb, name) * ratio)
        pb.circ_attempts += opened_attempts + opened_built
        pb.circ_successes += opened_built
        log.info("Scaled path bias counts", guard=self.describe(guard), successes=pb.circ_successes,
                 closed=pb.successful_circuits_closed, attempts=pb.circ_attempts)
        self.changed(guard)

    def _scale_use_rates(self, guard: str, pb: GuardPathBias) -> None:
        p = self.params
        if pb.use_attempts <= p.pb_scaleuse:
            return
        opened = self._open_in(guard, PathState.USE_ATTEMPTED, PathState.USE_SUCCEEDED)
        pb.use_attempts = (pb.use_attempts - opened) * p.scale_ratio + opened
        pb.use_successes *= p.scale_ratio
        log.info("Scaled path bias use counts", guard=self.describe(guard), successes=pb.use_successes,
                 attempts=pb.use_attempts)
        self.changed(guard)

    def check_loaded(self, guard: str, pb: GuardPathBias) -> None:
        """A guard's counts were loaded from the state (tor's
        ``pathbias_check_{close,use}_success_count``): with ``pb_dropguards``, counts
        already below the extreme rates disable it. Unlike tor, only past ``pb_mincircs``
        (``pb_minuse``) attempts, as at run time: a client stopped with a build under way
        must not lose a guard that had one attempt and no success yet."""
        p = self.params
        if not p.pb_dropguards or pb.disabled:
            return
        if pb.circ_attempts > p.pb_mincircs and self.close_success_count(guard, pb) / pb.circ_attempts \
                < p.pb_extremepct / 100:
            pb.disabled = True
        elif pb.use_attempts > p.pb_minuse and self.use_success_count(guard, pb) / pb.use_attempts \
                < p.pb_extremeusepct / 100:
            pb.disabled = True
        if pb.disabled:
            log.info("Path bias is too high; disabling guard", guard=self.describe(guard))
