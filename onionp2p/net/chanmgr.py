"""The channel manager: one channel per relay identity, for relays and clients alike.

Theory of operation
-------------------
Circuits need a channel to a given relay (the client's first hop; the next hop of an
EXTEND2 at a relay). :class:`ChannelManager` answers :meth:`ChannelManager.get` with

* the open channel to that relay identity, if there is one that still takes circuits and
  whose peer proved *every* identity asked for (RSA, and Ed25519 when given) — a channel
  that proved another Ed25519 identity is an error, not a match;
* otherwise the result of one connection attempt per identity: concurrent callers share
  it. TCP and TLS must finish within ``handshake_timeout``, the link handshake within it
  again (the channel's own timer), so a peer that accepts and never answers costs a bounded
  time whether or not anybody still waits.

Channels whose peers proved an identity are indexed by it in both directions (a relay
:meth:`register`\\ s the ones that came in), so two relays keep one channel between them.
A channel whose peer stopped answering can be *retired* (tor's ``is_bad_for_new_circs``):
it takes no new circuits and is closed once its last circuit is gone
(:meth:`circuit_gone`).

The manager does not own the channels' traffic: they report to their owner (the relay or
the client, a :class:`~onionp2p.net.channel.ChannelOwner`), which tells the manager when
one opens or closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from onionp2p.defaults import HANDSHAKE_TIMEOUT, MAX_QUEUE_CELLS, TCP_USER_TIMEOUT
from onionp2p.errors import HandshakeError
from onionp2p.net import tls
from onionp2p.net.channel import Channel, ChannelOwner
from onionp2p.proto.link import PeerIdentity

__all__ = ["ChannelManager"]


class ChannelManager:
    """Launch-once, reuse-after-checking, retire-on-failure channels by relay identity."""

    def __init__(self, owner: ChannelOwner, *, keys=None, my_addresses: Callable[[], tuple[str, ...]] = tuple,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, max_queue_cells: int = MAX_QUEUE_CELLS,
                 tcp_user_timeout: float | None = TCP_USER_TIMEOUT):
        self.owner = owner
        self.keys = keys  # a relay's keys (it authenticates); None for a client
        self.my_addresses = my_addresses
        self.handshake_timeout = handshake_timeout
        self.max_queue_cells = max_queue_cells
        self.tcp_user_timeout = tcp_user_timeout
        #: open channels by the RSA identity their peer proved
        self.by_identity: dict[bytes, Channel] = {}
        self._connecting: dict[bytes, asyncio.Task] = {}
        self._retired: set[Channel] = set()  # out of by_identity, open until their circuits end

    # -- getting a channel -----------------------------------------------------------------------

    def find(self, rsa_id: bytes, ed_id: bytes | None = None) -> Channel | None:
        """The open channel to this identity that takes new circuits, if any.

        Raises:
            HandshakeError: the channel's peer proved another Ed25519 identity.
        """
        chan = self.by_identity.get(rsa_id)
        if chan is None or chan.closed or chan.bad_for_new_circs:
            return None
        if ed_id is not None and chan.peer is not None and chan.peer.ed25519_id is not None \
                and chan.peer.ed25519_id != ed_id:
            raise HandshakeError("that relay proved another Ed25519 identity on its open channel")
        return chan

    async def get(self, host: str, port: int, rsa_id: bytes, ed_id: bytes | None = None) -> Channel:
        """The open channel to this relay, connecting once if there is none.

        Raises:
            OnionError, OSError: the connection or the link handshake failed.
        """
        chan = self.find(rsa_id, ed_id)
        if chan is not None:
            return chan
        task = self._connecting.get(rsa_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(host, port, rsa_id, ed_id))
            self._connecting[rsa_id] = task

            def done(t: asyncio.Task, rsa_id: bytes = rsa_id) -> None:
                if self._connecting.get(rsa_id) is t:
                    del self._connecting[rsa_id]
                if not t.cancelled():
                    t.exception()  # retrieved here: every caller may have given up waiting

            task.add_done_callback(done)
        chan = await asyncio.shield(task)
        if ed_id is not None and chan.peer is not None and chan.peer.ed25519_id not in (None, ed_id):
            raise HandshakeError("that relay proved another Ed25519 identity")
        return chan

    async def _connect(self, host: str, port: int, rsa_id: bytes, ed_id: bytes | None) -> Channel:
        loop = asyncio.get_running_loop()
        expected = PeerIdentity(ed25519_id=ed_id, rsa_id=rsa_id)

        def protocol() -> Channel:
            return Channel(self.owner, initiator=True, keys=self.keys, expected=expected, peer_address=host,
                           my_addresses=self.my_addresses(), max_queue_cells=self.max_queue_cells,
                           handshake_timeout=self.handshake_timeout, tcp_user_timeout=self.tcp_user_timeout)

        async with asyncio.timeout(self.handshake_timeout):  # TCP + TLS; TimeoutError is an OSError
            _transport, chan = await loop.create_connection(protocol, host, port, ssl=tls.client_context(),
                                                            ssl_handshake_timeout=self.handshake_timeout)
        try:
            await chan.ready
        except BaseException:  # a failed handshake, or cancelled (shutting down): no stray link
            chan.close()
            raise
        self.register(chan)
        return chan

    # -- bookkeeping -----------------------------------------------------------------------------

    def register(self, chan: Channel) -> None:
        """An open channel whose peer proved an identity (ours, or one that came in)."""
        if chan.peer is not None and chan.peer.rsa_id and not chan.bad_for_new_circs:
            current = self.by_identity.get(chan.peer.rsa_id)
            if current is None or current.closed:
                self.by_identity[chan.peer.rsa_id] = chan

    def forget(self, chan: Channel) -> None:
        """``chan`` closed."""
        self._retired.discard(chan)
        if chan.peer is not None and self.by_identity.get(chan.peer.rsa_id) is chan:
            del self.by_identity[chan.peer.rsa_id]

    def retire(self, chan: Channel) -> None:
        """No new circuits on ``chan`` (its peer stopped answering): the next circuit to
        that relay opens a new channel, and ``chan`` is closed once its last circuit is gone."""
        chan.bad_for_new_circs = True
        for rsa_id, c in list(self.by_identity.items()):
            if c is chan:
                del self.by_identity[rsa_id]
        if chan.closed:
            return
        if chan.circuits:
            self._retired.add(chan)
        else:
            chan.close("retired channel has no circuits")

    def circuit_gone(self, chan: Channel) -> None:
        """A circuit on ``chan`` went away: close it if it is retired and now empty."""
        if chan.bad_for_new_circs and not chan.circuits and not chan.closed:
            chan.close("retired channel has no circuits left")

    @property
    def connecting(self) -> int:
        return len(self._connecting)

    def channels(self) -> list[Channel]:
        """Every channel the manager knows that is still open."""
        return [c for c in {*self.by_identity.values(), *self._retired} if not c.closed]

    async def close(self, reason: str = "closing") -> None:
        """Stop connecting; close every channel the manager knows."""
        tasks = list(self._connecting.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for chan in self.channels():
            chan.close(reason)
        self.by_identity.clear()
        self._retired.clear()
