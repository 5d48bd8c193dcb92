"""Deploying a node as an operator would (issue 17, sections 2 and 6), with real processes:
``log_file`` reopened on SIGHUP/SIGUSR1 (logrotate), directory failures at warning,
``--verify-config`` / ``--dump-config``, the client's SIGHUP reload, the sample configs and
the systemd unit in docs/examples, and the package as ``pip`` builds it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from onionp2p.config import load_authority_config, load_client_config, load_relay_config
from onionp2p.dir.authority import AUTHORITY_KEY_FILE

from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
#: a valid authority identity (nobody holds its key: the address is what matters here)
ED1 = "Ii7WNIc/Os4gF/D5/F5+KRXpm6+mAiuoHKg8aePXCC0"


def onionp2p(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onionp2p", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def toml(path: Path, **table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(path: Path, name: str | None = None) -> list[dict]:
    """The JSON log events of a file (``name``: only those)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and (name is None or ev.get("event") == name):
            out.append(ev)
    return out


def until(pred, what: str, timeout: float = 30.0, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := pred():
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture
def http_server_thread():
    """A local web server (the destination of streams through the network); yields its port."""
    import http.server
    import threading

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = b"hello through onionp2p\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


# -- log_file, logrotate, directory failures at warning -------------------------------------------------

def test_relay_log_file_reopens_on_sighup_and_sigusr1_and_warns_of_directory_failures(tmp_path):
    dead = free_port()  # an authority nobody answers for: uploads and fetches fail
    # (assume_reachable: it publishes at once, without its reachability self-test)
    cfg = toml(tmp_path / "relay.toml", nickname="logger", data_dir=".", or_address="127.0.0.1:0",
               log_file="relay.log", log_format="json", log_level="info", assume_reachable=True,
               authorities=[f"auth0 127.0.0.1:{dead} {ED1}"])
    log = tmp_path / "relay.log"
    proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "relay", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: events(log, "relay listening"), "the relay's first lines in log_file", proc=proc)
        # an operator must see these: tor warns when it cannot publish or fetch
        upload = until(lambda: events(log, "descriptor upload failed"), "upload failure", proc=proc)
        fetch = until(lambda: events(log, "consensus refresh failed"), "fetch failure", proc=proc)
        assert upload[0]["level"] == "warning" and fetch[0]["level"] == "warning"

        rotated = {}
        for n, sig, line in ((1, signal.SIGHUP, "received SIGHUP"), (2, signal.SIGUSR1, "relay status")):
            path = tmp_path / f"relay.log.{n}"
            log.rename(path)  # what logrotate does, then it signals the process
            proc.send_signal(sig)
            until(lambda: events(log, line), f"{line!r} in a new relay.log after {sig.name}", proc=proc)
            # lines logged between the rename and the signal rightly land in the renamed file;
            # from the reopen on, nothing more may
            rotated[path] = path.read_text()
            assert os.stat(log).st_mode & 0o077 == 0  # created 0600 like the old one
        proc.send_signal(signal.SIGUSR1)  # one more line, after both reopens
        until(lambda: len(events(log, "relay status")) == 2, "a second 'relay status' in relay.log", proc=proc)
        for path, text in rotated.items():
            assert path.read_text() == text, f"{path.name} was written to after the reopen"
    finally:
        assert stop(proc) == 0
    assert proc.stderr.read() == ""  # with log_file, nothing goes to stderr


def test_authority_sighup_reopens_and_applies_the_log_keys(tmp_path):
    from stem.control import Controller

    dir_port, control = free_port(), free_port()
    show = toml(tmp_path / "show.toml", data_dir=".", nickname="auth0", dir_address=f"127.0.0.1:{dir_port}")
    line = onionp2p("authority", "--config", str(show), "--show-identity").stdout.strip()
    base = {"data_dir": ".", "nickname": "auth0", "dir_address": f"127.0.0.1:{dir_port}", "run_relay": False,
            "authorities": [line], "control_port": control, "log_format": "json", "log_file": "auth.log"}
    cfg = toml(tmp_path / "authority.toml", **base)
    proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "authority", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: events(tmp_path / "auth.log", "authority listening"), "the authority", proc=proc)
        until(lambda: "Control port at" in proc.stdout.readline(), "the control port", proc=proc)
        controller = Controller.from_port(address="127.0.0.1", port=control)
        controller.authenticate()
        controller.set_caching(False)
        try:
            assert controller.get_conf("Log") == f"info file {tmp_path / 'auth.log'}"
            toml(cfg, **{**base, "log_file": "auth2.log", "log_level": "warning", "voting_interval": 60})
            proc.send_signal(signal.SIGHUP)
            restart = until(lambda: events(tmp_path / "auth2.log", "reload: these keys only change on restart"),
                            "the reload", proc=proc)
            assert restart[0]["keys"] == "voting_interval"
            assert events(tmp_path / "auth.log", "received SIGHUP")
            assert controller.get_conf("Log") == f"warning file {tmp_path / 'auth2.log'}"
            assert controller.get_conf("V3AuthVotingInterval") != "60"
        finally:
            controller.close()
    finally:
        assert stop(proc) == 0
    assert proc.stderr.read() == ""


# -- --verify-config / --dump-config ---------------------------------------------------------------

def test_verify_config_checks_without_starting_anything(tmp_path):
    cfg = toml(tmp_path / "relay.toml", data_dir="state", log_file="logs/relay.log", or_address="127.0.0.1:1")
    out = onionp2p("relay", "--config", str(cfg), "--verify-config")
    assert (out.returncode, out.stdout, out.stderr) == (0, "Configuration was valid\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay.toml"]  # nothing created
    # keys made by a real start, then damaged
    toml(tmp_path / "relay.toml", data_dir="state", or_address="127.0.0.1:0", log_level="warning")
    proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "relay", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "listening on" in proc.stdout.readline()
    assert stop(proc) == 0
    assert onionp2p("relay", "--config", str(cfg), "--verify-config").returncode == 0
    key = tmp_path / "state" / "keys" / "secret_onion_key_ntor.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    out = onionp2p("relay", "--config", str(cfg), "--verify-config")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"onionp2p: error: key file {key} is corrupt")
    assert len(out.stderr.splitlines()) == 1
    key.unlink()
    (tmp_path / "state" / "keys" / "secret_id_key.pem").chmod(0o644)
    (tmp_path / "ro").mkdir(mode=0o500)
    toml(cfg, data_dir="state", log_file="ro/sub/relay.log", bogus_key=1)
    out = onionp2p("relay", "--config", str(cfg), "--verify-config")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(f"onionp2p: error: {cfg}: bogus_key: unknown key (known keys: ")
    toml(cfg, data_dir="state", log_file="ro/sub/relay.log")
    out = onionp2p("relay", "--config", str(cfg), "--verify-config")
    lines = out.stderr.splitlines()
    if os.geteuid() == 0:  # root writes anywhere: only the key's permissions are wrong
        assert len(lines) == 1
    else:
        assert lines[0] == f"onionp2p: error: log_file: {tmp_path}/ro/sub/relay.log: cannot be created: " \
                           f"{tmp_path}/ro is not a writable directory"
    assert out.returncode == 2 and "secret_id_key.pem is readable or writable by group/others" in lines[-1]


def test_verify_config_of_client_and_authority(tmp_path):
    client = toml(tmp_path / "c" / "client.toml", data_dir=".", authorities=[f"auth0 127.0.0.1:7000 {ED1}"])
    assert onionp2p("client", "--config", str(client), "--verify-config").returncode == 0
    auth = toml(tmp_path / "a" / "authority.toml", data_dir=".", nickname="auth0",
                dir_address="127.0.0.1:7000")
    line = onionp2p("authority", "--config", str(auth), "--show-identity").stdout.strip()
    toml(auth, data_dir=".", nickname="auth0", dir_address="127.0.0.1:7000", authorities=[line])
    out = onionp2p("authority", "--config", str(auth), "--verify-config")
    assert (out.returncode, out.stdout) == (0, "Configuration was valid\n"), out.stderr
    keyfile = tmp_path / "a" / "keys" / AUTHORITY_KEY_FILE
    keyfile.chmod(0o640)
    out = onionp2p("authority", "--config", str(auth), "--verify-config")
    assert out.returncode == 2 and f"secret key file {keyfile} is readable by group/others" in out.stderr


def test_dump_config_prints_the_effective_config(tmp_path):
    cfg = toml(tmp_path / "relay.toml", nickname="dumped", exit_policy="accept *:443", data_dir="d")
    out = onionp2p("relay", "--config", str(cfg), "--dump-config")
    assert out.returncode == 0, out.stderr
    dumped = tomllib.loads(out.stdout)
    assert dumped["nickname"] == "dumped" and dumped["data_dir"] == str(tmp_path / "d")
    # defaults filled in
    assert dumped["bandwidth_rate"] == 1 << 30 and dumped["or_address"] == "127.0.0.1:9001"
    (tmp_path / "dump.toml").write_text(out.stdout)
    assert load_relay_config(tmp_path / "dump.toml") == load_relay_config(cfg)
    assert not (tmp_path / "d").exists()
    client = toml(tmp_path / "c.toml", stream_timeout=9)
    out = onionp2p("client", "--config", str(client), "--socks-port", "9999", "--dump-config")
    assert 'socks_address = "127.0.0.1:9999"' in out.stdout and "stream_timeout = 9" in out.stdout


# -- SIGTERM while bootstrapping ------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_client_stops_at_once_on_sigterm_while_still_bootstrapping(tmp_path, sig):
    """A client whose directory never answers is still bootstrapping (for up to twice the
    circuit build timeout); SIGTERM/SIGINT must stop it at once, cleanly, as tor does, not
    after the bootstrap gives up."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead.listen()  # accepts TCP, never answers: the directory fetch hangs
    try:
        port = dead.getsockname()[1]
        cfg = toml(tmp_path / "client" / "client.toml", data_dir=".", socks_address="127.0.0.1:0",
                   control_port=0, circuit_build_timeout=60, log_format="json", log_file="client.log",
                   log_level="info",
                   authorities=[f"auth0 127.0.0.1:{port} OHcFSwiPYSKeXUFavVV4bxZIFXcbvbHDpdYbP1bWT/8"])
        log = tmp_path / "client" / "client.log"
        proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "client", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            until(lambda: events(log, "SOCKS listener open"), "the SOCKS listener", proc=proc)
            time.sleep(1.0)
            assert proc.poll() is None
            t0 = time.monotonic()
            proc.send_signal(sig)
            code = proc.wait(15)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0, proc.stderr.read()
        assert took < 10, f"took {took:.1f} s to stop"  # bootstrap would have waited 120 s
        assert events(log, "shutting down before bootstrap finished")
    finally:
        dead.close()


# -- the client's SIGHUP ------------------------------------------------------------------------

@pytest.mark.slow
def test_client_survives_sighup_and_reloads_what_tor_reloads(nodes, tmp_path, http_server_thread):
    import urllib.request

    from stem.control import Controller

    dir_port = free_port()
    auth_dir = tmp_path / "auth0"
    line = onionp2p("authority", "--config", str(toml(auth_dir / "show.toml", data_dir=".", nickname="auth0",
                                                            dir_address=f"127.0.0.1:{dir_port}")),
                    "--show-identity").stdout.strip()
    nodes("auth0", "authority", dir_address=f"127.0.0.1:{dir_port}", run_relay=False, authorities=[line],
          voting_interval=2, assume_guard=True, assume_exit=True, stable_uptime=0, guard_uptime=0)
    for i in range(3):
        nodes(f"r{i}", authorities=[line], exit_policy="accept *:*", dos_max_concurrent_connections=0,
              dos_circuit_creation_rate=0, dos_circuit_creation_burst=0)

    def listed() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dir_port}/tor/status-vote/current/consensus",
                                        timeout=5) as resp:
                return resp.read().decode().count("\nr ") >= 3
        except OSError:
            return False

    until(listed, "a consensus listing the 3 relays", timeout=90)
    control = free_port()
    base = {"data_dir": ".", "socks_address": "127.0.0.1:0", "control_port": control, "authorities": [line],
            "enforce_distinct_subnets": False, "client_reject_internal_addresses": False,
            "log_format": "json", "log_file": "client.log", "log_level": "info"}
    cfg = toml(tmp_path / "client" / "client.toml", **base)
    log = tmp_path / "client" / "client.log"
    proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "client", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = re.compile(r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)")
        socks = int(until(lambda: ready.search(proc.stdout.readline()), "the client ready", timeout=90,
                          proc=proc).group(1))
        controller = Controller.from_port(address="127.0.0.1", port=control)
        controller.authenticate()
        controller.set_caching(False)
        try:
            assert controller.get_conf("MaxCircuitDirtiness") == "600"
            # tor reloads these on SIGHUP; the SOCKS address needs a restart (kept, and said so)
            toml(cfg, **{**base, "max_circuit_dirtiness": 1234, "log_level": "debug", "stream_timeout": 7,
                         "socks_address": "127.0.0.1:1", "log_file": "client2.log"})
            proc.send_signal(signal.SIGHUP)
            log2 = tmp_path / "client" / "client2.log"
            reloaded = until(lambda: events(log2, "configuration reloaded"), "the reload", proc=proc)
            assert reloaded[0]["changed"] == "log_file,log_level,max_circuit_dirtiness,stream_timeout"
            restart = events(log2, "reload: these keys only change on restart")
            assert restart[0]["keys"] == "socks_address" and restart[0]["level"] == "warning"
            assert events(log, "received SIGHUP")  # said in the old file, before switching
            assert controller.get_conf("MaxCircuitDirtiness") == "1234"
            assert controller.get_conf("SocksPort") == str(socks)
            # still a working proxy, now logging at debug level
            out = subprocess.run(["curl", "-sS", "--max-time", "60", "--socks5-hostname",
                                  f"127.0.0.1:{socks}", f"http://127.0.0.1:{http_server_thread}/"],
                                 capture_output=True, timeout=90)
            assert out.returncode == 0 and b"hello" in out.stdout, out.stderr
            until(lambda: [e for e in events(log2) if e["level"] == "debug"], "debug lines after the reload")
            # a broken file changes nothing, and the client lives on
            cfg.write_text("max_circuit_dirtiness = 'soon'\n")
            controller.signal("RELOAD")
            failed = until(lambda: events(log2, "reload failed; keeping the running configuration"),
                           "the bad file refused")
            assert "max_circuit_dirtiness" in failed[0]["error"]
            assert controller.get_conf("MaxCircuitDirtiness") == "1234"
        finally:
            # stem's close() joins its reader threads; once (in a CI run) it never returned, so
            # it gets a bounded time: the client's shutdown below does not depend on it
            closer = threading.Thread(target=controller.close, daemon=True)
            closer.start()
            closer.join(15)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0


# -- sample configs and the systemd unit (docs/examples) ---------------------------------------------

@pytest.mark.parametrize(("name", "load"), [
    ("relay", load_relay_config), ("exit", load_relay_config), ("client", load_client_config),
    ("authority", load_authority_config)])
def test_sample_configs_load(name, load):
    cfg = load(EXAMPLES / f"{name}.toml")
    if name == "exit":
        assert cfg.exit_policy.is_exit and cfg.exit_policy.allows("93.184.216.34", 443)
        assert not cfg.exit_policy.allows("93.184.216.34", 25) and not cfg.exit_policy.allows("10.0.0.1", 443)
    elif name == "relay":
        assert not cfg.exit_policy.is_exit and cfg.data_dir == Path("/var/lib/onionp2p")
    kind = {"exit": "relay"}.get(name, name)
    out = onionp2p(kind, "--config", str(EXAMPLES / f"{name}.toml"), "--dump-config")
    assert out.returncode == 0 and out.stderr == ""


def systemd_unit() -> dict[str, list[tuple[str, str]]]:
    """The example unit's sections as (key, value) lists."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (EXAMPLES / "onionp2p-relay.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key, value))
    return sections


def test_systemd_unit_verifies_and_has_tors_hardening(tmp_path):
    analyze = require_tool("systemd-analyze", "systemd")
    service = dict(systemd_unit()["Service"])
    hardening = {"NoNewPrivileges": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectHome": "yes",
                 "ProtectSystem": "full", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                 "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "KillSignal": "SIGINT",
                 "ExecReload": "/bin/kill -HUP $MAINPID", "RestartPreventExitStatus": "2"}
    assert {k: service.get(k) for k in hardening} == hardening
    assert int(service["LimitNOFILE"]) >= 32768  # tor's Debian unit: 65536
    # the unit as installed here: the binary of this install instead of /opt/onionp2p's
    binary = str(Path(sys.executable).with_name("onionp2p"))
    text = (EXAMPLES / "onionp2p-relay.service").read_text().replace("/opt/onionp2p/bin/onionp2p", binary)
    unit = tmp_path / "onionp2p-relay.service"
    unit.write_text(text)
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    # its command lines are ones onionp2p accepts (with the sample config in place of /etc's)
    for key in ("ExecStartPre", "ExecStart"):
        argv = service[key].split()
        assert argv[:4] == ["/opt/onionp2p/bin/onionp2p", "relay", "--config", "/etc/onionp2p/relay.toml"]
        out = onionp2p(*argv[1:3], str(EXAMPLES / "relay.toml"), *argv[4:], "--dump-config")
        assert out.returncode == 0, out.stderr


# -- packaging -----------------------------------------------------------------------------------------

def test_wheel_of_a_clean_copy_has_license_version_and_no_deprecation(tmp_path):
    import zipfile

    from onionp2p import __version__ as version

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "onionp2p", src / "onionp2p", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (out.stdout + out.stderr).splitlines()
    assert any("adding license file 'LICENSE'" in line for line in log)  # the verbose build output is here
    # setuptools' deprecation wall about `project.license` (or anything else deprecated)
    lower = [line.lower() for line in log]
    assert [line for line in lower if "deprecat" in line or "warning" in line and "licen" in line] == []
    wheel = next((tmp_path / "dist").glob("onionp2p-*.whl"))
    assert wheel.name == f"onionp2p-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"onionp2p-{version}.dist-info/METADATA").decode()
        license_text = z.read(f"onionp2p-{version}.dist-info/licenses/LICENSE").decode()
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "Copyright (c) the onionp2p developers" in license_text
    headers = [tuple(line.split(": ", 1)) for line in meta.split("\n\n", 1)[0].splitlines()]
    assert ("Version", version) in headers and ("License-Expression", "MIT") in headers
    assert ("License-File", "LICENSE") in headers
    assert any(k == "Project-URL" and v.startswith("Source, https://") for k, v in headers)
    assert ("Classifier", "Topic :: Internet :: Proxy Servers") in headers
    # installed, the package's metadata and its __version__ agree (one source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    got = subprocess.run([venv / "bin" / "python", "-c",
                          "import importlib.metadata as m; print(m.version('onionp2p'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert got == version
    assert onionp2p("--version").stdout.strip() == f"onionp2p {version}"
