"""Tor-format relay documents: dir-spec server descriptors and extra-info documents. Pure.

Theory of operation
-------------------
A relay that joins a *Tor* network (C tor directory authorities) publishes two signed
documents (dir-spec "Server descriptor format", "Extra-info document format"), uploaded
together in one HTTP POST to ``/tor/`` on each authority's DirPort:

* the **server descriptor**: ``router`` line, ``identity-ed25519`` (the identity->signing
  certificate, cert type 4, with the signed-with-ed25519-key extension),
  ``master-key-ed25519``, ``platform``, ``proto``, ``published``, ``fingerprint``,
  ``uptime``, ``bandwidth``, ``extra-info-digest``, the legacy TAP ``onion-key`` with its
  ``onion-key-crosscert`` (only when a TAP key is given: tor 0.4.9 authorities still
  require it, see specs/tor-interop.md), ``signing-key`` (the RSA-1024 identity),
  ``ntor-onion-key`` with ``ntor-onion-key-crosscert`` (an Ed25519 certificate of type
  0x0A certifying the master identity key, signed by the Ed25519 twin of the ntor key,
  :class:`~onionp2p.proto.ed25519x.ExpandedKey`, whose public sign bit is the item's
  argument), ``family``, ``contact``, the exit policy (IPv4 rules; ``ipv6-policy`` with
  the IPv6 port summary when it accepts anything), ``tunnelled-dir-server``, then the two
  signatures;
* the **extra-info** document (``extra-info NICK FP``, ``identity-ed25519``,
  ``published``, signatures), whose digests the descriptor names: SHA-1 of its signed
  part (through ``router-signature`` NL) in hex, SHA-256 of the whole document in
  unpadded base64.

Both end with ``router-sig-ed25519``: the Ed25519 signing key's signature of
SHA-256("Tor router descriptor signature v1" | text through the space after
``router-sig-ed25519``), unpadded base64; and ``router-signature``: the RSA identity key's
PKCS#1 type-1 signature of the bare SHA-1 of the text from the first byte through
``router-signature`` NL (tor's signatures carry no DigestInfo).

:func:`parse_server_descriptor` and :func:`parse_extra_info` read such documents back and
check every signature and cross-certificate, strictly enough to reject what a tor
authority rejects for bad keys or signatures (they are used by the tests, against our
own documents and against real tor relays'). Nothing here reads the clock: ``now`` and
``published`` are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from onionp2p.errors import CertificateError, LocalProtocolError, ProtocolError
from onionp2p.proto.certs import CertType, Ed25519Cert, KeyType, rsa_public_der
from onionp2p.proto.directory import format_time, parse_time
from onionp2p.proto.ed25519x import ExpandedKey, ed25519_public_from_curve25519
from onionp2p.proto.exitpolicy import ExitPolicy

if TYPE_CHECKING:
    from onionp2p.relay.keys import RelayKeys

__all__ = [
    "ED_SIGNATURE_PREFIX",
    "MAX_DESCRIPTOR",
    "ExtraInfo",
    "TorDescriptor",
    "build_extra_info",
    "build_server_descriptor",
    "descriptor_policy_lines",
    "ntor_crosscert",
    "parse_extra_info",
    "parse_server_descriptor",
]

#: what router-sig-ed25519 signs, before the document text (dir-spec; both documents)
ED_SIGNATURE_PREFIX = b"Tor router descriptor signature v1"
_SIG_ED = b"router-sig-ed25519 "
_SIG_RSA = b"router-signature\n"
MAX_DESCRIPTOR = 20_000  # tor's MAX_DESCRIPTOR_UPLOAD_SIZE is 20000 bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _pem(label: str, data: bytes) -> str:
    body = base64.b64encode(data).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])


def _rsa_sign(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    """tor's RSA signature: PKCS#1 v1.5 type-1 padding of the bare digest (no DigestInfo)."""
    return key.sign(digest, padding.PKCS1v15(), utils.NoDigestInfo())


def _rsa_verify(key: rsa.RSAPublicKey, sig: bytes, digest: bytes) -> bool:
    try:
        return hmac.compare_digest(key.recover_data_from_signature(sig, padding.PKCS1v15(), None), digest)
    except (InvalidSignature, ValueError):
        return False


def _sign_both(body: str, signing: ed25519.Ed25519PrivateKey, rsa_key: rsa.RSAPrivateKey) -> str:
    """Append router-sig-ed25519 and router-signature to ``body`` (which ends in a newline)."""
    head = body.encode() + _SIG_ED
    ed_sig = signing.sign(hashlib.sha256(ED_SIGNATURE_PREFIX + head).digest())
    signed = head + _b64(ed_sig).encode() + b"\n" + _SIG_RSA
    rsa_sig = _rsa_sign(rsa_key, hashlib.sha1(signed).digest())
    return signed.decode() + _pem("SIGNATURE", rsa_sig) + "\n"


def ntor_crosscert(onion_key_secret: bytes, identity: bytes, expires_hours: int) -> tuple[Ed25519Cert, int]:
    """The ntor-onion-key-crosscert: a type 0x0A certificate of the Ed25519 master ``identity``
    signed by the Ed25519 twin of the ntor key (no extensions), and the twin's sign bit."""
    twin, sign_bit = ExpandedKey.from_curve25519(onion_key_secret)
    unsigned = Ed25519Cert(CertType.NTOR_CC_IDENTITY, expires_hours, KeyType.ED25519, bytes(identity))
    cert = Ed25519Cert(unsigned.cert_type, unsigned.expires_hours, unsigned.key_type, unsigned.certified_key,
                       (), twin.sign(unsigned.signed_bytes()))
    return cert, sign_bit


def descriptor_policy_lines(policy: ExitPolicy) -> list[str]:
    """The exit policy as server-descriptor lines: IPv4 and ``*`` rules only (``*4`` written
    ``*``), as tor writes them; IPv6 goes into ``ipv6-policy``."""
    out = []
    for rule in policy.rules:
        if rule.family == 6:
            continue
        addr = "*" if rule.network is None else rule.address_text()
        out.append(f"{'accept' if rule.accept else 'reject'} {addr}:{rule.port_text()}")
    return out


@dataclass(frozen=True)
class ExtraInfo:
    """A signed extra-info document and the two digests the server descriptor names."""

    text: str
    sha1_hex: str  # SHA-1 of the signed part, upper-case hex
    sha256_b64: str  # SHA-256 of the whole document, unpadded base64


def build_extra_info(keys: RelayKeys, *, nickname: str, published: int) -> ExtraInfo:
    """The extra-info document published beside a server descriptor (no statistics)."""
    body = "\n".join([
        f"extra-info {nickname} {keys.fingerprint}",
        "identity-ed25519",
        _pem("ED25519 CERT", keys.signing_cert.encode()),
        f"published {format_time(published)}",
    ]) + "\n"
    text = _sign_both(body, keys.signing, keys.rsa_identity)
    raw = text.encode()
    signed = raw[:raw.index(b"\n" + _SIG_RSA) + 1 + len(_SIG_RSA)]
    return ExtraInfo(text, hashlib.sha1(signed).hexdigest().upper(), _b64(hashlib.sha256(raw).digest()))


def build_server_descriptor(
    keys: RelayKeys, *, nickname: str, address: str, or_port: int, published: int, uptime: int,
    bandwidth: tuple[int, int, int], platform: str, protocols: str, exit_policy: ExitPolicy,
    extra_info: ExtraInfo | None = None, tap_key: rsa.RSAPrivateKey | None = None,
    family: Sequence[str] = (), contact: str | None = None, dir_cache: bool = False,
) -> str:
    """A signed dir-spec server descriptor (see the module docstring).

    ``published`` and ``uptime`` are seconds (unix time; since start); ``bandwidth`` is
    (average, burst, observed) bytes/second; ``family`` upper-case hex fingerprints;
    ``dir_cache``: we answer BEGIN_DIR (``tunnelled-dir-server``, the V2Dir flag).
    """
    identity = bytes(keys.identity_public)
    rsa_id = keys.rsa_identity
    fp = keys.fingerprint
    ntor_secret = keys.onion_key.private_bytes_raw()
    # the crosscert lives as long as the signing certificate (tor: the onion key lifetime)
    cc, sign_bit = ntor_crosscert(ntor_secret, identity, keys.signing_cert.expires_hours)
    lines = [
        f"router {nickname} {address} {or_port} 0 0",
        "identity-ed25519",
        _pem("ED25519 CERT", keys.signing_cert.encode()),
        f"master-key-ed25519 {_b64(identity)}",
        f"platform {platform}",
        f"proto {protocols}",
        f"published {format_time(published)}",
        "fingerprint " + " ".join(fp[i:i + 4] for i in range(0, 40, 4)),
        f"uptime {max(0, int(uptime))}",
        "bandwidth {} {} {}".format(*(int(b) for b in bandwidth)),
    ]
    if extra_info is not None:
        lines.append(f"extra-info-digest {extra_info.sha1_hex} {extra_info.sha256_b64}")
    if tap_key is not None:
        lines += ["onion-key", _pem("RSA PUBLIC KEY", rsa_public_der(tap_key))]
    lines += ["signing-key", _pem("RSA PUBLIC KEY", rsa_public_der(rsa_id))]
    if tap_key is not None:
        # signed as is (52 bytes), not hashed: RSA identity digest | Ed25519 master key
        lines += ["onion-key-crosscert", _pem("CROSSCERT", _rsa_sign(tap_key, keys.rsa_id_digest + identity))]
    lines += [f"ntor-onion-key-crosscert {sign_bit}", _pem("ED25519 CERT", cc.encode())]
    if family:
        lines.append("family " + " ".join(f"${f}" for f in sorted(family)))
    if contact:
        lines.append(f"contact {contact}")
    lines.append(f"ntor-onion-key {_b64(keys.onion_key_public)}")
    lines += descriptor_policy_lines(exit_policy)
    v6 = exit_policy.summary(6)
    if v6 != "reject 1-65535":
        lines.append(f"ipv6-policy {v6}")
    if dir_cache:
        lines.append("tunnelled-dir-server")
    text = _sign_both("\n".join(lines) + "\n", keys.signing, rsa_id)
    if len(text) > MAX_DESCRIPTOR:
        raise LocalProtocolError(f"server descriptor of {len(text)} bytes is over tor's {MAX_DESCRIPTOR}")
    return text


# -- reading back -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorDescriptor:
    """What a checked server descriptor says (the fields the tests and the relay look at)."""

    nickname: str
    address: str
    or_port: int
    fingerprint: str
    identity: bytes  # Ed25519 master key
    ntor_key: bytes
    published: int
    protocols: str
    platform: str
    bandwidth: tuple[int, int, int]
    policy: tuple[str, ...]
    ipv6_policy: str | None
    family: tuple[str, ...]
    contact: str | None
    extra_info_digest: tuple[str, str] | None
    has_tap_key: bool
    dir_cache: bool
    sha1: bytes  # digest of the signed part (what tor calls the descriptor digest)


def _split(text: str, what: str) -> list[tuple[str, list[str], tuple[str, bytes] | None]]:
    """(keyword, args, object) items of a dir-spec document; ProtocolError if malformed."""
    out = []
    lines = text.split("\n")
    if lines[-1] != "":
        raise ProtocolError(f"{what}: no final newline")
    i = 0
    while i < len(lines) - 1:
        kw, *args = lines[i].split(" ")
        i += 1
        obj = None
        if i < len(lines) and lines[i].startswith("-----BEGIN "):
            label = lines[i][11:-5]
            end = f"-----END {label}-----"
            try:
                j = lines.index(end, i + 1)
            except ValueError:
                raise ProtocolError(f"{what}: unterminated {label} object") from None
            try:
                obj = (label, base64.b64decode("".join(lines[i + 1:j]), validate=True))
            except ValueError:
                raise ProtocolError(f"{what}: {label} object is not base64") from None
            i = j + 1
        out.append((kw, args, obj))
    return out


def _unb64(s: str, n: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except ValueError:
        raise ProtocolError(f"{what} is not base64") from None
    if len(raw) != n:
        raise ProtocolError(f"{what} is not {n} bytes")
    return raw


def _rsa_public(obj: tuple[str, bytes] | None, what: str) -> rsa.RSAPublicKey:
    if obj is None or obj[0] != "RSA PUBLIC KEY":
        raise ProtocolError(f"{what}: needs an RSA PUBLIC KEY object")
    try:
        key = serialization.load_der_public_key(_spki(obj[1]))
    except (ValueError, UnsupportedAlgorithm):
        raise ProtocolError(f"{what}: not an RSA key") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 1024 or key.public_numbers().e != 65537:
        raise ProtocolError(f"{what}: must be a 1024-bit RSA key with exponent 65537")
    return key


def _spki(pkcs1: bytes) -> bytes:
    """Wrap a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (what load_der_public_key reads)."""
    pem = b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(pkcs1) + b"-----END RSA PUBLIC KEY-----\n"
    key = serialization.load_pem_public_key(pem)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_signatures(raw: bytes, signing_key: bytes, rsa_key: rsa.RSAPublicKey, what: str) -> bytes:
    """Check router-sig-ed25519 and router-signature; returns the SHA-1 of the signed part."""
    at_ed = raw.rfind(b"\n" + _SIG_ED)
    at_rsa = raw.rfind(b"\n" + _SIG_RSA)
    if at_ed < 0 or at_rsa < at_ed:
        raise ProtocolError(f"{what}: router-sig-ed25519 must come right before router-signature")
    head = raw[:at_ed + 1 + len(_SIG_ED)]
    ed_sig = _unb64(raw[at_ed + 1 + len(_SIG_ED):at_rsa].decode(), 64, f"{what} router-sig-ed25519")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(signing_key).verify(
            ed_sig, hashlib.sha256(ED_SIGNATURE_PREFIX + head).digest())
    except (InvalidSignature, ValueError):
        raise CertificateError(f"{what}: router-sig-ed25519 does not verify") from None
    signed = raw[:at_rsa + 1 + len(_SIG_RSA)]
    rest = raw[len(signed):].decode().split("\n")
    if (len(rest) < 4 or rest[0] != "-----BEGIN SIGNATURE-----" or rest[-2] != "-----END SIGNATURE-----"
            or rest[-1] != ""):
        raise ProtocolError(f"{what}: router-signature needs one SIGNATURE object and must end the document")
    try:
        rsa_sig = base64.b64decode("".join(rest[1:-2]), validate=True)
    except ValueError:
        raise ProtocolError(f"{what}: router-signature is not base64") from None
    digest = hashlib.sha1(signed).digest()
    if not _rsa_verify(rsa_key, rsa_sig, digest):
        raise CertificateError(f"{what}: router-signature does not verify")
    return digest


def _identity_cert(items, now: float, what: str) -> Ed25519Cert:
    if len(items) < 2 or items[1][0] != "identity-ed25519" or items[1][2] is None:
        raise ProtocolError(f"{what}: identity-ed25519 must be the second item")
    cert = Ed25519Cert.parse(items[1][2][1])
    if cert.cert_type != CertType.IDENTITY_V_SIGNING or cert.signed_with is None:
        raise CertificateError(f"{what}: identity-ed25519 is not a type 4 certificate naming its signer")
    cert.verify(now=now)
    return cert


def parse_server_descriptor(text: str, *, now: float) -> TorDescriptor:
    """Parse and check a server descriptor (every signature and cross-certificate, the
    fingerprint against the RSA identity, certificates' expiry at ``now``)."""
    what = "server descriptor"
    if len(text) > MAX_DESCRIPTOR:
        raise ProtocolError(f"{what}: over {MAX_DESCRIPTOR} bytes")
    items = _split(text, what)
    one: dict[str, tuple[list[str], tuple[str, bytes] | None]] = {}
    policy, counts = [], {}
    for kw, args, obj in items:
        counts[kw] = counts.get(kw, 0) + 1
        if kw in ("accept", "reject"):
            policy.append(f"{kw} {' '.join(args)}")
        else:
            one.setdefault(kw, (args, obj))
    for kw in ("router", "identity-ed25519", "master-key-ed25519", "bandwidth", "published", "signing-key",
               "ntor-onion-key", "ntor-onion-key-crosscert", "router-sig-ed25519", "router-signature",
               "proto"):
        if counts.get(kw) != 1:
            raise ProtocolError(f"{what}: need exactly one {kw!r}, found {counts.get(kw, 0)}")
    if items[0][0] != "router" or len(items[0][1]) < 5:
        raise ProtocolError(f"{what}: must start with a router line")
    nick, address, orport = items[0][1][:3]
    cert = _identity_cert(items, now, what)
    master = cert.signed_with
    if _unb64(one["master-key-ed25519"][0][0], 32, "master-key-ed25519") != master:
        raise CertificateError(f"{what}: master-key-ed25519 is not identity-ed25519's signer")
    rsa_key = _rsa_public(one["signing-key"][1], "signing-key")
    rsa_id = hashlib.sha1(rsa_public_der(rsa_key)).digest()
    fp = rsa_id.hex().upper()
    if "fingerprint" in one and "".join(one["fingerprint"][0]) != fp:
        raise ProtocolError(f"{what}: fingerprint is not the signing-key's digest")
    ntor_key = _unb64(one["ntor-onion-key"][0][0], 32, "ntor-onion-key")
    cc_args, cc_obj = one["ntor-onion-key-crosscert"]
    if cc_obj is None or cc_args not in (["0"], ["1"]):
        raise ProtocolError(f"{what}: ntor-onion-key-crosscert needs a sign bit and a certificate")
    cc = Ed25519Cert.parse(cc_obj[1])
    if cc.cert_type != CertType.NTOR_CC_IDENTITY or cc.certified_key != master:
        raise CertificateError(f"{what}: ntor-onion-key-crosscert does not certify the master key")
    cc.verify(ed25519_public_from_curve25519(ntor_key, int(cc_args[0])), now=now)
    has_tap = "onion-key" in one
    if has_tap != ("onion-key-crosscert" in one):
        raise ProtocolError(f"{what}: onion-key and onion-key-crosscert go together")
    if has_tap:
        tap = _rsa_public(one["onion-key"][1], "onion-key")
        cross = one["onion-key-crosscert"][1]
        if cross is None or cross[0] != "CROSSCERT" or not _rsa_verify(
                tap, cross[1], rsa_id + master):
            raise CertificateError(f"{what}: onion-key-crosscert does not verify")
    raw = text.encode()
    sha1 = _check_signatures(raw, cert.certified_key, rsa_key, what)
    bw = one["bandwidth"][0]
    eid = one.get("extra-info-digest")
    fam = one.get("family")
    contact = one.get("contact")
    v6 = one.get("ipv6-policy")
    try:
        return TorDescriptor(
            nickname=nick, address=address, or_port=int(orport), fingerprint=fp, identity=master,
            ntor_key=ntor_key, published=parse_time(" ".join(one["published"][0][:2])),
            protocols=" ".join(one["proto"][0]), platform=" ".join(one.get("platform", ([], None))[0]),
            bandwidth=(int(bw[0]), int(bw[1]), int(bw[2])), policy=tuple(policy),
            ipv6_policy=" ".join(v6[0]) if v6 else None,
            family=tuple(a.lstrip("$") for a in fam[0]) if fam else (),
            contact=" ".join(contact[0]) if contact else None,
            extra_info_digest=(eid[0][0], eid[0][1]) if eid and len(eid[0]) >= 2 else None,
            has_tap_key=has_tap, dir_cache="tunnelled-dir-server" in one, sha1=sha1,
        )
    except (ValueError, IndexError):
        raise ProtocolError(f"{what}: malformed router, bandwidth or published line") from None


def parse_extra_info(text: str, *, now: float) -> tuple[str, str, ExtraInfo]:
    """Parse and check an extra-info document: (nickname, fingerprint, digests)."""
    what = "extra-info"
    items = _split(text, what)
    if not items or items[0][0] != "extra-info" or len(items[0][1]) < 2:
        raise ProtocolError(f"{what}: must start with an extra-info line")
    cert = _identity_cert(items, now, what)
    # the RSA key is not in the document: the caller matches the fingerprint with the
    # descriptor's; here the Ed25519 signature is checked and the digests computed
    raw = text.encode()
    at_ed = raw.rfind(b"\n" + _SIG_ED)
    at_rsa = raw.rfind(b"\n" + _SIG_RSA)
    if at_ed < 0 or at_rsa < at_ed:
        raise ProtocolError(f"{what}: missing signatures")
    head = raw[:at_ed + 1 + len(_SIG_ED)]
    ed_sig = _unb64(raw[at_ed + 1 + len(_SIG_ED):at_rsa].decode(), 64, f"{what} router-sig-ed25519")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(cert.certified_key).verify(
            ed_sig, hashlib.sha256(ED_SIGNATURE_PREFIX + head).digest())
    except (InvalidSignature, ValueError):
        raise CertificateError(f"{what}: router-sig-ed25519 does not verify") from None
    signed = raw[:at_rsa + 1 + len(_SIG_RSA)]
    return items[0][1][0], items[0][1][1], ExtraInfo(
        text, hashlib.sha1(signed).hexdigest().upper(), _b64(hashlib.sha256(raw).digest()))
