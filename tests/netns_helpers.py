"""Helpers for tests/test_netns.py: a small lab of network namespaces, and in-namespace roles.

As a library (imported by the test): :class:`Lab` creates network namespaces joined by a
Linux bridge, starts processes inside them and tears everything down again;
:func:`read_pcap` / :func:`tcp_flows` read what tcpdump captured.

As a script (run *inside* a namespace with ``ip netns exec NS python netns_helpers.py ...``):

* ``dest --bind IP --port P --log FILE``: the destination web server. Every accepted
  connection appends the peer's address to FILE (one line each). ``GET /file/N`` answers
  N deterministic bytes (:func:`content`); ``GET /slow/N/RATE`` the same bytes paced at
  RATE bytes/s (for cutting a relay mid-transfer).
* ``ctl --port P --cookie FILE``: a control-port shell. Authenticates with the cookie,
  then sends each line read on stdin as a command and prints the reply as one JSON list
  of lines (data blocks unescaped), so the test can talk to a control port that only
  listens on the client namespace's loopback.

No pytest imports here: the script runs with the venv's python in another namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


# -- content served by the destination ------------------------------------------------------


def content(n: int, seed: int | None = None) -> bytes:
    """N deterministic pseudo-random bytes (the destination's /file/N and /slow/N)."""
    return random.Random(n if seed is None else seed).randbytes(n)


# -- the lab ----------------------------------------------------------------------------------


class NamespacesForbidden(Exception):
    """``ip netns add`` failed: the kernel (or container) does not allow network namespaces."""


@dataclass
class Host:
    name: str  # short role name ("client", "x1")
    ns: str  # network namespace name
    ip: str
    dev: str = "eth0"


@dataclass
class Lab:
    """Network namespaces on one bridge; every host has ``eth0`` with ``IP/8`` in it.

    The bridge lives in its own namespace (``<prefix>br``), so nothing touches the root
    namespace's interfaces. :meth:`close` kills every process started with :meth:`spawn`,
    deletes the namespaces (which deletes their veths) and the ``/etc/netns`` files; it is
    idempotent and never raises.
    """

    prefix: str
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    _bridge_ns: str | None = None

    def _add_ns(self, ns: str) -> None:
        p = sh("ip", "netns", "add", ns, check=False)
        if p.returncode != 0:
            raise NamespacesForbidden(p.stderr.strip() or f"ip netns add exited {p.returncode}")
        self.namespaces.append(ns)
        # no IPv6 at all: otherwise each veth sends router solicitations, MLD and DAD packets
        sh("ip", "netns", "exec", ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
           "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def start_bridge(self) -> None:
        ns = f"{self.prefix}br"
        self._add_ns(ns)
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        self._bridge_ns = ns

    def add_host(self, name: str, ip: str, *, hosts: dict[str, str] | None = None,
                 resolv: str | None = None) -> Host:
        """A namespace with ``eth0`` (IP/8) on the bridge; optional /etc/hosts and resolv.conf."""
        assert self._bridge_ns is not None
        ns = f"{self.prefix}{name}"
        self._add_ns(ns)
        port = f"v{name}"[:15]
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth",
           "peer", "name", port, "netns", self._bridge_ns)
        sh("ip", "-n", self._bridge_ns, "link", "set", port, "master", "br0")
        sh("ip", "-n", self._bridge_ns, "link", "set", port, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/8", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        if hosts is not None or resolv is not None:
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            if hosts is not None:
                lines = ["127.0.0.1 localhost"] + [f"{addr} {n}" for n, addr in hosts.items()]
                (etc / "hosts").write_text("\n".join(lines) + "\n")
            if resolv is not None:
                (etc / "resolv.conf").write_text(resolv)
        host = Host(name, ns, ip)
        self.hosts[name] = host
        return host

    def link(self, name: str, up: bool) -> None:
        """Take a host's only interface down (it vanishes from the network) or up again."""
        h = self.hosts[name]
        sh("ip", "-n", h.ns, "link", "set", h.dev, "up" if up else "down")

    def spawn(self, name: str, argv: Sequence[str], log: Path, **kw) -> subprocess.Popen:
        """Run ``argv`` in host ``name``'s namespace (``ip netns exec`` execs it: same PID)."""
        with open(log, "ab") as f:
            p = subprocess.Popen(["ip", "netns", "exec", self.hosts[name].ns, *argv], stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def run(self, name: str, argv: Sequence[str], *, timeout: float = 30, check: bool = False,
            ) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.hosts[name].ns, *argv], capture_output=True,
                              timeout=timeout, check=check)

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Signal one of our processes and wait for it (SIGKILL after ``timeout``)."""
        if p.poll() is None:
            try:
                p.send_signal(sig)
                return p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            return p.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
            return None

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        end = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self.procs.clear()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self.namespaces.clear()
        self.hosts.clear()


def wait_for(pred, timeout: float, what: str, interval: float = 0.2, alive: Sequence[subprocess.Popen] = ()):
    """Poll ``pred()`` until it returns something truthy; AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        for p in alive:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process {p.args} exited with {p.returncode}")
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)


# -- control port over a pipe ------------------------------------------------------------------


class ControlShell:
    """The test's end of ``netns_helpers.py ctl`` running in another namespace."""

    def __init__(self, lab: Lab, host: str, port: int, cookie: Path, log: Path):
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", lab.hosts[host].ns, sys.executable, os.path.abspath(__file__), "ctl",
                 "--port", str(port), "--cookie", str(cookie)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        lab.procs.append(self.proc)

    def command(self, line: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise AssertionError(f"control shell exited ({self.proc.poll()}) on {line!r}")
        lines = json.loads(out)
        if not lines or not lines[-1].startswith("250"):
            raise AssertionError(f"{line!r}: {lines}")
        return lines

    def getinfo(self, key: str) -> list[str]:
        """The value lines of ``GETINFO key`` (one-line values and data blocks alike)."""
        lines = self.command(f"GETINFO {key}")
        out = []
        for ln in lines[:-1]:
            if ln.startswith(f"250-{key}="):
                v = ln[len(f"250-{key}="):]
                if v:
                    out.append(v)
            elif ln.startswith(f"250+{key}="):
                continue
            elif not ln.startswith("250"):
                out.append(ln)
        return out


def _ctl_main(args) -> int:
    cookie = Path(args.cookie).read_bytes().hex()
    s = socket.create_connection(("127.0.0.1", args.port), timeout=30)
    f = s.makefile("rwb")

    def reply() -> list[str]:
        lines = []
        while True:
            raw = f.readline()
            if not raw:
                raise SystemExit("control connection closed")
            ln = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(ln)
            if len(ln) >= 4 and ln[3] == "+":
                while True:
                    d = f.readline().decode("utf-8", "replace").rstrip("\r\n")
                    if d == ".":
                        break
                    lines.append(d[1:] if d.startswith("..") else d)
            elif len(ln) >= 4 and ln[3] == " ":
                return lines

    def send(cmd: str) -> list[str]:
        f.write(cmd.encode() + b"\r\n")
        f.flush()
        return reply()

    auth = send(f"AUTHENTICATE {cookie}")
    if not auth[-1].startswith("250"):
        print(json.dumps(auth), flush=True)
        return 1
    for line in sys.stdin:
        print(json.dumps(send(line.strip())), flush=True)
    return 0


# -- the destination -------------------------------------------------------------------------


def _dest_main(args) -> int:
    log = open(args.log, "a", buffering=1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        log.write(peer + "\n")
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            parts = head.split(b" ", 2)[1].decode().strip("/").split("/")
            n = int(parts[1])
            rate = int(parts[2]) if parts[0] == "slow" else 0
            body = content(n)
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % n)
            view = memoryview(body)
            chunk = 1 << 16
            t0 = time.monotonic()
            for i in range(0, n, chunk):
                writer.write(view[i:i + chunk])
                await writer.drain()
                if rate:
                    await asyncio.sleep(max(0.0, t0 + (i + chunk) / rate - time.monotonic()))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, IndexError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, args.bind, args.port)
        print(f"dest listening on {args.bind}:{args.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())
    return 0


# -- reading tcpdump's output ----------------------------------------------------------------


@dataclass
class Packet:
    t: float
    src_mac: bytes
    ethertype: int
    src: str = ""
    dst: str = ""
    proto: int = 0  # IP protocol: 6 TCP, 17 UDP, 1 ICMP
    sport: int = 0
    dport: int = 0
    flags: int = 0  # TCP flags
    seq: int = 0  # TCP sequence number
    payload: bytes = b""  # TCP/UDP payload (as much as the snap length kept)
    arp_target: str = ""


def read_pcap(path: Path) -> list[Packet]:
    """Ethernet frames of a classic pcap file (what ``tcpdump -w`` writes); a truncated tail is ignored."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1":
        end, frac = "<", 1e-6
    elif magic == b"\xa1\xb2\xc3\xd4":
        end, frac = ">", 1e-6
    elif magic == b"\x4d\x3c\xb2\xa1":
        end, frac = "<", 1e-9
    elif magic == b"\xa1\xb2\x3c\x4d":
        end, frac = ">", 1e-9
    else:
        raise ValueError(f"not a pcap file: {magic.hex()}")
    linktype = struct.unpack(end + "I", data[20:24])[0]
    if linktype != 1:
        raise ValueError(f"expected Ethernet captures, got link type {linktype}")
    out = []
    off = 24
    while off + 16 <= len(data):
        sec, usec, incl, _orig = struct.unpack(end + "IIII", data[off:off + 16])
        frame = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(frame) < incl or len(frame) < 14:
            break
        out.append(_parse_frame(sec + usec * frac, frame))
    return out


def _ip4(b: bytes) -> str:
    return socket.inet_ntoa(b)


def _parse_frame(t: float, frame: bytes) -> Packet:
    ethertype = struct.unpack("!H", frame[12:14])[0]
    p = Packet(t, frame[6:12], ethertype)
    body = frame[14:]
    if ethertype == 0x0806 and len(body) >= 28:  # ARP
        p.src, p.arp_target = _ip4(body[14:18]), _ip4(body[24:28])
    elif ethertype == 0x0800 and len(body) >= 20:
        ihl = (body[0] & 0x0F) * 4
        total = struct.unpack("!H", body[2:4])[0]
        p.proto = body[9]
        p.src, p.dst = _ip4(body[12:16]), _ip4(body[16:20])
        l4 = body[ihl:total]
        if p.proto == 6 and len(l4) >= 20:
            p.sport, p.dport, p.seq = struct.unpack("!HHI", l4[:8])
            doff = (l4[12] >> 4) * 4
            p.flags = l4[13]
            p.payload = l4[doff:]
        elif p.proto == 17 and len(l4) >= 8:
            p.sport, p.dport = struct.unpack("!HH", l4[:4])
            p.payload = l4[8:]
    return p


@dataclass
class Flow:
    """One TCP connection the capture saw opened by ``src`` (a SYN without ACK)."""

    src: str
    sport: int
    dst: str
    dport: int
    first_payload: bytes = b""  # the first data the opener sent (as captured)
    bytes_sent: int = 0


def tcp_flows(packets: Sequence[Packet], src: str) -> list[Flow]:
    """TCP connections opened by ``src``, with the start of what ``src`` sent on each."""
    flows: dict[tuple, Flow] = {}
    for p in packets:
        if p.ethertype != 0x0800 or p.proto != 6 or p.src != src:
            continue
        key = (p.sport, p.dst, p.dport)
        if p.flags & 0x02 and not p.flags & 0x10:  # SYN
            flows[key] = Flow(src, p.sport, p.dst, p.dport)
        fl = flows.get(key)
        if fl is not None and p.payload:
            if not fl.first_payload:
                fl.first_payload = p.payload
            fl.bytes_sent += len(p.payload)
    return list(flows.values())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dest")
    d.add_argument("--bind", required=True)
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--log", required=True)
    c = sub.add_parser("ctl")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--cookie", required=True)
    args = ap.parse_args(argv)
    return _dest_main(args) if args.cmd == "dest" else _ctl_main(args)


if __name__ == "__main__":
    sys.exit(main())
