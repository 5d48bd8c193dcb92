"""Bootstrap progress as tor reports it (tor's control_bootstrap.c; control-spec §5.5).

Theory of operation
-------------------
A node (client or relay) owns one :class:`Bootstrap`. Code that reaches a milestone calls
:meth:`Bootstrap.report` with tor's phase tag; the percentage and summary come from
:data:`PHASES`, tor's own table. Progress only moves forward, as in tor: a phase at or below
the current percentage is ignored, so callers need not know what was reported before (a
second circuit's "connecting" after the first one's "done" is a no-op).

Each new phase is logged at notice level as tor does (``Bootstrapped 5% (conn): Connecting
to a relay``) and passed to :attr:`Bootstrap.events` as ``fn(progress, tag, summary)``; the
control port turns that into ``STATUS_CLIENT NOTICE BOOTSTRAP PROGRESS=.. TAG=..
SUMMARY=".."`` events and answers ``GETINFO status/bootstrap-phase`` from :attr:`status`.

OR-connection milestones mean different phases before and after the node has enough
directory information (tor: ``conn``/``handshake`` for the directory connection,
``ap_conn``/``ap_handshake`` for the first circuit's): :meth:`Bootstrap.or_progress` maps the
neutral steps reported by the circuit-building code to the right tag.
"""

from __future__ import annotations

from onionp2p.listeners import Listeners
from onionp2p.log import notice

__all__ = ["PHASES", "Bootstrap", "format_line"]

#: tor's bootstrap phases: tag -> (percent, summary), in order (control_bootstrap.c,
#: control_events.h). The pluggable-transport and proxy phases are listed for completeness;
#: onionp2p has neither, so it never reports them.
PHASES: dict[str, tuple[int, str]] = {
    "starting": (0, "Starting"),
    "conn_pt": (1, "Connecting to pluggable transport"),
    "conn_done_pt": (2, "Connected to pluggable transport"),
    "conn_proxy": (3, "Connecting to proxy"),
    "conn_done_proxy": (4, "Connected to proxy"),
    "conn": (5, "Connecting to a relay"),
    "conn_done": (10, "Connected to a relay"),
    "handshake": (14, "Handshaking with a relay"),
    "handshake_done": (15, "Handshake with a relay done"),
    "onehop_create": (20, "Establishing an encrypted directory connection"),
    "requesting_status": (25, "Asking for networkstatus consensus"),
    "loading_status": (30, "Loading networkstatus consensus"),
    "loading_keys": (40, "Loading authority key certs"),
    "requesting_descriptors": (45, "Asking for relay descriptors"),
    "loading_descriptors": (50, "Loading relay descriptors"),
    "enough_dirinfo": (75, "Loaded enough directory info to build circuits"),
    "ap_conn_pt": (76, "Connecting to pluggable transport to build circuits"),
    "ap_conn_done_pt": (77, "Connected to pluggable transport to build circuits"),
    "ap_conn_proxy": (78, "Connecting to proxy to build circuits"),
    "ap_conn_done_proxy": (79, "Connected to proxy to build circuits"),
    "ap_conn": (80, "Connecting to a relay to build circuits"),
    "ap_conn_done": (85, "Connected to a relay to build circuits"),
    "ap_handshake": (89, "Finishing handshake with a relay to build circuits"),
    "ap_handshake_done": (90, "Handshake finished with a relay to build circuits"),
    "circuit_create": (95, "Establishing a Tor circuit"),
    "done": (100, "Done"),
}

#: neutral OR-connection steps -> (tag before enough_dirinfo, tag after it); None: nothing
_OR_STEPS: dict[str, tuple[str | None, str]] = {
    "connecting": ("conn", "ap_conn"),
    "connected": ("conn_done", "ap_conn_done"),
    "handshaking": ("handshake", "ap_handshake"),
    "handshake_done": ("handshake_done", "ap_handshake_done"),
    "creating": ("onehop_create", "circuit_create"),
    "built": (None, "done"),
}

#: circuit events (client.CircuitEvent kinds) -> steps
_CIRCUIT_STEPS = {"launched": "creating", "built": "built"}


def format_line(progress: int, tag: str, summary: str) -> str:
    """tor's log line for a phase: ``Bootstrapped 5% (conn): Connecting to a relay``."""
    return f"Bootstrapped {progress}% ({tag}): {summary}"


class Bootstrap:
    """One node's bootstrap progress; ``logger`` names the logger, ``fields`` go on each line."""

    def __init__(self, logger: str, **fields: object):
        self._logger = logger
        self._fields = fields
        self.progress = -1  # nothing reported yet (tor's BOOTSTRAP_STATUS_UNDEF)
        self.tag = "starting"
        self.summary = PHASES["starting"][1]
        #: ``fn(progress, tag, summary)`` for every phase reached
        self.events = Listeners("bootstrap")

    @property
    def status(self) -> tuple[int, str, str]:
        """(percent, tag, summary) of the last phase reached (0, starting before any)."""
        return max(self.progress, 0), self.tag, self.summary

    @property
    def done(self) -> bool:
        return self.progress >= 100

    @property
    def has_dirinfo(self) -> bool:
        return self.progress >= PHASES["enough_dirinfo"][0]

    def report(self, tag: str) -> bool:
        """Reach phase ``tag`` (a key of :data:`PHASES`); False if progress is already there."""
        progress, summary = PHASES[tag]
        if progress <= self.progress:
            return False
        self.progress, self.tag, self.summary = progress, tag, summary
        notice(self._logger, format_line(progress, tag, summary), **self._fields)
        self.events(progress, tag, summary)
        return True

    def follow(self, client) -> None:
        """Report the circuit-building progress of ``client`` (an OnionClient): its connection
        progress, link handshakes (channel events) and circuit launches and builds."""
        client.progress.add(self.or_progress)
        client.channel_events.add(self._channel_event)
        client.events.add(self._circuit_event)

    def _channel_event(self, kind: str, _chan) -> None:
        if kind == "connected":  # its link handshake is done
            self.or_progress("handshake_done")

    def _circuit_event(self, ev) -> None:
        # as tor: a one-hop directory tunnel being built is not "done" (a circuit to use)
        if ev.kind == "launched" or (ev.kind == "built" and len(ev.path) > 1):
            self.or_progress(_CIRCUIT_STEPS[ev.kind])

    def or_progress(self, step: str) -> None:
        """A circuit-building step (``connecting``, ``connected``, ``handshaking``,
        ``handshake_done``, ``creating``, ``built``): the phase it means at this point."""
        before, after = _OR_STEPS[step]
        tag = after if self.has_dirinfo else before
        if tag is not None:
            self.report(tag)
