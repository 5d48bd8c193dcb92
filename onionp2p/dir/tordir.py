"""Reading a real Tor network's directory (dir-spec v3, microdescriptor flavour).

Theory of operation
-------------------
``directory.py`` holds onionp2p's own Ed25519-signed documents; this module reads what C
tor directory authorities publish, so an onionp2p client can use tor relays:

1. **Trust roots** are torrc ``DirAuthority`` lines (:func:`parse_dirauth_line`,
   :func:`read_dirauth_file`). Only ``v3ident=`` (SHA-1 of the authority's long-term RSA
   *authority identity key*) is trusted; ``IP:DirPort`` just says where to ask.
2. **Key certificates** (``/tor/keys/all``) bind each authority identity key to a
   medium-term RSA signing key. :meth:`KeyCertificate.verify` checks that ``fingerprint``
   is SHA-1 of the identity key's PKCS#1 DER, that the identity key signs SHA-1 of the text
   from the first byte through the newline after ``dir-key-certification``, that the
   signing key signs SHA-1(identity key DER) (``dir-key-crosscert``), and the times.
3. **The consensus** (``/tor/status-vote/current/consensus-microdesc``) is signed by the
   authorities' signing keys. Every signature covers the same bytes: from
   ``network-status-version`` through the *space* after the first ``directory-signature``;
   ``sha256`` signatures hash them with SHA-256, ``sha1`` (or none named) with SHA-1, others
   are ignored. :func:`verify_consensus` needs valid signatures (with a verified certificate
   whose signing-key digest matches the signature line) from more than half of the
   configured authorities, and ``valid-after - skew <= now <= valid-until + skew``.
4. **Microdescriptors** (``/tor/micro/d/<d1>-<d2>...``, :func:`parse_microdescriptors`)
   are unsigned; each is bound to the consensus by the base64 SHA-256 of its exact text
   on the router's ``m`` line. Ones that match no ``m`` line are dropped.
5. The footer's ``bandwidth-weights`` line (``Wgg=5914 ...``, dir-spec §3.8.3) becomes
   ``MicrodescConsensus.bw_weights``; as in tor, an argument without ``=`` or with a value
   that is not a 32-bit integer rejects the document, and unknown keys are kept.
6. :func:`router_statuses` joins them into :class:`~onionp2p.proto.directory.RouterStatus`:
   ``s`` flags, ``w Bandwidth=``, ``r`` identity/address/ORPort, and the microdescriptor's
   ntor key, ``id ed25519``, ``$HEX`` family members and ``p`` summary (default
   ``reject 1-65535``). Relays without an ntor key or Ed25519 identity are skipped.

tor's RSA signatures are PKCS#1 v1.5 *type-1 padding of the bare digest* (no DigestInfo):
``cryptography``'s ``recover_data_from_signature(sig, PKCS1v15(), None)`` must give back
exactly the digest (C tor accepts a longer block with the digest as prefix; we do not).

Parsing follows dir-spec's meta-format (keyword lines, optional PEM-style objects) and
ignores unknown keywords. Every failure caused by document bytes raises ProtocolError
(``CertificateError`` for certificates, ``ConsensusError`` for a consensus).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import itertools
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from onionp2p.dir.server import fetch
from onionp2p.errors import CertificateError, ConfigError, OnionError, ProtocolError
from onionp2p.log import get_logger
from onionp2p.proto import protover
from onionp2p.proto.bwweights import parse_bw_weights
from onionp2p.proto.directory import ConsensusError, RelayInfo, RouterStatus, parse_time
from onionp2p.proto.exitpolicy import ExitPolicy

__all__ = [
    "CLOCK_SKEW",
    "TorNetwork",
    "TorNetworkView",
    "fetch_tor_network",
    "next_consensus_fetch",
    "ConsensusEntry",
    "KeyCertificate",
    "MicrodescConsensus",
    "Microdescriptor",
    "Signature",
    "TorDirAuthority",
    "TorDirectoryError",
    "fetch_tor_directory",
    "parse_consensus",
    "parse_dirauth_line",
    "parse_key_certificates",
    "parse_microdescriptors",
    "read_dirauth_file",
    "router_statuses",
    "verify_consensus",
]

CLOCK_SKEW = 60.0
MAX_CONSENSUS = 8 << 20
MAX_CERTS = 1 << 20
MAX_MICRODESCS = 4 << 20
MICRODESCS_PER_REQUEST = 90  # tor asks for at most 92 per request
CONSENSUS_PATH = "/tor/status-vote/current/consensus-microdesc"
KEYS_PATH = "/tor/keys/all"
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
_OBJ_BEGIN = re.compile(rb"-----BEGIN ([A-Za-z0-9 ]{1,40})-----")
_HEX40 = re.compile(r"[0-9A-Fa-f]{40}")
_PORT = re.compile(r"[0-9]{1,5}")
_NICK = re.compile(r"[A-Za-z0-9]{1,19}")
_FLAG_WORDS = ("hs", "bridge", "v1", "authority")


class TorDirectoryError(OnionError):
    """No authority gave us a directory that parsed and verified (``causes`` says why)."""

    def __init__(self, message: str, causes: Sequence[str] = ()):
        super().__init__(message + "".join(f"\n  {c}" for c in causes))
        self.causes = tuple(causes)


# -- meta-format ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    keyword: str
    args: list[str]
    obj: tuple[str, bytes] | None  # (label, decoded bytes)
    start: int  # byte offset of the keyword line
    end: int  # byte offset just past the item (after its object)


def _items(raw: bytes, what: str, limit: int) -> list[_Item]:
    """Split a dir-spec document into items; ProtocolError if it is not well formed."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > limit:
        raise ProtocolError(f"{what}: not a document of at most {limit} bytes")
    if not raw.endswith(b"\n"):
        raise ProtocolError(f"{what}: truncated (no final newline)")
    lines = raw.split(b"\n")[:-1]
    items: list[_Item] = []
    pos = i = 0
    while i < len(lines):
        line, start = lines[i], pos
        pos += len(line) + 1
        i += 1
        if b"\r" in line or b"\0" in line:
            raise ProtocolError(f"{what}: control character in line {i}")
        if not line:
            continue  # dir-spec allows empty lines between items
        keyword, _, rest = line.replace(b"\t", b" ").partition(b" ")
        if not _KEYWORD.fullmatch(keyword):
            raise ProtocolError(f"{what}: malformed keyword line {i}: {line[:40]!r}")
        try:
            args = rest.decode("utf-8").split()
        except UnicodeDecodeError:
            raise ProtocolError(f"{what}: line {i} is not UTF-8") from None
        obj = None
        if i < len(lines) and lines[i].startswith(b"-----BEGIN "):
            m = _OBJ_BEGIN.fullmatch(lines[i])
            if not m:
                raise ProtocolError(f"{what}: malformed object start at line {i + 1}")
            try:
                j = lines.index(b"-----END " + m.group(1) + b"-----", i + 1)
            except ValueError:
                raise ProtocolError(f"{what}: object {m.group(1)!r} is not terminated") from None
            body = lines[i + 1:j]
            pos += sum(len(ln) + 1 for ln in lines[i:j + 1])
            i = j + 1
            try:
                data = base64.b64decode(b"".join(body), validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError(f"{what}: object {m.group(1)!r} is not base64") from None
            obj = (m.group(1).decode(), data)
        items.append(_Item(keyword.decode(), args, obj, start, pos))
    return items


def _unb64(s: str, n: int, what: str) -> bytes:
    """Unpadded (or padded) base64 of exactly ``n`` bytes."""
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what} is not base64") from None
    if len(raw) != n:
        raise ProtocolError(f"{what} must be {n} bytes, got {len(raw)}")
    return raw


def _hex20(s: str, what: str) -> bytes:
    if not _HEX40.fullmatch(s):
        raise ProtocolError(f"{what} must be 40 hex digits")
    return bytes.fromhex(s)


def _time(args: list[str], what: str) -> int:
    if len(args) < 2:
        raise ProtocolError(f"{what}: missing time")
    return parse_time(f"{args[0]} {args[1]}")


def _one(items: list[_Item], keyword: str, what: str, *, required: bool = True) -> _Item | None:
    found = [it for it in items if it.keyword == keyword]
    if len(found) > 1 or (required and not found):
        raise ProtocolError(f"{what}: need exactly one {keyword!r} item, found {len(found)}")
    return found[0] if found else None


def _rsa_key(item: _Item, what: str) -> rsa.RSAPublicKey:
    if item.obj is None or item.obj[0] != "RSA PUBLIC KEY":
        raise ProtocolError(f"{what}: {item.keyword} needs an RSA PUBLIC KEY object")
    try:
        pem = b"-----BEGIN RSA PUBLIC KEY-----\n%s-----END RSA PUBLIC KEY-----\n"
        key = serialization.load_pem_public_key(pem % base64.encodebytes(item.obj[1]))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ProtocolError(f"{what}: {item.keyword} is not an RSA public key") from None
    if not isinstance(key, rsa.RSAPublicKey) or not 1024 <= key.key_size <= 8192:
        raise ProtocolError(f"{what}: {item.keyword} must be an RSA key of 1024..8192 bits")
    if _pkcs1_der(key) != item.obj[1]:
        raise ProtocolError(f"{what}: {item.keyword} is not canonical PKCS#1 DER")
    return key


def _pkcs1_der(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


def _rsa_verify_digest(key: rsa.RSAPublicKey, signature: bytes, digest: bytes) -> bool:
    """tor's RSA check: the signature decrypts to PKCS#1 type-1 padding of exactly ``digest``."""
    try:
        recovered = key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
    except (InvalidSignature, ValueError):
        return False
    return hmac.compare_digest(recovered, digest)


# -- DirAuthority lines ----------------------------------------------------------------------
@dataclass(frozen=True)
class TorDirAuthority:
    """One torrc ``DirAuthority`` line."""

    nickname: str
    address: str
    dir_port: int
    or_port: int
    v3ident: bytes  # SHA-1 of the authority identity key (what signatures name)
    fingerprint: bytes  # the authority's relay RSA identity


def parse_dirauth_line(line: str) -> TorDirAuthority:
    """Parse ``[DirAuthority] [nick] [flags] IPv4:DirPort FINGERPRINT``; ConfigError if bad.

    Flags are ``orport=N``, ``v3ident=HEX`` (required here), and ones we ignore
    (``weight=``, ``ipv6=``, ``no-v2``, ``hs``, ...). The fingerprint may be written in
    groups of four hex digits, as tor prints it.
    """
    words = line.split()
    if words and words[0].lower() == "dirauthority":
        words = words[1:]
    addr_at = next((i for i, w in enumerate(words) if re.fullmatch(r"[0-9.]+:[0-9]+", w)), None)
    if addr_at is None:
        raise ConfigError(f"DirAuthority line without IPv4:DirPort: {line.strip()[:120]!r}")
    first = words[0] if addr_at > 0 else ""
    nickname = first if _NICK.fullmatch(first) and first not in _FLAG_WORDS else ""
    or_port, v3ident = 0, None
    for flag in words[1 if nickname else 0:addr_at]:
        key, _, value = flag.partition("=")
        if key == "orport" and _PORT.fullmatch(value) and 0 < int(value) < 65536:
            or_port = int(value)
        elif key == "v3ident" and _HEX40.fullmatch(value):
            v3ident = bytes.fromhex(value)
        elif key in ("orport", "v3ident"):
            raise ConfigError(f"DirAuthority line: bad {flag!r}")
    host, _, port = words[addr_at].rpartition(":")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"DirAuthority line: bad address {words[addr_at]!r}") from None
    fp = "".join(words[addr_at + 1:])
    if not 0 < int(port) < 65536 or not _HEX40.fullmatch(fp):
        raise ConfigError(f"DirAuthority line: bad port or fingerprint in {line.strip()[:120]!r}")
    if v3ident is None:
        raise ConfigError(f"DirAuthority line without v3ident= (not a v3 authority): {line.strip()[:120]!r}")
    return TorDirAuthority(nickname, host, int(port), or_port, v3ident, bytes.fromhex(fp))


def read_dirauth_file(path: Path | str) -> list[str]:
    """The DirAuthority lines of a file (blank and ``#`` lines skipped); ConfigError if none/bad."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read DirAuthority file {path}: {exc}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    for ln in lines:
        parse_dirauth_line(ln)
    if not lines:
        raise ConfigError(f"{path}: no DirAuthority lines")
    return lines


# -- key certificates -------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyCertificate:
    """A ``dir-key-certificate-version 3`` document (authority identity -> signing key)."""

    fingerprint: bytes  # v3ident: SHA-1 of the identity key DER
    published: int
    expires: int
    identity_key: rsa.RSAPublicKey
    signing_key: rsa.RSAPublicKey
    crosscert: bytes
    certification: bytes
    signed_digest: bytes  # SHA-1 of the certified text

    @property
    def signing_key_digest(self) -> bytes:
        return hashlib.sha1(_pkcs1_der(self.signing_key)).digest()

    def verify(self, now: float, skew: float = CLOCK_SKEW) -> None:
        """Raise CertificateError unless self-consistent, correctly signed and current."""
        if hashlib.sha1(_pkcs1_der(self.identity_key)).digest() != self.fingerprint:
            raise CertificateError("key certificate: fingerprint is not the identity key's digest")
        if not _rsa_verify_digest(self.identity_key, self.certification, self.signed_digest):
            raise CertificateError("key certificate: bad dir-key-certification signature")
        if not _rsa_verify_digest(self.signing_key, self.crosscert, self.fingerprint):
            raise CertificateError("key certificate: bad dir-key-crosscert signature")
        if self.published > now + skew:
            raise CertificateError("key certificate: published in the future")
        if self.expires < now - skew:
            raise CertificateError("key certificate: expired")


def _parse_key_certificate(raw: bytes, items: list[_Item]) -> KeyCertificate:
    what = "key certificate"
    if items[0].keyword != "dir-key-certificate-version" or items[0].args[:1] != ["3"]:
        raise ProtocolError(f"{what}: must start with 'dir-key-certificate-version 3'")
    last = items[-1]
    if last.keyword != "dir-key-certification" or last.obj is None or last.obj[0] != "SIGNATURE":
        raise ProtocolError(f"{what}: must end with a dir-key-certification SIGNATURE")
    fp = _one(items, "fingerprint", what)
    cross = _one(items, "dir-key-crosscert", what)
    if not fp.args or cross.obj is None or cross.obj[0] not in ("ID SIGNATURE", "SIGNATURE"):
        raise ProtocolError(f"{what}: bad fingerprint or dir-key-crosscert")
    # signed part: from the first byte through the newline after "dir-key-certification"
    signed_end = last.start + len("dir-key-certification") + 1
    if raw[last.start:signed_end] != b"dir-key-certification\n":
        raise ProtocolError(f"{what}: dir-key-certification takes no arguments")
    return KeyCertificate(
        fingerprint=_hex20(fp.args[0], f"{what} fingerprint"),
        published=_time(_one(items, "dir-key-published", what).args, what),
        expires=_time(_one(items, "dir-key-expires", what).args, what),
        identity_key=_rsa_key(_one(items, "dir-identity-key", what), what),
        signing_key=_rsa_key(_one(items, "dir-signing-key", what), what),
        crosscert=cross.obj[1],
        certification=last.obj[1],
        signed_digest=hashlib.sha1(raw[items[0].start:signed_end]).digest(),
    )


def parse_key_certificates(raw: bytes) -> list[KeyCertificate]:
    """Parse the concatenated certificates of ``/tor/keys/all`` (not yet verified)."""
    items = _items(raw, "key certificates", MAX_CERTS)
    certs: list[KeyCertificate] = []
    group: list[_Item] = []
    for it in items:
        if it.keyword == "dir-key-certificate-version" and group:
            raise ProtocolError("key certificate: not terminated by dir-key-certification")
        group.append(it)
        if it.keyword == "dir-key-certification":
            certs.append(_parse_key_certificate(raw, group))
            group = []
    if group:
        raise ProtocolError("key certificate: truncated")
    return certs


# -- consensus ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signature:
    algorithm: str  # "sha1", "sha256" or an unknown name (ignored)
    identity: bytes  # v3ident of the signing authority
    signing_key_digest: bytes
    signature: bytes


@dataclass(frozen=True)
class ConsensusEntry:
    nickname: str
    rsa_id: bytes
    address: str
    or_port: int
    microdesc_digest: bytes
    flags: frozenset[str]
    bandwidth: int
    protocols: str = ""  # the "pr" line: subprotocol versions the relay implements


@dataclass(frozen=True)
class MicrodescConsensus:
    consensus_method: int
    valid_after: int
    fresh_until: int
    valid_until: int
    known_flags: tuple[str, ...]
    params: dict[str, int]
    entries: tuple[ConsensusEntry, ...]
    signatures: tuple[Signature, ...]
    digests: dict[str, bytes]  # "sha1"/"sha256" -> digest of the signed part
    #: the footer's ``bandwidth-weights`` (dir-spec §3.8.3): {} when the line is absent
    bw_weights: dict[str, int] = field(default_factory=dict)
    #: ``shared-rand-current-value`` / ``shared-rand-previous-value`` (dir-spec §3.4.1,
    #: srv-spec): the 32-byte SRVs that place HSDirs on the ring; None when absent
    srv_current: bytes | None = None
    srv_previous: bytes | None = None


def _srv(head: list[_Item], keyword: str, what: str) -> bytes | None:
    """A ``shared-rand-*-value NumReveals Value`` line's value. Malformed is taken as absent,
    as tor does (extract_shared_random_srvs warns and goes on without it): the onion-service
    code then uses the disaster SRV."""
    item = _one(head, keyword, what, required=False)
    if item is None or len(item.args) != 2 or not re.fullmatch(r"[0-9]{1,10}", item.args[0]):
        return None
    try:
        return _unb64(item.args[1], 32, keyword)
    except ProtocolError:
        return None


def _router(items: list[_Item]) -> ConsensusEntry:
    r = items[0]
    what = f"consensus router {r.args[0] if r.args else '?'}"
    if len(r.args) < 7:
        raise ProtocolError(f"{what}: 'r' needs nickname, identity, published, IP, ORPort, DirPort")
    nick, ident, _d, _t, ip, orport = r.args[:6]
    if not _NICK.fullmatch(nick):
        raise ProtocolError(f"{what}: bad nickname")
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        raise ProtocolError(f"{what}: bad IPv4 address") from None
    if not _PORT.fullmatch(orport) or not 0 < int(orport) < 65536:
        raise ProtocolError(f"{what}: bad ORPort")
    m = _one(items, "m", what)
    s = _one(items, "s", what)
    w = _one(items, "w", what, required=False)
    pr = _one(items, "pr", what, required=False)
    protocols = " ".join(pr.args) if pr else ""
    protover.parse(protocols)  # ProtocolError if malformed
    if not m.args:
        raise ProtocolError(f"{what}: empty 'm' line")
    bandwidth = dict(kv.partition("=")[::2] for kv in w.args).get("Bandwidth", "0") if w else "0"
    if not re.fullmatch(r"[0-9]{1,12}", bandwidth):
        raise ProtocolError(f"{what}: bad Bandwidth")
    return ConsensusEntry(nick, _unb64(ident, 20, f"{what} identity"), ip, int(orport),
                          _unb64(m.args[0], 32, f"{what} microdesc digest"), frozenset(s.args),
                          int(bandwidth), protocols)


def parse_consensus(raw: bytes) -> MicrodescConsensus:
    """Parse a microdesc-flavoured consensus (structure only; see :func:`verify_consensus`)."""
    what = "consensus"
    items = _items(raw, what, MAX_CONSENSUS)
    if not items or items[0].keyword != "network-status-version" or items[0].args != ["3", "microdesc"]:
        raise ProtocolError(f"{what}: must start with 'network-status-version 3 microdesc'")
    first_r = next((i for i, it in enumerate(items) if it.keyword == "r"), len(items))
    footer = next((i for i, it in enumerate(items) if it.keyword == "directory-footer"), None)
    first_sig = next((i for i, it in enumerate(items) if it.keyword == "directory-signature"), None)
    if footer is None or first_sig is None or not first_r <= footer < first_sig:
        raise ProtocolError(f"{what}: missing or misplaced directory-footer / directory-signature")
    head = items[:first_r]
    if _one(head, "vote-status", what).args != ["consensus"]:
        raise ProtocolError(f"{what}: vote-status must be 'consensus'")
    method = _one(head, "consensus-method", what).args
    if len(method) != 1 or not re.fullmatch(r"[0-9]{1,6}", method[0]):
        raise ProtocolError(f"{what}: bad consensus-method")
    va, fu, vu = (_time(_one(head, k, what).args, f"{what} {k}")
                  for k in ("valid-after", "fresh-until", "valid-until"))
    if not va < fu <= vu:
        raise ProtocolError(f"{what}: need valid-after < fresh-until <= valid-until")
    params: dict[str, int] = {}
    p = _one(head, "params", what, required=False)
    for kv in p.args if p else ():
        key, sep, value = kv.partition("=")
        if not sep or not re.fullmatch(r"-?[0-9]{1,10}", value):
            raise ProtocolError(f"{what}: bad params entry {kv[:40]!r}")
        params[key] = int(value)
    known = _one(head, "known-flags", what, required=False)
    weights = _one(items[footer:first_sig], "bandwidth-weights", what, required=False)
    bw_weights = parse_bw_weights(weights.args) if weights else {}
    starts = [i for i in range(first_r, footer) if items[i].keyword == "r"] + [footer]
    entries = [_router(items[a:b]) for a, b in itertools.pairwise(starts)]
    sigs = []
    for it in items[first_sig:]:
        if it.keyword != "directory-signature":
            continue
        a = it.args if len(it.args) == 3 else ["sha1", *it.args]
        if len(a) != 3 or it.obj is None or it.obj[0] != "SIGNATURE":
            raise ProtocolError(f"{what}: malformed directory-signature")
        sigs.append(Signature(a[0], _hex20(a[1], "signature identity"), _hex20(a[2], "signing key digest"),
                              it.obj[1]))
    signed = raw[items[0].start:items[first_sig].start + len("directory-signature ")]
    return MicrodescConsensus(
        consensus_method=int(method[0]), valid_after=va, fresh_until=fu, valid_until=vu,
        known_flags=tuple(known.args) if known else (), params=params, entries=tuple(entries),
        signatures=tuple(sigs), bw_weights=bw_weights,
        srv_current=_srv(head, "shared-rand-current-value", what),
        srv_previous=_srv(head, "shared-rand-previous-value", what),
        digests={"sha1": hashlib.sha1(signed).digest(), "sha256": hashlib.sha256(signed).digest()},
    )


def verify_consensus(consensus: MicrodescConsensus, authorities: Sequence[TorDirAuthority],
                     certificates: Iterable[KeyCertificate], *, now: float,
                     skew: float = CLOCK_SKEW) -> set[bytes]:
    """Return the v3idents of the authorities whose signatures verify; ConsensusError unless
    they are more than half of ``authorities`` and ``now`` is inside the validity interval."""
    trusted = {a.v3ident for a in authorities}
    if not trusted:
        raise ConsensusError("no directory authorities configured")
    if now < consensus.valid_after - skew:
        raise ConsensusError("consensus is not valid yet (valid-after in the future)")
    if now > consensus.valid_until + skew:
        raise ConsensusError("consensus has expired (valid-until passed)")
    keys: dict[tuple[bytes, bytes], rsa.RSAPublicKey] = {}
    for cert in certificates:
        if cert.fingerprint not in trusted:
            continue
        try:
            cert.verify(now, skew)
        except CertificateError:
            continue
        keys[(cert.fingerprint, cert.signing_key_digest)] = cert.signing_key
    good: set[bytes] = set()
    for sig in consensus.signatures:
        digest = consensus.digests.get(sig.algorithm)
        key = keys.get((sig.identity, sig.signing_key_digest))
        if digest is None or key is None or sig.identity in good:
            continue
        if _rsa_verify_digest(key, sig.signature, digest):
            good.add(sig.identity)
    if len(good) * 2 <= len(trusted):
        raise ConsensusError(f"consensus signed by {len(good)} of {len(trusted)} authorities; need > half")
    return good


# -- microdescriptors -------------------------------------------------------------------------
@dataclass(frozen=True)
class Microdescriptor:
    digest: bytes  # SHA-256 of the exact text
    ntor_key: bytes | None
    ed_id: bytes | None
    exit_summary: str  # the "p" line body ("reject 1-65535" when absent)
    family: tuple[str, ...]  # upper-case hex fingerprints of "$HEX" family members


def _microdesc(raw: bytes, items: list[_Item]) -> Microdescriptor:
    what = "microdescriptor"
    ntor = _one(items, "ntor-onion-key", what, required=False)
    p = _one(items, "p", what, required=False)
    summary = " ".join(p.args) if p else "reject 1-65535"
    ExitPolicy.parse_summary(summary)  # ProtocolError if malformed
    ed_id = None
    for it in items:
        if it.keyword == "id" and len(it.args) >= 2 and it.args[0] == "ed25519":
            if ed_id is not None:
                raise ProtocolError(f"{what}: two 'id ed25519' lines")
            ed_id = _unb64(it.args[1], 32, f"{what} ed25519 id")
    fam = _one(items, "family", what, required=False)
    family = tuple(sorted({m[1:41].upper() for m in (fam.args if fam else ())
                           if m.startswith("$") and _HEX40.fullmatch(m[1:41])}))
    return Microdescriptor(
        digest=hashlib.sha256(raw[items[0].start:items[-1].end]).digest(),
        ntor_key=_unb64(ntor.args[0], 32, f"{what} ntor-onion-key") if ntor and ntor.args else None,
        ed_id=ed_id, exit_summary=summary, family=family,
    )


def parse_microdescriptors(raw: bytes) -> list[Microdescriptor]:
    """Split concatenated microdescriptors (``onion-key`` or, without TAP keys, ``ntor-onion-key``
    starts each one) and compute their digests."""
    items = _items(raw, "microdescriptors", MAX_MICRODESCS)
    groups: list[list[_Item]] = []
    for it in items:
        starts = it.keyword == "onion-key" or (
            it.keyword == "ntor-onion-key" and not (groups and groups[-1][-1].keyword == "onion-key"))
        if starts:
            groups.append([it])
        elif groups:
            groups[-1].append(it)
        else:
            raise ProtocolError("microdescriptors: document does not start with onion-key/ntor-onion-key")
    return [_microdesc(raw, g) for g in groups]


def router_statuses(consensus: MicrodescConsensus,
                    microdescs: Iterable[Microdescriptor]) -> list[RouterStatus]:
    """Join consensus entries with their microdescriptors (matched by digest)."""
    by_digest = {md.digest: md for md in microdescs}
    out = []
    for e in consensus.entries:
        md = by_digest.get(e.microdesc_digest)
        if md is None or md.ntor_key is None or md.ed_id is None:
            continue
        info = RelayInfo(nickname=e.nickname, address=e.address, or_port=e.or_port, rsa_id=e.rsa_id,
                         ed_id=md.ed_id, ntor_key=md.ntor_key, exit_policy=md.exit_summary,
                         protocols=e.protocols)
        out.append(RouterStatus(info, e.flags, e.bandwidth, md.family))
    return out


# -- fetching ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorNetworkView:
    """What a client takes from a tor network's directory: its relays, its consensus's
    network parameters (``params``: congestion control's ``cc_*`` ...) and its
    ``bandwidth-weights`` (for path selection; {} when the consensus has none)."""

    routers: list[RouterStatus]
    params: dict[str, int]
    bw_weights: dict[str, int] = field(default_factory=dict)
    #: the consensus's validity (unix times; 0 when unknown), for scheduling the next fetch
    valid_after: int = 0
    fresh_until: int = 0
    valid_until: int = 0
    #: the consensus's shared-random values (None: absent; onion services then use tor's
    #: disaster SRV, onionp2p.proto.hs.client.fetch_plan)
    srv_current: bytes | None = None
    srv_previous: bytes | None = None


async def _from_authority(auth: TorDirAuthority, authorities: Sequence[TorDirAuthority], now: float,
                          timeout: float) -> TorNetworkView:
    host, port = auth.address, auth.dir_port
    certs = parse_key_certificates(await fetch(host, port, KEYS_PATH, max_size=MAX_CERTS, timeout=timeout))
    consensus = parse_consensus(await fetch(host, port, CONSENSUS_PATH, max_size=MAX_CONSENSUS,
                                            timeout=timeout))
    verify_consensus(consensus, authorities, certs, now=now)
    wanted = sorted({e.microdesc_digest for e in consensus.entries})
    limit = asyncio.Semaphore(4)  # a few requests at a time, as tor does

    async def batch(digests: list[bytes]) -> list[Microdescriptor]:
        path = "/tor/micro/d/" + "-".join(base64.b64encode(d).decode().rstrip("=") for d in digests)
        async with limit:
            return parse_microdescriptors(await fetch(host, port, path, max_size=MAX_MICRODESCS,
                                                      timeout=timeout))
    batches = await asyncio.gather(*(batch(wanted[i:i + MICRODESCS_PER_REQUEST])
                                     for i in range(0, len(wanted), MICRODESCS_PER_REQUEST)),
                                   return_exceptions=True)
    for b in batches:
        if isinstance(b, BaseException):
            raise b
    return TorNetworkView(router_statuses(consensus, [md for b in batches for md in b]),
                          dict(consensus.params), dict(consensus.bw_weights),
                          consensus.valid_after, consensus.fresh_until, consensus.valid_until,
                          consensus.srv_current, consensus.srv_previous)


async def fetch_tor_network(dirauth_lines: list[str], *, now: float | None = None,
                            timeout: float = 30) -> TorNetworkView:
    """Fetch, verify and join a tor network's directory from its authorities' DirPorts:
    its relays and network parameters.

    Authorities are tried in random order until one yields a consensus that verifies
    against *all* configured authorities' certificates (more than half must have signed).
    Raises ConfigError for bad lines, TorDirectoryError if no authority succeeds.
    """
    authorities = [parse_dirauth_line(ln) for ln in dirauth_lines]
    if not authorities:
        raise ConfigError("no DirAuthority lines given")
    causes = []
    for auth in random.sample(authorities, len(authorities)):
        try:
            async with asyncio.timeout(timeout):
                return await _from_authority(auth, authorities, time.time() if now is None else now, timeout)
        except (OnionError, TimeoutError) as exc:
            causes.append(f"{auth.nickname or auth.address}:{auth.dir_port}: {type(exc).__name__}: {exc}")
    raise TorDirectoryError("no directory authority gave a verified consensus", causes)


async def fetch_tor_directory(dirauth_lines: list[str], *, now: float | None = None,
                              timeout: float = 30) -> list[RouterStatus]:
    """The relays of a tor network (:func:`fetch_tor_network` without the parameters)."""
    return (await fetch_tor_network(dirauth_lines, now=now, timeout=timeout)).routers


# -- keeping it fresh -------------------------------------------------------------------------
#: a directory cache waits at least this long after fresh-until (tor's
#: CONSENSUS_MIN_SECONDS_BEFORE_CACHING), or 1/16 of the interval on fast test networks
MIN_SECONDS_BEFORE_CACHING = 120


def next_consensus_fetch(valid_after: int, fresh_until: int, valid_until: int, *, cache: bool,
                         rand: float) -> float:
    """When to fetch the next consensus, as tor schedules it
    (``update_consensus_networkstatus_fetch_time``); ``rand`` in [0, 1).

    A directory cache (a relay) fetches in the first half-interval after fresh-until plus a
    little slop; a client waits until 3/4 of an interval after fresh-until, so that the
    caches have the new one, and fetches within 7/8 of the time left before valid-until.
    """
    interval = fresh_until - valid_after
    slop = min(MIN_SECONDS_BEFORE_CACHING, interval // 16)
    if cache:
        start = fresh_until + slop
        window = interval // 2
    else:
        start = fresh_until + (interval * 3) // 4
        window = ((valid_until - start) * 7) // 8
    window = max(window, 1)
    if start + window >= valid_until:
        start = valid_until - window - 1
    return start + rand * window


class TorNetwork:
    """A tor network's directory, kept fresh: :meth:`refresh` once, then :meth:`run` fetches
    each next consensus on tor's schedule (:func:`next_consensus_fetch`; ``cache`` for
    relays), retrying failures after 1, 2, 4 ... 60 s. ``view`` is the newest verified
    :class:`TorNetworkView` (None before the first)."""

    def __init__(self, dirauth_lines: Sequence[str], *, cache: bool, timeout: float = 30.0, name: str = "tor"):
        self.dirauth_lines = list(dirauth_lines)
        self.cache = cache
        self.timeout = timeout
        self.view: TorNetworkView | None = None
        self.fetched = 0  # consensuses adopted
        self._log = get_logger("onionp2p.tordir").bind(node=name)

    def routers(self) -> list[RouterStatus]:
        return self.view.routers if self.view is not None else []

    def params(self) -> dict[str, int]:
        return self.view.params if self.view is not None else {}

    def bw_weights(self) -> dict[str, int]:
        return self.view.bw_weights if self.view is not None else {}

    async def refresh(self) -> TorNetworkView:
        """Fetch and verify the current consensus; keep it if newer than ours."""
        view = await fetch_tor_network(self.dirauth_lines, timeout=self.timeout)
        if self.view is None or view.valid_after > self.view.valid_after:
            self.view = view
            self.fetched += 1
            self._log.info("new tor consensus", relays=len(view.routers), valid_after=view.valid_after)
        return self.view

    def next_fetch(self, now: float) -> float:
        v = self.view
        if v is None or not v.valid_after <= now <= v.valid_until:
            return now
        return next_consensus_fetch(v.valid_after, v.fresh_until, v.valid_until, cache=self.cache,
                                    rand=random.random())

    async def run(self) -> None:
        """Keep fetching until cancelled."""
        backoff = 1.0
        while True:
            await asyncio.sleep(max(0.0, self.next_fetch(time.time()) - time.time()))
            before = self.view
            try:
                await self.refresh()
            except (OnionError, OSError, TimeoutError) as exc:
                self._log.warning("tor consensus refresh failed", error=str(exc))
            if self.view is before:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
            else:
                backoff = 1.0
