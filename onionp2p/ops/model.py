"""The control-port model: replies, events and records as tor's control protocol writes
them, and :class:`NetworkView`, a node's state kept current from events (pure: no I/O).

Theory of operation
-------------------
Used by :mod:`onionp2p.ops.controlclient` (the asyncio controller), ``onionp2p circuits``,
``onionp2p top`` and tools/circuit_graph.py.

:class:`ReplyAssembler` turns received lines into complete :class:`Reply` objects
(``NNN-`` / ``NNN+`` dot-escaped data blocks / ``NNN `` end lines); a reply with code
650 is an :class:`Event`. :func:`parse_circuit`, :func:`parse_stream`,
:func:`parse_orconn` and :func:`parse_ns` read control-spec lines into frozen records
(CIRC events and ``circuit-status`` lines share one format, likewise STREAM /
``stream-status`` and ORCONN / ``orconn-status``; ``ns/all`` is dir-spec's router status
entries). Malformed input raises :class:`InspectError`, never anything else.

:class:`NetworkView` holds a node's circuits, streams, OR connections, the relays of its
consensus, traffic totals, the last 300 one-second bandwidth samples and a log tail.
:meth:`NetworkView.load` fills it from one GETINFO (:data:`SNAPSHOT_KEYS`);
:meth:`NetworkView.apply` keeps it current from events (CIRC, CIRC_BW, STREAM, ORCONN,
BW, log and STATUS_* events); closed or failed circuits, streams and connections leave
it; a malformed event is counted and skipped.

Per-circuit byte counts come from two places when the node offers them: tor's
``CIRC_BW`` events (``Read``/``Written`` deltas, added up per circuit) and an onionp2p
extension of CIRC lines, ``BYTES_READ=``/``BYTES_WRITTEN=`` (totals; controllers must
ignore keywords they do not know, so stem and nyx are unaffected). onionp2p's client
control port sends both, consistently: ``circuit-status`` carries the totals as of the
node's last CIRC_BW tick, so :meth:`NetworkView.load` plus the CIRC_BW events after the
snapshot add up exactly (specs/control.md). A node that sends neither (tor's
``circuit-status`` has no totals) leaves them ``None`` ("unknown", not zero) until CIRC_BW
events arrive.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from onionp2p.errors import OnionError
from onionp2p.proto.control import ControlError, split_args, split_keyword

__all__ = [
    "DEFAULT_CONTROL_PORT", "WATCH_EVENTS", "SNAPSHOT_KEYS",
    "InspectError", "ControlReplyError", "AuthenticationError",
    "Reply", "Event", "ReplyAssembler", "as_event",
    "Hop", "Circuit", "Stream", "OrConn", "Router", "LogLine",
    "parse_circuit", "parse_stream", "parse_orconn", "parse_ns", "parse_protocolinfo", "parse_keywords",
    "split_line", "parse_address", "NetworkView", "hop_role",
]

#: Where ``onionp2p testnet`` puts its client's control port.
DEFAULT_CONTROL_PORT = 9151
#: What a live display subscribes to.
WATCH_EVENTS = ("CIRC", "STREAM", "ORCONN", "BW", "CIRC_BW", "NOTICE", "WARN", "ERR", "STATUS_CLIENT",
                "STATUS_GENERAL")
SNAPSHOT_KEYS = ("version", "circuit-status", "stream-status", "orconn-status", "traffic/read",
                 "traffic/written", "ns/all", "bw-event-cache")
_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_REPLY_LINE = re.compile(r"(\d{3})([ +-])(.*)")
_CLOSED = ("CLOSED", "FAILED")
_LOG_EVENTS = ("DEBUG", "INFO", "NOTICE", "WARN", "ERR")


class InspectError(OnionError):
    """The control port could not be reached or spoke something we cannot read."""


class ControlReplyError(InspectError):
    """The node answered a command with an error status (``code`` is the status code)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class AuthenticationError(InspectError):
    """No usable authentication method, or the node refused our credentials."""


# -- replies -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """One complete reply: its status code and lines as ``(text, data block or None)``."""

    code: int
    lines: tuple[tuple[str, str | None], ...]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def message(self) -> str:
        return self.lines[-1][0] if self.lines else ""

    def values(self) -> dict[str, str]:
        """``key=value`` lines (and ``key=`` data blocks) of a GETINFO reply."""
        out: dict[str, str] = {}
        for text, data in self.lines:
            key, eq, value = text.partition("=")
            if eq:
                out[key] = data if data is not None else value
        return out


@dataclass(frozen=True)
class Event:
    """An asynchronous ``650`` reply: ``type`` (CIRC, BW ...), the rest of its first line in
    ``body``, further lines in ``extra``; ``seq`` = replies received before it."""

    type: str
    body: str
    extra: tuple[str, ...] = ()
    seq: int = 0


class ReplyAssembler:
    """Sans-IO: feed lines (without CRLF), get complete :class:`Reply` objects."""

    def __init__(self) -> None:
        self._lines: list[tuple[str, str | None]] = []
        self._data: list[str] | None = None
        self._header = ""

    def feed(self, line: str) -> Reply | None:
        if self._data is not None:  # inside a data block
            if line == ".":
                self._lines.append((self._header, "\n".join(self._data)))
                self._data = None
            else:
                self._data.append(line[1:] if line.startswith("..") else line)
            return None
        m = _REPLY_LINE.fullmatch(line)
        if m is None:
            raise InspectError(f"malformed reply line {line[:80]!r}")
        code, sep, text = int(m.group(1)), m.group(2), m.group(3)
        if sep == "+":
            self._header, self._data = text, []
            return None
        self._lines.append((text, None))
        if sep == "-":
            return None
        lines, self._lines = tuple(self._lines), []
        return Reply(code, lines)


def as_event(reply: Reply, seq: int = 0) -> Event:
    first = reply.lines[0][0]
    etype, _, body = first.partition(" ")
    extra = tuple(t if d is None else f"{t}\n{d}" for t, d in reply.lines[1:])
    return Event(etype, body, extra, seq)


# -- records -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hop:
    """A relay named in a path or endpoint: fingerprint (40 hex) and/or nickname."""

    fingerprint: str | None
    nickname: str | None = None

    @property
    def short(self) -> str:
        return "$" + self.fingerprint[:8] if self.fingerprint else ""

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.nickname, self.short) if p) or "?"

    @classmethod
    def parse(cls, name: str) -> Hop:
        if name.startswith("$"):
            fp, _, nick = name[1:].replace("=", "~").partition("~")
            if not re.fullmatch(r"[0-9A-Fa-f]{40}", fp):
                raise InspectError(f"bad relay name {name[:60]!r}")
            return cls(fp.upper(), nick or None)
        return cls(None, name)


@dataclass(frozen=True)
class Circuit:
    """A CIRC line. ``bytes_read``/``bytes_written`` are None when the node does not say."""

    id: int
    status: str
    path: tuple[Hop, ...] = ()
    purpose: str | None = None
    build_flags: tuple[str, ...] = ()
    time_created: float | None = None
    reason: str | None = None
    remote_reason: str | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
    #: onion-service circuits: control-spec's HS_STATE and REND_QUERY (address without ".onion")
    hs_state: str | None = None
    rend_query: str | None = None
    #: onionp2p's extensions: per hop, the circuit handshake and relay crypto; the circuit's
    #: congestion control ("vegas" | "fixed") and, under Vegas, tor's CIRC_BW fields
    hop_handshakes: tuple[str, ...] = ()
    hop_relay_crypto: tuple[str, ...] = ()
    congestion_control: str | None = None
    slow_start: bool | None = None
    cwnd: int | None = None
    rtt_ms: int | None = None
    min_rtt_ms: int | None = None

    def age(self, now: float) -> float | None:
        return None if self.time_created is None else max(0.0, now - self.time_created)


@dataclass(frozen=True)
class Stream:
    """A STREAM line: ``target`` is ``host:port`` (private: show only when asked)."""

    id: int
    status: str
    circ_id: int
    target: str
    purpose: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class OrConn:
    """An ORCONN line: the peer (relay name or ``address``) and status."""

    endpoint: str
    status: str
    peer: Hop | None = None
    id: str | None = None
    ncircs: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Router:
    """One router status entry of ``ns/all``."""

    nickname: str
    fingerprint: str
    address: str
    or_port: int
    flags: frozenset[str] = frozenset()
    bandwidth: int = 0
    policy: str = ""

    @property
    def hop(self) -> Hop:
        return Hop(self.fingerprint, self.nickname)


@dataclass(frozen=True)
class LogLine:
    """A log or status event as the log tail shows it."""

    time: float
    severity: str
    message: str


def parse_keywords(tokens: Iterable[str]) -> dict[str, str]:
    """``KEY=value`` tokens (others skipped) as {KEY upper-cased: value, unquoted}."""
    out = {}
    for t in tokens:
        if _KEYWORD.match(t):
            try:
                key, value = split_keyword(t)
            except ControlError:
                continue
            out[key.upper()] = value or ""
    return out


def split_line(body: str) -> list[str]:
    """Space-separated tokens, quoted strings kept whole (InspectError if unterminated)."""
    try:
        return split_args(body)
    except ControlError as exc:
        raise InspectError(f"unreadable line {body[:80]!r}: {exc}") from None


def _int(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InspectError(f"bad {what} {value[:40]!r}") from None


def _iso(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value).replace(tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None


def parse_circuit(body: str) -> Circuit:
    """``ID STATUS [PATH] [KEY=VALUE ...]`` (a CIRC event body or a circuit-status line)."""
    tokens = split_line(body)
    if len(tokens) < 2:
        raise InspectError(f"short circuit line {body[:80]!r}")
    rest = tokens[2:]
    path: tuple[Hop, ...] = ()
    if rest and not _KEYWORD.match(rest[0]):
        path = tuple(Hop.parse(n) for n in rest.pop(0).split(",") if n)
    kw = parse_keywords(rest)
    return Circuit(
        id=_int(tokens[0], "circuit id"), status=tokens[1], path=path, purpose=kw.get("PURPOSE"),
        build_flags=tuple(f for f in kw.get("BUILD_FLAGS", "").split(",") if f),
        time_created=_iso(kw.get("TIME_CREATED")), reason=kw.get("REASON"),
        remote_reason=kw.get("REMOTE_REASON"), hs_state=kw.get("HS_STATE"), rend_query=kw.get("REND_QUERY"),
        bytes_read=_int(kw.get("BYTES_READ"), "byte count"),
        bytes_written=_int(kw.get("BYTES_WRITTEN"), "byte count"),
        hop_handshakes=tuple(h for h in kw.get("HOP_HANDSHAKES", "").split(",") if h),
        hop_relay_crypto=tuple(h for h in kw.get("HOP_RELAY_CRYPTO", "").split(",") if h),
        congestion_control=kw.get("CONGESTION_CONTROL"), **_cc_fields(kw),
    )


def _cc_fields(kw: dict[str, str]) -> dict:
    """tor's congestion-control keywords (CIRC_BW, and our circuit-status lines), if given."""
    if "CWND" not in kw:
        return {}
    ss = _int(kw.get("SS"), "SS")
    return {"slow_start": None if ss is None else bool(ss), "cwnd": _int(kw.get("CWND"), "CWND"),
            "rtt_ms": _int(kw.get("RTT"), "RTT"), "min_rtt_ms": _int(kw.get("MIN_RTT"), "MIN_RTT")}


def parse_stream(body: str) -> Stream:
    """``ID STATUS CIRCID TARGET [KEY=VALUE ...]`` (STREAM event / stream-status line)."""
    tokens = split_line(body)
    if len(tokens) < 4:
        raise InspectError(f"short stream line {body[:80]!r}")
    kw = parse_keywords(tokens[4:])
    return Stream(_int(tokens[0], "stream id"), tokens[1], _int(tokens[2], "circuit id"), tokens[3],
                  kw.get("PURPOSE"), kw.get("REASON"))


def parse_orconn(body: str) -> OrConn:
    """``NAME STATUS [KEY=VALUE ...]`` (ORCONN event / orconn-status line)."""
    tokens = split_line(body)
    if len(tokens) < 2:
        raise InspectError(f"short orconn line {body[:80]!r}")
    kw = parse_keywords(tokens[2:])
    peer = Hop.parse(tokens[0]) if tokens[0].startswith("$") else None
    return OrConn(tokens[0], tokens[1], peer, kw.get("ID"), _int(kw.get("NCIRCS"), "circuit count"),
                  kw.get("REASON"))


def parse_ns(text: str) -> list[Router]:
    """Router status entries (dir-spec v3 ``r``/``s``/``w``/``p`` lines) of ``ns/all``."""
    routers: list[Router] = []
    cur: Router | None = None
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "r":
            f = rest.split()
            if len(f) < 7:
                raise InspectError(f"short r line {line[:80]!r}")
            try:
                fp = base64.b64decode(f[1] + "=" * (-len(f[1]) % 4), validate=True).hex().upper()
            except (binascii.Error, ValueError):
                raise InspectError(f"bad identity in r line {line[:80]!r}") from None
            cur = Router(f[0], fp, f[5], _int(f[6], "ORPort") or 0)
            routers.append(cur)
        elif cur is not None and word in ("s", "w", "p"):
            if word == "s":
                cur = replace(cur, flags=frozenset(rest.split()))
            elif word == "w":
                bw = parse_keywords(rest.split()).get("BANDWIDTH")
                cur = replace(cur, bandwidth=_int(bw, "bandwidth") or 0)
            else:
                cur = replace(cur, policy=rest)
            routers[-1] = cur
    return routers


def parse_protocolinfo(reply: Reply) -> tuple[set[str], str | None]:
    """(auth methods, cookie file) from a PROTOCOLINFO reply."""
    methods: set[str] = set()
    cookie = None
    for text, _ in reply.lines:
        if text.startswith("AUTH "):
            kw = parse_keywords(split_line(text[5:]))
            methods = {m for m in kw.get("METHODS", "").split(",") if m}
            cookie = kw.get("COOKIEFILE")
    return methods, cookie


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InspectError(f"bad control address {text!r} (expected HOST:PORT)")
    return host, int(port)


# -- the view --------------------------------------------------------------------------------

@dataclass
class NetworkView:
    """What a node reports, kept current by :meth:`apply`."""

    circuits: dict[int, Circuit] = field(default_factory=dict)
    streams: dict[int, Stream] = field(default_factory=dict)
    orconns: dict[str, OrConn] = field(default_factory=dict)
    routers: dict[str, Router] = field(default_factory=dict)
    traffic_read: int = 0
    traffic_written: int = 0
    bandwidth: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=300))
    log: deque[LogLine] = field(default_factory=lambda: deque(maxlen=500))
    version: str = ""
    events_seen: int = 0
    malformed: int = 0

    def load(self, info: dict[str, str]) -> None:
        """Replace the state with a GETINFO answer for :data:`SNAPSHOT_KEYS` (any subset)."""
        self.version = info.get("version", self.version)
        if "circuit-status" in info:
            circs = (parse_circuit(ln) for ln in info["circuit-status"].splitlines() if ln.strip())
            self.circuits = {c.id: c for c in circs if c.status not in _CLOSED}
        if "stream-status" in info:
            streams = (parse_stream(ln) for ln in info["stream-status"].splitlines() if ln.strip())
            self.streams = {s.id: s for s in streams if s.status not in _CLOSED}
        if "orconn-status" in info:
            conns = (parse_orconn(ln) for ln in info["orconn-status"].splitlines() if ln.strip())
            self.orconns = {o.endpoint: o for o in conns if o.status not in _CLOSED}
        if "ns/all" in info:
            self.routers = {r.fingerprint: r for r in parse_ns(info["ns/all"])}
        self.traffic_read = _int(info.get("traffic/read"), "traffic") or self.traffic_read
        self.traffic_written = _int(info.get("traffic/written"), "traffic") or self.traffic_written
        for sample in info.get("bw-event-cache", "").split():
            r, _, w = sample.partition(",")
            if r.isdigit() and w.isdigit():
                self.bandwidth.append((int(r), int(w)))

    def apply(self, ev: Event, now: float | None = None) -> bool:
        """Update from one event; True if it was one the view tracks. A malformed event is
        counted in ``malformed`` and otherwise ignored."""
        self.events_seen += 1
        try:
            return self._apply(ev, time.time() if now is None else now)
        except InspectError:
            self.malformed += 1
            return False

    def _apply(self, ev: Event, now: float) -> bool:
        t = ev.type
        if t == "CIRC":
            c = parse_circuit(ev.body)
            old = self.circuits.pop(c.id, None)
            if c.status not in _CLOSED:
                if old is not None and c.bytes_read is None:  # keep CIRC_BW counts
                    c = replace(c, bytes_read=old.bytes_read, bytes_written=old.bytes_written)
                if old is not None and c.cwnd is None:  # ... and congestion-control state
                    c = replace(c, slow_start=old.slow_start, cwnd=old.cwnd, rtt_ms=old.rtt_ms,
                                min_rtt_ms=old.min_rtt_ms)
                self.circuits[c.id] = c
        elif t == "CIRC_BW":
            kw = parse_keywords(split_line(ev.body))
            cid = _int(kw.get("ID"), "circuit id")
            c = self.circuits.get(cid)  # type: ignore[arg-type]
            if c is not None:
                self.circuits[c.id] = replace(
                    c, bytes_read=(c.bytes_read or 0) + (_int(kw.get("READ"), "byte count") or 0),
                    bytes_written=(c.bytes_written or 0) + (_int(kw.get("WRITTEN"), "byte count") or 0),
                    **_cc_fields(kw))
        elif t == "STREAM":
            s = parse_stream(ev.body)
            self.streams.pop(s.id, None)
            if s.status not in _CLOSED:
                self.streams[s.id] = s
        elif t == "ORCONN":
            o = parse_orconn(ev.body)
            self.orconns.pop(o.endpoint, None)
            if o.status not in _CLOSED:
                self.orconns[o.endpoint] = o
        elif t == "BW":
            f = ev.body.split()
            r, w = (_int(f[0], "BW") or 0, _int(f[1], "BW") or 0) if len(f) >= 2 else (0, 0)
            self.bandwidth.append((r, w))
            self.traffic_read += r
            self.traffic_written += w
        elif t in _LOG_EVENTS:
            self.log.append(LogLine(now, t, " ".join([ev.body, *ev.extra])))
        elif t.startswith("STATUS_"):
            sev, _, rest = ev.body.partition(" ")
            self.log.append(LogLine(now, sev, f"{t} {rest}"))
        else:
            return False
        return True

    # -- questions the displays ask ------------------------------------------------------------

    def streams_of(self, circ_id: int) -> list[Stream]:
        return sorted((s for s in self.streams.values() if s.circ_id == circ_id), key=lambda s: s.id)

    def router(self, hop: Hop) -> Router | None:
        if hop.fingerprint:
            return self.routers.get(hop.fingerprint)
        return next((r for r in self.routers.values() if r.nickname == hop.nickname), None)

    def relays_in_use(self) -> list[tuple[Hop, Router | None, list[str], list[int]]]:
        """Every relay on a current circuit: (hop, router entry, roles, circuit ids)."""
        seen: dict[str, tuple[Hop, Router | None, list[str], list[int]]] = {}
        for c in sorted(self.circuits.values(), key=lambda c: c.id):
            for i, hop in enumerate(c.path):
                key = hop.fingerprint or hop.nickname or "?"
                router = self.router(hop)
                if hop.nickname is None and router is not None:
                    hop = router.hop
                entry = seen.setdefault(key, (hop, router, [], []))
                role = hop_role(c, i)
                if role not in entry[2]:
                    entry[2].append(role)
                entry[3].append(c.id)
        return list(seen.values())


def hop_role(c: Circuit, i: int) -> str:
    """guard / middle / exit (the last hop of a built circuit) for hop ``i`` of ``c``."""
    if i == 0:
        return "guard"
    if i == len(c.path) - 1 and c.status == "BUILT":
        return "exit"
    return "middle"
