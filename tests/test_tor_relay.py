"""onionp2p relays in a private Tor network, carrying real tor clients' circuits (issue 14).

One network per module: tools/tornet.py's tor authorities (10-second voting) and three tor
relays (one exit), then two onionp2p relay *processes* (``onionp2p relay --config ...
--tor-dirauth-file ...``): ``onionX``, an exit accepting only the test server's port, and
``onionA``, a non-exit. They publish tor-format descriptors, pass the authorities'
reachability test and are listed Running and Valid (and Fast, Guard, Stable, V2Dir; Exit
for onionX, which the authorities are told to vote for, as for the tor exits). Then Debian
tor *clients* (their own SOCKS ports) fetch 5 MB with curl through:

* ``ExitNodes onionX`` (tor guard -> tor middle -> onionp2p exit: EXTEND2 from a tor relay
  into ours, BEGIN from a tor client at our exit);
* ``EntryNodes onionA`` (onionp2p guard -> tor relays: our EXTEND2 into tor relays);
* ``EntryNodes relay1, MiddleNodes onionA, ExitNodes exit0`` (tor -> onionp2p -> tor);

and the bytes are seen on the onionp2p relay's metrics each time. Every [warn] line of
every tor log must be one of a short list of things a tiny test network says by itself.
Finally both relays are still listed two voting periods later.

Under CI=true a missing tor or curl fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import blob, free_port, load_tornet, require_tool, start_relay_process, wait_for

from onionp2p.dir.tordir import TorNetwork
from onionp2p.proto.tordesc import parse_server_descriptor
from onionp2p.relay.keys import RelayKeys

tornet = load_tornet()

pytestmark = [pytest.mark.tor, pytest.mark.slow]

MB5 = 5_000_000
LISTED = {"Running", "Valid", "Fast", "Guard", "Stable", "V2Dir"}
# [warn] lines a tiny test network (or a tor client with a narrow ExitNodes) says by itself
_BENIGN = (
    "Received http status code 404",  # a relay or client asking before a consensus exists
    "Bw Weight Failure",  # authorities computing bandwidth weights for a handful of relays
    "You have used DirAuthority",
    "TestingTorNetwork is set",
    "running Tor as root",
    "you disabled SafeLogging",
    "is giving Tor only an IP address",  # curl sends 127.0.0.1 as a host name
    # predicted circuits for ports onionX rejects, with ExitNodes onionX StrictNodes 1
    "No exits in ExitNodes seem to be running",
    "Failed to choose an exit server",
    "No available nodes when trying to choose node",
    "Could not find a node that matches the configured _HSLayer2Nodes",
    # 10-second voting on two busy cores: a vote now and then arrives after the cutoff, an
    # authority is a round ahead, or its own reachability test of itself runs late
    "Bad valid-after time",
    "Rejecting vote from",
    "We just marked ourself as down",
    "posted vote from",
    "Rejected vote from",
    "after uploading vote to dirserver",
    "enough votes to generate a consensus",
    "Not enough info to publish pending",
    # tor relays' own bandwidth self-test circuits end at the relay itself, so the hop
    # before it "extends back" (tests/test_tor_interop.py has the same)
    "Client asked me to extend back to the previous hop",
)
# generic follow-up line; accepted only directly after a benign line
_FOLLOW_UP = "connection_edge_process_relay_cell (away from origin) failed."


class _Blob(BaseHTTPRequestHandler):
    data = blob(MB5)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data)

    def log_message(self, *args):
        pass


def _metrics(port: int, name: str, labels: str = "[^}]*") -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(int(float(v)) for v in re.findall(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE))


class OnionRelay:
    """One ``onionp2p relay`` process joining the Tor network."""

    def __init__(self, root: Path, name: str, policy: list[str] | None):
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        self.metrics_port = free_port()
        self.fingerprint = RelayKeys.load_or_create(self.dir / "data" / "keys").fingerprint
        lines = [f'nickname = "{name}"', f'data_dir = "{self.dir / "data"}"',
                 f'or_address = "127.0.0.1:{free_port()}"', "extend_allow_private = true",
                 f'contact = "{name}@tornet.invalid"', f"metrics_port = {self.metrics_port}",
                 'log_level = "info"']
        if policy:
            lines += ["exit_reject_private = false", "exit_policy = [" + ", ".join(f'"{p}"' for p in policy) + "]"]
        (self.dir / "relay.toml").write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, dirauth_file: Path) -> None:
        self.proc = start_relay_process(self.dir, "--tor-dirauth-file", str(dirauth_file))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def bytes(self) -> int:
        return _metrics(self.metrics_port, "onionp2p_bytes_total")

    def create_fast(self) -> int:
        return _metrics(self.metrics_port, "onionp2p_relay_events_total", 'event="create_fast"')

    def log(self) -> str:
        return (self.dir / "log.txt").read_text(errors="replace")


@pytest.fixture(scope="module")
def tor_relay_net(tmp_path_factory):
    if not tornet.tor_available():
        why = "needs the 'tor' and 'tor-gencert' programs (Debian package 'tor')"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    curl = require_tool("curl", "curl")
    root = tmp_path_factory.mktemp("torrelay")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blob)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    exit_relay = OnionRelay(root, "onionX", [f"accept *:{port}", "reject *:*"])
    middle = OnionRelay(root, "onionA", None)
    net = tornet.TorNet(root / "net", extra_exit_fingerprints=[exit_relay.fingerprint], extra_authority_options=[
        # Stable normally needs an uptime above the median; ours are the youngest relays
        # (tor clients take only Stable relays as guards)
        "AuthDirVoteStableGuaranteeMinUptime 0",
        # tor clients make their first hops with CREATE_FAST (tor's usecreatefast)
        "ConsensusParams usecreatefast=1",
    ])
    ours = (exit_relay, middle)
    try:
        net.start(n_relays=3, n_exits=1, timeout=150)
        dirauth = root / "net" / tornet.DIRAUTH_FILE
        # the tor network's own start-up is over: log lines from here on may concern ours
        marks = {n.name: n.log.stat().st_size for n in net.nodes}
        for r in ours:
            r.start(dirauth)
        flags = net.wait_listed({exit_relay.fingerprint: LISTED | {"Exit"}, middle.fingerprint: LISTED},
                                timeout=150)
        listed_at = net.consensus_flags(net.authorities[0])[0]
        # the tor clients bootstrap side by side (each test waits for its own)
        guard = next(n for n in net.relays if not n.exit)
        tor_exit = next(n for n in net.relays if n.exit)
        clients = {
            "exit": net.add_client("client_exit", [f"ExitNodes ${exit_relay.fingerprint}", "StrictNodes 1"],
                                   wait=False),
            "guard": net.add_client("client_guard", [f"EntryNodes ${middle.fingerprint}", "StrictNodes 1"],
                                    wait=False),
            "middle": net.add_client("client_middle", [
                f"EntryNodes ${guard.fingerprint}", f"MiddleNodes ${middle.fingerprint}",
                f"ExitNodes ${tor_exit.fingerprint}", "StrictNodes 1"], wait=False),
        }
        net.log_marks = marks
        yield net, ours, port, curl, flags, listed_at, clients
    finally:
        for r in ours:
            r.stop()
        net.stop()
        server.shutdown()


def _curl(curl: str, socks_port: int, port: int) -> bytes:
    res = subprocess.run([curl, "-s", "--max-time", "120", "--socks5-hostname", f"127.0.0.1:{socks_port}",
                          f"http://127.0.0.1:{port}/blob"], capture_output=True, timeout=150, check=False)
    assert res.returncode == 0, f"curl exited {res.returncode}: {res.stderr[-300:]!r}"
    return res.stdout


def _fetch_through(net, client, relay: OnionRelay, curl: str, port: int, *, or_sides: int = 2) -> None:
    """``client`` (a tor client) fetches 5 MB; ``relay`` carried them on ``or_sides`` OR
    connections (2 as guard or middle: read from one, written to the other; 1 as exit)."""
    net.wait_bootstrapped(client)
    before = relay.bytes()
    body = _curl(curl, client.or_port, port)
    assert len(body) == MB5 and hashlib.sha256(body).digest() == hashlib.sha256(_Blob.data).digest()
    assert relay.bytes() - before >= or_sides * MB5, f"{relay.name} did not carry the download"


def test_our_relays_are_listed_with_their_flags(tor_relay_net):
    net, (exit_relay, middle), _port, _curl_path, flags, *_ = tor_relay_net
    assert LISTED | {"Exit"} <= flags[exit_relay.fingerprint]
    assert LISTED <= flags[middle.fingerprint] and "Exit" not in flags[middle.fingerprint]
    for r in (exit_relay, middle):
        # tor's fingerprint file, and the descriptor the authorities serve parses and verifies
        assert (r.dir / "data" / "fingerprint").read_text() == f"{r.name} {r.fingerprint}\n"
        auth = net.authorities[0]
        text = urllib.request.urlopen(f"http://127.0.0.1:{auth.dir_port}/tor/server/fp/{r.fingerprint}",
                                      timeout=10).read().decode()
        desc = parse_server_descriptor(text, now=time.time())
        assert desc.nickname == r.name and desc.fingerprint == r.fingerprint and desc.has_tap_key
        assert desc.protocols.startswith("FlowCtrl=") and desc.dir_cache
        assert "published" in r.log() and "Self-testing indicates your ORPort" in r.log()
    # the authorities' reachability test reached us (a tor relay connected as initiator and
    # authenticated) and our own self-test went through a tor relay (EXTEND2 tor -> us)


async def test_the_tor_consensus_is_refetched_on_tors_schedule(tor_relay_net):
    """dir/tordir.TorNetwork, as our relays (cache=True) and `onionp2p client
    --tor-dirauth-file` (cache=False) keep it: each next consensus is fetched when tor's
    schedule says, from the real authorities."""
    net, ours, *_ = tor_relay_net
    for cache in (True, False):
        view = TorNetwork(net.dirauth_lines(), cache=cache)
        first = await view.refresh()
        assert first.fresh_until - first.valid_after == 10 and first.valid_until - first.valid_after == 20
        assert first.fresh_until <= view.next_fetch(first.valid_after + 1) < first.valid_until
        task = asyncio.get_running_loop().create_task(view.run())
        try:
            await wait_for(lambda v=view: v.fetched >= 2, timeout=45, what="the next consensus")
        finally:
            task.cancel()
        assert view.view.valid_after > first.valid_after and view.bw_weights()
    for r in ours:  # the relays keep theirs fresh too
        assert r.log().count("new tor consensus") >= 2


def test_tor_client_exits_through_onionp2p(tor_relay_net):
    """ExitNodes onionX, StrictNodes 1: tor guard -> tor middle -> onionp2p exit."""
    net, (exit_relay, _), port, curl, *_, clients = tor_relay_net
    _fetch_through(net, clients["exit"], exit_relay, curl, port, or_sides=1)


def test_tor_client_resolves_at_onionp2p_exit(tor_relay_net):
    """RESOLVE from a tor client (tor-resolve, SOCKS RESOLVE) answered by our exit
    (ExitNodes onionX, StrictNodes 1; its policy is not reject-all, so tor sends it there)."""
    tool = require_tool("tor-resolve", "tor")
    net, *_, clients = tor_relay_net
    client = clients["exit"]
    net.wait_bootstrapped(client)
    res = subprocess.run([tool, "-5", "localhost", f"127.0.0.1:{client.or_port}"], capture_output=True,
                         text=True, timeout=90, check=False)
    assert res.returncode == 0 and res.stdout.strip() in ("127.0.0.1", "::1"), (res.stdout, res.stderr)


def test_tor_client_enters_through_onionp2p(tor_relay_net):
    """EntryNodes onionA, StrictNodes 1: onionp2p guard -> tor relays (our EXTEND2 into tor);
    the tor client makes that first hop with CREATE_FAST (usecreatefast=1)."""
    net, (_, middle), port, curl, *_, clients = tor_relay_net
    _fetch_through(net, clients["guard"], middle, curl, port)
    assert middle.create_fast() > 0


def test_tor_relay_onionp2p_middle_tor_exit(tor_relay_net):
    """EntryNodes relay1, MiddleNodes onionA, ExitNodes exit0: tor -> onionp2p -> tor."""
    net, (_, middle), port, curl, *_, clients = tor_relay_net
    _fetch_through(net, clients["middle"], middle, curl, port)


def test_no_tor_log_warns_about_our_relays(tor_relay_net):
    net, ours, *_ = tor_relay_net
    bad = []
    for node in net.nodes:
        after_benign = False
        with open(node.log, "rb") as f:  # (clients started later: their whole log)
            f.seek(net.log_marks.get(node.name, 0))
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if "[warn]" not in line:
                continue
            benign = any(b in line for b in _BENIGN) or (after_benign and _FOLLOW_UP in line)
            if not benign:
                bad.append(f"{node.name}: {line}")
            after_benign = benign and _FOLLOW_UP not in line
    assert not bad, "\n".join(bad[:30])
    for r in ours:
        assert not re.search(r"\[(error|critical)", r.log()), r.log()[-3000:]


def test_our_relays_stay_listed_across_two_voting_periods(tor_relay_net):
    net, (exit_relay, middle), *_rest, listed_at, _clients = tor_relay_net
    auth = net.authorities[0]
    deadline = time.monotonic() + 90
    while (va := net.consensus_flags(auth)[0]) < listed_at + 20:
        assert time.monotonic() < deadline, "no new consensus"
        time.sleep(1)
    for a in net.authorities:
        _, flags = net.consensus_flags(a)
        assert {"Running", "Valid"} <= flags[exit_relay.fingerprint], a.name
        assert {"Running", "Valid"} <= flags[middle.fingerprint], a.name
    assert va >= listed_at + 20
