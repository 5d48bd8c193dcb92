"""The onion-service end-to-end layer (rend-spec-v3 §4.2.1): tor1 relay crypto with SHA3-256
digests and AES-256-CTR keyed from hs-ntor, and the client core adding it as RENDEZVOUS2
arrives, before the cells after it in the same run are decrypted."""

from __future__ import annotations

import hashlib
import os
import random
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from onionp2p.errors import LocalProtocolError
from onionp2p.proto import circuit as core
from onionp2p.proto.cells import CellCommand, encode_fixed
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hopcrypto import MixedClientCrypto
from onionp2p.proto.hs.ntor import HsNtorClient, expand_circuit_keys, service_receive_intro
from onionp2p.proto.relaycell import EndReason, RelayCommand, pack_relay
from onionp2p.proto.relaycrypto import (
    HS_E2E,
    HS_KEY_MATERIAL_LEN,
    KEY_MATERIAL_LEN,
    ClientCrypto,
    RelayCrypto,
    Tor1Hop,
    split_key_material,
)


def _stamped(body: bytes, digest: bytes) -> bytes:
    return body[:5] + digest[:4] + body[9:]


def _hs_pair() -> tuple[HsNtorClient, bytes, bytes]:
    """A real hs-ntor exchange: the client's state, RENDEZVOUS1's HANDSHAKE_INFO, NTOR_KEY_SEED."""
    b = X25519PrivateKey.generate()
    auth = ExpandedKey.from_seed(os.urandom(32)).public
    sub = os.urandom(32)
    client = HsNtorClient(b.public_key().public_bytes_raw(), auth, sub)
    header = os.urandom(40)
    intro = service_receive_intro(b, auth, sub, header, client.encrypt_intro(header, b"cookie etc"))
    info, seed = intro.reply(b, auth)
    return client, info, seed


# -- the layer ---------------------------------------------------------------------------------------


def test_hs_layer_matches_the_spec_by_hand() -> None:
    """rend-spec-v3 §4.2.1 computed independently: SHAKE-256(NTOR_KEY_SEED | m_hsexpand) gives
    Df|Db|Kf|Kb (32 bytes each); the layer is tor1 with SHA3-256 seeded by Df/Db, AES-256-CTR
    with Kf/Kb, a 4-byte Digest field, and 20-byte running digests for SENDMEs."""
    seed = bytes(range(32))
    k = hashlib.shake_256(seed + b"tor-hs-ntor-curve25519-sha3-256-1:hs_key_expand").digest(128)
    keys = expand_circuit_keys(seed)
    km = keys.key_material()
    assert km == k and len(km) == HS_KEY_MATERIAL_LEN
    assert split_key_material(km, HS_E2E) == (k[:32], k[32:64], k[64:96], k[96:])
    rng = random.Random(3)
    client = ClientCrypto()
    client.add_hop(km, HS_E2E)
    ref_d = hashlib.sha3_256(k[:32])
    ref_c = Cipher(algorithms.AES(k[64:96]), modes.CTR(bytes(16))).encryptor()
    for _ in range(4):
        body = bytes(pack_relay(RelayCommand.DATA, 7, rng.randbytes(rng.randrange(499))))
        ref_d.update(body)
        cell, digest = client.originate(body, 0)
        assert digest == ref_d.digest()[:20]
        assert cell == ref_c.update(_stamped(body, ref_d.digest()))
    # the service's layer is the same with the directions swapped: it reads what the client sent
    service = Tor1Hop(keys.key_material(service_side=True), HS_E2E)
    back = Cipher(algorithms.AES(k[96:]), modes.CTR(bytes(16))).encryptor()
    ref_b = hashlib.sha3_256(k[32:64])
    body = bytes(pack_relay(RelayCommand.CONNECTED, 7, b""))
    cell, digest = service.originate(body)
    ref_b.update(body)
    assert cell == back.update(_stamped(body, ref_b.digest())) and digest == ref_b.digest()[:20]
    plain, got = client.decrypt_inbound(cell)[1:]
    assert plain == _stamped(body, ref_b.digest()) and got == digest


def test_hs_layer_refuses_tor1_key_material_and_back() -> None:
    with pytest.raises(LocalProtocolError):
        ClientCrypto().add_hop(bytes(KEY_MATERIAL_LEN), HS_E2E)
    with pytest.raises(LocalProtocolError):
        ClientCrypto().add_hop(bytes(HS_KEY_MATERIAL_LEN))


def test_hs_layer_behind_cgo_hops() -> None:
    """A circuit with CGO hops (MixedClientCrypto) takes the same layer as relay crypto "hs"."""
    keys = expand_circuit_keys(os.urandom(32))
    mixed = MixedClientCrypto()
    mixed.add_hop(os.urandom(160), "cgo")
    mixed.add_hop(keys.key_material(), "hs")
    tor1 = ClientCrypto()
    tor1.add_hop(keys.key_material(), HS_E2E)
    body = bytes(pack_relay(RelayCommand.DATA, 1, b"x" * 100))
    assert mixed._hops[1].originate(body) == tor1.originate(body, 0)


# -- the client core: RENDEZVOUS2 and the cells after it in one run ---------------------------------


def _rend_circuit() -> tuple[core.ClientCircuit, list[RelayCrypto]]:
    rng = random.Random(5)
    ks = [rng.randbytes(KEY_MATERIAL_LEN) for _ in range(3)]
    c = core.ClientCircuit([SimpleNamespace(nickname="x")] * 3)
    for k in ks:
        c.add_layer(k)
    return c, [RelayCrypto(k) for k in ks]


def _toward_client(relays: list[RelayCrypto], cell: bytes) -> bytes:
    for r in (relays[1], relays[0]):
        cell = r.encrypt_backward(cell)
    return cell


def _run(cells: list[bytes]) -> bytes:
    return b"".join(encode_fixed(0x80000001, int(CellCommand.RELAY), c) for c in cells)


def _batch(relays: list[RelayCrypto], info: bytes, service: Tor1Hop) -> list[bytes]:
    """RENDEZVOUS2 from the rendezvous point, then three cells the service sent right after its
    RENDEZVOUS1 (end-to-end layer, then the rendezvous point's backward layer of our circuit)."""
    ct, _ = relays[2].originate_backward(bytes(pack_relay(RelayCommand.RENDEZVOUS2, 0, info)))
    cells = [_toward_client(relays, ct)]
    for cmd in (RelayCommand.DROP, RelayCommand.DROP, RelayCommand.DROP):
        e2e, _ = service.originate(bytes(pack_relay(cmd, 0, os.urandom(20))))
        cells.append(_toward_client(relays, relays[2].encrypt_backward(e2e)))
    return cells


def test_rendezvous2_adds_the_layer_before_the_rest_of_its_run() -> None:
    client, info, seed = _hs_pair()
    service = Tor1Hop(expand_circuit_keys(seed).key_material(service_side=True), HS_E2E)
    c, relays = _rend_circuit()
    got: list[bytes] = []

    def complete(handshake_info: bytes) -> bytes:
        got.append(handshake_info)
        return expand_circuit_keys(client.complete(handshake_info)).key_material()

    c.expect_rendezvous(complete)
    cells = _batch(relays, info, service)
    actions = c.receive_relay(_run(cells), 0, len(cells), 0.0)
    assert c.state == "built" and not c.closed and got == [info]
    assert len(c.layers) == 4 and c.layers[3].relay_crypto == "hs"
    hs_msgs = [a for a in actions if isinstance(a, core.HsMessage)]
    assert [(m.hop, m.command, m.data) for m in hs_msgs] == [(2, RelayCommand.RENDEZVOUS2, info)]
    # all three DROPs were recognized by the new layer: its running digest is the service's
    assert c.crypto.backward_digest(3) == service.fwd_digest.digest()[:20]
    # and the client's cells to the service are read by the service's layer
    out = c.send_relay(RelayCommand.DROP, 0, b"ping", hop=3)
    (cell,) = [p for a in out if isinstance(a, core.Send) for p in a.payloads]
    for r in relays:
        recognized, cell, _ = r.decrypt_forward(cell)
        assert not recognized
    plain, digest = service.peel(bytes(cell))
    assert digest is not None and plain[0] == RelayCommand.DROP


def test_without_the_layer_the_same_run_closes_the_circuit() -> None:
    """What the layer-at-RENDEZVOUS2 rule prevents: a client that adds it later cannot read them."""
    client, info, seed = _hs_pair()
    service = Tor1Hop(expand_circuit_keys(seed).key_material(service_side=True), HS_E2E)
    c, relays = _rend_circuit()
    cells = _batch(relays, info, service)
    c.receive_relay(_run(cells), 0, len(cells), 0.0)
    assert c.closed and c.close_reason == "PROTOCOL"


def test_a_bad_rendezvous2_closes_the_circuit() -> None:
    client, info, seed = _hs_pair()
    service = Tor1Hop(expand_circuit_keys(seed).key_material(service_side=True), HS_E2E)
    c, relays = _rend_circuit()
    c.expect_rendezvous(lambda hi: expand_circuit_keys(client.complete(hi)).key_material())
    bad = bytearray(info)
    bad[40] ^= 1  # AUTH_INPUT_MAC
    cells = _batch(relays, bytes(bad), service)
    actions = c.receive_relay(_run(cells), 0, len(cells), 0.0)
    assert c.closed and c.close_reason == "PROTOCOL" and len(c.layers) == 3
    assert not [a for a in actions if isinstance(a, core.HsMessage)]


def test_expect_rendezvous_needs_a_built_circuit() -> None:
    c = core.ClientCircuit([SimpleNamespace(nickname="x")] * 2)
    with pytest.raises(LocalProtocolError):
        c.expect_rendezvous(lambda hi: b"")


# -- the service's core: streams served past the end-to-end layer -------------------------------------


def _service_circuit() -> tuple[core.ClientCircuit, list[RelayCrypto], Tor1Hop]:
    """A service's rendezvous circuit (3 hops + the end-to-end layer, service side) and the
    client's end of that layer (what sends BEGIN through the splice)."""
    c, relays = _rend_circuit()
    keys = expand_circuit_keys(os.urandom(32))
    c.add_virtual_hop(keys.key_material(service_side=True))
    return c, relays, Tor1Hop(keys.key_material(), HS_E2E)


def _from_client(relays: list[RelayCrypto], peer: Tor1Hop, cmd: int, sid: int, data: bytes) -> bytes:
    e2e, _ = peer.originate(bytes(pack_relay(cmd, sid, data)))
    return _toward_client(relays, relays[2].encrypt_backward(e2e))


def _to_client(relays: list[RelayCrypto], peer: Tor1Hop, actions: list) -> list[tuple[int, int, bytes]]:
    """(command, stream, body) of what the service core sent to the client's end."""
    out = []
    for cell in [p for a in actions if isinstance(a, core.Send) for p in a.payloads]:
        for r in relays:
            recognized, cell, _ = r.decrypt_forward(cell)
            assert not recognized
        plain, digest = peer.peel(bytes(cell))
        assert digest is not None
        length = int.from_bytes(plain[9:11], "big")
        out.append((plain[0], int.from_bytes(plain[3:5], "big"), bytes(plain[11:11 + length])))
    return out


def test_service_core_serves_begins_from_the_end_to_end_hop() -> None:
    c, relays, peer = _service_circuit()
    begin = b":80\x00"  # what tor's clients send to a service: no host
    # before accept_streams, a BEGIN toward us is a violation, as on any client circuit
    acts = c.receive_relay(_run([_from_client(relays, peer, RelayCommand.BEGIN, 5, begin)]), 0, 1, 0.0)
    assert [a.reason for a in acts if isinstance(a, core.Violation)] == ["stream request toward the client"]
    c.accept_streams()
    acts = c.receive_relay(_run([_from_client(relays, peer, RelayCommand.BEGIN, 6, begin),
                                 _from_client(relays, peer, RelayCommand.DATA, 6, b"early")]), 0, 2, 0.0)
    (b,) = [a for a in acts if isinstance(a, core.ExitBegin)]
    assert b.stream_id == 6 and b.begin.host == "" and b.begin.port == 80
    assert [a.data for a in acts if isinstance(a, core.StreamData)] == [b"early"]  # kept by the shell
    out = c.stream_accepted(6, 0.0)
    assert _to_client(relays, peer, out) == [(RelayCommand.CONNECTED, 6, b"")]
    out = c.stream_write(6, b"hello", 0.0)
    assert _to_client(relays, peer, out) == [(RelayCommand.DATA, 6, b"hello")]
    # a BEGIN from the rendezvous point itself (not the end-to-end hop) stays a violation
    ct, _ = relays[2].originate_backward(bytes(pack_relay(RelayCommand.BEGIN, 7, begin)))
    acts = c.receive_relay(_run([_toward_client(relays, ct)]), 0, 1, 0.0)
    assert any(isinstance(a, core.Violation) for a in acts) and 7 not in c.streams
    # a malformed BEGIN gets END (TORPROTOCOL); a refused one END with the reason given
    acts = c.receive_relay(_run([_from_client(relays, peer, RelayCommand.BEGIN, 8, b"nonsense")]), 0, 1, 0.0)
    assert _to_client(relays, peer, acts) == [(RelayCommand.END, 8, bytes([EndReason.TORPROTOCOL]))]
    acts = c.receive_relay(_run([_from_client(relays, peer, RelayCommand.BEGIN, 9, b":81\x00")]), 0, 1, 0.0)
    assert [a.stream_id for a in acts if isinstance(a, core.ExitBegin)] == [9]
    assert _to_client(relays, peer, c.stream_refused(9, EndReason.DONE)) == [(RelayCommand.END, 9, b"\x06")]
    assert not c.closed and set(c.streams) == {6}


def test_accept_streams_needs_an_end_to_end_layer() -> None:
    c, _ = _rend_circuit()
    with pytest.raises(LocalProtocolError):
        c.accept_streams()
