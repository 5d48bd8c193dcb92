"""The relay roles of onion services v3 (specs/onion-services-relay.md): the cell codecs
against cells tor made, the rendezvous point (splice with tor1 and with CGO hops), the
introduction point (ESTABLISH_INTRO checks, INTRODUCE1 -> INTRODUCE2, INTRODUCE_ACK, the
INTRODUCE2 DoS defense), the HSDir (publish and fetch over BEGIN_DIR, the revision rule;
the HSDir flag from a real authority), and malformed requests. Everything runs on real
relays over real TLS on 127.0.0.1, with circuits built by the client core; the test plays
the onion-service client and service ends itself."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import time
from pathlib import Path

import pytest
from conftest import free_port, relay_config, wait_for
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.client.client import OnionClient
from onionp2p.config import AuthorityConfig
from onionp2p.dir.authority import (
    Authority,
    FlagRules,
    Reachability,
    authority_line,
    flags_for,
    load_or_create_authority_key,
)
from onionp2p.dir.client import RelayDirectory
from onionp2p.dir.server import DirRequestError, http_request
from onionp2p.errors import ProtocolError
from onionp2p.ops.metrics import RelayCollector, render_metrics
from onionp2p.proto import protover
from onionp2p.proto.certs import CertType, Ed25519Cert, expiry_hours
from onionp2p.proto.directory import ServerDescriptor, parse_authorities
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.hs.cells import (
    ESTABLISH_INTRO_SIG_PREFIX,
    DosParams,
    EstablishIntro,
    EstablishRendezvous,
    Extension,
    IntroAckStatus,
    Introduce1,
    IntroduceAck,
    IntroEstablished,
    Rendezvous1,
    Rendezvous2,
    mac_sha3_256,
    parse_hs_message,
)
from onionp2p.proto.hs.ntor import HsNtorClient, expand_circuit_keys, service_receive_intro
from onionp2p.proto.relaycell import HS_COMMANDS, RelayCommand
from onionp2p.relay import hs as hs_module
from onionp2p.relay.hs import IntroDosParams
from onionp2p.relay.hsdir import DESC_SIG_PREFIX, HsDirCache, parse_outer
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

# Cells tor 0.4.5.0-alpha-dev sent in a chutney network, as Arti keeps them in
# crates/tor-cell/tests/testvec_relaymsg.rs (https://gitlab.torproject.org/tpo/core/arti).
TOR_ESTABLISH_INTRO = bytes.fromhex(
    "0200200450EFF847E40C180888F5EB9179F9B59F043385834B4C373C328E12FDFF46B400546514E3BA58E954"
    "09828A235B6390B3729B4CB8E8607024081C860E1A0D40DC0040AF031A801FE9822853D4674C5061B0352F7E"
    "2487415E25E25554C0DBF88146BCA9EBD2BD62338ADF3CC217658110EF38DB505C77B2FB38A1C0AF3C22C948F604"
)
TOR_INTRODUCE1 = bytes.fromhex(
    "000000000000000000000000000000000000000002002011AAA1BA28353424061A63326C3BFF4FE4EC7EC24BB5"
    "EB740E9D167DEF103206001E99C1B9B0C24E6C63E9A182C33A8969DF94D08FD9FE98D82E21B262AE6CBC4E5897"
    "1D6A38426C5D52519AB03377274AF74D2332C8FB599BFCBC5F2B02ECDAC4025EE24B63A824101E29EB9917B1C3"
)
TOR_ESTABLISH_RENDEZVOUS = bytes.fromhex("4AA2BAF815CEBB4B922B5BF6F545AEE0DDBE1254")


# -- helpers ------------------------------------------------------------------------------------


def hs_inbox(circ) -> asyncio.Queue:
    """The onion-service messages ``circ`` receives, as (hop, command, body)."""
    q: asyncio.Queue = asyncio.Queue()
    circ.on_hs_message = lambda hop, cmd, data: q.put_nowait((hop, cmd, data))
    return q


async def expect(q: asyncio.Queue, command: int, timeout: float = 15.0) -> tuple[int, bytes]:
    hop, cmd, data = await asyncio.wait_for(q.get(), timeout)
    assert cmd == command, f"got {RelayCommand(cmd).name}, wanted {RelayCommand(command).name}"
    return hop, data


async def closed(circ, timeout: float = 15.0) -> None:
    await wait_for(lambda: circ.core.closed, timeout, "the circuit closed")


def torn_down(relay: Relay, reason: str) -> int:
    """Circuits ``relay`` destroyed with ``reason`` (a client past the first hop sees only
    DESTROYED: the middle relays hide the reason, as tor's do)."""
    return relay.destroy_reasons[reason]


def client_violations(caplog, hop: int) -> list[dict]:
    return [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict)
        and r.msg.get("event") == "protocol violation: relay cell dropped"
        and r.msg.get("from_hop") == hop
    ]


def pem(kind: str, raw: bytes) -> str:
    b = base64.b64encode(raw).decode()
    return (
        f"-----BEGIN {kind}-----\n"
        + "\n".join(b[i : i + 64] for i in range(0, len(b), 64))
        + f"\n-----END {kind}-----\n"
    )


def make_descriptor(
    blinded: ed25519.Ed25519PrivateKey,
    signing: ed25519.Ed25519PrivateKey,
    revision: int,
    *,
    now: float,
    lifetime_min: int = 180,
    cert_hours: float = 3,
    blob: bytes | None = None,
) -> bytes:
    """A v3 descriptor's outer layer as a service makes it (the superencrypted part random)."""
    cert = Ed25519Cert.create(
        CertType.HS_BLINDED_ID_V_SIGNING,
        signing.public_key().public_bytes_raw(),
        blinded,
        expires_hours=expiry_hours(now + cert_hours * 3600),
    )
    body = (
        f"hs-descriptor 3\ndescriptor-lifetime {lifetime_min}\ndescriptor-signing-key-cert\n"
        f"{pem('ED25519 CERT', cert.encode())}revision-counter {revision}\nsuperencrypted\n"
        f"{pem('MESSAGE', blob if blob is not None else os.urandom(1000))}"
    )
    sig = signing.sign(DESC_SIG_PREFIX + body.encode())
    return (body + "signature " + base64.b64encode(sig).decode().rstrip("=") + "\n").encode()


def b64key(key: ed25519.Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes_raw()).decode().rstrip("=")


@pytest.fixture(params=[True, False], ids=["cgo", "tor1"])
async def clients(request):
    """Two clients (the onion-service client and the service), CGO or tor1 on every hop."""
    a, b = OnionClient(cgo=request.param), OnionClient(cgo=request.param)
    yield a, b
    await a.close()
    await b.close()


# -- codecs ---------------------------------------------------------------------------------------


def test_codecs_read_cells_tor_made():
    cell = EstablishIntro.parse(TOR_ESTABLISH_INTRO)
    assert (cell.auth_key_type, len(cell.auth_key), cell.extensions, len(cell.sig)) == (2, 32, (), 64)
    assert cell.encode() == TOR_ESTABLISH_INTRO
    # SIG covers the prefix and everything up to SIG_LEN: tor's signature checks with our layout
    ed25519.Ed25519PublicKey.from_public_bytes(cell.auth_key).verify(
        cell.sig, ESTABLISH_INTRO_SIG_PREFIX + TOR_ESTABLISH_INTRO[: cell.sig_end]
    )
    assert cell.mac_end == 1 + 2 + 32 + 1 and cell.sig_end == cell.mac_end + 32
    with pytest.raises(ProtocolError, match="handshake_auth"):  # we do not know its circuit's KH
        cell.verify(bytes(20))

    intro = Introduce1.parse(TOR_INTRODUCE1)
    intro.validate()
    assert intro.legacy_key_id == bytes(20) and intro.auth_key.hex().startswith("11aaa1ba")
    assert intro.encode() == TOR_INTRODUCE1 and len(intro.encrypted) == len(TOR_INTRODUCE1) - 20 - 3 - 32 - 1
    assert EstablishRendezvous.parse(TOR_ESTABLISH_RENDEZVOUS).encode() == TOR_ESTABLISH_RENDEZVOUS
    assert IntroEstablished.parse(b"\x00") == IntroEstablished() and IntroEstablished().encode() == b"\x00"
    assert IntroduceAck.parse(bytes.fromhex("000000")) == IntroduceAck(IntroAckStatus.SUCCESS)
    assert IntroduceAck(IntroAckStatus.UNKNOWN_ID).encode() == bytes.fromhex("000100")


def test_codecs_make_and_check_establish_intro():
    key = ed25519.Ed25519PrivateKey.generate()
    kh = os.urandom(20)
    cell = EstablishIntro.create(key, kh, (DosParams(25, 200).extension(), Extension(77, b"xyz")))
    raw = cell.encode()
    # tor's trunnel layout, byte for byte
    assert raw[:3] == b"\x02\x00\x20" and raw[3:35] == key.public_key().public_bytes_raw()
    assert raw[35:36] == b"\x02" and raw[36:38] == b"\x01\x13" and raw[38:39] == b"\x02"
    assert raw[39:48] == b"\x01" + (25).to_bytes(8, "big") and raw[48:57] == b"\x02" + (200).to_bytes(
        8, "big"
    )
    assert raw[57:62] == b"\x4d\x03xyz"
    assert raw[62:94] == mac_sha3_256(kh, raw[:62]) and raw[94:96] == b"\x00\x40" and len(raw) == 160
    parsed = EstablishIntro.parse(raw)
    parsed.verify(kh)
    assert parsed.dos_params() == DosParams(25, 200)
    with pytest.raises(ProtocolError, match="handshake_auth"):
        parsed.verify(kh[:-1] + bytes([kh[-1] ^ 1]))
    forged = bytearray(raw)
    forged[-1] ^= 1
    with pytest.raises(ProtocolError, match="signature"):
        EstablishIntro.parse(bytes(forged)).verify(kh)
    # MAC(k, m) = SHA3-256(len(k) u64 | k | m)
    import hashlib

    assert mac_sha3_256(b"key", b"msg") == hashlib.sha3_256(b"\0" * 7 + b"\x03keymsg").digest()


def test_codecs_refuse_malformed_bodies_with_protocol_error_only():
    for n in range(len(TOR_ESTABLISH_INTRO)):  # every truncation of a real cell
        with pytest.raises(ProtocolError):
            parse_hs_message(RelayCommand.ESTABLISH_INTRO, TOR_ESTABLISH_INTRO[:n])
    for n in range(20 + 3 + 32 + 1):  # ... up to INTRODUCE1's extensions
        with pytest.raises(ProtocolError):
            parse_hs_message(RelayCommand.INTRODUCE1, TOR_INTRODUCE1[:n])
    with pytest.raises(ProtocolError, match="auth key type"):
        Introduce1.parse(bytes(20) + b"\x07\x00\x00\x00")
    with pytest.raises(ProtocolError, match="legacy key"):
        Introduce1.parse(b"\x01" + TOR_INTRODUCE1[1:]).validate()
    with pytest.raises(ProtocolError):
        EstablishRendezvous.parse(TOR_ESTABLISH_RENDEZVOUS + b"\x00")
    with pytest.raises(ProtocolError):
        Rendezvous1.parse(bytes(19))
    with pytest.raises(ProtocolError, match="unknown status"):
        IntroduceAck.parse(b"\x00\x09\x00")
    rng = random.Random(15)
    for _ in range(3000):
        cmd = rng.choice(sorted(HS_COMMANDS))
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        try:
            parse_hs_message(cmd, body)
        except ProtocolError:
            pass


def test_intro_dos_parameters_follow_tor():
    assert IntroDosParams.from_consensus({}) == IntroDosParams(False, 25, 200)
    assert IntroDosParams.from_consensus(
        {
            "HiddenServiceEnableIntroDoSDefense": 1,
            "HiddenServiceEnableIntroDoSRatePerSec": 7,
            "HiddenServiceEnableIntroDoSBurstPerSec": -3,
        }
    ) == IntroDosParams(True, 7, 200)
    assert IntroDosParams.from_extension(10, 20) == IntroDosParams(True, 10, 20)
    assert not IntroDosParams.from_extension(0, 20).enabled  # 0 disables
    assert not IntroDosParams.from_extension(30, 20).enabled  # burst below rate: invalid, disabled
    assert not IntroDosParams.from_extension(10, 1 << 31).enabled  # over INT32_MAX


def test_protover_lists_the_onion_service_roles():
    for line in (protover.SUPPORTED, protover.WITHOUT_CGO, protover.WITHOUT_CC):
        assert protover.supports(line, "HSDir", 2)
        assert protover.supports(line, "HSIntro", 4) and protover.supports(line, "HSIntro", 5)
        assert not protover.supports(line, "HSIntro", 3)  # v2's legacy keys: refused
        assert protover.supports(line, "HSRend", 1) and protover.supports(line, "HSRend", 2)
        assert protover.format_protocols(protover.parse(line)) == line


# -- rendezvous point -------------------------------------------------------------------------------


async def test_rendezvous_splices_two_circuits(relay_net, clients, caplog):
    caplog.set_level(logging.DEBUG, logger="onionp2p.client")
    r0, r1, rp = relay_net
    alice, bob = clients  # the onion-service client, the service
    a = await alice.build_circuit([r0.info(), r1.info(), rp.info()])
    b = await bob.build_circuit([r1.info(), r0.info(), rp.info()])
    a_in = hs_inbox(a)
    cookie = os.urandom(20)
    a.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(cookie).encode())
    hop, body = await expect(a_in, RelayCommand.RENDEZVOUS_ESTABLISHED)
    assert hop == 2 and body == b""
    assert rp.hs.rend.keys() == {cookie}

    # a second circuit asking for the same cookie is closed; the first keeps it
    thief = await bob.build_circuit([r0.info(), rp.info()])
    thief.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(cookie).encode())
    await closed(thief)
    assert torn_down(rp, "PROTOCOL") == 1
    assert rp.hs.rend[cookie][0].splice_peer is None and rp.hs.counts["est_rend"]["duplicate_cookie"] == 1
    # ... and so is a second ESTABLISH_RENDEZVOUS on a circuit that already has one
    twice = await bob.build_circuit([r1.info(), rp.info()])
    twice.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(os.urandom(20)).encode())
    await expect(hs_inbox(twice), RelayCommand.RENDEZVOUS_ESTABLISHED)
    twice.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(os.urandom(20)).encode())
    await closed(twice)
    assert torn_down(rp, "PROTOCOL") == 2

    # hs-ntor as the introduction would run it: the service answers in RENDEZVOUS1 and adds
    # the end-to-end layer (directions swapped, as tor's service side does); the client adds
    # its own as RENDEZVOUS2 arrives
    enc = X25519PrivateKey.generate()
    auth = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    subcred = os.urandom(32)
    hs_client = HsNtorClient(enc.public_key().public_bytes_raw(), auth, subcred)
    header = os.urandom(40)
    intro = service_receive_intro(enc, auth, subcred, header, hs_client.encrypt_intro(header, cookie))
    info, seed = intro.reply(enc, auth)
    a.expect_rendezvous(lambda hi: expand_circuit_keys(hs_client.complete(hi)).key_material())
    b.send_relay(RelayCommand.RENDEZVOUS1, 0, Rendezvous1(cookie, info).encode())
    b.add_virtual_hop(expand_circuit_keys(seed).key_material(service_side=True))
    # RENDEZVOUS2 with its HANDSHAKE_INFO reaches the client, which then has the fourth layer
    hop, body = await expect(a_in, RelayCommand.RENDEZVOUS2)
    assert hop == 2 and Rendezvous2.parse(body).handshake_info == info
    assert cookie not in rp.hs.rend and rp.hs.counts["rend1"]["success"] == 1
    assert a.core.n_hops == b.core.n_hops == 4 and a.core.layers[3].relay_crypto == "hs"
    # client -> service: a BEGIN crosses the splice and is recognized by the service's
    # end-to-end layer (its digest covers the whole cell), not by any relay
    opening = asyncio.ensure_future(a.open_stream("service.invalid", 80, timeout=20))
    await wait_for(lambda: a.core.streams, 10, "the stream registered")
    sid = next(iter(a.core.streams))
    await wait_for(
        lambda: any(
            v["relay_cmd"] == "BEGIN" and v["stream_id"] == sid for v in client_violations(caplog, 3)
        ),
        15,
        "BEGIN at the service's end",
    )
    # service -> client: CONNECTED and DATA come back through the splice to the stream
    b.send_relay(RelayCommand.CONNECTED, sid, b"", hop=3)
    reader, writer = await opening
    payload = os.urandom(1500)
    for i in range(0, len(payload), 400):
        b.send_relay(RelayCommand.DATA, sid, payload[i : i + 400], hop=3)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 15) == payload
    # client -> service: DATA reaches the service's layer (as many cells as were sent)
    writer.write(os.urandom(498 * 3))
    await wait_for(
        lambda: (
            sum(v["relay_cmd"] == "DATA" and v["stream_id"] == sid for v in client_violations(caplog, 3)) >= 3
        ),
        15,
        "DATA at the service's end",
    )
    assert not client_violations(caplog, 2) and not client_violations(
        caplog, 0
    )  # no relay saw them as theirs
    joined = [c for c in rp.circuits if c.hs_purpose == "rend_joined"]
    assert len(joined) == 2 and joined[0].splice_peer is joined[1]

    # when one side closes, the rendezvous point closes the other
    a.close()
    await closed(b)
    await wait_for(lambda: not any(c.hs_purpose for c in rp.circuits), 10, "the joined circuits gone")


async def test_rendezvous1_refusals_and_waiting_limit(relay_net, clients, monkeypatch):
    r0, r1, rp = relay_net
    alice, bob = clients
    unknown = await bob.build_circuit([r0.info(), rp.info()])
    unknown.send_relay(RelayCommand.RENDEZVOUS1, 0, Rendezvous1(os.urandom(20), os.urandom(64)).encode())
    await closed(unknown)
    assert torn_down(rp, "PROTOCOL") == 1
    assert rp.hs.counts["rend1"]["unknown_cookie"] == 1
    short = await bob.build_circuit([r0.info(), rp.info()])
    short.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, os.urandom(19))
    await closed(short)
    assert torn_down(rp, "PROTOCOL") == 2
    # a cookie nobody joins expires (the clock is the relay's: we move it on)
    waiting = await alice.build_circuit([r1.info(), rp.info()])
    waiting.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(os.urandom(20)).encode())
    await expect(hs_inbox(waiting), RelayCommand.RENDEZVOUS_ESTABLISHED)
    t = time.monotonic()
    rp.hs.clock = lambda: t + 301.0
    rp.hs.sweep()
    await closed(waiting)
    assert torn_down(rp, "FINISHED") == 1
    assert not rp.hs.rend and rp.hs.counts["est_rend"]["expired"] == 1
    # at most REND_PENDING_MAX cookies wait at once (here 1): one more is RESOURCELIMIT
    monkeypatch.setattr(hs_module, "REND_PENDING_MAX", 1)
    first = await alice.build_circuit([r1.info(), rp.info()])
    first.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(os.urandom(20)).encode())
    await expect(hs_inbox(first), RelayCommand.RENDEZVOUS_ESTABLISHED)
    second = await alice.build_circuit([r0.info(), rp.info()])
    second.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(os.urandom(20)).encode())
    await closed(second)
    assert torn_down(rp, "RESOURCELIMIT") == 1 and len(rp.hs.rend) == 1


# -- introduction point -------------------------------------------------------------------------------


async def establish_intro(client, path, key, *, dos: DosParams | None = None, kh: bytes | None = None):
    circ = await client.build_circuit(path)
    inbox = hs_inbox(circ)
    exts = (dos.extension(),) if dos is not None else ()
    circ.send_relay(
        RelayCommand.ESTABLISH_INTRO,
        0,
        EstablishIntro.create(key, circ.core.layers[-1].kh if kh is None else kh, exts).encode(),
    )
    return circ, inbox


async def test_introduction_point(relay_net, clients):
    r0, r1, ip = relay_net
    client, service = clients
    key = ed25519.Ed25519PrivateKey.generate()
    auth = key.public_key().public_bytes_raw()

    # a MAC made with another circuit's KH, a signature by another key, a v2 key type: refused
    other = await service.build_circuit([r0.info(), ip.info()])
    bad_mac, _ = await establish_intro(service, [r1.info(), ip.info()], key, kh=other.core.layers[-1].kh)
    await closed(bad_mac)
    forged = await service.build_circuit([r1.info(), ip.info()])
    good = EstablishIntro.create(key, forged.core.layers[-1].kh).encode()
    forged.send_relay(RelayCommand.ESTABLISH_INTRO, 0, good[:-1] + bytes([good[-1] ^ 0x20]))
    await closed(forged)
    legacy = await service.build_circuit([r1.info(), ip.info()])
    legacy.send_relay(RelayCommand.ESTABLISH_INTRO, 0, b"\x00" + good[1:])
    await closed(legacy)
    assert not ip.hs.intro and ip.hs.counts["est_intro"]["malformed"] == 3
    assert torn_down(ip, "PROTOCOL") == 3

    # the real thing
    svc, svc_in = await establish_intro(service, [r0.info(), ip.info()], key)
    hop, body = await expect(svc_in, RelayCommand.INTRO_ESTABLISHED)
    assert hop == 1 and IntroEstablished.parse(body) == IntroEstablished()
    assert set(ip.hs.intro) == {auth}

    # INTRODUCE1 -> INTRODUCE2 (the same bytes) to the service, INTRODUCE_ACK(SUCCESS) back
    c1 = await client.build_circuit([r1.info(), ip.info()])
    c1_in = hs_inbox(c1)
    intro1 = Introduce1(auth, os.urandom(300), (Extension(9, b"ext"),)).encode()
    c1.send_relay(RelayCommand.INTRODUCE1, 0, intro1)
    hop, body = await expect(c1_in, RelayCommand.INTRODUCE_ACK)
    assert IntroduceAck.parse(body).status == IntroAckStatus.SUCCESS
    hop, body = await expect(svc_in, RelayCommand.INTRODUCE2)
    assert body == intro1
    # one introduction per circuit: a second one closes it
    c1.send_relay(RelayCommand.INTRODUCE1, 0, intro1)
    await closed(c1)
    assert torn_down(ip, "PROTOCOL") == 4

    # an auth key nobody established: UNKNOWN_ID; a malformed body: BAD_FORMAT
    c2 = await client.build_circuit([r0.info(), ip.info()])
    c2_in = hs_inbox(c2)
    c2.send_relay(RelayCommand.INTRODUCE1, 0, Introduce1(os.urandom(32), os.urandom(100)).encode())
    assert (
        IntroduceAck.parse((await expect(c2_in, RelayCommand.INTRODUCE_ACK))[1]).status
        == IntroAckStatus.UNKNOWN_ID
    )
    c3 = await client.build_circuit([r0.info(), ip.info()])
    c3_in = hs_inbox(c3)
    c3.send_relay(RelayCommand.INTRODUCE1, 0, b"\x01" + intro1[1:])  # non-zero legacy key ID
    assert (
        IntroduceAck.parse((await expect(c3_in, RelayCommand.INTRODUCE_ACK))[1]).status
        == IntroAckStatus.BAD_FORMAT
    )
    # a single-hop client may not introduce (tor): closed
    one_hop = await client.build_circuit([ip.info()])
    one_hop.send_relay(RelayCommand.INTRODUCE1, 0, intro1)
    await closed(one_hop)
    assert one_hop.close_reason == "PROTOCOL" and torn_down(ip, "PROTOCOL") == 5
    assert svc_in.empty()

    # a newer circuit with the same auth key replaces the old one (closed, FINISHED)
    svc2, svc2_in = await establish_intro(service, [r1.info(), ip.info()], key)
    await expect(svc2_in, RelayCommand.INTRO_ESTABLISHED)
    await closed(svc)
    assert torn_down(ip, "FINISHED") == 1
    c4 = await client.build_circuit([r0.info(), ip.info()])
    c4_in = hs_inbox(c4)
    c4.send_relay(RelayCommand.INTRODUCE1, 0, intro1)
    assert (
        IntroduceAck.parse((await expect(c4_in, RelayCommand.INTRODUCE_ACK))[1]).status
        == IntroAckStatus.SUCCESS
    )
    assert (await expect(svc2_in, RelayCommand.INTRODUCE2))[1] == intro1
    counts = ip.hs.counts["intro1"]
    assert (
        counts["success"],
        counts["unknown_service"],
        counts["malformed"],
        counts["single_hop"],
        counts["circuit_reused"],
    ) == (2, 1, 1, 1, 1)
    text = render_metrics(RelayCollector(ip)())
    assert 'onionp2p_relay_intro1_total{action="success"} 2' in text
    assert 'onionp2p_relay_hs_circuits{role="intro"} 1' in text
    # the service's circuit goes: the auth key is forgotten
    svc2.close()
    await wait_for(lambda: not ip.hs.intro, 10, "the introduction circuit forgotten")


async def test_intro_dos_defense_refuses_introductions_over_the_rate(relay_net, clients):
    r0, r1, ip = relay_net
    client, service = clients
    key = ed25519.Ed25519PrivateKey.generate()
    auth = key.public_key().public_bytes_raw()
    _svc, svc_in = await establish_intro(service, [r0.info(), ip.info()], key, dos=DosParams(rate=1, burst=3))
    await expect(svc_in, RelayCommand.INTRO_ESTABLISHED)
    assert ip.hs.intro[auth].intro_dos == IntroDosParams(True, 1, 3)
    # one client circuit per introduction (tor allows one per circuit), all built first
    circs = [await client.build_circuit([r1.info(), ip.info()]) for _ in range(5)]
    inboxes = [hs_inbox(c) for c in circs]
    t = time.monotonic()
    ip.hs.clock = lambda: t  # the bucket refills once per second: hold the relay's clock still

    async def introduce(i: int) -> int:
        circs[i].send_relay(RelayCommand.INTRODUCE1, 0, Introduce1(auth, os.urandom(80)).encode())
        return IntroduceAck.parse((await expect(inboxes[i], RelayCommand.INTRODUCE_ACK))[1]).status

    statuses = [await introduce(i) for i in range(4)]
    # tor's bucket: take a token, relay only if one is left -> burst - 1 at once
    assert statuses == [IntroAckStatus.SUCCESS] * 2 + [IntroAckStatus.UNKNOWN_ID] * 2
    assert ip.hs.counts["intro1"]["rate_limited"] == 2
    # two seconds later, two more tokens: one introduction (one token must stay, as above)
    ip.hs.clock = lambda: t + 2.0
    assert await introduce(4) == IntroAckStatus.SUCCESS
    await wait_for(lambda: svc_in.qsize() >= 3, 10, "three INTRODUCE2 at the service")
    await asyncio.sleep(0.3)
    assert svc_in.qsize() == 3  # and no more

    # without the extension the consensus decides (default: no defense; here: on, burst 2)
    key2 = ed25519.Ed25519PrivateKey.generate()
    ip.hs.params = lambda: {
        "HiddenServiceEnableIntroDoSDefense": 1,
        "HiddenServiceEnableIntroDoSRatePerSec": 1,
        "HiddenServiceEnableIntroDoSBurstPerSec": 2,
    }
    _svc2, svc2_in = await establish_intro(service, [r1.info(), ip.info()], key2)
    await expect(svc2_in, RelayCommand.INTRO_ESTABLISHED)
    assert ip.hs.intro[key2.public_key().public_bytes_raw()].intro_dos == IntroDosParams(True, 1, 2)
    # a well-formed DoS extension, even one without parameters, is the service's choice:
    # here "no defense", whatever the consensus says
    key3 = ed25519.Ed25519PrivateKey.generate()
    _svc3, svc3_in = await establish_intro(service, [r0.info(), ip.info()], key3)
    await expect(svc3_in, RelayCommand.INTRO_ESTABLISHED)
    assert ip.hs.intro[key3.public_key().public_bytes_raw()].intro_dos.enabled
    key4 = ed25519.Ed25519PrivateKey.generate()
    svc4 = await service.build_circuit([r0.info(), ip.info()])
    svc4_in = hs_inbox(svc4)
    svc4.send_relay(RelayCommand.ESTABLISH_INTRO, 0,
                    EstablishIntro.create(key4, svc4.core.layers[-1].kh, (Extension(1, b"\x00"),)).encode())
    await expect(svc4_in, RelayCommand.INTRO_ESTABLISHED)
    circ4 = ip.hs.intro[key4.public_key().public_bytes_raw()]
    assert circ4.intro_dos_explicit and not circ4.intro_dos.enabled
    ip.hs.params = dict  # the consensus drops it: the circuit follows (tor's update_intro_circuits)
    c = await client.build_circuit([r0.info(), ip.info()])
    c_in = hs_inbox(c)
    c.send_relay(RelayCommand.INTRODUCE1, 0, Introduce1(key2.public_key().public_bytes_raw(), b"x").encode())
    assert (
        IntroduceAck.parse((await expect(c_in, RelayCommand.INTRODUCE_ACK))[1]).status
        == IntroAckStatus.SUCCESS
    )
    assert not ip.hs.intro[key2.public_key().public_bytes_raw()].intro_dos.enabled


async def test_malformed_onion_service_requests_close_cleanly(relay_net, clients):
    r0, r1, relay = relay_net
    client, _ = clients
    rng = random.Random(7)
    closes = 0
    for cmd in (RelayCommand.ESTABLISH_INTRO, RelayCommand.ESTABLISH_RENDEZVOUS, RelayCommand.RENDEZVOUS1):
        for _ in range(3):
            circ = await client.build_circuit([r0.info(), relay.info()])
            body = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 19, 21, 33, 59))))
            circ.send_relay(cmd, 0, body)
            await closed(circ)
            closes += 1
            assert torn_down(relay, "PROTOCOL") == closes
    # on a stream (only tor1's message format can say that), or at a middle hop: closed too
    if not client.cgo:
        circ = await client.build_circuit([r0.info(), relay.info()])
        circ.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 5, os.urandom(20))
        await closed(circ)
        closes += 1
        assert torn_down(relay, "PROTOCOL") == closes
    circ = await client.build_circuit([r0.info(), relay.info(), r1.info()])
    circ.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, os.urandom(20), hop=1)
    await closed(circ)
    assert torn_down(relay, "PROTOCOL") == closes + 1
    # messages meant for clients are dropped at a relay, as tor does: the circuit stays
    circ = await client.build_circuit([r0.info(), relay.info()])
    inbox = hs_inbox(circ)
    circ.send_relay(RelayCommand.INTRODUCE2, 0, os.urandom(40))
    circ.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, os.urandom(20))
    await expect(inbox, RelayCommand.RENDEZVOUS_ESTABLISHED)
    # the relay goes on serving
    assert (
        relay.hs.counts["est_intro"]["malformed"]
        + relay.hs.counts["est_rend"]["malformed"]
        + relay.hs.counts["rend1"]["malformed"]
        + relay.hs.counts["rend1"]["unknown_cookie"]
        == 9
    )


# -- HSDir --------------------------------------------------------------------------------------------


def test_hsdir_cache_rules():
    now = time.time()
    blinded, signing = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    cache = HsDirCache(max_bytes=10_000)
    d5 = make_descriptor(blinded, signing, 5, now=now, lifetime_min=60)
    outer = parse_outer(d5, now)
    assert (outer.blinded_key, outer.revision, outer.lifetime) == (
        blinded.public_key().public_bytes_raw(),
        5,
        3600,
    )
    cache.store(d5, now)
    key = outer.blinded_key
    with pytest.raises(ProtocolError, match="revision"):
        cache.store(make_descriptor(blinded, signing, 5, now=now), now)
    with pytest.raises(ProtocolError, match="revision"):
        cache.store(make_descriptor(blinded, signing, 4, now=now), now)
    d6 = make_descriptor(blinded, signing, 6, now=now, lifetime_min=60)
    cache.store(d6, now + 10)
    assert cache.lookup(key, now + 10) == d6
    # expiry: descriptor-lifetime after it was stored
    assert cache.lookup(key, now + 10 + 3599) == d6
    assert cache.lookup(key, now + 10 + 3600) is None
    cache.expire(now + 10 + 3600)
    assert not cache.entries and cache.bytes == 0
    # what an HSDir refuses
    for bad, why in (
        (make_descriptor(blinded, signing, 1, now=now, lifetime_min=721), "lifetime"),
        (make_descriptor(blinded, signing, 1, now=now, cert_hours=-2), "expired"),
        (
            make_descriptor(blinded, signing, 1, now=now).replace(
                b"revision-counter 1", b"revision-counter 2"
            ),
            "signature",
        ),
        (
            make_descriptor(blinded, signing, 1, now=now).replace(b"hs-descriptor 3", b"hs-descriptor 2"),
            "version",
        ),
        (make_descriptor(blinded, signing, 1, now=now, blob=b"short"), "too short"),
    ):
        with pytest.raises(ProtocolError, match=why):
            parse_outer(bad, now)
    # a certificate signed by another key than the one it names
    other = ed25519.Ed25519PrivateKey.generate()
    cert = Ed25519Cert.create(
        CertType.HS_BLINDED_ID_V_SIGNING,
        signing.public_key().public_bytes_raw(),
        other,
        expires_hours=expiry_hours(now + 3600),
    )
    lying = Ed25519Cert(
        cert.cert_type,
        cert.expires_hours,
        cert.key_type,
        cert.certified_key,
        (cert.extensions[0].__class__(4, 0, blinded.public_key().public_bytes_raw()),),
        cert.signature,
    )
    good = make_descriptor(blinded, signing, 1, now=now).decode()
    start = good.index("-----BEGIN ED25519 CERT-----")
    end = good.index("-----END ED25519 CERT-----\n") + len("-----END ED25519 CERT-----\n")
    text = good[:start] + pem("ED25519 CERT", lying.encode()) + good[end:]
    body = text[: text.index("signature ")]
    text = (
        body + "signature " + base64.b64encode(signing.sign(DESC_SIG_PREFIX + body.encode())).decode() + "\n"
    )
    with pytest.raises(ProtocolError, match="bad signature"):
        parse_outer(text.encode(), now)
    # the cache bound: the oldest-stored go first
    keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(6)]
    for i, k in enumerate(keys):
        cache.store(make_descriptor(k, signing, 1, now=now), now + i)
    assert cache.bytes <= 10_000 and cache.counts["evicted"] >= 1
    assert cache.lookup(keys[-1].public_key().public_bytes_raw(), now + 6) is not None
    assert cache.lookup(keys[0].public_key().public_bytes_raw(), now + 6) is None


async def test_hsdir_publish_and_fetch_over_begin_dir(tmp_path):
    """A real authority gives the HSDir flag (tor's rule, the testnet's zero uptime); a
    service publishes to an HSDir over BEGIN_DIR and a client fetches it."""
    akey = load_or_create_authority_key(tmp_path / "auth")
    line = authority_line("auth", "127.0.0.1", free_port(), akey)
    auth = Authority(
        akey,
        AuthorityConfig(
            nickname="auth",
            authorities=(line,),
            data_dir=tmp_path / "auth",
            dir_address=("127.0.0.1", parse_authorities([line])[0].dir_port),
            voting_interval=4,
            stable_uptime=0,
            hsdir_uptime=0,
            assume_guard=True,
            run_relay=False,
        ),
    )
    relays: list[Relay] = []
    client = OnionClient()
    try:
        await auth.start()
        for i in range(3):
            relay = Relay(
                RelayKeys.load_or_create(tmp_path / f"r{i}"),
                relay_config(
                    tmp_path / f"r{i}",
                    nickname=f"r{i}",
                    extend_allow_private=True,
                    exit_policy=ExitPolicy.reject_all(),
                ),
                directory=RelayDirectory(tmp_path / f"r{i}", [line]),
            )
            await relay.start()
            relays.append(relay)
        await wait_for(
            lambda: auth.current is not None and len(auth.current.routers) == 3,
            60,
            "a consensus listing the three relays",
            interval=0.05,
        )
        assert all("HSDir" in e.flags for e in auth.current.routers)
        await wait_for(lambda: all(r.directory.consensus is not None for r in relays), 30, "relays hold it")
        hsdir = relays[2]

        async def hsdir_request(method: str, path: str, body: bytes = b"") -> bytes:
            circ = await client.build_circuit([relays[0].info(), hsdir.info()])
            try:
                reader, writer = await circ.open_dir_stream()
                return await http_request(reader, writer, method, path, body, max_size=100_000, timeout=20)
            finally:
                circ.close()

        now = time.time()
        blinded, signing = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        d1 = make_descriptor(blinded, signing, 1, now=now)
        # 200 with no body, as tor (a tor uploader warns about a body under 32 bytes)
        assert await hsdir_request("POST", "/tor/hs/3/publish", d1) == b""
        assert await hsdir_request("GET", f"/tor/hs/3/{b64key(blinded)}") == d1
        # an equal revision is refused; a higher one replaces it
        with pytest.raises(DirRequestError) as e:
            await hsdir_request("POST", "/tor/hs/3/publish", make_descriptor(blinded, signing, 1, now=now))
        assert e.value.status == 400
        d2 = make_descriptor(blinded, signing, 2, now=now)
        await hsdir_request("POST", "/tor/hs/3/publish", d2)
        assert await hsdir_request("GET", f"/tor/hs/3/{b64key(blinded)}=") == d2
        # unknown key, malformed key: 404; a forged descriptor: 400; too big: 413
        for path in (f"/tor/hs/3/{b64key(signing)}", "/tor/hs/3/not-base64!", "/tor/hs/3/"):
            with pytest.raises(DirRequestError) as e:
                await hsdir_request("GET", path)
            assert e.value.status == 404
        with pytest.raises(DirRequestError) as e:
            await hsdir_request(
                "POST", "/tor/hs/3/publish", d2.replace(b"revision-counter 2", b"revision-counter 3")
            )
        assert e.value.status == 400
        with pytest.raises(DirRequestError) as e:
            await hsdir_request(
                "POST",
                "/tor/hs/3/publish",
                make_descriptor(blinded, signing, 9, now=now, blob=os.urandom(40_000)),
            )
        assert e.value.status == 413
        assert hsdir.hsdir.counts["store"] == 2 and hsdir.hsdir.counts["fetch"] == 2
        text = render_metrics(RelayCollector(hsdir)())
        assert 'onionp2p_relay_hsdir_total{action="store"} 2' in text
        assert "onionp2p_relay_hsdir_descriptors 1" in text
    finally:
        await client.close()
        for relay in relays:
            await relay.stop()
        await auth.stop()


def test_authority_gives_hsdir_flag_as_tor(tmp_path):
    """tor's dirserv_thinks_router_is_hs_dir: the descriptor asks for it (hidden-service-dir)
    and answers BEGIN_DIR, the relay is Fast and Stable and up for MinUptimeHidServDirectoryV2."""
    keys = RelayKeys.load_or_create(tmp_path / "k")
    now = time.time()

    def desc(hs_dir=True, dir_server=True, rate=1 << 30):
        return ServerDescriptor.create(
            keys,
            nickname="r",
            address="127.0.0.1",
            or_port=9001,
            exit_policy=ExitPolicy.reject_all(),
            published=now,
            dir_server=dir_server,
            hs_dir=hs_dir,
            bandwidth=(rate, rate, 0),
        )

    d = desc()
    assert "\nhidden-service-dir\n" in d.text and ServerDescriptor.parse(d.text).hs_dir
    assert not ServerDescriptor.parse(desc(hs_dir=False).text).hs_dir
    reach = Reachability(target=(d.address, d.or_port, d.rsa_id, d.ed_id), ok=True, up_since=now - 100)
    rules = FlagRules(stable_uptime=0, hsdir_uptime=50)
    assert "HSDir" in flags_for(d, reach, now, rules)
    assert "HSDir" not in flags_for(
        d, reach, now, FlagRules(stable_uptime=0, hsdir_uptime=200)
    )  # not up long enough
    assert "HSDir" not in flags_for(desc(hs_dir=False), reach, now, rules)
    assert "HSDir" not in flags_for(desc(dir_server=False), reach, now, rules)
    assert "HSDir" not in flags_for(desc(rate=50_000), reach, now, rules)  # not Fast
    assert "HSDir" not in flags_for(
        d, reach, now, FlagRules(stable_uptime=1000, hsdir_uptime=50)
    )  # not Stable
    assert FlagRules().hsdir_uptime == 96 * 3600 and AuthorityConfig().hsdir_uptime == 96 * 3600


def test_hsdir_reads_a_descriptor_tor_made():
    """The outer layer of a descriptor C tor made (tests/data/hs-relay/README): its blinded
    key, revision and lifetime, tor's certificate and signature verified; once the
    certificate has expired an HSDir refuses it."""
    text = (Path(__file__).parent / "data" / "hs-relay" / "hsdesc1.txt").read_bytes()
    then = 1674700000  # January 2023: the certificate is still valid
    outer = parse_outer(text, then)
    blind_id = "43CC0D62FC6252F578705CA645A46109E265290343B1137E90189744B20B3F2D"
    assert outer.blinded_key.hex().upper() == blind_id
    assert (outer.revision, outer.lifetime) == (19655750, 180 * 60)
    cache = HsDirCache()
    cache.store(text, then)
    assert cache.lookup(outer.blinded_key, then + 60) == text
    with pytest.raises(ProtocolError, match="expired"):
        parse_outer(text, time.time())
    with pytest.raises(ProtocolError, match="signature"):
        parse_outer(text.replace(b"revision-counter 19655750", b"revision-counter 19655751"), then)
