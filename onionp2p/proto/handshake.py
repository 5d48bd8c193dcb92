"""Circuit-extension handshakes: ntor (HTYPE 2) and ntor v3 (HTYPE 3), sans-IO.

Theory of operation
-------------------
A client that wants to add a hop to a circuit sends a *client handshake* (the
"onion skin") inside CREATE2/EXTEND2 and gets a *server handshake* back inside
CREATED2/EXTENDED2. Both sides end up with the same *key material*, which the
caller splits into ``Df | Db | Kf | Kb`` (see :mod:`onionp2p.proto.relaycrypto`).

**ntor** (tor-spec §5.1.4 "The ntor handshake"). The relay has a long-term
identity digest ``ID`` (SHA-1 of its RSA identity key, 20 bytes) and a medium-term
X25519 onion key ``b, B``. The client makes an ephemeral pair ``x, X`` and sends
``ID | B | X`` (84 bytes). The relay makes an ephemeral ``y, Y`` and computes::

    secret_input = EXP(X,y) | EXP(X,b) | ID | B | X | Y | PROTOID
    KEY_SEED     = HMAC-SHA256(key=t_key,    msg=secret_input)
    verify       = HMAC-SHA256(key=t_verify, msg=secret_input)
    AUTH         = HMAC-SHA256(key=t_mac, msg=verify | ID | B | Y | X | PROTOID | "Server")

and answers ``Y | AUTH`` (64 bytes). The client recomputes ``secret_input`` from
``EXP(Y,x) | EXP(B,x)`` and checks AUTH in constant time. Key material is
``HKDF-SHA256(IKM=secret_input, salt=t_key, info=m_expand)`` (RFC 5869): the
HKDF-Extract step with salt ``t_key`` is exactly ``KEY_SEED``.

Every DH output is checked for the all-zero value (a low-order public key), and
OpenSSL's own refusal of such keys is mapped to :class:`HandshakeError`.

**ntor v3** (proposal 332; tor-spec "The ntor-v3 handshake"). Adds an encrypted,
authenticated client message (CM, not forward secret), an encrypted reply (SM), a
32-byte Ed25519 relay identity and a verification string (``"circuit extend"`` for
circuit extension). Primitives are SHA3-256, SHAKE-256 and AES-256-CTR, each
"tweaked" by a length-prefixed tag. See ``specs/handshake.md`` for the formulas.

Nothing here touches the network, the clock or global state; randomness comes
only from fresh X25519 keys, which tests may inject through ``ephemeral=``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.constant_time import bytes_eq
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from onionp2p.errors import HandshakeError, LocalProtocolError, ProtocolError

__all__ = [
    "HTYPE_NTOR",
    "HTYPE_NTOR_V3",
    "NTOR_ONIONSKIN_LEN",
    "NTOR_REPLY_LEN",
    "KEY_MATERIAL_LEN",
    "NTOR_PROTOID",
    "NTOR_V3_PROTOID",
    "NTOR_V3_CIRC_VERIFICATION",
    "NTOR_V3_MIN_ONIONSKIN_LEN",
    "NTOR_V3_MIN_REPLY_LEN",
    "hkdf_sha256",
    "NtorClient",
    "ntor_server",
    "NtorV3Client",
    "ntor_v3_server",
    "encode_extensions",
    "parse_extensions",
]

HTYPE_NTOR = 2
HTYPE_NTOR_V3 = 3
NTOR_ONIONSKIN_LEN = 84  # ID[20] | B[32] | X[32]
NTOR_REPLY_LEN = 64  # Y[32] | AUTH[32]
KEY_MATERIAL_LEN = 72  # Df[20] | Db[20] | Kf[16] | Kb[16]

_ID_LEN = 20
_KEY_LEN = 32
_MAX_KEY_MATERIAL = 255 * 32  # HKDF-SHA256 output limit (RFC 5869)
_ZERO32 = bytes(32)

NTOR_PROTOID = b"ntor-curve25519-sha256-1"
_T_MAC = NTOR_PROTOID + b":mac"
_T_KEY = NTOR_PROTOID + b":key_extract"
_T_VERIFY = NTOR_PROTOID + b":verify"
_M_EXPAND = NTOR_PROTOID + b":key_expand"
_SERVER = b"Server"


# --------------------------------------------------------------------------- helpers


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256 (tor-spec §5.2.2 "KDF-RFC5869")."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(bytes(ikm))


def _hmac_sha256(key: bytes, msg: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(msg)
    return h.finalize()


def _check_length(length: int) -> None:
    if not isinstance(length, int) or not 1 <= length <= _MAX_KEY_MATERIAL:
        raise LocalProtocolError(f"key material length must be 1..{_MAX_KEY_MATERIAL}, got {length!r}")


def _as_bytes(data: object, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"{what} must be bytes, got {type(data).__name__}")
    return bytes(data)


def _dh(priv: X25519PrivateKey, pub: bytes) -> bytes:
    """X25519 with the all-zero check. ``pub`` is untrusted."""
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(pub))
    except ValueError as exc:  # OpenSSL refuses low-order points itself
        raise HandshakeError("degenerate X25519 public key") from exc
    if bytes_eq(shared, _ZERO32):
        raise HandshakeError("all-zero X25519 output")
    return shared


def _pub(priv: X25519PrivateKey) -> bytes:
    return priv.public_key().public_bytes_raw()


def _ntor_auth_and_seed(
    xy: bytes, xb: bytes, node_id: bytes, b_pub: bytes, x_pub: bytes, y_pub: bytes
) -> tuple[bytes, bytes]:
    """Return (AUTH, secret_input) for ntor v1; shared by both sides."""
    secret_input = xy + xb + node_id + b_pub + x_pub + y_pub + NTOR_PROTOID
    verify = _hmac_sha256(_T_VERIFY, secret_input)
    auth = _hmac_sha256(_T_MAC, verify + node_id + b_pub + y_pub + x_pub + NTOR_PROTOID + _SERVER)
    return auth, secret_input


# --------------------------------------------------------------------------- ntor v1


class NtorClient:
    """Client side of one ntor handshake (tor-spec §5.1.4).

    ``relay_id`` is the relay's 20-byte RSA identity digest, ``onion_key`` its 32-byte
    X25519 onion key ``B``. Send :attr:`onion_skin`, then feed the reply to
    :meth:`complete` exactly once.
    """

    __slots__ = ("relay_id", "onion_key", "_x", "_x_pub", "_done")

    def __init__(
        self, relay_id: bytes, onion_key: bytes, *, ephemeral: X25519PrivateKey | None = None
    ) -> None:
        relay_id = _as_bytes(relay_id, "relay_id")
        onion_key = _as_bytes(onion_key, "onion_key")
        if len(relay_id) != _ID_LEN:
            raise LocalProtocolError(f"relay_id must be {_ID_LEN} bytes, got {len(relay_id)}")
        if len(onion_key) != _KEY_LEN:
            raise LocalProtocolError(f"onion_key must be {_KEY_LEN} bytes, got {len(onion_key)}")
        self.relay_id = relay_id
        self.onion_key = onion_key
        self._x = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
        self._x_pub = _pub(self._x)
        self._done = False

    @property
    def onion_skin(self) -> bytes:
        """The 84-byte client handshake ``ID | B | X``."""
        return self.relay_id + self.onion_key + self._x_pub

    def complete(self, reply: bytes, *, length: int = KEY_MATERIAL_LEN) -> bytes:
        """Check the relay's ``Y | AUTH`` and return ``length`` bytes of key material."""
        if self._done:
            raise LocalProtocolError("ntor handshake already completed")
        _check_length(length)
        reply = _as_bytes(reply, "reply")
        self._done = True
        if len(reply) != NTOR_REPLY_LEN:
            raise HandshakeError(f"ntor reply must be {NTOR_REPLY_LEN} bytes, got {len(reply)}")
        y_pub, auth = reply[:32], reply[32:]
        yx = _dh(self._x, y_pub)
        bx = _dh(self._x, self.onion_key)
        expected, secret_input = _ntor_auth_and_seed(
            yx, bx, self.relay_id, self.onion_key, self._x_pub, y_pub
        )
        self._x = None  # type: ignore[assignment]  # forget the ephemeral secret
        if not bytes_eq(expected, auth):
            raise HandshakeError("ntor AUTH mismatch")
        return hkdf_sha256(secret_input, _T_KEY, _M_EXPAND, length)


def ntor_server(
    onion_skin: bytes,
    relay_id: bytes,
    onion_keys: Mapping[bytes, X25519PrivateKey],
    *,
    ephemeral: X25519PrivateKey | None = None,
    length: int = KEY_MATERIAL_LEN,
) -> tuple[bytes, bytes]:
    """Relay side of ntor: return ``(reply, key_material)`` (reply = ``Y | AUTH``, 64 bytes).

    ``onion_keys`` maps public onion keys to private keys (current and previous, for
    the rotation grace period). Raises :class:`HandshakeError` on any mismatch.
    """
    _check_length(length)
    onion_skin = _as_bytes(onion_skin, "onion_skin")
    if len(onion_skin) != NTOR_ONIONSKIN_LEN:
        raise HandshakeError(f"ntor onion skin must be {NTOR_ONIONSKIN_LEN} bytes, got {len(onion_skin)}")
    node_id, b_pub, x_pub = onion_skin[:20], onion_skin[20:52], onion_skin[52:84]
    if not bytes_eq(node_id, bytes(relay_id)):
        raise HandshakeError("ntor onion skin is for another relay")
    b_priv = onion_keys.get(b_pub)
    if b_priv is None:
        raise HandshakeError("ntor onion skin names an unknown onion key")
    y = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    y_pub = _pub(y)
    xy = _dh(y, x_pub)
    xb = _dh(b_priv, x_pub)
    auth, secret_input = _ntor_auth_and_seed(xy, xb, node_id, b_pub, x_pub, y_pub)
    return y_pub + auth, hkdf_sha256(secret_input, _T_KEY, _M_EXPAND, length)


# --------------------------------------------------------------------------- ntor v3

NTOR_V3_PROTOID = b"ntor3-curve25519-sha3_256-1"
NTOR_V3_CIRC_VERIFICATION = b"circuit extend"
_T3_MSGKDF = NTOR_V3_PROTOID + b":kdf_phase1"
_T3_MSGMAC = NTOR_V3_PROTOID + b":msg_mac"
_T3_KEY_SEED = NTOR_V3_PROTOID + b":key_seed"
_T3_VERIFY = NTOR_V3_PROTOID + b":verify"
_T3_FINAL = NTOR_V3_PROTOID + b":kdf_final"
_T3_AUTH = NTOR_V3_PROTOID + b":auth_final"
_ED_ID_LEN = 32
NTOR_V3_MIN_ONIONSKIN_LEN = 32 + 32 + 32 + 32  # ID | B | X | MAC (empty message)
NTOR_V3_MIN_REPLY_LEN = 32 + 32  # Y | AUTH (empty message)
_U64 = struct.Struct(">Q")


def _encap(s: bytes) -> bytes:
    return _U64.pack(len(s)) + s


def _h3(s: bytes, tag: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA3_256())
    h.update(_encap(tag))
    h.update(s)
    return h.finalize()


def _mac3(key: bytes, msg: bytes, tag: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA3_256())
    h.update(_encap(tag))
    h.update(_encap(key))
    h.update(msg)
    return h.finalize()


def _kdf3(s: bytes, tag: bytes, length: int) -> bytes:
    h = hashes.Hash(hashes.SHAKE256(digest_size=length))
    h.update(_encap(tag))
    h.update(s)
    return h.finalize()


def _aes256ctr(key: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return enc.update(data) + enc.finalize()


def _v3_phase1(bx: bytes, node_id: bytes, x_pub: bytes, b_pub: bytes, ver: bytes) -> tuple[bytes, bytes]:
    keys = _kdf3(bx + node_id + x_pub + b_pub + NTOR_V3_PROTOID + _encap(ver), _T3_MSGKDF, 64)
    return keys[:32], keys[32:]


def _v3_seed_verify(
    xy: bytes, xb: bytes, node_id: bytes, b_pub: bytes, x_pub: bytes, y_pub: bytes, ver: bytes
) -> tuple[bytes, bytes]:
    """Return (key_seed, verify) for ntor v3; shared by both sides."""
    secret_input = xy + xb + node_id + b_pub + x_pub + y_pub + NTOR_V3_PROTOID + _encap(ver)
    return _h3(secret_input, _T3_KEY_SEED), _h3(secret_input, _T3_VERIFY)


def _v3_auth(
    verify: bytes, node_id: bytes, b_pub: bytes, y_pub: bytes, x_pub: bytes, msg_mac: bytes, enc_sm: bytes
) -> bytes:
    auth_input = (
        verify + node_id + b_pub + y_pub + x_pub + msg_mac + _encap(enc_sm) + NTOR_V3_PROTOID + _SERVER
    )
    return _h3(auth_input, _T3_AUTH)


def _v3_keys(seed: bytes, length: int) -> tuple[bytes, bytes]:
    """Return (ENC_KEY, key material) from the final KDF stream."""
    stream = _kdf3(seed, _T3_FINAL, 32 + length)
    return stream[:32], stream[32:]


class NtorV3Client:
    """Client side of one ntor v3 handshake (proposal 332).

    ``relay_ed_id`` is the relay's 32-byte Ed25519 identity, ``onion_key`` its X25519
    onion key, ``client_message`` the (extension-encoded) message to send encrypted,
    ``verification`` the shared verification string.
    """

    __slots__ = ("relay_ed_id", "onion_key", "verification", "_x", "_x_pub", "_bx", "_skin", "_mac", "_done")

    def __init__(
        self,
        relay_ed_id: bytes,
        onion_key: bytes,
        client_message: bytes = b"",
        verification: bytes = NTOR_V3_CIRC_VERIFICATION,
        *,
        ephemeral: X25519PrivateKey | None = None,
    ) -> None:
        relay_ed_id = _as_bytes(relay_ed_id, "relay_ed_id")
        onion_key = _as_bytes(onion_key, "onion_key")
        client_message = _as_bytes(client_message, "client_message")
        if len(relay_ed_id) != _ED_ID_LEN:
            raise LocalProtocolError(f"relay_ed_id must be {_ED_ID_LEN} bytes, got {len(relay_ed_id)}")
        if len(onion_key) != _KEY_LEN:
            raise LocalProtocolError(f"onion_key must be {_KEY_LEN} bytes, got {len(onion_key)}")
        self.relay_ed_id = relay_ed_id
        self.onion_key = onion_key
        self.verification = _as_bytes(verification, "verification")
        self._x = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
        self._x_pub = _pub(self._x)
        # A degenerate onion key is the relay's (descriptor's) fault: HandshakeError.
        self._bx = _dh(self._x, onion_key)
        enc_k1, mac_k1 = _v3_phase1(self._bx, relay_ed_id, self._x_pub, onion_key, self.verification)
        enc_cm = _aes256ctr(enc_k1, client_message)
        head = relay_ed_id + onion_key + self._x_pub + enc_cm
        self._mac = _mac3(mac_k1, head, _T3_MSGMAC)
        self._skin = head + self._mac
        self._done = False

    @property
    def onion_skin(self) -> bytes:
        """The client handshake ``ID | B | X | ENC(CM) | MAC``."""
        return self._skin

    def complete(self, reply: bytes, *, length: int = KEY_MATERIAL_LEN) -> tuple[bytes, bytes]:
        """Check ``Y | AUTH | ENC(SM)``; return ``(server_message, key_material)``."""
        if self._done:
            raise LocalProtocolError("ntor v3 handshake already completed")
        _check_length(length)
        reply = _as_bytes(reply, "reply")
        self._done = True
        if len(reply) < NTOR_V3_MIN_REPLY_LEN:
            raise HandshakeError(f"ntor v3 reply too short ({len(reply)} bytes)")
        y_pub, auth, enc_sm = reply[:32], reply[32:64], reply[64:]
        yx = _dh(self._x, y_pub)
        seed, verify = _v3_seed_verify(
            yx, self._bx, self.relay_ed_id, self.onion_key, self._x_pub, y_pub, self.verification
        )
        expected = _v3_auth(verify, self.relay_ed_id, self.onion_key, y_pub, self._x_pub, self._mac, enc_sm)
        self._x = None  # type: ignore[assignment]
        self._bx = b""
        if not bytes_eq(expected, auth):
            raise HandshakeError("ntor v3 AUTH mismatch")
        enc_key, keys = _v3_keys(seed, length)
        return _aes256ctr(enc_key, enc_sm), keys


def ntor_v3_server(
    onion_skin: bytes,
    relay_ed_id: bytes,
    onion_keys: Mapping[bytes, X25519PrivateKey],
    server_message: bytes | Callable[[bytes], bytes] = b"",
    verification: bytes = NTOR_V3_CIRC_VERIFICATION,
    *,
    ephemeral: X25519PrivateKey | None = None,
    length: int = KEY_MATERIAL_LEN,
) -> tuple[bytes, bytes, bytes]:
    """Relay side of ntor v3: return ``(reply, client_message, key_material)``.

    ``server_message`` is either the reply message or a callable that receives the
    authenticated, decrypted client message and returns the reply message (it may
    raise :class:`HandshakeError` to refuse).
    """
    _check_length(length)
    onion_skin = _as_bytes(onion_skin, "onion_skin")
    verification = _as_bytes(verification, "verification")
    if len(onion_skin) < NTOR_V3_MIN_ONIONSKIN_LEN:
        raise HandshakeError(f"ntor v3 onion skin too short ({len(onion_skin)} bytes)")
    node_id, b_pub, x_pub = onion_skin[:32], onion_skin[32:64], onion_skin[64:96]
    enc_cm, msg_mac = onion_skin[96:-32], onion_skin[-32:]
    if not bytes_eq(node_id, bytes(relay_ed_id)):
        raise HandshakeError("ntor v3 onion skin is for another relay")
    b_priv = onion_keys.get(b_pub)
    if b_priv is None:
        raise HandshakeError("ntor v3 onion skin names an unknown onion key")
    xb = _dh(b_priv, x_pub)
    enc_k1, mac_k1 = _v3_phase1(xb, node_id, x_pub, b_pub, verification)
    if not bytes_eq(_mac3(mac_k1, onion_skin[:-32], _T3_MSGMAC), msg_mac):
        raise HandshakeError("ntor v3 client message MAC mismatch")
    client_message = _aes256ctr(enc_k1, enc_cm)
    sm = server_message(client_message) if callable(server_message) else server_message
    sm = _as_bytes(sm, "server_message")
    y = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    y_pub = _pub(y)
    xy = _dh(y, x_pub)
    seed, verify = _v3_seed_verify(xy, xb, node_id, b_pub, x_pub, y_pub, verification)
    enc_key, keys = _v3_keys(seed, length)
    enc_sm = _aes256ctr(enc_key, sm)
    auth = _v3_auth(verify, node_id, b_pub, y_pub, x_pub, msg_mac, enc_sm)
    return y_pub + auth + enc_sm, client_message, keys


# --------------------------------------------------------------------------- ntor v3 messages


def encode_extensions(extensions: list[tuple[int, bytes]]) -> bytes:
    """Encode an ntor v3 CM/SM: ``N u8 | N x {type u8, len u8, body}``."""
    if len(extensions) > 255:
        raise LocalProtocolError("at most 255 ntor v3 extensions")
    out = bytearray([len(extensions)])
    for ext_type, body in extensions:
        if not 0 <= ext_type <= 255 or len(body) > 255:
            raise LocalProtocolError("ntor v3 extension type/body out of range")
        out += bytes((ext_type, len(body))) + bytes(body)
    return bytes(out)


def parse_extensions(data: bytes) -> list[tuple[int, bytes]]:
    """Parse an ntor v3 CM/SM; the whole input must be consumed. Raises ProtocolError."""
    data = bytes(data)
    if not data:
        raise ProtocolError("empty ntor v3 extension list")
    count, pos, out = data[0], 1, []
    for _ in range(count):
        if pos + 2 > len(data):
            raise ProtocolError("truncated ntor v3 extension header")
        ext_type, ext_len = data[pos], data[pos + 1]
        pos += 2
        if pos + ext_len > len(data):
            raise ProtocolError("truncated ntor v3 extension body")
        out.append((ext_type, data[pos : pos + ext_len]))
        pos += ext_len
    if pos != len(data):
        raise ProtocolError("trailing bytes after ntor v3 extensions")
    return out
