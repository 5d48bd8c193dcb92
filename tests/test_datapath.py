"""The batched data path produces exactly the bytes of the per-cell protocol (specs/performance.md).

There is one data path — runs of cells — and every batched or coalesced operation in it
is checked against the plain one-cell-at-a-time protocol over thousands of cells: batched
crypto against per-cell crypto, the channel's whole-read framing
(:meth:`CellReader.frames`) against :meth:`CellReader.next_cell`, ``send_payloads``
against ``send_cell`` (coalesced writes against the concatenation of the cells), the
circuit cores fed runs of many cells against the same cores fed one cell at a time, and
the exit's batched packaging against per-cell ``originate_backward`` of each DATA cell.
No timing is asserted here: benchmarks live in tools/bench.
"""

from __future__ import annotations

import random
import struct
from types import SimpleNamespace

import pytest

from onionp2p.errors import DigestMismatch
from onionp2p.net.channel import Channel
from onionp2p.proto import circuit as core
from onionp2p.proto.cells import CELL_LEN, CellCommand, CellReader, encode_fixed, encode_var
from onionp2p.proto.relaycell import Begin, RelayCommand, pack_relay
from onionp2p.proto.relaycrypto import KEY_MATERIAL_LEN, RELAY_BODY_LEN, ClientCrypto, RelayCrypto
from onionp2p.proto.stream import StreamState

N_CELLS = 3000


@pytest.fixture(autouse=True)
def fixed_padding(monkeypatch):
    """Relay cells are padded with random bytes; make them predictable so that two paths
    that build the same cells can be compared byte for byte."""
    from onionp2p.proto import relaycell
    monkeypatch.setattr(relaycell, "padding_bytes", lambda n: random.Random(n).randbytes(n))


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


async def test_channel_whole_read_framing_equals_cellreader() -> None:
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
    chan.circuits[0x80000002] = _RunCircuit(log)
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


class _SendmeCircuit:
    """Answers every run of cells with one cell it wants flushed at once (a SENDME)."""

    def __init__(self, cid: int) -> None:
        self.cid = cid

    def relay_run(self, chan, data, start, count) -> None:
        chan.send_payloads(self.cid, CellCommand.RELAY, [bytes([self.cid & 0xFF]) * 509])
        chan.flush()

    def handle_cell(self, chan, cell) -> None:
        pass

    def channel_closed(self, chan) -> None:
        pass


async def test_flushes_asked_for_during_one_read_are_one_write() -> None:
    """SENDMEs of many circuits answered from one socket read leave in one write, right
    after the read's last cell (not one TLS record per SENDME, and not a loop turn later)."""
    chan, t = open_channel()
    cids = [0x80000001 + i for i in range(8)]
    for cid in cids:
        chan.circuits[cid] = _SendmeCircuit(cid)
    read = b"".join(encode_fixed(cid, CellCommand.RELAY, bytes(509)) for cid in cids for _ in range(2))
    chan.data_received(read)
    assert len(t.written) == 1  # written before data_received returned
    assert t.written[0] == b"".join(encode_fixed(cid, CellCommand.RELAY, bytes([cid & 0xFF]) * 509)
                                    for cid in cids)
    chan.flush()  # outside a read: at once, as before
    chan.send_payloads(cids[0], CellCommand.RELAY, [bytes(509)])
    chan.flush()
    assert len(t.written) == 2


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


# -- the relay core: runs of many cells == runs of one -------------------------------------------


def relay_core(k: bytes, *, has_next: bool = True) -> core.RelayCircuit:
    c = core.RelayCircuit(RelayCrypto(k), own_rsa_id=bytes(20), allow_private=True)
    c.has_next = has_next
    return c


def run_bytes(cells: list[tuple[int, bytes]], cid: int = 0x80000001) -> bytes:
    return b"".join(encode_fixed(cid, cmd, ct) for cmd, ct in cells)


def feed(method, cells: list[tuple[int, bytes]], sizes: random.Random | None) -> list:
    """Feed ``cells`` to a core method in runs (random sizes) or one at a time (None)."""
    data = run_bytes(cells)
    actions, i = [], 0
    while i < len(cells):
        n = 1 if sizes is None else sizes.randrange(1, 400)
        actions += method(data, i * CELL_LEN, min(n, len(cells) - i), 0.0)
        i += n
    return actions


def sent(actions: list, kind=(core.ToPrev, core.ToNext, core.Send)) -> list[tuple[str, int, bytes]]:
    """Every cell the actions send, in order: (action, command, payload)."""
    return [(type(a).__name__, a.command, bytes(p)) for a in actions if isinstance(a, kind) for p in a.payloads]


def test_middle_relay_runs_equal_cells_one_by_one() -> None:
    rng = random.Random(12)
    ks = keys(13)
    client = ClientCrypto()
    for k in ks:
        client.add_hop(k)
    fwd = []
    n_exit = 0
    for i in range(N_CELLS):
        hop = 1 if rng.random() < 0.05 else 2  # a few DROP cells for this relay (hop 1)
        n_exit += hop == 2
        cmd = RelayCommand.DROP if hop == 1 else RelayCommand.DATA
        ct, _ = client.originate(body(rng, cmd, 0 if hop == 1 else 1), hop)
        fwd.append((int(CellCommand.RELAY_EARLY if i in (3, 4, 9) else CellCommand.RELAY), ct))
    guard = RelayCrypto(ks[0])  # hop 0 strips its layer first, then hop 1 is compared
    at_middle = [(cmd, guard.decrypt_forward(ct)[1]) for cmd, ct in fwd]
    a, b = relay_core(ks[1]), relay_core(ks[1])
    got_a = feed(a.receive_forward, at_middle, random.Random(1))
    got_b = feed(b.receive_forward, at_middle, None)
    assert not a.closed and not b.closed
    assert sent(got_a) == sent(got_b)
    assert len(sent(got_a)) == n_exit  # every cell not for this hop went on, the DROPs stayed
    assert {cmd for _k, cmd, _p in sent(got_a)} == {CellCommand.RELAY, CellCommand.RELAY_EARLY}
    assert a.crypto.forward_digest == b.crypto.forward_digest and a.cells_forward == b.cells_forward
    # backward: cells from the next hop get our layer, in order
    back = [(int(CellCommand.RELAY), rng.randbytes(RELAY_BODY_LEN)) for _ in range(N_CELLS)]
    got_a = feed(a.receive_backward, back, random.Random(2))
    got_b = feed(b.receive_backward, back, None)
    assert sent(got_a) == sent(got_b) and len(sent(got_a)) == N_CELLS
    assert a.cells_backward == b.cells_backward


def test_relay_violations_in_a_run_match_one_by_one() -> None:
    rng = random.Random(14)
    (k,) = keys(15, 1)
    # the ninth RELAY_EARLY: the cells before it are forwarded, then DESTROY(PROTOCOL)
    cells = [(int(CellCommand.RELAY_EARLY), rng.randbytes(RELAY_BODY_LEN)) for _ in range(12)]
    a, b = relay_core(k), relay_core(k)
    got_a, got_b = feed(a.receive_forward, cells, random.Random(3)), feed(b.receive_forward, cells, None)
    assert a.closed and b.closed
    assert sent(got_a) == sent(got_b) and len(sent(got_a)) == 8
    assert [type(x).__name__ for x in got_a if not isinstance(x, core.ToNext)] == ["DetachNext", "Destroyed"]
    # RELAY_EARLY toward the client in the middle of a backward run
    cells = [(int(CellCommand.RELAY), rng.randbytes(RELAY_BODY_LEN)) for _ in range(5)]
    cells.insert(3, (int(CellCommand.RELAY_EARLY), rng.randbytes(RELAY_BODY_LEN)))
    a, b = relay_core(k), relay_core(k)
    got_a, got_b = feed(a.receive_backward, cells, random.Random(4)), feed(b.receive_backward, cells, None)
    assert a.closed and b.closed
    assert sent(got_a) == sent(got_b) and len(sent(got_a)) == 3


def test_exit_batched_packaging_equals_per_cell_originate() -> None:
    """What an exit packages from a stream's source is, byte for byte, one
    ``originate_backward(DATA cell)`` per 498-byte chunk, whatever the writes' sizes."""
    rng = random.Random(16)
    (k,) = keys(17, 1)
    payload = rng.randbytes(700_000)
    c = relay_core(k, has_next=False)
    c.streams[5] = stream = core.Stream(5, c.layer, StreamState.OPEN)
    ref = RelayCrypto(k)
    out: list = []
    pos = 0
    sizes = random.Random(99)
    while pos < len(payload) or stream.buf:
        c.room = 1 << 30  # the shell's channel takes all (it is not blocked)
        if pos < len(payload):
            n = sizes.randrange(1, 100_000)
            out += c.stream_write(5, payload[pos:pos + n])
            pos += n
        # the client's SENDMEs, as it would send them: every stream window, every 100 cells
        stream.package.window = 500
        while c.layer.package.window <= 1000 - 100 and c.layer.package._digests:
            c.layer.package.on_sendme(c.layer.package._digests[0])
        out += c.pump()
    out += c.stream_eof(5, 6)
    cells = [p for _k, _cmd, p in sent(out)]
    # read them back as the client does: exactly the payload, then END(DONE) ...
    client = ClientCrypto()
    client.add_hop(k)
    messages = []
    for ct in cells:
        _hop, plain, _d = client.decrypt_inbound(ct)
        n = struct.unpack_from(">H", plain, 9)[0]
        messages.append((plain[0], bytes(plain[11:11 + n])))
    assert b"".join(m for cmd, m in messages if cmd == RelayCommand.DATA) == payload
    assert messages[-1] == (RelayCommand.END, bytes((6,)))
    assert all(cmd == RelayCommand.DATA for cmd, _m in messages[:-1])
    # ... and each cell is, byte for byte, the per-cell protocol's cell for its message
    expected = [ref.originate_backward(pack_relay(cmd, 5, m))[0] for cmd, m in messages]
    assert cells == expected
    assert c.crypto.backward_digest == ref.backward_digest
    assert sum(len(m) == 498 for _c, m in messages) > 0.9 * len(messages)  # mostly full cells


# -- the client core: runs of many cells == runs of one ----------------------------------------------


def client_core(ks: list[bytes]) -> tuple[core.ClientCircuit, int]:
    """A built client core over ``ks`` (no handshakes) with one open stream to the last hop."""
    hop = SimpleNamespace(nickname="x")
    c = core.ClientCircuit([hop] * len(ks))
    for k in ks:
        c.add_layer(k)
    c._next_sid = 1
    sid, _ = c.open_stream(int(RelayCommand.BEGIN), b"x:1\0")
    c.streams[sid].state = StreamState.OPEN
    return c, sid


def test_client_runs_equal_cells_one_by_one() -> None:
    rng = random.Random(18)
    ks = keys(19)
    relays = [RelayCrypto(k) for k in ks]
    a, sid = client_core(ks)
    b, _ = client_core(ks)
    got_a, got_b = [], []
    for _round in range(12):
        # the exit sends what the windows allow, as DATA cells (and a DROP now and then)
        cells = []
        for _ in range(400):
            if rng.random() < 0.02:
                ct, _ = relays[2].originate_backward(body(rng, RelayCommand.DROP, 0))
            else:
                ct, _ = relays[2].originate_backward(body(rng, RelayCommand.DATA, sid, rng.randrange(1, 499)))
            cells.append((int(CellCommand.RELAY), relays[0].encrypt_backward(relays[1].encrypt_backward(ct))))
        got_a += feed(lambda d, s, n, now: a.receive_relay(d, s, n, now), cells, random.Random(_round))
        got_b += feed(lambda d, s, n, now: b.receive_relay(d, s, n, now), cells, None)
        assert a.state == b.state == "built"
    # the SENDMEs the client sent back, byte for byte and in order; the same data delivered
    assert sent(got_a) == sent(got_b) and sent(got_a)
    data_a = b"".join(x.data for x in got_a if isinstance(x, core.StreamData))
    data_b = b"".join(x.data for x in got_b if isinstance(x, core.StreamData))
    assert data_a == data_b and len(data_a) == a.bytes_received == b.bytes_received
    assert len([x for x in got_a if isinstance(x, core.StreamData)]) < len(
        [x for x in got_b if isinstance(x, core.StreamData)])  # one delivery per run, not per cell
    assert [ly.deliver.window for ly in a.layers] == [ly.deliver.window for ly in b.layers]
    assert a.streams[sid].deliver.window == b.streams[sid].deliver.window
    assert [a.crypto.backward_digest(i) for i in range(3)] == [b.crypto.backward_digest(i) for i in range(3)]


def test_client_run_with_bad_cell_closes_like_one_by_one() -> None:
    rng = random.Random(20)
    ks = keys(21)
    relays = [RelayCrypto(k) for k in ks]
    a, sid = client_core(ks)
    b, _ = client_core(ks)
    cells = []
    for _ in range(30):
        ct, _ = relays[2].originate_backward(body(rng, RelayCommand.DATA, sid, 100))
        cells.append((int(CellCommand.RELAY), relays[0].encrypt_backward(relays[1].encrypt_backward(ct))))
    bad = bytearray(cells[20][1])
    bad[50] ^= 4
    cells[20] = (cells[20][0], bytes(bad))
    got_a = a.receive_relay(run_bytes(cells), 0, 30, 0.0)
    got_b = []
    for i in range(30):
        got_b += b.receive_relay(run_bytes(cells[i:i + 1]), 0, 1, 0.0)
    assert a.state == b.state == "closed" and a.close_reason == b.close_reason == "PROTOCOL"
    assert sent(got_a) == sent(got_b)
    assert a.bytes_received == b.bytes_received == 20 * 100
    assert [type(x).__name__ for x in got_a][-1] == "Closed"


def test_client_sendmes_are_what_the_exit_expects() -> None:
    """The client core's circuit SENDMEs echo the exit's digests and its stream SENDMEs come
    every 50 cells: fed back to the exit core, they restore exactly the windows used."""
    rng = random.Random(22)
    (k,) = keys(23, 1)
    c = core.ClientCircuit([SimpleNamespace(nickname="x")])
    c.add_layer(k)
    exit_core = relay_core(k, has_next=False)
    exit_core.room = 1 << 30

    def to_exit(actions) -> list:
        cells = [(cmd, p) for _k, cmd, p in sent(actions)]
        return exit_core.receive_forward(run_bytes(cells), 0, len(cells), 0.0)

    def to_client(actions) -> list:
        cells = [(cmd, p) for _k, cmd, p in sent(actions)]
        return c.receive_relay(run_bytes(cells), 0, len(cells), 0.0)

    sid, begin = c.open_stream(int(RelayCommand.BEGIN), Begin("example.com", 80).encode())
    asked = to_exit(begin)
    assert [type(x) for x in asked] == [core.ExitBegin] and asked[0].begin.host == "example.com"
    opened = to_client(exit_core.exit_connected(sid, b""))
    assert [type(x) for x in opened] == [core.StreamConnected] and c.streams[sid].state is StreamState.OPEN
    data = rng.randbytes(498 * 250)
    actions = exit_core.stream_write(sid, data)  # 250 cells
    assert len(sent(actions)) == 250
    back = to_client(actions)
    assert len(sent(back)) == 2 + 5  # circuit SENDMEs at 100 and 200 cells, stream SENDMEs every 50
    assert b"".join(x.data for x in back if isinstance(x, core.StreamData)) == data
    to_exit(back)
    assert not exit_core.closed
    assert exit_core.layer.package.window == 1000 - 250 + 200
    assert exit_core.streams[sid].package.window == 500 - 250 + 250



# -- the shell: an exit packages again when its blocked link drains ------------------------------------


async def test_exit_packages_again_when_its_queue_drains() -> None:
    """While the link toward the client is blocked, an exit stream packages at most
    RELAY_QUEUE_ROOM cells into the circuit's queue and stops; when the link drains, the
    channel tells the circuit and the stream goes on by itself (no SENDME is due)."""
    from onionp2p.relay.circuit import OrCircuit

    (k,) = keys(24, 1)
    prev, transport = open_channel()
    relay = SimpleNamespace(keys=SimpleNamespace(rsa_id_digest=bytes(20)), exit=None,
                            config=SimpleNamespace(extend_allow_private=False, max_streams_per_circuit=10),
                            circuit_closed=lambda c, r: None)
    circ = OrCircuit(relay, prev, 0x80000001, RelayCrypto(k))
    circ.core.streams[3] = core.Stream(3, circ.core.layer, StreamState.OPEN)
    circ.conns[3] = SimpleNamespace(set_reading=lambda reading: None)
    prev.pause_writing()  # the peer stopped reading
    circ.stream_write(3, random.Random(5).randbytes(498 * 300))
    assert prev.queued_cells(0x80000001) == core.RELAY_QUEUE_ROOM and transport.written == []
    prev.resume_writing()  # the link drains: the queue goes out, and then the rest
    prev.flush()
    written = b"".join(transport.written)
    assert len(written) == 300 * CELL_LEN and prev.queued_cells() == 0
