"""Tests for onionp2p.proto.handshake: ntor (published vectors, failures, rotation) and ntor v3."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from onionp2p.errors import HandshakeError, LocalProtocolError, ProtocolError
from onionp2p.proto.handshake import (
    HTYPE_NTOR,
    HTYPE_NTOR_V3,
    KEY_MATERIAL_LEN,
    NTOR_ONIONSKIN_LEN,
    NTOR_REPLY_LEN,
    NTOR_V3_CIRC_VERIFICATION,
    NtorClient,
    NtorV3Client,
    encode_extensions,
    hkdf_sha256,
    ntor_server,
    ntor_v3_server,
    parse_extensions,
)

h = bytes.fromhex


def _key(hexstr: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(h(hexstr))


def _pub(k: X25519PrivateKey) -> bytes:
    return k.public_key().public_bytes_raw()


# --- ntor v1 published vector (tor src/test/ntor_ref.py, arti ntor.rs testvec) -------------

V_b = _key("4820544f4c4420594f5520444f474954204b454550532048415050454e494e47")
V_B = h("ccbc8541904d18af08753eae967874749e6149f873de937f57f8fd903a21c471")
V_x = _key("706f6461792069207075742e2e2e2e2e2e2e2e4a454c4c59206f6e2074686973")
V_X = h("e65dfdbef8b2635837fe2cebc086a8096eae3213e6830dc407516083d412b078")
V_y = _key("70686520737175697272656c2e2e2e2e2e2e2e2e686173206869732067616d65")
V_Y = h("390480a14362761d6aec1fea840f6e9e928fb2adb7b25c670be1045e35133a37")
V_ID = b"iToldYouAboutStairs."
V_AUTH = h("1cbdf68b89923e1f85e8e18ee6e805ea333fe4849c790ffd2670bd80fec95cc8")
V_KEYS = h(
    "0c62dee7f48893370d0ef896758d35729867beef1a5121df80e00f79ed349af39b51cae1"
    "25719182f19d932a667dae1afbf2e336e6910e7822223e763afad0a13342157969dc6b79"
)


def test_constants() -> None:
    assert (HTYPE_NTOR, HTYPE_NTOR_V3) == (2, 3)
    assert (NTOR_ONIONSKIN_LEN, NTOR_REPLY_LEN, KEY_MATERIAL_LEN) == (84, 64, 72)


def test_vector_public_keys() -> None:
    assert _pub(V_b) == V_B
    assert _pub(V_x) == V_X
    assert _pub(V_y) == V_Y
    assert V_ID.hex() == "69546f6c64596f7541626f75745374616972732e"


def test_ntor_published_vector() -> None:
    client = NtorClient(V_ID, V_B, ephemeral=V_x)
    assert client.onion_skin == V_ID + V_B + V_X
    reply, server_keys = ntor_server(client.onion_skin, V_ID, {V_B: V_b}, ephemeral=V_y)
    assert reply == V_Y + V_AUTH
    assert server_keys == V_KEYS
    assert client.complete(reply) == V_KEYS


def test_ntor_vector_longer_key_material_is_prefix_extension() -> None:
    client = NtorClient(V_ID, V_B, ephemeral=V_x)
    reply, keys = ntor_server(client.onion_skin, V_ID, {V_B: V_b}, ephemeral=V_y, length=92)
    assert keys[:72] == V_KEYS and len(keys) == 92
    assert client.complete(reply, length=92) == keys


def test_hkdf_tor_vector() -> None:
    out = hkdf_sha256(
        b"Tor", b"ntor-curve25519-sha256-1:key_extract", b"ntor-curve25519-sha256-1:key_expand", 100
    )
    assert out == h(
        "5521492a85139a8d9107a2d5c0d9c91610d0f95989975ebee6c02a4f8d622a6cfdf9b7c7edd3832e2760ded1eac3"
        "09b76f8d66c4a3c4d6225429b3a016e3c3d45911152fc87bc2de9630c3961be9fdb9f93197ea8e5977180801926d"
        "3321fa21513e59ac"
    )


def test_hkdf_rfc5869_case1() -> None:
    # RFC 5869 appendix A.1
    okm = hkdf_sha256(bytes([0x0B] * 22), h("000102030405060708090a0b0c"), h("f0f1f2f3f4f5f6f7f8f9"), 42)
    assert okm == h(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


# --- ntor v1 behaviour ----------------------------------------------------------------------


@pytest.fixture
def relay() -> tuple[bytes, X25519PrivateKey, bytes]:
    b = X25519PrivateKey.generate()
    return os.urandom(20), b, _pub(b)


def test_round_trip_random(relay) -> None:
    rid, b, B = relay
    for _ in range(5):
        client = NtorClient(rid, B)
        assert len(client.onion_skin) == NTOR_ONIONSKIN_LEN
        reply, skeys = ntor_server(client.onion_skin, rid, {B: b})
        assert len(reply) == NTOR_REPLY_LEN
        ckeys = client.complete(reply)
        assert ckeys == skeys and len(ckeys) == 72


def test_fresh_ephemeral_each_time(relay) -> None:
    rid, b, B = relay
    assert NtorClient(rid, B).onion_skin != NtorClient(rid, B).onion_skin


def test_wrong_relay_id(relay) -> None:
    rid, b, B = relay
    client = NtorClient(rid, B)
    with pytest.raises(HandshakeError):
        ntor_server(client.onion_skin, bytes(20), {B: b})


def test_wrong_onion_key(relay) -> None:
    rid, b, B = relay
    other = X25519PrivateKey.generate()
    client = NtorClient(rid, _pub(other))
    with pytest.raises(HandshakeError):
        ntor_server(client.onion_skin, rid, {B: b})


def test_mismatched_private_key_detected_by_client(relay) -> None:
    """Relay maps B to the wrong private key: its AUTH is wrong and the client refuses."""
    rid, b, B = relay
    client = NtorClient(rid, B)
    reply, _ = ntor_server(client.onion_skin, rid, {B: X25519PrivateKey.generate()})
    with pytest.raises(HandshakeError):
        client.complete(reply)


@pytest.mark.parametrize("pos", [0, 17, 31, 32, 45, 63])
def test_tampered_reply(relay, pos: int) -> None:
    rid, b, B = relay
    client = NtorClient(rid, B)
    reply, _ = ntor_server(client.onion_skin, rid, {B: b})
    bad = bytearray(reply)
    bad[pos] ^= 0x01
    with pytest.raises(HandshakeError):
        client.complete(bytes(bad))


def test_tampered_client_x_gives_disagreement(relay) -> None:
    rid, b, B = relay
    client = NtorClient(rid, B)
    skin = bytearray(client.onion_skin)
    skin[60] ^= 0x80
    reply, _ = ntor_server(bytes(skin), rid, {B: b})
    with pytest.raises(HandshakeError):
        client.complete(reply)


@pytest.mark.parametrize("n", [0, 63, 65, 128])
def test_bad_reply_length(relay, n: int) -> None:
    rid, b, B = relay
    with pytest.raises(HandshakeError):
        NtorClient(rid, B).complete(bytes(n))


@pytest.mark.parametrize("n", [0, 83, 85])
def test_bad_onion_skin_length(relay, n: int) -> None:
    rid, b, B = relay
    with pytest.raises(HandshakeError):
        ntor_server(bytes(n), rid, {B: b})


def test_complete_twice(relay) -> None:
    rid, b, B = relay
    client = NtorClient(rid, B)
    reply, _ = ntor_server(client.onion_skin, rid, {B: b})
    client.complete(reply)
    with pytest.raises(LocalProtocolError):
        client.complete(reply)


def test_complete_twice_after_failure(relay) -> None:
    rid, b, B = relay
    client = NtorClient(rid, B)
    with pytest.raises(HandshakeError):
        client.complete(bytes(64))
    with pytest.raises(LocalProtocolError):
        client.complete(bytes(64))


def test_all_zero_dh_rejected(relay) -> None:
    rid, b, B = relay
    # The zero point (and other low-order points) give an all-zero X25519 output.
    zero_y_reply = bytes(32) + bytes(32)
    with pytest.raises(HandshakeError):
        NtorClient(rid, B).complete(zero_y_reply)
    with pytest.raises(HandshakeError):
        ntor_server(rid + B + bytes(32), rid, {B: b})
    order8 = h("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
    with pytest.raises(HandshakeError):
        ntor_server(rid + B + order8, rid, {B: b})
    # A degenerate onion key B also fails (EXP(B,x) is zero) even with a good Y.
    with pytest.raises(HandshakeError):
        NtorClient(rid, bytes(32)).complete(_pub(X25519PrivateKey.generate()) + bytes(32))


def test_rotation_old_and_new_keys(relay) -> None:
    rid, old, OLD = relay
    new = X25519PrivateKey.generate()
    NEW = _pub(new)
    keys = {OLD: old, NEW: new}
    for B in (OLD, NEW):
        client = NtorClient(rid, B)
        reply, skeys = ntor_server(client.onion_skin, rid, keys)
        assert client.complete(reply) == skeys
    # After the grace period the old key is gone.
    client = NtorClient(rid, OLD)
    with pytest.raises(HandshakeError):
        ntor_server(client.onion_skin, rid, {NEW: new})


def test_local_misuse() -> None:
    B = _pub(X25519PrivateKey.generate())
    with pytest.raises(LocalProtocolError):
        NtorClient(bytes(19), B)
    with pytest.raises(LocalProtocolError):
        NtorClient(bytes(20), B[:31])
    with pytest.raises(LocalProtocolError):
        NtorClient(bytes(20), B).complete(bytes(64), length=0)


_SERVER_B = X25519PrivateKey.generate()
_SERVER_ID = os.urandom(20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(min_size=84, max_size=84)))
def test_fuzz_server_only_handshake_errors(skin: bytes) -> None:
    try:
        ntor_server(skin, _SERVER_ID, {_pub(_SERVER_B): _SERVER_B})
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.binary(max_size=64), st.binary(min_size=64, max_size=64))
def test_fuzz_client_only_handshake_errors(use_exact: bool, any_reply: bytes, exact: bytes) -> None:
    client = NtorClient(_SERVER_ID, _pub(_SERVER_B))
    with pytest.raises(HandshakeError):
        client.complete(exact if use_exact else any_reply)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_fuzz_server_x_values(x_pub: bytes) -> None:
    """Random X with a valid header: success or HandshakeError, nothing else."""
    B = _pub(_SERVER_B)
    try:
        reply, keys = ntor_server(_SERVER_ID + B + x_pub, _SERVER_ID, {B: _SERVER_B})
    except HandshakeError:
        return
    assert len(reply) == 64 and len(keys) == 72


# --- ntor v3 (proposal 332 §X.2) -------------------------------------------------------------

V3_b = _key("4051daa5921cfa2a1c27b08451324919538e79e788a81b38cbed097a5dff454a")
V3_B = h("f8307a2bc1870b00b828bb74dbb8fd88e632a6375ab3bcd1ae706aaa8b6cdd1d")
V3_ID = h("9fad2af287ef942632833d21f946c6260c33fae6172b60006e86e4a6911753a2")
V3_x = _key("b825a3719147bcbe5fb1d0b0fcb9c09e51948048e2e3283d2ab7b45b5ef38b49")
V3_X = h("252fe9ae91264c91d4ecb8501f79d0387e34ad8ca0f7c995184f7d11d5da4f46")
V3_y = _key("4865a5b7689dafd978f529291c7171bc159be076b92186405d13220b80e2a053")
V3_Y = h("4bf4814326fdab45ad5184f5518bd7fae25dc59374062698201a50a22954246d")
V3_CM = b"hello world"
V3_VER = b"xyzzy"
V3_SM = b"Hola Mundo"
V3_CLIENT = V3_ID + V3_B + V3_X + h(
    "3bebd9151fd3b47c180abc9e044d53565f04d82bbb3bebed3d06cea65db8be9c72b68cd461942088502f67"
)
V3_SERVER = V3_Y + h(
    "2fc5f8773ca824542bc6cf6f57c7c29bbf4e5476461ab130c5b18ab0a91276651202c3e1e87c0d32054c"
)
V3_KEYSTREAM = h(
    "9c19b631fd94ed86a817e01f6c80b0743a43f5faebd39cfaa8b00fa8bcc65c3bfeaa403d91acbd68a821bf6ee8"
    "504602b094a254392a07737d5662768c7a9fb1b2814bb34780eaee6e867c773e28c212ead563e98a1cd5d5b457"
    "6f5ee61c59bde025ff2851bb19b721421694f263818e3531e43a9e4e3e2c661e2ad547d8984caa28ebecd3e452"
    "5452299be26b9185a20a90ce1eac20a91f2832d731b54502b09749b5a2a2949292f8cfcbeffb790c7790ed935a"
    "9d251e7e336148ea83b063a5618fcff674a44581585fd22077ca0e52c59a24347a38d1a1ceebddbf238541f226"
    "b8f88d0fb9c07a1bcd2ea764bbbb5dacdaf5312a14c0b9e4f06309b0333b4a"
)


def test_ntor_v3_published_vector() -> None:
    assert _pub(V3_b) == V3_B and _pub(V3_x) == V3_X and _pub(V3_y) == V3_Y
    client = NtorV3Client(V3_ID, V3_B, V3_CM, V3_VER, ephemeral=V3_x)
    assert client.onion_skin == V3_CLIENT
    seen: list[bytes] = []

    def reply_fn(cm: bytes) -> bytes:
        seen.append(cm)
        return V3_SM

    reply, cm, skeys = ntor_v3_server(
        V3_CLIENT, V3_ID, {V3_B: V3_b}, reply_fn, V3_VER, ephemeral=V3_y, length=256
    )
    assert seen == [V3_CM] and cm == V3_CM
    assert reply == V3_SERVER
    assert skeys == V3_KEYSTREAM
    sm, ckeys = client.complete(reply, length=256)
    assert sm == V3_SM and ckeys == V3_KEYSTREAM


def test_ntor_v3_default_length_is_tor1_keys() -> None:
    client = NtorV3Client(V3_ID, V3_B, V3_CM, V3_VER, ephemeral=V3_x)
    reply, _, skeys = ntor_v3_server(V3_CLIENT, V3_ID, {V3_B: V3_b}, V3_SM, V3_VER, ephemeral=V3_y)
    assert skeys == V3_KEYSTREAM[:72]
    assert client.complete(reply) == (V3_SM, V3_KEYSTREAM[:72])


def test_ntor_v3_round_trip_and_failures() -> None:
    b = X25519PrivateKey.generate()
    B, rid = _pub(b), os.urandom(32)
    cm = encode_extensions([(1, b"")])
    client = NtorV3Client(rid, B, cm)
    reply, got_cm, skeys = ntor_v3_server(client.onion_skin, rid, {B: b}, encode_extensions([(2, b"\x1f")]))
    assert got_cm == cm
    sm, ckeys = client.complete(reply)
    assert parse_extensions(sm) == [(2, b"\x1f")] and ckeys == skeys
    with pytest.raises(LocalProtocolError):
        client.complete(reply)
    # wrong verification string, wrong id, unknown key, tampered MAC / message
    with pytest.raises(HandshakeError):
        ntor_v3_server(NtorV3Client(rid, B, cm, b"other").onion_skin, rid, {B: b})
    with pytest.raises(HandshakeError):
        ntor_v3_server(client.onion_skin, os.urandom(32), {B: b})
    with pytest.raises(HandshakeError):
        ntor_v3_server(client.onion_skin, rid, {os.urandom(32): b})
    for pos in (96, len(client.onion_skin) - 1):
        bad = bytearray(client.onion_skin)
        bad[pos] ^= 4
        with pytest.raises(HandshakeError):
            ntor_v3_server(bytes(bad), rid, {B: b})
    # tampered server reply (Y, AUTH, message)
    c2 = NtorV3Client(rid, B, cm)
    reply2, _, _ = ntor_v3_server(c2.onion_skin, rid, {B: b}, b"\x00")
    for pos in (0, 40, 64):
        c3 = NtorV3Client(rid, B, cm)
        r3, _, _ = ntor_v3_server(c3.onion_skin, rid, {B: b}, b"\x00")
        bad = bytearray(r3)
        bad[pos] ^= 1
        with pytest.raises(HandshakeError):
            c3.complete(bytes(bad))
    assert c2.complete(reply2)[0] == b"\x00"


def test_ntor_v3_server_callback_can_refuse() -> None:
    b = X25519PrivateKey.generate()
    B, rid = _pub(b), os.urandom(32)

    def refuse(cm: bytes) -> bytes:
        raise HandshakeError("unsupported extension")

    with pytest.raises(HandshakeError):
        ntor_v3_server(NtorV3Client(rid, B, b"\x00").onion_skin, rid, {B: b}, refuse)


def test_ntor_v3_default_verification() -> None:
    assert NTOR_V3_CIRC_VERIFICATION == b"circuit extend"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_ntor_v3_server(skin: bytes) -> None:
    B = _pub(_SERVER_B)
    rid = bytes(32)
    try:
        ntor_v3_server(skin, rid, {B: _SERVER_B})
    except ProtocolError:
        pass
    # With a valid header, a random tail must still only give HandshakeError.
    with pytest.raises(HandshakeError):
        ntor_v3_server(rid + B + skin[:32].ljust(32, b"\x09") + skin, rid, {B: _SERVER_B})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_ntor_v3_client(reply: bytes) -> None:
    client = NtorV3Client(bytes(32), _pub(_SERVER_B), b"\x00")
    with pytest.raises(HandshakeError):
        client.complete(reply)


# --- ntor v3 message encoding -----------------------------------------------------------------


def test_extensions_round_trip() -> None:
    exts = [(1, b""), (3, b"\x02\x06"), (255, bytes(255))]
    enc = encode_extensions(exts)
    assert enc[:5] == b"\x03\x01\x00\x03\x02"
    assert parse_extensions(enc) == exts
    assert parse_extensions(b"\x00") == []


@pytest.mark.parametrize("bad", [b"", b"\x01", b"\x01\x02", b"\x01\x02\x05ab", b"\x00\x00", b"\x01\x01\x00x"])
def test_extensions_malformed(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_extensions(bad)


@given(st.binary(max_size=64))
def test_fuzz_parse_extensions(data: bytes) -> None:
    try:
        exts = parse_extensions(data)
    except ProtocolError:
        return
    assert encode_extensions(exts) == data
