"""Onion-service key formats as tor writes them (HiddenServiceDir, client authorization files).

*HiddenServiceDir* (tor's ``hs_service.c``): three files.

* ``hs_ed25519_secret_key``: a 32-byte tag ``"== ed25519v1-secret: type0 =="`` padded with
  NUL bytes, then the 64-byte *expanded* secret key (scalar | nonce prefix). tor stores the
  expanded form so that keys found by a vanity search (which walks scalars, not seeds)
  can be stored; we do the same, so any tor key loads here and ours load in tor.
* ``hs_ed25519_public_key``: the tag ``"== ed25519v1-public: type0 =="`` padded to 32 bytes,
  then the 32-byte public key.
* ``hostname``: the onion address and a newline.

*Client authorization* (tor(1) "CLIENT AUTHORIZATION", rend-spec-v3 Appendix G): a
service's ``authorized_clients/<name>.auth`` holds ``descriptor:x25519:<base32 public>``;
a client's ``ClientOnionAuthDir/<name>.auth_private`` holds
``<56-char address without .onion>:descriptor:x25519:<base32 secret>``. Base32 is RFC 4648
without padding; tor writes upper case and reads either.

Everything here turns bytes into keys and back; reading and writing the files is
:mod:`onionp2p.client.hskeys`'s job.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.errors import KeyFileError, OnionAddressError
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.address import encode_onion_address, parse_onion_address

__all__ = [
    "HOSTNAME_FILE",
    "PUBLIC_KEY_FILE",
    "SECRET_KEY_FILE",
    "ClientAuthPrivate",
    "decode_public_key_file",
    "decode_secret_key_file",
    "encode_public_key_file",
    "encode_secret_key_file",
    "format_auth",
    "format_auth_private",
    "hostname_file",
    "parse_auth",
    "parse_auth_private",
]

SECRET_KEY_FILE = "hs_ed25519_secret_key"
PUBLIC_KEY_FILE = "hs_ed25519_public_key"
HOSTNAME_FILE = "hostname"
_SECRET_TAG = b"== ed25519v1-secret: type0 =="
_PUBLIC_TAG = b"== ed25519v1-public: type0 =="
_TAG_LEN = 32


def _tagged(tag: bytes, body: bytes) -> bytes:
    return tag.ljust(_TAG_LEN, b"\x00") + body


def _untag(data: bytes, tag: bytes, body_len: int, what: str) -> bytes:
    if len(data) != _TAG_LEN + body_len:
        raise KeyFileError(f"{what}: {len(data)} bytes, expected {_TAG_LEN + body_len}")
    if data[:_TAG_LEN] != tag.ljust(_TAG_LEN, b"\x00"):
        raise KeyFileError(f"{what}: the file does not start with {tag.decode()!r}")
    return data[_TAG_LEN:]


def encode_secret_key_file(key: ExpandedKey) -> bytes:
    return _tagged(_SECRET_TAG, key.scalar + key.prefix)


def decode_secret_key_file(data: bytes) -> ExpandedKey:
    """The identity key from ``hs_ed25519_secret_key``; KeyFileError if the file is not one."""
    body = _untag(data, _SECRET_TAG, 64, SECRET_KEY_FILE)
    try:
        return ExpandedKey.from_parts(body[:32], body[32:])
    except ValueError as exc:
        raise KeyFileError(f"{SECRET_KEY_FILE}: {exc}") from None


def encode_public_key_file(public: bytes) -> bytes:
    return _tagged(_PUBLIC_TAG, public)


def decode_public_key_file(data: bytes) -> bytes:
    return _untag(data, _PUBLIC_TAG, 32, PUBLIC_KEY_FILE)


def hostname_file(public: bytes) -> bytes:
    return (encode_onion_address(public) + "\n").encode("ascii")


# -- client authorization -------------------------------------------------------------------------


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _unb32(text: str, what: str) -> bytes:
    try:
        raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{what}: the key is not base32") from None
    if len(raw) != 32:
        raise KeyFileError(f"{what}: the key is {len(raw)} bytes, expected 32")
    return raw


def _one_line(text: str, what: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"{what}: expected one key line, found {len(lines)}")
    return lines[0]


def format_auth(client_public: bytes) -> str:
    """The line of a service's ``<name>.auth`` file for an authorized client's x25519 key."""
    return f"descriptor:x25519:{_b32(client_public)}\n"


def parse_auth(text: str, what: str = ".auth file") -> bytes:
    """The client's x25519 public key from a service's ``.auth`` file."""
    parts = _one_line(text, what).split(":")
    if len(parts) != 3 or parts[0] != "descriptor" or parts[1] != "x25519":
        raise KeyFileError(f"{what}: expected 'descriptor:x25519:<base32 key>'")
    return _unb32(parts[2], what)


@dataclass(frozen=True)
class ClientAuthPrivate:
    """One ``.auth_private`` entry: which service, and our x25519 secret for it."""

    onion_public: bytes
    secret: bytes

    def private_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.secret)


def format_auth_private(onion_public: bytes, secret: bytes) -> str:
    label = encode_onion_address(onion_public).removesuffix(".onion")
    return f"{label}:descriptor:x25519:{_b32(secret)}\n"


def parse_auth_private(text: str, what: str = ".auth_private file") -> ClientAuthPrivate:
    """A client's ``.auth_private`` entry (the address may be given with or without ``.onion``)."""
    parts = _one_line(text, what).split(":")
    if len(parts) != 4 or parts[1] != "descriptor" or parts[2] != "x25519":
        raise KeyFileError(f"{what}: expected '<onion address>:descriptor:x25519:<base32 key>'")
    host = parts[0] if parts[0].lower().endswith(".onion") else parts[0] + ".onion"
    try:
        address = parse_onion_address(host, allow_subdomain=False)
    except OnionAddressError as exc:
        raise KeyFileError(f"{what}: {exc}") from None
    return ClientAuthPrivate(address.pubkey, _unb32(parts[3], what))
