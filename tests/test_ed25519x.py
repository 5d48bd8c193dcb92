"""Expanded-key Ed25519 (onionp2p/proto/ed25519x.py): signatures any verifier accepts, tor's curve25519 twin."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from onionp2p.proto.ed25519x import ExpandedKey, clamp, ed25519_public_from_curve25519

RAW = (Encoding.Raw, PublicFormat.Raw)


def test_expanded_from_seed_signs_byte_exact_like_rfc8032():
    """Deterministic Ed25519: our (a, prefix) signing equals cryptography's seed signing, byte for byte."""
    for i in range(20):
        seed = hashlib.sha256(b"seed%d" % i).digest()
        ref = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        key = ExpandedKey.from_seed(seed)
        assert key.public == ref.public_key().public_bytes(*RAW)
        msg = os.urandom(i * 7)
        assert key.sign(msg) == ref.sign(msg)


def test_rfc8032_test_vector_1():
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = ExpandedKey.from_seed(seed)
    assert key.public.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert key.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def test_curve25519_twin_matches_conversion_and_signs():
    for _ in range(20):
        # Unclamped raw secrets, as a key file may hold them: the twin must clamp as tor does.
        xk = x25519.X25519PrivateKey.from_private_bytes(bytes([0xFF]) + os.urandom(30) + bytes([0xFF]))
        secret = xk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        key, sign_bit = ExpandedKey.from_curve25519(secret)
        u = xk.public_key().public_bytes(*RAW)
        # What a verifier (a tor authority) computes from the ntor key and the descriptor's sign bit.
        assert ed25519_public_from_curve25519(u, sign_bit) == key.public
        assert ed25519_public_from_curve25519(u, sign_bit ^ 1) != key.public
        msg = os.urandom(64)
        ed25519.Ed25519PublicKey.from_public_bytes(key.public).verify(key.sign(msg), msg)
        # The scalar is the clamped Curve25519 secret itself: clamping is idempotent.
        assert key.scalar == clamp(secret) == clamp(key.scalar)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        ExpandedKey.from_parts(bytes(31), bytes(32))
    with pytest.raises(ValueError):
        ExpandedKey.from_parts(b"\xff" * 32, bytes(32))
    with pytest.raises(ValueError):
        ed25519_public_from_curve25519(((1 << 255) - 20).to_bytes(32, "little"), 0)
