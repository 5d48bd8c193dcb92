"""A relay's introduction and rendezvous point roles (rend-spec-v3 §3-§4; specs/onion-services-relay.md).

Theory of operation
-------------------
The circuit core reports each onion-service request that reaches the last hop of a circuit
at this relay as an ``HsRequest`` (ESTABLISH_INTRO, INTRODUCE1, ESTABLISH_RENDEZVOUS,
RENDEZVOUS1); :meth:`HsRelay.handle` decides, as tor's ``hs_intropoint.c`` and
``rendmid.c`` do. Every refusal that is a protocol violation closes the circuit with
DESTROY(PROTOCOL) and an info log line naming the reason (tor logs these at
protocol-warning level); nothing a peer sends raises out of here.

A circuit has a *purpose* here (``OrCircuit.hs_purpose``): ``""`` (an ordinary circuit),
``"intro"`` (a service's introduction circuit), ``"rend_waiting"`` (a client's circuit
holding a cookie) or ``"rend_joined"`` (spliced). Only ordinary circuits may become
anything, so each circuit carries at most one ESTABLISH_INTRO and one cookie.

Introduction point
    ESTABLISH_INTRO is parsed, its Ed25519 signature checked with the auth key it names and
    its HANDSHAKE_AUTH with the circuit's KH (the circuit handshake's output after the
    relay-crypto keys). Auth key types 0/1 (v2) and malformed or forged cells close the
    circuit. A good cell gets INTRO_ESTABLISHED and registers the circuit under its auth key;
    an older circuit with the same key is closed (FINISHED): the newest wins, as in tor.

    INTRODUCE1 must come on an ordinary circuit whose previous hop is a relay (tor refuses
    single-hop clients), once per circuit; otherwise the circuit is closed. A malformed body
    is answered INTRODUCE_ACK(BAD_FORMAT), an auth key without an introduction circuit
    UNKNOWN_ID; else the body goes, unchanged, to the service as INTRODUCE2 and the client
    gets INTRODUCE_ACK(SUCCESS).

    INTRODUCE2 DoS defense (tor's hs_dos.c): each introduction circuit has a token bucket.
    Its rate and burst come from the ESTABLISH_INTRO DoS extension when the service sent one
    (rate or burst 0, or values out of range: no defense on that circuit), otherwise from the
    consensus (``HiddenServiceEnableIntroDoSDefense`` 0/1, default 0;
    ``HiddenServiceEnableIntroDoSRatePerSec`` default 25; ``...BurstPerSec`` default 200),
    followed as the consensus changes. Buckets refill once per whole second; each INTRODUCE1
    takes a token (not below zero) and is relayed only if a token is still left, so a full
    bucket lets ``burst - 1`` through at once, exactly as tor. Refused introductions are
    answered UNKNOWN_ID, as tor does.

Rendezvous point
    ESTABLISH_RENDEZVOUS (exactly a 20-byte cookie) on an ordinary circuit registers the
    cookie and answers RENDEZVOUS_ESTABLISHED; a cookie already registered closes the
    circuit (the first holder keeps it). RENDEZVOUS1 on another ordinary circuit with a
    registered cookie sends RENDEZVOUS2 (the HANDSHAKE_INFO) to the waiting circuit and
    splices the two: from then on forward cells on either that are not ours lose our layer
    on that circuit and get our layer of the other one added, toward the other origin (the
    end-to-end layer inside stays shut to us; with tor1 or CGO hops alike). When either
    circuit closes, the other closes with the same reason. A cookie unmatched for
    ``REND_PENDING_TIMEOUT`` seconds closes its circuit (FINISHED); at most
    ``REND_PENDING_MAX`` cookies wait at once (more: RESOURCELIMIT). Tor has neither bound
    (a waiting circuit costs little), but they cost nothing to a client that uses its
    circuit within minutes.

ESTABLISH_INTRO and ESTABLISH_RENDEZVOUS are limited to one per circuit, so the circuit
creation limits (DoSCircuitCreationRate/Burst, per-channel circuit caps) bound them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from onionp2p.errors import ProtocolError
from onionp2p.proto.cells import DestroyReason
from onionp2p.proto.hs.cells import (
    AuthKeyType,
    EstablishIntro,
    EstablishRendezvous,
    IntroAckStatus,
    Introduce1,
    IntroduceAck,
    IntroEstablished,
    Rendezvous1,
)
from onionp2p.proto.ratelimit import TokenBucket
from onionp2p.proto.relaycell import RelayCommand

if TYPE_CHECKING:  # pragma: no cover
    from onionp2p.relay.circuit import OrCircuit

__all__ = ["REND_PENDING_MAX", "REND_PENDING_TIMEOUT", "HsRelay", "IntroDosParams"]


#: seconds a rendezvous cookie may wait for its RENDEZVOUS1
REND_PENDING_TIMEOUT = 300.0
#: rendezvous cookies waiting at once at this relay
REND_PENDING_MAX = 8192
#: tor's bounds on the DoS parameters (HS_CONFIG_V3_DOS_DEFENSE_*_MAX, INT32_MAX)
DOS_PARAM_MAX = 0x7FFFFFFF
#: tor's defaults (hs_dos.c) when the consensus does not say
DOS_DEFAULT_RATE = 25
DOS_DEFAULT_BURST = 200


class IntroDosParams:
    """INTRODUCE2 defense of an introduction circuit: on or off, rate and burst per second."""

    __slots__ = ("burst", "enabled", "rate")

    def __init__(self, enabled: bool, rate: int, burst: int) -> None:
        self.enabled, self.rate, self.burst = enabled, rate, burst

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntroDosParams) and (self.enabled, self.rate, self.burst) == (
            other.enabled,
            other.rate,
            other.burst,
        )

    def __repr__(self) -> str:
        return f"IntroDosParams(enabled={self.enabled}, rate={self.rate}, burst={self.burst})"

    @classmethod
    def from_consensus(cls, params: Mapping[str, int]) -> IntroDosParams:
        """The consensus's values, clamped as tor's networkstatus_get_param does."""

        def get(name: str, default: int, hi: int) -> int:
            value = params.get(name, default)
            return default if not isinstance(value, int) or not 0 <= value <= hi else value

        return cls(
            bool(get("HiddenServiceEnableIntroDoSDefense", 0, 1)),
            get("HiddenServiceEnableIntroDoSRatePerSec", DOS_DEFAULT_RATE, DOS_PARAM_MAX),
            get("HiddenServiceEnableIntroDoSBurstPerSec", DOS_DEFAULT_BURST, DOS_PARAM_MAX),
        )

    @classmethod
    def from_extension(cls, rate: int | None, burst: int | None) -> IntroDosParams:
        """What the service asked for in ESTABLISH_INTRO (tor's
        handle_establish_intro_cell_dos_extension): 0 or invalid values disable."""
        r, b = rate or 0, burst or 0
        if r == 0 or b == 0 or r > DOS_PARAM_MAX or b > DOS_PARAM_MAX or b < r:
            return cls(False, r, b)
        return cls(True, r, b)


class _IntroBucket:
    """tor's token_bucket_ctr for INTRODUCE2: refilled per whole second, integer tokens."""

    __slots__ = ("bucket",)

    def __init__(self, params: IntroDosParams, now: float) -> None:
        self.bucket = TokenBucket(max(params.rate, 1), max(params.burst, 1), now=float(int(now)))

    def adjust(self, params: IntroDosParams) -> None:
        """New rate/burst from the consensus; tokens kept, capped at the new burst."""
        b = self.bucket
        b.rate, b.burst = float(max(params.rate, 1)), float(max(params.burst, 1))
        b.tokens = min(b.tokens, b.burst)

    def take(self, now: float) -> bool:
        b = self.bucket
        b.refill(float(int(now)))
        if b.tokens > 0:
            b.tokens = max(0.0, b.tokens - 1)
        return b.tokens > 0


class HsRelay:
    """The intro/rendezvous point state of one relay. ``params()`` gives the consensus
    parameters (empty without a consensus); ``clock`` is monotonic seconds."""

    def __init__(
        self, params: Callable[[], Mapping[str, int]] = dict, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.params = params
        self.clock = clock
        #: service introduction circuits by auth key
        self.intro: dict[bytes, OrCircuit] = {}
        #: waiting client rendezvous circuits by cookie, with the time they registered
        self.rend: dict[bytes, tuple[OrCircuit, float]] = {}
        #: outcomes, as tor's MetricsPort relay counters (est_intro, est_rend, intro1, rend1)
        self.counts: dict[str, Counter[str]] = {
            k: Counter() for k in ("est_intro", "est_rend", "intro1", "rend1")
        }

    # -- dispatch --------------------------------------------------------------------------------

    def handle(self, circ: OrCircuit, command: int, data: bytes) -> None:
        """One onion-service request that reached the last hop of ``circ``."""
        if circ.closed:
            return
        if command == RelayCommand.ESTABLISH_INTRO:
            self._establish_intro(circ, data)
        elif command == RelayCommand.INTRODUCE1:
            self._introduce1(circ, data)
        elif command == RelayCommand.ESTABLISH_RENDEZVOUS:
            self._establish_rendezvous(circ, data)
        elif command == RelayCommand.RENDEZVOUS1:
            self._rendezvous1(circ, data)

    def _refuse(
        self, circ: OrCircuit, kind: str, action: str, why: str, reason: int = DestroyReason.PROTOCOL
    ) -> None:
        self.counts[kind][action] += 1
        circ.log.info("onion-service request refused; closing circuit", request=kind, why=why)
        circ.destroy(reason, why)

    # -- introduction point ----------------------------------------------------------------------

    def _establish_intro(self, circ: OrCircuit, data: bytes) -> None:
        if circ.hs_purpose:
            self._refuse(circ, "est_intro", "unsuitable_circuit", "ESTABLISH_INTRO on a non-OR circuit")
            return
        try:
            if not data:
                raise ProtocolError("empty ESTABLISH_INTRO")
            if data[0] in (AuthKeyType.LEGACY0, AuthKeyType.LEGACY1):
                raise ProtocolError("ESTABLISH_INTRO of a v2 service (obsolete)")
            cell = EstablishIntro.parse(data)
            cell.verify(circ.kh)
        except ProtocolError as exc:
            self._refuse(circ, "est_intro", "malformed", str(exc))
            return
        try:
            ext = cell.dos_params()
        except ProtocolError:
            ext = None  # tor: a malformed DoS extension leaves the consensus defaults
        now = self.clock()
        if ext is not None:  # well-formed, even empty: the service decided (missing values: off)
            circ.intro_dos = IntroDosParams.from_extension(ext.rate, ext.burst)
            circ.intro_dos_explicit = True
        else:
            circ.intro_dos = IntroDosParams.from_consensus(self.params())
            circ.intro_dos_explicit = False
        circ.intro_bucket = _IntroBucket(circ.intro_dos, now)
        circ.send_back(RelayCommand.INTRO_ESTABLISHED, 0, IntroEstablished().encode())
        if circ.closed:
            self.counts["est_intro"]["circuit_dead"] += 1
            return
        key = cell.auth_key
        old = self.intro.get(key)
        circ.hs_purpose = "intro"
        circ.hs_key = key
        self.intro[key] = circ
        if old is not None and old is not circ:
            old.hs_key = None  # (so its closing does not unregister the new one)
            old.destroy(DestroyReason.FINISHED, "replaced by a newer introduction circuit")
        self.counts["est_intro"]["success"] += 1
        circ.log.info(
            "introduction point established",
            dos_defense=circ.intro_dos.enabled,
            rate=circ.intro_dos.rate,
            burst=circ.intro_dos.burst,
        )

    def _introduce1(self, circ: OrCircuit, data: bytes) -> None:
        counts = self.counts["intro1"]
        if len(data) < 20:
            self._refuse(circ, "intro1", "malformed", "invalid INTRODUCE1 cell length")
            return
        if circ.hs_purpose:
            self._refuse(circ, "intro1", "unsuitable_circuit", "INTRODUCE1 on a non-OR circuit")
            return
        if circ.introduced:
            self._refuse(circ, "intro1", "circuit_reused", "multiple introductions on the same circuit")
            return
        if circ.prev_chan.peer is None:
            self._refuse(circ, "intro1", "single_hop", "INTRODUCE1 from a single-hop client")
            return
        circ.introduced = True
        try:
            cell = Introduce1.parse(data)
            cell.validate()
        except ProtocolError as exc:
            counts["malformed"] += 1
            circ.log.info("INTRODUCE1 refused", why=str(exc))
            self._ack(circ, IntroAckStatus.BAD_FORMAT)
            return
        service = self.intro.get(cell.auth_key)
        if service is None or service.closed:
            counts["unknown_service"] += 1
            circ.log.debug("INTRODUCE1 for an auth key without an introduction circuit")
            self._ack(circ, IntroAckStatus.UNKNOWN_ID)
            return
        if not self._can_send_intro2(service):
            counts["rate_limited"] += 1
            circ.log.debug("INTRODUCE1 refused by the INTRODUCE2 DoS defense")
            self._ack(circ, IntroAckStatus.UNKNOWN_ID)
            return
        service.send_back(RelayCommand.INTRODUCE2, 0, bytes(data))  # the same bytes, as tor
        if service.closed:
            counts["circuit_dead"] += 1
            self._ack(circ, IntroAckStatus.UNKNOWN_ID)
            return
        counts["success"] += 1
        self._ack(circ, IntroAckStatus.SUCCESS)

    @staticmethod
    def _ack(circ: OrCircuit, status: int) -> None:
        circ.send_back(RelayCommand.INTRODUCE_ACK, 0, IntroduceAck(status).encode())

    def _can_send_intro2(self, service: OrCircuit) -> bool:
        now = self.clock()
        if not service.intro_dos_explicit:
            current = IntroDosParams.from_consensus(self.params())
            if current != service.intro_dos:  # tor's update_intro_circuits on a new consensus
                service.intro_dos = current
                service.intro_bucket.adjust(current)
        if not service.intro_dos.enabled:
            return True
        return service.intro_bucket.take(now)

    # -- rendezvous point ------------------------------------------------------------------------

    def _establish_rendezvous(self, circ: OrCircuit, data: bytes) -> None:
        if circ.hs_purpose:
            self._refuse(circ, "est_rend", "unsuitable_circuit", "ESTABLISH_RENDEZVOUS on a non-OR circuit")
            return
        try:
            cookie = EstablishRendezvous.parse(data).cookie
        except ProtocolError as exc:
            self._refuse(circ, "est_rend", "malformed", str(exc))
            return
        if cookie in self.rend:
            self._refuse(
                circ, "est_rend", "duplicate_cookie", "duplicate rendezvous cookie in ESTABLISH_RENDEZVOUS"
            )
            return
        if len(self.rend) >= REND_PENDING_MAX:
            self._refuse(
                circ,
                "est_rend",
                "resource_limit",
                "too many rendezvous cookies waiting",
                DestroyReason.RESOURCELIMIT,
            )
            return
        circ.send_back(RelayCommand.RENDEZVOUS_ESTABLISHED, 0, b"")
        if circ.closed:
            self.counts["est_rend"]["circuit_dead"] += 1
            return
        circ.hs_purpose = "rend_waiting"
        circ.hs_key = cookie
        self.rend[cookie] = (circ, self.clock())
        self.counts["est_rend"]["success"] += 1
        circ.log.debug("rendezvous point waiting")

    def _rendezvous1(self, circ: OrCircuit, data: bytes) -> None:
        if circ.hs_purpose:
            self._refuse(circ, "rend1", "unsuitable_circuit", "RENDEZVOUS1 on a non-OR circuit")
            return
        try:
            cell = Rendezvous1.parse(data)
        except ProtocolError as exc:
            self._refuse(circ, "rend1", "malformed", str(exc))
            return
        entry = self.rend.get(cell.cookie)
        if entry is None or entry[0].closed:
            self._refuse(
                circ, "rend1", "unknown_cookie", "RENDEZVOUS1 with an unrecognized rendezvous cookie"
            )
            return
        client = entry[0]
        del self.rend[cell.cookie]
        client.hs_key = None
        client.send_back(RelayCommand.RENDEZVOUS2, 0, cell.handshake_info)
        if client.closed:
            self._refuse(circ, "rend1", "circuit_dead", "the waiting circuit is gone", DestroyReason.INTERNAL)
            return
        client.hs_purpose = circ.hs_purpose = "rend_joined"
        client.splice_peer, circ.splice_peer = circ, client
        client.core.splice()
        circ.core.splice()
        self.counts["rend1"]["success"] += 1
        circ.log.debug("rendezvous: circuits joined")

    # -- housekeeping ----------------------------------------------------------------------------

    def circuit_closed(self, circ: OrCircuit, reason: int) -> None:
        """``circ`` is gone: forget its registration; a spliced partner closes too (tor
        marks it with the same reason)."""
        key = circ.hs_key
        if circ.hs_purpose == "intro" and key is not None and self.intro.get(key) is circ:
            del self.intro[key]
        elif circ.hs_purpose == "rend_waiting" and key is not None:
            entry = self.rend.get(key)
            if entry is not None and entry[0] is circ:
                del self.rend[key]
        peer = circ.splice_peer
        if peer is not None:
            circ.splice_peer = None
            peer.splice_peer = None
            if not peer.closed:
                peer.destroy(reason, "the circuit it was joined to closed")

    def sweep(self) -> None:
        """Close the rendezvous circuits that waited too long."""
        if not self.rend:
            return
        cutoff = self.clock() - REND_PENDING_TIMEOUT
        for cookie, (circ, since) in list(self.rend.items()):
            if since <= cutoff:
                del self.rend[cookie]
                circ.hs_key = None
                self.counts["est_rend"]["expired"] += 1
                circ.destroy(DestroyReason.FINISHED, "rendezvous cookie unused for too long")
