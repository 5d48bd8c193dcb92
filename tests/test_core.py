"""The circuit and stream cores on their own: cells in, actions out, no sockets (specs/circuits.md).

Every rule of the circuit protocol is tested here once, at the core that holds it:
RELAY_EARLY, digests and recognition, EXTEND2 checks, flow-control windows and
authenticated SENDMEs, which hop may say what, stream IDs, exit stream requests, END and
DESTROY reasons, source back-pressure, timers. :class:`Wire` joins a client core and relay
cores with real ntor handshakes and real relay crypto, carrying the cells their actions
send from one to the next, as channels would.
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.proto import circuit as core
from onionp2p.proto.cells import CellCommand, Create2, Created2, Destroy, DestroyReason, encode_fixed
from onionp2p.proto.congestion import CCParams
from onionp2p.proto.create import answer_create2
from onionp2p.proto.relaycell import (
    Begin,
    Connected,
    End,
    EndReason,
    Extend2,
    LinkSpec,
    RelayCommand,
    Resolved,
    ResolvedAnswer,
    Sendme,
    pack_relay,
)
from onionp2p.proto.hopcrypto import CgoRelayCrypto
from onionp2p.proto.relaycrypto import KEY_MATERIAL_LEN, RelayCrypto
from onionp2p.proto.stream import SOURCE_HIGH_WATER, StreamState

RELAY, EARLY = int(CellCommand.RELAY), int(CellCommand.RELAY_EARLY)


def kinds(actions: list) -> list[str]:
    return [type(a).__name__ for a in actions]


def only(actions: list, kind) -> list:
    return [a for a in actions if isinstance(a, kind)]


def cells_of(actions: list, kind=(core.Send, core.ToPrev, core.ToNext)) -> list[tuple[int, bytes]]:
    return [(a.command, bytes(p)) for a in actions if isinstance(a, kind) for p in a.payloads]


def run(cells: list[tuple[int, bytes]]) -> bytes:
    return b"".join(encode_fixed(0x80000001, cmd, p) for cmd, p in cells)


def relay_circ(**kw) -> core.RelayCircuit:
    """A relay circuit core with random keys and a next hop (cells it cannot read go on)."""
    c = core.RelayCircuit(RelayCrypto(os.urandom(KEY_MATERIAL_LEN)), own_rsa_id=os.urandom(20), **kw)
    c.has_next = True
    return c


class FakeRelay:
    """A relay's identity and onion key, enough for ntor (no files, no sockets)."""

    def __init__(self, i: int, cc: CCParams | None = None, cgo: bool = False):
        self.nickname = f"r{i}"
        self.cc = cc  # the relay runs congestion control with these parameters
        self.cgo = cgo  # ... and accepts CGO
        self.rsa_id = os.urandom(20)
        self.ed_id = os.urandom(32)
        self.onion = X25519PrivateKey.generate()
        self.ntor_key = self.onion.public_key().public_bytes_raw()
        self.address, self.or_port = f"192.0.2.{i + 1}", 9001
        self.protocols = ""  # what it advertises: nothing, so ntor (tests set "Relay=4" for ntor-v3)

    def create(self, create2: bytes, prev_rsa_id: bytes | None = None) -> tuple[core.RelayCircuit, bytes]:
        """Answer a CREATE2 payload: the new circuit's core and the CREATED2 payload."""
        req = Create2.parse(create2)
        reply, params = answer_create2(req.htype, req.hdata, rsa_id=self.rsa_id, ed_id=self.ed_id,
                                       onion_keys={self.ntor_key: self.onion}, cc=self.cc, cgo=self.cgo)
        crypto = (CgoRelayCrypto(params.key_material) if params.relay_crypto == "cgo"
                  else RelayCrypto(params.key_material))
        circ = core.RelayCircuit(crypto, own_rsa_id=self.rsa_id,
                                 prev_rsa_id=prev_rsa_id, allow_private=True, max_streams=3,
                                 params=params, cc=self.cc)
        circ.room = 1 << 30
        return circ, Created2(reply).encode()


class Wire:
    """A client core and the relay cores of its circuit, joined in memory.

    Cells that an action sends are queued and delivered in order once the actions at hand
    are done, as a network would: ``client(actions)`` carries what the client's actions
    send, and everything that follows from it, until nothing moves, and returns the
    client's actions other than sends; relays' actions other than cells and extends are
    kept in ``relay_actions``.
    """

    def __init__(self, n: int = 3, *, cc: CCParams | None = None, protocols: str = "", cgo: bool = False):
        self.relays = [FakeRelay(i, cc, cgo) for i in range(n)]
        for r in self.relays:
            r.protocols = protocols
        self.c = core.ClientCircuit(self.relays, cc=cc, cgo=cgo)
        self.now = 0.0  # the time every core is told
        self.hops: list[core.RelayCircuit] = []
        self.relay_actions: list[list] = [[] for _ in range(n)]
        self.seen: list[list[int]] = [[] for _ in range(n)]  # commands each hop got from its side
        self._queue: list = []

    def build(self) -> list:
        return self.client(self.c.start(0.0, 60.0))

    def client(self, actions: list) -> list:
        out: list = []
        self._client_actions(actions, out)
        return self._drain(out)

    def relay(self, i: int, actions: list) -> list:
        out: list = []
        self._relay_actions(i, actions)
        return self._drain(out)

    def _drain(self, out: list) -> list:
        while self._queue:
            kind, i, payload = self._queue.pop(0)
            if kind == "create":
                hop, reply = self.relays[0].create(payload)
                self.hops.append(hop)
                self._client_actions(self.c.receive_cell(int(CellCommand.CREATED2), reply, self.now), out)
            elif kind == "forward":
                self.seen[i] += [cmd for cmd, _p in payload]
                self._relay_actions(i, self.hops[i].receive_forward(run(payload), 0, len(payload), self.now))
            elif i == 0:  # backward, to the client
                self._client_actions(self.c.receive_relay(run(payload), 0, len(payload), self.now), out)
            else:
                self._relay_actions(i - 1, self.hops[i - 1].receive_backward(run(payload), 0, len(payload),
                                                                             self.now))
        return out

    def _client_actions(self, actions: list, out: list) -> None:
        for a in actions:
            if isinstance(a, core.Send):
                if a.command == CellCommand.CREATE2:
                    self._queue.append(("create", 0, a.payloads[0]))
                elif a.command in (RELAY, EARLY):
                    self._queue.append(("forward", 0, [(a.command, p) for p in a.payloads]))
            else:
                out.append(a)

    def _relay_actions(self, i: int, actions: list) -> None:
        for a in actions:
            if isinstance(a, core.ToNext):
                self._queue.append(("forward", i + 1, [(a.command, p) for p in a.payloads]))
            elif isinstance(a, core.ToPrev):
                self._queue.append(("backward", i, [(a.command, p) for p in a.payloads]))
            elif isinstance(a, core.Extend) and i + 1 < len(self.relays):
                nxt, reply = self.relays[i + 1].create(a.create2, self.relays[i].rsa_id)
                self.hops.append(nxt)
                self._relay_actions(i, self.hops[i].extend_attached())
                self._relay_actions(i, self.hops[i].receive_cell_next(int(CellCommand.CREATED2), reply, 0.0))
            else:
                self.relay_actions[i].append(a)

    def forward(self, i: int, cells: list) -> list:
        """Cells arrive at hop ``i`` from the client's side (as if from hop i-1)."""
        self._queue.append(("forward", i, cells))
        return self._drain([])

    def backward(self, i: int, cells: list) -> list:
        """Cells arrive from hop ``i`` toward the client."""
        self._queue.append(("backward", i, cells))
        return self._drain([])

    def originate(self, i: int, cmd: int, sid: int, data: bytes = b"") -> list:
        """Hop ``i`` originates a cell toward the client under its own layer."""
        return self.relay(i, self.hops[i].send_back(cmd, sid, data))

    def open_stream(self) -> int:
        """BEGIN to the exit, answered CONNECTED."""
        sid, actions = self.c.open_stream(int(RelayCommand.BEGIN), Begin("example.com", 80).encode())
        assert self.client(actions) == []
        (begin,) = only(self.relay_actions[-1], core.ExitBegin)
        self.relay_actions[-1].clear()
        assert begin.stream_id == sid and begin.begin.host == "example.com"
        got = self.relay(len(self.hops) - 1, self.hops[-1].exit_connected(sid, Connected(None).encode()))
        assert kinds(got) == ["StreamConnected"]
        return sid


@pytest.fixture
def wire() -> Wire:
    w = Wire()
    got = w.build()
    assert kinds(got) == ["SetTimer", "HopAdded", "HopAdded", "HopAdded", "Built"]
    assert w.c.state == "built" and len(w.hops) == 3
    return w


# -- building -------------------------------------------------------------------------------------


def test_build_with_extend_and_handshakes(wire):
    assert [h.has_next for h in wire.hops] == [True, True, False]
    # the first EXTEND2 was recognized at hop 0, the second passed through it to hop 1
    assert wire.seen[0][:2] == [EARLY, EARLY] and wire.seen[1][:1] == [EARLY]


def test_build_times_out():
    w = Wire()
    actions = w.c.start(10.0, 5.0)
    assert only(actions, core.SetTimer)[0].deadline == 15.0
    assert w.c.on_timer(14.9) == []
    (closed,) = w.c.on_timer(15.0)
    assert isinstance(closed, core.Closed) and closed.reason == "TIMEOUT" and closed.failed and closed.destroy


def test_unexpected_created2_and_bad_handshake_close_with_protocol():
    w = Wire()
    w.c.start(0.0, 60.0)
    (closed,) = w.c.receive_cell(int(CellCommand.CREATED2), Created2(os.urandom(64)).encode(), 0.0)
    assert closed.reason == "PROTOCOL" and closed.failed  # AUTH does not verify
    w = Wire()
    w.build()
    (closed,) = w.c.receive_cell(int(CellCommand.CREATED2), Created2(os.urandom(64)).encode(), 0.0)
    assert closed.reason == "PROTOCOL" and not closed.failed  # nobody asked for it


# -- RELAY_EARLY ---------------------------------------------------------------------------------------


def test_client_sends_relay_early_for_the_first_8_cells_past_the_first_hop(wire):
    sid = wire.open_stream()
    for _ in range(10):
        wire.client(wire.c.stream_write(sid, b"x" * 498))
    # hop k sees RELAY_EARLY for exactly its first 8 - k cells
    for k, cmds in enumerate(wire.seen):
        assert cmds[:8 - k] == [EARLY] * (8 - k) and EARLY not in cmds[8 - k:], (k, cmds)
    # cells to the first hop itself do not use the budget (none is left anyway now)
    assert cells_of(wire.c.send_relay(int(RelayCommand.DROP), 0, hop=0))[0][0] == RELAY


def test_extend2_needs_a_relay_early_cell_left():
    w = Wire(2)
    w.build()
    w.c._early_left = 0
    with pytest.raises(Exception, match="RELAY_EARLY"):
        w.c.send_relay(int(RelayCommand.EXTEND2), 0, b"", hop=1)


def test_relay_counts_relay_early_and_rejects_the_ninth_and_any_toward_the_client():
    circ = relay_circ()
    noise = [(EARLY, os.urandom(509)) for _ in range(9)]
    got = circ.receive_forward(run(noise), 0, 9, 0.0)
    assert len(cells_of(got)) == 8 and circ.closed  # eight passed on, the ninth destroys
    assert only(got, core.Destroyed)[0].destroy == DestroyReason.PROTOCOL
    circ = relay_circ()
    got = circ.receive_backward(run([(RELAY, os.urandom(509)), (EARLY, os.urandom(509))]), 0, 2, 0.0)
    assert len(cells_of(got)) == 1 and circ.closed


def test_extend2_must_come_in_relay_early(wire):
    cell = wire.c.crypto.originate(pack_relay(RelayCommand.EXTEND2, 0, b"\0"), 2)[0]
    got = wire.forward(0, [(RELAY, cell)])
    assert wire.hops[2].closed and got == []
    (destroyed,) = only(wire.relay_actions[2], core.Destroyed)
    assert destroyed.destroy == DestroyReason.PROTOCOL and "RELAY_EARLY" in destroyed.message


# -- recognition and digests -----------------------------------------------------------------------------


def test_unrecognized_cell_at_the_last_hop_destroys_the_circuit(wire):
    wire.forward(2, [(RELAY, os.urandom(509))])
    assert wire.hops[2].closed
    assert only(wire.relay_actions[2], core.Destroyed)[0].destroy == DestroyReason.PROTOCOL


def test_client_closes_on_a_cell_no_hop_recognizes(wire):
    got = wire.backward(0, [(RELAY, os.urandom(509))])
    assert kinds(got) == ["Closed"] and got[0].reason == "PROTOCOL" and got[0].destroy


# -- EXTEND2 at a relay ----------------------------------------------------------------------------


def extend2(target: FakeRelay, *, rsa: bytes | None = None, ed: bytes | None = None,
            address: str | None = None) -> bytes:
    specs = [LinkSpec.legacy_id(target.rsa_id if rsa is None else rsa),
             LinkSpec.ed25519_id(target.ed_id if ed is None else ed)]
    if address != "":
        specs.insert(0, LinkSpec.ipv4(address or target.address, 9001))
    return Extend2(tuple(specs), 2, os.urandom(84)).encode()


@pytest.mark.parametrize("case", ["self", "previous", "zero_rsa", "zero_ed", "private", "no_address"])
def test_extend2_checks(case):
    w = Wire(1)  # a 1-hop circuit; its hop is asked to extend to ``target``
    w.build()
    hop, target = w.hops[0], FakeRelay(7)
    hop.prev_rsa_id = os.urandom(20)
    hop.allow_private = case != "private"
    body = extend2(target, rsa={"self": w.relays[0].rsa_id, "previous": hop.prev_rsa_id,
                                "zero_rsa": bytes(20)}.get(case),
                   ed=bytes(32) if case == "zero_ed" else None,
                   address={"private": "10.0.0.1", "no_address": ""}.get(case))
    w.client(w.c.send_relay(int(RelayCommand.EXTEND2), 0, body))
    assert hop.closed and not only(w.relay_actions[0], core.Extend)
    assert only(w.relay_actions[0], core.Destroyed)[0].destroy == DestroyReason.PROTOCOL


def test_extend_asks_for_a_timer_and_gives_up_with_connectfailed():
    w = Wire(1)
    w.build()
    hop, target = w.hops[0], FakeRelay(7)
    w.client(w.c.send_relay(int(RelayCommand.EXTEND2), 0, extend2(target)))
    ext, timer = w.relay_actions[0]
    assert isinstance(ext, core.Extend) and (ext.host, ext.port, ext.rsa_id) == (target.address, 9001, target.rsa_id)
    assert isinstance(timer, core.SetTimer) and timer.deadline == core.EXTEND_TIMEOUT
    assert hop.on_timer(core.EXTEND_TIMEOUT - 1) == []
    got = hop.on_timer(core.EXTEND_TIMEOUT)
    assert kinds(got) == ["Destroyed"] and got[0].destroy == DestroyReason.CONNECTFAILED
    # the channel could not be had
    w = Wire(1)
    w.build()
    w.client(w.c.send_relay(int(RelayCommand.EXTEND2), 0, extend2(target)))
    assert w.hops[0].extend_failed("refused")[-1].destroy == DestroyReason.CONNECTFAILED
    # a CREATED2 nobody asked for
    got = relay_circ().receive_cell_next(int(CellCommand.CREATED2), Created2(b"x").encode(), 0.0)
    assert only(got, core.Destroyed)[0].destroy == DestroyReason.PROTOCOL


def test_truncate_detaches_the_next_hop_and_answers_truncated(wire):
    got = wire.client(wire.c.send_relay(int(RelayCommand.TRUNCATE), 0, b"", hop=1))
    assert only(wire.relay_actions[1], core.DetachNext)[0].reason == DestroyReason.REQUESTED
    assert not wire.hops[1].has_next
    (closed,) = only(got, core.Closed)  # the client tears down a truncated circuit
    assert closed.reason == "REQUESTED" and closed.destroy


# -- DESTROY reasons --------------------------------------------------------------------------------------


def test_destroy_reasons_at_a_relay():
    # from the client side: told to the next hop as DESTROYED, nothing back
    got = relay_circ().receive_cell_prev(int(CellCommand.DESTROY), Destroy(DestroyReason.FINISHED).encode(), 0.0)
    assert kinds(got) == ["DetachNext", "Destroyed"]
    assert got[0].reason == DestroyReason.DESTROYED and got[1].destroy is None
    # from the next hop: the client hears DESTROYED (the remote reason is not copied)
    got = relay_circ().receive_cell_next(int(CellCommand.DESTROY), Destroy(DestroyReason.FINISHED).encode(), 0.0)
    assert got[0].reason is None and got[-1].destroy == DestroyReason.DESTROYED
    # a channel that closed: hidden as DESTROYED; a reason decided here goes as is
    assert relay_circ().channel_closed(prev=False)[-1].destroy == DestroyReason.DESTROYED
    assert relay_circ().destroy(DestroyReason.RESOURCELIMIT)[-1].destroy == DestroyReason.RESOURCELIMIT
    assert relay_circ().channel_closed(prev=True)[-1].destroy is None


def test_client_destroy_says_none_and_keeps_the_reason(wire):
    (closed,) = wire.c.destroy()
    assert closed.destroy and closed.reason == "REQUESTED" and wire.c.state == "closed"
    w = Wire()
    w.build()
    (closed,) = w.c.receive_cell(int(CellCommand.DESTROY), Destroy(DestroyReason.OR_IDENTITY).encode(), 0.0)
    assert closed.reason == "OR_IDENTITY" and not closed.destroy


# -- windows and SENDMEs ------------------------------------------------------------------------------------


def test_data_and_sendmes_both_ways(wire):
    sid = wire.open_stream()
    data = random.Random(1).randbytes(300_000)
    got = wire.relay(2, wire.hops[2].stream_write(sid, data))
    assert b"".join(a.data for a in only(got, core.StreamData)) == data
    exit_edge = wire.hops[2]
    # the client acknowledged everything it got: the exit's windows are as if nothing was sent
    n = -(-len(data) // 498)
    assert exit_edge.layer.package.window == 1000 - n % 100
    assert exit_edge.streams[sid].package.window == 500 - n % 50
    assert wire.c.layers[2].deliver.window == 1000 - n % 100
    # and the other way
    wire.client(wire.c.stream_write(sid, data))
    delivered = b"".join(a.data for a in only(wire.relay_actions[2], core.StreamData))
    assert delivered == data


def test_stream_window_overrun_at_the_exit_destroys(wire):
    sid = wire.open_stream()
    wire.hops[2].stream_sink_ready(sid, False)  # the destination stopped taking data
    for _ in range(501):
        wire.client(wire.c.send_relay(int(RelayCommand.DATA), sid, b"x"))
    assert wire.hops[2].closed
    assert only(wire.relay_actions[2], core.Destroyed)[0].destroy == DestroyReason.PROTOCOL


def test_sendme_beyond_the_window_or_with_a_wrong_digest_destroys(wire):
    sid = wire.open_stream()
    wire.client(wire.c.send_relay(int(RelayCommand.SENDME), 0, Sendme(1, bytes(20)).encode()))
    assert wire.hops[2].closed  # nothing outstanding
    w = Wire()
    w.build()
    sid = w.open_stream()
    w.client(w.c.send_relay(int(RelayCommand.SENDME), sid, b""))
    assert w.hops[2].closed  # stream window above 500
    w = Wire()
    w.build()
    sid = w.open_stream()
    w.c._circuit_sendmes = lambda layer, digest: w.c._originate(  # an echo of a digest it never saw
        layer, int(RelayCommand.SENDME), 0, Sendme(1, os.urandom(20)).encode()) or layer.deliver.on_sendme_sent()
    w.relay(2, w.hops[2].stream_write(sid, b"y" * 498 * 120))
    assert w.hops[2].closed
    w = Wire()
    w.build()
    sid = w.open_stream()
    w.c._circuit_sendmes = lambda layer, digest: w.c._originate(  # version 0: no digest
        layer, int(RelayCommand.SENDME), 0, b"") or layer.deliver.on_sendme_sent()
    w.relay(2, w.hops[2].stream_write(sid, b"y" * 498 * 120))
    assert w.hops[2].closed


def test_client_windows_are_per_hop(wire):
    sid = wire.open_stream()
    # a SENDME from the middle credits the middle's window, which has nothing outstanding
    got = wire.originate(1, int(RelayCommand.SENDME), 0, Sendme(1, bytes(20)).encode())
    assert kinds(got) == ["Closed"] and got[0].reason == "PROTOCOL"
    w = Wire()
    w.build()
    sid = w.open_stream()
    # DATA from the guard counts against the guard's deliver window, never the stream's
    for _ in range(100):
        w.originate(0, int(RelayCommand.DATA), sid, b"z")
    assert w.c.layers[0].deliver.window == 1000 and w.c.layers[2].deliver.window == 1000
    assert cells_of(w.relay_actions[0]) == []  # (its circuit SENDME went back to it)
    assert w.c.streams[sid].deliver.window == 500


def test_withheld_stream_sendmes_while_the_sink_is_full(wire):
    sid = wire.open_stream()
    wire.client(wire.c.stream_sink_ready(sid, False))
    got = wire.relay(2, wire.hops[2].stream_write(sid, b"q" * 498 * 600))
    assert sum(len(a.data) for a in only(got, core.StreamData)) == 498 * 500  # then the exit stops
    assert wire.hops[2].streams[sid].package.window == 0
    got = wire.client(wire.c.stream_sink_ready(sid, True))  # the reader caught up
    assert sum(len(a.data) for a in only(got, core.StreamData)) == 498 * 100
    # a sink with room counts down within one run
    w = Wire()
    w.build()
    sid = w.open_stream()
    w.c.streams[sid].sink_room = 498 * 60
    w.relay(2, w.hops[2].stream_write(sid, b"q" * 498 * 600))
    assert w.c.streams[sid].sink_ready is False and w.hops[2].streams[sid].package.window == 0


def test_source_is_paused_above_the_high_water_mark_and_end_follows_the_last_byte(wire):
    sid = wire.open_stream()
    wire.hops[2].stream_sink_ready(sid, False)
    big = b"s" * (SOURCE_HIGH_WATER + 500 * 498 + 1)
    got = wire.client(wire.c.stream_write(sid, big))
    assert kinds(got) == ["StreamPause"]
    got = wire.client(wire.c.stream_eof(sid, EndReason.MISC))
    assert got == [] and sid in wire.c.streams  # END waits for the buffered bytes
    got = wire.client(wire.relay(2, wire.hops[2].stream_sink_ready(sid, True)))
    assert "StreamResume" in kinds(got) and "StreamClosed" in kinds(got) and sid not in wire.c.streams
    (closed,) = only(wire.relay_actions[2], core.StreamClosed)
    assert closed.by_peer and closed.reason == EndReason.MISC
    delivered = b"".join(a.data for a in only(wire.relay_actions[2], core.StreamData))
    assert delivered == big


# -- who may say what --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hop", [0, 1])
def test_stream_cells_from_another_hop_are_dropped_and_reported(wire, hop):
    sid = wire.open_stream()
    for cmd, body in ((RelayCommand.DATA, b"forged"), (RelayCommand.END, bytes((6,))),
                      (RelayCommand.CONNECTED, b""), (RelayCommand.RESOLVED, b"")):
        got = wire.originate(hop, int(cmd), sid, body)
        assert kinds(got) == ["Violation"] and got[0].hop == hop and got[0].command == cmd
    assert sid in wire.c.streams and wire.c.streams[sid].bytes_received == 0 and wire.c.violations == 4


def test_extended2_only_from_the_last_hop_while_extending():
    w = Wire()
    w.build()
    got = w.originate(0, int(RelayCommand.EXTENDED2), 0, os.urandom(66))
    assert kinds(got) == ["Violation"] and got[0].reason.startswith("EXTENDED2")
    got = w.originate(2, int(RelayCommand.EXTENDED2), 0, os.urandom(66))
    assert kinds(got) == ["Closed"] and got[0].reason == "PROTOCOL"  # the last hop, nothing pending


def test_stream_commands_on_stream_zero(wire):
    got = wire.originate(2, int(RelayCommand.DATA), 0, b"zero")
    assert kinds(got) == ["Violation"] and got[0].reason == "stream command on stream 0"
    wire.client(wire.c.send_relay(int(RelayCommand.DATA), 0, b"zero"))
    assert wire.hops[2].closed  # a relay destroys the circuit


def test_half_closed_streams_are_quiet_then_forgotten(wire):
    sid = wire.open_stream()
    wire.client(wire.c.stream_abort(sid))
    assert wire.originate(2, int(RelayCommand.DATA), sid, b"late") == []  # racing our END: no violation
    assert wire.originate(2, int(RelayCommand.END), sid, bytes((6,))) == []
    got = wire.originate(2, int(RelayCommand.DATA), sid, b"later")
    assert kinds(got) == ["Violation"]


def test_stream_ids_random_start_skip_zero_and_in_use():
    starts = {core.ClientCircuit([SimpleNamespace()])._next_sid for _ in range(20)}
    assert len(starts) > 10
    w = Wire(1)
    w.build()
    w.c._next_sid = 0xFFFF
    a, _ = w.c.open_stream(int(RelayCommand.BEGIN), Begin("a", 1).encode())
    w.c._next_sid = 0xFFFF
    b, _ = w.c.open_stream(int(RelayCommand.BEGIN), Begin("a", 1).encode())
    assert (a, b) == (0xFFFF, 1)


# -- exit stream requests ------------------------------------------------------------------------------------


def test_exit_requests_and_refusals(wire):
    exit_ = wire.hops[2]
    sid = wire.open_stream()
    # a BEGIN for a StreamID in use is dropped, as tor drops it; the stream goes on
    got = wire.client(wire.c.send_relay(int(RelayCommand.BEGIN), sid, Begin("x", 1).encode()))
    assert got == [] and not only(wire.relay_actions[2], core.ExitBegin)
    assert exit_.streams[sid].state is StreamState.OPEN and sid in wire.c.streams
    # a malformed BEGIN: END(TORPROTOCOL)
    s2, actions = wire.c.open_stream(int(RelayCommand.BEGIN), b"no colon\0")
    got = wire.client(actions)
    assert [(a.stream_id, a.reason, a.by_peer) for a in only(got, core.StreamClosed)] == [
        (s2, EndReason.TORPROTOCOL, True)]
    assert not only(wire.relay_actions[2], core.ExitBegin)
    # beyond max_streams (3): END(RESOURCELIMIT)
    for _ in range(2):
        wire.open_stream()
    s4, actions = wire.c.open_stream(int(RelayCommand.BEGIN), Begin("x", 1).encode())
    got = wire.client(actions)
    assert [(a.stream_id, a.reason, a.by_peer) for a in only(got, core.StreamClosed)] == [
        (s4, EndReason.RESOURCELIMIT, True)]
    # RESOLVE: answered, or refused by the shell (policy) with END
    rid, actions = wire.c.resolve("example.com")
    wire.client(actions)
    (req,) = only(wire.relay_actions[2], core.ExitResolve)
    answer = Resolved((ResolvedAnswer(4, bytes([192, 0, 2, 1]), 60),)).encode()
    got = wire.relay(2, exit_.exit_resolved(rid, answer))
    assert kinds(got) == ["ResolveAnswer"] and got[0].answer.answers[0].value_text() == "192.0.2.1"
    rid2, actions = wire.c.resolve("example.org")
    wire.client(actions)
    got = wire.relay(2, exit_.exit_refused(rid2, End(EndReason.EXITPOLICY).encode()))
    assert kinds(got) == ["ResolveAnswer"] and got[0].answer is None and got[0].reason == EndReason.EXITPOLICY
    assert req.hostname == "example.com"


def test_stream_request_at_a_middle_hop_destroys(wire):
    cell = wire.c.crypto.originate(pack_relay(RelayCommand.BEGIN, 7, Begin("x", 1).encode()), 1)[0]
    wire.forward(0, [(RELAY, cell)])
    assert wire.hops[1].closed


# -- the handshake each hop gets, and its extensions --------------------------------------------------


def test_hops_that_list_relay_4_get_ntor_v3_the_others_ntor():
    w = Wire(3)
    w.relays[0].protocols = "Link=4-5 Relay=2-4"
    w.relays[2].protocols = "Relay=1-6"
    w.relays[1].protocols = "Relay=2-3"  # no ntor-v3 here
    w.c = core.ClientCircuit(w.relays)
    sends = only(w.c.start(0.0, 60.0), core.Send)
    assert Create2.parse(sends[0].payloads[0]).htype == 3
    w.c = core.ClientCircuit(w.relays)
    got = w.build()
    assert kinds(got)[-1] == "Built"
    assert [layer.handshake for layer in w.c.layers] == ["ntor-v3", "ntor", "ntor-v3"]
    sid = w.open_stream()
    got = w.relay(2, w.hops[2].stream_write(sid, b"over two kinds of hop"))
    assert b"".join(a.data for a in only(got, core.StreamData)) == b"over two kinds of hop"


def test_ntor_v3_extensions_unknown_ones_are_ignored_both_ways():
    from onionp2p.proto import create
    from onionp2p.proto.handshake import NtorV3Client, encode_extensions, ntor_v3_server, parse_extensions

    relay = FakeRelay(0)
    # a client message with an extension nobody knows: the relay still answers
    client = NtorV3Client(relay.ed_id, relay.ntor_key, encode_extensions([(200, b"future"), (1, b"")]))
    reply, params = create.answer_create2(3, client.onion_skin, rsa_id=relay.rsa_id, ed_id=relay.ed_id,
                                          onion_keys={relay.ntor_key: relay.onion})
    server_message, km = client.complete(reply)
    assert params.handshake == "ntor-v3" and params.key_material == km
    assert parse_extensions(server_message) == []
    # a server message with an extension the client does not know: ignored
    relay.protocols = "Relay=4"
    hs = create.HopHandshake(relay)
    reply, _cm, km = ntor_v3_server(hs.onion_skin, relay.ed_id, {relay.ntor_key: relay.onion},
                                    encode_extensions([(201, b"x" * 10)]))
    assert hs.complete(reply).key_material == km
    # an unknown handshake type, a malformed client message: refused
    with pytest.raises(Exception, match="unsupported handshake type"):
        create.answer_create2(7, b"", rsa_id=relay.rsa_id, ed_id=relay.ed_id, onion_keys={})
    bad = NtorV3Client(relay.ed_id, relay.ntor_key, b"\x02\x01")  # says two extensions, has half of one
    with pytest.raises(Exception, match="client message"):
        create.answer_create2(3, bad.onion_skin, rsa_id=relay.rsa_id, ed_id=relay.ed_id,
                              onion_keys={relay.ntor_key: relay.onion})


# -- congestion control (proposal 324) ------------------------------------------------------------------

CC_PROTOCOLS = "FlowCtrl=1-2 Relay=2-4"


def cc_wire(**kw) -> Wire:
    w = Wire(cc=CCParams(**kw), protocols=CC_PROTOCOLS)
    assert kinds(w.build())[-1] == "Built"
    return w


def test_cc_is_negotiated_with_the_last_hop_only_and_only_where_offered():
    from onionp2p.proto.congestion import Vegas

    w = cc_wire()
    assert [layer.cc is not None for layer in w.c.layers] == [False, False, True]
    assert [h.layer.cc is not None for h in w.hops] == [False, False, True]
    assert isinstance(w.c.layers[2].package, Vegas) and w.c.layers[2].deliver.increment == 31
    assert w.hops[2].layer.cc.inc == 31 and w.c.layers[2].cc.inc == 31
    # a relay without FlowCtrl=2 is not asked; a client or relay without CC does not use it
    for client_cc, relay_cc, protocols in ((CCParams(), CCParams(), "FlowCtrl=1 Relay=2-4"),
                                           (None, CCParams(), CC_PROTOCOLS),
                                           (CCParams(cc_alg=0), CCParams(), CC_PROTOCOLS),
                                           (CCParams(), None, CC_PROTOCOLS)):
        w = Wire(protocols=protocols)
        w.c = core.ClientCircuit(w.relays, cc=client_cc)
        for r in w.relays:
            r.cc = relay_cc
        assert kinds(w.build())[-1] == "Built"
        assert all(layer.cc is None for layer in w.c.layers) and all(h.layer.cc is None for h in w.hops)
        assert w.c.layers[2].deliver.increment == 100
    # a one-hop circuit (directory fetches) does not ask either
    w = Wire(1, cc=CCParams(), protocols=CC_PROTOCOLS)
    assert kinds(w.build())[-1] == "Built" and w.c.layers[0].cc is None


def test_cc_response_checks_at_the_client():
    from onionp2p.errors import HandshakeError
    from onionp2p.proto import create
    from onionp2p.proto.handshake import encode_extensions, ntor_v3_server

    relay = FakeRelay(0)
    relay.protocols = CC_PROTOCOLS

    def answer(hs, extensions):
        reply, _cm, _km = ntor_v3_server(hs.onion_skin, relay.ed_id, {relay.ntor_key: relay.onion},
                                         encode_extensions(extensions))
        return hs.complete(reply)

    # a CC_RESPONSE nobody asked for fails the handshake (tor 0.4.9.12)
    with pytest.raises(HandshakeError, match="without a CC_REQUEST"):
        answer(create.HopHandshake(relay), [(create.EXT_CC_RESPONSE, b"\x1f")])
    # the increment must be within one of ours
    for inc, ok in ((31, True), (30, True), (32, True), (29, False), (33, False), (0, False)):
        hs = create.HopHandshake(relay, CCParams())
        if ok:
            assert answer(hs, [(create.EXT_CC_RESPONSE, bytes((inc,)))]).sendme_inc == inc
        else:
            with pytest.raises(HandshakeError, match="SENDME increment"):
                answer(hs, [(create.EXT_CC_RESPONSE, bytes((inc,)))])
    # asked, not answered: fixed windows
    assert answer(create.HopHandshake(relay, CCParams()), []).sendme_inc is None
    # at the relay: answered with the consensus's increment only when asked and running CC
    hs = create.HopHandshake(relay, CCParams())
    _reply, params = create.answer_create2(3, hs.onion_skin, rsa_id=relay.rsa_id, ed_id=relay.ed_id,
                                           onion_keys={relay.ntor_key: relay.onion}, cc=CCParams(cc_sendme_inc=30))
    assert params.sendme_inc == 30
    hs = create.HopHandshake(relay)
    _reply, params = create.answer_create2(3, hs.onion_skin, rsa_id=relay.rsa_id, ed_id=relay.ed_id,
                                           onion_keys={relay.ntor_key: relay.onion}, cc=CCParams())
    assert params.sendme_inc is None


def test_cc_circuit_sendmes_every_31_cells_measure_rtt_and_grow_cwnd():
    w = cc_wire()
    sid = w.open_stream()
    exit_edge, vegas = w.hops[2], w.hops[2].layer.cc
    assert exit_edge.layer.package.window == 124  # cc_cwnd_init, not 1000
    # the exit sends what its window allows; the client's SENDMEs come back 50 ms later
    w.now = 1.0
    acts = exit_edge.stream_write(sid, b"d" * 498 * 2000, now=1.0)
    sent = sum(len(a.payloads) for a in only(acts, core.ToPrev))
    assert sent == 124 and vegas.inflight == 124
    w.now = 1.05
    got = w.relay(2, acts)
    # SENDMEs for 4 x 31 cells came back (one per 31 cells, not 100), each an RTT sample
    assert vegas.sendmes >= 4 and vegas.samples >= 4 and vegas.rtt_min == 50_000
    assert w.c.layers[2].deliver.window > 1000 - 31
    # slow start: every SENDME while the window was full grew it
    assert vegas.cwnd > 124 and vegas.in_slow_start
    # the stream has no window of its own: everything arrives
    w.now = 2.0
    while exit_edge.streams[sid].buf:
        got += w.relay(2, exit_edge.pump(now=w.now))
        w.now += 0.05
    assert sum(len(a.data) for a in only(got, core.StreamData)) == 498 * 2000
    assert exit_edge.streams[sid].package.window > 10**8 and w.c.streams[sid].deliver.window > 10**8


def test_cc_client_side_uses_vegas_for_uploads():
    w = cc_wire()
    sid = w.open_stream()
    vegas = w.c.layers[2].cc
    got = w.client(w.c.stream_write(sid, b"u" * 498 * 300, now=0.0))
    assert vegas.sent == 300 and vegas.sendmes == 300 // 31
    delivered = b"".join(a.data for a in only(w.relay_actions[2], core.StreamData))
    assert delivered == b"u" * 498 * 300 and "StreamClosed" not in kinds(got)


def test_cc_sendme_digest_and_count_checks():
    w = cc_wire()
    sid = w.open_stream()
    # a SENDME with nothing outstanding, or with a digest of a cell never sent: closed
    w.client(w.c.send_relay(int(RelayCommand.SENDME), 0, Sendme(1, bytes(20)).encode()))
    assert w.hops[2].closed
    w = cc_wire()
    sid = w.open_stream()
    w.c._circuit_sendmes = lambda layer, digest: w.c._originate(
        layer, int(RelayCommand.SENDME), 0, Sendme(1, os.urandom(20)).encode()) or layer.deliver.on_sendme_sent()
    w.relay(2, w.hops[2].stream_write(sid, b"y" * 498 * 40))
    assert w.hops[2].closed


def test_cc_stream_sendme_is_a_protocol_violation_both_ways():
    w = cc_wire()
    sid = w.open_stream()
    w.client(w.c.send_relay(int(RelayCommand.SENDME), sid, b""))
    assert w.hops[2].closed  # tor: "Congestion control got stream sendme"
    w = cc_wire()
    sid = w.open_stream()
    got = w.originate(2, int(RelayCommand.SENDME), sid, b"")
    assert kinds(got) == ["Closed"] and got[0].reason == "PROTOCOL"


def test_xoff_and_xon_replace_stream_windows():
    from onionp2p.proto.relaycell import Xon

    w = cc_wire()
    sid = w.open_stream()
    exit_edge = w.hops[2]
    # the client's reader is full: XOFF goes to the exit, which stops packaging that stream
    got = w.client(w.c.stream_sink_ready(sid, False, now=0.0))
    assert got == [] and w.seen[2][-1] in (RELAY, EARLY) and w.c.streams[sid].xoff_sent
    assert exit_edge.streams[sid].xoff_received and exit_edge.streams[sid].package.window == 0
    got = w.relay(2, exit_edge.stream_write(sid, b"x" * 498 * 10, now=0.0))
    assert only(got, core.StreamData) == [] and len(exit_edge.streams[sid].buf) == 498 * 10
    # a second "not ready" sends nothing more
    w.client(w.c.stream_sink_ready(sid, False))
    assert exit_edge.streams[sid].xoff_received
    # the reader drained: XON, and the exit sends what it held
    got = w.client(w.c.stream_sink_ready(sid, True, now=0.1))
    assert b"".join(a.data for a in only(got, core.StreamData)) == b"x" * 498 * 10
    assert not exit_edge.streams[sid].xoff_received and not w.c.streams[sid].xoff_sent
    # XON carries an advisory rate (kilobytes/s), recorded
    w.originate(2, int(RelayCommand.XON), sid, Xon(1234).encode())
    assert w.c.streams[sid].xon_rate == 1234
    # the other way: the exit's destination is slow, the client stops
    w.relay(2, exit_edge.stream_sink_ready(sid, False, now=0.2))
    assert w.c.streams[sid].xoff_received
    w.client(w.c.stream_write(sid, b"z" * 5000))
    assert w.c.streams[sid].buffered == 5000
    w.relay(2, exit_edge.stream_sink_ready(sid, True, now=0.3))
    assert w.c.streams[sid].buffered == 0
    assert b"".join(a.data for a in only(w.relay_actions[2], core.StreamData)).endswith(b"z" * 5000)


def test_xon_carries_the_sinks_drain_rate_in_kilobytes_per_second():
    """The XON a sink's edge sends says how fast the sink drained since the XOFF (tor's
    flow_control_decide_xon): what it held at the XOFF (cc_xoff_client cells of 498 bytes)
    plus what came after, over the time it took; the other edge paces itself by it."""
    from onionp2p.proto.relaycell import Xon

    w = cc_wire(cc_xon_rate=1)  # a sample after one cell's worth (tor's default is 500)
    sid = w.open_stream()
    exit_edge = w.hops[2]
    held = 500 * 498  # the client sink's XOFF limit (cc_xoff_client)
    w.client(w.c.stream_sink_ready(sid, False, now=10.0))
    assert w.c.streams[sid].drain.ewma == 0
    w.relay(2, exit_edge.stream_write(sid, b"x" * 498 * 10, now=10.0))  # held back by the XOFF
    w.client(w.c.stream_sink_ready(sid, True, now=10.5))
    rate = held * 1000 // 500_000  # bytes * 1000 / µs = kilobytes per second: 498
    assert exit_edge.streams[sid].xon_rate == rate == 498
    assert w.c.streams[sid].drain.last_sent == rate
    assert w.c.streams[sid].bytes_received == 4980  # the exit sent what it held, within the rate
    # a second round: tor divides the previous period's bytes by this period's time; the
    # previous period is the 4,980 bytes the sink took with its queue empty (they doubled
    # the average, still unsent; the XOFF cleared it)
    assert w.c.streams[sid].drain.ewma == 2 * 498 and w.c.streams[sid].drain.prev_drained == 4980
    w.client(w.c.stream_sink_ready(sid, False, now=20.0))
    w.client(w.c.stream_sink_ready(sid, True, now=21.0))
    assert exit_edge.streams[sid].xon_rate == 4980 * 1000 // 1_000_000 == 4
    # with tor's default cc_xon_rate, less than 500 cells drained since the XOFF: no rate (0)
    w = cc_wire()
    sid = w.open_stream()
    w.client(w.c.stream_sink_ready(sid, False, now=1.0))
    w.client(w.c.stream_sink_ready(sid, True, now=2.0))
    assert w.hops[2].streams[sid].xon_rate == 0 and w.c.streams[sid].drain.last_sent == 0
    assert w.hops[2].streams[sid].xon_rate == Xon.parse(Xon(0).encode()).kbps_ewma


def test_xon_xoff_from_the_wrong_hop_or_without_cc_are_dropped_and_reported():
    from onionp2p.proto.relaycell import Xoff, Xon

    w = cc_wire()
    sid = w.open_stream()
    got = w.originate(1, int(RelayCommand.XOFF), sid, Xoff().encode())  # the middle speaks for the exit
    assert kinds(got) == ["Violation"] and not w.c.streams[sid].xoff_received
    w.originate(2, int(RelayCommand.XOFF), sid, Xoff().encode())
    got = w.originate(2, int(RelayCommand.XOFF), sid, Xoff().encode())  # twice
    assert kinds(got) == ["Violation"] and "already" in got[0].reason
    got = w.originate(2, int(RelayCommand.XON), sid, b"\x07\0\0\0\0")  # unknown version
    assert kinds(got) == ["Violation"] and w.c.streams[sid].xoff_received
    # fixed windows: XON/XOFF mean nothing
    w = Wire()
    w.build()
    sid = w.open_stream()
    got = w.originate(2, int(RelayCommand.XOFF), sid, Xoff().encode())
    assert kinds(got) == ["Violation"] and "without congestion control" in got[0].reason
    assert w.c.streams[sid].package.window == 500
    got = w.originate(2, int(RelayCommand.XON), sid, Xon(0).encode())
    assert kinds(got) == ["Violation"]


def test_cc_window_respects_the_channel_room_and_blocked_is_a_signal():
    w = cc_wire()
    sid = w.open_stream()
    exit_edge = w.hops[2]
    exit_edge.room = 10
    acts = exit_edge.stream_write(sid, b"r" * 498 * 100, now=0.0)
    assert sum(len(a.payloads) for a in only(acts, core.ToPrev)) == 10
    exit_edge.blocked = True
    w.now = 0.05
    w.relay(2, acts)
    assert exit_edge.layer.cc.sendmes == 0  # no SENDME yet (10 cells < 31)
    exit_edge.room = 100
    w.relay(2, exit_edge.pump(now=0.06))
    assert exit_edge.layer.cc.sendmes >= 1 and exit_edge.layer.cc.blocked  # the shell's signal reached Vegas
    # the client side: the room bounds what goes out too
    w.c.room = 5
    got = w.c.stream_write(sid, b"s" * 498 * 50, now=0.1)
    assert sum(len(a.payloads) for a in only(got, core.Send)) == 5


# -- CGO relay crypto (proposal 359) and relay message format v1 ------------------------------------------

CGO_PROTOCOLS = "FlowCtrl=1-2 Relay=2-6"


def cgo_wire(n: int = 3, **kw) -> Wire:
    w = Wire(n, cc=CCParams(**kw), protocols=CGO_PROTOCOLS, cgo=True)
    assert kinds(w.build())[-1] == "Built"
    return w


def test_cgo_on_every_hop_carries_streams_both_ways_with_16_byte_sendme_tags():
    w = cgo_wire()
    # every hop: CGO, message format v1, and the congestion control CGO needs
    assert [layer.relay_crypto for layer in w.c.layers] == ["cgo"] * 3 and all(l.v1 for l in w.c.layers)
    assert [h.layer.relay_crypto for h in w.hops] == ["cgo"] * 3
    assert all(layer.cc is not None for layer in w.c.layers) and all(h.layer.cc is not None for h in w.hops)
    sid = w.open_stream()
    exit_edge, vegas = w.hops[2], w.hops[2].layer.cc
    # down: 488 bytes a DATA cell (v1 has a 21-byte header); SENDMEs echo CGO's 16-byte tags
    data = os.urandom(488 * 100 + 7)
    acts = exit_edge.stream_write(sid, data, now=0.0)
    assert sum(len(a.payloads) for a in only(acts, core.ToPrev)) == 101
    w.now = 0.05
    got = w.relay(2, acts)
    assert b"".join(a.data for a in only(got, core.StreamData)) == data
    assert vegas.sendmes == 101 // 31 and vegas.samples == 3 and vegas.rtt_min == 50_000
    # up: the client's packaging follows the hop's format too
    payload = os.urandom(488 * 70)
    w.client(w.c.stream_write(sid, payload, now=0.1))
    assert b"".join(a.data for a in only(w.relay_actions[2], core.StreamData)) == payload
    assert w.c.layers[2].cc.sent == 70 and w.c.layers[2].cc.sendmes == 2
    # END in format v1 closes the stream at the other edge
    got = w.originate(2, int(RelayCommand.END), sid, End(EndReason.DONE).encode())
    assert kinds(got) == ["StreamData", "StreamClosed"] or kinds(got) == ["StreamClosed"]


def test_cgo_sendme_with_a_wrong_tag_closes_the_circuit():
    w = cgo_wire()
    sid = w.open_stream()
    w.c._circuit_sendmes = lambda layer, digest: w.c._originate(
        layer, int(RelayCommand.SENDME), 0, Sendme(1, os.urandom(16)).encode()) or layer.deliver.on_sendme_sent()
    w.relay(2, w.hops[2].stream_write(sid, b"y" * 488 * 40, now=0.0))
    assert w.hops[2].closed


def test_cgo_where_offered_tor1_elsewhere_on_one_circuit():
    w = Wire(cc=CCParams(), protocols=CGO_PROTOCOLS, cgo=True)
    w.relays[0].protocols = CC_PROTOCOLS  # an older guard: no Relay=5-6
    assert kinds(w.build())[-1] == "Built"
    assert [layer.relay_crypto for layer in w.c.layers] == ["tor1", "cgo", "cgo"]
    assert [h.layer.relay_crypto for h in w.hops] == ["tor1", "cgo", "cgo"]
    # the guard runs no congestion control of its own (it is not the last hop), the others do
    assert [layer.cc is not None for layer in w.c.layers] == [False, True, True]
    sid = w.open_stream()
    data = os.urandom(488 * 50)
    got = w.relay(2, w.hops[2].stream_write(sid, data, now=0.0))
    assert b"".join(a.data for a in only(got, core.StreamData)) == data
    w.client(w.c.stream_write(sid, b"q" * 10000, now=0.1))
    assert b"".join(a.data for a in only(w.relay_actions[2], core.StreamData)) == b"q" * 10000
    # RELAY_EARLY as always: the middle saw its 7, the exit 6, on cells whose tweak holds the command
    assert w.seen[1][:8] == [EARLY] * 7 + [RELAY] and w.seen[2][:7] == [EARLY] * 6 + [RELAY]


def test_cgo_is_asked_only_where_offered_and_wanted():
    cases = (("FlowCtrl=1-2 Relay=2-5", True, CCParams()),  # no Relay=6
             ("FlowCtrl=1 Relay=2-6", True, CCParams()),  # no congestion control at the relay
             (CGO_PROTOCOLS, False, CCParams()),  # we do not want it
             (CGO_PROTOCOLS, True, None))  # we run no congestion control
    for protocols, cgo, cc in cases:
        w = Wire(cc=cc, protocols=protocols, cgo=cgo)
        assert kinds(w.build())[-1] == "Built"
        assert all(layer.relay_crypto == "tor1" and not layer.v1 for layer in w.c.layers), protocols
    # one-hop circuits (directory fetches) keep tor1
    w = cgo_wire(1)
    assert w.c.layers[0].relay_crypto == "tor1"


def test_cgo_tampering_kills_the_circuit_both_ways():
    # a guard that flips a bit of a cell for the exit: the exit recognizes nothing: DESTROY
    w = cgo_wire()
    sid = w.open_stream()
    sent = only(w.c.stream_write(sid, b"t" * 100, now=0.0), core.Send)
    (cell,) = sent[0].payloads
    bad = bytearray(cell)
    bad[100] ^= 1
    w.forward(0, [(sent[0].command, bytes(bad))])
    assert w.hops[2].closed
    # backward: the client recognizes nothing either: closed with PROTOCOL
    w = cgo_wire()
    sid = w.open_stream()
    acts = w.hops[2].stream_write(sid, b"u" * 100, now=0.0)
    (cell,) = only(acts, core.ToPrev)[0].payloads
    bad = bytearray(cell)
    bad[300] ^= 0x80
    got = w.backward(2, [(RELAY, bytes(bad))])
    assert kinds(got) == ["Closed"] and got[0].reason == "PROTOCOL"


def test_cgo_negotiation_checks():
    from onionp2p.errors import HandshakeError
    from onionp2p.proto import create
    from onionp2p.proto.handshake import NtorV3Client, encode_extensions, ntor_v3_server

    relay = FakeRelay(0)
    relay.protocols = CGO_PROTOCOLS
    keys = {relay.ntor_key: relay.onion}

    def ask(extensions, *, cc=CCParams(), cgo=True):
        hs = NtorV3Client(relay.ed_id, relay.ntor_key, encode_extensions(extensions))
        return create.answer_create2(3, hs.onion_skin, rsa_id=relay.rsa_id, ed_id=relay.ed_id, onion_keys=keys,
                                     cc=cc, cgo=cgo)

    cc_req = (create.EXT_CC_REQUEST, b"")
    # accepted: CC_REQUEST + SUBPROTO_REQUEST {Relay, 6}; 160 bytes of key material
    _reply, params = ask([cc_req, (create.EXT_SUBPROTO_REQUEST, b"\x02\x06")])
    assert params.relay_crypto == "cgo" and len(params.key_material) == 160 and params.sendme_inc == 31
    # an empty request changes nothing
    assert ask([cc_req, (create.EXT_SUBPROTO_REQUEST, b"")])[1].relay_crypto == "tor1"
    # refused as tor refuses: unsorted or duplicate entries, anything but Relay=6, an odd length,
    # CGO without congestion control, CGO at a relay that does not run it
    for body, match in ((b"\x02\x06\x02\x06", "sorted"), (b"\x02\x06\x02\x05", "sorted"),
                        (b"\x02\x05", "unsupported"), (b"\x0b\x02", "unsupported"), (b"\x02", "odd")):
        with pytest.raises(HandshakeError, match=match):
            ask([cc_req, (create.EXT_SUBPROTO_REQUEST, body)])
    with pytest.raises(HandshakeError, match="without congestion control"):
        ask([(create.EXT_SUBPROTO_REQUEST, b"\x02\x06")])
    with pytest.raises(HandshakeError, match="without congestion control"):
        ask([cc_req, (create.EXT_SUBPROTO_REQUEST, b"\x02\x06")], cc=None)
    with pytest.raises(HandshakeError, match="do not run"):
        ask([cc_req, (create.EXT_SUBPROTO_REQUEST, b"\x02\x06")], cgo=False)
    # the client: asked for CGO, a reply without CC_RESPONSE fails the handshake
    hs = create.HopHandshake(relay, CCParams(), cgo=True)
    reply, _cm, _km = ntor_v3_server(hs.onion_skin, relay.ed_id, keys, encode_extensions([]), length=160)
    with pytest.raises(HandshakeError, match="CGO without congestion control"):
        hs.complete(reply)
    # both ends derive the same 160 bytes
    hs = create.HopHandshake(relay, CCParams(), cgo=True)
    reply, params = create.answer_create2(3, hs.onion_skin, rsa_id=relay.rsa_id, ed_id=relay.ed_id,
                                          onion_keys=keys, cc=CCParams(), cgo=True)
    mine = hs.complete(reply)
    assert mine.relay_crypto == "cgo" and mine.key_material == params.key_material


def test_xon_advisory_rate_paces_the_stream_until_an_xon_lifts_it():
    """An XON's rate (kilobytes of 1000 bytes per second) paces the stream's packaging with a
    token bucket of one second, as tor's edge read bucket; the core asks for a timer to go on."""
    from onionp2p.proto.relaycell import Xon

    w = cc_wire()
    sid = w.open_stream()
    # the exit's destination drains 10 kB/s: it says so in an XON (no XOFF before it)
    w.originate(2, int(RelayCommand.XON), sid, Xon(10).encode())
    stream = w.c.streams[sid]
    assert stream.xon_rate == 10

    def sent() -> int:
        return sum(len(a.data) for a in only(w.relay_actions[2], core.StreamData))

    got = w.client(w.c.stream_write(sid, b"p" * 50_000, now=0.0))
    assert sent() == 10_000 - 10_000 % 498  # one second's worth, in whole cells
    (timer,) = only(got, core.SetTimer)
    assert 0.0 < timer.deadline <= 0.05  # when the next cell's tokens are there
    w.client(w.c.on_timer(0.5))
    assert 14_500 <= sent() <= 15_000  # half a second later: 5 kB more
    w.client(w.c.on_timer(2.0))
    assert 24_400 <= sent() <= 25_000  # 1.5 s later, but the bucket holds one second at most
    # a new XON without a rate: no limit
    w.originate(2, int(RelayCommand.XON), sid, Xon(0).encode())
    assert sent() == 50_000 and stream.buffered == 0
    # at the exit too: the client's XON paces what the exit sends
    w.client(w.c.send_relay(int(RelayCommand.XON), sid, Xon(2).encode(), hop=2))
    exit_edge = w.hops[2]
    assert exit_edge.streams[sid].xon_rate == 2
    got = w.relay(2, exit_edge.stream_write(sid, b"q" * 5000, now=3.0))
    delivered = sum(len(a.data) for a in only(got, core.StreamData))
    assert delivered == 1992 and exit_edge.streams[sid].buffered == 5000 - 1992
    assert only(w.relay_actions[2], core.SetTimer)
    got = w.relay(2, exit_edge.on_timer(5.0))
    assert sum(len(a.data) for a in only(got, core.StreamData)) == 1992  # (one second's worth again)
    got = w.relay(2, exit_edge.on_timer(7.0))
    assert sum(len(a.data) for a in only(got, core.StreamData)) == 5000 - 2 * 1992
    assert exit_edge.streams[sid].buffered == 0


def test_an_advertised_rate_opens_up_again_while_the_sink_keeps_up():
    """After a slow spell the XON's rate would pace the other edge for good; as in tor, a
    sink that keeps taking data doubles it every cc_xon_rate cells' worth and sends an
    advisory XON (no XOFF before it) each time it moved by more than 25 %."""
    w = cc_wire(cc_xon_rate=1)  # 498 bytes between samples, for a short test
    sid = w.open_stream()
    exit_edge = w.hops[2]
    w.client(w.c.stream_sink_ready(sid, False, now=10.0))
    w.client(w.c.stream_sink_ready(sid, True, now=10.5))
    assert exit_edge.streams[sid].xon_rate == 498
    seen = []
    for i in range(6):  # the client's sink takes one cell at a time
        w.relay(2, exit_edge.stream_write(sid, b"y" * 498, now=11.0 + i))
        seen.append(exit_edge.streams[sid].xon_rate)
    # each cell's worth doubles the average, which the next cell's check finds moved by more
    # than 25 % and sends (tor checks before it doubles, in the same call)
    assert seen == [498, 996, 1992, 3984, 7968, 15936]
    assert w.c.streams[sid].drain.last_sent == 15936 and w.c.streams[sid].bytes_received == 6 * 498
    assert w.c.streams[sid].drain.ewma == 2 * 15936  # doubled again, not yet sent
