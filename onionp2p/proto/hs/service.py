"""The service side of onion services, the parts that need no I/O (rend-spec-v3 §2.2, §3; tor's
``hs_service.c``, ``hs_circuit.c``, ``hs_cell.c``).

Theory of operation
-------------------
A service with identity key ``A`` (its onion address) keeps:

* **introduction points** (:class:`ServiceIntroPoint`): a relay, and for it a fresh Ed25519
  *auth key* (registered there with ESTABLISH_INTRO, named by clients in INTRODUCE1) and a
  fresh x25519 *enc key* ``B`` (hs-ntor). tor keeps ``HiddenServiceNumIntroductionPoints``
  (default 3) and retires one after a random lifetime of 18-24 hours or 16384-32768
  introductions (``INTRO_POINT_LIFETIME_*``), then picks a new relay: :meth:`OnionServiceCore.
  retire_intro_points` says which are due, :meth:`OnionServiceCore.missing_intro_points`
  how many to open.
* **two descriptors** (:meth:`OnionServiceCore.upload_plan`): for the consensus's current
  time period and the next one (between the start of a period and the next shared-random
  value: the previous and the current), each encrypted and signed for its period's
  blinded key ``A'``, and uploaded to the ``hsdir_spread_store`` HSDirs after each of the
  ``hsdir_n_replicas`` ring positions, the ring built with the SRV that goes with that
  descriptor (the previous SRV for the first, the current for the second). A missing SRV
  is the *disaster SRV* of the descriptor's period (tor's ``hs_get_current_srv`` /
  ``hs_get_previous_srv``), the same rule the client side applies
  (:mod:`onionp2p.proto.hs.client`), so both agree on the ring.
  The *revision counter* must grow for each upload under one ``A'`` (HSDirs keep only a
  higher one): it is the seconds since the start of the period two before the
  descriptor's, and at least one more than the last one used, so a restarted service
  still goes up (tor uses an order-preserving encryption of a similar clock for the same
  reason).
* **INTRODUCE2 handling** (:meth:`OnionServiceCore.introduce2`): the cell is parsed and
  checked as tor's ``hs_cell_parse_introduce2`` does: it must name the auth key of the
  introduction circuit it came on; its encrypted section (``X | ciphertext | MAC``) must
  not have been seen before at that introduction point (a replay cache, tor's
  ``replaycache_add_test_and_elapsed``); the MAC is tried with the subcredential of each
  descriptor (a client may have fetched either); the plaintext must carry an ntor onion
  key for the rendezvous point. A per-service token bucket (tor's PoW queue rate/burst,
  ``HiddenServicePoWQueueRate`` 250 / ``HiddenServicePoWQueueBurst`` 2500) bounds how
  many introductions per second start a rendezvous circuit. What passes gives an
  :class:`Introduction`: where to meet the client (link specifiers, ntor key), the
  RENDEZVOUS1 body and the end-to-end key material (service side). Everything else raises
  :class:`~onionp2p.errors.HsIntroduceError` with a reason the shell logs and counts.

The clock, the consensus values and the relays come in as arguments; the core makes no
I/O. The asyncio shell is :mod:`onionp2p.client.hsservice`.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.errors import ConfigError, HandshakeError, HsIntroduceError, ProtocolError
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.address import encode_onion_address
from onionp2p.proto.hs.blinding import (
    DEFAULT_PERIOD_LENGTH,
    TimePeriod,
    blind_secret_key,
    disaster_srv,
    subcredential,
)
from onionp2p.proto.hs.cells import (
    ONION_KEY_NTOR,
    DosParams,
    EstablishIntro,
    Extension,
    Introduce2,
    IntroducePlaintext,
    Rendezvous1,
)
from onionp2p.proto.hs.desc import DEFAULT_LIFETIME, IntroPoint, build_descriptor
from onionp2p.proto.hs.ntor import expand_circuit_keys, service_receive_intro
from onionp2p.proto.hs.ring import (
    DEFAULT_N_REPLICAS,
    DEFAULT_SPREAD_STORE,
    responsible_hsdirs,
    service_upload_choices,
)
from onionp2p.proto.ratelimit import TokenBucket
from onionp2p.proto.relaycell import LinkSpec, LinkSpecType

__all__ = [
    "DEFAULT_NUM_INTRO_POINTS",
    "DescriptorUpload",
    "Introduction",
    "OnionServiceCore",
    "PortMapping",
    "ServiceIntroPoint",
    "parse_port_mapping",
    "relay_link_specs",
]

#: tor's HiddenServiceNumIntroductionPoints: default and range
DEFAULT_NUM_INTRO_POINTS = 3
MAX_NUM_INTRO_POINTS = 20
#: tor's INTRO_POINT_LIFETIME_MIN_SECONDS / _MAX_SECONDS and the introductions an
#: introduction point takes before it is rotated (INTRO_POINT_MIN/MAX_LIFETIME_INTRODUCTIONS)
INTRO_LIFETIME_MIN = 18 * 3600
INTRO_LIFETIME_MAX = 24 * 3600
INTRO_MAX_INTRODUCTIONS_MIN = 16384
INTRO_MAX_INTRODUCTIONS_MAX = 32768
#: tor re-uploads a descriptor every 60-120 minutes even when nothing changed
#: (HS_SERVICE_NEXT_UPLOAD_TIME_MIN/MAX)
REUPLOAD_MIN = 60 * 60
REUPLOAD_MAX = 120 * 60
#: INTRODUCE2 processed per second at the service, and the burst (HiddenServicePoWQueueRate /
#: HiddenServicePoWQueueBurst defaults)
INTRO2_RATE = 250
INTRO2_BURST = 2500
#: entries kept per introduction point's replay cache (tor expires them with the intro point)
REPLAY_CACHE_MAX = 1 << 16
#: tor's HiddenServiceEnableIntroDoS{RatePerSec,BurstPerSec} defaults
DOS_DEFAULT_RATE = 25
DOS_DEFAULT_BURST = 200


@dataclass(frozen=True)
class PortMapping:
    """``HiddenServicePort VIRTPORT [TARGET]``: streams to ``virtual`` go to ``host:port``."""

    virtual: int
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.virtual} {self.host}:{self.port}"


def parse_port_mapping(text: str) -> PortMapping:
    """tor's HiddenServicePort syntax: ``VIRTPORT [TARGET]`` with TARGET ``port`` or
    ``addr:port`` (default: the same port on 127.0.0.1); ADD_ONION's ``Port=80,8080`` form
    (a comma) is accepted too. Raises ConfigError naming what is wrong."""
    parts = text.replace(",", " ", 1).split()
    if not 1 <= len(parts) <= 2:
        raise ConfigError(f"onion service port {text!r}: expected 'VIRTPORT [TARGET]'")

    def port(value: str, what: str) -> int:
        if not value.isdigit() or not 1 <= int(value) <= 65535:
            raise ConfigError(f"onion service port {text!r}: {what} {value!r} is not a port 1-65535")
        return int(value)

    virtual = port(parts[0], "virtual port")
    if len(parts) == 1:
        return PortMapping(virtual, "127.0.0.1", virtual)
    target = parts[1]
    if target.startswith("unix:"):
        raise ConfigError(f"onion service port {text!r}: unix socket targets are not supported")
    host, sep, tport = target.rpartition(":")
    if not sep:
        return PortMapping(virtual, "127.0.0.1", port(target, "target port"))
    host = host.strip("[]")
    if not host:
        raise ConfigError(f"onion service port {text!r}: empty target address")
    return PortMapping(virtual, host, port(tport, "target port"))


def relay_link_specs(address: str, or_port: int, rsa_id: bytes, ed_id: bytes) -> tuple[LinkSpec, ...]:
    """A relay's link specifiers as a descriptor or INTRODUCE1 lists them (IPv4, legacy ID,
    Ed25519 ID when known)."""
    specs = [LinkSpec.ipv4(address, or_port), LinkSpec.legacy_id(rsa_id)]
    if ed_id:
        specs.append(LinkSpec.ed25519_id(ed_id))
    return tuple(specs)


@dataclass(eq=False)
class ServiceIntroPoint:
    """One introduction point of ours: the relay (``relay``: anything with ``address``,
    ``or_port``, ``rsa_id``, ``ed_id``, ``ntor_key``, ``nickname``) and the keys made for it."""

    relay: object
    created: float
    expires: float
    max_introductions: int
    auth_key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate,
                                                repr=False)
    enc_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    established: bool = False
    introductions: int = 0
    _replay: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def auth_public(self) -> bytes:
        return self.auth_key.public_key().public_bytes_raw()

    def descriptor_entry(self) -> IntroPoint:
        """The introduction point as the descriptor lists it."""
        r = self.relay
        specs = relay_link_specs(r.address, r.or_port, r.rsa_id, r.ed_id)  # type: ignore[attr-defined]
        return IntroPoint(specs, r.ntor_key, self.auth_public,  # type: ignore[attr-defined]
                          self.enc_key.public_key().public_bytes_raw())

    def establish_intro(self, kh: bytes, dos: DosParams | None = None) -> bytes:
        """The ESTABLISH_INTRO body for the circuit whose last hop derived ``kh``; with
        ``dos`` the DoS extension (proposal 305) asking the intro point to rate-limit."""
        exts: tuple[Extension, ...] = (dos.extension(),) if dos is not None else ()
        return EstablishIntro.create(self.auth_key, kh, exts).encode()

    def due(self, now: float) -> bool:
        """Past its lifetime or its introductions: to be replaced (tor's intro_point_should_expire)."""
        return now >= self.expires or self.introductions >= self.max_introductions

    def _seen(self, encrypted: bytes) -> bool:
        digest = hashlib.sha256(encrypted).digest()
        if digest in self._replay:
            return True
        self._replay[digest] = None
        if len(self._replay) > REPLAY_CACHE_MAX:
            self._replay.popitem(last=False)
        return False


@dataclass(frozen=True)
class Introduction:
    """An INTRODUCE2 that passed: meet the client at the rendezvous point given by
    ``rend_link_specs`` / ``rend_onion_key``, send ``rendezvous1`` there, then add the
    end-to-end layer with ``key_material`` (service side)."""

    cookie: bytes = field(repr=False)
    rend_link_specs: tuple[LinkSpec, ...]
    rend_onion_key: bytes = field(repr=False)
    rendezvous1: bytes = field(repr=False)
    key_material: bytes = field(repr=False)

    def rend_relay_fields(self) -> tuple[str, int, bytes, bytes]:
        """``(address, or_port, rsa_id, ed_id)`` of the rendezvous point from its link
        specifiers. Raises HsIntroduceError if it has no IPv4 address or legacy ID."""
        specs = {s.lstype: s for s in self.rend_link_specs}
        if LinkSpecType.IPV4 not in specs or LinkSpecType.LEGACY_ID not in specs:
            raise HsIntroduceError("rendezvous point without an IPv4 address or legacy ID", "malformed")
        host, port = specs[LinkSpecType.IPV4].hostport()
        ed = specs[LinkSpecType.ED25519_ID].data if LinkSpecType.ED25519_ID in specs else b""
        return host, port, specs[LinkSpecType.LEGACY_ID].data, ed


@dataclass(frozen=True)
class DescriptorUpload:
    """One descriptor to upload: its period, blinded key, the text and where it goes."""

    period: TimePeriod
    blinded_key: bytes
    revision_counter: int
    text: str = field(repr=False)
    hsdirs: tuple[bytes, ...]  # Ed25519 identities
    second: bool  # the "next" descriptor (built with the current SRV)
    srv_source: str  # "consensus" | "disaster"


class OnionServiceCore:
    """The state of one onion service (see the module docstring)."""

    def __init__(self, identity: ExpandedKey, *, num_intro_points: int = DEFAULT_NUM_INTRO_POINTS,
                 client_keys: Sequence[bytes] = (), intro2_rate: float = INTRO2_RATE,
                 intro2_burst: float = INTRO2_BURST, dos_defense: DosParams | None = None,
                 rng: random.Random | None = None, now: float = 0.0) -> None:
        if not 1 <= num_intro_points <= MAX_NUM_INTRO_POINTS:
            raise ValueError(f"the number of introduction points is 1..{MAX_NUM_INTRO_POINTS}")
        self.identity = identity
        self.address = encode_onion_address(identity.public)
        self.num_intro_points = num_intro_points
        #: x25519 public keys of authorized clients (restricted discovery); empty: anyone
        self.client_keys = tuple(client_keys)
        #: the ESTABLISH_INTRO DoS extension to send (tor's HiddenServiceEnableIntroDoSDefense)
        self.dos_defense = dos_defense
        self.intro_points: list[ServiceIntroPoint] = []
        self._rng = rng or random.SystemRandom()
        self._bucket = TokenBucket(intro2_rate, intro2_burst, now=now)
        self._revisions: dict[bytes, int] = {}  # blinded key -> last revision counter used
        self._signing: dict[int, ed25519.Ed25519PrivateKey] = {}  # period number -> descriptor signing key
        self._subcreds: dict[int, bytes] = {}  # period number -> subcredential
        #: what happened to INTRODUCE2 cells, by outcome (the metrics read it)
        self.counts: dict[str, int] = {}

    # -- introduction points -------------------------------------------------------------------

    def missing_intro_points(self) -> int:
        """How many introduction points to add to reach the configured number."""
        return max(0, self.num_intro_points - len(self.intro_points))

    def add_intro_point(self, relay: object, now: float) -> ServiceIntroPoint:
        """Fresh keys for a new introduction point at ``relay`` (not yet established)."""
        ip = ServiceIntroPoint(relay, now, now + self._rng.uniform(INTRO_LIFETIME_MIN, INTRO_LIFETIME_MAX),
                               self._rng.randint(INTRO_MAX_INTRODUCTIONS_MIN, INTRO_MAX_INTRODUCTIONS_MAX))
        self.intro_points.append(ip)
        return ip

    def remove_intro_point(self, ip: ServiceIntroPoint) -> None:
        if ip in self.intro_points:
            self.intro_points.remove(ip)

    def retire_intro_points(self, now: float) -> list[ServiceIntroPoint]:
        """The introduction points that are due for rotation (removed here)."""
        due = [ip for ip in self.intro_points if ip.due(now)]
        for ip in due:
            self.intro_points.remove(ip)
        return due

    def used_relays(self) -> set[bytes]:
        """RSA identities of the relays already serving as our introduction points."""
        return {ip.relay.rsa_id for ip in self.intro_points}  # type: ignore[attr-defined]

    def established(self) -> list[ServiceIntroPoint]:
        return [ip for ip in self.intro_points if ip.established]

    # -- descriptors ---------------------------------------------------------------------------

    def upload_plan(self, hsdir_ids: Sequence[bytes], *, valid_after: float, srv_current: bytes | None,
                    srv_previous: bytes | None, now: float, voting_interval: int = 3600,
                    period_length: int = DEFAULT_PERIOD_LENGTH, n_replicas: int = DEFAULT_N_REPLICAS,
                    spread_store: int = DEFAULT_SPREAD_STORE,
                    lifetime: int = DEFAULT_LIFETIME) -> list[DescriptorUpload]:
        """The two descriptors (first, second) with the established introduction points,
        signed and encrypted, each with the HSDirs it goes to."""
        periods = service_upload_choices(valid_after, bytes(32), bytes(32), voting_interval=voting_interval,
                                         length=period_length)
        intro = [ip.descriptor_entry() for ip in self.established()]
        out = []
        for second, choice in enumerate(periods):
            period = choice.period
            srv = srv_current if second else srv_previous
            source = "consensus" if srv is not None else "disaster"
            srv = srv if srv is not None else disaster_srv(period)
            blinded = blind_secret_key(self.identity, period)
            subcred = self._subcreds.setdefault(period.number,
                                                subcredential(self.identity.public, blinded.public))
            signing = self._signing.setdefault(period.number, ed25519.Ed25519PrivateKey.generate())
            base = period.start - 2 * period.length * 60
            rev = max(int(now) - base, self._revisions.get(blinded.public, -1) + 1, 0)
            self._revisions[blinded.public] = rev
            text = build_descriptor(blinded=blinded, subcred=subcred, revision_counter=rev,
                                    intro_points=intro, now=now, signing_key=signing, lifetime=lifetime,
                                    client_keys=self.client_keys)
            dirs = responsible_hsdirs(hsdir_ids, blinded.public, period, srv, n_replicas=n_replicas,
                                      spread=spread_store)
            out.append(DescriptorUpload(period, blinded.public, rev, text, tuple(dirs), bool(second), source))
        # forget the keys of periods no longer published; the subcredential of the one just
        # before stays a little longer (clients may still hold that descriptor)
        oldest = min(u.period.number for u in out)
        for number in [n for n in self._signing if n < oldest]:
            del self._signing[number]
        for number in [n for n in self._subcreds if n < oldest - 1]:
            del self._subcreds[number]
        return out

    def next_reupload(self, now: float) -> float:
        """When to upload again if nothing changes (60-120 minutes, as tor)."""
        return now + self._rng.uniform(REUPLOAD_MIN, REUPLOAD_MAX)

    # -- INTRODUCE2 ----------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def introduce2(self, ip: ServiceIntroPoint, body: bytes, now: float) -> Introduction:
        """Process an INTRODUCE2 that arrived on ``ip``'s introduction circuit. Raises
        HsIntroduceError (reason: malformed, unknown_auth_key, replay, bad_mac,
        bad_onion_key, rate_limited)."""
        try:
            intro = self._introduce2(ip, body, now)
        except HsIntroduceError as exc:
            self._count(exc.reason)
            raise
        self._count("accepted")
        return intro

    def _introduce2(self, ip: ServiceIntroPoint, body: bytes, now: float) -> Introduction:
        try:
            cell = Introduce2.parse(body)
            cell.validate()
        except ProtocolError as exc:
            raise HsIntroduceError(f"malformed INTRODUCE2: {exc}", "malformed") from None
        if cell.auth_key != ip.auth_public:
            raise HsIntroduceError("INTRODUCE2 names another introduction point's auth key",
                                   "unknown_auth_key")
        if len(cell.encrypted) < 32 + 32:
            raise HsIntroduceError("INTRODUCE2 encrypted section too short", "malformed")
        header = bytes(body)[:len(body) - len(cell.encrypted)]
        if ip._seen(cell.encrypted):
            raise HsIntroduceError("replayed INTRODUCE2 ignored", "replay")
        got = None
        for subcred in list(self._subcreds.values()):
            try:
                got = service_receive_intro(ip.enc_key, ip.auth_public, subcred, header, cell.encrypted)
                break
            except HandshakeError:
                continue
        if got is None:
            raise HsIntroduceError("INTRODUCE2 MAC matches no descriptor of ours", "bad_mac")
        try:
            plain = IntroducePlaintext.parse(got.plaintext)
        except ProtocolError as exc:
            raise HsIntroduceError(f"malformed INTRODUCE2 plaintext: {exc}", "malformed") from None
        if plain.onion_key_type != ONION_KEY_NTOR or len(plain.onion_key) != 32:
            raise HsIntroduceError("INTRODUCE2 without an ntor key for the rendezvous point", "bad_onion_key")
        if not self._bucket.spend(1, now):
            self._bucket.tokens += 1  # (refused introductions cost nothing)
            raise HsIntroduceError("INTRODUCE2 over the service's rate; dropped", "rate_limited")
        ip.introductions += 1
        try:
            info, seed = got.reply(ip.enc_key, ip.auth_public)
        except HandshakeError as exc:
            raise HsIntroduceError(f"hs-ntor: {exc}", "malformed") from None
        return Introduction(plain.cookie, plain.link_specifiers, plain.onion_key,
                            Rendezvous1(plain.cookie, info).encode(),
                            expand_circuit_keys(seed).key_material(service_side=True))
