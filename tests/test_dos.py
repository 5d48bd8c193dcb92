"""DoS limits at relays (onionp2p.dos, specs/dos.md).

The first part tests the pure bookkeeping with an injected clock. The rest runs real
in-process relays on 127.0.0.1 (and one relay process for the CLI wiring): each limit is
driven past its bound by one peer, and the same relay is then shown serving others.
Clients that must look like different addresses bind their sockets to 127.0.0.2 (the
whole of 127.0.0.0/8 is loopback on Linux).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from conftest import LOOPBACK_EXIT, blob, http_get, relay_config, wait_for

from onionp2p.client.client import OnionClient
from onionp2p.errors import CircuitError, ConfigError, StreamError
from onionp2p.net import tls
from onionp2p.net.channel import Channel
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.link import PeerIdentity
from onionp2p.proto.relaycell import EndReason
from onionp2p.relay.dos import CELL_MEMORY, CreationBucket, DosGuard, DosLimits, oom_victims
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

OTHER = "127.0.0.2"  # "another host": a second loopback address


# -- pure logic ----------------------------------------------------------------------------


def test_limits_validate_and_default_to_tors_values():
    lim = DosLimits()
    assert (lim.max_concurrent_connections, lim.circuit_creation_rate, lim.circuit_creation_burst,
            lim.max_mem_in_queues) == (100, 3.0, 90, 256 * 1024 * 1024)
    for bad in ({"max_concurrent_connections": -1}, {"max_mem_in_queues": True},
                {"circuit_creation_rate": float("nan")}, {"circuit_creation_rate": -1},
                {"circuit_creation_burst": 1.5}, {"circuit_creation_rate": 0},
                {"circuit_creation_burst": 0}):
        with pytest.raises(ConfigError):
            DosLimits(**bad)
    assert not DosLimits(circuit_creation_rate=0, circuit_creation_burst=0).creation_limited


def test_connection_count_per_address():
    g = DosGuard(DosLimits(max_concurrent_connections=2))
    assert g.connection_opened("a") and g.connection_opened("a")
    assert not g.connection_opened("a")  # third one refused, not counted
    assert g.connection_opened("b")  # other addresses are independent
    assert (g.connections("a"), g.connections("b"), g.connections()) == (2, 1, 3)
    g.connection_closed("a")
    assert g.connection_opened("a")
    for _ in range(3):
        g.connection_closed("a")
        g.connection_closed("b")
    assert g.connections() == 0 and g._conns == {}  # nothing left behind
    off = DosGuard(DosLimits(max_concurrent_connections=0))
    assert all(off.connection_opened("a") for _ in range(1000))


def test_creation_bucket_burst_rate_and_floor():
    g = DosGuard(DosLimits(circuit_creation_rate=2, circuit_creation_burst=4))
    assert [g.allow_create("a", 100.0) for _ in range(5)] == [True] * 4 + [False]
    assert g.allow_create("b", 100.0)  # per address
    # refused attempts spend nothing: half a second later one token is back
    for _ in range(50):
        g.allow_create("a", 100.2)
    assert g.allow_create("a", 100.5) and not g.allow_create("a", 100.5)
    assert g.creation_tokens("a", 100.5) == pytest.approx(0.0)
    # refill is capped at the burst; the clock going backwards changes nothing
    assert g.creation_tokens("a", 1000.0) == 4.0
    assert g.creation_tokens("a", 10.0) == 4.0
    b = CreationBucket(1, now=5.0)
    assert b.take(1.0, 1, 5.0) and not b.take(1.0, 1, 5.5) and b.take(1.0, 1, 6.0)


def test_prune_drops_only_full_buckets():
    g = DosGuard(DosLimits(circuit_creation_rate=1, circuit_creation_burst=10))
    g.allow_create("idle", 0.0)
    for _ in range(10):
        g.allow_create("busy", 5.0)
    assert g.tracked_addresses() == 2
    assert g.prune(2.0) == 1  # "idle" refilled after one second; "busy" is still empty
    assert g.tracked_addresses() == 1 and g.creation_tokens("busy", 5.0) == 0.0
    assert g.prune(15.0) == 1 and g.tracked_addresses() == 0
    off = DosGuard(DosLimits(circuit_creation_rate=0, circuit_creation_burst=0))
    assert all(off.allow_create("a", 0.0) for _ in range(1000)) and off.tracked_addresses() == 0


def test_oom_victims_largest_first_down_to_ninety_percent():
    holders = [("a", 100), ("b", 500), ("c", 300), ("d", 0), ("e", 300)]
    assert oom_victims(holders, 1200) == []  # 1200 held: within the limit
    assert oom_victims(holders, 1199) == ["b"]  # 700 left <= 1079
    assert oom_victims(holders, 800) == ["b"]  # 700 left <= 720
    assert oom_victims(holders, 700) == ["b", "c"]  # 400 left <= 630; equal sizes keep order
    assert oom_victims(holders, 400) == ["b", "c", "e"]  # 100 left <= 360
    assert oom_victims(holders, 50) == ["b", "c", "e", "a"]  # "d" holds nothing
    assert oom_victims(holders, 0) == []  # off


def test_read_budget():
    g = DosGuard(DosLimits(max_mem_in_queues=1_000_000))
    assert g.read_budget(0) == 1_000_000
    assert g.read_budget(900_000) == 100_000
    assert g.read_budget(2_000_000) == 64 * 1024  # over the limit: check again soon
    assert not g.over_memory(1_000_000) and g.over_memory(1_000_001)
    assert DosGuard(DosLimits(max_mem_in_queues=0)).read_budget(10**12) is None


# -- helpers for the network tests ---------------------------------------------------------


@pytest.fixture
async def make_relay(tmp_path):
    relays: list[Relay] = []

    async def make(name: str, **kw) -> Relay:
        kw.setdefault("exit_policy", ExitPolicy.parse(LOOPBACK_EXIT, reject_private=False))
        relay = Relay(RelayKeys.load_or_create(tmp_path / name), relay_config(tmp_path / name, exit_reject_private=False, nickname=name, extend_allow_private=True, **kw))
        await relay.start()
        relays.append(relay)
        return relay

    tail: list[Relay] = []

    async def other() -> Relay:
        """A second hop without limits: exits open streams only for circuits that come
        from a relay, so a relay under test as the first hop needs one after it."""
        if not tail:
            tail.append(await make("other"))
        return tail[0]

    make.other = other  # type: ignore[attr-defined]
    yield make
    for relay in relays:
        await relay.stop()


@pytest.fixture
async def clients():
    made: list[OnionClient] = []

    def make(**kw) -> OnionClient:
        c = OnionClient(**kw)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


async def connect_from(client: OnionClient, relay: Relay, local_ip: str = OTHER, *,
                       rcvbuf: int | None = None) -> Channel:
    """Open ``client``'s channel to ``relay`` from ``local_ip`` (optionally with a small
    receive buffer) and make it the channel the client builds circuits on."""
    loop = asyncio.get_running_loop()
    info = relay.info()
    sock = socket.socket()
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((local_ip, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (info.address, info.or_port))
    except BaseException:
        sock.close()
        raise
    _t, chan = await loop.create_connection(
        lambda: Channel(client, initiator=True, expected=PeerIdentity(info.ed_id, info.rsa_id),
                        peer_address=info.address),
        sock=sock, ssl=tls.client_context(), server_hostname="")
    await chan.ready
    client.channels[info.rsa_id] = chan
    return chan


async def raw_tls(relay: Relay, local_ip: str = OTHER):
    """A TLS connection to the ORPort that never starts the link handshake."""
    return await asyncio.open_connection(relay.address, relay.port, ssl=tls.client_context(),
                                         local_addr=(local_ip, 0))


async def assert_closed_by_relay(reader: asyncio.StreamReader, *, silent: bool = True) -> None:
    """The relay hangs up (EOF or reset); ``silent``: without having sent anything."""
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    except (ConnectionError, ssl.SSLError):
        return
    assert data == b"" or not silent


async def fetch_ok(client: OnionClient, relays: list[Relay], port: int, n: int = 5000) -> None:
    circ = await client.build_circuit([r.info() for r in relays])
    r, w = await circ.open_stream("127.0.0.1", port)
    assert await http_get(r, w, f"/{n}") == blob(n)
    circ.close()


# -- concurrent connections per address ----------------------------------------------------


async def test_connection_limit_refuses_one_address_and_serves_others(make_relay, clients, http_server):
    relay = await make_relay("lim", dos_max_concurrent_connections=3)
    held = [await raw_tls(relay) for _ in range(3)]
    await wait_for(lambda: relay.dos.connections(OTHER) == 3, timeout=15, what="three counted connections")
    reader, writer = await raw_tls(relay)
    await assert_closed_by_relay(reader)  # the fourth from that address is hung up on
    writer.close()
    assert relay.stats["conn_refused"] == 1
    # another address is served meanwhile
    await fetch_ok(clients(), [relay, await make_relay.other()], http_server.port)
    # a slot given back is usable again by the limited address
    held[0][1].close()
    await wait_for(lambda: relay.dos.connections(OTHER) == 2, timeout=15, what="the slot to be given back")
    c = clients()
    await connect_from(c, relay)
    await fetch_ok(c, [relay, await make_relay.other()], http_server.port)
    for _r, w in held[1:]:
        w.close()
    await wait_for(lambda: relay.dos.connections(OTHER) == 1, timeout=15, what="slots released on close")


async def test_relays_give_their_connection_slot_back(make_relay, clients, http_server):
    # relays reach r1 from 127.0.0.1 like the clients do: the slot is counted until the
    # link handshake proves a relay (AUTHENTICATE), then given back
    r0 = await make_relay("r0")
    r1 = await make_relay("r1", dos_max_concurrent_connections=2)
    a = clients()
    await a.channel_to(r1.info())  # one client slot
    await fetch_ok(a, [r0, r1], http_server.port)  # r0 -> r1 takes the second slot, briefly
    assert r1.dos.connections("127.0.0.1") == 1
    b = clients()
    await fetch_ok(b, [r1, r0], http_server.port)  # so a second client still fits
    assert len(r1.channels) == 3 and r1.dos.connections("127.0.0.1") == 2  # a, r0 (both ways), b
    assert r1.stats["conn_refused"] == 0


# -- circuit creation rate ----------------------------------------------------------------


async def test_create2_rate_limit_per_client_address(make_relay, clients, http_server):
    guard = await make_relay("g")
    lim = await make_relay("lim", dos_circuit_creation_rate=0.001, dos_circuit_creation_burst=5)
    noisy = clients()
    await connect_from(noisy, lim)
    tail = (await make_relay.other()).info()
    circs = [await noisy.build_circuit([lim.info(), tail]) for _ in range(5)]
    with pytest.raises(CircuitError) as e:
        await noisy.build_circuit([lim.info(), tail])
    assert e.value.reason == "RESOURCELIMIT"
    assert lim.stats["create_refused"] == 1
    # the noisy client's existing circuits and channel keep working
    r, w = await circs[0].open_stream("127.0.0.1", http_server.port)
    assert await http_get(r, w, "/3000") == blob(3000)
    # another client address is served
    await fetch_ok(clients(), [lim, await make_relay.other()], http_server.port)
    # CREATE2 from an authenticated relay is never charged: more than the burst via the guard
    quiet = clients()
    for _ in range(7):
        await fetch_ok(quiet, [guard, lim], http_server.port)
    assert lim.stats["create_refused"] == 1
    assert lim.dos.creation_tokens(OTHER, time.monotonic()) < 1


async def test_max_circuits_per_channel(make_relay, clients, http_server):
    relay = await make_relay("cap", max_circuits_per_channel=3)
    c = clients()
    circs = [await c.build_circuit([relay.info()]) for _ in range(3)]
    with pytest.raises(CircuitError) as e:
        await c.build_circuit([relay.info()])
    assert e.value.reason == "RESOURCELIMIT"
    await fetch_ok(clients(), [relay, await make_relay.other()], http_server.port)  # another channel is served
    circs[0].close()
    await wait_for(lambda: len(relay.circuits) == 2, timeout=15, what="the relay to free the circuit")
    await fetch_ok(c, [relay, await make_relay.other()], http_server.port)  # and the freed slot is usable again


async def test_max_streams_per_circuit(make_relay, clients, http_server):
    relay = await make_relay("cap", max_streams_per_circuit=2)
    c = clients()
    circ = await c.build_circuit([(await make_relay.other()).info(), relay.info()])
    streams = [await circ.open_stream("127.0.0.1", http_server.port) for _ in range(2)]
    for _r, w in streams:
        w.write(b"GET /echo HTTP/1.0\r\n\r\n")
    with pytest.raises(StreamError) as e:
        await circ.open_stream("127.0.0.1", http_server.port)
    assert e.value.reason == EndReason.RESOURCELIMIT
    assert circ.state == "built"
    # the open streams still carry data; another circuit is served
    r, w = streams[0]
    w.write(b"ping")
    await r.readuntil(b"\r\n\r\n")
    assert await r.readexactly(4) == b"ping"
    await fetch_ok(c, [await make_relay.other(), relay], http_server.port)
    streams[1][1].close()
    exit_circ = next(x for x in relay.circuits if x.streams)
    await wait_for(lambda: len(exit_circ.streams) == 1, timeout=15, what="the exit to free the stream")
    r, w = await circ.open_stream("127.0.0.1", http_server.port)
    assert await http_get(r, w, "/2000") == blob(2000)


# -- memory held in queues -----------------------------------------------------------------


@pytest.mark.parametrize("limit", ["max_mem_in_queues", "max_queue_cells"])
async def test_slow_reader_queues_are_bounded(make_relay, clients, http_server, limit):
    # A client opens many downloads and then stops reading its channel. The guard cannot
    # write to it, so cells pile up in the guard's per-circuit queues (up to one circuit
    # window, 1000 cells, each) once the socket buffers are full. The global limit
    # (or the per-circuit one) destroys circuits instead of letting the queues grow.
    cap = 1024 * 1024
    kw = {"max_mem_in_queues": cap} if limit == "max_mem_in_queues" else \
         {"max_mem_in_queues": 0, "max_queue_cells": 300}
    guard = await make_relay("g", **kw)
    exit_ = await make_relay("x")
    # fixed windows, as an attacker would choose: under congestion control the exit would
    # stop at its initial window (124 cells) when no SENDME comes back
    slow = clients(congestion_control=False)
    chan = await connect_from(slow, guard, rcvbuf=4096)
    circs = [await slow.build_circuit([guard.info(), exit_.info()]) for _ in range(16)]
    writers = []
    for circ in circs:
        for _ in range(2):  # two streams fill the whole circuit window
            _r, w = await circ.open_stream("127.0.0.1", http_server.port)
            writers.append(w)
    chan.pause_reading()
    for w in writers:
        w.write(b"GET /hold HTTP/1.0\r\n\r\n")
    if limit == "max_mem_in_queues":
        await wait_for(lambda: guard.stats["oom_circuits_killed"] > 0, 60, "the memory limit to act")
        assert guard.check_memory() <= cap
        killed = guard.stats["oom_circuits_killed"]
        assert killed < len(circs)  # only the largest holders went
    else:
        await wait_for(lambda: guard.stats["destroyed"] > 0, 60, "the queue bound to act")
        killed = guard.stats["destroyed"]
        assert all(c.prev_chan.queued_cells(c.prev_id) <= 300 for c in guard.circuits)
    assert guard.queue_memory()[0] <= 16 * 1000 * CELL_MEMORY
    # meanwhile another client is served through the same relays
    await fetch_ok(clients(), [guard, exit_], http_server.port, 200_000)
    # the slow client reads again: the destroyed circuits were told why
    chan.resume_reading()
    await wait_for(lambda: sum(c.close_reason == "RESOURCELIMIT" for c in circs) >= killed, 30,
                   "DESTROY(RESOURCELIMIT) at the client")


# -- handshake timeouts ---------------------------------------------------------------------


async def test_stalled_handshakes_time_out_and_free_their_slots(make_relay, clients, http_server):
    # 2 s: long enough that the stalled ones are still there when the third one comes
    relay = await make_relay("hs", handshake_timeout=2.0, dos_max_concurrent_connections=2)
    # TCP only (no TLS): not counted against the address; dropped by the TLS timeout
    tcp_r, tcp_w = await asyncio.open_connection(relay.address, relay.port, local_addr=(OTHER, 0))
    # TLS, then VERSIONS and half a CERTS cell: stalled inside the link handshake
    part_r, part_w = await raw_tls(relay)
    part_w.write(b"\x00\x00\x07\x00\x02\x00\x04" + bytes.fromhex("00000000 81 0100") + b"\x01")
    # TLS and nothing more
    idle_r, idle_w = await raw_tls(relay)
    await wait_for(lambda: relay.dos.connections(OTHER) == 2, timeout=15, what="two counted connections")
    # a third handshake from that address does not fit ...
    r, w = await raw_tls(relay)
    await assert_closed_by_relay(r)
    w.close()
    assert relay.stats["conn_refused"] == 1
    # ... but other clients are served while those stall
    await fetch_ok(clients(), [relay, await make_relay.other()], http_server.port)
    for reader in (tcp_r, part_r, idle_r):
        await assert_closed_by_relay(reader, silent=False)  # part_r got the relay's VERSIONS
    for writer in (tcp_w, part_w, idle_w):
        writer.close()
    await wait_for(lambda: relay.dos.connections(OTHER) == 0, timeout=15, what="the slots to be given back")
    assert not relay._handshaking
    c = clients()
    await connect_from(c, relay)
    await fetch_ok(c, [relay, await make_relay.other()], http_server.port)


async def test_stop_closes_channels_still_in_handshake(make_relay):
    relay = await make_relay("stop")  # default 30 s handshake timeout
    reader, writer = await raw_tls(relay)
    await wait_for(lambda: len(relay._handshaking) == 1, timeout=15, what="the connection to be up")
    await relay.stop()
    await assert_closed_by_relay(reader)  # at once, not after the handshake timeout
    writer.close()
    assert relay.dos.connections() == 0


# -- the CLI passes the limits on ----------------------------------------------------------


async def test_relay_process_applies_configured_limits(tmp_path):
    d = tmp_path / "relay"
    d.mkdir()
    (d / "relay.toml").write_text(
        'nickname = "limited"\ndata_dir = "."\nor_address = "127.0.0.1:0"\nlog_format = "json"\n'
        "dos_max_concurrent_connections = 1\nhandshake_timeout = 2\nmax_mem_in_queues = 1000000\n"
        "dos_circuit_creation_rate = 1\ndos_circuit_creation_burst = 2\nmax_queue_cells = 100\n")
    with open(d / "log.txt", "w") as log:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "relay", "-c", str(d / "relay.toml")],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_for(lambda: (d / "relay-info.json").exists() or proc.poll() is not None, 30, "start")
        from onionp2p.proto.directory import RelayInfo

        info = RelayInfo.load(d / "relay-info.json")
        ctx = tls.client_context()
        r1, w1 = await asyncio.open_connection(info.address, info.or_port, ssl=ctx)
        r2, w2 = await asyncio.open_connection(info.address, info.or_port, ssl=ctx)
        await assert_closed_by_relay(r2)  # the second from 127.0.0.1: over the limit of 1
        await assert_closed_by_relay(r1)  # the first: dropped by the 2 s handshake timeout
        for w in (w1, w2):
            w.close()
        proc.send_signal(signal.SIGUSR1)
        await wait_for(lambda: '"conn_refused": 1' in (d / "log.txt").read_text(), 10, "status line")
        limits = next(json.loads(line) for line in (d / "log.txt").read_text().splitlines()
                      if '"event": "limits"' in line)
        assert limits["max_concurrent_connections"] == 1 and limits["handshake_timeout"] == 2
        assert (limits["circuit_creation_rate"], limits["circuit_creation_burst"]) == (1, 2)
        assert (limits["max_mem_in_queues"], limits["max_queue_cells"]) == (1000000, 100)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
