"""Channel padding: the PADDING_NEGOTIATE codec (tor's bytes) and the sans-IO state machine
(onionp2p.proto.padding; padding-spec §2)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from conftest import blob, chi_square, free_port, http_get, relay_config, wait_for

from onionp2p.errors import ProtocolError
from onionp2p.proto.cells import PaddingNegotiate
from onionp2p.proto.padding import (
    ChannelPadding,
    PaddingParams,
    Usage,
    client_padding,
    inactive_timeout_ms,
    relay_padding,
)

# -- codec -------------------------------------------------------------------------------


def test_padding_negotiate_bytes_are_tors():
    # version 0, command START (2), ito_low_ms 1500 = 0x05dc, ito_high_ms 9500 = 0x251c
    assert PaddingNegotiate(2, 1500, 9500).encode() == bytes.fromhex("0002 05dc 251c")
    assert PaddingNegotiate(1, 0, 0).encode() == bytes.fromhex("0001 0000 0000")
    # parsed from a whole (zero-padded) fixed-cell payload, as it arrives
    msg = PaddingNegotiate.parse(bytes.fromhex("0002 00c8 01f4") + bytes(503))
    assert (msg.cmd, msg.ito_low_ms, msg.ito_high_ms) == (PaddingNegotiate.START, 200, 500)


@pytest.mark.parametrize("raw", [
    bytes.fromhex("0102 05dc 251c"),  # version 1
    bytes.fromhex("0003 05dc 251c"),  # command 3
    bytes.fromhex("0000 05dc 251c"),  # command 0
    bytes.fromhex("0002 05dc 25"),  # truncated
    b"",
])
def test_bad_padding_negotiate_does_not_parse(raw):
    with pytest.raises(ProtocolError):
        PaddingNegotiate.parse(raw)


# -- consensus parameters ----------------------------------------------------------------------


def test_params_defaults_and_clamps_as_tor():
    assert PaddingParams.from_consensus({}) == PaddingParams()
    p = PaddingParams.from_consensus({"nf_ito_low": 70000, "nf_ito_high": 5, "nf_conntimeout_clients": 1,
                                      "nf_pad_relays": 7, "nf_pad_before_usage": 0})
    assert (p.nf_ito_low, p.nf_ito_high) == (60000, 60000)  # max 60 s; high never below low
    assert p.nf_conntimeout_clients == 60 and p.nf_pad_relays == 1 and p.nf_pad_before_usage == 0
    assert PaddingParams.from_consensus({"nf_ito_low": 0, "nf_ito_high": 0}).disabled


# -- the timeout draw --------------------------------------------------------------------------


def test_timeouts_stay_within_bounds():
    rng = random.Random(1)
    p = PaddingParams()
    draws = [inactive_timeout_ms(p, 0, 0, rng) for _ in range(20000)]
    assert min(draws) >= 1500 and max(draws) < 9500
    # negotiated values raise the range but never lower it below the consensus
    draws = [inactive_timeout_ms(p, 9000, 14000, rng) for _ in range(2000)]
    assert min(draws) >= 9000 and max(draws) < 14000
    assert all(1500 <= inactive_timeout_ms(p, 100, 200, rng) < 9500 for _ in range(2000))
    assert inactive_timeout_ms(PaddingParams(nf_ito_low=3000, nf_ito_high=3000), 0, 0, rng) == 3000
    assert inactive_timeout_ms(PaddingParams(nf_ito_low=0, nf_ito_high=0), 0, 0, rng) == 0


def test_timeout_is_the_max_of_two_uniform_draws():
    """Binned draws against P(max(X1, X2) in bin) for X uniform on [0, 100): chi-square."""
    rng = random.Random(20261207)
    p = PaddingParams(nf_ito_low=1000, nf_ito_high=1100)
    n, span, width = 40000, 100, 10
    observed: dict[int, int] = {}
    for _ in range(n):
        b = (inactive_timeout_ms(p, 0, 0, rng) - 1000) // width
        observed[b] = observed.get(b, 0) + 1
    expected = {b: n * (((b + 1) * width) ** 2 - (b * width) ** 2) / span ** 2 for b in range(span // width)}
    _, pvalue = chi_square(observed, expected)
    assert pvalue > 0.001, (observed, expected)


# -- the state machine -------------------------------------------------------------------------


def _used(state: ChannelPadding) -> ChannelPadding:
    state.use(Usage.FULL_CIRCS)
    return state


def test_idle_channel_is_padded_within_the_bounds():
    p = PaddingParams(nf_ito_low=1500, nf_ito_high=9500)
    state = _used(ChannelPadding(p, is_client_channel=True, enabled=True, rng=random.Random(3), now=100.0))
    d = state.poll(100.0)
    assert not d.send and 101.5 <= d.next_at < 109.5
    assert not state.poll(d.next_at - 0.001).send  # not early
    d2 = state.poll(d.next_at)
    assert d2.send and d.next_at + 1.5 <= d2.next_at < d.next_at + 9.5  # and the next one is drawn


def test_no_padding_while_traffic_flows():
    p = PaddingParams(nf_ito_low=1500, nf_ito_high=9500)
    state = _used(ChannelPadding(p, is_client_channel=True, enabled=True, rng=random.Random(4), now=0.0))
    deadline = state.poll(0.0).next_at
    t, sent = 0.0, 0
    while t < 120.0:  # a cell every second for two minutes; the timer fires at each deadline
        t += 1.0
        state.activity(t)
        if deadline is not None and deadline <= t:
            d = state.poll(t)
            sent += d.send
            deadline = d.next_at
    assert sent == 0
    # queued writes count as traffic too
    assert not state.poll(t + 60.0, busy=True).send
    assert state.poll(t + 70.0).send  # idle again long enough: padded


def test_stop_stops_and_start_restarts_with_clamped_timeouts():
    p = PaddingParams(nf_ito_low=1500, nf_ito_high=9500)
    state = _used(relay_padding(p, peer_is_client=True, link_version=5, rng=random.Random(5), now=0.0))
    assert state.poll(0.0).next_at is not None
    state.negotiate(PaddingNegotiate(PaddingNegotiate.STOP, 0, 0))
    assert state.poll(1000.0) == state.poll(2000.0) and not state.poll(3000.0).send
    assert state.poll(3000.0).next_at is None  # no timer at all
    # START with timeouts below the consensus: clamped up (low >= nf_ito_low, high >= low)
    state.negotiate(PaddingNegotiate(PaddingNegotiate.START, 100, 50))
    assert (state.low_ms, state.high_ms) == (1500, 1500)
    state.activity(3000.0)
    d = state.poll(3000.0)
    assert 3001.5 <= d.next_at < 3009.5  # still the consensus range: negotiation cannot go below it
    assert state.poll(d.next_at).send
    # a client asking for less padding than the consensus gets it
    state.negotiate(PaddingNegotiate(PaddingNegotiate.START, 12000, 13000))
    state.activity(4000.0)
    assert 4012.0 <= state.poll(4000.0).next_at < 4013.0


def test_who_pads():
    p = PaddingParams()
    # unused channels are not padded; with nf_pad_before_usage=0 only after user traffic
    state = ChannelPadding(p, is_client_channel=True, enabled=True, now=0.0)
    assert not state.wants_padding()
    state.use(Usage.FULL_CIRCS)
    assert state.wants_padding()
    lazy = ChannelPadding(PaddingParams(nf_pad_before_usage=0), is_client_channel=True, enabled=True)
    lazy.use(Usage.FULL_CIRCS)
    assert not lazy.wants_padding()
    lazy.use(Usage.USER_TRAFFIC)
    assert lazy.wants_padding()
    # relay-to-relay channels only with nf_pad_relays
    assert not _used(relay_padding(p, peer_is_client=False, link_version=5)).wants_padding()
    pad_relays = PaddingParams(nf_pad_relays=1)
    assert _used(relay_padding(pad_relays, peer_is_client=False, link_version=5)).wants_padding()
    # link protocol 4: not on by default
    assert not _used(relay_padding(p, peer_is_client=True, link_version=4)).wants_padding()


def test_client_negotiation_follows_the_options():
    p = PaddingParams(nf_ito_low=200, nf_ito_high=500)
    state, msg = client_padding(p, peer_supports=True)
    assert msg is None and state.enabled  # as tor's client: no START, the relay pads by itself
    state, msg = client_padding(p, peer_supports=False)
    assert msg is None and not _used(state).wants_padding()
    state, msg = client_padding(p, peer_supports=False, connection_padding="1")
    assert msg is None and _used(state).wants_padding()  # forced
    state, msg = client_padding(p, peer_supports=True, connection_padding="0")
    assert msg.cmd == PaddingNegotiate.STOP and not _used(state).wants_padding()
    state, msg = client_padding(p, peer_supports=True, reduced=True, rng=random.Random(6))
    assert msg.cmd == PaddingNegotiate.STOP and _used(state).wants_padding()
    draws = [inactive_timeout_ms(p, state.low_ms, state.high_ms, state.rng) for _ in range(500)]
    assert min(draws) >= 9000 and max(draws) < 14000  # the reduced range


# -- onionp2p client <-> onionp2p relays over real TLS -----------------------------------------

#: short timeouts: a link idle for 0.2-0.5 s is padded (tor's defaults are 1.5-9.5 s)
FAST = {"nf_ito_low": 200, "nf_ito_high": 500}


class ConsensusParams:
    """The ``params()`` of a relay's directory (what RelayDirectory serves from its consensus),
    for relays started without authorities."""

    def __init__(self, params: dict[str, int]):
        self._params = params

    def params(self) -> dict[str, int]:
        return dict(self._params)

    async def stop(self) -> None:
        pass


def _from_client(relay):
    """The relay's channel from the (unauthenticated) client."""
    return next(c for c in relay.channels if c.peer is None or not c.peer.rsa_id)


async def test_client_and_relay_pad_an_idle_link(relay_net, http_server, caplog):
    from onionp2p.client.client import OnionClient
    from onionp2p.ops.metrics import RelayCollector

    for r in relay_net:
        r.directory = ConsensusParams(FAST)
    client = OnionClient()
    client.consensus_params = lambda: dict(FAST)
    try:
        assert relay_net[0].info().supports("Padding", 2)
        # three hops: the guard counts its client's channel as used for multi-hop circuits when
        # a RELAY_EARLY cell passes through it to a next hop (here: the second EXTEND2)
        circ = await client.build_circuit([r.info() for r in relay_net])
        # user traffic: every hop now counts its previous channel as used (relay-to-relay too)
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert await http_get(reader, writer, "/20000") == blob(20000)
        chan = client.channels[relay_net[0].info().rsa_id]
        at_relay = _from_client(relay_net[0])
        # as from a tor client: no PADDING_NEGOTIATE; the relay pads a client's link by itself
        # (link protocol 5) at the consensus's timeouts
        pad = at_relay.padding
        assert at_relay.padding_negotiations_in == 0
        assert (pad.enabled, pad.low_ms, pad.high_ms) == (True, 0, 0)  # 0: the consensus's range
        # both ends pad the idle link: a cell at least every 0.5 s, never more often than every 0.2 s
        await wait_for(lambda: chan.padding_in >= 1 and at_relay.padding_in >= 1, timeout=10,
                       what="padding in both directions")
        start = chan.padding_in + chan.padding_out
        await asyncio.sleep(3.0)
        seen = chan.padding_in + chan.padding_out - start
        assert 5 <= seen <= 16, seen
        assert at_relay.padding_in == chan.padding_out  # every PADDING cell arrived
        # relay-to-relay: not padded (nf_pad_relays=0)
        assert all(c.padding_out == 0 for c in relay_net[0].channels if c is not at_relay)
        assert all(c.padding_in == c.padding_out == 0 for r in relay_net[1:] for c in r.channels)
        # operators see it in the metrics
        metric = {m.name: m for m in RelayCollector(relay_net[0])()}["onionp2p_padding_cells_total"]
        assert {dict(lbl)["direction"]: v for lbl, v in metric.samples}["received"] >= at_relay.padding_in > 0

        # a malformed PADDING_NEGOTIATE is ignored (logged), the channel stays up
        with caplog.at_level(logging.INFO, logger="onionp2p.channel"):
            chan.send_cell(0, 12, bytes.fromhex("0102 00c8 01f4"))  # version 1
            chan.send_cell(0, 12, bytes.fromhex("0007 00c8 01f4"))  # command 7
            await asyncio.sleep(0.3)
        assert not at_relay.closed and at_relay.padding_negotiations_in == 0 and at_relay.padding.enabled
        assert caplog.text.count("malformed PADDING_NEGOTIATE ignored") == 2

        # STOP: the relay stops padding the link (we keep padding it ourselves)
        chan.send_cell(0, 12, PaddingNegotiate(PaddingNegotiate.STOP, 0, 0).encode())
        await wait_for(lambda: not at_relay.padding.enabled, what="STOP at the relay")
        sent = at_relay.padding_out
        await asyncio.sleep(1.5)
        assert at_relay.padding_out == sent and chan.padding_out > 0
        # and a relay cannot make a client stop: the client ignores PADDING_NEGOTIATE
        at_relay.send_cell(0, 12, PaddingNegotiate(PaddingNegotiate.STOP, 0, 0).encode())
        out = chan.padding_out
        await asyncio.sleep(1.5)
        assert chan.padding.enabled and chan.padding_out > out
    finally:
        await client.close()


async def test_client_without_padding_asks_the_relay_to_stop(relay_net):
    from onionp2p.client.client import OnionClient

    for r in relay_net:
        r.directory = ConsensusParams(FAST)
    client = OnionClient(connection_padding="0")
    client.consensus_params = lambda: dict(FAST)
    try:
        await client.build_circuit([r.info() for r in relay_net])
        chan = client.channels[relay_net[0].info().rsa_id]
        at_relay = _from_client(relay_net[0])
        await wait_for(lambda: at_relay.padding_negotiations_in == 1, what="PADDING_NEGOTIATE at the relay")
        assert not at_relay.padding.enabled
        await asyncio.sleep(1.5)
        assert chan.padding_in == chan.padding_out == at_relay.padding_in == 0
    finally:
        await client.close()


async def test_client_metrics_count_padding_of_open_and_closed_channels(client_node):
    """onionp2p_padding_cells_total of a client node: live channels plus the closed ones."""
    from onionp2p.ops.metrics import ClientCollector

    def sent() -> float:
        metric = {m.name: m for m in collector()}["onionp2p_padding_cells_total"]
        return {dict(lbl)["direction"]: v for lbl, v in metric.samples}["sent"]

    collector = ClientCollector(client_node)
    try:
        def live() -> list:
            return list(client_node.client.channels.values())

        # the preemptive circuits make the guard channel worth padding: 1.5-9.5 s idle (the
        # channels are read at each poll: one made or replaced after start-up counts too)
        await wait_for(lambda: sum(c.padding_out for c in live()) >= 1, timeout=60, what="client padding")
        chans = live()
        before = sum(c.padding_out for c in chans)
        assert sent() >= before > 0
        for c in chans:
            c.close("test")
        await wait_for(lambda: all(c.closed for c in chans), what="channels closed")
        assert sent() >= sum(c.padding_out for c in chans) >= before  # closed channels still count
    finally:
        collector.close()


async def test_padding_parameters_come_from_our_authority_s_consensus(tmp_path):
    """An onionp2p authority votes nf_ito_low=200 nf_ito_high=500 (its consensus_params);
    relays and the client read them from the consensus they fetched: the guard is asked
    for 200/500 and both ends pad at that rate."""
    from onionp2p.client.client import OnionClient
    from onionp2p.config import AuthorityConfig
    from onionp2p.dir.authority import Authority, authority_line, load_or_create_authority_key
    from onionp2p.dir.client import ClientDirectory, RelayDirectory
    from onionp2p.proto.exitpolicy import ExitPolicy
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    key = load_or_create_authority_key(tmp_path / "auth")
    port = free_port()
    lines = [authority_line("auth", "127.0.0.1", port, key)]
    auth = Authority(key, AuthorityConfig(
        nickname="auth", authorities=tuple(lines), data_dir=tmp_path / "auth",
        dir_address=("127.0.0.1", port),
        voting_interval=5, stable_uptime=0, assume_guard=True, assume_exit=True,
        consensus_params={"nf_ito_low": 200, "nf_ito_high": 500}))
    await auth.start()
    relays: list[Relay] = []
    client = OnionClient()
    try:
        for i in range(3):
            relay = Relay(RelayKeys.load_or_create(tmp_path / f"r{i}" / "keys"),
                          relay_config(tmp_path / f"r{i}", nickname=f"r{i}",
                                       exit_policy=ExitPolicy.reject_all(), extend_allow_private=True),
                          directory=RelayDirectory(tmp_path / f"r{i}", lines))
            await relay.start()
            relays.append(relay)
        await wait_for(lambda: auth.current is not None and len(auth.current.routers) == 3, timeout=60,
                       interval=0.2, what="a consensus listing the three relays")
        await wait_for(lambda: all(r.padding_params().nf_ito_low == 200 for r in relays), timeout=60,
                       interval=0.2, what="relays to fetch a consensus with the padding parameters")
        cdir = ClientDirectory(tmp_path / "client", lines, client)
        doc = await cdir.bootstrap()
        assert len(doc.routers) == 3
        client.consensus_params = lambda: dict(doc.params)
        assert client.padding_params() == PaddingParams.from_consensus(
            {"nf_ito_low": 200, "nf_ito_high": 500})
        by_nick = {s.nickname: s.info for s in cdir.routers()}
        await client.build_circuit([by_nick[f"r{i}"] for i in range(3)])
        chan = client.channels[by_nick["r0"].rsa_id]
        at_relay = _from_client(relays[0])
        # no PADDING_NEGOTIATE (as tor's client): both ends pad at the consensus's 0.2-0.5 s
        # (tor's defaults, 1.5-9.5 s, would give at most 2 cells in these 2 s)
        await wait_for(lambda: chan.padding_in >= 1 and at_relay.padding_in >= 1, timeout=10,
                       what="padding in both directions")
        assert at_relay.padding_negotiations_in == 0
        start = chan.padding_in + chan.padding_out
        await asyncio.sleep(2.0)
        assert 3 <= chan.padding_in + chan.padding_out - start <= 11
    finally:
        await client.close()
        for r in relays:
            await r.stop()
        await auth.stop()
