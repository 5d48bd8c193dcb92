"""Reading tor's directory (onionp2p.dir.tordir): parsing, verification, tampering, fuzzing.

The documents in tests/data/tor/ were fetched from a private network of tor 0.4.9
authorities started with tools/tornet.py (3 authorities, 5 relays, 2 exits); NOW lies
inside that consensus's validity interval. No tor process is needed here.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onionp2p.dir.server import DirServer, HttpResponse
from onionp2p.dir.tordir import (
    KeyCertificate,
    TorDirectoryError,
    fetch_tor_directory,
    parse_consensus,
    parse_dirauth_line,
    parse_key_certificates,
    parse_microdescriptors,
    read_dirauth_file,
    router_statuses,
    verify_consensus,
)
from onionp2p.errors import CertificateError, ConfigError, ProtocolError
from onionp2p.proto.directory import ConsensusError

DATA = Path(__file__).parent / "data" / "tor"
DIRAUTH = (DATA / "dirauth.txt").read_text().splitlines()
KEYS = (DATA / "keys-all").read_bytes()
CONSENSUS = (DATA / "consensus-microdesc").read_bytes()
MICRODESCS = (DATA / "microdescs").read_bytes()
AUTHS = [parse_dirauth_line(ln) for ln in DIRAUTH]
NOW = parse_consensus(CONSENSUS).valid_after + 5
SIGNED_END = CONSENSUS.index(b"\ndirectory-signature ") + len(b"\ndirectory-signature ")
RELAYS = {"exit0", "exit1", "relay2", "relay3", "relay4"}


def verify(raw: bytes = CONSENSUS, certs: bytes = KEYS, auths=AUTHS, now: float = NOW):
    return verify_consensus(parse_consensus(raw), auths, parse_key_certificates(certs), now=now)


# -- DirAuthority lines --------------------------------------------------------------------------
def test_dirauth_line_fields():
    a = parse_dirauth_line("DirAuthority auth0 orport=5000 no-v2 v3ident=" + "AB" * 20
                           + " 127.0.0.1:7000 " + "0123 4567 89AB CDEF 0123 4567 89AB CDEF 0123 4567")
    assert (a.nickname, a.address, a.dir_port, a.or_port) == ("auth0", "127.0.0.1", 7000, 5000)
    assert a.v3ident == bytes.fromhex("AB" * 20)
    assert a.fingerprint == bytes.fromhex("0123456789ABCDEF" * 2 + "01234567")
    # the nickname is optional, the keyword too
    b = parse_dirauth_line("v3ident=" + "CD" * 20 + " 10.0.0.1:80 " + "EF" * 20)
    assert (b.nickname, b.or_port, b.dir_port) == ("", 0, 80)


@pytest.mark.parametrize("line", [
    "DirAuthority auth0 orport=5000 127.0.0.1:7000 " + "AB" * 20,  # no v3ident: not a v3 authority
    "DirAuthority auth0 v3ident=XYZ 127.0.0.1:7000 " + "AB" * 20,
    "DirAuthority auth0 v3ident=" + "AB" * 20 + " host.example:7000 " + "AB" * 20,
    "DirAuthority auth0 v3ident=" + "AB" * 20 + " 127.0.0.1:0 " + "AB" * 20,
    "DirAuthority auth0 v3ident=" + "AB" * 20 + " 127.0.0.1:7000 ABCD",
    "DirAuthority auth0 orport=99999 v3ident=" + "AB" * 20 + " 127.0.0.1:7000 " + "AB" * 20,
    "",
])
def test_bad_dirauth_lines(line):
    with pytest.raises(ConfigError):
        parse_dirauth_line(line)


def test_dirauth_file(tmp_path):
    f = tmp_path / "auth.txt"
    f.write_text("# private network\n\n" + "\n".join(DIRAUTH) + "\n")
    assert read_dirauth_file(f) == DIRAUTH
    f.write_text("# nothing\n")
    with pytest.raises(ConfigError):
        read_dirauth_file(f)
    with pytest.raises(ConfigError):
        read_dirauth_file(tmp_path / "missing")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_dirauth_fuzz_only_config_errors(text):
    try:
        parse_dirauth_line(text)
    except ConfigError:
        pass


# -- key certificates ----------------------------------------------------------------------------
def test_key_certificates_verify():
    certs = parse_key_certificates(KEYS)
    assert {c.fingerprint for c in certs} == {a.v3ident for a in AUTHS}
    for c in certs:
        c.verify(NOW)
        assert c.identity_key.key_size == 3072 and c.signing_key.key_size == 2048  # tor-gencert's sizes
        assert c.published <= NOW < c.expires


def test_key_certificate_time_checks():
    cert = parse_key_certificates(KEYS)[0]
    with pytest.raises(CertificateError, match="expired"):
        cert.verify(cert.expires + 3600)
    with pytest.raises(CertificateError, match="future"):
        cert.verify(cert.published - 3600)


def test_key_certificate_tampering_is_detected():
    text = KEYS.split(b"dir-key-certificate-version")[1]
    one = b"dir-key-certificate-version" + text
    # any change to the certified text breaks dir-key-certification
    later = one.replace(b"dir-key-expires 20", b"dir-key-expires 21", 1)
    with pytest.raises(CertificateError, match="dir-key-certification"):
        parse_key_certificates(later)[0].verify(NOW)
    # another authority's signing key: the identity key's signature and the cross-cert fail
    a, b = parse_key_certificates(KEYS)[:2]
    with pytest.raises(CertificateError):
        replace(a, signing_key=b.signing_key).verify(NOW)
    with pytest.raises(CertificateError, match="crosscert"):  # even with a matching certification
        replace(a, crosscert=b.crosscert).verify(NOW)
    with pytest.raises(CertificateError, match="fingerprint"):
        replace(a, fingerprint=b.fingerprint).verify(NOW)


def test_standard_pkcs1_signatures_are_not_tor_signatures():
    """tor signs the bare digest with PKCS#1 type-1 padding; a signature over the same digest
    *with* the DigestInfo prefix (what RSA-SHA1 signing APIs make) must not verify."""
    ident = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    signing = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = ident.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    body = b"dir-key-certificate-version 3\n...dir-key-certification\n"
    cert = KeyCertificate(
        fingerprint=hashlib.sha1(der).digest(), published=NOW - 10, expires=NOW + 10,
        identity_key=ident.public_key(), signing_key=signing.public_key(),
        crosscert=signing.sign(der, padding.PKCS1v15(), hashes.SHA1()),
        certification=ident.sign(body, padding.PKCS1v15(), hashes.SHA1()),
        signed_digest=hashlib.sha1(body).digest(),
    )
    with pytest.raises(CertificateError, match="signature"):
        cert.verify(NOW)


# -- consensus -------------------------------------------------------------------------------------
def test_consensus_parses_like_tor_wrote_it():
    c = parse_consensus(CONSENSUS)
    assert c.valid_after < c.fresh_until < c.valid_until
    assert len(c.entries) == 8 and len(c.signatures) == 3
    assert {s.algorithm for s in c.signatures} == {"sha256"}
    assert {"Exit", "Fast", "Guard", "Running", "Valid"} <= set(c.known_flags)
    assert c.digests["sha256"] == hashlib.sha256(CONSENSUS[:SIGNED_END]).digest()


def test_bandwidth_weights_line_is_parsed():
    """The footer's bandwidth-weights as tor 0.4.9 wrote them for the private tor network."""
    c = parse_consensus(CONSENSUS)
    assert c.bw_weights == {
        "Wbd": 0, "Wbe": 0, "Wbg": 4996, "Wbm": 10000, "Wdb": 10000, "Web": 10000, "Wed": 10000, "Wee": 10000,
        "Weg": 10000, "Wem": 10000, "Wgb": 10000, "Wgd": 0, "Wgg": 5004, "Wgm": 5004, "Wmb": 10000, "Wmd": 0,
        "Wme": 0, "Wmg": 4996, "Wmm": 10000}
    # without the line: no weights (plain bandwidth); a malformed entry rejects the document, as in tor
    line = re.search(rb"\nbandwidth-weights [^\n]*", CONSENSUS).group(0)
    assert parse_consensus(CONSENSUS.replace(line, b"")).bw_weights == {}
    for bad in (b" Wxx=zz", b" Wgg", b" Wgg=99999999999", b" Wgg=1.5"):
        with pytest.raises(ProtocolError, match="bandwidth-weights"):
            parse_consensus(CONSENSUS.replace(line, line + bad))
    # the weights are inside the signed part
    assert SIGNED_END > CONSENSUS.index(b"\nbandwidth-weights ")


def test_consensus_verifies_with_every_authority():
    assert verify() == {a.v3ident for a in AUTHS}


def test_consensus_times():
    c = parse_consensus(CONSENSUS)
    with pytest.raises(ConsensusError, match="expired"):
        verify(now=c.valid_until + 3600)
    with pytest.raises(ConsensusError, match="not valid yet"):
        verify(now=c.valid_after - 3600)


def _sig_blocks(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the three signature objects' base64 bodies."""
    out, pos = [], 0
    while (i := raw.find(b"-----BEGIN SIGNATURE-----\n", pos)) >= 0:
        start = i + len(b"-----BEGIN SIGNATURE-----\n")
        end = raw.index(b"-----END SIGNATURE-----", start)
        out.append((start, end))
        pos = end
    return out


def _corrupt_signature(raw: bytes, k: int) -> bytes:
    start, end = _sig_blocks(raw)[k]
    sig = bytearray(base64.b64decode(raw[start:end]))
    sig[10] ^= 1
    b64 = base64.b64encode(bytes(sig))
    return raw[:start] + b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64)) + b"\n" + raw[end:]


def test_signature_threshold():
    # one forged signature out of three: two still verify (> half)
    assert len(verify(_corrupt_signature(CONSENSUS, 0))) == 2
    # two forged: 1 of 3 is not more than half
    with pytest.raises(ConsensusError, match="1 of 3"):
        verify(_corrupt_signature(_corrupt_signature(CONSENSUS, 0), 1))
    # only one authority's certificate available: same
    one_cert = b"dir-key-certificate-version" + KEYS.split(b"dir-key-certificate-version")[1]
    with pytest.raises(ConsensusError, match="1 of 3"):
        verify(certs=one_cert)
    # signatures by authorities we do not trust do not count
    stranger = [replace(a, v3ident=bytes(20)) for a in AUTHS]
    with pytest.raises(ConsensusError, match="0 of 1"):
        verify(auths=stranger[:1])


def test_tampered_body_fails():
    for old, new in [(b"\ns Exit ", b"\ns Fxit "), (b"w Bandwidth=", b"w Bandwidth=9"),
                     (b"valid-until 20", b"valid-until 21")]:
        assert old in CONSENSUS
        with pytest.raises(ConsensusError):
            verify(CONSENSUS.replace(old, new, 1), now=NOW)


def test_signature_line_must_match_certificate_and_algorithm():
    sha1 = CONSENSUS.replace(b"directory-signature sha256 ", b"directory-signature sha1 ")
    with pytest.raises(ConsensusError):  # sha1 over the same bytes is another digest
        verify(sha1)
    unknown = CONSENSUS.replace(b"directory-signature sha256 ", b"directory-signature sha512 ")
    with pytest.raises(ConsensusError, match="0 of 3"):  # unknown algorithms are ignored
        verify(unknown)
    c = parse_consensus(CONSENSUS)
    swapped = replace(c, signatures=tuple(replace(s, signing_key_digest=bytes(20)) for s in c.signatures))
    with pytest.raises(ConsensusError, match="0 of 3"):
        verify_consensus(swapped, AUTHS, parse_key_certificates(KEYS), now=NOW)


def test_not_a_microdesc_consensus():
    ns = CONSENSUS.replace(b"network-status-version 3 microdesc", b"network-status-version 3", 1)
    with pytest.raises(ProtocolError, match="microdesc"):
        parse_consensus(ns)
    vote = CONSENSUS.replace(b"vote-status consensus", b"vote-status vote", 1)
    with pytest.raises(ProtocolError, match="vote-status"):
        parse_consensus(vote)


# -- microdescriptors and the joined view ----------------------------------------------------------
def test_microdescriptors_match_consensus():
    mds = parse_microdescriptors(MICRODESCS)
    c = parse_consensus(CONSENSUS)
    assert {md.digest for md in mds} == {e.microdesc_digest for e in c.entries}
    for md in mds:
        assert len(md.ntor_key) == 32 and len(md.ed_id) == 32


def test_router_statuses():
    statuses = {s.nickname: s for s in router_statuses(parse_consensus(CONSENSUS),
                                                       parse_microdescriptors(MICRODESCS))}
    assert RELAYS <= set(statuses) and len(statuses) == 8
    for name, s in statuses.items():
        assert {"Running", "Valid", "Fast", "Guard"} <= s.flags
        assert s.info.address == "127.0.0.1" and 0 < s.info.or_port < 65536
        assert ("Exit" in s.flags) == name.startswith("exit")
        assert s.info.exit_policy == ("accept 1-65535" if name.startswith("exit") else "reject 1-65535")
        assert ("Authority" in s.flags) == name.startswith("auth")
    fps = {ln.split()[-1] for ln in DIRAUTH}
    assert {s.fingerprint for s in statuses.values() if "Authority" in s.flags} == fps


def test_tampered_microdescriptor_is_dropped():
    tampered = MICRODESCS.replace(b"p accept 1-65535", b"p accept 1-65534", 1)
    statuses = router_statuses(parse_consensus(CONSENSUS), parse_microdescriptors(tampered))
    assert len(statuses) == 7  # the exit whose microdescriptor changed is gone


def test_microdescriptors_without_tap_keys():
    """Newer tor drops the legacy onion-key; ntor-onion-key then starts each microdescriptor."""
    no_tap = b"".join(chunk for chunk in MICRODESCS.split(b"onion-key\n-----BEGIN RSA PUBLIC KEY-----\n")
                      for chunk in [chunk.split(b"-----END RSA PUBLIC KEY-----\n", 1)[-1]])
    mds = parse_microdescriptors(no_tap)
    assert len(mds) == 8 and all(md.ntor_key and md.ed_id for md in mds)


# -- fetching (a local HTTP server replays the saved tor documents) ------------------------------------
class ReplayAuthority:
    """Serves the fixture documents like a tor DirPort; ``consensus`` may be swapped for a forgery."""

    def __init__(self, consensus: bytes = CONSENSUS):
        self.consensus = consensus
        self.paths: list[str] = []
        self.server = DirServer(self.handle)

    async def handle(self, req) -> HttpResponse:
        self.paths.append(req.path)
        if req.path == "/tor/keys/all":
            return HttpResponse(200, KEYS)
        if req.path == "/tor/status-vote/current/consensus-microdesc":
            return HttpResponse(200, self.consensus)
        if req.path.startswith("/tor/micro/d/"):
            wanted = set(req.path[len("/tor/micro/d/"):].split("-"))
            chunks = MICRODESCS.split(b"onion-key\n-----BEGIN RSA")
            mds = [b"onion-key\n-----BEGIN RSA" + c for c in chunks[1:]]
            return HttpResponse(200, b"".join(md for md in mds if base64.b64encode(
                hashlib.sha256(md).digest()).decode().rstrip("=") in wanted))
        return HttpResponse(404, b"not found")

    def lines(self) -> list[str]:
        """The fixture's DirAuthority lines, all pointing at this server."""
        return [re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{self.server.port}", ln) for ln in DIRAUTH]


async def test_fetch_from_a_replayed_authority():
    auth = ReplayAuthority()
    await auth.server.start()
    try:
        statuses = await fetch_tor_directory(auth.lines(), now=NOW)
    finally:
        await auth.server.stop()
    assert len(statuses) == 8 and RELAYS <= {s.nickname for s in statuses}
    assert auth.paths[:2] == ["/tor/keys/all", "/tor/status-vote/current/consensus-microdesc"]
    assert auth.paths[2].startswith("/tor/micro/d/") and len(auth.paths) == 3


async def test_fetch_rejects_forgeries_and_dead_authorities():
    auth = ReplayAuthority(_corrupt_signature(_corrupt_signature(CONSENSUS, 0), 2))
    await auth.server.start()
    try:
        with pytest.raises(TorDirectoryError) as err:
            await fetch_tor_directory(auth.lines(), now=NOW)
    finally:
        await auth.server.stop()
    assert len(err.value.causes) == 3 and all("ConsensusError" in c for c in err.value.causes)
    with pytest.raises(TorDirectoryError):  # nobody listening
        await fetch_tor_directory(auth.lines(), now=NOW, timeout=5)
    with pytest.raises(ConfigError):
        await fetch_tor_directory([], now=NOW)


# -- fuzzing ------------------------------------------------------------------------------------------
PARSERS = [parse_consensus, parse_key_certificates, parse_microdescriptors]
DOCS = [CONSENSUS, KEYS, MICRODESCS]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PARSERS), st.one_of(st.binary(max_size=2000),
                                            st.binary(max_size=2000).map(lambda b: b + b"\n")))
def test_random_bytes_only_protocol_errors(parse, raw):
    try:
        parse(raw)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(3)), st.data())
def test_truncated_documents_only_protocol_errors(which, data):
    doc = DOCS[which]
    cut = data.draw(st.integers(0, len(doc) - 1))
    try:
        PARSERS[which](doc[:cut])
    except ProtocolError:
        pass


_lines = st.lists(st.sampled_from([
    "r a b c d", "m x", "s Exit", "w Bandwidth=x", "directory-footer", "directory-signature a b",
    "-----BEGIN SIGNATURE-----", "-----END SIGNATURE-----", "valid-after 2026-01-01 00:00:00",
    "bandwidth-weights Wgg=x", "bandwidth-weights Wgg=1 Wee",
    "onion-key", "ntor-onion-key AAAA", "id ed25519 AAAA", "p accept 1-2", "family $AB",
    "dir-key-certificate-version 3", "dir-key-certification", "fingerprint 00", "", "AAAA",
]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(3)), st.data())
def test_line_mutations_only_protocol_errors(which, data):
    lines = DOCS[which].split(b"\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    junk = [ln.encode() for ln in data.draw(_lines)]
    mutated = b"\n".join(lines[:i] + junk + lines[i + data.draw(st.integers(0, 3)):])
    try:
        result = PARSERS[which](mutated)
        if which == 0:
            verify(mutated)
    except ProtocolError:
        return
    assert result is not None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, SIGNED_END - 1), st.integers(1, 255))
def test_any_change_to_the_signed_part_is_rejected(pos, xor):
    raw = bytearray(CONSENSUS)
    raw[pos] ^= xor
    with pytest.raises(ProtocolError):  # ConsensusError is a ProtocolError
        verify(bytes(raw))


def test_next_consensus_fetch_follows_tors_schedule():
    """tor's update_consensus_networkstatus_fetch_time: caches (relays) fetch in the
    half-interval after fresh-until (+ min(120 s, interval/16)); clients from 3/4 of an
    interval after fresh-until, within 7/8 of what is left before valid-until."""
    from onionp2p.dir.tordir import next_consensus_fetch

    va, fu, vu = 0, 3600, 3 * 3600  # an hour-long interval, valid for three
    assert next_consensus_fetch(va, fu, vu, cache=True, rand=0.0) == fu + 120
    assert next_consensus_fetch(va, fu, vu, cache=True, rand=0.999) == pytest.approx(fu + 120 + 1800, abs=2)
    start = fu + 2700
    assert next_consensus_fetch(va, fu, vu, cache=False, rand=0.0) == start
    assert next_consensus_fetch(va, fu, vu, cache=False, rand=0.999) == pytest.approx(
        start + (vu - start) * 7 // 8, abs=8)
    # a 10-second test network: the slop shrinks to interval/16 (0 s here), and every
    # fetch falls before valid-until
    for cache in (True, False):
        for r in (0.0, 0.5, 0.999):
            t = next_consensus_fetch(0, 10, 20, cache=cache, rand=r)
            assert 10 <= t < 20
