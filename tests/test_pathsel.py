"""Path selection (pathsel.py) and the guard set's weighted sampling on synthetic consensuses."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import Counter

import pytest
from conftest import chi_square

from onionp2p.client.guards import GuardSet
from onionp2p.client.pathsel import (
    POSITIONS,
    NodeSet,
    NoPathError,
    choose_internal_path,
    choose_path,
    internal_path_length,
    class_weights,
    compatible,
    exits_for_port,
    in_same_family,
    position_weight,
    subnet_of,
    weighted_choice,
    weighted_order,
)
from onionp2p.errors import CircuitError
from onionp2p.proto.bwweights import WEIGHT_SCALE, bandwidth_totals, compute_bw_weights, weight_class
from onionp2p.proto.directory import RelayInfo, RouterStatus

BASE = ("Running", "Valid", "Fast", "Stable")
ACCEPT_ALL = "accept 1-65535"
REJECT_ALL = "reject 1-65535"
_counter = iter(range(1, 10_000))
#: tor's weights of 04 Sep 2013 (case 2b1; src/test/test_dir.c)
TOR_2B1 = dict(Wbd=317, Wbe=5938, Wbg=0, Wbm=10000, Wdb=10000, Web=10000, Wed=9366, Wee=4061, Weg=9366,
               Wem=4061, Wgb=10000, Wgd=317, Wgg=10000, Wgm=10000, Wmb=10000, Wmd=317, Wme=5938, Wmg=0,
               Wmm=10000)


def fp_of(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest().upper()


def router(name: str, *flags: str, bw: int = 100, policy: str = REJECT_ALL, family=(),
           address: str | None = None, base=BASE) -> RouterStatus:
    if address is None:
        n = next(_counter)
        address = f"{10 + n // 250}.{n % 250}.0.1"  # a /16 of its own
    info = RelayInfo(nickname=name, address=address, or_port=9001, rsa_id=bytes.fromhex(fp_of(name)),
                     ed_id=bytes(32), ntor_key=bytes(32), exit_policy=policy)
    return RouterStatus(info=info, flags=frozenset(base + flags), bandwidth=bw, family=tuple(family))


def network():
    """3 guards, 2 middles, 3 exits (one BadExit), distinct /16s."""
    return [
        router("g1", "Guard"), router("g2", "Guard"), router("g3", "Guard"),
        router("m1"), router("m2"),
        router("e80", "Exit", policy="accept 80,443"),
        router("eall", "Exit", policy=ACCEPT_ALL),
        router("ebad", "Exit", "BadExit", policy=ACCEPT_ALL),
    ]


def paths(routers, n=300, seed=0, **kw):
    kw.setdefault("guard", None)
    kw.setdefault("enforce_distinct_subnets", True)
    kw.setdefault("port", 80)
    rng = random.Random(seed)
    return [choose_path(routers, rng=rng, **kw) for _ in range(n)]


# -- pathsel ---------------------------------------------------------------------------------------


def test_paths_are_guard_middle_exit_with_distinct_relays():
    routers = network()
    for g, m, e in paths(routers):
        assert len({g.fingerprint, m.fingerprint, e.fingerprint}) == 3
        assert "Guard" in g.flags
        assert e.nickname in ("e80", "eall")  # never the BadExit


def test_exit_policy_port_decides_the_exit():
    routers = network()
    assert {rs.nickname for rs in exits_for_port(routers, 22)} == {"eall"}
    assert {rs.nickname for rs in exits_for_port(routers, 443)} == {"e80", "eall"}
    assert {rs.nickname for rs in exits_for_port(routers, None)} == {"e80", "eall"}
    assert {p[2].nickname for p in paths(routers, port=22)} == {"eall"}
    assert {p[2].nickname for p in paths(routers, port=80)} == {"e80", "eall"}


def test_exit_flag_is_not_required_but_a_malformed_summary_rejects():
    routers = [router("g", "Guard"), router("m"), router("noflag", policy="accept 8080"),
               router("broken", "Exit", policy="accept lots")]
    assert [p[2].nickname for p in paths(routers, port=8080, n=20)] == ["noflag"] * 20
    with pytest.raises(NoPathError):
        choose_path(routers, port=80, guard=None, rng=random.Random(1), enforce_distinct_subnets=True)


def test_not_running_or_not_valid_relays_are_never_used():
    routers = network() + [
        router("down", "Guard", "Exit", policy=ACCEPT_ALL, base=("Valid",), bw=10**6),
        router("invalid", "Guard", "Exit", policy=ACCEPT_ALL, base=("Running",), bw=10**6),
    ]
    used = {rs.nickname for p in paths(routers) for rs in p}
    assert "down" not in used and "invalid" not in used and "ebad" in {r.nickname for r in routers}


def test_exclude_removes_relays_from_every_position():
    routers = network()
    exclude = {fp_of("m1"), "$" + fp_of("eall").lower()}
    used = {rs.nickname for p in paths(routers, exclude=exclude) for rs in p}
    assert "m1" not in used and "eall" not in used
    assert used >= {"m2", "e80"}


def test_family_in_either_direction_is_respected():
    g = router("g", "Guard")
    # e declares m1 (m1 does not declare e); g2 is declared by m2 only; lower case and $ accepted
    e = router("e", "Exit", policy=ACCEPT_ALL, family=("$" + fp_of("m1").lower(),))
    m1, m2 = router("m1"), router("m2", family=(fp_of("g2"),))
    g2 = router("g2", "Guard")
    assert in_same_family(e, m1) and in_same_family(m1, e)
    assert in_same_family(m2, g2) and in_same_family(g2, m2)
    assert not in_same_family(m1, m2)
    for gg, mm, ee in paths([g, g2, e, m1, m2]):
        assert not (mm.nickname == "m1" and ee.nickname == "e")
        assert not ({gg.nickname, mm.nickname} == {"g2", "m2"})


def test_distinct_subnets_when_enforced_only():
    g = router("g", "Guard", address="10.1.0.1")
    m_same = router("msame", address="10.1.200.7")  # same /16 as g
    m_other = router("mother", address="10.2.0.1")
    e = router("e", "Exit", policy=ACCEPT_ALL, address="10.3.0.1")
    enforced = paths([g, m_same, m_other, e], enforce_distinct_subnets=True)
    assert {p[1].nickname for p in enforced} == {"mother"}
    relaxed = paths([g, m_same, m_other, e], enforce_distinct_subnets=False)
    assert {p[1].nickname for p in relaxed} == {"msame", "mother"}
    assert str(subnet_of("10.1.200.7")) == "10.1.0.0/16"
    assert str(subnet_of("2001:db8:1::1")) == "2001:db8::/32"
    assert subnet_of("relay.example") is None
    assert compatible(router("h1", address="relay.example"), router("h2", address="relay.example"),
                      enforce_distinct_subnets=True)


def test_loopback_network_needs_subnets_off():
    routers = [router(n, "Guard", "Exit", policy=ACCEPT_ALL, address="127.0.0.1") for n in ("a", "b", "c")]
    with pytest.raises(NoPathError):
        choose_path(routers, port=80, guard=None, rng=random.Random(0), enforce_distinct_subnets=True)
    p = choose_path(routers, port=80, guard=None, rng=random.Random(0), enforce_distinct_subnets=False)
    assert len({rs.fingerprint for rs in p}) == 3


def test_bandwidth_weighting_distribution_is_proportional():
    exits = [router(f"x{bw}", "Exit", policy=ACCEPT_ALL, bw=bw) for bw in (100, 300, 600)]
    rng = random.Random(42)
    counts = Counter(weighted_choice(exits, "exit", rng).nickname for _ in range(20_000))
    for name, share in (("x100", 0.1), ("x300", 0.3), ("x600", 0.6)):
        assert abs(counts[name] / 20_000 - share) < 0.02, counts


def test_zero_bandwidth_weighs_nothing_unless_all_do():
    # tor: a relay with bandwidth 0 has weight 0; if every candidate weighs 0 the choice is uniform
    zero, one = (router(n, "Exit", policy=ACCEPT_ALL, bw=b) for n, b in (("zero", 0), ("one", 1)))
    assert position_weight(zero, "exit") == 0
    rng = random.Random(7)
    assert {weighted_choice([zero, one], "exit", rng).nickname for _ in range(500)} == {"one"}
    zeros = [router(f"z{i}", "Exit", policy=ACCEPT_ALL, bw=0) for i in range(3)]
    counts = Counter(weighted_choice(zeros, "exit", rng).nickname for _ in range(3000))
    assert set(counts) == {"z0", "z1", "z2"} and min(counts.values()) > 800


def test_consensus_bandwidth_weights_apply_per_position_and_class():
    d = router("d", "Guard", "Exit", policy=ACCEPT_ALL, bw=10)
    e = router("e", "Exit", policy=ACCEPT_ALL, bw=10)
    g = router("g", "Guard", bw=10)
    m = router("m", bw=10)
    bad = router("bad", "Guard", "Exit", "BadExit", policy=ACCEPT_ALL, bw=10)  # a BadExit is no exit: "g"
    cache = router("cache", "V2Dir", bw=10)
    w = dict(TOR_2B1, Wmb=5000)
    s = WEIGHT_SCALE
    assert position_weight(d, "exit", w) == 10 * 9366 * s
    assert position_weight(e, "exit", w) == 10 * 4061 * s
    assert position_weight(g, "exit", w) == 10 * 9366 * s  # Weg: a Guard without Exit flag, odd policy
    assert position_weight(m, "exit", w) == 10 * 4061 * s  # Wem
    assert position_weight(g, "guard", w) == 10 * 10000 * s
    assert position_weight(e, "guard", w) == 0  # exit-only relays are never weighted as guards
    assert position_weight(d, "guard", w) == 10 * 317 * s
    assert position_weight(bad, "guard", w) == position_weight(g, "guard", w)
    assert position_weight(m, "middle", w) == 10 * 10000 * s
    assert position_weight(e, "middle", w) == 10 * 5938 * s
    assert position_weight(cache, "middle", w) == 10 * 10000 * 5000  # V2Dir: times Wmb
    assert position_weight(cache, "dir", w) == 10 * 10000 * s  # Wbm, no V2Dir multiplier
    assert position_weight(d, "dir", w) == 10 * 317 * s  # Wbd
    with pytest.raises(ValueError):
        position_weight(m, "entry")
    # a missing or negative weight: plain bandwidth for every class, as tor ("naive selection")
    for broken in ({k: v for k, v in w.items() if k != "Wem"}, dict(w, Wee=-1), {}, None):
        assert class_weights("exit", broken) == {c: (s, s) for c in "gmed"}
        assert position_weight(e, "exit", broken) == position_weight(d, "exit", broken) == 10 * s * s
    assert position_weight(e, "guard", None) == 10 * s * s  # tor's naive rule has We = 1 too
    # a weight above the scale counts as the scale
    assert class_weights("exit", dict(w, Wee=99999))["e"] == (s, s)
    rng = random.Random(3)
    assert {weighted_choice([d, e, g], "guard", rng, w).nickname for _ in range(300)} == {"d", "g"}


# -- bandwidth weights, statistically (issue #18: "positions chosen in 100k simulated path selections") --
#: the bandwidth-weights keys per position and class, written out independently of pathsel
_KEYS = {"guard": dict(g="Wgg", m="Wgm", e=None, d="Wgd"), "middle": dict(g="Wmg", m="Wmm", e="Wme", d="Wmd"),
         "exit": dict(g="Weg", m="Wem", e="Wee", d="Wed"), "dir": dict(g="Wbg", m="Wbm", e="Wbe", d="Wbd")}
_DIR_MULT = dict(g="Wgb", m="Wmb", e="Web", d="Wdb")
#: every flag mix, with and without V2Dir and BadExit
_MIXES = [("Guard",), ("Exit",), ("Guard", "Exit"), (), ("Guard", "Exit", "BadExit"), ("Exit", "BadExit"),
          ("Guard", "V2Dir"), ("V2Dir",), ("Exit", "V2Dir"), ("Guard", "Exit", "V2Dir")]


def weighted_network() -> list[RouterStatus]:
    """30 relays in every flag mix with bandwidths over three orders of magnitude, a few
    without the Exit flag but with an open policy (exit classes g and m), one with bandwidth 0.
    Its v10 weights (case 1) differ from plain bandwidth in every position."""
    rng = random.Random(2026)
    scarcity = dict(g=2, e=4, m=1, d=2)  # bandwidth factor per class
    out = []
    for i in range(30):
        flags = _MIXES[i % len(_MIXES)]
        policy = ACCEPT_ALL if "Exit" in flags or i % 7 == 3 else REJECT_ALL
        bw = rng.choice([5, 20, 80, 300, 1000, 4000]) * scarcity[weight_class(flags)]
        out.append(router(f"w{i}", *flags, bw=0 if i == 11 else bw, policy=policy))
    return out


def expected_weight(rs: RouterStatus, position: str, w: dict[str, int] | None) -> float:
    """What tor's compute_weighted_bandwidths gives ``rs`` (w None: plain bandwidth)."""
    if w is None:
        return float(rs.bandwidth)
    exit_ = "Exit" in rs.flags and "BadExit" not in rs.flags
    classes = {(True, True): "d", (True, False): "g", (False, True): "e", (False, False): "m"}
    cls = classes["Guard" in rs.flags, exit_]
    key = _KEYS[position][cls]
    weight = 0.0 if key is None else w[key] / 10000
    if "V2Dir" in rs.flags and position != "dir":
        weight *= w[_DIR_MULT[cls]] / 10000
    return rs.bandwidth * weight


def candidates_for(position: str, routers: list[RouterStatus]) -> list[RouterStatus]:
    return {"guard": [r for r in routers if "Guard" in r.flags], "middle": list(routers),
            "exit": exits_for_port(routers, 443), "dir": [r for r in routers if "V2Dir" in r.flags]}[position]


def expected_counts(cands: list[RouterStatus], position: str, w, n: float) -> dict[str, float]:
    weights = {r.nickname: expected_weight(r, position, w) for r in cands}
    total = sum(weights.values())
    return {k: n * v / total for k, v in weights.items()}


#: v10 weights of the synthetic network, and tor's 2b1 case with V2Dir multipliers other than 1
COMPUTED = compute_bw_weights(bandwidth_totals((r.flags, r.bandwidth) for r in weighted_network()))
DIR_MULTIPLIED = dict(TOR_2B1, Wgb=7000, Wmb=5000, Web=8000, Wdb=2500)


@pytest.mark.parametrize("weights", [COMPUTED, DIR_MULTIPLIED], ids=["v10-computed", "v2dir-multipliers"])
@pytest.mark.parametrize("position", ["guard", "middle", "exit", "dir"])
def test_100k_position_choices_follow_the_weights(position, weights):
    routers = weighted_network()
    cands = candidates_for(position, routers)
    n = 100_000
    rng = random.Random(f"{position}-{sorted(weights.items())}")
    counts = Counter(weighted_choice(cands, position, rng, weights).nickname for _ in range(n))
    stat, p = chi_square(counts, expected_counts(cands, position, weights, n))
    assert p > 1e-3, (position, stat, p, counts)
    # the same draws are far from what ignoring the weights would give: the test has power
    _, p_plain = chi_square(counts, expected_counts(cands, position, None, n))
    assert p_plain < 1e-12, (position, p_plain)
    assert counts["w11"] == 0  # bandwidth 0


def test_computed_weights_are_not_plain_bandwidth():
    assert COMPUTED is not None and set(COMPUTED) == set(TOR_2B1)
    assert any(COMPUTED[k] != WEIGHT_SCALE for k in ("Wgg", "Wgd", "Wmg", "Wme", "Wmd", "Wee", "Wed"))


def test_full_paths_follow_the_weights_in_every_position():
    """5k choose_path calls: the exit (drawn first) against its weights; the guard and the
    middle against their weights among the relays still possible given the earlier hops."""
    routers = weighted_network()
    w = COMPUTED
    n = 5_000
    rng = random.Random(18)
    weight = {pos: {r.nickname: expected_weight(r, pos, w) for r in candidates_for(pos, routers)}
              for pos in POSITIONS}
    total = {pos: sum(v.values()) for pos, v in weight.items()}
    observed: dict[str, Counter] = {p: Counter() for p in POSITIONS}
    expected: dict[str, Counter] = {p: Counter() for p in POSITIONS}
    expected["exit"].update({k: n * v / total["exit"] for k, v in weight["exit"].items()})
    for _ in range(n):
        g, m, e = choose_path(routers, port=443, guard=None, rng=rng, enforce_distinct_subnets=True,
                              bw_weights=w)
        for pos, rs in zip(POSITIONS, (g, m, e)):
            observed[pos][rs.nickname] += 1
        # the guard is drawn among the guards but the exit, the middle among all but both
        left = total["guard"] - weight["guard"].get(e.nickname, 0)
        for k, v in weight["guard"].items():
            expected["guard"][k] += v / left if k != e.nickname else 0
        left = total["middle"] - weight["middle"][e.nickname] - weight["middle"][g.nickname]
        for k, v in weight["middle"].items():
            expected["middle"][k] += v / left if k not in (e.nickname, g.nickname) else 0
    for pos in POSITIONS:
        _, p = chi_square(observed[pos], {r.nickname: expected[pos][r.nickname] for r in routers})
        assert p > 1e-3, (pos, observed[pos])


def test_guard_sampling_follows_the_guard_weights(tmp_path):
    """The guard set samples like tor (WEIGHT_FOR_GUARD): with Wgd=0 (as tor computes for our
    private tor network) a Guard+Exit relay is never sampled; without weights it is."""
    routers = weighted_network()
    w = dict(COMPUTED, Wgd=0, Wgg=6000)
    n = 1500
    firsts: Counter = Counter()
    plain: Counter = Counter()
    for seed in range(n):
        for weights, out in ((w, firsts), (None, plain)):
            gs = GuardSet(tmp_path / f"{seed}-{weights is None}.json", n_primary=1, max_sample=1,
                          rng=random.Random(seed), now=Clock(),
                          bw_weights=lambda weights=weights: weights or {})
            out[gs.pick(routers).nickname] += 1
    guards = candidates_for("guard", routers)
    _, p = chi_square(firsts, expected_counts(guards, "guard", w, n))
    assert p > 1e-3, firsts
    assert not any("Exit" in r.flags and "BadExit" not in r.flags for r in guards if firsts[r.nickname])
    assert any("Exit" in r.flags and "BadExit" not in r.flags for r in guards if plain[r.nickname])


def test_directory_caches_are_tried_in_weighted_order():
    routers = weighted_network()
    caches = candidates_for("dir", routers)
    w = DIR_MULTIPLIED
    rng = random.Random(5)
    n = 20_000
    firsts = Counter(weighted_order(caches, "dir", rng, w, limit=3)[0].nickname for _ in range(n))
    _, p = chi_square(firsts, expected_counts(caches, "dir", w, n))
    assert p > 1e-3, firsts
    order = weighted_order(caches, "dir", rng, w)
    assert sorted(r.nickname for r in order) == sorted(r.nickname for r in caches)  # each once
    assert len(weighted_order(caches, "dir", rng, w, limit=2)) == 2


def test_given_guard_is_first_and_exit_avoids_its_family():
    g = router("mine", "Guard", family=(fp_of("e1"),))
    routers = [g, router("m1"), router("m2"), router("e1", "Exit", policy=ACCEPT_ALL, bw=10**6),
               router("e2", "Exit", policy=ACCEPT_ALL)]
    for p in paths(routers, guard=g):
        assert p[0] is g
        assert p[2].nickname == "e2"
        assert g.fingerprint not in {p[1].fingerprint, p[2].fingerprint}


def test_exit_without_compatible_middle_is_dropped_for_another():
    # the heavy exit shares a family with every possible middle; only the light exit gives a path
    heavy = router("heavy", "Exit", policy=ACCEPT_ALL, bw=10**6,
                   family=(fp_of("m1"), fp_of("m2"), fp_of("light")))
    routers = [router("g", "Guard"), router("m1"), router("m2"), heavy,
               router("light", "Exit", policy=ACCEPT_ALL, bw=1)]
    assert {p[2].nickname for p in paths(routers, n=50)} == {"light"}


def test_impossible_paths_raise_nopath():
    rng = random.Random(0)
    kw = dict(guard=None, rng=rng, enforce_distinct_subnets=True)
    with pytest.raises(NoPathError) as info:
        choose_path([router("g", "Guard"), router("m")], port=80, **kw)
    assert isinstance(info.value, CircuitError) and info.value.reason == "NOPATH"
    with pytest.raises(NoPathError):  # only two relays
        choose_path([router("g", "Guard"), router("e", "Exit", policy=ACCEPT_ALL)], port=80, **kw)
    with pytest.raises(NoPathError):  # no Guard-flagged relay
        choose_path([router("m"), router("m2"), router("e", "Exit", policy=ACCEPT_ALL)], port=80, **kw)
    g = router("g", "Guard", family=(fp_of("e"),))
    with pytest.raises(NoPathError):  # the only exit is in the given guard's family
        choose_path([g, router("m"), router("e", "Exit", policy=ACCEPT_ALL)], port=80,
                    **{**kw, "guard": g})


def test_same_seed_same_path():
    routers = network()
    assert paths(routers, n=20, seed=9) == paths(routers, n=20, seed=9)
    assert paths(routers, n=20, seed=9) != paths(routers, n=20, seed=10)


# -- guards -----------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# the guard-spec tests (sample, primary, retries, state file) are in test_guards.py


async def test_client_node_chooses_paths_and_guards_with_the_consensus_weights(tmp_path):
    """The wiring: a ClientNode hands its consensus's weights to the guard set and, through it,
    to the circuit manager's path choice (here Wgd=0 and Wed=0: a Guard+Exit relay is never a
    guard nor an exit, though it has most of the bandwidth)."""
    from onionp2p.client.node import ClientNode
    from onionp2p.config import ClientConfig

    routers = [router("g1", "Guard"), router("g2", "Guard"), router("m1"), router("m2"),
               router("e1", "Exit", policy=ACCEPT_ALL), router("e2", "Exit", policy=ACCEPT_ALL),
               router("both", "Guard", "Exit", policy=ACCEPT_ALL, bw=10**7)]
    w = dict(TOR_2B1, Wgd=0, Wed=0)
    node = ClientNode(ClientConfig(data_dir=tmp_path / "c", enforce_distinct_subnets=False),
                      routers=lambda: routers, bw_weights=lambda: w)
    assert node.guards.bw_weights() == w
    paths = [node.circmgr._choose(443, frozenset())[0] for _ in range(300)]
    assert {p[0].nickname for p in paths} <= {"g1", "g2"}
    assert {p[2].nickname for p in paths} == {"e1", "e2"}
    assert "both" in {p[1].nickname for p in paths}  # as a middle (Wmd) it is used
    # without weights the heavy relay is (all but surely: 1 - 2e-5) the first guard sampled
    plain = ClientNode(ClientConfig(data_dir=tmp_path / "p", enforce_distinct_subnets=False),
                       routers=lambda: routers)
    assert {plain.circmgr._choose(443, frozenset())[0][0].nickname for _ in range(20)} == {"both"}
    # with its own directory, the node's weights are the consensus's
    own = ClientNode(ClientConfig(data_dir=tmp_path / "d"))
    assert own.guards.bw_weights == own.directory.bw_weights and own.guards.bw_weights() == {}


# -- internal (onion-service) circuits -------------------------------------------------------------

HSREND = "HSRend=1-2 HSIntro=4-5 HSDir=2 Relay=2-4"


def hs_router(name: str, *flags: str, protocols: str = HSREND, **kw) -> RouterStatus:
    rs = router(name, *flags, **kw)
    return RouterStatus(info=dataclasses.replace(rs.info, protocols=protocols), flags=rs.flags,
                        bandwidth=rs.bandwidth, family=rs.family)


def intro_point(name: str, address: str | None = None) -> RelayInfo:
    """A relay known only from a descriptor's link specifiers (not in the consensus)."""
    return router(name, address=address).info


def internal_paths(routers, n=200, seed=0, **kw):
    kw.setdefault("guard", None)
    kw.setdefault("enforce_distinct_subnets", True)
    rng = random.Random(seed)
    return [choose_internal_path(routers, rng=rng, **kw) for _ in range(n)]


def test_internal_path_length_follows_tors_route_len_for_purpose():
    # a last hop someone else may have chosen gets one more middle
    for purpose in ("HS_CLIENT_HSDIR", "HS_SERVICE_HSDIR", "HS_CLIENT_INTRO", "HS_SERVICE_REND"):
        assert internal_path_length(purpose, True) == 4
    for purpose in ("HS_SERVICE_INTRO", "HS_CLIENT_REND"):
        assert internal_path_length(purpose, True) == 3
    assert internal_path_length("HS_CLIENT_REND", False) == 3
    with pytest.raises(ValueError):
        internal_path_length("GENERAL", True)


def test_internal_paths_end_at_the_given_relay_even_outside_the_consensus():
    routers = network()
    ip = intro_point("ip1")
    for path in internal_paths(routers, last=ip, purpose="HS_CLIENT_INTRO"):
        assert len(path) == 4 and path[-1].info == ip and not path[-1].flags
        assert "Guard" in path[0].flags
        assert len({rs.fingerprint for rs in path}) == 4
    # a listed last hop is used with its consensus entry (its family counts)
    listed = routers[3]
    for path in internal_paths(routers, last=listed.info, purpose="HS_SERVICE_INTRO", n=50):
        assert len(path) == 3 and path[-1] is listed


def test_internal_paths_keep_family_and_subnet_rules_with_the_last_hop():
    g1, g2, m1, m2 = (router("g1", "Guard"), router("g2", "Guard"), router("m1"), router("m2"))
    hsdir = router("hsdir", "HSDir", family=(g1.fingerprint,))
    routers = [g1, g2, m1, m2, hsdir, router("m3")]
    for path in internal_paths(routers, last=hsdir, purpose="HS_CLIENT_HSDIR"):
        assert path[0] is g2  # g1 is in the HSDir's family
    # an intro point not in the consensus shares a /16 with g2 and m1: neither is on its path
    ip = intro_point("ip", address=g2.info.address.rsplit(".", 2)[0] + ".9.9")
    m1_same = router("m1s", address=g2.info.address.rsplit(".", 2)[0] + ".7.7")
    routers = [g1, g2, m1_same, m2, router("m3")]
    for path in internal_paths(routers, last=ip, purpose="HS_CLIENT_INTRO"):
        assert path[0] is g1 and m1_same not in path
    # without enforce_distinct_subnets the /16 does not matter
    assert any(p[0] is g2 for p in internal_paths(routers, last=ip, purpose="HS_CLIENT_INTRO",
                                                  enforce_distinct_subnets=False))


def test_a_given_guard_incompatible_with_the_last_hop_is_refused():
    g1 = router("g1", "Guard")
    hsdir = router("hsdir", "HSDir", family=(g1.fingerprint,))
    with pytest.raises(NoPathError):
        choose_internal_path([g1, router("m1"), router("m2"), hsdir], last=hsdir, purpose="HS_CLIENT_HSDIR",
                             guard=g1, rng=random.Random(1), enforce_distinct_subnets=True)
    # the last hop itself as guard
    with pytest.raises(NoPathError):
        choose_internal_path([g1, router("m1")], last=g1, purpose="HS_SERVICE_INTRO", guard=g1,
                             rng=random.Random(1), enforce_distinct_subnets=True)


def test_rendezvous_points_are_running_valid_relays_with_hsrend_2_weighted_as_middles():
    old = hs_router("old", protocols="HSRend=1 Relay=2")  # v2-only rendezvous
    down = hs_router("down", base=("Valid",))
    heavy, light = hs_router("heavy", bw=900), hs_router("light", bw=100)
    routers = [router("g1", "Guard"), router("g2", "Guard"), router("m1"), old, down, heavy, light]
    ends = Counter(p[-1].nickname for p in internal_paths(routers, last=None, purpose="HS_CLIENT_REND",
                                                          n=2000))
    assert set(ends) == {"heavy", "light"}
    assert 0.85 < ends["heavy"] / 2000 < 0.95
    assert all(len(p) == 3 for p in internal_paths(routers, last=None, purpose="HS_CLIENT_REND", n=20))
    with pytest.raises(NoPathError):
        choose_internal_path([router("g1", "Guard"), router("m1"), old], last=None, purpose="HS_CLIENT_REND",
                             guard=None, rng=random.Random(1), enforce_distinct_subnets=True)


def test_internal_paths_exclude_only_the_chosen_positions():
    routers = network()
    ip = intro_point("ip2")
    g1 = routers[0]
    for path in internal_paths(routers, last=ip, purpose="HS_CLIENT_INTRO", exclude={g1.fingerprint}):
        assert g1 not in path
    # excluding the given last hop does not remove it: it was chosen by someone else
    hsdir = routers[3]
    assert all(p[-1] is hsdir for p in internal_paths(routers, last=hsdir, purpose="HS_CLIENT_HSDIR",
                                                      exclude={hsdir.fingerprint}, n=20))


# -- exclude_nodes (tor's ExcludeNodes, StrictNodes) -------------------------------------------------


def test_node_set_parses_tors_routerset_forms_and_refuses_the_rest():
    g = router("Guard7", "Guard", address="192.0.2.7")
    ns = NodeSet([f"${g.fingerprint.lower()}"])
    assert ns.contains(g) and ns.contains(g.info) and not ns.contains(router("other"))
    assert NodeSet([g.fingerprint]).contains(g)  # without "$", as tor takes a hex digest
    assert NodeSet(["guard7"]).contains(g)  # nicknames case-insensitively
    assert not NodeSet(["guard7"]).contains(dataclasses.replace(g.info, nickname="intro"))
    assert NodeSet([f"${g.fingerprint}~Guard7"]).contains(g)
    assert not NodeSet([f"${g.fingerprint}=someoneelse"]).contains(g)
    assert NodeSet(["192.0.2.0/24"]).contains(g) and not NodeSet(["198.51.100.0/24"]).contains(g)
    assert not NodeSet() and NodeSet(["a"]) == NodeSet(["a"])
    for bad in ("{us}", "not a name!", "$ABC", "*"):
        with pytest.raises(ValueError):
            NodeSet([bad])


def test_exclude_nodes_is_never_in_any_position_of_a_general_path():
    routers = network()
    # one of each role excluded, by fingerprint, nickname and address
    gone = {"g1", "m1", "eall"}
    ns = NodeSet([f"${routers[0].fingerprint}", routers[3].nickname, routers[6].info.address + "/32"])
    assert [routers[i].nickname for i in (0, 3, 6)] == ["g1", "m1", "eall"]
    seen = set()
    for path in paths(routers, exclude_nodes=ns):
        names = {rs.nickname for rs in path}
        assert not names & gone
        seen |= names
    assert {"g2", "g3", "m2", "e80"} <= seen  # the others are still used
    every_exit = NodeSet([rs.fingerprint for rs in exits_for_port(routers, 80)])
    with pytest.raises(NoPathError):
        choose_path(routers, port=80, guard=None, rng=random.Random(0), enforce_distinct_subnets=True,
                    exclude_nodes=every_exit)


def test_exclude_nodes_in_internal_paths_and_a_last_hop_chosen_elsewhere():
    routers = [hs_router("g1", "Guard"), hs_router("g2", "Guard"), hs_router("m1"), hs_router("m2"),
               hs_router("m3"), hs_router("rp1")]
    ns = NodeSet(["g1", "m1", "rp1"])
    # every chosen position, rendezvous points included
    for last, purpose in ((None, "HS_CLIENT_REND"), (intro_point("ip"), "HS_CLIENT_INTRO")):
        for path in internal_paths(routers, last=last, purpose=purpose, exclude_nodes=ns, n=100):
            assert not {"g1", "m1", "rp1"} & {rs.nickname for rs in path}
    # an excluded last hop someone else chose (a rendezvous point a client named): built
    # anyway (tor with StrictNodes 0), refused with strict_nodes
    rp = routers[5]
    assert all(p[-1] is rp and "g1" not in {r.nickname for r in p}
               for p in internal_paths(routers, last=rp.info, purpose="HS_SERVICE_REND", exclude_nodes=ns,
                                       n=20))
    with pytest.raises(NoPathError, match="strict_nodes"):
        choose_internal_path(routers, last=rp.info, purpose="HS_SERVICE_REND", guard=None,
                             rng=random.Random(0), enforce_distinct_subnets=True, exclude_nodes=ns,
                             strict_nodes=True)


def test_the_onion_client_tries_excluded_hsdirs_and_intro_points_last_or_never():
    """StrictNodes 0: excluded relays someone else chose come after every other one; with
    strict_nodes ("never") they are dropped (tor's client_get_random_intro, hs_pick_hsdir)."""
    from onionp2p.client.hsclient import OnionServiceClient

    verdicts = {"a": "", "b": "last", "c": "never", "d": "", "e": "last"}
    hs = OnionServiceClient(None, directory=lambda: None, http_get=None,  # type: ignore[arg-type]
                            build=lambda *a: None, excluded=lambda relay: verdicts[relay.nickname])
    items = [router(n).info for n in "abcde"]
    assert [i.nickname for i in hs._exclusion_order(items, lambda i: i)] == ["a", "d", "b", "e"]
