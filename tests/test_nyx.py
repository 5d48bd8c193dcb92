"""nyx (the Debian package) against the testnet client's control port, in tmux (issue #5).

A real ``onionp2p testnet`` (conftest.RunningTestnet) runs; traffic goes through its
SOCKS port; the Debian ``nyx`` command runs in a detached tmux session of fixed size with
its own HOME, and the test reads the screen with ``tmux capture-pane``:

* page 1 must show nyx's header fields for our node (version, cookie-authenticated
  control port) and the bandwidth graph, whose download total counts the traffic;
* page 2 (right arrow) must list the client's circuits: every circuit the control port
  reports as BUILT, with its ID and each hop's fingerprint and nickname, in order;
* no screen may show an error, a traceback or an "Unable to" message, and nyx must quit
  cleanly (exit status 0) on ``q q``.

nyx's log: ``--debug`` is broken in Debian's nyx 2.1 on Python >= 3.8 (it calls the
removed ``platform.dist``), so the test gives nyx a config file (``-c``) that sets
``write_logs_to`` (nyx writes its event log to that file) and adds NYX_DEBUG to the
logged events, which records every GETINFO/GETCONF nyx sends and whether it failed. The
log must hold no warning or error, every query our control port refused must be one
listed below, and the queries nyx needs for the two pages must have been answered.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import RunningTestnet, require_tool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning"),  # stem 1.8 in this process
    pytest.mark.usefixtures("nyx_and_tmux"),
]


@pytest.fixture(scope="module")
def nyx_and_tmux():
    """nyx and tmux (Debian packages; tools/test installs them): skipped without them,
    failed under CI=true."""
    require_tool("nyx", "nyx")
    require_tool("tmux", "tmux")

BLOB = os.urandom(4_000_000)

# The only refusals allowed, each with its reply text: those real tor 0.4.9 gives a client
# too, word for word (stem logs the text after "failed: "). fingerprint (551) and
# exit-policy/full (552): a client is no relay; address (551); ip-to-country without GeoIP
# files (551). Everything else nyx asks must be answered, as tor answers it.
CLIENT_REFUSALS = {
    "GETINFO fingerprint": "Not running in server mode",
    "GETINFO exit-policy/full": "Not running in server mode",
    "GETINFO address": "Address unknown",
    "GETINFO ip-to-country/0.0.0.0": "GeoIP data not loaded",
}
# What nyx needs for the two pages under test: these must be answered.
REQUIRED = {"GETINFO version", "GETINFO circuit-status", "GETINFO traffic/read", "GETINFO traffic/written",
            "GETINFO process/pid", "GETINFO bw-event-cache"}
# Queries our control port once refused although tor answers them for a client (nyx
# retried them ~17 times in 10 s); nyx asks each of them and each must now be answered
# (tests/test_control.py checks the exact replies). The last three are stem's
# get_exit_policy() fallback, reached once ExitRelay is answered.
ONCE_REFUSED = {"GETCONF exitrelay", "GETCONF HiddenServiceOptions", "GETCONF usemicrodescriptors",
                "GETINFO status/clients-seen", "GETCONF exitpolicyrejectprivate", "GETCONF exitpolicy",
                "GETINFO exit-policy/default"}

SCREEN_ERRORS = re.compile(r"Traceback|Unable to|\berror\b|NYX_WARN|NYX_ERR|nyx exited", re.IGNORECASE)
UNITS = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}

NYXRC = """\
write_logs_to {log}
logged_events NYX_DEBUG,NOTICE,WARN,ERR,NYX_NOTICE,NYX_WARNING,NYX_ERROR
"""


@pytest.fixture(scope="module")
def testnet(tmp_path_factory):
    net = RunningTestnet(tmp_path_factory.mktemp("nyxnet") / "net")
    yield net
    net.stop()


@pytest.fixture(scope="module")
def www():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            self.wfile.write(BLOB)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def fetch_through_socks(socks_port: int, port: int) -> bytes:
    """GET / from 127.0.0.1:port through the SOCKS5 proxy (hostname resolved at the exit)."""
    with socket.create_connection(("127.0.0.1", socks_port), timeout=60) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x03\x09localhost" + struct.pack(">H", port))
        reply = b""
        while len(reply) < 10:
            reply += s.recv(10 - len(reply))
        assert reply[1] == 0, f"SOCKS reply {reply.hex()}"
        s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    return bytes(data.partition(b"\r\n\r\n")[2])


class Nyx:
    """nyx in a detached tmux session on a private tmux server (its socket in the test's directory)."""

    def __init__(self, tmp: Path, control_port: int):
        self.home = tmp / "home"
        self.home.mkdir()
        self.log = tmp / "nyx.log"
        # nyx's stderr (Python warnings, stem's fallback log handler) would be written over
        # its curses screen and garble what capture-pane reads; it is checked at the end
        self.stderr = tmp / "nyx.stderr"
        config = tmp / "nyxrc"
        config.write_text(NYXRC.format(log=self.log))
        self.socket = tmp / "tmux.sock"  # a private tmux server, gone with the test's directory
        cmd = shlex.join([shutil.which("nyx"), "-i", f"127.0.0.1:{control_port}", "-c", str(config)])
        env = {"HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "TERM": "xterm-256color"}
        self._tmux("new-session", "-d", "-x", "200", "-y", "60", "-s", "nyx",
                   f'{cmd} 2>{shlex.quote(str(self.stderr))}; echo "nyx exited with status $?"; sleep 600',
                   env=env)
        self.screens: list[str] = []
        self._height = 60

    def _tmux(self, *args: str, env: dict | None = None) -> str:
        proc = subprocess.run(["tmux", "-S", str(self.socket), "-f", "/dev/null", *args], capture_output=True,
                              text=True, timeout=30, env=env)
        assert proc.returncode == 0, f"tmux {args[0]} failed: {proc.stderr}"
        return proc.stdout

    def screen(self) -> str:
        text = self._tmux("capture-pane", "-p", "-t", "nyx")
        self.screens.append(text)
        return text

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "nyx", *keys)

    def wait_for(self, predicate, what: str, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        polls = 0
        while True:
            text = self.screen()
            if SCREEN_ERRORS.search(text):
                raise AssertionError(f"nyx shows an error while waiting for {what}:\n{text}")
            if predicate(text):
                return text
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}; nyx shows:\n{text}")
            polls += 1
            if polls % 4 == 0:
                self.redraw()
            time.sleep(0.5)

    def redraw(self) -> None:
        """Make nyx redraw its whole screen (a window resize: SIGWINCH). nyx draws its panels
        from several threads, and on a loaded machine they can overwrite each other until the
        next full redraw; the content is right, the picture is not."""
        self._height = 61 if self._height == 60 else 60
        self._tmux("resize-window", "-t", "nyx", "-x", "200", "-y", str(self._height))

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=30)
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def nyx(testnet, tmp_path):
    n = Nyx(tmp_path, testnet.control)
    yield n
    n.close()


def _size(text: str) -> float:
    value, unit = text.split()
    return float(value) * UNITS[unit]


def download(text: str) -> tuple[float, float] | None:
    """(total bytes, top of the graph's scale) of the download graph, or None if not shown."""
    m = re.search(r"Download \(([\d.]+ [KMGT]?B)/sec\s+- avg: ([\d.]+ [KMGT]?B)/sec, total: ([\d.]+ [KMGT]?B)\)",
                  text)
    if not m:
        return None
    lines = text[m.end():].splitlines()
    scale = re.match(r"([\d.]+ [KMGT]?B)\b", lines[1]) if len(lines) > 1 else None
    return _size(m.group(3)), _size(scale.group(1)) if scale else 0.0


def screen_circuits(text: str) -> dict[int, list[tuple[str, str]]]:
    """Circuit ID -> [(fingerprint, nickname)] for every hop, as the connections page lists them."""
    out: dict[int, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.search(r"Circuit ID: (\d+)\b.*\(CIRCUIT\)", line):
            current = out.setdefault(int(m.group(1)), [])
        elif current is not None and (m := re.match(r"\s*[│├└]─?\s+\S+\s+([0-9A-F]{40})\s+(\S+)\s+.*?(\d) / \w+",
                                                    line)):
            current.append((m.group(1), m.group(2)))
            if m.group(3) != str(len(current)):
                return {}  # a half-drawn screen (see Nyx.redraw): read the next one
        else:
            current = None
    return out


def built_circuits(control_port: int) -> dict[int, list[tuple[str, str]]]:
    """The client's BUILT general circuits of more than one hop from its control port
    (stem). nyx does not list a built one-hop circuit (the client's directory circuit)
    among the circuits; it marks the connection to that relay DIRECTORY instead."""
    import logging

    from stem.control import Controller

    logging.getLogger("stem").setLevel(logging.WARNING)  # its INFO chatter would flood failure reports
    with Controller.from_port(address="127.0.0.1", port=control_port) as ctl:
        ctl.authenticate()  # cookie, found through PROTOCOLINFO like nyx does
        return {int(c.id): [(fp, nick) for fp, nick in c.path] for c in ctl.get_circuits()
                if c.status == "BUILT" and c.purpose == "GENERAL" and len(c.path) > 1}


def test_nyx_shows_bandwidth_graph_and_circuits(testnet, www, nyx):
    # -- page 1: header and bandwidth graph --------------------------------------------------
    header = re.compile(rf"Control Port \(cookie\): {testnet.control}\b")
    version = re.compile(r"Tor \d+\.\d+\.\d+\.\d+")  # the version from GETINFO version
    first = nyx.wait_for(lambda t: "page 1 / " in t and "Download (" in t and "Upload (" in t
                         and header.search(t) is not None and version.search(t) is not None,
                         "the header and the bandwidth graph")
    assert "page 1 / " in first

    got = fetch_through_socks(testnet.socks, www)
    assert got == BLOB, f"fetched {len(got)} bytes, expected {len(BLOB)}"
    # BW events reach the graph: the download total counts the 4 MB and the scale shows the burst.
    graph = nyx.wait_for(lambda t: (d := download(t)) is not None and d[0] >= 3_000_000 and d[1] >= 100_000,
                         "the download graph to count the fetch")
    total, scale = download(graph)
    assert total >= 3_000_000 and scale >= 100_000, graph

    # -- page 2: connections and circuits ----------------------------------------------------
    nyx.keys("Right")
    nyx.wait_for(lambda t: "page 2 / " in t and "Connections (" in t, "the connections page")
    matched: dict[int, list[tuple[str, str]]] = {}

    def circuits_listed(text: str) -> bool:
        shown = screen_circuits(text)
        before = built_circuits(testnet.control)
        if not before:
            return False
        stable = {cid: path for cid, path in before.items() if cid in built_circuits(testnet.control)}
        missing = [cid for cid, path in stable.items() if shown.get(cid) != path]
        if stable and not missing:
            matched.clear()
            matched.update(stable)
            return True
        return False

    text = nyx.wait_for(circuits_listed, "every built circuit with its path")
    assert len(matched) >= 2, f"expected the preemptive circuits, got {matched}\n{text}"
    for path in matched.values():
        assert len(path) == 3, path
        assert len({fp for fp, _ in path}) == 3, path
        assert all(re.fullmatch(r"(relay|exit)\d+", nick) for _, nick in path), path
        assert path[-1][1].startswith("exit"), f"last hop is not an exit: {path}"

    # -- quit cleanly ------------------------------------------------------------------------
    nyx.keys("q")
    nyx.keys("q")
    end = time.monotonic() + 20
    while "nyx exited with status" not in (text := nyx._tmux("capture-pane", "-p", "-t", "nyx")):
        assert time.monotonic() < end, f"nyx did not quit:\n{text}"
        time.sleep(0.3)
    assert "nyx exited with status 0" in text, text
    stderr = nyx.stderr.read_text(errors="replace")
    assert not re.search(r"Traceback|Error|WARN", stderr), f"nyx wrote to stderr:\n{stderr}"
    assert "Traceback" not in text, text

    # -- nyx's log ---------------------------------------------------------------------------
    log = nyx.log.read_text()
    assert "opening log file" in log, log[:2000]
    problems = re.findall(r"^.*\[(?:NYX_WARNING|NYX_ERROR|ERR)\].*$", log, re.MULTILINE)
    assert not problems, "nyx logged warnings or errors:\n" + "\n".join(problems)
    # What nyx asked while connected: once "q" closes the control connection, every query
    # fails with no reply text ("(failed: )"); a refusal by the control port always has text.
    live = re.split(r"^.*\(failed: \)$", log, maxsplit=1, flags=re.MULTILINE)[0]
    refused = {(f"{m[0]} {m[1]}", m[2])
               for m in re.findall(r"\[NYX_DEBUG\] (GETINFO|GETCONF) (\S+) \(failed: ([^)]*)\)", live)}
    answered = {f"{m[0]} {m[1]}" for m in re.findall(r"\[NYX_DEBUG\] (GETINFO|GETCONF) (\S+) \(runtime: ", live)}
    unexpected = sorted((query, text) for query, text in refused if CLIENT_REFUSALS.get(query) != text)
    assert not unexpected, f"our control port refused what nyx asked (query, reply text): {unexpected}"
    assert REQUIRED <= answered, f"not answered: {sorted(REQUIRED - answered)}"
    assert ONCE_REFUSED <= answered, f"not answered: {sorted(ONCE_REFUSED - answered)}"
