"""Consensus bandwidth weights (dir-spec §3.8.3; specs/directory.md, specs/pathsel.md).

Theory of operation
-------------------
Path selection weights a relay by its bandwidth *and* by how scarce the positions it may
fill are: if exit capacity is scarce, clients should not waste Guard+Exit relays as
middles. The authorities therefore put a ``bandwidth-weights`` line into the consensus,
and clients multiply each relay's bandwidth by the weight for the position being chosen
(guard, middle, exit, directory) and the relay's class (``g`` Guard only, ``e`` Exit only,
``d`` both, ``m`` neither). This module is the pure arithmetic shared by the two sides:

* :func:`bandwidth_totals` sums the consensus bandwidths per class exactly as tor's
  ``update_total_bandwidth_weights`` (a BadExit relay is not an exit; every total starts
  at 1 so that a network without, say, middle-only relays still gets weights);
* :func:`compute_bw_weights` is tor's ``networkstatus_compute_bw_weights_v10`` (dir-spec's
  case analysis 1, 2a, 2b, 3a, 3b) with C's truncating integer division and tor's
  consistency check, so our authorities produce the very line a tor authority would for
  the same totals;
* :func:`parse_bw_weights` reads the line's ``Key=Value`` arguments as tor's consensus
  parser does (every argument needs ``=`` and a 32-bit integer, otherwise the document is
  rejected; unknown keys are kept).

The weight scale is 10000 (tor's default ``bwweightscale``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import NamedTuple

from onionp2p.errors import ProtocolError

__all__ = [
    "WEIGHT_KEYS",
    "WEIGHT_SCALE",
    "BandwidthTotals",
    "bandwidth_totals",
    "compute_bw_weights",
    "format_bw_weights",
    "parse_bw_weights",
    "weight_class",
]

WEIGHT_SCALE = 10000
#: the keys of a v10 ``bandwidth-weights`` line, in the line's (sorted) order
WEIGHT_KEYS = ("Wbd", "Wbe", "Wbg", "Wbm", "Wdb", "Web", "Wed", "Wee", "Weg", "Wem",
               "Wgb", "Wgd", "Wgg", "Wgm", "Wmb", "Wmd", "Wme", "Wmg", "Wmm")
_VALUE = re.compile(r"[+-]?[0-9]{1,10}")
_MARGIN = 10  # tor's margin for the equalities of networkstatus_check_weights (consensus method 10)


class BandwidthTotals(NamedTuple):
    """Total bandwidth (KB/s) of Guard-only (G), neither (M), Exit-only (E) and Guard+Exit (D)
    relays, and of all (T)."""

    G: int
    M: int
    E: int
    D: int
    T: int


def weight_class(flags: Collection[str]) -> str:
    """``d`` (Guard and Exit), ``g`` (Guard), ``e`` (Exit) or ``m`` (neither); BadExit is no exit."""
    guard = "Guard" in flags
    exit_ = "Exit" in flags and "BadExit" not in flags
    return "d" if guard and exit_ else "g" if guard else "e" if exit_ else "m"


def bandwidth_totals(relays: Iterable[tuple[Collection[str], int]]) -> BandwidthTotals:
    """G, M, E, D, T over ``(flags, bandwidth)`` pairs, each starting at 1 (T at 4) as in tor."""
    sums = {"g": 1, "m": 1, "e": 1, "d": 1}
    total = 4
    for flags, bandwidth in relays:
        sums[weight_class(flags)] += bandwidth
        total += bandwidth
    return BandwidthTotals(sums["g"], sums["m"], sums["e"], sums["d"], total)


def _div(a: int, b: int) -> int:
    """C's integer division (truncates toward zero), which tor's weights rely on."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _check(w: dict[str, int], scale: int, t: BandwidthTotals) -> int:
    """tor's ``networkstatus_check_weights`` (do_balance on): 0 if fine, else its error code."""
    G, M, E, D, T = t

    def eq(a: int, b: int, margin: int) -> bool:
        return abs(a - b) <= margin

    if not eq(w["Wed"] + w["Wmd"] + w["Wgd"], scale, _MARGIN):
        return 4  # SUMD
    if not eq(w["Wmg"] + w["Wgg"], scale, _MARGIN):
        return 2  # SUMG
    if not eq(w["Wme"] + w["Wee"], scale, _MARGIN):
        return 3  # SUME
    if not all(0 <= w[k] <= scale for k in ("Wgg", "Wgd", "Wmg", "Wme", "Wmd", "Wed", "Wee")):
        return 1  # RANGE
    margin = (_MARGIN * T) // 3
    if not eq(w["Wgg"] * G + w["Wgd"] * D, w["Wee"] * E + w["Wed"] * D, margin):
        return 6  # BALANCE_EG
    if not eq(w["Wgg"] * G + w["Wgd"] * D, M * scale + w["Wmd"] * D + w["Wme"] * E + w["Wmg"] * G, margin):
        return 5  # BALANCE_MID
    return 0


def compute_bw_weights(totals: BandwidthTotals, scale: int = WEIGHT_SCALE) -> dict[str, int] | None:
    """The ``bandwidth-weights`` of a consensus with these totals (tor's v10 algorithm), or None
    where tor writes no line (a class with no bandwidth, or no consistent solution)."""
    G, M, E, D, T = totals
    if G <= 0 or M <= 0 or E <= 0 or D <= 0:
        return None
    w: dict[str, int]
    if 3 * E >= T and 3 * G >= T:  # case 1: neither guards nor exits are scarce
        wee = _div(scale * (E + G + M), 3 * E)
        wmg = _div(scale * (2 * G - E - M), 3 * G)
        w = dict(Wgd=scale // 3, Wed=scale // 3, Wmd=scale // 3, Wee=wee, Wme=scale - wee,
                 Wmg=wmg, Wgg=scale - wmg)
        if _check(w, scale, totals):
            return None
    elif 3 * E < T and 3 * G < T:  # case 2: both are scarce
        R, S = min(E, G), max(E, G)
        if R + D < S:  # 2a: all of D goes to the scarcer one
            w = dict(Wgg=scale, Wee=scale, Wmg=0, Wme=0, Wmd=0,
                     Wed=scale if E < G else 0, Wgd=0 if E < G else scale)
        else:  # 2b
            wed = _div(scale * (D - 2 * E + 4 * G - 2 * M), 3 * D)
            w = dict(Wee=_div(scale * (E - G + M), E), Wed=wed, Wme=_div(scale * (G - M), E), Wmg=0,
                     Wgg=scale, Wmd=_div(scale - wed, 2), Wgd=_div(scale - wed, 2))
            err = _check(w, scale, totals)
            if err:  # 2b2 (and 2b3 when M is too large)
                wed = _div(scale * (D - 2 * E + G + M), 3 * D)
                wmd = max(_div(scale * (D - 2 * M + G + E), 3 * D), 0)
                w = dict(Wgg=scale, Wee=scale, Wed=wed, Wmd=wmd, Wme=0, Wmg=0, Wgd=scale - wed - wmd)
                err = _check(w, scale, totals)
            if err not in (0, 5):  # tor tolerates an unbalanced middle here
                return None
    else:  # case 3: exactly one of them is scarce
        S = min(E, G)
        if 3 * (S + D) < T:  # 3a: give the scarce class all of D
            if G < E:
                wme = 0 if E < M else _div(scale * (E - M), 2 * E)
                w = dict(Wgg=scale, Wgd=scale, Wmd=0, Wed=0, Wmg=0, Wme=wme, Wee=scale - wme)
            else:
                wmg = 0 if G < M else _div(scale * (G - M), 2 * G)
                w = dict(Wee=scale, Wed=scale, Wmd=0, Wgd=0, Wme=0, Wmg=wmg, Wgg=scale - wmg)
        else:  # 3b
            if G < E:
                wgd = _div(scale * (D - 2 * G + E + M), 3 * D)
                wee = _div(scale * (E + M), 2 * E)
                w = dict(Wgg=scale, Wgd=wgd, Wmg=0, Wee=wee, Wme=scale - wee,
                         Wmd=_div(scale - wgd, 2), Wed=_div(scale - wgd, 2))
            else:
                wed = _div(scale * (D - 2 * E + G + M), 3 * D)
                wgg = _div(scale * (G + M), 2 * G)
                w = dict(Wee=scale, Wed=wed, Wme=0, Wgg=wgg, Wmg=scale - wgg,
                         Wmd=_div(scale - wed, 2), Wgd=_div(scale - wed, 2))
            if _check(w, scale, totals):
                return None
    # tor's fixed relations: Wgm=Wgg, Wem=Wee, Weg=Wed, Wmm=1, the directory weights equal the
    # middle ones, and the "is a directory" multipliers are 1
    out = dict(Wbd=w["Wmd"], Wbe=w["Wme"], Wbg=w["Wmg"], Wbm=scale, Wdb=scale, Web=scale,
               Wed=w["Wed"], Wee=w["Wee"], Weg=w["Wed"], Wem=w["Wee"], Wgb=scale, Wgd=w["Wgd"],
               Wgg=w["Wgg"], Wgm=w["Wgg"], Wmb=scale, Wmd=w["Wmd"], Wme=w["Wme"], Wmg=w["Wmg"], Wmm=scale)
    return {k: out[k] for k in WEIGHT_KEYS}


def format_bw_weights(weights: Mapping[str, int]) -> str:
    """The arguments of a ``bandwidth-weights`` line: ``Key=Value`` sorted by key."""
    return " ".join(f"{k}={weights[k]}" for k in sorted(weights))


def parse_bw_weights(args: Sequence[str]) -> dict[str, int]:
    """``Key=Value`` arguments as tor's parser takes them; ProtocolError for a malformed one."""
    out: dict[str, int] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key or not _VALUE.fullmatch(value) or not -2**31 <= int(value) < 2**31:
            raise ProtocolError(f"bandwidth-weights: bad entry {arg[:40]!r}")
        out.setdefault(key, int(value))  # tor uses the first of repeated keys
    return out
