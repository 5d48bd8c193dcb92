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
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import blob, free_port, load_tornet, require_tool, require_tor, start_relay_process, wait_for

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

    def hs(self) -> dict[str, int]:
        """Its onion-service roles' counters (relay/hs.py, relay/hsdir.py) and its bytes."""
        return {"store": _metrics(self.metrics_port, "onionp2p_relay_hsdir_total", 'action="store"'),
                "fetch": _metrics(self.metrics_port, "onionp2p_relay_hsdir_total", 'action="fetch"'),
                "est_intro": _metrics(self.metrics_port, "onionp2p_relay_est_intro_total",
                                      'action="success"'),
                "intro1": _metrics(self.metrics_port, "onionp2p_relay_intro1_total", 'action="success"'),
                "rend1": _metrics(self.metrics_port, "onionp2p_relay_rend1_total", 'action="success"'),
                "bytes": self.bytes()}

    def log(self) -> str:
        return (self.dir / "log.txt").read_text(errors="replace")


@pytest.fixture(scope="module")
def tor_relay_net(tmp_path_factory):
    require_tor()
    curl = require_tool("curl", "curl")
    root = tmp_path_factory.mktemp("torrelay")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blob)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    exit_relay = OnionRelay(root, "onionX", [f"accept *:{port}", "reject *:*"])
    middle = OnionRelay(root, "onionA", None)
    # two more, so that every hop of an onion-service circuit (four with a middle pair) can be
    # ours: the onion-service tests exclude every tor relay
    more = (OnionRelay(root, "onionB", None), OnionRelay(root, "onionC", None))
    net = tornet.TorNet(root / "net", extra_exit_fingerprints=[exit_relay.fingerprint], extra_authority_options=[
        # Stable normally needs an uptime above the median; ours are the youngest relays
        # (tor clients take only Stable relays as guards)
        "AuthDirVoteStableGuaranteeMinUptime 0",
        # tor clients make their first hops with CREATE_FAST (tor's usecreatefast)
        "ConsensusParams usecreatefast=1",
        # the HSDir flag for onionX and onionA only: every HSDir of the hash ring is ours
        f"TestingDirAuthVoteHSDir ${exit_relay.fingerprint},${middle.fingerprint}",
        "TestingDirAuthVoteHSDirIsStrict 1",
    ])
    ours = (exit_relay, middle)
    try:
        net.start(n_relays=3, n_exits=1, timeout=150)
        dirauth = root / "net" / tornet.DIRAUTH_FILE
        # the tor network's own start-up is over: log lines from here on may concern ours
        marks = {n.name: n.log.stat().st_size for n in net.nodes}
        for r in (*ours, *more):
            r.start(dirauth)
        flags = net.wait_listed({exit_relay.fingerprint: LISTED | {"Exit", "HSDir"},
                                 middle.fingerprint: LISTED | {"HSDir"},
                                 **{r.fingerprint: LISTED for r in more}}, timeout=150)
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
        net.more_relays = more
        yield net, ours, port, curl, flags, listed_at, clients
    finally:
        for r in (*ours, *more):
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


# -- onion services with onionp2p relays as HSDir, introduction and rendezvous points -------------------


def _poll(pred, timeout: float, what: str, interval: float = 1.0):
    """Poll ``pred()`` (blocking) until true, or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(interval)
    return value


class _OurClient:
    """An ``onionp2p client --tor-dirauth-file`` process hosting an onion service for ``port``
    (its ``[[onion_service]]``) and offering a SOCKS port, with every tor relay in
    ``exclude_nodes``: its guards, middles, introduction and rendezvous points are ours."""

    def __init__(self, root: Path, dirauth: Path, port: int, exclude: list[str]):
        self.dir = root
        root.mkdir()
        (root / "client.toml").write_text(
            'data_dir = "data"\nsocks_address = "127.0.0.1:0"\ncontrol_port = 0\nmetrics_port = 0\n'
            'enforce_distinct_subnets = false\ntesting_tor_network = true\n'
            # its first circuit (bootstrap) exits at onionX, the only exit of ours (the test port)
            f"preemptive_circuits = 1\npreemptive_ports = [{port}]\n"
            'log_level = "info"\n'
            "exclude_nodes = [" + ", ".join(f'"${fp}"' for fp in exclude) + "]\n"
            f'[[onion_service]]\ndir = "hs"\nports = ["80 127.0.0.1:{port}"]\n')
        with open(root / "log.txt", "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "client", "--config",
                                          str(root / "client.toml"), "--tor-dirauth-file", str(dirauth)],
                                         stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return (self.dir / "log.txt").read_text(errors="replace")

    def socks_port(self) -> int:
        _poll(lambda: self.proc.poll() is None and "SOCKS5 proxy ready" in self.log(), timeout=120,
                 what="our client's SOCKS port")
        return int(re.search(r"SOCKS5 proxy ready at 127\.0\.0\.1:(\d+)", self.log()).group(1))

    def address(self) -> str:
        _poll(lambda: (self.dir / "hs" / "hostname").exists(), timeout=120, what="the service's hostname")
        return (self.dir / "hs" / "hostname").read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def onion_ends(tor_relay_net):
    """Our client (hosting a service) and a tor process (a SOCKS client hosting a service with
    HiddenServiceDir), both excluding every tor relay (tor: ExcludeNodes, StrictNodes 0, so
    that it still reads the directory from the authorities). Every HSDir is ours (the
    authorities vote HSDir for onionX and onionA only)."""
    net, ours, port, *_ = tor_relay_net
    relays = (*ours, *net.more_relays)
    _, flags = net.consensus_flags(net.authorities[0])
    theirs = sorted(set(flags) - {r.fingerprint for r in relays})
    assert len(theirs) == len(net.authorities) + len(net.relays)
    assert {fp for fp, f in flags.items() if "HSDir" in f} == {r.fingerprint for r in ours}
    root = Path(net.directory).parent
    ourclient = _OurClient(root / "ourclient", root / "net" / tornet.DIRAUTH_FILE, port, theirs)
    hs_dir = root / "tor_hs"
    tor = net.add_client("hs_tor", [f"ExcludeNodes {','.join('$' + fp for fp in theirs)}", "StrictNodes 0",
                                     f"HiddenServiceDir {hs_dir}", f"HiddenServicePort 80 127.0.0.1:{port}"],
                         wait=False)
    try:
        yield relays, ourclient, tor, hs_dir
    finally:
        ourclient.stop()


def _hs_delta(relays, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {r.name: {k: v - before[r.name][k] for k, v in r.hs().items()} for r in relays}


def _assert_intro_and_rendezvous_ours(delta: dict[str, dict[str, int]]) -> None:
    """INTRODUCE1 relayed at one of ours; RENDEZVOUS1 at one of ours, which spliced the 5 MB
    (read from the service's circuit, written to the client's: twice the bytes)."""
    assert sum(d["intro1"] for d in delta.values()) >= 1, delta
    rps = [name for name, d in delta.items() if d["rend1"] >= 1]
    assert rps and any(delta[n]["bytes"] >= 2 * MB5 for n in rps), delta


def test_tor_client_reaches_an_onionp2p_service_through_our_hsdir_intro_and_rendezvous(
        tor_relay_net, onion_ends, tmp_path):
    """Issue 15: a Debian tor client fetches 5 MB from a service our client hosts, where the
    HSDirs, introduction points and rendezvous point are onionp2p relays (tor's relays are
    excluded on both ends)."""
    net, ours, _port, curl, *_ = tor_relay_net
    relays, ourclient, tor, _ = onion_ends
    address = ourclient.address()
    # the descriptor is on both HSDirs (a tor client asks each HSDir once per 15 minutes)
    _poll(lambda: all(r.hs()["store"] >= 1 for r in ours), timeout=180, what="the descriptor on our HSDirs")
    assert sum(r.hs()["est_intro"] for r in relays) >= 1  # our service's introduction points are ours
    net.wait_bootstrapped(tor)
    before = {r.name: r.hs() for r in relays}
    out = tmp_path / "body"
    res = subprocess.run([curl, "-sS", "--max-time", "240", "--retry", "3", "--retry-all-errors",
                          "--socks5-hostname", f"127.0.0.1:{tor.or_port}", f"http://{address}/blob",
                          "-o", str(out)],
                         capture_output=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-500:]
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(_Blob.data).digest()
    delta = _hs_delta(relays, before)
    assert sum(delta[r.name]["fetch"] for r in ours) >= 1, delta  # the descriptor was served by ours
    _assert_intro_and_rendezvous_ours(delta)


def test_our_client_reaches_a_tor_service_through_our_hsdir_intro_and_rendezvous(tor_relay_net, onion_ends):
    """The other direction: a tor process hosts the service (HiddenServiceDir; its
    ExcludeNodes make its introduction points ours), our client fetches 5 MB through its
    SOCKS port with its rendezvous point, HSDir fetch and every hop among our relays."""
    _net, ours, _port, curl, *_ = tor_relay_net
    relays, ourclient, _tor, hs_dir = onion_ends
    socks = ourclient.socks_port()
    _poll(lambda: (hs_dir / "hostname").exists(), timeout=120, what="tor's onion service hostname")
    address = (hs_dir / "hostname").read_text().strip()
    before = {r.name: r.hs() for r in relays}
    deadline = time.monotonic() + 240
    while True:  # until tor has published its descriptor
        res = subprocess.run([curl, "-sS", "--max-time", "120", "-x", f"socks5h://127.0.0.1:{socks}",
                              f"http://{address}/blob"], capture_output=True, timeout=150, check=False)
        if res.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert res.returncode == 0, res.stderr[-500:]
    assert hashlib.sha256(res.stdout).digest() == hashlib.sha256(_Blob.data).digest()
    delta = _hs_delta(relays, before)
    assert sum(delta[r.name]["fetch"] for r in ours) >= 1, delta
    _assert_intro_and_rendezvous_ours(delta)
    # tor took our HSDirs' answers to its uploads without complaint (a 413, or a short body
    # that tor calls "confusing binary junk")
    text = _tor.log.read_text(errors="replace")
    assert "Uploading hidden service descriptor" not in text and "confusing binary junk" not in text, \
        [ln for ln in text.splitlines() if "[warn]" in ln][-10:]
