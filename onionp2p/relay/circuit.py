"""Circuits at a relay: CREATE2, EXTEND2, forwarding, TRUNCATE, DESTROY (tor-spec §5, §6).

Theory of operation
-------------------
An :class:`OrCircuit` joins a *previous* hop (the channel toward the client and the
circuit ID on it) to either a *next* hop (another channel and ID) or to nothing —
then this relay is the circuit's last hop and may run exit streams on it.

* Cells from the previous hop: RELAY/RELAY_EARLY are decrypted one layer with
  :class:`~onionp2p.proto.relaycrypto.RelayCrypto`. A cell recognized here is handled here
  (EXTEND2, TRUNCATE, SENDME, stream commands — the latter through the relay's exit
  handler); any other cell goes on to the next hop unchanged in command, or, if there is
  no next hop, kills the circuit (PROTOCOL). More than 8 RELAY_EARLY cells is a
  violation; EXTEND2 must come in RELAY_EARLY.
* Cells from the next hop: RELAY gets our backward layer and goes to the previous hop;
  CREATED2 answers a pending EXTEND2 and becomes EXTENDED2; RELAY_EARLY inward is a
  violation.
* DESTROY from either side tears the whole circuit down and sends DESTROY (reason
  DESTROYED) to the other side; a lost channel does the same with CHANNEL_CLOSED, so no
  circuit or stream outlives its channel. TRUNCATE destroys the part beyond this hop and
  answers TRUNCATED.
* Circuit-level flow control at this edge uses :mod:`onionp2p.proto.flowctl`, with
  authenticated SENDME v1 in both directions.

The circuit never touches sockets: channels are objects with ``send_cell``; the relay
that owns the circuit supplies ``open_channel`` (async) and the exit handler.

Fast path: a channel hands over runs of consecutive RELAY/RELAY_EARLY cells with
:meth:`OrCircuit.relay_run`. Forward, each cell is decrypted with the keystream's
``update`` straight from the channel's receive buffer; cells that are not ours (the
Recognized field is non-zero, or the digest check fails) are collected and leave with
one :meth:`~onionp2p.net.channel.Channel.send_payloads`; before a recognized cell is handled
the cells collected so far are sent, so every cell leaves in the order it came.
Backward, the run gets our layer and goes to the previous hop the same way. An exit
stream packages many DATA cells per call through :meth:`OrCircuit.send_data_many`.
The resulting bytes are exactly those of the per-cell path (tests/test_datapath.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import TYPE_CHECKING, Any

from onionp2p.errors import OnionError, ProtocolError
from onionp2p.log import get_logger
from onionp2p.proto.cells import Cell, CellCommand, Create2, Created2, Destroy, DestroyReason
from onionp2p.proto.flowctl import DeliverWindow, PackageWindow
from onionp2p.proto.relaycell import (
    RELAY_DATA_MAX,
    Extend2,
    Extended2,
    LinkSpecType,
    RelayCommand,
    Sendme,
    Truncated,
    pack_relay,
    unpack_relay,
)
from onionp2p.proto.relaycrypto import RelayCrypto
from onionp2p.proto.stream import handle_sendme

if TYPE_CHECKING:  # pragma: no cover
    from onionp2p.net.channel import Channel

__all__ = ["OrCircuit", "MAX_RELAY_EARLY"]

MAX_RELAY_EARLY = 8
EXTEND_TIMEOUT = 30.0
_CELL = 514
_RELAY_HDR = struct.Struct(">BHH4sH")  # relaycell's header: cmd, recognized, stream, digest, length
_DATA = int(RelayCommand.DATA)
_RELAY = int(CellCommand.RELAY)
_RELAY_EARLY = int(CellCommand.RELAY_EARLY)
log = get_logger("onionp2p.circuit")


class OrCircuit:
    """One circuit as seen by a relay. See the module docstring."""

    def __init__(self, relay: Any, prev_chan: Channel, prev_id: int, crypto: RelayCrypto):
        self.relay = relay
        self.prev_chan = prev_chan
        self.prev_id = prev_id
        self.crypto = crypto
        self.next_chan: Channel | None = None
        self.next_id = 0
        self.streams: dict[int, Any] = {}
        self.package = PackageWindow.circuit()
        self.deliver = DeliverWindow.circuit()
        self.early_in = 0
        self.extending: asyncio.Task | None = None
        self.closed = False
        self.cells_forward = 0
        self.cells_backward = 0
        self.log = log.bind(chan_id=prev_chan.id, circ_id=prev_id)
        prev_chan.circuits[prev_id] = self

    # -- dispatch from channels ---------------------------------------------------

    def handle_cell(self, chan: Channel, cell: Cell) -> None:
        if self.closed:
            return
        cmd = cell.command
        if chan is self.prev_chan:
            if cmd == CellCommand.RELAY or cmd == CellCommand.RELAY_EARLY:
                self._from_prev(cmd, cell.payload)
            elif cmd == CellCommand.DESTROY:
                self.destroy(DestroyReason.DESTROYED, notify_prev=False)
            # CREATE2 on a used ID and anything else: dropped, as tor does
        else:
            if cmd == CellCommand.RELAY:
                self.cells_backward += 1
                self.prev_chan.send_cell(self.prev_id, CellCommand.RELAY, self.crypto.encrypt_backward(cell.payload))
            elif cmd == CellCommand.CREATED2:
                self._created2(cell.payload)
            elif cmd == CellCommand.DESTROY:
                self._forget_next()
                self.destroy(DestroyReason.DESTROYED, notify_next=False)
            elif cmd == CellCommand.RELAY_EARLY:
                self.destroy(DestroyReason.PROTOCOL)

    def relay_run(self, chan: Channel, data: bytes, start: int, count: int) -> None:
        """``count`` consecutive RELAY/RELAY_EARLY cells of this circuit from ``chan``, at
        ``data[start + i*514:]`` (the channel's receive buffer)."""
        if self.closed:
            return
        if chan is self.prev_chan:
            self._forward_run(memoryview(data), start, count)
        else:
            self._backward_run(memoryview(data), start, count)

    def _forward_run(self, mv: memoryview, pos: int, count: int) -> None:
        crypto = self.crypto
        upd = crypto.fwd_update
        out: list = []
        out_cmd = _RELAY
        end = pos + count * _CELL
        while pos < end:
            cmd = mv[pos + 4]
            if cmd == _RELAY_EARLY:
                self.early_in += 1
                if self.early_in > MAX_RELAY_EARLY:
                    self._send_next(out_cmd, out)
                    self.log.info("too many RELAY_EARLY cells")
                    self.destroy(DestroyReason.PROTOCOL)
                    return
            self.cells_forward += 1
            plain = upd(mv[pos + 5:pos + _CELL])
            pos += _CELL
            if not plain[1] and not plain[2]:
                digest = crypto.recognize_forward(plain)
                if digest is not None:
                    if out:
                        self._send_next(out_cmd, out)
                        out = []
                    try:
                        self._handle_relay(plain, digest, cmd == _RELAY_EARLY)
                    except ProtocolError as exc:
                        self.log.info("protocol violation on circuit", error=str(exc))
                        self.destroy(DestroyReason.PROTOCOL)
                    if self.closed:
                        return
                    continue
            if self.next_chan is None:
                self._send_next(out_cmd, out)
                self.log.info("unrecognized relay cell at the last hop")
                self.destroy(DestroyReason.PROTOCOL)
                return
            if cmd != out_cmd:
                if out:
                    self._send_next(out_cmd, out)
                    out = []
                out_cmd = cmd
            out.append(plain)
        if out:
            self._send_next(out_cmd, out)

    def _send_next(self, cmd: int, payloads: list) -> None:
        if payloads and self.next_chan is not None:
            self.next_chan.send_payloads(self.next_id, cmd, payloads)

    def _backward_run(self, mv: memoryview, pos: int, count: int) -> None:
        upd = self.crypto.bwd_update
        out = []
        end = pos + count * _CELL
        while pos < end:
            if mv[pos + 4] == _RELAY_EARLY:
                break
            out.append(upd(mv[pos + 5:pos + _CELL]))
            pos += _CELL
        self.cells_backward += len(out)
        if out:
            self.prev_chan.send_payloads(self.prev_id, _RELAY, out)
        if pos < end:  # RELAY_EARLY toward the client
            self.destroy(DestroyReason.PROTOCOL)

    def channel_closed(self, chan: Channel) -> None:
        if chan is self.prev_chan:
            self.destroy(DestroyReason.CHANNEL_CLOSED, notify_prev=False)
        else:
            self.next_chan = None
            self.destroy(DestroyReason.CHANNEL_CLOSED, notify_next=False)

    # -- forward direction --------------------------------------------------------------

    def _from_prev(self, cmd: int, payload: bytes) -> None:
        early = cmd == CellCommand.RELAY_EARLY
        if early:
            self.early_in += 1
            if self.early_in > MAX_RELAY_EARLY:
                self.log.info("too many RELAY_EARLY cells")
                self.destroy(DestroyReason.PROTOCOL)
                return
        self.cells_forward += 1
        recognized, body, digest = self.crypto.decrypt_forward(payload)
        if recognized:
            try:
                self._handle_relay(body, digest, early)
            except ProtocolError as exc:
                self.log.info("protocol violation on circuit", error=str(exc))
                self.destroy(DestroyReason.PROTOCOL)
        elif self.next_chan is not None:
            self.next_chan.send_cell(self.next_id, cmd, body)
        else:
            self.log.info("unrecognized relay cell at the last hop")
            self.destroy(DestroyReason.PROTOCOL)

    def _handle_relay(self, body: bytes, digest: bytes | None, early: bool) -> None:
        cmd, sid, data = unpack_relay(body)
        if cmd == RelayCommand.DATA:
            if sid == 0:
                raise ProtocolError("DATA on stream 0")
            self.deliver.on_data_received()
            stream = self.streams.get(sid)
            if stream is not None:
                stream.on_data(data)
            while not self.closed and self.deliver.sendme_due():
                self.deliver.on_sendme_sent()
                self.send_back(RelayCommand.SENDME, 0, Sendme(1, digest or b"").encode())
        elif cmd == RelayCommand.SENDME:
            handle_sendme(self.package, self.streams, sid, data)
        elif cmd == RelayCommand.EXTEND2:
            if not early:
                raise ProtocolError("EXTEND2 not in a RELAY_EARLY cell")
            self._extend(Extend2.parse(data))
        elif cmd == RelayCommand.TRUNCATE:
            self._truncate()
        elif cmd == RelayCommand.DROP:
            pass
        elif cmd in (RelayCommand.BEGIN, RelayCommand.BEGIN_DIR, RelayCommand.RESOLVE,
                     RelayCommand.END):
            if sid == 0:
                raise ProtocolError("stream command with stream ID 0")
            if self.next_chan is not None or self.extending is not None:
                raise ProtocolError("stream command at a middle hop")
            self.relay.exit.handle(self, cmd, sid, data)
        # other commands are dropped (they still counted toward the digest)

    # -- backward direction (we originate) -------------------------------------------------

    def send_back(self, cmd: int, stream_id: int, data: bytes = b"") -> None:
        """Originate a relay cell toward the client from this hop."""
        if self.closed:
            return
        ct, digest = self.crypto.originate_backward(pack_relay(cmd, stream_id, data))
        if cmd == RelayCommand.DATA:
            self.package.on_data_sent(digest)
        self.cells_backward += 1
        self.prev_chan.send_cell(self.prev_id, CellCommand.RELAY, ct)

    def send_data_many(self, stream_id: int, chunks: list) -> None:
        """Originate one DATA cell per chunk (each at most 498 bytes) toward the client:
        the same cells as ``send_back(DATA, stream_id, chunk)`` per chunk."""
        if self.closed or not chunks:
            return
        full = _RELAY_HDR.pack(_DATA, 0, stream_id, b"\0\0\0\0", RELAY_DATA_MAX)
        bodies = []
        for c in chunks:
            if len(c) == RELAY_DATA_MAX:  # a full cell has no padding: header + data
                b = bytearray(full)
                b += c
            else:
                b = pack_relay(_DATA, stream_id, c)
            bodies.append(b)
        cts, digests = self.crypto.originate_backward_many(bodies, consume=True)
        on_sent = self.package.on_data_sent
        for d in digests:
            on_sent(d)
        self.cells_backward += len(cts)
        self.prev_chan.send_payloads(self.prev_id, _RELAY, cts)

    def package_budget(self) -> int:
        """How many DATA cells an exit stream may package now (see :meth:`can_package`)."""
        if self.closed:
            return 0
        queued = self.prev_chan.queued_cells(self.prev_id)
        return max(0, min(self.package.window, 64 - queued))

    def can_package(self) -> bool:
        """May an exit stream on this circuit send another DATA cell now?"""
        return (not self.closed and self.package.window > 0
                and self.prev_chan.queued_cells(self.prev_id) < 64)

    # -- EXTEND2 / TRUNCATE ---------------------------------------------------------------

    def _extend(self, ext: Extend2) -> None:
        if self.next_chan is not None or self.extending is not None:
            raise ProtocolError("EXTEND2 on a circuit that already has a next hop")
        addr = ext.find(LinkSpecType.IPV4) or ext.find(LinkSpecType.IPV6)
        rsa = ext.find(LinkSpecType.LEGACY_ID)
        ed = ext.find(LinkSpecType.ED25519_ID)
        if addr is None or rsa is None:
            raise ProtocolError("EXTEND2 needs an address and an RSA identity")
        if rsa.data == bytes(20) or (ed is not None and ed.data == bytes(32)):
            raise ProtocolError("EXTEND2 with an all-zero identity")
        host, port = addr.hostport()
        prev_peer = self.prev_chan.peer
        if rsa.data == self.relay.keys.rsa_id_digest or (prev_peer is not None and prev_peer.rsa_id == rsa.data):
            raise ProtocolError("EXTEND2 back to ourselves or to the previous hop")
        if not self.relay.extend_allowed(ipaddress.ip_address(host)):
            raise ProtocolError("EXTEND2 to a forbidden address")
        self.extending = asyncio.get_running_loop().create_task(
            self._do_extend(host, port, rsa.data, ed.data if ed else None, ext.htype, ext.hdata))

    async def _do_extend(self, host: str, port: int, rsa_id: bytes, ed_id: bytes | None,
                         htype: int, hdata: bytes) -> None:
        try:
            chan = await asyncio.wait_for(self.relay.open_channel(host, port, rsa_id, ed_id), EXTEND_TIMEOUT)
        except (OnionError, OSError, asyncio.TimeoutError) as exc:
            self.log.info("extend failed", error=str(exc) or type(exc).__name__)
            self.extending = None
            self.destroy(DestroyReason.CONNECTFAILED)
            return
        if self.closed:
            return
        if chan.closed:
            self.extending = None
            self.destroy(DestroyReason.CONNECTFAILED)
            return
        self.next_chan = chan
        self.next_id = chan.new_circ_id()
        chan.circuits[self.next_id] = self
        chan.send_cell(self.next_id, CellCommand.CREATE2, Create2(htype, hdata).encode())

    def _created2(self, payload: bytes) -> None:
        if self.extending is None:
            self.destroy(DestroyReason.PROTOCOL)
            return
        self.extending = None
        try:
            created = Created2.parse(payload)
        except ProtocolError:
            self.destroy(DestroyReason.PROTOCOL)
            return
        self.send_back(RelayCommand.EXTENDED2, 0, Extended2(created.hdata).encode())

    def _truncate(self) -> None:
        if self.extending is not None:
            self.extending.cancel()
            self.extending = None
        self._forget_next(DestroyReason.REQUESTED)
        self.relay.exit.close_all(self)
        self.send_back(RelayCommand.TRUNCATED, 0, Truncated(DestroyReason.REQUESTED).encode())

    def _forget_next(self, destroy_reason: int | None = None) -> None:
        """Detach the next hop; with ``destroy_reason``, tell it DESTROY — after dropping the
        cells still queued for it, so the DESTROY itself is not dropped with them."""
        if self.next_chan is not None:
            self.next_chan.circuits.pop(self.next_id, None)
            self.next_chan.drop_queue(self.next_id)
            if destroy_reason is not None:
                self.next_chan.send_cell(self.next_id, CellCommand.DESTROY, Destroy(destroy_reason).encode())
            self.next_chan = None
            self.next_id = 0

    # -- teardown ---------------------------------------------------------------------------

    def destroy(self, reason: int, *, notify_prev: bool = True, notify_next: bool = True) -> None:
        """Tear the circuit down: streams closed, both sides told (unless they told us)."""
        if self.closed:
            return
        self.closed = True
        if self.extending is not None:
            self.extending.cancel()
            self.extending = None
        self.relay.exit.close_all(self)
        # A reason we decided on goes back as is; one we were told is hidden as DESTROYED.
        outward = DestroyReason.DESTROYED if reason in (DestroyReason.DESTROYED,
                                                        DestroyReason.CHANNEL_CLOSED) else reason
        self._forget_next(DestroyReason.DESTROYED if notify_next else None)
        self.prev_chan.circuits.pop(self.prev_id, None)
        self.prev_chan.drop_queue(self.prev_id)
        if notify_prev:
            self.prev_chan.send_cell(self.prev_id, CellCommand.DESTROY, Destroy(outward).encode())
        self.relay.circuit_closed(self, reason)
        self.log.debug("circuit destroyed", reason=DestroyReason(reason).name if reason in
                       DestroyReason._value2member_map_ else reason)
