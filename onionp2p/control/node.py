"""The client node as the control port sees it (specs/control.md).

:class:`ClientControlAdapter` implements :class:`~onionp2p.control.server.ControlledNode` for a
:class:`~onionp2p.client.node.ClientNode`: it turns the node's circuits, streams and channels
into control-spec records, the client's :class:`~onionp2p.client.client.CircuitEvent` and
channel events and the node's stream/bootstrap events into CIRC, STREAM, ORCONN and
STATUS_CLIENT events, reports each circuit's RELAY_DATA byte totals (the server turns
them into CIRC_BW events), and carries out SIGNAL, EXTENDCIRCUIT, CLOSECIRCUIT,
CLOSESTREAM and GETCONF/SETCONF on the node.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Sequence

from onionp2p.client.client import CircuitEvent
from onionp2p.client.pathsel import choose_path
from onionp2p.control.formats import (
    BuildTimeoutSetEvent,
    CCState,
    CircEvent,
    CircuitBandwidth,
    CircuitInfo,
    ControlEvent,
    GuardEvent,
    GuardInfo,
    HsDescEvent,
    OrConnEvent,
    OrConnInfo,
    StatusEvent,
    StreamEvent,
    StreamInfo,
)
from onionp2p.errors import ConfigError, OnionError
from onionp2p.listeners import Listeners
from onionp2p.log import get_logger
from onionp2p.proto.control import ControlError
from onionp2p.proto.directory import RouterStatus

__all__ = ["ClientControlAdapter", "log_conf"]

log = get_logger("onionp2p.nodecontrol")

_CIRC_STATUS = {"launched": "LAUNCHED", "extended": "EXTENDED", "built": "BUILT", "failed": "FAILED",
                "closed": "CLOSED"}
# GETCONF keys: (tor type, getter, (parser, circmgr attribute) or None when read-only)
_BOOL = {"1": True, "0": False}


class ControlAdapterBase:
    """What every node's control adapter shares: the table of configuration keys
    (``self._conf``: tor name -> (tor type, getter, setter or None), matched
    case-insensitively like tor) and the listeners of control events (``self._fns``)."""

    _conf: dict[str, tuple]
    _fns: Listeners

    def conf_names(self) -> list[tuple[str, str]]:
        return [(k, v[0]) for k, v in self._conf.items()]

    def _key(self, key: str) -> str:
        for k in self._conf:
            if k.lower() == key.lower():
                return k
        raise ConfigError(f'Unrecognized configuration key "{key}"')

    def get_conf(self, key: str) -> list[str]:
        return self._conf[self._key(key)][1]()

    def add_listener(self, fn: Callable[[ControlEvent], None]) -> None:
        self._fns.add(fn)

    def remove_listener(self, fn: Callable[[ControlEvent], None]) -> None:
        self._fns.remove(fn)

    def _send(self, event: ControlEvent) -> None:
        self._fns(event)

    def _on_bootstrap(self, progress: int, tag: str, summary: str) -> None:
        """A bootstrap phase reached: ``STATUS_CLIENT NOTICE BOOTSTRAP`` (tor sends a relay's too)."""
        self._send(StatusEvent("CLIENT", "NOTICE", "BOOTSTRAP",
                               (("PROGRESS", str(progress)), ("TAG", tag), ("SUMMARY", summary))))


def log_conf(cfg) -> list[str]:
    """GETCONF Log of a node's config: tor's ``LEVEL file PATH``, or ``LEVEL stdout`` without
    a log file."""
    return [f"{cfg.log_level} file {cfg.log_file}" if cfg.log_file is not None else f"{cfg.log_level} stdout"]


class ClientControlAdapter(ControlAdapterBase):
    """ControlledNode for a ClientNode."""

    def __init__(self, node):
        self.node = node
        self._fns = Listeners("control event")
        self._circ_status: dict[int, str] = {}
        self._tasks: set[asyncio.Task] = set()
        self._conf = {
            "SocksPort": ("Port", lambda: [str(self.node.socks_port)], None),
            "ControlPort": ("Port", lambda: [str(self.node.control_port or 0)], None),
            "HTTPTunnelPort": ("Port", lambda: [str(self.node.http_tunnel_port or 0)], None),
            "DNSPort": ("Port", lambda: [str(self.node.dns_port or 0)], None),
            "MetricsPort": ("String", lambda: [f"127.0.0.1:{self.node.metrics_port}"]
                            if self.node.metrics_port is not None else [], None),
            "DataDirectory": ("Filename", lambda: [str(self.node.cfg.data_dir)], None),
            "MaxCircuitDirtiness": ("Interval", lambda: [str(int(self.node.circmgr.dirtiness))],
                                    (lambda v: _int(v, 1, 7 * 86400), "dirtiness")),
            "CircuitBuildTimeout": ("Interval", lambda: [str(int(self.node.circmgr.build_timeout))],
                                    (lambda v: _int(v, 1, 600), "build_timeout")),
            "LearnCircuitBuildTimeout": ("Boolean", lambda: [str(int(self.node.circmgr.learn_build_timeout))],
                                         (_bool, "learn_build_timeout")),
            "EnforceDistinctSubnets": ("Boolean", lambda: [str(int(self.node.circmgr.enforce_distinct_subnets))],
                                       (_bool, "enforce_distinct_subnets")),
            # exclude_nodes / strict_nodes (SETCONF of ExcludeNodes would need the guard set refiltered:
            # change the config and reload instead)
            "ExcludeNodes": ("RouterList", lambda: [",".join(self.node.circmgr.exclude_nodes.items)]
                             if self.node.circmgr.exclude_nodes else [], None),
            "StrictNodes": ("Boolean", lambda: [str(int(self.node.circmgr.strict_nodes))],
                            (_bool, "strict_nodes")),
            "SafeLogging": ("String", lambda: ["1" if self.node.cfg.safe_logging else "0"], None),
            "CookieAuthentication": ("Boolean", lambda: ["1"], None),
            "HashedControlPassword": ("LineList", lambda: [], None),
            "ControlSocket": ("LineList", lambda: [], None),
            "Nickname": ("String", lambda: ["Unnamed"], None),
            "ORPort": ("LineList", lambda: [], None),  # unset on a client, as tor answers ("250 ORPort")
            "DirPort": ("LineList", lambda: [], None),
            "BridgeRelay": ("Boolean", lambda: ["0"], None),
            "Log": ("LineList", lambda: log_conf(self.node.cfg), None),
            "DisableDebuggerAttachment": ("Boolean", lambda: ["1"], None),
            "BandwidthRate": ("DataSize", lambda: [str(1 << 30)], None),
            "BandwidthBurst": ("DataSize", lambda: [str(1 << 30)], None),
            "RelayBandwidthRate": ("DataSize", lambda: ["0"], None),
            "RelayBandwidthBurst": ("DataSize", lambda: ["0"], None),
            "MaxAdvertisedBandwidth": ("DataSize", lambda: [str(1 << 30)], None),
            "__OwningControllerProcess": ("String", lambda: [], None),
            # tor options onionp2p has no setting for: their unset value, as a tor client
            # reports it ("250 ExitRelay=auto", "250 UseMicrodescriptors=auto"; no onion
            # services, so the virtual HiddenServiceOptions is empty: "250 HiddenServiceOptions").
            # stem's get_exit_policy() falls back to ExitRelay, ExitPolicyRejectPrivate,
            # ExitPolicy and exit-policy/default when exit-policy/full fails (a client): with
            # these it builds "reject private:*, reject *:*", a policy that exits nowhere.
            "ExitRelay": ("Boolean+Auto", lambda: ["auto"], None),
            "ExitPolicy": ("LineList", lambda: [], None),
            "ExitPolicyRejectPrivate": ("Boolean", lambda: ["1"], None),
            "UseMicrodescriptors": ("Boolean+Auto", lambda: ["auto"], None),
            "HiddenServiceOptions": ("Virtual", lambda: [], None),
            # stem's create_ephemeral_hidden_service asks (onion services here are never
            # single-hop / non-anonymous)
            "HiddenServiceSingleHopMode": ("Boolean", lambda: ["0"], None),
            "HiddenServiceNonAnonymousMode": ("Boolean", lambda: ["0"], None),
        }
        node.client.events.add(self._on_circuit)
        node.client.channel_events.add(self._on_channel)
        node.events.add(self._on_node)
        node.circmgr.buildtimeout_events.add(lambda kind, args: self._send(BuildTimeoutSetEvent(kind, args)))
        node.guards.events.add(lambda fp, nick, status: self._send(GuardEvent(fp, nick or None, status)))
        node.hs_desc_events.add(lambda action, address, hsdir, desc_id, reason:
                                self._send(HsDescEvent(action, address, hsdir, desc_id, reason)))

    # -- plain properties -----------------------------------------------------------------------

    @property
    def config_file(self) -> str | None:
        return self.node.config_file

    @property
    def started_at(self) -> float:
        return self.node.started_at

    @property
    def fingerprint(self) -> str | None:
        return None

    @property
    def address(self) -> str | None:
        return None

    def exit_policy(self) -> None:
        """A client is no relay: GETINFO exit-policy/* answers 552 Not running in server mode."""
        return None

    # -- configuration ------------------------------------------------------------------------------

    def set_conf(self, pairs: Sequence[tuple[str, str | None]]) -> None:
        plan = []  # parse everything first, then apply: all or nothing
        for key, value in pairs:
            k = self._key(key)
            settable = self._conf[k][2]
            if settable is None:
                raise ConfigError(f"{k} cannot be changed while running")
            if value is None:
                raise ConfigError(f"{k} has no default to reset to while running")
            parse, attr = settable
            plan.append((attr, parse(value)))
        for attr, value in plan:
            setattr(self.node.circmgr, attr, value)

    # -- state --------------------------------------------------------------------------------------

    def _circuit_info(self, circ, status: str | None = None, reason: str | None = None) -> CircuitInfo:
        if status is None:
            status = {"built": "BUILT", "launched": "EXTENDED" if circ.hops else "LAUNCHED"}.get(circ.state, "CLOSED")
            if status == "BUILT" and circ.id in self.node.circmgr.guard_waiting():
                status = "GUARD_WAIT"  # built through a non-primary guard, waiting for a better one
        layers = circ.core.layers
        last = layers[-1] if layers and len(layers) == len(circ.path) else None
        return CircuitInfo(
            id=circ.id, status=status, path=tuple((h.fingerprint, h.nickname) for h in circ.hops),
            build_flags=("IS_INTERNAL", "NEED_CAPACITY") if circ.purpose != "GENERAL" else ("NEED_CAPACITY",),
            purpose=circ.purpose, hs_state=circ.hs_state, rend_query=circ.rend_query,
            time_created=circ.created_at, reason=reason,
            hop_handshakes=tuple(layer.handshake for layer in layers),
            hop_relay_crypto=tuple(layer.relay_crypto for layer in layers),
            congestion_control=None if last is None else ("vegas" if last.cc is not None else "fixed"),
            cc=None if last is None or last.cc is None else CCState.of(last.cc),
        )

    def client_onion_auth(self):
        """Our client-authorization keys (ONION_CLIENT_AUTH_*; control/onionauth.py)."""
        return self.node.onion_auth

    def onion_auth_changed(self, identity: bytes) -> None:
        self.node.hs.forget(identity)  # as tor, drop what is cached for that service

    def circuits(self) -> list[CircuitInfo]:
        return [self._circuit_info(c) for c in self.node.client.circuits.values()
                if c.state in ("launched", "built")]

    def streams(self) -> list[StreamInfo]:
        return [_stream_info(r) for r in self.node.streams.values()]

    def circuit_bandwidth(self) -> list[CircuitBandwidth]:
        """RELAY_DATA payload bytes (received = read, sent = written) of the open circuits."""
        out = []
        for c in self.node.client.circuits.values():
            if c.state in ("launched", "built"):
                layers = c.core.layers
                vegas = layers[-1].cc if layers else None
                out.append(CircuitBandwidth(c.id, c.bytes_received, c.bytes_sent, c.bytes_received, c.bytes_sent,
                                            None if vegas is None else CCState.of(vegas)))
        return out

    def _nick(self, rsa_id: bytes) -> str | None:
        fp = rsa_id.hex().upper()
        for r in self.node.routers():
            if r.fingerprint == fp:
                return r.nickname
        return None

    def _orconn(self, chan, status: str, reason: str | None = None) -> OrConnInfo:
        peer = chan.peer
        if peer is not None and peer.rsa_id:
            return OrConnInfo(id=chan.id, status=status, fingerprint=peer.rsa_id.hex().upper(),
                              nickname=self._nick(peer.rsa_id), ncircs=len(chan.circuits), reason=reason)
        return OrConnInfo(id=chan.id, status=status, address=f"{chan.peer_address}", reason=reason)

    def orconns(self) -> list[OrConnInfo]:
        return [self._orconn(c, "CONNECTED") for c in self.node.client.channels.values() if not c.closed]

    def traffic(self) -> tuple[int, int]:
        return self.node.client.traffic()

    def bootstrap_status(self) -> tuple[int, str, str]:
        return self.node.bootstrap

    def network_status(self) -> list[RouterStatus]:
        return list(self.node.routers())

    def guards(self) -> list[GuardInfo]:
        nicks = {r.fingerprint: r.nickname for r in self.node.routers()}
        return [GuardInfo(g.fingerprint, nicks.get(g.fingerprint), self.node.guards.status(g.fingerprint))
                for g in self.node.guards.sampled]

    def listeners(self, kind: str) -> list[tuple[str, int]]:
        if kind == "socks" and self.node.socks is not None:
            return [(self.node.cfg.socks_address[0], self.node.socks_port)]
        if kind == "httptunnel" and self.node.http_tunnel_port is not None:
            return [("127.0.0.1", self.node.http_tunnel_port)]
        if kind == "dns" and self.node.dns_port is not None:
            return [("127.0.0.1", self.node.dns_port)]
        if kind == "control" and self.node.control_port:
            return [("127.0.0.1", self.node.control_port)]
        if kind == "metrics" and self.node.metrics_port is not None:
            return [("127.0.0.1", self.node.metrics_port)]
        return []

    # -- events ---------------------------------------------------------------------------------------

    def _on_circuit(self, ev: CircuitEvent) -> None:
        circ = self.node.client.circuits.get(ev.circuit_id)
        status = _CIRC_STATUS.get(ev.kind, "CLOSED")
        reason = ev.reason if status in ("FAILED", "CLOSED") else None
        if circ is not None:
            info = self._circuit_info(circ, status, reason)
        else:
            info = CircuitInfo(id=ev.circuit_id, status=status, path=(), purpose=ev.purpose,
                               hs_state=ev.hs_state, rend_query=ev.rend_query, reason=reason)
        if status in ("FAILED", "CLOSED") and reason not in _CIRC_REASONS:
            info = CircuitInfo(**{**info.__dict__, "reason": "FINISHED" if status == "CLOSED" else "MISC"})
        self._send(CircEvent(info))

    def _on_channel(self, kind: str, chan) -> None:
        self._send(OrConnEvent(self._orconn(chan, "CONNECTED" if kind == "connected" else "CLOSED",
                                            None if kind == "connected" else "DONE")))

    def _on_node(self, event) -> None:
        if event[0] == "stream":
            self._send(StreamEvent(_stream_info(event[1])))
        elif event[0] == "status":
            self._on_bootstrap(*event[1:])

    # -- onion services (ADD_ONION / DEL_ONION) -----------------------------------------------------

    async def add_onion(self, key, ports, *, detach: bool, owner: int, max_streams: int,
                        max_streams_close_circuit: bool, client_keys) -> tuple[str, object]:
        """Host a service for a controller: (ServiceID, its identity key). 550 if the
        address is already hosted here (tor: "Onion address collision")."""
        from onionp2p.proto.ed25519x import ExpandedKey
        from onionp2p.proto.hs.address import encode_onion_address

        key = key if key is not None else ExpandedKey.from_seed(os.urandom(32))
        address = encode_onion_address(key.public).removesuffix(".onion")
        if address in self.node.onion_services:
            raise ControlError(550, "Onion address collision")
        svc = await self.node.add_onion_service(
            [str(p) for p in ports], key=key, max_streams=max_streams,
            max_streams_close_circuit=max_streams_close_circuit, client_keys=client_keys,
            owner="detached" if detach else owner)
        return svc.address, key

    async def del_onion(self, service_id: str, *, owner: int) -> bool:
        """Remove a service added by this connection or detached (tor refuses other
        connections' and the configured ones as unknown)."""
        who = self.node._onion_owner.get(service_id)
        if service_id not in self.node.onion_services or who not in ("detached", owner):
            return False
        return await self.node.remove_onion_service(service_id)

    def onions(self, *, detached: bool, owner: int) -> list[str]:
        """GETINFO onions/current (this connection's) or onions/detached (added with Detach)."""
        want = "detached" if detached else owner
        return [a for a, who in self.node._onion_owner.items() if who == want]

    def control_connection_closed(self, conn_id: int) -> None:
        """The services a connection added without Detach go with it, as in tor."""
        for address, who in list(self.node._onion_owner.items()):
            if who == conn_id:
                task = asyncio.get_running_loop().create_task(self.node.remove_onion_service(address))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # -- actions --------------------------------------------------------------------------------------

    async def signal(self, name: str) -> None:
        name = name.upper()
        if name == "NEWNYM":
            self.node.circmgr.new_identity()
            self.node.hs.new_identity()  # tor's hs_client_purge_state
        elif name in ("SHUTDOWN", "HALT"):
            self.node.shutdown_requested.set()
        elif name == "HEARTBEAT":
            read, written = self.traffic()
            log.info("heartbeat", circuits=len(self.node.client.circuits), streams=len(self.node.streams),
                     bytes_read=read, bytes_written=written)
        elif name == "RELOAD":
            self.node.reload()
        # DUMP, DEBUG, CLEARDNSCACHE (we keep no DNS cache), ACTIVE, DORMANT: accepted

    async def extend_circuit(self, circ_id: int, path: list[str] | None, purpose: str) -> int:
        if circ_id != 0:
            raise ControlError(552, "Extending an existing circuit is not supported")
        routers = list(self.node.routers())
        if path:
            chosen = [self._lookup(spec, routers) for spec in path]
        else:
            guard = self.node.guards.pick(routers)
            chosen = choose_path(routers, port=None, guard=guard, rng=random.SystemRandom(),
                                 enforce_distinct_subnets=self.node.circmgr.enforce_distinct_subnets)
        try:
            circ, _task = await self.node.client.launch_circuit([r.info for r in chosen],
                                                                timeout=self.node.circmgr.current_build_timeout)
        except OnionError as exc:
            raise ControlError(551, f"Couldn't start circuit: {exc}") from None
        return circ.id

    @staticmethod
    def _lookup(spec: str, routers: list[RouterStatus]) -> RouterStatus:
        fp = spec.lstrip("$").split("~")[0].split("=")[0].upper()
        for r in routers:
            if r.fingerprint == fp or r.nickname == spec:
                return r
        raise ControlError(552, f'No such router "{spec}"')

    def close_circuit(self, circ_id: int, *, if_unused: bool = False) -> bool:
        circ = self.node.client.circuits.get(circ_id)
        if circ is None:
            return False
        if if_unused and circ.streams:
            return True
        circ.close()
        return True

    def close_stream(self, stream_id: int, reason: int) -> bool:
        return self.node.close_stream(stream_id)


_CIRC_REASONS = {"NONE", "TORPROTOCOL", "INTERNAL", "REQUESTED", "HIBERNATING", "RESOURCELIMIT",
                 "CONNECTFAILED", "OR_IDENTITY", "OR_CONN_CLOSED", "TIMEOUT", "FINISHED", "DESTROYED",
                 "NOPATH", "NOSUCHSERVICE", "MEASUREMENT_EXPIRED", "IP_NOW_REDUNDANT", "CHANNEL_CLOSED"}


def _stream_info(rec) -> StreamInfo:
    return StreamInfo(id=rec.id, status=rec.status, circ_id=rec.circuit_id, target=rec.target,
                      reason=rec.reason if rec.status in ("FAILED", "CLOSED") else None,
                      purpose=rec.purpose, socks_username=rec.socks_username,
                      client_protocol=getattr(rec, "client_protocol", "SOCKS5"))


def _int(v: str, lo: int, hi: int) -> int:
    try:
        n = int(v)
    except ValueError:
        raise ConfigError(f"not an integer: {v!r}") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{n} out of range {lo}-{hi}")
    return n


def _bool(v: str) -> bool:
    if v not in _BOOL:
        raise ConfigError(f"not a boolean (0 or 1): {v!r}")
    return _BOOL[v]
