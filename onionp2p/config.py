"""TOML configuration for relays, clients and directory authorities.

Theory of operation
-------------------
Each node kind reads one flat TOML table (top-level keys, no sections) into a frozen
dataclass: :class:`RelayConfig`, :class:`ClientConfig` or :class:`AuthorityConfig`. Every
field has a documented default, so an empty file is a valid configuration.

Validation is strict and happens once, at load time. Every problem of a file is reported
at once, in one :class:`~onionp2p.errors.ConfigError` whose ``problems`` are one line each
(``FILE: KEY: REASON``), so a user fixes a file in one round:

* an unknown key is an error naming the key and the file (typos such as ``exit_polcy``
  must not silently fall back to a default), with "did you mean ``exit_policy``?" when a
  known key is close (:mod:`difflib`);
* a value of the wrong type or out of range is an error naming the key path
  (``family[2]``) and the source; checks between keys run on the keys that were valid;
* malformed TOML and unreadable files are reported as ``ConfigError`` too — no
  ``tomllib``, ``OSError`` or ``ValueError`` escapes.

``bool`` is never accepted where an integer is expected (TOML ``true`` is not ``1``).
Addresses are ``"host:port"`` strings parsed by :func:`parse_hostport`; port 0 means "let
the OS pick a free port". A relative ``data_dir`` is resolved against the directory holding
the configuration file (``~`` is expanded), so a node behaves the same whatever its
working directory. Exit policies are parsed with :class:`~onionp2p.proto.exitpolicy.ExitPolicy`
using ``exit_reject_private``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from onionp2p.defaults import (
    GUARD_PARAM_RANGES,
    GUARD_RETRY_DIVISOR,
    GUARD_RETRY_DIVISOR_RANGE,
    HANDSHAKE_TIMEOUT,
    MAX_QUEUE_CELLS,
    TCP_USER_TIMEOUT,
)
from onionp2p.errors import ConfigError
from onionp2p.proto.address import format_hostport, parse_hostport
from onionp2p.proto.exitpolicy import REJECT_ALL, ExitPolicy
from onionp2p.proto.routerset import NodeSet

__all__ = [
    "LOG_LEVELS",
    "LOG_FORMATS",
    "RelayConfig",
    "ClientConfig",
    "AuthorityConfig",
    "CONTROL_PORT_DEFAULT",
    "load_relay_config",
    "load_client_config",
    "load_authority_config",
    "dump_config",
    "parse_hostport",
    "format_hostport",
]

#: Accepted ``log_level`` values (``notice``: tor's default level, between info and warning).
LOG_LEVELS = ("debug", "info", "notice", "warning", "error")
#: Accepted ``log_format`` values.
LOG_FORMATS = ("console", "json")

_NICKNAME = re.compile(r"[A-Za-z0-9]{1,19}")
_FINGERPRINT = re.compile(r"\$?([0-9A-Fa-f]{40})")
_MAX_TEXT = 1024
_NO_LIMIT = 2**31 - 1  # "0 = off" for counts of cells and circuits

T = TypeVar("T")


# -- host:port --------------------------------------------------------------------------
# -- field validators -------------------------------------------------------------------
class _Ctx:
    """Where a value came from, for error messages; collects the problems of one file."""

    def __init__(self, source: str, base_dir: Path | None) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []

    def fail(self, key: str, why: str) -> ConfigError:
        """The error a validator raises for ``key`` (recorded by :func:`_build`)."""
        return ConfigError(f"{self.source}: {key}: {why}")

    def report(self, key: str, why: str) -> None:
        """Record a problem and go on checking the rest of the file."""
        self.problems.append(str(self.fail(key, why)))

    def check(self) -> None:
        """Raise one ConfigError listing every recorded problem, if any."""
        if self.problems:
            raise ConfigError("\n".join(self.problems), problems=self.problems)


def _type_name(v: object) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _want(ctx: _Ctx, key: str, value: Any, typ: type, what: str) -> Any:
    if type(value) is not typ:  # exact: rejects bool where int is wanted
        raise ctx.fail(key, f"expected {what}, got {_type_name(value)} {value!r:.60}")
    return value


def _text(ctx: _Ctx, key: str, value: Any) -> str:
    _want(ctx, key, value, str, "a string")
    if len(value) > _MAX_TEXT:
        raise ctx.fail(key, f"longer than {_MAX_TEXT} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ctx.fail(key, "control characters (including newlines) are not allowed")
    return value


def _int_range(lo: int, hi: int) -> Callable[[_Ctx, str, Any], int]:
    def check(ctx: _Ctx, key: str, value: Any) -> int:
        _want(ctx, key, value, int, "an integer")
        if not lo <= value <= hi:
            raise ctx.fail(key, f"{value} out of range {lo}-{hi}")
        return value

    return check


def _number_range(lo: float, hi: float) -> Callable[[_Ctx, str, Any], float]:
    """An integer or a float (never a boolean) in ``lo..hi``."""

    def check(ctx: _Ctx, key: str, value: Any) -> float:
        if type(value) not in (int, float):
            raise ctx.fail(key, f"expected a number, got {_type_name(value)} {value!r:.60}")
        if not lo <= value <= hi:  # also rejects nan
            raise ctx.fail(key, f"{value} out of range {lo:g}-{hi:g}")
        return value

    return check


def _choice(options: tuple[str, ...]) -> Callable[[_Ctx, str, Any], str]:
    def check(ctx: _Ctx, key: str, value: Any) -> str:
        v = _want(ctx, key, value, str, "a string").lower()
        if v not in options:
            raise ctx.fail(key, f"{value!r} is not one of {', '.join(options)}")
        return v

    return check


def _bool(ctx: _Ctx, key: str, value: Any) -> bool:
    return _want(ctx, key, value, bool, "a boolean (true/false)")


def _nickname(ctx: _Ctx, key: str, value: Any) -> str:
    _want(ctx, key, value, str, "a string")
    if not _NICKNAME.fullmatch(value):
        raise ctx.fail(key, f"{value[:40]!r} must be 1-19 characters from [A-Za-z0-9]")
    return value


def _address(ctx: _Ctx, key: str, value: Any) -> tuple[str, int]:
    _want(ctx, key, value, str, "a 'host:port' string")
    try:
        return parse_hostport(value)
    except ConfigError as e:
        raise ctx.fail(key, str(e)) from None


def _path(ctx: _Ctx, key: str, value: Any) -> Path:
    if isinstance(value, Path):
        text = str(value)
    else:
        text = _text(ctx, key, value)
    if not text:
        raise ctx.fail(key, "must not be empty")
    if "\x00" in text:
        raise ctx.fail(key, "NUL byte in path")
    path = Path(text)
    try:
        path = path.expanduser()
    except RuntimeError:
        raise ctx.fail(key, f"cannot expand '~' in {text!r}") from None
    if not path.is_absolute() and ctx.base_dir is not None:
        path = ctx.base_dir / path
    return path


def _text_list(ctx: _Ctx, key: str, value: Any, item: Callable[[_Ctx, str, Any], T]) -> tuple[T, ...]:
    _want(ctx, key, value, list, "an array")
    return tuple(item(ctx, f"{key}[{i}]", v) for i, v in enumerate(value))


def _fingerprint(ctx: _Ctx, key: str, value: Any) -> str:
    _want(ctx, key, value, str, "a string")
    m = _FINGERPRINT.fullmatch(value)
    if not m:
        raise ctx.fail(key, f"{value[:60]!r} is not a 40-hex-digit relay fingerprint")
    return m.group(1).upper()


def _node_set(ctx: _Ctx, key: str, value: Any) -> NodeSet:
    """tor's routerset: ``["$FINGERPRINT", "nickname", "192.0.2.0/24"]``."""
    items = _text_list(ctx, key, value, _nonempty_text)
    try:
        return NodeSet(items)
    except ValueError as e:
        raise ctx.fail(key, str(e)) from None


def _nonempty_text(ctx: _Ctx, key: str, value: Any) -> str:
    if not _text(ctx, key, value).strip():
        raise ctx.fail(key, "must not be empty")
    return value


def _authority_list(ctx: _Ctx, key: str, value: Any) -> tuple[str, ...]:
    """``NICKNAME HOST:DIRPORT ED25519_ID_BASE64`` lines (specs/directory.md), no identity twice."""
    from onionp2p.proto.directory import DirAuthority  # imported late: directory imports this module

    lines = _text_list(ctx, key, value, _nonempty_text)
    seen: set[bytes] = set()
    bad = 0
    for i, line in enumerate(lines):
        try:
            auth = DirAuthority.parse(line)
        except ConfigError as e:
            ctx.report(f"{key}[{i}]", str(e))
            bad += 1
            continue
        if auth.ed_id in seen:
            ctx.report(f"{key}[{i}]", f"identity {auth.identity} is listed twice")
            bad += 1
        seen.add(auth.ed_id)
    if bad:  # each bad line is reported above; the key is not used
        raise _Reported()
    return lines


_WILDCARD_WITHOUT_ADDRESS = ("listens on every interface ({host}); set `address` to the IPv4 address "
                             "clients and relays reach this relay at (it goes into the descriptor)")


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _public_ipv4(ctx: _Ctx, key: str, value: Any) -> str:
    """An IPv4 literal others can connect to (no wildcard, multicast or broadcast address)."""
    _want(ctx, key, value, str, "an IPv4 address string")
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        raise ctx.fail(key, f"{value[:60]!r} is not an IPv4 address (hostnames are not resolved)") from None
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ctx.fail(key, f"{value} is not an address others can connect to")
    return str(ip)


def _optional_port(ctx: _Ctx, key: str, value: Any) -> int | None:
    return None if value is None else _int_range(0, 65535)(ctx, key, value)


#: the client's control port when none is configured: 9151 (Tor Browser's), or any free
#: port when 9151 is taken (so that many clients on one machine never collide)
CONTROL_PORT_DEFAULT = "9151-or-auto"
CONTROL_PORT_PREFERRED = 9151


def _client_control_port(ctx: _Ctx, key: str, value: Any) -> int | str | None:
    """A client's control_port: a port, "auto" (any free port, = 0), false (off), or the
    default written out ("9151-or-auto", as ``--dump-config`` prints it)."""
    if value is False:
        return None
    if value == "auto":
        return 0
    if value == CONTROL_PORT_DEFAULT:
        return CONTROL_PORT_DEFAULT
    if isinstance(value, str):
        raise ctx.fail(key, f"expected a port, \"auto\" or false, got {value!r:.60}")
    return _int_range(0, 65535)(ctx, key, value)


def _distinct_ports(ctx: _Ctx, out: Mapping[str, Any]) -> None:
    """``control_port`` and ``metrics_port`` both listen on 127.0.0.1: the same fixed port twice fails."""
    control, metrics = out.get("control_port"), out.get("metrics_port")
    if control and control == metrics:
        ctx.report("metrics_port", f"{metrics} is also the control_port")


class _Reported(Exception):
    """A validator already reported its problems with :meth:`_Ctx.report`."""


def _unknown_key(ctx: _Ctx, key: str, known: set[str]) -> None:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(sorted(known))}"
    ctx.report(key, f"unknown key ({hint})")


# Shared logging fields: key -> validator.
_LOG_FIELDS: dict[str, Callable[[_Ctx, str, Any], Any]] = {
    "log_level": _choice(LOG_LEVELS),
    "log_format": _choice(LOG_FORMATS),
    "log_file": _path,
    "safe_logging": _bool,
}


def _build(cls: type[T], data: Mapping[str, Any], ctx: _Ctx,
           validators: dict[str, Callable[[_Ctx, str, Any], Any]]) -> dict[str, Any]:
    """The valid keys of ``data``, checked by ``validators``; the problems are recorded in
    ``ctx`` in the order of the file (the caller runs its checks between keys, then
    :meth:`_Ctx.check`)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{ctx.source}: configuration must be a table, not {_type_name(data)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        check = validators.get(key)
        if check is None:
            _unknown_key(ctx, key, set(validators))
            continue
        try:
            out[key] = check(ctx, key, value)
        except ConfigError as e:
            ctx.problems.append(str(e))
        except _Reported:
            pass
    defaults = {f.name: f.default for f in fields(cls)}  # type: ignore[arg-type]
    if "data_dir" not in out:
        out["data_dir"] = _path(ctx, "data_dir", defaults["data_dir"])
    return out


# -- the configs ------------------------------------------------------------------------
@dataclass(frozen=True)
class RelayConfig:
    """Configuration of an onion router (relay, optionally an exit)."""

    nickname: str = "Unnamed"  #: 1-19 characters [A-Za-z0-9]
    data_dir: Path = Path("onionp2p-relay")  #: keys and state; relative = next to the file
    or_address: tuple[str, int] = ("127.0.0.1", 9001)  #: OR listener; port 0 = any free port
    #: the ORPort published in the descriptor when it differs from the listener's (something
    #: forwards it there: a NAT, a proxy; tor's ORPort NoListen/NoAdvertise); None = the same
    or_advertise_port: int | None = None
    #: the IPv4 address published in the descriptor (tor's Address): where clients and
    #: relays reach us when that is not the listener's address (0.0.0.0, NAT, a container);
    #: None = the or_address host, which must then be a specific address
    address: str | None = None
    #: publish the descriptor without waiting for the ORPort reachability self-test
    #: (tor's AssumeReachable; authorities' relays and one-relay test networks)
    assume_reachable: bool = False
    #: seconds after start before an unconfirmed ORPort is warned about, and between
    #: such warnings (tor's TIMEOUT_UNTIL_UNREACHABILITY_COMPLAINT, 20 minutes)
    reachability_timeout: int = 1200
    exit_policy: ExitPolicy = REJECT_ALL  #: default ``reject *:*`` (not an exit)
    exit_reject_private: bool = True  #: prepend ``reject private:*`` to exit_policy
    bandwidth_rate: int = 1 << 30  #: bytes/second, long-term average (tor: BandwidthRate 1 GB)
    bandwidth_burst: int | None = None  #: bytes, bucket size; None = same as rate
    contact: str | None = None  #: operator contact published in the descriptor
    family: tuple[str, ...] = ()  #: upper-case hex RSA fingerprints of sibling relays
    log_level: str = "info"  #: debug | info | warning | error
    log_format: str = "console"  #: console | json
    log_file: Path | None = None  #: append logs here instead of stderr (reopened on SIGHUP/SIGUSR1)
    safe_logging: bool = True  #: scrub client addresses and destinations from logs
    control_port: int | None = None  #: control listener on 127.0.0.1; None = disabled
    metrics_port: int | None = None  #: Prometheus endpoint on 127.0.0.1 (tor's MetricsPort); None = disabled
    max_circuits_per_channel: int = 1000  #: CREATE2 beyond this on one channel: DESTROY(RESOURCELIMIT)
    max_streams_per_circuit: int = 500  #: BEGIN beyond this on one circuit: END(RESOURCELIMIT)
    max_queue_cells: int = MAX_QUEUE_CELLS  #: cells queued for one circuit on one channel; 0 = off
    max_mem_in_queues: int = 256 * 1024 * 1024  #: bytes in all queues (tor: MaxMemInQueues); 0 = off
    dos_max_concurrent_connections: int = 100  #: per address (DoSConnectionMaxConcurrentCount); 0 = off
    dos_circuit_creation_rate: float = 3  #: CREATE2/s per client address (DoSCircuitCreationRate); 0 = off
    dos_circuit_creation_burst: int = 90  #: (DoSCircuitCreationBurst); 0 = off
    handshake_timeout: int = HANDSHAKE_TIMEOUT  #: seconds for TLS + link handshake (cannot be turned off)
    tcp_user_timeout: int = TCP_USER_TIMEOUT  #: seconds sent data may stay unacknowledged on an OR connection (Linux); 0 = kernel default
    onion_key_lifetime_days: int = 28
    extend_allow_private: bool = False  #: allow EXTEND2 to private/loopback addresses (testnets)
    authorities: tuple[str, ...] = ()  #: directory authorities to publish to / fetch from
    #: join a Tor network instead: a file of torrc ``DirAuthority`` lines (the one
    #: ``onionp2p client --tor-dirauth-file`` takes); the relay publishes tor-format descriptors
    #: to those authorities and reads their consensus (specs/tor-interop.md)
    tor_dirauth_file: Path | None = None
    #: answer clients' CC_REQUEST and run congestion control (proposal 324) on our edge of
    #: their circuits; false: fixed SENDME windows only (FlowCtrl=2 is then not advertised)
    congestion_control: bool = True
    #: accept CGO relay crypto (proposal 359; advertised as Relay=5-6, needs congestion_control)
    cgo: bool = True

    @property
    def advertised_address(self) -> str:
        """The address of our descriptor: ``address``, else the listener's (never a wildcard)."""
        if self.address is not None:
            return self.address
        host = self.or_address[0]
        if _is_wildcard(host):
            raise ConfigError(_WILDCARD_WITHOUT_ADDRESS.format(host=host))
        return host

    @property
    def effective_bandwidth_burst(self) -> int:
        """The burst to use: ``bandwidth_burst`` or, if unset, ``bandwidth_rate``."""
        return self.bandwidth_rate if self.bandwidth_burst is None else self.bandwidth_burst

    @property
    def tcp_liveness(self) -> int | None:
        """``tcp_user_timeout`` with 0 (kernel defaults) as None."""
        return self.tcp_user_timeout or None

    @property
    def queue_cells_bound(self) -> int:
        """``max_queue_cells`` with 0 (off) as the whole circuit-ID space."""
        return self.max_queue_cells or _NO_LIMIT

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>",
                  base_dir: Path | None = None) -> RelayConfig:
        """Validate a parsed TOML table; relative paths resolve against *base_dir*."""
        ctx = _Ctx(source, base_dir)
        validators: dict[str, Callable[[_Ctx, str, Any], Any]] = {
            "nickname": _nickname,
            "data_dir": _path,
            "or_address": _address,
            "or_advertise_port": _int_range(1, 65535),
            "address": _public_ipv4,
            "assume_reachable": _bool,
            "reachability_timeout": _int_range(1, 7 * 86400),
            "exit_policy": lambda c, k, v: v,  # parsed below, needs exit_reject_private
            "exit_reject_private": _bool,
            "bandwidth_rate": _int_range(1, 2**48),
            "bandwidth_burst": _int_range(1, 2**48),
            "contact": _text,
            "family": lambda c, k, v: _text_list(c, k, v, _fingerprint),
            "control_port": _optional_port,
            "metrics_port": _optional_port,
            "max_circuits_per_channel": _int_range(1, 2**31 - 1),
            "max_streams_per_circuit": _int_range(1, 65535),
            "max_queue_cells": _int_range(0, 2**31 - 1),
            "max_mem_in_queues": _int_range(0, 2**48),
            "dos_max_concurrent_connections": _int_range(0, 2**31 - 1),
            "dos_circuit_creation_rate": _number_range(0, 1e6),
            "dos_circuit_creation_burst": _int_range(0, 2**31 - 1),
            "handshake_timeout": _int_range(1, 600),
            "tcp_user_timeout": _int_range(0, 3600),
            "onion_key_lifetime_days": _int_range(1, 90),
            "extend_allow_private": _bool,
            "authorities": _authority_list,
            "tor_dirauth_file": _path,
            "congestion_control": _bool,
            "cgo": _bool,
            **_LOG_FIELDS,
        }
        out = _build(cls, d, ctx, validators)
        _distinct_ports(ctx, out)
        if out.get("authorities") and out.get("tor_dirauth_file"):
            ctx.report("tor_dirauth_file", "a relay joins either our network (authorities) or a Tor network "
                                           "(tor_dirauth_file), not both")
        bind = out.get("or_address", cls.or_address)[0]
        if "address" not in out and _is_wildcard(bind):
            raise ctx.fail("or_address", _WILDCARD_WITHOUT_ADDRESS.format(host=bind))
        if "exit_policy" in out:
            try:
                out["exit_policy"] = _exit_policy(ctx, out["exit_policy"],
                                                  out.get("exit_reject_private", True))
            except ConfigError as e:
                ctx.problems.append(str(e))
        rate = out.get("bandwidth_rate", cls.bandwidth_rate)
        burst = out.get("bandwidth_burst")
        if burst is not None and burst < rate:
            ctx.report("bandwidth_burst", f"{burst} is smaller than bandwidth_rate {rate}")
        cc_rate = out.get("dos_circuit_creation_rate", cls.dos_circuit_creation_rate)
        cc_burst = out.get("dos_circuit_creation_burst", cls.dos_circuit_creation_burst)
        if (cc_rate > 0) != (cc_burst > 0):
            key = ("dos_circuit_creation_burst" if "dos_circuit_creation_burst" in out
                   else "dos_circuit_creation_rate")
            ctx.report(key, "dos_circuit_creation_rate and dos_circuit_creation_burst must both be 0 "
                            f"(off) or both be positive (rate {cc_rate}, burst {cc_burst})")
        ctx.check()
        return cls(**out)


def _exit_policy(ctx: _Ctx, value: Any, reject_private: bool) -> ExitPolicy:
    if isinstance(value, list):
        lines = _text_list(ctx, "exit_policy", value, _text)
    else:
        lines = (_want(ctx, "exit_policy", value, str, "a string or an array of strings"),)
    try:
        return ExitPolicy.parse(lines, reject_private=reject_private)
    except ConfigError as e:
        raise ctx.fail("exit_policy", str(e)) from None


@dataclass(frozen=True)
class OnionServiceConfig:
    """One ``[[onion_service]]`` table of a client config: a service hosted by this client
    (tor's HiddenServiceDir with its HiddenService* options)."""

    #: the service's directory, tor's HiddenServiceDir layout (``hs_ed25519_secret_key``,
    #: ``hs_ed25519_public_key``, ``hostname``); made with a new key when empty
    dir: Path
    #: ``"VIRTPORT [TARGET]"`` lines as tor's HiddenServicePort (TARGET ``port`` or ``addr:port``)
    ports: tuple[str, ...]
    num_intro_points: int = 3  #: HiddenServiceNumIntroductionPoints, 1-20
    max_streams: int = 0  #: HiddenServiceMaxStreams per rendezvous circuit, 0 = unlimited
    max_streams_close_circuit: bool = False  #: HiddenServiceMaxStreamsCloseCircuit
    allow_unknown_ports: bool = False  #: HiddenServiceAllowUnknownPorts (else: END and close the circuit)
    #: directory of ``<name>.auth`` files (``descriptor:x25519:<base32 key>``): restricted
    #: discovery, only those clients can read the descriptor; unset = anyone with the address
    authorized_clients_dir: Path | None = None
    #: HiddenServiceEnableIntroDoSDefense and its RatePerSec / BurstPerSec: ask the
    #: introduction points to rate-limit INTRODUCE2 (ESTABLISH_INTRO's DoS extension)
    enable_intro_dos_defense: bool = False
    intro_dos_rate_per_sec: int = 25
    intro_dos_burst_per_sec: int = 200

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _onion_services(ctx: _Ctx, key: str, value: Any) -> tuple[OnionServiceConfig, ...]:
    """``[[onion_service]]`` tables: each needs ``dir`` and ``ports``; no directory twice."""
    from onionp2p.proto.hs.service import MAX_NUM_INTRO_POINTS, parse_port_mapping

    _want(ctx, key, value, list, "an array of tables ([[onion_service]])")
    validators: dict[str, Callable[[_Ctx, str, Any], Any]] = {
        "dir": _path,
        "ports": lambda c, k, v: _text_list(c, k, v, _text),
        "num_intro_points": _int_range(1, MAX_NUM_INTRO_POINTS),
        "max_streams": _int_range(0, 65535),
        "max_streams_close_circuit": _bool,
        "allow_unknown_ports": _bool,
        "authorized_clients_dir": _path,
        "enable_intro_dos_defense": _bool,
        "intro_dos_rate_per_sec": _int_range(1, 0x7FFFFFFF),
        "intro_dos_burst_per_sec": _int_range(1, 0x7FFFFFFF),
    }
    out = []
    seen: set[Path] = set()
    before = len(ctx.problems)
    for i, table in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(table, Mapping):
            ctx.report(where, f"expected a table, got {_type_name(table)}")
            continue
        got: dict[str, Any] = {}
        for k, v in table.items():
            check = validators.get(k)
            if check is None:
                close = difflib.get_close_matches(k, sorted(validators), n=1, cutoff=0.75)
                hint = (f"did you mean `{close[0]}`?" if close
                        else f"known keys: {', '.join(sorted(validators))}")
                ctx.report(f"{where}.{k}", f"unknown key ({hint})")
                continue
            try:
                got[k] = check(ctx, f"{where}.{k}", v)
            except ConfigError as e:
                ctx.problems.append(str(e))
        for needed in ("dir", "ports"):
            if needed not in table:
                ctx.report(where, f"`{needed}` is required")
        if "ports" in got:
            if not got["ports"]:
                ctx.report(f"{where}.ports", "must list at least one port")
            for j, line in enumerate(got["ports"]):
                try:
                    parse_port_mapping(line)
                except ConfigError as e:
                    ctx.report(f"{where}.ports[{j}]", str(e))
        if "dir" in got:
            if got["dir"] in seen:
                ctx.report(f"{where}.dir", f"{got['dir']} is the directory of another onion service")
            seen.add(got["dir"])
        if ("intro_dos_burst_per_sec" in got and got["intro_dos_burst_per_sec"]
                < got.get("intro_dos_rate_per_sec", 25)):
            ctx.report(f"{where}.intro_dos_burst_per_sec", "must not be below intro_dos_rate_per_sec")
        if len(ctx.problems) == before:
            out.append(OnionServiceConfig(**got))
    if len(ctx.problems) != before:
        raise _Reported()
    return tuple(out)


@dataclass(frozen=True)
class ClientConfig:
    """Configuration of a client (SOCKS proxy into the overlay)."""

    data_dir: Path = Path("onionp2p-client")  #: cached directory info; relative = next to file
    socks_address: tuple[str, int] = ("127.0.0.1", 9050)  #: SOCKS listener; port 0 = any free
    #: control listener on 127.0.0.1 with cookie auth, on by default (as Tor Browser's tor):
    #: CONTROL_PORT_DEFAULT = 9151, or any free port when 9151 is taken; a port (0 = any
    #: free port, also "auto" in TOML); None (``false`` in TOML) = disabled. The port in use
    #: is written to ``data_dir/control_port`` (tor's ControlPortWriteToFile format).
    control_port: int | str | None = CONTROL_PORT_DEFAULT
    metrics_port: int | None = None  #: Prometheus endpoint on 127.0.0.1 (tor's MetricsPort); None = disabled
    #: HTTP CONNECT listener on 127.0.0.1 (tor's HTTPTunnelPort); 0 = any free port; None = off
    http_tunnel_port: int | None = None
    dns_port: int | None = None  #: UDP DNS resolver on 127.0.0.1 (tor's DNSPort); 0 = any free port
    authorities: tuple[str, ...] = ()  #: ``NICK HOST:DIRPORT ED25519_ID`` of each directory authority
    log_level: str = "info"
    log_format: str = "console"
    log_file: Path | None = None  #: append logs here instead of stderr (reopened on SIGHUP/SIGUSR1)
    safe_logging: bool = True
    preemptive_circuits: int = 3  #: clean circuits kept ready
    preemptive_ports: tuple[int, ...] = (80, 443)  #: ports the preemptive circuits' exits allow
    max_circuit_dirtiness: int = 600  #: seconds a circuit takes new streams after its first
    #: seconds for channel + 3 hops (tor's CircuitBuildTimeout): the fixed timeout, or with
    #: learn_circuit_build_timeout the initial one until enough build times are known
    circuit_build_timeout: int = 60
    #: learn the build timeout from observed build times (tor's LearnCircuitBuildTimeout,
    #: proposal 151); the consensus parameter cbtdisabled=1 turns it off too
    learn_circuit_build_timeout: bool = True
    max_build_attempts: int = 3
    enforce_distinct_subnets: bool = True  #: no two relays of a path in one IPv4 /16
    #: tor's ExcludeNodes: relays ($fingerprint, nickname, address or network) never used in
    #: any position of a circuit we choose, nor as guards; an introduction point from a
    #: descriptor or a rendezvous point a client named is used anyway unless strict_nodes
    exclude_nodes: NodeSet = field(default_factory=NodeSet)
    #: tor's StrictNodes: exclude_nodes holds for those relays chosen by others too (their
    #: circuits fail instead)
    strict_nodes: bool = False
    stream_timeout: int = 15  #: seconds to wait for CONNECTED before trying another circuit
    max_stream_attempts: int = 3
    max_circuits_per_isolation: int = 16
    #: tor's NumPrimaryGuards: 0 = the consensus's guard-n-primary-guards (3)
    num_primary_guards: int = 0
    #: guard-spec parameters overriding the consensus's (tor's names, e.g.
    #: ``{ "guard-min-filtered-sample-size" = 4 }``; plus ``guard-retry-divisor``, which
    #: divides every retry interval: for test networks only)
    guard_params: Mapping[str, int] = field(default_factory=dict)
    socks_handshake_timeout: float = 30.0  #: seconds for a SOCKS client to send its request
    socks_max_connections: int = 1024  #: SOCKS connections served at once; more are closed
    #: tor's SocksPort flag ExtendedErrors: answer onion-service failures with the SOCKS5
    #: codes X'F0'-X'F7' (proposal 304) instead of RFC 1928's; off by default, as in tor
    socks_extended_errors: bool = False
    #: refuse SOCKS connects to private/internal IP literals and "localhost" (tor's
    #: ClientRejectInternalAddresses); the testnet turns it off (its destinations are local)
    client_reject_internal_addresses: bool = True
    #: tor's ClientOnionAuthDir: a directory of ``*.auth_private`` files, our x25519 keys for
    #: onion services that restrict discovery (client authorization); None: no keys
    client_onion_auth_dir: Path | None = None
    #: tor's TestingTorNetwork, as far as onion services go: the time period is one
    #: shared-random run (24 voting intervals) instead of ``hsdir-interval``; for private
    #: tor test networks only
    testing_tor_network: bool = False
    #: ask exits for congestion control (proposal 324: Vegas, XON/XOFF) where they offer
    #: it; false: fixed SENDME windows on every circuit
    congestion_control: bool = True
    #: ask every hop that offers it for CGO relay crypto (proposal 359; needs congestion_control)
    cgo: bool = True
    #: channel padding (tor's ConnectionPadding): "auto" pads links to guards that support it
    #: (Padding=2) and asks them to pad back; "0" asks them to stop and pads nothing; "1" pads
    #: even where the guard does not support it
    connection_padding: str = "auto"
    #: pad less (tor's ReducedConnectionPadding): ask the guard to stop, pad at the consensus's
    #: reduced rate (nf_ito_*_reduced) ourselves
    reduced_connection_padding: bool = False
    #: onion services this client hosts (``[[onion_service]]`` tables, :class:`OnionServiceConfig`)
    onion_service: tuple[OnionServiceConfig, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>",
                  base_dir: Path | None = None) -> ClientConfig:
        """Validate a parsed TOML table; relative paths resolve against *base_dir*."""
        ctx = _Ctx(source, base_dir)
        validators: dict[str, Callable[[_Ctx, str, Any], Any]] = {
            "data_dir": _path,
            "socks_address": _address,
            "control_port": _client_control_port,
            "metrics_port": _optional_port,
            "http_tunnel_port": _optional_port,
            "dns_port": _optional_port,
            "authorities": _authority_list,
            "preemptive_circuits": _int_range(0, 64),
            "preemptive_ports": lambda c, k, v: _text_list(c, k, v, _int_range(1, 65535)),
            "max_circuit_dirtiness": _int_range(1, 7 * 86400),
            "circuit_build_timeout": _int_range(1, 600),
            "learn_circuit_build_timeout": _bool,
            "max_build_attempts": _int_range(1, 20),
            "enforce_distinct_subnets": _bool,
            "exclude_nodes": _node_set,
            "strict_nodes": _bool,
            "stream_timeout": _int_range(1, 600),
            "max_stream_attempts": _int_range(1, 20),
            "max_circuits_per_isolation": _int_range(1, 1024),
            "num_primary_guards": _int_range(0, 20),
            "guard_params": _guard_params,
            "socks_handshake_timeout": _number_range(0.1, 600),
            "socks_max_connections": _int_range(1, 65535),
            "socks_extended_errors": _bool,
            "client_reject_internal_addresses": _bool,
            "client_onion_auth_dir": _path,
            "testing_tor_network": _bool,
            "congestion_control": _bool,
            "cgo": _bool,
            "connection_padding": _connection_padding,
            "reduced_connection_padding": _bool,
            "onion_service": _onion_services,
            **_LOG_FIELDS,
        }
        out = _build(cls, d, ctx, validators)
        _distinct_ports(ctx, out)
        ctx.check()
        return cls(**out)


@dataclass(frozen=True)
class AuthorityConfig:
    """Configuration of a directory authority."""

    nickname: str = "Unnamed"
    data_dir: Path = Path("onionp2p-authority")
    or_address: tuple[str, int] = ("127.0.0.1", 9001)
    dir_address: tuple[str, int] = ("127.0.0.1", 7000)  #: directory (HTTP) listener
    run_relay: bool = True  #: also run a (non-exit) relay on or_address, as tor's authorities do
    extend_allow_private: bool = False  #: let that relay EXTEND2 to private/loopback addresses (testnets)
    authorities: tuple[str, ...] = ()  #: every authority (this one included): NICK HOST:DIRPORT ED25519_ID
    voting_interval: int = 3600  #: seconds between consensuses (tests: a few seconds)
    stable_uptime: int = 86400  #: seconds continuously reachable before Stable
    guard_uptime: int = 8 * 86400  #: seconds continuously reachable (and Fast, Stable) before Guard
    #: seconds continuously reachable (and Fast, Stable, a directory cache) before HSDir
    #: (tor's MinUptimeHidServDirectoryV2)
    hsdir_uptime: int = 96 * 3600
    assume_guard: bool = False  #: Guard for every running relay (tiny test networks)
    assume_exit: bool = False  #: Exit for every running relay whose policy accepts anything
    control_port: int | None = None  #: control listener on 127.0.0.1; None = disabled
    metrics_port: int | None = None  #: Prometheus endpoint on 127.0.0.1 (tor's MetricsPort); None = disabled
    log_level: str = "info"
    log_format: str = "console"
    log_file: Path | None = None  #: append logs here instead of stderr (reopened on SIGHUP/SIGUSR1)
    safe_logging: bool = True
    #: network parameters this authority votes for (tor's ConsensusParams), e.g.
    #: ``{ cc_sendme_inc = 31, cc_vegas_alpha_exit = 186 }``; a parameter is in the consensus
    #: when more than half of the authorities vote for it (low median of their values)
    consensus_params: Mapping[str, int] = field(default_factory=dict)

    def relay_config(self) -> RelayConfig:
        """The config of the (non-exit) relay an authority runs beside itself (``run_relay``)."""
        # tor's authorities publish without waiting for the reachability self-test
        return RelayConfig(nickname=self.nickname, data_dir=self.data_dir, or_address=self.or_address,
                           assume_reachable=True, extend_allow_private=self.extend_allow_private,
                           authorities=self.authorities,
                           log_level=self.log_level, log_format=self.log_format, safe_logging=self.safe_logging)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>",
                  base_dir: Path | None = None) -> AuthorityConfig:
        """Validate a parsed TOML table; relative paths resolve against *base_dir*."""
        ctx = _Ctx(source, base_dir)
        validators: dict[str, Callable[[_Ctx, str, Any], Any]] = {
            "nickname": _nickname,
            "data_dir": _path,
            "or_address": _address,
            "dir_address": _address,
            "run_relay": _bool,
            "extend_allow_private": _bool,
            "authorities": _authority_list,
            "voting_interval": _int_range(2, 86400),
            "stable_uptime": _int_range(0, 365 * 86400),
            "guard_uptime": _int_range(0, 365 * 86400),
            "hsdir_uptime": _int_range(0, 365 * 86400),
            "assume_guard": _bool,
            "assume_exit": _bool,
            "control_port": _optional_port,
            "metrics_port": _optional_port,
            "consensus_params": _consensus_params,
            **_LOG_FIELDS,
        }
        out = _build(cls, d, ctx, validators)
        _distinct_ports(ctx, out)
        ctx.check()
        return cls(**out)


def _connection_padding(ctx: _Ctx, key: str, value: Any) -> str:
    """tor's ConnectionPadding: "auto", 0 or 1 (TOML integers or strings)."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return str(value)
    if value in ("auto", "0", "1"):
        return value
    raise ctx.fail(key, f'must be "auto", 0 or 1, got {value!r}')


_PARAM_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")  # dir-spec: KeywordChar, as tor's guard-* names


def _guard_params(ctx: _Ctx, key: str, value: Any) -> dict[str, int]:
    out = _consensus_params(ctx, key, value)
    for name, v in out.items():
        if name != GUARD_RETRY_DIVISOR and name not in GUARD_PARAM_RANGES:
            raise ctx.fail(key, f"unknown guard parameter {name!r}")
        lo, hi = GUARD_RETRY_DIVISOR_RANGE if name == GUARD_RETRY_DIVISOR else GUARD_PARAM_RANGES[name][1:]
        if not lo <= v <= hi:
            raise ctx.fail(key, f"{name} must be in {lo}..{hi}, got {v}")
    return out


def _consensus_params(ctx: _Ctx, key: str, value: Any) -> dict[str, int]:
    table = _want(ctx, key, value, dict, "a table of name = integer")
    out = {}
    for name, v in table.items():
        if not _PARAM_KEY.fullmatch(name):
            raise ctx.fail(key, f"bad parameter name {name!r} (letters, digits, _, -)")
        if isinstance(v, bool) or not isinstance(v, int) or not -2**31 <= v < 2**31:
            raise ctx.fail(key, f"{name} must be a 32-bit integer, got {v!r}")
        out[name] = v
    return out


# -- loading files ----------------------------------------------------------------------
def _read_toml(path: str | Path) -> tuple[dict[str, Any], Path, str]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read configuration: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: configuration is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid TOML: nested too deeply") from None
    return data, p.resolve().parent, str(p)


def load_relay_config(path: str | Path) -> RelayConfig:
    """Read and validate a relay's TOML configuration file."""
    data, base, source = _read_toml(path)
    return RelayConfig.from_dict(data, source=source, base_dir=base)


def load_client_config(path: str | Path) -> ClientConfig:
    """Read and validate a client's TOML configuration file."""
    data, base, source = _read_toml(path)
    return ClientConfig.from_dict(data, source=source, base_dir=base)


def load_authority_config(path: str | Path) -> AuthorityConfig:
    """Read and validate a directory authority's TOML configuration file."""
    data, base, source = _read_toml(path)
    return AuthorityConfig.from_dict(data, source=source, base_dir=base)


# -- dumping ------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    """One TOML value (strings through JSON, whose escapes TOML's basic strings share)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, ExitPolicy):
        return _toml_value(value.lines())
    if isinstance(value, NodeSet):
        return _toml_value(list(value.items))
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def dump_config(cfg: RelayConfig | ClientConfig | AuthorityConfig) -> str:
    """The effective configuration as TOML (``--dump-config``): every key with the value in
    force, defaults filled in, paths absolute; loading it gives the same configuration.
    Unset optional keys (TOML has no null) are listed as comments."""
    assert is_dataclass(cfg)
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and isinstance(cfg, ClientConfig) and f.name == "control_port":
            out.append("control_port = false\n")  # off (unset would mean the default: on)
        elif value is None:
            out.append(f"# {f.name} is unset\n")
        elif isinstance(cfg, ClientConfig) and f.name == "onion_service":
            if value:
                out.append(f"onion_service = {_toml_value([svc.to_dict() for svc in value])}\n")
        elif f.name.endswith("_address"):
            out.append(f"{f.name} = {_toml_value(format_hostport(*value))}\n")
        else:
            out.append(f"{f.name} = {_toml_value(value)}\n")
    return "".join(out)
