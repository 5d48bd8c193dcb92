"""Leaks: of resources (file descriptors, tasks) and of secrets (keys, cookie, client data).

Resources: circuits and streams come and go, file descriptors and tasks do not pile up.

Each test starts in-process relays (real TLS sockets on 127.0.0.1), warms them up once
(so lazily created loop internals — the resolver's executor, SSL contexts, relay-to-relay
channels — exist), closes every channel, and records a baseline: the open file
descriptors of this process (``/proc/self/fd``), the asyncio tasks, and the live
protocol objects (channels, circuits, streams, exit connections). Then it churns:
dozens of circuits and hundreds of streams, plus the failures that tend to leak — refused streams,
refused and failed circuits, a relay process killed mid-stream, a peer that stops
reading, handshakes that stall, DoS refusals. At the end every client is closed and
the relays drop their remaining channels; then the counts must come back to the
baseline *exactly* (the tolerance is zero: the warm-up already created whatever is
created lazily). A failure prints what is left over.

Secrets (the end of the file): key files with loose permissions stop ``onionp2p relay``;
real runs at debug level — a relay process, and an in-process client node with SOCKS
credentials and control-port cookie authentication — are grepped for key material,
cookie bytes, client addresses and destinations; every listener is on 127.0.0.1 unless
configured otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Net, blob, channel_from, http_get, open_fds, relay_config, settle, start_relay_process
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from onionp2p.client.client import OnionClient
from onionp2p.errors import CircuitError, StreamError
from onionp2p.net import tls
from onionp2p.proto.cells import CellCommand, Create2
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.relaycell import EndReason, RelayCommand
from onionp2p.relay.keys import KEY_FILES, RelayKeys
from onionp2p.relay.relay import Relay

# measuring (open_fds, Snapshot, settle, relay_busy) and Net: in conftest.py, shared with test_faults.py


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
async def net(tmp_path, http_server):
    n = Net(tmp_path, http_server.port)
    yield n
    for relay in n.relays:
        await relay.stop()


# -- scenarios --------------------------------------------------------------------------------


async def many_circuits_and_streams(net: Net) -> None:
    client = OnionClient()
    try:
        circs = await asyncio.gather(*(client.build_circuit(net.path()) for _ in range(10)))

        async def fetch(i: int) -> None:
            r, w = await circs[i % 10].open_stream("127.0.0.1", net.http_port)
            n = 1000 + 37 * i
            assert await http_get(r, w, f"/{n}") == blob(n)
            w.close()

        for _ in range(3):
            await asyncio.gather(*(fetch(i) for i in range(50)))
        for c in circs[:5]:
            c.close()  # the rest go with client.close()
    finally:
        await client.close()


async def refused_streams(net: Net) -> None:
    client = OnionClient()
    try:
        circ = await client.build_circuit(net.path())
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        for host, port, reason in (("127.0.0.2", net.http_port, EndReason.EXITPOLICY),
                                   ("127.0.0.1", dead_port, EndReason.CONNECTREFUSED),
                                   ("bad..name", 80, EndReason.RESOLVEFAILED)):
            for _ in range(5):
                with pytest.raises(StreamError) as e:
                    await circ.open_stream(host, port)
                assert e.value.reason == reason
        # over max_streams_per_circuit (4 here)
        held = [await circ.open_stream("127.0.0.1", net.http_port) for _ in range(4)]
        for _r, w in held:
            w.write(b"GET /echo HTTP/1.0\r\n\r\n")
        with pytest.raises(StreamError) as e:
            await circ.open_stream("127.0.0.1", net.http_port)
        assert e.value.reason == EndReason.RESOURCELIMIT
        # streams ended from our side mid-transfer: END, abort, and the circuit destroyed
        held[0][1].close()
        held[1][1].transport.abort()
        held[2][1].write(b"x" * 100_000)
        circ.close()
        # a stream the client gives up on before CONNECTED (the exit is still connecting)
        circ2 = await client.build_circuit(net.path())
        with pytest.raises(StreamError):
            await circ2.open_stream("127.0.0.1", net.http_port, timeout=0.0001)
    finally:
        await client.close()


async def refused_and_failed_circuits(net: Net) -> None:
    client = OnionClient()
    try:
        # a bad onion skin: DESTROY(PROTOCOL) from the first hop
        chan = await client.channel_to(net.relays[0].info())
        for _ in range(5):
            chan.send_cell(chan.new_circ_id(), CellCommand.CREATE2, Create2(2, os.urandom(84)).encode())
        # EXTEND2 to a port nothing listens on, and to the wrong identity
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        nowhere = RelayInfo("gone", "127.0.0.1", s.getsockname()[1], os.urandom(20), os.urandom(32),
                            os.urandom(32))
        s.close()
        r1, r2 = net.relays[1].info(), net.relays[2].info()
        forged = RelayInfo("forged", r1.address, r1.or_port, r2.rsa_id, r2.ed_id, r1.ntor_key)
        for path in ([net.relays[0].info(), nowhere], [net.relays[0].info(), forged]):
            for _ in range(3):
                with pytest.raises(CircuitError):
                    await client.build_circuit(path, timeout=20)
        # TRUNCATE at the first hop
        circ = await client.build_circuit(net.path())
        circ.send_relay(RelayCommand.TRUNCATE, 0, b"", hop=0)
        # the first hop itself unreachable
        other = OnionClient()
        with pytest.raises(CircuitError):
            await other.build_circuit([nowhere], timeout=5)
        await other.close()
        # a protocol violation (DATA on stream 0) kills a circuit with a stream at the exit
        circ = await client.build_circuit(net.path())
        _r, w = await circ.open_stream("127.0.0.1", net.http_port)
        w.write(b"GET /echo HTTP/1.0\r\n\r\n")
        circ.send_relay(RelayCommand.DATA, 0, b"x" * circ.core.layers[-1].data_max)
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while circ.state != "closed":
            assert loop.time() < end
            await asyncio.sleep(0.02)
    finally:
        await client.close()


async def peer_stops_reading(net: Net) -> None:
    """A client downloads on several circuits, stops reading its channel, then vanishes."""
    client = OnionClient()
    try:
        circs = [await client.build_circuit(net.path()) for _ in range(4)]
        writers = []
        for circ in circs:
            for _ in range(2):
                _r, w = await circ.open_stream("127.0.0.1", net.http_port)
                writers.append(w)
        chan = circs[0].chan
        chan.pause_reading()
        for w in writers:
            w.write(b"GET /hold HTTP/1.0\r\n\r\n")
        guard = net.relays[0]
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        # until the guard holds queued cells for it (the socket buffers are full)
        while not any(ch.queued_cells() for ch in guard.channels) and not guard.stats["destroyed"]:
            assert loop.time() < end, "the guard never had to queue"
            await asyncio.sleep(0.05)
        chan.abort()  # the peer disappears without reading
    finally:
        await client.close()


async def stalled_handshakes_and_dos_refusals(net: Net) -> None:
    relay = net.relays[0]
    conns = []
    for _ in range(3):  # TCP only, TLS without VERSIONS, VERSIONS and half a cell
        conns.append(await asyncio.open_connection(relay.address, relay.port, local_addr=("127.0.0.2", 0)))
        conns.append(await asyncio.open_connection(relay.address, relay.port, ssl=tls.client_context(),
                                                   local_addr=("127.0.0.2", 0)))
        r, w = await asyncio.open_connection(relay.address, relay.port, ssl=tls.client_context(),
                                             local_addr=("127.0.0.2", 0))
        w.write(b"\x00\x00\x07\x00\x02\x00\x04" + bytes.fromhex("00000000 81 0100"))
        conns.append((r, w))
    # over the per-address limit (6 here): hung up on
    for _ in range(3):
        r, w = await asyncio.open_connection(relay.address, relay.port, ssl=tls.client_context(),
                                             local_addr=("127.0.0.2", 0))
        conns.append((r, w))
    # CREATE2 over the rate limit from a client address (burst 10 here)
    client = OnionClient()
    try:
        for r, _w in conns:  # all of them are dropped: refused, or the 1 s handshake timeout
            try:
                await asyncio.wait_for(r.read(), 10)
            except ConnectionError:
                pass
        for _r, w in conns:
            w.close()
        refused = 0
        for _ in range(15):
            try:
                await client.build_circuit(net.path(0))
            except CircuitError as exc:
                assert exc.reason == "RESOURCELIMIT"
                refused += 1
        assert refused >= 5
    finally:
        await client.close()


async def oom_kills(net: Net) -> None:
    """Circuits destroyed by the queue-memory limit at the guard, then the client leaves."""
    guard = net.relays[0]
    before = guard.stats["oom_circuits_killed"]
    client = OnionClient(congestion_control=False)  # fixed windows: 1000 cells each, the worst case
    try:
        loop = asyncio.get_running_loop()
        chan = await channel_from(client, guard.info(), rcvbuf=4096)
        circs = [await client.build_circuit(net.path(0, 2)) for _ in range(16)]
        writers = []
        for circ in circs:
            for _ in range(2):
                writers.append((await circ.open_stream("127.0.0.1", net.http_port))[1])
        chan.pause_reading()
        for w in writers:
            w.write(b"GET /hold HTTP/1.0\r\n\r\n")
        end = loop.time() + 30
        while guard.stats["oom_circuits_killed"] == before:
            assert loop.time() < end, "the memory limit never acted"
            await asyncio.sleep(0.05)
        chan.resume_reading()
        await asyncio.sleep(0.2)
    finally:
        await client.close()


async def relay_killed_mid_stream(net: Net) -> None:
    """The middle relay is a real process; it is SIGKILLed while a download runs through it."""
    d = net.tmp / f"proc{len(list(net.tmp.glob('proc*')))}"
    d.mkdir()
    (d / "relay.toml").write_text(
        'nickname = "victim"\ndata_dir = "."\nor_address = "127.0.0.1:0"\nextend_allow_private = true\n')
    proc = start_relay_process(d)
    client = OnionClient()
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while not (d / "relay-info.json").exists():
            assert proc.poll() is None and loop.time() < end, (d / "log.txt").read_text()
            await asyncio.sleep(0.05)
        victim = RelayInfo.load(d / "relay-info.json")
        circs = [await client.build_circuit([net.relays[0].info(), victim, net.relays[2].info()])
                 for _ in range(3)]
        readers = []
        for circ in circs:
            r, w = await circ.open_stream("127.0.0.1", net.http_port)
            w.write(b"GET /hold HTTP/1.0\r\n\r\n")
            await r.readexactly(100_000)
            readers.append((r, w))  # a StreamWriter that is garbage-collected closes its stream
        proc.send_signal(signal.SIGKILL)
        for r, _w in readers:
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                async with asyncio.timeout(15):
                    while await r.read(65536):
                        pass
        assert all(c.state == "closed" for c in circs)
    finally:
        await client.close()
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait)


# -- tests -----------------------------------------------------------------------------------

LIMITS = dict(handshake_timeout=1.0, dos_max_concurrent_connections=6,
              guard=dict(max_mem_in_queues=1 << 20))  # the exit buffers more than that in oom_kills
STREAM_LIMITS = dict(LIMITS, max_streams_per_circuit=4)
#: few CREATE2 tokens for 127.0.0.1: the warm-up takes one, the scenario needs the rest refused
DOS_LIMITS = dict(LIMITS, dos_circuit_creation_rate=0.01, dos_circuit_creation_burst=10)


@pytest.mark.parametrize(("scenario", "limits", "rounds"), [
    (many_circuits_and_streams, LIMITS, 2),
    (refused_streams, STREAM_LIMITS, 2),
    (refused_and_failed_circuits, LIMITS, 2),
    (peer_stops_reading, LIMITS, 2),
    (oom_kills, LIMITS, 2),
    (relay_killed_mid_stream, LIMITS, 2),
    (stalled_handshakes_and_dos_refusals, DOS_LIMITS, 1),
], ids=lambda v: v.__name__ if callable(v) else "")
async def test_scenario_returns_to_baseline(net, scenario, limits, rounds):
    await net.start(**limits)
    base = await net.warm_up()
    for _ in range(rounds):  # a second round shows nothing grows per round
        await scenario(net)
        await settle(net.relays, base)


async def test_exit_frees_sockets_of_destinations_that_never_read(net):
    await net.start(2)
    held: list[asyncio.StreamWriter] = []

    async def never_read(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    sink = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = sink.sockets[0].getsockname()[1]
    client = OnionClient()
    try:
        circ = await client.build_circuit(net.path(0, 1))
        base = len(open_fds())
        streams = [await circ.open_stream("127.0.0.1", port) for _ in range(2)]
        for _r, w in streams:
            w.write(blob(12_000_000))  # more than the socket buffers take
        exit_circ = next(iter(net.relays[1].circuits))
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while not all(c.write_paused for c in exit_circ.conns.values()) or len(held) < 2:
            assert loop.time() < end, "the exit never had to buffer"
            await asyncio.sleep(0.05)
        circ.close()  # DESTROY: the exit has nobody left to deliver those bytes for
        end = loop.time() + 3
        while len(open_fds()) > base + len(held):  # only the destination's own sockets remain
            assert loop.time() < end, f"{len(open_fds()) - base - len(held)} exit sockets still open"
            await asyncio.sleep(0.05)
    finally:
        await client.close()
        for w in held:
            w.close()
        sink.close()


# -- secrets ----------------------------------------------------------------------------------


def secret_strings(keys_dir: Path) -> dict[str, str]:
    """Every form in which a relay's secret keys could show up in a log."""
    out = {}
    for name, (fname, secret) in KEY_FILES.items():
        path = keys_dir / fname
        if not secret or not path.exists():
            continue
        pem = path.read_bytes()
        body = "".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))
        out[f"{name} PEM body"] = body[:48]
        key = serialization.load_pem_private_key(pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            d = key.private_numbers().d
            raw = d.to_bytes((d.bit_length() + 7) // 8, "big")
        else:
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        out.update(byte_forms(name, raw))
    return out


def byte_forms(name: str, raw: bytes) -> dict[str, str]:
    return {f"{name} hex": raw.hex()[:32], f"{name} HEX": raw.hex().upper()[:32],
            f"{name} base64": base64.b64encode(raw).decode()[:24],
            f"{name} urlsafe base64": base64.urlsafe_b64encode(raw).decode()[:24],
            f"{name} repr": repr(raw)[2:30]}


def listening_addresses(pid: int | str = "self") -> list[str]:
    """Local addresses of the TCP sockets process ``pid`` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            packed = bytes.fromhex(fields[1].split(":")[0])
            # /proc prints each 32-bit word in host (little-endian) order
            packed = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
            found.append(socket.inet_ntop(family, packed))
    return found


@pytest.mark.parametrize("secret", ["ed25519_master_id_secret_key.pem", "secret_onion_key_ntor.pem",
                                    "secret_id_key.pem"])
@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_relay_cli_refuses_readable_key_files(tmp_path, secret, mode):
    RelayKeys.load_or_create(tmp_path / "keys")
    (tmp_path / "keys" / secret).chmod(mode)
    (tmp_path / "relay.toml").write_text('data_dir = "."\nor_address = "127.0.0.1:0"\n')
    p = subprocess.run([sys.executable, "-m", "onionp2p", "relay", "--config", str(tmp_path / "relay.toml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert secret in p.stderr and "chmod 600" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "relay-info.json").exists()


@pytest.mark.parametrize("safe", [True, False], ids=["safe_logging", "unsafe_logging"])
async def test_relay_process_logs_no_secrets_or_client_data(tmp_path, http_server, safe):
    d = tmp_path / "relay"
    d.mkdir()
    (d / "relay.toml").write_text(
        'nickname = "secretive"\ndata_dir = "."\nor_address = "0"\n'  # port only: the default host
        'exit_policy = "accept 127.0.0.1:*"\nexit_reject_private = false\n'
        'log_level = "debug"\nlog_format = "json"\ndos_max_concurrent_connections = 1\n')
    proc = start_relay_process(d, *([] if safe else ["--unsafe-logging"]))
    client = OnionClient()
    guard = None
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while not (d / "relay-info.json").exists():
            assert proc.poll() is None and loop.time() < end, (d / "log.txt").read_text()
            await asyncio.sleep(0.05)
        info = RelayInfo.load(d / "relay-info.json")
        assert listening_addresses(proc.pid) == ["127.0.0.1"]
        # a client at 127.0.0.2: a stream to a name, a refused one, a lookup (through a
        # guard: exits serve streams only to circuits from relays), a bad CREATE2
        guard = Relay(RelayKeys.load_or_create(tmp_path / "guard"), relay_config(tmp_path / "guard", nickname="guard", extend_allow_private=True))
        await guard.start()
        chan = await channel_from(client, info, "127.0.0.2")
        circ = await client.build_circuit([guard.info(), info])
        r, w = await circ.open_stream("localhost", http_server.port)
        assert await http_get(r, w, "/5000") == blob(5000)
        with pytest.raises(StreamError):
            await circ.open_stream("127.0.0.3", http_server.port)
        await circ.resolve("localhost")
        chan.send_cell(chan.new_circ_id(), CellCommand.CREATE2, Create2(2, os.urandom(84)).encode())
        # a second connection from that address: over the limit of 1, refused and logged
        _r2, w2 = await asyncio.open_connection(info.address, info.or_port, ssl=tls.client_context(),
                                                local_addr=("127.0.0.2", 0))
        await asyncio.wait_for(_r2.read(), 10)
        w2.close()
        circ.close()
    finally:
        await client.close()
        if guard is not None:
            await guard.stop()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    text = (d / "log.txt").read_text()
    assert "Traceback" not in text
    for what, needle in secret_strings(d / "keys").items():
        assert needle not in text, f"{what} in the relay's log"
    client_data = ("127.0.0.2", "127.0.0.3", "localhost")
    if safe:
        for needle in client_data:
            assert needle not in text, f"{needle} in the relay's log"
        assert "[scrubbed]" in text
    else:  # the same run shows them when asked to: the check above is not vacuous
        assert all(needle in text for needle in client_data)


@pytest.mark.parametrize("safe", [True, False], ids=["safe_logging", "unsafe_logging"])
async def test_client_node_logs_no_cookie_or_socks_credentials(tmp_path, http_server, safe):
    from onionp2p.client.node import ClientNode
    from onionp2p.config import ClientConfig
    from onionp2p.log import configure_logging, reset_logging
    from onionp2p.proto.directory import RouterStatus

    net = Net(tmp_path, http_server.port)
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf, safe_logging=safe)
    node = None
    try:
        await net.start(3, policy="accept *:*")  # the client wants exits for ports 80, 443
        flags = frozenset({"Exit", "Fast", "Guard", "Running", "Stable", "Valid"})
        statuses = [RouterStatus(r.info(), flags, bandwidth=1000) for r in net.relays]
        cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=tmp_path / "client", socks_address=("127.0.0.1", 0), control_port=0,
                           enforce_distinct_subnets=False, preemptive_circuits=1)
        node = ClientNode(cfg, routers=lambda: statuses)
        await node.start(ready_timeout=30)
        cookie_path = tmp_path / "client" / "control_auth_cookie"
        assert (cookie_path.stat().st_mode & 0o777) == 0o600
        cookie = cookie_path.read_bytes()
        # control port: a wrong cookie, then the right one
        for guess, ok in ((bytes(32), False), (cookie, True)):
            r, w = await asyncio.open_connection("127.0.0.1", node.control_port)
            w.write(b"AUTHENTICATE " + guess.hex().encode() + b"\r\n")
            reply = await asyncio.wait_for(r.readline(), 10)
            assert reply.startswith(b"250") == ok, reply
            w.close()
        # SOCKS5 with a username and password (isolation credentials) to a name
        r, w = await asyncio.open_connection("127.0.0.1", node.socks_port)
        w.write(b"\x05\x01\x02")
        assert await r.readexactly(2) == b"\x05\x02"
        w.write(b"\x01\x05alice\x0bs3cretpassw")
        assert await r.readexactly(2) == b"\x01\x00"
        name = b"localhost"
        w.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + http_server.port.to_bytes(2, "big"))
        reply = await asyncio.wait_for(r.readexactly(10), 30)
        assert reply[1] == 0, reply
        assert await http_get(r, w, "/4000") == blob(4000)
        w.close()
        # every listener of this process (relays, SOCKS, control, the test's HTTP server)
        assert set(listening_addresses()) == {"127.0.0.1"}
    finally:
        if node is not None:
            await node.stop()
        for relay in net.relays:
            await relay.stop()
        reset_logging()
    text = buf.getvalue()
    assert "control port listening" in text  # the run did log
    # never, whatever safe_logging says
    forms = {**byte_forms("cookie", cookie), "SOCKS password": "s3cretpassw"}
    for relay in net.relays:
        forms.update(secret_strings(relay.keys.keys_dir))
    for what, needle in forms.items():
        assert needle not in text, f"{what} in the log"
    if safe:
        assert "alice" not in text and "localhost" not in text and "[scrubbed]" in text
    else:  # the destination shows when asked to: the check above is not vacuous
        assert "localhost" in text
