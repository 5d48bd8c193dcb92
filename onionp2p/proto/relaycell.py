"""Relay cells and relay messages (tor-spec §6, §7; specs/cells.md).

Theory of operation
-------------------
The 509-byte payload of a RELAY or RELAY_EARLY cell is, once all onion layers are
removed, a *relay cell body*::

    Command u8 | Recognized u16 | StreamID u16 | Digest[4] | Length u16 | Data[498]

followed by padding (four zero bytes, then random bytes, so that the cell's
plaintext is not predictable). :func:`pack_relay` / :func:`unpack_relay` are the hot
path and use one precompiled :mod:`struct`; the Recognized and Digest fields are
owned by :mod:`onionp2p.proto.relaycrypto`, which fills/checks them.

The *Data* of each command is a relay message with its own layout. Those are
declared with `construct` below as frozen dataclasses with ``encode()`` and
``parse(data)``; :func:`parse_message` dispatches on the command. Parsing untrusted
bytes raises only :class:`ProtocolError`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Union

import construct as cs

from onionp2p.errors import LocalProtocolError, ProtocolError
from onionp2p.proto.cells import PAYLOAD_LEN, parse_with
from onionp2p.proto.fastrng import padding_bytes

__all__ = [
    "RELAY_HEADER_LEN",
    "RELAY_DATA_MAX",
    "RelayCommand",
    "EndReason",
    "STREAM_COMMANDS",
    "HS_COMMANDS",
    "pack_relay",
    "unpack_relay",
    "V1_TAG_LEN",
    "V1_DATA_MAX",
    "V1_DATA_OFFSET",
    "pack_relay_v1",
    "unpack_relay_v1",
    "parse_v1_header",
    "LinkSpecType",
    "LinkSpec",
    "encode_link_specs",
    "parse_link_specs",
    "Begin",
    "BeginDir",
    "Data",
    "End",
    "Connected",
    "Sendme",
    "Xoff",
    "Xon",
    "Extend2",
    "Extended2",
    "Truncate",
    "Truncated",
    "Drop",
    "Resolve",
    "Resolved",
    "ResolvedAnswer",
    "RelayMessage",
    "parse_message",
]

RELAY_HEADER_LEN = 11
RELAY_DATA_MAX = PAYLOAD_LEN - RELAY_HEADER_LEN  # 498


class RelayCommand(IntEnum):
    """Relay commands (tor-spec §6.1). Code points we do not implement are reserved."""

    BEGIN = 1
    DATA = 2
    END = 3
    CONNECTED = 4
    SENDME = 5
    EXTEND = 6
    EXTENDED = 7
    TRUNCATE = 8
    TRUNCATED = 9
    DROP = 10
    RESOLVE = 11
    RESOLVED = 12
    BEGIN_DIR = 13
    EXTEND2 = 14
    EXTENDED2 = 15
    CONNECT_UDP = 16
    CONNECTED_UDP = 17
    DATAGRAM = 18
    CONFLUX_LINK = 19
    CONFLUX_LINKED = 20
    CONFLUX_LINKED_ACK = 21
    CONFLUX_SWITCH = 22
    # onion services (rend-spec-v3; bodies in onionp2p.proto.hs.cells)
    ESTABLISH_INTRO = 32
    ESTABLISH_RENDEZVOUS = 33
    INTRODUCE1 = 34
    INTRODUCE2 = 35
    RENDEZVOUS1 = 36
    RENDEZVOUS2 = 37
    INTRO_ESTABLISHED = 38
    RENDEZVOUS_ESTABLISHED = 39
    INTRODUCE_ACK = 40
    XOFF = 43
    XON = 44


class EndReason(IntEnum):
    """RELAY_END reasons (tor-spec §6.3)."""

    MISC = 1
    RESOLVEFAILED = 2
    CONNECTREFUSED = 3
    EXITPOLICY = 4
    DESTROY = 5
    DONE = 6
    TIMEOUT = 7
    NOROUTE = 8
    HIBERNATING = 9
    INTERNAL = 10
    RESOURCELIMIT = 11
    CONNRESET = 12
    TORPROTOCOL = 13
    NOTDIRECTORY = 14


# Commands whose StreamID must be nonzero; all others must use StreamID 0 (tor-spec §6.1).
STREAM_COMMANDS = frozenset({1, 2, 3, 4, 11, 12, 13, 43, 44})

#: The onion-service commands (32-40): always on stream 0, handled by the intro and
#: rendezvous roles at a relay and by the onion-service code at a client or service.
HS_COMMANDS = frozenset(range(32, 41))

_RELAY_HDR = struct.Struct(">BHH4sH")
_PAD_ZERO = b"\x00\x00\x00\x00"


def pack_relay(command: int, stream_id: int, data: bytes = b"") -> bytearray:
    """Build a 509-byte relay cell body with Recognized and Digest zeroed.

    Padding is four zero bytes followed by random bytes (tor-spec §6.1).
    """
    n = len(data)
    if n > RELAY_DATA_MAX:
        raise LocalProtocolError(f"relay data too long: {n} > {RELAY_DATA_MAX}")
    body = bytearray(_RELAY_HDR.pack(command, 0, stream_id, b"\0\0\0\0", n))
    body += data
    room = RELAY_DATA_MAX - n
    if room > 4:
        body += _PAD_ZERO
        body += padding_bytes(room - 4)
    else:
        body += bytes(room)
    return body


def unpack_relay(body: bytes) -> tuple[int, int, bytes]:
    """Split a decrypted, recognized relay cell body into (command, stream_id, data).

    Raises:
        ProtocolError: the body is not 509 bytes or Length exceeds 498.
    """
    if len(body) != PAYLOAD_LEN:
        raise ProtocolError(f"relay cell body must be {PAYLOAD_LEN} bytes, got {len(body)}")
    command, _rec, stream_id, _digest, length = _RELAY_HDR.unpack_from(body)
    if length > RELAY_DATA_MAX:
        raise ProtocolError(f"relay cell length {length} exceeds {RELAY_DATA_MAX}")
    return command, stream_id, bytes(body[RELAY_HEADER_LEN : RELAY_HEADER_LEN + length])


# ---------------------------------------------------------------------------
# Relay message format v1 ("Relay=5"; used with CGO relay crypto, proposal 359)
#
#   Tag[16] | Command u8 | Length u16 | StreamID u16 (stream commands only) | Data | padding
#
# The 16 tag bytes belong to the crypto layer (the nonce going out, the authenticator
# coming in); there is no Recognized field and no digest. Only the commands of
# STREAM_COMMANDS carry a StreamID, so DATA holds 488 bytes, a circuit message 490. An
# unknown command is a protocol violation (the message cannot be delimited without it).

V1_TAG_LEN = 16
V1_DATA_OFFSET = V1_TAG_LEN + 5  # with a StreamID
V1_DATA_MAX = PAYLOAD_LEN - V1_DATA_OFFSET  # 488
_V1_CIRC_OFFSET = V1_TAG_LEN + 3
#: commands tor knows (relay_msg.c refuses any other in a v1 message): ours, onion
#: services' 32-40 and padding negotiation's 41-42
_V1_KNOWN = frozenset(int(c) for c in RelayCommand) | frozenset(range(32, 43))
_V1_HDR = struct.Struct(">BHH")
_V1_HDR_NO_SID = struct.Struct(">BH")
_V1_ZERO_TAG = bytes(V1_TAG_LEN)


def pack_relay_v1(command: int, stream_id: int, data: bytes = b"") -> bytearray:
    """A 509-byte v1 relay cell body (tag bytes zero, for the crypto to fill).

    Padding, as in v0: four zero bytes, then random bytes. Raises LocalProtocolError for a
    StreamID on a command that has no such field, or too much data. (A stream command on
    stream 0 is written as asked, as in v0: receivers refuse it.)
    """
    n = len(data)
    if command in STREAM_COMMANDS:
        body = bytearray(_V1_ZERO_TAG)
        body += _V1_HDR.pack(command, n, stream_id)
    else:
        if stream_id:
            raise LocalProtocolError(f"relay command {command} takes no stream ID in format v1")
        body = bytearray(_V1_ZERO_TAG)
        body += _V1_HDR_NO_SID.pack(command, n)
    room = PAYLOAD_LEN - len(body) - n
    if room < 0:
        raise LocalProtocolError(f"relay data too long for format v1: {n} bytes")
    body += data
    if room > 4:
        body += _PAD_ZERO
        body += padding_bytes(room - 4)
    else:
        body += bytes(room)
    return body


def parse_v1_header(body) -> tuple[int, int, int, int]:
    """``(command, stream_id, data offset, length)`` of a recognized v1 body.

    Raises ProtocolError for an unknown command or a length past the body's end."""
    command = body[V1_TAG_LEN]
    if command not in _V1_KNOWN:
        raise ProtocolError(f"unknown relay command {command} in a v1 relay message")
    length = (body[V1_TAG_LEN + 1] << 8) | body[V1_TAG_LEN + 2]
    if command in STREAM_COMMANDS:
        sid = (body[V1_TAG_LEN + 3] << 8) | body[V1_TAG_LEN + 4]
        offset = V1_DATA_OFFSET
    else:
        sid = 0
        offset = _V1_CIRC_OFFSET
    if length > PAYLOAD_LEN - offset:
        raise ProtocolError(f"v1 relay message length {length} exceeds {PAYLOAD_LEN - offset}")
    return command, sid, offset, length


def unpack_relay_v1(body: bytes) -> tuple[int, int, bytes]:
    """Split a recognized v1 body into (command, stream_id, data). Raises ProtocolError."""
    if len(body) != PAYLOAD_LEN:
        raise ProtocolError(f"relay cell body must be {PAYLOAD_LEN} bytes, got {len(body)}")
    command, sid, offset, length = parse_v1_header(body)
    return command, sid, bytes(body[offset:offset + length])


# ---------------------------------------------------------------------------
# Relay messages


def _build(fmt: cs.Construct, obj, what: str) -> bytes:
    try:
        return fmt.build(obj)
    except (cs.ConstructError, ValueError, TypeError, OverflowError, struct.error) as exc:
        raise LocalProtocolError(f"cannot encode {what}: {exc}") from None


def _check_len(data: bytes, what: str) -> bytes:
    if len(data) > RELAY_DATA_MAX:
        raise LocalProtocolError(f"{what} body too long ({len(data)} > {RELAY_DATA_MAX})")
    return data


def _ascii(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what}: non-ASCII address") from None
    if not text.isprintable():
        raise ProtocolError(f"{what}: control characters in address")
    return text


def _split_hostport(text: str, what: str, allow_empty: bool = False) -> tuple[str, int]:
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or len(port_s) > 5:
        raise ProtocolError(f"{what}: address must be host:port")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ProtocolError(f"{what}: port {port} out of range")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ProtocolError(f"{what}: unterminated IPv6 literal")
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ProtocolError(f"{what}: bad IPv6 literal") from None
    elif ":" in host:
        # An IPv6 literal must be in brackets, and no hostname contains a colon. Accepting
        # one would give a host that encode() wraps in brackets and no decoder accepts.
        raise ProtocolError(f"{what}: colon in host (IPv6 literals go in brackets)")
    if (not host and not allow_empty) or len(host) > 255:
        raise ProtocolError(f"{what}: bad host length")
    return host, port


@dataclass(frozen=True)
class Begin:
    """RELAY_BEGIN: ``host:port NUL [FLAGS u32]``. IPv6 hosts go in brackets on the wire.

    Flag bits (from the LSB): 1 IPv6 okay, 2 IPv4 not okay, 3 prefer IPv6.
    """

    host: str
    port: int
    flags: int = 0
    command: ClassVar[int] = RelayCommand.BEGIN
    IPV6_OK: ClassVar[int] = 1
    IPV4_NOT_OK: ClassVar[int] = 2
    IPV6_PREFERRED: ClassVar[int] = 4

    def encode(self) -> bytes:
        host = self.host
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        else:
            host = host.lower()
        out = f"{host}:{self.port}".encode("ascii") + b"\0"
        if self.flags:
            out += struct.pack(">I", self.flags)
        return _check_len(out, "BEGIN")

    @classmethod
    def parse(cls, data: bytes, *, onion_service: bool = False) -> Begin:
        """``onion_service``: the BEGIN arrived at an onion service, where clients send an
        empty host (``":80"``, as tor's connection_ap_handshake_send_begin does)."""
        nul = data.find(b"\0")
        if nul < 0:
            raise ProtocolError("BEGIN: address not NUL-terminated")
        host, port = _split_hostport(_ascii(bytes(data[:nul]), "BEGIN"), "BEGIN", onion_service)
        rest = data[nul + 1 :]
        flags = struct.unpack(">I", rest[:4])[0] if len(rest) >= 4 else 0
        return cls(host, port, flags)


@dataclass(frozen=True)
class BeginDir:
    """RELAY_BEGIN_DIR: empty body; opens a stream to the relay's directory service."""

    command: ClassVar[int] = RelayCommand.BEGIN_DIR

    def encode(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, data: bytes) -> BeginDir:
        return cls()


@dataclass(frozen=True)
class Data:
    """RELAY_DATA: opaque stream bytes (at most 498 per cell)."""

    data: bytes
    command: ClassVar[int] = RelayCommand.DATA

    def encode(self) -> bytes:
        return _check_len(self.data, "DATA")

    @classmethod
    def parse(cls, data: bytes) -> Data:
        return cls(bytes(data))


_IP_TTL4 = struct.Struct(">4sI")
_IP_TTL6 = struct.Struct(">16sI")


@dataclass(frozen=True)
class End:
    """RELAY_END: reason u8; with EXITPOLICY also ``addr (4 or 16) | TTL u32``. Empty means MISC."""

    reason: int = EndReason.MISC
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    ttl: int = 0
    command: ClassVar[int] = RelayCommand.END

    def encode(self) -> bytes:
        out = bytes((int(self.reason),))
        if self.address is not None:
            ip = ipaddress.ip_address(self.address)
            out += (_IP_TTL4 if ip.version == 4 else _IP_TTL6).pack(ip.packed, self.ttl)
        return out

    @classmethod
    def parse(cls, data: bytes) -> End:
        if not data:
            return cls(EndReason.MISC)
        r = data[0]
        try:
            reason: int = EndReason(r)
        except ValueError:
            reason = r
        rest = bytes(data[1:])
        if reason == EndReason.EXITPOLICY and len(rest) in (8, 20):
            raw, ttl = (_IP_TTL4 if len(rest) == 8 else _IP_TTL6).unpack(rest)
            return cls(reason, ipaddress.ip_address(raw), ttl)
        return cls(reason)


@dataclass(frozen=True)
class Connected:
    """RELAY_CONNECTED: empty, ``IPv4 | TTL``, or ``00000000 | 06 | IPv6 | TTL``."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    ttl: int = 0
    command: ClassVar[int] = RelayCommand.CONNECTED

    def encode(self) -> bytes:
        if self.address is None:
            return b""
        ip = ipaddress.ip_address(self.address)
        if ip.version == 4:
            return _IP_TTL4.pack(ip.packed, self.ttl)
        return b"\0\0\0\0\x06" + _IP_TTL6.pack(ip.packed, self.ttl)

    @classmethod
    def parse(cls, data: bytes) -> Connected:
        data = bytes(data)
        if not data:
            return cls()
        if len(data) >= 8 and data[:4] != b"\0\0\0\0":
            raw, ttl = _IP_TTL4.unpack_from(data)
            return cls(ipaddress.IPv4Address(raw), ttl)
        if len(data) >= 25 and data[:5] == b"\0\0\0\0\x06":
            raw, ttl = _IP_TTL6.unpack_from(data, 5)
            return cls(ipaddress.IPv6Address(raw), ttl)
        raise ProtocolError("CONNECTED: malformed address")


_SENDME = cs.Struct("version" / cs.Int8ub, "data" / cs.Prefixed(cs.Int16ub, cs.GreedyBytes))
_SENDME_HDR = struct.Struct(">BH")


@dataclass(frozen=True)
class Sendme:
    """RELAY_SENDME: empty (version 0) or ``VERSION u8 | LEN u16 | DATA`` (v1: the 20-byte
    running digest of tor1, or the 16-byte tag of CGO, of the cell it acknowledges)."""

    version: int = 0
    digest: bytes = b""
    command: ClassVar[int] = RelayCommand.SENDME

    # A circuit SENDME goes out every 31 (Vegas) or 100 cells and one comes in as often:
    # precompiled struct here (the layout is declared by _SENDME, which the tests check this
    # against), not construct, which cost a client with busy circuits ~7 % of its CPU.

    def encode(self) -> bytes:
        if self.version == 0 and not self.digest:
            return b""
        if not 0 <= self.version <= 255 or len(self.digest) > 0xFFFF:
            raise LocalProtocolError("cannot encode SENDME: version or digest out of range")
        return _SENDME_HDR.pack(self.version, len(self.digest)) + self.digest

    @classmethod
    def parse(cls, data: bytes) -> Sendme:
        if not data:
            return cls()
        if len(data) < 3:
            raise ProtocolError("SENDME: truncated header")
        version, n = _SENDME_HDR.unpack_from(data)
        if len(data) < 3 + n:
            raise ProtocolError("SENDME: data shorter than its length")
        digest = bytes(data[3:3 + n])
        if version == 1 and n not in (16, 20):  # CGO tag or tor1 digest
            raise ProtocolError("SENDME v1 digest must be 20 bytes (tor1) or 16 (CGO)")
        return cls(version, digest)


_XON = cs.Struct("version" / cs.Const(0, cs.Int8ub), "kbps_ewma" / cs.Int32ub)


@dataclass(frozen=True)
class Xoff:
    """RELAY_XOFF (proposal 324): ``VERSION u8`` (0). Stop sending on this stream."""

    command: ClassVar[int] = RelayCommand.XOFF

    def encode(self) -> bytes:
        return b"\x00"

    @classmethod
    def parse(cls, data: bytes) -> Xoff:
        if not data or data[0] != 0:
            raise ProtocolError("XOFF: unknown version")
        return cls()


@dataclass(frozen=True)
class Xon:
    """RELAY_XON (proposal 324): ``VERSION u8 | KBPS_EWMA u32``: send again; the receiver
    drains about ``kbps_ewma`` kilobytes (1000 bytes, not bits) per second, 0 = no rate."""

    kbps_ewma: int = 0
    command: ClassVar[int] = RelayCommand.XON

    def encode(self) -> bytes:
        return _build(_XON, {"kbps_ewma": self.kbps_ewma}, "XON")

    @classmethod
    def parse(cls, data: bytes) -> Xon:
        rec = parse_with(_XON, bytes(data[:5]), "XON")
        return cls(rec.kbps_ewma)


class LinkSpecType(IntEnum):
    """Link specifier types used in EXTEND2 (tor-spec §5.1.2)."""

    IPV4 = 0
    IPV6 = 1
    LEGACY_ID = 2
    ED25519_ID = 3


_LS_LEN = {LinkSpecType.IPV4: 6, LinkSpecType.IPV6: 18, LinkSpecType.LEGACY_ID: 20, LinkSpecType.ED25519_ID: 32}


@dataclass(frozen=True)
class LinkSpec:
    """One link specifier: how to reach (IP/port) or recognise (identity) the next hop."""

    lstype: int
    data: bytes

    @classmethod
    def ipv4(cls, address: str, port: int) -> LinkSpec:
        return cls(LinkSpecType.IPV4, ipaddress.IPv4Address(address).packed + struct.pack(">H", port))

    @classmethod
    def ipv6(cls, address: str, port: int) -> LinkSpec:
        return cls(LinkSpecType.IPV6, ipaddress.IPv6Address(address).packed + struct.pack(">H", port))

    @classmethod
    def legacy_id(cls, rsa_id_digest: bytes) -> LinkSpec:
        return cls(LinkSpecType.LEGACY_ID, bytes(rsa_id_digest))

    @classmethod
    def ed25519_id(cls, ed_id: bytes) -> LinkSpec:
        return cls(LinkSpecType.ED25519_ID, bytes(ed_id))

    def hostport(self) -> tuple[str, int]:
        """(address, port) of an IPV4/IPV6 specifier."""
        if self.lstype == LinkSpecType.IPV4:
            return str(ipaddress.IPv4Address(self.data[:4])), struct.unpack(">H", self.data[4:6])[0]
        if self.lstype == LinkSpecType.IPV6:
            return str(ipaddress.IPv6Address(self.data[:16])), struct.unpack(">H", self.data[16:18])[0]
        raise LocalProtocolError("not an address link specifier")


_LINK_SPECS = cs.PrefixedArray(cs.Int8ub, cs.Struct("lstype" / cs.Int8ub,
                                                    "data" / cs.Prefixed(cs.Int8ub, cs.GreedyBytes)))


def _checked_spec(lstype: int, data: bytes, what: str) -> LinkSpec:
    """A LinkSpec, after checking that a known type has its exact length (unknown types are kept)."""
    want = _LS_LEN.get(lstype)
    if want is not None and len(data) != want:
        raise ProtocolError(f"{what}: link specifier type {lstype} has length {len(data)}")
    return LinkSpec(lstype, bytes(data))


def encode_link_specs(specs: Sequence[LinkSpec]) -> bytes:
    """A link specifier block ``NSPEC | NSPEC x (LSTYPE | LSLEN | LSPEC)`` (EXTEND2, onion services)."""
    return _build(_LINK_SPECS, [{"lstype": s.lstype, "data": s.data} for s in specs], "link specifiers")


def parse_link_specs(data: bytes, what: str = "link specifiers") -> tuple[LinkSpec, ...]:
    """Decode a whole link specifier block (nothing may follow it)."""
    rec = parse_with(cs.Struct("specs" / _LINK_SPECS, cs.Terminated), bytes(data), what)
    return tuple(_checked_spec(s.lstype, s.data, what) for s in rec.specs)


_EXTEND2 = cs.Struct(
    "specs" / _LINK_SPECS,
    "htype" / cs.Int16ub,
    "hdata" / cs.Prefixed(cs.Int16ub, cs.GreedyBytes),
)


@dataclass(frozen=True)
class Extend2:
    """RELAY_EXTEND2: ``NSPEC | specs | HTYPE u16 | HLEN u16 | HDATA``.

    Known specifier types must have their exact length; unknown ones are kept.
    """

    specs: tuple[LinkSpec, ...]
    htype: int
    hdata: bytes
    command: ClassVar[int] = RelayCommand.EXTEND2

    def encode(self) -> bytes:
        obj = {"specs": [{"lstype": s.lstype, "data": s.data} for s in self.specs],
               "htype": self.htype, "hdata": self.hdata}
        return _check_len(_build(_EXTEND2, obj, "EXTEND2"), "EXTEND2")

    @classmethod
    def parse(cls, data: bytes) -> Extend2:
        rec = parse_with(_EXTEND2, bytes(data), "EXTEND2")
        specs = tuple(_checked_spec(s.lstype, s.data, "EXTEND2") for s in rec.specs)
        return cls(specs, rec.htype, rec.hdata)

    def find(self, lstype: int) -> LinkSpec | None:
        """The first specifier of ``lstype``, or None."""
        return next((s for s in self.specs if s.lstype == lstype), None)


_EXTENDED2 = cs.Struct("hdata" / cs.Prefixed(cs.Int16ub, cs.GreedyBytes))


@dataclass(frozen=True)
class Extended2:
    """RELAY_EXTENDED2: same body as CREATED2 (``HLEN u16 | HDATA``)."""

    hdata: bytes
    command: ClassVar[int] = RelayCommand.EXTENDED2

    def encode(self) -> bytes:
        return _check_len(_build(_EXTENDED2, {"hdata": self.hdata}, "EXTENDED2"), "EXTENDED2")

    @classmethod
    def parse(cls, data: bytes) -> Extended2:
        return cls(parse_with(_EXTENDED2, bytes(data), "EXTENDED2").hdata)


@dataclass(frozen=True)
class Truncate:
    """RELAY_TRUNCATE: empty body; tear down the circuit after this hop."""

    command: ClassVar[int] = RelayCommand.TRUNCATE

    def encode(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, data: bytes) -> Truncate:
        return cls()


@dataclass(frozen=True)
class Truncated:
    """RELAY_TRUNCATED: one reason byte (DESTROY reasons)."""

    reason: int = 0
    command: ClassVar[int] = RelayCommand.TRUNCATED

    def encode(self) -> bytes:
        return bytes((self.reason,))

    @classmethod
    def parse(cls, data: bytes) -> Truncated:
        if not data:
            raise ProtocolError("TRUNCATED: missing reason")
        return cls(data[0])


@dataclass(frozen=True)
class Drop:
    """RELAY_DROP: long-range padding; the body is ignored."""

    data: bytes = b""
    command: ClassVar[int] = RelayCommand.DROP

    def encode(self) -> bytes:
        return _check_len(self.data, "DROP")

    @classmethod
    def parse(cls, data: bytes) -> Drop:
        return cls(bytes(data))


@dataclass(frozen=True)
class Resolve:
    """RELAY_RESOLVE: ``hostname NUL`` (reverse lookups use an in-addr.arpa / ip6.arpa name)."""

    hostname: str
    command: ClassVar[int] = RelayCommand.RESOLVE

    def encode(self) -> bytes:
        return _check_len(self.hostname.encode("ascii") + b"\0", "RESOLVE")

    @classmethod
    def parse(cls, data: bytes) -> Resolve:
        nul = data.find(b"\0")
        if nul <= 0:
            raise ProtocolError("RESOLVE: hostname missing or not NUL-terminated")
        return cls(_ascii(bytes(data[:nul]), "RESOLVE"))


class ResolvedType(IntEnum):
    HOSTNAME = 0x00
    IPV4 = 0x04
    IPV6 = 0x06
    ERROR_TRANSIENT = 0xF0
    ERROR_NONTRANSIENT = 0xF1


_RESOLVED = cs.GreedyRange(
    cs.Struct("atype" / cs.Int8ub, "value" / cs.Prefixed(cs.Int8ub, cs.GreedyBytes), "ttl" / cs.Int32ub)
)


@dataclass(frozen=True)
class ResolvedAnswer:
    """One RESOLVED answer: type, raw value and TTL. See :meth:`value_text`."""

    atype: int
    value: bytes
    ttl: int

    def value_text(self) -> str | None:
        """The answer as text (address or hostname), or None for errors / unknown types."""
        if self.atype == ResolvedType.IPV4 and len(self.value) == 4:
            return str(ipaddress.IPv4Address(self.value))
        if self.atype == ResolvedType.IPV6 and len(self.value) == 16:
            return str(ipaddress.IPv6Address(self.value))
        if self.atype == ResolvedType.HOSTNAME:
            return self.value.decode("ascii", "replace")
        return None


@dataclass(frozen=True)
class Resolved:
    """RELAY_RESOLVED: a list of ``{type u8, len u8, value, TTL u32}`` answers."""

    answers: tuple[ResolvedAnswer, ...]
    command: ClassVar[int] = RelayCommand.RESOLVED

    def encode(self) -> bytes:
        obj = [{"atype": a.atype, "value": a.value, "ttl": a.ttl} for a in self.answers]
        return _check_len(_build(_RESOLVED, obj, "RESOLVED"), "RESOLVED")

    @classmethod
    def parse(cls, data: bytes) -> Resolved:
        data = bytes(data)
        recs = parse_with(_RESOLVED, data, "RESOLVED")
        used = sum(6 + len(r.value) for r in recs)
        if used != len(data):
            raise ProtocolError("RESOLVED: truncated answer")
        return cls(tuple(ResolvedAnswer(r.atype, r.value, r.ttl) for r in recs))


RelayMessage = Union[
    Begin, BeginDir, Data, End, Connected, Sendme, Extend2, Extended2, Truncate, Truncated, Drop,
    Resolve, Resolved, Xoff, Xon,
]

_PARSERS = {cls.command: cls.parse for cls in (
    Begin, BeginDir, Data, End, Connected, Sendme, Extend2, Extended2, Truncate, Truncated, Drop,
    Resolve, Resolved, Xoff, Xon,
)}


def parse_message(command: int, data: bytes) -> RelayMessage | None:
    """Decode the body of relay ``command``; None for commands we do not implement.

    Raises:
        ProtocolError: the body is malformed.
    """
    parser = _PARSERS.get(command)
    if parser is None:
        return None
    return parser(data)
