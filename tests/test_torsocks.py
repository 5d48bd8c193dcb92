"""torsocks through `onionp2p testnet`, using network namespaces we create.

torsocks refuses to send loopback destinations through the proxy (they could be local DNS
servers), so the destination lives in its own network namespace at 10.203.N.2, and the
testnet, the exit's resolver and torsocks live in a second namespace whose /etc/hosts
(``/etc/netns/NAME/hosts``, bind-mounted by ``ip netns exec``) maps ``web.test`` to it.
``torsocks curl http://web.test/`` thus needs Tor's RESOLVE extension (the name is resolved
at the exit) and then a CONNECT through the network. Skipped only where namespaces cannot
be created.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_helpers import sh

pytestmark = pytest.mark.slow


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    n = os.getpid() % 200 + 20
    tn, web = f"onp-tn{n}", f"onp-web{n}"
    try:
        sh("ip", "netns", "add", tn)
        sh("ip", "netns", "add", web)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"the kernel forbids network namespaces here: {exc.stderr.strip()}")
    try:
        sh("ip", "link", "add", f"vt{n}", "type", "veth", "peer", "name", f"vw{n}")
        sh("ip", "link", "set", f"vt{n}", "netns", tn)
        sh("ip", "link", "set", f"vw{n}", "netns", web)
        sh("ip", "-n", tn, "addr", "add", f"10.203.{n}.1/24", "dev", f"vt{n}")
        sh("ip", "-n", web, "addr", "add", f"10.203.{n}.2/24", "dev", f"vw{n}")
        for ns, dev in ((tn, f"vt{n}"), (web, f"vw{n}")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / tn
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n10.203.{n}.2 web.test\n")
        yield tn, web, f"10.203.{n}.2"
    finally:
        sh("ip", "netns", "del", tn, check=False)
        sh("ip", "netns", "del", web, check=False)
        shutil.rmtree(Path("/etc/netns") / tn, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("torsocks"), reason="torsocks not installed (tools/test installs it)")
def test_torsocks_curl_through_testnet(namespaces, tmp_path):
    tn, web, web_ip = namespaces
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("served in another namespace\n")
    server = subprocess.Popen(["ip", "netns", "exec", web, sys.executable, "-m", "http.server", "8080",
                               "--bind", web_ip, "--directory", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "testnet.out"
    with open(out, "w") as f:
        net = subprocess.Popen(["ip", "netns", "exec", tn, sys.executable, "-m", "onionp2p", "testnet",
                                "--socks-port", "auto", "--control-port", "0", "--voting-interval", "4",
                                "--data-dir", str(tmp_path / "net")], stdout=f, stderr=subprocess.STDOUT)
    try:
        port = None
        end = time.time() + 150
        while time.time() < end and port is None and net.poll() is None:
            if m := re.search(r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)", out.read_text()):
                port = int(m.group(1))
            time.sleep(0.2)
        assert port, out.read_text()[-3000:]
        conf = tmp_path / "torsocks.conf"
        conf.write_text(f"TorAddress 127.0.0.1\nTorPort {port}\n")
        env = {**os.environ, "TORSOCKS_CONF_FILE": str(conf)}
        p = subprocess.run(["ip", "netns", "exec", tn, "torsocks", "curl", "-sS", "--max-time", "60",
                            "http://web.test:8080/index.html"], capture_output=True, text=True, env=env,
                           timeout=90)
        assert p.returncode == 0, p.stderr
        assert p.stdout == "served in another namespace\n"
    finally:
        net.send_signal(signal.SIGTERM)
        assert net.wait(20) == 0
        server.kill()
        server.wait()
