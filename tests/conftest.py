"""Shared fixtures and helpers of the test files (which import helpers from here, never from
each other): a local HTTP server, polling, SOCKS, in-process relays on real TLS sockets, a
client node, ``onionp2p relay`` processes, the leak baseline and a running testnet."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from onionp2p.client.client import ClientCircuit, OnionClient, StreamTransport
from onionp2p.client.node import ClientNode
from onionp2p.config import ClientConfig
from onionp2p.errors import StreamError
from onionp2p.net import tls
from onionp2p.net.channel import Channel
from onionp2p.proto import circuit as core
from onionp2p.proto.directory import RelayInfo, RouterStatus
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.link import PeerIdentity
from onionp2p.proto.stream import Stream
from onionp2p.relay.circuit import OrCircuit
from onionp2p.relay.exit import ExitConnection
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

_BLOBS: dict[int, bytes] = {}


def load_tornet():
    """tools/tornet.py (the private tor network the interop tests start) as a module, loaded
    once per test session (tools/ is not a package)."""
    module = sys.modules.get("tornet")
    if module is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("tornet", Path(__file__).parents[1] / "tools" / "tornet.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["tornet"] = module
        spec.loader.exec_module(module)
    return module


def blob(n: int) -> bytes:
    """Deterministic pseudo-random content of n bytes."""
    if n not in _BLOBS:
        _BLOBS[n] = random.Random(n).randbytes(n)
    return _BLOBS[n]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with ``dof`` degrees of freedom: the regularized
    upper incomplete gamma Q(dof/2, x/2) (series below a+1, Lentz's continued fraction above)."""
    a, x = dof / 2, x / 2
    if x <= 0:
        return 1.0
    front = math.exp(-x + a * math.log(x) - math.lgamma(a))
    if x < a + 1:
        term = total = 1 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1 - total * front)
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return front * h


def chi_square(observed: dict, expected: dict) -> tuple[float, float]:
    """Pearson's chi-square of ``observed`` counts against ``expected`` counts (same keys;
    a key missing from ``observed`` counts 0): (statistic, p-value). A count where nothing
    was expected makes the p-value 0."""
    assert set(observed) <= set(expected), set(observed) - set(expected)
    if any(observed.get(k, 0) and expected[k] <= 0 for k in expected):
        return math.inf, 0.0
    cells = [(observed.get(k, 0), e) for k, e in expected.items() if e > 0]
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return stat, chi2_sf(stat, len(cells) - 1)


async def wait_for(pred, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    """Poll ``pred()`` until it is true (returns its value) or fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not (value := pred()):
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
    return value


def unavailable(why: str) -> NoReturn:
    """A tool, package or privilege the test needs is missing: skip it, except under
    CI=true, where that fails the test (a green CI run means every interop test ran)."""
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def require_tool(name: str, package: str) -> str:
    """The path of system tool ``name``; without it :func:`unavailable` (tools/test
    installs ``package``)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed (Debian package {package}; tools/test installs it)")
    return path


def require_tor():
    """tools/tornet.py's module (:func:`load_tornet`) once tor and tor-gencert are there; the
    test is skipped without them, except under CI=true, where it fails (tools/test installs
    Debian's 'tor')."""
    tornet = load_tornet()
    if not tornet.tor_available():
        unavailable("needs the 'tor' and 'tor-gencert' programs (Debian package 'tor'; tools/test installs it)")
    return tornet


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def socks_connect(socks_port: int, host: str, port: int):
    """A SOCKS5 CONNECT (no auth, ``host`` sent as a name) through the SOCKS port at
    127.0.0.1:``socks_port``; returns the open (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", socks_port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    name = host.encode()
    writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    reply = await asyncio.wait_for(reader.readexactly(10), 30)
    assert reply[1] == 0, reply
    return reader, writer


class HttpServer:
    """A tiny HTTP/1.0 server on 127.0.0.1: ``GET /<n>`` answers n deterministic bytes;
    ``GET /echo`` echoes the request body until EOF; ``GET /hold`` sends 20 MB as fast as
    the peer reads (for back-pressure tests)."""

    def __init__(self):
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.connections = 0
        self.peers: list[str] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.peers.append(writer.get_extra_info("peername")[0])
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            if path == "/echo":
                writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
                while chunk := await reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()
            else:
                n = 20_000_000 if path == "/hold" else int(path.lstrip("/"))
                body = blob(n)
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                view = memoryview(body)
                for i in range(0, n, 1 << 16):
                    writer.write(view[i : i + (1 << 16)])
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
        finally:
            writer.close()

    async def start(self) -> HttpServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server:
            self.server.close()


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    """Send GET and return the body (reads to EOF)."""
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read(-1)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:100]
    return body


@pytest.fixture
async def http_server():
    srv = await HttpServer().start()
    yield srv
    await srv.stop()


LOOPBACK_EXIT = "accept 127.0.0.1:*\nreject *:*"


def relay_config(data_dir, **kw):
    """The config of an in-process relay: ``data_dir``, 127.0.0.1 on any free port, and
    ``kw`` as :class:`~onionp2p.config.RelayConfig` fields."""
    from onionp2p.config import RelayConfig

    kw.setdefault("or_address", ("127.0.0.1", 0))
    return RelayConfig(data_dir=Path(data_dir), **kw)


@pytest.fixture
async def relay_net(tmp_path):
    """Three in-process relays (all exits for 127.0.0.1) on real TLS listeners."""
    relays = []
    for i in range(3):
        keys = RelayKeys.load_or_create(tmp_path / f"r{i}" / "keys")
        relay = Relay(keys, relay_config(tmp_path / f"r{i}", exit_reject_private=False, nickname=f"r{i}", exit_policy=ExitPolicy.parse(LOOPBACK_EXIT, reject_private=False), extend_allow_private=True))
        await relay.start()
        relays.append(relay)
    yield relays
    for relay in relays:
        await relay.stop()


# -- a client node on in-process exit relays ---------------------------------------------------

#: the flags ``client_node`` gives every relay of ``exit_relays`` in its directory
RELAY_FLAGS = frozenset({"Exit", "Fast", "Guard", "Running", "Stable", "Valid"})


@pytest.fixture
async def exit_relays(tmp_path):
    """Three in-process relays that are exits (policy summary accepts every port)."""
    relays = []
    for i in range(3):
        keys = RelayKeys.load_or_create(tmp_path / f"x{i}" / "keys")
        relay = Relay(keys, relay_config(tmp_path / f"x{i}", exit_reject_private=False, nickname=f"node{i}", exit_policy=ExitPolicy.parse("accept *:*", reject_private=False), extend_allow_private=True))
        await relay.start()
        relays.append(relay)
    yield relays
    for relay in relays:
        await relay.stop()


@pytest.fixture
async def client_node(exit_relays, tmp_path):
    """A running ClientNode with SOCKS and a control port, two preemptive circuits built."""
    statuses = [RouterStatus(r.info(), RELAY_FLAGS, bandwidth=1000 + i) for i, r in enumerate(exit_relays)]
    cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=tmp_path / "client", socks_address=("127.0.0.1", 0), control_port=0,
                       enforce_distinct_subnets=False, preemptive_circuits=2, log_level="warning")
    node = ClientNode(cfg, routers=lambda: statuses)
    await node.start(ready_timeout=30)
    await wait_for(lambda: sum(c.state == "built" for c in node.client.circuits.values()) >= 2, timeout=20.0, what="2 circuits")
    yield node
    await node.stop()


# -- ``onionp2p relay`` / ``authority`` processes and stem ----------------------------------------

class NodeProc:
    """``python -m onionp2p KIND --config DIR/KIND.toml`` with ``cfg`` as its TOML table
    (KIND: relay, authority or client)."""

    def __init__(self, tmp: Path, name: str, kind: str = "relay", **cfg):
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.kind = kind
        table = {"data_dir": ".", "log_format": "json", "log_level": "info", **cfg}
        if kind != "client":  # clients have no nickname
            table = {"nickname": name, **table}
        if kind == "relay":
            table = {"or_address": "127.0.0.1:0", "exit_reject_private": False, "extend_allow_private": True,
                     **table}
        self.config = self.dir / f"{kind}.toml"
        self.config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
        self.log = open(self.dir / "log.txt", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "onionp2p", kind, "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def logtext(self) -> str:
        return (self.dir / "log.txt").read_text()

    def wait_line(self, pattern: str, timeout: float = 60) -> re.Match:
        end = time.time() + timeout
        while time.time() < end:
            if m := re.search(pattern, self.logtext()):
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}): {self.logtext()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no line matching {pattern!r}: {self.logtext()[-3000:]}")

    @property
    def control_port(self) -> int:
        return int(self.wait_line(r"Control port at 127\.0\.0\.1:(\d+)").group(1))

    @property
    def metrics_url(self) -> str:
        return self.wait_line(r"Metrics port at (http://127\.0\.0\.1:\d+/metrics)").group(1)

    def info(self) -> RelayInfo:
        self.wait_line(r"listening on 127\.0\.0\.1:\d+")
        return RelayInfo.load(self.dir / "relay-info.json")

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.logtext().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == name:
                out.append(ev)
        return out

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def nodes(tmp_path):
    started: list[NodeProc] = []

    def start(name: str, kind: str = "relay", **cfg) -> NodeProc:
        p = NodeProc(tmp_path, name, kind, **cfg)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
        p.log.close()


async def close_controller(controller) -> None:
    """stem's close() joins its threads; in a daemon thread with a bound, so a stem hang
    after a failed assertion cannot hang the test run."""
    import threading

    t = threading.Thread(target=controller.close, daemon=True)
    t.start()
    await asyncio.to_thread(t.join, 10)


# -- leaks: measuring what this process holds (test_leaks.py, test_faults.py) --------------------

TRACKED = (Channel, OrCircuit, ClientCircuit, core.RelayCircuit, core.ClientCircuit, Stream, ExitConnection,
           StreamTransport)


def open_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory's own fd, gone by now
            pass
    return out


def live_objects() -> dict[str, int]:
    gc.collect()
    counts = {cls.__name__: 0 for cls in TRACKED}
    for obj in gc.get_objects():
        if isinstance(obj, TRACKED):
            counts[type(obj).__name__] += 1
    return counts


class Snapshot:
    def __init__(self) -> None:
        me = asyncio.current_task()
        self.tasks = {t for t in asyncio.all_tasks() if t is not me and not t.done()}
        self.fds = open_fds()
        self.objects = live_objects()

    def diff(self, base: Snapshot) -> list[str]:
        problems = []
        extra_fds = {fd: path for fd, path in self.fds.items() if base.fds.get(fd) != path}
        if len(self.fds) != len(base.fds):
            problems.append(f"{len(self.fds)} fds open, baseline {len(base.fds)}; new: {extra_fds}")
        extra_tasks = self.tasks - base.tasks
        if len(self.tasks) != len(base.tasks):
            problems.append(f"{len(self.tasks)} tasks, baseline {len(base.tasks)}; new: "
                            f"{[t.get_coro() for t in extra_tasks]}")
        if self.objects != base.objects:
            problems.append(f"live objects {self.objects}, baseline {base.objects}")
        return problems


async def settle(relays: list[Relay], base: Snapshot, timeout: float = 20.0) -> None:
    """Close the relays' channels, wait until nothing is left over, else fail with a diff."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        close_channels(relays)
        await asyncio.sleep(0.05)
        busy = {r.nickname: relay_busy(r) for r in relays if relay_busy(r)}
        problems = [] if busy else Snapshot().diff(base)
        if not busy and not problems:
            return
        if loop.time() > end:
            raise AssertionError(f"not back to the baseline: {busy or problems}")


def close_channels(relays: list[Relay]) -> None:
    """Drop the relays' channels (relay-to-relay ones stay open otherwise)."""
    for r in relays:
        for chan in list(r.channels):
            chan.close("test: back to the baseline")


def relay_busy(r: Relay) -> list[str]:
    """What a relay still holds that an idle relay does not."""
    held = {
        "channels": len(r.channels), "circuits": len(r.circuits), "exit tasks": len(r.exit._tasks),
        "connecting": r.chanmgr.connecting, "handshaking": len(r._handshaking), "slots": len(r._slots),
        "counted connections": r.dos.connections(), "throttled": len(r._throttled),
        "identities": len(r.by_identity),
    }
    return [f"{k}={v}" for k, v in held.items() if v]


def start_relay_process(d: Path, *args: str) -> subprocess.Popen:
    """``onionp2p relay --config d/relay.toml``, output to ``d/log.txt``."""
    with open(d / "log.txt", "w") as log:  # the child has its own copy; ours is closed at once
        return subprocess.Popen([sys.executable, "-m", "onionp2p", "relay", "--config", str(d / "relay.toml"),
                                 *args], stdout=log, stderr=subprocess.STDOUT)


async def channel_from(client: OnionClient, info: RelayInfo, local_ip: str = "127.0.0.1", *,
                       rcvbuf: int | None = None) -> Channel:
    """``client``'s channel to a relay from ``local_ip`` (and a small receive buffer)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((local_ip, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (info.address, info.or_port))
    except BaseException:
        sock.close()
        raise
    _t, chan = await loop.create_connection(
        lambda: Channel(client, initiator=True, expected=PeerIdentity(info.ed_id, info.rsa_id)),
        sock=sock, ssl=tls.client_context(), server_hostname="")
    await chan.ready
    client.channels[info.rsa_id] = chan
    return chan


class Net:
    """In-process relays for the leak tests: ``warm_up`` returns the baseline ``settle`` compares
    against (test_leaks.py's ``net`` fixture; test_faults.py's ``FaultNet``)."""

    def __init__(self, tmp: Path, http_port: int):
        self.tmp = tmp
        self.http_port = http_port
        self.relays: list[Relay] = []

    async def start(self, n: int = 3, *, guard: dict | None = None, policy: str = LOOPBACK_EXIT,
                    **kw) -> None:
        """``n`` relays with limits ``kw``; ``guard``: further limits for the first one."""
        for i in range(n):
            relay = Relay(RelayKeys.load_or_create(self.tmp / f"r{i}"), relay_config(self.tmp / f"r{i}", exit_reject_private=False, nickname=f"r{i}", exit_policy=ExitPolicy.parse(policy, reject_private=False), extend_allow_private=True, **{**kw, **(guard if i == 0 and guard else {})}))
            await relay.start()
            self.relays.append(relay)

    def path(self, *idx: int) -> list[RelayInfo]:
        return [self.relays[i].info() for i in (idx or range(len(self.relays)))]

    async def warm_up(self) -> Snapshot:
        client = OnionClient()
        circ = await client.build_circuit(self.path())
        r, w = await circ.open_stream("localhost", self.http_port)  # the exit's resolver
        assert await http_get(r, w, "/1000") == blob(1000)
        await circ.resolve("localhost")
        with pytest.raises(StreamError):
            await circ.open_stream("no-such-host.invalid", 80)
        await client.close()
        del circ, r, w, client
        close_channels(self.relays)
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        # idle: the relays hold nothing and every protocol object of the warm-up is gone
        while any(relay_busy(r) for r in self.relays) or any(live_objects().values()):
            assert loop.time() < end, ({r.nickname: relay_busy(r) for r in self.relays}, live_objects())
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        return Snapshot()


# -- ``onionp2p testnet`` (test_testnet.py, test_nyx.py) -------------------------------------------

class RunningTestnet:
    """``onionp2p testnet`` as a user runs it (``extra``: more command-line arguments;
    ``env``: more environment variables, which its relays and authority inherit)."""

    def __init__(self, data_dir: Path, extra: Sequence[str] = (), env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.out = open(data_dir.parent / f"{data_dir.name}.out", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onionp2p", "testnet", "--socks-port", "auto", "--control-port", "auto",
             "--metrics-port", "auto", "--data-dir", str(data_dir), "--voting-interval", "4", *extra],
            stdout=self.out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.socks = self.control = self.metrics = self.http_tunnel = self.dns = 0
        end = time.time() + 150
        while time.time() < end and not (self.socks and self.control and self.metrics):
            text = Path(self.out.name).read_text()
            if m := re.search(r"Metrics port at http://127\.0\.0\.1:(\d+)/metrics", text):
                self.metrics = int(m.group(1))
            if m := re.search(r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)", text):
                self.socks = int(m.group(1))
            if m := re.search(r"Control port at 127\.0\.0\.1:(\d+)", text):
                self.control = int(m.group(1))
            if m := re.search(r"HTTP CONNECT tunnel at 127\.0\.0\.1:(\d+)", text):
                self.http_tunnel = int(m.group(1))
            if m := re.search(r"DNS port at 127\.0\.0\.1:(\d+)", text):
                self.dns = int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        if not self.socks:
            self.stop()
            raise AssertionError("testnet did not become ready:\n" + Path(self.out.name).read_text()[-3000:])
        self.cookie = data_dir / "client" / "control_auth_cookie"

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", str(self.data_dir)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if int(p) != self.proc.pid]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.out.close()
