"""Defaults that a config and the objects built without one share, written once here.

:mod:`onionp2p.config` uses them as the defaults of its keys; the channel, the channel
manager and the library client use them when they are built directly.
"""

from __future__ import annotations

#: cells queued for one circuit on one channel before the circuit is destroyed
#: (tor's circ_max_cell_queue_size)
MAX_QUEUE_CELLS = 2500
#: seconds for TCP + TLS, and again for the link handshake
HANDSHAKE_TIMEOUT = 30
#: seconds after which an idle OR connection is probed (TCP keepalive) and after which data
#: or probes left unacknowledged make the kernel drop it (TCP_USER_TIMEOUT)
TCP_USER_TIMEOUT = 60

_I32 = 2**31 - 1
#: tor's guard-spec consensus parameters: (default, minimum, maximum), as entrynodes.c
#: (the client's guard selection reads them; the client config's ``guard_params`` may
#: override them within the same bounds)
GUARD_PARAM_RANGES: dict[str, tuple[int, int, int]] = {
    "guard-lifetime-days": (120, 1, 3650),
    "guard-confirmed-min-lifetime-days": (60, 1, 3650),
    "guard-remove-unlisted-guards-after-days": (20, 1, 365),
    "guard-max-sample-size": (60, 1, _I32),
    "guard-max-sample-threshold-percent": (20, 1, 100),
    "guard-min-filtered-sample-size": (20, 1, _I32),
    "guard-n-primary-guards": (3, 1, _I32),
    "guard-n-primary-guards-to-use": (1, 1, _I32),
    "guard-n-primary-dir-guards-to-use": (3, 1, _I32),
    "guard-internet-likely-down-interval": (600, 1, _I32),
    "guard-nonprimary-guard-connect-timeout": (15, 1, _I32),
    "guard-nonprimary-guard-idle-timeout": (600, 1, _I32),
}
#: not a tor parameter: every guard retry interval is divided by it (test networks); only
#: the client config's ``guard_params`` sets it, never a consensus
GUARD_RETRY_DIVISOR = "guard-retry-divisor"
GUARD_RETRY_DIVISOR_RANGE = (1, 86400)
