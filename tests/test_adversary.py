"""Trust no hop: relays that follow the protocol for their own layer but lie for others.

Real relays on real TLS sockets (in this process); one of them is an *adversary*: it
keeps its own layer honestly (it has the keys for it), passes on what it cannot read,
and originates forged cells under its own layer toward the client, as a malicious
guard or middle can. To make the attack as strong as possible the adversary is told
the client's stream IDs (so guessing costs it nothing). The client must drop what a
hop sends for a stream it does not carry and log a protocol violation; the
application reads exactly what the destination sent.

The same file holds the relay side: an exit cuts off a client that overruns a stream
window, sends SENDMEs nobody asked for or with the wrong digest, or sends DATA on
stream 0; an exit refuses to be a one-hop proxy; RELAY_EARLY as seen by each relay;
random stream IDs; private addresses at the exit and at the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from dataclasses import replace

import pytest
from conftest import blob, http_get, relay_config, wait_for

from onionp2p.client.client import OnionClient
from onionp2p.errors import StreamError
from onionp2p.proto.cells import CellCommand
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.relaycell import (
    Connected,
    End,
    EndReason,
    Extended2,
    RelayCommand,
    Resolved,
    ResolvedAnswer,
    Sendme,
)
from onionp2p.relay.circuit import OrCircuit
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

_CELL = 514
FORGED_IP = ipaddress.IPv4Address("6.6.6.6")


class WatchedCircuit(OrCircuit):
    """A relay's real circuit that also records the cell commands it receives from the
    client's side and, at an adversarial relay, forges cells toward the client once it
    has received ``plan.after`` cells from that side."""

    def relay_run(self, chan, data, start, count):
        forward = chan is self.prev_chan
        if forward:
            self.relay.seen.setdefault(self, []).extend(
                data[start + i * _CELL + 4] for i in range(count))
        super().relay_run(chan, data, start, count)
        plan = self.relay.plan
        if forward and plan is not None and not self.closed and self.cells_forward >= plan.after \
                and self not in plan.circuits:
            plan.circuits.add(self)
            plan.forge(self)


class WatchedRelay(Relay):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.plan = None
        self.seen: dict[OrCircuit, list[int]] = {}

    def new_circuit(self, chan, circ_id, crypto, params=None, cc=None):
        return WatchedCircuit(self, chan, circ_id, crypto, params, cc)


class Plan:
    """Forge ``command`` once the circuit has brought ``after`` cells from the client, for
    every stream the client has open (``stream_ids()``; stream 0 for EXTENDED2)."""

    def __init__(self, command: int, after: int, stream_ids):
        self.command, self.after, self.stream_ids = command, after, stream_ids
        self.circuits: set[OrCircuit] = set()  # the first circuit that gets far enough
        self.sent = 0

    def forge(self, circ: OrCircuit) -> None:
        if len(self.circuits) > 1:
            return
        sids = [0] if self.command == RelayCommand.EXTENDED2 else sorted(self.stream_ids())
        body = {
            RelayCommand.DATA: b"HTTP/1.0 200 OK\r\n\r\nFORGED BY A RELAY",
            RelayCommand.CONNECTED: Connected(FORGED_IP, 60).encode(),
            RelayCommand.END: End(EndReason.DONE).encode(),
            RelayCommand.RESOLVED: Resolved((ResolvedAnswer(4, FORGED_IP.packed, 60),)).encode(),
            RelayCommand.EXTENDED2: Extended2(os.urandom(64)).encode(),  # a Y and AUTH it made up
        }[self.command]
        for sid in sids:
            circ.send_back(self.command, sid, body)
            self.sent += 1


@pytest.fixture
async def net(tmp_path):
    """Four relays (r0..r3), every one an exit to anything (loopback included; the
    client's path selection sees them as exits), each able to watch and forge."""
    relays = []
    for i in range(4):
        r = WatchedRelay(RelayKeys.load_or_create(tmp_path / f"r{i}"), relay_config(tmp_path / f"r{i}", nickname=f"r{i}", exit_policy=ExitPolicy.parse("accept *:*", reject_private=False), exit_reject_private=False, extend_allow_private=True))
        await r.start()
        relays.append(r)
    yield relays
    for r in relays:
        await r.stop()


@pytest.fixture
async def client():
    c = OnionClient()
    yield c
    await c.close()


def client_stream_ids(client: OnionClient):
    """The oracle we hand the adversary: every stream ID the client has in use."""
    return lambda: {sid for c in client.circuits.values() for sid in (*c.core.streams, *c.core._resolves)}


def violations(caplog, hop: int) -> list[dict]:
    return [r.msg for r in caplog.records
            if isinstance(r.msg, dict) and r.msg.get("event") == "protocol violation: relay cell dropped"
            and r.msg.get("from_hop") == hop]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Cells a relay receives from the client's side of a 3-hop circuit, in order:
#   guard (hop 0): EXTEND2 (its own), EXTEND2 (for the middle), BEGIN/RESOLVE, request DATA
#   middle (hop 1): EXTEND2 (its own), BEGIN/RESOLVE, request DATA
BEGIN_AT = {0: 3, 1: 2}
REQUEST_AT = {0: 4, 1: 3}
POSITIONS = pytest.mark.parametrize("hop", [0, 1], ids=["guard", "middle"])


@POSITIONS
async def test_forged_data_never_reaches_the_application(net, client, http_server, caplog, hop):
    plan = net[hop].plan = Plan(RelayCommand.DATA, BEGIN_AT[hop], client_stream_ids(client))
    circ = await client.build_circuit([r.info() for r in net[:3]])
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    assert await http_get(reader, writer, "/300000") == blob(300_000)  # not a forged byte
    assert plan.sent == 1 and circ.state == "built"
    assert violations(caplog, hop)[0]["relay_cmd"] == "DATA"


@POSITIONS
async def test_forged_connected_does_not_open_a_refused_stream(net, client, http_server, caplog, hop):
    plan = net[hop].plan = Plan(RelayCommand.CONNECTED, BEGIN_AT[hop], client_stream_ids(client))
    circ = await client.build_circuit([r.info() for r in net[:3]])
    with pytest.raises(StreamError) as e:  # the exit's real answer, not the forged CONNECTED
        await circ.open_stream("127.0.0.1", closed_port())
    assert e.value.reason == EndReason.CONNECTREFUSED
    assert plan.sent == 1 and violations(caplog, hop)[0]["relay_cmd"] == "CONNECTED"
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)  # the circuit still works
    assert await http_get(reader, writer, "/5000") == blob(5000)


@POSITIONS
async def test_forged_end_does_not_cut_the_stream(net, client, http_server, caplog, hop):
    plan = net[hop].plan = Plan(RelayCommand.END, REQUEST_AT[hop], client_stream_ids(client))
    circ = await client.build_circuit([r.info() for r in net[:3]])
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    assert await http_get(reader, writer, "/500000") == blob(500_000)  # every byte, then the real END
    assert plan.sent == 1 and violations(caplog, hop)[0]["relay_cmd"] == "END"


@POSITIONS
async def test_forged_resolved_is_not_the_answer(net, client, caplog, hop):
    plan = net[hop].plan = Plan(RelayCommand.RESOLVED, BEGIN_AT[hop], client_stream_ids(client))
    circ = await client.build_circuit([r.info() for r in net[:3]])
    answer = await circ.resolve("localhost")
    addrs = {a.value_text() for a in answer.answers}
    assert "127.0.0.1" in addrs and str(FORGED_IP) not in addrs
    assert plan.sent == 1 and violations(caplog, hop)[0]["relay_cmd"] == "RESOLVED"


async def test_forged_extended2_from_the_guard_does_not_complete_the_extend(net, client, http_server, caplog):
    # While the middle extends to the exit, the guard answers EXTENDED2 itself.
    plan = net[0].plan = Plan(RelayCommand.EXTENDED2, 2, lambda: set())
    circ = await client.build_circuit([r.info() for r in net[:3]])
    assert [h.nickname for h in circ.hops] == ["r0", "r1", "r2"]
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    assert await http_get(reader, writer, "/20000") == blob(20_000)
    assert plan.sent == 1 and violations(caplog, 0)[0]["relay_cmd"] == "EXTENDED2"


async def test_forged_extended2_from_the_middle_is_dropped(net, client, http_server, caplog):
    # Nothing is being extended, and the middle is not the last hop.
    plan = net[1].plan = Plan(RelayCommand.EXTENDED2, BEGIN_AT[1], lambda: set())
    circ = await client.build_circuit([r.info() for r in net[:3]])
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    assert await http_get(reader, writer, "/200000") == blob(200_000)
    assert plan.sent == 1 and circ.state == "built"
    assert violations(caplog, 1)[0]["relay_cmd"] == "EXTENDED2"


async def test_stream_cells_on_stream_zero_from_the_exit_are_dropped(net, client, http_server, caplog):
    for cmd in (RelayCommand.DATA, RelayCommand.END, RelayCommand.CONNECTED):
        plan = net[2].plan = Plan(cmd, 2, lambda: {0})  # after BEGIN and the request
        circ = await client.build_circuit([r.info() for r in net[:3]])
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert await http_get(reader, writer, "/100000") == blob(100_000)
        assert plan.sent == 1 and circ.state == "built"
        circ.close()
        await wait_for(lambda: not net[2].circuits, what="the exit to free the circuit")
    found = [v for v in violations(caplog, 2) if v["stream_id"] == 0]
    assert {v["relay_cmd"] for v in found} == {"DATA", "END", "CONNECTED"}
    assert all(v["reason"] == "stream command on stream 0" for v in found)


# -- RELAY_EARLY and stream IDs ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [2, 3, 4])
async def test_relays_see_relay_early_for_the_first_cells_whatever_the_length(net, client, http_server, length):
    """tor-spec §5.6: the client sends its first 8 relay cells past the first hop (and every
    EXTEND2) as RELAY_EARLY. Hop k therefore sees RELAY_EARLY exactly for the first 8-k cells
    it receives, then RELAY: a middle relay sees 7 whether the circuit has 2, 3 or 4 hops."""
    circ = await client.build_circuit([r.info() for r in net[:length]])
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    writer.write(b"GET /echo HTTP/1.0\r\n\r\n")
    for i in range(12):  # enough cells toward the exit to use up the budget
        writer.write(b"x" * 498)
    await writer.drain()
    await reader.readexactly(len(b"HTTP/1.0 200 OK\r\n\r\n") + 12 * 498)
    for k in range(length):
        (cmds,) = net[k].seen.values()
        early = [c == CellCommand.RELAY_EARLY for c in cmds]
        assert len(cmds) > 8 - k
        assert early == [True] * (8 - k) + [False] * (len(cmds) - (8 - k)), (k, cmds)
    writer.close()


async def test_stream_ids_start_at_a_random_value(net, client, http_server):
    firsts = []
    for _ in range(8):
        circ = await client.build_circuit([r.info() for r in net[:2]])
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        firsts.append(writer.get_extra_info("stream_id"))
        assert await http_get(reader, writer, "/100") == blob(100)
        circ.close()
    assert len(set(firsts)) >= 6, firsts  # 8 draws from 65535 values
    # IDs are taken in turn from there, skipping 0 and IDs in use
    circ = await client.build_circuit([r.info() for r in net[:2]])
    circ.core._next_sid = 0xFFFE
    a = await circ.open_stream("127.0.0.1", http_server.port)
    circ.core._next_sid = 0xFFFE
    b = await circ.open_stream("127.0.0.1", http_server.port)
    assert [w.get_extra_info("stream_id") for _r, w in (a, b)] == [0xFFFE, 0xFFFF]
    c = await circ.open_stream("127.0.0.1", http_server.port)
    assert c[1].get_extra_info("stream_id") == 1


# -- the relay side: an exit cuts off a client that breaks the rules ----------------------------------


class NonReader:
    """A destination that accepts and never reads (a small receive buffer)."""

    async def __aenter__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.sock.close()


async def cut_off_by_the_exit(exit_: Relay, circ) -> None:
    await wait_for(lambda: exit_.destroy_reasons["PROTOCOL"] == 1, 20, "the exit to destroy the circuit")
    await wait_for(lambda: circ.state == "closed", 10, "the DESTROY to reach the client")
    assert circ.close_reason == "DESTROYED"  # the relays on the way hide the exit's reason


async def test_exit_cuts_off_a_client_that_overruns_a_stream_window(net):
    client = OnionClient(congestion_control=False)  # stream windows exist only without CC
    try:
        await _overrun_stream_window(net, client)
    finally:
        await client.close()


async def test_exit_frees_the_memory_of_a_client_that_ignores_xoff(net, client):
    """Under congestion control there are no stream windows: a client that ignores the
    exit's XOFF fills the exit's buffer for the destination, which the relay's memory limit
    (MaxMemInQueues) counts; the circuit is killed when it passes it, as tor does."""
    exit_ = net[2]
    cap = 3_000_000
    exit_.reconfigure(replace(exit_.config, max_mem_in_queues=cap))
    async with NonReader() as dest:
        circ = await client.build_circuit([r.info() for r in net[:3]])
        assert circ.core.layers[-1].cc is not None
        _reader, writer = await circ.open_stream("127.0.0.1", dest.port)
        sid = writer.get_extra_info("stream_id")
        edge = circ.streams[sid]
        xoff_seen = False
        for i in range(40000):
            while circ.state == "built" and circ.core.layers[-1].package.window == 0:
                await asyncio.sleep(0.002)
            if circ.state != "built":
                break
            if edge.xoff_received:
                xoff_seen = True
            circ.send_relay(RelayCommand.DATA, sid, b"x" * circ.core.layers[-1].data_max)  # XOFF or not
            if i % 64 == 0:
                await asyncio.sleep(0)
        assert xoff_seen  # the exit did say stop
        await wait_for(lambda: exit_.stats["oom_circuits_killed"] >= 1, 20, "the memory limit to act")
        await wait_for(lambda: circ.state == "closed", 10, "the DESTROY to reach the client")
        assert exit_.queue_memory()[0] <= cap


async def _overrun_stream_window(net, client):
    async with NonReader() as dest:
        circ = await client.build_circuit([r.info() for r in net[:3]])
        _reader, writer = await circ.open_stream("127.0.0.1", dest.port)
        sid = writer.get_extra_info("stream_id")
        edge = circ.streams[sid]
        # Honour the circuit window (the exit acknowledges as cells arrive) but not the
        # stream window: once the destination's socket is full the exit stops sending
        # stream SENDMEs, and 500 cells later the stream window is overrun.
        for i in range(16000):
            while circ.state == "built" and circ.core.layers[-1].package.window == 0:
                await asyncio.sleep(0.002)
            if circ.state != "built":
                break
            circ.send_relay(RelayCommand.DATA, sid, b"x" * 498)
            edge.package.window -= 1  # counted (so the exit's SENDMEs are welcome), never waited for
            if i % 64 == 0:
                await asyncio.sleep(0)
        await cut_off_by_the_exit(net[2], circ)


async def test_exit_cuts_off_a_circuit_sendme_nobody_asked_for(net, client, http_server):
    circ = await client.build_circuit([r.info() for r in net[:3]])
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    assert await http_get(reader, writer, "/60000") == blob(60_000)  # 121 cells, acknowledged
    circ.send_relay(RelayCommand.SENDME, 0, Sendme(1, os.urandom(20)).encode())
    await cut_off_by_the_exit(net[2], circ)


async def test_exit_cuts_off_a_stream_sendme_nobody_asked_for(net, http_server):
    # (relay message format v1, which comes with CGO, cannot even say "stream SENDME": tor1 here)
    client = OnionClient(cgo=False)
    try:
        circ = await client.build_circuit([r.info() for r in net[:3]])
        _reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        circ.send_relay(RelayCommand.SENDME, writer.get_extra_info("stream_id"), b"")
        await cut_off_by_the_exit(net[2], circ)
    finally:
        await client.close()


async def test_exit_cuts_off_a_sendme_v1_with_the_wrong_digest(net, client, http_server, monkeypatch):
    circ = await client.build_circuit([r.info() for r in net[:3]])

    def wrong_digest(layer, digest):  # this client echoes a digest it never saw
        while layer.deliver.sendme_due():
            layer.deliver.on_sendme_sent()
            circ.core._originate(layer, RelayCommand.SENDME, 0, Sendme(1, bytes(20)).encode())

    monkeypatch.setattr(circ.core, "_circuit_sendmes", wrong_digest)
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    writer.write(b"GET /2000000 HTTP/1.0\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        await reader.read(-1)
    await cut_off_by_the_exit(net[2], circ)


async def test_exit_cuts_off_data_on_stream_zero(net, client):
    circ = await client.build_circuit([r.info() for r in net[:3]])
    circ.send_relay(RelayCommand.DATA, 0, b"no stream")
    await cut_off_by_the_exit(net[2], circ)


# -- exits are not one-hop proxies (tor's RefuseUnknownExits) ---------------------------------------


async def test_exit_refuses_streams_on_circuits_from_clients(net, client, http_server):
    exit_ = net[2]
    one_hop = await client.build_circuit([exit_.info()])
    with pytest.raises(StreamError) as e:
        await one_hop.open_stream("127.0.0.1", http_server.port)
    assert e.value.reason == EndReason.TORPROTOCOL
    with pytest.raises(StreamError) as e:
        await one_hop.resolve("localhost")
    assert e.value.reason == EndReason.TORPROTOCOL
    assert http_server.connections == 0
    # BEGIN_DIR stays allowed: a client fetches directory documents from its guard
    exit_.exit.dir_port = http_server.port  # an HTTP server stands in for its directory port
    reader, writer = await one_hop.open_dir_stream()
    assert await http_get(reader, writer, "/3000") == blob(3000)
    assert one_hop.state == "built"
    # the same exit behind a relay serves both
    two_hop = await client.build_circuit([net[1].info(), exit_.info()])
    reader, writer = await two_hop.open_stream("127.0.0.1", http_server.port)
    assert await http_get(reader, writer, "/3000") == blob(3000)
    assert "127.0.0.1" in {a.value_text() for a in (await two_hop.resolve("localhost")).answers}


# -- private addresses ---------------------------------------------------------------------------------


async def test_exit_rejects_its_own_address_and_private_lookups(tmp_path, net, client, http_server):
    # An exit bound to 127.0.0.2 whose policy accepts everything (as on the testnet) but
    # with exit_reject_private on: its own address is rejected (tor's
    # ExitPolicyRejectMyAddresses), and lookups do not reveal private addresses.
    x = Relay(RelayKeys.load_or_create(tmp_path / "x"), relay_config(tmp_path / "x", nickname="x", exit_policy=ExitPolicy.parse("accept *:*", reject_private=False), exit_reject_private=True, or_address=("127.0.0.2", 0)))
    await x.start()
    own = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.2", 0)
    try:
        circ = await client.build_circuit([net[0].info(), x.info()])
        with pytest.raises(StreamError) as e:
            await circ.open_stream("127.0.0.2", own.sockets[0].getsockname()[1])
        assert e.value.reason == EndReason.EXITPOLICY
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)  # not its own address
        assert await http_get(reader, writer, "/1000") == blob(1000)
        for name in ("localhost", "1.0.0.127.in-addr.arpa"):
            answers = (await circ.resolve(name)).answers
            assert [a.atype for a in answers] == [0xF1], (name, answers)
        # the same lookups through an exit that allows private addresses
        circ2 = await client.build_circuit([net[0].info(), net[1].info()])
        assert "127.0.0.1" in {a.value_text() for a in (await circ2.resolve("localhost")).answers}
    finally:
        own.close()
        await x.stop()


async def test_client_refuses_internal_addresses_unless_configured(tmp_path, net, http_server):
    from python_socks import ProxyError
    from python_socks.async_.asyncio import Proxy

    from onionp2p.client.node import ClientNode
    from onionp2p.config import ClientConfig
    from onionp2p.proto.directory import RouterStatus
    from onionp2p.proto.socks import Reply

    flags = frozenset({"Exit", "Fast", "Guard", "Running", "Stable", "Valid"})
    statuses = [RouterStatus(r.info(), flags, bandwidth=1000) for r in net[:3]]
    for reject in (True, False):
        cfg = ClientConfig(data_dir=tmp_path / f"c{reject}", socks_address=("127.0.0.1", 0),
                           enforce_distinct_subnets=False, preemptive_circuits=1,
                           **({} if reject else {"client_reject_internal_addresses": False}))
        node = ClientNode(cfg, routers=lambda: statuses)
        await node.start(ready_timeout=30)
        try:
            proxy = Proxy.from_url(f"socks5://127.0.0.1:{node.socks_port}", rdns=True)
            for host in ("127.0.0.1", "localhost", "10.1.2.3", "[::1]"):
                if not reject:
                    break
                with pytest.raises(ProxyError) as e:
                    await proxy.connect(host.strip("[]"), http_server.port, timeout=30)
                assert e.value.error_code == Reply.NOT_ALLOWED, host
            if not reject:
                sock = await proxy.connect("127.0.0.1", http_server.port, timeout=30)
                reader, writer = await asyncio.open_connection(sock=sock)
                assert await http_get(reader, writer, "/1000") == blob(1000)
        finally:
            await node.stop()
    assert http_server.connections == 1  # only the allowed one reached the destination
