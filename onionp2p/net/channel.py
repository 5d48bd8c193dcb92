"""Channels: the asyncio shell around one TLS link (tor-spec §2, §4; specs/link.md).

Theory of operation
-------------------
A :class:`Channel` is an :class:`asyncio.Protocol` on a TLS transport. It owns

* a :class:`~onionp2p.proto.cells.CellReader` (framing) and, until the link is open, a
  sans-IO :class:`~onionp2p.proto.link.LinkHandshake` that it feeds cells to;
* a table ``circuits`` mapping this link's circuit IDs to circuit shells. Runs of
  RELAY/RELAY_EARLY cells for a known circuit go to ``circuit.relay_run(chan, data, start,
  count)`` — the only way relay cells travel; other cells of a known circuit to
  ``circuit.handle_cell(chan, cell)``; cells for unknown circuits (CREATE2, strays) to the
  owner's ``unknown_cell``;
* the outgoing side. Cells written in one event-loop turn are coalesced into one
  ``transport.write`` (one TLS record batch instead of one per cell). When the
  transport asks us to pause (its buffer passed the high-water mark) further cells
  wait in per-circuit queues that are flushed round-robin on resume; a circuit whose
  queue passes ``max_queue_cells`` is reported to the owner, who destroys it
  (RESOURCELIMIT) — so a peer that stops reading cannot make us buffer without bound.
  A circuit whose queue has been written out is told (``queue_drained``), so that it can
  let its streams package again.
  Nor can it hold the socket: :meth:`Channel.close` aborts the transport if flushing and
  the TLS close have not finished after ``close_timeout`` (:data:`CLOSE_TIMEOUT`) seconds.
* channel padding (padding-spec §2, specs/padding.md): the owner hands an open channel a
  sans-IO :class:`~onionp2p.proto.padding.ChannelPadding` (:meth:`Channel.start_padding`).
  Reads and flushes only record the time of the last traffic; one timer per channel asks
  the state machine, at its deadline, whether to send a PADDING cell and when to look
  again. PADDING_NEGOTIATE (circuit 0) is handled here: honoured where the owner allows it
  (relays), ignored with a log line otherwise or when malformed. ``padding_in`` /
  ``padding_out`` count PADDING cells.

The owner (a relay or a client) implements :class:`ChannelOwner`.

Fast path (specs/performance.md)
--------------------------------
Once the link is open, :meth:`Channel.data_received` frames every complete cell of the
whole socket read in one pass (:meth:`~onionp2p.proto.cells.CellReader.frames`: no
:class:`Cell` per RELAY cell). Consecutive RELAY/RELAY_EARLY cells of one circuit form a
*run* that is handed over at once to ``circuit.relay_run(chan, data, start, count)``
(cells at ``data[start + i*514 :]``), so the circuit keeps its cipher and channel
lookups out of the per-cell loop. On the way out,
:meth:`Channel.send_payloads` queues many fixed cells of one circuit with one header
pack and one ``join``. The bytes on the wire are exactly those of the per-cell path.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from onionp2p.defaults import HANDSHAKE_TIMEOUT, MAX_QUEUE_CELLS, TCP_USER_TIMEOUT
from onionp2p.errors import OnionError, ProtocolError
from onionp2p.log import get_logger
from onionp2p.net import tls
from onionp2p.proto.cells import (
    CELL_LEN,
    Cell,
    CellCommand,
    CellReader,
    NetInfo,
    PaddingNegotiate,
    encode_fixed,
    encode_var,
    is_var_command,
)
from onionp2p.proto.link import LinkHandshake, PeerIdentity
from onionp2p.proto.padding import MIN_LINK_VERSION, ChannelPadding, PaddingParams, Usage

__all__ = ["Channel", "ChannelOwner", "CLOSE_TIMEOUT"]

log = get_logger("onionp2p.channel")

#: Seconds a closing channel may take to flush (and finish TLS) before its transport is aborted.
CLOSE_TIMEOUT = 5.0
#: Seconds after which an idle link is probed (TCP keepalive) and after which data or
#: probes left unacknowledged make the kernel drop it (TCP_USER_TIMEOUT, Linux): a peer
#: cut off the network (a half-open link) is noticed within about twice this, not after
#: TCP's default ~15 minutes of retransmissions or never. None or 0: kernel defaults.
_COALESCE_LIMIT = 256 * 1024
_ids = itertools.count(1)
_HDR4 = struct.Struct(">IB")
_RELAY = int(CellCommand.RELAY)
_IGNORED = frozenset({int(CellCommand.PADDING), int(CellCommand.VPADDING), int(CellCommand.NETINFO)})
_PADDING = int(CellCommand.PADDING)
_PADDING_NEGOTIATE = int(CellCommand.PADDING_NEGOTIATE)
#: the padding timer fires this long after a deadline, so that the deadline has surely passed
_TIMER_SLACK = 0.001


class ChannelOwner(Protocol):
    def unknown_cell(self, chan: Channel, cell: Cell) -> None: ...
    def channel_open(self, chan: Channel) -> None: ...
    def channel_closed(self, chan: Channel) -> None: ...
    def queue_overflow(self, chan: Channel, circ_id: int) -> None: ...
    def account_read(self, chan: Channel, nbytes: int) -> None: ...
    def channel_connected(self, chan: Channel) -> bool: ...  # TCP+TLS up; False refuses the link


class Channel(asyncio.Protocol):
    """One link to a peer. See the module docstring."""

    def __init__(
        self,
        owner: ChannelOwner,
        *,
        initiator: bool,
        keys: Any = None,
        expected: PeerIdentity | None = None,
        peer_address: str | None = None,
        my_addresses: tuple[str, ...] = (),
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_queue_cells: int = MAX_QUEUE_CELLS,
        close_timeout: float = CLOSE_TIMEOUT,
        tcp_user_timeout: float | None = TCP_USER_TIMEOUT,
    ):
        self.id = next(_ids)
        self.owner = owner
        self.initiator = initiator
        self.keys = keys
        self.expected = expected
        self.peer_address = peer_address
        self.my_addresses = my_addresses
        self.handshake_timeout = handshake_timeout
        self.max_queue_cells = max_queue_cells
        self.close_timeout = close_timeout
        self.tcp_user_timeout = tcp_user_timeout
        #: no new circuits on this channel (its peer stopped answering); set by the owner
        self.bad_for_new_circs = False
        self.circuits: dict[int, Any] = {}
        self.peer: PeerIdentity | None = None
        #: the peer's NETINFO (its view of our address: the relay's reachability self-test)
        self.peer_netinfo: NetInfo | None = None
        self.link_version = 0
        self.opened_at: float | None = None
        self.closed = False
        self.cells_in = 0
        self.cells_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        #: channel padding (None until the owner starts it) and its PADDING cell counters
        self.padding: ChannelPadding | None = None
        self.padding_in = 0
        self.padding_out = 0
        self.padding_negotiations_in = 0
        self._accept_negotiate = False
        self._negotiate_logs = 0  # PADDING_NEGOTIATE lines logged on this channel (a few, not one per cell)
        self._padding_params: Callable[[], PaddingParams] | None = None
        self._pad_handle: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = CellReader(circ_id_len=2)
        self._hs: LinkHandshake | None = None
        self._out: list[bytes] = []
        self._out_len = 0
        self._flush_handle: asyncio.Handle | None = None
        self._in_batch = False  # handling the cells of one socket read (see _cells)
        self._flush_due = False  # flush() was asked for during that batch
        self._paused = False
        self._queues: dict[int, deque[bytes]] = {}
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self._lost = False  # connection_lost was called: the socket is gone
        self._log = log.bind(chan_id=self.id)

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if self.peer_address is None and peer:
            self.peer_address = peer[0]
        if not self.owner.channel_connected(self):
            self._log.debug("connection refused by a limit")  # the owner counts and summarises these
            self.closed = True
            transport.abort()
            return
        self._set_tcp_liveness(transport)
        self._timeout_handle = self._loop.call_later(self.handshake_timeout, self._handshake_timed_out)
        try:
            sslobj = transport.get_extra_info("ssl_object")
            self._hs = LinkHandshake(
                initiator=self.initiator, keys=self.keys, expected=self.expected,
                peer_address=self.peer_address, my_addresses=self.my_addresses, now=time.time(),
            )
            own_der = self.keys.tls_cert_der if (self.keys is not None and not self.initiator) else None
            self._hs.tls_established(
                own_der, tls.peer_cert_der(sslobj),
                lambda label, ctx: tls.export_keying_material(sslobj, label, ctx, 32),
            )
            self._hs.start()
            self._write_raw(self._hs.data_to_send())
        except OnionError as exc:
            self._fail(exc)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.owner.account_read(self, len(data))
        try:
            hs = self._hs
            if hs is not None:
                if hs.done:
                    return  # the handshake failed earlier; the channel is closing
                reader = self._reader
                reader.receive_data(data)
                while not hs.done:
                    reader.circ_id_len = hs.circ_id_len
                    cell = reader.next_cell()
                    if cell is None:
                        break
                    hs.receive_cell(cell)
                    self._write_raw(hs.data_to_send())
                if not hs.done:
                    return
                self._handshake_done()
                data = b""
            if self.padding is not None:
                self.padding.activity(self._loop.time())
            self._cells(data)
        except ProtocolError as exc:
            self._fail(exc)

    def _cells(self, data: bytes) -> None:
        """Handle every complete cell of what is buffered plus ``data`` (link open).

        A :meth:`flush` asked for while these cells are handled (the SENDMEs that busy
        circuits send back) happens once, after the last of them: one TLS record and one
        write for the whole socket read instead of one per SENDME."""
        self._in_batch = True
        try:
            self._cells_batch(data)
        finally:
            self._in_batch = False
            if self._flush_due:
                self._flush_due = False
                self.flush()

    def _cells_batch(self, data: bytes) -> None:
        circuits = self.circuits
        for buf, circ_id, cmd, start, end in self._reader.frames(data):
            if self.closed:
                return
            circ = circuits.get(circ_id)
            if cmd == _RELAY:
                count = (end - start) // CELL_LEN
                self.cells_in += count
                if circ is not None:
                    circ.relay_run(self, buf, start, count)
                else:  # cells for a circuit we do not know: dropped, one at a time
                    for p in range(start, end, CELL_LEN):
                        self.owner.unknown_cell(self, Cell(circ_id, buf[p + 4], buf[p + 5:p + CELL_LEN]))
                continue
            self.cells_in += 1
            if circ is not None:
                circ.handle_cell(self, Cell(circ_id, cmd, buf[start:end]))
                continue
            if cmd in _IGNORED:
                if cmd == _PADDING:
                    self.padding_in += 1
                continue
            if cmd == _PADDING_NEGOTIATE and circ_id == 0:
                self._padding_negotiate(bytes(buf[start:end]))
                continue
            if cmd == CellCommand.VERSIONS:
                raise ProtocolError("VERSIONS cell after the handshake")
            self.owner.unknown_cell(self, Cell(circ_id, cmd, buf[start:end]))

    def _set_tcp_liveness(self, transport: asyncio.BaseTransport) -> None:
        """A peer that vanishes without a FIN (cut off, powered off) must not leave a
        half-open link behind: TCP keepalive probes an idle link after ``tcp_user_timeout``
        seconds, and TCP_USER_TIMEOUT drops it once sent data or probes have gone
        unacknowledged that long (Linux; elsewhere only the kernel's defaults apply)."""
        sock = transport.get_extra_info("socket")
        timeout = self.tcp_user_timeout
        if not timeout or sock is None:
            return
        opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        for name, value in (("TCP_KEEPIDLE", timeout), ("TCP_KEEPINTVL", max(timeout / 4, 1)),
                            ("TCP_USER_TIMEOUT", timeout * 1000)):
            if hasattr(socket, name):
                opts.append((socket.IPPROTO_TCP, getattr(socket, name), max(int(value), 1)))
        try:
            for level, name, value in opts:
                sock.setsockopt(level, name, value)
        except OSError as exc:  # not a TCP socket
            self._log.debug("TCP keepalive/user timeout not set", error=str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        self._teardown("connection lost" if exc is None else f"connection lost: {type(exc).__name__}")

    def eof_received(self) -> bool | None:
        return False  # close the transport

    def pause_reading(self) -> None:
        """Stop reading from the peer (bandwidth limit); cells already read are handled."""
        if self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self.closed and not self._transport.is_closing():
            self._transport.resume_reading()

    @property
    def paused(self) -> bool:
        """The transport asked us to stop writing: cells wait in per-circuit queues."""
        return self._paused

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._drain_queues()

    # -- handshake ------------------------------------------------------------------

    def _handshake_done(self) -> None:
        hs = self._hs
        assert hs is not None
        self.peer = hs.peer
        self.peer_netinfo = hs.peer_netinfo
        self.link_version = hs.link_version
        self._reader.circ_id_len = hs.circ_id_len
        self.opened_at = time.time()
        self._hs = None
        if self._timeout_handle:
            self._timeout_handle.cancel()
        self._log = self._log.bind(peer_fp=self.peer.fingerprint[:8] if self.peer else "client")
        self._log.debug("channel open", link_version=self.link_version)
        if not self.ready.done():
            self.ready.set_result(self)
        self.owner.channel_open(self)

    def _handshake_timed_out(self) -> None:
        if self._hs is not None and not self.closed:
            self._fail(ProtocolError("link handshake timed out"))

    # -- sending ----------------------------------------------------------------------

    def new_circ_id(self) -> int:
        """A random unused circuit ID; the initiator sets the high bit (tor-spec §5.1.1)."""
        hi = 0x80000000 if self.initiator else 0
        for _ in range(64):
            cid = (int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF) | hi
            if cid & 0x7FFFFFFF and cid not in self.circuits:
                return cid
        raise OnionError("no free circuit ID on this channel")

    def send_cell(self, circ_id: int, command: int, payload: bytes = b"") -> None:
        """Queue one cell (fixed or variable by command)."""
        if self.closed:
            return
        if is_var_command(command):
            raw = encode_var(circ_id, command, payload)
        else:
            raw = encode_fixed(circ_id, command, payload)
        self.cells_out += 1
        if self._paused or self._queues:
            q = self._queues.get(circ_id)
            if q is None:
                q = self._queues[circ_id] = deque()
            q.append(raw)
            if len(q) > self.max_queue_cells:
                del self._queues[circ_id]
                self.owner.queue_overflow(self, circ_id)
            return
        self._write_raw(raw)

    def send_payloads(self, circ_id: int, command: int, payloads: list) -> None:
        """Queue fixed cells (``command`` < 128, never VERSIONS) of one circuit, one per
        509-byte payload, in order: the same bytes as ``send_cell`` per payload."""
        if self.closed or not payloads:
            return
        hdr = _HDR4.pack(circ_id, command)
        k = len(payloads)
        self.cells_out += k
        if self._paused or self._queues:
            q = self._queues.get(circ_id)
            if q is None:
                q = self._queues[circ_id] = deque()
            for p in payloads:
                q.append(hdr + p)
            if len(q) > self.max_queue_cells:
                del self._queues[circ_id]
                self.owner.queue_overflow(self, circ_id)
            return
        if self._transport is None:
            return
        out = self._out
        out.append(hdr)
        out.append(hdr.join(payloads))
        self._out_len += k * CELL_LEN
        if self._out_len >= _COALESCE_LIMIT:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what this loop turn has queued now instead of at the end of the turn
        (used for cells that others wait on, like SENDMEs); while a socket read's cells are
        being handled, once they all are."""
        if self._in_batch:
            self._flush_due = True
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()

    def queued_cells(self, circ_id: int | None = None) -> int:
        """Cells waiting in this channel's per-circuit queues (all circuits when None)."""
        if circ_id is not None:
            q = self._queues.get(circ_id)
            return len(q) if q else 0
        return sum(len(q) for q in self._queues.values())

    def drop_queue(self, circ_id: int) -> None:
        self._queues.pop(circ_id, None)

    def _write_raw(self, raw: bytes) -> None:
        if not raw or self._transport is None:
            return
        self._out.append(raw)
        self._out_len += len(raw)
        if self._out_len >= _COALESCE_LIMIT:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._out or self._transport is None or self.closed:
            self._out.clear()
            self._out_len = 0
            return
        data = b"".join(self._out)
        self._out.clear()
        self._out_len = 0
        self.bytes_out += len(data)
        if self.padding is not None:
            self.padding.activity(self._loop.time())
        self._transport.write(data)

    def _drain_queues(self) -> None:
        queues = self._queues
        drained = []
        while queues and not self._paused and not self.closed:
            for cid in list(queues):
                q = queues[cid]
                for _ in range(min(len(q), 16)):
                    self._out.append(q.popleft())
                    self._out_len += CELL_LEN
                if not q:
                    del queues[cid]
                    drained.append(cid)
            self._flush()
        for cid in drained:  # their circuits may package again
            circ = self.circuits.get(cid)
            if circ is not None and not self.closed:
                circ.queue_drained(self)

    # -- channel padding (padding-spec §2) -----------------------------------------------

    def start_padding(self, state: ChannelPadding, *, negotiate: PaddingNegotiate | None = None,
                      accept_negotiate: bool = False,
                      params: Callable[[], PaddingParams] | None = None) -> None:
        """Pad this (open) channel as ``state`` decides; send ``negotiate`` first (a client's
        START/STOP). ``accept_negotiate``: honour the peer's PADDING_NEGOTIATE (relays do,
        clients do not). ``params``: the current consensus parameters, read at every timer."""
        if self.closed:
            return
        self.padding = state
        self._accept_negotiate = accept_negotiate
        self._padding_params = params
        state.activity(self._loop.time())
        if negotiate is not None:
            self.send_cell(0, CellCommand.PADDING_NEGOTIATE, negotiate.encode())
        self._padding_tick()

    def note_usage(self, usage: Usage) -> None:
        """This channel now carries multi-hop circuits (or their user traffic): padding may start."""
        st = self.padding
        if st is not None and usage > st.usage:
            st.use(usage)
            if self._pad_handle is None:
                self._padding_tick()

    def _padding_tick(self) -> None:
        """The padding timer (also called to arm it): pad if idle long enough, re-arm."""
        self._pad_handle = None
        st = self.padding
        if st is None or self.closed:
            return
        if self._padding_params is not None:
            st.params = self._padding_params()
        d = st.poll(self._loop.time(), busy=self._paused or bool(self._queues))
        if d.send:
            self.padding_out += 1
            self.send_cell(0, CellCommand.PADDING)
        if d.next_at is not None:
            self._pad_handle = self._loop.call_at(d.next_at + _TIMER_SLACK, self._padding_tick)

    def _padding_negotiate(self, payload: bytes) -> None:
        """The peer's PADDING_NEGOTIATE: never fatal; ignored (logged) unless we honour it.
        Only the first few per channel are logged at info (a peer could send thousands)."""
        st = self.padding
        self._negotiate_logs += 1
        note = self._log.info if self._negotiate_logs <= 3 else self._log.debug
        if not self._accept_negotiate or st is None:
            note("PADDING_NEGOTIATE ignored: only a relay honours it, from its clients")
            return
        if self.link_version < MIN_LINK_VERSION:
            note("PADDING_NEGOTIATE ignored on an old link", link_version=self.link_version)
            return
        try:
            msg = PaddingNegotiate.parse(payload)
        except ProtocolError as exc:
            note("malformed PADDING_NEGOTIATE ignored", error=str(exc))
            return
        self.padding_negotiations_in += 1
        st.negotiate(msg)
        note("padding negotiated", padding=st.enabled, low_ms=st.low_ms, high_ms=st.high_ms)
        if self._pad_handle is not None:
            self._pad_handle.cancel()
        self._padding_tick()

    # -- closing -----------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        """Flush what we have and close the link; circuits are torn down via the owner.

        The transport gets ``close_timeout`` seconds to flush and finish TLS; a peer that
        does not read (or never answers our close_notify) must not keep the socket open,
        so after that the transport is aborted.
        """
        if self.closed:
            return
        self._flush()
        self._teardown(reason)
        if self._transport is not None:
            self._transport.close()
            if not self._lost and self._abort_handle is None:
                self._abort_handle = self._loop.call_later(self.close_timeout, self._abort_unflushed)

    def _abort_unflushed(self) -> None:
        self._abort_handle = None
        if not self._lost and self._transport is not None:
            self._log.info("peer did not take the close in time; aborting the connection",
                           timeout=self.close_timeout)
            self._transport.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._teardown("aborted")

    def _fail(self, exc: Exception) -> None:
        self._log.info("closing channel", error=str(exc), kind=type(exc).__name__)
        if not self.ready.done():
            self.ready.set_exception(exc if isinstance(exc, OnionError) else OnionError(str(exc)))
            self.ready.exception()  # retrieved: nobody may be awaiting it
        self.close(str(exc))

    def _teardown(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timeout_handle:
            self._timeout_handle.cancel()
        if self._flush_handle:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._pad_handle is not None:
            self._pad_handle.cancel()
            self._pad_handle = None
        self._queues.clear()
        if not self.ready.done():
            self.ready.set_exception(OnionError(f"channel closed during handshake: {reason}"))
            # nobody may be awaiting; mark the exception retrieved
            self.ready.exception()
        circuits = list(self.circuits.values())
        self.circuits.clear()
        for circ in circuits:
            try:
                circ.channel_closed(self)
            except Exception:  # pragma: no cover - a bug in one circuit must not leak others
                self._log.exception("error tearing down circuit")
        self.owner.channel_closed(self)
