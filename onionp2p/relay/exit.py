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

Each open stream is an :class:`~onionp2p.proto.stream.EdgeStream` joined to an
:class:`ExitConnection` (an asyncio Protocol on the destination socket). The
destination is read only while both windows allow (``pause_reading``), and stream
SENDMEs are withheld while the destination's write buffer is above its high-water
mark, so a slow destination or a slow client never makes the exit buffer without
bound. A stream that ends (END from the client) closes its socket after flushing what
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
from onionp2p.proto.relaycell import (
    Begin,
    Connected,
    End,
    EndReason,
    RelayCommand,
    Resolve,
    Resolved,
    ResolvedAnswer,
)
from onionp2p.proto.stream import EdgeStream, StreamState

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
MAX_PENDING_OPTIMISTIC = 500 * 498  # optimistic DATA before CONNECTED is bounded by the window
#: A closed exit stream's socket may keep flushing what the client sent while the
#: destination takes bytes; after this many seconds without progress it is aborted (tor
#: gives up on a connection held open for flushing after 15 s without a write).
FLUSH_TIMEOUT = 15.0


class ExitConnection(asyncio.Protocol):
    """The destination side of one exit stream."""

    def __init__(self, flush_timeout: float = FLUSH_TIMEOUT) -> None:
        self.stream: EdgeStream  # set right after construction
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.pending: list[bytes] = []
        self.flush_timeout = flush_timeout
        self._lost = False
        self._flush_check: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for chunk in self.pending:
            self.transport.write(chunk)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.stream.state is not StreamState.CLOSED:
            self.stream.write(data)

    def eof_received(self) -> bool:
        self.stream.finish(EndReason.DONE)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._flush_check is not None:
            self._flush_check.cancel()
            self._flush_check = None
        if self.stream.state is not StreamState.CLOSED:
            self.stream.finish(EndReason.DONE if exc is None else EndReason.CONNRESET)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.stream.maybe_send_sendme()

    # hooks for EdgeStream
    def sink(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
        else:
            self.pending.append(data)

    def sink_ready(self) -> bool:
        return self.transport is not None and not self.write_paused

    def pause_source(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close after flushing what the client sent; a destination that takes none of it
        for ``flush_timeout`` seconds loses the rest (the socket must not stay open)."""
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
    """Stream commands recognized at the last hop of a circuit."""

    def __init__(self, policy: ExitPolicy, *, max_streams_per_circuit: int = 500,
                 flush_timeout: float = FLUSH_TIMEOUT, reject_private: bool = True,
                 known_relay: Callable[[bytes], bool | None] = lambda rsa_id: None):
        self.policy = policy
        self.flush_timeout = flush_timeout
        #: refuse RESOLVE answers and reverse lookups in private space (ExitPolicyRejectPrivate)
        self.reject_private = reject_private
        #: is this RSA identity a relay of the current consensus? None: no consensus known
        self.known_relay = known_relay
        # Port of this relay's directory server on 127.0.0.1 (BEGIN_DIR target), if it has one.
        self.dir_port: int | None = None
        self.max_streams_per_circuit = max_streams_per_circuit
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handle(self, circ: OrCircuit, cmd: int, sid: int, data: bytes) -> None:
        if cmd == RelayCommand.END:
            stream = circ.streams.get(sid)
            if stream is not None:
                stream.close()  # on_close forgets it and closes the socket
            return
        if sid in circ.streams:
            circ.send_back(RelayCommand.END, sid, End(EndReason.TORPROTOCOL).encode())
            return
        if cmd == RelayCommand.BEGIN_DIR:
            if self.dir_port is None:
                circ.send_back(RelayCommand.END, sid, End(EndReason.NOTDIRECTORY).encode())
            else:
                self._open(circ, sid, None)
            return
        if not self.policy.is_exit:
            circ.send_back(RelayCommand.END, sid, End(EndReason.EXITPOLICY).encode())
            return
        refusal = self._one_hop_refusal(circ)
        if refusal is not None:
            circ.log.info("stream refused: the previous hop is not a relay (RefuseUnknownExits)",
                          relay_cmd=RelayCommand(cmd).name)
            circ.send_back(RelayCommand.END, sid, End(refusal).encode())
            return
        if cmd == RelayCommand.RESOLVE:
            try:
                req = Resolve.parse(data)
            except Exception:
                circ.send_back(RelayCommand.END, sid, End(EndReason.TORPROTOCOL).encode())
                return
            self._spawn(self._resolve(circ, sid, req.hostname))
            return
        # BEGIN
        try:
            begin = Begin.parse(data)
        except Exception:
            circ.send_back(RelayCommand.END, sid, End(EndReason.TORPROTOCOL).encode())
            return
        self._open(circ, sid, begin)

    def _one_hop_refusal(self, circ: OrCircuit) -> int | None:
        """tor's RefuseUnknownExits: BEGIN and RESOLVE only on circuits whose previous hop
        is a relay. A client connected straight to us (no authenticated identity) would
        use us as a one-hop proxy: END(TORPROTOCOL), as tor answers. A relay identity the
        consensus does not list (when we have one): END(MISC). BEGIN_DIR is not affected."""
        peer = circ.prev_chan.peer
        if peer is None or not peer.rsa_id:
            return EndReason.TORPROTOCOL
        if self.known_relay(peer.rsa_id) is False:
            return EndReason.MISC
        return None

    def _open(self, circ: OrCircuit, sid: int, begin: Begin | None) -> None:
        """Create the stream and start connecting (``begin`` None: BEGIN_DIR)."""
        if len(circ.streams) >= self.max_streams_per_circuit:
            circ.send_back(RelayCommand.END, sid, End(EndReason.RESOURCELIMIT).encode())
            return
        conn = ExitConnection(self.flush_timeout)

        def on_close() -> None:
            if circ.streams.get(sid) is stream:
                del circ.streams[sid]
            conn.close()

        stream = EdgeStream(
            sid, emit=circ.send_back, circ_can_send=circ.can_package,
            sink=conn.sink, sink_ready=conn.sink_ready,
            pause_source=conn.pause_source, resume_source=conn.resume_source,
            on_close=on_close, conn=conn,
        )
        conn.stream = stream
        circ.streams[sid] = stream
        self._spawn(self._connect(circ, stream, conn, begin))

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

    async def _connect(self, circ: OrCircuit, stream: EdgeStream, conn: ExitConnection,
                       begin: Begin | None) -> None:
        if begin is None:
            await self._connect_dir(circ, stream, conn)
            return
        slog = circ.log.bind(stream_id=stream.stream_id, target=f"{begin.host}:{begin.port}")  # scrubbed by safe logging
        reason = None
        end_addr = None
        try:
            try:
                addrs = await self._addresses(begin.host, begin.port, begin.flags)
            except (OSError, asyncio.TimeoutError, UnicodeError):
                addrs = []
            if not addrs:
                reason = EndReason.RESOLVEFAILED
            else:
                allowed = [a for a in addrs if self.policy.allows(a, begin.port)]
                if not allowed:
                    reason, end_addr = EndReason.EXITPOLICY, addrs[0]
                else:
                    ip = allowed[0]
                    loop = asyncio.get_running_loop()
                    await asyncio.wait_for(loop.create_connection(lambda: conn, str(ip), begin.port),
                                           CONNECT_TIMEOUT)
                    if stream.state is StreamState.CLOSED or circ.closed:
                        conn.close()
                        return
                    circ.send_back(RelayCommand.CONNECTED, stream.stream_id, Connected(ip, DNS_TTL).encode())
                    slog.debug("exit stream connected")
                    stream.mark_open()
                    return
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            reason = _end_reason_for(exc)
        slog.info("exit stream refused", reason=EndReason(reason).name)
        if circ.streams.get(stream.stream_id) is stream:
            stream.close()
            circ.send_back(RelayCommand.END, stream.stream_id, End(reason, end_addr, DNS_TTL if end_addr else 0).encode())

    async def _connect_dir(self, circ: OrCircuit, stream: EdgeStream, conn: ExitConnection) -> None:
        """BEGIN_DIR: join the stream to this relay's own directory server (no exit policy)."""
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.create_connection(lambda: conn, "127.0.0.1", self.dir_port),
                                   CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError, TypeError):
            if circ.streams.get(stream.stream_id) is stream:
                stream.close()
                circ.send_back(RelayCommand.END, stream.stream_id, End(EndReason.NOTDIRECTORY).encode())
            return
        if stream.state is StreamState.CLOSED or circ.closed:
            conn.close()
            return
        circ.send_back(RelayCommand.CONNECTED, stream.stream_id, b"")
        stream.mark_open()

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
        circ.send_back(RelayCommand.RESOLVED, sid, Resolved(tuple(answers)).encode())

    def close_all(self, circ: OrCircuit) -> None:
        """Close every stream of a circuit that is going away."""
        for stream in list(circ.streams.values()):
            stream.close()
            stream.conn.abort()  # a destination that never reads must not pin the socket
        circ.streams.clear()

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
