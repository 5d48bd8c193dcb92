"""Tor certificates: Ed25519 certificates, the RSA->Ed25519 cross-certificate, X.509 helpers.

Theory of operation
-------------------
A relay proves who it is in the link handshake by sending a CERTS cell. Each entry
is one of three formats:

* **Tor Ed25519 certificates** (cert-spec §2.1, "Tor Ed25519 Certificates"). One
  Ed25519 key vouches for a 32-byte object: another Ed25519 key, or the SHA-256 of
  an RSA key or of an X.509 certificate. The layout is::

      VERSION u8 = 01 | CERT_TYPE u8 | EXPIRATION_DATE u32 (hours since the epoch)
      | CERT_KEY_TYPE u8 | CERTIFIED_KEY[32] | N_EXTENSIONS u8
      | N x { ExtLen u16 | ExtType u8 | ExtFlags u8 | ExtData[ExtLen] }
      | SIGNATURE[64]

  The signature is an Ed25519 signature over every byte before it. Extension 04
  ("signed-with-ed25519-key") carries the 32-byte signing key, so the certificate
  can be checked without outside knowledge. An extension we do not understand is
  kept (so encoding gives back the exact bytes) and ignored, unless its flags have
  bit 0 (AFFECTS_VALIDATION) set; then the certificate is invalid.

* **The RSA->Ed25519 cross-certificate** (cert-spec §2.3, CERTS type 7). The
  legacy RSA-1024 identity vouches for the Ed25519 identity::

      ED25519_KEY[32] | EXPIRATION_DATE u32 (hours) | SIGLEN u8 | SIGNATURE[SIGLEN]

  SIGNATURE is a PKCS#1 v1.5 (block type 1) RSA signature whose payload is the bare
  32-byte digest SHA256("Tor TLS RSA/Ed25519 cross-certificate" | ED25519_KEY |
  EXPIRATION_DATE), with *no* ASN.1 DigestInfo around it (C tor signs with
  ``crypto_pk_private_sign``; arti checks with an unprefixed PKCS#1 v1.5 verifier).
  :mod:`cryptography` expresses this with ``utils.NoDigestInfo``.

* **X.509** (CERTS types 1-3). Only type 2 (the self-signed RSA-1024 identity
  certificate) is still sent. Its job is to carry the RSA identity key, whose
  SHA-1 over the PKCS#1 DER encoding is the relay's 20-byte fingerprint
  (tor-spec §1.1, "Keys and names").

Parsing is strict: a certificate must use every byte it is given, and any problem
with untrusted bytes raises :class:`~onionp2p.errors.CertificateError` (a
:class:`~onionp2p.errors.ProtocolError`). Checks that depend on time take a ``now``
argument (unix seconds); nothing here reads the clock.

Expiry follows C tor: an Ed25519 or cross-certificate is expired when ``now`` is
*after* ``EXPIRATION_DATE * 3600``, and creators round the expiry *up* to the next
whole hour (:func:`expiry_hours`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import secrets
import warnings
from dataclasses import dataclass, field
from enum import IntEnum

import construct as cs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from onionp2p.errors import CertificateError, LocalProtocolError
from onionp2p.proto.ed25519x import ExpandedKey

__all__ = [
    "EXT_FLAG_AFFECTS_VALIDATION",
    "RSA_ED_CROSSCERT_PREFIX",
    "X509_FUTURE_SLOP",
    "X509_PAST_SLOP",
    "CertExtension",
    "CertType",
    "Ed25519Cert",
    "ExtType",
    "KeyType",
    "RsaCrossCert",
    "expiry_hours",
    "make_rsa_identity_cert",
    "make_self_signed_x509",
    "parse_x509",
    "rsa_identity_digest",
    "rsa_public_der",
    "verify_rsa_identity_cert",
    "x509_sha256",
]


class CertType(IntEnum):
    """CERTS-cell / CERT_TYPE values (cert-spec appendix "List of certificate types").

    Types 1-3 are X.509, 7 is the RSA cross-certificate format; the rest are Tor
    Ed25519 certificates. "X_V_Y" means key X signs (verifies) Y.
    """

    TLS_LINK_X509 = 0x01  # obsolete: RSA identity signs the TLS link key
    RSA_ID_X509 = 0x02  # self-signed RSA-1024 identity certificate
    LINK_AUTH_X509 = 0x03  # obsolete: RSA identity signs an RSA auth key
    IDENTITY_V_SIGNING = 0x04
    SIGNING_V_TLS_CERT = 0x05
    SIGNING_V_LINK_AUTH = 0x06
    RSA_ID_V_IDENTITY = 0x07  # RsaCrossCert format, not Ed25519
    HS_BLINDED_ID_V_SIGNING = 0x08
    HS_IP_V_SIGNING = 0x09
    NTOR_CC_IDENTITY = 0x0A
    HS_IP_CC_SIGNING = 0x0B
    FAMILY_V_IDENTITY = 0x0C


class KeyType(IntEnum):
    """CERT_KEY_TYPE values: what the 32-byte CERTIFIED_KEY field holds."""

    ED25519 = 0x01
    SHA256_OF_RSA = 0x02  # SHA-256 of a DER-encoded RSA public key
    SHA256_OF_X509 = 0x03  # SHA-256 of a DER-encoded X.509 certificate


class ExtType(IntEnum):
    """Known Ed25519 certificate extension types."""

    SIGNED_WITH_ED25519_KEY = 0x04


EXT_FLAG_AFFECTS_VALIDATION = 0x01
RSA_ED_CROSSCERT_PREFIX = b"Tor TLS RSA/Ed25519 cross-certificate"
#: C tor tolerates an X.509 certificate that expired up to this long ago ...
X509_PAST_SLOP = 2 * 86400.0
#: ... and one whose validity starts up to this far in the future.
X509_FUTURE_SLOP = 30 * 86400.0

_U32_MAX = 0xFFFFFFFF


def expiry_hours(unix_time: float) -> int:
    """Encode a unix time as an EXPIRATION_DATE (hours since the epoch, rounded up)."""
    hours = math.ceil(unix_time / 3600.0)
    if not 0 <= hours <= _U32_MAX:
        raise LocalProtocolError(f"expiry {unix_time!r} does not fit a 32-bit hour count")
    return hours


def _as_int_enum(enum: type[IntEnum], value: int) -> int:
    try:
        return enum(value)
    except ValueError:
        return value


# ---------------------------------------------------------------------------
# Wire formats

_EXTENSION = cs.Struct(
    "ext_len" / cs.Int16ub,
    "ext_type" / cs.Int8ub,
    "flags" / cs.Int8ub,
    "data" / cs.Bytes(cs.this.ext_len),
)

_ED_CERT_BODY = cs.Struct(
    "version" / cs.Const(1, cs.Int8ub),
    "cert_type" / cs.Int8ub,
    "expires_hours" / cs.Int32ub,
    "key_type" / cs.Int8ub,
    "certified_key" / cs.Bytes(32),
    "extensions" / cs.PrefixedArray(cs.Int8ub, _EXTENSION),
)

_ED_CERT = cs.Struct(
    "body" / cs.RawCopy(_ED_CERT_BODY),
    "signature" / cs.Bytes(64),
    cs.Terminated,
)

_CROSS_CERT = cs.Struct(
    "signed" / cs.RawCopy(cs.Struct("ed25519_key" / cs.Bytes(32), "expires_hours" / cs.Int32ub)),
    "signature" / cs.Prefixed(cs.Int8ub, cs.GreedyBytes),
    cs.Terminated,
)

_PARSE_ERRORS = (cs.ConstructError, ValueError, TypeError, OverflowError, IndexError, KeyError)


def _parse(fmt: cs.Construct, data: bytes, what: str) -> cs.Container:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CertificateError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        return fmt.parse(bytes(data))
    except _PARSE_ERRORS as exc:
        raise CertificateError(f"malformed {what} ({len(data)} bytes): {exc.__class__.__name__}") from None


def _build(fmt: cs.Construct, value: dict, what: str) -> bytes:
    try:
        return fmt.build(value)
    except _PARSE_ERRORS as exc:
        raise LocalProtocolError(f"cannot encode {what}: {exc}") from None


def _ed25519_public(key: bytes, what: str) -> ed25519.Ed25519PublicKey:
    if len(key) != 32:
        raise CertificateError(f"{what} must be 32 bytes, got {len(key)}")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes(key))
    except ValueError:
        raise CertificateError(f"{what} is not a valid Ed25519 public key") from None


def _ed_raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------------------
# Ed25519 certificates


@dataclass(frozen=True)
class CertExtension:
    """One extension of an Ed25519 certificate (kept verbatim, known or not)."""

    ext_type: int
    flags: int
    data: bytes

    @property
    def affects_validation(self) -> bool:
        """True if a verifier that does not understand this extension must reject the cert."""
        return bool(self.flags & EXT_FLAG_AFFECTS_VALIDATION)


@dataclass(frozen=True)
class Ed25519Cert:
    """A Tor Ed25519 certificate (cert-spec §2.1). Immutable; ``encode()`` is exact."""

    cert_type: int
    expires_hours: int
    key_type: int
    certified_key: bytes
    extensions: tuple[CertExtension, ...] = field(default=())
    signature: bytes = field(default=b"\x00" * 64, repr=False)

    # -- accessors -----------------------------------------------------------

    @property
    def signed_with(self) -> bytes | None:
        """The signing key from extension 04, if present."""
        for ext in self.extensions:
            if ext.ext_type == ExtType.SIGNED_WITH_ED25519_KEY:
                return ext.data
        return None

    @property
    def expires_at(self) -> float:
        """Expiry as a unix time (the cert is invalid after this instant)."""
        return self.expires_hours * 3600.0

    def is_expired(self, now: float) -> bool:
        """True if ``now`` is past the expiry."""
        return now > self.expires_at

    # -- wire format ---------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes) -> Ed25519Cert:
        """Decode a certificate; raise CertificateError if malformed or followed by extra bytes."""
        rec = _parse(_ED_CERT, data, "Ed25519 certificate")
        body = rec.body.value
        exts = tuple(CertExtension(e.ext_type, e.flags, bytes(e.data)) for e in body.extensions)
        n_signed_with = 0
        for ext in exts:
            if ext.ext_type == ExtType.SIGNED_WITH_ED25519_KEY:
                n_signed_with += 1
                if len(ext.data) != 32:
                    raise CertificateError(
                        f"signed-with-ed25519-key extension must be 32 bytes, got {len(ext.data)}")
        if n_signed_with > 1:
            raise CertificateError("Ed25519 certificate has more than one signed-with-ed25519-key extension")
        return cls(
            cert_type=_as_int_enum(CertType, body.cert_type),
            expires_hours=body.expires_hours,
            key_type=_as_int_enum(KeyType, body.key_type),
            certified_key=bytes(body.certified_key),
            extensions=exts,
            signature=bytes(rec.signature),
        )

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers (everything but SIGNATURE)."""
        if len(self.certified_key) != 32:
            raise LocalProtocolError("certified_key must be 32 bytes")
        if len(self.extensions) > 255:
            raise LocalProtocolError("at most 255 extensions")
        return _build(_ED_CERT_BODY, {
            "version": 1,
            "cert_type": int(self.cert_type),
            "expires_hours": int(self.expires_hours),
            "key_type": int(self.key_type),
            "certified_key": self.certified_key,
            "extensions": [
                {"ext_len": len(e.data), "ext_type": int(e.ext_type), "flags": int(e.flags), "data": e.data}
                for e in self.extensions
            ],
        }, "Ed25519 certificate")

    def encode(self) -> bytes:
        """Encode to the wire format."""
        if len(self.signature) != 64:
            raise LocalProtocolError("signature must be 64 bytes")
        return self.signed_bytes() + self.signature

    # -- checking ------------------------------------------------------------

    def verify(self, signing_key: bytes | None = None, *, now: float) -> None:
        """Check the certificate; raise CertificateError unless it is valid at ``now``.

        ``signing_key`` (32 raw bytes) is the key expected to have signed; when
        omitted, the key embedded in extension 04 is used. If both are present they
        must be equal.
        """
        for ext in self.extensions:
            if ext.ext_type != ExtType.SIGNED_WITH_ED25519_KEY and ext.affects_validation:
                raise CertificateError(
                    f"certificate has an unknown extension {ext.ext_type:#04x} that affects validation")
        embedded = self.signed_with
        if signing_key is not None and embedded is not None and bytes(signing_key) != embedded:
            raise CertificateError("certificate was signed by a different key than expected")
        key = signing_key if signing_key is not None else embedded
        if key is None:
            raise CertificateError("no key to check the certificate with (no signed-with-ed25519-key)")
        pub = _ed25519_public(bytes(key), "signing key")
        if len(self.signature) != 64:
            raise CertificateError("bad Ed25519 certificate signature length")
        try:
            pub.verify(self.signature, self.signed_bytes())
        except InvalidSignature:
            raise CertificateError(
                f"bad signature on Ed25519 certificate (type {int(self.cert_type)})") from None
        if self.is_expired(now):
            raise CertificateError(
                f"Ed25519 certificate (type {int(self.cert_type)}) expired at {self.expires_at:.0f}")

    @classmethod
    def create(
        cls,
        cert_type: int,
        certified_key: bytes,
        signer: ed25519.Ed25519PrivateKey | ExpandedKey,
        *,
        expires_hours: int,
        key_type: int = KeyType.ED25519,
        include_signer: bool = True,
        extensions: tuple[CertExtension, ...] = (),
    ) -> Ed25519Cert:
        """Issue a certificate for ``certified_key`` signed by ``signer``.

        With ``include_signer`` the signer's public key goes into extension 04
        (first); ``extensions`` are appended as given. ``signer`` may be an
        :class:`~onionp2p.proto.ed25519x.ExpandedKey` (a key without a seed, such as an
        onion service's blinded key, which signs its descriptor-signing-key certificate).
        """
        if len(certified_key) != 32:
            raise LocalProtocolError(f"certified_key must be 32 bytes, got {len(certified_key)}")
        if not 0 <= expires_hours <= _U32_MAX:
            raise LocalProtocolError("expires_hours must fit in 32 bits")
        exts: list[CertExtension] = []
        if include_signer:
            signer_public = signer.public if isinstance(signer, ExpandedKey) else _ed_raw(signer.public_key())
            exts.append(CertExtension(ExtType.SIGNED_WITH_ED25519_KEY, 0, signer_public))
        exts.extend(extensions)
        unsigned = cls(
            cert_type=_as_int_enum(CertType, int(cert_type)),
            expires_hours=int(expires_hours),
            key_type=_as_int_enum(KeyType, int(key_type)),
            certified_key=bytes(certified_key),
            extensions=tuple(exts),
        )
        sig = signer.sign(unsigned.signed_bytes())
        return cls(unsigned.cert_type, unsigned.expires_hours, unsigned.key_type,
                   unsigned.certified_key, unsigned.extensions, sig)


# ---------------------------------------------------------------------------
# RSA -> Ed25519 cross-certificate


def _cross_digest(signed: bytes) -> bytes:
    return hashlib.sha256(RSA_ED_CROSSCERT_PREFIX + signed).digest()


@dataclass(frozen=True)
class RsaCrossCert:
    """The RSA->Ed25519 cross-certificate (cert-spec §2.3, CERTS type 7)."""

    ed25519_key: bytes
    expires_hours: int
    signature: bytes = field(repr=False)

    @property
    def expires_at(self) -> float:
        """Expiry as a unix time."""
        return self.expires_hours * 3600.0

    def is_expired(self, now: float) -> bool:
        """True if ``now`` is past the expiry."""
        return now > self.expires_at

    def signed_bytes(self) -> bytes:
        """ED25519_KEY | EXPIRATION_DATE: the part covered by the signature."""
        if len(self.ed25519_key) != 32:
            raise LocalProtocolError("ed25519_key must be 32 bytes")
        if not 0 <= self.expires_hours <= _U32_MAX:
            raise LocalProtocolError("expires_hours must fit in 32 bits")
        return bytes(self.ed25519_key) + int(self.expires_hours).to_bytes(4, "big")

    @property
    def digest(self) -> bytes:
        """SHA256(prefix | ED25519_KEY | EXPIRATION_DATE), the value the RSA key signs."""
        return _cross_digest(self.signed_bytes())

    @classmethod
    def parse(cls, data: bytes) -> RsaCrossCert:
        """Decode; raise CertificateError if malformed or followed by extra bytes."""
        rec = _parse(_CROSS_CERT, data, "RSA->Ed25519 cross-certificate")
        signed = rec.signed.value
        return cls(bytes(signed.ed25519_key), signed.expires_hours, bytes(rec.signature))

    def encode(self) -> bytes:
        """Encode to the wire format."""
        if len(self.signature) > 255:
            raise LocalProtocolError("RSA signature longer than 255 bytes")
        return self.signed_bytes() + bytes([len(self.signature)]) + self.signature

    @classmethod
    def create(cls, rsa_private: rsa.RSAPrivateKey, ed_key: bytes, expires_hours: int) -> RsaCrossCert:
        """Cross-certify the Ed25519 identity ``ed_key`` (32 bytes) with an RSA identity key."""
        if len(ed_key) != 32:
            raise LocalProtocolError(f"ed_key must be 32 bytes, got {len(ed_key)}")
        unsigned = cls(bytes(ed_key), int(expires_hours), b"")
        sig = rsa_private.sign(unsigned.digest, padding.PKCS1v15(), utils.NoDigestInfo())
        if len(sig) > 255:
            raise LocalProtocolError("RSA key too large for a cross-certificate (max 2040 bits)")
        return cls(unsigned.ed25519_key, unsigned.expires_hours, sig)

    def verify(self, rsa_public: rsa.RSAPublicKey, now: float) -> None:
        """Raise CertificateError unless ``rsa_public`` signed this and it is valid at ``now``."""
        if not isinstance(rsa_public, rsa.RSAPublicKey):
            raise CertificateError("cross-certificate must be checked with an RSA public key")
        try:
            rsa_public.verify(self.signature, self.digest, padding.PKCS1v15(), utils.NoDigestInfo())
        except (InvalidSignature, ValueError):
            raise CertificateError("bad signature on RSA->Ed25519 cross-certificate") from None
        if self.is_expired(now):
            raise CertificateError(f"RSA->Ed25519 cross-certificate expired at {self.expires_at:.0f}")


# ---------------------------------------------------------------------------
# RSA identity and X.509


def rsa_public_der(public_key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> bytes:
    """PKCS#1 ``RSAPublicKey`` DER encoding (what tor hashes and publishes)."""
    if isinstance(public_key, rsa.RSAPrivateKey):
        public_key = public_key.public_key()
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


def rsa_identity_digest(public_key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> bytes:
    """The 20-byte relay identity digest: SHA-1 of the PKCS#1 DER public key."""
    return hashlib.sha1(rsa_public_der(public_key)).digest()


def x509_sha256(der: bytes) -> bytes:
    """SHA-256 of a DER certificate (the CERTIFIED_KEY of a type-5 cert)."""
    return hashlib.sha256(der).digest()


_X509Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _random_hostname(tld: str) -> str:
    # C tor names its certificates "www.<random base32>.<tld>"; we do the same.
    label = secrets.token_hex(secrets.randbelow(6) + 4)
    return f"www.{label}.{tld}"


def make_self_signed_x509(
    private_key: _X509Key,
    *,
    now: float,
    lifetime: float,
    backdate: float = 86400.0,
    common_name: str | None = None,
) -> bytes:
    """A self-signed X.509v3 certificate (DER) for ``private_key``.

    Valid from ``now - backdate`` (rounded down to a whole hour, so the start time
    says little about when the key was made) until ``now + lifetime``. The subject
    and issuer are a random ``www.*.net`` name unless ``common_name`` is given.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or _random_hostname("net"))])
    start = math.floor((now - backdate) / 3600.0) * 3600.0
    not_before = _dt.datetime.fromtimestamp(start, _dt.UTC)
    not_after = _dt.datetime.fromtimestamp(math.floor(now + lifetime), _dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(secrets.randbits(63) | 1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    algorithm = None if isinstance(private_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(private_key, algorithm)
    return cert.public_bytes(serialization.Encoding.DER)


def make_rsa_identity_cert(rsa_private: rsa.RSAPrivateKey, now: float, *,
                           lifetime: float = 365 * 86400.0) -> bytes:
    """The self-signed X.509 certificate for the RSA identity key (CERTS type 2), DER."""
    return make_self_signed_x509(rsa_private, now=now, lifetime=lifetime,
                                 common_name=_random_hostname("com"))


# What cryptography may raise on hostile DER (InvalidVersion is not a ValueError).
_X509_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion)


def parse_x509(der: bytes) -> x509.Certificate:
    """Decode a DER X.509 certificate; raise CertificateError if it is malformed."""
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise CertificateError("X.509 certificate must be bytes")
    try:
        with warnings.catch_warnings():
            # e.g. a non-positive serial number: legal for tor, deprecated in cryptography
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(bytes(der))
        # Force the lazily-parsed fields we rely on, so errors surface here.
        _ = (cert.public_key(), cert.not_valid_before_utc, cert.not_valid_after_utc,
             cert.issuer, cert.subject)
    except _X509_ERRORS as exc:
        raise CertificateError(f"malformed X.509 certificate: {exc}") from None
    return cert


def verify_rsa_identity_cert(der: bytes, *, now: float) -> rsa.RSAPublicKey:
    """Check a CERTS type-2 certificate as C tor does and return its RSA identity key.

    Requirements: well-formed DER; an RSA-1024 key with exponent 65537; a valid
    self-signature; and ``notBefore <= now + X509_FUTURE_SLOP`` and
    ``notAfter >= now - X509_PAST_SLOP``.
    """
    cert = parse_x509(der)
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateError("RSA identity certificate does not hold an RSA key")
    if key.key_size != 1024 or key.public_numbers().e != 65537:
        raise CertificateError(
            f"RSA identity key must be 1024 bits with e=65537 (got {key.key_size} bits)")
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, *_X509_ERRORS):
        raise CertificateError("RSA identity certificate is not validly self-signed") from None
    if cert.not_valid_before_utc.timestamp() > now + X509_FUTURE_SLOP:
        raise CertificateError("RSA identity certificate is not yet valid")
    if cert.not_valid_after_utc.timestamp() < now - X509_PAST_SLOP:
        raise CertificateError("RSA identity certificate has expired")
    return key
