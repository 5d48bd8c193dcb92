"""An emulated wide-area network on one machine: network namespaces joined by a user-space router.

Theory of operation
-------------------
This kernel has no ``netem`` qdisc, so delay, bandwidth caps and loss are made here, in
user space, at the packet level (unlike :mod:`onionp2p.ops.wan`, which delays a TCP byte
stream and therefore cannot drop, reorder or rate-limit packets):

* **Topology.** Every node (an authority, a relay, a client, a web server ...) lives in its
  own network namespace ``<prefix><name>`` whose only interface besides ``lo`` is ``eth0``,
  a TUN device with an address in ``10.77.0.0/16`` and a default route through it. Each
  TUN is created in the root namespace by this process (``/dev/net/tun``, ``TUNSETIFF``),
  then moved into its node's namespace (``ip link set tunX netns NS``) and renamed there;
  the file descriptor stays with us. IPv6 is disabled in every namespace. Nothing else in
  the root namespace is touched.
* **Router.** One process (``python -m onionp2p.ops.simnet router``, started by
  :class:`Simnet` with the TUN descriptors passed to it) reads every IPv4 packet a node
  sends, finds the destination node by address and writes the packet into that node's
  TUN after three stages, like a packet crossing the source's access link, the wide-area
  path and the destination's access link (the model of Shadow and of tornettools):

  1. the source's **uplink**, a token-bucket shaper (GCRA form: ``rate`` bytes/s, burst
     ``burst`` bytes); a packet that would wait longer than ``queue`` seconds there is
     dropped, like a full router buffer (tail drop);
  2. the **path**: a one-way delay and a loss probability per (source, destination) pair;
  3. the destination's **downlink**, a second token bucket.

  The delay of a pair is constant, so a pair's packets stay in order. Timers are kept in a
  heap and the loop sleeps in ``select`` (microsecond timeouts; ``epoll``/``poll`` round
  up to whole milliseconds, which alone would add up to 2 ms per round trip), with a
  timer slack of 1 us. With ``realtime`` (tools/simnet and the validation use it) the
  router runs under ``SCHED_RR`` priority 1: on a machine whose cores the networks under
  test keep busy, a normal-priority router wakes late and round trips come out 2-4 ms
  long; its CPU use follows the traffic, and the kernel's RT throttling bounds it.
* **Delays.** :func:`wan_delays` draws a realistic relay-to-relay latency matrix: each node
  is put in a region (60 % Europe, 25 % eastern and 15 % western North America, roughly
  where Tor's relays are) at a random position along it; the round-trip time of a pair is
  the regions' base RTT plus the distance inside the region plus both nodes' access
  latency, clipped to 10-150 ms; the one-way delay is half of it. Seeded: the same seed
  gives the same matrix.
* **Cleanup.** Namespace names carry the owning process id (``sn<pid>x``); :meth:`Simnet.close`
  (also run from ``atexit`` and on SIGTERM/SIGINT, see :func:`run_cleanly`) kills every
  process started in the namespaces, stops the router (closing the TUNs deletes them) and
  deletes the namespaces. Namespaces left by a dead owner (SIGKILL) are deleted by the next
  :class:`Simnet`. The router exits by itself when its parent dies.

Validation (``tools/simnet --validate``, :func:`validate`): ping and TCP round-trip times
through the router against the configured delay, the throughput ceiling, a rate cap, a
loss rate and the router's CPU use.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import heapq
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onionp2p.errors import ConfigError

__all__ = ["Node", "Simnet", "SimnetError", "wan_delays", "validate", "run_cleanly", "NETWORK"]

#: the emulated network: node k (0-based) gets 10.77.(k // 250).(k % 250 + 2)
NETWORK = "10.77.0.0/16"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
NS_PREFIX = "sn"
NETNS_ETC = Path("/etc/netns")


class SimnetError(RuntimeError):
    """The emulated network could not be built (no namespaces, no /dev/net/tun, no ``ip``)."""


def _sh(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(args, capture_output=True, text=True, timeout=30, input=input)
    if check and p.returncode != 0:
        raise SimnetError(f"{' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p


# -- the delay model ------------------------------------------------------------------------------

#: (name, share of nodes, length of the region in ms of RTT end to end)
REGIONS = (("eu", 0.60, 30.0), ("na-east", 0.25, 25.0), ("na-west", 0.15, 20.0))
#: base RTT in ms between regions (same region: the within-region term only); public
#: ping tables put Frankfurt-New York at ~80-90 ms, New York-San Francisco at ~65-70 ms,
#: Frankfurt-San Francisco at ~140-150 ms
REGION_RTT = {("eu", "na-east"): 80.0, ("eu", "na-west"): 140.0, ("na-east", "na-west"): 62.0}
RTT_MIN_MS, RTT_MAX_MS = 10.0, 150.0


def wan_delays(n: int, seed: int) -> tuple[list[list[float]], list[str]]:
    """A symmetric one-way delay matrix (seconds) for ``n`` nodes and each node's region."""
    rng = random.Random(seed)
    names = [r[0] for r in REGIONS]
    regions = rng.choices(names, weights=[r[1] for r in REGIONS], k=n)
    length = {r[0]: r[2] for r in REGIONS}
    pos = [rng.random() for _ in range(n)]
    access = [rng.uniform(1.0, 6.0) for _ in range(n)]  # last-mile RTT share of each node
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = regions[i], regions[j]
            if a == b:
                base = abs(pos[i] - pos[j]) * length[a]
            else:
                base = REGION_RTT.get((a, b)) or REGION_RTT[(b, a)]
            rtt = min(RTT_MAX_MS, max(RTT_MIN_MS, base + access[i] + access[j]))
            d[i][j] = d[j][i] = rtt / 2000.0
    return d, regions


# -- the router -----------------------------------------------------------------------------------


@dataclass
class RouterConfig:
    """What the router process needs (sent to it as JSON)."""

    addresses: list[str]  # node k's IPv4 address; its TUN is the k-th descriptor passed
    delay: list[list[float]]  # one-way seconds, [src][dst]
    loss: list[list[float]]  # drop probability, [src][dst]
    up_rate: list[float]  # bytes/s per node, 0 = unlimited
    down_rate: list[float]
    burst: float = 16 * 1024  # token-bucket depth in bytes
    queue: float = 0.1  # longest wait in a shaper before a packet is dropped, seconds
    seed: int = 1
    stats: str = ""  # file the router writes its counters to (on SIGUSR1 and at exit)
    realtime: bool = False  # run the router under SCHED_RR (priority 1)


def _route(fds: Sequence[int], cfg: RouterConfig, parent: int) -> dict:
    """The router's loop (see the module docstring); returns its counters when stopped."""
    n = len(fds)
    index = {struct.unpack("!I", socket.inet_aton(a))[0]: k for k, a in enumerate(cfg.addresses)}
    delay, loss = cfg.delay, cfg.loss
    up_rate, down_rate = cfg.up_rate, cfg.down_rate
    up_tau = [cfg.burst / r if r else 0.0 for r in up_rate]
    down_tau = [cfg.burst / r if r else 0.0 for r in down_rate]
    up_tat = [0.0] * n
    down_tat = [0.0] * n
    lossy = any(p > 0 for row in loss for p in row)
    rng = random.Random(cfg.seed)
    qmax = cfg.queue
    fd_of = list(fds)
    node_of = {fd: k for k, fd in enumerate(fds)}
    for fd in fds:
        os.set_blocking(fd, False)
    heap: list[tuple[float, int, int, int, bytes]] = []  # (due, seq, stage, dst, packet)
    seq = 0
    tx_pkts, tx_bytes = [0] * n, [0] * n  # sent by node k (read from its TUN)
    rx_pkts, rx_bytes = [0] * n, [0] * n  # delivered to node k
    drops = {"loss": 0, "queue_up": 0, "queue_down": 0, "no_route": 0, "not_ipv4": 0}
    unrouted: dict[str, int] = {}  # destinations outside the emulated network -> packets (first 20)
    flags = {"stop": False, "dump": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGINT, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("dump", True))
    now = time.monotonic
    write = os.write
    read = os.read
    push, pop = heapq.heappush, heapq.heappop
    started = now()
    next_check = started + 1.0

    def counters() -> dict:
        cpu = os.times()
        return {"tx_pkts": tx_pkts, "tx_bytes": tx_bytes, "rx_pkts": rx_pkts, "rx_bytes": rx_bytes,
                "drops": drops, "unrouted": unrouted, "cpu_s": cpu.user + cpu.system,
                "wall_s": now() - started}

    def dump() -> None:
        if cfg.stats:
            tmp = cfg.stats + ".tmp"
            with open(tmp, "w") as f:
                json.dump(counters(), f)
            os.replace(tmp, cfg.stats)

    def downlink(t: float, j: int, pkt: bytes) -> None:
        """The packet reaches node j's access link at time t."""
        nonlocal seq
        r = down_rate[j]
        if r:
            size = len(pkt)
            tat = down_tat[j]
            d = tat - down_tau[j]
            if d < t:
                d = t
            if d - t > qmax:
                drops["queue_down"] += 1
                return
            down_tat[j] = (tat if tat > d else d) + size / r
            if d > t:
                seq += 1
                push(heap, (d, seq, 2, j, pkt))
                return
        try:
            write(fd_of[j], pkt)
        except OSError:  # the interface went away (namespace deleted) or its queue is full
            return
        rx_pkts[j] += 1
        rx_bytes[j] += len(pkt)

    dump()
    while not flags["stop"]:
        t = now()
        timeout = 0.5
        if heap:
            timeout = heap[0][0] - t
            if timeout < 0:
                timeout = 0
        try:
            ready, _, _ = select.select(fd_of, (), (), timeout)
        except InterruptedError:
            ready = []
        for fd in ready:
            i = node_of[fd]
            for _ in range(64):
                try:
                    pkt = read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                size = len(pkt)
                if size < 20 or pkt[0] >> 4 != 4:
                    drops["not_ipv4"] += 1
                    continue
                tx_pkts[i] += 1
                tx_bytes[i] += size
                j = index.get(int.from_bytes(pkt[16:20], "big"))
                if j is None:
                    drops["no_route"] += 1
                    dst = socket.inet_ntoa(pkt[16:20])
                    if dst in unrouted or len(unrouted) < 20:
                        unrouted[dst] = unrouted.get(dst, 0) + 1
                    continue
                if lossy and loss[i][j] and rng.random() < loss[i][j]:
                    drops["loss"] += 1
                    continue
                t = now()
                d = t
                r = up_rate[i]
                if r:
                    tat = up_tat[i]
                    d = tat - up_tau[i]
                    if d < t:
                        d = t
                    if d - t > qmax:
                        drops["queue_up"] += 1
                        continue
                    up_tat[i] = (tat if tat > d else d) + size / r
                arrive = d + delay[i][j]
                if arrive <= t:
                    downlink(t, j, pkt)
                else:
                    seq += 1
                    push(heap, (arrive, seq, 1, j, pkt))
        t = now()
        while heap and heap[0][0] <= t:
            due, _, stage, j, pkt = pop(heap)
            if stage == 1:
                downlink(due, j, pkt)
            else:
                try:
                    write(fd_of[j], pkt)
                except OSError:
                    continue
                rx_pkts[j] += 1
                rx_bytes[j] += len(pkt)
        if flags["dump"]:
            flags["dump"] = False
            dump()
        if t > next_check:
            next_check = t + 1.0
            if os.getppid() != parent:  # our owner died without stopping us
                break
    dump()
    return counters()


def _router_main(args: argparse.Namespace) -> int:
    cfg = RouterConfig(**json.loads(Path(args.config).read_text()))
    try:  # the kernel may defer our timer wake-ups by the timer slack (50 us by default): 1 us
        Path("/proc/self/timerslack_ns").write_text("1000")
    except OSError:
        pass
    if cfg.realtime:
        # wake-ups on time even when the endpoints keep every core busy; the router uses little
        # CPU at the rates under test, and the kernel's RT throttling caps it in any case
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    fds = [int(x) for x in args.fds.split(",")]
    print("router ready", flush=True)
    _route(fds, cfg, args.parent)
    return 0


# -- the namespaces -------------------------------------------------------------------------------


def _tun_open(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(prefix: str = NS_PREFIX) -> list[str]:
    """Delete namespaces ``<prefix><pid>x...`` whose owning process is gone; returns their names."""
    out = []
    p = _sh("ip", "netns", "list", check=False)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{re.escape(prefix)}(\d+)x.*", name)
        if m and not _pid_alive(int(m.group(1))):
            _sh("ip", "netns", "del", name, check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
            out.append(name)
    return out


@dataclass
class Node:
    """One host of the emulated network."""

    name: str
    ns: str
    ip: str
    index: int
    up_rate: float = 0.0  # bytes/s, 0 = unlimited
    down_rate: float = 0.0
    region: str = ""


@dataclass
class Simnet:
    """Namespaces + TUN devices + the router process; see the module docstring.

    Add nodes with :meth:`add`, then :meth:`start` (creates everything and starts the
    router). ``delay(i, j)``/``loss(i, j)`` give one-way delay in seconds and drop
    probability per pair of node indexes. :meth:`close` is idempotent and never raises.
    """

    delay: Callable[[int, int], float] = lambda i, j: 0.0
    loss: Callable[[int, int], float] = lambda i, j: 0.0
    mtu: int = 1500
    burst: float = 16 * 1024
    queue: float = 0.1
    seed: int = 1
    workdir: Path | None = None
    realtime: bool = False
    nodes: list[Node] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    router: subprocess.Popen | None = None
    prefix: str = ""
    _namespaces: list[str] = field(default_factory=list)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.prefix = f"{NS_PREFIX}{os.getpid()}x"

    def add(self, name: str, *, up_rate: float = 0.0, down_rate: float = 0.0, region: str = "") -> Node:
        k = len(self.nodes)
        if k >= 250 * 250:
            raise ConfigError("simnet: too many nodes")
        node = Node(name, f"{self.prefix}{name}", f"10.77.{k // 250}.{k % 250 + 2}", k, up_rate, down_rate,
                    region)
        if len(node.ns) > 60 or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"simnet: bad node name {name!r}")
        self.nodes.append(node)
        return node

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # -- building ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create the namespaces and TUNs and start the router; SimnetError if that is impossible."""
        if not shutil.which("ip"):
            raise SimnetError("simnet needs iproute2's ip")
        if not os.path.exists("/dev/net/tun"):
            raise SimnetError("simnet needs /dev/net/tun")
        reap_stale()
        atexit.register(self.close)
        fds: list[int] = []
        try:
            for node in self.nodes:
                fds.append(self._make_node(node))
            wd = self.workdir or Path(f"/tmp/{self.prefix}")
            wd.mkdir(parents=True, exist_ok=True)
            self.workdir = wd
            n = len(self.nodes)
            cfg = RouterConfig(
                addresses=[x.ip for x in self.nodes],
                delay=[[self.delay(i, j) if i != j else 0.0 for j in range(n)] for i in range(n)],
                loss=[[self.loss(i, j) if i != j else 0.0 for j in range(n)] for i in range(n)],
                up_rate=[x.up_rate for x in self.nodes], down_rate=[x.down_rate for x in self.nodes],
                burst=self.burst, queue=self.queue, seed=self.seed, stats=str(wd / "router-stats.json"),
                realtime=self.realtime)
            (wd / "router.json").write_text(json.dumps(cfg.__dict__))
            with open(wd / "router.log", "ab") as err:
                self.router = subprocess.Popen(
                    [sys.executable, "-m", "onionp2p.ops.simnet", "router",
                     "--config", str(wd / "router.json"), "--fds", ",".join(map(str, fds)),
                     "--parent", str(os.getpid())],
                    pass_fds=fds, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
            line = self.router.stdout.readline() if self.router.stdout else b""
            if b"router ready" not in line:
                raise SimnetError(f"the router did not start (see {wd / 'router.log'})")
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.close()
            raise
        for fd in fds:  # the router holds them now: when it exits, the TUNs go
            os.close(fd)

    def _make_node(self, node: Node) -> int:
        p = _sh("ip", "netns", "add", node.ns, check=False)
        if p.returncode != 0:
            raise SimnetError(f"ip netns add: {p.stderr.strip()}")
        self._namespaces.append(node.ns)
        tun = f"snt{os.getpid() % 100000}_{node.index}"[:15]
        fd = _tun_open(tun)
        try:
            # no IPv6 at all (no router solicitations, MLD or DAD through the router): set before link up
            _sh("ip", "netns", "exec", node.ns, "sh", "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
            _sh("ip", "link", "set", tun, "netns", node.ns)
            script = "\n".join([
                "link set lo up",
                f"link set {tun} name eth0",
                f"link set eth0 mtu {self.mtu} txqueuelen 1000 up",
                f"addr add {node.ip}/16 dev eth0",
                "route add default dev eth0",
            ]) + "\n"
            _sh("ip", "-n", node.ns, "-batch", "-", input=script)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- running things in the nodes --------------------------------------------------------

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.node(name).ns, *argv]

    def spawn(self, name: str, argv: Sequence[str], log: Path | None = None, **kw) -> subprocess.Popen:
        """Run ``argv`` in node ``name``'s namespace; stopped by :meth:`close`."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            p = subprocess.Popen(self.argv(name, argv), stdout=kw.pop("stdout", out),
                                 stderr=kw.pop("stderr", subprocess.STDOUT), start_new_session=True, **kw)
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self.procs.append(p)
        return p

    def run(self, name: str, argv: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(name, argv), capture_output=True, text=True, timeout=timeout)

    def stats(self) -> dict:
        """The router's counters (per node: packets/bytes sent and delivered; drops; CPU seconds)."""
        if self.router is None or self.workdir is None:
            return {}
        path = self.workdir / "router-stats.json"
        before = path.stat().st_mtime_ns if path.exists() else 0
        if self.router.poll() is None:
            self.router.send_signal(signal.SIGUSR1)
            end = time.monotonic() + 2
            while time.monotonic() < end and (not path.exists() or path.stat().st_mtime_ns == before):
                time.sleep(0.01)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def close(self) -> None:
        """Stop everything and delete the namespaces; a second Ctrl-C meanwhile is ignored."""
        if self._closed:
            return
        self._closed = True
        saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                saved[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            self._close()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except OSError:
                    pass
        end = time.monotonic() + 8
        for p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        if self.router is not None and self.router.poll() is None:
            self.router.terminate()
            try:
                self.router.wait(5)
            except subprocess.TimeoutExpired:
                self.router.kill()
        for ns in reversed(self._namespaces):
            _sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._namespaces.clear()

    def __enter__(self) -> Simnet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_cleanly(fn: Callable[[], int]) -> int:
    """Run ``fn`` so that SIGINT, SIGTERM and SIGHUP unwind (``finally`` blocks and atexit run).

    SIGINT is set explicitly: a program started in the background by a shell inherits it
    ignored, and Python then raises no KeyboardInterrupt."""
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    try:
        return fn()
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130


# -- probes (run inside a namespace) --------------------------------------------------------------


def _serve_main(args: argparse.Namespace) -> int:
    """A TCP server: the first byte chooses echo (``e``) or sink (``s``: count, reply the total)."""
    srv = socket.create_server((args.bind, args.port), backlog=64)
    print("serving", flush=True)
    import threading

    def handle(c: socket.socket) -> None:
        with c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = c.recv(1)
            if mode == b"e":
                # acknowledge each byte at once, from the kernel: the prober's kernel then takes its
                # RTT samples (tcpi_rtt) from ACKs that no process had to wake up for
                quickack = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                c.setsockopt(*quickack)
                while data := c.recv(65536):
                    c.sendall(data)
                    c.setsockopt(*quickack)
            elif mode == b"s":
                got = 0
                while data := c.recv(1 << 20):
                    got += len(data)
                c.sendall(str(got).encode())

    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def _probe_main(args: argparse.Namespace) -> int:
    """``rtt``: TCP round trips of 1 byte (after the handshake, which is timed too); ``bulk``:
    send as fast as possible for ``seconds``; prints one JSON line."""
    t0 = time.perf_counter()
    s = socket.create_connection((args.host, args.port), timeout=30)
    connect = time.perf_counter() - t0
    # the SYN / SYN-ACK round trip as this kernel timed it: no process on either side in it
    handshake = struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 68)[0]
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if args.mode == "rtt":
        s.sendall(b"e")
        rtts = []
        for _ in range(args.count):
            t = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise SystemExit("echo broke")
            rtts.append(time.perf_counter() - t)
            time.sleep(args.interval)
        # the kernel's smoothed RTT (struct tcp_info: tcpi_rtt, tcpi_rttvar in us at offsets 68, 72):
        # what TCP itself sees, free of the scheduling delays of this process and of the echo server
        # (which acknowledges from its kernel at once, TCP_QUICKACK)
        srtt, rttvar = struct.unpack_from("II", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 68)
        print(json.dumps({"connect_s": connect, "handshake_rtt_s": handshake / 1e6, "rtts_s": rtts,
                          "srtt_s": srtt / 1e6, "rttvar_s": rttvar / 1e6}))
    else:
        s.sendall(b"s")
        buf = b"\0" * (1 << 16)
        sent = 0
        t = time.perf_counter()
        end = t + args.seconds
        while time.perf_counter() < end:
            sent += s.send(buf)
        s.shutdown(socket.SHUT_WR)
        got = int(s.recv(64) or b"0")
        dt = time.perf_counter() - t
        print(json.dumps({"sent": sent, "received": got, "seconds": dt, "connect_s": connect}))
    return 0


# -- validation -----------------------------------------------------------------------------------


def _ping(net: Simnet, src: str, dst: str, count: int, interval: float) -> dict:
    p = net.run(src, ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", net.node(dst).ip],
                timeout=count * interval + 30)
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", p.stdout)]
    m = re.search(r"(\d+) packets transmitted, (\d+) received", p.stdout)
    r = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", p.stdout)
    if not m:
        raise SimnetError(f"ping: {p.stdout} {p.stderr}")
    out = {"sent": int(m.group(1)), "received": int(m.group(2))}
    if r:
        # ping prints whole milliseconds from 100 ms up: then the mean is the better figure
        p50 = _median(rtts) if rtts and max(rtts) < 100 else float(r.group(2))
        out.update(min_ms=float(r.group(1)), avg_ms=float(r.group(2)), max_ms=float(r.group(3)), p50_ms=p50)
    return out


def _probe(net: Simnet, src: str, dst: str, *args: str, timeout: float = 60) -> dict:
    p = net.run(src, [sys.executable, "-m", "onionp2p.ops.simnet", "probe", "--host", net.node(dst).ip,
                      "--port", "5201", *args], timeout=timeout)
    if p.returncode != 0:
        raise SimnetError(f"probe: {p.stderr.strip()[-400:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _start_server(net: Simnet, name: str) -> None:
    p = net.spawn(name, [sys.executable, "-m", "onionp2p.ops.simnet", "serve", "--bind", net.node(name).ip,
                         "--port", "5201"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if p.stdout is None or b"serving" not in p.stdout.readline():
        raise SimnetError("the probe server did not start")


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def validate(delays_ms: Sequence[float] = (0, 10, 40, 75), *, pings: int = 20, bulk_s: float = 4.0,
             rate: float = 2e6, loss: float = 0.1, mtu: int = 1500, realtime: bool = True,
             out: Callable[[str], None] = print) -> dict:
    """Measure the emulator alone (see the module docstring); returns the figures, prints a table.

    Nodes ``a0``/``b0`` ... one pair per configured one-way delay; ``cap`` has ``rate`` bytes/s
    up and down; ``lossy`` drops ``loss`` of the packets towards it.
    """
    pairs = [(f"a{k}", f"b{k}", d / 1000) for k, d in enumerate(delays_ms)]
    with Simnet(mtu=mtu, realtime=realtime) as net:
        for a, b, _ in pairs:
            net.add(a)
            net.add(b)
        net.add("cap", up_rate=rate, down_rate=rate)
        net.add("lossy")
        one_way = {}
        for a, b, d in pairs:
            one_way[(net.node(a).index, net.node(b).index)] = d
            one_way[(net.node(b).index, net.node(a).index)] = d
        lossy = net.node("lossy").index
        net.delay = lambda i, j: one_way.get((i, j), 0.0)
        net.loss = lambda i, j: loss if j == lossy else 0.0
        net.start()
        results: dict = {"mtu": mtu, "rows": []}
        out(f"{'one-way delay':>13} | {'expected RTT':>12} | {'ping RTT min/p50/max':>22} | "
            f"{'TCP srtt':>12} | {'echo p50':>11} | {'error':>7}")
        out("-" * 93)
        for a, b, d in pairs:
            _start_server(net, b)
            pg = _ping(net, a, b, pings, 0.05)
            pr = _probe(net, a, b, "--mode", "rtt", "--count", str(pings), "--interval", "0.02")
            tcp = _median(pr["rtts_s"]) * 1000
            srtt = pr["srtt_s"] * 1000
            exp = 2 * d * 1000
            err = max(abs(pg["p50_ms"] - exp), abs(srtt - exp))
            row = {"delay_ms": d * 1000, "expected_rtt_ms": exp, "ping": pg, "tcp_srtt_ms": srtt,
                   "echo_rtt_p50_ms": tcp, "tcp_connect_ms": pr["connect_s"] * 1000, "max_error_ms": err}
            results["rows"].append(row)
            ping = f"{pg['min_ms']:6.2f}/{pg['p50_ms']:6.2f}/{pg['max_ms']:6.2f}"
            out(f"{d * 1000:10.1f} ms | {exp:9.1f} ms | {ping} ms | {srtt:9.2f} ms | {tcp:8.2f} ms "
                f"| {err:4.2f} ms")
        # throughput ceiling: one bulk TCP transfer, no delay, no cap
        a, b, _ = pairs[0]
        cpu0, wall0 = _cpu_of(net.router.pid), time.monotonic()  # type: ignore[union-attr]
        bulk = _probe(net, a, b, "--mode", "bulk", "--seconds", str(bulk_s), timeout=bulk_s + 60)
        cpu1, wall1 = _cpu_of(net.router.pid), time.monotonic()  # type: ignore[union-attr]
        mbps = bulk["received"] / bulk["seconds"] / 1e6
        cpu_frac = (cpu1 - cpu0) / (wall1 - wall0)
        cpu_per_gb = (cpu1 - cpu0) / (bulk["received"] / 1e9)
        results.update(ceiling_MBps=mbps, ceiling_router_cpu=cpu_frac, router_cpu_s_per_GB=cpu_per_gb)
        # a rate cap
        _start_server(net, "cap")
        capped = _probe(net, a, "cap", "--mode", "bulk", "--seconds", str(bulk_s), timeout=bulk_s + 60)
        cap_mbps = capped["received"] / capped["seconds"] / 1e6
        results.update(cap_MBps=rate / 1e6, capped_MBps=cap_mbps)
        # loss
        pl = _ping(net, a, "lossy", 400, 0.005)
        lost = 1 - pl["received"] / pl["sent"]
        results.update(loss_configured=loss, loss_measured=lost, loss_pings=pl["sent"])
        # idle CPU
        c0 = _cpu_of(net.router.pid)  # type: ignore[union-attr]
        time.sleep(2)
        results["idle_router_cpu"] = (_cpu_of(net.router.pid) - c0) / 2  # type: ignore[union-attr]
        out("")
        out(f"throughput ceiling (1 TCP flow, MTU {mtu}, no cap): {mbps:.1f} MB/s, "
            f"router CPU {cpu_frac * 100:.0f} % of a core ({cpu_per_gb:.1f} CPU-s per GB)")
        out(f"rate cap {rate / 1e6:.2f} MB/s each way: 1 TCP flow got {cap_mbps:.2f} MB/s")
        out(f"loss {loss * 100:.0f} % towards one node: {lost * 100:.1f} % of {pl['sent']} pings lost "
            f"(each ping crosses the lossy direction once)")
        out(f"router CPU when idle: {results['idle_router_cpu'] * 100:.1f} % of a core")
        return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onionp2p.ops.simnet")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("router")
    r.add_argument("--config", required=True)
    r.add_argument("--fds", required=True)
    r.add_argument("--parent", type=int, required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    p = sub.add_parser("probe")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("rtt", "bulk"), required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--seconds", type=float, default=3.0)
    v = sub.add_parser("validate")
    v.add_argument("--mtu", type=int, default=1500)
    v.add_argument("--no-realtime", dest="realtime", action="store_false")
    args = ap.parse_args(argv)
    if args.cmd == "router":
        return _router_main(args)
    if args.cmd == "serve":
        return _serve_main(args)
    if args.cmd == "probe":
        return _probe_main(args)
    return run_cleanly(lambda: (validate(mtu=args.mtu, realtime=args.realtime), 0)[1])


if __name__ == "__main__":
    sys.exit(main())
