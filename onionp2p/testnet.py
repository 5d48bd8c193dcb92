"""``onionp2p testnet``: a whole private network on loopback from one command.

Theory of operation
-------------------
The command writes configs into a data directory (a temporary one by default) and starts
real processes: ``--authorities`` directory authorities (default 1) and ``--relays``
relays (default 5; the first ``--exits`` of them, default 2, are exits whose policy
accepts everything, private and loopback destinations included, so local services are
reachable). Authorities vote every ``--voting-interval`` seconds and, being a tiny
network, give every reachable relay the Guard and Stable flags (like tor's
TestingTorNetwork). The client runs inside this process: it waits until a consensus
listing every relay is published, bootstraps from it, builds circuits, and only then
prints ``SOCKS5 proxy ready at 127.0.0.1:PORT`` (and the control port line, and with
``--metrics-port`` the client's Prometheus endpoint, with ``--http-tunnel-port`` its HTTP
CONNECT port, with ``--dns-port`` its DNS port). SIGINT or
SIGTERM stops the client and every child process within a few seconds.

``--link-delay MIN-MAX`` (milliseconds, one way) emulates a wide-area network: every
relay listens on one port and advertises another, where an ``onionp2p wan`` process
(:mod:`onionp2p.ops.wan`) forwards with that relay's delay (spread evenly over MIN-MAX),
so every link to a relay — from the client, from other relays, from the authorities —
carries it. ``--no-congestion-control`` makes the client use fixed SENDME windows.

``--base-port N`` gives every node a fixed port, like chutney's base ports: the
authorities' directory ports are N, N+1 ..., then the relays' OR ports (a firewall, or a
second machine, can then be set up once). The client's listeners bind before any process
starts. When a process exits early, the command names it, prints the end of its log
(``NAME/log.txt``) and keeps the data directory, even a temporary one, for the post-mortem.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from onionp2p.config import ClientConfig
from onionp2p.errors import OnionError
from onionp2p.log import get_logger

__all__ = ["Testnet", "TestnetError", "run_testnet", "free_port"]

log = get_logger("onionp2p.testnet")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestnetError(OnionError):
    """A testnet process failed; the message names it and quotes the end of its log."""


def _log_tail(path: Path, lines: int = 15, max_bytes: int = 16384) -> list[str]:
    """The last ``lines`` lines of a log file (read from its last ``max_bytes``)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return [f"(cannot read {path}: {exc.strerror or exc})"]
    return text.splitlines()[-lines:]


def _toml(d: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())


@dataclass
class Testnet:
    """The processes of a private network (the client is separate: see :func:`run_testnet`)."""

    base: Path
    n_relays: int = 5
    n_exits: int = 2
    n_authorities: int = 1
    voting_interval: int = 5
    log_level: str = "info"
    #: (min, max) one-way seconds added to every link to a relay (None: plain loopback)
    link_delay: tuple[float, float] | None = None
    #: fixed ports from here on (authorities' directory ports, then relays' OR ports); None: any free
    base_port: int | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    #: the name of each process (its directory under ``base``), by pid
    names: dict[int, str] = field(default_factory=dict)
    authority_lines: list[str] = field(default_factory=list)
    #: relay name -> the one-way delay of links to it (with ``link_delay``)
    delays: dict[str, float] = field(default_factory=dict)

    def _spawn(self, kind: str, name: str, cfg: dict) -> subprocess.Popen:
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        (d / f"{kind}.toml").write_text(_toml(cfg))
        log_file = open(d / "log.txt", "ab")
        try:
            p = subprocess.Popen([sys.executable, "-m", "onionp2p", kind, "--config", str(d / f"{kind}.toml")],
                                 stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log_file.close()
        self.procs.append(p)
        self.names[p.pid] = name
        return p

    def _port(self, index: int) -> int:
        """The fixed port number ``index`` (with ``base_port``), else 0 (any free port)."""
        return 0 if self.base_port is None else self.base_port + index

    def prepare(self) -> None:
        """Create the authorities' identities and lines (what the client's config needs);
        :meth:`spawn` then starts the processes. :meth:`start` does both."""
        from onionp2p.dir.authority import authority_line, load_or_create_authority_key

        if self.n_exits > self.n_relays or self.n_relays < 3:
            raise OnionError("a testnet needs at least 3 relays and no more exits than relays")
        if self.base_port is not None and not 1 <= self.base_port <= 65535 - self.n_authorities - self.n_relays:
            raise OnionError(f"base port {self.base_port}: the testnet's ports must fit below 65536")
        self._auths = []
        for i in range(self.n_authorities):
            d = self.base / f"auth{i}"
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            port = self._port(i) or free_port()
            key = load_or_create_authority_key(d)
            line = authority_line(f"auth{i}", "127.0.0.1", port, key)
            self._auths.append((d, port))
            self.authority_lines.append(line)

    def start(self) -> None:
        self.prepare()
        self.spawn()

    def spawn(self) -> None:
        """Start the authorities, relays (and WAN proxies) of a testnet set up by :meth:`prepare`."""
        for i, (d, port) in enumerate(self._auths):
            self._spawn("authority", f"auth{i}", {
                "nickname": f"auth{i}", "data_dir": str(d), "dir_address": f"127.0.0.1:{port}",
                "run_relay": False, "authorities": self.authority_lines,
                "voting_interval": self.voting_interval, "assume_guard": True, "assume_exit": True,
                "stable_uptime": 0, "guard_uptime": 0, "hsdir_uptime": 0, "log_level": self.log_level,
            })
        relays = []
        for i in range(self.n_relays):
            exit_ = i < self.n_exits
            name = f"exit{i}" if exit_ else f"relay{i}"
            listen, advertise = self._port(self.n_authorities + i), 0
            if self.link_delay is not None:  # relays listen on one port and advertise a proxy's
                lo, hi = self.link_delay
                self.delays[name] = lo + (hi - lo) * i / max(1, self.n_relays - 1)
                listen, advertise = listen or free_port(), free_port()
            relays.append((i, exit_, name, listen, advertise))
        if self.link_delay is not None:
            self._start_wan([(adv, listen, self.delays[name]) for _i, _e, name, listen, adv in relays])
        for i, exit_, name, listen, advertise in relays:
            extra = {"or_advertise_port": advertise} if advertise else {}
            self._spawn("relay", name, {
                **extra,
                "nickname": name, "data_dir": str(self.base / name), "or_address": f"127.0.0.1:{listen}",
                "exit_policy": "accept *:*" if exit_ else "reject *:*",
                "exit_reject_private": not exit_, "extend_allow_private": True,
                "authorities": self.authority_lines, "log_level": self.log_level,
                # every client of a loopback testnet shares one address: per-address DoS
                # limits would throttle the whole network (tor's test networks turn them off)
                "dos_max_concurrent_connections": 0, "dos_circuit_creation_rate": 0,
                "dos_circuit_creation_burst": 0,
            })

    def _start_wan(self, links: list[tuple[int, int, float]]) -> None:
        """``onionp2p wan`` with one proxy per relay: advertised port -> listener, its delay."""
        d = self.base / "wan"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = [a for adv, listen, delay in links for a in ("--map", f"{adv}:127.0.0.1:{listen}:{delay * 1000:g}")]
        out = open(d / "log.txt", "ab")
        try:
            p = subprocess.Popen([sys.executable, "-u", "-m", "onionp2p", "wan", *args], stdout=subprocess.PIPE,
                                 stderr=out, start_new_session=True)
        finally:
            out.close()
        self.procs.append(p)
        self.names[p.pid] = "wan"
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"wan ready":
            raise OnionError(f"the WAN emulator did not start; see {d / 'log.txt'}")
        p.stdout.close()

    def exited(self) -> list[str]:
        """For each process that has exited: its name, status and the end of its log."""
        out = []
        for p in self.procs:
            if p.poll() is not None:
                name = self.names.get(p.pid, "?")
                log_path = self.base / name / "log.txt"
                tail = "".join(f"\n  | {line}" for line in _log_tail(log_path))
                out.append(f"testnet process {name} exited early with status {p.returncode}; "
                           f"the end of {log_path}:{tail}")
        return out

    def check_alive(self) -> None:
        """TestnetError naming the first process that exited, with the end of its log."""
        if failures := self.exited():
            raise TestnetError(failures[0])

    async def watch(self, interval: float = 2.0) -> None:
        """While the testnet runs: report each process that exits (once) on stderr."""
        reported: set[str] = set()
        while True:
            await asyncio.sleep(interval)
            for failure in self.exited():
                if failure not in reported:
                    reported.add(failure)
                    print(f"testnet: warning: {failure}", file=sys.stderr, flush=True)

    def hangup(self) -> None:
        """SIGHUP: passed on to every relay and authority process, which reload their config
        and reopen their log files as tor does; the testnet itself keeps running."""
        for p in self.procs:
            if p.poll() is None and self.names.get(p.pid) != "wan":
                p.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


async def wait_for_consensus(node, n_relays: int, testnet: Testnet, timeout: float) -> None:
    """Bootstrap the client's directory until the consensus lists every relay as Running."""
    from onionp2p.dir.client import DirectoryUnavailable

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        testnet.check_alive()
        try:
            await node.directory.refresh()
            running = [r for r in node.directory.routers() if "Running" in r.flags]
            if len(running) >= n_relays:
                return
        except DirectoryUnavailable:
            pass
        if loop.time() > deadline:
            raise OnionError(f"no consensus listing {n_relays} relays after {timeout:.0f} s")
        await asyncio.sleep(1.0)


async def run_testnet(*, n_relays: int = 5, n_exits: int = 2, n_authorities: int = 1,
                      socks_port: int = 9150, control_port: int | None = 9151,
                      data_dir: Path | None = None, voting_interval: int = 5,
                      timeout: float = 180.0, log_level: str = "info", metrics_port: int | None = None,
                      stop_event: asyncio.Event | None = None, ready=None,
                      link_delay: tuple[float, float] | None = None, congestion_control: bool = True,
                      cgo: bool = True, base_port: int | None = None,
                      http_tunnel_port: int | None = None, dns_port: int | None = None) -> int:
    """Start the network and the client; run until signalled. Returns the exit code. On a
    failure the data directory (even a temporary one) is kept, and the message says where."""
    from onionp2p.client.node import ClientNode

    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="onionp2p-testnet-")
        data_dir = Path(tmp)
    data_dir.mkdir(parents=True, exist_ok=True)
    net = Testnet(data_dir, n_relays=n_relays, n_exits=n_exits, n_authorities=n_authorities,
                  voting_interval=voting_interval, log_level=log_level, link_delay=link_delay,
                  base_port=base_port)
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, net.hangup)
    node = None
    failed = True
    try:
        net.prepare()
        cfg = ClientConfig(data_dir=data_dir / "client", socks_address=("127.0.0.1", socks_port),
                           control_port=control_port, metrics_port=metrics_port,
                           http_tunnel_port=http_tunnel_port, dns_port=dns_port,
                           authorities=tuple(net.authority_lines),
                           enforce_distinct_subnets=False, client_reject_internal_addresses=False,
                           log_level=log_level, congestion_control=congestion_control, cgo=cgo)
        node = ClientNode(cfg)
        await node.listen()  # a port in use fails here, before any process starts
        net.spawn()
        print(f"testnet: {n_authorities} authorities, {n_relays} relays ({n_exits} exits) in {data_dir}",
              flush=True)
        if net.delays:
            print("testnet: one-way delay of links to each relay (ms): "
                  + ", ".join(f"{n} {d * 1000:g}" for n, d in net.delays.items()), flush=True)
        waiting = asyncio.ensure_future(wait_for_consensus(node, n_relays, net, timeout))
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({waiting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            waiting.cancel()
            failed = False
            return 0
        waiting.result()
        stopper.cancel()
        await node.start(ready_timeout=timeout)
        print(f"SOCKS5 proxy ready at 127.0.0.1:{node.socks_port}", flush=True)
        if node.http_tunnel_port is not None:
            print(f"HTTP CONNECT tunnel at 127.0.0.1:{node.http_tunnel_port}", flush=True)
        if node.dns_port is not None:
            print(f"DNS port at 127.0.0.1:{node.dns_port} (UDP)", flush=True)
        if node.control_port is not None:
            print(f"Control port at 127.0.0.1:{node.control_port} "
                  f"(cookie: {cfg.data_dir / 'control_auth_cookie'})", flush=True)
        if node.metrics_port is not None:
            print(f"Metrics port at http://127.0.0.1:{node.metrics_port}/metrics", flush=True)
        if ready is not None:
            ready(node)
        watcher = asyncio.ensure_future(net.watch())
        await stop.wait()
        watcher.cancel()
        failed = False
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if node is not None:
            try:
                async with asyncio.timeout(5):
                    await node.stop()
            except (TimeoutError, OnionError):
                pass
        spawned = bool(net.names)  # a failure before any process started leaves no logs to keep
        net.stop()
        if tmp is not None and (not failed or not spawned):
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"testnet: kept {tmp} (every process's log.txt is there)", file=sys.stderr, flush=True)
