"""Ed25519 with *expanded* secret keys: signing with a scalar that is not derived from a seed.

Why this exists
---------------
``cryptography``'s Ed25519 keys are 32-byte seeds: the secret scalar and the nonce prefix are
derived from the seed by SHA-512 and never exposed. Two parts of Tor's protocol sign with a
secret scalar that has no seed:

* **ntor-onion-key-crosscert** (dir-spec, prop 228): a relay proves it holds its ntor onion
  key (Curve25519) by signing an Ed25519 certificate with the Ed25519 key that has the *same*
  secret scalar. The prefix is derived as ``SHA512(k | "Derive high part of ed25519 key from
  curve25519 key\\0")[:32]``; the public key's sign bit goes into the descriptor.
* **Onion-service key blinding** (rend-spec-v3 A.2): the blinded signing key's scalar is the
  product of a hash and the identity scalar.

Both are plain Ed25519 signatures (RFC 8032 §5.1.6 with a given ``(a, prefix)``) that any
Ed25519 verifier accepts. No arithmetic is written here: every group and scalar operation is
libsodium's (PyNaCl's ``crypto_scalarmult_ed25519_base_noclamp``,
``crypto_core_ed25519_scalar_*``), the hashes are ``hashlib``'s; this module only composes
them in the order RFC 8032 gives. specs/keys.md §"Expanded Ed25519 keys" states the design.

The only non-secret arithmetic done in Python is :func:`ed25519_public_from_curve25519`
(``y = (u - 1) / (u + 1) mod p``, on public values), which a verifier uses to check a
cross-certificate; no secret passes through it, so timing does not matter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from nacl import bindings as _na

__all__ = [
    "CURVE25519_PREFIX_STRING",
    "ExpandedKey",
    "blind_public",
    "clamp",
    "ed25519_public_from_curve25519",
    "is_torsion_free_point",
]

CURVE25519_PREFIX_STRING = b"Derive high part of ed25519 key from curve25519 key\x00"
_P = 2**255 - 19


def clamp(k: bytes) -> bytes:
    """X25519/Ed25519 clamping of a 32-byte secret (RFC 7748 §5): what tor stores as the secret."""
    if len(k) != 32:
        raise ValueError("a secret scalar is 32 bytes")
    b = bytearray(k)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)


def _reduce64(h: bytes) -> bytes:
    return _na.crypto_core_ed25519_scalar_reduce(h)


def _reduce32(s: bytes) -> bytes:
    return _na.crypto_core_ed25519_scalar_reduce(s + bytes(32))


@dataclass(frozen=True, slots=True)
class ExpandedKey:
    """An Ed25519 secret as (scalar ``a``, nonce ``prefix``) with its public key ``A = a·B``.

    ``scalar`` is kept as given (clamped, not reduced, like ref10's expanded keys); it is reduced
    mod ℓ where it enters a signature. The public key is computed, never taken on trust.
    """

    scalar: bytes
    prefix: bytes
    public: bytes

    @classmethod
    def from_parts(cls, scalar: bytes, prefix: bytes) -> ExpandedKey:
        if len(scalar) != 32 or len(prefix) != 32:
            raise ValueError("an expanded Ed25519 key is a 32-byte scalar and a 32-byte prefix")
        if scalar[31] & 0x80:
            raise ValueError("scalar must be below 2^255 (clamped or reduced)")
        return cls(scalar, prefix, _na.crypto_scalarmult_ed25519_base_noclamp(scalar))

    @classmethod
    def from_seed(cls, seed: bytes) -> ExpandedKey:
        """The expanded form of an RFC 8032 seed (what ``Ed25519PrivateKey`` hides)."""
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        h = hashlib.sha512(seed).digest()
        return cls.from_parts(clamp(h[:32]), h[32:])

    @classmethod
    def from_curve25519(cls, x25519_secret: bytes) -> tuple[ExpandedKey, int]:
        """Tor's Ed25519 twin of a Curve25519 secret (prop 228) and the sign bit of its public key.

        The secret is clamped first (tor keeps Curve25519 secrets clamped; ``cryptography``
        returns them as generated), then used as the scalar and hashed for the prefix.
        """
        k = clamp(x25519_secret)
        prefix = hashlib.sha512(k + CURVE25519_PREFIX_STRING).digest()[:32]
        key = cls.from_parts(k, prefix)
        return key, key.public[31] >> 7

    def blind(self, factor: bytes, prefix: bytes) -> ExpandedKey:
        """The key with scalar ``factor · a mod ℓ`` and the given nonce ``prefix``.

        The public key of the result is ``factor · A`` (see :func:`blind_public`), so a
        signature made with it verifies under the blinded public key. How ``factor`` and the
        new ``prefix`` are derived is the caller's protocol (rend-spec-v3 A.2 for onion
        services, in :mod:`onionp2p.proto.hs.blinding`); this is only the group operation.
        """
        if len(factor) != 32:
            raise ValueError("a blinding factor is 32 bytes")
        scalar = _na.crypto_core_ed25519_scalar_mul(_reduce32(factor), _reduce32(self.scalar))
        return ExpandedKey.from_parts(scalar, prefix)

    def sign(self, message: bytes) -> bytes:
        """An RFC 8032 Ed25519 signature of ``message`` (64 bytes: R | S)."""
        r = _reduce64(hashlib.sha512(self.prefix + message).digest())
        big_r = _na.crypto_scalarmult_ed25519_base_noclamp(r)
        k = _reduce64(hashlib.sha512(big_r + self.public + message).digest())
        s = _na.crypto_core_ed25519_scalar_add(r, _na.crypto_core_ed25519_scalar_mul(k, _reduce32(self.scalar)))
        return big_r + s


def blind_public(public: bytes, factor: bytes) -> bytes:
    """``factor · A`` for an Ed25519 public key ``A`` (libsodium, no clamping of ``factor``).

    Raises ValueError if ``A`` is not a valid point of the prime-order subgroup or the
    product is the identity (libsodium refuses both).
    """
    if len(public) != 32 or len(factor) != 32:
        raise ValueError("a public key and a factor are 32 bytes each")
    if not is_torsion_free_point(public):
        raise ValueError("not an Ed25519 point of the prime-order subgroup")
    try:
        return _na.crypto_scalarmult_ed25519_noclamp(factor, public)
    except RuntimeError as exc:  # libsodium refused: the product is the identity
        raise ValueError(f"blinding failed: {exc}") from None


def is_torsion_free_point(public: bytes) -> bool:
    """True if ``public`` encodes a canonical Ed25519 point in the prime-order subgroup.

    libsodium's ``crypto_core_ed25519_is_valid_point`` rejects non-canonical encodings,
    points of small order and points with a torsion component (``ℓ·P ≠ 0``): what
    rend-spec-v3 §2.2.7 asks a client to check before using an onion address.
    """
    return len(public) == 32 and bool(_na.crypto_core_ed25519_is_valid_point(bytes(public)))


def ed25519_public_from_curve25519(u: bytes, sign_bit: int) -> bytes:
    """The Ed25519 public key whose Montgomery form is ``u`` (prop 228: ``y = (u-1)/(u+1)``).

    Public values only. Raises ValueError for ``u = -1`` (no Edwards point).
    """
    if len(u) != 32 or sign_bit not in (0, 1):
        raise ValueError("u is 32 bytes and the sign bit 0 or 1")
    un = int.from_bytes(u, "little") & ((1 << 255) - 1)
    if (un + 1) % _P == 0:
        raise ValueError("u = -1 has no Edwards point")
    y = (un - 1) * pow(un + 1, _P - 2, _P) % _P
    out = bytearray(y.to_bytes(32, "little"))
    out[31] |= sign_bit << 7
    return bytes(out)
