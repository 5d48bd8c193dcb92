"""onionp2p's onion-service client against a service hosted by real C tor (tools/tornet.py).

A private tor network (3 authorities, 5 relays); a tor process with HiddenServiceDir and
HiddenServicePort pointing at a local HTTP server publishes its descriptor to the tor
HSDirs. Our client reads the network's consensus (with its shared-random values), fetches
and decrypts the descriptor, introduces itself, meets the service at a rendezvous point and
downloads 5 MB over the end-to-end layer. Under CI=true a missing tor fails the test.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import logging

import pytest
from conftest import HttpServer, blob, http_get, load_tornet, sha256

from onionp2p.client.client import OnionClient
from onionp2p.client.hsclient import HsConnectError, OnionServiceClient
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
