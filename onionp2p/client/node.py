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
   control port can list and close it and emit STREAM events;
4. optionally serves the control port (:class:`~onionp2p.control.server.ControlServer`) and the
   Prometheus metrics port (:class:`~onionp2p.ops.metrics.MetricsServer` with a
   :class:`~onionp2p.ops.metrics.ClientCollector`, ``metrics_port``).

Bootstrap progress follows tor's phases (starting, requesting/loading status, enough
directory info, connecting to a relay, done), exposed for ``status/bootstrap-phase``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from onionp2p.client.circmgr import CircuitManager
from onionp2p.client.client import OnionClient
from onionp2p.client.guards import GuardSet
from onionp2p.config import CONTROL_PORT_DEFAULT, CONTROL_PORT_PREFERRED, ClientConfig
from onionp2p.errors import CircuitError, ConfigError, LocalProtocolError, StreamError
from onionp2p.listeners import Listeners
from onionp2p.log import get_logger
from onionp2p.proto.directory import RouterStatus
from onionp2p.proto.exitpolicy import is_private_address
from onionp2p.proto.relaycell import EndReason, Resolved

__all__ = ["ClientNode", "StreamRecord"]

log = get_logger("onionp2p.node")
_stream_ids = itertools.count(1)


@dataclass
class StreamRecord:
    """One application stream as the control port sees it."""

    id: int
    target: str
    status: str  # NEW, SENTCONNECT, SENTRESOLVE, SUCCEEDED, FAILED, CLOSED
    circuit_id: int = 0
    purpose: str = "USER"
    socks_username: str | None = None
    client_protocol: str = "SOCKS5"  # SOCKS4, SOCKS5, HTTPCONNECT or DNS (the front end)
    reason: str | None = None
    created_at: float = field(default_factory=time.time)
    writer: asyncio.StreamWriter | None = None


class ClientNode:
    """A running client. ``await start()`` (bootstraps), then use ``socks_port``; ``await stop()``."""

    def __init__(self, cfg: ClientConfig, *, routers: Callable[[], Sequence[RouterStatus]] | None = None,
                 params: Callable[[], Mapping[str, int]] | None = None, config_file: str | None = None):
        self.cfg = cfg
        self.config_file = config_file
        self.started_at = time.time()
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.client = OnionClient(congestion_control=cfg.congestion_control)
        self.directory = None
        if routers is None:
            from onionp2p.dir.client import ClientDirectory

            self.directory = ClientDirectory(cfg.data_dir, cfg.authorities, self.client)
            routers = self.directory.routers
            params = self.directory.params
        if params is not None:
            self.client.consensus_params = params
        self.routers = routers
        self.guards = GuardSet(cfg.data_dir / "guards.json", n_primary=cfg.num_primary_guards)
        if self.directory is not None:
            self.directory.dir_guards = self._directory_guards
        self.circmgr = CircuitManager(self.client, routers, self.guards, cfg)
        self.streams: dict[int, StreamRecord] = {}
        self.bootstrap = (0, "starting", "Starting")
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

    def _directory_guards(self, routers: Sequence[RouterStatus]) -> list[RouterStatus]:
        """The relays our directory refreshes may use: the running primary guards that are
        not marked down (guard-spec's directory guards), so that no other relay sees us."""
        by_fp = {r.fingerprint: r for r in routers}
        return [by_fp[fp] for fp in self.guards.primary(routers)
                if "Running" in by_fp[fp].flags and not self.guards.is_down(fp)]

    # -- lifecycle ----------------------------------------------------------------------------------

    def _phase(self, progress: int, tag: str, summary: str) -> None:
        self.bootstrap = (progress, tag, summary)
        log.info("bootstrap", progress=progress, phase=tag)
        self.events(("status", progress, tag, summary))

    async def start(self, *, ready_timeout: float = 120.0) -> None:
        from onionp2p.client.socksport import SocksServer

        self._phase(5, "conn", "Connecting to a directory")
        if self.directory is not None:
            await self.directory.bootstrap()
            await self.directory.start()
        self._phase(75, "enough_dirinfo", "Loaded enough directory info to build circuits")
        self.socks = SocksServer(self, host=self.cfg.socks_address[0], port=self.cfg.socks_address[1],
                                 handshake_timeout=self.cfg.socks_handshake_timeout,
                                 max_connections=self.cfg.socks_max_connections)
        await self.socks.start()
        await self._start_app_ports()
        if self.cfg.metrics_port is not None:
            await self._start_metrics()
        if self.cfg.control_port is not None:
            await self._start_control()
        await self.circmgr.start()
        self._phase(90, "ap_handshake_done", "Building circuits")
        await self.circmgr.ready(ready_timeout)
        self._phase(100, "done", "Done")

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
            except ConfigError:
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

    async def stop(self) -> None:
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
            reader, writer, circ = await self.circmgr.open_stream(req.host, req.port, req.isolation_key)
        except StreamError as exc:
            self._stream_status(rec, "FAILED", _end_name(exc.reason))
            raise
        except CircuitError as exc:
            self._stream_status(rec, "FAILED", "DESTROY" if exc.reason != "NOPATH" else "NOROUTE")
            raise
        rec.circuit_id = circ.id
        rec.writer = writer
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
        if rec is None or rec.writer is None:
            return False
        rec.writer.transport.abort()
        return True


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
