"""Addresses as written in configs and documents: ``host:port``, ``[v6]:port`` (pure)."""

from __future__ import annotations

import ipaddress
import re

from onionp2p.errors import ConfigError

__all__ = ["parse_hostport", "format_hostport"]

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")


def _check_host(host: str, original: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise ConfigError(f"scoped IPv6 address not supported in {original!r}")
        return str(ip)
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(x) for x in name.split(".")):
        raise ConfigError(f"invalid host {host!r} in address {original!r}")
    if all(x.isdigit() for x in name.split(".")):
        raise ConfigError(f"invalid IPv4 address {host!r} in {original!r}")
    return name


def _check_port(text: str, original: str) -> int:
    if not _PORT_TEXT.fullmatch(text):
        raise ConfigError(f"invalid port {text!r} in address {original!r}")
    port = int(text)
    if port > 65535:
        raise ConfigError(f"port {port} out of range 0-65535 in {original!r}")
    return port


def parse_hostport(s: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port``, ``:port`` or ``port`` into ``(host, port)``.

    IP literals come back in canonical form (IPv6 without brackets); port 0 is allowed
    (pick a free port). Raises ConfigError on anything else.
    """
    if not isinstance(s, str):
        raise ConfigError(f"address must be a string, not {type(s).__name__}")
    text = s.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigError(f"expected '[ipv6]:port', got {s!r}")
        inner = text[1:close]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ConfigError(f"invalid IPv6 address {inner!r} in {s!r}") from None
        return _check_host(inner, s), _check_port(text[close + 2 :], s)
    if text.count(":") > 1:
        raise ConfigError(f"IPv6 addresses must be written as '[addr]:port', got {s!r}")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return _check_host(default_host, s), _check_port(text, s)
    return _check_host(host if host else default_host, s), _check_port(port_text, s)


def format_hostport(host: str, port: int) -> str:
    """Inverse of :func:`parse_hostport`: bracket IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
