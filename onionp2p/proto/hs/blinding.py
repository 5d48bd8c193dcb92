"""Time periods, key blinding, subcredentials and the HSDir hash ring (rend-spec-v3 §2.1-2.3, A.2).

Theory of operation
-------------------
An onion service never shows its identity key ``A`` to the directories. Time is cut into
*periods* (``hsdir_interval`` minutes, 1440 by default), numbered from the Unix epoch
shifted by a *rotation offset* of twelve voting intervals (12:00 UTC with the usual one-hour
interval), so a period runs from noon to noon while shared-random values change at
midnight. For each period the service derives a *blinded* key pair from ``A``:

* ``h = SHA3-256("Derive temporary signing key\\0" | A | s | B | N)`` with ``s`` empty
  (tor never uses the optional secret), ``B`` the base point written out in decimal and
  ``N = "key-blind" | INT_8(period_number) | INT_8(period_length)``; ``h`` is clamped
  like an Ed25519 scalar;
* the blinded public key is ``A' = h·A`` (anyone who knows the address can compute it);
* the blinded secret scalar is ``a' = h·a mod ℓ`` with the nonce prefix
  ``SHA-512("Derive temporary signing key hash input" | prefix)[:32]``: an ordinary Ed25519
  key, so its signatures verify with any Ed25519 verifier under ``A'``.

``A'`` names the descriptor on the directories and signs a short-lived *descriptor signing
key* (certificate type 08). The *credential* ``SHA3-256("credential" | A)`` and the
period's *subcredential* ``SHA3-256("subcredential" | credential | A')`` key the
descriptor's encryption and the introduction handshake, so only someone who knows the
address can read the descriptor.

Where a descriptor lives: each HSDir relay sits on a ring at
``SHA3-256("node-idx" | ed25519_id | SRV | INT_8(period_number) | INT_8(period_length))``
and each of the ``hsdir_n_replicas`` copies of a descriptor at
``SHA3-256("store-at-idx" | A' | INT_8(replica) | INT_8(period_length) | INT_8(period_number))``
(note the two orders of the period fields, as the spec and tor have them). ``SRV`` is the
shared-random value of the consensus; without one, both sides use
``SHA3-256("shared-random-disaster" | INT_8(period_length) | INT_8(period_number))``.

Nothing here reads the clock: every function takes the time or the period as an argument.
The group operations are libsodium's (:mod:`onionp2p.proto.ed25519x`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from onionp2p.proto.certs import CertType, Ed25519Cert, KeyType, expiry_hours
from onionp2p.proto.ed25519x import ExpandedKey, blind_public, clamp

__all__ = [
    "BLIND_STRING",
    "DEFAULT_PERIOD_LENGTH",
    "DEFAULT_ROTATION_OFFSET",
    "DESC_CERT_LIFETIME",
    "TimePeriod",
    "blind_public_key",
    "blind_secret_key",
    "blinding_factor",
    "credential",
    "desc_signing_cert",
    "disaster_srv",
    "hs_index",
    "hsdir_index",
    "subcredential",
]

#: rend-spec-v3 §2.2.1: default ``hsdir-interval``, minutes.
DEFAULT_PERIOD_LENGTH = 1440
#: Twelve one-hour voting intervals, minutes: periods start at 12:00 UTC.
DEFAULT_ROTATION_OFFSET = 12 * 60
#: tor's HS_DESC_CERT_LIFETIME: the descriptor-signing-key certificate lives 54 hours.
DESC_CERT_LIFETIME = 54 * 3600

BLIND_STRING = b"Derive temporary signing key\x00"
_PREFIX_BLIND_STRING = b"Derive temporary signing key hash input"
_BASEPOINT_STRING = (b"(15112221349535400772501151409588531511454012693041857206046113283949847762202, "
                     b"46316835694926478169428394003475163141307993866256225615783033603165251855960)")


def _u64(n: int) -> bytes:
    return (n % (1 << 64)).to_bytes(8, "big")


def _sha3(*parts: bytes) -> bytes:
    return hashlib.sha3_256(b"".join(parts)).digest()


@dataclass(frozen=True, slots=True, order=True)
class TimePeriod:
    """One time period: its number, its length and the rotation offset (both in minutes)."""

    number: int
    length: int = DEFAULT_PERIOD_LENGTH
    offset: int = DEFAULT_ROTATION_OFFSET

    def __post_init__(self) -> None:
        # The consensus parameter's range is 30..14400; a TestingTorNetwork uses one
        # shared-random run instead (24 voting intervals: 4 minutes with 10-second votes).
        if not 1 <= self.length <= 14400:
            raise ValueError(f"a time period is 1..14400 minutes, not {self.length}")
        if self.number < 0:
            raise ValueError("time period numbers start at 0")

    @classmethod
    def at(cls, now: float, length: int = DEFAULT_PERIOD_LENGTH,
           offset: int = DEFAULT_ROTATION_OFFSET) -> TimePeriod:
        """The period containing unix time ``now`` (use the consensus valid-after, not the clock)."""
        minutes = math.floor(now / 60) - offset
        return cls(minutes // length, length, offset)

    @property
    def start(self) -> int:
        """Unix time when the period begins (inclusive)."""
        return (self.number * self.length + self.offset) * 60

    @property
    def end(self) -> int:
        """Unix time when the next period begins (exclusive end of this one)."""
        return self.start + self.length * 60

    def next(self) -> TimePeriod:
        return TimePeriod(self.number + 1, self.length, self.offset)

    def prev(self) -> TimePeriod:
        return TimePeriod(self.number - 1, self.length, self.offset)


# -- blinding (A.2) -----------------------------------------------------------------------------


def blinding_factor(identity: bytes, period: TimePeriod) -> bytes:
    """``h`` of rend-spec-v3 A.2 before clamping (the optional secret ``s`` is empty, as in tor)."""
    if len(identity) != 32:
        raise ValueError("an identity key is 32 bytes")
    nonce = b"key-blind" + _u64(period.number) + _u64(period.length)
    return _sha3(BLIND_STRING, identity, _BASEPOINT_STRING, nonce)


def blind_public_key(identity: bytes, period: TimePeriod) -> bytes:
    """``A' = h·A``: the blinded public key a client computes from an onion address."""
    return blind_public(identity, clamp(blinding_factor(identity, period)))


def blind_secret_key(identity: ExpandedKey, period: TimePeriod) -> ExpandedKey:
    """The blinded key pair ``(h·a mod ℓ, SHA-512(string | prefix)[:32])``; public part ``A'``."""
    prefix = hashlib.sha512(_PREFIX_BLIND_STRING + identity.prefix).digest()[:32]
    return identity.blind(clamp(blinding_factor(identity.public, period)), prefix)


def credential(identity: bytes) -> bytes:
    """``N_hs_cred = SHA3-256("credential" | A)``."""
    return _sha3(b"credential", identity)


def subcredential(identity: bytes, blinded: bytes) -> bytes:
    """``N_hs_subcred = SHA3-256("subcredential" | N_hs_cred | A')``."""
    return _sha3(b"subcredential", credential(identity), blinded)


# -- hash ring (§2.2.3, §2.3.1) -----------------------------------------------------------------


def hs_index(blinded: bytes, replica: int, period: TimePeriod) -> bytes:
    """Where replica ``replica`` (1-based) of a descriptor sits on the ring."""
    return _sha3(b"store-at-idx", blinded, _u64(replica), _u64(period.length), _u64(period.number))


def hsdir_index(node_ed25519_id: bytes, srv: bytes, period: TimePeriod) -> bytes:
    """Where the HSDir with Ed25519 identity ``node_ed25519_id`` sits on the ring for ``srv``."""
    if len(node_ed25519_id) != 32 or len(srv) != 32:
        raise ValueError("the Ed25519 identity and the shared-random value are 32 bytes")
    return _sha3(b"node-idx", node_ed25519_id, srv, _u64(period.number), _u64(period.length))


def disaster_srv(period: TimePeriod) -> bytes:
    """The shared-random value to use when the consensus has none (§2.3.1)."""
    return _sha3(b"shared-random-disaster", _u64(period.length), _u64(period.number))


# -- descriptor signing key certificate (§2.4) ---------------------------------------------------


def desc_signing_cert(blinded: ExpandedKey, signing_public: bytes, *, now: float,
                      lifetime: float = DESC_CERT_LIFETIME) -> Ed25519Cert:
    """The type-08 certificate: the blinded key vouches for the descriptor signing key.

    The blinded public key goes into the signed-with-ed25519-key extension (the spec
    requires it: a client checks it against the ``A'`` it derived from the address).
    """
    return Ed25519Cert.create(CertType.HS_BLINDED_ID_V_SIGNING, signing_public, blinded,
                              expires_hours=expiry_hours(now + lifetime), key_type=KeyType.ED25519)
