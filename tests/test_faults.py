"""Fault tolerance: relays that die and come back, an authority that goes away, half-open
links, a peer that stops reading — and the limits that are not covered in test_dos.py,
each hit while somebody else is served.

Everything is real: in-process :class:`~onionp2p.relay.relay.Relay` objects on TLS sockets,
``onionp2p relay`` processes where killing and restarting a process is the point, a real
:class:`~onionp2p.dir.authority.Authority`, and :class:`~onionp2p.client.node.ClientNode` clients
driven through their SOCKS port by python-socks or curl (and through the control port).
The faults are real sockets too: a *black hole* accepts TCP connections and never
answers; a *freezer* forwards TCP to a relay until it is frozen, then forwards nothing
in either direction and sends neither FIN nor RST (a half-open path); a *delayer*
forwards TCP to a relay holding every chunk for a set time each way (a slow path).

What the tests check: the fault ends in an error within a bounded time (generous
bounds: "does not hang", not "is fast"), clients get around it with new circuits, the
node goes on serving others, and after closing, this process's file descriptors,
asyncio tasks and protocol objects are back to the baseline (``Net.warm_up`` and
``settle`` from conftest.py, as in test_leaks.py, exact counts) — in every test but the
authority one, whose relays keep retrying the absent authority in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import (
    Net,
    blob,
    channel_from,
    free_port,
    http_get,
    open_fds,
    relay_busy,
    relay_config,
    settle,
    sha256,
    start_relay_process,
    wait_for,
)
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from onionp2p.client.client import OnionClient
from onionp2p.client.node import ClientNode
from onionp2p.config import AuthorityConfig, ClientConfig
from onionp2p.dir.authority import Authority, authority_line, load_or_create_authority_key
from onionp2p.dir.client import DirectoryUnavailable, RelayDirectory
from onionp2p.errors import CircuitError
from onionp2p.net.channel import CLOSE_TIMEOUT
from onionp2p.proto.directory import RelayInfo, RouterStatus, parse_authorities
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.stream import SOURCE_HIGH_WATER
from onionp2p.relay.dos import CELL_MEMORY
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

GUARD = frozenset({"Fast", "Guard", "Running", "Stable", "Valid"})
MIDDLE = frozenset({"Fast", "Running", "Stable", "Valid"})
EXIT = frozenset({"Exit", "Fast", "Running", "Stable", "Valid"})


# -- helpers -----------------------------------------------------------------------------------


class FaultNet(Net):
    """conftest's ``Net`` (test_leaks.py's) with relays of different roles: exits accept
    everything (loopback included), the others are not exits. ``warm_up`` builds one circuit
    through all relays in order, so the last one added must be an exit."""

    async def add(self, name: str, *, exit: bool = False, **kw) -> Relay:
        policy = ExitPolicy.parse("accept *:*", reject_private=False) if exit else ExitPolicy.reject_all()
        relay = Relay(RelayKeys.load_or_create(self.tmp / name), relay_config(self.tmp / name, exit_reject_private=False, nickname=name, exit_policy=policy, extend_allow_private=True, **kw))
        await relay.start()
        self.relays.append(relay)
        return relay

    async def stop(self) -> None:
        for relay in self.relays:
            await relay.stop()


@pytest.fixture
async def fnet(tmp_path, http_server):
    net = FaultNet(tmp_path, http_server.port)
    yield net
    await net.stop()


def status(info: RelayInfo, flags: frozenset[str], bandwidth: int = 1000) -> RouterStatus:
    return RouterStatus(info, flags, bandwidth=bandwidth)


def client_config(data_dir: Path, **kw) -> ClientConfig:
    kw.setdefault("preemptive_circuits", 1)
    return ClientConfig(client_reject_internal_addresses=False, data_dir=data_dir, socks_address=("127.0.0.1", 0), enforce_distinct_subnets=False,
                        **kw)


def seed_guards(data_dir: Path, *infos: RelayInfo) -> None:
    """A guard sample in this order (the state file of specs/pathsel.md §2)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = time.time()
    (data_dir / "guards.json").write_text(json.dumps({"version": 1, "guards": [
        {"fingerprint": i.fingerprint, "nickname": i.nickname, "added_at": now, "unlisted_since": None}
        for i in infos]}))


async def socks_open(socks_port: int, port: int, host: str = "127.0.0.1", *, timeout: float = 60):
    """A stream through the SOCKS5 port (python-socks; hostnames resolved at the exit)."""
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{socks_port}", rdns=True)
    sock = await proxy.connect(dest_host=host, dest_port=port, timeout=timeout)
    return await asyncio.open_connection(sock=sock)


async def socks_get(socks_port: int, port: int, path: str, host: str = "127.0.0.1", *,
                    timeout: float = 60) -> bytes:
    async with asyncio.timeout(timeout):
        reader, writer = await socks_open(socks_port, port, host, timeout=timeout)
        try:
            return await http_get(reader, writer, path)
        finally:
            writer.close()


def circuit_paths(node: ClientNode) -> list[tuple[str, ...]]:
    """Record the path of the circuit of every SOCKS stream that succeeds from now on."""
    paths: list[tuple[str, ...]] = []

    def on_event(event) -> None:
        if event[0] == "stream" and event[1].status == "SUCCEEDED":
            circ = node.client.circuits.get(event[1].circuit_id)
            paths.append(tuple(h.nickname for h in circ.path) if circ is not None else ())

    node.events.add(on_event)
    return paths


class BlackHole:
    """Accepts TCP connections and never answers: what it receives is discarded (it
    reads only to notice when the other side closes)."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.accepted = 0
        self.open = 0

    async def start(self) -> BlackHole:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()

    def relay_info(self, keys_dir: Path, nickname: str) -> RelayInfo:
        """A plausible directory entry for this address: real keys that nobody proves."""
        keys = RelayKeys.load_or_create(keys_dir)
        return RelayInfo(nickname, "127.0.0.1", self.port, keys.rsa_id_digest, keys.identity_public,
                         keys.onion_key_public)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class Freezer:
    """A TCP forwarder in front of a relay. ``freeze()``: from then on nothing is
    forwarded either way and nothing is read; no FIN, no RST — a path that went silent.
    ``close()`` resets every connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = False
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Freezer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [cwriter, uwriter]
        await asyncio.gather(self._pump(creader, uwriter), self._pump(ureader, cwriter),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self.frozen and (data := await reader.read(65536)):
            if self.frozen:
                return  # swallowed
            writer.write(data)
            await writer.drain()
        if not self.frozen:
            writer.close()

    def freeze(self) -> None:
        self.frozen = True
        for w in self.writers:
            w.transport.pause_reading()

    def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        if self.server is not None:
            self.server.close()


class Delayer:
    """A TCP forwarder in front of a relay that holds every chunk ``delay`` seconds in each
    direction, in order (a long, slow path). What arrives once ``delay`` is 0 goes through
    at once (after what is still held)."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> Delayer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [cwriter, uwriter]
        await asyncio.gather(self._pump(creader, uwriter), self._pump(ureader, cwriter),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while (item := await held.get())[1]:
                await asyncio.sleep(max(item[0] - loop.time(), 0))
                writer.write(item[1])
                await writer.drain()
            writer.close()

        task = loop.create_task(release())
        try:
            while data := await reader.read(65536):
                held.put_nowait((loop.time() + self.delay, data))
        finally:
            held.put_nowait((0.0, b""))
            await task

    async def stop(self) -> None:
        for w in self.writers:
            w.transport.abort()
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class Controller:
    """A raw control-port connection (tor's control protocol)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[str] = []

    @classmethod
    async def open(cls, port: int, cookie: bytes | None = None) -> Controller:
        c = cls(*await asyncio.open_connection("127.0.0.1", port))
        if cookie is not None:
            assert await c.command(f"AUTHENTICATE {cookie.hex()}") == ["250 OK"]
        return c

    async def line(self, timeout: float = 30) -> str:
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        if not raw:
            raise EOFError("control connection closed")
        return raw.decode().rstrip("\r\n")

    async def command(self, cmd: str) -> list[str]:
        self.writer.write(cmd.encode() + b"\r\n")
        lines: list[str] = []
        while True:
            line = await self.line()
            if line.startswith("650"):
                self.events.append(line)
                continue
            lines.append(line)
            if line[3:4] == " ":
                return lines

    async def event(self, prefix: str, timeout: float = 30) -> str:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.startswith(prefix):
                    return self.events.pop(i)
            self.events.append(await self.line(max(end - loop.time(), 0.01)))

    def close(self) -> None:
        self.writer.close()


def socket_of_transport(transport) -> tuple[int, str]:
    """The fd of a transport's socket and what /proc says it is (``socket:[inode]``)."""
    fd = transport.get_extra_info("socket").fileno()
    return fd, os.readlink(f"/proc/self/fd/{fd}")


# -- 1. a relay process killed mid-circuit, then restarted ----------------------------------------


async def relay_process_info(proc, d: Path, timeout: float = 30) -> RelayInfo:
    await wait_for(lambda: (d / "relay-info.json").exists() or proc.poll() is not None, timeout,
                   "the relay process to start", interval=0.05)
    assert proc.poll() is None, (d / "log.txt").read_text()
    return RelayInfo.load(d / "relay-info.json")


async def test_relay_killed_mid_transfer_is_built_around_and_used_again_after_restart(fnet, http_server):
    g = await fnet.add("g")
    m = await fnet.add("m")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    d = fnet.tmp / "victim"
    d.mkdir()
    config = 'nickname = "victim"\ndata_dir = "."\nextend_allow_private = true\nor_address = "127.0.0.1:{}"\n'
    (d / "relay.toml").write_text(config.format(0))
    proc = start_relay_process(d)
    try:
        victim = await relay_process_info(proc, d)
        (d / "relay.toml").write_text(config.format(victim.or_port))  # the restart takes the same port
        await _kill_and_restart(fnet, http_server, d, proc, victim, g, m, x)
    finally:
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait)
    await settle(fnet.relays, base)


async def _kill_and_restart(fnet, http_server, d, proc, victim, g, m, x) -> None:
    # the victim is the middle of nearly every path: it outweighs m a million to one
    routers = [status(g.info(), GUARD), status(m.info(), MIDDLE, 1), status(victim, MIDDLE, 10**6),
               status(x.info(), EXIT)]
    node = ClientNode(client_config(fnet.tmp / "client", control_port=0, circuit_build_timeout=10,
                                    stream_timeout=5), routers=lambda: routers)
    restarted = None
    stopped = False
    try:
        await node.start(ready_timeout=30)
        paths = circuit_paths(node)
        reader, writer = await socks_open(node.socks_port, http_server.port)
        writer.write(b"GET /hold HTTP/1.0\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert paths == [("g", "victim", "x")]
        got = 0

        async def download() -> None:
            nonlocal got
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    got += len(chunk)

        task = asyncio.create_task(download())
        await wait_for(lambda: got >= 1_000_000 or task.done(), 30, "the download to run", interval=0.05)
        proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(20):  # the in-flight stream ends, it does not hang
            await task
        assert got < 20_000_000, "the download was not cut"
        writer.close()
        await asyncio.to_thread(proc.wait)

        # new requests succeed on new circuits, which avoid the dead relay
        for n in (100_000, 200_000):
            assert await socks_get(node.socks_port, http_server.port, f"/{n}") == blob(n)
        assert paths[1:] == [("g", "m", "x")] * 2

        # the relay comes back with its keys on its port ...
        (d / "relay-info.json").unlink()
        restarted = start_relay_process(d)
        again = await relay_process_info(restarted, d)
        assert again == victim
        # ... and a circuit through it works again (EXTENDCIRCUIT on the control port)
        cookie = (fnet.tmp / "client" / "control_auth_cookie").read_bytes()
        ctl = await Controller.open(node.control_port, cookie)
        try:
            assert await ctl.command("SETEVENTS CIRC") == ["250 OK"]
            fps = ",".join(f"${i.fingerprint}" for i in (g.info(), victim, x.info()))
            reply = await ctl.command(f"EXTENDCIRCUIT 0 {fps}")
            assert reply[0].startswith("250 EXTENDED "), reply
            cid = int(reply[0].split()[2])
            while (event := await ctl.event(f"650 CIRC {cid} ")).split()[3] in ("LAUNCHED", "EXTENDED"):
                pass
            assert event.split()[3] == "BUILT", event
        finally:
            ctl.close()
        circ = node.client.circuits[cid]
        assert [h.nickname for h in circ.hops] == ["g", "victim", "x"]
        r, w = await circ.open_stream("127.0.0.1", http_server.port)
        assert sha256(await http_get(r, w, "/300000")) == sha256(blob(300_000))
        w.close()
        await node.stop()
        stopped = True
        restarted.send_signal(signal.SIGTERM)  # a clean exit after all this
        assert await asyncio.to_thread(restarted.wait, 15) == 0
    finally:
        if not stopped:
            await node.stop()
        if restarted is not None and restarted.poll() is None:
            restarted.kill()
            await asyncio.to_thread(restarted.wait)


# -- 2. the authority goes away ----------------------------------------------------------------


async def curl_get(socks_port: int, url: str, timeout: float = 60) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(int(timeout)), "--socks5-hostname", f"127.0.0.1:{socks_port}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out, err


async def test_authority_down_clients_bootstrap_from_cache_and_relays(tmp_path, http_server):
    key = load_or_create_authority_key(tmp_path / "auth")
    line = authority_line("auth", "127.0.0.1", free_port(), key)
    auth = Authority(key, AuthorityConfig(nickname="auth", authorities=(line,), data_dir=tmp_path / "auth",
                                          dir_address=("127.0.0.1", parse_authorities([line])[0].dir_port),
                                          voting_interval=4, stable_uptime=0, assume_guard=True, assume_exit=True))
    relays: list[Relay] = []
    nodes: list[ClientNode] = []

    def node(data_dir: Path) -> ClientNode:
        nodes.append(ClientNode(client_config(data_dir, authorities=(line,))))
        return nodes[-1]

    try:
        await auth.start()
        for i in range(3):
            policy = (ExitPolicy.parse("accept *:*", reject_private=False) if i == 2
                      else ExitPolicy.reject_all())
            relay = Relay(RelayKeys.load_or_create(tmp_path / f"r{i}"), relay_config(tmp_path / f"r{i}", exit_reject_private=False, nickname=f"r{i}", exit_policy=policy, extend_allow_private=True), directory=RelayDirectory(tmp_path / f"r{i}", [line]))
            await relay.start()
            relays.append(relay)
        await wait_for(lambda: auth.current is not None and len(auth.current.routers) == 3, 40,
                       "a consensus listing the three relays", interval=0.05)
        # a client bootstraps from the authority and caches the consensus
        first = node(tmp_path / "client")
        await first.start(ready_timeout=30)
        assert await socks_get(first.socks_port, http_server.port, "/5000", "localhost") == blob(5000)
        held = first.directory.consensus
        assert (tmp_path / "client" / "cached-consensus").exists()
        await first.stop()
        # the relays' directory caches hold it too; then the authority goes away
        await wait_for(lambda: all(r.directory.consensus is not None
                                   and r.directory.consensus.valid_after >= held.valid_after for r in relays),
                       20, "the relays to cache the consensus", interval=0.05)
        await auth.stop()

        # a fresh client with the same data directory: cached consensus, then the relays'
        # caches over BEGIN_DIR (the authority refuses connections now)
        second = node(tmp_path / "client")
        async with asyncio.timeout(60):
            await second.start(ready_timeout=30)
        served = sum(r.directory.server.requests for r in relays)
        doc = await second.directory.refresh()
        assert doc.valid_after >= held.valid_after
        # the relays' caches served it (one request, or more on a loaded machine: a cache
        # slow to answer is left for the next; a background fetch of the client may overlap)
        assert sum(r.directory.server.requests for r in relays) >= served + 1
        if shutil.which("curl"):
            rc, body, err = await curl_get(second.socks_port, f"http://localhost:{http_server.port}/100000")
            assert rc == 0, err
        else:  # tools/test installs curl; elsewhere python-socks does the same job
            body = await socks_get(second.socks_port, http_server.port, "/100000", "localhost")
        assert body == blob(100_000)
        await second.stop()

        # no cache and no authority: a clear error, soon
        third = node(tmp_path / "empty")
        with pytest.raises(DirectoryUnavailable) as exc:
            async with asyncio.timeout(30):
                await third.start(ready_timeout=10)
        assert "authority auth" in str(exc.value) and "cannot connect" in str(exc.value), str(exc.value)
        assert third.socks is None  # nothing half-started
    finally:
        for n in nodes:
            await n.stop()
        for relay in relays:
            await relay.stop()
        await auth.stop()


# -- 3. half-open TCP: black holes and a path that goes silent -------------------------------------


async def test_black_hole_guard_and_middle_are_built_around(fnet, http_server):
    g = await fnet.add("g", handshake_timeout=1.0)  # its TLS handshake toward the black hole: 1 s
    m = await fnet.add("m")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    hole_guard, hole_mid = await BlackHole().start(), await BlackHole().start()
    try:
        await _black_holes(fnet, http_server, g, m, x, hole_guard, hole_mid)
        await wait_for(lambda: hole_guard.open == hole_mid.open == 0, 10,
                       "the black holes to be let go", interval=0.05)
    finally:
        await hole_guard.stop()
        await hole_mid.stop()
    await settle(fnet.relays, base)


async def _black_holes(fnet, http_server, g, m, x, hole_guard, hole_mid) -> None:
    bg = hole_guard.relay_info(fnet.tmp / "bg", "holeguard")
    bm = hole_mid.relay_info(fnet.tmp / "bm", "holemid")
    # the black hole is the first guard of the sample, the other one the heaviest middle
    routers = [status(bg, GUARD, 1), status(g.info(), GUARD, 1), status(bm, MIDDLE, 10**6),
               status(m.info(), MIDDLE, 1), status(x.info(), EXIT)]
    seed_guards(fnet.tmp / "client", bg, g.info())
    node = ClientNode(client_config(fnet.tmp / "client", circuit_build_timeout=2, max_build_attempts=5),
                      routers=lambda: routers)
    try:
        async with asyncio.timeout(40):
            await node.start(ready_timeout=30)
        paths = circuit_paths(node)
        assert await socks_get(node.socks_port, http_server.port, "/50000") == blob(50_000)
        assert paths == [("g", "m", "x")]
        # the TLS handshake to the black-hole guard timed out: the guard is marked down
        assert hole_guard.accepted >= 1 and node.guards.is_down(bg.fingerprint)
        # g tried to extend to the black-hole middle; its handshake timeout hung up on it
        assert hole_mid.accepted >= 1
        await wait_for(lambda: hole_mid.open == 0, 10,
                       "the relay to drop its stalled connection", interval=0.05)
        assert not g.chanmgr.connecting and bm.rsa_id not in g.by_identity

        # the library client bounds TCP + TLS + link handshake by its handshake timeout
        lib = OnionClient(handshake_timeout=1)
        try:
            before = hole_guard.accepted
            with pytest.raises(CircuitError) as exc:
                async with asyncio.timeout(20):
                    await lib.build_circuit([bg, g.info(), x.info()], timeout=60)
            assert exc.value.reason == "CONNECTFAILED" and hole_guard.accepted == before + 1
        finally:
            await lib.close()
    finally:
        await node.stop()


async def _three_relays_one_delayed(fnet, delayed: str, run) -> None:
    """Relays g, m and x (an exit) with a :class:`Delayer` (no delay yet) in front of the one
    named ``delayed``; ``await run(g, m, x, slow)``; then back to the baseline."""
    g = await fnet.add("g")
    m = await fnet.add("m")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    slow = await Delayer({"g": g, "m": m, "x": x}[delayed].port, 0.0).start()
    try:
        await run(g, m, x, slow)
    finally:
        await slow.stop()
    await settle(fnet.relays, base)


async def test_stream_waits_through_more_timed_out_builds_than_max_build_attempts(fnet, http_server):
    """Under load every build may pass the build timeout for a while (a timeout learned on
    an idle network). As in tor, a stream goes on waiting for a circuit until its own
    deadline: builds that only timed out do not count against ``max_build_attempts``."""
    await _three_relays_one_delayed(
        fnet, "m", lambda g, m, x, slow: _slow_builds(fnet, http_server, g, m, x, slow))


async def _slow_builds(fnet, http_server, g, m, x, slow) -> None:
    via = dataclasses.replace(m.info(), or_port=slow.port)  # m as g reaches it: through the delayer
    routers = [status(g.info(), GUARD), status(via, MIDDLE), status(x.info(), EXIT)]
    seed_guards(fnet.tmp / "client", g.info())
    node = ClientNode(client_config(fnet.tmp / "client", circuit_build_timeout=1, max_build_attempts=2,
                                    learn_circuit_build_timeout=False, preemptive_circuits=1),
                      routers=lambda: routers)
    timed_out: list[int] = []
    get: asyncio.Task | None = None
    try:
        await node.start(ready_timeout=30)
        built = {c.id for c in node.client.circuits.values()}
        slow.delay = 0.8  # from now on EXTENDED2 from m comes 1.6 s after EXTEND2: past the timeout
        node.circmgr.new_identity()  # the circuit built at start takes no new streams
        node.client.events.add(lambda ev: ev.kind in ("failed", "closed") and ev.circuit_id not in built
                               and ev.reason == "TIMEOUT" and timed_out.append(ev.circuit_id))
        get = asyncio.create_task(socks_get_as(node.socks_port, http_server.port, "/20000", "a", timeout=60))
        # more builds time out than max_build_attempts allows; the stream is still waiting
        await wait_for(lambda: len(timed_out) > 2 * node.circmgr.max_build_attempts, 40,
                       "builds to time out", interval=0.05)
        assert not get.done()
        slow.delay = 0.0
        assert await get == blob(20_000)
        assert len(set(timed_out)) > 2 * node.circmgr.max_build_attempts
    finally:
        if get is not None and not get.done():
            get.cancel()
        await node.stop()


async def test_stream_waits_through_more_connect_timeouts_than_max_stream_attempts(fnet, http_server):
    """A slow path to the exit: CONNECTED comes after the client's ``stream_timeout``. As in
    tor (which retries such a stream on new circuits until SocksTimeout), our own connect
    timeouts do not count against ``max_stream_attempts``: the stream waits until its
    deadline, and opens once the path is fast again."""
    await _three_relays_one_delayed(
        fnet, "x", lambda g, m, x, slow: _slow_connects(fnet, http_server, g, m, x, slow))


async def _slow_connects(fnet, http_server, g, m, x, slow) -> None:
    via = dataclasses.replace(x.info(), or_port=slow.port)  # x as m reaches it: through the delayer
    routers = [status(g.info(), GUARD), status(m.info(), MIDDLE), status(via, EXIT)]
    seed_guards(fnet.tmp / "client", g.info())
    node = ClientNode(client_config(fnet.tmp / "client", stream_timeout=1, max_stream_attempts=2,
                                    circuit_build_timeout=20, learn_circuit_build_timeout=False,
                                    preemptive_circuits=1), routers=lambda: routers)
    get: asyncio.Task | None = None
    try:
        await node.start(ready_timeout=30)
        slow.delay = 0.8  # from now on CONNECTED comes 1.6 s after BEGIN: past stream_timeout
        before = http_server.connections
        get = asyncio.create_task(socks_get(node.socks_port, http_server.port, "/20000", timeout=90))
        # every BEGIN reaches the exit, which connects to the server; more of them than
        # max_stream_attempts, and the stream is still waiting
        limit = 2 * node.circmgr.max_stream_attempts
        await wait_for(lambda: http_server.connections - before > limit or get.done(), 60,
                       "BEGINs to time out", interval=0.05)
        assert not get.done(), get.exception() if get.exception() else "the stream ended early"
        slow.delay = 0.0
        assert await get == blob(20_000)
    finally:
        if get is not None and not get.done():
            get.cancel()
        await node.stop()


async def test_stopping_during_a_build_leaves_no_failure_unretrieved(fnet, http_server):
    """``stop()`` abandons builds under way and closes their circuits; the circuit's own
    build task then fails ("closed by us") and that failure must be taken, or asyncio logs
    "Task exception was never retrieved" and the log record keeps the circuit alive."""
    await _three_relays_one_delayed(
        fnet, "m", lambda g, m, x, slow: _stop_during_a_build(fnet, g, m, x, slow))


async def _stop_during_a_build(fnet, g, m, x, slow) -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[str] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda lp, ctx: unretrieved.append(ctx["message"]))
    try:
        via = dataclasses.replace(m.info(), or_port=slow.port)
        routers = [status(g.info(), GUARD), status(via, MIDDLE), status(x.info(), EXIT)]
        seed_guards(fnet.tmp / "client", g.info())
        node = ClientNode(client_config(fnet.tmp / "client", circuit_build_timeout=30, preemptive_circuits=1,
                                        learn_circuit_build_timeout=False), routers=lambda: routers)
        try:
            await node.start(ready_timeout=30)
            slow.delay = 1.0  # a new build now waits seconds for EXTENDED2 from m
            get = asyncio.create_task(node.circmgr.get_circuit(None, "another isolation key"))
            circuits = node.client.circuits
            await wait_for(lambda: any(c.state == "launched" and c.hops for c in circuits.values()), 20,
                           "a build under way")
        finally:
            await node.stop()
        with contextlib.suppress(CircuitError, asyncio.CancelledError):
            await get
        del get  # its failure's frames hold the circuit
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.05)
        assert unretrieved == []
    finally:
        loop.set_exception_handler(handler)


async def test_silent_guard_link_stream_timeout_then_other_guard(fnet, http_server):
    g1 = await fnet.add("g1")
    g2 = await fnet.add("g2")
    m = await fnet.add("m")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    freezer = await Freezer(g1.port).start()
    try:
        await _silent_guard(fnet, http_server, g1, g2, m, x, freezer)
    finally:
        freezer.close()
    await settle(fnet.relays, base)


async def _silent_guard(fnet, http_server, g1, g2, m, x, freezer) -> None:
    via = dataclasses.replace(g1.info(), or_port=freezer.port)  # g1 as reached through the freezer
    routers = [status(via, GUARD), status(g2.info(), GUARD), status(m.info(), MIDDLE), status(x.info(), EXIT)]
    seed_guards(fnet.tmp / "client", via, g2.info())
    node = ClientNode(client_config(fnet.tmp / "client", circuit_build_timeout=2, stream_timeout=2,
                                    max_stream_attempts=1), routers=lambda: routers)
    try:
        await node.start(ready_timeout=30)
        paths = circuit_paths(node)
        assert await socks_get(node.socks_port, http_server.port, "/20000") == blob(20_000)
        assert paths[0][0] == "g1"
        old_chan = node.client.channels[g1.keys.rsa_id_digest]
        freezer.freeze()
        # a new stream on the open circuit: no CONNECTED comes. After stream_timeout it
        # tries new circuits until its deadline (as tor, however many attempts: our own
        # connect timeouts are not counted), the first-hop build timeouts on the silent
        # link mark g1 down, and a circuit through g2 carries it
        assert await socks_get(node.socks_port, http_server.port, "/20000", timeout=60) == blob(20_000)
        assert paths[-1][0] == "g2"
        # and every later request is answered
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        while True:
            try:
                body = await socks_get(node.socks_port, http_server.port, "/30000", timeout=20)
                break
            except ProxyError:
                assert loop.time() < end, "never built around the silent guard"
                await asyncio.sleep(0.2)
        assert body == blob(30_000) and paths[-1][0] == "g2"
        assert node.guards.is_down(g1.keys.fingerprint)
        assert node.client.channels.get(g1.keys.rsa_id_digest) is not old_chan  # no new circuits on it
    finally:
        await node.stop()


# -- 4. a peer that stops reading -------------------------------------------------------------------


async def test_peer_that_stops_reading_back_pressure_and_close_does_not_wait(fnet, http_server):
    g = await fnet.add("g")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    await _stops_reading(fnet, http_server, g, x)
    await settle(fnet.relays, base)


async def _stops_reading(fnet, http_server, g, x) -> None:
    """The client stops reading its channel to its guard ``g``; ``x`` is the exit."""
    destroyed = g.stats["destroyed"] + x.stats["destroyed"]
    client = OnionClient()
    try:
        chan = await channel_from(client, g.info(), rcvbuf=4096)
        circ = await client.build_circuit([g.info(), x.info()])
        writers = [(await circ.open_stream("127.0.0.1", http_server.port))[1] for _ in range(2)]
        chan.pause_reading()  # from now on this peer reads nothing
        for w in writers:
            w.write(b"GET /hold HTTP/1.0\r\n\r\n")
        (relay_chan,) = [c for c in g.channels if c.peer is None]  # the guard's link to the client
        (exit_circ,) = x.circuits
        conns = lambda: list(exit_circ.conns.values())  # noqa: E731  (the destination sockets)
        # back-pressure reaches the destinations: the exit stops reading them
        await wait_for(lambda: len(conns()) == 2 and all(c.transport is not None and not c.transport.is_reading()
                                                         for c in conns()),
                       20, "the exit to stop reading its destinations", interval=0.05)
        await asyncio.sleep(1)  # and it stays that way: memory is bounded
        assert all(not c.transport.is_reading() for c in conns())
        assert all(s.buffered <= SOURCE_HIGH_WATER + 256 * 1024 for s in exit_circ.streams.values())
        held = x.queue_memory()[0] + g.queue_memory()[0]
        assert held <= 1000 * CELL_MEMORY + 2 * (SOURCE_HIGH_WATER + 256 * 1024)
        assert relay_chan.queued_cells() <= 1000
        assert g.stats["destroyed"] + x.stats["destroyed"] == destroyed

        # the relay closes the channel: the peer never reads the close, yet the socket goes
        fd, what = socket_of_transport(relay_chan._transport)
        relay_chan.close("test: closing on a peer that does not read")
        assert relay_busy(g) == ["channels=1", "identities=1"]  # only its link to the exit is left
        await wait_for(lambda: open_fds().get(fd) != what, CLOSE_TIMEOUT + 10,
                       "the relay to give up the socket of a peer that does not read", interval=0.05)
        # the relay serves another client meanwhile; the silent peer is still connected
        other = OnionClient()
        try:
            c2 = await other.build_circuit([g.info(), x.info()])
            r, w = await c2.open_stream("127.0.0.1", http_server.port)
            assert await http_get(r, w, "/100000") == blob(100_000)
        finally:
            await other.close()
        assert not chan.closed
    finally:
        await client.close()


class Sink:
    """A destination that reads nothing until ``start_reading()``, then at most ``chunk``
    bytes every ``delay`` seconds (so at most ``rate`` bytes/s)."""

    def __init__(self, *, chunk: int = 65536, delay: float = 0.05) -> None:
        self.chunk, self.delay = chunk, delay
        self.rate = chunk / delay
        self.received = 0
        self.eof = False
        self.conns: list[socket.socket] = []
        self._reading = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> Sink:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self._tasks.append(asyncio.create_task(self._accept()))
        return self

    def start_reading(self) -> None:
        self._reading.set()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            self.conns.append(conn)
            self._tasks.append(asyncio.create_task(self._read(conn)))

    async def _read(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await self._reading.wait()
        with contextlib.suppress(ConnectionError):
            while data := await loop.sock_recv(conn, self.chunk):
                self.received += len(data)
                await asyncio.sleep(self.delay)
            self.eof = True

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in [*self.conns, self.sock]:
            c.close()


async def test_exit_flushes_closed_streams_while_destinations_read_and_gives_up_on_silent_ones(
        fnet, http_server):
    g = await fnet.add("g")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    x.exit.flush_timeout = 0.5  # the real ExitHandler's setting (tor: 15 s)
    slow, silent = await Sink().start(), await Sink().start()
    try:
        await _closing_exit_streams(g, x, slow, silent)
    finally:
        await slow.stop()
        await silent.stop()
    await settle(fnet.relays, base)


async def _closing_exit_streams(g, x, slow, silent) -> None:
    client = OnionClient()
    try:
        circ = await client.build_circuit([g.info(), x.info()])
        to_slow, to_silent = [(await circ.open_stream("127.0.0.1", sink.port))[1] for sink in (slow, silent)]
        (exit_circ,) = x.circuits
        sids = [w.transport.get_extra_info("stream_id") for w in (to_slow, to_silent)]
        edges = [exit_circ.streams[sid] for sid in sids]  # the exit's stream state
        conns = [exit_circ.conns[sid] for sid in sids]  # and its destination sockets
        sockets = [socket_of_transport(c.transport) for c in conns]
        for w in (to_slow, to_silent):
            w.write(blob(8_000_000))
        # neither destination reads yet: the exit buffers until it stops acknowledging
        await wait_for(lambda: all(c.write_paused for c in conns), 20, "the exit to fill up", interval=0.05)
        for w in (to_slow, to_silent):
            w.transport.abort()  # END: the exit closes both sockets with data still to flush
        slow.start_reading()
        await wait_for(lambda: not exit_circ.streams, 10, "the exit to end both streams", interval=0.05)
        unread = edges[0].bytes_received - slow.received  # at most what was left at the close
        assert all(c.transport.is_closing() for c in conns)
        # more than the slow destination can take in two flush timeouts: flushing it needs
        # several checks that see progress (a fixed deadline would cut it short)
        assert unread > 2 * slow.rate * x.exit.flush_timeout
        # the silent destination's socket is given up (it would be held forever otherwise) ...
        await wait_for(lambda: open_fds().get(sockets[1][0]) != sockets[1][1], 10,
                       "the exit to abort the socket of a destination that never reads", interval=0.05)
        # ... while the slow one, making progress, gets every byte and then EOF
        await wait_for(lambda: slow.eof, 60, "the slow destination to receive everything", interval=0.05)
        assert slow.received == edges[0].bytes_received
        assert open_fds().get(sockets[0][0]) != sockets[0][1]
        assert circ.state == "built"
    finally:
        await client.close()


# -- 5. limits outside test_dos.py, hit while others are served --------------------------------------


async def raw_socks(port: int, data: bytes):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 15) -> bytes:
    """What the server sends before it hangs up (fails if it does not hang up in time)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionError:
        return b""


async def test_socks_and_control_limits_hit_while_others_are_served(fnet, http_server):
    g = await fnet.add("g")
    m = await fnet.add("m")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    routers = [status(g.info(), GUARD), status(m.info(), MIDDLE), status(x.info(), EXIT)]
    node = ClientNode(client_config(fnet.tmp / "client", control_port=0), routers=lambda: routers)
    try:
        await node.start(ready_timeout=30)
        socks, control = node.socks, node.control
        socks.handshake_timeout = 3.0
        socks.max_connections = 3
        control.auth_timeout = 2.0
        control.max_connections = 2

        # SOCKS handshake timeout: two clients stall mid-handshake; another is served meanwhile
        stalled = [await raw_socks(node.socks_port, b"\x05"),  # half a greeting
                   await raw_socks(node.socks_port, b"\x05\x01\x00")]  # greeting, no request
        await wait_for(lambda: socks.stats.active == 2, 5, "two stalled SOCKS clients", interval=0.05)
        assert await socks_get(node.socks_port, http_server.port, "/40000") == blob(40_000)
        # SOCKS connection limit: a third stalled one fills it; the next one is turned away
        stalled.append(await raw_socks(node.socks_port, b""))
        await wait_for(lambda: socks.stats.active == 3, 5, "three SOCKS clients", interval=0.05)
        refused_r, refused_w = await raw_socks(node.socks_port, b"\x05\x01\x00")
        assert await closed_by_server(refused_r, 5) == b""
        refused_w.close()
        # the handshake timeout frees the slots
        for r, w in stalled:
            assert await closed_by_server(r) in (b"", b"\x05\x00")
            w.close()
        assert socks.stats.handshake_failed >= 3
        assert await socks_get(node.socks_port, http_server.port, "/40000") == blob(40_000)

        # control port: an unauthenticated controller is dropped after auth_timeout, while an
        # authenticated one keeps working; the connection limit turns a third one away
        cookie = (fnet.tmp / "client" / "control_auth_cookie").read_bytes()
        idle = await Controller.open(node.control_port)
        good = await Controller.open(node.control_port, cookie)
        await wait_for(lambda: len(control._conns) == 2, 5, "two controllers", interval=0.05)
        extra = await Controller.open(node.control_port)
        assert await extra.line() == "451 Too many control connections"
        extra.close()
        with pytest.raises(EOFError):
            await idle.line(15)  # closed by the server, unauthenticated
        idle.close()
        reply = await good.command("GETINFO version")
        assert reply[-1] == "250 OK" and reply[0].startswith("250-version=")
        again = await Controller.open(node.control_port, cookie)  # the freed slot is usable
        assert (await again.command("GETINFO version"))[-1] == "250 OK"
        again.close()
        good.close()
        assert await socks_get(node.socks_port, http_server.port, "/40000") == blob(40_000)
    finally:
        await node.stop()
    await settle(fnet.relays, base)


async def test_bandwidth_limit_hit_while_another_client_is_served(fnet, http_server):
    g = await fnet.add("g")
    x = await fnet.add("x", exit=True, bandwidth_rate=200_000, bandwidth_burst=200_000)
    base = await fnet.warm_up()
    await _bandwidth(http_server, g, x)
    await settle(fnet.relays, base)


async def _bandwidth(http_server, g, x) -> None:
    heavy, light = OnionClient(), OnionClient()
    try:
        circ = await heavy.build_circuit([g.info(), x.info()])
        r, w = await circ.open_stream("127.0.0.1", http_server.port)
        w.write(b"GET /echo HTTP/1.0\r\n\r\n")
        upload = blob(1_000_000)
        w.write(upload)  # seconds of the relay's read budget

        async def echo() -> bytes:
            await r.readuntil(b"\r\n\r\n")
            return await r.readexactly(len(upload))

        echoed = asyncio.create_task(echo())
        await wait_for(lambda: x.stats["throttled"] > 0, 15, "the rate limit to act", interval=0.05)
        # a second client is served while the limit holds the first one back
        async with asyncio.timeout(30):
            c2 = await light.build_circuit([g.info(), x.info()])
            r2, w2 = await c2.open_stream("127.0.0.1", http_server.port)
            assert await http_get(r2, w2, "/20000") == blob(20_000)
        async with asyncio.timeout(60):
            assert await echoed == upload
    finally:
        await heavy.close()
        await light.close()


async def test_or_connections_probe_and_drop_silent_peers(tmp_path):
    """Both ends of a link set TCP keepalive and TCP_USER_TIMEOUT (the relay's
    ``tcp_user_timeout``, the client's default), so that a peer cut off without a FIN is
    dropped by the kernel (tests/test_netns.py cuts one for real)."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("TCP_USER_TIMEOUT is Linux-only")
    relay = Relay(RelayKeys.load_or_create(tmp_path / "r"), relay_config(tmp_path / "r", exit_reject_private=False, nickname="r", tcp_user_timeout=7))
    await relay.start()
    client = OnionClient()
    try:
        circ = await client.build_circuit([relay.info()])
        (theirs,) = relay.channels

        def opts(chan) -> tuple[int, int, int]:
            sock = chan._transport.get_extra_info("socket")
            return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))

        assert opts(theirs) == (1, 7, 7000)
        assert opts(circ.chan) == (1, 60, 60_000)
    finally:
        await client.close()
        await relay.stop()


# -- 7. guard-spec: the primary guards killed, then the first one back ------------------------------


async def socks_get_as(socks_port: int, port: int, path: str, user: str, *, timeout: float = 30) -> bytes:
    """:func:`socks_get` with SOCKS credentials: a new isolation key is a new circuit."""
    async with asyncio.timeout(timeout):
        proxy = Proxy.from_url(f"socks5://{user}:x@127.0.0.1:{socks_port}", rdns=True)
        sock = await proxy.connect(dest_host="127.0.0.1", dest_port=port, timeout=timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            return await http_get(reader, writer, path)
        finally:
            writer.close()


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_primary_guards_killed_client_walks_the_guard_list_and_returns(fnet, http_server):
    """guard-spec with real relay processes: the client's three primary guards are killed;
    the client tries them in order, then takes the next guard of its sample (never one
    outside it, though two more attractive guards are in the consensus), and once the first
    primary guard is restarted (same port, same keys) it goes back to it. Retries are 2 s
    instead of 10 min through ``guard-retry-divisor``; the sample is capped at 5 through the
    consensus's guard-max-sample-size."""
    g4, g5 = await fnet.add("g4"), await fnet.add("g5")
    out6, out7 = await fnet.add("out6"), await fnet.add("out7")
    m = await fnet.add("m")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    procs: dict[str, tuple] = {}
    config = 'nickname = "{}"\ndata_dir = "."\nextend_allow_private = true\nor_address = "127.0.0.1:{}"\n'
    try:
        for name in ("p1", "p2", "p3"):
            d = fnet.tmp / name
            d.mkdir()
            (d / "relay.toml").write_text(config.format(name, 0))
            procs[name] = (d, start_relay_process(d))
        infos = {}
        for name, (d, proc) in procs.items():
            infos[name] = await relay_process_info(proc, d, 90)  # 3 Python processes start on a busy CI box
            (d / "relay.toml").write_text(config.format(name, infos[name].or_port))  # restarts: same port
        await _walk_guards(fnet, http_server, procs, infos, g4, g5, out6, out7, m, x)
    finally:
        for _d, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            await asyncio.to_thread(proc.wait)
    await settle(fnet.relays, base)


async def _walk_guards(fnet, http_server, procs, infos, g4, g5, out6, out7, m, x) -> None:
    p1, p2, p3 = infos["p1"], infos["p2"], infos["p3"]
    # out6 and out7 weigh most of all guards: a client pushed beyond its sample would take them
    routers = [status(p1, GUARD), status(p2, GUARD), status(p3, GUARD), status(g4.info(), GUARD),
               status(g5.info(), GUARD), status(out6.info(), GUARD, 10**5), status(out7.info(), GUARD, 10**5),
               status(m.info(), MIDDLE, 10**6), status(x.info(), EXIT)]
    params = {"guard-max-sample-size": 5, "guard-min-filtered-sample-size": 4,
              "guard-max-sample-threshold-percent": 100}
    data = fnet.tmp / "client"
    seed_guards(data, p1, p2, p3, g4.info(), g5.info())  # a version 1 state file: migrated
    sample = {"p1", "p2", "p3", "g4", "g5"}
    node = ClientNode(client_config(data, control_port=0, max_build_attempts=6, circuit_build_timeout=10,
                                    stream_timeout=5, guard_params={"guard-retry-divisor": 300}),
                      routers=lambda: routers, params=lambda: params)
    chosen: list[str] = []  # every guard choice, in order
    select = node.guards.select

    def recording_select(*a, **kw):
        rs, gc = select(*a, **kw)
        chosen.append(rs.nickname)
        return rs, gc

    node.guards.select = recording_select
    connected: set[str] = set()  # every relay the client opened a channel to
    node.client.channel_events.add(
        lambda kind, chan: kind == "connected" and chan.peer is not None
        and connected.add(chan.peer.rsa_id.hex().upper()))
    ctl = None
    try:
        await node.start(ready_timeout=30)
        ctl = await Controller.open(node.control_port, (data / "control_auth_cookie").read_bytes())
        assert await ctl.command("SETEVENTS GUARD") == ["250 OK"]
        node.circmgr.configure(dataclasses.replace(node.cfg, preemptive_circuits=0))
        fp = {n: i.fingerprint for n, i in infos.items()} | {r.nickname: r.keys.fingerprint
                                                              for r in (g4, g5, out6, out7)}
        assert node.guards.primary(routers) == [fp["p1"], fp["p2"], fp["p3"]]
        assert node.guards.confirmed() == [fp["p1"]] and set(chosen) == {"p1"}
        assert await socks_get_as(node.socks_port, http_server.port, "/1000", "before") == blob(1000)

        # the three primary guards die
        for name in ("p1", "p2", "p3"):
            procs[name][1].kill()
        for name in ("p1", "p2", "p3"):
            await asyncio.to_thread(procs[name][1].wait)
        await wait_for(lambda: not any(c.path[0].nickname == "p1" for c in node.client.circuits.values()
                                       if c.state == "built"), 10, "the circuits through p1 to close")
        chosen.clear()
        paths = circuit_paths(node)
        assert await socks_get_as(node.socks_port, http_server.port, "/2000", "down") == blob(2000)
        # guard-spec's order: each primary guard, then the first sampled guard
        assert chosen == ["p1", "p2", "p3", "g4"] and [p[0] for p in paths] == ["g4"]
        # three of five sampled guards are down, but the sample is at its maximum: not one more
        assert {e.nickname for e in node.guards.sampled} == sample
        for name in ("p1", "p2", "p3"):
            assert await ctl.event(f"650 GUARD ENTRY ${fp[name]}~{name} DOWN", 10)
        assert await ctl.event(f"650 GUARD ENTRY ${fp['g4']}~g4 UP", 10)
        # g4 is confirmed now, and a primary guard (confirmed guards come first)
        assert node.guards.confirmed() == [fp["p1"], fp["g4"]]
        assert node.guards.primary(routers) == [fp["p1"], fp["g4"], fp["p2"]]
        ids = await ctl.command("GETINFO entry-guards")
        assert f"${fp['p1']}~p1 down" in ids and f"${fp['g4']}~g4 up" in ids

        # more circuits while p1 stays dead: p1 is retried on its schedule, never a guard
        # outside the sample
        phase = len(chosen)
        for i in range(4):
            assert await socks_get_as(node.socks_port, http_server.port, "/500", f"down{i}") == blob(500)
            await asyncio.sleep(0.7)
        assert set(chosen[phase:]) <= {"p1", "g4"} and paths[-1][0] == "g4"
        assert "p1" in chosen[phase:], chosen  # retried (every 2 s here), and failed again

        # p1 comes back at the same port with the same keys: the client returns to it
        d1 = procs["p1"][0]
        procs["p1"] = (d1, start_relay_process(d1))
        await wait_for(lambda: procs["p1"][1].poll() is not None or (d1 / "log.txt").exists()
                       and "listening" in (d1 / "log.txt").read_text().lower(), 60, "p1 to start again")
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while True:
            assert await port_open(p1.or_port) or loop.time() < end, "p1 did not come back"
            user = f"back{loop.time()}"
            assert await socks_get_as(node.socks_port, http_server.port, "/500", user) == blob(500)
            if paths[-1][0] == "p1":
                break
            assert loop.time() < end, f"never went back to p1: {chosen[-10:]}"
            await asyncio.sleep(0.5)
        assert await ctl.event(f"650 GUARD ENTRY ${fp['p1']}~p1 UP", 10)
        assert node.guards.primary(routers)[0] == fp["p1"]
        assert await socks_get_as(node.socks_port, http_server.port, "/500", "after") == blob(500)
        assert paths[-1][0] == "p1"
        # never a guard outside the sample: not chosen, never even connected to
        assert set(chosen) <= sample
        assert {e.nickname for e in node.guards.sampled} == sample
        assert not connected & {fp["out6"], fp["out7"]}
    finally:
        if ctl is not None:
            ctl.close()
        await node.stop()


async def test_circuit_through_a_nonprimary_guard_waits_while_the_primary_guards_are_retried(fnet,
                                                                                              http_server):
    """guard-spec §4.8-4.9 in the circuit manager, on real relays: the three primary guards
    (confirmed) refuse connections. A fresh client (no success yet, so "the network was
    down") builds through its next confirmed guard g4, but holds that circuit
    (GUARD_WAIT) and retries every primary guard first; only when all three have failed
    again is the g4 circuit used. A second circuit, with the internet known to work, is
    used at once."""
    g4 = await fnet.add("g4")
    m = await fnet.add("m")
    x = await fnet.add("x", exit=True)
    base = await fnet.warm_up()
    dead = []
    for name in ("d1", "d2", "d3"):
        keys = RelayKeys.load_or_create(fnet.tmp / name)
        dead.append(RelayInfo(name, "127.0.0.1", free_port(), keys.rsa_id_digest, keys.identity_public,
                              keys.onion_key_public))  # nothing listens there: refused
    routers = [status(d, GUARD) for d in dead] + [status(g4.info(), GUARD), status(m.info(), MIDDLE, 10**6),
                                                  status(x.info(), EXIT)]
    data = fnet.tmp / "client"
    data.mkdir(mode=0o700)
    now = time.time()
    (data / "guards.json").write_text(json.dumps({"version": 2, "guards": [
        {"fingerprint": i.fingerprint, "nickname": i.nickname, "sampled_on": now, "sampled_idx": n,
         "confirmed_on": now, "confirmed_idx": n, "listed": True}
        for n, i in enumerate([*dead, g4.info()])]}))
    await _guard_wait(http_server, data, routers, dead)
    await settle(fnet.relays, base)


async def _guard_wait(http_server, data, routers, dead) -> None:
    node = ClientNode(client_config(data, preemptive_circuits=0, max_build_attempts=10),
                      routers=lambda: routers)
    mgr = node.circmgr
    control = node.control_adapter()  # what circuit-status (and `onionp2p circuits`) shows
    chosen: list[tuple[str, bool]] = []  # (guard, was some circuit waiting for a better guard then)
    shown: list[str] = []  # control-port statuses of the circuits through g4 meanwhile
    select = node.guards.select

    def recording_select(*a, **kw):
        rs, gc = select(*a, **kw)
        chosen.append((rs.nickname, bool(mgr.guard_waiting())))
        shown.extend(c.status for c in control.circuits() if c.path and c.path[0][1] == "g4")
        return rs, gc

    node.guards.select = recording_select
    try:
        assert node.guards.primary(routers) == [d.fingerprint for d in dead]
        circ = await asyncio.wait_for(mgr.get_circuit(http_server.port, "first"), 60)
        names = [n for n, _ in chosen]
        assert names[:7] == ["d1", "d2", "d3", "g4", "d1", "d2", "d3"], chosen
        assert [w for _, w in chosen[4:7]] == [True] * 3  # the g4 circuit was held meanwhile
        assert shown[:3] == ["GUARD_WAIT"] * 3
        assert set(names[7:]) <= {"g4"} and circ.hops[0].nickname == "g4" and not mgr.guard_waiting()
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        try:
            assert await http_get(reader, writer, "/3000") == blob(3000)
        finally:
            writer.close()
        # the internet works now: a circuit through g4 is used at once, the primary guards
        # wait for their retry time
        chosen.clear()
        circ2 = await asyncio.wait_for(mgr.get_circuit(http_server.port, "second"), 30)
        assert chosen == [("g4", False)] and circ2.hops[0].nickname == "g4" and circ2 is not circ
    finally:
        await node.stop()
