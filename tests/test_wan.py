"""The wide-area emulator (onionp2p.ops.wan): delay both ways, bytes and EOF kept,
bounded buffering, and what a relay does behind it (or_advertise_port)."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from conftest import free_port, wait_for

from onionp2p.errors import ConfigError
from onionp2p.ops.wan import DelayProxy, Mapping, measure, parse_map


async def _echo_server():
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()  # half-close: EOF goes back through the proxy too
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_round_trip_is_twice_the_delay_and_bytes_and_eof_pass():
    server, port = await _echo_server()
    proxy = await DelayProxy(Mapping(free_port(), "127.0.0.1", port, 0.05)).start()
    try:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.mapping.listen_port)
        t0 = loop.time()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        rtt = loop.time() - t0
        assert 0.1 <= rtt < 0.5  # 50 ms each way
        blob = os.urandom(3_000_000)
        writer.write(blob)
        writer.write_eof()
        got = await reader.read()  # everything, then EOF from the far side
        assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
        writer.close()
        assert proxy.connections == 1 and proxy.bytes_forwarded >= 2 * len(blob)
    finally:
        await proxy.stop()
        server.close()


async def test_a_receiver_that_stops_reading_stops_the_sender():
    stalled = asyncio.Event()

    async def sink(reader, writer):
        await stalled.wait()  # reads nothing until told
        while await reader.read(1 << 20):
            pass
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    proxy = await DelayProxy(Mapping(free_port(), "127.0.0.1", server.sockets[0].getsockname()[1], 0.01),
                             limit=1 << 20).start()
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.mapping.listen_port)
        chunk = b"\0" * 65536
        sent = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3):
                while True:
                    writer.write(chunk)
                    await writer.drain()  # blocks once the proxy stops reading
                    sent += len(chunk)
        # held: the kernel's buffers on both sides plus the proxy's bounded queue, not all
        assert sent < 64 * 1024 * 1024
        stalled.set()
        writer.close()
    finally:
        await proxy.stop()
        server.close()


async def test_unreachable_target_closes_the_connection():
    proxy = await DelayProxy(Mapping(free_port(), "127.0.0.1", free_port(), 0.0)).start()
    try:
        reader, _writer = await asyncio.open_connection("127.0.0.1", proxy.mapping.listen_port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        await proxy.stop()


def test_map_syntax():
    assert parse_map("9000:127.0.0.1:9001:25") == Mapping(9000, "127.0.0.1", 9001, 0.025)
    for bad in ("9000:x:1", "a:b:c:d", "0:h:1:1", "1:h:1:-5", "1:h:70000:1"):
        with pytest.raises(ConfigError):
            parse_map(bad)


async def test_measure_reports_the_emulators_own_rtt_and_ceiling():
    m = await measure(0.02, nbytes=16 * 1024 * 1024, pings=5)
    assert 0.04 <= m["rtt_p50_s"] < 0.2 and m["rtt_expected_s"] == 0.04
    assert m["throughput_bytes_per_s"] > 10_000_000


async def test_a_relay_behind_the_emulator_advertises_the_proxys_port(tmp_path, http_server):
    """or_advertise_port: the relay listens on one port, its info and descriptor name the
    proxy's, and circuits built to the advertised ports work through the delay."""
    from conftest import LOOPBACK_EXIT, blob, http_get, relay_config, sha256

    from onionp2p.client.client import OnionClient
    from onionp2p.proto.exitpolicy import ExitPolicy
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    relays, proxies = [], []
    try:
        for i in range(3):
            listen, advertise = free_port(), free_port()
            proxies.append(await DelayProxy(Mapping(advertise, "127.0.0.1", listen, 0.02)).start())
            r = Relay(RelayKeys.load_or_create(tmp_path / f"r{i}"), relay_config(
                tmp_path / f"r{i}", nickname=f"r{i}", or_address=("127.0.0.1", listen), or_advertise_port=advertise,
                exit_policy=ExitPolicy.parse(LOOPBACK_EXIT, reject_private=False), exit_reject_private=False,
                extend_allow_private=True))
            await r.start()
            relays.append(r)
            assert r.port == listen and r.info().or_port == advertise
        client = OnionClient()
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            circ = await client.build_circuit([r.info() for r in relays])
            assert loop.time() - t0 >= 0.2  # three hops, each at least one delayed round trip
            reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
            assert sha256(await http_get(reader, writer, "/1000000")) == sha256(blob(1_000_000))
            assert all(p.connections >= 1 for p in proxies)  # every link went through its proxy
        finally:
            await client.close()
    finally:
        for r in relays:
            await r.stop()
        for p in proxies:
            await p.stop()
        await wait_for(lambda: True)
