#!/usr/bin/env python3
"""How onionp2p's memory and CPU grow with relays, circuits and streams (specs/performance.md §6).

Usage::

    .venv/bin/python tools/bench_scale.py [--full] [--only relays circuits streams load]
                                          [--trace N] [--json FILE]

Four measurements, one after the other, each with real processes on 127.0.0.1; each prints
a table of N against RSS and CPU, so that one sees how the cost grows, not one point:

``relays``
    ``onionp2p testnet --relays N`` for N in 5, 10, 20 (``--full``: also 40): after the
    network is up and has settled, the RSS of every relay process and of the authority, and
    their CPU over an idle window (consensus fetches, descriptor uploads, keepalives: what an
    idle relay costs). How many relays one machine holds follows from these two figures.
``circuits``
    One ``onionp2p relay`` process of its own (DoS limits off, no per-channel cap), and
    one-hop circuits built to it (CREATE2 with ntor-v3, from onionp2p's ``OnionClient`` in
    this process, spread over channels of 900 circuits) up to 10,000 (``--full``: 100,000),
    RSS read at checkpoints; also the relay's CPU per circuit built.
``streams``
    An ``onionp2p testnet`` (3 relays) for the exits, and a client node in a process of its
    own (``_client`` below, with ``socks_max_connections`` raised); N idle streams
    (``GET /idle`` through SOCKS, 400 per circuit, a SOCKS username per 400) for N up to 800
    (``--full``: 3,200): the client's RSS per open stream. ``--trace N`` runs the client
    under ``tracemalloc`` instead and prints what N streams allocate, by source line: what
    a stream holds.
``load``
    ``tools/bench_relay.py``'s relay at full load (prepared DROP cells through R to a
    counting next hop) with 1, 10, 100 and 1,000 concurrent circuits: cells per second, R's
    CPU and RSS.

The machine this runs on is usually shared: compare the rows of one run with each other.
Nothing here is a test: pytest never runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


bench = _load("bench")
KiB, MiB = 1024, 1024 * 1024
STREAMS_PER_CIRCUIT = 400  # below the exits' max_streams_per_circuit (500)


def log(*a) -> None:
    print("[scale]", *a, file=sys.stderr, flush=True)


def table(head: list[str], rows: list[list]) -> str:
    def f(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    out += ["| " + " | ".join(f(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# relays: RSS and CPU of idle relay processes

class Testnet:
    """``onionp2p testnet`` as a subprocess (its client idles; we only use its relays)."""

    def __init__(self, workdir: Path, n_relays: int, n_exits: int):
        self.dir = workdir / f"testnet-{n_relays}"
        self.n = n_relays
        self.log = open(workdir / f"testnet-{n_relays}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onionp2p", "testnet", "--relays", str(n_relays), "--exits", str(n_exits),
             "--socks-port", "auto", "--control-port", "auto", "--data-dir", str(self.dir),
             "--voting-interval", "5"], stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT, start_new_session=True)

    def wait(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"testnet exited; see {self.log.name}")
            if re.search(r"Control port at", line):
                return
        raise RuntimeError("testnet not ready in time")

    def roles(self) -> dict[str, list[int]]:
        """relay / authority PIDs (children of the testnet process) and the client's (itself)."""
        out: dict[str, list[int]] = {"relay": [], "authority": [], "client": [self.proc.pid]}
        for pid in bench.descendant_pids(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"relay" in cmd:
                out["relay"].append(pid)
            elif b"authority" in cmd:
                out["authority"].append(pid)
        return out

    def authority_lines(self) -> list[str]:
        cfg = tomllib.loads((self.dir / "relay0" / "relay.toml").read_text()
                            if (self.dir / "relay0").exists() else (self.dir / "exit0" / "relay.toml").read_text())
        return list(cfg["authorities"])

    def stop(self) -> None:
        bench.OnionNet.stop(self)  # type: ignore[arg-type]  # SIGTERM, then SIGKILL of the group


async def relays_idle(workdir: Path, sizes: list[int], settle: float, window: float) -> list[dict]:
    rows = []
    for n in sizes:
        t0 = time.monotonic()
        net = Testnet(workdir, n, min(2, n))
        try:
            await asyncio.to_thread(net.wait)
            up = time.monotonic() - t0
            await asyncio.sleep(settle)
            roles = net.roles()
            c0 = {pid: bench.proc_cpu(pid) for pids in roles.values() for pid in pids}
            w0 = time.monotonic()
            await asyncio.sleep(window)
            wall = time.monotonic() - w0
            cpu = {pid: (bench.proc_cpu(pid) - c0[pid]) / wall for pid in c0}
            rss = {pid: bench.proc_rss(pid) for pid in c0}
            rel = roles["relay"]
            row = {"relays": n, "up_s": up,
                   "relay_rss_mib_median": statistics.median(rss[p] for p in rel) / MiB,
                   "relay_rss_mib_max": max(rss[p] for p in rel) / MiB,
                   "relay_cpu_pct_mean": 100 * statistics.mean(cpu[p] for p in rel),
                   "relay_cpu_pct_max": 100 * max(cpu[p] for p in rel),
                   "auth_rss_mib": sum(rss[p] for p in roles["authority"]) / MiB,
                   "auth_cpu_pct": 100 * sum(cpu[p] for p in roles["authority"]),
                   "window_s": wall}
            rows.append(row)
            log(f"relays {n}: {row}")
        finally:
            net.stop()
    return rows


# --------------------------------------------------------------------------------------------
# circuits: RSS per circuit at one relay

async def circuits_growth(workdir: Path, checkpoints: list[int], per_channel: int = 900,
                          concurrency: int = 64) -> list[dict]:
    from onionp2p.client.client import OnionClient

    proc, info = bench.dedicated_onion_relay(workdir)
    rows = []
    clients: list = []
    built = failed = 0
    try:
        await asyncio.sleep(1.0)
        rss0, cpu0, t_start = bench.proc_rss(proc.pid), bench.proc_cpu(proc.pid), time.monotonic()
        rows.append({"circuits": 0, "rss_mib": rss0 / MiB, "kib_per_circuit": float("nan"),
                     "kib_per_circuit_step": float("nan"), "cpu_ms_per_build": float("nan"),
                     "builds_per_s": float("nan")})
        log(f"circuits 0: relay RSS {rss0 / MiB:.1f} MiB")
        sem = asyncio.Semaphore(concurrency)
        prev_rss, prev_n = rss0, 0

        async def one(cl):
            nonlocal built, failed
            async with sem:
                try:
                    await cl.build_circuit([info], timeout=120)
                    built += 1
                except Exception:
                    failed += 1

        for target in checkpoints:
            t0, c0, n0 = time.monotonic(), bench.proc_cpu(proc.pid), built
            jobs = []
            for i in range(built + failed, target):
                if i // per_channel >= len(clients):
                    clients.append(OnionClient())
                jobs.append(one(clients[i // per_channel]))
            await asyncio.gather(*jobs)
            dt, dcpu = time.monotonic() - t0, bench.proc_cpu(proc.pid) - c0
            await asyncio.sleep(2.0)
            gc.collect()
            rss = bench.proc_rss(proc.pid)
            if proc.poll() is not None:
                raise RuntimeError("the relay died")
            row = {"circuits": built, "rss_mib": rss / MiB,
                   "kib_per_circuit": (rss - rss0) / max(built, 1) / KiB,
                   "kib_per_circuit_step": (rss - prev_rss) / max(built - prev_n, 1) / KiB,
                   "cpu_ms_per_build": 1000 * dcpu / max(built - n0, 1),
                   "builds_per_s": (built - n0) / dt}
            rows.append(row)
            prev_rss, prev_n = rss, built
            log(f"circuits {target}: {row} ({failed} failed so far, {time.monotonic() - t_start:.0f} s)")
    finally:
        for cl in clients:
            await cl.close()
        proc.terminate()
        proc.wait(20)
    return rows


# --------------------------------------------------------------------------------------------
# streams: RSS per open stream at a client, and what a stream holds (tracemalloc)

def client_main(data_dir: str, auths_json: str, trace: str) -> None:
    """A client node in its own process, driven over stdin/stdout: ``rss`` -> its RSS,
    ``snap`` -> a tracemalloc snapshot, ``diff N`` -> what was allocated since the last
    snapshot, per stream (N streams), by source line."""
    import tracemalloc

    from onionp2p.client.node import ClientNode
    from onionp2p.config import ClientConfig

    if trace == "1":
        tracemalloc.start(1)

    async def run():
        cfg = ClientConfig(data_dir=Path(data_dir), socks_address=("127.0.0.1", 0), control_port=None,
                           authorities=tuple(json.loads(auths_json)), enforce_distinct_subnets=False,
                           client_reject_internal_addresses=False, log_level="warning",
                           socks_max_connections=65535)
        node = ClientNode(cfg)
        await node.start(ready_timeout=120)
        print(f"PORT {node.socks_port}", flush=True)
        snap = None
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                break
            gc.collect()
            if line[0] == "rss":
                print(f"RSS {bench.proc_rss(os.getpid())}", flush=True)
            elif line[0] == "snap":
                snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                print("OK", flush=True)
            elif line[0] == "diff":
                n = int(line[1])
                new = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                stats = new.compare_to(snap, "lineno")
                total = sum(s.size_diff for s in stats)
                top = [[str(s.traceback[0]), s.size_diff / n, s.count_diff / n] for s in stats[:40]]
                print("DIFF " + json.dumps({"total_per_stream": total / n, "top": top}), flush=True)
        await node.stop()

    asyncio.run(run())


class ClientProc:
    def __init__(self, workdir: Path, auths: list[str], trace: bool):
        self.p = subprocess.Popen([sys.executable, __file__, "_client", str(workdir / "client"), json.dumps(auths),
                                   "1" if trace else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  cwd=ROOT, text=True, start_new_session=True)
        self.port = int(self._expect("PORT"))

    def _expect(self, word: str) -> str:
        assert self.p.stdout is not None
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("the client process exited")
            if line.startswith(word + " ") or line.strip() == word:
                return line[len(word):].strip()

    def ask(self, cmd: str, word: str) -> str:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._expect(word)

    def stop(self) -> None:
        try:
            assert self.p.stdin is not None
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(20)
        except Exception:
            self.p.kill()
            self.p.wait()


async def open_idle_streams(socks_port: int, http_port: int, n: int, start: int, socks: list) -> None:
    """Open streams number start .. start+n-1 (GET /idle), STREAMS_PER_CIRCUIT per SOCKS username."""
    sem = asyncio.Semaphore(32)
    loop = asyncio.get_running_loop()

    async def one(i: int):
        async with sem:
            s = await bench.socks_connect(socks_port, "127.0.0.1", http_port, user=f"s{i // STREAMS_PER_CIRCUIT}",
                                          timeout=120)
            await loop.sock_sendall(s, b"GET /idle HTTP/1.0\r\n\r\n")
            socks.append(s)

    res = await asyncio.gather(*(one(i) for i in range(start, start + n)), return_exceptions=True)
    bad = [r for r in res if isinstance(r, BaseException)]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} streams failed: {bad[0]!r}")


async def streams_growth(workdir: Path, steps: list[int], trace_n: int = 0) -> dict:
    http = bench.HttpServerProc(workdir)
    net = Testnet(workdir, 3, 1)
    out: dict = {}
    try:
        await asyncio.to_thread(net.wait)
        auths = net.authority_lines()
        if trace_n:
            cl = await asyncio.to_thread(ClientProc, workdir / "trace", auths, True)
            socks: list = []
            try:
                # one stream per circuit group first, so that circuits are not part of the diff
                await open_idle_streams(cl.port, http.port, 1, 0, socks)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(cl.ask, "snap", "OK")
                await open_idle_streams(cl.port, http.port, trace_n, 1, socks)
                await asyncio.sleep(2.0)
                d = json.loads(await asyncio.to_thread(cl.ask, f"diff {trace_n}", "DIFF"))
                out["trace"] = {"streams": trace_n, **d}
                log(f"tracemalloc: {d['total_per_stream'] / KiB:.2f} KiB per stream over {trace_n} streams")
                for where, size, count in d["top"][:25]:
                    log(f"  {size:8.0f} B {count:6.2f} blocks  {where}")
            finally:
                for s in socks:
                    s.close()
                await asyncio.to_thread(cl.stop)
        if steps:
            cl = await asyncio.to_thread(ClientProc, workdir / "rss", auths, False)
            socks = []
            rows = []
            try:
                await open_idle_streams(cl.port, http.port, 1, 0, socks)
                await asyncio.sleep(1.0)
                rss0 = int(await asyncio.to_thread(cl.ask, "rss", "RSS"))
                prev_rss, prev_n = rss0, 0
                rows.append({"streams": 0, "rss_mib": rss0 / MiB, "kib_per_stream": float("nan"),
                             "kib_per_stream_step": float("nan")})
                for n in steps:
                    await open_idle_streams(cl.port, http.port, n - prev_n, prev_n + 1, socks)
                    await asyncio.sleep(2.0)
                    rss = int(await asyncio.to_thread(cl.ask, "rss", "RSS"))
                    row = {"streams": n, "rss_mib": rss / MiB, "kib_per_stream": (rss - rss0) / n / KiB,
                           "kib_per_stream_step": (rss - prev_rss) / (n - prev_n) / KiB}
                    rows.append(row)
                    log(f"streams {n}: {row}")
                    prev_rss, prev_n = rss, n
            finally:
                for s in socks:
                    s.close()
                await asyncio.to_thread(cl.stop)
            out["rss"] = rows
    finally:
        net.stop()
        http.stop()
    return out


# --------------------------------------------------------------------------------------------
# load: one relay forwarding for many circuits

async def relay_load(workdir: Path, counts: list[int], cells: int) -> list[dict]:
    br = _load("bench_relay")
    rows = []
    for k in counts:
        work = workdir / f"load-{k}"
        work.mkdir()
        proc, info = br.start_relay(work)
        try:
            rss0 = bench.proc_rss(proc.pid)
            peak = rss0

            async def sample():
                nonlocal peak
                while True:
                    peak = max(peak, bench.proc_rss(proc.pid))
                    await asyncio.sleep(0.2)

            sampler = asyncio.ensure_future(sample())
            try:
                res = await br.one_run(info, proc.pid, work, max(cells, 1000 * k), k, 0)
            finally:
                sampler.cancel()
            rss1 = peak
            row = {"circuits": k, "cells_per_s": res["cells_per_s"], "relay_cpu_pct": 100 * res["relay_cpu_util"],
                   "cells_per_cpu_s": res["cells_per_cpu_s"], "rss_mib_idle": rss0 / MiB, "rss_mib_peak": rss1 / MiB}
            rows.append(row)
            log(f"load {k}: {row}")
        finally:
            proc.terminate()
            proc.wait(20)
    return rows


# --------------------------------------------------------------------------------------------

async def amain(args) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="onionp2p-scale-"))
    log(f"work directory {workdir}")
    res: dict = {"full": args.full}
    out = []
    if "relays" in args.only:
        sizes = [5, 10, 20, 40] if args.full else [5, 10, 20]
        rows = await relays_idle(workdir, sizes, settle=20.0, window=30.0 if args.full else 20.0)
        res["relays"] = rows
        out += ["Idle relays (onionp2p testnet --relays N; RSS and CPU per relay process over an idle window):", "",
                table(["relays", "up in (s)", "relay RSS median (MiB)", "max", "relay CPU mean (% of a core)", "max",
                       "authority RSS (MiB)", "authority CPU (%)"],
                      [[r["relays"], r["up_s"], r["relay_rss_mib_median"], r["relay_rss_mib_max"],
                        r["relay_cpu_pct_mean"], r["relay_cpu_pct_max"], r["auth_rss_mib"], r["auth_cpu_pct"]]
                       for r in rows]), ""]
    if "circuits" in args.only:
        top = 100_000 if args.full else 10_000
        cps = [c for c in (1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000) if c <= top]
        rows = await circuits_growth(workdir, cps)
        res["circuits"] = rows
        out += ["Idle one-hop circuits at one relay (RSS of the relay process):", "",
                table(["circuits", "relay RSS (MiB)", "KiB per circuit (from 0)", "KiB per circuit (this step)",
                       "relay CPU per CREATE2 (ms)", "builds per s"],
                      [[r["circuits"], r["rss_mib"], r["kib_per_circuit"], r["kib_per_circuit_step"],
                        r["cpu_ms_per_build"], r["builds_per_s"]] for r in rows]), ""]
    if "streams" in args.only:
        steps = [100, 200, 400, 800, 1600, 3200] if args.full else [100, 200, 400, 800]
        d = await streams_growth(workdir, steps, args.trace)
        res["streams"] = d
        if "rss" in d:
            out += ["Idle streams at one client (RSS of the client process; 400 streams per circuit):", "",
                    table(["streams", "client RSS (MiB)", "KiB per stream (from 0)", "KiB per stream (this step)"],
                          [[r["streams"], r["rss_mib"], r["kib_per_stream"], r["kib_per_stream_step"]]
                           for r in d["rss"]]), ""]
        if "trace" in d:
            t = d["trace"]
            out += [f"tracemalloc, {t['streams']} idle streams: {t['total_per_stream']:.0f} bytes per stream; "
                    "largest sources (bytes and blocks per stream):", "",
                    table(["bytes", "blocks", "where"], [[round(s), round(c, 2), w] for w, s, c in t["top"][:20]]), ""]
    if "load" in args.only:
        counts = [1, 10, 100, 1000]
        rows = await relay_load(workdir, counts, 1_000_000 if args.full else 300_000)
        res["load"] = rows
        out += ["One relay forwarding for K concurrent circuits (tools/bench_relay.py's driver, prepared DROP cells):",
                "", table(["circuits", "cells/s", "relay CPU (%)", "cells per CPU-s", "RSS before (MiB)",
                           "RSS peak during the run (MiB)"],
                          [[r["circuits"], r["cells_per_s"], r["relay_cpu_pct"], r["cells_per_cpu_s"],
                            r["rss_mib_idle"], r["rss_mib_peak"]] for r in rows]), ""]
    text = "\n".join(out)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_client":
        client_main(*argv[1:4])
        return 0
    ap = argparse.ArgumentParser(prog="bench_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="larger N (100,000 circuits, 40 relays, 3,200 streams)")
    ap.add_argument("--only", nargs="+", default=["relays", "circuits", "streams", "load"],
                    choices=("relays", "circuits", "streams", "load"))
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="also run the client under tracemalloc with N idle streams (what a stream holds)")
    ap.add_argument("--json", help="write the results to this file too")
    args = ap.parse_args(argv)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
