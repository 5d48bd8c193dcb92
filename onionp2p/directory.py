"""Directory information about relays (specs/directory.md).

For now this module holds :class:`RelayInfo`, what a client must know about a relay
to build a circuit through it: where it listens, its identities (Ed25519 and the
legacy RSA SHA-1 digest) and its current ntor onion key. A running relay writes its
own ``relay-info.json`` into its data directory; the directory protocol (descriptors,
authorities, consensus) builds on the same record.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ProtocolError

__all__ = ["RelayInfo", "RouterStatus"]


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode().rstrip("=")


def _unb64(s: str, n: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (ValueError, TypeError):
        raise ProtocolError(f"relay info: {what} is not base64") from None
    if len(raw) != n:
        raise ProtocolError(f"relay info: {what} must be {n} bytes")
    return raw


@dataclass(frozen=True)
class RelayInfo:
    """How to reach and authenticate one relay."""

    nickname: str
    address: str
    or_port: int
    rsa_id: bytes  # SHA-1 of the RSA identity key (the tor fingerprint)
    ed_id: bytes  # Ed25519 master identity key
    ntor_key: bytes  # current X25519 onion key
    exit_policy: str = "reject 1-65535"  # policy summary (microdescriptor "p" line)

    @property
    def fingerprint(self) -> str:
        return self.rsa_id.hex().upper()

    def to_dict(self) -> dict:
        return {
            "nickname": self.nickname,
            "address": self.address,
            "or_port": self.or_port,
            "fingerprint": self.fingerprint,
            "ed25519_id": _b64(self.ed_id),
            "ntor_onion_key": _b64(self.ntor_key),
            "exit_policy": self.exit_policy,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RelayInfo:
        try:
            fp = bytes.fromhex(d["fingerprint"])
            if len(fp) != 20:
                raise ValueError
            port = int(d["or_port"])
            if not 0 < port < 65536:
                raise ValueError
            return cls(
                nickname=str(d["nickname"]), address=str(d["address"]), or_port=port, rsa_id=fp,
                ed_id=_unb64(d["ed25519_id"], 32, "ed25519_id"),
                ntor_key=_unb64(d["ntor_onion_key"], 32, "ntor_onion_key"),
                exit_policy=str(d.get("exit_policy", "reject 1-65535")),
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            raise ProtocolError("relay info: missing or malformed field") from None

    def save(self, path: Path | str) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> RelayInfo:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"relay info {path}: {exc}") from None


@dataclass(frozen=True)
class RouterStatus:
    """One relay as listed in a consensus: how to reach it plus what the authorities say.

    ``flags`` uses tor's flag names (Exit, Fast, Guard, Running, Stable, Valid, ...);
    ``bandwidth`` is the consensus weight (KB/s, as tor's ``w Bandwidth=``); ``family``
    holds the upper-case hex fingerprints the relay declares as its family.
    """

    info: RelayInfo
    flags: frozenset[str] = frozenset()
    bandwidth: int = 0
    family: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def nickname(self) -> str:
        return self.info.nickname
