"""Path bias detection (path-spec §7; onionp2p/client/pathbias.py, specs/pathsel.md).

Unit tests feed the pure accounting synthetic circuit sequences, one per threshold and for
the scaling; the integration test runs a real client node whose primary guard is a real
in-process relay that destroys the circuits built through it, and watches the guard get
flagged and, with pb_dropguards=1, dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time

import pytest
from conftest import RELAY_FLAGS, relay_config, wait_for

from onionp2p.client.guards import GuardSet
from onionp2p.client.node import ClientNode
from onionp2p.client.pathbias import GuardPathBias, PathBias, PBParams
from onionp2p.config import ClientConfig
from onionp2p.proto.cells import DestroyReason
from onionp2p.proto.directory import RouterStatus
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.relay.circuit import OrCircuit
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

G = "A" * 40


class Harness:
    """One guard's record and a PathBias over it; ``run(outcomes)`` plays circuits."""

    def __init__(self, **params):
        self.pb = GuardPathBias()
        self.changes = 0
        self.bias = PathBias(lambda fp: self.pb if fp == G else None, PBParams(**params),
                             changed=self._changed, describe=lambda fp: "guard0 ($" + fp + ")")
        self.ids = itertools.count()

    def _changed(self, fp: str) -> None:
        self.changes += 1

    def circuit(self, outcome: str) -> bool:
        """Play one circuit: "collapse" (built, destroyed by the network), "ok" (built,
        used, closed by us), "fail" (never built), "unusable" (built, stream tried, none
        succeeded), "idle" (built, closed by us unused). False if the guard refused it."""
        cid = next(self.ids)
        if not self.bias.build_attempt(cid, G):
            return False
        if outcome == "fail":
            self.bias.closed(cid, remote=True)
            return True
        self.bias.build_success(cid)
        if outcome in ("ok", "unusable"):
            self.bias.use_attempt(cid)
        if outcome == "ok":
            self.bias.use_success(cid)
        self.bias.closed(cid, remote=outcome == "collapse")
        return True

    def run(self, pattern: list[str], n: int) -> None:
        for i in range(n):
            self.circuit(pattern[i % len(pattern)])


def test_counts_follow_tors_states():
    h = Harness()
    h.run(["ok", "collapse", "fail", "unusable", "idle"], 5)
    pb = h.pb
    assert (pb.circ_attempts, pb.circ_successes) == (5, 4)
    assert (pb.successful_circuits_closed, pb.collapsed_circuits, pb.unusable_circuits) == (2, 1, 1)
    assert (pb.use_attempts, pb.use_successes) == (2, 1)
    # an open built circuit counts as a success (benefit of the doubt) until it ends
    h.bias.build_attempt("open", G)
    h.bias.build_success("open")
    assert h.bias.close_success_count(G, pb) == 3
    h.bias.timeout("open")
    assert pb.timeouts == 1
    # a sequence of events on a relay that is no sampled guard changes nothing
    assert h.bias.build_attempt("x", "B" * 40) and h.changes > 0


@pytest.mark.parametrize(("pattern", "level"), [
    (["collapse", "ok", "ok", "collapse", "ok"], "notice"),             # 60 % < pb_noticepct 70
    (["collapse", "ok", "collapse", "ok", "collapse"], "warned"),       # 40 % < pb_warnpct 50
    (["collapse", "collapse", "ok", "collapse", "collapse"], "extreme"),  # 20 % < pb_extremepct 30
    (["ok", "ok", "collapse", "ok", "ok"], None),                       # 80 %: fine
])
def test_close_rate_thresholds(pattern, level, caplog):
    h = Harness(pb_mincircs=20)
    with caplog.at_level(logging.INFO):
        h.run(pattern, 20)  # exactly pb_mincircs attempts: not yet judged ("more than")
        assert not (h.pb.noticed or h.pb.warned or h.pb.extreme)
        h.run(pattern, 30)
    flags = {"notice": h.pb.noticed, "warned": h.pb.warned, "extreme": h.pb.extreme}
    assert [k for k, v in flags.items() if v] == ([level] if level else [])
    assert not h.pb.disabled  # pb_dropguards is 0 by default
    text = caplog.text
    if level == "notice":
        assert "Guard guard0 ($" + G + ") is failing more circuits than usual." in text
    elif level == "warned":
        assert "is failing a very large amount of circuits. Most likely this means the network is " \
               "overloaded, but it could also mean an attack" in text
    elif level == "extreme":
        assert "is failing an extremely large amount of circuits. This could indicate a route " \
               "manipulation attack" in text
        assert text.count("extremely large amount") == 1  # once per guard
    if level:
        assert "Success counts are " in text and "For reference, your timeout cutoff is 60 seconds." in text


def test_dropguards_disables_and_refuses():
    h = Harness(pb_mincircs=10, pb_dropguards=1)
    h.run(["ok", "collapse", "collapse", "collapse", "collapse"], 11)  # 20 % after 11 attempts
    assert not h.pb.disabled
    assert h.circuit("ok") is False  # judged at the 12th attempt: disabled, circuit refused
    assert h.pb.disabled and h.pb.circ_attempts == 11
    assert h.circuit("ok") is False


def test_use_rate_thresholds():
    h = Harness(pb_minuse=10)
    h.run(["ok", "ok", "ok", "unusable"], 40)  # 75 % < pb_noticeusepct 80
    assert h.pb.use_noticed and not h.pb.use_extreme
    h = Harness(pb_minuse=10, pb_dropguards=1)
    h.run(["ok", "unusable"], 12)  # 50 % < pb_extremeusepct 60
    assert h.pb.disabled
    h = Harness(pb_minuse=10)
    h.run(["ok", "unusable"], 12)
    assert h.pb.use_extreme and not h.pb.disabled


def test_scaling_keeps_ratios_and_spares_open_circuits():
    h = Harness(pb_scalecircs=10, pb_mincircs=1000)
    h.run(["ok", "collapse"], 10)
    h.bias.build_attempt("open", G)
    h.bias.build_success("open")
    assert h.pb.circ_attempts == 11
    # attempts 11 > 10: scale by 1/2, leaving out the open circuits (as in tor, the new one,
    # already BUILD_ATTEMPTED, and the open built one), then count the new attempt
    h.circuit("ok")
    pb = h.pb
    assert pb.circ_attempts == pytest.approx((11 - 2) / 2 + 2 + 1)
    assert pb.circ_successes == pytest.approx((11 - 1) / 2 + 1 + 1)
    assert pb.successful_circuits_closed == pytest.approx(5 / 2 + 1)
    assert pb.collapsed_circuits == pytest.approx(5 / 2)
    # pb_multfactor / pb_scalefactor: 3/4
    h = Harness(pb_scalecircs=10, pb_mincircs=1000, pb_multfactor=3, pb_scalefactor=4)
    h.run(["ok"], 12)
    assert h.pb.circ_attempts == pytest.approx((11 - 1) * 0.75 + 1 + 1)
    # use counts scale past pb_scaleuse
    h = Harness(pb_scaleuse=10, pb_minuse=1000)
    h.run(["ok", "unusable"], 12)
    assert h.pb.use_attempts == pytest.approx(11 / 2 + 1)
    assert h.pb.use_successes == pytest.approx(6 / 2)  # the 12th was unusable


def test_params_from_consensus_and_persisted_record(tmp_path):
    assert PBParams.from_consensus({}) == PBParams()
    p = PBParams.from_consensus({"pb_mincircs": 1, "pb_noticepct": 300, "pb_multfactor": 9, "pb_dropguards": 5})
    assert (p.pb_mincircs, p.pb_noticepct, p.pb_multfactor, p.pb_dropguards) == (5, 100, 2, 1)
    state = tmp_path / "guards.json"
    state.write_text(json.dumps({"version": 1, "guards": [
        {"fingerprint": G, "nickname": "g", "added_at": time.time(),
         "path_bias": {"circ_attempts": 12.5, "collapsed_circuits": 3, "disabled": True}}]}))
    guards = GuardSet(state)
    pb = guards.path_bias(G)
    assert pb is not None and pb.circ_attempts == 12.5 and pb.disabled
    pb.use_attempts = 4
    guards.mark_dirty()
    guards.save_if_dirty()
    again = GuardSet(state).path_bias(G)
    assert again is not None and again.use_attempts == 4 and again.collapsed_circuits == 3 and again.disabled


def test_saved_counts_checked_against_dropguards():
    for drop, want in ((0, False), (1, True)):
        h = Harness(pb_dropguards=drop, pb_mincircs=9)
        h.pb = GuardPathBias(circ_attempts=10, circ_successes=10, successful_circuits_closed=2,
                             collapsed_circuits=8)
        h.bias.check_loaded(G, h.pb)
        assert h.pb.disabled is want
    h = Harness(pb_dropguards=1, pb_mincircs=9, pb_minuse=9)
    h.pb = GuardPathBias(circ_attempts=10, successful_circuits_closed=4, use_attempts=10, use_successes=5)
    h.bias.check_loaded(G, h.pb)  # close rate 40 % is fine, use rate 50 % < 60 %
    assert h.pb.disabled
    h = Harness(pb_dropguards=1)  # below pb_mincircs (150) attempts nothing is judged
    h.pb = GuardPathBias(circ_attempts=10, collapsed_circuits=10)
    h.bias.check_loaded(G, h.pb)
    assert not h.pb.disabled


async def test_manager_checks_saved_counts_on_new_params(tmp_path):
    from onionp2p.client.circmgr import CircuitManager
    from onionp2p.client.client import OnionClient

    state = tmp_path / "guards.json"
    state.write_text(json.dumps({"version": 1, "guards": [
        {"fingerprint": G, "nickname": "g", "added_at": time.time(),
         "path_bias": {"circ_attempts": 40, "circ_successes": 40, "successful_circuits_closed": 3,
                       "collapsed_circuits": 37}}]}))
    params: dict[str, int] = {}
    client = OnionClient()
    client.consensus_params = lambda: params
    mgr = CircuitManager(client, list, GuardSet(state), ClientConfig())
    mgr.learning()  # reads the parameters
    assert not mgr.guards.path_bias(G).disabled  # reported only: pb_dropguards is 0
    params = {"pb_dropguards": 1, "pb_mincircs": 20}
    mgr.learning()
    assert mgr.guards.path_bias(G).disabled
    mgr.guards.save_if_dirty()
    assert json.loads(state.read_text())["guards"][0]["path_bias"]["disabled"] is True
    await client.close()


# -- a guard that kills the circuits built through it ----------------------------------------------

class CollapsingCircuit(OrCircuit):
    """A real relay circuit that, at the first hop, destroys the circuit toward the client
    once it is built (the second EXTENDED2 passed back), except every ``spare``-th one."""

    def relay_run(self, chan, data, start, count):
        super().relay_run(chan, data, start, count)
        relay = self.relay
        if chan is not self.prev_chan and self.prev_chan.peer is None and not self.closed \
                and self.cells_backward >= 2 and not getattr(self, "_doomed", False):
            self._doomed = True
            relay.built += 1
            if relay.built % relay.spare:
                asyncio.get_running_loop().call_later(0.2, self._kill)

    def _kill(self):
        if not self.closed:
            self.relay.destroyed += 1
            self.destroy(DestroyReason.FINISHED, "path bias test")


class CollapsingRelay(Relay):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.built = self.destroyed = 0
        self.spare = 10

    def new_circuit(self, chan, circ_id, crypto, params=None, cc=None):
        return CollapsingCircuit(self, chan, circ_id, crypto, params, cc)


@pytest.mark.parametrize("drop", [0, 1])
async def test_guard_destroying_built_circuits_is_flagged_and_dropped(drop, tmp_path, caplog):
    """pb_dropguards=0: the guard is reported and kept (tor's default); 1: it is dropped."""
    relays = []
    for i, cls in enumerate((CollapsingRelay, Relay, Relay)):
        relay = cls(RelayKeys.load_or_create(tmp_path / f"r{i}" / "keys"),
                    relay_config(tmp_path / f"r{i}", nickname=f"r{i}", exit_reject_private=False,
                                 extend_allow_private=True,
                                 exit_policy=ExitPolicy.parse("accept *:*", reject_private=False)))
        await relay.start()
        relays.append(relay)
    bad, good, _other = relays
    node = None
    try:
        flags = [RELAY_FLAGS, RELAY_FLAGS, RELAY_FLAGS - {"Guard"}]
        statuses = [RouterStatus(r.info(), f, bandwidth=1000) for r, f in zip(relays, flags, strict=True)]
        bad_fp, good_fp = statuses[0].fingerprint, statuses[1].fingerprint
        data = tmp_path / "client"
        data.mkdir()
        now = time.time()
        (data / "guards.json").write_text(json.dumps({"version": 1, "guards": [
            {"fingerprint": bad_fp, "nickname": "r0", "added_at": now},
            {"fingerprint": good_fp, "nickname": "r1", "added_at": now}]}))
        params = {"pb_mincircs": 5, "pb_dropguards": drop}
        cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=data, socks_address=("127.0.0.1", 0),
                           control_port=None, enforce_distinct_subnets=False, preemptive_circuits=2,
                           num_primary_guards=1, log_level="warning")
        node = ClientNode(cfg, routers=lambda: statuses, params=lambda: params)
        assert node.guards.primary(statuses) == [bad_fp]
        with caplog.at_level(logging.WARNING, logger="onionp2p.pathbias"):
            await node.listen()
            await node.start(ready_timeout=30)
            pb = node.guards.path_bias(bad_fp)
            if not drop:
                await wait_for(lambda: pb.extreme, timeout=60, what="the bad guard reported")
                assert "Guard r0 ($" + bad_fp + ") is failing an extremely large amount of circuits. This " \
                       "could indicate a route manipulation attack, extreme network overload, or a bug." \
                       in caplog.text
                assert not pb.disabled and node.guards.primary(statuses) == [bad_fp]
                return
            await wait_for(lambda: pb.disabled, timeout=60, what="the bad guard disabled for path bias")
        assert bad.destroyed >= 4 and pb.collapsed_circuits >= 4
        assert "Guard r0 ($" + bad_fp + ") is failing an extremely large amount of circuits. To avoid " \
               "potential route manipulation attacks, onionp2p has disabled use of this guard." in caplog.text
        # the guard set moved on: the other guard is primary, and new circuits go through it
        assert node.guards.primary(statuses) == [good_fp]
        node.circmgr.new_identity()
        circ = await node.circmgr.get_circuit(None)
        assert circ.path[0].rsa_id == good.keys.rsa_id_digest
        node.guards.save_if_dirty()
        saved = json.loads((data / "guards.json").read_text())["guards"]
        assert [g["path_bias"]["disabled"] for g in saved if g["fingerprint"] == bad_fp] == [True]
    finally:
        if node is not None:
            await node.stop()
        for r in relays:
            await r.stop()
