"""The ``onionp2p`` command line (README "CLI").

``onionp2p relay --config FILE`` runs a relay until SIGINT/SIGTERM, then destroys its
circuits, closes its channels and exits 0. SIGUSR1 logs a status line (channels,
circuits, streams, queued cells), like tor's SIGUSR1 dump. SIGHUP is ignored for now.
With ``authorities`` configured the relay also does its directory duties
(:class:`~onionp2p.dirclient.RelayDirectory`).

``onionp2p authority --config FILE`` runs a directory authority (and, unless
``run_relay = false``, a non-exit relay beside it) the same way; ``--show-identity``
only creates the identity key if needed and prints the authority's configuration line.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import replace

from . import __version__
from .config import AuthorityConfig, RelayConfig, load_authority_config, load_relay_config
from .errors import OnionError
from .log import configure_logging, get_logger

__all__ = ["main"]


def _relay_status(relay) -> dict:
    return {
        "channels": len(relay.channels),
        "circuits": len(relay.circuits),
        "streams": sum(len(c.streams) for c in relay.circuits),
        "queued_cells": sum(ch.queued_cells() for ch in relay.channels),
        **relay.stats,
    }


async def run_relay(cfg: RelayConfig, *, shutdown_timeout: float = 5.0) -> int:
    from .keys import RelayKeys
    from .relay import Relay

    log = get_logger("onionp2p.cli", nickname=cfg.nickname)
    keys = RelayKeys.load_or_create(cfg.data_dir / "keys",
                                    onion_key_lifetime=cfg.onion_key_lifetime_days * 86400)
    relay = Relay(
        keys, nickname=cfg.nickname, address=cfg.or_address[0], port=cfg.or_address[1],
        exit_policy=cfg.exit_policy, data_dir=cfg.data_dir,
        max_circuits_per_channel=cfg.max_circuits_per_channel,
        max_streams_per_circuit=cfg.max_streams_per_circuit,
        extend_allow_private=cfg.extend_allow_private,
        bandwidth_rate=cfg.bandwidth_rate, bandwidth_burst=cfg.effective_bandwidth_burst,
        directory=relay_directory(cfg),
    )
    await relay.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("relay status", **_relay_status(relay)))
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored"))
    print(f"onionp2p relay {cfg.nickname} listening on {cfg.or_address[0]}:{relay.port} "
          f"fingerprint {keys.fingerprint}", flush=True)
    await stop.wait()
    log.info("shutting down", **_relay_status(relay))
    try:
        await asyncio.wait_for(relay.stop(), shutdown_timeout)
    except asyncio.TimeoutError:
        log.warning("shutdown timed out")
    log.info("stopped")
    return 0


def relay_directory(cfg: RelayConfig):
    """The relay's directory duties, or None when no authorities are configured."""
    if not cfg.authorities:
        return None
    from .dirclient import RelayDirectory

    return RelayDirectory(cfg.data_dir, cfg.authorities,
                          bandwidth=(cfg.bandwidth_rate, cfg.effective_bandwidth_burst, 0),
                          family=cfg.family, contact=cfg.contact)


async def run_authority(cfg: AuthorityConfig, *, shutdown_timeout: float = 5.0) -> int:
    """Run a directory authority (plus its relay unless ``run_relay`` is false) until SIGINT/SIGTERM."""
    from .authority import Authority, FlagRules, authority_line, load_or_create_authority_key
    from .dirclient import RelayDirectory
    from .directory import parse_authorities
    from .keys import RelayKeys
    from .relay import Relay

    log = get_logger("onionp2p.cli", nickname=cfg.nickname)
    key = load_or_create_authority_key(cfg.data_dir)
    authorities = parse_authorities(cfg.authorities)
    rules = FlagRules(stable_uptime=cfg.stable_uptime, guard_uptime=cfg.guard_uptime,
                      assume_guard=cfg.assume_guard, assume_exit=cfg.assume_exit)
    authority = Authority(key, nickname=cfg.nickname, authorities=authorities, data_dir=cfg.data_dir,
                          dir_host=cfg.dir_address[0], dir_port=cfg.dir_address[1],
                          voting_interval=cfg.voting_interval, rules=rules)
    await authority.start()
    relay = None
    if cfg.run_relay:
        keys = RelayKeys.load_or_create(cfg.data_dir / "keys")
        relay = Relay(keys, nickname=cfg.nickname, address=cfg.or_address[0], port=cfg.or_address[1],
                      data_dir=cfg.data_dir, extend_allow_private=cfg.extend_allow_private,
                      directory=RelayDirectory(cfg.data_dir / "relay", authorities))
        (cfg.data_dir / "relay").mkdir(mode=0o700, exist_ok=True)
        await relay.start()
    line = authority_line(cfg.nickname, cfg.dir_address[0], authority.dir_port, key)
    (cfg.data_dir / "authority.txt").write_text(line + "\n")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("authority status", **authority.status()))
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored"))
    print(f"onionp2p authority {cfg.nickname} directory on {cfg.dir_address[0]}:{authority.dir_port} "
          f"line: {line}", flush=True)
    await stop.wait()
    log.info("shutting down", **authority.status())
    try:
        async with asyncio.timeout(shutdown_timeout):
            if relay is not None:
                await relay.stop()
            await authority.stop()
    except TimeoutError:
        log.warning("shutdown timed out")
    log.info("stopped")
    return 0


def _cmd_authority(args: argparse.Namespace) -> int:
    cfg = load_authority_config(args.config)
    if args.show_identity:
        from .authority import authority_line, load_or_create_authority_key

        key = load_or_create_authority_key(cfg.data_dir)
        print(authority_line(cfg.nickname, cfg.dir_address[0], cfg.dir_address[1], key))
        return 0
    if args.unsafe_logging:
        cfg = replace(cfg, safe_logging=False)
    configure_logging(cfg.log_level, cfg.log_format, safe_logging=cfg.safe_logging)
    return asyncio.run(run_authority(cfg))


def _add_authority_parser(sub) -> None:
    a = sub.add_parser("authority", help="run a directory authority")
    a.add_argument("--config", "-c", required=True, help="authority TOML config file")
    a.add_argument("--show-identity", action="store_true",
                   help="create the identity key if needed, print this authority's line and exit")
    a.add_argument("--unsafe-logging", action="store_true",
                   help="show client addresses in logs (debugging only)")
    a.set_defaults(func=_cmd_authority)


def _cmd_relay(args: argparse.Namespace) -> int:
    cfg = load_relay_config(args.config)
    if args.unsafe_logging:
        cfg = replace(cfg, safe_logging=False)
    configure_logging(cfg.log_level, cfg.log_format, safe_logging=cfg.safe_logging)
    return asyncio.run(run_relay(cfg))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onionp2p", description="An onion-routed overlay network (tor-spec).")
    p.add_argument("--version", action="version", version=f"onionp2p {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("relay", help="run a relay (onion router)")
    r.add_argument("--config", "-c", required=True, help="relay TOML config file")
    r.add_argument("--unsafe-logging", action="store_true",
                   help="show client addresses and destinations in logs (debugging only)")
    r.set_defaults(func=_cmd_relay)
    _add_authority_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OnionError as exc:
        print(f"onionp2p: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
