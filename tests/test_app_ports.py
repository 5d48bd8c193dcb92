"""The HTTP CONNECT port and the DNS port (tor's HTTPTunnelPort and DNSPort; specs/socks.md).

Pure parts first (the CONNECT request reader, the DNS codec, the RESOLVED -> DNS mapping),
then end to end through ``onionp2p testnet --http-tunnel-port auto --dns-port auto``: real
curl through the tunnel to a local TLS server, real dig against the DNS port, isolation
seen on the control port with stem.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
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
            + (b"\x00\x01" if extra else b"\x00\x00") + qname + qtype.to_bytes(2, "big") + b"\x00\x01"
            + extra)


OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x0c\x00\x0a\x00\x08" + os.urandom(8)  # dig's EDNS + cookie


def test_dns_query_and_answer_bytes():
    q = parse_query(dns_query("Example.COM", QType.A, extra=OPT))
    first = q.first_supported()
    assert (q.id, q.opcode, first.name, first.qtype) == (0x1234, 0, "Example.COM", 1)
    out = build_response(q, Rcode.NOERROR, q.questions[0], [Answer(QType.A, bytes([93, 184, 216, 34]), 5),
                                                            Answer(QType.A, b"\x01\x02\x03\x04", 99999)])
    assert out[:2] == b"\x12\x34"
    assert int.from_bytes(out[2:4], "big") == 0x8180  # QR, RD copied, RA, NOERROR
    assert out[4:12] == b"\x00\x01\x00\x02\x00\x00\x00\x00"
    body = out[12 + len(q.questions[0].wire):]
    # name pointer to offset 12, A, IN, TTL clamped to 60 .. 3600, 4 bytes
    assert body[:16] == (b"\xc0\x0c\x00\x01\x00\x01" + (60).to_bytes(4, "big") + b"\x00\x04"
                         + bytes([93, 184, 216, 34]))
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
    v6 = b"\x00" * 15 + b"\x01"
    both = Resolved((ResolvedAnswer(4, b"\x7f\x00\x00\x01", 300), ResolvedAnswer(6, v6, 30)))
    lo = b"\x7f\x00\x00\x01"
    assert answer_for(q_of("x.y", QType.A), both) == (Rcode.NOERROR, [Answer(QType.A, lo, 300)])
    assert answer_for(q_of("x.y", QType.AAAA), both) == (Rcode.NOERROR, [Answer(QType.AAAA, v6, 30)])
    v4 = Resolved((ResolvedAnswer(4, b"\x7f\x00\x00\x01", 300),))
    assert answer_for(q_of("x.y", QType.AAAA), v4) == (Rcode.NOERROR, [])        # NODATA
    assert answer_for(q_of("x.y", QType.A), Resolved((ResolvedAnswer(0xF1, b"", 0),))) == (Rcode.NXDOMAIN, [])
    assert answer_for(q_of("x.y", QType.A), Resolved((ResolvedAnswer(0xF0, b"", 0),))) == (Rcode.SERVFAIL, [])
    ptr = q_of("1.0.0.127.in-addr.arpa", QType.PTR)
    assert answer_for(ptr, Resolved((ResolvedAnswer(0, b"localhost.", 600),))) == \
        (Rcode.NOERROR, [Answer(QType.PTR, b"localhost", 600)])
    # a hostname we could not write as a DNS name is left out
    assert answer_for(ptr, Resolved((ResolvedAnswer(0, b"bad name", 600),))) == (Rcode.NOERROR, [])


# -- end to end: onionp2p testnet with both ports ------------------------------------------------


def self_signed(d: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key (PEM files in ``d``)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    (d / "key.pem").write_bytes(pem)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 (self-signed certificate for localhost)."""
    import http.server

    root = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(root)
    token = os.urandom(8).hex()
    (root / "index.html").write_text(f"<p>over TLS through the tunnel {token}</p>\n")
    def handler(*a, **kw):
        return http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)

    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"port": srv.server_address[1], "cafile": str(cert), "token": token}
    srv.shutdown()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    net = RunningTestnet(tmp_path_factory.mktemp("ports") / "net",
                         ["--relays", "4", "--exits", "2",
                          "--http-tunnel-port", "auto", "--dns-port", "auto"])
    assert net.http_tunnel and net.dns, Path(net.out.name).read_text()[-2000:]
    yield net
    net.stop()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    require_tool("curl", "curl")
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args], capture_output=True,
                          timeout=timeout + 10, text=True)


@pytest.mark.slow
def test_curl_https_through_the_http_tunnel(net, tls_site):
    p = curl("--proxy", f"http://127.0.0.1:{net.http_tunnel}", "--cacert", tls_site["cafile"],
             f"https://localhost:{tls_site['port']}/index.html")
    assert p.returncode == 0, p.stderr
    assert f"over TLS through the tunnel {tls_site['token']}" in p.stdout
    from stem.control import Controller

    with Controller.from_port(port=net.control) as ctl:
        ctl.authenticate()  # the cookie named in PROTOCOLINFO
        assert ctl.get_listeners("HTTPTUNNEL") == [("127.0.0.1", net.http_tunnel)]
        assert ctl.get_listeners("DNS") == [("127.0.0.1", net.dns)]


@pytest.mark.slow
def test_proxy_credentials_isolate_http_tunnel_streams(net, tls_site):
    """Proxy-Authorization is the isolation key, as SOCKS credentials: alice's two tunnels
    share a circuit, bob's and the anonymous one each get another."""
    from stem.control import Controller, EventType

    events = []
    with Controller.from_port(port=net.control) as ctl:
        ctl.authenticate()
        ctl.add_event_listener(lambda e: events.append(e), EventType.STREAM)
        order = []
        for user in ("alice", "bob", "alice", None):
            auth = ("--proxy-user", f"{user}:pw") if user else ()
            p = curl("--proxy", f"http://127.0.0.1:{net.http_tunnel}", *auth, "--cacert", tls_site["cafile"],
                     f"https://localhost:{tls_site['port']}/index.html")
            assert p.returncode == 0, p.stderr
            order.append(user)
        circuits = {c.id: c for c in ctl.get_circuits()}
    ok = [e for e in events
          if e.status == "SUCCEEDED" and e.keyword_args.get("CLIENT_PROTOCOL") == "HTTPCONNECT"]
    assert len(ok) == 4, [(e.status, e.keyword_args) for e in events]
    by_user: dict[str | None, set[str]] = {}
    for user, e in zip(order, ok):
        by_user.setdefault(user, set()).add(e.circ_id)
    assert len(by_user["alice"]) == 1
    assert len({next(iter(v)) for v in by_user.values()}) == 3 and all(len(v) == 1 for v in by_user.values())
    for ids in by_user.values():
        assert all(len(circuits[c].path) == 3 for c in ids if c in circuits)
    assert [e.keyword_args.get("SOCKS_USERNAME") for e in ok] == order  # the Basic user names


@pytest.mark.slow
def test_http_tunnel_error_statuses(net, tls_site):
    proxy = f"http://127.0.0.1:{net.http_tunnel}"
    # a plain-HTTP URL makes curl send GET http://... to the proxy: 405 and an explanation
    p = curl("--proxy", proxy, "-w", "%{http_code}", f"http://localhost:{tls_site['port']}/")
    assert p.stdout.endswith("405") and "not an HTTP proxy" in p.stdout, (p.stdout, p.stderr)
    # the exit cannot connect (nothing listens there): the tunnel fails with 502
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    p = curl("-v", "--proxy", proxy, f"https://localhost:{closed}/")
    assert p.returncode != 0 and "502" in p.stderr, p.stderr[-1500:]

    async def raw(request: bytes) -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", net.http_tunnel)
        w.write(request)
        data = await asyncio.wait_for(r.read(), 30)
        w.close()
        return data

    assert asyncio.run(raw(b"CONNECT nonsense HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    huge = b"CONNECT a.b:1 HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert asyncio.run(raw(huge)).startswith(b"HTTP/1.1 431 ")
    # .onion names never reach an exit
    assert asyncio.run(raw(b"CONNECT abc.onion:443 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 502 ")


def dig(net, *args: str) -> str:
    path = require_tool("dig", "bind9-dnsutils")
    p = subprocess.run([path, "@127.0.0.1", "-p", str(net.dns), "+time=40", "+tries=1", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def answers(out: str) -> list[list[str]]:
    """The ANSWER SECTION's records, split into fields."""
    sect = out.split(";; ANSWER SECTION:\n")
    return [ln.split() for ln in sect[1].split("\n\n")[0].splitlines()] if len(sect) > 1 else []


@pytest.mark.slow
def test_dig_a_aaaa_ptr_and_nxdomain(net):
    import socket

    local = socket.getaddrinfo("localhost", 0, proto=socket.IPPROTO_TCP)  # the exit's resolver is ours
    v4 = sorted({a[4][0] for a in local if a[0] == socket.AF_INET})
    v6 = sorted({a[4][0] for a in local if a[0] == socket.AF_INET6})
    out = dig(net, "localhost", "A")
    assert "status: NOERROR" in out, out
    recs = answers(out)
    assert sorted(r[4] for r in recs) == v4 and all(r[2:4] == ["IN", "A"] for r in recs)
    assert all(60 <= int(r[1]) <= 3600 for r in recs)  # TTL from the RESOLVED cell, clamped
    out = dig(net, "localhost", "AAAA")
    assert "status: NOERROR" in out, out
    assert sorted(r[4] for r in answers(out)) == v6  # NODATA when the exit has no IPv6 answer
    name = socket.getnameinfo(("127.0.0.1", 0), socket.NI_NAMEREQD)[0]
    out = dig(net, "-x", "127.0.0.1")
    assert "status: NOERROR" in out, out
    assert [r[3:] for r in answers(out)] == [["PTR", name.rstrip(".") + "."]]
    out = dig(net, f"no-such-host-{os.urandom(4).hex()}.invalid", "A")
    assert "status: NXDOMAIN" in out, out
    assert "status: NOTIMP" in dig(net, "localhost", "MX")
    # DNS streams show on the control port as tor's: purpose DNS_REQUEST, protocol DNS
    from stem.control import Controller, EventType

    events = []
    with Controller.from_port(port=net.control) as ctl:
        ctl.authenticate()
        ctl.add_event_listener(lambda e: events.append(e), EventType.STREAM)
        dig(net, "localhost", "A")
    assert any(e.keyword_args.get("CLIENT_PROTOCOL") == "DNS" and e.purpose == "DNS_REQUEST"
               and e.status == "SUCCEEDED" for e in events), [(e.status, e.keyword_args) for e in events]


@pytest.mark.slow
def test_dns_port_survives_garbage(net):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for junk in (b"", b"\x00", os.urandom(11), os.urandom(300), b"\x00" * 12 + b"\x3f" * 40):
            s.sendto(junk, ("127.0.0.1", net.dns))
        # a name whose compression pointer points at itself
        loop_query = b"\xbe\xef\x01\x00\x00\x01" + b"\x00" * 6 + b"\xc0\x0c\x00\x01\x00\x01"
        s.sendto(loop_query, ("127.0.0.1", net.dns))
        while (reply := s.recvfrom(512)[0])[:2] != b"\xbe\xef":
            pass  # answers to random bytes that happened to look like a query
        assert reply[3] & 0x0F == 1 and reply[2] & 0x80  # a FORMERR response with the query's ID
    out = dig(net, "localhost", "A")  # still serving
    assert "status: NOERROR" in out


# -- the client's control port: on by default, found from the data directory ---------------------


def start_client(d: Path, authorities: list[str]) -> tuple[subprocess.Popen, Path]:
    """``onionp2p client`` with a config that says nothing about its control port."""
    d.mkdir(parents=True)
    (d / "client.toml").write_text(
        "socks_address = \"127.0.0.1:0\"\nenforce_distinct_subnets = false\n"
        f"authorities = {authorities!r}\n".replace("'", '"'))
    out = d / "out.txt"
    proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "client", "--config", str(d / "client.toml")],
                            stdout=out.open("w"), stderr=subprocess.STDOUT, cwd=d)
    return proc, out


def wait_line(proc: subprocess.Popen, out: Path, pattern: str, timeout: float = 120) -> re.Match:
    end = time.time() + timeout
    while time.time() < end:
        if m := re.search(pattern, out.read_text()):
            return m
        assert proc.poll() is None, out.read_text()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"no {pattern!r} in:\n" + out.read_text()[-3000:])


def onionp2p(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onionp2p", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


@pytest.mark.slow
def test_control_port_on_by_default_and_found_from_the_data_dir(net, tmp_path):
    """Two clients with default configs: each gets a control port (9151 or, when taken, any
    free one), cookie auth for stem; ``circuits`` finds each from its data directory."""
    from stem.control import Controller

    line = (net.data_dir / "auth0" / "authority.txt").read_text().strip()
    procs = []
    try:
        ports = []
        for name in ("a", "b"):
            proc, out = start_client(tmp_path / name, [line])
            procs.append(proc)
            ports.append(int(wait_line(proc, out, r"Control port at 127\.0\.0\.1:(\d+)").group(1)))
        assert len(set(ports)) == 2  # the default never collides
        for name, port in zip(("a", "b"), ports):
            data_dir = tmp_path / name / "onionp2p-client"  # data_dir's default, next to the config
            assert (data_dir / "control_port").read_text() == f"PORT=127.0.0.1:{port}\n"
            with Controller.from_port(port=port) as ctl:  # cookie authentication, as tor's
                assert ctl.get_protocolinfo().cookie_path == str(data_dir / "control_auth_cookie")
                ctl.authenticate()
                assert set(ctl.get_listeners("CONTROL")) == {("127.0.0.1", port)}
            # circuits --data-dir DIR, and with no options from the directory holding ./onionp2p-client
            for p in (onionp2p("circuits", "--json", "--data-dir", str(data_dir)),
                      onionp2p("circuits", "--json", cwd=tmp_path / name)):
                assert p.returncode == 0, p.stderr
                assert json.loads(p.stdout)["version"]
        p = onionp2p("circuits", "--json", "--data-dir", str(net.data_dir))  # a testnet's directory
        assert p.returncode == 0, p.stderr
        p = onionp2p("circuits", "--json", "--data-dir", str(tmp_path))
        assert p.returncode == 2 and "no control_port file" in p.stderr
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    assert not (tmp_path / "a" / "onionp2p-client" / "control_port").exists()  # removed on exit


async def test_http_tunnel_handshake_timeout_and_eof():
    """A client that never finishes its CONNECT request gets 408 after the handshake
    timeout; one that hangs up half-way is just closed (the backend is never asked)."""
    from onionp2p.client.httptunnel import HttpTunnelServer

    srv = HttpTunnelServer(backend=None, port=0, handshake_timeout=0.5)
    await srv.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: exa")
        t0 = asyncio.get_running_loop().time()
        data = await asyncio.wait_for(r.read(), 10)
        assert data.startswith(b"HTTP/1.1 408 ") and asyncio.get_running_loop().time() - t0 >= 0.4
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"CONNECT exa")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        assert srv.stats.handshake_failed == 2 and srv.stats.streams_ok == srv.stats.streams_failed == 0
    finally:
        await srv.stop()


@pytest.mark.slow
def test_headless_chromium_https_through_the_http_tunnel(net, tls_site, tmp_path):
    """A browser's HTTPS proxy setting: chromium sends CONNECT and loads the page over TLS."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or require_tool("chromium", "chromium")
    p = subprocess.run([
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--ignore-certificate-errors", f"--user-data-dir={tmp_path / 'profile'}",
        f"--proxy-server=http://127.0.0.1:{net.http_tunnel}", "--proxy-bypass-list=<-loopback>",
        "--dump-dom", f"https://localhost:{tls_site['port']}/index.html",
    ], capture_output=True, text=True, timeout=120)
    assert f"over TLS through the tunnel {tls_site['token']}" in p.stdout, p.stderr[-2000:]
