"""Onion-service cryptography (onionp2p/proto/hs/blinding.py, ntor.py; ed25519x blinding).

Every expected value comes from tests/data/hs/vectors.json, whose entries name their source
(rend-spec-v3 examples and Appendix G.1, C tor's unit tests as quoted by Arti, Arti's tests).
"""

from __future__ import annotations

import calendar
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.errors import CertificateError, HandshakeError
from onionp2p.proto.certs import CertType, Ed25519Cert
from onionp2p.proto.ed25519x import ExpandedKey, blind_public
from onionp2p.proto.hs import blinding as hb
from onionp2p.proto.hs.ntor import (HsNtorClient, expand_circuit_keys, hs_mac, intro_keys,
                                    service_receive_intro)

V = json.loads((Path(__file__).parent / "data" / "hs" / "vectors.json").read_text())


def ts(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# -- time periods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("when, number", V["time_periods"]["cases"])
def test_time_period_numbers(when, number):
    assert hb.TimePeriod.at(ts(when)).number == number


def test_time_period_bounds_start_at_noon_utc():
    tp = hb.TimePeriod.at(ts("2016-04-13T11:15:01Z"))
    assert tp.start == ts(V["time_periods"]["period_16903_start"])
    assert tp.end == ts(V["time_periods"]["period_16903_end"])
    assert tp.next().start == tp.end and tp.next().prev() == tp
    assert hb.TimePeriod.at(tp.end - 1) == tp and hb.TimePeriod.at(tp.end) == tp.next()
    # another hsdir-interval (testing networks use short ones) moves the boundaries
    short = hb.TimePeriod.at(ts("2016-04-13T11:15:01Z"), length=60)
    assert short.length == 60 and short.start <= ts("2016-04-13T11:15:01Z") < short.end
    with pytest.raises(ValueError):
        hb.TimePeriod(1, length=29)


# -- blinding ----------------------------------------------------------------------------------------


def _kb():
    v = V["key_blinding"]
    tp = hb.TimePeriod.at(ts(v["time"]), length=v["period_length"])
    sec = h(v["identity_secret_expanded"])
    return v, tp, ExpandedKey.from_parts(sec[:32], sec[32:])


def test_blinding_vector_from_c_tor():
    v, tp, key = _kb()
    pub = h(v["identity_public"])
    assert tp.number == v["period_number"]
    assert key.public == pub
    assert hb.blinding_factor(pub, tp) == h(v["blinding_factor"])
    assert hb.blind_public_key(pub, tp) == h(v["blinded_public"])
    blinded = hb.blind_secret_key(key, tp)
    assert blinded.scalar + blinded.prefix == h(v["blinded_secret_expanded"])
    assert blinded.public == h(v["blinded_public"])
    assert hb.subcredential(pub, blinded.public) == h(v["subcredential"])


def test_blinded_signature_verifies_with_cryptography():
    v, tp, key = _kb()
    blinded = hb.blind_secret_key(key, tp)
    verifier = ed25519.Ed25519PublicKey.from_public_bytes(hb.blind_public_key(key.public, tp))
    sig = blinded.sign(b"descriptor body")
    verifier.verify(sig, b"descriptor body")
    with pytest.raises(InvalidSignature):
        verifier.verify(sig, b"another body")
    # the identity key's signature does not verify under the blinded key
    with pytest.raises(InvalidSignature):
        verifier.verify(key.sign(b"descriptor body"), b"descriptor body")


def test_blinding_of_random_keys_and_periods_is_consistent():
    for i in range(10):
        key = ExpandedKey.from_seed(os.urandom(32))
        tp = hb.TimePeriod(20000 + i)
        blinded = hb.blind_secret_key(key, tp)
        assert blinded.public == hb.blind_public_key(key.public, tp)
        assert blinded.public != hb.blind_public_key(key.public, tp.next())
        ed25519.Ed25519PublicKey.from_public_bytes(blinded.public).verify(blinded.sign(b"m%d" % i), b"m%d" % i)


def test_generic_group_operations_in_ed25519x():
    key = ExpandedKey.from_seed(os.urandom(32))
    factor = os.urandom(32)[:31] + b"\x01"
    assert key.blind(factor, bytes(32)).public == blind_public(key.public, factor)
    with pytest.raises(ValueError):
        blind_public(bytes(32), factor)  # not a point of the prime-order group


def test_hash_ring_indexes_c_tor_vector():
    v = V["hs_indexes"]
    tp = hb.TimePeriod(v["period_number"], v["period_length"])
    assert hb.hs_index(h(v["blinded_public"]), v["replica"], tp) == h(v["hs_index"])
    assert hb.hsdir_index(h(v["node_ed25519_id"]), h(v["shared_random"]), tp) == h(v["hsdir_index"])
    # replicas, periods and SRVs all move the positions
    assert hb.hs_index(h(v["blinded_public"]), 2, tp) != h(v["hs_index"])
    assert hb.hsdir_index(h(v["node_ed25519_id"]), bytes(32), tp) != h(v["hsdir_index"])


def test_disaster_srv_follows_the_spec_formula():
    import hashlib
    tp = hb.TimePeriod(19397)
    want = hashlib.sha3_256(b"shared-random-disaster" + (1440).to_bytes(8, "big") + (19397).to_bytes(8, "big"))
    assert hb.disaster_srv(tp) == want.digest()


def test_desc_signing_cert_is_signed_by_the_blinded_key():
    v, tp, key = _kb()
    blinded = hb.blind_secret_key(key, tp)
    signing = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    now = 1_700_000_000
    cert = Ed25519Cert.parse(hb.desc_signing_cert(blinded, signing, now=now).encode())
    assert cert.cert_type == CertType.HS_BLINDED_ID_V_SIGNING and cert.certified_key == signing
    assert cert.signed_with == blinded.public
    cert.verify(hb.blind_public_key(key.public, tp), now=now)
    assert cert.expires_at >= now + hb.DESC_CERT_LIFETIME
    with pytest.raises(CertificateError):
        cert.verify(key.public, now=now)  # not the identity key
    with pytest.raises(CertificateError):
        cert.verify(now=now + hb.DESC_CERT_LIFETIME + 3601)  # expired


# -- hs-ntor ----------------------------------------------------------------------------------------


def _nt():
    return {k: (h(x) if k != "source" else x) for k, x in V["hs_ntor"].items()}


def test_hs_ntor_mac_vectors():
    for key, msg, want in V["hs_ntor_mac"]["cases"]:
        assert hs_mac(key.encode(), msg.encode()).hex() == want


def test_hs_ntor_spec_vector_client_side():
    v = _nt()
    client = HsNtorClient(v["KP_hss_ntor"], v["KP_hs_ipd_sid"], v["N_hs_subcred"],
                          secret=X25519PrivateKey.from_private_bytes(v["x"]))
    assert client.client_pk == v["X"]
    assert client.keys.enc_key == v["ENC_KEY"] and client.keys.mac_key == v["MAC_KEY"]
    assert v["H"] + client.encrypt_intro(v["H"], v["P"]) == v["INTRODUCE1_BODY"]
    assert client.complete(v["Y"] + v["AUTH_INPUT_MAC"]) == v["NTOR_KEY_SEED"]


def test_hs_ntor_spec_vector_service_side():
    v = _nt()
    b = X25519PrivateKey.from_private_bytes(v["KS_hss_ntor"])
    assert b.public_key().public_bytes_raw() == v["KP_hss_ntor"]
    body = v["INTRODUCE1_BODY"]
    intro = service_receive_intro(b, v["KP_hs_ipd_sid"], v["N_hs_subcred"], body[:len(v["H"])],
                                  body[len(v["H"]):])
    assert intro.plaintext == v["P"] and intro.client_pk == v["X"]
    reply, seed = intro.reply(b, v["KP_hs_ipd_sid"], secret=X25519PrivateKey.from_private_bytes(v["y"]))
    assert reply == v["Y"] + v["AUTH_INPUT_MAC"] and seed == v["NTOR_KEY_SEED"]


def test_hs_ntor_rejects_tampering():
    v = _nt()
    b = X25519PrivateKey.from_private_bytes(v["KS_hss_ntor"])
    body, n = v["INTRODUCE1_BODY"], len(v["H"])
    for pos in (0, n + 40, len(body) - 1):  # header, ciphertext, MAC
        bad = bytearray(body)
        bad[pos] ^= 1
        with pytest.raises(HandshakeError):
            service_receive_intro(b, v["KP_hs_ipd_sid"], v["N_hs_subcred"], bytes(bad[:n]), bytes(bad[n:]))
    with pytest.raises(HandshakeError):  # another subcredential: another onion address
        service_receive_intro(b, v["KP_hs_ipd_sid"], bytes(32), body[:n], body[n:])
    client = HsNtorClient(v["KP_hss_ntor"], v["KP_hs_ipd_sid"], v["N_hs_subcred"],
                          secret=X25519PrivateKey.from_private_bytes(v["x"]))
    bad_auth = bytearray(v["Y"] + v["AUTH_INPUT_MAC"])
    bad_auth[-1] ^= 1
    with pytest.raises(HandshakeError):
        client.complete(bytes(bad_auth))
    with pytest.raises(HandshakeError):
        client.complete(v["Y"])  # truncated


def test_hs_ntor_round_trip_and_circuit_keys():
    b = X25519PrivateKey.generate()
    auth = ExpandedKey.from_seed(os.urandom(32)).public
    sub = os.urandom(32)
    client = HsNtorClient(b.public_key().public_bytes_raw(), auth, sub)
    header = os.urandom(60)
    intro = service_receive_intro(b, auth, sub, header, client.encrypt_intro(header, b"rendezvous cookie etc"))
    assert intro.plaintext == b"rendezvous cookie etc"
    reply, seed = intro.reply(b, auth)
    assert client.complete(reply) == seed
    keys = expand_circuit_keys(seed)
    assert len({keys.df, keys.db, keys.kf, keys.kb}) == 4 and all(len(k) == 32 for k in
                                                                  (keys.df, keys.db, keys.kf, keys.kb))
    assert intro_keys(bytes(32), auth, bytes(32), bytes(32), sub) != intro_keys(bytes(32), auth, bytes(32),
                                                                                 bytes(32), os.urandom(32))
