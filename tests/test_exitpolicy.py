"""Tests for onionp2p.proto.exitpolicy."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from onionp2p.errors import ConfigError, LocalProtocolError, ProtocolError
from onionp2p.proto.exitpolicy import (
    PRIVATE_NETWORKS,
    REJECT_ALL,
    ExitPolicy,
    PolicyRule,
    PortSummary,
    is_private_address,
)

PUBLIC4 = "93.184.216.34"
PUBLIC6 = "2001:db8::1"


def parse(text: str, **kw) -> ExitPolicy:
    return ExitPolicy.parse(text, **kw)


# -- parsing and canonical form ----------------------------------------------------------
def test_first_match_wins() -> None:
    p = parse("reject 1.2.3.4:80, accept *:80", reject_private=False)
    assert not p.allows("1.2.3.4", 80)
    assert p.allows("1.2.3.5", 80)
    assert not p.allows("1.2.3.5", 81)  # implicit reject *:*
    q = parse("accept *:80, reject 1.2.3.4:80", reject_private=False)
    assert q.allows("1.2.3.4", 80)


def test_rules_separated_by_commas_newlines_and_comments() -> None:
    p = parse("accept *:80 # web\n\n accept *:443,accept *:22\n# nothing\n", reject_private=False)
    assert str(p) == "accept *:80, accept *:443, accept *:22, reject *:*"
    assert parse(["accept *:80, accept *:443", "accept *:22"], reject_private=False) == p


def test_keywords_are_case_insensitive() -> None:
    assert parse("ACCEPT *:80", reject_private=False) == parse("accept *:80", reject_private=False)


def test_port_forms() -> None:
    p = parse("accept *:8000-8999, accept *:22, accept 5.6.7.8", reject_private=False)
    assert p.allows(PUBLIC4, 8000) and p.allows(PUBLIC4, 8999) and p.allows(PUBLIC4, 22)
    assert not p.allows(PUBLIC4, 7999) and not p.allows(PUBLIC4, 9000)
    assert p.allows("5.6.7.8", 1) and p.allows("5.6.7.8", 65535)  # omitted port means *
    assert str(p) == "accept *:8000-8999, accept *:22, accept 5.6.7.8:*, reject *:*"


def test_masks_prefix_and_dotted() -> None:
    a = parse("accept 18.0.0.0/8:*", reject_private=False)
    b = parse("accept 18.7.22.69/255.0.0.0:*", reject_private=False)
    assert a == b
    assert a.allows("18.255.1.2", 443)
    assert not a.allows("19.0.0.1", 443)
    assert str(a) == "accept 18.0.0.0/8:*, reject *:*"
    assert parse("accept 1.2.3.4/32:*", reject_private=False).rules[0].network == (
        ipaddress.ip_network("1.2.3.4/32")
    )


def test_zero_mask_is_family_wildcard() -> None:
    p = parse("accept 1.2.3.4/0:80", reject_private=False)
    assert p.rules[0] == PolicyRule(True, None, 4, 80, 80)
    assert str(p.rules[0]) == "accept *4:80"


def test_wildcard_families() -> None:
    p = parse("accept *4:80, accept *6:443", reject_private=False)
    assert p.allows(PUBLIC4, 80) and not p.allows(PUBLIC6, 80)
    assert p.allows(PUBLIC6, 443) and not p.allows(PUBLIC4, 443)
    star = parse("accept *:80", reject_private=False)
    assert star.allows(PUBLIC4, 80) and star.allows(PUBLIC6, 80)


def test_ipv6_rules() -> None:
    p = parse("reject6 [2001:db8::]/32:*, accept6 *:80, accept [2001:db9::1]:22", reject_private=False)
    assert not p.allows("2001:db8::5", 80)
    assert p.allows("2001:db9::5", 80)
    assert not p.allows(PUBLIC4, 80)  # accept6 * is IPv6 only
    assert p.allows("[2001:db9::1]", 22)
    assert not p.allows("2001:db9::2", 22)
    assert str(p) == "reject [2001:db8::]/32:*, accept *6:80, accept [2001:db9::1]:22, reject *:*"


def test_ipv4_mapped_addresses_evaluated_as_ipv4() -> None:
    p = parse("accept *:*")
    assert not p.allows("::ffff:127.0.0.1", 80)
    assert not p.allows("::ffff:10.1.2.3", 80)
    assert p.allows("::ffff:93.184.216.34", 80)


def test_private_expansion_matches_tor_list() -> None:
    p = parse("reject private:*, accept *:*", reject_private=False)
    nets = [r.network for r in p.rules if r.network is not None]
    # [::]/127 lies inside [::]/8 and is therefore dropped as redundant.
    assert nets == [n for n in PRIVATE_NETWORKS if str(n) != "::/127"]
    for addr in ("0.1.2.3", "169.254.9.9", "127.0.0.1", "192.168.1.1", "10.9.9.9", "172.31.0.1",
                 "::1", "::", "fd00::1", "fe80::1", "fec0::1", "ff02::1"):
        assert is_private_address(addr)
        assert not p.allows(addr, 80), addr
    for addr in ("172.32.0.1", "11.0.0.1", PUBLIC4, PUBLIC6):
        assert not is_private_address(addr)
        assert p.allows(addr, 80), addr


def test_private6_expands_only_ipv6() -> None:
    p = parse("reject6 private:*, accept *:*", reject_private=False)
    assert p.allows("10.0.0.1", 80)
    assert not p.allows("fd00::1", 80)


def test_default_reject_private_blocks_loopback_and_rfc1918() -> None:
    p = parse("accept 127.0.0.1:*, accept *:*")
    assert not p.allows("127.0.0.1", 80)
    assert not p.allows("10.1.2.3", 80)
    assert not p.allows("::1", 80)
    assert p.allows(PUBLIC4, 80)


def test_operator_may_allow_loopback_without_reject_private() -> None:
    p = parse("accept 127.0.0.1:*, reject private:*, accept *:80", reject_private=False)
    assert p.allows("127.0.0.1", 9000)
    assert not p.allows("127.0.0.2", 9000)
    assert not p.allows("10.1.2.3", 80)
    assert p.allows(PUBLIC4, 80)


def test_reject_all() -> None:
    assert ExitPolicy.reject_all() is REJECT_ALL
    assert ExitPolicy() == REJECT_ALL
    assert str(REJECT_ALL) == "reject *:*"
    assert parse("reject *:*") == REJECT_ALL
    assert parse("") == REJECT_ALL
    assert parse("reject 1.2.3.4:*") == REJECT_ALL
    assert not REJECT_ALL.is_exit
    assert not REJECT_ALL.allows(PUBLIC4, 80)


def test_normalisation_drops_shadowed_rules() -> None:
    p = parse("accept *:80, reject 1.2.3.4:80, reject *:25, accept *:22, reject *:*, accept *:9",
              reject_private=False)
    assert str(p) == "accept *:80, reject *:25, accept *:22, reject *:*"
    # Rules just before the final catch-all with the same verdict are redundant.
    q = parse("accept *:80, reject 1.2.3.4:80, accept *:*, accept *:22", reject_private=False)
    assert str(q) == "accept *:*"


def test_round_trip_of_default_policy() -> None:
    p = parse("accept *:80, reject 5.6.0.0/16:*, accept6 *:443")
    assert parse(str(p)) == p
    assert parse(str(p), reject_private=False) == p


@pytest.mark.parametrize(
    "rule",
    [
        "accept",
        "accept *:80 extra",
        "allow *:*",
        "accept *:0",
        "accept *:65536",
        "accept *:90-80",
        "accept *:8a",
        "accept *:",
        "accept *:*:*",
        "accept *:-5",
        "accept 1.2.3.4/33:*",
        "accept 1.2.3.4/255.0.255.0:*",
        "accept 1.2.3.4/1.2.3:*",
        "accept 1.2.3:80",
        "accept 1.2.3.004:80",
        "accept ::1:80",
        "accept [::1:80",
        "accept [::1]x:80",
        "accept [1.2.3.4]:80",
        "accept [::1]/129:80",
        "accept [::1]/ffff::",
        "accept [fe80::1%eth0]:80",
        "accept *4/8:*",
        "accept private/8:*",
        "accept6 1.2.3.4:80",
        "reject6 *4:*",
        "accept example.com:80",
        "accept *:\u0668\u0660",
    ],
)
def test_invalid_rules_raise_config_error_quoting_rule(rule: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(f"accept *:22, {rule}")
    assert repr(rule.strip()) in str(exc.value)


def test_parse_rejects_non_string_input() -> None:
    with pytest.raises(ConfigError):
        ExitPolicy.parse(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ExitPolicy.parse(["accept *:80", 7])  # type: ignore[list-item]


def test_policy_rule_validation() -> None:
    with pytest.raises(ConfigError):
        PolicyRule(True, None, 5)
    with pytest.raises(ConfigError):
        PolicyRule(True, ipaddress.ip_network("1.0.0.0/8"), 6)
    with pytest.raises(ConfigError):
        PolicyRule(True, None, None, 0, 5)
    with pytest.raises(ConfigError):
        PolicyRule(True, None, None, 9, 5)
    with pytest.raises(ConfigError):
        PolicyRule(1, None, None)  # type: ignore[arg-type]


def test_allows_bad_inputs() -> None:
    p = parse("accept *:*", reject_private=False)
    assert not p.allows(PUBLIC4, 0)
    assert not p.allows(PUBLIC4, 70000)
    with pytest.raises(LocalProtocolError):
        p.allows("example.com", 80)
    with pytest.raises(LocalProtocolError):
        p.allows(b"1.2.3.4", 80)  # type: ignore[arg-type]
    assert p.allows(ipaddress.ip_address(PUBLIC4), 80)


# -- might_allow_port / is_exit ----------------------------------------------------------
def test_might_allow_port() -> None:
    p = parse("reject *:25, accept 1.2.3.0/24:25, reject 5.0.0.0/8:80, accept *:80-81")
    assert not p.might_allow_port(25)
    assert p.might_allow_port(80)
    assert p.might_allow_port(81)
    assert not p.might_allow_port(82)
    assert not p.might_allow_port(0)
    q = parse("reject *:80, accept 1.2.3.4:1-100", reject_private=False)
    assert not q.might_allow_port(80)
    assert q.might_allow_port(79)
    lo = parse("accept 127.0.0.1:*", reject_private=False)
    assert lo.might_allow_port(8080)
    assert not REJECT_ALL.might_allow_port(80)


def test_is_exit() -> None:
    assert parse("accept *:80").is_exit
    assert parse("accept 127.0.0.1:*", reject_private=False).is_exit
    assert not parse("accept 127.0.0.1:*").is_exit
    assert not parse("reject *:1-100, reject *:101-65535, accept *:*", reject_private=False).is_exit
    assert parse("reject *:1-100, reject *:102-65535, accept *:*", reject_private=False).is_exit


# -- summaries ---------------------------------------------------------------------------
TOR_DEFAULT = (
    "reject *:25,reject *:119,reject *:135-139,reject *:445,reject *:563,reject *:1214,"
    "reject *:4661-4666,reject *:6346-6429,reject *:6699,reject *:6881-6999,accept *:*"
)


@pytest.mark.parametrize(
    ("policy", "summary"),
    [
        ("reject *:*", "reject 1-65535"),
        ("accept *:*", "accept 1-65535"),
        ("accept *:80, accept *:443, accept *:8000-8999", "accept 80,443,8000-8999"),
        ("accept *:80, accept *:81, accept *:82", "accept 80-82"),
        (TOR_DEFAULT, "reject 25,119,135-139,445,563,1214,4661-4666,6346-6429,6699,6881-6999"),
        ("accept 1.2.3.0/24:80, accept *:443", "accept 443"),
        ("reject 1.0.0.0/8:80, reject 2.0.0.0/8:80, accept *:*", "accept 1-65535"),
        ("reject 1.0.0.0/8:80, reject 2.0.0.0/8:80, reject 3.0.0.0/8:80, accept *:*", "reject 80"),
        ("reject 2.0.0.0/7:*, accept *:*", "accept 1-65535"),  # exactly at the cut-off
        ("reject 2.0.0.0/7:*, reject 5.0.0.1:*, accept *:*", "reject 1-65535"),  # one past it
        ("reject 4.0.0.0/6:*, accept *:*", "reject 1-65535"),
        ("reject 10.0.0.0/8:*, reject 172.16.0.0/12:*, reject 10.5.0.0/16:*, accept *:*",
         "accept 1-65535"),
        ("accept *6:80, reject *:*", "reject 1-65535"),  # IPv6-only accepts don't count for p
        ("reject *:80, accept *:1-65535", "reject 80"),
        ("accept *:22, reject *:23, accept *:*", "reject 23"),
    ],
)
def test_summary_known_examples(policy: str, summary: str) -> None:
    p = parse(policy)
    assert p.summary() == summary
    assert str(ExitPolicy.parse_summary(summary)) == summary


def test_ipv6_summary() -> None:
    p = parse("accept6 *:443, accept *4:80")
    assert p.summary(6) == "accept 443"
    assert p.summary(4) == "accept 80"
    q = parse("reject [2001::]/16:80, accept *:*")
    assert q.summary(6) == "accept 1-65535"
    r = parse("reject [2001::]/15:80, accept *:*")
    assert r.summary(6) == "reject 80"
    with pytest.raises(LocalProtocolError):
        p.summary(5)


def test_long_summary_is_truncated_on_accept_side() -> None:
    rules = ",".join(f"accept *:{p}" for p in range(2, 2000, 2))
    p = parse(rules)
    s = p.summary()
    assert s.startswith("accept 2,4,6,")
    assert len(s) <= 1000
    ps = ExitPolicy.parse_summary(s)
    assert all(p.might_allow_port(port) for lo, hi in ps.ranges for port in range(lo, hi + 1))


def test_parse_summary() -> None:
    s = ExitPolicy.parse_summary("accept 80,443,8000-8999")
    assert s == PortSummary(True, ((80, 80), (443, 443), (8000, 8999)))
    assert s.allows_port(80) and s.allows_port(8500) and not s.allows_port(81)
    assert not s.allows_port(0) and not s.allows_port(70000)
    r = ExitPolicy.parse_summary("reject 25,119")
    assert not r.allows_port(25) and r.allows_port(26) and r.accepts_anything
    assert not ExitPolicy.parse_summary("reject 1-65535").accepts_anything
    assert ExitPolicy.parse_summary("accept 3,1-2").ranges == ((1, 3),)


@pytest.mark.parametrize(
    "bad",
    ["", "accept", "accept ", "allow 80", "accept 0", "accept 65536", "accept 5-4", "accept 80,",
     "accept ,80", "accept 80 ,443", "accept  80", "Accept 80", "accept 1-2-3", "accept x"],
)
def test_parse_summary_errors(bad: str) -> None:
    with pytest.raises(ProtocolError):
        ExitPolicy.parse_summary(bad)


def test_parse_summary_non_text() -> None:
    with pytest.raises(ProtocolError):
        ExitPolicy.parse_summary(b"accept 80")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        ExitPolicy.parse_summary("accept " + ",".join(["80"] * 5000))


# -- property tests ----------------------------------------------------------------------
ports = st.integers(1, 65535)


@st.composite
def port_ranges(draw) -> tuple[int, int]:
    if draw(st.booleans()):
        return 1, 65535
    lo = draw(st.sampled_from([1, 22, 25, 80, 443, 1000, 65535]) | ports)
    hi = draw(st.integers(lo, min(65535, lo + draw(st.sampled_from([0, 1, 10, 1000, 70000])))))
    return lo, hi


v4_nets = st.builds(
    lambda a, n: ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{n}", strict=False),
    st.integers(0, 2**32 - 1), st.integers(1, 32),
)
v6_nets = st.builds(
    lambda a, n: ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{n}", strict=False),
    st.integers(0, 2**128 - 1), st.integers(1, 128),
)
wild_addr = st.sampled_from([(None, None), (None, 4), (None, 6)])
priv_addr = st.sampled_from([(n, n.version) for n in PRIVATE_NETWORKS])
spec_addr = st.one_of(v4_nets, v6_nets).map(lambda n: (n, n.version))


@st.composite
def rules(draw, addrs=st.one_of(wild_addr, priv_addr, spec_addr)) -> PolicyRule:
    net, fam = draw(addrs)
    lo, hi = draw(port_ranges())
    return PolicyRule(draw(st.booleans()), net, fam, lo, hi)


policies = st.lists(rules(), max_size=12).map(ExitPolicy)
wild_policies = st.lists(rules(st.one_of(wild_addr, priv_addr)), max_size=12).map(ExitPolicy)
public_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address).filter(
    lambda a: not is_private_address(a)
)
any_addr = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    st.sampled_from([ipaddress.ip_address(a) for a in ("127.0.0.1", "10.0.0.1", "::1", PUBLIC4)]),
)


def naive_allows(rule_list: list[PolicyRule], addr, port: int) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for r in rule_list:
        if r.port_lo <= port <= r.port_hi and (r.family in (None, addr.version)) and (
            r.network is None or addr in r.network
        ):
            return r.accept
    return False


@given(policies)
def test_str_parse_round_trip(p: ExitPolicy) -> None:
    assert ExitPolicy.parse(str(p), reject_private=False) == p
    assert ExitPolicy.parse(p.lines(), reject_private=False) == p


@given(policies)
def test_round_trip_with_reject_private(p: ExitPolicy) -> None:
    q = ExitPolicy.parse(str(p))
    assert ExitPolicy.parse(str(q)) == q


@given(policies)
def test_normal_form_is_idempotent(p: ExitPolicy) -> None:
    assert ExitPolicy(p.rules) == p
    assert p.rules[-1].is_catch_all


@given(st.lists(rules(), max_size=12), st.lists(st.tuples(any_addr, ports), min_size=1, max_size=10))
def test_normalisation_preserves_meaning(rule_list: list[PolicyRule], probes) -> None:
    p = ExitPolicy(rule_list)
    for addr, port in probes:
        assert p.allows(addr, port) == naive_allows(rule_list, addr, port)


@given(st.lists(rules(), max_size=12), st.lists(st.tuples(any_addr, ports), min_size=1, max_size=10))
def test_might_allow_port_and_is_exit_over_approximate(rule_list, probes) -> None:
    p = ExitPolicy(rule_list)
    for addr, port in probes:
        for probe in (addr, *(r.network.network_address for r in p.rules if r.network)):
            if p.allows(probe, port):
                assert p.might_allow_port(port)
                assert p.is_exit


@given(policies)
def test_summary_parses_back(p: ExitPolicy) -> None:
    for fam in (4, 6):
        ps = p.port_summary(fam)
        assert ExitPolicy.parse_summary(p.summary(fam)) == ps
        assert str(ps) == p.summary(fam)


@given(wild_policies, public_v4, st.lists(ports, min_size=1, max_size=20))
def test_summary_exact_for_address_independent_policies(p: ExitPolicy, addr, probe_ports) -> None:
    summary = ExitPolicy.parse_summary(p.summary())
    for port in probe_ports + [r.port_lo for r in p.rules] + [r.port_hi for r in p.rules]:
        assert summary.allows_port(port) == p.allows(addr, port)


@given(policies, public_v4, st.lists(ports, min_size=1, max_size=20))
def test_summary_accept_implies_allowed_outside_specific_networks(p, addr, probe_ports) -> None:
    assume(not any(r.network is not None and addr in r.network for r in p.rules if r.family == 4))
    summary = ExitPolicy.parse_summary(p.summary())
    for port in probe_ports + [r.port_lo for r in p.rules]:
        if summary.allows_port(port):
            assert p.allows(addr, port)


@given(st.text(max_size=60))
@settings(max_examples=300)
def test_parse_fuzz_only_config_error(text: str) -> None:
    try:
        ExitPolicy.parse(text)
    except ConfigError:
        pass


@given(st.text(alphabet="acceptrj6 *:,-/[]0123456789.f", max_size=40))
@settings(max_examples=300)
def test_parse_fuzz_structured_only_config_error(text: str) -> None:
    try:
        ExitPolicy.parse(text)
    except ConfigError:
        pass


@given(st.text(max_size=40) | st.text(alphabet="aceptrj 0123456789,-", max_size=40))
@settings(max_examples=300)
def test_parse_summary_fuzz_only_protocol_error(text: str) -> None:
    try:
        s = ExitPolicy.parse_summary(text)
    except ProtocolError:
        return
    assert ExitPolicy.parse_summary(str(s)) == s
