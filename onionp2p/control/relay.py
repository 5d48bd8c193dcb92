"""Relays and directory authorities as the control port sees them (specs/control.md).

Theory of operation
-------------------
:class:`RelayControlAdapter` implements :class:`~onionp2p.control.server.ControlledNode` for a
running :class:`~onionp2p.relay.relay.Relay` (``onionp2p relay`` with ``control_port``), and
:class:`AuthorityControlAdapter` for a directory authority and the relay it may run
beside it (``onionp2p authority``). Like tor's control port on a relay:

* ``circuit-status`` and ``stream-status`` are empty: a relay originates no circuits and
  has no application streams (the circuits it carries belong to its clients);
* ``orconn-status`` lists its channels: relays as ``$FINGERPRINT~nick`` (nickname from
  the cached consensus), clients as ``address:port``; ORCONN events follow the relay's
  channel events (CONNECTED when a link handshake completes, CLOSED when an open channel
  goes, FAILED when a connection dies in its handshake);
* ``traffic/*`` and BW events count bytes on every OR connection, closed ones included;
* ``ns/*`` answers from the relay's cached consensus (the authority's published one);
* ``fingerprint`` is the relay's RSA identity, ``address`` its ORPort address;
* ``exit-policy/full`` (``ipv4``, ``ipv6``) is the relay's exit policy as it is enforced,
  one rule per line as tor writes it; an authority without its relay answers tor's
  ``552 Not running in server mode``;
* GETCONF answers the relay's configuration under tor's key names. Keys that can change
  while running: ``BandwidthRate``, ``BandwidthBurst``, ``DoSConnectionMaxConcurrentCount``,
  ``DoSCircuitCreationRate``, ``DoSCircuitCreationBurst``, ``MaxMemInQueues``,
  ``ExtendAllowPrivateAddresses``; SETCONF of any other key is refused (553). tor options
  onionp2p has no setting for answer their unset value as tor does (:data:`UNSET_TOR_CONF`):
  ``ExitRelay=auto`` (whether a relay exits follows from its exit policy alone, which is
  tor's ``auto`` rule), ``UseMicrodescriptors=auto``, an empty ``HiddenServiceOptions``;
* SIGNAL: SHUTDOWN/HALT stop the process cleanly (the ``shutdown`` callback), RELOAD
  re-reads the configuration file and applies the keys above and the logging keys
  (``log_level``, ``log_format``, ``log_file``), announcing the keys above in a
  CONF_CHANGED event (SIGHUP does the same through :meth:`sighup`, which also sends the
  ``SIGNAL RELOAD`` event tor sends, so controllers drop cached values), HEARTBEAT/DUMP log
  a status line, NEWNYM and the rest are accepted and do nothing;
* EXTENDCIRCUIT is refused (551), CLOSECIRCUIT/CLOSESTREAM name no known object (552).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace

from onionp2p.control.formats import (
    ConfChangedEvent,
    GuardInfo,
    OrConnEvent,
    OrConnInfo,
    SignalEvent,
    StatusEvent,
)
from onionp2p.control.node import ControlAdapterBase, log_conf
from onionp2p.errors import ConfigError
from onionp2p.listeners import Listeners
from onionp2p.log import LIVE_LOG_KEYS, apply_log_config, get_logger
from onionp2p.proto.control import ControlError
from onionp2p.proto.directory import RouterStatus

__all__ = ["RelayControlAdapter", "AuthorityControlAdapter", "relay_status", "UNSET_TOR_CONF"]

log = get_logger("onionp2p.relaycontrol")

_ORCONN_STATUS = {"connected": ("CONNECTED", None), "closed": ("CLOSED", "DONE"),
                  "failed": ("FAILED", "DONE")}
#: tor key -> RelayConfig field, for the keys that can change while the relay runs
_LIVE_KEYS = {
    "BandwidthRate": "bandwidth_rate", "BandwidthBurst": "bandwidth_burst",
    "DoSConnectionMaxConcurrentCount": "dos_max_concurrent_connections",
    "DoSCircuitCreationRate": "dos_circuit_creation_rate",
    "DoSCircuitCreationBurst": "dos_circuit_creation_burst",
    "MaxMemInQueues": "max_mem_in_queues", "ExtendAllowPrivateAddresses": "extend_allow_private",
}

#: GETCONF keys of tor that onionp2p has no setting for, answered with tor's unset value:
#: ExitRelay "auto" (tor: exit iff an exit policy is configured; onionp2p relays exit
#: exactly as their exit_policy says, default reject *:*), UseMicrodescriptors "auto", and
#: the virtual HiddenServiceOptions, empty without onion services ("250 HiddenServiceOptions").
UNSET_TOR_CONF: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "ExitRelay": ("Boolean+Auto", lambda: ["auto"]),
    "UseMicrodescriptors": ("Boolean+Auto", lambda: ["auto"]),
    "HiddenServiceOptions": ("Virtual", lambda: []),
}


def relay_status(relay) -> dict:
    """What SIGUSR1 / SIGNAL DUMP / HEARTBEAT log about a relay."""
    return {
        "channels": len(relay.channels),
        "circuits": len(relay.circuits),
        "streams": sum(len(c.streams) for c in relay.circuits),
        "queued_cells": sum(ch.queued_cells() for ch in relay.channels),
        **relay.stats,
    }


def _parse_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise ConfigError(f"not an integer: {v!r}") from None
        if not lo <= n <= hi:
            raise ConfigError(f"{n} out of range {lo}-{hi}")
        return n
    return parse


def _parse_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise ConfigError(f"not a number: {v!r}") from None
    if not 0 <= x <= 1e6:
        raise ConfigError(f"{x} out of range 0-1000000")
    return x


def _parse_bool(v: str) -> bool:
    if v not in ("0", "1"):
        raise ConfigError(f"not a boolean (0 or 1): {v!r}")
    return v == "1"


_PARSERS: dict[str, Callable[[str], object]] = {
    "bandwidth_rate": _parse_int(1, 2**48), "bandwidth_burst": _parse_int(1, 2**48),
    "dos_max_concurrent_connections": _parse_int(0, 2**31 - 1), "dos_circuit_creation_rate": _parse_float,
    "dos_circuit_creation_burst": _parse_int(0, 2**31 - 1), "max_mem_in_queues": _parse_int(0, 2**48),
    "extend_allow_private": _parse_bool,
}


class _ServerAdapter(ControlAdapterBase):
    """What relays and authorities share: the relay part (optional), events, conf plumbing."""

    role = "relay"

    def __init__(self, relay, *, config_file: str | None = None, shutdown: Callable[[], None] | None = None,
                 metrics=None):
        self.relay = relay
        self._config_file = config_file
        self._shutdown = shutdown
        self.metrics = metrics  # a MetricsServer (for net/listeners/metrics), set by the caller
        self._started_at = time.time()
        self._fns = Listeners("control event")
        self._nicks: tuple[object, dict[str, str]] = (None, {})
        self._endpoints: dict[int, str] = {}  # channel id -> "host:port" of peers without identity
        self._conf: dict[str, tuple[str, Callable[[], list[str]]]] = {}
        if relay is not None:
            relay.channel_events.add(self._on_channel)
            relay.bootstrap_progress.events.add(self._on_bootstrap)
            relay.reachability.add(self._on_reachability)

    def close(self) -> None:
        """Stop listening to the relay's channel, bootstrap and reachability events."""
        if self.relay is not None:
            self.relay.channel_events.remove(self._on_channel)
            self.relay.bootstrap_progress.events.remove(self._on_bootstrap)
            self.relay.reachability.remove(self._on_reachability)

    # -- plain properties ---------------------------------------------------------------------

    @property
    def config_file(self) -> str | None:
        return self._config_file

    @property
    def started_at(self) -> float:
        return self._started_at

    @property
    def fingerprint(self) -> str | None:
        return self.relay.keys.fingerprint if self.relay is not None else None

    @property
    def address(self) -> str | None:
        return self.relay.address if self.relay is not None else None

    def exit_policy(self):
        """The relay's :class:`~onionp2p.proto.exitpolicy.ExitPolicy` (GETINFO exit-policy/*), None
        without a relay (an authority with ``run_relay = false``)."""
        return self.relay.exit_policy if self.relay is not None else None

    # -- configuration ------------------------------------------------------------------------

    def set_conf(self, pairs: Sequence[tuple[str, str | None]]) -> None:
        changes: dict[str, object] = {}
        for key, value in pairs:
            k = self._key(key)
            field = _LIVE_KEYS.get(k) if self.relay is not None else None
            if field is None:
                raise ConfigError(f"{k} cannot be changed while running")
            changes[field] = self._default(field) if value is None else _PARSERS[field](value)
        self.apply_live(changes)

    def _default(self, field: str):
        from onionp2p.config import RelayConfig

        return getattr(RelayConfig, field)

    def apply_live(self, changes: dict[str, object]) -> None:
        """Apply {RelayConfig field: value} for the live keys, all or nothing (ConfigError)."""
        relay = self.relay
        if "bandwidth_rate" in changes and "bandwidth_burst" not in changes:
            # a new rate leaves the burst as it is (unset means "the rate" only at start)
            changes = {**changes, "bandwidth_burst": relay.config.effective_bandwidth_burst}
        new = replace(relay.config, **changes)  # type: ignore[arg-type]
        if new.effective_bandwidth_burst < new.bandwidth_rate:
            raise ConfigError(f"BandwidthBurst {new.effective_bandwidth_burst} is smaller than "
                              f"BandwidthRate {new.bandwidth_rate}")
        relay.reconfigure(new)  # DosLimits validates (ConfigError) before anything changes
        log.info("configuration changed", **{k: str(v) for k, v in changes.items()})

    # -- state --------------------------------------------------------------------------------

    def circuits(self) -> list:
        return []  # no origin circuits (tor's circuit-status on a relay lists only its own)

    def streams(self) -> list:
        return []

    def _nick(self, fp: str) -> str | None:
        routers = self.network_status()
        key = tuple(r.fingerprint for r in routers)
        if self._nicks[0] != key:
            self._nicks = (key, {r.fingerprint: r.nickname for r in routers})
        return self._nicks[1].get(fp)

    def _endpoint(self, chan) -> str | None:
        """``host:port`` of the peer, remembered while the connection is up (a closed TLS
        transport forgets its peer address)."""
        endpoint = self._endpoints.get(chan.id)
        if endpoint is None:
            transport = getattr(chan, "_transport", None)  # the channel keeps no public peer port
            peername = transport.get_extra_info("peername") if transport is not None else None
            if not peername:
                return None
            host, port = chan.peer_address or peername[0], peername[1]
            endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if not chan.closed:
                self._endpoints[chan.id] = endpoint
        return endpoint

    def _orconn(self, chan, status: str, reason: str | None = None) -> OrConnInfo | None:
        peer = chan.peer
        ncircs = len(chan.circuits)
        if peer is not None and peer.rsa_id:
            fp = peer.rsa_id.hex().upper()
            return OrConnInfo(id=chan.id, status=status, fingerprint=fp, nickname=self._nick(fp),
                              ncircs=ncircs, reason=reason)
        endpoint = self._endpoint(chan)
        if endpoint is None:
            return None
        return OrConnInfo(id=chan.id, status=status, address=endpoint, ncircs=ncircs, reason=reason)

    def orconns(self) -> list[OrConnInfo]:
        if self.relay is None:
            return []
        found = (self._orconn(c, "CONNECTED") for c in list(self.relay.channels) if not c.closed)
        return [o for o in found if o is not None]

    def traffic(self) -> tuple[int, int]:
        return self.relay.traffic() if self.relay is not None else (0, 0)

    def bootstrap_status(self) -> tuple[int, str, str]:
        return self.relay.bootstrap_progress.status if self.relay is not None else (100, "done", "Done")

    def network_status(self) -> list[RouterStatus]:
        directory = getattr(self.relay, "directory", None)
        return list(directory.routers()) if directory is not None else []

    def guards(self) -> list[GuardInfo]:
        return []

    def listeners(self, kind: str) -> list[tuple[str, int]]:
        if kind == "or" and self.relay is not None:
            return [(self.relay.bind_address, self.relay.port)]
        if kind == "metrics" and self.metrics is not None:
            return [(self.metrics.host, self.metrics.port)]
        return []

    # -- events ---------------------------------------------------------------------------------

    def _on_channel(self, kind: str, chan) -> None:
        status, reason = _ORCONN_STATUS.get(kind, ("CLOSED", "DONE"))
        info = self._orconn(chan, status, reason) if self._fns or kind == "connected" else None
        if kind != "connected":
            self._endpoints.pop(chan.id, None)
        if info is not None:  # None: it died before we learnt its peer; nothing to name it by
            self._send(OrConnEvent(info))

    def _on_reachability(self, action: str, severity: str, where: str) -> None:
        self._send(StatusEvent("SERVER", severity, action, (("ORADDRESS", where),)))

    # -- actions --------------------------------------------------------------------------------

    async def signal(self, name: str) -> None:
        name = name.upper()
        if name in ("SHUTDOWN", "HALT"):
            if self._shutdown is not None:
                self._shutdown()
        elif name == "RELOAD":
            self.reload()
        elif name in ("HEARTBEAT", "DUMP"):
            log.info(f"{self.role} status", **self.status())
        # NEWNYM (a relay has no client circuits to renew), CLEARDNSCACHE, DEBUG, ACTIVE,
        # DORMANT: accepted, nothing to do

    def status(self) -> dict:
        return relay_status(self.relay) if self.relay is not None else {}

    def sighup(self) -> None:
        """The process got SIGHUP: like SIGNAL RELOAD, announced as tor does (``650 SIGNAL RELOAD``)."""
        self._send(SignalEvent("RELOAD"))
        self.reload()

    def reload(self) -> list[str]:
        """SIGHUP / SIGNAL RELOAD: nothing to re-read here (see RelayControlAdapter)."""
        return []

    async def extend_circuit(self, circ_id: int, path: list[str] | None, purpose: str) -> int:
        raise ControlError(551, f"Couldn't start circuit: this {self.role} builds no origin circuits")

    def close_circuit(self, circ_id: int, *, if_unused: bool = False) -> bool:
        return False

    def close_stream(self, stream_id: int, reason: int) -> bool:
        return False


def _or_port_lines(relay) -> list[str]:
    """tor's ORPort lines: one, or (published elsewhere than we listen) ``NoListen`` + ``NoAdvertise``."""
    listener = f"{relay.bind_address}:{relay.port}"
    published = relay.or_address_text
    return [listener] if published == listener else [f"{published} NoListen", f"{listener} NoAdvertise"]


def _relay_conf(adapter: _ServerAdapter, cfg) -> dict[str, tuple[str, Callable[[], list[str]]]]:
    """GETCONF keys of a relay (tor's names), read live where the value can change."""
    relay = adapter.relay
    dos = lambda: relay.dos.limits  # noqa: E731

    def bucket(attr: str) -> list[str]:
        b = relay.read_bucket
        return [str(int(getattr(b, attr)))] if b is not None else ["0"]

    return {
        "Nickname": ("String", lambda: [relay.nickname]),
        "DataDirectory": ("Filename", lambda: [str(cfg.data_dir)]),
        "Address": ("String", lambda: [relay.address]),
        "ORPort": ("LineList", lambda: _or_port_lines(relay)),
        "AssumeReachable": ("Boolean", lambda: ["1" if cfg.assume_reachable else "0"]),
        "ExitPolicy": ("LineList", lambda: relay.exit_policy.lines()),
        "ExitPolicyRejectPrivate": ("Boolean", lambda: ["1" if cfg.exit_reject_private else "0"]),
        "ContactInfo": ("String", lambda: [cfg.contact] if cfg.contact else []),
        "MyFamily": ("LineList", lambda: ["$" + fp for fp in cfg.family]),
        "BandwidthRate": ("DataSize", lambda: bucket("rate")),
        "BandwidthBurst": ("DataSize", lambda: bucket("burst")),
        "DoSConnectionMaxConcurrentCount": ("Integer", lambda: [str(dos().max_concurrent_connections)]),
        "DoSCircuitCreationRate": ("Float", lambda: [f"{dos().circuit_creation_rate:g}"]),
        "DoSCircuitCreationBurst": ("Integer", lambda: [str(dos().circuit_creation_burst)]),
        "MaxMemInQueues": ("Memory", lambda: [str(dos().max_mem_in_queues)]),
        "ExtendAllowPrivateAddresses": ("Boolean", lambda: ["1" if relay.extend_allow_private else "0"]),
        "DirAuthority": ("LineList", lambda: list(cfg.authorities)),
        "MetricsPort": ("String", lambda: [f"{adapter.metrics.host}:{adapter.metrics.port}"]
                        if adapter.metrics is not None else []),
        "SocksPort": ("LineList", lambda: ["0"]),
        "SafeLogging": ("String", lambda: ["1" if cfg.safe_logging else "0"]),
        "Log": ("LineList", lambda: log_conf(cfg)),
        **UNSET_TOR_CONF,
    }


class RelayControlAdapter(_ServerAdapter):
    """ControlledNode for a :class:`~onionp2p.relay.relay.Relay` run from a
    :class:`~onionp2p.config.RelayConfig`."""

    role = "relay"

    def __init__(self, relay, cfg, *, config_file: str | None = None,
                 shutdown: Callable[[], None] | None = None, metrics=None):
        super().__init__(relay, config_file=config_file, shutdown=shutdown, metrics=metrics)
        self.cfg = cfg
        self._conf = _relay_conf(self, cfg)

    def _default(self, field: str):
        return getattr(type(self.cfg), field)

    def listeners(self, kind: str) -> list[tuple[str, int]]:
        if kind == "dir":  # the directory cache (HTTP) that BEGIN_DIR streams reach
            server = getattr(self.relay.directory, "server", None)
            return [(server.host, server.port)] if server is not None and server.port else []
        return super().listeners(kind)

    def reload(self) -> list[str]:
        """Re-read the configuration file; apply the live keys; log keys that need a restart.
        Returns the live keys changed. A bad file is logged and changes nothing."""
        if self._config_file is None:
            log.info("reload: no configuration file")
            return []
        from onionp2p.config import load_relay_config

        try:
            new = load_relay_config(self._config_file)
        except ConfigError as exc:
            log.warning("reload failed; keeping the running configuration", error=str(exc))
            return []
        changes = {f: getattr(new, f) for f in _LIVE_KEYS.values() if getattr(new, f) != getattr(self.cfg, f)}
        if "bandwidth_burst" in changes or "bandwidth_rate" in changes:
            changes["bandwidth_burst"] = new.effective_bandwidth_burst
            changes.setdefault("bandwidth_rate", new.bandwidth_rate)
        restart = sorted(f.name for f in fields(new) if f.name not in _LIVE_KEYS.values()
                         and f.name not in LIVE_LOG_KEYS and getattr(new, f.name) != getattr(self.cfg, f.name))
        try:
            apply_log_config(self.cfg, new)  # first: it fails (a log file it cannot open) before changing anything
            if changes:
                self.apply_live(changes)
        except ConfigError as exc:
            log.warning("reload failed; keeping the running configuration", error=str(exc))
            return []
        self.cfg = new
        self._conf = _relay_conf(self, new)
        keys = [k for k, f in _LIVE_KEYS.items() if f in changes]
        if keys:
            self._send(ConfChangedEvent(tuple((k, v) for k in keys for v in (self.get_conf(k) or [None]))))
        if restart:
            log.warning("reload: these keys only change on restart", keys=",".join(restart))
        return sorted(changes)


class AuthorityControlAdapter(_ServerAdapter):
    """ControlledNode for a directory authority (:class:`~onionp2p.dir.authority.Authority`)
    and, when it runs one, its relay. ``ns/*`` is the authority's published consensus;
    traffic and ORCONN events cover its relay and the connections of its reachability
    tests are counted in ``traffic/*``."""

    role = "authority"

    def __init__(self, authority, cfg, *, relay=None, config_file: str | None = None,
                 shutdown: Callable[[], None] | None = None, metrics=None):
        super().__init__(relay, config_file=config_file, shutdown=shutdown, metrics=metrics)
        self.authority = authority
        self.cfg = cfg
        self._conf = {
            "Nickname": ("String", lambda: [authority.nickname]),
            "DataDirectory": ("Filename", lambda: [str(cfg.data_dir)]),
            "AuthoritativeDirectory": ("Boolean", lambda: ["1"]),
            "V3AuthoritativeDirectory": ("Boolean", lambda: ["1"]),
            "V3AuthVotingInterval": ("Interval", lambda: [str(authority.schedule.interval)]),
            "DirPort": ("LineList", lambda: [f"{cfg.dir_address[0]}:{authority.dir_port}"]),
            "ORPort": ("LineList",
                       lambda: [f"{relay.bind_address}:{relay.port}"] if relay is not None else ["0"]),
            "DirAuthority": ("LineList", lambda: list(cfg.authorities)),
            "ExtendAllowPrivateAddresses": ("Boolean", lambda: ["1" if relay is not None and
                                                                relay.extend_allow_private else "0"]),
            "MetricsPort": ("String", lambda: [f"{self.metrics.host}:{self.metrics.port}"]
                            if self.metrics is not None else []),
            "SafeLogging": ("String", lambda: ["1" if cfg.safe_logging else "0"]),
            "Log": ("LineList", lambda: log_conf(self.cfg)),
            **UNSET_TOR_CONF,
        }

    def reload(self) -> list[str]:
        """SIGHUP / SIGNAL RELOAD: re-read the configuration file and apply the logging keys
        (``log_level``, ``log_format``, ``log_file``); other changed keys are logged as needing
        a restart. A bad file is logged and changes nothing. Returns the keys applied."""
        if self._config_file is None:
            log.info("reload: no configuration file")
            return []
        from onionp2p.config import load_authority_config

        try:
            new = load_authority_config(self._config_file)
            changed = apply_log_config(self.cfg, new)
        except ConfigError as exc:
            log.warning("reload failed; keeping the running configuration", error=str(exc))
            return []
        restart = sorted(f.name for f in fields(new) if f.name not in LIVE_LOG_KEYS
                         and getattr(new, f.name) != getattr(self.cfg, f.name))
        self.cfg = replace(self.cfg, **{k: getattr(new, k) for k in LIVE_LOG_KEYS})
        if restart:
            log.warning("reload: these keys only change on restart", keys=",".join(restart))
        return changed

    def set_conf(self, pairs: Sequence[tuple[str, str | None]]) -> None:
        for key, _value in pairs:
            k = self._key(key)
            if k != "ExtendAllowPrivateAddresses" or self.relay is None:
                raise ConfigError(f"{k} cannot be changed while running")
        super().set_conf(pairs)

    def traffic(self) -> tuple[int, int]:
        read, written = super().traffic()
        r2, w2 = self.authority.client.traffic()  # reachability tests
        return read + r2, written + w2

    def network_status(self) -> list[RouterStatus]:
        cur = self.authority.current
        return cur.router_statuses() if cur is not None else []

    def listeners(self, kind: str) -> list[tuple[str, int]]:
        if kind == "dir":
            return [(self.cfg.dir_address[0], self.authority.dir_port)]
        return super().listeners(kind)

    def status(self) -> dict:
        return {**self.authority.status(), **super().status()}
