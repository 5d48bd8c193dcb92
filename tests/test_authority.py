"""Authorities, relays and clients on 127.0.0.1: reachability, voting, BEGIN_DIR, failures.

In-process networks run the real Authority, Relay, RelayDirectory and ClientDirectory over
real sockets; the last test runs `onionp2p authority` and `onionp2p relay` processes.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import LOOPBACK_EXIT, blob, free_port, http_get, relay_config, sha256, wait_for

from onionp2p.client.client import OnionClient
from onionp2p.config import AuthorityConfig
from onionp2p.dir.authority import Authority, authority_line, load_or_create_authority_key
from onionp2p.dir.client import ClientDirectory, DirectoryUnavailable, RelayDirectory
from onionp2p.dir.server import DirRequestError, DirServer, HttpResponse, fetch
from onionp2p.errors import StreamError
from onionp2p.log import configure_logging, reset_logging
from onionp2p.proto.directory import NetworkStatus, ServerDescriptor, parse_authorities, verify_consensus
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.relaycell import EndReason
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

INTERVAL = 5
TESTNET = {"stable_uptime": 0, "assume_guard": True, "assume_exit": True}  # flags for tiny networks


async def refreshed_to(cdir: ClientDirectory, valid_after: int, timeout: float = 30.0) -> NetworkStatus:
    """Refresh until the client holds a consensus at least as new as ``valid_after``."""
    end = time.monotonic() + timeout
    while True:
        doc = await cdir.refresh()
        if doc.valid_after >= valid_after:
            return doc
        assert time.monotonic() < end, "client never got the newer consensus"
        await asyncio.sleep(0.3)


class DirNet:
    """Three authorities and three relays (the last one a loopback exit) in this process."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.authorities: list[Authority] = []
        self.relays: list[Relay] = []
        self.lines: list[str] = []

    async def start(self) -> DirNet:
        keys = [load_or_create_authority_key(self.tmp / f"auth{i}") for i in range(3)]
        ports = [free_port() for _ in keys]
        self.lines = [authority_line(f"auth{i}", "127.0.0.1", p, k) for i, (k, p) in enumerate(zip(keys, ports))]
        for i, key in enumerate(keys):
            a = Authority(key, AuthorityConfig(nickname=f"auth{i}", authorities=tuple(self.lines),
                                               data_dir=self.tmp / f"auth{i}", dir_address=("127.0.0.1", ports[i]),
                                               voting_interval=INTERVAL, **TESTNET))
            await a.start()
            self.authorities.append(a)
        for i in range(3):
            policy = ExitPolicy.parse(LOOPBACK_EXIT, reject_private=False) if i == 2 else ExitPolicy.reject_all()
            relay = Relay(RelayKeys.load_or_create(self.tmp / f"r{i}" / "keys"), relay_config(self.tmp / f"r{i}", exit_reject_private=False, nickname=f"r{i}", exit_policy=policy, extend_allow_private=True), directory=RelayDirectory(self.tmp / f"r{i}", self.lines))
            await relay.start()
            self.relays.append(relay)
        return self

    async def stop(self) -> None:
        for r in self.relays:
            await r.stop()
        for a in self.authorities:
            await a.stop()

    def consensus(self, *, relays: int = 3, signatures: int = 3, after: int = 0,
                  among: list[Authority] | None = None) -> NetworkStatus | None:
        """The consensus every authority in ``among`` serves, once they agree on one like that."""
        docs = [a.current for a in (among or self.authorities)]
        if any(d is None for d in docs) or len({d.text for d in docs}) != 1:
            return None
        doc = docs[0]
        if len(doc.routers) == relays and len(doc.signatures) == signatures and doc.valid_after > after:
            return doc
        return None


@pytest.fixture
async def dirnet(tmp_path):
    net = await DirNet(tmp_path).start()
    yield net
    await net.stop()


@pytest.fixture
async def client():
    c = OnionClient()
    yield c
    await c.close()


async def test_three_authorities_sign_one_consensus_served_over_begindir(dirnet, client, http_server):
    # An impostor: its descriptor is well signed, but names r0's ORPort, where r0 proves
    # r0's identities, not the impostor's. And a relay that is simply not reachable.
    imp_keys = RelayKeys.load_or_create(dirnet.tmp / "impostor" / "keys")
    dead_keys = RelayKeys.load_or_create(dirnet.tmp / "dead" / "keys")
    now = time.time()
    impostor = ServerDescriptor.create(imp_keys, nickname="impostor", address="127.0.0.1",
                                       or_port=dirnet.relays[0].port, exit_policy=ExitPolicy.reject_all(),
                                       published=now)
    dead = ServerDescriptor.create(dead_keys, nickname="dead", address="127.0.0.1", or_port=free_port(),
                                   exit_policy=ExitPolicy.reject_all(), published=now)
    forged = impostor.text.replace("router impostor", "router impostr")
    for a in dirnet.authorities:
        for desc in (impostor, dead):
            assert b"accepted" in await fetch("127.0.0.1", a.dir_port, "/tor/", desc.text.encode())
        with pytest.raises(DirRequestError, match="HTTP 400.*signature") as exc:
            await fetch("127.0.0.1", a.dir_port, "/tor/", forged.encode())
        assert exc.value.status == 400

    doc = await wait_for(dirnet.consensus, timeout=45, interval=0.1,
                         what="a consensus with 3 relays signed by 3 authorities")
    fps = {r.keys.fingerprint: r for r in dirnet.relays}
    assert {e.fingerprint for e in doc.routers} == set(fps)  # impostor and dead relay left out
    assert all(a.reach[imp_keys.rsa_id_digest].ok is False for a in dirnet.authorities)
    assert verify_consensus(doc.text, parse_authorities(dirnet.lines), time.time()) == doc
    for e in doc.routers:
        assert {"Running", "Valid", "Fast", "Stable", "Guard", "V2Dir"} <= e.flags
        assert ("Exit" in e.flags) == (fps[e.fingerprint].nickname == "r2")
        relay = fps[e.fingerprint]
        assert (e.or_port, e.ntor_key, e.ed_id) == (relay.port, relay.keys.onion_key_public,
                                                    relay.keys.identity_public)

    # A client bootstraps from the authorities, then asks a relay over BEGIN_DIR.
    cdir = ClientDirectory(dirnet.tmp / "client", dirnet.lines, client)
    got = await cdir.bootstrap()
    assert got.valid_after >= doc.valid_after and len(got.signatures) == 3
    assert (dirnet.tmp / "client" / "cached-consensus").read_text() == got.text
    await cdir.start()  # keeps the consensus fresh in the background from now on
    by_nick = {s.nickname: s for s in cdir.routers()}
    await wait_for(lambda: all(r.directory.consensus and r.directory.consensus.valid_after >= doc.valid_after
                               for r in dirnet.relays), timeout=45, interval=0.1, what="relays to cache it")
    via_relay = await cdir.fetch_via_relay(by_nick["r1"])
    assert verify_consensus(via_relay, cdir.authorities, time.time()).valid_after >= doc.valid_after
    assert dirnet.relays[1].directory.server.requests >= 1

    # The consensus is enough to build a circuit and use it.
    circ = await client.build_circuit([by_nick["r0"].info, by_nick["r1"].info, by_nick["r2"].info])
    # the relays' descriptors say Relay=2-4 ("proto"), the consensus carries it ("pr"): ntor-v3
    assert [layer.handshake for layer in circ.core.layers] == ["ntor-v3"] * 3
    reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
    assert sha256(await http_get(reader, writer, "/200000")) == sha256(blob(200_000))
    circ.close()

    # An exit that holds a consensus opens streams only for circuits from relays it lists
    # (tor's RefuseUnknownExits): through a relay the authorities never heard of, END(MISC).
    stray = Relay(RelayKeys.load_or_create(dirnet.tmp / "stray"), relay_config(dirnet.tmp / "stray", nickname="stray", extend_allow_private=True))
    await stray.start()
    try:
        circ = await client.build_circuit([stray.info(), by_nick["r2"].info])
        with pytest.raises(StreamError) as refused:
            await circ.open_stream("127.0.0.1", http_server.port)
        assert refused.value.reason == EndReason.MISC
        reader, writer = await circ.open_dir_stream()  # BEGIN_DIR is not refused
        writer.close()
        circ.close()
    finally:
        await stray.stop()

    # Key rotation makes the relay publish a new descriptor, and the next consensus has the new key.
    r0 = dirnet.relays[0]
    old_key = r0.keys.onion_key_public
    assert r0.rotate_keys(time.time() + 29 * 86400)
    assert r0.keys.onion_key_public != old_key
    rotated = await wait_for(lambda: next((e for e in (dirnet.consensus() or doc).routers
                                           if e.rsa_id == r0.keys.rsa_id_digest
                                           and e.ntor_key == r0.keys.onion_key_public), None),
                             timeout=45, interval=0.1, what="a consensus with the rotated onion key")
    before = next(e for e in doc.routers if e.rsa_id == r0.keys.rsa_id_digest)
    assert rotated.published > before.published and rotated.digest != before.digest
    await wait_for(lambda: cdir.consensus.valid_after > got.valid_after, timeout=45, interval=0.1,
                   what="the client's background refresh")
    await cdir.stop()


async def test_client_reuses_its_one_hop_directory_circuit_until_it_is_dirty(dirnet, client, monkeypatch):
    """As tor: later fetches from the same directory cache go over the one-hop circuit the
    first one built, until MaxCircuitDirtiness (here 3 s) from when it was built; an HTTP
    error answer keeps it; then it is closed, the next fetch builds a new one, and stop()
    closes what is kept."""
    monkeypatch.setattr("onionp2p.dir.client.DIR_CIRCUIT_DIRTINESS", 3.0)
    built: list[int] = []
    client.events.add(lambda ev: ev.kind == "built" and len(ev.path) == 1 and built.append(ev.circuit_id))
    await wait_for(dirnet.consensus, timeout=45, interval=0.1, what="a consensus signed by 3 authorities")
    cdir = ClientDirectory(dirnet.tmp / "client", dirnet.lines, client)
    got = await cdir.bootstrap()
    r1 = {s.nickname: s for s in cdir.routers()}["r1"]
    await wait_for(lambda: all(r.directory.consensus and r.directory.consensus.valid_after >= got.valid_after
                               for r in dirnet.relays), timeout=45, interval=0.1, what="relays to cache it")
    try:
        for _ in range(3):
            assert verify_consensus(await cdir.fetch_via_relay(r1), cdir.authorities, time.time())
        with pytest.raises(DirRequestError) as exc:
            await cdir.fetch_via_relay(r1, "/tor/no-such-document")
        assert exc.value.status == 404
        assert verify_consensus(await cdir.fetch_via_relay(r1), cdir.authorities, time.time())
        assert len(built) == 1  # five fetches, one circuit
        first = client.circuits[built[0]]
        assert first.state == "built" and not first.streams
        await wait_for(lambda: first.state != "built", timeout=10, what="the dirty directory circuit to close")
        await cdir.fetch_via_relay(r1)
        assert len(built) == 2
        second = client.circuits[built[1]]
    finally:
        await cdir.stop()
    assert second.state != "built"


async def test_authorities_going_away_do_not_stop_clients(dirnet, client, http_server):
    first = await wait_for(dirnet.consensus, timeout=45, interval=0.1, what="the first full consensus")
    cdir = ClientDirectory(dirnet.tmp / "client", dirnet.lines, client)
    await cdir.bootstrap()

    # One of three authorities goes away: the other two still make a consensus (2 > 3/2).
    await dirnet.authorities[2].stop()
    two = dirnet.authorities[:2]
    second = await wait_for(lambda: dirnet.consensus(signatures=2, after=first.valid_after, among=two),
                            timeout=45, interval=0.1, what="a consensus signed by the two remaining authorities")
    assert {ed for ed, _ in second.signatures} == {a.identity for a in two}
    got = await refreshed_to(cdir, second.valid_after)
    assert len(got.signatures) == 2

    # All authorities go away. A new client with the same cache bootstraps, and fetches
    # from the relays (BEGIN_DIR) — there is nobody else to ask.
    await wait_for(lambda: all(r.directory.consensus and r.directory.consensus.valid_after >= second.valid_after
                               for r in dirnet.relays),
                   timeout=45, interval=0.1, what="relays to hold the latest consensus")
    for a in dirnet.authorities[:2]:
        await a.stop()
    fresh_client = OnionClient()
    try:
        cdir2 = ClientDirectory(dirnet.tmp / "client", dirnet.lines, fresh_client)
        doc = await cdir2.bootstrap()
        assert doc.valid_after >= second.valid_after
        served_before = sum(r.directory.server.requests for r in dirnet.relays)
        again = await cdir2.refresh()
        assert again.valid_after >= doc.valid_after
        assert sum(r.directory.server.requests for r in dirnet.relays) == served_before + 1
        by_nick = {s.nickname: s for s in cdir2.routers()}
        circ = await fresh_client.build_circuit([by_nick[n].info for n in ("r0", "r1", "r2")])
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert await http_get(reader, writer, "/5000") == blob(5000)
        circ.close()
    finally:
        await fresh_client.close()

    # An authority restarted from its data directory knows the relays and serves its last consensus.
    old = dirnet.authorities[0]
    again = Authority(old.key, replace(old.config, dir_address=("127.0.0.1", old.dir_port)))
    dirnet.authorities.append(again)
    await again.start()
    assert set(again.descriptors) == {r.keys.rsa_id_digest for r in dirnet.relays}
    served = await fetch("127.0.0.1", again.dir_port, "/tor/status-vote/current/consensus")
    assert verify_consensus(served, old.authorities, time.time()).valid_after >= second.valid_after


def _consensus_for(keys, auths, relay_keys, va, signers):
    from onionp2p.dir.authority import VotingSchedule, compute_consensus
    from onionp2p.proto.directory import RouterEntry

    sched = VotingSchedule(INTERVAL)
    desc = ServerDescriptor.create(relay_keys, nickname="solo", address="127.0.0.1", or_port=9001,
                                   exit_policy=ExitPolicy.reject_all(), published=va - 30)
    votes = []
    for k, a in zip(keys, auths):
        v = NetworkStatus("vote", *sched.times(va), ((a.nickname, a.ed_id),),
                          (RouterEntry.from_descriptor(desc, {"Running", "Valid"}, 5),))
        votes.append(v)
    cons = compute_consensus(votes, sched, va)
    return cons.with_signatures([(auths[i].ed_id, cons.sign(keys[i])) for i in signers])


async def test_client_rejects_bad_consensus_with_a_log_line_and_keeps_the_good_one(tmp_path, client):
    """Fake directory servers at the authorities' addresses serve bad documents."""
    keys = [load_or_create_authority_key(tmp_path / f"a{i}") for i in range(3)]
    ports = [free_port() for _ in keys]
    lines = [authority_line(f"a{i}", "127.0.0.1", p, k) for i, (k, p) in enumerate(zip(keys, ports))]
    auths = parse_authorities(lines)
    rkeys = RelayKeys.load_or_create(tmp_path / "relay" / "keys")
    now = time.time()
    va = int(now) // INTERVAL * INTERVAL
    good = _consensus_for(keys, auths, rkeys, va, [0, 1, 2])
    serving = {"doc": b""}

    async def handler(req):
        return HttpResponse(200, serving["doc"])

    servers = [DirServer(handler, "127.0.0.1", p) for p in ports]
    for s in servers:
        await s.start()
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    try:
        cdir = ClientDirectory(tmp_path / "client", lines, client)
        serving["doc"] = _consensus_for(keys, auths, rkeys, va, [1]).text.encode()
        with pytest.raises(DirectoryUnavailable, match="rejected"):
            await cdir.bootstrap()
        serving["doc"] = good.text.encode()
        assert (await cdir.bootstrap()).text == good.text
        cached = (tmp_path / "client" / "cached-consensus").read_bytes()
        # forged, expired, future-dated and rolled-back documents: all refused, good one kept
        later = _consensus_for(keys, auths, rkeys, va + INTERVAL, [0, 1, 2])
        bad_docs = {
            "forged": later.text.replace("127.0.0.1 9001\n", "127.0.0.1 9002\n").encode(),
            "expired": _consensus_for(keys, auths, rkeys, va - 100 * INTERVAL, [0, 1, 2]).text.encode(),
            "future": _consensus_for(keys, auths, rkeys, va + 100 * INTERVAL, [0, 1, 2]).text.encode(),
            "garbage": b"\x00\xffnot a consensus",
        }
        for name, data in bad_docs.items():
            serving["doc"] = data
            with pytest.raises(DirectoryUnavailable):
                await cdir.refresh()
            assert cdir.consensus.text == good.text, name
        assert (tmp_path / "client" / "cached-consensus").read_bytes() == cached
        serving["doc"] = later.text.encode()
        assert (await cdir.refresh()).valid_after == va + INTERVAL
        serving["doc"] = good.text.encode()  # an older one: ignored, no rollback
        with pytest.raises(DirectoryUnavailable, match="older than ours"):
            await cdir.refresh()
        assert cdir.consensus.valid_after == va + INTERVAL
        assert (tmp_path / "client" / "cached-consensus").read_text() == later.text
    finally:
        reset_logging()
        for s in servers:
            await s.stop()
    events = [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]
    reasons = [e["reason"] for e in events if e.get("event") == "consensus rejected"]
    assert any("valid signatures from 1 of 3 configured authorities, need 2" in r for r in reasons)
    assert any("valid signatures from 0 of 3" in r for r in reasons)  # the forged one
    assert any("expired" in r for r in reasons)
    assert any("future-dated" in r for r in reasons)
    assert any("malformed" in r for r in reasons)


async def test_authority_refuses_bad_votes_and_uploads(dirnet):
    a = dirnet.authorities[0]
    with pytest.raises(DirRequestError, match="400"):
        await fetch("127.0.0.1", a.dir_port, "/tor/post/vote", b"onionp2p-network-status 1\n")
    # a vote signed by a key that is not an authority's
    from cryptography.hazmat.primitives.asymmetric import ed25519

    mallory = ed25519.Ed25519PrivateKey.generate()
    va = a.schedule.next_valid_after(time.time())
    v = NetworkStatus("vote", *a.schedule.times(va), (("mallory", mallory.public_key().public_bytes_raw()),), ())
    v = v.with_signatures([(v.voters[0][1], v.sign(mallory))])
    with pytest.raises(DirRequestError, match="unknown authority"):
        await fetch("127.0.0.1", a.dir_port, "/tor/post/vote", v.text.encode())
    with pytest.raises(DirRequestError, match="404"):
        await fetch("127.0.0.1", a.dir_port, "/nothing/here")
    with pytest.raises(DirRequestError, match="400"):
        await fetch("127.0.0.1", a.dir_port, "/tor/post/consensus-signature", b"junk\n")


# -- real processes ----------------------------------------------------------------------
class Proc:
    def __init__(self, tmp: Path, kind: str, name: str, config: str):
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        (self.dir / "node.toml").write_text(config)
        self.kind = kind
        self.proc: subprocess.Popen | None = None
        self.log = None

    def cli(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "onionp2p", self.kind, "--config", str(self.dir / "node.toml"),
                               *extra], capture_output=True, text=True, timeout=60)

    def start(self) -> Proc:
        self.log = open(self.dir / "log.txt", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "onionp2p", self.kind, "--config",
                                      str(self.dir / "node.toml")], stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def logtext(self) -> str:
        return (self.dir / "log.txt").read_text()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.log.close()


@pytest.mark.slow
async def test_authority_and_relay_processes(tmp_path, client, http_server):
    dir_ports = [free_port() for _ in range(3)]
    common = 'log_format = "json"\nlog_level = "info"\n'
    auths = []
    for i, port in enumerate(dir_ports):
        auths.append(Proc(tmp_path, "authority", f"auth{i}",
                          f'nickname = "auth{i}"\ndata_dir = "."\ndir_address = "127.0.0.1:{port}"\n'
                          f'or_address = "127.0.0.1:0"\nrun_relay = {"true" if i == 0 else "false"}\n'
                          "extend_allow_private = true\n" + common))
    lines = []
    for a in auths:
        out = a.cli("--show-identity")
        assert out.returncode == 0, out.stderr
        lines.append(out.stdout.strip())
    auth_list = json.dumps(lines)
    for a in auths:
        with open(a.dir / "node.toml", "a") as f:
            f.write(f"authorities = {auth_list}\nvoting_interval = {INTERVAL}\nstable_uptime = 0\n"
                    "assume_guard = true\nassume_exit = true\n")
    relays = [Proc(tmp_path, "relay", name,
                   f'nickname = "{name}"\ndata_dir = "."\nor_address = "127.0.0.1:0"\n'
                   f'exit_policy = {json.dumps(policy)}\nexit_reject_private = false\nextend_allow_private = true\n'
                   f"authorities = {auth_list}\n" + common)
              for name, policy in (("middle", "reject *:*"), ("exit", "accept 127.0.0.1:*"))]
    procs = auths + relays
    for p in procs:
        p.start()
    try:
        cdir = ClientDirectory(tmp_path / "client", lines, client)
        authorities = parse_authorities(lines)

        async def full_consensus():
            for a in authorities:
                try:
                    data = await fetch(a.host, a.dir_port, "/tor/status-vote/current/consensus", timeout=5)
                except DirRequestError:
                    continue
                doc = verify_consensus(data, authorities, time.time())
                if len(doc.routers) == 3 and len(doc.signatures) == 3:
                    return doc
            return None

        end = time.monotonic() + 90
        doc = None
        while doc is None:
            assert time.monotonic() < end, "no full consensus: " + " | ".join(p.logtext()[-2000:] for p in procs)
            doc = await full_consensus()
            await asyncio.sleep(0.5)
        assert {e.nickname for e in doc.routers} == {"auth0", "middle", "exit"}
        got = await cdir.bootstrap()
        assert len(got.signatures) == 3
        by_nick = {s.nickname: s for s in cdir.routers()}
        # BEGIN_DIR to the relay process (it caches the consensus soon after it is published)
        for _ in range(100):
            try:
                body = await cdir.fetch_via_relay(by_nick["middle"])
                break
            except DirRequestError:
                await asyncio.sleep(0.2)
        assert verify_consensus(body, authorities, time.time()).valid_after >= got.valid_after
        circ = await client.build_circuit([by_nick[n].info for n in ("auth0", "middle", "exit")])
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert await http_get(reader, writer, "/30000") == blob(30000)
        circ.close()
    finally:
        codes = [p.stop() for p in procs]
    assert codes == [0] * len(procs)
    for p in procs:
        assert "Traceback" not in p.logtext()
    assert "published consensus" in auths[0].logtext()


def test_authority_cli_reports_config_errors(tmp_path):
    other = authority_line("other", "127.0.0.1", 7999, load_or_create_authority_key(tmp_path / "other"))
    p = Proc(tmp_path, "authority", "auth", f'nickname = "auth"\ndata_dir = "."\nauthorities = ["{other}"]\n')
    out = p.cli()
    assert out.returncode == 2 and "not in the configured authorities" in out.stderr
    assert "Traceback" not in out.stderr
    shown = p.cli("--show-identity").stdout.strip()
    assert shown.startswith("auth 127.0.0.1:7000 ") and parse_authorities([shown])
