"""The client node: directory + guards + circuit manager + SOCKS + control, wired together.

Theory of operation
-------------------
:class:`ClientNode` is what ``onionp2p client`` and ``onionp2p testnet`` run. It

1. bootstraps a consensus (:class:`~onionp2p.dir.client.ClientDirectory`: cache, relays'
   directory caches over BEGIN_DIR, then the authorities) — or, in Tor mode, reads a real
   Tor network's directory (:mod:`onionp2p.dir.tordir`);
2. chooses guards (:class:`~onionp2p.client.guards.GuardSet`, persisted in the data dir) and keeps
   circuits ready (:class:`~onionp2p.client.circmgr.CircuitManager`);
3. serves SOCKS (:class:`~onionp2p.client.socksport.SocksServer`) and, when configured, the
   HTTP CONNECT port (:class:`~onionp2p.client.httptunnel.HttpTunnelServer`) and the DNS port
   (:class:`~onionp2p.client.dnsport.DnsPortServer`), for which it is the one backend: each
   request becomes a stream (or RESOLVE) on a circuit chosen by port and isolation key
   (credentials, client address, listener), tracked as a :class:`StreamRecord` so the
   control port can list and close it and emit STREAM events; a ``.onion`` target goes to
   the onion-service client (:class:`~onionp2p.client.hsclient.OnionServiceClient`: its
   descriptor cache and rendezvous circuits, circuits from
   :meth:`~onionp2p.client.circmgr.CircuitManager.build_internal`, our client-authorization
   keys from ``client_onion_auth_dir``), with the directory view of the node (our
   consensus, or the tor network's with ``--tor-dirauth-file``);
4. optionally serves the control port (:class:`~onionp2p.control.server.ControlServer`) and the
   Prometheus metrics port (:class:`~onionp2p.ops.metrics.MetricsServer` with a
   :class:`~onionp2p.ops.metrics.ClientCollector`, ``metrics_port``).

Bootstrap progress follows tor's phases and percentages (:mod:`onionp2p.bootstrap`): starting,
the consensus download (requesting_status, loading_status, or conn ... onehop_create first
when it comes from a relay), enough_dirinfo, then the first circuit (ap_conn ...
circuit_create) and done; each is logged at notice level (``Bootstrapped 75%
(enough_dirinfo): ...``), passed on as a node event and read by ``status/bootstrap-phase``.

Every listener (SOCKS, metrics, control) binds first (:meth:`ClientNode.listen`), before the
directory bootstrap, so a port in use fails at once (a
:class:`~onionp2p.errors.ListenError`) instead of after a minute of bootstrapping, and a
controller can follow the bootstrap from its start. SOCKS requests that arrive before the
node has enough directory info wait for it (up to ``circuit_build_timeout``), as tor's do.

:meth:`ClientNode.reload` (SIGHUP, control port ``SIGNAL RELOAD``) re-reads the
configuration and applies :data:`RELOADABLE_KEYS` at once; other changed keys are logged
as needing a restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from onionp2p import __version__
from onionp2p.bootstrap import Bootstrap
from onionp2p.client.cbt import CBTParams, CircuitBuildTimes
from onionp2p.client.circmgr import CircuitManager
from onionp2p.client.client import ClientCircuit, OnionClient
from onionp2p.client.guards import GuardSet
from onionp2p.client.hsclient import MAX_DESC_SIZE, STEP_TIMEOUT, OnionServiceClient
from onionp2p.client.hskeys import ClientOnionAuth
from onionp2p.client.pathsel import as_router_status
from onionp2p.config import CONTROL_PORT_DEFAULT, CONTROL_PORT_PREFERRED, ClientConfig
from onionp2p.errors import (
    CircuitError,
    ConfigError,
    ListenError,
    LocalProtocolError,
    OnionError,
    StreamError,
)
from onionp2p.listeners import Listeners
from onionp2p.log import LIVE_LOG_KEYS, apply_log_config, get_logger
from onionp2p.proto.directory import RelayInfo, RouterStatus
from onionp2p.proto.exitpolicy import is_private_address
from onionp2p.proto.hs.address import is_onion_name
from onionp2p.proto.relaycell import EndReason, Resolved

__all__ = ["ClientNode", "StreamRecord", "RELOADABLE_KEYS"]

#: ClientConfig keys a reload applies to the running client (README "Configuration")
RELOADABLE_KEYS = (
    *LIVE_LOG_KEYS, "preemptive_circuits", "preemptive_ports", "max_circuit_dirtiness",
    "circuit_build_timeout", "learn_circuit_build_timeout", "max_build_attempts", "enforce_distinct_subnets",
    "exclude_nodes", "strict_nodes", "stream_timeout",
    "max_stream_attempts", "max_circuits_per_isolation", "socks_handshake_timeout", "socks_max_connections",
    "client_reject_internal_addresses", "client_onion_auth_dir", "onion_service",
)

log = get_logger("onionp2p.node")
_stream_ids = itertools.count(1)


@dataclass(frozen=True)
class DirectoryView:
    """What the onion-service client needs of a consensus (the fields of
    :class:`~onionp2p.dir.tordir.TorNetworkView` it reads)."""

    routers: Sequence[RouterStatus]
    valid_after: int
    fresh_until: int
    srv_current: bytes | None = None
    srv_previous: bytes | None = None
    params: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class StreamRecord:
    """One application stream as the control port sees it (slots: one per open stream)."""

    id: int
    target: str
    status: str  # NEW, SENTCONNECT, SENTRESOLVE, SUCCEEDED, FAILED, CLOSED
    circuit_id: int = 0
    purpose: str = "USER"
    socks_username: str | None = None
    client_protocol: str = "SOCKS5"  # SOCKS4, SOCKS5, HTTPCONNECT or DNS (the front end)
    reason: str | None = None
    created_at: float = field(default_factory=time.time)
    #: the circuit stream's transport, once open (CLOSESTREAM aborts it); not its writer,
    #: which the SOCKS port's splice lets go
    transport: asyncio.BaseTransport | None = None


class ClientNode:
    """A running client. ``await start()`` (bootstraps), then use ``socks_port``; ``await stop()``."""

    def __init__(self, cfg: ClientConfig, *, routers: Callable[[], Sequence[RouterStatus]] | None = None,
                 params: Callable[[], Mapping[str, int]] | None = None, config_file: str | None = None,
                 load_config: Callable[[], ClientConfig] | None = None,
                 bw_weights: Callable[[], Mapping[str, int]] | None = None,
                 consensus_view: Callable[[], object | None] | None = None):
        """``routers``/``params``/``bw_weights``: a directory given from outside (a tor
        network's, or a test's) instead of our own; ``consensus_view()`` then gives its
        current consensus (a :class:`~onionp2p.dir.tordir.TorNetworkView`, or None) for onion
        services. ConfigError when ``client_onion_auth_dir`` is not a readable directory."""
        self.cfg = cfg
        self.config_file = config_file
        #: reads the configuration again for :meth:`reload` (the file plus command-line overrides)
        self.load_config = load_config
        self.started_at = time.time()
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.client = OnionClient(congestion_control=cfg.congestion_control, cgo=cfg.cgo,
                                  connection_padding=cfg.connection_padding,
                                  reduced_connection_padding=cfg.reduced_connection_padding)
        self.directory = None
        if routers is None:
            from onionp2p.dir.client import ClientDirectory

            self.directory = ClientDirectory(cfg.data_dir, cfg.authorities, self.client)
            routers = self.directory.routers
            params = self.directory.params
            bw_weights = self.directory.bw_weights
        if params is not None:
            self.client.consensus_params = params
        self.routers = routers
        # the consensus bandwidth-weights: the guard set samples with them, paths are chosen with them
        # guard-spec's parameters come from the consensus, overridden by guard_params
        self.guards = GuardSet(cfg.data_dir / "guards.json", n_primary=cfg.num_primary_guards,
                               bw_weights=bw_weights, params=self.client.consensus_params,
                               overrides=cfg.guard_params, version=f"onionp2p {__version__}")
        if self.directory is not None:
            self.directory.dir_guards = self._directory_guards
            self.directory.dir_guard_result = self.guards.dir_result
        #: the circuit build-time history (tor's state file BuildtimeHistogram), in our JSON
        self.build_times_file = cfg.data_dir / "build_times.json"
        self.circmgr = CircuitManager(self.client, routers, self.guards, cfg, cbt=self._load_build_times())
        self.circmgr.save_build_times = self._save_build_times
        self.consensus_view = consensus_view
        #: onion-service time periods of one shared-random protocol run: tor's TestingTorNetwork
        #: rule, and our own networks' (specs/directory.md §4.2); a tor network's consensus
        #: otherwise says (hsdir-interval). Client and service read it alike.
        self.hs_one_run_periods = cfg.testing_tor_network or consensus_view is None
        #: our client-authorization keys (tor's ClientOnionAuthDir; ONION_CLIENT_AUTH_*)
        self.onion_auth = ClientOnionAuth(cfg.client_onion_auth_dir)
        #: reaches onion services: ``.onion`` streams go through it
        self.hs = OnionServiceClient(self.client, directory=self.hs_directory, build=self._hs_circuit,
                                     http_get=_hs_http_get, client_keys=self.onion_auth.get,
                                     testing_tor_network=self.hs_one_run_periods,
                                     dirtiness=lambda: self.circmgr.dirtiness, excluded=self._hs_excluded)
        self.streams: dict[int, StreamRecord] = {}
        #: tor's bootstrap phases; ``bootstrap`` is its (percent, tag, summary)
        self.bootstrap_progress = Bootstrap("onionp2p.node")
        self.bootstrap_progress.report("starting")
        self.bootstrap_progress.follow(self.client)
        if self.directory is not None:
            self.directory.bootstrap_progress = self.bootstrap_progress
        self.socks = None
        self.http_tunnel = None  # HttpTunnelServer with cfg.http_tunnel_port
        self.dns = None          # DnsPortServer with cfg.dns_port
        self.control = None
        self.metrics = None
        self._collector = None
        #: node events: ``fn(("status", progress, tag, summary))``, ``fn(("stream", record))``
        self.events = Listeners("node event")
        self._tasks: set[asyncio.Task] = set()
        self.shutdown_requested = asyncio.Event()
        self._dirinfo = asyncio.Event()  # set once there is enough directory info for circuits
        self.bootstrap_progress.events.add(lambda *status: self.events(("status", *status)))
        #: hosted onion services by address (no ``.onion``), and who owns each: the id of the
        #: control connection that added it without Detach, "detached" (ADD_ONION Detach), or
        #: None (the config or the library API)
        self.onion_services: dict = {}
        self._onion_owner: dict[str, int | str | None] = {}
        self._hs_retired: dict[tuple[str, str], int] = {}  # counts of services no longer hosted
        self._config_services: dict = {}  # OnionServiceConfig -> address, of the config's services
        #: descriptor uploads: ``fn(action, address, hsdir, descriptor_id, reason)`` (HS_DESC)
        self.hs_desc_events = Listeners("onion service descriptor")

    def _load_build_times(self) -> CircuitBuildTimes:
        """The saved build-time history (an unreadable file is moved aside, as guards.json)."""
        cbt = CircuitBuildTimes(CBTParams.from_consensus(self.client.consensus_params()),
                                initial_timeout_ms=self.cfg.circuit_build_timeout * 1000)
        try:
            text = self.build_times_file.read_text()
        except FileNotFoundError:
            return cbt
        try:
            cbt.load_state(json.loads(text))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            bad = self.build_times_file.with_name(self.build_times_file.name + ".bad")
            log.warning("circuit build times unreadable; learning them again", error=str(exc), moved_to=str(bad))
            os.replace(self.build_times_file, bad)
            cbt.reset()
        return cbt

    def _save_build_times(self, state: dict) -> None:
        from onionp2p.dir.client import atomic_write

        atomic_write(self.build_times_file, json.dumps(state).encode() + b"\n")

    @property
    def bootstrap(self) -> tuple[int, str, str]:
        """(percent, tag, summary) of the bootstrap phase reached."""
        return self.bootstrap_progress.status

    def hs_directory(self) -> object:
        """The consensus the onion-service client plans with: the given view (a tor
        network's), else our own consensus, else (routers given without one) the relays
        with the current hour as the consensus's validity and no shared-random values."""
        if self.consensus_view is not None and (view := self.consensus_view()) is not None:
            return view
        doc = self.directory.consensus if self.directory is not None else None
        if doc is not None:
            return DirectoryView(self.routers(), doc.valid_after, doc.fresh_until, doc.srv_current,
                                 doc.srv_previous, dict(doc.params))
        hour = int(time.time()) // 3600 * 3600
        return DirectoryView(self.routers(), hour, hour + 3600, params=dict(self.client.consensus_params()))

    async def _hs_circuit(self, last: RelayInfo | None, purpose: str, onion: str | None) -> ClientCircuit:
        """An onion-service circuit for the onion-service client (its ``build``)."""
        return await self.circmgr.build_internal(last, purpose, onion=onion, timeout=STEP_TIMEOUT)

    def _hs_excluded(self, relay: RelayInfo) -> str:
        """exclude_nodes for an HSDir or introduction point someone else chose (the
        onion-service client's ``excluded``): "" not excluded, "last" or with strict_nodes "never"."""
        if not self.circmgr.exclude_nodes.contains(as_router_status(relay, self.routers())):
            return ""
        return "never" if self.circmgr.strict_nodes else "last"

    def _directory_guards(self, routers: Sequence[RouterStatus]) -> list[RouterStatus]:
        """The relays our directory refreshes may use: guard-spec's directory guards (the
        same sample; up to guard-n-primary-dir-guards-to-use usable primary guards, else
        the next guard in guard-spec's order), so that no other relay sees us."""
        return self.guards.dir_guards(routers)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def listen(self) -> None:
        """Open every listener (control first, as tor: a controller follows the bootstrap with
        STATUS_CLIENT BOOTSTRAP events; then SOCKS, metrics); ListenError, with none left
        open, when one cannot bind. :meth:`start` calls it unless it was called before."""
        from onionp2p.client.socksport import SocksServer

        if self.socks is not None:
            return
        try:
            if self.cfg.control_port is not None:
                await self._start_control()
            socks = SocksServer(self, host=self.cfg.socks_address[0], port=self.cfg.socks_address[1],
                                handshake_timeout=self.cfg.socks_handshake_timeout,
                                max_connections=self.cfg.socks_max_connections,
                                extended_errors=self.cfg.socks_extended_errors)
            await socks.start()
            self.socks = socks
            await self._start_app_ports()
            if self.cfg.metrics_port is not None:
                await self._start_metrics()
        except BaseException:
            await self._close_listeners()
            self.socks = self.metrics = self.control = self._collector = None
            self.http_tunnel = self.dns = None
            raise

    async def start(self, *, ready_timeout: float = 120.0) -> None:
        boot = self.bootstrap_progress
        await self.listen()
        if self.directory is not None:
            try:
                await self.directory.bootstrap()
            except BaseException:  # no directory at all: close the listeners, nothing half-started
                await self._close_listeners()
                self.socks = self.metrics = self.control = self._collector = None
                self.http_tunnel = self.dns = None
                raise
            await self.directory.start()
        boot.report("enough_dirinfo")  # a cached consensus, or a given Tor network's view
        self._dirinfo.set()
        await self.circmgr.start()
        await self.circmgr.ready(ready_timeout)
        boot.report("done")  # already, unless the first circuit was built by someone else
        await self._start_configured_onion_services()

    async def _start_app_ports(self) -> None:
        """The optional HTTP CONNECT and DNS ports (tor's HTTPTunnelPort and DNSPort)."""
        if self.cfg.http_tunnel_port is not None:
            from onionp2p.client.httptunnel import HttpTunnelServer

            self.http_tunnel = HttpTunnelServer(self, port=self.cfg.http_tunnel_port,
                                                handshake_timeout=self.cfg.socks_handshake_timeout,
                                                max_connections=self.cfg.socks_max_connections)
            await self.http_tunnel.start()
        if self.cfg.dns_port is not None:
            from onionp2p.client.dnsport import DnsPortServer

            self.dns = DnsPortServer(self, port=self.cfg.dns_port)
            await self.dns.start()

    async def _start_control(self) -> None:
        from onionp2p.control.server import ControlServer

        port = self.cfg.control_port
        preferred = port == CONTROL_PORT_DEFAULT
        adapter = self.control_adapter()
        for attempt in ((CONTROL_PORT_PREFERRED, 0) if preferred else (port,)):
            self.control = ControlServer(adapter, port=attempt,
                                         cookie_path=self.cfg.data_dir / "control_auth_cookie",
                                         port_file=self.cfg.data_dir / "control_port")
            try:
                await self.control.start()
                break
            except ListenError:
                self.control = None
                if attempt == 0 or not preferred:
                    raise
                log.info("control port 9151 is taken; using any free port (see data_dir/control_port)")

    async def _start_metrics(self) -> None:
        from onionp2p.ops.metrics import ClientCollector, MetricsServer

        self._collector = ClientCollector(self)
        self.metrics = MetricsServer(self._collector, port=self.cfg.metrics_port)
        try:
            await self.metrics.start()
        except BaseException:
            self._collector.close()
            self.metrics = self._collector = None
            raise

    def control_adapter(self):
        from onionp2p.control.node import ClientControlAdapter

        return ClientControlAdapter(self)

    @property
    def socks_port(self) -> int:
        return self.socks.port if self.socks is not None else 0

    @property
    def http_tunnel_port(self) -> int | None:
        return self.http_tunnel.port if self.http_tunnel is not None else None

    @property
    def dns_port(self) -> int | None:
        return self.dns.port if self.dns is not None else None

    @property
    def control_port(self) -> int | None:
        return self.control.port if self.control is not None else None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    def reload(self) -> list[str]:
        """SIGHUP / SIGNAL RELOAD: read the configuration again and apply the
        :data:`RELOADABLE_KEYS` that changed (returned); the others keep their running value
        and are logged as needing a restart. A bad file is logged and changes nothing."""
        if self.load_config is None:
            log.info("reload: no configuration file")
            return []
        try:
            new = self.load_config()
            logging_changed = apply_log_config(self.cfg, new)
        except ConfigError as exc:
            log.warning("reload failed; keeping the running configuration", error=str(exc))
            return []
        old = self.cfg
        restart = sorted(f.name for f in fields(new) if f.name not in RELOADABLE_KEYS
                         and getattr(new, f.name) != getattr(old, f.name))
        self.cfg = replace(new, **{k: getattr(old, k) for k in restart})
        self.circmgr.configure(self.cfg)
        self.onion_auth.directory = self.cfg.client_onion_auth_dir
        try:  # tor reads ClientOnionAuthDir again on SIGHUP
            self.onion_auth.reload()
        except ConfigError as exc:
            log.warning("reload: client authorization keys not read again", error=str(exc))
        if self.socks is not None:
            self.socks.handshake_timeout = self.cfg.socks_handshake_timeout
            self.socks.max_connections = self.cfg.socks_max_connections
        if new.onion_service != old.onion_service and self._dirinfo.is_set():  # tor: services added/removed
            task = asyncio.get_running_loop().create_task(self._start_configured_onion_services())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        changed = sorted({*logging_changed, *(k for k in RELOADABLE_KEYS if getattr(new, k) != getattr(old, k))})
        log.info("configuration reloaded", changed=",".join(changed) or "nothing")
        if restart:
            log.warning("reload: these keys only change on restart", keys=",".join(restart))
        return changed

    async def _wait_dirinfo(self) -> None:
        """Wait until there is enough directory info to build circuits (SOCKS requests can
        come in while the node bootstraps); StreamError after ``circuit_build_timeout``."""
        if self._dirinfo.is_set():
            return
        try:
            await asyncio.wait_for(self._dirinfo.wait(), self.cfg.circuit_build_timeout)
        except TimeoutError:
            raise StreamError("still bootstrapping: not enough directory info yet", EndReason.TIMEOUT) from None

    async def _close_listeners(self) -> None:
        if self.control is not None:
            await self.control.stop()
        if self.metrics is not None:
            await self.metrics.stop()
            self._collector.close()
        if self.socks is not None:
            await self.socks.stop()
        for port in (self.http_tunnel, self.dns):
            if port is not None:
                await port.stop()

    async def stop(self) -> None:
        await self._close_listeners()
        await self._stop_onion_services()
        await self.circmgr.stop()
        if self.directory is not None:
            await self.directory.stop()
        for t in list(self._tasks):
            t.cancel()
        await self.client.close()

    # -- events -------------------------------------------------------------------------------------

    def _stream_status(self, rec: StreamRecord, status: str, reason: str | None = None) -> None:
        rec.status = status
        rec.reason = reason
        self.events(("stream", rec))
        if status in ("FAILED", "CLOSED"):
            self.streams.pop(rec.id, None)

    # -- SOCKS backend ------------------------------------------------------------------------------

    def _record(self, req, target: str, status: str, purpose: str = "USER") -> StreamRecord:
        user = req.username.decode("utf-8", "replace") if getattr(req, "username", None) else None
        rec = StreamRecord(next(_stream_ids), target, status, purpose=purpose, socks_username=user,
                           client_protocol=getattr(req, "client_protocol", "SOCKS5"))
        self.streams[rec.id] = rec
        self.events(("stream", rec))
        return rec

    async def open_stream(self, req) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        rec = self._record(req, f"{req.host}:{req.port}", "NEW")
        if self.cfg.client_reject_internal_addresses and is_internal_target(req.host):
            # tor's ClientRejectInternalAddresses: an anonymous connection to a private
            # address is almost surely a mistake, and would ask an exit about its own LAN
            log.warning("refusing SOCKS request to an internal address "
                        "(client_reject_internal_addresses)", target=req.host)
            self._stream_status(rec, "FAILED", "PRIVATE_ADDR")
            raise StreamError("connections to internal addresses are refused", EndReason.EXITPOLICY)
        try:
            await self._wait_dirinfo()
            if is_onion_name(req.host):  # (the SOCKS port refused malformed names already)
                reader, writer, circ = await self.hs.open_stream(req.host, req.port,
                                                                 isolation=req.isolation_key)
            else:
                reader, writer, circ = await self.circmgr.open_stream(req.host, req.port, req.isolation_key)
        except StreamError as exc:
            self._stream_status(rec, "FAILED", _end_name(exc.reason))
            raise
        except CircuitError as exc:
            self._stream_status(rec, "FAILED", "DESTROY" if exc.reason != "NOPATH" else "NOROUTE")
            raise
        rec.circuit_id = circ.id
        rec.transport = writer.transport
        self._stream_status(rec, "SENTCONNECT")
        self._stream_status(rec, "SUCCEEDED")

        def lost(exc, _rec=rec):
            if _rec.id in self.streams:
                self._stream_status(_rec, "CLOSED", "DONE" if exc is None else "DESTROY")

        writer.transport.add_close_callback(lost)
        return reader, writer

    async def resolve(self, req) -> list[str]:
        """SOCKS RESOLVE (tor's F0 extension): the addresses the exit found."""
        return await self._lookup(req, req.host, (4, 6), "resolve failed")

    async def resolve_ptr(self, req) -> str:
        """SOCKS RESOLVE_PTR (F1): the name the exit found for an address."""
        name = ipaddress.ip_address(req.host).reverse_pointer
        return (await self._lookup(req, name, (0,), "reverse resolve failed"))[0]

    async def _lookup(self, req, name: str, atypes: tuple[int, ...], failure: str) -> list[str]:
        """RESOLVE ``name`` at an exit; the answers of the types ``atypes`` (StreamError if none)."""
        resolved = await self.resolve_raw(req, name, atypes, failure)
        found = [a.value_text() for a in resolved.answers if a.atype in atypes and a.value_text()]
        if not found:
            raise StreamError(failure, EndReason.RESOLVEFAILED)
        return found  # type: ignore[return-value]

    async def resolve_raw(self, req, name: str, atypes: tuple[int, ...] = (0, 4, 6),
                          failure: str = "resolve failed") -> Resolved:
        """RELAY_RESOLVE ``name`` at an exit on a circuit for ``req.isolation_key``: the
        RESOLVED message as the exit sent it (the DNS port needs its errors and TTLs). The
        stream record (STREAM events, purpose DNS_REQUEST) succeeds when an answer of a type
        in ``atypes`` came back. StreamError(RESOLVEFAILED) when no circuit or exit answered."""
        rec = self._record(req, f"{req.host}:0", "NEWRESOLVE", purpose="DNS_REQUEST")
        try:
            await self._wait_dirinfo()
            resolved = await self.circmgr.resolve(name, req.isolation_key)
        except (CircuitError, StreamError, asyncio.TimeoutError, TimeoutError):
            self._stream_status(rec, "FAILED", "RESOLVEFAILED")
            raise StreamError(failure, EndReason.RESOLVEFAILED) from None
        found = any(a.atype in atypes and a.value_text() for a in resolved.answers)
        self._stream_status(rec, "SUCCEEDED" if found else "FAILED", None if found else "RESOLVEFAILED")
        if rec.id in self.streams:
            self._stream_status(rec, "CLOSED", "DONE")
        return resolved

    def close_stream(self, stream_id: int) -> bool:
        rec = self.streams.get(stream_id)
        if rec is None or rec.transport is None:
            return False
        rec.transport.abort()
        return True

    # -- onion services this node hosts (config [[onion_service]], the library API, ADD_ONION) --

    @staticmethod
    async def _hs_post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                       body: bytes) -> bytes:
        from onionp2p.dir.server import http_request

        return await http_request(reader, writer, "POST", path, body, max_size=10_000, timeout=30)

    async def add_onion_service(self, ports: Sequence[str], *, key=None, directory: Path | str | None = None,
                                num_intro_points: int = 3, max_streams: int = 0,
                                max_streams_close_circuit: bool = False, allow_unknown_ports: bool = False,
                                client_keys: Sequence[bytes] = (),
                                authorized_clients_dir: Path | str | None = None,
                                intro_dos: tuple[int, int] | None = None, wait_published: float | None = None,
                                owner: int | str | None = None):
        """Host an onion service and return its :class:`~onionp2p.client.hsservice.OnionService`
        (``.address`` is the onion address without ``.onion``).

        ``ports``: ``"VIRTPORT [TARGET]"`` lines as tor's HiddenServicePort. The identity key
        is ``key`` (an ExpandedKey), else the one in ``directory`` (tor's HiddenServiceDir
        layout; created if empty), else a new one kept in memory only (as ADD_ONION).
        ``client_keys`` / ``authorized_clients_dir`` (``*.auth`` files): restricted discovery.
        ``intro_dos``: (rate, burst) for the introduction points' INTRODUCE2 defense.
        With ``wait_published`` (seconds), return once a descriptor reached an HSDir.
        Raises ConfigError for bad ports or keys, LocalProtocolError if the address is
        already hosted here."""
        from onionp2p.client.hskeys import load_or_create_service_key
        from onionp2p.client.hsservice import OnionService
        from onionp2p.proto.ed25519x import ExpandedKey
        from onionp2p.proto.hs.cells import DosParams
        from onionp2p.proto.hs.service import parse_port_mapping

        mappings = [parse_port_mapping(p) for p in ports]
        if key is None:
            key = (load_or_create_service_key(directory) if directory is not None
                   else ExpandedKey.from_seed(os.urandom(32)))
        clients = list(client_keys)
        if authorized_clients_dir is not None:
            clients += _load_authorized_clients(Path(authorized_clients_dir))
        svc = OnionService(
            self.client, key, mappings, directory=self.hs_directory, build=self._hs_circuit,
            http_post=self._hs_post,
            num_intro_points=num_intro_points, max_streams=max_streams,
            max_streams_close_circuit=max_streams_close_circuit, allow_unknown_ports=allow_unknown_ports,
            client_keys=clients, dos_defense=DosParams(*intro_dos) if intro_dos else None,
            on_desc_event=lambda *ev: self.hs_desc_events(*ev),
            testing_tor_network=self.hs_one_run_periods,
            excluded=lambda rs: self.circmgr.exclude_nodes.contains(rs))
        if svc.address in self.onion_services:
            raise LocalProtocolError(f"onion service {svc.address} is already hosted here")
        self.onion_services[svc.address] = svc
        self._onion_owner[svc.address] = owner
        await self._dirinfo.wait()
        await svc.start()
        if wait_published is not None:
            await svc.wait_published(wait_published)
        return svc

    async def remove_onion_service(self, address: str) -> bool:
        """Stop hosting ``address`` (with or without ``.onion``); False if it is not hosted here."""
        svc = self.onion_services.pop(address.lower().removesuffix(".onion"), None)
        if svc is None:
            return False
        self._onion_owner.pop(svc.address, None)
        await svc.stop()
        for key, n in _service_counts(svc).items():  # the metrics' totals keep what it counted
            self._hs_retired[key] = self._hs_retired.get(key, 0) + n
        return True

    def onion_service_counts(self) -> dict[tuple[str, str], int]:
        """What the hosted services counted since start, by (what, outcome): introductions
        (INTRODUCE2: accepted, replay, malformed, bad_mac, rate_limited ...), rendezvous
        (success, failed), streams (accepted, refused), uploads (success, failed)."""
        out = dict(self._hs_retired)
        for svc in self.onion_services.values():
            for key, n in _service_counts(svc).items():
                out[key] = out.get(key, 0) + n
        return out

    async def _start_configured_onion_services(self) -> None:
        """Host the ``[[onion_service]]`` tables of the config; on a reload, stop those whose
        table is gone or changed and start the new ones, as tor does on SIGHUP. A service
        that cannot start (its keys unreadable ...) is logged and the others go on."""
        wanted = set(self.cfg.onion_service)
        for sc, address in list(self._config_services.items()):
            if sc not in wanted:
                del self._config_services[sc]
                await self.remove_onion_service(address)
                log.info("onion service no longer configured", address=address + ".onion", dir=str(sc.dir))
        for sc in self.cfg.onion_service:
            if sc in self._config_services:
                continue
            try:
                svc = await self._add_configured(sc)
            except (OnionError, OSError) as exc:  # (the CLI checked the keys before starting)
                log.error("onion service not started", dir=str(sc.dir), error=str(exc))
                continue
            self._config_services[sc] = svc.address
            log.info("hosting onion service", address=svc.address + ".onion", dir=str(sc.dir))

    async def _add_configured(self, sc):
        return await self.add_onion_service(
                sc.ports, directory=sc.dir, num_intro_points=sc.num_intro_points, max_streams=sc.max_streams,
                max_streams_close_circuit=sc.max_streams_close_circuit,
                allow_unknown_ports=sc.allow_unknown_ports, authorized_clients_dir=sc.authorized_clients_dir,
                intro_dos=(sc.intro_dos_rate_per_sec, sc.intro_dos_burst_per_sec)
                if sc.enable_intro_dos_defense else None)

    async def _stop_onion_services(self) -> None:
        for address in list(self.onion_services):
            await self.remove_onion_service(address)


def _service_counts(svc) -> dict[tuple[str, str], int]:
    out = {("introductions", k): n for k, n in svc.core.counts.items()}
    for table, counts in svc.counts.items():
        out.update({(table, k): n for k, n in counts.items()})
    return out


def _load_authorized_clients(directory: Path) -> list[bytes]:
    """The x25519 keys of a service's ``authorized_clients`` directory (``*.auth`` files,
    tor's format); raises ConfigError naming a bad file."""
    from onionp2p.errors import KeyFileError
    from onionp2p.proto.hs.keys import parse_auth

    keys = []
    try:
        files = sorted(directory.glob("*.auth"))
    except OSError as exc:
        raise ConfigError(f"authorized_clients_dir {directory}: {exc}") from None
    for f in files:
        try:
            keys.append(parse_auth(f.read_text(), str(f)))
        except (OSError, KeyFileError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{f}: {exc}") from None
    return keys


async def _hs_http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    """One descriptor GET over a BEGIN_DIR stream (at most tor's HS_DESC_MAX_LEN)."""
    from onionp2p.dir.server import http_request

    return await http_request(reader, writer, "GET", path, max_size=MAX_DESC_SIZE, timeout=STEP_TIMEOUT)


def is_internal_target(host: str) -> bool:
    """A private/internal IP literal, or "localhost" / "local" / "*.local" (as tor's
    ``tor_addr_hostname_is_local``)."""
    name = host.lower().rstrip(".")
    if name in ("localhost", "local") or name.endswith(".local") or name.endswith(".localhost"):
        return True
    try:
        return is_private_address(host)
    except LocalProtocolError:
        return False  # a hostname: resolved at the exit


def _end_name(reason: int) -> str:
    return EndReason(reason).name if reason in EndReason._value2member_map_ else "MISC"
