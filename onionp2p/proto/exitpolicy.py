"""Exit policies: torrc ``ExitPolicy`` rules, evaluation and microdescriptor summaries.

Theory of operation
-------------------
An exit policy is an ordered list of rules ``accept|reject[6] ADDR[/MASK][:PORT[-PORT]]``
(see ``specs/exitpolicy.md`` for the normative grammar). A connection to ``address:port``
is decided by the *first* rule whose address pattern and port range both match; if none
matches, the connection is rejected (the implicit final rule is ``reject *:*``).

Parsing (:meth:`ExitPolicy.parse`) splits the text on newlines and commas, strips ``#``
comments, expands the keyword ``private`` into one rule per network in
:data:`PRIVATE_NETWORKS` (tor's list, kept identical so summaries agree with tor's), and,
unless told otherwise, prepends ``reject private:*`` like tor's ``ExitPolicyRejectPrivate``.
Syntax errors raise :class:`~onionp2p.errors.ConfigError` quoting the offending rule.

Every :class:`ExitPolicy` is kept in a *normal form* that does not change its meaning:

1. a rule is dropped when one earlier rule already covers all of its addresses and ports
   (it can never be the first match);
2. rules stop at the first catch-all (``*`` address, ports 1-65535), and a final
   ``reject *:*`` is appended when the list does not already end with a catch-all, so the
   implicit default is explicit;
3. rules directly before the final catch-all that have the same verdict are dropped.

Because of this, ``ExitPolicy.parse(str(p), reject_private=False) == p`` for every policy,
and ``ExitPolicy.parse(str(p)) == p`` for every policy that was itself parsed with the
default ``reject_private=True`` (the re-added private rejects are shadowed and vanish).

IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are evaluated as the IPv4 address they
embed, so ``reject 127.0.0.0/8`` cannot be bypassed through ``[::ffff:127.0.0.1]``.

Summaries (:meth:`ExitPolicy.summary`) follow tor's ``policy_summarize``: looking only at
one address family, a port is listed as *accepted* when a wildcard accept rule covers it
and, at that point, at most a small part of the public address space (more than two IPv4
/8s, or more than one IPv6 /16, is too much) has been rejected for that port by earlier
rules. Reject rules that lie entirely inside a private network are ignored; accept rules
narrower than the whole address space are ignored. The result is ``accept PORTS`` or
``reject PORTS``, whichever is shorter. :meth:`ExitPolicy.parse_summary` reads such a line
back into a :class:`PortSummary`; since summaries arrive in microdescriptors, malformed
ones raise :class:`~onionp2p.errors.ProtocolError`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

from onionp2p.errors import ConfigError, LocalProtocolError, ProtocolError

__all__ = [
    "PRIVATE_NETWORKS",
    "MAX_SUMMARY_LEN",
    "PolicyRule",
    "ExitPolicy",
    "PortSummary",
    "REJECT_ALL",
    "is_private_address",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Networks the ``private`` keyword expands to, in tor's order (``private_nets`` in tor's
#: policies.c). Summaries ignore reject rules inside these networks.
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "169.254.0.0/16",
        "127.0.0.0/8",
        "192.168.0.0/16",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "::/8",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        "::/127",
    )
)

#: Longest summary line body we produce (tor's MAX_EXITPOLICY_SUMMARY_LEN).
MAX_SUMMARY_LEN = 1000
_MAX_SUMMARY_INPUT = 8192

_PORT_MIN, _PORT_MAX = 1, 65535
_DIGITS = re.compile(r"[0-9]{1,5}")
_KEYWORDS = {"accept": (True, False), "reject": (False, False), "accept6": (True, True),
             "reject6": (False, True)}

# Summary cut-offs, in "scaled addresses": IPv4 counts whole addresses; IPv6 counts /64s.
_V4_CUTOFF = 1 << 25  # more than two /8s rejected -> port not summarised as accepted
_V6_CUTOFF = 1 << 48  # more than one /16 rejected


def _to_address(address: str | IPAddress) -> IPAddress:
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr: IPAddress = address
    elif isinstance(address, str):
        text = address.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if "%" in text:
            raise LocalProtocolError(f"scoped IPv6 address not allowed: {address!r}")
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise LocalProtocolError(f"not an IP address: {address!r}") from None
    else:
        raise LocalProtocolError(f"not an IP address: {address!r}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_private_address(address: str | IPAddress) -> bool:
    """True iff *address* lies in one of :data:`PRIVATE_NETWORKS`."""
    addr = _to_address(address)
    return any(addr.version == n.version and addr in n for n in PRIVATE_NETWORKS)


def _is_private_network(net: IPNetwork) -> bool:
    return any(
        net.version == n.version and net.subnet_of(n)  # type: ignore[arg-type]
        for n in PRIVATE_NETWORKS
    )


@dataclass(frozen=True)
class PolicyRule:
    """One policy rule.

    ``network`` is ``None`` for a wildcard; ``family`` then says which wildcard
    (``None`` = ``*``, ``4`` = ``*4``, ``6`` = ``*6``). With a network, ``family`` is its
    IP version. A /0 network is stored as the corresponding family wildcard.
    """

    accept: bool
    network: IPNetwork | None
    family: int | None
    port_lo: int = _PORT_MIN
    port_hi: int = _PORT_MAX

    def __post_init__(self) -> None:
        if not isinstance(self.accept, bool):
            raise ConfigError(f"PolicyRule.accept must be a bool, not {self.accept!r}")
        net = self.network
        if net is not None:
            if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise ConfigError(f"PolicyRule.network must be an IP network, not {net!r}")
            if self.family not in (None, net.version):
                raise ConfigError(f"PolicyRule family {self.family} does not match {net}")
            object.__setattr__(self, "family", net.version)
            if net.prefixlen == 0:
                object.__setattr__(self, "network", None)
        elif self.family not in (None, 4, 6):
            raise ConfigError(f"PolicyRule.family must be None, 4 or 6, not {self.family!r}")
        for p in (self.port_lo, self.port_hi):
            if type(p) is not int or not _PORT_MIN <= p <= _PORT_MAX:
                raise ConfigError(f"PolicyRule port {p!r} outside 1-65535")
        if self.port_lo > self.port_hi:
            raise ConfigError(f"PolicyRule port range {self.port_lo}-{self.port_hi} is empty")

    # -- predicates -------------------------------------------------------------------
    @property
    def all_ports(self) -> bool:
        """True iff the rule covers every port 1-65535."""
        return self.port_lo == _PORT_MIN and self.port_hi == _PORT_MAX

    @property
    def is_catch_all(self) -> bool:
        """True iff the rule matches every address and port (``* : *``)."""
        return self.network is None and self.family is None and self.all_ports

    def covers_port(self, port: int) -> bool:
        """True iff *port* is inside the rule's port range."""
        return self.port_lo <= port <= self.port_hi

    def matches_address(self, addr: IPAddress) -> bool:
        """True iff the (already parsed) address matches the address pattern."""
        if self.family is not None and addr.version != self.family:
            return False
        return self.network is None or addr in self.network

    def matches(self, address: str | IPAddress, port: int) -> bool:
        """True iff the rule applies to ``address:port``."""
        return self.covers_port(port) and self.matches_address(_to_address(address))

    def contains_addresses_of(self, other: PolicyRule) -> bool:
        """True iff every address *other* matches is also matched by this rule."""
        if self.family is None and self.network is None:
            return True
        if other.family != self.family:
            return False
        if self.network is None:
            return True
        return other.network is not None and other.network.subnet_of(self.network)  # type: ignore[arg-type]

    def covers(self, other: PolicyRule) -> bool:
        """True iff this rule matches everything *other* matches (addresses and ports)."""
        return (
            self.port_lo <= other.port_lo
            and other.port_hi <= self.port_hi
            and self.contains_addresses_of(other)
        )

    # -- formatting -------------------------------------------------------------------
    def address_text(self) -> str:
        """The ``ADDR[/MASK]`` part in canonical form."""
        net = self.network
        if net is None:
            return {None: "*", 4: "*4", 6: "*6"}[self.family]
        base = str(net.network_address)
        if net.version == 6:
            base = f"[{base}]"
        if net.prefixlen != net.max_prefixlen:
            base += f"/{net.prefixlen}"
        return base

    def port_text(self) -> str:
        """The ``PORT`` part in canonical form (``*``, ``N`` or ``N-M``)."""
        if self.all_ports:
            return "*"
        if self.port_lo == self.port_hi:
            return str(self.port_lo)
        return f"{self.port_lo}-{self.port_hi}"

    def __str__(self) -> str:
        return f"{'accept' if self.accept else 'reject'} {self.address_text()}:{self.port_text()}"


_REJECT_STAR = PolicyRule(False, None, None)


def _normalize(rules: Iterable[PolicyRule]) -> tuple[PolicyRule, ...]:
    out: list[PolicyRule] = []
    for rule in rules:
        if not isinstance(rule, PolicyRule):
            raise ConfigError(f"not a PolicyRule: {rule!r}")
        if any(prev.covers(rule) for prev in out):
            continue
        out.append(rule)
        if rule.is_catch_all:
            break
    if not out or not out[-1].is_catch_all:
        out.append(_REJECT_STAR)
    final = out[-1]
    keep = len(out) - 1
    while keep > 0 and out[keep - 1].accept == final.accept:
        keep -= 1
    return tuple(out[:keep]) + (final,)


# -- parsing ----------------------------------------------------------------------------
def _bad(entry: str, why: str) -> ConfigError:
    return ConfigError(f"invalid exit policy rule {entry!r}: {why}")


def _parse_ports(text: str | None, entry: str) -> tuple[int, int]:
    if text is None or text == "*":
        return _PORT_MIN, _PORT_MAX
    lo_text, dash, hi_text = text.partition("-")
    if not dash:
        hi_text = lo_text
    if not (_DIGITS.fullmatch(lo_text) and _DIGITS.fullmatch(hi_text)):
        raise _bad(entry, f"bad port {text!r}")
    lo, hi = int(lo_text), int(hi_text)
    if not (_PORT_MIN <= lo <= _PORT_MAX and _PORT_MIN <= hi <= _PORT_MAX):
        raise _bad(entry, f"port {text!r} outside 1-65535")
    if lo > hi:
        raise _bad(entry, f"empty port range {text!r}")
    return lo, hi


def _parse_prefix(mask: str, version: int, entry: str) -> int:
    maxlen = 32 if version == 4 else 128
    if _DIGITS.fullmatch(mask):
        bits = int(mask)
        if bits > maxlen:
            raise _bad(entry, f"mask /{mask} too long for IPv{version}")
        return bits
    if version == 4 and mask.count(".") == 3:
        try:
            value = int(ipaddress.IPv4Address(mask))
        except ValueError:
            raise _bad(entry, f"bad mask {mask!r}") from None
        bits = bin(value).count("1")
        if value != ((1 << 32) - 1) ^ ((1 << (32 - bits)) - 1):
            raise _bad(entry, f"mask {mask!r} is not contiguous")
        return bits
    raise _bad(entry, f"bad mask {mask!r}")


def _split_pattern(pat: str, entry: str) -> tuple[str, bool, str | None, str | None]:
    """Split ``ADDR[/MASK][:PORT]`` into (addr, bracketed, mask, port)."""
    if pat.startswith("["):
        close = pat.find("]")
        if close < 0:
            raise _bad(entry, "missing ']'")
        addr, rest = pat[1:close], pat[close + 1 :]
        mask = port = None
        if rest.startswith("/"):
            mask, sep, port_part = rest[1:].partition(":")
            port = port_part if sep else None
        elif rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise _bad(entry, f"unexpected {rest!r} after address")
        return addr, True, mask, port
    head, sep, port_part = pat.partition(":")
    addr, slash, mask_part = head.partition("/")
    return addr, False, (mask_part if slash else None), (port_part if sep else None)


def _parse_entry(entry: str) -> list[PolicyRule]:
    words = entry.split()
    if len(words) != 2:
        raise _bad(entry, "expected 'accept|reject[6] ADDR[/MASK][:PORT]'")
    keyword = words[0].lower()
    if keyword not in _KEYWORDS:
        raise _bad(entry, f"unknown action {words[0]!r}")
    accept, v6_only = _KEYWORDS[keyword]
    addr_text, bracketed, mask, port_text = _split_pattern(words[1], entry)
    lo, hi = _parse_ports(port_text, entry)
    word = addr_text.lower()

    if not bracketed and word in ("*", "*4", "*6", "private"):
        if mask is not None:
            raise _bad(entry, f"{addr_text!r} cannot take a mask")
        if word == "private":
            nets = [n for n in PRIVATE_NETWORKS if n.version == 6 or not v6_only]
            return [PolicyRule(accept, n, n.version, lo, hi) for n in nets]
        family = {"*": 6 if v6_only else None, "*4": 4, "*6": 6}[word]
        if family == 4 and v6_only:
            raise _bad(entry, f"{words[0]} cannot use an IPv4 pattern")
        return [PolicyRule(accept, None, family, lo, hi)]

    if bracketed:
        if "%" in addr_text:
            raise _bad(entry, "scoped IPv6 addresses are not allowed")
        try:
            address: IPAddress = ipaddress.IPv6Address(addr_text)
        except ValueError:
            raise _bad(entry, f"bad IPv6 address {addr_text!r}") from None
    else:
        if not addr_text:
            raise _bad(entry, "missing address (IPv6 addresses need [brackets])")
        try:
            address = ipaddress.IPv4Address(addr_text)
        except ValueError:
            raise _bad(entry, f"bad IPv4 address {addr_text!r}") from None
        if v6_only:
            raise _bad(entry, f"{words[0]} cannot use an IPv4 address")
    bits = address.max_prefixlen if mask is None else _parse_prefix(mask, address.version, entry)
    network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
    return [PolicyRule(accept, network, address.version, lo, hi)]


def _entries(text_or_lines: str | Iterable[str]) -> Iterable[str]:
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else text_or_lines
    for line in lines:
        if not isinstance(line, str):
            raise ConfigError(f"exit policy lines must be strings, not {type(line).__name__}")
        line = line.split("#", 1)[0]
        for entry in line.split(","):
            entry = entry.strip()
            if entry:
                yield entry


# -- port summaries ---------------------------------------------------------------------
def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _ranges_text(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


@dataclass(frozen=True)
class PortSummary:
    """A microdescriptor ``p`` line body: ``accept`` or ``reject`` a set of port ranges.

    ``ranges`` are sorted, merged and non-empty; ports outside them get the opposite
    verdict.
    """

    accept: bool
    ranges: tuple[tuple[int, int], ...]

    def allows_port(self, port: int) -> bool:
        """True iff the summary says the exit accepts *port* (for most addresses)."""
        listed = any(lo <= port <= hi for lo, hi in self.ranges)
        return listed == self.accept if _PORT_MIN <= port <= _PORT_MAX else False

    @property
    def accepts_anything(self) -> bool:
        """True iff at least one port is accepted."""
        if self.accept:
            return bool(self.ranges)
        return self.ranges != ((_PORT_MIN, _PORT_MAX),)

    def __str__(self) -> str:
        return f"{'accept' if self.accept else 'reject'} {_ranges_text(self.ranges)}"


def _summary_count(rule: PolicyRule, family: int) -> int:
    if family == 4:
        bits = 0 if rule.network is None else rule.network.prefixlen
        return 1 << (32 - bits)
    bits = 0 if rule.network is None else rule.network.prefixlen
    return 1 << (64 - bits) if bits < 64 else 1


def _summarize(rules: tuple[PolicyRule, ...], family: int) -> PortSummary:
    relevant = [r for r in rules if r.family in (None, family)]
    cuts = {_PORT_MIN, _PORT_MAX + 1}
    for r in relevant:
        cuts.update((r.port_lo, r.port_hi + 1))
    bounds = sorted(cuts)
    segments = list(zip(bounds, (b - 1 for b in bounds[1:])))
    rejected = [0] * len(segments)
    accepted = [False] * len(segments)
    cutoff = _V4_CUTOFF if family == 4 else _V6_CUTOFF
    for r in relevant:
        if r.accept and r.network is not None:
            continue  # only wildcard accepts count
        if not r.accept and r.network is not None and _is_private_network(r.network):
            continue  # rejecting private space says nothing about public reachability
        count = _summary_count(r, family)
        for i, (lo, hi) in enumerate(segments):
            if r.port_lo <= lo and hi <= r.port_hi:
                if r.accept:
                    if not accepted[i] and rejected[i] <= cutoff:
                        accepted[i] = True
                else:
                    rejected[i] += count
    acc = _merge_ranges(s for s, a in zip(segments, accepted) if a)
    rej = _merge_ranges(s for s, a in zip(segments, accepted) if not a)
    if not acc:
        return PortSummary(False, ((_PORT_MIN, _PORT_MAX),))
    if not rej:
        return PortSummary(True, ((_PORT_MIN, _PORT_MAX),))
    acc_len, rej_len = len(_ranges_text(acc)), len(_ranges_text(rej))
    room = MAX_SUMMARY_LEN - len("accept ")
    if acc_len > room and rej_len > room:
        kept: list[tuple[int, int]] = []
        for rng in acc:  # keep the accept list, dropping ranges that do not fit
            if len(_ranges_text([*kept, rng])) > room:
                break
            kept.append(rng)
        return PortSummary(True, tuple(kept))
    if rej_len < acc_len:
        return PortSummary(False, rej)
    return PortSummary(True, acc)


# -- the policy -------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitPolicy:
    """An ordered, normalised list of :class:`PolicyRule` (first match wins)."""

    rules: tuple[PolicyRule, ...] = (_REJECT_STAR,)

    def __post_init__(self) -> None:
        if isinstance(self.rules, (str, bytes)) or not isinstance(self.rules, Iterable):
            raise ConfigError("ExitPolicy.rules must be an iterable of PolicyRule")
        object.__setattr__(self, "rules", _normalize(self.rules))

    @classmethod
    def parse(cls, text_or_lines: str | Iterable[str], *, reject_private: bool = True) -> ExitPolicy:
        """Parse torrc-style rules (comma- or newline-separated); raise ConfigError on bad syntax.

        With *reject_private* (the default), ``reject private:*`` is placed first.
        """
        if isinstance(text_or_lines, bytes) or not isinstance(text_or_lines, (str, Iterable)):
            raise ConfigError("exit policy must be a string or a list of strings")
        rules: list[PolicyRule] = []
        if reject_private:
            rules.extend(PolicyRule(False, n, n.version) for n in PRIVATE_NETWORKS)
        for entry in _entries(text_or_lines):
            rules.extend(_parse_entry(entry))
        return cls(tuple(rules))

    def rejecting(self, addresses: Iterable[str | IPAddress]) -> ExitPolicy:
        """This policy with ``reject ADDR:*`` for each address (tor's
        ExitPolicyRejectMyAddresses: an exit never connects to its own addresses), placed
        where tor places them: after a leading ``reject private:*`` block, before the rest.
        Unspecified addresses (0.0.0.0, ::) are skipped; rules that an earlier rule
        already covers vanish, as always."""
        extra = []
        for a in addresses:
            addr = _to_address(a)
            if not addr.is_unspecified:
                extra.append(PolicyRule(False, ipaddress.ip_network(addr), addr.version))
        if not extra:
            return self
        private = {PolicyRule(False, n, n.version) for n in PRIVATE_NETWORKS}
        k = 0
        while k < len(self.rules) and self.rules[k] in private:
            k += 1
        return ExitPolicy((*self.rules[:k], *extra, *self.rules[k:]))

    @classmethod
    def reject_all(cls) -> ExitPolicy:
        """The policy ``reject *:*`` (not an exit)."""
        return REJECT_ALL

    @classmethod
    def parse_summary(cls, s: str) -> PortSummary:
        """Parse a ``p``/``p6`` line body such as ``accept 80,443``; ProtocolError if malformed."""
        if not isinstance(s, str):
            raise ProtocolError("policy summary must be text")
        if len(s) > _MAX_SUMMARY_INPUT:
            raise ProtocolError("policy summary too long")
        action, sep, body = s.partition(" ")
        if not sep or action not in ("accept", "reject") or not body:
            raise ProtocolError(f"malformed policy summary {s[:80]!r}")
        ranges: list[tuple[int, int]] = []
        for item in body.split(","):
            lo_text, dash, hi_text = item.partition("-")
            if not dash:
                hi_text = lo_text
            if not (_DIGITS.fullmatch(lo_text) and _DIGITS.fullmatch(hi_text)):
                raise ProtocolError(f"malformed port range {item[:20]!r} in policy summary")
            lo, hi = int(lo_text), int(hi_text)
            if not (_PORT_MIN <= lo <= hi <= _PORT_MAX):
                raise ProtocolError(f"bad port range {item!r} in policy summary")
            ranges.append((lo, hi))
        return PortSummary(action == "accept", _merge_ranges(ranges))

    # -- evaluation -------------------------------------------------------------------
    def allows(self, address: str | IPAddress, port: int) -> bool:
        """True iff the first rule matching ``address:port`` accepts (IP literals only)."""
        addr = _to_address(address)
        if type(port) is not int or not _PORT_MIN <= port <= _PORT_MAX:
            return False
        for rule in self.rules:
            if rule.covers_port(port) and rule.matches_address(addr):
                return rule.accept
        return False

    def might_allow_port(self, port: int) -> bool:
        """True unless *port* is certainly rejected for every address.

        For a destination whose address is not known yet (a hostname). Conservative in the
        "maybe" direction: True iff some accept rule covers *port* and no single earlier
        rule covering *port* matches all of that accept rule's addresses. Private
        addresses count, so an exit that only accepts e.g. 127.0.0.1 might allow the port.
        """
        if type(port) is not int or not _PORT_MIN <= port <= _PORT_MAX:
            return False
        earlier: list[PolicyRule] = []
        for rule in self.rules:
            if rule.covers_port(port):
                if rule.accept and not any(e.contains_addresses_of(rule) for e in earlier):
                    return True
                earlier.append(rule)
        return False

    @property
    def is_exit(self) -> bool:
        """True iff the policy might accept some address on some port."""
        for i, rule in enumerate(self.rules):
            if not rule.accept:
                continue
            blockers = [
                (e.port_lo, e.port_hi) for e in self.rules[:i] if e.contains_addresses_of(rule)
            ]
            covered = [
                (max(lo, rule.port_lo), min(hi, rule.port_hi))
                for lo, hi in _merge_ranges(blockers)
                if lo <= rule.port_hi and hi >= rule.port_lo
            ]
            if covered != [(rule.port_lo, rule.port_hi)]:
                return True
        return False

    def port_summary(self, family: int = 4) -> PortSummary:
        """The port summary over public addresses of *family* (4 for ``p``, 6 for ``p6``)."""
        if family not in (4, 6):
            raise LocalProtocolError(f"family must be 4 or 6, not {family!r}")
        return _summarize(self.rules, family)

    def summary(self, family: int = 4) -> str:
        """The microdescriptor ``p`` (family 4) or ``p6`` (family 6) line body."""
        return str(self.port_summary(family))

    # -- formatting -------------------------------------------------------------------
    def lines(self) -> list[str]:
        """The rules in canonical torrc form, one string per rule."""
        return [str(r) for r in self.rules]

    def __str__(self) -> str:
        return ", ".join(self.lines())


#: The policy that rejects everything.
REJECT_ALL = ExitPolicy((_REJECT_STAR,))
