"""The Key Vault / Managed HSM *release* call, through ``azure.keyvault.keys.aio.KeyClient``.

Owns: one SDK client per (vault, credential) reused across calls, the SDK's timeouts, the retries around it,
the per-request deadline, and the mapping of the vault's answers to skr errors that carry the vault's
error code and message plus a hint on what to fix (RBAC role, release policy, key name). It takes the key
parsed (:class:`skr.endpoints.KeyRef`).

It returns the release JWS untouched: verifying and unwrapping it is :mod:`skr.akv.jws`'s job.

TLS is always verified (a CA bundle only *adds* anchors). The SDK's challenge-resource check stays on for
every Azure domain and is turned off only for explicitly allow-listed non-Azure hosts (local emulators);
whatever a challenge says, a token is only ever requested for the vault kind's own scope
(:class:`skr.identity.VaultScopedCredential`). No redirect is followed (any 3xx is ``upstream_redirect``)
and no answer is buffered past ``SdkSettings.max_body``. A vault's error text is reduced to its codes and
the claim names it mentions.
Never logs or puts into a message the attestation token, the access token or the released key.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
import ssl
import sys
from collections.abc import Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from skr.akv.keywrap import Enc
from skr.endpoints import Endpoint, KeyRef, is_azure_host, parse_endpoint
from skr.errors import (
    BadRequest,
    Code,
    IdentityError,
    KeyNotFound,
    ReleaseDenied,
    SkrError,
    UpstreamError,
    UpstreamTimeout,
)
from skr.identity import CredentialFactory, StaticTokenCredential, verifying_transport
from skr.upstream import (
    CA_BUNDLE_ENV,
    DEFAULT_MAX_UPSTREAM_BODY,
    Deadline,
    RetryPolicy,
    call_retrying,
    client_ssl_context,
    connection_cause,
    host_of_url,
    is_transient_status,
    parse_retry_after,
    redirect_error,
)

if TYPE_CHECKING:  # the SDK is imported on first use: it costs start-up time and memory (see _key_client)
    from azure.keyvault.keys import ReleaseKeyResult
    from azure.keyvault.keys.aio import KeyClient

VAULT_RELEASE_ROLE = "Key Vault Crypto Service Release User"
MANAGED_HSM_RELEASE_ROLE = "Managed HSM Crypto Service Release User"

_MAX_DETAIL = 400
_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# What of a vault's free-text message is passed on: the claim names and Key Vault's own error numbers it
# mentions (the release-policy engine names the claim that failed), never the text itself.
_MESSAGE_TERMS_RE = re.compile(r"\bx-ms-[a-z0-9][a-z0-9._-]{0,80}|\bAKV[.A-Z]*[0-9]{3,6}\b", re.IGNORECASE)
# A claim check the vault explains as ``<claim>: expected <value>, found <value>`` keeps both values when
# they are plain tokens (hashes, SVNs, booleans; optionally quoted, or <absent>): no spaces, no slashes,
# nothing that reads as a sentence.
_CLAIM_FAILURE_RE = re.compile(
    r"\b(x-ms-[a-z0-9][a-z0-9._-]{0,80}): expected (\"[\w.-]{1,128}\"|[\w.-]{1,128}|<absent>), "
    r"found (\"[\w.-]{1,128}\"|[\w.-]{1,128}|<absent>)",
    re.IGNORECASE | re.ASCII,
)
# A release changes nothing in the vault (it only wraps the key for the target), so it is safe to repeat: the
# SDK's own retries are off and call_retrying retries it on 408/429/5xx and after a reset connection.


@dataclass(frozen=True)
class ReleaseResult:
    """What the vault answered to a successful release: the JWS (``ReleaseKeyResult.value``) and what
    was asked for (``version`` is None when the latest version was requested)."""

    jws: str
    vault_url: str
    name: str
    version: str | None

    def __repr__(self) -> str:
        return f"ReleaseResult(vault_url={self.vault_url!r}, name={self.name!r}, version={self.version!r})"


@dataclass(frozen=True)
class SdkSettings:
    """Per-attempt timeouts of the SDK's transport and the retry policy around each release.

    The SDK's own retry loop is off: transient failures (408, 429, 5xx, connection errors) are retried by
    :func:`skr.upstream.call_retrying`, the policy every upstream call uses, which honours Retry-After
    and never sleeps past the request deadline.
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connection_timeout: float = 5.0
    read_timeout: float = 20.0
    max_connections: int = 16
    """Releases in flight to one vault (and connections to it); more wait their turn, first come first
    served (0: no limit). Each pooled TLS connection holds ~0.3 MiB, and a vault throttles long before
    16 calls in flight limit throughput."""
    max_body: int = DEFAULT_MAX_UPSTREAM_BODY
    """Bytes of one vault answer read at most (``upstream_too_large`` above)."""


# --- error mapping ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VaultError:
    """The vault's error as it answered (``{"error": {"code", "message", "innererror": {"code"}}}``)."""

    status: int
    code: str
    message: str
    inner_code: str | None

    def describe(self) -> str:
        """``HTTP 403 Forbidden: <message> (inner error: AccessDenied)`` on one line, for the operator's
        own CLI (``skr keys``); what the sidecar returns to apps is :meth:`summary`."""
        text = (
            f"HTTP {self.status} {self.code}: {self.message}"
            if self.code
            else f"HTTP {self.status}: {self.message}"
        )
        if self.inner_code:
            text += f" (inner error: {self.inner_code})"
        text = " ".join(text.split())
        return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"

    def summary(self) -> str:
        """``HTTP 403 Forbidden (mentions x-ms-sevsnpvm-hostdata) (inner error: AccessDenied)`` on one
        line: the status, the vault's codes and the claim names and ``AKV…`` numbers its message mentions —
        never the message itself (an upstream's text is not echoed to the app)."""
        code = self.code if _CODE_RE.match(self.code) else ""
        text = f"HTTP {self.status} {code}" if code else f"HTTP {self.status}"
        failures = [
            f"{claim} expected {expected}, found {found}"
            for claim, expected, found in _CLAIM_FAILURE_RE.findall(self.message)
        ][:3]
        named = {f.split(" ", 1)[0].lower() for f in failures}
        terms = [
            t
            for t in dict.fromkeys(t.rstrip(".-") for t in _MESSAGE_TERMS_RE.findall(self.message))
            if t.lower() not in named
        ][:6]
        if failures or terms:
            text += f" (mentions {'; '.join([*failures, *terms])})"
        if self.inner_code and _CODE_RE.match(self.inner_code):
            text += f" (inner error: {self.inner_code})"
        return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def vault_error(exc: HttpResponseError) -> VaultError:
    """Read the vault's error code and message from an SDK exception (body first, SDK model second)."""
    status = int(exc.status_code or 0)
    code, message, inner = "", "", None
    response = exc.response
    if response is not None:
        try:
            document = json.loads(response.text() or "null")
        except (ValueError, UnicodeDecodeError, AttributeError):
            document = None
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code") or "")
            message = str(error.get("message") or "")
            inner_obj = error.get("innererror")
            if isinstance(inner_obj, dict) and inner_obj.get("code"):
                inner = str(inner_obj["code"])
    model = getattr(exc, "error", None)
    if not code and model is not None:
        code = str(getattr(model, "code", "") or "")
    if not message:
        reason = getattr(response, "reason", None) if response is not None else None
        message = str((model and getattr(model, "message", None)) or reason or "no error body")
    return VaultError(status=status, code=code, message=message, inner_code=inner)


class KeyVaultReleaser:
    """Releases keys from Key Vault / Managed HSM with the real SDK.

    ``credentials`` chooses the credential per call; ``api_version`` overrides the SDK default;
    ``ca_bundle`` adds TLS trust anchors (default: the factory's); ``allow_insecure_challenge_hosts`` names
    non-Azure endpoints (``host`` or ``host:port``) whose 401 challenge may name a resource that is not
    their own domain (local emulators). ``sdk`` sets the timeouts, the retry policy and the in-flight cap.
    """

    def __init__(
        self,
        *,
        credentials: CredentialFactory,
        api_version: str | None = None,
        ca_bundle: Path | None = None,
        allow_insecure_challenge_hosts: Collection[str] = (),
        sdk: SdkSettings | None = None,
    ) -> None:
        self._credentials = credentials
        self._api_version = api_version.strip() if api_version and api_version.strip() else None
        self._ca_bundle = ca_bundle
        self._sdk = sdk or SdkSettings()
        self._insecure_challenge = frozenset(
            parse_endpoint(h, what="an insecure challenge host") for h in allow_insecure_challenge_hosts
        )
        self._clients: dict[tuple[str, int], KeyClient] = {}
        self._own_ssl_context: ssl.SSLContext | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}

    def verify_challenge_resource(self, vault: Endpoint) -> bool:
        """False only for allow-listed endpoints outside Azure's domains; True for everything else.

        A listed ``host`` without a port (port 443 once parsed) names the host on any port."""
        listed = vault in self._insecure_challenge or Endpoint(vault.host) in self._insecure_challenge
        return not (listed and not is_azure_host(vault))

    def _client_kwargs(self, vault: Endpoint) -> dict[str, Any]:
        sdk = self._sdk
        transport_settings = {"connection_timeout": sdk.connection_timeout, "read_timeout": sdk.read_timeout}
        kwargs: dict[str, Any] = {
            "verify_challenge_resource": self.verify_challenge_resource(vault),
            "retry_total": 0,  # retries are ours (call_retrying), bounded by the request deadline
            "permit_redirects": False,  # and the transport refuses any 3xx (upstream_redirect)
        }
        if self._api_version:
            kwargs["api_version"] = self._api_version
        kwargs["transport"] = verifying_transport(
            self._ssl_context(),
            connections_per_host=max(sdk.max_connections, 0),
            service=self._service(vault.url),
            max_body=sdk.max_body,
            **transport_settings,
        )
        return kwargs

    def _ssl_context(self) -> ssl.SSLContext:
        """System roots plus the CA bundle, built once (the factory's, unless a bundle of our own)."""
        factory = self._credentials
        if self._ca_bundle is None or self._ca_bundle == factory.ca_bundle:
            return factory.ssl_context()
        if self._own_ssl_context is None:
            self._own_ssl_context = client_ssl_context(self._ca_bundle)
        return self._own_ssl_context

    def _slot(self, vault_url: str) -> AbstractAsyncContextManager[Any]:
        """The vault's in-flight limit (``SdkSettings.max_connections``; 0 or less: none)."""
        if self._sdk.max_connections <= 0:
            return contextlib.nullcontext()
        return self._slots.setdefault(vault_url, asyncio.Semaphore(self._sdk.max_connections))

    def _client(self, vault: Endpoint, credential: AsyncTokenCredential) -> KeyClient:
        key = (vault.url, id(credential))
        client = self._clients.get(key)
        if client is None:
            scoped = self._credentials.scoped(credential, vault.url)
            client = _key_client(vault.url, scoped, **self._client_kwargs(vault))
            self._clients[key] = client
        return client

    async def release(
        self,
        ref: KeyRef,
        target_token: str,
        *,
        access_token: str | None = None,
        enc: Enc = Enc.CKM_RSA_AES_KEY_WRAP,
        deadline: Deadline | None = None,
    ) -> ReleaseResult:
        """Ask the vault to release the key ``ref`` to the TEE described by ``target_token`` (an MAA JWT).

        Raises :class:`ReleaseDenied` (401/403), :class:`KeyNotFound` (404), :class:`BadRequest` (400),
        :class:`IdentityError` (no access token), :class:`UpstreamError` (unreachable, 429/5xx after the
        retries) or :class:`UpstreamTimeout` (``deadline`` ran out).
        """
        vault_url, name, version = ref.vault.url, ref.name, ref.version
        if not target_token or not target_token.strip():
            raise BadRequest("the attestation token for the release is empty")
        try:
            algorithm = Enc(enc).value
        except ValueError:
            raise BadRequest(
                f"enc {str(enc)[:40]!r} is not one of {', '.join(e.value for e in Enc)}"
            ) from None
        await import_off_loop(*SDK_MODULES)
        credential = self._credentials.for_request(access_token)
        ephemeral = isinstance(credential, StaticTokenCredential)
        client = (
            _key_client(
                vault_url, self._credentials.scoped(credential, vault_url), **self._client_kwargs(ref.vault)
            )
            if ephemeral
            else self._client(ref.vault, credential)
        )
        remaining = deadline.remaining() if deadline is not None else None
        try:
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                slot = self._slot(vault_url)

                async def attempt() -> ReleaseKeyResult:
                    # A slot per attempt (not across retry pauses). asyncio.Semaphore queues fairly; the
                    # connector's own limit lets newcomers take a freed connection before older waiters.
                    async with slot:
                        return await client.release_key(
                            name, target_token, version=version, algorithm=algorithm
                        )

                result: ReleaseKeyResult = await call_retrying(
                    attempt,
                    deadline=deadline or Deadline.after(self._sdk.read_timeout * self._sdk.retry.attempts),
                    policy=self._sdk.retry,
                    is_transient=_is_transient,
                    retry_after=_retry_after,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"{self._service(vault_url)} {vault_url} did not answer the release of {name} before the "
                f"request deadline ({host_of_url(vault_url)}: timeout)",
                hint="the vault or the network is slow; retry, or raise the request timeout",
            ) from None
        except (HttpResponseError, ServiceRequestError, ServiceResponseError, ValueError) as exc:
            raise self._map_error(exc, vault_url, name, version) from None
        finally:
            if ephemeral:
                await client.close()
        if not isinstance(result.value, str) or not result.value:
            raise UpstreamError(
                f"{self._service(vault_url)} {vault_url} answered the release of {name} without a value",
                hint="the endpoint does not speak the Key Vault release protocol",
            )
        return ReleaseResult(jws=result.value, vault_url=vault_url, name=name, version=version)

    def _service(self, vault_url: str) -> str:
        return "Managed HSM" if self._credentials.is_managed_hsm(vault_url) else "Key Vault"

    def _map_error(self, exc: Exception, vault_url: str, name: str, version: str | None) -> SkrError:
        service = self._service(vault_url)
        what = f"{name}/{version}" if version else name
        cause = _upstream_cause(exc)
        if cause is not None:  # skr's own refusal from inside the SDK (a redirect to the identity endpoint)
            return cause
        if isinstance(exc, HttpResponseError) and exc.status_code and 300 <= exc.status_code <= 399:
            headers = getattr(exc.response, "headers", None)
            location = headers.get("Location") if headers is not None else None
            return redirect_error(service, vault_url, exc.status_code, location)
        if isinstance(exc, ClientAuthenticationError) and not _answered_by(exc, vault_url):
            return IdentityError(
                f"no access token for {service} {vault_url}: {_first_line(exc.message)}",
                hint=f"check the {self._credentials.kind.replace('_', ' ')} configuration "
                f"(scope {self._credentials.scope_for(vault_url)}), or pass access_token",
            )
        if isinstance(exc, HttpResponseError) and exc.status_code:
            return self._map_status(vault_error(exc), service, vault_url, what)
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            text = _first_line(str(exc))
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                return UpstreamError(
                    f"{service} {vault_url} presented a TLS certificate that is not trusted",
                    hint=f"check the endpoint; for private CAs set {CA_BUNDLE_ENV}",
                    code=Code.UPSTREAM_TLS_UNTRUSTED,
                )
            return UpstreamError(
                f"{service} {vault_url} could not be reached at {host_of_url(vault_url)}: "
                f"{connection_cause(exc.inner_exception)}",
                hint="check the vault name, DNS, private endpoint and network egress",
                code=Code.UPSTREAM_UNREACHABLE,
            )
        if isinstance(exc, ValueError) and "challenge" in str(exc).lower():
            return UpstreamError(
                f"{service} {vault_url} sent an authentication challenge for another resource: "
                f"{_first_line(str(exc))}",
                hint="check the vault URL; for a trusted local emulator add its host to "
                "allow_insecure_challenge_hosts",
                code=Code.VAULT_CHALLENGE_MISMATCH,
            )
        return UpstreamError(f"{service} {vault_url} release of {what} failed: {_first_line(str(exc))}")

    def _map_status(self, error: VaultError, service: str, vault_url: str, what: str) -> SkrError:
        role = MANAGED_HSM_RELEASE_ROLE if service == "Managed HSM" else VAULT_RELEASE_ROLE
        detail = error.summary()
        if error.status in (401, 403):
            return ReleaseDenied(
                f"{service} {vault_url} refused to release {what}: {detail}",
                hint=(
                    "the attestation token does not satisfy the key's release policy (compare the claim "
                    f"named above with the policy), or the identity lacks the '{role}' role on the key"
                    if error.status == 403
                    else f"the access token was rejected; check its tenant and audience and the '{role}' role"
                ),
                code=Code.ACCESS_TOKEN_REJECTED if error.status == 401 else None,
                upstream_status=error.status,
            )
        if error.status == 404:
            return KeyNotFound(
                f"{service} {vault_url} has no key {what}: {detail}",
                hint="check kid (name and version) and the vault endpoint",
                upstream_status=error.status,
            )
        if error.status == 400:
            return BadRequest(
                f"{service} {vault_url} rejected the release of {what}: {detail}",
                hint="check the key is exportable with a release policy, the enc and the api-version",
                upstream_status=error.status,
            )
        if error.status == 429 or error.status >= 500:
            return UpstreamError(
                f"{service} {vault_url} kept failing the release of {what}: {detail}",
                hint="the service is throttling or unavailable; retry later",
                upstream_status=error.status,
            )
        return UpstreamError(
            f"{service} {vault_url} answered the release of {what} with {detail}",
            upstream_status=error.status,
        )

    async def aclose(self) -> None:
        """Close every cached SDK client (the credentials belong to the factory)."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()


SDK_MODULES = ("azure.keyvault.keys.aio",)


async def import_off_loop(*modules: str) -> None:
    """Import ``modules`` in a worker thread unless they are loaded already.

    The Azure SDKs are imported on the first release rather than at start-up (start-up time and idle
    memory), and importing them takes 0.1-0.3 s of CPU: done on the event loop, that would stall every
    other request, ``/status`` and the probes included.
    """
    missing = [name for name in modules if name not in sys.modules]
    if missing:
        await asyncio.to_thread(lambda: [importlib.import_module(name) for name in missing])


def _key_client(vault_url: str, credential: AsyncTokenCredential, **kwargs: Any) -> KeyClient:
    """A new SDK client. The SDK is loaded on the first release (``import_off_loop``), not at start-up."""
    from azure.keyvault.keys.aio import KeyClient

    return KeyClient(vault_url, credential, **kwargs)


def _upstream_cause(exc: BaseException) -> UpstreamError | None:
    """An :class:`UpstreamError` skr raised inside the SDK that the SDK wrapped in its own exception."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UpstreamError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _answered_by(exc: HttpResponseError, vault_url: str) -> bool:
    """True when the HTTP response in ``exc`` came from the vault (not from an identity endpoint)."""
    response = exc.response
    request = getattr(response, "request", None) if response is not None else None
    url = str(getattr(request, "url", "") or "")
    return url == vault_url or url.startswith(vault_url + "/")


def _first_line(text: str | None) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"
    return line if len(line) <= _MAX_DETAIL else line[: _MAX_DETAIL - 1] + "…"


def _is_transient(exc: BaseException) -> bool:
    """Worth another attempt: 408, 429, 5xx, or no answer at all (but never an untrusted certificate)."""
    if isinstance(exc, ClientAuthenticationError):
        return False
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        return is_transient_status(exc.status_code)
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        text = str(exc)
        return "CERTIFICATE_VERIFY_FAILED" not in text and "certificate verify failed" not in text
    return False


def _retry_after(exc: BaseException | None) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    return parse_retry_after(headers.get("Retry-After")) if headers is not None else None
