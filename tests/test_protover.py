"""Subprotocol versions: proto lines in our documents, tor's "pr" lines, what we advertise."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onionp2p.errors import ProtocolError
from onionp2p.proto import protover
from onionp2p.proto.directory import RelayInfo


def test_parse_and_format():
    line = "Cons=1-2 Desc=1-3 FlowCtrl=1-2 Link=1-5 LinkAuth=1,3 Relay=1-4"
    parsed = protover.parse(line)
    assert parsed["LinkAuth"] == {1, 3} and parsed["Relay"] == {1, 2, 3, 4}
    assert protover.format_protocols(parsed) == line
    assert protover.supports(line, "Relay", 4) and not protover.supports(line, "Relay", 5)
    assert not protover.supports(line, "HSDir", 2)
    assert protover.parse("") == {}


@pytest.mark.parametrize("bad", ["Relay", "Relay=1-", "Relay=x", "Relay=4-2", "Relay=64", "Re lay=1",
                                 "Relay=1 Relay=2", "=1", " ".join(f"P{i}=1" for i in range(65))])
def test_malformed_lines_are_refused(bad):
    with pytest.raises(ProtocolError):
        protover.parse(bad)
    assert not protover.supports(bad, "Relay", 1)


@given(st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,8}", fullmatch=True),
                       st.sets(st.integers(0, 63), min_size=1), max_size=10))
def test_round_trip(protocols):
    line = protover.format_protocols(protocols)
    assert protover.parse(line) == {k: frozenset(v) for k, v in protocols.items()}


def test_what_we_advertise_names_the_handshakes_we_speak():
    assert protover.supports(protover.SUPPORTED, "Relay", 2)  # ntor
    assert protover.supports(protover.SUPPORTED, "Relay", 4)  # ntor-v3
    assert protover.format_protocols(protover.parse(protover.SUPPORTED)) == protover.SUPPORTED


def test_relay_info_carries_its_protocols(tmp_path):
    info = RelayInfo("r", "127.0.0.1", 9001, bytes(20), bytes(32), bytes(32), protocols="Relay=2-4")
    info.save(tmp_path / "r.json")
    again = RelayInfo.load(tmp_path / "r.json")
    assert again == info and again.supports("Relay", 4)
    bad = info.to_dict() | {"protocols": "Relay=9-1"}
    with pytest.raises(ProtocolError):
        RelayInfo.from_dict(bad)
