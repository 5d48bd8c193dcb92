"""Random bytes for cell padding, cheaply, after tor's ``crypto_fast_rng``. Pure.

A relay cell that does not fill its 509 bytes is padded with four zero bytes and then
random bytes (tor-spec §6.1; the randomness keeps the padding from being a known
plaintext). Those bytes need not be secret from whoever reads the cell, but they must not
be predictable by others, and they are needed for every SENDME, every partial DATA cell,
every control message: with ``os.urandom`` each one was a system call (2.6–3.7 µs for 470
bytes on the 2-core machine).

Tor takes them from ``crypto_fast_rng`` (src/lib/crypt_ops/crypto_rand_fast.c): a buffer
of AES-256-CTR keystream under a seed from the operating system's generator, the first
bytes of each refill becoming the next seed ("fast key erasure"), OS bytes mixed in every
16 refills. Here: ChaCha20 keystream from ``cryptography`` under a key from
``os.urandom``, a fresh key for every 16 KiB of keystream (one system call per ~35
SENDMEs instead of one per cell), requests read straight from the cipher context so that
nothing handed out stays in memory. Every key comes from the OS, so there is no chain to
protect and two threads that race into a new key both get fresh ones (the circuit cores
of a process run on its event loop; this module takes no lock, being part of the pure
core). A forked child starts a new key at once (``os.register_at_fork``): parent and
child never share output. specs/relaycrypto.md §2.1.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["FastRng", "padding_bytes"]

_KEY_LEN = 32
_NONCE = bytes(16)  # a fresh key for every keystream, so one nonce (counter 0) is enough
_BLOCK = 16 * 1024  # keystream bytes per key
_ZEROS = bytes(_BLOCK)
_urandom = os.urandom  # (the tests count the seeds through this name)


class FastRng:
    """ChaCha20 keystreams of :data:`_BLOCK` bytes, each under a fresh key from the OS,
    handed out straight from the cipher context."""

    __slots__ = ("_enc", "_left")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        """Start a keystream under a new key from the OS (the old one is dropped)."""
        self._enc = Cipher(algorithms.ChaCha20(_urandom(_KEY_LEN), _NONCE), mode=None).encryptor()
        self._left = _BLOCK

    def random(self, n: int) -> bytes:
        """``n`` random bytes (never output twice)."""
        if n < 0:
            raise ValueError("a negative number of bytes")
        if n <= self._left:  # the common case: one slice of the current keystream
            self._left -= n
            return self._enc.update(_ZEROS[:n])
        out = []
        while n:
            if self._left <= 0:
                self.reseed()
            take = min(self._left, n)
            self._left -= take
            out.append(self._enc.update(_ZEROS[:take]))
            n -= take
        return b"".join(out)


_RNG = FastRng()
os.register_at_fork(after_in_child=_RNG.reseed)

#: ``padding_bytes(n)``: ``n`` random bytes for cell padding (one generator per process)
padding_bytes = _RNG.random
