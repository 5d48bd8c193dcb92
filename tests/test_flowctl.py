"""SENDME window bookkeeping (onionp2p.proto.flowctl)."""

import pytest

from onionp2p.errors import DigestMismatch, ProtocolError
from onionp2p.proto.congestion import CCParams
from onionp2p.proto.flowctl import DeliverWindow, DrainRate, PackageWindow, n_count_ewma


def digest(i: int) -> bytes:
    return i.to_bytes(20, "big")


def run_pair(cells: int):
    """Sender and receiver exchanging `cells` DATA cells with authenticated circuit SENDMEs."""
    pkg, dlv = PackageWindow.circuit(), DeliverWindow.circuit()
    sent = 0
    sendmes = 0
    pending = []
    while sent < cells:
        if not pkg.can_send():
            # the receiver's SENDMEs arrive
            for d in pending:
                pkg.on_sendme(d)
            pending.clear()
            assert pkg.can_send()
        sent += 1
        pkg.on_data_sent(digest(sent))
        assert dlv.on_data_received() == dlv.sendme_due()  # it says what sendme_due says
        while dlv.sendme_due():
            pending.append(digest(sent))  # the receiver echoes the digest of the triggering cell
            dlv.on_sendme_sent()
            sendmes += 1
    return sent, sendmes


def test_authenticated_sendmes_match_over_many_windows():
    sent, sendmes = run_pair(10_000)
    assert sent == 10_000 and sendmes == 100


def test_sender_stops_after_1000_cells_without_sendme():
    pkg = PackageWindow.circuit()
    for i in range(1000):
        assert pkg.can_send()
        pkg.on_data_sent(digest(i + 1))
    assert not pkg.can_send()


def test_wrong_digest_is_detected():
    pkg = PackageWindow.circuit()
    for i in range(100):
        pkg.on_data_sent(digest(i + 1))
    with pytest.raises(DigestMismatch):
        pkg.on_sendme(digest(99))


def test_missing_digest_and_unexpected_sendme():
    pkg = PackageWindow.circuit()
    with pytest.raises(ProtocolError):
        pkg.on_sendme(digest(1))  # nothing outstanding: would exceed 1000
    for i in range(150):
        pkg.on_data_sent(digest(i + 1))
    with pytest.raises(DigestMismatch):
        pkg.on_sendme(None)


def test_stream_windows_are_unauthenticated():
    pkg, dlv = PackageWindow.stream(), DeliverWindow.stream()
    for _ in range(50):
        pkg.on_data_sent()
        dlv.on_data_received()
    assert dlv.sendme_due()
    dlv.on_sendme_sent()
    assert not dlv.sendme_due()
    pkg.on_sendme()
    assert pkg.window == 500


def test_deliver_window_overrun_is_violation():
    dlv = DeliverWindow.stream()
    for _ in range(500):
        dlv.on_data_received()
    with pytest.raises(ProtocolError):
        dlv.on_data_received()


# --- XON's advisory drain rate (tor's flow_control_decide_xon) ---------------------------------

CELLS_500 = 500 * 498  # cc_xon_rate's default in bytes: 249,000


def test_n_count_ewma_is_tors():
    assert n_count_ewma(300, 0, 2) == 300  # no average yet: the sample
    assert n_count_ewma(300, 600, 2) == (2 * 300 + 1 * 600) // 3 == 400
    assert n_count_ewma(7, 100, 100) == (14 + 99 * 100) // 101


def test_first_sample_is_bytes_per_millisecond_over_the_period():
    """kbps_ewma is KB/s = bytes * 1000 / µs (tor's compute_drain_rate), not bits."""
    d = DrainRate()
    assert d.update(0, 1000, now=10.0, xoff_sent=False) is None  # the sink holds data: a period starts
    assert d.start_us == 10_000_000 and d.ewma == 0
    assert d.update(CELLS_500, 5, now=10.5, xoff_sent=False) is None  # not more than 500 cells yet
    assert d.ewma == 0
    assert d.update(1, 5, now=11.0, xoff_sent=False) is None  # 249,001 bytes in 1 s: a sample
    assert d.ewma == (CELLS_500 + 1) * 1000 // 1_000_000 == 249
    assert d.start_us is None and d.drained == 0 and d.prev_drained == CELLS_500 + 1


def test_later_samples_use_the_previous_periods_bytes_as_tor_does():
    d = DrainRate()
    d.update(0, 1, now=0.0, xoff_sent=False)
    d.update(300_000, 1, now=1.0, xoff_sent=False)
    assert d.ewma == 300
    d.update(0, 1, now=2.0, xoff_sent=False)  # a new period (start was cleared)
    d.update(600_000, 1, now=2.5, xoff_sent=False)  # 600,000 now, but tor divides 300,000 by 0.5 s
    sample = 300_000 * 1000 // 500_000
    assert d.ewma == n_count_ewma(sample, 300, 2) == (2 * 600 + 300) // 3


def test_xoff_clears_and_xon_sends_the_average():
    d = DrainRate()
    d.sink_full(received=0, buffered=CELLS_500, now=0.0)
    assert d.ewma == 0 and d.start_us == 0  # a drain period started at t = 0
    # the sink wrote what it held and the 100,000 bytes that came after the XOFF, in 2 s
    rate = d.sink_drained(received=100_000, now=2.0)
    assert rate == (CELLS_500 + 100_000) * 1000 // 2_000_000 == 174
    assert d.last_sent == 174
    d.update(0, 5, now=3.0, xoff_sent=False)
    d.sink_full(received=100_000, buffered=CELLS_500, now=3.0)
    assert d.ewma == 0  # "considered wrong if we got all the way to XOFF"
    # less than cc_xon_rate drained since: no sample, the XON says 0 (none), as tor's would
    assert d.sink_drained(received=100_000, now=4.0) == 0


def test_a_rate_change_asks_for_an_advisory_xon_only_without_xoff():
    d = DrainRate()
    d.update(0, 1, now=0.0, xoff_sent=False)
    d.update(400_000, 1, now=1.0, xoff_sent=False)
    assert d.ewma == 400 and d.last_sent == 0
    d.xon_sent()  # an XON went out with 400
    d.update(0, 1, now=2.0, xoff_sent=False)
    got = d.update(300_000, 1, now=2.25, xoff_sent=False)  # 400,000 / 0.25 s: 1600 -> ewma 1200
    assert d.ewma == (2 * 1600 + 400) // 3 == 1200 and got == 1200 and d.last_sent == 1200
    d.update(0, 1, now=3.0, xoff_sent=False)
    got = d.update(300_000, 1, now=4.0, xoff_sent=True)  # an XOFF is outstanding: no advisory XON
    assert got is None and d.ewma == (2 * 300 + 1200) // 3 == 600
    # within 25 % of the last one sent: nothing
    d2 = DrainRate()
    d2.ewma, d2.last_sent = 1240, 1000
    assert not d2.changed()
    d2.ewma = 1251
    assert d2.changed()
    d2.ewma = 749
    assert d2.changed()


def test_an_empty_sink_doubles_the_rate_after_cc_xon_rate_bytes():
    d = DrainRate()
    d.ewma = d.last_sent = 100
    d.update(CELLS_500 - 1, 0, now=1.0, xoff_sent=False)
    assert d.ewma == 100  # not yet
    d.update(1, 0, now=2.0, xoff_sent=False)
    assert d.ewma == 200 and d.drained == 0 and d.prev_drained == CELLS_500


def test_limits_and_consensus_parameters():
    d = DrainRate()
    d.start_us, d.prev_drained = 1, 2**31  # too many bytes: the rate saturates
    assert d._sample(2) == 2**31 - 1
    d.prev_drained = 10
    assert d._sample(1) == 0  # no time passed (tor: a bug, no sample)
    assert d._sample(10_000_001) == 1  # at least 1
    d = DrainRate()
    d.drained = 2**32 - 10
    d.start_us = 1_000_000
    d.update(20, 1, now=3.0, xoff_sent=False)  # the count is halved, and its period with it,
    assert d.prev_drained == (2**32 - 10) // 2 + 20  # then sampled: far too fast, saturated
    assert d.ewma == 2**31 - 1 and d.start_us is None
    p = CCParams.from_consensus({"cc_xon_rate": 1, "cc_xon_change_pct": 200, "cc_xon_ewma_cnt": 1})
    d = DrainRate.from_params(p)
    assert (d.rate_bytes, d.change_pct, d.ewma_cnt) == (498, 99, 2)  # clamped to tor's bounds


def test_a_sink_that_resumes_half_full_counts_only_what_it_wrote():
    """A client's reader resumes (XON) with half its XOFF limit still held: that half was
    not written; the room it reports says so."""
    d = DrainRate(xon_rate_cells=1)
    d.sink_full(received=0, buffered=CELLS_500, now=0.0)
    rate = d.sink_drained(received=1000, now=1.0, room=CELLS_500 // 2)  # 124,500 held still
    written = CELLS_500 + 1000 - (CELLS_500 - CELLS_500 // 2)
    assert rate == written * 1000 // 1_000_000 == 125 and d._buffered_at_full == CELLS_500 - CELLS_500 // 2
    full = DrainRate(xon_rate_cells=1)  # the same sink reporting nothing: it is taken as empty
    full.sink_full(received=0, buffered=CELLS_500, now=0.0)
    assert full.sink_drained(received=1000, now=1.0) == (CELLS_500 + 1000) * 1000 // 1_000_000


def test_a_sink_that_keeps_up_advises_only_when_the_rate_moved():
    d = DrainRate()
    d.ewma = d.last_sent = 100
    for i in range(499):
        assert d.sink_took(498, now=1.0 + i) is None  # same rate: nothing to say
    assert d.ewma == 100
    assert d.sink_took(498, now=600.0) is None and d.ewma == 200  # 500 cells' worth: doubled
    assert d.sink_took(1, now=601.0) == 200 and d.last_sent == 200  # 100 % above: advised
    assert d.sink_took(1, now=602.0) is None


@pytest.mark.parametrize("start,increment,withheld", [(1000, 100, False), (500, 50, False), (500, 50, True),
                                                      (2000, 31, False), (1 << 30, 1 << 30, False)])
def test_runs_of_cells_take_the_windows_as_cell_by_cell(start: int, increment: int, withheld: bool) -> None:
    """run_room/take (the circuit core's runs of DATA) reach the same windows and SENDMEs
    due at the same cells as on_data_received, up to the cell that overruns the window."""
    for n in (1, 7, 31, 100, 600, 1200):
        one, run = DeliverWindow(start, increment), DeliverWindow(start, increment)
        due_one, due_run = [], []
        overrun_one = overrun_run = None
        for i in range(n):
            try:
                if one.on_data_received():
                    due_one.append(i)
                    if not withheld:
                        one.on_sendme_sent()
            except ProtocolError:
                overrun_one = i
                break
        i = 0
        while i < n:
            k = min(n - i, run.run_room())
            if k == 0:
                with pytest.raises(ProtocolError):
                    run.on_data_received()
                overrun_run = i
                break
            run.take(k)
            i += k
            if run.sendme_due():
                due_run.append(i - 1)
                if not withheld:
                    run.on_sendme_sent()
        # (withheld SENDMEs: due at every cell from the first due one on, and reported so)
        assert due_run == due_one
        assert (overrun_run, run.window) == (overrun_one, one.window)
