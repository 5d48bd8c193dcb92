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
import dataclasses
import http.server
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time

import pytest
from conftest import HttpServer, blob, http_get, load_tornet, require_tool, require_tor, sha256, wait_for
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.client.client import OnionClient
from onionp2p.client.hsclient import HsConnectError, OnionServiceClient
from onionp2p.client.hskeys import load_or_create_service_key, write_service_dir
from onionp2p.client.hsservice import OnionService, parse_port_mapping
from onionp2p.dir.server import http_request
from onionp2p.dir.tordir import fetch_tor_network
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.address import encode_onion_address, parse_onion_address
from onionp2p.proto.hs.keys import format_auth, format_auth_private

tornet = load_tornet()

pytestmark = [pytest.mark.tor, pytest.mark.slow]

MB5 = 5_000_000


@pytest.fixture(scope="module")
def tor_network(tmp_path_factory):
    require_tor()
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
    fetches: list[str] = []

    async def get_desc(reader, writer, path: str) -> bytes:
        fetches.append(path)
        return await _get_desc(reader, writer, path)
    hs = OnionServiceClient(client, directory=lambda: view, pick_path=_picker(view), http_get=get_desc,
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
        # another isolation key: a new rendezvous, but the cached descriptor (no HSDir asked);
        # past MaxCircuitDirtiness (short here) the rendezvous circuit closes once its stream ended
        fetched = len(fetches)
        hs.dirtiness = lambda: 1.0
        reader, writer, rend = await hs.open_stream(hostname, 80, isolation="another")
        assert await http_get(reader, writer, "/1000") == blob(1000)
        assert len(fetches) == fetched
        await wait_for(lambda: rend.state != "built", timeout=10, what="the dirty rendezvous circuit closed")
        # a consensus of the next time period (one SRV run: 24 voting intervals): another
        # blinded key, so the descriptor is fetched again
        shift = 24 * (view.fresh_until - view.valid_after)
        view = dataclasses.replace(view, valid_after=view.valid_after + shift,
                                   fresh_until=view.fresh_until + shift)
        try:
            await hs.descriptor(identity)
        except HsConnectError:
            pass  # whether the service uploaded that period's descriptor yet does not matter here
        assert len(fetches) > fetched
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


# -- the SOCKS port of an `onionp2p client --tor-dirauth-file` process, with curl -------------------------


class _BlobHandler(http.server.BaseHTTPRequestHandler):
    """``GET /<n>``: n deterministic bytes (conftest's blob), for the services' target port."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        n = int(self.path.lstrip("/"))
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        self.wfile.write(blob(n))

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def tor_services(tor_network, tmp_path_factory):
    """One tor process hosting two onion services in front of one web server: ``open`` and
    ``auth`` (client authorization: only alice's x25519 key may read its descriptor). The
    service keys are made here (tor's HiddenServiceDir format), so the addresses are known."""
    root = tmp_path_factory.mktemp("tor-services")
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BlobHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    dirs = {name: root / name for name in ("open", "auth")}
    addresses = {name: write_service_dir(d, ExpandedKey.from_seed(os.urandom(32)))
                 for name, d in dirs.items()}
    alice = X25519PrivateKey.generate()
    (dirs["auth"] / "authorized_clients").mkdir(mode=0o700)
    (dirs["auth"] / "authorized_clients" / "alice.auth").write_text(
        format_auth(alice.public_key().public_bytes_raw()))
    options = []
    for d in dirs.values():
        options += [f"HiddenServiceDir {d}", f"HiddenServicePort 80 127.0.0.1:{web.server_address[1]}"]
    tor_network.add_client("services", options)
    try:
        yield addresses, alice
    finally:
        web.shutdown()


def _onion_key(address: str) -> bytes:
    return parse_onion_address(address).pubkey


@pytest.fixture
async def socks_client(tor_network, tmp_path):
    """`onionp2p client --tor-dirauth-file` (a real process) with ExtendedErrors, the private tor
    network's time periods and an (empty) client_onion_auth_dir; yields (process, SOCKS port,
    control port, cookie, auth dir)."""
    require_tool("curl", "curl")
    dirauth = tmp_path / "dirauth.txt"
    dirauth.write_text("\n".join(tor_network.dirauth_lines()) + "\n")
    auth = tmp_path / "auth"
    auth.mkdir(mode=0o700)
    cfg = tmp_path / "client.toml"
    # client_reject_internal_addresses stays on (the default): an onion name is not internal
    cfg.write_text('data_dir = "client"\nsocks_address = "127.0.0.1:0"\ncontrol_port = 0\n'
                   "enforce_distinct_subnets = false\n"
                   "preemptive_circuits = 1\nsocks_extended_errors = true\ntesting_tor_network = true\n"
                   'client_onion_auth_dir = "auth"\nlog_level = "info"\nmetrics_port = 0\n')
    out = tmp_path / "client.out"
    with open(out, "w") as f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "onionp2p", "client", "--config", str(cfg),
            "--tor-dirauth-file", str(dirauth), stdout=f, stderr=asyncio.subprocess.STDOUT)
    try:
        control = None
        for _ in range(900):
            if m := re.search(r"Control port at 127\.0\.0\.1:(\d+)", out.read_text()):
                control = int(m.group(1))
                break
            assert proc.returncode is None, out.read_text()
            await asyncio.sleep(0.1)
        assert control, out.read_text()
        socks = int(re.search(r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)", out.read_text()).group(1))
        metrics = int(re.search(r"Metrics port at http://127\.0\.0\.1:(\d+)", out.read_text()).group(1))
        yield proc, socks, control, tmp_path / "client" / "control_auth_cookie", auth, out, metrics
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def _curl(socks: int, url: str, *, user: str | None = None) -> tuple[int, bytes, str]:
    proxy = f"socks5h://{user + '@' if user else ''}127.0.0.1:{socks}"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "120", "-x", proxy, url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    body, err = await proc.communicate()
    return proc.returncode, body, err.decode()


async def _curl_published(socks: int, url: str, timeout: float = 240) -> bytes:
    """curl ``url`` until the service's descriptor is on the HSDirs (X'F0' until then)."""
    deadline = time.monotonic() + timeout
    while True:
        rc, body, err = await _curl(socks, url)
        if rc == 0:
            return body
        assert rc == 97 and err.rstrip().endswith("(240)") and time.monotonic() < deadline, (rc, err)
        await asyncio.sleep(3)


async def _circuits(control: int, cookie) -> list[dict]:
    tool = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "onionp2p", "circuits", "--json", "--show-targets",
        "--control-port", str(control), "--cookie", str(cookie), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    text, err = await tool.communicate()
    assert tool.returncode == 0, err
    return json.loads(text)["circuits"]


async def _metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data.partition(b"\r\n\r\n")[2].decode()


def _rend_circuits(circuits: list[dict], address: str) -> list[dict]:
    return [c for c in circuits if c["purpose"] == "HS_CLIENT_REND" and c["state"] == "BUILT"
            and c["rend_query"] == address.removesuffix(".onion")]


async def test_curl_through_our_socks_port_to_a_tor_onion_service(tor_services, socks_client):
    """(a) 5 MB from a tor-hosted service through `onionp2p client`'s SOCKS port, the rendezvous
    circuit on the control port with its address; (b) a second request rides the same
    rendezvous circuit, another isolation key (SOCKS credentials) gets its own."""
    addresses, _alice = tor_services
    _proc, socks, control, cookie, _auth, out, metrics = socks_client
    onion = addresses["open"]
    label = onion.removesuffix(".onion")
    events_reader, events_writer = await asyncio.open_connection("127.0.0.1", control)
    for command in (f"AUTHENTICATE {cookie.read_bytes().hex()}", "SETEVENTS CIRC STREAM"):
        events_writer.write(command.encode() + b"\r\n")
        assert await events_reader.readline() == b"250 OK\r\n"
    body = await _curl_published(socks, f"http://{onion}/{MB5}")
    assert len(body) == MB5 and sha256(body) == sha256(blob(MB5)), out.read_text()[-3000:]
    rends = _rend_circuits(await _circuits(control, cookie), onion)
    assert len(rends) == 1 and rends[0]["hs_state"] == "HSCR_JOINED" and len(rends[0]["path"]) == 3
    # CIRC events with tor's purposes and the address, also for circuits already closed; the
    # STREAM event of the request on the rendezvous circuit
    events: list[str] = []
    succeeded = f"650 STREAM {{}} SUCCEEDED {rends[0]['id']} {onion}:{{}}"
    while not (any(" CLOSED " in e and "PURPOSE=HS_CLIENT_INTRO" in e for e in events)
               and any(re.match(succeeded.format(r"\d+", 80), e) for e in events)):
        try:
            events.append((await asyncio.wait_for(events_reader.readline(), 10)).decode())
        except TimeoutError:
            pytest.fail(f"no CIRC CLOSED event with PURPOSE=HS_CLIENT_INTRO or STREAM SUCCEEDED: {events}")
    events_writer.close()
    assert any(e.startswith(f"650 CIRC {rends[0]['id']} BUILT ") and "PURPOSE=HS_CLIENT_REND" in e
               and f"REND_QUERY={label}" in e and "BUILD_FLAGS=IS_INTERNAL" in e for e in events), events
    assert any("PURPOSE=HS_CLIENT_HSDIR" in e and f"REND_QUERY={label}" in e for e in events), events
    closed_intro = next(e for e in events if " CLOSED " in e and "PURPOSE=HS_CLIENT_INTRO" in e)
    assert "HS_STATE=HSCI_DONE" in closed_intro and f"REND_QUERY={label}" in closed_intro
    rc, body, err = await _curl(socks, f"http://{onion}/100000")
    assert rc == 0 and body == blob(100_000), err
    again = _rend_circuits(await _circuits(control, cookie), onion)
    assert [c["id"] for c in again] == [rends[0]["id"]]  # no new rendezvous
    rc, body, err = await _curl(socks, f"http://{onion}/100000", user="other:key")
    assert rc == 0 and body == blob(100_000), err
    isolated = _rend_circuits(await _circuits(control, cookie), onion)
    assert len(isolated) == 2 and rends[0]["id"] in {c["id"] for c in isolated}
    # the metrics port counts the same: three requests, one stream on the open rendezvous
    # circuit, one descriptor fetched and then reused for the second rendezvous
    text = await _metrics(metrics)
    for sample in ('onionp2p_hs_client_requests_total{result="ok"} 3',
                   "onionp2p_hs_client_rendezvous_reused_total 1",
                   'onionp2p_hs_client_descriptors_total{source="fetched"} 1',
                   'onionp2p_hs_client_descriptors_total{source="cache"} 1',
                   'onionp2p_hs_client_rendezvous_total{result="ok"} 2'):
        assert sample in text.splitlines(), (sample, [ln for ln in text.splitlines() if "hs_client" in ln])
    # NEWNYM forgets descriptors and rendezvous circuits (tor's hs_client_purge_state): the
    # next request fetches the descriptor again and makes a new rendezvous
    reader, writer = await asyncio.open_connection("127.0.0.1", control)
    for command in (f"AUTHENTICATE {cookie.read_bytes().hex()}", "SIGNAL NEWNYM"):
        writer.write(command.encode() + b"\r\n")
        assert await reader.readline() == b"250 OK\r\n"
    writer.close()
    rc, body, err = await _curl(socks, f"http://{onion}/100000")
    assert rc == 0 and body == blob(100_000), err
    assert len(_rend_circuits(await _circuits(control, cookie), onion)) == 3
    assert 'onionp2p_hs_client_descriptors_total{source="fetched"} 2' in (await _metrics(metrics)).splitlines()


async def test_client_authorization_from_client_onion_auth_dir(tor_services, socks_client):
    """(c) a service that restricts discovery: X'F4' without a key, X'F5' with a key it does not
    know, the page once alice's key is in client_onion_auth_dir (read again on SIGHUP)."""
    addresses, alice = tor_services
    proc, socks, _control, _cookie, auth, out, metrics = socks_client
    onion = addresses["auth"]
    url = f"http://{onion}/200000"
    deadline = time.monotonic() + 240
    while True:  # published: the descriptor is found, but we cannot read its inner layer
        rc, _, err = await _curl(socks, url)
        if not err.rstrip().endswith("(240)") or time.monotonic() > deadline:
            break
        await asyncio.sleep(3)
    assert rc == 97 and err.rstrip().endswith("(244)"), err  # X'F4': missing client authorization

    async def with_key(secret: bytes) -> tuple[int, bytes, str]:
        path = auth / "alice.auth_private"
        path.write_text(format_auth_private(_onion_key(onion), secret))
        path.chmod(0o600)
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: out.read_text().count("client authorization keys read") >= 2 + with_key.n,
                       timeout=10, what="the reload")
        with_key.n += 1
        return await _curl(socks, url)
    with_key.n = 0

    rc, _, err = await with_key(X25519PrivateKey.generate().private_bytes_raw())
    assert rc == 97 and err.rstrip().endswith("(245)"), err  # X'F5': our key is not accepted
    rc, body, err = await with_key(alice.private_bytes_raw())
    assert rc == 0 and body == blob(200_000), err
    lines = (await _metrics(metrics)).splitlines()
    assert 'onionp2p_hs_client_requests_total{result="missing_client_auth"} 1' in lines
    assert 'onionp2p_hs_client_requests_total{result="bad_client_auth"} 1' in lines
