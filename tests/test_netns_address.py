"""A relay behind NAT: it listens on 0.0.0.0 and publishes ``address`` (network namespaces).

Topology (every host a namespace; the bridge and ``netns_helpers.Lab`` as in test_netns.py)::

    client 10.10.0.2 ─┐
    shared 10.20.0.2 ─┼─ bridge ─ gw 10.50.0.2 ══ veth ══ natted 192.168.7.2 (0.0.0.0:9001)
    dest   10.60.0.2 ─┘            DNAT 10.50.0.2:9001 -> 192.168.7.2:9001, masquerade out

``natted`` has no address on the shared network at all: its only interface is a veth to
the ``gw`` namespace, which forwards, DNATs its public port to it and masquerades what it
sends (nftables, like a home router). The relay there binds ``0.0.0.0:9001`` and publishes
``address = "10.50.0.2"``. ``shared`` runs the authority (DirPort 7000) and the other two
relays (a middle on 9001 and an exit on 9002). With three relays every 3-hop circuit goes
through ``natted``, so the client's fetch of the destination (curl through its SOCKS port,
in its own namespace) crosses the NAT twice.

Asserted: the consensus lists ``natted`` at 10.50.0.2:9001 (the advertised address, which
the authority's reachability test reached through the DNAT); the relay logged tor's
"Self-testing indicates your ORPort 10.50.0.2:9001 is reachable from the outside.
Excellent."; 300 kB through the network arrive intact; and the same relay binding
0.0.0.0 without ``address`` refuses to start with one config line and exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sha256, unavailable
from netns_helpers import Lab, NamespacesForbidden, content, sh, wait_for

pytestmark = pytest.mark.slow

CLIENT_IP, SHARED_IP, GW_IP, DEST_IP = "10.10.0.2", "10.20.0.2", "10.50.0.2", "10.60.0.2"
INNER_GW, INNER_RELAY = "192.168.7.1", "192.168.7.2"
DIR_PORT, OR_PORT, EXIT_PORT, DEST_PORT, SOCKS_PORT = 7000, 9001, 9002, 8080, 9050

NAT_RULES = f"""
table ip nat {{
  chain prerouting {{ type nat hook prerouting priority dstnat; ip daddr {GW_IP} tcp dport {OR_PORT} \
dnat to {INNER_RELAY}:{OR_PORT}; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; ip saddr 192.168.7.0/24 oifname "eth0" \
masquerade; }}
}}
"""




def _toml(d: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())


def _nat_gateway(lab: Lab) -> None:
    """``gw`` on the bridge, ``natted`` behind it (its only interface is the veth to ``gw``)."""
    gw = lab.add_host("gw", GW_IP)
    inner = f"{lab.prefix}natted"
    lab._add_ns(inner)
    sh("ip", "link", "add", "in0", "netns", gw.ns, "type", "veth", "peer", "name", "eth0", "netns", inner)
    sh("ip", "-n", gw.ns, "addr", "add", f"{INNER_GW}/24", "dev", "in0")
    sh("ip", "-n", gw.ns, "link", "set", "in0", "up")
    sh("ip", "-n", inner, "addr", "add", f"{INNER_RELAY}/24", "dev", "eth0")
    sh("ip", "-n", inner, "link", "set", "eth0", "up")
    sh("ip", "-n", inner, "route", "add", "default", "via", INNER_GW)
    sh("ip", "netns", "exec", gw.ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    p = subprocess.run(["ip", "netns", "exec", gw.ns, "nft", "-f", "-"], input=NAT_RULES, text=True,
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lab.hosts["natted"] = type(gw)("natted", inner, INNER_RELAY)


def _consensus(lab: Lab) -> dict[str, tuple[str, int, set[str]]]:
    """nickname -> (address, ORPort, flags) of the authority's current consensus."""
    p = lab.run("shared", ["curl", "-s", "--max-time", "5",
                           f"http://{SHARED_IP}:{DIR_PORT}/tor/status-vote/current/consensus"], timeout=15)
    out: dict[str, tuple[str, int, set[str]]] = {}
    nick = None
    for line in p.stdout.decode(errors="replace").splitlines():
        parts = line.split()
        if line.startswith("r ") and len(parts) >= 6:  # r NICK FINGERPRINT ED25519 ADDRESS ORPORT
            nick = parts[1]
            out[nick] = (parts[4], int(parts[5]), set())
        elif line.startswith("s ") and nick in out:
            out[nick][2].update(parts[1:])
    return out


def test_relay_behind_nat_publishes_its_address(tmp_path):
    if not shutil.which("ip") or not shutil.which("curl") or not shutil.which("nft"):
        unavailable("needs iproute2, curl and nftables (tools/test installs them)")
    from onionp2p.dir.authority import authority_line, load_or_create_authority_key

    lab = Lab(prefix=f"oa{os.getpid() % 100000}")
    py = [sys.executable, "-m", "onionp2p"]
    try:
        try:
            lab.start_bridge()
        except NamespacesForbidden as exc:
            unavailable(f"the kernel forbids network namespaces here (ip netns add: {exc})")
        for name, ip in (("client", CLIENT_IP), ("shared", SHARED_IP), ("dest", DEST_IP)):
            lab.add_host(name, ip)
        _nat_gateway(lab)

        d = tmp_path / "auth"
        d.mkdir(mode=0o700)
        line = authority_line("auth", SHARED_IP, DIR_PORT, load_or_create_authority_key(d))
        (d / "authority.toml").write_text(_toml({
            "nickname": "auth", "data_dir": str(d), "dir_address": f"{SHARED_IP}:{DIR_PORT}",
            "run_relay": False, "authorities": [line], "voting_interval": 3, "assume_guard": True,
            "assume_exit": True,
            "stable_uptime": 0, "guard_uptime": 0}))
        procs = [lab.spawn("shared", [*py, "authority", "--config", str(d / "authority.toml")],
                           d / "log.txt")]
        relays = {
            "middle": ("shared", {"or_address": f"{SHARED_IP}:{OR_PORT}"}),
            "exit": ("shared", {"or_address": f"{SHARED_IP}:{EXIT_PORT}", "exit_policy": "accept *:*"}),
            "natted": ("natted", {"or_address": f"0.0.0.0:{OR_PORT}", "address": GW_IP}),
        }
        for name, (host, extra) in relays.items():
            d = tmp_path / name
            d.mkdir(mode=0o700)
            (d / "relay.toml").write_text(_toml({
                "nickname": name, "data_dir": str(d), "exit_reject_private": False,
                "extend_allow_private": True, "authorities": [line], "log_format": "json", **extra}))
            procs.append(lab.spawn(host, [*py, "relay", "--config", str(d / "relay.toml")], d / "log.txt"))
        dest_log = tmp_path / "dest-peers.txt"
        helper = str(Path(__file__).with_name("netns_helpers.py"))
        procs.append(lab.spawn("dest", [sys.executable, helper, "dest", "--bind", DEST_IP,
                                        "--port", str(DEST_PORT), "--log", str(dest_log)],
                               tmp_path / "dest.txt"))

        def all_running():
            rs = _consensus(lab)
            return rs if all(n in rs and "Running" in rs[n][2] for n in relays) else None

        listed = wait_for(all_running, 45, "a consensus listing the three relays", interval=0.5, alive=procs)
        assert listed["natted"][:2] == (GW_IP, OR_PORT)  # the advertised address, not 0.0.0.0 or 192.168.x
        # three relays, one exit: every circuit's guard and middle are "middle" and "natted"
        assert set(listed) == set(relays) and "Exit" not in listed["natted"][2] | listed["middle"][2]
        natted_log = (tmp_path / "natted" / "log.txt").read_text()
        assert f"listening on 0.0.0.0:{OR_PORT} published as {GW_IP}:{OR_PORT} fingerprint" in natted_log
        assert (f"Self-testing indicates your ORPort {GW_IP}:{OR_PORT} is reachable from the outside. "
                "Excellent.") in natted_log

        d = tmp_path / "client"
        d.mkdir(mode=0o700)
        (d / "client.toml").write_text(_toml({
            "data_dir": str(d), "socks_address": f"127.0.0.1:{SOCKS_PORT}", "authorities": [line],
            "enforce_distinct_subnets": False, "preemptive_ports": [DEST_PORT],
            "client_reject_internal_addresses": False}))
        client = lab.spawn("client", [*py, "client", "--config", str(d / "client.toml")], d / "log.txt")
        wait_for(lambda: "SOCKS5 proxy ready" in (d / "log.txt").read_text(), 45, "client bootstrap",
                 alive=[client, *procs])
        out = tmp_path / "file.bin"
        p = lab.run("client", ["curl", "-sS", "--max-time", "30", "--socks5-hostname",
                               f"127.0.0.1:{SOCKS_PORT}", "-o", str(out),
                               f"http://{DEST_IP}:{DEST_PORT}/file/300000"], timeout=40)
        assert p.returncode == 0, p.stderr.decode()
        assert sha256(out.read_bytes()) == sha256(content(300_000))
        t = time.monotonic()
        d = tmp_path / "nat-noaddr"
        d.mkdir(mode=0o700)
        (d / "relay.toml").write_text(_toml({"nickname": "noaddr", "data_dir": str(d),
                                             "or_address": f"0.0.0.0:{OR_PORT + 1}", "authorities": [line]}))
        p = lab.run("natted", [*py, "relay", "--config", str(d / "relay.toml")], timeout=30)
        err = p.stderr.decode().strip().splitlines()
        assert p.returncode == 2 and len(err) == 1, (p.returncode, err)
        assert "or_address" in err[0] and "set `address`" in err[0], err
        assert time.monotonic() - t < 15
    finally:
        lab.close()
