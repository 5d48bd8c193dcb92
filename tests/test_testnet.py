"""`onionp2p testnet` end to end, through real clients nobody here wrote.

One testnet process (authority + 5 relays as child processes, client in-process) serves
the whole module; a local HTTP server on 127.0.0.1 is the destination.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import RunningTestnet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text("<html><body><h1 id='t'>hello through onionp2p</h1></body></html>\n")
    big = os.urandom(20_000_000)
    (root / "big.bin").write_bytes(big)
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"port": srv.server_address[1], "sha": hashlib.sha256(big).hexdigest(), "root": root}
    srv.shutdown()


@pytest.fixture(scope="module")
def testnet(tmp_path_factory):
    # notice: the level of tor's own start-up and "received reload signal" lines
    net = RunningTestnet(tmp_path_factory.mktemp("tn") / "net", extra=("--log-level", "notice"))
    yield net
    net.stop()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                          capture_output=True, timeout=timeout + 10)


def test_curl_socks5_hostname_page_and_20mb(testnet, www):
    p = curl("--socks5-hostname", f"127.0.0.1:{testnet.socks}", f"http://localhost:{www['port']}/index.html")
    assert p.returncode == 0, p.stderr
    assert b"hello through onionp2p" in p.stdout
    p = curl("--socks5-hostname", f"127.0.0.1:{testnet.socks}", f"http://localhost:{www['port']}/big.bin",
             timeout=120)
    assert p.returncode == 0, p.stderr
    assert hashlib.sha256(p.stdout).hexdigest() == www["sha"]


def test_metrics_port_counts_the_traffic(testnet, www):
    """`--metrics-port`: Prometheus text that prometheus_client parses, counting real bytes."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple], float]:
        p = curl(f"http://127.0.0.1:{testnet.metrics}/metrics")
        assert p.returncode == 0, p.stderr
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(p.stdout.decode()) for s in fam.samples}

    def data_bytes(samples) -> float:
        return sum(v for (name, _labels), v in samples.items() if name == "onionp2p_circuit_data_bytes_total")

    before = scrape()
    p = curl("--socks5-hostname", f"127.0.0.1:{testnet.socks}", f"http://localhost:{www['port']}/big.bin",
             timeout=120)
    assert p.returncode == 0, p.stderr
    after = scrape()
    assert data_bytes(after) - data_bytes(before) >= 20_000_000
    assert after[("onionp2p_bootstrap_progress", ())] == 100
    assert sum(v for (name, labels), v in after.items()
               if name == "onionp2p_circuit_builds_total" and ("result", "ok") in labels) >= 1


@pytest.mark.parametrize("flag", ["--socks5", "--socks4", "--socks4a"])
def test_curl_other_socks_versions(testnet, www, flag):
    p = curl(flag, f"127.0.0.1:{testnet.socks}", f"http://127.0.0.1:{www['port']}/index.html")
    assert p.returncode == 0, p.stderr
    assert b"hello through onionp2p" in p.stdout


def test_python_socks_with_credentials(testnet, www):
    from python_socks.async_.asyncio import Proxy

    async def fetch():
        proxy = Proxy.from_url(f"socks5://alice:secret@127.0.0.1:{testnet.socks}", rdns=True)
        sock = await proxy.connect(dest_host="localhost", dest_port=www["port"], timeout=60)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = await reader.read(-1)
        writer.close()
        return data

    assert b"hello through onionp2p" in asyncio.run(fetch())


@pytest.mark.skipif(not shutil.which("proxychains4"), reason="proxychains4 not installed (tools/test installs it)")
def test_proxychains(testnet, www, tmp_path):
    conf = tmp_path / "proxychains.conf"
    conf.write_text(f"strict_chain\nproxy_dns\ntcp_read_time_out 60000\ntcp_connect_time_out 30000\n"
                    f"[ProxyList]\nsocks5 127.0.0.1 {testnet.socks}\n")
    p = subprocess.run(["proxychains4", "-q", "-f", str(conf), "curl", "-sS", "--max-time", "60",
                        f"http://127.0.0.1:{www['port']}/index.html"], capture_output=True, timeout=90)
    assert p.returncode == 0, p.stderr
    assert b"hello through onionp2p" in p.stdout


def test_tor_resolve_uses_the_socks_extensions(testnet):
    if not shutil.which("tor-resolve"):
        pytest.skip("tor-resolve (Debian package tor) not installed")
    p = subprocess.run(["tor-resolve", "localhost", f"127.0.0.1:{testnet.socks}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "127.0.0.1"
    p = subprocess.run(["tor-resolve", "-x", "127.0.0.1", f"127.0.0.1:{testnet.socks}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "localhost"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium(), reason="chromium not installed (tools/test installs it)")
def test_headless_chromium_loads_a_page(testnet, www, tmp_path):
    p = subprocess.run([
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--proxy-server=socks5://127.0.0.1:{testnet.socks}", "--proxy-bypass-list=<-loopback>",
        "--dump-dom", f"http://127.0.0.1:{www['port']}/index.html",
    ], capture_output=True, text=True, timeout=120)
    assert "hello through onionp2p" in p.stdout, p.stderr[-2000:]


def test_different_credentials_never_share_a_circuit(testnet, www):
    from python_socks.async_.asyncio import Proxy
    from stem.control import Controller

    async def open_stream(user):
        proxy = Proxy.from_url(f"socks5://{user}:pw@127.0.0.1:{testnet.socks}", rdns=True)
        sock = await proxy.connect(dest_host="127.0.0.1", dest_port=www["port"], timeout=60)
        return await asyncio.open_connection(sock=sock)

    async def run():
        held = [await open_stream(u) for u in ("alice", "bob", "alice", "carol")]
        with Controller.from_port(port=testnet.control) as ctl:
            ctl.authenticate()
            streams = [s for s in ctl.get_streams() if s.status == "SUCCEEDED"]
            circuits = {c.id: c for c in ctl.get_circuits()}
        for _r, w in held:
            w.close()
        return streams, circuits

    streams, circuits = asyncio.run(run())
    assert len(streams) >= 4
    # stream-status lists "id status circ target"; our four streams are the newest, in order
    newest = sorted(streams, key=lambda s: int(s.id))[-4:]
    by_user: dict[str, set[str]] = {}
    for user, s in zip(("alice", "bob", "alice", "carol"), newest):
        by_user.setdefault(user, set()).add(s.circ_id)
    # alice's two streams share one circuit; nobody else is on it; all are 3-hop circuits
    assert len(by_user["alice"]) == 1
    assert not (by_user["alice"] & by_user["bob"]) and not (by_user["alice"] & by_user["carol"])
    assert not (by_user["bob"] & by_user["carol"])
    for ids in by_user.values():
        for cid in ids:
            assert len(circuits[cid].path) == 3


def test_authority_gone_clients_keep_working(testnet, www):
    auth = [p for p in testnet.children()
            if "authority" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert auth, "authority process not found"
    for pid in auth:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    from stem import Signal
    from stem.control import Controller

    with Controller.from_port(port=testnet.control) as ctl:
        ctl.authenticate()
        ctl.signal(Signal.NEWNYM)  # force new circuits: they must still be built from the held consensus
    for i in range(3):
        p = curl("-U", f"after{i}:x", "--socks5-hostname", f"127.0.0.1:{testnet.socks}",
                 f"http://localhost:{www['port']}/index.html")
        assert p.returncode == 0, p.stderr
        assert b"hello through onionp2p" in p.stdout


def circuits_json(net) -> dict:
    """``onionp2p circuits --json`` against the testnet's client, as a user runs it."""
    p = subprocess.run([sys.executable, "-m", "onionp2p", "circuits", "--json", "--control-port", str(net.control),
                        "--cookie", str(net.cookie)], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_every_circuit_uses_ntor_v3_vegas_and_cgo(testnet, www):
    p = curl("--socks5-hostname", f"127.0.0.1:{testnet.socks}", f"http://localhost:{www['port']}/index.html")
    assert p.returncode == 0, p.stderr
    built = [c for c in circuits_json(testnet)["circuits"] if c["state"] == "BUILT"]
    # the one-hop directory circuit the client keeps for its consensus fetches (tor's way)
    # also uses ntor-v3; the others are the three-hop circuits of streams
    onehop = [c for c in built if len(c["path"]) == 1]
    assert all(c["path"][0]["handshake"] == "ntor-v3" for c in onehop)
    built = [c for c in built if len(c["path"]) != 1]
    assert built
    for c in built:
        assert [h["handshake"] for h in c["path"]] == ["ntor-v3"] * 3
        assert [h["relay_crypto"] for h in c["path"]] == ["cgo"] * 3
        assert c["congestion_control"] == "vegas" and c["cc"]["cwnd"] >= 124


def test_link_delay_and_fixed_windows(tmp_path, www):
    """``--link-delay``: every relay behind an ``onionp2p wan`` proxy; a page still loads,
    every circuit hop costs the delay; ``--no-congestion-control``: fixed windows."""
    net = RunningTestnet(tmp_path / "wan", ["--relays", "3", "--exits", "1", "--link-delay", "40",
                                            "--no-congestion-control"])
    try:
        out = Path(net.out.name).read_text()
        assert "one-way delay of links to each relay (ms): exit0 40, relay1 40, relay2 40" in out
        for name in ("exit0", "relay1", "relay2"):  # each listens on one port, advertises another
            listen = int(re.search(r'or_address = "127.0.0.1:(\d+)"', (net.data_dir / name / "relay.toml")
                                   .read_text()).group(1))
            advertised = json.loads((net.data_dir / name / "relay-info.json").read_text())["or_port"]
            assert listen != advertised
        t0 = time.monotonic()
        p = curl("--socks5-hostname", f"127.0.0.1:{net.socks}", f"http://localhost:{www['port']}/index.html")
        assert p.returncode == 0 and b"hello through onionp2p" in p.stdout, p.stderr
        # BEGIN/CONNECTED and the request/answer cross the three delayed links: >= 2 x 2 x 120 ms
        assert time.monotonic() - t0 >= 0.45
        built = [c for c in circuits_json(net)["circuits"] if c["state"] == "BUILT"]
        assert built and all(c["congestion_control"] == "fixed" and c["cc"] is None for c in built)
        # CGO needs congestion control on the hop: without it every hop keeps tor1
        assert all(h["relay_crypto"] == "tor1" for c in built for h in c["path"])
    finally:
        assert net.stop() == 0


def test_sighup_reaches_the_relays_and_the_testnet_keeps_running(testnet, www):
    """SIGHUP to `onionp2p testnet` (a terminal closing, `kill -HUP`) is passed on to its relays
    and authorities (tor's reload: config and log files); nothing exits."""
    children = testnet.children()
    # the relays and authorities still running (an earlier test kills the authority)
    alive = {d.name for d in testnet.data_dir.iterdir() if (d / "log.txt").exists()
             and any(f"{d}/".encode() in Path(f"/proc/{p}/cmdline").read_bytes() for p in children)}
    logs = sorted(testnet.data_dir / name / "log.txt" for name in alive)
    assert len(logs) >= 5, alive
    before = {p: p.read_text(errors="replace").count("received SIGHUP") for p in logs}
    testnet.proc.send_signal(signal.SIGHUP)
    end = time.time() + 20
    while time.time() < end:
        after = {p: p.read_text(errors="replace").count("received SIGHUP") for p in logs}
        if all(after[p] > before[p] for p in logs):
            break
        time.sleep(0.2)
    assert all(after[p] > before[p] for p in logs), {str(p): after[p] for p in logs}
    assert testnet.proc.poll() is None
    assert all(Path(f"/proc/{p}").exists() for p in children)
    done = curl("--socks5-hostname", f"127.0.0.1:{testnet.socks}", f"http://localhost:{www['port']}/index.html")
    assert done.returncode == 0 and b"hello through onionp2p" in done.stdout, done.stderr


def test_sigterm_stops_every_process(testnet):
    children = testnet.children()
    assert children  # relays still running
    assert testnet.stop() == 0
    time.sleep(0.5)
    alive = [p for p in children if Path(f"/proc/{p}").exists()
             and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
    assert not alive
