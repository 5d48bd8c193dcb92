"""Hosting a v3 onion service (rend-spec-v3 §2-§4; the pure parts are
:mod:`onionp2p.proto.hs.service`).

An :class:`OnionService` does what tor does for one ``HiddenServiceDir``:

* keeps ``num_intro_points`` introduction circuits up (purpose HS_SERVICE_INTRO): a
  3-hop circuit ending at a relay that speaks ``HSIntro=4``, ESTABLISH_INTRO with a fresh
  auth key (and the DoS extension when ``dos_defense`` is set, tor's
  HiddenServiceEnableIntroDoSDefense), INTRO_ESTABLISHED awaited; a circuit that closes or
  an introduction point past its lifetime is replaced by a new one on another relay;
* uploads both descriptors (current and next, :meth:`OnionServiceCore.upload_plan`) over
  BEGIN_DIR streams, ``POST /tor/hs/3/publish``, to each responsible HSDir (purpose
  HS_SERVICE_HSDIR), once every introduction point is established, and again when they
  change, when the consensus moves the descriptors to other periods or HSDirs, and every
  60-120 minutes; each upload is reported to ``on_desc_event`` (tor's HS_DESC UPLOAD,
  UPLOADED, FAILED);
* on INTRODUCE2 (checked by the core: malformed, replayed, foreign or excess ones are
  dropped with a log line) builds a circuit to the client's rendezvous point (purpose
  HS_SERVICE_REND), sends RENDEZVOUS1, adds the end-to-end layer (service side) and serves
  the client's BEGINs: the virtual port is looked up in ``ports`` and the stream joined to
  a TCP connection to the target; an unknown port gets END (DONE) and, as tor does
  without HiddenServiceAllowUnknownPorts, the circuit is closed (port scanning costs a
  circuit per port); ``max_streams`` (tor's HiddenServiceMaxStreams, 0 unlimited) bounds the
  streams per rendezvous circuit.

What it needs from the node comes in as callables, as for
:class:`~onionp2p.client.hsclient.OnionServiceClient`: ``directory()`` the consensus view
(``routers``, ``valid_after``, ``fresh_until``, ``srv_current``, ``srv_previous``,
``params``), ``build(last, purpose, onion)`` an onion-service circuit ending at ``last``
(the node's :meth:`~onionp2p.client.circmgr.CircuitManager.build_internal`: guards, path
rules, purposes and HS_STATE on the control port) or, without a circuit manager,
``pick_path(last)`` a path, and ``http_post(reader, writer, path, body)`` one HTTP/1.0 POST
over a stream (raises on a non-200 answer).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from onionp2p.client.client import ClientCircuit, OnionClient
from onionp2p.client.hsclient import CircuitBuilder
from onionp2p.client.splice import splice
from onionp2p.errors import ConfigError, HsIntroduceError, OnionError, StreamError
from onionp2p.log import get_logger
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs.cells import DosParams
from onionp2p.proto.hs.ring import DEFAULT_N_REPLICAS, DEFAULT_SPREAD_STORE, consensus_periods
from onionp2p.proto.hs.service import (
    DEFAULT_NUM_INTRO_POINTS,
    DescriptorUpload,
    Introduction,
    OnionServiceCore,
    PortMapping,
    ServiceIntroPoint,
    parse_port_mapping,
)
from onionp2p.proto.relaycell import Begin, EndReason, RelayCommand

__all__ = ["OnionService", "PortMapping", "parse_port_mapping"]

log = get_logger("onionp2p.hs")

STEP_TIMEOUT = 60.0
PUBLISH_PATH = "/tor/hs/3/publish"
#: upload even if not every introduction point is up after this long (one is enough to be
#: reachable; tor waits for all of them)
PARTIAL_UPLOAD_AFTER = 30.0
MAX_PARALLEL_UPLOADS = 8
#: seconds before uploading again when no HSDir took the descriptor
RETRY_UPLOAD = 15.0
#: a rendezvous circuit that failed is built once more, within this many seconds
#: (tor's MAX_REND_FAILURES, MAX_REND_TIMEOUT)
MAX_REND_RETRIES = 1
MAX_REND_TIMEOUT = 30.0
TICK = 1.0


class OnionService:
    """One hosted onion service (see the module docstring). ``await start()``, then
    :attr:`address`; :meth:`wait_published`; ``await stop()``."""

    def __init__(self, client: OnionClient, identity: ExpandedKey, ports: Sequence[PortMapping], *,
                 directory: Callable[[], Any],
                 http_post: Callable[[asyncio.StreamReader, asyncio.StreamWriter, str, bytes],
                                     Awaitable[bytes]],
                 build: CircuitBuilder | None = None,
                 pick_path: Callable[[RelayInfo], Sequence[RelayInfo]] | None = None,
                 num_intro_points: int = DEFAULT_NUM_INTRO_POINTS, max_streams: int = 0,
                 max_streams_close_circuit: bool = False, allow_unknown_ports: bool = False,
                 client_keys: Sequence[bytes] = (), dos_defense: DosParams | None = None,
                 on_circuit: Callable[[ClientCircuit, str], None] | None = None,
                 on_desc_event: Callable[..., None] | None = None,
                 testing_tor_network: bool = False,
                 excluded: Callable[[Any], bool] = lambda rs: False) -> None:
        if not ports:
            raise ConfigError("an onion service needs at least one port")
        if (pick_path is None) == (build is None):
            raise ValueError("give exactly one of pick_path and build")
        self.client = client
        self.ports = {p.virtual: p for p in ports}
        self.directory = directory
        self.pick_path = pick_path
        self.build = build
        self.http_post = http_post
        self.max_streams = max_streams
        self.max_streams_close_circuit = max_streams_close_circuit
        self.allow_unknown_ports = allow_unknown_ports
        self.core = OnionServiceCore(identity, num_intro_points=num_intro_points, client_keys=client_keys,
                                     dos_defense=dos_defense, now=time.monotonic())
        self.on_circuit = on_circuit or (lambda circ, purpose: None)
        #: ``fn(action, address, hsdir, descriptor_id, reason)``: UPLOAD, UPLOADED, FAILED
        self.on_desc_event = on_desc_event or (lambda *a: None)
        self.testing_tor_network = testing_tor_network
        #: tor's ExcludeNodes: ``excluded(router_status)`` relays are never introduction points
        self.excluded = excluded
        #: what happened, for metrics: rendezvous {success, failed}, streams {accepted, refused},
        #: uploads {success, failed}; INTRODUCE2 outcomes are in ``core.counts``
        self.counts: dict[str, dict[str, int]] = {"rendezvous": {}, "streams": {}, "uploads": {}}
        self._intro_circs: dict[ServiceIntroPoint, ClientCircuit] = {}
        self._rend_circs: set[ClientCircuit] = set()
        self._tasks: set[asyncio.Task] = set()
        self._launching = 0
        self._main: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._published = asyncio.Event()
        self._uploaded_key: tuple | None = None  # what the last upload was for
        self._uploading: asyncio.Task | None = None
        self._next_upload = 0.0
        self._started = 0.0
        self._rng = random.SystemRandom()
        self.closed = False

    @property
    def address(self) -> str:
        """The onion address without ``.onion`` (tor's ServiceID)."""
        return self.core.address.removesuffix(".onion")

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> OnionService:
        self._started = time.monotonic()
        self._main = asyncio.get_running_loop().create_task(self._run(), name=f"onion service {self.address}")
        log.info("onion service starting", address=self.address, ports=[str(p) for p in self.ports.values()])
        return self

    async def wait_published(self, timeout: float | None = None) -> None:
        """Until a descriptor reached at least one HSDir (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            await self._published.wait()

    @property
    def published(self) -> bool:
        return self._published.is_set()

    async def stop(self) -> None:
        """Close every circuit of the service and its streams."""
        self.closed = True
        tasks = [t for t in (self._main, self._uploading, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for circ in [*self._intro_circs.values(), *self._rend_circs]:
            circ.close()
        self._intro_circs.clear()
        self._rend_circs.clear()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        log.info("onion service stopped", address=self.address)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _bump(self, table: str, outcome: str) -> None:
        counts = self.counts[table]
        counts[outcome] = counts.get(outcome, 0) + 1

    # -- the main loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self.closed:
            try:
                self._tick()
            except Exception as exc:  # pragma: no cover - a bug must not stop the service
                log.warning("onion service step failed", address=self.address, error=repr(exc))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)

    def _tick(self) -> None:
        now = time.monotonic()
        for ip, circ in list(self._intro_circs.items()):
            if circ.core.closed:
                log.info("introduction circuit closed; replacing it", address=self.address,
                         intro=getattr(ip.relay, "nickname", "?"), reason=circ.close_reason)
                del self._intro_circs[ip]
                self.core.remove_intro_point(ip)
        self._rend_circs = {c for c in self._rend_circs if not c.core.closed}
        for ip in self.core.retire_intro_points(now):
            log.info("introduction point rotated", address=self.address,
                     intro=getattr(ip.relay, "nickname", "?"))
            circ = self._intro_circs.pop(ip, None)
            if circ is not None:
                circ.close()
        for _ in range(self.core.missing_intro_points() - self._launching):
            self._launching += 1
            self._spawn(self._intro_point())
        if self._uploading is None or self._uploading.done():
            self._maybe_upload(now)

    def _view(self) -> Any:
        return self.directory()

    def _period_length(self, view: Any) -> tuple[int, int]:
        """(voting interval, period minutes): the client side's rule, from the same code."""
        return consensus_periods(view.valid_after, view.fresh_until, getattr(view, "params", None),
                                 one_run=self.testing_tor_network)

    def _maybe_upload(self, now: float) -> None:
        established = self.core.established()
        if not established:
            return
        if len(established) < self.core.num_intro_points and now - self._started < PARTIAL_UPLOAD_AFTER:
            return
        view = self._view()
        hsdirs = tuple(sorted(r.info.ed_id for r in view.routers if "HSDir" in r.flags and r.info.ed_id))
        if not hsdirs:
            return
        interval, length = self._period_length(view)
        key = (tuple(sorted(ip.auth_public for ip in established)), hsdirs, view.srv_current if hasattr(
            view, "srv_current") else None, getattr(view, "srv_previous", None),
            (view.valid_after // 60 - 12 * interval // 60) // length)
        if key == self._uploaded_key and now < self._next_upload:
            return
        params = getattr(view, "params", {}) or {}
        plan = self.core.upload_plan(
            hsdirs, valid_after=view.valid_after, srv_current=getattr(view, "srv_current", None),
            srv_previous=getattr(view, "srv_previous", None), now=time.time(), voting_interval=interval,
            period_length=length, n_replicas=_param(params, "hsdir_n_replicas", DEFAULT_N_REPLICAS, 1, 16),
            spread_store=_param(params, "hsdir_spread_store", DEFAULT_SPREAD_STORE, 1, 128))
        self._uploaded_key = key
        self._next_upload = self.core.next_reupload(now)
        by_ed = {r.info.ed_id: r.info for r in view.routers}
        self._uploading = self._spawn(self._upload(plan, by_ed))

    # -- descriptors -----------------------------------------------------------------------------

    async def _upload(self, plan: list[DescriptorUpload], by_ed: dict[bytes, RelayInfo]) -> None:
        limit = asyncio.Semaphore(MAX_PARALLEL_UPLOADS)
        jobs = []
        for upload in plan:
            desc_id = base64.b64encode(upload.blinded_key).decode().rstrip("=")
            log.info("uploading descriptor", address=self.address, period=upload.period.number,
                     revision=upload.revision_counter, hsdirs=len(upload.hsdirs), srv=upload.srv_source,
                     next=upload.second)
            for ed in upload.hsdirs:
                if ed in by_ed:
                    jobs.append(self._upload_one(upload, by_ed[ed], desc_id, limit))
        results = await asyncio.gather(*jobs)
        if not any(results):  # no HSDir took it: try again soon rather than in an hour
            self._next_upload = time.monotonic() + RETRY_UPLOAD

    async def _upload_one(self, upload: DescriptorUpload, hsdir: RelayInfo, desc_id: str,
                          limit: asyncio.Semaphore) -> bool:
        name = f"${hsdir.fingerprint}~{hsdir.nickname}"
        async with limit:
            self.on_desc_event("UPLOAD", self.address, name, desc_id, None)
            circ = None
            try:
                circ = await self._circuit(hsdir, "HS_SERVICE_HSDIR")
                reader, writer = await circ.open_dir_stream(timeout=STEP_TIMEOUT)
                await self.http_post(reader, writer, PUBLISH_PATH, upload.text.encode())
            except (OnionError, TimeoutError, OSError) as exc:
                log.info("descriptor upload failed", address=self.address, hsdir=hsdir.nickname,
                         error=str(exc))
                self._bump("uploads", "failed")
                self.on_desc_event("FAILED", self.address, name, desc_id, "UPLOAD_REJECTED")
                return False
            finally:
                if circ is not None:
                    circ.close()
        log.debug("descriptor uploaded", address=self.address, hsdir=hsdir.nickname)
        self._bump("uploads", "success")
        self.on_desc_event("UPLOADED", self.address, name, desc_id, None)
        self._published.set()
        return True

    # -- introduction points ---------------------------------------------------------------------

    async def _circuit(self, last: RelayInfo, purpose: str) -> ClientCircuit:
        if self.build is not None:
            circ = await self.build(last, purpose, self.address)
        else:
            assert self.pick_path is not None
            circ = await self.client.build_circuit(list(self.pick_path(last)), timeout=STEP_TIMEOUT)
            circ.purpose, circ.rend_query = purpose, self.address  # type: ignore[attr-defined]
        self.on_circuit(circ, purpose)
        return circ

    def _choose_intro_relay(self) -> RelayInfo | None:
        """A relay for a new introduction point: one that speaks HSIntro=4 (Ed25519 auth
        keys), Stable when some are (tor: CRN_NEED_UPTIME), not one of ours already, not in
        exclude_nodes (tor's pick_intro_point)."""
        used = self.core.used_relays()
        routers = [r for r in self._view().routers
                   if "Running" in r.flags and r.info.rsa_id not in used and not self.excluded(r)
                   and (not r.info.protocols or r.info.supports("HSIntro", 4))]
        stable = [r for r in routers if "Stable" in r.flags]
        pool = stable or routers
        return self._rng.choice(pool).info if pool else None

    async def _intro_point(self) -> None:
        try:
            relay = self._choose_intro_relay()
            if relay is None:
                log.info("no relay for an introduction point", address=self.address)
                await asyncio.sleep(5)
                return
            ip = self.core.add_intro_point(relay, time.monotonic())
            circ = None
            try:
                circ = await self._circuit(relay, "HS_SERVICE_INTRO")
                established: asyncio.Future = asyncio.get_running_loop().create_future()
                circ.on_hs_message = lambda hop, cmd, data: self._intro_message(ip, circ, established, cmd,
                                                                                data)
                circ.send_relay(RelayCommand.ESTABLISH_INTRO, 0,
                                ip.establish_intro(circ.core.layers[-1].kh, self.core.dos_defense))
                await asyncio.wait_for(established, STEP_TIMEOUT)
            except (OnionError, TimeoutError) as exc:
                log.info("introduction point failed", address=self.address, intro=relay.nickname,
                         error=str(exc))
                self.core.remove_intro_point(ip)
                if circ is not None:
                    circ.close()
                await asyncio.sleep(1)
                return
            if self.closed:
                circ.close()
                return
            ip.established = True
            circ.hs_state = "HSSI_ESTABLISHED"  # type: ignore[attr-defined]  (tor's HS_STATE)
            self._intro_circs[ip] = circ
            log.info("introduction point established", address=self.address, intro=relay.nickname)
        finally:
            self._launching -= 1
            self._wake.set()

    def _intro_message(self, ip: ServiceIntroPoint, circ: ClientCircuit, established: asyncio.Future,
                       cmd: int, data: bytes) -> None:
        if cmd == RelayCommand.INTRO_ESTABLISHED:
            if not established.done():
                established.set_result(None)
        elif cmd == RelayCommand.INTRODUCE2:
            try:
                intro = self.core.introduce2(ip, data, time.monotonic())
            except HsIntroduceError as exc:
                log.info("INTRODUCE2 dropped", address=self.address, reason=exc.reason, error=str(exc))
                return
            self._spawn(self._rendezvous(intro))
        else:
            log.info("unexpected message on an introduction circuit", address=self.address,
                     relay_cmd=RelayCommand(cmd).name if cmd in RelayCommand._value2member_map_ else cmd)

    # -- rendezvous and streams ------------------------------------------------------------------

    def _rend_relay(self, intro: Introduction) -> RelayInfo:
        host, port, rsa_id, ed_id = intro.rend_relay_fields()
        for r in self._view().routers:
            if r.info.rsa_id == rsa_id:
                return r.info
        # not in our consensus: extend to it as the client described it (tor does the same)
        return RelayInfo("rendezvous", host, port, rsa_id, ed_id, intro.rend_onion_key)

    async def _rendezvous(self, intro: Introduction) -> None:
        """Meet the client: a circuit to its rendezvous point, RENDEZVOUS1, the end-to-end
        layer. A circuit that cannot be built is tried once more on another path within 30
        seconds (tor's MAX_REND_FAILURES / MAX_REND_TIMEOUT)."""
        started = time.monotonic()
        for attempt in range(1 + MAX_REND_RETRIES):
            circ = None
            try:
                circ = await self._circuit(self._rend_relay(intro), "HS_SERVICE_REND")
                circ.send_relay(RelayCommand.RENDEZVOUS1, 0, intro.rendezvous1)
                circ.add_virtual_hop(intro.key_material)
                circ.accept_streams(lambda sid, begin, c=circ: self._on_begin(c, sid, begin))
                circ.hs_state = "HSSR_JOINED"  # type: ignore[attr-defined]
                break
            except (OnionError, TimeoutError) as exc:
                if circ is not None:
                    circ.close()
                again = attempt < MAX_REND_RETRIES and time.monotonic() - started < MAX_REND_TIMEOUT
                log.info("rendezvous failed", address=self.address, error=str(exc), retrying=again)
                if not again:
                    self._bump("rendezvous", "failed")
                    return
        if self.closed:
            circ.close()
            return
        self._rend_circs.add(circ)
        self._bump("rendezvous", "success")
        log.info("rendezvous circuit joined", address=self.address, rp=circ.path[-1].nickname)

    def _on_begin(self, circ: ClientCircuit, sid: int, begin: Begin) -> None:
        mapping = self.ports.get(begin.port)
        if mapping is None:
            log.info("stream to an unknown virtual port refused", address=self.address, port=begin.port)
            self._bump("streams", "refused")
            circ.stream_refused(sid, EndReason.DONE)
            if not self.allow_unknown_ports:
                circ.close()
            return
        served = sum(1 for s in circ.core.streams if s != sid)
        if self.max_streams and served >= self.max_streams:
            log.warning("maximum streams per rendezvous circuit reached", address=self.address,
                        max_streams=self.max_streams)
            self._bump("streams", "refused")
            circ.stream_refused(sid, EndReason.DONE)
            if self.max_streams_close_circuit:
                circ.close()
            return
        self._spawn(self._serve(circ, sid, mapping))

    async def _serve(self, circ: ClientCircuit, sid: int, mapping: PortMapping) -> None:
        try:
            local_r, local_w = await asyncio.wait_for(asyncio.open_connection(mapping.host, mapping.port),
                                                      STEP_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.info("onion service target unreachable", address=self.address, target=f"{mapping.host}:"
                     f"{mapping.port}", error=str(exc))
            self._bump("streams", "refused")
            circ.stream_refused(sid, EndReason.CONNECTREFUSED)
            return
        try:
            reader, writer = circ.stream_accepted(sid)
        except StreamError:
            local_w.close()
            return
        self._bump("streams", "accepted")
        try:
            await splice((local_r, local_w), (reader, writer))
        finally:
            local_w.close()


def _param(params: Any, name: str, default: int, lo: int, hi: int) -> int:
    value = params.get(name, default) if hasattr(params, "get") else default
    return value if isinstance(value, int) and lo <= value <= hi else default
