"""The ``onionp2p`` command line (README "CLI").

``onionp2p relay --config FILE`` runs a relay until SIGINT/SIGTERM, then destroys its
circuits, closes its channels and exits 0. SIGUSR1 logs a status line (channels,
circuits, streams, queued cells), like tor's SIGUSR1 dump. SIGHUP is ignored for now.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import replace

from . import __version__
from .config import RelayConfig, load_relay_config
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
