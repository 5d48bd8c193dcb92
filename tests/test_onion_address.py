"""v3 onion addresses (onionp2p/proto/hs/address.py) against tor's vector and the spec's examples.

Vectors: tests/data/hs/vectors.json ("onion_address", "onion_address_examples"), sources named there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onionp2p.errors import OnionAddressChecksumError, OnionAddressError, OnionAddressMalformed
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.address import encode_onion_address, is_onion_name, onion_checksum, parse_onion_address

V = json.loads((Path(__file__).parent / "data" / "hs" / "vectors.json").read_text())
PUB = bytes.fromhex(V["onion_address"]["pubkey"])
ADDR = V["onion_address"]["address"]
LABEL = ADDR[:-len(".onion")]


def _edit(i: int, c: str) -> str:
    return LABEL[:i] + c + LABEL[i + 1:] + ".onion"


def test_tor_vector_encodes_and_decodes():
    assert encode_onion_address(PUB) == ADDR
    a = parse_onion_address(ADDR)
    assert a.pubkey == PUB and a.subdomain == "" and str(a) == ADDR and a.label == LABEL


@pytest.mark.parametrize("addr", V["onion_address_examples"]["addresses"])
def test_spec_examples_round_trip(addr):
    assert encode_onion_address(parse_onion_address(addr).pubkey) == addr


def test_case_trailing_dot_and_subdomain():
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(ADDR))
    assert parse_onion_address(mixed).pubkey == PUB
    assert parse_onion_address(ADDR + ".").pubkey == PUB
    sub = parse_onion_address("www.Blog." + ADDR)
    assert sub.pubkey == PUB and sub.subdomain == "www.blog"
    with pytest.raises(OnionAddressMalformed, match="subdomain"):
        parse_onion_address("www." + ADDR, allow_subdomain=False)


def test_random_keys_round_trip():
    import os
    for _ in range(20):
        pub = ExpandedKey.from_seed(os.urandom(32)).public
        assert parse_onion_address(encode_onion_address(pub)).pubkey == pub


def test_checksum_error_is_its_own_type():
    # the checksum sits in characters 51..55 (bits 256..271 of the 35 bytes)
    for i in (52, 53):
        c = "a" if LABEL[i] != "a" else "b"
        with pytest.raises(OnionAddressChecksumError):
            parse_onion_address(_edit(i, c))
    # the key changed but the checksum did not: also a checksum error
    with pytest.raises(OnionAddressChecksumError):
        parse_onion_address(_edit(0, "a" if LABEL[0] != "a" else "b"))


@pytest.mark.parametrize("host, why", [
    ("example.com", "not a .onion"),
    ("abc.onion", "56 base32"),
    ("aaaaaaaaaaaaaaaa.onion", "56 base32"),  # a v2 address
    ("1" * 56 + ".onion", "base32"),
    (LABEL[:55] + "e.onion", "version 4"),     # the version byte edited (Arti's case)
])
def test_malformed_is_not_a_checksum_error(host, why):
    with pytest.raises(OnionAddressMalformed, match=why) as info:
        parse_onion_address(host)
    assert not isinstance(info.value, OnionAddressChecksumError)
    assert isinstance(info.value, OnionAddressError)


def test_torsion_key_is_refused_even_with_a_right_checksum():
    """rend-spec-v3 §2.2.7: a key with a torsion component must not be accepted."""
    # A small-order point (order 8 generator of the torsion subgroup) with a valid checksum.
    torsion = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
    raw = torsion + onion_checksum(torsion) + b"\x03"
    import base64
    addr = base64.b32encode(raw).decode().lower() + ".onion"
    with pytest.raises(OnionAddressMalformed, match="not a valid Ed25519 key"):
        parse_onion_address(addr)


def test_is_onion_name():
    assert is_onion_name("x.ONION.") and is_onion_name(ADDR) and not is_onion_name("onion.example")
