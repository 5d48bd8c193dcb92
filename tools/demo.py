"""Demo: three real `onionp2p relay` processes on 127.0.0.1 carry a 3-hop circuit.

Starts a local HTTP server and three relays (guard, middle, exit) in a temporary
directory, builds a circuit through them with the client library, fetches a file and
prints the path, the sha256 check and the throughput; then stops everything.
Usage: python tools/demo.py [--mb N] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from onionp2p.client import OnionClient
from onionp2p.directory import RelayInfo


def serve_file(root: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def start_relay(base: Path, name: str, exit_policy: str) -> tuple[subprocess.Popen, Path]:
    d = base / name
    d.mkdir()
    (d / "relay.toml").write_text(
        f'nickname = "{name}"\ndata_dir = "."\nor_address = "127.0.0.1:0"\n'
        f'exit_policy = "{exit_policy}"\nexit_reject_private = false\nextend_allow_private = true\n'
    )
    log = open(d / "relay.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "onionp2p", "relay", "--config", str(d / "relay.toml")],
                         stdout=log, stderr=subprocess.STDOUT)
    return p, d


def wait_info(d: Path, p: subprocess.Popen) -> RelayInfo:
    for _ in range(600):
        if (d / "relay-info.json").exists():
            return RelayInfo.load(d / "relay-info.json")
        if p.poll() is not None:
            sys.exit(f"relay failed to start:\n{(d / 'relay.log').read_text()}")
        time.sleep(0.05)
    sys.exit("relay did not start")


async def fetch(infos: list[RelayInfo], port: int, size: int) -> None:
    client = OnionClient()
    t0 = time.perf_counter()
    circ = await client.build_circuit(infos)
    built = time.perf_counter() - t0
    print(f"circuit built in {built * 1000:.0f} ms: " + " -> ".join(
        f"{h.nickname} (${h.fingerprint[:8]})" for h in circ.hops))
    reader, writer = await circ.open_stream("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(b"GET /blob HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    data = await reader.read(-1)
    dt = time.perf_counter() - t0
    body = data.partition(b"\r\n\r\n")[2]
    print(f"fetched {len(body):,} bytes through the circuit in {dt:.2f} s ({len(body) / dt / 1e6:.1f} MB/s)")
    print(f"sha256 {hashlib.sha256(body).hexdigest()}")
    await client.close()
    return body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=10, help="size of the file to fetch (MB)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onionp2p-demo-") as tmp:
        base = Path(tmp)
        www = base / "www"
        www.mkdir()
        content = os.urandom(args.mb * 1_000_000)
        (www / "blob").write_bytes(content)
        srv, port = serve_file(www)
        procs = [start_relay(base, n, pol) for n, pol in
                 (("guard", "reject *:*"), ("middle", "reject *:*"), ("exit", "accept 127.0.0.1:*"))]
        try:
            infos = [wait_info(d, p) for p, d in procs]
            print(f"started 3 relays in {base}: " + ", ".join(f"{i.nickname}@{i.address}:{i.or_port}" for i in infos))
            body = asyncio.run(fetch(infos, port, len(content)))
            ok = hashlib.sha256(body).digest() == hashlib.sha256(content).digest()
            print("sha256 matches the served file" if ok else "SHA256 MISMATCH")
            return 0 if ok else 1
        finally:
            for p, _d in procs:
                p.send_signal(signal.SIGTERM)
            for p, _d in procs:
                p.wait(10)
            srv.shutdown()


if __name__ == "__main__":
    sys.exit(main())
