"""The ``onionp2p`` command line (README "CLI").

``onionp2p relay --config FILE`` runs a relay until SIGINT/SIGTERM (or SIGNAL SHUTDOWN
on its control port), then destroys its circuits, closes its channels and exits 0.
SIGUSR1 logs a status line (channels, circuits, streams, queued cells), like tor's
SIGUSR1 dump; SIGHUP re-reads the config file and applies the keys that can change while
running (:mod:`onionp2p.control.relay`). With ``authorities`` configured the relay also
does its directory duties (:class:`~onionp2p.dir.client.RelayDirectory`). With
``metrics_port`` it serves Prometheus metrics, with ``control_port`` tor's control
protocol (cookie in ``data_dir/control_auth_cookie``).

``onionp2p authority --config FILE`` runs a directory authority (and, unless
``run_relay = false``, a non-exit relay beside it) the same way, with the same optional
metrics and control ports; ``--show-identity`` only creates the identity key if needed
and prints the authority's configuration line.

Start-up order: every listener (OR, directory, SOCKS, metrics, control port) binds before
anything slow (directory bootstrap, descriptor upload). One that cannot bind ends the
process with one line, ``onionp2p: cannot listen on KIND HOST:PORT: REASON``, and exit
status 2 (:class:`~onionp2p.errors.ListenError`); a bad configuration prints one
``onionp2p: error: FILE: KEY: REASON`` line per problem, also with status 2.

``--verify-config`` loads and checks the configuration (key files, data directory, log
file included) and exits 0 ("Configuration was valid") or 2 without starting anything;
``--dump-config`` prints the effective configuration as TOML. SIGHUP and SIGUSR1 reopen
``log_file`` (logrotate) before their other work.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from onionp2p import __version__
from onionp2p.config import (
    LOG_LEVELS,
    AuthorityConfig,
    ClientConfig,
    RelayConfig,
    dump_config,
    load_authority_config,
    load_client_config,
    load_relay_config,
)
from onionp2p.errors import ConfigError, ListenError, OnionError
from onionp2p.log import configure_logging, get_logger, notice, reopen_log_file

T = TypeVar("T")

__all__ = ["EVENT_LOOP_ENV", "event_loop_choice", "main"]

#: the environment variable that picks the event loop of an onionp2p process (and, as the
#: environment is inherited, of a testnet's relays and authorities): ``auto`` (default:
#: uvloop when it can be imported — a dependency except on Windows — else asyncio, as
#: uvicorn's ``--loop auto``), ``uvloop`` (an error if it cannot be imported) or ``asyncio``
EVENT_LOOP_ENV = "ONIONP2P_EVENT_LOOP"


def event_loop_choice(environ: Mapping[str, str] | None = None) -> str:
    """``"uvloop"`` or ``"asyncio"``: the loop :data:`EVENT_LOOP_ENV` picks in ``environ``
    (default: this process's environment) with this interpreter's packages. Raises
    ConfigError (one line, exit status 2) for an unknown value, or for ``uvloop`` when it
    cannot be imported. tools/bench and tools/simnet name it in their mode lines."""
    env = os.environ if environ is None else environ
    name = env.get(EVENT_LOOP_ENV, "").strip().lower() or "auto"
    if name not in ("asyncio", "uvloop", "auto"):
        raise ConfigError(f"{EVENT_LOOP_ENV}={name!r}: must be asyncio, uvloop or auto")
    if name == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401  (a dependency, but not on every platform)
    except ImportError:
        if name == "uvloop":
            raise ConfigError(f"{EVENT_LOOP_ENV}=uvloop, but uvloop is not installed "
                              "(pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def _event_loop() -> Callable[[Awaitable[T]], T]:
    """How to run the process's main coroutine: ``asyncio.run`` or ``uvloop.run``, as
    :func:`event_loop_choice` says."""
    uvloop = importlib.import_module("uvloop") if event_loop_choice() == "uvloop" else None

    def run(main: Awaitable[T]) -> T:
        async def logged() -> T:
            # the loop that really runs (its class's module: "uvloop" or "asyncio.unix_events");
            # at debug, so that a configuration error found at start stays one line
            loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
            get_logger("onionp2p.cli").debug("event loop", event_loop=loop)
            return await main
        return uvloop.run(logged()) if uvloop is not None else asyncio.run(logged())
    return run


async def _start_side_ports(cfg, data_dir: Path, collector, adapter_factory) -> tuple:
    """The optional metrics and control ports of a relay or authority; (metrics, control, adapter)."""
    from onionp2p.control.server import ControlServer
    from onionp2p.ops.metrics import MetricsServer

    metrics = control = adapter = None
    try:
        if cfg.metrics_port is not None:
            metrics = MetricsServer(collector(), port=cfg.metrics_port)
            await metrics.start()
            print(f"Metrics port at http://127.0.0.1:{metrics.port}/metrics", flush=True)
        adapter = adapter_factory(metrics)
        if cfg.control_port is not None:
            # tor's CookieAuthFile: in the data directory, mode 0600
            control = ControlServer(adapter, port=cfg.control_port,
                                    cookie_path=data_dir / "control_auth_cookie", port_file=data_dir / "control_port")
            await control.start()
            print(f"Control port at 127.0.0.1:{control.port}", flush=True)
    except BaseException:
        await _stop_side_ports(metrics, control, adapter)
        raise
    return metrics, control, adapter


async def _stop_side_ports(metrics, control, adapter) -> None:
    if control is not None:
        await control.stop()
    if metrics is not None:
        await metrics.stop()
    if adapter is not None:
        adapter.close()


async def run_relay(cfg: RelayConfig, *, shutdown_timeout: float = 5.0, config_file: str | None = None) -> int:
    from onionp2p.control.relay import RelayControlAdapter, relay_status
    from onionp2p.ops.metrics import RelayCollector
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    log = get_logger("onionp2p.cli", nickname=cfg.nickname)
    keys = RelayKeys.load_or_create(cfg.data_dir / "keys",
                                    onion_key_lifetime=cfg.onion_key_lifetime_days * 86400)
    relay = Relay(keys, cfg, directory=relay_directory(cfg))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # the side ports first: the relay's start also begins publishing to the authorities
    metrics, control, adapter = await _start_side_ports(
        cfg, cfg.data_dir, lambda: RelayCollector(relay),
        lambda m: RelayControlAdapter(relay, cfg, config_file=config_file, shutdown=stop.set, metrics=m))
    try:
        await relay.start()
    except BaseException:
        await _stop_side_ports(metrics, control, adapter)
        await asyncio.wait_for(relay.stop(), shutdown_timeout)
        raise
    _add_signal_handlers(loop, stop=stop.set, reload=adapter.sighup,
                         status=lambda: log.info("relay status", **relay_status(relay)))
    listener = f"{cfg.or_address[0]}:{relay.port}"
    published = "" if relay.or_address_text == listener else f" published as {relay.or_address_text}"
    print(f"onionp2p relay {cfg.nickname} listening on {listener}{published} fingerprint {keys.fingerprint}",
          flush=True)
    await stop.wait()
    log.info("shutting down", **relay_status(relay))
    try:
        async with asyncio.timeout(shutdown_timeout):
            await _stop_side_ports(metrics, control, adapter)
            await relay.stop()
    except TimeoutError:
        log.warning("shutdown timed out")
    log.info("stopped")
    return 0


def _add_signal_handlers(loop: asyncio.AbstractEventLoop, *, stop: Callable[[], object],
                         reload: Callable[[], object], status: Callable[[], object]) -> None:
    """SIGINT/SIGTERM: ``stop``; SIGHUP: ``reload``; SIGUSR1: ``status`` (the last two reopen
    the log file first, as tor's do)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, _reopening(signal.SIGHUP, reload))
    loop.add_signal_handler(signal.SIGUSR1, _reopening(signal.SIGUSR1, status))


def _reopening(sig: signal.Signals, then: Callable[[], object]) -> Callable[[], None]:
    """A SIGHUP/SIGUSR1 handler: reopen the log file (logrotate moved it), say so in the
    new file (as tor notes "Received reload signal"), then ``then()``."""
    def handler() -> None:
        reopened = reopen_log_file()
        if sig == signal.SIGHUP:  # tor says its "Received reload signal (hup)" at notice
            notice("onionp2p.cli", f"received {sig.name}", log_file_reopened=reopened)
        else:
            get_logger("onionp2p.cli").info(f"received {sig.name}", log_file_reopened=reopened)
        then()
    return handler


def relay_directory(cfg: RelayConfig):
    """The relay's directory duties: in a Tor network (``tor_dirauth_file``), in ours
    (``authorities``), or None when neither is configured."""
    if cfg.tor_dirauth_file is not None:
        from onionp2p.dir.tordir import read_dirauth_file
        from onionp2p.dir.torrelay import TorRelayDirectory

        return TorRelayDirectory(cfg.data_dir, read_dirauth_file(cfg.tor_dirauth_file),
                                 bandwidth=(cfg.bandwidth_rate, cfg.effective_bandwidth_burst),
                                 family=cfg.family, contact=cfg.contact)
    if not cfg.authorities:
        return None
    from onionp2p.dir.client import RelayDirectory

    return RelayDirectory(cfg.data_dir, cfg.authorities,
                          bandwidth=(cfg.bandwidth_rate, cfg.effective_bandwidth_burst, 0),
                          family=cfg.family, contact=cfg.contact)


async def run_authority(cfg: AuthorityConfig, *, shutdown_timeout: float = 5.0,
                        config_file: str | None = None) -> int:
    """Run a directory authority (plus its relay unless ``run_relay`` is false) until SIGINT/SIGTERM."""
    from onionp2p.control.relay import AuthorityControlAdapter
    from onionp2p.dir.authority import Authority, authority_line, load_or_create_authority_key
    from onionp2p.dir.client import RelayDirectory
    from onionp2p.ops.metrics import AuthorityCollector
    from onionp2p.relay.keys import RelayKeys
    from onionp2p.relay.relay import Relay

    log = get_logger("onionp2p.cli", nickname=cfg.nickname)
    key = load_or_create_authority_key(cfg.data_dir)
    authority = Authority(key, cfg)
    relay = None
    if cfg.run_relay:
        keys = RelayKeys.load_or_create(cfg.data_dir / "keys")
        relay = Relay(keys, cfg.relay_config(),
                      directory=RelayDirectory(cfg.data_dir / "relay", authority.authorities))
        (cfg.data_dir / "relay").mkdir(mode=0o700, exist_ok=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    side = await _start_side_ports(
        cfg, cfg.data_dir, lambda: AuthorityCollector(authority, relay),
        lambda m: AuthorityControlAdapter(authority, cfg, relay=relay, config_file=config_file,
                                          shutdown=stop.set, metrics=m))
    try:
        await authority.start()
        if relay is not None:
            await relay.start()
    except BaseException:
        await _stop_side_ports(*side)
        if relay is not None:
            await relay.stop()
        await authority.stop()
        raise
    line = authority_line(cfg.nickname, cfg.dir_address[0], authority.dir_port, key)
    (cfg.data_dir / "authority.txt").write_text(line + "\n")
    _add_signal_handlers(loop, stop=stop.set, reload=side[2].sighup,
                         status=lambda: log.info("authority status", **authority.status()))
    print(f"onionp2p authority {cfg.nickname} directory on {cfg.dir_address[0]}:{authority.dir_port} "
          f"line: {line}", flush=True)
    await stop.wait()
    log.info("shutting down", **authority.status())
    try:
        async with asyncio.timeout(shutdown_timeout):
            await _stop_side_ports(*side)
            if relay is not None:
                await relay.stop()
            await authority.stop()
    except TimeoutError:
        log.warning("shutdown timed out")
    log.info("stopped")
    return 0


def _cmd_authority(args: argparse.Namespace) -> int:
    cfg = load_authority_config(args.config)
    if (done := _verify_or_dump(args, cfg)) is not None:
        return done
    if args.show_identity:
        from onionp2p.dir.authority import authority_line, load_or_create_authority_key

        key = load_or_create_authority_key(cfg.data_dir)
        print(authority_line(cfg.nickname, cfg.dir_address[0], cfg.dir_address[1], key))
        return 0
    if args.unsafe_logging:
        cfg = replace(cfg, safe_logging=False)
    _configure_logging(cfg)
    return _event_loop()(run_authority(cfg, config_file=args.config))


def _configure_logging(cfg: RelayConfig | ClientConfig | AuthorityConfig) -> None:
    configure_logging(cfg.log_level, cfg.log_format, safe_logging=cfg.safe_logging, log_file=cfg.log_file)


def _add_config_checks(p: argparse.ArgumentParser) -> None:
    """``--verify-config`` and ``--dump-config`` (tor's names)."""
    p.add_argument("--verify-config", action="store_true",
                   help="check the configuration (and key files, data directory, log file) and exit 0, or 2")
    p.add_argument("--dump-config", action="store_true",
                   help="print the effective configuration (defaults filled in) as TOML and exit")


def _verify_or_dump(args: argparse.Namespace, cfg) -> int | None:
    """Answer ``--dump-config`` / ``--verify-config`` (the exit status), or None to go on."""
    if getattr(args, "dump_config", False):
        sys.stdout.write(dump_config(cfg))
        return 0
    if getattr(args, "verify_config", False):
        verify_config(cfg)
        print("Configuration was valid")
        return 0
    return None


def verify_config(cfg: RelayConfig | ClientConfig | AuthorityConfig) -> None:
    """What a start would need from the file system, checked without creating or changing
    anything: the data directory can be created/written, the key files that exist are
    readable, private and intact, the log file can be opened. ConfigError lists every problem."""
    from onionp2p.dir.authority import load_authority_key
    from onionp2p.relay.keys import RelayKeys

    problems = []
    for what, path in (("data_dir", cfg.data_dir), ("log_file", cfg.log_file)):
        if path is not None and (why := _unwritable(path, directory=what == "data_dir")):
            problems.append(f"{what}: {path}: {why}")
    checks = []
    if isinstance(cfg, AuthorityConfig):
        checks.append(lambda: load_authority_key(cfg.data_dir))
    if isinstance(cfg, RelayConfig) or (isinstance(cfg, AuthorityConfig) and cfg.run_relay):
        checks.append(lambda: RelayKeys.check_files(cfg.data_dir / "keys"))
    if isinstance(cfg, RelayConfig) and cfg.tor_dirauth_file is not None:
        from onionp2p.dir.tordir import read_dirauth_file

        checks.append(lambda: read_dirauth_file(cfg.tor_dirauth_file))
    auth_dir = getattr(cfg, "client_onion_auth_dir", None)
    if auth_dir is not None and not auth_dir.is_dir():  # tor's ClientOnionAuthDir must exist
        problems.append(f"client_onion_auth_dir: {auth_dir}: not a directory")
    for check in checks:
        try:
            check()
        except OnionError as exc:
            problems.append(str(exc))
    if isinstance(cfg, ClientConfig):
        problems += onion_service_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems), problems=problems)


def onion_service_problems(cfg: ClientConfig) -> list[str]:
    """What keeps the config's onion services from starting, checked before the client
    starts (as tor refuses a HiddenServiceDir it cannot use): a key file that is unreadable,
    readable by others or corrupt, a bad ``.auth`` file."""
    from onionp2p.client.hskeys import load_service_key
    from onionp2p.client.node import _load_authorized_clients

    problems = []
    for i, sc in enumerate(cfg.onion_service):
        try:
            if sc.dir.exists():
                load_service_key(sc.dir)
            if sc.authorized_clients_dir is not None:
                _load_authorized_clients(sc.authorized_clients_dir)
        except (OnionError, OSError) as exc:
            problems.append(f"onion_service[{i}]: {exc}")
    return problems


def _unwritable(path: Path, *, directory: bool) -> str | None:
    """Why ``path`` (a directory, or a file to append to) could not be created or written; None if it can."""
    if path.exists():
        if directory != path.is_dir():
            return "not a directory" if directory else "is a directory"
        ok = os.access(path, os.W_OK | (os.X_OK if directory else 0))
        return None if ok else "not writable by this user"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not a writable directory"
    return None


def _add_authority_parser(sub) -> None:
    a = sub.add_parser("authority", help="run a directory authority")
    a.add_argument("--config", "-c", required=True, help="authority TOML config file")
    a.add_argument("--show-identity", action="store_true",
                   help="create the identity key if needed, print this authority's line and exit")
    a.add_argument("--unsafe-logging", action="store_true",
                   help="show client addresses in logs (debugging only)")
    _add_config_checks(a)
    a.set_defaults(func=_cmd_authority)


def _cmd_relay(args: argparse.Namespace) -> int:
    cfg = load_relay_config(args.config)
    if args.unsafe_logging:
        cfg = replace(cfg, safe_logging=False)
    if args.tor_dirauth_file is not None:
        if cfg.authorities:
            raise ConfigError("--tor-dirauth-file: the config also sets `authorities`; a relay joins one network")
        cfg = replace(cfg, tor_dirauth_file=Path(args.tor_dirauth_file).resolve())
    if (done := _verify_or_dump(args, cfg)) is not None:
        return done
    if cfg.tor_dirauth_file is not None:
        from onionp2p.dir.tordir import read_dirauth_file

        read_dirauth_file(cfg.tor_dirauth_file)  # a bad file is a configuration error (status 2)
    _configure_logging(cfg)
    return _event_loop()(run_relay(cfg, config_file=args.config))


async def run_client(cfg: ClientConfig, *, config_file: str | None = None,
                     tor_dirauth_file: str | None = None,
                     load_config: Callable[[], ClientConfig] | None = None) -> int:
    """Run a client (SOCKS, optional control port) until SIGINT/SIGTERM or SIGNAL SHUTDOWN.
    SIGHUP reloads (``load_config`` reads the configuration again), SIGUSR1 logs a status line;
    both reopen the log file first."""
    from onionp2p.client.node import ClientNode

    routers = None
    params = None
    bw_weights = None
    network = None
    if tor_dirauth_file is not None:
        from onionp2p.dir.tordir import TorNetwork, read_dirauth_file

        # the Tor network's consensus, refreshed on a client's schedule
        network = TorNetwork(read_dirauth_file(tor_dirauth_file), cache=False, name="client")
        routers, params, bw_weights = network.routers, network.params, network.bw_weights
    node = ClientNode(cfg, routers=routers, params=params, config_file=config_file, load_config=load_config,
                      bw_weights=bw_weights, consensus_view=None if network is None else lambda: network.view)
    loop = asyncio.get_running_loop()
    refresher: asyncio.Task | None = None
    _add_signal_handlers(loop, stop=node.shutdown_requested.set, reload=node.reload,
                         status=lambda: get_logger("onionp2p.cli").info(
                             "client status", circuits=len(node.client.circuits), streams=len(node.streams)))
    try:
        await node.listen()
        if network is not None:
            await _unless_stopped(network.refresh(), node.shutdown_requested)
            refresher = loop.create_task(network.run())
        await _unless_stopped(node.start(ready_timeout=cfg.circuit_build_timeout * 2), node.shutdown_requested)
        print(f"SOCKS5 proxy ready at {cfg.socks_address[0]}:{node.socks_port}", flush=True)
        if node.http_tunnel_port is not None:
            print(f"HTTP CONNECT tunnel at 127.0.0.1:{node.http_tunnel_port}", flush=True)
        if node.dns_port is not None:
            print(f"DNS port at 127.0.0.1:{node.dns_port} (UDP)", flush=True)
        if node.control_port is not None:
            print(f"Control port at 127.0.0.1:{node.control_port} "
                  f"(cookie: {cfg.data_dir / 'control_auth_cookie'})", flush=True)
        if node.metrics_port is not None:
            print(f"Metrics port at http://127.0.0.1:{node.metrics_port}/metrics", flush=True)
        await node.shutdown_requested.wait()
    except _Stopped:
        notice("onionp2p.cli", "shutting down before bootstrap finished")
    finally:
        if refresher is not None:
            refresher.cancel()
        async with asyncio.timeout(5):
            await node.stop()
    return 0


class _Stopped(Exception):
    """SIGINT/SIGTERM (or SIGNAL SHUTDOWN) arrived while the client was still starting."""


async def _unless_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T:
    """``aw``'s result, unless ``stop`` is set first: then ``aw`` is cancelled and _Stopped raised.

    Bootstrapping can take minutes (a directory that does not answer, no usable exit), and tor
    exits at once on SIGTERM whatever it is doing; so does the client."""
    work = asyncio.ensure_future(aw)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise _Stopped


def client_config_from_args(args: argparse.Namespace) -> ClientConfig:
    """The client's config file (or defaults) with the command line's overrides applied."""
    cfg = load_client_config(args.config) if args.config else ClientConfig()
    overrides = {}
    if args.socks_port is not None:
        overrides["socks_address"] = (cfg.socks_address[0], args.socks_port)
    if args.control_port is not None:
        overrides["control_port"] = None if args.control_port == "off" else max(args.control_port, 0)
    if args.metrics_port is not None:
        overrides["metrics_port"] = max(args.metrics_port, 0)
    for key in ("http_tunnel_port", "dns_port"):
        if getattr(args, key) is not None:
            overrides[key] = max(getattr(args, key), 0)
    if args.data_dir is not None:
        overrides["data_dir"] = Path(args.data_dir)
    if args.unsafe_logging:
        overrides["safe_logging"] = False
    cfg = replace(cfg, **overrides)
    if cfg.control_port and cfg.control_port == cfg.metrics_port:
        raise ConfigError(f"metrics port {cfg.metrics_port} is also the control port")
    return cfg


def _cmd_client(args: argparse.Namespace) -> int:
    cfg = client_config_from_args(args)
    if (done := _verify_or_dump(args, cfg)) is not None:
        return done
    if not cfg.authorities and not args.tor_dirauth_file:
        raise ConfigError("no directory: set `authorities` in the config or pass --tor-dirauth-file")
    if problems := onion_service_problems(cfg):
        raise ConfigError("\n".join(problems), problems=problems)
    _configure_logging(cfg)
    return _event_loop()(run_client(cfg, config_file=args.config, tor_dirauth_file=args.tor_dirauth_file,
                                  load_config=(lambda: client_config_from_args(args)) if args.config else None))


def _cmd_testnet(args: argparse.Namespace) -> int:
    from onionp2p.testnet import run_testnet

    configure_logging(args.log_level, "console", safe_logging=True)
    return _event_loop()(run_testnet(
        n_relays=args.relays, n_exits=args.exits, n_authorities=args.authorities,
        socks_port=max(args.socks_port, 0), control_port=None if args.control_port == 0 else max(args.control_port, 0),
        data_dir=Path(args.data_dir) if args.data_dir else None, voting_interval=args.voting_interval,
        log_level=args.log_level, metrics_port=None if args.metrics_port is None else max(args.metrics_port, 0),
        link_delay=args.link_delay, congestion_control=not args.no_congestion_control, cgo=not args.no_cgo,
        base_port=args.base_port,
        http_tunnel_port=None if args.http_tunnel_port is None else max(args.http_tunnel_port, 0),
        dns_port=None if args.dns_port is None else max(args.dns_port, 0),
    ))


def _delay_range(text: str) -> tuple[float, float]:
    """``MS`` or ``MIN-MAX`` (milliseconds, one way) -> (min, max) seconds."""
    lo, _, hi = text.partition("-")
    try:
        a, b = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a delay: {text!r} (MS or MIN-MAX)") from None
    if not 0 <= a <= b <= 10_000:
        raise argparse.ArgumentTypeError(f"delay out of range: {text!r} (0-10000 ms, MIN <= MAX)")
    return a / 1000, b / 1000


def _cmd_wan(args: argparse.Namespace) -> int:
    from onionp2p.ops.wan import parse_map, run_proxies

    configure_logging("warning", "console", safe_logging=True)
    mappings = [parse_map(m) for m in args.map]
    return _event_loop()(run_proxies(mappings))


def _port_or_auto(text: str) -> int:
    """A port number, or 'auto' (any free port, returned as -1)."""
    if text == "auto":
        return -1
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _port_auto_or_off(text: str) -> int | str:
    """A port, 'auto' (-1) or 'off'."""
    return "off" if text == "off" else _port_or_auto(text)


def _add_client_parsers(sub) -> None:
    c = sub.add_parser("client", help="run a client: a SOCKS5 proxy into the network")
    c.add_argument("--config", "-c", help="client TOML config file")
    c.add_argument("--socks-port", type=int, help="override socks_address's port")
    c.add_argument("--control-port", type=_port_auto_or_off, metavar="PORT|auto|off",
                   help="control port on 127.0.0.1 (default 9151, or any free port when 9151 is taken; "
                        "written to DATA_DIR/control_port)")
    c.add_argument("--metrics-port", type=_port_or_auto, metavar="PORT",
                   help="enable Prometheus metrics on 127.0.0.1:PORT/metrics ('auto' = any free port)")
    c.add_argument("--http-tunnel-port", type=_port_or_auto, metavar="PORT",
                   help="HTTP CONNECT proxy on 127.0.0.1:PORT (tor's HTTPTunnelPort; 'auto' = any free port)")
    c.add_argument("--dns-port", type=_port_or_auto, metavar="PORT",
                   help="DNS resolver (UDP) on 127.0.0.1:PORT through the network (tor's DNSPort; 'auto' = any)")
    c.add_argument("--data-dir", help="override data_dir")
    c.add_argument("--tor-dirauth-file", help="use a Tor network: a file of torrc DirAuthority lines")
    c.add_argument("--unsafe-logging", action="store_true", help="show destinations in logs (debugging only)")
    _add_config_checks(c)
    c.set_defaults(func=_cmd_client)
    t = sub.add_parser("testnet", help="run a private network on loopback plus a client (the demo)")
    t.add_argument("--relays", type=int, default=5, help="number of relays (default 5)")
    t.add_argument("--exits", type=int, default=2, help="how many of them are exits (default 2)")
    t.add_argument("--authorities", type=int, default=1, help="number of directory authorities (default 1)")
    t.add_argument("--socks-port", type=_port_or_auto, default=9150,
                   help="client SOCKS5 port (default 9150; 'auto' = any free port)")
    t.add_argument("--control-port", type=_port_or_auto, default=9151,
                   help="client control port (default 9151; 'auto' = any free port; 0 = disabled)")
    t.add_argument("--metrics-port", type=_port_or_auto, metavar="PORT",
                   help="client Prometheus metrics on 127.0.0.1:PORT/metrics (default off; 'auto' = any free port)")
    t.add_argument("--http-tunnel-port", type=_port_or_auto, metavar="PORT",
                   help="client HTTP CONNECT proxy on 127.0.0.1:PORT (tor's HTTPTunnelPort; default off; "
                        "'auto' = any free port)")
    t.add_argument("--dns-port", type=_port_or_auto, metavar="PORT",
                   help="client DNS resolver (UDP) on 127.0.0.1:PORT, answered through the network "
                        "(tor's DNSPort; default off; 'auto' = any free port)")
    t.add_argument("--data-dir", help="keep everything here (default: a temporary directory)")
    t.add_argument("--voting-interval", type=int, default=5, help="seconds between consensuses (default 5)")
    t.add_argument("--log-level", default="warning", choices=list(LOG_LEVELS))
    t.add_argument("--link-delay", type=_delay_range, metavar="MS|MIN-MAX",
                   help="emulate a wide-area network: every link to a relay gets this one-way delay "
                        "(each relay a fixed value in MIN-MAX), through `onionp2p wan` proxies")
    t.add_argument("--base-port", type=int, metavar="PORT",
                   help="fixed ports: authorities' directory ports from PORT on, then the relays' OR ports "
                        "(default: any free ports)")
    t.add_argument("--no-congestion-control", action="store_true",
                   help="the client uses fixed SENDME windows (relays still offer congestion control)")
    t.add_argument("--no-cgo", action="store_true",
                   help="the client uses tor1 relay crypto (relays still offer CGO)")
    t.set_defaults(func=_cmd_testnet)
    w = sub.add_parser("wan", help="latency-adding TCP proxies (a wide-area network emulator)")
    w.add_argument("--map", action="append", required=True, metavar="LISTEN_PORT:HOST:PORT:DELAY_MS",
                   help="listen on 127.0.0.1:LISTEN_PORT, forward to HOST:PORT, DELAY_MS each way (repeat)")
    w.set_defaults(func=_cmd_wan)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onionp2p", description="An onion-routed overlay network (tor-spec).")
    p.add_argument("--version", action="version", version=f"onionp2p {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("relay", help="run a relay (onion router)")
    r.add_argument("--config", "-c", required=True, help="relay TOML config file")
    r.add_argument("--unsafe-logging", action="store_true",
                   help="show client addresses and destinations in logs (debugging only)")
    r.add_argument("--tor-dirauth-file", metavar="FILE",
                   help="join a Tor network: a file of torrc DirAuthority lines (overrides tor_dirauth_file)")
    _add_config_checks(r)
    r.set_defaults(func=_cmd_relay)
    _add_authority_parser(sub)
    _add_client_parsers(sub)
    from onionp2p.ops.circuits import add_tool_parsers

    add_tool_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ListenError as exc:
        print(f"onionp2p: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        for line in exc.problems:
            print(f"onionp2p: error: {line}", file=sys.stderr)
        return 2
    except OnionError as exc:
        print(f"onionp2p: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
