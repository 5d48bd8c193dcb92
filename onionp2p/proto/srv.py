"""Shared randomness: the authorities' commit-and-reveal protocol (tor's srv-spec, proposal 250).

Theory of operation
-------------------
Onion services place descriptors on a hash ring keyed by a *shared random value* (SRV) that
nobody could predict before it was made: :mod:`onionp2p.proto.hs.ring`. Our authorities make
one per *protocol run* of 24 voting rounds, as tor's do (specs/directory.md "Shared
randomness"):

* **commit phase** (rounds 0-11 of the run; the round is ``valid_after // interval % 24``):
  each authority picks ``RN`` (32 random bytes), sets ``REVEAL = TIMESTAMP || SHA3(RN)`` and
  ``COMMIT = TIMESTAMP || SHA3(base64(REVEAL))`` (TIMESTAMP: 8-byte valid-after of the first
  vote it commits in) and puts COMMIT in its votes. Others keep the first commit that an
  authority put in *its own* vote (an *authoritative* commit);
* **reveal phase** (rounds 12-23): each authority adds REVEAL to its commit line; others keep
  a reveal only if its hash and timestamp match the commit they kept (:meth:`Commit.matches`);
* at the first round of the next run the previous SRV becomes the *previous* one and the
  new one is (:func:`compute_srv`, tor's ``sr_compute_srv``)::

      HASHED_REVEALS = SHA3-256(ID_a | R_a | ID_b | R_b | ...)   (ordered by SHA3(R_x))
      SRV = SHA3-256("shared-random" | INT_8(REVEAL_NUM) | INT_4(VERSION=1)
                     | HASHED_REVEALS | PREVIOUS_SRV or 32 NUL bytes)

  where ``R_x`` is the reveal in tor's padded base64 (56 characters) and ``ID_x`` the
  authority's identity in upper-case base16 — for us the 32-byte Ed25519 identity (64
  characters) where tor has the 20-byte RSA fingerprint (40 characters).

A consensus carries an SRV only if more than half of *all* configured authorities voted for
it, and a freshly made one only if also ``AuthDirNumSRVAgreements`` did (consensus parameter,
default two thirds of the authorities rounded down): :func:`consensus_srvs`. Without one,
onion services use the disaster SRV (:func:`onionp2p.proto.hs.blinding.disaster_srv`).

:class:`SRState` is tor's ``sr_state``: the commits of the run, our own reveal, the two SRVs;
its text form (:meth:`SRState.text`) is tor's ``sr-state`` file. Nothing here does I/O or
reads the clock; randomness is a callable (``os.urandom`` by default).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from onionp2p.errors import ProtocolError
from onionp2p.proto.doctime import format_time, parse_time

__all__ = [
    "AGREEMENTS_PARAM",
    "PROTOCOL_ROUNDS",
    "SR_ALGORITHM",
    "SR_VERSION",
    "Commit",
    "Note",
    "Phase",
    "SRState",
    "SharedRandomValue",
    "compute_srv",
    "consensus_srvs",
    "default_agreements",
    "phase_at",
    "srv_from_commits",
    "run_start",
    "time_period_minutes",
]

SR_VERSION = 1
SR_ALGORITHM = "sha3-256"
#: rounds per phase and per protocol run (tor's SHARED_RANDOM_N_ROUNDS, * N_PHASES)
PHASE_ROUNDS = 12
PROTOCOL_ROUNDS = 2 * PHASE_ROUNDS
#: the consensus parameter with the number of authorities that must agree on a fresh SRV
AGREEMENTS_PARAM = "AuthDirNumSRVAgreements"
SRV_TOKEN = b"shared-random"
_COMMIT_LEN = _REVEAL_LEN = 8 + 32


class Phase(enum.Enum):
    COMMIT = "commit"
    REVEAL = "reveal"


def _round(valid_after: int, interval: int) -> int:
    return (int(valid_after) // interval) % PROTOCOL_ROUNDS


def phase_at(valid_after: int, interval: int) -> Phase:
    """The phase of the voting round at ``valid_after`` (tor's get_sr_protocol_phase)."""
    return Phase.COMMIT if _round(valid_after, interval) < PHASE_ROUNDS else Phase.REVEAL


def run_start(valid_after: int, interval: int) -> int:
    """The valid-after of the first round of the protocol run holding ``valid_after``."""
    return int(valid_after) - _round(valid_after, interval) * interval - int(valid_after) % interval


def time_period_minutes(interval: int) -> int:
    """The onion-service time period of a network voting every ``interval`` seconds: one
    protocol run (tor's TestingTorNetwork rule, hs_get_time_period_length), which is tor's
    default 1440 minutes at the usual one-hour interval. Whole minutes only when
    ``interval`` is a multiple of 5 s."""
    return PROTOCOL_ROUNDS * interval // 60


def _sha3(data: bytes) -> bytes:
    return hashlib.sha3_256(data).digest()


def _tor_b64(data: bytes) -> str:
    """tor's base64_encode without newlines: padded (what tor hashes a reveal as)."""
    return base64.b64encode(data).decode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(s: str, n: int, what: str) -> bytes:
    """Strict unpadded base64 of exactly ``n`` bytes (our documents' form)."""
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (ValueError, binascii.Error):
        raise ProtocolError(f"{what} is not base64") from None
    if _b64(raw) != s or len(raw) != n:
        raise ProtocolError(f"{what} must be {n} bytes in canonical unpadded base64")
    return raw


# -- values --------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class SharedRandomValue:
    """One SRV and how many reveals made it (``shared-rand-*-value NumReveals Value``)."""

    value: bytes
    num_reveals: int

    def __post_init__(self) -> None:
        if len(self.value) != 32 or not 0 <= self.num_reveals < 2**64:
            raise ValueError("an SRV is 32 bytes with a 64-bit reveal count")

    def args(self) -> str:
        return f"{self.num_reveals} {_b64(self.value)}"

    @classmethod
    def parse(cls, args: str, what: str) -> SharedRandomValue:
        parts = args.split(" ")
        if len(parts) != 2 or not re.fullmatch(r"0|[1-9][0-9]{0,19}", parts[0]) or int(parts[0]) >= 2**64:
            raise ProtocolError(f"{what}: want 'NumReveals Value' (NumReveals a 64-bit integer)")
        return cls(_unb64(parts[1], 32, what), int(parts[0]))


@dataclass(frozen=True)
class Commit:
    """One authority's commitment for a run, and its reveal once known (tor's sr_commit_t).

    ``reveal`` is ``TIMESTAMP || SHA3(RN)`` (40 bytes); the commit is ``TIMESTAMP ||
    hashed_reveal`` with ``hashed_reveal = SHA3(base64(reveal))`` (tor hashes the padded
    base64 text, and so do we, whatever form our documents write it in).
    """

    identity: bytes  #: the authority's Ed25519 identity
    timestamp: int
    hashed_reveal: bytes
    reveal: bytes | None = None

    @classmethod
    def generate(cls, identity: bytes, timestamp: int, random32: bytes) -> Commit:
        """Our commit for the run whose first vote with it is at ``timestamp``
        (tor's sr_generate_our_commit; ``random32`` straight from the OS RNG: only its
        hash ever leaves us)."""
        if len(random32) != 32:
            raise ValueError("need 32 random bytes")
        reveal = timestamp.to_bytes(8, "big") + _sha3(random32)
        return cls(identity, timestamp, _sha3(_tor_b64(reveal).encode()), reveal)

    @property
    def commit_bytes(self) -> bytes:
        return self.timestamp.to_bytes(8, "big") + self.hashed_reveal

    @property
    def encoded_commit(self) -> str:
        """COMMIT as tor writes it (padded base64, 56 characters)."""
        return _tor_b64(self.commit_bytes)

    @property
    def encoded_reveal(self) -> str | None:
        """REVEAL as tor writes and hashes it (padded base64, 56 characters)."""
        return _tor_b64(self.reveal) if self.reveal is not None else None

    def matches(self) -> bool:
        """Does the reveal belong to the commitment (same timestamp, SHA3 of its text)?"""
        return (self.reveal is not None and int.from_bytes(self.reveal[:8], "big") == self.timestamp
                and _sha3(_tor_b64(self.reveal).encode()) == self.hashed_reveal)

    def same_commitment(self, other: Commit) -> bool:
        return self.commit_bytes == other.commit_bytes

    def without_reveal(self) -> Commit:
        return replace(self, reveal=None)

    def args(self, *, with_reveal: bool = True) -> str:
        """``VERSION ALG IDENTITY COMMIT [REVEAL]`` (our documents: unpadded base64)."""
        out = f"{SR_VERSION} {SR_ALGORITHM} {_b64(self.identity)} {_b64(self.commit_bytes)}"
        return out + (f" {_b64(self.reveal)}" if with_reveal and self.reveal is not None else "")

    @classmethod
    def parse(cls, args: str, what: str = "shared-rand-commit") -> Commit:
        parts = args.split(" ")
        if len(parts) not in (4, 5):
            raise ProtocolError(f"{what}: want 'VERSION ALG IDENTITY COMMIT [REVEAL]'")
        if parts[0] != str(SR_VERSION) or parts[1] != SR_ALGORITHM:
            raise ProtocolError(f"{what}: unsupported version or algorithm {parts[0]} {parts[1][:20]}")
        identity = _unb64(parts[2], 32, f"{what} identity")
        commit = _unb64(parts[3], _COMMIT_LEN, f"{what} commit")
        reveal = _unb64(parts[4], _REVEAL_LEN, f"{what} reveal") if len(parts) == 5 else None
        return cls(identity, int.from_bytes(commit[:8], "big"), commit[8:], reveal)


def compute_srv(reveals: Iterable[tuple[str, str, bytes]], previous: bytes | None) -> SharedRandomValue:
    """tor's sr_compute_srv over ``(ID, encoded REVEAL, hashed_reveal)`` triples, ordered by
    ``hashed_reveal`` as tor's compare_reveal_ orders them; ``previous`` None: 32 NUL bytes."""
    items = sorted(reveals, key=lambda r: r[2])
    hashed = _sha3("".join(ident + reveal for ident, reveal, _ in items).encode("ascii"))
    msg = (SRV_TOKEN + len(items).to_bytes(8, "big") + SR_VERSION.to_bytes(4, "big") + hashed
           + (previous if previous is not None else bytes(32)))
    return SharedRandomValue(_sha3(msg), len(items))


def srv_from_commits(commits: Iterable[Commit], previous: bytes | None) -> SharedRandomValue:
    """The SRV of a run from the commits whose reveals we verified (the rest are left out)."""
    return compute_srv(((c.identity.hex().upper(), c.encoded_reveal, c.hashed_reveal)
                        for c in commits if c.reveal is not None and c.matches()), previous)


def default_agreements(n_authorities: int) -> int:
    """tor's default AuthDirNumSRVAgreements: two thirds of the authorities, rounded down."""
    return n_authorities * 2 // 3


def consensus_srvs(votes: Iterable[tuple[bool, SharedRandomValue | None, SharedRandomValue | None]], *,
                   n_authorities: int, fresh: bool, agreements: int
                   ) -> tuple[SharedRandomValue | None, SharedRandomValue | None]:
    """(previous, current) for a consensus from the votes' ``(participates, previous,
    current)`` (tor's get_majority_srv_from_votes): the most popular value among the
    participating votes (a tie goes to the larger value), kept if more than half of all
    ``n_authorities`` voted for it and, in the first round of a run (``fresh``), at least
    ``agreements`` did."""
    votes = [v for v in votes if v[0]]

    def pick(which: int) -> SharedRandomValue | None:
        counts = Counter(v[which] for v in votes if v[which] is not None)
        if not counts:
            return None
        srv, n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if n < n_authorities // 2 + 1 or (fresh and n < agreements):
            return None
        return srv
    return pick(1), pick(2)


# -- the authority's state ---------------------------------------------------------------------
@dataclass
class Note:
    """Something the authority should log (this module does no logging)."""

    level: str  # "info" | "warning"
    message: str
    fields: dict = field(default_factory=dict)


@dataclass
class SRState:
    """One authority's view of the current protocol run (tor's sr_state / sr-state file).

    ``valid_after`` is the voting round the state is prepared for (:meth:`update`).
    """

    identity: bytes
    interval: int
    valid_after: int = 0
    commits: dict[bytes, Commit] = field(default_factory=dict)
    previous: SharedRandomValue | None = None
    current: SharedRandomValue | None = None
    #: valid-after of the run the commits belong to (0: none yet)
    run: int = 0

    @property
    def phase(self) -> Phase | None:
        return phase_at(self.valid_after, self.interval) if self.valid_after else None

    @property
    def our_commit(self) -> Commit | None:
        return self.commits.get(self.identity)

    def update(self, valid_after: int, random32: Callable[[], bytes] = lambda: os.urandom(32)) -> list[Note]:
        """Prepare for the round at ``valid_after`` (tor's sr_state_update): a new run starts
        with the SRVs rotated and the new one computed if we saw the last reveal phase, the
        commits wiped and our new commit; a commit phase without our commit (we just
        started) gets one. Nothing for a round not newer than the one prepared."""
        notes: list[Note] = []
        if valid_after <= self.valid_after:
            return notes
        start = run_start(valid_after, self.interval)
        phase = phase_at(valid_after, self.interval)
        if start != self.run:
            if self.run and self.valid_after and self.phase is Phase.REVEAL \
                    and start == self.run + PROTOCOL_ROUNDS * self.interval:
                # the reveal phase just ended: previous <- current, and the run's SRV
                previous_value = self.current.value if self.current is not None else None
                self.previous = self.current
                self.current = srv_from_commits(self.commits.values(), previous_value)
                notes.append(Note("info", "computed the shared random value of the run",
                                  {"num_reveals": self.current.num_reveals,
                                   "srv": _b64(self.current.value)}))
            elif self.run:
                # we missed the end of the last run: what we had is stale
                self.previous = self.current if start == self.run + PROTOCOL_ROUNDS * self.interval else None
                self.current = None
            self.commits = {}
            self.run = start
        if phase is Phase.COMMIT and self.identity not in self.commits:
            # never a second commit in a run: the commit is kept (and saved) until the run ends
            self.commits[self.identity] = Commit.generate(self.identity, valid_after, random32())
            notes.append(Note("info", "committed to a shared random value",
                              {"run": start, "timestamp": valid_after}))
        self.valid_after = valid_after
        return notes

    def vote_commits(self) -> tuple[Commit, ...]:
        """The commit lines of our vote: every commit we keep, with reveals in the reveal
        phase only (tor's get_vote_line_from_commit)."""
        reveal = self.phase is Phase.REVEAL
        return tuple(c if reveal else c.without_reveal() for _, c in sorted(self.commits.items()))

    def receive(self, voter: bytes, commits: Iterable[Commit], authorities: Iterable[bytes],
                valid_after: int) -> tuple[bool, list[Note]]:
        """Take what is useful from a verified vote by ``voter`` for the round at
        ``valid_after`` (tor's sr_handle_received_commits / should_keep_commit): its own
        commit, the first one of the run in the commit phase, its matching reveal in the
        reveal phase. Returns (state changed, notes)."""
        known = set(authorities)
        changed = False
        notes: list[Note] = []
        if valid_after != self.valid_after:
            return False, notes
        phase = self.phase
        for c in commits:
            if c.identity != voter:
                continue  # not authoritative: only an authority's own vote speaks for it
            if c.identity not in known:
                continue
            if run_start(c.timestamp, self.interval) != self.run:
                notes.append(Note("warning", "commit for another protocol run ignored",
                                  {"timestamp": c.timestamp}))
                continue
            saved = self.commits.get(c.identity)
            if phase is Phase.COMMIT:
                if saved is not None:
                    if not saved.same_commitment(c):
                        notes.append(Note("info", "altered commit in the commit phase ignored"))
                    continue
                if c.reveal is not None:
                    notes.append(Note("warning", "commit with a reveal in the commit phase ignored"))
                    continue
                self.commits[c.identity] = c
                changed = True
            else:
                if saved is None or saved.reveal is not None or c.reveal is None:
                    continue  # first seen in the reveal phase, known reveal, or no reveal yet
                if not saved.same_commitment(c):
                    notes.append(Note("warning", "commit differs from the one kept for this run; ignored"))
                    continue
                if not c.matches():
                    notes.append(Note("warning", "shared-random reveal does not match its commit; dropped"))
                    continue
                self.commits[c.identity] = c
                changed = True
        return changed, notes

    def adopt(self, previous: SharedRandomValue | None, current: SharedRandomValue | None) -> None:
        """The consensus decides which SRVs are in force (tor's sr_act_post_consensus)."""
        self.previous, self.current = previous, current

    # -- the sr-state file (tor's format, our encodings) --------------------------------
    def text(self) -> str:
        """tor's sr-state: Version, ValidAfter, ValidUntil (end of the run), Commit lines
        (our own with its reveal: keep the file secret), SRVs."""
        end = self.run + PROTOCOL_ROUNDS * self.interval
        out = [f"Version {SR_VERSION}", f"ValidAfter {format_time(self.valid_after)}", f"ValidUntil {format_time(end)}",
               f"Run {format_time(self.run)}", f"Interval {self.interval}"]
        out += [f"Commit {c.args()}" for _, c in sorted(self.commits.items())]
        if self.previous is not None:
            out.append(f"SharedRandPreviousValue {self.previous.args()}")
        if self.current is not None:
            out.append(f"SharedRandCurrentValue {self.current.args()}")
        return "\n".join(out) + "\n"

    @classmethod
    def parse(cls, text: str, identity: bytes, interval: int, now: float) -> SRState:
        """Read an sr-state file; ProtocolError if malformed, for another interval or
        expired (ValidUntil passed: the run is over)."""
        lines = text.split("\n")
        if not text.endswith("\n") or len(lines) > 200:
            raise ProtocolError("sr-state: malformed")
        kv = [ln.partition(" ")[::2] for ln in lines[:-1]]
        keys = [k for k, _ in kv]
        head = ["Version", "ValidAfter", "ValidUntil", "Run", "Interval"]
        if keys[:5] != head or kv[0][1] != str(SR_VERSION):
            raise ProtocolError("sr-state: bad header")
        va, until, run = (_parse_time(kv[i][1]) for i in (1, 2, 3))
        if kv[4][1] != str(interval):
            raise ProtocolError("sr-state: made for another voting interval")
        if until < now or not va < until or run != run_start(va, interval) \
                or until != run + PROTOCOL_ROUNDS * interval:
            raise ProtocolError("sr-state: expired or inconsistent times")
        state = cls(identity, interval, va, {}, None, None, run)
        for k, v in kv[5:]:
            if k == "Commit":
                c = Commit.parse(v, "sr-state Commit")
                if c.identity in state.commits or (c.reveal is not None and not c.matches()):
                    raise ProtocolError("sr-state: duplicate or inconsistent commit")
                state.commits[c.identity] = c
            elif k == "SharedRandPreviousValue" and state.previous is None and state.current is None:
                state.previous = SharedRandomValue.parse(v, "sr-state SharedRandPreviousValue")
            elif k == "SharedRandCurrentValue" and state.current is None:
                state.current = SharedRandomValue.parse(v, "sr-state SharedRandCurrentValue")
            else:
                raise ProtocolError(f"sr-state: unexpected {k[:30]!r}")
        return state


def _parse_time(s: str) -> int:
    try:
        return parse_time(s)
    except ProtocolError as exc:
        raise ProtocolError(f"sr-state: {exc}") from None

