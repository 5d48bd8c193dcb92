"""SOCKS front end: SOCKS4, SOCKS4a and SOCKS5 with Tor's extensions (specs/socks.md).

Theory of operation
-------------------
Applications reach the onion network through a local SOCKS port, as with tor's
SocksPort. The module has two layers.

*Sans-IO core.* :class:`SocksParser` is a state machine fed with whatever bytes arrive
(:meth:`SocksParser.receive_data`). It returns events: :class:`SendReply` (bytes the
server must write back before the client goes on: SOCKS5 method choice, RFC 1929
status) and finally :class:`RequestReady` with a :class:`SocksRequest` and any bytes the
client sent after its request (optimistic data). Anything malformed or unsupported
raises :class:`SocksError` whose ``reply`` holds the exact bytes to send before closing
(a SOCKS5/SOCKS4 error reply, the "not an HTTP proxy" page for :class:`NotSocksError`,
or nothing when the first byte names no SOCKS version). Every message has a fixed upper
size, so the parser never buffers more than :data:`MAX_MESSAGE` bytes; a client that
stops half-way is the server's business (the handshake timeout). The reply encoders
(:func:`socks5_reply`, :func:`socks4_reply`, :func:`reply_for`) and the mapping from
RELAY_END reasons to SOCKS5 codes (:func:`reply_code_for`, tor's
``stream_end_reason_to_socks5_response``) are pure functions too.

*asyncio shell.* :class:`AppProxyServer` is what every application front end shares
(this SOCKS port and the HTTP CONNECT port of :mod:`onionp2p.client.httptunnel`): the
listener, the connection bound, the one path that opens a stream (:meth:`AppProxyServer.open_stream`)
and the splice (:meth:`AppProxyServer.tunnel`). :class:`SocksServer` listens (127.0.0.1 by
default), runs the parser under ``handshake_timeout`` with bounded reads, and hands each
request to a :class:`SocksBackend` — the client node in production. CONNECT gets the success
reply once the backend returns a stream (a ``StreamReader``/``StreamWriter`` pair),
then :func:`onionp2p.client.splice.start_splice` copies bytes each way in the transports'
own callbacks, a full side pausing the other (down to the stream's SENDME windows or XOFF);
the connection's task ends there, and the splice's end closes the connection.
When one side reaches EOF the other is flushed and closed: tor streams have no half-close.
RESOLVE (0xF0) and RESOLVE_PTR (0xF1) are answered in BND.ADDR and the connection is
closed. Hostnames are never resolved locally: they go to the exit inside BEGIN or
RESOLVE (no DNS leak); a RESOLVE of an IP literal is answered at once, as tor does.
A ``.onion`` name never goes to an exit: a malformed or checksum-broken one is refused at
once (reply 1, X'F6' with ExtendedErrors); a valid v3 one goes to the backend, which reaches
the onion service (descriptor, rendezvous; :mod:`onionp2p.client.hsclient`), and its failures
are answered with tor's extended codes X'F0'-X'F7' when ``extended_errors`` is on (else 4,
host unreachable, as tor). RESOLVE of a valid ``.onion`` is answered "host unreachable".

*Isolation.* :attr:`SocksRequest.isolation_key` follows tor's defaults:
IsolateSOCKSAuth (SOCKS5 username and password, or the SOCKS4 userid; empty
credentials are the same as none), IsolateClientAddr (the client's IP, not its port)
and one session group per listener (separate SOCKS ports never share circuits).
IsolateClientProtocol is off in tor, so the SOCKS version is not part of the key.
"""


from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from onionp2p.client.hsclient import HsConnectError
from onionp2p.client.leanstreams import start_server
from onionp2p.client.splice import Splice, start_splice
from onionp2p.errors import ListenError, OnionAddressError, OnionError
from onionp2p.log import get_logger
from onionp2p.proto.hs.address import is_onion_name, parse_onion_address
from onionp2p.proto.hs.client import SOCKS_REPLY
from onionp2p.proto.relaycell import Resolved, ResolvedType
from onionp2p.proto.socks import (  # noqa: F401
    HTTP_NOT_SOCKS_ANSWER,
    MAX_FIELD,
    MAX_MESSAGE,
    SOCKS4_GRANTED,
    SOCKS4_REJECTED,
    IsolationKey,
    NotSocksError,
    ParserState,
    Reply,
    RequestReady,
    SendReply,
    SocksError,
    SocksParser,
    SocksRequest,
    _ip_version,
    reply_code_for,
    reply_code_for_error,
    reply_for,
    socks4_reply,
    socks5_reply,
)

__all__ = [
    "AppProxyServer",
    "SocksBackend",
    "SocksServer",
    "SocksStats",
    "addresses_from_resolved",
    "check_onion",
    "extended_code",
    "hostname_from_resolved",
]

log = get_logger("onionp2p.socks")


# -- backends --------------------------------------------------------------------------------------


@runtime_checkable
class SocksBackend(Protocol):
    """What the SOCKS server needs from the rest of the client (``node.ClientNode``).

    Every method may raise :class:`~onionp2p.client.client.StreamError` (its ``reason`` picks
    the reply code) or :class:`~onionp2p.client.client.CircuitError`. Use
    ``req.isolation_key`` to choose the circuit.
    """

    async def open_stream(self, req: SocksRequest) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """BEGIN ``req.host:req.port`` (hostnames resolved at the exit)."""

    async def resolve(self, req: SocksRequest) -> list[str]:
        """RESOLVE ``req.host`` at an exit: IP literals, best first; [] if none."""

    async def resolve_ptr(self, req: SocksRequest) -> str:
        """Reverse lookup of the IP ``req.host`` at an exit: a hostname ("" if none)."""


def addresses_from_resolved(resolved: Resolved) -> list[str]:
    """The IPv4/IPv6 answers of a RESOLVED message as text, in order (errors skipped)."""
    return [text for a in resolved.answers
            if a.atype in (ResolvedType.IPV4, ResolvedType.IPV6) and (text := a.value_text())]


def hostname_from_resolved(resolved: Resolved) -> str:
    """The first hostname answer of a RESOLVED message, or "" if there is none."""
    for a in resolved.answers:
        if a.atype == ResolvedType.HOSTNAME and a.value:
            return a.value_text() or ""
    return ""


# -- the server --------------------------------------------------------------------------------------

_session_groups = itertools.count(1)
HANDSHAKE_READ = 4096      # bytes per read while handshaking (the parser bounds what it keeps)
RELAY_CHUNK = 65536        # the connection's StreamReader limit (during the handshake)
CLOSE_FLUSH_TIMEOUT = 5.0  # how long a last reply or the last data may take to flush before we abort
REFUSED_LOG_INTERVAL = 60.0  # at most one "too many connections" warning per interval


@dataclass
class SocksStats:
    """Counters of one :class:`SocksServer`."""

    connections: int = 0        # accepted since start
    active: int = 0             # open right now
    streams_ok: int = 0         # CONNECTs answered with success
    streams_failed: int = 0     # CONNECTs answered with an error reply
    resolves_ok: int = 0
    resolves_failed: int = 0
    handshake_failed: int = 0   # malformed/unsupported/HTTP, timeout or EOF before a request
    bytes_up: int = 0           # client -> network
    bytes_down: int = 0         # network -> client


class AppProxyServer:
    """What every application front end shares (SOCKS here, HTTP CONNECT in
    :mod:`onionp2p.client.httptunnel`): the listener, the connection bound, the one path that
    opens a stream through the network (:meth:`open_stream`) and the splice that copies bytes
    both ways (:meth:`tunnel`). A subclass implements :meth:`_serve` (its handshake)."""

    kind = "application"  # for log lines

    def __init__(self, backend: SocksBackend, *, host: str = "127.0.0.1", port: int = 0,
                 handshake_timeout: float = 30.0, connect_timeout: float = 120.0,
                 max_connections: int = 1024, session_group: Hashable = None):
        self.backend = backend
        self.host = host
        self._port = port
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._refused = 0  # refused over max_connections since the last warning
        self._refused_logged_at = -REFUSED_LOG_INTERVAL
        self.session_group = session_group if session_group is not None else next(_session_groups)
        self.stats = SocksStats()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        #: connections handed to a splice (their task has ended): application transport -> splice
        self._spliced: dict[asyncio.BaseTransport, Splice] = {}
        self._stopping = False

    @property
    def port(self) -> int:
        """The port actually listened on (after :meth:`start`; the configured one before)."""
        return self._port

    async def start(self) -> None:
        self._stopping = False
        try:
            self._server = await start_server(self._handle, self.host, self._port,
                                              reuse_address=True, limit=RELAY_CHUNK)
        except OSError as exc:
            raise ListenError.from_os_error(f"{self.kind} port", self.host, self._port, exc) from None
        self._port = self._server.sockets[0].getsockname()[1]
        log.info(f"{self.kind} listener open", listen_port=self._port)

    async def stop(self) -> None:
        """Close the listener and every client connection (their streams get END)."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for sp in list(self._spliced.values()):
            sp.stop()  # END on the stream; its on_done aborts the application's connection
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- per connection --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        self.stats.active += 1
        peer = writer.get_extra_info("peername")
        try:
            if self._stopping:
                return
            if len(self._tasks) + len(self._spliced) > self.max_connections:
                self._refused += 1
                now = time.monotonic()
                if now - self._refused_logged_at >= REFUSED_LOG_INTERVAL:
                    log.warning(f"too many {self.kind} connections; refusing new ones",
                                limit=self.max_connections, refused=self._refused)
                    self._refused_logged_at, self._refused = now, 0
                return
            await self._serve(reader, writer, peer)
        except (ConnectionError, OSError):
            pass  # the client went away
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # cancelled by stop(): end normally (asyncio 3.11 logs cancelled handler tasks)
        finally:
            self._tasks.discard(task)
            if writer.transport not in self._spliced:  # else the splice's end closes it
                self._closed(writer.transport)

    def _closed(self, transport: asyncio.BaseTransport) -> None:
        """The end of a client connection (once, by its task or by its splice)."""
        self.stats.active -= 1
        if self._stopping:
            transport.abort()  # type: ignore[attr-defined]
        else:
            transport.close()  # flushes what is queued, then FIN

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any) -> None:
        """One client connection: handshake, then :meth:`tunnel` (the caller closes ``writer``,
        unless :meth:`tunnel` handed it to a splice)."""
        raise NotImplementedError

    async def _send_final(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write a last reply and give it a bounded time to leave; the caller closes."""
        if not data:
            return
        writer.write(data)
        try:
            async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()

    async def _call(self, coro: Any) -> Any:
        async with asyncio.timeout(self.connect_timeout):
            return await coro

    def _failed(self, req: SocksRequest, exc: Exception) -> int:
        """Log a failed backend call; the SOCKS5 reply code for it (front ends translate it)."""
        code = reply_code_for_error(exc)
        if isinstance(exc, (OnionError, TimeoutError)):
            log.info(f"{self.kind} request failed", command=req.command, error=repr(exc), reply=int(code),
                     target=req.host)
        else:  # a broken backend must still answer the client
            log.error(f"{self.kind} backend raised", command=req.command, exc_info=exc, target=req.host)
        return code

    async def open_stream(self, req: SocksRequest) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The stream for a CONNECT, through the network: the one path every front end uses.

        Raises:
            StreamError, CircuitError, TimeoutError: the stream could not be opened
                (:meth:`_failed` maps any exception to a reply code)."""
        if is_onion_name(req.host):  # never to an exit: a bad name is refused here, at once;
            check_onion(req.host)  # a valid one the backend reaches as an onion service
        return await self._call(self.backend.open_stream(req))

    async def tunnel(self, req: SocksRequest, extra: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, *, success: bytes,
                     failure: Callable[[int], bytes]) -> None:
        """Open ``req``'s stream; answer ``success`` then hand both sides to a splice (the
        connection's task ends; the splice's end closes the connection), or answer
        ``failure(code)`` (``code`` a SOCKS5 reply code, see :func:`reply_code_for_error`).
        ``extra``: bytes the client sent after its request, forwarded first."""
        try:
            sreader, swriter = await self.open_stream(req)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
            self.stats.streams_failed += 1
            await self._send_final(writer, failure(self._failed(req, exc)))
            return
        self.stats.streams_ok += 1
        try:
            writer.write(success)
            await writer.drain()
        except BaseException:
            swriter.close()
            raise
        ta = writer.transport
        if self._stopping or ta.is_closing():
            swriter.close()
            return
        # on_done is never called before start_splice returns, so _handle sees the handover
        self._spliced[ta] = start_splice(
            (reader, writer), (sreader, swriter), first=extra, stats=self.stats, up="bytes_up",
            down="bytes_down", flush_timeout=CLOSE_FLUSH_TIMEOUT,
            on_done=lambda: self._splice_done(ta), release=True)

    def _splice_done(self, transport: asyncio.BaseTransport) -> None:
        if self._spliced.pop(transport, None) is not None:
            self._closed(transport)


def check_onion(host: str) -> None:
    """Raise the typed :class:`~onionp2p.errors.OnionAddressError` if ``host`` (a .onion name)
    is not a valid v3 address (tor: SOCKS5 reply 1, or X'F6' with ExtendedErrors)."""
    try:
        parse_onion_address(host)
    except OnionAddressError as exc:
        log.warning("invalid onion address refused", error=str(exc), kind=type(exc).__name__)
        raise


def extended_code(exc: BaseException) -> int | None:
    """The SOCKS5 extended error (tor's ExtendedErrors, proposal 304) for ``exc``, if any."""
    if isinstance(exc, OnionAddressError):
        return Reply.HS_BAD_ADDRESS
    if isinstance(exc, HsConnectError):  # descriptor / introduction / rendezvous failures
        return SOCKS_REPLY.get(exc.kind)
    return None


class SocksServer(AppProxyServer):
    """A SOCKS4/4a/5 listener that sends every request to ``backend``.

    ``extended_errors``: tor's SocksPort flag ExtendedErrors: onion-service failures are
    answered with the X'F0'-X'F7' reply codes instead of the RFC 1928 ones (SOCKS5 only).
    """

    kind = "SOCKS"

    def __init__(self, backend: SocksBackend, *, host: str = "127.0.0.1", port: int = 9050,
                 handshake_timeout: float = 30.0, connect_timeout: float = 120.0,
                 prefer_no_auth: bool = False, max_connections: int = 1024,
                 session_group: Hashable = None, extended_errors: bool = False):
        super().__init__(backend, host=host, port=port, handshake_timeout=handshake_timeout,
                         connect_timeout=connect_timeout, max_connections=max_connections,
                         session_group=session_group)
        self.prefer_no_auth = prefer_no_auth
        self.extended_errors = extended_errors

    def _failed(self, req: SocksRequest, exc: Exception) -> int:
        code = super()._failed(req, exc)
        if self.extended_errors and req.version == 5:
            return extended_code(exc) or code
        return code

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any) -> None:
        got = await self._handshake(reader, writer, peer)
        if got is not None:
            req, extra = got
            if req.command == "connect":
                await self.tunnel(req, extra, reader, writer, success=reply_for(req.version, Reply.SUCCEEDED),
                                  failure=lambda code: reply_for(req.version, code))
            else:
                await self._resolve(req, writer)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         peer: Any) -> tuple[SocksRequest, bytes] | None:
        parser = SocksParser(client_address=peer, session_group=self.session_group,
                             prefer_no_auth=self.prefer_no_auth)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                while True:
                    data = await reader.read(HANDSHAKE_READ)
                    if not data:
                        self.stats.handshake_failed += 1
                        return None
                    for event in parser.receive_data(data):
                        if isinstance(event, RequestReady):
                            return event.request, event.extra
                        writer.write(event.data)
                        await writer.drain()
        except SocksError as exc:
            self.stats.handshake_failed += 1
            log.info("SOCKS request refused", error=str(exc), client=peer)
            await self._send_final(writer, exc.reply)
        except TimeoutError:
            self.stats.handshake_failed += 1
            log.info("SOCKS handshake timed out", client=peer, state=parser.state.value)
        return None

    async def _resolve(self, req: SocksRequest, writer: asyncio.StreamWriter) -> None:
        answer: str | None = None
        try:
            if req.command == "resolve_ptr":
                name = await self._call(self.backend.resolve_ptr(req))
                if name and name.isascii() and len(name) <= MAX_FIELD:
                    answer = name
            elif req.host_kind != "domain":  # an IP literal resolves to itself, locally (as in tor)
                answer = _pick_address([req.host], req.version)
            elif is_onion_name(req.host):
                check_onion(req.host)  # a valid one cannot be resolved: tor answers "unreachable"
            else:
                addrs = await self._call(self.backend.resolve(req))
                answer = _pick_address(addrs, req.version)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a SOCKS reply
            self.stats.resolves_failed += 1
            await self._send_final(writer, reply_for(req.version, self._failed(req, exc)))
            return
        if answer is None:
            self.stats.resolves_failed += 1
        else:
            self.stats.resolves_ok += 1
        code = Reply.HOST_UNREACHABLE if answer is None else Reply.SUCCEEDED
        await self._send_final(writer, reply_for(req.version, code, answer))


def _pick_address(addrs: list[str], version: int) -> str | None:
    """The answer to return: the first IPv4 address, else (SOCKS5) the first IPv6 one."""
    for want in (4, 6) if version == 5 else (4,):
        for a in addrs:
            if _ip_version(a) == want:
                return str(ipaddress.ip_address(a))
    return None
