"""SOCKS front end: the sans-IO parser (every message shape and error path, hypothesis
fuzzing) and the asyncio server end to end through real relays with real clients
(curl in all four SOCKS modes, python-socks).

End-to-end tests use :class:`RelayBackend`, a SocksBackend that builds one real 3-hop
circuit per isolation key through the conftest ``relay_net`` relays (the production
backend is the circuit manager). Protocol-error tests use :class:`OfflineBackend`, which
fails the test if the server ever consults it: those requests must be answered locally.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
import struct

import pytest
from conftest import LOOPBACK_EXIT, blob, free_port, http_get, relay_config, sha256
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onionp2p.client.client import OnionClient
from onionp2p.client.socksport import (
    SocksBackend,
    SocksServer,
    addresses_from_resolved,
    hostname_from_resolved,
)
from onionp2p.errors import CircuitError, LocalProtocolError, StreamError
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.relaycell import Begin, EndReason, Resolved, ResolvedAnswer
from onionp2p.proto.socks import (
    HTTP_NOT_SOCKS_ANSWER,
    MAX_MESSAGE,
    SOCKS4_GRANTED,
    SOCKS4_REJECTED,
    IsolationKey,
    NotSocksError,
    ParserState,
    Reply,
    RequestReady,
    SendReply,
    SocksError,
    SocksParser,
    SocksRequest,
    reply_code_for,
    reply_code_for_error,
    reply_for,
    socks4_reply,
    socks5_reply,
)
from onionp2p.relay.keys import RelayKeys
from onionp2p.relay.relay import Relay

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")

# -- message builders ------------------------------------------------------------------------------


def greet(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def userpass(user: bytes, pw: bytes, ver: int = 1) -> bytes:
    return bytes((ver, len(user))) + user + bytes((len(pw),)) + pw


def req5(cmd: int, host: str | bytes, port: int = 80, atyp: int | None = None) -> bytes:
    if isinstance(host, bytes):
        addr, atyp = bytes((len(host),)) + host, atyp or 3
    else:
        try:
            ip = ipaddress.ip_address(host)
            addr, atyp = ip.packed, atyp or (1 if ip.version == 4 else 4)
        except ValueError:
            addr, atyp = bytes((len(host),)) + host.encode(), atyp or 3
    return bytes((5, cmd, 0, atyp)) + addr + struct.pack(">H", port)


def req4(cmd: int, ip: str, port: int = 80, userid: bytes = b"", host: bytes | None = None) -> bytes:
    out = bytes((4, cmd)) + struct.pack(">H", port) + ipaddress.IPv4Address(ip).packed + userid + b"\0"
    return out + (host + b"\0" if host is not None else b"")


def parse_all(*chunks: bytes, **kw) -> tuple[list[bytes], SocksRequest, bytes]:
    """Feed chunks; return (replies, request, extra). Fails if the request is not complete."""
    p = SocksParser(**kw)
    replies, ready = [], None
    for c in chunks:
        for ev in p.receive_data(c):
            if isinstance(ev, SendReply):
                replies.append(ev.data)
            else:
                ready = ev
    assert ready is not None and p.state is ParserState.DONE
    return replies, ready.request, ready.extra


def parse_error(*chunks: bytes, **kw) -> SocksError:
    p = SocksParser(**kw)
    with pytest.raises(SocksError) as info:
        for c in chunks:
            p.receive_data(c)
    assert p.state is ParserState.FAILED
    return info.value


def err5(code: int) -> bytes:
    return bytes((5, code, 0, 1)) + bytes(6)


REJECT4 = bytes((0, SOCKS4_REJECTED)) + bytes(6)

# -- parser: SOCKS5 ------------------------------------------------------------------------------


@pytest.mark.parametrize("host,kind,expect", [
    ("93.184.216.34", "ipv4", "93.184.216.34"),
    ("2001:db8::1", "ipv6", "2001:db8::1"),
    ("example.com", "domain", "example.com"),
    (b"[::1]", "ipv6", "::1"),          # a bracketed IPv6 literal sent as a name
    (b"127.0.0.1", "ipv4", "127.0.0.1"),  # curl --socks5-hostname with an IP URL
    (b"under_score.example.", "domain", "under_score.example."),
])
def test_socks5_connect_address_types(host, kind, expect):
    replies, req, extra = parse_all(greet(0), req5(1, host, 443), client_address=("127.0.0.1", 4444))
    assert replies == [b"\x05\x00"]
    assert (req.version, req.command, req.host, req.port, req.host_kind) == (5, "connect", expect, 443, kind)
    assert req.username is None and req.password is None and extra == b""


def test_socks5_userpass_preferred_and_recorded():
    replies, req, _ = parse_all(greet(0, 2), userpass(b"alice", b"s3cret"), req5(1, "example.com"))
    assert replies == [b"\x05\x02", b"\x01\x00"]
    assert (req.username, req.password) == (b"alice", b"s3cret")
    assert "s3cret" not in repr(req) and "alice" not in repr(req)


def test_socks5_empty_credentials_accepted_like_tor():
    replies, req, _ = parse_all(greet(2), userpass(b"", b""), req5(1, "example.com"))
    assert replies == [b"\x05\x02", b"\x01\x00"]
    assert (req.username, req.password) == (b"", b"")
    _, noauth, _ = parse_all(greet(0), req5(1, "example.com"))
    assert req.isolation_key == noauth.isolation_key  # empty credentials isolate like none


def test_socks5_prefer_no_auth():
    replies, req, _ = parse_all(greet(2, 0), req5(1, "example.com"), prefer_no_auth=True)
    assert replies == [b"\x05\x00"] and req.username is None
    replies, _, _ = parse_all(greet(2), userpass(b"u", b"p"), req5(1, "x.org"), prefer_no_auth=True)
    assert replies[0] == b"\x05\x02"  # user/pass is still accepted when it is all that is offered


@pytest.mark.parametrize("cmd,command", [(0xF0, "resolve"), (0xF1, "resolve_ptr")])
def test_socks5_tor_extensions(cmd, command):
    host = "example.com" if cmd == 0xF0 else "10.1.2.3"
    _, req, _ = parse_all(greet(0), req5(cmd, host, 0))
    assert (req.command, req.host, req.port) == (command, host, 0)  # port 0 is fine here
    _, req, _ = parse_all(greet(0), req5(0xF1, "2001:db8::7", 0))
    assert req.command == "resolve_ptr" and req.host_kind == "ipv6"


def test_pipelined_messages_and_optimistic_data():
    data = greet(0, 2) + userpass(b"u", b"p") + req5(1, "example.com") + b"GET / HTTP/1.0\r\n\r\n"
    replies, req, extra = parse_all(data)
    assert replies == [b"\x05\x02", b"\x01\x00"] and req.host == "example.com"
    assert extra == b"GET / HTTP/1.0\r\n\r\n"


@pytest.mark.parametrize("message", [
    greet(0) + req5(1, "example.com", 8080),
    greet(0, 2) + userpass(b"bob", b"pw") + req5(0xF0, "example.com", 0),
    greet(0) + req5(1, "2001:db8::1"),
    req4(1, "10.0.0.1", 22, b"uid"),
    req4(0xF0, "0.0.0.9", 0, b"", b"example.com"),
])
def test_byte_at_a_time_equals_one_chunk(message):
    whole = parse_all(message)
    p = SocksParser()
    events = [ev for i in range(len(message)) for ev in p.receive_data(message[i:i + 1])]
    replies = [e.data for e in events if isinstance(e, SendReply)]
    ready = [e for e in events if isinstance(e, RequestReady)]
    assert (replies, ready[0].request, ready[0].extra) == whole


@pytest.mark.parametrize("chunks,reply,code", [
    ((greet(1),), b"\x05\xff", None),                              # only GSSAPI offered
    ((b"\x05\x00",), b"\x05\xff", None),                           # no methods at all
    ((greet(0), req5(2, "1.2.3.4")), err5(7), 7),                  # BIND
    ((greet(0), req5(3, "1.2.3.4")), err5(7), 7),                  # UDP ASSOCIATE
    ((greet(0), req5(0x09, "1.2.3.4")), err5(7), 7),               # unknown command
    ((greet(0), b"\x05\x01\x00\x02"), err5(8), 8),                 # unknown address type
    ((greet(0), b"\x04\x01\x00\x01"), err5(1), 1),                 # request with version 4
    ((greet(0), b"\x06"), err5(1), 1),                             # bad version, 1 byte in
    ((greet(0), b"\x05\x01\x01\x01\x01\x02\x03\x04\x00\x50"), err5(1), 1),  # RSV not zero
    ((greet(0), b"\x05\x01\x00\x03\x00\x00\x50"), err5(1), 1),     # empty hostname
    ((greet(0), req5(1, b"bad host")), err5(1), 1),                # space in a hostname
    ((greet(0), req5(1, b"a\x00b")), err5(1), 1),                  # NUL in a hostname
    ((greet(0), req5(1, "caf\u00e9.example".encode())), err5(1), 1),  # not ASCII
    ((greet(0), req5(1, b"a..b")), err5(1), 1),                    # empty label
    ((greet(0), req5(1, b"[example.com]")), err5(1), 1),           # brackets around a name
    ((greet(0), req5(1, b"fe80::1%eth0")), err5(1), 1),            # scope IDs are refused
    ((greet(0), req5(1, "example.com", 0)), err5(1), 1),           # CONNECT to port 0
    ((greet(0), req5(0xF1, "example.com", 0)), err5(8), 8),        # PTR of a name
    ((greet(2), userpass(b"u", b"p", ver=5)), b"\x01\x01", None),  # RFC 1929 bad version
])
def test_socks5_errors_get_proper_replies(chunks, reply, code):
    exc = parse_error(*chunks)
    method_reply = b"\x05\x00" if chunks[0] == greet(0) else b""
    assert exc.reply in (reply, method_reply + reply)
    assert exc.code == code


def test_error_in_same_chunk_keeps_earlier_replies():
    exc = parse_error(greet(0) + req5(2, "1.2.3.4"))
    assert exc.reply == b"\x05\x00" + err5(7)  # the client needs the method choice first


# -- parser: SOCKS4 / SOCKS4a ------------------------------------------------------------------


def test_socks4_connect_with_userid():
    replies, req, extra = parse_all(req4(1, "10.0.0.1", 80, b"bob") + b"xyz")
    assert replies == [] and extra == b"xyz"
    assert (req.version, req.command, req.host, req.port, req.username, req.password) == \
        (4, "connect", "10.0.0.1", 80, b"bob", None)


def test_socks4a_hostname_and_resolve():
    _, req, _ = parse_all(req4(1, "0.0.0.1", 443, b"", b"example.com"))
    assert (req.host, req.port, req.username) == ("example.com", 443, None)
    _, req, _ = parse_all(req4(0xF0, "0.0.0.255", 0, b"me", b"example.org"))
    assert (req.command, req.host, req.username) == ("resolve", "example.org", b"me")


@pytest.mark.parametrize("data", [
    req4(2, "10.0.0.1"),                          # BIND
    req4(0xF1, "10.0.0.1"),                       # no RESOLVE_PTR over SOCKS4 (as in tor)
    req4(0x07, "10.0.0.1"),                       # unknown command
    req4(1, "0.0.0.0"),                           # no destination
    req4(1, "10.0.0.1", 0),                       # CONNECT to port 0
    req4(1, "10.0.0.1", 80, b"u" * 300),          # userid over the bound
    req4(1, "0.0.0.1", 80, b"", b"h" * 300),      # hostname over the bound
    req4(1, "0.0.0.1", 80, b"", b""),             # empty 4a hostname
    req4(1, "0.0.0.1", 80, b"", b"bad host"),     # malformed 4a hostname
])
def test_socks4_errors_get_5b(data):
    exc = parse_error(data)
    assert exc.reply == REJECT4 and exc.code == SOCKS4_REJECTED


def test_socks4_unbounded_userid_fails_without_nul():
    p = SocksParser()
    p.receive_data(req4(1, "10.0.0.1")[:8] + b"u" * 200)  # still within the bound: wait
    with pytest.raises(SocksError):
        p.receive_data(b"u" * 100)


# -- parser: not SOCKS, misuse ---------------------------------------------------------------------


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r\n", b"HEAD /", b"POST /", b"PUT /",
                                   b"CONNECT example.com:443 HTTP/1.1\r\n"])
def test_http_gets_the_html_answer(first):
    exc = parse_error(first)
    assert isinstance(exc, NotSocksError) and exc.reply == HTTP_NOT_SOCKS_ANSWER
    assert exc.reply.startswith(b"HTTP/1.0 501 ")
    assert b"This is a SOCKS proxy, not an HTTP proxy" in exc.reply


@pytest.mark.parametrize("first", [b"\x00", b"\x01\x02", b"\x06\x01\x00", b"\xff"])
def test_unknown_version_closes_without_reply(first):
    exc = parse_error(first)
    assert exc.reply == b"" and not isinstance(exc, NotSocksError)


def test_receive_after_done_or_failed_is_a_local_error():
    p = SocksParser()
    p.receive_data(greet(0) + req5(1, "example.com"))
    with pytest.raises(LocalProtocolError):
        p.receive_data(b"more")
    p = SocksParser()
    with pytest.raises(SocksError):
        p.receive_data(b"\x09")
    with pytest.raises(LocalProtocolError):
        p.receive_data(greet(0))


# -- isolation keys ------------------------------------------------------------------------------------


def _key(version=5, user=None, pw=None, client=("127.0.0.1", 1000), group=1) -> IsolationKey:
    return SocksRequest(version, "connect", "example.com", 80, user, pw, client, group).isolation_key


def test_isolation_key_semantics():
    assert _key(user=b"a", pw=b"1") == _key(user=b"a", pw=b"1", client=("127.0.0.1", 2000))
    assert _key(user=b"a", pw=b"1") != _key(user=b"a", pw=b"2")
    assert _key(user=b"a", pw=b"1") != _key(user=b"b", pw=b"1")
    assert _key(user=b"ab", pw=b"") != _key(user=b"a", pw=b"b")  # no concatenation ambiguity
    assert _key() == _key(user=b"", pw=b"")                      # empty credentials == none
    assert _key(client=("127.0.0.1", 1)) != _key(client=("127.0.0.2", 1))  # IsolateClientAddr
    assert _key(group=1) != _key(group=2)                         # one group per listener
    # IsolateClientProtocol is off in tor: a SOCKS4 userid equals a SOCKS5 username
    assert _key(version=4, user=b"a") == _key(version=5, user=b"a", pw=b"")
    assert len({_key(user=bytes([i])) for i in range(50)}) == 50
    assert "s3cret" not in repr(_key(user=b"me", pw=b"s3cret"))


# -- replies and reason mapping ------------------------------------------------------------------------


def test_reply_code_for_every_end_reason():
    expect = {
        EndReason.MISC: 1, EndReason.RESOLVEFAILED: 4, EndReason.CONNECTREFUSED: 5,
        EndReason.EXITPOLICY: 2, EndReason.DESTROY: 1, EndReason.DONE: 5, EndReason.TIMEOUT: 6,
        EndReason.NOROUTE: 4, EndReason.HIBERNATING: 1, EndReason.INTERNAL: 1,
        EndReason.RESOURCELIMIT: 1, EndReason.CONNRESET: 5, EndReason.TORPROTOCOL: 1,
        EndReason.NOTDIRECTORY: 1,
    }
    assert set(expect) == set(EndReason)
    assert {r: reply_code_for(r) for r in EndReason} == expect
    assert reply_code_for(0) == 0 and reply_code_for(200) == Reply.GENERAL_FAILURE


def test_reply_code_for_error():
    assert reply_code_for_error(StreamError("x", EndReason.EXITPOLICY)) == 2
    assert reply_code_for_error(StreamError("x", 0)) == 1
    assert reply_code_for_error(CircuitError("x", "TIMEOUT")) == 6
    assert reply_code_for_error(CircuitError("x", "NOPATH")) == 1
    assert reply_code_for_error(TimeoutError()) == 6
    assert reply_code_for_error(RuntimeError()) == 1


def test_reply_encoders():
    assert socks5_reply(0) == b"\x05\x00\x00\x01" + bytes(6)
    assert socks5_reply(0, "127.0.0.1") == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00"
    assert socks5_reply(0, "::1") == b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x00"
    assert socks5_reply(0, "localhost") == b"\x05\x00\x00\x03\x09localhost\x00\x00"
    assert socks5_reply(5, port=80)[-2:] == b"\x00\x50"
    assert socks4_reply(True, "10.0.0.1") == bytes((0, SOCKS4_GRANTED, 0, 0, 10, 0, 0, 1))
    assert socks4_reply(False) == REJECT4
    assert reply_for(4, 2) == REJECT4 and reply_for(4, 0) == bytes((0, 0x5A)) + bytes(6)
    assert reply_for(5, 2) == err5(2)
    with pytest.raises(LocalProtocolError):
        socks5_reply(0, "x" * 256)


def test_resolved_helpers():
    r = Resolved((ResolvedAnswer(0xF0, b"", 0), ResolvedAnswer(6, ipaddress.IPv6Address("::1").packed, 60),
                  ResolvedAnswer(4, bytes((127, 0, 0, 1)), 60)))
    assert addresses_from_resolved(r) == ["::1", "127.0.0.1"]
    assert hostname_from_resolved(r) == ""
    assert hostname_from_resolved(Resolved((ResolvedAnswer(0, b"localhost", 60),))) == "localhost"


# -- hypothesis fuzzing ------------------------------------------------------------------------------------

VALID_MESSAGES = [
    greet(0) + req5(1, "example.com"),
    greet(0, 2) + userpass(b"user", b"pass") + req5(0xF0, "example.com", 0),
    greet(2) + userpass(b"", b"") + req5(1, "2001:db8::1", 443),
    greet(0) + req5(0xF1, "10.0.0.1", 0),
    req4(1, "10.0.0.1", 80, b"uid"),
    req4(1, "0.0.0.1", 80, b"uid", b"example.com"),
]


def _feed(data: bytes, cuts: list[int]) -> SocksParser:
    """Feed data in pieces; the only exception allowed out is SocksError."""
    p = SocksParser()
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for a, b in zip(bounds, bounds[1:]):
            events = p.receive_data(data[a:b])
            assert all(isinstance(e, (SendReply, RequestReady)) for e in events)
            if p.state is ParserState.DONE:
                assert isinstance(events[-1], RequestReady)
                break
    except SocksError as exc:
        assert isinstance(exc.reply, bytes) and p.state is ParserState.FAILED
        assert exc.reply == b"" or exc.reply[0] in (0, 1, 5, ord("H"))
        return p
    # incomplete input: the parser waits, holding a bounded amount
    assert p.state is ParserState.DONE or p.buffered <= MAX_MESSAGE
    return p


fuzz = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=700), st.lists(st.integers(0, 700), max_size=8))
def test_fuzz_random_bytes(data, cuts):
    _feed(data, cuts)


@fuzz
@given(st.sampled_from(VALID_MESSAGES), st.integers(0, 300), st.lists(st.integers(0, 300), max_size=5))
def test_fuzz_truncated_valid_messages(msg, cut, cuts):
    p = _feed(msg[:cut % (len(msg) + 1)], cuts)
    if cut % (len(msg) + 1) < len(msg):
        assert p.state is not ParserState.DONE  # never a request from a truncated message


@fuzz
@given(st.sampled_from(VALID_MESSAGES), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)),
                                                 min_size=1, max_size=4), st.binary(max_size=40))
def test_fuzz_mutated_valid_messages(msg, flips, tail):
    data = bytearray(msg)
    for pos, val in flips:
        data[pos % len(data)] = val
    _feed(bytes(data) + tail, [])


@fuzz
@given(st.binary(min_size=1, max_size=600))
def test_fuzz_prefix_socks4_and_5(tail):
    for head in (b"\x04", b"\x05", greet(0), greet(2), greet(2) + userpass(b"a", b"b")):
        _feed(head + tail, [1, 5, 9])


# -- server helpers ----------------------------------------------------------------------------------------


class OfflineBackend:
    """For requests that must be answered without the network: any call fails the test."""

    def __init__(self):
        self.calls: list[SocksRequest] = []

    async def open_stream(self, req):
        self.calls.append(req)
        raise AssertionError(f"backend consulted for {req}")

    async def resolve(self, req):
        self.calls.append(req)
        raise AssertionError(f"backend consulted for {req}")

    async def resolve_ptr(self, req):
        self.calls.append(req)
        raise AssertionError(f"backend consulted for {req}")


class RelayBackend:
    """SocksBackend over real 3-hop circuits through relay_net: one circuit per isolation key."""

    def __init__(self, relays):
        self.client = OnionClient()
        self.path = [r.info() for r in relays]
        self.circuits: dict[IsolationKey, object] = {}
        self.used: list[tuple[SocksRequest, int]] = []  # (request, circuit id)
        self._lock = asyncio.Lock()

    async def _circuit(self, req):
        async with self._lock:
            circ = self.circuits.get(req.isolation_key)
            if circ is None or circ.state != "built":
                circ = await self.client.build_circuit(self.path, timeout=20)
                self.circuits[req.isolation_key] = circ
        self.used.append((req, circ.id))
        return circ

    async def open_stream(self, req):
        circ = await self._circuit(req)
        flags = Begin.IPV6_OK if req.host_kind == "ipv6" else 0
        return await circ.open_stream(req.host, req.port, flags=flags, timeout=20)

    async def resolve(self, req):
        return addresses_from_resolved(await (await self._circuit(req)).resolve(req.host, timeout=20))

    async def resolve_ptr(self, req):
        name = ipaddress.ip_address(req.host).reverse_pointer
        return hostname_from_resolved(await (await self._circuit(req)).resolve(name, timeout=20))

    async def close(self):
        await self.client.close()


@pytest.fixture
async def offline():
    backend = OfflineBackend()
    server = SocksServer(backend, port=0, handshake_timeout=0.5)
    await server.start()
    yield server
    await server.stop()
    assert backend.calls == []


@pytest.fixture
async def socks(relay_net):
    backend = RelayBackend(relay_net)
    server = SocksServer(backend, port=0, handshake_timeout=5)
    await server.start()
    yield server
    await server.stop()
    await backend.close()


async def exchange(port: int, data: bytes, *, expect: int | None = None) -> tuple[bytes, bool]:
    """Send data; read ``expect`` bytes (or to EOF). Returns (bytes, closed by the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(30):
            if expect is None:
                try:
                    return await reader.read(-1), True
                except ConnectionResetError:  # closed with our bytes unread: RST, not FIN
                    return b"", True
            got = await reader.readexactly(expect)
            try:
                return got, await reader.read(1) == b""
            except ConnectionResetError:
                return got, True
    finally:
        writer.close()


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "30", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out, err


# -- server: local answers and errors (no network needed) -----------------------------------------------


async def test_server_listens_on_loopback_by_default():
    server = SocksServer(OfflineBackend(), port=0)
    await server.start()
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        assert isinstance(server.backend, SocksBackend)
    finally:
        await server.stop()


@pytest.mark.parametrize("data,reply", [
    (greet(0) + req5(2, "1.2.3.4"), b"\x05\x00" + err5(7)),            # BIND
    (greet(0) + req5(3, "1.2.3.4"), b"\x05\x00" + err5(7)),            # UDP ASSOCIATE
    (greet(0) + b"\x05\x01\x00\x07", b"\x05\x00" + err5(8)),           # bad address type
    (greet(0) + b"\x04\x01\x00\x01", b"\x05\x00" + err5(1)),           # bad version
    (greet(0) + req5(1, b"bad host"), b"\x05\x00" + err5(1)),          # bad hostname
    (greet(0x80), b"\x05\xff"),                                         # no acceptable method
    (req4(2, "1.2.3.4"), REJECT4),                                      # SOCKS4 BIND
    (b"\x07\x01\x00", b""),                                             # unknown version
])
async def test_server_error_reply_then_close(offline, data, reply):
    got, closed = await exchange(offline.port, data)
    assert got == reply and closed
    assert offline.stats.handshake_failed == 1 and offline.stats.active == 0


async def test_resolve_of_ip_literal_is_answered_locally(offline):
    got, closed = await exchange(offline.port, greet(0) + req5(0xF0, "10.9.8.7", 0))
    assert got == b"\x05\x00" + socks5_reply(0, "10.9.8.7") and closed
    got, _ = await exchange(offline.port, req4(0xF0, "10.9.8.7", 0))
    assert got == socks4_reply(True, "10.9.8.7")
    assert offline.stats.resolves_ok == 2


async def test_onion_names_never_leave_the_client(offline):
    # a v2 name is no valid address: general failure, as tor (tests/test_onion_address.py has the rest)
    got, _ = await exchange(offline.port, greet(0) + req5(1, "expyuzz4wqqyqhjn.onion", 80))
    assert got == b"\x05\x00" + err5(Reply.GENERAL_FAILURE)
    got, _ = await exchange(offline.port, req4(1, "0.0.0.1", 80, b"", b"abc.onion"))
    assert got == REJECT4


@needs_curl
async def test_http_request_to_socks_port_gets_html(offline):
    rc, out, err = await curl("-i", f"http://127.0.0.1:{offline.port}/index.html")
    assert rc == 0, err
    assert out.startswith(b"HTTP/1.0 501") and b"This is a SOCKS proxy, not an HTTP proxy" in out
    got, closed = await exchange(offline.port, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    assert got == HTTP_NOT_SOCKS_ANSWER and closed


@pytest.mark.parametrize("partial", [b"", b"\x05", greet(0, 2), greet(2) + b"\x01\x05ali",
                                     greet(0) + b"\x05\x01\x00\x03\x20exam", b"\x04\x01\x00\x50\x7f\x00"])
async def test_stalled_handshake_is_dropped(offline, partial):
    reader, writer = await asyncio.open_connection("127.0.0.1", offline.port)
    writer.write(partial)
    await writer.drain()
    async with asyncio.timeout(20):  # a hang guard, far above the 0.5 s handshake timeout
        rest = await reader.read(-1)
    writer.close()
    assert rest in (b"", b"\x05\x00", b"\x05\x02")  # only the method reply, then EOF
    assert offline.stats.handshake_failed == 1


async def test_max_connections_refuses_extra_clients():
    server = SocksServer(OfflineBackend(), port=0, handshake_timeout=5, max_connections=1)
    await server.start()
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", server.port)
        w1.write(b"\x05")  # hold a handshake open
        await w1.drain()
        got, closed = await exchange(server.port, greet(0))
        assert got == b"" and closed
        w1.close()
    finally:
        await server.stop()


async def test_random_garbage_on_a_real_socket_never_hangs(offline):
    import random
    rnd = random.Random(1928)
    for _ in range(25):
        data = rnd.randbytes(rnd.randrange(1, 64))
        got, closed = await exchange(offline.port, data)
        assert closed and len(got) <= len(HTTP_NOT_SOCKS_ANSWER) + 2


# -- end to end through relay_net -----------------------------------------------------------------------------


@needs_curl
@pytest.mark.parametrize("mode,version,kind", [
    ("--socks5-hostname", 5, "domain"), ("--socks5", 5, "ipv4"),
    ("--socks4a", 4, "domain"), ("--socks4", 4, "ipv4"),
])
async def test_curl_all_socks_modes(socks, http_server, mode, version, kind):
    rc, body, err = await curl(mode, f"127.0.0.1:{socks.port}", f"http://localhost:{http_server.port}/300000")
    assert rc == 0, err
    assert sha256(body) == sha256(blob(300_000))
    req = socks.backend.used[-1][0]
    assert (req.version, req.host_kind) == (version, kind)
    if kind == "domain":
        assert req.host == "localhost"  # resolved at the exit, not here (no DNS leak)
    assert socks.stats.streams_ok == 1 and socks.stats.bytes_down >= 300_000


@needs_curl
async def test_curl_credentials_isolate_circuits(socks, http_server):
    url = f"http://127.0.0.1:{http_server.port}/1000"
    for user in ("alice:one", "bob:two", "alice:one", "alice:other"):
        rc, body, err = await curl("-x", f"socks5h://{user}@127.0.0.1:{socks.port}", url)
        assert rc == 0 and body == blob(1000), err
    rc, body, err = await curl("-x", f"socks4a://carol@127.0.0.1:{socks.port}", url)
    assert rc == 0 and body == blob(1000), err
    creds = [(r.username, r.password) for r, _ in socks.backend.used]
    assert creds == [(b"alice", b"one"), (b"bob", b"two"), (b"alice", b"one"), (b"alice", b"other"),
                     (b"carol", None)]
    circ = [cid for _, cid in socks.backend.used]
    assert circ[0] == circ[2]                 # same credentials: same circuit
    assert len({circ[0], circ[1], circ[3], circ[4]}) == 4  # different credentials: never shared


async def test_python_socks_with_username_password(socks, http_server):
    from python_socks.async_.asyncio import Proxy
    results = {}
    for user in ("u1", "u2"):
        proxy = Proxy.from_url(f"socks5://{user}:pw@127.0.0.1:{socks.port}", rdns=True)
        sock = await proxy.connect("localhost", http_server.port, timeout=30)
        reader, writer = await asyncio.open_connection(sock=sock)
        results[user] = await http_get(reader, writer, "/2000000")
        writer.close()
    assert all(sha256(b) == sha256(blob(2_000_000)) for b in results.values())
    (r1, c1), (r2, c2) = socks.backend.used
    assert (r1.username, r1.password, r1.host) == (b"u1", b"pw", "localhost") and c1 != c2


async def test_python_socks4(socks, http_server):
    from python_socks.async_.asyncio import Proxy
    proxy = Proxy.from_url(f"socks4://127.0.0.1:{socks.port}", rdns=True)
    sock = await proxy.connect("localhost", http_server.port, timeout=30)
    reader, writer = await asyncio.open_connection(sock=sock)
    assert await http_get(reader, writer, "/5000") == blob(5000)
    writer.close()


async def test_refused_and_policy_rejected_reply_codes(socks):
    closed_port = free_port()
    got, closed = await exchange(socks.port, greet(0) + req5(1, "127.0.0.1", closed_port), expect=12)
    assert got == b"\x05\x00" + err5(Reply.CONNECTION_REFUSED) and closed
    got, _ = await exchange(socks.port, greet(0) + req5(1, "127.0.0.2", 80), expect=12)
    assert got == b"\x05\x00" + err5(Reply.NOT_ALLOWED)  # the exit accepts only 127.0.0.1
    got, _ = await exchange(socks.port, req4(1, "127.0.0.1", closed_port), expect=8)
    assert got == REJECT4
    assert socks.stats.streams_failed == 3 and socks.stats.streams_ok == 0


async def test_python_socks_sees_the_error_code(socks):
    from python_socks import ProxyError
    from python_socks.async_.asyncio import Proxy
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{socks.port}", rdns=True)
    with pytest.raises(ProxyError) as info:
        await proxy.connect("127.0.0.2", 80, timeout=30)
    assert info.value.error_code == Reply.NOT_ALLOWED


async def test_resolve_f0_answered_by_the_exit(socks):
    got, closed = await exchange(socks.port, greet(0) + req5(0xF0, "localhost", 0), expect=12)
    assert got == b"\x05\x00" + socks5_reply(0, "127.0.0.1") and closed
    got, _ = await exchange(socks.port, req4(0xF0, "0.0.0.1", 0, b"", b"localhost"), expect=8)
    assert got == socks4_reply(True, "127.0.0.1")
    assert [r.command for r, _ in socks.backend.used] == ["resolve", "resolve"]
    assert socks.stats.resolves_ok == 2


async def test_resolve_ptr_f1_answered_by_the_exit(socks):
    got, _ = await exchange(socks.port, greet(0) + req5(0xF1, "127.0.0.1", 0), expect=2 + 5 + 9 + 2)
    assert got == b"\x05\x00" + socks5_reply(0, "localhost")
    assert socks.backend.used[0][0].command == "resolve_ptr"


async def test_unresolvable_name_maps_to_host_unreachable(socks):
    got, _ = await exchange(socks.port, greet(0) + req5(0xF0, "no-such-host.invalid", 0), expect=12)
    assert got == b"\x05\x00" + err5(Reply.HOST_UNREACHABLE)
    got, _ = await exchange(socks.port, greet(0) + req5(1, "no-such-host.invalid", 80), expect=12)
    assert got == b"\x05\x00" + err5(Reply.HOST_UNREACHABLE)  # END RESOLVEFAILED


async def test_optimistic_data_and_echo_both_ways(socks, http_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", socks.port)
    writer.write(greet(0) + req5(1, "127.0.0.1", http_server.port) + b"GET /echo HTTP/1.0\r\n\r\n")
    assert await reader.readexactly(12) == b"\x05\x00" + socks5_reply(0)
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.0 200 OK\r\n\r\n"
    payload = blob(400_000)
    writer.write(payload)
    await writer.drain()
    assert await reader.readexactly(len(payload)) == payload
    writer.close()
    assert socks.stats.bytes_up >= len(payload)


async def test_ipv6_connect(relay_net, tmp_path):
    """CONNECT to an IPv6 literal through an exit whose policy accepts [::1]."""
    keys = RelayKeys.load_or_create(tmp_path / "v6" / "keys")
    exit6 = Relay(keys, relay_config(tmp_path / "v6", exit_reject_private=False, nickname="v6exit", extend_allow_private=True, exit_policy=ExitPolicy.parse(LOOPBACK_EXIT.replace("\n", "\naccept [::1]:*\n"),
                                               reject_private=False)))
    await exit6.start()

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + blob(70_000))
        await writer.drain()
        writer.close()

    http6 = await asyncio.start_server(serve, "::1", 0)
    backend = RelayBackend([relay_net[0], relay_net[1], exit6])
    server = SocksServer(backend, port=0)
    await server.start()
    try:
        from python_socks.async_.asyncio import Proxy
        proxy = Proxy.from_url(f"socks5://127.0.0.1:{server.port}")
        sock = await proxy.connect("::1", http6.sockets[0].getsockname()[1], timeout=30)
        reader, writer = await asyncio.open_connection(sock=sock)
        assert await http_get(reader, writer, "/") == blob(70_000)
        writer.close()
        assert backend.used[0][0].host_kind == "ipv6"
    finally:
        await server.stop()
        await backend.close()
        http6.close()
        await exit6.stop()


async def test_stop_closes_listener_and_open_connections(socks, http_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", socks.port)
    writer.write(greet(0) + req5(1, "127.0.0.1", http_server.port) + b"GET /hold HTTP/1.0\r\n\r\n")
    assert (await reader.readexactly(12))[:6] == b"\x05\x00\x05\x00\x00\x01"
    assert len(await reader.readexactly(100_000)) == 100_000  # the download is running
    await socks.stop()
    got = 100_000
    async with asyncio.timeout(20):
        try:
            while data := await reader.read(1 << 16):
                got += len(data)
        except ConnectionError:
            pass
    writer.close()
    assert got < 20_000_000  # cut off, not ended by the server's last byte
    assert socks.stats.active == 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", socks.port)


async def test_slow_reader_back_pressure_bounds_buffering(socks, http_server):
    """A client that stops reading stops the download: far less than the 20 MB offered moves."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", socks.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(greet(0) + req5(1, "127.0.0.1", http_server.port) + b"GET /hold HTTP/1.0\r\n\r\n")
    await reader.readexactly(12)
    previous = -1
    async with asyncio.timeout(30):  # wait until the pipeline is full and nothing moves
        while socks.stats.bytes_down != previous:
            previous = socks.stats.bytes_down
            await asyncio.sleep(0.3)
    assert 0 < socks.stats.bytes_down < 8_000_000
    total = 0
    async with asyncio.timeout(60):  # then the rest arrives once the client reads again
        while chunk := await reader.read(1 << 16):
            total += len(chunk)
    writer.close()
    assert total >= 20_000_000
