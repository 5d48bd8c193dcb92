"""Key files on disk: a private directory, strict permissions, atomic writes.

Shared by the relay's keys (onionp2p/relay/keys.py) and an onion service's
HiddenServiceDir (onionp2p/client/hskeys.py). Every failure is a
:class:`~onionp2p.errors.KeyFileError` with the path and, where it helps, the command that
fixes it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from onionp2p.errors import KeyFileError

__all__ = ["ensure_private_dir", "read_key_file", "write_key_file"]


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700; tighten it to 0700 if it is looser."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise KeyFileError(f"{path} is not a directory")
        if stat.S_IMODE(st.st_mode) & 0o077:
            if st.st_uid != os.getuid():
                raise KeyFileError(
                    f"key directory {path} is accessible by group/others and not owned by us; "
                    f"fix with: chmod 700 {path}")
            os.chmod(path, 0o700)
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {path}: {exc.strerror or exc}") from None


def read_key_file(path: Path, secret: bool) -> bytes | None:
    """Return the file's bytes, or None if it does not exist. Secret files must be 0600-ish."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if secret and stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyFileError(
                f"secret key file {path} is readable or writable by group/others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); fix with: chmod 600 {path}")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def write_key_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``; the file is created with mode 0600."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror or exc}") from None
