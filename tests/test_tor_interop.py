"""onionp2p's client against a private network of real C tor relays (tools/tornet.py).

One network (3 authorities, 5 relays, 2 of them exits) is started per module. The tests
read its directory with onionp2p.tordir, build circuits with OnionClient through tor
relays, move data, provoke tor into sending cells we do not implement, and finally check
the relays' logs for protocol warnings. Skipped only when the tor binary is absent.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import blob, chi_square, http_get, load_tornet, require_tor, sha256, wait_for

from onionp2p.client.client import OnionClient
from onionp2p.client.guards import GuardSet
from onionp2p.client.pathsel import can_be_guard, exits_for_port, weighted_choice
from onionp2p.dir.server import fetch, http_request
from onionp2p.dir.tordir import (
    fetch_tor_directory,
    fetch_tor_network,
    parse_consensus,
    parse_dirauth_line,
    parse_key_certificates,
    verify_consensus,
)
from onionp2p.errors import StreamError
from onionp2p.proto.bwweights import WEIGHT_KEYS, bandwidth_totals, compute_bw_weights
from onionp2p.proto.cells import PaddingNegotiate
from onionp2p.proto.relaycell import EndReason, RelayCommand, ResolvedType

tornet = load_tornet()

pytestmark = [
    pytest.mark.tor,
    pytest.mark.slow,
]

MB5 = 5_000_000
PADDING_NEGOTIATE, PADDING_NEGOTIATED = 41, 42  # circuit padding (padding-spec); we implement neither
# (channel padding, link cell 12 PADDING_NEGOTIATE, we do implement: test_tor_guard_sees_...)

# [warn] lines a tiny test network produces by itself, never because of a client's cells.
_BENIGN_WARNINGS = (
    "Bw Weight Failure",  # authorities computing bandwidth weights for 8 relays
    "Received http status code 404",  # relays asking for a consensus before one exists
    "No available nodes when trying to choose node",  # tor's own path selection, tiny network
    "Could not find a node that matches the configured _HSLayer2Nodes",
    # Relays' own bandwidth self-test circuits end at the relay itself; the hop before it
    # then "extends back". Our circuits never name one relay twice (asserted in _path).
    "Client asked me to extend back to the previous hop",
    # tor's reminders when it (re)reads its torrc: a test turns on debug logging with SIGHUP
    "TestingTorNetwork is set",
    "Your log may contain sensitive information",
)
# Generic follow-up line; accepted only directly after a benign circuit-level line.
_FOLLOW_UP = "connection_edge_process_relay_cell (away from origin) failed."


@pytest.fixture(scope="module")
def tor_network(tmp_path_factory):
    require_tor()  # every test here uses this fixture: skips without tor, fails under CI=true
    net = tornet.TorNet(tmp_path_factory.mktemp("tornet"), extra_authority_options=[
        # Pad idle client channels after 0.2-0.5 s instead of 1.5-9.5 s (padding-spec 2.6); our
        # client reads these from the consensus too.
        "ConsensusParams nf_ito_low=200 nf_ito_high=500",
    ])
    net.start(n_relays=5, n_exits=2, timeout=150)
    try:
        # net.start waits for the relays (what paths need); an authority can still be
        # missing from the first consensus (its reachability not yet tested): the tests
        # here expect every node, so wait for a consensus that lists them all
        names = {n.name for n in net.nodes}
        deadline = time.monotonic() + 90
        while True:
            statuses = asyncio.run(fetch_tor_directory(net.dirauth_lines()))
            if {s.nickname for s in statuses} >= names or time.monotonic() > deadline:
                break
            time.sleep(2)
        marks = {name: path.stat().st_size for name, path in net.log_paths().items()}
        yield net, {s.nickname: s for s in statuses}, marks
    finally:
        net.stop()


def _path(statuses, *, exit_name: str | None = None, hops: int = 3):
    """guard, middle, exit (non-authority relays); 1 or 2 hops end at a non-exit."""
    relays = {n: s for n, s in statuses.items() if "Authority" not in s.flags}
    last = relays[exit_name] if exit_name else next(s for s in relays.values() if "Exit" in s.flags)
    others = sorted((s for s in relays.values() if "Exit" not in s.flags), key=lambda s: s.nickname)
    guard = next(s for s in others if "Guard" in s.flags)
    middle = next(s for s in others if s is not guard)
    path = {1: [guard], 2: [guard, middle], 3: [guard, middle, last]}[hops]
    assert len({s.fingerprint for s in path}) == len(path)  # never the same relay twice
    return [s.info for s in path]


async def test_directory_is_verified_and_complete(tor_network):
    net, statuses, _ = tor_network
    assert set(statuses) == {n.name for n in net.nodes}
    for node in net.nodes:
        st = statuses[node.name]
        assert st.fingerprint == node.fingerprint
        assert (st.info.address, st.info.or_port) == ("127.0.0.1", node.or_port)
        assert {"Running", "Valid", "Fast", "Guard"} <= st.flags
        assert ("Exit" in st.flags) == node.exit
        assert st.info.exit_policy == ("accept 1-65535" if node.exit else "reject 1-65535")
        assert len(st.info.ed_id) == 32 and len(st.info.ntor_key) == 32
        assert st.info.supports("Relay", 4) and st.info.supports("Link", 5)  # from the "pr" line
    # every authority signed, and each signature verified
    auth = net.authorities[0]
    certs = parse_key_certificates(await fetch("127.0.0.1", auth.dir_port, "/tor/keys/all"))
    consensus = parse_consensus(await fetch("127.0.0.1", auth.dir_port,
                                            "/tor/status-vote/current/consensus-microdesc", max_size=1 << 22))
    authorities = [parse_dirauth_line(ln) for ln in net.dirauth_lines()]
    signed = verify_consensus(consensus, authorities, certs, now=consensus.valid_after + 1)
    assert signed == {a.v3ident for a in authorities}
    # the bandwidth-weights line parses, and our authorities' algorithm gives the same weights
    # from the same bandwidths and flags
    assert set(consensus.bw_weights) == set(WEIGHT_KEYS)
    assert compute_bw_weights(bandwidth_totals((e.flags, e.bandwidth) for e in consensus.entries)) \
        == consensus.bw_weights


async def test_three_hop_circuits_carry_5mb_through_each_tor_exit(tor_network, http_server):
    _, statuses, _ = tor_network
    client = OnionClient()
    try:
        async def one(exit_name):
            circ = await client.build_circuit(_path(statuses, exit_name=exit_name), timeout=60)
            # tor relays list Relay=2-6 and FlowCtrl=1-2: every hop was added with ntor-v3 and
            # accepted our SUBPROTO_REQUEST for CGO, with the CC_REQUEST that CGO needs (Vegas
            # at every hop; only the exit's carries data); cells in relay message format v1
            assert [layer.handshake for layer in circ.core.layers] == ["ntor-v3"] * 3
            assert [layer.relay_crypto for layer in circ.core.layers] == ["cgo"] * 3
            assert all(layer.v1 for layer in circ.core.layers)
            assert [layer.cc is not None for layer in circ.core.layers] == [True, True, True]
            vegas = circ.core.layers[2].cc
            assert vegas.inc == 31  # tor's cc_sendme_inc
            reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
            body = await http_get(reader, writer, f"/{MB5}")
            # upload under our Vegas: tor's SENDMEs (every 31 cells, digests checked) come back
            reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
            payload = blob(1_000_000)
            writer.write(b"GET /echo HTTP/1.0\r\n\r\n" + payload)
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(len(payload)) == payload
            await wait_for(lambda: vegas.sendmes == vegas.sent // 31, what="tor's last SENDMEs")
            assert vegas.sent >= len(payload) // 488 and vegas.samples > 0 and vegas.rtt_min > 0
            assert circ.core.layers[2].deliver.increment == 31  # and ours went every 31 cells to tor
            circ.close()
            return body
        exits = sorted(n for n, s in statuses.items() if "Exit" in s.flags)
        assert len(exits) == 2
        bodies = await asyncio.gather(*(one(e) for e in exits))
        for body in bodies:
            assert len(body) == MB5 and sha256(body) == sha256(blob(MB5))
    finally:
        await client.close()


async def test_parallel_streams_on_one_tor_circuit(tor_network, http_server):
    _, statuses, _ = tor_network
    client = OnionClient()
    try:
        circ = await client.build_circuit(_path(statuses), timeout=60)
        sizes = [1, 498, 499, 100_000, 700_000]

        async def get(n):
            reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
            return await http_get(reader, writer, f"/{n}")
        bodies = await asyncio.gather(*(get(n) for n in sizes))
        assert [sha256(b) for b in bodies] == [sha256(blob(n)) for n in sizes]
        assert circ.state == "built"
    finally:
        await client.close()


async def test_tor_refusals_are_understood(tor_network, http_server):
    _, statuses, _ = tor_network
    client = OnionClient()
    try:
        # a stream at a non-exit tor relay: END(EXITPOLICY)
        circ = await client.build_circuit(_path(statuses, hops=2), timeout=60)
        with pytest.raises(StreamError) as err:
            await circ.open_stream("127.0.0.1", http_server.port)
        assert err.value.reason == EndReason.EXITPOLICY
        # a closed port at a tor exit: END (tor reports this as MISC, we would say CONNECTREFUSED)
        circ = await client.build_circuit(_path(statuses), timeout=60)
        with pytest.raises(StreamError) as err:
            await circ.open_stream("127.0.0.1", 1)
        assert err.value.reason in (EndReason.MISC, EndReason.CONNECTREFUSED)
        # RESOLVE of an IP literal: tor 0.4.9 answers an error (its send_resolved_cell has no
        # cached entry to answer from); accept the address too, should tor change that
        answer = (await circ.resolve("127.0.0.1")).answers[0]
        assert (answer.atype, answer.value) in (
            (ResolvedType.IPV4, b"\x7f\x00\x00\x01"),
            (ResolvedType.ERROR_NONTRANSIENT, b"Error resolving hostname"))
        # the circuit survives all of this
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert await http_get(reader, writer, "/1000") == blob(1000)
    finally:
        await client.close()


async def test_begin_dir_to_a_tor_relay(tor_network):
    """A one-hop circuit to an authority's ORPort, BEGIN_DIR, and tor's own HTTP over it.
    (An authority, because ordinary relays fetch each consensus some seconds later.)"""
    net, statuses, _ = tor_network
    client = OnionClient()
    try:
        auth = next(s for s in statuses.values() if "Authority" in s.flags)
        circ = await client.build_circuit([auth.info], timeout=60)
        reader, writer = await circ.open_dir_stream()
        raw = await http_request(reader, writer, "GET", "/tor/status-vote/current/consensus-microdesc",
                                 max_size=1 << 22)
        reader, writer = await circ.open_dir_stream()
        certs = parse_key_certificates(await http_request(reader, writer, "GET", "/tor/keys/all",
                                                          max_size=1 << 20))
        consensus = parse_consensus(raw)
        authorities = [parse_dirauth_line(ln) for ln in net.dirauth_lines()]
        assert len(verify_consensus(consensus, authorities, certs, now=consensus.valid_after + 1)) >= 2
        assert {e.nickname for e in consensus.entries} == set(statuses)
    finally:
        await client.close()


async def test_cells_we_do_not_implement_are_ignored(tor_network, http_server):
    """tor sends PADDING (link), PADDING_NEGOTIATED and RELAY_DROP (circuit): all dropped."""
    net, statuses, _ = tor_network
    view = await fetch_tor_network(net.dirauth_lines())
    client = OnionClient()
    client.consensus_params = lambda: dict(view.params)  # we ask the guard to pad at 0.2-0.5 s
    try:
        circ = await client.build_circuit(_path(statuses), timeout=60)
        # tor pads only after its own timeout of silence, which our padding would keep
        # resetting: for this test only the guard pads the link
        circ.chan.padding.enabled = False
        seen: collections.Counter = collections.Counter()
        core = circ.core
        on_message, on_data = core._on_message, core._on_data

        def spy_message(layer, cmd, sid, data, digest):  # records what arrives, then lets the core handle it
            seen[(layer.index, cmd)] += 1
            return on_message(layer, cmd, sid, data, digest)

        def spy_data(layer, sid, body, length, digest):
            seen[(layer.index, RelayCommand.DATA)] += 1
            return on_data(layer, sid, body, length, digest)
        core._on_message, core._on_data = spy_message, spy_data
        # Ask the middle relay (hop 1) for circuit padding machine 0 (relay side of tor's
        # intro-circuit hiding): it answers PADDING_NEGOTIATED and then pads with RELAY_DROP
        # once it forwards traffic to us. Machine 200 does not exist: ERR answer.
        for machine in (0, 200):
            circ.send_relay(PADDING_NEGOTIATE, 0, bytes([0, 2, machine, 0, 0, 0, 0, 1]), hop=1)
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert await http_get(reader, writer, "/200000") == blob(200_000)
        async with asyncio.timeout(30):
            while seen[(1, PADDING_NEGOTIATED)] < 2 or seen[(1, RelayCommand.DROP)] < 1:
                await asyncio.sleep(0.05)
        # Idle channel: the guard sends link-level PADDING cells (nf_ito_* set low above).
        # Cells on the channel that were not relay cells of our circuit (the only one on
        # this channel) are those PADDING cells, which Channel drops.
        chan = circ.chan

        def link_only() -> int:
            return chan.cells_in - sum(seen.values())
        before = link_only()
        async with asyncio.timeout(30):
            while link_only() < before + 3:
                await asyncio.sleep(0.05)
        assert not chan.closed and circ.state == "built"
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert await http_get(reader, writer, "/50000") == blob(50_000)
    finally:
        await client.close()


async def test_onionp2p_client_socks_through_tor_relays(tor_network, http_server, tmp_path):
    """`onionp2p client --tor-dirauth-file`: curl through our SOCKS port over 3 tor relays."""
    import re
    import shutil

    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    net, _, _ = tor_network
    dirauth = tmp_path / "dirauth.txt"
    dirauth.write_text("\n".join(net.dirauth_lines()) + "\n")
    cfg = tmp_path / "client.toml"
    cfg.write_text('data_dir = "client"\nsocks_address = "127.0.0.1:0"\nenforce_distinct_subnets = false\nclient_reject_internal_addresses = false\n'
                   "preemptive_circuits = 1\ncontrol_port = 0\n")
    out = tmp_path / "client.out"
    with open(out, "w") as f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "onionp2p", "client", "--config", str(cfg), "--tor-dirauth-file", str(dirauth),
            stdout=f, stderr=asyncio.subprocess.STDOUT)
    try:
        port = None
        for _ in range(600):
            if m := re.search(r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)", out.read_text()):
                port = int(m.group(1))
                break
            assert proc.returncode is None, out.read_text()
            await asyncio.sleep(0.1)
        assert port, out.read_text()
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "60", "--socks5-hostname", f"127.0.0.1:{port}",
            f"http://127.0.0.1:{http_server.port}/5000000", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        body, err = await curl.communicate()
        assert curl.returncode == 0, err
        assert sha256(body.partition(b"\r\n\r\n")[2] if body.startswith(b"HTTP/") else body) == \
            sha256(blob(5_000_000))
        # `onionp2p circuits --json` on that client: ntor-v3 and CGO on every hop, Vegas with the exit
        control = int(re.search(r"Control port at 127\.0\.0\.1:(\d+)", out.read_text()).group(1))
        tool = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "onionp2p", "circuits", "--json", "--control-port", str(control),
            "--cookie", str(tmp_path / "client" / "control_auth_cookie"), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        doc_text, err = await tool.communicate()
        assert tool.returncode == 0, err
        built = [c for c in json.loads(doc_text)["circuits"] if c["state"] == "BUILT"]
        assert built and all(c["congestion_control"] == "vegas" for c in built)
        assert all(h["handshake"] == "ntor-v3" and h["relay_crypto"] == "cgo" for c in built for h in c["path"])
        assert any(c["cc"]["rtt_ms"] is not None and c["cc"]["cwnd"] >= 124 for c in built)
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0


def _reload_with(node, extra: str) -> None:
    """Rewrite a running tor node's torrc as ``extra`` lines after its own and make it reread
    it (SIGHUP: tor applies new Log lines without a restart)."""
    base = node.torrc.read_text().split(_EXTRA_MARK)[0]
    node.torrc.write_text(base + (_EXTRA_MARK + extra if extra else ""))
    os.kill(node.pid, signal.SIGHUP)


_EXTRA_MARK = "# -- added by a test --\n"
_CELL_READ = re.compile(r"connection_or_process_cells_from_inbuf\(\): (\d+): starting, inbuf_datalen (\d+)")
_NEGOTIATED = re.compile(r"Negotiated padding=(\d+), lo=(\d+), hi=(\d+) on (\d+)")


async def test_tor_guard_sees_padding_negotiate_and_channel_padding_from_us(tor_network):
    """A tor relay as our guard sees from us what it sees from a tor client: no
    PADDING_NEGOTIATE from a default client (tor's client only sends one to disable or reduce
    padding), STOP from one with ``reduced_connection_padding`` (channelpadding.c logs
    ``Negotiated padding=0``, info), and our PADDING cells on the idle link (connection_or.c,
    debug: a cell read that no circuit or command handler sees); and it pads towards us."""
    net, statuses, _ = tor_network
    view = await fetch_tor_network(net.dirauth_lines())
    assert (view.params["nf_ito_low"], view.params["nf_ito_high"]) == (200, 500)
    path = _path(statuses)
    guard = next(n for n in net.nodes if n.fingerprint == path[0].fingerprint)
    debug_log = Path(guard.directory) / "padding-debug.log"
    _reload_with(guard, f"Log [or,channel]debug file {debug_log}\n")
    client = OnionClient()
    client.consensus_params = lambda: dict(view.params)
    reduced = OnionClient(reduced_connection_padding=True)
    reduced.consensus_params = lambda: dict(view.params)
    try:
        await wait_for(lambda: debug_log.exists() and debug_log.stat().st_size > 0, timeout=20,
                       what="tor to open its debug log")
        start = debug_log.stat().st_size
        await client.build_circuit(path, timeout=60)  # three hops: the channel is worth padding
        chan = client.channels[path[0].rsa_id]

        def negotiations(since: int) -> list[tuple[tuple[str, ...], str]]:
            with open(debug_log, errors="replace") as f:
                f.seek(since)
                lines = f.read().splitlines()
            out = []
            for i, line in enumerate(lines):
                if m := _NEGOTIATED.search(line):
                    # the connection that carried it: the last cell read logged before the line
                    fd = next(r.group(1) for ln in reversed(lines[:i]) if (r := _CELL_READ.search(ln)))
                    out.append((m.groups(), fd))
            return out

        # a default client sends no PADDING_NEGOTIATE, as tor's; the guard pads it anyway
        await wait_for(lambda: chan.padding_in >= 1, timeout=20, what="padding from tor")
        assert negotiations(start) == [] and chan.padding.enabled
        # a client with reduced padding asks the guard to stop, as tor's client does
        mark = debug_log.stat().st_size
        await reduced.build_circuit(path, timeout=60)
        ((r_enabled, r_lo, r_hi, _r_id), _r_fd), = await wait_for(lambda: negotiations(mark), timeout=20,
                                                               what="tor to log the reduced client's STOP")
        assert (r_enabled, r_lo, r_hi) == ("0", "200", "200")  # STOP 0/0, clamped up to nf_ito_low
        # to find our default client's connection in tor's log, the test itself sends one
        # (harmless) START on it: the negotiation line names tor's channel id and fd
        mark = debug_log.stat().st_size
        chan.send_cell(0, 12, PaddingNegotiate(PaddingNegotiate.START, 200, 500).encode())
        chan.flush()
        ((enabled, lo, hi, chan_id), fd), = await wait_for(lambda: negotiations(mark), timeout=20,
                                                           what="tor to log the test's marker")
        assert (enabled, lo, hi) == ("1", "200", "500")
        # the circuit is built and idle: whatever arrives on that connection now is link padding
        await asyncio.sleep(1.0)
        mark, out0 = debug_log.stat().st_size, chan.padding_out
        await asyncio.sleep(4.0)
        out1 = chan.padding_out
        await asyncio.sleep(0.3)  # tor's last lines of the window
        with open(debug_log, errors="replace") as f:
            f.seek(mark)
            window = f.read()
        reads = [m for m in _CELL_READ.finditer(window) if m.group(1) == fd and int(m.group(2)) >= 514]
        assert out1 - out0 >= 4  # we padded the idle link (0.2-0.5 s timeouts, both ends padding)
        assert out1 - out0 - 1 <= len(reads) <= out1 - out0 + 1, (len(reads), out1 - out0)
        # ... and those cells reached no circuit or command handler of tor: link padding
        assert f"(global ID {chan_id})" not in "\n".join(
            ln for ln in window.splitlines() if "channel_process_cell" in ln)
        # tor pads the link towards us as well (rarely: our padding keeps resetting its idle
        # clock), and we count every keepalive it logs sending
        await wait_for(lambda: chan.padding_in >= 1, timeout=20, what="padding from tor")
        received = chan.padding_in
        await asyncio.sleep(0.3)
        with open(debug_log, errors="replace") as f:
            f.seek(start)
            sent_by_tor = f.read().count(f"Sending netflow keepalive on {chan_id} ")
        assert received <= sent_by_tor <= received + 1, (received, sent_by_tor)
    finally:
        await client.close()
        await reduced.close()
        _reload_with(guard, "")


def _new_warnings(net, marks: dict[str, int]) -> list[str]:
    """[warn]/[err] lines written after ``marks`` that are not on the benign list."""
    bad = []
    for name, path in net.log_paths().items():
        with open(path, "rb") as f:
            f.seek(marks[name])
            lines = f.read().decode("utf-8", "replace").splitlines()
        prev_benign = False
        for line in lines:
            if "[warn]" not in line and "[err]" not in line:
                continue
            if any(b in line for b in _BENIGN_WARNINGS):
                prev_benign = True
                continue
            if not (_FOLLOW_UP in line and prev_benign):
                bad.append(f"{name}: {line}")
            prev_benign = False
    return bad


async def test_position_choices_follow_the_tor_consensus_weights(tor_network, tmp_path):
    """On the network's own consensus, fetched and verified as the client does: 10k simulated
    choices per position follow tor's bandwidth weights (chi-square), and so does the guard
    set's sampling. Runs late: fresh tor relays publish bandwidth 0 until they have measured
    their own traffic, so it waits (up to 4 minutes) for a consensus with bandwidths."""
    net = tor_network[0]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 240
    while True:
        view = await fetch_tor_network(net.dirauth_lines())
        if all(r.bandwidth > 0 for r in view.routers) or loop.time() > deadline:
            break
        await asyncio.sleep(5)
    assert any(r.bandwidth > 0 for r in view.routers), "tor relays never published a bandwidth"
    assert set(view.bw_weights) == set(WEIGHT_KEYS)
    w = view.bw_weights
    keys = {"guard": {"g": "Wgg", "m": "Wgm", "e": None, "d": "Wgd"},
            "middle": {"g": "Wmg", "m": "Wmm", "e": "Wme", "d": "Wmd"},
            "exit": {"g": "Weg", "m": "Wem", "e": "Wee", "d": "Wed"}}

    def expected(cands, position, weights, n):
        """tor's compute_weighted_bandwidths, written out (weights None: plain bandwidth)."""
        def one(rs):
            exit_ = "Exit" in rs.flags and "BadExit" not in rs.flags
            guard = "Guard" in rs.flags
            key = keys[position]["d" if guard and exit_ else "g" if guard else "e" if exit_ else "m"]
            return rs.bandwidth * ((0 if key is None else weights[key]) if weights else 1)
        total = sum(one(r) for r in cands)
        return {r.nickname: n * one(r) / total for r in cands}

    n = 10_000
    candidates = {"guard": [r for r in view.routers if can_be_guard(r)], "middle": list(view.routers),
                  "exit": exits_for_port(view.routers, 80)}
    for position, cands in candidates.items():
        rng = random.Random(position)
        counts = collections.Counter(weighted_choice(cands, position, rng, w).nickname for _ in range(n))
        want, plain = expected(cands, position, w, n), expected(cands, position, None, n)
        _, p = chi_square(counts, want)
        assert p > 1e-3, (position, counts, w)
        if sum(abs(want[k] - plain[k]) for k in want) > 0.1 * n:  # the weights matter here: the test sees it
            assert chi_square(counts, plain)[1] < 1e-6, (position, counts)
    # guard sampling: the first guard sampled by 1000 fresh clients
    firsts = collections.Counter(
        GuardSet(tmp_path / f"g{seed}.json", n_primary=1, max_sample=1, rng=random.Random(seed),
                 bw_weights=lambda: w).pick(view.routers).nickname for seed in range(1000))
    _, p = chi_square(firsts, expected(candidates["guard"], "guard", w, 1000))
    assert p > 1e-3, (firsts, w)
    if w["Wgd"] == 0:  # tor's weights for this network keep Guard+Exit relays for the exit position
        assert not any("Exit" in r.flags for r in view.routers if firsts[r.nickname])


@pytest.mark.parametrize("cgo", [True, False], ids=["cgo", "tor1"])
async def test_onion_service_cells_at_tor_relays(tor_network, cgo, caplog):
    """Our onion-service cells and KH against tor's introduction and rendezvous points:
    tor accepts ESTABLISH_INTRO (so our KH after the CGO or tor1 keys, our MAC and signature
    are tor's), relays INTRODUCE1 as INTRODUCE2 and acks it, and splices a rendezvous whose
    end-to-end layer both ends share (the log check after this test sees no warnings)."""
    import logging
    import os

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from onionp2p.proto.hs.cells import (
        EstablishIntro,
        EstablishRendezvous,
        IntroAckStatus,
        Introduce1,
        IntroduceAck,
        Rendezvous1,
        Rendezvous2,
    )
    from onionp2p.proto.hs.ntor import expand_circuit_keys

    caplog.set_level(logging.DEBUG, logger="onionp2p.client")
    _, statuses, _ = tor_network
    relays = sorted((s for s in statuses.values() if "Authority" not in s.flags), key=lambda s: s.nickname)
    client, service = OnionClient(cgo=cgo), OnionClient(cgo=cgo)

    def inbox(circ) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        circ.on_hs_message = lambda hop, cmd, data: q.put_nowait((hop, cmd, data))
        return q

    async def expect(q, cmd):
        hop, got, data = await asyncio.wait_for(q.get(), 30)
        assert got == cmd, (got, cmd)
        return data

    try:
        ip, rp = relays[0], relays[1]
        key = ed25519.Ed25519PrivateKey.generate()
        auth = key.public_key().public_bytes_raw()
        svc = await service.build_circuit([relays[2].info, ip.info], timeout=60)
        assert svc.core.layers[-1].relay_crypto == ("cgo" if cgo else "tor1")
        svc_in = inbox(svc)
        svc.send_relay(RelayCommand.ESTABLISH_INTRO, 0,
                       EstablishIntro.create(key, svc.core.layers[-1].kh).encode())
        await expect(svc_in, RelayCommand.INTRO_ESTABLISHED)
        cli = await client.build_circuit([relays[3].info, ip.info], timeout=60)
        cli_in = inbox(cli)
        intro1 = Introduce1(auth, os.urandom(246)).encode()
        cli.send_relay(RelayCommand.INTRODUCE1, 0, intro1)
        assert IntroduceAck.parse(await expect(cli_in, RelayCommand.INTRODUCE_ACK)).status == IntroAckStatus.SUCCESS
        assert await expect(svc_in, RelayCommand.INTRODUCE2) == intro1

        a = await client.build_circuit([relays[3].info, relays[2].info, rp.info], timeout=60)
        b = await service.build_circuit([relays[4].info, relays[0].info, rp.info], timeout=60)
        a_in = inbox(a)
        cookie = os.urandom(20)
        a.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(cookie).encode())
        await expect(a_in, RelayCommand.RENDEZVOUS_ESTABLISHED)
        info = os.urandom(64)
        b.send_relay(RelayCommand.RENDEZVOUS1, 0, Rendezvous1(cookie, info).encode())
        assert Rendezvous2.parse(await expect(a_in, RelayCommand.RENDEZVOUS2)).handshake_info == info
        keys = expand_circuit_keys(os.urandom(32))  # (hs-ntor's seed; the handshake is tested elsewhere)
        a.add_virtual_hop(keys.key_material())
        b.add_virtual_hop(keys.key_material(service_side=True))
        opening = asyncio.ensure_future(a.open_stream("service.invalid", 80, timeout=30))
        async with asyncio.timeout(30):
            while not a.core.streams:
                await asyncio.sleep(0.02)
        sid = next(iter(a.core.streams))

        def at_service(cmd: str) -> int:
            return sum(1 for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("from_hop") == 3
                       and r.msg.get("relay_cmd") == cmd and r.msg.get("stream_id") == sid)
        async with asyncio.timeout(30):
            while not at_service("BEGIN"):
                await asyncio.sleep(0.02)
        b.send_relay(RelayCommand.CONNECTED, sid, b"", hop=3)
        reader, _writer = await opening
        payload = os.urandom(1200)
        for i in range(0, len(payload), 400):
            b.send_relay(RelayCommand.DATA, sid, payload[i:i + 400], hop=3)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
    finally:
        await client.close()
        await service.close()


def test_tor_logs_show_no_protocol_warnings(tor_network):
    """After every test above: nothing but known benign warnings since bootstrap."""
    net, _, marks = tor_network
    net.check_alive()
    bad = _new_warnings(net, marks)
    assert not bad, "tor relays logged warnings:\n" + "\n".join(bad)


async def test_log_check_catches_a_real_protocol_violation(tor_network, http_server):
    """Negative control (runs after the check above): BEGIN on a one-hop circuit is refused
    by tor with a protocol warning, and _new_warnings reports it."""
    net, statuses, _ = tor_network
    marks = {name: path.stat().st_size for name, path in net.log_paths().items()}
    client = OnionClient()
    try:
        circ = await client.build_circuit(_path(statuses, hops=1), timeout=60)
        with pytest.raises(StreamError) as err:
            await circ.open_stream("127.0.0.1", http_server.port)
        assert err.value.reason == EndReason.TORPROTOCOL
    finally:
        await client.close()
    async with asyncio.timeout(30):
        while not (bad := _new_warnings(net, marks)):
            await asyncio.sleep(0.05)
    assert any("first hop of circuit" in line for line in bad), bad
