"""The onion-service client's pure parts: where the descriptor is (period, SRV or tor's disaster
SRV, blinded key, HSDirs) and INTRODUCE1 as tor builds it (onionp2p/proto/hs/client.py,
IntroducePlaintext in onionp2p/proto/hs/cells.py)."""

from __future__ import annotations

import calendar
import json
import os
import random
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.errors import HandshakeError, ProtocolError
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.blinding import TimePeriod, blind_public_key, disaster_srv, subcredential
from onionp2p.proto.hs.cells import INTRODUCE1_MIN_SIZE, Extension, Introduce2, IntroducePlaintext
from onionp2p.proto.hs.client import SOCKS_REPLY, fetch_plan, make_introduce1
from onionp2p.proto.hs.desc import IntroPoint
from onionp2p.proto.hs.ntor import service_receive_intro
from onionp2p.proto.hs.ring import responsible_hsdirs
from onionp2p.proto.relaycell import LinkSpec, LinkSpecType

V = json.loads((Path(__file__).parent / "data" / "hs" / "vectors.json").read_text())


def h(s: str) -> bytes:
    return bytes.fromhex(s)


def utc(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


# -- INTRODUCE1's plaintext ----------------------------------------------------------------------------


def test_introduce_plaintext_reads_and_rewrites_tors_bytes() -> None:
    """rend-spec-v3 Appendix G.1's plaintext, dumped from C tor: the cookie, tor's congestion
    control request extension (type 1, empty), the rendezvous point's ntor key, its three link
    specifiers, and zero padding up to INTRODUCE1_MIN_SIZE with the cleartext header."""
    v = V["hs_ntor"]
    p = IntroducePlaintext.parse(h(v["P"]))
    assert p.cookie == h(v["P"])[:20] and p.extensions == (Extension(1, b""),)
    assert p.onion_key_type == 1 and len(p.onion_key) == 32
    assert [s.lstype for s in p.link_specifiers] == [LinkSpecType.IPV4, LinkSpecType.LEGACY_ID,
                                                     LinkSpecType.ED25519_ID]
    assert p.link_specifiers[0] == LinkSpec.ipv4("127.0.0.1", 5001)
    # tor's padding rule gives exactly tor's length, and the bytes come back identical
    assert INTRODUCE1_MIN_SIZE - len(h(v["H"])) == len(h(v["P"]))
    assert p.encode(INTRODUCE1_MIN_SIZE - len(h(v["H"]))) == h(v["P"])


def test_introduce_plaintext_refuses_truncation() -> None:
    raw = h(V["hs_ntor"]["P"])
    for n in (10, 21, 40, 60, 100):
        with pytest.raises(ProtocolError):
            IntroducePlaintext.parse(raw[:n])


# -- INTRODUCE1 -------------------------------------------------------------------------------------


def test_make_introduce1_is_read_by_the_service() -> None:
    enc = X25519PrivateKey.generate()
    auth = ExpandedKey.from_seed(os.urandom(32)).public
    ip = IntroPoint((LinkSpec.ipv4("127.0.0.2", 9001),), os.urandom(32), auth,
                    enc.public_key().public_bytes_raw())
    sub, cookie, rend_key = os.urandom(32), os.urandom(20), os.urandom(32)
    specs = (LinkSpec.ipv4("127.0.0.3", 9002), LinkSpec.legacy_id(os.urandom(20)),
             LinkSpec.ed25519_id(os.urandom(32)))
    body, hs = make_introduce1(ip, sub, cookie, specs, rend_key)
    cell = Introduce2.parse(body)  # the intro point passes INTRODUCE1's body on unchanged
    cell.validate()
    assert cell.auth_key == auth
    header = body[:len(body) - len(cell.encrypted)]
    intro = service_receive_intro(enc, auth, sub, header, cell.encrypted)
    plain = IntroducePlaintext.parse(intro.plaintext)
    assert (plain.cookie, plain.onion_key, plain.link_specifiers) == (cookie, rend_key, specs)
    assert len(header) + len(intro.plaintext) == INTRODUCE1_MIN_SIZE  # padded as tor pads
    reply, seed = intro.reply(enc, auth)
    assert hs.complete(reply) == seed
    with pytest.raises(HandshakeError):  # another subcredential (another address) cannot read it
        service_receive_intro(enc, auth, os.urandom(32), header, cell.encrypted)


# -- where the descriptor is ---------------------------------------------------------------------------


def _ring(n: int = 12) -> list[bytes]:
    rng = random.Random(9)
    return [rng.randbytes(32) for _ in range(n)]


@pytest.mark.parametrize("when", ["2026-12-07 15:00", "2026-12-07 04:00"])
def test_fetch_plan_uses_tors_disaster_srv_without_srvs(when: str) -> None:
    """No SRV in the consensus: a client uses the current SRV in 12:00-24:00 and the previous
    one in 00:00-12:00, always with the current period; tor's node_set_hsdir_index asks
    hs_get_current_srv / hs_get_previous_srv with that period, so the disaster SRV replacing
    either is the current period's."""
    identity = ExpandedKey.from_seed(os.urandom(32)).public
    va = utc(when)
    plan = fetch_plan(identity, _ring(), valid_after=va, srv_current=None, srv_previous=None)
    period = TimePeriod.at(va)
    assert plan.choice.period == period and plan.srv_source == "disaster"
    assert plan.choice.srv == disaster_srv(period)
    assert plan.blinded_key == blind_public_key(identity, period)
    assert plan.subcred == subcredential(identity, plan.blinded_key)
    expected = responsible_hsdirs(_ring(), plan.blinded_key, period, disaster_srv(period), spread=3)
    assert sorted(plan.hsdirs) == sorted(expected) and len(plan.hsdirs) == 6


def test_fetch_plan_uses_the_consensus_srvs() -> None:
    identity = ExpandedKey.from_seed(os.urandom(32)).public
    cur, prev = os.urandom(32), os.urandom(32)
    day = fetch_plan(identity, _ring(), valid_after=utc("2026-12-07 15:00"), srv_current=cur,
                     srv_previous=prev)
    night = fetch_plan(identity, _ring(), valid_after=utc("2026-12-07 03:00"), srv_current=cur,
                       srv_previous=prev)
    assert day.choice.srv == cur and night.choice.srv == prev and day.srv_source == "consensus"
    # a small ring: every HSDir, each once
    small = fetch_plan(identity, _ring(4), valid_after=utc("2026-12-07 15:00"), srv_current=cur,
                       srv_previous=prev)
    assert sorted(small.hsdirs) == sorted(_ring(4))


def test_socks_port_answers_onion_failures_with_tors_codes() -> None:
    """With ExtendedErrors the SOCKS port answers an HsConnectError with its kind's X'Fx'
    code; without, with 04 (host unreachable), as tor does for onion-service failures."""
    from onionp2p.client.hsclient import HsConnectError
    from onionp2p.client.socksport import extended_code
    from onionp2p.proto.socks import reply_code_for_error

    for kind, code in SOCKS_REPLY.items():
        exc = HsConnectError("failed", kind)
        assert extended_code(exc) == code and reply_code_for_error(exc) == 0x04


def test_socks_replies_are_tors() -> None:
    assert {k: int(v) for k, v in SOCKS_REPLY.items()} == {
        "desc_not_found": 0xF0, "desc_invalid": 0xF1, "intro_failed": 0xF2, "rend_failed": 0xF3,
        "missing_client_auth": 0xF4, "bad_client_auth": 0xF5, "bad_address": 0xF6, "intro_timedout": 0xF7}


# -- the SRVs of a tor consensus ------------------------------------------------------------------------


def test_tor_consensus_shared_random_values() -> None:
    """tor 0.4.9's consensus of the private tor network (TestingTorNetwork) carries the current
    SRV and, this early in the network's life, no previous one."""
    import base64

    from onionp2p.dir.tordir import parse_consensus

    raw = (Path(__file__).parent / "data" / "tor" / "consensus-microdesc").read_bytes()
    c = parse_consensus(raw)
    assert c.srv_current == base64.b64decode("zxJao+gBmFMSezvz/VXkEWEQJD5b/z+7AXNCGoLFVW0=")
    assert c.srv_previous is None
    prev = os.urandom(32)
    line = b"shared-rand-current-value 0 zxJao+gBmFMSezvz/VXkEWEQJD5b/z+7AXNCGoLFVW0=\n"
    with_prev = raw.replace(line, line + b"shared-rand-previous-value 9 " + base64.b64encode(prev) + b"\n")
    c2 = parse_consensus(with_prev)
    assert c2.srv_previous == prev and c2.srv_current == c.srv_current
    # malformed: taken as absent, as tor does (the disaster SRV then applies)
    c3 = parse_consensus(raw.replace(line, b"shared-rand-current-value 0 AAAA\n"))
    assert c3.srv_current is None
    plan = fetch_plan(ExpandedKey.from_seed(os.urandom(32)).public, _ring(), valid_after=c2.valid_after,
                      srv_current=c2.srv_current, srv_previous=c2.srv_previous)
    assert plan.srv_source == "consensus" and plan.choice.srv in (c2.srv_current, prev)
    # only the current SRV (the tor network's first hours): in 00:00-12:00 the previous one is
    # needed, and the disaster SRV stands in for it
    night = fetch_plan(ExpandedKey.from_seed(os.urandom(32)).public, _ring(),
                       valid_after=utc("2026-12-07 03:00"), srv_current=c.srv_current, srv_previous=None)
    assert night.srv_source == "disaster" and night.choice.srv == disaster_srv(night.choice.period)


def test_fetch_plan_matches_a_tor_service_in_a_testing_network() -> None:
    """Values from tor 0.4.9's info log (upload_descriptor_to_hsdir) as a service in our private
    tor network (TestingTorNetwork, 10 s voting interval, no SRV in the consensus yet): its
    "current" descriptor for time period #7485912 (4-minute periods: one shared-random run)
    went under blinded key AC4528ED..., and HSDir auth2 sat at ring index F0D90821... -- tor
    keyed that index with the disaster SRV of the period itself."""
    import base64

    from onionp2p.proto.hs.address import parse_onion_address
    from onionp2p.proto.hs.blinding import hsdir_index

    identity = parse_onion_address("ktrf2xh4acgyl6h7hrpuxdu7bdwnr6sdy2xayi5kkodc375zjaj3nbqd.onion").pubkey
    auth2 = base64.b64decode("aUU28EimYLtZoq/cTAs96bCas9/LHzFZl6wAG7vaFhQ=")
    plan = fetch_plan(identity, [auth2], valid_after=1796619200, srv_current=None, srv_previous=None,
                      voting_interval=10, period_length=4)
    assert plan.choice.period == TimePeriod(7485912, 4, 2) and plan.srv_source == "disaster"
    assert plan.blinded_key == h("AC4528ED9DF368695D8734CC9C965730AB3DE5E58475601670D20B6C8C88E84A")
    assert hsdir_index(auth2, plan.choice.srv, plan.choice.period) == h(
        "F0D9082177924645E98B56F4C076AF081FFAA519621200005231BCAE22F27198")
