"""The onion-service service side's pure core (onionp2p/proto/hs/service.py), against the client
side's pure code: the descriptors it publishes are the ones a client finds and decrypts, its
INTRODUCE2 handling answers the client's INTRODUCE1 with a RENDEZVOUS1 the client accepts,
and it drops malformed, replayed, foreign and excess introductions with a reason."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.errors import HsIntroduceError
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.cells import Introduce1, Rendezvous1
from onionp2p.proto.hs.client import fetch_plan, make_introduce1
from onionp2p.proto.hs.desc import parse_descriptor
from onionp2p.proto.hs.ntor import expand_circuit_keys
from onionp2p.proto.hs.service import OnionServiceCore, relay_link_specs

NOW = 1_765_000_000.0  # a consensus valid-after (and the clock)


def _relay(i: int) -> RelayInfo:
    return RelayInfo(f"r{i}", "127.0.0.1", 5000 + i, os.urandom(20), os.urandom(32),
                     X25519PrivateKey.generate().public_key().public_bytes_raw())


@pytest.fixture
def world():
    relays = [_relay(i) for i in range(12)]
    svc = OnionServiceCore(ExpandedKey.from_seed(os.urandom(32)), rng=random.Random(1), now=NOW)
    for r in relays[:3]:
        svc.add_intro_point(r, NOW).established = True
    return svc, relays


@pytest.mark.parametrize("srvs", [(os.urandom(32), os.urandom(32)), (None, None)], ids=["consensus", "disaster"])
def test_the_client_finds_and_decrypts_what_the_service_publishes(world, srvs):
    svc, relays = world
    hsdirs = [r.ed_id for r in relays]
    cur, prev = srvs
    uploads = svc.upload_plan(hsdirs, valid_after=NOW, srv_current=cur, srv_previous=prev, now=NOW)
    assert len(uploads) == 2 and uploads[0].period.next() == uploads[1].period
    assert {u.srv_source for u in uploads} == {"consensus" if cur else "disaster"}
    assert all(len(u.hsdirs) == 8 for u in uploads)  # 2 replicas x hsdir_spread_store 4
    plan = fetch_plan(svc.identity.public, hsdirs, valid_after=NOW, srv_current=cur, srv_previous=prev)
    mine = next(u for u in uploads if u.blinded_key == plan.blinded_key)
    # every HSDir the client may ask (spread_fetch 3 per replica) got the descriptor
    assert set(plan.hsdirs) <= set(mine.hsdirs)
    desc = parse_descriptor(mine.text, blinded_key=plan.blinded_key, subcred=plan.subcred, now=NOW)
    assert [ip.auth_key for ip in desc.intro_points] == [ip.auth_public for ip in svc.intro_points]
    # a later upload under the same blinded key has a higher revision counter
    again = svc.upload_plan(hsdirs, valid_after=NOW, srv_current=cur, srv_previous=prev, now=NOW)
    assert all(b.revision_counter > a.revision_counter for a, b in zip(uploads, again))


def _introduce(svc, relays, ip_index=0):
    hsdirs = [r.ed_id for r in relays]
    uploads = svc.upload_plan(hsdirs, valid_after=NOW, srv_current=None, srv_previous=None, now=NOW)
    plan = fetch_plan(svc.identity.public, hsdirs, valid_after=NOW, srv_current=None, srv_previous=None)
    text = next(u.text for u in uploads if u.blinded_key == plan.blinded_key)
    desc = parse_descriptor(text, blinded_key=plan.blinded_key, subcred=plan.subcred, now=NOW)
    rp = relays[7]
    cookie = os.urandom(20)
    body, hs = make_introduce1(desc.intro_points[ip_index], plan.subcred, cookie,
                               relay_link_specs(rp.address, rp.or_port, rp.rsa_id, rp.ed_id), rp.ntor_key)
    return body, hs, cookie, rp


def test_introduce2_gives_the_rendezvous_the_client_expects(world):
    svc, relays = world
    body, hs, cookie, rp = _introduce(svc, relays)
    intro = svc.introduce2(svc.intro_points[0], body, NOW)
    assert intro.cookie == cookie and intro.rend_onion_key == rp.ntor_key
    assert intro.rend_relay_fields() == (rp.address, rp.or_port, rp.rsa_id, rp.ed_id)
    r1 = Rendezvous1.parse(intro.rendezvous1)
    assert r1.cookie == cookie
    client_keys = expand_circuit_keys(hs.complete(r1.handshake_info))
    assert intro.key_material == client_keys.key_material(service_side=True)
    assert svc.intro_points[0].introductions == 1 and svc.counts == {"accepted": 1}


def test_introduce2_refusals(world):
    svc, relays = world
    body, _, _, _ = _introduce(svc, relays)
    ip = svc.intro_points[0]
    svc.introduce2(ip, body, NOW)
    with pytest.raises(HsIntroduceError) as e:  # the very same cell again
        svc.introduce2(ip, body, NOW)
    assert e.value.reason == "replay"
    for bad in (b"", body[:30], bytes(20) + b"\x09" + body[21:]):
        with pytest.raises(HsIntroduceError) as e:
            svc.introduce2(ip, bad, NOW)
        assert e.value.reason == "malformed"
    with pytest.raises(HsIntroduceError) as e:  # sent to another intro point's circuit
        svc.introduce2(svc.intro_points[1], _introduce(svc, relays)[0], NOW)
    assert e.value.reason == "unknown_auth_key"
    cell = Introduce1.parse(body)
    flipped = bytearray(cell.encrypted)
    flipped[40] ^= 1  # the ciphertext changed: the MAC no longer matches
    with pytest.raises(HsIntroduceError) as e:
        svc.introduce2(ip, Introduce1(cell.auth_key, bytes(flipped)).encode(), NOW)
    assert e.value.reason == "bad_mac"
    assert svc.counts == {"accepted": 1, "replay": 1, "malformed": 3, "unknown_auth_key": 1, "bad_mac": 1}


def test_introduce2_rate_limit(world):
    svc0, relays = world
    svc = OnionServiceCore(svc0.identity, intro2_rate=1, intro2_burst=2, now=NOW)
    svc.add_intro_point(relays[0], NOW).established = True
    ok = [svc.introduce2(svc.intro_points[0], _introduce(svc, relays)[0], NOW) for _ in range(2)]
    assert len(ok) == 2
    with pytest.raises(HsIntroduceError) as e:
        svc.introduce2(svc.intro_points[0], _introduce(svc, relays)[0], NOW)
    assert e.value.reason == "rate_limited"
    svc.introduce2(svc.intro_points[0], _introduce(svc, relays)[0], NOW + 1.5)  # a token again


def test_intro_points_rotate(world):
    svc, relays = world
    assert svc.missing_intro_points() == 0
    assert svc.retire_intro_points(NOW + 3600) == []
    svc.intro_points[0].introductions = svc.intro_points[0].max_introductions
    assert len(svc.retire_intro_points(NOW + 3600)) == 1 and svc.missing_intro_points() == 1
    assert len(svc.retire_intro_points(NOW + 25 * 3600)) == 2 and svc.missing_intro_points() == 3


# -- the asyncio service on in-process relays ---------------------------------------------------------


@pytest.fixture
async def ournet(relay_net):
    """Three in-process relays as HSDirs, introduction and rendezvous points, a consensus
    view listing them (no SRVs: the disaster SRV), a path picker and the HTTP calls."""
    import time
    from types import SimpleNamespace

    from onionp2p.dir.server import DirServer, HttpResponse, http_request
    from onionp2p.proto.directory import RouterStatus

    flags = frozenset({"Fast", "Running", "Stable", "Valid", "HSDir", "V2Dir"})
    now = int(time.time())
    view = SimpleNamespace(routers=[RouterStatus(r.info(), flags) for r in relay_net], valid_after=now,
                           fresh_until=now + 3600, srv_current=None, srv_previous=None, params={})
    rng = random.SystemRandom()

    def pick(last):
        last = last if last is not None else rng.choice(view.routers).info
        return [*rng.sample([r.info for r in view.routers if r.info.rsa_id != last.rsa_id], 2), last]

    async def post(reader, writer, path, body):
        return await http_request(reader, writer, "POST", path, body, max_size=10_000, timeout=30)

    async def get(reader, writer, path):
        return await http_request(reader, writer, "GET", path, max_size=50_000, timeout=30)

    # each relay's directory cache answers BEGIN_DIR with its HSDir role (what RelayDirectory
    # serves, without the authorities these tests do not need)
    caches = []
    for r in relay_net:
        async def handle(req, r=r):
            status, text = r.hsdir.http(req.method, req.path, req.body, {}) or (404, b"not found\n")
            return HttpResponse(status, text)
        server = DirServer(handle, "127.0.0.1", 0, max_body=50_000, name="hsdir", kind="directory cache port")
        await server.start()
        r.exit.dir_port = server.port
        caches.append(server)
    yield SimpleNamespace(relays=relay_net, view=view, pick=pick, post=post, get=get)
    for server in caches:
        await server.stop()


async def test_service_end_to_end_on_our_relays(ournet, http_server, tmp_path, caplog):
    """An OnionService on three in-process relays (HSDirs, introduction and rendezvous points)
    publishes, and OnionServiceClient reaches it: 1 MB through the rendezvous, sha256 equal. A
    replayed and a malformed INTRODUCE2 are dropped with a log line; an unknown virtual port
    gets END and the rendezvous circuit is closed, as tor does."""
    import asyncio
    import logging
    import time

    from conftest import blob, http_get, sha256, wait_for

    from onionp2p.client.client import OnionClient
    from onionp2p.client.hskeys import load_or_create_service_key
    from onionp2p.client.hsclient import OnionServiceClient
    from onionp2p.client.hsservice import OnionService, parse_port_mapping
    from onionp2p.errors import StreamError
    from onionp2p.proto.hs.cells import DosParams, Introduce1
    from onionp2p.proto.relaycell import RelayCommand

    caplog.set_level(logging.INFO, logger="onionp2p.hs")
    relay_net, view, pick, post, get = ournet.relays, ournet.view, ournet.pick, ournet.post, ournet.get
    key = load_or_create_service_key(tmp_path / "hs")
    svc_client, user = OnionClient(), OnionClient()
    svc = OnionService(svc_client, key, [parse_port_mapping(f"80 127.0.0.1:{http_server.port}")],
                       directory=lambda: view, pick_path=pick, http_post=post, num_intro_points=2,
                       dos_defense=DosParams(100, 200))
    hs = OnionServiceClient(user, directory=lambda: view, pick_path=pick, http_get=get)
    try:
        await svc.start()
        await svc.wait_published(60)
        assert len(svc.core.established()) == 2
        # the introduction points took the DoS extension (HiddenServiceEnableIntroDoSDefense)
        at_ips = [r.hs.intro[ip.auth_public] for r in relay_net for ip in svc.core.intro_points
                  if ip.auth_public in r.hs.intro]
        assert len(at_ips) == 2 and all(c.intro_dos_explicit and (c.intro_dos.rate, c.intro_dos.burst) == (100, 200)
                                        for c in at_ips)
        reader, writer = await hs.connect(svc.address + ".onion", 80)
        body = await asyncio.wait_for(http_get(reader, writer, "/1000000"), 60)
        assert sha256(body) == sha256(blob(1_000_000))
        assert svc.counts["rendezvous"] == {"success": 1} and svc.counts["streams"] == {"accepted": 1}

        # the same INTRODUCE1 twice through one introduction point: the second is a replay
        _, desc = await hs.fetch_descriptor(key.public)
        ip = desc.intro_points[0]
        from onionp2p.proto.hs.client import make_introduce1
        from onionp2p.proto.hs.service import relay_link_specs
        rp = view.routers[0].info
        intro1, _ = make_introduce1(ip, hs.plan(key.public).subcred, os.urandom(20),
                                    relay_link_specs(rp.address, rp.or_port, rp.rsa_id, rp.ed_id), rp.ntor_key)
        from onionp2p.client.hsclient import intro_relay
        before = dict(svc.core.counts)
        for body1 in (intro1, intro1, Introduce1(ip.auth_key, os.urandom(20)).encode()):
            circ = await user.build_circuit(pick(intro_relay(ip)))  # (one introduction per circuit)
            circ.send_relay(RelayCommand.INTRODUCE1, 0, body1)
        await wait_for(lambda: svc.core.counts.get("replay", 0) == before.get("replay", 0) + 1
                       and svc.core.counts.get("malformed", 0) == before.get("malformed", 0) + 1, 20,
                       "the replay and the malformed INTRODUCE2 dropped")
        msgs = [r.getMessage() for r in caplog.records if "INTRODUCE2 dropped" in r.getMessage()]
        assert any("replay" in m for m in msgs) and any("malformed" in m for m in msgs)
        # (the first of the two was a genuine introduction: the service went to the rendezvous)

        # an unknown virtual port: END (DONE) and the rendezvous circuit closed
        with pytest.raises(StreamError):
            await hs.connect(svc.address + ".onion", 81)
        await wait_for(lambda: svc.counts["streams"].get("refused") == 1, 10, "the refusal counted")

        # an introduction circuit dies: a new introduction point replaces it and the
        # descriptor is uploaded again with it (a fresh client finds only live ones)
        uploads = svc.counts["uploads"]["success"]
        dead_ip, dead_circ = next(iter(svc._intro_circs.items()))
        dead_circ.close()
        await wait_for(lambda: len(svc.core.established()) == 2 and dead_ip not in svc.core.intro_points
                       and svc.counts["uploads"]["success"] > uploads, 30, "a new introduction point published")
        fresh = OnionServiceClient(user, directory=lambda: view, pick_path=pick, http_get=get)
        _, desc = await fresh.fetch_descriptor(key.public)
        assert {ip.auth_key for ip in desc.intro_points} == {ip.auth_public for ip in svc.core.intro_points}
        reader, writer = await fresh.connect(svc.address + ".onion", 80)
        assert await asyncio.wait_for(http_get(reader, writer, "/1000"), 30) == blob(1000)

        # a new time period (the consensus moved a day on): both descriptors for the new
        # periods are uploaded, and a client of that consensus finds the service
        uploads = svc.counts["uploads"]["success"]
        before = hs.plan(key.public).blinded_key
        view.valid_after += 86400
        view.fresh_until += 86400
        await wait_for(lambda: svc.counts["uploads"]["success"] >= uploads + 2, 30, "uploads for the new period")
        later = OnionServiceClient(user, directory=lambda: view, pick_path=pick, http_get=get)
        later.client_now = lambda: time.time() + 86400  # type: ignore[method-assign]
        assert later.plan(key.public).blinded_key != before  # (another period's descriptor)
        _, desc = await later.fetch_descriptor(key.public)
        assert len(desc.intro_points) == 2
    finally:
        await svc.stop()
        await svc_client.close()
        await user.close()


async def test_restricted_discovery_and_stream_limit(ournet, http_server, tmp_path, caplog):
    """A service with client authorization (tor's authorized_clients) is readable only with
    the client's x25519 key (tor's X'F4' without one, X'F5' with another); a rendezvous
    circuit that cannot be built is tried once more; max_streams 1 (HiddenServiceMaxStreams)
    refuses a second stream on the same rendezvous circuit while the first goes on."""
    import asyncio
    import logging

    from conftest import blob, free_port, http_get, wait_for

    from onionp2p.proto.directory import RelayInfo

    from onionp2p.client.client import OnionClient
    from onionp2p.client.hskeys import load_or_create_service_key
    from onionp2p.client.hsclient import HsConnectError, OnionServiceClient
    from onionp2p.client.hsservice import OnionService, parse_port_mapping

    caplog.set_level(logging.INFO, logger="onionp2p.hs")
    friend_key = X25519PrivateKey.generate()
    key = load_or_create_service_key(tmp_path / "hs")
    svc_client, user = OnionClient(), OnionClient()
    break_next = []  # a path whose first hop does not exist, for the next circuit the service builds
    dead = RelayInfo("dead", "127.0.0.1", free_port(), os.urandom(20), os.urandom(32), os.urandom(32))

    def service_pick(last):
        return [dead, *ournet.pick(last)[1:]] if break_next and break_next.pop() else ournet.pick(last)

    svc = OnionService(svc_client, key, [parse_port_mapping(f"80 127.0.0.1:{http_server.port}")],
                       directory=lambda: ournet.view, pick_path=service_pick, http_post=ournet.post,
                       num_intro_points=1, max_streams=1,
                       client_keys=[friend_key.public_key().public_bytes_raw()])

    def client(secret):
        return OnionServiceClient(user, directory=lambda: ournet.view, pick_path=ournet.pick, http_get=ournet.get,
                                  client_keys=lambda identity: secret)

    address = svc.address + ".onion"
    try:
        await svc.start()
        await svc.wait_published(60)
        for secret, kind in ((None, "missing_client_auth"), (X25519PrivateKey.generate(), "bad_client_auth")):
            with pytest.raises(HsConnectError) as e:
                await client(secret).connect(address, 80)
            assert e.value.kind == kind
        friend = client(friend_key)
        break_next.append(True)  # the rendezvous circuit's first build fails: tried once more
        r1, w1 = await friend.connect(address, 80)
        assert not break_next and any("rendezvous failed" in r.getMessage() and "'retrying': True" in r.getMessage()
                                      for r in caplog.records)
        with pytest.raises(HsConnectError):  # the same rendezvous circuit, a second stream
            await friend.connect(address, 80)
        await wait_for(lambda: svc.counts["streams"].get("refused") == 1, 10, "the refusal counted")
        assert await asyncio.wait_for(http_get(r1, w1, "/1000"), 30) == blob(1000)
        assert svc.counts["rendezvous"] == {"success": 1}
    finally:
        await svc.stop()
        await svc_client.close()
        await user.close()


def test_introduce2_from_random_bytes_only_raises_hs_introduce_error():
    """Whatever an introduction point relays, the core answers with HsIntroduceError (a log
    line and a count in the shell), never another exception; mutations of a genuine cell too."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    relays = [_relay(i) for i in range(12)]
    svc = OnionServiceCore(ExpandedKey.from_seed(os.urandom(32)), now=NOW, intro2_rate=1e9, intro2_burst=1e9)
    ip = svc.add_intro_point(relays[0], NOW)
    ip.established = True
    genuine, _, _, _ = _introduce(svc, relays)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=600),
                     st.tuples(st.integers(0, len(genuine) - 1), st.integers(1, 255)).map(
                         lambda t: genuine[:t[0]] + bytes([genuine[t[0]] ^ t[1]]) + genuine[t[0] + 1:]),
                     st.integers(0, len(genuine)).map(lambda n: genuine[:n])))
    def check(body):
        try:
            svc.introduce2(ip, body, NOW)
        except HsIntroduceError:
            pass

    check()
    assert sum(svc.counts.values()) >= 300
