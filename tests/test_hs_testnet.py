"""Hosting onion services in `onionp2p testnet`, the three ways (README "Three ways to host an
onion service"): stem's create_ephemeral_hidden_service on the testnet client's control port
(ADD_ONION, HS_DESC events, DEL_ONION), a ``[[onion_service]]`` table in the config of an
`onionp2p client` process, and ``ClientNode.add_onion_service`` in this process. From each,
curl fetches 5 MB through the testnet's SOCKS port (``--socks5-hostname``), sha256 equal."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request

import pytest
from conftest import HttpServer, RunningTestnet, blob, require_tool, sha256

from onionp2p.client.hskeys import load_or_create_service_key
from onionp2p.client.node import ClientNode
from onionp2p.config import ClientConfig
from onionp2p.ops.metrics import ClientCollector, render_metrics

pytestmark = pytest.mark.slow

MB5 = 5_000_000


@pytest.fixture(scope="module")
def testnet(tmp_path_factory):
    net = RunningTestnet(tmp_path_factory.mktemp("hsnet") / "net", extra=("--log-level", "info"))
    yield net
    net.stop()


def _authorities(net: RunningTestnet) -> list[str]:
    """The testnet's authority lines, as its relays were configured with them."""
    relay_toml = next(net.data_dir.glob("relay*/relay.toml"))
    return list(tomllib.loads(relay_toml.read_text())["authorities"])


async def _curl(socks: int, address: str, out, *, deadline: float = 150) -> None:
    """5 MB from ``http://address/`` with curl through the SOCKS port into ``out``, tried
    again while the service is not reachable yet (its descriptor on its way to the HSDirs)."""
    curl = require_tool("curl", "curl")
    end = time.monotonic() + deadline
    while True:
        p = await asyncio.create_subprocess_exec(
            curl, "-sS", "--max-time", "120", "--socks5-hostname", f"127.0.0.1:{socks}",
            f"http://{address}/{MB5}", "-o", str(out), stderr=asyncio.subprocess.PIPE)
        _, err = await p.communicate()
        if p.returncode == 0:
            return
        assert time.monotonic() < end, err.decode()
        await asyncio.sleep(2)


def _hosted(net: RunningTestnet) -> int:
    """How many onion services the testnet's client hosts (its metrics port says)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{net.metrics}/metrics", timeout=10).read().decode()
    return int(float(re.search(r"^onionp2p_hs_services (\S+)$", text, re.M).group(1)))


async def test_three_ways_to_host(testnet, tmp_path):
    from stem.control import Controller

    web = await HttpServer().start()
    authorities = _authorities(testnet)
    # this process's client hosts the library API's service
    node = ClientNode(ClientConfig(data_dir=tmp_path / "lib", socks_address=("127.0.0.1", 0), control_port=None,
                                   authorities=tuple(authorities), enforce_distinct_subnets=False,
                                   client_reject_internal_addresses=False, log_level="warning"))
    await node.start(ready_timeout=120)
    want = sha256(blob(MB5))
    out = tmp_path / "body"
    svc_proc = None
    try:
        # 1. the control port: stem, as a tor user would
        ctl = Controller.from_port(port=testnet.control)
        ctl.authenticate()
        try:
            for bad, code in (("ADD_ONION NEW:RSA1024 Port=80", "513"), ("ADD_ONION NEW:BEST", "512"),
                              ("ADD_ONION NEW:BEST Port=0", "512"), ("ADD_ONION NEW:BEST Flags=Bogus Port=80", "512"),
                              ("ADD_ONION ED25519-V3:AAAA Port=80", "512"), ("DEL_ONION nothere", "512")):
                assert ctl.msg(bad).content()[0][0] == code, bad
            reply = await asyncio.to_thread(ctl.create_ephemeral_hidden_service, {80: web.port},
                                            await_publication=True, timeout=120)
            sid = reply.service_id
            assert len(sid) == 56 and reply.private_key_type == "ED25519-V3" and len(reply.private_key) == 88
            assert sid in ctl.get_info("onions/current").split()
            # its circuits show with tor's purposes and states on the control port
            states = {(c.purpose, c.hs_state) for c in ctl.get_circuits()}
            assert ("HS_SERVICE_INTRO", "HSSI_ESTABLISHED") in states, states
            await _curl(testnet.socks, sid + ".onion", out)
            assert sha256(out.read_bytes()) == want
            # DEL_ONION: the service is gone (its introduction and rendezvous circuits
            # closed): a fetch now fails (curl 97: the SOCKS request failed)
            assert ctl.remove_ephemeral_hidden_service(sid)
            assert sid not in (ctl.get_info("onions/current", "") or "").split()
            p = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "100", "--socks5-hostname", f"127.0.0.1:{testnet.socks}",
                f"http://{sid}.onion/{MB5}", "-o", str(out), stderr=asyncio.subprocess.PIPE)
            _, err = await p.communicate()
            assert p.returncode == 97, err.decode()
            assert not ctl.remove_ephemeral_hidden_service(sid)  # unknown now
            # Detach and DiscardPK: no key in the reply, listed as detached, outlives its
            # connection; a service added without Detach goes when its connection closes
            r = ctl.msg(f"ADD_ONION NEW:BEST Flags=Detach,DiscardPK Port=80,{web.port}")
            fields = dict(line[2].split("=", 1) for line in r.content() if "=" in line[2])
            assert r.content()[-1][0] == "250" and "PrivateKey" not in fields
            detached = fields["ServiceID"]
            assert ctl.get_info("onions/detached").split() == [detached]
            with Controller.from_port(port=testnet.control) as other:
                other.authenticate()
                sid2 = other.create_ephemeral_hidden_service({80: web.port}).service_id
                assert other.get_info("onions/current").split() == [sid2]
                assert _hosted(testnet) == 2
            end = time.monotonic() + 20
            while _hosted(testnet) != 1:
                assert time.monotonic() < end, "the closed connection's service is still hosted"
                await asyncio.sleep(0.5)
            assert ctl.msg(f"DEL_ONION {sid2}").content()[0][0] == "552"
            assert ctl.msg(f"DEL_ONION {detached}").content()[0][0] == "250"
            assert _hosted(testnet) == 0
        finally:
            ctl.close()

        # 2. the client config: an `onionp2p client` process with an [[onion_service]] table
        svc_dir = tmp_path / "svc"
        svc_dir.mkdir(mode=0o700)
        conf = svc_dir / "client.toml"
        lines = [f'data_dir = "{svc_dir / "data"}"', 'socks_address = "127.0.0.1:0"', "control_port = false",
                 "enforce_distinct_subnets = false", "authorities = [" + ", ".join(f'"{a}"' for a in authorities)
                 + "]", "", "[[onion_service]]", f'dir = "{svc_dir / "hs"}"',
                 f'ports = ["80 127.0.0.1:{web.port}"]', "num_intro_points = 2"]
        conf.write_text("\n".join(lines) + "\n")
        # a bad table first: one clear line per problem and exit status 2
        bad = svc_dir / "bad.toml"
        bad.write_text("\n".join(lines).replace("num_intro_points = 2", "num_intro_points = 99") + "\n")
        p = subprocess.run([sys.executable, "-m", "onionp2p", "client", "--config", str(bad)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "onion_service[0].num_intro_points" in p.stderr, p.stderr
        # ... and so do keys tor would refuse (a secret key others can read)
        load_or_create_service_key(svc_dir / "leaky")
        os.chmod(svc_dir / "leaky" / "hs_ed25519_secret_key", 0o644)
        bad.write_text("\n".join(lines).replace(f'dir = "{svc_dir / "hs"}"', f'dir = "{svc_dir / "leaky"}"') + "\n")
        p = subprocess.run([sys.executable, "-m", "onionp2p", "client", "--config", str(bad)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "onion_service[0]:" in p.stderr and "chmod" in p.stderr, p.stderr
        svc_proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "client", "--config", str(conf)],
                                    stdout=subprocess.DEVNULL, stderr=open(svc_dir / "log.txt", "w"))
        hostname = svc_dir / "hs" / "hostname"
        end = time.monotonic() + 60
        while not hostname.exists():
            assert time.monotonic() < end and svc_proc.poll() is None, (svc_dir / "log.txt").read_text()[-3000:]
            await asyncio.sleep(0.5)
        await _curl(testnet.socks, hostname.read_text().strip(), out, deadline=180)
        assert sha256(out.read_bytes()) == want
        # SIGHUP with one more table: the new service starts, as tor's reload adds it
        conf.write_text(conf.read_text() + f'\n[[onion_service]]\ndir = "{svc_dir / "hs2"}"\n'
                        f'ports = ["80 127.0.0.1:{web.port}"]\n')
        svc_proc.send_signal(signal.SIGHUP)
        hostname2 = svc_dir / "hs2" / "hostname"
        end = time.monotonic() + 30
        while not hostname2.exists():
            assert time.monotonic() < end and svc_proc.poll() is None, (svc_dir / "log.txt").read_text()[-3000:]
            await asyncio.sleep(0.5)
        await _curl(testnet.socks, hostname2.read_text().strip(), out, deadline=180)
        assert sha256(out.read_bytes()) == want

        # 3. the library API
        svc = await node.add_onion_service([f"80 127.0.0.1:{web.port}"], wait_published=120)
        await _curl(testnet.socks, svc.address + ".onion", out)
        assert sha256(out.read_bytes()) == want
        text = render_metrics(ClientCollector(node)())
        assert 'onionp2p_hs_service_introductions_total{result="accepted"} 1' in text, text
        assert 'onionp2p_hs_service_rendezvous_total{result="success"} 1' in text
        assert await node.remove_onion_service(svc.address)
    finally:
        if svc_proc is not None:
            svc_proc.terminate()
            svc_proc.wait(20)
        await node.stop()
        await web.stop()
