#!/usr/bin/env python3
"""onionp2p vs tor on one machine: throughput, latency, relay capacity, memory (specs/performance.md).

Usage::

    tools/bench [--quick] [--runs N] [--relays 5] [--exits 2] [--out DIR] [--only onionp2p|tor]
                [--skip NAMES] [--profile] [--tor-option LINE] [--keep] [--uvloop] [--onion-loop auto|asyncio|uvloop]
                [--onion-cc vegas|fixed] [--no-cgo] [--tor-cc vegas|fixed] [--tor-conflux 0|1]

One run starts, on 127.0.0.1,

* the local HTTP server every measurement downloads from (a process of its own),
* ``onionp2p testnet`` (a process: authority, relays and its client with SOCKS and control
  ports), and
* the private Tor network of ``tools/tornet.py`` (3 authorities + the same number of
  relays and exits) plus a tor client with a SocksPort and a ControlPort,

then drives both through their SOCKS ports with the same load generator (this process)
and their control ports with stem, one network at a time (the other one idles). It prints
a markdown table (onionp2p, tor, ratio) headed by each network's mode (flow control,
relay crypto, conflux) and writes ``results.json``, ``results.md``,
``throughput_vs_concurrency.png``, ``cpu_per_100mb.png`` and ``latency_cdf.png`` (when
matplotlib is installed) to ``--out`` (default ``build/bench/``, ignored by git).

Aggregate throughput is measured twice at 8, 32 and 128 streams: on **one circuit** (no
SOCKS credentials: both tor and onionp2p put every stream on the same circuit, so the row
measures one circuit's flow control) and on **isolated circuits** (a SOCKS username per
stream: both isolate by SOCKS credentials by default, so each stream gets a circuit of its
own, which measures capacity). CPU is read from ``/proc/PID/stat`` (utime+stime, plus the
reaped children's) of **every** process of a network — onionp2p: the testnet process (its
client) and its children (authority, relays); tor: the client, the relays and the 3
authorities — before and after each measurement, and reported as CPU-seconds per 100 MB
with the CPU total it came from and the worst-case tick rounding of that total (2 ticks
per process); measurements are extended until that rounding is below 2 %. Tor's
congestion control and conflux are pinned by consensus parameters on its authorities
(``ConsensusParams cc_alg=2 cfx_enabled=0`` by default; ``--tor-cc``, ``--tor-conflux``),
its client gets ``ConfluxEnabled`` to match and, as onionp2p's authority is not a relay,
``ExcludeNodes`` for the 3 authorities (``--tor-authorities-in-paths`` to allow them).

Each throughput figure is the median of ``--runs`` runs (3; 1 with ``--quick``, which
also moves less data). Nothing here is a test: pytest never runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1_000_000
CELL_DATA = 498
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def log(*a) -> None:
    print("[bench]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# /proc helpers

def proc_cpu(pid: int) -> float:
    """User+system CPU seconds of a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_rss(pid: int) -> int:
    """Resident set size in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def proc_cpu_all(pid: int) -> float:
    """utime+stime+cutime+cstime of a process in seconds: its own CPU and that of its children
    it has reaped (live children are counted as processes of their own)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = stat.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / TICKS


def descendant_pids(root: int) -> list[int]:
    """``root`` and every live process below it (children, grandchildren ...), from the
    parent PIDs in /proc/PID/stat (onionp2p's testnet starts its authority and relays as
    children, each in a session of its own)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [root] if root in parent else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(c for c, pp in parent.items() if pp == pid)
    return out


#: the worst-case error of one process's CPU delta read from /proc/PID/stat: utime and stime
#: (and the reaped children's two fields, which do not move here) are each truncated to a tick
TICK_ERROR_S = 2 / TICKS


class CpuMeter:
    """CPU seconds summed over every process of a network (client, relays, authorities), read
    from /proc/PID/stat before and after; also the client's own share. A process that appears
    between the two readings counts from zero, one that disappears counts its last reading."""

    def __init__(self, net: "Network"):
        self.net = net
        self.before = self._read()
        self.after: dict[int, float] | None = None

    def _read(self) -> dict[int, float]:
        return {pid: proc_cpu_all(pid) for pid in self.net.all_pids()}

    def stop(self) -> "CpuMeter":
        after = self._read()
        for pid, v in self.before.items():  # gone: keep its last value (delta 0 since then)
            after.setdefault(pid, v)
        self.after = after
        return self

    @property
    def total(self) -> float:
        assert self.after is not None
        return sum(self.after[p] - self.before.get(p, 0.0) for p in self.after)

    @property
    def client(self) -> float:
        assert self.after is not None
        pid = self.net.client_pid
        return self.after.get(pid, 0.0) - self.before.get(pid, 0.0)

    @property
    def n_procs(self) -> int:
        return len(set(self.before) | set(self.after or {}))

    @property
    def error_bound(self) -> float:
        """Worst-case tick rounding of ``total``, in seconds."""
        return self.n_procs * TICK_ERROR_S


def find_pids(needle: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            out.append(int(d.name))
    return out


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --------------------------------------------------------------------------------------------
# The HTTP server (its own process): GET /<n> -> n bytes, GET /inf -> bytes until closed,
# GET /echo -> echoes; GET /idle -> holds the connection open, sends nothing.

_CHUNK = bytes(range(256)) * 4096  # 1 MiB


class _HttpProto(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.buf = b""
        self.left = 0
        self.paused = False
        self.mode = None
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)

    def data_received(self, data):
        if self.mode == "echo":
            self.t.write(data)
            return
        if self.mode is not None:
            return
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 8192:
                self.t.close()
            return
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        if path == "/echo":
            self.mode = "echo"
            self.t.write(b"HTTP/1.0 200 OK\r\n\r\n")
            if rest:
                self.t.write(rest)
            return
        if path == "/idle":
            self.mode = "idle"
            return
        if path == "/inf":
            self.mode = "inf"
            self.left = -1
            self.t.write(b"HTTP/1.0 200 OK\r\n\r\n")
        else:
            self.mode = "fixed"
            self.left = int(path.lstrip("/"))
            self.t.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % self.left)
        self._pump()

    def _pump(self):
        view = memoryview(_CHUNK)
        while not self.paused and self.left != 0:
            n = len(_CHUNK) if self.left < 0 else min(self.left, len(_CHUNK))
            self.t.write(view[:n])
            if self.left > 0:
                self.left -= n
        if self.left == 0 and self.mode == "fixed":
            self.mode = "done"
            self.t.close()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.mode in ("fixed", "inf"):
            self._pump()

    def connection_lost(self, exc):
        self.left = 0


def http_server_main(port_file: str) -> None:
    async def run():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_HttpProto, "127.0.0.1", 0, backlog=4096)
        Path(port_file).write_text(str(srv.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()
    asyncio.run(run())


class HttpServerProc:
    def __init__(self, workdir: Path):
        self.port_file = workdir / "http.port"
        self.proc = subprocess.Popen([sys.executable, __file__, "_http", str(self.port_file)],
                                     start_new_session=True)
        for _ in range(200):
            if self.port_file.exists() and self.port_file.read_text():
                break
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)


# --------------------------------------------------------------------------------------------
# The load generator: a SOCKS5 client (no auth, or username/password for isolation)

class _Counter(asyncio.Protocol):
    """Counts bytes of an HTTP response; ``done`` resolves when ``want`` body bytes arrived or EOF."""

    def __init__(self, want: int = -1):
        self.want = want
        self.header = b""
        self.in_body = False
        self.body = 0
        self.first_byte: float | None = None
        self.done = asyncio.get_running_loop().create_future()
        self.echo_wait: asyncio.Future | None = None
        self.echo_need = 0

    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        if not self.in_body:
            self.header += data
            i = self.header.find(b"\r\n\r\n")
            if i < 0:
                return
            self.in_body = True
            n = len(self.header) - i - 4
            self.header = self.header[:i]
        else:
            n = len(data)
        self.body += n
        if self.echo_wait is not None and self.body >= self.echo_need and not self.echo_wait.done():
            self.echo_wait.set_result(time.perf_counter())
        if 0 <= self.want <= self.body and not self.done.done():
            self.done.set_result(time.perf_counter())

    def eof_received(self):
        if not self.done.done():
            self.done.set_result(time.perf_counter())
        return False

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(time.perf_counter())
        if self.echo_wait is not None and not self.echo_wait.done():
            self.echo_wait.set_exception(ConnectionError("closed"))


async def socks_connect(socks_port: int, host: str, port: int, *, user: str | None = None,
                        timeout: float = 60.0) -> socket.socket:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(s, ("127.0.0.1", socks_port))
            if user:
                await loop.sock_sendall(s, b"\x05\x01\x02")
            else:
                await loop.sock_sendall(s, b"\x05\x01\x00")
            rep = await _recv_exact(loop, s, 2)
            if user:
                if rep != b"\x05\x02":
                    raise ConnectionError(f"SOCKS method refused {rep!r}")
                u = user.encode()
                await loop.sock_sendall(s, b"\x01" + bytes([len(u)]) + u + b"\x01x")
                if (await _recv_exact(loop, s, 2))[1] != 0:
                    raise ConnectionError("SOCKS auth failed")
            elif rep != b"\x05\x00":
                raise ConnectionError(f"SOCKS method refused {rep!r}")
            h = host.encode()
            await loop.sock_sendall(s, b"\x05\x01\x00\x03" + bytes([len(h)]) + h + struct.pack(">H", port))
            rep = await _recv_exact(loop, s, 4)
            if rep[1] != 0:
                raise ConnectionError(f"SOCKS CONNECT failed: reply {rep[1]}")
            atyp = rep[3]
            rest = {1: 4, 4: 16}.get(atyp)
            if rest is None:
                rest = (await _recv_exact(loop, s, 1))[0]
            await _recv_exact(loop, s, rest + 2)
    except BaseException:
        s.close()
        raise
    return s


async def _recv_exact(loop, s, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await loop.sock_recv(s, n - len(out))
        if not chunk:
            raise ConnectionError("SOCKS proxy closed the connection")
        out += chunk
    return out


async def http_fetch(sock: socket.socket, path: str, want: int) -> _Counter:
    """Send GET path on a connected socket; return the counting protocol (await .done)."""
    loop = asyncio.get_running_loop()
    _t, proto = await loop.create_connection(lambda: _Counter(want), sock=sock)
    proto.sent = time.perf_counter()
    _t.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    return proto


async def direct_connect(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(s, (host, port))
    return s


# --------------------------------------------------------------------------------------------
# The two networks

@dataclass
class Network:
    name: str
    socks_port: int = 0
    control_port: int = 0
    control_password: str | None = None
    cookie_path: Path | None = None
    client_pid: int = 0
    relay_pids: dict[str, int] = field(default_factory=dict)  # fingerprint -> pid
    relay_names: dict[str, str] = field(default_factory=dict)  # fingerprint -> nickname

    def all_pids(self) -> list[int]:
        """Every process of this network: client, relays and authorities."""
        raise NotImplementedError

    def mode(self) -> str:
        """Flow control, relay crypto and conflux as this network runs them (for the table header)."""
        raise NotImplementedError

    def controller(self):
        from stem.control import Controller

        c = Controller.from_port(address="127.0.0.1", port=self.control_port)
        if self.control_password:
            c.authenticate(password=self.control_password)
        else:
            c.authenticate()
        return c


class OnionNet(Network):
    def __init__(self, workdir: Path, n_relays: int, n_exits: int, cgo: bool = True,
                 congestion_control: bool = True, event_loop: str = "auto"):
        super().__init__("onionp2p")
        self.event_loop = event_loop  # ONIONP2P_EVENT_LOOP for every process of the network
        self.dir = workdir / "onionp2p"
        self.n_relays, self.n_exits = n_relays, n_exits
        self.cgo = cgo  # False: the client keeps tor1 relay crypto (testnet --no-cgo)
        self.congestion_control = congestion_control  # False: fixed windows (--no-congestion-control)
        self.proc: subprocess.Popen | None = None

    def all_pids(self) -> list[int]:
        # the testnet process (client, SOCKS and control ports) and its children (the
        # authority and the relays)
        return descendant_pids(self.proc.pid) if self.proc is not None else []

    def mode(self) -> str:
        cc = ("Vegas + XON/XOFF (client `congestion_control = true`)" if self.congestion_control
              else "fixed SENDME windows, 1000 cells per circuit / 500 per stream "
                   "(client `congestion_control = false`)")
        from onionp2p.proto.cgo import CGO_BACKEND  # the testnet runs this venv with this environment

        backend = CGO_BACKEND.split(" ")[0]  # "native" (compiled) or "python"
        crypto = (f"CGO on every hop that offers it (client `cgo = true`; {backend} CGO backend)"
                  if self.cgo and self.congestion_control else "tor1 on every hop")
        from onionp2p.cli import EVENT_LOOP_ENV, event_loop_choice  # what the processes will pick

        loop = (f"{event_loop_choice({EVENT_LOOP_ENV: self.event_loop})} "
                f"({EVENT_LOOP_ENV}={self.event_loop}{', the default' if self.event_loop == 'auto' else ''})")
        return f"{cc}; relay crypto {crypto}; no conflux (not implemented); event loop {loop} in every process"

    def start(self, timeout: float = 240.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.dir.parent / "onionp2p-testnet.log", "wb")
        from onionp2p.cli import EVENT_LOOP_ENV

        env = {**os.environ, EVENT_LOOP_ENV: self.event_loop}
        cmd = [sys.executable, "-m", "onionp2p", "testnet", "--relays", str(self.n_relays),
               "--exits", str(self.n_exits), "--socks-port", "auto", "--control-port", "auto",
               "--data-dir", str(self.dir), "--voting-interval", "5"] + ([] if self.cgo else ["--no-cgo"]) \
            + ([] if self.congestion_control else ["--no-congestion-control"])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"onionp2p testnet exited; see {self.log.name}")
            m = re.search(r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)", line)
            if m:
                self.socks_port = int(m.group(1))
            m = re.search(r"Control port at 127\.0\.0\.1:(\d+)", line)
            if m:
                self.control_port = int(m.group(1))
                break
        else:
            raise RuntimeError("onionp2p testnet not ready in time")
        self.client_pid = self.proc.pid
        self.cookie_path = self.dir / "client" / "control_auth_cookie"
        from onionp2p.proto.directory import RelayInfo

        for d in sorted(self.dir.iterdir()):
            cfg = d / "relay.toml"
            if not cfg.exists():
                continue
            info = RelayInfo.load(d / "relay-info.json")
            fp = info.rsa_id.hex().upper()
            pids = find_pids(str(cfg))
            if pids:
                self.relay_pids[fp] = pids[0]
                self.relay_names[fp] = info.nickname

    def relay_info(self, nickname: str):
        from onionp2p.proto.directory import RelayInfo

        return RelayInfo.load(self.dir / nickname / "relay-info.json")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _load_tornet():
    spec = importlib.util.spec_from_file_location("tornet", ROOT / "tools" / "tornet.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tornet"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


class TorNetwork(Network):
    """tools/tornet.py's network plus a tor client with SocksPort and ControlPort (started here,
    so tornet.py needs no change)."""

    def __init__(self, workdir: Path, n_relays: int, n_exits: int, tor_options: list[str] = (),
                 consensus_params: dict[str, int] | None = None, exclude_authorities: bool = False):
        super().__init__("tor")
        self.tornet = _load_tornet()
        self.dir = workdir / "tornet"
        #: pinned on the authorities (``ConsensusParams``), so every tor of the network uses
        #: them rather than its compiled-in defaults
        self.consensus_params = dict(consensus_params or {})
        auth = ([("ConsensusParams " + " ".join(f"{k}={v}" for k, v in sorted(self.consensus_params.items())))]
                if self.consensus_params else [])
        self.net = self.tornet.TorNet(self.dir, extra_authority_options=auth,
                                      extra_relay_options=list(tor_options))
        self.tor_options = list(tor_options)
        self.exclude_authorities = exclude_authorities
        self.n_relays, self.n_exits = n_relays, n_exits
        self.client: subprocess.Popen | None = None
        self.served_params = ""  # the consensus's "params" line as the client's first authority serves it
        self.version = ""

    def all_pids(self) -> list[int]:
        return [n.pid for n in self.net.nodes if n.pid] + ([self.client_pid] if self.client_pid else [])

    def mode(self) -> str:
        p = dict(kv.split("=", 1) for kv in self.served_params.split()[1:])
        cc = {"0": "fixed SENDME windows", "2": "Vegas", "3": "NOLA"}.get(p.get("cc_alg", ""),
                                                                       "its default (Vegas)")
        cfx = {"0": "conflux off", "1": "conflux on"}.get(p.get("cfx_enabled", ""), "conflux: its default (on)")
        client = [o for o in self.tor_options if o.split()[0] == "ConfluxEnabled"]
        return (f"{self.version}: {cc} (consensus `cc_alg={p.get('cc_alg', 'unset')}`), {cfx} (consensus "
                f"`cfx_enabled={p.get('cfx_enabled', 'unset')}`{', client `' + client[0] + '`' if client else ''})"
                f"; relay crypto tor1 (tor's client does not ask for CGO); consensus `{self.served_params}`")

    def start(self, timeout: float = 240.0) -> None:
        self.net.start(n_relays=self.n_relays, n_exits=self.n_exits, timeout=timeout)
        for node in self.net.nodes:
            self.relay_pids[node.fingerprint] = node.pid
            self.relay_names[node.fingerprint] = node.name
        cdir = self.dir / "client"
        cdir.mkdir(parents=True, exist_ok=True)
        self.socks_port, self.control_port = self.tornet._free_ports(2)
        torrc = [
            "TestingTorNetwork 1",
            f"DataDirectory {cdir}",
            "RunAsDaemon 0",
            f"SocksPort 127.0.0.1:{self.socks_port}",
            f"ControlPort 127.0.0.1:{self.control_port}",
            "CookieAuthentication 1",
            f"Log notice file {cdir}/notice.log",
            "SafeLogging 0",
            "ShutdownWaitLength 0",
            "ClientUseIPv6 0",
            # no __OwningControllerProcess: stem would TAKEOWNERSHIP and tor would exit as soon
            # as the first controller connection closes; stop() ends this process.
            *self.net.dirauth_lines(),
            *self.tor_options,
        ]
        if self.exclude_authorities:
            # paths through the relays only, as onionp2p's authorities are not relays
            torrc.append("ExcludeNodes " + ",".join(f"${a.fingerprint}" for a in self.net.authorities))
        (cdir / "torrc").write_text("\n".join(torrc) + "\n")
        out = open(cdir / "stdout.log", "ab")
        (cdir / "torrc-defaults").write_text("")  # like tornet: no system-wide defaults
        self.client = subprocess.Popen(["tor", "--defaults-torrc", str(cdir / "torrc-defaults"),
                                        "-f", str(cdir / "torrc")], stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.client_pid = self.client.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.controller() as c:
                    phase = c.get_info("status/bootstrap-phase")
                    if "PROGRESS=100" in phase:
                        break
            except Exception:
                pass
            if self.client.poll() is not None:
                raise RuntimeError(f"tor client exited; see {cdir}/notice.log")
            time.sleep(1.0)
        else:
            raise RuntimeError("tor client did not bootstrap in time")
        cons = self.tornet._http_get(self.net.authorities[0].dir_port, self.tornet.MD_CONSENSUS) or ""
        self.served_params = next((ln for ln in cons.splitlines() if ln.startswith("params")), "params")
        out = subprocess.run(["tor", "--version"], capture_output=True, text=True).stdout
        m = re.search(r"Tor version (\S+?)\.?\s", out)
        self.version = f"tor {m.group(1)}" if m else "tor"

    def stop(self) -> None:
        if self.client is not None and self.client.poll() is None:
            self.client.terminate()
            try:
                self.client.wait(10)
            except subprocess.TimeoutExpired:
                self.client.kill()
        self.net.stop()


# --------------------------------------------------------------------------------------------
# Measurements

async def bulk(net_port: int | None, http_port: int, nbytes: int, *, direct: bool = False,
               on_connected=None, user: str | None = None) -> dict:
    """One stream downloads nbytes; returns MB/s (timed from the request to the last byte).
    ``on_connected`` (async) runs once the stream is open, before the request; ``user``: a
    SOCKS username (a circuit of its own, on both networks)."""
    t0 = time.perf_counter()
    if direct:
        s = await direct_connect("127.0.0.1", http_port)
    else:
        s = await socks_connect(net_port, "127.0.0.1", http_port, user=user)
    t1 = time.perf_counter()
    extra = await on_connected() if on_connected is not None else None
    proto = await http_fetch(s, f"/{nbytes}", nbytes)
    end = await asyncio.wait_for(proto.done, 600)
    proto.t.close()
    if proto.body < nbytes:
        raise RuntimeError(f"short transfer: {proto.body} of {nbytes}")
    return {"mbps": nbytes / (end - proto.sent) / MB, "connect_s": t1 - t0, "seconds": end - proto.sent,
            "extra": extra}


async def ttfb(socks_port: int, http_port: int, n: int, size: int = 1000) -> list[float]:
    """n times: open a stream (on the existing circuit), GET a small object; seconds from the
    SOCKS connect to the first response byte."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = await socks_connect(socks_port, "127.0.0.1", http_port)
        proto = await http_fetch(s, f"/{size}", size)
        await asyncio.wait_for(proto.done, 60)
        out.append(proto.first_byte - t0)
        proto.t.close()
    return out


async def echo_rtt(socks_port: int | None, http_port: int, n: int) -> list[float]:
    """n round trips of 100 bytes on one open stream (request -> echo)."""
    if socks_port is None:
        s = await direct_connect("127.0.0.1", http_port)
    else:
        s = await socks_connect(socks_port, "127.0.0.1", http_port)
    loop = asyncio.get_running_loop()
    t, proto = await loop.create_connection(lambda: _Counter(-1), sock=s)
    t.write(b"GET /echo HTTP/1.0\r\n\r\n")
    out = []
    msg = b"x" * 100
    for i in range(n + 2):
        proto.echo_wait = loop.create_future()
        proto.echo_need = proto.body + len(msg)
        t0 = time.perf_counter()
        t.write(msg)
        t1 = await asyncio.wait_for(proto.echo_wait, 30)
        if i >= 2:
            out.append(t1 - t0)
    t.close()
    return out


async def aggregate(net: Network, http_port: int, streams: int, seconds: float, *, isolated: bool = False,
                    tag: str = "", warmup: float = 2.0, max_seconds: float | None = None) -> dict:
    """``streams`` concurrent downloads of /inf through ``net``'s SOCKS port.

    One circuit (``isolated`` False): no SOCKS credentials, so both tor and onionp2p put every
    stream on the same circuit. Isolated circuits: a SOCKS username per stream (``tag`` makes
    them new for each run), so that each stream gets a circuit of its own (tor's
    IsolateSOCKSAuth, on by default; onionp2p isolates by SOCKS credentials the same way).

    After ``warmup`` s, bytes of all bodies and the CPU of every process of the network are
    counted over at least ``seconds``, extended (up to ``max_seconds``) until the tick rounding
    of the CPU total is below 2 %. Returns MB/s, CPU-seconds per 100 MB (all processes and the
    client alone), the CPU total and its rounding bound."""
    protos = []

    async def one(i: int):
        user = f"iso{tag}-{i}" if isolated else None
        s = await socks_connect(net.socks_port, "127.0.0.1", http_port, user=user, timeout=180)
        p = await http_fetch(s, "/inf", -1)
        protos.append(p)

    results = await asyncio.gather(*(one(i) for i in range(streams)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        log(f"  {len(failed)} of {streams} streams failed to open: {failed[0]!r}")
    await asyncio.sleep(warmup)
    max_seconds = max_seconds or max(4 * seconds, 20.0)
    b0 = sum(p.body for p in protos)
    meter = CpuMeter(net)
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    while True:
        meter.stop()
        if meter.error_bound <= 0.02 * meter.total or time.perf_counter() - t0 >= max_seconds:
            break
        await asyncio.sleep(0.5)
    b1 = sum(p.body for p in protos)
    t1 = time.perf_counter()
    for p in protos:
        p.t.abort()
    await asyncio.sleep(0.5)
    nbytes = b1 - b0
    per100 = 100 * MB / nbytes if nbytes else float("nan")
    return {"mbps": nbytes / (t1 - t0) / MB, "seconds": t1 - t0, "bytes": nbytes, "open": len(protos),
            "cpu_s": meter.total, "cpu_err_s": meter.error_bound, "n_procs": meter.n_procs,
            "client_cpu_s": meter.client, "cpu_per_100mb": meter.total * per100,
            "client_cpu_per_100mb": meter.client * per100}


def build_times(net: Network, n: int) -> list[float]:
    """n sequential EXTENDCIRCUIT 0 (the node picks a 3-hop path), seconds until BUILT."""
    out = []
    with net.controller() as c:
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                cid = c.new_circuit(await_build=True, timeout=60)
            except Exception as exc:
                log(f"  circuit build failed: {exc}")
                continue
            out.append(time.perf_counter() - t0)
            try:
                c.close_circuit(cid)
            except Exception:
                pass
    return out


def stream_circuit_path(net: Network) -> list[str]:
    """Fingerprints of the path of the circuit carrying the (only) SUCCEEDED stream."""
    with net.controller() as c:
        circ_id = None
        for st in c.get_streams():
            if st.status == "SUCCEEDED" and st.circ_id:
                circ_id = st.circ_id
        if circ_id is None:
            return []
        circ = c.get_circuit(circ_id)
        return [fp for fp, _nick in circ.path]


# --------------------------------------------------------------------------------------------
# Memory: idle circuits at a relay, open streams at the client and the exit

async def build_idle_circuits(info, n: int, per_channel: int = 900, concurrency: int = 64) -> list:
    """n one-hop circuits (CREATE2/ntor) at the relay ``info``, from onionp2p's OnionClient (the
    same driver for both networks); spread over channels so no per-channel cap applies."""
    from onionp2p.client.client import OnionClient

    clients = [OnionClient() for _ in range((n + per_channel - 1) // per_channel)]
    sem = asyncio.Semaphore(concurrency)
    built = 0

    async def one(cl):
        nonlocal built
        async with sem:
            try:
                await cl.build_circuit([info], timeout=60)
                built += 1
            except Exception:
                pass

    tasks = []
    for i in range(n):
        tasks.append(one(clients[i // per_channel]))
    await asyncio.gather(*tasks)
    return [clients, built]


async def close_clients(clients) -> None:
    for cl in clients:
        await cl.close()


def dedicated_onion_relay(workdir: Path) -> tuple[subprocess.Popen, object]:
    """An onionp2p relay process of its own for the circuit-memory test: no per-channel cap,
    and every ``dos_*`` limit the config knows set to 0 (= off)."""
    from onionp2p import config as cfgmod
    from onionp2p.proto.directory import RelayInfo

    d = workdir / "memrelay"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"nickname": "memrelay", "data_dir": str(d), "or_address": "127.0.0.1:0",
           "max_circuits_per_channel": 100000, "log_level": "warning"}
    for f in getattr(cfgmod.RelayConfig, "__dataclass_fields__", {}):
        if f.startswith("dos_"):
            cfg[f] = 0
    (d / "relay.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
    logf = open(d / "log.txt", "wb")
    p = subprocess.Popen([sys.executable, "-m", "onionp2p", "relay", "--config", str(d / "relay.toml")],
                         stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    for _ in range(300):
        if (d / "relay-info.json").exists():
            break
        time.sleep(0.05)
    time.sleep(0.3)
    return p, RelayInfo.load(d / "relay-info.json")


async def circuit_memory(pid: int, info, n: int) -> float:
    rss0 = proc_rss(pid)
    clients, built = await build_idle_circuits(info, n)
    await asyncio.sleep(2.0)
    rss1 = proc_rss(pid)
    await close_clients(clients)
    if built < n:
        log(f"  only {built} of {n} circuits built")
    return (rss1 - rss0) / max(built, 1)


async def stream_memory(net: Network, http_port: int, n: int) -> tuple[float, float]:
    """n idle open streams; RSS delta per stream at the client and summed over the relays."""
    rc0 = proc_rss(net.client_pid)
    rr0 = {fp: proc_rss(pid) for fp, pid in net.relay_pids.items()}
    socks = []
    sem = asyncio.Semaphore(32)

    async def one():
        async with sem:
            s = await socks_connect(net.socks_port, "127.0.0.1", http_port, timeout=120)
            await asyncio.get_running_loop().sock_sendall(s, b"GET /idle HTTP/1.0\r\n\r\n")
            socks.append(s)

    res = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    bad = [r for r in res if isinstance(r, BaseException)]
    if bad:
        log(f"  {len(bad)} streams failed: {bad[0]!r}")
    await asyncio.sleep(2.0)
    rc1 = proc_rss(net.client_pid)
    rr1 = {fp: proc_rss(pid) for fp, pid in net.relay_pids.items()}
    for s in socks:
        s.close()
    k = max(len(socks), 1)
    relay_delta = sum(max(0, rr1[fp] - rr0[fp]) for fp in rr0)
    await asyncio.sleep(1.0)
    return (rc1 - rc0) / k, relay_delta / k


# --------------------------------------------------------------------------------------------
# Ceilings

def aes_ctr_speed() -> dict:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(bytes(16))).encryptor()
    big = os.urandom(1 << 20)
    t0 = time.perf_counter()
    for _ in range(200):
        enc.update(big)
    bulk = 200 * len(big) / (time.perf_counter() - t0) / MB
    cell = os.urandom(509)
    n = 200_000
    upd = enc.update
    t0 = time.perf_counter()
    for _ in range(n):
        upd(cell)
    per_cell = (time.perf_counter() - t0) / n
    return {"aes_bulk_mbps": bulk, "aes_cell_us": per_cell * 1e6, "aes_cell_mbps": 509 / per_cell / MB}


def _self_signed(workdir: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    c, k = workdir / "tls.crt", workdir / "tls.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def tls_server_main(port_file: str, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def run():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_HttpProto, "127.0.0.1", 0, ssl=ctx)
        Path(port_file).write_text(str(srv.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()
    asyncio.run(run())


async def tls_loopback_speed(workdir: Path, nbytes: int) -> float:
    """One asyncio TLS connection over loopback between two processes (one OR-link hop's ceiling)."""
    cert, key = _self_signed(workdir)
    pf = workdir / "tls.port"
    p = subprocess.Popen([sys.executable, __file__, "_tls", str(pf), str(cert), str(key)],
                         start_new_session=True)
    try:
        for _ in range(200):
            if pf.exists() and pf.read_text():
                break
            await asyncio.sleep(0.05)
        port = int(pf.read_text())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        loop = asyncio.get_running_loop()
        t, proto = await loop.create_connection(lambda: _Counter(nbytes), "127.0.0.1", port, ssl=ctx)
        t0 = time.perf_counter()
        t.write(f"GET /{nbytes} HTTP/1.0\r\n\r\n".encode())
        end = await asyncio.wait_for(proto.done, 300)
        t.close()
        return nbytes / (end - t0) / MB
    finally:
        p.terminate()
        p.wait(5)


# --------------------------------------------------------------------------------------------
# One network's whole series

def _cpu_snapshot(net: Network) -> dict[str, float]:
    snap = {fp: proc_cpu(pid) for fp, pid in net.relay_pids.items()}
    snap["client"] = proc_cpu(net.client_pid)
    return snap


def _cpu_summary(meters: list[CpuMeter], nbytes: int) -> dict:
    """CPU per 100 MB over several measured transfers of ``nbytes`` in all."""
    cpu = sum(m.total for m in meters)
    client = sum(m.client for m in meters)
    return {"cpu_s": cpu, "client_cpu_s": client, "cpu_err_s": sum(m.error_bound for m in meters),
            "n_procs": max(m.n_procs for m in meters), "bytes": nbytes,
            "cpu_per_100mb": cpu * 100 * MB / nbytes, "client_cpu_per_100mb": client * 100 * MB / nbytes}


def _cpu_summary_agg(runs: list[dict]) -> dict:
    """The same over the runs of one aggregate row (all their bytes and CPU together)."""
    nbytes = sum(x["bytes"] for x in runs)
    cpu = sum(x["cpu_s"] for x in runs)
    client = sum(x["client_cpu_s"] for x in runs)
    per = 100 * MB / nbytes if nbytes else float("nan")
    return {"cpu_s": cpu, "client_cpu_s": client, "cpu_err_s": sum(x["cpu_err_s"] for x in runs),
            "n_procs": max(x["n_procs"] for x in runs), "bytes": nbytes,
            "cpu_per_100mb": cpu * per, "client_cpu_per_100mb": client * per}


async def measure_network(net: Network, http_port: int, args, workdir: Path) -> dict:
    r: dict = {"mode": net.mode()}
    log(f"  {net.name} mode: {r['mode']}")
    skip = set(args.skip)
    runs = args.runs
    # warm-up: a stream on the (pre-built) circuit
    await bulk(net.socks_port, http_port, 2 * MB)

    # Memory first: later phases leave freed memory in the processes' heaps, which new
    # streams would reuse without growing the RSS.
    if "streammem" not in skip:
        c, e = await stream_memory(net, http_port, args.streams_mem)
        r["stream_rss_client"], r["stream_rss_relays"] = c, e
        log(f"  {net.name} per open stream: client {c / 1024:.1f} KiB, relays {e / 1024:.1f} KiB")

    if "bulk" not in skip:
        vals, relay_rates, client_rates = [], [], []
        # one meter over all runs (and the extra downloads below), so that its tick rounding
        # is paid once
        meter = CpuMeter(net)
        for i in range(runs):
            async def get_path():
                try:
                    return await asyncio.to_thread(stream_circuit_path, net)
                except Exception as exc:
                    log(f"  cannot read the stream's path: {exc!r}")
                    return []
            before = _cpu_snapshot(net)
            res = await bulk(net.socks_port, http_port, args.bulk_bytes, on_connected=get_path)
            after = _cpu_snapshot(net)
            path = res["extra"] or []
            vals.append(res["mbps"])
            cells = args.bulk_bytes / CELL_DATA
            hops = {}
            for role, fp in zip(("guard", "middle", "exit"), path):
                cpu = after.get(fp, 0) - before.get(fp, 0)
                hops[role] = {"name": net.relay_names.get(fp, fp[:8]), "cpu_s": cpu,
                              "cells_per_cpu_s": cells / cpu if cpu > 0 else float("nan")}
            ccpu = after["client"] - before["client"]
            client_rates.append(cells / ccpu if ccpu > 0 else float("nan"))
            relay_rates.append(hops)
            log(f"  {net.name} bulk run {i + 1}: {res['mbps']:.1f} MB/s; cells/CPU-s: " +
                ", ".join(f"{k} {v['cells_per_cpu_s']:,.0f}" for k, v in hops.items()) +
                f", client {client_rates[-1]:,.0f}")
        # CPU per 100 MB over every process of the network: more single-stream downloads (not
        # timed) until the tick rounding of the CPU total is below 2 % (at most 8 more)
        extra = 0
        while meter.stop().error_bound > 0.02 * meter.total and extra < args.max_extra_downloads:
            await bulk(net.socks_port, http_port, args.bulk_bytes)
            extra += 1
        r["bulk_cpu"] = _cpu_summary([meter.stop()], (runs + extra) * args.bulk_bytes)
        log(f"  {net.name} single stream: {r['bulk_cpu']['cpu_per_100mb']:.2f} CPU-s per 100 MB over "
            f"{r['bulk_cpu']['n_procs']} processes ({r['bulk_cpu']['cpu_s']:.1f} CPU-s measured, rounding "
            f"<= {100 * r['bulk_cpu']['cpu_err_s'] / max(r['bulk_cpu']['cpu_s'], 1e-9):.1f} %); "
            f"client {r['bulk_cpu']['client_cpu_per_100mb']:.2f}")
        r["bulk_mbps"] = statistics.median(vals)
        r["bulk_runs"] = vals
        mids = [h["middle"]["cells_per_cpu_s"] for h in relay_rates if "middle" in h]
        r["relay_cells_per_cpu_s"] = statistics.median(mids) if mids else float("nan")
        for role in ("guard", "exit"):
            xs = [h[role]["cells_per_cpu_s"] for h in relay_rates if role in h]
            r[f"{role}_cells_per_cpu_s"] = statistics.median(xs) if xs else float("nan")
        r["client_cells_per_cpu_s"] = statistics.median(client_rates)
        r["hops_detail"] = relay_rates

    if "ttfb" not in skip:
        xs = await ttfb(net.socks_port, http_port, args.samples)
        r["ttfb"] = xs
        r["ttfb_p50_ms"], r["ttfb_p99_ms"] = pct(xs, 50) * 1e3, pct(xs, 99) * 1e3
        ys = await echo_rtt(net.socks_port, http_port, args.samples)
        r["rtt"] = ys
        r["rtt_p50_ms"], r["rtt_p99_ms"] = pct(ys, 50) * 1e3, pct(ys, 99) * 1e3
        log(f"  {net.name} TTFB p50 {r['ttfb_p50_ms']:.2f} ms p99 {r['ttfb_p99_ms']:.2f} ms; "
            f"echo RTT p50 {r['rtt_p50_ms']:.2f} ms")

    if "build" not in skip:
        xs = await asyncio.to_thread(build_times, net, args.build_samples)
        r["build"] = xs
        r["build_p50_ms"], r["build_p99_ms"] = pct(xs, 50) * 1e3, pct(xs, 99) * 1e3
        log(f"  {net.name} build p50 {r['build_p50_ms']:.1f} ms p99 {r['build_p99_ms']:.1f} ms "
            f"({len(xs)} built)")

    if "aggregate" not in skip:
        for isolated, key in ((False, "aggregate"), (True, "isolated")):
            agg, detail = {}, {}
            for n in args.concurrency:
                runs_n = [await aggregate(net, http_port, n, args.agg_seconds, isolated=isolated,
                                          tag=f"{n}r{k}") for k in range(runs)]
                agg[n] = statistics.median(x["mbps"] for x in runs_n)
                detail[n] = {"runs": runs_n, **_cpu_summary_agg(runs_n)}
                d = detail[n]
                log(f"  {net.name} {n} streams, {'isolated circuits' if isolated else 'one circuit'}: "
                    f"{agg[n]:.1f} MB/s (runs {', '.join('%.1f' % x['mbps'] for x in runs_n)}); "
                    f"{d['cpu_per_100mb']:.2f} CPU-s per 100 MB ({d['cpu_s']:.1f} CPU-s measured, rounding "
                    f"<= {100 * d['cpu_err_s'] / max(d['cpu_s'], 1e-9):.1f} %), client {d['client_cpu_per_100mb']:.2f}")
            r[f"{key}_mbps"] = agg
            r[f"{key}_detail"] = detail

    return r


async def perf_profile(net: Network, http_port: int, nbytes: int, workdir: Path) -> dict:
    """CPU time by shared object (``perf record -e cpu-clock``) of the client, guard, middle
    and exit during one single-stream download. Needs ``perf`` (Debian: linux-perf)."""
    if shutil.which("perf") is None:
        log("  perf not installed: no profile (apt-get install linux-perf)")
        return {}
    procs: list[tuple[str, Path, subprocess.Popen]] = []

    async def start():
        path = await asyncio.to_thread(stream_circuit_path, net)
        pids = {"client": net.client_pid}
        pids.update({role: net.relay_pids[fp] for role, fp in zip(("guard", "middle", "exit"), path)})
        for role, pid in pids.items():
            out = workdir / f"perf-{net.name}-{role}.data"
            procs.append((role, out, subprocess.Popen(
                ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1000", "-o", str(out), "-p", str(pid),
                 "--", "sleep", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))

    await bulk(net.socks_port, http_port, nbytes, on_connected=start)
    split = {}
    for role, out, p in procs:
        await asyncio.to_thread(p.wait)
        rep = subprocess.run(["perf", "report", "-i", str(out), "--sort", "dso", "--stdio", "-q"],
                             capture_output=True, text=True).stdout
        rows = []
        for line in rep.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith("%"):
                rows.append((float(parts[0][:-1]), parts[1]))
        split[role] = rows[:6]
        log(f"  {net.name} {role}: " + ", ".join(f"{dso} {p:.0f}%" for p, dso in rows[:6]))
    return split


async def circuit_memory_both(nets: dict, workdir: Path, n: int) -> dict:
    out = {}
    if "onionp2p" in nets:
        p, info = dedicated_onion_relay(workdir)
        try:
            out["onionp2p"] = await circuit_memory(p.pid, info, n)
        finally:
            p.terminate()
            p.wait(10)
    if "tor" in nets:
        from onionp2p.dir.tordir import fetch_tor_directory

        net: TorNetwork = nets["tor"]
        statuses = await fetch_tor_directory(net.net.dirauth_lines())
        relay = next(s for s in statuses if "Authority" not in s.flags and "Exit" not in s.flags)
        pid = net.relay_pids[relay.fingerprint]
        out["tor"] = await circuit_memory(pid, relay.info, n)
    for k, v in out.items():
        log(f"  {k} RSS per idle circuit: {v / 1024:.2f} KiB")
    return out


# --------------------------------------------------------------------------------------------
# Report

def _fmt(v, unit="") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}{unit}"
        if abs(v) >= 100:
            return f"{v:.0f}{unit}"
        return f"{v:.2f}{unit}" if abs(v) < 10 else f"{v:.1f}{unit}"
    return f"{v}{unit}"


def report(res: dict, args) -> str:
    o, t = res.get("onionp2p", {}), res.get("tor", {})
    rows = []

    def row(label, key, higher_better=True, scale=1.0, getter=None, note=None):
        """``note(d)``: extra text after the value (e.g. the CPU total it came from)."""
        a = getter(o) if getter else o.get(key)
        b = getter(t) if getter else t.get(key)
        a = a * scale if isinstance(a, (int, float)) else None
        b = b * scale if isinstance(b, (int, float)) else None
        ratio = a / b if a is not None and b else None
        na = f" {note(o)}".rstrip() if note and a is not None else ""
        nb = f" {note(t)}".rstrip() if note and b is not None else ""
        rows.append(f"| {label} | {_fmt(a)}{na} | {_fmt(b)}{nb} | {_fmt(ratio, 'x') if ratio else '—'} |"
                    f" {'higher' if higher_better else 'lower'} is better |")

    def cpu_rows(label, get):
        """CPU-s per 100 MB over all processes (with the CPU total measured and its rounding
        bound) and the client's share, for the measurement ``get(d)`` returns."""
        def note(d):
            x = get(d) or {}
            if not x.get("cpu_s"):
                return ""
            return f"({x['cpu_s']:.1f} CPU-s, ±{100 * x['cpu_err_s'] / x['cpu_s']:.1f} %)"
        row(f"{label}: CPU-s per 100 MB, all processes", None, False,
            getter=lambda d: (get(d) or {}).get("cpu_per_100mb"), note=note)
        row(f"{label}: CPU-s per 100 MB, client alone", None, False,
            getter=lambda d: (get(d) or {}).get("client_cpu_per_100mb"))

    head = ["Modes:", ""]
    for name, d in (("onionp2p", o), ("tor", t)):
        if d.get("mode"):
            head.append(f"* **{name}**: {d['mode']}")
    procs = ", ".join(f"{name} {d['bulk_cpu']['n_procs']}" for name, d in (("onionp2p", o), ("tor", t))
                      if d.get("bulk_cpu"))
    head += ["", f"Processes per network counted for CPU: {procs or '—'} (client, relays, authorities). "
             f"Throughput: median of {args.runs} run(s); CPU per 100 MB: all runs' CPU over all their bytes; "
             f"(x CPU-s, ±y %) = the CPU total measured and its worst-case tick rounding.", ""]
    rows.append("| metric | onionp2p | tor | ratio (onionp2p/tor) | |")
    rows.append("|---|---:|---:|---:|---|")
    row(f"single stream, 3 hops, {args.bulk_bytes // MB} MB (MB/s)", "bulk_mbps")
    cpu_rows("single stream", lambda d: d.get("bulk_cpu"))
    row("TTFB, new stream on a built circuit, p50 (ms)", "ttfb_p50_ms", False)
    row("TTFB p99 (ms)", "ttfb_p99_ms", False)
    row("echo RTT on an open stream, p50 (ms)", "rtt_p50_ms", False)
    row("3-hop circuit build (EXTENDCIRCUIT), p50 (ms)", "build_p50_ms", False)
    row("circuit build p99 (ms)", "build_p99_ms", False)
    def opened(key, n):
        """"(k of n open)" when streams of a row failed to open in some run."""
        def note(d):
            runs = d.get(f"{key}_detail", {}).get(n, {}).get("runs", [])
            least = min((x.get("open", n) for x in runs), default=n)
            return f"({least} of {n} open)" if least < n else ""
        return note

    for key, what in (("aggregate", "one circuit"), ("isolated", "isolated circuits")):
        for n in args.concurrency:
            row(f"aggregate, {n} streams, {what} (MB/s)", None,
                getter=lambda d, n=n, key=key: d.get(f"{key}_mbps", {}).get(n), note=opened(key, n))
    for key, what in (("aggregate", "one circuit"), ("isolated", "isolated circuits")):
        for n in args.concurrency:
            cpu_rows(f"{n} streams, {what}", lambda d, n=n, key=key: d.get(f"{key}_detail", {}).get(n))
    row("one relay at full load: cells forwarded per second (tools/bench_relay.py)",
        "relay_full_load_cells_per_s")
    row("  its CPU utilisation (%)", "relay_full_load_cpu", scale=100.0)
    row("middle relay: cells forwarded per CPU-second", "relay_cells_per_cpu_s")
    row("guard relay: cells per CPU-second", "guard_cells_per_cpu_s")
    row("exit relay: cells per CPU-second", "exit_cells_per_cpu_s")
    row("client: cells per CPU-second", "client_cells_per_cpu_s")
    row("RSS per idle circuit at a relay (KiB)", "circ_rss", False, 1 / 1024)
    row("RSS per open stream, client (KiB)", "stream_rss_client", False, 1 / 1024)
    row("RSS per open stream, relays (KiB)", "stream_rss_relays", False, 1 / 1024)
    c = res.get("ceilings", {})
    lines = ["\n".join(head + rows), "", "Ceilings of this machine:", "",
             "| ceiling | value |", "|---|---:|"]
    for k, label in (("direct_mbps", "direct loopback TCP transfer, no proxy (MB/s)"),
                     ("tls_mbps", "one asyncio TLS connection over loopback (MB/s)"),
                     ("aes_bulk_mbps", "AES-128-CTR, 1 MiB buffers (MB/s)"),
                     ("aes_cell_mbps", "AES-128-CTR, one 509-byte cell per call (MB/s)"),
                     ("aes_cell_us", "AES-128-CTR per 509-byte call (µs)")):
        if k in c:
            lines.append(f"| {label} | {_fmt(c[k])} |")
    return "\n".join(lines)


def plots(res: dict, args, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for name, color in (("onionp2p", "tab:blue"), ("tor", "tab:orange")):
        d = res.get(name, {})
        for key, what, style in (("aggregate", "one circuit", "o-"), ("isolated", "isolated circuits", "s--")):
            agg = d.get(f"{key}_mbps", {})
            pts = sorted(((1, d.get("bulk_mbps")), *((int(k), v) for k, v in agg.items())))
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                top = max(top, *(y for _, y in pts))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"{name}, {what}")
    ax.set_xlim(0, max(args.concurrency) * 1.05)
    ax.set_ylim(0, top * 1.15 or 1)
    ax.set_xticks([1, *args.concurrency])
    ax.set_xlabel("concurrent streams (1 = the single-stream row)")
    ax.set_ylabel("aggregate throughput (MB/s)")
    ax.set_title(f"Throughput vs concurrency, 3 hops, loopback\n(each point: median of {args.runs} run(s); "
                 f"aggregate windows ≥ {args.agg_seconds:g} s)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "throughput_vs_concurrency.png"
    fig.savefig(p, dpi=110)
    made.append(p)
    plt.close(fig)

    # CPU-seconds per 100 MB, all processes of each network, per workload
    labels, series = [], {"onionp2p": [], "tor": []}
    work = [("single stream", lambda d: d.get("bulk_cpu"))]
    for key, what in (("aggregate", "1 circ"), ("isolated", "isolated")):
        for n in args.concurrency:
            work.append((f"{n} {what}", lambda d, n=n, key=key: d.get(f"{key}_detail", {}).get(n)))
    for label, get in work:
        labels.append(label)
        for name in series:
            x = get(res.get(name, {})) or {}
            series[name].append(x.get("cpu_per_100mb", float("nan")))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.4
    for k, (name, ys) in enumerate(series.items()):
        ax.bar([i + (k - 0.5) * w for i in range(len(labels))], ys, w, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("CPU-seconds per 100 MB (all processes)")
    ax.set_title(f"CPU per byte, summed over every process of each network\n(all {args.runs} run(s) of "
                 f"each row together)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "cpu_per_100mb.png"
    fig.savefig(p, dpi=110)
    made.append(p)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttfb", "time to first byte (new stream)"),
                           (axes[1], "build", "3-hop circuit build")):
        for name, style in (("onionp2p", "-"), ("tor", "--")):
            xs = sorted(res.get(name, {}).get(key, []))
            if xs:
                ax.plot([x * 1e3 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))], style,
                        label=f"{name} (n = {len(xs)})")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("ms")
        ax.set_ylabel("CDF")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    p = out / "latency_cdf.png"
    fig.savefig(p, dpi=110)
    made.append(p)
    plt.close(fig)
    return made


# --------------------------------------------------------------------------------------------

async def amain(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="onionp2p-bench-"))
    log(f"work directory {workdir}")
    http = HttpServerProc(workdir)
    nets: dict[str, Network] = {}
    res: dict = {"config": {k: v for k, v in vars(args).items()}}
    try:
        which = ["onionp2p", "tor"] if args.only is None else [args.only]
        if "tor" in which and shutil.which("tor") is None:
            log("tor is not installed: tor columns stay empty (apt-get install tor)")
            which.remove("tor")
        # Start both networks (in the same run), then measure one at a time.
        if "onionp2p" in which:
            t0 = time.monotonic()
            onet = OnionNet(workdir, args.relays, args.exits, cgo=not args.no_cgo,
                            congestion_control=args.onion_cc == "vegas", event_loop=args.onion_loop)
            nets["onionp2p"] = onet
            onet.start()
            log(f"onionp2p testnet ready in {time.monotonic() - t0:.0f} s (SOCKS {onet.socks_port})")
        if "tor" in which:
            t0 = time.monotonic()
            tor_client = [*args.tor_option, f"ConfluxEnabled {args.tor_conflux}"]
            tnet = TorNetwork(workdir, args.relays, args.exits, tor_client,
                              consensus_params={"cc_alg": {"vegas": 2, "fixed": 0}[args.tor_cc],
                                                "cfx_enabled": args.tor_conflux},
                              exclude_authorities=not args.tor_authorities_in_paths)
            nets["tor"] = tnet
            await asyncio.to_thread(tnet.start)
            log(f"tor network ready in {time.monotonic() - t0:.0f} s (SOCKS {tnet.socks_port})")
        if "ceilings" not in args.skip:
            c = aes_ctr_speed()
            direct = [(await bulk(None, http.port, args.bulk_bytes, direct=True))["mbps"]
                      for _ in range(args.runs)]
            c["direct_mbps"] = statistics.median(direct)
            c["tls_mbps"] = await tls_loopback_speed(workdir, args.bulk_bytes)
            res["ceilings"] = c
            log(f"ceilings: {c}")
        for name, net in nets.items():
            log(f"measuring {name}")
            res[name] = await measure_network(net, http.port, args, workdir)
        if "circmem" not in args.skip:
            for k, v in (await circuit_memory_both(nets, workdir, args.circuits)).items():
                res[k]["circ_rss"] = v
        if args.profile:
            for name, net in nets.items():
                log(f"profiling {name} (perf, CPU time by shared object)")
                res[name]["perf_dso"] = await perf_profile(net, http.port, max(args.bulk_bytes, 100 * MB),
                                                           workdir)
    finally:
        for net in nets.values():
            try:
                net.stop()
            except Exception as exc:
                log(f"stopping {net.name}: {exc!r}")
        http.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if "relayload" not in args.skip and "onionp2p" in res:
        log("one relay process at full load (tools/bench_relay.py)")
        spec = importlib.util.spec_from_file_location("bench_relay", Path(__file__).with_name("bench_relay.py"))
        bench_relay = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_relay)
        full = await bench_relay.measure(300_000 if args.quick else 1_000_000, 4, args.runs)
        res["onionp2p"]["relay_full_load"] = full
        res["onionp2p"]["relay_full_load_cells_per_s"] = full["median"]["cells_per_s"]
        res["onionp2p"]["relay_full_load_cpu"] = full["median"]["relay_cpu_util"]
    table = report(res, args)
    print(table)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "results.md").write_text(table + "\n")
    for p in plots(res, args, out):
        log(f"wrote {p}")
    return 0


def rereport(path: Path) -> int:
    """Write results.md and the plots again from a results.json (its directory)."""
    res = json.loads(path.read_text())
    for name in ("onionp2p", "tor"):
        d = res.get(name, {})
        for key in ("aggregate_mbps", "isolated_mbps", "aggregate_detail", "isolated_detail"):
            if key in d:
                d[key] = {int(k): v for k, v in d[key].items()}
    args = argparse.Namespace(**res["config"])
    table = report(res, args)
    print(table)
    (path.parent / "results.md").write_text(table + "\n")
    for p in plots(res, args, path.parent):
        log(f"wrote {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--report":
        return rereport(Path(argv[1]))
    if argv and argv[0] == "_http":
        http_server_main(argv[1])
        return 0
    if argv and argv[0] == "_tls":
        tls_server_main(argv[1], argv[2], argv[3])
        return 0
    ap = argparse.ArgumentParser(prog="tools/bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 run, less data, fewer samples")
    ap.add_argument("--report", metavar="RESULTS_JSON",
                    help="only write results.md and the plots again from a results.json (first argument)")
    ap.add_argument("--runs", type=int, default=None, help="runs per throughput figure (median)")
    ap.add_argument("--relays", type=int, default=5)
    ap.add_argument("--exits", type=int, default=2)
    ap.add_argument("--only", choices=("onionp2p", "tor"))
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=("bulk", "ttfb", "build", "aggregate", "streammem", "circmem", "ceilings",
                             "relayload"))
    ap.add_argument("--out", default=str(ROOT / "build" / "bench"),
                    help="output directory (default build/bench, ignored by git)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--uvloop", action="store_true", help="run the load generator on uvloop")
    ap.add_argument("--profile", action="store_true",
                    help="also record one download with perf: CPU share by shared object per process")
    ap.add_argument("--no-cgo", action="store_true",
                    help="onionp2p's client uses tor1 relay crypto on every hop (default: CGO where offered)")
    ap.add_argument("--onion-cc", choices=("vegas", "fixed"), default="vegas",
                    help="onionp2p client's flow control (default vegas; fixed = congestion_control = false, "
                         "which also means tor1 relay crypto)")
    ap.add_argument("--onion-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="event loop of every onionp2p process (ONIONP2P_EVENT_LOOP; default auto, onionp2p's "
                         "default: uvloop when installed, else asyncio)")
    ap.add_argument("--tor-cc", choices=("vegas", "fixed"), default="vegas",
                    help="tor's congestion control, pinned by the consensus parameter cc_alg on the tor "
                         "authorities (vegas = 2, fixed = 0; default vegas)")
    ap.add_argument("--tor-conflux", type=int, choices=(0, 1), default=0,
                    help="tor's conflux: consensus parameter cfx_enabled and the client's ConfluxEnabled "
                         "(default 0: one circuit per stream, as onionp2p has no conflux)")
    ap.add_argument("--tor-authorities-in-paths", action="store_true",
                    help="let tor's client use the 3 authorities as relays (default: ExcludeNodes them, "
                         "as onionp2p's authority is not a relay)")
    ap.add_argument("--tor-option", action="append", default=[], metavar="LINE",
                    help="a torrc line for the tor relays and client (repeatable), e.g. 'Schedulers Vanilla'")
    args = ap.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    args.bulk_bytes = 20 * MB if args.quick else 100 * MB
    args.samples = 50 if args.quick else 100
    # onionp2p relays refuse a client's CREATE2 beyond a burst of 90 (dos_circuit_creation_*,
    # like tor's DoSCircuitCreationBurst); 60 builds stay within it after the bucket refilled.
    args.build_samples = 50 if args.quick else 60
    args.concurrency = [8, 32, 128]
    # single stream: at most this many more (untimed) downloads to get the CPU total's tick
    # rounding below 2 %
    args.max_extra_downloads = 8
    args.agg_seconds = 3.0 if args.quick else 8.0
    args.circuits = 2000 if args.quick else 10000
    args.streams_mem = 100 if args.quick else 400
    try:
        if args.uvloop:
            import uvloop  # optional

            return uvloop.run(amain(args))
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        # amain's finally has stopped both networks and removed the work directory by now
        # (asyncio.run cancels the main task on SIGINT); no traceback for a Ctrl-C
        log("interrupted: networks stopped, no results written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
