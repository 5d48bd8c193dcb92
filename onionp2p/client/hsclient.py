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
(routers, ``valid_after``, ``srv_current``, ``srv_previous``), ``pick_path(last)`` a
circuit path ending at ``last`` (None: the path picker chooses the last hop, for the
rendezvous point), ``http_get(reader, writer, path)`` one HTTP/1.0 GET over a stream.

Failures raise :class:`HsConnectError`, whose ``kind`` maps to tor's extended SOCKS reply
(:data:`onionp2p.proto.hs.client.SOCKS_REPLY`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from onionp2p.client.client import ClientCircuit, OnionClient
from onionp2p.errors import CircuitError, HsClientAuthError, HsDescriptorError, OnionError, StreamError
from onionp2p.log import get_logger
from onionp2p.proto.directory import RelayInfo
from onionp2p.proto.hs.address import parse_onion_address
from onionp2p.proto.hs.cells import EstablishRendezvous, IntroAckStatus, IntroduceAck
from onionp2p.proto.hs.client import FetchPlan, fetch_plan, make_introduce1
from onionp2p.proto.hs.desc import HsDescriptor, IntroPoint, parse_descriptor
from onionp2p.proto.hs.ntor import expand_circuit_keys
from onionp2p.proto.relaycell import EndReason, LinkSpec, LinkSpecType, RelayCommand

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


class OnionServiceClient:
    """Opens streams to onion services over ``client``'s circuits (see the module docstring)."""

    def __init__(self, client: OnionClient, *, directory: Callable[[], Any],
                 pick_path: Callable[[RelayInfo | None], Sequence[RelayInfo]],
                 http_get: Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[bytes]],
                 client_keys: Callable[[bytes], Any] | None = None,
                 on_circuit: Callable[[ClientCircuit, str], None] | None = None,
                 testing_tor_network: bool = False) -> None:
        self.client = client
        self.directory = directory
        self.pick_path = pick_path
        self.http_get = http_get
        self.client_keys = client_keys or (lambda identity: None)
        #: told of each circuit this makes and its purpose (HS_CLIENT_HSDIR, HS_CLIENT_INTRO,
        #: HS_CLIENT_REND), for `circuits` and CIRC events
        self.on_circuit = on_circuit or (lambda circ, purpose: None)
        #: tor's TestingTorNetwork: time periods as long as one shared-random protocol run
        #: (24 voting intervals; hs_common.c get_time_period_length), not a day
        self.testing_tor_network = testing_tor_network

    async def _circuit(self, last: RelayInfo | None, purpose: str) -> ClientCircuit:
        circ = await self.client.build_circuit(list(self.pick_path(last)), timeout=STEP_TIMEOUT)
        circ.purpose = purpose  # type: ignore[attr-defined]
        self.on_circuit(circ, purpose)
        return circ

    def plan(self, identity: bytes) -> FetchPlan:
        view = self.directory()
        hsdirs = [r.info.ed_id for r in view.routers if "HSDir" in r.flags and r.info.ed_id]
        # tor's voting interval is the current consensus's (fresh-until - valid-after): it
        # sets the time periods' rotation offset and the SRV schedule
        interval = view.fresh_until - view.valid_after if view.fresh_until > view.valid_after else 3600
        if self.testing_tor_network:
            length = 24 * interval // 60
        else:  # the consensus parameter hsdir-interval (minutes), 30..14400, default a day
            length = min(max(int(getattr(view, "params", {}).get("hsdir-interval", 1440)), 30), 14400)
        plan = fetch_plan(identity, hsdirs, valid_after=view.valid_after, srv_current=view.srv_current,
                          srv_previous=view.srv_previous, voting_interval=interval, period_length=length)
        log.debug("onion service fetch plan", period=plan.choice.period.number, srv=plan.srv_source,
                  hsdirs=len(plan.hsdirs))
        return plan

    async def fetch_descriptor(self, identity: bytes) -> tuple[FetchPlan, HsDescriptor]:
        """The decrypted descriptor, from the first responsible HSDir that has it."""
        plan = self.plan(identity)
        by_ed = {r.info.ed_id: r.info for r in self.directory().routers}
        path = "/tor/hs/3/" + base64.b64encode(plan.blinded_key).decode().rstrip("=")  # as tor sends it
        last: Exception | None = None
        for ed in plan.hsdirs:
            circ = None
            try:
                circ = await self._circuit(by_ed[ed], "HS_CLIENT_HSDIR")
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

    @staticmethod
    def client_now() -> float:
        """The clock descriptors are checked against (certificates' expiry)."""
        return time.time()

    async def connect(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to ``port`` of the onion service ``host``. Raises HsConnectError (or
        OnionAddressError for a bad name)."""
        identity = parse_onion_address(host).pubkey
        plan, desc = await self.fetch_descriptor(identity)
        if not desc.intro_points:
            raise HsConnectError("descriptor lists no introduction points", "intro_failed")
        rend = None
        try:
            try:
                rend = await self._circuit(None, "HS_CLIENT_REND")
                rp = rend.path[-1]
                rend_in = _Inbox(rend)
                cookie = os.urandom(20)
                rend.send_relay(RelayCommand.ESTABLISH_RENDEZVOUS, 0, EstablishRendezvous(cookie).encode())
                await rend_in.expect(RelayCommand.RENDEZVOUS_ESTABLISHED, STEP_TIMEOUT)
            except (OnionError, TimeoutError) as exc:
                raise HsConnectError(f"rendezvous circuit failed: {exc}", "rend_failed") from exc
            points = list(desc.intro_points)
            random.SystemRandom().shuffle(points)
            for ip in points:
                if await self._introduce(ip, plan, cookie, rend, rp):
                    break
            else:
                raise HsConnectError(f"all {len(points)} introduction points failed", "intro_failed")
            try:
                await rend_in.expect(RelayCommand.RENDEZVOUS2, STEP_TIMEOUT)
            except (OnionError, TimeoutError) as exc:
                raise HsConnectError(f"no rendezvous: {exc}", "rend_failed") from exc
            # the end-to-end layer is there (the core added it with RENDEZVOUS2); BEGIN with
            # an empty address, as tor (connection_ap_handshake_send_begin)
            try:
                return await rend.open_stream("", port, timeout=STEP_TIMEOUT)
            except (OnionError, TimeoutError) as exc:
                raise HsConnectError(f"the service refused the stream: {exc}", "rend_failed") from exc
        except BaseException:
            if rend is not None:
                rend.close()
            raise

    async def _introduce(self, ip: IntroPoint, plan: FetchPlan, cookie: bytes, rend: ClientCircuit,
                         rp: RelayInfo) -> bool:
        """INTRODUCE1 through ``ip``; True when it acked (the rendezvous circuit is then armed)."""
        circ = None
        try:
            body, hs = make_introduce1(ip, plan.subcred, cookie, _link_specs(rp), rp.ntor_key)
            rend.expect_rendezvous(lambda info: expand_circuit_keys(hs.complete(info)).key_material())
            circ = await self._circuit(intro_relay(ip), "HS_CLIENT_INTRO")
            inbox = _Inbox(circ)
            circ.send_relay(RelayCommand.INTRODUCE1, 0, body)
            ack = IntroduceAck.parse(await inbox.expect(RelayCommand.INTRODUCE_ACK, STEP_TIMEOUT))
        except (OnionError, TimeoutError) as exc:  # (HandshakeError, ProtocolError are OnionErrors)
            log.info("introduction failed", error=str(exc))
            return False
        finally:
            if circ is not None:
                circ.close()
        if ack.status != IntroAckStatus.SUCCESS:
            log.info("introduction refused", status=int(ack.status))
            return False
        return True
