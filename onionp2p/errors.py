"""Typed errors.

Every failure that can be caused by bytes from the network is a :class:`ProtocolError`
(or a subclass). Code that reads untrusted input must never let anything else escape:
``IndexError``, ``struct.error`` or construct's internal errors are converted at the
boundary. :class:`LocalProtocolError` means *we* (the caller) misused an API.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = [
    "OnionError",
    "ProtocolError",
    "HandshakeError",
    "CertificateError",
    "DigestMismatch",
    "LocalProtocolError",
    "KeyFileError",
    "ConfigError",
    "ListenError",
    "CircuitError",
    "StreamError",
    "OnionAddressError",
    "OnionAddressMalformed",
    "OnionAddressChecksumError",
    "HsDescriptorError",
    "HsDescriptorSignatureError",
    "HsDescriptorDecryptError",
    "HsClientAuthError",
]


class OnionError(Exception):
    """Base class of every error raised by onionp2p."""


class ProtocolError(OnionError):
    """A peer sent something that violates the protocol (malformed, out of order, too big)."""


class HandshakeError(ProtocolError):
    """A link or circuit handshake failed (bad MAC, wrong identity, invalid key)."""


class CertificateError(ProtocolError):
    """A certificate is malformed, expired, badly signed or does not chain as required."""


class DigestMismatch(ProtocolError):
    """A relay cell or authenticated SENDME carried a digest that does not match."""


class LocalProtocolError(OnionError):
    """The local caller misused an API (e.g. sent data on a closed stream)."""


class KeyFileError(OnionError):
    """A key file is missing, unreadable, corrupt or has unsafe permissions."""


class ConfigError(OnionError):
    """A configuration file or option is invalid. ``problems``: one line per problem (a
    file with several bad keys reports them all at once); the message joins them."""

    def __init__(self, message: str, *, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


class ListenError(OnionError):
    """A listener (OR, SOCKS, control, metrics, directory port ...) could not bind.

    Raised at start-up, before anything slow happens, so that ``onionp2p`` prints one line
    naming the port and the reason and exits 2 (as tor does when an ORPort is taken):
    ``cannot listen on SOCKS port 127.0.0.1:9050: address already in use``.
    """

    def __init__(self, kind: str, host: str, port: int, reason: str):
        super().__init__(f"cannot listen on {kind} {_hostport(host, port)}: {reason}")
        self.kind = kind
        self.host = host
        self.port = port
        self.reason = reason

    @classmethod
    def from_os_error(cls, kind: str, host: str, port: int, exc: OSError) -> ListenError:
        """``exc`` from bind/listen as one line: the reason in lower case, without the errno or
        asyncio's "error while attempting to bind on address ..." wrapping."""
        if exc.errno and exc.errno > 0:  # getaddrinfo's errors have negative EAI codes
            text = os.strerror(exc.errno)
        else:
            text = exc.strerror or str(exc) or type(exc).__name__
        return cls(kind, host, port, text[:1].lower() + text[1:])


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CircuitError(OnionError):
    """Building or using a circuit failed; ``reason`` is a DestroyReason name or a text."""

    def __init__(self, message: str, reason: str = "NONE"):
        super().__init__(message)
        self.reason = reason


class StreamError(OnionError):
    """A stream was refused or broken; ``reason`` is the RELAY_END reason (an int; the
    default 1 is MISC)."""

    def __init__(self, message: str, reason: int = 1):
        super().__init__(message)
        self.reason = reason


class OnionAddressError(ProtocolError):
    """A ``.onion`` name is not a usable v3 onion address (rend-spec-v3 §6).

    tor answers both kinds below with the same SOCKS5 extended error X'F6' ("Onion Service
    Invalid Address"); the subclasses exist so that callers and logs can tell them apart.
    """


class OnionAddressMalformed(OnionAddressError):
    """Not a v3 address at all: wrong length, bad base32, a version byte other than 3, a
    subdomain where none is allowed, or a key that is not a point of the prime-order group."""


class OnionAddressChecksumError(OnionAddressError):
    """A well-formed v3 address whose two checksum bytes do not match its key (a typo)."""


class HsDescriptorError(ProtocolError):
    """An onion-service descriptor is malformed, too big, expired or inconsistent."""


class HsDescriptorSignatureError(HsDescriptorError):
    """A descriptor's signature or one of its certificates does not verify."""


class HsDescriptorDecryptError(HsDescriptorError):
    """A descriptor layer's MAC does not match: wrong subcredential (the wrong onion
    address or time period), wrong revision counter, or a corrupted blob."""


class HsClientAuthError(HsDescriptorError):
    """The descriptor's inner layer needs client authorization we lack (``missing``, tor's
    SOCKS X'F4') or that no ``auth-client`` entry accepts (tor's X'F5')."""

    def __init__(self, message: str, *, missing: bool):
        super().__init__(message)
        self.missing = missing


class HsIntroduceError(ProtocolError):
    """An INTRODUCE2 an onion service drops; ``reason`` says why (malformed, unknown_auth_key,
    bad_mac, replay, rate_limited, bad_onion_key), as it is counted in the metrics."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
