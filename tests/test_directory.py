"""Directory documents and voting logic (sans-IO): descriptors, votes, consensus, verification."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onionp2p.dir.authority import (
    DetachedSignatures,
    FlagRules,
    Reachability,
    VotingSchedule,
    authority_line,
    compute_consensus,
    flags_for,
    load_or_create_authority_key,
)
from onionp2p.dir.server import DirRequestError, DirServer, HttpResponse, fetch, parse_request_head
from onionp2p.errors import ConfigError, KeyFileError, ProtocolError
from onionp2p.proto.bwweights import BandwidthTotals, compute_bw_weights
from onionp2p.proto.certs import CertType, Ed25519Cert, expiry_hours
from onionp2p.proto.directory import (
    ConsensusError,
    DirAuthority,
    NetworkStatus,
    RouterEntry,
    ServerDescriptor,
    format_time,
    parse_authorities,
    parse_time,
    verify_consensus,
)
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.relay.keys import RelayKeys

NOW = 1_800_000_000  # a fixed "now" for the pure tests (2027-01-15)
LOOPBACK = ExitPolicy.parse("accept 127.0.0.1:*", reject_private=False)
WEB = ExitPolicy.parse("accept *:80, accept *:443")

_KEYS: dict[str, RelayKeys] = {}


def relay_keys(tmp_factory, name: str) -> RelayKeys:
    if name not in _KEYS:
        _KEYS[name] = RelayKeys.load_or_create(tmp_factory.mktemp(name) / "keys", now=NOW)
    return _KEYS[name]


def make_desc(keys: RelayKeys, nick="relay1", port=9001, policy=LOOPBACK, published=NOW, **kw) -> ServerDescriptor:
    return ServerDescriptor.create(keys, nickname=nick, address="127.0.0.1", or_port=port, exit_policy=policy,
                                   published=published, **kw)


@pytest.fixture(scope="module")
def keys_a(tmp_path_factory):
    return relay_keys(tmp_path_factory, "a")


@pytest.fixture(scope="module")
def keys_b(tmp_path_factory):
    return relay_keys(tmp_path_factory, "b")


@pytest.fixture(scope="module")
def desc_a(keys_a):
    return make_desc(keys_a, family=["AB" * 20, "01" * 20], contact="ops@example.org", dir_server=True,
                     bandwidth=(500_000, 800_000, 0))


# -- descriptors -----------------------------------------------------------------------------
def test_descriptor_round_trip_and_verify(desc_a, keys_a):
    again = ServerDescriptor.parse(desc_a.text)
    assert again == desc_a and again.text == desc_a.text
    desc_a.verify(NOW)
    info = desc_a.relay_info()
    assert info.rsa_id == keys_a.rsa_id_digest and info.ed_id == keys_a.identity_public
    assert info.ntor_key == keys_a.onion_key_public and info.exit_policy == "reject 1-65535"
    assert desc_a.family == ("01" * 20, "AB" * 20) and desc_a.dir_server
    assert desc_a.bandwidth == (500_000, 800_000, 0)
    assert ServerDescriptor.parse(desc_a.text.encode()) == desc_a


def test_descriptor_web_exit_summary(keys_a):
    d = make_desc(keys_a, policy=WEB)
    assert d.policy_summary == "accept 80,443" and "p accept 80,443\n" in d.text
    d.verify(NOW)


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.replace("router relay1 ", "router relay2 "), "bad router-signature"),
    (lambda t: t.replace("bandwidth 500000", "bandwidth 500001"), "bad router-signature"),
    (lambda t: t.replace("\n", "\r\n"), "control"),
    (lambda t: t[:-1], "newline"),
    (lambda t: t.replace("platform ", "platform  "), "whitespace"),
    (lambda t: t.replace("contact ops@example.org\n", ""), "signature"),
    (lambda t: t.replace("tunnelled-dir-server\n", "tunnelled-dir-server\ntunnelled-dir-server\n"), "expected"),
    (lambda t: t.replace("p reject 1-65535", "p accept 80"), "does not summarize"),
    (lambda t: t + "extra line\n", "unexpected"),
    (lambda t: "\n" + t, "empty line"),
    (lambda t: t.replace("onionp2p-router-descriptor 1", "onionp2p-router-descriptor 2"), "version"),
    (lambda t: t.replace("published 2027-01-15", "published 2027-13-15"), "bad time"),
])
def test_descriptor_tampering_rejected(desc_a, mutate, needle):
    text = mutate(desc_a.text)
    with pytest.raises(ProtocolError, match=needle):
        ServerDescriptor.parse(text).verify(NOW)


def test_descriptor_cannot_claim_another_rsa_identity(keys_a, keys_b):
    """Victim's RSA key + attacker's Ed25519 chain: the cross-certificate does not match."""
    evil = make_desc(keys_b)
    victim = make_desc(keys_a)
    forged_text = evil.text.replace(evil.text.split("\n")[2], victim.text.split("\n")[2]) \
                           .replace(evil.text.split("\n")[3], victim.text.split("\n")[3])
    with pytest.raises(ProtocolError):
        ServerDescriptor.parse(forged_text).verify(NOW)
    # and swapping in the victim's cross-certificate too names the wrong Ed25519 key
    forged2 = forged_text.replace(evil.text.split("\n")[5], victim.text.split("\n")[5])
    with pytest.raises(ProtocolError, match="cross-certificate|signature"):
        ServerDescriptor.parse(forged2).verify(NOW)


def test_descriptor_signed_by_uncertified_key_rejected(keys_a):
    d = make_desc(keys_a)
    other = ed25519.Ed25519PrivateKey.generate()
    bogus = Ed25519Cert.create(CertType.IDENTITY_V_SIGNING, keys_a.signing_public, other,
                               expires_hours=expiry_hours(NOW + 86400))
    from onionp2p.proto.directory import _b64
    text = d.text.replace(_b64(keys_a.signing_cert.encode()), _b64(bogus.encode()))
    with pytest.raises(ProtocolError, match="signed by a different key|bad signature"):
        ServerDescriptor.parse(text).verify(NOW)


def test_descriptor_expired_cert_and_future_publication(keys_a):
    d = make_desc(keys_a)
    with pytest.raises(ProtocolError, match="expired"):
        d.verify(NOW + 400 * 86400)
    with pytest.raises(ProtocolError, match="future"):
        make_desc(keys_a, published=NOW + 3600).verify(NOW)


def _mutations():
    return st.lists(st.tuples(st.sampled_from(["del", "ins", "sub", "swap"]), st.integers(0, 10**6),
                              st.sampled_from(list(" \n\r\t-:.aZ09+/=\x00\xe9"))), min_size=1, max_size=4)


def _mutate(text: str, ops) -> str:
    for op, pos, ch in ops:
        i = pos % (len(text) + 1)
        if op == "del":
            text = text[:i] + text[i + 1:]
        elif op == "ins":
            text = text[:i] + ch + text[i:]
        elif op == "sub":
            text = text[:i] + ch + text[i + 1:]
        else:
            lines = text.split("\n")
            j = pos % len(lines)
            k = (pos // 7) % len(lines)
            lines[j], lines[k] = lines[k], lines[j]
            text = "\n".join(lines)
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_mutations())
def test_descriptor_fuzz_only_protocol_error(desc_a, ops):
    text = _mutate(desc_a.text, ops)
    try:
        d = ServerDescriptor.parse(text)
        d.verify(NOW)
    except ProtocolError:
        return
    assert d.text == desc_a.text  # only a no-op mutation may survive


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_descriptor_random_input_only_protocol_error(data):
    with pytest.raises(ProtocolError):
        ServerDescriptor.parse(data)


def test_descriptor_size_limit(desc_a):
    with pytest.raises(ProtocolError, match="larger than"):
        ServerDescriptor.parse(desc_a.text + "x" * 30_000)


# -- authorities -------------------------------------------------------------------------------
def test_authority_lines(tmp_path):
    key = load_or_create_authority_key(tmp_path / "auth")
    assert (tmp_path / "auth" / "keys" / "authority_id_secret_key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "auth" / "keys").stat().st_mode & 0o777 == 0o700
    again = load_or_create_authority_key(tmp_path / "auth")
    line = authority_line("auth1", "127.0.0.1", 7000, key)
    assert authority_line("auth1", "127.0.0.1", 7000, again) == line
    a = DirAuthority.parse(line)
    assert (a.nickname, a.host, a.dir_port) == ("auth1", "127.0.0.1", 7000) and a.line() == line
    v6 = DirAuthority.parse(line.replace("127.0.0.1:7000", "[::1]:7001"))
    assert v6.host == "::1" and "[::1]:7001" in v6.line()
    with pytest.raises(ConfigError, match="twice"):
        parse_authorities([line, line.replace("auth1", "auth2")])
    (tmp_path / "auth" / "keys" / "authority_id_secret_key.pem").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_authority_key(tmp_path / "auth")


@given(st.text(max_size=120))
def test_authority_line_fuzz_only_config_error(text):
    try:
        a = DirAuthority.parse(text)
    except ConfigError:
        return
    assert DirAuthority.parse(a.line()) == a


# -- votes and consensus -------------------------------------------------------------------------
def auth_set(n: int) -> tuple[list[ed25519.Ed25519PrivateKey], tuple[DirAuthority, ...]]:
    keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(n)]
    lines = [authority_line(f"auth{i}", "127.0.0.1", 7000 + i, k) for i, k in enumerate(keys)]
    return keys, parse_authorities(lines)


SCHED = VotingSchedule(3600)
VA = 1_800_000_000 // 3600 * 3600 + 3600


def vote(key, auth: DirAuthority, entries) -> NetworkStatus:
    v = NetworkStatus("vote", *SCHED.times(VA), ((auth.nickname, auth.ed_id),), tuple(entries))
    return v.with_signatures([(auth.ed_id, v.sign(key))])


def entry(desc: ServerDescriptor, flags=("Fast", "Running", "Valid"), bw=100) -> RouterEntry:
    return RouterEntry.from_descriptor(desc, flags, bw)


@pytest.fixture(scope="module")
def descs(tmp_path_factory):
    return [make_desc(relay_keys(tmp_path_factory, f"r{i}"), nick=f"r{i}", port=9000 + i) for i in range(4)]


def signed_consensus(keys, auths, descs, signers=None):
    votes = [vote(k, a, [entry(d) for d in descs]) for k, a in zip(keys, auths)]
    cons = compute_consensus(votes, SCHED, VA)
    signers = range(len(keys)) if signers is None else signers
    return cons.with_signatures([(auths[i].ed_id, cons.sign(keys[i])) for i in signers])


def test_consensus_majority_flags_median_and_newest(descs, tmp_path_factory):
    keys, auths = auth_set(3)
    newer = make_desc(relay_keys(tmp_path_factory, "r0"), nick="r0new", port=9100, published=NOW + 10)
    votes = [
        vote(keys[0], auths[0], [entry(descs[0], ("Running", "Stable", "Valid"), 10), entry(descs[1]),
                                 entry(descs[3])]),
        vote(keys[1], auths[1], [entry(newer, ("Guard", "Running", "Valid"), 30), entry(descs[1])]),
        vote(keys[2], auths[2], [entry(descs[0], ("Guard", "Running", "Valid"), 20), entry(descs[2])]),
    ]
    cons = compute_consensus(votes, SCHED, VA)
    by_fp = {e.fingerprint: e for e in cons.routers}
    # r0 listed 3 times, r1 twice: in; r2 and r3 once: out
    assert set(by_fp) == {descs[0].fingerprint, descs[1].fingerprint}
    r0 = by_fp[descs[0].fingerprint]
    assert r0.nickname == "r0new" and r0.or_port == 9100  # the newest descriptor wins
    assert r0.flags == {"Guard", "Running", "Valid"}  # Stable: 1 of 3; Guard: 2 of 3
    assert r0.bandwidth == 20  # low median of 10, 20, 30
    assert {v[0] for v in cons.voters} == {"auth0", "auth1", "auth2"}
    assert (cons.valid_after, cons.fresh_until, cons.valid_until) == (VA, VA + 3600, VA + 3 * 3600)
    # deterministic: every order of the votes gives the same bytes
    texts = {compute_consensus(list(p), SCHED, VA).text for p in itertools.permutations(votes)}
    assert len(texts) == 1
    assert NetworkStatus.parse(cons.text) == cons


def test_verify_consensus_thresholds(descs):
    keys, auths = auth_set(3)
    full = signed_consensus(keys, auths, descs)
    doc = verify_consensus(full.text, auths, VA + 10)
    assert len(doc.routers) == 4 and doc.valid_signers(auths) == {a.ed_id for a in auths}
    statuses = doc.router_statuses()
    assert {s.nickname for s in statuses} == {"r0", "r1", "r2", "r3"}
    assert all(s.flags == {"Fast", "Running", "Valid"} and s.bandwidth == 100 for s in statuses)
    two = signed_consensus(keys, auths, descs, signers=[0, 2])
    verify_consensus(two.text, auths, VA + 10)
    one = signed_consensus(keys, auths, descs, signers=[1])
    with pytest.raises(ConsensusError, match="valid signatures from 1 of 3 configured authorities, need 2"):
        verify_consensus(one.text, auths, VA + 10)
    # four authorities: two signatures are not more than half
    keys4, auths4 = auth_set(4)
    with pytest.raises(ConsensusError, match="need 3"):
        verify_consensus(signed_consensus(keys4, auths4, descs, signers=[0, 1]).text, auths4, VA)


def test_forged_and_tampered_consensus_rejected(descs):
    keys, auths = auth_set(3)
    full = signed_consensus(keys, auths, descs)
    # tampering with the body (a relay's port) voids every signature
    tampered = full.text.replace(f"127.0.0.1 {descs[1].or_port}\n", "127.0.0.1 1\n")
    assert tampered != full.text
    with pytest.raises(ConsensusError, match="0 of 3"):
        verify_consensus(tampered, auths, VA + 10)
    # signatures made by keys that are not the authorities' (forged identities)
    cons = compute_consensus([vote(k, a, [entry(d) for d in descs]) for k, a in zip(keys, auths)], SCHED, VA)
    mallory = ed25519.Ed25519PrivateKey.generate()
    forged = cons.with_signatures([(a.ed_id, cons.sign(mallory)) for a in auths])
    with pytest.raises(ConsensusError, match="0 of 3.*invalid or unknown"):
        verify_consensus(forged.text, auths, VA + 10)
    # a vote is not a consensus, even when signed
    v = vote(keys[0], auths[0], [entry(descs[0])])
    with pytest.raises(ConsensusError, match="vote"):
        verify_consensus(v.text, auths, VA)
    with pytest.raises(ConsensusError, match="malformed"):
        verify_consensus(full.text.replace("directory-footer", "directory-footer "), auths, VA)


def test_expired_and_future_consensus_rejected(descs):
    keys, auths = auth_set(3)
    full = signed_consensus(keys, auths, descs)
    verify_consensus(full.text, auths, VA - 30)  # within the default 60 s skew
    verify_consensus(full.text, auths, full.valid_until + 30)
    with pytest.raises(ConsensusError, match="future-dated"):
        verify_consensus(full.text, auths, VA - 3600)
    with pytest.raises(ConsensusError, match="expired"):
        verify_consensus(full.text, auths, full.valid_until + 61)
    with pytest.raises(ConsensusError, match="expired"):
        verify_consensus(full.text, auths, full.valid_until + 1, skew=0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_mutations())
def test_consensus_fuzz_only_protocol_error(descs, ops):
    keys, auths = _FUZZ_AUTHS
    full = _fuzz_consensus(descs)
    text = _mutate(full.text, ops)
    try:
        doc = verify_consensus(text, auths, VA + 10)
    except ProtocolError:
        return
    assert doc.body == full.body  # only signature-neutral mutations may survive


_FUZZ_AUTHS = auth_set(3)
_FUZZ: dict[str, NetworkStatus] = {}


def _fuzz_consensus(descs):
    if "c" not in _FUZZ:
        _FUZZ["c"] = signed_consensus(*_FUZZ_AUTHS, descs)
    return _FUZZ["c"]


@given(st.binary(max_size=400) | st.text(max_size=400))
def test_network_status_random_input_only_protocol_error(data):
    with pytest.raises(ProtocolError):
        NetworkStatus.parse(data)


def test_vote_round_trip_and_strictness(descs):
    keys, auths = auth_set(1)
    v = vote(keys[0], auths[0], [entry(d) for d in descs])
    assert NetworkStatus.parse(v.text) == v and NetworkStatus.parse(v.text).text == v.text
    assert v.signature_valid(auths[0].ed_id, dict(v.signatures)[auths[0].ed_id])
    two_voters = v.text.replace("voter auth0", "voter auth0 x", 1)
    with pytest.raises(ProtocolError):
        NetworkStatus.parse(two_voters)
    unsorted = v.text.replace("s Fast Running Valid", "s Running Fast Valid", 1)
    with pytest.raises(ProtocolError, match="sorted"):
        NetworkStatus.parse(unsorted)
    unknown_flag = v.text.replace("s Fast Running Valid", "s Fast Running Valid Zebra", 1)
    with pytest.raises(ProtocolError, match="known-flags"):
        NetworkStatus.parse(unknown_flag)


def test_detached_signatures_round_trip():
    keys, auths = auth_set(2)
    digest = bytes(range(32))
    sigs = tuple(sorted((a.ed_id, bytes(64)) for a in auths))
    det = DetachedSignatures(VA, digest, sigs)
    assert DetachedSignatures.parse(det.text) == det
    with pytest.raises(ProtocolError):
        DetachedSignatures.parse(det.text.replace(digest.hex(), digest.hex().upper()))
    with pytest.raises(ProtocolError):
        DetachedSignatures.parse(det.text.split("directory-signature")[0])


def test_time_codec():
    assert parse_time(format_time(NOW)) == NOW
    for bad in ("2027-01-15T00:00:00", "2027-02-30 00:00:00", "2027-1-15 00:00:00", "２０２７-01-15 00:00:00"):
        with pytest.raises(ProtocolError):
            parse_time(bad)


# -- flags and the schedule -----------------------------------------------------------------------
def test_voting_schedule():
    s = VotingSchedule(3600)
    assert s.delay == 300
    va = s.next_valid_after(VA - 601)
    assert va == VA and s.vote_at(va) == VA - 600 and s.compute_at(va) == VA - 300
    assert s.next_valid_after(VA - 599) == VA + 3600
    t = VotingSchedule(6)
    assert t.delay == 1 and t.times(60) == (60, 66, 78)


def test_flag_rules(keys_a):
    slow = make_desc(keys_a, bandwidth=(50_000, 50_000, 0))
    web = make_desc(keys_a, policy=WEB, dir_server=True)
    loop = make_desc(keys_a)
    target = lambda d: (d.address, d.or_port, d.rsa_id, d.ed_id)  # noqa: E731
    up = Reachability(target(loop), True, NOW - 100, NOW)
    rules = FlagRules()
    assert flags_for(loop, up, NOW, rules) == {"Fast", "Running", "Valid"}
    assert flags_for(slow, up, NOW, rules) == {"Running", "Valid"}
    assert flags_for(web, up, NOW, rules) == {"Exit", "Fast", "Running", "V2Dir", "Valid"}
    assert flags_for(loop, Reachability(target(loop), False, None, NOW), NOW, rules) is None
    assert flags_for(loop, None, NOW, rules) is None
    moved = replace(up, target=("127.0.0.1", 1, loop.rsa_id, loop.ed_id))
    assert flags_for(loop, moved, NOW, rules) is None  # tested a different address
    long_up = replace(up, up_since=NOW - 9 * 86400)
    assert flags_for(loop, long_up, NOW, rules) == {"Fast", "Guard", "Running", "Stable", "Valid"}
    testnet = FlagRules(stable_uptime=0, assume_guard=True, assume_exit=True)
    assert flags_for(loop, up, NOW, testnet) == {"Exit", "Fast", "Guard", "Running", "Stable", "Valid"}
    non_exit = make_desc(keys_a, policy=ExitPolicy.reject_all())
    assert "Exit" not in flags_for(non_exit, up, NOW, testnet)


# -- HTTP ----------------------------------------------------------------------------------------
def test_parse_request_head():
    assert parse_request_head(b"GET /tor/ HTTP/1.0\r\nHost: x\r\n\r\n") == ("GET", "/tor/", {"host": "x"})
    for bad in (b"GET /tor/ HTTP/2\r\n\r\n", b"GET  /tor/ HTTP/1.0\r\n\r\n", b"GET tor HTTP/1.0\r\n\r\n",
                b"GET /tor/ HTTP/1.0\r\nBad Header\r\n\r\n", b"GET /\x01 HTTP/1.0\r\n\r\n",
                b"GET / HTTP/1.0\r\nA: 1\r\na: 2\r\n\r\n", b"GET / HTTP/1.0\r\n"):
        with pytest.raises(ProtocolError):
            parse_request_head(bad)


@given(st.binary(max_size=200))
def test_parse_request_head_fuzz(data):
    try:
        method, path, headers = parse_request_head(data)
    except ProtocolError:
        return
    assert path.startswith("/") and method


async def test_dirserver_strictness():
    async def handler(req):
        return HttpResponse(200, b"got " + req.method.encode() + b" " + req.path.encode() + b" " + req.body)

    srv = DirServer(handler, max_body=100, timeout=1.0)
    await srv.start()

    async def raw(data: bytes) -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(data)
        await w.drain()
        out = await r.read()
        w.close()
        return out

    try:
        assert await fetch("127.0.0.1", srv.port, "/a") == b"got GET /a "
        assert await fetch("127.0.0.1", srv.port, "/b", b"xyz") == b"got POST /b xyz"
        with pytest.raises(DirRequestError, match="413") as exc:
            await fetch("127.0.0.1", srv.port, "/b", b"x" * 101)
        assert exc.value.status == 413
        assert (await raw(b"POST /b HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 411")
        assert (await raw(b"PUT /b HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405")
        assert (await raw(b"GET /b HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n")).startswith(b"HTTP/1.0 501")
        assert (await raw(b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.0 400")
        assert (await raw(b"GET /" + b"a" * 9000 + b" HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 400")
        assert (await raw(b"GET /slow HTTP/1.0\r\n")).startswith(b"HTTP/1.0 408")  # never finishes the head
        with pytest.raises(ProtocolError, match="larger than"):
            await fetch("127.0.0.1", srv.port, "/" + "z" * 50, max_size=10)
        with pytest.raises(DirRequestError, match="cannot connect"):
            s = DirServer(handler)
            await s.start()
            port = s.port
            await s.stop()
            await fetch("127.0.0.1", port, "/a")
    finally:
        await srv.stop()


def test_proto_lines_in_descriptors_and_consensus_entries(keys_a):
    desc = make_desc(keys_a, protocols="FlowCtrl=1 Link=4-5 Relay=2-4")
    assert "\nproto FlowCtrl=1 Link=4-5 Relay=2-4\n" in desc.text
    again = ServerDescriptor.parse(desc.text)
    assert again.protocols == desc.protocols and again.relay_info().supports("Relay", 4)
    entry = RouterEntry.from_descriptor(desc, ["Running", "Valid"], 100)
    lines = entry.lines()
    assert "pr FlowCtrl=1 Link=4-5 Relay=2-4" in lines
    assert entry.status().info.supports("Link", 5)
    # not canonical, or malformed: refused (they come from the network)
    for bad in ("Relay=2-4 Link=4-5", "Relay=4-2", "Relay=2,3,4"):
        text = desc.text.replace("proto FlowCtrl=1 Link=4-5 Relay=2-4", f"proto {bad}")
        with pytest.raises(ProtocolError):
            ServerDescriptor.parse(text)
    # no proto line at all: an older descriptor, nothing advertised
    plain = make_desc(keys_a)
    assert "\nproto " not in plain.text and not plain.relay_info().supports("Relay", 4)


def test_network_parameters_majority_and_low_median(descs):
    keys, auths = auth_set(3)

    def pvote(i, params):
        v = NetworkStatus("vote", *SCHED.times(VA), ((auths[i].nickname, auths[i].ed_id),),
                          (entry(descs[0]),), params=params)
        return v.with_signatures([(auths[i].ed_id, v.sign(keys[i]))])

    votes = [pvote(0, (("cc_sendme_inc", 31), ("cc_alg", 2))),
             pvote(1, (("cc_sendme_inc", 29), ("only_one", 5))),
             pvote(2, (("cc_sendme_inc", 33), ("cc_alg", 2), ("circwindow", -3)))]
    cons = compute_consensus(votes, SCHED, VA)
    # in the consensus: what more than half of the votes set, at the low median
    assert dict(cons.params) == {"cc_sendme_inc": 31, "cc_alg": 2}
    assert "params cc_alg=2 cc_sendme_inc=31\n" in cons.text  # sorted by name
    assert NetworkStatus.parse(cons.text) == cons
    assert NetworkStatus.parse(votes[2].text).params == (("cc_alg", 2), ("cc_sendme_inc", 33), ("circwindow", -3))
    # no params line without parameters
    assert "params" not in compute_consensus([vote(keys[0], auths[0], [])], SCHED, VA).text


@pytest.mark.parametrize("line", ["params b=1 a=2", "params a=1 a=2", "params a=01", "params a",
                                  "params a=99999999999", "params a.b=1", "params a=1  b=2"])
def test_network_parameters_must_be_canonical(line, descs):
    keys, auths = auth_set(1)
    head, rest = vote(keys[0], auths[0], []).text.split("\nknown-flags ", 1)
    flags, tail = rest.split("\n", 1)
    assert NetworkStatus.parse(f"{head}\nknown-flags {flags}\nparams a=-1 b=2\n{tail}").params == (("a", -1), ("b", 2))
    dashed = f"{head}\nknown-flags {flags}\nparams guard-n-primary-guards=2\n{tail}"  # tor's names have "-"
    assert NetworkStatus.parse(dashed).params == (("guard-n-primary-guards", 2),)
    with pytest.raises(ProtocolError, match="params|whitespace"):
        NetworkStatus.parse(f"{head}\nknown-flags {flags}\n{line}\n{tail}")


# -- bandwidth-weights ------------------------------------------------------------------------------
def test_consensus_carries_signed_bandwidth_weights(descs):
    """The authorities compute tor's v10 weights from the consensus's own bandwidths and flags;
    the line follows directory-footer (as in tor) and the signatures cover it."""
    keys, auths = auth_set(3)
    mixes = [(("Guard", "Running", "Valid"), 4000), (("Exit", "Running", "Valid"), 900),
             (("Exit", "Guard", "Running", "Valid"), 2000), (("Running", "Valid"), 3000)]
    votes = [vote(k, a, [entry(d, flags, bw) for d, (flags, bw) in zip(descs, mixes)])
             for k, a in zip(keys, auths)]
    cons = compute_consensus(votes, SCHED, VA)
    # by hand: G=4001 M=3001 E=901 D=2001 T=9904: exits scarce and S+D < T/3 (case 3a, E scarce):
    # all of D and E to exits, Wmg = 10000*(G-M)/(2G) = 1249 of the guards to middles
    assert compute_bw_weights(BandwidthTotals(4001, 3001, 901, 2001, 9904)) == dict(cons.bw_weights)
    w = dict(cons.bw_weights)
    assert ((w["Wee"], w["Wed"], w["Wgd"], w["Wmd"], w["Wme"], w["Wmg"], w["Wgg"])
            == (10000, 10000, 0, 0, 0, 1249, 8751))
    assert "bandwidth-weights" not in votes[0].text
    signed = cons.with_signatures([(a.ed_id, cons.sign(k)) for k, a in zip(keys, auths)])
    text = signed.text
    assert text.index("directory-footer\nbandwidth-weights Wbd=") < text.index("directory-signature")
    doc = verify_consensus(signed.text, auths, VA + 10)
    assert doc == signed and dict(doc.bw_weights) == w
    # changing one weight voids every signature
    forged = signed.text.replace(f" Wgg={w['Wgg']} ", f" Wgg={w['Wgg'] - 1} ")
    assert forged != signed.text
    with pytest.raises(ConsensusError, match="valid signatures from 0"):
        verify_consensus(forged, auths, VA + 10)


def test_no_bandwidth_weights_when_tor_would_write_none(descs):
    keys, auths = auth_set(1)
    # tor's case 2b3 totals (G=30 M=80 E=30 D=30 with the initial 1s): no consistent weights
    mixes = [(("Guard", "Running", "Valid"), 29), (("Exit", "Running", "Valid"), 29),
             (("Exit", "Guard", "Running", "Valid"), 29), (("Running", "Valid"), 79)]
    cons = compute_consensus([vote(keys[0], auths[0], [entry(d, f, b) for d, (f, b) in zip(descs, mixes)])],
                             SCHED, VA)
    assert cons.bw_weights == () and "bandwidth-weights" not in cons.text
    assert NetworkStatus.parse(cons.text) == cons


@pytest.mark.parametrize("line", ["Wgg=1 Wbd=2", "Wbd=1 Wbd=2", "Wbd=01", "Wbd=+1", "Wbd=-1", "Wxy=1", "Wbd",
                                  "Wbd=1  Wgg=2", "Wbd=99999999999"])
def test_bandwidth_weights_must_be_canonical(line, descs):
    keys, auths = auth_set(1)
    cons = compute_consensus([vote(keys[0], auths[0], [entry(descs[0])])], SCHED, VA)
    head = cons.text.split("directory-footer\n")[0] + "directory-footer\n"
    good = NetworkStatus.parse(head + "bandwidth-weights Wbd=1 Wgg=2\n")
    assert good.bw_weights == (("Wbd", 1), ("Wgg", 2))
    with pytest.raises(ProtocolError):
        NetworkStatus.parse(f"{head}bandwidth-weights {line}\n")
    # a vote never has the line
    v = vote(keys[0], auths[0], [entry(descs[0])]).text
    with pytest.raises(ProtocolError, match="vote"):
        NetworkStatus.parse(v.replace("directory-footer\n", "directory-footer\nbandwidth-weights Wbd=1\n"))


def test_client_directory_gives_the_weights_and_tries_caches_weighted(descs, tmp_path):
    """A verified consensus's weights reach ClientDirectory.bw_weights(); without directory
    guards, the caches tried first are drawn with the dir weights (Wb*: here the Guard+Exit
    cache, with most of the bandwidth, gets Wbd=0 and the others Wbm=Wbg=10000)."""
    from collections import Counter

    from onionp2p.dir.client import ClientDirectory

    keys, auths = auth_set(1)
    mixes = [(("Guard", "Running", "V2Dir", "Valid"), 100), (("Running", "V2Dir", "Valid"), 100),
             (("Exit", "Guard", "Running", "V2Dir", "Valid"), 10_000), (("Running", "Valid"), 100)]
    cons = compute_consensus([vote(keys[0], auths[0], [entry(d, f, b) for d, (f, b) in zip(descs, mixes)])],
                             SCHED, VA)
    assert cons.bw_weights  # computed by the authority
    w = dict(cons.bw_weights, Wbd=0, Wbg=10000, Wbm=10000)
    cons = replace(cons, bw_weights=tuple(w.items()))
    cons = cons.with_signatures([(auths[0].ed_id, cons.sign(keys[0]))])
    cd = ClientDirectory(tmp_path, [a.line() for a in auths], None, now=lambda: VA + 10, max_relay_tries=2)
    assert cd.bw_weights() == {}
    assert cd.accept(cons.text.encode(), "test") is not None
    assert cd.bw_weights() == w
    firsts = Counter(cd._relay_sources()[0][0].split()[1] for _ in range(400))
    assert set(firsts) == {"r0", "r1"}  # never the heavy Guard+Exit cache r2 first, never r3 (no V2Dir)
    assert all(len(cd._relay_sources()) == 2 for _ in range(20))
