"""Which HSDirs hold a descriptor, and which time period and shared-random value to use
(rend-spec-v3 §2.2.3 [WHERE-HSDESC], §2.2.4 [FETCHUPLOADDESC]).

Theory of operation
-------------------
*The ring.* Every relay with the HSDir flag has a position on a ring of 256-bit numbers
(:func:`~onionp2p.proto.hs.blinding.hsdir_index`); each replica of a descriptor has one too
(:func:`~onionp2p.proto.hs.blinding.hs_index`). The relays responsible for replica ``r``
are the ``spread`` relays that follow its position, going round the ring, skipping relays
already chosen for a lower replica. A service stores at ``hsdir_spread_store`` (4) relays
per replica, a client fetches from one of the first ``hsdir_spread_fetch`` (3).

*Which period and SRV.* Time periods start at 12:00 UTC, shared-random values at 00:00
(with the usual one-hour voting interval; in general a protocol run lasts 24 voting
intervals and periods are offset by 12). Between a new SRV and the next period
(00:00-12:00) the current period was keyed to the *previous* SRV; between a new period and
the next SRV (12:00-24:00) to the *current* one. A client always fetches with the current
period and the SRV that belongs to it. A service keeps two descriptors so that clients
whose consensus is a little older or newer still find it: in 12:00-24:00 the previous
period with the previous SRV and the current period with the current SRV; in 00:00-12:00
the current period with the previous SRV and the next period with the current SRV.

Times are a consensus's ``valid-after``, passed in; nothing here reads the clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from onionp2p.proto.hs.blinding import DEFAULT_PERIOD_LENGTH, TimePeriod, hs_index, hsdir_index

__all__ = [
    "consensus_periods",
    "DEFAULT_N_REPLICAS",
    "DEFAULT_SPREAD_FETCH",
    "DEFAULT_SPREAD_STORE",
    "RingChoice",
    "client_fetch_choice",
    "in_period_between_tp_and_srv",
    "responsible_hsdirs",
    "service_upload_choices",
]

DEFAULT_N_REPLICAS = 2      # hsdir_n_replicas, 1..16
DEFAULT_SPREAD_STORE = 4    # hsdir_spread_store, 1..128
DEFAULT_SPREAD_FETCH = 3    # hsdir_spread_fetch, 1..128
_SR_ROUNDS = 24             # a shared-random protocol run: 12 commit + 12 reveal rounds


def responsible_hsdirs(hsdir_ids: Iterable[bytes], blinded: bytes, period: TimePeriod, srv: bytes, *,
                       n_replicas: int = DEFAULT_N_REPLICAS, spread: int = DEFAULT_SPREAD_STORE) -> list[bytes]:
    """The Ed25519 identities of the HSDirs for ``blinded``'s descriptor, replica by replica.

    ``hsdir_ids``: the identities of the relays with the HSDir flag. The result has no
    duplicates and at most ``n_replicas * spread`` entries (fewer on a small ring).
    """
    ring = sorted((hsdir_index(node, srv, period), node) for node in set(hsdir_ids))
    positions = [pos for pos, _ in ring]
    chosen: list[bytes] = []
    for replica in range(1, n_replicas + 1):
        start = bisect.bisect_right(positions, hs_index(blinded, replica, period))
        taken = 0
        for i in range(len(ring)):
            if taken == spread:
                break
            node = ring[(start + i) % len(ring)][1]
            if node in chosen:
                continue
            chosen.append(node)
            taken += 1
    return chosen


def consensus_periods(valid_after: float, fresh_until: float, params: Mapping[str, int] | None = None, *,
                      one_run: bool = False) -> tuple[int, int]:
    """``(voting interval in seconds, time period length in minutes)`` a consensus implies,
    for clients and services alike. The interval is fresh-until − valid-after (3600 if
    that is not positive); the period is one shared-random protocol run (24 intervals) with
    ``one_run`` (tor's TestingTorNetwork rule, and our networks' choice: specs/directory.md
    §4.2), else the ``hsdir-interval`` parameter (minutes, 30..14400, default a day)."""
    interval = int(fresh_until - valid_after) if fresh_until > valid_after else 3600
    if one_run:
        return interval, max(1, _SR_ROUNDS * interval // 60)
    value = (params or {}).get("hsdir-interval", DEFAULT_PERIOD_LENGTH)
    return interval, min(max(int(value), 30), 14400)


def in_period_between_tp_and_srv(valid_after: float, *, voting_interval: int = 3600,
                                 length: int = DEFAULT_PERIOD_LENGTH) -> bool:
    """True between the start of a time period and the next SRV (12:00-24:00 by default)."""
    run = _SR_ROUNDS * voting_interval
    srv_start = int(valid_after) // run * run
    offset = 12 * voting_interval // 60
    tp_start = TimePeriod.at(srv_start, length, offset).next().start
    return not srv_start <= valid_after < tp_start


@dataclass(frozen=True, slots=True)
class RingChoice:
    """A time period and which of the consensus's SRVs goes with it."""

    period: TimePeriod
    srv: bytes


def _period(valid_after: float, voting_interval: int, length: int) -> TimePeriod:
    return TimePeriod.at(valid_after, length, 12 * voting_interval // 60)


def client_fetch_choice(valid_after: float, srv_current: bytes, srv_previous: bytes, *,
                        voting_interval: int = 3600, length: int = DEFAULT_PERIOD_LENGTH) -> RingChoice:
    """The period and SRV a client fetches with (§2.2.4.1)."""
    tp = _period(valid_after, voting_interval, length)
    if in_period_between_tp_and_srv(valid_after, voting_interval=voting_interval, length=length):
        return RingChoice(tp, srv_current)
    return RingChoice(tp, srv_previous)


def service_upload_choices(valid_after: float, srv_current: bytes, srv_previous: bytes, *,
                           voting_interval: int = 3600,
                           length: int = DEFAULT_PERIOD_LENGTH) -> tuple[RingChoice, RingChoice]:
    """The (first, second) descriptors' periods and SRVs a service uploads with (§2.2.4.2)."""
    tp = _period(valid_after, voting_interval, length)
    if in_period_between_tp_and_srv(valid_after, voting_interval=voting_interval, length=length):
        return RingChoice(tp.prev(), srv_previous), RingChoice(tp, srv_current)
    return RingChoice(tp, srv_previous), RingChoice(tp.next(), srv_current)
