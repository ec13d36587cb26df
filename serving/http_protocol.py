"""uvicorn's HTTP/1.1 protocol with the limits a server open to untrusted clients needs.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends nothing, or sends
its headers a byte at a time (slowloris), holds a socket and a file descriptor for as long as it likes;
twenty thousand of them take the server down. Here:

  - a request's headers must be complete within `header_timeout` seconds of the connection opening, or of the
    first byte of the next request on a kept-alive connection; otherwise the connection is closed;
  - at most `max_connections` connections are open at once; a connection beyond is closed at once (the clients
    already connected keep their service).

Bodies are not timed here: an upload may legitimately take long, and its size is bounded by the routes.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("deltaserve")


def guarded_h11(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """The protocol class for uvicorn.Config(http=...)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                self._refused = True
                log.warning("connection refused: %d connections open (limit %d)", len(self.connections), max_connections)
                transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._awaiting_headers():
                self._arm()
            super().data_received(data)
            if not self._awaiting_headers():
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if not self._refused:
                super().connection_lost(exc)

        def _awaiting_headers(self) -> bool:
            """No request in progress: the next bytes are (part of) a request's headers."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._on_header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self._awaiting_headers() and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
