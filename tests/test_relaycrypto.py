"""Tests for onionp2p.proto.relaycrypto: tor1 layered crypto between a client and three relays."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from onionp2p.errors import DigestMismatch, LocalProtocolError, ProtocolError
from onionp2p.proto.handshake import NtorClient, ntor_server
from onionp2p.proto.relaycrypto import (
    KEY_MATERIAL_LEN,
    RELAY_BODY_LEN,
    ClientCrypto,
    RelayCrypto,
    split_key_material,
)


def make_body(rng: random.Random, cmd: int = 2, stream_id: int = 1, data: bytes | None = None) -> bytes:
    """A plaintext relay body: Cmd | Recognized 0 | StreamID | Digest 0 | Len | Data | padding."""
    if data is None:
        data = rng.randbytes(rng.randrange(0, 499))
    head = struct.pack(">BHH4sH", cmd, 0, stream_id, b"\0\0\0\0", len(data))
    pad = b"\0\0\0\0" + rng.randbytes(498 - len(data))
    return (head + data + pad)[:RELAY_BODY_LEN]


class Circuit:
    """A client and three relays that share keys, wired together in memory."""

    def __init__(self, seed: int, n: int = 3) -> None:
        rng = random.Random(seed)
        self.keys = [rng.randbytes(KEY_MATERIAL_LEN) for _ in range(n)]
        self.client = ClientCrypto()
        for k in self.keys:
            self.client.add_hop(k)
        self.relays = [RelayCrypto(k) for k in self.keys]

    def forward(self, cell: bytes) -> tuple[int, bytes, bytes] | None:
        """Pass a client cell along the relays; return (hop, plaintext, digest) or None."""
        for i, relay in enumerate(self.relays):
            recognized, cell, digest = relay.decrypt_forward(cell)
            if recognized:
                assert digest is not None
                return i, cell, digest
            assert digest is None
        return None

    def backward(self, hop: int, body: bytes) -> tuple[bytes, bytes]:
        """Relay ``hop`` originates ``body``; each earlier relay adds its layer."""
        cell, digest = self.relays[hop].originate_backward(body)
        for relay in reversed(self.relays[:hop]):
            cell = relay.encrypt_backward(cell)
        return cell, digest


def stamped(body: bytes, digest: bytes) -> bytes:
    return body[:5] + digest[:4] + body[9:]


# --- independent reference of the spec ---------------------------------------------------


def test_single_hop_matches_independent_reference() -> None:
    """One hop, computed by hand from the spec with hashlib SHA-1 and a fresh AES-CTR."""
    rng = random.Random(1)
    km = rng.randbytes(72)
    df, db, kf, kb = km[:20], km[20:40], km[40:56], km[56:72]
    assert split_key_material(km) == (df, db, kf, kb)
    client = ClientCrypto()
    client.add_hop(km)
    ref_digest = hashlib.sha1(df)
    ref_stream = Cipher(algorithms.AES(kf), modes.CTR(bytes(16))).encryptor()
    for _ in range(5):
        body = make_body(rng)
        ref_digest.update(body)
        expected_plain = stamped(body, ref_digest.digest())
        cell, digest = client.originate(body, 0)
        assert digest == ref_digest.digest()
        assert cell == ref_stream.update(expected_plain)
    # backward, relay side
    relay = RelayCrypto(km)
    ref_b = hashlib.sha1(db)
    ref_bs = Cipher(algorithms.AES(kb), modes.CTR(bytes(16))).encryptor()
    body = make_body(rng)
    cell, digest = relay.originate_backward(body)
    ref_b.update(body)
    assert digest == ref_b.digest()
    assert cell == ref_bs.update(stamped(body, digest))


def test_originate_zeroes_recognized_and_digest_fields() -> None:
    rng = random.Random(2)
    c1, c2 = Circuit(3, 1), Circuit(3, 1)
    body = make_body(rng)
    dirty = bytearray(body)
    dirty[1:3] = b"\xff\xff"
    dirty[5:9] = b"\x12\x34\x56\x78"
    assert c1.client.originate(body, 0) == c2.client.originate(bytes(dirty), 0)


# --- three-hop round trips -------------------------------------------------------------------


def test_three_hop_thousands_of_cells_both_directions() -> None:
    rng = random.Random(4)
    circ = Circuit(5)
    for n in range(3000):
        hop = rng.randrange(3)
        body = make_body(rng, stream_id=n & 0xFFFF)
        cell, cdigest = circ.client.originate(body, hop)
        assert len(cell) == RELAY_BODY_LEN
        got = circ.forward(cell)
        assert got is not None
        got_hop, plain, rdigest = got
        assert got_hop == hop
        assert plain == stamped(body, cdigest)
        assert rdigest == cdigest  # the SENDME v1 digest agrees on both sides

        bhop = rng.randrange(3)
        bbody = make_body(rng, cmd=4)
        bcell, bdigest = circ.backward(bhop, bbody)
        from_hop, bplain, cdig = circ.client.decrypt_inbound(bcell)
        assert from_hop == bhop
        assert bplain == stamped(bbody, bdigest)
        assert cdig == bdigest


def test_interleaved_hops_keep_independent_digests() -> None:
    rng = random.Random(6)
    circ = Circuit(7)
    pattern = [2, 0, 0, 1, 2, 2, 1, 0, 2, 1] * 20
    for hop in pattern:
        body = make_body(rng)
        cell, digest = circ.client.originate(body, hop)
        got = circ.forward(cell)
        assert got is not None and got[0] == hop and got[2] == digest
    for hop in range(3):
        assert circ.client.forward_digest(hop) == circ.relays[hop].forward_digest
    for hop in reversed(pattern):
        cell, digest = circ.backward(hop, make_body(rng))
        assert circ.client.decrypt_inbound(cell)[::2] == (hop, digest)
    for hop in range(3):
        assert circ.client.backward_digest(hop) == circ.relays[hop].backward_digest


def test_cell_for_exit_passes_middle_hops_with_digest_unchanged() -> None:
    rng = random.Random(8)
    circ = Circuit(9)
    # some prior traffic to hops 0 and 1 so their digests are not just the seed
    for hop in (0, 1, 0):
        circ.forward(circ.client.originate(make_body(rng), hop)[0])
    before = [r.forward_digest for r in circ.relays]
    cell, digest = circ.client.originate(make_body(rng), 2)
    for i in (0, 1):
        recognized, cell, d = circ.relays[i].decrypt_forward(cell)
        assert recognized is False and d is None
        assert circ.relays[i].forward_digest == before[i]
    recognized, _, d = circ.relays[2].decrypt_forward(cell)
    assert recognized and d == digest and circ.relays[2].forward_digest == digest != before[2]


def test_false_positive_recognized_restores_digest() -> None:
    """A cell whose Recognized field decrypts to zero but whose digest is wrong."""
    rng = random.Random(10)
    km = rng.randbytes(72)
    relay, twin = RelayCrypto(km), RelayCrypto(km)
    kf = km[40:56]
    # Craft ciphertext that decrypts to a body with Recognized = 0 and a bogus digest.
    plain = bytearray(make_body(rng))
    plain[5:9] = b"\xde\xad\xbe\xef"
    ks = Cipher(algorithms.AES(kf), modes.CTR(bytes(16))).encryptor().update(bytes(509))
    cell = bytes(a ^ b for a, b in zip(plain, ks))
    before = relay.forward_digest
    recognized, out, d = relay.decrypt_forward(cell)
    assert (recognized, d) == (False, None) and out == bytes(plain)
    assert relay.forward_digest == before
    # The relay is still in sync with a sender whose keystream moved past that cell
    # and whose digest did not: build the next cell by hand from the spec.
    twin.decrypt_forward(bytes(509))
    assert twin.forward_digest == relay.forward_digest
    stream = Cipher(algorithms.AES(kf), modes.CTR(bytes(16))).encryptor()
    stream.update(bytes(509))
    ref = hashlib.sha1(km[:20])
    body = make_body(rng)
    ref.update(body)
    nxt = stream.update(stamped(body, ref.digest()))
    assert relay.decrypt_forward(nxt) == (True, stamped(body, ref.digest()), ref.digest())
    assert twin.decrypt_forward(nxt)[0::2] == (True, ref.digest())


def test_every_flipped_bit_forward_is_not_recognized_at_exit() -> None:
    """Flip each bit of a cell for hop 2.

    Hops 0 and 1 pass it on unrecognized, as they would the clean cell. The exit gets
    a plaintext that differs from the clean one in exactly that bit and reports
    recognized=False: a flip inside Recognized (bits 8..23) makes that field nonzero,
    anywhere else the 4-byte digest no longer matches. No digest state moves.
    """
    rng = random.Random(11)
    body = make_body(rng)
    for bit in range(RELAY_BODY_LEN * 8):
        circ = Circuit(12)
        cell, digest = circ.client.originate(body, 2)
        bad = bytearray(cell)
        bad[bit // 8] ^= 0x80 >> (bit % 8)
        before = [r.forward_digest for r in circ.relays]
        out = bytes(bad)
        for relay in circ.relays[:2]:
            recognized, out, d = relay.decrypt_forward(out)
            assert (recognized, d) == (False, None)
        recognized, plain, d = circ.relays[2].decrypt_forward(out)
        assert (recognized, d) == (False, None), f"bit {bit} accepted"
        diff = bytes(a ^ b for a, b in zip(plain, stamped(body, digest)))
        assert int.from_bytes(diff, "big") == 1 << (RELAY_BODY_LEN * 8 - 1 - bit)
        assert (plain[1:3] != b"\0\0") == (8 <= bit < 24)
        assert [r.forward_digest for r in circ.relays] == before


def test_every_flipped_bit_backward_raises_digest_mismatch() -> None:
    rng = random.Random(13)
    body = make_body(rng)
    for bit in range(RELAY_BODY_LEN * 8):
        circ = Circuit(14)
        cell, _ = circ.backward(2, body)
        bad = bytearray(cell)
        bad[bit // 8] ^= 0x80 >> (bit % 8)
        before = [circ.client.backward_digest(i) for i in range(3)]
        with pytest.raises(DigestMismatch):
            circ.client.decrypt_inbound(bytes(bad))
        assert [circ.client.backward_digest(i) for i in range(3)] == before


def test_digest_mismatch_is_protocol_error() -> None:
    circ = Circuit(15)
    with pytest.raises(ProtocolError):
        circ.client.decrypt_inbound(bytes(509))


def test_ntor_keys_full_chain() -> None:
    rng = random.Random(17)
    client = ClientCrypto()
    relays = []
    for _ in range(3):
        b = X25519PrivateKey.generate()
        B = b.public_key().public_bytes_raw()
        rid = rng.randbytes(20)
        nc = NtorClient(rid, B)
        reply, skeys = ntor_server(nc.onion_skin, rid, {B: b})
        client.add_hop(nc.complete(reply))
        relays.append(RelayCrypto(skeys))
    body = make_body(rng)
    cell, digest = client.originate(body, 2)
    for i, r in enumerate(relays):
        recognized, cell, d = r.decrypt_forward(cell)
        assert recognized == (i == 2)
    assert d == digest and cell == stamped(body, digest)


# --- API edges ---------------------------------------------------------------------------------


def test_n_hops_and_truncate() -> None:
    rng = random.Random(18)
    circ = Circuit(19)
    assert circ.client.n_hops == 3
    circ.client.truncate(2)
    assert circ.client.n_hops == 2
    with pytest.raises(LocalProtocolError):
        circ.client.originate(make_body(rng), 2)
    with pytest.raises(LocalProtocolError):
        circ.client.truncate(3)
    cell, digest = circ.client.originate(make_body(rng), 1)
    assert circ.forward(cell)[0::2] == (1, digest)  # type: ignore[index]
    circ.client.add_hop(rng.randbytes(72))
    assert circ.client.n_hops == 3


@pytest.mark.parametrize("n", [0, 71, 73, 92])
def test_bad_key_material(n: int) -> None:
    with pytest.raises(LocalProtocolError):
        RelayCrypto(bytes(n))
    with pytest.raises(LocalProtocolError):
        ClientCrypto().add_hop(bytes(n))


@pytest.mark.parametrize("n", [0, 508, 510, 514])
def test_bad_body_length(n: int) -> None:
    circ = Circuit(20)
    with pytest.raises(ProtocolError):
        circ.relays[0].decrypt_forward(bytes(n))
    with pytest.raises(ProtocolError):
        circ.relays[0].encrypt_backward(bytes(n))
    with pytest.raises(ProtocolError):
        circ.client.decrypt_inbound(bytes(n))
    # Originating a wrong-size body is a local bug, not a peer's fault.
    with pytest.raises(LocalProtocolError):
        circ.client.originate(bytes(n), 0)
    with pytest.raises(LocalProtocolError):
        circ.relays[0].originate_backward(bytes(n))


def test_bad_hop_index_and_empty_circuit() -> None:
    circ = Circuit(21)
    for hop in (-1, 3):
        with pytest.raises(LocalProtocolError):
            circ.client.originate(bytes(509), hop)
    with pytest.raises(LocalProtocolError):
        ClientCrypto().decrypt_inbound(bytes(509))


def test_accepts_bytearray_and_memoryview() -> None:
    rng = random.Random(22)
    circ = Circuit(23)
    body = make_body(rng)
    cell, digest = circ.client.originate(bytearray(body), 1)
    r0 = circ.relays[0].decrypt_forward(memoryview(cell))
    r1 = circ.relays[1].decrypt_forward(bytearray(r0[1]))
    assert r1[0] is True and r1[2] == digest


def test_decrypt_forward_many() -> None:
    rng = random.Random(24)
    a, b = Circuit(25), Circuit(25)
    cells = [a.client.originate(make_body(rng), rng.randrange(3))[0] for _ in range(50)]
    assert a.relays[0].decrypt_forward_many(cells) == [b.relays[0].decrypt_forward(c) for c in cells]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=600), max_size=5))
def test_fuzz_random_bodies_only_protocol_errors(bodies: list[bytes]) -> None:
    circ = Circuit(26)
    for body in bodies:
        try:
            circ.client.decrypt_inbound(body)
        except ProtocolError:
            pass
        try:
            recognized, out, d = circ.relays[0].decrypt_forward(body)
            assert len(out) == RELAY_BODY_LEN and (d is None) == (not recognized)
        except ProtocolError:
            pass
        try:
            assert len(circ.relays[1].encrypt_backward(body)) == RELAY_BODY_LEN
        except ProtocolError:
            pass
