"""Directory authorities: reachability tests, votes and a multiply signed consensus (specs/directory.md).

Theory of operation
-------------------
An authority has a long-term Ed25519 identity key (``DATA_DIR/keys/``, 0600) and knows
the full list of authorities (``NICK HOST:DIRPORT ED25519_ID``, itself included). Time
is cut into intervals of ``voting_interval`` seconds; the consensus for the period that
starts at ``VA`` (a multiple of the interval) is made like tor's (dir-spec §1.4), with
``V = D = min(300, interval / 6)`` seconds of vote and distribution delay:

==============  ===========================================================================
``VA - V - D``  vote: list every relay whose descriptor verified and whose ORPort proved
                the descriptor's identities in the link handshake; sign; POST to the others
``VA - D - V/2``  GET the votes still missing from the other authorities
``VA - D``      if more than half of the authorities voted: compute the consensus
                (deterministic, :func:`compute_consensus`), sign its digest, POST the
                detached signature to the others
``VA - D/2``    GET the detached signatures still missing
``VA``          publish the consensus with every signature collected, if more than half
                of the authorities signed it; later signatures are still added
==============  ===========================================================================

Relays upload descriptors with ``POST /tor/``. Each one is verified, stored (and kept in
``DATA_DIR/cached-descriptors``) and its relay is tested at once and then every
``min(interval / 2, 300)`` seconds: :meth:`OnionClient.channel_to` must complete a link
handshake in which the relay proves the descriptor's RSA and Ed25519 identities.

Shared randomness (:mod:`onionp2p.proto.srv`, tor's srv-spec): every vote says
``shared-rand-participate`` and carries the commits this authority keeps for the current
protocol run of 24 rounds (12 commit rounds, then 12 with reveals) and the two SRVs it
believes in; a received vote's own commit (and, later, its matching reveal) is taken into
the state, a reveal that does not match is dropped with a warning. At the first round of a
run the state computes the new SRV; the consensus carries the SRVs a majority voted for, and
once published it is what the state believes. The state lives in ``DATA_DIR/sr-state``
(0600, tor's file), so an authority restarted mid-run keeps its commitment.

The pure parts — :class:`VotingSchedule`, :func:`flags_for`, :func:`compute_consensus`
and :class:`DetachedSignatures` — take ``now`` and data; :class:`Authority` is the
asyncio shell (HTTP server, timers, tests).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from onionp2p.client.client import OnionClient
from onionp2p.config import AuthorityConfig
from onionp2p.dir.client import atomic_write
from onionp2p.dir.server import DirServer, HttpRequest, HttpResponse, fetch
from onionp2p.errors import ConfigError, KeyFileError, OnionError, ProtocolError
from onionp2p.log import get_logger
from onionp2p.proto.bwweights import bandwidth_totals, compute_bw_weights
from onionp2p.proto.directory import (
    CLOCK_SKEW,
    KNOWN_FLAGS,
    MAX_CONSENSUS_SIZE,
    MAX_DESCRIPTOR_SIZE,
    DirAuthority,
    NetworkStatus,
    RouterEntry,
    ServerDescriptor,
    _b64,
    _Lines,
    _unb64,
    format_time,
    parse_authorities,
    parse_time,
    verify_consensus,
)
from onionp2p.proto.exitpolicy import ExitPolicy
from onionp2p.proto.srv import AGREEMENTS_PARAM, Note, SRState, consensus_srvs, default_agreements, run_start

__all__ = [
    "AUTHORITY_KEY_FILE",
    "Authority",
    "DetachedSignatures",
    "FlagRules",
    "Reachability",
    "VotingSchedule",
    "authority_line",
    "compute_consensus",
    "flags_for",
    "load_or_create_authority_key",
    "load_authority_key",
]

log = get_logger("onionp2p.authority")

AUTHORITY_KEY_FILE = "authority_id_secret_key.pem"
FAST_KB = 100  # KB/s: the Fast flag's floor
MAX_DESCRIPTOR_AGE = 48 * 3600
MAX_RELAYS = 10_000
REACH_TIMEOUT = 10.0
MAX_UPLOAD = 2 * 1024 * 1024  # largest POST body (votes are the big ones)
SR_STATE_FILE = "sr-state"


# -- identity key ------------------------------------------------------------------------
def load_or_create_authority_key(data_dir: Path | str) -> ed25519.Ed25519PrivateKey:
    """The authority's Ed25519 identity from ``DATA_DIR/keys/`` (created 0600 if absent)."""
    keys = Path(data_dir) / "keys"
    path = keys / AUTHORITY_KEY_FILE
    try:
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(keys.stat().st_mode) & 0o077:
            os.chmod(keys, 0o700)
        key = load_authority_key(data_dir)
        if key is not None:
            return key
        key = ed25519.Ed25519PrivateKey.generate()
        atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        log.info("generated new authority identity key", identity=_b64(_raw(key)))
        return key
    except OSError as exc:
        raise KeyFileError(f"authority key {path}: {exc.strerror or exc}") from None


def load_authority_key(data_dir: Path | str) -> ed25519.Ed25519PrivateKey | None:
    """The authority's identity key if its file exists (None if not); creates nothing
    (``--verify-config`` uses it too). KeyFileError if unreadable, corrupt or open to others."""
    path = Path(data_dir) / "keys" / AUTHORITY_KEY_FILE
    try:
        if not path.exists():
            return None
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise KeyFileError(f"secret key file {path} is readable by group/others; chmod 600 {path}")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"authority key {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise KeyFileError(f"authority key {path} is corrupt: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} does not hold an Ed25519 key")
    return key


def _raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def authority_line(nickname: str, host: str, dir_port: int, key: ed25519.Ed25519PrivateKey) -> str:
    """The ``NICK HOST:DIRPORT ED25519_ID`` line that names this authority in configurations."""
    return DirAuthority(nickname, host, dir_port, _raw(key)).line()


# -- pure voting logic ---------------------------------------------------------------------
@dataclass(frozen=True)
class VotingSchedule:
    """When to vote, compute, and publish for each period (all times unix seconds)."""

    interval: int

    @property
    def delay(self) -> float:
        """Both the vote delay V and the distribution delay D."""
        return min(300.0, self.interval / 6)

    def next_valid_after(self, now: float) -> int:
        """The first period start whose voting has not begun at ``now``."""
        return int(math.ceil((now + 2 * self.delay) / self.interval)) * self.interval

    def vote_at(self, va: int) -> float:
        return va - 2 * self.delay

    def fetch_votes_at(self, va: int) -> float:
        return va - 1.5 * self.delay

    def compute_at(self, va: int) -> float:
        return va - self.delay

    def fetch_signatures_at(self, va: int) -> float:
        return va - 0.5 * self.delay

    def times(self, va: int) -> tuple[int, int, int]:
        """(valid-after, fresh-until, valid-until) of the consensus for the period at ``va``."""
        return va, va + self.interval, va + 3 * self.interval


@dataclass(frozen=True)
class FlagRules:
    """How an authority assigns flags (specs/directory.md "Flags")."""

    stable_uptime: float = 86400.0  #: continuously reachable this long -> Stable
    guard_uptime: float = 8 * 86400.0  #: ... and this long (plus Fast, Stable) -> Guard
    assume_guard: bool = False  #: every running relay is a Guard (tiny test networks)
    assume_exit: bool = False  #: every running relay whose policy accepts anything is an Exit
    #: continuously reachable this long (plus Fast, Stable, V2Dir, hidden-service-dir) -> HSDir
    #: (tor's MinUptimeHidServDirectoryV2, 96 hours; 0 in testing networks)
    hsdir_uptime: float = 96 * 3600.0


@dataclass
class Reachability:
    """What one authority saw when it tested a relay's ORPort."""

    target: tuple = ()  # (address, or_port, rsa_id, ed_id) last tested
    ok: bool = False
    up_since: float | None = None  # start of the current run of successful tests
    last_test: float = 0.0


def advertised_kb(desc: ServerDescriptor) -> int:
    """Bandwidth in KB/s: min(rate, burst, observed if measured) / 1000."""
    rate, burst, observed = desc.bandwidth
    bw = min(rate, burst) if observed == 0 else min(rate, burst, observed)
    return bw // 1000


def _target(desc: ServerDescriptor) -> tuple:
    return (desc.address, desc.or_port, desc.rsa_id, desc.ed_id)


def flags_for(desc: ServerDescriptor, reach: Reachability | None, now: float, rules: FlagRules) -> set[str] | None:
    """The flags this authority votes for ``desc``, or None if the relay is not listed."""
    if reach is None or not reach.ok or reach.target != _target(desc) or reach.up_since is None:
        return None
    flags = {"Running", "Valid"}
    uptime = now - reach.up_since
    if advertised_kb(desc) >= FAST_KB:
        flags.add("Fast")
    if uptime >= rules.stable_uptime:
        flags.add("Stable")
    if desc.dir_server:
        flags.add("V2Dir")
    summary = ExitPolicy.parse_summary(desc.policy_summary)
    if summary.allows_port(80) and summary.allows_port(443):
        flags.add("Exit")
    elif rules.assume_exit and ExitPolicy.parse(desc.exit_policy, reject_private=False).is_exit:
        flags.add("Exit")
    if rules.assume_guard or ({"Fast", "Stable"} <= flags and uptime >= rules.guard_uptime):
        flags.add("Guard")
    # tor's dirserv_thinks_router_is_hs_dir: wants to be one, answers BEGIN_DIR, Stable, Fast
    if desc.hs_dir and desc.dir_server and {"Fast", "Stable"} <= flags and uptime >= rules.hsdir_uptime:
        flags.add("HSDir")
    return flags


def compute_consensus(votes: Sequence[NetworkStatus], schedule: VotingSchedule, va: int, *,
                      n_authorities: int | None = None) -> NetworkStatus:
    """The unsigned consensus for ``va`` from verified votes. Same votes -> same bytes.

    A relay (RSA + Ed25519 identity) is listed if more than half of the votes list it; its
    fields come from the newest descriptor the votes saw (ties: larger digest), a flag is
    set if more than half of the votes listing the relay set it, and the weight is the
    low median of their bandwidths. A network parameter (``params``) is in the consensus
    if more than half of the votes set it, with the low median of their values. The
    ``bandwidth-weights`` are computed from the listed relays' consensus bandwidths and
    flags as a tor authority does (dir-spec §3.8.3, consensus method 10); none when tor
    would write none.

    The shared random values (previous and current) are those more than half of all
    ``n_authorities`` configured authorities (default: as many as voted) voted for, and in
    the first round of a protocol run at least ``AuthDirNumSRVAgreements`` (the consensus's
    parameter, default two thirds of the authorities) — :func:`onionp2p.proto.srv.consensus_srvs`.
    """
    listed: dict[tuple[bytes, bytes], list[RouterEntry]] = {}
    for vote in votes:
        for entry in vote.routers:
            listed.setdefault((entry.rsa_id, entry.ed_id), []).append(entry)
    routers = []
    for entries in listed.values():
        if 2 * len(entries) <= len(votes):
            continue
        best = max(entries, key=lambda e: (e.published, e.digest))
        flags = {f for f in KNOWN_FLAGS if 2 * sum(f in e.flags for e in entries) > len(entries)}
        bws = sorted(e.bandwidth for e in entries)
        routers.append(replace(best, flags=frozenset(flags), bandwidth=bws[(len(bws) - 1) // 2]))
    voters = tuple(v.voters[0] for v in votes)
    # a network parameter is set if more than half of the votes set it: the low median
    values: dict[str, list[int]] = {}
    for vote in votes:
        for key, value in vote.params:
            values.setdefault(key, []).append(value)
    params = tuple((k, sorted(vs)[(len(vs) - 1) // 2]) for k, vs in values.items() if 2 * len(vs) > len(votes))
    weights = compute_bw_weights(bandwidth_totals((e.flags, e.bandwidth) for e in routers))
    n_auth = n_authorities if n_authorities is not None else len(votes)
    previous, current = consensus_srvs(
        ((v.sr_participate, v.shared_rand_previous, v.shared_rand_current) for v in votes),
        n_authorities=n_auth, fresh=run_start(va, schedule.interval) == va,
        agreements=dict(params).get(AGREEMENTS_PARAM, default_agreements(n_auth)))
    return NetworkStatus("consensus", *schedule.times(va), voters, tuple(routers), params=params,
                         bw_weights=tuple((weights or {}).items()), shared_rand_previous=previous,
                         shared_rand_current=current)


@dataclass(frozen=True)
class DetachedSignatures:
    """Signatures over one consensus digest, exchanged between authorities."""

    valid_after: int
    digest: bytes
    signatures: tuple[tuple[bytes, bytes], ...]

    @property
    def text(self) -> str:
        return ("onionp2p-consensus-signatures 1\n"
                f"valid-after {format_time(self.valid_after)}\nconsensus-digest {self.digest.hex()}\n"
                + "".join(f"directory-signature {_b64(ed)} {_b64(sig)}\n" for ed, sig in sorted(self.signatures)))

    @classmethod
    def parse(cls, text: bytes | str) -> DetachedSignatures:
        d = _Lines(text, "detached signatures", 16384)
        try:
            if d.take("onionp2p-consensus-signatures", 1) != "1":
                raise d.fail("unsupported version")
            va = parse_time(d.take("valid-after", 2))
            hexd = d.take("consensus-digest", 1)
            if len(hexd) != 64 or hexd != hexd.lower():
                raise d.fail("bad consensus-digest")
            digest = bytes.fromhex(hexd)
            sigs = []
            while d.peek() == "directory-signature":
                ed, sig = d.take("directory-signature", 2).split(" ")
                sigs.append((_unb64(ed, 32, "signer identity"), _unb64(sig, 64, "signature")))
            d.end()
        except ValueError as exc:
            raise ProtocolError(f"detached signatures: {exc}") from None
        if not sigs or len(sigs) > 64 or sorted(sigs) != sigs or len({s[0] for s in sigs}) != len(sigs):
            raise ProtocolError("detached signatures: need 1-64 signatures, sorted by signer, unique")
        return cls(va, digest, tuple(sigs))


# -- the asyncio shell ---------------------------------------------------------------------
class Authority:
    """A running directory authority. ``await start()``, then ``await stop()``."""

    def __init__(self, key: ed25519.Ed25519PrivateKey, config: AuthorityConfig, *,
                 client: OnionClient | None = None):
        self.key = key
        self.config = config
        self.identity = _raw(key)
        nickname = self.nickname = config.nickname
        self.authorities = tuple(parse_authorities(config.authorities))
        if not any(a.ed_id == self.identity for a in self.authorities):
            raise ConfigError(f"authority {nickname}: its identity {_b64(self.identity)} is not in the "
                              "configured authorities")
        self.others = [a for a in self.authorities if a.ed_id != self.identity]
        self.need = len(self.authorities) // 2 + 1
        self.data_dir = Path(config.data_dir)
        self.schedule = VotingSchedule(config.voting_interval)
        self.rules = FlagRules(stable_uptime=config.stable_uptime, guard_uptime=config.guard_uptime,
                               assume_guard=config.assume_guard, assume_exit=config.assume_exit,
                               hsdir_uptime=config.hsdir_uptime)
        dir_host, dir_port = config.dir_address
        self.client = client or OnionClient(handshake_timeout=REACH_TIMEOUT)
        self.server = DirServer(self._handle, dir_host, dir_port, max_body=MAX_UPLOAD,
                                name=f"authority {nickname}")
        self.descriptors: dict[bytes, ServerDescriptor] = {}
        self.reach: dict[bytes, Reachability] = {}
        self.votes: dict[int, dict[bytes, NetworkStatus]] = {}
        self.pending: NetworkStatus | None = None  # computed, not yet published
        self.signatures: dict[tuple[int, bytes], dict[bytes, bytes]] = {}
        self.current: NetworkStatus | None = None  # published, with signatures
        #: the shared-randomness protocol's state (tor's sr-state), kept in DATA_DIR/sr-state
        self.sr = SRState(self.identity, self.schedule.interval)
        self._tasks: set[asyncio.Task] = set()
        self._testing: set[bytes] = set()
        self._limit = asyncio.Semaphore(16)
        self._log = log.bind(authority=nickname)

    @property
    def dir_port(self) -> int:
        return self.server.port

    def status(self) -> dict:
        """Counters for a status log line."""
        cur = self.current
        return {"descriptors": len(self.descriptors),
                "reachable": sum(1 for r in self.reach.values() if r.ok),
                "consensus_valid_after": format_time(cur.valid_after) if cur else None,
                "consensus_relays": len(cur.routers) if cur else 0,
                "consensus_signatures": len(cur.signatures) if cur else 0}

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._load_state()
        await self.server.start()
        self._spawn(self._voting_loop())
        self._spawn(self._reachability_loop())
        self._log.info("authority listening", dir_port=self.server.port, identity=_b64(self.identity),
                       authorities=len(self.authorities), interval=self.schedule.interval)
        if self.schedule.interval % 5:
            self._log.warning("voting interval is not a multiple of 5 s: onion-service time periods (one "
                              "shared-random run, 24 intervals) will not be whole minutes",
                              interval=self.schedule.interval)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.stop()
        await self.client.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _load_state(self) -> None:
        now = time.time()
        path = self.data_dir / "cached-descriptors"
        if path.exists():
            text = path.read_text("ascii", errors="replace")
            for chunk in re.split(r"(?m)^(?=onionp2p-router-descriptor )", text):
                if not chunk:
                    continue
                try:
                    self._store(ServerDescriptor.parse(chunk), now, save=False)
                except ProtocolError as exc:
                    self._log.info("dropping cached descriptor", error=str(exc))
        path = self.data_dir / SR_STATE_FILE
        if path.exists():
            try:
                self.sr = SRState.parse(path.read_text("ascii"), self.identity, self.schedule.interval, now)
                mine = self.sr.our_commit
                self._log.info("resuming the shared-random protocol run", commits=len(self.sr.commits),
                               our_commit=mine.encoded_commit if mine else None)
            except (OSError, UnicodeDecodeError, ProtocolError) as exc:
                self._log.info("not using the saved shared-random state", error=str(exc))
        path = self.data_dir / "published-consensus"
        if path.exists():
            try:
                self.current = verify_consensus(path.read_bytes(), self.authorities, now)
            except ProtocolError as exc:
                self._log.info("not serving the cached consensus", error=str(exc))

    def _save_sr(self) -> None:
        atomic_write(self.data_dir / SR_STATE_FILE, self.sr.text().encode())  # 0600: holds our reveal

    def _sr_log(self, notes: Iterable[Note], **fields) -> None:
        for note in notes:
            getattr(self._log, note.level)(note.message, **fields, **note.fields)

    def _sr_prepare(self, va: int) -> None:
        """Bring the shared-random state to the round at ``va`` (once per round)."""
        if va > self.sr.valid_after:
            self._sr_log(self.sr.update(va), valid_after=format_time(va))
            self._save_sr()

    def _save_descriptors(self) -> None:
        atomic_write(self.data_dir / "cached-descriptors",
                     "".join(d.text for d in self.descriptors.values()).encode())

    # -- HTTP ------------------------------------------------------------------------------
    async def _handle(self, req: HttpRequest) -> HttpResponse:
        now = time.time()
        try:
            if req.method == "POST":
                if req.path == "/tor/":
                    return HttpResponse(200, self._upload(req.body, now).encode() + b"\n")
                if req.path == "/tor/post/vote":
                    return HttpResponse(200, self._receive_vote(req.body, now).encode() + b"\n")
                if req.path == "/tor/post/consensus-signature":
                    return HttpResponse(200, self._receive_signatures(req.body, now).encode() + b"\n")
            elif req.path == "/tor/status-vote/current/consensus":
                cur = self.current
                if cur is not None and now <= cur.valid_until:
                    return HttpResponse(200, cur.text.encode())
            elif req.path == "/tor/status-vote/next/authority":
                mine = [v[self.identity] for v in self.votes.values() if self.identity in v]
                if mine:
                    return HttpResponse(200, max(mine, key=lambda v: v.valid_after).text.encode())
            elif req.path == "/tor/status-vote/next/consensus-signatures":
                pend = self.pending
                sigs = self.signatures.get((pend.valid_after, pend.digest)) if pend else None
                if pend and sigs:
                    return HttpResponse(200, DetachedSignatures(pend.valid_after, pend.digest,
                                                                tuple(sigs.items())).text.encode())
            elif req.path == "/tor/server/all":
                return HttpResponse(200, "".join(d.text for d in self.descriptors.values()).encode())
            return HttpResponse(404, b"not found\n")
        except ProtocolError as exc:
            self._log.info("refused directory upload", path=req.path, error=str(exc))
            return HttpResponse(400, f"{exc}\n".encode()[:2000])

    # -- descriptors and reachability --------------------------------------------------------
    def _upload(self, body: bytes, now: float) -> str:
        if len(body) > MAX_DESCRIPTOR_SIZE:
            raise ProtocolError("descriptor too large")
        desc = ServerDescriptor.parse(body)
        return self._store(desc, now)

    def _store(self, desc: ServerDescriptor, now: float, *, save: bool = True) -> str:
        desc.verify(now)
        if desc.published < now - MAX_DESCRIPTOR_AGE:
            raise ProtocolError(f"descriptor published {format_time(desc.published)} is too old")
        old = self.descriptors.get(desc.rsa_id)
        if old is not None and old.published >= desc.published:
            return "descriptor not newer than the one we have; ignored"
        if old is None and len(self.descriptors) >= MAX_RELAYS:
            raise ProtocolError("too many relays")
        self.descriptors[desc.rsa_id] = desc
        if save:
            self._save_descriptors()
            self._log.info("accepted descriptor", nickname=desc.nickname, fingerprint=desc.fingerprint)
        reach = self.reach.get(desc.rsa_id)
        if save and (reach is None or reach.target != _target(desc)):
            self._spawn(self._test(desc))
        return "descriptor accepted"

    async def _reachability_loop(self) -> None:
        period = max(1.0, min(self.schedule.interval / 2, 300.0))
        while True:
            now = time.time()
            for rsa_id, desc in list(self.descriptors.items()):
                if now - desc.published > MAX_DESCRIPTOR_AGE:
                    del self.descriptors[rsa_id]
                    self.reach.pop(rsa_id, None)
                    continue
                reach = self.reach.get(rsa_id)
                if reach is None or now - reach.last_test >= period:
                    self._spawn(self._test(desc))
            await asyncio.sleep(min(period / 4, 5.0))

    async def _test(self, desc: ServerDescriptor) -> None:
        """Connect to the relay's ORPort: the link handshake must prove both identities."""
        if desc.rsa_id in self._testing:
            return
        self._testing.add(desc.rsa_id)
        reach = self.reach.setdefault(desc.rsa_id, Reachability())
        reach.last_test = time.time()
        error = None
        try:
            async with self._limit, asyncio.timeout(REACH_TIMEOUT):
                chan = await self.client.channel_to(desc.relay_info())
            chan.close("reachability test done")
        except (OSError, OnionError, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        finally:
            self._testing.discard(desc.rsa_id)
            stale = self.client.channels.get(desc.rsa_id)
            if stale is not None:
                stale.close("reachability test done")
        now = time.time()
        was_ok = reach.ok and reach.target == _target(desc)
        if error is None:
            reach.up_since = reach.up_since if was_ok else now
            if not was_ok:
                self._log.info("relay is reachable and proved its identity", nickname=desc.nickname,
                               fingerprint=desc.fingerprint)
        else:
            reach.up_since = None
            if was_ok or reach.target != _target(desc):
                self._log.warning("relay failed the reachability test; not listing it",
                                  nickname=desc.nickname, fingerprint=desc.fingerprint, error=error)
        reach.ok, reach.target = error is None, _target(desc)

    # -- votes -------------------------------------------------------------------------------
    def make_vote(self, va: int, now: float) -> NetworkStatus:
        """This authority's signed vote for the period starting at ``va``."""
        entries = []
        for desc in self.descriptors.values():
            flags = flags_for(desc, self.reach.get(desc.rsa_id), now, self.rules)
            if flags is not None:
                entries.append(RouterEntry.from_descriptor(desc, flags, advertised_kb(desc)))
        sr = self.sr
        vote = NetworkStatus("vote", *self.schedule.times(va), ((self.nickname, self.identity),), tuple(entries),
                             params=tuple(self.config.consensus_params.items()), sr_participate=True,
                             sr_commits=sr.vote_commits() if sr.valid_after == va else (),
                             shared_rand_previous=sr.previous, shared_rand_current=sr.current)
        return vote.with_signatures([(self.identity, vote.sign(self.key))])

    def _period_ok(self, va: int, now: float) -> bool:
        """Is ``va`` the period now being voted on (give or take the clock skew)?"""
        sched = self.schedule
        return va % sched.interval == 0 and sched.vote_at(va) - CLOCK_SKEW <= now <= va + sched.interval

    def _receive_vote(self, body: bytes, now: float) -> str:
        vote = NetworkStatus.parse(body)
        if vote.status != "vote":
            raise ProtocolError("not a vote")
        voter = vote.voters[0][1]
        if voter == self.identity or not any(a.ed_id == voter for a in self.authorities):
            raise ProtocolError("vote from an unknown authority")
        sigs = dict(vote.signatures)
        if set(sigs) != {voter} or not vote.signature_valid(voter, sigs[voter]):
            raise ProtocolError("vote is not signed by its voter")
        if (vote.valid_after, vote.fresh_until, vote.valid_until) != self.schedule.times(vote.valid_after) \
                or not self._period_ok(vote.valid_after, now):
            raise ProtocolError(f"vote for an unexpected period ({format_time(vote.valid_after)})")
        votes = self.votes.setdefault(vote.valid_after, {})
        if voter in votes:
            return "already have a vote from this authority"
        votes[voter] = vote
        self._log.info("received vote", voter=vote.voters[0][0], relays=len(vote.routers),
                       valid_after=format_time(vote.valid_after))
        if vote.sr_participate:
            self._sr_prepare(vote.valid_after)
            changed, notes = self.sr.receive(voter, vote.sr_commits, (a.ed_id for a in self.authorities),
                                             vote.valid_after)
            self._sr_log(notes, voter=vote.voters[0][0])
            if changed:
                self._save_sr()
        return "vote accepted"

    def _receive_signatures(self, body: bytes, now: float) -> str:
        det = DetachedSignatures.parse(body)
        if not self._period_ok(det.valid_after, now) and not (
                self.pending and self.pending.valid_after == det.valid_after):
            raise ProtocolError(f"signatures for an unexpected period ({format_time(det.valid_after)})")
        known = {a.ed_id for a in self.authorities}
        store = self.signatures.get((det.valid_after, det.digest))
        if store is None:
            if sum(1 for k in self.signatures if k[0] == det.valid_after) >= 8:
                raise ProtocolError("too many different consensus digests for this period")
            store = self.signatures[(det.valid_after, det.digest)] = {}
        added = 0
        for ed, sig in det.signatures:
            if ed in known and ed not in store and NetworkStatus.digest_signature_valid(ed, sig, det.digest):
                store[ed] = sig
                added += 1
        if added:
            self._maybe_publish(det.valid_after, time.time())
        return f"{added} signature(s) added"

    # -- the schedule ------------------------------------------------------------------------
    async def _sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - time.time()))

    async def _voting_loop(self) -> None:
        sched = self.schedule
        while True:
            va = sched.next_valid_after(time.time())
            self._sr_prepare(va)  # as tor after each consensus: ready for the next round's votes
            for at, step in ((sched.vote_at(va), self._vote), (sched.fetch_votes_at(va), self._fetch_votes),
                             (sched.compute_at(va), self._compute),
                             (sched.fetch_signatures_at(va), self._fetch_signatures),
                             (va, self._publish)):
                await self._sleep_until(at)
                try:
                    await step(va)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one bad period must not stop the authority
                    self._log.exception("voting step failed", step=step.__name__)
            for old in [k for k in self.votes if k < va]:
                del self.votes[old]
            for old in [k for k in self.signatures if k[0] < va]:
                del self.signatures[old]

    def _post_all(self, path: str, body: bytes) -> None:
        timeout = max(2.0, min(30.0, self.schedule.interval))
        for auth in self.others:
            self._spawn(self._post(auth, path, body, timeout))

    async def _post(self, auth: DirAuthority, path: str, body: bytes, timeout: float) -> None:
        try:
            await fetch(auth.host, auth.dir_port, path, body, max_size=4096, timeout=timeout)
        except OnionError as exc:
            self._log.info("upload to authority failed", to=auth.nickname, path=path, error=str(exc))

    async def _vote(self, va: int) -> None:
        self._sr_prepare(va)
        vote = self.make_vote(va, time.time())
        self.votes.setdefault(va, {})[self.identity] = vote
        self._log.info("voting", relays=len(vote.routers), valid_after=format_time(va))
        self._post_all("/tor/post/vote", vote.text.encode())

    async def _gather(self, coros: Iterable, until: float) -> None:
        tasks = [self._spawn(c) for c in coros]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.5, until - time.time()))

    async def _fetch_votes(self, va: int) -> None:
        have = self.votes.get(va, {})
        await self._gather((self._fetch_vote(a) for a in self.others if a.ed_id not in have),
                           self.schedule.compute_at(va))

    async def _fetch_vote(self, auth: DirAuthority) -> None:
        try:
            body = await fetch(auth.host, auth.dir_port, "/tor/status-vote/next/authority",
                               max_size=MAX_CONSENSUS_SIZE, timeout=max(1.0, self.schedule.delay))
            self._receive_vote(body, time.time())
        except OnionError as exc:
            self._log.info("could not fetch vote", authority=auth.nickname, error=str(exc))

    async def _compute(self, va: int) -> None:
        votes = self.votes.get(va, {})
        if len(votes) < self.need:
            self._log.warning("not enough votes to compute a consensus", votes=len(votes), need=self.need,
                              valid_after=format_time(va))
            return
        cons = compute_consensus(list(votes.values()), self.schedule, va, n_authorities=len(self.authorities))
        self.pending = cons
        sig = cons.sign(self.key)
        self.signatures.setdefault((va, cons.digest), {})[self.identity] = sig
        self._log.info("computed consensus", relays=len(cons.routers), votes=len(votes),
                       digest=cons.digest.hex()[:16], valid_after=format_time(va))
        self._post_all("/tor/post/consensus-signature",
                       DetachedSignatures(va, cons.digest, ((self.identity, sig),)).text.encode())

    async def _fetch_signatures(self, va: int) -> None:
        pend = self.pending
        if pend is None or pend.valid_after != va:
            return
        have = self.signatures.get((va, pend.digest), {})
        await self._gather((self._fetch_signature(a) for a in self.others if a.ed_id not in have), va)

    async def _fetch_signature(self, auth: DirAuthority) -> None:
        try:
            body = await fetch(auth.host, auth.dir_port, "/tor/status-vote/next/consensus-signatures",
                               max_size=16384, timeout=max(1.0, self.schedule.delay / 2))
            self._receive_signatures(body, time.time())
        except OnionError as exc:
            self._log.info("could not fetch signatures", authority=auth.nickname, error=str(exc))

    async def _publish(self, va: int) -> None:
        if not self._maybe_publish(va, time.time()) and self.pending is not None \
                and self.pending.valid_after == va:
            have = len(self.signatures.get((va, self.pending.digest), {}))
            self._log.warning("consensus not published yet: too few signatures", signatures=have,
                              need=self.need, valid_after=format_time(va))

    def _maybe_publish(self, va: int, now: float) -> bool:
        pend = self.pending
        if pend is None or pend.valid_after != va or now < va - 0.5:
            return False
        sigs = self.signatures.get((va, pend.digest), {})
        if len(sigs) < self.need:
            return False
        cur = self.current
        if cur is not None and (cur.valid_after > va or (cur.valid_after == va and len(cur.signatures) >= len(sigs))):
            return cur.valid_after == va
        doc = pend.with_signatures(sigs.items())
        self.current = doc
        atomic_write(self.data_dir / "published-consensus", doc.text.encode())
        self._log.info("published consensus", relays=len(doc.routers), signatures=len(sigs),
                       valid_after=format_time(va), digest=doc.digest.hex()[:16])
        if va == self.sr.valid_after:  # the consensus decides which SRVs are in force
            self.sr.adopt(doc.shared_rand_previous, doc.shared_rand_current)
            self._save_sr()
        return True
