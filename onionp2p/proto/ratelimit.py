"""Token buckets for relay bandwidth limits (tor's BandwidthRate / BandwidthBurst).

Theory of operation
-------------------
A :class:`TokenBucket` holds up to ``burst`` tokens (bytes) and gains ``rate`` tokens per
second. Reading ``n`` bytes spends ``n`` tokens; the balance may go negative by one read,
because a socket read cannot be undone. While the balance is negative the relay stops
reading from its channels; :meth:`TokenBucket.delay` says how long until it is positive
again. The bucket is pure (the clock is passed in) so it is tested without sleeping.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """A token bucket: ``rate`` tokens/s, at most ``burst`` tokens."""

    __slots__ = ("rate", "burst", "tokens", "_last")

    def __init__(self, rate: float, burst: float | None = None, *, now: float = 0.0):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        if self.burst < self.rate / 100:
            raise ValueError("burst too small for the rate")
        self.tokens = self.burst
        self._last = now

    def refill(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self._last = now

    def spend(self, n: int, now: float) -> bool:
        """Spend ``n`` tokens; True while the balance is still non-negative."""
        self.refill(now)
        self.tokens -= n
        return self.tokens >= 0

    def delay(self, now: float) -> float:
        """Seconds until the balance is non-negative again (0 if it is)."""
        self.refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
