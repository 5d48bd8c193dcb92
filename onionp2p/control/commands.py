"""Control port commands after authentication: GETINFO, GETCONF, SETEVENTS, SIGNAL ... (specs/control.md).

Theory of operation
-------------------
A :class:`CommandHandler` belongs to one control connection. :meth:`CommandHandler.execute`
turns one authenticated :class:`~onionp2p.proto.control.Command` into the complete reply
bytes, asking the node (:class:`~onionp2p.control.server.ControlledNode`) for facts and actions.
Replies and error texts follow tor's so that stem's parsers (which match on some of the
texts, e.g. ``Unrecognized key "..."``) behave as with tor:

* 510 unknown command, 511 a tor command onionp2p does not implement, 512 bad syntax or
  missing argument, 513 bad argument, 552 unknown key / event / signal / circuit / router,
  553 a configuration value the node rejected, 551 the node failed;
* any other exception escaping a handler (a node bug) is logged and answered
  ``551 Internal error``: one bad command never takes the connection or the server down.

GETINFO answers come from a table (``info/names`` lists it) plus a few prefixes
(``ns/id/``, ``ns/name/``, ``net/listeners/``, ``ip-to-country/``). Values containing a
newline are sent as ``250+key=`` data blocks, others as ``250-key=value``. If any key is
unknown the whole reply is the 552 error, as in tor. Keys that only a relay can answer
give tor's errors on other nodes: ``fingerprint`` 551 and ``exit-policy/full`` (``ipv4``,
``ipv6``) 552, both ``Not running in server mode``; the exit policy comes from the node's
optional ``exit_policy()``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import ipaddress
import os
import re
import resource
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from onionp2p.control.formats import (
    bootstrap_line,
    circuit_line,
    clients_seen_line,
    exit_policy_lines,
    guard_line,
    ns_entry,
    orconn_line,
    stream_line,
    version_string,
)
from onionp2p.control.onionauth import client_auth_add, client_auth_remove, client_auth_view
from onionp2p.errors import ConfigError, KeyFileError, LocalProtocolError, OnionError
from onionp2p.log import get_logger
from onionp2p.proto.control import (
    Command,
    ControlError,
    Data,
    format_reply,
    one_line,
    qecho,
    quote,
    split_args,
    split_keyword,
    words,
)
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.address import parse_onion_address
from onionp2p.proto.hs.keys import parse_auth
from onionp2p.proto.hs.service import PortMapping, parse_port_mapping

if TYPE_CHECKING:
    from onionp2p.control.server import ControlServer, _Connection

__all__ = ["CommandHandler", "EVENT_NAMES", "SIGNALS", "SIGNAL_ALIASES", "SERVER_CONF"]

log = get_logger("onionp2p.control")

#: Event names SETEVENTS accepts (tor's table). Those onionp2p generates are listed in
#: specs/control.md; the others are accepted and never sent.
EVENT_NAMES = (
    "CIRC", "CIRC_MINOR", "STREAM", "ORCONN", "BW", "DEBUG", "INFO", "NOTICE", "WARN", "ERR", "NEWDESC",
    "ADDRMAP", "DESCCHANGED", "NS", "STATUS_GENERAL", "STATUS_CLIENT", "STATUS_SERVER", "GUARD",
    "STREAM_BW", "CLIENTS_SEEN", "NEWCONSENSUS", "BUILDTIMEOUT_SET", "SIGNAL", "CONF_CHANGED", "CONN_BW",
    "CELL_STATS", "CIRC_BW", "TRANSPORT_LAUNCHED", "HS_DESC", "HS_DESC_CONTENT", "NETWORK_LIVENESS",
    "PT_LOG", "PT_STATUS",
)
SIGNALS = ("RELOAD", "SHUTDOWN", "DUMP", "DEBUG", "HALT", "NEWNYM", "CLEARDNSCACHE", "HEARTBEAT",
           "ACTIVE", "DORMANT")
SIGNAL_ALIASES = {"HUP": "RELOAD", "INT": "SHUTDOWN", "USR1": "DUMP", "USR2": "DEBUG", "TERM": "HALT"}
_UNIMPLEMENTED = frozenset({
    "SAVECONF", "MAPADDRESS", "SETCIRCUITPURPOSE", "SETROUTERPURPOSE", "ATTACHSTREAM", "+POSTDESCRIPTOR",
    "REDIRECTSTREAM", "RESOLVE", "TAKEOWNERSHIP", "DROPOWNERSHIP", "+LOADCONF", "DROPGUARDS", "HSFETCH",
    "+HSPOST", "DROPTIMEOUTS",
})
#: ADD_ONION's flags (control-spec); BasicAuth and NonAnonymous are refused with tor's errors
_ONION_FLAGS = frozenset({"DiscardPK", "Detach", "BasicAuth", "V3Auth", "NonAnonymous",
                          "MaxStreamsCloseCircuit"})
_LISTENER_KINDS = ("or", "dir", "socks", "trans", "natd", "dns", "control", "extor", "httptunnel", "metrics")
_SERVER_SPEC = re.compile(r"\$?[0-9A-Fa-f]{40}([~=][A-Za-z0-9]{1,19})?|[A-Za-z0-9]{1,19}")
_DIGITS = re.compile(r"[0-9]{1,16}")
#: GETINFO exit-policy/default: the rule onionp2p appends to every configured exit policy
#: (tor appends its default policy instead; see specs/control.md).
DEFAULT_EXIT_POLICY = "reject *:*"
#: Configuration keys the control port itself owns (read-only through SETCONF).
SERVER_CONF = {"ControlPort": "LineList", "CookieAuthentication": "Boolean", "CookieAuthFile": "Filename",
               "HashedControlPassword": "LineList", "__OwningControllerProcess": "String"}


def _ok() -> bytes:
    return format_reply(250, ["OK"])


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CommandHandler:
    """Executes authenticated commands for one connection (see the module docstring)."""

    def __init__(self, server: ControlServer, conn: _Connection):
        self.server = server
        self.conn = conn
        self.node = server.node
        self._commands: dict[str, Callable[[Command], object]] = {
            "GETINFO": self._getinfo, "GETCONF": self._getconf, "SETCONF": self._setconf,
            "RESETCONF": self._setconf, "SETEVENTS": self._setevents, "SIGNAL": self._signal,
            "EXTENDCIRCUIT": self._extendcircuit, "CLOSECIRCUIT": self._closecircuit,
            "CLOSESTREAM": self._closestream, "USEFEATURE": self._usefeature,
            "ADD_ONION": self._add_onion, "DEL_ONION": self._del_onion,
        }
        self._commands.update({  # client authorization for onion services (control/onionauth.py)
            "ONION_CLIENT_AUTH_ADD": lambda cmd: client_auth_add(self.node, cmd.args),
            "ONION_CLIENT_AUTH_REMOVE": lambda cmd: client_auth_remove(self.node, cmd.args),
            "ONION_CLIENT_AUTH_VIEW": lambda cmd: client_auth_view(self.node, cmd.args),
        })
        self._info: dict[str, tuple[str, Callable[[], str]]] = {
            "version": ("The current version of onionp2p (tor-compatible form).", version_string),
            "config-file": ("Location of the configuration file.", lambda: self.node.config_file or ""),
            "config-text": ("Current configuration, one 'Key Value' per line.", self._config_text),
            "config/names": ("Configuration keys and their types.", self._config_names),
            "info/names": ("GETINFO keys and what they mean.", self._info_names),
            "events/names": ("Events SETEVENTS accepts.", lambda: " ".join(EVENT_NAMES)),
            "signal/names": ("Signals SIGNAL accepts.", lambda: " ".join(SIGNALS)),
            "features/names": ("Features USEFEATURE accepts.", lambda: "VERBOSE_NAMES EXTENDED_EVENTS"),
            "process/pid": ("Process id.", lambda: str(os.getpid())),
            "process/uid": ("User id.", lambda: str(os.getuid())),
            "process/user": ("User name.", self._user),
            "process/descriptor-limit": ("File descriptor limit.", self._fd_limit),
            "uptime": ("Seconds since the node started.", lambda: str(self.server.uptime())),
            "traffic/read": ("Total bytes read on OR connections.", lambda: str(int(self.node.traffic()[0]))),
            "traffic/written": ("Total bytes written.", lambda: str(int(self.node.traffic()[1]))),
            "bw-event-cache": ("Recent BW events, oldest first.",
                               lambda: " ".join(f"{r},{w}" for r, w in self.server.bw_history)),
            "status/bootstrap-phase": ("Current bootstrap phase.",
                                       lambda: bootstrap_line(*self.node.bootstrap_status())),
            "status/circuit-established": ("1 if a circuit is built.", self._circuit_established),
            "status/enough-dir-info": ("1 if relays are known.",
                                       lambda: str(int(bool(self.node.network_status())))),
            "status/version/current": ("Version status (no recommendations yet).", lambda: "unknown"),
            "network-liveness": ("Network liveness.", lambda: "up"),
            "dormant": ("1 if dormant.", lambda: "0"),
            "circuit-status": ("Circuits (BYTES_READ/BYTES_WRITTEN: totals as of the last CIRC_BW tick).",
                               self._circuit_status),
            "stream-status": ("Client streams.",
                              lambda: "\n".join(stream_line(s, event=False) for s in self.node.streams())),
            "orconn-status": ("OR connections.",
                              lambda: "\n".join(orconn_line(o, event=False) for o in self.node.orconns())),
            "entry-guards": ("Entry guards.", lambda: "\n".join(map(guard_line, self.node.guards()))),
            "ns/all": ("Router status entries of the consensus.", self._ns_all),
            "address": ("Our best guess of our external IP address.", self._address),
            "fingerprint": ("Our relay fingerprint.", self._fingerprint),
            "accounting/enabled": ("Accounting is not supported: 0.", lambda: "0"),
            "accounting/hibernating": ("Always awake.", lambda: "awake"),
            "ip-to-country/ipv4-available": ("No GeoIP database: 0.", lambda: "0"),
            "ip-to-country/ipv6-available": ("No GeoIP database: 0.", lambda: "0"),
            "status/clients-seen": ("Client statistics (none kept: no bridge statistics, no GeoIP).",
                                    clients_seen_line),
            "exit-policy/default": ("What onionp2p appends to every exit policy: reject *:*.",
                                    lambda: DEFAULT_EXIT_POLICY),
            "exit-policy/full": ("This relay's exit policy, one rule per line.",
                                 lambda: self._exit_policy(None)),
            "exit-policy/ipv4": ("The exit policy's rules that apply to IPv4.", lambda: self._exit_policy(4)),
            "exit-policy/ipv6": ("The exit policy's rules that apply to IPv6.", lambda: self._exit_policy(6)),
            "onions/current": ("Onion services this control connection added (ADD_ONION without Detach).",
                               lambda: self._onions(False)),
            "onions/detached": ("Onion services added with ADD_ONION Flags=Detach.",
                                lambda: self._onions(True)),
        }

    async def execute(self, cmd: Command) -> bytes:
        """The reply to ``cmd`` (never raises except CancelledError)."""
        try:
            name = ("+" if cmd.body is not None else "") + cmd.keyword
            handler = self._commands.get(name)
            if handler is None:
                if name in _UNIMPLEMENTED:
                    return format_reply(511, [f"{name} is not implemented by onionp2p"])
                return format_reply(510, [f"Unrecognized command {qecho(name)}"])
            result = handler(cmd)
            if inspect.isawaitable(result):
                result = await result
            return result  # type: ignore[return-value]
        except ControlError as exc:
            return format_reply(exc.code if 400 <= exc.code < 600 else 551, [one_line(exc.message)])
        except ConfigError as exc:
            return format_reply(553, [f"Unable to set option: {one_line(str(exc))}"])
        except (OnionError, LocalProtocolError) as exc:
            log.warning("control command failed", command=cmd.keyword, error=str(exc))
            return format_reply(551, [f"Internal error: {one_line(str(exc))}"])
        except Exception:  # a node bug must not take the control port down
            log.exception("control command crashed", command=cmd.keyword)
            return format_reply(551, ["Internal error"])

    # -- GETINFO -------------------------------------------------------------------------

    def _getinfo(self, cmd: Command) -> bytes:
        keys = words(cmd.args)
        if not keys:
            raise ControlError(512, "Bad arguments to GETINFO: Need at least 1 argument(s)")
        lines: list[str | Data] = []
        for key in keys:
            value = self._value(key)
            lines.append(Data(f"{key}=", value) if ("\n" in value or "\r" in value) else f"{key}={value}")
        return format_reply(250, [*lines, "OK"])

    def _value(self, key: str) -> str:
        entry = self._info.get(key.lower())
        if entry is not None:
            return entry[1]()
        low = key.lower()
        if low.startswith("ns/id/") or low.startswith("ns/name/"):
            found = self._ns_lookup(key.split("/", 2)[2], by_name=low.startswith("ns/name/"))
            if found is not None:
                return found
        elif low.startswith("net/listeners/") and low[14:] in _LISTENER_KINDS:
            return self._listeners(low[14:])
        elif low.startswith("ip-to-country/"):
            try:
                ipaddress.ip_address(key[14:])
            except ValueError:
                pass
            else:
                raise ControlError(551, "GeoIP data not loaded")
        elif low.startswith("accounting/") and low[11:] in ("bytes", "bytes-left", "interval-start",
                                                             "interval-wake", "interval-end"):
            raise ControlError(551, "Accounting is not enabled")
        raise ControlError(552, f"Unrecognized key {qecho(key)}")

    def _circuit_status(self) -> str:
        circuits = self.node.circuits()
        bw = self.server.circ_bw
        if bw is not None:  # the totals the CIRC_BW events so far add up to (0 before the first)
            circuits = [replace(c, bytes_read=bw[c.id].read if c.id in bw else 0,
                                bytes_written=bw[c.id].written if c.id in bw else 0) for c in circuits]
        return "\n".join(map(circuit_line, circuits))

    def _circuit_established(self) -> str:
        return "1" if any(c.status == "BUILT" for c in self.node.circuits()) else "0"

    def _config_text(self) -> str:
        lines = []
        for name, _type in self.node.conf_names():
            lines += [f"{name} {v}" for v in self.node.get_conf(name)]
        return "\n".join(lines)

    def _conf_table(self) -> dict[str, tuple[str, str]]:
        table = {name.lower(): (name, typ) for name, typ in SERVER_CONF.items()}
        for name, typ in self.node.conf_names():
            table[name.lower()] = (name, typ)
        return table

    def _config_names(self) -> str:
        return "\n".join(f"{name} {typ}" for name, typ in self._conf_table().values())

    def _info_names(self) -> str:
        lines = [f"{k} {doc}" for k, (doc, _fn) in self._info.items()]
        lines += ["ns/id/* Router status entry by fingerprint.", "ns/name/* Router status entry by nickname.",
                  "net/listeners/* Listening addresses by kind (or, socks, control ...).",
                  "ip-to-country/* Country of an address (no GeoIP database: 551)."]
        return "\n".join(sorted(lines))

    @staticmethod
    def _user() -> str:
        try:
            import pwd
            return pwd.getpwuid(os.getuid()).pw_name
        except (ImportError, KeyError):
            return ""

    @staticmethod
    def _fd_limit() -> str:
        try:
            return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        except (OSError, ValueError):
            return "-1"

    def _ns_all(self) -> str:
        now = time.time()
        return "\n".join(ns_entry(rs, now) for rs in self.node.network_status())

    def _ns_lookup(self, what: str, *, by_name: bool) -> str | None:
        for rs in self.node.network_status():
            if by_name and rs.nickname.lower() == what.lower() or \
                    not by_name and rs.fingerprint == what.lstrip("$").upper():
                return ns_entry(rs, time.time())
        return None

    def _listeners(self, kind: str) -> str:
        found = list(self.node.listeners(kind))
        if kind == "control":
            found.insert(0, (self.server.host, self.server.port))
        return " ".join(quote(_hostport(h, int(p))) for h, p in found)

    def _address(self) -> str:
        if not self.node.address:
            raise ControlError(551, "Address unknown")
        return self.node.address

    def _fingerprint(self) -> str:
        if not self.node.fingerprint:
            raise ControlError(551, "Not running in server mode")
        return self.node.fingerprint

    def _exit_policy(self, family: int | None) -> str:
        """exit-policy/full (family None), /ipv4, /ipv6: from the node's optional
        ``exit_policy()``; a node without one (a client) is not a relay: tor's 552."""
        get = getattr(self.node, "exit_policy", None)
        policy = get() if get is not None else None
        if policy is None:
            raise ControlError(552, "Not running in server mode")
        return "\n".join(exit_policy_lines(policy.rules, family))

    # -- configuration ------------------------------------------------------------------------

    def _server_conf(self, name: str) -> list[str]:
        auth = self.server.auth
        if name == "ControlPort":
            return [_hostport(self.server.host, self.server.port)]
        if name == "CookieAuthentication":
            return ["1" if auth.cookie is not None else "0"]
        if name == "CookieAuthFile":
            return [auth.cookie_path] if auth.cookie_path else []
        if name == "HashedControlPassword":
            return list(self.server.hashed_passwords)
        return []

    def _conf_values(self, name: str) -> list[str]:
        return self._server_conf(name) if name in SERVER_CONF else [str(v) for v in self.node.get_conf(name)]

    def _getconf(self, cmd: Command) -> bytes:
        table = self._conf_table()
        lines, unknown = [], []
        for key in words(cmd.args):
            entry = table.get(key.lower())
            if entry is None:
                unknown.append(key)
                continue
            values = self._conf_values(entry[0])
            lines += [f"{entry[0]}={v}" for v in values] if values else [entry[0]]
        if unknown:
            return format_reply(552, [f"Unrecognized configuration key {qecho(k)}" for k in unknown])
        return format_reply(250, lines or ["OK"])

    def _setconf(self, cmd: Command) -> bytes:
        try:
            parsed = [split_keyword(token) for token in split_args(cmd.args)]
        except ControlError:
            raise ControlError(513, "syntax error in configuration values") from None
        if not parsed:
            raise ControlError(512, f"Missing argument to {cmd.keyword}")
        table = self._conf_table()
        pairs: list[tuple[str, str | None]] = []
        for key, value in parsed:
            entry = table.get(key.lower())
            if entry is None:
                raise ControlError(552, f"Unrecognized option: Unknown option '{key}'.  Failing.")
            if entry[0] in SERVER_CONF:
                raise ControlError(553, f"Unable to set option: {entry[0]} is read-only via the control port")
            pairs.append((entry[0], value))
        self.node.set_conf(pairs)  # ConfigError -> 553
        changed = []
        for name in dict.fromkeys(k for k, _v in pairs):
            values = self._conf_values(name)
            changed += [f"{name}={v}" for v in values] if values else [name]
        self.server.emit("CONF_CHANGED", format_reply(650, ["CONF_CHANGED", *changed, "OK"]))
        return _ok()

    # -- events and signals ---------------------------------------------------------------------

    def _setevents(self, cmd: Command) -> bytes:
        wanted = set()
        for name in words(cmd.args):
            up = name.upper()
            if up == "EXTENDED":
                continue
            if up not in EVENT_NAMES:
                raise ControlError(552, f"Unrecognized event {qecho(name)}")
            wanted.add(up)
        self.conn.events = frozenset(wanted)
        return _ok()

    def _usefeature(self, cmd: Command) -> bytes:
        for name in words(cmd.args):
            if name.upper() not in ("VERBOSE_NAMES", "EXTENDED_EVENTS"):
                raise ControlError(552, f"Unrecognized feature {qecho(name)}")
        return _ok()

    async def _signal(self, cmd: Command) -> bytes:
        args = words(cmd.args)
        if len(args) != 1:
            raise ControlError(512, "Bad arguments to SIGNAL: Need exactly 1 argument(s)")
        name = SIGNAL_ALIASES.get(args[0].upper(), args[0].upper())
        if name not in SIGNALS:
            raise ControlError(552, f"Unrecognized signal code {qecho(args[0])}")
        if name in ("SHUTDOWN", "HALT"):
            # Reply first (tor flushes "250 OK" before acting): the task runs after this
            # handler returns and the worker has written the reply.
            self.server.spawn(self.node.signal(name))
            return _ok()
        await asyncio.shield(self.node.signal(name))  # a vanishing controller does not cancel it
        self.server.emit("SIGNAL", format_reply(650, [f"SIGNAL {name}"]))
        return _ok()

    # -- circuits and streams -------------------------------------------------------------------

    async def _extendcircuit(self, cmd: Command) -> bytes:
        args = words(cmd.args)
        if not args:
            raise ControlError(512, "Missing argument to EXTENDCIRCUIT")
        if not _DIGITS.fullmatch(args[0]):
            raise ControlError(552, f"Unknown circuit {qecho(args[0])}")
        circ_id = int(args[0])
        purpose, path = "general", None
        for i, arg in enumerate(args[1:]):
            if "=" in arg and not arg.startswith("$"):
                key, _, value = arg.partition("=")
                if key.lower() == "purpose":
                    if value.lower() not in ("general", "controller"):
                        raise ControlError(552, f"Unknown purpose {qecho(arg)}")
                    purpose = value.lower()
            elif i == 0:
                path = arg.split(",")
        if path is not None:
            for name in path:
                if not _SERVER_SPEC.fullmatch(name):
                    raise ControlError(552, f"No such router {qecho(name)}")
        elif circ_id != 0:
            raise ControlError(512, "syntax error: not enough arguments.")
        try:
            new_id = await asyncio.shield(self.node.extend_circuit(circ_id, path, purpose))
        except ControlError:
            raise
        except OnionError as exc:
            log.info("EXTENDCIRCUIT failed", error=str(exc))
            raise ControlError(551, "Couldn't start circuit") from None
        return format_reply(250, [f"EXTENDED {int(new_id)}"])

    def _closecircuit(self, cmd: Command) -> bytes:
        args = words(cmd.args)
        if not args:
            raise ControlError(512, "Missing argument to CLOSECIRCUIT")
        if_unused = any(a.lower() == "ifunused" for a in args[1:])
        if not _DIGITS.fullmatch(args[0]) or not self.node.close_circuit(int(args[0]), if_unused=if_unused):
            raise ControlError(552, f"Unknown circuit {qecho(args[0])}")
        return _ok()

    def _closestream(self, cmd: Command) -> bytes:
        args = words(cmd.args)
        if len(args) < 2:
            raise ControlError(512, "Bad arguments to CLOSESTREAM: Need at least 2 argument(s)")
        if not _DIGITS.fullmatch(args[0]):
            raise ControlError(552, f"Unknown stream {qecho(args[0])}")
        if not args[1].isdigit() or int(args[1]) > 255:
            raise ControlError(552, f"Unrecognized reason {qecho(args[1])}")
        if not self.node.close_stream(int(args[0]), int(args[1])):
            raise ControlError(552, f"Unknown stream {qecho(args[0])}")
        return _ok()

    # -- onion services: ADD_ONION / DEL_ONION --------------------------------------------

    async def _add_onion(self, cmd: Command) -> bytes:
        """``ADD_ONION KeyType:KeyBlob [Flags=...] [MaxStreams=N] Port=V[,T] ... [ClientAuthV3=K]``
        (control-spec 3.27): v3 services only (``NEW:BEST``, ``NEW:ED25519-V3``,
        ``ED25519-V3:<base64 expanded key>``); replies ServiceID and, unless DiscardPK,
        PrivateKey. Without Detach the service goes when this connection closes."""
        self._hosting()
        args = split_args(cmd.args)
        if not args:
            raise ControlError(512, "Missing argument to ADD_ONION")
        key_type, sep, key_blob = args[0].partition(":")
        if not sep:
            raise ControlError(512, "Invalid key type/blob")
        key = None
        if key_type == "NEW":
            if key_blob not in ("BEST", "ED25519-V3"):
                raise ControlError(513, f"Invalid key type {qecho(key_blob)} "
                                        "(only ED25519-V3 onion services)")
        elif key_type == "ED25519-V3":
            try:
                raw = base64.b64decode(key_blob, validate=True)
                key = ExpandedKey.from_parts(raw[:32], raw[32:]) if len(raw) == 64 else None
            except (ValueError, binascii.Error):
                key = None
            if key is None:
                raise ControlError(512, "Failed to decode ED25519-V3 key")
        else:
            raise ControlError(513, f"Invalid key type {qecho(key_type)} (only ED25519-V3 onion services)")
        flags: set[str] = set()
        ports: list[PortMapping] = []
        client_keys: list[bytes] = []
        max_streams = 0
        for arg in args[1:]:
            name, value = split_keyword(arg)
            if value is None:
                raise ControlError(512, f"Invalid argument {qecho(arg)}")
            low = name.lower()
            if low == "flags":
                for flag in value.split(","):
                    if flag not in _ONION_FLAGS:
                        raise ControlError(512, f"Invalid 'Flags' argument {qecho(flag)}")
                    flags.add(flag)
            elif low == "maxstreams":
                if not value.isdigit() or int(value) > 65535:
                    raise ControlError(512, "Invalid MaxStreams")
                max_streams = int(value)
            elif low == "port":
                try:
                    ports.append(parse_port_mapping(value))
                except ConfigError:
                    raise ControlError(512, f"Invalid VIRTPORT/TARGET {qecho(value)}") from None
            elif low == "clientauthv3":
                try:
                    client_keys.append(parse_auth(f"descriptor:x25519:{value}", "ClientAuthV3"))
                except KeyFileError:
                    raise ControlError(512, "Cannot decode v3 client auth key") from None
            elif low == "clientauth":
                raise ControlError(513, "ClientAuth is for v2 services; use ClientAuthV3")
            else:
                raise ControlError(513, f"Invalid argument {qecho(name)}")
        if not ports:
            raise ControlError(512, "Missing 'Port' argument")
        if "BasicAuth" in flags:
            raise ControlError(512, "Cannot use BasicAuth with a v3 service (use ClientAuthV3)")
        if "NonAnonymous" in flags:
            raise ControlError(551, "Tried to create a non-anonymous onion service in an anonymous node")
        service_id, secret = await self.node.add_onion(
            key, ports, detach="Detach" in flags, owner=self.conn.id, max_streams=max_streams,
            max_streams_close_circuit="MaxStreamsCloseCircuit" in flags, client_keys=client_keys)
        lines = [f"ServiceID={service_id}"]
        if "DiscardPK" not in flags and key is None:
            lines.append("PrivateKey=ED25519-V3:" + base64.b64encode(secret.scalar + secret.prefix).decode())
        return format_reply(250, [*lines, "OK"])

    async def _del_onion(self, cmd: Command) -> bytes:
        self._hosting()
        args = words(cmd.args)
        if not args:
            raise ControlError(512, "Missing argument to DEL_ONION")
        service_id = args[0].lower().removesuffix(".onion")
        try:
            parse_onion_address(service_id + ".onion", allow_subdomain=False)
        except OnionError:
            raise ControlError(512, "Malformed Onion Service id") from None
        if not await self.node.del_onion(service_id, owner=self.conn.id):
            raise ControlError(552, "Unknown Onion Service id")
        return _ok()

    def _hosting(self) -> None:
        if not hasattr(self.node, "add_onion"):  # relays and authorities
            raise ControlError(551, "Onion services are hosted by client nodes")

    def _onions(self, detached: bool) -> str:
        self._hosting()
        ids = self.node.onions(detached=detached, owner=self.conn.id)
        if not ids:
            raise ControlError(551, "No onion services of the specified type.")
        return "\n".join(ids)
