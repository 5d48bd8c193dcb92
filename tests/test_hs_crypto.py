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
from onionp2p.proto.hs.ntor import (
    HsNtorClient,
    expand_circuit_keys,
    hs_mac,
    intro_keys,
    service_receive_intro,
)

from conftest import unavailable

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
    for bad in (0, 14401):
        with pytest.raises(ValueError):
            hb.TimePeriod(1, length=bad)
    # a TestingTorNetwork (10-second votes): 4-minute periods offset by 2 minutes
    test_tp = hb.TimePeriod.at(ts("2016-04-13T11:15:01Z"), length=4, offset=2)
    assert test_tp.start == ts("2016-04-13T11:14:00Z") and test_tp.end == ts("2016-04-13T11:18:00Z")


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
    _v, tp, key = _kb()
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
    _v, tp, key = _kb()
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


# -- service keys on disk (HiddenServiceDir) and client authorization files ---------------------------


def _tor_binary() -> str:
    import shutil
    path = shutil.which("tor") or ("/usr/sbin/tor" if os.access("/usr/sbin/tor", os.X_OK) else None)
    if path is None:
        unavailable("tor not installed (Debian package tor; tools/test installs it)")
    return path


def _start_tor(work: Path, extra: str):
    """A real tor whose only directory authority is a closed loopback port: it starts, loads
    its onion-service and client-auth keys, and never leaves this machine."""
    import subprocess
    data = work / "tordata"
    data.mkdir(mode=0o700)
    torrc = work / "torrc"
    torrc.write_text(
        f"DataDirectory {data}\nSocksPort 0\nLog notice file {work / 'tor.log'}\n"
        "DirAuthority fake orport=1 no-v2 v3ident=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA "
        "127.0.0.1:2 BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB\n" + extra)
    return subprocess.Popen([_tor_binary(), "-f", str(torrc)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait(proc, work: Path, ready, what: str):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = ready()
        if got:
            return got
        log = work / "tor.log"
        assert proc.poll() is None, log.read_text() if log.exists() else "tor exited"
        time.sleep(0.2)
    pytest.fail(f"tor: no {what} in 60 s:\n" + (work / "tor.log").read_text())


def _run_tor_on(hs_dir: Path, work: Path) -> str:
    """Start a real tor with HiddenServiceDir ``hs_dir``; return the hostname it writes."""
    proc = _start_tor(work, f"HiddenServiceDir {hs_dir}\nHiddenServicePort 80 127.0.0.1:9\n")
    host = hs_dir / "hostname"
    try:
        return _wait(proc, work, lambda: host.exists() and host.read_text().endswith("\n") and host.read_text(),
                     "hostname")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_service_dir_round_trip_and_file_formats(tmp_path):
    from onionp2p.client.hskeys import load_or_create_service_key, load_service_key
    from onionp2p.proto.hs.address import encode_onion_address
    d = tmp_path / "hs"
    key = load_or_create_service_key(d)
    assert (d.stat().st_mode & 0o777) == 0o700
    secret = (d / "hs_ed25519_secret_key").read_bytes()
    assert secret[:32] == b"== ed25519v1-secret: type0 ==\0\0\0" and secret[32:] == key.scalar + key.prefix
    assert (d / "hs_ed25519_public_key").read_bytes() == b"== ed25519v1-public: type0 ==\0\0\0" + key.public
    assert (d / "hostname").read_text() == encode_onion_address(key.public) + "\n"
    assert load_service_key(d) == key and load_or_create_service_key(d) == key
    (d / "hostname").unlink()
    (d / "hs_ed25519_public_key").unlink()
    assert load_or_create_service_key(d) == key and (d / "hostname").exists()


def test_service_dir_refuses_bad_files(tmp_path):
    from onionp2p.client.hskeys import load_or_create_service_key, load_service_key
    from onionp2p.errors import KeyFileError
    d = tmp_path / "hs"
    load_or_create_service_key(d)
    good = (d / "hs_ed25519_secret_key").read_bytes()
    (d / "hs_ed25519_secret_key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_service_key(d)
    (d / "hs_ed25519_secret_key").chmod(0o600)
    (d / "hs_ed25519_secret_key").write_bytes(good.replace(b"secret", b"public"))
    with pytest.raises(KeyFileError, match="does not start with"):
        load_service_key(d)
    (d / "hs_ed25519_secret_key").write_bytes(good[:-1])
    with pytest.raises(KeyFileError, match="bytes, expected"):
        load_service_key(d)
    (d / "hs_ed25519_secret_key").write_bytes(good)
    other = ExpandedKey.from_seed(os.urandom(32)).public
    (d / "hs_ed25519_public_key").write_bytes(b"== ed25519v1-public: type0 ==\0\0\0" + other)
    with pytest.raises(KeyFileError, match="does not match"):
        load_service_key(d)


@pytest.mark.tor
def test_tor_reads_our_keys_and_we_read_tors(tmp_path):
    """A real tor, given a HiddenServiceDir with only our secret key, computes the same address;
    and the keys tor generates load here to the address tor wrote."""
    import shutil

    from onionp2p.client.hskeys import load_or_create_service_key, load_service_key
    from onionp2p.proto.hs.address import encode_onion_address
    ours = tmp_path / "ours"
    key = load_or_create_service_key(ours)
    expected = (ours / "hostname").read_text()
    copy = tmp_path / "for-tor"
    copy.mkdir(mode=0o700)
    shutil.copy2(ours / "hs_ed25519_secret_key", copy / "hs_ed25519_secret_key")  # tor must derive the rest
    (tmp_path / "w1").mkdir()
    assert _run_tor_on(copy, tmp_path / "w1") == expected
    assert (copy / "hs_ed25519_public_key").read_bytes()[32:] == key.public

    fresh = tmp_path / "tor-made"
    fresh.mkdir(mode=0o700)
    (tmp_path / "w2").mkdir()
    tor_hostname = _run_tor_on(fresh, tmp_path / "w2")
    tor_key = load_service_key(fresh)
    assert tor_key is not None and encode_onion_address(tor_key.public) + "\n" == tor_hostname


def test_client_auth_file_formats():
    from onionp2p.errors import KeyFileError
    from onionp2p.proto.hs import keys as hk
    v = V["descriptor_2_client_auth"]
    line = f"descriptor:x25519:{v['client_public_base32']}"
    assert hk.parse_auth(line) == h(v["client_public"])
    assert hk.format_auth(h(v["client_public"])) == line + "\n"
    assert hk.parse_auth(line.lower() + "\n") == h(v["client_public"])  # tor reads either case
    assert len(hk.parse_auth(V["client_auth_file"]["auth_line"])) == 32  # the spec's example
    private = f"{v['address'][:-6]}:descriptor:x25519:{v['client_secret_base32']}"
    entry = hk.parse_auth_private(private)
    assert entry.onion_public == h(v["identity_public"]) and entry.secret == h(v["client_secret"])
    assert entry.private_key().public_key().public_bytes_raw() == h(v["client_public"])
    assert hk.format_auth_private(entry.onion_public, entry.secret) == private + "\n"
    for bad in ("descriptor:ed25519:" + v["client_public_base32"], "descriptor:x25519:AAAA",
                line + "\n" + line, "x25519:" + v["client_public_base32"]):
        with pytest.raises(KeyFileError):
            hk.parse_auth(bad)
    broken = private.replace(v["address"][10], "a" if v["address"][10] != "a" else "b", 1)
    with pytest.raises(KeyFileError, match="checksum"):
        hk.parse_auth_private(broken)


# -- which HSDirs, which period, which SRV ---------------------------------------------------------


def test_fetch_and_upload_choices_follow_the_spec_examples():
    """rend-spec-v3 §2.2.4's pictures: SRV#n at 00:00, TP#n at 12:00 the same day."""
    from onionp2p.proto.hs.ring import (
        client_fetch_choice,
        in_period_between_tp_and_srv,
        service_upload_choices,
    )
    cur, prev = b"\x02" * 32, b"\x01" * 32
    tp1_start = ts("2016-04-12T12:00:00Z")  # TP#1 = period 16903, SRV#1 published at 2016-04-12 00:00
    c1 = ts("2016-04-12T13:00:00Z")  # right after TP#1: SRV#1 is the current value
    assert in_period_between_tp_and_srv(c1)
    assert client_fetch_choice(c1, cur, prev) == hb_choice(16903, cur)
    first, second = service_upload_choices(c1, cur, prev)
    assert first == hb_choice(16902, prev) and second == hb_choice(16903, cur)
    c2 = ts("2016-04-13T01:00:00Z")  # right after SRV#2: still TP#1, whose SRV is now the previous one
    assert not in_period_between_tp_and_srv(c2)
    assert client_fetch_choice(c2, cur, prev) == hb_choice(16903, prev)
    first, second = service_upload_choices(c2, cur, prev)
    assert first == hb_choice(16903, prev) and second == hb_choice(16904, cur)
    assert hb.TimePeriod.at(c1).start == tp1_start


def hb_choice(number: int, srv: bytes):
    from onionp2p.proto.hs.ring import RingChoice
    return RingChoice(hb.TimePeriod(number), srv)


def test_responsible_hsdirs_walk_the_ring():
    from onionp2p.proto.hs.ring import responsible_hsdirs
    tp, srv = hb.TimePeriod(19000), os.urandom(32)
    blinded = ExpandedKey.from_seed(os.urandom(32)).public
    nodes = [os.urandom(32) for _ in range(20)]
    got = responsible_hsdirs(nodes, blinded, tp, srv)
    assert len(got) == len(set(got)) == 8
    ring = sorted(nodes, key=lambda n: hb.hsdir_index(n, srv, tp))
    after = [n for n in ring if hb.hsdir_index(n, srv, tp) > hb.hs_index(blinded, 1, tp)] + \
        [n for n in ring if hb.hsdir_index(n, srv, tp) <= hb.hs_index(blinded, 1, tp)]
    assert got[:4] == after[:4]  # replica 1: the four relays that follow its index, round the ring
    # a smaller spread: three relays per replica, replica 1's still the three after its index
    # (which of the rest replica 2 takes depends on where its index falls: no order to compare)
    three = responsible_hsdirs(nodes, blinded, tp, srv, spread=3)
    assert len(three) == len(set(three)) == 6 and three[:3] == after[:3]
    # a small ring: every relay once, however many replicas want it
    few = nodes[:5]
    assert sorted(responsible_hsdirs(few, blinded, tp, srv)) == sorted(few)
    assert responsible_hsdirs([], blinded, tp, srv) == []
    # another SRV or period gives another set
    assert responsible_hsdirs(nodes, blinded, tp, os.urandom(32)) != got


@pytest.mark.tor
def test_tor_loads_our_auth_private_file(tmp_path):
    """A real tor reads the .auth_private we write (ClientOnionAuthDir) and shows the same key
    on its control port (ONION_CLIENT_AUTH_VIEW)."""
    import base64
    import socket

    from conftest import free_port

    from onionp2p.proto.hs import keys as hk
    v = V["descriptor_2_client_auth"]
    auth = tmp_path / "auth"
    auth.mkdir(mode=0o700)
    (auth / "svc.auth_private").write_text(hk.format_auth_private(h(v["identity_public"]), h(v["client_secret"])))
    (auth / "svc.auth_private").chmod(0o600)
    port = free_port()
    proc = _start_tor(tmp_path, f"ControlPort 127.0.0.1:{port}\nCookieAuthentication 0\nClientOnionAuthDir {auth}\n")

    def view() -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"AUTHENTICATE\r\nONION_CLIENT_AUTH_VIEW\r\nQUIT\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                return data.decode()
        except OSError:
            return None

    try:
        reply = _wait(proc, tmp_path, view, "control port")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    secret_b64 = base64.b64encode(h(v["client_secret"])).decode()
    assert f"CLIENT {v['address'][:-6]} x25519:{secret_b64}" in reply, reply
