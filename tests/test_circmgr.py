"""CircuitManager over five real in-process relays (127.0.0.1, TLS): preemptive circuits,
isolation, NEWNYM, dirtiness, retries around dead relays and exit policies."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import socket
import time

import pytest
from conftest import blob, http_get, relay_config, wait_for

from onionp2p.client.circmgr import (
    _UNASSIGNED,
    BuildTimeoutError,
    CircuitLimitError,
    CircuitManager,
    _Entry,
    end_reason_action,
)
from onionp2p.client.client import OnionClient
from onionp2p.client.guards import GuardSet
from onionp2p.config import ClientConfig
from onionp2p.errors import StreamError
from onionp2p.proto.directory import RouterStatus
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.relaycell import EndReason
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

# g0, g1, m0 carry the Guard flag; e0 exits everywhere, e1 only to ports 1-1023.
POLICIES = {
    "g0": "reject *:*",
    "g1": "reject *:*",
    "m0": "reject *:*",
    "e0": "accept *:*",
    "e1": "accept *:1-1023\nreject *:*",
}


class Net:
    def __init__(self, relays: dict[str, Relay]):
        self.relays = relays
        self.stopped: set[str] = set()
        self.overrides: dict[str, dict] = {}
        self.delisted: set[str] = set()

    def status(self, name: str) -> RouterStatus:
        relay = self.relays[name]
        flags = {"Running", "Valid", "Fast", "Stable"} | ({"Exit"} if name.startswith("e") else {"Guard"})
        rs = RouterStatus(info=relay.info(), flags=frozenset(flags), bandwidth=100)
        over = self.overrides.get(name, {})
        if "exit_policy" in over:
            rs = dataclasses.replace(rs, info=dataclasses.replace(rs.info, exit_policy=over["exit_policy"]))
        if "bandwidth" in over:
            rs = dataclasses.replace(rs, bandwidth=over["bandwidth"])
        return rs

    def routers(self) -> list[RouterStatus]:
        # a stale consensus: stopped relays are still listed as Running, unless delisted
        return [self.status(n) for n in self.relays if n not in self.delisted]

    def fp(self, name: str) -> str:
        return self.relays[name].info().fingerprint

    def name_of(self, fingerprint: str) -> str:
        return next(n for n in self.relays if self.fp(n) == fingerprint)

    async def stop(self, name: str) -> None:
        self.stopped.add(name)
        await self.relays[name].stop()


@pytest.fixture
async def net(tmp_path):
    relays = {}
    for name, policy in POLICIES.items():
        keys = RelayKeys.load_or_create(tmp_path / name / "keys")
        relay = Relay(keys, relay_config(tmp_path / name, exit_reject_private=False, nickname=name, exit_policy=ExitPolicy.parse(policy, reject_private=False), extend_allow_private=True))
        await relay.start()
        relays[name] = relay
    n = Net(relays)
    yield n
    for name, relay in relays.items():
        if name not in n.stopped:
            await relay.stop()


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def env(net, tmp_path):
    """Factory for a CircuitManager on ``net`` (stopped and closed after the test)."""
    made = []

    async def make(**kw):
        client = OnionClient()
        events = []
        client.events.add(events.append)
        guards = GuardSet(tmp_path / f"guards{len(made)}.json", rng=random.Random(11))
        kw.setdefault("preemptive", 0)
        names = {"preemptive": "preemptive_circuits", "dirtiness": "max_circuit_dirtiness",
                 "build_timeout": "circuit_build_timeout"}  # the manager's words -> ClientConfig keys
        clock = kw.pop("clock", time.monotonic)
        cfg = ClientConfig(enforce_distinct_subnets=False, **{names.get(k, k): v for k, v in kw.items()})
        mgr = CircuitManager(client, net.routers, guards, cfg, rng=random.Random(5), clock=clock)
        made.append((mgr, client))
        return mgr, client, events

    yield make
    for mgr, client in made:
        await mgr.stop()
        await client.close()


def exit_name(net: Net, circ) -> str:
    return net.name_of(circ.hops[-1].fingerprint)


async def fetch(mgr, port, key, n=5000):
    reader, writer, circ = await mgr.open_stream("127.0.0.1", port, key, timeout=30)
    body = await http_get(reader, writer, f"/{n}")
    assert body == blob(n)
    return circ


# -- tests -------------------------------------------------------------------------------------------


async def test_preemptive_circuits_ready_before_first_request(env, net, http_server):
    mgr, client, events = await env(preemptive=3, preemptive_ports=(http_server.port,))
    await mgr.start()
    await mgr.ready(15)
    await wait_for(lambda: sum(c.state == "built" for c in mgr.circuits()) == 3,
                   timeout=15, what="3 preemptive circuits")
    prebuilt = {c.id for c in mgr.circuits()}
    assert all(c.purpose == "preemptive" and not c.isolated and not c.dirty for c in mgr.circuits())
    launched_before = sum(e.kind == "launched" for e in events)
    assert launched_before == 3

    circ = await fetch(mgr, http_server.port, "first")
    assert circ.id in prebuilt  # no build on the request path
    assert exit_name(net, circ) == "e0"
    # the used circuit is replaced: three clean ones again
    await wait_for(lambda: sum(not c.isolated and c.state == "built" for c in mgr.circuits()) == 3,
                   timeout=15, what="preemptive top-up")
    assert sum(e.kind == "launched" for e in events) == 4


async def test_default_preemptive_ports_use_exits_allowing_them(env, net):
    mgr, _client, _events = await env(preemptive=3)
    await mgr.start()
    await mgr.ready(15)
    await wait_for(lambda: sum(c.state == "built" for c in mgr.circuits()) == 3,
                   timeout=15, what="3 circuits")
    for info in mgr.circuits():
        assert info.path[-1].split("~")[1] in ("e0", "e1")
        assert info.path[0].split("~")[1] in ("g0", "g1", "m0")
        assert len(set(info.path)) == 3


async def test_isolation_keys_never_share_a_circuit(env, net, http_server):
    mgr, _client, _events = await env(preemptive=2, preemptive_ports=(http_server.port,))
    await mgr.start()
    await mgr.ready(15)
    port = http_server.port
    a1 = await fetch(mgr, port, ("alice", "pw"))
    a2 = await fetch(mgr, port, ("alice", "pw"))
    b1 = await fetch(mgr, port, ("bob", "pw"))
    n1 = await fetch(mgr, port, None)
    assert a1.id == a2.id
    assert len({a1.id, b1.id, n1.id}) == 3

    # concurrently: every key gets its own circuit, each key exactly one
    keys = ["k1", "k2", "k3"] * 4
    circs = await asyncio.gather(*(fetch(mgr, port, k, 1000 + i) for i, k in enumerate(keys)))
    by_key: dict[str, set[int]] = {}
    for k, c in zip(keys, circs):
        by_key.setdefault(k, set()).add(c.id)
    assert all(len(ids) == 1 for ids in by_key.values())
    all_ids = [next(iter(ids)) for ids in by_key.values()] + [a1.id, b1.id, n1.id]
    assert len(set(all_ids)) == len(all_ids)
    info = {c.id: c for c in mgr.circuits()}
    assert info[a1.id].isolation == ("alice", "pw") and info[a1.id].isolated
    assert info[n1.id].isolation is None and info[n1.id].isolated


async def test_new_identity_uses_new_circuits_and_keeps_open_streams(env, net, http_server):
    mgr, _client, _events = await env()
    port = http_server.port
    reader, writer, old = await mgr.open_stream("127.0.0.1", port, "me")
    writer.write(b"GET /echo HTTP/1.0\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")

    mgr.new_identity()
    new = await fetch(mgr, port, "me")
    assert new.id != old.id
    assert {c.id: c.dirty for c in mgr.circuits()}[old.id] is True
    # the stream opened before NEWNYM still works
    writer.write(b"still here")
    assert await reader.readexactly(10) == b"still here"
    assert old.state == "built"
    writer.close()
    assert (await fetch(mgr, port, "me")).id == new.id


async def test_dirty_circuits_take_no_new_streams(env, net, http_server):
    clock = FakeClock()
    mgr, _client, _events = await env(clock=clock, dirtiness=600)
    port = http_server.port
    first = await fetch(mgr, port, "k")
    clock.t += 599
    assert (await fetch(mgr, port, "k")).id == first.id
    clock.t += 2  # 601 s after the first stream was attached
    second = await fetch(mgr, port, "k")
    assert second.id != first.id
    assert {c.id: c.dirty for c in mgr.circuits()} == {first.id: True, second.id: False}
    # once its streams are gone (and the attach grace has passed) the dirty circuit is closed
    clock.t += 60
    await wait_for(lambda: not first.streams, timeout=15, what="streams to end")
    assert (await mgr.get_circuit(port, "k")).id == second.id
    assert first.state == "closed"
    assert [c.id for c in mgr.circuits()] == [second.id]


async def test_stopped_guard_is_marked_down_and_avoided(env, net, http_server):
    mgr, _client, events = await env()
    primary = mgr.guards.primary(net.routers())
    dead = net.name_of(primary[0])
    await net.stop(dead)
    circ = await fetch(mgr, http_server.port, "k")
    assert mgr.guards.is_down(primary[0])
    assert net.name_of(circ.hops[0].fingerprint) != dead
    assert circ.hops[0].fingerprint == primary[1]
    assert all(dead not in "".join(c.path) for c in mgr.circuits())


async def test_stopped_middle_is_routed_around(env, net, http_server):
    # e1 cannot exit to the HTTP port, so it can only be the middle; make it the likeliest one
    net.overrides["e1"] = {"bandwidth": 10**6}
    await net.stop("e1")
    mgr, _client, events = await env()
    circs = [await fetch(mgr, http_server.port, f"key{i}") for i in range(4)]
    assert len({c.id for c in circs}) == 4
    assert any(e.kind == "failed" for e in events)  # the dead middle was tried and failed
    for c in circs:
        assert "e1" not in [h.nickname for h in c.hops]
        assert exit_name(net, c) == "e0"


async def test_circuit_through_a_relay_gone_from_the_consensus_takes_no_new_streams(env, net, http_server):
    mgr, _client, _events = await env()
    port = http_server.port
    reader, writer, first = await mgr.open_stream("127.0.0.1", port, "k")
    writer.write(b"GET /echo HTTP/1.0\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    assert (await fetch(mgr, port, "k")).id == first.id  # reused while its relays are listed
    middle = first.hops[1].nickname
    net.delisted.add(middle)  # the next consensus no longer lists the middle
    second = await fetch(mgr, port, "k")
    assert second.id != first.id
    assert middle not in [h.nickname for h in second.hops]
    assert {c.id: c.dirty for c in mgr.circuits()}[first.id] is True
    # the open stream on the retired circuit goes on
    writer.write(b"still here")
    assert await reader.readexactly(10) == b"still here"
    writer.close()


async def test_only_exit_allowing_the_port_is_used(env, net, http_server):
    net.overrides["e1"] = {"bandwidth": 10**6}  # e1 is preferred wherever it may exit
    mgr, _client, _events = await env()
    for i in range(5):
        assert exit_name(net, await fetch(mgr, http_server.port, f"key{i}")) == "e0"
    low = await mgr.get_circuit(80, "low")
    assert exit_name(net, low) == "e1"  # port 80: both may exit, the heavy one wins


async def test_exitpolicy_refusal_is_retried_through_another_exit(env, net, http_server):
    # e1 advertises a summary that is wider than its real policy: its END(EXITPOLICY) sends us to e0
    net.overrides["e1"] = {"bandwidth": 10**6, "exit_policy": "accept 1-65535"}
    mgr, _client, _events = await env()
    circ = await fetch(mgr, http_server.port, "k")
    assert exit_name(net, circ) == "e0"
    infos = mgr.circuits()
    liar = [c for c in infos if c.path[-1].endswith("~e1")]
    assert len(liar) == 1 and not liar[0].dirty  # still fine for other ports
    assert (await mgr.get_circuit(443, "k")).id == liar[0].id


async def test_exit_refusal_without_alternative_raises_the_stream_error(env, net, http_server):
    # the only exit that claims the port refuses it; no other exit is left to try
    net.overrides["e0"] = {"exit_policy": "accept 1-1023"}
    net.overrides["e1"] = {"exit_policy": "accept 1-65535"}
    mgr, _client, events = await env()
    with pytest.raises(StreamError) as info:
        await mgr.open_stream("127.0.0.1", http_server.port, "k", timeout=30)
    assert info.value.reason == EndReason.EXITPOLICY
    assert sum(e.kind == "launched" for e in events) == 1


async def test_connection_refused_is_not_retried(env, net):
    mgr, _client, events = await env()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(StreamError) as info:
        await mgr.open_stream("127.0.0.1", closed_port, "k", timeout=30)
    assert info.value.reason == EndReason.CONNECTREFUSED
    assert sum(e.kind == "launched" for e in events) == 1


async def test_resolve_through_a_managed_circuit(env, net):
    mgr, _client, _events = await env()
    resolved = await mgr.resolve("localhost", "k")
    assert "127.0.0.1" in [a.value_text() for a in resolved.answers]
    (info,) = mgr.circuits()
    assert info.isolation == "k" and info.path[-1].split("~")[1] in ("e0", "e1")


async def test_circuits_per_isolation_key_are_bounded(env, net, http_server):
    mgr, _client, _events = await env(max_circuits_per_isolation=2)
    writers = []
    for _ in range(2):
        reader, writer, _c = await mgr.open_stream("127.0.0.1", http_server.port, "greedy")
        writer.write(b"GET /echo HTTP/1.0\r\n\r\n")
        writers.append(writer)
        mgr.new_identity()
    with pytest.raises(CircuitLimitError):
        await mgr.get_circuit(http_server.port, "greedy")
    assert (await mgr.get_circuit(http_server.port, "other")) is not None
    for w in writers:
        w.close()


async def test_stop_closes_managed_circuits(env, net, http_server):
    mgr, client, _events = await env(preemptive=2, preemptive_ports=(80,))
    await mgr.start()
    await mgr.ready(15)
    await wait_for(lambda: sum(c.state == "built" for c in mgr.circuits()) == 2,
                   timeout=15, what="2 circuits")
    circs = list(client.circuits.values())
    await mgr.stop()
    assert mgr.circuits() == [] and all(c.state == "closed" for c in circs)


async def test_a_failed_build_not_yet_reaped_is_not_joined(env, net, http_server):
    """A build that has just failed is still listed until its done-callback runs, later in
    the same turn of the loop. A stream looking for a circuit then must not "join" it:
    waiting on a finished task does not yield, so the stream went round again and again
    on it (under load its attempts were gone at once: SOCKS reply 6; with the patience
    for timed-out builds, a loop that never ended and froze the client)."""
    mgr, client, events = await env()
    loop = asyncio.get_running_loop()
    failed = loop.create_future()
    failed.set_exception(BuildTimeoutError("circuit build timed out after 1 s"))
    failed.exception()  # retrieved
    # a clean preemptive build to e0 (it fits any stream), ended, its callback not yet run
    stale = _Entry((net.status("g0"), net.status("m0"), net.status("e0")), "preemptive", mgr._generation,
                   time.time(), isolation=_UNASSIGNED)
    stale.task = failed
    mgr._entries.append(stale)

    def frozen(signum, frame):
        raise AssertionError("the stream's circuit search never yielded to the event loop")

    previous = signal.signal(signal.SIGALRM, frozen)
    signal.alarm(30)
    try:
        circ = await fetch(mgr, http_server.port, "k")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert circ.state == "built" and not any(e.kind == "failed" for e in events)
    mgr._entries.remove(stale)


def test_end_reason_actions_follow_tor():
    assert end_reason_action(EndReason.EXITPOLICY) == "other-exit"
    assert end_reason_action(EndReason.RESOURCELIMIT) == "retire-exit"
    assert end_reason_action(EndReason.HIBERNATING) == "retire-exit"
    for r in (EndReason.RESOLVEFAILED, EndReason.MISC, EndReason.NOROUTE, EndReason.TIMEOUT):
        assert end_reason_action(r) == "retire"
    assert end_reason_action(EndReason.TORPROTOCOL) == "close"
    assert end_reason_action(EndReason.DESTROY) == "close"
    for r in (EndReason.CONNECTREFUSED, EndReason.DONE, EndReason.CONNRESET, EndReason.INTERNAL, 99):
        assert end_reason_action(r) == "fail"


async def test_internal_circuits_end_at_the_chosen_relay_and_take_no_streams(env, net, http_server):
    """build_internal: a 4-hop HS_CLIENT_INTRO circuit to a relay outside the consensus (known
    only as a RelayInfo, as an introduction point), a 3-hop HS_CLIENT_REND circuit to a
    rendezvous point chosen here; the guard comes from the guard set; neither carries a stream."""
    net.delisted.add("e1")
    mgr, client, events = await env()
    intro = net.relays["e1"].info()
    circ = await mgr.build_internal(intro, "HS_CLIENT_INTRO", onion="X" * 56 + ".onion", timeout=30)
    assert circ.state == "built" and len(circ.hops) == 4 and circ.hops[-1].rsa_id == intro.rsa_id
    assert circ.purpose == "HS_CLIENT_INTRO" and circ.hs_state == "HSCI_CONNECTING"
    assert circ.rend_query == "x" * 56
    assert circ.hops[0].fingerprint in mgr.guards.sampled_fingerprints()
    rend = await mgr.build_internal(None, "HS_CLIENT_REND", timeout=30)
    assert len(rend.hops) == 3 and rend.hops[-1].supports("HSRend", 2)
    listed = {i.purpose for i in mgr.circuits()}
    assert {"HS_CLIENT_INTRO", "HS_CLIENT_REND"} <= listed
    # an ordinary stream never goes over them, and maintenance leaves them to their owner
    used = await fetch(mgr, http_server.port, None)
    assert used is not circ and used is not rend
    mgr._reap()
    assert circ.state == "built" and rend.state == "built"
    with pytest.raises(ValueError):
        await mgr.build_internal(intro, "GENERAL")
    circ.close()
    rend.close()
    # a last hop that is a (primary) guard: the guard set's next guard is used instead
    for name in ("g0", "g1", "m0"):
        c = await mgr.build_internal(net.status(name), "HS_SERVICE_INTRO", timeout=30)
        assert len(c.hops) == 3 and exit_name(net, c) == name
        assert len({h.fingerprint for h in c.hops}) == 3 and c.hops[0].fingerprint != net.fp(name)
        c.close()
