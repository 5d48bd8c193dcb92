"""Real `onionp2p relay` processes on 127.0.0.1 carrying a client's 3-hop circuit."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import blob, http_get, sha256

from onionp2p.client.client import OnionClient
from onionp2p.proto.directory import RelayInfo

pytestmark = pytest.mark.slow


class RelayProc:
    def __init__(self, tmp: Path, name: str, *, exit_policy: str | None = None):
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        self.name = name
        policy = exit_policy or "reject *:*"
        (self.dir / "relay.toml").write_text(
            f'nickname = "{name}"\n'
            f'data_dir = "."\n'
            f'or_address = "127.0.0.1:0"\n'
            f'exit_policy = {json.dumps(policy)}\n'
            f"exit_reject_private = false\n"
            f"extend_allow_private = true\n"
            f'log_format = "json"\n'
            f'log_level = "info"\n'
        )
        self.log = open(self.dir / "log.txt", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onionp2p", "relay", "--config", str(self.dir / "relay.toml")],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def info(self, timeout: float = 30) -> RelayInfo:
        end = time.time() + timeout
        path = self.dir / "relay-info.json"
        while time.time() < end:
            if path.exists():
                return RelayInfo.load(path)
            if self.proc.poll() is not None:
                raise AssertionError(f"relay {self.name} exited: {self.logtext()}")
            time.sleep(0.05)
        raise AssertionError(f"relay {self.name} did not start: {self.logtext()}")

    def logtext(self) -> str:
        return (self.dir / "log.txt").read_text()

    def log_events(self) -> list[dict]:
        out = []
        for line in self.logtext().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    async def status(self) -> dict:
        """SIGUSR1 makes the relay log a status line; return the newest one."""
        before = len([e for e in self.log_events() if e.get("event") == "relay status"])
        self.proc.send_signal(signal.SIGUSR1)
        for _ in range(200):
            events = [e for e in self.log_events() if e.get("event") == "relay status"]
            if len(events) > before:
                return events[-1]
            await asyncio.sleep(0.02)
        raise AssertionError("no status line")

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()


@pytest.fixture
def procs(tmp_path):
    started: list[RelayProc] = []

    def start(name, **kw):
        p = RelayProc(tmp_path, name, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


async def test_fifty_megabytes_through_three_relay_processes(procs, http_server):
    rs = [procs("guard"), procs("middle"), procs("exit", exit_policy="accept 127.0.0.1:*")]
    infos = [r.info() for r in rs]
    client = OnionClient()
    try:
        circ = await client.build_circuit(infos)
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        body = await http_get(reader, writer, "/50000000")
        assert len(body) == 50_000_000
        assert sha256(body) == sha256(blob(50_000_000))
        # the destination saw the exit's connection, not ours: all from loopback anyway, but
        # exactly one connection was made, by the exit
        assert http_server.connections == 1
        # 100 concurrent streams over 10 circuits through the same processes
        circuits = await asyncio.gather(*(client.build_circuit(infos) for _ in range(10)))

        async def fetch(i):
            r, w = await circuits[i % 10].open_stream("127.0.0.1", http_server.port)
            n = 10_000 + 1009 * i
            return await http_get(r, w, f"/{n}") == blob(n)

        assert all(await asyncio.gather(*(fetch(i) for i in range(100))))
        assert (await rs[1].status())["circuits"] == 11
    finally:
        await client.close()
    for r in rs:
        assert r.stop() == 0  # clean shutdown on SIGTERM
        text = r.logtext()
        assert "Traceback" not in text
        assert str(http_server.port) not in text  # destinations are scrubbed by default


async def test_relay_killed_mid_transfer(procs, http_server):
    rs = [procs("g"), procs("m"), procs("x", exit_policy="accept 127.0.0.1:*")]
    infos = [r.info() for r in rs]
    client = OnionClient()
    try:
        circ = await client.build_circuit(infos)
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        writer.write(b"GET /hold HTTP/1.0\r\n\r\n")
        await reader.readexactly(200_000)
        assert (await rs[0].status())["circuits"] == 1
        assert (await rs[2].status())["circuits"] == 1
        rs[1].proc.kill()  # the middle relay dies mid-transfer
        t0 = time.monotonic()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(15):
                while await reader.read(65536):
                    pass
        assert time.monotonic() - t0 < 15
        assert circ.state == "closed"
        # the survivors free the circuit (and the exit its stream)
        for r in (rs[0], rs[2]):
            for _ in range(100):
                st = await r.status()
                if st["circuits"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert st["circuits"] == 0 and st["streams"] == 0
    finally:
        await client.close()
    assert rs[0].stop(signal.SIGINT) == 0
    assert rs[2].stop() == 0


async def test_bad_config_is_a_clear_error(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('nickname = "way-too-long-and-bad!"\n')
    p = subprocess.run([sys.executable, "-m", "onionp2p", "relay", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "nickname" in p.stderr and "Traceback" not in p.stderr


