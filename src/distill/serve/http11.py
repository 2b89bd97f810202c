"""uvicorn's HTTP/1.1 protocol with a header timeout: a client must finish a request's headers
within ``header_timeout`` seconds of connecting (or of its previous response), or the connection is
closed.

uvicorn's own timeouts do not cover this: ``timeout_keep_alive`` closes a connection that stays
silent *between* requests, but a client that sends a few header bytes and then stalls ("slowloris")
holds its connection, and a slot of ``limit_concurrency``, for as long as it likes. Here a timer is
armed whenever the connection waits for a request's headers (h11's peer state ``IDLE``) and
cancelled as soon as they are complete; the request body and the answer are not timed (a long
generation is not a slow client).
"""

from __future__ import annotations

from typing import Any

HEADER_TIMEOUT = 10.0
"""Default seconds a client has to send a request's complete headers (`distill serve --header-timeout`)."""


def with_header_timeout(seconds: float) -> type:
    """uvicorn's ``H11Protocol`` closing connections whose request headers are not complete within
    ``seconds``: the class to pass as ``uvicorn.run(..., http=...)``. (uvicorn and h11 are imported
    here, so that the command line can read `HEADER_TIMEOUT` without the serve extra.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if not seconds > 0:
        raise ValueError(f"--header-timeout must be > 0 seconds, got {seconds!r}")

    class HeaderTimeoutH11Protocol(H11Protocol):
        header_timeout = float(seconds)
        _header_timer: Any = None

        def _sync_header_timer(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)
            elif not waiting and self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout_expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()  # headers never finished: drop the connection, as for keep-alive

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._sync_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._sync_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._sync_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


__all__ = ["HEADER_TIMEOUT", "with_header_timeout"]
