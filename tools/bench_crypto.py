#!/usr/bin/env python3
"""Micro-benchmark of the per-cell crypto and the ntor handshake; prints markdown tables.

Usage: ``python tools/bench_crypto.py [cells]`` (default 20000 cells per tor1 row; the
CGO rows use a quarter of that, at least 200, after 100 warm-up cells, so that with the
pure-Python POLYVAL fallback long-lived pass-through keys have their tables, as on a busy
circuit). A second table compares each CGO row with its tor1 counterpart and names the
CGO backend in use (``onionp2p.proto.cgo.CGO_BACKEND``) and the pure path's POLYVAL and XOR
backends; when the native CGO backend is built, a third table puts the pure-Python and the
native CGO side by side (before/after, specs/cgo.md §8a).

Each row is the process CPU time per operation (``time.process_time_ns``), the best of
``ROUNDS`` equal slices of the run: on a machine shared with other work, wall-clock time
per cell moves by ±50 % with the load, CPU time much less, and the best slice is the one
least disturbed (cache misses, frequency changes). The figures are for comparing rows and
runs on one machine, not absolute.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.proto import cgo
from onionp2p.proto.handshake import NtorClient, NtorV3Client, ntor_server, ntor_v3_server
from onionp2p.proto.hopcrypto import MixedClientCrypto
from onionp2p.proto.relaycrypto import ClientCrypto, RelayCrypto

CGO_WARMUP = 100
ROUNDS = 25
RUN = 8  # cells per inbound run in the "run" row (what one socket read brings a busy circuit)
#: what a guard or middle runs per cell toward the client (RelayCircuit.receive_backward's call)
CORE_BWD_ROW = "relay pass-through backward (the circuit core's call)"
RUN_ROW = f"client decrypt_inbound_many, runs of {RUN} (3 hops, from hop 2; per cell)"


def _ns_per_call(fn: Callable[[], object], n: int, warmup: int = 1) -> float:
    """CPU ns per call of ``fn``: ``n`` calls in ``ROUNDS`` slices, the best slice."""
    for _ in range(warmup):
        fn()
    per_round = max(1, n // ROUNDS)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time_ns()
        for _ in range(per_round):
            fn()
        best = min(best, (time.process_time_ns() - start) / per_round)
    return best


def main(argv: list[str]) -> int:
    n = int(argv[1]) if len(argv) > 1 else 20000
    keys = [os.urandom(72) for _ in range(3)]
    body = bytes(509)
    rows: list[tuple[str, float]] = []

    client = ClientCrypto()
    for k in keys:
        client.add_hop(k)
    rows.append(("client originate (3 hops, to hop 2)", _ns_per_call(lambda: client.originate(body, 2), n)))

    relay = RelayCrypto(keys[0])
    noise = os.urandom(509)
    rows.append(("relay decrypt_forward (not recognized)", _ns_per_call(lambda: relay.decrypt_forward(noise), n)))
    edge_client, edge_relay = ClientCrypto(), RelayCrypto(keys[1])
    edge_client.add_hop(keys[1])
    fwd_cells = iter([edge_client.originate(body, 0)[0] for _ in range(n + 1)])
    rows.append(
        ("relay decrypt_forward (recognized)", _ns_per_call(lambda: edge_relay.decrypt_forward(next(fwd_cells)), n))
    )
    rows.append(("relay encrypt_backward", _ns_per_call(lambda: relay.encrypt_backward(noise), n)))
    rows.append((CORE_BWD_ROW, _ns_per_call(lambda: relay.bwd_update(noise), n)))
    rows.append(("relay originate_backward", _ns_per_call(lambda: relay.originate_backward(body), n)))

    # Client inbound from the exit: prepare n cells in advance with a matching chain.
    relays = [RelayCrypto(k) for k in keys]
    inbound_client = ClientCrypto()
    for k in keys:
        inbound_client.add_hop(k)
    cells = []
    for _ in range(n + 1):
        cell, _ = relays[2].originate_backward(body)
        cells.append(relays[0].encrypt_backward(relays[1].encrypt_backward(cell)))
    it = iter(cells)
    rows.append(
        ("client decrypt_inbound (3 hops, from hop 2)", _ns_per_call(lambda: inbound_client.decrypt_inbound(next(it)), n))
    )
    run_client, relays = ClientCrypto(), [RelayCrypto(k) for k in keys]
    for k in keys:
        run_client.add_hop(k)
    cells = []
    for _ in range(n + RUN):
        cell, _ = relays[2].originate_backward(body)
        cells.append(memoryview(relays[0].encrypt_backward(relays[1].encrypt_backward(cell))))
    runs = iter([cells[i:i + RUN] for i in range(0, len(cells) - RUN + 1, RUN)])
    rows.append((RUN_ROW, _ns_per_call(lambda: run_client.decrypt_inbound_many(next(runs)), n // RUN) / RUN))

    b = X25519PrivateKey.generate()
    onion_key = b.public_key().public_bytes_raw()
    rid, ed_id = os.urandom(20), os.urandom(32)
    hs_n = max(50, n // 100)

    def ntor_once() -> None:
        c = NtorClient(rid, onion_key)
        reply, _ = ntor_server(c.onion_skin, rid, {onion_key: b})
        c.complete(reply)

    def ntor_v3_once() -> None:
        c = NtorV3Client(ed_id, onion_key, b"\x00")
        reply, _, _ = ntor_v3_server(c.onion_skin, ed_id, {onion_key: b}, b"\x00")
        c.complete(reply)

    rows.append(("ntor client+server handshake", _ns_per_call(ntor_once, hs_n)))
    rows.append(("ntor v3 client+server handshake", _ns_per_call(ntor_v3_once, hs_n)))

    n_cgo = max(200, n // 4)
    backends = _cgo_backends()
    by_backend = {name: _cgo_rows(n_cgo, crypt) for name, crypt in backends.items()}
    default = "native" if "native" in by_backend else "python"
    cgo_rows = by_backend[default]
    rows += [(f"CGO {name}", ns) for name, ns in cgo_rows]

    print(f"| operation ({n} tor1 cells, {n_cgo} CGO cells, {hs_n} handshakes) | CPU ns/op | µs/op |")
    print("|---|---:|---:|")
    for name, ns in rows:
        print(f"| {name} | {ns:,.0f} | {ns / 1000:.2f} |")
    print()
    tor1 = dict(rows)
    print(f"CGO backend in use (the CGO rows above): {cgo.CGO_BACKEND}")
    print(f"pure path: POLYVAL {cgo.POLYVAL_BACKEND}; XOR: {getattr(cgo, 'XOR_BACKEND', 'python')}")
    print()
    print("| per cell | tor1 µs | CGO µs | CGO / tor1 |")
    print("|---|---:|---:|---:|")
    for name, ns in cgo_rows:
        print(f"| {name} | {tor1[name] / 1000:.2f} | {ns / 1000:.2f} | {ns / tor1[name]:.1f}× |")
    if "native" in by_backend:
        print()
        print("| per cell | tor1 µs | CGO pure µs | CGO native µs | pure / native | native / tor1 |")
        print("|---|---:|---:|---:|---:|---:|")
        for (name, pure), (_, native) in zip(by_backend["python"], by_backend["native"]):
            print(f"| {name} | {tor1[name] / 1000:.2f} | {pure / 1000:.2f} | {native / 1000:.2f} "
                  f"| {pure / native:.1f}× | {native / tor1[name]:.1f}× |")
    else:
        print(f"\n(no native CGO backend to compare: {cgo.CGO_BACKEND})")
    return 0


def _cgo_backends() -> dict[str, type]:
    """The CGO direction classes to measure: the pure reference and, when built, the native one."""
    found: dict[str, type] = {"python": cgo.PureCgoCrypt}
    native = getattr(cgo, "NativeCgoCrypt", None)
    if native is not None:
        found["native"] = native
    return found


def _cgo_rows(n: int, crypt: type) -> list[tuple[str, float]]:
    """The tor1 cell rows again, with CGO (``onionp2p.proto.cgo``) and ``crypt`` as its
    direction class (pure or native); same names."""
    saved = cgo.CgoCrypt
    cgo.CgoCrypt = crypt  # what ClientCrypto / RelayCrypto make their hops of
    try:
        return _cgo_rows_now(n)
    finally:
        cgo.CgoCrypt = saved


def _cgo_rows_now(n: int) -> list[tuple[str, float]]:
    relay_cmd = cgo.CELL_RELAY
    keys = [os.urandom(cgo.KEY_MATERIAL_LEN) for _ in range(3)]
    body = bytes(cgo.RELAY_BODY_LEN)
    rows: list[tuple[str, float]] = []
    w = CGO_WARMUP

    client = cgo.ClientCrypto()
    for k in keys:
        client.add_hop(k)
    rows.append(("client originate (3 hops, to hop 2)",
                 _ns_per_call(lambda: client.originate(body, 2, cmd=relay_cmd), n, w)))

    relay = cgo.RelayCrypto(keys[0])
    noise = os.urandom(cgo.RELAY_BODY_LEN)
    rows.append(("relay decrypt_forward (not recognized)",
                 _ns_per_call(lambda: relay.decrypt_forward(noise, cmd=relay_cmd), n, w)))
    edge_client, edge_relay = cgo.ClientCrypto(), cgo.RelayCrypto(keys[1])
    edge_client.add_hop(keys[1])
    fwd_cells = iter([edge_client.originate(body, 0, cmd=relay_cmd)[0] for _ in range(n + w)])
    rows.append(("relay decrypt_forward (recognized)",
                 _ns_per_call(lambda: edge_relay.decrypt_forward(next(fwd_cells), cmd=relay_cmd), n, w)))
    rows.append(("relay encrypt_backward",
                 _ns_per_call(lambda: relay.encrypt_backward(noise, cmd=relay_cmd), n, w)))
    rows.append((CORE_BWD_ROW, _ns_per_call(lambda: relay.backward_relay(noise), n, w)))
    rows.append(("relay originate_backward",
                 _ns_per_call(lambda: relay.originate_backward(body, cmd=relay_cmd), n, w)))

    relays = [cgo.RelayCrypto(k) for k in keys]
    inbound_client = cgo.ClientCrypto()
    for k in keys:
        inbound_client.add_hop(k)
    cells = []
    for _ in range(n + w):
        cell, _ = relays[2].originate_backward(body, cmd=relay_cmd)
        cells.append(relays[0].encrypt_backward(relays[1].encrypt_backward(cell, cmd=relay_cmd), cmd=relay_cmd))
    it = iter(cells)
    rows.append(("client decrypt_inbound (3 hops, from hop 2)",
                 _ns_per_call(lambda: inbound_client.decrypt_inbound(next(it), cmd=relay_cmd), n, w)))
    # what a client circuit runs (hopcrypto.MixedClientCrypto): with the native backend one C
    # call for all layers of a run, with the pure one a Python loop over cells and hops
    run_client, relays = MixedClientCrypto(), [cgo.RelayCrypto(k) for k in keys]
    for k in keys:
        run_client.add_hop(k, "cgo")
    cells = []
    for _ in range(n + w * RUN):
        cell, _ = relays[2].originate_backward(body, cmd=relay_cmd)
        cells.append(memoryview(relays[0].encrypt_backward(relays[1].encrypt_backward(cell, cmd=relay_cmd),
                                                           cmd=relay_cmd)))
    runs = iter([cells[i:i + RUN] for i in range(0, len(cells) - RUN + 1, RUN)])
    rows.append((RUN_ROW, _ns_per_call(lambda: run_client.decrypt_inbound_many(next(runs)), n // RUN, w) / RUN))
    return rows


if __name__ == "__main__":
    sys.exit(main(sys.argv))
