"""Token bucket arithmetic (onionp2p.proto.ratelimit), with an injected clock."""

import pytest

from onionp2p.proto.ratelimit import TokenBucket


def test_bucket_allows_burst_then_rate():
    b = TokenBucket(1000, 5000, now=0.0)
    assert b.spend(5000, 0.0)
    assert not b.spend(1, 0.0)
    assert b.delay(0.0) == pytest.approx(0.001)
    assert b.delay(0.001) == 0.0
    # over 10 s at most burst + 10 s * rate can be spent without going negative
    b = TokenBucket(1000, 5000, now=0.0)
    spent = 0
    t = 0.0
    while t <= 10.0:
        if b.spend(100, t):
            spent += 100
        else:
            b.tokens += 100  # undo: this read did not happen
        t += 0.01
    assert 14_000 <= spent <= 15_100


def test_bucket_never_exceeds_burst():
    b = TokenBucket(1000, 2000, now=0.0)
    b.refill(1000.0)
    assert b.tokens == 2000


def test_bad_parameters():
    with pytest.raises(ValueError):
        TokenBucket(0)
