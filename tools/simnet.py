#!/usr/bin/env python3
"""onionp2p and tor side by side on an emulated wide-area network (issue #16; specs/performance.md).

Theory of operation
-------------------
Each network (first onionp2p, then tor, never both at once: they would share the two
cores) is built on its own :class:`onionp2p.ops.simnet.Simnet`: every authority, relay,
client and the web server is a real process in its own network namespace with its own
address in 10.77.0.0/16, and the user-space router between the namespaces gives

* every (source, destination) pair a one-way delay from :func:`onionp2p.ops.simnet.wan_delays`
  (relay-to-relay round trips of 10-150 ms, regions weighted like Tor's relays), seeded
  with ``--seed``, so both networks get the **same** matrix: node k of one network sits
  where node k of the other does (authorities, then exits, then relays, then clients,
  then the web server, in the same order and with the same names);
* every relay an access link capped both ways by a token bucket, its rate drawn
  log-uniformly from ``--relay-bw`` (MB/s, seeded, same for both networks); clients get
  ``--client-bw``; the web server is not capped;
* optional loss (``--loss``, on every pair).

Both networks use 3 directory authorities that also relay (tor's always do; onionp2p's
``run_relay``), ``--relays`` relays of which ``--exits`` are exits, and ``--clients``
clients; relays bind and advertise their namespace address (tor: ``Address``/``ORPort``
on it, ``TestingTorNetwork 1``; onionp2p: ``or_address``). Modes: onionp2p's defaults
(congestion control, Vegas, with every exit; CGO relay crypto where offered; no conflux:
onionp2p has none) or ``--no-cgo`` (tor1); tor's defaults pinned explicitly
(``ConsensusParams cc_alg=2``: Vegas) with ``ConfluxEnabled 0`` on its clients (one
circuit per stream, like onionp2p) unless ``--tor-conflux``.

Measurements follow onionperf/tornettools: each client runs an agent (``simnet.py _perf``
in its namespace) that downloads 50 KiB, 1 MiB and 5 MiB in turn from the web server
through its SOCKS port, each download with a SOCKS username of its own (so on a circuit
of its own, tor's IsolateSOCKSAuth and onionp2p's equivalent), recording time to first
byte (from the start of the SOCKS connection to the first byte of the body) and time to
last byte, and errors (a download that fails or exceeds its timeout: 30/60/120 s); the
agent also listens for CIRC events on the client's control port and records each
circuit's build time (LAUNCHED to BUILT), path and failures; the build-time rows count
3-hop circuits only, as onionperf does (one-hop directory circuits build in one round
trip and would flatter whichever client makes more of them). Relay goodput is what the relays'
TUN devices sent, per 2-second interval, summed over relays (IP bytes, read from the
router's counters), the emulator-side equivalent of tornettools' BW-event sum. CPU
seconds of every process of a network are read from /proc at the end.

The output is a side-by-side table (medians, with onionp2p/tor ratios), JSON with every
sample in the work directory, and CDF plots ``docs/bench/simnet_*.png`` (``--plots``).

Usage::

    tools/simnet --validate            # the emulator alone (ping/TCP RTT, ceiling, cap, loss, CPU)
    tools/simnet --quick               # 10 relays, 3 clients, 120 s per network (< 10 min)
    tools/simnet                       # 20 relays, 5 clients, 300 s per network
    tools/simnet --relays 50 --clients 10 --duration 600

Needs root, ``ip``, ``/dev/net/tun``, ``curl``, ``tor`` and ``tor-gencert``. Ctrl-C stops
everything and deletes the namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from onionp2p.ops.simnet import Simnet, SimnetError, run_cleanly, validate, wan_delays  # noqa: E402

SIZES = {"50KiB": 50 * 1024, "1MiB": 1024 * 1024, "5MiB": 5 * 1024 * 1024}
TIMEOUTS = {"50KiB": 30.0, "1MiB": 60.0, "5MiB": 120.0}
WEB_PORT = 80
SOCKS_PORT = 9050
CONTROL_PORT = 9051
OR_PORT = 9001
DIR_PORT = 7000
N_AUTH = 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the plan: names, delays and caps shared by both networks ---------------------------------------


@dataclass
class Plan:
    relays: int
    exits: int
    clients: int
    duration: float
    seed: int
    relay_bw: tuple[float, float]  # MB/s
    client_bw: float
    loss: float
    cgo: bool
    tor_conflux: bool
    realtime: bool
    names: list[str] = field(default_factory=list)
    caps: dict[str, float] = field(default_factory=dict)  # bytes/s both ways

    def __post_init__(self) -> None:
        self.names = [f"auth{i}" for i in range(N_AUTH)]
        self.names += [f"exit{i}" if i < self.exits else f"relay{i}" for i in range(self.relays)]
        self.names += [f"client{i}" for i in range(self.clients)] + ["web"]
        rng = random.Random(self.seed ^ 0x5EED)
        lo, hi = self.relay_bw
        for name in self.names:
            if name.startswith(("auth", "exit", "relay")):
                self.caps[name] = math.exp(rng.uniform(math.log(lo), math.log(hi))) * 1e6
            elif name.startswith("client"):
                self.caps[name] = self.client_bw * 1e6

    def simnet(self, workdir: Path) -> Simnet:
        delays, regions = wan_delays(len(self.names), self.seed)
        net = Simnet(delay=lambda i, j: delays[i][j], loss=lambda i, j: self.loss, seed=self.seed,
                     workdir=workdir, realtime=self.realtime)
        for k, name in enumerate(self.names):
            cap = self.caps.get(name, 0.0)
            net.add(name, up_rate=cap, down_rate=cap, region=regions[k])
        return net


def _fetch(net: Simnet, name: str, url: str, timeout: float = 8) -> str | None:
    """GET ``url`` from inside node ``name``'s namespace (curl), None on any failure."""
    try:
        p = net.run(name, ["curl", "-sf", "--max-time", str(timeout), url], timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return None
    return p.stdout if p.returncode == 0 else None


def _wait(pred, timeout: float, what: str, procs: list[subprocess.Popen], interval: float = 1.0):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise SimnetError(f"{what}: a process exited: {dead[0]}")
        if time.monotonic() > end:
            raise SimnetError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)


def _tail(path: Path, n: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- onionp2p ---------------------------------------------------------------------------------------


def _toml(d: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())


def start_onionp2p(plan: Plan, net: Simnet, wd: Path) -> list[subprocess.Popen]:
    """Authorities, relays and clients of an onionp2p network in the namespaces; returns the clients."""
    from onionp2p.dir.authority import authority_line, load_or_create_authority_key

    py = [sys.executable, "-m", "onionp2p"]
    lines = []
    for i in range(N_AUTH):
        d = wd / f"auth{i}"
        d.mkdir(parents=True, mode=0o700)
        lines.append(authority_line(f"auth{i}", net.node(f"auth{i}").ip, DIR_PORT,
                                    load_or_create_authority_key(d)))
    procs = []
    for i in range(N_AUTH):
        name, d = f"auth{i}", wd / f"auth{i}"
        ip = net.node(name).ip
        (d / "authority.toml").write_text(_toml({
            "nickname": name, "data_dir": str(d), "dir_address": f"{ip}:{DIR_PORT}",
            "or_address": f"{ip}:{OR_PORT}", "run_relay": True, "extend_allow_private": True,
            "authorities": lines, "voting_interval": 10, "assume_guard": True, "assume_exit": True,
            "stable_uptime": 0, "guard_uptime": 0, "log_level": "notice"}))
        procs.append(net.spawn(name, [*py, "authority", "--config", str(d / "authority.toml")],
                               d / "log.txt"))
    relays = [n for n in plan.names if n.startswith(("exit", "relay"))]
    for name in relays:
        d = wd / name
        d.mkdir(parents=True, mode=0o700)
        exit_ = name.startswith("exit")
        (d / "relay.toml").write_text(_toml({
            "nickname": name, "data_dir": str(d), "or_address": f"{net.node(name).ip}:{OR_PORT}",
            "exit_policy": "accept *:*" if exit_ else "reject *:*", "exit_reject_private": not exit_,
            "extend_allow_private": True, "authorities": lines, "log_level": "notice",
            "dos_max_concurrent_connections": 0, "dos_circuit_creation_rate": 0,
            "dos_circuit_creation_burst": 0}))
        procs.append(net.spawn(name, [*py, "relay", "--config", str(d / "relay.toml")], d / "log.txt"))

    def consensus_ready() -> bool:
        url = f"http://{net.node('auth0').ip}:{DIR_PORT}/tor/status-vote/current/consensus"
        text = _fetch(net, "auth0", url)
        if not text:
            return False
        running = set()
        nick = None
        for line in text.splitlines():
            if line.startswith("r "):
                nick = line.split()[1]
            elif line.startswith("s ") and nick and "Running" in line.split():
                running.add(nick)
        return set(relays) <= running

    _wait(consensus_ready, 180, "an onionp2p consensus listing every relay", procs, interval=2)
    clients = []
    for name in (n for n in plan.names if n.startswith("client")):
        d = wd / name
        d.mkdir(parents=True, mode=0o700)
        (d / "client.toml").write_text(_toml({
            "data_dir": str(d), "socks_address": f"127.0.0.1:{SOCKS_PORT}", "control_port": CONTROL_PORT,
            "authorities": lines, "enforce_distinct_subnets": False,
            "client_reject_internal_addresses": False, "log_level": "notice",
            "congestion_control": True, "cgo": plan.cgo}))
        clients.append(net.spawn(name, [*py, "client", "--config", str(d / "client.toml")], d / "log.txt"))
    for name, p in zip([n for n in plan.names if n.startswith("client")], clients):
        _wait(lambda name=name: "SOCKS5 proxy ready" in (wd / name / "log.txt").read_text(errors="replace"),
              180, f"onionp2p {name} bootstrap", procs + clients)
    return procs + clients


# -- tor --------------------------------------------------------------------------------------------


def start_tor(plan: Plan, net: Simnet, wd: Path):
    """A tools/tornet.py network with every node in its namespace, plus tor clients; returns
    (TorNet, client processes)."""
    from tornet import TorNet

    tn = TorNet(directory=wd / "tornet", n_authorities=N_AUTH,
                address_of=lambda node: net.node(node.name).ip,
                launcher=lambda node: net.argv(node.name, []),
                fetch=lambda node, path: _fetch(net, node.name,
                                                f"http://{node.address}:{node.dir_port}{path}"),
                extra_authority_options=["ConsensusParams cc_alg=2"])
    tn.start(n_relays=plan.relays, n_exits=plan.exits, timeout=240)
    clients = []
    for name in (n for n in plan.names if n.startswith("client")):
        d = wd / name
        d.mkdir(parents=True, mode=0o700)
        (d / "torrc-defaults").write_text("")
        (d / "torrc").write_text("\n".join([
            "TestingTorNetwork 1", f"DataDirectory {d}", "RunAsDaemon 0", f"SocksPort 127.0.0.1:{SOCKS_PORT}",
            f"ControlPort 127.0.0.1:{CONTROL_PORT}", "CookieAuthentication 1",
            f"Log notice file {d}/notice.log",
            "ShutdownWaitLength 0", f"ConfluxEnabled {1 if plan.tor_conflux else 0}",
            f"__OwningControllerProcess {os.getpid()}", *tn.dirauth_lines()]) + "\n")
        argv = ["tor", "--defaults-torrc", str(d / "torrc-defaults"), "-f", str(d / "torrc")]
        clients.append(net.spawn(name, argv, d / "stdout.log"))
    for name in (n for n in plan.names if n.startswith("client")):
        _wait(lambda name=name: "Bootstrapped 100%" in _tail(wd / name / "notice.log", 50), 180,
              f"tor {name} bootstrap", clients)
    return tn, clients


# -- the measurement --------------------------------------------------------------------------------


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(plan: Plan, net: Simnet, wd: Path, pids: list[tuple[str, int]]) -> dict:
    """Run the agents for ``plan.duration`` seconds; sample relay goodput; collect everything."""
    web = net.node("web").ip
    agents = []
    for name in (n for n in plan.names if n.startswith("client")):
        cookie = wd / name / "control_auth_cookie"
        agents.append(net.spawn(name, [sys.executable, str(Path(__file__).resolve()), "_perf",
                                       "--web", f"{web}:{WEB_PORT}", "--duration", str(plan.duration),
                                       "--out", str(wd / name / "perf.jsonl"), "--name", name,
                                       "--cookie-hint", str(cookie)], wd / name / "perf.log"))
    relays = [net.node(n).index for n in plan.names if n.startswith(("auth", "exit", "relay"))]
    goodput: list[float] = []
    cpu0 = {pid: _cpu_of(pid) for _, pid in pids}
    router0 = net.stats()
    prev, t_prev = router0, time.monotonic()
    while any(a.poll() is None for a in agents):
        time.sleep(2)
        cur, t = net.stats(), time.monotonic()
        if cur and prev:
            sent = sum(cur["tx_bytes"][k] - prev["tx_bytes"][k] for k in relays)
            goodput.append(sent / (t - t_prev) / 1e6)
        prev, t_prev = cur, t
    by_role: dict[str, float] = {}
    for name, pid in pids:
        role = name.rstrip("0123456789")
        by_role[role] = by_role.get(role, 0.0) + _cpu_of(pid) - cpu0.get(pid, 0.0)
    cpu = sum(by_role.values())
    router1 = net.stats()
    transfers, circuits = [], []
    for name in (n for n in plan.names if n.startswith("client")):
        path = wd / name / "perf.jsonl"
        for line in (path.read_text().splitlines() if path.exists() else []):
            rec = json.loads(line)
            (transfers if rec["kind"] == "transfer" else circuits).append(rec)
    return {"transfers": transfers, "circuits": circuits, "goodput_MBps": goodput, "cpu_s": cpu,
            "cpu_s_by_role": by_role,
            "router_cpu_s": router1.get("cpu_s", 0) - router0.get("cpu_s", 0),
            "drops": router1.get("drops", {}), "duration": plan.duration}


# -- the agent (runs in a client namespace) ---------------------------------------------------------


async def _control(out, name: str, cookie_hint: str, stop: asyncio.Event) -> None:
    """CIRC events from the client's control port: build time of each circuit, failures."""
    reader, writer = await asyncio.open_connection("127.0.0.1", CONTROL_PORT)

    async def command(line: str) -> list[str]:
        writer.write(line.encode() + b"\r\n")
        await writer.drain()
        lines = []
        while True:
            ln = (await reader.readline()).decode(errors="replace").rstrip("\r\n")
            lines.append(ln)
            if len(ln) >= 4 and ln[3] == " ":
                return lines

    info = " ".join(await command("PROTOCOLINFO 1"))
    auth = "AUTHENTICATE"
    if "COOKIE" in info:
        path = info.split('COOKIEFILE="', 1)[1].split('"', 1)[0] if 'COOKIEFILE="' in info else cookie_hint
        auth += " " + Path(path).read_bytes().hex()
    if not (await command(auth))[-1].startswith("250"):
        raise SystemExit("control port authentication failed")
    await command("SETEVENTS CIRC")
    launched: dict[str, float] = {}
    while not stop.is_set():
        ln = (await reader.readline()).decode(errors="replace").rstrip("\r\n")
        if not ln:
            return
        parts = ln.split()
        if len(parts) < 4 or parts[0] != "650" or parts[1] != "CIRC":
            continue
        t = time.monotonic()
        cid, status = parts[2], parts[3]
        if status == "LAUNCHED":
            launched[cid] = t
        elif status == "BUILT" and cid in launched:
            path = [hop.split("~")[-1] for hop in parts[4].split(",")] if len(parts) > 4 else []
            out({"kind": "circuit", "client": name, "build_s": t - launched.pop(cid), "ok": True,
                 "path": path, "t": time.time()})
        elif status == "FAILED" and cid in launched:
            launched.pop(cid)
            out({"kind": "circuit", "client": name, "ok": False, "reason": " ".join(parts[4:])[:80]})


async def _transfer(web: tuple[str, int], size: int, user: str) -> tuple[float, float]:
    """One download through SOCKS5 (username/password auth = a circuit of its own); (ttfb, ttlb)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", SOCKS_PORT)
    try:
        writer.write(b"\x05\x01\x02")
        if await reader.readexactly(2) != b"\x05\x02":
            raise OSError("SOCKS: username auth refused")
        u = user.encode()
        writer.write(b"\x01" + bytes([len(u)]) + u + b"\x01x")
        if (await reader.readexactly(2))[1] != 0:
            raise OSError("SOCKS: auth failed")
        writer.write(b"\x05\x01\x00\x01" + socket.inet_aton(web[0]) + struct.pack("!H", web[1]))
        rep = await reader.readexactly(10)
        if rep[1] != 0:
            raise OSError(f"SOCKS reply {rep[1]}")
        writer.write(f"GET /{size} HTTP/1.0\r\nHost: web\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise OSError(f"HTTP: {head[:40]!r}")
        got = 0
        ttfb = None
        while got < size:
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise OSError(f"closed after {got} of {size} bytes")
            if ttfb is None:
                ttfb = time.monotonic() - t0
            got += len(chunk)
        return ttfb or 0.0, time.monotonic() - t0
    finally:
        writer.close()


async def _perf(args: argparse.Namespace) -> int:
    host, port = args.web.rsplit(":", 1)
    web = (host, int(port))
    f = open(args.out, "a", buffering=1)

    def out(rec: dict) -> None:
        f.write(json.dumps(rec) + "\n")

    stop = asyncio.Event()
    ctl = asyncio.create_task(_control(out, args.name, args.cookie_hint, stop))
    end = time.monotonic() + args.duration
    k = 0
    order = list(SIZES)
    while time.monotonic() < end:
        label = order[k % len(order)]
        k += 1
        rec = {"kind": "transfer", "client": args.name, "size": label, "t": time.time()}
        try:
            ttfb, ttlb = await asyncio.wait_for(_transfer(web, SIZES[label], f"{args.name}-{k}"),
                                                TIMEOUTS[label])
            rec.update(ok=True, ttfb_s=ttfb, ttlb_s=ttlb)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                asyncio.TimeoutError) as exc:
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:120])
        out(rec)
        await asyncio.sleep(0.5)
    stop.set()
    ctl.cancel()
    return 0


async def _web(args: argparse.Namespace) -> int:
    """The web server: ``GET /N`` answers N bytes."""
    body = memoryview(random.Random(1).randbytes(max(SIZES.values())))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            n = min(int(head.split(b" ", 2)[1].strip(b"/")), len(body))
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            for i in range(0, n, 1 << 16):
                writer.write(body[i:i + (1 << 16)])
                await writer.drain()
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, args.bind, args.port, backlog=256)
    print("web ready", flush=True)
    async with server:
        await server.serve_forever()
    return 0


# -- running one network ----------------------------------------------------------------------------


def run_network(kind: str, plan: Plan, root: Path) -> dict:
    wd = root / kind
    wd.mkdir(parents=True)
    net = plan.simnet(wd / "simnet")
    tn = None
    try:
        net.start()
        w = net.spawn("web", [sys.executable, str(Path(__file__).resolve()), "_web",
                              "--bind", net.node("web").ip, "--port", str(WEB_PORT)],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert w.stdout is not None
        if b"web ready" not in w.stdout.readline():
            raise SimnetError("the web server did not start")
        t0 = time.monotonic()
        log(f"{kind}: starting {N_AUTH} authorities, {plan.relays} relays, {plan.clients} clients")
        if kind == "onionp2p":
            procs = start_onionp2p(plan, net, wd)
            pids = [(p.args[3][len(net.prefix):], p.pid) for p in procs]  # ip netns exec NS ...
        else:
            tn, clients = start_tor(plan, net, wd)
            pids = [(n.name, n.pid) for n in tn.nodes]
            pids += [(p.args[3][len(net.prefix):], p.pid) for p in clients]
        boot = time.monotonic() - t0
        log(f"{kind}: ready after {boot:.0f} s; measuring for {plan.duration:.0f} s")
        res = measure(plan, net, wd, pids)
        res["bootstrap_s"] = boot
        # the emulated round trip of each built 3-hop circuit, client to exit, plus exit to web:
        # whether path selection, not the software, made one network's circuits slower
        delays, _ = wan_delays(len(plan.names), plan.seed)
        idx = {n: k for k, n in enumerate(plan.names)}
        for c in res["circuits"]:
            hops = [c["client"], *c.get("path", [])]
            if c["ok"] and len(hops) == 4 and all(h in idx for h in hops):
                one_way = sum(delays[idx[a]][idx[b]] for a, b in zip(hops, hops[1:]))
                c["path_rtt_s"] = 2 * (one_way + delays[idx[hops[-1]]][idx["web"]])
        (wd / "results.json").write_text(json.dumps(res))
        return res
    finally:
        if tn is not None:
            tn.stop(grace=5)
        net.close()


# -- the report -------------------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(res: dict) -> dict:
    tr = res["transfers"]
    ok = [t for t in tr if t["ok"]]
    # 3-hop circuits only (onionperf's): one-hop directory circuits (BEGIN_DIR) build in one round trip
    built = [c for c in res["circuits"] if c["ok"] and len(c.get("path", ())) == 3]
    out = {
        "circuit build p50 (s)": _pct([c["build_s"] for c in built], 0.5),
        "circuit build p90 (s)": _pct([c["build_s"] for c in built], 0.9),
        "TTFB p50, all sizes (s)": _pct([t["ttfb_s"] for t in ok], 0.5),
    }
    for label in SIZES:
        xs = [t["ttlb_s"] for t in ok if t["size"] == label]
        out[f"TTLB {label} p50 (s)"] = _pct(xs, 0.5)
        out[f"TTLB {label} p90 (s)"] = _pct(xs, 0.9)
    out["transfer error rate (%)"] = 100 * (1 - len(ok) / len(tr)) if tr else None
    circs = res["circuits"]
    failed = sum(1 for c in circs if not c["ok"])
    out["circuit failure rate (%)"] = 100 * failed / len(circs) if circs else None
    out["emulated circuit RTT p50 (s)"] = _pct([c["path_rtt_s"] for c in circs if "path_rtt_s" in c], 0.5)
    out["relay goodput p50 (MB/s)"] = _pct(res["goodput_MBps"], 0.5)
    out["transfers (ok/all)"] = f"{len(ok)}/{len(tr)}"
    out["3-hop circuits built"] = len(built)
    out["other circuits built"] = sum(1 for c in circs if c["ok"]) - len(built)
    out["CPU-s, all processes"] = res["cpu_s"]
    for role in ("auth", "exit", "relay", "client"):
        out[f"CPU-s, {role}s"] = res.get("cpu_s_by_role", {}).get(role)
    out["router CPU-s"] = res["router_cpu_s"]
    out["bootstrap (s)"] = res["bootstrap_s"]
    return out


def table(a: dict, b: dict) -> str:
    sa, sb = summary(a), summary(b)
    lines = [f"{'metric':<28} | {'onionp2p':>10} | {'tor':>10} | {'onionp2p/tor':>12}", "-" * 70]
    for key in sa:
        x, y = sa[key], sb[key]

        def fmt(v) -> str:
            return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

        ratio = f"{x / y:.2f}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else ""
        lines.append(f"{key:<28} | {fmt(x):>10} | {fmt(y):>10} | {ratio:>12}")
    return "\n".join(lines)


def plots(a: dict, b: dict, outdir: Path, title: str, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cdf(ax, series: dict[str, list[float]], xlabel: str) -> None:
        for name, xs in series.items():
            xs = sorted(xs)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        label=f"{name} (n={len(xs)})")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cumulative fraction")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)

    outdir.mkdir(parents=True, exist_ok=True)
    nets = {"onionp2p": a, "tor": b}
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, label in zip(axes, SIZES):
        cdf(ax, {n: [t["ttlb_s"] for t in r["transfers"] if t["ok"] and t["size"] == label]
                 for n, r in nets.items()}, f"time to last byte, {label} (s)")
    fig.suptitle(f"time to last byte; {title}", fontsize=9)
    fig.tight_layout()
    paths.append(outdir / f"{prefix}_ttlb.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    cdf(axes[0], {n: [t["ttfb_s"] for t in r["transfers"] if t["ok"]] for n, r in nets.items()},
        "time to first byte, all sizes (s)")
    cdf(axes[1], {n: [c["build_s"] for c in r["circuits"] if c["ok"] and len(c.get("path", ())) == 3]
                  for n, r in nets.items()}, "3-hop circuit build time (s)")
    cdf(axes[2], {n: r["goodput_MBps"] for n, r in nets.items()},
        "relay goodput, sum over relays (MB/s, per 2 s)")
    fig.suptitle(f"TTFB, circuit build time, relay goodput; {title}", fontsize=9)
    fig.tight_layout()
    paths.append(outdir / f"{prefix}_ttfb_build_goodput.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/simnet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--validate", action="store_true", help="validate the emulator alone and exit")
    ap.add_argument("--quick", action="store_true", help="10 relays (3 exits), 3 clients, 120 s per network")
    ap.add_argument("--relays", type=int, default=20)
    ap.add_argument("--exits", type=int, default=5)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--duration", type=float, default=300, help="seconds of measurement per network")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--relay-bw", default="1-6",
                    help="relay access-link caps, MB/s, drawn log-uniformly (1-6)")
    ap.add_argument("--client-bw", type=float, default=4.0, help="client access-link cap, MB/s (4)")
    ap.add_argument("--loss", type=float, default=0.0, help="drop probability on every pair (0)")
    ap.add_argument("--no-cgo", action="store_true", help="onionp2p's clients use tor1 relay crypto")
    ap.add_argument("--tor-conflux", action="store_true", help="tor's clients may use conflux (default: off)")
    ap.add_argument("--no-realtime", action="store_true", help="run the router at normal priority")
    ap.add_argument("--only", choices=("onionp2p", "tor"))
    ap.add_argument("--plots", default=str(HERE.parent / "docs" / "bench"),
                    help="directory for the CDF plots (simnet[_quick]_ttlb.png, ..._ttfb_build_goodput.png)")
    ap.add_argument("--workdir", help="keep logs and samples here (default: a temporary directory)")
    ap.add_argument("--mtu", type=int, default=1500)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("tools/simnet: needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    if args.validate:
        return run_cleanly(lambda: (validate(mtu=args.mtu, realtime=not args.no_realtime), 0)[1])
    if args.quick:
        args.relays, args.exits, args.clients, args.duration = 10, 3, 3, 120
    try:
        lo, hi = (float(x) for x in args.relay_bw.split("-"))
    except ValueError:
        print(f"tools/simnet: --relay-bw {args.relay_bw!r}: expected MIN-MAX in MB/s", file=sys.stderr)
        return 2
    if not (1 <= args.exits <= args.relays and args.relays >= 3 and args.clients >= 1 and 0 < lo <= hi):
        print("tools/simnet: need 3 <= relays, 1 <= exits <= relays, clients >= 1", file=sys.stderr)
        return 2
    for tool in ("ip", "curl", "tor", "tor-gencert"):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
            print(f"tools/simnet: {tool} not found (tools/test installs it)", file=sys.stderr)
            return 2
    plan = Plan(args.relays, args.exits, args.clients, args.duration, args.seed, (lo, hi), args.client_bw,
                args.loss, not args.no_cgo, args.tor_conflux, not args.no_realtime)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="simnet-"))
    root.mkdir(parents=True, exist_ok=True)

    def go() -> int:
        results = {}
        for kind in ("onionp2p", "tor"):
            if args.only in (None, kind):
                results[kind] = run_network(kind, plan, root)
        version = subprocess.run(["tor", "--version"], capture_output=True, text=True).stdout.split()[2]
        from onionp2p.cli import event_loop_choice  # what onionp2p's processes pick

        loop = event_loop_choice()
        modes = (f"onionp2p: congestion control (Vegas) with every exit, "
                 f"{'tor1' if args.no_cgo else 'CGO where offered'}, no conflux, event loop {loop} | "
                 f"tor {version.rstrip('.')}: cc_alg=2 (Vegas) pinned, "
                 f"ConfluxEnabled {1 if args.tor_conflux else 0}, relay crypto as it negotiates")
        title = (f"{N_AUTH} auth + {args.relays} relays ({args.exits} exits), {args.clients} clients, "
                 f"{args.duration:.0f} s, seed {args.seed}, relay caps {lo:g}-{hi:g} MB/s, "
                 f"client {args.client_bw:g} MB/s, loss {args.loss:g}")
        (root / "summary.json").write_text(json.dumps({k: summary(v) for k, v in results.items()}, indent=1))
        print(f"\n{title}\nmodes: {modes}\nsamples and logs: {root}\n")
        if len(results) == 2:
            print(table(results["onionp2p"], results["tor"]))
            prefix = "simnet_quick" if args.quick else "simnet"
            for p in plots(results["onionp2p"], results["tor"], Path(args.plots), title, prefix):
                print(f"plot: {p}")
        else:
            for k, v in results.items():
                print(k, json.dumps(summary(v), indent=1))
        return 0

    return run_cleanly(go)


def _agent_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("_perf")
    p.add_argument("--web", required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--cookie-hint", default="")
    w = sub.add_parser("_web")
    w.add_argument("--bind", required=True)
    w.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return asyncio.run(_perf(args) if args.cmd == "_perf" else _web(args))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_perf", "_web"):
        sys.exit(_agent_main(sys.argv[1:]))
    sys.exit(main())
