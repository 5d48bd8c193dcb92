"""Relays and circuits over real TLS links on 127.0.0.1 (in-process relays, real sockets).

These tests drive the real Relay, Channel, OrCircuit, exit and client code; only the
process boundary is missing (tests/test_relay_process.py runs relays as processes).
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import replace

import pytest
from conftest import blob, http_get, relay_config, sha256, wait_for

from onionp2p.client.client import OnionClient
from onionp2p.errors import CircuitError, StreamError
from onionp2p.net import tls
from onionp2p.proto.cells import CellCommand, Create2, Destroy, DestroyReason
from onionp2p.proto.congestion import CCParams
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.relaycell import EndReason, RelayCommand
from onionp2p.proto.stream import SOURCE_HIGH_WATER


@pytest.fixture
async def client():
    c = OnionClient()
    yield c
    await c.close()


def path(relays):
    return [r.info() for r in relays]


async def test_three_hop_fetch_matches_sha256(relay_net, http_server, client):
    events = []
    client.events.add(events.append)
    circ = await client.build_circuit(path(relay_net))
    assert [h.nickname for h in circ.hops] == ["r0", "r1", "r2"]
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    body = await http_get(reader, writer, "/3000000")
    assert sha256(body) == sha256(blob(3_000_000))
    kinds = [e.kind for e in events if e.circuit_id == circ.id]
    assert kinds[:5] == ["launched", "extended", "extended", "extended", "built"]
    circ.close()
    await wait_for(lambda: all(not r.circuits for r in relay_net), what="relays to free the circuit")
    assert events[-1].kind == "closed" and events[-1].bytes_received >= 3_000_000


async def test_hundred_streams_over_ten_circuits(relay_net, http_server, client):
    circuits = await asyncio.gather(*(client.build_circuit(path(relay_net)) for _ in range(10)))
    # one channel per relay pair: the client has one channel, r0->r1 and r1->r2 one each
    assert len(client.channels) == 1
    assert len(relay_net[1].channels) == 2

    async def fetch(i):
        circ = circuits[i % 10]
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        n = 20_000 + 997 * i
        body = await http_get(reader, writer, f"/{n}")
        writer.close()
        return body == blob(n)

    results = await asyncio.gather(*(fetch(i) for i in range(100)))
    assert all(results)


async def test_echo_upload_and_download(relay_net, http_server, client):
    circ = await client.build_circuit(path(relay_net))
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    payload = blob(1_500_000)
    writer.write(b"GET /echo HTTP/1.0\r\n\r\n")

    async def send():
        for i in range(0, len(payload), 10_000):
            writer.write(payload[i : i + 10_000])
            await writer.drain()

    sender = asyncio.create_task(send())
    await reader.readuntil(b"\r\n\r\n")
    got = await reader.readexactly(len(payload))
    await sender
    assert got == payload


async def test_slow_reader_keeps_memory_bounded(relay_net, http_server):
    client = OnionClient(congestion_control=False)  # fixed windows: a stream window bounds it
    try:
        await _slow_reader_fixed_windows(relay_net, http_server, client)
    finally:
        await client.close()


async def _slow_reader_fixed_windows(relay_net, http_server, client):
    circ = await client.build_circuit(path(relay_net))
    assert all(layer.cc is None for layer in circ.core.layers)
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port, limit=65536)
    writer.write(b"GET /hold HTTP/1.0\r\n\r\n")
    await writer.drain()
    # Read nothing. The flow stops once the windows are spent; wait for it to settle.
    exit_circ = next(iter(relay_net[2].circuits))
    last = -1
    for _ in range(100):
        await asyncio.sleep(0.05)
        now = circ.bytes_received
        if now == last and now > 0:
            break
        last = now
    assert circ.bytes_received > 0
    # what the reader buffered before pausing (2 x limit), plus at most one stream window
    # (500 cells) that crossed the circuit unacknowledged after it paused
    assert circ.bytes_received <= 2 * 65536 + 500 * 498 + 498
    stream = next(iter(exit_circ.streams.values()))
    # the exit paused reading the destination: at most the high-water mark plus one socket
    # read (asyncio reads up to 256 KiB at a time) is held
    assert stream.buffered <= SOURCE_HIGH_WATER + 256 * 1024
    for r in relay_net:
        for ch in r.channels:
            assert ch.queued_cells() <= ch.max_queue_cells
    # the server could not push all 20 MB: it is blocked by back-pressure, not buffered by us
    assert circ.bytes_received < 2_000_000
    # now read everything: the flow resumes to the end
    await reader.readuntil(b"\r\n\r\n")
    got = await reader.readexactly(20_000_000)
    assert sha256(got) == sha256(blob(20_000_000))


async def test_wrong_expected_identity_is_refused(relay_net, client):
    real = relay_net[0].info()
    other = relay_net[1].info()
    forged = RelayInfo(real.nickname, real.address, real.or_port, other.rsa_id, other.ed_id, real.ntor_key)
    with pytest.raises(CircuitError):
        await client.build_circuit([forged])
    # a forged middle hop: the extending relay refuses the mismatching identity
    forged_mid = RelayInfo("x", other.address, other.or_port, relay_net[2].keys.rsa_id_digest,
                           relay_net[2].keys.identity_public, other.ntor_key)
    with pytest.raises(CircuitError):
        await client.build_circuit([real, forged_mid], timeout=10)
    # and the relays keep serving
    circ = await client.build_circuit(path(relay_net))
    assert circ.state == "built"


async def test_garbage_on_orport_then_relay_keeps_serving(relay_net, http_server, client):
    r0 = relay_net[0]
    # plain TCP garbage (not TLS)
    reader, writer = await asyncio.open_connection("127.0.0.1", r0.port)
    writer.write(os.urandom(4096))
    writer.write_eof()
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) is not None
    writer.close()
    # TLS, VERSIONS, then cells that break the handshake: each closes the link
    for junk in (
        bytes.fromhex("00000000 83 0004") + b"AUTH",  # AUTHENTICATE before CERTS
        bytes.fromhex("00000000 81 f000"),  # a variable-length cell far over the bound
        bytes.fromhex("80000005 03") + bytes(509),  # a RELAY cell before NETINFO
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", r0.port, ssl=tls.client_context())
        writer.write(b"\x00\x00\x07\x00\x02\x00\x04" + junk)
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)  # EOF: the relay closed the link
        writer.close()
    circ = await client.build_circuit(path(relay_net))
    r, w = await circ.open_stream("127.0.0.1", http_server.port)
    assert await http_get(r, w, "/1000") == blob(1000)


async def test_bad_create2_gets_destroy_protocol(relay_net, client):
    chan = await client.channel_to(relay_net[0].info())
    got = asyncio.get_running_loop().create_future()

    class Probe:
        def handle_cell(self, ch, cell):
            if not got.done():
                got.set_result(cell)

        def channel_closed(self, ch):
            pass

    cid = chan.new_circ_id()
    chan.circuits[cid] = Probe()
    chan.send_cell(cid, CellCommand.CREATE2, Create2(2, os.urandom(84)).encode())
    cell = await asyncio.wait_for(got, 10)
    assert cell.command == CellCommand.DESTROY
    assert Destroy.parse(cell.payload).reason == DestroyReason.PROTOCOL
    # unknown handshake type
    cid2 = chan.new_circ_id()
    got = asyncio.get_running_loop().create_future()
    chan.circuits[cid2] = Probe()
    chan.send_cell(cid2, CellCommand.CREATE2, Create2(0x99, b"x" * 10).encode())
    cell = await asyncio.wait_for(got, 10)
    assert Destroy.parse(cell.payload).reason == DestroyReason.PROTOCOL
    # a cell on an unknown circuit is dropped and the channel stays up
    chan.send_cell(0x80000123, CellCommand.RELAY, os.urandom(509))
    circ = await client.build_circuit(path(relay_net))
    assert circ.state == "built" and not chan.closed


async def test_exit_policy_and_errors(tmp_path, relay_net, http_server, client):
    circ = await client.build_circuit(path(relay_net))
    # 127.0.0.2 is not accepted by the exit policy
    with pytest.raises(StreamError) as e:
        await circ.open_stream("127.0.0.2", http_server.port)
    assert e.value.reason == EndReason.EXITPOLICY
    # nothing listens there
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    with pytest.raises(StreamError) as e:
        await circ.open_stream("127.0.0.1", dead)
    assert e.value.reason == EndReason.CONNECTREFUSED
    with pytest.raises(StreamError) as e:
        await circ.open_stream("bad..name", 80)
    assert e.value.reason == EndReason.RESOLVEFAILED
    # hostname resolved at the exit
    r, w = await circ.open_stream("localhost", http_server.port, flags=0)
    assert await http_get(r, w, "/777") == blob(777)
    resolved = await circ.resolve("localhost")
    assert "127.0.0.1" in [a.value_text() for a in resolved.answers]
    # the circuit survived all of that
    assert circ.state == "built"


async def test_default_policy_rejects_loopback_and_non_exit_refuses(tmp_path, relay_net, http_server, client):
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    relays = []
    for name, policy in (("def", ExitPolicy.parse("accept *:*")), ("nonexit", ExitPolicy.reject_all())):
        keys = RelayKeys.load_or_create(tmp_path / name)
        r = Relay(keys, relay_config(tmp_path / name, exit_reject_private=False, nickname=name, exit_policy=policy, extend_allow_private=True))
        await r.start()
        relays.append(r)
    try:
        for r in relays:
            circ = await client.build_circuit([relay_net[0].info(), r.info()])
            with pytest.raises(StreamError) as e:
                await circ.open_stream("127.0.0.1", http_server.port)
            assert e.value.reason == EndReason.EXITPOLICY
    finally:
        for r in relays:
            await r.stop()


async def test_truncate_gets_truncated(relay_net, client):
    circ = await client.build_circuit(path(relay_net))
    events = []
    client.events.add(events.append)
    circ.send_relay(RelayCommand.TRUNCATE, 0, b"", hop=0)
    await wait_for(lambda: circ.state == "closed", what="TRUNCATED")
    assert circ.close_reason == "REQUESTED"
    await wait_for(lambda: not relay_net[1].circuits and not relay_net[2].circuits, what="downstream freed")


async def test_channel_loss_destroys_circuits_on_both_sides(relay_net, http_server, client):
    circ = await client.build_circuit(path(relay_net))
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    writer.write(b"GET /hold HTTP/1.0\r\n\r\n")
    await reader.readexactly(100_000)
    # cut the r1 <-> r2 channel abruptly
    ch = next(iter(relay_net[1].by_identity.values()))
    for c in list(relay_net[1].channels):
        if c.peer is not None and c.peer.rsa_id == relay_net[2].keys.rsa_id_digest:
            c.abort()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
    await wait_for(lambda: all(not r.circuits for r in relay_net), what="all relays to free the circuit")
    assert circ.state == "closed"
    assert ch is not None


async def test_slow_handshake_is_dropped(tmp_path, client):
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    relay = Relay(RelayKeys.load_or_create(tmp_path / "k"), relay_config(tmp_path / "k", exit_reject_private=False, handshake_timeout=1.0))
    await relay.start()
    try:
        # TCP only, never a TLS ClientHello
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # TLS, but never a VERSIONS cell
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port, ssl=tls.client_context())
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        circ = await client.build_circuit([relay.info()])
        assert circ.state == "built"
    finally:
        await relay.stop()


async def test_onion_key_rotation_keeps_old_key_during_grace(relay_net, client):
    import time

    from onionp2p.proto.directory import RelayInfo

    r2 = relay_net[2]
    old = r2.info()
    assert r2.rotate_keys(time.time() + 29 * 86400)
    new = RelayInfo.load(r2.data_dir / "relay-info.json")
    assert new.ntor_key != old.ntor_key and new.rsa_id == old.rsa_id
    # a client holding the old descriptor still gets through (grace period) ...
    circ = await client.build_circuit([relay_net[0].info(), relay_net[1].info(), old])
    assert circ.state == "built"
    # ... and the new key works too; new TLS connections still verify
    circ2 = await client.build_circuit([relay_net[1].info(), new])
    assert circ2.state == "built"


async def test_bandwidth_rate_throttles_reads(tmp_path, relay_net, http_server, client):
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    slow = Relay(RelayKeys.load_or_create(tmp_path / "slow"), relay_config(tmp_path / "slow", exit_reject_private=False, nickname="slow", exit_policy=ExitPolicy.parse("accept 127.0.0.1:*", reject_private=False), bandwidth_rate=100_000, bandwidth_burst=100_000))
    await slow.start()
    try:
        # two hops: an exit opens streams only for circuits that come from a relay
        circ = await client.build_circuit([relay_net[0].info(), slow.info()])
        r, w = await circ.open_stream("127.0.0.1", http_server.port)
        w.write(b"GET /echo HTTP/1.0\r\n\r\n")
        payload = blob(400_000)
        w.write(payload)
        await r.readuntil(b"\r\n\r\n")
        assert await r.readexactly(len(payload)) == payload
        # the relay had to stop reading its channel to stay within its rate
        assert slow.stats["throttled"] > 0
    finally:
        await slow.stop()


async def test_congestion_control_end_to_end(relay_net, http_server, client):
    """Vegas on the exit's layer at both edges, SENDMEs every 31 cells with RTT samples,
    and XON/XOFF instead of stream windows: a reader that stops reading stops the exit."""
    circ = await client.build_circuit(path(relay_net))
    # CGO on every hop (our relays list Relay=2-6), and with it congestion control on every
    # hop; only the exit's carries streams
    assert [layer.relay_crypto for layer in circ.core.layers] == ["cgo"] * 3
    assert [layer.cc is not None for layer in circ.core.layers] == [True, True, True]
    exit_circ = next(iter(relay_net[2].circuits))
    assert exit_circ.core.layer.cc is not None and exit_circ.core.layer.cc.inc == 31
    assert all(c.core.layer.relay_crypto == "cgo" for r in relay_net for c in r.circuits)
    # download and upload
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    body = await http_get(reader, writer, "/5000000")
    assert sha256(body) == sha256(blob(5_000_000))
    down = exit_circ.core.layer.cc  # every 31st cell's SENDME reaches the exit
    await wait_for(lambda: down.sendmes == down.sent // 31, what="the last SENDMEs")
    assert down.sent >= 5_000_000 // 498 and down.samples > 0 and down.rtt_min > 0
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    payload = blob(1_000_000)
    writer.write(b"GET /echo HTTP/1.0\r\n\r\n" + payload)
    await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(len(payload)) == payload
    up = circ.core.layers[2].cc
    await wait_for(lambda: up.sendmes == up.sent // 31, what="the last SENDMEs")
    assert up.sent >= 1_000_000 // 498 and up.samples > 0
    writer.close()
    # a reader that reads nothing: XOFF stops the exit; reading again: XON, and all arrives
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port, limit=65536)
    # the reader holds tor's cc_xoff_client (500 cells) before it says XOFF, not 2 x limit
    xoff_at = CCParams().xoff_bytes(exit_side=False)
    assert writer.transport._sink_room() == xoff_at == 500 * 498
    writer.write(b"GET /hold HTTP/1.0\r\n\r\n")
    sid = writer.get_extra_info("stream_id")
    await wait_for(lambda: circ.core.streams[sid].xoff_sent, what="XOFF from the client")
    await wait_for(lambda: exit_circ.core.streams[sid].xoff_received, what="XOFF at the exit")
    settled = -1
    for _ in range(100):
        await asyncio.sleep(0.05)
        if exit_circ.core.streams[sid].bytes_sent == settled:
            break
        settled = exit_circ.core.streams[sid].bytes_sent
    assert exit_circ.core.streams[sid].bytes_sent == settled  # the exit stopped sending
    assert settled < 20_000_000 and exit_circ.core.streams[sid].buffered > 0
    # what crossed: what the reader holds (500 cells), and what was in flight when the XOFF
    # arrived, which the exit's congestion window bounds (never above cc_ss_max in slow start)
    received = circ.core.streams[sid].bytes_received
    assert xoff_at < received <= xoff_at + 5000 * 498
    await reader.readuntil(b"\r\n\r\n")
    got = await reader.readexactly(20_000_000)
    assert sha256(got) == sha256(blob(20_000_000))  # (the exit got XON: it sent the rest)


async def test_without_congestion_control_at_either_end_windows_are_fixed(tmp_path, relay_net, http_server):
    client = OnionClient(congestion_control=False)
    try:
        circ = await client.build_circuit(path(relay_net))
        assert all(layer.cc is None for layer in circ.core.layers)
    finally:
        await client.close()
    # the relay side: congestion_control = false
    exit_relay = relay_net[2]
    exit_relay.config = replace(exit_relay.config, congestion_control=False)
    assert "FlowCtrl=1 " in exit_relay.info().protocols + " "
    client = OnionClient()
    try:
        circ = await client.build_circuit(path(relay_net))  # it no longer lists FlowCtrl=2 (nor CGO)
        # fixed windows with the exit, tor1 there; the middles still took CGO (and CC with it)
        assert circ.core.layers[2].cc is None and circ.core.layers[2].deliver.increment == 100
        assert [layer.relay_crypto for layer in circ.core.layers] == ["cgo", "cgo", "tor1"]
        infos = path(relay_net)
        infos[2] = replace(infos[2], protocols="FlowCtrl=1-2 Link=4-5 LinkAuth=3 Relay=2-4")  # an old view
        circ = await client.build_circuit(infos)  # asked, but the relay does not answer CC_RESPONSE
        assert circ.core.layers[2].cc is None and circ.core.layers[2].relay_crypto == "tor1"
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert writer.transport._sink_room() == 2 * 65536  # (stream windows: the reader's own limit)
        assert sha256(await http_get(reader, writer, "/300000")) == sha256(blob(300_000))
    finally:
        await client.close()


async def test_exit_says_xoff_only_past_tors_limit(relay_net, client):
    """A destination that reads nothing: the exit's XOFF comes once it holds more than
    cc_xoff_exit (500) cells' worth of bytes for it — not earlier, which tor clients count
    as a suspicious XOFF — and the client then stops sending."""
    from onionp2p.proto.congestion import CCParams

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        circ = await client.build_circuit(path(relay_net))
        _reader, writer = await circ.open_stream("127.0.0.1", sock.getsockname()[1])
        sid = writer.get_extra_info("stream_id")
        exit_circ = next(iter(relay_net[2].circuits))
        writer.write(b"u" * 20_000_000)  # more than the kernel's socket buffers take
        await wait_for(lambda: circ.core.streams[sid].xoff_received, 30, what="XOFF from the exit")
        assert exit_circ.conns[sid].unsent() > CCParams().xoff_bytes(exit_side=True)
        sent = circ.core.streams[sid].bytes_sent
        await asyncio.sleep(0.5)
        assert circ.core.streams[sid].bytes_sent == sent < 20_000_000  # stopped
    finally:
        sock.close()
