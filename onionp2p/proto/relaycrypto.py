"""tor1 relay cell crypto: layered AES-128-CTR plus running SHA-1 digests (sans-IO).

Theory of operation
-------------------
(tor-spec §6.1 "Relay cells", §5.2.2 key split, §5.5 "Routing relay cells";
``specs/relaycrypto.md``.)

Every hop of a circuit shares 72 bytes of key material with the client, split as
``Df[20] | Db[20] | Kf[16] | Kb[16]``. For each direction there is

* an AES-128-CTR keystream (key ``Kf`` forward / ``Kb`` backward, IV all zero),
  created once and never reset: it runs across every cell of the circuit, and
* a running SHA-1 context seeded with ``Df`` / ``Db``, into which every cell that
  hop originates or recognizes is fed (all 509 bytes, Digest field zeroed).

The 509-byte relay cell body is ``Cmd u8 | Recognized u16 | StreamID u16 |
Digest[4] | Len u16 | Data[498]``. To *originate*, the sender zeroes Recognized and
Digest, feeds the body into its running digest, writes the first 4 bytes of the
digest into the Digest field and encrypts. The client wraps one layer per hop,
innermost (the target hop) first; each relay strips one forward layer and looks
at the result: if Recognized is zero *and* the digest matches, the cell is for
it; otherwise it is passed on. A zero Recognized field by chance (p = 2^-16) is
resolved by the digest check, which is done on a *copy* of the running context so
that a false positive leaves the state untouched. Backward, each relay adds one
layer with ``Kb`` and the client peels layers hop 0, 1, ... until one recognizes.

Every call that returns a digest returns the full 20-byte running digest *after*
the cell: authenticated SENDMEs (prop 289) echo it.

A CTR keystream is stateful, so a cell that fails recognition has still consumed
keystream at every hop that touched it; tor closes the circuit in that case and so
must our callers. The objects here are the per-cell hot path: cipher and hash
contexts are created once, cells are handled with ``update()`` only.

The onion-service end-to-end layer (rend-spec-v3 §4.2.1, tor's "virtual hop") is the same
construction with other parameters: :data:`HS_E2E` takes 128 bytes ``Df[32] | Db[32] |
Kf[32] | Kb[32]`` from the hs-ntor key expansion, runs SHA3-256 digests and AES-256-CTR.
A :class:`HopVariant` names those parameters; every loop here serves both. The Digest
field stays 4 bytes, and the running digest that SENDMEs echo is cut to 20 bytes as
tor's ``relay_crypto_record_sendme_digest`` does (``DIGEST_LEN``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from hmac import compare_digest as bytes_eq  # constant time, like cryptography's bytes_eq

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from onionp2p.errors import DigestMismatch, LocalProtocolError, ProtocolError

__all__ = [
    "RELAY_BODY_LEN",
    "KEY_MATERIAL_LEN",
    "HS_KEY_MATERIAL_LEN",
    "DIGEST_LEN",
    "HopVariant",
    "TOR1",
    "HS_E2E",
    "ClientCrypto",
    "RelayCrypto",
    "Tor1Hop",
    "split_key_material",
]

RELAY_BODY_LEN = 509
KEY_MATERIAL_LEN = 72  # Df 20 | Db 20 | Kf 16 | Kb 16
HS_KEY_MATERIAL_LEN = 128  # Df 32 | Db 32 | Kf 32 | Kb 32 (rend-spec-v3 §4.2.1)
DIGEST_LEN = 20
_ZERO_IV = bytes(16)
_ZERO4 = b"\0\0\0\0"


def _sha1(seed: bytes):  # -> hashlib sha1 object
    # hashlib's SHA-1 (OpenSSL) gives the same digests as cryptography's, and its copy(),
    # update() and digest() cost about half as much per cell; digest() does not finalize.
    return hashlib.sha1(seed, usedforsecurity=False)


def _sha3_256(seed: bytes):  # -> hashlib sha3_256 object
    return hashlib.sha3_256(seed)


@dataclass(frozen=True, slots=True)
class HopVariant:
    """The parameters of one kind of tor1-style layer: the running digest's constructor
    and the lengths of its seed and of the AES key (key material = 2 seeds + 2 keys)."""

    name: str
    digest: Callable[[bytes], object]
    seed_len: int
    key_len: int

    @property
    def key_material_len(self) -> int:
        return 2 * (self.seed_len + self.key_len)


#: tor-spec §5.2.2: SHA-1 digests, AES-128-CTR
TOR1 = HopVariant("tor1", _sha1, 20, 16)
#: rend-spec-v3 §4.2.1: the end-to-end layer between an onion service and its client
HS_E2E = HopVariant("hs", _sha3_256, 32, 32)


def split_key_material(key_material: bytes, variant: HopVariant = TOR1) -> tuple[bytes, bytes, bytes, bytes]:
    """Split handshake output into ``(Df, Db, Kf, Kb)`` (72 bytes for tor1, 128 for HS_E2E)."""
    n = variant.key_material_len
    if not isinstance(key_material, (bytes, bytearray, memoryview)) or len(key_material) != n:
        raise LocalProtocolError(f"key material must be {n} bytes")
    km = bytes(key_material)
    d, k = variant.seed_len, variant.key_len
    return km[0:d], km[d:2 * d], km[2 * d:2 * d + k], km[2 * d + k:]


def _ctr(key: bytes):  # -> CipherContext
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()


def _check_body(body: bytes) -> None:
    if len(body) != RELAY_BODY_LEN:
        raise ProtocolError(f"relay cell body must be {RELAY_BODY_LEN} bytes, got {len(body)}")


def _stamp(digest, body: bytes) -> tuple[bytearray, bytes]:
    """Zero Recognized/Digest, hash the body into ``digest``, write the 4-byte digest.

    Returns the stamped body and the full 20-byte running digest.
    """
    if len(body) != RELAY_BODY_LEN:
        raise LocalProtocolError(f"relay cell body must be {RELAY_BODY_LEN} bytes, got {len(body)}")
    buf = bytearray(body)
    # Index stores are much cheaper than slice assignment on the hot path.
    buf[1] = buf[2] = buf[5] = buf[6] = buf[7] = buf[8] = 0
    digest.update(buf)
    full = digest.digest()[:DIGEST_LEN]  # (a no-op slice for SHA-1)
    buf[5:9] = full[:4]
    return buf, full


def _recognize(digest, plain: bytes):
    """Tentatively hash ``plain`` (Digest field zeroed) on a copy of ``digest``.

    Returns ``(advanced copy, its 20-byte digest)`` if the cell is recognized, else
    ``None``; the caller's context is untouched either way.
    """
    if plain[1] or plain[2]:
        return None
    buf = bytearray(plain)
    buf[5] = buf[6] = buf[7] = buf[8] = 0
    trial = digest.copy()
    trial.update(buf)
    full = trial.digest()[:DIGEST_LEN]
    if bytes_eq(full[:4], bytes(plain[5:9])):
        return trial, full
    return None


class Tor1Hop:
    """Crypto state shared by one hop with the client (also one layer of a circuit whose
    other hops use other relay crypto: see :mod:`onionp2p.proto.hopcrypto`). ``variant``
    HS_E2E makes it the onion-service end-to-end layer."""

    __slots__ = ("fwd_digest", "bwd_digest", "fwd_cipher", "bwd_cipher", "variant")

    def __init__(self, key_material: bytes, variant: HopVariant = TOR1) -> None:
        df, db, kf, kb = split_key_material(key_material, variant)
        self.variant = variant
        self.fwd_digest = variant.digest(df)
        self.bwd_digest = variant.digest(db)
        self.fwd_cipher = _ctr(kf)
        self.bwd_cipher = _ctr(kb)

    def originate(self, body: bytes) -> tuple[bytes, bytes]:
        """Client: stamp ``body`` for this hop and add its layer: ``(cipher, digest20)``."""
        buf, full = _stamp(self.fwd_digest, body)
        return self.fwd_cipher.update(buf), full

    def peel(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Client: remove this hop's backward layer: ``(plain, digest20 if it is this hop's
        cell, else None)``."""
        data = self.bwd_cipher.update(data)
        found = _recognize(self.bwd_digest, data)
        if found is None:
            return data, None
        self.bwd_digest = found[0]
        return data, found[1]


_Hop = Tor1Hop


class ClientCrypto:
    """The client's crypto for one circuit: one layer per hop, hop 0 = guard."""

    __slots__ = ("_hops",)

    def __init__(self) -> None:
        self._hops: list[_Hop] = []

    def add_hop(self, key_material: bytes, variant: HopVariant = TOR1) -> None:
        """Append a hop from its key material ``Df|Db|Kf|Kb`` (72 bytes; 128 for HS_E2E)."""
        self._hops.append(_Hop(key_material, variant))

    def hop_states(self) -> list[Tor1Hop]:
        """The hops' states, hop 0 first (to carry them into a circuit that mixes relay
        crypto; this object must not be used after that)."""
        return list(self._hops)

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

    def originate(self, body: bytes, hop: int, cmd: int | None = None) -> tuple[bytes, bytes]:
        """Stamp ``body`` for ``hop`` and onion-encrypt it; return ``(cipher, digest20)``.

        Recognized and Digest are zeroed here whatever the caller put in them. ``cmd`` (the
        cell command) plays no part in tor1; it is taken as CGO's crypto takes it.
        """
        hops = self._hops
        buf, full = _stamp(self._hop(hop).fwd_digest, body)
        data: bytes = hops[hop].fwd_cipher.update(buf)
        for i in range(hop - 1, -1, -1):
            data = hops[i].fwd_cipher.update(data)
        return data, full

    def decrypt_inbound(self, body: bytes) -> tuple[int, bytes, bytes]:
        """Peel backward layers until a hop recognizes the cell.

        Returns ``(hop, plaintext, digest20)``. Raises :class:`DigestMismatch` if no
        hop recognizes it (the circuit must then be closed: keystreams have moved).
        """
        _check_body(body)
        if not self._hops:
            raise LocalProtocolError("circuit has no hops")
        data = body
        for index, h in enumerate(self._hops):
            data = h.bwd_cipher.update(data)
            found = _recognize(h.bwd_digest, data)
            if found is not None:
                h.bwd_digest = found[0]
                return index, data, found[1]
        raise DigestMismatch("inbound relay cell not recognized by any hop")

    def decrypt_inbound_many(self, bodies: list) -> list[tuple[int, bytes, bytes]]:
        """:meth:`decrypt_inbound` over consecutive cells of this circuit, in order.

        Each hop's AES-CTR layer is removed from all the cells that reach it in one call
        (the keystream runs across cells, so one call over the concatenation gives the
        same bytes as one call per cell). A cell a hop recognizes leaves the batch there,
        exactly as in the one-cell path. If some cell is recognized by no hop,
        :class:`DigestMismatch` is raised with ``partial`` = the results of the cells
        before it (the circuit must then be closed).
        """
        hops = self._hops
        if not hops:
            raise LocalProtocolError("circuit has no hops")
        n = len(bodies)
        for b in bodies:
            if len(b) != RELAY_BODY_LEN:
                raise ProtocolError(f"relay cell body must be {RELAY_BODY_LEN} bytes, got {len(b)}")
        results: list = [None] * n
        idx = list(range(n))
        block = b"".join(bodies)
        for hop_i, h in enumerate(hops):
            plain = h.bwd_cipher.update(block)
            keep: list[int] = []
            digest = h.bwd_digest
            for j in range(len(idx)):
                off = j * RELAY_BODY_LEN
                if plain[off + 1] == 0 and plain[off + 2] == 0:
                    # _recognize, inlined: hash with Digest zeroed on a copy of the state
                    cell = plain[off:off + RELAY_BODY_LEN]
                    buf = bytearray(cell)
                    buf[5] = buf[6] = buf[7] = buf[8] = 0
                    trial = digest.copy()
                    trial.update(buf)
                    full = trial.digest()[:DIGEST_LEN]
                    if bytes_eq(full[:4], cell[5:9]):
                        digest = trial
                        results[idx[j]] = (hop_i, cell, full)
                        continue
                keep.append(j)
            h.bwd_digest = digest
            if not keep:
                idx = []
                break
            if len(keep) != len(idx):
                mv = memoryview(plain)
                block = b"".join([mv[j * RELAY_BODY_LEN:(j + 1) * RELAY_BODY_LEN] for j in keep])
                idx = [idx[j] for j in keep]
            else:
                block = plain
        if idx:
            exc = DigestMismatch("inbound relay cell not recognized by any hop")
            exc.partial = results[:idx[0]]  # type: ignore[attr-defined]
            raise exc
        return results

    def forward_digest(self, hop: int) -> bytes:
        """Current 20-byte forward running digest of ``hop``."""
        return self._hop(hop).fwd_digest.digest()[:DIGEST_LEN]

    def backward_digest(self, hop: int) -> bytes:
        """Current 20-byte backward running digest of ``hop``."""
        return self._hop(hop).bwd_digest.digest()[:DIGEST_LEN]


class RelayCrypto:
    """A relay's crypto for one circuit (its single layer).

    ``fwd_update`` / ``bwd_update`` are the AES-CTR ``update`` of the forward / backward
    keystream: the circuit's hot loops call them directly on cells that pass through.
    """

    __slots__ = ("_hop", "fwd_update", "bwd_update")
    kind = "tor1"

    def __init__(self, key_material: bytes) -> None:
        self._hop = _Hop(key_material)
        self.fwd_update = self._hop.fwd_cipher.update
        self.bwd_update = self._hop.bwd_cipher.update

    def decrypt_forward(self, body: bytes) -> tuple[bool, bytes, bytes | None]:
        """Strip our forward layer; return ``(recognized, body, digest20 or None)``.

        An unrecognized body is to be passed to the next hop unchanged.
        """
        _check_body(body)
        plain = self.fwd_update(body)
        found = _recognize(self._hop.fwd_digest, plain)
        if found is None:
            return False, plain, None
        self._hop.fwd_digest = found[0]
        return True, plain, found[1]

    def recognize_forward(self, plain: bytes) -> bytes | None:
        """The digest check of :meth:`decrypt_forward` on an already decrypted body.

        Returns the 20-byte running digest (and advances it) if the cell is ours, else
        None (and the running digest is unchanged).
        """
        found = _recognize(self._hop.fwd_digest, plain)
        if found is None:
            return None
        self._hop.fwd_digest = found[0]
        return found[1]

    def decrypt_forward_many(self, bodies: list[bytes]) -> list[tuple[bool, bytes, bytes | None]]:
        """:meth:`decrypt_forward` over a batch of cells, in order."""
        upd = self.fwd_update
        out = []
        for body in bodies:
            _check_body(body)
            plain = upd(body)
            if plain[1] or plain[2]:
                out.append((False, plain, None))
                continue
            digest = self.recognize_forward(plain)
            out.append((digest is not None, plain, digest))
        return out

    def encrypt_backward(self, body: bytes) -> bytes:
        """Add our backward layer to a cell coming from a later hop."""
        _check_body(body)
        return self.bwd_update(body)

    def encrypt_backward_many(self, bodies: list[bytes]) -> list[bytes]:
        """:meth:`encrypt_backward` over a batch of cells, in order."""
        upd = self.bwd_update
        out = []
        for body in bodies:
            _check_body(body)
            out.append(upd(body))
        return out

    def originate_backward(self, body: bytes) -> tuple[bytes, bytes]:
        """Stamp ``body`` with our backward digest and encrypt it; return ``(cipher, digest20)``."""
        buf, full = _stamp(self._hop.bwd_digest, body)
        return self.bwd_update(buf), full

    def originate_backward_many(self, bodies: list, *,
                                consume: bool = False) -> tuple[list[bytes], list[bytes]]:
        """:meth:`originate_backward` over a batch: ``([cipher...], [digest20...])``.

        Every body is stamped in turn (its digest depends on all earlier ones), then the
        batch is encrypted in order. With ``consume`` the bodies must be bytearrays
        the caller gives up: they are stamped in place instead of copied.
        """
        h = self._hop.bwd_digest
        upd = h.update
        dig = h.digest
        enc = self.bwd_update
        cts = []
        digests = []
        for body in bodies:
            if len(body) != RELAY_BODY_LEN:
                raise LocalProtocolError(f"relay cell body must be {RELAY_BODY_LEN} bytes, got {len(body)}")
            buf = body if consume else bytearray(body)
            buf[1] = buf[2] = buf[5] = buf[6] = buf[7] = buf[8] = 0
            upd(buf)
            full = dig()[:DIGEST_LEN]
            buf[5:9] = full[:4]
            cts.append(enc(buf))
            digests.append(full)
        return cts, digests

    @property
    def forward_digest(self) -> bytes:
        """Current 20-byte forward running digest (of cells recognized so far)."""
        return self._hop.fwd_digest.digest()

    @property
    def backward_digest(self) -> bytes:
        """Current 20-byte backward running digest (of cells originated so far)."""
        return self._hop.bwd_digest.digest()
