"""HTTP CONNECT front end (tor's HTTPTunnelPort; specs/socks.md "HTTP CONNECT port").

:class:`HttpTunnelServer` is the SOCKS port's sibling for applications that can only use
an HTTPS proxy. It reads one ``CONNECT host:port`` request with
:class:`~onionp2p.proto.httpconnect.HttpConnectParser` (bounded size, ``handshake_timeout``)
and then takes the very path a SOCKS CONNECT takes —
:meth:`~onionp2p.client.socksport.AppProxyServer.tunnel`: the same backend call, the same
isolation key (``Proxy-Authorization`` plays the part of the SOCKS credentials, the client
address and this listener's session group the rest), the same splice. Only the answers
differ: ``HTTP/1.1 200 Connection established`` or an HTTP error status.
"""

from __future__ import annotations

import asyncio
from typing import Any

from onionp2p.client.socksport import HANDSHAKE_READ, AppProxyServer, log
from onionp2p.proto.httpconnect import (
    ESTABLISHED,
    HttpConnectError,
    HttpConnectParser,
    http_response,
    response_for_reply,
)

__all__ = ["HttpTunnelServer"]


class HttpTunnelServer(AppProxyServer):
    """An HTTP CONNECT listener (127.0.0.1) sending every tunnel through ``backend``."""

    kind = "HTTP tunnel"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any) -> None:
        parser = HttpConnectParser(client_address=peer, session_group=self.session_group)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                while (ready := parser.receive_data(await reader.read(HANDSHAKE_READ) or b"")) is None:
                    if reader.at_eof():
                        self.stats.handshake_failed += 1
                        return
        except HttpConnectError as exc:
            self.stats.handshake_failed += 1
            log.info("HTTP tunnel request refused", error=str(exc), client=peer)
            await self._send_final(writer, exc.response)
            return
        except TimeoutError:
            self.stats.handshake_failed += 1
            log.info("HTTP tunnel handshake timed out", client=peer, buffered=parser.buffered)
            await self._send_final(writer, http_response(408, "No complete CONNECT request in time.\n"))
            return
        await self.tunnel(ready.request, ready.extra, reader, writer, success=ESTABLISHED,
                          failure=response_for_reply)
