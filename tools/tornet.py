#!/usr/bin/env python3
"""A private Tor network of real ``tor`` processes on 127.0.0.1 (for interop tests and by hand).

Theory of operation
-------------------
:class:`TorNet` builds a throw-away Tor network in one directory:

1. **Ports.** Every node gets a free ORPort on 127.0.0.1 (picked by binding to port 0
   with all probe sockets held open at once, so no two nodes get the same port);
   every node also gets a DirPort (authorities serve the directory there; relays, as
   directory caches, serve the consensus they currently use, which is how we see that
   they are up to date). With ``split_or_ports`` each relay also gets a listening port:
   it advertises ``or_port`` (``ORPort … NoListen``) and listens on ``listen_port``
   (``ORPort … NoAdvertise``), and ``before_launch`` runs before any tor starts, so that
   something else — a latency-adding ``onionp2p wan`` proxy, tools/bench_latency.py —
   can listen on the advertised ports and carry every link to the relays.
2. **Authority keys.** For each of the three directory authorities, ``tor-gencert``
   creates an RSA-3072 authority identity key, an RSA-2048 signing key and the key
   certificate binding them (``keys/authority_certificate``, whose ``fingerprint`` line is
   the authority's ``v3ident``).
3. **Relay identities.** ``tor --list-fingerprint`` runs once per node against its own
   torrc; it creates the node's relay keys and prints its RSA fingerprint. The
   authorities' fingerprints go into the shared ``DirAuthority`` lines; the exits'
   fingerprints go into ``TestingDirAuthVoteExit`` so that exactly the configured exits
   get the Exit flag.
4. **Start.** Every node runs ``tor -f torrc`` in the foreground of its own session
   (``start_new_session``), so a terminal's Ctrl-C does not reach it; it is stopped by
   PID (SIGTERM, then SIGKILL after a grace period). When the network is owned by a
   Python process (the test fixture), tor's ``__OwningControllerProcess`` makes every
   node exit by itself if that process dies without calling :meth:`TorNet.stop`.
5. **Wait.** :meth:`TorNet.start` polls every node's DirPort until each authority serves
   a microdescriptor consensus listing every relay as Running, Valid, Fast and Guard
   (exits also Exit) and the microdescriptors those entries name, and every relay knows
   every relay (lists it in its own microdesc consensus or holds its server descriptor).
   The second condition matters: a tor relay refuses BEGIN from a previous hop it does
   not know ("open a stream from unknown relay"), and relays fetch each new consensus
   some seconds after the authorities make it (longer after a run of 404s at start-up).

Fast bootstrap comes from ``TestingTorNetwork 1`` plus the shortest stable voting
schedule (10 s intervals, 2 s vote and distribution delays, consensus valid for two
intervals, so directory caches refetch within 5 s of fresh-until), ``AssumeReachable 1``
(no self-reachability test; descriptors are uploaded at once),
``TestingDirAuthVoteGuard *`` and ``TestingDirAuthVoteExit <exit fingerprints>`` (flags
without uptime or bandwidth history), ``TestingMinExitFlagThreshold 0`` and
``AuthDirFastGuarantee 1`` (every relay is Fast, whatever bandwidth it has measured so
far, so flags do not flip). Keys are made in parallel. On two cores the whole network is
typically usable 15–45 s after :meth:`TorNet.start` is called.

With ``address_of``, ``launcher`` and ``fetch`` the nodes live elsewhere than on 127.0.0.1:
tools/simnet gives each its own network namespace and address (``Address``, ``ORPort`` and
``DirPort`` on it), starts it with ``ip netns exec`` and polls its DirPort from inside.

Every tor runs with ``--defaults-torrc`` pointing at an empty file, so a system-wide
``/etc/tor/torrc-defaults`` cannot leak in.

Every node logs at notice level to ``<node>/notice.log`` with ``ProtocolWarnings 1``, so
anything tor considers a protocol violation by a peer appears as a ``[warn]`` line.

Exits use ``ExitPolicy accept *:*`` (with ``ExitPolicyRejectPrivate 0`` from
TestingTorNetwork): the only way into the network is through ORPorts bound to 127.0.0.1,
and this makes the microdescriptor summary ``p accept 1-65535`` like a real exit's.
Non-exit relays and the authorities use ``ExitPolicy reject *:*``.

Command line::

    python tools/tornet.py up --dir D [--relays 5] [--exits 2] [--timeout 120]
    python tools/tornet.py down --dir D

``up`` leaves the network running, writes ``D/dirauth.txt`` (the DirAuthority lines, one
per line — the file ``onionp2p client --tor-dirauth-file`` reads) and ``D/tornet.json``
(PIDs, ports, fingerprints); ``down`` stops the PIDs recorded there.
"""

from __future__ import annotations

import argparse
import base64
import calendar
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["TorNet", "TorNetError", "TorNode", "down", "main", "tor_available"]

STATE_FILE = "tornet.json"
DIRAUTH_FILE = "dirauth.txt"
MD_CONSENSUS = "/tor/status-vote/current/consensus-microdesc"
_REQUIRED_FLAGS = frozenset({"Running", "Valid", "Fast", "Guard"})


class TorNetError(RuntimeError):
    """The private network could not be built, started or stopped."""


def _which(program: str) -> str | None:
    """``program`` on PATH, or in the sbin directories Debian puts ``tor`` in (often not on
    a non-root user's PATH)."""
    return shutil.which(program) or shutil.which(program, path="/usr/local/sbin:/usr/sbin:/sbin")


def tor_available(tor: str = "tor", gencert: str = "tor-gencert") -> bool:
    """True if both the ``tor`` and ``tor-gencert`` programs can be found."""
    return _which(tor) is not None and _which(gencert) is not None


@dataclass
class TorNode:
    """One tor process of the network."""

    name: str
    role: str  # "authority", "relay" or "client" (add_client)
    directory: str
    or_port: int
    dir_port: int = 0
    exit: bool = False
    #: with ``TorNet.split_or_ports``: the port tor listens on (``or_port`` is then only
    #: advertised: ``ORPort ... NoListen`` / ``ORPort ... NoAdvertise``), for a proxy between
    listen_port: int = 0
    fingerprint: str = ""  # relay RSA identity, 40 upper-case hex digits
    v3ident: str = ""  # authorities: fingerprint of the authority identity key
    pid: int = 0
    #: the address it binds and advertises (``TorNet.address_of``: e.g. a network namespace's)
    address: str = "127.0.0.1"

    @property
    def torrc(self) -> Path:
        return Path(self.directory) / "torrc"

    @property
    def log(self) -> Path:
        return Path(self.directory) / "notice.log"

    def dirauth_line(self) -> str:
        return (f"DirAuthority {self.name} orport={self.or_port} v3ident={self.v3ident} "
                f"{self.address}:{self.dir_port} {self.fingerprint}")


def _empty(node: TorNode) -> Path:
    path = Path(node.directory, "torrc-defaults")
    if not path.exists():
        path.write_text("")
    return path


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class TorNet:
    """A private Tor network; see the module docstring.

    ``directory`` is where the nodes live (a fresh temporary directory when None; it is
    deleted by :meth:`stop` only if TorNet created it). ``extra_relay_options`` and
    ``extra_authority_options`` are torrc lines appended to those nodes' torrc.
    """

    directory: Path | str | None = None
    tor: str = "tor"
    tor_gencert: str = "tor-gencert"
    n_authorities: int = 3
    owned: bool = True  # nodes exit when this Python process dies
    extra_relay_options: list[str] = field(default_factory=list)
    extra_authority_options: list[str] = field(default_factory=list)
    #: relays listen on ``listen_port`` and advertise ``or_port``, so that something in
    #: between (a latency-adding proxy: ``onionp2p wan``) carries every link to them
    split_or_ports: bool = False
    #: called with this TorNet once the ports are chosen, before any tor starts (to start
    #: what listens on the advertised ports)
    before_launch: Callable[[TorNet], None] | None = None
    #: the address of each node (default 127.0.0.1), e.g. one per network namespace
    #: (tools/simnet); ``launcher`` then prefixes each node's command line (``ip netns exec
    #: NS``) and ``fetch(node, path)`` reads a node's DirPort (None if unavailable)
    address_of: Callable[[TorNode], str] | None = None
    launcher: Callable[[TorNode], list[str]] | None = None
    fetch: Callable[[TorNode, str], str | None] | None = None
    #: fingerprints of relays that are not tor's (onionp2p relays joining later, see
    #: :meth:`wait_listed`) that the authorities vote Exit for (TestingDirAuthVoteExit)
    extra_exit_fingerprints: list[str] = field(default_factory=list)
    nodes: list[TorNode] = field(default_factory=list)
    _created_dir: bool = False
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # -- public API --------------------------------------------------------------------

    def start(self, n_relays: int = 5, n_exits: int = 2, timeout: float = 120.0) -> None:
        """Create keys and torrcs, start every node and wait for a usable consensus.

        Raises TorNetError (after stopping what was started) if tor is missing, a node
        dies, or the consensus is not ready within ``timeout`` seconds.
        """
        if n_exits > n_relays or n_relays < 1:
            raise ValueError("need 1 <= n_exits <= n_relays")
        if not tor_available(self.tor, self.tor_gencert):
            raise TorNetError("tor and tor-gencert must be installed (Debian: apt-get install tor)")
        self.tor, self.tor_gencert = _which(self.tor), _which(self.tor_gencert)  # type: ignore[assignment]
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="tornet-")
            self._created_dir = True
        root = Path(self.directory)
        root.mkdir(parents=True, exist_ok=True)
        if (root / STATE_FILE).exists():
            raise TorNetError(f"{root} already holds a network; run 'down' first or use another directory")
        deadline = time.monotonic() + timeout
        try:
            self._plan(root, n_relays, n_exits)
            self._make_keys()
            self._write_torrcs()
            if self.before_launch is not None:
                self.before_launch(self)
            self._launch()
            self._save_state()
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 10.0) -> None:
        """Stop every node by PID (SIGTERM, then SIGKILL) and remove a temporary directory."""
        pids = [n.pid for n in self.nodes if n.pid]
        _terminate(pids, grace, self._procs)
        for node in self.nodes:
            node.pid = 0
        self._procs.clear()
        if self.directory is not None:
            state = Path(self.directory) / STATE_FILE
            state.unlink(missing_ok=True)
            if self._created_dir:
                shutil.rmtree(self.directory, ignore_errors=True)

    def dirauth_lines(self) -> list[str]:
        """The torrc ``DirAuthority`` lines of this network's authorities."""
        return [n.dirauth_line() for n in self.authorities]

    def log_paths(self) -> dict[str, Path]:
        """Node name -> its notice-level log file."""
        return {n.name: n.log for n in self.nodes}

    @property
    def authorities(self) -> list[TorNode]:
        return [n for n in self.nodes if n.role == "authority"]

    @property
    def relays(self) -> list[TorNode]:
        return [n for n in self.nodes if n.role == "relay"]

    def check_alive(self) -> None:
        """Raise TorNetError naming any node whose process has exited."""
        dead = [n.name for n in self.nodes if not _pid_alive(n.pid, self._procs.get(n.name))]
        if dead:
            raise TorNetError(f"tor node(s) exited: {', '.join(dead)}; "
                              f"see {self.directory}/<node>/notice.log")

    def add_client(self, name: str, options: Sequence[str] = (), timeout: float = 90.0, *,
                   wait: bool = True) -> TorNode:
        """Start a tor *client* (SocksPort on 127.0.0.1, no ORPort) of this network with extra
        torrc ``options`` (EntryNodes, ExitNodes ...); with ``wait``, return once it has
        bootstrapped (else call :meth:`wait_bootstrapped`). ``node.or_port`` is its SOCKS
        port. It is stopped with the network."""
        port = _free_ports(1)[0]
        node = TorNode(name, "client", str(Path(self.directory) / name), or_port=port)  # type: ignore[arg-type]
        Path(node.directory).mkdir(parents=True, exist_ok=True)
        os.chmod(node.directory, 0o700)
        lines = ["TestingTorNetwork 1", f"DataDirectory {node.directory}", "RunAsDaemon 0",
                 f"SocksPort 127.0.0.1:{port}", f"Log notice file {node.directory}/notice.log",
                 "ProtocolWarnings 1", "SafeLogging 0", "LogTimeGranularity 1", *self.dirauth_lines(),
                 *([f"__OwningControllerProcess {os.getpid()}"] if self.owned else []), *options]
        node.torrc.write_text("\n".join(lines) + "\n")
        self.nodes.append(node)
        self._launch([node])
        self._save_state()
        if wait:
            self.wait_bootstrapped(node, timeout)
        return node

    def wait_bootstrapped(self, node: TorNode, timeout: float = 90.0) -> None:
        """Wait until a tor client logs "Bootstrapped 100%"."""
        deadline = time.monotonic() + timeout
        while "Bootstrapped 100%" not in (node.log.read_text() if node.log.exists() else ""):
            if not _pid_alive(node.pid, self._procs.get(node.name)):
                raise TorNetError(f"tor client {node.name} exited; see {node.log}")
            if time.monotonic() > deadline:
                raise TorNetError(f"tor client {node.name} did not bootstrap in {timeout:.0f} s; see {node.log}")
            time.sleep(0.5)

    def wait_listed(self, wanted: dict[str, set[str]], timeout: float = 120.0) -> dict[str, set[str]]:
        """Wait until every authority's microdesc consensus lists each fingerprint of
        ``wanted`` with (at least) its flags, and every tor relay knows it (it is in the
        relay's own consensus: tor relays refuse streams from unknown previous hops).
        Returns the flags of each, from the first authority."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            problem, flags = self._listed_problem(wanted)
            if problem is None:
                return flags
            if time.monotonic() > deadline:
                raise TorNetError(f"not listed in time: {problem}")
            time.sleep(1.0)

    def consensus_flags(self, node: TorNode) -> tuple[int, dict[str, set[str]]]:
        """(valid-after in unix seconds, fingerprint -> flags) of the microdesc consensus
        ``node`` serves now ((0, {}) if none)."""
        text = _http_get(node.dir_port, MD_CONSENSUS) or ""
        return _valid_after(text), _flags_by_fingerprint(text)

    def _listed_problem(self, wanted: dict[str, set[str]]) -> tuple[str | None, dict[str, set[str]]]:
        first: dict[str, set[str]] = {}
        for node in self.authorities + self.relays:
            listed = _flags_by_fingerprint(_http_get(node.dir_port, MD_CONSENSUS) or "")
            for fp, need in wanted.items():
                if fp not in listed:
                    return f"{node.name}: {fp} not in its consensus yet", {}
                if node.role == "authority" and not need <= listed[fp]:
                    return f"{node.name}: {fp} lacks {sorted(need - listed[fp])}", {}
                if node is self.authorities[0]:
                    first[fp] = listed[fp]
        return None, first

    # -- building ------------------------------------------------------------------------

    def _plan(self, root: Path, n_relays: int, n_exits: int) -> None:
        ports = _free_ports(2 * self.n_authorities + (3 if self.split_or_ports else 2) * n_relays)
        self.nodes = []
        for i in range(self.n_authorities):
            self.nodes.append(TorNode(f"auth{i}", "authority", str(root / f"auth{i}"),
                                      or_port=ports.pop(), dir_port=ports.pop()))
        for i in range(n_relays):
            is_exit = i < n_exits
            name = f"exit{i}" if is_exit else f"relay{i}"
            self.nodes.append(TorNode(name, "relay", str(root / name), or_port=ports.pop(),
                                      dir_port=ports.pop(), exit=is_exit,
                                      listen_port=ports.pop() if self.split_or_ports else 0))
        for node in self.nodes:
            if self.address_of is not None:
                node.address = self.address_of(node)
            Path(node.directory, "keys").mkdir(parents=True, exist_ok=True)
            os.chmod(node.directory, 0o700)

    def _run(self, args: list[str], **kw) -> str:
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kw)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TorNetError(f"{args[0]} failed: {exc}") from None
        if res.returncode != 0:
            raise TorNetError(f"{' '.join(args[:3])}... exited {res.returncode}: {res.stderr.strip()[-500:]}")
        return res.stdout

    def _make_keys(self) -> None:
        """Authority keys (tor-gencert) and relay fingerprints (tor --list-fingerprint), in parallel."""
        def gencert(node: TorNode) -> None:
            keys = Path(node.directory, "keys")
            self._run([self.tor_gencert, "--create-identity-key", "--passphrase-fd", "0", "-m", "12",
                       "-a", f"{node.address}:{node.dir_port}",
                       "-i", str(keys / "authority_identity_key"),
                       "-s", str(keys / "authority_signing_key"),
                       "-c", str(keys / "authority_certificate")], input="\n")
            cert = (keys / "authority_certificate").read_text()
            m = re.search(r"^fingerprint ([0-9A-F]{40})$", cert, re.MULTILINE)
            if not m:
                raise TorNetError(f"no fingerprint in {keys / 'authority_certificate'}")
            node.v3ident = m.group(1)

        def fingerprint(node: TorNode) -> None:
            # A minimal torrc is enough to create the relay keys and print the fingerprint.
            minimal = Path(node.directory, "torrc.fp")
            minimal.write_text(f"DataDirectory {node.directory}\nORPort {node.address}:{node.or_port}\n"
                               f"Address {node.address}\nNickname {node.name}\nSocksPort 0\nLog err stderr\n")
            out = self._run([self.tor, "--quiet", "--defaults-torrc", str(_empty(node)), "-f", str(minimal),
                             "--list-fingerprint"])
            m = re.search(rf"^{node.name} ((?:[0-9A-F]{{4}} ?){{10}})$", out.strip(), re.MULTILINE)
            if not m:
                raise TorNetError(f"cannot read the fingerprint of {node.name} from {out!r}")
            node.fingerprint = m.group(1).replace(" ", "")
            minimal.unlink()

        with ThreadPoolExecutor(max_workers=4) as pool:
            jobs = [pool.submit(gencert, n) for n in self.authorities]
            jobs += [pool.submit(fingerprint, n) for n in self.nodes]
            for job in jobs:
                job.result()

    def _torrc(self, node: TorNode) -> str:
        exits = ",".join([f"${n.fingerprint}" for n in self.relays if n.exit]
                         + [f"${fp}" for fp in self.extra_exit_fingerprints])
        lines = [
            "TestingTorNetwork 1",
            f"DataDirectory {node.directory}",
            f"PidFile {node.directory}/pid",
            "RunAsDaemon 0",
            f"Nickname {node.name}",
            f"ContactInfo {node.name}@tornet.invalid",
            f"Address {node.address}",
            *([f"ORPort {node.address}:{node.or_port} NoListen",
               f"ORPort {node.address}:{node.listen_port} NoAdvertise"]
              if node.listen_port else [f"ORPort {node.address}:{node.or_port}"]),
            "SocksPort 0",
            "AssumeReachable 1",
            "ConnLimit 60",
            "ShutdownWaitLength 0",
            "DisableDebuggerAttachment 0",
            f"Log notice file {node.directory}/notice.log",
            "ProtocolWarnings 1",
            "SafeLogging 0",
            "LogTimeGranularity 1",
            "TestingMinExitFlagThreshold 0",
            "V3AuthNIntervalsValid 2",
            *self.dirauth_lines(),
        ]
        if self.owned:
            lines.append(f"__OwningControllerProcess {os.getpid()}")
        if node.role == "authority":
            lines += [
                "AuthoritativeDirectory 1",
                "V3AuthoritativeDirectory 1",
                f"DirPort {node.address}:{node.dir_port}",
                "ExitPolicy reject *:*",
                "TestingV3AuthInitialVotingInterval 10",
                "TestingV3AuthInitialVoteDelay 2",
                "TestingV3AuthInitialDistDelay 2",
                "V3AuthVotingInterval 10",
                "V3AuthVoteDelay 2",
                "V3AuthDistDelay 2",
                "TestingDirAuthVoteGuard *",
                # Fast normally needs a bandwidth in the top 7/8; capping the guarantee at 1 byte
                # makes every relay Fast, so flags do not flip as self-measured bandwidths move.
                "AuthDirFastGuarantee 1",
                f"TestingDirAuthVoteExit {exits}" if exits else "TestingDirAuthVoteExitIsStrict 1",
                "TestingDirAuthVoteExitIsStrict 1",
                *self.extra_authority_options,
            ]
        else:
            lines.append(f"DirPort {node.address}:{node.dir_port}")
            if node.exit:
                lines += ["ExitRelay 1", "ExitPolicy accept *:*"]
            else:
                lines += ["ExitRelay 0", "ExitPolicy reject *:*"]
            lines += self.extra_relay_options
        return "\n".join(dict.fromkeys(lines)) + "\n"

    def _write_torrcs(self) -> None:
        for node in self.nodes:
            node.torrc.write_text(self._torrc(node))

    def _launch(self, nodes: list[TorNode] | None = None) -> None:
        for node in self.nodes if nodes is None else nodes:
            try:
                with open(Path(node.directory, "stdout.log"), "ab") as out:
                    proc = subprocess.Popen(
                        [*(self.launcher(node) if self.launcher else []),
                         self.tor, "--defaults-torrc", str(_empty(node)), "-f", str(node.torrc)],
                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True)
            except OSError as exc:
                raise TorNetError(f"cannot start tor for {node.name}: {exc}") from None
            node.pid = proc.pid
            self._procs[node.name] = proc

    def _save_state(self) -> None:
        root = Path(self.directory)  # type: ignore[arg-type]
        (root / DIRAUTH_FILE).write_text("\n".join(self.dirauth_lines()) + "\n")
        state = {"nodes": [asdict(n) for n in self.nodes], "dirauth_lines": self.dirauth_lines()}
        tmp = root / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(root / STATE_FILE)

    # -- waiting -------------------------------------------------------------------------

    def _wait_ready(self, deadline: float) -> None:
        # (clients are added after start; only authorities and relays are waited for here)
        while True:
            self.check_alive()
            problem = next((p for n in self.authorities + self.relays if (p := self._node_problem(n))), None)
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise TorNetError(f"the private Tor network was not ready in time: {problem}")
            time.sleep(1.0)

    def _get(self, node: TorNode, path: str) -> str | None:
        return self.fetch(node, path) if self.fetch is not None else _http_get(node.dir_port, path)

    def _node_problem(self, node: TorNode) -> str | None:
        """None when ``node`` serves (from its DirPort) what makes the network usable.

        Authorities: the microdesc consensus lists every relay with the flags a 3-hop path
        needs, and the microdescriptors it names are served. Relays: every relay is "known"
        to them — in their own consensus (microdesc flavour: tor relays build circuits from
        microdescriptors) or among the server descriptors they cache — because a relay
        answers BEGIN from an unknown previous hop with END(MISC) before it even looks at
        its exit policy (RefuseUnknownExits).
        """
        if node.role == "relay":
            md = _parse_entries(self._get(node, MD_CONSENSUS) or "")
            descs = (self._get(node, "/tor/server/all") or "").splitlines()
            named = {ln.split(" ")[1] for ln in descs if ln.startswith("router ") and " " in ln[7:]}
            unknown = [r.name for r in self.relays if r.name not in md and r.name not in named]
            return f"{node.name}: does not know {', '.join(unknown)} yet" if unknown else None
        text = self._get(node, MD_CONSENSUS)
        if text is None:
            return f"{node.name}: no consensus yet"
        entries = _parse_entries(text)
        for relay in self.relays:
            if relay.name not in entries:
                return f"{node.name}: {relay.name} not in the consensus yet"
            need = _REQUIRED_FLAGS | ({"Exit"} if relay.exit else set())
            if not need <= entries[relay.name][0]:
                return f"{node.name}: {relay.name} lacks {sorted(need - entries[relay.name][0])}"
        digests = "-".join(entries[r.name][1] for r in self.relays)
        if self._get(node, "/tor/micro/d/" + digests) is None:
            return f"{node.name}: microdescriptors not served yet"
        return None


def _flags_by_fingerprint(text: str) -> dict[str, set[str]]:
    """upper-case hex fingerprint -> flags, from a consensus read loosely."""
    out: dict[str, set[str]] = {}
    fp = None
    for line in text.splitlines():
        parts = line.split(" ")
        if parts[0] == "r" and len(parts) > 2:
            raw = parts[2] + "=" * (-len(parts[2]) % 4)
            try:
                fp = base64.b64decode(raw).hex().upper()
            except ValueError:
                fp = None
            if fp:
                out[fp] = set()
        elif parts[0] == "s" and fp:
            out[fp] = set(parts[1:])
    return out


def _valid_after(text: str) -> int:
    m = re.search(r"^valid-after (\S+ \S+)$", text, re.MULTILINE)
    if not m:
        return 0
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))


def _parse_entries(text: str) -> dict[str, tuple[set[str], str]]:
    """nickname -> (flags, microdescriptor digest) from a consensus, read loosely."""
    entries: dict[str, tuple[set[str], str]] = {}
    nick = None
    for line in text.splitlines():
        parts = line.split(" ")
        if parts[0] == "r" and len(parts) > 2:
            nick = parts[1]
            entries[nick] = (set(), "")
        elif parts[0] == "s" and nick:
            entries[nick] = (set(parts[1:]), entries[nick][1])
        elif parts[0] == "m" and nick and len(parts) > 1:
            entries[nick] = (entries[nick][0], parts[1])
    return entries


def _http_get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.read().decode("ascii", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _pid_alive(pid: int, proc: subprocess.Popen | None = None) -> bool:
    if not pid:
        return False
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie or a recycled PID is not our tor
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return b"tor" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _terminate(pids: list[int], grace: float, procs: dict[str, subprocess.Popen] | None = None) -> None:
    by_pid = {p.pid: p for p in (procs or {}).values()}
    live = [pid for pid in pids if _pid_alive(pid, by_pid.get(pid))]
    for pid in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace
    for pid in live:
        proc = by_pid.get(pid)
        while _pid_alive(pid, proc) and time.monotonic() < end:
            time.sleep(0.05)
        if _pid_alive(pid, proc):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def down(directory: Path | str, grace: float = 10.0) -> int:
    """Stop a network started by ``up`` in ``directory``; returns how many PIDs were signalled."""
    state_path = Path(directory) / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        nodes = state["nodes"]
    except (OSError, ValueError, KeyError) as exc:
        raise TorNetError(f"no running network recorded in {directory}: {exc}") from None
    pids = []
    for node in nodes:
        pid = int(node.get("pid") or 0)
        torrc = str(Path(node["directory"]) / "torrc").encode()
        try:  # only signal a PID that is still the tor we started with that torrc
            if pid and torrc in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    _terminate(pids, grace)
    state_path.unlink(missing_ok=True)
    return len(pids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tornet", description="A private Tor network on 127.0.0.1.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a network and wait until its consensus is usable")
    up.add_argument("--dir", required=True, help="directory for the nodes (created if missing)")
    up.add_argument("--relays", type=int, default=5)
    up.add_argument("--exits", type=int, default=2)
    up.add_argument("--timeout", type=float, default=120.0)
    dn = sub.add_parser("down", help="stop the network recorded in --dir")
    dn.add_argument("--dir", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            net = TorNet(Path(args.dir).resolve(), owned=False)
            t0 = time.monotonic()
            net.start(args.relays, args.exits, args.timeout)
            print(f"tornet: {len(net.nodes)} tor nodes ready in {time.monotonic() - t0:.1f} s")
            for line in net.dirauth_lines():
                print(line)
            print(f"DirAuthority lines written to {Path(args.dir).resolve() / DIRAUTH_FILE}")
        else:
            n = down(Path(args.dir).resolve())
            print(f"tornet: stopped {n} tor process(es)")
    except TorNetError as exc:
        print(f"tornet: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
