"""TOR_VEGAS congestion control on its own (onionp2p.proto.congestion; proposal 324).

The circuit core's use of it (negotiation, SENDMEs every 31 cells, XON/XOFF) is tested in
test_core.py; here the algorithm: RTT samples, the BDP estimate, slow start, the steady
state's alpha/beta/gamma/delta rules, the clock heuristics, and the consensus parameters.
"""

from __future__ import annotations

import os

import pytest

from onionp2p.errors import DigestMismatch
from onionp2p.proto.congestion import CCParams, Vegas, n_ewma


def send(v: Vegas, n: int, now: float) -> list[tuple[bytes, float]]:
    """Send ``n`` DATA cells at ``now``; the (digest, time) of those a SENDME will ack."""
    acked = []
    for _ in range(n):
        d = os.urandom(20)
        v.on_data_sent(d, now)
        if v.sent % v.inc == 0:
            acked.append((d, now))
    return acked


def test_n_ewma_is_protocol_324s_integer_form():
    assert n_ewma(100, 0, 2) == (2 * 100 + 0) // 3
    assert n_ewma(100, 40, 2) == (200 + 40) // 3
    assert n_ewma(1000, 100, 10) == (2000 + 900) // 11


def test_window_is_cwnd_minus_inflight_and_sendmes_take_inc_out_of_flight():
    v = Vegas(CCParams())
    assert v.window == 124 and v.inc == 31
    acks = send(v, 124, 0.0)
    assert v.window == 0 and not v.can_send() and len(acks) == 4
    v.on_sendme(acks[0][0], 0.1)
    assert v.inflight == 124 - 31


def test_sendme_must_echo_the_digest_of_the_acknowledged_cell():
    v = Vegas(CCParams())
    with pytest.raises(DigestMismatch, match="no cell was waiting"):
        v.on_sendme(os.urandom(20), 0.0)
    acks = send(v, 62, 0.0)
    with pytest.raises(DigestMismatch, match="does not match"):
        v.on_sendme(acks[1][0], 0.1)  # the second one's digest, out of order
    v = Vegas(CCParams())
    send(v, 31, 0.0)
    with pytest.raises(DigestMismatch):
        v.on_sendme(None, 0.1)


def test_rtt_samples_smooth_and_keep_the_minimum():
    v = Vegas(CCParams())
    acks = send(v, 124, 0.0)
    v.on_sendme(acks[0][0], 0.100)
    assert v.rtt_ewma == 100_000 and v.rtt_min == 100_000 and v.rtt_max == 100_000
    v.on_sendme(acks[1][0], 0.040)  # a faster sample: EWMA with N = cc_ewma_ss = 2
    assert v.rtt_ewma == n_ewma(40_000, 100_000, 2) and v.rtt_min == v.rtt_ewma
    v.on_sendme(acks[2][0], 0.300)
    assert v.rtt_max == 300_000 and v.rtt_min == n_ewma(40_000, 100_000, 2)
    assert v.samples == 3


def test_a_stalled_clock_gives_no_sample():
    v = Vegas(CCParams())
    acks = send(v, 124, 5.0)
    cwnd = v.cwnd
    v.on_sendme(acks[0][0], 5.0)  # zero RTT: the clock stalled
    assert v.samples == 0 and v.rtt_ewma == 0 and v.cwnd == cwnd
    assert v.inflight == 124 - 31  # the cells are still acknowledged


def test_slow_start_grows_by_sendme_inc_per_sendme_while_the_window_is_full():
    v = Vegas(CCParams())
    acks = send(v, v.window, 0.0)
    # the window is full at the first SENDME: +31 (cc_cwnd_inc_pct_ss 100 % of 31)
    v.on_sendme(acks.pop(0)[0], 0.05)
    assert v.cwnd == 124 + 31 and v.in_slow_start
    # a SENDME that finds the window less than 75 % used does not grow it
    v.on_sendme(acks.pop(0)[0], 0.05)
    assert v.cwnd == 124 + 31
    # a sender that keeps the window full grows it by 31 per SENDME
    for _ in range(10):  # every ack 50 ms after its cell: the RTT does not rise
        d, sent_at = acks.pop(0)
        acks += send(v, v.window, sent_at + 0.05)
        v.on_sendme(d, sent_at + 0.05)
    assert v.cwnd == 124 + 11 * 31 and v.in_slow_start
    # above cc_sscap_exit (600) growth is RFC 3742's: inc * sscap / (2 cwnd)
    v.cwnd = 1200
    assert v._ss_increment() == (31 * 600 + 1200) // (2 * 1200)


def test_slow_start_exit_and_steady_state_rules():
    p = CCParams()
    v = Vegas(p)
    # queue building: the smoothed RTT is twice the minimum, so BDP = cwnd / 2 and the
    # queue (cwnd - BDP) is far above gamma: slow start ends at BDP + gamma
    v.rtt_min, v.rtt_ewma, v.cwnd = 50_000, 100_000, 1000
    v.inflight = 1000
    v._update()
    assert not v.in_slow_start and v.cwnd == 500 + p.cc_vegas_gamma_exit
    # steady state, once per update period: queue above delta -> BDP + delta - inc
    v.cwnd, v.next_cc_event = 2000, 0
    v._update()
    assert v.cwnd == 1000 + p.cc_vegas_delta_exit - p.cc_cwnd_inc
    # queue between beta and delta -> one cell less
    v.rtt_min, v.rtt_ewma = 100_000, 100_000 * 1000 // (1000 - 280)  # queue ~280 (beta 248, delta 310)
    v.cwnd, v.next_cc_event = 1000, 0
    queue = 1000 - 1000 * v.rtt_min // v.rtt_ewma
    assert p.cc_vegas_beta_exit < queue <= p.cc_vegas_delta_exit
    v._update()
    assert v.cwnd == 999
    # queue below alpha with the window full -> one cell more
    v.rtt_ewma = v.rtt_min
    v.cwnd, v.inflight, v.next_cc_event = 1000, 1000, 0
    v._update()
    assert v.cwnd == 1001
    # not full (less than 75 % in flight): no growth
    v.cwnd, v.inflight, v.next_cc_event, v.cwnd_full = 1000, 100, 0, False
    v._update()
    assert v.cwnd == 1000
    # between updates nothing moves
    v.cwnd, v.inflight, v.next_cc_event = 1000, 1000, 5
    v._update()
    assert v.cwnd == 1000
    # never below cc_cwnd_min
    v = Vegas(CCParams(cc_vegas_alpha_exit=2, cc_vegas_beta_exit=5, cc_vegas_delta_exit=10))
    v.in_slow_start = False
    v.rtt_min, v.rtt_ewma, v.cwnd, v.next_cc_event = 10_000, 100_000, 130, 0
    v._update()  # queue 117 > delta 10: BDP 13 + 10 - 1 = 22, raised to the minimum
    assert v.cwnd == 124


def test_slow_start_is_capped_at_ss_max():
    v = Vegas(CCParams(cc_ss_max=4991))
    v.rtt_min = v.rtt_ewma = 50_000
    v.cwnd, v.inflight = 4990, 4990
    v._update()  # +2 (RFC 3742 above the cap) would pass cc_ss_max
    assert v.cwnd == 4991 and not v.in_slow_start


def test_a_blocked_channel_is_a_congestion_signal():
    p = CCParams()
    v = Vegas(p)
    v.rtt_min = v.rtt_ewma = 50_000
    v.cwnd, v.inflight, v.blocked = 800, 800, True
    v._update()  # in slow start: leave it at BDP + gamma even though the RTT did not rise
    assert not v.in_slow_start and v.cwnd == 800 + p.cc_vegas_gamma_exit
    v.next_cc_event = 0
    v._update()  # after it: one cell less per update while blocked
    assert v.cwnd == 800 + p.cc_vegas_gamma_exit - 1


def test_at_cwnd_min_the_minimum_rtt_is_reset_toward_the_current_one():
    v = Vegas(CCParams())
    acks = send(v, 124, 0.0)
    v.on_sendme(acks[0][0], 0.010)
    v.in_slow_start, v.cwnd = False, 124  # starving at cwnd_min
    v.on_sendme(acks[1][0], 0.200)
    assert v.rtt_min == v.rtt_ewma  # cc_rtt_reset_pct 100: the larger of the two


def test_after_slow_start_a_huge_rtt_jump_is_not_a_sample():
    v = Vegas(CCParams())
    acks = send(v, 124, 0.0)
    v.on_sendme(acks[0][0], 0.000_1)  # 100 µs
    v.in_slow_start = False
    before = (v.rtt_ewma, v.samples)
    v.on_sendme(acks[1][0], 600.0)  # 6,000,000 times longer: a clock jump or a suspended peer
    assert (v.rtt_ewma, v.samples) == before


def test_consensus_parameters_are_clamped_and_cannot_turn_cc_off():
    p = CCParams.from_consensus({"cc_sendme_inc": 0, "cc_vegas_alpha_exit": 5000, "cc_cwnd_min": 10,
                                 "cc_alg": 0, "unrelated": 7, "cc_ss_max": 100})
    assert p.cc_sendme_inc == 1 and p.cc_vegas_alpha_exit == 1000 and p.cc_cwnd_min == 31
    assert p.cc_ss_max == 500
    assert p.cc_alg == 2 and p.enabled  # tor 0.4.9.12: no downgrade by consensus
    assert not CCParams.from_consensus({"cc_alg": 2}, enabled=False).enabled
    assert CCParams.from_consensus({}) == CCParams()
    # the initial window is never below the minimum
    assert CCParams.from_consensus({"cc_cwnd_min": 500, "cc_cwnd_init": 200}).cc_cwnd_init == 500
    assert CCParams().xoff_bytes(exit_side=True) == 500 * 498
