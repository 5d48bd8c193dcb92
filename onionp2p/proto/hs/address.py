"""v3 onion addresses (rend-spec-v3 §6 [ONIONADDRESS]).

An address is ``base32(PUBKEY | CHECKSUM | VERSION) + ".onion"``: the service's 32-byte
Ed25519 identity key, two bytes of ``SHA3-256(".onion checksum" | PUBKEY | VERSION)`` and
the version byte 3. That is 35 bytes, 56 base32 characters. The checksum only catches typos;
it is not a security feature, which is why a client must also check that the key is a point
of the prime-order subgroup (§2.2.7): otherwise one key could be written as eight addresses.

:func:`parse_onion_address` accepts any letter case and an optional trailing dot, and
keeps subdomains apart (``www.<addr>.onion`` names the service ``<addr>``, as tor does).
Errors say which check failed: :class:`~onionp2p.errors.OnionAddressMalformed` (not a v3
address) or :class:`~onionp2p.errors.OnionAddressChecksumError` (a typo).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from onionp2p.errors import OnionAddressChecksumError, OnionAddressMalformed
from onionp2p.proto.ed25519x import is_torsion_free_point

__all__ = [
    "ONION_SUFFIX",
    "VERSION",
    "OnionAddress",
    "encode_onion_address",
    "is_onion_name",
    "onion_checksum",
    "parse_onion_address",
]

VERSION = 3
ONION_SUFFIX = ".onion"
_CHECKSUM_PREFIX = b".onion checksum"
_ENCODED_LEN = 56  # base32 of 35 bytes, no padding


def onion_checksum(pubkey: bytes, version: int = VERSION) -> bytes:
    """CHECKSUM: the first two bytes of SHA3-256(".onion checksum" | PUBKEY | VERSION)."""
    return hashlib.sha3_256(_CHECKSUM_PREFIX + pubkey + bytes((version,))).digest()[:2]


def encode_onion_address(pubkey: bytes) -> str:
    """``<56 base32 chars>.onion`` (lower case, as tor writes it) for an identity key."""
    if len(pubkey) != 32:
        raise ValueError("an onion service identity key is 32 bytes")
    raw = pubkey + onion_checksum(pubkey) + bytes((VERSION,))
    return base64.b32encode(raw).decode("ascii").lower() + ONION_SUFFIX


def is_onion_name(host: str) -> bool:
    """True if ``host`` is in the .onion domain (whatever comes before it)."""
    return host.rstrip(".").lower().endswith(ONION_SUFFIX)


@dataclass(frozen=True, slots=True)
class OnionAddress:
    """A checked v3 onion address: the identity key and any subdomain the user gave."""

    pubkey: bytes
    subdomain: str = ""

    def __str__(self) -> str:
        return encode_onion_address(self.pubkey)

    @property
    def label(self) -> str:
        """The 56-character label without ``.onion`` (what tor's ``hostname`` file shows first)."""
        return str(self)[:-len(ONION_SUFFIX)]


def parse_onion_address(host: str, *, allow_subdomain: bool = True) -> OnionAddress:
    """Decode and validate a v3 ``.onion`` name.

    Raises:
        OnionAddressMalformed: not in .onion, wrong length or alphabet, version byte not 3,
            a subdomain when ``allow_subdomain`` is false, or a key with a torsion component.
        OnionAddressChecksumError: everything else is right but the checksum does not match.
    """
    name = host.rstrip(".").lower() if isinstance(host, str) else ""
    if not name.endswith(ONION_SUFFIX):
        raise OnionAddressMalformed("not a .onion name")
    labels = name[:-len(ONION_SUFFIX)].split(".")
    label, subdomain = labels[-1], ".".join(labels[:-1])
    if subdomain and not allow_subdomain:
        raise OnionAddressMalformed(".onion address with a subdomain where none is allowed")
    if len(label) != _ENCODED_LEN:
        raise OnionAddressMalformed(
            f"a v3 onion address has {_ENCODED_LEN} base32 characters, this one has {len(label)}")
    try:
        raw = base64.b32decode(label.upper())
    except (binascii.Error, ValueError):
        raise OnionAddressMalformed("onion address is not base32") from None
    pubkey, checksum, version = raw[:32], raw[32:34], raw[34]
    if version != VERSION:  # checked before the checksum: another version may sum differently
        raise OnionAddressMalformed(f"onion address version {version}, only 3 is supported")
    if checksum != onion_checksum(pubkey, version):
        raise OnionAddressChecksumError("onion address checksum does not match (a typo?)")
    if not is_torsion_free_point(pubkey):
        raise OnionAddressMalformed("onion address key is not a valid Ed25519 key")
    return OnionAddress(pubkey, subdomain)
