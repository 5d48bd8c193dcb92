"""The fast data path produces exactly the bytes of the per-cell path (specs/performance.md).

Every batched or coalesced operation is checked against the plain one-cell-at-a-time
code over thousands of cells: batched crypto against per-cell crypto, the channel's
whole-buffer framing against CellReader, ``send_payloads`` against ``send_cell``
(coalesced writes against the concatenation of the cells), circuit runs against
``handle_cell`` per cell, batched stream packaging against one ``emit`` per chunk, and
the client's run handling against its per-cell handling. No timing is asserted here:
benchmarks live in tools/bench.
"""

from __future__ import annotations

import asyncio
import random
import struct
from types import SimpleNamespace

import pytest

from onionp2p.client.client import ClientCircuit, OnionClient, StreamTransport
from onionp2p.errors import DigestMismatch
from onionp2p.net.channel import Channel
from onionp2p.proto.cells import CELL_LEN, Cell, CellCommand, CellReader, encode_fixed, encode_var
from onionp2p.proto.relaycell import RelayCommand, pack_relay
from onionp2p.proto.relaycrypto import KEY_MATERIAL_LEN, RELAY_BODY_LEN, ClientCrypto, RelayCrypto
from onionp2p.proto.stream import EdgeStream, StreamState
from onionp2p.relay.circuit import OrCircuit

N_CELLS = 3000


@pytest.fixture(autouse=True)
def fixed_padding(monkeypatch):
    """Relay cells are padded with random bytes; make them predictable so that two paths
    that build the same cells can be compared byte for byte."""
    from onionp2p.proto import relaycell
    monkeypatch.setattr(relaycell, "os", SimpleNamespace(urandom=lambda n: random.Random(n).randbytes(n)))


def keys(seed: int, n: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(KEY_MATERIAL_LEN) for _ in range(n)]


def body(rng: random.Random, cmd: int = RelayCommand.DATA, sid: int = 1, n: int | None = None) -> bytes:
    return bytes(pack_relay(cmd, sid, rng.randbytes(rng.randrange(0, 499) if n is None else n)))


# -- relay crypto: batched == per cell ----------------------------------------------------------


def test_client_decrypt_inbound_many_equals_per_cell() -> None:
    rng = random.Random(1)
    ks = keys(2)
    relays = [RelayCrypto(k) for k in ks]
    a, b = ClientCrypto(), ClientCrypto()
    for k in ks:
        a.add_hop(k)
        b.add_hop(k)
    cells = []
    for _ in range(N_CELLS):
        hop = rng.choice((0, 1, 2, 2, 2, 2))  # mostly from the exit, some from earlier hops
        ct, _ = relays[hop].originate_backward(body(rng))
        for r in reversed(relays[:hop]):
            ct = r.encrypt_backward(ct)
        cells.append(ct)
    batched = []
    for i in range(0, N_CELLS, 257):  # runs of various lengths
        batched += a.decrypt_inbound_many([memoryview(c) for c in cells[i:i + 257]])
    single = [b.decrypt_inbound(c) for c in cells]
    assert batched == single
    assert [a.backward_digest(i) for i in range(3)] == [b.backward_digest(i) for i in range(3)]


def test_client_decrypt_inbound_many_reports_cells_before_a_bad_one() -> None:
    rng = random.Random(3)
    ks = keys(4)
    relays = [RelayCrypto(k) for k in ks]
    a, b = ClientCrypto(), ClientCrypto()
    for k in ks:
        a.add_hop(k)
        b.add_hop(k)
    cells = []
    for _ in range(40):
        ct, _ = relays[2].originate_backward(body(rng))
        cells.append(relays[0].encrypt_backward(relays[1].encrypt_backward(ct)))
    bad = bytearray(cells[25])
    bad[100] ^= 1
    cells[25] = bytes(bad)
    with pytest.raises(DigestMismatch) as info:
        a.decrypt_inbound_many(cells)
    assert info.value.partial == [b.decrypt_inbound(c) for c in cells[:25]]
    with pytest.raises(DigestMismatch):
        b.decrypt_inbound(cells[25])


def test_relay_batched_crypto_equals_per_cell() -> None:
    rng = random.Random(5)
    (k,) = keys(6, 1)
    client = ClientCrypto()
    client.add_hop(k)
    other = ClientCrypto()  # cells for a later hop look like noise to this relay
    other.add_hop(keys(7, 1)[0])
    fwd = [client.originate(body(rng), 0)[0] if rng.random() < 0.3 else rng.randbytes(RELAY_BODY_LEN)
           for _ in range(N_CELLS)]
    a, b = RelayCrypto(k), RelayCrypto(k)
    assert a.decrypt_forward_many(fwd) == [b.decrypt_forward(c) for c in fwd]
    assert a.forward_digest == b.forward_digest
    back = [rng.randbytes(RELAY_BODY_LEN) for _ in range(N_CELLS)]
    assert a.encrypt_backward_many(back) == [b.encrypt_backward(c) for c in back]
    bodies = [body(rng) for _ in range(N_CELLS)]
    cts, digests = a.originate_backward_many(bodies)
    assert list(zip(cts, digests)) == [b.originate_backward(x) for x in bodies]
    cts, digests = a.originate_backward_many([bytearray(x) for x in bodies], consume=True)
    assert list(zip(cts, digests)) == [b.originate_backward(x) for x in bodies]
    assert a.backward_digest == b.backward_digest


def test_recognize_forward_leaves_state_on_mismatch() -> None:
    rng = random.Random(8)
    (k,) = keys(9, 1)
    client = ClientCrypto()
    client.add_hop(k)
    a, b = RelayCrypto(k), RelayCrypto(k)
    for _ in range(200):
        ct, _ = client.originate(body(rng), 0)
        if rng.random() < 0.2:  # corrupt: Recognized stays 0 but the digest fails
            bad = bytearray(ct)
            bad[200] ^= 0xFF
            ct = bytes(bad)
        plain = a.fwd_update(ct)
        got = a.recognize_forward(plain)
        want = b.decrypt_forward(ct)
        assert (got is not None, plain, got) == want


# -- channels: framing and writing ------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.paused_reading = False

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


class _Owner:
    def __init__(self) -> None:
        self.unknown: list[tuple[int, int, bytes]] = []
        self.overflow: list[int] = []

    def unknown_cell(self, chan, cell) -> None:
        self.unknown.append((cell.circ_id, cell.command, bytes(cell.payload)))

    def channel_open(self, chan) -> None:
        pass

    def channel_closed(self, chan) -> None:
        pass

    def queue_overflow(self, chan, circ_id) -> None:
        self.overflow.append(circ_id)

    def account_read(self, chan, nbytes) -> None:
        pass

    def channel_connected(self, chan) -> bool:
        return True


def open_channel(owner=None) -> tuple[Channel, _Transport]:
    """A Channel past its link handshake, writing into a list."""
    chan = Channel(owner or _Owner(), initiator=True)
    t = _Transport()
    chan._transport = t  # type: ignore[assignment]
    chan._hs = None
    chan.link_version = 4
    return chan, t


class _RunCircuit:
    """Records cells given as runs (relay_run) and one by one (handle_cell)."""

    def __init__(self, log: list) -> None:
        self.log = log

    def relay_run(self, chan, data, start, count) -> None:
        for i in range(count):
            p = start + i * CELL_LEN
            cid, cmd = struct.unpack_from(">IB", data, p)
            self.log.append((cid, cmd, bytes(data[p + 5:p + CELL_LEN])))

    def handle_cell(self, chan, cell) -> None:
        self.log.append((cell.circ_id, cell.command, bytes(cell.payload)))

    def channel_closed(self, chan) -> None:
        pass


class _CellCircuit(_RunCircuit):
    relay_run = None  # type: ignore[assignment]  # the channel must fall back to handle_cell


def _mixed_stream(rng: random.Random, n: int) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    cids = [0x80000001, 0x80000002, 0x80000003, 0x12345678]  # last one: no circuit -> owner
    raw, cells = [], []
    for _ in range(n):
        cid = rng.choice(cids)
        r = rng.random()
        if r < 0.8:
            cmd = rng.choice((CellCommand.RELAY,) * 9 + (CellCommand.RELAY_EARLY,))
            payload = rng.randbytes(509)
            raw.append(encode_fixed(cid, cmd, payload))
        elif r < 0.9:
            cmd, payload = CellCommand.DESTROY, bytes([rng.randrange(12)]) + bytes(508)
            raw.append(encode_fixed(cid, cmd, payload))
        else:
            cmd, payload = CellCommand.AUTHORIZE, rng.randbytes(rng.randrange(0, 700))
            raw.append(encode_var(cid, cmd, payload))
        cells.append((cid, int(cmd), payload))
    return b"".join(raw), cells


async def test_channel_whole_buffer_framing_equals_cellreader() -> None:
    rng = random.Random(10)
    data, _ = _mixed_stream(rng, N_CELLS)
    reader = CellReader(4)
    reader.receive_data(data)
    expected = [(c.circ_id, c.command, c.payload) for c in reader.cells()]
    assert reader.buffered == 0
    owner = _Owner()
    chan, _t = open_channel(owner)
    log: list = []
    chan.circuits[0x80000001] = _RunCircuit(log)
    chan.circuits[0x80000002] = _CellCircuit(log)
    chan.circuits[0x80000003] = _RunCircuit(log)
    # feed it in random pieces, as socket reads come
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 5, 7, 300, 514, 515, 4096, 65536, 262144))
        chan.data_received(data[pos:pos + step])
        pos += step
    assert not chan.closed
    got_known = [c for c in expected if c[0] in chan.circuits]
    assert log == got_known
    assert owner.unknown == [c for c in expected if c[0] not in chan.circuits]
    assert chan.cells_in == len(expected)


async def test_send_payloads_writes_the_concatenation_of_send_cell() -> None:
    rng = random.Random(11)
    a, ta = open_channel()
    b, tb = open_channel()
    for _ in range(200):
        cid = rng.randrange(1, 2**32)
        cmd = rng.choice((CellCommand.RELAY, CellCommand.RELAY_EARLY))
        payloads = [rng.randbytes(509) for _ in range(rng.randrange(1, 40))]
        a.send_payloads(cid, cmd, payloads)
        for p in payloads:
            b.send_cell(cid, cmd, p)
        if rng.random() < 0.1:
            a.flush()
    a.flush()
    b.flush()
    assert b"".join(ta.written) == b"".join(tb.written)
    assert a.cells_out == b.cells_out
    # while the transport is paused, cells wait in the same per-circuit queues
    a.pause_writing()
    b.pause_writing()
    payloads = [rng.randbytes(509) for _ in range(30)]
    a.send_payloads(7, CellCommand.RELAY, payloads)
    for p in payloads:
        b.send_cell(7, CellCommand.RELAY, p)
    assert a.queued_cells(7) == b.queued_cells(7) == 30
    a.resume_writing()
    b.resume_writing()
    assert b"".join(ta.written) == b"".join(tb.written)


async def test_send_payloads_overflow_is_reported() -> None:
    owner = _Owner()
    chan, _t = open_channel(owner)
    chan.max_queue_cells = 10
    chan.pause_writing()
    chan.send_payloads(9, CellCommand.RELAY, [bytes(509)] * 11)
    assert owner.overflow == [9] and chan.queued_cells(9) == 0


# -- relay circuits: runs == per cell ---------------------------------------------------------


class _RecChan:
    """A channel stand-in that records every cell sent (both APIs), in order."""

    _ids = iter(range(1000, 10**6))

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.circuits: dict = {}
        self.cells: list[tuple[int, int, bytes]] = []
        self.closed = False
        self.peer = None

    def send_cell(self, circ_id, command, payload=b"") -> None:
        self.cells.append((circ_id, int(command), bytes(payload)))

    def send_payloads(self, circ_id, command, payloads) -> None:
        for p in payloads:
            assert len(p) == RELAY_BODY_LEN
            self.cells.append((circ_id, int(command), bytes(p)))

    def queued_cells(self, circ_id=None) -> int:
        return 0

    def drop_queue(self, circ_id) -> None:
        pass

    def flush(self) -> None:
        pass


def _relay_stub():
    return SimpleNamespace(exit=SimpleNamespace(close_all=lambda c: None, handle=lambda *a: None),
                           circuit_closed=lambda c, r: None)


def _or_circuit(k: bytes) -> tuple[OrCircuit, _RecChan, _RecChan]:
    prev, nxt = _RecChan(), _RecChan()
    circ = OrCircuit(_relay_stub(), prev, 0x80000001, RelayCrypto(k))
    circ.next_chan, circ.next_id = nxt, 77  # type: ignore[assignment]
    nxt.circuits[77] = circ
    return circ, prev, nxt


def _run_bytes(cid: int, cells: list[tuple[int, bytes]]) -> bytes:
    return b"".join(encode_fixed(cid, cmd, ct) for cmd, ct in cells)


async def test_middle_relay_runs_equal_per_cell_handling() -> None:
    rng = random.Random(12)
    ks = keys(13)
    client = ClientCrypto()
    for k in ks:
        client.add_hop(k)
    fwd = []
    n_exit = 0
    for i in range(N_CELLS):
        hop = 1 if rng.random() < 0.05 else 2  # a few DROP cells for this relay (hop 1)
        cmd = RelayCommand.DROP if hop == 1 else RelayCommand.DATA
        n_exit += hop == 2
        ct, _ = client.originate(body(rng, cmd, 0 if hop == 1 else 1), hop)
        early = CellCommand.RELAY_EARLY if i in (3, 4, 9) else CellCommand.RELAY
        fwd.append((int(early), ct))
    # hop 0 strips its layer first (per cell), then we compare hop 1's two paths
    guard = RelayCrypto(ks[0])
    at_middle = [(cmd, guard.decrypt_forward(ct)[1]) for cmd, ct in fwd]
    a, a_prev, a_next = _or_circuit(ks[1])
    b, b_prev, b_next = _or_circuit(ks[1])
    data = _run_bytes(a.prev_id, at_middle)
    for i in range(0, len(at_middle), 500):
        n = min(500, len(at_middle) - i)
        a.relay_run(a_prev, data, i * CELL_LEN, n)
    for cmd, ct in at_middle:
        b.handle_cell(b_prev, Cell(b.prev_id, cmd, ct))
    assert not a.closed and not b.closed
    assert a_next.cells == b_next.cells
    assert len(a_next.cells) == n_exit  # every cell not for this hop went on, DROPs stayed
    assert {cmd for _c, cmd, _p in a_next.cells} == {CellCommand.RELAY, CellCommand.RELAY_EARLY}
    assert a.crypto.forward_digest == b.crypto.forward_digest
    assert a.cells_forward == b.cells_forward
    # backward: cells from the next hop get our layer, in order
    back = [(int(CellCommand.RELAY), rng.randbytes(RELAY_BODY_LEN)) for _ in range(N_CELLS)]
    data = _run_bytes(77, back)
    for i in range(0, N_CELLS, 333):
        a.relay_run(a_next, data, i * CELL_LEN, min(333, N_CELLS - i))
    for cmd, ct in back:
        b.handle_cell(b_next, Cell(77, cmd, ct))
    assert a_prev.cells == b_prev.cells and len(a_prev.cells) == N_CELLS
    assert a.cells_backward == b.cells_backward


async def test_relay_run_violations_match_per_cell() -> None:
    rng = random.Random(14)
    (k,) = keys(15, 1)
    # ninth RELAY_EARLY: the cells before it are forwarded, then DESTROY(PROTOCOL)
    cells = [(int(CellCommand.RELAY_EARLY), rng.randbytes(RELAY_BODY_LEN)) for _ in range(12)]
    a, a_prev, a_next = _or_circuit(k)
    b, b_prev, b_next = _or_circuit(k)
    a.relay_run(a_prev, _run_bytes(a.prev_id, cells), 0, len(cells))
    for cmd, ct in cells:
        b.handle_cell(b_prev, Cell(b.prev_id, cmd, ct))
    assert a.closed and b.closed
    assert a_next.cells == b_next.cells and a_prev.cells == b_prev.cells
    # RELAY_EARLY toward the client in the middle of a backward run
    cells = [(int(CellCommand.RELAY), rng.randbytes(RELAY_BODY_LEN)) for _ in range(5)]
    cells.insert(3, (int(CellCommand.RELAY_EARLY), rng.randbytes(RELAY_BODY_LEN)))
    a, a_prev, a_next = _or_circuit(k)
    b, b_prev, b_next = _or_circuit(k)
    a.relay_run(a_next, _run_bytes(77, cells), 0, len(cells))
    for cmd, ct in cells:
        b.handle_cell(b_next, Cell(77, cmd, ct))
    assert a.closed and b.closed
    assert a_prev.cells == b_prev.cells and a_next.cells == b_next.cells


async def test_exit_batched_packaging_equals_per_cell_emit() -> None:
    rng = random.Random(16)
    (k,) = keys(17, 1)
    payload = rng.randbytes(700_000)
    results = []
    for batched in (True, False):
        sizes = random.Random(99)  # the same writes for both paths
        circ, prev, _nxt = _or_circuit(k)
        circ.next_chan = None
        emit = circ.send_back if batched else (lambda c, s, d, _c=circ: _c.send_back(c, s, d))
        stream = EdgeStream(5, emit=emit, circ_can_send=circ.can_package, sink=lambda d: None,
                            state=StreamState.OPEN)
        assert (stream._emit_data is not None) == batched
        circ.streams[5] = stream
        pos = 0
        while pos < len(payload):  # writes of odd sizes, SENDMEs as a client would send them
            n = sizes.randrange(1, 100_000)
            stream.write(payload[pos:pos + n])
            pos += n
            stream.package.window = 500
            while circ.package.window < 1000 - 100 and circ.package._digests:
                circ.package.on_sendme(circ.package._digests[0])
        stream.package.window = 500
        stream.finish(6)
        results.append((prev.cells, circ.crypto.backward_digest, stream.bytes_sent))
    assert len(results[0][0]) == len(results[1][0])
    assert results[0][2] == results[1][2]
    assert results[0] == results[1]
    # and the client reads back exactly the payload
    client = ClientCrypto()
    client.add_hop(k)
    data = b""
    for _cid, _cmd, ct in results[0][0]:
        _hop, plain, _d = client.decrypt_inbound(ct)
        if plain[0] == RelayCommand.DATA:
            n = struct.unpack_from(">H", plain, 9)[0]
            data += plain[11:11 + n]
    assert data == payload


# -- the client: runs == per cell ------------------------------------------------------------


def _client_circuit(ks: list[bytes]):
    chan = _RecChan()
    chan.new_circ_id = lambda: 0x80000009  # type: ignore[attr-defined]
    hop = SimpleNamespace(nickname="x")
    circ = ClientCircuit(OnionClient(), chan, [hop, hop, hop])  # type: ignore[arg-type]
    for k in ks:
        circ._add_hop(k)
    circ.state = "built"
    reader = asyncio.StreamReader(limit=2**16)
    proto = asyncio.StreamReaderProtocol(reader)
    t = StreamTransport(circ, "x", 1)
    t.connected = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
    t.connected.set_result(None)
    edge = EdgeStream(1, emit=circ.send_relay, circ_can_send=circ.package.can_send, sink=t._sink,
                      sink_ready=t._sink_ready, pause_source=t._pause_source, resume_source=t._resume_source,
                      conn=t, state=StreamState.OPEN)
    edge.hop = len(ks) - 1  # opened to the last hop
    t.edge, t.protocol = edge, proto
    t._attach_reader(reader, 2**16)
    circ.streams[1] = edge
    proto.connection_made(t)
    return circ, chan, reader


async def test_client_runs_equal_per_cell_handling() -> None:
    rng = random.Random(18)
    ks = keys(19)
    exit_ = [RelayCrypto(k) for k in ks]
    a, a_chan, a_reader = _client_circuit(ks)
    b, b_chan, b_reader = _client_circuit(ks)
    for _round in range(12):
        # the exit sends what the windows allow, as DATA cells (and a DROP now and then)
        cells = []
        for _ in range(400):
            if rng.random() < 0.02:
                ct, _ = exit_[2].originate_backward(body(rng, RelayCommand.DROP, 0))
            else:
                ct, _ = exit_[2].originate_backward(body(rng, RelayCommand.DATA, 1, rng.randrange(1, 499)))
            cells.append(exit_[0].encrypt_backward(exit_[1].encrypt_backward(ct)))
        data = _run_bytes(a.circ_id, [(int(CellCommand.RELAY), c) for c in cells])
        i = 0
        while i < len(cells):
            k = rng.randrange(1, 120)
            a.relay_run(a_chan, data, i * CELL_LEN, min(k, len(cells) - i))
            i += k
        for c in cells:
            b.handle_cell(b_chan, Cell(b.circ_id, CellCommand.RELAY, c))
        assert a.state == b.state == "built"
        # the application reads everything, which resumes reading and releases SENDMEs
        for reader in (a_reader, b_reader):
            if len(reader._buffer):
                await reader.readexactly(len(reader._buffer))
        await asyncio.sleep(0)
        # the SENDMEs the client sent back, byte for byte and in order
        assert a_chan.cells == b_chan.cells
    assert a.bytes_received == b.bytes_received
    assert a.deliver.window == b.deliver.window
    assert a.streams[1].deliver.window == b.streams[1].deliver.window
    assert [a.crypto.backward_digest(i) for i in range(3)] == [b.crypto.backward_digest(i) for i in range(3)]
    assert any(cmd == CellCommand.RELAY for _c, cmd, _p in a_chan.cells)  # SENDMEs were sent


async def test_client_run_with_bad_cell_closes_like_per_cell() -> None:
    rng = random.Random(20)
    ks = keys(21)
    exit_ = [RelayCrypto(k) for k in ks]
    a, a_chan, _a_reader = _client_circuit(ks)
    b, b_chan, _b_reader = _client_circuit(ks)
    cells = []
    for _ in range(30):
        ct, _ = exit_[2].originate_backward(body(rng, RelayCommand.DATA, 1, 100))
        cells.append(exit_[0].encrypt_backward(exit_[1].encrypt_backward(ct)))
    bad = bytearray(cells[20])
    bad[50] ^= 4
    cells[20] = bytes(bad)
    a.relay_run(a_chan, _run_bytes(a.circ_id, [(int(CellCommand.RELAY), c) for c in cells]), 0, 30)
    for c in cells:
        if b.state != "built":
            break
        b.handle_cell(b_chan, Cell(b.circ_id, CellCommand.RELAY, c))
    assert a.state == b.state == "closed" and a.close_reason == b.close_reason == "PROTOCOL"
    assert a_chan.cells == b_chan.cells
    assert a.bytes_received == b.bytes_received == 20 * 100
