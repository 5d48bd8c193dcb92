"""A relay's HSDir role: store and serve v3 onion-service descriptors (rend-spec-v3 §2.2-§2.4).

Theory of operation
-------------------
Services upload descriptors with ``POST /tor/hs/3/publish`` and clients fetch them with
``GET /tor/hs/3/<blinded key in base64>``, both over BEGIN_DIR streams to the relay's
directory cache (:class:`~onionp2p.dir.client.RelayDirectory` passes those paths to
:meth:`HsDirCache.http`). As tor's ``hs_cache_store_as_dir``, an HSDir reads only the
descriptor's outer, plaintext layer (:func:`parse_outer`)::

    hs-descriptor 3                       (first line)
    descriptor-lifetime <minutes>         (at most 720: 12 hours)
    descriptor-signing-key-cert           (an Ed25519 certificate object, type 08)
    revision-counter <u64>
    superencrypted                        (a MESSAGE object: opaque to the HSDir)
    signature <base64 Ed25519 signature>  (last line)

each keyword exactly once. The certificate must be of type 08 and carry the blinded key
(extension 04) that signed it, its signature good and not expired; the descriptor's
signature, by the certified signing key, covers ``"Tor onion service descriptor sig v3"``
and the text up to and including the newline before ``signature``. The blinded key is
the index. The whole descriptor is at most ``HSV3MaxDescriptorSize`` bytes (consensus
parameter, default 50000).

A stored descriptor is replaced only by one with a higher revision counter (an equal or
lower one is refused, 400); it expires ``descriptor-lifetime`` after it was stored. The
cache holds at most ``max_bytes`` of descriptors; past that, the oldest-stored go first
(tor's hs_cache OOM handler). Answers are tor's: 200 "Service descriptor (v3) stored",
400 "Invalid v3 service descriptor rejected", 404 "Not found".

(The full descriptor parser, with both encryption layers, lives in
``onionp2p.proto.hs``; this module deliberately checks only what an HSDir must, and is
to be merged onto that parser's outer-layer code.)
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from onionp2p.errors import ProtocolError
from onionp2p.log import get_logger
from onionp2p.proto.certs import CertType, Ed25519Cert

__all__ = [
    "DESC_SIG_PREFIX",
    "FETCH_PREFIX",
    "HS_DESC_MAX_LEN",
    "HS_DESC_MAX_LIFETIME",
    "PUBLISH_PATH",
    "HsDirCache",
    "OuterDescriptor",
    "parse_outer",
]

log = get_logger("onionp2p.hsdir")

#: tor's default HSV3MaxDescriptorSize (bytes)
HS_DESC_MAX_LEN = 50000
#: tor's HS_DESC_MAX_LIFETIME (seconds)
HS_DESC_MAX_LIFETIME = 12 * 3600
DESC_SIG_PREFIX = b"Tor onion service descriptor sig v3"
PUBLISH_PATH = "/tor/hs/3/publish"
FETCH_PREFIX = "/tor/hs/3/"
#: the descriptor cache's default size bound (bytes)
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: tor: the encrypted blob must be longer than salt (16) + MAC (32)
_MIN_ENCRYPTED = 16 + 32
_OBJECT = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,40})-----\n([A-Za-z0-9+/=\n]*?)-----END \1-----\n")
_KEYWORD = re.compile(r"[A-Za-z0-9-]{1,64}")


@dataclass(frozen=True)
class OuterDescriptor:
    """What an HSDir reads of a descriptor: its index (the blinded key), revision counter
    and lifetime (seconds)."""

    blinded_key: bytes
    revision: int
    lifetime: int
    signing_key: bytes


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what}: bad base64") from None


def parse_outer(text: bytes, now: float) -> OuterDescriptor:
    """Check a descriptor's outer layer as an HSDir must (see the module docstring).
    Raises ProtocolError (CertificateError) naming the first problem."""
    try:
        doc = text.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("descriptor is not ASCII") from None
    if not doc.startswith("hs-descriptor 3\n"):
        raise ProtocolError("descriptor does not start with 'hs-descriptor 3'")
    items: dict[str, list[tuple[list[str], str | None, str | None]]] = {}
    pos = 0
    order: list[str] = []
    while pos < len(doc):
        end = doc.find("\n", pos)
        if end < 0:
            raise ProtocolError("descriptor does not end with a newline")
        words = doc[pos:end].split(" ")
        pos = end + 1
        keyword = words[0]
        if not _KEYWORD.fullmatch(keyword):
            raise ProtocolError(f"malformed descriptor line starting {keyword[:40]!r}")
        obj_type = obj_body = None
        if doc.startswith("-----BEGIN ", pos):
            m = _OBJECT.match(doc, pos)
            if m is None:
                raise ProtocolError(f"malformed object after {keyword!r}")
            obj_type, obj_body = m.group(1), m.group(2)
            pos = m.end()
        items.setdefault(keyword, []).append((words[1:], obj_type, obj_body))
        order.append(keyword)
    for keyword in (
        "hs-descriptor",
        "descriptor-lifetime",
        "descriptor-signing-key-cert",
        "revision-counter",
        "superencrypted",
        "signature",
    ):
        if len(items.get(keyword, ())) != 1:
            raise ProtocolError(f"descriptor needs exactly one {keyword!r}")
    if order[-1] != "signature":
        raise ProtocolError("'signature' is not the last item of the descriptor")

    args = items["descriptor-lifetime"][0][0]
    if len(args) != 1 or not args[0].isdigit() or len(args[0]) > 10:
        raise ProtocolError("descriptor lifetime value is invalid")
    lifetime = int(args[0]) * 60
    if lifetime > HS_DESC_MAX_LIFETIME:
        raise ProtocolError(f"descriptor lifetime {lifetime} s is over the maximum {HS_DESC_MAX_LIFETIME} s")

    args = items["revision-counter"][0][0]
    if len(args) != 1 or not args[0].isdigit() or int(args[0]) >= 1 << 64:
        raise ProtocolError("revision counter is invalid")
    revision = int(args[0])

    _args, obj_type, obj_body = items["superencrypted"][0]
    if obj_type != "MESSAGE" or obj_body is None:
        raise ProtocolError("superencrypted needs a MESSAGE object")
    if len(_b64(obj_body.replace("\n", ""), "superencrypted")) <= _MIN_ENCRYPTED:
        raise ProtocolError("superencrypted data too short")

    _args, obj_type, obj_body = items["descriptor-signing-key-cert"][0]
    if obj_type != "ED25519 CERT" or obj_body is None:
        raise ProtocolError("descriptor-signing-key-cert needs an ED25519 CERT object")
    cert = Ed25519Cert.parse(_b64(obj_body.replace("\n", ""), "signing key certificate"))
    if cert.cert_type != CertType.HS_BLINDED_ID_V_SIGNING:
        raise ProtocolError(f"signing key certificate of type {int(cert.cert_type)}, not 8")
    blinded = cert.signed_with
    if blinded is None:
        raise ProtocolError("signing key certificate without the blinded key (extension 04)")
    cert.verify(blinded, now=now)  # signed by the blinded key, not expired

    sig_args = items["signature"][0][0]
    if len(sig_args) != 1:
        raise ProtocolError("signature line needs one argument")
    sig = _b64(sig_args[0], "signature")
    at = doc.rfind("\nsignature ")
    signed = text[: at + 1]
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(cert.certified_key).verify(sig, DESC_SIG_PREFIX + signed)
    except (InvalidSignature, ValueError):
        raise ProtocolError("descriptor signature is not valid") from None
    return OuterDescriptor(bytes(blinded), revision, lifetime, bytes(cert.certified_key))


class _Entry:
    __slots__ = ("expires_at", "revision", "stored_at", "text")

    def __init__(self, text: bytes, revision: int, stored_at: float, expires_at: float) -> None:
        self.text, self.revision, self.stored_at, self.expires_at = text, revision, stored_at, expires_at


class HsDirCache:
    """The descriptors this relay stores as an HSDir, by blinded key. Times are unix seconds."""

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES, nickname: str = "") -> None:
        self.max_bytes = max_bytes
        self.entries: dict[bytes, _Entry] = {}
        self.bytes = 0
        #: outcomes: store, store_rejected, fetch, fetch_miss, expired, evicted
        self.counts: Counter[str] = Counter()
        self._log = log.bind(nickname=nickname) if nickname else log

    def store(self, text: bytes, now: float, *, max_size: int = HS_DESC_MAX_LEN) -> OuterDescriptor:
        """Check and keep a descriptor. Raises ProtocolError if it is refused."""
        if len(text) > max_size:
            raise ProtocolError(f"descriptor is too big ({len(text)} bytes; at most {max_size})")
        desc = parse_outer(text, now)
        old = self.entries.get(desc.blinded_key)
        if old is not None and old.expires_at > now and old.revision >= desc.revision:
            raise ProtocolError(f"revision counter {desc.revision} is not above the stored {old.revision}")
        self._drop(desc.blinded_key)
        self.entries[desc.blinded_key] = _Entry(bytes(text), desc.revision, now, now + desc.lifetime)
        self.bytes += len(text)
        self._shrink()
        return desc

    def lookup(self, blinded_key: bytes, now: float) -> bytes | None:
        entry = self.entries.get(blinded_key)
        if entry is None or entry.expires_at <= now:
            return None
        return entry.text

    def expire(self, now: float) -> None:
        """Forget descriptors past their lifetime."""
        for key in [k for k, e in self.entries.items() if e.expires_at <= now]:
            self._drop(key)
            self.counts["expired"] += 1

    def _drop(self, key: bytes) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry.text)

    def _shrink(self) -> None:
        if self.bytes <= self.max_bytes:
            return
        for key in sorted(self.entries, key=lambda k: self.entries[k].stored_at):
            if self.bytes <= self.max_bytes:
                break
            self._drop(key)
            self.counts["evicted"] += 1

    def http(
        self,
        method: str,
        path: str,
        body: bytes,
        params: Mapping[str, int] | None = None,
        now: float | None = None,
    ) -> tuple[int, bytes] | None:
        """Answer an HSDir request: ``(status, body)``, or None if ``path`` is not ours."""
        now = time.time() if now is None else now
        if method == "POST" and path == PUBLISH_PATH:
            limit = (params or {}).get("HSV3MaxDescriptorSize", HS_DESC_MAX_LEN)
            try:
                desc = self.store(
                    body, now, max_size=limit if isinstance(limit, int) and limit > 0 else HS_DESC_MAX_LEN
                )
            except ProtocolError as exc:
                self.counts["store_rejected"] += 1
                self._log.info("onion-service descriptor rejected", why=str(exc))
                return 400, b"Invalid v3 service descriptor rejected\n"
            self.counts["store"] += 1
            self._log.debug("onion-service descriptor stored", revision=desc.revision)
            return 200, b"Service descriptor (v3) stored\n"
        if method == "GET" and path.startswith(FETCH_PREFIX) and path != PUBLISH_PATH:
            query = path[len(FETCH_PREFIX) :]
            try:
                key = _b64(query, "blinded key") if len(query) in (43, 44) else b""
            except ProtocolError:
                key = b""
            text = self.lookup(key, now) if len(key) == 32 else None
            if text is None:
                self.counts["fetch_miss"] += 1
                return 404, b"Not found\n"
            self.counts["fetch"] += 1
            return 200, text
        return None
