#!/usr/bin/env python3
"""atheris harness: the application front ends' decoders — the sans-IO SOCKS parser and the
SOCKS answers built from RELAY_RESOLVED, the HTTP CONNECT request reader, the DNS port's
query parser and its answers built from RELAY_RESOLVED.

Run (libFuzzer flags pass through)::

    .venv/bin/python tests/fuzz/fuzz_socks.py WORKDIR tests/fuzz/corpus/socks -max_total_time=60

or ``tools/fuzz socks SECONDS``. Input layout: see ``fuzzlib.py`` (``SOCKS_TARGETS``).

Contract (specs/socks.md): a SOCKS client's bytes make :class:`SocksParser` return events
or raise :class:`SocksError` (a ``ProtocolError``) carrying the reply to send; nothing
else may escape. Invariants checked besides: the result does not depend on how the bytes
were split into reads (the chunked run must equal a run on the whole input), the parser
never keeps more than ``MAX_MESSAGE`` bytes, a request it returns is well-formed (port,
command, host either a normalised IP literal or a valid hostname), its repr never shows
the credentials, and every reply the server would send for it can be built.
"""

from __future__ import annotations

import os
import re
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import construct  # noqa: E402,F401
import cryptography.x509  # noqa: E402,F401
import structlog  # noqa: E402,F401
from fuzzlib import SOCKS_TARGETS, check, consume_chunks  # noqa: E402

with atheris.instrument_imports(include=["onionp2p"]):
    import ipaddress

    from onionp2p.client import socksport as S
    from onionp2p.client.dnsport import answer_for
    from onionp2p.errors import ProtocolError
    from onionp2p.proto import dnsmsg as D
    from onionp2p.proto import httpconnect as H
    from onionp2p.proto import socks as P
    from onionp2p.proto.relaycell import Resolved

_HOSTNAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?\Z")
_KEY_REPR = re.compile(r"IsolationKey\([0-9a-f]{12}\)\Z")


def _run(chunks: list[bytes], prefer_no_auth: bool) -> tuple:
    """Feed ``chunks`` like SocksServer does; what the client would see, and the request."""
    parser = P.SocksParser(client_address=("127.0.0.1", 4242), session_group=7, prefer_no_auth=prefer_no_auth)
    sent = bytearray()
    request = None
    extra = b""
    failure = None
    for i, chunk in enumerate(chunks):
        try:
            events = parser.receive_data(chunk)
        except P.SocksError as exc:
            check(parser.state is P.ParserState.FAILED, "SocksError without the FAILED state")
            check(isinstance(exc.reply, bytes), "SocksError.reply is not bytes")
            sent += exc.reply  # the client gets the replies already due, then the error reply
            failure = (type(exc), exc.code)
            break
        for j, event in enumerate(events):
            if isinstance(event, P.SendReply):
                check(len(event.data) > 0, "empty SendReply")
                sent += event.data
            else:
                check(isinstance(event, P.RequestReady) and j == len(events) - 1,
                      "RequestReady is not the last event")
                request, extra = event.request, event.extra
        if request is not None:
            check(parser.state is P.ParserState.DONE, "request returned but parser not DONE")
            # The server reads everything after the request as stream data.
            extra += b"".join(chunks[i + 1:])
            break
        check(parser.buffered <= P.MAX_MESSAGE, f"parser keeps {parser.buffered} bytes")
    return (bytes(sent), request, extra, failure, parser.state, parser.buffered if request is None else 0)


def _check_request(req: P.SocksRequest) -> None:
    check(req.version in (4, 5), "request version")
    check(req.command in ("connect", "resolve", "resolve_ptr"), "request command")
    check(0 <= req.port <= 0xFFFF, "port out of range")
    check(req.command != "connect" or req.port != 0, "CONNECT to port 0 accepted")
    check(req.version == 5 or req.command != "resolve_ptr", "SOCKS4 RESOLVE_PTR accepted")
    try:
        ip = ipaddress.ip_address(req.host)
    except ValueError:
        ip = None
    if ip is not None:
        check(str(ip) == req.host, "IP literal not normalised")
        check(req.host_kind == f"ipv{ip.version}", "host_kind of an IP literal")
    else:
        check(req.command != "resolve_ptr", "RESOLVE_PTR of a hostname accepted")
        check(req.host.isascii() and len(req.host) <= 255 and _HOSTNAME.match(req.host) is not None,
              f"malformed hostname accepted: {req.host!r}")
        check(req.host_kind == "domain", "host_kind of a hostname")
    key = req.isolation_key
    hash(key)
    check(_KEY_REPR.match(repr(key)) is not None, "IsolationKey repr shows more than a digest")
    check("username" not in repr(req) and "password" not in repr(req), "SocksRequest repr shows credentials")
    # The replies the server may send for this request must all be buildable.
    for code in (P.Reply.SUCCEEDED, P.Reply.GENERAL_FAILURE, P.Reply.HOST_UNREACHABLE):
        P.reply_for(req.version, code)
    if req.command != "connect" and req.host_kind != "domain":
        answer = S._pick_address([req.host], req.version)
        _check_reply(req.version, P.reply_for(req.version, P.Reply.SUCCEEDED if answer else
                                              P.Reply.HOST_UNREACHABLE, answer))


def _check_reply(version: int, reply: bytes) -> None:
    if version == 4:
        check(len(reply) == 8 and reply[0] == 0, "SOCKS4 reply layout")
        return
    check(reply[0] == 5 and reply[2] == 0, "SOCKS5 reply header")
    atyp = reply[3]
    want = {1: 10, 4: 22}.get(atyp, 7 + reply[4] if atyp == 3 and len(reply) > 4 else -1)
    check(len(reply) == want, f"SOCKS5 reply length {len(reply)} for ATYP {atyp}")


def t_parser(fdp) -> None:
    prefer_no_auth = fdp.ConsumeIntInRange(0, 1) == 1
    chunks = consume_chunks(fdp)
    chunked = _run(chunks, prefer_no_auth)
    whole = _run([b"".join(chunks)] if chunks else [], prefer_no_auth)
    check(chunked == whole, f"outcome depends on how the input was split:\n{chunked!r}\n{whole!r}")
    _sent, request, _extra, failure, _state, _buffered = chunked
    if request is not None:
        _check_request(request)
    if failure is not None:
        raise ProtocolError("rejected")  # the typed outcome


def t_resolved(fdp) -> None:
    """An exit's RELAY_RESOLVED answer turned into RESOLVE / RESOLVE_PTR replies (SocksServer._resolve)."""
    resolved = Resolved.parse(fdp.ConsumeBytes(fdp.remaining_bytes()))
    addrs = S.addresses_from_resolved(resolved)
    for a in addrs:
        check(str(ipaddress.ip_address(a)) == a, f"resolved address not a normalised IP literal: {a!r}")
    for version in (4, 5):
        answer = S._pick_address(addrs, version)
        code = P.Reply.HOST_UNREACHABLE if answer is None else P.Reply.SUCCEEDED
        _check_reply(version, P.reply_for(version, code, answer))
    name = S.hostname_from_resolved(resolved)
    if name and name.isascii() and len(name) <= P.MAX_FIELD:  # what SocksServer._resolve accepts
        _check_reply(5, P.reply_for(5, P.Reply.SUCCEEDED, name))


def _run_http(chunks: list[bytes]) -> tuple:
    """Feed ``chunks`` like HttpTunnelServer does: (request fields, data after it, error status)."""
    parser = H.HttpConnectParser(client_address=("127.0.0.1", 4242), session_group=7)
    for i, chunk in enumerate(chunks):
        try:
            ready = parser.receive_data(chunk)
        except H.HttpConnectError as exc:
            r = exc.response
            check(r.startswith(b"HTTP/1.1 ") and b"\r\nConnection: close\r\n" in r, "error response layout")
            return None, b"", int(r[9:12])
        if ready is not None:
            req = ready.request
            return ((req.version, req.command, req.host, req.port, req.username, req.password, req.protocol),
                    ready.extra + b"".join(chunks[i + 1:]), None)
        check(parser.buffered <= H.MAX_HEADER_BYTES, f"CONNECT parser keeps {parser.buffered} bytes")
    return None, b"", None


def t_http_connect(fdp) -> None:
    chunks = consume_chunks(fdp)
    chunked = _run_http(chunks)
    whole = _run_http([b"".join(chunks)] if chunks else [])
    check(chunked == whole, f"outcome depends on how the input was split:\n{chunked!r}\n{whole!r}")
    fields, _extra, status = chunked
    if fields is not None:
        version, command, host, port, _user, _pw, protocol = fields
        check((version, command, protocol) == (0, "connect", "HTTPCONNECT"), "request kind")
        check(0 < port < 65536, "port out of range")
        req = P.SocksRequest(0, "connect", host, port, client_address=("127.0.0.1", 1))
        try:
            ip = ipaddress.ip_address(host)
            check(str(ip) == host, "IP literal not normalised")
        except ValueError:
            check(host.isascii() and len(host) <= 255 and _HOSTNAME.match(host) is not None,
                  f"malformed hostname accepted: {host!r}")
        hash(req.isolation_key)
        for code in P.Reply:
            if code != P.Reply.SUCCEEDED:
                check(H.response_for_reply(code)[9:10] in (b"4", b"5"), "failure answered with success")
    if status is not None:
        raise ProtocolError("rejected")


def _check_dns_answer(out: bytes, qid: int) -> None:
    check(len(out) >= 12 and out[:2] == qid.to_bytes(2, "big") and out[2] & 0x80, "DNS answer header")


def t_dns_query(fdp) -> None:
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        q = D.parse_query(data)
    except D.DnsFormatError as exc:
        if exc.query_id is not None:
            _check_dns_answer(D.build_response(exc.query_id, D.Rcode.FORMERR, query_flags=exc.flags),
                              exc.query_id)
        raise
    check(len(q.questions) <= D.MAX_QUESTIONS, "too many questions accepted")
    for rcode in D.Rcode:
        _check_dns_answer(D.build_response(q, rcode), q.id)
    question = q.first_supported()
    if question is not None:
        check(len(question.name) <= 255 and question.name.isascii(), "question name")
        answers = {D.QType.A: [D.Answer(1, b"\x7f\x00\x00\x01", 0)], D.QType.AAAA: [D.Answer(28, b"\x00" * 16, 1)],
                   D.QType.PTR: [D.Answer(12, b"a" * 63 + b"." + b"b" * 63, 2**32 - 1)]}[question.qtype]
        out = D.build_response(q, D.Rcode.NOERROR, question, answers)
        _check_dns_answer(out, q.id)


def t_dns_resolved(fdp) -> None:
    """An exit's RELAY_RESOLVED turned into the DNS port's answer (DnsPortServer._answer)."""
    resolved = Resolved.parse(fdp.ConsumeBytes(fdp.remaining_bytes()))
    for qtype, name in ((1, "example.com"), (28, "example.com"), (12, "1.0.0.127.in-addr.arpa")):
        labels = b"".join(bytes((len(x),)) + x.encode() for x in name.split("."))
        q = D.parse_query(b"\x00\x07\x01\x00\x00\x01" + b"\x00" * 6 + labels + b"\x00"
                          + qtype.to_bytes(2, "big") + b"\x00\x01")
        rcode, answers = answer_for(q.questions[0], resolved)
        check(rcode in (D.Rcode.NOERROR, D.Rcode.NXDOMAIN, D.Rcode.SERVFAIL), "rcode")
        check(all(a.qtype == qtype for a in answers), "answer of another type")
        out = D.build_response(q, rcode, q.questions[0], answers)
        _check_dns_answer(out, 7)
        check(len(out) <= D.MAX_UDP_ANSWER, "DNS answer over 512 bytes")


TARGETS = {"parser": t_parser, "resolved": t_resolved, "http_connect": t_http_connect,
           "dns_query": t_dns_query, "dns_resolved": t_dns_resolved}
assert tuple(TARGETS) == SOCKS_TARGETS, "fuzzlib.SOCKS_TARGETS and TARGETS disagree"
_ORDER = [TARGETS[name] for name in SOCKS_TARGETS]


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = _ORDER[fdp.ConsumeIntInRange(0, len(_ORDER) - 1)]
    try:
        target(fdp)
    except ProtocolError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
