"""HTTP CONNECT tunnel handshake, sans-IO (tor's HTTPTunnelPort; specs/socks.md "HTTP CONNECT port").

An application that cannot speak SOCKS but can use an HTTPS proxy (curl ``--proxy
http://…``, a browser's proxy setting) sends ``CONNECT host:port HTTP/1.1`` and header
lines ending with an empty line. :class:`HttpConnectParser` takes whatever bytes arrive
and returns the request once the header block is complete, plus any bytes the client sent
after it (a TLS ClientHello sent early). Anything else raises :class:`HttpConnectError`
whose ``response`` holds the complete HTTP answer to send before closing: 400 for a
malformed request, 405 (with ``Allow: CONNECT`` and a short explanation, as tor answers
other methods) for GET, POST …, 431 when the header block passes :data:`MAX_HEADER_BYTES`.

The request becomes a :class:`~onionp2p.proto.socks.SocksRequest` (command ``connect``,
``version`` 0: not SOCKS) so it takes exactly the SOCKS port's path through the client,
isolation included. As in tor, the ``Proxy-Authorization`` header is the isolation
credential: a ``Basic`` value is decoded into username and password (so controllers see
the user name, as for SOCKS5), any other scheme is kept whole as the username.
:func:`response_for_reply` turns the SOCKS5 reply code of a failed stream into the HTTP
status (502, 504, 403).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from onionp2p.errors import ProtocolError
from onionp2p.proto.socks import Reply, SocksRequest, _valid_host

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_HEADER_LINES",
    "ESTABLISHED",
    "HttpConnectError",
    "HttpConnectParser",
    "ConnectReady",
    "http_response",
    "response_for_reply",
]

#: the request line plus every header line, with their line ends, at most
MAX_HEADER_BYTES = 16384
#: header lines at most (besides the request line)
MAX_HEADER_LINES = 100

#: the answer to a CONNECT whose stream opened
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

_REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 502: "Bad Gateway", 504: "Gateway Timeout",
            505: "HTTP Version Not Supported"}
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_PORT = re.compile(r"[0-9]{1,5}")

_NOT_A_PROXY = (
    "This is an HTTP CONNECT tunnel into onionp2p (like tor's HTTPTunnelPort), not an HTTP proxy:\n"
    "only CONNECT host:port is served. Configure it as your application's HTTPS proxy\n"
    "(curl --proxy http://127.0.0.1:PORT https://...), or use the SOCKS port.\n"
)


def http_response(status: int, text: str = "", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response that ends the connection (``Connection: close``)."""
    body = (text or f"{status} {_REASONS.get(status, '')}\n").encode("ascii", "replace")
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
             "Content-Type: text/plain; charset=us-ascii", f"Content-Length: {len(body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def response_for_reply(code: int) -> bytes:
    """The HTTP answer to a CONNECT whose stream failed with SOCKS5 reply ``code``:
    504 when it timed out, 403 when an exit policy (or ClientRejectInternalAddresses)
    refused it, else 502 (refused, unreachable, no circuit)."""
    if code == Reply.TTL_EXPIRED:
        return http_response(504, "The stream through the onion network timed out.\n")
    if code == Reply.NOT_ALLOWED:
        return http_response(403, "The exit (or this client's policy) does not allow this destination.\n")
    why = f" ({Reply(code).name})" if code in Reply._value2member_map_ else ""
    return http_response(502, f"The stream through the onion network failed{why}.\n")


class HttpConnectError(ProtocolError):
    """A request the tunnel will not serve; send ``response`` and close."""

    def __init__(self, message: str, response: bytes):
        super().__init__(message)
        self.response = response


@dataclass(frozen=True)
class ConnectReady:
    request: SocksRequest
    extra: bytes = b""  # bytes after the header block (the client's first data)


def _bad(message: str, status: int = 400) -> HttpConnectError:
    return HttpConnectError(message, http_response(status, f"{message}\n"))


def _authority(target: bytes) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` of a CONNECT request line (the port is required)."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise _bad("the CONNECT target is not ASCII") from None
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise _bad("CONNECT needs host:port with a port 1-65535")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise _bad("an IPv6 address must be in brackets: [addr]:port")
    valid = _valid_host(host.encode("ascii"))
    if valid is None:
        raise _bad("the CONNECT target is not a valid hostname or address")
    return valid, int(port)


def _credentials(value: bytes) -> tuple[bytes, bytes]:
    """Proxy-Authorization as isolation credentials: Basic -> (user, password); else (value, b"")."""
    scheme, _, rest = value.strip().partition(b" ")
    if scheme.lower() == b"basic":
        try:
            user, sep, password = base64.b64decode(rest.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            raise _bad("Proxy-Authorization: Basic credentials are not valid base64") from None
        if sep:
            return user, password
    return value.strip(), b""


class HttpConnectParser:
    """Sans-IO CONNECT request reader. :meth:`receive_data` returns None until the header
    block is complete, then a :class:`ConnectReady`; it never keeps more than
    :data:`MAX_HEADER_BYTES` (plus one read) buffered."""

    def __init__(self, *, client_address: Any = None, session_group: Hashable = None):
        self.client_address = client_address
        self.session_group = session_group
        self._buf = bytearray()
        self.done = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> ConnectReady | None:
        """Consume ``data``. Raises :class:`HttpConnectError` (send its ``response``, close)."""
        if self.done:
            raise ProtocolError("CONNECT request already complete")
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        sep = 4
        lf = self._buf.find(b"\n\n")  # bare LF line ends: tolerated, as most servers do
        if lf != -1 and (end == -1 or lf < end):
            end, sep = lf, 2
        if end == -1:
            if len(self._buf) > MAX_HEADER_BYTES:
                self._buf.clear()
                raise _bad(f"request header block longer than {MAX_HEADER_BYTES} bytes", 431)
            return None
        if end + sep > MAX_HEADER_BYTES:
            self._buf.clear()
            raise _bad(f"request header block longer than {MAX_HEADER_BYTES} bytes", 431)
        head, extra = bytes(self._buf[:end]), bytes(self._buf[end + sep:])
        self._buf.clear()
        self.done = True
        return ConnectReady(self._request(head), extra)

    def _request(self, head: bytes) -> SocksRequest:
        lines = head.split(b"\n")
        lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
            raise _bad("malformed request line (expected: CONNECT host:port HTTP/1.1)")
        method, target, version = parts
        if not version.startswith(b"HTTP/"):
            raise _bad("malformed request line (expected: CONNECT host:port HTTP/1.1)")
        if not _VERSION.fullmatch(version):
            raise _bad("only HTTP/1.0 and HTTP/1.1 are spoken here", 505)
        if method != b"CONNECT":
            raise HttpConnectError(f"method {method[:20].decode('ascii', 'replace')} is not CONNECT",
                                   http_response(405, _NOT_A_PROXY, (("Allow", "CONNECT"),)))
        host, port = _authority(target)
        if len(lines) - 1 > MAX_HEADER_LINES:
            raise _bad(f"more than {MAX_HEADER_LINES} header lines", 431)
        username = password = None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise _bad("malformed header line")
            if name.lower() == b"proxy-authorization":
                if username is not None:
                    raise _bad("more than one Proxy-Authorization header")
                username, password = _credentials(value)
        return SocksRequest(0, "connect", host, port, username=username, password=password,
                            client_address=self.client_address, session_group=self.session_group,
                            protocol="HTTPCONNECT")
