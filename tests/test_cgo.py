"""Tests for onionp2p.proto.cgo: Counter Galois Onion relay crypto (proposal 359).

* every vector of tor's ``src/test/cgo_vectors.inc`` (``tests/data/cgo.json``), byte for byte, layer by layer,
  through both backends;
* RFC 8452 POLYVAL vectors, through each pure-Python POLYVAL code path and each native
  (pycryptodome GHASH) backend, and a bit-by-bit reference of RFC 8452 §3 written here for
  random cross-checks; the native adapter's import self-test refuses broken bindings;
* the native and the pure-Python POLYVAL give the same cells, tags and key states over
  hundreds of random cells with key updates;
* a client and three relays wired together: originate/recognize both ways, SENDME
  tags, tampering, and keys from a real ntor v3 handshake;
* the native CGO backend (``onionp2p/proto/_cgo_native.c``): every vector and circuit test
  above runs against both backends (the ``backend`` fixture), each native POLYVAL against
  RFC 8452 and a bitwise reference, hypothesis comparisons of native and pure on random
  keys and operation sequences with rekeys, selection by ONIONP2P_CGO_BACKEND, and the
  fallback (one warning) when the extension is missing or fails its import self-test.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import example, given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from onionp2p.errors import DigestMismatch, LocalProtocolError, ProtocolError
from onionp2p.proto import cgo
from onionp2p.proto.hopcrypto import MixedClientCrypto
from onionp2p.proto.relaycell import V1_DATA_OFFSET, V1_TAG_LEN, RelayCommand, parse_v1_header
from onionp2p.proto.cgo import (
    CELL_RELAY,
    CELL_RELAY_EARLY,
    DIR_KEY_LEN,
    KEY_MATERIAL_LEN,
    MSG_LEN,
    RELAY_BODY_LEN,
    TAG_LEN,
    ClientCrypto,
    PolyvalKey,
    RelayCrypto,
    polyval,
    split_key_material,
)
from onionp2p.proto.handshake import NtorV3Client, encode_extensions, ntor_v3_server, parse_extensions

H = bytes.fromhex

# --- the two CGO backends ----------------------------------------------------------------------
#
# Tests that take ``backend`` run once with the pure-Python classes and once with the native
# ones (onionp2p/proto/_cgo_native.c), which are swapped into the module for the test so that
# ClientCrypto / RelayCrypto use them too. Without the extension, the native runs skip, except
# under CI=true (tools/test installs a compiler and libssl-dev, so it must have been built).

CI = os.environ.get("CI") == "true"
NATIVE = getattr(cgo, "NativeCgoCrypt", None) is not None
_CLASSES = ("CgoCrypt", "UIV", "ET", "PRF")
BACKEND_CLASSES = {"python": (cgo.PureCgoCrypt, cgo.PureUIV, cgo.PureET, cgo.PurePRF)}
if NATIVE:
    BACKEND_CLASSES["native"] = (cgo.NativeCgoCrypt, cgo.NativeUIV, cgo.NativeET, cgo.NativePRF)


class Backend:
    """The classes of one backend (attributes CgoCrypt, UIV, ET, PRF) and its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        for attr, cls in zip(_CLASSES, BACKEND_CLASSES[name]):
            setattr(self, attr, cls)


def need_native() -> None:
    """Skip when the extension is not in use: fail under CI=true, unless the pure path was
    asked for (ONIONP2P_CGO_BACKEND=python, which does not load the extension at all)."""
    if not NATIVE:
        message = f"native CGO backend unavailable: {cgo.CGO_BACKEND}"
        if CI and os.environ.get(cgo.CGO_BACKEND_ENV, "").strip().lower() != "python":
            pytest.fail(message)
        pytest.skip(message)


def use_backend(monkeypatch: pytest.MonkeyPatch, name: str) -> Backend:
    if name == "native":
        need_native()
    b = Backend(name)
    for attr in _CLASSES:
        monkeypatch.setattr(cgo, attr, getattr(b, attr))
    return b


@pytest.fixture(params=["python", "native"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Backend:
    return use_backend(monkeypatch, request.param)


@pytest.fixture
def pure(monkeypatch: pytest.MonkeyPatch) -> Backend:
    """The pure-Python classes, for tests of their internals."""
    return use_backend(monkeypatch, "python")


# --- tor's test vectors --------------------------------------------------------------------

#: tor's published vectors (src/test/cgo_vectors.inc as JSON), kept in the repository so
#: that a clean clone checks every one of them; a missing file fails, never skips
VECTOR_FILE = Path(__file__).parent / "data" / "cgo.json"
VECTORS = json.loads(VECTOR_FILE.read_text())

EXPECTED_COUNTS = {
    "et_testvecs": 4,
    "prf_testvecs": 10,
    "uiv_testvecs": 8,
    "uiv_update_testvecs": 5,
    "cgo_relay_testvecs": 7,
    "cgo_relay_originate_testvecs": 4,
    "cgo_client_originate_testvecs": 6,
}


def vectors(name: str) -> list:
    items = VECTORS.get(name, [])
    assert items, f"{VECTOR_FILE} has no {name}"
    return [pytest.param(v, id=f"{name}[{i}]") for i, v in enumerate(items)]


def test_vector_file_has_every_list() -> None:
    assert set(VECTORS) - {"source"} == set(EXPECTED_COUNTS)
    for name, count in EXPECTED_COUNTS.items():
        assert len(VECTORS[name]) == count, name


@pytest.mark.parametrize("v", vectors("et_testvecs"))
def test_et_vector(v: dict, backend: Backend) -> None:
    tweak = H(v["tweak_T"])
    assert len(tweak) == 16 + 1 + MSG_LEN
    et = cgo.ET(H(v["keys_KB_KU"]), encrypt=v["encrypt"])
    run = et.encrypt if v["encrypt"] else et.decrypt
    assert run(tweak[:16], tweak[16], tweak[17:], H(v["block_M"])).hex() == v["expect"]


@pytest.mark.parametrize("v", vectors("prf_testvecs"))
def test_prf_vector(v: dict, backend: Backend) -> None:
    prf = cgo.PRF(H(v["keys_K_B"]))
    expect = H(v["expect"])
    if v["t"] == 0:
        assert len(expect) == MSG_LEN
        assert prf.xor_t0(H(v["input"]), bytes(MSG_LEN)) == expect
        data = os.urandom(MSG_LEN)  # and it is an XOR
        assert prf.xor_t0(H(v["input"]), data) == bytes(a ^ b for a, b in zip(data, expect))
    else:
        assert v["t"] == 1 and len(expect) == DIR_KEY_LEN
        assert prf.stream_t1(H(v["input"]), len(expect)) == expect


@pytest.mark.parametrize("v", vectors("uiv_testvecs"))
def test_uiv_vector(v: dict, backend: Backend) -> None:
    tweak = H(v["tweak_H"])
    body = H(v["x_l"]) + H(v["x_r"])
    expect = H(v["y"]["y_l"]) + H(v["y"]["y_r"])
    uiv = cgo.UIV(H(v["keys_J_S"]), encrypt=v["encrypt"])
    run = uiv.encrypt if v["encrypt"] else uiv.decrypt
    assert run(tweak[:16], tweak[16], body) == expect
    # the opposite direction undoes it
    back = cgo.UIV(H(v["keys_J_S"]), encrypt=not v["encrypt"])
    undo = back.encrypt if not v["encrypt"] else back.decrypt
    assert undo(tweak[:16], tweak[16], expect) == body


@pytest.mark.parametrize("v", vectors("uiv_update_testvecs"))
def test_uiv_update_vector(v: dict, backend: Backend) -> None:
    uiv = cgo.UIV(H(v["keys_J_S"]), encrypt=True)
    assert uiv.update(H(v["nonce_N"])).hex() == v["output"]["new_nonce_N"]
    assert uiv.key.hex() == v["output"]["new_keys_J_S"]
    # the rekeyed cipher behaves like one made from the new keys
    fresh = cgo.UIV(H(v["output"]["new_keys_J_S"]), encrypt=True)
    body = os.urandom(RELAY_BODY_LEN)
    assert uiv.encrypt(b"\x2a" * 16, 42, body) == fresh.encrypt(b"\x2a" * 16, 42, body)


def _state(s: dict, relay: bool) -> cgo.PureCgoCrypt | cgo.NativeCgoCrypt:
    return cgo.CgoCrypt(H(s["keys"]) + H(s["nonce"]), relay=relay, tprime=H(s["tprime"]))


def _assert_state(c: cgo.PureCgoCrypt | cgo.NativeCgoCrypt, s: dict) -> None:
    assert c.key.hex() == s["keys"]
    assert c.nonce.hex() == s["nonce"]
    assert c.tprime.hex() == s["tprime"]


def _result(v: dict) -> bytes:
    return H(v["output"]["result"]["t_out"]) + H(v["output"]["result"]["msg_out"])


@pytest.mark.parametrize("v", vectors("cgo_relay_testvecs"))
def test_cgo_relay_vector(v: dict, backend: Backend) -> None:
    c = _state(v["state_in"], relay=True)
    cmd = H(v["cmd_AD"])[0]
    body = H(v["tag_T"]) + H(v["msg_C"])
    if v["inbound"]:
        out = c.relay_backward(cmd, body)
    else:
        out, tag = c.relay_forward(cmd, body)
        assert tag is None  # none of these cells is for the relay
    assert out == _result(v)
    _assert_state(c, v["output"]["state"])


@pytest.mark.parametrize("v", vectors("cgo_relay_originate_testvecs"))
def test_cgo_relay_originate_vector(v: dict, backend: Backend) -> None:
    c = _state(v["state_in"], relay=True)
    out, tag = c.relay_originate(H(v["cmd_AD"])[0], bytes(16) + H(v["msg"]))
    assert out == _result(v)
    assert tag == out[:TAG_LEN]
    _assert_state(c, v["output"]["state"])


@pytest.mark.parametrize("v", vectors("cgo_client_originate_testvecs"))
def test_cgo_client_originate_vector(v: dict, backend: Backend) -> None:
    hops = [_state(s, relay=False) for s in v["state_in_hops"]]
    cmd = H(v["cmd_AD"])[0]
    target = v["target_hop"] - 1  # the vectors count hops from 1
    out, tag = hops[target].client_originate(cmd, bytes(16) + H(v["msg"]))
    for i in range(target - 1, -1, -1):
        out = hops[i].client_forward(cmd, out)
    assert out == _result(v)
    for c, s in zip(hops, v["output"]["state_hops"]):
        _assert_state(c, s)


@pytest.mark.parametrize("v", vectors("cgo_client_originate_testvecs"))
def test_cgo_client_originate_vector_through_client_crypto(v: dict, backend: Backend) -> None:
    """The same vectors through ClientCrypto, after forcing each hop's state."""
    client = ClientCrypto()
    for s in v["state_in_hops"]:
        client.add_hop(os.urandom(KEY_MATERIAL_LEN))
        client._hops[-1].fwd = _state(s, relay=False)
    body = bytes(16) + H(v["msg"])
    out, tag = client.originate(body, v["target_hop"] - 1, cmd=H(v["cmd_AD"])[0])
    assert out == _result(v)
    assert client.forward_tag(v["target_hop"] - 1) == tag


# --- POLYVAL ---------------------------------------------------------------------------------

_P = (1 << 128) | (1 << 127) | (1 << 126) | (1 << 121) | 1


def ref_dot(a: int, b: int) -> int:
    """RFC 8452 §3 ``dot(a, b) = a * b * x^-128`` bit by bit (independent of the module)."""
    prod = 0
    for i in range(128):
        if (b >> i) & 1:
            prod ^= a << i
    for i in range(255, 127, -1):  # reduce modulo P
        if (prod >> i) & 1:
            prod ^= _P << (i - 128)
    x_inv = 1
    for _ in range(128):  # multiply by x^-1, 128 times
        x_inv = x_inv >> 1 if not x_inv & 1 else (x_inv ^ _P) >> 1
    out = 0
    for i in range(128):
        if (x_inv >> i) & 1:
            out ^= prod << i
    for i in range(255, 127, -1):
        if (out >> i) & 1:
            out ^= _P << (i - 128)
    return out


def ref_polyval(key: bytes, data: bytes) -> bytes:
    h = int.from_bytes(key, "little")
    s = 0
    data = data + bytes(-len(data) % 16)
    for i in range(0, len(data), 16):
        s = ref_dot(s ^ int.from_bytes(data[i:i + 16], "little"), h)
    return s.to_bytes(16, "little")


# RFC 8452 Appendix A (worked example) and the POLYVAL lines of Appendix C:
# (record authentication key, POLYVAL input, POLYVAL result).
RFC8452_POLYVAL = [
    ("25629347589242761d31f826ba4b757b", "4f4f95668c83dfb6401762bb2d01a262d1a24ddd2721d006bbe45f20d3c9f362",
     "f7a3b47b846119fae5b7866cf5e5b77e"),
    ("d9b360279694941ac5dbc6987ada7377", "00000000000000000000000000000000", "00000000000000000000000000000000"),
    ("d9b360279694941ac5dbc6987ada7377", "0100000000000000000000000000000000000000000000004000000000000000",
     "eb93b7740962c5e49d2a90a7dc5cec74"),
    ("d9b360279694941ac5dbc6987ada7377", "0100000000000000000000000000000000000000000000006000000000000000",
     "48eb6c6c5a2dbe4a1dde508fee06361b"),
    ("d9b360279694941ac5dbc6987ada7377", "0100000000000000000000000000000000000000000000008000000000000000",
     "20806c26e3c1de019e111255708031d6"),
    ("d9b360279694941ac5dbc6987ada7377",
     "01000000000000000000000000000000" "02000000000000000000000000000000" "00000000000000000001000000000000",
     "ce6edc9a50b36d9a98986bbf6a261c3b"),
    ("d9b360279694941ac5dbc6987ada7377",
     "01000000000000000000000000000000" "02000000000000000000000000000000" "03000000000000000000000000000000"
     "00000000000000008001000000000000",
     "81388746bc22d26b2abc3dcb15754222"),
    ("d9b360279694941ac5dbc6987ada7377",
     "01000000000000000000000000000000" "02000000000000000000000000000000" "03000000000000000000000000000000"
     "04000000000000000000000000000000" "00000000000000000002000000000000",
     "1e39b6d3344d348f6044f89935d1cf78"),
    ("d9b360279694941ac5dbc6987ada7377",
     "01000000000000000000000000000000" "02000000000000000000000000000000" "08000000000000004000000000000000",
     "b26781e7e2c1376f96bec195f3709b2a"),
    ("d9b360279694941ac5dbc6987ada7377",
     "01000000000000000000000000000000" "02000000000000000000000000000000" "03000000000000000000000000000000"
     "04000000000000000000000000000000" "05000000000000000000000000000000" "08000000000000000002000000000000",
     "ffcd05d5770f34ad9267f0a59994b15a"),
    ("d9b360279694941ac5dbc6987ada7377",
     "01000000000000000000000000000000" "02000000000000000000000000000000" "60000000000000002000000000000000",
     "f6ce9d3dcd68a2fd603c7ecc18fb9918"),
    ("3e28de1120b2981a0155795ca2812af6",
     "46bb91c3c50000000000000000000000" "7a806c00000000000000000000000000" "28000000000000001800000000000000",
     "43d9a745511dcfa21b96dd606f1d5720"),
    ("43b8de9cea62330d15cccfc84a33e8c8",
     "fc880c94a95198874296000000000000" "bdc66f14654500000000000000000000" "50000000000000003000000000000000",
     "26498e0d2b1ef004e808c458e8f2f515"),
    ("8a51df64d93eaf667c2c09bd454ce5c5",
     "046787f3ea22c127aaf195d189472800" "1177441f195495860f00000000000000" "78000000000000004800000000000000",
     "63a3451c0b23345ad02bba59956517cf"),
    ("22f50707a95dd416df069d670cb775e8",
     "c9882e5386fd9f92ec489c8fde2be2cf" "97e74e93000000000000000000000000" "9f572c614b4745914474e7c700000000"
     "a0000000000000006000000000000000",
     "0cca0423fba9d77fe7e2e6963b08cdd0"),
    ("0b00a29a83e7e95b92e3a0783b29f140",
     "2950a70d5a1db2316fd568378da107b5" "2b0da55210cc1c1b0a00000000000000" "0d8c8451178082355c9e940fea2f5800"
     "c8000000000000007800000000000000",
     "1086ef25247aa41009bbc40871d9b350"),
    ("21c874a8bad3603d1c3e8784df5b3f9f",
     "1860f762ebfbd08284e421702de0de18" "baa9c9596291b08466f37de21c7f0000" "6b3db4da3d57aa94842b9803a96e07fb"
     "6de70000000000000000000000000000" "f0000000000000009000000000000000",
     "55462a5afa0da8d646481e049ef9c764"),
    ("3724f55f1d22ac0ab830da0b6a995d74",
     "7576f7028ec6eb5ea7e298342a94d4b2" "02b370ef9768ec6561c4fe6b7e7296fa" "859c2100000000000000000000000000"
     "e42a3c02c25b64869e146d7b233987bd" "dfc240871d0000000000000000000000" "1801000000000000a800000000000000",
     "4cbba090f03f7d1188ea55749fa6c7bd"),
    ("b5d3c529dfafac43136d2d11be284d7f", "0100000000000000000000000000000000000000000000004000000000000000",
     "05230f62f0eac8aa14fe4d646b59cd41"),
]


#: pycryptodome's GHASH libraries as the module binds them (CLMUL/PMULL first, then portable)
NATIVE_BACKENDS, _NO_BACKEND_REASON = cgo._ghash_backends()


def all_paths(key: bytes, data: bytes) -> dict[str, bytes]:
    """POLYVAL through every code path of the module: pure Python and each native backend."""
    h = int.from_bytes(key, "little")
    padded = data + bytes(-len(data) % 16)
    nibbles = cgo._nibble_tables(h)
    paths = {
        "polyval": polyval(key, data),
        "pure": cgo.PurePolyvalKey(key).digest(data),
        "tableless": cgo._horner_tableless(h, padded).to_bytes(16, "little"),
        "nibbles": cgo._horner_nibbles(nibbles, padded).to_bytes(16, "little"),
        "bytes": cgo._horner_bytes(cgo._byte_tables(nibbles), padded).to_bytes(16, "little"),
    }
    for backend in NATIVE_BACKENDS:
        paths[backend.name] = cgo.NativePolyvalKey(key, backend=backend).digest(data)
    return paths


def test_native_polyval_is_in_use() -> None:
    """pycryptodome is a dependency: CGO must not quietly run the much slower fallback."""
    assert NATIVE_BACKENDS, _NO_BACKEND_REASON
    names = [b.name for b in NATIVE_BACKENDS]
    assert "pycryptodome_ghash_portable" in names  # always built; CLMUL/PMULL depends on the CPU
    assert cgo.POLYVAL_BACKEND == names[0], cgo._backend_note
    assert cgo.PolyvalKey is cgo.NativePolyvalKey
    for backend in NATIVE_BACKENDS:
        assert cgo._self_test(backend) is None, backend.name


@pytest.mark.parametrize("key,data,expect", RFC8452_POLYVAL, ids=[f"rfc8452-{i}" for i in range(len(RFC8452_POLYVAL))])
def test_polyval_rfc8452(key: str, data: str, expect: str) -> None:
    for path, got in all_paths(H(key), H(data)).items():
        assert got.hex() == expect, path
    assert ref_polyval(H(key), H(data)).hex() == expect


def test_polyval_paths_match_the_reference_on_random_inputs() -> None:
    rng = random.Random(8452)
    for n in [0, 1, 2, 15, 16, 17, 31, 33, 64, 100, 510, 512, 700]:
        key, data = rng.randbytes(16), rng.randbytes(n)
        want = ref_polyval(key, data)
        for path, got in all_paths(key, data).items():
            assert got == want, (n, path)
    # edge keys
    for key in (bytes(16), b"\xff" * 16, (1).to_bytes(16, "little"), (1 << 127).to_bytes(16, "little")):
        data = rng.randbytes(48)
        assert set(all_paths(key, data).values()) == {ref_polyval(key, data)}


def test_polyval_key_switches_methods_without_changing_results() -> None:
    """Tableless, then nibble tables, then byte tables: one key, the same answers."""
    rng = random.Random(5)
    key = rng.randbytes(16)
    pk = cgo.PurePolyvalKey(key, byte_tables_after=200)
    seen = []
    for i in range(40):
        data = rng.randbytes(16 if i < 2 else rng.choice([16, 33, 510]))
        assert pk.digest(data) == ref_polyval(key, data), i
        seen.append((pk._nibbles is not None, pk._bytes is not None))
    assert seen[:2] == [(False, False)] * 2  # a block or two: no tables yet
    assert (True, False) in seen and seen[-1] == (False, True)
    plain = cgo.PurePolyvalKey(key)  # no upgrade asked for: never byte tables
    for _ in range(20):
        plain.digest(rng.randbytes(512))
    assert plain._bytes is None and plain._nibbles is not None
    for cls in (PolyvalKey, cgo.PurePolyvalKey, cgo.NativePolyvalKey):
        with pytest.raises(LocalProtocolError):
            cls(bytes(15))


def test_a_broken_reduction_breaks_the_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectors do catch a one-bit error in the field arithmetic (here: x^-1)."""
    key, data, expect = RFC8452_POLYVAL[0]
    assert all_paths(H(key), H(data))["nibbles"].hex() == expect
    monkeypatch.setattr(cgo, "_DIV_X", (0, (_P ^ (1 << 121)) >> 1))
    assert all_paths(H(key), H(data))["nibbles"].hex() != expect


def _imps() -> list:
    """pycryptodome's raw GHASH function tables, in the order of NATIVE_BACKENDS."""
    from Crypto.Cipher import _mode_gcm

    return [getattr(_mode_gcm, "_" + b.name.removeprefix("pycryptodome_")) for b in NATIVE_BACKENDS]


@pytest.mark.parametrize("which", ["fastest", "portable"])
def test_native_polyval_matches_the_reference_on_random_inputs(which: str) -> None:
    """Each native backend against the pure-Python POLYVAL (and, for some, the bit-by-bit one).

    Keys are reused across messages, as CGO's pass-through layers do, so a stale output
    buffer or a key expansion that some call corrupts would show.
    """
    assert NATIVE_BACKENDS, _NO_BACKEND_REASON
    backend = NATIVE_BACKENDS[0] if which == "fastest" else NATIVE_BACKENDS[-1]
    rng = random.Random(f"{359}-{which}")
    edge = [bytes(16), b"\xff" * 16, (1).to_bytes(16, "little"), (1 << 127).to_bytes(16, "little")]
    checked = 0
    for round_ in range(60):
        key = edge[round_] if round_ < len(edge) else rng.randbytes(16)
        native, pure = cgo.NativePolyvalKey(key, backend=backend), cgo.PurePolyvalKey(key)
        for _ in range(5):
            n = rng.choice([0, 1, 15, 16, 17, 32, 493, 509, 510, 512, 528, rng.randrange(700)])
            data = rng.randbytes(n)
            want = pure.digest(data)
            assert native.digest(data) == want, (backend.name, key.hex(), n)
            assert native.hash_int(bytearray(data)) == int.from_bytes(want, "little")
            assert native.digest(memoryview(data)) == want
            checked += 1
            if checked % 50 == 0:
                assert want == ref_polyval(key, data)
    assert checked == 300


def _backend_with(imp, **changes) -> cgo.GhashBackend:
    """A backend bound to ``imp`` (a pycryptodome GHASH function table) with some functions swapped."""
    from Crypto.Util import _raw_api

    return cgo._make_backend("pycryptodome-broken", imp._replace(**changes), _raw_api)


def test_the_self_test_refuses_a_broken_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A binding that computes anything but POLYVAL is never used: the module falls back."""
    assert NATIVE_BACKENDS, _NO_BACKEND_REASON
    good = NATIVE_BACKENDS[-1]
    imp = _imps()[-1]
    # plain GHASH: no byte reversal of the blocks, the key or the result
    no_reversal = _backend_with(imp, ghash_expand_rev=imp.ghash_expand, ghash_rev=imp.ghash)
    assert "RFC 8452" in cgo._self_test(no_reversal)
    # right blocks, wrong key transform (H used as the GHASH key without mulX / reversal)
    assert "RFC 8452" in cgo._self_test(_backend_with(imp, ghash_expand_rev=imp.ghash_expand))
    assert cgo._self_test(_backend_with(imp)) is None  # the same binding, unbroken
    # an output that is not the live C buffer (a copy made once): right only by accident
    assert cgo._self_test(good._replace(view=lambda buf: bytes(16))) is not None

    def changed_api(*args: object) -> int:
        raise TypeError("ghash_rev() takes 6 arguments")

    assert "binding error" in cgo._self_test(_backend_with(imp, ghash_rev=changed_api))
    # the selection skips broken backends and explains itself when none is left
    monkeypatch.setattr(cgo, "_ghash_backends", lambda: ([no_reversal, good], ""))
    assert cgo._pick_backend() == (good, good.name)
    monkeypatch.setattr(cgo, "_ghash_backends", lambda: ([no_reversal], ""))
    backend, why = cgo._pick_backend()
    assert backend is None and "-broken: RFC 8452 vector" in why


FRESH_INTERPRETER = """
import json, os, sys, warnings
{preamble}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from onionp2p.proto import cgo
from Crypto.Util import _raw_api
v = json.loads(open({vectors!r}).read())["uiv_testvecs"][0]
uiv = cgo.UIV(bytes.fromhex(v["keys_J_S"]), encrypt=v["encrypt"])
tweak = bytes.fromhex(v["tweak_H"])
run = uiv.encrypt if v["encrypt"] else uiv.decrypt
out = run(tweak[:16], tweak[16], bytes.fromhex(v["x_l"]) + bytes.fromhex(v["x_r"]))
key = os.urandom(16)
fast, slow = cgo.PolyvalKey(key), cgo.PurePolyvalKey(key)
same = all(fast.digest(d) == slow.digest(d) for d in (os.urandom(n) for n in (16, 100, 510, 512) * 5))
print(json.dumps({{"backend": cgo.POLYVAL_BACKEND, "key_class": cgo.PolyvalKey.__name__,
                  "raw_api": _raw_api.backend, "same": same,
                  "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                  "vector": out.hex() == v["y"]["y_l"] + v["y"]["y_r"]}}))
"""


def _fresh_interpreter(preamble: str) -> dict:
    """Import cgo in a new interpreter after ``preamble``; what it chose, warned and computed."""
    code = FRESH_INTERPRETER.format(preamble=preamble, vectors=str(VECTOR_FILE))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_broken_binding_at_import_falls_back_to_pure_python_with_a_warning() -> None:
    """A pycryptodome that computes plain GHASH in place of the POLYVAL form: slow, right and loud."""
    result = _fresh_interpreter(
        "from Crypto.Cipher import _mode_gcm as g\n"
        "for name in ('_ghash_clmul', '_ghash_portable'):\n"
        "    imp = getattr(g, name)\n"
        "    if imp is not None:\n"
        "        setattr(g, name, imp._replace(ghash_expand_rev=imp.ghash_expand, ghash_rev=imp.ghash))\n")
    assert result["backend"] == "python" and result["key_class"] == "PurePolyvalKey"
    polyval_warnings = [w for w in result["warnings"] if "POLYVAL" in w]  # (not the CGO backend's)
    assert len(polyval_warnings) == 1 and "native POLYVAL unavailable" in polyval_warnings[0]
    assert "RFC 8452 vector" in polyval_warnings[0]
    assert result["vector"] and result["same"]


def test_native_polyval_through_pycryptodome_ctypes_backend() -> None:
    """Without cffi, pycryptodome binds its C code with ctypes: the adapter works there too."""
    result = _fresh_interpreter("sys.modules['cffi'] = None  # pycryptodome falls back to ctypes")
    assert result["raw_api"] == "ctypes"
    assert result["backend"].startswith("pycryptodome_ghash_") and result["key_class"] == "NativePolyvalKey"
    assert result["warnings"] == []
    assert result["vector"] and result["same"]


def _cgo_transcript(seed: int, cells: int) -> list[bytes]:
    """Everything observable from a client and three relays over random traffic.

    Forward and backward cells to and from random hops, RELAY and RELAY_EARLY, and a
    CgoCrypt pair that only passes random cells on; every output body, tag and hop index,
    and every key state (J | S, N, T') after each cell.
    """
    rng = random.Random(seed)
    keys = [rng.randbytes(KEY_MATERIAL_LEN) for _ in range(3)]
    client = ClientCrypto()
    for k in keys:
        client.add_hop(k)
    relays = [RelayCrypto(k) for k in keys]
    passer = cgo.CgoCrypt(rng.randbytes(DIR_KEY_LEN), relay=True)
    peeler = cgo.CgoCrypt(rng.randbytes(DIR_KEY_LEN), relay=False)
    out: list[bytes] = []
    for _ in range(cells):
        cmd = rng.choice([CELL_RELAY, CELL_RELAY_EARLY])
        hop = rng.randrange(3)
        body = rng.randbytes(RELAY_BODY_LEN)
        if rng.random() < 0.5:
            cell, tag = client.originate(body, hop, cmd=cmd)
            out += [cell, tag]
            for i in range(hop + 1):
                recognized, cell, got = relays[i].decrypt_forward(cell, cmd=cmd)
                assert recognized is (i == hop)
                out.append(cell)
            assert got == tag and cell[16:] == body[16:]
        else:
            cell, tag = relays[hop].originate_backward(body, cmd=cmd)
            out += [cell, tag]
            for i in range(hop - 1, -1, -1):
                cell = relays[i].encrypt_backward(cell, cmd=cmd)
                out.append(cell)
            index, plain, got = client.decrypt_inbound(cell, cmd=cmd)
            assert (index, got, plain[16:]) == (hop, tag, body[16:])
            out.append(plain)
        noise = rng.randbytes(RELAY_BODY_LEN)
        out += [passer.relay_backward(cmd, noise), peeler.client_forward(cmd, noise)]
        for c in [passer, peeler] + [side for r in relays for side in (r._hop.fwd, r._hop.bwd)]:
            out += [c.key, c.nonce, c.tprime]
    return out


def test_native_and_pure_polyval_give_the_same_cells(monkeypatch: pytest.MonkeyPatch,
                                                     pure: Backend) -> None:
    """Full cell operations, key updates included, are byte-identical with either POLYVAL and
    either XOR (C strxor or Python ints)."""
    assert cgo.PolyvalKey is cgo.NativePolyvalKey, cgo._backend_note
    fast = _cgo_transcript(seed=1234, cells=300)
    monkeypatch.setattr(cgo, "PolyvalKey", cgo.PurePolyvalKey)
    probe = ClientCrypto()
    probe.add_hop(bytes(KEY_MATERIAL_LEN))
    assert isinstance(probe._hops[0].fwd._uiv._ku.__self__, cgo.PurePolyvalKey)  # the reference runs
    reference = _cgo_transcript(seed=1234, cells=300)
    assert len(fast) == len(reference) > 300 * 20
    for i, (a, b) in enumerate(zip(fast, reference)):
        assert a == b, i
    monkeypatch.setattr(cgo, "_make_xor", cgo._make_xor_ints)  # and the XOR in Python ints too
    probe = ClientCrypto()
    probe.add_hop(bytes(KEY_MATERIAL_LEN))
    assert probe._hops[0].fwd._uiv._xor is cgo._xor_ints
    assert _cgo_transcript(seed=1234, cells=300) == fast


# --- the layers on their own -----------------------------------------------------------------


def test_et_round_trip_and_tweak_dependence(backend: Backend) -> None:
    rng = random.Random(1)
    key = rng.randbytes(32)
    h, x_r, block = rng.randbytes(16), rng.randbytes(MSG_LEN), rng.randbytes(16)
    enc, dec = cgo.ET(key, encrypt=True), cgo.ET(key, encrypt=False)
    c = enc.encrypt(h, CELL_RELAY, x_r, block)
    assert c != block and dec.decrypt(h, CELL_RELAY, x_r, c) == block
    assert dec.decrypt(h, CELL_RELAY_EARLY, x_r, c) != block  # the command is in the tweak
    assert dec.decrypt(h, CELL_RELAY, x_r[:-1] + bytes([x_r[-1] ^ 1]), c) != block  # so is all of X_R
    assert enc.encrypt(bytes(16), CELL_RELAY, x_r, block) != c  # and H
    with pytest.raises(LocalProtocolError):
        enc.decrypt(h, CELL_RELAY, x_r, c)
    with pytest.raises(LocalProtocolError):
        dec.encrypt(h, CELL_RELAY, x_r, c)
    with pytest.raises(LocalProtocolError):
        enc.encrypt(h, 256, x_r, block)
    with pytest.raises(LocalProtocolError):
        enc.encrypt(h, CELL_RELAY, x_r[1:], block)
    with pytest.raises(LocalProtocolError):
        cgo.ET(key[:31], encrypt=True)


def test_prf_is_aes_ctr_from_the_polyval_iv(backend: Backend) -> None:
    """t=0 and t=1 are two windows of one AES-CTR stream (checked with a plain CTR)."""
    rng = random.Random(2)
    for _ in range(8):
        k, b, tweak = rng.randbytes(16), rng.randbytes(16), rng.randbytes(16)
        iv = bytearray(ref_polyval(b, tweak))
        iv[15] &= 0xC0
        stream = Cipher(algorithms.AES(k), modes.CTR(bytes(iv))).encryptor().update(bytes(64 * 16))
        prf = cgo.PRF(k + b)
        assert prf.xor_t0(tweak, bytes(MSG_LEN)) == stream[:MSG_LEN]
        assert prf.xor_t0(tweak, bytes(496)) == stream[:496]
        assert prf.stream_t1(tweak, 80) == stream[31 * 16:31 * 16 + 80]
        assert prf.stream_t1(tweak, 528) == stream[31 * 16:]
    with pytest.raises(LocalProtocolError):
        prf.xor_t0(tweak, bytes(497))
    with pytest.raises(LocalProtocolError):
        prf.stream_t1(tweak, 529)
    with pytest.raises(LocalProtocolError):
        prf.xor_t0(tweak[:15], bytes(16))


# --- the fast paths against their references ------------------------------------------------

#: IVs whose counters sit just below a carry: 2^128 (all ones), 2^64 and 2^32 (low 64 / 32
#: bits all ones) and 2^8 (the last byte); the low six bits are clear, as the PRF's are
EDGE_IVS = [b"\xff" * 15 + b"\xc0", bytes(8) + b"\xff" * 7 + b"\xc0", bytes(12) + b"\xff" * 3 + b"\xc0",
            bytes(15) + b"\xc0", bytes(16), b"\x80" + bytes(14) + b"\x40"]


def _ctr_reference(key: bytes, iv: bytes, first: int, count: int) -> bytes:
    """Blocks ``first`` .. ``first + count - 1`` of AES-128-CTR from ``iv`` (``cryptography``'s CTR mode)."""
    stream = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(bytes(16 * (first + count)))
    return stream[16 * first:]


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=16, max_size=16),
       iv=st.one_of(st.sampled_from(EDGE_IVS), st.binary(min_size=16, max_size=16)),
       first=st.integers(0, 63), count=st.integers(0, 64))
@example(key=bytes(16), iv=EDGE_IVS[0], first=0, count=64)  # up to 2^128 - 1, the last one before the wrap
@example(key=bytes(16), iv=EDGE_IVS[1], first=31, count=33)
@example(key=bytes(16), iv=EDGE_IVS[2], first=31, count=5)
@example(key=bytes(16), iv=bytes(15) + b"\xfd", first=3, count=1)  # one block past the last byte: must raise
@example(key=bytes(16), iv=bytes(15) + b"\xff", first=0, count=2)
def test_counter_blocks_through_ecb_are_aes_ctr(key: bytes, iv: bytes, first: int, count: int) -> None:
    """The PRF's keystream (counter blocks through one ECB context) is AES-CTR, for any IV,
    near the 2^128 / 2^64 / 2^32 carries too; a run that would carry out of the last byte
    (which the PRF never asks for) raises instead of giving a wrong stream."""
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update
    if iv[15] + first + count <= 256:
        assert ecb(bytes(cgo._counter_blocks(iv, first, count))) == _ctr_reference(key, iv, first, count)
    else:
        with pytest.raises(ValueError):
            cgo._counter_blocks(iv, first, count)


@settings(max_examples=60, deadline=None)
@given(k=st.binary(min_size=16, max_size=16), b=st.binary(min_size=16, max_size=16),
       tweak=st.binary(min_size=16, max_size=16), n0=st.integers(0, 496), n1=st.integers(0, 528))
def test_prf_fast_path_is_aes_ctr_from_the_polyval_iv(k: bytes, b: bytes, tweak: bytes, n0: int,
                                                       n1: int) -> None:
    """PRF output for random keys and inputs and every length against CTR from the reference IV."""
    iv = bytearray(ref_polyval(b, tweak))
    iv[15] &= 0xC0
    stream = _ctr_reference(k, bytes(iv), 0, 64)
    prf, data = cgo.PRF(k + b), os.urandom(n0)
    assert prf.xor_t0(tweak, data) == bytes(x ^ y for x, y in zip(data, stream))
    assert prf.stream_t1(tweak, n1) == stream[31 * 16:31 * 16 + n1]
    uiv = cgo.UIV(bytes(32) + k + b, encrypt=True)  # UIV+ update: 80 bytes of t=1 from UIV's own PRF fields
    assert uiv.update(tweak) == stream[31 * 16 + 64:31 * 16 + 80]
    assert uiv.key == stream[31 * 16:31 * 16 + 64]


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=512), extra=st.binary(max_size=64), again=st.binary(max_size=512))
@example(a=bytes(493), extra=bytes(3), again=b"\xff" * 493)
def test_xor_fast_path_matches_the_reference(a: bytes, extra: bytes, again: bytes) -> None:
    """The C XOR (when bound) and the int XOR give ``a ^ b[:len(a)]``; a result is not changed
    by the next call on the same (reused) output buffer."""
    b = os.urandom(len(a)) + extra
    want = bytes(x ^ y for x, y in zip(a, b))
    makers = [cgo._make_xor_ints] + ([cgo._native_xor] if cgo._native_xor is not None else [])
    for make in makers:
        xor = make()
        got = xor(a, b)
        assert type(got) is bytes and got == want, make
        xor(again, again + bytes(len(again)))  # the next cell through the same buffer
        assert got == want


def test_the_xor_fast_path_is_in_use(pure: Backend) -> None:
    """pycryptodome (with cffi, as installed) gives the C XOR; CGO must not quietly run the int one."""
    assert cgo._native_xor is not None, cgo.XOR_BACKEND
    assert cgo.XOR_BACKEND == "pycryptodome_strxor"
    assert cgo.UIV(bytes(64), encrypt=True)._xor.__qualname__.startswith("_native_xor_factory")


def test_a_rekey_keeps_the_buffers_and_replaces_only_the_keys(pure: Backend) -> None:
    """UIV+ update makes two AES contexts and two POLYVAL keys, and reuses its buffers (the
    per-cell budget of an end that rekeys); the POLYVAL keys write into the UIV's buffer."""
    uiv = cgo.UIV(bytes(64), encrypt=True)
    out, xor, ku, b, aes = uiv._out, uiv._xor, uiv._ku, uiv._b, uiv._et_aes
    uiv.update(bytes(16))
    assert uiv._out is out and uiv._xor is xor
    assert uiv._ku is not ku and uiv._b is not b and uiv._et_aes is not aes
    assert uiv._ku.__closure__ is not None and any(c.cell_contents is out for c in uiv._ku.__closure__)


def test_uiv_round_trip_both_ways(backend: Backend) -> None:
    rng = random.Random(3)
    key = rng.randbytes(64)
    enc, dec = cgo.UIV(key, encrypt=True), cgo.UIV(key, encrypt=False)
    for _ in range(5):
        h, body = rng.randbytes(16), rng.randbytes(RELAY_BODY_LEN)
        c = enc.encrypt(h, CELL_RELAY, body)
        assert dec.decrypt(h, CELL_RELAY, c) == body
        assert enc.encrypt(h, CELL_RELAY, dec.decrypt(h, CELL_RELAY, body)) == body
    # a single flipped bit anywhere scrambles the first block of the result (wide block)
    h, body = rng.randbytes(16), rng.randbytes(RELAY_BODY_LEN)
    c = enc.encrypt(h, CELL_RELAY, body)
    for pos in (0, 15, 16, 17, 300, RELAY_BODY_LEN - 1):
        bad = bytearray(body)
        bad[pos] ^= 0x01
        assert enc.encrypt(h, CELL_RELAY, bytes(bad))[:16] != c[:16], pos
    with pytest.raises(LocalProtocolError):
        enc.decrypt(h, CELL_RELAY, c)
    with pytest.raises(LocalProtocolError):
        enc.encrypt(h, CELL_RELAY, c[:-1])


def test_uiv_update_is_deterministic_and_one_way(backend: Backend) -> None:
    key, nonce = os.urandom(64), os.urandom(16)
    a, b = cgo.UIV(key, encrypt=True), cgo.UIV(key, encrypt=False)
    assert a.update(nonce) == b.update(nonce)
    assert a.key == b.key != key
    assert len(a.key) == 64


# --- a client and three relays ---------------------------------------------------------------


def make_body(rng: random.Random, relay_cmd: int = 2, stream_id: int = 1, data: bytes | None = None) -> bytes:
    """A v1 plaintext body: tag area (ignored) | Cmd | Len | StreamID | Data | 4 zeros | random."""
    if data is None:
        data = rng.randbytes(rng.randrange(0, 489))
    head = rng.randbytes(16) + struct.pack(">BHH", relay_cmd, len(data), stream_id)
    pad = bytes(4) + rng.randbytes(RELAY_BODY_LEN)
    return (head + data + pad)[:RELAY_BODY_LEN]


class Circuit:
    """A client and ``n`` relays that share keys, wired together in memory."""

    def __init__(self, seed: int, n: int = 3) -> None:
        rng = random.Random(seed)
        self.keys = [rng.randbytes(KEY_MATERIAL_LEN) for _ in range(n)]
        self.client = ClientCrypto()
        for k in self.keys:
            self.client.add_hop(k)
        self.relays = [RelayCrypto(k) for k in self.keys]

    def forward(self, cell: bytes, cmd: int = CELL_RELAY, links: list | None = None) -> tuple[int, bytes, bytes] | None:
        """Pass a client cell along the relays; return (hop, plaintext, tag) or None."""
        for i, relay in enumerate(self.relays):
            if links is not None:
                links.append(cell)
            recognized, cell, tag = relay.decrypt_forward(cell, cmd=cmd)
            if recognized:
                assert tag is not None
                return i, cell, tag
            assert tag is None
        return None

    def backward(self, hop: int, body: bytes) -> tuple[bytes, bytes]:
        """Relay ``hop`` originates ``body``; each earlier relay adds its layer."""
        cell, tag = self.relays[hop].originate_backward(body, cmd=CELL_RELAY)
        for relay in reversed(self.relays[:hop]):
            cell = relay.encrypt_backward(cell, cmd=CELL_RELAY)
        return cell, tag


def test_forward_round_trip_to_every_hop(backend: Backend) -> None:
    rng = random.Random(10)
    circ = Circuit(10)
    for i in range(30):
        hop = rng.randrange(3)
        cmd = CELL_RELAY_EARLY if i % 4 == 0 else CELL_RELAY
        body = make_body(rng)
        links: list[bytes] = []
        cell, tag = circ.client.originate(body, hop, cmd=cmd)
        assert len(cell) == RELAY_BODY_LEN and len(tag) == TAG_LEN
        got = circ.forward(cell, cmd, links)
        assert got is not None
        at, plain, relay_tag = got
        assert at == hop
        assert plain[16:] == body[16:]  # the message is intact
        # the SENDME tag is the tag field the target relay received, on both sides
        assert relay_tag == tag == links[hop][:16]
        assert circ.client.forward_tag(hop) == tag == circ.relays[hop].forward_tag


def test_backward_round_trip_from_every_hop(backend: Backend) -> None:
    rng = random.Random(11)
    circ = Circuit(11)
    for _ in range(30):
        hop = rng.randrange(3)
        body = make_body(rng)
        cell, tag = circ.backward(hop, body)
        at, plain, client_tag = circ.client.decrypt_inbound(cell, cmd=CELL_RELAY)
        assert at == hop and plain[16:] == body[16:]
        assert client_tag == tag
        assert circ.client.backward_tag(hop) == tag == circ.relays[hop].backward_tag
    # from hop 0 the tag is what travels on the client's link
    cell, tag = circ.backward(0, make_body(rng))
    assert cell[:16] == tag
    circ.client.decrypt_inbound(cell, cmd=CELL_RELAY)


def test_interleaved_traffic_and_batches(backend: Backend) -> None:
    rng = random.Random(12)
    circ = Circuit(12)
    for _ in range(10):
        hop = rng.randrange(3)
        body = make_body(rng)
        cell, tag = circ.client.originate(body, hop, cmd=CELL_RELAY)
        assert circ.forward(cell)[:1] == (hop,)
        cells, tags, hops = [], [], []
        for _ in range(rng.randrange(1, 4)):
            h = rng.randrange(3)
            c, t = circ.backward(h, make_body(rng))
            cells.append(c)
            tags.append(t)
            hops.append(h)
        results = circ.client.decrypt_inbound_many(cells, cmd=CELL_RELAY)
        assert [r[0] for r in results] == hops and [r[2] for r in results] == tags


def test_relay_batch_methods(backend: Backend) -> None:
    rng = random.Random(13)
    keys = rng.randbytes(KEY_MATERIAL_LEN)
    client, relay, twin = ClientCrypto(), RelayCrypto(keys), RelayCrypto(keys)
    client.add_hop(keys)
    bodies = [make_body(rng) for _ in range(3)]
    cells = [client.originate(b, 0, cmd=CELL_RELAY)[0] for b in bodies]
    batch = relay.decrypt_forward_many(cells, cmd=CELL_RELAY)
    assert [r[0] for r in batch] == [True] * 3
    assert [r[1][16:] for r in batch] == [b[16:] for b in bodies]
    noise = [rng.randbytes(RELAY_BODY_LEN) for _ in range(3)]
    assert relay.encrypt_backward_many(noise, cmd=CELL_RELAY) == [
        twin.encrypt_backward(c, cmd=CELL_RELAY) for c in noise]
    # the circuit core's form: a framed body (a memoryview into the read buffer), RELAY
    framed = memoryview(b"".join(noise))
    assert [relay.backward_relay(framed[i * RELAY_BODY_LEN:(i + 1) * RELAY_BODY_LEN]) for i in range(3)] == [
        twin.encrypt_backward(c, cmd=CELL_RELAY) for c in noise]


def test_originate_ignores_the_tag_area(backend: Backend) -> None:
    keys = os.urandom(KEY_MATERIAL_LEN)
    a, b = ClientCrypto(), ClientCrypto()
    a.add_hop(keys)
    b.add_hop(keys)
    msg = os.urandom(MSG_LEN)
    assert a.originate(bytes(16) + msg, 0, cmd=CELL_RELAY) == b.originate(b"\xff" * 16 + msg, 0, cmd=CELL_RELAY)
    r1, r2 = RelayCrypto(keys), RelayCrypto(keys)
    assert r1.originate_backward(bytes(16) + msg, cmd=CELL_RELAY) == r2.originate_backward(
        os.urandom(16) + msg, cmd=CELL_RELAY)


def test_every_cell_rekeys_the_endpoints(backend: Backend) -> None:
    """Forward secrecy per cell: the same plaintext twice gives unrelated cells."""
    circ = Circuit(14, n=1)
    body = make_body(random.Random(0))
    key0 = circ.client._hops[0].fwd.key
    c1, t1 = circ.client.originate(body, 0, cmd=CELL_RELAY)
    key1 = circ.client._hops[0].fwd.key
    c2, t2 = circ.client.originate(body, 0, cmd=CELL_RELAY)
    assert key0 != key1 != circ.client._hops[0].fwd.key
    assert c1 != c2 and t1 != t2
    assert circ.forward(c1)[0] == 0 and circ.forward(c2)[0] == 0
    assert circ.relays[0]._hop.fwd.key == circ.client._hops[0].fwd.key
    # a relay that only passes cells on keeps its keys
    circ3 = Circuit(15)
    guard_key = circ3.relays[0]._hop.fwd.key
    for _ in range(3):
        circ3.forward(circ3.client.originate(body, 2, cmd=CELL_RELAY)[0])
    assert circ3.relays[0]._hop.fwd.key == guard_key
    assert circ3.relays[2]._hop.fwd.key == circ3.client._hops[2].fwd.key


@pytest.mark.parametrize("pos", [0, 7, 15, 16, 17, 200, RELAY_BODY_LEN - 1])
def test_a_tampered_forward_cell_is_not_recognized(pos: int, backend: Backend) -> None:
    rng = random.Random(pos)
    circ = Circuit(20 + pos)
    body = make_body(rng)
    cell, _ = circ.client.originate(body, 2, cmd=CELL_RELAY)
    bad = bytearray(cell)
    bad[pos] ^= 0x40
    assert circ.forward(bytes(bad)) is None
    # the chained T' now differs: the next honest cell is lost too
    cell2, _ = circ.client.originate(make_body(rng), 2, cmd=CELL_RELAY)
    assert circ.forward(cell2) is None


def test_a_tampered_cell_in_the_middle_is_not_recognized(backend: Backend) -> None:
    """Tampering after the guard (on the guard-middle link) still kills the cell."""
    rng = random.Random(30)
    circ = Circuit(30)
    cell, _ = circ.client.originate(make_body(rng), 2, cmd=CELL_RELAY)
    recognized, cell, _ = circ.relays[0].decrypt_forward(cell, cmd=CELL_RELAY)
    assert not recognized
    bad = bytearray(cell)
    bad[400] ^= 1
    for relay in circ.relays[1:]:
        recognized, bad, tag = relay.decrypt_forward(bytes(bad), cmd=CELL_RELAY)
        assert not recognized and tag is None


def test_a_changed_command_is_not_recognized(backend: Backend) -> None:
    circ = Circuit(31)
    cell, _ = circ.client.originate(make_body(random.Random(1)), 1, cmd=CELL_RELAY_EARLY)
    assert circ.forward(cell, CELL_RELAY) is None


def test_a_tampered_backward_cell_is_not_recognized(backend: Backend) -> None:
    rng = random.Random(32)
    circ = Circuit(32)
    cell, _ = circ.backward(2, make_body(rng))
    bad = bytearray(cell)
    bad[100] ^= 0x80
    with pytest.raises(DigestMismatch):
        circ.client.decrypt_inbound(bytes(bad), cmd=CELL_RELAY)
    good, _ = circ.backward(1, make_body(rng))
    with pytest.raises(DigestMismatch) as info:
        circ.client.decrypt_inbound_many([good], cmd=CELL_RELAY)
    assert info.value.partial == []  # type: ignore[attr-defined]


def test_keys_from_an_ntor_v3_handshake(backend: Backend) -> None:
    """160 bytes of ntor v3 output key both ends; the client asks for Relay=6 in ext 3."""
    b = X25519PrivateKey.generate()
    onion_key = b.public_key().public_bytes_raw()
    ed_id = os.urandom(32)
    request = encode_extensions([(3, bytes([2, 6]))])  # subprotocol request: Relay=6
    client_hs = NtorV3Client(ed_id, onion_key, request)
    reply, client_msg, relay_keys = ntor_v3_server(client_hs.onion_skin, ed_id, {onion_key: b}, b"\x00",
                                                   length=KEY_MATERIAL_LEN)
    assert parse_extensions(client_msg) == [(3, b"\x02\x06")]
    _sm, client_keys = client_hs.complete(reply, length=KEY_MATERIAL_LEN)
    assert client_keys == relay_keys and len(client_keys) == 160
    client, relay = ClientCrypto(), RelayCrypto(relay_keys)
    client.add_hop(client_keys)
    body = make_body(random.Random(2))
    cell, tag = client.originate(body, 0, cmd=CELL_RELAY)
    assert relay.decrypt_forward(cell, cmd=CELL_RELAY)[0]
    back, btag = relay.originate_backward(body, cmd=CELL_RELAY)
    assert client.decrypt_inbound(back, cmd=CELL_RELAY)[2] == btag


# --- API edges -------------------------------------------------------------------------------


def test_key_material_split_and_errors(backend: Backend) -> None:
    km = bytes(range(160))
    fwd, bwd = split_key_material(km)
    assert fwd == km[:80] and bwd == km[80:]
    with pytest.raises(LocalProtocolError):
        split_key_material(km[:-1])
    with pytest.raises(LocalProtocolError):
        ClientCrypto().add_hop(b"x" * 72)  # tor1-sized material
    with pytest.raises(LocalProtocolError):
        RelayCrypto(km + b"x")
    with pytest.raises(LocalProtocolError):
        cgo.CgoCrypt(km[:79], relay=True)


def test_client_api_errors(backend: Backend) -> None:
    client = ClientCrypto()
    with pytest.raises(LocalProtocolError):
        client.decrypt_inbound(bytes(RELAY_BODY_LEN), cmd=CELL_RELAY)
    client.add_hop(os.urandom(160))
    client.add_hop(os.urandom(160))
    assert client.n_hops == 2 and client.forward_tag(1) is None and client.backward_tag(0) is None
    with pytest.raises(LocalProtocolError):
        client.originate(bytes(RELAY_BODY_LEN), 2, cmd=CELL_RELAY)
    with pytest.raises(LocalProtocolError):
        client.originate(bytes(RELAY_BODY_LEN - 1), 0, cmd=CELL_RELAY)
    with pytest.raises(LocalProtocolError):
        client.originate(bytes(RELAY_BODY_LEN), 0, cmd=-1)
    with pytest.raises(ProtocolError):
        client.decrypt_inbound(bytes(RELAY_BODY_LEN + 1), cmd=CELL_RELAY)
    with pytest.raises(LocalProtocolError):
        client.truncate(3)
    client.truncate(1)
    assert client.n_hops == 1


def test_relay_api_errors_and_sides(backend: Backend) -> None:
    relay = RelayCrypto(os.urandom(160))
    assert relay.forward_tag is None and relay.backward_tag is None
    with pytest.raises(ProtocolError):
        relay.decrypt_forward(bytes(100), cmd=CELL_RELAY)
    with pytest.raises(ProtocolError):
        relay.encrypt_backward(bytes(510), cmd=CELL_RELAY)
    with pytest.raises(LocalProtocolError):
        relay.originate_backward(bytes(10), cmd=CELL_RELAY)
    c = cgo.CgoCrypt(os.urandom(DIR_KEY_LEN), relay=True)
    with pytest.raises(LocalProtocolError):
        c.client_forward(CELL_RELAY, bytes(RELAY_BODY_LEN))
    d = cgo.CgoCrypt(os.urandom(DIR_KEY_LEN), relay=False)
    with pytest.raises(LocalProtocolError):
        d.relay_backward(CELL_RELAY, bytes(RELAY_BODY_LEN))
    # memoryview / bytearray inputs are accepted; outputs are bytes
    out = relay.encrypt_backward(bytearray(RELAY_BODY_LEN), cmd=CELL_RELAY)
    assert type(out) is bytes
    assert type(relay.decrypt_forward(memoryview(bytes(RELAY_BODY_LEN)), cmd=CELL_RELAY)[1]) is bytes


# --- the native backend (onionp2p/proto/_cgo_native.c) ------------------------------------------


def test_the_native_backend_is_in_use_when_built() -> None:
    """A build with the extension runs it by default (under CI=true it must have been built)."""
    need_native()
    assert cgo.CGO_BACKEND.startswith("native (POLYVAL ")
    assert cgo.CgoCrypt is cgo.NativeCgoCrypt and cgo.UIV is cgo.NativeUIV
    hop = ClientCrypto()
    hop.add_hop(bytes(KEY_MATERIAL_LEN))
    assert type(hop._hops[0].fwd) is cgo.NativeCgoCrypt
    assert type(RelayCrypto(bytes(KEY_MATERIAL_LEN))._hop.bwd) is cgo.NativeCgoCrypt


def _native_module():
    need_native()
    return cgo._native


def _native_polyval_impls() -> list[str]:
    return ["portable", "clmul"]


@pytest.fixture(params=_native_polyval_impls())
def native_polyval(request: pytest.FixtureRequest):
    """Each POLYVAL implementation of the extension in turn (clmul only where the CPU has it)."""
    mod = _native_module()
    before = mod.polyval_impl()
    try:
        mod.use_polyval(request.param)
    except ValueError:
        if request.param == "clmul" and CI and os.uname().machine in ("x86_64", "i686"):
            raise
        pytest.skip(f"no {request.param} POLYVAL on this CPU")
    yield mod
    mod.use_polyval(before)


@pytest.mark.parametrize("key,data,expect", RFC8452_POLYVAL,
                         ids=[f"rfc8452-{i}" for i in range(len(RFC8452_POLYVAL))])
def test_native_polyval_rfc8452(native_polyval, key: str, data: str, expect: str) -> None:
    assert native_polyval.polyval(H(key), H(data)).hex() == expect


def test_native_polyval_matches_the_bitwise_reference(native_polyval) -> None:
    rng = random.Random(8452)
    for n in (0, 1, 15, 16, 17, 31, 32, 100, 493, 510, 512, 528):
        key, data = rng.randbytes(16), rng.randbytes(n)
        assert native_polyval.polyval(key, data) == ref_polyval(key, data), n
    # the extreme keys and blocks (every bit set: the longest carries of the reduction)
    ones = b"\xff" * 16
    assert native_polyval.polyval(ones, ones * 3) == ref_polyval(ones, ones * 3)


def test_native_cells_match_pure_over_a_long_transcript(native_polyval,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """300 random cells both ways through a client and three relays (every kind of operation,
    rekeys included) give identical bodies, tags, keys, N and T' with either backend, and
    with either native POLYVAL."""
    use_backend(monkeypatch, "native")
    native = _cgo_transcript(seed=4321, cells=300)
    use_backend(monkeypatch, "python")
    assert _cgo_transcript(seed=4321, cells=300) == native


def _pair(backend_name: str, km: bytes) -> tuple:
    classes = dict(zip(_CLASSES, BACKEND_CLASSES[backend_name]))
    return classes["CgoCrypt"](km, relay=False), classes["CgoCrypt"](km, relay=True)


_OPS = st.lists(st.tuples(st.sampled_from(["fwd_origin", "fwd_pass", "bwd_origin", "bwd_pass"]),
                          st.sampled_from([CELL_RELAY, CELL_RELAY_EARLY, 0, 255]),
                          st.binary(min_size=RELAY_BODY_LEN, max_size=RELAY_BODY_LEN),
                          st.sampled_from([bytes, bytearray, memoryview])),
                max_size=40)


def _run_ops(backend_name: str, km: bytes, tprime: bytes, ops: list) -> list:
    """One client/relay pair of one direction through ``ops``; everything observable.

    Passed-on cells go through both ends the way a circuit does (the client's forward layer
    then the relay's, the relay's backward layer then the client's), so the two stay in step
    and every originated cell is recognized, unless a passed-on cell happens to carry the nonce.
    """
    client, relay = _pair(backend_name, km)
    relay.tprime = client.tprime = tprime
    in_step = True
    out: list = []
    for kind, cmd, body, wrap in ops:
        body = wrap(body)
        if kind == "fwd_origin":  # the client originates, the relay recognizes
            cell, tag = client.client_originate(cmd, body)
            got, rtag = relay.relay_forward(cmd, wrap(cell))
            assert not in_step or (rtag == tag and got[16:] == bytes(body)[16:])
            out += [cell, tag, got, rtag]
        elif kind == "bwd_origin":  # the relay originates, the client recognizes
            cell, tag = relay.relay_originate(cmd, body)
            got, ctag = client.client_backward(cmd, wrap(cell))
            assert not in_step or (ctag == tag and got[16:] == bytes(body)[16:])
            out += [cell, tag, got, ctag]
        elif kind == "fwd_pass":  # a cell for a later hop
            cell = client.client_forward(cmd, body)
            got, rtag = relay.relay_forward(cmd, wrap(cell))
            in_step = in_step and rtag is None
            out += [cell, got, rtag]
        else:
            cell = relay.relay_backward(cmd, body)
            got, ctag = client.client_backward(cmd, wrap(cell))
            in_step = in_step and ctag is None
            out += [cell, got, ctag]
        out += [c.key + c.nonce + c.tprime for c in (client, relay)]
    return out


@settings(max_examples=60, deadline=None)
@given(km=st.binary(min_size=DIR_KEY_LEN, max_size=DIR_KEY_LEN),
       tprime=st.binary(min_size=TAG_LEN, max_size=TAG_LEN), ops=_OPS)
def test_native_and_pure_agree_on_random_operation_sequences(km: bytes, tprime: bytes, ops: list) -> None:
    """Random keys, T', commands and bodies (as bytes, bytearray or memoryview) in random
    sequences of originated (both ends rekey) and passed-on cells: byte-identical."""
    need_native()
    assert _run_ops("native", km, tprime, ops) == _run_ops("python", km, tprime, ops)


@settings(max_examples=40, deadline=None)
@given(key=st.binary(min_size=64, max_size=64), h=st.binary(min_size=16, max_size=16),
       cmd=st.integers(0, 255), body=st.binary(min_size=RELAY_BODY_LEN, max_size=RELAY_BODY_LEN),
       nonces=st.lists(st.binary(min_size=16, max_size=16), max_size=5))
def test_native_and_pure_uiv_agree(key: bytes, h: bytes, cmd: int, body: bytes, nonces: list) -> None:
    """The raw UIV+ layers (both directions, through rekeys), ET and the PRF on random inputs."""
    need_native()
    for encrypt in (True, False):
        n, p = cgo.NativeUIV(key, encrypt=encrypt), cgo.PureUIV(key, encrypt=encrypt)
        run = "encrypt" if encrypt else "decrypt"
        for nonce in [*nonces, None]:
            assert getattr(n, run)(h, cmd, body) == getattr(p, run)(h, cmd, body)
            if nonce is not None:
                assert n.update(nonce) == p.update(nonce) and n.key == p.key
        et_n, et_p = cgo.NativeET(key[:32], encrypt=encrypt), cgo.PureET(key[:32], encrypt=encrypt)
        block, x_r = body[:16], body[16:]
        assert getattr(et_n, run)(h, cmd, x_r, block) == getattr(et_p, run)(h, cmd, x_r, block)
    prf_n, prf_p = cgo.NativePRF(key[32:]), cgo.PurePRF(key[32:])
    assert prf_n.xor_t0(h, body[:MSG_LEN]) == prf_p.xor_t0(h, body[:MSG_LEN])
    assert prf_n.stream_t1(h, 528) == prf_p.stream_t1(h, 528)


def test_native_argument_errors() -> None:
    """The C methods refuse wrong sizes and commands themselves (the unchecked forms too)."""
    mod = _native_module()
    c = mod.Crypt(bytes(DIR_KEY_LEN), relay=True)
    with pytest.raises(ValueError, match="509"):
        c.relay_forward(CELL_RELAY, bytes(508))
    with pytest.raises(ValueError, match="0..255"):
        c.relay_backward(256, bytes(RELAY_BODY_LEN))
    with pytest.raises(ValueError, match="other side"):
        c.client_forward(CELL_RELAY, bytes(RELAY_BODY_LEN))
    with pytest.raises(ValueError, match="80"):
        mod.Crypt(bytes(79), relay=True)
    with pytest.raises(TypeError):
        mod.Crypt(bytes(DIR_KEY_LEN))  # relay= is required
    with pytest.raises(ValueError):
        c.nonce = bytes(15)
    with pytest.raises(LocalProtocolError):  # the checked wrappers keep the module's error types
        cgo.NativeCgoCrypt(bytes(DIR_KEY_LEN), relay=True).relay_forward(CELL_RELAY, bytes(10))


def _mixed_inbound(batched: bool, kms: list, runs: list) -> list:
    """A client's MixedClientCrypto over CGO hops ``kms`` taking ``runs`` of backward cells
    (``[(hop, body, tamper)]`` each) from the relays: the results, any mismatch and its
    partial results, and every hop's state after each run. ``batched`` False forces the
    per-layer path (one C call per layer) instead of one call per run."""
    client = MixedClientCrypto()
    for km in kms:
        client.add_hop(km, "cgo")
    assert (client._native_bwd is not None) == NATIVE
    if not batched:
        client._native_bwd = None
    relays = [cgo.RelayCrypto(km) for km in kms]
    out: list = []
    for run in runs:
        cells = []
        for hop, body, tamper in run:
            cell, _tag = relays[hop].originate_backward(body, cmd=CELL_RELAY)
            for k in range(hop - 1, -1, -1):
                cell = relays[k].encrypt_backward(cell, cmd=CELL_RELAY)
            if tamper is not None:
                cell = cell[:tamper] + bytes([cell[tamper] ^ 1]) + cell[tamper + 1:]
            cells.append(memoryview(bytearray(cell)))
        try:
            out.append(("ok", client.decrypt_inbound_many(cells)))
        except DigestMismatch as exc:
            out.append(("mismatch", exc.partial))
            break  # (the circuit would be closed)
        out.append([(h.bwd.key, h.bwd.nonce, h.bwd.tprime) for h in client._hops])
    return out


# runs of (hop, body, tamper): a tampered byte (tag, header or payload) in about one cell of ten
_RUNS = st.lists(st.lists(st.tuples(st.integers(0, 3), st.binary(min_size=RELAY_BODY_LEN, max_size=RELAY_BODY_LEN),
                                    st.sampled_from([None] * 9 + [0, 15, 16, 200, RELAY_BODY_LEN - 1])),
                          min_size=1, max_size=6), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(n_hops=st.integers(1, 4), seed=st.binary(min_size=8, max_size=8), runs=_RUNS)
def test_one_c_call_per_run_peels_as_the_layers_one_by_one_do(n_hops: int, seed: bytes, runs: list) -> None:
    """The client's inbound runs of cells in one C call (all hops CGO in C) give the same
    hop, body and tag per cell, the same hop states, and on a tampered cell the same
    mismatch after the same cells, as one call per layer."""
    need_native()
    kms = [hashlib.shake_128(seed + bytes([k])).digest(160) for k in range(n_hops)]
    runs = [[(hop % n_hops, body, tamper) for hop, body, tamper in run] for run in runs]
    assert _mixed_inbound(True, kms, runs) == _mixed_inbound(False, kms, runs)


# what a v1 message may be: DATA (for streams 0..2, lengths around the 488-byte limit) or
# something else, a known command or not
_V1_DATA_MAX = RELAY_BODY_LEN - V1_DATA_OFFSET
_MESSAGES = st.tuples(st.integers(0, 3), st.sampled_from([int(RelayCommand.DATA)] * 4 + [3, 5, 12, 200]),
                      st.sampled_from([0, 1, 1, 1, 2]),
                      st.sampled_from([0, 1, 100, _V1_DATA_MAX, _V1_DATA_MAX + 1, 0xFFFF]),
                      st.sampled_from([None] * 60 + ["early", 0, 16, 300]))


def _v1_body(cmd: int, sid: int, length: int, fill: bytes) -> bytes:
    body = bytes(V1_TAG_LEN) + struct.pack(">BHH", cmd, length, sid) + fill
    return body[:RELAY_BODY_LEN]


def _runs_reference(client: MixedClientCrypto, cells: list) -> tuple[list, int, bool]:
    """What client_backward_runs must give, from the per-layer path and relaycell's parser:
    one ("data", hop, sid, data, tag) or ("cell", hop, body, tag) per cell."""
    out = []
    for i, cell in enumerate(cells):
        if cell[4] != CELL_RELAY:
            return out, i, False
        try:
            hop, body, tag = client.decrypt_inbound(cell[5:])
        except DigestMismatch:
            return out, i + 1, True
        try:
            cmd, sid, off, length = parse_v1_header(body)
        except ProtocolError:
            cmd = None
        if cmd == RelayCommand.DATA and sid:
            assert off == V1_DATA_OFFSET
            out.append(("data", hop, sid, bytes(body[off:off + length]), tag))
        else:
            out.append(("cell", hop, bytes(body), tag))
    return out, len(cells), False


@settings(max_examples=80, deadline=None)
@given(n_hops=st.integers(1, 4), seed=st.binary(min_size=8, max_size=8),
       messages=st.lists(_MESSAGES, min_size=1, max_size=40))
@example(n_hops=2, seed=bytes(8), messages=[(1, 2, 1, 100, None), (1, 2, 1, 488, None), (1, 2, 2, 0, None),
                                             (0, 2, 2, 7, None), (1, 2, 2, 489, None), (1, 2, 2, 1, None)])
def test_c_runs_gather_data_messages_as_relaycell_parses_them(n_hops: int, seed: bytes, messages: list) -> None:
    """``_cgo_native.client_backward_runs`` (the client's inbound path when every hop is
    CGO in C) peels each cell as the layers one by one do, and puts in a run of DATA
    exactly the cells that relaycell.parse_v1_header reads as DATA for a stream, with
    their data, tags and lengths; a run is one hop and one stream, and runs are as long as
    they can be; it stops before a RELAY_EARLY cell and after a cell that no hop
    recognizes, leaving the hops' states as the reference leaves them."""
    need_native()
    kms = [hashlib.shake_128(seed + bytes([k])).digest(160) for k in range(n_hops)]
    clients = []
    for _ in range(2):
        c = MixedClientCrypto()
        for km in kms:
            c.add_hop(km, "cgo")
        clients.append(c)
    fast, ref = clients
    assert fast.decrypt_runs is not None
    ref._native_bwd = None
    relays = [cgo.RelayCrypto(km) for km in kms]
    rng = random.Random(seed)
    cells = []
    for hop, cmd, sid, length, tamper in messages:
        hop %= n_hops
        body = _v1_body(cmd, sid, length, rng.randbytes(RELAY_BODY_LEN))
        if tamper == "early":  # never decrypted: any bytes
            cells.append(b"\0\0\0\7" + bytes([CELL_RELAY_EARLY]) + body)
            continue
        cell, _tag = relays[hop].originate_backward(body, cmd=CELL_RELAY)
        for k in range(hop - 1, -1, -1):
            cell = relays[k].encrypt_backward(cell, cmd=CELL_RELAY)
        if tamper is not None:
            cell = cell[:tamper] + bytes([cell[tamper] ^ 1]) + cell[tamper + 1:]
        cells.append(b"\0\0\0\7" + bytes([CELL_RELAY]) + cell)
    want, want_taken, want_bad = _runs_reference(ref, cells)
    buf = b"junk" + b"".join(cells) + b"more"
    items, taken, bad = fast.decrypt_runs(buf, 4, len(cells))
    assert (taken, bool(bad)) == (want_taken, want_bad)
    got = []
    for k, item in enumerate(items):
        if len(item) == 3:
            got.append(("cell", *item))
            continue
        hop, sid, data, tags, lengths = item
        lengths = memoryview(lengths).cast("H").tolist()
        assert lengths and len(tags) == TAG_LEN * len(lengths) and len(data) == sum(lengths)
        if k:  # as long as it can be: the item before it is not a run of the same hop and stream
            assert items[k - 1][:2] != (hop, sid) or len(items[k - 1]) == 3
        pos = 0
        for i, n in enumerate(lengths):
            got.append(("data", hop, sid, data[pos:pos + n], tags[TAG_LEN * i:TAG_LEN * (i + 1)]))
            pos += n
    assert got == want
    assert [(h.bwd.key, h.bwd.nonce, h.bwd.tprime) for h in fast._hops] == \
        [(h.bwd.key, h.bwd.nonce, h.bwd.tprime) for h in ref._hops]


def test_c_runs_hold_no_reference_to_the_crypto_object() -> None:
    """decrypt_runs holds the hops, not the MixedClientCrypto: a closed circuit's crypto
    (and its keys) goes when its last reference does, without waiting for the collector."""
    need_native()
    crypto = MixedClientCrypto()
    for _ in range(3):
        crypto.add_hop(os.urandom(160), "cgo")
    assert crypto.decrypt_runs is not None
    probe = crypto._hops[0]
    gc.disable()
    try:
        held = sys.getrefcount(probe)
        del crypto
        assert sys.getrefcount(probe) == held - 1
    finally:
        gc.enable()


def test_c_runs_argument_errors() -> None:
    mod = _native_module()
    client = mod.Crypt(bytes(DIR_KEY_LEN), relay=False)
    layout = (V1_TAG_LEN, V1_DATA_OFFSET, int(RelayCommand.DATA))
    cell = bytes(5 + RELAY_BODY_LEN)
    with pytest.raises(ValueError, match="out of the buffer"):
        mod.client_backward_runs((client,), CELL_RELAY, layout, cell, 1, 1)
    with pytest.raises(ValueError, match="out of the buffer"):
        mod.client_backward_runs((client,), CELL_RELAY, layout, cell, 0, 2)
    with pytest.raises(ValueError, match="out of the buffer"):
        mod.client_backward_runs((client,), CELL_RELAY, layout, cell, -1, 1)
    with pytest.raises(ValueError, match="bad layout"):
        mod.client_backward_runs((client,), CELL_RELAY, (V1_TAG_LEN, RELAY_BODY_LEN + 1, 2), cell, 0, 1)
    with pytest.raises(TypeError, match="client-side"):
        mod.client_backward_runs((mod.Crypt(bytes(DIR_KEY_LEN), relay=True),), CELL_RELAY, layout, cell, 0, 1)
    assert mod.client_backward_runs((client,), CELL_RELAY, layout, cell, 0, 0) == ([], 0, 0)


def test_one_c_call_per_run_only_when_every_hop_is_cgo_in_c() -> None:
    """A tor1 hop (or the onion-service end-to-end layer) keeps the per-layer path."""
    need_native()
    mixed = MixedClientCrypto()
    mixed.add_hop(os.urandom(160), "cgo")
    assert mixed._native_bwd is not None
    mixed.add_hop(os.urandom(72), "tor1")
    assert mixed._native_bwd is None
    e2e = MixedClientCrypto()
    for _ in range(3):
        e2e.add_hop(os.urandom(160), "cgo")
    e2e.add_hop(os.urandom(128), "hs")
    assert e2e._native_bwd is None


def test_native_client_backward_many_argument_errors() -> None:
    mod = _native_module()
    client = mod.Crypt(bytes(DIR_KEY_LEN), relay=False)
    relay = mod.Crypt(bytes(DIR_KEY_LEN), relay=True)
    body = bytes(RELAY_BODY_LEN)
    with pytest.raises(TypeError, match="client-side"):
        mod.client_backward_many((client, relay), [body], CELL_RELAY)
    with pytest.raises(TypeError, match="client-side"):
        mod.client_backward_many((client, b"not a hop"), [body], CELL_RELAY)
    with pytest.raises(ValueError, match="no hops"):
        mod.client_backward_many((), [body], CELL_RELAY)
    with pytest.raises(ValueError, match="509"):
        mod.client_backward_many((client,), [bytes(508), body], CELL_RELAY)
    with pytest.raises(ValueError, match="0..255"):
        mod.client_backward_many((client,), [body], 256)
    with pytest.raises(TypeError):
        mod.client_backward_many([client], [body], CELL_RELAY)
    assert mod.client_backward_many((client,), [], CELL_RELAY) == []


NATIVE_INTERPRETER = """
import json, os, sys, types, warnings
{preamble}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        from onionp2p.proto import cgo
    except ImportError as exc:
        print(json.dumps({{"import_error": str(exc)}}))
        raise SystemExit(0)
v = json.loads(open({vectors!r}).read())["uiv_testvecs"][0]
uiv = cgo.UIV(bytes.fromhex(v["keys_J_S"]), encrypt=v["encrypt"])
tweak = bytes.fromhex(v["tweak_H"])
run = uiv.encrypt if v["encrypt"] else uiv.decrypt
out = run(tweak[:16], tweak[16], bytes.fromhex(v["x_l"]) + bytes.fromhex(v["x_r"]))
print(json.dumps({{"backend": cgo.CGO_BACKEND, "crypt": cgo.CgoCrypt.__name__,
                  "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                  "vector": out.hex() == v["y"]["y_l"] + v["y"]["y_r"]}}))
"""


def _native_interpreter(preamble: str, env: dict[str, str] | None = None) -> dict:
    code = NATIVE_INTERPRETER.format(preamble=preamble, vectors=str(VECTOR_FILE))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False, env={**{k: v for k, v in os.environ.items() if k != cgo.CGO_BACKEND_ENV},
                                            **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_backend_env_var_selects_the_pure_path_without_a_warning() -> None:
    result = _native_interpreter("", {cgo.CGO_BACKEND_ENV: "python"})
    assert result == {"backend": f"python ({cgo.CGO_BACKEND_ENV}=python)", "crypt": "PureCgoCrypt",
                      "warnings": [], "vector": True}
    bad = _native_interpreter("", {cgo.CGO_BACKEND_ENV: "fast"})
    assert "must be auto, native or python" in bad["import_error"]


def test_the_native_backend_is_the_default_and_can_be_required() -> None:
    need_native()
    for env in ({}, {cgo.CGO_BACKEND_ENV: "native"}, {cgo.CGO_BACKEND_ENV: " Auto "}):
        result = _native_interpreter("", env)
        assert result["crypt"] == "NativeCgoCrypt" and result["warnings"] == [] and result["vector"], env


def test_a_missing_extension_falls_back_with_one_warning() -> None:
    """As on a machine where the C build was skipped: pure path, one RuntimeWarning, right answers;
    with ONIONP2P_CGO_BACKEND=native the import fails instead."""
    hide = "sys.modules['onionp2p.proto._cgo_native'] = None  # as if never built"
    result = _native_interpreter(hide)
    assert result["crypt"] == "PureCgoCrypt" and result["vector"]
    assert result["backend"].startswith("python (extension not importable")
    assert len(result["warnings"]) == 1 and "native backend unavailable" in result["warnings"][0]
    forced = _native_interpreter(hide, {cgo.CGO_BACKEND_ENV: "native"})
    assert "native CGO backend is unusable" in forced["import_error"]


def test_a_wrong_native_build_is_refused_by_the_self_test() -> None:
    """An extension whose cells differ from the reference (here: one flipped output bit after a
    rekey) is not used: the import self-test catches it and the pure path runs."""
    need_native()
    result = _native_interpreter(
        "import onionp2p.proto._cgo_native as real\n"
        "class Crypt(real.Crypt):\n"
        "    def client_backward(self, cmd, body):\n"
        "        out, tag = super().client_backward(cmd, body)\n"
        "        return bytes([out[0] ^ 1]) + out[1:], tag\n"
        "fake = types.ModuleType(real.__name__)\n"
        "fake.Crypt, fake.polyval, fake.polyval_impl = Crypt, real.polyval, real.polyval_impl\n"
        "fake.OPENSSL_VERSION = real.OPENSSL_VERSION\n"
        "sys.modules[real.__name__] = fake\n"
        "import onionp2p.proto as pkg\n"
        "pkg._cgo_native = fake\n")
    assert result["crypt"] == "PureCgoCrypt" and result["vector"]
    assert "client_backward differs from the reference" in result["backend"]
    assert len(result["warnings"]) == 1
