"""What an operator sees: the ORPort reachability self-test and tor's bootstrap progress.

Real processes only (``onionp2p authority|relay|client`` through conftest's ``nodes``), stem
on the control ports, and ``onionp2p wan`` to slow a directory down:

* a relay whose published address leads to it logs tor's "Self-testing indicates your
  ORPort ... is reachable from the outside. Excellent." before its descriptor is uploaded;
  a relay started once the consensus lists another relay tests itself *through* that relay;
* a relay whose published port leads nowhere (an unused loopback port) publishes nothing,
  logs tor's "Your server has not managed to confirm reachability ..." warning after
  ``reachability_timeout`` and sends STATUS_SERVER REACHABILITY_FAILED; the same relay with
  ``assume_reachable`` publishes anyway and does not warn;
* a client and a relay each report tor's bootstrap phases in order up to ``100% (done)``,
  in their logs and as STATUS_CLIENT BOOTSTRAP events that stem parses, and answer
  ``GETINFO status/bootstrap-phase``. Their consensus comes through a proxy adding 700 ms
  each way, so the phases are still to come when stem subscribes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import close_controller

from onionp2p.bootstrap import PHASES, format_line
from onionp2p.dir.authority import authority_line, load_or_create_authority_key
from onionp2p.testnet import free_port

EXCELLENT = "Self-testing indicates your ORPort {} is reachable from the outside. Excellent."
NOT_CONFIRMED = ("Your server has not managed to confirm reachability for its ORPort(s) at {}. Relays do not "
                 "publish descriptors until their ORPort and DirPort are reachable. Please check your "
                 "firewalls, ports, address, /etc/hosts file, etc.")
ORDER = list(PHASES)


def start_authority(nodes, tmp_path, *, dir_port: int | None = None):
    """An authority (no relay of its own) voting every 2 s; returns (node, its line, DirPort)."""
    d = tmp_path / "auth0"
    d.mkdir()
    port = dir_port or free_port()
    line = authority_line("auth0", "127.0.0.1", port, load_or_create_authority_key(d))
    auth = nodes("auth0", "authority", dir_address=f"127.0.0.1:{port}", run_relay=False, authorities=[line],
                 voting_interval=2, assume_guard=True, assume_exit=True, stable_uptime=0, guard_uptime=0)
    return auth, line, port


def running_in_consensus(dir_port: int) -> set[str]:
    """Nicknames the authority's current consensus lists as Running."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{dir_port}/tor/status-vote/current/consensus",
                                    timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return set()
    out, nick = set(), None
    for line in text.splitlines():
        if line.startswith("r "):
            nick = line.split()[1]
        elif line.startswith("s ") and "Running" in line.split() and nick:
            out.add(nick)
    return out


async def until(fn, what: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while not (value := await asyncio.to_thread(fn)):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)
    return value


def log_events(node) -> list[dict]:
    out = []
    for line in node.logtext().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out


def first_index(events: list[dict], text: str) -> int:
    return next(i for i, ev in enumerate(events) if ev.get("event", "").startswith(text))


async def test_reachable_relay_confirms_its_orport_before_publishing(nodes, tmp_path):
    auth, line, dir_port = start_authority(nodes, tmp_path)
    first = nodes("first", authorities=[line])
    where = f"127.0.0.1:{first.info().or_port}"
    first.wait_line(re.escape(EXCELLENT.format(where) + " Publishing server descriptor."), timeout=30)
    first.wait_line("descriptor published", timeout=30)
    events = log_events(first)
    # the descriptor went out only after the self-test, as tor does
    assert first_index(events, "Self-testing indicates") < first_index(events, "descriptor published")
    assert events[first_index(events, "Self-testing")]["level"] == "notice"

    # once the consensus lists "first", a new relay tests itself through it: the CREATE2
    # that proves it reachable came over a connection "first" opened to the published address
    await until(lambda: "first" in running_in_consensus(dir_port), "a consensus listing 'first'")
    second = nodes("second", authorities=[line])
    where2 = f"127.0.0.1:{second.info().or_port}"
    second.wait_line(re.escape(EXCELLENT.format(where2)), timeout=30)
    tests = [ev for ev in log_events(second) if ev.get("event") == "testing reachability of my ORPort"]
    assert tests and tests[-1]["via"] == ["first"], tests
    second.wait_line("descriptor published", timeout=30)
    assert "has not managed to confirm" not in first.logtext() + second.logtext()


async def test_unreachable_relay_warns_and_does_not_publish(nodes, tmp_path):
    from stem.control import EventType

    auth, line, dir_port = start_authority(nodes, tmp_path)
    nowhere, nowhere2 = free_port(), free_port()  # nothing listens there
    lost = nodes("lost", authorities=[line], address="127.0.0.1", or_advertise_port=nowhere,
                 reachability_timeout=4, control_port=0)
    assumed = nodes("assumed", authorities=[line], address="127.0.0.1", or_advertise_port=nowhere2,
                    reachability_timeout=4, assume_reachable=True)
    controller = await asyncio.to_thread(stem_controller, lost.control_port)
    statuses: list = []
    controller.add_event_listener(statuses.append, EventType.STATUS_SERVER)
    try:
        where = f"127.0.0.1:{nowhere}"
        lost.wait_line(re.escape(f"Now checking whether IPv4 ORPort {where} is reachable... (this may take up "
                                 "to 4 seconds -- look for log messages indicating success)"), timeout=30)
        warning = lost.wait_line(re.escape(NOT_CONFIRMED.format(where)), timeout=30)
        ev = next(e for e in log_events(lost) if e.get("event", "").startswith("Your server has not"))
        assert ev["level"] == "warning"
        await until(lambda: any(s.action == "REACHABILITY_FAILED" for s in statuses), "REACHABILITY_FAILED")
        failed = next(s for s in statuses if s.action == "REACHABILITY_FAILED")
        assert failed.runlevel == "WARN" and failed.arguments == {"ORADDRESS": where}
        assert warning and "Excellent" not in lost.logtext()
        # tor's view of it: published on one port, listening on another
        listen = lost.wait_line(r"listening on 127\.0\.0\.1:(\d+)").group(1)
        assert await asyncio.to_thread(controller.get_conf, "ORPort", multiple=True) == [
            f"{where} NoListen", f"127.0.0.1:{listen} NoAdvertise"]
        assert await asyncio.to_thread(controller.get_conf, "AssumeReachable") == "0"
        assert "descriptor published" not in lost.logtext()  # it waits for a reachable ORPort
        # the same situation with assume_reachable: published at once, no warning
        assumed.wait_line("descriptor published", timeout=10)
        assert "has not managed to confirm" not in assumed.logtext()
    finally:
        await close_controller(controller)


def stem_controller(port: int):
    from stem.control import Controller

    controller = Controller.from_port(address="127.0.0.1", port=port)
    controller.authenticate()
    return controller


def stem_when_listening(port: int, timeout: float = 30.0):
    """A stem controller as soon as ``port`` accepts connections (the node is still starting)."""
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return stem_controller(port)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def slow_proxy(tmp_path, target_port: int, delay_ms: int) -> tuple[subprocess.Popen, int]:
    """``onionp2p wan`` forwarding a free port to ``target_port`` with ``delay_ms`` each way."""
    port = free_port()
    log = open(tmp_path / "wan.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "onionp2p", "wan", "--map",
                             f"{port}:127.0.0.1:{target_port}:{delay_ms}"],
                            stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            assert proc.poll() is None and time.monotonic() < end, (tmp_path / "wan.txt").read_text()
            time.sleep(0.05)


async def follow_bootstrap(node, port: int) -> tuple[list[tuple[int, str, str]], str]:
    """STATUS_CLIENT BOOTSTRAP events from the moment ``port`` listens until 100, then
    ``GETINFO status/bootstrap-phase``."""
    from stem.control import EventType

    controller = await asyncio.to_thread(stem_when_listening, port)
    seen: list[tuple[int, str, str]] = []

    def on_status(ev) -> None:
        if ev.action == "BOOTSTRAP":
            seen.append((int(ev.arguments["PROGRESS"]), ev.arguments["TAG"], ev.arguments["SUMMARY"]))

    try:
        await asyncio.to_thread(controller.add_event_listener, on_status, EventType.STATUS_CLIENT)
        await until(lambda: seen and seen[-1][0] == 100 or node.proc.poll() is not None,
                    "bootstrap events up to 100", timeout=60)
        phase = await asyncio.to_thread(controller.get_info, "status/bootstrap-phase")
    finally:
        await close_controller(controller)
    return seen, phase


def check_progress(node, seen: list[tuple[int, str, str]], phase: str) -> None:
    """Events in tor's order ending at done, each also a notice line of the node's log, whose
    own lines go from 0% (starting) to 100% (done) in order."""
    assert seen and seen[-1] == (100, "done", "Done"), seen
    assert [PHASES[tag] for _p, tag, _s in seen] == [(p, s) for p, _t, s in seen]
    assert [ORDER.index(tag) for _p, tag, _s in seen] == sorted({ORDER.index(tag) for _p, tag, _s in seen})
    # the consensus was still on its way when stem subscribed: its phases came as events
    tags = [tag for _p, tag, _s in seen]
    assert {"enough_dirinfo", "circuit_create"} <= set(tags), tags
    assert phase == 'NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"'
    logged = [ev for ev in log_events(node) if ev.get("event", "").startswith("Bootstrapped ")]
    assert all(ev["level"] == "notice" for ev in logged)
    lines = [ev["event"] for ev in logged]
    assert lines[0] == "Bootstrapped 0% (starting): Starting"
    assert lines[-1] == "Bootstrapped 100% (done): Done"
    percents = [int(re.match(r"Bootstrapped (\d+)%", ln).group(1)) for ln in lines]
    assert percents == sorted(set(percents)), lines
    assert all(format_line(*s) in lines for s in seen)


async def test_bootstrap_progress_of_a_relay_and_a_client_with_stem(nodes, tmp_path):
    auth, line, dir_port = start_authority(nodes, tmp_path)
    nodes("guard1", authorities=[line])
    nodes("middle1", authorities=[line])
    nodes("exit1", authorities=[line], exit_policy="accept *:*")
    await until(lambda: {"guard1", "middle1", "exit1"} <= running_in_consensus(dir_port),
                "a consensus listing three relays", timeout=60)
    wan, slow_port = slow_proxy(tmp_path, dir_port, 700)
    try:
        key = load_or_create_authority_key(tmp_path / "auth0")
        slow_line = authority_line("auth0", "127.0.0.1", slow_port, key)
        relay_ctl = free_port()
        relay = nodes("slowrelay", authorities=[slow_line], control_port=relay_ctl)
        seen, phase = await follow_bootstrap(relay, relay_ctl)
        check_progress(relay, seen, phase)
        # its bootstrap circuit was its reachability test, through another relay
        relay.wait_line(re.escape(EXCELLENT.format(f"127.0.0.1:{relay.info().or_port}")), timeout=10)

        client_ctl = free_port()
        client = nodes("client", "client", authorities=[slow_line], socks_address="127.0.0.1:0",
                       control_port=client_ctl, enforce_distinct_subnets=False, preemptive_circuits=1)
        seen, phase = await follow_bootstrap(client, client_ctl)
        check_progress(client, seen, phase)
        client.wait_line("SOCKS5 proxy ready", timeout=30)
        assert any(tag.startswith("ap_") for _p, tag, _s in seen), seen
    finally:
        wan.kill()
        wan.wait()


# -- in-process: the rules behind the lines above -------------------------------------------------


async def test_create2_through_published_address_proves_reachability(tmp_path):
    """tor's onionskin_answer rule: a CREATE2 on a connection we did not open, whose peer says
    it connected to our published address; from a private address only with
    extend_allow_private; a connection to another of our addresses proves nothing."""
    from conftest import relay_config

    from onionp2p.client.client import OnionClient
    from onionp2p.ops.metrics import RelayCollector
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    succeeded: list[tuple] = []
    for allow, bind, published, expect in (
        (True, "127.0.0.1", None, True),  # published = the listener's address, loopback allowed
        (False, "127.0.0.1", None, False),  # a loopback neighbour proves nothing (tor's channel_is_local)
        (True, "0.0.0.0", "127.0.0.2", False),  # we were reached at 127.0.0.1, but publish 127.0.0.2
        (True, "0.0.0.0", "127.0.0.1", True),  # a wildcard listener reached at the published address
    ):
        d = tmp_path / f"r{len(succeeded)}-{allow}-{published}"
        relay = Relay(RelayKeys.load_or_create(d / "keys"),
                      relay_config(d, or_address=(bind, 0), address=published, extend_allow_private=allow))
        relay.reachability.add(lambda *a: succeeded.append(a))
        await relay.start()
        client = OnionClient()
        try:
            info = relay.info()
            # connect to 127.0.0.1 whatever is published: the NETINFO then names 127.0.0.1
            circ = await client.build_circuit([dataclasses.replace(info, address="127.0.0.1")])
            circ.close()
            assert relay.orport_reachable is expect, (allow, bind, published)
            gauges = {m.name: m.samples[0][1] for m in RelayCollector(relay)()}
            assert gauges["onionp2p_orport_reachable"] == int(expect)
            assert gauges["onionp2p_bootstrap_progress"] == 100
            assert relay.bootstrap_progress.status == (100, "done", "Done")  # no directory: nothing to load
        finally:
            await client.close()
            await relay.stop()
    assert [a[0] for a in succeeded] == ["REACHABILITY_SUCCEEDED"] * 2
    assert succeeded[-1] == ("REACHABILITY_SUCCEEDED", "NOTICE", f"127.0.0.1:{relay.port}")


def test_bootstrap_phases_only_move_forward(caplog):
    """tor's table and rules: the same step means conn before enough_dirinfo and ap_conn
    after it; a phase at or below the current one is ignored; a built one-hop directory
    tunnel is not "done", a built multi-hop circuit is."""
    from onionp2p.bootstrap import Bootstrap
    from onionp2p.client.client import CircuitEvent

    assert [PHASES[t][0] for t in ORDER] == sorted(PHASES[t][0] for t in ORDER)  # tor's order
    boot = Bootstrap("onionp2p.test")
    seen: list[tuple[int, str, str]] = []
    boot.events.add(lambda *s: seen.append(s))
    assert boot.status == (0, "starting", "Starting")
    boot.report("starting")
    boot.or_progress("connecting")
    boot._circuit_event(CircuitEvent("launched", 1, ()))
    boot._circuit_event(CircuitEvent("built", 1, ("dirguard",)))  # one-hop tunnel: not done
    assert not boot.report("conn")  # already past it
    boot.report("enough_dirinfo")
    boot._circuit_event(CircuitEvent("built", 3, ("dirguard",)))  # a directory refresh's tunnel
    assert not boot.done
    boot.or_progress("connecting")
    boot._channel_event("connected", None)
    boot._circuit_event(CircuitEvent("launched", 2, ()))
    boot._circuit_event(CircuitEvent("built", 2, ("g", "m", "x")))
    assert [t for _p, t, _s in seen] == ["starting", "conn", "onehop_create", "enough_dirinfo", "ap_conn",
                                         "ap_handshake_done", "circuit_create", "done"]
    assert boot.done and boot.status == (100, "done", "Done")
    assert format_line(*seen[1]) == "Bootstrapped 5% (conn): Connecting to a relay"
