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
