"""Tests for onionp2p.config."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onionp2p.config import (
    CONTROL_PORT_DEFAULT,
    AuthorityConfig,
    ClientConfig,
    RelayConfig,
    dump_config,
    format_hostport,
    load_authority_config,
    load_client_config,
    load_relay_config,
    parse_hostport,
)
from onionp2p.errors import ConfigError
from onionp2p.proto.exitpolicy import REJECT_ALL, ExitPolicy

FP = "0123456789ABCDEF0123456789ABCDEF01234567"
# Authority lines: NICKNAME HOST:DIRPORT ED25519_ID (unpadded base64 of a valid Ed25519 key)
ED1 = "Ii7WNIc/Os4gF/D5/F5+KRXpm6+mAiuoHKg8aePXCC0"
ED2 = "0zqzDE6Pz+VUSEYoKDFTvM3iRhyH3ZHOvf9RbA6yCVw"
AUTH1 = f"auth1 127.0.0.1:7000 {ED1}"
AUTH2 = f"auth2 [::1]:7001 {ED2}"


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# -- defaults ----------------------------------------------------------------------------
def test_relay_defaults_from_empty_file(tmp_path: Path) -> None:
    cfg = load_relay_config(write(tmp_path, ""))
    assert cfg.nickname == "Unnamed"
    assert cfg.data_dir == tmp_path.resolve() / "onionp2p-relay"
    assert cfg.or_address == ("127.0.0.1", 9001)
    assert cfg.exit_policy == REJECT_ALL
    assert not cfg.exit_policy.is_exit
    assert cfg.exit_reject_private is True
    assert cfg.bandwidth_rate == 1 << 30
    assert cfg.bandwidth_burst is None
    assert cfg.effective_bandwidth_burst == cfg.bandwidth_rate
    assert cfg.contact is None
    assert cfg.family == ()
    assert (cfg.log_level, cfg.log_format, cfg.safe_logging) == ("info", "console", True)
    assert cfg.control_port is None
    assert cfg.max_circuits_per_channel == 1000
    assert cfg.max_streams_per_circuit == 500
    assert cfg.onion_key_lifetime_days == 28


def test_dataclass_defaults_match_from_dict() -> None:
    assert RelayConfig.from_dict({}) == RelayConfig()
    assert ClientConfig.from_dict({}) == ClientConfig()
    assert AuthorityConfig.from_dict({}) == AuthorityConfig()


def test_client_and_authority_defaults(tmp_path: Path) -> None:
    c = load_client_config(write(tmp_path, ""))
    assert c.socks_address == ("127.0.0.1", 9050)
    assert c.control_port == CONTROL_PORT_DEFAULT and c.authorities == ()  # on: 9151, or any free port
    assert c.http_tunnel_port is None and c.dns_port is None
    assert c.data_dir == tmp_path.resolve() / "onionp2p-client"
    a = load_authority_config(write(tmp_path, ""))
    assert a.dir_address == ("127.0.0.1", 7000)
    assert a.or_address == ("127.0.0.1", 9001)
    assert a.nickname == "Unnamed"
    assert a.data_dir == tmp_path.resolve() / "onionp2p-authority"


# -- full files --------------------------------------------------------------------------
def test_full_relay_file(tmp_path: Path) -> None:
    text = f"""
nickname = "MyRelay01"
data_dir = "state/relay"
or_address = "[::1]:0"
exit_policy = ["accept *:80", "accept *:443, reject *:*"]
exit_reject_private = true
bandwidth_rate = 2000000
bandwidth_burst = 4000000
contact = "ops <ops@example.org>"
family = ["${FP}", "{FP.lower()}"]
log_level = "DEBUG"
log_format = "json"
safe_logging = false
control_port = 9051
max_circuits_per_channel = 10
max_streams_per_circuit = 20
onion_key_lifetime_days = 7
"""
    cfg = load_relay_config(write(tmp_path, text))
    assert cfg.nickname == "MyRelay01"
    assert cfg.data_dir == tmp_path.resolve() / "state" / "relay"
    assert cfg.or_address == ("::1", 0)
    assert cfg.exit_policy.summary() == "accept 80,443"
    assert not cfg.exit_policy.allows("127.0.0.1", 80)
    assert cfg.bandwidth_burst == 4000000
    assert cfg.contact == "ops <ops@example.org>"
    assert cfg.family == (FP, FP)
    assert (cfg.log_level, cfg.log_format, cfg.safe_logging) == ("debug", "json", False)
    assert cfg.control_port == 9051
    assert (cfg.max_circuits_per_channel, cfg.max_streams_per_circuit) == (10, 20)
    assert cfg.onion_key_lifetime_days == 7


def test_exit_policy_string_and_reject_private_off() -> None:
    cfg = RelayConfig.from_dict({"exit_policy": "accept 127.0.0.1:*", "exit_reject_private": False})
    assert cfg.exit_policy == ExitPolicy.parse("accept 127.0.0.1:*", reject_private=False)
    assert cfg.exit_policy.allows("127.0.0.1", 5000)
    on = RelayConfig.from_dict({"exit_policy": "accept 127.0.0.1:*"})
    assert not on.exit_policy.allows("127.0.0.1", 5000)


def test_client_and_authority_files(tmp_path: Path) -> None:
    c = load_client_config(write(tmp_path, 'socks_address = ":0"\ncontrol_port = 0\n'
                                 f'authorities = ["{AUTH1}"]\ndata_dir = "/abs/x"\n'))
    assert c.socks_address == ("127.0.0.1", 0)
    assert c.control_port == 0
    assert c.authorities == (AUTH1,)
    assert c.data_dir == Path("/abs/x")
    a = load_authority_config(write(tmp_path, 'nickname = "auth1"\ndir_address = "7001"\n'
                                    'or_address = "localhost:9101"\n'))
    assert a.nickname == "auth1"
    assert a.dir_address == ("127.0.0.1", 7001)
    assert a.or_address == ("localhost", 9101)


def test_relative_data_dir_resolves_against_file_dir(tmp_path: Path, monkeypatch) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    cfg_path = write(sub, 'data_dir = "../var/relay"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_relay_config(Path("etc") / "node.toml")
    assert cfg.data_dir == sub.resolve() / ".." / "var" / "relay"
    assert cfg.data_dir.resolve() == (tmp_path / "var" / "relay").resolve()
    assert cfg_path.exists()


def test_home_is_expanded(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = ClientConfig.from_dict({"data_dir": "~/onion"}, base_dir=Path("/elsewhere"))
    assert cfg.data_dir == tmp_path / "onion"


def test_from_dict_without_base_dir_keeps_relative_path() -> None:
    assert RelayConfig.from_dict({"data_dir": "x"}).data_dir == Path("x")


# -- errors ------------------------------------------------------------------------------
def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'exit_polcy = "accept *:*"\n')
    with pytest.raises(ConfigError) as exc:
        load_relay_config(path)
    assert "exit_polcy" in str(exc.value) and str(path) in str(exc.value)


def test_sections_are_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="relay: unknown key"):
        load_relay_config(write(tmp_path, "[relay]\nnickname = 'x'\n"))


def test_client_rejects_relay_only_key() -> None:
    with pytest.raises(ConfigError, match="nickname"):
        ClientConfig.from_dict({"nickname": "x"})
    with pytest.raises(ConfigError, match="socks_address"):
        AuthorityConfig.from_dict({"socks_address": "1"})


def test_bad_toml_is_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "nickname = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_relay_config(path)


def test_not_utf8_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "bin.toml"
    p.write_bytes(b'nickname = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_client_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_authority_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_relay_config(tmp_path)  # a directory


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("nickname", "", "1-19"),
        ("nickname", "a" * 20, "1-19"),
        ("nickname", "bad-name", "1-19"),
        ("nickname", "nämé", "1-19"),
        ("nickname", 5, "expected a string"),
        ("data_dir", "", "empty"),
        ("data_dir", 3, "expected a string"),
        ("data_dir", "a\nb", "control"),
        ("or_address", "127.0.0.1:65536", "out of range"),
        ("or_address", "127.0.0.1:x", "invalid port"),
        ("or_address", "::1:80", "IPv6"),
        ("or_address", 9001, "host:port"),
        ("exit_policy", "accept *:0", "accept *:0"),
        ("exit_policy", ["accept *:80", 3], "exit_policy[1]"),
        ("exit_policy", 1, "string or an array"),
        ("exit_reject_private", 1, "boolean"),
        ("exit_reject_private", "yes", "boolean"),
        ("bandwidth_rate", 0, "out of range"),
        ("bandwidth_rate", True, "expected an integer"),
        ("bandwidth_rate", 1.5, "expected an integer"),
        ("bandwidth_burst", 10, "smaller than bandwidth_rate"),
        ("contact", "a\nb", "control"),
        ("contact", ["x"], "expected a string"),
        ("family", FP, "array"),
        ("family", [FP, "nickname"], "family[1]"),
        ("family", [FP + "0"], "fingerprint"),
        ("log_level", "verbose", "log_level"),
        ("log_level", 1, "expected a string"),
        ("log_format", "xml", "console, json"),
        ("safe_logging", "false", "boolean"),
        ("control_port", 70000, "out of range"),
        ("control_port", -1, "out of range"),
        ("control_port", "9051", "integer"),
        ("max_circuits_per_channel", 0, "out of range"),
        ("max_streams_per_circuit", 65536, "out of range"),
        ("onion_key_lifetime_days", 0, "out of range"),
        ("onion_key_lifetime_days", 91, "out of range"),
        ("address", "relay.example.org", "not an IPv4 address"),
        ("address", "0.0.0.0", "connect to"),
        ("address", "2001:db8::1", "not an IPv4 address"),
        ("address", 3, "IPv4 address string"),
        ("assume_reachable", "yes", "boolean"),
        ("reachability_timeout", 0, "out of range"),
    ],
)
def test_relay_validation_errors(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        RelayConfig.from_dict({key: value}, source="relay.toml")
    msg = str(exc.value)
    assert msg.startswith("relay.toml: ") and key in msg and needle in msg


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("socks_address", "[::1]", "[ipv6]:port"),
        ("socks_address", "host:", "invalid port"),
        ("authorities", "a", "array"),
        ("authorities", [AUTH1, ""], "authorities[1]"),
        ("authorities", [1], "authorities[0]"),
        ("authorities", ["auth1 127.0.0.1:7000"], "NICKNAME HOST:DIRPORT"),
        ("authorities", [f"bad-nick 127.0.0.1:7000 {ED1}"], "nickname"),
        ("authorities", [f"a 127.0.0.1:0 {ED1}"], "DirPort"),
        ("authorities", [f"a 127.0.0.1:x {ED1}"], "port"),
        ("authorities", ["a 127.0.0.1:7000 notbase64!"], "base64"),
        ("authorities", ["a 127.0.0.1:7000 AAAA"], "32 bytes"),
        ("authorities", [AUTH1, f"other 127.0.0.1:7002 {ED1}"], "twice"),
        ("control_port", True, "integer"),
    ],
)
def test_client_validation_errors(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ClientConfig.from_dict({key: value}, source="client.toml")
    assert key in str(exc.value) and needle in str(exc.value)


def test_authority_validation_errors() -> None:
    with pytest.raises(ConfigError, match="dir_address"):
        AuthorityConfig.from_dict({"dir_address": "a b:1"})
    with pytest.raises(ConfigError, match="nickname"):
        AuthorityConfig.from_dict({"nickname": "x" * 40})


def test_from_dict_requires_a_table() -> None:
    with pytest.raises(ConfigError, match="table"):
        RelayConfig.from_dict(["nickname"])  # type: ignore[arg-type]


def test_error_from_file_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "max_streams_per_circuit = 0\n")
    with pytest.raises(ConfigError) as exc:
        load_relay_config(path)
    assert str(path) in str(exc.value) and "max_streams_per_circuit" in str(exc.value)


# -- parse_hostport ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9001", ("127.0.0.1", 9001)),
        ("[::1]:80", ("::1", 80)),
        ("[2001:DB8::0:1]:443", ("2001:db8::1", 443)),
        (":9050", ("127.0.0.1", 9050)),
        ("9050", ("127.0.0.1", 9050)),
        ("0", ("127.0.0.1", 0)),
        ("example.org:80", ("example.org", 80)),
        ("localhost.:1", ("localhost", 1)),
        (" 10.0.0.1:5 ", ("10.0.0.1", 5)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_parse_hostport_default_host() -> None:
    assert parse_hostport("80", default_host="0.0.0.0") == ("0.0.0.0", 80)
    assert parse_hostport(":80", default_host="::") == ("::", 80)


@pytest.mark.parametrize(
    "text",
    ["", ":", "host:", "1.2.3.4:65536", "1.2.3.4:-1", "::1", "::1:80", "[::1]", "[::1]80",
     "[nothex]:1", "[fe80::1%eth0]:1", "a b:1", "-bad:1", "bad_host:1", "1.2.3:80",
     "999.1.1.1:1", "host:+80", "host:٨٠", "[1.2.3.4]:80", "x" * 300 + ":1"],
)
def test_parse_hostport_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(text)


def test_parse_hostport_non_string() -> None:
    with pytest.raises(ConfigError):
        parse_hostport(80)  # type: ignore[arg-type]


hosts = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i))),
    st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i))),
    st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z]{2,6}){0,2}", fullmatch=True),
)


@given(hosts, st.integers(0, 65535))
def test_hostport_round_trip(host: str, port: int) -> None:
    assert parse_hostport(format_hostport(host, port)) == (host, port)


@given(st.integers(0, 65535))
def test_bare_port(port: int) -> None:
    assert parse_hostport(str(port)) == ("127.0.0.1", port)
    assert parse_hostport(f":{port}") == ("127.0.0.1", port)


@given(st.text(max_size=50) | st.text(alphabet="[]:.0123456789abcdef-", max_size=30))
def test_parse_hostport_fuzz_only_config_error(text: str) -> None:
    try:
        host, port = parse_hostport(text)
    except ConfigError:
        return
    assert 0 <= port <= 65535 and host


@given(st.dictionaries(st.text(max_size=10), st.one_of(st.none(), st.booleans(), st.integers(),
                                                        st.text(max_size=10),
                                                        st.lists(st.text(max_size=5), max_size=3)),
                       max_size=4))
def test_from_dict_fuzz_only_config_error(d: dict) -> None:
    for cls in (RelayConfig, ClientConfig, AuthorityConfig):
        try:
            cls.from_dict(d)
        except ConfigError:
            pass


def test_client_circuit_keys_defaults_and_validation():
    cfg = ClientConfig.from_dict({})
    assert cfg.preemptive_circuits == 3 and cfg.preemptive_ports == (80, 443)
    assert cfg.max_circuit_dirtiness == 600 and cfg.enforce_distinct_subnets is True
    cfg = ClientConfig.from_dict({"preemptive_ports": [8080], "enforce_distinct_subnets": False})
    assert cfg.preemptive_ports == (8080,) and cfg.enforce_distinct_subnets is False
    for key, bad in (("preemptive_ports", [0]), ("max_circuit_dirtiness", 0), ("num_primary_guards", "3"),
                     ("circuit_build_timeout", 10_000)):
        with pytest.raises(ConfigError, match=key):
            ClientConfig.from_dict({key: bad})


# -- directory keys ----------------------------------------------------------------------
def test_directory_defaults() -> None:
    a = AuthorityConfig()
    assert a.authorities == () and a.voting_interval == 3600 and a.run_relay is True
    assert (a.stable_uptime, a.guard_uptime) == (86400, 8 * 86400)
    assert (a.assume_guard, a.assume_exit) == (False, False)
    assert RelayConfig().authorities == ()


def test_directory_keys_from_files(tmp_path: Path) -> None:
    a = load_authority_config(write(tmp_path, f"""
nickname = "auth1"
dir_address = "127.0.0.1:7000"
run_relay = false
extend_allow_private = true
authorities = ["{AUTH1}", "{AUTH2}"]
voting_interval = 10
stable_uptime = 0
guard_uptime = 60
assume_guard = true
assume_exit = true
"""))
    assert a.authorities == (AUTH1, AUTH2)
    assert (a.voting_interval, a.stable_uptime, a.guard_uptime) == (10, 0, 60)
    assert a.assume_guard and a.assume_exit and not a.run_relay and a.extend_allow_private
    r = load_relay_config(write(tmp_path, f'authorities = ["{AUTH2}"]\n', "relay.toml"))
    assert r.authorities == (AUTH2,)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("voting_interval", 1, "out of range"),
        ("voting_interval", 86401, "out of range"),
        ("voting_interval", "10", "integer"),
        ("stable_uptime", -1, "out of range"),
        ("guard_uptime", 1.5, "integer"),
        ("assume_guard", 1, "boolean"),
        ("assume_exit", "yes", "boolean"),
        ("run_relay", 0, "boolean"),
        ("authorities", [AUTH1, AUTH1], "twice"),
        ("authorities", ["auth1 127.0.0.1:7000"], "authorities[0]"),
    ],
)
def test_authority_directory_validation_errors(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        AuthorityConfig.from_dict({key: value}, source="auth.toml")
    assert key in str(exc.value) and needle in str(exc.value)


def test_relay_authorities_validated() -> None:
    with pytest.raises(ConfigError, match=r"authorities\[0\]"):
        RelayConfig.from_dict({"authorities": ["x"]})


# -- DoS limits (specs/dos.md) -----------------------------------------------------------
def test_relay_dos_defaults_are_tors() -> None:
    cfg = RelayConfig.from_dict({})
    assert cfg.dos_max_concurrent_connections == 100  # DoSConnectionMaxConcurrentCount
    assert (cfg.dos_circuit_creation_rate, cfg.dos_circuit_creation_burst) == (3, 90)  # DoSCircuitCreation*
    assert cfg.max_mem_in_queues == 256 * 1024 * 1024  # MaxMemInQueues
    assert cfg.max_queue_cells == 2500  # circ_max_cell_queue_size
    assert cfg.handshake_timeout == 30
    assert cfg.tcp_user_timeout == 60


def test_relay_dos_keys_from_file(tmp_path: Path) -> None:
    cfg = load_relay_config(write(tmp_path, """
dos_max_concurrent_connections = 8
dos_circuit_creation_rate = 0.5
dos_circuit_creation_burst = 12
max_mem_in_queues = 1048576
max_queue_cells = 300
handshake_timeout = 5
tcp_user_timeout = 0
"""))
    assert cfg.dos_max_concurrent_connections == 8
    assert (cfg.dos_circuit_creation_rate, cfg.dos_circuit_creation_burst) == (0.5, 12)
    assert (cfg.max_mem_in_queues, cfg.max_queue_cells, cfg.handshake_timeout) == (1048576, 300, 5)
    assert cfg.tcp_user_timeout == 0


def test_relay_dos_limits_can_be_turned_off() -> None:
    cfg = RelayConfig.from_dict({"dos_max_concurrent_connections": 0, "dos_circuit_creation_rate": 0,
                                 "dos_circuit_creation_burst": 0, "max_mem_in_queues": 0,
                                 "max_queue_cells": 0})
    assert (cfg.dos_max_concurrent_connections, cfg.max_mem_in_queues, cfg.max_queue_cells) == (0, 0, 0)
    assert (cfg.dos_circuit_creation_rate, cfg.dos_circuit_creation_burst) == (0, 0)


@pytest.mark.parametrize(
    ("data", "key", "needle"),
    [
        ({"dos_max_concurrent_connections": -1}, "dos_max_concurrent_connections", "out of range"),
        ({"dos_max_concurrent_connections": True}, "dos_max_concurrent_connections", "expected an integer"),
        ({"dos_max_concurrent_connections": 1.0}, "dos_max_concurrent_connections", "expected an integer"),
        ({"dos_circuit_creation_rate": -0.5}, "dos_circuit_creation_rate", "out of range"),
        ({"dos_circuit_creation_rate": float("nan")}, "dos_circuit_creation_rate", "out of range"),
        ({"dos_circuit_creation_rate": float("inf")}, "dos_circuit_creation_rate", "out of range"),
        ({"dos_circuit_creation_rate": "3"}, "dos_circuit_creation_rate", "expected a number"),
        ({"dos_circuit_creation_rate": False}, "dos_circuit_creation_rate", "expected a number"),
        ({"dos_circuit_creation_burst": 2.5}, "dos_circuit_creation_burst", "expected an integer"),
        ({"dos_circuit_creation_burst": 0}, "dos_circuit_creation_burst", "both be 0"),
        ({"dos_circuit_creation_rate": 0}, "dos_circuit_creation_rate", "both be 0"),
        ({"max_mem_in_queues": -1}, "max_mem_in_queues", "out of range"),
        ({"max_mem_in_queues": "256M"}, "max_mem_in_queues", "expected an integer"),
        ({"max_queue_cells": -5}, "max_queue_cells", "out of range"),
        ({"handshake_timeout": 0}, "handshake_timeout", "out of range"),
        ({"handshake_timeout": 601}, "handshake_timeout", "out of range"),
        ({"handshake_timeout": 2.5}, "handshake_timeout", "expected an integer"),
        ({"tcp_user_timeout": -1}, "tcp_user_timeout", "out of range"),
        ({"tcp_user_timeout": 3601}, "tcp_user_timeout", "out of range"),
    ],
)
def test_relay_dos_validation_errors(data: dict, key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        RelayConfig.from_dict(data, source="relay.toml")
    msg = str(exc.value)
    assert msg.startswith("relay.toml: ") and key in msg and needle in msg



# -- metrics and control ports, SOCKS limits ---------------------------------------------
@pytest.mark.parametrize("cls", [RelayConfig, ClientConfig, AuthorityConfig])
def test_metrics_and_control_ports_in_every_config(cls, tmp_path: Path) -> None:
    assert cls().metrics_port is None  # off by default; the control port only on relays and authorities
    assert cls().control_port == (CONTROL_PORT_DEFAULT if cls is ClientConfig else None)
    cfg = cls.from_dict({"metrics_port": 9035, "control_port": 9051})
    assert (cfg.metrics_port, cfg.control_port) == (9035, 9051)
    assert cls.from_dict({"metrics_port": 0, "control_port": 0}).metrics_port == 0  # two free ports
    for bad, needle in ((70000, "out of range"), (-1, "out of range"), ("9035", "integer"), (True, "integer")):
        with pytest.raises(ConfigError, match=needle) as exc:
            cls.from_dict({"metrics_port": bad}, source="x.toml")
        assert "metrics_port" in str(exc.value)
    with pytest.raises(ConfigError, match="metrics_port.*also the control_port"):
        cls.from_dict({"metrics_port": 9051, "control_port": 9051})


def test_socks_limits_defaults_and_validation() -> None:
    from onionp2p.client.socksport import SocksServer

    cfg = ClientConfig.from_dict({})
    assert cfg.socks_handshake_timeout == 30 and cfg.socks_max_connections == 1024
    # the defaults are the SOCKS front end's own
    server = SocksServer(None)  # type: ignore[arg-type]
    assert (server.handshake_timeout, server.max_connections) == (cfg.socks_handshake_timeout,
                                                                  cfg.socks_max_connections)
    cfg = ClientConfig.from_dict({"socks_handshake_timeout": 2.5, "socks_max_connections": 8})
    assert (cfg.socks_handshake_timeout, cfg.socks_max_connections) == (2.5, 8)
    for key, bad, needle in (("socks_handshake_timeout", 0, "out of range"),
                             ("socks_handshake_timeout", "5", "expected a number"),
                             ("socks_handshake_timeout", 601, "out of range"),
                             ("socks_max_connections", 0, "out of range"),
                             ("socks_max_connections", 1.5, "expected an integer")):
        with pytest.raises(ConfigError, match=needle) as exc:
            ClientConfig.from_dict({key: bad})
        assert key in str(exc.value)
    with pytest.raises(ConfigError, match="socks_max_connections"):
        RelayConfig.from_dict({"socks_max_connections": 5})  # a client key


async def test_socks_limits_reach_the_socks_server(exit_relays, tmp_path: Path) -> None:
    """A running ClientNode's SOCKS listener enforces the configured handshake timeout and
    connection limit (real sockets)."""
    import asyncio
    import time

    from onionp2p.client.node import ClientNode
    from onionp2p.proto.directory import RouterStatus

    flags = frozenset({"Exit", "Fast", "Guard", "Running", "Stable", "Valid"})
    statuses = [RouterStatus(r.info(), flags, bandwidth=1000) for r in exit_relays]
    cfg = ClientConfig(client_reject_internal_addresses=False, data_dir=tmp_path / "c", socks_address=("127.0.0.1", 0), enforce_distinct_subnets=False,
                       preemptive_circuits=1, log_level="warning",
                       socks_handshake_timeout=0.5, socks_max_connections=1)
    node = ClientNode(cfg, routers=lambda: statuses)
    await node.start(ready_timeout=30)
    try:
        # a client that never sends its request is cut off after socks_handshake_timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", node.socks_port)
        t0 = time.monotonic()
        # meanwhile a second connection is over socks_max_connections: closed at once
        r2, w2 = await asyncio.open_connection("127.0.0.1", node.socks_port)
        assert await asyncio.wait_for(r2.read(), 5) == b""
        assert time.monotonic() - t0 < 0.45
        w2.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.4 < time.monotonic() - t0 < 3
        writer.close()
        assert node.socks.stats.handshake_failed >= 1
    finally:
        await node.stop()


def test_cli_client_overrides_metrics_port(tmp_path: Path) -> None:
    from onionp2p.cli import build_parser, client_config_from_args

    path = write(tmp_path, "metrics_port = 9035\ncontrol_port = 9051\n", "client.toml")
    args = build_parser().parse_args(["client", "--config", str(path)])
    assert client_config_from_args(args).metrics_port == 9035
    args = build_parser().parse_args(["client", "--config", str(path), "--metrics-port", "auto"])
    assert client_config_from_args(args).metrics_port == 0
    args = build_parser().parse_args(["client", "--config", str(path), "--metrics-port", "9051"])
    with pytest.raises(ConfigError, match="also the control port"):
        client_config_from_args(args)
    args = build_parser().parse_args(["testnet", "--metrics-port", "auto"])
    assert args.metrics_port == -1  # run_testnet gets 0: any free port
    assert build_parser().parse_args(["testnet"]).metrics_port is None


def test_congestion_control_and_consensus_params_keys() -> None:
    assert RelayConfig().congestion_control and ClientConfig().congestion_control
    assert not RelayConfig.from_dict({"congestion_control": False}).congestion_control
    assert not ClientConfig.from_dict({"congestion_control": False}).congestion_control
    with pytest.raises(ConfigError, match="congestion_control"):
        ClientConfig.from_dict({"congestion_control": "yes"})
    a = AuthorityConfig.from_dict({"consensus_params": {"cc_sendme_inc": 31, "cc_alg": 2}})
    assert a.consensus_params == {"cc_sendme_inc": 31, "cc_alg": 2}
    for bad, needle in (({"cc x": 1}, "bad parameter name"), ({"a": 2**31}, "32-bit"),
                        ({"a": True}, "32-bit"), ({"a": "1"}, "32-bit"), ([1], "table")):
        with pytest.raises(ConfigError, match=needle):
            AuthorityConfig.from_dict({"consensus_params": bad})


def test_connection_padding_keys() -> None:
    """tor's ConnectionPadding (auto/0/1) and ReducedConnectionPadding, in snake_case."""
    c = ClientConfig()
    assert (c.connection_padding, c.reduced_connection_padding) == ("auto", False)
    assert ClientConfig.from_dict({"connection_padding": 0}).connection_padding == "0"
    assert ClientConfig.from_dict({"connection_padding": "1"}).connection_padding == "1"
    assert ClientConfig.from_dict({"reduced_connection_padding": True}).reduced_connection_padding
    for bad in (2, "yes", True, 1.0):
        with pytest.raises(ConfigError, match="connection_padding"):
            ClientConfig.from_dict({"connection_padding": bad})
    with pytest.raises(ConfigError, match="connection_padding"):
        RelayConfig.from_dict({"connection_padding": 1})  # a client option, as in tor


# -- every problem at once, suggestions (issue 17, section 5) -------------------------------
def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, 'or_adress = "127.0.0.1:9001"\nnickname = "bad!"\nbandwidth_rate = -1\n'
                           'authorities = ["foo bar baz"]\nexit_policy = "allow *:*"\n'
                           'bandwidth_burst = 5\n')
    with pytest.raises(ConfigError) as exc:
        load_relay_config(path)
    problems = exc.value.problems
    assert [p.split(": ")[1] for p in problems] == [
        "or_adress", "nickname", "bandwidth_rate", "authorities[0]", "exit_policy", "bandwidth_burst"]
    assert all(p.startswith(f"{path}: ") for p in problems)
    assert "did you mean `or_address`?" in problems[0]
    assert str(exc.value) == "\n".join(problems)


def test_a_key_far_from_every_known_key_gets_the_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        ClientConfig.from_dict({"zzzz": 1}, source="c.toml")
    assert exc.value.problems == (exc.value.problems[0],)
    assert "did you mean" not in str(exc.value) and "known keys: authorities, cgo, circuit_build_timeout" in str(exc.value)


@pytest.mark.parametrize(("typo", "meant"), [("exit_polcy", "exit_policy"), ("socks_adress", None),
                                              ("log_levle", "log_level"), ("metric_port", "metrics_port")])
def test_did_you_mean(typo: str, meant: str | None) -> None:
    with pytest.raises(ConfigError) as exc:
        RelayConfig.from_dict({typo: 1}, source="r.toml")
    if meant is None:  # a client key: nothing close among a relay's keys
        assert "did you mean" not in str(exc.value)
    else:
        assert f"r.toml: {typo}: unknown key (did you mean `{meant}`?)" == str(exc.value)


@pytest.mark.parametrize(("line", "needle"), [
    ("foo bar baz", "second field 'bar' is not HOST:DIRPORT"),
    ("foo", "expected 3 fields"),
    ("foo 127.0.0.1:7000 baz", "ED25519_ID 'baz'"),
    ("foo 127.0.0.1:x " + ED1, "HOST:DIRPORT '127.0.0.1:x'"),
])
def test_authority_lines_say_what_they_must_look_like(line: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ClientConfig.from_dict({"authorities": [AUTH1, line]}, source="c.toml")
    text = str(exc.value)
    assert text.startswith("c.toml: authorities[1]: ") and needle in text, text
    if needle != "HOST:DIRPORT '127.0.0.1:x'":
        assert '"NICKNAME HOST:DIRPORT ED25519_ID"' in text
    assert "invalid port 'bar'" not in text


def test_bad_authority_lines_are_each_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        ClientConfig.from_dict({"authorities": ["a b c", AUTH1, "d e f", AUTH1]}, source="c.toml")
    assert [p.split(": ")[1] for p in exc.value.problems] == ["authorities[0]", "authorities[2]", "authorities[3]"]
    assert "listed twice" in exc.value.problems[2]


def test_log_file_is_a_path_next_to_the_config(tmp_path: Path) -> None:
    for load in (load_relay_config, load_client_config, load_authority_config):
        cfg = load(write(tmp_path, 'log_file = "logs/node.log"\n'))
        assert cfg.log_file == tmp_path / "logs" / "node.log"
    assert RelayConfig().log_file is None


@pytest.mark.parametrize("cls", [RelayConfig, ClientConfig, AuthorityConfig])
def test_dump_config_loads_back_to_the_same_config(tmp_path: Path, cls) -> None:
    import tomllib

    from onionp2p.config import dump_config

    extra = {RelayConfig: {"exit_policy": ["accept *:443", "reject *:*"], "family": [FP], "contact": 'a "b" c'},
             ClientConfig: {"preemptive_ports": [22], "log_file": "x.log"},
             AuthorityConfig: {"consensus_params": {"cc_sendme_inc": 31}, "authorities": [AUTH1, AUTH2]}}[cls]
    cfg = cls.from_dict(extra, base_dir=tmp_path)
    text = dump_config(cfg)
    assert cls.from_dict(tomllib.loads(text), base_dir=Path("/elsewhere")) == cfg
    assert f'data_dir = "{cfg.data_dir}"' in text
    if cls is ClientConfig:  # on by default (9151 or any free port); off is written as false
        assert 'control_port = "9151-or-auto"' in text
        off = cls.from_dict({"control_port": False}, base_dir=tmp_path)
        assert "control_port = false" in dump_config(off)
        assert cls.from_dict(tomllib.loads(dump_config(off)), base_dir=tmp_path) == off
    else:
        assert "# control_port is unset" in text


def test_cli_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, 'or_adress = "127.0.0.1:9001"\nauthorities = ["foo bar baz"]\nmax_queue_cells = true\n')
    out = subprocess.run([sys.executable, "-m", "onionp2p", "relay", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"onionp2p: error: {path}: ") for line in lines), lines
    assert lines[0].endswith("or_adress: unknown key (did you mean `or_address`?)")
    assert "authorities[0]: " in lines[1] and "is not HOST:DIRPORT" in lines[1]
    assert "max_queue_cells: expected an integer, got boolean True" in lines[2]
    assert not (tmp_path / "onionp2p-relay").exists()  # nothing started


def test_relay_address_is_what_is_published() -> None:
    """``address`` (tor's Address) is published; or_address is only where we listen; a
    wildcard listener needs ``address`` (one clear error naming or_address otherwise)."""
    cfg = RelayConfig.from_dict({"or_address": "0.0.0.0:9001", "address": "203.0.113.7"})
    assert cfg.or_address == ("0.0.0.0", 9001) and cfg.advertised_address == "203.0.113.7"
    assert RelayConfig.from_dict({"or_address": "10.1.2.3:9001"}).advertised_address == "10.1.2.3"
    assert not cfg.assume_reachable and cfg.reachability_timeout == 1200  # tor's 20 minutes
    for bind in ("0.0.0.0:9001", "[::]:9001"):
        with pytest.raises(ConfigError) as exc:
            RelayConfig.from_dict({"or_address": bind}, source="relay.toml")
        assert str(exc.value).startswith("relay.toml: or_address: listens on every interface")
        assert "set `address`" in str(exc.value)
    # built in code (not from a file): the relay refuses to publish a wildcard all the same
    with pytest.raises(ConfigError):
        RelayConfig(or_address=("0.0.0.0", 9001)).advertised_address  # noqa: B018
    # an authority's relay publishes without waiting for the self-test, as tor's authorities
    assert AuthorityConfig().relay_config().assume_reachable


def test_client_control_port_forms_and_app_ports() -> None:
    """control_port: a port, "auto" (any free port), false (off); default on. The HTTP
    tunnel and DNS ports are ports (0 = any free) and off by default."""
    assert ClientConfig.from_dict({"control_port": "auto"}).control_port == 0
    assert ClientConfig.from_dict({"control_port": False}).control_port is None
    assert ClientConfig.from_dict({"control_port": 9051}).control_port == 9051
    for bad, needle in (("9051", "auto"), (True, "integer"), (70000, "out of range")):
        with pytest.raises(ConfigError, match=needle):
            ClientConfig.from_dict({"control_port": bad}, source="x.toml")
    cfg = ClientConfig.from_dict({"http_tunnel_port": 8118, "dns_port": 0})
    assert (cfg.http_tunnel_port, cfg.dns_port) == (8118, 0)
    for key in ("http_tunnel_port", "dns_port"):
        for bad in (70000, -1, "53", True):
            with pytest.raises(ConfigError, match=key):
                ClientConfig.from_dict({key: bad}, source="x.toml")


def test_tor_dirauth_file(tmp_path: Path) -> None:
    """tor_dirauth_file (a relay joining a Tor network) resolves like any path and excludes
    `authorities`; the CLI's --tor-dirauth-file rejects a bad file with status 2."""
    from onionp2p.cli import main

    c = RelayConfig.from_dict({"tor_dirauth_file": "dirauth.txt"}, base_dir=tmp_path)
    assert c.tor_dirauth_file == tmp_path / "dirauth.txt"
    with pytest.raises(ConfigError, match="tor_dirauth_file"):
        RelayConfig.from_dict({"tor_dirauth_file": "d.txt", "authorities": [AUTH1]}, base_dir=tmp_path)
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\nor_address = "127.0.0.1:0"\n')
    (tmp_path / "bad.txt").write_text("DirAuthority nonsense\n")
    assert main(["relay", "--config", str(cfg), "--tor-dirauth-file", str(tmp_path / "bad.txt")]) == 2
    assert main(["relay", "--config", str(cfg), "--tor-dirauth-file", str(tmp_path / "missing.txt")]) == 2
    missing = ["relay", "--config", str(cfg), "--tor-dirauth-file", str(tmp_path / "missing.txt")]
    assert main([*missing, "--verify-config"]) == 2  # the file is part of what a start needs
    assert main([*missing, "--dump-config"]) == 0  # dumping reads nothing


def test_onion_service_tables(tmp_path: Path) -> None:
    f = tmp_path / "client.toml"
    f.write_text('[[onion_service]]\ndir = "hs/web"\nports = ["80 127.0.0.1:8080", "22"]\n\n'
                 '[[onion_service]]\ndir = "hs/ssh"\nports = ["2222 127.0.0.1:22"]\nnum_intro_points = 5\n'
                 "enable_intro_dos_defense = true\n")
    cfg = load_client_config(f)
    web, ssh = cfg.onion_service
    assert web.dir == tmp_path / "hs/web" and web.ports == ("80 127.0.0.1:8080", "22") and web.num_intro_points == 3
    assert ssh.num_intro_points == 5 and ssh.enable_intro_dos_defense and ssh.intro_dos_rate_per_sec == 25
    # --dump-config writes them back so that loading gives the same configuration
    again = tmp_path / "again.toml"
    again.write_text(dump_config(cfg))
    assert load_client_config(again).onion_service == cfg.onion_service
    assert "onion_service" not in dump_config(ClientConfig())


@pytest.mark.parametrize("table, needle", [
    ('ports = ["80"]', "onion_service[0]: `dir` is required"),
    ('dir = "x"', "onion_service[0]: `ports` is required"),
    ('dir = "x"\nports = []', "onion_service[0].ports: must list at least one port"),
    ('dir = "x"\nports = ["80 127.0.0.1:99999"]', "target port '99999' is not a port"),
    ('dir = "x"\nports = ["eighty"]', "virtual port 'eighty'"),
    ('dir = "x"\nports = ["80 unix:/run/s"]', "unix socket targets are not supported"),
    ('dir = "x"\nports = ["80"]\nnum_intro_points = 21', "onion_service[0].num_intro_points"),
    ('dir = "x"\nports = ["80"]\nnm_intro_points = 2', "did you mean `num_intro_points`?"),
    ('dir = "x"\nports = ["80"]\nintro_dos_rate_per_sec = 30\nintro_dos_burst_per_sec = 10', "must not be below"),
])
def test_onion_service_errors(tmp_path: Path, table: str, needle: str) -> None:
    f = tmp_path / "client.toml"
    f.write_text(f"[[onion_service]]\n{table}\n")
    with pytest.raises(ConfigError) as e:
        load_client_config(f)
    assert needle in str(e.value) and str(f) in str(e.value)


def test_onion_service_directory_twice(tmp_path: Path) -> None:
    f = tmp_path / "client.toml"
    f.write_text('[[onion_service]]\ndir = "a"\nports = ["80"]\n[[onion_service]]\ndir = "a"\nports = ["81"]\n')
    with pytest.raises(ConfigError, match=r"onion_service\[1\]\.dir: .* is the directory of another onion service"):
        load_client_config(f)


def test_client_onion_auth_dir_must_exist(tmp_path, capsys):
    """tor's ClientOnionAuthDir: a missing directory is a configuration error at start and in
    --verify-config (one line, status 2); the path resolves next to the file."""
    from onionp2p.cli import main

    c = ClientConfig.from_dict({"client_onion_auth_dir": "auth"}, base_dir=tmp_path)
    assert c.client_onion_auth_dir == tmp_path / "auth"
    cfg = tmp_path / "client.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\nsocks_address = "127.0.0.1:0"\ncontrol_port = false\n'
                   f'authorities = ["{AUTH1}"]\nclient_onion_auth_dir = "auth"\n')
    for extra in ([], ["--verify-config"]):
        capsys.readouterr()
        assert main(["client", "--config", str(cfg), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "client_onion_auth_dir" in err[0] and str(tmp_path / "auth") in err[0], err
    (tmp_path / "auth").mkdir()
    assert main(["client", "--config", str(cfg), "--verify-config"]) == 0
