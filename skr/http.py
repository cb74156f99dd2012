"""Outbound HTTP for every upstream skr talks to (MAA, Key Vault metadata, THIM, AMD KDS, identity).

Owns: TLS trust (system roots plus ``SKR_CA_BUNDLE``; verification cannot be turned off), per-request
deadlines, per-attempt timeouts, and the one retry policy: retry only transient failures (connection
errors, timeouts, 408, 429, 5xx), honour ``Retry-After``, back off exponentially with jitter, and never
sleep past the deadline.

Never logs request or response bodies: they may carry tokens.
"""

from __future__ import annotations

import json
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from skr.errors import UpstreamError, UpstreamTimeout

log = logging.getLogger("skr.http")

CA_BUNDLE_ENV = "SKR_CA_BUNDLE"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


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

    def __init__(self, status: int, retry_after: float | None, summary: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after
        self.summary = summary


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
                f"the upstream answered HTTP {self.status} with a body that is not JSON"
            ) from exc


def summarize_body(body: bytes, limit: int = 300) -> str:
    """A short, single-line rendering of an upstream error body, for messages.

    Azure error bodies (``{"error": {"code", "message"}}``) are reduced to ``code: message``.
    Bodies of successful responses must never be passed here (they can hold tokens or keys).
    """
    text: str
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body[:limit].decode("utf-8", "replace")
    else:
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            code, message = err.get("code"), err.get("message")
            text = f"{code}: {message}" if code else str(message)
        elif isinstance(err, str):
            text = err
        else:
            text = json.dumps(doc)[:limit]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _transient_retry_after(exc: BaseException | None) -> float | None:
    return exc.retry_after if isinstance(exc, TransientHTTPError) else None


class _Wait:
    """tenacity wait: Retry-After when the upstream sent one, else exponential backoff with full jitter."""

    def __init__(
        self,
        policy: RetryPolicy,
        deadline: Deadline,
        retry_after: Callable[[BaseException | None], float | None] = _transient_retry_after,
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.retry_after = retry_after

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

    def stop(state: RetryCallState) -> bool:
        if after_attempts(state):
            return True
        # the next attempt would start with (almost) no time left
        return deadline.remaining() - (state.upcoming_sleep or 0.0) <= 0.05

    return stop


def transient_retrying(
    *,
    deadline: Deadline,
    policy: RetryPolicy = DEFAULT_RETRY,
    is_transient: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException | None], float | None] = _transient_retry_after,
) -> AsyncRetrying:
    """The project's one retry policy for upstream calls made through other clients (the Azure SDK):
    retry only what ``is_transient`` says, honour ``retry_after``, back off with jitter, stop at the
    deadline or after ``policy.attempts``; the last exception is re-raised."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=_Wait(policy, deadline, retry_after),
        stop=_stop_at_deadline(deadline, policy),
        before_sleep=_log_retry,
        reraise=True,
    )


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
) -> HttpResult:
    """One upstream call with timeouts and retries. Returns the final non-transient response.

    ``service`` names the upstream in errors ("Microsoft Azure Attestation", "AMD KDS", ...).
    Raises :class:`UpstreamTimeout` when the deadline runs out, :class:`UpstreamError` when the
    upstream stays unreachable or keeps answering with transient errors. Non-transient HTTP errors
    (4xx other than 408/429) are returned to the caller, which knows what they mean.
    """
    deadline = deadline or Deadline.after(max(timeout, 1.0) * retry.attempts)
    started = time.monotonic()
    attempts = 0

    async def attempt() -> HttpResult:
        nonlocal attempts
        attempts += 1
        remaining = deadline.remaining()
        if remaining <= 0:
            raise UpstreamTimeout(f"{service} did not answer before the request deadline")
        per_try = aiohttp.ClientTimeout(total=min(timeout, remaining))
        async with session.request(
            method,
            url,
            json=json_body,
            data=data,
            headers=dict(headers or {}),
            ssl=ssl_context if ssl_context is not None else True,
            timeout=per_try,
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
            if is_transient_status(resp.status):
                raise TransientHTTPError(
                    resp.status, parse_retry_after(resp.headers.get("Retry-After")), summarize_body(body)
                )
            return HttpResult(
                status=resp.status,
                headers=resp.headers.copy(),
                body=body,
                attempts=attempts,
                server_timing=resp.headers.getall("Server-Timing", []),
            )

    retrying = transient_retrying(
        deadline=deadline,
        policy=retry,
        is_transient=lambda exc: isinstance(
            exc, aiohttp.ClientConnectionError | TimeoutError | TransientHTTPError
        ),
    )
    try:
        result: HttpResult = await retrying(attempt)
    except TransientHTTPError as exc:
        if deadline.expired():
            raise UpstreamTimeout(
                f"{service} did not answer successfully before the request deadline"
            ) from None
        raise UpstreamError(
            f"{service} kept failing with HTTP {exc.status} after {attempts} attempts: {exc.summary}",
            hint="the service is overloaded or down; retry later",
        ) from None
    except TimeoutError:
        raise UpstreamTimeout(f"{service} did not answer before the request deadline") from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise UpstreamError(
            f"{service} presented a TLS certificate that is not trusted: {exc.certificate_error}",
            hint=f"check the endpoint; for private CAs set {CA_BUNDLE_ENV}",
            code="upstream_tls_untrusted",
        ) from None
    except aiohttp.ClientConnectionError as exc:
        if deadline.expired():
            raise UpstreamTimeout(f"{service} did not answer before the request deadline") from None
        raise UpstreamError(
            f"{service} could not be reached after {attempts} attempts: {type(exc).__name__}",
            hint="check the endpoint name, DNS and network egress",
            code="upstream_unreachable",
        ) from None
    result.upstream_seconds = time.monotonic() - started
    return result
