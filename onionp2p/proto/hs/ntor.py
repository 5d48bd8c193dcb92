"""The hs-ntor handshake (rend-spec-v3 §3.3.2 [NTOR-WITH-EXTRA-DATA], §4.2.1).

Theory of operation
-------------------
hs-ntor is ntor with a twist: the client can encrypt data to the service *in its first
message*, before any reply. The service publishes, per introduction point, an x25519 key
``B`` (``enc-key ntor`` in the descriptor) and an Ed25519 ``AUTH_KEY`` (the intro point's
``auth-key``). The client picks ``x, X`` and computes, with SHAKE-256 as KDF::

    intro_secret_hs_input = EXP(B,x) | AUTH_KEY | X | B | PROTOID
    ENC_KEY | MAC_KEY     = KDF(intro_secret_hs_input | t_hsenc | m_hsexpand | N_hs_subcred, 64)

It encrypts its INTRODUCE1 payload with AES-256-CTR under ENC_KEY (IV zero) and MACs
*the whole cell up to the MAC* -- the cleartext header, ``X`` and the ciphertext -- with
``MAC(k, m) = SHA3-256(INT_8(len(k)) | k | m)``. Because the subcredential is mixed in,
only someone who knows the onion address can produce or read an introduction.

The service, holding ``b``, recomputes the same keys, checks the MAC, decrypts, and answers
in RENDEZVOUS1 with ``Y`` and ``AUTH_INPUT_MAC``::

    rend_secret_hs_input = EXP(X,y) | EXP(X,b) | AUTH_KEY | B | X | Y | PROTOID
    NTOR_KEY_SEED        = MAC(rend_secret_hs_input, t_hsenc)
    verify               = MAC(rend_secret_hs_input, t_hsverify)
    AUTH_INPUT_MAC       = MAC(verify | AUTH_KEY | B | Y | X | PROTOID | "Server", t_hsmac)

The client checks ``AUTH_INPUT_MAC`` and both sides expand
``SHAKE-256(NTOR_KEY_SEED | m_hsexpand)`` into ``Df | Db | Kf | Kb`` (32 bytes each): the
end-to-end hop with SHA3-256 digests and AES-256 keys. The client encrypts with Kf, the
service with Kb.

The module is pure: keys come in as arguments (``x``/``y`` may be given for test vectors,
otherwise fresh ones are generated), bytes come out. Failures from peer bytes raise
:class:`~onionp2p.errors.HandshakeError`.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from onionp2p.errors import HandshakeError

__all__ = [
    "MAC_LEN",
    "PROTOID",
    "HsCircuitKeys",
    "HsNtorClient",
    "IntroKeys",
    "ServiceIntro",
    "aes256ctr",
    "expand_circuit_keys",
    "hs_mac",
    "intro_keys",
    "rend_keys",
    "service_receive_intro",
]

PROTOID = b"tor-hs-ntor-curve25519-sha3-256-1"
T_HSENC = PROTOID + b":hs_key_extract"
T_HSVERIFY = PROTOID + b":hs_verify"
T_HSMAC = PROTOID + b":hs_mac"
M_HSEXPAND = PROTOID + b":hs_key_expand"
MAC_LEN = 32
KEY_LEN = 32


def hs_mac(key: bytes, message: bytes) -> bytes:
    """rend-spec-v3's MAC: ``SHA3-256(INT_8(len(key)) | key | message)``."""
    return hashlib.sha3_256(len(key).to_bytes(8, "big") + key + message).digest()


def aes256ctr(key: bytes, data: bytes, iv: bytes = bytes(16)) -> bytes:
    """AES-256-CTR (encryption and decryption are the same operation)."""
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def _dh(secret: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return secret.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the shared secret would be all zero
        raise HandshakeError("hs-ntor: peer key gives an all-zero shared secret") from None


def _raw_public(secret: X25519PrivateKey) -> bytes:
    return secret.public_key().public_bytes_raw()


@dataclass(frozen=True, slots=True)
class IntroKeys:
    """ENC_KEY and MAC_KEY for one INTRODUCE1 cell."""

    enc_key: bytes = field(repr=False)
    mac_key: bytes = field(repr=False)


def intro_keys(dh_bx: bytes, auth_key: bytes, client_pk: bytes, enc_pk: bytes,
               subcred: bytes) -> IntroKeys:
    """The INTRODUCE1 keys from ``EXP(B,x)`` (same value as ``EXP(X,b)``)."""
    secret_input = dh_bx + auth_key + client_pk + enc_pk + PROTOID
    keys = hashlib.shake_256(secret_input + T_HSENC + M_HSEXPAND + subcred).digest(KEY_LEN + MAC_LEN)
    return IntroKeys(keys[:KEY_LEN], keys[KEY_LEN:])


def rend_keys(dh_xy: bytes, dh_xb: bytes, auth_key: bytes, enc_pk: bytes, client_pk: bytes,
              server_pk: bytes) -> tuple[bytes, bytes]:
    """``(NTOR_KEY_SEED, AUTH_INPUT_MAC)`` from the two shared secrets."""
    secret_input = dh_xy + dh_xb + auth_key + enc_pk + client_pk + server_pk + PROTOID
    seed = hs_mac(secret_input, T_HSENC)
    verify = hs_mac(secret_input, T_HSVERIFY)
    auth_input = verify + auth_key + enc_pk + server_pk + client_pk + PROTOID + b"Server"
    return seed, hs_mac(auth_input, T_HSMAC)


@dataclass(frozen=True, slots=True)
class HsCircuitKeys:
    """The end-to-end hop's keys: forward/backward SHA3-256 digest seeds and AES-256 keys."""

    df: bytes = field(repr=False)
    db: bytes = field(repr=False)
    kf: bytes = field(repr=False)
    kb: bytes = field(repr=False)

    def key_material(self, *, service_side: bool = False) -> bytes:
        """The 128 bytes the end-to-end layer (relay crypto "hs") takes: ``Df | Db | Kf | Kb``
        for the client, directions swapped for the service (tor's ``relay_crypto_init`` with
        ``is_hs_v3`` and the service side: it sends with Kb/Db and receives with Kf/Df)."""
        if service_side:
            return self.db + self.df + self.kb + self.kf
        return self.df + self.db + self.kf + self.kb


def expand_circuit_keys(ntor_key_seed: bytes) -> HsCircuitKeys:
    """``SHAKE-256(NTOR_KEY_SEED | m_hsexpand)`` split into Df, Db, Kf, Kb (§4.2.1)."""
    k = hashlib.shake_256(ntor_key_seed + M_HSEXPAND).digest(4 * 32)
    return HsCircuitKeys(k[:32], k[32:64], k[64:96], k[96:])


def _check_len(value: bytes, n: int, what: str) -> bytes:
    if len(value) != n:
        raise ValueError(f"{what} must be {n} bytes, got {len(value)}")
    return bytes(value)


class HsNtorClient:
    """The client side: build the encrypted part of INTRODUCE1, then check RENDEZVOUS2."""

    def __init__(self, enc_key: bytes, auth_key: bytes, subcred: bytes, *,
                 secret: X25519PrivateKey | None = None):
        self.enc_key = _check_len(enc_key, 32, "the service's enc-key (B)")
        self.auth_key = _check_len(auth_key, 32, "the intro point auth-key")
        self.subcred = _check_len(subcred, 32, "the subcredential")
        self._x = secret if secret is not None else X25519PrivateKey.generate()
        self.client_pk = _raw_public(self._x)
        self.keys = intro_keys(_dh(self._x, self.enc_key), self.auth_key, self.client_pk, self.enc_key,
                               self.subcred)

    def encrypt_intro(self, header: bytes, plaintext: bytes) -> bytes:
        """``X | ENCRYPTED_DATA | MAC`` to append to the INTRODUCE1 ``header`` (everything
        before the encrypted section: legacy key id, auth key, extensions)."""
        ciphertext = aes256ctr(self.keys.enc_key, plaintext)
        body = self.client_pk + ciphertext
        return body + hs_mac(self.keys.mac_key, header + body)

    def complete(self, handshake_info: bytes) -> bytes:
        """Check RENDEZVOUS2's ``Y | AUTH_INPUT_MAC``; return NTOR_KEY_SEED.

        Raises HandshakeError if the message is malformed or the MAC does not match.
        """
        if len(handshake_info) < 32 + MAC_LEN:
            raise HandshakeError("hs-ntor: RENDEZVOUS2 handshake info is too short")
        server_pk, auth = bytes(handshake_info[:32]), bytes(handshake_info[32:32 + MAC_LEN])
        seed, expected = rend_keys(_dh(self._x, server_pk), _dh(self._x, self.enc_key), self.auth_key,
                                   self.enc_key, self.client_pk, server_pk)
        if not hmac.compare_digest(expected, auth):
            raise HandshakeError("hs-ntor: AUTH_INPUT_MAC does not match")
        return seed


@dataclass(frozen=True, slots=True)
class ServiceIntro:
    """What the service learns from one INTRODUCE2: the plaintext and the client's key."""

    plaintext: bytes
    client_pk: bytes

    def reply(self, enc_secret: X25519PrivateKey, auth_key: bytes, *,
              secret: X25519PrivateKey | None = None) -> tuple[bytes, bytes]:
        """``(Y | AUTH_INPUT_MAC for RENDEZVOUS1, NTOR_KEY_SEED)``."""
        y = secret if secret is not None else X25519PrivateKey.generate()
        server_pk = _raw_public(y)
        seed, auth = rend_keys(_dh(y, self.client_pk), _dh(enc_secret, self.client_pk), auth_key,
                               _raw_public(enc_secret), self.client_pk, server_pk)
        return server_pk + auth, seed


def service_receive_intro(enc_secret: X25519PrivateKey, auth_key: bytes, subcred: bytes, header: bytes,
                          encrypted: bytes) -> ServiceIntro:
    """Check and decrypt INTRODUCE2's encrypted section ``X | ENCRYPTED_DATA | MAC``.

    ``header`` is the cell body before that section (it is covered by the MAC).
    Raises HandshakeError if the section is too short or the MAC does not match.
    """
    if len(encrypted) < 32 + MAC_LEN:
        raise HandshakeError("hs-ntor: INTRODUCE2 encrypted section is too short")
    client_pk = bytes(encrypted[:32])
    ciphertext = bytes(encrypted[32:-MAC_LEN])
    enc_pk = _raw_public(enc_secret)
    keys = intro_keys(_dh(enc_secret, client_pk), _check_len(auth_key, 32, "auth key"), client_pk, enc_pk,
                      _check_len(subcred, 32, "subcredential"))
    if not hmac.compare_digest(hs_mac(keys.mac_key, bytes(header) + bytes(encrypted[:-MAC_LEN])),
                               bytes(encrypted[-MAC_LEN:])):
        raise HandshakeError("hs-ntor: INTRODUCE2 MAC does not match")
    return ServiceIntro(aes256ctr(keys.enc_key, ciphertext), client_pk)
