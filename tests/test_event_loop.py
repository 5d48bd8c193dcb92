"""ONIONP2P_EVENT_LOOP: an onionp2p network on uvloop (onionp2p/cli.py ``_event_loop``).

The default (``auto``) is uvloop when it can be imported (a dependency of onionp2p except
on Windows), so the suite's node processes run on it. A testnet started with ``ONIONP2P_EVENT_LOOP=uvloop``
runs its client, relays and authority on uvloop (each logs the class of its running loop),
carries a 5 MB download and a second one on a circuit of its own, sha256 equal, and answers
on its control port; ``asyncio`` and ``auto`` without uvloop run asyncio; a bad value, or
uvloop asked for where it is not installed, is one line and exit status 2.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HttpServer, RunningTestnet, blob, free_port, http_get, unavailable

pytestmark = pytest.mark.slow


def _need_uvloop() -> None:
    """uvloop is a dependency; a missing one fails under CI=true, skips elsewhere."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        unavailable("uvloop is not installed (pip install -e .)")


def _uses_uvloop(pid: int) -> bool:
    """Whether uvloop's compiled loop is loaded in process ``pid`` (its shared object is mapped)."""
    return any("uvloop/loop" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


async def _get(socks_port: int, http_port: int, path: str, user: str) -> bytes:
    from python_socks.async_.asyncio import Proxy

    proxy = Proxy.from_url(f"socks5://{user}:x@127.0.0.1:{socks_port}")
    sock = await proxy.connect("127.0.0.1", http_port, timeout=60)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        return await http_get(reader, writer, path)
    finally:
        writer.close()


async def test_a_testnet_on_uvloop_carries_traffic_in_every_process(tmp_path):
    _need_uvloop()
    www = await HttpServer().start()
    net = await asyncio.to_thread(RunningTestnet, tmp_path / "net",
                                  ("--relays", "3", "--exits", "1", "--log-level", "debug"),
                                  {"ONIONP2P_EVENT_LOOP": "uvloop"})
    try:
        procs = [net.proc.pid, *net.children()]
        assert len(procs) >= 5  # the testnet (its client), an authority, three relays
        assert all(_uses_uvloop(pid) for pid in procs), [pid for pid in procs if not _uses_uvloop(pid)]
        # and it is the loop that runs (the class of the running loop, logged at debug)
        logs = [Path(net.out.name), *sorted((tmp_path / "net").glob("*/log.txt"))]
        assert len(logs) == 5
        for log in logs:
            lines = [ln for ln in log.read_text().splitlines() if "event loop" in ln]
            assert len(lines) == 1 and "event_loop=uvloop" in lines[0], (log, lines)
        for user in ("first", "second"):  # two circuits (SOCKS isolation)
            body = await _get(net.socks, www.port, "/5000000", user)
            assert hashlib.sha256(body).digest() == hashlib.sha256(blob(5_000_000)).digest()
        from stem.control import Controller

        with Controller.from_port(port=net.control) as ctl:
            ctl.authenticate(chroot_path=None)
            built = [c for c in ctl.get_circuits() if c.status == "BUILT"]
            assert len(built) >= 2
    finally:
        assert await asyncio.to_thread(net.stop) == 0
        await www.stop()


def test_the_default_is_uvloop_when_installed_else_asyncio_and_bad_values_exit_2(tmp_path):
    """Without the variable (``auto``) a relay runs uvloop when it is installed and asyncio
    when it cannot be imported; ``asyncio`` does not load uvloop at all; ``uvloop`` without
    it, or a bad value, is one line and exit status 2."""
    _need_uvloop()
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\nor_address = "127.0.0.1:0"\nnickname = "looper"\n'
                   f'assume_reachable = true\nlog_level = "debug"\nauthorities = ["auth0 127.0.0.1:{free_port()} {"A" * 43}"]\n')
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "uvloop.py").write_text("raise ImportError('uvloop hidden by the test')\n")
    base = {k: v for k, v in os.environ.items() if k != "ONIONP2P_EVENT_LOOP"}

    def start(env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "onionp2p", "relay", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**base, **env})

    for env, loaded in (({}, True), ({"PYTHONPATH": str(hide)}, False), ({"ONIONP2P_EVENT_LOOP": "asyncio"}, False),
                        ({"ONIONP2P_EVENT_LOOP": "auto"}, True), ({"ONIONP2P_EVENT_LOOP": "uvloop"}, True)):
        proc = start(env)
        try:
            line = ""
            while "event loop" not in line:  # the relay's first log line names its loop
                line = proc.stdout.readline()
                assert line, f"relay exited ({proc.wait()}) before naming its event loop"
            assert f"event_loop={'uvloop' if loaded else 'asyncio'}" in line, line
            assert _uses_uvloop(proc.pid) is loaded, env
        finally:
            proc.terminate()
            proc.wait(20)
            proc.stdout.close()

    for env, message in (({"ONIONP2P_EVENT_LOOP": "twisted"},
                          "onionp2p: error: ONIONP2P_EVENT_LOOP='twisted': must be asyncio, uvloop or auto"),
                         ({"ONIONP2P_EVENT_LOOP": "uvloop", "PYTHONPATH": str(hide)},
                          ("onionp2p: error: ONIONP2P_EVENT_LOOP=uvloop, but uvloop is not installed "
                           "(pip install uvloop)"))):
        proc = start(env)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2 and out.strip().splitlines() == [message], out
