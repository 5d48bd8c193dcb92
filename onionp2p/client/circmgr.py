"""Circuit management: which circuit a stream uses, and keeping circuits ready (specs/pathsel.md).

Theory of operation
-------------------
:class:`CircuitManager` sits between streams (SOCKS, the library API) and
:class:`~onionp2p.client.client.OnionClient`. It owns the circuits it builds and answers
"give me a circuit for port P with isolation key K".

Choosing a circuit (:meth:`CircuitManager.get_circuit`)
  A built circuit is reused when (1) it still takes new streams: it is not *dirty* —
  its first stream was attached no more than ``dirtiness`` seconds ago (tor's
  MaxCircuitDirtiness, default 10 min) — and it was not retired by :meth:`new_identity`
  or after a failure; (2) its exit's policy summary allows P; (3) its isolation key
  equals K, or it has none yet, in which case K is assigned to it for good. Two
  different keys therefore never share a circuit (tor's IsolateSOCKSAuth: the SOCKS
  front end passes e.g. ``(username, password)`` as K). Circuits already assigned to K
  are preferred over clean ones, so clean circuits stay available for other keys. If no
  circuit fits, a build already under way that fits is joined; otherwise a new one is
  launched. Failed builds are retried on other paths up to ``max_build_attempts``; for a
  stream (:meth:`open_stream`, :meth:`resolve`) builds that only passed the build timeout
  do not count, as tor keeps launching circuits for a waiting stream until its deadline.

Building
  The path comes from :func:`~onionp2p.client.pathsel.choose_path` with the guard from the
  :class:`~onionp2p.client.guards.GuardSet`, weighted by the consensus ``bandwidth-weights``
  the guard set samples with (``GuardSet.bw_weights``). The channel to the guard is opened first: if
  that fails the guard is marked down (the next pick returns the next primary guard);
  if it succeeds it is marked up. A build that fails after that (DESTROY, TRUNCATED or
  the build timeout) puts its middle and exit on a short "recently failed" list
  (``FAILED_RELAY_MEMORY``, 60 s; an unreachable guard goes there too) that later path
  choices avoid; if avoiding them leaves no path, only the relays that failed as middles
  or were unreachable are avoided, then none. A build that times out without any
  answer from the guard (no CREATED2, no DESTROY) blames the guard instead: as in tor,
  the guard is marked down and its channel takes no new circuits (the link is probably
  half-open; the channel closes once its circuits are gone).

Build timeout (proposal 151; :mod:`onionp2p.client.cbt`)
  With ``learn_circuit_build_timeout`` (tor's LearnCircuitBuildTimeout, on by default; the
  consensus's ``cbtdisabled=1`` turns it off) the timeout for channel plus three hops is
  learned: ``circuit_build_timeout`` (tor's CircuitBuildTimeout) is only the initial value,
  used until ``cbtmincircs`` build times are known. Every build that completes records its
  time. A circuit that passes the timeout with its first hop done is given up for use but
  goes on building until ``close_ms`` to measure it (tor's measurement circuits): if it
  completes its time is recorded, else it is recorded as abandoned. Timeouts are not
  counted while no bytes arrive from the network (:attr:`OnionClient.last_read`), and
  too many recent timeouts reset the estimate. The history is saved through
  :attr:`CircuitManager.save_build_times` (the node keeps it in the data dir) every 10
  builds and on stop; every new timeout is told to :attr:`CircuitManager.buildtimeout_events`
  (tor's BUILDTIMEOUT_SET). Without learning the timeout is ``circuit_build_timeout``.

Path bias (:mod:`onionp2p.client.pathbias`)
  The manager feeds :class:`~onionp2p.client.pathbias.PathBias` its circuits' events: the
  first hop done (an attempt through the guard), built, a stream attached (use attempt), a
  stream answered by the exit (use success), a build timeout, and how the circuit ended
  (closed by us, or by the network). A guard disabled for path bias makes the circuit
  through it close at once; the guard set stops picking it. The counts live in the guard
  state and are saved by the maintenance task when they changed.

Preemptive circuits
  After :meth:`start`, a maintenance task keeps ``preemptive`` clean circuits (built or
  under way, no isolation key, never used) whose exits allow the ``preemptive_ports``:
  each new one targets the port covered by the fewest clean circuits. Failures back off
  exponentially (1 s doubling to 60 s). The same task closes circuits that no longer
  take new streams once their last stream has ended (and none was attached in the last
  ``ATTACH_GRACE`` seconds) and forgets closed ones. A circuit through a relay that
  the current consensus no longer lists as Running is retired (its open streams go on;
  like tor's ``circuit_is_acceptable``), so a relay that disappeared costs new streams
  at most one ``stream_timeout`` on circuits built before the consensus dropped it.

Streams (:meth:`open_stream`)
  BEGIN is sent on the chosen circuit; if END arrives before CONNECTED, the reaction
  follows C tor's ``connection_ap_process_end_not_open`` (see :func:`end_reason_action`):
  EXITPOLICY: try again through another exit; HIBERNATING, RESOURCELIMIT: retire the
  circuit and avoid that exit; RESOLVEFAILED, MISC, NOROUTE: retire the circuit and try
  again; TORPROTOCOL, DESTROY (the exit says the circuit is bad): close the circuit and
  fail; anything else (CONNECTREFUSED, ...): fail at once. A local connect timeout
  (``stream_timeout``, like tor's 10-15 s stream cutoff) retires the circuit and tries
  again (an exit's END TIMEOUT gets the same reaction; for path bias the two are not
  told apart). A circuit that dies while the stream waits is
  a circuit failure: try again. At most ``max_stream_attempts`` (3, tor's
  MAX_RESOLVE_FAILURES) attempts within ``timeout``, then the last StreamError is raised
  (a CircuitError only when no stream error happened); our own connect timeouts
  (:class:`~onionp2p.client.client.ConnectTimeoutError`) are not counted: like tor, which
  retries a stream on new circuits until SocksTimeout, the stream tries again until
  ``timeout``.

Onion-service circuits (:meth:`CircuitManager.build_internal`)
  Circuits that end at a relay chosen for an onion service (an HSDir, an introduction or a
  rendezvous point; :func:`~onionp2p.client.pathsel.choose_internal_path`) are built the
  same way: the guard from the guard set with guard-spec's states, the recently-failed
  list, the build timeout (scaled by the path length for four hops; as in tor only
  three-hop circuits are measured for it), retries on other paths. They carry tor's
  control-spec purpose (HS_CLIENT_REND ...), never take ordinary streams, are not counted
  for path bias (tor's ``pathbias_should_count``: the other end can fail them at will), and
  are closed by whoever asked for them, not by maintenance.

Bounds
  At most ``max_circuits_per_isolation`` open or pending circuits carry one isolation
  key (:class:`CircuitLimitError` beyond it); retired circuits stop counting once their
  streams end and they are closed. Clean circuits never exceed ``preemptive``
  (a circuit launched on demand carries its key from the start).

The clock (``clock``, monotonic seconds: dirtiness, failure memory) and the random
source are injected; asyncio timeouts use the event loop's clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from onionp2p.client.cbt import CBT_SAVE_STATE_EVERY, CBTParams, CircuitBuildTimes
from onionp2p.client.client import CircuitEvent, ClientCircuit, ConnectTimeoutError, OnionClient
from onionp2p.client.guards import WAITING, GuardCircuit, GuardSet, NoGuardError
from onionp2p.client.pathbias import PathBias, PBParams
from onionp2p.client.pathsel import (
    NoPathError,
    RandomSource,
    can_exit_to,
    choose_internal_path,
    choose_path,
    compatible,
    internal_path_length,
)
from onionp2p.config import ClientConfig
from onionp2p.errors import CircuitError, OnionError, StreamError
from onionp2p.listeners import Listeners
from onionp2p.log import get_logger
from onionp2p.proto.directory import RelayInfo, RouterStatus
from onionp2p.proto.relaycell import EndReason, Resolved

__all__ = ["CircuitManager", "CircuitInfo", "CircuitLimitError", "end_reason_action",
           "FAILED_RELAY_MEMORY", "ATTACH_GRACE"]

log = get_logger("onionp2p.circmgr")

FAILED_RELAY_MEMORY = 60.0
ATTACH_GRACE = 30.0
MAINTENANCE_INTERVAL = 5.0
MAX_BACKOFF = 60.0
#: close reasons of circuits we closed ourselves (anything else: the network closed it)
_LOCAL_CLOSE = frozenset({"REQUESTED", "TIMEOUT", "RESOURCELIMIT", None})


class CircuitLimitError(CircuitError):
    """Too many circuits already carry this isolation key."""

    def __init__(self, message: str, reason: str = "RESOURCELIMIT"):
        super().__init__(message, reason)


class BuildTimeoutError(CircuitError):
    """A circuit we launched passed the build timeout (ours, not a relay's DESTROY)."""

    def __init__(self, message: str, reason: str = "TIMEOUT"):
        super().__init__(message, reason)


def end_reason_action(reason: int) -> str:
    """What to do when END(reason) arrives before CONNECTED on a live circuit.

    ``"other-exit"``: retry avoiding this exit (circuit stays usable); ``"retire-exit"``:
    retire the circuit and avoid its exit; ``"retire"``: retire the circuit and retry;
    ``"close"``: close the circuit, do not retry; ``"fail"``: do not retry.
    """
    if reason == EndReason.EXITPOLICY:
        return "other-exit"
    if reason in (EndReason.HIBERNATING, EndReason.RESOURCELIMIT):
        return "retire-exit"
    if reason in (EndReason.RESOLVEFAILED, EndReason.MISC, EndReason.NOROUTE, EndReason.TIMEOUT):
        return "retire"
    if reason in (EndReason.TORPROTOCOL, EndReason.DESTROY):
        return "close"
    return "fail"


#: ``pick(routers, guard, exclude)``: the rest of a path through ``guard`` (CircuitManager._choose)
_PathPicker = Callable[[list[RouterStatus], RouterStatus, set[str]], list[RouterStatus]]
_UNASSIGNED = object()  # an entry's isolation before its first stream
_INTERNAL = object()  # the isolation of an onion-service circuit: never equal to a stream's key
#: tor's HS_STATE of an onion-service circuit while it is being built
_HS_STATE_BUILDING = {"HS_CLIENT_INTRO": "HSCI_CONNECTING", "HS_CLIENT_REND": "HSCR_CONNECTING",
                      "HS_SERVICE_INTRO": "HSSI_CONNECTING", "HS_SERVICE_REND": "HSSR_CONNECTING"}


@dataclass(eq=False)
class _Entry:
    path: tuple[RouterStatus, ...]
    purpose: str
    generation: int
    launched_at: float  # wall clock, for display
    isolation: object = _UNASSIGNED
    circ: ClientCircuit | None = None
    task: asyncio.Task | None = None
    dirty_since: float | None = None  # manager clock: first stream attached
    last_attach: float | None = None
    retired: bool = False
    inflight: int = 0  # open_stream/resolve calls of ours waiting on this circuit
    gc: GuardCircuit | None = None  # the guard-spec state of its guard
    #: set while built but waiting for a better guard; set() when upgraded or given up
    guard_wait: asyncio.Event | None = None
    waiting_circ: ClientCircuit | None = None
    #: an onion-service circuit: its control-spec purpose (HS_CLIENT_REND ...) and onion address
    hs_purpose: str | None = None
    rend_query: str | None = None

    @property
    def internal(self) -> bool:
        return self.hs_purpose is not None

    @property
    def exit(self) -> RouterStatus:
        return self.path[-1]

    @property
    def gone(self) -> bool:
        return self.circ is not None and self.circ.state in ("closed", "failed")


@dataclass(frozen=True)
class CircuitInfo:
    """One managed circuit, for the control port. ``path``: ``$FINGERPRINT~nickname``."""

    id: int | None  # ClientCircuit.id; None while the first hop is being connected
    state: str  # launched, built, closed, failed
    path: tuple[str, ...]
    purpose: str  # "preemptive", "on-demand", or an onion-service purpose (HS_CLIENT_REND ...)
    isolation: object  # the key; None when unassigned (see isolated)
    isolated: bool  # True once a key is assigned
    dirty: bool  # no longer takes new streams
    created_at: float  # wall clock
    streams: int = 0
    rend_query: str | None = None  # an onion-service circuit's address (no ".onion")


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0


class CircuitManager:
    """Chooses, builds, shares and retires client circuits. See the module docstring."""

    def __init__(self, client: OnionClient, routers: Callable[[], Sequence[RouterStatus]], guards: GuardSet,
                 config: ClientConfig | None = None, *, rng: RandomSource | None = None,
                 clock: Callable[[], float] = time.monotonic, cbt: CircuitBuildTimes | None = None):
        cfg = config if config is not None else ClientConfig()
        self.client = client
        self.routers = routers
        self.guards = guards
        self.rng: RandomSource = rng if rng is not None else random.SystemRandom()
        self.clock = clock
        self._entries: list[_Entry] = []
        self._generation = 0
        self._failed: dict[str, tuple[float, str]] = {}  # fingerprint -> (until, position)
        self._backoff = _Backoff()
        self._wake = asyncio.Event()
        self._built = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running_src: object = None
        self._running_fps: frozenset[str] = frozenset()
        #: the learned build timeout (proposal 151)
        self.cbt = cbt if cbt is not None else CircuitBuildTimes(rng=self.rng)
        #: path bias accounting over the guards' records
        self.path_bias = PathBias(guards.path_bias, changed=lambda fp: guards.mark_dirty(),
                                  describe=guards.describe, close_cutoff=lambda: self.cbt.close_ms / 1000)
        #: BUILDTIMEOUT_SET: ``fn(kind, args)`` (kind COMPUTED or RESET; args tor's key=value text)
        self.buildtimeout_events = Listeners("build timeout")
        #: writes the build-time history: ``fn(state_dict)`` (None: not persisted)
        self.save_build_times: Callable[[dict], None] | None = None
        self._params_src: object = None
        self._building: dict[int, _Entry] = {}  # ClientCircuit.id -> entry, until the circuit is gone
        client.events.add(self._circuit_event)
        self.configure(cfg)

    def configure(self, cfg: ClientConfig) -> None:
        """Take the circuit settings of ``cfg`` (at creation, and on a reload: they apply to
        the circuits chosen and built from now on)."""
        if cfg.max_build_attempts < 1 or cfg.max_stream_attempts < 1 or cfg.max_circuits_per_isolation < 1:
            raise ValueError("attempt counts and limits must be at least 1")
        self.config = cfg
        self.preemptive = cfg.preemptive_circuits
        self.preemptive_ports = tuple(cfg.preemptive_ports)
        self.dirtiness = float(cfg.max_circuit_dirtiness)
        self.learn_build_timeout = cfg.learn_circuit_build_timeout
        self.build_timeout = float(cfg.circuit_build_timeout)
        self.max_build_attempts = cfg.max_build_attempts
        self.enforce_distinct_subnets = cfg.enforce_distinct_subnets
        #: tor's ExcludeNodes and StrictNodes (the guard set filters its guards with the same set)
        self.exclude_nodes = cfg.exclude_nodes
        self.strict_nodes = cfg.strict_nodes
        self.guards.core.exclude_nodes = cfg.exclude_nodes
        self.stream_timeout = float(cfg.stream_timeout)
        self.max_stream_attempts = cfg.max_stream_attempts
        self.max_circuits_per_isolation = cfg.max_circuits_per_isolation
        self._wake.set()  # the preemptive circuits may have changed

    @property
    def build_timeout(self) -> float:
        """The configured CircuitBuildTimeout (seconds): the fixed timeout without learning,
        the initial one with it. See :attr:`current_build_timeout`."""
        return self._build_timeout

    @build_timeout.setter
    def build_timeout(self, value: float) -> None:
        self._build_timeout = float(value)
        self.cbt.configure_initial(self._build_timeout * 1000)

    def learning(self) -> bool:
        """Is the build timeout learned (configured on, not disabled by the consensus)?"""
        self._update_params()
        return self.learn_build_timeout and not self.cbt.params.cbtdisabled

    @property
    def current_build_timeout(self) -> float:
        """Seconds a circuit (channel plus three hops) may take now."""
        return self.cbt.timeout_ms / 1000 if self.learning() else self._build_timeout

    def _update_params(self) -> None:
        """Take the ``cbt*`` and ``pb_*`` parameters of a new consensus."""
        params = self.client.consensus_params()
        if params != self._params_src:
            self._params_src = params
            self.cbt.set_params(CBTParams.from_consensus(params))
            self.path_bias.params = PBParams.from_consensus(params)
            for g in self.guards.sampled:  # tor checks the saved counts against pb_dropguards
                pb = self.guards.path_bias(g.fingerprint)
                if pb is not None and not pb.disabled:
                    self.path_bias.check_loaded(g.fingerprint, pb)
                    if pb.disabled:
                        self.guards.mark_dirty()

    def _save_build_times(self) -> None:
        if self.save_build_times is not None:
            try:
                self.save_build_times(self.cbt.to_state())
            except OSError as exc:
                log.warning("cannot save the circuit build times", error=str(exc))

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start keeping preemptive circuits ready (returns at once; see :meth:`ready`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def stop(self) -> None:
        """Stop maintenance, abandon builds under way and close every managed circuit."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        pending = [e.task for e in self._entries if e.task is not None and not e.task.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for e in self._entries:
            if e.circ is not None:
                e.circ.close()
        self._entries.clear()
        if self.cbt.unsaved:
            self._save_build_times()
        self.guards.save_if_dirty()

    async def ready(self, timeout: float) -> None:
        """Wait until at least one circuit is built and takes new streams."""
        try:
            async with asyncio.timeout(timeout):
                while not any(self._takes_streams(e, self.clock()) for e in self._entries):
                    await self._built.wait()
        except TimeoutError:
            raise CircuitError(f"no circuit built within {timeout:g} s", "TIMEOUT") from None

    # -- public API -------------------------------------------------------------------------------

    async def get_circuit(self, port: int | None, isolation: Hashable = None) -> ClientCircuit:
        """A built circuit for a stream to ``port`` (None: any exit) with key ``isolation``."""
        return await self._get_circuit(port, isolation, frozenset())

    async def open_stream(self, host: str, port: int, isolation: Hashable = None, *, timeout: float = 60.0,
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ClientCircuit]:
        """Open a stream to ``host:port``, retrying where tor would. Raises StreamError/CircuitError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        avoid: set[str] = set()
        last: OnionError | None = None
        attempts = 0
        while attempts < self.max_stream_attempts and (last is None or loop.time() < deadline):
            circ = await self._circuit_until(deadline, port, isolation, avoid, last)
            entry = self._entry_of(circ)
            entry.inflight += 1
            attempts += 1
            try:
                reader, writer = await circ.open_stream(
                    host, port, timeout=max(min(self.stream_timeout, deadline - loop.time()), 0.001))
                self.path_bias.use_success(circ.id)
                return reader, writer, circ
            except CircuitError as exc:  # closed between choosing and BEGIN
                last = exc
                self._retire(entry)
            except StreamError as exc:
                last = exc
                if isinstance(exc, ConnectTimeoutError):
                    # our own wait for CONNECTED ran out (a slow path, a loaded machine): as
                    # tor, try another circuit until the stream's deadline without counting
                    # it (tor's connection_ap_expire_beginning has no count but SocksTimeout)
                    attempts -= 1
                if circ.state != "built":
                    continue  # the circuit died under the stream
                # path bias: an END with a real reason shows the exit was reached, untagged
                # (tor's connection_ap_process_end_not_open); TIMEOUT may be our own
                if exc.reason == EndReason.TORPROTOCOL:
                    self.path_bias.use_failed(circ.id)
                elif exc.reason not in (EndReason.INTERNAL, EndReason.TIMEOUT):
                    self.path_bias.use_success(circ.id)
                action = end_reason_action(exc.reason)
                log.info("stream refused", reason=_end_name(exc.reason), action=action, circ=circ.id)
                if action == "close":
                    circ.close()
                    raise
                if action == "fail":
                    raise
                if action in ("other-exit", "retire-exit"):
                    avoid.add(entry.exit.fingerprint)
                if action in ("retire", "retire-exit"):
                    self._retire(entry)
            finally:
                entry.inflight -= 1
        assert last is not None
        raise last

    async def resolve(self, host: str, isolation: Hashable = None, *, timeout: float = 30.0) -> Resolved:
        """RESOLVE ``host`` at an exit of a circuit for ``isolation`` (any exit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: OnionError | None = None
        for _ in range(self.max_stream_attempts):
            circ = await self._circuit_until(deadline, None, isolation, set(), last)
            entry = self._entry_of(circ)
            entry.inflight += 1
            try:
                answer = await circ.resolve(host, timeout=max(min(self.stream_timeout, deadline - loop.time()),
                                                              0.001))
                self.path_bias.use_success(circ.id)
                return answer
            except (CircuitError, StreamError) as exc:  # StreamError: the exit refused it (END)
                last = exc
            except TimeoutError:
                last = StreamError("resolve timed out", EndReason.TIMEOUT)
            finally:
                entry.inflight -= 1
            self._retire(entry)
            if loop.time() >= deadline:
                break
        assert last is not None
        raise last

    async def build_internal(self, last: RelayInfo | RouterStatus | None, purpose: str, *,
                             onion: str | None = None, timeout: float | None = None) -> ClientCircuit:
        """Build an onion-service circuit ending at ``last`` (None: a rendezvous point chosen
        here) for control-spec ``purpose`` (HS_CLIENT_HSDIR, HS_CLIENT_INTRO, HS_CLIENT_REND,
        HS_SERVICE_HSDIR, HS_SERVICE_INTRO, HS_SERVICE_REND).

        The path is :func:`~onionp2p.client.pathsel.choose_internal_path`'s with the guard from
        the guard set (guard-spec states as for every circuit, including waiting for a better
        guard), the build timeout as other circuits (scaled for four hops), failed builds
        retried on other paths up to ``max_build_attempts`` within ``timeout`` seconds (None:
        no overall bound). ``onion``: the service's address, shown as REND_QUERY (without
        ".onion"). The circuit never takes ordinary streams and this manager never closes it
        (its owner does; :meth:`stop` closes every circuit). Its HS_STATE is the
        ``*_CONNECTING`` state until the owner sets ``circ.hs_state``. Raises CircuitError
        (NoPathError when no path exists)."""
        internal_path_length(purpose, last is not None)  # ValueError for an unknown purpose
        query = onion.lower().removesuffix(".onion") if onion else None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def pick(routers: list[RouterStatus], guard: RouterStatus, exclude: set[str]) -> list[RouterStatus]:
            return choose_internal_path(routers, last=last, purpose=purpose, guard=guard, rng=self.rng,
                                        exclude=exclude, bw_weights=self.guards.bw_weights(),
                                        enforce_distinct_subnets=self.enforce_distinct_subnets,
                                        exclude_nodes=self.exclude_nodes, strict_nodes=self.strict_nodes)

        error: CircuitError | None = None
        for _ in range(self.max_build_attempts):
            path, gc = self._choose(None, frozenset(), pick)
            e = _Entry(tuple(path), "internal", self._generation, time.time(), isolation=_INTERNAL, gc=gc,
                       hs_purpose=purpose, rend_query=query)
            self._start_build(e)
            log.debug("onion-service circuit launched", path=[rs.nickname for rs in path], purpose=purpose)
            assert e.task is not None
            try:
                if deadline is None:
                    return await asyncio.shield(e.task)
                async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                    return await asyncio.shield(e.task)
            except CircuitError as exc:
                error = exc
            except TimeoutError:
                e.task.cancel()
                raise CircuitError(f"no {purpose} circuit within {timeout:g} s", "TIMEOUT") from None
            except asyncio.CancelledError:
                e.task.cancel()
                raise
            if deadline is not None and loop.time() >= deadline:
                break
        raise error or CircuitError(f"no {purpose} circuit", "NONE")

    def new_identity(self) -> None:
        """NEWNYM: no existing or pending circuit takes new streams; open streams continue."""
        self._generation += 1
        self._failed.clear()
        self._backoff = _Backoff()
        log.info("new identity: existing circuits retired for new streams")
        self._wake.set()

    def circuits(self) -> list[CircuitInfo]:
        """Introspection of every managed circuit (built, or under way)."""
        now = self.clock()
        out = []
        for e in self._entries:
            c = e.circ
            out.append(CircuitInfo(
                id=c.id if c is not None else None,
                state=(c.state if c is not None
                       else "guard_wait" if e.guard_wait is not None else "launched"),
                path=tuple(f"${rs.fingerprint}~{rs.nickname}" for rs in e.path),
                purpose=e.hs_purpose or e.purpose,
                isolation=None if e.isolation is _UNASSIGNED else e.isolation,
                isolated=e.isolation is not _UNASSIGNED,
                dirty=not self._fresh(e, now),
                created_at=c.created_at if c is not None else e.launched_at,
                streams=len(c.streams) if c is not None else 0,
                rend_query=e.rend_query,
            ))
        return out

    # -- choosing circuits ---------------------------------------------------------------------------

    def _fresh(self, e: _Entry, now: float) -> bool:
        if e.retired or e.generation != self._generation or e.gone:
            return False
        return e.dirty_since is None or now - e.dirty_since <= self.dirtiness

    def _takes_streams(self, e: _Entry, now: float) -> bool:
        return not e.internal and e.circ is not None and e.circ.state == "built" and self._fresh(e, now)

    def _fits(self, e: _Entry, port: int | None, key: object, avoid: frozenset[str]) -> bool:
        return ((e.isolation is _UNASSIGNED or e.isolation == key)
                and e.exit.fingerprint not in avoid and can_exit_to(e.exit, port))

    def _entry_of(self, circ: ClientCircuit) -> _Entry:
        for e in self._entries:
            if e.circ is circ:
                return e
        raise CircuitError("circuit is not managed here", "INTERNAL")

    async def _circuit_until(self, deadline: float, port: int | None, key: object, avoid: set[str],
                             last: OnionError | None) -> ClientCircuit:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                return await self._get_circuit(port, key, frozenset(avoid), patient=True)
        except TimeoutError:
            raise (last or CircuitError("timed out waiting for a circuit", "TIMEOUT")) from None
        except CircuitError:
            if isinstance(last, StreamError):
                raise last from None  # no circuit for another try: report the exit's answer
            raise

    async def _get_circuit(self, port: int | None, key: object, avoid: frozenset[str], *,
                           patient: bool = False) -> ClientCircuit:
        """A usable circuit for ``key``: one that exists, one under way, or a new build; at most
        ``max_build_attempts`` builds fail. ``patient``: the caller bounds the wait by its own
        deadline, and builds that only passed the build timeout do not count against that
        limit (tor keeps a stream waiting for circuits until SocksTimeout: under load every
        build may overrun a timeout learned on an idle network, until enough time out that
        the estimator resets it)."""
        last: CircuitError | None = None
        failures = 0
        while failures < self.max_build_attempts:
            self._reap()
            now = self.clock()
            usable = [e for e in self._entries
                      if self._takes_streams(e, now) and self._fits(e, port, key, avoid)]
            if usable:
                usable.sort(key=lambda e: (e.isolation is _UNASSIGNED, e.dirty_since is None))
                return self._attach(usable[0], key)
            # a build whose task has ended is not under way, though it is listed until its
            # done-callback runs (later in this turn of the loop): joining it would not wait
            # at all, and this loop would go round without yielding
            pending = [e for e in self._entries
                       if e.circ is None and e.guard_wait is None and e.task is not None
                       and not e.task.done() and self._fresh(e, now) and self._fits(e, port, key, avoid)]
            if pending:
                pending.sort(key=lambda e: e.isolation is _UNASSIGNED)
                entry = pending[0]
            else:
                self._check_limit(key)
                entry = self._launch(port, key, avoid, "on-demand")
            entry.isolation = key  # claim it now so other keys do not join the build
            other = await self._await_build(entry, port, key, avoid)
            if other is not None:
                return self._attach(other, key)
            if entry.guard_wait is not None:
                # built, but held for a better guard: launch another circuit meanwhile (it
                # goes to the primary guards that may work; their failures free this one)
                failures += 1
                continue
            try:
                await asyncio.shield(entry.task)  # type: ignore[arg-type]
            except CircuitError as exc:
                last = exc
                if not (patient and isinstance(exc, BuildTimeoutError)):
                    failures += 1
                continue
            if self._takes_streams(entry, self.clock()):
                return self._attach(entry, key)
            failures += 1  # built, but no longer takes streams
        raise last or CircuitError("no circuit became available", "NONE")

    async def _await_build(self, entry: _Entry, port: int | None, key: object,
                           avoid: frozenset[str]) -> _Entry | None:
        """Wait for ``entry``'s build, or for another fitting circuit to become usable first
        (a build may wait for a better guard for minutes: guard-spec §4.9)."""
        assert entry.task is not None
        while not entry.task.done() and entry.guard_wait is None:
            built = self._built
            waiter = asyncio.get_running_loop().create_task(built.wait())
            try:
                await asyncio.wait({entry.task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if entry.task.done():
                return None
            now = self.clock()
            usable = [e for e in self._entries if e is not entry and self._takes_streams(e, now)
                      and self._fits(e, port, key, avoid)]
            if usable:
                usable.sort(key=lambda e: (e.isolation is _UNASSIGNED, e.dirty_since is None))
                return usable[0]
        return None

    def _notify_built(self) -> None:
        """Wake everybody waiting for a usable circuit."""
        built, self._built = self._built, asyncio.Event()
        built.set()

    def _attach(self, e: _Entry, key: object) -> ClientCircuit:
        now = self.clock()
        e.isolation = key
        if e.dirty_since is None:
            e.dirty_since = now
        e.last_attach = now
        assert e.circ is not None
        e.circ.isolation = key
        self.path_bias.use_attempt(e.circ.id)
        self._wake.set()  # a clean circuit may have been used up
        return e.circ

    def _retire(self, e: _Entry) -> None:
        e.retired = True
        self._wake.set()

    def _check_limit(self, key: object) -> None:
        self._reap()
        n = sum(1 for e in self._entries if e.isolation is not _UNASSIGNED and e.isolation == key)
        if n >= self.max_circuits_per_isolation:
            raise CircuitLimitError(f"{n} circuits already carry this isolation key")

    # -- building ------------------------------------------------------------------------------------

    def _recent_failures(self) -> dict[str, str]:
        now = self.clock()
        self._failed = {fp: v for fp, v in self._failed.items() if v[0] > now}
        return {fp: pos for fp, (_until, pos) in self._failed.items()}

    def _choose(self, port: int | None, avoid: frozenset[str], pick: _PathPicker | None = None,
                ) -> tuple[list[RouterStatus], GuardCircuit]:
        """A path and its guard-spec state: the guard from the guard set, the rest from
        ``pick(routers, guard, exclude)`` (default: :func:`choose_path` for ``port``), avoiding
        recently failed relays where a path exists without them."""
        def exit_path(routers: list[RouterStatus], guard: RouterStatus,
                      exclude: set[str]) -> list[RouterStatus]:
            return choose_path(routers, port=port, guard=guard, rng=self.rng, exclude=exclude,
                               enforce_distinct_subnets=self.enforce_distinct_subnets,
                               exclude_nodes=self.exclude_nodes,
                               bw_weights=self.guards.bw_weights())  # the consensus's weights
        pick = pick or exit_path
        routers = list(self.routers())
        failed = self._recent_failures()
        tiers: list[set[str]] = []
        dead = {fp for fp, pos in failed.items() if pos in ("middle", "unreachable")}
        for tier in (set(failed) | avoid, dead | avoid, set(avoid)):
            if tier not in tiers:
                tiers.append(tier)
        error: NoPathError | None = None
        for exclude in tiers:
            tried: set[str] = set()
            while True:
                try:
                    guard, gc = self.guards.select(routers, exclude=tried)
                except NoGuardError:
                    if not tried:
                        raise  # no guard at all
                    break  # every guard tried with this tier
                if guard.fingerprint in tried:
                    self.guards.release(gc)
                    break
                try:
                    path = pick(routers, guard, exclude)
                except NoPathError as exc:
                    # the guard is restricted for this port (tor: the exit's family); it is
                    # not marked in any way, the next one in guard-spec's order is tried
                    self.guards.release(gc)
                    error = exc
                    tried.add(guard.fingerprint)
                    continue
                # the guards this circuit could not have used: a circuit through one of them
                # cannot be "better" than this one (guard-spec §4.9 restrictions)
                gc.restriction = frozenset(
                    fp for fp in self.guards.sampled_fingerprints()
                    if fp in tried or any(fp == r.fingerprint for r in path[1:])
                    or not all(self._compatible_fp(fp, r, routers) for r in path[1:]))
                return path, gc
        raise error or NoPathError("no path")

    def _compatible_fp(self, fp: str, other: RouterStatus, routers: Sequence[RouterStatus]) -> bool:
        rs = next((r for r in routers if r.fingerprint == fp), None)
        return rs is not None and compatible(rs, other,
                                             enforce_distinct_subnets=self.enforce_distinct_subnets)

    def _launch(self, port: int | None, key: object, avoid: frozenset[str], purpose: str) -> _Entry:
        path, gc = self._choose(port, avoid)
        e = _Entry(tuple(path), purpose, self._generation, time.time(), isolation=key, gc=gc)
        self._start_build(e)
        log.debug("circuit launched", path=[rs.nickname for rs in path], port=port, purpose=purpose)
        return e

    def _start_build(self, e: _Entry) -> None:
        e.task = asyncio.get_running_loop().create_task(self._build(e))
        e.task.add_done_callback(lambda t: self._build_done(e, t))
        self._entries.append(e)

    async def _build(self, e: _Entry) -> ClientCircuit:
        loop = asyncio.get_running_loop()
        # as tor, only three-hop circuits teach the build timeout; longer ones (onion-service
        # circuits to a relay someone else chose) get it scaled by their length (tor: 4/3)
        learning = self.learning() and len(e.path) == 3
        timeout = self.current_build_timeout * len(e.path) / 3
        # a circuit past the timeout goes on building until close_ms, for measurement only
        close = max(self.cbt.close_ms / 1000, timeout) if learning else timeout
        start = time.monotonic()
        deadline = loop.time() + timeout
        guard = e.path[0]
        try:
            await asyncio.wait_for(self.client.channel_to(guard.info), timeout)
        except (OSError, OnionError, TimeoutError) as exc:
            self._guard_failed(e)
            self._failed[guard.fingerprint] = (self.clock() + FAILED_RELAY_MEMORY, "unreachable")
            raise CircuitError(f"cannot connect to guard {guard.nickname}: {exc or 'timeout'}",
                               "CONNECTFAILED") from None
        circ: ClientCircuit | None = None
        try:
            circ, building = await self.client.launch_circuit(
                [rs.info for rs in e.path], timeout=max(start + close - time.monotonic(), 0.001),
                purpose=e.hs_purpose or "GENERAL", hs_state=_HS_STATE_BUILDING.get(e.hs_purpose or ""),
                rend_query=e.rend_query)
            self._building[circ.id] = e
            try:
                await asyncio.wait_for(asyncio.shield(building), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                self._timed_out(circ, building, start, learning)
                raise BuildTimeoutError(f"circuit build timed out after {timeout:g} s") from None
        except CircuitError:
            until = self.clock() + FAILED_RELAY_MEMORY
            if circ is not None and not circ.hops and circ.close_reason in ("TIMEOUT", "REQUESTED"):
                # Not even CREATED2 (nor DESTROY) from the guard, over a channel that is
                # open: the link is likely half-open. As tor does, blame the guard alone,
                # and open a new channel for the next circuit.
                self.client.retire_channel(circ.chan)
                self._guard_failed(e)
                self._failed[guard.fingerprint] = (until, "unreachable")
            else:
                for middle in e.path[1:-1]:
                    self._failed[middle.fingerprint] = (until, "middle")
                self._failed.setdefault(e.path[-1].fingerprint, (until, "exit"))
            raise
        except asyncio.CancelledError:  # abandoned (stop, an onion-service request given up)
            if circ is not None:
                circ.close()
            raise
        if learning:
            self._note_live()
            self._cbt_event(self.cbt.circuit_built((time.monotonic() - start) * 1000))
        if e.gc is not None and self.guards.circuit_succeeded(e.gc) == WAITING:
            await self._wait_for_better_guard(e, circ)
        e.circ = circ
        if e.isolation is not _UNASSIGNED:
            circ.isolation = e.isolation
        return circ

    # -- guard-spec circuit states -------------------------------------------------------------------

    def _guard_failed(self, e: _Entry) -> None:
        """The circuit could not reach its guard: guard-spec's failure (retry schedule)."""
        if e.gc is not None:
            self.guards.circuit_failed(e.gc)
            self._upgrade_waiting()  # the last primary guard down lets waiting circuits go
        else:
            self.guards.mark_down(e.path[0].fingerprint)

    async def _wait_for_better_guard(self, e: _Entry, circ: ClientCircuit) -> None:
        """Hold a circuit built through a non-primary guard until guard-spec lets it be used
        (every primary guard down and no better circuit around), or give it up after
        ``guard-nonprimary-guard-idle-timeout``. Control-port status: GUARD_WAIT."""
        e.guard_wait, e.waiting_circ = asyncio.Event(), circ
        try:
            self._upgrade_waiting()
            if e.gc is not None and e.gc.state == WAITING:
                log.info("circuit built; waiting for a better guard", circ=circ.id, guard=e.path[0].nickname)
                self._notify_built()  # whoever waits for this build launches another meanwhile
                self._wake.set()  # and it no longer counts as a preemptive circuit under way
            while e.gc is not None and e.gc.state == WAITING:
                if circ.state != "built":
                    raise CircuitError("circuit closed while waiting for a better guard", "FINISHED")
                e.guard_wait.clear()
                await e.guard_wait.wait()
            if e.gc is None or e.gc.state != "complete" or circ.state != "built":
                circ.close()
                raise CircuitError("gave up waiting for a better guard", "TIMEOUT")
        finally:
            e.guard_wait = e.waiting_circ = None
        log.info("circuit through a non-primary guard may be used now", circ=circ.id)

    def _upgrade_waiting(self) -> None:
        """guard-spec §4.9: let waiting circuits go, close those that waited too long."""
        waiting = {id(e.gc): e for e in self._entries if e.gc is not None and e.guard_wait is not None}
        if not waiting:
            return
        for gc in self.guards.upgrade_waiting():
            e = waiting.get(id(gc))
            if e is not None and e.guard_wait is not None:
                e.guard_wait.set()
        for gc in self.guards.expired_waiting():
            e = waiting.get(id(gc))
            self.guards.release(gc)
            gc.state = "expired"
            if e is not None and e.guard_wait is not None:
                e.guard_wait.set()

    def guard_waiting(self) -> set[int]:
        """Ids of the built circuits waiting for a better guard (control port: GUARD_WAIT)."""
        return {e.waiting_circ.id for e in self._entries if e.waiting_circ is not None}

    def _release_guard(self, e: _Entry) -> None:
        if e.gc is not None:
            self.guards.release(e.gc)

    # -- build timeout and path bias bookkeeping -----------------------------------------------------

    def _note_live(self) -> None:
        """Tell the estimator when bytes last arrived from the network."""
        if self.client.last_read > self.cbt.network_last_live:
            self.cbt.network_is_live(self.client.last_read)

    def _cbt_event(self, kind: str | None) -> None:
        if kind is not None:
            self.buildtimeout_events(kind, self.cbt.event_args(kind))
        if self.cbt.unsaved >= CBT_SAVE_STATE_EVERY:
            self._save_build_times()

    def _timed_out(self, circ: ClientCircuit, building: asyncio.Task, start: float, learning: bool) -> None:
        """``circ`` passed the build timeout (tor's circuit_build_times_mark_circ_as_measurement_only
        and circuit_expire_building)."""
        did_onehop = bool(circ.hops)
        self.path_bias.timeout(circ.id)
        if learning:
            self._note_live()
            self._cbt_event(self.cbt.count_timeout(did_onehop))
        if learning and did_onehop:
            # no stream will use it; let it go on building until close_ms to measure it
            log.info("circuit build timed out; measuring it", circ=circ.id)
            self._building.pop(circ.id, None)
            self.path_bias.closed(circ.id, remote=False)  # tor stops counting measurement circuits
            building.add_done_callback(lambda t: self._measured(circ, t, start))
        else:
            circ.close()

    def _measured(self, circ: ClientCircuit, task: asyncio.Task, start: float) -> None:
        """A measurement circuit completed, or reached close_ms unbuilt."""
        if task.cancelled():
            return
        exc = task.exception()
        self._note_live()
        if exc is None:
            self._cbt_event(self.cbt.circuit_built((time.monotonic() - start) * 1000, measurement=True))
            circ.close()
        elif isinstance(exc, CircuitError) and exc.reason == "TIMEOUT":
            if self.cbt.count_close(bool(circ.hops), start):
                self._cbt_event(None)

    def _circuit_event(self, ev: CircuitEvent) -> None:
        """Path bias: the client's events about circuits this manager builds."""
        e = self._building.get(ev.circuit_id)
        if e is None:
            return
        if e.internal:  # as tor (pathbias_should_count), onion-service circuits are not counted:
            if ev.kind in ("closed", "failed"):  # their peers can make them fail at will
                del self._building[ev.circuit_id]
                self._release_guard(e)
                if e.guard_wait is not None:
                    e.guard_wait.set()
            return
        if ev.kind == "extended" and len(ev.path) == 1:
            if not self.path_bias.build_attempt(ev.circuit_id, e.path[0].fingerprint):
                circ = self.client.circuits.get(ev.circuit_id)
                if circ is not None:  # the guard is disabled for path bias
                    asyncio.get_running_loop().call_soon(circ.close)
        elif ev.kind == "built":
            self.path_bias.build_success(ev.circuit_id)
        elif ev.kind in ("closed", "failed"):
            del self._building[ev.circuit_id]
            self._release_guard(e)
            if e.guard_wait is not None:
                e.guard_wait.set()
            self.path_bias.closed(ev.circuit_id, remote=ev.reason not in _LOCAL_CLOSE)
            self._wake.set()  # a preemptive circuit may be gone: replace it now

    def _build_done(self, e: _Entry, task: asyncio.Task) -> None:
        exc = None if task.cancelled() else task.exception()  # retrieves it
        if task.cancelled() or exc is not None:
            self._release_guard(e)
            if e in self._entries:
                self._entries.remove(e)
            log.info("circuit build failed", path=[rs.nickname for rs in e.path],
                     error=str(exc or "cancelled"))
            if e.purpose == "preemptive" and not task.cancelled():
                self._backoff.failures += 1
                self._backoff.until = asyncio.get_running_loop().time() + min(
                    MAX_BACKOFF, 2.0 ** (self._backoff.failures - 1))
        else:
            if e.purpose == "preemptive":
                self._backoff = _Backoff()
            self._notify_built()
        self._upgrade_waiting()  # a better circuit may have gone, or completed
        self._wake.set()

    # -- maintenance -----------------------------------------------------------------------------------

    def _running(self) -> frozenset[str]:
        """Fingerprints listed as Running in the current consensus (cached per routers list)."""
        routers = self.routers()
        if routers is not self._running_src:
            self._running_src = routers
            self._running_fps = frozenset(r.fingerprint for r in routers if "Running" in r.flags)
        return self._running_fps

    def _reap(self) -> None:
        now = self.clock()
        running = self._running()
        keep = []
        for e in self._entries:
            if e.circ is not None and not self._fresh(e, now):
                self._release_guard(e)  # no longer a "better circuit" for guard-spec
            if e.gone:
                continue
            if e.internal:  # its owner (the onion-service client or service) closes it
                keep.append(e)
                continue
            if (not e.retired and e.circ is not None and running
                    and any(r.fingerprint not in running for r in e.path)):
                # tor's circuit_is_acceptable: a relay that left the consensus (or stopped
                # being Running) is probably gone; its circuits take no new streams
                log.info("retiring a circuit through a relay no longer running", circ=e.circ.id)
                self._retire(e)
            c = e.circ
            if (c is not None and not self._fresh(e, now) and not c.streams and e.inflight == 0
                    and (e.last_attach is None or now - e.last_attach >= ATTACH_GRACE)):
                log.debug("closing a circuit that takes no new streams", circ=c.id)
                c.close()
                continue
            keep.append(e)
        self._entries = keep

    def _top_up(self) -> None:
        loop = asyncio.get_running_loop()
        if self.preemptive <= 0 or not self.preemptive_ports or loop.time() < self._backoff.until:
            return
        now = self.clock()
        clean = [e for e in self._entries if e.isolation is _UNASSIGNED and e.dirty_since is None
                 and e.guard_wait is None and self._fresh(e, now)]
        unsupported: set[int] = set()
        while len(clean) < self.preemptive:
            ports = [p for p in self.preemptive_ports if p not in unsupported]
            if not ports:
                return
            port = min(ports, key=lambda p: sum(1 for e in clean if can_exit_to(e.exit, p)))
            try:
                clean.append(self._launch(port, _UNASSIGNED, frozenset(), "preemptive"))
            except NoPathError as exc:
                log.info("cannot build a preemptive circuit", port=port, error=str(exc))
                unsupported.add(port)
                if len(unsupported) == len(self.preemptive_ports):
                    self._backoff.failures += 1
                    self._backoff.until = loop.time() + min(MAX_BACKOFF, 2.0 ** (self._backoff.failures - 1))

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._reap()
                self._upgrade_waiting()
                self._top_up()
                self.guards.save_if_dirty()  # path-bias counts
            except Exception:  # keep maintaining whatever a single round hit
                log.exception("circuit maintenance failed")
            self._wake.clear()
            wait = MAINTENANCE_INTERVAL
            if any(e.guard_wait is not None for e in self._entries):
                wait = 1.0  # tor checks waiting circuits every second
            if self._backoff.until > loop.time():
                wait = min(wait, self._backoff.until - loop.time())
            try:
                async with asyncio.timeout(max(wait, 0.01)):
                    await self._wake.wait()
            except TimeoutError:
                pass


def _end_name(reason: int) -> str:
    return EndReason(reason).name if reason in EndReason._value2member_map_ else str(reason)
