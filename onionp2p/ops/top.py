"""``onionp2p top``: a live terminal dashboard of a node, read from its control port.

Theory of operation
-------------------
:class:`TopApp` is a textual application. On mount it starts one worker that connects
with :func:`~onionp2p.ops.controlclient.open_view` (authenticating like ``onionp2p circuits``),
subscribes to CIRC, STREAM, ORCONN, BW, CIRC_BW, NOTICE/WARN/ERR and STATUS_* events,
loads a snapshot, and then applies every event to its
:class:`~onionp2p.ops.controlclient.NetworkView`. Log and status events are appended to the log
pane as they arrive; everything else only marks the view dirty, and a 0.25 s timer
redraws the tables when it is (so an event storm costs one redraw per tick, not one per
event). A 1 s timer redraws anyway, for the circuit ages.

Panes: bandwidth (sparklines of the last 60 one-second BW samples, read and written,
with the current rates and totals), circuits (id, state, path with the exit marked, age,
bytes when the node reports them, streams), relays in use (with address and consensus
flags from ``ns/all`` and the roles they play), streams (targets ``[scrubbed]`` unless
``--show-targets``, toggled with ``t``) and the log tail. Keys: ``q`` quits, ``t``
toggles targets, ``n`` sends SIGNAL NEWNYM (new circuits for new streams).

A connection that cannot be opened ends the app with return code 2 and the reason; a
connection lost later is shown in the status line (the last state stays on screen).

Relays have no control port yet, so ``top`` shows client nodes (``onionp2p client`` /
``testnet``); any tor-compatible control port works, tor's own included.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, RichLog, Sparkline, Static

from onionp2p.errors import OnionError
from onionp2p.ops.controlclient import (
    WATCH_EVENTS,
    ControlClient,
    ControlTarget,
    Event,
    NetworkView,
    open_view,
)
from onionp2p.ops.present import SCRUBBED, circuit_rows, format_age, format_bytes, format_cc

__all__ = ["TopApp", "run_top"]

_COMMON_FLAGS = frozenset({"Running", "Valid", "V2Dir"})  # on (nearly) every relay: not shown
_LOG_STYLE = {"ERR": "bold red", "WARN": "yellow", "NOTICE": "default", "INFO": "dim", "DEBUG": "dim"}


class TopApp(App):
    """The dashboard. ``view`` is the live model; ``status`` the connection state text."""

    TITLE = "onionp2p top"
    CSS = """
    #bw { height: 5; border: round $primary; padding: 0 1; }
    #bw-label { height: 1; }
    Sparkline { height: 1; }
    #middle { height: 1fr; }
    #circuits { width: 3fr; height: 100%; border: round $primary; }
    #relays { width: 2fr; height: 100%; border: round $primary; }
    #streams { height: 8; border: round $primary; }
    #log { height: 9; border: round $primary; }
    #status { height: 1; background: $boost; }
    """
    BINDINGS = [("q", "quit", "Quit"), ("t", "toggle_targets", "Show/hide targets"),
                ("n", "newnym", "New identity")]

    def __init__(self, target: ControlTarget, *, show_targets: bool = False):
        super().__init__()
        self.target = target
        self.show_targets = show_targets
        self.view = NetworkView()
        self.client: ControlClient | None = None
        self.status = "connecting"
        self._dirty = True
        self.log_lines = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="bw"):
            yield Static("bandwidth", id="bw-label")
            yield Sparkline([], id="bw-read")
            yield Sparkline([], id="bw-written")
        with Horizontal(id="middle"):
            yield DataTable(id="circuits", zebra_stripes=True, cursor_type="row")
            yield DataTable(id="relays", zebra_stripes=True, cursor_type="row")
        yield DataTable(id="streams", zebra_stripes=True, cursor_type="row")
        yield RichLog(id="log", max_lines=500, wrap=True)
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#circuits", DataTable).add_columns("ID", "State", "Path", "Age", "Sent", "Recv", "CC",
                                                                   "Streams")
        self.query_one("#relays", DataTable).add_columns("Relay", "Roles", "Circuits", "Flags", "Fingerprint",
                                                         "Address")
        self.query_one("#streams", DataTable).add_columns("ID", "State", "Circuit", "Target", "Purpose")
        for pane, title in (("#bw", "bandwidth"), ("#circuits", "circuits"), ("#relays", "relays in use"),
                            ("#streams", "streams"), ("#log", "log")):
            self.query_one(pane).border_title = title
        self.set_interval(0.25, self._tick)
        self.set_interval(1.0, self._mark_dirty)
        self._set_status(f"connecting to {self.target.host}:{self.target.port}")
        self.run_worker(self._follow(), exclusive=True, exit_on_error=False)

    # -- the connection -------------------------------------------------------------------------

    async def _follow(self) -> None:
        try:
            self.client, self.view, since = await open_view(
                self.target, events=WATCH_EVENTS + ("STATUS_SERVER", "DEBUG", "INFO"))
        except OnionError as exc:
            self.exit(return_code=2, message=f"onionp2p top: error: {exc}")
            return
        self.sub_title = f"{self.target.host}:{self.target.port} — {self.view.version}"
        self._set_status(f"connected to {self.target.host}:{self.target.port}")
        self._redraw()
        try:
            async for ev in self.client.events(since=since):
                if self.view.apply(ev):
                    self._dirty = True
                    self._log_event(ev)
            self._set_status("disconnected: the control connection closed")
        except OnionError as exc:
            self._set_status(f"disconnected: {exc}")
        finally:
            await self.client.close()

    async def on_unmount(self) -> None:
        if self.client is not None:
            await self.client.close()

    def _log_event(self, ev: Event) -> None:
        if ev.type in _LOG_STYLE or ev.type.startswith("STATUS_"):
            line = self.view.log[-1]
            stamp = time.strftime("%H:%M:%S", time.localtime(line.time))
            self.query_one("#log", RichLog).write(
                Text(f"{stamp} [{line.severity}] {line.message}", style=_LOG_STYLE.get(line.severity, "default")))
            self.log_lines += 1

    def _set_status(self, text: str) -> None:
        self.status = text
        self.query_one("#status", Static).update(Text(" " + text + "   (q quit, t targets, n new identity)"))

    # -- drawing -----------------------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _tick(self) -> None:
        if self._dirty:
            self._redraw()

    def _redraw(self) -> None:
        self._dirty = False
        view, now = self.view, time.time()
        samples = list(view.bandwidth)[-60:]
        last = samples[-1] if samples else (0, 0)
        self.query_one("#bw-label", Static).update(Text.assemble(
            ("↓ read ", "green"), f"{format_bytes(last[0])}/s (total {format_bytes(view.traffic_read)})   ",
            ("↑ written ", "cyan"), f"{format_bytes(last[1])}/s (total {format_bytes(view.traffic_written)})"))
        self.query_one("#bw-read", Sparkline).data = [float(r) for r, _ in samples] or [0.0]
        self.query_one("#bw-written", Sparkline).data = [float(w) for _, w in samples] or [0.0]

        circuits = self.query_one("#circuits", DataTable)
        circuits.clear()
        for row in circuit_rows(view, now, show_targets=self.show_targets):
            path = " → ".join((h["nickname"] or "?") + (" [exit]" if h["role"] == "exit" else "")
                              for h in row["path"]) or "-"
            circuits.add_row(str(row["id"]), Text(row["state"]), Text(path), format_age(row["age_seconds"]),
                             format_bytes(row["bytes_sent"]), format_bytes(row["bytes_received"]),
                             format_cc(row), str(len(row["streams"])), key=str(row["id"]))
        relays = self.query_one("#relays", DataTable)
        relays.clear()
        for hop, router, roles, circs in view.relays_in_use():
            relays.add_row(Text(hop.nickname or "?"), ",".join(roles), ",".join(map(str, circs)),
                           " ".join(sorted(router.flags - _COMMON_FLAGS)) if router else "-", hop.short or "-",
                           f"{router.address}:{router.or_port}" if router else "-")
        streams = self.query_one("#streams", DataTable)
        streams.clear()
        for s in sorted(view.streams.values(), key=lambda s: s.id):
            # Text, not str: DataTable would read "[scrubbed]" or a hostile target as markup
            streams.add_row(str(s.id), Text(s.status), str(s.circ_id),
                            Text(s.target if self.show_targets else SCRUBBED), Text(s.purpose or "-"),
                            key=str(s.id))

    # -- actions -----------------------------------------------------------------------------------

    def action_toggle_targets(self) -> None:
        self.show_targets = not self.show_targets
        self._redraw()

    async def action_newnym(self) -> None:
        if self.client is None:
            return
        try:
            await self.client.request("SIGNAL NEWNYM")
            self.notify("NEWNYM sent: new streams get new circuits")
        except OnionError as exc:
            self.notify(f"NEWNYM failed: {exc}", severity="error")


def run_top(target: ControlTarget, *, show_targets: bool = False) -> int:
    """Run the dashboard in this terminal until ``q``; returns the exit code."""
    app = TopApp(target, show_targets=show_targets)
    app.run()
    return app.return_code or 0
