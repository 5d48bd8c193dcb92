#!/usr/bin/env python3
"""Forwarding capacity of one relay process at full load (specs/performance.md §2).

Usage::

    .venv/bin/python tools/bench_relay.py [--cells N] [--circuits K] [--runs R] [--cgo] [--json FILE]

The relay under test, R, is a real ``onionp2p relay`` process (DoS limits off, like a
testnet relay). This process is both of R's neighbours:

* the **client**: an :class:`~onionp2p.client.client.OnionClient` that builds ``K`` two-hop
  circuits R → S over one channel, then onion-encrypts ``N`` RELAY cells (command DROP,
  addressed to S: tor-spec's long-range padding, which carries no stream and is outside
  the SENDME windows) *before* the clock starts, so that during the measurement it only
  writes prepared bytes to its TLS socket;
* the **next hop** S: an in-process :class:`~onionp2p.relay.relay.Relay` that answers R's
  EXTEND2 (a real link handshake and ntor), whose channel from R is then handed to a
  protocol that only counts the bytes it receives (TLS decryption is all it pays).

So R does everything a middle relay does per cell — TLS decryption, framing, circuit
lookup, one AES-CTR layer, the Recognized check, queueing, TLS encryption (with
``--cgo`` the circuits negotiate CGO, and R's layer is one UIV+ pass per cell) — while its
neighbours cost less per cell than it does, and it runs at (close to) a full core. The
figure is cells forwarded per wall-clock second, with R's CPU utilisation and cells per
CPU-second beside it; every cell sent must reach S (the script checks the byte count).

Nothing here is a test: pytest never runs it. ``tools/bench`` runs it as its
"relay at full load" row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onionp2p.client.client import OnionClient  # noqa: E402
from onionp2p.config import RelayConfig  # noqa: E402
from onionp2p.proto.cells import CellCommand  # noqa: E402
from onionp2p.proto.directory import RelayInfo  # noqa: E402
from onionp2p.proto.relaycell import RelayCommand  # noqa: E402
from onionp2p.relay.keys import RelayKeys  # noqa: E402
from onionp2p.relay.relay import Relay  # noqa: E402

CELL_LEN = 514
TICKS = os.sysconf("SC_CLK_TCK")
CHUNK_CELLS = 32  # consecutive cells of one circuit before switching to the next
WINDOW_CELLS = 1000  # cells per circuit in flight (tor-spec's circuit window)


def log(*a) -> None:
    print("[bench_relay]", *a, file=sys.stderr, flush=True)


def proc_cpu(pid: int) -> float:
    """User+system CPU seconds of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_relay(work: Path) -> tuple[subprocess.Popen, RelayInfo]:
    d = work / "R"
    d.mkdir()
    (d / "relay.toml").write_text(
        'nickname = "benchR"\n'
        'data_dir = "."\n'
        'or_address = "127.0.0.1:0"\n'
        "extend_allow_private = true\n"
        "dos_max_concurrent_connections = 0\n"
        "dos_circuit_creation_rate = 0\n"
        "dos_circuit_creation_burst = 0\n"
        'log_level = "warning"\n'
    )
    logf = open(d / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "relay", "--config", str(d / "relay.toml")],
                            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
    info_path = d / "relay-info.json"
    end = time.time() + 60
    while not info_path.exists():
        if proc.poll() is not None or time.time() > end:
            raise SystemExit(f"relay R did not start: {(d / 'log.txt').read_text()}")
        time.sleep(0.05)
    time.sleep(0.1)  # the file is written whole, but give the listener a moment
    return proc, RelayInfo.load(info_path)


class _CountingSink(asyncio.Protocol):
    """Replaces S's channel protocol once the circuits are built: counts bytes, nothing else."""

    def __init__(self) -> None:
        self.received = 0
        self.target = 0
        self.done = asyncio.get_running_loop().create_future()
        self.progress = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.progress.set()
        if self.target and self.received >= self.target and not self.done.done():
            self.done.set_result(time.perf_counter())

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"R closed the channel to S: {exc}"))


class _Writer(asyncio.Protocol):
    """Replaces the client's channel protocol: honours TCP back-pressure, ignores input."""

    def __init__(self) -> None:
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.lost: BaseException | None = None

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc) -> None:
        self.lost = exc or ConnectionError("closed")
        self.can_write.set()


async def one_run(r_info: RelayInfo, r_pid: int, work: Path, n_cells: int, n_circuits: int,
                  run: int, cgo: bool = False) -> dict:
    keys = RelayKeys.load_or_create(work / f"S{run}")
    sink_relay = Relay(keys, RelayConfig(nickname=f"benchS{run}", data_dir=work / f"S{run}",
                                         or_address=("127.0.0.1", 0), extend_allow_private=True,
                                         dos_max_concurrent_connections=0, dos_circuit_creation_rate=0,
                                         dos_circuit_creation_burst=0))
    await sink_relay.start()
    client = OnionClient(cgo=cgo)
    try:
        path = [r_info, sink_relay.info()]
        circuits = [await client.build_circuit(path) for _ in range(n_circuits)]
        want = "cgo" if cgo else "tor1"
        assert all(layer.relay_crypto == want for c in circuits for layer in c.core.layers), want
        chan = circuits[0].chan
        assert all(c.chan is chan for c in circuits), "circuits should share the channel to R"
        assert len(sink_relay.channels) == 1, "S should have one channel, from R"
        (s_chan,) = sink_relay.channels

        log(f"run {run + 1}: encrypting {n_cells:,} cells on {n_circuits} circuit(s)")
        relay_cmd = int(CellCommand.RELAY)
        drop = bytes(circuits[0].core.layers[1].pack(RelayCommand.DROP, 0, b""))
        per_circ = [n_cells // n_circuits + (1 if i < n_cells % n_circuits else 0) for i in range(n_circuits)]
        streams = []
        for circ, count in zip(circuits, per_circ):
            head = struct.pack(">IB", circ.circ_id, relay_cmd)
            originate = circ.crypto.originate
            streams.append([head + originate(drop, 1)[0] for _ in range(count)])
        chunks: list[bytes] = []
        pos = [0] * n_circuits
        while any(p < len(s) for p, s in zip(pos, streams)):
            buf = []
            for i, s in enumerate(streams):  # round-robin runs of CHUNK_CELLS cells per circuit
                if pos[i] < len(s):
                    buf.extend(s[pos[i]:pos[i] + CHUNK_CELLS])
                    pos[i] += CHUNK_CELLS
                if len(buf) >= 512:
                    chunks.append(b"".join(buf))
                    buf = []
            if buf:
                chunks.append(b"".join(buf))
        del streams
        total = sum(len(c) for c in chunks)
        assert total == n_cells * CELL_LEN

        sink = _CountingSink()
        sink.target = total
        s_chan._transport.set_protocol(sink)
        writer = _Writer()
        transport = chan._transport
        transport.set_protocol(writer)
        transport.set_write_buffer_limits(high=4 << 20)

        cpu0 = proc_cpu(r_pid)
        self_cpu0 = time.process_time()
        t0 = time.perf_counter()
        # At most WINDOW_CELLS cells per circuit in flight between us and S, as the
        # circuit SENDME window would allow for DATA: R destroys a circuit whose queue
        # passes max_queue_cells (2500), and DROP cells are outside the windows.
        window = WINDOW_CELLS * n_circuits * CELL_LEN
        sent = 0
        for chunk in chunks:
            if not writer.can_write.is_set():
                await writer.can_write.wait()
            while sent - sink.received > window and not sink.done.done():
                sink.progress.clear()
                await sink.progress.wait()
            if writer.lost is not None:
                raise ConnectionError(f"R closed the client's channel: {writer.lost}")
            transport.write(chunk)
            sent += len(chunk)
        try:
            t1 = await asyncio.wait_for(sink.done, timeout=max(60.0, n_cells / 20_000))
        except asyncio.TimeoutError:
            rlog = (work / "R" / "log.txt").read_text()[-2000:]
            raise SystemExit(f"S received {sink.received:,} of {total:,} bytes; R's log: {rlog}") from None
        cpu1 = proc_cpu(r_pid)
        wall = t1 - t0
        r_cpu = cpu1 - cpu0
        res = {
            "cells": n_cells,
            "circuits": n_circuits,
            "wall_s": wall,
            "cells_per_s": n_cells / wall,
            "relay_cpu_s": r_cpu,
            "relay_cpu_util": r_cpu / wall,
            "cells_per_cpu_s": n_cells / r_cpu if r_cpu > 0 else float("nan"),
            "driver_cpu_util": (time.process_time() - self_cpu0) / wall,
        }
        log(f"run {run + 1}: {res['cells_per_s']:,.0f} cells/s, relay CPU {res['relay_cpu_util']:.0%}, "
            f"{res['cells_per_cpu_s']:,.0f} cells/CPU-s (driver CPU {res['driver_cpu_util']:.0%})")
        transport.abort()
        s_chan._transport.abort()
        return res
    finally:
        await client.close()
        await sink_relay.stop()


async def measure(n_cells: int, n_circuits: int, runs: int, cgo: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="onionp2p-bench-relay-") as tmp:
        work = Path(tmp)
        proc, info = start_relay(work)
        try:
            results = []
            for run in range(runs):
                results.append(await one_run(info, proc.pid, work, n_cells, n_circuits, run, cgo))
                await asyncio.sleep(0.5)  # let R notice the aborted channels
            if proc.poll() is not None:
                raise SystemExit(f"relay R died: {(work / 'R' / 'log.txt').read_text()}")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    med = {k: statistics.median(r[k] for r in results)
           for k in ("cells_per_s", "relay_cpu_util", "cells_per_cpu_s", "driver_cpu_util")}
    return {"runs": results, "median": med, "cells": n_cells, "circuits": n_circuits,
            "relay_crypto": "cgo" if cgo else "tor1"}


def table(res_by_k: dict[int, dict]) -> str:
    lines = ["| circuits | cells/s (wall) | relay CPU | cells per CPU-second | driver CPU |",
             "|---:|---:|---:|---:|---:|"]
    for k, res in sorted(res_by_k.items()):
        m = res["median"]
        lines.append(f"| {k} | {m['cells_per_s']:,.0f} | {m['relay_cpu_util']:.0%} | "
                     f"{m['cells_per_cpu_s']:,.0f} | {m['driver_cpu_util']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=1_000_000, help="cells per run (default 1,000,000)")
    ap.add_argument("--circuits", type=int, nargs="+", default=[1, 16],
                    help="circuit counts to measure (default: 1 16)")
    ap.add_argument("--runs", type=int, default=3, help="runs per circuit count (median; default 3)")
    ap.add_argument("--cgo", action="store_true",
                    help="the circuits use CGO relay crypto (default: tor1, the figure of earlier runs)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    log(f"relay crypto: {'CGO' if args.cgo else 'tor1'}")
    out = {k: asyncio.run(measure(args.cells, k, args.runs, args.cgo)) for k in args.circuits}
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
