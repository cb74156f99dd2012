"""The upstream client layer: outbound HTTP for every upstream skr talks to (MAA, Key Vault, THIM, AMD KDS,
identity).

Owns: TLS trust (system roots plus ``SKR_CA_BUNDLE``; verification cannot be turned off), per-request
deadlines, per-attempt timeouts, and the one retry policy: retry only transient failures (connection
errors, timeouts, 408, 429, 5xx), honour ``Retry-After``, back off exponentially with jitter, and never
sleep past the deadline. Also the rules every upstream answer obeys: a redirect is never followed (any
3xx is ``upstream_redirect``), a body is read only up to a cap (``upstream_too_large`` above it, checked
on ``Content-Length`` and while streaming), and an upstream's error body is reduced to its JSON
``error.code``; a connection failure names the host and the low-level cause.

Never logs request or response bodies: they may carry tokens.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from skr.errors import Code, ConfigError, UpstreamError, UpstreamTimeout

log = logging.getLogger("skr.upstream")
T = TypeVar("T")

CA_BUNDLE_ENV = "SKR_CA_BUNDLE"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_UPSTREAM_BODY_ENV = "SKR_MAX_UPSTREAM_BODY"
DEFAULT_MAX_UPSTREAM_BODY = 4 * 1024 * 1024
"""Bytes of one upstream answer skr buffers at most (MAA tokens and metadata, JWKS, release JWS, VCEK
certificates are all a few KiB)."""
_READ_CHUNK = 64 * 1024
_ERROR_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def ca_bundle_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The extra trust anchors named by ``SKR_CA_BUNDLE``, if set."""
    value = (env if env is not None else os.environ).get(CA_BUNDLE_ENV, "").strip()
    return Path(value) if value else None


def client_ssl_context(ca_bundle: Path | str | None = None) -> ssl.SSLContext:
    """A verifying client context: the system roots plus ``ca_bundle`` (default: ``SKR_CA_BUNDLE``)."""
    ctx = ssl.create_default_context()
    bundle = Path(ca_bundle) if ca_bundle is not None else ca_bundle_from_env()
    if bundle is not None:
        ctx.load_verify_locations(cafile=str(bundle))
    return ctx


def is_transient_status(status: int) -> bool:
    return status in TRANSIENT_STATUSES or 500 <= status <= 599


@dataclass
class Deadline:
    """An absolute point on the monotonic clock after which no upstream work may continue."""

    expires_at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0


@dataclass(frozen=True)
class RetryPolicy:
    """How an upstream call is retried. ``attempts`` counts the first try."""

    attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    max_retry_after: float = 30.0


DEFAULT_RETRY = RetryPolicy()


class TransientHTTPError(Exception):
    """An upstream answer worth retrying (408, 429, 5xx). Internal to the retry loop."""

    def __init__(
        self, status: int, retry_after: float | None, summary: str, result: HttpResult | None = None
    ) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after
        self.summary = summary
        self.result = result


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (now if now is not None else time.time()))


@dataclass
class HttpResult:
    status: int
    headers: Mapping[str, str]
    body: bytes
    attempts: int = 1
    upstream_seconds: float = 0.0
    server_timing: list[str] = field(default_factory=list)

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UpstreamError(
                f"the upstream answered HTTP {self.status} with a body that is not JSON",
                upstream_status=self.status,
            ) from exc


def summarize_body(body: bytes) -> str:
    """The upstream's JSON ``error.code`` (Azure's ``{"error": {"code": ...}}``, or ``{"error": "code"}``)
    when it has a plain one, else ``""``: an upstream's error text is never passed on to the app.

    Bodies of successful responses must never be passed here (they can hold tokens or keys).
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    err = doc.get("error") if isinstance(doc, dict) else None
    code = err.get("code") if isinstance(err, dict) else err
    return code if isinstance(code, str) and _ERROR_CODE_RE.match(code) else ""


def host_of_url(url: str) -> str:
    """``host[:port]`` of ``url`` for messages (``?`` when it has none)."""
    try:
        return urlsplit(url).netloc.rsplit("@", 1)[-1] or "?"
    except ValueError:
        return "?"


def redirect_error(service: str, url: str, status: int, location: str | None) -> UpstreamError:
    """The error for a 3xx answer: skr follows no redirect, and says where it would have gone."""
    target = host_of_url(urljoin(url, location)) if location else None
    where = f"a redirect to {target}" if target else "a redirect without a Location"
    return UpstreamError(
        f"{service} ({host_of_url(url)}) answered HTTP {status}, {where}; skr does not follow redirects",
        hint="configure the endpoint's final address; a redirect from an upstream is never followed",
        code=Code.UPSTREAM_REDIRECT,
        upstream_status=status,
    )


def too_large_error(service: str, url: str, limit: int) -> UpstreamError:
    """The error for an answer whose body is larger than ``limit`` bytes."""
    return UpstreamError(
        f"{service} ({host_of_url(url)}) answered with a body larger than {limit} bytes; "
        "skr stopped reading it",
        hint=f"check the endpoint; the cap is {MAX_UPSTREAM_BODY_ENV}",
        code=Code.UPSTREAM_TOO_LARGE,
    )


async def read_capped(resp: aiohttp.ClientResponse, limit: int, *, service: str) -> bytes:
    """The body of ``resp``, refusing (before buffering it) one longer than ``limit`` bytes: a
    ``Content-Length`` above the cap is refused unread, a chunked or endless body when it passes the cap."""
    url = str(resp.url)
    if resp.content_length is not None and resp.content_length > limit:
        resp.close()
        raise too_large_error(service, url, limit)
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > limit:
            resp.close()
            raise too_large_error(service, url, limit)
    return bytes(body)


def connection_cause(exc: BaseException | None) -> str:
    """The low-level reason a connection failed, in words: DNS name not found, connection refused, TLS
    failure, timeout, ..."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        not_found = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        return "DNS name not found" if not_found else f"DNS lookup failed ({exc.strerror or 'no answer'})"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS failure (certificate not trusted)"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return "TLS failure"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed by the server"
    if isinstance(exc, OSError):
        number = exc.errno
        if number == errno.ECONNREFUSED:
            return "connection refused"
        if number in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "host unreachable"
        if number == errno.ECONNRESET:
            return "connection reset"
        if isinstance(exc.__cause__, ssl.SSLError) or isinstance(exc.__context__, ssl.SSLError):
            return "TLS failure"
        if exc.strerror:
            return exc.strerror
    return type(exc).__name__ if exc is not None else "unknown"


def _transient_retry_after(exc: BaseException | None) -> float | None:
    return exc.retry_after if isinstance(exc, TransientHTTPError) else None


@dataclass
class _Wait:
    """tenacity wait: Retry-After when the upstream sent one, else exponential backoff with full jitter."""

    policy: RetryPolicy
    deadline: Deadline
    retry_after: Callable[[BaseException | None], float | None] = _transient_retry_after

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = self.retry_after(exc)
        delay: float
        if hinted is not None:
            delay = min(hinted, self.policy.max_retry_after)
        else:
            cap = min(self.policy.max_backoff, self.policy.initial_backoff * 2 ** (state.attempt_number - 1))
            delay = random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography
        # never sleep past the deadline: the stop condition below then ends the loop
        return max(0.0, min(delay, self.deadline.remaining()))


def _stop_at_deadline(deadline: Deadline, policy: RetryPolicy) -> Any:
    after_attempts = stop_after_attempt(policy.attempts)

    def stop(state: RetryCallState) -> bool:  # after the attempts, or when the next would have no time left
        return after_attempts(state) or deadline.remaining() - (state.upcoming_sleep or 0.0) <= 0.05

    return stop


async def call_retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    deadline: Deadline,
    policy: RetryPolicy = DEFAULT_RETRY,
    is_transient: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException | None], float | None] = _transient_retry_after,
) -> T:
    """``attempt()`` under the project's one retry policy: retry only what ``is_transient`` says, honour
    ``retry_after``, back off with jitter, stop at the deadline or after ``policy.attempts``; the last
    exception is re-raised. The first try runs without the retry machinery (most calls succeed); a transient
    failure is replayed into tenacity as its first attempt, so the waits and the count are the same."""
    try:
        return await attempt()
    except Exception as exc:
        if policy.attempts <= 1 or not is_transient(exc):
            raise
        first: list[BaseException] = [exc]

    async def again() -> T:
        if first:
            raise first.pop()
        return await attempt()

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=_Wait(policy, deadline, retry_after),
        stop=_stop_at_deadline(deadline, policy),
        before_sleep=_log_retry,
        reraise=True,
    )
    result: T = await retrying(again)
    return result


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    status = exc.status if isinstance(exc, TransientHTTPError) else getattr(exc, "status_code", None)
    log.info(
        "retrying an upstream call",
        extra={
            "attempt": state.attempt_number,
            "failure": type(exc).__name__ if exc else None,
            "status": status,
            "sleep_seconds": round(state.upcoming_sleep or 0.0, 3),
        },
    )


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    service: str,
    json_body: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | bool | None = None,
    timeout: float = 10.0,
    deadline: Deadline | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_body: int = DEFAULT_MAX_UPSTREAM_BODY,
    slot: AbstractAsyncContextManager[Any] | None = None,
    return_last: bool = False,
) -> HttpResult:
    """One upstream call with timeouts and retries. Returns the final non-transient response.

    ``service`` names the upstream in errors ("Microsoft Azure Attestation", "AMD KDS", ...); ``slot`` is
    held for each attempt (not across the pauses between them), e.g. a per-host in-flight limit; with
    ``return_last`` the last transient answer (429, 5xx) is returned when the retries run out, for a caller
    that maps it itself.
    Raises :class:`UpstreamTimeout` when the deadline runs out, :class:`UpstreamError` when the
    upstream stays unreachable or keeps answering with transient errors, answers a redirect (any 3xx,
    ``upstream_redirect``, never followed nor retried) or a body over ``max_body`` bytes
    (``upstream_too_large``). Non-transient HTTP errors (4xx other than 408/429) are returned to the
    caller, which knows what they mean.
    """
    deadline = deadline or Deadline.after(max(timeout, 1.0) * retry.attempts)
    started = time.monotonic()
    attempts = 0
    host = host_of_url(url)

    def timed_out() -> UpstreamTimeout:
        return UpstreamTimeout(f"{service} did not answer before the request deadline ({host}: timeout)")

    async def attempt() -> HttpResult:
        nonlocal attempts
        attempts += 1
        remaining = deadline.remaining()
        if remaining <= 0:
            raise timed_out()
        per_try = aiohttp.ClientTimeout(total=min(timeout, remaining))
        async with (
            slot or contextlib.nullcontext(),
            session.request(
                method,
                url,
                json=json_body,
                data=data,
                headers=dict(headers or {}),
                ssl=ssl_context if ssl_context is not None else True,
                timeout=per_try,
                allow_redirects=False,
            ) as resp,
        ):
            if 300 <= resp.status <= 399:
                raise redirect_error(service, url, resp.status, resp.headers.get("Location"))
            body = await read_capped(resp, max_body, service=service)
            result = HttpResult(
                status=resp.status,
                headers=resp.headers.copy(),
                body=body,
                attempts=attempts,
                server_timing=resp.headers.getall("Server-Timing", []),
            )
            if is_transient_status(resp.status):
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raise TransientHTTPError(resp.status, retry_after, summarize_body(body), result)
            return result

    def is_transient(exc: BaseException) -> bool:  # an untrusted certificate stays so
        return isinstance(exc, aiohttp.ClientConnectionError | TimeoutError | TransientHTTPError) and not (
            isinstance(exc, aiohttp.ClientConnectorCertificateError)
        )

    try:
        result = await call_retrying(attempt, deadline=deadline, policy=retry, is_transient=is_transient)
    except TransientHTTPError as exc:
        if return_last and exc.result is not None and not deadline.expired():
            return exc.result
        if deadline.expired():
            raise UpstreamTimeout(
                f"{service} did not answer successfully before the request deadline ({host}: timeout)"
            ) from None
        raise UpstreamError(
            f"{service} kept failing with HTTP {exc.status} after {attempts} attempts at {host}"
            + (f": {exc.summary}" if exc.summary else ""),
            hint="the service is overloaded or down; retry later",
            upstream_status=exc.status,
        ) from None
    except TimeoutError:
        raise timed_out() from None
    except aiohttp.InvalidURL:  # a URL from configuration (an identity endpoint, say), not from the upstream
        raise ConfigError(
            f"the {service} URL {url.split('?', 1)[0][:200]!r} is not a valid URL",
            hint="check the setting that names this endpoint",
        ) from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise UpstreamError(
            f"{service} presented a TLS certificate that is not trusted ({host}): {exc.certificate_error}",
            hint=f"check the endpoint; for private CAs set {CA_BUNDLE_ENV}",
            code=Code.UPSTREAM_TLS_UNTRUSTED,
        ) from None
    except aiohttp.ClientConnectionError as exc:
        if deadline.expired():
            raise timed_out() from None
        raise UpstreamError(
            f"{service} could not be reached at {host} after {attempts} attempts: {connection_cause(exc)}",
            hint="check the endpoint name, DNS and network egress",
            code=Code.UPSTREAM_UNREACHABLE,
        ) from None
    result.upstream_seconds = time.monotonic() - started
    return result
