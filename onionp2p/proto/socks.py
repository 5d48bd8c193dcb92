"""SOCKS protocol core (sans-IO): requests, isolation keys, reply encoding, the parser.

See :mod:`onionp2p.client.socksport` for the theory of operation; this module is the part without
I/O — :class:`SocksParser` turns bytes into :class:`SendReply` / :class:`RequestReady`
events or raises :class:`SocksError` carrying the exact error reply — so that it can be
tested and fuzzed without sockets. Normative description: specs/socks.md.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from onionp2p.errors import CircuitError, LocalProtocolError, ProtocolError, StreamError
from onionp2p.proto.relaycell import EndReason

__all__ = [
    "Reply",
    "SOCKS4_GRANTED",
    "SOCKS4_REJECTED",
    "MAX_MESSAGE",
    "HTTP_NOT_SOCKS_ANSWER",
    "SocksError",
    "NotSocksError",
    "IsolationKey",
    "SocksRequest",
    "SendReply",
    "RequestReady",
    "ParserState",
    "SocksParser",
    "reply_code_for",
    "reply_code_for_error",
    "socks5_reply",
    "socks4_reply",
    "reply_for",
]



class Reply(enum.IntEnum):
    """SOCKS5 REP codes (RFC 1928 §6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08
    # Onion-service extended errors (proposal 304, tor's SocksPort flag ExtendedErrors):
    # sent only to clients of a port with extended errors on.
    HS_DESC_NOT_FOUND = 0xF0
    HS_DESC_INVALID = 0xF1
    HS_INTRO_FAILED = 0xF2
    HS_REND_FAILED = 0xF3
    HS_MISSING_CLIENT_AUTH = 0xF4
    HS_BAD_CLIENT_AUTH = 0xF5
    HS_BAD_ADDRESS = 0xF6
    HS_INTRO_TIMEDOUT = 0xF7


SOCKS4_GRANTED = 0x5A
SOCKS4_REJECTED = 0x5B

_CMD_CONNECT, _CMD_RESOLVE, _CMD_RESOLVE_PTR = 0x01, 0xF0, 0xF1  # BIND (02), UDP ASSOCIATE (03): unsupported
_COMMANDS = {_CMD_CONNECT: "connect", _CMD_RESOLVE: "resolve", _CMD_RESOLVE_PTR: "resolve_ptr"}
_ATYP_IPV4, _ATYP_DOMAIN, _ATYP_IPV6 = 0x01, 0x03, 0x04
_NO_AUTH, _USER_PASS, _NO_ACCEPTABLE = 0x00, 0x02, 0xFF
MAX_FIELD = 255  # SOCKS4 userid, SOCKS4a hostname (SOCKS5 fields are length-prefixed bytes)
#: The longest message any state waits for (SOCKS4a: header, userid, NUL, host, NUL).
MAX_MESSAGE = 8 + 2 * (MAX_FIELD + 1)
# First bytes of HTTP methods (GET HEAD POST PUT PATCH CONNECT DELETE OPTIONS TRACE).
_HTTP_FIRST = frozenset(b"GHPCDOT")
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}\Z")

#: What an HTTP client gets when it talks to the SOCKS port (tor sends the same status
#: line and title; browsers and scanners recognise them).
HTTP_NOT_SOCKS_ANSWER = (
    b"HTTP/1.0 501 Tor is not an HTTP Proxy\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n"
    b"<!DOCTYPE html>\n<html>\n<head>\n"
    b"<title>This is a SOCKS Proxy, Not An HTTP Proxy</title>\n</head>\n<body>\n"
    b"<h1>This is a SOCKS proxy, not an HTTP proxy.</h1>\n"
    b"<p>An HTTP request arrived on this port, but the port only speaks SOCKS\n"
    b"(versions 4, 4a and 5).</p>\n"
    b"<p>Set your application up to use it as a SOCKS proxy, ideally SOCKS5 with\n"
    b"hostnames resolved by the proxy (for curl: <code>--socks5-hostname</code>), so that\n"
    b"names are looked up by the exit relay and not by your own computer.</p>\n"
    b"</body>\n</html>\n"
)


class SocksError(ProtocolError):
    """Malformed or unsupported SOCKS input. Send ``reply`` (may be empty), then close;
    ``code`` is the SOCKS5 REP or SOCKS4 status inside it, if any."""

    def __init__(self, message: str, reply: bytes = b"", code: int | None = None):
        super().__init__(message)
        self.reply = reply
        self.code = code


class NotSocksError(SocksError):
    """The client spoke HTTP to the SOCKS port; ``reply`` is the HTML explanation."""


# -- requests and isolation ---------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class IsolationKey:
    """Streams with different keys never share a circuit. ``repr`` hides the credentials."""

    session_group: Hashable
    client_host: str | None
    username: bytes
    password: bytes

    def __repr__(self) -> str:
        digest = hashlib.sha256(repr((self.session_group, self.client_host, self.username,
                                      self.password)).encode()).hexdigest()[:12]
        return f"IsolationKey({digest})"


@dataclass(frozen=True)
class SocksRequest:
    """One parsed SOCKS request. ``command``: connect, resolve or resolve_ptr.

    ``host`` is a hostname as the client gave it, or a normalised IP literal (IPv6
    without brackets). ``username``/``password`` are the raw RFC 1929 fields (b"" when
    sent empty, None when not sent); SOCKS4 puts its userid in ``username``.
    """

    version: int
    command: str
    host: str
    port: int
    username: bytes | None = field(default=None, repr=False)
    password: bytes | None = field(default=None, repr=False)
    client_address: Any = None
    session_group: Hashable = None
    #: the front end for version 0 requests (tor's CLIENT_PROTOCOL: HTTPCONNECT, DNS)
    protocol: str = ""

    @property
    def client_protocol(self) -> str:
        """tor's CLIENT_PROTOCOL of STREAM events: SOCKS4, SOCKS5, HTTPCONNECT or DNS."""
        return self.protocol or f"SOCKS{self.version}"

    @property
    def host_kind(self) -> str:
        """``ipv4``, ``ipv6`` or ``domain``."""
        version = _ip_version(self.host)
        return f"ipv{version}" if version else "domain"

    @property
    def isolation_key(self) -> IsolationKey:
        """tor's default isolation: SOCKS auth, client IP, session group (see module doc)."""
        addr = self.client_address
        client_host = str(addr[0]) if isinstance(addr, tuple) and addr else addr
        return IsolationKey(self.session_group, client_host, self.username or b"", self.password or b"")


@dataclass(frozen=True)
class SendReply:
    data: bytes  # write this to the client and keep reading


@dataclass(frozen=True)
class RequestReady:
    request: SocksRequest
    extra: bytes = b""  # bytes the client sent after its request (optimistic data)


# -- reply encoding ----------------------------------------------------------------------------

# tor's stream_end_reason_to_socks5_response; every other reason (MISC, DESTROY,
# RESOURCELIMIT, INTERNAL, TORPROTOCOL, HIBERNATING, ...) is a general failure.
_END_TO_REPLY = {
    EndReason.EXITPOLICY: Reply.NOT_ALLOWED,
    EndReason.RESOLVEFAILED: Reply.HOST_UNREACHABLE, EndReason.NOROUTE: Reply.HOST_UNREACHABLE,
    EndReason.CONNECTREFUSED: Reply.CONNECTION_REFUSED, EndReason.CONNRESET: Reply.CONNECTION_REFUSED,
    EndReason.DONE: Reply.CONNECTION_REFUSED,  # the exit closed before CONNECTED
    EndReason.TIMEOUT: Reply.TTL_EXPIRED,
}


def reply_code_for(end_reason: int) -> int:
    """The SOCKS5 REP for a RELAY_END reason (0 means success; unknown: general failure)."""
    if end_reason == 0:
        return Reply.SUCCEEDED
    return _END_TO_REPLY.get(end_reason, Reply.GENERAL_FAILURE)


def reply_code_for_error(exc: BaseException) -> int:
    """The SOCKS5 REP for a failed backend call (never SUCCEEDED)."""
    if isinstance(exc, StreamError):
        return reply_code_for(exc.reason) or Reply.GENERAL_FAILURE
    if isinstance(exc, CircuitError):
        return Reply.TTL_EXPIRED if exc.reason == "TIMEOUT" else Reply.GENERAL_FAILURE
    if isinstance(exc, TimeoutError):
        return Reply.TTL_EXPIRED  # tor's SocksTimeout ends the stream with reason TIMEOUT
    return Reply.GENERAL_FAILURE


def socks5_reply(code: int, address: str | None = None, port: int = 0) -> bytes:
    """A SOCKS5 reply; BND.ADDR is an IP literal, a hostname (ATYP 3) or 0.0.0.0."""
    if address is None:
        atyp, addr = _ATYP_IPV4, b"\0\0\0\0"
    else:
        try:
            ip = ipaddress.ip_address(address)
            atyp, addr = (_ATYP_IPV4 if ip.version == 4 else _ATYP_IPV6), ip.packed
        except ValueError:
            name = address.encode("ascii")
            if not 0 < len(name) <= MAX_FIELD:
                raise LocalProtocolError("BND.ADDR hostname must be 1-255 bytes") from None
            atyp, addr = _ATYP_DOMAIN, bytes((len(name),)) + name
    return bytes((5, code, 0, atyp)) + addr + port.to_bytes(2, "big")


def socks4_reply(granted: bool, address: str | None = None, port: int = 0) -> bytes:
    """An 8-byte SOCKS4 reply (``00 5A|5B port ip``)."""
    ip = ipaddress.IPv4Address(address).packed if address is not None else b"\0\0\0\0"
    return bytes((0, SOCKS4_GRANTED if granted else SOCKS4_REJECTED)) + port.to_bytes(2, "big") + ip


def reply_for(version: int, code: int, address: str | None = None) -> bytes:
    """The reply in the client's SOCKS version; SOCKS4 folds every failure into 5B."""
    return socks4_reply(code == Reply.SUCCEEDED, address) if version == 4 else socks5_reply(code, address)


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _valid_host(raw: bytes) -> str | None:
    """A destination as text: normalised IP literal or a plausible hostname; None if bad."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    bracketed = text.startswith("[") and text.endswith("]")
    inner = text[1:-1] if bracketed else text
    if "%" not in inner:  # no IPv6 scope IDs
        try:
            ip = ipaddress.ip_address(inner)
            if not bracketed or ip.version == 6:
                return str(ip)
        except ValueError:
            pass
    if bracketed:
        return None  # brackets around something that is not IPv6
    name = text[:-1] if text.endswith(".") else text
    if not name or len(text) > MAX_FIELD or not all(_LABEL.match(lab) for lab in name.split(".")):
        return None
    return text


# -- the parser ----------------------------------------------------------------------------------


class ParserState(enum.Enum):
    GREETING = "greeting"  # first message: SOCKS4 request or SOCKS5 method offer
    AUTH = "auth"          # SOCKS5: RFC 1929 username/password
    REQUEST = "request"    # SOCKS5: the request proper
    DONE = "done"
    FAILED = "failed"


class SocksParser:
    """Sans-IO SOCKS server handshake. Feed bytes with :meth:`receive_data`.

    ``prefer_no_auth`` (tor's PreferSOCKSNoAuth) picks method 00 over 02 when a client
    offers both; by default 02 wins so that credentials can isolate streams.
    """

    def __init__(self, *, client_address: Any = None, session_group: Hashable = None,
                 prefer_no_auth: bool = False):
        self.client_address = client_address
        self.session_group = session_group
        self.prefer_no_auth = prefer_no_auth
        self.state = ParserState.GREETING
        self._buf = bytearray()
        self._username: bytes | None = None
        self._password: bytes | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed by a complete message."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> list[SendReply | RequestReady]:
        """Consume ``data``; return the events it completes (a RequestReady comes last).

        Raises:
            SocksError: bad input; send ``exc.reply`` (it includes replies this call
                produced before the error) and close.
            LocalProtocolError: called after the handshake finished or failed.
        """
        if self.state in (ParserState.DONE, ParserState.FAILED):
            raise LocalProtocolError(f"SOCKS handshake already {self.state.value}")
        self._buf += data
        events: list[SendReply | RequestReady] = []
        try:
            while self.state is not ParserState.DONE:
                event = self._step()
                if event is None:
                    break
                events.append(event)
        except SocksError as exc:
            self.state = ParserState.FAILED
            self._buf.clear()
            exc.reply = b"".join(e.data for e in events if isinstance(e, SendReply)) + exc.reply
            raise
        if self.state is not ParserState.DONE and len(self._buf) > MAX_MESSAGE:  # pragma: no cover
            raise LocalProtocolError("parser bound violated")  # every state checks its own sizes
        return events

    def _step(self) -> SendReply | RequestReady | None:
        if not self._buf:
            return None
        if self.state is ParserState.GREETING:
            first = self._buf[0]
            if first == 5:
                return self._methods()
            if first == 4:
                return self._socks4()
            if first in _HTTP_FIRST:
                raise NotSocksError("HTTP request on the SOCKS port", HTTP_NOT_SOCKS_ANSWER)
            raise SocksError(f"unknown SOCKS version {first}")
        if self.state is ParserState.AUTH:
            return self._userpass()
        return self._request()

    def _ready(self, used: int, version: int, cmd: int, host: str, port: int) -> RequestReady:
        self.state = ParserState.DONE
        extra = bytes(self._buf[used:])
        self._buf.clear()
        req = SocksRequest(version, _COMMANDS[cmd], host, port, self._username, self._password,
                           self.client_address, self.session_group)
        return RequestReady(req, extra)

    # SOCKS4 / SOCKS4a: VN CD DSTPORT(2) DSTIP(4) USERID NUL [HOST NUL]
    def _socks4(self) -> RequestReady | None:
        buf = self._buf
        if len(buf) < 8:
            return None

        def reject(why: str) -> SocksError:
            return SocksError(f"SOCKS4: {why}", socks4_reply(False), SOCKS4_REJECTED)

        cmd, port, ip = buf[1], int.from_bytes(buf[2:4], "big"), bytes(buf[4:8])
        if cmd not in (_CMD_CONNECT, _CMD_RESOLVE):
            raise reject(f"command {cmd:#x} not supported")
        if ip == b"\0\0\0\0":
            raise reject("destination address 0.0.0.0")
        if port == 0 and cmd == _CMD_CONNECT:
            raise reject("CONNECT to port 0")
        nul = buf.find(0, 8, 8 + MAX_FIELD + 1)
        if nul < 0:
            if len(buf) > 8 + MAX_FIELD:
                raise reject("userid too long")
            return None
        end = nul + 1
        if ip[:3] == b"\0\0\0":  # SOCKS4a: 0.0.0.x, the hostname follows the userid
            hnul = buf.find(0, end, end + MAX_FIELD + 1)
            if hnul < 0:
                if len(buf) > end + MAX_FIELD:
                    raise reject("hostname too long")
                return None
            host = _valid_host(bytes(buf[end:hnul]))
            if host is None:
                raise reject("malformed hostname")
            end = hnul + 1
        else:
            host = str(ipaddress.IPv4Address(ip))
        self._username = bytes(buf[8:nul]) or None
        return self._ready(end, 4, cmd, host, port)

    # SOCKS5 greeting: VER NMETHODS METHODS...
    def _methods(self) -> SendReply | None:
        buf = self._buf
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return None
        methods = bytes(buf[2:2 + buf[1]])
        del buf[:2 + len(methods)]
        if _USER_PASS in methods and not (self.prefer_no_auth and _NO_AUTH in methods):
            self.state = ParserState.AUTH
            return SendReply(bytes((5, _USER_PASS)))
        if _NO_AUTH in methods:
            self.state = ParserState.REQUEST
            return SendReply(bytes((5, _NO_AUTH)))
        raise SocksError("SOCKS5: no acceptable authentication method", bytes((5, _NO_ACCEPTABLE)))

    # RFC 1929: VER(1) ULEN UNAME PLEN PASSWD. Empty fields are accepted, as by tor.
    def _userpass(self) -> SendReply | None:
        buf = self._buf
        if buf[0] != 1:
            raise SocksError(f"RFC 1929: bad version {buf[0]}", b"\x01\x01")
        if len(buf) < 2:
            return None
        ulen = buf[1]
        if len(buf) < 3 + ulen or len(buf) < 3 + ulen + buf[2 + ulen]:
            return None
        plen = buf[2 + ulen]
        self._username = bytes(buf[2:2 + ulen])
        self._password = bytes(buf[3 + ulen:3 + ulen + plen])
        del buf[:3 + ulen + plen]
        self.state = ParserState.REQUEST
        return SendReply(b"\x01\x00")

    # SOCKS5 request: VER CMD RSV ATYP DST.ADDR DST.PORT
    def _request(self) -> RequestReady | None:
        buf = self._buf

        def fail(code: int, why: str) -> SocksError:
            return SocksError(f"SOCKS5: {why}", socks5_reply(code), code)

        if len(buf) < 4:
            if buf[0] != 5:
                raise fail(Reply.GENERAL_FAILURE, f"bad request version {buf[0]}")
            return None
        ver, cmd, rsv, atyp = buf[:4]
        if ver != 5:
            raise fail(Reply.GENERAL_FAILURE, f"bad request version {ver}")
        if cmd not in _COMMANDS:
            raise fail(Reply.COMMAND_NOT_SUPPORTED, f"command {cmd:#x} not supported")
        if rsv != 0:
            raise fail(Reply.GENERAL_FAILURE, "reserved byte not zero")
        if atyp == _ATYP_IPV4:
            start, alen = 4, 4
        elif atyp == _ATYP_IPV6:
            start, alen = 4, 16
        elif atyp == _ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            start, alen = 5, buf[4]
            if alen == 0:
                raise fail(Reply.GENERAL_FAILURE, "empty hostname")
        else:
            raise fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp}")
        end = start + alen + 2
        if len(buf) < end:
            return None
        raw = bytes(buf[start:start + alen])
        port = int.from_bytes(buf[end - 2:end], "big")
        if atyp == _ATYP_DOMAIN:
            host = _valid_host(raw)
            if host is None:
                raise fail(Reply.GENERAL_FAILURE, "malformed hostname")
        else:
            host = str(ipaddress.ip_address(raw))
        if cmd == _CMD_RESOLVE_PTR and _ip_version(host) is None:
            raise fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "RESOLVE_PTR needs an IP address")
        if cmd == _CMD_CONNECT and port == 0:
            raise fail(Reply.GENERAL_FAILURE, "CONNECT to port 0")
        return self._ready(end, 5, cmd, host, port)
