"""Relay crypto per hop: circuits on which tor1 and CGO hops sit side by side. Pure.

Each hop of a circuit negotiates its own relay crypto (``onionp2p.proto.create``): tor1
(AES-CTR with running SHA-1 digests, :mod:`onionp2p.proto.relaycrypto`) or Counter
Galois Onion (proposal 359, :mod:`onionp2p.proto.cgo`). Each layer turns the 509-byte
cell body into another, so layers of both kinds stack: the client originates a cell for
hop *k* with hop *k*'s crypto (which also says the message format: v0 for tor1, v1 for
CGO), then adds the forward layers of hops *k-1* .. 0, each with its own crypto; inbound
it peels hop 0, 1, ... until one recognizes the cell. CGO's layers take the cell command
(RELAY or RELAY_EARLY) into their tweak; tor1 ignores it.

A circuit whose hops all use tor1 keeps :class:`onionp2p.proto.relaycrypto.ClientCrypto`
(its batched fast path); the client core switches to :class:`MixedClientCrypto` when a
CGO hop is added. A relay's single layer is either a tor1 ``RelayCrypto`` or
:class:`CgoRelayCrypto`, which gives CGO the same calls (for the circuit core's loops).
"""

from __future__ import annotations

from functools import partial

from onionp2p.errors import DigestMismatch, LocalProtocolError, ProtocolError
from onionp2p.proto import cgo
from onionp2p.proto.cells import CellCommand
from onionp2p.proto.relaycell import V1_DATA_OFFSET, V1_TAG_LEN, RelayCommand
from onionp2p.proto.relaycrypto import HS_E2E, RELAY_BODY_LEN, ClientCrypto, Tor1Hop

__all__ = ["MixedClientCrypto", "CgoRelayCrypto", "CgoHop"]

_RELAY = int(CellCommand.RELAY)
#: what _cgo_native.client_backward_runs needs of the v1 message format to gather DATA runs
_V1_DATA_LAYOUT = (V1_TAG_LEN, V1_DATA_OFFSET, int(RelayCommand.DATA))


class CgoHop:
    """The client's CGO state for one hop: a forward and a backward :class:`cgo.CgoCrypt`.

    ``originate(cmd, body)`` -> ``(cipher, tag16)`` starts a cell for this hop (bytes
    0..15 of ``body`` are replaced); ``forward(cmd, data)`` adds this hop's forward layer
    to a cell for a later hop; ``peel(cmd, data)`` -> ``(body, tag16 or None)`` removes
    its backward layer (a tag when this hop sent the cell). They are the unchecked
    ``CgoCrypt`` methods themselves (no wrapper call per layer): :class:`MixedClientCrypto`
    checks each cell once, and its bodies are ``bytes`` of 509.
    """

    __slots__ = ("fwd", "bwd", "originate", "forward", "peel")

    def __init__(self, key_material: bytes) -> None:
        fwd, bwd = cgo.split_key_material(key_material)
        self.fwd = cgo.CgoCrypt(fwd, relay=False)
        self.bwd = cgo.CgoCrypt(bwd, relay=False)
        self.originate = self.fwd._client_originate
        self.forward = self.fwd._client_forward
        self.peel = self.bwd._client_backward


class MixedClientCrypto:
    """The client's crypto for a circuit with at least one CGO hop (any hop may be tor1).

    Same calls as the tor1 ``ClientCrypto`` that the circuit core uses; the "digest" a cell
    yields is the tor1 running digest (20 bytes) or the CGO tag (16 bytes) of its hop,
    which authenticated SENDMEs echo.
    """

    __slots__ = ("_hops", "_native_bwd", "decrypt_runs")

    def __init__(self, tor1: ClientCrypto | None = None) -> None:
        self._hops: list[Tor1Hop | CgoHop] = tor1.hop_states() if tor1 is not None else []
        #: every hop's backward CGO state when all hops are CGO in C: inbound runs of cells
        #: then take one C call for all their layers (``_cgo_native.client_backward_many``)
        self._native_bwd: tuple | None = None
        #: when every hop is CGO in C, ``decrypt_runs(data, start, count)``: the RELAY cells
        #: ``data[start + i * 514:]``, ``i < count``, peeled in one call up to a RELAY_EARLY
        #: cell or past one no hop recognizes -> ``(items, taken, unrecognized)``, items
        #: ``(hop, body, tag)`` per cell except that consecutive DATA messages from one hop
        #: for one stream come as one ``(hop, stream_id, data, tags, lengths)``
        #: (``_cgo_native.client_backward_runs``; it holds the hops, not this object)
        self.decrypt_runs = None

    def add_hop(self, key_material: bytes, relay_crypto: str = "tor1") -> None:
        """Append a hop: ``relay_crypto`` "tor1" (72 bytes of key material), "cgo" (160) or
        "hs" (128: the onion-service end-to-end layer, tor1 with SHA3-256 and AES-256)."""
        if relay_crypto == "cgo":
            self._hops.append(CgoHop(key_material))
        elif relay_crypto == "tor1":
            self._hops.append(Tor1Hop(key_material))
        elif relay_crypto == "hs":
            self._hops.append(Tor1Hop(key_material, HS_E2E))
        else:
            raise LocalProtocolError(f"unknown relay crypto {relay_crypto!r}")
        native = cgo._native
        self._native_bwd = (tuple(h.bwd for h in self._hops) if native is not None and all(
            type(h) is CgoHop and isinstance(h.bwd, native.Crypt) for h in self._hops) else None)
        self.decrypt_runs = (None if self._native_bwd is None else
                             partial(native.client_backward_runs, self._native_bwd, _RELAY, _V1_DATA_LAYOUT))

    def originate(self, body: bytes, hop: int, cmd: int = _RELAY) -> tuple[bytes, bytes]:
        """Encrypt ``body`` (already in ``hop``'s message format) for ``hop``, sent as cell
        command ``cmd``: ``(cipher, digest or tag)``."""
        hops = self._hops
        if not 0 <= hop < len(hops):
            raise LocalProtocolError(f"no hop {hop!r} (circuit has {len(hops)})")
        if len(body) != RELAY_BODY_LEN:
            raise LocalProtocolError(f"relay cell body must be {RELAY_BODY_LEN} bytes, got {len(body)}")
        target = hops[hop]
        if type(target) is CgoHop:
            if not isinstance(cmd, int) or not 0 <= cmd <= 255:
                raise LocalProtocolError(f"cell command must be 0..255, got {cmd!r}")
            data, digest = target.originate(cmd, bytes(body))
        else:
            data, digest = target.originate(body)
        for i in range(hop - 1, -1, -1):
            h = hops[i]
            data = h.forward(cmd, bytes(data)) if type(h) is CgoHop else h.fwd_cipher.update(data)
        return data, digest

    def decrypt_inbound(self, body: bytes) -> tuple[int, bytes, bytes]:
        """Peel hop 0, 1, ... until one recognizes the cell: ``(hop, body, digest or tag)``.
        Raises DigestMismatch if none does (the circuit must then be closed)."""
        if len(body) != RELAY_BODY_LEN:
            raise ProtocolError(f"relay cell body must be {RELAY_BODY_LEN} bytes, got {len(body)}")
        if not self._hops:
            raise LocalProtocolError("circuit has no hops")
        data = body
        for index, h in enumerate(self._hops):
            data, digest = h.peel(_RELAY, bytes(data)) if type(h) is CgoHop else h.peel(data)
            if digest is not None:
                return index, data, digest
        raise DigestMismatch("inbound relay cell not recognized by any hop")

    def decrypt_inbound_many(self, bodies: list) -> list[tuple[int, bytes, bytes]]:
        """:meth:`decrypt_inbound` over consecutive RELAY cells, in order; on a cell no hop
        recognizes, DigestMismatch with ``partial`` = the results before it."""
        if self._native_bwd is not None:  # all hops CGO in C: one call for the whole run
            out = cgo._native.client_backward_many(self._native_bwd, bodies, _RELAY)
            if len(out) < len(bodies):
                exc = DigestMismatch("inbound relay cell not recognized by any hop")
                exc.partial = out  # type: ignore[attr-defined]
                raise exc
            return out
        out = []
        for body in bodies:
            try:
                out.append(self.decrypt_inbound(body))
            except DigestMismatch as exc:
                exc.partial = out  # type: ignore[attr-defined]
                raise
        return out


class CgoRelayCrypto:
    """A relay's CGO layer for one circuit, with the calls the circuit core makes of a
    tor1 ``RelayCrypto`` (backward cells are always RELAY: RELAY_EARLY never goes toward
    the client). Forward cells need their command, so the core has a loop of its own for
    them (:meth:`decrypt_forward`)."""

    __slots__ = ("_c", "bwd_update")
    kind = "cgo"

    def __init__(self, key_material: bytes) -> None:
        self._c = cgo.RelayCrypto(key_material)
        #: add our layer to a cell from a later hop (the core frames the 509 bytes)
        self.bwd_update = self._c.backward_relay

    def decrypt_forward(self, body, cmd: int) -> tuple[bool, bytes, bytes | None]:
        """``(recognized, body, tag16 or None)``; an unrecognized body goes on unchanged."""
        return self._c.decrypt_forward(body, cmd=cmd)

    def originate_backward(self, body) -> tuple[bytes, bytes]:
        """A cell of ours toward the client (v1 format): ``(cipher, tag16)``."""
        return self._c.originate_backward(body, cmd=_RELAY)

    def originate_backward_many(self, bodies: list, *, consume: bool = False) -> tuple[list, list]:
        cts = []
        tags = []
        orig = self._c.originate_backward
        for body in bodies:
            ct, tag = orig(body, cmd=_RELAY)
            cts.append(ct)
            tags.append(tag)
        return cts, tags
