"""tools/bench's CPU accounting covers every process of a network (issue 16 item 1).

onionp2p's testnet starts its authority and relays as children, each in a session of its
own; the bench must count their CPU (found by parent PID, not by session) and the CPU of
children that have already exited and been reaped (cutime/cstime), with real processes
burning real CPU here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# root: starts a live child in a session of its own (like a relay) that burns BURN_LIVE
# seconds of CPU then sleeps, and a short-lived child it waits for (reaped: its CPU moves
# to the root's cutime) that burns BURN_REAPED seconds; then the root sleeps
# seconds of CPU; both start 2 s after the root, well after the meter's first reading
BURN = ("import time, sys\ntime.sleep(2)\nt = time.process_time()\n"
        "while time.process_time() - t < float(sys.argv[1]): pass\n")
ROOT_SCRIPT = f"""
import subprocess, sys, time
burn = {BURN!r}
live = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(60)", "0.6"], start_new_session=True)
subprocess.run([sys.executable, "-c", burn, "0.4"])
print("ready", live.pid, flush=True)
time.sleep(60)
"""


def _bench():
    spec = importlib.util.spec_from_file_location("bench_for_test", ROOT / "tools" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


class _Net:
    """What CpuMeter asks of a network: its processes and its client's PID."""

    def __init__(self, bench, root: int):
        self.bench, self.client_pid = bench, root

    def all_pids(self) -> list[int]:
        return self.bench.descendant_pids(self.client_pid)


def test_cpu_meter_counts_children_in_their_own_sessions_and_reaped_ones():
    bench = _bench()
    proc = subprocess.Popen([sys.executable, "-c", ROOT_SCRIPT], stdout=subprocess.PIPE, text=True)
    live = 0
    try:
        net = _Net(bench, proc.pid)
        meter = bench.CpuMeter(net)
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", line
        live = int(line[1])
        deadline = time.monotonic() + 30
        while bench.proc_cpu(live) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.05)
        meter.stop()
        assert live in bench.descendant_pids(proc.pid)
        assert meter.n_procs >= 2
        # both children's CPU is in the total (each burned in full after the meter started,
        # give or take the processes' start-up); the root alone spent little
        assert meter.total >= 0.6 + 0.4 - 0.1, meter.total
        assert bench.proc_cpu(proc.pid) < 0.5
        assert meter.error_bound == meter.n_procs * bench.TICK_ERROR_S
    finally:
        proc.kill()
        proc.wait()
        if live:
            subprocess.run(["kill", "-9", str(live)], check=False)
