"""Channel (link) padding: tor's netflow padding as a pure state machine (padding-spec §2, specs/padding.md).

Theory of operation
-------------------
An ISP's routers summarise every TCP connection into netflow records, and they start a
new record for a connection that has been silent for longer than their inactivity timeout
(10 s and more on common routers). A client whose link to its guard carries nothing for a
while therefore leaves records that show exactly when it was active. Tor closes that gap by
sending a PADDING cell on a channel that has been idle for a random 1.5-9.5 s, in both
directions, on client<->guard links.

:class:`ChannelPadding` is that per-channel decision, with no clock and no I/O: the shell
(:mod:`onionp2p.net.channel`) tells it about traffic (:meth:`ChannelPadding.activity`)
and asks it, when its single timer fires, whether to send a PADDING cell now and when to
look again (:meth:`ChannelPadding.poll`). Traffic only records a time; the timer is not
moved on every cell, it fires at the old deadline, finds the channel was busy since, and
is re-armed from the last activity.

The idle timeout is drawn as tor draws it: the larger of two uniform draws in
``[low, high)`` milliseconds. Both ends pad, and the link goes quiet for the *smaller* of
the two ends' timeouts, so the max-of-two at each end puts the link's expected silence
near the middle of the range.

Who pads (tor's ``channelpadding_decide_to_pad_channel``):

* only channels used for circuits: a client's channel once a multi-hop circuit is launched
  on it (or only once it carried user traffic, when ``nf_pad_before_usage=0``); at a relay,
  a client's channel once a circuit from it goes on to a next hop;
* only if padding is enabled on the channel — by default on link protocol 5 and later;
  a PADDING_NEGOTIATE STOP from the peer turns it off, START on — or forced by the client
  option ``connection_padding = "1"``;
* at a relay, only channels to clients, unless the consensus sets ``nf_pad_relays=1``.

A relay clamps the timeouts a client asks for: never below the consensus ``nf_ito_low``,
and the high end never below the low end. The consensus bounds win over anything
negotiated (:func:`inactive_timeout_ms`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from onionp2p.proto.cells import PaddingNegotiate

__all__ = [
    "PaddingParams",
    "Usage",
    "Decision",
    "ChannelPadding",
    "inactive_timeout_ms",
    "client_padding",
    "relay_padding",
    "CONNECTION_PADDING_CHOICES",
    "MIN_LINK_VERSION",
]

#: channel padding needs link protocol 5 (tor's MIN_LINK_PROTO_FOR_CHANNEL_PADDING)
MIN_LINK_VERSION = 5
#: values of the client option connection_padding (tor's ConnectionPadding auto/0/1)
CONNECTION_PADDING_CHOICES = ("auto", "0", "1")

# name: (default, min, max) as tor reads them from the consensus (channelpadding.c); the
# bound of nf_ito_high is nf_ito_low from below, handled in from_consensus.
_ITO_MAX = 60000
_BOUNDS: dict[str, tuple[int, int, int]] = {
    "nf_ito_low": (1500, 0, _ITO_MAX),
    "nf_ito_high": (9500, 0, _ITO_MAX),
    "nf_ito_low_reduced": (9000, 0, _ITO_MAX),
    "nf_ito_high_reduced": (14000, 0, _ITO_MAX),
    "nf_conntimeout_relays": (3600, 60, 7 * 24 * 3600),
    "nf_conntimeout_clients": (1800, 60, 24 * 3600),
    "nf_pad_before_usage": (1, 0, 1),
    "nf_pad_relays": (0, 0, 1),
    "nf_pad_single_onion": (1, 0, 1),
}


def _param(params: Mapping[str, int], name: str, floor: int | None = None) -> int:
    """A consensus parameter, tor-style: missing or out of bounds -> default / clamped."""
    default, lo, hi = _BOUNDS[name]
    if floor is not None:
        lo = floor
        default = max(default, floor)
    value = params.get(name, default)
    return min(max(value, lo), hi)


@dataclass(frozen=True)
class PaddingParams:
    """The consensus parameters of channel padding (padding-spec §2.6), with tor's defaults."""

    nf_ito_low: int = 1500
    nf_ito_high: int = 9500
    nf_ito_low_reduced: int = 9000
    nf_ito_high_reduced: int = 14000
    nf_conntimeout_relays: int = 3600
    nf_conntimeout_clients: int = 1800
    nf_pad_before_usage: int = 1
    nf_pad_relays: int = 0
    nf_pad_single_onion: int = 1

    @classmethod
    def from_consensus(cls, params: Mapping[str, int]) -> PaddingParams:
        """Read from a consensus's ``params``; absent or out-of-range values are defaulted
        or clamped as tor does (a high end below its low end is raised to it)."""
        low = _param(params, "nf_ito_low")
        low_r = _param(params, "nf_ito_low_reduced")
        return cls(
            nf_ito_low=low,
            nf_ito_high=_param(params, "nf_ito_high", floor=low),
            nf_ito_low_reduced=low_r,
            nf_ito_high_reduced=_param(params, "nf_ito_high_reduced", floor=low_r),
            nf_conntimeout_relays=_param(params, "nf_conntimeout_relays"),
            nf_conntimeout_clients=_param(params, "nf_conntimeout_clients"),
            nf_pad_before_usage=_param(params, "nf_pad_before_usage"),
            nf_pad_relays=_param(params, "nf_pad_relays"),
            nf_pad_single_onion=_param(params, "nf_pad_single_onion"),
        )

    @property
    def disabled(self) -> bool:
        """``nf_ito_low = nf_ito_high = 0``: the consensus turned channel padding off."""
        return self.nf_ito_low == 0 and self.nf_ito_high == 0


class Usage(IntEnum):
    """How far a channel has been used (tor's channel_usage); only used channels are padded."""

    UNUSED = 0  # nothing, or only one-hop (directory) circuits
    FULL_CIRCS = 1  # a multi-hop circuit was built over it
    USER_TRAFFIC = 2  # that circuit carried RELAY (not only RELAY_EARLY) cells


def inactive_timeout_ms(params: PaddingParams, negotiated_low: int, negotiated_high: int,
                        rng: random.Random) -> int:
    """Milliseconds of silence after which a PADDING cell is due; 0 means never.

    The consensus range, raised to the negotiated one where that is set (both ends non-zero);
    a fixed value if the range is empty, else ``low + max(X1, X2)`` with X uniform in
    ``[0, high - low)`` (tor's draw).
    """
    low, high = params.nf_ito_low, params.nf_ito_high
    if params.disabled:
        return 0
    if negotiated_low and negotiated_high:
        low, high = max(low, negotiated_low), max(high, negotiated_high)
    if low >= high:
        return low
    span = high - low
    return low + max(rng.randrange(span), rng.randrange(span))


@dataclass(frozen=True)
class Decision:
    """What :meth:`ChannelPadding.poll` wants: send a PADDING cell now, and when to poll again
    (an absolute time in the caller's clock; None: no timer until something changes)."""

    send: bool
    next_at: float | None


class ChannelPadding:
    """Padding state of one channel. See the module docstring.

    ``is_client_channel``: the peer is a client (at a client, every channel counts as one:
    tor's ``CHANNEL_IS_CLIENT`` is true whenever we are not a relay). ``enabled``: padding
    was negotiated (or is on by link-protocol default). ``forced``: the client option
    ``connection_padding = "1"`` (pad even where the peer does not support it).
    """

    def __init__(self, params: PaddingParams, *, is_client_channel: bool, enabled: bool,
                 forced: bool = False, reduced: bool = False, rng: random.Random | None = None,
                 now: float = 0.0):
        self.params = params
        self.is_client_channel = is_client_channel
        self.enabled = enabled
        self.forced = forced
        self.usage = Usage.UNUSED
        self.rng = rng or random.SystemRandom()
        #: timeouts the peer negotiated (relay side) or our reduced ones (client side); 0 = none
        self.low_ms = params.nf_ito_low_reduced if reduced else 0
        self.high_ms = params.nf_ito_high_reduced if reduced else 0
        self.last_xfer = now
        self._deadline: float | None = None

    # -- events ---------------------------------------------------------------------------

    def activity(self, now: float) -> None:
        """A cell went out or came in (padding included): the idle clock restarts."""
        self.last_xfer = now
        self._deadline = None

    def use(self, usage: Usage) -> None:
        """The channel was used this far (never goes back)."""
        if usage > self.usage:
            self.usage = usage

    def negotiate(self, msg: PaddingNegotiate) -> None:
        """The peer's PADDING_NEGOTIATE (relay side; the caller checks that it may send one).

        START turns padding on, STOP off; the timeouts are kept in both cases, clamped as
        tor clamps them: low never below the consensus ``nf_ito_low``, high never below low.
        """
        self.enabled = msg.cmd == PaddingNegotiate.START
        self.low_ms = max(self.params.nf_ito_low, msg.ito_low_ms)
        self.high_ms = max(self.low_ms, msg.ito_high_ms)
        self._deadline = None

    # -- the decision ---------------------------------------------------------------------

    def wants_padding(self) -> bool:
        """Would this channel be padded when idle (usage, negotiation, channel kind)?"""
        if self.usage == Usage.UNUSED:
            return False
        if self.usage == Usage.FULL_CIRCS and not self.params.nf_pad_before_usage:
            return False
        if not self.enabled and not self.forced:
            return False
        return self.is_client_channel or bool(self.params.nf_pad_relays)

    def poll(self, now: float, *, busy: bool = False) -> Decision:
        """Called when the timer fires (or when something changed). ``busy``: cells are
        waiting to be written, so the channel is not idle."""
        if busy:
            self.activity(now)
        if not self.wants_padding():
            self._deadline = None
            return Decision(False, None)
        if self._deadline is None:
            timeout = inactive_timeout_ms(self.params, self.low_ms, self.high_ms, self.rng)
            if timeout == 0:
                return Decision(False, None)
            self._deadline = self.last_xfer + timeout / 1000.0
        if now < self._deadline:
            return Decision(False, self._deadline)
        # idle for the whole timeout: pad; the PADDING cell is itself traffic
        self.activity(now)
        timeout = inactive_timeout_ms(self.params, self.low_ms, self.high_ms, self.rng)
        self._deadline = now + timeout / 1000.0
        return Decision(True, self._deadline)


def client_padding(params: PaddingParams, *, peer_supports: bool, connection_padding: str = "auto",
                   reduced: bool = False, rng: random.Random | None = None,
                   now: float = 0.0) -> tuple[ChannelPadding, PaddingNegotiate | None]:
    """A client's padding for a new channel, and the PADDING_NEGOTIATE to send on it (or None).

    ``peer_supports``: the relay advertises ``Padding=2`` and the link is version 5 or later.
    ``connection_padding`` "0" asks the relay to stop and pads nothing; ``reduced`` asks the
    relay to stop and pads at the reduced rate ourselves (tor's ReducedConnectionPadding);
    otherwise nothing is sent: the relay pads the link at the consensus's rate by itself,
    and so do we. That is what tor's client does (channel_do_open_actions: PADDING_NEGOTIATE
    only to disable or reduce), so a guard cannot tell us from a tor client by this cell.
    "1" pads even towards a relay that does not support padding.
    """
    enabled = peer_supports and connection_padding != "0"
    state = ChannelPadding(params, is_client_channel=True, enabled=enabled,
                           forced=connection_padding == "1", reduced=reduced, rng=rng, now=now)
    if not peer_supports:
        return state, None
    if connection_padding == "0" or reduced:
        return state, PaddingNegotiate(PaddingNegotiate.STOP, 0, 0)
    return state, None


def relay_padding(params: PaddingParams, *, peer_is_client: bool, link_version: int,
                  rng: random.Random | None = None, now: float = 0.0) -> ChannelPadding:
    """A relay's padding for a new channel: on by default from link protocol 5 (as tor),
    towards clients only unless ``nf_pad_relays``; a client's PADDING_NEGOTIATE adjusts it."""
    return ChannelPadding(params, is_client_channel=peer_is_client, enabled=link_version >= MIN_LINK_VERSION,
                          rng=rng, now=now)
