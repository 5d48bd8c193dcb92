"""Control ports of real `onionp2p relay` and `onionp2p authority` processes, driven by stem.

Every node here is a child process started from a TOML config with ``control_port = 0``
(and ``metrics_port = 0``); the ports are read from the lines the process prints. A client
in this process builds real 3-hop circuits through the relays; stem (a controller written
for tor) talks to the relays' control ports with cookie authentication.
"""

from __future__ import annotations

import asyncio
import re
import signal
import stat
import time

import pytest
from conftest import close_controller, http_get

from onionp2p.client.client import OnionClient

pytestmark = pytest.mark.slow


def stem_controller(port: int):
    from stem.control import Controller

    controller = Controller.from_port(address="127.0.0.1", port=port)
    controller.authenticate()  # cookie: stem reads COOKIEFILE from PROTOCOLINFO
    # ask the node every time: stem's cache is updated by events its event thread handles
    # after a command's reply, so a GETCONF right after SIGNAL RELOAD could be answered stale
    controller.set_caching(False)
    return controller


async def until(fn, what: str, timeout: float = 20.0):
    """Poll ``fn`` (run in a thread: stem is blocking) until it returns something true."""
    end = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(fn)
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_relay_control_port_with_stem(nodes, http_server):
    from stem import ControllerError, Signal
    from stem.control import EventType

    guard = nodes("guard", control_port=0, metrics_port=0)
    middle = nodes("middle")
    exit_ = nodes("exit", exit_policy="accept 127.0.0.1:*")
    infos = [p.info() for p in (guard, middle, exit_)]
    cookie = guard.dir / "control_auth_cookie"
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o600 and len(cookie.read_bytes()) == 32
    controller = await asyncio.to_thread(stem_controller, guard.control_port)
    orconn_events: list = []
    client = OnionClient()
    try:
        get = controller.get_info
        assert await asyncio.to_thread(get, "fingerprint") == infos[0].fingerprint
        assert await asyncio.to_thread(get, "address") == "127.0.0.1"
        assert await asyncio.to_thread(get, "net/listeners/or") == f'"127.0.0.1:{infos[0].or_port}"'
        metrics_port = int(guard.metrics_url.split(":")[2].split("/")[0])
        assert await asyncio.to_thread(get, "net/listeners/metrics") == f'"127.0.0.1:{metrics_port}"'
        assert await asyncio.to_thread(get, "net/listeners/control") == f'"127.0.0.1:{guard.control_port}"'
        assert await asyncio.to_thread(get, "circuit-status") == ""  # a relay has no origin circuits
        assert await asyncio.to_thread(get, "orconn-status") == ""
        read0 = int(await asyncio.to_thread(get, "traffic/read"))
        written0 = int(await asyncio.to_thread(get, "traffic/written"))
        await asyncio.to_thread(controller.add_event_listener, orconn_events.append, EventType.ORCONN)

        n = 300_000
        circ = await client.build_circuit(infos, timeout=30)
        reader, writer = await circ.open_stream("127.0.0.1", http_server.port)
        assert len(await http_get(reader, writer, f"/{n}")) == n

        status = await asyncio.to_thread(get, "orconn-status")
        lines = status.splitlines()
        assert f"${infos[1].fingerprint} CONNECTED" in lines  # to the middle: named by identity
        (client_line,) = [ln for ln in lines if not ln.startswith("$")]  # the client: address:port
        assert re.fullmatch(r"127\.0\.0\.1:\d+ CONNECTED", client_line)
        assert int(await asyncio.to_thread(get, "traffic/read")) - read0 >= n  # the body, as cells from the middle
        assert int(await asyncio.to_thread(get, "traffic/written")) - written0 >= n  # ... and to the client

        # ORCONN events, parsed by stem: both connections came up
        await until(lambda: {e.endpoint_fingerprint for e in orconn_events if e.status == "CONNECTED"}
                    >= {infos[1].fingerprint, None}, "ORCONN CONNECTED events")
        client_endpoint = client_line.split()[0]
        assert any(e.endpoint == client_endpoint and e.endpoint_address == "127.0.0.1" for e in orconn_events)

        # configuration: readable under tor's names; bandwidth changes live, the nickname does not
        assert await asyncio.to_thread(controller.get_conf, "Nickname") == "guard"
        assert await asyncio.to_thread(controller.get_conf, "ORPort") == f"127.0.0.1:{infos[0].or_port}"
        await asyncio.to_thread(controller.set_conf, "BandwidthRate", "5000000")
        assert await asyncio.to_thread(controller.get_conf, "BandwidthRate") == "5000000"
        assert await asyncio.to_thread(controller.get_conf, "BandwidthBurst") == str(1 << 30)
        with pytest.raises(ControllerError):
            await asyncio.to_thread(controller.set_conf, "Nickname", "other")
        with pytest.raises(ControllerError):  # burst below rate: refused, nothing changed
            await asyncio.to_thread(controller.set_conf, "BandwidthBurst", "100")
        assert await asyncio.to_thread(controller.get_conf, "BandwidthRate") == "5000000"

        await asyncio.to_thread(controller.signal, Signal.HEARTBEAT)
        await until(lambda: guard.events("relay status"), "heartbeat status line")
        await asyncio.to_thread(controller.signal, Signal.NEWNYM)  # accepted, nothing to renew

        await client.close()  # the client's connection goes: ORCONN CLOSED
        await until(lambda: any(e.endpoint == client_endpoint and e.status == "CLOSED" for e in orconn_events),
                    "ORCONN CLOSED for the client")

        await asyncio.to_thread(controller.signal, Signal.SHUTDOWN)
        rc = await asyncio.to_thread(guard.proc.wait, 15)
        assert rc == 0
        assert guard.events("stopped") and "Traceback" not in guard.logtext()
    finally:
        await client.close()
        await close_controller(controller)
    for p in (middle, exit_):
        assert p.stop() == 0


def raw_reply(controller, command: str) -> list[str]:
    """The exact reply lines (data blocks included) tor's control port would send."""
    return controller.msg(command).raw_content().split("\r\n")[:-1]


# What a real tor 0.4.9 answers these, as a relay or a client (tests/test_control.py's
# TOR_CLIENT_REPLIES): onionp2p has no setting for these options (unset: "auto", empty),
# runs no bridge statistics, so its clients-seen line is tor's empty one.
TOR_UNSET_REPLIES = {
    "GETCONF exitrelay": ["250 ExitRelay=auto"],
    "GETCONF HiddenServiceOptions": ["250 HiddenServiceOptions"],
    "GETCONF usemicrodescriptors": ["250 UseMicrodescriptors=auto"],
    "GETINFO status/clients-seen": [
        '250-status/clients-seen=TimeStarted="1970-01-01 00:00:00" CountrySummary= IPVersions=v4=0,v6=0',
        "250 OK"],
    "GETINFO exit-policy/default": ["250-exit-policy/default=reject *:*", "250 OK"],
}
PRIVATE_REJECTS = ["reject 0.0.0.0/8:*", "reject 169.254.0.0/16:*", "reject 127.0.0.0/8:*",
                   "reject 192.168.0.0/16:*", "reject 10.0.0.0/8:*", "reject 172.16.0.0/12:*"]
PRIVATE6_REJECTS = ["reject6 [::]/8:*", "reject6 [fc00::]/7:*", "reject6 [fe80::]/10:*",
                    "reject6 [fec0::]/10:*", "reject6 [ff00::]/8:*"]  # [::]/127 is inside [::]/8


async def test_relay_exit_policy_and_nyx_queries(nodes):
    rules = ["accept *4:80", "accept6 [2001:db8::]/32:443", "accept 192.0.2.7:8000-8080", "reject *:*"]
    exit_ = nodes("policyexit", control_port=0, exit_reject_private=True, exit_policy=rules)
    plain = nodes("nonexit", control_port=0)  # default exit policy: reject *:*
    infos = [exit_.info(), plain.info()]
    exit_ctl = await asyncio.to_thread(stem_controller, exit_.control_port)
    plain_ctl = await asyncio.to_thread(stem_controller, plain.control_port)
    try:
        for ctl in (exit_ctl, plain_ctl):
            for command, expected in TOR_UNSET_REPLIES.items():
                assert await asyncio.to_thread(raw_reply, ctl, command) == expected, command
        # the policy the relay enforces (the private rejects first), one rule per line as tor writes it
        assert await asyncio.to_thread(raw_reply, exit_ctl, "GETINFO exit-policy/full") == [
            "250+exit-policy/full=", *PRIVATE_REJECTS, *PRIVATE6_REJECTS, *rules, ".", "250 OK"]
        assert await asyncio.to_thread(raw_reply, exit_ctl, "GETINFO exit-policy/ipv4") == [
            "250+exit-policy/ipv4=", *PRIVATE_REJECTS, "accept *4:80", "accept 192.0.2.7:8000-8080",
            "reject *:*", ".", "250 OK"]
        assert await asyncio.to_thread(raw_reply, exit_ctl, "GETINFO exit-policy/ipv6") == [
            "250+exit-policy/ipv6=", *PRIVATE6_REJECTS, "accept6 [2001:db8::]/32:443", "reject *:*",
            ".", "250 OK"]
        assert await asyncio.to_thread(raw_reply, plain_ctl, "GETINFO exit-policy/full") == [
            "250-exit-policy/full=reject *:*", "250 OK"]
        # stem (nyx's header and connection pages) reads the policy from exit-policy/full
        policy = await asyncio.to_thread(exit_ctl.get_exit_policy)
        assert policy.is_exiting_allowed()
        probes = [("203.0.113.9", 80), ("10.0.0.1", 80), ("203.0.113.9", 443), ("2001:db8::5", 443),
                  ("2001:db8::5", 80), ("192.0.2.7", 8080), ("192.0.2.8", 8080)]
        assert [policy.can_exit_to(a, p) for a, p in probes] == [True, False, False, True, False, True, False]
        assert not (await asyncio.to_thread(plain_ctl.get_exit_policy)).is_exiting_allowed()
        assert await asyncio.to_thread(raw_reply, exit_ctl, "GETINFO fingerprint") == [
            f"250-fingerprint={infos[0].fingerprint}", "250 OK"]
        assert await asyncio.to_thread(raw_reply, exit_ctl, "GETCONF ExitRelay ExitPolicyRejectPrivate") == [
            "250-ExitRelay=auto", "250 ExitPolicyRejectPrivate=1"]
    finally:
        await close_controller(exit_ctl)
        await close_controller(plain_ctl)
    for p in (exit_, plain):
        assert p.stop() == 0


async def test_relay_reload_applies_live_keys(nodes):
    relay = nodes("reloader", control_port=0, bandwidth_rate=1_000_000)
    relay.info()
    controller = await asyncio.to_thread(stem_controller, relay.control_port)
    changed: list = []
    try:
        from stem.control import EventType

        await asyncio.to_thread(controller.add_event_listener, changed.append, EventType.CONF_CHANGED)
        assert await asyncio.to_thread(controller.get_conf, "BandwidthRate") == "1000000"
        text = relay.config.read_text().replace("bandwidth_rate = 1000000", "bandwidth_rate = 2000000")
        relay.config.write_text(text + "dos_circuit_creation_rate = 7\n")
        from stem import Signal

        await asyncio.to_thread(controller.signal, Signal.RELOAD)
        assert await asyncio.to_thread(controller.get_conf, "BandwidthRate") == "2000000"
        assert await asyncio.to_thread(controller.get_conf, "DoSCircuitCreationRate") == "7"
        relay.config.write_text(text.replace("2000000", "3000000"))
        relay.proc.send_signal(signal.SIGHUP)  # the same through the signal
        await until(lambda: controller.get_conf("BandwidthRate") == "3000000", "SIGHUP reload")
        # each reload announced what it changed (stem keeps its configuration cache current from these)
        await until(lambda: len(changed) >= 2, "CONF_CHANGED events")
        assert [e.changed.get("BandwidthRate") for e in changed] == [["2000000"], ["3000000"]]
        assert changed[0].changed["DoSCircuitCreationRate"] == ["7"]
        assert changed[1].changed["DoSCircuitCreationRate"] == ["3"]  # back to the default
    finally:
        await close_controller(controller)
    assert relay.stop() == 0


async def test_authority_control_and_metrics_ports(nodes, tmp_path):
    from prometheus_client import parser
    from stem import ControllerError, Signal

    from onionp2p.dir.authority import authority_line, load_or_create_authority_key
    from onionp2p.testnet import free_port

    auth_dir = tmp_path / "auth0"
    auth_dir.mkdir()
    dir_port = free_port()
    line = authority_line("auth0", "127.0.0.1", dir_port, load_or_create_authority_key(auth_dir))
    auth = nodes("auth0", "authority", dir_address=f"127.0.0.1:{dir_port}", run_relay=False, authorities=[line],
                 voting_interval=2, assume_guard=True, assume_exit=True, stable_uptime=0, guard_uptime=0,
                 control_port=0, metrics_port=0)
    relay = nodes("pub", authorities=[line], control_port=0)
    info = relay.info()
    url = auth.metrics_url

    def consensus_relays() -> float:
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        values = {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples}
        assert values["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in values
        return values["onionp2p_consensus_relays"] >= 1 and values["onionp2p_consensus_signatures"] == 1

    await until(consensus_relays, "a consensus listing the relay", timeout=60)
    controller = await asyncio.to_thread(stem_controller, auth.control_port)
    relay_ctl = await asyncio.to_thread(stem_controller, relay.control_port)
    try:
        assert await asyncio.to_thread(controller.get_info, "net/listeners/dir") == f'"127.0.0.1:{dir_port}"'
        statuses = await asyncio.to_thread(lambda: list(controller.get_network_statuses()))
        assert [(s.fingerprint, s.nickname) for s in statuses] == [(info.fingerprint, "pub")]
        assert await asyncio.to_thread(controller.get_conf, "V3AuthVotingInterval") == "2"
        with pytest.raises(ControllerError):  # run_relay = false: not a relay itself
            await asyncio.to_thread(controller.get_info, "fingerprint")
        assert await asyncio.to_thread(raw_reply, controller, "GETINFO exit-policy/full") == [
            "552 Not running in server mode"]  # tor's answer when it is not a relay
        for command, expected in TOR_UNSET_REPLIES.items():
            assert await asyncio.to_thread(raw_reply, controller, command) == expected, command
        # the relay caches the consensus: its control port answers ns/* from it
        entry = await until(lambda: relay_ctl.get_network_status(info.fingerprint, None), "relay's cached consensus")
        assert entry.nickname == "pub" and "Running" in entry.flags
        await asyncio.to_thread(controller.signal, Signal.SHUTDOWN)
        assert await asyncio.to_thread(auth.proc.wait, 15) == 0
    finally:
        await close_controller(controller)
        await close_controller(relay_ctl)
    assert relay.stop() == 0


async def test_busy_metrics_or_control_port_is_a_clear_error(nodes):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for key in ("metrics_port", "control_port"):
            p = nodes(f"busy{key[0]}", **{key: port})
            assert await asyncio.to_thread(p.proc.wait, 30) == 2
            text = p.logtext()
            assert "cannot listen" in text and str(port) in text and "Traceback" not in text
