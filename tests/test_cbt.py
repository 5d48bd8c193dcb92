"""The learned circuit build timeout (proposal 151; onionp2p/client/cbt.py, specs/pathsel.md).

Unit tests drive the pure estimator with seeded synthetic Pareto build times; one
integration test runs a real client node on in-process relays whose consensus parameters
(``cbtmincircs``, ``cbtmintimeout``) make it learn after a few builds, and watches the
BUILDTIMEOUT_SET event through stem.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading

import pytest
from conftest import RELAY_FLAGS, close_controller, relay_config, wait_for

from onionp2p.client.cbt import (
    CBT_BIN_WIDTH,
    CBT_BUILD_ABANDONED,
    CBTParams,
    CircuitBuildTimes,
)
from onionp2p.client.node import ClientNode
from onionp2p.config import ClientConfig
from onionp2p.proto.directory import RouterStatus
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.relay.circuit import OrCircuit
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay


def pareto_times(rng: random.Random, xm: float, alpha: float, n: int) -> list[int]:
    """``n`` build times (ms) drawn from Pareto(xm, alpha) by inverse transform."""
    return [round(xm / (1.0 - rng.random()) ** (1 / alpha)) for _ in range(n)]


def fitted(times: list[int], seed: int = 1, **params) -> CircuitBuildTimes:
    cbt = CircuitBuildTimes(CBTParams(**params), rng=random.Random(seed))
    for t in times:
        cbt.add_time(t)
    cbt.set_timeout()
    return cbt


# -- the fit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("xm", "alpha"), [(1000, 3.0), (400, 1.8), (2500, 5.0)])
def test_fit_recovers_pareto_parameters_and_quantile(seed, xm, alpha):
    times = pareto_times(random.Random(seed), xm, alpha, 1000)
    cbt = fitted(times)
    assert cbt.have_computed_timeout
    # Xm is the mode-weighted average of the 10 most frequent 10 ms bins: for a Pareto
    # density (highest at Xm, falling slowly when alpha is large) that is a little above Xm
    assert xm <= cbt.xm <= xm + max(10 * CBT_BIN_WIDTH, 0.1 * xm)
    # tor's alpha is biased upward by that Xm (times below it count as Xm)
    assert cbt.alpha == pytest.approx(alpha, rel=0.30)
    # ... but the tail, where the timeout sits, is what the fit is for
    theoretical = xm / (1 - 0.80) ** (1 / alpha)
    assert cbt.timeout_ms == pytest.approx(theoretical, rel=0.08)
    empirical = sorted(times)[int(0.80 * len(times))]
    assert cbt.timeout_ms == pytest.approx(empirical, rel=0.08)


def test_xm_and_alpha_are_tors_estimators():
    """The exact formulas: Xm from the top cbtnummodes bins (bin middles), alpha the MLE
    with times below Xm counted as Xm, abandoned circuits left out of n."""
    rng = random.Random(7)
    times = pareto_times(rng, 800, 2.5, 600)
    cbt = CircuitBuildTimes(CBTParams(cbtnummodes=4), rng=rng)
    for t in times:
        cbt.add_time(t)
    for _ in range(50):
        cbt.add_time(CBT_BUILD_ABANDONED)
    assert cbt.set_timeout() == "COMPUTED"
    bins: dict[int, int] = {}
    for t in times:
        bins[t // CBT_BIN_WIDTH] = bins.get(t // CBT_BIN_WIDTH, 0) + 1
    top = sorted(bins.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    want_xm = sum((b * CBT_BIN_WIDTH + CBT_BIN_WIDTH // 2) * c for b, c in top) // sum(c for _, c in top)
    assert cbt.xm == want_xm
    want_alpha = len(times) / sum(math.log(max(t, want_xm)) - math.log(want_xm) for t in times)
    assert cbt.alpha == pytest.approx(want_alpha, rel=1e-12)
    assert cbt.timeout_ms == pytest.approx(min(want_xm / 0.2 ** (1 / want_alpha), max(times)))
    assert cbt.close_rate() == pytest.approx(50 / 650)


def test_initial_timeout_until_cbtmincircs():
    cbt = CircuitBuildTimes(CBTParams(cbtmincircs=20), initial_timeout_ms=45_000, rng=random.Random(1))
    times = pareto_times(random.Random(3), 300, 2.0, 20)
    for t in times[:19]:
        assert cbt.circuit_built(t) is None
        assert cbt.timeout_ms == 45_000 and not cbt.have_computed_timeout
    assert cbt.circuit_built(times[19]) == "COMPUTED"
    assert cbt.timeout_ms < 45_000 and cbt.have_computed_timeout


def test_clamps_minimum_cap_and_close_quantile():
    times = pareto_times(random.Random(5), 50, 2.0, 200)
    # the timeout never goes below cbtmintimeout
    cbt = fitted(times, cbtmintimeout=5_000)
    assert cbt.timeout_ms == 5_000
    # nor beyond the longest time observed; close_ms at the 99% quantile, at least cbtinitialtimeout
    cbt = fitted(times, cbtquantile=99, cbtinitialtimeout=10)
    assert cbt.timeout_ms <= max(times)
    cbt = fitted(times, cbtinitialtimeout=10, cbtclosequantile=95)
    assert cbt.close_ms == pytest.approx(min(cbt.calculate_timeout(0.95), 2 * max(times)))
    assert cbt.close_ms > cbt.timeout_ms


def test_consensus_params_defaults_and_bounds():
    assert CBTParams.from_consensus({}) == CBTParams()
    p = CBTParams.from_consensus({"cbtquantile": 5, "cbtnummodes": 99, "cbtrecentcount": 1, "cc_alg": 2,
                                  "cbtclosequantile": 50, "cbtmintimeout": 2000, "cbtinitialtimeout": 100})
    assert (p.cbtquantile, p.cbtnummodes, p.cbtrecentcount) == (10, 20, 3)
    assert p.cbtclosequantile == 50
    assert p.cbtinitialtimeout == 2000  # raised to cbtmintimeout, as tor does
    assert CBTParams.from_consensus({"cbtquantile": 90, "cbtclosequantile": 80}).cbtclosequantile == 90


# -- network liveness --------------------------------------------------------------------------------

def learned(n: int = 100) -> CircuitBuildTimes:
    cbt = CircuitBuildTimes(rng=random.Random(2))
    for t in pareto_times(random.Random(9), 500, 3.0, n):
        cbt.circuit_built(t)
    assert cbt.have_computed_timeout
    return cbt


def test_timeouts_while_no_cells_arrive_are_not_counted():
    cbt = learned()
    total = cbt.total_build_times
    cbt.network_is_live(100.0)
    # a circuit launched at 150 while nothing arrived since 100: non-live, not recorded
    assert cbt.count_close(True, start_time=150.0) is False
    assert cbt.total_build_times == total and not cbt.network_check_live()
    # nor are build times while the network is not live
    cbt.circuit_built(800)
    assert cbt.total_build_times == total
    # a cell arrives: recording resumes
    cbt.network_is_live(200.0)
    assert cbt.network_check_live()
    assert cbt.count_close(True, start_time=190.0) is True
    assert cbt.total_build_times == total + 1 and cbt.times.count(CBT_BUILD_ABANDONED) == 1


def test_too_many_recent_timeouts_reset_then_double():
    cbt = learned()
    learned_ms = cbt.timeout_ms
    assert learned_ms < cbt.initial_timeout_ms
    for _ in range(30):
        assert cbt.count_timeout(False) is None  # before the first hop: not a network change
    for _ in range(cbt.params.cbtmaxtimeouts - 1):
        assert cbt.count_timeout(True) is None
    assert cbt.timeout_ms == learned_ms
    assert cbt.count_timeout(True) == "RESET"
    assert cbt.timeout_ms == cbt.initial_timeout_ms == 60_000
    assert cbt.total_build_times == 0 and not cbt.have_computed_timeout
    assert "CUTOFF_QUANTILE=1.000000" in cbt.event_args("RESET")
    # still timing out at the initial timeout: the network is down, double it
    for _ in range(cbt.params.cbtmaxtimeouts):
        kind = cbt.count_timeout(True)
    assert kind == "RESET" and cbt.timeout_ms == 120_000 and cbt.close_ms == 120_000


def test_successes_in_the_window_prevent_the_reset():
    cbt = learned()
    for i in range(60):  # 17 of every 20 recent circuits time out: fewer than cbtmaxtimeouts (18)
        if i % 20 < 3:
            cbt.network_circ_success()
        else:
            assert cbt.count_timeout(True) is None


def test_recent_window_follows_cbtrecentcount():
    cbt = learned()
    cbt.set_params(CBTParams(cbtrecentcount=5, cbtmaxtimeouts=3))
    assert len(cbt.timeouts_after_firsthop) == 5
    cbt.timeouts_after_firsthop = [0] * 5
    assert cbt.count_timeout(True) is None and cbt.count_timeout(True) is None
    assert cbt.count_timeout(True) == "RESET"


# -- persistence ---------------------------------------------------------------------------------------

def test_state_round_trip():
    cbt = learned(300)
    for _ in range(7):
        cbt.add_time(CBT_BUILD_ABANDONED)
    cbt.set_timeout()
    state = json.loads(json.dumps(cbt.to_state()))
    assert state["total_build_times"] == 307 and state["abandoned"] == 7
    again = CircuitBuildTimes(rng=random.Random(4))
    again.load_state(state)
    assert again.total_build_times == 307
    assert again.histogram() == cbt.histogram()
    assert again.times.count(CBT_BUILD_ABANDONED) == 7
    assert again.xm == cbt.xm and again.have_computed_timeout
    assert again.timeout_ms == pytest.approx(cbt.timeout_ms, rel=0.02)  # times are now bin middles


@pytest.mark.parametrize("state", [
    {"version": 1, "total_build_times": 5, "abandoned": 0, "bins": [[105, 3]]},  # count mismatch
    {"version": 1, "total_build_times": 0, "abandoned": 2, "bins": []},
    {"version": 1, "total_build_times": 2, "abandoned": 0, "bins": [[0, 2]]},
    {"version": 9, "total_build_times": 0, "bins": []},
])
def test_corrupt_state_is_refused(state):
    cbt = CircuitBuildTimes()
    with pytest.raises(ValueError):
        cbt.load_state(state)
    assert cbt.total_build_times == 0


# -- the circuit manager's timeout: learned, fixed, or disabled by the consensus ------------------------

async def test_manager_timeout_learned_fixed_or_disabled(tmp_path):
    from onionp2p.client.circmgr import CircuitManager
    from onionp2p.client.client import OnionClient
    from onionp2p.client.guards import GuardSet

    params: dict[str, int] = {}
    client = OnionClient()
    client.consensus_params = lambda: params
    mgr = CircuitManager(client, list, GuardSet(tmp_path / "guards.json"),
                         ClientConfig(circuit_build_timeout=7))
    assert mgr.learning() and mgr.current_build_timeout == 7  # the initial timeout, until learned
    mgr.build_timeout = 30  # SETCONF CircuitBuildTimeout
    assert mgr.current_build_timeout == 30
    for t in pareto_times(random.Random(1), 600, 3.0, 100):
        mgr.cbt.circuit_built(t)
    assert mgr.cbt.have_computed_timeout
    assert mgr.current_build_timeout == mgr.cbt.timeout_ms / 1000 < 30
    params = {"cbtdisabled": 1}  # a new consensus turns learning off: the configured value
    assert not mgr.learning() and mgr.current_build_timeout == 30
    params = {}
    mgr.configure(ClientConfig(circuit_build_timeout=9, learn_circuit_build_timeout=False))
    assert not mgr.learning() and mgr.current_build_timeout == 9
    await client.close()


# -- a real client learns --------------------------------------------------------------------------------

async def test_client_learns_timeout_and_reports_it(exit_relays, tmp_path):
    """cbtmincircs=3 through the consensus parameters: after three builds the learned
    timeout replaces the initial 60 s, stem sees BUILDTIMEOUT_SET COMPUTED, and the history
    is saved in the data dir and loaded by the next start."""
    from stem.control import Controller, EventType

    statuses = [RouterStatus(r.info(), RELAY_FLAGS, bandwidth=1000 + i) for i, r in enumerate(exit_relays)]
    params = {"cbtmincircs": 3, "cbtmintimeout": 1500}
    cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=tmp_path / "client",
                       socks_address=("127.0.0.1", 0), control_port=0, enforce_distinct_subnets=False,
                       preemptive_circuits=2, log_level="warning")
    node = ClientNode(cfg, routers=lambda: statuses, params=lambda: params)
    await node.listen()
    events: list = []
    lock = threading.Lock()

    def on_event(ev):
        with lock:
            events.append(ev)

    def connect():
        c = Controller.from_port(port=node.control_port)
        c.authenticate()
        c.add_event_listener(on_event, EventType.BUILDTIMEOUT_SET)
        return c

    ctl = await asyncio.to_thread(connect)
    try:
        assert node.circmgr.current_build_timeout == 60
        await node.start(ready_timeout=30)
        mgr = node.circmgr
        for _ in range(20):  # more builds: retire the clean ones
            if mgr.cbt.total_build_times >= 3:
                break
            mgr.new_identity()
            await wait_for(lambda: any(c.state == "built" for c in node.client.circuits.values())
                           or mgr.cbt.total_build_times >= 3, timeout=20, what="a build")
            await asyncio.sleep(0.2)
        assert mgr.cbt.have_computed_timeout
        assert 1.5 <= mgr.current_build_timeout < 60
        assert mgr.current_build_timeout == mgr.cbt.timeout_ms / 1000
        # the estimator hears when bytes last came from the network (its liveness input)
        assert 0 < mgr.cbt.network_last_live <= node.client.last_read and mgr.cbt.network_check_live()

        def last_event():
            with lock:
                return events[-1] if events else None

        # stem parsed our event; its values are the estimator's
        await wait_for(lambda: last_event() is not None and last_event().timeout == int(mgr.cbt.timeout_ms),
                       timeout=10, what="BUILDTIMEOUT_SET with the learned timeout")
        ev = last_event()
        assert ev.set_type == "COMPUTED" and ev.total_times >= 3 and ev.timeout >= 1500
        assert ev.quantile == pytest.approx(0.8) and ev.xm == mgr.cbt.xm and ev.alpha > 0
        assert ev.close_timeout == int(mgr.cbt.close_ms)
        # tor's LearnCircuitBuildTimeout: off, the configured CircuitBuildTimeout applies
        assert await asyncio.to_thread(ctl.get_conf, "LearnCircuitBuildTimeout") == "1"
        await asyncio.to_thread(ctl.set_conf, "LearnCircuitBuildTimeout", "0")
        assert mgr.current_build_timeout == 60
        assert await asyncio.to_thread(ctl.get_conf, "CircuitBuildTimeout") == "60"
        total = mgr.cbt.total_build_times
    finally:
        await close_controller(ctl)
        await node.stop()
    saved = json.loads((tmp_path / "client" / "build_times.json").read_text())
    assert saved["total_build_times"] == total
    again = ClientNode(cfg, routers=lambda: statuses, params=lambda: params)
    assert again.circmgr.cbt.total_build_times == total
    assert again.circmgr.cbt.have_computed_timeout


class SlowThirdHopCircuit(OrCircuit):
    """A real relay circuit that, at the first hop and while ``relay.delay`` is set, holds
    back the first relay cell it passes toward the client: the middle's EXTENDED2 for the
    third hop (the guard answers the second hop's EXTEND2 itself)."""

    def relay_run(self, chan, data, start, count):
        delay = self.relay.delay
        if delay and chan is not self.prev_chan and self.prev_chan.peer is None:
            self._back = getattr(self, "_back", 0) + 1
            if self._back == 1:
                held = bytes(data[start:start + count * 514])
                asyncio.get_running_loop().call_later(
                    delay, lambda: self.closed or OrCircuit.relay_run(self, chan, held, 0, count))
                return
        super().relay_run(chan, data, start, count)


class SlowRelay(Relay):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.delay = 0.0

    def new_circuit(self, chan, circ_id, crypto, params=None, cc=None):
        return SlowThirdHopCircuit(self, chan, circ_id, crypto, params, cc)


async def test_learned_timeout_applies_and_slow_circuits_are_measured(tmp_path):
    """After learning (cbtmincircs=3) the timeout is cbtmintimeout (0.5 s) instead of the
    initial 60 s: a third hop held back 1.2 s makes builds time out, and those circuits go
    on building for measurement (close_ms >= cbtinitialtimeout = 5 s): their full time is
    recorded, they count as timeouts, and no stream is given them."""
    relays = []
    for i in range(3):
        r = SlowRelay(RelayKeys.load_or_create(tmp_path / f"s{i}" / "keys"),
                      relay_config(tmp_path / f"s{i}", nickname=f"s{i}", exit_reject_private=False,
                                   extend_allow_private=True,
                                   exit_policy=ExitPolicy.parse("accept *:*", reject_private=False)))
        await r.start()
        relays.append(r)
    statuses = [RouterStatus(r.info(), RELAY_FLAGS, bandwidth=1000) for r in relays]
    params = {"cbtmincircs": 3, "cbtmintimeout": 500, "cbtinitialtimeout": 5000}
    cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=tmp_path / "client",
                       socks_address=("127.0.0.1", 0), control_port=None, enforce_distinct_subnets=False,
                       preemptive_circuits=2, log_level="warning")
    node = ClientNode(cfg, routers=lambda: statuses, params=lambda: params)
    try:
        await node.start(ready_timeout=30)
        mgr, cbt = node.circmgr, node.circmgr.cbt
        for _ in range(20):
            if cbt.have_computed_timeout:
                break
            mgr.new_identity()
            await asyncio.sleep(0.3)
        assert cbt.have_computed_timeout and mgr.current_build_timeout == 0.5 and cbt.close_ms >= 5000
        built: set[int] = set()
        node.client.events.add(lambda ev: ev.kind == "built" and built.add(ev.circuit_id))
        for r in relays:
            r.delay = 1.2
        mgr.new_identity()
        await wait_for(lambda: any(1150 <= t < 5000 for t in cbt.times), timeout=20,
                       what="a measured slow build")
        assert cbt.num_circ_timeouts >= 1 and cbt.network_check_live()
        # a measured circuit is closed once built, never managed: no stream is ever given it
        measured = set(built)
        assert measured and not measured & {i.id for i in mgr.circuits()}
        await wait_for(lambda: not measured & set(node.client.circuits), timeout=10,
                       what="measured circuits closed")
    finally:
        await node.stop()
        for r in relays:
            await r.stop()
