"""Exit streams: BEGIN, RESOLVE and the TCP connections behind them (tor-spec §6.2-6.4).

Theory of operation
-------------------
The last hop of a circuit is where streams leave the network. For RELAY_BEGIN the
exit parses ``host:port``, resolves a hostname with asyncio's resolver (never the
client), checks every candidate address against its :class:`ExitPolicy`, connects,
and answers RELAY_CONNECTED (address, TTL) — or RELAY_END with the tor-spec reason:
EXITPOLICY (with the address), RESOLVEFAILED, CONNECTREFUSED, TIMEOUT, NOROUTE,
MISC. A relay whose policy rejects everything is not an exit and answers every
BEGIN with END(EXITPOLICY). BEGIN_DIR is joined to the relay's own directory
server on 127.0.0.1 (``dir_port``), with no exit policy applied; a relay without one
answers NOTDIRECTORY.

The stream rules (windows, SENDMEs, packaging, END) are the circuit core's
(:class:`onionp2p.proto.circuit.RelayCircuit`): it asks for a stream with ``ExitBegin`` or
``ExitResolve`` and this module answers it (``exit_connected`` / ``exit_refused`` /
``exit_resolved``). Each open stream's destination socket is an :class:`ExitConnection`
(an asyncio Protocol) that feeds the core what it reads and writes what the core
delivers. The destination is read only while both windows allow (the core says pause and
resume), and stream SENDMEs are withheld while the destination's write buffer is above
its high-water mark, so a slow destination or a slow client never makes the exit buffer
without bound. Policy is decided here: whether the relay is an exit at all, its exit
policy, and tor's RefuseUnknownExits (streams only for circuits that come from a relay). A stream that ends (END from the client) closes its socket after flushing what
the client sent, as long as the destination keeps taking bytes: after ``flush_timeout``
(15 s) without progress the socket is aborted; a circuit that goes away aborts its
sockets at once. RESOLVE answers RESOLVED with IPv4 answers first; failures are F0/F1
answers.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from onionp2p.log import get_logger
from onionp2p.proto.exitpolicy import ExitPolicy, is_private_address
from onionp2p.proto.relaycell import Begin, Connected, End, EndReason, Resolved, ResolvedAnswer

if TYPE_CHECKING:  # pragma: no cover
    from onionp2p.relay.circuit import OrCircuit

__all__ = ["ExitHandler", "ExitConnection"]

try:  # the kernel's unsent bytes of a TCP socket (Linux)
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - other platforms
    _SIOCOUTQ = None

log = get_logger("onionp2p.exit")
CONNECT_TIMEOUT = 15.0
RESOLVE_TIMEOUT = 15.0
DNS_TTL = 300
#: DATA that came before the destination connected, held before the client is told to
#: stop: the stream window bounds it on fixed-window circuits (500 cells); under congestion
#: control the exit's XOFF limit does (tor's cc_xoff_exit, 500 cells)
MAX_PENDING_BYTES = 500 * 498
#: A closed exit stream's socket may keep flushing what the client sent while the
#: destination takes bytes; after this many seconds without progress it is aborted (tor
#: gives up on a connection held open for flushing after 15 s without a write).
FLUSH_TIMEOUT = 15.0


class ExitConnection(asyncio.Protocol):
    """The destination side of exit stream ``sid`` of circuit ``circ``."""

    def __init__(self, circ: OrCircuit, sid: int, flush_timeout: float = FLUSH_TIMEOUT) -> None:
        self.circ = circ
        self.sid = sid
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.pending: list[bytes] = []  # DATA that came before the connection (optimistic data)
        self.flush_timeout = flush_timeout
        self.gone = False  # the stream has left the circuit (closed or aborted)
        self._pending_bytes = 0
        self._held = False  # we told the core our sink is full while connecting
        self._lost = False
        self._flush_check: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        stream = self.circ.streams.get(self.sid)
        cc = self.circ.core.layer.cc
        if stream is not None and stream.xon and cc is not None:
            # under congestion control the sink says stop (XOFF) above tor's limit and go
            # (XON) once it is empty again, as tor's exits do
            self.transport.set_write_buffer_limits(high=cc.p.xoff_bytes(exit_side=True), low=0)
        for chunk in self.pending:
            self.transport.write(chunk)
        self.pending.clear()
        self._pending_bytes = 0
        if self._held and not self.write_paused and not self.gone:
            self._held = False
            self.circ.stream_sink_ready(self.sid, True)

    def data_received(self, data: bytes) -> None:
        if not self.gone:
            self.circ.stream_write(self.sid, data)

    def eof_received(self) -> bool:
        if not self.gone:
            self.circ.stream_eof(self.sid, EndReason.DONE)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._flush_check is not None:
            self._flush_check.cancel()
            self._flush_check = None
        if not self.gone:
            self.circ.stream_eof(self.sid, EndReason.DONE if exc is None else EndReason.CONNRESET)

    def pause_writing(self) -> None:
        self.write_paused = True
        if not self.gone:
            self.circ.stream_sink_ready(self.sid, False)

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.gone:
            self.circ.stream_sink_ready(self.sid, True)

    # the core's actions
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
        else:
            self.pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > MAX_PENDING_BYTES and not self._held and not self.gone:
                self._held = True
                self.circ.stream_sink_ready(self.sid, False)

    def unsent(self) -> int:
        """Bytes held for the destination: not yet connected, or not yet written."""
        t = self.transport
        return self._pending_bytes + (t.get_write_buffer_size() if t is not None and not self._lost else 0)

    def set_reading(self, reading: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.resume_reading() if reading else t.pause_reading()

    def close(self) -> None:
        """Close after flushing what the client sent; a destination that takes none of it
        for ``flush_timeout`` seconds loses the rest (the socket must not stay open)."""
        self.gone = True
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.close()
        if not self._lost and self.transport.get_write_buffer_size():
            self._schedule_flush_check(self._unflushed())

    def _unflushed(self) -> int:
        """Bytes not yet taken by the destination: ours, plus the kernel's send queue
        (Linux SIOCOUTQ), so that progress is seen while the kernel drains."""
        size = self.transport.get_write_buffer_size() if self.transport is not None else 0
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None and _SIOCOUTQ is not None:
            try:
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
            except (OSError, ValueError):
                pass
        return size

    def _schedule_flush_check(self, unflushed: int) -> None:
        self._flush_check = asyncio.get_running_loop().call_later(self.flush_timeout, self._check_flush,
                                                                  unflushed)

    def _check_flush(self, before: int) -> None:
        self._flush_check = None
        if self._lost or self.transport is None:
            return
        if not self.transport.get_write_buffer_size():
            return  # asyncio closes the socket now; the kernel delivers the rest
        unflushed = self._unflushed()
        if unflushed >= before:
            log.info("destination stopped reading a closed exit stream; aborting", unflushed=unflushed)
            self.transport.abort()
        else:
            self._schedule_flush_check(unflushed)

    def abort(self) -> None:
        """Drop the socket now, unflushed: its circuit is gone (tor gives up flushing too)."""
        self.gone = True
        if self._flush_check is not None:
            self._flush_check.cancel()
            self._flush_check = None
        if self.transport is not None:
            self.transport.abort()


def _end_reason_for(exc: BaseException) -> int:
    if isinstance(exc, ConnectionRefusedError):
        return EndReason.CONNECTREFUSED
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return EndReason.TIMEOUT
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return EndReason.NOROUTE
    if isinstance(exc, ConnectionResetError):
        return EndReason.CONNRESET
    return EndReason.MISC


class ExitHandler:
    """Serves the stream requests that circuits ending here pass on (see the module docstring)."""

    def __init__(self, policy: ExitPolicy, *, flush_timeout: float = FLUSH_TIMEOUT, reject_private: bool = True,
                 known_relay: Callable[[bytes], bool | None] = lambda rsa_id: None):
        self.policy = policy
        self.flush_timeout = flush_timeout
        #: refuse RESOLVE answers and reverse lookups in private space (ExitPolicyRejectPrivate)
        self.reject_private = reject_private
        #: is this RSA identity a relay of the current consensus? None: no consensus known
        self.known_relay = known_relay
        # Port of this relay's directory server on 127.0.0.1 (BEGIN_DIR target), if it has one.
        self.dir_port: int | None = None
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def begin(self, circ: OrCircuit, sid: int, begin: Begin | None) -> None:
        """BEGIN (``begin``) or BEGIN_DIR (None): connect, or refuse with END."""
        if begin is None:
            if self.dir_port is None:
                circ.exit_refused(sid, End(EndReason.NOTDIRECTORY).encode())
                return
        elif (refusal := self._refusal(circ, "BEGIN")) is not None:
            circ.exit_refused(sid, End(refusal).encode())
            return
        conn = ExitConnection(circ, sid, self.flush_timeout)
        circ.conns[sid] = conn
        self._spawn(self._connect(circ, sid, conn, begin))

    def resolve(self, circ: OrCircuit, sid: int, hostname: str) -> None:
        refusal = self._refusal(circ, "RESOLVE")
        if refusal is not None:
            circ.exit_refused(sid, End(refusal).encode())
            return
        self._spawn(self._resolve(circ, sid, hostname))

    def _refusal(self, circ: OrCircuit, what: str) -> int | None:
        """Why this relay will not serve a BEGIN/RESOLVE on ``circ`` (None: it will).

        Not an exit: EXITPOLICY. tor's RefuseUnknownExits: a client connected straight to
        us (no authenticated identity) would use us as a one-hop proxy: TORPROTOCOL, as tor
        answers; a relay identity the consensus does not list (when we hold one): MISC."""
        if not self.policy.is_exit:
            return EndReason.EXITPOLICY
        peer = circ.prev_chan.peer
        refusal = None
        if peer is None or not peer.rsa_id:
            refusal = EndReason.TORPROTOCOL
        elif self.known_relay(peer.rsa_id) is False:
            refusal = EndReason.MISC
        if refusal is not None:
            circ.log.info("stream refused: the previous hop is not a relay (RefuseUnknownExits)", relay_cmd=what)
        return refusal

    async def _addresses(self, host: str, port: int, flags: int) -> list[ipaddress._BaseAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), RESOLVE_TIMEOUT)
        addrs = []
        for fam, *_rest, sa in infos:
            ip = ipaddress.ip_address(sa[0].split("%")[0])
            if ip not in addrs:
                addrs.append(ip)
        v4 = [a for a in addrs if a.version == 4]
        v6 = [a for a in addrs if a.version == 6]
        if flags & Begin.IPV4_NOT_OK:
            v4 = []
        if not flags & (Begin.IPV6_OK | Begin.IPV6_PREFERRED):
            v6 = []
        return v6 + v4 if flags & Begin.IPV6_PREFERRED else v4 + v6

    async def _connect(self, circ: OrCircuit, sid: int, conn: ExitConnection, begin: Begin | None) -> None:
        if begin is None:
            host, port, ips = "127.0.0.1", self.dir_port, None
        else:
            host, port = begin.host, begin.port
        slog = circ.log.bind(stream_id=sid, target=f"{host}:{port}")  # scrubbed by safe logging
        end = None
        try:
            if begin is None:
                await asyncio.wait_for(asyncio.get_running_loop().create_connection(lambda: conn, host, port),
                                       CONNECT_TIMEOUT)
                connected = b""
            else:
                try:
                    ips = await self._addresses(host, port, begin.flags)
                except (OSError, asyncio.TimeoutError, UnicodeError):
                    ips = []
                if not ips:
                    end = End(EndReason.RESOLVEFAILED)
                else:
                    allowed = [a for a in ips if self.policy.allows(a, port)]
                    if not allowed:
                        end = End(EndReason.EXITPOLICY, ips[0], DNS_TTL)
                    else:
                        ip = allowed[0]
                        await asyncio.wait_for(
                            asyncio.get_running_loop().create_connection(lambda: conn, str(ip), port), CONNECT_TIMEOUT)
                        connected = Connected(ip, DNS_TTL).encode()
        except asyncio.CancelledError:
            conn.abort()
            raise
        except (OSError, asyncio.TimeoutError, TypeError) as exc:
            end = End(EndReason.NOTDIRECTORY) if begin is None else End(_end_reason_for(exc))
        if end is None:
            if conn.gone or circ.closed:
                conn.close()
                return
            slog.debug("exit stream connected")
            circ.exit_connected(sid, connected)
            return
        slog.info("exit stream refused", reason=EndReason(end.reason).name)
        if not conn.gone:
            circ.exit_refused(sid, end.encode())

    async def _resolve(self, circ: OrCircuit, sid: int, hostname: str) -> None:
        loop = asyncio.get_running_loop()
        answers: list[ResolvedAnswer] = []
        try:
            if hostname.endswith(".in-addr.arpa") or hostname.endswith(".ip6.arpa"):
                ip = _arpa_to_ip(hostname)
                if self.reject_private and is_private_address(ip):
                    raise ValueError("reverse lookup of a private address")  # tor refuses these
                name, _ = await asyncio.wait_for(loop.getnameinfo((str(ip), 0), socket.NI_NAMEREQD),
                                                 RESOLVE_TIMEOUT)
                answers.append(ResolvedAnswer(0, name.encode("ascii", "replace")[:255], DNS_TTL))
            else:
                addrs = await self._addresses(hostname, 0, Begin.IPV6_OK)
                if self.reject_private:  # nobody learns our private networks through us
                    addrs = [a for a in addrs if not is_private_address(a)]
                addrs.sort(key=lambda a: a.version)
                answers.extend(ResolvedAnswer(a.version, a.packed, DNS_TTL) for a in addrs[:8])
        except (OSError, asyncio.TimeoutError, ValueError, UnicodeError):
            pass
        if not answers:
            answers.append(ResolvedAnswer(0xF1, b"", 0))
        circ.exit_resolved(sid, Resolved(tuple(answers)).encode())

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _arpa_to_ip(name: str) -> ipaddress._BaseAddress:
    labels = name.lower().rstrip(".").split(".")
    if labels[-2:] == ["in-addr", "arpa"]:
        return ipaddress.IPv4Address(".".join(reversed(labels[:-2])))
    if labels[-2:] == ["ip6", "arpa"]:
        nibbles = "".join(reversed(labels[:-2]))
        return ipaddress.IPv6Address(int(nibbles, 16))
    raise ValueError("not a reverse-lookup name")
