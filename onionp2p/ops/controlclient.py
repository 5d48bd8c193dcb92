"""Looking into a running node through its control port: a small asyncio controller
(used by ``onionp2p circuits``, ``onionp2p top`` and tools/circuit_graph.py).

Theory of operation
-------------------
onionp2p's control port speaks tor's control protocol (specs/control.md), so this is a
controller for it — and works against tor too. It is written directly on asyncio instead
of stem because its users (textual's event loop, rich's Live display, the tests'
in-process nodes) are asyncio programs, stem is thread-based and only a test dependency,
and the protocol subset needed is small. The pure half — reply framing, line parsers,
records and the live :class:`~onionp2p.ops.model.NetworkView` — is
:mod:`onionp2p.ops.model`; its public names are re-exported here.

:class:`ControlClient` owns one TCP connection. A reader task assembles replies; command
replies resolve the futures of :meth:`ControlClient.request` in order (the protocol
answers commands in order); events go to a queue read with :meth:`ControlClient.events`
(when more than ``max_events`` wait, the oldest are dropped and counted in
``dropped_events``). :meth:`ControlClient.authenticate` sends PROTOCOLINFO and uses, in
this order: the password (HASHEDPASSWORD) if one is given, SAFECOOKIE, COOKIE (cookie
from ``cookie_path`` or the COOKIEFILE the node names), NULL. SAFECOOKIE checks the
node's SERVERHASH before answering, so a port that does not know the cookie learns
nothing about it.

:func:`open_view` connects, subscribes to events and loads a snapshot (one GETINFO).
Events received before the snapshot's reply are already reflected in it, so they are
skipped — each event carries the number of replies received before it — and applying
the rest never moves the view backwards.

Errors are typed: :class:`InspectError` (connection problems, unreadable replies),
:class:`ControlReplyError` (a non-2xx reply), :class:`AuthenticationError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from onionp2p.ops.model import (
    DEFAULT_CONTROL_PORT,
    SNAPSHOT_KEYS,
    WATCH_EVENTS,
    AuthenticationError,
    Circuit,
    ControlReplyError,
    Event,
    Hop,
    InspectError,
    LogLine,
    NetworkView,
    OrConn,
    Reply,
    ReplyAssembler,
    Router,
    Stream,
    as_event,
    hop_role,
    parse_address,
    parse_circuit,
    parse_keywords,
    parse_ns,
    parse_orconn,
    parse_protocolinfo,
    parse_stream,
    split_line,
)

__all__ = [
    "ControlTarget", "ControlClient", "open_view",
    # re-exported from onionp2p.inspectmodel
    "DEFAULT_CONTROL_PORT", "WATCH_EVENTS", "SNAPSHOT_KEYS", "InspectError", "ControlReplyError",
    "AuthenticationError", "Reply", "Event", "ReplyAssembler", "Hop", "Circuit", "Stream", "OrConn", "Router",
    "LogLine", "NetworkView", "hop_role", "parse_circuit", "parse_stream", "parse_orconn", "parse_ns",
    "parse_address",
]

_SERVER_KEY = b"Tor safe cookie authentication server-to-controller hash"
_CLIENT_KEY = b"Tor safe cookie authentication controller-to-server hash"


# -- the asyncio controller ------------------------------------------------------------------

@dataclass(frozen=True)
class ControlTarget:
    """Where a control port is and how to authenticate to it."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_CONTROL_PORT
    cookie_path: str | None = None
    password: str | None = None
    timeout: float = 10.0


class ControlClient:
    """One authenticated (after :meth:`authenticate`) control connection. See the module doc."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, max_events: int = 10000):
        self._reader, self._writer = reader, writer
        self._pending: deque[asyncio.Future[Reply]] = deque()
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.max_events = max_events
        self.dropped_events = 0
        self.replies = 0
        self.closed = False
        self._error: InspectError | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, host: str = "127.0.0.1", port: int = DEFAULT_CONTROL_PORT, *,
                   timeout: float = 10.0) -> ControlClient:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        except (OSError, TimeoutError) as exc:
            raise InspectError(f"cannot connect to the control port {host}:{port}: {exc or 'timeout'}") from None
        return cls(reader, writer)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._task.cancel()
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass
            self._fail(InspectError("control connection closed"))

    def _fail(self, err: InspectError) -> None:
        self._error = self._error or err
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(self._error)
        self._events.put_nowait(None)

    async def _read_loop(self) -> None:
        asm = ReplyAssembler()
        try:
            while True:
                raw = await self._reader.readline()
                if not raw:
                    raise InspectError("the control port closed the connection")
                reply = asm.feed(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
                if reply is None:
                    continue
                if reply.code == 650:
                    if self._events.qsize() >= self.max_events:
                        self._events.get_nowait()
                        self.dropped_events += 1
                    self._events.put_nowait(as_event(reply, self.replies))
                elif self._pending:
                    self.replies += 1
                    fut = self._pending.popleft()
                    if not fut.done():
                        fut.set_result(reply)
        except (OSError, ValueError) as exc:  # ValueError: a line over the reader's limit
            self._fail(InspectError(f"control connection failed: {exc}"))
        except InspectError as exc:
            self._fail(exc)

    async def request(self, line: str, *, check: bool = True) -> Reply:
        """Send one command line; wait for its reply (ControlReplyError if not 2xx and ``check``)."""
        if self._error is not None:
            raise self._error
        if "\r" in line or "\n" in line:
            raise InspectError("a command line cannot contain CR or LF")
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        self._writer.write(line.encode("utf-8") + b"\r\n")
        reply = await fut
        if check and not reply.ok:
            raise ControlReplyError(reply.code, reply.message)
        return reply

    async def getinfo(self, *keys: str) -> dict[str, str]:
        return (await self.request("GETINFO " + " ".join(keys))).values()

    async def set_events(self, *types: str) -> None:
        await self.request("SETEVENTS " + " ".join(types))

    async def events(self, *, since: int = 0) -> AsyncIterator[Event]:
        """Events in order, skipping those received before reply number ``since``; ends when
        the connection does (then raises its InspectError unless we closed it)."""
        while True:
            ev = await self._events.get()
            if ev is None:
                if self._error is not None and not self.closed:
                    raise self._error
                return
            if ev.seq >= since:
                yield ev

    async def authenticate(self, *, cookie_path: str | Path | None = None, password: str | None = None,
                           allow_safecookie: bool = True) -> str:
        """PROTOCOLINFO, then the best method we can use (module doc). Returns its name."""
        methods, cookie_file = parse_protocolinfo(await self.request("PROTOCOLINFO 1"))
        try:
            if password is not None:
                if "HASHEDPASSWORD" not in methods:
                    raise AuthenticationError("the control port does not accept a password "
                                              f"(methods: {','.join(sorted(methods)) or 'none'})")
                await self.request('AUTHENTICATE "' + password.replace("\\", "\\\\").replace('"', '\\"') + '"')
                return "HASHEDPASSWORD"
            path = cookie_path or cookie_file
            if path is not None and methods & {"SAFECOOKIE", "COOKIE"}:
                cookie = _read_cookie(Path(path))
                if "SAFECOOKIE" in methods and (allow_safecookie or "COOKIE" not in methods):
                    await self._safecookie(cookie)
                    return "SAFECOOKIE"
                await self.request("AUTHENTICATE " + cookie.hex())
                return "COOKIE"
            if "NULL" in methods:
                await self.request("AUTHENTICATE")
                return "NULL"
        except ControlReplyError as exc:
            raise AuthenticationError(f"authentication refused: {exc.message}") from None
        raise AuthenticationError("no usable authentication method: the control port offers "
                                  f"{','.join(sorted(methods)) or 'none'}; give --cookie FILE or --password")

    async def _safecookie(self, cookie: bytes) -> None:
        nonce = secrets.token_bytes(32)
        reply = await self.request(f"AUTHCHALLENGE SAFECOOKIE {nonce.hex()}")
        kw = parse_keywords(split_line(reply.message.removeprefix("AUTHCHALLENGE ")))
        try:
            server_hash = bytes.fromhex(kw["SERVERHASH"])
            server_nonce = bytes.fromhex(kw["SERVERNONCE"])
        except (KeyError, ValueError):
            raise AuthenticationError(f"malformed AUTHCHALLENGE reply {reply.message[:100]!r}") from None
        msg = cookie + nonce + server_nonce
        if not hmac.compare_digest(hmac.new(_SERVER_KEY, msg, hashlib.sha256).digest(), server_hash):
            raise AuthenticationError("the control port does not know the cookie (SERVERHASH mismatch)")
        await self.request("AUTHENTICATE " + hmac.new(_CLIENT_KEY, msg, hashlib.sha256).hexdigest())

    @classmethod
    async def connect(cls, target: ControlTarget) -> ControlClient:
        """Open and authenticate."""
        client = await cls.open(target.host, target.port, timeout=target.timeout)
        try:
            async with asyncio.timeout(target.timeout):
                await client.authenticate(cookie_path=target.cookie_path, password=target.password)
        except TimeoutError:
            await client.close()
            raise InspectError(f"no answer from the control port {target.host}:{target.port}") from None
        except BaseException:
            await client.close()
            raise
        return client

    async def snapshot(self, keys: Iterable[str] = SNAPSHOT_KEYS) -> dict[str, str]:
        """GETINFO the keys; if the node rejects the set (a key it lacks), ask one by one."""
        keys = list(keys)
        try:
            return await self.getinfo(*keys)
        except ControlReplyError:
            out: dict[str, str] = {}
            for key in keys:
                try:
                    out.update(await self.getinfo(key))
                except ControlReplyError:
                    pass
            return out


def _read_cookie(path: Path) -> bytes:
    try:
        cookie = path.read_bytes()
    except OSError as exc:
        raise AuthenticationError(f"cannot read the control cookie {path}: {exc.strerror or exc}") from None
    if len(cookie) != 32:
        raise AuthenticationError(f"{path} is not a control cookie ({len(cookie)} bytes, expected 32)")
    return cookie


async def open_view(target: ControlTarget, *, events: Iterable[str] = WATCH_EVENTS,
                    ) -> tuple[ControlClient, NetworkView, int]:
    """Connect, subscribe, load a snapshot. Returns (client, view, since) where ``since`` is
    what to pass to :meth:`ControlClient.events` so that only newer events are applied."""
    client = await ControlClient.connect(target)
    try:
        events = tuple(events)
        if events:
            await client.set_events(*events)
        info = await client.snapshot()
        view = NetworkView()
        view.load(info)
    except BaseException:
        await client.close()
        raise
    return client, view, client.replies
