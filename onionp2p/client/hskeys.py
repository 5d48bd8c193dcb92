"""An onion service's HiddenServiceDir on disk, compatible with tor's.

The directory holds ``hs_ed25519_secret_key``, ``hs_ed25519_public_key`` and ``hostname``
in tor's formats (:mod:`onionp2p.proto.hs.keys`), so a directory made by tor works here and
one made here works in tor (tests/test_hs_desc.py starts a real tor on one). The directory
is created with mode 0700 and the files with 0600, as tor insists; a secret key readable by
others is refused (:class:`~onionp2p.errors.KeyFileError`, with the chmod that fixes it).
If only the secret key exists, the public key and ``hostname`` are rewritten from it, as
tor does; if the public key file disagrees with the secret key, that is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from onionp2p.errors import KeyFileError
from onionp2p.keyfiles import ensure_private_dir, read_key_file, write_key_file
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.address import encode_onion_address
from onionp2p.proto.hs.keys import (
    HOSTNAME_FILE,
    PUBLIC_KEY_FILE,
    SECRET_KEY_FILE,
    decode_public_key_file,
    decode_secret_key_file,
    encode_public_key_file,
    encode_secret_key_file,
    hostname_file,
)

__all__ = ["load_or_create_service_key", "load_service_key", "write_service_dir"]


def write_service_dir(directory: Path | str, key: ExpandedKey) -> str:
    """Write the three files for ``key`` into ``directory``; return the onion address."""
    d = Path(directory)
    ensure_private_dir(d)
    write_key_file(d / SECRET_KEY_FILE, encode_secret_key_file(key))
    write_key_file(d / PUBLIC_KEY_FILE, encode_public_key_file(key.public))
    write_key_file(d / HOSTNAME_FILE, hostname_file(key.public))
    return encode_onion_address(key.public)


def load_service_key(directory: Path | str) -> ExpandedKey | None:
    """The identity key in ``directory`` (None if there is no secret key file)."""
    d = Path(directory)
    data = read_key_file(d / SECRET_KEY_FILE, secret=True)
    if data is None:
        return None
    key = decode_secret_key_file(data)
    public = read_key_file(d / PUBLIC_KEY_FILE, secret=False)
    if public is not None and decode_public_key_file(public) != key.public:
        raise KeyFileError(f"{d / PUBLIC_KEY_FILE} does not match {d / SECRET_KEY_FILE}")
    return key


def load_or_create_service_key(directory: Path | str, *, seed: bytes | None = None) -> ExpandedKey:
    """Load the service's key, or make one (from ``seed`` if given) and write the directory.

    The public key and ``hostname`` files are (re)written whenever they are missing or stale.
    """
    d = Path(directory)
    ensure_private_dir(d)
    key = load_service_key(d)
    if key is None:
        key = ExpandedKey.from_seed(seed if seed is not None else os.urandom(32))
        write_service_dir(d, key)
        return key
    if read_key_file(d / PUBLIC_KEY_FILE, secret=False) is None:
        write_key_file(d / PUBLIC_KEY_FILE, encode_public_key_file(key.public))
    if read_key_file(d / HOSTNAME_FILE, secret=False) != hostname_file(key.public):
        write_key_file(d / HOSTNAME_FILE, hostname_file(key.public))
    return key
