"""Tor-format server descriptors and extra-info documents (onionp2p.proto.tordesc).

Built from real relay keys, read back with every signature and cross-certificate checked;
each signature or certificate, corrupted, is refused. That a C tor authority accepts them
is tests/test_tor_relay.py's job.
"""

from __future__ import annotations

import base64
import hashlib
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from onionp2p.errors import CertificateError, ProtocolError
from onionp2p.proto.ed25519x import ed25519_public_from_curve25519
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.tordesc import (
    build_extra_info,
    build_server_descriptor,
    descriptor_policy_lines,
    parse_extra_info,
    parse_server_descriptor,
)
from onionp2p.relay.keys import RelayKeys

NOW = int(time.time())


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return RelayKeys.load_or_create(tmp_path_factory.mktemp("k") / "keys")


@pytest.fixture(scope="module")
def tap():
    return rsa.generate_private_key(65537, 1024)


def _desc(keys, tap, **kw):
    ei = build_extra_info(keys, nickname="onionA", published=NOW)
    args = {"nickname": "onionA", "address": "127.0.0.1", "or_port": 5555, "published": NOW, "uptime": 7,
            "bandwidth": (1000, 2000, 300), "platform": "onionp2p 1.0 on Linux",
            "protocols": "FlowCtrl=1-2 Link=4-5 LinkAuth=3 Relay=2-6",
            "exit_policy": ExitPolicy.parse(["accept *:8080", "reject *:*"], reject_private=False),
            "extra_info": ei, "tap_key": tap, "family": ["AA" * 20], "contact": "op@example.invalid",
            "dir_cache": True, **kw}
    return build_server_descriptor(keys, **args), ei


def test_descriptor_round_trip(keys, tap):
    text, ei = _desc(keys, tap)
    d = parse_server_descriptor(text, now=NOW)
    assert (d.nickname, d.address, d.or_port) == ("onionA", "127.0.0.1", 5555)
    assert d.fingerprint == keys.fingerprint and d.identity == keys.identity_public
    assert d.ntor_key == keys.onion_key_public and d.has_tap_key and d.dir_cache
    assert d.bandwidth == (1000, 2000, 300) and d.published == NOW
    assert d.policy == ("accept *:8080", "reject *:*") and d.ipv6_policy == "accept 8080"
    assert d.family == ("AA" * 20,) and d.contact == "op@example.invalid"
    assert d.extra_info_digest == (ei.sha1_hex, ei.sha256_b64)
    # the item order tor's parser wants: router first, identity-ed25519 second, signatures last
    lines = text.splitlines()
    assert lines[0].startswith("router onionA 127.0.0.1 5555 0 0") and lines[1] == "identity-ed25519"
    assert lines[-7].startswith("router-sig-ed25519 ") and lines[-6] == "router-signature"
    assert "fingerprint " + " ".join(keys.fingerprint[i:i + 4] for i in range(0, 40, 4)) in lines


def test_extra_info_digests(keys):
    ei = build_extra_info(keys, nickname="onionA", published=NOW)
    nick, fp, again = parse_extra_info(ei.text, now=NOW)
    assert (nick, fp) == ("onionA", keys.fingerprint)
    assert (again.sha1_hex, again.sha256_b64) == (ei.sha1_hex, ei.sha256_b64)
    raw = ei.text.encode()
    assert ei.sha256_b64 == base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    signed = raw[:raw.index(b"\nrouter-signature\n") + len(b"\nrouter-signature\n")]
    assert ei.sha1_hex == hashlib.sha1(signed).hexdigest().upper()


def test_ntor_crosscert_is_signed_by_the_ntor_keys_twin(keys, tap):
    text, _ = _desc(keys, tap)
    d = parse_server_descriptor(text, now=NOW)
    bit = int(next(ln for ln in text.splitlines() if ln.startswith("ntor-onion-key-crosscert ")).split()[1])
    # the other sign bit names another key, whose signature does not verify
    assert ed25519_public_from_curve25519(d.ntor_key, bit) != ed25519_public_from_curve25519(d.ntor_key, 1 - bit)
    flipped = text.replace(f"ntor-onion-key-crosscert {bit}", f"ntor-onion-key-crosscert {1 - bit}")
    with pytest.raises(CertificateError):
        parse_server_descriptor(flipped, now=NOW)


def _flip_b64_line_after(text: str, marker: str) -> str:
    """Change one base64 character of the object that follows ``marker``."""
    lines = text.split("\n")
    i = lines.index(marker) + 2  # the BEGIN line, then the first body line
    ch = lines[i][10]
    lines[i] = lines[i][:10] + ("A" if ch != "A" else "B") + lines[i][11:]
    return "\n".join(lines)


def test_every_signature_is_checked(keys, tap):
    text, _ = _desc(keys, tap)
    ed_line = next(ln for ln in text.splitlines() if ln.startswith("router-sig-ed25519 "))
    sig = ed_line.split()[1]
    bad_ed = text.replace(ed_line, "router-sig-ed25519 " + ("A" if sig[0] != "A" else "B") + sig[1:])
    with pytest.raises(CertificateError, match="router-sig-ed25519"):
        parse_server_descriptor(bad_ed, now=NOW)
    with pytest.raises(CertificateError, match="router-signature"):
        parse_server_descriptor(_flip_b64_line_after(text, "router-signature"), now=NOW)
    with pytest.raises(CertificateError, match="onion-key-crosscert"):
        parse_server_descriptor(_flip_b64_line_after(text, "onion-key-crosscert"), now=NOW)
    # a changed body line breaks both signatures (the Ed25519 one is checked first)
    with pytest.raises(CertificateError):
        parse_server_descriptor(text.replace("uptime 7", "uptime 8"), now=NOW)
    # certificates expire: the identity cert and the crosscert are checked at `now`
    with pytest.raises(CertificateError, match="expired"):
        parse_server_descriptor(text, now=keys.signing_cert.expires_at + 3600)


def test_tap_key_is_optional_and_travels_with_its_crosscert(keys, tap):
    text, _ = _desc(keys, None)
    d = parse_server_descriptor(text, now=NOW)
    assert not d.has_tap_key and "\nonion-key\n" not in text and "\nonion-key-crosscert" not in text
    with_tap, _ = _desc(keys, tap)
    no_cross = with_tap.split("\nonion-key-crosscert\n")[0] + "\n"
    with pytest.raises(ProtocolError):
        parse_server_descriptor(no_cross, now=NOW)


def test_policy_lines_are_ipv4_as_tor_writes_them():
    p = ExitPolicy.parse(["accept *4:80", "reject [::]/0:*", "accept 10.0.0.0/8:443", "reject *:*"],
                         reject_private=False)
    assert descriptor_policy_lines(p) == ["accept *:80", "accept 10.0.0.0/8:443", "reject *:*"]


def test_create_fast_answer():
    """CREATE_FAST (tor-spec): KDF-TOR(X | Y) = SHA1(K0|00) | SHA1(K0|01) ...; the reply is
    Y | KH and the hop's tor1 key material is what follows KH."""
    from onionp2p.proto.create import answer_create_fast, kdf_tor

    # SHA1(00) and SHA1(01): KDF-TOR of the empty key
    assert kdf_tor(b"", 40).hex() == "5ba93c9db0cff93f52b521d7420e43f6eda2784f" + \
        "bf8b4530d8d246dd74ac53a13471bba17941dff7"
    x, y = bytes(range(20)), bytes(range(20, 40))
    reply, params = answer_create_fast(x + bytes(489), y=y)
    k = kdf_tor(x + y, 92)
    assert reply == y + k[:20] and params.key_material == k[20:] and len(params.key_material) == 72
    assert params.handshake == "create-fast" and params.relay_crypto == "tor1" and params.sendme_inc is None
    with pytest.raises(ProtocolError):
        answer_create_fast(b"short")
