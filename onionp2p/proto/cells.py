"""Channel cells and link-level payloads (tor-spec §3, §4, §5.1; specs/cells.md).

Theory of operation
-------------------
A channel carries *cells*. With link protocol 4 or later a fixed-size cell is
``CircID u32 | Command u8 | Payload[509]`` (514 bytes); a variable-length cell
(command 7 or >= 128) is ``CircID | Command | Length u16 | Payload``. Before the
link version is known (the VERSIONS cell and anything before it) the CircID is
2 bytes wide.

Two layers of code live here:

* **Framing**, the per-cell hot path: :func:`encode_fixed`, :func:`encode_var` and
  :class:`CellReader`. They use precompiled :mod:`struct` objects on a single
  ``bytearray`` buffer, never construct, so that a cell costs a couple of C calls.
* **Payload codecs**, one frozen dataclass per cell payload (VERSIONS, NETINFO, CERTS,
  AUTH_CHALLENGE, AUTHENTICATE, CREATE2, CREATED2, DESTROY, PADDING_NEGOTIATE), each
  declared with a `construct` struct (the spec as code) and exposing ``encode()`` and
  ``parse(payload)``. Parsing untrusted bytes only ever raises :class:`ProtocolError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import construct as cs

from onionp2p.errors import LocalProtocolError, ProtocolError

__all__ = [
    "CELL_LEN",
    "PAYLOAD_LEN",
    "MAX_VAR_PAYLOAD",
    "CellCommand",
    "DestroyReason",
    "Cell",
    "is_var_command",
    "encode_fixed",
    "encode_var",
    "encode_cell",
    "CellReader",
    "parse_with",
    "Versions",
    "NetInfo",
    "CertEntry",
    "Certs",
    "AuthChallenge",
    "Authenticate",
    "Create2",
    "Created2",
    "Destroy",
    "PaddingNegotiate",
    "encode_address",
]

PAYLOAD_LEN = 509
CELL_LEN = 514  # link protocol >= 4
MAX_VAR_PAYLOAD = 0xFFFF
# We refuse variable-length cells larger than this: no cell we speak needs more, and an
# unbounded length would let a peer make us buffer 64 KiB per connection for nothing.
DEFAULT_MAX_VAR_PAYLOAD = 16 * 1024


class CellCommand(IntEnum):
    """Channel cell commands (tor-spec §3)."""

    PADDING = 0
    CREATE = 1
    CREATED = 2
    RELAY = 3
    DESTROY = 4
    CREATE_FAST = 5
    CREATED_FAST = 6
    VERSIONS = 7
    NETINFO = 8
    RELAY_EARLY = 9
    CREATE2 = 10
    CREATED2 = 11
    PADDING_NEGOTIATE = 12
    VPADDING = 128
    CERTS = 129
    AUTH_CHALLENGE = 130
    AUTHENTICATE = 131
    AUTHORIZE = 132


class DestroyReason(IntEnum):
    """DESTROY / TRUNCATED reason codes (tor-spec §5.4)."""

    NONE = 0
    PROTOCOL = 1
    INTERNAL = 2
    REQUESTED = 3
    HIBERNATING = 4
    RESOURCELIMIT = 5
    CONNECTFAILED = 6
    OR_IDENTITY = 7
    CHANNEL_CLOSED = 8
    FINISHED = 9
    TIMEOUT = 10
    DESTROYED = 11
    NOSUCHSERVICE = 12


def is_var_command(command: int) -> bool:
    """True when ``command`` uses the variable-length cell format."""
    return command == 7 or command >= 128


@dataclass(slots=True)
class Cell:
    """One channel cell. ``payload`` is 509 bytes for fixed cells."""

    circ_id: int
    command: int
    payload: bytes


# ---------------------------------------------------------------------------
# Framing (hot path: struct only)

_HDR4 = struct.Struct(">IB")
_HDR2 = struct.Struct(">HB")
_RELAY, _RELAY_EARLY = 3, 9  # CellCommand.RELAY, RELAY_EARLY (the framing loop compares ints)
_VHDR4 = struct.Struct(">IBH")
_VHDR2 = struct.Struct(">HBH")
_ZERO_PAYLOAD = bytes(PAYLOAD_LEN)


def encode_fixed(circ_id: int, command: int, payload: bytes = b"", *, circ_id_len: int = 4) -> bytes:
    """Encode a fixed-size cell, padding the payload with zero bytes to 509."""
    n = len(payload)
    if n > PAYLOAD_LEN:
        raise LocalProtocolError(f"fixed cell payload too long: {n} > {PAYLOAD_LEN}")
    hdr = (_HDR4 if circ_id_len == 4 else _HDR2).pack(circ_id, command)
    if n == PAYLOAD_LEN:
        return hdr + payload
    return hdr + payload + _ZERO_PAYLOAD[n:]


def encode_var(circ_id: int, command: int, payload: bytes, *, circ_id_len: int = 4) -> bytes:
    """Encode a variable-length cell."""
    if len(payload) > MAX_VAR_PAYLOAD:
        raise LocalProtocolError("variable cell payload too long")
    return (_VHDR4 if circ_id_len == 4 else _VHDR2).pack(circ_id, command, len(payload)) + payload


def encode_cell(cell: Cell, *, circ_id_len: int = 4) -> bytes:
    """Encode ``cell`` in whichever format its command requires."""
    if is_var_command(cell.command):
        return encode_var(cell.circ_id, cell.command, cell.payload, circ_id_len=circ_id_len)
    return encode_fixed(cell.circ_id, cell.command, cell.payload, circ_id_len=circ_id_len)


class CellReader:
    """Sans-IO cell framer: feed it bytes, take complete cells out.

    ``circ_id_len`` starts at 2 (VERSIONS uses a 2-byte CircID) and is switched to 4 by
    the link layer once the version is negotiated — possibly in the middle of a buffer,
    which is why cells are taken one at a time with :meth:`next_cell`.
    The buffer never holds more than one incomplete cell plus what was fed; callers
    feed one socket read at a time, so memory stays bounded.
    """

    __slots__ = ("_buf", "_pos", "circ_id_len", "max_var_payload")

    def __init__(self, circ_id_len: int = 2, *, max_var_payload: int = DEFAULT_MAX_VAR_PAYLOAD):
        self._buf = bytearray()
        self._pos = 0
        self.circ_id_len = circ_id_len
        self.max_var_payload = max_var_payload

    def receive_data(self, data: bytes) -> None:
        """Append bytes read from the channel."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as cells."""
        return len(self._buf) - self._pos

    def next_cell(self) -> Cell | None:
        """Return the next complete cell, or None if more bytes are needed.

        Raises:
            ProtocolError: a variable-length cell announces a length above the bound.
        """
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        wide = self.circ_id_len == 4
        hlen = 5 if wide else 3
        if avail < hlen:
            return None
        circ_id, command = (_HDR4 if wide else _HDR2).unpack_from(buf, pos)
        if command == 7 or command >= 128:
            if avail < hlen + 2:
                return None
            length = (buf[pos + hlen] << 8) | buf[pos + hlen + 1]
            if length > self.max_var_payload:
                raise ProtocolError(f"variable-length cell too long ({length} bytes)")
            end = pos + hlen + 2 + length
            if end > len(buf):
                return None
            payload = bytes(buf[pos + hlen + 2 : end])
        else:
            end = pos + hlen + PAYLOAD_LEN
            if end > len(buf):
                return None
            payload = bytes(buf[pos + hlen : end])
        self._pos = end
        return Cell(circ_id, command, payload)

    def take_buffered(self) -> bytes:
        """Remove and return the bytes received but not yet returned as cells."""
        rest = bytes(self._buf[self._pos:])
        self._buf = bytearray()
        self._pos = 0
        return rest

    def cells(self):
        """Yield every complete cell currently buffered (the CircID width must not change)."""
        while (cell := self.next_cell()) is not None:
            yield cell

    def frames(self, data: bytes):
        """The fast framing of an open link (4-byte CircIDs): take ``data`` (one socket
        read) after what is buffered and yield ``(buf, circ_id, command, start, end)`` for
        every complete frame, in order, in one pass without a :class:`Cell` per RELAY cell.

        Consecutive RELAY/RELAY_EARLY cells of one circuit form one frame: ``command`` is
        RELAY and ``buf[start:end]`` holds whole 514-byte cells (each keeps its own command
        byte). Any other cell is a frame of its own whose payload is ``buf[start:end]``.
        The rest (an incomplete cell) stays buffered for the next call.

        Raises:
            ProtocolError: a variable-length cell announces a length above the bound.
        """
        if self._pos or self._buf:
            buf = bytes(self._buf[self._pos:]) + data
            self._buf = bytearray()
            self._pos = 0
        else:
            buf = data
        n = len(buf)
        pos = 0
        unpack = _HDR4.unpack_from
        relay, early = _RELAY, _RELAY_EARLY
        while pos + 5 <= n:
            circ_id, cmd = unpack(buf, pos)
            if cmd == relay or cmd == early:
                end = pos + CELL_LEN
                if end > n:
                    break
                # extend the frame while the next complete cell is RELAY(_EARLY) on this circuit
                while end + CELL_LEN <= n:
                    cid2, cmd2 = unpack(buf, end)
                    if cid2 != circ_id or (cmd2 != relay and cmd2 != early):
                        break
                    end += CELL_LEN
                yield buf, circ_id, relay, pos, end
                pos = end
                continue
            if cmd == 7 or cmd >= 128:
                if pos + 7 > n:
                    break
                length = (buf[pos + 5] << 8) | buf[pos + 6]
                if length > self.max_var_payload:
                    raise ProtocolError(f"variable-length cell too long ({length} bytes)")
                end = pos + 7 + length
                if end > n:
                    break
                yield buf, circ_id, cmd, pos + 7, end
            else:
                end = pos + 5 + PAYLOAD_LEN
                if end > n:
                    break
                yield buf, circ_id, cmd, pos + 5, end
            pos = end
        if pos < n:
            self._buf += buf[pos:]


# ---------------------------------------------------------------------------
# Payload codecs (construct; off the hot path)

_PARSE_ERRORS = (
    cs.ConstructError,
    ValueError,
    TypeError,
    IndexError,
    OverflowError,
    UnicodeError,
    KeyError,
    AttributeError,
    struct.error,
)


def parse_with(fmt: cs.Construct, data: bytes, what: str):
    """Parse ``data`` with ``fmt``, turning every construct/stdlib failure into ProtocolError."""
    try:
        return fmt.parse(data)
    except _PARSE_ERRORS as exc:
        raise ProtocolError(f"malformed {what}: {type(exc).__name__}") from None


def _build(fmt: cs.Construct, obj, what: str) -> bytes:
    try:
        return fmt.build(obj)
    except _PARSE_ERRORS as exc:
        raise LocalProtocolError(f"cannot encode {what}: {exc}") from None


_ADDRESS = cs.Struct("atype" / cs.Int8ub, "value" / cs.Prefixed(cs.Int8ub, cs.GreedyBytes))


def encode_address(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> dict:
    """The NETINFO/RESOLVED-style address record for ``addr`` (None -> empty IPv4-less record)."""
    if addr is None:
        return {"atype": 4, "value": bytes(4)}
    ip = ipaddress.ip_address(addr)
    return {"atype": 4 if ip.version == 4 else 6, "value": ip.packed}


def _decode_address(rec) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if rec.atype == 4 and len(rec.value) == 4:
        return ipaddress.IPv4Address(rec.value)
    if rec.atype == 6 and len(rec.value) == 16:
        return ipaddress.IPv6Address(rec.value)
    return None  # unknown or malformed types are ignored, per tor-spec §4.5


_VERSIONS = cs.GreedyRange(cs.Int16ub)


@dataclass(frozen=True)
class Versions:
    """VERSIONS payload: a list of link protocol versions (u16 each)."""

    versions: tuple[int, ...]
    command: ClassVar[int] = CellCommand.VERSIONS

    def encode(self) -> bytes:
        return _build(_VERSIONS, list(self.versions), "VERSIONS")

    @classmethod
    def parse(cls, payload: bytes) -> Versions:
        if len(payload) % 2:
            raise ProtocolError("VERSIONS payload has odd length")
        return cls(tuple(parse_with(_VERSIONS, payload, "VERSIONS")))


_NETINFO = cs.Struct(
    "timestamp" / cs.Int32ub,
    "other" / _ADDRESS,
    "my" / cs.PrefixedArray(cs.Int8ub, _ADDRESS),
)


@dataclass(frozen=True)
class NetInfo:
    """NETINFO payload (tor-spec §4.5): time, the peer's address as we see it, our addresses."""

    timestamp: int
    other_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    my_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    command: ClassVar[int] = CellCommand.NETINFO

    def encode(self) -> bytes:
        return _build(
            _NETINFO,
            {
                "timestamp": self.timestamp,
                "other": encode_address(self.other_address),
                "my": [encode_address(a) for a in self.my_addresses],
            },
            "NETINFO",
        )

    @classmethod
    def parse(cls, payload: bytes) -> NetInfo:
        # Trailing bytes (the cell's zero padding) are ignored, as tor-spec requires.
        rec = parse_with(_NETINFO, payload, "NETINFO")
        mine = tuple(a for a in (_decode_address(r) for r in rec.my) if a is not None)
        return cls(rec.timestamp, _decode_address(rec.other), mine)


_CERTS = cs.PrefixedArray(
    cs.Int8ub, cs.Struct("cert_type" / cs.Int8ub, "body" / cs.Prefixed(cs.Int16ub, cs.GreedyBytes))
)


@dataclass(frozen=True)
class CertEntry:
    cert_type: int
    body: bytes


@dataclass(frozen=True)
class Certs:
    """CERTS payload (tor-spec §4.2): N u8 | N x {type u8, len u16, cert}."""

    certs: tuple[CertEntry, ...]
    command: ClassVar[int] = CellCommand.CERTS

    def encode(self) -> bytes:
        return _build(_CERTS, [{"cert_type": c.cert_type, "body": c.body} for c in self.certs], "CERTS")

    @classmethod
    def parse(cls, payload: bytes) -> Certs:
        # Trailing bytes after the last certificate are ignored, as tor-spec requires.
        rec = parse_with(_CERTS, payload, "CERTS")
        return cls(tuple(CertEntry(c.cert_type, c.body) for c in rec))

    def by_type(self) -> dict[int, bytes]:
        """Map cert type -> body; a type present twice is a protocol error (tor-spec §4.2)."""
        out: dict[int, bytes] = {}
        for c in self.certs:
            if c.cert_type in out:
                raise ProtocolError(f"CERTS cell has two certificates of type {c.cert_type}")
            out[c.cert_type] = c.body
        return out


_AUTH_CHALLENGE = cs.Struct("challenge" / cs.Bytes(32), "methods" / cs.PrefixedArray(cs.Int16ub, cs.Int16ub))


@dataclass(frozen=True)
class AuthChallenge:
    """AUTH_CHALLENGE payload: 32-byte challenge and the accepted authentication methods."""

    challenge: bytes
    methods: tuple[int, ...]
    command: ClassVar[int] = CellCommand.AUTH_CHALLENGE

    def encode(self) -> bytes:
        return _build(_AUTH_CHALLENGE, {"challenge": self.challenge, "methods": list(self.methods)},
                      "AUTH_CHALLENGE")

    @classmethod
    def parse(cls, payload: bytes) -> AuthChallenge:
        rec = parse_with(_AUTH_CHALLENGE, payload, "AUTH_CHALLENGE")
        return cls(rec.challenge, tuple(rec.methods))


_AUTHENTICATE = cs.Struct("auth_type" / cs.Int16ub, "auth" / cs.Prefixed(cs.Int16ub, cs.GreedyBytes))


@dataclass(frozen=True)
class Authenticate:
    """AUTHENTICATE payload: auth type u16 | length u16 | authentication bytes."""

    auth_type: int
    auth: bytes
    command: ClassVar[int] = CellCommand.AUTHENTICATE

    def encode(self) -> bytes:
        return _build(_AUTHENTICATE, {"auth_type": self.auth_type, "auth": self.auth}, "AUTHENTICATE")

    @classmethod
    def parse(cls, payload: bytes) -> Authenticate:
        rec = parse_with(_AUTHENTICATE, payload, "AUTHENTICATE")
        return cls(rec.auth_type, rec.auth)


_CREATE2 = cs.Struct("htype" / cs.Int16ub, "hdata" / cs.Prefixed(cs.Int16ub, cs.GreedyBytes))
_CREATED2 = cs.Struct("hdata" / cs.Prefixed(cs.Int16ub, cs.GreedyBytes))
MAX_CREATE2_HDATA = PAYLOAD_LEN - 4
MAX_CREATED2_HDATA = PAYLOAD_LEN - 2


@dataclass(frozen=True)
class Create2:
    """CREATE2 payload: HTYPE u16 | HLEN u16 | HDATA (then zero padding)."""

    htype: int
    hdata: bytes
    command: ClassVar[int] = CellCommand.CREATE2

    def encode(self) -> bytes:
        if len(self.hdata) > MAX_CREATE2_HDATA:
            raise LocalProtocolError("CREATE2 handshake data too long")
        return _build(_CREATE2, {"htype": self.htype, "hdata": self.hdata}, "CREATE2")

    @classmethod
    def parse(cls, payload: bytes) -> Create2:
        rec = parse_with(_CREATE2, payload, "CREATE2")
        if len(rec.hdata) > MAX_CREATE2_HDATA:
            raise ProtocolError("CREATE2 handshake data too long")
        return cls(rec.htype, rec.hdata)


@dataclass(frozen=True)
class Created2:
    """CREATED2 payload (also the EXTENDED2 body): HLEN u16 | HDATA."""

    hdata: bytes
    command: ClassVar[int] = CellCommand.CREATED2

    def encode(self) -> bytes:
        if len(self.hdata) > MAX_CREATED2_HDATA:
            raise LocalProtocolError("CREATED2 handshake data too long")
        return _build(_CREATED2, {"hdata": self.hdata}, "CREATED2")

    @classmethod
    def parse(cls, payload: bytes) -> Created2:
        rec = parse_with(_CREATED2, payload, "CREATED2")
        if len(rec.hdata) > MAX_CREATED2_HDATA:
            raise ProtocolError("CREATED2 handshake data too long")
        return cls(rec.hdata)


@dataclass(frozen=True)
class Destroy:
    """DESTROY payload: one reason byte. Unknown reason values are kept as plain ints."""

    reason: int = DestroyReason.NONE
    command: ClassVar[int] = CellCommand.DESTROY

    def encode(self) -> bytes:
        if not 0 <= self.reason <= 255:
            raise LocalProtocolError("DESTROY reason out of range")
        return bytes((self.reason,))

    @classmethod
    def parse(cls, payload: bytes) -> Destroy:
        if not payload:
            raise ProtocolError("empty DESTROY payload")
        r = payload[0]
        try:
            return cls(DestroyReason(r))
        except ValueError:
            return cls(r)


_PADNEG = cs.Struct(
    "version" / cs.Const(0, cs.Int8ub),
    "cmd" / cs.OneOf(cs.Int8ub, [1, 2]),  # tor's trunnel rejects any other command
    "ito_low_ms" / cs.Int16ub,
    "ito_high_ms" / cs.Int16ub,
)


@dataclass(frozen=True)
class PaddingNegotiate:
    """PADDING_NEGOTIATE payload (padding-spec §2.2): version 0, command 1=stop 2=start, timeouts.

    ``version u8 | command u8 | ito_low_ms u16 | ito_high_ms u16`` (big-endian), the rest of the
    509-byte payload zero. Another version or command does not parse (ProtocolError), as in tor.
    """

    cmd: int
    ito_low_ms: int = 1500
    ito_high_ms: int = 9500
    command: ClassVar[int] = CellCommand.PADDING_NEGOTIATE
    STOP: ClassVar[int] = 1
    START: ClassVar[int] = 2

    def encode(self) -> bytes:
        return _build(_PADNEG, {"version": 0, "cmd": self.cmd, "ito_low_ms": self.ito_low_ms,
                                "ito_high_ms": self.ito_high_ms}, "PADDING_NEGOTIATE")

    @classmethod
    def parse(cls, payload: bytes) -> PaddingNegotiate:
        rec = parse_with(_PADNEG, payload, "PADDING_NEGOTIATE")
        return cls(rec.cmd, rec.ito_low_ms, rec.ito_high_ms)

