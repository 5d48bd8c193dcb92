"""Getting, checking and keeping the consensus; a relay's directory duties (specs/directory.md).

Theory of operation
-------------------
Clients and relays hold the newest consensus they could verify (:func:`verify_consensus`:
strict parse, valid signatures from more than half of the configured authorities,
``now`` inside the validity interval give or take ``skew``) and keep it in
``DATA_DIR/cached-consensus``, written atomically. A document that fails any check is
dropped with a ``consensus rejected`` warning naming the source and the reason, and the
consensus already held stays in use; a verified but not newer one (an old or replayed
consensus) is ignored.

:class:`ClientDirectory` bootstraps from its cache when that is still valid. Otherwise,
and on every :meth:`~ClientDirectory.refresh`, it asks directory caches first — relays
of the consensus it holds that have the V2Dir flag (the client's directory guards, or,
without guards, drawn as tor does for the directory position: bandwidth times the
consensus ``Wb*`` weights), over a one-hop circuit (kept and reused for
``DIR_CIRCUIT_DIRTINESS``, as tor reuses its directory circuits) and a BEGIN_DIR stream — and the
authorities' DirPorts (HTTP) after them, or first when it has
no consensus. The first verified document at least as new as the one held ends the
search (an older one only means that source is behind). So clients that hold a valid
consensus keep working while authorities are away. :meth:`~ClientDirectory.start` runs a refresh loop: a fetch at a random point of the
first half of the interval after fresh-until, retries with backoff.

:class:`RelayDirectory` is what a relay with configured authorities does: test that its
ORPort is reachable (:class:`~onionp2p.dir.selftest.ReachabilityTest`); upload its signed
descriptor to every authority once that test succeeded (at once with ``assume_reachable``,
as tor's AssumeReachable), then every ``publish_interval``, and after key rotation (uploads
that fail are retried with backoff); fetch the consensus from the
authorities soon after each fresh-until; and serve the cached consensus (and its own
descriptor) on a 127.0.0.1 HTTP server that the relay's BEGIN_DIR streams reach.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from onionp2p import __version__
from onionp2p.client.pathsel import weighted_order
from onionp2p.dir.selftest import ReachabilityTest
from onionp2p.dir.server import DirRequestError, DirServer, HttpRequest, HttpResponse, fetch, http_request
from onionp2p.dir.tordir import TorNetworkView
from onionp2p.errors import OnionError, ProtocolError
from onionp2p.log import get_logger
from onionp2p.proto.directory import (
    CLOCK_SKEW,
    MAX_CONSENSUS_SIZE,
    ConsensusError,
    DirAuthority,
    NetworkStatus,
    RouterStatus,
    ServerDescriptor,
    format_time,
    parse_authorities,
    verify_consensus,
)

__all__ = [
    "CONSENSUS_PATH",
    "ClientDirectory",
    "DirectoryUnavailable",
    "RelayDirectory",
    "atomic_write",
]

_RNG = random.SystemRandom()
log = get_logger("onionp2p.dirclient")

#: largest POST body the relay's directory cache reads (tor's HSV3MaxDescriptorSize default)
HS_DESC_MAX_BODY = 50000

CONSENSUS_PATH = "/tor/status-vote/current/consensus"
#: seconds a one-hop directory circuit is reused for after it was built (tor's
#: MaxCircuitDirtiness, which also bounds the reuse of tor's one-hop directory circuits)
DIR_CIRCUIT_DIRTINESS = 600.0
CACHE_FILE = "cached-consensus"


class DirectoryUnavailable(OnionError):
    """No usable consensus: none cached and none could be fetched and verified."""


def atomic_write(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _ConsensusHolder:
    """The newest verified consensus, its cache file, and fetching it from the authorities."""

    def __init__(self, data_dir: Path | str, authorities: Iterable[str | DirAuthority], *,
                 now: Callable[[], float] = time.time, skew: float = CLOCK_SKEW, timeout: float = 30.0,
                 name: str = "directory"):
        self.data_dir = Path(data_dir)
        self.authorities = parse_authorities(authorities)
        self.now = now
        self.skew = skew
        self.timeout = timeout
        self._consensus: NetworkStatus | None = None
        self._statuses_of: NetworkStatus | None = None
        self._statuses: list[RouterStatus] = []
        self._tasks: set[asyncio.Task] = set()
        self._log = log.bind(node=name)
        #: the node's bootstrap progress (onionp2p.bootstrap.Bootstrap), told about downloads
        self.bootstrap_progress = None

    def _progress(self, tag: str) -> None:
        if self.bootstrap_progress is not None:
            self.bootstrap_progress.report(tag)

    @property
    def consensus(self) -> NetworkStatus | None:
        """The newest verified consensus (None before bootstrap or once it has expired)."""
        doc = self._consensus
        if doc is not None and doc.valid_until < self.now() - self.skew:
            return None
        return doc

    def params(self) -> dict[str, int]:
        """The current consensus's network parameters ({} if there is none)."""
        doc = self.consensus
        return dict(doc.params) if doc is not None else {}

    def bw_weights(self) -> dict[str, int]:
        """The current consensus's ``bandwidth-weights`` ({} if there is none, or no line)."""
        doc = self.consensus
        return dict(doc.bw_weights) if doc is not None else {}

    def view(self) -> TorNetworkView | None:
        """The current consensus as the onion-service code reads a network (the same shape as
        a tor network's view): relays, parameters, validity times and the shared random values
        (``srv_current`` / ``srv_previous``; None when the consensus has none, and the disaster
        SRV is used). None if there is no consensus."""
        doc = self.consensus
        if doc is None:
            return None
        return TorNetworkView(self.routers(), dict(doc.params), dict(doc.bw_weights), doc.valid_after,
                              doc.fresh_until, doc.valid_until, doc.srv_current, doc.srv_previous)

    def routers(self) -> list[RouterStatus]:
        """The relays of the current consensus ([] if there is none).

        The same list object until the consensus changes (callers must not mutate it), so
        that per-request users such as the circuit manager can cache what they derive.
        """
        doc = self.consensus
        if doc is None:
            return []
        if doc is not self._statuses_of:
            self._statuses = doc.router_statuses()
            self._statuses_of = doc
        return self._statuses

    @property
    def cache_path(self) -> Path:
        return self.data_dir / CACHE_FILE

    def load_cache(self) -> NetworkStatus | None:
        """Adopt the cached consensus if it still verifies."""
        try:
            data = self.cache_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._log.warning("cannot read cached consensus", error=str(exc))
            return None
        return self.accept(data, "cache", save=False)

    def accept(self, data: bytes, source: str, *, save: bool = True) -> NetworkStatus | None:
        """Verify ``data``; adopt and save it if newer. Logs and returns None if rejected."""
        try:
            doc = verify_consensus(data, self.authorities, self.now(), skew=self.skew)
        except ConsensusError as exc:
            self._log.warning("consensus rejected", source=source, reason=str(exc))
            return None
        cur = self._consensus
        if cur is not None and doc.valid_after <= cur.valid_after:
            if doc.valid_after < cur.valid_after:
                self._log.info("ignoring an older consensus", source=source,
                               valid_after=format_time(doc.valid_after))
            return doc
        self._consensus = doc
        if save:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(self.cache_path, doc.text.encode())
        self._log.info("new consensus", source=source, relays=len(doc.routers),
                       signatures=len(doc.signatures), valid_after=format_time(doc.valid_after),
                       valid_until=format_time(doc.valid_until))
        return doc

    def _authority_sources(self) -> list[tuple[str, Callable]]:
        auths = list(self.authorities)
        random.shuffle(auths)
        return [(f"authority {a.nickname}", lambda a=a: self._fetch_authority(a)) for a in auths]

    async def _fetch_authority(self, auth: DirAuthority) -> bytes:
        self._progress("requesting_status")
        return await fetch(auth.host, auth.dir_port, CONSENSUS_PATH, max_size=MAX_CONSENSUS_SIZE,
                           timeout=self.timeout)

    async def _fetch_from(self, sources: Sequence[tuple[str, Callable]]) -> NetworkStatus:
        errors = []
        for source, get in sources:
            try:
                data = await get()
            except (OnionError, OSError, TimeoutError) as exc:
                self._log.info("consensus fetch failed", source=source, error=str(exc))
                errors.append(f"{source}: {exc}")
                continue
            self._progress("loading_status")
            held = self._consensus
            doc = self.accept(data, source)
            if doc is not None and (held is None or doc.valid_after >= held.valid_after):
                self._progress("enough_dirinfo")
                return doc
            errors.append(f"{source}: {'rejected' if doc is None else 'older than ours'}")
        raise DirectoryUnavailable("no consensus could be fetched and verified ("
                                   + ("; ".join(errors[:6]) or "no sources") + ")")

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _next_fetch(self, spread: tuple[float, float]) -> float:
        """When to fetch next: a random point of ``spread`` (fractions of an interval) after fresh-until."""
        doc = self.consensus
        if doc is None:
            return self.now()
        interval = doc.fresh_until - doc.valid_after
        return doc.fresh_until + random.uniform(*spread) * interval

    async def _refresh_loop(self, refresh: Callable, spread: tuple[float, float]) -> None:
        backoff = 1.0
        while True:
            await asyncio.sleep(max(0.0, self._next_fetch(spread) - self.now()))
            before = self.consensus
            try:
                await refresh()
            except (OnionError, OSError) as exc:
                # every source failed (one failing while another answers is only info, above):
                # an operator must see it, as tor warns when it cannot fetch a consensus
                self._log.warning("consensus refresh failed", error=str(exc))
            after = self.consensus
            if after is None or after is before and self.now() >= after.fresh_until:
                await asyncio.sleep(backoff)
                # retry sooner while we have nothing, and at least once per interval
                cap = 10.0 if after is None else min(60.0, float(after.fresh_until - after.valid_after))
                backoff = min(backoff * 2, cap)
            else:
                backoff = 1.0


class ClientDirectory(_ConsensusHolder):
    """A client's view of the network: ``await bootstrap()``, then :meth:`routers`."""

    def __init__(self, data_dir: Path | str, authorities: Iterable[str | DirAuthority], client, *,
                 now: Callable[[], float] = time.time, skew: float = CLOCK_SKEW, timeout: float = 30.0,
                 max_relay_tries: int = 3,
                 dir_guards: Callable[[list[RouterStatus]], list[RouterStatus]] | None = None):
        super().__init__(data_dir, authorities, now=now, skew=skew, timeout=timeout, name="client")
        self.client = client
        self.max_relay_tries = max_relay_tries
        #: the directory guards for a consensus (the client's usable primary guards, as in
        #: tor's guard-spec): refreshes go to them only, so that no other relay learns the
        #: client's address. None: any V2Dir relay (relays' own use, tests).
        self.dir_guards = dir_guards
        #: told ``fn(fingerprint, ok)`` after each fetch from a directory guard, so that the
        #: guard selection learns reachability from directory fetches too (guard-spec)
        self.dir_guard_result: Callable[[str, bool], None] | None = None
        #: one-hop directory circuits kept for reuse: fingerprint -> (circuit, its expiry timer)
        self._dir_circs: dict[str, tuple[Any, asyncio.TimerHandle]] = {}
        self._dir_busy: dict[Any, int] = {}  # circuit -> fetches using it now

    async def bootstrap(self) -> NetworkStatus:
        """Use the cached consensus if it is still fresh; otherwise fetch one.

        A cached consensus that is no longer fresh but still valid is kept if no newer one
        can be fetched. Raises DirectoryUnavailable if there is nothing usable.
        """
        if self._consensus is None:
            self.load_cache()
        doc = self.consensus
        if doc is not None and self.now() < doc.fresh_until:
            return doc
        try:
            return await self.refresh()
        except DirectoryUnavailable:
            if self.consensus is not None:
                self._log.info("keeping the cached consensus", valid_until=format_time(self.consensus.valid_until))
                return self.consensus
            raise

    async def refresh(self) -> NetworkStatus:
        """Fetch a consensus: from directory caches (relays) first, then from the authorities."""
        relays = self._relay_sources()
        sources = relays + self._authority_sources() if relays else self._authority_sources()
        await self._fetch_from(sources)
        doc = self.consensus
        if doc is None:  # pragma: no cover - _fetch_from returns only verified documents
            raise DirectoryUnavailable("no valid consensus")
        return doc

    def _relay_sources(self) -> list[tuple[str, Callable]]:
        routers = self.routers()
        if self.dir_guards is not None:
            caches = [r for r in self.dir_guards(routers) if "V2Dir" in r.flags]
        else:
            # tor's router_pick_directory_server: weighted for the directory position (Wb*)
            caches = weighted_order([r for r in routers if "V2Dir" in r.flags], "dir", _RNG,
                                    self.bw_weights(), limit=self.max_relay_tries)
        fetch = self.fetch_via_relay if self.dir_guards is None else self._fetch_via_dir_guard
        return [(f"relay {r.nickname} {r.fingerprint}", lambda r=r: fetch(r))
                for r in caches[: self.max_relay_tries]]

    async def _fetch_via_dir_guard(self, relay: RouterStatus) -> bytes:
        """:meth:`fetch_via_relay`, reporting the outcome to :attr:`dir_guard_result`."""
        try:
            data = await self.fetch_via_relay(relay)
        except (OnionError, OSError, TimeoutError):
            if self.dir_guard_result is not None:
                self.dir_guard_result(relay.fingerprint, False)
            raise
        if self.dir_guard_result is not None:
            self.dir_guard_result(relay.fingerprint, True)
        return data

    async def fetch_via_relay(self, relay: RouterStatus, path: str = CONSENSUS_PATH) -> bytes:
        """GET ``path`` from a relay's directory cache over a one-hop circuit (BEGIN_DIR).

        As tor does, the one-hop circuit to a relay is reused by later fetches for
        ``DIR_CIRCUIT_DIRTINESS`` seconds from when it was built (tor's MaxCircuitDirtiness),
        then closed once no fetch uses it; a fetch that fails without an HTTP answer (the
        circuit or the stream broke, a timeout) closes it."""
        fp = relay.fingerprint
        circ = self._reusable_dir_circuit(fp)
        if circ is None:
            circ = await self.client.build_circuit([relay.info], timeout=self.timeout)
            old = self._dir_circs.pop(fp, None)
            if old is not None:  # another fetch built one meanwhile: this one replaces it
                old[1].cancel()
                self._close_dir_circuit(old[0])
            timer = asyncio.get_running_loop().call_later(DIR_CIRCUIT_DIRTINESS, self._expire_dir_circuit,
                                                          fp, circ)
            self._dir_circs[fp] = (circ, timer)
        self._dir_busy[circ] = self._dir_busy.get(circ, 0) + 1
        ok = False
        try:
            reader, writer = await circ.open_dir_stream(timeout=self.timeout)
            if path == CONSENSUS_PATH:
                self._progress("requesting_status")
            try:
                body = await http_request(reader, writer, "GET", path, max_size=MAX_CONSENSUS_SIZE,
                                          timeout=self.timeout)
            except DirRequestError as exc:
                ok = exc.status is not None  # the cache answered (404 ...): the circuit is fine
                raise
            ok = True
            return body
        finally:
            left = self._dir_busy.pop(circ) - 1
            if left:
                self._dir_busy[circ] = left
            kept = self._dir_circs.get(fp)
            if kept is not None and kept[0] is circ:
                if not ok:  # a failure: the next fetch builds anew
                    self._dir_circs.pop(fp)[1].cancel()
                    self._close_dir_circuit(circ)
            else:
                self._close_dir_circuit(circ)  # replaced or expired while in use

    def _reusable_dir_circuit(self, fp: str) -> Any:
        kept = self._dir_circs.get(fp)
        if kept is None:
            return None
        if kept[0].state == "built":
            return kept[0]
        self._dir_circs.pop(fp)[1].cancel()
        return None

    def _expire_dir_circuit(self, fp: str, circ: Any) -> None:
        kept = self._dir_circs.get(fp)
        if kept is not None and kept[0] is circ:
            del self._dir_circs[fp]
        self._close_dir_circuit(circ)

    def _close_dir_circuit(self, circ: Any) -> None:
        """Close a directory circuit that is no longer kept, unless a fetch still uses it
        (that fetch closes it when it ends)."""
        if circ not in self._dir_busy:
            circ.close()

    async def start(self) -> None:
        """Keep the consensus fresh in the background (after :meth:`bootstrap`)."""
        self._spawn(self._refresh_loop(self.refresh, (0.0, 0.5)))

    async def stop(self) -> None:
        await self._cancel_tasks()
        kept, self._dir_circs = self._dir_circs, {}
        for circ, timer in kept.values():
            timer.cancel()
            circ.close()


class RelayDirectory(_ConsensusHolder):
    """A relay's directory duties; the relay calls :meth:`start`, :meth:`stop`, :meth:`keys_changed`."""

    def __init__(self, data_dir: Path | str, authorities: Iterable[str | DirAuthority], *,
                 bandwidth: tuple[int, int, int] = (1 << 30, 1 << 30, 0), family: Sequence[str] = (),
                 contact: str | None = None, publish_interval: float = 18 * 3600.0,
                 now: Callable[[], float] = time.time, skew: float = CLOCK_SKEW, timeout: float = 30.0):
        super().__init__(data_dir, authorities, now=now, skew=skew, timeout=timeout, name="relay")
        self.bandwidth = bandwidth
        self.family = tuple(family)
        self.contact = contact
        self.publish_interval = publish_interval
        self.relay = None
        # POSTs are onion-service descriptors (HSDir), at most tor's 50000 bytes
        self.server = DirServer(self._handle, "127.0.0.1", 0, max_body=HS_DESC_MAX_BODY,
                                name="relay dir cache", kind="directory cache port")
        self.descriptor: ServerDescriptor | None = None
        self.uploaded: dict[bytes, str] = {}  # authority identity -> digest of the last accepted upload
        self._dirty: asyncio.Event | None = None

    async def start(self, relay) -> None:
        self.relay = relay
        self._log = self._log.bind(nickname=relay.nickname)
        self._dirty = asyncio.Event()
        self._dirty.set()
        self._consensus_tried = asyncio.Event()
        self._reachable = asyncio.Event()
        if relay.orport_reachable:  # a CREATE2 came through our address before we were started
            self._reachable.set()
        relay.reachability.add(self._on_reachability)
        self.bootstrap_progress = relay.bootstrap_progress
        if self.load_cache() is not None:
            self._progress("enough_dirinfo")
        await self.server.start()
        relay.exit.dir_port = self.server.port
        self.selftest = ReachabilityTest(relay, self.routers, self._consensus_tried)
        self._spawn(self._publish_loop())
        self._spawn(self._refresh_loop(self.refresh, (0.0, 0.1)))
        self._spawn(self.selftest.run())

    async def stop(self) -> None:
        await self._cancel_tasks()
        if self.relay is not None:
            self.relay.exit.dir_port = None
            self.relay.reachability.remove(self._on_reachability)
        await self.server.stop()

    def _on_reachability(self, action: str, _severity: str, _where: str) -> None:
        if action == "REACHABILITY_SUCCEEDED":
            self._reachable.set()

    def keys_changed(self) -> None:
        """Republish soon (the relay rotated its onion key or certificates)."""
        if self._dirty is not None:
            self._dirty.set()

    async def refresh(self) -> NetworkStatus | None:
        try:
            return await self._fetch_from(self._authority_sources())
        finally:
            self._consensus_tried.set()  # the self-test may start, with or without other relays

    async def _handle(self, req: HttpRequest) -> HttpResponse:
        if req.method == "GET" and req.path == CONSENSUS_PATH and self.consensus is not None:
            return HttpResponse(200, self.consensus.text.encode())
        if req.method == "GET" and req.path == "/tor/server/authority" and self.descriptor is not None:
            return HttpResponse(200, self.descriptor.text.encode())
        hsdir = getattr(self.relay, "hsdir", None)  # the relay's HSDir role (relay.hsdir)
        if hsdir is not None and req.path.startswith("/tor/hs/"):
            answer = hsdir.http(req.method, req.path, req.body, self.params())
            if answer is not None:
                return HttpResponse(answer[0], answer[1])
        if req.method == "POST":
            return HttpResponse(400, b"nothing to post there\n")
        return HttpResponse(404, b"not found\n")

    def make_descriptor(self) -> ServerDescriptor:
        relay = self.relay
        last = self.descriptor.published if self.descriptor is not None else 0
        return ServerDescriptor.create(
            relay.keys, nickname=relay.nickname, address=relay.address, or_port=relay.advertised_port,
            exit_policy=relay.exit_policy, published=max(int(self.now()), last + 1), bandwidth=self.bandwidth,
            platform=f"onionp2p {__version__}", family=self.family, contact=self.contact, dir_server=True,
            protocols=relay.protocols, hs_dir=True)

    async def _upload(self, auth: DirAuthority, desc: ServerDescriptor) -> bool:
        try:
            await fetch(auth.host, auth.dir_port, "/tor/", desc.text.encode(), max_size=4096,
                        timeout=self.timeout)
        except OnionError as exc:
            # at warning, as tor's: a relay whose descriptor is not uploaded is not in the consensus
            self._log.warning("descriptor upload failed", authority=auth.nickname, error=str(exc))
            return False
        self.uploaded[auth.ed_id] = desc.digest
        return True

    async def _publish_loop(self) -> None:
        assert self._dirty is not None
        if not self.relay.config.assume_reachable:
            # as tor: no descriptor before the self-test found our ORPort reachable
            await self._reachable.wait()
        backoff = 1.0
        next_periodic = 0.0
        while True:
            if self._dirty.is_set() or self.now() >= next_periodic:
                self._dirty.clear()
                try:
                    self.descriptor = self.make_descriptor()
                except ProtocolError as exc:
                    self._log.error("cannot make a descriptor; not publishing", error=str(exc))
                    return
                next_periodic = self.now() + self.publish_interval
                backoff = 1.0
            desc = self.descriptor
            todo = [a for a in self.authorities if self.uploaded.get(a.ed_id) != desc.digest]
            if todo:
                await asyncio.gather(*(self._upload(a, desc) for a in todo))
                if all(self.uploaded.get(a.ed_id) == desc.digest for a in self.authorities):
                    self._log.info("descriptor published", authorities=len(self.authorities))
            pending = any(self.uploaded.get(a.ed_id) != desc.digest for a in self.authorities)
            wait = backoff if pending else max(0.0, next_periodic - self.now())
            if pending:
                backoff = min(backoff * 2, 60.0)
            try:
                await asyncio.wait_for(self._dirty.wait(), wait)
            except TimeoutError:
                pass
