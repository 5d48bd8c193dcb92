"""Onion-service keys on disk, compatible with tor's: a service's HiddenServiceDir, and a
client's ClientOnionAuthDir.

*ClientOnionAuthDir* (:class:`ClientOnionAuth`, tor(1) "CLIENT AUTHORIZATION"): every file
in the directory whose name ends in ``.auth_private`` holds one
``<address>:descriptor:x25519:<base32 secret>`` line; other files are ignored. As tor, a
file that does not parse is logged and skipped, the directory must exist (a missing one is
a configuration error) and is tightened to 0700 when looser; the files are read at start and
on every reload. Keys added on the control port (ONION_CLIENT_AUTH_ADD) live in memory,
or are written to the directory as ``<address>.auth_private`` with the ``Permanent`` flag.

*HiddenServiceDir*:

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
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.errors import ConfigError, KeyFileError
from onionp2p.keyfiles import ensure_private_dir, read_key_file, write_key_file
from onionp2p.log import get_logger, safe
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.address import encode_onion_address
from onionp2p.proto.hs.keys import (
    HOSTNAME_FILE,
    PUBLIC_KEY_FILE,
    ClientAuthPrivate,
    format_auth_private,
    parse_auth_private,
    SECRET_KEY_FILE,
    decode_public_key_file,
    decode_secret_key_file,
    encode_public_key_file,
    encode_secret_key_file,
    hostname_file,
)

__all__ = ["AUTH_PRIVATE_SUFFIX", "ClientAuthEntry", "ClientOnionAuth", "load_or_create_service_key",
           "load_service_key", "write_service_dir"]

log = get_logger("onionp2p.hs")
AUTH_PRIVATE_SUFFIX = ".auth_private"
MAX_AUTH_FILE = 4096  # one line of about 120 bytes; anything much larger is not a key file


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


# -- client authorization (ClientOnionAuthDir) --------------------------------------------------------


@dataclass(frozen=True)
class ClientAuthEntry:
    """One client-authorization key: for which service, from where (a file name, or None:
    added on the control port and kept in memory), and its control-port nickname."""

    key: ClientAuthPrivate
    filename: str | None = None
    nickname: str | None = None

    @property
    def permanent(self) -> bool:
        return self.filename is not None


class ClientOnionAuth:
    """Our x25519 keys for services that restrict discovery (tor's ClientOnionAuthDir; see
    the module docstring). ``get(identity)`` is what the onion-service client asks."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._files: dict[bytes, ClientAuthEntry] = {}
        self._memory: dict[bytes, ClientAuthEntry] = {}
        self.reload()

    def reload(self) -> None:
        """Read the directory again (ConfigError when it is missing or unreadable)."""
        if self.directory is None:
            self._files = {}
            return
        d = self.directory
        if not d.is_dir():
            raise ConfigError(f"client_onion_auth_dir: {d} is not a directory (create it with mode 0700)")
        try:
            ensure_private_dir(d)
            names = sorted(p.name for p in d.iterdir() if p.name.endswith(AUTH_PRIVATE_SUFFIX))
        except (OSError, KeyFileError) as exc:
            raise ConfigError(f"client_onion_auth_dir: {exc}") from None
        found: dict[bytes, ClientAuthEntry] = {}
        for name in names:
            try:
                with open(d / name, "rb") as f:
                    data = f.read(MAX_AUTH_FILE + 1)
                if len(data) > MAX_AUTH_FILE:
                    raise KeyFileError(f"{name}: larger than {MAX_AUTH_FILE} bytes")
                key = parse_auth_private(data.decode("utf-8"), name)
            except (OSError, UnicodeDecodeError, KeyFileError) as exc:
                # the file name and the error may name the service: scrubbed under safe logging
                log.warning("client authorization file skipped", file=safe(name), error=safe(str(exc)))
                continue
            if key.onion_public in found:
                log.warning("client authorization file skipped: a key for that address was read already",
                            file=safe(name))
                continue
            found[key.onion_public] = ClientAuthEntry(key, name)
        self._files = found
        log.info("client authorization keys read", count=len(found), directory=str(d))

    def get(self, identity: bytes) -> X25519PrivateKey | None:
        """Our key for the service with this identity (None: we have none)."""
        entry = self._memory.get(identity) or self._files.get(identity)
        return entry.key.private_key() if entry is not None else None

    def entries(self) -> list[ClientAuthEntry]:
        merged = {**self._files, **self._memory}
        return [merged[k] for k in sorted(merged)]

    def add(self, key: ClientAuthPrivate, *, nickname: str | None = None, permanent: bool = False) -> bool:
        """ONION_CLIENT_AUTH_ADD: True when it replaced a key for the same service. With
        ``permanent`` the key is written to the directory (KeyFileError without one)."""
        replaced = key.onion_public in self._memory or key.onion_public in self._files
        if permanent:
            if self.directory is None:
                raise KeyFileError("no client_onion_auth_dir to keep a permanent key in")
            label = format_auth_private(key.onion_public, key.secret).split(":", 1)[0]
            name = label + AUTH_PRIVATE_SUFFIX
            old = self._files.get(key.onion_public)
            write_key_file(self.directory / name, format_auth_private(key.onion_public, key.secret).encode())
            if old is not None and old.filename not in (None, name):
                (self.directory / old.filename).unlink(missing_ok=True)
            self._memory.pop(key.onion_public, None)
            self._files[key.onion_public] = ClientAuthEntry(key, name, nickname)
        else:
            self._memory[key.onion_public] = ClientAuthEntry(key, None, nickname)
        return replaced

    def remove(self, identity: bytes) -> bool:
        """ONION_CLIENT_AUTH_REMOVE: forget the key (and delete its file); False if none."""
        entry = self._memory.pop(identity, None)
        file_entry = self._files.pop(identity, None)
        if file_entry is not None and file_entry.filename and self.directory is not None:
            (self.directory / file_entry.filename).unlink(missing_ok=True)
        return entry is not None or file_entry is not None
