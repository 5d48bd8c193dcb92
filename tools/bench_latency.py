#!/usr/bin/env python3
"""One stream over 3 hops on an emulated wide-area network: onionp2p with fixed windows,
onionp2p with congestion control (Vegas) with tor1 and with CGO relay crypto, and tor, side
by side (specs/performance.md).

Usage::

    .venv/bin/python tools/bench_latency.py [--delay 20-40] [--mb 20] [--runs 3]
                                           [--relays 5] [--exits 2] [--only onionp2p|tor]

Loopback has no latency, so fixed SENDME windows never limit a circuit there. This kernel
has no ``netem``; the latency is made in user space by ``onionp2p wan``
(:mod:`onionp2p.ops.wan`): every relay of both networks listens on one port and
advertises another, where a proxy forwards with a one-way delay (spread over ``--delay``
MIN-MAX milliseconds, one value per relay, the same values for both networks), so every
link to a relay — client→guard, guard→middle, middle→exit — carries it; the exit→web
server link gets MIN too. A circuit's round trip is then about 2 × (the three relays'
delays + MIN).

Networks (one at a time; the other is stopped):

* ``onionp2p testnet --link-delay`` (1 authority, ``--relays`` relays) with its own client
  (the defaults: Vegas with the exit, CGO on every hop) and two more ``onionp2p client``
  processes on the same network, one with ``congestion_control = false`` (fixed windows:
  1000 cells per circuit, 500 per stream; tor1, as CGO needs congestion control), one
  with ``cgo = false`` (Vegas, tor1);
* tools/tornet.py's tor network (3 authorities, the same relays) with ``split_or_ports``
  behind the same proxies, and a tor client (``ConfluxEnabled 0``: one circuit per stream,
  like ours; congestion control is tor's default, Vegas, negotiated with the exits; the
  authorities are excluded from paths, as onionp2p's are not relays).

Each figure is the median of ``--runs`` downloads of ``--mb`` MB through the SOCKS port,
each on a new circuit (a SOCKS username per run) after a 1 MB warm-up on it, so that a row
samples several paths. The emulator alone is measured first (its round-trip time and
throughput ceiling). Prints a markdown table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
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

from onionp2p.ops.wan import measure  # noqa: E402

MB = 1_000_000


def log(*a) -> None:
    print("[bench_latency]", *a, file=sys.stderr, flush=True)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


bench = _load("bench")


def free_port() -> int:
    from onionp2p.testnet import free_port as fp

    return fp()


def delays(lo: float, hi: float, n: int) -> list[float]:
    """One-way delay (s) of links to relay i: spread evenly over lo..hi (as the testnet does)."""
    return [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]


class Wan:
    """An ``onionp2p wan`` process (one proxy per mapping)."""

    def __init__(self, maps: list[tuple[int, int, float]], logfile: Path):
        args = [a for adv, to, d in maps for a in ("--map", f"{adv}:127.0.0.1:{to}:{d * 1000:g}")]
        self.log = open(logfile, "ab")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "onionp2p", "wan", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if line != b"wan ready":
            raise RuntimeError(f"onionp2p wan did not start; see {logfile}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def _wait_line(proc: subprocess.Popen, pattern: str, timeout: float, what: str) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"{what} exited")
        m = re.search(pattern, line)
        if m:
            return m
    raise RuntimeError(f"{what} not ready in {timeout:.0f} s")


class OnionNets:
    """``onionp2p testnet --link-delay`` (its client runs Vegas and CGO, the defaults), a
    client with fixed windows (and so tor1) and a client with Vegas and tor1."""

    def __init__(self, workdir: Path, lo: float, hi: float, n_relays: int, n_exits: int):
        self.dir = workdir / "onionp2p"
        self.lo, self.hi, self.n_relays, self.n_exits = lo, hi, n_relays, n_exits
        self.procs: list[subprocess.Popen] = []

    def start(self) -> dict[str, int]:
        """Start them all; return each mode's SOCKS port."""
        logf = open(workdir_log(self.dir, "testnet.log"), "ab")
        tn = subprocess.Popen([sys.executable, "-u", "-m", "onionp2p", "testnet", "--relays", str(self.n_relays),
                               "--exits", str(self.n_exits), "--socks-port", "auto", "--control-port", "0",
                               "--data-dir", str(self.dir), "--voting-interval", "5",
                               "--link-delay", f"{self.lo * 1000:g}-{self.hi * 1000:g}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=logf, start_new_session=True)
        self.procs.append(tn)
        ports = {"onionp2p, Vegas, CGO (the defaults)":
                 int(_wait_line(tn, r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)", 300, "onionp2p testnet").group(1))}
        authorities = tomllib.loads((self.dir / "auth0" / "authority.toml").read_text())["authorities"]
        for name, key, mode in (("fixed", "congestion_control", "onionp2p, fixed windows, tor1"),
                                ("tor1", "cgo", "onionp2p, Vegas, tor1")):
            cdir = self.dir / f"client-{name}"
            cdir.mkdir(parents=True, exist_ok=True)
            cfg = cdir / "client.toml"
            cfg.write_text("".join(f"{k} = {v}\n" for k, v in {
                "data_dir": f'"{cdir / "data"}"', "socks_address": '"127.0.0.1:0"', key: "false",
                "enforce_distinct_subnets": "false", "client_reject_internal_addresses": "false",
                "log_level": '"warning"', "authorities": "[" + ", ".join(f'"{a}"' for a in authorities) + "]",
            }.items()))
            cl = subprocess.Popen([sys.executable, "-u", "-m", "onionp2p", "client", "--config", str(cfg)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=logf, start_new_session=True)
            self.procs.append(cl)
            ports[mode] = int(_wait_line(cl, r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)", 300,
                                         "onionp2p client").group(1))
        logf.close()
        return ports

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def workdir_log(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d.parent / name


class DelayedTorNetwork(bench.TorNetwork):
    """tools/bench.py's tor network with every relay behind an ``onionp2p wan`` proxy."""

    def __init__(self, workdir: Path, lo: float, hi: float, n_relays: int, n_exits: int):
        super().__init__(workdir, n_relays, n_exits, ["ConfluxEnabled 0"])
        self.lo, self.hi = lo, hi
        self.wan: Wan | None = None
        self.net.split_or_ports = True
        self.net.before_launch = self._proxies
        self.delays: dict[str, float] = {}

    def _proxies(self, net) -> None:
        relays = net.relays
        maps = []
        for node, d in zip(relays, delays(self.lo, self.hi, len(relays))):
            self.delays[node.name] = d
            maps.append((node.or_port, node.listen_port, d))
        self.wan = Wan(maps, self.dir.parent / "tor-wan.log")
        # the client's paths use relays only (onionp2p's authorities are not relays)
        self.tor_options.append("ExcludeNodes " + ",".join(f"${a.fingerprint}" for a in net.authorities))

    def stop(self) -> None:
        super().stop()
        if self.wan is not None:
            self.wan.stop()


async def downloads(socks_port: int, web_port: int, nbytes: int, runs: int) -> list[float]:
    """``runs`` downloads, each on a circuit of its own (a SOCKS username per run: both
    onionp2p and tor isolate by it), so that the median samples several paths — the relays'
    delays differ, and one circuit's RTT would decide a whole row. Each circuit is built and
    its stream warmed up (1 MB: the build, then slow start) before its timed download."""
    out = []
    for i in range(runs):
        user = f"run{i}-{os.getpid()}"
        await bench.bulk(socks_port, web_port, 1 * MB, user=user)
        r = await bench.bulk(socks_port, web_port, nbytes, user=user)
        out.append(r["mbps"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/bench_latency.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay", default="20-40", help="one-way delay per link, ms: MIN-MAX (default 20-40)")
    ap.add_argument("--mb", type=int, default=20, help="MB per download (default 20)")
    ap.add_argument("--runs", type=int, default=5, help="downloads (each on its own circuit) per row")
    ap.add_argument("--relays", type=int, default=5)
    ap.add_argument("--exits", type=int, default=2)
    ap.add_argument("--only", choices=("onionp2p", "tor"))
    args = ap.parse_args(argv)
    lo_s, _, hi_s = args.delay.partition("-")
    lo, hi = float(lo_s) / 1000, float(hi_s or lo_s) / 1000
    workdir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    log("work directory", workdir)
    http = bench.HttpServerProc(workdir)
    web_adv = free_port()
    web_wan = Wan([(web_adv, http.port, lo)], workdir / "web-wan.log")
    results: dict[str, list[float]] = {}
    try:
        emu = asyncio.run(measure((lo + hi) / 2, nbytes=128 * MB))
        log("emulator alone", emu)
        if args.only in (None, "onionp2p"):
            nets = OnionNets(workdir, lo, hi, args.relays, args.exits)
            try:
                ports = nets.start()
                log("onionp2p ready: SOCKS", ports)
                for mode in ("onionp2p, fixed windows, tor1", "onionp2p, Vegas, tor1",
                             "onionp2p, Vegas, CGO (the defaults)"):
                    results[mode] = asyncio.run(downloads(ports[mode], web_adv, args.mb * MB, args.runs))
                    log(mode, results[mode])
            finally:
                nets.stop()
        if args.only in (None, "tor"):
            tor = DelayedTorNetwork(workdir, lo, hi, args.relays, args.exits)
            try:
                tor.start()
                log("tor ready: SOCKS", tor.socks_port)
                results["tor, Vegas (its default), conflux off"] = asyncio.run(
                    downloads(tor.socks_port, web_adv, args.mb * MB, args.runs))
                log("tor", results["tor, Vegas (its default), conflux off"])
            finally:
                tor.stop()
    finally:
        web_wan.stop()
        http.stop()
    ds = delays(lo, hi, args.relays)
    print(f"\nSingle stream, 3 hops, {args.mb} MB, median of {args.runs}; every link to a relay delayed "
          f"{args.delay} ms one way (relays: {', '.join(f'{d * 1000:g}' for d in ds)} ms), exit→server "
          f"{lo * 1000:g} ms; a circuit's RTT is about {2 * (min(ds) * 3 + lo) * 1000:.0f}–"
          f"{2 * (max(ds) * 3 + lo) * 1000:.0f} ms.\n")
    print(f"Emulator alone ({(lo + hi) / 2 * 1000:g} ms one way): round trip {emu['rtt_p50_s'] * 1000:.1f} ms "
          f"(expected {emu['rtt_expected_s'] * 1000:.0f}), one connection "
          f"{emu['throughput_bytes_per_s'] / MB:.0f} MB/s.\n")
    tor_key = next((k for k in results if k.startswith("tor")), None)
    tor_med = statistics.median(results[tor_key]) if tor_key else None
    print("| network, mode | MB/s (median) | runs | ratio to tor |")
    print("|---|---:|---|---:|")
    for name, vals in results.items():
        med = statistics.median(vals)
        ratio = f"{med / tor_med:.2f}x" if tor_med else "—"
        print(f"| {name} | {med:.2f} | {', '.join(f'{v:.2f}' for v in vals)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
