"""Inputs the atheris harnesses (tests/fuzz/) found, kept as regression tests.

Each finding is kept twice: as a direct test of the decoder that was wrong (runs without
atheris), and as the raw harness input, replayed through the harness when atheris is
installed, so that the very input that crashed keeps passing. How a crash becomes an
entry here: specs/fuzzing.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from onionp2p.errors import ProtocolError
from onionp2p.proto.relaycell import RELAY_HEADER_LEN, Begin, parse_message, unpack_relay

FUZZ = Path(__file__).resolve().parent / "fuzz"

# harness -> {name: raw input as the fuzzer wrote it}
FOUND = {
    "cells": {
        # relay target, RELAY_BEGIN "#[::1]:443": decoded to Begin('#[::1]', 443), which
        # encode() wrote as "[#[::1]]:443", which no decoder accepts (round-trip check).
        "begin-colon-in-hostname": bytes.fromhex("01000000010000000000" "0e" "235b3a3a315d3a343433" "00000000" "050a"),
    },
    "socks": {},
}


def _body(command: int, data: bytes) -> bytes:
    return (bytes((command, 0, 0, 0, 1, 0, 0, 0, 0)) + len(data).to_bytes(2, "big") + data).ljust(509, b"\0")


def test_the_recorded_begin_input_is_rejected():
    raw = FOUND["cells"]["begin-colon-in-hostname"]
    command, stream_id, data = unpack_relay(raw[:-1].ljust(509, b"\0"))  # last byte: the target number
    assert (command, stream_id, data) == (1, 1, b"#[::1]:443\0\0\0\0")
    with pytest.raises(ProtocolError, match="colon"):
        parse_message(command, data)


@pytest.mark.parametrize("address", [b"#[::1]:443", b"a:b:80", b"::1:80", b"2001:db8::1:443", b"host:name:80"])
def test_begin_rejects_a_colon_outside_brackets(address):
    with pytest.raises(ProtocolError):
        parse_message(*unpack_relay(_body(1, address + b"\0"))[::2])


@pytest.mark.parametrize("host, port", [("::1", 443), ("2001:db8::1", 80), ("example.com", 80), ("127.0.0.1", 8000)])
def test_begin_round_trips_what_it_accepts(host, port):
    encoded = Begin(host, port).encode()
    msg = parse_message(1, encoded)
    assert (msg.host, msg.port) == (host, port)
    assert parse_message(1, msg.encode()) == msg
    assert len(encoded) <= 509 - RELAY_HEADER_LEN


@pytest.mark.parametrize("harness", sorted(name for name, found in FOUND.items() if found))
def test_recorded_inputs_pass_the_harness(harness, tmp_path):
    if subprocess.run([sys.executable, "-c", "import atheris"], capture_output=True).returncode != 0:
        pytest.skip("atheris is not importable; install the test extras: pip install -e '.[test]'")
    files = []
    for name, data in FOUND[harness].items():
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    proc = subprocess.run([sys.executable, str(FUZZ / f"fuzz_{harness}.py"), *files], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for f in files:
        assert f"Executed {f}" in log, log[-4000:]
    assert not list(tmp_path.glob("crash-*"))
