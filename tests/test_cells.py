"""Channel cell framing and link payload codecs (onionp2p.proto.cells)."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionp2p.errors import LocalProtocolError, ProtocolError
from onionp2p.proto import cells as C

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ipv4 = st.builds(ipaddress.IPv4Address, u32)
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ip = st.one_of(ipv4, ipv6)


def test_client_versions_cell_matches_tor():
    # tor-spec: a client's VERSIONS cell, 2-byte CircID, offering 3, 4 and 5.
    cell = C.encode_var(0, C.CellCommand.VERSIONS, C.Versions((3, 4, 5)).encode(), circ_id_len=2)
    assert cell == bytes.fromhex("0000070006000300040005")


def test_fixed_cell_layout():
    raw = C.encode_fixed(0x80000001, C.CellCommand.DESTROY, C.Destroy(C.DestroyReason.FINISHED).encode())
    assert len(raw) == C.CELL_LEN == 514
    assert raw[:5] == bytes.fromhex("8000000104") and raw[5] == 9 and raw[6:] == bytes(508)


def test_fixed_cell_too_long():
    with pytest.raises(LocalProtocolError):
        C.encode_fixed(1, 3, bytes(510))


cells_strategy = st.lists(
    st.one_of(
        st.builds(C.Cell, u32, st.sampled_from([0, 3, 4, 9, 10, 11]), st.binary(min_size=509, max_size=509)),
        st.builds(C.Cell, u32, st.sampled_from([7, 128, 129, 130, 131, 200]), st.binary(max_size=2000)),
    ),
    max_size=8,
)


@given(cells_strategy, st.lists(st.integers(1, 700), min_size=1, max_size=30))
def test_reader_reassembles_any_chunking(cells, cuts):
    stream = b"".join(C.encode_cell(c) for c in cells)
    reader = C.CellReader(circ_id_len=4)
    out, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        reader.receive_data(stream[pos : pos + step])
        pos += step
        i += 1
        out.extend(reader.cells())
    assert out == cells
    assert reader.buffered == 0


def test_reader_switches_circid_width_mid_buffer():
    versions = C.encode_var(0, 7, C.Versions((4, 5)).encode(), circ_id_len=2)
    certs = C.encode_var(0, 129, C.Certs(()).encode(), circ_id_len=4)
    reader = C.CellReader()
    reader.receive_data(versions + certs)
    first = reader.next_cell()
    assert C.Versions.parse(first.payload).versions == (4, 5)
    reader.circ_id_len = 4
    second = reader.next_cell()
    assert second.command == 129 and second.circ_id == 0
    assert reader.next_cell() is None


def test_reader_bounds_var_cells():
    reader = C.CellReader(circ_id_len=4, max_var_payload=1000)
    reader.receive_data(b"\0\0\0\0\x81\xff\xff")
    with pytest.raises(ProtocolError):
        reader.next_cell()


@given(st.binary(max_size=3000), st.sampled_from([2, 4]))
def test_reader_random_bytes_only_protocolerror(data, width):
    reader = C.CellReader(circ_id_len=width)
    reader.receive_data(data)
    try:
        list(reader.cells())
    except ProtocolError:
        pass


# --- payload round trips ----------------------------------------------------

payloads = st.one_of(
    st.builds(C.Versions, st.lists(u16, max_size=20).map(tuple)),
    st.builds(C.NetInfo, u32, st.one_of(st.none(), ip), st.lists(ip, max_size=5).map(tuple)),
    st.builds(C.Certs, st.lists(st.builds(C.CertEntry, u8, st.binary(max_size=300)), max_size=6).map(tuple)),
    st.builds(C.AuthChallenge, st.binary(min_size=32, max_size=32), st.lists(u16, max_size=8).map(tuple)),
    st.builds(C.Authenticate, u16, st.binary(max_size=400)),
    st.builds(C.Create2, u16, st.binary(max_size=505)),
    st.builds(C.Created2, st.binary(max_size=507)),
    st.builds(C.Destroy, st.sampled_from(list(C.DestroyReason))),
    st.builds(C.PaddingNegotiate, st.sampled_from([1, 2]), u16, u16),
)


@given(payloads)
def test_payload_round_trip(msg):
    raw = msg.encode()
    back = type(msg).parse(raw)
    if isinstance(msg, C.NetInfo) and msg.other_address is None:
        # "no address" is sent as 0.0.0.0
        assert back.other_address == ipaddress.IPv4Address(0)
        back = C.NetInfo(back.timestamp, None, back.my_addresses)
    assert back == msg
    assert back.encode() == raw


@given(payloads)
def test_fixed_payloads_survive_cell_padding(msg):
    # Fixed-cell payloads are parsed from the 509-byte padded payload.
    if C.is_var_command(msg.command):
        return
    raw = msg.encode()
    assert type(msg).parse(raw + bytes(509 - len(raw))).encode() == raw


PARSERS = [C.Versions, C.NetInfo, C.Certs, C.AuthChallenge, C.Authenticate, C.Create2, C.Created2,
           C.Destroy, C.PaddingNegotiate]


@settings(max_examples=300)
@given(st.sampled_from(PARSERS), st.binary(max_size=600))
def test_parsers_raise_only_protocolerror(cls, data):
    try:
        cls.parse(data)
    except ProtocolError:
        pass


@given(payloads, st.data())
def test_truncated_payloads_raise_only_protocolerror(msg, data):
    raw = msg.encode()
    cut = data.draw(st.integers(0, len(raw)))
    try:
        type(msg).parse(raw[:cut])
    except ProtocolError:
        pass


def test_versions_odd_length_is_fatal():
    with pytest.raises(ProtocolError):
        C.Versions.parse(b"\0\x04\0")


def test_certs_duplicate_type_rejected():
    certs = C.Certs((C.CertEntry(4, b"a"), C.CertEntry(4, b"b")))
    with pytest.raises(ProtocolError):
        C.Certs.parse(certs.encode()).by_type()


def test_netinfo_ignores_unknown_address_types_and_trailing_bytes():
    raw = bytes.fromhex("00000001" "0404" "7f000001" "02" "0903616263" "0404" "0a000001") + b"junk"
    ni = C.NetInfo.parse(raw)
    assert ni.timestamp == 1
    assert str(ni.other_address) == "127.0.0.1"
    assert [str(a) for a in ni.my_addresses] == ["10.0.0.1"]


def test_destroy_unknown_reason_kept():
    assert C.Destroy.parse(b"\x63").reason == 0x63
