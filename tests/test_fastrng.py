"""The padding generator (onionp2p/proto/fastrng.py): tor's crypto_fast_rng construction.

Checked against ChaCha20 from ``cryptography`` directly: the output is ChaCha20 keystream,
16 KiB under each key, every key from the OS; a forked child does not repeat its parent's
bytes. Relay cells take their padding from it.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from onionp2p.proto import fastrng
from onionp2p.proto.relaycell import PAYLOAD_LEN, V1_DATA_OFFSET, pack_relay, pack_relay_v1


def _chacha(key: bytes, n: int) -> bytes:
    return Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(n))


def test_keystreams_of_16_kib_each_under_a_fresh_key_from_the_os(monkeypatch):
    seeds = [bytes([i]) * 32 for i in range(1, 7)]
    monkeypatch.setattr(fastrng, "_urandom", lambda n: seeds.pop(0)[:n])
    rng = fastrng.FastRng()
    block = fastrng._BLOCK
    out = rng.random(3 * block + 100)  # three whole keystreams and a little of a fourth, in one call
    want = b"".join(_chacha(bytes([i]) * 32, block) for i in range(1, 5))
    assert out == want[:len(out)]
    # small calls continue where the big one stopped
    assert rng.random(10) + rng.random(0) + rng.random(5) == want[len(out):len(out) + 15]
    assert len(seeds) == 2  # four keys so far, one per keystream
    with pytest.raises(ValueError):
        rng.random(-1)


def test_a_new_key_for_every_keystream(monkeypatch):
    calls = []
    real = os.urandom

    def counted(n):
        calls.append(n)
        return real(n)

    monkeypatch.setattr(fastrng, "_urandom", counted)
    rng = fastrng.FastRng()
    first = [rng.random(470) for _ in range(fastrng._BLOCK // 470)]
    assert calls == [32] and len(set(first)) == len(first)
    left = fastrng._BLOCK - 470 * len(first)
    rng.random(left)  # the rest of the first keystream: no new key yet
    assert calls == [32]
    rng.random(1)
    assert calls == [32] * 2
    rng.random(2 * fastrng._BLOCK)
    assert calls == [32] * 4


def test_a_forked_child_does_not_repeat_its_parents_bytes():
    fastrng.padding_bytes(1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bytes
        try:
            os.write(w, fastrng.padding_bytes(64))
        finally:
            os._exit(0)
    os.close(w)
    child = b""
    while len(child) < 64:
        chunk = os.read(r, 64)
        if not chunk:
            break
        child += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 64
    assert child != fastrng.padding_bytes(64)


def test_relay_cells_are_padded_from_it(monkeypatch):
    marker = b"\xa5" * PAYLOAD_LEN
    monkeypatch.setattr("onionp2p.proto.relaycell.padding_bytes", lambda n: marker[:n])
    sendme = b"\x01\x00\x10" + bytes(16)  # a v1 SENDME: tag 16 | command | length 2 | data 19
    v1 = pack_relay_v1(5, 0, sendme)
    end = V1_DATA_OFFSET - 2 + len(sendme)  # (no stream ID on a circuit message)
    assert bytes(v1[end:end + 4]) == bytes(4) and bytes(v1[end + 4:]) == marker[:PAYLOAD_LEN - end - 4]
    v0 = pack_relay(2, 1, b"hello")
    assert len(v0) == PAYLOAD_LEN and bytes(v0[11 + 5:11 + 9]) == bytes(4)
    assert bytes(v0[11 + 9:]) == marker[:PAYLOAD_LEN - 20]
    # a full cell has no padding
    assert bytes(pack_relay(2, 1, b"z" * 498)).count(b"\xa5") == 0
