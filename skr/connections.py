"""Client connections the sidecar holds: bounded in number and in how long a request may take to arrive.

Owns two limits on aiohttp's connection handler (``SKR_CLIENT_TIMEOUT``, ``SKR_MAX_CONNECTIONS``):

- **Request read deadline.** From its first byte (or from the connection's start, for a connection that
  sends nothing), a request's headers and body must be complete within the client timeout (a body still
  owed when the handler starts must arrive by that same deadline). Otherwise the connection is closed.
  A request that arrived whole is never cut off by this deadline however long its handler takes (its
  deadline is ``SKR_REQUEST_DEADLINE``), and an idle keep-alive connection is governed by the keep-alive
  timeout.
- **Connection cap.** At most ``max_connections`` are held at once. At the cap, a new connection takes
  the place of the oldest one that is *not* serving a complete request (a client still sending, or idle
  between requests), which is closed; when every held connection is serving a request, the new one is
  closed immediately. So slow or idle clients cannot lock out a client that sends its request at once.

Never reads or logs request bytes; the only log lines are counts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web, web_protocol

from skr.server import ApiRunner, _JsonErrorHandler, _JsonErrorServer

log = logging.getLogger("skr.connections")

# Idle keep-alive connections are closed after this long (aiohttp's run_app default; its bare default
# is an hour). It also bounds the one case the read deadline does not watch: a request pipelined behind
# another whose headers never complete.
KEEPALIVE_TIMEOUT = 75.0


class ConnectionGuard:
    """The limits and the connections held now, oldest first (shared by one server's handlers)."""

    def __init__(self, *, client_timeout: float, max_connections: int) -> None:
        self.client_timeout = client_timeout
        self.max_connections = max_connections
        self.held: dict[GuardedHandler, None] = {}  # insertion order = age
        self.refused = 0

    def admit(self, handler: GuardedHandler) -> bool:
        """Hold ``handler``'s connection, making room by closing an interruptible one; False: refuse it."""
        if len(self.held) >= self.max_connections:
            victim = next((h for h in self.held if h.interruptible()), None)
            if victim is None:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning(
                        "connection limit reached: refusing new connections while every one is busy",
                        extra={"max_connections": self.max_connections, "refused": self.refused},
                    )
                return False
            self.held.pop(victim, None)
            victim.drop()
        self.held[handler] = None
        return True

    def release(self, handler: GuardedHandler) -> None:
        self.held.pop(handler, None)


class GuardedHandler(_JsonErrorHandler):
    """aiohttp's connection handler (with skr's JSON protocol errors) under a :class:`ConnectionGuard`."""

    __slots__ = ("_skr_admitted", "_skr_deadline", "_skr_guard", "_skr_timer")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._skr_guard = guard
        self._skr_timer: asyncio.TimerHandle | None = None
        self._skr_deadline: float | None = None  # loop time by which the current request must be in
        self._skr_admitted = False

    # --- connection lifecycle ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._skr_guard.admit(self):
            transport.close()  # refused: never registered with the server, never read from
            return
        self._skr_admitted = True
        super().connection_made(transport)
        self._arm()  # the client owes its first request from now on

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if not self._skr_admitted:
            return  # a refused connection: aiohttp never saw it
        self._skr_admitted = False
        self._skr_guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._skr_timer is None and not self._request_in_progress and not self._messages:
            self._arm()  # the first bytes of a request: it must be complete within the client timeout
        super().data_received(data)

    async def _handle_request(
        self, request: web.BaseRequest, start_time: float | None, request_handler: Any
    ) -> tuple[web.StreamResponse, bool]:
        deadline = self._skr_deadline
        self._disarm()  # the headers are complete
        if not request.content.is_eof():
            self._arm(deadline)  # the body is still owed, by the same deadline as the headers
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._disarm()
            self._skr_deadline = None

    # --- the deadline -----------------------------------------------------------------------------

    def interruptible(self) -> bool:
        """Not serving a complete request: still receiving one, or idle between requests."""
        if self._messages:
            return False
        if not self._request_in_progress:
            return True
        request = self._current_request
        return request is not None and not request.content.is_eof()

    def drop(self) -> None:
        """Close the connection now (a slow client past its deadline, or evicted to make room)."""
        self._disarm()
        transport = self.transport
        self.force_close()
        if transport is not None:
            transport.close()

    def _arm(self, deadline: float | None = None) -> None:
        """Close the connection at ``deadline`` (default: the client timeout from now) unless the request
        has arrived by then."""
        if self._skr_timer is None:
            when = deadline if deadline is not None else self._loop.time() + self._skr_guard.client_timeout
            self._skr_deadline = when
            self._skr_timer = self._loop.call_at(when, self._expired)

    def _disarm(self) -> None:
        if self._skr_timer is not None:
            self._skr_timer.cancel()
            self._skr_timer = None

    def _expired(self) -> None:
        self._skr_timer = None
        if self.transport is None or not self.interruptible():
            return
        log.info(
            "closed a connection whose request did not arrive within the client timeout",
            extra={"client_timeout": self._skr_guard.client_timeout},
        )
        self.drop()


class _GuardedServer(_JsonErrorServer):
    def __call__(self) -> web_protocol.RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)


class GuardedRunner(ApiRunner):
    """:class:`ApiRunner` whose connections are held under ``guard`` (see the module docstring)."""

    def __init__(self, app: web.Application, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT)
        super().__init__(app, guard=guard, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer
        return server
