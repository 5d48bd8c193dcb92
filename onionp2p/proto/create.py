"""Adding a hop to a circuit: which handshake, with which extensions (tor-spec §5.1; prop 332). Pure.

A client picks the circuit handshake for each hop from what the relay advertises:
ntor-v3 (CREATE2 handshake type 3) where its proto line lists ``Relay=4``, ntor (type 2)
otherwise. ntor-v3 carries an encrypted, authenticated *client message* and a *server
message*, each a list of extensions (``N u8 | N × {type u8, len u8, body}``); the types
tor defines are CC_REQUEST (1, empty), CC_RESPONSE (2, ``sendme_inc u8``) and
SUBPROTO_REQUEST (3, ``{protocol u8, version u8}`` pairs). A relay answers every
extension it knows and ignores the others, as the spec says.

Congestion control (proposal 324) is negotiated here: a client asks with CC_REQUEST
(only of a hop that lists ``FlowCtrl=2``, and only where it will use it: see
:func:`wants_cc`); a relay running congestion control answers with CC_RESPONSE carrying
the SENDME increment it will use (the consensus's ``cc_sendme_inc``), and the hop then
runs Vegas both ways. The client refuses (the handshake fails) a CC_RESPONSE it did not
ask for, as tor 0.4.9.12 does, and an increment more than one away from its own.

Counter Galois Onion relay crypto (proposal 359) is negotiated here too, with
SUBPROTO_REQUEST ``{Relay, 6}`` (prop 346), of every hop that lists ``FlowCtrl=2``,
``Relay=5`` and ``Relay=6`` (see :func:`wants_cgo`). There is no answer: a relay that
accepts uses CGO and relay message format v1 on the hop, one that does not fails the
handshake. CGO needs congestion control on the same hop (format v1 has no stream
SENDMEs), so the client then sends CC_REQUEST to that hop as well, whatever its place on
the circuit, and both sides refuse CGO without it. A relay refuses a SUBPROTO_REQUEST
that is not sorted and free of duplicates, or that names anything but ``{Relay, 6}``, as
tor does.

:class:`HopHandshake` is the client side of one hop (the onion skin to send in CREATE2
or EXTEND2, then the reply), :func:`answer_create2` the relay side of a CREATE2; both give
a :class:`HopParams`: the key material (72 bytes for tor1, 160 for CGO) and what was
negotiated. Both sides also take the 20 bytes the handshake's KDF yields right after the
relay-crypto keys: ``kh`` (tor's ``rend_circ_nonce``), which binds an onion service's
ESTABLISH_INTRO to the circuit it arrives on (rend-spec-v3 §3.1.1).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from onionp2p.errors import HandshakeError, LocalProtocolError, ProtocolError
from onionp2p.proto import protover
from onionp2p.proto.cgo import KEY_MATERIAL_LEN as CGO_KEY_MATERIAL_LEN
from onionp2p.proto.congestion import CCParams
from onionp2p.proto.handshake import (
    HTYPE_NTOR,
    HTYPE_NTOR_V3,
    NtorClient,
    NtorV3Client,
    encode_extensions,
    ntor_server,
    ntor_v3_server,
    parse_extensions,
)
from onionp2p.proto.relaycrypto import KEY_MATERIAL_LEN as TOR1_KEY_MATERIAL_LEN

#: bytes of KH (tor's DIGEST_LEN rend_circ_nonce) after a hop's relay-crypto keys
KH_LEN = 20

__all__ = ["KH_LEN", "HopParams", "HopHandshake", "answer_create2", "answer_create_fast", "kdf_tor", "CREATE_FAST_LEN",
           "wants_cc", "wants_cgo", "EXT_CC_REQUEST",
           "EXT_CC_RESPONSE", "EXT_SUBPROTO_REQUEST", "SUBPROTO_CGO"]

EXT_CC_REQUEST = 1
EXT_CC_RESPONSE = 2
EXT_SUBPROTO_REQUEST = 3
#: the SUBPROTO_REQUEST entry asking for CGO: protocol Relay (tor's PRT_RELAY = 2), version 6
SUBPROTO_CGO = b"\x02\x06"

HANDSHAKE_NAMES = {HTYPE_NTOR: "ntor", HTYPE_NTOR_V3: "ntor-v3"}


@dataclass(frozen=True)
class HopParams:
    """What one hop's handshake agreed: key material for ``relay_crypto`` ("tor1": 72
    bytes, "cgo": 160 bytes, message format v1), the handshake's name, and the SENDME
    increment when congestion control was negotiated (None: fixed windows)."""

    key_material: bytes
    handshake: str  # "ntor" | "ntor-v3" | "create-fast"
    sendme_inc: int | None = None
    relay_crypto: str = "tor1"  # "tor1" | "cgo"
    #: the KDF's 20 bytes after the keys (tor's rend_circ_nonce; the KH of ESTABLISH_INTRO)
    kh: bytes = b""


def wants_cc(relay: Any, index: int, path_len: int, cc: CCParams | None) -> bool:
    """Should the client ask hop ``index`` of a ``path_len``-hop circuit for congestion
    control? As tor: only the last hop of a circuit that carries streams (two hops or
    more), only if it lists ``FlowCtrl=2`` (and so ntor-v3), and only if we run it."""
    return (cc is not None and cc.enabled and path_len >= 2 and index == path_len - 1
            and protover.supports(getattr(relay, "protocols", ""), "FlowCtrl", 2)
            and protover.supports(getattr(relay, "protocols", ""), "Relay", 4))


def wants_cgo(relay: Any, cc: CCParams | None, cgo: bool) -> bool:
    """Should the client ask ``relay`` for CGO? Every hop that lists ``FlowCtrl=2``,
    ``Relay=5`` and ``Relay=6``, when we run both CGO (``cgo``) and congestion control."""
    line = getattr(relay, "protocols", "")
    return (cgo and cc is not None and cc.enabled and protover.supports(line, "FlowCtrl", 2)
            and protover.supports(line, "Relay", 4) and protover.supports(line, "Relay", 5)
            and protover.supports(line, "Relay", 6))


class HopHandshake:
    """The client side of adding ``relay`` (anything with ``rsa_id``, ``ed_id``, ``ntor_key``
    and a ``protocols`` line) to a circuit; ``cc``: ask for congestion control with these
    parameters (see :func:`wants_cc`), None: do not; ``cgo``: ask for CGO (see
    :func:`wants_cgo`; it needs ``cc``, and asks for congestion control too)."""

    __slots__ = ("htype", "_hs", "cc", "cgo")

    def __init__(self, relay: Any, cc: CCParams | None = None, *, cgo: bool = False) -> None:
        if protover.supports(getattr(relay, "protocols", ""), "Relay", 4):
            self.htype = HTYPE_NTOR_V3
            self.cc = cc if cc is not None and cc.enabled else None
            if cgo and self.cc is None:
                raise LocalProtocolError("CGO needs congestion control on the hop")
            self.cgo = cgo
            request = [(EXT_CC_REQUEST, b"")] if self.cc is not None else []
            if cgo:
                request.append((EXT_SUBPROTO_REQUEST, SUBPROTO_CGO))
            self._hs: NtorClient | NtorV3Client = NtorV3Client(relay.ed_id, relay.ntor_key,
                                                              encode_extensions(request))
        else:
            if cgo:
                raise LocalProtocolError("CGO needs the ntor-v3 handshake")
            self.htype = HTYPE_NTOR
            self.cc = None
            self.cgo = False
            self._hs = NtorClient(relay.rsa_id, relay.ntor_key)

    @property
    def onion_skin(self) -> bytes:
        return self._hs.onion_skin

    def complete(self, hdata: bytes) -> HopParams:
        """Check the relay's reply (CREATED2/EXTENDED2 HDATA). Raises HandshakeError."""
        if self.htype == HTYPE_NTOR:
            km = self._hs.complete(hdata, length=TOR1_KEY_MATERIAL_LEN + KH_LEN)  # type: ignore[call-arg]
            end = TOR1_KEY_MATERIAL_LEN
            return HopParams(km[:end], "ntor", kh=km[end:])  # type: ignore[index]
        length = CGO_KEY_MATERIAL_LEN if self.cgo else TOR1_KEY_MATERIAL_LEN
        server_message, km = self._hs.complete(hdata, length=length + KH_LEN)  # type: ignore[call-arg]
        key_material, kh = km[:length], km[length:]
        try:
            extensions = parse_extensions(server_message)
        except ProtocolError as exc:
            raise HandshakeError(f"ntor-v3 server message: {exc}") from None
        sendme_inc = None
        for ext_type, body in extensions:  # types we do not know are ignored
            if ext_type == EXT_CC_RESPONSE and sendme_inc is None:
                if self.cc is None:
                    raise HandshakeError("CC_RESPONSE without a CC_REQUEST")
                if len(body) < 1 or abs(body[0] - self.cc.cc_sendme_inc) > 1 or body[0] == 0:
                    raise HandshakeError(f"CC_RESPONSE with an unacceptable SENDME increment "
                                         f"({body[0] if body else 'none'}; ours is {self.cc.cc_sendme_inc})")
                sendme_inc = body[0]
        if self.cgo and sendme_inc is None:  # tor's relays refuse this; no relay may do it
            raise HandshakeError("CGO without congestion control (no CC_RESPONSE)")
        return HopParams(key_material, "ntor-v3", sendme_inc, "cgo" if self.cgo else "tor1", kh)


def _subproto_wants_cgo(body: bytes) -> bool:
    """Read a SUBPROTO_REQUEST: ``{protocol u8, version u8}`` pairs, sorted, no duplicates.
    Only ``{Relay, 6}`` (CGO) may be asked for (tor refuses anything else it lists)."""
    if len(body) % 2:
        raise HandshakeError("SUBPROTO_REQUEST of an odd length")
    pairs = [bytes(body[i:i + 2]) for i in range(0, len(body), 2)]
    if any(a >= b for a, b in zip(pairs, pairs[1:])):
        raise HandshakeError("SUBPROTO_REQUEST not sorted or with duplicates")
    for pair in pairs:
        if pair != SUBPROTO_CGO:
            raise HandshakeError(f"SUBPROTO_REQUEST for unsupported {pair[0]}={pair[1]}")
    return bool(pairs)


def answer_create2(htype: int, hdata: bytes, *, rsa_id: bytes, ed_id: bytes,
                   onion_keys, cc: CCParams | None = None, cgo: bool = False) -> tuple[bytes, HopParams]:
    """The relay side of CREATE2: ``(CREATED2 HDATA, HopParams)``. ``cc``: we run
    congestion control with these parameters (a CC_REQUEST is answered), None: we do not;
    ``cgo``: we accept a SUBPROTO_REQUEST for CGO (it needs the CC_REQUEST too).

    Raises:
        HandshakeError: an unknown handshake type, or the handshake fails.
    """
    if htype == HTYPE_NTOR:
        reply, km = ntor_server(hdata, rsa_id, onion_keys, length=TOR1_KEY_MATERIAL_LEN + KH_LEN)
        return reply, HopParams(km[:TOR1_KEY_MATERIAL_LEN], "ntor", kh=km[TOR1_KEY_MATERIAL_LEN:])
    if htype == HTYPE_NTOR_V3:
        agreed: list[int] = []
        use_cgo: list[bool] = []

        def server_message(client_message: bytes) -> bytes:
            try:
                extensions = parse_extensions(client_message)  # types we do not know are ignored
            except ProtocolError as exc:
                raise HandshakeError(f"ntor-v3 client message: {exc}") from None
            answer = []
            if cc is not None and cc.enabled and any(t == EXT_CC_REQUEST for t, _ in extensions):
                agreed.append(cc.cc_sendme_inc)
                answer.append((EXT_CC_RESPONSE, bytes((cc.cc_sendme_inc,))))
            sub = next((body for t, body in extensions if t == EXT_SUBPROTO_REQUEST), None)
            if sub is not None and _subproto_wants_cgo(sub):
                if not cgo:
                    raise HandshakeError("SUBPROTO_REQUEST for CGO, which we do not run")
                if not agreed:  # format v1 cannot carry stream SENDMEs (tor refuses too)
                    raise HandshakeError("CGO asked for without congestion control")
                use_cgo.append(True)
            return encode_extensions(answer)

        # the KDF is a stream (SHAKE-256): the first 72 bytes of CGO's 160 are tor1's 72, and
        # KH follows whichever keys the hop uses
        reply, _cm, keys = ntor_v3_server(hdata, ed_id, onion_keys, server_message,
                                          length=CGO_KEY_MATERIAL_LEN + KH_LEN)
        if use_cgo:
            return reply, HopParams(keys[:CGO_KEY_MATERIAL_LEN], "ntor-v3", agreed[0], "cgo",
                                    keys[CGO_KEY_MATERIAL_LEN:])
        end = TOR1_KEY_MATERIAL_LEN
        return reply, HopParams(keys[:end], "ntor-v3", agreed[0] if agreed else None,
                                kh=keys[end:end + KH_LEN])
    raise HandshakeError(f"unsupported handshake type {htype}")


# -- CREATE_FAST (tor-spec "CREATE_FAST/CREATED_FAST cells") --------------------------------------
#: X and Y are 20 random bytes each (HASH_LEN)
CREATE_FAST_LEN = 20


def kdf_tor(k0: bytes, length: int) -> bytes:
    """tor-spec's KDF-TOR: SHA1(K0 | [00]) | SHA1(K0 | [01]) | ... truncated to ``length``."""
    if not 0 < length <= 255 * 20:
        raise LocalProtocolError("KDF-TOR length out of range")
    out = b"".join(hashlib.sha1(k0 + bytes([i])).digest() for i in range((length + 19) // 20))
    return out[:length]


def answer_create_fast(payload: bytes, *, y: bytes | None = None) -> tuple[bytes, HopParams]:
    """The relay side of CREATE_FAST: ``(CREATED_FAST payload Y | KH, HopParams)``.

    No public-key step: the first hop of a tor client that does not know our ntor key (a
    one-hop directory circuit) uses it, as TLS already authenticated us. Key material is
    KDF-TOR(X | Y): KH (20 bytes, sent back to prove the derivation), then Df, Db, Kf, Kb
    for tor1 relay crypto. ``y`` is for tests (default: 20 fresh random bytes)."""
    if len(payload) < CREATE_FAST_LEN:
        raise HandshakeError("CREATE_FAST payload shorter than 20 bytes")
    x = bytes(payload[:CREATE_FAST_LEN])
    y = os.urandom(CREATE_FAST_LEN) if y is None else y
    keys = kdf_tor(x + y, CREATE_FAST_LEN + TOR1_KEY_MATERIAL_LEN)
    return y + keys[:CREATE_FAST_LEN], HopParams(keys[CREATE_FAST_LEN:], "create-fast")
