"""A relay's directory duties in a *Tor* network (C tor directory authorities; specs/tor-interop.md).

Theory of operation
-------------------
:class:`TorRelayDirectory` stands where :class:`~onionp2p.dir.client.RelayDirectory` stands
for our own network (the relay calls ``start(relay)``, ``stop()``, ``keys_changed()``,
``params()``, ``routers()``), but speaks tor's formats:

* **Identity files.** At start it writes tor's ``fingerprint`` (``NICKNAME FINGERPRINT``)
  and ``fingerprint-ed25519`` (``NICKNAME BASE64-ED25519-ID``) files in the data directory,
  and loads or creates the legacy RSA-1024 TAP onion key (``keys/secret_onion_key``,
  PKCS#1 PEM, mode 0600): tor 0.4.9 authorities refuse a descriptor without one ("Missing
  TAP key in descriptor"), although no tor client uses TAP any more. We never answer a TAP
  handshake with it; it is rotated with the ntor key (same lifetime).
* **Publishing.** :func:`~onionp2p.proto.tordesc.build_server_descriptor` and
  :func:`~onionp2p.proto.tordesc.build_extra_info` make the two documents, which are POSTed
  together to ``/tor/`` on every authority's DirPort, as tor does. On tor's schedule: once
  the ORPort self-test succeeded (at once with ``assume_reachable``); again whenever
  the keys change (onion-key rotation, renewed certificates); at least every
  ``publish_interval`` (tor's FORCE_REGENERATE_DESCRIPTOR_INTERVAL, 18 h); and, checked
  every ``check_interval`` (tor's CHECK_DESCRIPTOR_INTERVAL, 60 s), when the consensus
  does not list our current descriptor although the authorities have had it for
  ``fast_retry_interval`` (tor's FAST_RETRY_DESCRIPTOR_INTERVAL, 90 min: an authority may
  have lost it). An authority answering anything but 200 gets the upload again after 1,
  2, 4 ... 60 s (the reason tor's authority puts in the status line is logged).
* **The network.** A :class:`~onionp2p.dir.tordir.TorNetwork` (``cache=True``) fetches the
  microdescriptor consensus and microdescriptors from the authorities on a directory
  cache's schedule; its relays are ``routers()`` (EXTEND2 towards tor relays, the exit's
  "unknown relay" check, the self-test's first hops) and its ``params`` are the relay's
  consensus parameters (congestion control).
* **Directory cache (``dir_cache``).** Tor clients fetch their directory from their
  guards over BEGIN_DIR, and authorities give Guard only to relays that serve it; so the
  relay serves BEGIN_DIR (``tunnelled-dir-server``) from a 127.0.0.1 HTTP server that
  answers GETs under ``/tor/`` by fetching the same path from an authority (tor serves
  them from its own cache; clients verify what they get either way).
* **Self-test.** The same :class:`~onionp2p.dir.selftest.ReachabilityTest` as in our own
  network, with tor relays as first hops.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import platform
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from onionp2p import __version__
from onionp2p.dir.client import HS_DESC_MAX_BODY, atomic_write
from onionp2p.dir.selftest import ReachabilityTest
from onionp2p.dir.server import DirRequestError, DirServer, HttpRequest, HttpResponse, fetch
from onionp2p.dir.tordir import TorDirAuthority, TorNetwork, parse_dirauth_line
from onionp2p.errors import OnionError, ProtocolError
from onionp2p.log import get_logger
from onionp2p.proto.directory import RouterStatus
from onionp2p.proto.tordesc import MAX_DESCRIPTOR, build_extra_info, build_server_descriptor

__all__ = ["TAP_KEY_FILE", "TorRelayDirectory"]

log = get_logger("onionp2p.torrelay")

TAP_KEY_FILE = "secret_onion_key"
#: tor's FORCE_REGENERATE_DESCRIPTOR_INTERVAL
PUBLISH_INTERVAL = 18 * 3600.0
#: tor's CHECK_DESCRIPTOR_INTERVAL
CHECK_INTERVAL = 60.0
#: tor's FAST_RETRY_DESCRIPTOR_INTERVAL
FAST_RETRY_INTERVAL = 90 * 60.0
#: largest directory response proxied to a BEGIN_DIR client
MAX_PROXIED = 16 << 20
#: seconds per bandwidth observation (tor's rephist: 10-second sums)
BW_SAMPLE = 10.0


def _platform() -> str:
    return f"onionp2p {__version__} on {platform.system() or 'unknown'}"


class TorRelayDirectory:
    """A relay's publishing, consensus and directory-cache duties in a Tor network."""

    def __init__(self, data_dir: Path | str, dirauth_lines: Sequence[str], *,
                 bandwidth: tuple[int, int] = (1 << 30, 1 << 30), family: Sequence[str] = (),
                 contact: str | None = None, dir_cache: bool = True,
                 publish_interval: float = PUBLISH_INTERVAL, check_interval: float = CHECK_INTERVAL,
                 fast_retry_interval: float = FAST_RETRY_INTERVAL, timeout: float = 30.0,
                 now: Callable[[], float] = time.time):
        self.data_dir = Path(data_dir)
        self.authorities: list[TorDirAuthority] = [parse_dirauth_line(ln) for ln in dirauth_lines]
        self.bandwidth = bandwidth
        self.family = tuple(family)
        self.contact = contact
        self.dir_cache = dir_cache
        self.publish_interval = publish_interval
        self.check_interval = check_interval
        self.fast_retry_interval = fast_retry_interval
        self.timeout = timeout
        self.now = now
        self.network = TorNetwork(dirauth_lines, cache=True, timeout=timeout, name="relay")
        self.relay = None
        # POSTs are onion-service descriptors for the relay's HSDir role (tor's 50000 bytes at most)
        self.server = DirServer(self._handle, "127.0.0.1", 0, max_body=HS_DESC_MAX_BODY, name="tor dir cache",
                                kind="directory cache port") if dir_cache else None
        self.descriptor: str | None = None
        self.extra_info: str | None = None
        self.published = 0
        #: authority v3ident -> the descriptor text it last accepted
        self.uploaded: dict[bytes, str] = {}
        self.uploads = 0  # accepted uploads (all authorities, all descriptors)
        self.tap_key: rsa.RSAPrivateKey | None = None
        self.bootstrap_progress = None
        self._started_at = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._dirty: asyncio.Event | None = None
        self._reachable: asyncio.Event | None = None
        self._bw_max = (0, 0)  # largest 10-second read and write rates seen (bytes/s)
        self._log = log

    # -- what the relay asks ---------------------------------------------------------------
    def routers(self) -> list[RouterStatus]:
        return self.network.routers()

    def params(self) -> dict[str, int]:
        return self.network.params()

    def keys_changed(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, relay) -> None:
        self.relay = relay
        self._log = log.bind(nickname=relay.nickname)
        self._started_at = self.now()
        self._dirty = asyncio.Event()
        self._dirty.set()
        self._reachable = asyncio.Event()
        if relay.orport_reachable:
            self._reachable.set()
        relay.reachability.add(self._on_reachability)
        self.bootstrap_progress = relay.bootstrap_progress
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write_fingerprints()
        self.tap_key = self._load_tap_key()
        if self.server is not None:
            await self.server.start()
            relay.exit.dir_port = self.server.port
        tried = asyncio.Event()
        self.selftest = ReachabilityTest(relay, self.routers, tried)
        self._spawn(self._first_consensus(tried))
        self._spawn(self._publish_loop())
        self._spawn(self._bandwidth_loop())
        self._spawn(self.selftest.run())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.relay is not None:
            self.relay.reachability.remove(self._on_reachability)
            if self.server is not None:
                self.relay.exit.dir_port = None
        if self.server is not None:
            await self.server.stop()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_reachability(self, action: str, _severity: str, _where: str) -> None:
        if action == "REACHABILITY_SUCCEEDED" and self._reachable is not None:
            self._reachable.set()

    # -- files -----------------------------------------------------------------------------
    def _write_fingerprints(self) -> None:
        """tor's ``fingerprint`` and ``fingerprint-ed25519`` files."""
        keys = self.relay.keys
        nick = self.relay.nickname
        ed = base64.b64encode(bytes(keys.identity_public)).decode().rstrip("=")
        atomic_write(self.data_dir / "fingerprint", f"{nick} {keys.fingerprint}\n".encode(), 0o644)
        atomic_write(self.data_dir / "fingerprint-ed25519", f"{nick} {ed}\n".encode(), 0o644)

    def _load_tap_key(self) -> rsa.RSAPrivateKey:
        """The legacy TAP onion key: loaded, or created (RSA-1024, e = 65537) on first start
        and when it is older than the ntor key's lifetime."""
        path = Path(self.relay.keys.keys_dir) / TAP_KEY_FILE
        lifetime = self.relay.keys.onion_key_lifetime
        if self.tap_key is not None and path.exists() and self.now() - path.stat().st_mtime < lifetime:
            return self.tap_key
        try:
            if self.now() - path.stat().st_mtime < lifetime:
                key = serialization.load_pem_private_key(path.read_bytes(), None)
                if isinstance(key, rsa.RSAPrivateKey) and key.key_size == 1024:
                    return key
                self._log.warning("TAP onion key file is not an RSA-1024 key; making a new one", path=str(path))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            self._log.warning("cannot read the TAP onion key; making a new one", path=str(path), error=str(exc))
        key = rsa.generate_private_key(65537, 1024)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption()))
        return key

    # -- the consensus -----------------------------------------------------------------------
    async def _first_consensus(self, tried: asyncio.Event) -> None:
        try:
            await self.network.refresh()
        except (OnionError, OSError, TimeoutError) as exc:
            self._log.info("no tor consensus yet", error=str(exc))
        finally:
            tried.set()  # the self-test may start, with or without other relays
        await self.network.run()

    # -- bandwidth -------------------------------------------------------------------------
    async def _bandwidth_loop(self) -> None:
        """Observed bandwidth as tor's rephist: the larger of the 10-second rates, read and
        write separately; the descriptor publishes the smaller of the two maxima."""
        last = self.relay.traffic()
        while True:
            await asyncio.sleep(BW_SAMPLE)
            cur = self.relay.traffic()
            rates = ((cur[0] - last[0]) / BW_SAMPLE, (cur[1] - last[1]) / BW_SAMPLE)
            last = cur
            self._bw_max = (max(self._bw_max[0], int(rates[0])), max(self._bw_max[1], int(rates[1])))

    @property
    def observed_bandwidth(self) -> int:
        return min(self._bw_max)

    # -- publishing ------------------------------------------------------------------------
    def make_documents(self) -> tuple[str, str]:
        """A fresh (descriptor, extra-info) pair."""
        relay = self.relay
        self.tap_key = self._load_tap_key()  # renewed with the ntor key's lifetime
        published = max(int(self.now()), self.published + 1)
        ei = build_extra_info(relay.keys, nickname=relay.nickname, published=published)
        rate, burst = self.bandwidth
        desc = build_server_descriptor(
            relay.keys, nickname=relay.nickname, address=relay.address, or_port=relay.advertised_port,
            published=published, uptime=int(self.now() - self._started_at),
            bandwidth=(rate, burst, min(self.observed_bandwidth, rate)), platform=_platform(),
            protocols=relay.protocols, exit_policy=relay.exit_policy, extra_info=ei, tap_key=self.tap_key,
            family=self.family, contact=self.contact, dir_cache=self.dir_cache)
        self.published = published
        return desc, ei.text

    async def _upload(self, auth: TorDirAuthority, desc: str, extra: str) -> bool:
        try:
            await fetch(auth.address, auth.dir_port, "/tor/", (desc + extra).encode(), max_size=4096,
                        timeout=self.timeout)
        except (OnionError, OSError, TimeoutError) as exc:
            # at warning, as tor's: a relay whose descriptor is not uploaded is not in the consensus
            self._log.warning("descriptor upload failed", authority=auth.nickname, error=str(exc))
            return False
        # tor's authority answers 200 also when it could not parse or check the descriptor
        # ("No descriptors found in your POST"): ask for it by digest to know it was kept
        digest = hashlib.sha1(desc.encode()[:desc.encode().index(b"\nrouter-signature\n") + 18]).hexdigest()
        try:
            await fetch(auth.address, auth.dir_port, f"/tor/server/d/{digest}", max_size=MAX_DESCRIPTOR,
                        timeout=self.timeout)
        except (OnionError, OSError, TimeoutError) as exc:
            self._log.warning("descriptor upload failed: the authority answered 200 but does not serve it "
                              "(it refused it; its log says why)", authority=auth.nickname, error=str(exc))
            return False
        self.uploaded[auth.v3ident] = desc
        self.uploads += 1
        return True

    def _listed_current(self) -> bool:
        """Does the consensus list a descriptor of ours at least as new as the current one?
        (microdesc consensus entries carry no descriptor digest; their publication time is
        not parsed, so: are we listed at all.)"""
        me = self.relay.keys.rsa_id_digest
        return any(r.info.rsa_id == me for r in self.routers())

    async def _publish_loop(self) -> None:
        assert self._dirty is not None and self._reachable is not None
        if not self.relay.config.assume_reachable:
            await self._reachable.wait()  # as tor: no descriptor before our ORPort is confirmed
        backoff = 1.0
        next_periodic = 0.0
        while True:
            now = self.now()
            stale = (self.descriptor is not None and now - self.published >= self.fast_retry_interval
                     and self.network.view is not None and not self._listed_current())
            if self._dirty.is_set() or now >= next_periodic or stale:
                self._dirty.clear()
                try:
                    self.descriptor, self.extra_info = self.make_documents()
                except (ProtocolError, OnionError) as exc:
                    self._log.error("cannot make a descriptor; not publishing", error=str(exc))
                    return
                next_periodic = now + self.publish_interval
                backoff = 1.0
            desc, extra = self.descriptor, self.extra_info
            todo = [a for a in self.authorities if self.uploaded.get(a.v3ident) != desc]
            if todo:
                await asyncio.gather(*(self._upload(a, desc, extra) for a in todo))
                if all(self.uploaded.get(a.v3ident) == desc for a in self.authorities):
                    self._log.info("descriptor published", authorities=len(self.authorities))
            pending = any(self.uploaded.get(a.v3ident) != desc for a in self.authorities)
            wait = backoff if pending else min(self.check_interval, max(0.0, next_periodic - self.now()))
            if pending:
                backoff = min(backoff * 2, 60.0)
            try:
                await asyncio.wait_for(self._dirty.wait(), wait)
            except TimeoutError:
                pass

    # -- directory cache (BEGIN_DIR) ---------------------------------------------------------
    async def _handle(self, req: HttpRequest) -> HttpResponse:
        hsdir = getattr(self.relay, "hsdir", None)  # the relay's HSDir role, as in our own network
        if hsdir is not None and req.path.startswith("/tor/hs/"):
            answer = hsdir.http(req.method, req.path, req.body, self.params())
            if answer is not None:
                return HttpResponse(answer[0], answer[1])
        if req.method != "GET" or not req.path.startswith("/tor/"):
            return HttpResponse(404, b"not found\n")
        # a ".z" path asks for a deflated body; we answer uncompressed (and say nothing,
        # which tor reads as identity), so the authority is asked for the plain document
        path = req.path.removesuffix(".z")
        auths = random.sample(self.authorities, len(self.authorities))
        for auth in auths:
            try:
                body = await fetch(auth.address, auth.dir_port, path, max_size=MAX_PROXIED,
                                   timeout=self.timeout)
            except DirRequestError as exc:
                if exc.status is not None and exc.status < 500:
                    return HttpResponse(exc.status, b"")
                continue
            except (OnionError, OSError, TimeoutError):
                continue
            return HttpResponse(200, body)
        return HttpResponse(503, b"directory busy\n")
