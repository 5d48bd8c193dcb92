"""tor's routerset, as its ExcludeNodes option takes one: which relays a client never uses.

Pure: parsing the configured names and matching relays against them. Path selection
(:mod:`onionp2p.client.pathsel`) and the guard set apply it; specs/pathsel.md says where.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from onionp2p.proto.directory import RelayInfo, RouterStatus

__all__ = ["NodeSet"]

_HEX40 = re.compile(r"[0-9A-Fa-f]{40}")
_NICK = re.compile(r"[A-Za-z0-9]{1,19}")


class NodeSet:
    """tor's routerset, as ``ExcludeNodes`` takes it: relays named by identity fingerprint
    (``$HEX``, ``HEX``, ``$HEX~nick``, ``$HEX=nick``), by nickname (case-insensitive), or by
    address (``192.0.2.7``, ``192.0.2.0/24``, IPv6 alike). Country codes (``{cc}``) need a
    GeoIP database, which we do not have: they are refused, as are ``*`` patterns."""

    def __init__(self, items: Iterable[str] = ()):
        self.items = tuple(items)
        fps: set[str] = set()
        named: set[tuple[str, str]] = set()
        nicks: set[str] = set()
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in self.items:
            item = raw.strip()
            hexpart, sep, nick = item.lstrip("$").replace("=", "~").partition("~")
            if _HEX40.fullmatch(hexpart) and (not sep or _NICK.fullmatch(nick)):
                if sep:
                    named.add((hexpart.upper(), nick.lower()))
                else:
                    fps.add(hexpart.upper())
            elif _NICK.fullmatch(item):
                nicks.add(item.lower())
            else:
                try:
                    nets.append(ipaddress.ip_network(item.strip("[]"), strict=False))
                except ValueError:
                    what = "country codes need GeoIP, which onionp2p does not have" if item.startswith("{") \
                        else "not a $fingerprint, nickname or address"
                    raise ValueError(f"{raw!r}: {what}") from None
        self._fps, self._named, self._nicks = frozenset(fps), frozenset(named), frozenset(nicks)
        self._nets = nets

    def __bool__(self) -> bool:
        return bool(self.items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeSet) and set(self.items) == set(other.items)

    def __hash__(self) -> int:
        return hash(frozenset(self.items))

    def __repr__(self) -> str:
        return f"NodeSet({list(self.items)!r})"

    def contains(self, info: RelayInfo | RouterStatus) -> bool:
        """Does the set name this relay (a consensus entry, or a relay known only from link
        specifiers, whose nickname is not its own)?"""
        if not self.items:
            return False
        ri = info.info if isinstance(info, RouterStatus) else info
        fp, nick = ri.fingerprint, ri.nickname.lower()
        if fp in self._fps or (fp, nick) in self._named:
            return True
        if isinstance(info, RouterStatus) and nick in self._nicks:
            return True
        if self._nets:
            try:
                ip = ipaddress.ip_address(ri.address)
            except ValueError:
                return False
            return any(ip in n for n in self._nets)
        return False
