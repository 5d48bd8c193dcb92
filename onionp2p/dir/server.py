"""A minimal, strict HTTP/1.0 server and client for directory documents (specs/directory.md).

Theory of operation
-------------------
Authorities serve their DirPort and relays serve BEGIN_DIR streams with the same tiny
HTTP/1.0 dialect, as tor does: one request per connection, then the server closes.

* The request head is parsed by the pure :func:`parse_request_head`: a request line
  ``METHOD SP PATH SP HTTP/1.0|HTTP/1.1``, then ``Name: value`` headers, at most
  :data:`MAX_HEAD` bytes in all. Only GET and POST exist; a POST must carry a
  ``Content-Length`` no larger than the server's ``max_body`` (``Transfer-Encoding`` is
  refused). Violations become 4xx/5xx answers, never exceptions in the server.
* The whole request must arrive within ``timeout`` seconds and at most
  ``max_connections`` requests are served at once; extra connections are closed.
* :class:`DirServer` hands each :class:`HttpRequest` to an async handler that returns an
  :class:`HttpResponse`. The answer is ``HTTP/1.0 STATUS REASON`` with ``Content-Type`` and
  ``Content-Length``; then the connection is closed.
* :func:`http_request` is the client half over any ``(StreamReader, StreamWriter)`` pair
  (a TCP connection or a BEGIN_DIR stream). The response size is bounded; a malformed
  response raises :class:`~onionp2p.errors.ProtocolError`, a failed transfer or a status
  other than 200 raises :class:`DirRequestError`. :func:`fetch` opens a TCP connection.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from onionp2p.errors import ListenError, OnionError, ProtocolError
from onionp2p.log import get_logger

__all__ = [
    "MAX_HEAD",
    "DirRequestError",
    "DirServer",
    "HttpRequest",
    "HttpResponse",
    "fetch",
    "http_request",
    "parse_request_head",
    "parse_response_head",
]

log = get_logger("onionp2p.dirserver")

#: Largest request or response head (request line/status line + headers).
MAX_HEAD = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")
_STATUS = re.compile(r"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [\x20-\x7e]*)?")


class DirRequestError(OnionError):
    """A directory request failed: connection, timeout, or a non-200 answer (``status``)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"

    def encode(self) -> bytes:
        head = (f"HTTP/1.0 {self.status} {_REASONS.get(self.status, 'Unknown')}\r\n"
                f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n\r\n")
        return head.encode("ascii") + self.body


class _HttpFail(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise ProtocolError(f"malformed header line {line[:60]!r}")
        key = name.lower()
        if key in headers:
            raise ProtocolError(f"header {name!r} repeated")
        headers[key] = value.strip(" \t")
    return headers


def _split_head(head: bytes) -> list[str]:
    if len(head) > MAX_HEAD:
        raise ProtocolError("HTTP head too large")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("HTTP head is not ASCII") from None
    if not text.endswith("\r\n\r\n"):
        raise ProtocolError("HTTP head must end with an empty line")
    lines = text[:-4].split("\r\n")
    if any(not re.fullmatch(r"[\x20-\x7e\t]*", ln) for ln in lines):
        raise ProtocolError("control characters in HTTP head")
    return lines


def parse_request_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Parse a request head (through the empty line) into (method, path, headers).

    Raises ProtocolError if malformed.
    """
    lines = _split_head(head)
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not _TOKEN.fullmatch(parts[0]):
        raise ProtocolError(f"malformed request line {lines[0][:80]!r}")
    if not _PATH.fullmatch(parts[1]):
        raise ProtocolError("malformed request path")
    return parts[0], parts[1], _headers(lines[1:])


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Parse a response head into (status, headers); ProtocolError if malformed."""
    lines = _split_head(head)
    m = _STATUS.fullmatch(lines[0])
    if not m:
        raise ProtocolError(f"malformed HTTP status line {lines[0][:80]!r}")
    return int(m.group(1)), _headers(lines[1:])


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,12}", value):
        raise ProtocolError("bad Content-Length")
    return int(value)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class DirServer:
    """Serve ``handler`` over HTTP/1.0 on ``host:port`` (port 0 = any free port)."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                 max_body: int = 64 * 1024, timeout: float = 10.0, max_connections: int = 64,
                 name: str = "dirserver", kind: str = "directory port"):
        self.handler = handler
        self.kind = kind  #: what a failure to listen calls this listener
        self.host = host
        self.port = port
        self.max_body = max_body
        self.timeout = timeout
        self.max_connections = max_connections
        self.requests = 0
        self._active = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._log = log.bind(server=name)

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                      limit=MAX_HEAD + 1, reuse_address=True)
        except OSError as exc:
            raise ListenError.from_os_error(self.kind, self.host, self.port, exc) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _read_request(self, reader: asyncio.StreamReader) -> HttpRequest:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _HttpFail(400, "request head too large") from None
        except asyncio.IncompleteReadError:
            raise _HttpFail(400, "incomplete request") from None
        try:
            method, path, headers = parse_request_head(head)
            length = _content_length(headers)
        except ProtocolError as exc:
            raise _HttpFail(400, str(exc)) from None
        if "transfer-encoding" in headers:
            raise _HttpFail(501, "Transfer-Encoding is not supported")
        if method not in ("GET", "POST"):
            raise _HttpFail(405, f"method {method} not allowed")
        body = b""
        if method == "POST":
            if length is None:
                raise _HttpFail(411, "POST needs Content-Length")
            if length > self.max_body:
                raise _HttpFail(413, f"body larger than {self.max_body} bytes")
            try:
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise _HttpFail(400, "body shorter than Content-Length") from None
        elif length:
            raise _HttpFail(400, "GET with a body")
        return HttpRequest(method, path, headers, body)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._active += 1
        try:
            if self._active > self.max_connections:
                resp = HttpResponse(503, b"too many connections\n")
            else:
                try:
                    async with asyncio.timeout(self.timeout):
                        req = await self._read_request(reader)
                    self.requests += 1
                    resp = await self.handler(req)
                    self._log.debug("directory request", method=req.method, path=req.path, status=resp.status)
                except _HttpFail as exc:
                    self._log.info("bad directory request", status=exc.status, error=str(exc))
                    resp = HttpResponse(exc.status, f"{exc}\n".encode())
                except TimeoutError:
                    resp = HttpResponse(408, b"request timed out\n")
                except OnionError as exc:
                    resp = HttpResponse(400, f"{exc}\n".encode()[:1000])
                except (ConnectionError, OSError):
                    raise
                except Exception:  # a handler bug must not kill the server
                    self._log.exception("directory request handler failed")
                    resp = HttpResponse(500, b"internal error\n")
            writer.write(resp.encode())
            async with asyncio.timeout(self.timeout):
                await writer.drain()
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            self._active -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()


async def http_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                       body: bytes = b"", *, max_size: int, timeout: float = 30.0) -> bytes:
    """Send one request and return the body of a 200 answer (at most ``max_size`` bytes).

    Raises DirRequestError (transfer failed, timeout, non-200) or ProtocolError (malformed).
    """
    req = f"{method} {path} HTTP/1.0\r\n"
    if method == "POST":
        req += f"Content-Length: {len(body)}\r\n"
    try:
        async with asyncio.timeout(timeout):
            writer.write(req.encode("ascii") + b"\r\n" + body)
            await writer.drain()
            buf = bytearray()
            while b"\r\n\r\n" not in buf:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ProtocolError("connection closed before the HTTP response head")
                buf += chunk
                if len(buf) > MAX_HEAD + max_size:
                    raise ProtocolError("HTTP response too large")
            end = buf.index(b"\r\n\r\n") + 4
            status, headers = parse_response_head(bytes(buf[:end]))
            length = _content_length(headers)
            data = buf[end:]
            while length is None or len(data) < length:
                if len(data) > max_size:
                    raise ProtocolError(f"HTTP response body larger than {max_size} bytes")
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
            if len(data) > max_size:
                raise ProtocolError(f"HTTP response body larger than {max_size} bytes")
            if length is not None and len(data) != length:
                raise ProtocolError("HTTP response body does not match its Content-Length")
    except TimeoutError:
        raise DirRequestError(f"{method} {path}: timed out") from None
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
        raise DirRequestError(f"{method} {path}: {exc or type(exc).__name__}") from None
    finally:
        writer.close()
    if status != 200:
        raise DirRequestError(f"{method} {path}: HTTP {status}: {bytes(data[:200]).decode('ascii', 'replace').strip()}",
                              status)
    return bytes(data)


async def fetch(host: str, port: int, path: str, body: bytes | None = None, *, max_size: int = 1 << 20,
                timeout: float = 30.0) -> bytes:
    """GET ``path`` (or POST ``body``) from the HTTP server at ``host:port``."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD + 1)
    except TimeoutError:
        raise DirRequestError(f"connect to directory {host}:{port} timed out") from None
    except OSError as exc:
        raise DirRequestError(f"cannot connect to directory {host}:{port}: {exc.strerror or exc}") from None
    return await http_request(reader, writer, "GET" if body is None else "POST", path, body or b"",
                              max_size=max_size, timeout=timeout)
