"""A multi-host onionp2p network in Linux network namespaces (issue #8, part 4).

Topology
--------
Every node is a real ``onionp2p`` CLI process (``ip netns exec NS python -m onionp2p
authority|relay|client --config ...``) in its own network namespace with its own address,
each in a different /16 so the client keeps ``enforce_distinct_subnets`` on:

    client 10.10.0.2   authority 10.20.0.2 (DirPort 7000, run_relay = false)
    exits  x1 x2 x3    10.31/32/33.0.2:9001  policy "accept *:8080, reject *:*"
    relays m1 m2 m3    10.41/42/43.0.2:9001  non-exits
    dest   10.60.0.2:8080  a small web server that logs the peer address of each connection

Each namespace has one veth, ``eth0`` (``IP/8``), whose peer is a port of a Linux bridge
living in a seventh namespace (a bridge works here; no router namespace needed). IPv6 is
disabled in every namespace so the veths send no router solicitations, MLD or DAD. The
root namespace is never touched: the veths are created directly inside the namespaces.
The exits' ``/etc/netns/NS/hosts`` maps ``dest.test`` to the destination, and the client
fetches ``http://dest.test:8080/...`` with ``curl --socks5-hostname`` from inside the
client namespace, so the name is resolved at the exit. The client namespace's
``resolv.conf`` names a bait resolver 10.53.0.53 with a permanent neighbour entry: any DNS
query from the client would leave as a real UDP packet and show up in the capture.

The authority votes every 4 s with the testing flags (every reachable relay is Guard);
the fixture waits until its consensus lists all six relays as Running (polled with curl
from inside the authority namespace, so nothing crosses the client's link), then starts
tcpdump in the client namespace, then the client (SOCKS 9050, control port 9051, both on
the namespace's loopback). The control port is reached through ``netns_helpers.py ctl``,
a cookie-authenticated shell running in the client namespace and driven over a pipe.
Teardown (module fixture finalizer, also on failure): SIGTERM then SIGKILL to every
process we started, ``ip netns del`` of every namespace (which removes the veths), and
removal of the ``/etc/netns`` files. Skipped only if ``ip netns add`` fails (or iproute2
or curl is missing; the capture tests also need tcpdump — tools/test installs all three).

What is asserted
----------------
1. ``test_fetch_destination_sees_only_exit``: 5 MB through the network with the right
   SHA-256; the destination saw connections only from exit addresses, never the client's.
2. ``test_relay_cut_mid_transfer``: during a paced 40 MB download (1 MB/s), the middle
   relay of the circuit carrying it (found with GETINFO stream-status / circuit-status) is
   cut off by ``ip link set eth0 down`` in its namespace, a silent black hole: the transfer
   stalls (no byte in 3 s), then ends with an error once the guard's kernel gives up on the
   link (``tcp_user_timeout``) and the guard destroys the circuit. A new fetch must then
   succeed, on a circuit that avoids the dead relay (checked on the control port while the
   fetch runs), within
   ``N * stream_timeout + 15 s`` of the cut, N being the number of the client's circuits
   through the dead relay at the time of the cut (each may cost the next stream one
   ``stream_timeout``, see findings); curl is run again if one SOCKS request fails, like an
   application would.
3. ``test_client_sends_only_tls``: tcpdump (``-Q out -s 0`` on the client's eth0, running
   from before the client started to the end of the module, ``0 packets dropped by
   kernel`` checked) shows that the client namespace sent only IPv4 TCP and ARP: no UDP
   (so no DNS to the bait resolver), no IPv6, nothing to the destination. Every TCP
   connection went either to a relay's ORPort — and the byte stream the client sent on it,
   reassembled from the capture, is a well-formed sequence of TLS records starting with a
   ClientHello — or to the authority's DirPort with a plain ``GET
   /tor/status-vote/current/consensus``: that is the client's bootstrap (it has no
   consensus yet, so no relay to ask; specs/directory.md §9) and the only cleartext.
   Every circuit listed on the control port starts at one of the client's sampled guards.
4. ``test_client_contacts_only_guards``: apart from that bootstrap download, the client
   talks to its guards only: its directory refreshes use its primary guards as directory
   guards (guard-spec; ``ClientNode._directory_guards``), so no other relay learns its
   address.

Findings (measured here: a run takes 30-85 s, of which 5-7 s to a consensus and a ready
client; the 5 MB fetch takes under 1 s)
------------------------------------------------------------------------------------------
* Fixed: directory refreshes used to go to *random* V2Dir relays, so within a minute the
  client had shown its address to 4-5 of the 6 relays; test 4 failed then.
* Fixed: a relay cut off silently used to be noticed by nobody on the path (no
  keepalive on OR connections), so the circuits through it stayed BUILT at the client,
  the stalled stream stayed stalled until the application gave up, and each ready circuit
  through the dead relay cost a new stream one ``stream_timeout`` (measured: 22 s from
  the cut to the next successful fetch with one such circuit, 37 s with two, 67 s with
  four). Now (a) OR connections use TCP keepalive and TCP_USER_TIMEOUT (relay key
  ``tcp_user_timeout``, 5 s here, 60 s by default; specs/link.md): the guard's kernel
  drops the link to the cut middle, the guard DESTROYs the circuits towards the client
  and the stalled SOCKS stream ends with an error (test 2 asserts it; ~6 s here); and
  (b) once the consensus no longer lists the relay as Running, every circuit through it
  is retired (``CircuitManager._reap``, like tor's ``circuit_is_acceptable``). Measured
  now: the next fetch succeeds ~8 s after the cut.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import require_tool, sha256, unavailable
from netns_helpers import (
    ControlShell,
    Flow,
    Lab,
    NamespacesForbidden,
    content,
    read_pcap,
    sh,
    tcp_flows,
    wait_for,
)

pytestmark = pytest.mark.slow

CLIENT_IP = "10.10.0.2"
AUTH_IP = "10.20.0.2"
DEST_IP = "10.60.0.2"
DEST_NAME = "dest.test"
DEST_PORT = 8080
BAIT_DNS = "10.53.0.53"
OR_PORT = 9001
DIR_PORT = 7000
SOCKS_PORT = 9050
CONTROL_PORT = 9051
# name -> (address, exit?)
RELAYS = {
    "x1": ("10.31.0.2", True), "x2": ("10.32.0.2", True), "x3": ("10.33.0.2", True),
    "m1": ("10.41.0.2", False), "m2": ("10.42.0.2", False), "m3": ("10.43.0.2", False),
}
RELAY_IPS = {ip: name for name, (ip, _exit) in RELAYS.items()}
EXIT_IPS = {ip for ip, ex in RELAYS.values() if ex}
VOTING_INTERVAL = 4
STREAM_TIMEOUT = 15  # the client's default stream_timeout (seconds to wait for CONNECTED)
# after the cut, each ready circuit through the dead relay may cost one stream_timeout;
# plus the 5 s the test watches the stall and the 2 s paced fetch itself
RECOVERY_SLACK = 15
# relays' tcp_user_timeout (default 60 s): a link whose sent data stays unacknowledged this
# long is dropped by the kernel, so the guard notices the cut middle and DESTROYs back
TCP_USER_TIMEOUT = 5


def _toml(d: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())


@dataclass
class Net:
    lab: Lab
    tmp: Path
    fingerprints: dict[str, str]  # relay nickname -> fingerprint
    client: subprocess.Popen
    ctl: ControlShell
    dest_log: Path
    tcpdump: subprocess.Popen | None
    pcap: Path
    timings: dict[str, float] = field(default_factory=dict)

    def name_of(self, fp: str) -> str:
        return next((n for n, f in self.fingerprints.items() if f == fp), fp)

    def curl_argv(self, path: str, out: Path, max_time: float) -> list[str]:
        return ["curl", "-sS", "--max-time", str(max_time), "--socks5-hostname", f"127.0.0.1:{SOCKS_PORT}",
                "-o", str(out), f"http://{DEST_NAME}:{DEST_PORT}{path}"]

    def curl(self, path: str, out: Path, *, max_time: float = 60) -> subprocess.CompletedProcess:
        return self.lab.run("client", self.curl_argv(path, out, max_time), timeout=max_time + 10)

    def peers(self) -> list[str]:
        return self.dest_log.read_text().split()

    def client_events(self) -> list[dict]:
        out = []
        for line in (self.tmp / "client" / "log.txt").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def circuit_paths(self) -> dict[str, list[str]]:
        """circuit id -> hop fingerprints, from GETINFO circuit-status."""
        out = {}
        for line in self.ctl.getinfo("circuit-status"):
            parts = line.split()
            if len(parts) >= 3 and parts[2].startswith("$"):
                out[parts[0]] = [hop.split("~")[0].lstrip("$") for hop in parts[2].split(",")]
        return out

    def streams(self) -> list[tuple[str, str, str, str]]:
        """(stream id, status, circuit id, target) from GETINFO stream-status."""
        return [tuple(line.split()[:4]) for line in self.ctl.getinfo("stream-status")]  # type: ignore[misc]

    def guards(self) -> set[str]:
        """Fingerprints of the client's sampled guards (GETINFO entry-guards)."""
        return {line.split()[0].split("~")[0].lstrip("$") for line in self.ctl.getinfo("entry-guards")}


def _consensus_relays(lab: Lab) -> dict[str, tuple[str, set[str]]]:
    """nickname -> (fingerprint, flags) from the authority's current consensus."""
    p = lab.run("auth", ["curl", "-s", "--max-time", "5",
                         f"http://{AUTH_IP}:{DIR_PORT}/tor/status-vote/current/consensus"], timeout=15)
    out: dict[str, tuple[str, set[str]]] = {}
    nick = None
    for line in p.stdout.decode(errors="replace").splitlines():
        if line.startswith("r "):
            nick, fp = line.split()[1:3]
            out[nick] = (fp, set())
        elif line.startswith("s ") and nick is not None:
            out[nick][1].update(line.split()[1:])
    return out


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    require_tool("ip", "iproute2")
    require_tool("curl", "curl")
    from onionp2p.dir.authority import authority_line, load_or_create_authority_key

    tmp = tmp_path_factory.mktemp("netns")
    lab = Lab(prefix=f"ox{os.getpid() % 100000}")
    t0 = time.monotonic()
    try:
        try:
            lab.start_bridge()
        except NamespacesForbidden as exc:
            unavailable(f"the kernel forbids network namespaces here (ip netns add: {exc})")
        lab.add_host("client", CLIENT_IP, hosts={}, resolv=f"nameserver {BAIT_DNS}\n")
        sh("ip", "-n", lab.hosts["client"].ns, "neigh", "add", BAIT_DNS, "lladdr", "02:00:00:00:53:53",
           "dev", "eth0", "nud", "permanent")
        lab.add_host("auth", AUTH_IP)
        for name, (ip, exit_) in RELAYS.items():
            lab.add_host(name, ip, hosts={DEST_NAME: DEST_IP} if exit_ else None)
        lab.add_host("dest", DEST_IP)
        py = [sys.executable, "-m", "onionp2p"]

        d = tmp / "auth"
        d.mkdir(mode=0o700)
        line = authority_line("auth", AUTH_IP, DIR_PORT, load_or_create_authority_key(d))
        (d / "authority.toml").write_text(_toml({
            "nickname": "auth", "data_dir": str(d), "dir_address": f"{AUTH_IP}:{DIR_PORT}",
            "run_relay": False,
            "authorities": [line], "voting_interval": VOTING_INTERVAL, "assume_guard": True,
            "assume_exit": True, "stable_uptime": 0, "guard_uptime": 0}))
        procs = [lab.spawn("auth", [*py, "authority", "--config", str(d / "authority.toml")], d / "log.txt")]
        for name, (ip, exit_) in RELAYS.items():
            d = tmp / name
            d.mkdir(mode=0o700)
            (d / "relay.toml").write_text(_toml({
                "nickname": name, "data_dir": str(d), "or_address": f"{ip}:{OR_PORT}",
                "exit_policy": [f"accept *:{DEST_PORT}", "reject *:*"] if exit_ else "reject *:*",
                "exit_reject_private": not exit_, "extend_allow_private": True, "authorities": [line],
                "tcp_user_timeout": TCP_USER_TIMEOUT}))
            procs.append(lab.spawn(name, [*py, "relay", "--config", str(d / "relay.toml")], d / "log.txt"))
        dest_log = tmp / "dest-peers.txt"
        dest_log.touch()
        helper = str(Path(__file__).with_name("netns_helpers.py"))
        procs.append(lab.spawn("dest", [sys.executable, helper, "dest", "--bind", DEST_IP,
                                        "--port", str(DEST_PORT), "--log", str(dest_log)], tmp / "dest.txt"))

        def full_consensus():
            rs = _consensus_relays(lab)
            return rs if all(n in rs and "Running" in rs[n][1] for n in RELAYS) else None

        relays = wait_for(full_consensus, 60, "a consensus listing every relay", interval=0.5, alive=procs)
        t_consensus = time.monotonic() - t0

        pcap = tmp / "client.pcap"
        tcpdump = None
        if shutil.which("tcpdump"):
            td_log = tmp / "tcpdump.txt"
            tcpdump = lab.spawn("client", ["tcpdump", "-i", "eth0", "-n", "-U", "-s", "0", "-Q", "out",
                                           "-w", str(pcap)], td_log)
            wait_for(lambda: "listening on" in td_log.read_text(), 10, "tcpdump", alive=[tcpdump])

        d = tmp / "client"
        d.mkdir(mode=0o700)
        (d / "client.toml").write_text(_toml({
            "data_dir": str(d), "socks_address": f"127.0.0.1:{SOCKS_PORT}", "control_port": CONTROL_PORT,
            "authorities": [line], "preemptive_ports": [DEST_PORT], "stream_timeout": STREAM_TIMEOUT,
            "client_reject_internal_addresses": False,  # the destination is on a 10.x address
            "log_format": "json"}))
        client = lab.spawn("client", [*py, "client", "--config", str(d / "client.toml")], d / "log.txt")
        wait_for(lambda: "SOCKS5 proxy ready" in (d / "log.txt").read_text(), 60, "client bootstrap",
                 alive=[client, *procs])
        wait_for(lambda: "dest listening" in (tmp / "dest.txt").read_text(), 10, "destination", alive=procs)
        ctl = ControlShell(lab, "client", CONTROL_PORT, d / "control_auth_cookie", tmp / "ctl.txt")
        n = Net(lab, tmp, {nick: v[0] for nick, v in relays.items()}, client, ctl, dest_log, tcpdump, pcap)
        n.timings.update(consensus=t_consensus, ready=time.monotonic() - t0)
        yield n
        print(f"\nnetns timings (s): {json.dumps({k: round(v, 1) for k, v in n.timings.items()})}")
    finally:
        lab.close()


def test_fetch_destination_sees_only_exit(net):
    out = net.tmp / "file.bin"
    t = time.monotonic()
    p = net.curl("/file/5000000", out)
    net.timings["fetch_5MB"] = time.monotonic() - t
    assert p.returncode == 0, p.stderr.decode()
    assert sha256(out.read_bytes()) == sha256(content(5_000_000))
    peers = net.peers()
    assert peers, "the destination saw no connection"
    assert set(peers) <= EXIT_IPS, f"the destination saw {peers}; the exits are {sorted(EXIT_IPS)}"
    assert CLIENT_IP not in peers


def test_relay_cut_mid_transfer(net):
    before = {s[0] for s in net.streams()}
    slow = net.tmp / "slow.bin"
    curl = net.lab.spawn("client", net.curl_argv("/slow/40000000/1000000", slow, 80), net.tmp / "slow.txt")
    wait_for(lambda: slow.exists() and slow.stat().st_size > 1_000_000, 30, "the slow transfer", alive=[curl])
    live = [s for s in net.streams() if s[0] not in before and s[1] == "SUCCEEDED"]
    assert len(live) == 1, net.streams()
    paths = net.circuit_paths()
    path = paths[live[0][2]]
    victim = net.name_of(path[1])  # the middle relay of the circuit carrying the transfer
    assert victim in RELAYS, path
    # each ready circuit through the victim may cost the next stream one stream_timeout
    doomed = sum(1 for p in paths.values() if net.fingerprints[victim] in p)
    bound = doomed * STREAM_TIMEOUT + RECOVERY_SLACK
    net.lab.link(victim, up=False)
    t_cut = time.monotonic()
    time.sleep(2)  # cells already past the cut may still arrive
    size = slow.stat().st_size
    time.sleep(3)
    stalled = slow.stat().st_size == size or curl.poll() not in (None, 0)
    assert stalled, "the transfer went on without its middle relay"
    assert slow.stat().st_size < 40_000_000
    # the guard's kernel gives up on the unacknowledged link to the cut middle, the guard
    # tears the circuit down towards the client, and the stalled SOCKS stream ends with an
    # error instead of hanging until the application gives up
    wait_for(lambda: curl.poll() is not None, TCP_USER_TIMEOUT + 20, "the stalled transfer to end")
    net.timings["stalled_stream_ended_after_cut"] = time.monotonic() - t_cut
    assert curl.returncode != 0 and slow.stat().st_size < 40_000_000

    # a new fetch works within the bound, through a circuit that avoids the dead relay
    attempts: list[tuple[float, int]] = []
    while True:
        remaining = bound - (time.monotonic() - t_cut)
        assert remaining > 1, (f"no fetch succeeded within {bound} s of cutting {victim} "
                               f"({doomed} circuits through it): {attempts}")
        before = {s[0] for s in net.streams()}
        out = net.tmp / f"after{len(attempts)}.bin"
        t = time.monotonic()
        fetch = net.lab.spawn("client", net.curl_argv("/slow/2000000/1000000", out, remaining),
                              net.tmp / f"after{len(attempts)}.txt")
        used: dict[str, list[str]] = {}
        while fetch.poll() is None:
            for sid, status, circ, _target in net.streams():
                if sid not in before and status == "SUCCEEDED" and circ not in used:
                    used[circ] = [net.name_of(fp) for fp in net.circuit_paths().get(circ, [])]
            time.sleep(0.3)
        attempts.append((round(time.monotonic() - t, 1), fetch.returncode))
        if fetch.returncode == 0:
            break
    net.timings["recovery_after_cut"] = time.monotonic() - t_cut
    net.timings["recovery_bound"] = bound
    net.timings["recovery_attempts"] = len(attempts)
    assert sha256(out.read_bytes()) == sha256(content(2_000_000))
    assert len(used) == 1, (used, net.streams())
    new_path = next(iter(used.values()))
    assert len(new_path) == 3 and victim not in new_path, (victim, new_path)
    assert set(net.peers()) <= EXIT_IPS


# -- the capture --------------------------------------------------------------------------------------


def _stream_bytes(flow: Flow, packets) -> bytes:
    """What the client sent on one TCP connection, reassembled by sequence number."""
    segs = {}
    isn = None
    for p in packets:
        if (p.ethertype == 0x0800 and p.proto == 6 and p.src == flow.src and p.sport == flow.sport
                and p.dst == flow.dst and p.dport == flow.dport):
            if p.flags & 0x02:
                isn = p.seq
            elif p.payload:
                segs.setdefault(p.seq, p.payload)
    assert isn is not None
    out = bytearray()
    nxt = (isn + 1) & 0xFFFFFFFF
    for seq in sorted(segs, key=lambda s: (s - nxt) & 0xFFFFFFFF):
        data = segs[seq]
        skip = (nxt - seq) & 0xFFFFFFFF
        if skip >= 1 << 31:  # a gap: the capture missed a segment
            break
        if skip < len(data):
            out += data[skip:]
            nxt = (nxt + len(data) - skip) & 0xFFFFFFFF
    return bytes(out)


def _tls_records(data: bytes) -> int:
    """Check that ``data`` is a sequence of TLS records (the last may be cut short); return their count."""
    off = n = 0
    while off + 5 <= len(data):
        ctype, major, minor = data[off:off + 3]
        length = int.from_bytes(data[off + 3:off + 5], "big")
        assert ctype in (20, 21, 22, 23), f"not a TLS record at offset {off}: {data[off:off + 16].hex()}"
        assert major == 3 and minor <= 4, f"bad TLS version at offset {off}: {data[off:off + 5].hex()}"
        assert length <= 16384 + 2048, f"oversized TLS record at offset {off}"
        off += 5 + length
        n += 1
    return n


@pytest.fixture(scope="module")
def capture(net):
    """Stop tcpdump after one more fetch (by name, resolved at the exit) and read what it saw."""
    if net.tcpdump is None:
        unavailable("tcpdump not installed (Debian package tcpdump; tools/test installs it)")
    out = net.tmp / "last.bin"
    p = net.curl("/file/300000", out)
    assert p.returncode == 0, p.stderr.decode()
    assert sha256(out.read_bytes()) == sha256(content(300_000))
    time.sleep(0.5)
    net.lab.stop(net.tcpdump, signal.SIGINT)
    stats = (net.tmp / "tcpdump.txt").read_text()
    assert re.search(r"\b0 packets dropped by kernel", stats), stats
    packets = read_pcap(net.pcap)
    assert packets, stats
    return packets


def test_client_sends_only_tls(net, capture):
    packets = capture
    kinds = {p.ethertype for p in packets}
    assert kinds <= {0x0800, 0x0806}, f"non-IPv4, non-ARP frames: {sorted(hex(k) for k in kinds)}"
    ip = [p for p in packets if p.ethertype == 0x0800]
    assert all(p.src == CLIENT_IP for p in ip), {p.src for p in ip}
    assert not [p for p in ip if p.proto != 6], "the client namespace sent non-TCP packets (DNS?): " + repr(
        sorted({(p.proto, p.dst, p.dport) for p in ip if p.proto != 6}))
    assert not [p for p in ip if p.dst in (DEST_IP, BAIT_DNS)]
    arp_targets = {p.arp_target for p in packets if p.ethertype == 0x0806}
    assert arp_targets <= set(RELAY_IPS) | {AUTH_IP}, arp_targets

    flows = tcp_flows(packets, CLIENT_IP)
    keys = {(f.sport, f.dst, f.dport) for f in flows}
    stray = {(p.sport, p.dst, p.dport) for p in ip} - keys
    assert not stray, f"TCP packets outside connections the client opened: {stray}"
    or_flows = [f for f in flows if f.dst in RELAY_IPS and f.dport == OR_PORT]
    dir_flows = [f for f in flows if f.dst == AUTH_IP and f.dport == DIR_PORT]
    others = [(f.dst, f.dport) for f in flows if f not in or_flows and f not in dir_flows]
    assert not others, f"connections to something else: {others}"
    records = 0
    for f in or_flows:
        data = _stream_bytes(f, packets)
        if not data:
            continue  # the connection never got as far as sending (e.g. to the cut relay)
        assert data[0] == 0x16 and data[5] == 0x01, \
            f"the first bytes to {f.dst} are not a TLS ClientHello: {data[:8].hex()}"
        records += _tls_records(data)
    assert records > 0
    for f in dir_flows:  # the bootstrap: no consensus yet, so no relay to ask
        data = _stream_bytes(f, packets)
        assert data.startswith(b"GET /tor/status-vote/current/consensus HTTP/1."), data[:80]
    assert len(dir_flows) >= 1
    assert not any(DEST_NAME.encode() in p.payload for p in ip)

    # which relays the client talked to (sent bytes to: a SYN alone, e.g. to the cut relay,
    # reaches nobody). All are relays of the consensus (checked above); the circuits the
    # control port lists start at a guard. The others served the consensus over one-hop
    # BEGIN_DIR circuits, which the control port does not list (see test 4).
    guard_names = {net.name_of(g) for g in net.guards()}
    contacted = {RELAY_IPS[f.dst] for f in or_flows if f.bytes_sent}
    net.timings["relays_contacted"] = len(contacted)
    logged = {ev["source"].split()[1] for ev in net.client_events()
              if ev.get("source", "").startswith("relay ")}
    print(f"\nclient contacted {sorted(contacted)}; its guards: {sorted(guard_names)}; "
          f"directory sources in its log: {sorted(logged)}")
    paths = net.circuit_paths()
    assert paths
    for circ, path in paths.items():
        assert net.name_of(path[0]) in guard_names, (circ, [net.name_of(fp) for fp in path], guard_names)


def test_client_contacts_only_guards(net, capture):
    guards = {net.name_of(g) for g in net.guards()}
    contacted = {RELAY_IPS[f.dst] for f in tcp_flows(capture, CLIENT_IP)
                 if f.dst in RELAY_IPS and f.bytes_sent}
    assert contacted <= guards, f"non-guard relays contacted: {sorted(contacted - guards)}"
