"""Shared randomness (onionp2p.proto.srv, specs/directory.md "Shared randomness"): tor's vectors,
the formula by hand, commit/reveal checks, majority rules, the sr-state file, the vote and
consensus lines, and the client view of them."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from onionp2p.dir.authority import VotingSchedule, compute_consensus
from onionp2p.errors import ProtocolError
from onionp2p.proto.directory import NetworkStatus
from onionp2p.proto.hs.blinding import TimePeriod, disaster_srv
from onionp2p.proto.hs.client import fetch_plan
from onionp2p.proto.srv import (
    PROTOCOL_ROUNDS,
    Commit,
    Phase,
    SharedRandomValue,
    SRState,
    compute_srv,
    consensus_srvs,
    phase_at,
    run_start,
    srv_from_commits,
    time_period_minutes,
)

VECTORS = json.loads((Path(__file__).parent / "data" / "srv" / "vectors.json").read_text())
INTERVAL = 10


def sha3(b: bytes) -> bytes:
    return hashlib.sha3_256(b).digest()


def test_commit_and_reveal_encoding_match_tors_vector():
    v = VECTORS["encoding"]
    c = Commit.generate(bytes(32), v["timestamp"], v["random_number_ascii"].encode())
    assert c.encoded_reveal == v["encoded_reveal"]
    assert c.encoded_commit == v["encoded_commit"]
    assert c.matches()
    # our documents write the same bytes unpadded; parsing gives the same commit back
    assert Commit.parse(c.args()) == c
    assert c.args().split(" ")[3] == v["encoded_commit"].rstrip("=")


def test_srv_matches_tors_vector_and_the_formula_by_hand():
    v = VECTORS["compute_srv"]
    prev = v["previous_srv_ascii"].encode()
    reveals = [(ident, reveal, hashed.encode()) for ident, reveal, hashed in v["reveals"]]
    srv = compute_srv(reversed(reveals), prev)  # order of input does not matter
    assert srv.value.hex().upper() == v["srv_hex"]
    assert srv.num_reveals == v["num_reveals"]
    # the spec's formula, written out
    hashed = sha3(b"".join(i.encode() + r.encode() for i, r, _ in reveals))
    by_hand = sha3(b"shared-random" + (3).to_bytes(8, "big") + (1).to_bytes(4, "big") + hashed + prev)
    assert srv.value == by_hand
    # no previous SRV: 32 NUL bytes
    assert compute_srv(reveals, None).value == sha3(b"shared-random" + (3).to_bytes(8, "big")
                                                    + (1).to_bytes(4, "big") + hashed + bytes(32))


def test_srv_from_commits_orders_by_hashed_reveal_uses_ed25519_identity_and_drops_bad_reveals():
    commits = [Commit.generate(bytes([i]) * 32, 1000, bytes([i + 50]) * 32) for i in range(3)]
    ordered = sorted(commits, key=lambda c: c.hashed_reveal)
    hashed = sha3("".join(c.identity.hex().upper() + c.encoded_reveal for c in ordered).encode())
    want = sha3(b"shared-random" + (3).to_bytes(8, "big") + (1).to_bytes(4, "big") + hashed + bytes(32))
    assert srv_from_commits(commits, None) == SharedRandomValue(want, 3)
    # a reveal that does not match its commit, and a commit without reveal, are left out
    bad = Commit(commits[0].identity, 1000, commits[0].hashed_reveal, commits[1].reveal)
    assert not bad.matches()
    assert srv_from_commits([bad, commits[1].without_reveal(), commits[2]], None).num_reveals == 1
    # the timestamp must match too
    c = commits[2]
    assert not Commit(c.identity, c.timestamp + 1, c.hashed_reveal, c.reveal).matches()


def test_phases_and_runs():
    run = 1_000_000 // (INTERVAL * PROTOCOL_ROUNDS) * INTERVAL * PROTOCOL_ROUNDS
    assert [phase_at(run + i * INTERVAL, INTERVAL) for i in (0, 11, 12, 23, 24)] == \
        [Phase.COMMIT, Phase.COMMIT, Phase.REVEAL, Phase.REVEAL, Phase.COMMIT]
    assert run_start(run + 23 * INTERVAL, INTERVAL) == run
    assert run_start(run + 24 * INTERVAL + 3, INTERVAL) == run + 24 * INTERVAL
    assert time_period_minutes(3600) == 1440  # tor's default hsdir-interval
    assert time_period_minutes(5) == 2


def test_majority_rules():
    a, b = SharedRandomValue(b"A" * 32, 3), SharedRandomValue(b"B" * 32, 2)
    votes = [(True, None, a), (True, None, a), (True, None, b), (False, None, b), (False, None, b)]
    # 5 authorities: 3 needed; only 2 participating votes say `a`
    assert consensus_srvs(votes, n_authorities=5, fresh=False, agreements=3) == (None, None)
    votes.append((True, b, a))
    assert consensus_srvs(votes, n_authorities=5, fresh=False, agreements=4) == (None, a)
    # a fresh SRV needs AuthDirNumSRVAgreements too
    assert consensus_srvs(votes, n_authorities=5, fresh=True, agreements=4) == (None, None)
    # tor's test: 1 vote of 9 is no majority; 7 of 9 is, but not with 8 agreements required
    votes9 = [(True, None, a)] * 7 + [(True, None, b)] * 2
    assert consensus_srvs(votes9[:1], n_authorities=9, fresh=True, agreements=6) == (None, None)
    assert consensus_srvs(votes9, n_authorities=9, fresh=True, agreements=8) == (None, None)
    assert consensus_srvs(votes9, n_authorities=9, fresh=True, agreements=7) == (None, a)


def _run(interval: int = INTERVAL) -> int:
    return 10**9 // (interval * PROTOCOL_ROUNDS) * interval * PROTOCOL_ROUNDS


class Rand:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> bytes:
        self.n += 1
        return bytes([self.n]) * 32


def test_three_states_run_the_protocol_and_rotate():
    """Three authorities' states passing votes' commit lines to each other, round by round."""
    ids = [bytes([i + 1]) * 32 for i in range(3)]
    states = [SRState(i, INTERVAL) for i in ids]
    rand = Rand()
    start = _run()
    srvs = []
    for r in range(3 * PROTOCOL_ROUNDS + 1):
        va = start + r * INTERVAL
        for s in states:
            s.update(va, rand)
        sent = [s.vote_commits() for s in states]
        for s in states:
            for voter, commits in zip(ids, sent):
                if voter != s.identity:
                    s.receive(voter, commits, ids, va)
        if r % PROTOCOL_ROUNDS == 0 and r:
            assert len({(s.previous, s.current) for s in states}) == 1
            srvs.append((states[0].previous, states[0].current))
        if r == 5:  # commit phase: commits only, no reveals in the votes
            assert all(len(s.commits) == 3 for s in states)
            assert all(c.reveal is None for s in sent for c in s)
    first, second, third = srvs
    assert first[1].num_reveals == 3 and first[0] is None
    assert second[0] == first[1] and second[1].num_reveals == 3 and second[1] != first[1]
    assert third[0] == second[1]
    # the run's SRV is the formula over the reveals the run used, chained to the previous
    assert second[1].value != srv_from_commits([], first[1].value).value


def test_bad_reveal_is_dropped_with_a_note():
    ids = [bytes([i + 1]) * 32 for i in range(2)]
    a, b = SRState(ids[0], INTERVAL), SRState(ids[1], INTERVAL)
    start = _run()
    a.update(start, Rand())
    b.update(start, Rand())
    assert a.receive(ids[1], b.vote_commits(), ids, start)[0]
    va = start + 12 * INTERVAL
    a.update(va)
    b.update(va)
    good = next(c for c in b.vote_commits() if c.identity == ids[1])
    assert good.reveal is not None
    wrong = good.timestamp.to_bytes(8, "big") + bytes(32)
    forged = Commit(good.identity, good.timestamp, good.hashed_reveal, wrong)
    changed, notes = a.receive(ids[1], [forged], ids, va)
    assert not changed and any("does not match its commit" in n.message for n in notes)
    assert a.commits[ids[1]].reveal is None
    # a commit in another authority's vote does not speak for it; the true reveal is kept
    assert not a.receive(ids[0], [good], ids, va)[0]
    assert a.receive(ids[1], [good], ids, va)[0] and a.commits[ids[1]].reveal == good.reveal
    # a second, different commit in the commit phase is ignored
    c = SRState(ids[0], INTERVAL)
    c.update(start, Rand())
    first = Commit.generate(ids[1], start, b"x" * 32).without_reveal()
    changed, notes = c.receive(ids[1], [Commit.generate(ids[1], start, b"x" * 32)], ids, start)
    assert not changed and any("reveal in the commit phase" in n.message for n in notes)
    assert c.receive(ids[1], [first], ids, start)[0]
    other = Commit.generate(ids[1], start, b"y" * 32).without_reveal()
    changed, notes = c.receive(ids[1], [other], ids, start)
    assert not changed and c.commits[ids[1]] == first and any("altered" in n.message for n in notes)


def test_state_file_round_trip_keeps_the_commitment_and_expires():
    ident = bytes(range(32))
    s = SRState(ident, INTERVAL)
    start = _run()
    s.update(start + 3 * INTERVAL, Rand())
    s.adopt(SharedRandomValue(b"p" * 32, 2), SharedRandomValue(b"c" * 32, 3))
    text = s.text()
    assert text.startswith("Version 1\n") and "\nCommit 1 sha3-256 " in text
    back = SRState.parse(text, ident, INTERVAL, now=start + 4 * INTERVAL)
    assert back == s
    back.update(start + 4 * INTERVAL, Rand())  # a later round of the commit phase: same commitment
    assert back.our_commit == s.our_commit
    with pytest.raises(ProtocolError, match="expired"):
        SRState.parse(text, ident, INTERVAL, now=start + PROTOCOL_ROUNDS * INTERVAL + 1)
    with pytest.raises(ProtocolError, match="interval"):
        SRState.parse(text, ident, INTERVAL * 2, now=start)
    for bad in (text.replace("Commit 1 sha3-256", "Commit 2 sha3-256"),
                text.replace("Version 1", "Version 2"),
                text.replace("SharedRandCurrentValue 3", f"SharedRandCurrentValue {2**64}"), "garbage\n",
                text.replace("\nCommit", "\nCommit 1 sha3-256 x y\nCommit", 1), text[:-1]):
        with pytest.raises(ProtocolError):
            SRState.parse(bad, ident, INTERVAL, now=start)


def _vote(key: ed25519.Ed25519PrivateKey, va: int, sched: VotingSchedule, state: SRState) -> NetworkStatus:
    from cryptography.hazmat.primitives import serialization
    ed = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return NetworkStatus("vote", *sched.times(va), (("a" + ed.hex()[:8], ed),), (), sr_participate=True,
                         sr_commits=state.vote_commits(), shared_rand_previous=state.previous,
                         shared_rand_current=state.current)


def test_votes_and_consensus_carry_the_lines_signed_and_parse_strictly():
    sched = VotingSchedule(INTERVAL)
    start = _run()
    key = ed25519.Ed25519PrivateKey.generate()
    st = SRState(b"\x07" * 32, INTERVAL)
    st.update(start + 12 * INTERVAL, Rand())  # reveal phase, no commit of ours (started late)
    st.commits[st.identity] = Commit.generate(st.identity, start, b"r" * 32)
    st.adopt(SharedRandomValue(b"p" * 32, 2), SharedRandomValue(b"c" * 32, 3))
    vote = _vote(key, start + 12 * INTERVAL, sched, st)
    text = vote.text
    assert "\nshared-rand-participate\nshared-rand-commit 1 sha3-256 " in text
    assert f"\nshared-rand-previous-value 2 {base64.b64encode(b'p' * 32).decode().rstrip('=')}\n" in text
    back = NetworkStatus.parse(text)
    assert back == vote and back.sr_commits[0].matches()
    assert back.srv_current == b"c" * 32 and back.srv_previous == b"p" * 32
    # the lines are signed: changing one breaks the signature
    sig = vote.sign(key)
    tampered = NetworkStatus.parse(text.replace(" 3 ", " 4 ", 1))
    voter = vote.voters[0][1]
    assert vote.signature_valid(voter, sig) and not tampered.signature_valid(voter, sig)
    # strict: a consensus has no commits, lines are in order, values canonical
    for bad in (text.replace("shared-rand-participate\n", "shared-rand-participate x\n"),
                text.replace("shared-rand-current-value 3", "shared-rand-current-value 03"),
                text.replace("status vote", "status consensus"),
                text.replace("shared-rand-current-value 3", f"shared-rand-current-value {2**64}")):
        with pytest.raises(ProtocolError):
            NetworkStatus.parse(bad)


def test_compute_consensus_takes_the_majority_srv_or_none():
    sched = VotingSchedule(INTERVAL)
    start = _run()
    keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(3)]
    agreed, other = SharedRandomValue(b"a" * 32, 3), SharedRandomValue(b"b" * 32, 3)
    va = start + 5 * INTERVAL

    def votes(currents):
        out = []
        for k, cur in zip(keys, currents):
            st = SRState(b"\x00" * 32, INTERVAL)
            st.adopt(None, cur)
            out.append(_vote(k, va, sched, st))
        return out
    cons = compute_consensus(votes([agreed, agreed, other]), sched, va, n_authorities=3)
    assert cons.srv_current == agreed.value and cons.shared_rand_current == agreed
    assert "\nshared-rand-current-value 3 " in cons.text and "shared-rand-commit" not in cons.text
    assert NetworkStatus.parse(cons.text) == cons
    # no majority of the 3 configured authorities (two votes only, and they disagree): no line
    assert compute_consensus(votes([agreed, other]), sched, va, n_authorities=3).srv_current is None
    # 2 of 3 agree but 5 authorities are configured: still none
    assert compute_consensus(votes([agreed, agreed, other]), sched, va, n_authorities=5).srv_current is None
    # first round of a run (fresh SRV): AuthDirNumSRVAgreements (default 3*2//3 = 2) applies
    fresh = start + PROTOCOL_ROUNDS * INTERVAL
    vs = [replace_va(v, fresh, sched) for v in votes([agreed, agreed, other])]
    assert compute_consensus(vs, sched, fresh, n_authorities=3).srv_current == agreed.value
    vs = [replace_va(v, fresh, sched, params=(("AuthDirNumSRVAgreements", 3),)) for v in vs]
    assert compute_consensus(vs, sched, fresh, n_authorities=3).srv_current is None


def replace_va(vote: NetworkStatus, va: int, sched: VotingSchedule, **kw) -> NetworkStatus:
    from dataclasses import replace
    return replace(vote, valid_after=va, fresh_until=sched.times(va)[1], valid_until=sched.times(va)[2], **kw)


def test_client_falls_back_to_the_disaster_srv_without_srv_lines():
    """A consensus without SRVs (no majority): the view has None and the fetch plan uses tor's
    disaster SRV; with them, the consensus's."""
    sched = VotingSchedule(INTERVAL)
    va = _run() + 14 * INTERVAL
    none = NetworkStatus("consensus", *sched.times(va), (("a", b"\x01" * 32),), ())
    length = time_period_minutes(INTERVAL)
    ids = [bytes([i]) * 32 for i in range(1, 6)]
    service = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    plan = fetch_plan(service, ids, valid_after=va, srv_current=none.srv_current,
                      srv_previous=none.srv_previous, voting_interval=INTERVAL, period_length=length)
    assert plan.srv_source == "disaster"
    assert plan.choice.srv == disaster_srv(TimePeriod.at(va, length, PROTOCOL_ROUNDS // 2 * INTERVAL // 60))
    cur = SharedRandomValue(b"c" * 32, 3)
    with_srv = NetworkStatus("consensus", *sched.times(va), (("a", b"\x01" * 32),), (),
                             shared_rand_current=cur, shared_rand_previous=SharedRandomValue(b"p" * 32, 3))
    plan = fetch_plan(service, ids, valid_after=va, srv_current=with_srv.srv_current,
                      srv_previous=with_srv.srv_previous, voting_interval=INTERVAL, period_length=length)
    assert plan.srv_source == "consensus" and plan.choice.srv in (b"c" * 32, b"p" * 32)


def test_time_periods_line_up_with_protocol_runs():
    """Our network's choice (specs/directory.md §4.2): a period is one protocol run, rotated
    12 rounds after the SRV changes — what the ring code assumes with those arguments."""
    from onionp2p.proto.hs.ring import in_period_between_tp_and_srv
    for interval in (5, 10, 3600):
        length = time_period_minutes(interval)
        start = _run(interval)
        kw = {"voting_interval": interval, "length": length}
        assert not in_period_between_tp_and_srv(start, **kw)  # a new SRV, the old period
        assert not in_period_between_tp_and_srv(start + 11 * interval, **kw)
        assert in_period_between_tp_and_srv(start + 12 * interval, **kw)  # the new period starts
        assert in_period_between_tp_and_srv(start + 23 * interval, **kw)
        period = TimePeriod.at(start + 12 * interval, length, 12 * interval // 60)
        assert period.start == start + 12 * interval and period.end == start + 36 * interval
