"""The relay's ORPort reachability self-test (tor's selftest.c; specs/directory.md §"Self-test").

Theory of operation
-------------------
A relay cannot see from the inside whether the address and port it publishes lead to it:
a NAT, a firewall or a wrong ``address`` only show from the outside. As tor does, the relay
builds circuits that *end at itself*: another relay of the consensus extends to our
published ``address:port`` (the descriptor's), and when that CREATE2 arrives on a connection
we did not open, from a peer that says (NETINFO) it connected to our published address,
the relay knows it is reachable (:meth:`onionp2p.relay.relay.Relay._maybe_reachable` notices
it, logs tor's "Self-testing indicates your ORPort ... is reachable from the outside.
Excellent." and sets ``orport_reachable``). :class:`ReachabilityTest` only launches those
circuits:

* after the relay's first consensus download attempt (it needs other relays to go through);
* through one random Running relay of the consensus other than us, then us (tor uses a
  guard and a middle: with the few relays of a small network one hop before us is what
  works). With no other relay known (the first relay of a new network, or no consensus
  yet) the circuit is one hop, from this host straight to the published address: weaker
  (it is not "the outside"), but a wrong port or address still fails it;
* every ``min(60 s, reachability_timeout / 4)`` until the ORPort is found reachable
  (tor: every 60 s in the first 20 minutes), and at once when other relays appear while the
  last test was a one-hop one (tor tests again when new directory information arrives; a
  relay behind a NAT usually cannot reach its own public address, so that test hangs); each
  circuit gets that long to build and is closed once built;
* while the ORPort is unconfirmed, ``reachability_timeout`` seconds after start (tor: 20
  minutes) and as often again, tor's warning "Your server has not managed to confirm
  reachability for its ORPort(s) at ADDR:PORT. ..." is logged and REACHABILITY_FAILED is
  passed to the relay's reachability listeners (STATUS_SERVER on the control port); not
  with ``assume_reachable`` (tor's AssumeReachable), where the descriptor is out anyway.

The test circuits are built by an :class:`~onionp2p.client.client.OnionClient` of their own
(closed afterwards), whose progress counts for the relay's bootstrap (tor's ``ap_conn`` ...
``circuit_create``); the relay is bootstrapped (100%, ``done``) when a test circuit is built.
Descriptor publication waits for the result unless ``assume_reachable`` (the caller,
:class:`~onionp2p.dir.client.RelayDirectory`, decides).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence

from onionp2p.client.client import OnionClient
from onionp2p.errors import OnionError
from onionp2p.log import get_logger, notice
from onionp2p.proto.directory import RouterStatus

__all__ = ["ReachabilityTest", "EARLY_CHECK_REACHABILITY_INTERVAL"]

log = get_logger("onionp2p.selftest")

#: seconds between test circuits (tor's EARLY_CHECK_REACHABILITY_INTERVAL)
EARLY_CHECK_REACHABILITY_INTERVAL = 60.0


class ReachabilityTest:
    """Test circuits to ``relay``'s own ORPort; ``routers()`` is its consensus, ``consensus_tried``
    is set once it has tried to fetch one. ``await run()`` until cancelled or reachable."""

    def __init__(self, relay, routers: Callable[[], Sequence[RouterStatus]], consensus_tried: asyncio.Event):
        self.relay = relay
        self.routers = routers
        self.consensus_tried = consensus_tried
        timeout = relay.config.reachability_timeout
        self.interval = min(EARLY_CHECK_REACHABILITY_INTERVAL, timeout / 4)
        self.circuits_tried = 0
        self._log = log.bind(nickname=relay.nickname)

    def others(self) -> list:
        """Running relays of our consensus other than us (first hops for a test circuit)."""
        keys = self.relay.keys
        return [r.info for r in self.routers() if "Running" in r.flags
                and r.info.rsa_id != keys.rsa_id_digest and r.info.ed_id != keys.identity_public]

    def path(self, others: Sequence) -> list:
        """One random relay of ``others``, then us; just us if there is none."""
        me = self.relay.info()
        return [random.choice(others), me] if others else [me]

    async def run(self) -> None:
        relay = self.relay
        loop = asyncio.get_running_loop()
        warn_at = loop.time() + relay.config.reachability_timeout
        client = OnionClient(congestion_control=False)
        relay.bootstrap_progress.follow(client)
        tests: set[asyncio.Task] = set()
        try:
            try:
                await asyncio.wait_for(self.consensus_tried.wait(), self.interval)
            except TimeoutError:
                pass
            where = relay.or_address_text
            t = relay.config.reachability_timeout
            up_to = f"{t // 60} minutes" if t >= 60 else f"{t} seconds"
            notice("onionp2p.selftest", f"Now checking whether IPv4 ORPort {where} is reachable... (this may "
                   f"take up to {up_to} -- look for log messages indicating success)", nickname=relay.nickname)
            relay.reachability("CHECKING_REACHABILITY", "NOTICE", where)
            launched_at, one_hop = -self.interval, False
            while not relay.orport_reachable:
                now = loop.time()
                others = self.others()
                # a new test every interval, and at once when other relays appear while the
                # last one was a one-hop test (as tor re-tests when directory info arrives):
                # from inside a NAT, a connection to our own public address often goes nowhere
                if now - launched_at >= self.interval or (one_hop and others):
                    path = self.path(others)
                    launched_at, one_hop = now, len(path) == 1
                    task = loop.create_task(self._test_circuit(client, path))
                    tests.add(task)
                    task.add_done_callback(tests.discard)
                if now >= warn_at:
                    warn_at += relay.config.reachability_timeout
                    self._warn()
                await asyncio.sleep(min(0.25, self.interval))
            # the circuit whose CREATE2 proved it is about to be built: our bootstrap's "done"
            end = loop.time() + self.interval
            while tests and not relay.bootstrap_progress.done and loop.time() < end:
                await asyncio.sleep(0.05)
        finally:
            pending = list(tests)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await client.close()

    async def _test_circuit(self, client: OnionClient, path: Sequence) -> None:
        self.circuits_tried += 1
        self._log.info("testing reachability of my ORPort", via=[h.nickname for h in path[:-1]],
                       or_port=self.relay.or_address_text)
        try:
            circ = await client.build_circuit(path, timeout=self.interval)
        except (OnionError, OSError, TimeoutError) as exc:
            self._log.info("reachability test circuit failed", error=str(exc) or type(exc).__name__)
            return
        self.relay.bootstrap_progress.report("done")
        circ.close()

    def _warn(self) -> None:
        if self.relay.config.assume_reachable:
            return  # as tor with AssumeReachable: we publish anyway, nothing to warn about
        where = self.relay.or_address_text
        self._log.warning(f"Your server has not managed to confirm reachability for its ORPort(s) at "
                          f"{where}. Relays do not publish descriptors until their ORPort and DirPort are "
                          "reachable. Please check your firewalls, ports, address, /etc/hosts file, etc.")
        self.relay.reachability("REACHABILITY_FAILED", "WARN", where)
