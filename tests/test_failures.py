"""Clean failures (issue 17, section 1), with real ``python -m onionp2p`` processes.

Every listener binds before anything slow happens; one that cannot bind (a socket this test
holds on its port) ends the process with exit status 2 and exactly one line on stderr naming
the listener, the address and the reason. ``onionp2p testnet`` with a relay that cannot start
names it, quotes the end of its log and keeps its (temporary) data directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BUSY = "address already in use"


def run(*args: str, timeout: float = 60, env: dict | None = None, cwd: Path | None = None,
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onionp2p", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def toml(path: Path, **table) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    return path


def held_port() -> socket.socket:
    """A listening socket on 127.0.0.1 (its port is what the node is told to use)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def authority_line(tmp: Path, dir_port: int) -> str:
    """The line of the authority in ``tmp/auth`` (its key created by --show-identity)."""
    cfg = toml(tmp / "auth" / "show.toml", data_dir=".", nickname="auth0",
               dir_address=f"127.0.0.1:{dir_port}")
    out = run("authority", "--config", str(cfg), "--show-identity")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


#: (command, listener kind in the message, config key that gets the busy port)
CASES = [
    ("relay", "OR port", "or_address"),
    ("relay", "control port", "control_port"),
    ("relay", "metrics port", "metrics_port"),
    ("client", "SOCKS port", "socks_address"),
    ("client", "control port", "control_port"),
    ("client", "metrics port", "metrics_port"),
    ("authority", "directory port", "dir_address"),
    ("authority", "OR port", "or_address"),
    ("authority", "control port", "control_port"),
]


@pytest.mark.parametrize(("command", "kind", "key"), CASES, ids=[f"{c}-{k}" for c, _, k in CASES])
def test_busy_port_is_one_line_and_exit_2(tmp_path, command, kind, key):
    (tmp_path / "auth").mkdir()
    with held_port() as busy:
        port = busy.getsockname()[1]
        value = f"127.0.0.1:{port}" if key.endswith("_address") else port
        table = {"data_dir": ".", "log_level": "warning"}
        if command == "relay":
            table |= {"or_address": "127.0.0.1:0", key: value}
        elif command == "client":
            # a directory nobody answers: were the SOCKS port bound after the bootstrap, the
            # process would fail on the directory (or wait), not on the port
            dead = free_port()
            table |= {"socks_address": "127.0.0.1:0", key: value,
                      "authorities": [authority_line(tmp_path, dead)]}
        else:
            dir_port = port if key == "dir_address" else free_port()
            line = authority_line(tmp_path, dir_port)
            table |= {"nickname": "auth0", "or_address": "127.0.0.1:0", "dir_address": f"127.0.0.1:{dir_port}",
                      "authorities": [line], key: value}
        cfg = toml(tmp_path / "auth" / f"{command}.toml", **table)
        started = time.monotonic()
        out = run(command, "--config", str(cfg))
        elapsed = time.monotonic() - started
    assert out.returncode == 2, out.stderr
    expected = f"onionp2p: cannot listen on {kind} 127.0.0.1:{port}: {BUSY}"
    assert out.stderr.splitlines() == [expected], out.stderr
    assert elapsed < 20  # nothing slow (bootstrap, key generation retries) before it


def test_testnet_busy_socks_port_fails_before_any_process_starts(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    with held_port() as busy:
        port = busy.getsockname()[1]
        out = run("testnet", "--socks-port", str(port), "--control-port", "0", "--relays", "3",
                  "--exits", "1", env=env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"onionp2p: cannot listen on SOCKS port 127.0.0.1:{port}: {BUSY}"]
    assert list(tmp_path.iterdir()) == []  # nothing ran: nothing to keep


def _free_range(n: int) -> int:
    """A base port with ``n`` consecutive ports free right now."""
    for base in range(24000 + os.getpid() % 4000, 60000, 97):
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port range")


@pytest.mark.slow
def test_testnet_with_a_relay_that_cannot_start_keeps_its_logs(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    base = _free_range(4)  # auth0, exit0, relay1, relay2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 3))  # relay2's OR port
        busy.listen()
        out = run("testnet", "--socks-port", "auto", "--control-port", "0", "--relays", "3", "--exits", "1",
                  "--base-port", str(base), env=env, timeout=150)
    assert out.returncode == 2, out.stderr
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("onionp2p-testnet-")]
    assert len(kept) == 1, out.stderr
    log = kept[0] / "relay2" / "log.txt"
    failure = f"onionp2p: cannot listen on OR port 127.0.0.1:{base + 3}: {BUSY}"
    assert log.read_text().splitlines() == [failure]
    assert f"testnet process relay2 exited early with status 2; the end of {log}:" in out.stderr
    assert f"  | {failure}" in out.stderr.splitlines()  # the tail of its log, quoted
    assert f"testnet: kept {kept[0]}" in out.stderr
    for other in ("auth0", "exit0", "relay1"):  # the others' logs are kept too
        assert (kept[0] / other / "log.txt").exists()


def test_log_file_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path):
    cfg = toml(tmp_path / "relay.toml", data_dir=".", or_address="127.0.0.1:0", log_file="missing/relay.log")
    out = run("relay", "--config", str(cfg))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"onionp2p: error: log_file: cannot open {tmp_path}/missing/relay.log: No such file or directory"]
    assert not (tmp_path / "keys").exists()  # nothing started


async def test_socks_requests_during_the_bootstrap_wait_for_it(exit_relays, http_server, tmp_path):
    """The SOCKS port is open before the directory is there (tor's behaviour): a request
    that arrives then waits for enough directory info instead of failing."""
    import asyncio

    from conftest import RELAY_FLAGS, http_get, socks_connect

    from onionp2p.client.node import ClientNode
    from onionp2p.config import ClientConfig
    from onionp2p.proto.directory import RouterStatus

    statuses: list[RouterStatus] = []  # no directory info yet
    cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=tmp_path / "client",
                       socks_address=("127.0.0.1", 0), enforce_distinct_subnets=False, preemptive_circuits=1)
    node = ClientNode(cfg, routers=lambda: statuses)
    try:
        await node.listen()
        request = asyncio.ensure_future(socks_connect(node.socks_port, "127.0.0.1", http_server.port))
        await asyncio.sleep(1.0)
        assert not request.done()  # waiting, not refused for want of relays
        statuses.extend(RouterStatus(r.info(), RELAY_FLAGS, bandwidth=1000) for r in exit_relays)
        await node.start(ready_timeout=30)
        reader, writer = await asyncio.wait_for(request, 30)
        assert len(await http_get(reader, writer, "/1000")) == 1000
        writer.close()
    finally:
        await node.stop()


@pytest.mark.slow
def test_testnet_reports_a_process_that_dies_after_it_is_ready(tmp_path):
    import signal as sig

    from conftest import RunningTestnet

    net = RunningTestnet(tmp_path / "net", ["--relays", "3", "--exits", "1"])
    try:
        found = subprocess.run(["pgrep", "-f", str(tmp_path / "net" / "relay2" / "relay.toml")],
                               capture_output=True, text=True).stdout.split()
        assert len(found) == 1, found
        os.kill(int(found[0]), sig.SIGKILL)
        log = tmp_path / "net" / "relay2" / "log.txt"
        expected = f"testnet: warning: testnet process relay2 exited early with status -9; the end of {log}:"
        end = time.monotonic() + 20
        while expected not in Path(net.out.name).read_text():
            assert time.monotonic() < end, Path(net.out.name).read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(3)  # reported once, not at every check
        assert Path(net.out.name).read_text().count(expected) == 1
        assert net.proc.poll() is None  # the rest of the testnet runs on
    finally:
        assert net.stop() == 0
