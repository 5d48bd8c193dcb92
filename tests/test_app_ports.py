"""The HTTP CONNECT port and the DNS port (tor's HTTPTunnelPort and DNSPort; specs/socks.md).

Pure parts first (the CONNECT request reader, the DNS codec, the RESOLVED -> DNS mapping),
then end to end through ``onionp2p testnet --http-tunnel-port auto --dns-port auto``: real
curl through the tunnel to a local TLS server, real dig against the DNS port, isolation
seen on the control port with stem.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import RunningTestnet, require_tool
from hypothesis import given, settings
from hypothesis import strategies as st

from onionp2p.client.dnsport import answer_for
from onionp2p.proto.dnsmsg import (
    Answer,
    DnsFormatError,
    QType,
    Rcode,
    arpa_address,
    build_response,
    clamp_ttl,
    parse_query,
)
from onionp2p.proto.httpconnect import (
    MAX_HEADER_BYTES,
    HttpConnectError,
    HttpConnectParser,
    response_for_reply,
)
from onionp2p.proto.relaycell import Resolved, ResolvedAnswer
from onionp2p.proto.socks import Reply

# -- HTTP CONNECT requests -----------------------------------------------------------------------


def connect(data: bytes, chunks: int = 1):
    p = HttpConnectParser(client_address=("127.0.0.1", 5555), session_group=7)
    step = max(1, len(data) // chunks)
    got = None
    for i in range(0, len(data), step):
        got = p.receive_data(data[i:i + step])
        if got is not None:
            break
    return got


def status_of(exc: HttpConnectError) -> int:
    return int(exc.response.split(b" ", 2)[1])


@pytest.mark.parametrize("chunks", [1, 7, 1000])
def test_connect_request_in_any_pieces(chunks):
    raw = (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nUser-Agent: curl/8\r\n"
           b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:s3cret") + b"\r\n\r\n\x16\x03\x01hello")
    ready = connect(raw, chunks)
    req = ready.request
    assert (req.command, req.host, req.port, req.version) == ("connect", "example.com", 443, 0)
    assert (req.username, req.password) == (b"alice", b"s3cret")
    if chunks == 1:
        assert ready.extra == b"\x16\x03\x01hello"  # the client's first bytes go to the stream
    # the SOCKS isolation rules: credentials, client address (not port), listener
    other = connect(raw.replace(base64.b64encode(b"alice:s3cret"), base64.b64encode(b"bob:s3cret")))
    assert req.isolation_key != other.request.isolation_key
    again = HttpConnectParser(client_address=("127.0.0.1", 6666), session_group=7).receive_data(raw)
    assert again.request.isolation_key == req.isolation_key


def test_connect_forms():
    assert connect(b"CONNECT [2001:db8::1]:8443 HTTP/1.0\r\n\r\n").request.host == "2001:db8::1"
    assert connect(b"CONNECT 10.1.2.3:22 HTTP/1.1\n\n").request.port == 22  # bare LF tolerated
    # any other scheme is an isolation token as a whole (tor keeps the raw header value)
    req = connect(b"CONNECT a.b:1 HTTP/1.1\r\nproxy-authorization: Bearer xyz\r\n\r\n").request
    assert (req.username, req.password) == (b"Bearer xyz", b"")
    assert connect(b"CONNECT a.b:1 HTTP/1.1\r\n").__class__ is type(None)  # not complete yet


@pytest.mark.parametrize("raw,status", [
    (b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 405),
    (b"POST / HTTP/1.1\r\n\r\n", 405),
    (b"CONNECT example.com HTTP/1.1\r\n\r\n", 400),            # no port
    (b"CONNECT example.com:0 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT example.com:65536 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT 2001:db8::1:443 HTTP/1.1\r\n\r\n", 400),        # IPv6 without brackets
    (b"CONNECT exa mple.com:443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT bad_host!:443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT \xffexample.com:443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT example.com:443\r\n\r\n", 400),
    (b"CONNECT example.com:443 HTTP/2.0\r\n\r\n", 505),
    (b"\x05\x01\x00\r\n\r\n", 400),                           # SOCKS on the HTTP port
    (b"CONNECT a.b:1 HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"CONNECT a.b:1 HTTP/1.1\r\nProxy-Authorization: Basic !!!\r\n\r\n", 400),
    (b"CONNECT a.b:1 HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
])
def test_bad_requests_get_their_status(raw, status):
    with pytest.raises(HttpConnectError) as e:
        connect(raw)
    assert status_of(e.value) == status
    assert b"Connection: close" in e.value.response
    if status == 405:
        assert b"Allow: CONNECT" in e.value.response and b"not an HTTP proxy" in e.value.response


def test_header_block_is_bounded():
    p = HttpConnectParser()
    assert p.receive_data(b"CONNECT a.b:1 HTTP/1.1\r\n") is None
    with pytest.raises(HttpConnectError) as e:
        for _ in range(MAX_HEADER_BYTES // 100 + 2):
            p.receive_data(b"X-Pad: " + b"a" * 91 + b"\r\n")
            assert p.buffered <= MAX_HEADER_BYTES + 100
    assert status_of(e.value) == 431


def test_stream_failures_map_to_gateway_statuses():
    assert response_for_reply(Reply.TTL_EXPIRED).startswith(b"HTTP/1.1 504 ")
    assert response_for_reply(Reply.NOT_ALLOWED).startswith(b"HTTP/1.1 403 ")
    for code in (Reply.HOST_UNREACHABLE, Reply.CONNECTION_REFUSED, Reply.GENERAL_FAILURE):
        assert response_for_reply(code).startswith(b"HTTP/1.1 502 ")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 50))
def test_connect_parser_never_fails_otherwise(data, chunk):
    p = HttpConnectParser()
    try:
        for i in range(0, len(data), chunk):
            if p.receive_data(data[i:i + chunk]) is not None:
                break
    except HttpConnectError as exc:
        assert exc.response.startswith(b"HTTP/1.1 4") or exc.response.startswith(b"HTTP/1.1 5")


# -- DNS messages --------------------------------------------------------------------------------


def dns_query(name: str, qtype: int, qid: int = 0x1234, flags: int = 0x0100, extra: bytes = b"") -> bytes:
    qname = b"".join(bytes((len(lab),)) + lab.encode() for lab in name.split(".") if lab) + b"\0"
    return (qid.to_bytes(2, "big") + flags.to_bytes(2, "big") + b"\x00\x01\x00\x00\x00\x00"
            + (b"\x00\x01" if extra else b"\x00\x00") + qname + qtype.to_bytes(2, "big") + b"\x00\x01" + extra)


OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x0c\x00\x0a\x00\x08" + os.urandom(8)  # dig's EDNS + cookie


def test_dns_query_and_answer_bytes():
    q = parse_query(dns_query("Example.COM", QType.A, extra=OPT))
    assert (q.id, q.opcode, q.first_supported().name, q.first_supported().qtype) == (0x1234, 0, "Example.COM", 1)
    out = build_response(q, Rcode.NOERROR, q.questions[0],
                         [Answer(QType.A, bytes([93, 184, 216, 34]), 5), Answer(QType.A, b"\x01\x02\x03\x04", 99999)])
    assert out[:2] == b"\x12\x34"
    assert int.from_bytes(out[2:4], "big") == 0x8180  # QR, RD copied, RA, NOERROR
    assert out[4:12] == b"\x00\x01\x00\x02\x00\x00\x00\x00"
    body = out[12 + len(q.questions[0].wire):]
    # name pointer to offset 12, A, IN, TTL clamped to 60 .. 3600, 4 bytes
    assert body[:16] == b"\xc0\x0c\x00\x01\x00\x01" + (60).to_bytes(4, "big") + b"\x00\x04" + bytes([93, 184, 216, 34])
    assert body[16 + 6:16 + 10] == (3600).to_bytes(4, "big")
    ptr = parse_query(dns_query("1.0.0.127.in-addr.arpa", QType.PTR))
    out = build_response(ptr, Rcode.NOERROR, ptr.questions[0], [Answer(QType.PTR, b"localhost", 300)])
    assert out.endswith(b"\x00\x0b\x09localhost\x00")
    assert build_response(ptr, Rcode.NXDOMAIN)[3] & 0x0F == 3


@pytest.mark.parametrize("data,answerable", [
    (b"", False), (b"\x12\x34\x01", False),
    (dns_query("a.b", 1, flags=0x8180), False),                          # a response: dropped
    (dns_query("a.b", 1)[:-3], True),                                    # truncated question
    (b"\x12\x34\x01\x00\x00\x05" + b"\x00" * 6, True),                   # 5 questions
    (b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\xc0\x0c\x00\x01\x00\x01", True),   # pointer to itself
    (b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x40abc\x00\x00\x01\x00\x01", True),  # label type 01
    (b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x03a\x00b\x00\x00\x01\x00\x01", True),  # NUL in a label
    (b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x3fx" * 5, True),     # runs past the end
])
def test_malformed_dns_queries(data, answerable):
    with pytest.raises(DnsFormatError) as e:
        parse_query(data)
    assert (e.value.query_id is not None) == answerable
    if answerable:  # FORMERR with the query's ID, no questions
        out = build_response(e.value.query_id, Rcode.FORMERR, query_flags=e.value.flags)
        assert out[:2] == b"\x12\x34" and out[3] & 0x0F == 1 and len(out) == 12


def test_long_names_are_refused():
    long_name = ".".join(["a" * 63] * 4)  # 4 x 64 + 1 = 257 bytes on the wire
    with pytest.raises(DnsFormatError, match="255"):
        parse_query(dns_query(long_name, 1))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_dns_parser_never_fails_otherwise(data):
    try:
        q = parse_query(data)
    except DnsFormatError:
        return
    build_response(q, Rcode.NOTIMP)  # whatever parsed can be answered


def test_reverse_names_and_ttls():
    assert str(arpa_address("1.0.0.127.in-addr.arpa")) == "127.0.0.1"
    assert str(arpa_address("1." + "0." * 31 + "ip6.arpa.")) == "::1"
    assert arpa_address("0.127.in-addr.arpa") is None and arpa_address("example.com") is None
    assert arpa_address("1.0.0.999.in-addr.arpa") is None
    assert (clamp_ttl(0), clamp_ttl(300), clamp_ttl(2**32 - 1)) == (60, 300, 3600)


def q_of(name: str, qtype: int):
    return parse_query(dns_query(name, qtype)).questions[0]


def test_resolved_to_dns_answers_as_tor():
    both = Resolved((ResolvedAnswer(4, b"\x7f\x00\x00\x01", 300), ResolvedAnswer(6, b"\x00" * 15 + b"\x01", 30)))
    assert answer_for(q_of("x.y", QType.A), both) == (Rcode.NOERROR, [Answer(QType.A, b"\x7f\x00\x00\x01", 300)])
    assert answer_for(q_of("x.y", QType.AAAA), both) == (Rcode.NOERROR, [Answer(QType.AAAA, b"\x00" * 15 + b"\x01", 30)])
    v4 = Resolved((ResolvedAnswer(4, b"\x7f\x00\x00\x01", 300),))
    assert answer_for(q_of("x.y", QType.AAAA), v4) == (Rcode.NOERROR, [])        # NODATA
    assert answer_for(q_of("x.y", QType.A), Resolved((ResolvedAnswer(0xF1, b"", 0),))) == (Rcode.NXDOMAIN, [])
    assert answer_for(q_of("x.y", QType.A), Resolved((ResolvedAnswer(0xF0, b"", 0),))) == (Rcode.SERVFAIL, [])
    ptr = q_of("1.0.0.127.in-addr.arpa", QType.PTR)
    assert answer_for(ptr, Resolved((ResolvedAnswer(0, b"localhost.", 600),))) == \
        (Rcode.NOERROR, [Answer(QType.PTR, b"localhost", 600)])
    # a hostname we could not write as a DNS name is left out
    assert answer_for(ptr, Resolved((ResolvedAnswer(0, b"bad name", 600),))) == (Rcode.NOERROR, [])
