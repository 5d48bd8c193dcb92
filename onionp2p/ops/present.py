"""Pure presentation of a :class:`~onionp2p.ops.controlclient.NetworkView`, shared by
``onionp2p circuits`` (:mod:`onionp2p.ops.circuits`) and ``onionp2p top``
(:mod:`onionp2p.ops.top`): one row per circuit, byte and age formats. Stream targets and
onion-service circuits' addresses (REND_QUERY) show as ``[scrubbed]`` unless asked for."""

from __future__ import annotations

from onionp2p.ops.controlclient import NetworkView, hop_role

__all__ = ["SCRUBBED", "format_age", "format_bytes", "format_cc", "circuit_rows", "stream_dict"]

SCRUBBED = "[scrubbed]"


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def circuit_rows(view: NetworkView, now: float, *, show_targets: bool = False) -> list[dict]:
    """One JSON-ready dict per circuit (by id), streams nested; see :func:`view_json`."""
    rows = []
    for c in sorted(view.circuits.values(), key=lambda c: c.id):
        path = []
        for i, hop in enumerate(c.path):
            router = view.router(hop)
            path.append({"nickname": hop.nickname or (router.nickname if router else None),
                         "fingerprint": hop.fingerprint or (router.fingerprint if router else None),
                         "role": hop_role(c, i),
                         "handshake": c.hop_handshakes[i] if i < len(c.hop_handshakes) else None,
                         "relay_crypto": c.hop_relay_crypto[i] if i < len(c.hop_relay_crypto) else None})
        rows.append({
            "id": c.id, "state": c.status, "purpose": c.purpose, "build_flags": list(c.build_flags),
            "hs_state": c.hs_state,  # the onion address is as private as a stream's target
            "rend_query": c.rend_query if show_targets or c.rend_query is None else SCRUBBED,
            "path": path, "age_seconds": None if c.age(now) is None else round(c.age(now), 3),  # type: ignore[arg-type]
            "bytes_sent": c.bytes_written, "bytes_received": c.bytes_read,
            "congestion_control": c.congestion_control,
            "cc": None if c.cwnd is None else {"slow_start": c.slow_start, "cwnd": c.cwnd, "rtt_ms": c.rtt_ms,
                                               "min_rtt_ms": c.min_rtt_ms},
            "streams": [stream_dict(s, show_targets) for s in view.streams_of(c.id)],
        })
    return rows


def format_cc(row: dict) -> str:
    """``vegas 466c 12ms`` (window in cells, smoothed RTT), ``fixed``, or ``-``."""
    cc = row.get("congestion_control")
    if cc is None:
        return "-"
    state = row.get("cc")
    if cc != "vegas" or not state:
        return cc
    rtt = state.get("rtt_ms")
    return f"vegas {state['cwnd']}c" + (f" {rtt}ms" if rtt else "") + (" ss" if state.get("slow_start") else "")


def stream_dict(s, show_targets: bool) -> dict:
    return {"id": s.id, "state": s.status, "circuit": s.circ_id, "purpose": s.purpose,
            "target": s.target if show_targets else SCRUBBED}
