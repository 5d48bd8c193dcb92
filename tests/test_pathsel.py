"""Path selection (pathsel.py) and the persistent guard set (guards.py) on synthetic consensuses."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from collections import Counter

import pytest

from onionp2p.client.guards import GUARD_LIFETIME, REMOVE_UNLISTED_AFTER, GuardSet, NoGuardError, retry_delay
from onionp2p.client.pathsel import (
    NoPathError,
    choose_path,
    compatible,
    exits_for_port,
    in_same_family,
    position_weight,
    subnet_of,
    weighted_choice,
)
from onionp2p.errors import CircuitError
from onionp2p.proto.directory import RelayInfo, RouterStatus

BASE = ("Running", "Valid", "Fast", "Stable")
ACCEPT_ALL = "accept 1-65535"
REJECT_ALL = "reject 1-65535"
_counter = iter(range(1, 10_000))


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


def test_zero_bandwidth_counts_as_one():
    exits = [router("zero", "Exit", policy=ACCEPT_ALL, bw=0), router("one", "Exit", policy=ACCEPT_ALL, bw=1)]
    assert position_weight(exits[0], "exit") == 1
    rng = random.Random(7)
    counts = Counter(weighted_choice(exits, "exit", rng).nickname for _ in range(2000))
    assert counts["zero"] > 800 and counts["one"] > 800


def test_consensus_bandwidth_weights_apply_per_position_and_class():
    d = router("d", "Guard", "Exit", policy=ACCEPT_ALL, bw=10)
    e = router("e", "Exit", policy=ACCEPT_ALL, bw=10)
    g = router("g", "Guard", bw=10)
    m = router("m", bw=10)
    w = {"Wed": 10000, "Wee": 0, "Wgg": 4000, "Wmm": 10000}
    assert position_weight(d, "exit", w) == 100_000
    assert position_weight(e, "exit", w) == 0
    assert position_weight(g, "guard", w) == 40_000
    assert position_weight(e, "guard", w) == 0  # Wge is never defined
    assert position_weight(m, "middle", w) == 100_000
    assert position_weight(g, "middle", w) == 100_000  # missing Wmg counts as 10000
    rng = random.Random(3)
    assert {weighted_choice([d, e], "exit", rng, w).nickname for _ in range(200)} == {"d"}
    # all-zero weights fall back to a uniform choice
    assert {weighted_choice([e], "exit", rng, w).nickname for _ in range(5)} == {"e"}
    with pytest.raises(ValueError):
        position_weight(m, "entry")


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


def guard_net(n=6):
    return [router(f"guard{i}", "Guard", bw=100 * (i + 1)) for i in range(n)] + [
        router("middle"), router("exit", "Exit", policy=ACCEPT_ALL),
        router("bad", "Guard", base=("Running",))]


def test_guards_sampled_once_and_persisted(tmp_path):
    state = tmp_path / "state" / "guards.json"
    routers, clock = guard_net(), Clock()
    gs = GuardSet(state, rng=random.Random(1), now=clock)
    first = gs.pick(routers)
    primary = gs.primary(routers)
    assert len(primary) == 3 and first.fingerprint == primary[0]
    assert {e.fingerprint for e in gs.sampled} == set(primary)
    assert all("Guard" in r.flags and "Valid" in r.flags for r in routers if r.fingerprint in primary)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    data = json.loads(state.read_text())
    assert data["version"] == 1 and [g["fingerprint"] for g in data["guards"]] == primary
    assert all(clock.t - GUARD_LIFETIME / 10 <= g["added_at"] <= clock.t for g in data["guards"])
    assert not list(state.parent.glob("*.tmp"))
    # a restart with another random source keeps the same guards
    again = GuardSet(state, rng=random.Random(999), now=clock)
    assert again.pick(routers).fingerprint == first.fingerprint
    assert again.primary(routers) == primary
    # many picks never change the choice
    assert {again.pick(routers).fingerprint for _ in range(20)} == {first.fingerprint}


def test_guard_sampling_is_bandwidth_weighted(tmp_path):
    routers = [router("heavy", "Guard", bw=10_000)] + [router(f"light{i}", "Guard", bw=1) for i in range(10)]
    firsts = Counter(
        GuardSet(tmp_path / f"g{seed}.json", rng=random.Random(seed), now=Clock()).pick(routers).nickname
        for seed in range(50))
    assert firsts["heavy"] >= 45


def test_mark_down_moves_to_next_primary_and_retries_later(tmp_path):
    routers, clock = guard_net(), Clock()
    gs = GuardSet(tmp_path / "g.json", rng=random.Random(2), now=clock)
    p = gs.primary(routers)
    assert gs.pick(routers).fingerprint == p[0]
    gs.mark_down(p[0])
    assert gs.is_down(p[0])
    assert gs.pick(routers).fingerprint == p[1]
    clock.t += 599
    assert gs.pick(routers).fingerprint == p[1]
    clock.t += 2  # primary retry schedule: 10 minutes
    assert gs.pick(routers).fingerprint == p[0]
    gs.mark_down(p[0])
    gs.mark_down(p[1])
    assert gs.pick(routers).fingerprint == p[2]
    gs.mark_up(p[0])
    assert gs.pick(routers).fingerprint == p[0]
    assert len(gs.sampled) == 3  # marking down never resampled


def test_all_down_widens_then_marks_retriable(tmp_path):
    routers, clock = guard_net(n=4), Clock()
    gs = GuardSet(tmp_path / "g.json", rng=random.Random(3), now=clock)
    p = gs.primary(routers)
    for fp in p:
        gs.mark_down(fp)
    fourth = gs.pick(routers)
    assert fourth.fingerprint not in p and len(gs.sampled) == 4
    gs.mark_down(fourth.fingerprint)
    again = gs.pick(routers)  # nothing left to sample: everything becomes retriable
    assert again.fingerprint == p[0] and not gs.is_down(p[1])


def test_exclude_skips_without_sampling(tmp_path):
    routers = guard_net()
    gs = GuardSet(tmp_path / "g.json", rng=random.Random(4), now=Clock())
    p = gs.primary(routers)
    assert gs.pick(routers, exclude={p[0]}).fingerprint == p[1]
    with pytest.raises(NoGuardError):
        gs.pick(routers, exclude=set(p))
    assert len(gs.sampled) == 3


def test_refill_when_guards_leave_the_consensus(tmp_path):
    routers, clock = guard_net(), Clock()
    gs = GuardSet(tmp_path / "g.json", rng=random.Random(5), now=clock)
    p = gs.primary(routers)
    without = [r for r in routers if r.fingerprint != p[0]]
    assert gs.pick(without).fingerprint == p[1]
    now_primary = gs.primary(without)
    assert len(now_primary) == 3 and p[0] not in now_primary and len(gs.sampled) == 4
    # it comes back within 20 days: first again, in its old place
    clock.t += 5 * 86400
    assert gs.pick(routers).fingerprint == p[0]
    # unlisted for more than 20 days: dropped from the sample (persisted)
    gs.pick(without)
    clock.t += REMOVE_UNLISTED_AFTER + 1
    gs.pick(without)
    assert p[0] not in {e.fingerprint for e in gs.sampled}
    assert p[0] not in {e.fingerprint for e in GuardSet(tmp_path / "g.json", now=clock).sampled}
    # a guard that lost the Guard flag counts as unlisted too
    demoted = [router(r.nickname, base=BASE) if r.fingerprint == p[1] else r for r in without]
    assert p[1] not in gs.primary(demoted)


def test_guards_expire_after_their_lifetime(tmp_path):
    routers, clock = guard_net(), Clock()
    gs = GuardSet(tmp_path / "g.json", rng=random.Random(6), now=clock)
    gs.pick(routers)
    old = gs.sampled
    clock.t += GUARD_LIFETIME + 1
    gs.pick(routers)
    new = gs.sampled
    assert len(new) == 3 and len(gs.primary(routers)) == 3
    # every old entry expired; the new sample (possibly some of the same relays) is dated now
    assert all(e.added_at >= clock.t - GUARD_LIFETIME / 10 for e in new)
    assert max(e.added_at for e in old) < min(e.added_at for e in new)


def test_corrupt_state_is_moved_aside(tmp_path):
    state = tmp_path / "g.json"
    state.write_text("{not json")
    gs = GuardSet(state, rng=random.Random(7), now=Clock())
    assert gs.sampled == []
    assert (tmp_path / "g.json.bad").read_text() == "{not json"
    gs.pick(guard_net())
    assert len(json.loads(state.read_text())["guards"]) == 3
    state.write_text(json.dumps({"version": 1, "guards": [{"fingerprint": "xyz", "added_at": 1}]}))
    assert GuardSet(state, now=Clock()).sampled == []


def test_no_guards_in_consensus(tmp_path):
    gs = GuardSet(tmp_path / "g.json", rng=random.Random(8), now=Clock())
    with pytest.raises(NoGuardError):
        gs.pick([router("m"), router("e", "Exit", policy=ACCEPT_ALL)])
    with pytest.raises(NoPathError):
        gs.pick([])


def test_retry_schedule():
    assert retry_delay(0, primary=True) == 600
    assert retry_delay(7 * 3600, primary=True) == 5400
    assert retry_delay(100 * 3600, primary=True) == 4 * 3600
    assert retry_delay(400 * 3600, primary=True) == 9 * 3600
    assert retry_delay(0, primary=False) == 3600
    assert retry_delay(400 * 3600, primary=False) == 36 * 3600
