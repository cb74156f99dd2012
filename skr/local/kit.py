"""What the three local services (attestation, key service, identity) share on the wire.

Owns: the fault hook a service consults before each route (:class:`Faults`, e.g. a
:class:`skr.local.faults.FaultPlan` view) and the answer corruptions it chose (:func:`mutations_of`);
``Server-Timing: app;dur=<ms>`` on every answer; Azure's error body ``{"error": {"code", "message",
"innererror"?}}`` (:func:`azure_error`, :class:`ServiceError`); and :func:`local_app`, which builds a
service's aiohttp application from its route table with all of that wired in.

Never logs a request body or a token; an error body carries only the code and message given.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, str, Handler]
"""``(method, path, fault route name, handler)``: one entry of a local service's route table."""

_MUTATIONS: web.RequestKey[frozenset[str]] = web.RequestKey("skr.local.kit.mutations", frozenset)


class Faults(Protocol):
    """A fault injector for the local services (tests, demos): may answer a request instead of the route."""

    async def before(self, route: str, request: web.Request) -> web.StreamResponse | None:
        """A response to send instead of running ``route``, or None to run it."""
        ...

    def mutations_for(self, request: web.Request) -> Collection[str]:
        """Corruptions of the answer to ``request`` (``truncate_jws``, ``resign_jws``, ``wrong_issuer``,
        ``expired_cert``), asked after :meth:`before` let it through."""
        ...


def azure_error(
    status: int,
    code: str,
    message: str,
    *,
    inner_code: str | None = None,
    code_header: bool = False,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Azure's error answer ``{"error": {"code", "message", "innererror"?}}``; ``code_header`` also names
    the code in ``x-ms-error-code`` (as MAA does)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if inner_code:
        error["innererror"] = {"code": inner_code}
    all_headers = {**(headers or {}), **({"x-ms-error-code": code} if code_header else {})}
    return web.json_response({"error": error}, status=status, headers=all_headers or None)


class ServiceError(Exception):
    """An Azure-shaped error answer, raised anywhere below a route of :func:`local_app`."""

    def __init__(self, status: int, code: str, message: str, inner_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner_code = inner_code


def mutations_of(request: web.Request) -> frozenset[str]:
    """The answer corruptions the fault hook chose for ``request`` (none without a hook)."""
    chosen: frozenset[str] = request.get(_MUTATIONS, frozenset())
    return chosen


def _timing(started: float) -> str:
    return f"app;dur={(time.perf_counter() - started) * 1000:.1f}"


@web.middleware
async def _server_timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["Server-Timing"] = _timing(started)
        raise
    if not response.prepared:
        response.headers["Server-Timing"] = _timing(started)
    return response


@web.middleware
async def _service_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServiceError as exc:
        return azure_error(exc.status, exc.code, exc.message, inner_code=exc.inner_code)


def _hooked(faults: Faults | None, route: str, handler: Handler) -> Handler:
    if faults is None:
        return handler

    async def hooked(request: web.Request) -> web.StreamResponse:
        injected = await faults.before(route, request)
        if injected is not None:
            return injected
        request[_MUTATIONS] = frozenset(faults.mutations_for(request))
        return await handler(request)

    return hooked


def local_app(
    routes: Iterable[Route],
    *,
    faults: Faults | None,
    client_max_size: int,
    middlewares: Iterable[Any] = (),
) -> web.Application:
    """A local service's application: each route asks ``faults`` first, every answer carries
    ``Server-Timing``, and a :class:`ServiceError` becomes its Azure error body. ``middlewares`` run
    between the timing and the error translation."""
    app = web.Application(
        middlewares=[_server_timing, *middlewares, _service_errors], client_max_size=client_max_size
    )
    for method, path, route, handler in routes:
        app.router.add_route(method, path, _hooked(faults, route, handler))
    return app
