#!/usr/bin/env python3
"""atheris harness: channel cells, link payloads, relay messages, certificates, the link handshake.

Run (libFuzzer flags pass through)::

    .venv/bin/python tests/fuzz/fuzz_cells.py WORKDIR tests/fuzz/corpus/cells -max_total_time=60

or ``tools/fuzz cells SECONDS``. The input layout (a target number, then the target's
bytes; streaming targets get their input in chunks) is described in ``fuzzlib.py``;
``CELL_TARGETS`` there lists the targets.

The contract under test (errors.py, SECURITY.md): bytes from the network make a decoder
either succeed or raise :class:`onionp2p.errors.ProtocolError` (or a subclass). Anything
else escaping — ``IndexError``, ``struct.error``, construct errors, ``UnicodeError``,
``LocalProtocolError`` (which means "the caller misused an API", never "the peer sent
junk") — is a crash, and so is a broken invariant (``AssertionError`` from
``fuzzlib.check``): framing must give back exactly the bytes it consumed, anything
decoded must re-encode to something that decodes to the same value, and a finished
handshake must have proved what it claims.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Heavy third-party packages are imported first so that only our own code is instrumented.
import construct  # noqa: E402,F401
import cryptography.x509  # noqa: E402,F401
import structlog  # noqa: E402,F401
from fuzzlib import CELL_TARGETS, NOW, TLS_CERT_DER, check, consume_chunks  # noqa: E402

with atheris.instrument_imports(include=["onionp2p"]):
    from onionp2p.errors import ProtocolError
    from onionp2p.net.channel import Channel
    from onionp2p.proto import cells as C
    from onionp2p.proto import certs as X
    from onionp2p.proto import relaycell as R
    from onionp2p.proto.hs import cells as H
    from onionp2p.proto.link import LinkHandshake, verify_certs
    from onionp2p.relay.hsdir import parse_outer
    from onionp2p.relay.keys import RelayKeys

# -- fixed state shared by every input --------------------------------------------------------


def _make_keys() -> RelayKeys:
    """Relay keys for the handshake targets (certificates issued at NOW); files removed at once."""
    tmp = tempfile.mkdtemp(prefix="onionp2p-fuzz-keys-")
    try:
        return RelayKeys.load_or_create(os.path.join(tmp, "keys"), now=NOW)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


KEYS = _make_keys()
RSA_PUBLIC = KEYS.rsa_identity.public_key()


def _exporter(label: bytes, context: bytes) -> bytes:
    return hashlib.sha256(label + b"\0" + context).digest()


class _Owner:
    """ChannelOwner that records what the post-handshake framer hands up."""

    def __init__(self) -> None:
        self.cells: list[C.Cell] = []

    def unknown_cell(self, chan, cell) -> None:
        self.cells.append(C.Cell(cell.circ_id, cell.command, bytes(cell.payload)))

    def channel_closed(self, chan) -> None:  # pragma: no cover - _cells never closes
        pass


_LOOP = asyncio.new_event_loop()


async def _new_channel(owner: _Owner) -> Channel:
    return Channel(owner, initiator=True)


_OWNER = _Owner()
_CHANNEL = _LOOP.run_until_complete(_new_channel(_OWNER))
# What Channel._cells does not hand up once the link is open (channel.py's _IGNORED).
_CHANNEL_IGNORES = {C.CellCommand.PADDING, C.CellCommand.VPADDING, C.CellCommand.NETINFO}

# -- targets -----------------------------------------------------------------------------------


def _reparse(parse, encoded: bytes, what: str):
    """Decode what we just encoded from a decoded value: failing here is a crash, not a reject."""
    try:
        return parse(encoded)
    except ProtocolError as exc:
        raise AssertionError(f"{what}: re-encoded value does not decode: {exc!r}") from None


def t_reader(fdp) -> None:
    """CellReader as the link layer drives it: 2-byte CircIDs until a VERSIONS cell, then 4;
    and the channel's own post-handshake framer (Channel._cells, CellReader.frames) fed the same
    4-byte stream."""
    chunks = consume_chunks(fdp)
    reader = C.CellReader(circ_id_len=2)
    fed = bytearray()
    consumed = 0
    cells_after: list[C.Cell] = []  # 4-byte cells, what Channel._cells must see too
    split_at = None  # offset in `fed` where the 4-byte stream starts
    error = None
    for chunk in chunks:
        reader.receive_data(chunk)
        fed += chunk
        try:
            while True:
                width = reader.circ_id_len
                cell = reader.next_cell()
                if cell is None:
                    break
                raw = C.encode_cell(cell, circ_id_len=width)
                check(bytes(fed[consumed:consumed + len(raw)]) == raw,
                      "CellReader returned a cell that does not re-encode to the bytes it consumed")
                consumed += len(raw)
                if C.is_var_command(cell.command):
                    check(len(cell.payload) <= reader.max_var_payload, "variable cell above the bound")
                else:
                    check(len(cell.payload) == C.PAYLOAD_LEN, "fixed cell payload is not 509 bytes")
                if width == 4:
                    cells_after.append(cell)
                elif cell.command == C.CellCommand.VERSIONS:
                    reader.circ_id_len = 4
                    split_at = consumed
        except ProtocolError as exc:
            error = exc
            break
        check(reader.buffered == len(fed) - consumed, "CellReader.buffered is wrong")
    if error is None:
        check(reader.take_buffered() == bytes(fed[consumed:]), "take_buffered lost or invented bytes")
        check(reader.buffered == 0, "take_buffered left bytes behind")
    if split_at is None:
        if error is not None:
            raise error
        return
    # Differential: Channel._cells (CellReader.frames, the framer used once the link is
    # open) against CellReader.next_cell on the same 4-byte stream, in the same chunks.
    stream = bytes(fed[split_at:])
    _OWNER.cells.clear()
    _CHANNEL._reader = C.CellReader(circ_id_len=4)
    _CHANNEL.closed = False
    _CHANNEL.circuits.clear()
    chan_error = None
    pos = 0
    try:
        for cut in _recut(chunks, split_at):
            _CHANNEL._cells(stream[pos:pos + cut])
            pos += cut
    except ProtocolError as exc:
        chan_error = exc
    expected = []
    for cell in cells_after:
        if cell.command == C.CellCommand.VERSIONS:
            check(chan_error is not None, "Channel accepted a VERSIONS cell after the handshake")
            break
        if cell.command in _CHANNEL_IGNORES:
            continue
        if cell.command == C.CellCommand.PADDING_NEGOTIATE and cell.circ_id == 0:
            continue  # the channel's own padding negotiation (padding-spec), never the owner's
        expected.append(cell)
    check(_OWNER.cells == expected, "Channel._cells and CellReader disagree on the cells")
    if error is None and chan_error is None:
        check(_CHANNEL._reader.buffered == len(fed) - consumed, "Channel._cells kept the wrong partial cell")
    if error is not None:
        check(chan_error is not None, "CellReader rejected a cell that Channel._cells accepted")
        raise error


def _recut(chunks: list[bytes], skip: int) -> list[int]:
    """Chunk sizes of the stream after the first ``skip`` bytes."""
    out, pos = [], 0
    for chunk in chunks:
        start, end = pos, pos + len(chunk)
        pos = end
        if end <= skip:
            continue
        out.append(end - max(start, skip))
    return out


def t_versions(fdp) -> None:
    v = C.Versions.parse(fdp.ConsumeBytes(fdp.remaining_bytes()))
    check(_reparse(C.Versions.parse, v.encode(), "VERSIONS") == v, "VERSIONS round trip")


def t_netinfo(fdp) -> None:
    n = C.NetInfo.parse(fdp.ConsumeBytes(fdp.remaining_bytes()))
    again = _reparse(C.NetInfo.parse, n.encode(), "NETINFO")
    check(again.timestamp == n.timestamp and again.my_addresses == n.my_addresses, "NETINFO round trip")
    if n.other_address is not None:  # None (an unknown address type) is re-encoded as 0.0.0.0
        check(again.other_address == n.other_address, "NETINFO other address round trip")


def t_certs(fdp) -> None:
    c = C.Certs.parse(fdp.ConsumeBytes(fdp.remaining_bytes()))
    check(_reparse(C.Certs.parse, c.encode(), "CERTS") == c, "CERTS round trip")
    by_type = c.by_type()
    check(len(by_type) == len(c.certs), "CERTS by_type lost a certificate")


def _simple(cls, what):
    def target(fdp) -> None:
        value = cls.parse(fdp.ConsumeBytes(fdp.remaining_bytes()))
        check(_reparse(cls.parse, value.encode(), what) == value, f"{what} round trip")
    target.__name__ = f"t_{what.lower()}"
    return target


def _canonical(msg):
    """What decoding ``msg.encode()`` must give: BEGIN lower-cases hostnames on the way out."""
    if isinstance(msg, R.Begin) and ":" not in msg.host:
        return R.Begin(msg.host.lower(), msg.port, msg.flags)
    return msg


def t_relay(fdp) -> None:
    body = fdp.ConsumeBytes(C.PAYLOAD_LEN).ljust(C.PAYLOAD_LEN, b"\0")
    command, stream_id, data = R.unpack_relay(body)
    check(len(data) <= R.RELAY_DATA_MAX, "relay data above 498 bytes")
    msg = R.parse_message(command, data)
    if msg is None:
        check(command not in R._PARSERS, "parse_message ignored a command it implements")
        return
    check(msg.command == command, "parse_message returned another command's message")
    encoded = msg.encode()
    check(len(encoded) <= R.RELAY_DATA_MAX, "re-encoded relay message does not fit a cell")
    again = _reparse(lambda b: R.parse_message(command, b), encoded, type(msg).__name__)
    check(again == _canonical(msg), f"{type(msg).__name__} round trip: {msg!r} -> {again!r}")
    packed = R.pack_relay(command, stream_id, encoded)
    check(R.unpack_relay(bytes(packed)) == (command, stream_id, encoded), "pack/unpack_relay round trip")
    if isinstance(msg, R.Extend2):
        for spec in msg.specs:
            if spec.lstype in (R.LinkSpecType.IPV4, R.LinkSpecType.IPV6):
                host, port = spec.hostport()
                check(0 <= port <= 0xFFFF and host, "link specifier address")
        msg.find(R.LinkSpecType.ED25519_ID)
    elif isinstance(msg, R.Resolved):
        for answer in msg.answers:
            answer.value_text()


def t_ed25519_cert(fdp) -> None:
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    cert = X.Ed25519Cert.parse(data)
    check(cert.encode() == data, "Ed25519 certificate does not re-encode to its exact bytes")
    cert.is_expired(NOW)
    cert.verify(now=NOW)  # with the embedded signed-with key, if any


def t_cross_cert(fdp) -> None:
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    cert = X.RsaCrossCert.parse(data)
    check(cert.encode() == data, "cross-certificate does not re-encode to its exact bytes")
    cert.verify(RSA_PUBLIC, NOW)


def t_x509(fdp) -> None:
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    X.parse_x509(data)
    key = X.verify_rsa_identity_cert(data, now=NOW)
    check(len(X.rsa_identity_digest(key)) == 20, "RSA identity digest")


def t_verify_certs(fdp) -> None:
    leaf = 5 + fdp.ConsumeIntInRange(0, 1)
    certs = C.Certs.parse(fdp.ConsumeBytes(fdp.remaining_bytes()))
    proven = verify_certs(certs, leaf_type=leaf, now=NOW, tls_cert_der=TLS_CERT_DER)
    check(len(proven.identity.ed25519_id) == 32 and len(proven.identity.rsa_id) == 20, "proven identity")
    check(len(proven.leaf_key) == 32, "proven leaf key")


def _drive(hs: LinkHandshake, chunks: list[bytes]) -> None:
    """Feed chunks the way Channel.data_received does during the handshake."""
    hs.start()
    hs.data_to_send()
    reader = C.CellReader(circ_id_len=2)
    for chunk in chunks:
        reader.receive_data(chunk)
        while not hs.done:
            reader.circ_id_len = hs.circ_id_len
            cell = reader.next_cell()
            if cell is None:
                break
            hs.receive_cell(cell)
            hs.data_to_send()
        if hs.done:
            break
    if hs.done:
        check(hs.link_version in (4, 5), "link open without a common version")
        check(hs.peer_netinfo is not None, "link open without the peer's NETINFO")


def t_link_initiator(fdp) -> None:
    relay = fdp.ConsumeIntInRange(0, 1) == 1
    hs = LinkHandshake(initiator=True, keys=KEYS if relay else None, peer_address="127.0.0.1",
                       my_addresses=("127.0.0.1",) if relay else (), now=NOW)
    hs.tls_established(None, TLS_CERT_DER, _exporter)
    _drive(hs, consume_chunks(fdp))
    if hs.done:
        check(hs.peer is not None, "initiator finished without proving the responder's identity")


def t_link_responder(fdp) -> None:
    hs = LinkHandshake(initiator=False, keys=KEYS, peer_address="127.0.0.1", my_addresses=("127.0.0.1",),
                       now=NOW)
    hs.tls_established(TLS_CERT_DER, None, _exporter)
    _drive(hs, consume_chunks(fdp))
    if hs.done:
        check(hs.authenticated_initiator == (hs.peer is not None), "responder: peer identity without proof")


def t_hs_cell(fdp) -> None:
    command = 32 + fdp.ConsumeIntInRange(0, 8)
    data = fdp.ConsumeBytes(R.RELAY_DATA_MAX)  # what a relay cell can carry
    msg = H.parse_hs_message(command, data)
    check(msg.command == command, "parse_hs_message returned another command's message")
    encoded = msg.encode()
    again = _reparse(lambda b: H.parse_hs_message(command, b), encoded, type(msg).__name__)
    if isinstance(msg, H.EstablishIntro):
        # the fields alone give back the bytes the MAC and signature cover (trailing bytes aside)
        fresh = H.EstablishIntro(msg.auth_key_type, msg.auth_key, msg.extensions, msg.handshake_mac, msg.sig)
        check(fresh.encode() == data[:msg.sig_end + 2 + len(msg.sig)], "ESTABLISH_INTRO fields re-encode")
        check(again.raw == msg.raw, "ESTABLISH_INTRO round trip")
        msg.dos_params()
        msg.verify(bytes(20))  # a random cell never passes: ProtocolError
        raise AssertionError("a fuzzed ESTABLISH_INTRO verified")
    if isinstance(msg, (H.Introduce1, H.EstablishRendezvous, H.Rendezvous1, H.Rendezvous2)):
        check(encoded == data, f"{type(msg).__name__} does not re-encode to its bytes")
        if isinstance(msg, H.Introduce1):
            msg.validate()
    check(again == msg, f"{type(msg).__name__} round trip")


def t_hs_descriptor(fdp) -> None:
    out = parse_outer(fdp.ConsumeBytes(fdp.remaining_bytes()), NOW)
    check(len(out.blinded_key) == 32 and 0 <= out.lifetime <= 12 * 3600, "outer descriptor fields")


TARGETS = {
    "reader": t_reader,
    "versions": t_versions,
    "netinfo": t_netinfo,
    "certs": t_certs,
    "auth_challenge": _simple(C.AuthChallenge, "AUTH_CHALLENGE"),
    "authenticate": _simple(C.Authenticate, "AUTHENTICATE"),
    "create2": _simple(C.Create2, "CREATE2"),
    "created2": _simple(C.Created2, "CREATED2"),
    "destroy": _simple(C.Destroy, "DESTROY"),
    "padding_negotiate": _simple(C.PaddingNegotiate, "PADDING_NEGOTIATE"),
    "relay": t_relay,
    "ed25519_cert": t_ed25519_cert,
    "cross_cert": t_cross_cert,
    "x509": t_x509,
    "verify_certs": t_verify_certs,
    "link_initiator": t_link_initiator,
    "link_responder": t_link_responder,
    "hs_cell": t_hs_cell,
    "hs_descriptor": t_hs_descriptor,
}
assert tuple(TARGETS) == CELL_TARGETS, "fuzzlib.CELL_TARGETS and TARGETS disagree"
_ORDER = [TARGETS[name] for name in CELL_TARGETS]


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = _ORDER[fdp.ConsumeIntInRange(0, len(_ORDER) - 1)]
    try:
        target(fdp)
    except ProtocolError:
        pass  # the typed rejection: exactly what untrusted bytes may cause


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
