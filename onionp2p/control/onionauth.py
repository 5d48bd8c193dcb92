"""ONION_CLIENT_AUTH_ADD, ONION_CLIENT_AUTH_REMOVE and ONION_CLIENT_AUTH_VIEW (control-spec
§3.30-3.32): a controller manages our client-authorization keys for onion services.

The keys are the node's :class:`~onionp2p.client.hskeys.ClientOnionAuth` (the keys read
from ``client_onion_auth_dir`` plus those added here). The node adapter offers it as
``client_onion_auth()`` (None on a relay: the commands then answer 511) and is told of a
change with ``onion_auth_changed(identity)`` (the onion-service client forgets what it
cached for that service, as tor purges its descriptor cache entry).

Replies are tor's (control_hs.c): ADD answers 250, or 251 "Client for onion existed and
replaced"; 512 for a bad address or key, 552 for a key type other than x25519, 553 when a
``Flags=Permanent`` key cannot be stored; REMOVE answers 250, or 251 "No credentials for
...". VIEW lists ``CLIENT <address> x25519:<base64 key> [ClientName=...] [Flags=Permanent]``.
The private key blob is base64 (tor's format), unlike the base32 of ``.auth_private`` files.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from onionp2p.client.hskeys import ClientOnionAuth
from onionp2p.errors import KeyFileError, OnionAddressError
from onionp2p.proto.control import ControlError, format_reply, qecho, split_args, split_keyword
from onionp2p.proto.hs.address import encode_onion_address, parse_onion_address
from onionp2p.proto.hs.keys import ClientAuthPrivate

__all__ = ["client_auth_add", "client_auth_remove", "client_auth_view"]

_NICKNAME_MAX = 32  # tor's REND_CLIENTNAME_MAX_LEN is 16 for v2; v3 accepts any short token


def _auth(node: Any) -> ClientOnionAuth:
    get = getattr(node, "client_onion_auth", None)
    auth = get() if get is not None else None
    if auth is None:
        raise ControlError(511, "client authorization needs a client node")
    return auth


def _identity(address: str) -> bytes:
    """The service key of ``address`` (given without ".onion", as tor expects)."""
    try:
        return parse_onion_address(address + ".onion", allow_subdomain=False).pubkey
    except OnionAddressError:
        raise ControlError(512, f"Invalid v3 address {qecho(address)}") from None


def _changed(node: Any, identity: bytes) -> None:
    notify = getattr(node, "onion_auth_changed", None)
    if notify is not None:
        notify(identity)


def client_auth_add(node: Any, args: str) -> bytes:
    """``ONION_CLIENT_AUTH_ADD HSAddress x25519:Blob [ClientName=N] [Flags=Permanent]``."""
    auth = _auth(node)
    tokens = split_args(args)
    if len(tokens) < 2:
        raise ControlError(512, "Bad arguments to ONION_CLIENT_AUTH_ADD: need an address and a key")
    identity = _identity(tokens[0])
    key_type, _, blob = tokens[1].partition(":")
    if key_type != "x25519":
        raise ControlError(552, f"Unrecognized key type {qecho(key_type)}")
    try:
        secret = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True)
    except (binascii.Error, ValueError):
        secret = b""
    if len(secret) != 32:
        raise ControlError(512, "Failed to decode x25519 private key")
    nickname, permanent = None, False
    for token in tokens[2:]:
        key, value = split_keyword(token)
        if key == "ClientName" and value and len(value) <= _NICKNAME_MAX and value.isprintable():
            nickname = value
        elif key == "Flags" and value is not None:
            flags = value.split(",")
            if any(f != "Permanent" for f in flags):
                raise ControlError(552, f"Invalid 'Flags' argument: {qecho(value)}")
            permanent = True
        else:
            raise ControlError(512, f"Invalid argument {qecho(token)}")
    try:
        replaced = auth.add(ClientAuthPrivate(identity, secret), nickname=nickname, permanent=permanent)
    except (KeyFileError, OSError):
        raise ControlError(553, f"Unable to store creds for {qecho(tokens[0])}") from None
    _changed(node, identity)
    if replaced:
        return format_reply(251, ["Client for onion existed and replaced"])
    return format_reply(250, ["OK"])


def client_auth_remove(node: Any, args: str) -> bytes:
    """``ONION_CLIENT_AUTH_REMOVE HSAddress``."""
    auth = _auth(node)
    tokens = split_args(args)
    if len(tokens) != 1:
        raise ControlError(512, "Bad arguments to ONION_CLIENT_AUTH_REMOVE: need one address")
    identity = _identity(tokens[0])
    if not auth.remove(identity):
        return format_reply(251, [f"No credentials for {qecho(tokens[0])}"])
    _changed(node, identity)
    return format_reply(250, ["OK"])


def client_auth_view(node: Any, args: str) -> bytes:
    """``ONION_CLIENT_AUTH_VIEW [HSAddress]``."""
    auth = _auth(node)
    tokens = split_args(args)
    if len(tokens) > 1:
        raise ControlError(512, "Bad arguments to ONION_CLIENT_AUTH_VIEW: at most one address")
    wanted = _identity(tokens[0]) if tokens else None
    lines = ["ONION_CLIENT_AUTH_VIEW" + (f" {tokens[0]}" if tokens else "")]
    for entry in auth.entries():
        if wanted is not None and entry.key.onion_public != wanted:
            continue
        address = encode_onion_address(entry.key.onion_public).removesuffix(".onion")
        line = f"CLIENT {address} x25519:{base64.b64encode(entry.key.secret).decode().rstrip('=')}"
        if entry.nickname:
            line += f" ClientName={entry.nickname}"
        if entry.permanent:
            line += " Flags=Permanent"
        lines.append(line)
    return format_reply(250, [*lines, "OK"])
