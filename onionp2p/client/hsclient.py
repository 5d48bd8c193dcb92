"""Connecting to a v3 onion service (rend-spec-v3 §2-§4; the pure parts are
:mod:`onionp2p.proto.hs.client`).

One :meth:`OnionServiceClient.connect` does what tor's client does for a SOCKS request to
``<key>.onion:port``: the fetch plan (period, SRV, blinded key, responsible HSDirs), the
descriptor over a BEGIN_DIR stream on a 3-hop circuit to one HSDir (``GET
/tor/hs/3/<base64 blinded key>``), its decryption, a rendezvous circuit
(ESTABLISH_RENDEZVOUS), an introduction circuit to one introduction point after another
until one acks INTRODUCE1, RENDEZVOUS2 (the circuit core adds the end-to-end layer as it
arrives), and a stream opened with BEGIN to the empty address and the port.

What it needs from the rest of the node comes in as callables (this module is of the
client layer and knows no directory code): ``directory()`` the current consensus view
(routers, ``valid_after``, ``fresh_until``, ``srv_current``, ``srv_previous``, ``params``),
``build(last, purpose, onion)`` an onion-service circuit ending at ``last`` (None: a
rendezvous point chosen by the builder; the node passes
:meth:`~onionp2p.client.circmgr.CircuitManager.build_internal`) — or, for library use
without a circuit manager, ``pick_path(last)`` a path to build directly —,
``http_get(reader, writer, path)`` one HTTP/1.0 GET over a stream, ``client_keys(identity)``
our x25519 client-authorization key for a service (tor's ClientOnionAuthDir), or None.

What tor's client keeps between requests, kept here too:

* a *descriptor cache*: a decrypted descriptor is reused for the same service until its
  signing-key certificate expires (tor's client cache entry expiry) or the time period
  changes (the plan's blinded key differs: a new consensus moved the period); a descriptor
  whose introduction points all failed is dropped and fetched again once;
* *rendezvous circuits*: an open, joined rendezvous circuit takes more streams to the same
  service from the same isolation key (SOCKS credentials, client address, listener) until
  ``dirtiness()`` seconds after its first stream (MaxCircuitDirtiness), then it is closed
  once its last stream has ended; requests for the same service and key wait for one
  rendezvous instead of making one each;
* :meth:`OnionServiceClient.new_identity` (NEWNYM) forgets both, as tor's
  ``hs_client_purge_state``: open streams continue, new ones make new circuits.

The circuits show tor's HS_STATE as they go (HSCI_CONNECTING, HSCI_INTRO_SENT, HSCI_DONE;
HSCR_CONNECTING, HSCR_ESTABLISHED_IDLE, HSCR_ESTABLISHED_WAITING, HSCR_JOINED).

Failures raise :class:`HsConnectError`, whose ``kind`` maps to tor's extended SOCKS reply
(:data:`onionp2p.proto.hs.client.SOCKS_REPLY`): desc_not_found, desc_invalid,
missing_client_auth, bad_client_auth, intro_failed, intro_timedout (every introduction
point timed out), rend_failed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from onionp2p.client.client import ClientCircuit, OnionClient
from onionp2p.errors import CircuitError, HsClientAuthError, HsDescriptorError, OnionError, StreamError
from onionp2p.log import get_logger
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.hs.address import encode_onion_address, parse_onion_address
from onionp2p.proto.hs.cells import EstablishRendezvous, IntroAckStatus, IntroduceAck
from onionp2p.proto.hs.client import FetchPlan, fetch_plan, make_introduce1
from onionp2p.proto.hs.desc import HsDescriptor, IntroPoint, parse_descriptor
from onionp2p.proto.hs.ntor import expand_circuit_keys
from onionp2p.proto.hs.ring import consensus_periods
from onionp2p.proto.relaycell import EndReason, LinkSpec, LinkSpecType, RelayCommand

T = TypeVar("T")

__all__ = ["HsConnectError", "OnionServiceClient", "intro_relay"]

log = get_logger("onionp2p.hs")

#: how long one step may take (tor: circuit build timeouts, 120 s for the whole SOCKS request)
STEP_TIMEOUT = 60.0
MAX_DESC_SIZE = 50_000  # tor's HS_DESC_MAX_LEN


class HsConnectError(StreamError):
    """Reaching an onion service failed; ``kind`` is a key of
    :data:`onionp2p.proto.hs.client.SOCKS_REPLY` (desc_not_found, intro_failed ...). The
    RELAY_END-style reason is RESOLVEFAILED (SOCKS5 reply 4), what tor answers without
    ExtendedErrors."""

    def __init__(self, message: str, kind: str):
        super().__init__(message, EndReason.RESOLVEFAILED)
        self.kind = kind


def intro_relay(ip: IntroPoint) -> RelayInfo:
    """The introduction point as a path's last hop, from its descriptor entry (link
    specifiers and ntor key)."""
    specs = {s.lstype: s.data for s in ip.link_specifiers}
    addr = specs.get(LinkSpecType.IPV4)
    if addr is None or LinkSpecType.LEGACY_ID not in specs:
        raise HsDescriptorError("introduction point without an IPv4 address or legacy identity")
    return RelayInfo("intro", ".".join(str(b) for b in addr[:4]), int.from_bytes(addr[4:6], "big"),
                     specs[LinkSpecType.LEGACY_ID], specs.get(LinkSpecType.ED25519_ID, b""), ip.onion_key)


def _link_specs(relay: RelayInfo) -> tuple[LinkSpec, ...]:
    specs = [LinkSpec.ipv4(relay.address, relay.or_port), LinkSpec.legacy_id(relay.rsa_id)]
    if relay.ed_id:
        specs.append(LinkSpec.ed25519_id(relay.ed_id))
    return tuple(specs)


class _Inbox:
    """The onion-service messages one circuit receives, awaited one command at a time."""

    def __init__(self, circ: ClientCircuit) -> None:
        self.q: asyncio.Queue = asyncio.Queue()
        circ.on_hs_message = lambda hop, cmd, data: self.q.put_nowait((cmd, data))
        self.circ = circ

    async def expect(self, command: int, timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            while True:
                if self.circ.core.closed:
                    raise CircuitError("circuit closed", self.circ.core.close_reason or "NONE")
                try:
                    cmd, data = await asyncio.wait_for(self.q.get(), 0.5)
                except TimeoutError:
                    continue
                if cmd == command:
                    return data
                log.info("unexpected onion-service message ignored", relay_cmd=RelayCommand(cmd).name)


@dataclass
class _CachedDesc:
    plan: FetchPlan
    desc: HsDescriptor
    expires: float  # unix time: the descriptor signing-key certificate's expiry


@dataclass
class _Rend:
    circ: ClientCircuit
    first_used: float  # monotonic


class _KeyedLocks:
    """One asyncio.Lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


#: how often a rendezvous circuit past its dirtiness is checked for its last stream's end
REND_CLOSE_CHECK = 30.0


#: builds an onion-service circuit: ``build(last, purpose, onion)`` (CircuitManager.build_internal)
CircuitBuilder = Callable[[RelayInfo | None, str, str | None], Awaitable[ClientCircuit]]


class OnionServiceClient:
    """Opens streams to onion services over ``client``'s circuits (see the module docstring)."""

    def __init__(self, client: OnionClient, *, directory: Callable[[], Any],
                 http_get: Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[bytes]],
                 pick_path: Callable[[RelayInfo | None], Sequence[RelayInfo]] | None = None,
                 build: CircuitBuilder | None = None,
                 client_keys: Callable[[bytes], Any] | None = None,
                 on_circuit: Callable[[ClientCircuit, str], None] | None = None,
                 testing_tor_network: bool = False,
                 dirtiness: Callable[[], float] = lambda: 600.0,
                 excluded: Callable[[RelayInfo], str] = lambda relay: "") -> None:
        if (pick_path is None) == (build is None):
            raise ValueError("give exactly one of pick_path and build")
        self.client = client
        self.directory = directory
        self.pick_path = pick_path
        self.build = build
        self.http_get = http_get
        self.client_keys = client_keys or (lambda identity: None)
        #: told of each circuit this makes and its purpose (HS_CLIENT_HSDIR, HS_CLIENT_INTRO,
        #: HS_CLIENT_REND), for `circuits` and CIRC events
        self.on_circuit = on_circuit or (lambda circ, purpose: None)
        #: tor's TestingTorNetwork: time periods as long as one shared-random protocol run
        #: (24 voting intervals; hs_common.c get_time_period_length), not a day
        self.testing_tor_network = testing_tor_network
        self.dirtiness = dirtiness
        #: tor's ExcludeNodes for relays chosen elsewhere (HSDirs of the hash ring, introduction
        #: points): "" usable, "last" only after every other one (StrictNodes 0), "never"
        self.excluded = excluded
        self._descs: dict[bytes, _CachedDesc] = {}
        self._rends: dict[tuple[bytes, Hashable], _Rend] = {}
        #: counts for the metrics port: ``requests`` by outcome ("ok" or an HsConnectError
        #: kind), ``descriptors`` by source ("cache", "fetched"), ``introductions`` and
        #: ``rendezvous`` by result ("ok", "failed"), ``reused`` rendezvous circuits
        self.stats: dict[str, Counter[str]] = {k: Counter() for k in (
            "requests", "descriptors", "introductions", "rendezvous", "reused")}
        self._locks = _KeyedLocks()  # (identity, isolation): one rendezvous at a time
        self._fetching = _KeyedLocks()  # identity: one descriptor fetch at a time

    async def _circuit(self, last: RelayInfo | None, purpose: str, identity: bytes) -> ClientCircuit:
        onion = encode_onion_address(identity)
        if self.build is not None:
            circ = await self.build(last, purpose, onion)
        else:
            assert self.pick_path is not None
            circ = await self.client.build_circuit(list(self.pick_path(last)), timeout=STEP_TIMEOUT)
            circ.purpose, circ.rend_query = purpose, onion.removesuffix(".onion")
        self.on_circuit(circ, purpose)
        return circ

    def plan(self, identity: bytes) -> FetchPlan:
        view = self.directory()
        hsdirs = [r.info.ed_id for r in view.routers if "HSDir" in r.flags and r.info.ed_id]
        # tor's voting interval is the current consensus's (fresh-until - valid-after): it
        # sets the time periods' rotation offset and the SRV schedule
        interval, length = consensus_periods(view.valid_after, view.fresh_until, getattr(view, "params", None),
                                             one_run=self.testing_tor_network)
        plan = fetch_plan(identity, hsdirs, valid_after=view.valid_after, srv_current=view.srv_current,
                          srv_previous=view.srv_previous, voting_interval=interval, period_length=length)
        log.debug("onion service fetch plan", period=plan.choice.period.number, srv=plan.srv_source,
                  hsdirs=len(plan.hsdirs))
        return plan

    async def descriptor(self, identity: bytes, *, refetch: bool = False) -> tuple[FetchPlan, HsDescriptor]:
        """The service's descriptor: the cached one while it is valid for the current period,
        else fetched (one fetch at a time per service)."""
        async with self._fetching.hold(identity):
            now = self.client_now()
            for stale in [k for k, c in self._descs.items() if c.expires <= now]:
                del self._descs[stale]
            plan = self.plan(identity)
            cached = self._descs.get(identity)
            if (not refetch and cached is not None and cached.plan.blinded_key == plan.blinded_key
                    and self.client_now() < cached.expires):
                log.debug("onion service descriptor from the cache")
                self.stats["descriptors"]["cache"] += 1
                return cached.plan, cached.desc
            self._descs.pop(identity, None)
            plan, desc = await self.fetch_descriptor(identity, plan)
            self.stats["descriptors"]["fetched"] += 1
            expires = desc.outer.signing_key_cert.expires_hours * 3600.0
            self._descs[identity] = _CachedDesc(plan, desc, expires)
            return plan, desc

    async def fetch_descriptor(self, identity: bytes, plan: FetchPlan | None = None,
                               ) -> tuple[FetchPlan, HsDescriptor]:
        """The decrypted descriptor, from the first responsible HSDir that has it (no cache)."""
        plan = plan or self.plan(identity)
        by_ed = {r.info.ed_id: r.info for r in self.directory().routers}
        path = "/tor/hs/3/" + base64.b64encode(plan.blinded_key).decode().rstrip("=")  # as tor sends it
        last: Exception | None = None
        for ed in self._exclusion_order(list(plan.hsdirs), lambda ed: by_ed[ed]):
            circ = None
            try:
                circ = await self._circuit(by_ed[ed], "HS_CLIENT_HSDIR", identity)
                reader, writer = await circ.open_dir_stream(timeout=STEP_TIMEOUT)
                text = await self.http_get(reader, writer, path)
            except (OnionError, TimeoutError, OSError) as exc:
                log.info("descriptor fetch failed", hsdir=by_ed[ed].nickname, error=str(exc))
                last = exc
                continue
            finally:
                if circ is not None:
                    circ.close()
            try:
                desc = parse_descriptor(text, blinded_key=plan.blinded_key, subcred=plan.subcred,
                                        now=self.client_now(), client_secret=self.client_keys(identity))
            except HsClientAuthError as exc:
                raise HsConnectError(str(exc), "missing_client_auth" if exc.missing else "bad_client_auth") \
                    from exc
            except HsDescriptorError as exc:
                last = exc
                log.info("descriptor refused", hsdir=by_ed[ed].nickname, error=str(exc))
                continue
            return plan, desc
        if isinstance(last, HsDescriptorError):
            raise HsConnectError(f"descriptor invalid: {last}", "desc_invalid")
        raise HsConnectError(f"descriptor not found on {len(plan.hsdirs)} HSDirs", "desc_not_found")

    def _exclusion_order(self, items: list[T], relay: Callable[[T], RelayInfo]) -> list[T]:
        """``items`` with those in exclude_nodes last (tor: "we'll use one anyway"), or dropped
        with strict_nodes (tor's client_get_random_intro, hs_pick_hsdir)."""
        def judge(item: T) -> str:
            try:
                return self.excluded(relay(item))
            except OnionError:  # a malformed entry: its own attempt reports it
                return ""
        verdict = {id(i): judge(i) for i in items}
        return ([i for i in items if not verdict[id(i)]]
                + [i for i in items if verdict[id(i)] == "last"])

    @staticmethod
    def client_now() -> float:
        """The clock descriptors are checked against (certificates' expiry)."""
        return time.time()

    def new_identity(self) -> None:
        """NEWNYM: forget cached descriptors and rendezvous circuits (open streams go on)."""
        self._descs.clear()
        self._rends.clear()

    def forget(self, identity: bytes) -> None:
        """Drop what is cached for one service (client authorization changed)."""
        self._descs.pop(identity, None)
        for key in [k for k in self._rends if k[0] == identity]:
            del self._rends[key]

    async def connect(self, host: str, port: int, *, isolation: Hashable = None,
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to ``port`` of the onion service ``host``. Raises HsConnectError (or
        OnionAddressError for a bad name)."""
        reader, writer, _circ = await self.open_stream(host, port, isolation=isolation)
        return reader, writer

    async def open_stream(self, host: str, port: int, *, isolation: Hashable = None,
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ClientCircuit]:
        """:meth:`connect`, also returning the rendezvous circuit the stream is on."""
        try:
            got = await self._open_stream(host, port, isolation)
        except HsConnectError as exc:
            self.stats["requests"][exc.kind] += 1
            raise
        self.stats["requests"]["ok"] += 1
        return got

    async def _open_stream(self, host: str, port: int, isolation: Hashable,
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ClientCircuit]:
        identity = parse_onion_address(host).pubkey
        key = (identity, isolation)
        # one rendezvous per service and isolation key at a time (tor attaches the streams
        # waiting for it to the circuit being made)
        async with self._locks.hold(key):
            reused = self._reusable(key)
            if reused is not None:
                try:
                    reader, writer = await reused.open_stream("", port, timeout=STEP_TIMEOUT)
                    log.debug("stream on an open rendezvous circuit", circ=reused.id)
                    self.stats["reused"]["ok"] += 1
                    return reader, writer, reused
                except CircuitError:
                    self._rends.pop(key, None)  # it died meanwhile: make a new one
                except (StreamError, TimeoutError) as exc:
                    raise HsConnectError(f"the service refused the stream: {exc}", "rend_failed") from exc
            rend, reader, writer = await self._rendezvous(identity, port)
            entry = self._rends[key] = _Rend(rend, time.monotonic())
            asyncio.get_running_loop().call_later(self.dirtiness(), self._expire, key, entry)
            return reader, writer, rend

    def _expire(self, key: tuple[bytes, Hashable], entry: _Rend) -> None:
        """The rendezvous circuit is past its dirtiness: no new streams; closed once its
        last stream has ended (tor closes dirty circuits without streams)."""
        if self._rends.get(key) is entry:
            del self._rends[key]
        if entry.circ.state != "built":
            return
        if entry.circ.streams:
            asyncio.get_running_loop().call_later(min(REND_CLOSE_CHECK, self.dirtiness()), self._expire, key,
                                                  entry)
        else:
            log.debug("closing a rendezvous circuit past its dirtiness", circ=entry.circ.id)
            entry.circ.close()

    def _reusable(self, key: tuple[bytes, Hashable]) -> ClientCircuit | None:
        entry = self._rends.get(key)
        if entry is None:
            return None
        if entry.circ.state != "built" or time.monotonic() - entry.first_used > self.dirtiness():
            self._expire(key, entry)
            return None
        return entry.circ

    async def _rendezvous(self, identity: bytes, port: int,
                          ) -> tuple[ClientCircuit, asyncio.StreamReader, asyncio.StreamWriter]:
        """Descriptor, rendezvous circuit, introduction, RENDEZVOUS2, and the first stream."""
        plan, desc = await self.descriptor(identity)
        if not desc.intro_points:
            self._descs.pop(identity, None)
            raise HsConnectError("descriptor lists no introduction points", "intro_failed")
        rend = None
        try:
            try:
                rend = await self._circuit(None, "HS_CLIENT_REND", identity)
                rp = rend.path[-1]
                rend_in = _Inbox(rend)
                cookie = os.urandom(20)
                rend.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(cookie).encode())
                await rend_in.expect(RelayCommand.RENDEZVOUS_ESTABLISHED, STEP_TIMEOUT)
                rend.hs_state = "HSCR_ESTABLISHED_IDLE"
            except (OnionError, TimeoutError) as exc:
                raise HsConnectError(f"rendezvous circuit failed: {exc}", "rend_failed") from exc
            if not await self._introduce_any(desc, plan, cookie, rend, rp):
                # tor refetches a descriptor whose introduction points all failed: the service
                # may have moved them
                plan, desc = await self.descriptor(identity, refetch=True)
                await self._introduce_any(desc, plan, cookie, rend, rp, final=True)
            rend.hs_state = "HSCR_ESTABLISHED_WAITING"
            try:
                await rend_in.expect(RelayCommand.RENDEZVOUS2, STEP_TIMEOUT)
            except (OnionError, TimeoutError) as exc:
                self.stats["rendezvous"]["failed"] += 1
                raise HsConnectError(f"no rendezvous: {exc}", "rend_failed") from exc
            rend.hs_state = "HSCR_JOINED"
            self.stats["rendezvous"]["ok"] += 1
            # the end-to-end layer is there (the core added it with RENDEZVOUS2); BEGIN with
            # an empty address, as tor (connection_ap_handshake_send_begin)
            try:
                reader, writer = await rend.open_stream("", port, timeout=STEP_TIMEOUT)
            except (OnionError, TimeoutError) as exc:
                raise HsConnectError(f"the service refused the stream: {exc}", "rend_failed") from exc
            return rend, reader, writer
        except BaseException:
            if rend is not None:
                rend.close()
            raise

    async def _introduce_any(self, desc: HsDescriptor, plan: FetchPlan, cookie: bytes, rend: ClientCircuit,
                             rp: RelayInfo, *, final: bool = False) -> bool:
        """INTRODUCE1 through the descriptor's introduction points in random order until one
        acks (True). When all fail: False, or with ``final`` HsConnectError (intro_timedout
        when every one timed out, else intro_failed)."""
        points = list(desc.intro_points)
        random.SystemRandom().shuffle(points)
        points = self._exclusion_order(points, intro_relay)
        if not points:
            raise HsConnectError("every introduction point is in exclude_nodes and strict_nodes is set",
                                 "intro_failed")
        outcomes = []
        for ip in points:
            outcome = await self._introduce(ip, plan, cookie, rend, rp)
            self.stats["introductions"]["ok" if outcome == "acked" else "failed"] += 1
            if outcome == "acked":
                return True
            outcomes.append(outcome)
        if not final:
            return False
        if outcomes and all(o == "timeout" for o in outcomes):
            raise HsConnectError(f"all {len(points)} introduction points timed out", "intro_timedout")
        raise HsConnectError(f"all {len(points)} introduction points failed", "intro_failed")

    async def _introduce(self, ip: IntroPoint, plan: FetchPlan, cookie: bytes, rend: ClientCircuit,
                         rp: RelayInfo) -> str:
        """INTRODUCE1 through ``ip``: "acked" (the rendezvous circuit is then armed), "timeout"
        or "failed"."""
        circ = None
        try:
            body, hs = make_introduce1(ip, plan.subcred, cookie, _link_specs(rp), rp.ntor_key)
            rend.expect_rendezvous(lambda info: expand_circuit_keys(hs.complete(info)).key_material())
            circ = await self._circuit(intro_relay(ip), "HS_CLIENT_INTRO", plan.identity)
            inbox = _Inbox(circ)
            circ.send_relay(RelayCommand.INTRODUCE1, 0, body)
            circ.hs_state = "HSCI_INTRO_SENT"
            ack = IntroduceAck.parse(await inbox.expect(RelayCommand.INTRODUCE_ACK, STEP_TIMEOUT))
            circ.hs_state = "HSCI_DONE"
        except TimeoutError:
            log.info("introduction timed out")
            return "timeout"
        except OnionError as exc:  # (HandshakeError, ProtocolError are OnionErrors)
            log.info("introduction failed", error=str(exc))
            return "timeout" if isinstance(exc, CircuitError) and exc.reason == "TIMEOUT" else "failed"
        finally:
            if circ is not None:
                circ.close()
        if ack.status != IntroAckStatus.SUCCESS:
            log.info("introduction refused", status=int(ack.status))
            return "failed"
        return "acked"
