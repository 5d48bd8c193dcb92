"""The control port (tor's control protocol) with real clients: stem and raw sockets on 127.0.0.1.

The node behind the port is :class:`ClientNode`, a real adapter around
:class:`~onionp2p.client.client.OnionClient` that builds circuits through the conftest
``relay_net`` relays (real TLS, ntor, relay crypto). stem is synchronous, so its calls run
in worker threads while the event loop serves the port and the relays.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable

import pytest
from conftest import http_get, require_tool, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onionp2p.client.client import CircuitEvent, ClientCircuit, OnionClient
from onionp2p.control.formats import (
    CircEvent,
    CircuitInfo,
    GuardInfo,
    OrConnInfo,
    StatusEvent,
    StreamInfo,
    clients_seen_line,
    exit_policy_lines,
    version_string,
)
from onionp2p.control.server import ControlServer
from onionp2p.errors import ConfigError
from onionp2p.log import get_logger
from onionp2p.proto.control import (
    AuthConfig,
    Close,
    CommandReader,
    ControlError,
    ControlSession,
    Dispatch,
    LineTooLong,
    Send,
    decode_hashed_password,
    hash_password,
    secret_to_key,
    split_args,
    split_keyword,
    unquote,
)
from onionp2p.proto.directory import RelayInfo, RouterStatus
from onionp2p.proto.exitpolicy import REJECT_ALL, ExitPolicy

pytestmark = pytest.mark.filterwarnings("ignore:setDaemon.. is deprecated:DeprecationWarning")

# What Debian's nyx asks a client's control port, with the exact replies of a real tor
# 0.4.9 client (status/clients-seen's TimeStarted: tor writes the start of its bridge
# statistics, 0 = the epoch on a node that keeps none). tests/test_nyx.py checks that nyx
# meets no other refusals.
TOR_CLIENT_REPLIES = {
    "GETCONF exitrelay": ["250 ExitRelay=auto"],
    "GETCONF HiddenServiceOptions": ["250 HiddenServiceOptions"],
    "GETCONF usemicrodescriptors": ["250 UseMicrodescriptors=auto"],
    # stem's get_exit_policy() asks these when exit-policy/full fails (a client)
    "GETCONF exitpolicyrejectprivate": ["250 ExitPolicyRejectPrivate=1"],
    "GETCONF exitpolicy": ["250 ExitPolicy"],
    "GETINFO status/clients-seen": [
        '250-status/clients-seen=TimeStarted="1970-01-01 00:00:00" CountrySummary= IPVersions=v4=0,v6=0',
        "250 OK"],
    "GETINFO exit-policy/full": ["552 Not running in server mode"],
    "GETINFO fingerprint": ["551 Not running in server mode"],
}

# `tor --hash-password "onionp2p test password"` (tor 0.4.9.11): a value made by real tor.
TOR_PASSWORD = "onionp2p test password"
TOR_HASHED = "16:3AF876A6E8BF59A360F8279E336A255C3ABADB7E687525B3B8E37F0F36"

_CONTROL_REASONS = {"NONE", "TORPROTOCOL", "INTERNAL", "REQUESTED", "HIBERNATING", "RESOURCELIMIT",
                    "CONNECTFAILED", "OR_IDENTITY", "CHANNEL_CLOSED", "FINISHED", "TIMEOUT", "DESTROYED",
                    "NOSUCHSERVICE"}
_STATUS = {"launched": "LAUNCHED", "extended": "EXTENDED", "built": "BUILT", "failed": "FAILED",
           "closed": "CLOSED"}


class ClientNode:
    """A ControlledNode around OnionClient: EXTENDCIRCUIT builds real circuits through the
    given relays; the client's CircuitEvents become CIRC events."""

    fingerprint = None
    address = None
    _TYPES = {"Nickname": "String", "SocksPort": "LineList", "MaxCircuitDirtiness": "TimeInterval",
              "Log": "LineList", "DisableDebuggerAttachment": "Boolean"}
    _DEFAULTS = {"Nickname": ["Unnamed"], "SocksPort": ["127.0.0.1:9050"], "MaxCircuitDirtiness": ["600"],
                 "Log": ["notice stdout"], "DisableDebuggerAttachment": ["1"]}

    def __init__(self, relays, config_file: str | None = None):
        self.client = OnionClient()
        self.relays: list[RelayInfo] = [r.info() for r in relays]
        self.started_at = time.time() - 5
        self.config_file = config_file
        self.signals: list[str] = []
        self.conf = {k: list(v) for k, v in self._DEFAULTS.items()}
        self._listeners: list[Callable] = []
        self._circs: dict[int, ClientCircuit] = {}
        self._purpose: dict[int, str] = {}
        self._launch_lock = asyncio.Lock()
        self._launch_waiter: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()
        self.client.events.add(self._on_circuit_event)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.client.close()

    # events
    def add_listener(self, fn) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn) -> None:
        self._listeners.remove(fn)

    def emit(self, event) -> None:
        for fn in list(self._listeners):
            fn(event)

    def _info(self, circ: ClientCircuit, status: str, reason: str | None = None) -> CircuitInfo:
        remote = None
        if reason is not None and reason not in _CONTROL_REASONS:
            reason = "TORPROTOCOL" if reason == "PROTOCOL" else "NONE"
        return CircuitInfo(
            id=circ.id, status=status, path=tuple((h.fingerprint, h.nickname) for h in circ.hops),
            build_flags=("NEED_CAPACITY",), purpose=self._purpose.get(circ.id, "general").upper(),
            time_created=circ.created_at, reason=reason, remote_reason=remote)

    def _on_circuit_event(self, ev: CircuitEvent) -> None:
        if ev.kind == "launched":
            self._circs[ev.circuit_id] = self.client.circuits[ev.circuit_id]
            if self._launch_waiter is not None and not self._launch_waiter.done():
                self._launch_waiter.set_result(ev.circuit_id)
        circ = self._circs.get(ev.circuit_id)
        if circ is None:
            return
        if ev.kind in ("failed", "closed"):
            del self._circs[ev.circuit_id]
        self.emit(CircEvent(self._info(circ, _STATUS[ev.kind], ev.reason if ev.kind in ("failed", "closed")
                                       else None)))

    # facts
    def conf_names(self):
        return list(self._TYPES.items())

    def get_conf(self, key):
        return list(self.conf[key])

    def set_conf(self, pairs):
        new = {k: list(v) for k, v in self.conf.items()}
        seen = set()
        for key, value in pairs:
            if key not in seen:  # the first mention of a key replaces all its old values
                seen.add(key)
                new[key] = []
            if value is None:
                new[key] = list(self._DEFAULTS[key])
                continue
            if key == "MaxCircuitDirtiness" and not value.isdigit():
                raise ConfigError(f"MaxCircuitDirtiness must be a number of seconds, not {value!r}")
            if key == "Nickname" and not re.fullmatch(r"[A-Za-z0-9]{1,19}", value):
                raise ConfigError(f"invalid nickname {value!r}")
            new[key].append(value)
        self.conf = new

    def circuits(self):
        out = []
        for circ in self.client.circuits.values():
            status = "BUILT" if circ.state == "built" else ("EXTENDED" if circ.hops else "LAUNCHED")
            out.append(self._info(circ, status))
        return out

    def streams(self):
        out = []
        for circ in self.client.circuits.values():
            for sid in circ.streams:
                transport = circ.transport(sid)
                if transport is None:  # closed by the application, still draining
                    continue
                host, port = transport.get_extra_info("peername")
                out.append(StreamInfo(id=circ.id * 100000 + sid, status="SUCCEEDED", circ_id=circ.id,
                                      target=f"{host}:{port}", purpose="USER"))
        return out

    def orconns(self):
        nick = {r.rsa_id: r.nickname for r in self.relays}
        return [OrConnInfo(id=chan.id, status="CONNECTED", fingerprint=rsa.hex().upper(),
                           nickname=nick.get(rsa), ncircs=len(chan.circuits))
                for rsa, chan in self.client.channels.items()]

    def traffic(self):
        chans = list(self.client.channels.values())
        return sum(c.bytes_in for c in chans), sum(c.bytes_out for c in chans)

    def bootstrap_status(self):
        return 100, "done", "Done"

    def network_status(self):
        flags = frozenset({"Exit", "Fast", "Guard", "Running", "Stable", "Valid"})
        return [RouterStatus(info, flags, bandwidth=1000 + i) for i, info in enumerate(self.relays)]

    def guards(self):
        return [GuardInfo(self.relays[0].fingerprint, self.relays[0].nickname, "up")]

    def listeners(self, kind):
        return [("127.0.0.1", 9050)] if kind == "socks" else []

    # actions
    async def signal(self, name):
        self.signals.append(name)

    def _resolve(self, spec: str) -> RelayInfo:
        fp, _, nick = spec.lstrip("$").replace("=", "~").partition("~")
        for r in self.relays:
            if (spec.startswith("$") and r.fingerprint == fp.upper() and (not nick or nick == r.nickname)) \
                    or (not spec.startswith("$") and spec in (r.nickname, r.fingerprint)):
                return r
        raise ControlError(552, f'No such router "{spec}"')

    async def extend_circuit(self, circ_id, path, purpose):
        if circ_id != 0:
            raise ControlError(552, f'Unknown circuit "{circ_id}"')
        hops = [self._resolve(p) for p in path] if path else self.relays[:3]
        async with self._launch_lock:  # one launch at a time: the next "launched" event is ours
            loop = asyncio.get_running_loop()
            self._launch_waiter = waiter = loop.create_future()
            task = loop.create_task(self.client.build_circuit(hops))
            self._tasks.add(task)
            task.add_done_callback(lambda t: (self._tasks.discard(t), t.cancelled() or t.exception()))
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            self._launch_waiter = None
            if not waiter.done():
                task.result()  # raises the CircuitError
            self._purpose[waiter.result()] = purpose
            return waiter.result()

    def close_circuit(self, circ_id, *, if_unused=False):
        circ = self.client.circuits.get(circ_id)
        if circ is None or (if_unused and circ.streams):
            return False
        circ.close()
        return True

    def close_stream(self, stream_id, reason):
        circ = self.client.circuits.get(stream_id // 100000)
        transport = circ.transport(stream_id % 100000) if circ else None
        if transport is None:
            return False
        transport.abort()
        return True


# -- helpers ------------------------------------------------------------------------------

class Events:
    """Thread-safe collector for stem event callbacks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items: list = []

    def __call__(self, event) -> None:
        with self.lock:
            self.items.append(event)

    def snapshot(self) -> list:
        with self.lock:
            return list(self.items)


@pytest.fixture
def stem():
    return pytest.importorskip("stem")


@pytest.fixture
async def node(relay_net, tmp_path):
    n = ClientNode(relay_net, config_file=str(tmp_path / "client.toml"))
    yield n
    await n.close()


@pytest.fixture
async def make_server(node, tmp_path):
    servers = []

    async def make(**kw) -> ControlServer:
        srv = ControlServer(node, **kw)
        await srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        await srv.stop()


@pytest.fixture
async def controller(stem, make_server, tmp_path):
    """An authenticated stem Controller (cookie authentication) and its server."""
    from stem.control import Controller

    srv = await make_server(cookie_path=tmp_path / "control_auth_cookie")

    def connect():
        c = Controller.from_port(port=srv.port)
        c.authenticate()
        return c

    ctl = await asyncio.to_thread(connect)
    yield ctl, srv
    await asyncio.to_thread(ctl.close)


def call(fn, *args, **kw):
    return asyncio.to_thread(fn, *args, **kw)


class Raw:
    """A raw control-protocol client on a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, text: str | bytes) -> None:
        self.writer.write(text.encode("latin-1") if isinstance(text, str) else text)
        await self.writer.drain()

    async def reply(self) -> list[str]:
        """One complete reply (data blocks included), as lines without CRLF; [] on EOF."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), 10)
            if not raw:
                return lines
            assert raw.endswith(b"\r\n"), raw
            line = raw[:-2].decode()
            lines.append(line)
            assert re.match(r"\d{3}[ +-]", line), line
            if line[3] == "+":
                while (data := (await self.reader.readline())[:-2].decode()) != ".":
                    lines.append(data)
                lines.append(".")
            elif line[3] == " ":
                return lines

    async def command(self, text: str) -> list[str]:
        await self.send(text + "\r\n")
        return await self.reply()

    async def auth_cookie(self, cookie: bytes) -> None:
        assert await self.command("AUTHENTICATE " + cookie.hex()) == ["250 OK"]

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    async def close(self) -> None:
        self.writer.close()


# -- secret-to-key --------------------------------------------------------------------------

def test_s2k_matches_tor_hash_password():
    raw = decode_hashed_password(TOR_HASHED)
    assert secret_to_key(TOR_PASSWORD.encode(), raw[:9]) == raw[9:]
    assert hash_password(TOR_PASSWORD, salt=raw[:8], count_byte=raw[8]) == TOR_HASHED
    assert secret_to_key(b"not it", raw[:9]) != raw[9:]
    with pytest.raises(ConfigError):
        decode_hashed_password("16:ABCD")


def test_s2k_against_local_tor_if_installed(tmp_path):
    import subprocess

    tor = require_tool("tor", "tor")
    out = subprocess.run([tor, "--hash-password", 'pa"ss word\\x', "--DataDirectory", str(tmp_path)],
                         capture_output=True, text=True, timeout=60).stdout
    hashed = [ln for ln in out.splitlines() if ln.startswith("16:")][-1]
    raw = decode_hashed_password(hashed)
    assert secret_to_key('pa"ss word\\x'.encode(), raw[:9]) == raw[9:]


# -- stem: authentication ---------------------------------------------------------------------

async def test_stem_cookie_auth_version_and_protocolinfo(stem, make_server, tmp_path):
    import stem.connection
    from stem.connection import AuthMethod
    from stem.control import Controller

    srv = await make_server(cookie_path=tmp_path / "control_auth_cookie")
    cookie = tmp_path / "control_auth_cookie"
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o600 and cookie.stat().st_size == 32

    def session():
        with Controller.from_port(port=srv.port) as c:
            info = stem.connection.get_protocolinfo(c)
            stem.connection.authenticate_cookie(c, info.cookie_path)  # plain COOKIE
            c._post_authentication()
            return info, c.get_info("version"), c.get_version(), c.get_info(["process/pid", "uptime"])

    info, version, parsed, facts = await call(session)
    assert set(info.auth_methods) == {AuthMethod.COOKIE, AuthMethod.SAFECOOKIE}
    assert info.cookie_path == str(cookie)
    assert str(info.tor_version).startswith("0.4.9.3")
    assert version == version_string() == "0.4.9.3 (onionp2p-0.1.0)"
    assert (parsed.major, parsed.minor, parsed.micro, parsed.patch) == (0, 4, 9, 3)
    assert facts["process/pid"] == str(os.getpid()) and int(facts["uptime"]) >= 5


async def test_stem_safecookie_and_wrong_cookie(stem, make_server, tmp_path):
    import stem.connection
    from stem.control import Controller

    srv = await make_server(cookie_path=tmp_path / "cookie")
    bogus = tmp_path / "bogus"
    bogus.write_bytes(os.urandom(32))

    def session():
        with Controller.from_port(port=srv.port) as c:
            stem.connection.authenticate_safecookie(c, str(tmp_path / "cookie"))
            c._post_authentication()
            ok = c.get_info("version")
        with Controller.from_port(port=srv.port) as c:
            with pytest.raises(stem.connection.IncorrectCookieValue):
                stem.connection.authenticate_cookie(c, str(bogus))
        with Controller.from_port(port=srv.port) as c:  # stem checks our SERVERHASH against its cookie
            with pytest.raises(stem.connection.AuthSecurityFailure):
                stem.connection.authenticate_safecookie(c, str(bogus))
        return ok

    assert await call(session) == version_string()


async def test_stem_password_auth_with_tor_hash(stem, make_server):
    import stem.connection
    from stem.connection import AuthMethod
    from stem.control import Controller

    srv = await make_server(hashed_password=TOR_HASHED)

    def session():
        with Controller.from_port(port=srv.port) as c:
            assert stem.connection.get_protocolinfo(c).auth_methods == (AuthMethod.PASSWORD,)
            with pytest.raises(stem.connection.IncorrectPassword):
                c.authenticate(password="wrong")
        with Controller.from_port(port=srv.port) as c:
            with pytest.raises(stem.connection.MissingPassword):
                c.authenticate()
        with Controller.from_port(port=srv.port) as c:
            c.authenticate(password=TOR_PASSWORD)
            return c.get_conf("HashedControlPassword"), c.get_conf("CookieAuthentication")

    assert await call(session) == (TOR_HASHED, "0")
    assert srv.cookie_path is None


async def test_null_auth_and_default_cookie_location(stem, make_server):
    from stem.control import Controller

    srv = await make_server(allow_null_auth=True)
    raw = await Raw.open(srv.port)
    assert (await raw.command("PROTOCOLINFO 1"))[1] == "250-AUTH METHODS=NULL"
    assert await raw.command("AUTHENTICATE") == ["250 OK"]
    await raw.close()
    srv2 = await make_server()  # no method given: cookie in a private temporary directory
    assert stat.S_IMODE(srv2.cookie_path.parent.stat().st_mode) == 0o700

    def session():
        with Controller.from_port(port=srv2.port) as c:
            c.authenticate()
            return c.get_conf("CookieAuthFile")

    assert await call(session) == str(srv2.cookie_path)
    tmpdir = srv2.cookie_path.parent
    await srv2.stop()
    assert not tmpdir.exists()


# -- stem: circuits, events, signals, configuration -------------------------------------------

async def test_circuits_built_and_closed_with_events(controller, node):
    from stem import CircStatus
    from stem.control import EventType

    ctl, _srv = controller
    events = Events()
    await call(ctl.add_event_listener, events, EventType.CIRC)
    circ_id = await call(ctl.extend_circuit, "0", None, "general", True)  # await_build
    circ = node.client.circuits[int(circ_id)]
    assert circ.state == "built"

    circuits = await call(ctl.get_circuits)
    ours = [c for c in circuits if c.id == circ_id]
    assert len(ours) == 1
    got = ours[0]
    assert got.status == CircStatus.BUILT
    assert list(got.path) == [(h.fingerprint, h.nickname) for h in circ.hops]
    assert [nick for _fp, nick in got.path] == ["r0", "r1", "r2"]
    assert got.purpose == "GENERAL" and got.build_flags == ("NEED_CAPACITY",)
    assert got.created == datetime.datetime.fromtimestamp(circ.created_at, datetime.timezone.utc).replace(
        tzinfo=None)

    await call(ctl.close_circuit, circ_id)
    await wait_for(lambda: any(e.id == circ_id and e.status == CircStatus.CLOSED for e in events.snapshot()),
                   timeout=15, what="CIRC CLOSED")
    mine = [e for e in events.snapshot() if e.id == circ_id]
    assert [e.status for e in mine] == ["LAUNCHED", "EXTENDED", "EXTENDED", "EXTENDED", "BUILT", "CLOSED"]
    assert [len(e.path) for e in mine[:5]] == [0, 1, 2, 3, 3]
    assert mine[-1].reason == "REQUESTED"
    assert circ_id not in [c.id for c in await call(ctl.get_circuits)]


async def test_extendcircuit_explicit_path_and_bad_router(stem, controller, node):
    ctl, _srv = controller
    r = node.relays
    path = [r[2].fingerprint, f"${r[1].fingerprint}~{r[1].nickname}", r[0].nickname]
    circ_id = await call(ctl.extend_circuit, "0", path, "controller", True)
    circ = (await call(ctl.get_circuit, circ_id))
    assert [nick for _fp, nick in circ.path] == ["r2", "r1", "r0"] and circ.purpose == "CONTROLLER"
    with pytest.raises(stem.InvalidRequest, match="No such router"):
        await call(ctl.extend_circuit, "0", ["nosuchrelay"])
    with pytest.raises(stem.InvalidArguments):
        await call(ctl.close_circuit, "987654")


async def test_streams_and_orconns(controller, node, http_server):
    ctl, _srv = controller
    circ_id = await call(ctl.extend_circuit, "0", None, "general", True)
    circ = node.client.circuits[int(circ_id)]
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    streams = await call(ctl.get_streams)
    assert [(s.circ_id, s.target_address, s.target_port, s.status) for s in streams] == [
        (circ_id, "127.0.0.1", http_server.port, "SUCCEEDED")]
    orconns = (await call(ctl.get_info, "orconn-status")).splitlines()
    assert orconns == [f"${node.relays[0].fingerprint}~r0 CONNECTED"]
    body = await http_get(reader, writer, "/1000")
    assert len(body) == 1000
    read = int(await call(ctl.get_info, "traffic/read"))
    written = int(await call(ctl.get_info, "traffic/written"))
    assert read > 1000 and written > 0


async def test_signal_newnym_reaches_node(stem, controller, node):
    from stem import Signal
    from stem.control import EventType

    ctl, _srv = controller
    events = Events()
    await call(ctl.add_event_listener, events, EventType.SIGNAL)
    await call(ctl.signal, Signal.NEWNYM)
    await call(ctl.signal, "HUP")  # alias of RELOAD
    assert node.signals == ["NEWNYM", "RELOAD"]
    await wait_for(lambda: len(events.snapshot()) == 2, timeout=15, what="SIGNAL events")
    assert [e.signal for e in events.snapshot()] == ["NEWNYM", "RELOAD"]
    with pytest.raises(stem.InvalidArguments):
        await call(ctl.signal, "NOSUCHSIGNAL")
    await call(ctl.signal, Signal.SHUTDOWN)  # replied to first, then delivered
    await wait_for(lambda: node.signals[-1:] == ["SHUTDOWN"], timeout=15, what="SHUTDOWN at the node")


async def test_getconf_setconf_resetconf(stem, controller, node):
    from stem.control import EventType

    ctl, srv = controller
    events = Events()
    await call(ctl.add_event_listener, events, EventType.CONF_CHANGED)
    assert await call(ctl.get_conf, "nickname") == "Unnamed"
    assert await call(ctl.get_conf, "ControlPort") == f"127.0.0.1:{srv.port}"
    assert await call(ctl.get_conf, "CookieAuthentication") == "1"
    await call(ctl.set_conf, "MaxCircuitDirtiness", "300")
    assert node.conf["MaxCircuitDirtiness"] == ["300"]
    assert await call(ctl.get_conf, "MaxCircuitDirtiness") == "300"
    await call(ctl.set_options, {"Nickname": "ctl1", "Log": ["info stdout", "warn file x"]})
    assert node.conf["Nickname"] == ["ctl1"] and node.conf["Log"] == ["info stdout", "warn file x"]
    assert await call(ctl.get_conf, "Log", None, True) == ["info stdout", "warn file x"]
    with pytest.raises(stem.InvalidRequest):  # 553: the node rejected the value
        await call(ctl.set_conf, "MaxCircuitDirtiness", "soon")
    assert node.conf["MaxCircuitDirtiness"] == ["300"]
    with pytest.raises(stem.InvalidArguments):  # 552: unknown key
        await call(ctl.set_conf, "NoSuchOption", "1")
    with pytest.raises(stem.InvalidArguments):
        await call(ctl.get_conf, "NoSuchOption")
    await call(ctl.reset_conf, "MaxCircuitDirtiness")
    assert node.conf["MaxCircuitDirtiness"] == ["600"]
    await wait_for(lambda: len(events.snapshot()) == 3, timeout=15, what="CONF_CHANGED events")
    assert events.snapshot()[1].changed == {"Nickname": ["ctl1"], "Log": ["info stdout", "warn file x"]}
    text = await call(ctl.get_info, "config-text")
    assert "Nickname ctl1" in text.splitlines()


async def test_getinfo_directory_and_process_keys(stem, controller, node):
    from stem.control import Listener

    ctl, srv = controller
    statuses = await call(lambda: list(ctl.get_network_statuses()))  # a generator: run it in the thread
    assert sorted((s.fingerprint, s.nickname, s.or_port) for s in statuses) == sorted(
        (r.fingerprint, r.nickname, r.or_port) for r in node.relays)
    assert all({"Guard", "Exit", "Running"} <= set(s.flags) for s in statuses)
    one = await call(ctl.get_network_status, node.relays[1].fingerprint)
    assert one.nickname == "r1" and one.address == "127.0.0.1" and one.bandwidth == 1001
    assert (await call(ctl.get_network_status, "r2")).fingerprint == node.relays[2].fingerprint
    with pytest.raises(stem.ControllerError):
        await call(ctl.get_network_status, "F" * 40)
    assert await call(ctl.get_listeners, Listener.CONTROL) == [("127.0.0.1", srv.port)]
    assert await call(ctl.get_listeners, Listener.SOCKS) == [("127.0.0.1", 9050)]
    info = await call(ctl.get_info, [
        "config-file", "entry-guards", "events/names", "status/bootstrap-phase", "accounting/enabled",
        "process/user", "process/descriptor-limit", "config/names",
        "status/circuit-established"])
    assert info["config-file"] == node.config_file
    assert info["entry-guards"] == f"${node.relays[0].fingerprint}~r0 up"
    assert {"CIRC", "STREAM", "ORCONN", "BW", "NOTICE", "STATUS_CLIENT"} <= set(info["events/names"].split())
    assert info["status/bootstrap-phase"] == 'NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"'
    assert info["accounting/enabled"] == "0"
    assert int(info["process/descriptor-limit"]) > 0 and info["process/user"]
    assert "MaxCircuitDirtiness TimeInterval" in info["config/names"].splitlines()
    assert info["status/circuit-established"] == "0"
    assert await call(ctl.get_info, "fingerprint", None) is None  # a client: 551
    # no GeoIP database, as a tor without one: stem then refuses ip-to-country/* queries itself
    assert await call(ctl.get_info, "ip-to-country/1.2.3.4", "none") == "none"
    assert str(await call(ctl.msg, "GETINFO ip-to-country/ipv4-available")).splitlines() == [
        "ip-to-country/ipv4-available=0", "OK"]
    assert await call(ctl.get_accounting_stats, None) is None


@pytest.fixture
async def client_control(tmp_path):
    """The control port of the real client node (onionp2p.client.node.ClientNode through
    ClientControlAdapter, as `onionp2p client` and the testnet client serve it; the node is
    not started): (server, cookie path)."""
    from onionp2p.client.node import ClientNode as RealClientNode
    from onionp2p.config import ClientConfig
    from onionp2p.control.node import ClientControlAdapter

    real = RealClientNode(ClientConfig(data_dir=tmp_path / "client"), routers=lambda: [])
    srv = ControlServer(ClientControlAdapter(real), cookie_path=tmp_path / "client_cookie")
    await srv.start()
    yield srv, tmp_path / "client_cookie"
    await srv.stop()


async def test_client_answers_nyx_queries_as_tor(stem, client_control):
    srv, cookie = client_control
    raw = await Raw.open(srv.port)
    await raw.auth_cookie(cookie.read_bytes())
    for command, expected in TOR_CLIENT_REPLIES.items():
        assert await raw.command(command) == expected, command
    assert await raw.command("GETCONF ExitRelay UseMicrodescriptors HiddenServiceOptions") == [
        "250-ExitRelay=auto", "250-UseMicrodescriptors=auto", "250 HiddenServiceOptions"]
    for flavour in ("ipv4", "ipv6"):
        assert await raw.command(f"GETINFO exit-policy/{flavour}") == ["552 Not running in server mode"]
    assert await raw.command("GETINFO exit-policy/default") == [
        "250-exit-policy/default=reject *:*", "250 OK"]
    assert await raw.command("SETCONF ExitRelay=1") == [
        "553 Unable to set option: ExitRelay cannot be changed while running"]
    names = await raw.command("GETINFO config/names")
    assert {"ExitRelay Boolean+Auto", "UseMicrodescriptors Boolean+Auto",
            "HiddenServiceOptions Virtual"} <= set(names)
    info_names = await raw.command("GETINFO info/names")
    assert {"exit-policy/full", "exit-policy/default", "status/clients-seen"} <= {
        ln.split(" ")[0] for ln in info_names}
    await raw.close()

    from stem.control import Controller

    def with_stem():
        with Controller.from_port(port=srv.port) as ctl:
            ctl.authenticate()
            return (ctl.get_conf("ExitRelay"), ctl.get_conf("UseMicrodescriptors"),
                    ctl.get_hidden_service_conf(), ctl.get_info("status/clients-seen"), ctl.get_exit_policy())

    exit_relay, micro, hidden, seen, policy = await call(with_stem)
    assert (exit_relay, micro, dict(hidden)) == ("auto", "auto", {})
    assert seen == clients_seen_line()
    # stem's fallback for a non-relay (as nyx calls it): "reject private:*, reject *:*"
    assert not policy.is_exiting_allowed() and str(policy).endswith("reject *:*")


def test_exit_policy_lines_as_tor_writes_them():
    import stem.exit_policy

    policy = ExitPolicy.parse(["reject 10.0.0.0/8:*", "accept *4:80", "accept6 [2001:db8::]/32:443",
                               "accept *6:22", "reject 198.51.100.0/24:*", "accept 192.0.2.7:8000-8080",
                               "accept *:53", "reject *:*"], reject_private=False)
    full = ["reject 10.0.0.0/8:*", "accept *4:80", "accept6 [2001:db8::]/32:443", "accept6 *:22",
            "reject 198.51.100.0/24:*", "accept 192.0.2.7:8000-8080", "accept *:53", "reject *:*"]
    assert exit_policy_lines(policy.rules) == full
    assert exit_policy_lines(policy.rules, 4) == [ln for ln in full if "6 " not in ln]
    assert exit_policy_lines(policy.rules, 6) == [
        "accept6 [2001:db8::]/32:443", "accept6 *:22", "accept *:53", "reject *:*"]
    assert ExitPolicy.parse(full, reject_private=False) == policy  # our parser reads it back
    assert exit_policy_lines(REJECT_ALL.rules) == ["reject *:*"]  # a non-exit relay, as tor says
    private = exit_policy_lines(ExitPolicy.parse("accept *:*").rules)
    assert private[:2] == ["reject 0.0.0.0/8:*", "reject 169.254.0.0/16:*"]
    assert "reject6 [fc00::]/7:*" in private and private[-1] == "accept *:*"
    # stem (what nyx uses) reads the lines as the policy we enforce
    theirs = stem.exit_policy.ExitPolicy(*full)
    for address in ("10.1.2.3", "192.0.2.7", "198.51.100.9", "203.0.113.5", "2001:db8::1", "2001:db9::1"):
        for port in (22, 53, 80, 443, 8000, 8081):
            assert theirs.can_exit_to(address, port) == policy.allows(address, port), (address, port)
    assert clients_seen_line() == 'TimeStarted="1970-01-01 00:00:00" CountrySummary= IPVersions=v4=0,v6=0'
    assert clients_seen_line(365 * 86400, [("de", 16), ("us", 8)], 24, 8) == (
        'TimeStarted="1971-01-01 00:00:00" CountrySummary=de=16,us=8 IPVersions=v4=24,v6=8')


async def test_status_and_log_events(stem, controller, node):
    import logging

    from stem.control import EventType

    ctl, _srv = controller
    events = Events()
    await call(ctl.add_event_listener, events, EventType.NOTICE, EventType.WARN, EventType.STATUS_CLIENT)
    testlog = logging.getLogger("onionp2p.test_control")
    old = testlog.level
    testlog.setLevel(logging.INFO)
    try:
        get_logger("onionp2p.test_control").info("control log check", peer_addr="10.1.2.3", n=7)
        logging.getLogger("onionp2p.test_control").warning("plain %s warning", "stdlib")
    finally:
        testlog.setLevel(old)
    node.emit(StatusEvent("CLIENT", "NOTICE", "BOOTSTRAP", (("PROGRESS", "100"), ("TAG", "done"),
                                                              ("SUMMARY", "Done here"))))
    await wait_for(lambda: any(e.type == "STATUS_CLIENT" for e in events.snapshot()),
                   timeout=15, what="status event")
    def warned():
        return any(e.type == "WARN" and e.message == "plain stdlib warning" for e in events.snapshot())

    await wait_for(warned, timeout=15, what="WARN event")
    got = events.snapshot()
    assert "control log check peer_addr=[scrubbed] n=7" in [e.message for e in got if e.type == "NOTICE"]
    assert "plain stdlib warning" in [e.message for e in got if e.type == "WARN"]
    assert not any("10.1.2.3" in str(e) for e in got)
    status = [e for e in got if e.type == "STATUS_CLIENT"][0]
    assert status.action == "BOOTSTRAP" and status.arguments["SUMMARY"] == "Done here"


async def test_stream_and_orconn_events_parse_in_stem(stem, controller, node):
    from stem.control import EventType

    from onionp2p.control.formats import OrConnEvent, StreamEvent
    from onionp2p.control.server import ControlledNode

    assert isinstance(node, ControlledNode)
    ctl, _srv = controller
    events = Events()
    await call(ctl.add_event_listener, events, EventType.STREAM, EventType.ORCONN)
    fp = node.relays[0].fingerprint
    node.emit(StreamEvent(StreamInfo(id=7, status="CLOSED", circ_id=3, target="example.com:443",
                                     reason="DONE", purpose="USER", socks_username="u 1",
                                     client_protocol="SOCKS5")))
    node.emit(OrConnEvent(OrConnInfo(id=9, status="CLOSED", fingerprint=fp, nickname="r0", ncircs=2,
                                     reason="DONE")))
    node.emit(OrConnEvent(OrConnInfo(id=10, status="LAUNCHED", address="127.0.0.1:9001")))
    await wait_for(lambda: len(events.snapshot()) == 3, timeout=15, what="STREAM and ORCONN events")
    stream, orconn, launched = events.snapshot()
    assert (stream.id, stream.status, stream.circ_id, stream.target_address, stream.target_port) == (
        "7", "CLOSED", "3", "example.com", 443)
    assert (stream.reason, stream.purpose, stream.keyword_args["SOCKS_USERNAME"]) == ("DONE", "USER", "u 1")
    assert (orconn.endpoint_fingerprint, orconn.endpoint_nickname, orconn.status, orconn.circ_count,
            orconn.id, orconn.reason) == (fp, "r0", "CLOSED", 2, "9", "DONE")
    assert (launched.endpoint_address, launched.endpoint_port) == ("127.0.0.1", 9001)


async def test_bw_events_every_second(stem, controller):
    from stem.control import EventType

    ctl, srv = controller
    events = Events()
    await call(ctl.add_event_listener, events, EventType.BW)
    await wait_for(lambda: len(events.snapshot()) >= 2, timeout=15, what="two BW events")
    assert all(isinstance(e.read, int) and isinstance(e.written, int) for e in events.snapshot())
    cache = await call(ctl.get_info, "bw-event-cache")
    assert re.fullmatch(r"\d+,\d+( \d+,\d+)*", cache)


# -- raw sockets: error codes and bounds ------------------------------------------------------

async def test_error_codes_raw_socket(make_server, tmp_path, node):
    srv = await make_server(cookie_path=tmp_path / "c")
    raw = await Raw.open(srv.port)
    await raw.auth_cookie((tmp_path / "c").read_bytes())
    cases = {
        "FROBNICATE now": '510 Unrecognized command "FROBNICATE"',
        "GETINFO nosuch/key": '552 Unrecognized key "nosuch/key"',
        "GETINFO version nosuch": '552 Unrecognized key "nosuch"',
        "GETINFO": "512 Bad arguments to GETINFO: Need at least 1 argument(s)",
        "GETCONF NoSuch": '552 Unrecognized configuration key "NoSuch"',
        'SETCONF Nickname="unterminated': "513 syntax error in configuration values",
        "SETCONF NoSuch=1": "552 Unrecognized option: Unknown option 'NoSuch'.  Failing.",
        "SETCONF ControlPort=1": "553 Unable to set option: ControlPort is read-only via the control port",
        "SETEVENTS CIRC BOGUS": '552 Unrecognized event "BOGUS"',
        "SIGNAL": "512 Bad arguments to SIGNAL: Need exactly 1 argument(s)",
        "SIGNAL BOGUS": '552 Unrecognized signal code "BOGUS"',
        "EXTENDCIRCUIT": "512 Missing argument to EXTENDCIRCUIT",
        "EXTENDCIRCUIT x1": '552 Unknown circuit "x1"',
        "EXTENDCIRCUIT 5": "512 syntax error: not enough arguments.",
        "EXTENDCIRCUIT 0 purpose=weird": '552 Unknown purpose "purpose=weird"',
        "EXTENDCIRCUIT 0 bad-name!": '552 No such router "bad-name!"',
        "CLOSECIRCUIT 424242": '552 Unknown circuit "424242"',
        "CLOSESTREAM 1": "512 Bad arguments to CLOSESTREAM: Need at least 2 argument(s)",
        "CLOSESTREAM 1 x": '552 Unrecognized reason "x"',
        "CLOSESTREAM 77 1": '552 Unknown stream "77"',
        "PROTOCOLINFO x": '513 No such version "x"',
        "MAPADDRESS a=b": "511 MAPADDRESS is not implemented by onionp2p",
        "GETINFO bad\rkey": '552 Unrecognized key "bad\\x0dkey"',
        "GETINFO exit-policy/full": "552 Not running in server mode",  # a node without exit_policy()
    }
    for command, expected in cases.items():
        assert await raw.command(command) == [expected], command
    assert node.signals == []
    # multi-line commands are read to their "." line, then refused
    await raw.send("+LOADCONF\r\nNickname x\r\n..dotted\r\n.\r\n+GETINFO\r\nx\r\n.\r\n")
    assert await raw.reply() == ["511 +LOADCONF is not implemented by onionp2p"]
    assert await raw.reply() == ['510 Unrecognized command "+GETINFO"']
    # a multi-line value comes as a data block; a pipelined batch is answered in order
    await raw.send("GETINFO config-text version\r\nGETCONF Nickname Log\r\n")
    assert await raw.reply() == [
        "250+config-text=", "Nickname Unnamed", "SocksPort 127.0.0.1:9050", "MaxCircuitDirtiness 600",
        "Log notice stdout", "DisableDebuggerAttachment 1", ".", f"250-version={version_string()}", "250 OK"]
    assert await raw.reply() == ["250-Nickname=Unnamed", "250 Log=notice stdout"]
    assert await raw.command("QUIT") == ["250 closing connection"]
    assert await raw.at_eof()


async def test_unauthenticated_flood_is_cut_off(make_server, tmp_path, node):
    srv = await make_server(cookie_path=tmp_path / "c")
    raw = await Raw.open(srv.port)
    await raw.send(b"GETINFO version\r\nSIGNAL NEWNYM\r\n" * 5000)
    assert await raw.reply() == ["514 Authentication required."]
    assert await raw.at_eof()
    assert node.signals == []
    # PROTOCOLINFO only once; AUTHCHALLENGE only once; a bad secret closes
    raw = await Raw.open(srv.port)
    assert (await raw.command("PROTOCOLINFO"))[-1] == "250 OK"
    assert await raw.command("PROTOCOLINFO 1") == ["514 Authentication required."]
    assert await raw.at_eof()
    raw = await Raw.open(srv.port)
    challenge = await raw.command("AUTHCHALLENGE SAFECOOKIE " + "00" * 32)
    assert challenge[0].startswith("250 AUTHCHALLENGE SERVERHASH=")
    assert await raw.command("AUTHCHALLENGE SAFECOOKIE " + "00" * 32) == ["514 Authentication required."]
    raw = await Raw.open(srv.port)
    assert await raw.command("AUTHENTICATE " + "00" * 32) == [
        "515 Authentication failed: Authentication cookie did not match expected value."]
    assert await raw.at_eof()
    raw = await Raw.open(srv.port)
    assert await raw.command('AUTHENTICATE "plain"') == [
        "515 Authentication failed: Wrong length on authentication cookie."]
    raw = await Raw.open(srv.port)
    assert (await raw.command("AUTHENTICATE zz"))[0].startswith("551 Invalid hexadecimal encoding.")
    assert await raw.at_eof()


async def test_line_too_long_and_auth_timeout(make_server, tmp_path):
    srv = await make_server(cookie_path=tmp_path / "c", max_line=1024, auth_timeout=0.2)
    raw = await Raw.open(srv.port)
    await raw.send(b"PROTOCOLINFO\r\n" + b"A" * 5000)
    assert (await raw.reply())[-1] == "250 OK"
    assert await raw.reply() == ["500 Line too long."]
    assert await raw.at_eof()
    idle = await Raw.open(srv.port)  # never authenticates: closed by the server
    assert await idle.at_eof()


async def test_slow_controller_is_disconnected_node_unaffected(make_server, tmp_path, node):
    srv = await make_server(cookie_path=tmp_path / "c", max_output_bytes=64 * 1024)
    cookie = (tmp_path / "c").read_bytes()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills quickly
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
    slow = Raw(*await asyncio.open_connection(sock=sock, limit=4096))
    await slow.auth_cookie(cookie)
    assert await slow.command("SETEVENTS STATUS_CLIENT") == ["250 OK"]
    healthy = await Raw.open(srv.port)
    await healthy.auth_cookie(cookie)
    assert len(srv._conns) == 2
    # 2 MB of events, emitted synchronously by the node: the slow controller never reads
    filler = "x" * 200
    for i in range(20_000):  # 5 MB, emitted synchronously: the event loop cannot deliver any of it
        node.emit(StatusEvent("CLIENT", "NOTICE", "FILLER", (("N", str(i)), ("PAD", filler))))
    slow_conn = [c for c in srv._conns if "STATUS_CLIENT" in c.events]
    assert len(slow_conn) == 1 and slow_conn[0]._dead  # cut off; the node's emit loop never waited
    await wait_for(lambda: len(srv._conns) == 1, timeout=15, what="slow controller to be gone")
    assert await healthy.command("GETINFO version") == [f"250-version={version_string()}", "250 OK"]
    with pytest.raises((ConnectionError, AssertionError)):
        while True:  # whatever was delivered before the cut, then EOF/reset
            if not await slow.reply():
                raise AssertionError("EOF")


async def test_connection_limit(make_server, tmp_path):
    srv = await make_server(cookie_path=tmp_path / "c", max_connections=2)
    a, b = await Raw.open(srv.port), await Raw.open(srv.port)
    await wait_for(lambda: len(srv._conns) == 2, timeout=15, what="two connections")
    c = await Raw.open(srv.port)
    assert await c.reply() == ["451 Too many control connections"]
    assert await c.at_eof()
    await a.close()
    await b.close()


async def test_malformed_node_event_is_dropped(make_server, tmp_path, node):
    srv = await make_server(cookie_path=tmp_path / "c")
    raw = await Raw.open(srv.port)
    await raw.auth_cookie((tmp_path / "c").read_bytes())
    assert await raw.command("SETEVENTS CIRC") == ["250 OK"]
    node.emit(CircEvent(CircuitInfo(id=1, status="BUILT\r\n650 FAKE")))  # would inject a line
    node.emit(CircEvent(CircuitInfo(id=2, status="BUILT", path=(("AB" * 20, "ok"),))))
    assert await raw.reply() == [f"650 CIRC 2 BUILT ${'AB' * 20}~ok PURPOSE=GENERAL"]


# -- fuzzing ------------------------------------------------------------------------------------

_KEYWORDS = ["GETINFO", "GETCONF", "SETCONF", "RESETCONF", "SETEVENTS", "SIGNAL", "EXTENDCIRCUIT",
             "CLOSECIRCUIT", "CLOSESTREAM", "USEFEATURE", "PROTOCOLINFO", "AUTHCHALLENGE", "MAPADDRESS",
             "+LOADCONF", "getinfo", "Bogus", ""]
_ARG_CHARS = st.sampled_from(list('abcXYZ019 =",\\$~/.-_+\t') + ["\x00", "\x7f", "é", "\r"])
_line = st.one_of(
    st.builds(lambda k, a: f"{k} {a}", st.sampled_from(_KEYWORDS), st.text(_ARG_CHARS, max_size=60)),
    st.builds(lambda k: f"GETINFO {k}", st.sampled_from(["version", "ns/all", "circuit-status", "ns/id/$x",
                                                         "net/listeners/x", "ip-to-country/::1"])),
    st.text(max_size=80).map(lambda s: s.replace("\n", " ")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12), st.booleans())
def test_fuzz_session_bytes(chunks, authenticate):
    """Arbitrary bytes: the sans-IO session yields only well-formed actions, never an exception."""
    session = ControlSession(AuthConfig(cookie=b"k" * 32, cookie_path="/c", version="0.4.9.3"), max_line=200,
                             max_body=500)
    if authenticate:
        session.feed(b"AUTHENTICATE " + (b"k" * 32).hex().encode() + b"\r\n")
        assert session.authenticated
    closed = False
    for chunk in [*chunks, b"\r\n.\r\nQUIT\r\n"]:
        for action in session.feed(chunk):
            assert not closed  # nothing after Close
            assert isinstance(action, (Send, Dispatch, Close))
            if isinstance(action, Send):
                assert re.fullmatch(rb"(\d{3}[ +-][^\r\n]*\r\n)+", action.data)
            if isinstance(action, Dispatch):
                assert session.authenticated
            closed = isinstance(action, Close)
    assert closed and session.closed


@settings(max_examples=300, deadline=None)
@given(st.text(_ARG_CHARS, max_size=80))
def test_fuzz_tokenizer_raises_only_control_errors(text):
    try:
        tokens = split_args(text)
    except ControlError as exc:
        assert exc.code == 512
        return
    assert "".join(tokens) == text.replace("\t", "").replace(" ", "") or '"' in text
    for t in tokens:
        for fn in (unquote, split_keyword):
            try:
                fn(t)
            except ControlError as exc:
                assert exc.code in (512, 513)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_command_reader(data):
    reader = CommandReader(max_line=100, max_body=300)
    try:
        commands = reader.feed(data)
    except LineTooLong as exc:
        commands = exc.commands
    assert all(c.keyword == c.keyword.upper() for c in commands)


_FUZZ_SERVERS: dict[int, ControlServer] = {}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, min_size=1, max_size=8))
async def test_fuzz_live_server_random_lines(make_server, tmp_path, lines):
    """Random command lines to the real server (and node): every answer is a well-formed
    reply, and the server keeps serving."""
    cookie_path = tmp_path / "fuzz-cookie"
    if id(make_server) not in _FUZZ_SERVERS:  # one server for all examples of this run
        _FUZZ_SERVERS.clear()
        _FUZZ_SERVERS[id(make_server)] = await make_server(cookie_path=cookie_path)
    srv = _FUZZ_SERVERS[id(make_server)]
    raw = await Raw.open(srv.port)
    await raw.auth_cookie(cookie_path.read_bytes())
    payload = "".join(line + "\r\n" for line in lines) + ".\r\nGETINFO version\r\n"
    await raw.send(payload.encode("utf-8", "surrogatepass"))
    replies = []
    while True:
        reply = await raw.reply()
        if not reply:
            break
        replies.append(reply)
        assert re.match(r"[2-6]\d\d", reply[-1])
        if reply[0] == f"250-version={version_string()}":
            break
    if not replies or replies[-1][0] != f"250-version={version_string()}":
        closing = replies[-1][-1] if replies else ""
        assert closing == "250 closing connection" or closing[:1] == "5", replies
    await raw.close()
    probe = await Raw.open(srv.port)
    assert (await probe.command("PROTOCOLINFO"))[-1] == "250 OK"
    await probe.close()


async def test_onion_client_auth_commands_manage_the_client_onion_auth_dir_keys(tmp_path):
    """ONION_CLIENT_AUTH_ADD/REMOVE/VIEW as tor answers them, over the keys read from
    client_onion_auth_dir (tor's ClientOnionAuthDir: only *.auth_private files; a bad one is
    skipped); Flags=Permanent writes the key file, REMOVE deletes it."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from onionp2p.client.node import ClientNode as RealClientNode
    from onionp2p.config import ClientConfig
    from onionp2p.control.node import ClientControlAdapter
    from onionp2p.proto.ed25519x import ExpandedKey
    from onionp2p.proto.hs.address import encode_onion_address
    from onionp2p.proto.hs.keys import format_auth_private, parse_auth_private

    services = [ExpandedKey.from_seed(bytes([i]) * 32).public for i in range(1, 4)]
    labels = [encode_onion_address(pub).removesuffix(".onion") for pub in services]
    secrets = [X25519PrivateKey.generate().private_bytes_raw() for _ in services]
    auth = tmp_path / "auth"
    auth.mkdir(mode=0o755)  # tor tightens it to 0700
    (auth / "one.auth_private").write_text(format_auth_private(services[0], secrets[0]))
    (auth / "broken.auth_private").write_text("not a key\n")
    (auth / "two.txt").write_text(format_auth_private(services[1], secrets[1]))  # not *.auth_private
    real = RealClientNode(ClientConfig(data_dir=tmp_path / "client", client_onion_auth_dir=auth),
                          routers=lambda: [])
    assert (auth.stat().st_mode & 0o777) == 0o700
    assert real.onion_auth.get(services[0]).private_bytes_raw() == secrets[0]
    assert real.onion_auth.get(services[1]) is None
    srv = ControlServer(ClientControlAdapter(real), cookie_path=tmp_path / "cookie")
    await srv.start()
    raw = await Raw.open(srv.port)
    try:
        await raw.auth_cookie((tmp_path / "cookie").read_bytes())
        b64 = [base64.b64encode(s).decode().rstrip("=") for s in secrets]
        assert await raw.command("ONION_CLIENT_AUTH_VIEW") == [
            "250-ONION_CLIENT_AUTH_VIEW", f"250-CLIENT {labels[0]} x25519:{b64[0]} Flags=Permanent", "250 OK"]
        assert await raw.command(f"ONION_CLIENT_AUTH_ADD {labels[1]} x25519:{b64[1]} ClientName=alice") == [
            "250 OK"]
        assert real.onion_auth.get(services[1]).private_bytes_raw() == secrets[1]
        assert await raw.command(f"ONION_CLIENT_AUTH_ADD {labels[1]} x25519:{b64[1]}") == [
            "251 Client for onion existed and replaced"]
        assert await raw.command(f"ONION_CLIENT_AUTH_VIEW {labels[1]}") == [
            f"250-ONION_CLIENT_AUTH_VIEW {labels[1]}", f"250-CLIENT {labels[1]} x25519:{b64[1]}", "250 OK"]
        assert not list(auth.glob(f"{labels[1]}*"))  # not permanent: in memory only
        assert await raw.command(f"ONION_CLIENT_AUTH_ADD {labels[2]} x25519:{b64[2]} Flags=Permanent") == [
            "250 OK"]
        stored = auth / f"{labels[2]}.auth_private"
        assert parse_auth_private(stored.read_text()).secret == secrets[2]
        assert await raw.command(f"ONION_CLIENT_AUTH_REMOVE {labels[2]}") == ["250 OK"]
        assert not stored.exists() and real.onion_auth.get(services[2]) is None
        assert await raw.command(f"ONION_CLIENT_AUTH_REMOVE {labels[2]}") == [
            f'251 No credentials for "{labels[2]}"']
        assert (await raw.command(f"ONION_CLIENT_AUTH_ADD {labels[2][:-1]}a x25519:{b64[2]}"))[0].startswith(
            "512 Invalid v3 address")
        assert await raw.command(f"ONION_CLIENT_AUTH_ADD {labels[2]} ed25519:{b64[2]}") == [
            '552 Unrecognized key type "ed25519"']
        assert await raw.command(f"ONION_CLIENT_AUTH_ADD {labels[2]} x25519:AAAA") == [
            "512 Failed to decode x25519 private key"]
    finally:
        await raw.close()
        await srv.stop()
