"""DNS messages for the DNS port, sans-IO (tor's DNSPort; RFC 1035; specs/socks.md "DNS port").

Only what a stub resolver's query and our answer need: :func:`parse_query` reads a query
(header, up to :data:`MAX_QUESTIONS` questions; authority and additional records such as
EDNS OPT are ignored) with every length and pointer checked, so any byte string either
parses or raises :class:`DnsFormatError` — never another exception, never more work than
the datagram's size allows (compression pointers must point backwards, at most
:data:`MAX_POINTERS` per name). :func:`build_response` writes the answer: the query's ID,
RD and questions echoed, RA set, answers compressed against the question name, kept
within 512 bytes (the classic UDP limit; we never need more, so TC is never set).

:func:`arpa_address` reads the address of a reverse name (``4.3.2.1.in-addr.arpa``,
``….ip6.arpa``); :func:`clamp_ttl` is tor's TTL rule for answers from the network.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from onionp2p.errors import ProtocolError

__all__ = [
    "MAX_QUESTIONS",
    "MAX_POINTERS",
    "MIN_TTL",
    "MAX_TTL",
    "QType",
    "Rcode",
    "DnsFormatError",
    "Question",
    "DnsQuery",
    "Answer",
    "parse_query",
    "build_response",
    "arpa_address",
    "clamp_ttl",
]

MAX_QUESTIONS = 4
MAX_POINTERS = 16
MAX_NAME = 255   # wire bytes of a name (RFC 1035 §2.3.4)
MAX_UDP_ANSWER = 512
#: tor's DNSPort answers no TTL below 60 s (dnsserv.c), and tor clips DNS TTLs at one hour
MIN_TTL = 60
MAX_TTL = 3600
CLASS_IN = 1


class QType(enum.IntEnum):
    A = 1
    PTR = 12
    AAAA = 28


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class DnsFormatError(ProtocolError):
    """Not a DNS query we can read. ``query_id`` is set when the header was readable
    (then a FORMERR answer can be sent); None means drop the datagram silently."""

    def __init__(self, message: str, query_id: int | None = None, flags: int = 0):
        super().__init__(message)
        self.query_id = query_id
        self.flags = flags


@dataclass(frozen=True)
class Question:
    name: str     # dotted, without the final dot, case as sent ("" is the root)
    qtype: int
    qclass: int
    wire: bytes   # the question as it appeared (name uncompressed), echoed in the answer


@dataclass(frozen=True)
class DnsQuery:
    id: int
    flags: int  # the header's flags word as sent
    opcode: int
    questions: tuple[Question, ...]

    def first_supported(self) -> Question | None:
        """The first IN question of type A, AAAA or PTR (tor answers only one)."""
        for q in self.questions:
            if q.qclass == CLASS_IN and q.qtype in QType._value2member_map_:
                return q
        return None


@dataclass(frozen=True)
class Answer:
    qtype: int      # A, AAAA or PTR
    value: bytes    # 4 or 16 address bytes, or a hostname (ASCII, dotted)
    ttl: int


def _read_name(data: bytes, pos: int) -> tuple[str, bytes, int]:
    """(dotted name, uncompressed wire form, position after the name in the message)."""
    labels: list[bytes] = []
    end = None
    jumps = 0
    size = 1
    while True:
        if pos >= len(data):
            raise DnsFormatError("name runs past the end")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsFormatError("truncated compression pointer")
            target = ((n & 0x3F) << 8) | data[pos + 1]
            if target >= pos or jumps >= MAX_POINTERS:
                raise DnsFormatError("compression pointer loops or points forward")
            jumps += 1
            if end is None:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise DnsFormatError("unknown label type")
        pos += 1
        if n == 0:
            break
        label = data[pos:pos + n]
        if len(label) != n:
            raise DnsFormatError("label runs past the end")
        size += n + 1
        if size > MAX_NAME:
            raise DnsFormatError("name longer than 255 bytes")
        if not all(0x21 <= b < 0x7F and b != 0x2E for b in label):  # printable ASCII, no dot
            raise DnsFormatError("label is not printable ASCII")
        labels.append(label)
        pos += n
    wire = b"".join(bytes((len(lab),)) + lab for lab in labels) + b"\0"
    return b".".join(labels).decode("ascii"), wire, end if end is not None else pos


def parse_query(data: bytes) -> DnsQuery:
    """Read a DNS query. Raises :class:`DnsFormatError` (see its ``query_id``)."""
    if len(data) < 12:
        raise DnsFormatError("shorter than a DNS header")
    qid = int.from_bytes(data[0:2], "big")
    flags = int.from_bytes(data[2:4], "big")
    if flags & 0x8000:
        raise DnsFormatError("a response, not a query")  # never answer answers (no loops)
    qdcount = int.from_bytes(data[4:6], "big")
    opcode = (flags >> 11) & 0xF
    if qdcount > MAX_QUESTIONS:
        raise DnsFormatError(f"more than {MAX_QUESTIONS} questions", qid, flags)
    pos = 12
    questions = []
    for _ in range(qdcount):
        try:
            name, wire, pos = _read_name(data, pos)
        except DnsFormatError as exc:
            raise DnsFormatError(str(exc), qid, flags) from None
        if pos + 4 > len(data):
            raise DnsFormatError("truncated question", qid, flags)
        qtype = int.from_bytes(data[pos:pos + 2], "big")
        qclass = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 4
        questions.append(Question(name, qtype, qclass, wire + data[pos - 4:pos]))
    return DnsQuery(qid, flags, opcode, tuple(questions))


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ProtocolError("a label must be 1-63 bytes")
        out += bytes((len(raw),)) + raw
    out += b"\0"
    if len(out) > MAX_NAME:
        raise ProtocolError("name longer than 255 bytes")
    return out


def _header(qid: int, query_flags: int, rcode: int, qd: int, an: int) -> bytes:
    # QR=1, opcode and RD copied, AA=0, TC=0, RA=1 (we recurse, through the network)
    flags = 0x8000 | (query_flags & 0x7800) | (query_flags & 0x0100) | 0x0080 | (rcode & 0xF)
    return b"".join(x.to_bytes(2, "big") for x in (qid, flags, qd, an, 0, 0))


def build_response(query: DnsQuery | int, rcode: int, question: Question | None = None,
                   answers: tuple[Answer, ...] | list[Answer] = (), *, query_flags: int = 0) -> bytes:
    """The answer to ``query`` (or to a bare query ID when the query was unreadable: no
    questions echoed). ``answers`` answer ``question`` and are written with its name
    compressed; those that would pass 512 bytes are left out."""
    if isinstance(query, DnsQuery):
        qid, flags, questions = query.id, query.flags, query.questions
    else:
        qid, flags, questions = query, query_flags, ()
    body = b"".join(q.wire for q in questions)
    records = []
    size = 12 + len(body)
    if answers:
        assert question is not None and question in questions
        pointer = 0xC000 | (12 + sum(len(q.wire) for q in questions[:questions.index(question)]))
        for a in answers:
            if a.qtype == QType.PTR:
                rdata = _encode_name(a.value.decode("ascii"))
            else:
                rdata = a.value
            rr = (pointer.to_bytes(2, "big") + int(a.qtype).to_bytes(2, "big") + CLASS_IN.to_bytes(2, "big")
                  + clamp_ttl(a.ttl).to_bytes(4, "big") + len(rdata).to_bytes(2, "big") + rdata)
            if size + len(rr) > MAX_UDP_ANSWER:
                break
            records.append(rr)
            size += len(rr)
    return _header(qid, flags, rcode, len(questions), len(records)) + body + b"".join(records)


def arpa_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a complete reverse name stands for, or None (not a reverse name)."""
    labels = name.lower().rstrip(".").split(".")
    try:
        if labels[-2:] == ["in-addr", "arpa"] and len(labels) == 6:
            return ipaddress.IPv4Address(".".join(reversed(labels[:4])))
        if labels[-2:] == ["ip6", "arpa"] and len(labels) == 34 and all(len(x) == 1 for x in labels[:32]):
            return ipaddress.IPv6Address(int("".join(reversed(labels[:32])), 16))
    except ValueError:
        return None
    return None


def clamp_ttl(ttl: int) -> int:
    """A RESOLVED TTL as the DNS port answers it: at least 60 s, at most an hour (as tor)."""
    return min(max(ttl, MIN_TTL), MAX_TTL)
