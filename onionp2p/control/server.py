"""The control port: tor's control protocol on 127.0.0.1 for stem, nyx and friends (specs/control.md).

Theory of operation
-------------------
:class:`ControlServer` serves one node — anything implementing :class:`ControlledNode` —
on a TCP listener (127.0.0.1 by default). The layers:

* :mod:`onionp2p.proto.control` (sans-IO): framing and authentication. Each connection
  owns a :class:`~onionp2p.proto.control.ControlSession`; bytes go in, ``Send`` /
  ``Dispatch`` / ``Close`` actions come out.
* :mod:`onionp2p.control.commands`: the authenticated commands (GETINFO, SETEVENTS, SIGNAL,
  EXTENDCIRCUIT ...), each turning a command into reply bytes using the node.
* :mod:`onionp2p.control.formats` (pure): records, quoting, reply and event formats.
* this module: the asyncio shell. A :class:`_Connection` (an ``asyncio.Protocol``) queues
  the actions of its session and one worker task carries them out strictly in order, so
  replies follow command order even when a command awaits the node (EXTENDCIRCUIT).

**Events.** The server registers one listener with the node. A node event is formatted
once and written to every authenticated connection that asked for its type with
SETEVENTS. While a connection's command is executing, events for it are held and written
right after the reply: an event never lands inside a reply, and events a command causes
follow its reply (as in tor). The server adds its own events: ``BW`` once a second (from
``node.traffic()`` deltas, also kept for GETINFO bw-event-cache), ``CIRC_BW`` once a
second per circuit whose byte totals moved (from the optional
``node.circuit_bandwidth()``; ``circuit-status`` lines then carry the totals as of that
tick as ``BYTES_READ=``/``BYTES_WRITTEN=``, so a snapshot plus the CIRC_BW events after it
add up exactly), ``SIGNAL``,
``CONF_CHANGED`` and log events: while some controller wants DEBUG/INFO/NOTICE/WARN/ERR,
a handler on the root logger turns log records into events (stdlib level ≥40 → ERR,
≥30 → WARN, ≥20 → NOTICE, 11..19 → INFO, ≤10 → DEBUG), rendered with the same
safe-logging scrubbing as the node's log output (:mod:`onionp2p.log`).

**Bounds; the node is never blocked.** Everything the node calls (the event listener)
is synchronous, never awaits a controller and never raises. Each connection has a bounded
output queue: when the bytes waiting for a controller (transport buffer plus held
events) would pass ``max_output_bytes``, that controller is disconnected (aborted) — so
the bound must exceed the largest reply (ns/all). Input is bounded by ``max_line`` /
``max_body`` and by pausing reads while more than 64 commands wait. Unauthenticated
connections are closed after ``auth_timeout`` seconds and on the first disallowed
command; at most ``max_connections`` controllers are served at once (the next one gets
``451`` and is closed).

**Closing.** When the protocol closes a connection (QUIT, 514, 515, line too long) the
server writes its last reply, half-closes (FIN) and discards further input for at most
5 s / 1 MiB: closing a socket with unread input would make the kernel send a reset that
can destroy that last reply before the controller reads it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from onionp2p.control.commands import CommandHandler
from onionp2p.control.formats import (
    BuildTimeoutSetEvent,
    CircEvent,
    CircuitBandwidth,
    CircuitInfo,
    ConfChangedEvent,
    ControlEvent,
    GuardEvent,
    HsDescEvent,
    GuardInfo,
    OrConnEvent,
    OrConnInfo,
    SignalEvent,
    StatusEvent,
    StreamEvent,
    StreamInfo,
    circ_bw_line,
    circuit_line,
    conf_changed_reply,
    guard_event_line,
    hs_desc_line,
    orconn_line,
    status_line,
    stream_line,
    version_string,
)
from onionp2p.errors import ConfigError, ListenError
from onionp2p.log import SCRUBBED, get_logger, scrub_sensitive
from onionp2p.proto.control import (
    COOKIE_LEN,
    AuthConfig,
    Close,
    ControlSession,
    Dispatch,
    Send,
    decode_hashed_password,
    format_event,
    format_reply,
)
from onionp2p.proto.directory import RouterStatus

__all__ = ["ControlledNode", "ControlServer"]

log = get_logger("onionp2p.control")
_conn_ids = itertools.count(1)
_MAX_PENDING_COMMANDS = 64
_BW_HISTORY = 300
_LINGER_SECONDS = 5.0
_LINGER_BYTES = 1024 * 1024


@runtime_checkable
class ControlledNode(Protocol):
    """What the control port needs from a node (client, relay or authority).

    Everything is called on the event loop thread. Synchronous methods must be quick and
    must not block; the async ones may await the network. Values use control-spec
    vocabulary (see :mod:`onionp2p.control.formats`).

    Optional (not part of the runtime check): ``circuit_bandwidth() ->
    list[CircuitBandwidth]``, the byte totals of the open origin circuits; a node that has
    it gets CIRC_BW events and byte counts in ``circuit-status``. ``exit_policy() ->
    ExitPolicy | None``, the relay's exit policy (GETINFO ``exit-policy/full``, ``ipv4``,
    ``ipv6``); without it, or when it returns None (not a relay), those keys answer tor's
    ``552 Not running in server mode``.
    """

    @property
    def config_file(self) -> str | None:
        """Path of the node's configuration file (GETINFO config-file), if any."""

    @property
    def started_at(self) -> float:
        """Unix time the node started (GETINFO uptime)."""

    @property
    def fingerprint(self) -> str | None:
        """The relay's RSA identity fingerprint (40 hex), None for a client."""

    @property
    def address(self) -> str | None:
        """Best guess of our public IP address, None if unknown."""

    def conf_names(self) -> list[tuple[str, str]]:
        """Every configuration key the node exposes, with its tor type (String, Boolean,
        Integer, Port, DataSize, LineList ...). Matching is case-insensitive."""

    def get_conf(self, key: str) -> list[str]:
        """Current values of ``key`` (canonical spelling); [] when unset."""

    def set_conf(self, pairs: Sequence[tuple[str, str | None]]) -> None:
        """Apply all pairs or none (value None = back to the default). Raises ConfigError."""

    def circuits(self) -> list[CircuitInfo]:
        """Open and building origin circuits (not closed ones)."""

    def streams(self) -> list[StreamInfo]:
        """Open and pending client streams."""

    def orconns(self) -> list[OrConnInfo]:
        """OR connections (channels)."""

    def traffic(self) -> tuple[int, int]:
        """Total bytes (read, written) on OR connections since start."""

    def bootstrap_status(self) -> tuple[int, str, str]:
        """(progress 0..100, tag, summary), e.g. (100, "done", "Done")."""

    def network_status(self) -> list[RouterStatus]:
        """The relays of the current consensus."""

    def guards(self) -> list[GuardInfo]:
        """Chosen entry guards."""

    def listeners(self, kind: str) -> list[tuple[str, int]]:
        """Listening (host, port) for kind "or", "dir", "socks", "dns", "control" ..."""

    def add_listener(self, fn: Callable[[ControlEvent], None]) -> None:
        """Call ``fn(event)`` (synchronously, on the loop thread) for every node event."""

    def remove_listener(self, fn: Callable[[ControlEvent], None]) -> None:
        """Undo :meth:`add_listener`."""

    async def signal(self, name: str) -> None:
        """Act on a signal: RELOAD, SHUTDOWN, DUMP, DEBUG, HALT, NEWNYM, CLEARDNSCACHE,
        HEARTBEAT, ACTIVE, DORMANT. May raise ControlError."""

    async def extend_circuit(self, circ_id: int, path: list[str] | None, purpose: str) -> int:
        """Launch a circuit (``circ_id`` 0; ``path`` of ServerSpecs — ``$FP``, ``$FP~nick``,
        ``nick`` — or None to choose) or extend circuit ``circ_id``; ``purpose`` "general"
        or "controller". Returns the circuit id as soon as the circuit is launched (not
        built). Raises ControlError (e.g. 552 ``No such router "x"``) or OnionError. The
        server shields this call: a controller that disconnects does not cancel it."""

    def close_circuit(self, circ_id: int, *, if_unused: bool = False) -> bool:
        """Close circuit ``circ_id`` (reason REQUESTED); False if there is no such circuit."""

    def close_stream(self, stream_id: int, reason: int) -> bool:
        """Close stream ``stream_id`` with RELAY_END ``reason``; False if unknown."""


class _LogBridge(logging.Handler):
    """Turns log records into NOTICE/WARN/... events for the server's controllers."""

    def __init__(self, server: ControlServer, loop: asyncio.AbstractEventLoop):
        super().__init__(logging.DEBUG)
        self.server = server
        self.loop = loop
        self.thread = threading.get_ident()
        self._busy = threading.local()

    @staticmethod
    def event_type(levelno: int) -> str:
        if levelno >= logging.ERROR:
            return "ERR"
        if levelno >= logging.WARNING:
            return "WARN"
        if levelno >= logging.INFO:
            return "NOTICE"
        return "INFO" if levelno > logging.DEBUG else "DEBUG"

    @staticmethod
    def render(record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):  # a structlog event dict
            ed = scrub_sensitive(None, record.levelname, dict(record.msg))
            text = str(ed.pop("event", ""))
            for key in ("level", "logger", "timestamp", "_record", "_from_structlog"):
                ed.pop(key, None)
            text = " ".join([text, *(f"{k}={v}" for k, v in ed.items())])
        else:
            text = record.getMessage()
        text = " ".join(text.split())  # one line, no control characters
        return "".join(ch if ch.isprintable() else "?" for ch in text)[:4000]

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "on", False):
            return  # a record logged while we deliver one (e.g. a controller dropped): skip it
        self._busy.on = True
        try:
            etype = self.event_type(record.levelno)
            if threading.get_ident() == self.thread:
                if self.server._wanted(etype):
                    self.server._fan_out(etype, format_event(etype, self.render(record) or SCRUBBED))
            else:  # another thread: render here, deliver on the loop
                data = format_event(etype, self.render(record) or SCRUBBED)
                self.loop.call_soon_threadsafe(self.server.emit, etype, data)
        except Exception:  # a log handler must never raise (closed loop, odd record ...)
            pass
        finally:
            self._busy.on = False


class _Connection(asyncio.Protocol):
    """One controller connection: session actions executed in order by one worker task."""

    def __init__(self, server: ControlServer):
        self.server = server
        self.id = next(_conn_ids)
        self.session = ControlSession(server._auth, max_line=server.max_line, max_body=server.max_body)
        self.events: frozenset[str] = frozenset()
        self.handler = CommandHandler(server, self)
        self.transport: asyncio.Transport | None = None
        self._actions: deque[Send | Dispatch | Close] = deque()
        self._worker: asyncio.Task | None = None
        self._busy = False
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._paused = False
        self._dead = False
        self._closing = False
        self._discarded = 0
        self._peer_eof = False
        self._timer: asyncio.TimerHandle | None = None
        self._log = log.bind(control_conn=self.id)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server._conns) >= self.server.max_connections:
            self._dead = True
            transport.write(format_reply(451, ["Too many control connections"]))  # type: ignore[attr-defined]
            transport.close()
            return
        self.server._conns.add(self)
        self._timer = asyncio.get_running_loop().call_later(self.server.auth_timeout, self._auth_timeout)
        self._log.debug("controller connected")

    def data_received(self, data: bytes) -> None:
        if self._dead:
            self._discarded += len(data)
            if self._discarded > _LINGER_BYTES and self.transport is not None:
                self.transport.abort()
            return
        self._actions.extend(self.session.feed(data))
        if len(self._actions) > _MAX_PENDING_COMMANDS and not self._paused:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        if self._actions and (self._worker is None or self._worker.done()):
            self._worker = asyncio.get_running_loop().create_task(self._run())

    def eof_received(self) -> bool:
        self._peer_eof = True
        if self._dead:
            return False  # lingering close: the peer is done too
        # the controller half-closed: answer what it sent, then close
        self._actions.append(Close("controller closed its side"))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        self.server._conns.discard(self)
        gone = getattr(self.server.node, "control_connection_closed", None)
        if gone is not None:  # onion services ADD_ONION made without Detach go with their connection
            gone(self.id)
        if self._timer is not None:
            self._timer.cancel()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self._actions.clear()
        self._held.clear()
        self._log.debug("controller disconnected")

    # worker
    async def _run(self) -> None:
        while self._actions and not self._dead:
            action = self._actions.popleft()
            if isinstance(action, Send):
                self.write(action.data)
            elif isinstance(action, Close):
                self.close()
                return
            else:
                self._busy = True
                try:
                    reply = await self.handler.execute(action.command)
                finally:
                    self._busy = False
                self.write(reply)
                held, self._held, self._held_bytes = self._held, [], 0
                for data in held:
                    self.write(data)
            if self.session.authenticated and self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._paused and len(self._actions) <= _MAX_PENDING_COMMANDS // 2 and not self._dead:
                self._paused = False
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _auth_timeout(self) -> None:
        if not self.session.authenticated and not self._dead:
            self._log.info("closing unauthenticated control connection (timeout)")
            self.close()

    # output
    def write(self, data: bytes) -> None:
        if self._dead or self.transport is None or self.transport.is_closing():
            return
        waiting = self.transport.get_write_buffer_size() + self._held_bytes
        if waiting + len(data) > self.server.max_output_bytes:
            self._log.info("controller is not reading; disconnecting it")
            self._dead = True
            self.transport.abort()
            return
        self.transport.write(data)

    def send_event(self, data: bytes) -> None:
        if self._dead:
            return
        if not self._busy:
            self.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes + self.transport.get_write_buffer_size() > self.server.max_output_bytes:  # type: ignore[union-attr]
            self._log.info("controller event backlog over its bound; disconnecting it")
            self._dead = True
            self.transport.abort()  # type: ignore[union-attr]

    def close(self) -> None:
        """Lingering close: send what is queued, then FIN; read and discard the controller's
        remaining input (at most 1 MiB / 5 s) so that the kernel does not answer it with a
        reset that could destroy our last reply before the controller reads it."""
        if self._dead and self._closing:
            return
        self._dead = self._closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._peer_eof and transport.can_write_eof():
            transport.write_eof()
            if self._paused:
                transport.resume_reading()
            asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.abort)
        else:
            transport.close()


class ControlServer:
    """The control port of ``node``. ``await start()``, then ``await stop()``.

    Authentication: cookie (the default: a 32-byte file, mode 0600, at ``cookie_path``
    or in a fresh private temporary directory when no method is configured at all),
    and/or ``hashed_password`` (tor's ``16:...`` form, one string or several). NULL
    authentication only with ``allow_null_auth=True`` and no other method.
    """

    def __init__(
        self,
        node: ControlledNode,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cookie_path: Path | str | None = None,
        hashed_password: str | Sequence[str] | None = None,
        allow_null_auth: bool = False,
        max_connections: int = 32,
        max_output_bytes: int = 8 * 1024 * 1024,
        max_line: int = 64 * 1024,
        max_body: int = 1024 * 1024,
        auth_timeout: float = 60.0,
        port_file: Path | str | None = None,
    ):
        self.node = node
        #: tor's ControlPortWriteToFile: ``PORT=127.0.0.1:N`` written here once listening
        #: (removed on stop), so tools find a node from its data directory
        self.port_file = Path(port_file) if port_file is not None else None
        self.host = host
        self.port = port
        if isinstance(hashed_password, str):
            hashed_password = [hashed_password]
        self.hashed_passwords = tuple(hashed_password or ())
        self._decoded = tuple(decode_hashed_password(h) for h in self.hashed_passwords)  # ConfigError
        use_cookie = cookie_path is not None or not (self.hashed_passwords or allow_null_auth)
        self.cookie_path: Path | None = Path(cookie_path).absolute() if cookie_path is not None else None
        self._use_cookie = use_cookie
        self._tmpdir: str | None = None
        self.max_connections = max_connections
        self.max_output_bytes = max_output_bytes
        self.max_line = max_line
        self.max_body = max_body
        self.auth_timeout = auth_timeout
        self._auth = AuthConfig(hashed_passwords=self._decoded, version=version_string())
        self._conns: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._bw_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._log_bridge: _LogBridge | None = None
        self.bw_history: deque[tuple[int, int]] = deque(maxlen=_BW_HISTORY)
        #: per-circuit totals as of the last CIRC_BW tick (None: the node does not report them)
        self.circ_bw: dict[int, CircuitBandwidth] | None = {} if hasattr(node, "circuit_bandwidth") else None

    # -- lifecycle ------------------------------------------------------------------------

    def _write_cookie(self) -> bytes:
        if self.cookie_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="onionp2p-control-")  # mode 0700
            self.cookie_path = Path(self._tmpdir) / "control_auth_cookie"
        cookie = secrets.token_bytes(COOKIE_LEN)
        tmp = self.cookie_path.with_name(self.cookie_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), stat.S_IRUSR | stat.S_IWUSR)
                f.write(cookie)
            os.replace(tmp, self.cookie_path)
        except OSError as exc:
            raise ConfigError(f"cannot write control cookie {self.cookie_path}: {exc}") from None
        return cookie

    async def start(self) -> None:
        """Write the cookie (if used), listen, subscribe to the node's events."""
        if self._use_cookie:
            cookie = self._write_cookie()
            self._auth = AuthConfig(cookie=cookie, cookie_path=str(self.cookie_path),
                                    hashed_passwords=self._decoded, version=version_string())
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port)
        except OSError as exc:
            self._remove_tmpdir()
            raise ListenError.from_os_error("control port", self.host, self.port, exc) from None
        self.port = self._server.sockets[0].getsockname()[1]
        self.node.add_listener(self._on_node_event)
        self._log_bridge = _LogBridge(self, loop)
        logging.getLogger().addHandler(self._log_bridge)
        self._bw_task = loop.create_task(self._bw_loop())
        if self.port_file is not None:
            self._write_port_file()
        log.info("control port listening", control_port=self.port,
                 methods=",".join(self._auth.methods()))

    async def stop(self) -> None:
        """Stop listening, disconnect controllers, unsubscribe; remove a temporary cookie."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        try:
            self.node.remove_listener(self._on_node_event)
        except ValueError:
            pass
        if self._log_bridge is not None:
            logging.getLogger().removeHandler(self._log_bridge)
            self._log_bridge = None
        for task in [self._bw_task, *self._tasks]:
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        for conn in list(self._conns):
            conn._dead = True
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        self._remove_tmpdir()
        if self.port_file is not None:
            self.port_file.unlink(missing_ok=True)

    def _write_port_file(self) -> None:
        """``PORT=HOST:N`` (tor's ControlPortWriteToFile format), replaced atomically."""
        assert self.port_file is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        tmp = self.port_file.with_name(self.port_file.name + ".tmp")
        try:
            tmp.write_text(f"PORT={host}:{self.port}\n")
            os.replace(tmp, self.port_file)
        except OSError as exc:
            log.warning("cannot write the control port file", path=str(self.port_file), error=str(exc))

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self.cookie_path = None

    def spawn(self, coro) -> None:
        """Run ``coro`` as a server-owned task (outlives the connection that started it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("control task failed", error=repr(task.exception()))

    # -- events ---------------------------------------------------------------------------

    def _wanted(self, event_type: str) -> bool:
        return any(event_type in c.events and c.session.authenticated for c in self._conns)

    def _fan_out(self, event_type: str, data: bytes) -> None:
        for conn in list(self._conns):
            if event_type in conn.events and conn.session.authenticated:
                conn.send_event(data)

    def emit(self, event_type: str, data: bytes) -> None:
        """Send one formatted event to the subscribed controllers."""
        if self._wanted(event_type):
            self._fan_out(event_type, data)

    def _on_node_event(self, event: ControlEvent) -> None:
        """The node's listener: never raises, never blocks."""
        try:
            if isinstance(event, CircEvent):
                etype, fmt = "CIRC", lambda: format_event("CIRC", circuit_line(event.circuit))
            elif isinstance(event, StreamEvent):
                etype, fmt = "STREAM", lambda: format_event("STREAM", stream_line(event.stream))
            elif isinstance(event, OrConnEvent):
                etype, fmt = "ORCONN", lambda: format_event("ORCONN", orconn_line(event.orconn))
            elif isinstance(event, StatusEvent):
                etype = f"STATUS_{event.kind}"
                fmt = lambda: format_event(etype, status_line(event))  # noqa: E731
            elif isinstance(event, SignalEvent):
                etype, fmt = "SIGNAL", lambda: format_event("SIGNAL", event.name)
            elif isinstance(event, ConfChangedEvent):
                etype, fmt = "CONF_CHANGED", lambda: conf_changed_reply(event.values)
            elif isinstance(event, BuildTimeoutSetEvent):
                etype = "BUILDTIMEOUT_SET"
                fmt = lambda: format_event(etype, f"{event.kind} {event.args}")  # noqa: E731
            elif isinstance(event, GuardEvent):
                etype = "GUARD"
                fmt = lambda: format_event(etype, guard_event_line(event))  # noqa: E731
            elif isinstance(event, HsDescEvent):
                etype = "HS_DESC"
                fmt = lambda: format_event(etype, hs_desc_line(event))  # noqa: E731
            else:
                return
            if self._wanted(etype):  # format only what someone asked for
                self._fan_out(etype, fmt())
        except Exception as exc:  # a malformed node event is dropped, not fatal
            log.warning("dropping malformed control event", error=str(exc))

    async def _bw_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = self._traffic()
        next_tick = loop.time() + 1.0
        while True:
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            next_tick = max(next_tick + 1.0, loop.time())
            now = self._traffic(last)
            read, written = max(0, now[0] - last[0]), max(0, now[1] - last[1])
            last = now
            self.bw_history.append((read, written))
            self.emit("BW", format_event("BW", f"{read} {written}"))
            self._circ_bw_tick()

    def _circ_bw_tick(self) -> None:
        """CIRC_BW for every circuit whose totals moved since the last tick; remember the totals."""
        if self.circ_bw is None:
            return
        try:
            totals = list(self.node.circuit_bandwidth())  # type: ignore[attr-defined]
        except Exception as exc:  # a failing node must not stop the ticker
            log.warning("node.circuit_bandwidth() failed", error=repr(exc))
            return
        when = time.time()
        last, now = self.circ_bw, {}
        for t in totals:
            prev = last.get(t.id)
            now[t.id] = t
            read = max(0, t.read - (prev.read if prev else 0))
            written = max(0, t.written - (prev.written if prev else 0))
            if not (read or written) or not self._wanted("CIRC_BW"):
                continue
            dread = dwritten = None
            if t.delivered_read is not None:
                dread = max(0, t.delivered_read - ((prev.delivered_read or 0) if prev else 0))
            if t.delivered_written is not None:
                dwritten = max(0, t.delivered_written - ((prev.delivered_written or 0) if prev else 0))
            self._fan_out("CIRC_BW", format_event("CIRC_BW", circ_bw_line(
                t.id, read, written, when, delivered_read=dread, delivered_written=dwritten, cc=t.cc)))
        self.circ_bw = now

    def _traffic(self, fallback: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        try:
            r, w = self.node.traffic()
            return int(r), int(w)
        except Exception as exc:  # a failing node must not stop the BW ticker
            log.warning("node.traffic() failed", error=repr(exc))
            return fallback

    # -- facts for handlers -------------------------------------------------------------------

    @property
    def auth(self) -> AuthConfig:
        return self._auth

    def uptime(self) -> int:
        return max(0, int(time.time() - self.node.started_at))

