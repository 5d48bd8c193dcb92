"""Tests for onionp2p.proto.cgo: Counter Galois Onion relay crypto (proposal 359).

* every vector of tor's ``src/test/cgo_vectors.inc`` (``tests/data/cgo.json``), byte for byte, layer by layer;
* RFC 8452 POLYVAL vectors, through each pure-Python POLYVAL code path and each native
  (pycryptodome GHASH) backend, and a bit-by-bit reference of RFC 8452 §3 written here for
  random cross-checks; the native adapter's import self-test refuses broken bindings;
* the native and the pure-Python POLYVAL give the same cells, tags and key states over
  hundreds of random cells with key updates;
* a client and three relays wired together: originate/recognize both ways, SENDME
  tags, tampering, and keys from a real ntor v3 handshake.
"""

from __future__ import annotations

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
from onionp2p.proto.cgo import (
    CELL_RELAY,
    CELL_RELAY_EARLY,
    DIR_KEY_LEN,
    ET,
    KEY_MATERIAL_LEN,
    MSG_LEN,
    PRF,
    RELAY_BODY_LEN,
    TAG_LEN,
    UIV,
    CgoCrypt,
    ClientCrypto,
    PolyvalKey,
    RelayCrypto,
    polyval,
    split_key_material,
)
from onionp2p.proto.handshake import NtorV3Client, encode_extensions, ntor_v3_server, parse_extensions

H = bytes.fromhex

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
    for name, count in EXPECTED_COUNTS.items():
        assert len(VECTORS[name]) == count, name


@pytest.mark.parametrize("v", vectors("et_testvecs"))
def test_et_vector(v: dict) -> None:
    tweak = H(v["tweak_T"])
    assert len(tweak) == 16 + 1 + MSG_LEN
    et = ET(H(v["keys_KB_KU"]), encrypt=v["encrypt"])
    run = et.encrypt if v["encrypt"] else et.decrypt
    assert run(tweak[:16], tweak[16], tweak[17:], H(v["block_M"])).hex() == v["expect"]


@pytest.mark.parametrize("v", vectors("prf_testvecs"))
def test_prf_vector(v: dict) -> None:
    prf = PRF(H(v["keys_K_B"]))
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
def test_uiv_vector(v: dict) -> None:
    tweak = H(v["tweak_H"])
    body = H(v["x_l"]) + H(v["x_r"])
    expect = H(v["y"]["y_l"]) + H(v["y"]["y_r"])
    uiv = UIV(H(v["keys_J_S"]), encrypt=v["encrypt"])
    run = uiv.encrypt if v["encrypt"] else uiv.decrypt
    assert run(tweak[:16], tweak[16], body) == expect
    # the opposite direction undoes it
    back = UIV(H(v["keys_J_S"]), encrypt=not v["encrypt"])
    undo = back.encrypt if not v["encrypt"] else back.decrypt
    assert undo(tweak[:16], tweak[16], expect) == body


@pytest.mark.parametrize("v", vectors("uiv_update_testvecs"))
def test_uiv_update_vector(v: dict) -> None:
    uiv = UIV(H(v["keys_J_S"]), encrypt=True)
    assert uiv.update(H(v["nonce_N"])).hex() == v["output"]["new_nonce_N"]
    assert uiv.key.hex() == v["output"]["new_keys_J_S"]
    # the rekeyed cipher behaves like one made from the new keys
    fresh = UIV(H(v["output"]["new_keys_J_S"]), encrypt=True)
    body = os.urandom(RELAY_BODY_LEN)
    assert uiv.encrypt(b"\x2a" * 16, 42, body) == fresh.encrypt(b"\x2a" * 16, 42, body)


def _state(s: dict, relay: bool) -> CgoCrypt:
    return CgoCrypt(H(s["keys"]) + H(s["nonce"]), relay=relay, tprime=H(s["tprime"]))


def _assert_state(c: CgoCrypt, s: dict) -> None:
    assert c.key.hex() == s["keys"]
    assert c.nonce.hex() == s["nonce"]
    assert c.tprime.hex() == s["tprime"]


def _result(v: dict) -> bytes:
    return H(v["output"]["result"]["t_out"]) + H(v["output"]["result"]["msg_out"])


@pytest.mark.parametrize("v", vectors("cgo_relay_testvecs"))
def test_cgo_relay_vector(v: dict) -> None:
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
def test_cgo_relay_originate_vector(v: dict) -> None:
    c = _state(v["state_in"], relay=True)
    out, tag = c.relay_originate(H(v["cmd_AD"])[0], bytes(16) + H(v["msg"]))
    assert out == _result(v)
    assert tag == out[:TAG_LEN]
    _assert_state(c, v["output"]["state"])


@pytest.mark.parametrize("v", vectors("cgo_client_originate_testvecs"))
def test_cgo_client_originate_vector(v: dict) -> None:
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
def test_cgo_client_originate_vector_through_client_crypto(v: dict) -> None:
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
    assert len(result["warnings"]) == 1 and "native POLYVAL unavailable" in result["warnings"][0]
    assert "RFC 8452 vector" in result["warnings"][0]
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
    passer = CgoCrypt(rng.randbytes(DIR_KEY_LEN), relay=True)
    peeler = CgoCrypt(rng.randbytes(DIR_KEY_LEN), relay=False)
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


def test_native_and_pure_polyval_give_the_same_cells(monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_et_round_trip_and_tweak_dependence() -> None:
    rng = random.Random(1)
    key = rng.randbytes(32)
    h, x_r, block = rng.randbytes(16), rng.randbytes(MSG_LEN), rng.randbytes(16)
    enc, dec = ET(key, encrypt=True), ET(key, encrypt=False)
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
        ET(key[:31], encrypt=True)


def test_prf_is_aes_ctr_from_the_polyval_iv() -> None:
    """t=0 and t=1 are two windows of one AES-CTR stream (checked with a plain CTR)."""
    rng = random.Random(2)
    for _ in range(8):
        k, b, tweak = rng.randbytes(16), rng.randbytes(16), rng.randbytes(16)
        iv = bytearray(ref_polyval(b, tweak))
        iv[15] &= 0xC0
        stream = Cipher(algorithms.AES(k), modes.CTR(bytes(iv))).encryptor().update(bytes(64 * 16))
        prf = PRF(k + b)
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
    prf, data = PRF(k + b), os.urandom(n0)
    assert prf.xor_t0(tweak, data) == bytes(x ^ y for x, y in zip(data, stream))
    assert prf.stream_t1(tweak, n1) == stream[31 * 16:31 * 16 + n1]
    uiv = UIV(bytes(32) + k + b, encrypt=True)  # UIV+ update: 80 bytes of t=1 from UIV's own PRF fields
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


def test_the_xor_fast_path_is_in_use() -> None:
    """pycryptodome (with cffi, as installed) gives the C XOR; CGO must not quietly run the int one."""
    assert cgo._native_xor is not None, cgo.XOR_BACKEND
    assert cgo.XOR_BACKEND == "pycryptodome_strxor"
    assert UIV(bytes(64), encrypt=True)._xor.__qualname__.startswith("_native_xor_factory")


def test_a_rekey_keeps_the_buffers_and_replaces_only_the_keys() -> None:
    """UIV+ update makes two AES contexts and two POLYVAL keys, and reuses its buffers (the
    per-cell budget of an end that rekeys); the POLYVAL keys write into the UIV's buffer."""
    uiv = UIV(bytes(64), encrypt=True)
    out, xor, ku, b, aes = uiv._out, uiv._xor, uiv._ku, uiv._b, uiv._et_aes
    uiv.update(bytes(16))
    assert uiv._out is out and uiv._xor is xor
    assert uiv._ku is not ku and uiv._b is not b and uiv._et_aes is not aes
    assert uiv._ku.__closure__ is not None and any(c.cell_contents is out for c in uiv._ku.__closure__)


def test_uiv_round_trip_both_ways() -> None:
    rng = random.Random(3)
    key = rng.randbytes(64)
    enc, dec = UIV(key, encrypt=True), UIV(key, encrypt=False)
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


def test_uiv_update_is_deterministic_and_one_way() -> None:
    key, nonce = os.urandom(64), os.urandom(16)
    a, b = UIV(key, encrypt=True), UIV(key, encrypt=False)
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


def test_forward_round_trip_to_every_hop() -> None:
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


def test_backward_round_trip_from_every_hop() -> None:
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


def test_interleaved_traffic_and_batches() -> None:
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


def test_relay_batch_methods() -> None:
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


def test_originate_ignores_the_tag_area() -> None:
    keys = os.urandom(KEY_MATERIAL_LEN)
    a, b = ClientCrypto(), ClientCrypto()
    a.add_hop(keys)
    b.add_hop(keys)
    msg = os.urandom(MSG_LEN)
    assert a.originate(bytes(16) + msg, 0, cmd=CELL_RELAY) == b.originate(b"\xff" * 16 + msg, 0, cmd=CELL_RELAY)
    r1, r2 = RelayCrypto(keys), RelayCrypto(keys)
    assert r1.originate_backward(bytes(16) + msg, cmd=CELL_RELAY) == r2.originate_backward(
        os.urandom(16) + msg, cmd=CELL_RELAY)


def test_every_cell_rekeys_the_endpoints() -> None:
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
def test_a_tampered_forward_cell_is_not_recognized(pos: int) -> None:
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


def test_a_tampered_cell_in_the_middle_is_not_recognized() -> None:
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


def test_a_changed_command_is_not_recognized() -> None:
    circ = Circuit(31)
    cell, _ = circ.client.originate(make_body(random.Random(1)), 1, cmd=CELL_RELAY_EARLY)
    assert circ.forward(cell, CELL_RELAY) is None


def test_a_tampered_backward_cell_is_not_recognized() -> None:
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


def test_keys_from_an_ntor_v3_handshake() -> None:
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


def test_key_material_split_and_errors() -> None:
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
        CgoCrypt(km[:79], relay=True)


def test_client_api_errors() -> None:
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


def test_relay_api_errors_and_sides() -> None:
    relay = RelayCrypto(os.urandom(160))
    assert relay.forward_tag is None and relay.backward_tag is None
    with pytest.raises(ProtocolError):
        relay.decrypt_forward(bytes(100), cmd=CELL_RELAY)
    with pytest.raises(ProtocolError):
        relay.encrypt_backward(bytes(510), cmd=CELL_RELAY)
    with pytest.raises(LocalProtocolError):
        relay.originate_backward(bytes(10), cmd=CELL_RELAY)
    c = CgoCrypt(os.urandom(DIR_KEY_LEN), relay=True)
    with pytest.raises(LocalProtocolError):
        c.client_forward(CELL_RELAY, bytes(RELAY_BODY_LEN))
    d = CgoCrypt(os.urandom(DIR_KEY_LEN), relay=False)
    with pytest.raises(LocalProtocolError):
        d.relay_backward(CELL_RELAY, bytes(RELAY_BODY_LEN))
    # memoryview / bytearray inputs are accepted; outputs are bytes
    out = relay.encrypt_backward(bytearray(RELAY_BODY_LEN), cmd=CELL_RELAY)
    assert type(out) is bytes
    assert type(relay.decrypt_forward(memoryview(bytes(RELAY_BODY_LEN)), cmd=CELL_RELAY)[1]) is bytes
