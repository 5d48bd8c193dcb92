"""guard-spec (proposal 271) guard selection: the sans-IO core (GuardSelection) driven with a
fake clock through the scenarios of guard-spec's text, and the state file (GuardSet).

Real relays and a real client for the same algorithm: test_faults.py
(test_primary_guards_killed_client_walks_the_guard_list_and_returns)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from dataclasses import replace

import pytest

from onionp2p.client.guards import (
    COMPLETE,
    IF_NO_BETTER,
    MAYBE,
    NO,
    ON_COMPLETION,
    WAITING,
    YES,
    GuardParams,
    GuardSelection,
    GuardSet,
    NoGuardError,
    retry_delay,
)
from onionp2p.client.pathbias import GuardPathBias
from onionp2p.client.pathsel import NodeSet
from onionp2p.config import AuthorityConfig, ClientConfig
from onionp2p.control.formats import GuardEvent, guard_event_line
from onionp2p.errors import ConfigError
from onionp2p.proto.directory import RelayInfo, RouterStatus

BASE = ("Running", "Valid", "Fast", "Stable")
T0 = 1_700_000_000.0
H, DAY = 3600.0, 86400.0


def fp_of(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest().upper()


def router(name: str, *flags: str, bw: int = 100, base=BASE) -> RouterStatus:
    info = RelayInfo(nickname=name, address="10.0.0.1", or_port=9001, rsa_id=bytes.fromhex(fp_of(name)),
                     ed_id=bytes(32), ntor_key=bytes(32), exit_policy="reject 1-65535")
    return RouterStatus(info=info, flags=frozenset(base + flags), bandwidth=bw)


def guards(n: int, prefix: str = "g") -> list[RouterStatus]:
    return [router(f"{prefix}{i}", "Guard", bw=100 + i) for i in range(n)]


def small(**kw) -> GuardParams:
    """Parameters for a small network: a sample of at most 6, refilled below 4 usable."""
    kw.setdefault("min_filtered_sample_size", 4)
    kw.setdefault("max_sample_size", 6)
    kw.setdefault("max_sample_threshold", 1.0)
    return replace(GuardParams(), **kw)


def core(seed: int = 0, **kw) -> GuardSelection:
    return GuardSelection(rng=random.Random(seed), params=small(**kw))


def names(gs: GuardSelection, entries) -> list[str]:
    return [e.nickname for e in entries]


def build(gs: GuardSelection, routers, now: float, **kw):
    """One circuit's guard choice: (nickname, circuit state)."""
    rs, c = gs.select(routers, now, **kw)
    return rs.nickname, c


# -- parameters ------------------------------------------------------------------------------------


def test_params_from_consensus_with_tor_bounds_and_overrides():
    p = GuardParams.from_consensus({})
    assert (p.n_primary, p.n_primary_to_use, p.n_primary_dir_to_use, p.max_sample_size,
            p.min_filtered_sample_size) == (3, 1, 3, 60, 20)
    assert (p.lifetime, p.confirmed_min_lifetime, p.remove_unlisted_after) == (120 * DAY, 60 * DAY, 20 * DAY)
    assert (p.internet_likely_down_interval, p.nonprimary_connect_timeout,
            p.nonprimary_idle_timeout) == (600, 15, 600)
    p = GuardParams.from_consensus({"guard-n-primary-guards": 5, "guard-max-sample-threshold-percent": 500,
                                    "guard-lifetime-days": 0, "guard-retry-divisor": 100, "cc_alg": 2},
                                   {"guard-min-filtered-sample-size": 7})
    assert p.n_primary == 5 and p.max_sample_threshold == 1.0 and p.lifetime == DAY
    assert p.min_filtered_sample_size == 7
    assert p.retry_divisor == 1  # a consensus cannot speed up the retries
    assert GuardParams.from_consensus({}, {"guard-retry-divisor": 100}).retry_divisor == 100
    # NumPrimaryGuards wins over the consensus
    assert GuardParams.from_consensus({"guard-n-primary-guards": 5}, n_primary=2).n_primary == 2
    # tor's get_max_sample_size: min(20 % of the guards, 60), never below the filtered minimum
    assert GuardParams().max_sample(1000) == 60 and GuardParams().max_sample(200) == 40
    assert GuardParams().max_sample(10) == 20


def test_guard_params_config_key():
    cfg = ClientConfig.from_dict({"guard_params": {"guard-n-primary-guards": 2, "guard-retry-divisor": 60}})
    assert cfg.guard_params == {"guard-n-primary-guards": 2, "guard-retry-divisor": 60}
    for bad, needle in (({"guard-nope": 1}, "unknown guard parameter"),
                        ({"guard-n-primary-guards": 0}, "1.."),
                        ({"guard-retry-divisor": 10**6}, "1..86400"), ([1], "table")):
        with pytest.raises(ConfigError, match=needle):
            ClientConfig.from_dict({"guard_params": bad})
    assert ClientConfig().num_primary_guards == 0  # the consensus's, as tor's NumPrimaryGuards 0
    # authorities can vote tor's dashed names (dir-spec's KeywordChar)
    auth = AuthorityConfig.from_dict({"consensus_params": {"guard-n-primary-guards": 2}})
    assert auth.consensus_params == {"guard-n-primary-guards": 2}


def test_exclude_nodes_filters_sampled_guards_and_the_config_keys():
    """tor's ExcludeNodes: sampled guards it names are not FILTERED (never chosen, neither
    primary nor for directory fetches); the sample grows to keep enough usable ones."""
    routers = guards(8)
    gs = core(seed=1)
    gs.update(routers, 1000 * DAY)
    first = [e.nickname for e in gs.entries]
    gs.exclude_nodes = NodeSet(first[:3])
    chosen = {build(gs, routers, 1000 * DAY)[0] for _ in range(30)}
    assert chosen and not chosen & set(first[:3])
    assert not {e.nickname for e in gs.primary} & set(first[:3])
    assert not {rs.nickname for rs in gs.dir_guards(routers, 1000 * DAY)} & set(first[:3])
    assert [e.nickname for e in gs.entries][:len(first)] == first  # still sampled, only filtered
    assert len(gs.entries) > len(first)  # the sample grew (up to its maximum, 6)
    gs.exclude_nodes = NodeSet([rs.fingerprint for rs in routers])
    with pytest.raises(NoGuardError):
        gs.select(routers, 1000 * DAY)
    cfg = ClientConfig.from_dict({"exclude_nodes": ["$" + routers[0].fingerprint, "g1"],
                                  "strict_nodes": True})
    assert cfg.exclude_nodes.contains(routers[0]) and cfg.exclude_nodes.contains(routers[1])
    assert cfg.strict_nodes
    assert not ClientConfig().exclude_nodes and ClientConfig().strict_nodes is False
    for bad, needle in ((["{de}"], "GeoIP"), (["bad nick!"], "not a \\$fingerprint"), ("g1", "array")):
        with pytest.raises(ConfigError, match=f"exclude_nodes.*{needle}"):
            ClientConfig.from_dict({"exclude_nodes": bad})


def test_retry_schedule_table():
    """guard-spec §4.7 / tor's get_retry_schedule."""
    times = (0, 6 * H - 1, 6 * H, 4 * DAY - 1, 4 * DAY, 7 * DAY, 30 * DAY)
    assert [retry_delay(t, primary=True) for t in times] == [600, 600, 5400, 5400, 4 * H, 9 * H, 9 * H]
    assert [retry_delay(t, primary=False) for t in (0, 6 * H, 4 * DAY, 7 * DAY)] == [H, 4 * H, 18 * H, 36 * H]
    assert retry_delay(0, primary=True, divisor=300) == 2


# -- the sample --------------------------------------------------------------------------------------


def test_sample_filtered_primary_and_first_choice():
    routers = guards(10) + [router("mid"), router("noguard", base=("Running", "Valid"))]
    gs = core(1)
    filtered = gs.update(routers, T0)
    assert len(gs.entries) == 4  # expanded to min_filtered_sample_size, no more
    assert set(filtered) == {e.fingerprint for e in gs.entries}
    assert [e.sampled_idx for e in gs.entries] == [0, 1, 2, 3]
    assert names(gs, gs.primary) == names(gs, gs.entries[:3])  # nothing confirmed: sample order
    assert all(T0 - 12 * DAY <= e.sampled_on <= T0 for e in gs.entries)  # randomized back lifetime/10
    name, c = build(gs, routers, T0)
    assert name == gs.entries[0].nickname and c.state == ON_COMPLETION
    assert [ev[2] for ev in gs.events] == ["NEW"] * 4


def test_sample_is_bandwidth_weighted():
    routers = [router("heavy", "Guard", bw=10**6)] + [router(f"light{i}", "Guard", bw=1) for i in range(30)]
    heavy_first = 0
    for seed in range(40):
        gs = core(seed)
        gs.update(routers, T0)
        heavy_first += gs.entries[0].nickname == "heavy"
    assert heavy_first >= 38


def test_hostile_network_failing_every_guard_cannot_push_the_client_beyond_its_sample():
    """guard-spec's central property: whatever fails, every guard used is from the sample
    and the sample grows only up to its maximum (here 6 of 40 guards)."""
    routers = guards(40)
    for seed in range(20):
        gs = core(seed)
        rng = random.Random(seed)
        now, used = T0, set()
        for _ in range(400):
            try:
                rs, c = gs.select(routers, now)
            except NoGuardError:
                pytest.fail("a sample whose guards are all down is retried from the top")
            sampled = {e.fingerprint for e in gs.entries}
            assert rs.fingerprint in sampled and len(gs.entries) <= 6
            used.add(rs.fingerprint)
            if rng.random() < 0.95:
                gs.circuit_failed(c, now)
            else:
                gs.circuit_succeeded(c, now)
                gs.release(c)
            now += rng.choice([1, 60, 700, 4000])
        assert len(gs.entries) == 6 and used <= {e.fingerprint for e in gs.entries}


def test_sample_limits_by_consensus_size_and_parameters():
    gs = GuardSelection(rng=random.Random(3))  # tor's defaults
    gs.update(guards(400), T0)
    assert len(gs.entries) == 20  # min filtered sample reached
    sizes = []
    for _ in range(4):
        for e in gs.entries:
            gs.note_failure(e, T0)
        gs.update(guards(400), T0)
        sizes.append(len(gs.entries))
    # grows while fewer than 20 are usable, up to min(20 % of 400, 60)
    assert sizes == [40, 60, 60, 60]
    small_net = GuardSelection(rng=random.Random(3))
    small_net.update(guards(50), T0)
    for e in small_net.entries:
        small_net.note_failure(e, T0)
    small_net.update(guards(50), T0)
    assert len(small_net.entries) == 20  # 20 % of 50 is 10; never below the filtered minimum


def test_filtered_out_guards_are_never_chosen():
    routers = guards(8)
    gs = core(4, max_sample_size=8)
    gs.update(routers, T0)
    a, b, c, d = gs.entries[:4]
    b.pb.disabled = True  # disabled for path bias
    not_running = [replace(r, flags=r.flags - {"Running"}) if r.fingerprint == c.fingerprint else r
                   for r in routers]
    view = [r for r in not_running if r.fingerprint != d.fingerprint]  # d left the consensus
    chosen = set()
    now = T0
    for i in range(300):
        rs, circ = gs.select(view, now, exclude={a.fingerprint} if i % 2 else ())
        chosen.add(rs.nickname)
        assert rs.fingerprint not in (b.fingerprint, c.fingerprint, d.fingerprint)
        assert not (i % 2 and rs.fingerprint == a.fingerprint)  # the circuit's restriction
        (gs.circuit_failed if i % 3 else gs.circuit_succeeded)(circ, now)
        gs.release(circ)
        now += 400
    assert not {b.nickname, c.nickname, d.nickname} & set(names(gs, gs.primary))
    assert chosen <= {e.nickname for e in gs.entries}
    assert not d.listed and any(ev == (d.fingerprint, d.nickname, "BAD_L") for ev in gs.events)


# -- guard-spec's scenarios ----------------------------------------------------------------------------


def test_guard_down_next_primary_then_retry_schedule():
    routers = guards(6)
    gs = core(5)
    gs.update(routers, T0)
    p = names(gs, gs.primary)
    name, c = build(gs, routers, T0)
    assert name == p[0]
    gs.circuit_failed(c, T0)
    e0 = gs.get(fp_of(p[0]))
    assert e0.reachable == NO and (e0.fingerprint, p[0], "DOWN") in gs.events
    # the next primary guard, and it is usable at once when it completes
    name, c = build(gs, routers, T0 + 1)
    assert name == p[1] and c.state == ON_COMPLETION
    assert gs.circuit_succeeded(c, T0 + 2) == COMPLETE
    assert gs.get(fp_of(p[1])).confirmed_idx == 0
    # confirmed guards come first among the primary guards (tor's entry_guards_update_primary)
    assert names(gs, gs.primary) == [p[1], p[0], p[2]]
    # p[0] is retried 10 minutes after its last attempt, during its first 6 hours of failure
    now, attempts = T0, [T0]
    while now < T0 + 10 * H:
        now += 60
        gs.consider_retry(e0, now)
        if e0.reachable == MAYBE:
            attempts.append(now)
            gs.note_failure(e0, now)  # still down
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert all(b - a == retry_delay(b - T0, primary=True) for a, b in zip(attempts, attempts[1:]))
    assert gaps.count(600) == 35 and 5400 in gaps and set(gaps) == {600, 5400}


def test_nonprimary_retry_schedule():
    routers = guards(6)
    gs = core(6)
    gs.update(routers, T0)
    e = next(x for x in gs.entries if not x.primary)
    gs.note_failure(e, T0)
    gs.consider_retry(e, T0 + H - 1)
    assert e.reachable == NO
    gs.consider_retry(e, T0 + H)
    assert e.reachable == MAYBE
    gs.note_failure(e, T0 + 7 * H)
    gs.consider_retry(e, T0 + 11 * H - 1)
    assert e.reachable == NO
    gs.consider_retry(e, T0 + 11 * H)
    assert e.reachable == MAYBE


def confirm(gs: GuardSelection, routers, order: list[str], now: float) -> None:
    """Make the sampled guards named in ``order`` confirmed, in that order."""
    for n in order:
        e = gs.get(fp_of(n))
        gs.note_success(e, ON_COMPLETION, now)


def test_all_primary_down_confirmed_then_sampled_in_order_and_waiting_circuits():
    routers = guards(8)
    gs = core(7, max_sample_size=8, min_filtered_sample_size=8)
    gs.update(routers, T0)
    s = names(gs, gs.entries)
    confirm(gs, routers, [s[5], s[2], s[0], s[7]], T0)
    assert names(gs, gs.confirmed) == [s[5], s[2], s[0], s[7]]
    assert names(gs, gs.primary) == [s[5], s[2], s[0]]
    now = T0 + 100
    for n in (s[5], s[2], s[0]):
        name, c = build(gs, routers, now)
        assert name == n
        gs.circuit_failed(c, now)
    # all primary guards down: the next confirmed guard, then the sample in order; each
    # one pending at most once
    n1, c1 = build(gs, routers, now)
    n2, c2 = build(gs, routers, now)
    n3, c3 = build(gs, routers, now)
    assert (n1, n2, n3) == (s[7], s[1], s[3]) and {c1.state, c2.state, c3.state} == {IF_NO_BETTER}
    # the sampled guard completes first: it waits, blocked by the pending confirmed guard ...
    assert gs.circuit_succeeded(c2, now + 1) == WAITING
    assert gs.upgrade_waiting(now + 1) == []
    # ... for guard-nonprimary-guard-connect-timeout (15 s), then it may be used
    assert gs.upgrade_waiting(now + 15) == [c2] and c2.state == COMPLETE
    # the confirmed guard completes now; it waits too, and is not blocked by the lesser one
    assert gs.circuit_succeeded(c1, now + 16) == WAITING
    assert gs.upgrade_waiting(now + 16) == [c1]
    # a waiting circuit stays blocked by a complete circuit through a better guard
    gs.release(c3)  # its build failed at a later hop: s[3] is no longer pending
    assert build(gs, routers, now + 17)[0] == s[7]  # confirmed guards first
    n4, c4 = build(gs, routers, now + 17, exclude={fp_of(s[7]), fp_of(s[1])})
    assert n4 == s[3]  # the first unconfirmed one that is not pending
    assert gs.circuit_succeeded(c4, now + 18) == WAITING
    assert gs.upgrade_waiting(now + 18) == []
    # and is closed after guard-nonprimary-guard-idle-timeout
    assert gs.expired_waiting(now + 18 + 599) == [] and gs.expired_waiting(now + 18 + 601) == [c4]


def test_waiting_circuit_not_upgraded_while_a_primary_guard_may_be_reachable():
    routers = guards(6)
    gs = core(8)
    gs.update(routers, T0)
    p = names(gs, gs.primary)
    confirm(gs, routers, p, T0)
    for n in p[:2]:
        gs.note_failure(gs.get(fp_of(n)), T0)
    # p[2] is restricted for this circuit (its exit's family): a sampled guard instead
    name, c = build(gs, routers, T0 + 1, exclude={fp_of(p[2])})
    assert name not in p and c.state == IF_NO_BETTER
    assert gs.circuit_succeeded(c, T0 + 2) == WAITING
    assert gs.upgrade_waiting(T0 + 3) == []  # p[2] may be reachable: wait for it
    gs.note_failure(gs.get(fp_of(p[2])), T0 + 4)
    assert gs.upgrade_waiting(T0 + 5) == [c] and c.state == COMPLETE
    gs.release(c)
    # p[0]'s retry comes due 10 minutes after its failure: a new waiting circuit is held
    name, c2 = build(gs, routers, T0 + 6)
    assert name not in p and c2.state == IF_NO_BETTER
    assert gs.circuit_succeeded(c2, T0 + 7) == WAITING
    assert gs.upgrade_waiting(T0 + 599) == [c2]
    name, c3 = build(gs, routers, T0 + 8)
    assert gs.circuit_succeeded(c3, T0 + 9) == WAITING
    assert gs.upgrade_waiting(T0 + 600) == []
    assert build(gs, routers, T0 + 600)[0] == p[0]


def test_network_down_and_back_retries_the_primary_guards():
    """guard-spec §4.8 "when the network comes back": every primary guard failed while
    the network was down; the first success after guard-internet-likely-down-interval,
    through a non-primary guard, marks the primary guards maybe-reachable again, and the
    client goes back to its first primary guard instead of settling on another one."""
    routers = guards(8)
    gs = core(9, max_sample_size=8)
    gs.update(routers, T0)
    p = names(gs, gs.primary)
    confirm(gs, routers, p, T0)  # last success on the internet: T0
    for i, n in enumerate(p):  # the network goes down: every primary guard fails
        name, c = build(gs, routers, T0 + 60 + i)
        assert name == n
        gs.circuit_failed(c, T0 + 60 + i)
    later = T0 + 601  # 10 min without success; the primary guards' retries not due yet
    name, c = build(gs, routers, later)
    assert name not in p and c.state == IF_NO_BETTER
    assert gs.circuit_succeeded(c, later + 1) == WAITING
    assert [gs.get(fp_of(n)).reachable for n in p] == [MAYBE] * 3
    assert gs.upgrade_waiting(later + 2) == []  # the primary guards may work again
    name, c0 = build(gs, routers, later + 2)
    assert name == p[0] and c0.state == ON_COMPLETION
    assert gs.circuit_succeeded(c0, later + 3) == COMPLETE


def test_no_network_down_guess_when_the_internet_worked_recently():
    routers = guards(8)
    gs = core(9, max_sample_size=8)
    gs.update(routers, T0)
    p = names(gs, gs.primary)
    confirm(gs, routers, p, T0)
    for n in p:
        gs.note_failure(gs.get(fp_of(n)), T0 + 10)
    name, c = build(gs, routers, T0 + 20)
    assert gs.circuit_succeeded(c, T0 + 30) == WAITING  # 30 s since the last success: primaries are down
    assert [gs.get(fp_of(n)).reachable for n in p] == [NO] * 3
    assert gs.upgrade_waiting(T0 + 31) == [c]


def test_new_guard_confirmed_ordering_and_renumbering():
    routers = guards(8)
    gs = core(10, max_sample_size=8, min_filtered_sample_size=8)
    gs.update(routers, T0)
    s = names(gs, gs.entries)
    confirm(gs, routers, [s[4], s[1], s[6]], T0)
    assert [(e.nickname, e.confirmed_idx) for e in gs.confirmed] == [(s[4], 0), (s[1], 1), (s[6], 2)]
    assert all(T0 - 12 * DAY <= e.confirmed_on <= T0 for e in gs.confirmed)
    assert gs.get(fp_of(s[4])).reachable == YES and (fp_of(s[4]), s[4], "UP") in gs.events
    # s[1] leaves the consensus for good: dropped, the others renumbered in their order
    without = [r for r in routers if r.nickname != s[1]]
    gs.update(without, T0 + DAY)
    gs.update(without, T0 + 21 * DAY)
    assert gs.get(fp_of(s[1])) is None and (fp_of(s[1]), s[1], "DROPPED") in gs.events
    assert [(e.nickname, e.confirmed_idx) for e in gs.confirmed] == [(s[4], 0), (s[6], 1)]
    confirm(gs, routers, [s[0]], T0 + 21 * DAY)
    assert names(gs, gs.confirmed) == [s[4], s[6], s[0]]


def test_expiry_of_unlisted_unconfirmed_and_confirmed_guards():
    routers = guards(8)
    gs = core(11, max_sample_size=8, min_filtered_sample_size=8)
    gs.update(routers, T0)
    s = names(gs, gs.entries)
    # unlisted: removed 20 days after unlisted_since, which is randomized up to 4 days back
    without = [r for r in routers if r.nickname != s[1]]
    gs.update(without, T0)
    e1 = gs.get(fp_of(s[1]))
    assert T0 - 4 * DAY <= e1.unlisted_since <= T0 and not e1.listed
    gs.update(without, T0 + 16 * DAY - 1)
    assert gs.get(fp_of(s[1])) is not None
    gs.update(without, T0 + 20 * DAY + 1)
    assert gs.get(fp_of(s[1])) is None
    # coming back before that makes it listed again
    gs.update(without[:-1], T0)
    gs.update(routers, T0 + DAY)
    assert gs.get(fp_of(without[-1].nickname)).listed
    # lifetime: unconfirmed guards leave 120 days after sampled_on; a confirmed one stays
    # until it was also confirmed more than 60 days ago
    confirm(gs, routers, [s[0]], T0 + 100 * DAY)  # confirmed_on: 88-100 days after T0
    gs.update(routers, T0 + 121 * DAY)
    left = {e.nickname for e in gs.entries if e.sampled_on < T0}
    assert left == {s[0]}
    gs.update(routers, T0 + 148 * DAY - 1)
    assert [e.nickname for e in gs.entries if e.sampled_on < T0] == [s[0]]
    gs.update(routers, T0 + 161 * DAY)
    assert [e.nickname for e in gs.entries if e.sampled_on < T0] == []


def test_dir_guards_are_the_usable_primary_guards():
    routers = [replace(r, flags=r.flags | {"V2Dir"}) for r in guards(6)]
    gs = core(12)
    gs.update(routers, T0)
    p = names(gs, gs.primary)
    assert sorted(r.nickname for r in gs.dir_guards(routers, T0)) == sorted(p)
    gs.note_failure(gs.get(fp_of(p[1])), T0)
    assert sorted(r.nickname for r in gs.dir_guards(routers, T0)) == sorted([p[0], p[2]])
    for n in (p[0], p[2]):
        gs.note_failure(gs.get(fp_of(n)), T0)
    (only,) = gs.dir_guards(routers, T0)
    assert only.nickname == gs.entries[3].nickname  # the next in guard-spec's order, from the sample
    assert not gs.get(only.fingerprint).pending and not gs.circuits


def test_everything_down_marks_all_retriable_and_starts_from_the_top():
    routers = guards(4)
    gs = core(13, max_sample_size=4)
    gs.update(routers, T0)
    for e in gs.entries:
        gs.note_failure(e, T0)
    name, c = build(gs, routers, T0 + 1)
    assert name == gs.primary[0].nickname and c.state == ON_COMPLETION
    assert all(e.reachable == MAYBE for e in gs.entries)


def test_no_guard_at_all():
    gs = core(14)
    with pytest.raises(NoGuardError):
        gs.select([router("m")], T0)
    routers = guards(3)
    gs.update(routers, T0)
    with pytest.raises(NoGuardError):
        gs.select(routers, T0, exclude={r.fingerprint for r in routers})
    # the only usable guard is restricted for this circuit: the down ones stay down
    down = gs.entries[:2]
    for e in down:
        gs.note_failure(e, T0)
    with pytest.raises(NoGuardError, match="excluded"):
        gs.select(routers, T0 + 1, exclude={gs.entries[2].fingerprint})
    assert [e.reachable for e in down] == [NO, NO]


# -- the state file ----------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_state_file_round_trip(tmp_path):
    state = tmp_path / "state" / "guards.json"
    routers, clock = guards(8), Clock()
    events = []
    gs = GuardSet(state, rng=random.Random(1), now=clock, overrides={"guard-min-filtered-sample-size": 5},
                  version="onionp2p 9.9")
    gs.events.add(lambda *ev: events.append(ev))
    rs, c = gs.select(routers)
    assert gs.circuit_succeeded(c) == COMPLETE
    gs.path_bias(rs.fingerprint).circ_attempts = 7.0
    gs.mark_dirty()
    gs.save_if_dirty()
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600 and not list(state.parent.glob("*.tmp"))
    data = json.loads(state.read_text())
    assert data["version"] == 2 and len(data["guards"]) == 5
    first = data["guards"][0]
    assert first["fingerprint"] == rs.fingerprint and first["confirmed_idx"] == 0 and first["listed"] is True
    assert first["sampled_by"] == "onionp2p 9.9" and first["sampled_idx"] == 0
    assert first["path_bias"]["circ_attempts"] == 7.0
    assert [ev[2] for ev in events] == ["NEW"] * 5 + ["UP"]
    again = GuardSet(state, rng=random.Random(99), now=clock, overrides={"guard-min-filtered-sample-size": 5})
    assert [e.fingerprint for e in again.sampled] == [g["fingerprint"] for g in data["guards"]]
    assert again.confirmed() == [rs.fingerprint] and again.path_bias(rs.fingerprint).circ_attempts == 7.0
    assert again.pick(routers).fingerprint == rs.fingerprint
    assert again.status(rs.fingerprint) == "up"
    assert again.status(data["guards"][1]["fingerprint"]) == "never-connected"


def test_version_1_state_file_is_migrated(tmp_path):
    """guards.json of the simplified guard set (version 1) loads: same guards, same order,
    ``added_at`` as ``sampled_on``, unlisted ones unlisted, nothing confirmed."""
    state = tmp_path / "guards.json"
    routers = guards(6)
    v1 = [{"fingerprint": r.fingerprint, "nickname": r.nickname, "added_at": T0 - i, "unlisted_since": None,
           "path_bias": GuardPathBias(circ_attempts=3.0).to_dict()} for i, r in enumerate(routers[3:6])]
    v1[2]["unlisted_since"] = T0 - 5
    del v1[1]["path_bias"]
    state.write_text(json.dumps({"version": 1, "guards": v1}))
    gs = GuardSet(state, rng=random.Random(2), now=Clock(), max_sample=3)
    assert [e.nickname for e in gs.sampled] == ["g3", "g4", "g5"]
    assert [e.sampled_on for e in gs.sampled] == [T0, T0 - 1, T0 - 2]
    assert [e.listed for e in gs.sampled] == [True, True, False] and gs.confirmed() == []
    assert gs.path_bias(fp_of("g3")).circ_attempts == 3.0 and gs.path_bias(fp_of("g4")).circ_attempts == 0
    assert gs.primary(routers) == [fp_of("g3"), fp_of("g4"), fp_of("g5")]  # listed again now
    assert json.loads(state.read_text())["version"] == 2


_BAD_STATES = [
    "{not json",
    json.dumps({"version": 3, "guards": []}),
    json.dumps({"version": 2, "guards": [{"fingerprint": "xyz", "sampled_on": 1}]}),
    json.dumps({"version": 2, "guards": [{"fingerprint": fp_of("a"), "sampled_on": 1, "confirmed_idx": 0}]}),
]


@pytest.mark.parametrize("body", _BAD_STATES)
def test_unreadable_state_is_moved_aside(tmp_path, body):
    state = tmp_path / "g.json"
    state.write_text(body)
    gs = GuardSet(state, rng=random.Random(7), now=Clock())
    assert gs.sampled == [] and (tmp_path / "g.json.bad").read_text() == body
    gs.pick(guards(3))
    assert len(json.loads(state.read_text())["guards"]) == 3


def test_guard_event_line():
    assert guard_event_line(GuardEvent(fp_of("g1"), "g1", "DOWN")) == f"ENTRY ${fp_of('g1')}~g1 DOWN"
    assert guard_event_line(GuardEvent(fp_of("g1"), None, "NEW")) == f"ENTRY ${fp_of('g1')} NEW"


async def test_directory_fetch_outcomes_reach_the_guard_selection(tmp_path):
    """A directory fetch from a directory guard that cannot be reached marks it down (real
    sockets: nothing listens on its port); a success marks it up and confirms it."""
    from conftest import free_port

    from onionp2p.client.client import OnionClient
    from onionp2p.dir.client import ClientDirectory
    from onionp2p.errors import OnionError
    from onionp2p.relay.keys import RelayKeys

    keys = RelayKeys.load_or_create(tmp_path / "k")
    info = RelayInfo("dead", "127.0.0.1", free_port(), keys.rsa_id_digest, keys.identity_public,
                     keys.onion_key_public)
    rs = RouterStatus(info=info, flags=frozenset((*BASE, "Guard", "V2Dir")), bandwidth=100)
    gs = GuardSet(tmp_path / "g.json", now=Clock(), rng=random.Random(1))
    assert gs.dir_guards([rs]) == [rs]
    client = OnionClient(handshake_timeout=1)
    try:
        directory = ClientDirectory(tmp_path / "dir", [], client, dir_guards=gs.dir_guards)
        directory.dir_guard_result = gs.dir_result
        with pytest.raises((OnionError, OSError, TimeoutError)):
            await directory._fetch_via_dir_guard(rs)
        assert gs.is_down(rs.fingerprint) and gs.status(rs.fingerprint) == "down"
        gs.dir_result(rs.fingerprint, True)
        assert not gs.is_down(rs.fingerprint) and gs.confirmed() == [rs.fingerprint]
    finally:
        await client.close()
