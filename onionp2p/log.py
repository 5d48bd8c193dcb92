"""Structured logging (structlog) with tor-style "safe logging".

Theory of operation
-------------------
Every module logs through :func:`get_logger`, which returns a structlog logger bound to
a stdlib :class:`logging.Logger` of the same name. Layers bind their identifiers once
(``log = get_logger(__name__, chan_id=3).bind(circ_id=0x80000001)``) and every event
carries them as key/value pairs.

The structlog processor chain is *static* — it only adds the level, logger name and an
ISO-8601 UTC timestamp, then hands the event to stdlib ``logging``. Everything that
:func:`configure_logging` can change lives in one handler on the root logger: its level,
its output stream and a :class:`structlog.stdlib.ProcessorFormatter` that scrubs and
renders (console or JSON). So loggers created or bound before (re)configuration keep
working, and records from plain stdlib loggers (asyncio, libraries) go through the same
handler, scrubbing and renderer.

Safe logging (on by default, like tor's ``SafeLogging 1``) replaces with ``"[scrubbed]"``:

* the value of any event key in :data:`SENSITIVE_KEYS`, or ending in one of
  :data:`SENSITIVE_SUFFIXES` (``peer_addr``, ``target_host`` ...). These are the keys that
  by convention carry who a client is or where it connects: client/peer IPs, stream
  destinations, SOCKS credentials, URLs;
* any value wrapped with :func:`safe`, whatever its key — also when it is formatted into
  a string (``f"{safe(x)}"``) or passed as a ``%s`` argument to a stdlib logger.

With safe logging off (a debugging aid), the real values are shown. Scrubbing works on
key/value pairs only: free text in the event message is not inspected, so never put a
sensitive value into the message itself except through :func:`safe`. Tracebacks are
rendered without frame locals, but an exception's own message is printed as is.

Log file
--------
With ``log_file`` (tor's ``Log notice file FILE``) events go to that file, appended, instead
of stderr. :func:`reopen_log_file` closes it and opens the same path again: after logrotate
renamed it, new lines land in a new file. ``onionp2p`` calls it on SIGHUP and SIGUSR1, the
signals logrotate's ``postrotate`` sends to tor.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from onionp2p.errors import ConfigError

__all__ = [
    "SCRUBBED",
    "SENSITIVE_KEYS",
    "SENSITIVE_SUFFIXES",
    "Sensitive",
    "safe",
    "is_safe_logging",
    "scrub_sensitive",
    "configure_logging",
    "reopen_log_file",
    "LIVE_LOG_KEYS",
    "apply_log_config",
    "reset_logging",
    "get_logger",
    "NOTICE",
    "notice",
]

#: Replacement text for scrubbed values.
SCRUBBED = "[scrubbed]"

#: Event keys whose values identify a client or its destination.
SENSITIVE_KEYS = frozenset({
    "address", "addr", "ip", "target", "host", "hostname", "port_target", "dest",
    "destination", "peer", "client", "remote", "socks_user", "socks_username",
    "socks_password", "username", "password", "url", "query", "resolved", "answer",
})

#: Key suffixes treated as sensitive too (``peer_addr``, ``exit_target`` ...).
SENSITIVE_SUFFIXES = ("_addr", "_address", "_ip", "_host", "_hostname", "_dest",
                      "_destination", "_target", "_peer", "_client", "_remote")

#: tor's "notice" level, between info and warning: what an operator should see when all is well
#: (bootstrap progress, reachability); shown at log_level "notice" and below
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": NOTICE, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class _State:
    safe_logging = True
    handler: logging.Handler | None = None
    structlog_ready = False


class _LogFileHandler(logging.StreamHandler):
    """Appends to a file (created mode 0600: logs name relays and ports) that
    :meth:`reopen` opens again at the same path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> IO[str]:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"log_file: cannot open {self.path}: {exc.strerror or exc}") from None
        return os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        """Close the file and open the path again (a new file after logrotate moved it)."""
        new = self._open()
        self.acquire()
        try:
            old, self.stream = self.stream, new
        finally:
            self.release()
        old.close()

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()
        finally:
            self.release()
        super().close()


def is_safe_logging() -> bool:
    """True iff safe logging is currently on."""
    return _State.safe_logging


class Sensitive:
    """A value that must be scrubbed from logs while safe logging is on (see :func:`safe`)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def reveal(self) -> object:
        """The wrapped value, or :data:`SCRUBBED` under safe logging."""
        return SCRUBBED if _State.safe_logging else self.value

    def __str__(self) -> str:
        return str(self.reveal())

    def __repr__(self) -> str:
        return SCRUBBED if _State.safe_logging else repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec) if _State.safe_logging else format(self.value, spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sensitive) and other.value == self.value

    def __hash__(self) -> int:
        return hash(("Sensitive", self.value))


def safe(value: object) -> Sensitive:
    """Mark *value* as sensitive: logged as ``[scrubbed]`` unless safe logging is off."""
    return value if isinstance(value, Sensitive) else Sensitive(value)


def _is_sensitive_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    k = key.lower()
    return k in SENSITIVE_KEYS or k.endswith(SENSITIVE_SUFFIXES)


def scrub_sensitive(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: apply the safe-logging rules to *event_dict* (in place)."""
    on = _State.safe_logging
    for key, value in list(event_dict.items()):
        if isinstance(value, Sensitive):
            event_dict[key] = SCRUBBED if on else value.value
        elif on and value is not None and _is_sensitive_key(key):
            event_dict[key] = SCRUBBED
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _ensure_structlog(force: bool = False) -> None:
    if _State.structlog_ready and not force:
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )
    _State.structlog_ready = True


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def configure_logging(level: str = "info", fmt: str = "console", *, safe_logging: bool = True,
                      stream: IO[str] | None = None, log_file: str | Path | None = None) -> None:
    """Route structlog and stdlib logging to *log_file* (appended), else *stream* (default stderr).

    *level*: debug | info | notice | warning | error. *fmt*: ``console`` (colours only on a TTY)
    or ``json`` (one object per line). May be called again to reconfigure. A log file that
    cannot be opened raises ConfigError and leaves the previous configuration in place.
    """
    if not isinstance(level, str) or level.lower() not in _LEVELS:
        raise ConfigError(f"unknown log level {level!r}")
    if fmt not in ("console", "json"):
        raise ConfigError(f"unknown log format {fmt!r}")
    file_handler = _LogFileHandler(Path(log_file)) if log_file is not None else None
    _ensure_structlog(force=True)
    out = sys.stderr if stream is None else stream
    if file_handler is not None:
        out = file_handler.stream
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                              scrub_sensitive]
    if fmt == "json":
        # format_exc_info renders a plain traceback string: no frame locals, which
        # could hold client addresses.
        final += [structlog.processors.format_exc_info,
                  structlog.processors.JSONRenderer(default=str, sort_keys=False)]
    else:
        final.append(structlog.dev.ConsoleRenderer(
            colors=_is_tty(out), exception_formatter=structlog.dev.plain_traceback,
            sort_keys=False,
        ))
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=final,
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder()],
    )
    handler = file_handler if file_handler is not None else logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _State.handler is not None:
        root.removeHandler(_State.handler)
        if isinstance(_State.handler, _LogFileHandler):
            _State.handler.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS[level.lower()])
    _State.handler = handler
    _State.safe_logging = bool(safe_logging)
    logging.captureWarnings(True)


def reopen_log_file() -> bool:
    """Open the log file again at its path (SIGHUP/SIGUSR1, for logrotate). False when
    logging goes to a stream, or when the file cannot be opened (then logged, and the old
    file is kept)."""
    handler = _State.handler
    if not isinstance(handler, _LogFileHandler):
        return False
    try:
        handler.reopen()
    except ConfigError as exc:
        get_logger("onionp2p.log").warning("cannot reopen the log file; still writing to the old one",
                                           error=str(exc))
        return False
    return True


#: the logging keys of every node config that a reload (SIGHUP) applies at once
LIVE_LOG_KEYS = ("log_level", "log_format", "log_file")


def apply_log_config(old: Any, new: Any) -> list[str]:
    """Reconfigure logging where the configs ``old`` and ``new`` (RelayConfig, ClientConfig,
    AuthorityConfig) differ in :data:`LIVE_LOG_KEYS`; returns the keys that changed. Safe
    logging stays as it is (``--unsafe-logging`` on the command line must survive a reload).
    Raises ConfigError (logging unchanged) when the new log file cannot be opened."""
    changed = [k for k in LIVE_LOG_KEYS if getattr(old, k) != getattr(new, k)]
    if changed:
        configure_logging(new.log_level, new.log_format, safe_logging=_State.safe_logging,
                          log_file=new.log_file)
    return changed


def reset_logging() -> None:
    """Remove the handler installed by :func:`configure_logging`; safe logging back on."""
    if _State.handler is not None:
        logging.getLogger().removeHandler(_State.handler)
        if isinstance(_State.handler, _LogFileHandler):
            _State.handler.close()
        _State.handler = None
    _State.safe_logging = True


def notice(name: str, event: str, **fields: Any) -> None:
    """Log *event* at :data:`NOTICE` on logger *name*, with *fields* as key/value pairs.

    structlog's bound loggers only know the standard levels, so notices go through the stdlib
    logger of the same name: the one handler renders, filters and scrubs them like any event.
    """
    logging.getLogger(name).log(NOTICE, event, extra=fields)


def get_logger(name: str, **context: Any) -> Any:
    """A structlog logger named *name*, with *context* bound (e.g. ``circ_id=...``)."""
    _ensure_structlog()
    return structlog.get_logger(name, **context)
