"""Times in directory documents and state files: ``YYYY-MM-DD HH:MM:SS`` in UTC (dir-spec
§1.3), written one way and read back strictly (one canonical text per second), for our
consensus, votes and descriptors (:mod:`onionp2p.proto.directory`) and the shared-random
state (:mod:`onionp2p.proto.srv`)."""

from __future__ import annotations

import calendar
import re
import time

from onionp2p.errors import ProtocolError

__all__ = ["format_time", "parse_time"]

_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")


def format_time(t: float) -> str:
    """``YYYY-MM-DD HH:MM:SS`` (UTC) for a unix time (rounded down to the second)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(t)))


def parse_time(s: str) -> int:
    """Inverse of :func:`format_time`; ProtocolError unless canonical."""
    if not _TIME.fullmatch(s):
        raise ProtocolError(f"bad time {s[:30]!r} (want YYYY-MM-DD HH:MM:SS)")
    try:
        t = calendar.timegm(time.strptime(s, "%Y-%m-%d %H:%M:%S"))
    except (ValueError, OverflowError):
        raise ProtocolError(f"bad time {s!r}") from None
    if format_time(t) != s:
        raise ProtocolError(f"bad time {s!r}")
    return t
