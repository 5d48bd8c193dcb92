"""SENDME flow control windows (tor-spec §7.4; proposal 289; specs/streams.md).

Theory of operation
-------------------
Only RELAY_DATA cells count. Each edge of a circuit keeps, per circuit and per
stream, a *package window* (how many DATA cells it may still send) and a *deliver
window* (how many it will still accept):

* circuit windows start at 1000 and move by 100; stream windows start at 500 and
  move by 50;
* the receiver sends a SENDME each time its deliver window has dropped by one
  increment, and grows the window again; a deliver window below zero means the peer
  ignored flow control, which is a protocol violation;
* the sender grows its package window by one increment per SENDME; a SENDME that
  would push the window above its start value is a protocol violation.

Circuit SENDMEs are *authenticated* (version 1): the sender remembers the running
digest of every 100th DATA cell it sends, and the receiver echoes the digest of the
cell that triggered its SENDME. A SENDME whose digest differs from the oldest one
remembered proves the peer did not really receive the cells, and kills the circuit.

These classes are pure bookkeeping: the caller passes digests in and acts on the
booleans and exceptions that come out.
"""

from __future__ import annotations

import hmac
from collections import deque

from onionp2p.errors import DigestMismatch, ProtocolError

__all__ = [
    "CIRCWINDOW_START",
    "CIRCWINDOW_INCREMENT",
    "STREAMWINDOW_START",
    "STREAMWINDOW_INCREMENT",
    "PackageWindow",
    "DeliverWindow",
]

CIRCWINDOW_START = 1000
CIRCWINDOW_INCREMENT = 100
STREAMWINDOW_START = 500
STREAMWINDOW_INCREMENT = 50


class PackageWindow:
    """The sending side: may we package another DATA cell?"""

    __slots__ = ("start", "increment", "window", "authenticated", "_digests")

    def __init__(self, start: int, increment: int, *, authenticated: bool = False):
        self.start = start
        self.increment = increment
        self.window = start
        self.authenticated = authenticated
        #: digests of the cells a SENDME must echo; made on the first one (only authenticated
        #: circuit windows ever remember one, and an empty deque is ~770 bytes per stream)
        self._digests: deque[bytes] | None = None

    @classmethod
    def circuit(cls) -> PackageWindow:
        return cls(CIRCWINDOW_START, CIRCWINDOW_INCREMENT, authenticated=True)

    @classmethod
    def stream(cls) -> PackageWindow:
        return cls(STREAMWINDOW_START, STREAMWINDOW_INCREMENT)

    def can_send(self) -> bool:
        return self.window > 0

    def needs_digest(self) -> bool:
        """True if the DATA cell about to be sent is one whose digest must be remembered."""
        return self.authenticated and self.window != self.start and (self.window - 1) % self.increment == 0

    def on_data_sent(self, digest: bytes | None = None, now: float = 0.0) -> None:
        """Account one DATA cell sent; ``digest`` is its running digest (needed when
        authenticated). ``now`` is for congestion control's interface (unused here)."""
        if self.window <= 0:
            raise ProtocolError("package window exhausted")  # caller bug; never network input
        if self.needs_digest():
            if digest is None:
                raise ValueError("authenticated window needs the cell digest")
            if self._digests is None:
                self._digests = deque()
            self._digests.append(bytes(digest))
        self.window -= 1

    def on_sendme(self, digest: bytes | None = None, now: float = 0.0) -> None:
        """Account a SENDME received from the peer (``now``: unused here).

        Raises:
            ProtocolError: the SENDME would overflow the window (nothing was outstanding).
            DigestMismatch: an authenticated SENDME echoes the wrong digest (or none).
        """
        if self.window + self.increment > self.start:
            raise ProtocolError("unexpected SENDME: window would exceed its start value")
        if self.authenticated:
            if not self._digests:
                raise DigestMismatch("SENDME received but no digest is outstanding")
            expected = self._digests.popleft()
            if digest is None or len(digest) != len(expected) or not hmac.compare_digest(expected, digest):
                raise DigestMismatch("SENDME v1 digest does not match the cell it acknowledges")
        self.window += self.increment


class DeliverWindow:
    """The receiving side: count DATA cells and say when to send a SENDME."""

    __slots__ = ("start", "increment", "window")

    def __init__(self, start: int, increment: int):
        self.start = start
        self.increment = increment
        self.window = start

    @classmethod
    def circuit(cls) -> DeliverWindow:
        return cls(CIRCWINDOW_START, CIRCWINDOW_INCREMENT)

    @classmethod
    def stream(cls) -> DeliverWindow:
        return cls(STREAMWINDOW_START, STREAMWINDOW_INCREMENT)

    def on_data_received(self) -> None:
        """Account one DATA cell; raise ProtocolError if the peer overran the window."""
        self.window -= 1
        if self.window < 0:
            raise ProtocolError("peer sent DATA beyond the flow-control window")

    def sendme_due(self) -> bool:
        """True while a SENDME should be sent (the window dropped by one increment or more)."""
        return self.window <= self.start - self.increment

    def on_sendme_sent(self) -> None:
        self.window += self.increment
