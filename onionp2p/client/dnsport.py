"""DNS port: a UDP resolver on 127.0.0.1 that resolves through the network (tor's DNSPort;
specs/socks.md "DNS port").

Theory of operation
-------------------
:class:`DnsPortServer` is an ``asyncio.DatagramProtocol``. Each datagram is read with
:func:`~onionp2p.proto.dnsmsg.parse_query`; an unreadable one is dropped with a debug
line (or answered FORMERR when its header was readable). Like tor, the server answers the
first question of type A, AAAA or PTR (class IN): other opcodes and types get NOTIMP, a
query without questions an empty NOERROR. The question becomes a RELAY_RESOLVE at an exit
through ``backend.resolve_raw`` — the same call (and the same STREAM events) as the SOCKS
port's RESOLVE / RESOLVE_PTR — on a circuit chosen by the request's isolation key: this
listener's session group and the client's address (tor's IsolateClientAddr; a DNS query
carries no credentials). A reverse name (``….in-addr.arpa``) goes to the exit as it is.

The RESOLVED answer is mapped as tor's ``dnsserv_resolved`` does: addresses of the asked
family become A/AAAA records, a hostname a PTR record, with the TTL clamped to
60 s – 1 h; a non-transient error (F1) is NXDOMAIN, a transient one (F0), a failed
circuit or a timeout SERVFAIL; answers of the other family only: NOERROR without records.
IP literals and ``.onion`` names are answered locally (the address itself; NXDOMAIN), so
no exit learns them. At most ``max_pending`` queries are in flight; more get SERVFAIL.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from onionp2p.client.socksport import _session_groups
from onionp2p.errors import ListenError, OnionError
from onionp2p.log import get_logger
from onionp2p.proto.dnsmsg import (
    Answer,
    DnsFormatError,
    DnsQuery,
    QType,
    Question,
    Rcode,
    build_response,
    parse_query,
)
from onionp2p.proto.relaycell import Resolved, ResolvedType
from onionp2p.proto.socks import SocksRequest

__all__ = ["DnsBackend", "DnsStats", "DnsPortServer", "answer_for"]

log = get_logger("onionp2p.dnsport")
MAX_DATAGRAM = 65535
LOCAL_TTL = 60


class DnsBackend(Protocol):
    async def resolve_raw(self, req: SocksRequest, name: str) -> Resolved:
        """RELAY_RESOLVE ``name`` at an exit for ``req.isolation_key``: the RESOLVED message.
        Raises StreamError when no circuit or exit answered."""


@dataclass
class DnsStats:
    queries: int = 0      # datagrams received
    answered: int = 0     # answers sent
    malformed: int = 0    # dropped or FORMERR
    failed: int = 0       # SERVFAIL answers


def answer_for(question: Question, resolved: Resolved) -> tuple[int, list[Answer]]:
    """(rcode, answers) for ``question`` from an exit's RESOLVED (see the module doc)."""
    want = {QType.A: ResolvedType.IPV4, QType.AAAA: ResolvedType.IPV6,
            QType.PTR: ResolvedType.HOSTNAME}[QType(question.qtype)]
    size = {ResolvedType.IPV4: 4, ResolvedType.IPV6: 16}
    answers = []
    for a in resolved.answers:
        if a.atype != want:
            continue
        if want == ResolvedType.HOSTNAME:
            name = a.value.rstrip(b".")
            if not name or not all(0 < len(lab) < 64 and 0x20 < min(lab) and max(lab) < 0x7F
                                   for lab in name.split(b".")):
                continue  # not a name we can write (or an empty one)
            answers.append(Answer(QType.PTR, name, a.ttl))
        elif len(a.value) == size[want]:
            answers.append(Answer(question.qtype, a.value, a.ttl))
    if answers:
        return Rcode.NOERROR, answers
    found = (ResolvedType.IPV4, ResolvedType.IPV6, ResolvedType.HOSTNAME)
    if any(a.atype in found for a in resolved.answers):
        return Rcode.NOERROR, []  # the name exists, without records of this type (NODATA)
    if any(a.atype == ResolvedType.ERROR_TRANSIENT for a in resolved.answers):
        return Rcode.SERVFAIL, []
    return Rcode.NXDOMAIN, []


class DnsPortServer(asyncio.DatagramProtocol):
    """The DNS port: ``await start()``, ``.port``, ``await stop()``."""

    def __init__(self, backend: DnsBackend, *, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 30.0, max_pending: int = 256, session_group: Hashable = None):
        self.backend = backend
        self.host = host
        self._port = port
        self.timeout = timeout
        self.max_pending = max_pending
        self.session_group = session_group if session_group is not None else next(_session_groups)
        self.stats = DnsStats()
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(lambda: self,
                                                                     local_addr=(self.host, self._port))
        except OSError as exc:
            raise ListenError.from_os_error("DNS port", self.host, self._port, exc) from None
        self._port = self._transport.get_extra_info("sockname")[1]
        log.info("DNS listener open", listen_port=self._port)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- datagrams -------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stats.queries += 1
        try:
            query = parse_query(data[:MAX_DATAGRAM])
        except DnsFormatError as exc:
            self.stats.malformed += 1
            log.debug("malformed DNS query", error=str(exc), client=addr)
            if exc.query_id is not None:
                self._send(build_response(exc.query_id, Rcode.FORMERR, query_flags=exc.flags), addr)
            return
        if query.opcode != 0:
            self._send(build_response(query, Rcode.NOTIMP), addr)
            return
        if not query.questions:
            self._send(build_response(query, Rcode.NOERROR), addr)  # tor: "sending back nil reply"
            return
        question = query.first_supported()
        if question is None:
            self._send(build_response(query, Rcode.NOTIMP), addr)
            return
        if len(self._tasks) >= self.max_pending:
            self.stats.failed += 1
            self._send(build_response(query, Rcode.SERVFAIL), addr)
            return
        task = asyncio.get_running_loop().create_task(self._answer(query, question, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS port socket error", error=str(exc))

    def _send(self, data: bytes, addr: Any) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self.stats.answered += 1
            self._transport.sendto(data, addr)

    async def _answer(self, query: DnsQuery, question: Question, addr: Any) -> None:
        req = SocksRequest(0, "resolve_ptr" if question.qtype == QType.PTR else "resolve", question.name, 0,
                           client_address=addr, session_group=self.session_group, protocol="DNS")
        local = _local_answer(question)
        if local is not None:
            rcode, answers = local
        else:
            try:
                async with asyncio.timeout(self.timeout):
                    resolved = await self.backend.resolve_raw(req, question.name)
                rcode, answers = answer_for(question, resolved)
            except (OnionError, TimeoutError) as exc:
                log.info("DNS port lookup failed", error=repr(exc), target=question.name)
                rcode, answers = Rcode.SERVFAIL, []
            except Exception as exc:  # noqa: BLE001 - a broken backend must still answer
                log.error("DNS port backend raised", exc_info=exc, target=question.name)
                rcode, answers = Rcode.SERVFAIL, []
        if rcode == Rcode.SERVFAIL:
            self.stats.failed += 1
        self._send(build_response(query, rcode, question, answers), addr)


def _local_answer(question: Question) -> tuple[int, list[Answer]] | None:
    """Questions answered without the network: A/AAAA of an IP literal (itself, as tor's
    SOCKS RESOLVE does) and .onion names (NXDOMAIN: no onion services)."""
    name = question.name.lower()
    if name == "onion" or name.endswith(".onion"):
        return Rcode.NXDOMAIN, []
    if question.qtype == QType.PTR:
        return None
    try:
        ip = ipaddress.ip_address(question.name)
    except ValueError:
        return None
    if (ip.version == 4) == (question.qtype == QType.A):
        return Rcode.NOERROR, [Answer(question.qtype, ip.packed, LOCAL_TTL)]
    return Rcode.NOERROR, []
