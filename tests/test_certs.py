"""Tests for onionp2p.proto.certs: Ed25519 certificates, RSA cross-certificates, X.509 helpers."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onionp2p.errors import CertificateError, LocalProtocolError, ProtocolError
from onionp2p.proto.certs import (
    EXT_FLAG_AFFECTS_VALIDATION,
    RSA_ED_CROSSCERT_PREFIX,
    CertExtension,
    CertType,
    Ed25519Cert,
    ExtType,
    KeyType,
    RsaCrossCert,
    expiry_hours,
    make_rsa_identity_cert,
    make_self_signed_x509,
    parse_x509,
    rsa_identity_digest,
    rsa_public_der,
    verify_rsa_identity_cert,
    x509_sha256,
)


def h(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


def raw(pub: ed25519.Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


NOW = 1_700_000_000.0
ID_KEY = ed25519.Ed25519PrivateKey.generate()
SIGN_KEY = ed25519.Ed25519PrivateKey.generate()
RSA_ID = rsa.generate_private_key(public_exponent=65537, key_size=1024)
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)

# ---------------------------------------------------------------------------
# Known-answer vectors: certificates from a CERTS cell in a chutney network, as
# used in arti's crates/tor-cert/tests/testvec_certs.rs (produced by C tor).

KAT_TIME = 1_601_000_000.0
KAT_IDENTITY = h("DCB604DB2034B00FD16986D4ADB9D16B21CB4E4457A33DEC0F538903683E96E9")
KAT_SIGNING = h("F82294B866A31F01FC5D0DA8572850A9B929545C3266558D7D2316E3B74172B0")
KAT_TYPE4 = h("""
    01 04 0006CC2A 01
    F82294B866A31F01FC5D0DA8572850A9B929545C3266558D7D2316E3B74172B0
    01 0020 04 00
    DCB604DB2034B00FD16986D4ADB9D16B21CB4E4457A33DEC0F538903683E96E9
    FF1A5203FA27F86EF7528D89A0845D2520166E340754FFEA2AAE0F612B7CE5DA
    094A0236CDAC45034B0B6842C18E7F6B51B93A3CF7E60663B8AD061C30A62602""")
KAT_TLS_DIGEST = h("B4FD606B64E4CBD466B8D76CB131069BAE6F3AA1878857C9F624E31D77A799B8")
KAT_TYPE5 = h("""
    01 05 0006C98A 03
    B4FD606B64E4CBD466B8D76CB131069BAE6F3AA1878857C9F624E31D77A799B8
    00
    7173E5F8068431D0D3F5EE16B4C9FFD59DF373E152A87281BAE744AA5FCF7217
    1BF4B27C4E8FC1C6A9FC5CA11058BC49647063D7903CFD9F512F89099B27BC0C""")
KAT_RSA_PK = h(
    "30818902818100d38b1e6ceb946e0db0751f4cbace3dcb9688b6c25304227b4710c35afb73627e50500f5913e158b621"
    "802612d1c75827003703338375237552eb3cd3c12f6ab3604e60c1a2d26bb1fbad206ff023969a90909d6a65a5458a53"
    "12c26ebd3a3dad30302d4515cdcd264146ac18e6fc60a04bd3ec327f04294d96ba5aa25b464c3f0203010001")
# The same key with one byte changed ("3a3dad" -> "6a3dad").
KAT_WRONG_RSA_PK = KAT_RSA_PK.replace(h("bd3a3dad"), h("bd6a3dad"))
KAT_TYPE7 = h("""
    DCB604DB2034B00FD16986D4ADB9D16B21CB4E4457A33DEC0F538903683E96E9
    0006DA3A 80
    5CF6006F9179066534DE6B45AD47A5C469063EE462762723396DC9F25452A0A5
    2DA3F5087DD239F2A311F6B0D4DFEFF4ABD089DC3D0237A0ABAB19EB2045B91C
    DCAF04BE0A72D548A27BF2E77BD876ECFE5E1BE622350DA6BF31F6E306ED8964
    88DD5B39409B23FC3EB7B2C9F7328EB18DA36D54D80575899EA6507CCBFCDF1F""")


def test_kat_type4_signing_cert():
    cert = Ed25519Cert.parse(KAT_TYPE4)
    assert cert.cert_type == CertType.IDENTITY_V_SIGNING
    assert cert.key_type == KeyType.ED25519
    assert cert.certified_key == KAT_SIGNING
    assert cert.signed_with == KAT_IDENTITY
    assert cert.expires_hours == 0x6CC2A
    assert cert.expires_at == 0x6CC2A * 3600
    assert cert.encode() == KAT_TYPE4
    cert.verify(now=KAT_TIME)
    cert.verify(KAT_IDENTITY, now=KAT_TIME)
    with pytest.raises(CertificateError, match="different key"):
        cert.verify(KAT_SIGNING, now=KAT_TIME)
    with pytest.raises(CertificateError, match="expired"):
        cert.verify(now=cert.expires_at + 1)


def test_kat_type5_link_cert():
    cert = Ed25519Cert.parse(KAT_TYPE5)
    assert cert.cert_type == CertType.SIGNING_V_TLS_CERT
    assert cert.key_type == KeyType.SHA256_OF_X509
    assert cert.certified_key == KAT_TLS_DIGEST
    assert cert.signed_with is None
    assert cert.extensions == ()
    assert cert.encode() == KAT_TYPE5
    cert.verify(KAT_SIGNING, now=KAT_TIME)
    with pytest.raises(CertificateError, match="no key"):
        cert.verify(now=KAT_TIME)
    with pytest.raises(CertificateError, match="bad signature"):
        cert.verify(KAT_IDENTITY, now=KAT_TIME)


def test_kat_rsa_cross_cert():
    pk = serialization.load_der_public_key(KAT_RSA_PK)
    assert KAT_WRONG_RSA_PK != KAT_RSA_PK
    wrong = serialization.load_der_public_key(KAT_WRONG_RSA_PK)
    cc = RsaCrossCert.parse(KAT_TYPE7)
    assert cc.ed25519_key == KAT_IDENTITY
    assert cc.expires_hours == 0x6DA3A
    assert len(cc.signature) == 128
    assert cc.encode() == KAT_TYPE7
    assert cc.digest == hashlib.sha256(RSA_ED_CROSSCERT_PREFIX + KAT_TYPE7[:36]).digest()
    cc.verify(pk, KAT_TIME)
    with pytest.raises(CertificateError, match="bad signature"):
        cc.verify(wrong, KAT_TIME)
    with pytest.raises(CertificateError, match="expired"):
        cc.verify(pk, now=cc.expires_at + 1)


def test_kat_rsa_identity_digest_is_sha1_of_pkcs1_der():
    pk = serialization.load_der_public_key(KAT_RSA_PK)
    assert rsa_public_der(pk) == KAT_RSA_PK
    assert rsa_identity_digest(pk) == hashlib.sha1(KAT_RSA_PK).digest()
    assert rsa_identity_digest(RSA_ID) == rsa_identity_digest(RSA_ID.public_key())
    assert len(rsa_identity_digest(RSA_ID)) == 20


# ---------------------------------------------------------------------------
# Ed25519 certificates


def make_cert(**kw) -> Ed25519Cert:
    args = {"expires_hours": expiry_hours(NOW + 86400)}
    args.update(kw)
    return Ed25519Cert.create(CertType.IDENTITY_V_SIGNING, raw(SIGN_KEY.public_key()), ID_KEY, **args)


def test_create_verify_and_fields():
    cert = make_cert()
    assert cert.signed_with == raw(ID_KEY.public_key())
    assert cert.extensions[0].ext_type == ExtType.SIGNED_WITH_ED25519_KEY
    cert.verify(now=NOW)
    cert.verify(raw(ID_KEY.public_key()), now=NOW)
    data = cert.encode()
    assert data[0] == 1 and data[1] == 4 and data[6] == KeyType.ED25519
    assert len(data) == 1 + 1 + 4 + 1 + 32 + 1 + (4 + 32) + 64
    # The signature covers every byte before it.
    raw_pub = ID_KEY.public_key()
    raw_pub.verify(data[-64:], data[:-64])


def test_create_without_signer_needs_key():
    cert = make_cert(include_signer=False)
    assert cert.signed_with is None and cert.extensions == ()
    with pytest.raises(CertificateError):
        cert.verify(now=NOW)
    cert.verify(raw(ID_KEY.public_key()), now=NOW)


def test_verify_wrong_key():
    cert = make_cert(include_signer=False)
    with pytest.raises(CertificateError, match="bad signature"):
        cert.verify(raw(SIGN_KEY.public_key()), now=NOW)
    with pytest.raises(CertificateError):
        cert.verify(b"\x00" * 31, now=NOW)


def test_verify_expiry_boundary():
    cert = make_cert(expires_hours=500_000)
    cert.verify(now=500_000 * 3600.0)  # valid through the expiry instant itself
    with pytest.raises(CertificateError, match="expired"):
        cert.verify(now=500_000 * 3600.0 + 0.5)


def test_verify_detects_tampering_everywhere():
    data = make_cert().encode()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        try:
            cert = Ed25519Cert.parse(bytes(bad))
        except CertificateError:
            continue  # e.g. version byte or an extension length
        with pytest.raises(CertificateError):
            cert.verify(raw(ID_KEY.public_key()), now=NOW)


def test_unknown_extensions():
    noncrit = CertExtension(0x42, 0, b"hello")
    cert = make_cert(extensions=(noncrit,))
    again = Ed25519Cert.parse(cert.encode())
    assert again == cert and again.extensions[1] == noncrit
    again.verify(now=NOW)  # ignored

    crit = CertExtension(0x42, EXT_FLAG_AFFECTS_VALIDATION, b"")
    cert = make_cert(extensions=(crit,))
    assert crit.affects_validation
    with pytest.raises(CertificateError, match="affects validation"):
        Ed25519Cert.parse(cert.encode()).verify(now=NOW)


def test_signed_with_extension_rules():
    signer = raw(ID_KEY.public_key())
    bad_len = make_cert(include_signer=False, extensions=(CertExtension(4, 0, signer[:31]),))
    with pytest.raises(CertificateError, match="32 bytes"):
        Ed25519Cert.parse(bad_len.encode())
    dup = make_cert(extensions=(CertExtension(4, 0, signer),))
    with pytest.raises(CertificateError, match="more than one"):
        Ed25519Cert.parse(dup.encode())
    # A critical signed-with extension is understood, so it does not invalidate.
    crit4 = make_cert(include_signer=False, extensions=(CertExtension(4, 1, signer),))
    Ed25519Cert.parse(crit4.encode()).verify(now=NOW)


def test_parse_strict():
    data = make_cert().encode()
    with pytest.raises(CertificateError):
        Ed25519Cert.parse(data + b"\x00")
    for n in range(len(data)):
        with pytest.raises(CertificateError):
            Ed25519Cert.parse(data[:n])
    with pytest.raises(CertificateError, match="malformed"):
        Ed25519Cert.parse(b"\x02" + data[1:])
    with pytest.raises(CertificateError):
        Ed25519Cert.parse("not bytes")  # type: ignore[arg-type]


def test_unknown_cert_and_key_types_survive():
    cert = Ed25519Cert.create(0x77, b"\x11" * 32, ID_KEY, expires_hours=1, key_type=0x09)
    again = Ed25519Cert.parse(cert.encode())
    assert again.cert_type == 0x77 and again.key_type == 0x09
    assert again == cert


def test_create_rejects_bad_arguments():
    with pytest.raises(LocalProtocolError):
        Ed25519Cert.create(4, b"\x00" * 31, ID_KEY, expires_hours=1)
    with pytest.raises(LocalProtocolError):
        Ed25519Cert.create(4, b"\x00" * 32, ID_KEY, expires_hours=2**32)


def test_expiry_hours_rounds_up():
    assert expiry_hours(0) == 0
    assert expiry_hours(1) == 1
    assert expiry_hours(3600) == 1
    assert expiry_hours(3601) == 2
    with pytest.raises(LocalProtocolError):
        expiry_hours(2**32 * 3600.0)


ext_strategy = st.builds(
    CertExtension,
    ext_type=st.integers(0, 255).filter(lambda t: t != 4),
    flags=st.integers(0, 255).map(lambda f: f & ~EXT_FLAG_AFFECTS_VALIDATION),
    data=st.binary(max_size=40),
)


@settings(max_examples=60, deadline=None)
@given(
    cert_type=st.integers(0, 255),
    expires=st.integers(0, 2**32 - 1),
    key_type=st.integers(0, 255),
    key=st.binary(min_size=32, max_size=32),
    include_signer=st.booleans(),
    exts=st.lists(ext_strategy, max_size=4),
)
def test_roundtrip_property(cert_type, expires, key_type, key, include_signer, exts):
    cert = Ed25519Cert.create(cert_type, key, ID_KEY, expires_hours=expires, key_type=key_type,
                              include_signer=include_signer, extensions=tuple(exts))
    data = cert.encode()
    again = Ed25519Cert.parse(data)
    assert again == cert
    assert again.encode() == data
    again.verify(raw(ID_KEY.public_key()), now=expires * 3600.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_random_bytes_only_raises_certificate_error(data):
    try:
        cert = Ed25519Cert.parse(data)
    except CertificateError:
        return
    assert cert.encode() == data  # whatever parses must re-encode exactly
    try:
        cert.verify(now=NOW)
    except CertificateError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_parse_mutated_valid_cert(data):
    base = bytearray(make_cert(extensions=(CertExtension(9, 0, b"xyz"),)).encode())
    n = data.draw(st.integers(0, len(base)))
    blob = bytes(base[:n])
    if data.draw(st.booleans()) and blob:
        i = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([data.draw(st.integers(0, 255))]) + blob[i + 1:]
    blob += data.draw(st.binary(max_size=8))
    try:
        cert = Ed25519Cert.parse(blob)
    except ProtocolError as exc:
        assert isinstance(exc, CertificateError)
        return
    try:
        cert.verify(now=NOW)
    except CertificateError:
        pass


# ---------------------------------------------------------------------------
# RSA -> Ed25519 cross-certificate


def test_cross_cert_roundtrip_and_verify():
    ed = raw(ID_KEY.public_key())
    cc = RsaCrossCert.create(RSA_ID, ed, expiry_hours(NOW + 180 * 86400))
    data = cc.encode()
    assert data[:32] == ed
    assert data[36] == len(cc.signature) == 128
    assert len(data) == 37 + 128
    again = RsaCrossCert.parse(data)
    assert again == cc and again.encode() == data
    again.verify(RSA_ID.public_key(), NOW)
    with pytest.raises(CertificateError, match="bad signature"):
        again.verify(OTHER_RSA.public_key(), NOW)
    with pytest.raises(CertificateError, match="expired"):
        again.verify(RSA_ID.public_key(), now=again.expires_at + 1)
    with pytest.raises(CertificateError):
        again.verify(ID_KEY.public_key(), NOW)  # type: ignore[arg-type]


def test_cross_cert_signature_has_no_digestinfo():
    cc = RsaCrossCert.create(RSA_ID, raw(ID_KEY.public_key()), 1000)
    from cryptography.hazmat.primitives.asymmetric import padding
    recovered = RSA_ID.public_key().recover_data_from_signature(cc.signature, padding.PKCS1v15(), None)
    assert recovered == cc.digest  # the bare 32-byte digest, not an ASN.1 DigestInfo


def test_cross_cert_tamper_detection():
    data = RsaCrossCert.create(RSA_ID, raw(ID_KEY.public_key()), expiry_hours(NOW + 86400)).encode()
    for i in list(range(37)) + [40, 100, len(data) - 1]:
        if i == 36:
            continue  # SIGLEN: changes the framing, covered by strict parsing
        bad = bytearray(data)
        bad[i] ^= 0x80
        cc = RsaCrossCert.parse(bytes(bad))
        with pytest.raises(CertificateError):
            cc.verify(RSA_ID.public_key(), NOW)


def test_cross_cert_strict_parsing():
    data = RsaCrossCert.create(RSA_ID, raw(ID_KEY.public_key()), 1000).encode()
    with pytest.raises(CertificateError):
        RsaCrossCert.parse(data + b"\x00")
    for n in range(len(data)):
        with pytest.raises(CertificateError):
            RsaCrossCert.parse(data[:n])


def test_cross_cert_create_rejects_bad_key():
    with pytest.raises(LocalProtocolError):
        RsaCrossCert.create(RSA_ID, b"\x00" * 31, 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_cross_cert_random_bytes(data):
    try:
        cc = RsaCrossCert.parse(data)
    except CertificateError:
        return
    assert cc.encode() == data
    with pytest.raises(CertificateError):
        cc.verify(RSA_ID.public_key(), NOW)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ed=st.binary(min_size=32, max_size=32), exp=st.integers(0, 2**32 - 1))
def test_cross_cert_roundtrip_property(ed, exp):
    cc = RsaCrossCert.create(RSA_ID, ed, exp)
    again = RsaCrossCert.parse(cc.encode())
    assert again == cc
    again.verify(RSA_ID.public_key(), exp * 3600.0)


# ---------------------------------------------------------------------------
# X.509


def test_rsa_identity_cert():
    der = make_rsa_identity_cert(RSA_ID, NOW)
    cert = parse_x509(der)
    assert cert.issuer == cert.subject
    assert cert.signature_hash_algorithm.name == "sha256"
    key = verify_rsa_identity_cert(der, now=NOW)
    assert rsa_identity_digest(key) == rsa_identity_digest(RSA_ID)
    # Tor's slop: accepted up to 2 days after expiry and 30 days before validity.
    end = cert.not_valid_after_utc.timestamp()
    verify_rsa_identity_cert(der, now=end + 2 * 86400 - 1)
    with pytest.raises(CertificateError, match="expired"):
        verify_rsa_identity_cert(der, now=end + 2 * 86400 + 1)
    start = cert.not_valid_before_utc.timestamp()
    verify_rsa_identity_cert(der, now=start - 30 * 86400 + 1)
    with pytest.raises(CertificateError, match="not yet valid"):
        verify_rsa_identity_cert(der, now=start - 30 * 86400 - 1)


def test_rsa_identity_cert_rejects_wrong_keys_and_signers():
    big = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CertificateError, match="1024"):
        verify_rsa_identity_cert(make_self_signed_x509(big, now=NOW, lifetime=86400), now=NOW)
    with pytest.raises(CertificateError, match="RSA"):
        verify_rsa_identity_cert(make_self_signed_x509(ID_KEY, now=NOW, lifetime=86400), now=NOW)
    # Subject key is RSA_ID but the signature is by OTHER_RSA.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])
    forged = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(RSA_ID.public_key()).serial_number(7)
              .not_valid_before(dt.datetime.fromtimestamp(NOW - 86400, dt.UTC))
              .not_valid_after(dt.datetime.fromtimestamp(NOW + 86400, dt.UTC))
              .sign(OTHER_RSA, hashes.SHA256()))
    with pytest.raises(CertificateError, match="self-signed"):
        verify_rsa_identity_cert(forged.public_bytes(serialization.Encoding.DER), now=NOW)


def test_self_signed_x509_validity_and_digest():
    der = make_self_signed_x509(SIGN_KEY, now=NOW, lifetime=10 * 86400, common_name="www.test.net")
    cert = parse_x509(der)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "www.test.net"
    assert cert.not_valid_before_utc.timestamp() <= NOW - 86400
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(NOW + 10 * 86400, abs=1)
    assert x509_sha256(der) == hashlib.sha256(der).digest()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_parse_x509_random_bytes(data):
    with pytest.raises(CertificateError):
        parse_x509(data)


def test_parse_x509_truncated():
    der = make_rsa_identity_cert(RSA_ID, NOW)
    for n in range(0, len(der), 7):
        with pytest.raises(CertificateError):
            parse_x509(der[:n])
    with pytest.raises(CertificateError):
        verify_rsa_identity_cert(der[:-1], now=NOW)


def test_parse_x509_bad_version_field():
    der = make_rsa_identity_cert(RSA_ID, NOW)
    i = der.find(h("a0 03 02 01 02"))  # [0] EXPLICIT INTEGER 2 (= X.509 v3)
    assert i > 0
    bad = der[:i + 4] + b"\x05" + der[i + 5:]
    with pytest.raises(CertificateError):
        parse_x509(bad)


IDENTITY_DER = make_rsa_identity_cert(RSA_ID, NOW)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_identity_cert_only_raises_certificate_error(data):
    der = bytearray(IDENTITY_DER)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] = data.draw(st.integers(0, 255))
    try:
        key = verify_rsa_identity_cert(bytes(der), now=NOW)
    except CertificateError:
        return
    assert isinstance(key, rsa.RSAPublicKey)


def test_identity_cert_every_byte_mutated():
    for i in range(len(IDENTITY_DER)):
        for v in (0x00, 0xFF, IDENTITY_DER[i] ^ 0x01):
            der = IDENTITY_DER[:i] + bytes([v]) + IDENTITY_DER[i + 1:]
            try:
                verify_rsa_identity_cert(der, now=NOW)
            except CertificateError:
                pass
