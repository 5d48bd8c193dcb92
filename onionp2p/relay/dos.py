"""Denial-of-service limits at relays: the pure bookkeeping (specs/dos.md).

Theory of operation
-------------------
A relay is a shared resource: one abusive client must not exhaust what every other
client needs (file descriptors, CPU for handshakes, memory). This module decides; the
relay (:mod:`onionp2p.relay.relay`) only asks it at a few points and acts on the answer.
Nothing here does I/O or reads a clock: every time-dependent call takes ``now`` (any
monotonic seconds), so the logic is tested exactly, without sleeping.

Three mechanisms, each modelled on one of tor's and each turned off by a limit of 0:

* **Concurrent connections per address** (tor's ``DoSConnectionMaxConcurrentCount``,
  default 100). :meth:`DosGuard.connection_opened` is asked when a TLS connection is up,
  before the link handshake; it counts the connection and says yes, or says no (and does
  not count it) when the address already holds ``max_concurrent_connections``.
  :meth:`DosGuard.connection_closed` gives the slot back. The relay releases a slot early
  when the peer proves (AUTHENTICATE) to be a relay, so relays sharing an address with
  clients do not hold client slots once their link is open.

* **Circuit creation rate per address** (tor's ``DoSCircuitCreationRate`` 3/s and
  ``DoSCircuitCreationBurst`` 90). Each client address owns a token bucket that holds up
  to ``burst`` tokens and gains ``rate`` per second; a CREATE2 from an unauthenticated
  (client) channel spends one token, and with less than one token left
  :meth:`DosGuard.allow_create` says no (the relay answers DESTROY(RESOURCELIMIT)). A
  refused CREATE2 spends nothing, so the bucket never goes below zero and an address is
  served again as soon as a token has been earned. Buckets that are full again carry no
  information (a new bucket starts full) and are dropped by :meth:`DosGuard.prune`, so
  memory is bounded by the addresses active in the last ``burst / rate`` seconds.

* **Memory held in queues** (tor's ``MaxMemInQueues``, default 256 MiB). The relay
  reports what each circuit holds (cells waiting in channel queues, 514 bytes each, plus
  bytes an exit stream has read but not yet packaged) and what channels hold for no live
  circuit. Above ``max_mem_in_queues`` :func:`oom_victims` names the largest holders
  first until the rest fits under 90 % of the limit (the relay destroys those circuits
  with RESOURCELIMIT, or closes those channels), so one sweep frees a margin instead of
  killing one circuit per check. :meth:`DosGuard.read_budget` tells the relay how many
  bytes it may read before memory could have reached the limit, so it checks when a
  queue may have grown, not only on its periodic sweep.

Addresses are compared as given (``"127.0.0.2"``); IPv6 addresses are not grouped
into prefixes.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from onionp2p.errors import ConfigError

__all__ = [
    "CELL_MEMORY",
    "OOM_TARGET",
    "DosLimits",
    "DosGuard",
    "CreationBucket",
    "oom_victims",
]

#: Bytes charged for one queued cell (the cell itself; Python's object overhead, about
#: 10 %, comes on top).
CELL_MEMORY = 514
#: After a memory sweep the holders that remain fit under this fraction of the limit.
OOM_TARGET = 0.9
#: The smallest read budget between memory checks (bounds the cost of checking).
_MIN_READ_BUDGET = 64 * 1024

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class DosLimits:
    """The relay's DoS limits; 0 turns a limit off. Defaults are tor's."""

    max_concurrent_connections: int = 100  #: per address (DoSConnectionMaxConcurrentCount)
    circuit_creation_rate: float = 3.0  #: CREATE2 per second per client address
    circuit_creation_burst: int = 90  #: bucket size (DoSCircuitCreationBurst)
    max_mem_in_queues: int = 256 * 1024 * 1024  #: bytes in queues before circuits are killed

    def __post_init__(self) -> None:
        for name in ("max_concurrent_connections", "circuit_creation_burst", "max_mem_in_queues"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, not {value!r}")
        rate = self.circuit_creation_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
            raise ConfigError(f"circuit_creation_rate must be a non-negative number, not {rate!r}")
        if (rate > 0) != (self.circuit_creation_burst > 0):
            raise ConfigError("circuit_creation_rate and circuit_creation_burst must both be 0 (off) "
                              "or both be positive")

    @property
    def creation_limited(self) -> bool:
        return self.circuit_creation_rate > 0

    @classmethod
    def of(cls, config) -> DosLimits:
        """The limits a :class:`~onionp2p.config.RelayConfig` sets (0 = off there too)."""
        return cls(max_concurrent_connections=config.dos_max_concurrent_connections,
                   circuit_creation_rate=config.dos_circuit_creation_rate,
                   circuit_creation_burst=config.dos_circuit_creation_burst,
                   max_mem_in_queues=config.max_mem_in_queues)


class CreationBucket:
    """One address's circuit-creation token bucket (never below zero)."""

    __slots__ = ("tokens", "last")

    def __init__(self, burst: float, now: float):
        self.tokens = float(burst)
        self.last = now

    def refill(self, rate: float, burst: float, now: float) -> None:
        if now > self.last:
            self.tokens = min(float(burst), self.tokens + (now - self.last) * rate)
        self.last = max(self.last, now)

    def take(self, rate: float, burst: float, now: float) -> bool:
        """Spend one token if there is one."""
        self.refill(rate, burst, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def oom_victims(holders: Iterable[tuple[K, int]], limit: int, *, target: float = OOM_TARGET) -> list[K]:
    """Which holders to free, largest first, so the rest fits under ``target * limit``.

    ``holders`` are ``(key, bytes)`` pairs. Returns ``[]`` while the total is within
    ``limit`` (or the limit is 0 = off). Holders of 0 bytes are never chosen.
    """
    if limit <= 0:
        return []
    items = [(key, size) for key, size in holders if size > 0]
    total = sum(size for _, size in items)
    if total <= limit:
        return []
    goal = int(limit * target)
    items.sort(key=lambda kv: kv[1], reverse=True)  # stable: equal sizes keep their order
    victims: list[K] = []
    for key, size in items:
        if total <= goal:
            break
        victims.append(key)
        total -= size
    return victims


class DosGuard:
    """Per-address connection counts and circuit-creation buckets for one relay."""

    def __init__(self, limits: DosLimits | None = None):
        self.limits = limits or DosLimits()
        self._conns: dict[str, int] = {}
        self._buckets: dict[str, CreationBucket] = {}

    # -- concurrent connections ------------------------------------------------------------

    def connection_opened(self, addr: str) -> bool:
        """Count a new connection from ``addr``; False (not counted) if over the limit."""
        n = self._conns.get(addr, 0)
        cap = self.limits.max_concurrent_connections
        if cap and n >= cap:
            return False
        self._conns[addr] = n + 1
        return True

    def connection_closed(self, addr: str) -> None:
        """Give back the slot taken by :meth:`connection_opened` (which said yes)."""
        n = self._conns.get(addr, 0)
        if n <= 1:
            self._conns.pop(addr, None)
        else:
            self._conns[addr] = n - 1

    def connections(self, addr: str | None = None) -> int:
        """Connections counted for ``addr`` (all addresses when None)."""
        if addr is None:
            return sum(self._conns.values())
        return self._conns.get(addr, 0)

    # -- circuit creation -------------------------------------------------------------------

    def allow_create(self, addr: str, now: float) -> bool:
        """A CREATE2 from a client at ``addr``: may it be served?"""
        lim = self.limits
        if not lim.creation_limited:
            return True
        bucket = self._buckets.get(addr)
        if bucket is None:
            bucket = self._buckets[addr] = CreationBucket(lim.circuit_creation_burst, now)
        return bucket.take(lim.circuit_creation_rate, lim.circuit_creation_burst, now)

    def creation_tokens(self, addr: str, now: float) -> float:
        """Tokens ``addr`` has now (a full bucket if it has none yet)."""
        lim = self.limits
        bucket = self._buckets.get(addr)
        if bucket is None:
            return float(lim.circuit_creation_burst)
        bucket.refill(lim.circuit_creation_rate, lim.circuit_creation_burst, now)
        return bucket.tokens

    def tracked_addresses(self) -> int:
        """Addresses with a circuit-creation bucket (for tests and status lines)."""
        return len(self._buckets)

    def prune(self, now: float) -> int:
        """Drop buckets that are full again; returns how many were dropped."""
        lim = self.limits
        if not lim.creation_limited:
            dropped = len(self._buckets)
            self._buckets.clear()
            return dropped
        full = []
        for addr, bucket in self._buckets.items():
            bucket.refill(lim.circuit_creation_rate, lim.circuit_creation_burst, now)
            if bucket.tokens >= lim.circuit_creation_burst:
                full.append(addr)
        for addr in full:
            del self._buckets[addr]
        return len(full)

    # -- memory --------------------------------------------------------------------------

    def over_memory(self, total: int) -> bool:
        cap = self.limits.max_mem_in_queues
        return bool(cap) and total > cap

    def read_budget(self, total: int) -> int | None:
        """Bytes the relay may read before queues could exceed the limit (None: off).

        Every queued cell is caused by at least as many bytes read from a channel (a
        relayed cell, a CREATE2 answered, a BEGIN answered) except DATA an exit packages
        from its destinations, which the relay bounds per circuit; so checking again after
        this many bytes keeps the overshoot to one read.
        """
        cap = self.limits.max_mem_in_queues
        if not cap:
            return None
        return max(cap - total, min(_MIN_READ_BUDGET, cap // 8), 1)
