"""SOCKS4/4a/5 front end with Tor's extensions (RFC 1928, RFC 1929, torspec socks-extensions).

Theory of operation
-------------------
:class:`SocksParser` is the sans-IO core: feed it the bytes a SOCKS client sends and it
returns what to write back and, once the request is complete, a :class:`SocksRequest`.
It speaks

* SOCKS4 (CONNECT to an IPv4 address) and SOCKS4a (a hostname after the user id), plus
  Tor's RESOLVE (0xF0) over SOCKS4a;
* SOCKS5 with "no authentication" and RFC 1929 username/password — preferred when the
  client offers it, as tor does, because the credentials isolate streams (empty
  credentials are accepted); commands CONNECT, RESOLVE (0xF0) and RESOLVE_PTR (0xF1);
  address types IPv4, domain name and IPv6.

Hostnames are never resolved locally: they go to the backend, which resolves them at the
exit. BIND and UDP ASSOCIATE get "command not supported" (07), an unknown address type
"address type not supported" (08), a bad version or malformed message a general failure
and a close; a first byte that starts an HTTP method gets tor's "not an HTTP proxy" page.
Every message has a bounded size, and the server drops clients that do not finish the
handshake within ``handshake_timeout``.

:class:`SocksServer` is the asyncio shell: it runs the parser, asks the backend
(:class:`SocksBackend`: ``open_stream``, ``resolve``, ``resolve_ptr``) and relays bytes
both ways with back-pressure (``await drain()``); EOF or an error on either side closes
both. Failures are answered with the reply code mapped from the RELAY_END reason
(:func:`reply_code_for`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from .errors import OnionError, ProtocolError
from .log import get_logger
from .relaycell import EndReason

__all__ = [
    "SocksRequest", "SocksBackend", "SocksParser", "SocksServer", "SocksError", "reply_code_for",
    "HTTP_NOT_A_PROXY",
]

log = get_logger("onionp2p.socks")

MAX_HANDSHAKE_BYTES = 1024
HTTP_NOT_A_PROXY = (
    b"HTTP/1.0 501 Tor is not an HTTP Proxy\r\n"
    b"Content-Type: text/html; charset=iso-8859-1\r\n\r\n"
    b"<html>\n<head>\n<title>This is a SOCKS Proxy, Not An HTTP Proxy</title>\n</head>\n<body>\n"
    b"<h1>This is a SOCKS proxy, not an HTTP proxy.</h1>\n<p>\n"
    b"It appears you have configured your web browser to use this onionp2p port as an HTTP proxy.\n"
    b"</p><p>\nThis is not correct: this port is configured as a SOCKS proxy, not an HTTP proxy. "
    b"Please configure your client accordingly.\n</p>\n</body>\n</html>\n"
)

# SOCKS5 reply codes
SUCCEEDED, GENERAL_FAILURE, NOT_ALLOWED, NET_UNREACHABLE, HOST_UNREACHABLE = 0, 1, 2, 3, 4
CONN_REFUSED, TTL_EXPIRED, CMD_NOT_SUPPORTED, ATYP_NOT_SUPPORTED = 5, 6, 7, 8
_HTTP_FIRST = frozenset(b"GHPCODT")  # GET HEAD POST PUT CONNECT OPTIONS DELETE TRACE

_END_TO_REPLY = {
    EndReason.EXITPOLICY: NOT_ALLOWED,
    EndReason.RESOLVEFAILED: HOST_UNREACHABLE,
    EndReason.NOROUTE: HOST_UNREACHABLE,
    EndReason.CONNECTREFUSED: CONN_REFUSED,
    EndReason.CONNRESET: CONN_REFUSED,
    EndReason.DONE: CONN_REFUSED,
    EndReason.TIMEOUT: TTL_EXPIRED,
}


def reply_code_for(end_reason: int) -> int:
    """The SOCKS5 reply code for a RELAY_END reason (tor's mapping); 01 for the rest."""
    return _END_TO_REPLY.get(end_reason, GENERAL_FAILURE)


class SocksError(ProtocolError):
    """The client sent something we refuse; ``reply`` is what to send before closing."""

    def __init__(self, message: str, reply: bytes = b""):
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class SocksRequest:
    """A complete SOCKS request. ``command``: connect, resolve or resolve_ptr."""

    version: int
    command: str
    host: str
    port: int
    username: bytes | None = None
    password: bytes | None = None
    client_address: tuple | None = None

    @property
    def isolation_key(self) -> Hashable:
        """Streams whose keys differ never share a circuit (tor's IsolateSOCKSAuth)."""
        return ("socks", self.username, self.password)


class SocksBackend(Protocol):
    async def open_stream(self, req: SocksRequest) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...
    async def resolve(self, req: SocksRequest) -> list[str]: ...
    async def resolve_ptr(self, req: SocksRequest) -> str: ...


def socks5_reply(code: int, address: str | None = None, port: int = 0, *, hostname: str | None = None) -> bytes:
    """``05 REP 00 ATYP BND.ADDR BND.PORT``."""
    if hostname is not None:
        raw = hostname.encode("ascii", "replace")[:255]
        return bytes((5, code, 0, 3, len(raw))) + raw + struct.pack(">H", port)
    ip = ipaddress.ip_address(address or "0.0.0.0")
    return bytes((5, code, 0, 1 if ip.version == 4 else 4)) + ip.packed + struct.pack(">H", port)


def socks4_reply(ok: bool, address: str | None = None, port: int = 0) -> bytes:
    ip = ipaddress.IPv4Address(address or "0.0.0.0")
    return bytes((0, 0x5A if ok else 0x5B)) + struct.pack(">H", port) + ip.packed


class SocksParser:
    """Sans-IO SOCKS handshake. ``receive(data) -> bytes to send``; then check :attr:`request`.

    Raises:
        SocksError: the client must get ``exc.reply`` (may be empty) and be disconnected.
    """

    def __init__(self, client_address: tuple | None = None):
        self._buf = bytearray()
        self._state = "start"
        self._version = 0
        self._user: bytes | None = None
        self._pass: bytes | None = None
        self.client_address = client_address
        self.request: SocksRequest | None = None

    def receive(self, data: bytes) -> bytes:
        if self.request is not None:
            raise SocksError("data after the request before the reply")
        self._buf += data
        if len(self._buf) > MAX_HANDSHAKE_BYTES:
            raise SocksError("SOCKS handshake too long", self._fail_reply())
        out = bytearray()
        while self.request is None:
            step = getattr(self, f"_{self._state}")()
            if step is None:
                break
            out += step
        return bytes(out)

    def _fail_reply(self) -> bytes:
        if self._version == 4:
            return socks4_reply(False)
        if self._state == "request":
            return socks5_reply(GENERAL_FAILURE)
        return b""

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _cstring(self, limit: int = 255) -> bytes | None:
        i = self._buf.find(b"\0")
        if i < 0:
            if len(self._buf) > limit:
                raise SocksError("SOCKS4 string too long", socks4_reply(False))
            return None
        if i > limit:
            raise SocksError("SOCKS4 string too long", socks4_reply(False))
        s = bytes(self._buf[:i])
        del self._buf[: i + 1]
        return s

    def _start(self) -> bytes | None:
        if not self._buf:
            return None
        first = self._buf[0]
        if first == 4:
            self._version = 4
            self._state = "socks4"
            return b""
        if first == 5:
            self._version = 5
            self._state = "greeting"
            return b""
        if first in _HTTP_FIRST:
            raise SocksError("an HTTP request on the SOCKS port", HTTP_NOT_A_PROXY)
        raise SocksError(f"unknown SOCKS version {first}")

    # -- SOCKS4 / 4a --------------------------------------------------------------------------

    def _socks4(self) -> bytes | None:
        if len(self._buf) < 8:
            return None
        head = bytes(self._buf[:8])
        _vn, cd, port = struct.unpack(">BBH", head[:4])
        rest = self._buf[8:]
        nul = rest.find(b"\0")
        if nul < 0:
            if len(rest) > 255:
                raise SocksError("SOCKS4 user id too long", socks4_reply(False))
            return None
        ip = ipaddress.IPv4Address(head[4:8])
        is_4a = head[4:7] == b"\0\0\0" and head[7] != 0
        host = None
        if is_4a:
            rest2 = rest[nul + 1:]
            nul2 = rest2.find(b"\0")
            if nul2 < 0:
                if len(rest2) > 255:
                    raise SocksError("SOCKS4a hostname too long", socks4_reply(False))
                return None
            host = _hostname(bytes(rest2[:nul2]), socks4_reply(False))
            consumed = 8 + nul + 1 + nul2 + 1
        else:
            host = str(ip)
            consumed = 8 + nul + 1
        userid = bytes(rest[:nul])
        del self._buf[:consumed]
        if cd == 1:
            command = "connect"
        elif cd == 0xF0:
            command = "resolve"
        else:
            raise SocksError(f"SOCKS4 command {cd} not supported", socks4_reply(False))
        if command == "connect" and port == 0:
            raise SocksError("SOCKS4 port 0", socks4_reply(False))
        self.request = SocksRequest(4, command, host, port, userid or None, None, self.client_address)
        return b""

    # -- SOCKS5 -------------------------------------------------------------------------------------

    def _greeting(self) -> bytes | None:
        if len(self._buf) < 2:
            return None
        n = self._buf[1]
        if n == 0:
            raise SocksError("SOCKS5 greeting offers no method", b"\x05\xff")
        if len(self._buf) < 2 + n:
            return None
        methods = bytes(self._buf[2 : 2 + n])
        del self._buf[: 2 + n]
        if 2 in methods:
            self._state = "userpass"
            return b"\x05\x02"
        if 0 in methods:
            self._state = "request"
            return b"\x05\x00"
        raise SocksError("no acceptable SOCKS5 authentication method", b"\x05\xff")

    def _userpass(self) -> bytes | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        if buf[0] != 1:
            raise SocksError("bad username/password subnegotiation version", b"\x01\x01")
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return None
        self._user = bytes(buf[2 : 2 + ulen])
        self._pass = bytes(buf[3 + ulen : 3 + ulen + plen])
        del buf[: 3 + ulen + plen]
        self._state = "request"
        return b"\x01\x00"  # any credentials are accepted: they only select isolation

    def _request(self) -> bytes | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        ver, cmd, _rsv, atyp = buf[0], buf[1], buf[2], buf[3]
        if ver != 5:
            raise SocksError("bad SOCKS5 request version", socks5_reply(GENERAL_FAILURE))
        if atyp == 1:
            need = 4 + 4 + 2
        elif atyp == 4:
            need = 4 + 16 + 2
        elif atyp == 3:
            need = 4 + 1 + buf[4] + 2
        else:
            raise SocksError(f"address type {atyp} not supported", socks5_reply(ATYP_NOT_SUPPORTED))
        if len(buf) < need:
            return None
        raw = bytes(buf[:need])
        del buf[:need]
        port = struct.unpack(">H", raw[-2:])[0]
        if atyp == 1:
            host = str(ipaddress.IPv4Address(raw[4:8]))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(raw[4:20]))
        else:
            host = _hostname(raw[5:-2], socks5_reply(GENERAL_FAILURE))
        if cmd == 1:
            command = "connect"
        elif cmd == 0xF0:
            command = "resolve"
        elif cmd == 0xF1:
            command = "resolve_ptr"
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise SocksError("RESOLVE_PTR needs an IP address", socks5_reply(GENERAL_FAILURE)) from None
        else:
            raise SocksError(f"SOCKS5 command {cmd} not supported", socks5_reply(CMD_NOT_SUPPORTED))
        if command == "connect" and port == 0:
            raise SocksError("SOCKS5 CONNECT to port 0", socks5_reply(GENERAL_FAILURE))
        self.request = SocksRequest(5, command, host, port, self._user, self._pass, self.client_address)
        return b""


def _hostname(raw: bytes, reply: bytes) -> str:
    try:
        host = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SocksError("non-ASCII hostname", reply) from None
    if not host or not host.isprintable() or any(c in host for c in " /\\\0"):
        raise SocksError("malformed hostname", reply)
    return host


class SocksServer:
    """The SOCKS listener. ``await start()``; ``port``; ``await stop()``."""

    def __init__(self, backend: SocksBackend, *, host: str = "127.0.0.1", port: int = 9050,
                 handshake_timeout: float = 30.0, max_connections: int = 4096):
        self.backend = backend
        self.host = host
        self.port = port
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.stats = {"connections": 0, "streams_ok": 0, "streams_failed": 0, "rejected": 0}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.stats["connections"] += 1
        try:
            if len(self._tasks) > self.max_connections:
                self.stats["rejected"] += 1
                return
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         parser: SocksParser) -> SocksRequest | None:
        async with asyncio.timeout(self.handshake_timeout):
            while parser.request is None:
                data = await reader.read(512)
                if not data:
                    return None
                out = parser.receive(data)
                if out:
                    writer.write(out)
                    await writer.drain()
        return parser.request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = SocksParser(writer.get_extra_info("peername"))
        try:
            req = await self._handshake(reader, writer, parser)
        except SocksError as exc:
            self.stats["rejected"] += 1
            log.info("SOCKS request refused", error=str(exc))
            if exc.reply:
                writer.write(exc.reply)
                await writer.drain()
            return
        except TimeoutError:
            self.stats["rejected"] += 1
            log.info("SOCKS handshake timed out")
            return
        if req is None:
            return
        if req.command == "connect":
            await self._connect(req, reader, writer)
        else:
            await self._resolve(req, writer)

    def _failure(self, req: SocksRequest, code: int) -> bytes:
        return socks4_reply(False) if req.version == 4 else socks5_reply(code)

    async def _connect(self, req: SocksRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from .client import StreamError

        try:
            o_reader, o_writer = await self.backend.open_stream(req)
        except StreamError as exc:
            self.stats["streams_failed"] += 1
            writer.write(self._failure(req, reply_code_for(exc.reason)))
            await writer.drain()
            return
        except (OnionError, OSError, asyncio.TimeoutError) as exc:
            self.stats["streams_failed"] += 1
            log.info("SOCKS stream failed", error=str(exc) or type(exc).__name__)
            writer.write(self._failure(req, GENERAL_FAILURE))
            await writer.drain()
            return
        self.stats["streams_ok"] += 1
        writer.write(socks4_reply(True) if req.version == 4 else socks5_reply(SUCCEEDED))
        try:
            await writer.drain()
            await _pipe_both(reader, writer, o_reader, o_writer)
        finally:
            o_writer.close()

    async def _resolve(self, req: SocksRequest, writer: asyncio.StreamWriter) -> None:
        from .client import StreamError

        try:
            if req.command == "resolve":
                addrs = await self.backend.resolve(req)
                if not addrs:
                    raise StreamError("no answer", EndReason.RESOLVEFAILED)
                ip = next((a for a in addrs if ipaddress.ip_address(a).version == 4), addrs[0])
                if req.version == 4:
                    if ipaddress.ip_address(ip).version != 4:
                        raise StreamError("no IPv4 answer", EndReason.RESOLVEFAILED)
                    reply = socks4_reply(True, ip)
                else:
                    reply = socks5_reply(SUCCEEDED, ip)
            else:
                name = await self.backend.resolve_ptr(req)
                reply = socks5_reply(SUCCEEDED, hostname=name)
        except StreamError as exc:
            reply = self._failure(req, reply_code_for(exc.reason))
        except (OnionError, OSError, asyncio.TimeoutError, ValueError):
            reply = self._failure(req, GENERAL_FAILURE)
        writer.write(reply)
        await writer.drain()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass


async def _pipe_both(a_reader, a_writer, b_reader, b_writer) -> None:
    """Relay both ways; when either direction ends, close both (tor has no half-close)."""
    t1 = asyncio.ensure_future(_pipe(a_reader, b_writer))
    t2 = asyncio.ensure_future(_pipe(b_reader, a_writer))
    try:
        await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
        if t2.done() and not t1.done():
            # the onion stream ended: flush what we have to the application, then close
            try:
                await asyncio.wait_for(a_writer.drain(), 10)
            except (ConnectionError, asyncio.TimeoutError):
                pass
    finally:
        for t in (t1, t2):
            t.cancel()
        await asyncio.gather(t1, t2, return_exceptions=True)
