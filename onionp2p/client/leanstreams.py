"""asyncio stream objects that cost less per idle connection (specs/performance.md §6).

A client holds two ``asyncio.StreamReaderProtocol`` per open stream: one under the SOCKS
(or HTTP CONNECT) connection, one under the circuit stream's reader/writer pair. asyncio's
``FlowControlMixin`` gives each of them a ``collections.deque`` for the writers waiting in
``drain()``, allocated up front: with its first block of 64 slots a deque is ~770 bytes, about
a sixteenth of what an idle stream cost the client in all, and it is only ever used while
the transport is paused (a writer waits in ``drain()`` only then). Idle streams never wait.

:class:`LeanStreamReaderProtocol` creates that deque on first use instead; everything else is
asyncio's own code. :func:`start_server` is ``asyncio.start_server`` with it. (Once a stream
is spliced, the splice lets both pairs go altogether: :func:`onionp2p.client.splice.start_splice`.)
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["LeanStreamReaderProtocol", "start_server"]


class LeanStreamReaderProtocol(asyncio.StreamReaderProtocol):
    """``asyncio.StreamReaderProtocol`` whose drain-waiter deque exists only once a writer
    waits (the transport was paused). asyncio reads and writes ``_drain_waiters`` (its
    ``__init__`` assigns an empty deque; ``_drain_helper`` appends and removes; ``resume_writing``
    and ``connection_lost`` iterate it, the latter two only after the transport paused), so the
    attribute is a property that keeps ``None`` for an empty deque and makes the deque when
    asked for it: a connection whose transport never pauses never has one."""

    _lean_waiters: collections.deque | None = None

    @property  # type: ignore[override]
    def _drain_waiters(self) -> collections.deque:
        waiters = self._lean_waiters
        if waiters is None:
            waiters = self._lean_waiters = collections.deque()
        return waiters

    @_drain_waiters.setter
    def _drain_waiters(self, value: collections.deque) -> None:
        self._lean_waiters = value if value else None


async def start_server(client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                     Awaitable[None] | None],
                       host: str, port: int, *, limit: int, **kwds: Any) -> asyncio.AbstractServer:
    """``asyncio.start_server`` with :class:`LeanStreamReaderProtocol` per connection."""
    loop = asyncio.get_running_loop()

    def factory() -> LeanStreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return LeanStreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await loop.create_server(factory, host, port, **kwds)
