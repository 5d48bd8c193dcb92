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
(tor's hs_cache OOM handler). Answers are tor's statuses: 200 (stored) and 400 (rejected)
without a body (tor puts "Service descriptor (v3) stored" in the status line only), 404 "Not found".

The outer-layer rules are those of the full descriptor parser
(``onionp2p.proto.hs.desc.parse_outer``, which clients use too); an HSDir never opens the
encrypted layers.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from onionp2p.errors import ProtocolError
from onionp2p.log import get_logger
from onionp2p.proto.hs import desc as hsdesc

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
DESC_SIG_PREFIX = hsdesc.SIG_PREFIX
PUBLISH_PATH = "/tor/hs/3/publish"
FETCH_PREFIX = "/tor/hs/3/"
#: the descriptor cache's default size bound (bytes)
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: tor: the encrypted blob must be longer than salt (16) + MAC (32)
_MIN_ENCRYPTED = 16 + 32


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
    """Check a descriptor's outer layer as an HSDir must (see the module docstring): the
    onion-service descriptor parser's outer-layer check (:func:`onionp2p.proto.hs.desc.parse_outer`,
    the one set of rules clients use too), plus tor's HSDir-only floor on the size of the
    encrypted part. Raises ProtocolError (an HsDescriptorError) naming the first problem."""
    outer = hsdesc.parse_outer(text, now=now)
    if len(outer.superencrypted) <= _MIN_ENCRYPTED:
        raise ProtocolError("superencrypted data too short")
    cert = outer.signing_key_cert
    blinded = cert.signed_with
    if blinded is None:  # hsdesc checked it; kept for the type checker
        raise ProtocolError("signing key certificate without the blinded key (extension 04)")
    return OuterDescriptor(bytes(blinded), outer.revision_counter, outer.lifetime * 60, bytes(cert.certified_key))


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
                return 400, b""
            self.counts["store"] += 1
            self._log.debug("onion-service descriptor stored", revision=desc.revision)
            # no body, as tor's write_short_http_response: a tor uploader reads a body under 32
            # bytes as "confusing binary junk" and warns
            return 200, b""
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
