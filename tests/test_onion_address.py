"""v3 onion addresses (onionp2p/proto/hs/address.py) against tor's vector and the spec's examples.

Vectors: tests/data/hs/vectors.json ("onion_address", "onion_address_examples"), sources named there.
"""

from __future__ import annotations

import asyncio
import json
import os
import time as _time
from pathlib import Path

import pytest

from onionp2p.client.node import ClientNode
from onionp2p.config import ClientConfig
from onionp2p.errors import OnionAddressChecksumError, OnionAddressError, OnionAddressMalformed
from onionp2p.proto.directory import RouterStatus
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.address import encode_onion_address, is_onion_name, onion_checksum, parse_onion_address
from onionp2p.proto.socks import Reply

from conftest import require_tool

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


# -- the SOCKS port's answer to .onion names, with real SOCKS clients against a real client node --------

BAD_CHECKSUM = _edit(53, "a" if LABEL[53] != "a" else "b")
NOT_V3 = "expyuzz4wqqyqhjn.onion"  # a (dead) v2 address


@pytest.fixture
async def onion_nodes(exit_relays, tmp_path):
    """Two running client nodes on the same relays: SOCKS port without and with ExtendedErrors."""
    statuses = [RouterStatus(r.info(), frozenset({"Exit", "Fast", "Guard", "Running", "Stable", "Valid", "V2Dir"}),
                             bandwidth=1000 + i) for i, r in enumerate(exit_relays)]
    nodes = []
    for name, ext in (("plain", False), ("extended", True)):
        cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=tmp_path / name,
                           socks_address=("127.0.0.1", 0), control_port=None, enforce_distinct_subnets=False,
                           preemptive_circuits=1, log_level="warning", socks_extended_errors=ext)
        node = ClientNode(cfg, routers=lambda: statuses)
        await node.start(ready_timeout=30)
        nodes.append(node)
    yield nodes
    for node in nodes:
        await node.stop()


async def _python_socks_code(port: int, host: str, version: str = "socks5") -> int | None:
    from python_socks import ProxyError
    from python_socks.async_.asyncio import Proxy
    proxy = Proxy.from_url(f"{version}://127.0.0.1:{port}", rdns=True)
    try:
        sock = await proxy.connect(host, 80, timeout=10)
    except ProxyError as exc:
        if exc.error_code is None:  # python-socks knows RFC 1928's codes only: "Invalid reply code: 0XF6"
            return int(str(exc).rsplit(" ", 1)[1], 16)
        return exc.error_code
    sock.close()
    return None


async def _curl(port: int, host: str, scheme: str = "socks5h") -> tuple[int, str]:
    require_tool("curl", "curl")
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-x", f"{scheme}://127.0.0.1:{port}", f"http://{host}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    return proc.returncode, err.decode()


async def test_socks_answers_onion_names_like_tor(onion_nodes):
    """tor 0.4.9 answers a bad address with 1 (F6 with ExtendedErrors); a valid one it cannot reach
    with 4 (F0: descriptor not found). We do the same, at once: a bad name never leaves the SOCKS
    port, and for a valid one the consensus of these relays lists no HSDir to ask."""
    plain, extended = (n.socks.port for n in onion_nodes)
    started = _time.monotonic()
    assert await _python_socks_code(plain, BAD_CHECKSUM) == Reply.GENERAL_FAILURE
    assert await _python_socks_code(plain, NOT_V3) == Reply.GENERAL_FAILURE
    assert await _python_socks_code(plain, ADDR) == Reply.HOST_UNREACHABLE
    assert await _python_socks_code(extended, BAD_CHECKSUM) == Reply.HS_BAD_ADDRESS == 0xF6
    assert await _python_socks_code(extended, NOT_V3) == Reply.HS_BAD_ADDRESS
    assert await _python_socks_code(extended, "www." + ADDR) == Reply.HS_DESC_NOT_FOUND == 0xF0
    assert await _python_socks_code(extended, "example.onion") == Reply.HS_BAD_ADDRESS
    # SOCKS4a has one failure code; extended errors are SOCKS5 only
    assert await _python_socks_code(extended, BAD_CHECKSUM, "socks4") == 0x5B
    assert _time.monotonic() - started < 5  # quick: no descriptor fetch, no timeout
    rc, err = await _curl(extended, BAD_CHECKSUM)  # curl shows the reply code in parentheses
    assert rc == 97 and err.rstrip().endswith("(246)"), err  # CURLE_PROXY, X'F6'
    rc, err = await _curl(extended, ADDR)
    assert rc == 97 and err.rstrip().endswith("(240)"), err  # X'F0'
    rc, err = await _curl(plain, ADDR)
    assert rc == 97 and err.rstrip().endswith("(4)"), err
    for node in onion_nodes:
        assert node.socks.stats.streams_ok == 0


async def test_socks_resolve_of_onion_names(onion_nodes):
    """RESOLVE (tor's 0xF0 extension) of a .onion: a bad address is refused like a CONNECT; a good
    one cannot be resolved (tor answers "host unreachable")."""
    plain, extended = (n.socks.port for n in onion_nodes)

    async def resolve(port: int, host: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            name = host.encode()
            writer.write(b"\x05\x01\x00" + b"\x05\xf0\x00\x03" + bytes([len(name)]) + name + b"\x00\x00")
            async with asyncio.timeout(10):
                got = await reader.readexactly(2 + 10)
            assert got[:2] == b"\x05\x00"
            return got[3]
        finally:
            writer.close()

    assert await resolve(extended, BAD_CHECKSUM) == 0xF6
    assert await resolve(plain, BAD_CHECKSUM) == Reply.GENERAL_FAILURE
    assert await resolve(plain, ADDR) == Reply.HOST_UNREACHABLE


def test_random_names_raise_only_typed_errors():
    import random
    rng = random.Random(6)
    alphabet = "abcdefghijklmnopqrstuvwxyz234567ABCXYZ0189.-_ \x00é"
    for _ in range(2000):
        label = "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 16, 55, 56, 57, rng.randrange(80)))))
        try:
            parse_onion_address(label + rng.choice((".onion", ".onion.", ".ONION", "")))
        except OnionAddressError:
            pass
