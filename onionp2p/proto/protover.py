"""Subprotocol versions (tor's "proto" lines; dir-spec "proto", tor-spec §9). Pure.

A relay says which versions of each subprotocol it implements with a line such as
``Link=4-5 LinkAuth=3 Relay=2-4``: names, ``=``, comma-separated versions and ranges. A
client asks a relay only for what that relay advertises (for example the ntor-v3 circuit
handshake only where ``Relay=4`` is listed). :func:`parse` reads such a line strictly
(bounded sizes: it comes from the network), :func:`format_protocols` writes one
canonically, and :data:`SUPPORTED` is what onionp2p implements — the line our relays
advertise.

Versions onionp2p implements, with their meanings (tor-spec §9):

* ``Link=4-5`` — 4-byte circuit IDs (4); link padding cells understood (5).
* ``LinkAuth=3`` — Ed25519-based link authentication (AUTHENTICATE, RSA-SHA256-TLSSecret).
* ``Padding=2`` — channel padding (padding-spec §2): the relay honours a client's
  PADDING_NEGOTIATE and pads idle client channels (:mod:`onionp2p.proto.padding`). A client
  sends PADDING_NEGOTIATE only to relays that list it.
* ``Relay=2-4`` — CREATE2/EXTEND2 with ntor (2); IPv6 link specifiers in EXTEND2 (3);
  the ntor-v3 handshake with extensions (4).
* ``Relay=5-6`` — the ntor-v3 SUBPROTO_REQUEST extension with relay message format v1
  (5); Counter Galois Onion relay crypto (proposal 359) (6). Both need congestion control
  on the hop, so a relay lists them only together with ``FlowCtrl=2``.
* ``FlowCtrl=1-2`` — authenticated SENDMEs (proposal 289) (1); congestion control
  (proposal 324: RTT-based Vegas, XON/XOFF stream flow control), negotiated with ntor-v3 (2).
  A relay configured without congestion control advertises ``FlowCtrl=1`` only, one
  without CGO ``Relay=2-4`` (:func:`advertised`).
* ``HSDir=2`` — stores and serves v3 onion-service descriptors (POST ``/tor/hs/3/publish``,
  GET ``/tor/hs/3/<blinded key>`` over BEGIN_DIR).
* ``HSIntro=4-5`` — introduction point for v3 services: Ed25519 auth keys in ESTABLISH_INTRO
  and INTRODUCE1 (4); the ESTABLISH_INTRO DoS-parameters extension (5).
* ``HSRend=1-2`` — rendezvous point (1), relaying a RENDEZVOUS1's HANDSHAKE_INFO of any
  length in RENDEZVOUS2 (2).
"""

from __future__ import annotations

import re

from onionp2p.errors import ProtocolError

__all__ = ["SUPPORTED", "parse", "format_protocols", "supports", "advertised"]

#: what onionp2p implements: the proto line of its relays
SUPPORTED = "FlowCtrl=1-2 HSDir=2 HSIntro=4-5 HSRend=1-2 Link=4-5 LinkAuth=3 Padding=2 Relay=2-6"
#: ... of a relay configured without CGO
WITHOUT_CGO = "FlowCtrl=1-2 HSDir=2 HSIntro=4-5 HSRend=1-2 Link=4-5 LinkAuth=3 Padding=2 Relay=2-4"
#: ... of a relay configured without congestion control (and so without CGO)
WITHOUT_CC = "FlowCtrl=1 HSDir=2 HSIntro=4-5 HSRend=1-2 Link=4-5 LinkAuth=3 Padding=2 Relay=2-4"


def advertised(congestion_control: bool, cgo: bool = True) -> str:
    """The proto line of a relay that does (or does not) run congestion control and CGO."""
    if not congestion_control:
        return WITHOUT_CC
    return SUPPORTED if cgo else WITHOUT_CGO

_NAME = re.compile(r"[A-Za-z0-9-]{1,32}")
_MAX_VERSION = 63  # tor's limit
_MAX_ENTRIES = 64


def parse(line: str) -> dict[str, frozenset[int]]:
    """``"Link=4-5 Relay=2-4"`` -> ``{"Link": {4, 5}, "Relay": {2, 3, 4}}``.

    Raises:
        ProtocolError: malformed, a version above 63, a name listed twice, too many entries.
    """
    out: dict[str, frozenset[int]] = {}
    words = line.split(" ") if line else []
    if len(words) > _MAX_ENTRIES:
        raise ProtocolError("too many subprotocols")
    for word in words:
        name, eq, versions = word.partition("=")
        if not eq or not _NAME.fullmatch(name) or name in out:
            raise ProtocolError(f"bad subprotocol entry {word[:40]!r}")
        found: set[int] = set()
        for item in versions.split(",") if versions else []:
            lo_text, dash, hi_text = item.partition("-")
            if not lo_text.isdigit() or (dash and not hi_text.isdigit()):
                raise ProtocolError(f"bad subprotocol versions {versions[:40]!r}")
            lo, hi = int(lo_text), int(hi_text if dash else lo_text)
            if not 0 <= lo <= hi <= _MAX_VERSION:
                raise ProtocolError(f"bad subprotocol version range {item[:20]!r}")
            found.update(range(lo, hi + 1))
        out[name] = frozenset(found)
    return out


def format_protocols(protocols: dict[str, frozenset[int] | set[int]]) -> str:
    """The canonical line: names sorted, versions as sorted ranges."""
    words = []
    for name in sorted(protocols):
        versions = sorted(protocols[name])
        ranges: list[str] = []
        i = 0
        while i < len(versions):
            j = i
            while j + 1 < len(versions) and versions[j + 1] == versions[j] + 1:
                j += 1
            ranges.append(str(versions[i]) if i == j else f"{versions[i]}-{versions[j]}")
            i = j + 1
        words.append(f"{name}={','.join(ranges)}")
    return " ".join(words)


def supports(line: str, name: str, version: int) -> bool:
    """Does this proto line list ``name`` at ``version``? A malformed line supports nothing."""
    try:
        return version in parse(line).get(name, frozenset())
    except ProtocolError:
        return False
