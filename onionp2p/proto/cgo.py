"""Counter Galois Onion (CGO) relay cell crypto, proposal 359 ("Relay=6"), sans-IO.

Theory of operation
-------------------
(Proposal 359; C tor ``src/core/crypto/relay_crypto_cgo.c``; ``specs/cgo.md``.)

CGO replaces tor1's AES-CTR layers and running SHA-1 digests with a wide-block
cipher over the whole 509-byte relay cell body, so that flipping a bit anywhere in
a cell scrambles it all (no tagging attacks), and with per-cell rekeying (forward
secrecy for every cell that a hop originates or recognizes). It is built in four
layers, each one a class here:

* **POLYVAL** (RFC 8452 §3), a GHASH-like universal hash over GF(2^128).
  :class:`PolyvalKey`; :func:`polyval` for one-off use.
* **ET**, a tweakable block cipher on one 16-byte block (LRW2 style): with the
  keys ``KB`` (AES-128) and ``KU`` (POLYVAL) and a tweak
  ``H[16] | cmd u8 | X_R[493]``, ``mask = POLYVAL(KU, tweak)`` and
  ``ET(X) = AES_KB(X ^ mask) ^ mask``. :class:`ET`.
* **PRF**, a tweakable keystream: with the keys ``K`` (AES-128) and ``B``
  (POLYVAL) and a 16-byte input ``T``, ``IV = POLYVAL(B, T)`` with the low six bits
  of its last byte cleared, and the output is AES-128-CTR (128-bit big-endian
  counter) from ``IV`` (position ``t = 0``) or from ``IV + 31`` blocks (``t = 1``).
  :class:`PRF`.
* **UIV+**, the wide-block cipher over ``X = X_L[16] | X_R[493]`` with keys
  ``J`` (ET keys) and ``S`` (PRF keys) and a tweak ``H | cmd``:
  encryption is ``Y_L = ET_J(H | cmd | X_R, X_L)`` then ``Y_R = X_R ^ PRF_S(Y_L, t=0)``;
  decryption runs it backwards. ``update(N)`` replaces ``J``, ``S`` and ``N`` by the
  80 bytes ``PRF_S(N, t=1)``. :class:`UIV`.

UIV+ resists tampering only in its *encryption* direction, so relays always
encrypt (forward and backward alike) and clients always decrypt.

**Keys.** Every hop shares 160 bytes of handshake output (ntor v3) with the client:
80 bytes for the forward direction, then 80 for the backward one, each laid out as
``KB[16] | KU[16] | K[16] | B[16] | N[16]`` (``J = KB|KU``, ``S = K|B``, nonce
``N``). Each direction also keeps ``T'``, the tag of the last cell it handled,
which starts at 16 zero bytes and is the ``H`` part of the next cell's tweak.
:class:`CgoCrypt` is one direction of one hop.

**Cell body.** The 509-byte body of a RELAY / RELAY_EARLY cell is, on every link,
``T[16] | C[493]``, and the tweak includes the cell command byte (3 or 9), so a
RELAY cell cannot be turned into a RELAY_EARLY one. After the last layer is
removed the body reads (relay message format v1)::

    offset  size  field
         0    16  tag: the hop's nonce N (this is what "recognized" means)
        16     1  relay command
        17     2  Len (big-endian)
        19     2  StreamID, only for BEGIN, BEGIN_DIR, CONNECTED, DATA, END,
                  RESOLVE, RESOLVED, XOFF, XON
     19/21   Len  Data (at most 490 bytes without a StreamID, 488 with one)
                  then 4 zero bytes and random padding

tor1's ``Recognized`` and ``Digest`` fields do not exist in this format. Encoding
the message is the caller's business; this module only reads and writes the first
16 bytes.

**Cells.** To *originate*, a sender writes its nonce ``N`` into the tag field and
processes the cell with its layer (the client then adds the layers of the earlier
hops). A receiver processes the cell with its layer and compares the resulting tag
field with its own ``N``; equal means the cell is for it. After every cell it
originates or recognizes, a direction rekeys with ``update``: forward at both ends
from ``N``; backward from the tag the originating relay put on the wire (which
becomes the new input nonce). Unrecognized cells only move ``T'``.

**SENDME tag.** Each originated or recognized cell yields a 16-byte tag that an
authenticated SENDME (v1) echoes instead of tor1's 20-byte digest: the tag field
of the cell *as it travels on the link between the target hop and the hop before
it*, i.e. the value the target relay receives (forward) or sends (backward). C tor
uses this choice since April 2025 (torspec#328). Every call that recognizes or
originates a cell returns it, and ``forward_tag`` / ``backward_tag`` give the last
one per direction, the way ``relaycrypto`` exposes its running digests.

A relay does not recognize a cell that was tampered with anywhere, and the
tampering also corrupts the next cells, because ``T'`` chains cells together. As with
tor1, an unrecognized cell at the client or at the last hop means the circuit
must be closed.

**Native backend.** When the optional C extension ``onionp2p/proto/_cgo_native.c`` is
built (``pip install`` builds it where a C compiler, Python's headers and OpenSSL's
headers exist), :data:`CgoCrypt`, :data:`UIV`, :data:`ET` and :data:`PRF` are its classes:
one C call per cell per layer, AES-128 through OpenSSL's EVP (contexts re-keyed in place),
POLYVAL with PCLMULQDQ or a portable constant-time multiply, and the keys, ``N`` and ``T'``
in a C object, so a rekey never leaves C. It must pass an import self-test against the
pure classes (``Pure*``, the reference), else the pure path runs with one RuntimeWarning;
``ONIONP2P_CGO_BACKEND=python`` asks for the pure path (``native`` requires the C one).
:data:`CGO_BACKEND` says which runs. specs/cgo.md §8a.

**Performance of the pure path.** POLYVAL runs in C: pycryptodome's GHASH (carry-less multiply
instructions where the CPU has them, else its portable C code), through a small adapter
(:class:`NativePolyvalKey`) that checks itself at import against RFC 8452 and the
pure-Python reference (:class:`PurePolyvalKey`), and falls back to the latter with a
warning if the binding misbehaves (:data:`POLYVAL_BACKEND` says which one runs). AES
runs in ``cryptography`` through ECB contexts that are made once per key: one block for
ET, and the CTR keystream of the PRF is the ECB encryption of counter blocks (the IV
changes every cell, and a new CTR context costs more than that). The keystream XOR runs
in pycryptodome's C ``strxor`` (:data:`XOR_BACKEND`). A pass-through layer is thus two
POLYVAL calls, two AES calls and one XOR; a hop that originates or recognizes a cell
also sets up two AES keys and two POLYVAL keys for the next one, which :class:`UIV`
holds itself (no per-rekey objects or buffers). The cell methods check their arguments
once and call unchecked internals (``CgoCrypt._relay_forward``, ``UIV._enc`` and the like).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import partial
from hashlib import shake_128
from hmac import compare_digest as bytes_eq  # constant time
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from onionp2p.errors import DigestMismatch, LocalProtocolError, ProtocolError

__all__ = [
    "RELAY_BODY_LEN",
    "TAG_LEN",
    "MSG_LEN",
    "ET_KEY_LEN",
    "PRF_KEY_LEN",
    "UIV_KEY_LEN",
    "DIR_KEY_LEN",
    "KEY_MATERIAL_LEN",
    "CELL_RELAY",
    "CELL_RELAY_EARLY",
    "POLYVAL_BACKEND",
    "XOR_BACKEND",
    "CGO_BACKEND",
    "CGO_BACKEND_ENV",
    "PolyvalKey",
    "PurePolyvalKey",
    "NativePolyvalKey",
    "polyval",
    "ET",
    "PRF",
    "UIV",
    "CgoCrypt",
    "PureET",
    "PurePRF",
    "PureUIV",
    "PureCgoCrypt",
    "ClientCrypto",
    "RelayCrypto",
    "split_key_material",
]

RELAY_BODY_LEN = 509
TAG_LEN = 16  # the T field, the nonce, the SENDME tag
MSG_LEN = RELAY_BODY_LEN - TAG_LEN  # 493: X_R
BLOCK_LEN = 16
AES_KEY_LEN = 16  # CGO with AES-128, as C tor negotiates it
ET_KEY_LEN = AES_KEY_LEN + 16  # KB | KU
PRF_KEY_LEN = AES_KEY_LEN + 16  # K | B
UIV_KEY_LEN = ET_KEY_LEN + PRF_KEY_LEN  # J | S = 64
DIR_KEY_LEN = UIV_KEY_LEN + TAG_LEN  # J | S | N = 80
KEY_MATERIAL_LEN = 2 * DIR_KEY_LEN  # forward 80 | backward 80 = 160
CELL_RELAY = 3
CELL_RELAY_EARLY = 9
PRF_T1_OFFSET = 31  # blocks: where the t=1 keystream starts
_PRF_T0_MAX = PRF_T1_OFFSET * BLOCK_LEN  # 496
_PRF_T1_MAX = (64 - PRF_T1_OFFSET) * BLOCK_LEN  # 528: the counter stays in the last byte
_ZERO16 = bytes(16)
_BYTE = [bytes((i,)) for i in range(256)]

# --------------------------------------------------------------------------------------
# POLYVAL (RFC 8452 §3)
#
# A block is read as a little-endian 128-bit integer whose bit i is the coefficient of
# x^i in GF(2)[x] / (x^128 + x^127 + x^126 + x^121 + 1). POLYVAL(H, X_1..X_s) is
# S_s where S_0 = 0 and S_j = dot(S_{j-1} ^ X_j, H), dot(a, b) = a * b * x^-128.
# For a fixed H, w -> dot(w, H) is GF(2)-linear in w: it is the XOR, over the set bits
# k of w, of H * x^(k-128). The tables below are XORs of those 128 values.

_P = (1 << 128) | (1 << 127) | (1 << 126) | (1 << 121) | 1
_M64 = (1 << 64) - 1
_DIV_X = (0, _P >> 1)  # v * x^-1 = (v >> 1) ^ _DIV_X[v & 1]
_HEX_NIBBLE = bytes.maketrans(b"0123456789abcdef", bytes(range(16)))
_TABLELESS_BLOCKS = 4  # a key that hashes at most this many blocks in all gets no tables
_ET_BYTE_TABLES_AFTER = 64 * 32  # blocks (64 cells) before an ET key gets byte tables


def _mont_reduce(c: int) -> int:
    """``c * x^-128 mod P`` for ``c`` of degree < 256 (two 64-bit Montgomery folds).

    ``P`` is 1 modulo x^64, so with ``lo = c mod x^64`` the sum ``c ^ lo * P`` is
    divisible by x^64, and ``(c ^ lo * P) / x^64 = (c >> 64) ^ lo * (x^57 + x^62 + x^63 + x^64)``.
    """
    lo = c & _M64
    c = (c >> 64) ^ (lo << 57) ^ (lo << 62) ^ (lo << 63) ^ (lo << 64)
    lo = c & _M64
    return (c >> 64) ^ (lo << 57) ^ (lo << 62) ^ (lo << 63) ^ (lo << 64)


def _dot_tableless(w: int, h: int) -> int:
    """``dot(w, h)`` without tables: a nibble-wise carry-less product, then reduction."""
    h2 = h << 1
    h4 = h << 2
    h8 = h << 3
    h3 = h2 ^ h
    h5 = h4 ^ h
    h6 = h4 ^ h2
    h7 = h6 ^ h
    mult = (0, h, h2, h3, h4, h5, h6, h7, h8, h8 ^ h, h8 ^ h2, h8 ^ h3, h8 ^ h4, h8 ^ h5, h8 ^ h6, h8 ^ h7)
    c = 0
    for n in w.to_bytes(16, "big").hex().encode().translate(_HEX_NIBBLE):  # most significant first
        c = (c << 4) ^ mult[n]
    return _mont_reduce(c)


def _nibble_tables(h: int) -> list[list[int]]:
    """32 tables of 16: ``dot(n * x^(4q), h)`` for nibble position q and value n.

    They are ordered the way ``bytes.hex()`` yields nibbles (high nibble of byte 0,
    low nibble of byte 0, high nibble of byte 1, ...) of a little-endian block.
    """
    tables: list[list[int]] = [[]] * 32
    div = _DIV_X
    v = h
    for q in range(31, -1, -1):  # v walks down h * x^(k-128), k = 127 .. 0
        d = v = (v >> 1) ^ div[v & 1]  # k = 4q + 3
        c = v = (v >> 1) ^ div[v & 1]
        b = v = (v >> 1) ^ div[v & 1]
        a = v = (v >> 1) ^ div[v & 1]  # k = 4q
        ab = a ^ b
        ac = a ^ c
        bc = b ^ c
        abc = ab ^ c
        # nibble q is the low (q even) or the high (q odd) half of byte q // 2
        tables[q ^ 1] = [0, a, b, ab, c, ac, bc, abc, d, a ^ d, b ^ d, ab ^ d, c ^ d, ac ^ d, bc ^ d, abc ^ d]
    return tables


def _byte_tables(nibble_tables: list[list[int]]) -> list[list[int]]:
    """16 tables of 256 (``dot(b * x^(8i), h)``), combined from the nibble tables."""
    return [[lo ^ hi for hi in nibble_tables[2 * i] for lo in nibble_tables[2 * i + 1]] for i in range(16)]


def _horner_tableless(h: int, data: bytes) -> int:
    s = 0
    fb = int.from_bytes
    for i in range(0, len(data), 16):
        s = _dot_tableless(s ^ fb(data[i:i + 16], "little"), h)
    return s


def _horner_nibbles(tables: list[list[int]], data: bytes) -> int:
    (A0, A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12, A13, A14, A15, A16, A17, A18, A19, A20, A21, A22,
     A23, A24, A25, A26, A27, A28, A29, A30, A31) = tables
    s = 0
    fb = int.from_bytes
    trans = _HEX_NIBBLE
    for i in range(0, len(data), 16):
        (n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, n12, n13, n14, n15, n16, n17, n18, n19, n20, n21, n22,
         n23, n24, n25, n26, n27, n28, n29, n30, n31) = (
            (s ^ fb(data[i:i + 16], "little")).to_bytes(16, "little").hex().encode().translate(trans))
        s = (A0[n0] ^ A1[n1] ^ A2[n2] ^ A3[n3] ^ A4[n4] ^ A5[n5] ^ A6[n6] ^ A7[n7] ^ A8[n8] ^ A9[n9]
             ^ A10[n10] ^ A11[n11] ^ A12[n12] ^ A13[n13] ^ A14[n14] ^ A15[n15] ^ A16[n16] ^ A17[n17]
             ^ A18[n18] ^ A19[n19] ^ A20[n20] ^ A21[n21] ^ A22[n22] ^ A23[n23] ^ A24[n24] ^ A25[n25]
             ^ A26[n26] ^ A27[n27] ^ A28[n28] ^ A29[n29] ^ A30[n30] ^ A31[n31])
    return s


def _horner_bytes(tables: list[list[int]], data: bytes) -> int:
    T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15 = tables
    s = 0
    fb = int.from_bytes
    for i in range(0, len(data), 16):
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = (
            (s ^ fb(data[i:i + 16], "little")).to_bytes(16, "little"))
        s = (T0[b0] ^ T1[b1] ^ T2[b2] ^ T3[b3] ^ T4[b4] ^ T5[b5] ^ T6[b6] ^ T7[b7] ^ T8[b8] ^ T9[b9]
             ^ T10[b10] ^ T11[b11] ^ T12[b12] ^ T13[b13] ^ T14[b14] ^ T15[b15])
    return s


class PurePolyvalKey:
    """POLYVAL with one key ``H`` (16 bytes), for many messages, in pure Python.

    The reference implementation: the tests cross-check the native backend against it,
    and :data:`PolyvalKey` is this class when the native backend is unavailable. The
    method is picked by use: no tables while the key has hashed at most
    ``_TABLELESS_BLOCKS`` blocks in all, then nibble tables; with ``byte_tables_after``
    set, byte tables once the key has hashed that many blocks.
    """

    __slots__ = ("_h", "_nibbles", "_bytes", "_used", "_upgrade_at")

    def __init__(self, key: bytes, *, byte_tables_after: int | None = None) -> None:
        if len(key) != 16:
            raise LocalProtocolError("POLYVAL key must be 16 bytes")
        self._h = int.from_bytes(key, "little")
        self._nibbles: list[list[int]] | None = None
        self._bytes: list[list[int]] | None = None
        self._used = 0
        self._upgrade_at = byte_tables_after

    def hash_int(self, data: bytes) -> int:
        """POLYVAL of ``data`` (zero-padded to whole blocks) as a little-endian integer."""
        if len(data) % 16:
            data = bytes(data) + _ZERO16[len(data) % 16:]
        if self._bytes is not None:
            return _horner_bytes(self._bytes, data)
        used = self._used + len(data) // 16
        self._used = used
        nibbles = self._nibbles
        if nibbles is None:
            if used <= _TABLELESS_BLOCKS:
                return _horner_tableless(self._h, data)
            nibbles = self._nibbles = _nibble_tables(self._h)
        elif self._upgrade_at is not None and used >= self._upgrade_at:
            self._bytes = _byte_tables(nibbles)
            self._nibbles = None
            return _horner_bytes(self._bytes, data)
        return _horner_nibbles(nibbles, data)

    def digest(self, data: bytes) -> bytes:
        """POLYVAL of ``data`` (zero-padded to whole blocks): 16 bytes."""
        return self.hash_int(data).to_bytes(16, "little")


# --------------------------------------------------------------------------------------
# Native POLYVAL: an adapter to pycryptodome's C GHASH.
#
# NOTE: this binds pycryptodome's *internal* raw GHASH API (the ``_ghash_clmul`` /
# ``_ghash_portable`` function tables of ``Crypto.Cipher._mode_gcm`` and the buffer helpers of
# ``Crypto.Util._raw_api``), not a public interface. It is pinned in pyproject.toml to the
# range it was tested with (pycryptodome 4.5.x). pycryptodome 4.5 added AES-GCM-SIV, and with
# it ``ghash_expand_rev`` / ``ghash_rev``: GHASH over byte-reversed blocks with the POLYVAL key,
# i.e. RFC 8452 Appendix A's
#     POLYVAL(H, X_1..X_n) = ByteReverse(GHASH(mulX_GHASH(ByteReverse(H)), ByteReverse(X_1), ..))
# with both ByteReverse steps and mulX done in C (its own GCM-SIV uses exactly this, and checks
# it against RFC 8452 in its self-tests). The result buffer holds the GHASH value, so the
# POLYVAL integer is that buffer read big-endian (no reversal in Python either).
#
# At import the binding must pass a self-test (RFC 8452 vectors, then long and odd-length
# inputs against the pure-Python reference). If pycryptodome is missing, has another API, or
# fails the self-test, PolyvalKey is the pure-Python class and a RuntimeWarning says why:
# slow but right, never fast and wrong. POLYVAL_BACKEND names the backend in use.

#: a few RFC 8452 POLYVAL vectors (Appendix A, Appendix C): key, input, result
_SELF_TEST_VECTORS = (
    ("25629347589242761d31f826ba4b757b", "4f4f95668c83dfb6401762bb2d01a262d1a24ddd2721d006bbe45f20d3c9f362",
     "f7a3b47b846119fae5b7866cf5e5b77e"),
    ("d9b360279694941ac5dbc6987ada7377",
     "01000000000000000000000000000000" "02000000000000000000000000000000" "00000000000000000001000000000000",
     "ce6edc9a50b36d9a98986bbf6a261c3b"),
    ("d9b360279694941ac5dbc6987ada7377",
     "01000000000000000000000000000000" "02000000000000000000000000000000" "03000000000000000000000000000000"
     "04000000000000000000000000000000" "05000000000000000000000000000000" "08000000000000000002000000000000",
     "ffcd05d5770f34ad9267f0a59994b15a"),
    ("3e28de1120b2981a0155795ca2812af6",
     "46bb91c3c50000000000000000000000" "7a806c00000000000000000000000000" "28000000000000001800000000000000",
     "43d9a745511dcfa21b96dd606f1d5720"),
)


class GhashBackend(NamedTuple):
    """One pycryptodome GHASH library, bound for :class:`NativePolyvalKey` (see :func:`_make_backend`)."""

    name: str
    expand: Callable[[bytes], Any]  # POLYVAL key -> expanded key, freed when collected; raises on error
    ghash_rev: Callable[..., int]  # (y_out[16], data, len, y_in[16], exp_key) -> error code
    out_buffer: Callable[[], Any]  # a new 16-byte C buffer
    view: Callable[[Any], Any]  # a live, zero-copy bytes-like view of such a buffer
    size_t: Callable[[int], Any]  # an int as the C size_t argument


def _native_hasher(key: bytes, out: Any, view: Any, backend: GhashBackend) -> Callable[[bytes], int]:
    """POLYVAL under ``key`` through ``backend``, as a function of whole blocks (``bytes``) -> int.

    The hot path of CGO: one C call and one conversion, no checks (callers pass 16 or 512
    bytes). The result goes to ``out`` (read through ``view``), which the caller owns and
    may share between the keys it never uses concurrently (a UIV+ direction shares one
    between its ET and PRF keys, so rekeying allocates no buffer). The expanded key lives
    as long as the function and is freed with it.
    """
    exp = backend.expand(key)
    ghash, size_t, from_bytes = backend.ghash_rev, backend.size_t, int.from_bytes

    def hash_int(data: bytes) -> int:
        if ghash(out, data, size_t(len(data)), _ZERO16, exp):
            raise LocalProtocolError("POLYVAL failed in the native backend")
        return from_bytes(view, "big")  # the GHASH value is the byte-reversed POLYVAL

    return hash_int


class NativePolyvalKey:
    """POLYVAL with one key through pycryptodome's C GHASH (CLMUL/PMULL or portable).

    Same interface as :class:`PurePolyvalKey` (``byte_tables_after`` is accepted and
    ignored: the C code has its own key expansion). Each key owns its expanded key (freed
    with the object) and a 16-byte output buffer, read through a live view without a copy;
    so a key is not for concurrent use from several threads, like a ``cryptography``
    cipher context.
    """

    __slots__ = ("_hash", "_out")

    def __init__(self, key: bytes, *, byte_tables_after: int | None = None,
                 backend: GhashBackend | None = None) -> None:
        if len(key) != 16:
            raise LocalProtocolError("POLYVAL key must be 16 bytes")
        b = backend or _GHASH
        if b is None:
            raise LocalProtocolError(f"no native POLYVAL backend ({_backend_note})")
        self._out = out = b.out_buffer()
        self._hash = _native_hasher(key if type(key) is bytes else bytes(key), out, b.view(out), b)

    def hash_int(self, data: bytes) -> int:
        """POLYVAL of ``data`` (zero-padded to whole blocks) as a little-endian integer."""
        n = len(data)
        if n % 16:
            data = b"".join((data, _ZERO16[n % 16:]))
        elif type(data) is not bytes:
            data = bytes(data)
        return self._hash(data)

    def digest(self, data: bytes) -> bytes:
        """POLYVAL of ``data`` (zero-padded to whole blocks): 16 bytes."""
        return self.hash_int(data).to_bytes(16, "little")


class _OwnedPointer:
    """A C pointer for ctypes calls (``_as_parameter_``) that frees itself when collected."""

    __slots__ = ("_as_parameter_", "_free")

    def __init__(self, pointer: Any, free: Callable[[Any], int]) -> None:
        self._as_parameter_ = pointer
        self._free = free

    def __del__(self) -> None:
        self._free(self._as_parameter_)


def _make_backend(name: str, imp: Any, raw: Any) -> GhashBackend:
    """Bind one of ``Crypto.Cipher._mode_gcm``'s GHASH function tables (``imp``).

    ``raw`` is ``Crypto.Util._raw_api``. With its cffi backend (the usual one: ``cryptography``
    needs cffi too) the C types are parsed once here and expanded keys are freed by
    ``ffi.gc`` (in C, no Python ``__del__``); otherwise pycryptodome's own helpers.
    """
    expand_rev, destroy = imp.ghash_expand_rev, imp.ghash_destroy

    def failed(err: int) -> LocalProtocolError:
        return LocalProtocolError(f"POLYVAL key expansion failed in {name} (error {err})")

    if getattr(raw, "backend", None) == "cffi":
        ffi = raw.ffi
        new, gc, void_pp, u8_16 = ffi.new, ffi.gc, ffi.typeof("void *[1]"), ffi.typeof("uint8_t[16]")

        def expand(key: bytes) -> Any:
            pp = new(void_pp)
            err = expand_rev(key, pp)
            if err:
                raise failed(err)
            return gc(pp[0], destroy)

        def out_buffer() -> Any:
            return new(u8_16)

        view, size_t = ffi.buffer, int  # pycryptodome's c_size_t is the identity with cffi
    else:  # ctypes: pycryptodome's helpers; its buffers are ctypes arrays (buffer protocol)

        def expand(key: bytes) -> Any:
            vp = raw.VoidPointer()
            err = expand_rev(key, vp.address_of())
            if err:
                raise failed(err)
            return _OwnedPointer(vp.get(), destroy)

        def out_buffer() -> Any:
            return raw.create_string_buffer(16)

        view, size_t = memoryview, raw.c_size_t
    return GhashBackend(name=name, expand=expand, ghash_rev=imp.ghash_rev,
                        out_buffer=out_buffer, view=view, size_t=size_t)


def _ghash_backends() -> tuple[list[GhashBackend], str]:
    """pycryptodome's GHASH libraries with the reversed-block API, fastest first; or why none."""
    try:
        from Crypto.Cipher import _mode_gcm as gcm  # noqa: PLC0415 (optional, internal API)
        from Crypto.Util import _raw_api as raw  # noqa: PLC0415
    except Exception as exc:  # pragma: no cover - exercised only without pycryptodome
        return [], f"pycryptodome not importable: {exc!r}"
    found: list[GhashBackend] = []
    problems: list[str] = []
    for attr in ("_ghash_clmul", "_ghash_portable"):
        imp = getattr(gcm, attr, None)
        if imp is None:
            problems.append(f"{attr} missing")
            continue
        try:
            found.append(_make_backend(f"pycryptodome{attr}", imp, raw))
        except Exception as exc:  # an older or newer API: missing functions, unknown C types
            problems.append(f"{attr}: {exc!r}")
    return found, "; ".join(problems) or "no GHASH library"


def _self_test(backend: GhashBackend) -> str | None:
    """Why ``backend`` must not be used (None: it computes POLYVAL right).

    RFC 8452 vectors, then inputs of 1, 31 (an odd length, padded), 32 and 33 blocks
    against :class:`PurePolyvalKey`, with one key object reused as CGO does.
    """
    try:
        for key, data, expect in _SELF_TEST_VECTORS:
            got = NativePolyvalKey(bytes.fromhex(key), backend=backend).digest(bytes.fromhex(data))
            if got.hex() != expect:
                return f"RFC 8452 vector: got {got.hex()}, want {expect}"
        stream = shake_128(b"onionp2p cgo POLYVAL self-test").digest(16 + 528 * 4)
        key = stream[:16]
        native, pure = NativePolyvalKey(key, backend=backend), PurePolyvalKey(key)
        for i, n in enumerate((16, 510, 512, 528)):
            data = stream[16 + 528 * i:16 + 528 * i + n]
            if native.digest(data) != pure.digest(data):
                return f"differs from the reference on {n} bytes"
    except Exception as exc:  # a changed internal API: wrong arity, types, missing symbols
        return f"binding error: {exc!r}"
    return None


def _pick_backend() -> tuple[GhashBackend | None, str]:
    backends, reason = _ghash_backends()
    reasons = [reason] if not backends else []
    for backend in backends:
        failure = _self_test(backend)
        if failure is None:
            return backend, backend.name
        reasons.append(f"{backend.name}: {failure}")
    return None, "; ".join(reasons)


_GHASH, _backend_note = _pick_backend()
#: which POLYVAL runs: ``pycryptodome_ghash_clmul``, ``pycryptodome_ghash_portable`` or ``python``
POLYVAL_BACKEND: str = _GHASH.name if _GHASH is not None else "python"
#: the class used for every POLYVAL key (native when the self-test passed)
PolyvalKey: type[NativePolyvalKey] | type[PurePolyvalKey]
if _GHASH is not None:
    PolyvalKey = NativePolyvalKey
else:
    PolyvalKey = PurePolyvalKey
    warnings.warn(f"onionp2p CGO: native POLYVAL unavailable ({_backend_note}); using pure Python "
                  "(correct, several times slower per cell)", RuntimeWarning, stacklevel=2)


def polyval(key: bytes, data: bytes) -> bytes:
    """One-off POLYVAL(``key``, ``data``), ``data`` zero-padded to whole blocks."""
    return PolyvalKey(key).digest(data)


def _polyval_buffer() -> tuple[Any, Any]:
    """An output buffer and its live view for :func:`_hasher` (``(None, None)`` without a native backend)."""
    if _GHASH is None:
        return None, None
    out = _GHASH.out_buffer()
    return out, _GHASH.view(out)


def _hasher(key: bytes, out: Any, view: Any, byte_tables_after: int | None = None) -> Callable[[bytes], int]:
    """The hot-path POLYVAL of one key (whole blocks as ``bytes`` -> little-endian int).

    Native (:func:`_native_hasher`, into the caller's buffer from :func:`_polyval_buffer`)
    while :data:`PolyvalKey` is the native class, else that class's ``hash_int`` (so that
    replacing :data:`PolyvalKey` by the reference switches every CGO layer made afterwards).
    """
    if PolyvalKey is NativePolyvalKey and out is not None:
        return _native_hasher(key, out, view, _GHASH)  # type: ignore[arg-type]
    return PolyvalKey(key, byte_tables_after=byte_tables_after).hash_int


# --------------------------------------------------------------------------------------
# XOR of the keystream. Python's int conversions of ~500 bytes cost about three times a
# C XOR called through cffi, so the PRF uses pycryptodome's strxor (``Crypto.Util.strxor``'s
# raw C function, the one its public ``strxor`` calls; an internal API like the GHASH one)
# when its cffi binding is there and passes a self-test, and Python ints otherwise.

XorFn = Callable[[bytes, bytes], bytes]  # (a, b) -> a XOR b[:len(a)]; len(a) <= min(len(b), 512); unchecked


def _xor_ints(a: bytes, b: bytes) -> bytes:
    """``a`` XOR the first ``len(a)`` bytes of ``b`` (``len(b) >= len(a)``) with Python ints."""
    n = len(a)
    return (int.from_bytes(a, "big") ^ (int.from_bytes(b, "big") >> (8 * (len(b) - n)))).to_bytes(n, "big")


def _make_xor_ints() -> XorFn:
    return _xor_ints


def _native_xor_factory() -> tuple[Callable[[], XorFn] | None, str]:
    """A maker of C XOR functions, each with its own 512-byte output buffer; or why not."""
    try:
        from Crypto.Util import _raw_api as raw  # noqa: PLC0415 (optional, internal API)
        from Crypto.Util import strxor as sx  # noqa: PLC0415
        if getattr(raw, "backend", None) != "cffi":
            return None, f"pycryptodome uses {getattr(raw, 'backend', '?')}, not cffi"
        ffi, strxor = raw.ffi, sx._raw_strxor.strxor
        u8_512 = ffi.typeof("uint8_t[512]")
    except Exception as exc:  # pragma: no cover - without pycryptodome, or another API
        return None, f"pycryptodome strxor not bound: {exc!r}"

    def make() -> XorFn:
        buf = ffi.new(u8_512)
        view = ffi.buffer(buf)

        def xor(a: bytes, b: bytes) -> bytes:
            n = len(a)
            strxor(a, b, buf, n)
            return view[:n]

        return xor

    try:  # the same results as the ints, output buffer reused, on the lengths CGO uses
        xor = make()
        data = shake_128(b"onionp2p cgo strxor self-test").digest(2 * 512 + 80)
        for a, b in ((data[:493], data[512:1008]), (data[1:17], data[600:616]), (data[:512], data[512:1024]),
                     (data[1024:1104], data[:496])):
            if xor(a, b) != _xor_ints(a, b):
                return None, "pycryptodome strxor differs from the reference"
    except Exception as exc:  # pragma: no cover - a changed signature
        return None, f"pycryptodome strxor binding error: {exc!r}"
    return make, "pycryptodome_strxor"


#: which XOR the PRF uses: ``pycryptodome_strxor`` or ``python (why)``
_native_xor, XOR_BACKEND = _native_xor_factory()
if _native_xor is None:
    XOR_BACKEND = f"python ({XOR_BACKEND})"
#: a new XOR function (each owns its output buffer: one per UIV+ direction)
_make_xor: Callable[[], XorFn] = _native_xor or _make_xor_ints


# --------------------------------------------------------------------------------------
# ET, PRF, UIV+
#
# The hot path is three module functions on plain values (an AES context's ``update``, a
# POLYVAL function from _hasher, an XOR function): _et, _prf_xor_t0 and _prf_stream. The
# classes hold those values; UIV holds all four keys' values itself, so that a rekey makes
# two AES contexts and two POLYVAL keys and nothing else.


_ECB = modes.ECB()
_PAD2 = bytes(2)  # the ET tweak is 510 bytes: POLYVAL pads it to 512
_IV_MASK = ~(0x3F << 120)  # clears the low six bits of the IV's last byte (little-endian int)


def _aes_ecb(key: bytes, encrypt: bool = True):  # -> the context's update()
    """One ``cryptography`` ECB context per key; its ``update`` is called once per use."""
    cipher = Cipher(algorithms.AES(key), _ECB)
    return (cipher.encryptor() if encrypt else cipher.decryptor()).update


def _check_len(data: bytes, n: int, what: str) -> None:
    if len(data) != n:
        raise LocalProtocolError(f"{what} must be {n} bytes, got {len(data)}")


def _tweak(h: bytes, cmd: int, x_r: bytes) -> bytes:
    """The ET tweak ``h | cmd | x_r``, already zero-padded to 512 bytes (one copy)."""
    return b"".join((h, _BYTE[cmd], x_r, _PAD2))


def _et(aes: Callable[[bytes], bytes], ku: Callable[[bytes], int], tweak: bytes, block: bytes) -> bytes:
    """``AES(block ^ mask) ^ mask``, ``mask = POLYVAL(KU, tweak)``, for a padded tweak from
    :func:`_tweak`; ``aes`` encrypts (ET) or decrypts (ET^-1). No checks (hot path)."""
    mask = ku(tweak)
    inner = (int.from_bytes(block, "little") ^ mask).to_bytes(16, "little")
    return (int.from_bytes(aes(inner), "little") ^ mask).to_bytes(16, "little")


#: ``_COUNTER_RUNS[c]`` = the bytes c, c+1, .., 255: the last bytes of consecutive counter blocks
_COUNTER_RUNS = [bytes(range(c, 256)) for c in range(257)]


def _counter_blocks(iv: bytes, first: int, count: int) -> bytearray:
    """The AES-CTR counter blocks ``iv + first`` .. ``iv + first + count - 1`` (128-bit big-endian).

    Only for runs that stay inside the last byte (``iv[15] + first + count <= 256``), which
    is all the PRF needs: its IV has the low six bits clear and it uses 64 blocks at most,
    so the blocks are the IV with only the last byte changed. A run that would carry into
    byte 14 raises ValueError instead of going wrong (checked, not left to the slice
    assignment: assigning an empty run to a one-block slice would delete the byte).
    """
    start = iv[15] + first
    if start + count > 256:
        raise ValueError("counter run would carry out of the IV's last byte")
    blocks = bytearray(iv * count)
    blocks[15::16] = _COUNTER_RUNS[start][:count]
    return blocks


def _prf_iv(b: Callable[[bytes], int], tweak: bytes) -> bytes:
    """``POLYVAL(B, tweak)`` with the low six bits of its last byte cleared."""
    return (b(tweak) & _IV_MASK).to_bytes(16, "little")


def _prf_xor_t0(aes: Callable[[bytes], bytes], b: Callable[[bytes], int], xor: XorFn, tweak: bytes,
                data: bytes) -> bytes:
    """``data`` (at most 496 bytes) XOR the ``t = 0`` keystream; no checks (hot path)."""
    return xor(data, aes(_counter_blocks(_prf_iv(b, tweak), 0, PRF_T1_OFFSET)))


def _prf_stream(aes: Callable[[bytes], bytes], b: Callable[[bytes], int], tweak: bytes, first: int,
                count: int) -> bytes:
    """``count`` blocks of keystream from block ``first`` (``t = 1`` starts at 31); no checks."""
    return aes(_counter_blocks(_prf_iv(b, tweak), first, count))


class _EtApi:
    """The checked methods of ET, shared by the pure and the native class (each has ``_run``)."""

    __slots__ = ()
    encrypting: bool

    def _run(self, h: bytes, cmd: int, x_r: bytes, block: bytes) -> bytes:
        raise NotImplementedError

    def encrypt(self, h: bytes, cmd: int, x_r: bytes, block: bytes) -> bytes:
        """``AES_KB(block ^ mask) ^ mask`` with ``mask = POLYVAL(KU, h | cmd | x_r)``."""
        if not self.encrypting:
            raise LocalProtocolError("this ET was set up for decryption")
        _check_tweak(h, cmd, x_r, block)
        return self._run(bytes(h), cmd, bytes(x_r), bytes(block))

    def decrypt(self, h: bytes, cmd: int, x_r: bytes, block: bytes) -> bytes:
        """The inverse of :meth:`encrypt` (AES decryption between the same masks)."""
        if self.encrypting:
            raise LocalProtocolError("this ET was set up for encryption")
        _check_tweak(h, cmd, x_r, block)
        return self._run(bytes(h), cmd, bytes(x_r), bytes(block))


class PureET(_EtApi):
    """The tweakable block cipher: ``KB[16] | KU[16]``, for encryption or decryption.

    The tweak is ``h[16] | cmd u8 | x_r[493]``; the block is 16 bytes.
    """

    __slots__ = ("_aes", "_ku", "_out", "encrypting")

    def __init__(self, key: bytes, *, encrypt: bool) -> None:
        _check_len(key, ET_KEY_LEN, "ET key")
        key = bytes(key)
        self._aes = _aes_ecb(key[:AES_KEY_LEN], encrypt)
        self._out, view = _polyval_buffer()
        self._ku = _hasher(key[AES_KEY_LEN:], self._out, view, _ET_BYTE_TABLES_AFTER)
        self.encrypting = encrypt

    def _run(self, h: bytes, cmd: int, x_r: bytes, block: bytes) -> bytes:
        return _et(self._aes, self._ku, _tweak(h, cmd, x_r), block)


def _check_tweak(h: bytes, cmd: int, x_r: bytes, block: bytes) -> None:
    _check_len(h, 16, "tweak H")
    _check_len(x_r, MSG_LEN, "tweak X_R")
    _check_len(block, 16, "ET block")
    _check_cmd(cmd)


_T1_UPDATE_BLOCKS = DIR_KEY_LEN // BLOCK_LEN  # 5: what UIV+ update takes


class _PrfApi:
    """The checked methods of the PRF, shared by the pure and the native class (each has ``_stream``)."""

    __slots__ = ()

    def _stream(self, tweak: bytes, first: int, count: int) -> bytes:
        raise NotImplementedError

    def xor_t0(self, tweak: bytes, data: bytes) -> bytes:
        """``data`` XOR the ``t = 0`` keystream (at most 496 bytes; CGO uses 493)."""
        _check_len(tweak, 16, "PRF input")
        if len(data) > _PRF_T0_MAX:
            raise LocalProtocolError(f"PRF t=0 output is at most {_PRF_T0_MAX} bytes")
        n = len(data)
        return _xor_ints(bytes(data), self._stream(bytes(tweak), 0, (n + 15) // 16)) if n else b""

    def stream_t1(self, tweak: bytes, n: int) -> bytes:
        """The first ``n`` bytes of the ``t = 1`` keystream (at most 528; CGO uses 80)."""
        _check_len(tweak, 16, "PRF input")
        if not 0 <= n <= _PRF_T1_MAX:
            raise LocalProtocolError(f"PRF t=1 output is at most {_PRF_T1_MAX} bytes")
        return self._stream(bytes(tweak), PRF_T1_OFFSET, (n + 15) // 16)[:n]


class PurePRF(_PrfApi):
    """The tweakable keystream: ``K[16] | B[16]``.

    ``IV = POLYVAL(B, input)`` with ``IV[15] &= 0xC0``; the keystream is AES-128-CTR under
    ``K`` from ``IV`` (``t = 0``) or from ``IV + 31`` (``t = 1``). Clearing six bits keeps
    the counter inside the IV's last byte for 64 blocks, so the counter blocks are the IV
    with only its last byte changed (:func:`_counter_blocks`); they go through one ECB
    context per key (a new CTR context for every IV would cost more than the whole keystream).
    """

    __slots__ = ("_aes", "_b", "_out", "_xor")

    def __init__(self, key: bytes) -> None:
        _check_len(key, PRF_KEY_LEN, "PRF key")
        key = bytes(key)
        self._aes = _aes_ecb(key[:AES_KEY_LEN])
        self._out, view = _polyval_buffer()
        self._b = _hasher(key[AES_KEY_LEN:], self._out, view)
        self._xor = _make_xor()

    def xor_t0(self, tweak: bytes, data: bytes) -> bytes:
        """``data`` XOR the ``t = 0`` keystream (at most 496 bytes; CGO uses 493)."""
        _check_len(tweak, 16, "PRF input")
        if len(data) > _PRF_T0_MAX:
            raise LocalProtocolError(f"PRF t=0 output is at most {_PRF_T0_MAX} bytes")
        return _prf_xor_t0(self._aes, self._b, self._xor, bytes(tweak), bytes(data))

    def _stream(self, tweak: bytes, first: int, count: int) -> bytes:
        return _prf_stream(self._aes, self._b, tweak, first, count)


class _UivApi:
    """The checked methods of UIV+, shared by the pure and the native class (each has
    ``_enc``, ``_dec`` and ``_update``, unchecked, on ``bytes``)."""

    __slots__ = ()
    encrypting: bool
    _enc: Callable[[bytes, int, bytes], bytes]
    _dec: Callable[[bytes, int, bytes], bytes]
    _update: Callable[[bytes], bytes]

    def encrypt(self, h: bytes, cmd: int, body: bytes) -> bytes:
        """``Y_L = ET(h | cmd | X_R, X_L)``, ``Y_R = X_R ^ PRF(Y_L, t=0)``."""
        if not self.encrypting:
            raise LocalProtocolError("this UIV was set up for decryption")
        _check_len(h, 16, "tweak H")
        _check_cmd(cmd)
        _check_len(body, RELAY_BODY_LEN, "UIV block")
        return self._enc(bytes(h), cmd, bytes(body))

    def decrypt(self, h: bytes, cmd: int, body: bytes) -> bytes:
        """``X_R = Y_R ^ PRF(Y_L, t=0)``, ``X_L = ET^-1(h | cmd | X_R, Y_L)``."""
        if self.encrypting:
            raise LocalProtocolError("this UIV was set up for encryption")
        _check_len(h, 16, "tweak H")
        _check_cmd(cmd)
        _check_len(body, RELAY_BODY_LEN, "UIV block")
        return self._dec(bytes(h), cmd, bytes(body))

    def update(self, nonce: bytes) -> bytes:
        """Replace ``J | S`` by the first 64 bytes of ``PRF_S(nonce, t=1)``; return the next 16."""
        _check_len(nonce, 16, "nonce")
        return self._update(bytes(nonce))


class PureUIV(_UivApi):
    """The UIV+ wide-block cipher over a 509-byte body: keys ``J[32] | S[32]``.

    ``encrypt`` / ``decrypt`` take the tweak ``h[16]`` and the cell command; ``update``
    rekeys from a 16-byte nonce and returns the next nonce. ``key`` is the current
    64 bytes of key material (kept for the test vectors, which check it). The ``_enc`` /
    ``_dec`` / ``_update`` forms skip the argument checks, for :class:`CgoCrypt`, which
    checks each cell once. The object holds ET's and the PRF's keys itself (two AES
    contexts, two POLYVAL functions sharing one output buffer, and one XOR buffer), so a
    rekey replaces four values and allocates no buffers.
    """

    __slots__ = ("_et_aes", "_ku", "_prf_aes", "_b", "_xor", "_out", "_view", "_key", "encrypting")

    def __init__(self, key: bytes, *, encrypt: bool) -> None:
        _check_len(key, UIV_KEY_LEN, "UIV key")
        self.encrypting = encrypt
        self._out, self._view = _polyval_buffer()
        self._xor = _make_xor()
        self._set_key(bytes(key))

    def _set_key(self, key: bytes) -> None:
        out, view = self._out, self._view
        self._et_aes = _aes_ecb(key[:AES_KEY_LEN], self.encrypting)
        self._ku = _hasher(key[AES_KEY_LEN:ET_KEY_LEN], out, view, _ET_BYTE_TABLES_AFTER)
        self._prf_aes = _aes_ecb(key[ET_KEY_LEN:ET_KEY_LEN + AES_KEY_LEN])
        self._b = _hasher(key[ET_KEY_LEN + AES_KEY_LEN:UIV_KEY_LEN], out, view)
        self._key = key

    @property
    def key(self) -> bytes:
        """The current ``J | S`` (64 bytes)."""
        return self._key

    def _enc(self, h: bytes, cmd: int, body: bytes) -> bytes:
        x_r = body[16:]
        y_l = _et(self._et_aes, self._ku, _tweak(h, cmd, x_r), body[:16])
        return y_l + _prf_xor_t0(self._prf_aes, self._b, self._xor, y_l, x_r)

    def _dec(self, h: bytes, cmd: int, body: bytes) -> bytes:
        y_l = body[:16]
        x_r = _prf_xor_t0(self._prf_aes, self._b, self._xor, y_l, body[16:])
        return _et(self._et_aes, self._ku, _tweak(h, cmd, x_r), y_l) + x_r

    def _update(self, nonce: bytes) -> bytes:
        fresh = _prf_stream(self._prf_aes, self._b, nonce, PRF_T1_OFFSET, _T1_UPDATE_BLOCKS)
        self._set_key(fresh[:UIV_KEY_LEN])
        return fresh[UIV_KEY_LEN:]


# --------------------------------------------------------------------------------------
# Cell-level operations (one direction of one hop)


def _check_cmd(cmd: int) -> None:
    if not isinstance(cmd, int) or not 0 <= cmd <= 255:
        raise LocalProtocolError(f"cell command must be 0..255, got {cmd!r}")


def _check_cell(cmd: int, body: bytes) -> bytes:
    """Check one cell given to :class:`CgoCrypt` (a local error: the wrappers check network input)."""
    if type(cmd) is not int or not 0 <= cmd <= 255:
        _check_cmd(cmd)  # bool and int subclasses: the full check and its message
    if len(body) != RELAY_BODY_LEN:
        raise LocalProtocolError(f"relay cell body must be {RELAY_BODY_LEN} bytes, got {len(body)}")
    return body if type(body) is bytes else bytes(body)


def _check_body(body: bytes, local: bool) -> bytes:
    if len(body) != RELAY_BODY_LEN:
        error = LocalProtocolError if local else ProtocolError
        raise error(f"relay cell body must be {RELAY_BODY_LEN} bytes, got {len(body)}")
    return body if type(body) is bytes else bytes(body)


class _CgoCryptApi:
    """The checked cell methods of :class:`CgoCrypt`, shared by the pure and the native class
    (each has ``relay`` and the six unchecked ``_``-prefixed operations)."""

    __slots__ = ()
    relay: bool
    _relay_forward: Callable[[int, bytes], tuple[bytes, bytes | None]]
    _relay_backward: Callable[[int, bytes], bytes]
    _relay_originate: Callable[[int, bytes], tuple[bytes, bytes]]
    _client_forward: Callable[[int, bytes], bytes]
    _client_originate: Callable[[int, bytes], tuple[bytes, bytes]]
    _client_backward: Callable[[int, bytes], tuple[bytes, bytes | None]]

    def _need(self, relay: bool) -> None:
        if self.relay is not relay:
            raise LocalProtocolError("CGO operation for the other side (client/relay)")

    def relay_forward(self, cmd: int, body: bytes) -> tuple[bytes, bytes | None]:
        """A cell from the client: ``(body, tag)`` if it is for us, else ``(body, None)``."""
        self._need(True)
        return self._relay_forward(cmd, _check_cell(cmd, body))

    def relay_backward(self, cmd: int, body: bytes) -> bytes:
        """Add our layer to a cell from a later hop, toward the client."""
        self._need(True)
        return self._relay_backward(cmd, _check_cell(cmd, body))

    def relay_originate(self, cmd: int, body: bytes) -> tuple[bytes, bytes]:
        """Send a cell of our own toward the client: ``(body, tag)``.

        The first 16 bytes of ``body`` are replaced by the nonce.
        """
        self._need(True)
        return self._relay_originate(cmd, _check_cell(cmd, body))

    def client_forward(self, cmd: int, body: bytes) -> bytes:
        """Add this hop's layer to a cell for a later hop."""
        self._need(False)
        return self._client_forward(cmd, _check_cell(cmd, body))

    def client_originate(self, cmd: int, body: bytes) -> tuple[bytes, bytes]:
        """Start a cell for this hop: ``(body, tag)``; the first 16 bytes are replaced."""
        self._need(False)
        return self._client_originate(cmd, _check_cell(cmd, body))

    def client_backward(self, cmd: int, body: bytes) -> tuple[bytes, bytes | None]:
        """Peel this hop's layer: ``(body, tag)`` if the hop originated it, else ``(body, None)``."""
        self._need(False)
        return self._client_backward(cmd, _check_cell(cmd, body))


class PureCgoCrypt(_CgoCryptApi):
    """One direction of CGO between the client and one hop: keys, ``N`` and ``T'``.

    ``relay`` selects UIV+ encryption (a relay) or decryption (the client). The six
    operations are those of C tor's ``cgo_crypt_*``; each takes the cell command and
    the 509-byte body and returns the new body (plus the SENDME tag where a cell is
    originated or recognized). ``nonce`` and ``tprime`` are public for tests. The
    ``_``-prefixed forms skip the checks, for callers that made them already (the
    circuit-level classes below and :mod:`onionp2p.proto.hopcrypto`): ``cmd`` an int
    0..255 and ``body`` 509 ``bytes``. This is the pure-Python reference; :data:`CgoCrypt`
    is the native class when that is built (:data:`CGO_BACKEND`).
    """

    __slots__ = ("_uiv", "nonce", "tprime", "relay")

    def __init__(self, key_material: bytes, *, relay: bool, tprime: bytes = _ZERO16) -> None:
        _check_len(key_material, DIR_KEY_LEN, "CGO key material for one direction")
        _check_len(tprime, TAG_LEN, "T'")
        km = bytes(key_material)
        self._uiv = PureUIV(km[:UIV_KEY_LEN], encrypt=relay)
        self.nonce = km[UIV_KEY_LEN:]
        self.tprime = bytes(tprime)
        self.relay = relay

    @property
    def key(self) -> bytes:
        """The current UIV+ keys ``J | S`` (64 bytes)."""
        return self._uiv.key

    # --- relay side (UIV+ encryption) ---

    def _relay_forward(self, cmd: int, body: bytes) -> tuple[bytes, bytes | None]:
        uiv = self._uiv
        out = uiv._enc(self.tprime, cmd, body)
        t = self.tprime = out[:16]
        if bytes_eq(t, self.nonce):
            self.nonce = uiv._update(self.nonce)
            return out, body[:16]
        return out, None

    def _relay_backward(self, cmd: int, body: bytes) -> bytes:
        out = self._uiv._enc(self.tprime, cmd, body)
        self.tprime = out[:16]
        return out

    def _relay_originate(self, cmd: int, body: bytes) -> tuple[bytes, bytes]:
        uiv = self._uiv
        out = uiv._enc(self.tprime, cmd, self.nonce + body[16:])
        t = self.tprime = out[:16]
        self.nonce = uiv._update(t)
        return out, t

    # --- client side (UIV+ decryption) ---

    def _client_forward(self, cmd: int, body: bytes) -> bytes:
        out = self._uiv._dec(self.tprime, cmd, body)
        self.tprime = body[:16]
        return out

    def _client_originate(self, cmd: int, body: bytes) -> tuple[bytes, bytes]:
        nonce = self.nonce
        uiv = self._uiv
        out = uiv._dec(self.tprime, cmd, nonce + body[16:])
        self.tprime = nonce
        self.nonce = uiv._update(nonce)
        return out, out[:16]

    def _client_backward(self, cmd: int, body: bytes) -> tuple[bytes, bytes | None]:
        t = body[:16]
        uiv = self._uiv
        out = uiv._dec(self.tprime, cmd, body)
        self.tprime = t
        if bytes_eq(out[:16], self.nonce):
            self.nonce = uiv._update(t)
            return out, t
        return out, None


def split_key_material(key_material: bytes) -> tuple[bytes, bytes]:
    """Split 160 bytes of handshake output into ``(forward 80, backward 80)``."""
    if not isinstance(key_material, (bytes, bytearray, memoryview)) or len(key_material) != KEY_MATERIAL_LEN:
        raise LocalProtocolError(f"CGO key material must be {KEY_MATERIAL_LEN} bytes")
    km = bytes(key_material)
    return km[:DIR_KEY_LEN], km[DIR_KEY_LEN:]


class _Hop:
    __slots__ = ("fwd", "bwd", "fwd_tag", "bwd_tag")

    def __init__(self, key_material: bytes, relay: bool) -> None:
        fwd, bwd = split_key_material(key_material)
        self.fwd = CgoCrypt(fwd, relay=relay)
        self.bwd = CgoCrypt(bwd, relay=relay)
        self.fwd_tag: bytes | None = None
        self.bwd_tag: bytes | None = None


class ClientCrypto:
    """The client's CGO crypto for one circuit: one layer per hop, hop 0 = guard.

    Same roles as :class:`onionp2p.proto.relaycrypto.ClientCrypto`; every cell
    operation also takes the cell command (``CELL_RELAY`` or ``CELL_RELAY_EARLY``),
    which is part of the tweak.
    """

    __slots__ = ("_hops",)

    def __init__(self) -> None:
        self._hops: list[_Hop] = []

    def add_hop(self, key_material: bytes) -> None:
        """Append a hop from its 160 bytes of key material (forward 80 | backward 80)."""
        self._hops.append(_Hop(key_material, relay=False))

    def truncate(self, n_hops: int) -> None:
        """Forget every hop past the first ``n_hops`` (after a TRUNCATED)."""
        if not 0 <= n_hops <= len(self._hops):
            raise LocalProtocolError(f"cannot truncate {len(self._hops)} hops to {n_hops}")
        del self._hops[n_hops:]

    @property
    def n_hops(self) -> int:
        """Number of hops with established keys."""
        return len(self._hops)

    def _hop(self, hop: int) -> _Hop:
        if not isinstance(hop, int) or not 0 <= hop < len(self._hops):
            raise LocalProtocolError(f"no hop {hop!r} (circuit has {len(self._hops)})")
        return self._hops[hop]

    def originate(self, body: bytes, hop: int, *, cmd: int) -> tuple[bytes, bytes]:
        """Encrypt ``body`` for ``hop``; return ``(cipher, tag16)``.

        Bytes 0..15 of ``body`` are ignored: the hop's nonce goes there.
        """
        target = self._hop(hop)
        body = _check_body(body, local=True)
        _check_cmd(cmd)
        data, tag = target.fwd._client_originate(cmd, body)
        target.fwd_tag = tag
        hops = self._hops
        for i in range(hop - 1, -1, -1):
            data = hops[i].fwd._client_forward(cmd, data)
        return data, tag

    def decrypt_inbound(self, body: bytes, *, cmd: int) -> tuple[int, bytes, bytes]:
        """Peel backward layers until a hop recognizes the cell: ``(hop, plaintext, tag16)``.

        The plaintext is the whole 509-byte body (the message starts at offset 16).
        Raises :class:`DigestMismatch` if no hop recognizes it; the circuit must then be
        closed (every hop's ``T'`` has moved).
        """
        body = _check_body(body, local=False)
        _check_cmd(cmd)
        if not self._hops:
            raise LocalProtocolError("circuit has no hops")
        data = body
        for index, h in enumerate(self._hops):
            data, tag = h.bwd._client_backward(cmd, data)
            if tag is not None:
                h.bwd_tag = tag
                return index, data, tag
        raise DigestMismatch("inbound relay cell not recognized by any hop")

    def decrypt_inbound_many(self, bodies: list, *, cmd: int) -> list[tuple[int, bytes, bytes]]:
        """:meth:`decrypt_inbound` over consecutive cells, in order.

        If some cell is recognized by no hop, :class:`DigestMismatch` is raised with
        ``partial`` = the results of the cells before it.
        """
        out: list[tuple[int, bytes, bytes]] = []
        for body in bodies:
            try:
                out.append(self.decrypt_inbound(body, cmd=cmd))
            except DigestMismatch as exc:
                exc.partial = out  # type: ignore[attr-defined]
                raise
        return out

    def forward_tag(self, hop: int) -> bytes | None:
        """Tag of the last cell originated toward ``hop`` (None before the first)."""
        return self._hop(hop).fwd_tag

    def backward_tag(self, hop: int) -> bytes | None:
        """Tag of the last cell recognized from ``hop`` (None before the first)."""
        return self._hop(hop).bwd_tag


class RelayCrypto:
    """A relay's CGO crypto for one circuit (its single layer).

    Same roles as :class:`onionp2p.proto.relaycrypto.RelayCrypto`. There is no
    ``recognize_forward``: with CGO, recognition is the last step of the one UIV+ pass
    that :meth:`decrypt_forward` makes (a relay *encrypts* with UIV+ in both directions;
    the method names keep tor1's roles).
    """

    __slots__ = ("_hop", "backward_relay")

    def __init__(self, key_material: bytes) -> None:
        self._hop = _Hop(key_material, relay=True)
        #: :meth:`encrypt_backward` of a RELAY cell's body, for a caller that framed the
        #: cell itself (509 bytes: the backend checks the length, not the type of error):
        #: with the native backend one C call per cell, nothing in Python between
        bwd = self._hop.bwd
        self.backward_relay: Callable[[Any], bytes] = (
            partial(self.encrypt_backward, cmd=CELL_RELAY) if isinstance(bwd, PureCgoCrypt)
            else partial(bwd._relay_backward, CELL_RELAY))

    def decrypt_forward(self, body: bytes, *, cmd: int) -> tuple[bool, bytes, bytes | None]:
        """Process a cell from the client: ``(recognized, body, tag16 or None)``.

        An unrecognized body is to be passed to the next hop unchanged.
        """
        body = _check_body(body, local=False)
        _check_cmd(cmd)
        out, tag = self._hop.fwd._relay_forward(cmd, body)
        if tag is None:
            return False, out, None
        self._hop.fwd_tag = tag
        return True, out, tag

    def decrypt_forward_many(self, bodies: list, *, cmd: int) -> list[tuple[bool, bytes, bytes | None]]:
        """:meth:`decrypt_forward` over a batch of cells with the same command, in order."""
        return [self.decrypt_forward(body, cmd=cmd) for body in bodies]

    def encrypt_backward(self, body: bytes, *, cmd: int) -> bytes:
        """Add our layer to a cell coming from a later hop."""
        body = _check_body(body, local=False)
        _check_cmd(cmd)
        return self._hop.bwd._relay_backward(cmd, body)

    def encrypt_backward_many(self, bodies: list, *, cmd: int) -> list[bytes]:
        """:meth:`encrypt_backward` over a batch of cells with the same command, in order."""
        return [self.encrypt_backward(body, cmd=cmd) for body in bodies]

    def originate_backward(self, body: bytes, *, cmd: int) -> tuple[bytes, bytes]:
        """Encrypt a cell of our own toward the client: ``(cipher, tag16)``.

        Bytes 0..15 of ``body`` are ignored: our backward nonce goes there.
        """
        body = _check_body(body, local=True)
        _check_cmd(cmd)
        out, tag = self._hop.bwd._relay_originate(cmd, body)
        self._hop.bwd_tag = tag
        return out, tag

    @property
    def forward_tag(self) -> bytes | None:
        """Tag of the last forward cell we recognized (None before the first)."""
        return self._hop.fwd_tag

    @property
    def backward_tag(self) -> bytes | None:
        """Tag of the last cell we originated toward the client (None before the first)."""
        return self._hop.bwd_tag


# --------------------------------------------------------------------------------------
# The native backend: onionp2p/proto/_cgo_native.c (an optional extension, specs/cgo.md §8a).
#
# When it is built and passes the self-test below, CgoCrypt, UIV, ET and PRF are the native
# classes: one C call per cell per layer, keys, N and T' in a C object, rekeys in C. Otherwise
# (not built, libcrypto missing, self-test failure, or ONIONP2P_CGO_BACKEND=python) they are
# the pure-Python classes above, with one RuntimeWarning unless the pure path was asked for.
# CGO_BACKEND says which runs.

#: the environment variable that picks the backend: ``auto`` (default), ``native`` or ``python``
CGO_BACKEND_ENV = "ONIONP2P_CGO_BACKEND"


def _import_native() -> tuple[Any, str]:
    """The ``_cgo_native`` module, or None and why it cannot be used."""
    try:
        from onionp2p.proto import _cgo_native  # noqa: PLC0415 (optional, compiled)
    except ImportError as exc:  # not built (no compiler / headers at install time) or libcrypto missing
        return None, f"extension not importable: {exc}"
    failure = _native_self_test(_cgo_native)
    if failure is not None:
        return None, f"self-test failed: {failure}"
    return _cgo_native, f"native (POLYVAL {_cgo_native.polyval_impl()}, {_cgo_native.OPENSSL_VERSION})"


def _native_self_test(mod: Any) -> str | None:
    """Why ``mod`` must not be used (None: it computes what the pure classes compute).

    RFC 8452 POLYVAL vectors, then every cell operation of both sides against
    :class:`PureCgoCrypt`: per direction, cells that the far end recognizes (so both ends
    rekey) and cells that it passes on, comparing outputs, tags, keys, ``N`` and ``T'``.
    """
    try:
        for key, data, expect in _SELF_TEST_VECTORS:
            got = mod.polyval(bytes.fromhex(key), bytes.fromhex(data))
            if got.hex() != expect:
                return f"POLYVAL RFC 8452 vector: got {got.hex()}, want {expect}"
        stream = shake_128(b"onionp2p cgo native self-test").digest(2 * DIR_KEY_LEN + RELAY_BODY_LEN)
        body = stream[2 * DIR_KEY_LEN:]
        # (direction's key material, [(side, op)]): a "*" op's output is the next op's input
        plans = ((stream[:DIR_KEY_LEN], (("c", "client_originate*"), ("r", "relay_forward"),
                                          ("c", "client_originate*"), ("r", "relay_forward"),
                                          ("r", "relay_forward"), ("c", "client_forward"))),
                 (stream[DIR_KEY_LEN:2 * DIR_KEY_LEN], (("r", "relay_originate*"), ("c", "client_backward"),
                                                        ("r", "relay_originate*"), ("c", "client_backward"),
                                                        ("r", "relay_backward"), ("c", "client_backward"))))
        for km, plan in plans:
            ends = {side: (PureCgoCrypt(km, relay=side == "r"), mod.Crypt(km, relay=side == "r"))
                    for side in "cr"}
            data = body
            for n, (side, op) in enumerate(plan):
                pure, native = ends[side]
                name = op.rstrip("*")
                want = getattr(pure, "_" + name)(CELL_RELAY, data)
                got = getattr(native, name)(CELL_RELAY, data)
                if want != got or (pure.key, pure.nonce, pure.tprime) != (native.key, native.nonce,
                                                                           native.tprime):
                    return f"{name} differs from the reference (step {n})"
                if op.endswith("*"):
                    data = want[0]
                elif n in (1, 3) and want[1] is None:  # the cells just originated
                    return f"{name}: a cell for this hop was not recognized (step {n})"
                else:
                    data = body
    except Exception as exc:  # a broken build: wrong arity, types
        return f"binding error: {exc!r}"
    return None


def _select_backend() -> tuple[Any, str]:
    choice = os.environ.get(CGO_BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "native", "python"):
        raise ImportError(f"{CGO_BACKEND_ENV}={choice!r}: must be auto, native or python")
    if choice == "python":
        return None, f"python ({CGO_BACKEND_ENV}=python)"
    mod, note = _import_native()
    if mod is None:
        if choice == "native":
            raise ImportError(f"{CGO_BACKEND_ENV}=native but the native CGO backend is unusable: {note}")
        warnings.warn(f"onionp2p CGO: native backend unavailable ({note}); using pure Python "
                      "(correct, about ten times slower per cell)", RuntimeWarning, stacklevel=3)
        return None, f"python ({note})"
    return mod, note


_native, CGO_BACKEND = _select_backend()
#: which CGO runs: ``native (POLYVAL clmul|portable, OpenSSL ...)`` or ``python (why)``
CGO_BACKEND: str


if _native is not None:
    _NativeCrypt: type = _native.Crypt

    class NativeCgoCrypt(_CgoCryptApi, _NativeCrypt):  # type: ignore[misc,valid-type]
        """:class:`PureCgoCrypt` in C (``_cgo_native.Crypt``): same constructor, attributes
        (``key``, ``nonce``, ``tprime``, ``relay``) and methods; the ``_``-prefixed forms
        are the C methods themselves (one C call per cell)."""

        __slots__ = ()

        def __init__(self, key_material: bytes, *, relay: bool, tprime: bytes = _ZERO16) -> None:
            _check_len(key_material, DIR_KEY_LEN, "CGO key material for one direction")
            _check_len(tprime, TAG_LEN, "T'")
            super().__init__(key_material, relay=bool(relay), tprime=tprime)

        _relay_forward = _NativeCrypt.relay_forward
        _relay_backward = _NativeCrypt.relay_backward
        _relay_originate = _NativeCrypt.relay_originate
        _client_forward = _NativeCrypt.client_forward
        _client_originate = _NativeCrypt.client_originate
        _client_backward = _NativeCrypt.client_backward

    class NativeUIV(_UivApi):
        """:class:`PureUIV` in C (a ``_cgo_native.Crypt`` used for its raw UIV+ calls)."""

        __slots__ = ("_c", "encrypting", "_enc", "_dec", "_update")

        def __init__(self, key: bytes, *, encrypt: bool) -> None:
            _check_len(key, UIV_KEY_LEN, "UIV key")
            self.encrypting = encrypt
            c = self._c = _NativeCrypt(bytes(key) + _ZERO16, relay=bool(encrypt))
            self._enc, self._dec, self._update = c.uiv_enc, c.uiv_dec, c.uiv_update

        @property
        def key(self) -> bytes:
            """The current ``J | S`` (64 bytes)."""
            return self._c.key

    class NativeET(_EtApi):
        """:class:`PureET` in C (for the ET vectors; CGO cells use ET inside the C UIV+)."""

        __slots__ = ("_c", "encrypting")

        def __init__(self, key: bytes, *, encrypt: bool) -> None:
            _check_len(key, ET_KEY_LEN, "ET key")
            self.encrypting = encrypt
            self._c = _NativeCrypt(bytes(key) + bytes(DIR_KEY_LEN - ET_KEY_LEN), relay=bool(encrypt))

        def _run(self, h: bytes, cmd: int, x_r: bytes, block: bytes) -> bytes:
            return self._c.et(h, cmd, x_r, block)

    class NativePRF(_PrfApi):
        """:class:`PurePRF` in C (for the PRF vectors; CGO cells use it inside the C UIV+)."""

        __slots__ = ("_c",)

        def __init__(self, key: bytes) -> None:
            _check_len(key, PRF_KEY_LEN, "PRF key")
            self._c = _NativeCrypt(bytes(ET_KEY_LEN) + bytes(key) + _ZERO16, relay=True)

        def _stream(self, tweak: bytes, first: int, count: int) -> bytes:
            return self._c.prf(tweak, first, count)

#: the classes in use (native when built and self-tested; :data:`CGO_BACKEND`)
CgoCrypt: type[_CgoCryptApi]
UIV: type[_UivApi]
ET: type[_EtApi]
PRF: type[_PrfApi]
if _native is not None:
    CgoCrypt, UIV, ET, PRF = NativeCgoCrypt, NativeUIV, NativeET, NativePRF
else:
    CgoCrypt, UIV, ET, PRF = PureCgoCrypt, PureUIV, PureET, PurePRF
