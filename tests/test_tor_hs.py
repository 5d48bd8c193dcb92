"""onionp2p's onion-service client against a service hosted by real C tor (tools/tornet.py).

A private tor network (3 authorities, 5 relays); a tor process with HiddenServiceDir and
HiddenServicePort pointing at a local HTTP server publishes its descriptor to the tor
HSDirs. Our client reads the network's consensus (with its shared-random values), fetches
and decrypts the descriptor, introduces itself, meets the service at a rendezvous point and
downloads 5 MB over the end-to-end layer. Under CI=true a missing tor fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time

import logging

import pytest
from conftest import HttpServer, blob, http_get, load_tornet, require_tool, sha256

from onionp2p.client.client import OnionClient
from onionp2p.client.hsclient import HsConnectError, OnionServiceClient
from onionp2p.client.hskeys import load_or_create_service_key
from onionp2p.client.hsservice import OnionService, parse_port_mapping
from onionp2p.dir.server import http_request
from onionp2p.dir.tordir import fetch_tor_network
from onionp2p.proto.hs.address import encode_onion_address, parse_onion_address

tornet = load_tornet()

pytestmark = [pytest.mark.tor, pytest.mark.slow]

MB5 = 5_000_000


@pytest.fixture(scope="module")
def tor_network(tmp_path_factory):
    if not tornet.tor_available():
        why = "needs the 'tor' and 'tor-gencert' programs (Debian package 'tor'; tools/test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    net = tornet.TorNet(tmp_path_factory.mktemp("tornet-hs"))
    net.start(n_relays=5, n_exits=1, timeout=150)
    try:
        yield net
    finally:
        net.stop()


def _picker(view):
    relays = [r.info for r in view.routers]
    rng = random.SystemRandom()

    def pick(last):
        if last is None:
            last = rng.choice(relays)
        others = [r for r in relays if r.rsa_id != last.rsa_id]
        return [*rng.sample(others, 2), last]
    return pick


async def _get_desc(reader, writer, path: str) -> bytes:
    return await http_request(reader, writer, "GET", path, max_size=50_000, timeout=30)


async def test_fetch_5mb_from_a_tor_onion_service(tor_network, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="onionp2p.hs")
    net = tor_network
    web = await HttpServer().start()
    hs_dir = tmp_path / "hs"
    hs_dir.mkdir(mode=0o700)
    await asyncio.to_thread(net.add_client, "service", [
        f"HiddenServiceDir {hs_dir}", f"HiddenServicePort 80 127.0.0.1:{web.port}",
        f"Log info file {tmp_path}/service-info.log"])
    hostname = (hs_dir / "hostname").read_text().strip()
    identity = parse_onion_address(hostname).pubkey
    assert encode_onion_address(identity) == hostname
    view = await fetch_tor_network(net.dirauth_lines())
    client = OnionClient()
    hs = OnionServiceClient(client, directory=lambda: view, pick_path=_picker(view), http_get=_get_desc,
                            testing_tor_network=True)
    try:
        deadline = time.monotonic() + 180
        while True:  # the service publishes a little after it bootstrapped
            try:
                reader, writer = await hs.connect(hostname, 80)
                break
            except HsConnectError as exc:
                if exc.kind != "desc_not_found" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(3)
                view = await fetch_tor_network(net.dirauth_lines())
        body = await asyncio.wait_for(http_get(reader, writer, f"/{MB5}"), 300)
        assert len(body) == MB5 and sha256(body) == sha256(blob(MB5))
        assert web.connections >= 1
    finally:
        await client.close()
        await web.stop()


async def test_tor_client_fetches_5mb_from_an_onionp2p_service(tor_network, tmp_path, caplog):
    """The other direction: onionp2p hosts the service (its keys in a HiddenServiceDir made
    here), with tor relays as HSDirs, introduction and rendezvous points; a tor client
    fetches 5 MB from it with curl through its SOCKS port, sha256 equal."""
    caplog.set_level(logging.INFO, logger="onionp2p.hs")
    curl = require_tool("curl", "curl")
    net = tor_network
    web = await HttpServer().start()
    key = load_or_create_service_key(tmp_path / "hs")
    views = [await fetch_tor_network(net.dirauth_lines())]

    async def refresh():  # the service follows the consensus (time periods are 4 minutes here)
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(Exception):
                views.append(await fetch_tor_network(net.dirauth_lines()))

    async def post(reader, writer, path, body):
        return await http_request(reader, writer, "POST", path, body, max_size=10_000, timeout=30)

    rng = random.SystemRandom()

    def pick(last):
        relays = [r.info for r in views[-1].routers]
        others = [r for r in relays if r.rsa_id != last.rsa_id]
        return [*rng.sample(others, 2), last]

    events = []
    client = OnionClient()
    svc = OnionService(client, key, [parse_port_mapping(f"80 127.0.0.1:{web.port}")],
                       directory=lambda: views[-1], pick_path=pick, http_post=post,
                       on_desc_event=lambda *e: events.append(e), testing_tor_network=True)
    refresher = asyncio.ensure_future(refresh())
    try:
        await svc.start()
        await svc.wait_published(120)
        assert any(e[0] == "UPLOADED" for e in events)
        tor_client = await asyncio.to_thread(net.add_client, "hsuser")
        out = tmp_path / "body"
        proc = await asyncio.create_subprocess_exec(
            curl, "-sS", "--max-time", "240", "--retry", "3", "--retry-all-errors", "--socks5-hostname",
            f"127.0.0.1:{tor_client.or_port}", f"http://{svc.address}.onion/{MB5}", "-o", str(out),
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 0, err.decode()
        assert sha256(out.read_bytes()) == sha256(blob(MB5))
        assert svc.counts["rendezvous"].get("success", 0) >= 1 and svc.core.counts.get("accepted", 0) >= 1
    finally:
        refresher.cancel()
        await svc.stop()
        await client.close()
        await web.stop()
