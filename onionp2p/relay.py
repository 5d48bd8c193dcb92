"""The relay node: listener, channel manager, circuit table (tor-spec §2, §5; specs/overview.md).

Theory of operation
-------------------
:class:`Relay` is the asyncio shell of a relay. It

* listens on its ORPort with TLS and runs a responder :class:`~onionp2p.channel.Channel`
  per connection; opens initiator channels to other relays for EXTEND2, keeping **one
  channel per relay pair** (indexed by the proven RSA identity, for both directions;
  concurrent opens to the same relay share one attempt);
* answers CREATE2 (ntor) with CREATED2 and creates an :class:`~onionp2p.circuit.OrCircuit`,
  refusing unknown handshake types, bad handshakes and circuits beyond the per-channel
  cap with DESTROY, and ignoring cells for unknown circuits (as tor does);
* owns the :class:`~onionp2p.exit.ExitHandler` that serves stream commands at the last hop;
* rotates its onion key on schedule and publishes what clients need in
  ``<data_dir>/relay-info.json`` (:class:`~onionp2p.directory.RelayInfo`);
* with ``directory`` (a :class:`~onionp2p.dirclient.RelayDirectory`), runs its directory
  duties: descriptor uploads, consensus cache, BEGIN_DIR server (started/stopped with the
  relay, told about key rotation);
* shuts down cleanly: every circuit gets DESTROY, every channel is closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path

from .log import get_logger

from . import tls
from .cells import Cell, CellCommand, Create2, Created2, Destroy, DestroyReason
from .channel import Channel
from .circuit import OrCircuit
from .directory import RelayInfo
from .errors import HandshakeError, OnionError, ProtocolError
from .exit import ExitHandler
from .exitpolicy import ExitPolicy
from .handshake import HTYPE_NTOR, ntor_server
from .keys import RelayKeys
from .link import PeerIdentity
from .ratelimit import TokenBucket
from .relaycrypto import RelayCrypto

__all__ = ["Relay"]

log = get_logger("onionp2p.relay")


class Relay:
    """A running relay. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        keys: RelayKeys,
        *,
        nickname: str = "Unnamed",
        address: str = "127.0.0.1",
        port: int = 0,
        exit_policy: ExitPolicy | None = None,
        data_dir: Path | str | None = None,
        max_circuits_per_channel: int = 1000,
        max_streams_per_circuit: int = 500,
        extend_allow_private: bool = False,
        max_queue_cells: int = 2500,
        handshake_timeout: float = 30.0,
        bandwidth_rate: int | None = None,
        bandwidth_burst: int | None = None,
        directory=None,
    ):
        self.keys = keys
        self.nickname = nickname
        self.address = address
        self.port = port
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.exit_policy = exit_policy or ExitPolicy.reject_all()
        self.exit = ExitHandler(self.exit_policy, max_streams_per_circuit=max_streams_per_circuit)
        self.max_circuits_per_channel = max_circuits_per_channel
        self.extend_allow_private = extend_allow_private
        self.max_queue_cells = max_queue_cells
        self.handshake_timeout = handshake_timeout
        # BandwidthRate/BandwidthBurst: one token bucket for every byte read on OR channels.
        self.read_bucket = (TokenBucket(bandwidth_rate, bandwidth_burst, now=time.monotonic())
                            if bandwidth_rate else None)
        self._throttled: set[Channel] = set()
        self._unthrottle_handle: asyncio.TimerHandle | None = None
        self.channels: set[Channel] = set()
        self.by_identity: dict[bytes, Channel] = {}
        self.circuits: set[OrCircuit] = set()
        self.stats = {"create_ok": 0, "create_failed": 0, "destroyed": 0, "throttled": 0}
        self._connecting: dict[bytes, asyncio.Task] = {}
        self._server: asyncio.base_events.Server | None = None
        self._rotate_task: asyncio.Task | None = None
        self._log = log.bind(nickname=nickname)
        # Directory duties (a dirclient.RelayDirectory or None): start(relay), stop(), keys_changed().
        self.directory = directory

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ssl_ctx = tls.server_context(self.keys)
        self._tls_generation = self.keys.tls_generation
        self._server = await loop.create_server(
            lambda: Channel(self, initiator=False, keys=self.keys, my_addresses=(self.address,),
                            max_queue_cells=self.max_queue_cells, handshake_timeout=self.handshake_timeout),
            self.address, self.port, ssl=self._ssl_ctx, reuse_address=True,
            ssl_handshake_timeout=self.handshake_timeout,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._publish()
        self._rotate_task = loop.create_task(self._rotate_loop())
        self._log.info("relay listening", or_port=self.port, fingerprint=self.keys.fingerprint,
                       exit=self.exit_policy.is_exit)
        if self.directory is not None:
            await self.directory.start(self)

    def info(self) -> RelayInfo:
        return RelayInfo(
            nickname=self.nickname, address=self.address, or_port=self.port,
            rsa_id=self.keys.rsa_id_digest, ed_id=self.keys.identity_public,
            ntor_key=self.keys.onion_key_public, exit_policy=self.exit_policy.summary(),
        )

    def _publish(self) -> None:
        if self.data_dir is not None:
            self.info().save(self.data_dir / "relay-info.json")

    async def _rotate_loop(self) -> None:
        while True:
            await asyncio.sleep(3600)
            self.rotate_keys(time.time())

    def rotate_keys(self, now: float) -> bool:
        """Renew whatever keys and certificates are due; republish; reload the TLS cert."""
        onion = self.keys.onion_key_public
        if not self.keys.maybe_rotate(now):
            return False
        if self.keys.tls_generation != self._tls_generation:
            # new connections present the new link certificate (old ones keep theirs)
            self._ssl_ctx.load_cert_chain(self.keys.tls_cert_path, self.keys.tls_key_path)
            self._tls_generation = self.keys.tls_generation
        if self.keys.onion_key_public != onion:
            self._log.info("onion key rotated")
        self._publish()
        if self.directory is not None:
            self.directory.keys_changed()
        return True

    async def stop(self) -> None:
        """Destroy every circuit, close every channel and the listener."""
        if self.directory is not None:
            await self.directory.stop()
        if self._rotate_task:
            self._rotate_task.cancel()
        if self._unthrottle_handle is not None:
            self._unthrottle_handle.cancel()
        if self._server is not None:
            self._server.close()
        for circ in list(self.circuits):
            circ.destroy(DestroyReason.HIBERNATING)
        for task in list(self._connecting.values()):
            task.cancel()
        await self.exit.aclose()
        for chan in list(self.channels):
            chan.close("relay shutting down")
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)

    # -- ChannelOwner ------------------------------------------------------------------

    def channel_open(self, chan: Channel) -> None:
        self.channels.add(chan)
        if chan.peer is not None and chan.peer.rsa_id:
            self.by_identity.setdefault(chan.peer.rsa_id, chan)

    def channel_closed(self, chan: Channel) -> None:
        self.channels.discard(chan)
        if chan.peer is not None and self.by_identity.get(chan.peer.rsa_id) is chan:
            del self.by_identity[chan.peer.rsa_id]

    def queue_overflow(self, chan: Channel, circ_id: int) -> None:
        circ = chan.circuits.get(circ_id)
        if circ is not None:
            circ.log.warning("circuit queue over its bound; destroying", bound=chan.max_queue_cells)
            circ.destroy(DestroyReason.RESOURCELIMIT)

    def channel_connected(self, chan: Channel) -> bool:
        """A TCP+TLS connection is up (before the link handshake); False refuses it."""
        return True

    def account_read(self, chan: Channel, nbytes: int) -> None:
        bucket = self.read_bucket
        if bucket is None:
            return
        now = time.monotonic()
        if bucket.spend(nbytes, now):
            return
        chan.pause_reading()
        self._throttled.add(chan)
        self.stats["throttled"] += 1
        if self._unthrottle_handle is None:
            self._unthrottle_handle = asyncio.get_running_loop().call_later(bucket.delay(now), self._unthrottle)

    def _unthrottle(self) -> None:
        self._unthrottle_handle = None
        assert self.read_bucket is not None
        delay = self.read_bucket.delay(time.monotonic())
        if delay > 0:
            self._unthrottle_handle = asyncio.get_running_loop().call_later(delay, self._unthrottle)
            return
        throttled, self._throttled = self._throttled, set()
        for chan in throttled:
            chan.resume_reading()

    def unknown_cell(self, chan: Channel, cell: Cell) -> None:
        cmd = cell.command
        if cmd == CellCommand.CREATE2:
            self._create2(chan, cell)
        elif cmd in (CellCommand.CREATE, CellCommand.CREATE_FAST):
            chan.send_cell(cell.circ_id, CellCommand.DESTROY, Destroy(DestroyReason.PROTOCOL).encode())
        # RELAY, DESTROY, CREATED2 ... on an unknown circuit: dropped, as tor does.

    # -- circuits -----------------------------------------------------------------------

    def _create2(self, chan: Channel, cell: Cell) -> None:
        cid = cell.circ_id
        if cid == 0 or (chan.initiator and cid & 0x80000000) or (not chan.initiator and not cid & 0x80000000):
            # the peer used an ID from our half of the space (tor-spec §5.1.1)
            chan.send_cell(cid, CellCommand.DESTROY, Destroy(DestroyReason.PROTOCOL).encode())
            return
        if len(chan.circuits) >= self.max_circuits_per_channel:
            chan.send_cell(cid, CellCommand.DESTROY, Destroy(DestroyReason.RESOURCELIMIT).encode())
            return
        try:
            req = Create2.parse(cell.payload)
            if req.htype != HTYPE_NTOR:
                raise HandshakeError(f"unsupported handshake type {req.htype}")
            reply, km = ntor_server(req.hdata, self.keys.rsa_id_digest, self.keys.onion_keys())
        except ProtocolError as exc:
            self.stats["create_failed"] += 1
            self._log.info("CREATE2 refused", chan_id=chan.id, error=str(exc))
            chan.send_cell(cid, CellCommand.DESTROY, Destroy(DestroyReason.PROTOCOL).encode())
            return
        circ = OrCircuit(self, chan, cid, RelayCrypto(km))
        self.circuits.add(circ)
        self.stats["create_ok"] += 1
        chan.send_cell(cid, CellCommand.CREATED2, Created2(reply).encode())

    def circuit_closed(self, circ: OrCircuit, reason: int) -> None:
        if circ in self.circuits:
            self.circuits.discard(circ)
            self.stats["destroyed"] += 1

    def extend_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Like tor's ExtendAllowPrivateAddresses: refuse private targets unless allowed."""
        if self.extend_allow_private:
            return not ip.is_unspecified and not ip.is_multicast
        return ip.is_global

    async def open_channel(self, host: str, port: int, rsa_id: bytes, ed_id: bytes | None) -> Channel:
        """Return the open channel to this relay, connecting if there is none."""
        chan = self.by_identity.get(rsa_id)
        if chan is not None and not chan.closed:
            if ed_id is None or chan.peer is None or chan.peer.ed25519_id == ed_id:
                return chan
            raise HandshakeError("EXTEND2 names an Ed25519 identity that does not match the relay")
        task = self._connecting.get(rsa_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(host, port, rsa_id, ed_id))
            self._connecting[rsa_id] = task
            task.add_done_callback(lambda _t: self._connecting.pop(rsa_id, None))
        return await asyncio.shield(task)

    async def _connect(self, host: str, port: int, rsa_id: bytes, ed_id: bytes | None) -> Channel:
        loop = asyncio.get_running_loop()
        expected = PeerIdentity(ed25519_id=ed_id, rsa_id=rsa_id)
        _transport, chan = await loop.create_connection(
            lambda: Channel(self, initiator=True, keys=self.keys, expected=expected, peer_address=host,
                            my_addresses=(self.address,), max_queue_cells=self.max_queue_cells),
            host, port, ssl=tls.client_context(),
        )
        try:
            await chan.ready
        except OnionError:
            chan.close()
            raise
        return chan
