"""An optional Prometheus metrics endpoint, like tor's MetricsPort (specs/metrics.md).

Theory of operation
-------------------
Three parts, each usable alone:

* **Model and format (pure).** A :class:`Metric` is one metric family — name, type
  (``counter`` or ``gauge``), help text and samples ``(labels, value)``.
  :func:`render_metrics` writes families in the Prometheus text exposition format 0.0.4
  (``# HELP``, ``# TYPE``, ``name{label="value"} value``) with label values and help
  escaped as the format requires. Counter names end in ``_total``.
* **Collectors.** :class:`RelayCollector`, :class:`ClientCollector` and
  :class:`AuthorityCollector` are callables returning the metrics of a
  :class:`~onionp2p.relay.relay.Relay`, a :class:`~onionp2p.client.node.ClientNode` or a
  :class:`~onionp2p.dir.authority.Authority` (plus its relay, if it runs one) at the moment of
  the scrape, each with the standard ``process_*`` families (CPU, memory, descriptors). They only read the
  node's state (channels' cell and byte counters, circuit tables, ``relay.stats``,
  SOCKS statistics) except that the client collector listens to circuit and channel
  events to count what disappears with closed objects (build results, close reasons,
  the data bytes and cells of closed circuits and channels). Counters must never go
  down, but a channel's counters leave with the channel: :class:`ChannelTotals` keeps
  the last values seen of every channel and adds them to a running total when the channel
  is gone (exact for the client, which reports closings; for a relay, exact when
  ``relay.stats`` carries ``closed_cells_in``/``closed_cells_out``/``closed_bytes_in``/
  ``closed_bytes_out``, otherwise counting up to the last scrape before the close).
* **Server.** :class:`MetricsServer` ``(collect, host, port)`` is a minimal HTTP/1.0
  server on asyncio: ``GET /metrics`` (or ``/``) answers the rendered collection, HEAD
  the headers, other paths 404, other methods 405; one request per connection, request
  heads limited to 8 KiB and 5 s, at most ``max_connections`` at once. It listens on
  127.0.0.1 by default and refuses a non-loopback address unless ``allow_remote=True``
  (the numbers describe traffic; tor likewise guards MetricsPort with a policy). A
  collector that raises gives ``500`` and a log line; the server keeps running.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from onionp2p import __version__
from onionp2p.errors import ConfigError, ListenError
from onionp2p.log import get_logger

__all__ = [
    "CONTENT_TYPE",
    "Metric",
    "counter",
    "gauge",
    "render_metrics",
    "ChannelTotals",
    "congestion_metrics",
    "RelayCollector",
    "ClientCollector",
    "AuthorityCollector",
    "process_metrics",
    "MetricsServer",
]

log = get_logger("onionp2p.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_HEAD = 8192
_CLOSED_KEYS = ("closed_cells_in", "closed_cells_out", "closed_bytes_in", "closed_bytes_out")
_CLOSED_PADDING = ("closed_padding_in", "closed_padding_out")
_KNOWN_STATS = {"create_ok", "create_failed", "destroyed", "throttled", *_CLOSED_KEYS, *_CLOSED_PADDING}

Labels = tuple[tuple[str, str], ...]


# -- model and text format -------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """One metric family: ``samples`` are ``(labels, value)``, labels as (name, value) pairs."""

    name: str
    type: str
    help: str
    samples: tuple[tuple[Labels, float], ...]


def _samples(value: float | Mapping[Labels | tuple[str, str], float], label: str | None) -> tuple:
    if isinstance(value, Mapping):
        out = []
        for key, v in value.items():
            labels: Labels = ((label, str(key)),) if label is not None else tuple(key)  # type: ignore[arg-type]
            out.append((labels, v))
        return tuple(out)
    return (((), value),)


def counter(name: str, help: str, value: float | Mapping, label: str | None = None) -> Metric:
    """A counter family; ``value`` a number, or {label value: number} with ``label``."""
    return Metric(name, "counter", help, _samples(value, label))


def gauge(name: str, help: str, value: float | Mapping, label: str | None = None) -> Metric:
    """A gauge family; ``value`` a number, or {label value: number} with ``label``."""
    return Metric(name, "gauge", help, _samples(value, label))


def _esc_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render_metrics(metrics: Iterable[Metric]) -> str:
    """The Prometheus text exposition format (0.0.4) of ``metrics``."""
    out = []
    for m in metrics:
        out.append(f"# HELP {m.name} {m.help.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
        out.append(f"# TYPE {m.name} {m.type}")
        for labels, value in m.samples:
            lab = ",".join(f'{k}="{_esc_label(str(v))}"' for k, v in labels)
            out.append(f"{m.name}{{{lab}}} {_num(value)}" if lab else f"{m.name} {_num(value)}")
    return "\n".join(out) + "\n"


# -- collectors ---------------------------------------------------------------------------------

class ChannelTotals:
    """Monotonic sums of channel counters (by default cells_in, cells_out, bytes_in,
    bytes_out) over channels that come and go."""

    def __init__(self, attrs: tuple[str, ...] = ("cells_in", "cells_out", "bytes_in", "bytes_out")) -> None:
        self.attrs = attrs
        self._last: dict[int, tuple[int, ...]] = {}
        self.retired = [0] * len(attrs)

    def _values(self, chan) -> tuple[int, ...]:
        return tuple(getattr(chan, a, 0) for a in self.attrs)

    def retire(self, chan) -> None:
        """``chan`` closed: count its final values (exact) and forget it."""
        self._last.pop(chan.id, None)
        for i, v in enumerate(self._values(chan)):
            self.retired[i] += v

    def update(self, channels: Iterable) -> tuple[int, int, int, int]:
        live = {c.id: self._values(c) for c in channels}
        for cid in set(self._last) - set(live):  # gone without retire(): last values seen
            for i, v in enumerate(self._last.pop(cid)):
                self.retired[i] += v
        self._last.update(live)
        return tuple(self.retired[i] + sum(v[i] for v in live.values())  # type: ignore[return-value]
                     for i in range(len(self.attrs)))


def padding_metric(received: int, sent: int) -> Metric:
    """Channel padding (padding-spec §2): PADDING cells on OR connections."""
    return counter("onionp2p_padding_cells_total", "Link PADDING cells received and sent on OR connections "
                   "(channel padding).", {"received": received, "sent": sent}, "direction")


def _common(cells_bytes: tuple[int, int, int, int], channels: list, role: str, extra_info: Labels) -> list[Metric]:
    cin, cout, bin_, bout = cells_bytes
    queues = [c.queued_cells() for c in channels]
    return [
        gauge("onionp2p_info", "Constant 1; labels say what this process is.",
              {(("role", role), ("version", __version__), *extra_info): 1}),
        counter("onionp2p_cells_total", "Cells read (in) and written (out) on OR connections.",
                {"in": cin, "out": cout}, "direction"),
        counter("onionp2p_bytes_total", "Bytes read and written on OR connections (TLS payload).",
                {"read": bin_, "written": bout}, "direction"),
        gauge("onionp2p_channels", "Open OR connections (channels).", len(channels)),
        gauge("onionp2p_queued_cells", "Cells waiting in the channels' per-circuit queues.", sum(queues)),
        gauge("onionp2p_max_channel_queued_cells", "Queued cells of the fullest channel.", max(queues, default=0)),
    ]


def congestion_metrics(layers: Iterable) -> list[Metric]:
    """Congestion control of the given circuit layers (the client's exit hops, a relay's
    exit edges): how many run Vegas or fixed windows, and over the Vegas ones the window
    (cells) and smoothed RTT (seconds), mean and extremes."""
    layers = list(layers)
    vegas = [layer.cc for layer in layers if layer.cc is not None]
    rtts = [v.rtt_ewma / 1e6 for v in vegas if v.rtt_ewma]
    cwnds = [v.cwnd for v in vegas]
    return [
        gauge("onionp2p_circuit_congestion_control", "Circuits by flow control: vegas (proposal 324) or fixed.",
              {"vegas": len(vegas), "fixed": len(layers) - len(vegas)}, "alg"),
        gauge("onionp2p_congestion_window_cells", "Congestion windows of the Vegas circuits (cells).",
              {"mean": sum(cwnds) / len(cwnds) if cwnds else 0, "max": max(cwnds, default=0)}, "stat"),
        gauge("onionp2p_circuit_rtt_seconds", "Smoothed round-trip times of the Vegas circuits.",
              {"mean": sum(rtts) / len(rtts) if rtts else 0, "min": min(rtts, default=0)}, "stat"),
    ]


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _process_start() -> float:
    """Unix time this process started (from /proc when there is one, else module import)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22: starttime
        boot = _boot_time()
        if boot is not None:
            return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORTED


_IMPORTED = time.time()
_PROCESS_START = _process_start()


def process_metrics() -> list[Metric]:
    """The standard ``process_*`` families (as Prometheus client libraries export them)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = [counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                   usage.ru_utime + usage.ru_stime),
           gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                 _PROCESS_START)]
    try:
        with open("/proc/self/statm") as f:
            pages = f.read().split()
        out.append(gauge("process_resident_memory_bytes", "Resident memory size in bytes.",
                         int(pages[1]) * os.sysconf("SC_PAGE_SIZE")))
        out.append(gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                         int(pages[0]) * os.sysconf("SC_PAGE_SIZE")))
    except (OSError, ValueError, IndexError):
        pass
    try:
        out.append(gauge("process_open_fds", "Number of open file descriptors.", len(os.listdir("/proc/self/fd"))))
    except OSError:
        pass
    out.append(gauge("process_max_fds", "Maximum number of open file descriptors.",
                     resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    return out


_HS_COUNTERS = (
    ("est_intro", "onionp2p_relay_est_intro_total", "ESTABLISH_INTRO at this introduction point."),
    ("intro1", "onionp2p_relay_intro1_total", "INTRODUCE1 at this introduction point."),
    ("est_rend", "onionp2p_relay_est_rend_total", "ESTABLISH_RENDEZVOUS at this rendezvous point."),
    ("rend1", "onionp2p_relay_rend1_total", "RENDEZVOUS1 at this rendezvous point."),
)


def _hs_relay_metrics(r) -> list[Metric]:
    """Onion-service roles of a relay (tor's tor_relay_est_intro_total ... counters): the
    introduction and rendezvous points (``relay.hs``) and the HSDir (``relay.hsdir``)."""
    out: list[Metric] = []
    hs = getattr(r, "hs", None)
    if hs is not None:
        for key, name, help_ in _HS_COUNTERS:
            out.append(counter(name, help_, dict(hs.counts[key]) or {"success": 0}, "action"))
        out.append(gauge("onionp2p_relay_hs_circuits", "Onion-service circuits here, by role.",
                         {"intro": len(hs.intro), "rend_waiting": len(hs.rend)}, "role"))
    hsdir = getattr(r, "hsdir", None)
    if hsdir is not None:
        out += [
            counter("onionp2p_relay_hsdir_total", "HSDir descriptor requests and cache events, by action.",
                    dict(hsdir.counts) or {"store": 0}, "action"),
            gauge("onionp2p_relay_hsdir_descriptors", "v3 onion-service descriptors stored.",
                  len(hsdir.entries)),
            gauge("onionp2p_relay_hsdir_bytes", "Bytes of v3 onion-service descriptors stored.", hsdir.bytes),
        ]
    return out


class RelayCollector:
    """Metrics of a :class:`~onionp2p.relay.relay.Relay` (``relay.channels``, ``relay.circuits``,
    ``relay.stats`` and, when present, ``relay.destroy_reasons`` {reason name: count})."""

    def __init__(self, relay):
        self.relay = relay
        self.totals = ChannelTotals()

    def __call__(self) -> list[Metric]:
        r = self.relay
        stats = dict(r.stats)
        channels = list(r.channels)
        if all(k in stats for k in _CLOSED_KEYS):
            live = [sum(getattr(c, a) for c in channels) for a in ("cells_in", "cells_out", "bytes_in", "bytes_out")]
            cb = tuple(stats[k] + v for k, v in zip(_CLOSED_KEYS, live))
        else:
            cb = self.totals.update(channels)
        circuits = list(r.circuits)
        states = Counter("extending" if c.core.extending else "open" for c in circuits)
        reasons = dict(getattr(r, "destroy_reasons", None) or {})
        unknown = stats.get("destroyed", 0) - sum(reasons.values())
        if unknown > 0:
            reasons["unknown"] = unknown
        fp = getattr(getattr(r, "keys", None), "fingerprint", "") or ""
        metrics = _common(cb, channels, "relay", (("nickname", r.nickname), ("fingerprint", fp)))
        metrics.append(padding_metric(
            stats.get("closed_padding_in", 0) + sum(getattr(c, "padding_in", 0) for c in channels),
            stats.get("closed_padding_out", 0) + sum(getattr(c, "padding_out", 0) for c in channels)))
        metrics += [
            gauge("onionp2p_circuits", "Circuits through this relay by state.",
                  {"open": states["open"], "extending": states["extending"]}, "state"),
            gauge("onionp2p_streams", "Exit streams open at this relay.", sum(len(c.streams) for c in circuits)),
            *congestion_metrics(c.core.layer for c in circuits if c.core.streams or c.core.layer.cc is not None),
            counter("onionp2p_create_handshakes_total", "CREATE2 (ntor) handshakes answered: ok or failed.",
                    {"ok": stats.get("create_ok", 0), "failed": stats.get("create_failed", 0)}, "result"),
            counter("onionp2p_circuits_closed_total", "Circuits torn down, by DESTROY reason.",
                    reasons or {"unknown": 0}, "reason"),
            counter("onionp2p_read_throttled_total", "Times reading paused for BandwidthRate.",
                    stats.get("throttled", 0)),
        ]
        boot = getattr(r, "bootstrap_progress", None)
        if boot is not None:  # a Relay (test doubles may have neither)
            metrics += [
                gauge("onionp2p_bootstrap_progress", "Bootstrap progress in percent.", boot.status[0]),
                gauge("onionp2p_orport_reachable", "1 once the self-test found the published ORPort reachable.",
                      int(bool(getattr(r, "orport_reachable", False)))),
            ]
        metrics += _hs_relay_metrics(r)
        other = {k: v for k, v in stats.items() if k not in _KNOWN_STATS and isinstance(v, (int, float))}
        if other:
            metrics.append(counter("onionp2p_relay_events_total", "Other relay statistics (relay.stats).",
                                   other, "event"))
        return metrics + process_metrics()


class AuthorityCollector:
    """Metrics of a :class:`~onionp2p.dir.authority.Authority` (descriptors, reachability, the
    published consensus) and, when it runs one, of its relay (as :class:`RelayCollector`)."""

    def __init__(self, authority, relay=None):
        self.authority = authority
        self.relay = RelayCollector(relay) if relay is not None else None

    def __call__(self) -> list[Metric]:
        a = self.authority
        labels: Labels = (("role", "authority"), ("version", __version__), ("nickname", a.nickname))
        if self.relay is not None:
            fp = self.relay.relay.keys.fingerprint
            base = [m for m in self.relay() if m.name != "onionp2p_info"]
            labels += (("fingerprint", fp),)
        else:
            base = process_metrics()
        cur = a.current
        routers = cur.routers if cur is not None else ()
        flags = Counter(f for r in routers for f in r.flags)
        metrics = [
            gauge("onionp2p_info", "Constant 1; labels say what this process is.", {labels: 1}),
            gauge("onionp2p_authority_descriptors", "Relay descriptors this authority holds.", len(a.descriptors)),
            gauge("onionp2p_authority_reachable_relays", "Relays whose ORPort answered the last reachability test.",
                  sum(1 for r in a.reach.values() if r.ok)),
            gauge("onionp2p_consensus_relays", "Relays in the published consensus (0: none yet).", len(routers)),
            gauge("onionp2p_consensus_relays_by_flag", "Relays in the published consensus with each flag.",
                  {f: flags[f] for f in sorted(flags)} or {"Running": 0}, "flag"),
            gauge("onionp2p_consensus_signatures", "Authority signatures on the published consensus.",
                  len(cur.signatures) if cur is not None else 0),
            gauge("onionp2p_consensus_valid_after_seconds", "valid-after of the published consensus (unix time).",
                  cur.valid_after if cur is not None else 0),
            gauge("onionp2p_consensus_valid_until_seconds", "valid-until of the published consensus (unix time).",
                  cur.valid_until if cur is not None else 0),
        ]
        return metrics + base


class ClientCollector:
    """Metrics of a :class:`~onionp2p.client.node.ClientNode` (``node.client.circuits``,
    ``node.client.channels``, ``node.streams``, ``node.socks.stats``). Listens to the
    client's circuit and channel events from construction on; :meth:`close` stops that."""

    def __init__(self, node):
        self.node = node
        self.totals = ChannelTotals()
        self.padding = ChannelTotals(("padding_in", "padding_out"))
        self.builds: Counter[str] = Counter(ok=0, failed=0)
        self.closed: Counter[str] = Counter()
        self.retired_data = [0, 0]  # DATA bytes (sent, received) of circuits that are gone
        node.client.events.add(self._on_circuit)
        node.client.channel_events.add(self._on_channel)

    def close(self) -> None:
        try:
            self.node.client.events.remove(self._on_circuit)
        except ValueError:
            pass
        self.node.client.channel_events.remove(self._on_channel)

    def _on_circuit(self, ev) -> None:
        if ev.kind == "built":
            self.builds["ok"] += 1
        elif ev.kind in ("failed", "closed"):
            if ev.kind == "failed":
                self.builds["failed"] += 1
            self.closed[ev.reason or "NONE"] += 1
            self.retired_data[0] += ev.bytes_sent
            self.retired_data[1] += ev.bytes_received

    def _on_channel(self, kind: str, chan) -> None:
        if kind == "closed":
            self.totals.retire(chan)
            self.padding.retire(chan)

    def __call__(self) -> list[Metric]:
        node = self.node
        client = node.client
        channels = [c for c in client.channels.values() if not c.closed]
        cin, cout, _, _ = self.totals.update(channels)
        read, written = client.traffic()
        circuits = list(client.circuits.values())
        states = Counter(c.state for c in circuits)
        streams = Counter(s.status for s in node.streams.values())
        progress = node.bootstrap[0] if getattr(node, "bootstrap", None) else 0
        metrics = _common((cin, cout, read, written), channels, "client", ())
        metrics.append(padding_metric(*self.padding.update(channels)))
        metrics += [
            gauge("onionp2p_circuits", "Origin circuits by state (launched = being built).",
                  {"launched": states["launched"], "built": states["built"]}, "state"),
            gauge("onionp2p_streams", "Application streams by control-spec status.",
                  {k: streams[k] for k in sorted({"SUCCEEDED", *streams})}, "state"),
            counter("onionp2p_circuit_builds_total", "Circuit builds finished: ok (built) or failed.",
                    dict(self.builds), "result"),
            counter("onionp2p_circuits_closed_total", "Circuits closed or failed, by reason.",
                    dict(self.closed) or {"NONE": 0}, "reason"),
            counter("onionp2p_circuit_data_bytes_total", "Stream payload bytes (RELAY_DATA) on circuits.",
                    {"sent": self.retired_data[0] + sum(c.bytes_sent for c in circuits),
                     "received": self.retired_data[1] + sum(c.bytes_received for c in circuits)}, "direction"),
            gauge("onionp2p_bootstrap_progress", "Bootstrap progress in percent.", progress),
            *congestion_metrics(c.core.layers[-1] for c in circuits if c.state == "built" and c.core.layers),
        ]
        socks = getattr(getattr(node, "socks", None), "stats", None)
        if socks is not None:
            metrics += _socks_metrics(socks)
        hs = getattr(getattr(node, "hs", None), "stats", None)
        if hs is not None:
            metrics += _hs_client_metrics(hs)
        if hasattr(node, "onion_service_counts"):
            metrics += _onion_service_metrics(len(node.onion_services), node.onion_service_counts())
        return metrics + process_metrics()


#: the onion-service outcomes always exported (others appear once counted)
_HS_TABLES = {
    "introductions": ("onionp2p_hs_service_introductions_total",
                      "INTRODUCE2 cells at hosted onion services, by outcome (accepted or why dropped).",
                      ("accepted", "replay", "malformed", "bad_mac", "rate_limited")),
    "rendezvous": ("onionp2p_hs_service_rendezvous_total",
                   "Rendezvous circuits of hosted onion services: joined (success) or failed.",
                   ("success", "failed")),
    "streams": ("onionp2p_hs_service_streams_total",
                "Streams to hosted onion services: accepted (target connected) or refused.",
                ("accepted", "refused")),
    "uploads": ("onionp2p_hs_service_descriptor_uploads_total",
                "Descriptor uploads to HSDirs by hosted onion services.", ("success", "failed")),
}


def _onion_service_metrics(hosted: int, counts: Mapping[tuple[str, str], int]) -> list[Metric]:
    out = [gauge("onionp2p_hs_services", "Onion services hosted by this node.", hosted)]
    for table, (name, help_, always) in _HS_TABLES.items():
        values = {k: 0 for k in always}
        values.update({outcome: n for (t, outcome), n in counts.items() if t == table})
        out.append(counter(name, help_, dict(sorted(values.items())), "result"))
    return out


def _hs_client_metrics(stats: Mapping[str, Mapping[str, int]]) -> list[Metric]:
    """The onion-service client's counts (``OnionServiceClient.stats``)."""
    return [
        counter("onionp2p_hs_client_requests_total", "Streams to onion services: ok, or the failure kind "
                "(desc_not_found, missing_client_auth ...: tor's extended SOCKS errors).",
                {"ok": 0, **stats["requests"]}, "result"),
        counter("onionp2p_hs_client_descriptors_total", "Onion-service descriptors used, from the cache or "
                "fetched from an HSDir.", {"cache": 0, "fetched": 0, **stats["descriptors"]}, "source"),
        counter("onionp2p_hs_client_introductions_total", "INTRODUCE1 attempts by result (acked or not).",
                {"ok": 0, "failed": 0, **stats["introductions"]}, "result"),
        counter("onionp2p_hs_client_rendezvous_total", "Rendezvous by result (RENDEZVOUS2 received or not).",
                {"ok": 0, "failed": 0, **stats["rendezvous"]}, "result"),
        counter("onionp2p_hs_client_rendezvous_reused_total", "Streams on an open rendezvous circuit.",
                stats["reused"]["ok"]),
    ]


def _stat(stats, name: str) -> int | None:
    value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _socks_metrics(stats) -> list[Metric]:
    """SOCKS front-end statistics (a dict or an object with counter attributes); only the
    counters the front end keeps are exported."""
    out = []
    if (n := _stat(stats, "connections")) is not None:
        out.append(counter("onionp2p_socks_connections_total", "SOCKS connections accepted.", n))
    if (n := _stat(stats, "active")) is not None:
        out.append(gauge("onionp2p_socks_connections_open", "SOCKS connections open now.", n))
    results = {label: _stat(stats, name) for label, name in (
        ("ok", "streams_ok"), ("failed", "streams_failed"), ("rejected", "rejected"),
        ("handshake_failed", "handshake_failed"))}
    if any(v is not None for v in results.values()):
        out.append(counter("onionp2p_socks_requests_total", "SOCKS CONNECT requests and handshakes by outcome.",
                           {k: v for k, v in results.items() if v is not None}, "result"))
    resolves = {label: _stat(stats, name) for label, name in (("ok", "resolves_ok"), ("failed", "resolves_failed"))}
    if any(v is not None for v in resolves.values()):
        out.append(counter("onionp2p_socks_resolves_total", "SOCKS RESOLVE requests by outcome.",
                           {k: v for k, v in resolves.items() if v is not None}, "result"))
    octets = {label: _stat(stats, name) for label, name in (("up", "bytes_up"), ("down", "bytes_down"))}
    if any(v is not None for v in octets.values()):
        out.append(counter("onionp2p_socks_bytes_total", "Application bytes through SOCKS (up = to the network).",
                           {k: v for k, v in octets.items() if v is not None}, "direction"))
    return out


# -- the server -----------------------------------------------------------------------------------

class MetricsServer:
    """``GET /metrics`` on ``host:port`` answering ``render_metrics(collect())``."""

    def __init__(self, collect: Callable[[], Iterable[Metric]], host: str = "127.0.0.1", port: int = 0, *,
                 allow_remote: bool = False, max_connections: int = 16, timeout: float = 5.0):
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback and not allow_remote:
            raise ConfigError(f"metrics port on {host}: only loopback addresses unless allow_remote")
        self.collect = collect
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.timeout = timeout
        self.scrapes = 0
        self._active = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=_MAX_HEAD)
        except OSError as exc:
            raise ListenError.from_os_error("metrics port", self.host, self.port, exc) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics port listening", metrics_port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            if self._active > self.max_connections:
                await self._reply(writer, 503, "Service Unavailable", b"too many connections\n")
                return
            try:
                async with asyncio.timeout(self.timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await self._reply(writer, 431, "Request Header Fields Too Large", b"")
                return
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                await self._reply(writer, 400, "Bad Request", b"bad request\n")
                return
            method, target = parts[0], parts[1].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                await self._reply(writer, 405, "Method Not Allowed", b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
                return
            if target not in (b"/metrics", b"/"):
                await self._reply(writer, 404, "Not Found", b"try /metrics\n")
                return
            try:
                body = render_metrics(self.collect()).encode()
            except Exception as exc:  # a collector bug must not kill the endpoint
                log.warning("metrics collection failed", error=repr(exc))
                await self._reply(writer, 500, "Internal Server Error", b"collection failed\n")
                return
            self.scrapes += 1
            await self._reply(writer, 200, "OK", body, head_only=method == b"HEAD", ctype=CONTENT_TYPE)
        finally:
            self._active -= 1
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, reason: str, body: bytes, *,
                     head_only: bool = False, ctype: str = "text/plain; charset=utf-8", extra: bytes = b"") -> None:
        head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n").encode() + extra + b"\r\n"
        try:
            writer.write(head if head_only else head + body)
            await writer.drain()
        except ConnectionError:
            pass
