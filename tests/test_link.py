"""Tests for the link handshake (onionp2p.proto.link) and TLS helpers (onionp2p.net.tls); see specs/link.md."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onionp2p.errors import CertificateError, HandshakeError, LocalProtocolError, ProtocolError
from onionp2p.net import tls
from onionp2p.proto.cells import (
    Authenticate,
    Cell,
    CellCommand,
    CellReader,
    CertEntry,
    Certs,
    NetInfo,
    Versions,
    encode_fixed,
    encode_var,
)
from onionp2p.proto.certs import Ed25519Cert
from onionp2p.proto.link import (
    AUTH0003_LABEL,
    AUTH0003_LEN,
    LinkHandshake,
    PeerIdentity,
    netinfo_cell,
    rsa_key_sha256,
    versions_cell,
)
from onionp2p.relay.keys import RelayKeys

NOW = time.time()
SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def relay_a(tmp_path_factory) -> RelayKeys:
    return RelayKeys.load_or_create(tmp_path_factory.mktemp("relay_a"), now=NOW)


@pytest.fixture(scope="module")
def relay_b(tmp_path_factory) -> RelayKeys:
    return RelayKeys.load_or_create(tmp_path_factory.mktemp("relay_b"), now=NOW)


def identity_of(keys: RelayKeys) -> PeerIdentity:
    return PeerIdentity(bytes(keys.identity_public), bytes(keys.rsa_id_digest))


# ---------------------------------------------------------------------------
# In-memory harness: two handshake objects wired back to back, no TLS.


def fixed_exporter(label: bytes, context: bytes) -> bytes:
    assert label == AUTH0003_LABEL and len(context) == 32
    return hashlib.sha256(SECRET + context).digest()


def make_pair(
    responder_keys: RelayKeys,
    initiator_keys: RelayKeys | None = None,
    *,
    expected: PeerIdentity | None = None,
    now: float = NOW,
    responder_now: float | None = None,
    tls_cert_der: bytes | None = None,
    initiator_exporter=fixed_exporter,
) -> tuple[LinkHandshake, LinkHandshake]:
    init = LinkHandshake(initiator=True, keys=initiator_keys, expected=expected,
                         peer_address="192.0.2.1", my_addresses=("198.51.100.7",), now=now)
    resp = LinkHandshake(initiator=False, keys=responder_keys, peer_address="198.51.100.7",
                         my_addresses=("192.0.2.1", "2001:db8::1"),
                         now=now if responder_now is None else responder_now)
    server_der = responder_keys.tls_cert_der
    init.tls_established(None, server_der if tls_cert_der is None else tls_cert_der, initiator_exporter)
    resp.tls_established(server_der, None, fixed_exporter)
    return init, resp


def deliver(hs: LinkHandshake, reader: CellReader, data: bytes, tamper=None) -> None:
    reader.receive_data(data)
    while not hs.done:
        reader.circ_id_len = hs.circ_id_len
        cell = reader.next_cell()
        if cell is None:
            return
        if tamper is not None:
            cell = tamper(cell)
        hs.receive_cell(cell)


def run(init: LinkHandshake, resp: LinkHandshake, *, to_init=None, to_resp=None) -> None:
    """Shuttle bytes until both sides are done; ``to_*`` may rewrite cells in flight."""
    r_init, r_resp = CellReader(2), CellReader(2)
    init.start()
    resp.start()
    for _ in range(10):
        deliver(resp, r_resp, init.data_to_send(), to_resp)
        deliver(init, r_init, resp.data_to_send(), to_init)
        if init.done and resp.done:
            break
    assert init.done and resp.done
    assert init.data_to_send() == b"" and resp.data_to_send() == b""
    assert r_init.buffered == 0 and r_resp.buffered == 0


def rewrite(command: int, fn):
    """A tamper hook that applies ``fn`` to the payload of cells with ``command``."""
    def hook(cell: Cell) -> Cell:
        if cell.command == command:
            return Cell(cell.circ_id, cell.command, fn(cell.payload))
        return cell
    return hook


def rewrite_certs(fn):
    """Tamper hook: ``fn`` maps {type: body} to a list of CertEntry."""
    def payload(p: bytes) -> bytes:
        return Certs(tuple(fn(Certs.parse(p).by_type()))).encode()
    return rewrite(CellCommand.CERTS, payload)


def flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[index] ^= 1 << bit
    return bytes(b)


# ---------------------------------------------------------------------------
# Successful handshakes


def test_versions_cell_bytes():
    assert versions_cell() == bytes.fromhex("0000 07 0004 0004 0005")


def test_netinfo_cell_layout():
    cell = netinfo_cell("192.0.2.1", ("198.51.100.7", "2001:db8::1"), 0x01020304)
    assert len(cell) == 514
    assert cell[:5] == bytes.fromhex("00000000 08")
    body = bytes.fromhex(
        "01020304"  # TIME
        "04 04 c0000201"  # OTHERADDR 192.0.2.1
        "02"  # NMYADDR
        "04 04 c6336407"  # 198.51.100.7
        "06 10 20010db8000000000000000000000001"  # 2001:db8::1
    )
    assert cell[5:5 + len(body)] == body
    assert cell[5 + len(body):] == bytes(509 - len(body))
    info = NetInfo.parse(cell[5:])
    assert info.timestamp == 0x01020304
    assert str(info.other_address) == "192.0.2.1"
    assert [str(a) for a in info.my_addresses] == ["198.51.100.7", "2001:db8::1"]
    with pytest.raises(LocalProtocolError):
        netinfo_cell(None, ("not-an-ip",), 0)
    # An unknown peer address (e.g. a host name) is sent as 0.0.0.0.
    assert netinfo_cell("example.com", (), 0)[5:16] == bytes.fromhex("00000000 04 04 00000000 00")


def test_client_to_relay(relay_a):
    init, resp = make_pair(relay_a, expected=identity_of(relay_a))
    run(init, resp)
    assert init.link_version == resp.link_version == 5
    assert init.circ_id_len == resp.circ_id_len == 4
    assert init.peer == identity_of(relay_a)
    assert init.peer.fingerprint == relay_a.rsa_id_digest.hex().upper()
    assert resp.peer is None  # anonymous client
    # The responder's NETINFO: its clock, our address, its addresses.
    assert init.peer_netinfo.timestamp == int(NOW)
    assert str(init.peer_netinfo.other_address) == "198.51.100.7"
    assert [str(a) for a in init.peer_netinfo.my_addresses] == ["192.0.2.1", "2001:db8::1"]
    # The client's NETINFO: no clock, no addresses of its own.
    assert resp.peer_netinfo.timestamp == 0
    assert str(resp.peer_netinfo.other_address) == "192.0.2.1"
    assert resp.peer_netinfo.my_addresses == ()


def test_relay_to_relay(relay_a, relay_b):
    init, resp = make_pair(relay_a, relay_b, expected=identity_of(relay_a))
    run(init, resp)
    assert init.link_version == resp.link_version == 5
    assert init.peer == identity_of(relay_a)
    assert resp.peer == identity_of(relay_b)
    assert resp.peer.ed25519_id == bytes(relay_b.identity_public)
    assert init.authenticated_initiator and resp.authenticated_initiator
    assert resp.peer_netinfo.timestamp == int(NOW)
    assert [str(a) for a in resp.peer_netinfo.my_addresses] == ["198.51.100.7"]


def test_relay_to_relay_with_padding_in_the_logs(relay_a, relay_b):
    """VPADDING may be interleaved anywhere; it counts in SLOG/CLOG on both sides."""
    init, resp = make_pair(relay_a, relay_b)
    init.start()
    resp.start()
    with pytest.raises(LocalProtocolError):
        init.send_vpadding(1)  # no valid CircID width between our VERSIONS and theirs
    resp.send_vpadding(2)  # before the responder's VERSIONS: 2-byte CircID, part of SLOG
    r_init, r_resp = CellReader(2), CellReader(2)
    deliver(resp, r_resp, init.data_to_send())
    r_init.receive_data(resp.data_to_send())
    while not init.done:  # cell by cell, padding after the version is known
        r_init.circ_id_len = init.circ_id_len
        init.receive_cell(r_init.next_cell())
        if init.link_version and init.peer is None:
            init.send_vpadding(5)  # part of CLOG
    deliver(resp, r_resp, init.data_to_send())
    assert resp.done and resp.peer == identity_of(relay_b)
    # Fixed PADDING, VPADDING and later VERSIONS cells are ignored after VERSIONS.
    padding = Cell(0, CellCommand.PADDING, bytes(509))
    resp3 = make_pair(relay_a)[1]
    resp3.start()
    resp3.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((5,)).encode()))
    resp3.receive_cell(padding)
    resp3.receive_cell(Cell(0, CellCommand.VPADDING, b""))
    resp3.receive_cell(Cell(0, CellCommand.VERSIONS, b"\x00\x03"))  # later VERSIONS: ignored
    resp3.receive_cell(Cell(0, CellCommand.NETINFO, NetInfo(0, None).encode().ljust(509, b"\0")))
    assert resp3.done and resp3.peer is None


def test_versions_offered_by_peer_pick_highest_common(relay_a):
    init, resp = make_pair(relay_a)
    resp.start()
    resp.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((3, 4, 7)).encode()))
    assert resp.link_version == 4 and resp.circ_id_len == 4
    out = resp.data_to_send()
    assert out.startswith(versions_cell())


def test_cell_order_of_responder(relay_a):
    init, resp = make_pair(relay_a)
    resp.start()
    resp.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((4, 5)).encode()))
    reader = CellReader(2)
    reader.receive_data(resp.data_to_send())
    cmds = []
    while (cell := reader.next_cell()) is not None:
        cmds.append(cell.command)
        reader.circ_id_len = 4
    assert cmds == [CellCommand.VERSIONS, CellCommand.CERTS, CellCommand.AUTH_CHALLENGE, CellCommand.NETINFO]


def test_relay_initiator_without_method_3_stays_anonymous(relay_a, relay_b):
    def no_methods(p: bytes) -> bytes:
        return p[:32] + (1).to_bytes(2, "big") + (1).to_bytes(2, "big")
    init, resp = make_pair(relay_a, relay_b)
    run(init, resp, to_init=rewrite(CellCommand.AUTH_CHALLENGE, no_methods))
    assert init.peer == identity_of(relay_a)
    assert resp.peer is None and not init.authenticated_initiator


# ---------------------------------------------------------------------------
# Identity and CERTS failures (the initiator checking the responder)


def test_wrong_expected_ed25519_identity(relay_a, relay_b):
    init, resp = make_pair(relay_a, expected=PeerIdentity(bytes(relay_b.identity_public), None))
    with pytest.raises(HandshakeError, match="wrong identity"):
        run(init, resp)
    assert init.data_to_send() == b""  # nothing sent after detecting the impostor


def test_wrong_expected_rsa_identity(relay_a, relay_b):
    init, resp = make_pair(relay_a, relay_b, expected=PeerIdentity(None, bytes(relay_b.rsa_id_digest)))
    with pytest.raises(HandshakeError, match="wrong identity"):
        run(init, resp)


def test_expected_mixed_identity_rejected(relay_a, relay_b):
    """A right Ed25519 id with someone else's RSA id is still wrong."""
    mixed = PeerIdentity(bytes(relay_a.identity_public), bytes(relay_b.rsa_id_digest))
    init, resp = make_pair(relay_a, expected=mixed)
    with pytest.raises(HandshakeError):
        run(init, resp)


def _bad_sig_type4(by_type):
    return [CertEntry(t, flip_bit(b, len(b) - 1) if t == 4 else b) for t, b in by_type.items()]


def _drop(t_drop):
    return lambda by_type: [CertEntry(t, b) for t, b in by_type.items() if t != t_drop]


def _duplicate(t_dup):
    return lambda by_type: [CertEntry(t, b) for t, b in by_type.items()] + [CertEntry(t_dup, by_type[t_dup])]


def _swap(t_from, t_to, other: RelayKeys):
    other_certs = dict(other.certs_for_responder())
    return lambda by_type: [CertEntry(t, other_certs[t] if t == t_from else b) for t, b in by_type.items()]


@pytest.mark.parametrize("name, fn", [
    ("bad signature on type 4", _bad_sig_type4),
    ("missing type 2", _drop(2)),
    ("missing type 4", _drop(4)),
    ("missing type 5", _drop(5)),
    ("missing type 7", _drop(7)),
    ("duplicate type 5", _duplicate(5)),
    ("duplicate type 2", _duplicate(2)),
    ("truncated type 5", lambda bt: [CertEntry(t, b[:-1] if t == 5 else b) for t, b in bt.items()]),
])
def test_tampered_responder_certs(relay_a, name, fn):
    init, resp = make_pair(relay_a)
    with pytest.raises(CertificateError):
        run(init, resp, to_init=rewrite_certs(fn))


def test_rsa_id_cert_with_bad_x509_version(relay_a):
    """An X.509 version cryptography refuses (InvalidVersion, not a ValueError) is a CertificateError."""
    def bad_version(by_type):
        v3, bad = bytes.fromhex("a003020102"), bytes.fromhex("a003020105")
        assert v3 in by_type[2]
        return [CertEntry(t, b.replace(v3, bad, 1) if t == 2 else b) for t, b in by_type.items()]
    init, resp = make_pair(relay_a)
    with pytest.raises(CertificateError):
        run(init, resp, to_init=rewrite_certs(bad_version))


@pytest.mark.parametrize("cert_type", [2, 4, 5, 7])
def test_responder_certs_mixed_from_two_relays(relay_a, relay_b, cert_type):
    """Each certificate of another relay breaks the chain wherever it is put."""
    init, resp = make_pair(relay_a)
    with pytest.raises(CertificateError):
        run(init, resp, to_init=rewrite_certs(_swap(cert_type, cert_type, relay_b)))


def test_responder_type_5_must_match_tls_cert(relay_a, relay_b):
    init, resp = make_pair(relay_a, tls_cert_der=relay_b.tls_cert_der)
    with pytest.raises(CertificateError, match="TLS certificate"):
        run(init, resp)


def test_responder_certs_expired(relay_a):
    signing = Ed25519Cert.parse(dict(relay_a.certs_for_responder())[4])
    later = max(signing.expires_at, NOW) + 3600
    init, resp = make_pair(relay_a, now=later, responder_now=NOW)
    with pytest.raises(CertificateError, match="expired"):
        run(init, resp)


def test_responder_certs_far_future(relay_a):
    init, resp = make_pair(relay_a, now=NOW + 20 * 365 * 86400, responder_now=NOW)
    with pytest.raises(CertificateError):
        run(init, resp)


def test_ignored_extra_cert_types(relay_a):
    """Types we do not need (e.g. an obsolete type 1) are ignored."""
    init, resp = make_pair(relay_a)
    extra = rewrite_certs(lambda bt: [CertEntry(t, b) for t, b in bt.items()] + [CertEntry(1, b"junk")])
    # Tampering changes the responder's log as the initiator sees it; a client does not care.
    run(init, resp, to_init=extra)
    assert init.peer == identity_of(relay_a)


# ---------------------------------------------------------------------------
# The responder checking an authenticating initiator


@pytest.mark.parametrize("name, fn", [
    ("bad signature on type 4", _bad_sig_type4),
    ("missing type 6", _drop(6)),
    ("missing type 2", _drop(2)),
    ("duplicate type 6", _duplicate(6)),
])
def test_tampered_initiator_certs(relay_a, relay_b, name, fn):
    init, resp = make_pair(relay_a, relay_b)
    with pytest.raises(CertificateError):
        run(init, resp, to_resp=rewrite_certs(fn))


def test_initiator_certs_expired_for_responder(relay_a, relay_b):
    signing = Ed25519Cert.parse(dict(relay_b.certs_for_initiator())[4])
    init, resp = make_pair(relay_a, relay_b, responder_now=max(signing.expires_at, NOW) + 3600)
    # The responder's own certs are checked by the initiator at NOW, so they pass.
    with pytest.raises(CertificateError):
        run(init, resp)


# AUTH0003 field offsets: TYPE 0, CID 8, SID 40, CID_ED 72, SID_ED 104, SLOG 136, CLOG 168,
# SCERT 200, TLSSECRETS 232, RAND 264, SIG 288.
@pytest.mark.parametrize("offset", [0, 8, 40, 72, 104, 136, 168, 200, 232, 264, 287, 288, 351])
def test_tampered_authenticate(relay_a, relay_b, offset):
    def flip(p: bytes) -> bytes:
        return flip_bit(p, 4 + offset, offset % 8)
    init, resp = make_pair(relay_a, relay_b)
    with pytest.raises(HandshakeError):
        run(init, resp, to_resp=rewrite(CellCommand.AUTHENTICATE, flip))
    assert resp.peer is None


def test_authenticate_layout(relay_a, relay_b):
    seen = []

    def grab(cell: Cell) -> Cell:
        if cell.command == CellCommand.AUTHENTICATE:
            seen.append(Authenticate.parse(cell.payload))
        return cell
    init, resp = make_pair(relay_a, relay_b)
    run(init, resp, to_resp=grab)
    (auth,) = seen
    assert auth.auth_type == 3 and len(auth.auth) == AUTH0003_LEN
    body = auth.auth
    cid = rsa_key_sha256(relay_b.rsa_identity.public_key())
    assert body[:8] == b"AUTH0003"
    assert body[8:40] == cid
    assert body[40:72] == rsa_key_sha256(relay_a.rsa_identity.public_key())
    assert body[72:104] == bytes(relay_b.identity_public)
    assert body[104:136] == bytes(relay_a.identity_public)
    assert body[200:232] == hashlib.sha256(relay_a.tls_cert_der).digest()
    # TLSSECRETS uses CID as the exporter context, as C tor does (see specs/link.md §6).
    assert body[232:264] == fixed_exporter(AUTH0003_LABEL, cid)


def test_authenticate_with_extra_signed_bytes_accepted(relay_a, relay_b):
    """Bytes between RAND and SIG are signed but otherwise ignored (tor-spec)."""
    def extend(p: bytes) -> bytes:
        auth = Authenticate.parse(p)
        signed = auth.auth[:-64] + b"extra"
        sig = relay_b.link_auth_key.sign(signed)
        return Authenticate(3, signed + sig).encode()
    init, resp = make_pair(relay_a, relay_b)
    run(init, resp, to_resp=rewrite(CellCommand.AUTHENTICATE, extend))
    assert resp.peer == identity_of(relay_b)


def test_authenticate_short_rejected(relay_a, relay_b):
    init, resp = make_pair(relay_a, relay_b)
    with pytest.raises(HandshakeError, match="too short"):
        run(init, resp, to_resp=rewrite(CellCommand.AUTHENTICATE,
                                        lambda p: Authenticate(3, Authenticate.parse(p).auth[:-1]).encode()))


def test_authenticate_wrong_type_rejected(relay_a, relay_b):
    init, resp = make_pair(relay_a, relay_b)
    with pytest.raises(HandshakeError, match="type 1"):
        run(init, resp, to_resp=rewrite(CellCommand.AUTHENTICATE,
                                        lambda p: Authenticate(1, Authenticate.parse(p).auth).encode()))


def test_authenticate_bound_to_tls_session(relay_a, relay_b):
    """A different exporter value (another TLS session) makes TLSSECRETS wrong."""
    init, resp = make_pair(relay_a, relay_b, initiator_exporter=lambda label, ctx: bytes(32))
    with pytest.raises(HandshakeError, match="TLSSECRETS"):
        run(init, resp)


def test_clog_covers_injected_cells(relay_a, relay_b):
    """A cell the initiator did not send (injected in flight) breaks CLOG."""
    injected = []

    def inject(cell: Cell) -> Cell:
        if cell.command == CellCommand.CERTS and not injected:
            injected.append(cell)
            resp.receive_cell(Cell(0, CellCommand.VPADDING, b"\x00" * 7))
        return cell
    init, resp = make_pair(relay_a, relay_b)
    with pytest.raises(HandshakeError, match="CLOG"):
        run(init, resp, to_resp=inject)


# ---------------------------------------------------------------------------
# Version negotiation and cell-order violations


def test_no_common_version_responder(relay_a):
    _, resp = make_pair(relay_a)
    resp.start()
    with pytest.raises(HandshakeError, match="no common"):
        resp.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((1, 2, 3)).encode()))
    with pytest.raises(LocalProtocolError):
        resp.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((4,)).encode()))


def test_no_common_version_initiator(relay_a):
    init, _ = make_pair(relay_a)
    init.start()
    assert init.data_to_send() == versions_cell()
    with pytest.raises(HandshakeError):
        init.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((3,)).encode()))


def test_odd_versions_payload(relay_a):
    _, resp = make_pair(relay_a)
    resp.start()
    with pytest.raises(ProtocolError):
        resp.receive_cell(Cell(0, CellCommand.VERSIONS, b"\x00\x04\x00"))


@pytest.mark.parametrize("first", [CellCommand.NETINFO, CellCommand.CERTS, CellCommand.CREATE2,
                                   CellCommand.AUTHORIZE, CellCommand.PADDING])
def test_first_cell_must_be_versions(relay_a, first):
    _, resp = make_pair(relay_a)
    resp.start()
    with pytest.raises(ProtocolError):
        resp.receive_cell(Cell(0, first, b""))


def test_unexpected_cells_after_versions(relay_a):
    init, resp = make_pair(relay_a)
    resp.start()
    resp.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((4, 5)).encode()))
    resp.data_to_send()
    with pytest.raises(ProtocolError, match="unexpected"):
        resp.receive_cell(Cell(0x80000001, CellCommand.CREATE2, bytes(509)))
    init.start()
    init.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((4, 5)).encode()))
    with pytest.raises(ProtocolError, match="unexpected"):
        init.receive_cell(Cell(0, CellCommand.NETINFO, NetInfo(0, None).encode()))  # NETINFO before CERTS


def test_authenticate_without_certs(relay_a):
    _, resp = make_pair(relay_a)
    resp.start()
    resp.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((4, 5)).encode()))
    with pytest.raises(ProtocolError):
        resp.receive_cell(Cell(0, CellCommand.AUTHENTICATE, Authenticate(3, bytes(352)).encode()))


def test_nonzero_circ_id_on_handshake_cell(relay_a):
    _, resp = make_pair(relay_a)
    resp.start()
    resp.receive_cell(Cell(0, CellCommand.VERSIONS, Versions((4, 5)).encode()))
    with pytest.raises(ProtocolError, match="circuit ID"):
        resp.receive_cell(Cell(5, CellCommand.NETINFO, NetInfo(0, None).encode().ljust(509, b"\0")))


def test_api_misuse(relay_a):
    with pytest.raises(LocalProtocolError):
        LinkHandshake(initiator=False, keys=None, now=NOW)
    hs = LinkHandshake(initiator=True, keys=None, now=NOW)
    with pytest.raises(LocalProtocolError):
        hs.start()  # before tls_established
    with pytest.raises(LocalProtocolError):
        hs.receive_cell(Cell(0, CellCommand.VERSIONS, b"\x00\x04"))


# ---------------------------------------------------------------------------
# Fuzzing: hostile bytes only ever raise ProtocolError


def _feed_all(hs: LinkHandshake, data: bytes) -> None:
    reader = CellReader(2)
    reader.receive_data(data)
    while not hs.done:
        reader.circ_id_len = hs.circ_id_len
        cell = reader.next_cell()
        if cell is None:
            return
        hs.receive_cell(cell)
        hs.data_to_send()


def _fresh(keys: RelayKeys, initiator: bool) -> LinkHandshake:
    if initiator:
        hs = LinkHandshake(initiator=True, keys=keys, now=NOW)
        hs.tls_established(None, keys.tls_cert_der, fixed_exporter)
    else:
        hs = LinkHandshake(initiator=False, keys=keys, now=NOW)
        hs.tls_established(keys.tls_cert_der, None, fixed_exporter)
    hs.start()
    hs.data_to_send()
    return hs


_HANDSHAKE_CMDS = [0, 7, 8, 128, 129, 130, 131, 132, 10]


@st.composite
def cell_streams(draw):
    """Mostly well-framed handshake cells with random payloads, after a valid VERSIONS cell."""
    out = [versions_cell()] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 5))):
        cmd = draw(st.sampled_from(_HANDSHAKE_CMDS))
        payload = draw(st.binary(max_size=600))
        if cmd in (7, 128, 129, 130, 131, 132):
            out.append(encode_var(0, cmd, payload))
        else:
            out.append(encode_fixed(0, cmd, payload[:509]))
    out.append(draw(st.binary(max_size=64)))
    return b"".join(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=2000), cell_streams()), initiator=st.booleans())
def test_fuzz_only_protocol_errors(relay_a, data, initiator):
    hs = _fresh(relay_a, initiator)
    try:
        _feed_all(hs, data)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 10_000), value=st.integers(0, 255))
def test_fuzz_mutated_responder_stream(relay_a, index, value):
    """Any single-byte change to a genuine responder stream is caught or harmless."""
    init, resp = make_pair(relay_a)
    init.start()
    resp.start()
    r = CellReader(2)
    deliver(resp, r, init.data_to_send())
    stream = bytearray(resp.data_to_send())
    stream[index % len(stream)] = value
    try:
        _feed_all(init, bytes(stream))
    except ProtocolError:
        return
    if init.done:  # only padding bytes or ignored fields were hit
        assert init.peer == identity_of(relay_a)


# ---------------------------------------------------------------------------
# Real TLS on 127.0.0.1


async def drive(hs: LinkHandshake, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                own_der: bytes | None) -> None:
    sslobj = writer.get_extra_info("ssl_object")
    hs.tls_established(own_der, tls.peer_cert_der(sslobj),
                       lambda label, ctx: tls.export_keying_material(sslobj, label, ctx, 32))
    hs.start()
    writer.write(hs.data_to_send())
    cells = CellReader(2)
    while not hs.done:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("peer closed during handshake")
        cells.receive_data(data)
        while not hs.done:
            cells.circ_id_len = hs.circ_id_len
            cell = cells.next_cell()
            if cell is None:
                break
            hs.receive_cell(cell)
            writer.write(hs.data_to_send())
        await writer.drain()
    # After the handshake, exchange one PADDING cell with 4-byte CircIDs to check framing.
    writer.write(encode_fixed(0, CellCommand.PADDING, circ_id_len=hs.circ_id_len))
    await writer.drain()
    cells.circ_id_len = hs.circ_id_len
    while (cell := cells.next_cell()) is None:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("peer closed after handshake")
        cells.receive_data(data)
    assert cell.command == CellCommand.PADDING and cells.buffered == 0


async def tls_handshake(server_keys: RelayKeys, client_keys: RelayKeys | None, *,
                        responder_keys: RelayKeys | None = None,
                        expected: PeerIdentity | None = None, tls_max=None):
    """Run the link handshake over real TLS; returns (initiator, responder) handshakes."""
    responder_keys = responder_keys or server_keys
    resp = LinkHandshake(initiator=False, keys=responder_keys, my_addresses=("127.0.0.1",),
                         peer_address="127.0.0.1", now=time.time())
    init = LinkHandshake(initiator=True, keys=client_keys, expected=expected,
                         peer_address="127.0.0.1", now=time.time())
    server_done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_conn(reader, writer):
        try:
            await drive(resp, reader, writer, server_keys.tls_cert_der)
            server_done.set_result(None)
        except Exception as exc:  # reported to the test below
            server_done.set_exception(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls.server_context(server_keys))
    port = server.sockets[0].getsockname()[1]
    try:
        ctx = tls.client_context()
        if tls_max is not None:
            ctx.maximum_version = tls_max
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        try:
            if tls_max is not None:
                assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
            assert tls.peer_cert_der(writer.get_extra_info("ssl_object")) == server_keys.tls_cert_der
            client_err = None
            try:
                await asyncio.wait_for(drive(init, reader, writer, None), 20)
            except Exception as exc:
                client_err = exc
        finally:
            writer.close()
        if client_err is not None:
            try:  # the server sees the connection drop; collect (and drop) its error
                await asyncio.wait_for(server_done, 20)
            except Exception:
                pass
            raise client_err
        await asyncio.wait_for(server_done, 20)
    finally:
        server.close()
        await server.wait_closed()
    return init, resp


async def test_tls_client_initiator(relay_a):
    init, resp = await tls_handshake(relay_a, None, expected=identity_of(relay_a))
    assert init.link_version == 5
    assert init.peer == identity_of(relay_a)
    assert resp.peer is None
    assert resp.peer_netinfo.timestamp == 0


@pytest.mark.parametrize("tls_max", [None, ssl.TLSVersion.TLSv1_2], ids=["tls-default", "tls1.2"])
async def test_tls_relay_initiator(relay_a, relay_b, tls_max):
    init, resp = await tls_handshake(relay_a, relay_b, expected=identity_of(relay_a), tls_max=tls_max)
    assert init.peer == identity_of(relay_a)
    assert resp.peer == identity_of(relay_b)
    assert resp.link_version == 5


async def test_tls_impostor_link_cert_rejected(relay_a, relay_b):
    """Relay A's CERTS over a TLS session that shows B's link certificate: type 5 mismatch."""
    with pytest.raises(CertificateError):
        await tls_handshake(relay_b, None, responder_keys=relay_a)


async def test_tls_exporter_agrees(relay_a):
    """Both TLS ends compute the same RFC 5705 value; different labels/contexts differ."""
    assert tls.exporter_available()
    results: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_conn(reader, writer):
        sslobj = writer.get_extra_info("ssl_object")
        assert tls.peer_cert_der(sslobj) is None  # no client certificate requested
        results.set_result((tls.export_keying_material(sslobj, b"label", b"c" * 32),
                            tls.export_keying_material(sslobj, b"label", b"d" * 32)))
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls.server_context(relay_a))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client_context())
        sslobj = writer.get_extra_info("ssl_object")
        mine = tls.export_keying_material(sslobj, b"label", b"c" * 32)
        theirs, theirs_d = await asyncio.wait_for(results, 10)
        assert mine == theirs and len(mine) == 32
        assert theirs_d != theirs
        assert tls.export_keying_material(sslobj, b"other", b"c" * 32) != mine
        assert len(tls.export_keying_material(sslobj, b"label", b"", 64)) == 64
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_exporter_rejects_non_tls_objects():
    from onionp2p.errors import OnionError
    with pytest.raises(OnionError, match="TLS exporter unavailable"):
        tls.export_keying_material(object(), b"x", b"y")
    assert tls.peer_cert_der(None) is None
