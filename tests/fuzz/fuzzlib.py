"""What the fuzz harnesses and ``make_corpus.py`` share: input layout, targets, constants.

This module imports neither atheris nor onionp2p, so that the harnesses can import it
*before* they import onionp2p inside ``atheris.instrument_imports()`` (a module imported
earlier would not be instrumented), and so that ``make_corpus.py`` runs without atheris.

Input layout
------------
A harness reads its input through ``atheris.FuzzedDataProvider``. Its integers
(``ConsumeIntInRange(lo, hi)`` with ``hi - lo < 256``) come one byte each from the *end*
of the input, as ``lo + byte % (hi - lo + 1)``; its byte strings (``ConsumeBytes``)
come from the *front*. Every harness first takes the target number (an integer), then
whatever that target needs. Streaming targets then alternate "chunk length"
(an integer, 1-256) and "chunk" (that many bytes) until the input is used up.

So an input that feeds ``front`` (bytes) and the integers ``ints`` (raw byte values,
in the order they are consumed) is ``front + bytes(reversed(ints))``:
:func:`fdp_input` builds it, :func:`stream_input` for a chunked stream.
"""

from __future__ import annotations

import hashlib

#: The clock every harness uses (2026-01-01T00:00:00Z): certificate expiry checks are
#: reproducible, and the committed corpus (certificates valid around this instant)
#: never goes stale.
NOW = 1_767_225_600.0

#: Stand-in for the DER of a responder's TLS certificate: link code only hashes it
#: (the type 5 certificate certifies its SHA-256), so any fixed bytes do.
TLS_CERT_DER = b"onionp2p fuzzing: stand-in for the responder's TLS certificate (DER)"
TLS_CERT_SHA256 = hashlib.sha256(TLS_CERT_DER).digest()

#: Every chunk of a streaming target is 1..MAX_CHUNK bytes (one length byte).
MAX_CHUNK = 256

#: Targets of fuzz_cells.py, in selector order (index = first integer consumed).
CELL_TARGETS = (
    "reader",             # CellReader framing, chunked, CircID width switched after VERSIONS
    "versions",           # VERSIONS payload
    "netinfo",            # NETINFO payload
    "certs",              # CERTS payload (+ duplicate-type check)
    "auth_challenge",     # AUTH_CHALLENGE payload
    "authenticate",       # AUTHENTICATE payload
    "create2",            # CREATE2 payload
    "created2",           # CREATED2 payload
    "destroy",            # DESTROY payload
    "padding_negotiate",  # PADDING_NEGOTIATE payload
    "relay",              # relay cell body (zero-padded to 509) + the relay message decoder
    "ed25519_cert",       # Tor Ed25519 certificate: parse, exact re-encode, verify
    "cross_cert",         # RSA->Ed25519 cross-certificate: parse, exact re-encode, verify
    "x509",               # X.509 DER: parse_x509, verify_rsa_identity_cert
    "verify_certs",       # CERTS payload through link.verify_certs (leaf type 5 or 6)
    "link_initiator",     # LinkHandshake initiator (client or relay) fed a chunked cell stream
    "link_responder",     # LinkHandshake responder fed a chunked cell stream
    "hs_cell",            # onion-service relay message (commands 32-40): parse, re-encode, checks
    "hs_descriptor",      # an HSDir's outer-layer check of a v3 descriptor (relay/hsdir.py)
)

#: Targets of fuzz_socks.py.
SOCKS_TARGETS = (
    "parser",    # SocksParser fed a chunked byte stream (SOCKS4/4a/5, RFC 1929, F0/F1)
    "resolved",  # RELAY_RESOLVED from an exit -> the SOCKS RESOLVE / RESOLVE_PTR replies
    "http_connect",  # HttpConnectParser fed a chunked byte stream (the HTTP CONNECT port)
    "dns_query",     # a UDP datagram at the DNS port: parse_query, then every answer we could build
    "dns_resolved",  # RELAY_RESOLVED from an exit -> the DNS port's answer to A, AAAA, PTR
)


def fdp_input(front: bytes, ints: list[int]) -> bytes:
    """The input from which a harness consumes the bytes ``front`` and the raw
    integer bytes ``ints`` (in consumption order)."""
    if any(not 0 <= i <= 255 for i in ints):
        raise ValueError("integer bytes must be 0..255")
    return bytes(front) + bytes(reversed(ints))


def stream_input(head_ints: list[int], stream: bytes, cuts: list[int] | None = None) -> bytes:
    """An input for a streaming target: ``head_ints`` (target number first), then
    ``stream`` fed in chunks of the sizes in ``cuts`` (repeated; default MAX_CHUNK)."""
    cuts = cuts or [MAX_CHUNK]
    if any(not 1 <= c <= MAX_CHUNK for c in cuts):
        raise ValueError(f"chunk sizes must be 1..{MAX_CHUNK}")
    lengths, pos, i = [], 0, 0
    while pos < len(stream):
        n = min(cuts[i % len(cuts)], len(stream) - pos)
        lengths.append(n - 1)
        pos += n
        i += 1
    return fdp_input(stream, list(head_ints) + lengths)


def consume_chunks(fdp) -> list[bytes]:
    """The chunks a streaming target feeds (the decoding side of :func:`stream_input`)."""
    out = []
    while fdp.remaining_bytes():
        n = fdp.ConsumeIntInRange(1, MAX_CHUNK)
        chunk = fdp.ConsumeBytes(n)
        if chunk:
            out.append(chunk)
    return out


def check(condition: bool, message: str) -> None:
    """An invariant of the code under test (raises even under ``python -O``)."""
    if not condition:
        raise AssertionError(message)
