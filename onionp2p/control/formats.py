"""Tor control protocol: data model, quoting and reply/event formats (control-spec; specs/control.md).

Theory of operation
-------------------
This module is pure (no I/O, no clock unless a caller passes none): it turns what a node
knows into the exact text tor's control port would send, and turns controller text into
tokens. :mod:`onionp2p.proto.control` (framing, authentication) and
:mod:`onionp2p.control.server` (the asyncio server) build on it.

* **Data model.** A node describes itself with frozen records — :class:`CircuitInfo`,
  :class:`StreamInfo`, :class:`OrConnInfo`, :class:`GuardInfo` — whose fields are exactly
  what control-spec's CIRC / STREAM / ORCONN lines and ``entry-guards`` need, with
  control-spec vocabulary (``BUILT``, ``GENERAL``, ``REQUESTED`` ...). Node events are
  :class:`CircEvent`, :class:`StreamEvent`, :class:`OrConnEvent` and :class:`StatusEvent`.
* **Formats.** :func:`circuit_line`, :func:`stream_line`, :func:`orconn_line`,
  :func:`status_line`, :func:`guard_line` and :func:`ns_entry` render one record. Every
  field that lands in a space-separated line is checked (no spaces, no control
  characters, fingerprints are 40 hex digits, nicknames 1-19 alphanumerics): a record that
  would corrupt the stream raises :class:`~onionp2p.errors.LocalProtocolError` (a node
  bug), which the server turns into ``551`` or drops (events) instead of sending it.
* **Replies.** :func:`format_reply` builds ``NNN-`` / ``NNN+`` (dot-escaped data block) /
  ``NNN `` lines; :func:`format_event` builds one ``650`` line. Reply text never contains
  CR or LF; controller-supplied text echoed in an error goes through :func:`echo` first.
* **Relay facts.** :func:`exit_policy_lines` writes an exit policy the way tor's
  ``GETINFO exit-policy/*`` does (one ``accept|reject[6] ADDR[/MASK]:PORT`` rule per
  line); :func:`clients_seen_line` is ``status/clients-seen`` / CLIENTS_SEEN.
* **Tokens.** :func:`split_args` splits arguments on spaces, keeping ``"quoted strings"``
  (with backslash escapes) whole, also inside ``KEY="a b"``; :func:`unquote` decodes one
  (a backslash followed by any character is that character, as control-spec §2.1 asks);
  :func:`quote` encodes for output (C escapes, readable by stem).

Errors a controller can cause are :class:`ControlError` carrying the reply code.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from onionp2p import __version__
from onionp2p.errors import LocalProtocolError
from onionp2p.proto.control import KEYWORD, TOKEN, check_line, format_reply, maybe_quote, quote
from onionp2p.proto.directory import RouterStatus

__all__ = [
    "TOR_COMPAT_VERSION",
    "version_string",
    "CircuitInfo",
    "CircuitBandwidth",
    "CCState",
    "StreamInfo",
    "OrConnInfo",
    "GuardInfo",
    "CircEvent",
    "StreamEvent",
    "OrConnEvent",
    "StatusEvent",
    "SignalEvent",
    "BuildTimeoutSetEvent",
    "GuardEvent",
    "ConfChangedEvent",
    "ControlEvent",
    "HsDescEvent",
    "hs_desc_line",
    "longname",
    "iso_time",
    "circuit_line",
    "circ_bw_line",
    "conf_changed_reply",
    "stream_line",
    "orconn_line",
    "guard_line",
    "guard_event_line",
    "status_line",
    "bootstrap_line",
    "ns_entry",
    "exit_policy_lines",
    "clients_seen_line",
]

#: The tor version whose control-spec behaviour we emulate. stem gates features on the
#: version it reads from GETINFO version / PROTOCOLINFO, so this must be a recent tor.
TOR_COMPAT_VERSION = "0.4.9.3"


def version_string() -> str:
    """What GETINFO version answers; matches stem's VERSION_PATTERN (no space inside parens)."""
    return f"{TOR_COMPAT_VERSION} (onionp2p-{__version__})"


# -- data model ------------------------------------------------------------------------

@dataclass(frozen=True)
class CircuitInfo:
    """One origin circuit as a CIRC line / circuit-status entry shows it.

    ``status``: LAUNCHED, BUILT, GUARD_WAIT, EXTENDED, FAILED, CLOSED. ``path``: the hops
    built so far, ``(FINGERPRINT, nickname or None)``. ``time_created``: unix time.
    ``reason`` / ``remote_reason``: control-spec circuit reasons (FAILED/CLOSED only).
    ``bytes_read`` / ``bytes_written``: an onionp2p extension (``BYTES_READ=``,
    ``BYTES_WRITTEN=``) that the control server fills in for ``circuit-status`` lines.
    ``hop_handshakes`` / ``hop_relay_crypto`` / ``congestion_control`` / ``cc``: onionp2p
    extensions too (``HOP_HANDSHAKES=ntor-v3,...``, ``HOP_RELAY_CRYPTO=tor1,...``,
    ``CONGESTION_CONTROL=vegas|fixed``, and where Vegas runs tor's CIRC_BW fields
    ``SS= CWND= RTT= MIN_RTT=``, RTTs in milliseconds); controllers ignore keywords they
    do not know.
    """

    id: int
    status: str
    path: tuple[tuple[str, str | None], ...] = ()
    build_flags: tuple[str, ...] = ()
    purpose: str = "GENERAL"
    time_created: float | None = None
    reason: str | None = None
    remote_reason: str | None = None
    socks_username: str | None = None
    socks_password: str | None = None
    #: onion-service circuits: control-spec's HS_STATE (HSCR_JOINED ...) and REND_QUERY (the
    #: onion address without ".onion")
    hs_state: str | None = None
    rend_query: str | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
    hop_handshakes: tuple[str, ...] = ()
    hop_relay_crypto: tuple[str, ...] = ()
    congestion_control: str | None = None
    cc: CCState | None = None


@dataclass(frozen=True)
class CCState:
    """A circuit's congestion control as tor's CIRC_BW reports it: in slow start, the
    window (cells), the smoothed and the minimum RTT (milliseconds)."""

    slow_start: bool
    cwnd: int
    rtt_ms: int
    min_rtt_ms: int

    @classmethod
    def of(cls, vegas) -> CCState:
        return cls(vegas.in_slow_start, vegas.cwnd, vegas.rtt_ewma // 1000, vegas.rtt_min // 1000)

    def keywords(self) -> str:
        return f"SS={int(self.slow_start)} CWND={int(self.cwnd)} RTT={int(self.rtt_ms)} MIN_RTT={int(self.min_rtt_ms)}"


@dataclass(frozen=True)
class CircuitBandwidth:
    """Byte totals of one open origin circuit since it was created (the source of CIRC_BW
    deltas): ``read``/``written`` on the circuit and the part ``delivered`` to or from
    streams (onionp2p counts RELAY_DATA payload, so both are the same)."""

    id: int
    read: int
    written: int
    delivered_read: int | None = None
    delivered_written: int | None = None
    cc: CCState | None = None


@dataclass(frozen=True)
class StreamInfo:
    """One client stream. ``status``: NEW, SENTCONNECT, SUCCEEDED, FAILED, CLOSED, DETACHED ...
    ``circ_id`` 0 means not attached. ``target``: ``host:port``. ``purpose``: USER, DIR_FETCH ..."""

    id: int
    status: str
    circ_id: int
    target: str
    reason: str | None = None
    remote_reason: str | None = None
    source_addr: str | None = None
    purpose: str | None = None
    socks_username: str | None = None
    socks_password: str | None = None
    client_protocol: str | None = None


@dataclass(frozen=True)
class OrConnInfo:
    """One OR connection (channel). Named by ``$FINGERPRINT~nickname`` when the peer's
    identity is known, else by ``address`` (``host:port``). ``status``: NEW, LAUNCHED,
    CONNECTED, FAILED, CLOSED."""

    id: int
    status: str
    fingerprint: str | None = None
    nickname: str | None = None
    address: str | None = None
    ncircs: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class GuardInfo:
    """An entry guard. ``status``: up, never-connected, down, unusable, unlisted."""

    fingerprint: str
    nickname: str | None = None
    status: str = "up"


@dataclass(frozen=True)
class CircEvent:
    """A circuit changed state (sent as ``650 CIRC``)."""

    circuit: CircuitInfo


@dataclass(frozen=True)
class StreamEvent:
    """A stream changed state (``650 STREAM``)."""

    stream: StreamInfo


@dataclass(frozen=True)
class OrConnEvent:
    """An OR connection changed state (``650 ORCONN``)."""

    orconn: OrConnInfo


@dataclass(frozen=True)
class StatusEvent:
    """``650 STATUS_<kind> <severity> <action> [k=v ...]``; kind GENERAL, CLIENT or SERVER,
    severity NOTICE, WARN or ERR, action e.g. BOOTSTRAP or CIRCUIT_ESTABLISHED."""

    kind: str
    severity: str
    action: str
    arguments: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SignalEvent:
    """The node acted on a signal that did not come through the control port (SIGHUP ...):
    ``650 SIGNAL <name>`` (RELOAD, DUMP, ...)."""

    name: str


@dataclass(frozen=True)
class ConfChangedEvent:
    """Configuration values changed other than by SETCONF (a reload): ``650-CONF_CHANGED``,
    one ``650-Key=Value`` (``650-Key`` when unset) per value, ``650 OK``."""

    values: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class BuildTimeoutSetEvent:
    """The circuit build timeout changed: ``650 BUILDTIMEOUT_SET <kind> TOTAL_TIMES=...``
    (kind COMPUTED or RESET; ``args`` as tor's cbt_control_event_buildtimeout_set writes them)."""

    kind: str
    args: str


@dataclass(frozen=True)
class GuardEvent:
    """A guard's status changed: ``650 GUARD ENTRY $FP~nick STATUS`` (control-spec; status
    NEW, UP, DOWN, DROPPED, GOOD_L or BAD_L, as tor's control_event_guard)."""

    fingerprint: str
    nickname: str | None
    status: str


@dataclass(frozen=True)
class HsDescEvent:
    """An onion-service descriptor upload step: ``650 HS_DESC <action> <address> UNKNOWN
    <$FP~nick> [<descriptor id>] [REASON=...]`` (action UPLOAD, UPLOADED or FAILED, as
    tor's control_event_hs_descriptor_upload*; the descriptor id, the blinded key in
    base64, is given with UPLOAD only, as tor does)."""

    action: str
    address: str
    hsdir: str  # $FP~nick
    descriptor_id: str | None = None
    reason: str | None = None


ControlEvent = (CircEvent | StreamEvent | OrConnEvent | StatusEvent | SignalEvent | ConfChangedEvent
                | BuildTimeoutSetEvent | GuardEvent | HsDescEvent)


_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{40}")
_NICKNAME = re.compile(r"[A-Za-z0-9]{1,19}")


# -- record formats --------------------------------------------------------------------

def _tok(value: object, what: str) -> str:
    s = str(value)
    if not TOKEN.fullmatch(s):
        raise LocalProtocolError(f"{what} {s!r} is not a control-protocol token")
    return s


def _fp(fingerprint: str) -> str:
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise LocalProtocolError(f"bad fingerprint {fingerprint!r}")
    return fingerprint.upper()


def longname(fingerprint: str, nickname: str | None = None) -> str:
    """``$FINGERPRINT~nickname`` (or ``$FINGERPRINT``), control-spec's LongName."""
    if nickname is None:
        return "$" + _fp(fingerprint)
    if not _NICKNAME.fullmatch(nickname):
        raise LocalProtocolError(f"bad nickname {nickname!r}")
    return f"${_fp(fingerprint)}~{nickname}"


def iso_time(ts: float) -> str:
    """ISOTime2Frac in UTC, e.g. ``2025-01-01T00:00:00.000000``."""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _kw(parts: list[str], key: str, value: object | None) -> None:
    if value is not None:
        parts.append(f"{key}={_tok(value, key)}")


def _socks(parts: list[str], username: str | None, password: str | None) -> None:
    if username is not None:
        parts.append(f"SOCKS_USERNAME={quote(username)}")
    if password is not None:
        parts.append(f"SOCKS_PASSWORD={quote(password)}")


def circuit_line(c: CircuitInfo) -> str:
    """A CIRC event body / circuit-status line (without ``650 CIRC``)."""
    parts = [_tok(int(c.id), "circuit id"), _tok(c.status, "status")]
    if c.path:
        parts.append(",".join(longname(fp, nick) for fp, nick in c.path))
    if c.build_flags:
        parts.append("BUILD_FLAGS=" + ",".join(_tok(f, "build flag") for f in c.build_flags))
    _kw(parts, "PURPOSE", c.purpose)
    _kw(parts, "HS_STATE", c.hs_state)
    _kw(parts, "REND_QUERY", c.rend_query)
    if c.time_created is not None:
        parts.append("TIME_CREATED=" + iso_time(c.time_created))
    _kw(parts, "REASON", c.reason)
    _kw(parts, "REMOTE_REASON", c.remote_reason)
    _socks(parts, c.socks_username, c.socks_password)
    _kw(parts, "BYTES_READ", None if c.bytes_read is None else int(c.bytes_read))
    _kw(parts, "BYTES_WRITTEN", None if c.bytes_written is None else int(c.bytes_written))
    if c.hop_handshakes:
        parts.append("HOP_HANDSHAKES=" + ",".join(_tok(h, "handshake") for h in c.hop_handshakes))
    if c.hop_relay_crypto:
        parts.append("HOP_RELAY_CRYPTO=" + ",".join(_tok(h, "relay crypto") for h in c.hop_relay_crypto))
    _kw(parts, "CONGESTION_CONTROL", c.congestion_control)
    if c.cc is not None:
        parts.append(c.cc.keywords())
    return " ".join(parts)


def conf_changed_reply(values: Sequence[tuple[str, str | None]]) -> bytes:
    """The multi-line ``650 CONF_CHANGED`` event for ``(key, value or None)`` pairs."""
    lines = [f"{_tok(k, 'key')}={v}" if v is not None else _tok(k, "key") for k, v in values]
    return format_reply(650, ["CONF_CHANGED", *lines, "OK"])


def circ_bw_line(circ_id: int, read: int, written: int, when: float, *, delivered_read: int | None = None,
                 delivered_written: int | None = None, cc: CCState | None = None) -> str:
    """A CIRC_BW event body: ``ID=n READ=n WRITTEN=n TIME=t [DELIVERED_READ=n DELIVERED_WRITTEN=n]
    [SS=n CWND=n RTT=n MIN_RTT=n]`` (byte counts since the previous CIRC_BW event of that
    circuit; the congestion-control fields as tor 0.4.7+ gives them)."""
    parts = [f"ID={int(circ_id)}", f"READ={int(read)}", f"WRITTEN={int(written)}", f"TIME={iso_time(when)}"]
    if delivered_read is not None:
        parts.append(f"DELIVERED_READ={int(delivered_read)}")
    if delivered_written is not None:
        parts.append(f"DELIVERED_WRITTEN={int(delivered_written)}")
    if cc is not None:
        parts.append(cc.keywords())
    return " ".join(parts)


def stream_line(s: StreamInfo, *, event: bool = True) -> str:
    """A STREAM event body, or (``event=False``) a stream-status line (4 fields only)."""
    target = _tok(s.target, "target")
    if ":" not in target:
        raise LocalProtocolError(f"stream target {target!r} is not host:port")
    parts = [_tok(int(s.id), "stream id"), _tok(s.status, "status"), _tok(int(s.circ_id), "circ id"), target]
    if event:
        _kw(parts, "REASON", s.reason)
        _kw(parts, "REMOTE_REASON", s.remote_reason)
        _kw(parts, "SOURCE_ADDR", s.source_addr)
        _kw(parts, "PURPOSE", s.purpose)
        _socks(parts, s.socks_username, s.socks_password)
        _kw(parts, "CLIENT_PROTOCOL", s.client_protocol)
    return " ".join(parts)


def orconn_line(o: OrConnInfo, *, event: bool = True) -> str:
    """An ORCONN event body, or (``event=False``) an orconn-status line."""
    if o.fingerprint is not None:
        endpoint = longname(o.fingerprint, o.nickname)
    elif o.address is not None:
        endpoint = _tok(o.address, "address")
    else:
        raise LocalProtocolError("OR connection has neither fingerprint nor address")
    parts = [endpoint, _tok(o.status, "status")]
    if event:
        _kw(parts, "REASON", o.reason)
        _kw(parts, "NCIRCS", None if o.ncircs is None else int(o.ncircs))
        _kw(parts, "ID", int(o.id))
    return " ".join(parts)


def guard_event_line(e: GuardEvent) -> str:
    """A GUARD event's body: ``ENTRY $FP~nick STATUS``."""
    return f"ENTRY {longname(e.fingerprint, e.nickname)} {_tok(e.status, 'guard status')}"


def hs_desc_line(e: HsDescEvent) -> str:
    """An HS_DESC event's body (see :class:`HsDescEvent`)."""
    parts = [_tok(e.action, "HS_DESC action"), _tok(e.address, "onion address"), "UNKNOWN",
             _tok(e.hsdir, "HSDir")]
    if e.descriptor_id and e.action == "UPLOAD":
        parts.append(_tok(e.descriptor_id, "descriptor id"))
    if e.reason:
        parts.append(f"REASON={_tok(e.reason, 'reason')}")
    return " ".join(parts)


def guard_line(g: GuardInfo) -> str:
    """An entry-guards line: ``$FP~nick status``."""
    return f"{longname(g.fingerprint, g.nickname)} {_tok(g.status, 'guard status')}"


def status_line(e: StatusEvent) -> str:
    """The body of a STATUS_* event (after the event type)."""
    parts = [_tok(e.severity, "severity"), _tok(e.action, "action")]
    for key, value in e.arguments:
        if not KEYWORD.fullmatch(key):
            raise LocalProtocolError(f"bad status argument name {key!r}")
        parts.append(f"{key}={maybe_quote(str(value))}")
    return " ".join(parts)


def bootstrap_line(progress: int, tag: str, summary: str, severity: str = "NOTICE") -> str:
    """``status/bootstrap-phase``: ``NOTICE BOOTSTRAP PROGRESS=n TAG=t SUMMARY="..."``."""
    return (f"{_tok(severity, 'severity')} BOOTSTRAP PROGRESS={int(progress)} "
            f"TAG={_tok(tag, 'tag')} SUMMARY={quote(summary)}")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def ns_entry(rs: RouterStatus, published: float) -> str:
    """One router status entry in dir-spec v3 form (``r``, ``a``, ``s``, ``w``, ``p`` lines).

    onionp2p has no server descriptors yet: the ``r`` line's digest is the SHA-1 of the
    relay's canonical RelayInfo JSON (it changes when the onion key rotates, as a
    descriptor digest would), and ``published`` is supplied by the caller.
    """
    info = rs.info
    if not _NICKNAME.fullmatch(info.nickname):
        raise LocalProtocolError(f"bad nickname {info.nickname!r}")
    digest = hashlib.sha1(json.dumps(info.to_dict(), sort_keys=True).encode()).digest()
    try:
        ip = ipaddress.ip_address(info.address)
    except ValueError:
        raise LocalProtocolError(f"relay address {info.address!r} is not an IP address") from None
    v4 = str(ip) if ip.version == 4 else "0.0.0.0"
    lines = [f"r {info.nickname} {_b64(info.rsa_id)} {_b64(digest)} "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(published))} {v4} {int(info.or_port)} 0"]
    if ip.version == 6:
        lines.append(f"a [{ip}]:{int(info.or_port)}")
    lines.append(" ".join(["s", *sorted(_tok(f, "flag") for f in rs.flags)]))
    lines.append(f"w Bandwidth={int(rs.bandwidth)}")
    policy = check_line(info.exit_policy)
    if not re.fullmatch(r"(accept|reject) [0-9,-]+", policy):
        raise LocalProtocolError(f"bad exit policy summary {policy!r}")
    lines.append("p " + policy)
    return "\n".join(lines)


def exit_policy_lines(rules: Sequence, family: int | None = None) -> list[str]:
    """An exit policy's rules as tor's ``GETINFO exit-policy/full`` writes them, one per line
    (tor joins them with newlines; ``policy_write_item`` in descriptor format).

    ``rules`` are :class:`~onionp2p.proto.exitpolicy.PolicyRule` s. As in tor, an IPv6 rule is
    written with ``accept6``/``reject6`` (``reject6 [fc00::]/7:*``, ``accept6 *:443``); an
    IPv4 rule or one for every address as ``accept``/``reject``. tor stores no rule for
    "both families" (it splits ``*`` into ``*4`` and ``*6``), so its IPv4 wildcard reads
    ``*``; ours keeps the distinction: ``*`` is every address and an IPv4-only wildcard is
    ``*4``, both in torrc syntax that tor, stem and :meth:`ExitPolicy.parse
    <onionp2p.proto.exitpolicy.ExitPolicy.parse>` read back to the same policy. ``family`` 4 or
    6 keeps the rules that can match that family (``exit-policy/ipv4`` / ``ipv6``).
    """
    if family not in (None, 4, 6):
        raise LocalProtocolError(f"family must be None, 4 or 6, not {family!r}")
    out = []
    for rule in rules:
        if family is not None and rule.family not in (None, family):
            continue
        action = "accept" if rule.accept else "reject"
        if rule.family == 6:
            address = "*" if rule.network is None else rule.address_text()
            out.append(f"{action}6 {address}:{rule.port_text()}")
        else:
            out.append(f"{action} {rule.address_text()}:{rule.port_text()}")
    return [check_line(line) for line in out]


def clients_seen_line(time_started: float = 0.0, countries: Sequence[tuple[str, int]] = (),
                      ipv4: int = 0, ipv6: int = 0) -> str:
    """``status/clients-seen`` (the CLIENTS_SEEN event's body): ``TimeStarted="YYYY-MM-DD
    HH:MM:SS" CountrySummary=cc=n,... IPVersions=v4=n,v6=n``. tor writes the start of its
    bridge-statistics interval (0, the epoch, when it keeps none) and empty / zero counts
    when it has seen no clients."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time_started))
    summary = ",".join(f"{_tok(cc, 'country code')}={int(n)}" for cc, n in countries)
    return f'TimeStarted="{started}" CountrySummary={summary} IPVersions=v4={int(ipv4)},v6={int(ipv6)}'
