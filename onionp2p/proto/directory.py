"""Directory documents: relay info, server descriptors, votes and consensuses (specs/directory.md).

Theory of operation
-------------------
This module is the sans-IO core of the directory: pure data classes, strict parsers and
signing/verification. Nothing here reads the clock or touches a socket; every time check
takes ``now``.

* :class:`RelayInfo` is what a client must know to build a circuit through a relay.
  :class:`RouterStatus` adds what the authorities say about it (flags, weight, family).
* :class:`ServerDescriptor` is the document a relay signs about itself and uploads to
  the authorities. The RSA identity key and the RSA->Ed25519 cross-certificate bind the
  fingerprint to the Ed25519 identity, the type-4 certificate binds the identity to the
  medium-term signing key, and the signing key signs the document.
* :class:`NetworkStatus` is both a *vote* (one authority's view, one signature) and a
  *consensus* (computed from votes; signed by several authorities). Every authority
  signs the same SHA-256 digest of the body, so signatures can travel detached. A
  consensus's body ends, as tor's, with the ``bandwidth-weights`` the authorities
  computed (:mod:`onionp2p.proto.bwweights`), which clients apply per path position.
  Both carry the shared-randomness lines of :mod:`onionp2p.proto.srv` after ``params``
  (votes: participation, commits and reveals; both: the previous and current SRV), inside
  the signed body.
* :class:`DirAuthority` is one configured authority (``NICK HOST:DIRPORT ED25519_ID``),
  and :func:`verify_consensus` is the client check: strict parse, signatures from more
  than half of the configured authorities, and a validity interval around ``now``.

Documents are line-based ASCII: ``keyword [arguments]`` per line, single spaces, no
empty lines, a final newline. Keywords appear in a fixed order with fixed counts, so a
document has exactly one encoding and ``parse(x).text == x``. Anything else raises
:class:`~onionp2p.errors.ProtocolError` with a message naming the line.

Signatures are Ed25519 over ``PERSONALIZATION || SHA-256(signed part)``, a distinct
personalization string per document type, so one signature can never be replayed as
another kind of document.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from onionp2p.errors import ConfigError, LocalProtocolError, OnionError, ProtocolError
from onionp2p.proto import protover
from onionp2p.proto.address import format_hostport, parse_hostport
from onionp2p.proto.bwweights import format_bw_weights, parse_bw_weights
from onionp2p.proto.certs import CertType, Ed25519Cert, RsaCrossCert, rsa_public_der
from onionp2p.proto.doctime import format_time, parse_time
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.srv import Commit, SharedRandomValue

__all__ = [
    "AUTHORITY_LINE_FORMAT",
    "CLOCK_SKEW",
    "KNOWN_FLAGS",
    "MAX_CONSENSUS_SIZE",
    "MAX_DESCRIPTOR_SIZE",
    "ConsensusError",
    "DirAuthority",
    "NetworkStatus",
    "RelayInfo",
    "RouterEntry",
    "RouterStatus",
    "ServerDescriptor",
    "format_time",
    "parse_authorities",
    "parse_time",
    "verify_consensus",
]

#: Flags an authority may vote on (sorted).
KNOWN_FLAGS = ("Exit", "Fast", "Guard", "HSDir", "Running", "Stable", "V2Dir", "Valid")
MAX_DESCRIPTOR_SIZE = 20_000
MAX_CONSENSUS_SIZE = 8 * 1024 * 1024  # also the bound for votes
MAX_POLICY_RULES = 256
MAX_FAMILY = 64
MAX_SIGNATURES = 64
#: Default tolerance (seconds) for clock differences when checking validity intervals.
CLOCK_SKEW = 60.0

_DESC_PERSONAL = b"onionp2p router descriptor v1\x00"
_STATUS_PERSONAL = b"onionp2p network-status v1\x00"


class ConsensusError(ProtocolError):
    """A consensus failed verification: forged, expired, future-dated or under-signed."""


# -- small codecs --------------------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode().rstrip("=")


def _unb64(s: str, n: int | None, what: str) -> bytes:
    """Strict unpadded base64: canonical encoding only, exact length if ``n``."""
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (ValueError, TypeError, binascii.Error):
        raise ProtocolError(f"{what} is not base64") from None
    if _b64(raw) != s:
        raise ProtocolError(f"{what} is not canonical unpadded base64")
    if n is not None and len(raw) != n:
        raise ProtocolError(f"{what} must be {n} bytes, got {len(raw)}")
    return raw


_INT = re.compile(r"0|[1-9][0-9]{0,15}")
_HEX40 = re.compile(r"[0-9A-F]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NICK = re.compile(r"[A-Za-z0-9]{1,19}")
_KEYWORD = re.compile(r"[a-z][a-z0-9-]{0,31}")
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_FLAG = re.compile(r"[A-Z][A-Za-z0-9]{0,31}")
_PARAM_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")  # dir-spec's KeywordChar: tor's guard-* names have "-"
_WEIGHT_KEY = re.compile(r"W[bdegm][bdegm]")
_PARAM_VALUE = re.compile(r"-?(0|[1-9][0-9]{0,9})")
def _int(s: str, lo: int, hi: int, what: str) -> int:
    if not _INT.fullmatch(s) or not lo <= int(s) <= hi:
        raise ProtocolError(f"{what} must be an integer in {lo}-{hi}, got {s[:30]!r}")
    return int(s)


def _nick(s: str) -> str:
    if not _NICK.fullmatch(s):
        raise ProtocolError(f"bad nickname {s[:30]!r}")
    return s


def _fp(s: str) -> bytes:
    if not _HEX40.fullmatch(s):
        raise ProtocolError(f"bad fingerprint {s[:50]!r} (want 40 upper-case hex digits)")
    return bytes.fromhex(s)


def _ipv4(s: str) -> str:
    try:
        ok = str(ipaddress.IPv4Address(s)) == s
    except ValueError:
        ok = False
    if not ok:
        raise ProtocolError(f"bad IPv4 address {s[:40]!r}")
    return s


def _sign(key: ed25519.Ed25519PrivateKey, personal: bytes, digest: bytes) -> bytes:
    return key.sign(personal + digest)


def _sig_ok(public: bytes, sig: bytes, personal: bytes, digest: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(sig, personal + digest)
        return True
    except (InvalidSignature, ValueError):
        return False


# -- strict line reader --------------------------------------------------------------------
class _Lines:
    """A cursor over ``(lineno, keyword, args)`` of a strictly formatted document."""

    def __init__(self, text: bytes | str, what: str, max_size: int):
        if isinstance(text, (bytes, bytearray, memoryview)):
            if len(text) > max_size:
                raise ProtocolError(f"{what}: larger than {max_size} bytes")
            try:
                text = bytes(text).decode("ascii")
            except UnicodeDecodeError:
                raise ProtocolError(f"{what}: not ASCII") from None
        if not isinstance(text, str):
            raise ProtocolError(f"{what}: not text")
        if len(text) > max_size:
            raise ProtocolError(f"{what}: larger than {max_size} bytes")
        if not text.endswith("\n"):
            raise ProtocolError(f"{what}: must end with a newline")
        self.what = what
        self.text = text
        self.items: list[tuple[int, str, str]] = []
        self.offsets: list[int] = []  # start offset of each line
        pos = 0
        for n, line in enumerate(text[:-1].split("\n"), 1):
            self.offsets.append(pos)
            pos += len(line) + 1
            if not line:
                raise ProtocolError(f"{what}: line {n}: empty line")
            if not _PRINTABLE.fullmatch(line):
                raise ProtocolError(f"{what}: line {n}: control or non-ASCII character")
            if line[-1] == " " or "  " in line:
                raise ProtocolError(f"{what}: line {n}: extra whitespace")
            kw, _, args = line.partition(" ")
            if not _KEYWORD.fullmatch(kw):
                raise ProtocolError(f"{what}: line {n}: bad keyword {kw[:32]!r}")
            self.items.append((n, kw, args))
        self.i = 0

    def fail(self, why: str) -> ProtocolError:
        n = self.items[min(self.i, len(self.items) - 1)][0]
        return ProtocolError(f"{self.what}: line {n}: {why}")

    def peek(self) -> str | None:
        return self.items[self.i][1] if self.i < len(self.items) else None

    def take(self, kw: str, nargs: int | None = None) -> str:
        if self.peek() != kw:
            got = self.peek()
            raise self.fail(f"expected {kw!r}, found {got!r}" if got else f"missing {kw!r}")
        args = self.items[self.i][2]
        if nargs is not None and len(args.split(" ") if args else []) != nargs:
            raise self.fail(f"{kw!r} takes {nargs} argument(s)")
        self.i += 1
        return args

    def maybe(self, kw: str, nargs: int | None = None) -> str | None:
        return self.take(kw, nargs) if self.peek() == kw else None

    def offset(self) -> int:
        """Offset of the current line in the text (len(text) at the end)."""
        return self.offsets[self.i] if self.i < len(self.offsets) else len(self.text)

    def end(self) -> None:
        if self.i != len(self.items):
            raise self.fail(f"unexpected {self.peek()!r}")


def _wrap(what: str, exc: Exception) -> ProtocolError:
    return exc if isinstance(exc, ProtocolError) else ProtocolError(f"{what}: {exc}")


def _protocols(line: str) -> str:
    """A proto line from a document, checked and in canonical form (ProtocolError if bad)."""
    if len(line) > 1024:
        raise ProtocolError("proto line too long")
    canonical = protover.format_protocols(protover.parse(line))
    if canonical != line:
        raise ProtocolError(f"proto line {line[:60]!r} is not in canonical form")
    return line


# -- relay info ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RelayInfo:
    """How to reach and authenticate one relay."""

    nickname: str
    address: str
    or_port: int
    rsa_id: bytes  # SHA-1 of the RSA identity key (the tor fingerprint)
    ed_id: bytes  # Ed25519 master identity key
    ntor_key: bytes  # current X25519 onion key
    exit_policy: str = "reject 1-65535"  # policy summary (microdescriptor "p" line)
    protocols: str = ""  # subprotocol versions it implements (proto/pr line; proto/protover.py)

    @property
    def fingerprint(self) -> str:
        return self.rsa_id.hex().upper()

    def supports(self, name: str, version: int) -> bool:
        """Does the relay advertise this subprotocol version (``supports("Relay", 4)``)?"""
        return protover.supports(self.protocols, name, version)

    def to_dict(self) -> dict:
        return {
            "nickname": self.nickname,
            "address": self.address,
            "or_port": self.or_port,
            "fingerprint": self.fingerprint,
            "ed25519_id": _b64(self.ed_id),
            "ntor_onion_key": _b64(self.ntor_key),
            "exit_policy": self.exit_policy,
            "protocols": self.protocols,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RelayInfo:
        try:
            fp = bytes.fromhex(d["fingerprint"])
            if len(fp) != 20:
                raise ValueError
            port = int(d["or_port"])
            if not 0 < port < 65536:
                raise ValueError
            return cls(
                nickname=str(d["nickname"]), address=str(d["address"]), or_port=port, rsa_id=fp,
                ed_id=_unb64(d["ed25519_id"], 32, "relay info: ed25519_id"),
                ntor_key=_unb64(d["ntor_onion_key"], 32, "relay info: ntor_onion_key"),
                exit_policy=str(d.get("exit_policy", "reject 1-65535")),
                protocols=_protocols(str(d.get("protocols", ""))),
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            raise ProtocolError("relay info: missing or malformed field") from None

    def save(self, path: Path | str) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> RelayInfo:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"relay info {path}: {exc}") from None


@dataclass(frozen=True)
class RouterStatus:
    """One relay as listed in a consensus: how to reach it plus what the authorities say.

    ``flags`` uses tor's flag names (Exit, Fast, Guard, Running, Stable, Valid, ...);
    ``bandwidth`` is the consensus weight (KB/s, as tor's ``w Bandwidth=``); ``family``
    holds the upper-case hex fingerprints the relay declares as its family.
    """

    info: RelayInfo
    flags: frozenset[str] = frozenset()
    bandwidth: int = 0
    family: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def nickname(self) -> str:
        return self.info.nickname


# -- authorities ---------------------------------------------------------------------------
#: how a configured authority line looks, for error messages
AUTHORITY_LINE_FORMAT = ('"NICKNAME HOST:DIRPORT ED25519_ID" as `onionp2p authority --show-identity` prints it, '
                         'e.g. "auth0 127.0.0.1:7000 Ii7WNIc/Os4gF/D5/F5+KRXpm6+mAiuoHKg8aePXCC0"')

@dataclass(frozen=True)
class DirAuthority:
    """A configured directory authority: ``NICKNAME HOST:DIRPORT ED25519_ID_BASE64``."""

    nickname: str
    host: str
    dir_port: int
    ed_id: bytes

    @classmethod
    def parse(cls, line: str) -> DirAuthority:
        """Parse one configuration line; raises ConfigError naming the field that is wrong and
        what the line must look like (the line ``onionp2p authority --show-identity`` prints)."""
        if not isinstance(line, str):
            raise ConfigError("authority line must be a string")
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"authority {line[:80]!r}: expected 3 fields, {AUTHORITY_LINE_FORMAT}, "
                              f"got {len(parts)}")
        nick, hostport, ident = parts
        if not _NICK.fullmatch(nick):
            raise ConfigError(f"authority {line[:80]!r}: nickname {nick[:30]!r} must be 1-19 characters "
                              f"from [A-Za-z0-9] ({AUTHORITY_LINE_FORMAT})")
        if ":" not in hostport:
            raise ConfigError(f"authority {line[:80]!r}: second field {hostport[:60]!r} is not HOST:DIRPORT "
                              f"({AUTHORITY_LINE_FORMAT})")
        try:
            host, port = parse_hostport(hostport)
        except ConfigError as exc:
            raise ConfigError(f"authority {line[:80]!r}: HOST:DIRPORT {hostport[:60]!r}: {exc}") from None
        if port == 0:
            raise ConfigError(f"authority {line[:80]!r}: DirPort must not be 0")
        try:
            ed = _unb64(ident, 32, "Ed25519 identity")
            ed25519.Ed25519PublicKey.from_public_bytes(ed)
        except (ProtocolError, ValueError) as exc:
            raise ConfigError(f"authority {line[:80]!r}: ED25519_ID {ident[:60]!r}: {exc} "
                              f"({AUTHORITY_LINE_FORMAT})") from None
        return cls(nick, host, port, ed)

    @property
    def identity(self) -> str:
        """The Ed25519 identity, base64 without padding."""
        return _b64(self.ed_id)

    def line(self) -> str:
        return f"{self.nickname} {format_hostport(self.host, self.dir_port)} {self.identity}"

    def __str__(self) -> str:
        return self.line()


def parse_authorities(lines: Iterable[str | DirAuthority]) -> tuple[DirAuthority, ...]:
    """Parse configured authority lines; ConfigError on a bad line or a repeated identity."""
    out: list[DirAuthority] = []
    for item in lines:
        auth = item if isinstance(item, DirAuthority) else DirAuthority.parse(item)
        if any(a.ed_id == auth.ed_id for a in out):
            raise ConfigError(f"authority identity {auth.identity} is listed twice")
        out.append(auth)
    return tuple(out)


# -- server descriptors --------------------------------------------------------------------
@dataclass(frozen=True)
class ServerDescriptor:
    """A relay's signed self-description (specs/directory.md "Server descriptors")."""

    nickname: str
    address: str
    or_port: int
    rsa_key_der: bytes  # PKCS#1 DER of the RSA-1024 identity public key
    ed_id: bytes
    cross_cert: bytes  # RSA->Ed25519 (type 7)
    signing_cert: bytes  # Ed25519 identity -> signing key (type 4)
    ntor_key: bytes
    bandwidth: tuple[int, int, int]  # rate, burst, observed (bytes/s)
    platform: str
    published: int
    exit_policy: tuple[str, ...]  # canonical rules, first match wins
    family: tuple[str, ...] = ()
    contact: str | None = None
    dir_server: bool = False  # answers BEGIN_DIR
    protocols: str = ""  # subprotocol versions (dir-spec "proto")
    signature: bytes = field(default=b"", repr=False)
    text: str = field(default="", repr=False, compare=False)
    hs_dir: bool = False  # stores v3 onion-service descriptors (tor's "hidden-service-dir")

    @property
    def rsa_id(self) -> bytes:
        return hashlib.sha1(self.rsa_key_der).digest()

    @property
    def fingerprint(self) -> str:
        return self.rsa_id.hex().upper()

    @cached_property
    def policy_summary(self) -> str:
        return ExitPolicy.parse(self.exit_policy, reject_private=False).summary()

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the whole document, lower-case hex."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    def relay_info(self) -> RelayInfo:
        return RelayInfo(self.nickname, self.address, self.or_port, self.rsa_id, self.ed_id,
                         self.ntor_key, self.policy_summary, self.protocols)

    def _body(self) -> str:
        out = [
            "onionp2p-router-descriptor 1",
            f"router {self.nickname} {self.address} {self.or_port}",
            f"fingerprint {self.fingerprint}",
            f"identity-rsa {_b64(self.rsa_key_der)}",
            f"identity-ed25519 {_b64(self.ed_id)}",
            f"rsa-crosscert {_b64(self.cross_cert)}",
            f"signing-cert {_b64(self.signing_cert)}",
            f"ntor-onion-key {_b64(self.ntor_key)}",
            "bandwidth {} {} {}".format(*self.bandwidth),
            f"platform {self.platform}",
        ]
        if self.protocols:
            out.append(f"proto {self.protocols}")
        out.append(f"published {format_time(self.published)}")
        if self.family:
            out.append("family " + " ".join(self.family))
        if self.contact:
            out.append(f"contact {self.contact}")
        if self.dir_server:
            out.append("tunnelled-dir-server")
        if self.hs_dir:
            out.append("hidden-service-dir")
        out.extend(self.exit_policy)
        out.append(f"p {self.policy_summary}")
        return "\n".join(out) + "\nrouter-signature "

    @classmethod
    def create(cls, keys, *, nickname: str, address: str, or_port: int, exit_policy: ExitPolicy,
               published: float, bandwidth: tuple[int, int, int] = (1 << 30, 1 << 30, 0),
               platform: str = "onionp2p", family: Sequence[str] = (), contact: str | None = None,
               dir_server: bool = False, protocols: str = "", hs_dir: bool = False) -> ServerDescriptor:
        """Build and sign a descriptor with a relay's :class:`~onionp2p.relay.keys.RelayKeys`."""
        unsigned = cls(
            nickname=nickname, address=address, or_port=or_port,
            rsa_key_der=rsa_public_der(keys.rsa_identity), ed_id=keys.identity_public,
            cross_cert=keys.cross_cert.encode(), signing_cert=keys.signing_cert.encode(),
            ntor_key=keys.onion_key_public, bandwidth=tuple(bandwidth), platform=platform,
            published=int(published), exit_policy=tuple(exit_policy.lines()),
            family=tuple(sorted(set(family))), contact=contact or None, dir_server=dir_server,
            protocols=protocols, hs_dir=hs_dir,
        )
        body = unsigned._body()
        sig = _sign(keys.signing, _DESC_PERSONAL, hashlib.sha256(body.encode()).digest())
        return cls.parse(body + _b64(sig) + "\n")

    @classmethod
    def parse(cls, text: bytes | str) -> ServerDescriptor:
        """Strictly parse a descriptor (structure only; see :meth:`verify` for signatures)."""
        what = "server descriptor"
        d = _Lines(text, what, MAX_DESCRIPTOR_SIZE)
        try:
            if d.take("onionp2p-router-descriptor", 1) != "1":
                raise d.fail("unsupported descriptor version")
            nick, addr, port = d.take("router", 3).split(" ")
            fp = _fp(d.take("fingerprint", 1))
            rsa_der = _unb64(d.take("identity-rsa", 1), None, "identity-rsa")
            ed = _unb64(d.take("identity-ed25519", 1), 32, "identity-ed25519")
            cross = _unb64(d.take("rsa-crosscert", 1), None, "rsa-crosscert")
            scert = _unb64(d.take("signing-cert", 1), None, "signing-cert")
            ntor = _unb64(d.take("ntor-onion-key", 1), 32, "ntor-onion-key")
            bw = tuple(_int(x, 0, 2**48, "bandwidth") for x in d.take("bandwidth", 3).split(" "))
            platform = d.take("platform")
            protocols = _protocols(d.maybe("proto") or "")
            published = parse_time(d.take("published", 2))
            fam = d.maybe("family")
            family = tuple(fam.split(" ")) if fam is not None else ()
            contact = d.maybe("contact")
            dir_server = d.maybe("tunnelled-dir-server", 0) is not None
            hs_dir = d.maybe("hidden-service-dir", 0) is not None
            rules: list[str] = []
            while d.peek() in ("accept", "reject"):
                kw = d.peek()
                rules.append(f"{kw} {d.take(kw, 1)}")
                if len(rules) > MAX_POLICY_RULES:
                    raise d.fail(f"more than {MAX_POLICY_RULES} exit policy rules")
            summary = d.take("p")
            sig_at = d.offset()
            sig = _unb64(d.take("router-signature", 1), 64, "router-signature")
            d.end()
            if not platform or len(platform) > 128:
                raise ProtocolError("platform missing or too long")
            if contact is not None and len(contact) > 512:
                raise ProtocolError("contact too long")
            if family == ("",) or len(family) > MAX_FAMILY:
                raise ProtocolError("family must list 1-64 fingerprints")
            for f in family:
                _fp(f)
            if list(family) != sorted(set(family)):
                raise ProtocolError("family fingerprints must be sorted and unique")
            if hashlib.sha1(rsa_der).digest() != fp:
                raise ProtocolError("fingerprint does not match identity-rsa")
            try:
                policy = ExitPolicy.parse(rules, reject_private=False)
            except ConfigError as exc:
                raise ProtocolError(f"bad exit policy: {exc}") from None
            if tuple(policy.lines()) != tuple(rules):
                raise ProtocolError("exit policy is not in canonical form")
            if summary != policy.summary():
                raise ProtocolError(f"p line {summary[:60]!r} does not summarize the exit policy")
            desc = cls(_nick(nick), _ipv4(addr), _int(port, 1, 65535, "or-port"), rsa_der, ed, cross,
                       scert, ntor, bw, platform, published, tuple(rules), family, contact,
                       dir_server, protocols, sig, d.text, hs_dir)
        except (ValueError, OnionError) as exc:
            raise _wrap(what, exc) from None
        if desc._body() != d.text[: sig_at + len("router-signature ")]:
            raise ProtocolError(f"{what}: not in canonical form")
        return desc

    def verify(self, now: float, *, skew: float = CLOCK_SKEW) -> None:
        """Check keys, certificate chain and signature; ProtocolError if anything is wrong."""
        try:
            key = serialization.load_der_public_key(self.rsa_key_der)
        except (ValueError, TypeError):
            raise ProtocolError("server descriptor: identity-rsa is not an RSA public key") from None
        if (not isinstance(key, rsa.RSAPublicKey) or key.key_size != 1024
                or key.public_numbers().e != 65537 or rsa_public_der(key) != self.rsa_key_der):
            raise ProtocolError("server descriptor: identity-rsa must be a canonical RSA-1024 key, e=65537")
        cross = RsaCrossCert.parse(self.cross_cert)
        cross.verify(key, now)
        if cross.ed25519_key != self.ed_id:
            raise ProtocolError("server descriptor: cross-certificate names another Ed25519 identity")
        cert = Ed25519Cert.parse(self.signing_cert)
        if cert.cert_type != CertType.IDENTITY_V_SIGNING:
            raise ProtocolError("server descriptor: signing-cert is not a type-4 certificate")
        cert.verify(self.ed_id, now=now)
        body = self.text[: len(self.text) - len(_b64(self.signature)) - 1]
        if not _sig_ok(cert.certified_key, self.signature, _DESC_PERSONAL,
                       hashlib.sha256(body.encode()).digest()):
            raise ProtocolError("server descriptor: bad router-signature")
        if self.published > now + skew:
            raise ProtocolError(f"server descriptor: published in the future ({format_time(self.published)})")


# -- votes and consensuses -----------------------------------------------------------------
@dataclass(frozen=True)
class RouterEntry:
    """One relay in a vote or consensus."""

    nickname: str
    rsa_id: bytes
    ed_id: bytes
    address: str
    or_port: int
    ntor_key: bytes
    flags: frozenset[str]
    bandwidth: int  # KB/s
    policy: str  # exit policy summary
    family: tuple[str, ...]
    platform: str
    published: int
    digest: str  # SHA-256 hex of the descriptor this entry was made from
    protocols: str = ""  # subprotocol versions ("pr" line)

    @property
    def fingerprint(self) -> str:
        return self.rsa_id.hex().upper()

    @classmethod
    def from_descriptor(cls, desc: ServerDescriptor, flags: Iterable[str], bandwidth: int) -> RouterEntry:
        return cls(desc.nickname, desc.rsa_id, desc.ed_id, desc.address, desc.or_port, desc.ntor_key,
                   frozenset(flags), bandwidth, desc.policy_summary, desc.family, desc.platform,
                   desc.published, desc.digest, desc.protocols)

    def status(self) -> RouterStatus:
        info = RelayInfo(self.nickname, self.address, self.or_port, self.rsa_id, self.ed_id,
                         self.ntor_key, self.policy, self.protocols)
        return RouterStatus(info, self.flags, self.bandwidth, self.family)

    def lines(self) -> list[str]:
        out = [f"r {self.nickname} {self.fingerprint} {_b64(self.ed_id)} {self.address} {self.or_port}",
               f"k {_b64(self.ntor_key)}",
               "s" + "".join(" " + f for f in sorted(self.flags)),
               f"w {self.bandwidth}",
               f"p {self.policy}"]
        if self.family:
            out.append("f " + " ".join(self.family))
        out.append(f"v {self.platform}")
        if self.protocols:
            out.append(f"pr {self.protocols}")
        out.append(f"d {format_time(self.published)} {self.digest}")
        return out

    @classmethod
    def _read(cls, d: _Lines, known: frozenset[str]) -> RouterEntry:
        r = d.take("r", 5).split(" ")
        ntor = _unb64(d.take("k", 1), 32, "ntor key")
        s = d.take("s")
        flags = s.split(" ") if s else []
        if flags != sorted(set(flags)) or not all(_FLAG.fullmatch(f) and f in known for f in flags):
            raise d.fail("flags must be sorted, unique and listed in known-flags")
        bw = _int(d.take("w", 1), 0, 2**40, "bandwidth")
        policy = d.take("p")
        ExitPolicy.parse_summary(policy)
        fam = d.maybe("f")
        family = tuple(fam.split(" ")) if fam is not None else ()
        if len(family) > MAX_FAMILY or list(family) != sorted(set(family)):
            raise d.fail("family must be sorted, unique, at most 64 entries")
        for f in family:
            _fp(f)
        platform = d.take("v")
        if len(platform) > 128:
            raise d.fail("platform too long")
        protocols = _protocols(d.maybe("pr") or "")
        dd = d.take("d", 3).split(" ")
        if not _HEX64.fullmatch(dd[2]):
            raise d.fail("bad descriptor digest")
        return cls(_nick(r[0]), _fp(r[1]), _unb64(r[2], 32, "ed25519 id"), _ipv4(r[3]),
                   _int(r[4], 1, 65535, "or-port"), ntor, frozenset(flags), bw, policy, family,
                   platform, parse_time(f"{dd[0]} {dd[1]}"), dd[2], protocols)


@dataclass(frozen=True)
class NetworkStatus:
    """A vote (``status == "vote"``, one voter) or a consensus (``"consensus"``)."""

    status: str
    valid_after: int
    fresh_until: int
    valid_until: int
    voters: tuple[tuple[str, bytes], ...]  # (nickname, ed25519 id); a vote has exactly one
    routers: tuple[RouterEntry, ...]
    known_flags: tuple[str, ...] = KNOWN_FLAGS
    signatures: tuple[tuple[bytes, bytes], ...] = ()  # (ed25519 id, signature), sorted
    #: network parameters (``params`` line, as tor's): congestion control's ``cc_*`` ...
    params: tuple[tuple[str, int], ...] = ()
    #: a consensus's ``bandwidth-weights`` (dir-spec §3.8.3, computed by the authorities with
    #: :func:`onionp2p.proto.bwweights.compute_bw_weights`); empty: none (plain bandwidth)
    bw_weights: tuple[tuple[str, int], ...] = ()
    #: shared randomness (:mod:`onionp2p.proto.srv`): a vote's ``shared-rand-participate``
    #: and ``shared-rand-commit`` lines (one per authority, sorted by identity) ...
    sr_participate: bool = False
    sr_commits: tuple[Commit, ...] = ()
    #: ... and, in votes and consensuses, ``shared-rand-previous-value`` /
    #: ``shared-rand-current-value`` (None: absent)
    shared_rand_previous: SharedRandomValue | None = None
    shared_rand_current: SharedRandomValue | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(sorted(dict(self.params).items())))
        for key, value in self.params:
            if not _PARAM_KEY.fullmatch(key) or not -2**31 <= value < 2**31:
                raise LocalProtocolError(f"bad network parameter {key}={value}")
        object.__setattr__(self, "bw_weights", tuple(sorted(dict(self.bw_weights).items())))
        for key, value in self.bw_weights:
            if not _WEIGHT_KEY.fullmatch(key) or not 0 <= value < 2**31:
                raise LocalProtocolError(f"bad bandwidth weight {key}={value}")
        if self.bw_weights and self.status != "consensus":
            raise LocalProtocolError("only a consensus has bandwidth-weights")
        object.__setattr__(self, "routers", tuple(sorted(self.routers, key=lambda e: e.rsa_id)))
        object.__setattr__(self, "voters", tuple(sorted(self.voters, key=lambda v: v[1])))
        object.__setattr__(self, "signatures", tuple(sorted(dict(self.signatures).items())))
        object.__setattr__(self, "sr_commits", tuple(sorted(self.sr_commits, key=lambda c: c.identity)))
        if len({c.identity for c in self.sr_commits}) != len(self.sr_commits) \
                or len(self.sr_commits) > MAX_SIGNATURES:
            raise LocalProtocolError("at most one shared-rand-commit per authority")
        if self.status != "vote" and (self.sr_participate or self.sr_commits):
            raise LocalProtocolError("only a vote has shared-rand-participate / shared-rand-commit")

    @property
    def srv_current(self) -> bytes | None:
        """The current shared random value (32 bytes; None: absent), as a tor consensus view
        has it (onion services then fall back to the disaster SRV)."""
        return self.shared_rand_current.value if self.shared_rand_current is not None else None

    @property
    def srv_previous(self) -> bytes | None:
        """The previous shared random value (None: absent)."""
        return self.shared_rand_previous.value if self.shared_rand_previous is not None else None

    @cached_property
    def body(self) -> str:
        """Everything the signatures cover (through ``directory-footer`` and, as in tor, the
        ``bandwidth-weights`` line after it)."""
        out = ["onionp2p-network-status 1", f"status {self.status}",
               f"valid-after {format_time(self.valid_after)}",
               f"fresh-until {format_time(self.fresh_until)}",
               f"valid-until {format_time(self.valid_until)}",
               "known-flags " + " ".join(self.known_flags)]
        if self.params:
            out.append("params " + " ".join(f"{k}={v}" for k, v in self.params))
        if self.sr_participate:
            out.append("shared-rand-participate")
        out += [f"shared-rand-commit {c.args()}" for c in self.sr_commits]
        if self.shared_rand_previous is not None:
            out.append(f"shared-rand-previous-value {self.shared_rand_previous.args()}")
        if self.shared_rand_current is not None:
            out.append(f"shared-rand-current-value {self.shared_rand_current.args()}")
        kw = "voter" if self.status == "vote" else "authority"
        out += [f"{kw} {nick} {_b64(ed)}" for nick, ed in self.voters]
        for entry in self.routers:
            out += entry.lines()
        out.append("directory-footer")
        if self.bw_weights:
            out.append("bandwidth-weights " + format_bw_weights(dict(self.bw_weights)))
        return "\n".join(out) + "\n"

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of :attr:`body`: what every authority signs."""
        return hashlib.sha256(self.body.encode()).digest()

    @property
    def text(self) -> str:
        return self.body + "".join(f"directory-signature {_b64(ed)} {_b64(sig)}\n"
                                   for ed, sig in self.signatures)

    def sign(self, key: ed25519.Ed25519PrivateKey) -> bytes:
        """A detached signature by ``key`` over :attr:`digest`."""
        return _sign(key, _STATUS_PERSONAL, self.digest)

    def signature_valid(self, ed_id: bytes, sig: bytes) -> bool:
        return _sig_ok(ed_id, sig, _STATUS_PERSONAL, self.digest)

    @staticmethod
    def digest_signature_valid(ed_id: bytes, sig: bytes, digest: bytes) -> bool:
        """Check a detached signature against a digest (no document needed)."""
        return _sig_ok(ed_id, sig, _STATUS_PERSONAL, digest)

    def with_signatures(self, sigs: Iterable[tuple[bytes, bytes]]) -> NetworkStatus:
        merged = dict(self.signatures)
        merged.update(sigs)
        return replace(self, signatures=tuple(merged.items()))

    def valid_signers(self, authorities: Sequence[DirAuthority]) -> set[bytes]:
        """Identities of configured authorities with a valid signature on this document."""
        known = {a.ed_id for a in authorities}
        return {ed for ed, sig in self.signatures if ed in known and self.signature_valid(ed, sig)}

    def router_statuses(self) -> list[RouterStatus]:
        return [e.status() for e in self.routers]

    @classmethod
    def parse(cls, text: bytes | str, *, max_size: int = MAX_CONSENSUS_SIZE) -> NetworkStatus:
        """Strictly parse a vote or consensus (structure only; signatures are not checked)."""
        what = "network status"
        d = _Lines(text, what, max_size)
        try:
            if d.take("onionp2p-network-status", 1) != "1":
                raise d.fail("unsupported network-status version")
            status = d.take("status", 1)
            if status not in ("vote", "consensus"):
                raise d.fail("status must be 'vote' or 'consensus'")
            what = status
            va = parse_time(d.take("valid-after", 2))
            fu = parse_time(d.take("fresh-until", 2))
            vu = parse_time(d.take("valid-until", 2))
            if not va < fu <= vu:
                raise d.fail("need valid-after < fresh-until <= valid-until")
            known = d.take("known-flags").split(" ")
            if known != sorted(set(known)) or not all(_FLAG.fullmatch(f) for f in known):
                raise d.fail("known-flags must be sorted, unique flag names")
            params = []
            line = d.maybe("params")
            if line is not None:
                for item in line.split(" "):
                    key, eq, value = item.partition("=")
                    if not eq or not _PARAM_KEY.fullmatch(key) or not _PARAM_VALUE.fullmatch(value):
                        raise d.fail(f"bad params entry {item[:40]!r}")
                    if not -2**31 <= int(value) < 2**31:
                        raise d.fail(f"params entry {key} out of range")
                    params.append((key, int(value)))
                if [k for k, _ in params] != sorted({k for k, _ in params}):
                    raise d.fail("params must be sorted by key and unique")
            participate = status == "vote" and d.maybe("shared-rand-participate", 0) is not None
            commits = []
            while status == "vote" and d.peek() == "shared-rand-commit":
                commits.append(Commit.parse(d.take("shared-rand-commit")))
                if len(commits) > MAX_SIGNATURES:
                    raise d.fail("too many shared-rand-commit lines")
            if [c.identity for c in commits] != sorted({c.identity for c in commits}):
                raise d.fail("shared-rand-commit lines must be sorted by identity, one per authority")
            srvs = [SharedRandomValue.parse(line, kw) if line is not None else None
                    for kw in ("shared-rand-previous-value", "shared-rand-current-value")
                    for line in (d.maybe(kw),)]
            kw = "voter" if status == "vote" else "authority"
            voters = []
            while d.peek() == kw:
                nick, ident = d.take(kw, 2).split(" ")
                voters.append((_nick(nick), _unb64(ident, 32, f"{kw} identity")))
            if not voters or (status == "vote" and len(voters) != 1):
                raise d.fail(f"a {status} needs {'one' if status == 'vote' else 'at least one'} {kw!r} line")
            if len({ed for _, ed in voters}) != len(voters) or voters != sorted(voters, key=lambda v: v[1]):
                raise d.fail(f"{kw} lines must be sorted by identity and unique")
            routers = []
            kf = frozenset(known)
            while d.peek() == "r":
                routers.append(RouterEntry._read(d, kf))
            if [e.rsa_id for e in routers] != sorted({e.rsa_id for e in routers}):
                raise d.fail("routers must be sorted by fingerprint and unique")
            d.take("directory-footer", 0)
            bw_weights: list[tuple[str, int]] = []
            line = d.maybe("bandwidth-weights")
            if line is not None:
                if status != "consensus":
                    raise d.fail("a vote has no bandwidth-weights")
                bw_weights = list(parse_bw_weights(line.split(" ")).items())
                if [k for k, _ in bw_weights] != sorted({k for k, _ in bw_weights}) or not all(
                        _WEIGHT_KEY.fullmatch(k) and v >= 0 for k, v in bw_weights):
                    raise d.fail("bandwidth-weights must be sorted, unique Wxy=N entries with N >= 0")
            body_end = d.offset()
            sigs = []
            while d.peek() == "directory-signature":
                ident, sig = d.take("directory-signature", 2).split(" ")
                sigs.append((_unb64(ident, 32, "signer identity"), _unb64(sig, 64, "signature")))
                if len(sigs) > MAX_SIGNATURES:
                    raise d.fail("too many signatures")
            d.end()
            if [s[0] for s in sigs] != sorted({s[0] for s in sigs}):
                raise ProtocolError("signatures must be sorted by signer and unique")
            doc = cls(status, va, fu, vu, tuple(voters), tuple(routers), tuple(known), tuple(sigs),
                      tuple(params), tuple(bw_weights), participate, tuple(commits), *srvs)
        except (ValueError, OnionError) as exc:
            raise _wrap(what, exc) from None
        if doc.body != d.text[:body_end]:
            raise ProtocolError(f"{what}: not in canonical form")
        return doc


def verify_consensus(text: bytes | str | NetworkStatus, authorities: Sequence[DirAuthority], now: float,
                     *, skew: float = CLOCK_SKEW, check_time: bool = True) -> NetworkStatus:
    """The client check. Raises :class:`ConsensusError` (a ProtocolError) with a clear reason.

    Accepts only a consensus signed validly by more than half of ``authorities`` whose
    validity interval contains ``now`` (give or take ``skew`` seconds).
    """
    try:
        doc = text if isinstance(text, NetworkStatus) else NetworkStatus.parse(text)
    except ProtocolError as exc:
        raise ConsensusError(f"consensus rejected: malformed: {exc}") from None
    if doc.status != "consensus":
        raise ConsensusError("consensus rejected: document is a vote, not a consensus")
    if not authorities:
        raise ConsensusError("consensus rejected: no authorities configured")
    need = len(authorities) // 2 + 1
    good = doc.valid_signers(authorities)
    if len(good) < need:
        bad = len(doc.signatures) - len(good)
        raise ConsensusError(
            f"consensus rejected: valid signatures from {len(good)} of {len(authorities)} configured "
            f"authorities, need {need}" + (f" ({bad} signature(s) invalid or unknown)" if bad else ""))
    if check_time:
        if doc.valid_after > now + skew:
            raise ConsensusError(f"consensus rejected: future-dated (valid-after {format_time(doc.valid_after)}, "
                                 f"now {format_time(now)})")
        if doc.valid_until < now - skew:
            raise ConsensusError(f"consensus rejected: expired (valid-until {format_time(doc.valid_until)}, "
                                 f"now {format_time(now)})")
    return doc
