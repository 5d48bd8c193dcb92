"""Onion-service relay messages (rend-spec-v3 §3-§4; tor's trunnel ``hs/cell_*.trunnel``). Pure.

Theory of operation
-------------------
The nine onion-service relay commands (32-40, :data:`~onionp2p.proto.relaycell.HS_COMMANDS`)
carry these bodies, byte for byte as tor's trunnel definitions lay them out (all integers
big-endian)::

    ESTABLISH_INTRO  AUTH_KEY_TYPE u8 | AUTH_KEY_LEN u16 | AUTH_KEY | EXTENSIONS
                     | HANDSHAKE_AUTH[32] | SIG_LEN u16 | SIG
    INTRO_ESTABLISHED  EXTENSIONS
    INTRODUCE1/2     LEGACY_KEY_ID[20] | AUTH_KEY_TYPE u8 | AUTH_KEY_LEN u16 | AUTH_KEY
                     | EXTENSIONS | ENCRYPTED (the rest; opaque to the introduction point)
    INTRODUCE_ACK    STATUS u16 | EXTENSIONS
    ESTABLISH_RENDEZVOUS  RENDEZVOUS_COOKIE[20]
    RENDEZVOUS_ESTABLISHED  (empty)
    RENDEZVOUS1      RENDEZVOUS_COOKIE[20] | HANDSHAKE_INFO (the rest; v3: SERVER_PK[32] | AUTH[32])
    RENDEZVOUS2      HANDSHAKE_INFO

    EXTENSIONS       N u8 | N x {TYPE u8 | LEN u8 | BODY[LEN]}

ESTABLISH_INTRO proves two things to the introduction point. HANDSHAKE_AUTH is
``MAC(KH, everything before it)`` where ``MAC(k, m) = SHA3-256(len(k) as u64 | k | m)``
and KH is the 20 bytes the circuit handshake derived after the hop's relay-crypto keys
(tor's ``rend_circ_nonce``): the cell was made by whoever built this very circuit, so it
cannot be replayed onto another one. SIG is the auth key's Ed25519 signature over
``"Tor establish-intro cell v1" | everything before SIG_LEN``: the service holds the key
the clients will name in INTRODUCE1.

The DoS-parameters extension (type 1; proposal 305) has ``N_PARAMS u8 | N x {TYPE u8 |
VALUE u64}`` with type 1 the INTRODUCE2 rate per second and 2 the burst.

Parsing follows trunnel: an auth key type outside 0-2, or a length running past the end,
is malformed; bytes after the last field are ignored (as tor does). Parsing untrusted
bytes raises only :class:`~onionp2p.errors.ProtocolError`; a message that cannot be
encoded raises :class:`~onionp2p.errors.LocalProtocolError`.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from onionp2p.errors import LocalProtocolError, ProtocolError
from onionp2p.proto.hs.ntor import hs_mac
from onionp2p.proto.relaycell import (
    RELAY_DATA_MAX,
    LinkSpec,
    RelayCommand,
    encode_link_specs,
    parse_link_specs,
)

__all__ = [
    "ESTABLISH_INTRO_SIG_PREFIX",
    "EXT_DOS_PARAMS",
    "HANDSHAKE_INFO_LEN",
    "REND_COOKIE_LEN",
    "AuthKeyType",
    "DosParamType",
    "DosParams",
    "EstablishIntro",
    "EstablishRendezvous",
    "Extension",
    "IntroAckStatus",
    "IntroEstablished",
    "Introduce1",
    "Introduce2",
    "IntroduceAck",
    "IntroducePlaintext",
    "INTRODUCE1_MIN_SIZE",
    "ONION_KEY_NTOR",
    "Rendezvous1",
    "Rendezvous2",
    "RendezvousEstablished",
    "mac_sha3_256",
    "parse_hs_message",
]


class AuthKeyType(IntEnum):
    """AUTH_KEY_TYPE: 0 and 1 were v2's legacy RSA keys; v3 uses 2 (Ed25519)."""

    LEGACY0 = 0
    LEGACY1 = 1
    ED25519 = 2


class IntroAckStatus(IntEnum):
    """INTRODUCE_ACK STATUS (rend-spec-v3 §3.2.3)."""

    SUCCESS = 0x0000
    UNKNOWN_ID = 0x0001  #: no introduction circuit for that auth key (also: rate-limited, in tor)
    BAD_FORMAT = 0x0002
    CANT_RELAY = 0x0003


class DosParamType(IntEnum):
    """The parameters of the ESTABLISH_INTRO DoS extension (proposal 305)."""

    INTRO2_RATE_PER_SEC = 1
    INTRO2_BURST_PER_SEC = 2


#: the ESTABLISH_INTRO extension type of the DoS parameters
EXT_DOS_PARAMS = 1
REND_COOKIE_LEN = 20
#: HANDSHAKE_INFO of a v3 RENDEZVOUS1/2: SERVER_PK[32] | AUTH[32]
HANDSHAKE_INFO_LEN = 64
LEGACY_KEY_ID_LEN = 20
MAC_LEN = 32
ED25519_KEY_LEN = 32
ED25519_SIG_LEN = 64
ESTABLISH_INTRO_SIG_PREFIX = b"Tor establish-intro cell v1"

_U16 = struct.Struct(">H")
_DOS_PARAM = struct.Struct(">BQ")


def mac_sha3_256(key: bytes, msg: bytes) -> bytes:
    """rend-spec-v3's MAC (:func:`onionp2p.proto.hs.ntor.hs_mac`), on any bytes-like input."""
    return hs_mac(bytes(key), bytes(msg))


class _Reader:
    """Bounds-checked reads over a message body; every overrun is a ProtocolError."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(f"truncated {self.what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


@dataclass(frozen=True)
class Extension:
    """One cell extension: ``TYPE u8 | LEN u8 | BODY``. Unknown types are kept and skipped."""

    ext_type: int
    body: bytes


def _encode_extensions(exts: tuple[Extension, ...], what: str) -> bytes:
    if len(exts) > 255:
        raise LocalProtocolError(f"{what}: too many extensions")
    out = bytearray((len(exts),))
    for ext in exts:
        if not 0 <= ext.ext_type <= 255 or len(ext.body) > 255:
            raise LocalProtocolError(f"{what}: extension type or body out of range")
        out += bytes((ext.ext_type, len(ext.body))) + ext.body
    return bytes(out)


def _parse_extensions(r: _Reader) -> tuple[Extension, ...]:
    n = r.u8()
    out = []
    for _ in range(n):
        ext_type = r.u8()
        out.append(Extension(ext_type, r.take(r.u8())))
    return tuple(out)


def _auth_key_type(value: int, what: str) -> int:
    if value not in (0, 1, 2):  # trunnel: ``u8 auth_key_type IN [0x00, 0x01, 0x02]``
        raise ProtocolError(f"{what}: unknown auth key type {value}")
    return value


def _check_len(data: bytes, what: str) -> bytes:
    if len(data) > RELAY_DATA_MAX:
        raise LocalProtocolError(f"{what} body too long ({len(data)} > {RELAY_DATA_MAX})")
    return data


@dataclass(frozen=True)
class DosParams:
    """The ESTABLISH_INTRO DoS extension: INTRODUCE2 ``rate`` and ``burst`` per second
    (None: not given). Parameter types other than 1 and 2 make the extension invalid
    (tor then leaves the circuit without explicit defenses)."""

    rate: int | None = None
    burst: int | None = None

    def extension(self) -> Extension:
        params = []
        if self.rate is not None:
            params.append(_DOS_PARAM.pack(DosParamType.INTRO2_RATE_PER_SEC, self.rate))
        if self.burst is not None:
            params.append(_DOS_PARAM.pack(DosParamType.INTRO2_BURST_PER_SEC, self.burst))
        return Extension(EXT_DOS_PARAMS, bytes((len(params),)) + b"".join(params))

    @classmethod
    def parse(cls, body: bytes) -> DosParams:
        r = _Reader(body, "DoS extension")
        rate = burst = None
        for _ in range(r.u8()):
            ptype, value = _DOS_PARAM.unpack(r.take(_DOS_PARAM.size))
            if ptype == DosParamType.INTRO2_RATE_PER_SEC:
                rate = value
            elif ptype == DosParamType.INTRO2_BURST_PER_SEC:
                burst = value
            else:
                raise ProtocolError(f"DoS extension: unknown parameter type {ptype}")
        return cls(rate, burst)


@dataclass(frozen=True)
class EstablishIntro:
    """RELAY_ESTABLISH_INTRO (see the module docstring). ``raw`` is the body as received
    (what HANDSHAKE_AUTH and SIG cover); :meth:`create` makes a signed one."""

    auth_key_type: int
    auth_key: bytes
    extensions: tuple[Extension, ...]
    handshake_mac: bytes
    sig: bytes
    raw: bytes = field(default=b"", repr=False)
    #: lengths of the prefix the MAC covers and of the one the signature covers
    mac_end: int = field(default=0, repr=False)
    sig_end: int = field(default=0, repr=False)
    command: ClassVar[int] = RelayCommand.ESTABLISH_INTRO

    @staticmethod
    def _head(auth_key_type: int, auth_key: bytes, extensions: tuple[Extension, ...]) -> bytes:
        if len(auth_key) > 0xFFFF:
            raise LocalProtocolError("ESTABLISH_INTRO: auth key too long")
        return (
            bytes((auth_key_type,))
            + _U16.pack(len(auth_key))
            + bytes(auth_key)
            + _encode_extensions(extensions, "ESTABLISH_INTRO")
        )

    @classmethod
    def create(
        cls, auth_key: ed25519.Ed25519PrivateKey, kh: bytes, extensions: tuple[Extension, ...] = ()
    ) -> EstablishIntro:
        """The cell a service sends on a circuit whose last hop derived ``kh``."""
        pub = auth_key.public_key().public_bytes_raw()
        head = cls._head(AuthKeyType.ED25519, pub, tuple(extensions))
        mac = mac_sha3_256(kh, head)
        sig = auth_key.sign(ESTABLISH_INTRO_SIG_PREFIX + head + mac)
        return cls.parse(head + mac + _U16.pack(len(sig)) + sig)

    def encode(self) -> bytes:
        if self.raw:
            return _check_len(self.raw, "ESTABLISH_INTRO")
        head = self._head(self.auth_key_type, self.auth_key, self.extensions)
        if len(self.handshake_mac) != MAC_LEN or len(self.sig) > 0xFFFF:
            raise LocalProtocolError("ESTABLISH_INTRO: bad MAC or signature length")
        return _check_len(head + self.handshake_mac + _U16.pack(len(self.sig)) + self.sig, "ESTABLISH_INTRO")

    @classmethod
    def parse(cls, data: bytes) -> EstablishIntro:
        r = _Reader(data, "ESTABLISH_INTRO")
        key_type = _auth_key_type(r.u8(), "ESTABLISH_INTRO")
        auth_key = r.take(r.u16())
        exts = _parse_extensions(r)
        mac_end = r.pos
        mac = r.take(MAC_LEN)
        sig_end = r.pos
        sig = r.take(r.u16())
        return cls(key_type, auth_key, exts, mac, sig, r.data, mac_end, sig_end)

    def verify(self, kh: bytes) -> None:
        """Check the cell as an introduction point must (tor's verify_establish_intro_cell):
        an Ed25519 auth key of 32 bytes, a 64-byte signature by it, and HANDSHAKE_AUTH
        made with this circuit's ``kh``. Raises ProtocolError naming what failed."""
        if self.auth_key_type != AuthKeyType.ED25519:
            raise ProtocolError(f"ESTABLISH_INTRO: auth key type {self.auth_key_type} is not Ed25519")
        if len(self.auth_key) != ED25519_KEY_LEN:
            raise ProtocolError("ESTABLISH_INTRO auth key length is invalid")
        if len(self.sig) != ED25519_SIG_LEN:
            raise ProtocolError("ESTABLISH_INTRO sig len is invalid")
        if not self.raw:
            raise LocalProtocolError("ESTABLISH_INTRO: only a parsed cell can be verified")
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.auth_key).verify(
                self.sig, ESTABLISH_INTRO_SIG_PREFIX + self.raw[: self.sig_end]
            )
        except (InvalidSignature, ValueError):
            raise ProtocolError("ESTABLISH_INTRO signature not as expected") from None
        if not hmac.compare_digest(mac_sha3_256(kh, self.raw[: self.mac_end]), self.handshake_mac):
            raise ProtocolError("ESTABLISH_INTRO handshake_auth not as expected")

    def dos_params(self) -> DosParams | None:
        """The DoS extension's parameters; None without one. Raises ProtocolError if it is
        malformed (tor: the circuit then gets no explicit defenses)."""
        for ext in self.extensions:
            if ext.ext_type == EXT_DOS_PARAMS:
                return DosParams.parse(ext.body)
        return None


@dataclass(frozen=True)
class IntroEstablished:
    """RELAY_INTRO_ESTABLISHED: extensions only (tor sends none)."""

    extensions: tuple[Extension, ...] = ()
    command: ClassVar[int] = RelayCommand.INTRO_ESTABLISHED

    def encode(self) -> bytes:
        return _check_len(_encode_extensions(self.extensions, "INTRO_ESTABLISHED"), "INTRO_ESTABLISHED")

    @classmethod
    def parse(cls, data: bytes) -> IntroEstablished:
        return cls(_parse_extensions(_Reader(data, "INTRO_ESTABLISHED")))


@dataclass(frozen=True)
class Introduce1:
    """RELAY_INTRODUCE1 (INTRODUCE2 has the same body: the introduction point passes the
    client's bytes on unchanged). ``encrypted`` is the part only the service can read."""

    auth_key: bytes
    encrypted: bytes
    extensions: tuple[Extension, ...] = ()
    auth_key_type: int = AuthKeyType.ED25519
    legacy_key_id: bytes = bytes(LEGACY_KEY_ID_LEN)
    command: ClassVar[int] = RelayCommand.INTRODUCE1

    def encode(self) -> bytes:
        if len(self.legacy_key_id) != LEGACY_KEY_ID_LEN or len(self.auth_key) > 0xFFFF:
            raise LocalProtocolError(f"{self._what()}: bad legacy key ID or auth key length")
        out = (
            bytes(self.legacy_key_id)
            + bytes((self.auth_key_type,))
            + _U16.pack(len(self.auth_key))
            + bytes(self.auth_key)
            + _encode_extensions(self.extensions, self._what())
            + bytes(self.encrypted)
        )
        return _check_len(out, self._what())

    @classmethod
    def _what(cls) -> str:
        return RelayCommand(cls.command).name

    @classmethod
    def parse(cls, data: bytes):
        r = _Reader(data, cls._what())
        legacy = r.take(LEGACY_KEY_ID_LEN)
        key_type = _auth_key_type(r.u8(), cls._what())
        auth_key = r.take(r.u16())
        exts = _parse_extensions(r)
        return cls(auth_key, r.rest(), exts, key_type, legacy)

    def validate(self) -> None:
        """What an introduction point checks before relaying (tor's
        validate_introduce1_parsed_cell): zero legacy key ID, an Ed25519 auth key of 32
        bytes, a non-empty encrypted part. Raises ProtocolError (answered BAD_FORMAT)."""
        what = self._what()
        if any(self.legacy_key_id):
            raise ProtocolError(f"{what} has a non-zero legacy key ID")
        if self.auth_key_type != AuthKeyType.ED25519:
            raise ProtocolError(f"{what}: auth key type {self.auth_key_type} is not Ed25519")
        if len(self.auth_key) != ED25519_KEY_LEN:
            raise ProtocolError(f"{what}: auth key length {len(self.auth_key)}")
        if not self.encrypted:
            raise ProtocolError(f"{what}: empty encrypted section")


#: tor pads the encrypted section so that INTRODUCE1 without ``X`` and the MAC is this long
#: (hs_cell.c ``HS_CELL_INTRODUCE1_MIN_SIZE``, introduce1_set_encrypted_padding): all
#: introductions look alike whatever the rendezvous point's link specifiers
INTRODUCE1_MIN_SIZE = 246
ONION_KEY_NTOR = 1  # ONION_KEY_TYPE: the rendezvous point's ntor (x25519) key


@dataclass(frozen=True)
class IntroducePlaintext:
    """The plaintext of INTRODUCE1's encrypted section (rend-spec-v3 §3.3): where and how the
    service meets the client. ``RENDEZVOUS_COOKIE[20] | N_EXTENSIONS | EXTENSIONS |
    ONION_KEY_TYPE u8 | ONION_KEY_LEN u16 | ONION_KEY | NSPEC | link specifiers | PAD``.
    ``onion_key`` and ``link_specifiers`` are the rendezvous point's."""

    cookie: bytes
    onion_key: bytes
    link_specifiers: tuple[LinkSpec, ...]
    extensions: tuple[Extension, ...] = ()
    onion_key_type: int = ONION_KEY_NTOR

    def encode(self, pad_to: int = 0) -> bytes:
        """The bytes, zero-padded to ``pad_to`` (tor: ``INTRODUCE1_MIN_SIZE`` less the
        cleartext header's length)."""
        if len(self.cookie) != REND_COOKIE_LEN or len(self.onion_key) > 0xFFFF:
            raise LocalProtocolError("INTRODUCE1 plaintext: bad cookie or onion key length")
        out = (bytes(self.cookie) + _encode_extensions(self.extensions, "INTRODUCE1 plaintext")
               + bytes((self.onion_key_type,)) + _U16.pack(len(self.onion_key)) + bytes(self.onion_key)
               + encode_link_specs(self.link_specifiers))
        return out + bytes(max(0, pad_to - len(out)))

    @classmethod
    def parse(cls, data: bytes) -> IntroducePlaintext:
        """Decode a decrypted INTRODUCE2 section (padding ignored). A service checks
        ``onion_key_type`` itself (tor refuses anything but ntor)."""
        r = _Reader(data, "INTRODUCE2 plaintext")
        cookie = r.take(REND_COOKIE_LEN)
        exts = _parse_extensions(r)
        key_type = r.u8()
        onion_key = r.take(r.u16())
        start = r.pos
        for _ in range(r.u8()):  # find the end of the link specifier block; relaycell checks it
            r.u8()
            r.take(r.u8())
        specs = parse_link_specs(r.data[start:r.pos], "INTRODUCE2 link specifiers")
        return cls(cookie, onion_key, specs, exts, key_type)


@dataclass(frozen=True)
class Introduce2(Introduce1):
    """RELAY_INTRODUCE2: the INTRODUCE1 body, as the introduction point got it."""

    command: ClassVar[int] = RelayCommand.INTRODUCE2


@dataclass(frozen=True)
class IntroduceAck:
    """RELAY_INTRODUCE_ACK: ``STATUS u16 | EXTENSIONS``."""

    status: int = IntroAckStatus.SUCCESS
    extensions: tuple[Extension, ...] = ()
    command: ClassVar[int] = RelayCommand.INTRODUCE_ACK

    def encode(self) -> bytes:
        return _U16.pack(int(self.status)) + _encode_extensions(self.extensions, "INTRODUCE_ACK")

    @classmethod
    def parse(cls, data: bytes) -> IntroduceAck:
        r = _Reader(data, "INTRODUCE_ACK")
        status = r.u16()
        if status not in IntroAckStatus._value2member_map_:  # trunnel: ``u16 status IN [...]``
            raise ProtocolError(f"INTRODUCE_ACK: unknown status {status:#06x}")
        return cls(IntroAckStatus(status), _parse_extensions(r))


@dataclass(frozen=True)
class EstablishRendezvous:
    """RELAY_ESTABLISH_RENDEZVOUS: exactly the 20-byte rendezvous cookie (tor refuses any
    other length)."""

    cookie: bytes
    command: ClassVar[int] = RelayCommand.ESTABLISH_RENDEZVOUS

    def encode(self) -> bytes:
        if len(self.cookie) != REND_COOKIE_LEN:
            raise LocalProtocolError(f"rendezvous cookie must be {REND_COOKIE_LEN} bytes")
        return bytes(self.cookie)

    @classmethod
    def parse(cls, data: bytes) -> EstablishRendezvous:
        if len(data) != REND_COOKIE_LEN:
            raise ProtocolError(f"ESTABLISH_RENDEZVOUS of length {len(data)}, not {REND_COOKIE_LEN}")
        return cls(bytes(data))


@dataclass(frozen=True)
class RendezvousEstablished:
    """RELAY_RENDEZVOUS_ESTABLISHED: empty (anything in it is ignored)."""

    command: ClassVar[int] = RelayCommand.RENDEZVOUS_ESTABLISHED

    def encode(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, data: bytes) -> RendezvousEstablished:
        return cls()


@dataclass(frozen=True)
class Rendezvous1:
    """RELAY_RENDEZVOUS1: ``COOKIE[20] | HANDSHAKE_INFO``. The rendezvous point reads only
    the cookie; HANDSHAKE_INFO goes to the client as it is, in RENDEZVOUS2."""

    cookie: bytes
    handshake_info: bytes
    command: ClassVar[int] = RelayCommand.RENDEZVOUS1

    def encode(self) -> bytes:
        if len(self.cookie) != REND_COOKIE_LEN:
            raise LocalProtocolError(f"rendezvous cookie must be {REND_COOKIE_LEN} bytes")
        return _check_len(bytes(self.cookie) + bytes(self.handshake_info), "RENDEZVOUS1")

    @classmethod
    def parse(cls, data: bytes) -> Rendezvous1:
        if len(data) < REND_COOKIE_LEN:
            raise ProtocolError(f"RENDEZVOUS1 of length {len(data)}, shorter than the cookie")
        data = bytes(data)
        return cls(data[:REND_COOKIE_LEN], data[REND_COOKIE_LEN:])


@dataclass(frozen=True)
class Rendezvous2:
    """RELAY_RENDEZVOUS2: HANDSHAKE_INFO, as the service put it in RENDEZVOUS1."""

    handshake_info: bytes
    command: ClassVar[int] = RelayCommand.RENDEZVOUS2

    def encode(self) -> bytes:
        return _check_len(bytes(self.handshake_info), "RENDEZVOUS2")

    @classmethod
    def parse(cls, data: bytes) -> Rendezvous2:
        return cls(bytes(data))


HsMessage = (
    EstablishIntro
    | IntroEstablished
    | Introduce1
    | Introduce2
    | IntroduceAck
    | EstablishRendezvous
    | RendezvousEstablished
    | Rendezvous1
    | Rendezvous2
)

_PARSERS = {
    cls.command: cls.parse
    for cls in (
        EstablishIntro,
        IntroEstablished,
        Introduce1,
        Introduce2,
        IntroduceAck,
        EstablishRendezvous,
        RendezvousEstablished,
        Rendezvous1,
        Rendezvous2,
    )
}


def parse_hs_message(command: int, data: bytes) -> HsMessage:
    """Decode the body of onion-service relay ``command``. Raises ProtocolError (malformed,
    or not an onion-service command)."""
    parser = _PARSERS.get(command)
    if parser is None:
        raise ProtocolError(f"relay command {command} is not an onion-service command")
    return parser(data)
