"""Adding a hop to a circuit: which handshake, with which extensions (tor-spec §5.1; prop 332). Pure.

A client picks the circuit handshake for each hop from what the relay advertises:
ntor-v3 (CREATE2 handshake type 3) where its proto line lists ``Relay=4``, ntor (type 2)
otherwise. ntor-v3 carries an encrypted, authenticated *client message* and a *server
message*, each a list of extensions (``N u8 | N × {type u8, len u8, body}``); the types
tor defines are CC_REQUEST (1, empty), CC_RESPONSE (2, ``sendme_inc u8``) and
SUBPROTO_REQUEST (3, ``{protocol u8, version u8}`` pairs). A relay answers every
extension it knows and ignores the others, as the spec says.

:class:`HopHandshake` is the client side of one hop (the onion skin to send in CREATE2
or EXTEND2, then the reply), :func:`answer_create2` the relay side of a CREATE2; both give
a :class:`HopParams`: the 72 bytes of tor1 key material and what was negotiated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onionp2p.errors import HandshakeError, ProtocolError
from onionp2p.proto import protover
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

__all__ = ["HopParams", "HopHandshake", "answer_create2", "EXT_CC_REQUEST", "EXT_CC_RESPONSE",
           "EXT_SUBPROTO_REQUEST"]

EXT_CC_REQUEST = 1
EXT_CC_RESPONSE = 2
EXT_SUBPROTO_REQUEST = 3

HANDSHAKE_NAMES = {HTYPE_NTOR: "ntor", HTYPE_NTOR_V3: "ntor-v3"}


@dataclass(frozen=True)
class HopParams:
    """What one hop's handshake agreed: tor1 key material and the handshake's name."""

    key_material: bytes
    handshake: str  # "ntor" | "ntor-v3"


class HopHandshake:
    """The client side of adding ``relay`` (anything with ``rsa_id``, ``ed_id``, ``ntor_key``
    and a ``protocols`` line) to a circuit."""

    __slots__ = ("htype", "_hs")

    def __init__(self, relay: Any) -> None:
        if protover.supports(getattr(relay, "protocols", ""), "Relay", 4):
            self.htype = HTYPE_NTOR_V3
            self._hs: NtorClient | NtorV3Client = NtorV3Client(relay.ed_id, relay.ntor_key, encode_extensions([]))
        else:
            self.htype = HTYPE_NTOR
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
            parse_extensions(server_message)  # none asked for: whatever came is ignored
        except ProtocolError as exc:
            raise HandshakeError(f"ntor-v3 server message: {exc}") from None
        return HopParams(key_material, "ntor-v3")


def answer_create2(htype: int, hdata: bytes, *, rsa_id: bytes, ed_id: bytes,
                   onion_keys) -> tuple[bytes, HopParams]:
    """The relay side of CREATE2: ``(CREATED2 HDATA, HopParams)``.

    Raises:
        HandshakeError: an unknown handshake type, or the handshake fails.
    """
    if htype == HTYPE_NTOR:
        reply, key_material = ntor_server(hdata, rsa_id, onion_keys)
        return reply, HopParams(key_material, "ntor")
    if htype == HTYPE_NTOR_V3:
        def server_message(client_message: bytes) -> bytes:
            try:
                parse_extensions(client_message)  # extensions we do not know are ignored
            except ProtocolError as exc:
                raise HandshakeError(f"ntor-v3 client message: {exc}") from None
            return encode_extensions([])

        reply, _cm, key_material = ntor_v3_server(hdata, ed_id, onion_keys, server_message)
        return reply, HopParams(key_material, "ntor-v3")
    raise HandshakeError(f"unsupported handshake type {htype}")
