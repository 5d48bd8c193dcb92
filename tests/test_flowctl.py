"""SENDME window bookkeeping (onionp2p.proto.flowctl)."""

import pytest

from onionp2p.errors import DigestMismatch, ProtocolError
from onionp2p.proto.flowctl import DeliverWindow, PackageWindow


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
        dlv.on_data_received()
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
