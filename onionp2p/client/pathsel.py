"""Path selection: which three relays a client circuit goes through (path-spec §2; specs/pathsel.md).

Theory of operation
-------------------
Everything here is pure: functions take the current list of
:class:`~onionp2p.proto.directory.RouterStatus` entries and an injected random number
generator (anything with ``randrange``, e.g. :class:`random.Random` in tests and
:class:`random.SystemRandom` in production) and return relays or raise
:class:`NoPathError`. Nothing here does I/O or reads a clock.

A path is ``[guard, middle, exit]``. As in tor, the exit is chosen first, because it is
the most constrained position (it must be willing to connect to the requested port),
then the guard (the caller usually passes the one its :class:`~onionp2p.client.guards.GuardSet`
picked), then the middle.

Eligibility
  * every hop: flags ``Running`` and ``Valid``, not in ``exclude`` nor in the client's
    ``exclude_nodes`` (tor's ExcludeNodes, a :class:`NodeSet`; the guard comes already
    filtered from the guard set);
  * exit: not ``BadExit`` and its policy summary (the microdescriptor ``p`` line kept in
    ``RelayInfo.exit_policy``) accepts the port; with ``port=None`` ("any exit") the
    summary must accept at least one port. Like C tor's
    ``choose_good_exit_server_general`` the ``Exit`` flag itself is not required (it
    only selects the bandwidth-weight class); a malformed summary counts as
    ``reject 1-65535``;
  * guard (when none is given): flag ``Guard``.

Pairwise constraints (between every two hops of a path)
  * not the same relay (fingerprint);
  * not one family: a declares b, or b declares a, in ``RouterStatus.family``. Tor
    requires the declaration to be *mutual*; we accept either direction, which can only
    forbid more paths (see specs/pathsel.md for the trade-off);
  * with ``enforce_distinct_subnets``: not in the same IPv4 /16 (IPv6 /32). Off for a
    loopback test network, where every relay lives in 127.0.0.0/16.

Weighting (path-spec §2.2, tor's ``compute_weighted_bandwidths``)
  Each candidate is chosen with probability proportional to its consensus bandwidth
  (``w``; KB/s) times the consensus ``bandwidth-weights`` entry for the position and the
  relay's class (:func:`~onionp2p.proto.bwweights.weight_class`: g = Guard, e = Exit and
  not BadExit, d = both, m = neither): ``Wgg Wgm Wgd`` for a guard (an exit-only relay
  gets 0), ``Wmg Wmm Wme Wmd`` for a middle, ``Weg Wem Wee Wed`` for an exit, ``Wbg Wbm
  Wbe Wbd`` for a directory cache. Outside the directory position a relay with
  ``V2Dir`` is further multiplied by ``Wgb Wmb Web Wdb`` (1 in every v10 consensus). As
  in tor, if any weight the position needs is missing or negative (no line, or an old
  consensus) every weight is 1, i.e. plain bandwidth; a weight above the scale counts as
  the scale. A relay with bandwidth 0 has weight 0; if every candidate weighs 0 the
  choice is uniform. Arithmetic is integral, so a seeded generator gives the same path
  everywhere.

If the exit drawn first leaves no compatible guard or middle, that exit is dropped and
another is drawn, so :class:`NoPathError` means no path exists at all (for the given
guard, port and exclusions).

Internal circuits (onion services; :func:`choose_internal_path`)
  A circuit that ends at a relay someone chose, not at an exit: an HSDir, an introduction
  point, a rendezvous point. As tor's ``circuit_establish_circuit`` with an ``extend_info``:
  the last hop is fixed first (it need not be in the consensus: introduction and rendezvous
  points come as link specifiers and an ntor key; when it is listed, its consensus entry
  gives its family), then the guard (compatible with the last hop: not it, not its family,
  not its /16, tor's guard restriction for the exit), then the middles (middle weights,
  compatible with every other hop). With no last hop given (a client's rendezvous point,
  tor's ``pick_rendezvous_node``) a Running, Valid relay that implements ``HSRend=2`` is
  drawn with middle weights. How many middles is tor's ``route_len_for_purpose``
  (:func:`internal_path_length`): a last hop that someone else may have chosen (an HSDir, a
  client's introduction point, a service's rendezvous point) gets an extra middle, so
  that it does not learn the guard's neighbour; a service's own introduction points and a
  client's own rendezvous point do not.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Protocol

from onionp2p.errors import CircuitError, ProtocolError
from onionp2p.proto.bwweights import WEIGHT_SCALE, weight_class
from onionp2p.proto.directory import RelayInfo, RouterStatus
from onionp2p.proto.exitpolicy import ExitPolicy, PortSummary
from onionp2p.proto.routerset import NodeSet

__all__ = [
    "NoPathError",
    "NodeSet",
    "RandomSource",
    "POSITIONS",
    "WEIGHT_RULES",
    "class_weights",
    "choose_path",
    "choose_internal_path",
    "internal_path_length",
    "as_router_status",
    "can_be_rendezvous",
    "exits_for_port",
    "is_usable",
    "can_be_guard",
    "can_exit_to",
    "in_same_family",
    "subnet_of",
    "compatible",
    "position_weight",
    "weighted_choice",
    "weighted_order",
]

POSITIONS = ("guard", "middle", "exit")
#: what a relay can be weighted for: the three path positions and a directory fetch
WEIGHT_RULES = (*POSITIONS, "dir")
#: the ``bandwidth-weights`` keys of each rule for classes g, m, e, d (None: always 0)
_RULE_KEYS: dict[str, tuple[str | None, str, str, str]] = {
    "guard": ("Wgg", "Wgm", None, "Wgd"),
    "middle": ("Wmg", "Wmm", "Wme", "Wmd"),
    "exit": ("Weg", "Wem", "Wee", "Wed"),
    "dir": ("Wbg", "Wbm", "Wbe", "Wbd"),
}
#: the multipliers for relays that are directory caches (V2Dir), per class
_DIR_KEYS = {"g": "Wgb", "m": "Wmb", "e": "Web", "d": "Wdb"}


class NoPathError(CircuitError):
    """No relay (or no combination of relays) satisfies the path constraints."""

    def __init__(self, message: str, reason: str = "NOPATH"):
        super().__init__(message, reason)


class RandomSource(Protocol):
    def randrange(self, stop: int, /) -> int: ...


# -- eligibility ---------------------------------------------------------------------------



def _fp(s: str) -> str:
    return s.strip().lstrip("$").upper()


@lru_cache(maxsize=1024)
def _summary(text: str) -> PortSummary | None:
    try:
        return ExitPolicy.parse_summary(text)
    except ProtocolError:
        return None


def is_usable(rs: RouterStatus) -> bool:
    """Running and Valid: may appear in any position."""
    return "Running" in rs.flags and "Valid" in rs.flags


def can_be_guard(rs: RouterStatus) -> bool:
    return is_usable(rs) and "Guard" in rs.flags


def can_exit_to(rs: RouterStatus, port: int | None) -> bool:
    """True iff ``rs`` may be the exit for ``port`` (None: for some port)."""
    if not is_usable(rs) or "BadExit" in rs.flags:
        return False
    summary = _summary(rs.info.exit_policy)
    if summary is None:
        return False
    return summary.accepts_anything if port is None else summary.allows_port(port)


def exits_for_port(routers: Iterable[RouterStatus], port: int | None) -> list[RouterStatus]:
    """The relays that may be the exit of a circuit for ``port`` (None: any port)."""
    return [rs for rs in routers if can_exit_to(rs, port)]


# -- pairwise constraints ---------------------------------------------------------------------


def in_same_family(a: RouterStatus, b: RouterStatus) -> bool:
    """A declared family link in either direction (see the module docstring)."""
    fa, fb = a.fingerprint, b.fingerprint
    return any(_fp(f) == fb for f in a.family) or any(_fp(f) == fa for f in b.family)


@lru_cache(maxsize=8192)
def subnet_of(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The /16 (IPv4) or /32 (IPv6) around ``address``; None for a non-literal address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    prefix = 16 if ip.version == 4 else 32
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)


def compatible(a: RouterStatus, b: RouterStatus, *, enforce_distinct_subnets: bool) -> bool:
    """May ``a`` and ``b`` be on one path?"""
    if a.fingerprint == b.fingerprint or in_same_family(a, b):
        return False
    if enforce_distinct_subnets:
        na, nb = subnet_of(a.info.address), subnet_of(b.info.address)
        if na is not None and na == nb:
            return False
    return True


# -- weighting ----------------------------------------------------------------------------------


def class_weights(position: str, bw_weights: Mapping[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """Per class (g, m, e, d): the position weight and the V2Dir multiplier, both out of
    :data:`~onionp2p.proto.bwweights.WEIGHT_SCALE` (tor's ``compute_weighted_bandwidths``)."""
    if position not in WEIGHT_RULES:
        raise ValueError(f"unknown position {position!r}")
    scale = WEIGHT_SCALE
    naive = {c: (scale, scale) for c in "gmed"}
    if not bw_weights:
        return naive

    def get(key: str | None) -> int:
        if key is None:
            return 0
        value = int(bw_weights.get(key, -1))
        return -1 if value < 0 else min(value, scale)

    weights = {c: get(k) for c, k in zip("gmed", _RULE_KEYS[position])}
    multipliers = {c: scale if position == "dir" else get(_DIR_KEYS[c]) for c in "gmed"}
    if min(weights.values()) < 0 or min(multipliers.values()) < 0:
        return naive  # tor: "Got negative bandwidth weights. Defaulting to naive selection"
    return {c: (weights[c], multipliers[c]) for c in "gmed"}


def position_weight(rs: RouterStatus, position: str, bw_weights: Mapping[str, int] | None = None, *,
                    classes: Mapping[str, tuple[int, int]] | None = None) -> int:
    """Relative selection weight of ``rs`` for ``position`` (guard, middle, exit or dir).

    ``classes`` is :func:`class_weights` for the same position and weights, when the caller
    weighs many relays at once.
    """
    weight, multiplier = (classes or class_weights(position, bw_weights))[weight_class(rs.flags)]
    return max(int(rs.bandwidth), 0) * weight * (multiplier if "V2Dir" in rs.flags else WEIGHT_SCALE)


def weighted_choice(candidates: Sequence[RouterStatus], position: str, rng: RandomSource,
                    bw_weights: Mapping[str, int] | None = None) -> RouterStatus:
    """Pick one candidate with probability proportional to its position weight.

    If every weight is zero the choice is uniform (tor's ``choose_array_element_by_weight``).
    Integer arithmetic only, so a seeded generator gives the same answer everywhere.
    """
    if not candidates:
        raise NoPathError(f"no candidate for the {position} position")
    classes = class_weights(position, bw_weights)
    weights = [position_weight(rs, position, classes=classes) for rs in candidates]
    total = sum(weights)
    if total <= 0:
        return candidates[rng.randrange(len(candidates))]
    point = rng.randrange(total)
    for rs, w in zip(candidates, weights):
        if point < w:
            return rs
        point -= w
    return candidates[-1]  # unreachable


def weighted_order(candidates: Sequence[RouterStatus], position: str, rng: RandomSource,
                   bw_weights: Mapping[str, int] | None = None,
                   limit: int | None = None) -> list[RouterStatus]:
    """Up to ``limit`` candidates, each drawn by :func:`weighted_choice` from those not drawn
    yet: the order in which to try them (e.g. directory caches)."""
    left = list(candidates)
    out: list[RouterStatus] = []
    while left and (limit is None or len(out) < limit):
        pick = weighted_choice(left, position, rng, bw_weights)
        left.remove(pick)
        out.append(pick)
    return out


# -- paths ----------------------------------------------------------------------------------------


def _usable(routers: Iterable[RouterStatus], exclude: Collection[str],
            exclude_nodes: NodeSet | None) -> list[RouterStatus]:
    """Running, Valid, once each, in neither ``exclude`` (fingerprints) nor ``exclude_nodes``."""
    excluded = {_fp(f) for f in exclude}
    seen: set[str] = set()
    usable: list[RouterStatus] = []
    for rs in routers:
        if rs.fingerprint in seen or rs.fingerprint in excluded or not is_usable(rs):
            continue
        if exclude_nodes and exclude_nodes.contains(rs):
            continue
        seen.add(rs.fingerprint)
        usable.append(rs)
    return usable


def choose_path(
    routers: Iterable[RouterStatus],
    *,
    port: int | None,
    guard: RouterStatus | None,
    rng: RandomSource,
    enforce_distinct_subnets: bool,
    exclude: Collection[str] = frozenset(),
    bw_weights: Mapping[str, int] | None = None,
    exclude_nodes: NodeSet | None = None,
) -> list[RouterStatus]:
    """Choose ``[guard, middle, exit]`` for a circuit whose streams go to ``port``.

    ``guard`` fixes the first hop (it is used as given; the exit and middle are chosen
    compatible with it). ``exclude`` holds fingerprints (hex, any case, optional ``$``)
    never to use in the other positions; ``exclude_nodes`` (tor's ExcludeNodes) too.
    Raises :class:`NoPathError`.
    """
    usable = _usable(routers, exclude, exclude_nodes)

    def ok(rs: RouterStatus, *others: RouterStatus) -> bool:
        return all(compatible(rs, o, enforce_distinct_subnets=enforce_distinct_subnets) for o in others)

    fixed = (guard,) if guard is not None else ()
    exits = [rs for rs in usable if can_exit_to(rs, port) and ok(rs, *fixed)]
    what = "any port" if port is None else f"port {port}"
    if not exits:
        raise NoPathError(f"no usable exit allows {what}"
                          + (f" together with guard {guard.nickname}" if guard is not None else ""))
    while exits:
        exit_ = weighted_choice(exits, "exit", rng, bw_weights)
        first = guard
        if first is None:
            guards = [rs for rs in usable if can_be_guard(rs) and ok(rs, exit_)]
            if guards:
                first = weighted_choice(guards, "guard", rng, bw_weights)
        if first is not None:
            middles = [rs for rs in usable if ok(rs, exit_, first)]
            if middles:
                return [first, weighted_choice(middles, "middle", rng, bw_weights), exit_]
        exits.remove(exit_)
    raise NoPathError(f"no guard and middle fit any exit for {what} "
                      f"({'distinct /16s, ' if enforce_distinct_subnets else ''}no shared family)")


# -- internal circuits (onion services) --------------------------------------------------------------

#: purposes whose last hop someone else may have chosen: one more middle (tor's route_len_for_purpose:
#: C_HSDIR_GET, S_HSDIR_POST, C_INTRODUCING, S_CONNECT_REND)
EXTRA_HOP_PURPOSES = frozenset({"HS_CLIENT_HSDIR", "HS_SERVICE_HSDIR", "HS_CLIENT_INTRO", "HS_SERVICE_REND"})
#: every purpose an internal circuit may have (control-spec's CIRC PURPOSE values)
INTERNAL_PURPOSES = frozenset({*EXTRA_HOP_PURPOSES, "HS_CLIENT_REND", "HS_SERVICE_INTRO"})


def internal_path_length(purpose: str, last_given: bool) -> int:
    """Hops of an internal circuit of ``purpose`` (tor's ``route_len_for_purpose``): 3, or 4
    when a given last hop may have been chosen by someone else."""
    if purpose not in INTERNAL_PURPOSES:
        raise ValueError(f"not an onion-service circuit purpose: {purpose!r}")
    return 4 if last_given and purpose in EXTRA_HOP_PURPOSES else 3


def can_be_rendezvous(rs: RouterStatus) -> bool:
    """May ``rs`` be a client's rendezvous point (tor: CRN_RENDEZVOUS_V3, ``HSRend=2``)?"""
    return is_usable(rs) and rs.info.supports("HSRend", 2)


def as_router_status(last: RelayInfo | RouterStatus, routers: Iterable[RouterStatus]) -> RouterStatus:
    """``last`` as a path entry: its consensus entry when the consensus lists its identity
    (for its family), else a bare entry with no flags (an introduction or rendezvous point
    known only from its link specifiers)."""
    info = last.info if isinstance(last, RouterStatus) else last
    for rs in routers:
        if rs.info.rsa_id == info.rsa_id:
            return rs
    return last if isinstance(last, RouterStatus) else RouterStatus(info)


def choose_internal_path(
    routers: Iterable[RouterStatus],
    *,
    last: RelayInfo | RouterStatus | None,
    purpose: str,
    guard: RouterStatus | None,
    rng: RandomSource,
    enforce_distinct_subnets: bool,
    exclude: Collection[str] = frozenset(),
    bw_weights: Mapping[str, int] | None = None,
    exclude_nodes: NodeSet | None = None,
    strict_nodes: bool = False,
) -> list[RouterStatus]:
    """Choose ``[guard, middle(s), last]`` for an onion-service circuit of ``purpose`` (see
    the module docstring). ``last`` None: a rendezvous point is chosen. ``guard`` fixes the
    first hop; ``exclude`` and ``exclude_nodes`` (tor's ExcludeNodes) apply to the chosen
    positions. A given ``last`` in ``exclude_nodes`` (an introduction point from a descriptor,
    a rendezvous point a client named) is used anyway, as tor does with StrictNodes 0, unless
    ``strict_nodes``. Raises :class:`NoPathError`."""
    routers = list(routers)
    usable = _usable(routers, exclude, exclude_nodes)
    n_middles = internal_path_length(purpose, last is not None) - 2

    def ok(rs: RouterStatus, *others: RouterStatus) -> bool:
        return all(compatible(rs, o, enforce_distinct_subnets=enforce_distinct_subnets) for o in others)

    fixed = (guard,) if guard is not None else ()
    if last is not None:
        end = as_router_status(last, routers)
        if strict_nodes and exclude_nodes is not None and exclude_nodes.contains(end):
            raise NoPathError(f"{end.nickname} ({end.fingerprint}) is in exclude_nodes "
                              "and strict_nodes is set")
        if guard is not None and not ok(end, guard):
            raise NoPathError(f"guard {guard.nickname} cannot be on a path to {end.nickname} "
                              "(the same relay, family or /16)")
        ends = [end]
    else:
        ends = [rs for rs in usable if can_be_rendezvous(rs) and ok(rs, *fixed)]
        if not ends:
            raise NoPathError("no usable relay can be a rendezvous point (HSRend=2)")
    while ends:
        end = ends[0] if last is not None else weighted_choice(ends, "middle", rng, bw_weights)
        first = guard
        if first is None:
            guards = [rs for rs in usable if can_be_guard(rs) and ok(rs, end)]
            if guards:
                first = weighted_choice(guards, "guard", rng, bw_weights)
        if first is not None:
            middles: list[RouterStatus] = []
            while len(middles) < n_middles:
                cands = [rs for rs in usable if ok(rs, end, first, *middles)]
                if not cands:
                    break
                middles.append(weighted_choice(cands, "middle", rng, bw_weights))
            if len(middles) == n_middles:
                return [first, *middles, end]
        ends.remove(end)
    raise NoPathError(f"no guard and {n_middles} middle(s) fit a {purpose} circuit"
                      + (f" to {last.nickname}" if last is not None else "")
                      + f" ({'distinct /16s, ' if enforce_distinct_subnets else ''}no shared family)")
