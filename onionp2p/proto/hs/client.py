"""The client side of onion services, the parts that need no I/O (rend-spec-v3 §2.2, §3.3).

Theory of operation
-------------------
To reach ``<key>.onion`` a client

1. works out *where the descriptor is* (:func:`fetch_plan`): the current time period and
   the shared-random value that goes with it (from the consensus's ``valid-after``,
   :func:`~onionp2p.proto.hs.ring.client_fetch_choice`), the blinded key ``A'`` and the
   subcredential, and the HSDirs responsible for ``A'`` (the first ``hsdir_spread_fetch``
   relays after each replica's ring position). tor fetches from one of them picked at
   random, trying the others on failure; the plan gives them in such a random order.
   A consensus without the shared-random value needed (our authorities do not run the
   protocol yet) gets tor's rule: the *disaster SRV* of the period it is used with, for
   fetching always the current period (nodelist.c ``node_set_hsdir_index`` passes the
   fetch period to ``hs_get_current_srv`` / ``hs_get_previous_srv``), and the plan says
   so (``srv_source`` "disaster");
2. fetches ``GET /tor/hs/3/<base64 A'>`` over a BEGIN_DIR stream to one of them and
   decrypts it (:func:`onionp2p.proto.hs.desc.parse_descriptor`);
3. opens a rendezvous circuit (ESTABLISH_RENDEZVOUS with a fresh cookie) and an
   introduction circuit to one intro point, and sends INTRODUCE1 (:func:`make_introduce1`):
   the hs-ntor encrypted section carries the cookie and where the rendezvous point is
   (its link specifiers and ntor key), padded as tor pads it;
4. on RENDEZVOUS2 completes hs-ntor, adds the end-to-end layer (the circuit core's
   ``expect_rendezvous``) and opens streams with BEGIN to an empty address and the port.

Failures map to tor's extended SOCKS replies (proposal 304), :data:`SOCKS_REPLY`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from onionp2p.proto.hs.blinding import DEFAULT_PERIOD_LENGTH, blind_public_key, disaster_srv, subcredential
from onionp2p.proto.hs.cells import INTRODUCE1_MIN_SIZE, Introduce1, IntroducePlaintext
from onionp2p.proto.hs.desc import IntroPoint
from onionp2p.proto.hs.ntor import HsNtorClient
from onionp2p.proto.hs.ring import (
    DEFAULT_N_REPLICAS,
    DEFAULT_SPREAD_FETCH,
    RingChoice,
    client_fetch_choice,
    responsible_hsdirs,
)
from onionp2p.proto.relaycell import LinkSpec
from onionp2p.proto.socks import Reply

__all__ = ["FetchPlan", "SOCKS_REPLY", "fetch_plan", "make_introduce1"]

#: what went wrong -> tor's extended SOCKS5 reply (proposal 304; ExtendedErrors)
SOCKS_REPLY = {
    "desc_not_found": Reply.HS_DESC_NOT_FOUND,  # no HSDir had it (or none answered)
    "desc_invalid": Reply.HS_DESC_INVALID,  # fetched, but it does not parse or verify
    "intro_failed": Reply.HS_INTRO_FAILED,  # every intro point refused or failed
    "rend_failed": Reply.HS_REND_FAILED,  # the rendezvous circuit failed or RENDEZVOUS2 was bad
    "missing_client_auth": Reply.HS_MISSING_CLIENT_AUTH,  # needs a key we do not have
    "bad_client_auth": Reply.HS_BAD_CLIENT_AUTH,  # our key is not accepted
    "bad_address": Reply.HS_BAD_ADDRESS,
    "intro_timedout": Reply.HS_INTRO_TIMEDOUT,
}


@dataclass(frozen=True)
class FetchPlan:
    """Where one onion service's descriptor is to be fetched, for one consensus."""

    identity: bytes
    choice: RingChoice
    blinded_key: bytes
    subcred: bytes = field(repr=False)
    hsdirs: tuple[bytes, ...]  # Ed25519 identities, in the order to try them
    srv_source: str  # "consensus" | "disaster"


def fetch_plan(identity: bytes, hsdir_ids: list[bytes], *, valid_after: float, srv_current: bytes | None,
               srv_previous: bytes | None, voting_interval: int = 3600,
               period_length: int = DEFAULT_PERIOD_LENGTH, n_replicas: int = DEFAULT_N_REPLICAS,
               spread_fetch: int = DEFAULT_SPREAD_FETCH, rng: random.Random | None = None) -> FetchPlan:
    """The period, SRV, blinded key, subcredential and HSDirs for fetching ``identity``'s
    descriptor, from the consensus's ``valid-after``, its SRVs (None: absent) and the
    Ed25519 identities of its relays with the HSDir flag."""
    # the period alone first: a missing SRV is replaced by the disaster SRV of the period it is
    # used with, which for fetching is always the current one (tor's node_set_hsdir_index
    # passes fetch_tp to hs_get_current_srv / hs_get_previous_srv alike)
    period = client_fetch_choice(valid_after, bytes(32), bytes(32), voting_interval=voting_interval,
                                 length=period_length).period
    disaster = disaster_srv(period)
    cur = srv_current if srv_current is not None else disaster
    prev = srv_previous if srv_previous is not None else disaster
    choice = client_fetch_choice(valid_after, cur, prev, voting_interval=voting_interval,
                                 length=period_length)
    source = "disaster" if choice.srv is disaster else "consensus"
    blinded = blind_public_key(identity, choice.period)
    dirs = responsible_hsdirs(hsdir_ids, blinded, choice.period, choice.srv, n_replicas=n_replicas,
                              spread=spread_fetch)
    (rng or random.SystemRandom()).shuffle(dirs)
    return FetchPlan(identity, choice, blinded, subcredential(identity, blinded), tuple(dirs), source)


def make_introduce1(intro: IntroPoint, subcred: bytes, cookie: bytes, rend_specs: tuple[LinkSpec, ...],
                    rend_onion_key: bytes) -> tuple[bytes, HsNtorClient]:
    """INTRODUCE1 for ``intro`` asking the service to meet us at the rendezvous point given
    by ``rend_specs`` and its ntor key ``rend_onion_key`` under ``cookie``; returns the cell
    body and the hs-ntor state that reads RENDEZVOUS2."""
    header = Introduce1(intro.auth_key, b"").encode()  # everything before the encrypted section
    plain = IntroducePlaintext(cookie, rend_onion_key, tuple(rend_specs))
    padded = plain.encode(INTRODUCE1_MIN_SIZE - len(header))
    hs = HsNtorClient(intro.enc_key, intro.auth_key, subcred)
    return Introduce1(intro.auth_key, hs.encrypt_intro(header, padded)).encode(), hs
