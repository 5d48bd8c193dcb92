"""The v3 onion-service descriptor: build, encrypt, decrypt, parse, check (rend-spec-v3 §2.4-2.5).

Theory of operation
-------------------
A descriptor has three nested documents.

*Outer* (what an HSDir stores and can check): ``hs-descriptor 3``, ``descriptor-lifetime``
(minutes), ``descriptor-signing-key-cert`` (a type-08 certificate by which the period's
blinded key ``A'`` vouches for a short-lived signing key), ``revision-counter``,
``superencrypted`` (the middle layer, encrypted) and ``signature``: the signing key's
Ed25519 signature of ``"Tor onion service descriptor sig v3"`` followed by every byte of
the document up to the ``signature`` line.

*Middle* (readable by anyone who knows the onion address): ``desc-auth-type x25519``,
``desc-auth-ephemeral-key`` (a fresh x25519 key of the service), ``auth-client`` lines
and ``encrypted`` (the inner layer). With client authorization the service draws a random
32-byte *descriptor cookie* and, for each client key ``C``, computes
``SHAKE-256(subcred | x25519(ephemeral, C), 40)`` = 8-byte client id | 32-byte key, and
writes ``auth-client <id> <iv> <AES-256-CTR(key, iv, cookie)>``. Without client
authorization the lines are random bytes of the same sizes. Either way the number of lines
is a multiple of 16, so the descriptor does not tell whether access is restricted or to
how many clients.

*Inner*: ``create2-formats 2``, optional ``intro-auth-required`` and
``single-onion-service``, then per introduction point: ``introduction-point`` (base64
link specifiers), ``onion-key ntor``, ``auth-key`` (type-09 certificate of the intro
point's auth key), ``enc-key ntor`` (the service's hs-ntor key ``B``) and ``enc-key-cert``
(type-0B certificate of ``B``'s Ed25519 form). Both certificates are signed *by the
descriptor signing key*, the reverse of what their names suggest, as tor does.

Encryption of a layer (§2.5.3): ``keys = SHAKE-256(SECRET_DATA | subcred |
INT_8(revision_counter) | salt | STRING_CONSTANT, 32+16+32)`` gives an AES-256-CTR key, IV
and MAC key; the blob is ``salt | ciphertext | SHA3-256(INT_8(32) | mac_key | INT_8(16) |
salt | ciphertext)``. The middle layer uses ``SECRET_DATA = A'`` and
``"hsdir-superencrypted-data"``, and its plaintext is padded with NULs to a multiple of
10000 bytes (tor pads only this layer); the inner layer uses ``A' | cookie`` (no cookie
without client authorization) and ``"hsdir-encrypted-data"``.

Parsing is strict: size limit (50000 bytes, tor's default ``HSV3MaxDescriptorSize``),
exactly-once/at-most-once keyword rules, the order of the first and last outer items,
certificate types, signers and expiry at ``now``, the outer signature and both MACs.
Every problem is a typed :class:`~onionp2p.errors.HsDescriptorError`; unknown keywords are
ignored, as the spec asks (newer tor adds ``flow-control`` and ``pow-params``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from onionp2p.errors import (
    CertificateError,
    HsClientAuthError,
    HsDescriptorDecryptError,
    HsDescriptorError,
    HsDescriptorSignatureError,
    ProtocolError,
)
from onionp2p.proto.certs import CertType, Ed25519Cert, KeyType, expiry_hours
from onionp2p.proto.ed25519x import ExpandedKey, ed25519_public_from_curve25519
from onionp2p.proto.hs.blinding import DESC_CERT_LIFETIME, desc_signing_cert
from onionp2p.proto.hs.netdoc import (
    Item,
    b64_nopad,
    check_counts,
    format_object,
    need_object,
    no_object,
    parse_items,
    unb64,
)
from onionp2p.proto.hs.ntor import aes256ctr
from onionp2p.proto.relaycell import LinkSpec, LinkSpecType, encode_link_specs, parse_link_specs

__all__ = [
    "AUTH_CLIENT_MULTIPLE",
    "DEFAULT_LIFETIME",
    "MAX_DESCRIPTOR_SIZE",
    "MAX_INTRO_POINTS",
    "HsDescriptor",
    "IntroPoint",
    "OuterDescriptor",
    "build_descriptor",
    "decrypt_layer",
    "encrypt_layer",
    "parse_descriptor",
    "parse_outer",
]

MAX_DESCRIPTOR_SIZE = 50000  # tor's HSV3MaxDescriptorSize default
MAX_LIFETIME = 720           # minutes (12 hours): tor's HS_DESC_MAX_LIFETIME
DEFAULT_LIFETIME = 180       # minutes: what tor's services publish
MAX_INTRO_POINTS = 20        # rend-spec-v3 §2.5.4
AUTH_CLIENT_MULTIPLE = 16    # auth-client lines come in multiples of this
PAD_MULTIPLE = 10000         # the middle layer's plaintext is padded to a multiple of this
SALT_LEN = 16
COOKIE_LEN = 16  # the descriptor cookie: tor's HS_DESC_DESCRIPTOR_COOKIE_LEN (the spec's prose says 32)
_MAC_LEN = 32
SIG_PREFIX = b"Tor onion service descriptor sig v3"
_SUPERENC = b"hsdir-superencrypted-data"
_ENC = b"hsdir-encrypted-data"
_CERT = "ED25519 CERT"
_MESSAGE = "MESSAGE"
_NTOR_HTYPE = 2


# -- layer encryption (§2.5.3) ------------------------------------------------------------------


def _layer_keys(secret_data: bytes, subcred: bytes, revision: int, salt: bytes,
                constant: bytes) -> tuple[bytes, bytes, bytes]:
    keys = hashlib.shake_256(secret_data + subcred + revision.to_bytes(8, "big") + salt + constant).digest(80)
    return keys[:32], keys[32:48], keys[48:]


def _layer_mac(mac_key: bytes, salt: bytes, ciphertext: bytes) -> bytes:
    return hashlib.sha3_256(len(mac_key).to_bytes(8, "big") + mac_key + len(salt).to_bytes(8, "big") + salt
                            + ciphertext).digest()


def encrypt_layer(plaintext: bytes, secret_data: bytes, subcred: bytes, revision: int, constant: bytes, *,
                  salt: bytes | None = None) -> bytes:
    """``salt | AES-256-CTR(plaintext) | MAC``; a fresh salt unless one is given."""
    salt = salt if salt is not None else hashlib.sha3_256(os.urandom(32)).digest()[:SALT_LEN]
    key, iv, mac_key = _layer_keys(secret_data, subcred, revision, salt, constant)
    ciphertext = aes256ctr(key, plaintext, iv)
    return salt + ciphertext + _layer_mac(mac_key, salt, ciphertext)


def decrypt_layer(blob: bytes, secret_data: bytes, subcred: bytes, revision: int, constant: bytes) -> bytes:
    """Check the MAC and decrypt; raise HsDescriptorDecryptError if it does not match."""
    if len(blob) <= SALT_LEN + _MAC_LEN:
        raise HsDescriptorError(f"encrypted descriptor layer too short ({len(blob)} bytes)")
    salt, ciphertext, mac = blob[:SALT_LEN], blob[SALT_LEN:-_MAC_LEN], blob[-_MAC_LEN:]
    key, iv, mac_key = _layer_keys(secret_data, subcred, revision, salt, constant)
    if not hmac.compare_digest(_layer_mac(mac_key, salt, ciphertext), mac):
        raise HsDescriptorDecryptError(
            f"descriptor layer {constant.decode()!r}: MAC mismatch (wrong address, period or client key?)")
    return aes256ctr(key, ciphertext, iv)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % PAD_MULTIPLE) if data else bytes(PAD_MULTIPLE)


def _as_text(plaintext: bytes, what: str) -> str:
    text = plaintext.rstrip(b"\x00")  # the padding
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise HsDescriptorError(f"{what}: not ASCII after decryption") from None


# -- data model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntroPoint:
    """One introduction point as the descriptor lists it.

    ``onion_key``: the intro relay's ntor key (x25519, for the client's circuit to it);
    ``auth_key``: the Ed25519 key the service registered there (ESTABLISH_INTRO);
    ``enc_key``: the service's hs-ntor key ``B`` for this intro point. Parsed entries carry
    their two certificates; built ones get them from :func:`build_descriptor`.
    """

    link_specifiers: tuple[LinkSpec, ...]
    onion_key: bytes
    auth_key: bytes
    enc_key: bytes
    auth_key_cert: Ed25519Cert | None = field(default=None, compare=False, repr=False)
    enc_key_cert: Ed25519Cert | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class OuterDescriptor:
    """The outer document after its signature and certificate were checked (what an HSDir keeps)."""

    lifetime: int  # minutes
    signing_key_cert: Ed25519Cert
    revision_counter: int
    superencrypted: bytes = field(repr=False)
    text: str = field(repr=False)

    @property
    def blinded_key(self) -> bytes:
        """``A'``: the key the HSDir files the descriptor under (from the certificate's extension)."""
        signer = self.signing_key_cert.signed_with
        assert signer is not None  # parse_outer requires it
        return signer

    @property
    def signing_key(self) -> bytes:
        return self.signing_key_cert.certified_key


@dataclass(frozen=True)
class HsDescriptor:
    """A fully decrypted descriptor."""

    outer: OuterDescriptor
    intro_points: tuple[IntroPoint, ...]
    create2_formats: tuple[int, ...] = (_NTOR_HTYPE,)
    intro_auth_required: tuple[str, ...] = ()
    single_onion_service: bool = False
    client_auth: bool = False  # the inner layer was keyed with a descriptor cookie


# -- building -----------------------------------------------------------------------------------


def _cert(cert_type: int, subject: bytes, signer: ExpandedKey | ed25519.Ed25519PrivateKey,
          expires: int) -> Ed25519Cert:
    return Ed25519Cert.create(cert_type, subject, signer, expires_hours=expires, key_type=KeyType.ED25519)


def _signer_public(signer: ExpandedKey | ed25519.Ed25519PrivateKey) -> bytes:
    return signer.public if isinstance(signer, ExpandedKey) else signer.public_key().public_bytes_raw()


def _inner_text(intro_points: Sequence[IntroPoint], signer: ExpandedKey | ed25519.Ed25519PrivateKey,
                expires: int, *, single_onion: bool, intro_auth_required: Sequence[str]) -> str:
    lines = [f"create2-formats {_NTOR_HTYPE}"]
    if intro_auth_required:
        lines.append("intro-auth-required " + " ".join(intro_auth_required))
    if single_onion:
        lines.append("single-onion-service")
    for ip in intro_points:
        lines.append("introduction-point " + base64.b64encode(encode_link_specs(ip.link_specifiers)).decode())
        lines.append("onion-key ntor " + base64.b64encode(ip.onion_key).decode())
        lines.append("auth-key")
        lines.append(format_object(_CERT, _cert(CertType.HS_IP_V_SIGNING, ip.auth_key, signer, expires).encode()))
        lines.append("enc-key ntor " + base64.b64encode(ip.enc_key).decode())
        lines.append("enc-key-cert")
        ed_form = ed25519_public_from_curve25519(ip.enc_key, 0)
        lines.append(format_object(_CERT, _cert(CertType.HS_IP_CC_SIGNING, ed_form, signer, expires).encode()))
    return "\n".join(lines) + "\n"


def _auth_client_keys(subcred: bytes, shared: bytes) -> tuple[bytes, bytes]:
    keys = hashlib.shake_256(subcred + shared).digest(40)
    return keys[:8], keys[8:]


def build_descriptor(*, blinded: ExpandedKey, subcred: bytes, revision_counter: int,
                     intro_points: Sequence[IntroPoint], now: float,
                     signing_key: ed25519.Ed25519PrivateKey | None = None,
                     lifetime: int = DEFAULT_LIFETIME, cert_lifetime: float = DESC_CERT_LIFETIME,
                     client_keys: Sequence[bytes] = (), single_onion: bool = False,
                     intro_auth_required: Sequence[str] = (),
                     rng: Callable[[int], bytes] = os.urandom) -> str:
    """Make a signed, encrypted descriptor for the period whose blinded key is ``blinded``.

    ``client_keys``: x25519 public keys of authorized clients (empty: no client authorization;
    fake ``auth-client`` lines are written instead). ``signing_key`` defaults to a fresh key.
    """
    if not 1 <= lifetime <= MAX_LIFETIME:
        raise ValueError(f"descriptor lifetime must be 1..{MAX_LIFETIME} minutes")
    if len(intro_points) > MAX_INTRO_POINTS:
        raise ValueError(f"at most {MAX_INTRO_POINTS} introduction points")
    signing_key = signing_key if signing_key is not None else ed25519.Ed25519PrivateKey.generate()
    signing_public = _signer_public(signing_key)
    cert = desc_signing_cert(blinded, signing_public, now=now, lifetime=cert_lifetime)
    expires = expiry_hours(now + cert_lifetime)
    a_blind = blinded.public

    # inner layer
    cookie = rng(COOKIE_LEN) if client_keys else b""
    inner = _inner_text(intro_points, signing_key, expires, single_onion=single_onion,
                        intro_auth_required=intro_auth_required)
    encrypted = encrypt_layer(inner.encode(), a_blind + cookie, subcred, revision_counter, _ENC)

    # middle layer
    ephemeral = X25519PrivateKey.generate()
    auth_lines = []
    for client in client_keys:
        client_id, cookie_key = _auth_client_keys(subcred, ephemeral.exchange(X25519PublicKey.from_public_bytes(client)))
        iv = rng(16)
        auth_lines.append((client_id, iv, aes256ctr(cookie_key, cookie, iv)))
    while not auth_lines or len(auth_lines) % AUTH_CLIENT_MULTIPLE:
        auth_lines.append((rng(8), rng(16), rng(COOKIE_LEN)))
    random.SystemRandom().shuffle(auth_lines)
    middle = "\n".join([
        "desc-auth-type x25519",
        "desc-auth-ephemeral-key " + base64.b64encode(ephemeral.public_key().public_bytes_raw()).decode(),
        *(f"auth-client {b64_nopad(i)} {b64_nopad(v)} {b64_nopad(c)}" for i, v, c in auth_lines),
        "encrypted",
        format_object(_MESSAGE, encrypted),
    ])  # no final newline, like tor
    superencrypted = encrypt_layer(_pad(middle.encode()), a_blind, subcred, revision_counter, _SUPERENC)

    # outer layer
    body = "\n".join([
        "hs-descriptor 3",
        f"descriptor-lifetime {lifetime}",
        "descriptor-signing-key-cert",
        format_object(_CERT, cert.encode()),
        f"revision-counter {revision_counter}",
        "superencrypted",
        format_object(_MESSAGE, superencrypted),
    ]) + "\n"
    signature = signing_key.sign(SIG_PREFIX + body.encode())
    return body + f"signature {b64_nopad(signature)}\n"


# -- parsing ------------------------------------------------------------------------------------


def _uint(text: str, what: str, hi: int) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise HsDescriptorError(f"{what}: {text[:30]!r} is not a non-negative integer")
    value = int(text)
    if value > hi:
        raise HsDescriptorError(f"{what}: {value} is out of range")
    return value


def _one(items: Sequence[Item], keyword: str) -> Item:
    return next(it for it in items if it.keyword == keyword)


def _check_cert(data: bytes, cert_type: int, signer: bytes | None, now: float, what: str) -> Ed25519Cert:
    try:
        cert = Ed25519Cert.parse(data)
        if cert.cert_type != cert_type or cert.key_type != KeyType.ED25519:
            raise HsDescriptorSignatureError(f"{what}: certificate type {int(cert.cert_type):#04x}, "
                                             f"expected {cert_type:#04x}")
        if cert.signed_with is None:
            raise HsDescriptorSignatureError(f"{what}: certificate lacks the signed-with-ed25519-key extension")
        cert.verify(signer, now=now)
    except CertificateError as exc:
        raise HsDescriptorSignatureError(f"{what}: {exc}") from None
    return cert


def parse_outer(text: str | bytes, *, now: float, blinded_key: bytes | None = None) -> OuterDescriptor:
    """Parse and check the outer document (an HSDir's whole job; a client's first step).

    ``blinded_key``: the ``A'`` the caller expects (a client derives it from the address; an
    HSDir takes it from the upload URL): the certificate must be signed by it.
    """
    if isinstance(text, bytes):
        if len(text) > MAX_DESCRIPTOR_SIZE:
            raise HsDescriptorError(f"descriptor is {len(text)} bytes, the limit is {MAX_DESCRIPTOR_SIZE}")
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise HsDescriptorError("descriptor is not ASCII") from None
    if len(text) > MAX_DESCRIPTOR_SIZE:
        raise HsDescriptorError(f"descriptor is {len(text)} bytes, the limit is {MAX_DESCRIPTOR_SIZE}")
    what = "descriptor"
    items = parse_items(text, what)
    if not items or items[0].keyword != "hs-descriptor":
        raise HsDescriptorError("descriptor must start with 'hs-descriptor'")
    if items[-1].keyword != "signature":
        raise HsDescriptorError("descriptor must end with 'signature'")
    check_counts(items, what, exactly_once=("hs-descriptor", "descriptor-lifetime", "descriptor-signing-key-cert",
                                            "revision-counter", "superencrypted", "signature"))
    if items[0].args != ("3",):
        raise HsDescriptorError(f"unsupported descriptor version {' '.join(items[0].args)[:20]!r}")
    no_object(items[0], what)
    lifetime_item = _one(items, "descriptor-lifetime")
    if len(lifetime_item.args) != 1:
        raise HsDescriptorError("descriptor-lifetime takes one argument")
    lifetime = _uint(lifetime_item.args[0], "descriptor-lifetime", MAX_LIFETIME)
    if lifetime < 1:
        raise HsDescriptorError("descriptor-lifetime must be at least 1 minute")
    rev_item = _one(items, "revision-counter")
    if len(rev_item.args) != 1:
        raise HsDescriptorError("revision-counter takes one argument")
    revision = _uint(rev_item.args[0], "revision-counter", (1 << 64) - 1)
    cert = _check_cert(need_object(_one(items, "descriptor-signing-key-cert"), _CERT, what),
                       CertType.HS_BLINDED_ID_V_SIGNING, blinded_key, now, "descriptor-signing-key-cert")
    superencrypted = need_object(_one(items, "superencrypted"), _MESSAGE, what)
    sig_item = items[-1]
    no_object(sig_item, what)
    if len(sig_item.args) != 1:
        raise HsDescriptorError("signature takes one argument")
    signature = unb64(sig_item.args[0], "signature", 64)
    signed = SIG_PREFIX + text[:sig_item.start].encode("ascii")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(cert.certified_key).verify(signature, signed)
    except (InvalidSignature, ValueError):  # a bad signature, or a key that is no point
        raise HsDescriptorSignatureError("descriptor signature does not verify") from None
    return OuterDescriptor(lifetime, cert, revision, superencrypted, text)


def _parse_middle(text: str) -> tuple[bytes, list[tuple[bytes, bytes, bytes]], bytes]:
    what = "descriptor middle layer"
    items = parse_items(text, what)
    check_counts(items, what, exactly_once=("desc-auth-type", "desc-auth-ephemeral-key", "encrypted"),
                 at_least_once=("auth-client",))
    if _one(items, "desc-auth-type").args[:1] != ("x25519",):
        raise HsDescriptorError(f"{what}: desc-auth-type must be x25519")
    eph_args = _one(items, "desc-auth-ephemeral-key").args
    if len(eph_args) != 1:
        raise HsDescriptorError(f"{what}: desc-auth-ephemeral-key takes one argument")
    ephemeral = unb64(eph_args[0], "desc-auth-ephemeral-key", 32)
    clients = []
    for it in items:
        if it.keyword == "auth-client":
            if len(it.args) < 3:
                raise HsDescriptorError(f"{what}: auth-client takes three arguments")
            clients.append((unb64(it.args[0], "auth-client id", 8), unb64(it.args[1], "auth-client iv", 16),
                            unb64(it.args[2], "auth-client cookie", COOKIE_LEN)))
    encrypted = need_object(_one(items, "encrypted"), _MESSAGE, what)
    return ephemeral, clients, encrypted


def _find_cookie(subcred: bytes, ephemeral: bytes, clients: list[tuple[bytes, bytes, bytes]],
                 client_secret: X25519PrivateKey) -> bytes | None:
    try:
        shared = client_secret.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    except ValueError:
        raise HsDescriptorError("desc-auth-ephemeral-key is a low-order point") from None
    client_id, cookie_key = _auth_client_keys(subcred, shared)
    for cid, iv, enc_cookie in clients:
        if hmac.compare_digest(cid, client_id):
            return aes256ctr(cookie_key, enc_cookie, iv)
    return None


def _parse_intro_point(items: Sequence[Item], signing_key: bytes, now: float, n: int) -> IntroPoint:
    what = f"introduction point {n}"
    check_counts(items, what, exactly_once=("introduction-point", "auth-key", "enc-key-cert"),
                 at_most_once=("legacy-key", "legacy-key-cert"))
    head = items[0]
    no_object(head, what)
    if len(head.args) != 1:
        raise HsDescriptorError(f"{what}: introduction-point takes one argument")
    try:
        specs = parse_link_specs(unb64(head.args[0], f"{what} link specifiers"), f"{what} link specifiers")
    except HsDescriptorError:
        raise
    except ProtocolError as exc:
        raise HsDescriptorError(str(exc)) from None
    types = {s.lstype for s in specs}
    if not {LinkSpecType.IPV4, LinkSpecType.LEGACY_ID} <= types and not (
            {LinkSpecType.IPV6, LinkSpecType.LEGACY_ID} <= types):
        raise HsDescriptorError(f"{what}: link specifiers lack an address or the legacy identity")

    def ntor_key(keyword: str) -> bytes:
        found = [it for it in items if it.keyword == keyword and it.args[:1] == ("ntor",)]
        if len(found) != 1:
            raise HsDescriptorError(f"{what}: needs exactly one '{keyword} ntor' line, found {len(found)}")
        if len(found[0].args) != 2:
            raise HsDescriptorError(f"{what}: '{keyword} ntor' takes one key")
        return unb64(found[0].args[1], f"{what} {keyword}", 32)

    onion_key = ntor_key("onion-key")
    enc_key = ntor_key("enc-key")
    auth_cert = _check_cert(need_object(_one(items, "auth-key"), _CERT, what), CertType.HS_IP_V_SIGNING,
                            signing_key, now, f"{what} auth-key")
    enc_cert = _check_cert(need_object(_one(items, "enc-key-cert"), _CERT, what), CertType.HS_IP_CC_SIGNING,
                           signing_key, now, f"{what} enc-key-cert")
    try:
        expected = ed25519_public_from_curve25519(enc_key, 0)
    except ValueError:
        raise HsDescriptorError(f"{what}: enc-key is not a usable curve25519 key") from None
    if enc_cert.certified_key != expected:  # tor converts with sign bit 0
        raise HsDescriptorSignatureError(f"{what}: enc-key-cert does not certify enc-key")
    return IntroPoint(specs, onion_key, auth_cert.certified_key, enc_key, auth_cert, enc_cert)


def _parse_inner(text: str, signing_key: bytes, now: float) -> tuple[tuple[IntroPoint, ...], tuple[int, ...],
                                                                     tuple[str, ...], bool]:
    what = "descriptor inner layer"
    items = parse_items(text, what)
    first_ip = next((i for i, it in enumerate(items) if it.keyword == "introduction-point"), len(items))
    head = items[:first_ip]
    check_counts(head, what, exactly_once=("create2-formats",),
                 at_most_once=("intro-auth-required", "single-onion-service"))
    formats = []
    for arg in _one(head, "create2-formats").args:
        formats.append(_uint(arg, "create2-formats", 0xFFFF))
    if _NTOR_HTYPE not in formats:
        raise HsDescriptorError(f"{what}: create2-formats does not offer ntor (2)")
    auth_required = next((it.args for it in head if it.keyword == "intro-auth-required"), ())
    single = any(it.keyword == "single-onion-service" for it in head)
    starts = [i for i, it in enumerate(items) if it.keyword == "introduction-point"]
    if len(starts) > MAX_INTRO_POINTS:
        raise HsDescriptorError(f"{what}: {len(starts)} introduction points, at most {MAX_INTRO_POINTS}")
    ends = [*starts[1:], len(items)] if starts else []
    ips = tuple(_parse_intro_point(items[s:e], signing_key, now, n + 1)
                for n, (s, e) in enumerate(zip(starts, ends, strict=True)))
    return ips, tuple(formats), tuple(auth_required), single


def parse_descriptor(text: str | bytes, *, blinded_key: bytes, subcred: bytes, now: float,
                     client_secret: X25519PrivateKey | None = None) -> HsDescriptor:
    """Parse, check and decrypt a whole descriptor (the client's job).

    Raises:
        HsDescriptorError: malformed, too big, expired or inconsistent.
        HsDescriptorSignatureError: the signature or a certificate does not verify, or the
            certificate was not signed by ``blinded_key``.
        HsDescriptorDecryptError: the middle layer's MAC does not match (wrong subcredential).
        HsClientAuthError: the inner layer needs client authorization: ``missing`` when we
            have no client key, otherwise our key is not (or no longer) authorized.
    """
    outer = parse_outer(text, now=now, blinded_key=blinded_key)
    rev = outer.revision_counter
    middle = _as_text(decrypt_layer(outer.superencrypted, blinded_key, subcred, rev, _SUPERENC), "middle layer")
    ephemeral, clients, encrypted = _parse_middle(middle)
    cookie = None
    if client_secret is not None:
        cookie = _find_cookie(subcred, ephemeral, clients, client_secret)
    try:
        inner_bytes = decrypt_layer(encrypted, blinded_key + (cookie or b""), subcred, rev, _ENC)
    except HsDescriptorDecryptError:
        if client_secret is None:
            raise HsClientAuthError("descriptor needs client authorization (no client key for this address)",
                                    missing=True) from None
        raise HsClientAuthError("descriptor refuses our client key (not authorized, or revoked)",
                                missing=False) from None
    ips, formats, auth_required, single = _parse_inner(_as_text(inner_bytes, "inner layer"), outer.signing_key,
                                                       now)
    return HsDescriptor(outer, ips, formats, auth_required, single, client_auth=cookie is not None)
