"""The relay node: listener, channel manager, circuit table (tor-spec §2, §5; specs/overview.md).

Theory of operation
-------------------
:class:`Relay` is the asyncio shell of a relay. It

* receives its configuration as one :class:`~onionp2p.config.RelayConfig` (``config``;
  :meth:`Relay.reconfigure` applies the keys that may change while it runs);
* listens on its ORPort with TLS and runs a responder :class:`~onionp2p.net.channel.Channel`
  per connection; its :class:`~onionp2p.net.chanmgr.ChannelManager` opens initiator
  channels to other relays for EXTEND2, keeping **one channel per relay pair** (indexed by
  the proven RSA identity, for both directions; concurrent opens share one attempt);
* answers CREATE2 (ntor, ntor-v3) with CREATED2 and CREATE_FAST (tor clients' first hop
  when they lack our ntor key; KDF-TOR, tor1 crypto, fixed windows) with CREATED_FAST, and creates an :class:`~onionp2p.relay.circuit.OrCircuit`
  (the shell of the pure circuit core :class:`~onionp2p.proto.circuit.RelayCircuit`),
  refusing unknown handshake types, bad handshakes and circuits beyond the per-channel
  cap with DESTROY, and ignoring cells for unknown circuits (as tor does);
* owns the :class:`~onionp2p.relay.exit.ExitHandler` that serves stream commands at the last hop;
* rotates its onion key on schedule and publishes what clients need in
  ``<data_dir>/relay-info.json`` (:class:`~onionp2p.proto.directory.RelayInfo`);
* with ``directory`` (a :class:`~onionp2p.dir.client.RelayDirectory`), runs its directory
  duties: descriptor uploads, consensus cache, BEGIN_DIR server (started/stopped with the
  relay, told about key rotation);
* enforces the DoS limits of :mod:`onionp2p.relay.dos` (specs/dos.md) through thin hooks:
  ``channel_connected`` counts incoming connections per address (before the link
  handshake; a peer that then authenticates as a relay gives its slot back),
  ``_create2`` charges CREATE2 cells from client channels to their address's token
  bucket (DESTROY(RESOURCELIMIT) when it is empty), and a memory check (every second,
  and whenever enough bytes were read that queues could have reached the limit) destroys
  the circuits holding the most queued memory when the total passes
  ``max_mem_in_queues``. Refusals are logged per connection/cell at debug level only; a
  heartbeat line (info) summarises them at most once a minute;
* counts for metrics and the control port (specs/metrics.md): ``stats`` (monotonic
  counters, including the cells and bytes of channels that have closed, so totals over
  live and closed channels never go down), ``destroy_reasons`` (circuits torn down here,
  by DESTROY reason name) and channel events for listeners (``channel_events.add(fn)``:
  ``fn("connected" | "closed" | "failed", chan)``, the control port's ORCONN events);
* publishes ``address`` (tor's Address; :attr:`Relay.address`) and ``or_advertise_port``
  when they are set, and listens on ``or_address`` (:attr:`Relay.bind_address`, which may be
  0.0.0.0 when ``address`` is set);
* notices, as tor does (``onionskin_answer``), that its ORPort is reachable: a CREATE2 on a
  connection it did not open, from a peer whose NETINFO says it connected to our published
  address (from a private address only with ``extend_allow_private``), sets
  :attr:`Relay.orport_reachable`, logs tor's "Self-testing indicates your ORPort ... is
  reachable from the outside. Excellent." at notice level and tells
  :attr:`Relay.reachability` listeners; the circuits that test it are launched by its
  directory duties (:mod:`onionp2p.dir.selftest`);
* keeps its bootstrap progress (:attr:`Relay.bootstrap_progress`, tor's phases; without
  directory duties there is nothing to load and it is done once listening);
* shuts down cleanly: every circuit gets DESTROY, every channel is closed (also those
  still in their link handshake).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from onionp2p.bootstrap import Bootstrap
from onionp2p.config import RelayConfig
from onionp2p.errors import ListenError, LocalProtocolError, ProtocolError
from onionp2p.listeners import Listeners
from onionp2p.log import get_logger, notice
from onionp2p.net import tls
from onionp2p.net.chanmgr import ChannelManager
from onionp2p.net.channel import Channel
from onionp2p.proto import protover
from onionp2p.proto.cells import Cell, CellCommand, Create2, Created2, Destroy, DestroyReason
from onionp2p.proto.congestion import CCParams
from onionp2p.proto.create import HopParams, answer_create2, answer_create_fast
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.exitpolicy import is_private_address
from onionp2p.proto.padding import PaddingParams, relay_padding
from onionp2p.proto.ratelimit import TokenBucket
from onionp2p.proto.hopcrypto import CgoRelayCrypto
from onionp2p.proto.relaycrypto import RelayCrypto
from onionp2p.relay.circuit import OrCircuit
from onionp2p.relay.dos import CELL_MEMORY, DosGuard, DosLimits, oom_victims
from onionp2p.relay.exit import ExitHandler
from onionp2p.relay.hs import HsRelay
from onionp2p.relay.hsdir import HsDirCache
from onionp2p.relay.keys import RelayKeys

__all__ = ["Relay"]

log = get_logger("onionp2p.relay")

#: Seconds between housekeeping sweeps (memory check, bucket pruning).
SWEEP_INTERVAL = 1.0
#: Seconds between DoS heartbeat lines (only when something was refused).
HEARTBEAT_INTERVAL = 60.0
#: At most one warning per this many seconds when the memory limit acts (debug otherwise).
OOM_LOG_INTERVAL = 10.0


class Relay:
    """A running relay. ``await start()``, then ``await stop()``.

    ``config`` is the relay's :class:`~onionp2p.config.RelayConfig` (its ``or_address``
    port 0 picks a free port, then :attr:`port` is the one bound); ``directory`` (a
    :class:`~onionp2p.dir.client.RelayDirectory` or None) runs its directory duties.
    """

    def __init__(self, keys: RelayKeys, config: RelayConfig | None = None, *, directory=None):
        cfg = config if config is not None else RelayConfig()
        self.keys = keys
        self.config = cfg
        self.nickname = cfg.nickname
        #: the listener's address (may be a wildcard) and port (the one bound, after start)
        self.bind_address, self.port = cfg.or_address
        #: the address we publish and tell peers in NETINFO (``address`` or the listener's)
        self.address = cfg.advertised_address
        self.data_dir: Path | None = cfg.data_dir
        self.exit_policy = cfg.exit_policy
        if cfg.exit_reject_private and self.exit_policy.is_exit:
            # with reject private:*, tor also rejects the relay's own addresses
            self.exit_policy = self.exit_policy.rejecting(sorted({self.address, self.bind_address}))
        self.exit = ExitHandler(self.exit_policy, reject_private=cfg.exit_reject_private,
                                known_relay=self._known_relay)
        self.dos = DosGuard(DosLimits.of(cfg))
        #: introduction and rendezvous points (rend-spec-v3), with the consensus's parameters
        self.hs = HsRelay(self.consensus_params)
        #: the onion-service descriptors we store as an HSDir (served by our directory cache)
        self.hsdir = HsDirCache(nickname=cfg.nickname)
        # BandwidthRate/BandwidthBurst: one token bucket for every byte read on OR channels.
        self.read_bucket = TokenBucket(cfg.bandwidth_rate, cfg.effective_bandwidth_burst, now=time.monotonic())
        self._throttled: set[Channel] = set()
        self._unthrottle_handle: asyncio.TimerHandle | None = None
        self.channels: set[Channel] = set()
        self.chanmgr = ChannelManager(self, keys=keys, my_addresses=lambda: (self.address,),
                                      handshake_timeout=cfg.handshake_timeout,
                                      max_queue_cells=cfg.queue_cells_bound,
                                      tcp_user_timeout=cfg.tcp_liveness)
        self.circuits: set[OrCircuit] = set()
        self.stats = {"create_ok": 0, "create_fast": 0, "create_failed": 0, "destroyed": 0, "throttled": 0,
                      "conn_refused": 0, "create_refused": 0, "oom_circuits_killed": 0,
                      "oom_channels_closed": 0, "closed_cells_in": 0, "closed_cells_out": 0,
                      "closed_bytes_in": 0, "closed_bytes_out": 0, "closed_padding_in": 0,
                      "closed_padding_out": 0}
        #: circuits torn down here, by DESTROY reason name (DESTROYED: a neighbour sent DESTROY)
        self.destroy_reasons: Counter[str] = Counter()
        #: channel events: ``fn(kind, chan)`` with kind "connected" (link handshake done),
        #: "closed" (an open channel went away) or "failed" (closed during its handshake)
        self.channel_events = Listeners("channel")
        self._server: asyncio.base_events.Server | None = None
        self._rotate_task: asyncio.Task | None = None
        # channels between TCP+TLS and the end of the link handshake (closed by stop())
        self._handshaking: set[Channel] = set()
        # incoming channels holding a per-address connection slot -> that address
        self._slots: dict[Channel, str] = {}
        # bytes that may still be read before queue memory could pass its limit
        self._read_budget = self.dos.read_budget(0)
        self._memory_check: asyncio.Handle | None = None
        self._oom_logged_at = -OOM_LOG_INTERVAL
        self._housekeeping_task: asyncio.Task | None = None
        self._reported = {k: 0 for k in ("conn_refused", "create_refused", "create_failed",
                                          "oom_circuits_killed", "oom_channels_closed")}
        self._log = log.bind(nickname=self.nickname)
        # Directory duties (a dir.client.RelayDirectory or None): start(relay), stop(), keys_changed().
        self.directory = directory
        self._cc_source: object = None
        self._pad_source: object = None
        self._pad = PaddingParams()
        self._cc = CCParams()
        #: tor's bootstrap phases (``status/bootstrap-phase``, STATUS_CLIENT BOOTSTRAP events)
        self.bootstrap_progress = Bootstrap("onionp2p.relay", nickname=self.nickname)
        #: a CREATE2 reached us through our published address (see the module docstring)
        self.orport_reachable = False
        #: reachability news: ``fn(action, severity, "ADDR:PORT")`` with tor's STATUS_SERVER
        #: actions CHECKING_REACHABILITY, REACHABILITY_SUCCEEDED, REACHABILITY_FAILED
        self.reachability = Listeners("reachability")

    @property
    def advertised_port(self) -> int:
        """The ORPort others connect to (descriptor): ``or_advertise_port`` or the listener's."""
        return self.config.or_advertise_port or self.port

    @property
    def protocols(self) -> str:
        """The subprotocol versions we advertise (descriptor ``proto``)."""
        return protover.advertised(self.config.congestion_control, self.config.cgo)

    def consensus_params(self) -> dict[str, int]:
        """The ``params`` of the consensus we hold (empty without one)."""
        directory = self.directory
        return directory.params() if directory is not None and hasattr(directory, "params") else {}

    def cc_params(self) -> CCParams | None:
        """Congestion-control parameters for circuits created now: our consensus's ``cc_*``
        values with tor's defaults (None: we run fixed windows only)."""
        if not self.config.congestion_control:
            return None
        directory = self.directory
        params = directory.params() if directory is not None and hasattr(directory, "params") else {}
        if params != self._cc_source:
            self._cc_source, self._cc = params, CCParams.from_consensus(params)
        return self._cc

    def padding_params(self) -> PaddingParams:
        """Channel padding parameters (nf_ito_low, nf_pad_relays, ...) of our consensus."""
        directory = self.directory
        params = directory.params() if directory is not None and hasattr(directory, "params") else {}
        if params != self._pad_source:
            self._pad_source, self._pad = params, PaddingParams.from_consensus(params)
        return self._pad

    @property
    def by_identity(self) -> dict[bytes, Channel]:
        """Open channels by the relay identity their peer proved (both directions)."""
        return self.chanmgr.by_identity

    def reconfigure(self, config: RelayConfig) -> None:
        """Apply a new configuration's live keys (bandwidth, DoS limits, extend_allow_private);
        the others take effect on restart. Raises ConfigError before changing anything."""
        limits = DosLimits.of(config)
        rate, burst = config.bandwidth_rate, config.effective_bandwidth_burst
        if (rate, burst) != (self.read_bucket.rate, self.read_bucket.burst):
            self.read_bucket = TokenBucket(rate, burst, now=time.monotonic())
        self.dos.limits = limits
        self.config = config

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self._ssl_ctx = tls.server_context(self.keys)
        self._tls_generation = self.keys.tls_generation
        try:
            self._server = await loop.create_server(
                lambda: Channel(self, initiator=False, keys=self.keys, my_addresses=(self.address,),
                                max_queue_cells=cfg.queue_cells_bound, handshake_timeout=cfg.handshake_timeout,
                                tcp_user_timeout=cfg.tcp_liveness),
                self.bind_address, self.port, ssl=self._ssl_ctx, reuse_address=True,
                ssl_handshake_timeout=cfg.handshake_timeout,
            )
        except OSError as exc:
            raise ListenError.from_os_error("OR port", self.bind_address, self.port, exc) from None
        self.port = self._server.sockets[0].getsockname()[1]
        self.bootstrap_progress.report("starting")
        self._publish()
        self._rotate_task = loop.create_task(self._rotate_loop())
        self._housekeeping_task = loop.create_task(self._housekeeping())
        self._log.info("relay listening", or_port=self.port, fingerprint=self.keys.fingerprint,
                       exit=self.exit_policy.is_exit)
        lim = self.dos.limits
        self._log.info("limits", max_concurrent_connections=lim.max_concurrent_connections,
                       circuit_creation_rate=lim.circuit_creation_rate,
                       circuit_creation_burst=lim.circuit_creation_burst,
                       max_mem_in_queues=lim.max_mem_in_queues, max_queue_cells=cfg.max_queue_cells,
                       max_circuits_per_channel=cfg.max_circuits_per_channel,
                       max_streams_per_circuit=cfg.max_streams_per_circuit,
                       handshake_timeout=cfg.handshake_timeout)
        if self.directory is not None:
            await self.directory.start(self)
        else:
            self.bootstrap_progress.report("done")  # no directory to load, no descriptor to test

    @property
    def or_address_text(self) -> str:
        """Our published ORPort, ``ADDR:PORT`` (tor's wording in reachability messages)."""
        return f"{self.address}:{self.advertised_port}"

    def _maybe_reachable(self, chan: Channel) -> None:
        """A CREATE2 was answered on ``chan``: proof that our ORPort is reachable if someone
        else connected to it at our published address (tor's onionskin_answer)."""
        if self.orport_reachable or chan.initiator or chan.peer_netinfo is None:
            return
        seen_as = chan.peer_netinfo.other_address
        if seen_as is None or str(seen_as) != self.address:
            return
        try:
            private = is_private_address(chan.peer_address or "")
        except LocalProtocolError:
            private = True
        if private and not self.config.extend_allow_private:
            return  # as tor's channel_is_local: a neighbour on our LAN proves nothing
        self.orport_reachable = True
        publishing = " Publishing server descriptor." if self.directory is not None else ""
        notice("onionp2p.relay", f"Self-testing indicates your ORPort {self.or_address_text} is reachable "
                                 f"from the outside. Excellent.{publishing}", nickname=self.nickname)
        self.reachability("REACHABILITY_SUCCEEDED", "NOTICE", self.or_address_text)

    def info(self) -> RelayInfo:
        return RelayInfo(
            nickname=self.nickname, address=self.address, or_port=self.advertised_port,
            rsa_id=self.keys.rsa_id_digest, ed_id=self.keys.identity_public,
            ntor_key=self.keys.onion_key_public, exit_policy=self.exit_policy.summary(),
            protocols=self.protocols,
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
        for task in (self._rotate_task, self._housekeeping_task):
            if task is not None:
                task.cancel()
        for handle in (self._unthrottle_handle, self._memory_check):
            if handle is not None:
                handle.cancel()
        self._unthrottle_handle = self._memory_check = None
        if self._server is not None:
            self._server.close()
        for circ in list(self.circuits):
            circ.destroy(DestroyReason.HIBERNATING)
        await self.chanmgr.close("relay shutting down")
        await self.exit.aclose()
        for chan in [*self.channels, *self._handshaking]:
            chan.close("relay shutting down")
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)

    # -- channel events -----------------------------------------------------------------

    def traffic(self) -> tuple[int, int]:
        """Bytes (read, written) on OR connections since start, closed ones included."""
        live = [*self.channels, *self._handshaking]
        return (self.stats["closed_bytes_in"] + sum(c.bytes_in for c in live),
                self.stats["closed_bytes_out"] + sum(c.bytes_out for c in live))

    # -- ChannelOwner ------------------------------------------------------------------

    def channel_open(self, chan: Channel) -> None:
        self._handshaking.discard(chan)
        self.channels.add(chan)
        # channel padding (padding-spec §2): towards clients, as their PADDING_NEGOTIATE says
        from_client = not (chan.peer and chan.peer.rsa_id)
        chan.start_padding(relay_padding(self.padding_params(), peer_is_client=from_client,
                                         link_version=chan.link_version),
                           accept_negotiate=True, params=self.padding_params)
        self.channel_events("connected", chan)
        if chan.peer is not None and chan.peer.rsa_id:
            self.chanmgr.register(chan)
            # a relay (it authenticated): its address's connection slot is given back
            addr = self._slots.pop(chan, None)
            if addr is not None:
                self.dos.connection_closed(addr)

    def channel_closed(self, chan: Channel) -> None:
        was_open = chan in self.channels
        if was_open or chan in self._handshaking:
            # its counters leave with it: keep them, so totals never go down (metrics)
            stats = self.stats
            stats["closed_cells_in"] += chan.cells_in
            stats["closed_cells_out"] += chan.cells_out
            stats["closed_bytes_in"] += chan.bytes_in
            stats["closed_bytes_out"] += chan.bytes_out
            stats["closed_padding_in"] += chan.padding_in
            stats["closed_padding_out"] += chan.padding_out
        self._handshaking.discard(chan)
        self._throttled.discard(chan)
        self.channels.discard(chan)
        addr = self._slots.pop(chan, None)
        if addr is not None:
            self.dos.connection_closed(addr)
        self.chanmgr.forget(chan)
        self.channel_events("closed" if was_open else "failed", chan)

    def queue_overflow(self, chan: Channel, circ_id: int) -> None:
        circ = chan.circuits.get(circ_id)
        if circ is not None:
            circ.log.warning("circuit queue over its bound; destroying", bound=chan.max_queue_cells)
            circ.destroy(DestroyReason.RESOURCELIMIT, "queue over its bound")

    def channel_connected(self, chan: Channel) -> bool:
        """A TCP+TLS connection is up (before the link handshake); False refuses it.

        Incoming connections take a slot of their address (DoSConnectionMaxConcurrentCount);
        connections we open to other relays do not.
        """
        if not chan.initiator:
            addr = chan.peer_address or "?"
            if not self.dos.connection_opened(addr):
                self.stats["conn_refused"] += 1
                self._log.debug("connection refused: too many from one address", peer_addr=addr)
                return False
            self._slots[chan] = addr
        self._handshaking.add(chan)
        return True

    def account_read(self, chan: Channel, nbytes: int) -> None:
        if self._read_budget is not None:
            self._read_budget -= nbytes
            if self._read_budget <= 0 and self._memory_check is None:
                # after this read has been handled: its cells are queued by then
                self._memory_check = asyncio.get_running_loop().call_soon(self._check_memory_soon)
        bucket = self.read_bucket
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
        delay = self.read_bucket.delay(time.monotonic())
        if delay > 0:
            self._unthrottle_handle = asyncio.get_running_loop().call_later(delay, self._unthrottle)
            return
        throttled, self._throttled = self._throttled, set()
        for chan in throttled:
            chan.resume_reading()

    def unknown_cell(self, chan: Channel, cell: Cell) -> None:
        cmd = cell.command
        if cmd in (CellCommand.CREATE2, CellCommand.CREATE_FAST):
            self._create2(chan, cell)
        elif cmd == CellCommand.CREATE:  # TAP: no tor client sends it any more
            chan.send_cell(cell.circ_id, CellCommand.DESTROY, Destroy(DestroyReason.PROTOCOL).encode())
        # RELAY, DESTROY, CREATED2 ... on an unknown circuit: dropped, as tor does.

    # -- circuits -----------------------------------------------------------------------

    def _create2(self, chan: Channel, cell: Cell) -> None:
        cid = cell.circ_id
        if cid == 0 or (chan.initiator and cid & 0x80000000) or (not chan.initiator and not cid & 0x80000000):
            # the peer used an ID from our half of the space (tor-spec §5.1.1)
            chan.send_cell(cid, CellCommand.DESTROY, Destroy(DestroyReason.PROTOCOL).encode())
            return
        if len(chan.circuits) >= self.config.max_circuits_per_channel:
            chan.send_cell(cid, CellCommand.DESTROY, Destroy(DestroyReason.RESOURCELIMIT).encode())
            return
        if chan.peer is None and not self.dos.allow_create(chan.peer_address or "?", time.monotonic()):
            # a client (relays authenticate) over DoSCircuitCreationRate/Burst
            self.stats["create_refused"] += 1
            chan.send_cell(cid, CellCommand.DESTROY, Destroy(DestroyReason.RESOURCELIMIT).encode())
            return
        fast = cell.command == CellCommand.CREATE_FAST
        try:
            cc = self.cc_params()
            if fast:  # tor clients' first hop when they lack our ntor key (one-hop directory circuits)
                cc = None
                reply, params = answer_create_fast(cell.payload)
            else:
                req = Create2.parse(cell.payload)
                reply, params = answer_create2(req.htype, req.hdata, rsa_id=self.keys.rsa_id_digest,
                                               ed_id=self.keys.identity_public,
                                               onion_keys=self.keys.onion_keys(),
                                               cc=cc, cgo=self.config.cgo and cc is not None)
        except ProtocolError as exc:
            self.stats["create_failed"] += 1
            self._log.debug("CREATE2 refused", chan_id=chan.id, error=str(exc))  # heartbeat counts it
            chan.send_cell(cid, CellCommand.DESTROY, Destroy(DestroyReason.PROTOCOL).encode())
            return
        crypto = CgoRelayCrypto(params.key_material) if params.relay_crypto == "cgo" else RelayCrypto(
            params.key_material)
        circ = self.new_circuit(chan, cid, crypto, params, cc)
        self.circuits.add(circ)
        self.stats["create_ok"] += 1
        if fast:
            self.stats["create_fast"] += 1
            chan.send_cell(cid, CellCommand.CREATED_FAST, reply)
        else:
            chan.send_cell(cid, CellCommand.CREATED2, Created2(reply).encode())
        self._maybe_reachable(chan)  # as tor's onionskin_answer, for both kinds

    def new_circuit(self, chan: Channel, circ_id: int, crypto: RelayCrypto | CgoRelayCrypto, params: HopParams | None = None,
                    cc: CCParams | None = None) -> OrCircuit:
        """The circuit object for an accepted CREATE2 (a subclass may return its own kind);
        ``params``: what the handshake agreed, ``cc``: our congestion-control parameters."""
        return OrCircuit(self, chan, circ_id, crypto, params, cc)

    # -- DoS housekeeping ---------------------------------------------------------------

    def queue_memory(self) -> tuple[int, list[tuple[OrCircuit | Channel, int]]]:
        """Bytes held in queues: the total, and who holds them.

        A circuit holds the cells queued for it on both its channels, what its exit
        streams have read but not packaged, and what they hold for their destinations
        (under congestion control a client that ignores XOFF fills that: tor leaves it to
        the same memory limit); a channel holds cells queued for circuits that are gone
        (DESTROY answers to a peer that does not read, for instance).
        """
        holders: list[tuple[OrCircuit | Channel, int]] = []
        attributed: dict[Channel, int] = {}
        total = 0
        for circ in self.circuits:
            cells = circ.prev_chan.queued_cells(circ.prev_id)
            attributed[circ.prev_chan] = attributed.get(circ.prev_chan, 0) + cells
            nxt = circ.next_chan
            if nxt is not None:
                n = nxt.queued_cells(circ.next_id)
                attributed[nxt] = attributed.get(nxt, 0) + n
                cells += n
            size = cells * CELL_MEMORY
            for stream in circ.streams.values():
                size += stream.buffered
            for conn in circ.conns.values():
                size += conn.unsent()
            if size:
                holders.append((circ, size))
                total += size
        for chan in self.channels:
            orphan = chan.queued_cells() - attributed.get(chan, 0)
            if orphan > 0:
                holders.append((chan, orphan * CELL_MEMORY))
                total += orphan * CELL_MEMORY
        return total, holders

    def _check_memory_soon(self) -> None:
        self._memory_check = None
        self.check_memory()

    def check_memory(self) -> int:
        """Free the largest queue holders if the total is over ``max_mem_in_queues``.

        Returns the bytes still held afterwards.
        """
        total, holders = self.queue_memory()
        cap = self.dos.limits.max_mem_in_queues
        victims = oom_victims(holders, cap)
        if victims:
            sizes = dict(holders)
            circuits = channels = 0
            for victim in victims:
                total -= sizes[victim]
                if isinstance(victim, Channel):
                    channels += 1
                    victim.close("queue memory limit")
                elif not victim.closed:
                    circuits += 1
                    victim.destroy(DestroyReason.RESOURCELIMIT, "queue memory limit")
            self.stats["oom_circuits_killed"] += circuits
            self.stats["oom_channels_closed"] += channels
            now = time.monotonic()
            loud = now - self._oom_logged_at >= OOM_LOG_INTERVAL  # the heartbeat has the totals
            if loud:
                self._oom_logged_at = now
            (self._log.warning if loud else self._log.debug)(
                "memory in queues over max_mem_in_queues; freed the largest holders",
                limit=cap, circuits_destroyed=circuits, channels_closed=channels, remaining=total)
        self._read_budget = self.dos.read_budget(total)
        return total

    async def _housekeeping(self) -> None:
        last_heartbeat = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            self.dos.prune(now)
            self.hs.sweep()
            self.hsdir.expire(time.time())
            if self.dos.limits.max_mem_in_queues:
                self.check_memory()
            if now - last_heartbeat >= HEARTBEAT_INTERVAL:
                last_heartbeat = now
                self._heartbeat()

    def _heartbeat(self) -> None:
        """One line per interval with what the DoS limits refused (nothing if nothing was)."""
        delta = {k: self.stats[k] - v for k, v in self._reported.items()}
        if any(delta.values()):
            self._reported = {k: self.stats[k] for k in self._reported}
            self._log.info("DoS limits active", interval=HEARTBEAT_INTERVAL, **delta)

    def circuit_closed(self, circ: OrCircuit, reason: int) -> None:
        for chan in (circ.prev_chan, circ.next_chan):
            if chan is not None:
                self.chanmgr.circuit_gone(chan)
        if circ in self.circuits:
            self.circuits.discard(circ)
            self.stats["destroyed"] += 1
            self.destroy_reasons[DestroyReason(reason).name if reason in DestroyReason._value2member_map_
                                 else str(reason)] += 1

    def _known_relay(self, rsa_id: bytes) -> bool | None:
        """Is ``rsa_id`` a relay of our consensus? None when we hold no consensus."""
        directory = self.directory
        routers = directory.routers() if directory is not None and hasattr(directory, "routers") else []
        if not routers:
            return None
        return any(r.info.rsa_id == rsa_id for r in routers)
