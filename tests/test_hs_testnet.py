"""Hosting onion services in `onionp2p testnet`, the three ways (README "Three ways to host an
onion service"): stem's create_ephemeral_hidden_service on the testnet client's control port
(ADD_ONION, HS_DESC events, DEL_ONION), a ``[[onion_service]]`` table in the config of an
`onionp2p client` process, and ``ClientNode.add_onion_service`` in this process. Each
service is fetched from with 5 MB through the rendezvous, sha256 equal.

The fetching client is OnionServiceClient over this process's ClientNode (the SOCKS port's
`.onion` support is another branch's work)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import tomllib

import pytest
from conftest import HttpServer, RunningTestnet, blob, http_get, sha256

from onionp2p.client.hsclient import HsConnectError, OnionServiceClient
from onionp2p.client.node import ClientNode
from onionp2p.config import ClientConfig
from onionp2p.dir.server import http_request

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


async def _get(reader, writer, path):
    return await http_request(reader, writer, "GET", path, max_size=50_000, timeout=30)


async def _fetch(hs: OnionServiceClient, address: str, deadline: float = 120) -> bytes:
    """5 MB from ``address``: retried while the descriptor is not (yet) on the HSDirs."""
    end = time.monotonic() + deadline
    while True:
        try:
            reader, writer = await hs.connect(address, 80)
            break
        except HsConnectError as exc:
            if exc.kind != "desc_not_found" or time.monotonic() > end:
                raise
            await asyncio.sleep(2)
    return await asyncio.wait_for(http_get(reader, writer, f"/{MB5}"), 180)


async def test_three_ways_to_host(testnet, tmp_path):
    from stem.control import Controller

    web = await HttpServer().start()
    authorities = _authorities(testnet)
    # this process's client: it fetches, and hosts the library API's service
    node = ClientNode(ClientConfig(data_dir=tmp_path / "lib", socks_address=("127.0.0.1", 0), control_port=None,
                                   authorities=tuple(authorities), enforce_distinct_subnets=False,
                                   client_reject_internal_addresses=False, log_level="warning"))
    await node.start(ready_timeout=120)
    hs = OnionServiceClient(node.client, directory=node._hs_view, pick_path=node._hs_path, http_get=_get)
    svc_proc = None
    try:
        # 1. the control port: stem, as a tor user would
        ctl = Controller.from_port(port=testnet.control)
        ctl.authenticate()
        try:
            reply = await asyncio.to_thread(ctl.create_ephemeral_hidden_service, {80: web.port},
                                            await_publication=True, timeout=120)
            sid = reply.service_id
            assert len(sid) == 56 and reply.private_key_type == "ED25519-V3" and len(reply.private_key) == 88
            assert sid in ctl.get_info("onions/current").split()
            body = await _fetch(hs, sid + ".onion")
            assert len(body) == MB5 and sha256(body) == sha256(blob(MB5))
            # DEL_ONION: the service is gone (its introduction circuits closed): the fetch fails
            assert ctl.remove_ephemeral_hidden_service(sid)
            with pytest.raises(HsConnectError) as e:
                await hs.connect(sid + ".onion", 80)
            assert e.value.kind in ("intro_failed", "rend_failed")
            assert not ctl.remove_ephemeral_hidden_service(sid)  # unknown now
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
        svc_proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "client", "--config", str(conf)],
                                    stdout=subprocess.DEVNULL, stderr=open(svc_dir / "log.txt", "w"))
        hostname = svc_dir / "hs" / "hostname"
        end = time.monotonic() + 60
        while not hostname.exists():
            assert time.monotonic() < end and svc_proc.poll() is None, (svc_dir / "log.txt").read_text()[-3000:]
            await asyncio.sleep(0.5)
        body = await _fetch(hs, hostname.read_text().strip(), deadline=180)
        assert sha256(body) == sha256(blob(MB5))

        # 3. the library API
        svc = await node.add_onion_service([f"80 127.0.0.1:{web.port}"], wait_published=120)
        body = await _fetch(hs, svc.address + ".onion")
        assert sha256(body) == sha256(blob(MB5))
        assert await node.remove_onion_service(svc.address)
    finally:
        if svc_proc is not None:
            svc_proc.terminate()
            svc_proc.wait(20)
        await node.stop()
        await web.stop()
