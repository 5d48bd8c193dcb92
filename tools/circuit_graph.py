#!/usr/bin/env python3
"""Draw a node's view of the network: every relay of its consensus (GETINFO ns/all) and
its current circuits, as a PNG, SVG or PDF.

    python tools/circuit_graph.py --control-port 9151 -o circuits.png
    python tools/circuit_graph.py --control 127.0.0.1:9151 --password P -o net.svg --engine matplotlib

Relays are boxes (nickname, short fingerprint, main flags) coloured by the role they play
(guard, middle, exit; idle ones grey); the client is on the left; each circuit is a
chain of arrows in its own colour labelled with its id. Graphviz ``dot`` is used when
installed (``apt-get install graphviz``), matplotlib otherwise. The same picture comes
from ``onionp2p circuits --graph FILE``; the drawing code is onionp2p.ops.circuits.render_graph.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

try:
    import onionp2p  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onionp2p.errors import OnionError
from onionp2p.ops.circuits import add_control_arguments, render_graph, target_from_args
from onionp2p.ops.controlclient import open_view


async def draw(args: argparse.Namespace) -> str:
    client, view, _ = await open_view(target_from_args(args), events=())
    await client.close()
    engine = render_graph(view, args.output, engine=args.engine)
    return f"wrote {args.output} ({engine}: {len(view.routers)} relays, {len(view.circuits)} circuits)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Draw relays and circuits seen through a control port.")
    add_control_arguments(p)
    p.add_argument("-o", "--output", required=True, help="output file: .png, .svg or .pdf")
    p.add_argument("--engine", choices=("auto", "dot", "matplotlib"), default="auto",
                   help="Graphviz dot (default when installed) or matplotlib")
    args = p.parse_args(argv)
    try:
        print(asyncio.run(draw(args)))
    except OnionError as exc:
        print(f"circuit_graph: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
