"""The HTTP API: Microsoft's Go sidecar's routes and bodies, plus health, readiness, metrics, OpenAPI.

Owns: request parsing (JSON whatever the Content-Type, strict standard base64 for ``runtime_data``,
unknown fields ignored), the error model (always ``{"error", "code", "request_id"}``, never a traceback,
never a 5xx for bad input), loopback-only access unless allowed, ``Host``/``Origin`` checks against DNS
rebinding and cross-site calls (:mod:`skr.hostcheck`), optional client-token authentication,
request ids, metrics and the ``Server-Timing`` header.

Never logs request bodies, tokens or keys.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from skr.audit.checkpoint import AuditRateLimited, Checkpointer
from skr.b64 import go_std_b64decode
from skr.errors import (
    BadRequest,
    Code,
    EvidenceUnavailable,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RemoteClientRefused,
    SkrError,
    Unauthenticated,
    UpstreamError,
    UpstreamTimeout,
    VerificationError,
    by_class,
)
from skr.hostcheck import check_host_and_origin, is_loopback_host
from skr.logs import request_id_var
from skr.metrics import Metrics
from skr.service import ReleaseService, RequestContext

log = logging.getLogger("skr.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE_KEY: web.AppKey[ReleaseService] = web.AppKey("service", ReleaseService)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
AUDIT_HEAD_KEY: web.AppKey[Checkpointer] = web.AppKey("audit_head", Checkpointer)
OPEN_PATHS = frozenset({"/status", "/healthz", "/readyz"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def json_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """Compact JSON without a trailing newline, as Go's ``c.JSON`` writes it."""
    resp = web.Response(text=json.dumps(body, separators=(",", ":")), status=status, headers=headers)
    resp.content_type = "application/json"
    resp.charset = "utf-8"
    return resp


#: The HTTP status of each domain error class. :func:`http_status` walks the error's MRO, so the most
#: specific class wins (a ``PayloadTooLarge`` is a ``BadRequest`` but answers 413); anything else is a 500.
HTTP_STATUS: dict[type[SkrError], int] = {
    BadRequest: 400,
    PayloadTooLarge: 413,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    AuditRateLimited: 429,
    VerificationError: 502,
    UpstreamError: 502,
    EvidenceUnavailable: 503,
    UpstreamTimeout: 504,
}


def http_status(exc: SkrError) -> int:
    return by_class(HTTP_STATUS, exc, 500)


def error_response(exc: SkrError, request_id: str) -> web.Response:
    body = {"error": exc.message, "code": exc.code, "request_id": request_id}
    if exc.hint:
        body["hint"] = exc.hint
    status = http_status(exc)
    headers = {"WWW-Authenticate": 'Bearer realm="skr"'} if status == 401 else None
    return json_response(body, status, headers)


# --- requests that are not HTTP at all ----------------------------------------------------------------

_PROTOCOL_ERRORS: tuple[tuple[type[http_exceptions.BadHttpMessage], str], ...] = (
    (http_exceptions.BadHttpMethod, "the request method is not one this server accepts"),
    (http_exceptions.LineTooLong, "the request line or a header is too long"),
    (http_exceptions.InvalidHeader, "a request header is malformed"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.InvalidURLError, "the request target is not a valid URL"),
    (http_exceptions.TransferEncodingError, "the chunked request body is malformed"),
    (http_exceptions.ContentLengthError, "the request body does not match its Content-Length"),
)


def _protocol_error_message(exc: BaseException | None) -> str:
    """A fixed sentence per parser error: the parser's own text quotes request bytes (maybe a token)."""
    return next(
        (m for kind, m in _PROTOCOL_ERRORS if isinstance(exc, kind)), "the request is not valid HTTP/1.1"
    )


class _JsonErrorHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses in our JSON error model.

    A request that is not HTTP (an unknown method token, conflicting framing headers, a bad chunk size,
    an oversized header) never reaches the application or its middleware; aiohttp answers it from
    ``handle_error`` with ``text/plain``. Here it gets ``{"error", "code", "request_id"}`` like every other
    refusal. The connection is closed afterwards, as aiohttp does.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        request_id = uuid.uuid4().hex
        log.warning(
            "refused a request that is not valid HTTP",
            extra={"status": status, "reason": type(exc).__name__, "client": request.remote},
        )
        response = error_response(
            SkrError(_protocol_error_message(exc), code=Code.MALFORMED_HTTP), request_id
        )
        response.set_status(status)
        response.headers["X-Request-Id"] = request_id
        response.headers["Server"] = SERVER_HEADER
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer HTTP protocol errors as JSON (see ``_JsonErrorHandler``)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same object layout; only the handler factory differs
        return server


# --- body parsing ------------------------------------------------------------------------------------


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type (curl -d sends form-urlencoded)."""
    try:
        raw = await request.read()
    except ConnectionResetError:  # the client went away mid-body: its fault, and nobody reads the answer
        raise BadRequest(
            "the client closed the connection before the request body was complete", code=Code.INCOMPLETE_BODY
        ) from None
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object", code=Code.INVALID_JSON)
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply", code=Code.INVALID_JSON) from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON", code=Code.INVALID_JSON) from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object", code=Code.INVALID_JSON)
    return doc


def required_str(doc: dict[str, Any], name: str) -> str:
    value = optional_str(doc, name)
    if value is None:
        raise BadRequest(f"{name} is required", code=Code.MISSING_FIELD)
    return value


def optional_str(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string", code=Code.INVALID_FIELD)
    try:  # JSON lets ``\ud800`` escapes through; such a string has no UTF-8 form (audit, logs, upstreams)
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{name} is not valid Unicode text (a lone surrogate escape)", code=Code.INVALID_FIELD
        ) from None
    return value


_B64TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")


def _bearer(token: str | None) -> str | None:
    """An access token goes into an Authorization header: only RFC 6750 ``b64token`` characters."""
    if token is not None and not _B64TOKEN.match(token):
        raise BadRequest(
            "access_token is not a bearer token (RFC 6750 b64token characters only)",
            hint="pass the raw AAD access token, without 'Bearer ' and without whitespace",
            code=Code.INVALID_FIELD,
        )
    return token


def _reject_constant(name: str) -> None:
    raise ValueError(name)


def _require_json(runtime_data: bytes) -> None:
    """``/attest/maa`` sends the runtime data to MAA as ``dataType: JSON``, which MAA refuses unless it is
    a JSON object: say so with a 400 here instead of a 502 from upstream."""
    try:
        doc = json.loads(runtime_data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        doc = None
    if not isinstance(doc, dict):
        raise BadRequest(
            "runtime_data must be base64 of a UTF-8 JSON object: it is sent to MAA as JSON runtime data",
            code=Code.INVALID_FIELD,
        )


def decode_std_base64(value: str, name: str) -> bytes:
    """Strict standard base64 with padding, ignoring CR/LF — exactly Go's ``base64.StdEncoding``."""
    try:
        return go_std_b64decode(value)
    except (binascii.Error, ValueError):
        raise BadRequest(
            f"{name} is not standard base64 (RFC 4648 §4 alphabet with '=' padding)",
            hint="URL-safe base64 ('-' and '_') is not accepted",
            code=Code.INVALID_BASE64,
        ) from None


def decode_runtime_data(value: str) -> bytes:
    return decode_std_base64(value, "runtime_data")


# --- middleware --------------------------------------------------------------------------------------


def _is_loopback(remote: str | None) -> bool:
    # None: a Unix socket or an in-process test transport; ::ffff:127.0.0.1 (dual-stack) is loopback too
    return remote is None or is_loopback_host(remote.split("%")[0])


CLIENT_TOKEN_ID_KEY: web.RequestKey[str] = web.RequestKey("client_token_id", str)


def _client_token_id(presented: str, tokens: tuple[tuple[str, str], ...]) -> str | None:
    """The name of the client token presented, or None. Compares with every token (constant time each)."""
    matches = [name for name, token in tokens if hmac.compare_digest(presented.encode(), token.encode())]
    return matches[0] if matches else None


@web.middleware
async def _frame(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, access control, error mapping, metrics — in that order."""
    service = request.app[SERVICE_KEY]
    metrics = request.app[METRICS_KEY]
    supplied = request.headers.get("X-Request-Id", "")
    request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
    token = request_id_var.set(request_id)
    started = time.monotonic()
    response: web.StreamResponse
    try:
        if not service.settings.allow_remote and not _is_loopback(request.remote):
            raise RemoteClientRefused(
                "this sidecar only answers clients on the loopback interface",
                hint="call it on localhost from a container of the same group",
            )
        check_host_and_origin(
            request.headers.getall("Host", ()),
            request.headers.getall("Origin", ()),
            listen_host=service.settings.host,
            allow_remote=service.settings.allow_remote,
        )
        expected = service.settings.client_token
        if expected is not None and request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
            token_id = _client_token_id(presented, service.settings.client_tokens or (("default", expected),))
            if token_id is None:
                raise Unauthenticated(
                    "this sidecar requires a client token",
                    hint="send Authorization: Bearer <contents of SKR_CLIENT_TOKEN_FILE>",
                )
            request[CLIENT_TOKEN_ID_KEY] = token_id
        response = await handler(request)
    except SkrError as exc:
        response = error_response(exc, request_id)
        status = http_status(exc)
        level = logging.WARNING if status < 500 else logging.ERROR
        log.log(level, "request failed", extra={"path": request.path, "status": status, "code": exc.code})
    except web.HTTPRequestEntityTooLarge:
        response = error_response(
            PayloadTooLarge(f"the request body exceeds {service.settings.max_body} bytes"), request_id
        )
    except web.RequestPayloadError:
        # A body that does not match its Content-Encoding or chunked framing: bad input, not a 500.
        response = error_response(
            BadRequest(
                "the request body could not be read: it does not match its Content-Encoding or framing",
                hint="send plain JSON, or a body that really is encoded as Content-Encoding says",
                code=Code.INVALID_BODY,
            ),
            request_id,
        )
        response.force_close()  # the rest of the stream is unusable: close the connection after answering
        request.content.feed_eof()  # and do not drain it (aiohttp would log the decode error as unhandled)
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(
            SkrError(f"{request.method} is not allowed on {request.path}", code=Code.METHOD_NOT_ALLOWED),
            request_id,
        )
        response.set_status(405)
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
    except web.HTTPNotFound:
        response = error_response(NotFound(f"no such endpoint: {request.path}"), request_id)
    except web.HTTPException as exc:
        response = error_response(SkrError(exc.reason, code=Code.HTTP_ERROR), request_id)
        response.set_status(exc.status)
    except Exception:
        log.exception("unexpected error", extra={"path": request.path})
        response = error_response(
            SkrError("internal error; see the sidecar log for this request id"), request_id
        )
    finally:
        request_id_var.reset(token)
    response.headers["X-Request-Id"] = request_id
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics.http_requests.inc(route=route, status=str(response.status))
    metrics.http_duration.observe(time.monotonic() - started, route=route)
    return response


def _ctx(request: web.Request) -> RequestContext:
    return RequestContext(
        request_id=request_id_var.get() or "",
        client=request.remote,
        client_token_id=request.get(CLIENT_TOKEN_ID_KEY),
    )


def _timing(ctx: RequestContext, started: float) -> dict[str, str]:
    total = (time.monotonic() - started) * 1000
    upstream = ctx.upstream_seconds * 1000
    own = max(total - upstream, 0.0)
    return {"Server-Timing": f"upstream;dur={upstream:.3f}, app;dur={own:.3f}, total;dur={total:.3f}"}


# --- handlers ----------------------------------------------------------------------------------------


async def status(_: web.Request) -> web.Response:
    return json_response({"message": "Status OK"})


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    checks = dict(service.readiness)
    checks["wrapping_key"] = "ready" if service.wrapping_key_ready else "generating"
    ready = service.ready and service.wrapping_key_ready
    body: dict[str, Any] = {"ready": ready, "checks": checks}
    warnings = [v.removeprefix("warning: ") for v in checks.values() if str(v).startswith("warning: ")]
    if warnings:  # ready all the same, but something will bite (e.g. no UVM endorsement)
        body["warnings"] = warnings
    return json_response(body, 200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    resp = web.Response(text=request.app[METRICS_KEY].render())
    resp.content_type = "text/plain"
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp


async def openapi(_: web.Request) -> web.Response:
    from skr.openapi import document

    return json_response(document())


async def attest_raw(request: web.Request) -> web.Response:
    doc = await read_json_object(request)
    runtime_data = decode_runtime_data(required_str(doc, "runtime_data"))
    report = await request.app[SERVICE_KEY].raw_report(runtime_data, _ctx(request))
    return json_response({"report": report.hex()})


async def attest_combined(request: web.Request) -> web.Response:
    doc = await read_json_object(request)
    runtime_data = decode_runtime_data(required_str(doc, "runtime_data"))
    return json_response(await request.app[SERVICE_KEY].combined(runtime_data, _ctx(request)))


async def attest_maa(request: web.Request) -> web.Response:
    doc = await read_json_object(request)
    runtime_data = decode_runtime_data(required_str(doc, "runtime_data"))
    _require_json(runtime_data)
    maa = optional_str(doc, "maa_endpoint")
    token = await request.app[SERVICE_KEY].maa_token(maa, runtime_data, _ctx(request))
    return json_response({"token": token})


async def key_release(request: web.Request) -> web.Response:
    started = time.monotonic()
    doc = await read_json_object(request)
    kid = required_str(doc, "kid")
    ctx = _ctx(request)
    result = await request.app[SERVICE_KEY].release(
        kid=kid,
        maa_endpoint=optional_str(doc, "maa_endpoint"),
        akv_endpoint=optional_str(doc, "akv_endpoint"),
        access_token=_bearer(optional_str(doc, "access_token")),
        ctx=ctx,
    )
    return json_response({"key": result.key_json}, headers=_timing(ctx, started))


async def audit_head(request: web.Request) -> web.Response:
    """A fresh hardware-signed statement over the audit head, not written to the log (one per second)."""
    if not _is_loopback(request.remote):  # even with --allow-remote: monitors run next to the sidecar
        raise RemoteClientRefused("/audit/head answers only clients on the loopback interface")
    checkpointer = request.app.get(AUDIT_HEAD_KEY)
    if checkpointer is None:
        raise NotFound(
            "this sidecar keeps no audit log", hint="start it with --audit-log", code=Code.AUDIT_DISABLED
        )
    return json_response(await checkpointer.head_statement())


async def key_unwrap(request: web.Request) -> web.Response:
    """``/key/unwrap``: the sidecar releases the key (kept in memory for its token's lifetime), decrypts
    ``wrapped_data`` with it and answers only the plaintext; the app never holds the key."""
    from skr.keyprovider.algorithms import check_algorithm, decrypt

    started = time.monotonic()
    doc = await read_json_object(request)
    kid = required_str(doc, "kid")
    wrapped = decode_std_base64(required_str(doc, "wrapped_data"), "wrapped_data")
    alg = check_algorithm(required_str(doc, "alg"))
    ctx = _ctx(request)
    plaintext = await request.app[SERVICE_KEY].unwrap(
        kid=kid,
        maa_endpoint=optional_str(doc, "maa_endpoint"),
        akv_endpoint=optional_str(doc, "akv_endpoint"),
        access_token=_bearer(optional_str(doc, "access_token")),
        ctx=ctx,
        decrypt=lambda jwk_json: decrypt(alg, jwk_json, wrapped),
    )
    return json_response({"plaintext": base64.b64encode(plaintext).decode()}, headers=_timing(ctx, started))


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/status", status),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics_handler),
    ("GET", "/openapi.json", openapi),
    ("POST", "/attest/raw", attest_raw),
    ("POST", "/attest/combined", attest_combined),
    ("POST", "/attest/maa", attest_maa),
    ("POST", "/key/release", key_release),
    ("GET", "/audit/head", audit_head),
    ("POST", "/key/unwrap", key_unwrap),
)


def create_app(service: ReleaseService, metrics: Metrics) -> web.Application:
    app = web.Application(middlewares=[_frame], client_max_size=service.settings.max_body)
    app[SERVICE_KEY] = service
    app[METRICS_KEY] = metrics
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.on_response_prepare.append(_server_header)
    return app


SERVER_HEADER = "skr"


async def _server_header(_: web.Request, response: web.StreamResponse) -> None:
    """``Server: skr`` instead of aiohttp's ``Python/<x.y> aiohttp/<x.y.z>`` (no versions to fingerprint)."""
    response.headers["Server"] = SERVER_HEADER
