"""``onionp2p circuits``, ``onionp2p top`` and the circuit graph against a real node.

The node is a real :class:`~onionp2p.client.node.ClientNode` (circuit manager, SOCKS front end,
control port with its cookie) whose directory is three in-process relays on real TLS
listeners; its circuits are real 3-hop ntor circuits and its streams carry real HTTP
through them. The tools talk to its control port over 127.0.0.1 like any controller.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RELAY_FLAGS, close_controller, http_get, socks_connect, wait_for

from onionp2p.control.formats import ns_entry
from onionp2p.control.server import ControlServer
from onionp2p.ops.circuits import render_graph, run_circuits, view_json
from onionp2p.ops.controlclient import (
    AuthenticationError,
    ControlClient,
    ControlTarget,
    InspectError,
    NetworkView,
    ReplyAssembler,
    open_view,
    parse_circuit,
    parse_ns,
)
from onionp2p.ops.present import SCRUBBED
from onionp2p.proto.control import format_event, hash_password
from onionp2p.proto.directory import RouterStatus

REPO = Path(__file__).resolve().parents[1]


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
def target(client_node) -> ControlTarget:
    return ControlTarget(port=client_node.control_port)


@pytest.fixture
async def open_stream(client_node, http_server):
    """A SUCCEEDED stream to the local HTTP server that stays open during the test."""
    reader, writer = await socks_connect(client_node.socks_port, "127.0.0.1", http_server.port)
    await wait_for(lambda: any(s.status == "SUCCEEDED" for s in client_node.streams.values()),
                   timeout=20, what="stream")
    rec = next(s for s in client_node.streams.values() if s.status == "SUCCEEDED")
    # steady state: the circuit manager replaces the used circuit with a new clean one
    await wait_for(lambda: [c.state for c in client_node.client.circuits.values()] == ["built"] * 3,
                   timeout=20, what="two clean circuits beside the used one")
    yield rec, reader, writer
    writer.close()
    await wait_for(lambda: not client_node.streams, timeout=20, what="stream closed")


def built_ids(node) -> set[int]:
    return {c.id for c in node.client.circuits.values() if c.state == "built"}


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


# -- pure parts -----------------------------------------------------------------------------------

def test_reply_assembler_data_blocks_and_events():
    asm = ReplyAssembler()
    lines = ["250-version=0.4.9.3", "250+circuit-status=", "1 BUILT $" + "A" * 40 + "~r0", "..dotted", ".",
             "250 OK", "650 BW 10 20"]
    replies = [r for r in (asm.feed(x) for x in lines) if r is not None]
    assert [r.code for r in replies] == [250, 650]
    assert replies[0].values() == {"version": "0.4.9.3", "circuit-status": "1 BUILT $" + "A" * 40 + "~r0\n.dotted"}
    with pytest.raises(InspectError):
        asm.feed("garbage")


def test_parse_circuit_line_with_extension_and_quotes():
    fp = "0123456789ABCDEF0123456789ABCDEF01234567"
    c = parse_circuit(f"7 BUILT ${fp}~guard,${fp.lower()}=mid BUILD_FLAGS=NEED_CAPACITY PURPOSE=GENERAL "
                      'TIME_CREATED=2025-01-02T03:04:05.500000 SOCKS_USERNAME="a b" BYTES_READ=10 BYTES_WRITTEN=4')
    assert (c.id, c.status, c.purpose, c.bytes_read, c.bytes_written) == (7, "BUILT", "GENERAL", 10, 4)
    assert [(h.fingerprint, h.nickname) for h in c.path] == [(fp, "guard"), (fp, "mid")]
    assert c.time_created == 1735787045.5
    assert parse_circuit("3 LAUNCHED PURPOSE=GENERAL").path == ()


def test_onion_service_circuit_fields_round_trip_and_are_scrubbed():
    """What the control port writes for an onion-service circuit (control-spec's HS_STATE and
    REND_QUERY after PURPOSE) reads back; `circuits --json` scrubs the address unless asked."""
    from onionp2p.control.formats import CircuitInfo, circuit_line
    from onionp2p.ops.model import NetworkView as View

    fp = "0123456789ABCDEF0123456789ABCDEF01234567"
    line = circuit_line(CircuitInfo(id=9, status="BUILT", path=((fp, "rp"),), build_flags=("IS_INTERNAL",),
                                    purpose="HS_CLIENT_REND", hs_state="HSCR_JOINED", rend_query="a" * 56))
    assert "PURPOSE=HS_CLIENT_REND HS_STATE=HSCR_JOINED REND_QUERY=" + "a" * 56 in line
    c = parse_circuit(line)
    assert (c.purpose, c.hs_state, c.rend_query) == ("HS_CLIENT_REND", "HSCR_JOINED", "a" * 56)
    view = View()
    view.circuits[9] = c
    assert view_json(view, 0.0)["circuits"][0]["rend_query"] == SCRUBBED
    row = view_json(view, 0.0, show_targets=True)["circuits"][0]
    assert (row["purpose"], row["hs_state"], row["rend_query"]) == ("HS_CLIENT_REND", "HSCR_JOINED", "a" * 56)


def test_parse_ns_reads_what_the_control_port_writes(exit_relays_infos):
    statuses = [RouterStatus(info, RELAY_FLAGS, bandwidth=55) for info in exit_relays_infos]
    routers = parse_ns("\n".join(ns_entry(s, 0) for s in statuses))
    assert [(r.nickname, r.fingerprint, r.address, r.or_port, r.flags, r.bandwidth) for r in routers] == [
        (s.nickname, s.fingerprint, s.info.address, s.info.or_port, RELAY_FLAGS, 55) for s in statuses]


@pytest.fixture
def exit_relays_infos(tmp_path):
    from onionp2p.proto.directory import RelayInfo
    from onionp2p.relay.keys import RelayKeys

    out = []
    for i in range(2):
        keys = RelayKeys.load_or_create(tmp_path / f"k{i}")
        out.append(RelayInfo(nickname=f"n{i}", address="127.0.0.1", or_port=9000 + i, rsa_id=keys.rsa_id_digest,
                             ed_id=keys.identity_public, ntor_key=keys.onion_key_public,
                             exit_policy="accept 1-65535"))
    return out


# -- authentication -------------------------------------------------------------------------------

async def test_cookie_safecookie_and_discovered_cookie(client_node, target):
    async with await ControlClient.open(port=target.port) as c:
        assert await c.authenticate() == "SAFECOOKIE"  # cookie file named by PROTOCOLINFO
        assert (await c.getinfo("version"))["version"].endswith("(onionp2p-0.1.0)")
    async with await ControlClient.open(port=target.port) as c:
        cookie = client_node.cfg.data_dir / "control_auth_cookie"
        assert await c.authenticate(cookie_path=cookie, allow_safecookie=False) == "COOKIE"
        assert "circuit-status" in await c.getinfo("circuit-status")


async def test_wrong_cookie_is_caught_before_answering(client_node, target, tmp_path):
    fake = tmp_path / "fake_cookie"
    fake.write_bytes(os.urandom(32))
    with pytest.raises(AuthenticationError, match="SERVERHASH"):
        await ControlClient.connect(ControlTarget(port=target.port, cookie_path=str(fake)))
    short = tmp_path / "short"
    short.write_bytes(b"x")
    with pytest.raises(AuthenticationError, match="not a control cookie"):
        await ControlClient.connect(ControlTarget(port=target.port, cookie_path=str(short)))


async def test_password_authentication(client_node):
    srv = ControlServer(client_node.control_adapter(), hashed_password=hash_password("s3cret \"pw\""))
    await srv.start()
    try:
        client = await ControlClient.connect(ControlTarget(port=srv.port, password='s3cret "pw"'))
        assert len(parse_ns((await client.getinfo("ns/all"))["ns/all"])) == 3
        await client.close()
        with pytest.raises(AuthenticationError, match="refused"):
            await ControlClient.connect(ControlTarget(port=srv.port, password="wrong"))
        with pytest.raises(AuthenticationError, match="no usable authentication method"):
            await ControlClient.connect(ControlTarget(port=srv.port))
    finally:
        await srv.stop()


async def test_unreachable_port_is_a_typed_error():
    from onionp2p.testnet import free_port

    with pytest.raises(InspectError, match="cannot connect"):
        await ControlClient.connect(ControlTarget(port=free_port(), timeout=5))


# -- onionp2p circuits ------------------------------------------------------------------------------

async def test_circuits_json_paths_streams_and_scrubbing(client_node, target, open_stream, exit_relays):
    rec, _reader, _writer = open_stream
    out = io.StringIO()
    assert await run_circuits(target, as_json=True, out=out) == 0
    doc = json.loads(out.getvalue())
    assert {c["id"] for c in doc["circuits"]} == built_ids(client_node)
    nicks = {r.keys.fingerprint: r.nickname for r in exit_relays}
    for c in doc["circuits"]:
        circ = client_node.client.circuits[c["id"]]
        assert c["state"] == "BUILT" and c["purpose"] == "GENERAL" and c["age_seconds"] >= 0
        assert [(h["fingerprint"], h["nickname"]) for h in c["path"]] == [
            (h.fingerprint, nicks[h.fingerprint]) for h in circ.hops]
        assert [h["role"] for h in c["path"]] == ["guard", "middle", "exit"]
        assert c["bytes_sent"] == 0 and c["bytes_received"] == 0  # reported, and no stream data sent yet
        # how each hop was added and is protected, and the circuit's congestion control
        assert [(h["handshake"], h["relay_crypto"]) for h in c["path"]] == [("ntor-v3", "cgo")] * 3
        assert c["congestion_control"] == "vegas"
        # no DATA yet: the initial window, in slow start, no RTT sample
        assert c["cc"] == {"slow_start": True, "cwnd": 124, "rtt_ms": 0, "min_rtt_ms": 0}
    on_circ = [s for c in doc["circuits"] for s in c["streams"]]
    assert [(s["id"], s["state"], s["circuit"], s["target"]) for s in on_circ] == [
        (rec.id, "SUCCEEDED", rec.circuit_id, SCRUBBED)]
    assert rec.target not in out.getvalue()
    assert {r["nickname"] for r in doc["relays_in_use"]} == {r.nickname for r in exit_relays}
    assert doc["traffic"]["read"] > 0 and doc["traffic"]["written"] > 0

    out = io.StringIO()
    await run_circuits(target, as_json=True, out=out, show_targets=True)
    streams = [s for c in json.loads(out.getvalue())["circuits"] for s in c["streams"]]
    assert [s["target"] for s in streams] == [rec.target]


async def test_circuits_table(client_node, target, open_stream, exit_relays):
    from rich.console import Console

    rec = open_stream[0]
    buf = io.StringIO()
    await run_circuits(target, console=Console(file=buf, width=250, color_system=None))
    text = buf.getvalue()
    for cid in built_ids(client_node):
        assert re.search(rf"│\s+{cid} │ BUILT\s+│ GENERAL", text), text
    circ = client_node.client.circuits[rec.circuit_id]
    exit_hop = circ.hops[-1]
    assert f"{exit_hop.nickname} ${exit_hop.fingerprint[:8]} [exit]" in text
    assert f"#{rec.id} SUCCEEDED {SCRUBBED}" in text and rec.target not in text
    assert f"{len(client_node.client.circuits)} circuits, 1 streams" in text


async def test_circuits_watch_follows_events(client_node, target):
    from rich.console import Console

    buf = io.StringIO()
    stop = asyncio.Event()
    seen: list[set[int]] = []

    def on_update(view: NetworkView) -> None:
        seen.append({c.id for c in view.circuits.values() if c.status == "BUILT"})

    task = asyncio.ensure_future(run_circuits(target, watch=True, stop=stop, on_update=on_update,
                                              console=Console(file=buf, width=200, force_terminal=True)))
    await wait_for(lambda: seen, timeout=20, what="first draw")
    before = built_ids(client_node)
    assert seen[0] == before
    adapter = client_node.control.node
    new_id = await adapter.extend_circuit(0, None, "general")
    await wait_for(lambda: new_id in seen[-1], timeout=20, what="new circuit in the live view")
    victim = min(before)
    assert adapter.close_circuit(victim)
    await wait_for(lambda: victim not in seen[-1], timeout=20, what="closed circuit gone from the live view")
    stop.set()
    assert await task == 0
    text = strip_ansi(buf.getvalue())
    assert re.search(rf"│\s+{new_id} │ BUILT", text)


async def test_circuits_watch_json_lines(client_node, target):
    out = io.StringIO()
    stop = asyncio.Event()
    views: list[dict] = []

    def on_update(view):
        views.append(view_json(view, 0))

    task = asyncio.ensure_future(run_circuits(target, watch=True, as_json=True, out=out, stop=stop,
                                              on_update=on_update))
    await wait_for(lambda: views, timeout=20, what="first line")
    new_id = await client_node.control.node.extend_circuit(0, None, "general")
    await wait_for(lambda: any(c["id"] == new_id and c["state"] == "BUILT" for c in views[-1]["circuits"]),
                   timeout=20, what="new circuit line")
    stop.set()
    await task
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) >= 2
    assert any(c["id"] == new_id and c["state"] == "BUILT" for c in lines[-1]["circuits"])


async def test_circ_bw_events_add_up_per_circuit(client_node, target):
    """tor's CIRC_BW events (deltas), sent through the real control port, sum per circuit."""
    client, view, since = await open_view(target)
    cid = min(built_ids(client_node))
    srv = client_node.control
    for read, written in ((500, 40), (1000, 60)):
        srv.emit("CIRC_BW", format_event("CIRC_BW", f"ID={cid} Read={read} Written={written} "
                                                    "Time=2025-01-01T00:00:00.000000"))
    try:
        async for ev in client.events(since=since):
            view.apply(ev)
            if view.circuits[cid].bytes_read == 1500:
                break
        assert view.circuits[cid].bytes_written == 100
        row = next(c for c in view_json(view, 0)["circuits"] if c["id"] == cid)
        assert (row["bytes_received"], row["bytes_sent"]) == (1500, 100)
    finally:
        await client.close()


async def test_circuit_bytes_from_real_traffic(client_node, target, open_stream):
    """The node's CIRC_BW events (stem parses them) and circuit-status byte totals follow a
    real download; a snapshot plus the CIRC_BW events after it add up to the node's counts."""
    from stem.control import Controller, EventType

    rec, reader, writer = open_stream
    cid = rec.circuit_id
    circ = client_node.client.circuits[cid]
    n = 400_000
    stem_events: list = []
    controller = await asyncio.to_thread(Controller.from_port, port=target.port)
    await asyncio.to_thread(controller.authenticate)
    await asyncio.to_thread(controller.add_event_listener, stem_events.append, EventType.CIRC_BW)
    live, view, since = await open_view(target)  # subscribes to CIRC_BW (WATCH_EVENTS)

    async def pump() -> None:
        async for ev in live.events(since=since):
            view.apply(ev)

    pumping = asyncio.ensure_future(pump())
    try:
        assert len(await http_get(reader, writer, f"/{n}")) == n
        request = f"GET /{n} HTTP/1.0\r\nHost: x\r\n\r\n".encode()
        assert circ.bytes_received >= n and circ.bytes_sent == len(request)

        def totals(doc: dict) -> tuple[int, int]:
            row = next(c for c in doc["circuits"] if c["id"] == cid)
            return row["bytes_received"], row["bytes_sent"]

        async def oneshot() -> tuple[int, int]:  # `onionp2p circuits --json` as a user runs it
            out = io.StringIO()
            assert await run_circuits(target, as_json=True, out=out) == 0
            return totals(json.loads(out.getvalue()))

        exact = (circ.bytes_received, circ.bytes_sent)
        loop = asyncio.get_running_loop()
        end = loop.time() + 15
        while await oneshot() != exact:  # totals as of the last one-second tick
            assert loop.time() < end, "circuit-status never reported the download"
            await asyncio.sleep(0.2)
        # the live view: snapshot + CIRC_BW deltas, exactly the node's counts
        await wait_for(lambda: (view.circuits[cid].bytes_read, view.circuits[cid].bytes_written) == exact,
                       timeout=20, what="the live view adding up CIRC_BW events")
        assert totals(view_json(view, 0)) == exact
        # stem reads our CIRC_BW events as tor's; they sum to the download
        await wait_for(lambda: sum(e.read for e in stem_events if e.id == str(cid)) == exact[0],
                       timeout=20, what="stem events")
        mine = [e for e in stem_events if e.id == str(cid)]
        assert sum(e.written for e in mine) == exact[1]
        assert all(e.delivered_read == e.read and e.time is not None for e in mine)
        # with tor's congestion-control fields (Vegas runs with the exit): the last event
        # carries the window and RTTs of the exit's layer, and the live view keeps them
        vegas = circ.core.layers[-1].cc
        last = mine[-1].keyword_args
        # (the client's window is the one for what it sends: a download leaves it as it was)
        assert {"SS", "CWND", "RTT", "MIN_RTT"} <= set(last)
        assert (int(last["CWND"]), last["SS"]) == (vegas.cwnd, str(int(vegas.in_slow_start)))
        assert int(last["RTT"]) == vegas.rtt_ewma // 1000 and int(last["MIN_RTT"]) == vegas.rtt_min // 1000
        await wait_for(lambda: view.circuits[cid].cwnd is not None, timeout=10, what="CC state in the view")
        row = next(c for c in view_json(view, 0)["circuits"] if c["id"] == cid)
        assert row["congestion_control"] == "vegas" and row["cc"]["cwnd"] == view.circuits[cid].cwnd
        # circuits without traffic send none
        assert {e.id for e in stem_events} == {str(cid)}
        # circuit-status lines with the BYTES_ extension still parse as tor's in stem
        stem_circs = await asyncio.to_thread(controller.get_circuits)
        assert {int(c.id) for c in stem_circs} == built_ids(client_node)
        assert next(c for c in stem_circs if c.id == str(cid)).keyword_args["BYTES_READ"] == str(exact[0])
        # and the rich table shows the byte columns
        from rich.console import Console

        buf = io.StringIO()
        await run_circuits(target, console=Console(file=buf, width=250, color_system=None))
        row = next(line for line in buf.getvalue().splitlines() if re.search(rf"│\s+{cid} │", line))
        assert f"{exact[0] / 1024:.1f} KiB" in row and f"{exact[1]} B" in row and "vegas" in row
    finally:
        pumping.cancel()
        await live.close()
        await close_controller(controller)


async def test_cli_process_json_and_errors(client_node, target, tmp_path):
    """The real command line in a child process (onionp2p.ops.circuits.main = the subcommands)."""
    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "onionp2p", *args, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    cookie = str(client_node.cfg.data_dir / "control_auth_cookie")
    rc, out, err = await run("circuits", "--control", f"127.0.0.1:{target.port}", "--cookie", cookie, "--json")
    assert rc == 0, err
    assert {c["id"] for c in json.loads(out)["circuits"]} == built_ids(client_node)
    rc, out, err = await run("circuits", "--control-port", str(target.port), "--password", "nope")
    assert rc == 2 and "does not accept a password" in err


# -- the picture -------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["matplotlib", "dot"])
async def test_graph_svg_and_png_name_the_relays(client_node, target, exit_relays, tmp_path, engine):
    if engine == "dot" and shutil.which("dot") is None:
        pytest.skip("Graphviz dot not installed")
    client, view, _ = await open_view(target, events=())
    await client.close()
    svg, png = tmp_path / "net.svg", tmp_path / "net.png"
    assert render_graph(view, svg, engine=engine) == engine
    assert render_graph(view, png, engine=engine) == engine
    text = svg.read_text()
    for relay in exit_relays:
        assert relay.nickname in text and relay.keys.fingerprint[:8] in text
    for cid in built_ids(client_node):
        assert f"circ{'uit' if engine == 'matplotlib' else ''} {cid}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


async def test_graph_from_cli_and_tools_script(client_node, target, exit_relays, tmp_path):
    out = tmp_path / "c.svg"
    assert await run_circuits(target, as_json=True, out=io.StringIO(), graph=str(out),
                              graph_engine="matplotlib") == 0
    assert all(r.nickname in out.read_text() for r in exit_relays)
    png = tmp_path / "script.png"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "tools" / "circuit_graph.py"), "--control-port", str(target.port),
        "-o", str(png), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InspectError, match="must end in"):
        render_graph(NetworkView(), tmp_path / "x.gif")


# -- onionp2p top -----------------------------------------------------------------------------------

async def test_top_tui_with_pilot(client_node, target, open_stream, exit_relays, http_server):
    from textual.widgets import DataTable, Sparkline

    from onionp2p.ops.top import TopApp

    rec, reader, writer = open_stream
    app = TopApp(target)
    async with app.run_test(size=(180, 50)) as pilot:
        circuits = app.query_one("#circuits", DataTable)
        relays = app.query_one("#relays", DataTable)
        streams = app.query_one("#streams", DataTable)
        def rows(table):
            return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]

        def node_circuits():
            return {(str(c.id), "BUILT" if c.state == "built" else ("EXTENDED" if c.hops else "LAUNCHED"))
                    for c in client_node.client.circuits.values()}

        await wait_for(lambda: app.status.startswith("connected") and {tuple(r[:2]) for r in rows(circuits)}
                       == node_circuits(), timeout=20, what="the node's circuits in the table")
        assert {row[0] for row in rows(relays)} == {r.nickname for r in exit_relays}
        assert [str(c) for c in streams.get_row_at(0)[:4]] == [str(rec.id), "SUCCEEDED", str(rec.circuit_id),
                                                              SCRUBBED]
        await pilot.pause()
        assert SCRUBBED in app.export_screenshot()  # rendered, not eaten as markup
        assert rec.target not in app.export_screenshot()
        await pilot.press("t")
        assert str(streams.get_row_at(0)[3]) == rec.target
        await pilot.pause()
        await wait_for(lambda: rec.target in app.export_screenshot(), timeout=20, what="the target on screen")

        new_id = await client_node.control.node.extend_circuit(0, None, "general")
        await wait_for(lambda: [str(new_id), "BUILT"] in [r[:2] for r in rows(circuits)],
                       timeout=20, what="new circuit row")

        logging.getLogger("onionp2p.test_tools").warning("tui log check %d", 42)
        await wait_for(lambda: any("tui log check 42" in m.message for m in app.view.log),
                       timeout=20, what="WARN event")
        assert app.log_lines >= 1

        body = await http_get(reader, writer, "/300000")  # traffic for the BW graph
        assert len(body) == 300000
        await wait_for(lambda: sum(r for r, _ in app.view.bandwidth) > 300000,
                       timeout=20, what="BW samples with the download")
        sparkline = app.query_one("#bw-read", Sparkline)
        await wait_for(lambda: sum(sparkline.data) > 300000, timeout=20, what="the download in the graph")
        await pilot.press("q")
    assert app.return_code == 0


async def test_top_reports_unreachable_port():
    from onionp2p.ops.top import TopApp
    from onionp2p.testnet import free_port

    app = TopApp(ControlTarget(port=free_port(), timeout=5))
    async with app.run_test() as pilot:
        await wait_for(lambda: app.return_code is not None, timeout=20, what="app exit")
        await pilot.pause()
    assert app.return_code == 2


@pytest.mark.parametrize("command,package", [("top", "textual"), ("circuits", "rich")])
def test_missing_package_names_the_tools_extra(command, package):
    """Without an optional package a tool says which one and how to get all of them."""
    code = (f"import sys; sys.modules[{package!r}] = None\n"  # import fails as if not installed
            f"from onionp2p.cli import main; sys.exit(main([{command!r}, '--control-port', '9']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert f"needs the Python package '{package}'" in p.stderr
    assert "pip install 'onionp2p[tools]'" in p.stderr


def test_tools_find_the_node_from_its_data_dir(tmp_path, monkeypatch):
    """--data-dir DIR (a node's, or a testnet's DIR/client) reads DIR/control_port and the
    cookie beside it; without options ./onionp2p-client is tried, then 127.0.0.1:9151."""
    import argparse

    from onionp2p.errors import OnionError
    from onionp2p.ops.circuits import add_control_arguments, target_from_args

    p = argparse.ArgumentParser()
    add_control_arguments(p)
    node = tmp_path / "net" / "client"
    node.mkdir(parents=True)
    (node / "control_port").write_text("PORT=127.0.0.1:40123\n")
    (node / "control_auth_cookie").write_bytes(os.urandom(32))
    for d in (node, node.parent):
        t = target_from_args(p.parse_args(["--data-dir", str(d)]))
        assert (t.host, t.port, t.cookie_path) == ("127.0.0.1", 40123, str(node / "control_auth_cookie"))
    assert target_from_args(p.parse_args(["--data-dir", str(node), "--password", "x"])).cookie_path is None
    with pytest.raises(OnionError, match="no control_port file"):
        target_from_args(p.parse_args(["--data-dir", str(tmp_path)]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "control_port").write_text("UNIX_PORT=/x\n")
    with pytest.raises(OnionError, match="names no control port"):
        target_from_args(p.parse_args(["--data-dir", str(tmp_path / "bad")]))
    monkeypatch.chdir(tmp_path)
    assert target_from_args(p.parse_args([])).port == 9151  # nothing here: the default
    (tmp_path / "onionp2p-client").mkdir()
    (tmp_path / "onionp2p-client" / "control_port").write_text("PORT=127.0.0.1:40999\n")
    assert target_from_args(p.parse_args([])).port == 40999  # a client's default data_dir here
    assert target_from_args(p.parse_args(["--control-port", "9051"])).port == 9051


def test_client_control_port_flag():
    from onionp2p.cli import build_parser, client_config_from_args

    def cfg(*argv):
        return client_config_from_args(build_parser().parse_args(["client", *argv]))

    assert cfg().control_port == "9151-or-auto"
    assert cfg("--control-port", "off").control_port is None
    assert cfg("--control-port", "auto").control_port == 0
    assert cfg("--control-port", "9051").control_port == 9051
    c = cfg("--http-tunnel-port", "8118", "--dns-port", "auto")
    assert (c.http_tunnel_port, c.dns_port) == (8118, 0)
    assert (cfg().http_tunnel_port, cfg().dns_port) == (None, None)
