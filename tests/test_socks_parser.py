"""The sans-IO SOCKS parser (every message shape and error path) and reply-code mapping."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionp2p.errors import ProtocolError
from onionp2p.relaycell import EndReason
from onionp2p.socks_front import HTTP_NOT_A_PROXY, SocksError, SocksParser, reply_code_for


def feed(*chunks):
    p = SocksParser()
    out = b""
    for c in chunks:
        out += p.receive(c)
    return p, out


def test_socks5_noauth_domain_connect():
    p, out = feed(b"\x05\x01\x00", b"\x05\x01\x00\x03\x0bexample.com\x00\x50")
    assert out == b"\x05\x00"
    r = p.request
    assert (r.version, r.command, r.host, r.port, r.username) == (5, "connect", "example.com", 80, None)


def test_socks5_prefers_userpass_and_accepts_empty_credentials():
    p, out = feed(b"\x05\x02\x00\x02", b"\x01\x00\x00", b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90")
    assert out == b"\x05\x02\x01\x00"
    assert p.request.username == b"" and p.request.password == b""
    assert p.request.host == "127.0.0.1" and p.request.port == 8080


def test_isolation_keys_follow_credentials():
    a, _ = feed(b"\x05\x01\x02\x01\x01a\x01x\x05\x01\x00\x01\x01\x02\x03\x04\x00\x50")
    b, _ = feed(b"\x05\x01\x02\x01\x01b\x01x\x05\x01\x00\x01\x01\x02\x03\x04\x00\x50")
    a2, _ = feed(b"\x05\x01\x02", b"\x01\x01a\x01x", b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x50")
    n, _ = feed(b"\x05\x01\x00\x05\x01\x00\x01\x01\x02\x03\x04\x00\x50")
    assert a.request.isolation_key == a2.request.isolation_key
    assert len({a.request.isolation_key, b.request.isolation_key, n.request.isolation_key}) == 3


def test_socks5_ipv6_and_tor_extensions():
    v6 = bytes(15) + b"\x01"
    p, _ = feed(b"\x05\x01\x00\x05\x01\x00\x04" + v6 + b"\x01\xbb")
    assert p.request.host == "::1" and p.request.port == 443
    p, _ = feed(b"\x05\x01\x00\x05\xf0\x00\x03\x09localhost\x00\x00")
    assert p.request.command == "resolve" and p.request.host == "localhost"
    p, _ = feed(b"\x05\x01\x00\x05\xf1\x00\x01\x7f\x00\x00\x01\x00\x00")
    assert p.request.command == "resolve_ptr" and p.request.host == "127.0.0.1"


def test_socks4_and_4a():
    p, out = feed(b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00")
    assert out == b"" and (p.request.version, p.request.host, p.request.port) == (4, "127.0.0.1", 80)
    assert p.request.username == b"user"
    p, _ = feed(b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00", b"example.org\x00")
    assert p.request.host == "example.org" and p.request.port == 443 and p.request.username is None
    p, _ = feed(b"\x04\xf0\x00\x00\x00\x00\x00\x01\x00localhost\x00")
    assert p.request.command == "resolve"


@pytest.mark.parametrize("data, reply", [
    (b"\x05\x01\x00\x05\x02\x00\x01\x01\x02\x03\x04\x00\x50", b"\x05\x07"),  # BIND
    (b"\x05\x01\x00\x05\x03\x00\x01\x01\x02\x03\x04\x00\x50", b"\x05\x07"),  # UDP ASSOCIATE
    (b"\x05\x01\x00\x05\x01\x00\x07\x01\x02\x03\x04\x00\x50", b"\x05\x08"),  # unknown ATYP
    (b"\x05\x01\x00\x05\xf1\x00\x03\x04host\x00\x00", b"\x05\x01"),  # RESOLVE_PTR of a name
    (b"\x05\x01\x00\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00", b"\x05\x01"),  # port 0
    (b"\x05\x01\x01", b"\x05\xff"),  # GSSAPI only
    (b"\x04\x02\x00\x50\x01\x02\x03\x04\x00", b"\x00\x5b"),  # SOCKS4 BIND
    (b"GET / HTTP/1.1\r\n", HTTP_NOT_A_PROXY[:10]),
])
def test_refusals_have_the_right_reply(data, reply):
    with pytest.raises(SocksError) as e:
        feed(data)
    assert e.value.reply.startswith(reply)


def test_bad_version_and_oversize():
    with pytest.raises(SocksError):
        feed(b"\x06\x01\x00")
    with pytest.raises(SocksError):
        feed(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 2000)


def test_reply_codes_follow_tor():
    assert reply_code_for(EndReason.EXITPOLICY) == 2
    assert reply_code_for(EndReason.RESOLVEFAILED) == 4
    assert reply_code_for(EndReason.CONNECTREFUSED) == 5
    assert reply_code_for(EndReason.TIMEOUT) == 6
    assert reply_code_for(EndReason.MISC) == 1 and reply_code_for(EndReason.TORPROTOCOL) == 1


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_only_typed_errors(chunks):
    p = SocksParser()
    try:
        for c in chunks:
            p.receive(c)
            if p.request is not None:
                break
    except ProtocolError:
        pass
    if p.request is not None:
        assert 0 <= p.request.port <= 65535 and p.request.host


def test_struct_usage_is_big_endian():
    p, _ = feed(b"\x05\x01\x00\x05\x01\x00\x01\x01\x02\x03\x04" + struct.pack(">H", 65535))
    assert p.request.port == 65535
