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

:class:`HopHandshake` is the client side of one hop (the onion skin to send in CREATE2
or EXTEND2, then the reply), :func:`answer_create2` the relay side of a CREATE2; both give
a :class:`HopParams`: the 72 bytes of tor1 key material and what was negotiated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onionp2p.errors import HandshakeError, ProtocolError
from onionp2p.proto import protover
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

__all__ = ["HopParams", "HopHandshake", "answer_create2", "wants_cc", "EXT_CC_REQUEST", "EXT_CC_RESPONSE",
           "EXT_SUBPROTO_REQUEST"]

EXT_CC_REQUEST = 1
EXT_CC_RESPONSE = 2
EXT_SUBPROTO_REQUEST = 3

HANDSHAKE_NAMES = {HTYPE_NTOR: "ntor", HTYPE_NTOR_V3: "ntor-v3"}


@dataclass(frozen=True)
class HopParams:
    """What one hop's handshake agreed: tor1 key material, the handshake's name, and the
    SENDME increment when congestion control was negotiated (None: fixed windows)."""

    key_material: bytes
    handshake: str  # "ntor" | "ntor-v3"
    sendme_inc: int | None = None


def wants_cc(relay: Any, index: int, path_len: int, cc: CCParams | None) -> bool:
    """Should the client ask hop ``index`` of a ``path_len``-hop circuit for congestion
    control? As tor: only the last hop of a circuit that carries streams (two hops or
    more), only if it lists ``FlowCtrl=2`` (and so ntor-v3), and only if we run it."""
    return (cc is not None and cc.enabled and path_len >= 2 and index == path_len - 1
            and protover.supports(getattr(relay, "protocols", ""), "FlowCtrl", 2)
            and protover.supports(getattr(relay, "protocols", ""), "Relay", 4))


class HopHandshake:
    """The client side of adding ``relay`` (anything with ``rsa_id``, ``ed_id``, ``ntor_key``
    and a ``protocols`` line) to a circuit; ``cc``: ask for congestion control with these
    parameters (see :func:`wants_cc`), None: do not."""

    __slots__ = ("htype", "_hs", "cc")

    def __init__(self, relay: Any, cc: CCParams | None = None) -> None:
        if protover.supports(getattr(relay, "protocols", ""), "Relay", 4):
            self.htype = HTYPE_NTOR_V3
            self.cc = cc if cc is not None and cc.enabled else None
            request = [(EXT_CC_REQUEST, b"")] if self.cc is not None else []
            self._hs: NtorClient | NtorV3Client = NtorV3Client(relay.ed_id, relay.ntor_key,
                                                              encode_extensions(request))
        else:
            self.htype = HTYPE_NTOR
            self.cc = None
            self._hs = NtorClient(relay.rsa_id, relay.ntor_key)

    @property
    def onion_skin(self) -> bytes:
        return self._hs.onion_skin

    def complete(self, hdata: bytes) -> HopParams:
        """Check the relay's reply (CREATED2/EXTENDED2 HDATA). Raises HandshakeError."""
        if self.htype == HTYPE_NTOR:
            return HopParams(self._hs.complete(hdata), "ntor")  # type: ignore[arg-type]
        server_message, key_material = self._hs.complete(hdata)  # type: ignore[misc]
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
        return HopParams(key_material, "ntor-v3", sendme_inc)


def answer_create2(htype: int, hdata: bytes, *, rsa_id: bytes, ed_id: bytes,
                   onion_keys, cc: CCParams | None = None) -> tuple[bytes, HopParams]:
    """The relay side of CREATE2: ``(CREATED2 HDATA, HopParams)``. ``cc``: we run
    congestion control with these parameters (a CC_REQUEST is answered), None: we do not.

    Raises:
        HandshakeError: an unknown handshake type, or the handshake fails.
    """
    if htype == HTYPE_NTOR:
        reply, key_material = ntor_server(hdata, rsa_id, onion_keys)
        return reply, HopParams(key_material, "ntor")
    if htype == HTYPE_NTOR_V3:
        agreed: list[int] = []

        def server_message(client_message: bytes) -> bytes:
            try:
                extensions = parse_extensions(client_message)  # types we do not know are ignored
            except ProtocolError as exc:
                raise HandshakeError(f"ntor-v3 client message: {exc}") from None
            answer = []
            if cc is not None and cc.enabled and any(t == EXT_CC_REQUEST for t, _ in extensions):
                agreed.append(cc.cc_sendme_inc)
                answer.append((EXT_CC_RESPONSE, bytes((cc.cc_sendme_inc,))))
            return encode_extensions(answer)

        reply, _cm, key_material = ntor_v3_server(hdata, ed_id, onion_keys, server_message)
        return reply, HopParams(key_material, "ntor-v3", agreed[0] if agreed else None)
    raise HandshakeError(f"unsupported handshake type {htype}")
