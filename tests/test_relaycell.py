"""Relay cell bodies and relay message codecs (onionp2p.proto.relaycell)."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionp2p.errors import LocalProtocolError, ProtocolError
from onionp2p.proto import relaycell as R

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ipv4 = st.builds(ipaddress.IPv4Address, u32)
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
hostname = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?", fullmatch=True)
port = st.integers(1, 65535)


def test_relay_body_layout():
    body = R.pack_relay(R.RelayCommand.DATA, 0x1234, b"hello")
    assert len(body) == 509
    assert body[:11] == bytes.fromhex("02" "0000" "1234" "00000000" "0005")
    assert body[11:16] == b"hello"
    assert body[16:20] == bytes(4)  # padding starts with four zero bytes
    assert R.unpack_relay(bytes(body)) == (2, 0x1234, b"hello")


def test_relay_padding_is_random():
    a = R.pack_relay(R.RelayCommand.DATA, 1, b"x")
    b = R.pack_relay(R.RelayCommand.DATA, 1, b"x")
    assert a[20:] != b[20:]


@given(u8, u16, st.binary(max_size=498))
def test_relay_body_round_trip(cmd, sid, data):
    assert R.unpack_relay(bytes(R.pack_relay(cmd, sid, data))) == (cmd, sid, data)


def test_relay_data_too_long():
    with pytest.raises(LocalProtocolError):
        R.pack_relay(2, 1, bytes(499))
    body = bytearray(R.pack_relay(2, 1, b""))
    body[9:11] = (499).to_bytes(2, "big")
    with pytest.raises(ProtocolError):
        R.unpack_relay(bytes(body))


@given(st.binary(max_size=600))
def test_unpack_relay_random(data):
    try:
        R.unpack_relay(data)
    except ProtocolError:
        pass


link_spec = st.one_of(
    st.builds(lambda a, p: R.LinkSpec.ipv4(str(a), p), ipv4, u16),
    st.builds(lambda a, p: R.LinkSpec.ipv6(str(a), p), ipv6, u16),
    st.builds(R.LinkSpec.legacy_id, st.binary(min_size=20, max_size=20)),
    st.builds(R.LinkSpec.ed25519_id, st.binary(min_size=32, max_size=32)),
    st.builds(R.LinkSpec, st.integers(4, 255), st.binary(max_size=20)),
)

messages = st.one_of(
    st.builds(R.Begin, st.one_of(hostname, ipv4.map(str), ipv6.map(str)), port, u32),
    st.just(R.BeginDir()),
    st.builds(R.Data, st.binary(max_size=498)),
    st.builds(R.End, st.sampled_from([r for r in R.EndReason if r != R.EndReason.EXITPOLICY])),
    st.builds(R.End, st.just(R.EndReason.EXITPOLICY), st.one_of(ipv4, ipv6), u32),
    st.builds(R.Connected),
    st.builds(R.Connected, st.one_of(ipv4.filter(lambda a: int(a) >> 24 != 0), ipv6), u32),
    st.just(R.Sendme()),
    st.builds(R.Sendme, st.just(1), st.binary(min_size=20, max_size=20)),
    st.builds(R.Extend2, st.lists(link_spec, max_size=5).map(tuple), u16, st.binary(max_size=200)),
    st.builds(R.Extended2, st.binary(max_size=400)),
    st.just(R.Truncate()),
    st.builds(R.Truncated, u8),
    st.builds(R.Drop, st.binary(max_size=498)),
    st.builds(R.Resolve, hostname.filter(bool)),
    st.builds(R.Resolved, st.lists(st.builds(R.ResolvedAnswer, u8, st.binary(max_size=30), u32),
                                   max_size=6).map(tuple)),
)


@given(messages)
def test_message_round_trip(msg):
    raw = msg.encode()
    assert len(raw) <= R.RELAY_DATA_MAX
    back = R.parse_message(msg.command, raw)
    if isinstance(msg, R.Begin) and ":" not in msg.host:
        msg = R.Begin(msg.host.lower(), msg.port, msg.flags)
    if isinstance(msg, R.Begin) and ":" in msg.host:
        msg = R.Begin(str(ipaddress.IPv6Address(msg.host)), msg.port, msg.flags)
    assert back == msg
    assert back.encode() == raw


@settings(max_examples=500)
@given(st.sampled_from(sorted(R._PARSERS)), st.binary(max_size=520))
def test_message_parsers_raise_only_protocolerror(cmd, data):
    try:
        R.parse_message(cmd, data)
    except ProtocolError:
        pass


@given(messages, st.data())
def test_truncated_messages_raise_only_protocolerror(msg, data):
    raw = msg.encode()
    cut = data.draw(st.integers(0, len(raw)))
    try:
        R.parse_message(msg.command, raw[:cut])
    except ProtocolError:
        pass


def test_begin_wire_format():
    assert R.Begin("Example.COM", 443).encode() == b"example.com:443\0"
    assert R.Begin("::1", 80, R.Begin.IPV6_OK).encode() == b"[::1]:80\0\0\0\0\x01"
    assert R.Begin.parse(b"[::1]:80\0\0\0\0\x01") == R.Begin("::1", 80, 1)


@pytest.mark.parametrize("raw", [b"host:0\0", b"host:99999\0", b"host\0", b"nonul:80", b":80\0",
                                 b"[::1:80\0", b"h\x01st:80\0", b"\xffhost:80\0"])
def test_begin_rejects_bad_addresses(raw):
    with pytest.raises(ProtocolError):
        R.Begin.parse(raw)


def test_connected_formats():
    assert R.Connected(ipaddress.IPv4Address("1.2.3.4"), 300).encode() == bytes.fromhex("010203040000012c")
    v6 = R.Connected(ipaddress.IPv6Address("2001:db8::1"), 60).encode()
    assert v6[:5] == bytes.fromhex("0000000006") and len(v6) == 25
    assert R.Connected.parse(b"") == R.Connected()


def test_end_empty_means_misc_and_exitpolicy_address():
    assert R.End.parse(b"").reason == R.EndReason.MISC
    e = R.End.parse(bytes.fromhex("04" "7f000001" "00000e10"))
    assert e.reason == R.EndReason.EXITPOLICY and str(e.address) == "127.0.0.1" and e.ttl == 3600


def test_sendme_v1_layout():
    d = bytes(range(20))
    assert R.Sendme(1, d).encode() == b"\x01\x00\x14" + d
    assert R.Sendme().encode() == b""
    with pytest.raises(ProtocolError):
        R.Sendme.parse(b"\x01\x00\x03abc")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_sendme_struct_path_agrees_with_the_declared_layout(raw):
    """Sendme encodes/parses with precompiled struct (hot path); the construct declaration
    ``_SENDME`` is the layout of record: both accept and reject the same bytes, alike."""
    import construct

    try:
        rec = R._SENDME.parse(raw) if raw else None
        declared = None if rec is None else (rec.version, rec.data)
        if declared is not None and declared[0] == 1 and len(declared[1]) not in (16, 20):
            declared = "bad"
    except construct.ConstructError:
        declared = "bad"
    try:
        got = R.Sendme.parse(raw)
        ours = None if not raw else (got.version, got.digest)
    except ProtocolError:
        ours = "bad"
    assert ours == declared
    if isinstance(ours, tuple) and ours != (0, b""):  # v0 with no data is sent as an empty body
        assert R.Sendme(*ours).encode() == R._SENDME.build({"version": ours[0], "data": ours[1]})


def test_extend2_layout_and_bad_spec_length():
    ext = R.Extend2((R.LinkSpec.ipv4("127.0.0.1", 9001), R.LinkSpec.legacy_id(bytes(20))), 2, b"x" * 84)
    raw = ext.encode()
    assert raw[0] == 2 and raw[1:3] == b"\x00\x06" and raw[3:9] == bytes.fromhex("7f0000012329")
    assert R.Extend2.parse(raw).find(R.LinkSpecType.IPV4).hostport() == ("127.0.0.1", 9001)
    with pytest.raises(ProtocolError):
        R.Extend2.parse(bytes.fromhex("01" "00" "05" "7f00000123" "0002" "0000"))


def test_resolved_truncated_rejected():
    good = R.Resolved((R.ResolvedAnswer(4, bytes(4), 60),)).encode()
    assert R.Resolved.parse(good).answers[0].value_text() == "0.0.0.0"
    with pytest.raises(ProtocolError):
        R.Resolved.parse(good + b"\x04")


def test_unknown_command_is_none():
    assert R.parse_message(99, b"whatever") is None


# -- relay message format v1 (with CGO) ---------------------------------------------------------------

def test_v1_message_format():
    from onionp2p.proto.relaycell import V1_DATA_MAX, pack_relay_v1, parse_v1_header, unpack_relay_v1

    assert V1_DATA_MAX == 488
    # stream commands carry a stream ID (tag 16 | cmd | len u16 | sid u16 | data), others not
    body = pack_relay_v1(R.RelayCommand.DATA, 0x1234, b"abc")
    assert len(body) == 509 and body[:16] == bytes(16)
    assert bytes(body[16:24]) == b"\x02\x00\x03\x12\x34abc" and bytes(body[24:28]) == bytes(4)
    assert unpack_relay_v1(bytes(body)) == (2, 0x1234, b"abc")
    body = pack_relay_v1(R.RelayCommand.SENDME, 0, b"\x01\x00\x10" + bytes(16))
    assert bytes(body[16:22]) == b"\x05\x00\x13\x01\x00\x10"
    assert unpack_relay_v1(bytes(body)) == (5, 0, b"\x01\x00\x10" + bytes(16))
    assert parse_v1_header(pack_relay_v1(R.RelayCommand.EXTEND2, 0, b"x" * 490))[2:] == (19, 490)
    assert unpack_relay_v1(bytes(pack_relay_v1(R.RelayCommand.DATA, 9, b"d" * 488)))[2] == b"d" * 488
    # what cannot be encoded
    for cmd, sid, data in ((R.RelayCommand.SENDME, 5, b""),
                           (R.RelayCommand.DATA, 1, b"d" * 489), (R.RelayCommand.EXTEND2, 0, b"x" * 491)):
        with pytest.raises(LocalProtocolError):
            pack_relay_v1(cmd, sid, data)
    # what is refused from the network: unknown commands, lengths past the end
    bad = bytearray(pack_relay_v1(R.RelayCommand.DATA, 1, b""))
    bad[16] = 200
    with pytest.raises(ProtocolError, match="unknown relay command"):
        unpack_relay_v1(bytes(bad))
    bad = bytearray(pack_relay_v1(R.RelayCommand.DATA, 1, b""))
    bad[17:19] = (489).to_bytes(2, "big")
    with pytest.raises(ProtocolError, match="exceeds 488"):
        unpack_relay_v1(bytes(bad))
    bad = bytearray(pack_relay_v1(R.RelayCommand.DROP, 0, b""))
    bad[17:19] = (491).to_bytes(2, "big")
    with pytest.raises(ProtocolError, match="exceeds 490"):
        unpack_relay_v1(bytes(bad))
    # tor's other known commands (onion services, padding negotiation) parse
    ok = bytearray(pack_relay_v1(R.RelayCommand.DROP, 0, b""))
    ok[16] = 41
    assert unpack_relay_v1(bytes(ok))[0] == 41


def test_sendme_v1_takes_tor1_digests_and_cgo_tags():
    assert R.Sendme.parse(R.Sendme(1, bytes(16)).encode()).digest == bytes(16)
    assert R.Sendme.parse(R.Sendme(1, bytes(20)).encode()).digest == bytes(20)
    with pytest.raises(ProtocolError):
        R.Sendme.parse(R.Sendme(1, bytes(17)).encode())
