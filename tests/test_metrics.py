"""The Prometheus endpoint: real HTTP scrapes parsed by prometheus_client, counting real traffic.

Relays are in-process :class:`~onionp2p.relay.relay.Relay` objects on real TLS listeners or real
``onionp2p relay`` processes configured with ``metrics_port``; the client side is either a
bare :class:`~onionp2p.client.client.OnionClient` or a full :class:`~onionp2p.client.node.ClientNode`
(``metrics_port`` in its config) reached through its SOCKS port. Scrapes go through
urllib (a real HTTP client) in a worker thread.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from conftest import http_get, socks_connect, wait_for
from prometheus_client import parser

from onionp2p.client.client import OnionClient
from onionp2p.errors import ConfigError, ListenError
from onionp2p.ops.metrics import (
    CONTENT_TYPE,
    ClientCollector,
    MetricsServer,
    RelayCollector,
    counter,
    gauge,
    render_metrics,
)


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of every sample; also checks each family's type."""
    out = {}
    for family in parser.text_string_to_metric_families(text):
        assert family.type in ("counter", "gauge"), family
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def fetch(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    def go():
        req = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(go)


async def scrape(server: MetricsServer) -> dict[tuple[str, frozenset], float]:
    status, headers, body = await fetch(server.url)
    assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
    return parse(body.decode())


def v(m: dict, name: str, **labels) -> float:
    return m[(name, frozenset(labels.items()))]


@pytest.fixture
async def relay_metrics(exit_relays):
    servers = []
    for relay in exit_relays:
        srv = MetricsServer(RelayCollector(relay))
        await srv.start()
        servers.append(srv)
    yield list(zip(exit_relays, servers))
    for srv in servers:
        await srv.stop()


async def test_relay_counters_follow_a_real_circuit(relay_metrics, http_server):
    n = 200_000
    before = [await scrape(srv) for _, srv in relay_metrics]
    for m in before:
        assert v(m, "onionp2p_circuits", state="open") == 0
        assert v(m, "onionp2p_channels") == 0
    client = OnionClient()
    try:
        circ = await client.build_circuit([r.info() for r, _ in relay_metrics], timeout=20)
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert len(await http_get(reader, writer, f"/{n}")) == n
        during = [await scrape(srv) for _, srv in relay_metrics]
        for hop, ((relay, _), b, m) in enumerate(zip(relay_metrics, before, during)):
            assert v(m, "onionp2p_info", role="relay", version="0.1.0", nickname=relay.nickname,
                     fingerprint=relay.keys.fingerprint) == 1
            assert v(m, "onionp2p_circuits", state="open") == 1
            assert v(m, "onionp2p_create_handshakes_total", result="ok") == \
                v(b, "onionp2p_create_handshakes_total", result="ok") + 1
            # every hop sent the n-byte body toward the client in at least n/498 DATA cells; the
            # guard and the middle also received them as cells (the exit read them from TCP)
            directions = [("out", "written")] + ([("in", "read")] if hop < 2 else [])
            for cells, octets in directions:
                grew = v(m, "onionp2p_cells_total", direction=cells) - v(b, "onionp2p_cells_total", direction=cells)
                assert grew >= n // 498
                assert v(m, "onionp2p_bytes_total", direction=octets) - \
                    v(b, "onionp2p_bytes_total", direction=octets) >= n
            if hop == 2:  # the exit's inbound cells are only BEGIN, SENDMEs and the like
                assert 0 < v(m, "onionp2p_cells_total", direction="in") - v(b, "onionp2p_cells_total",
                                                                          direction="in") < n // 498
            assert v(m, "onionp2p_queued_cells") >= 0 and v(m, "onionp2p_channels") >= 1

        circ.close()

        async def closed_everywhere() -> list[dict]:
            while True:
                now = [await scrape(srv) for _, srv in relay_metrics]
                if all(v(m, "onionp2p_circuits", state="open") == 0 for m in now):
                    return now
                await asyncio.sleep(0.05)

        after = await asyncio.wait_for(closed_everywhere(), 20)
        for m in after:
            closed = sum(val for (name, _), val in m.items() if name == "onionp2p_circuits_closed_total")
            assert closed == 1
    finally:
        await client.close()
    # the client's channel to the guard goes; its counts stay in the totals (counters never go down)
    guard = relay_metrics[0][0]
    await wait_for(lambda: len(guard.channels) == v(after[0], "onionp2p_channels") - 1,
                   timeout=20, what="client channel closed")
    final = [await scrape(srv) for _, srv in relay_metrics]
    assert v(final[0], "onionp2p_channels") == v(after[0], "onionp2p_channels") - 1
    for m, a in zip(final, after):
        for direction in ("in", "out"):
            assert v(m, "onionp2p_cells_total", direction=direction) >= v(a, "onionp2p_cells_total",
                                                                         direction=direction)


async def test_client_node_counters_follow_socks_traffic(client_node, http_server):
    n = 100_000
    collector = ClientCollector(client_node)
    srv = MetricsServer(collector)
    await srv.start()
    try:
        b = await scrape(srv)
        assert v(b, "onionp2p_info", role="client", version="0.1.0") == 1
        assert v(b, "onionp2p_circuits", state="built") == sum(
            c.state == "built" for c in client_node.client.circuits.values())
        reader, writer = await socks_connect(client_node.socks_port, "127.0.0.1", http_server.port)
        await wait_for(lambda: any(s.status == "SUCCEEDED" for s in client_node.streams.values()),
                       timeout=20, what="stream")
        m = await scrape(srv)
        assert v(m, "onionp2p_streams", state="SUCCEEDED") == 1
        assert len(await http_get(reader, writer, f"/{n}")) == n
        await wait_for(lambda: not client_node.streams, timeout=20, what="stream closed")
        adapter = client_node.control.node
        new_id = await adapter.extend_circuit(0, None, "general")
        await wait_for(lambda: client_node.client.circuits[new_id].state == "built", timeout=20, what="built")
        assert adapter.close_circuit(new_id)
        m = await scrape(srv)
        assert v(m, "onionp2p_circuit_data_bytes_total", direction="received") - \
            v(b, "onionp2p_circuit_data_bytes_total", direction="received") >= n
        assert v(m, "onionp2p_bytes_total", direction="read") - v(b, "onionp2p_bytes_total", direction="read") >= n
        assert v(m, "onionp2p_cells_total", direction="in") - v(b, "onionp2p_cells_total", direction="in") >= n // 498
        assert v(m, "onionp2p_cells_total", direction="out") > v(b, "onionp2p_cells_total", direction="out")
        assert v(m, "onionp2p_circuit_builds_total", result="ok") >= v(b, "onionp2p_circuit_builds_total",
                                                                      result="ok") + 1
        assert v(m, "onionp2p_circuits_closed_total", reason="REQUESTED") >= 1
        assert v(m, "onionp2p_socks_connections_total") >= 1
        assert v(m, "onionp2p_socks_requests_total", result="ok") >= 1
        if ("onionp2p_socks_bytes_total", frozenset({("direction", "down")})) in m:  # newer SOCKS front end
            assert v(m, "onionp2p_socks_bytes_total", direction="down") >= n
        assert v(m, "onionp2p_streams", state="SUCCEEDED") == 0
        assert v(m, "onionp2p_bootstrap_progress") == 100
        # every built circuit runs Vegas with its exit; after the download the windows and
        # RTTs are measured
        built = [c for c in client_node.client.circuits.values() if c.state == "built"]
        assert v(m, "onionp2p_circuit_congestion_control", alg="vegas") == len(built)
        assert v(m, "onionp2p_circuit_congestion_control", alg="fixed") == 0
        assert v(m, "onionp2p_congestion_window_cells", stat="max") >= 124
        assert v(m, "onionp2p_circuit_rtt_seconds", stat="min") >= 0
    finally:
        collector.close()
        await srv.stop()


async def scrape_url(url: str) -> dict[tuple[str, frozenset], float]:
    status, headers, body = await fetch(url)
    assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
    return parse(body.decode())


def total(m: dict, name: str) -> float:
    return sum(val for (n, _), val in m.items() if n == name)


@pytest.mark.slow
async def test_relay_processes_metrics_port(nodes, http_server):
    """Three `onionp2p relay` processes with ``metrics_port = 0``: cells and bytes grow by the
    traffic sent, DESTROY reasons are counted, and totals survive closed connections."""
    procs = [nodes("mguard", metrics_port=0), nodes("mmiddle", metrics_port=0),
             nodes("mexit", metrics_port=0, exit_policy="accept 127.0.0.1:*")]
    infos = [p.info() for p in procs]
    urls = [p.metrics_url for p in procs]
    before = [await scrape_url(u) for u in urls]
    n = 300_000
    client = OnionClient()
    try:
        circ = await client.build_circuit(infos, timeout=30)
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert len(await http_get(reader, writer, f"/{n}")) == n
        during = [await scrape_url(u) for u in urls]
        for hop, (info, b, m) in enumerate(zip(infos, before, during)):
            assert v(m, "onionp2p_info", role="relay", version="0.1.0", nickname=info.nickname,
                     fingerprint=info.fingerprint) == 1
            assert v(m, "onionp2p_circuits", state="open") == 1
            for cells, octets in [("out", "written")] + ([("in", "read")] if hop < 2 else []):
                assert v(m, "onionp2p_cells_total", direction=cells) - \
                    v(b, "onionp2p_cells_total", direction=cells) >= n // 498
                assert v(m, "onionp2p_bytes_total", direction=octets) - \
                    v(b, "onionp2p_bytes_total", direction=octets) >= n
            assert m[("process_resident_memory_bytes", frozenset())] > 0
            assert m[("process_start_time_seconds", frozenset())] > 1.7e9

        circ.close()  # the client's DESTROY: every hop counts reason DESTROYED
        async def destroyed(m_of, reason, count):
            async def check():
                while True:
                    now = [await scrape_url(u) for u in m_of]
                    if all(total(m, "onionp2p_circuits_closed_total") >= count and
                           m.get(("onionp2p_circuits_closed_total", frozenset({("reason", reason)}))) == 1
                           for m in now):
                        return now
                    await asyncio.sleep(0.1)
            return await asyncio.wait_for(check(), 20)

        after = await destroyed(urls, "DESTROYED", 1)
        for m in after:
            assert v(m, "onionp2p_circuits", state="open") == 0
            assert total(m, "onionp2p_circuits_closed_total") == 1

        # a second circuit, then the middle relay dies: guard and exit lose their channel to it
        circ2 = await client.build_circuit(infos, timeout=30)
        reader, writer = await circ2.open_stream("127.0.0.1", http_server.port)
        assert len(await http_get(reader, writer, "/50000")) == 50000
        procs[1].proc.kill()
        procs[1].proc.wait()
        ends = [urls[0], urls[2]]
        final = await destroyed(ends, "CHANNEL_CLOSED", 2)
        for m, a in zip(final, (after[0], after[2])):
            assert v(m, "onionp2p_circuits_closed_total", reason="DESTROYED") == 1
            # the channels to the dead middle are gone; their cells and bytes stay counted
            for name, direction in (("onionp2p_cells_total", "in"), ("onionp2p_cells_total", "out"),
                                    ("onionp2p_bytes_total", "read"), ("onionp2p_bytes_total", "written")):
                assert v(m, name, direction=direction) > v(a, name, direction=direction)
        assert v(final[1], "onionp2p_channels") == 0  # the exit had only the middle
    finally:
        await client.close()
    assert procs[0].stop() == 0 and procs[2].stop() == 0


async def test_client_node_metrics_port_from_config(exit_relays, http_server, tmp_path):
    """``metrics_port`` in the client config: the node serves /metrics while it runs, the
    control port names it (GETINFO net/listeners/metrics), and stop() closes it."""
    from onionp2p.client.node import ClientNode
    from onionp2p.config import ClientConfig
    from onionp2p.ops.controlclient import ControlClient, ControlTarget
    from onionp2p.proto.directory import RouterStatus

    flags = frozenset({"Exit", "Fast", "Guard", "Running", "Stable", "Valid"})
    statuses = [RouterStatus(r.info(), flags, bandwidth=1000) for r in exit_relays]
    cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=tmp_path / "c", socks_address=("127.0.0.1", 0), control_port=0, metrics_port=0,
                       enforce_distinct_subnets=False, preemptive_circuits=1, log_level="warning")
    node = ClientNode(cfg, routers=lambda: statuses)
    await node.start(ready_timeout=30)
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    try:
        control = await ControlClient.connect(ControlTarget(port=node.control_port))
        try:
            info = await control.getinfo("net/listeners/metrics")
            assert info["net/listeners/metrics"] == f'"127.0.0.1:{node.metrics_port}"'
        finally:
            await control.close()
        b = await scrape_url(url)
        n = 120_000
        reader, writer = await socks_connect(node.socks_port, "127.0.0.1", http_server.port)
        assert len(await http_get(reader, writer, f"/{n}")) == n
        m = await scrape_url(url)
        assert v(m, "onionp2p_info", role="client", version="0.1.0") == 1
        assert v(m, "onionp2p_circuit_data_bytes_total", direction="received") - \
            v(b, "onionp2p_circuit_data_bytes_total", direction="received") >= n
        assert v(m, "onionp2p_bytes_total", direction="read") - v(b, "onionp2p_bytes_total", direction="read") >= n
        assert v(m, "onionp2p_socks_requests_total", result="ok") == v(b, "onionp2p_socks_requests_total",
                                                                        result="ok") + 1
        assert m[("process_open_fds", frozenset())] > 0
    finally:
        await node.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", node.metrics.port)


async def test_http_behaviour_and_text_format():
    calls = {"n": 0}

    def collect():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("collector bug")
        return [counter("demo_things_total", 'Things "done".\nSecond line \\ here.', {'a"b\\c\nd': 3}, "kind"),
                gauge("demo_level", "A level.", 0.25), gauge("demo_nan", "Not a number.", float("nan"))]

    srv = MetricsServer(collect)
    await srv.start()
    try:
        status, headers, body = await fetch(srv.url)
        assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
        fams = {f.name: f for f in parser.text_string_to_metric_families(body.decode())}
        assert fams["demo_things"].documentation == 'Things "done".\nSecond line \\ here.'
        assert [(s.name, s.labels, s.value) for s in fams["demo_things"].samples] == [
            ("demo_things_total", {"kind": 'a"b\\c\nd'}, 3)]
        assert fams["demo_level"].samples[0].value == 0.25
        assert fams["demo_nan"].samples[0].value != fams["demo_nan"].samples[0].value  # NaN
        assert (await fetch(srv.url))[0] == 500  # the failing collection
        assert (await fetch(srv.url))[0] == 200  # ... did not break the server
        status, headers, body = await fetch(srv.url, "HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert (await fetch(f"http://127.0.0.1:{srv.port}/nope"))[0] == 404
        status, headers, _ = await fetch(srv.url, "POST")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"garbage\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.0 400 ")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.0 431 ")
        writer.close()
        assert srv.scrapes == 3
    finally:
        await srv.stop()
    assert render_metrics([]) == "\n"


async def test_metrics_port_stays_on_loopback():
    with pytest.raises(ConfigError, match="loopback"):
        MetricsServer(list, host="0.0.0.0")
    srv = MetricsServer(list, host="127.0.0.1")
    await srv.start()
    other = MetricsServer(list, port=srv.port)
    busy = f"cannot listen on metrics port 127.0.0.1:{srv.port}: address already in use"
    with pytest.raises(ListenError, match=busy):
        await other.start()
    await srv.stop()
