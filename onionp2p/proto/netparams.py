"""Consensus parameters read as tor reads them (``networkstatus_get_param``).

A consensus ``params`` line maps names to integers. Each module that takes parameters
(congestion control, circuit build timeouts, path bias, ...) keeps its own table of
tor's bounds; this is the one place where a value is checked against such a table: a
name the table does not know is ignored, a value outside its bounds is clamped into them.
Defaults and cross-parameter rules stay with the module that owns the parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["clamp_params"]


def clamp_params(params: Mapping[str, int], bounds: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The parameters of ``params`` named in ``bounds``, each clamped into its range.

    A ``bounds`` entry ends with ``(min, max)``; entries may carry more in front (e.g. a
    ``(default, min, max)`` table).
    """
    out = {}
    for key, value in params.items():
        spec = bounds.get(key)
        if spec is not None:
            out[key] = min(max(int(value), spec[-2]), spec[-1])
    return out
