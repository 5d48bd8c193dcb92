"""Observer lists: the one way nodes, relays, clients and control adapters call back.

A :class:`Listeners` holds callbacks in the order they were added and calls each with
the same arguments. A callback that raises is logged and does not stop the others: an
observer (a control connection, a metrics collector, a test) must never break the node
that reports to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onionp2p.log import get_logger

__all__ = ["Listeners"]

log = get_logger("onionp2p.listeners")


class Listeners:
    """Callbacks of one kind of event (``what`` names it in the log line of a failure)."""

    __slots__ = ("_fns", "what")

    def __init__(self, what: str):
        self._fns: list[Callable[..., Any]] = []
        self.what = what

    def add(self, fn: Callable[..., Any]) -> None:
        self._fns.append(fn)

    def remove(self, fn: Callable[..., Any]) -> None:
        """Forget ``fn`` (nothing happens if it was not added)."""
        if fn in self._fns:
            self._fns.remove(fn)

    def __bool__(self) -> bool:
        return bool(self._fns)

    def __len__(self) -> int:
        return len(self._fns)

    def __call__(self, *args: Any) -> None:
        for fn in list(self._fns):  # a callback may remove itself
            try:
                fn(*args)
            except Exception:
                log.exception("listener failed", listener=self.what)
