"""Shared randomness between real authorities over real HTTP on 127.0.0.1 (specs/directory.md
"Shared randomness").

Three Authority objects vote every 2 seconds (a protocol run is 24 rounds: 48 s); a fourth
configured authority is played by the test, which votes with a real SRState and signed votes
but reveals a value that does not match its commitment. One real authority is restarted in
the commit phase of a run. After two run boundaries every authority's consensus carries the
same SRV made from the three good reveals, the previous SRV is the one of the run before,
the bad reveal was dropped with a log line, and a client's view reads the values.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import replace

from conftest import free_port, wait_for

from onionp2p.client.client import OnionClient
from onionp2p.config import AuthorityConfig
from onionp2p.dir.authority import Authority, VotingSchedule, authority_line, load_or_create_authority_key
from onionp2p.dir.client import ClientDirectory, RelayDirectory
from onionp2p.dir.server import fetch
from onionp2p.errors import OnionError
from onionp2p.log import configure_logging, reset_logging
from onionp2p.proto.directory import NetworkStatus
from onionp2p.proto.srv import PROTOCOL_ROUNDS, Phase, SRState, run_start

INTERVAL = 2
RUN = PROTOCOL_ROUNDS * INTERVAL


async def _liar(key, identity: bytes, ports: list[int], stop: asyncio.Event) -> None:
    """Authority 'auth3': commits in the commit phase, reveals a wrong value in the reveal phase."""
    sched = VotingSchedule(INTERVAL)
    state = SRState(identity, INTERVAL)
    while not stop.is_set():
        va = sched.next_valid_after(time.time())
        await asyncio.sleep(max(0.0, sched.vote_at(va) - time.time()))
        state.update(va)
        commits = state.vote_commits()
        if state.phase is Phase.REVEAL:
            commits = tuple(replace(c, reveal=c.reveal[:8] + bytes(32)) if c.identity == identity else c
                            for c in commits)
        vote = NetworkStatus("vote", *sched.times(va), (("auth3", identity),), (), sr_participate=True,
                             sr_commits=commits)
        body = vote.with_signatures([(identity, vote.sign(key))]).text.encode()
        for port in ports:
            try:
                await fetch("127.0.0.1", port, "/tor/post/vote", body, max_size=4096, timeout=2)
            except OnionError:
                pass  # an authority being restarted
        await asyncio.sleep(max(0.0, va - time.time()))


async def test_authorities_agree_on_srvs_that_rotate_drop_a_bad_reveal_and_survive_restart(tmp_path):
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    keys = [load_or_create_authority_key(tmp_path / f"auth{i}") for i in range(4)]
    ports = [free_port() for _ in keys]
    lines = tuple(authority_line(f"auth{i}", "127.0.0.1", p, k)
                  for i, (k, p) in enumerate(zip(keys, ports, strict=True)))
    configs = [AuthorityConfig(nickname=f"auth{i}", authorities=lines, data_dir=tmp_path / f"auth{i}",
                               dir_address=("127.0.0.1", ports[i]), voting_interval=INTERVAL)
               for i in range(3)]
    auths = [Authority(keys[i], configs[i]) for i in range(3)]
    stop = asyncio.Event()
    liar = None
    client = OnionClient()
    try:
        for a in auths:
            await a.start()
        ids = [a.identity for a in auths]
        # the first boundary after the start: SRVs from whatever of that run we saw
        b1 = run_start(int(time.time()), INTERVAL) + RUN
        if b1 - time.time() < 3 * INTERVAL:
            b1 += RUN  # too close to a boundary to exchange votes first
        liar = asyncio.get_running_loop().create_task(
            _liar(keys[3], keys[3].public_key().public_bytes_raw(), ports[:3], stop))

        def agreed(after: int):
            docs = [a.current for a in auths]
            if any(d is None or d.valid_after < after for d in docs) or len({d.digest for d in docs}) != 1:
                return None
            return docs[0] if docs[0].shared_rand_current is not None else None
        first = await wait_for(lambda: agreed(b1), timeout=b1 - time.time() + 20, interval=0.1,
                               what="a consensus with an SRV after the first run boundary")
        b2 = b1 + RUN
        # the next run's commit phase: every real authority keeps the others' commits
        await wait_for(lambda: all(len(a.sr.commits) >= 3 and a.sr.run == b1 and set(ids) <= set(a.sr.commits)
                                   for a in auths),
                       timeout=6 * INTERVAL + 10, interval=0.1, what="commits exchanged in the commit phase")
        reveal_at = b1 + PROTOCOL_ROUNDS // 2 * INTERVAL  # the first round of the reveal phase
        assert time.time() < reveal_at - 3 * INTERVAL, "test too slow: the commit phase is nearly over"
        mine = auths[1].sr.our_commit
        assert all(a.sr.commits[ids[1]] == mine.without_reveal() for a in (auths[0], auths[2]))
        assert (tmp_path / "auth1" / "sr-state").stat().st_mode & 0o077 == 0
        await auths[1].stop()
        auths[1] = Authority(keys[1], configs[1])
        await auths[1].start()
        assert auths[1].sr.our_commit == mine  # the same commitment after the restart
        assert time.time() < reveal_at - INTERVAL

        second = await wait_for(lambda: agreed(b2), timeout=b2 - time.time() + 20, interval=0.1,
                                what="a consensus with an SRV after the second run boundary")
        # the three good reveals (auth1's across its restart), not the liar's
        assert second.shared_rand_current.num_reveals == 3
        assert second.shared_rand_previous == first.shared_rand_current
        assert second.shared_rand_current != first.shared_rand_current
        cur = second.srv_current
        assert all(a.sr.current.value == cur for a in auths)
        # a client's view of our consensus carries the values, as from tor's
        cdir = ClientDirectory(tmp_path / "client", lines, client)
        await cdir.bootstrap()
        view = cdir.view()
        assert view.valid_after >= b2
        held = cdir.consensus
        assert (view.srv_current, view.srv_previous) == (held.srv_current, held.srv_previous)
        assert view.srv_previous == first.srv_current or view.srv_previous == second.srv_current
        # a relay (an HSDir) holds the same values from the same consensus
        rdir = RelayDirectory(tmp_path / "relay", lines)
        assert rdir.view() is None
        body = await fetch("127.0.0.1", ports[0], "/tor/status-vote/current/consensus", max_size=1 << 20)
        rdoc = rdir.accept(body, "auth0")
        rview = rdir.view()
        assert rview.srv_current == rdoc.srv_current and rview.srv_previous == rdoc.srv_previous
        assert rview.srv_current is not None and rview.valid_after >= b2
        if rview.valid_after == view.valid_after:
            assert (rview.srv_current, rview.srv_previous) == (view.srv_current, view.srv_previous)
    finally:
        stop.set()
        if liar is not None:
            liar.cancel()
            await asyncio.gather(liar, return_exceptions=True)
        await client.close()
        for a in auths:
            await a.stop()
        reset_logging()
    events = [json.loads(ln) for ln in buf.getvalue().splitlines() if ln.startswith("{")]
    bad = "shared-random reveal does not match its commit; dropped"
    dropped = [e for e in events if e.get("event") == bad]
    assert dropped and {e["voter"] for e in dropped} == {"auth3"}
    assert any(e.get("event") == "resuming the shared-random protocol run" for e in events)


async def test_a_corrupt_sr_state_is_ignored_with_a_log_line(tmp_path):
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    key = load_or_create_authority_key(tmp_path / "a")
    port = free_port()
    (tmp_path / "a" / "sr-state").write_text("Version 1\nValidAfter yesterday\n")
    line = authority_line("a", "127.0.0.1", port, key)
    auth = Authority(key, AuthorityConfig(nickname="a", authorities=(line,), data_dir=tmp_path / "a",
                                          dir_address=("127.0.0.1", port), voting_interval=INTERVAL))
    try:
        await auth.start()
        # it starts a fresh state and votes with it
        await wait_for(lambda: auth.sr.valid_after and auth.current is not None, timeout=3 * INTERVAL + 10,
                       what="a vote and a consensus")
        assert "ValidAfter yesterday" not in (tmp_path / "a" / "sr-state").read_text()
    finally:
        await auth.stop()
        reset_logging()
    events = [json.loads(ln) for ln in buf.getvalue().splitlines() if ln.startswith("{")]
    assert any(e.get("event") == "not using the saved shared-random state" for e in events)
