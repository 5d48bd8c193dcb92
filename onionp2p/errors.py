"""Typed errors.

Every failure that can be caused by bytes from the network is a :class:`ProtocolError`
(or a subclass). Code that reads untrusted input must never let anything else escape:
``IndexError``, ``struct.error`` or construct's internal errors are converted at the
boundary. :class:`LocalProtocolError` means *we* (the caller) misused an API.
"""

from __future__ import annotations

__all__ = [
    "OnionError",
    "ProtocolError",
    "HandshakeError",
    "CertificateError",
    "DigestMismatch",
    "LocalProtocolError",
    "KeyFileError",
    "ConfigError",
    "CircuitError",
    "StreamError",
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
    """A configuration file or option is invalid."""


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
