"""A circuit at a relay: the asyncio shell around :class:`onionp2p.proto.circuit.RelayCircuit`.

Theory of operation
-------------------
:class:`OrCircuit` joins a *previous* hop (the channel toward the client and the circuit
ID on it) to a *next* hop (another channel and ID) or to nothing — then this relay is the
last hop and may run exit streams. All protocol decisions are the core's
(:mod:`onionp2p.proto.circuit`, specs/circuits.md); this class only carries out the
actions it returns:

* cells: ``ToPrev`` / ``ToNext`` go to the channels with one ``send_payloads`` each;
* ``Extend``: the relay's channel manager opens (or reuses) a channel to the named relay,
  the CREATE2 goes out on a new circuit ID there, and the core hears ``extend_attached``
  or ``extend_failed``; ``SetTimer`` bounds it (the core's clock is the loop's);
* exit streams: ``ExitBegin`` / ``ExitResolve`` go to the relay's
  :class:`~onionp2p.relay.exit.ExitHandler`, which connects or resolves and answers the
  core; ``StreamData``, ``StreamPause``/``StreamResume`` and ``StreamClosed`` go to the
  stream's :class:`~onionp2p.relay.exit.ExitConnection`;
* ``DetachNext`` / ``Destroyed``: forget the circuit on a channel, drop what is queued for
  it there, then send DESTROY — in that order, so the DESTROY is not dropped with the
  queue;
* onion services: ``HsRequest`` goes to the relay's :class:`~onionp2p.relay.hs.HsRelay`
  (introduction and rendezvous points), which keeps its per-circuit state here
  (``hs_purpose``, ``hs_key``, the INTRODUCE2 bucket, the spliced partner); ``ToSplice``
  hands cells to the partner circuit's core (:meth:`RelayCircuit.receive_spliced`).

The core packages exit data only while fewer than ``RELAY_QUEUE_ROOM`` cells wait in the
previous channel's queue for this circuit (when the channel is blocked); when that queue
drains the channel tells us (:meth:`queue_drained`) and the streams package again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from onionp2p.errors import OnionError
from onionp2p.log import get_logger
from onionp2p.proto.cells import Cell, CellCommand, Destroy, DestroyReason
from onionp2p.proto.circuit import (
    RELAY_QUEUE_ROOM,
    UNLIMITED_ROOM,
    CancelExtend,
    Destroyed,
    HsRequest,
    ToSplice,
    DetachNext,
    ExitBegin,
    ExitResolve,
    Extend,
    RelayCircuit,
    SetTimer,
    StreamClosed,
    StreamData,
    StreamPause,
    StreamResume,
    ToNext,
    ToPrev,
    from_core,
)
from onionp2p.proto.padding import Usage
from onionp2p.proto.relaycrypto import RelayCrypto

if TYPE_CHECKING:  # pragma: no cover
    from onionp2p.net.channel import Channel
    from onionp2p.proto.congestion import CCParams
    from onionp2p.proto.create import HopParams
    from onionp2p.relay.exit import ExitConnection
    from onionp2p.relay.relay import Relay

__all__ = ["OrCircuit"]

log = get_logger("onionp2p.circuit")
_RELAY = int(CellCommand.RELAY)


class OrCircuit:
    """One circuit as seen by a relay. See the module docstring."""

    def __init__(self, relay: Relay, prev_chan: Channel, prev_id: int, crypto: RelayCrypto,
                 params: HopParams | None = None, cc: CCParams | None = None):
        self.relay = relay
        self.prev_chan = prev_chan
        self.prev_id = prev_id
        peer = prev_chan.peer
        self.core = RelayCircuit(crypto, own_rsa_id=relay.keys.rsa_id_digest,
                                 prev_rsa_id=peer.rsa_id if peer is not None else None,
                                 allow_private=relay.config.extend_allow_private,
                                 max_streams=relay.config.max_streams_per_circuit, params=params, cc=cc)
        self.next_chan: Channel | None = None
        self.next_id = 0
        #: the destination sockets of this circuit's exit streams, by stream ID
        self.conns: dict[int, ExitConnection] = {}
        self._extending: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.log = log.bind(chan_id=prev_chan.id, circ_id=prev_id)
        #: the KH of this hop's handshake (onion services' ESTABLISH_INTRO MAC key)
        self.kh: bytes = params.kh if params is not None else b""
        # onion-service roles (relay.hs): "" | "intro" | "rend_waiting" | "rend_joined"
        self.hs_purpose = ""
        self.hs_key: bytes | None = None  # auth key (intro) or cookie (rendezvous)
        self.splice_peer: OrCircuit | None = None
        self.introduced = False  # an INTRODUCE1 came on this circuit (one per circuit)
        self.intro_dos = None
        self.intro_dos_explicit = False
        self.intro_bucket = None
        self._gone = False  # Destroyed was carried out (cells still listed after it stay here)
        prev_chan.circuits[prev_id] = self

    # what the relay, its control port and its metrics read
    closed = from_core("closed")
    streams = from_core("streams", "The exit streams' state, by stream ID (proto.stream.Stream)")
    crypto = from_core("crypto")
    cells_forward = from_core("cells_forward")
    cells_backward = from_core("cells_backward")

    # -- from the channels --------------------------------------------------------------------

    def relay_run(self, chan: Channel, data: bytes, start: int, count: int) -> None:
        """``count`` consecutive RELAY/RELAY_EARLY cells of this circuit from ``chan`` at
        ``data[start + i*514:]`` (the channel's receive buffer)."""
        now = self._loop.time()
        if chan is self.prev_chan:
            pad = chan.padding
            if pad is not None and pad.usage < Usage.USER_TRAFFIC \
                    and (self.next_chan is not None or not pad.is_client_channel):
                # a multi-hop circuit (tor's circuit_update_channel_usage): its channel is worth padding
                user = data[start + 4] == CellCommand.RELAY
                chan.note_usage(Usage.USER_TRAFFIC if user else Usage.FULL_CIRCS)
            self._run(self.core.receive_forward(data, start, count, now))
        else:
            self._run(self.core.receive_backward(data, start, count, now))

    def handle_cell(self, chan: Channel, cell: Cell) -> None:
        """Any other cell of this circuit."""
        now = self._loop.time()
        if chan is self.prev_chan:
            self._run(self.core.receive_cell_prev(cell.command, cell.payload, now))
        else:
            self._run(self.core.receive_cell_next(cell.command, cell.payload, now))

    def channel_closed(self, chan: Channel) -> None:
        prev = chan is self.prev_chan
        if not prev:
            self.next_chan = None
        self._run(self.core.channel_closed(prev))

    def queue_drained(self, chan: Channel) -> None:
        """The channel wrote out what it had queued for this circuit: streams package again."""
        if chan is self.prev_chan and self.core.streams and not self.core.closed:
            self._update_room()
            self._run(self.core.pump(self._loop.time()))

    def send_back(self, cmd: int, stream_id: int, data: bytes = b"") -> None:
        """Originate one relay message toward the client from this hop (see the core)."""
        self._run(self.core.send_back(cmd, stream_id, data))

    def destroy(self, reason: int, message: str = "") -> None:
        """Tear the circuit down from here (shutdown, memory limit, queue overflow)."""
        self._run(self.core.destroy(reason, message))

    # -- from the exit side ---------------------------------------------------------------------

    def exit_connected(self, sid: int, connected: bytes) -> None:
        self._run(self.core.exit_connected(sid, connected, self._loop.time()))
        conn = self.conns.get(sid)
        if conn is not None and conn.write_paused:  # the core takes the sink as ready: it is not
            self._run(self.core.stream_sink_ready(sid, False, now=self._loop.time()))

    def exit_refused(self, sid: int, end: bytes) -> None:
        self._run(self.core.exit_refused(sid, end))

    def exit_resolved(self, sid: int, answer: bytes) -> None:
        self._run(self.core.exit_resolved(sid, answer))

    def stream_write(self, sid: int, data: bytes) -> None:
        if sid in self.core.streams:
            self._run(self.core.stream_write(sid, data, self._loop.time()))

    def stream_eof(self, sid: int, reason: int) -> None:
        self._run(self.core.stream_eof(sid, reason, self._loop.time()))

    def stream_sink_ready(self, sid: int, ready: bool) -> None:
        self._run(self.core.stream_sink_ready(sid, ready, now=self._loop.time()))

    # -- carrying out the core's actions ----------------------------------------------------------

    def _run(self, actions: list) -> None:
        for a in actions:
            t = type(a)
            if self._gone and t is not Destroyed:
                # an onion-service request handled earlier in this list closed the circuit
                continue
            if t is ToPrev:
                self.prev_chan.send_payloads(self.prev_id, a.command, a.payloads)
            elif t is ToNext:
                if self.next_chan is not None:
                    self.next_chan.send_payloads(self.next_id, a.command, a.payloads)
            elif t is StreamData:
                conn = self.conns.get(a.stream_id)
                if conn is not None:
                    conn.write(a.data)
            elif t is StreamPause or t is StreamResume:
                conn = self.conns.get(a.stream_id)
                if conn is not None:
                    conn.set_reading(t is StreamResume)
            elif t is StreamClosed:
                conn = self.conns.pop(a.stream_id, None)
                if conn is not None:
                    conn.abort() if a.abort else conn.close()
            elif t is ExitBegin:
                self.relay.exit.begin(self, a.stream_id, a.begin)
            elif t is ExitResolve:
                self.relay.exit.resolve(self, a.stream_id, a.hostname)
            elif t is Extend:
                self._extending = self._loop.create_task(self._extend(a))
            elif t is SetTimer:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self._loop.call_at(a.deadline, self._on_timer)
            elif t is CancelExtend:
                if self._extending is not None:
                    self._extending.cancel()
                    self._extending = None
            elif t is ToSplice:
                peer = self.splice_peer
                if peer is not None:
                    peer._run(peer.core.receive_spliced(a.payloads))
            elif t is HsRequest:
                self.relay.hs.handle(self, a.command, a.data)
            elif t is DetachNext:
                self._detach_next(a.reason)
            elif t is Destroyed:
                self._destroyed(a)
        if self.core.streams:
            self._update_room()

    def _update_room(self) -> None:
        """Tell the core how many more cells toward the client it may package now: any
        number while the channel writes; while it is blocked, what is left of
        RELAY_QUEUE_ROOM after the cells already queued for this circuit."""
        chan = self.prev_chan
        core = self.core
        core.blocked = chan.paused
        core.room = RELAY_QUEUE_ROOM - chan.queued_cells(self.prev_id) if chan.paused else UNLIMITED_ROOM

    def _on_timer(self) -> None:
        self._timer = None
        self._run(self.core.on_timer(self._loop.time()))

    async def _extend(self, a: Extend) -> None:
        try:
            chan = await self.relay.chanmgr.get(a.host, a.port, a.rsa_id, a.ed_id)
        except (OnionError, OSError) as exc:
            self._extending = None
            self.log.info("extend failed", error=str(exc) or type(exc).__name__)
            self._run(self.core.extend_failed(str(exc) or type(exc).__name__))
            return
        self._extending = None
        if self.core.closed:
            return
        if chan.closed:
            self._run(self.core.extend_failed("channel closed"))
            return
        self.next_chan = chan
        self.next_id = chan.new_circ_id()
        chan.circuits[self.next_id] = self
        chan.send_cell(self.next_id, CellCommand.CREATE2, a.create2)
        self._run(self.core.extend_attached())

    def _detach_next(self, reason: int | None) -> None:
        chan = self.next_chan
        if chan is None:
            return
        chan.circuits.pop(self.next_id, None)
        chan.drop_queue(self.next_id)
        if reason is not None:
            chan.send_cell(self.next_id, CellCommand.DESTROY, Destroy(reason).encode())
        self.next_chan = None
        self.next_id = 0

    def _destroyed(self, a: Destroyed) -> None:
        if self._gone:
            return
        self._gone = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn in self.conns.values():
            conn.abort()  # a destination that never reads must not pin the socket
        self.conns.clear()
        self.prev_chan.circuits.pop(self.prev_id, None)
        self.prev_chan.drop_queue(self.prev_id)
        if a.destroy is not None:
            self.prev_chan.send_cell(self.prev_id, CellCommand.DESTROY, Destroy(a.destroy).encode())
        if a.message:
            self.log.info("circuit destroyed", reason=_reason(a.reason), why=a.message)
        else:
            self.log.debug("circuit destroyed", reason=_reason(a.reason))
        self.relay.circuit_closed(self, a.reason)
        if self.hs_purpose:
            self.relay.hs.circuit_closed(self, a.reason)


def _reason(reason: int) -> str:
    return DestroyReason(reason).name if reason in DestroyReason._value2member_map_ else str(reason)
