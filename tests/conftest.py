"""Shared fixtures: a local HTTP server and in-process relays on real TLS sockets."""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path

import pytest

from onionp2p.proto.exitpolicy import ExitPolicy

_BLOBS: dict[int, bytes] = {}


def blob(n: int) -> bytes:
    """Deterministic pseudo-random content of n bytes."""
    if n not in _BLOBS:
        _BLOBS[n] = random.Random(n).randbytes(n)
    return _BLOBS[n]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


async def wait_for(pred, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    """Poll ``pred()`` until it is true (returns its value) or fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not (value := pred()):
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
    return value


class HttpServer:
    """A tiny HTTP/1.0 server on 127.0.0.1: ``GET /<n>`` answers n deterministic bytes;
    ``GET /echo`` echoes the request body until EOF; ``GET /hold`` sends 20 MB as fast as
    the peer reads (for back-pressure tests)."""

    def __init__(self):
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.connections = 0
        self.peers: list[str] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.peers.append(writer.get_extra_info("peername")[0])
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            if path == "/echo":
                writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
                while chunk := await reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()
            else:
                n = 20_000_000 if path == "/hold" else int(path.lstrip("/"))
                body = blob(n)
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                view = memoryview(body)
                for i in range(0, n, 1 << 16):
                    writer.write(view[i : i + (1 << 16)])
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
        finally:
            writer.close()

    async def start(self) -> HttpServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server:
            self.server.close()


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    """Send GET and return the body (reads to EOF)."""
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read(-1)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:100]
    return body


@pytest.fixture
async def http_server():
    srv = await HttpServer().start()
    yield srv
    await srv.stop()


LOOPBACK_EXIT = "accept 127.0.0.1:*\nreject *:*"


def relay_config(data_dir, **kw):
    """The config of an in-process relay: ``data_dir``, 127.0.0.1 on any free port, and
    ``kw`` as :class:`~onionp2p.config.RelayConfig` fields."""
    from onionp2p.config import RelayConfig

    kw.setdefault("or_address", ("127.0.0.1", 0))
    return RelayConfig(data_dir=Path(data_dir), **kw)


@pytest.fixture
async def relay_net(tmp_path):
    """Three in-process relays (all exits for 127.0.0.1) on real TLS listeners."""
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    relays = []
    for i in range(3):
        keys = RelayKeys.load_or_create(tmp_path / f"r{i}" / "keys")
        relay = Relay(keys, relay_config(tmp_path / f"r{i}", exit_reject_private=False, nickname=f"r{i}", exit_policy=ExitPolicy.parse(LOOPBACK_EXIT, reject_private=False), extend_allow_private=True))
        await relay.start()
        relays.append(relay)
    yield relays
    for relay in relays:
        await relay.stop()
