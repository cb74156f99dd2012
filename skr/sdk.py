"""The transport every Azure SDK client skr builds uses (Key Vault for ``skr keys`` and friends, Azure
Storage for ``skr encfs``): azure-core's aiohttp transport with skr's rules for upstream answers — TLS
verified by skr's context, no redirect followed (any 3xx is ``upstream_redirect``), no body buffered past the
cap (``upstream_too_large``).

Only the commands and encfs import this module (and with it azure-core): the sidecar's own upstream calls go
through :mod:`skr.upstream`.
"""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
from azure.core.pipeline.transport import AioHttpTransport

from skr.upstream import DEFAULT_MAX_UPSTREAM_BODY, read_capped, redirect_error


def capped_response_class(limit: int, service: str) -> type[aiohttp.ClientResponse]:
    """An aiohttp response class whose ``read()`` refuses (``upstream_too_large``) a body over ``limit``
    bytes before buffering it: how the SDK transports, which read whole bodies, get skr's cap."""

    class CappedResponse(aiohttp.ClientResponse):
        async def read(self) -> bytes:
            if self._body is None:
                self._body = await read_capped(self, limit, service=service)
            return await super().read()

    return CappedResponse


class UpstreamTransport(AioHttpTransport):  # type: ignore[misc]
    """azure-core's aiohttp transport with skr's rules for upstream answers: any 3xx is an
    ``upstream_redirect`` error (raised in the transport, so no SDK policy can follow it), and bodies are
    capped by the session's :func:`capped_response_class`."""

    def __init__(self, *, service: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._service = service

    async def send(self, request: Any, **config: Any) -> Any:
        response = await super().send(request, **config)
        status = int(response.status_code)
        if 300 <= status <= 399:
            location = response.headers.get("Location")
            response.internal_response.close()
            raise redirect_error(self._service, str(request.url), status, location)
        return response


def verifying_transport(
    ssl_context: ssl.SSLContext,
    *,
    connections_per_host: int = 0,
    service: str = "Key Vault",
    max_body: int = DEFAULT_MAX_UPSTREAM_BODY,
    **settings: Any,
) -> AioHttpTransport:
    """An azure-core aiohttp transport whose session verifies TLS with ``ssl_context``, follows no
    redirect and reads at most ``max_body`` bytes of an answer (:class:`UpstreamTransport`).

    azure-core's ``connection_verify=<path>`` trusts *only* that file (``create_default_context(cafile=)``);
    skr's rule is system roots *plus* the bundle, so the trust decision is made once, in our context.
    ``connections_per_host`` caps simultaneous connections to one host (0: no cap); further requests wait
    for a free connection. ``service`` names the upstream in errors. Must be called while an event loop is
    running.
    """
    connector = aiohttp.TCPConnector(ssl=ssl_context, limit_per_host=connections_per_host)
    session = aiohttp.ClientSession(
        connector=connector, response_class=capped_response_class(max_body, service)
    )
    return UpstreamTransport(service=service, session=session, session_owner=True, **settings)
