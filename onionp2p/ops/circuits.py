"""Operator tools that read a node's control port: ``onionp2p circuits``, ``onionp2p top``
and the circuit graph.

Theory of operation
-------------------
Every tool connects with :class:`~onionp2p.ops.controlclient.ControlClient` (cookie, SAFECOOKIE or
password authentication; see :mod:`onionp2p.ops.controlclient`) and works on a
:class:`~onionp2p.ops.controlclient.NetworkView`. This module holds

* **pure presentation** of a view: :func:`circuit_rows` (one dict per circuit: path with
  nicknames, short fingerprints and roles, age, byte counts, streams), :func:`view_json`
  (the ``--json`` document), :func:`circuits_table` (a rich table), :func:`graph_dot`
  (Graphviz source) and :func:`draw_matplotlib`;
* the **commands**: :func:`run_circuits` prints once, or with ``watch`` keeps a rich
  ``Live`` display (or, with ``--json``, one JSON line per change) current from events
  until stopped; ``--graph FILE`` draws the relays of the consensus and the circuits
  with :func:`render_graph` (Graphviz ``dot`` when installed, else matplotlib);
  ``onionp2p top`` starts the textual app of :mod:`onionp2p.ops.top`.

Stream targets are private: they show as ``[scrubbed]`` unless ``--show-targets`` is
given, in the table, the JSON and the TUI alike (the control port itself always sends
them, as tor's does). Optional dependencies (rich, textual, matplotlib) are imported
only by the commands that need them; a missing one is a :class:`MissingDependencyError`
naming the package to install. :func:`add_tool_parsers` registers the subcommands on
``onionp2p``'s argument parser. The presentation shared with ``top`` (rows, byte and age
formats) is in :mod:`onionp2p.ops.present`.
"""

from __future__ import annotations

import argparse
import asyncio
import colorsys
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from onionp2p.errors import OnionError
from onionp2p.ops.controlclient import (
    DEFAULT_CONTROL_PORT,
    ControlTarget,
    InspectError,
    NetworkView,
    hop_role,
    open_view,
    parse_address,
)
from onionp2p.ops.present import circuit_rows, format_age, format_bytes, format_cc, stream_dict

__all__ = [
    "MissingDependencyError",
    "require",
    "add_control_arguments",
    "target_from_args",
    "view_json",
    "circuits_table",
    "graph_dot",
    "draw_matplotlib",
    "render_graph",
    "run_circuits",
    "add_tool_parsers",
]

_GRAPH_FORMATS = ("png", "svg", "pdf")


class MissingDependencyError(OnionError):
    """An optional package this command needs is not installed."""


def require(module: str, package: str, purpose: str):
    """Import ``module`` or raise MissingDependencyError telling what to pip install: the
    ``[tools]`` extra, which holds every optional package of the operator tools."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{purpose} needs the Python package {package!r}: "
                                     f"pip install 'onionp2p[tools]' (or pip install {package})") from None


# -- arguments ---------------------------------------------------------------------------------

#: the file a node writes with its control port (tor's ControlPortWriteToFile format)
PORT_FILE = "control_port"
#: where ``onionp2p client`` keeps its data when no data_dir is configured
DEFAULT_DATA_DIR = "onionp2p-client"


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    """--control-port / --control / --data-dir, --cookie / --password."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--control-port", type=int, metavar="N", help="control port on 127.0.0.1")
    where.add_argument("--control", metavar="HOST:PORT", help="control port address")
    where.add_argument("--data-dir", metavar="DIR",
                       help=f"the node's data directory (or a testnet's): its {PORT_FILE} file names the "
                            f"control port, its control_auth_cookie authenticates. Without any of these: "
                            f"./{DEFAULT_DATA_DIR} if a node runs from there, "
                            f"else port {DEFAULT_CONTROL_PORT}")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--cookie", metavar="FILE",
                      help="control_auth_cookie file (default: the one the node names in PROTOCOLINFO)")
    auth.add_argument("--password", metavar="P",
                      help="control password (also $ONIONP2P_CONTROL_PASSWORD, which ps cannot see)")


def read_port_file(path: Path) -> tuple[str, int]:
    """(host, port) from a ``PORT=HOST:N`` file (tor's ControlPortWriteToFile)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise InspectError(f"cannot read {path}: {exc.strerror or exc}") from None
    for line in text.splitlines():
        if line.startswith("PORT="):
            return parse_address(line[5:].strip())
    raise InspectError(f"{path} names no control port (expected a line PORT=HOST:N)")


def node_data_dir(text: str | None) -> Path | None:
    """The data directory to read the control port from: ``--data-dir`` (a node's, or a
    testnet's whose client is in ``client/``), else ``./onionp2p-client`` when a node there
    wrote its port file; None: fall back to the default port."""
    if text is None:
        found = Path(DEFAULT_DATA_DIR)
        return found if (found / PORT_FILE).is_file() else None
    d = Path(text).expanduser()
    if not (d / PORT_FILE).is_file() and (d / "client" / PORT_FILE).is_file():
        d = d / "client"  # `onionp2p testnet --data-dir DIR`
    if not (d / PORT_FILE).is_file():
        raise InspectError(f"no {PORT_FILE} file in {d}: is a node running with this data directory "
                           f"and a control port?")
    return d


def target_from_args(args: argparse.Namespace) -> ControlTarget:
    """Where to connect: --control, --control-port, the data directory's port file (and
    cookie), else 127.0.0.1:9151."""
    cookie = args.cookie
    if getattr(args, "control", None):
        host, port = parse_address(args.control)
    elif args.control_port:
        host, port = "127.0.0.1", args.control_port
    elif (d := node_data_dir(getattr(args, "data_dir", None))) is not None:
        host, port = read_port_file(d / PORT_FILE)
        if cookie is None and args.password is None and (d / "control_auth_cookie").is_file():
            cookie = str(d / "control_auth_cookie")
    else:
        host, port = "127.0.0.1", DEFAULT_CONTROL_PORT
    password = args.password if args.password is not None else os.environ.get("ONIONP2P_CONTROL_PASSWORD")
    return ControlTarget(host, port, cookie_path=cookie, password=password)


# -- pure presentation -------------------------------------------------------------------------

def view_json(view: NetworkView, now: float, *, show_targets: bool = False) -> dict:
    """The ``--json`` document: circuits (with streams), other streams, OR connections,
    relays in use, traffic totals."""
    on_circuits = set(view.circuits)
    return {
        "version": view.version,
        "time": now,
        "circuits": circuit_rows(view, now, show_targets=show_targets),
        "unattached_streams": [stream_dict(s, show_targets) for s in sorted(view.streams.values(),
                                                                            key=lambda s: s.id)
                               if s.circ_id not in on_circuits],
        "orconns": [{"endpoint": o.endpoint, "state": o.status, "nickname": o.peer.nickname if o.peer else None,
                     "fingerprint": o.peer.fingerprint if o.peer else None, "circuits": o.ncircs}
                    for o in view.orconns.values()],
        "relays_in_use": [{"nickname": hop.nickname, "fingerprint": hop.fingerprint, "roles": roles,
                           "circuits": circs, "address": f"{r.address}:{r.or_port}" if r else None,
                           "flags": sorted(r.flags) if r else []}
                          for hop, r, roles, circs in view.relays_in_use()],
        "relays_known": len(view.routers),
        "traffic": {"read": view.traffic_read, "written": view.traffic_written},
    }


def _path_text(row: dict):
    from rich.text import Text

    text = Text()
    for i, hop in enumerate(row["path"]):
        if i:
            text.append(" → ", style="dim")
        text.append(hop["nickname"] or "?", style="bold red" if hop["role"] == "exit" else "bold")
        if hop["fingerprint"]:
            text.append(f" ${hop['fingerprint'][:8]}", style="dim")
        if hop["role"] == "exit":
            text.append(" [exit]", style="red")
    return text or Text("-", style="dim")


def circuits_table(view: NetworkView, now: float, *, show_targets: bool = False, title: str | None = None):
    """A rich Table of the circuits and their streams, with a traffic caption."""
    require("rich", "rich", "onionp2p circuits")
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, caption=(f"{len(view.circuits)} circuits, {len(view.streams)} streams, "
                                        f"{len(view.orconns)} OR connections; traffic read "
                                        f"{format_bytes(view.traffic_read)}, written "
                                        f"{format_bytes(view.traffic_written)}"),
                  expand=False)
    for name, kw in (("ID", {"justify": "right"}), ("State", {}), ("Purpose", {}), ("Path", {}),
                     ("Age", {"justify": "right"}), ("Sent", {"justify": "right"}),
                     ("Recv", {"justify": "right"}), ("CC", {}), ("Streams", {})):
        table.add_column(name, **kw)
    for row in circuit_rows(view, now, show_targets=show_targets):
        streams = "\n".join(f"#{s['id']} {s['state']} {s['target']}" for s in row["streams"]) or "-"
        style = {"BUILT": "green", "FAILED": "red"}.get(row["state"], "yellow")
        table.add_row(str(row["id"]), Text(row["state"], style=style), Text(row["purpose"] or "-"), _path_text(row),
                      format_age(row["age_seconds"]), format_bytes(row["bytes_sent"]),
                      format_bytes(row["bytes_received"]), format_cc(row), Text(streams))  # Text: no markup
    loose = view_json(view, now, show_targets=show_targets)["unattached_streams"]
    for s in loose:
        table.add_row("-", "-", "-", "(not on a listed circuit)", "-", "-", "-", "-",
                      Text(f"#{s['id']} {s['state']} circ {s['circuit']} {s['target']}"))
    return table


# -- the picture -----------------------------------------------------------------------------

def _colors(n: int) -> list[str]:
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.85)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def _dq(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _graph_nodes(view: NetworkView) -> tuple[dict[str, dict], list[tuple[int, list[str]]]]:
    """Relays (every consensus entry plus any unknown hop) keyed by fingerprint or nickname,
    with the roles they play; and each circuit as (id, [node keys])."""
    nodes: dict[str, dict] = {}
    for r in sorted(view.routers.values(), key=lambda r: r.nickname):
        nodes[r.fingerprint] = {"nickname": r.nickname, "fingerprint": r.fingerprint,
                                "flags": sorted(r.flags), "roles": []}
    circuits = []
    for c in sorted(view.circuits.values(), key=lambda c: c.id):
        keys = []
        for i, hop in enumerate(c.path):
            router = view.router(hop)
            key = router.fingerprint if router else (hop.fingerprint or hop.nickname or "?")
            node = nodes.setdefault(key, {"nickname": hop.nickname or "?", "fingerprint": hop.fingerprint,
                                          "flags": [], "roles": []})
            node["roles"].append(hop_role(c, i))
            keys.append(key)
        circuits.append((c.id, keys))
    return nodes, circuits


def _node_label(node: dict) -> str:
    parts = [node["nickname"]]
    if node["fingerprint"]:
        parts.append("$" + node["fingerprint"][:8])
    if node["flags"]:
        parts.append(" ".join(f for f in node["flags"] if f in ("Guard", "Exit", "Fast", "Stable")))
    return "\n".join(p for p in parts if p)


def graph_dot(view: NetworkView) -> str:
    """Graphviz source: the client, every relay (idle ones grey), one coloured edge chain
    per circuit labelled with its id."""
    nodes, circuits = _graph_nodes(view)
    lines = ["digraph onionp2p {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", '
             'fontname="Helvetica", fontsize=10];', '  edge [fontname="Helvetica", fontsize=9];',
             '  client [label="client", shape=ellipse, fillcolor="#cfe2ff"];']
    fill = {"guard": "#d1f2d9", "middle": "#fff3cd", "exit": "#f8d7da"}
    for key, node in nodes.items():
        role = max(set(node["roles"]), key=node["roles"].count) if node["roles"] else None
        color = fill.get(role, "#eeeeee")
        font = "black" if role else "gray45"
        lines.append(f"  {_dq(key)} [label={_dq(_node_label(node))}, fillcolor={_dq(color)}, "
                     f"fontcolor={_dq(font)}];")
    for (cid, keys), color in zip(circuits, _colors(len(circuits))):
        chain = ["client", *keys]
        for a, b in zip(chain, chain[1:]):
            a_ = a if a == "client" else _dq(a)
            lines.append(f"  {a_} -> {_dq(b)} [color={_dq(color)}, fontcolor={_dq(color)}, "
                         f"label={_dq('circ ' + str(cid))}, penwidth=2];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_matplotlib(view: NetworkView, path: Path) -> None:
    """The same picture without Graphviz: relays in columns by role (guard, middle, exit,
    idle), circuits as coloured arrows. Text stays text in SVG output."""
    require("matplotlib", "matplotlib", "drawing the circuit graph without Graphviz")
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nodes, circuits = _graph_nodes(view)
    columns: dict[str, list[str]] = {"guard": [], "middle": [], "exit": [], "idle": []}
    for key, node in nodes.items():
        role = max(set(node["roles"]), key=node["roles"].count) if node["roles"] else "idle"
        columns[role].append(key)
    roles = [r for r, keys in columns.items() if keys or r != "idle"]
    xs = {r: float(i + 1) for i, r in enumerate(roles)}
    tallest = max([len(v) for v in columns.values()] + [1])
    pos: dict[str, tuple[float, float]] = {"client": (0.0, (tallest - 1) / 2)}
    for role in roles:
        offset = (tallest - len(columns[role])) / 2
        for j, key in enumerate(columns[role]):
            pos[key] = (xs[role], offset + j)
    fill = {"guard": "#d1f2d9", "middle": "#fff3cd", "exit": "#f8d7da"}
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig = Figure(figsize=(2.6 * (len(roles) + 1), max(3.0, 1.1 * tallest + 1.5)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_xlim(-0.6, len(roles) + 0.6)
        ax.set_ylim(-0.8, tallest - 0.2)
        ax.invert_yaxis()
        for role, x in xs.items():
            ax.text(x, -0.6, role, ha="center", va="center", fontsize=10, color="gray")
        boxes = {"client": ax.text(*pos["client"], "client", ha="center", va="center", fontsize=10,
                                   bbox={"boxstyle": "round", "fc": "#cfe2ff", "ec": "gray"})}
        for role in roles:
            for key in columns[role]:
                boxes[key] = ax.text(*pos[key], _node_label(nodes[key]), ha="center", va="center", fontsize=8,
                                     color="black" if role != "idle" else "gray",
                                     bbox={"boxstyle": "round", "fc": fill.get(role, "#eeeeee"), "ec": "gray"})
        for i, ((cid, keys), color) in enumerate(zip(circuits, _colors(len(circuits)))):
            chain = ["client", *keys]
            for a, b in zip(chain, chain[1:]):
                ax.annotate("", xy=pos[b], xytext=pos[a], arrowprops={
                    "arrowstyle": "-|>", "color": color, "lw": 1.8, "mutation_scale": 14,
                    "patchA": boxes[a].get_bbox_patch(), "patchB": boxes[b].get_bbox_patch(),
                    "connectionstyle": f"arc3,rad={0.08 * (i % 5) - 0.16}"})
            ax.plot([], [], color=color, lw=2, label=f"circuit {cid}")
        if circuits:
            ax.legend(loc="lower left", fontsize=8, frameon=False)
        fig.suptitle(f"{len(nodes)} relays, {len(circuits)} circuits")
        fig.savefig(path, format=path.suffix.lstrip(".").lower(), bbox_inches="tight")


def render_graph(view: NetworkView, path: str | Path, *, engine: str = "auto") -> str:
    """Write the picture to ``path`` (.png, .svg or .pdf). ``engine``: auto (dot if the
    Graphviz ``dot`` program is installed, else matplotlib), dot or matplotlib. Returns the
    engine used."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in _GRAPH_FORMATS:
        raise InspectError(f"graph file must end in {', '.join('.' + f for f in _GRAPH_FORMATS)}: {path}")
    dot = shutil.which("dot")
    if engine == "auto":
        engine = "dot" if dot else "matplotlib"
    if engine == "dot":
        if dot is None:
            raise MissingDependencyError("the Graphviz 'dot' program is not installed "
                                         "(apt-get install graphviz), or use the matplotlib engine")
        try:
            proc = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=graph_dot(view).encode(),
                                  capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InspectError(f"dot failed: {exc}") from None
        if proc.returncode != 0:
            raise InspectError(f"dot failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    elif engine == "matplotlib":
        draw_matplotlib(view, path)
    else:
        raise InspectError(f"unknown graph engine {engine!r} (auto, dot, matplotlib)")
    return engine


# -- commands ----------------------------------------------------------------------------------

async def run_circuits(target: ControlTarget, *, as_json: bool = False, watch: bool = False,
                       show_targets: bool = False, graph: str | None = None, graph_engine: str = "auto",
                       console=None, out=None, stop: asyncio.Event | None = None,
                       on_update: Callable[[NetworkView], None] | None = None) -> int:
    """``onionp2p circuits``. ``console``/``out`` (rich Console / text file) default to
    stdout; ``stop`` ends ``watch``; ``on_update`` is called with the view after each change."""
    out = out or sys.stdout
    if not as_json:
        require("rich", "rich", "onionp2p circuits")
        from rich.console import Console

        console = console or Console(file=out)
    client, view, since = await open_view(target, events=(
        ("CIRC", "STREAM", "ORCONN", "BW", "CIRC_BW") if watch else ()))
    try:
        if graph is not None:
            engine = render_graph(view, graph, engine=graph_engine)
            print(f"wrote {graph} ({engine}: {len(view.routers)} relays, {len(view.circuits)} circuits)",
                  file=sys.stderr)
        if not watch:
            now = time.time()
            if as_json:
                out.write(json.dumps(view_json(view, now, show_targets=show_targets), indent=2) + "\n")
            else:
                console.print(circuits_table(view, now, show_targets=show_targets))
            return 0
        handlers = []
        if stop is None:  # the command line: SIGINT/SIGTERM end the display cleanly
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, stop.set)
                    handlers.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                    pass
        try:
            await _watch(client, view, since, as_json=as_json, show_targets=show_targets, console=console,
                         out=out, stop=stop, on_update=on_update)
        finally:
            for sig in handlers:
                asyncio.get_running_loop().remove_signal_handler(sig)
        return 0
    finally:
        await client.close()


async def _watch(client, view: NetworkView, since: int, *, as_json: bool, show_targets: bool, console, out,
                 stop: asyncio.Event, on_update) -> None:
    changed = asyncio.Event()

    async def pump() -> None:
        async for ev in client.events(since=since):
            if view.apply(ev):
                changed.set()

    def render():
        return circuits_table(view, time.time(), show_targets=show_targets,
                              title=f"onionp2p circuits — {_client_label(view)}")

    pump_task = asyncio.ensure_future(pump())
    stop_task = asyncio.ensure_future(stop.wait())
    live = None
    if not as_json:
        from rich.live import Live

        live = Live(render(), console=console, auto_refresh=False, transient=False)
        live.start(refresh=True)
    dirty = True
    try:
        while True:
            if as_json and dirty:  # JSON: one line per change
                out.write(json.dumps(view_json(view, time.time(), show_targets=show_targets)) + "\n")
                out.flush()
            elif not as_json:  # the table also every second, for the ages
                live.update(render(), refresh=True)  # type: ignore[union-attr]
            if dirty and on_update is not None:
                on_update(view)
            changed_task = asyncio.ensure_future(changed.wait())
            done, _ = await asyncio.wait({pump_task, stop_task, changed_task}, timeout=1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
            changed_task.cancel()
            changed.clear()
            dirty = changed_task in done
            if stop_task in done:
                return
            if pump_task in done:
                pump_task.result()  # raises the connection error
                return
    finally:
        pump_task.cancel()
        stop_task.cancel()
        if live is not None:
            live.stop()


def _client_label(view: NetworkView) -> str:
    return view.version or "unknown version"


def _cmd_circuits(args: argparse.Namespace) -> int:
    return asyncio.run(run_circuits(target_from_args(args), as_json=args.json, watch=args.watch,
                                    show_targets=args.show_targets, graph=args.graph,
                                    graph_engine=args.graph_engine))


def _cmd_top(args: argparse.Namespace) -> int:
    require("textual", "textual", "onionp2p top")
    from onionp2p.ops.top import run_top

    return run_top(target_from_args(args), show_targets=args.show_targets)


def add_tool_parsers(sub) -> None:
    """Register ``circuits`` and ``top`` on onionp2p's subparsers."""
    c = sub.add_parser("circuits", help="show a node's circuits and streams (via its control port)")
    add_control_arguments(c)
    c.add_argument("--json", action="store_true", help="machine-readable output (with --watch: JSON lines)")
    c.add_argument("--watch", action="store_true", help="keep the display current from events (Ctrl-C ends)")
    c.add_argument("--show-targets", action="store_true", help="show stream destinations (private!)")
    c.add_argument("--graph", metavar="FILE", help="also draw relays and circuits to FILE (.png, .svg, .pdf)")
    c.add_argument("--graph-engine", choices=("auto", "dot", "matplotlib"), default="auto",
                   help="Graphviz dot (default when installed) or matplotlib")
    c.set_defaults(func=_cmd_circuits)
    t = sub.add_parser("top", help="live terminal dashboard of a node (bandwidth, circuits, streams, log)")
    add_control_arguments(t)
    t.add_argument("--show-targets", action="store_true", help="show stream destinations (private!)")
    t.set_defaults(func=_cmd_top)
