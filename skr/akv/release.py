"""The Key Vault / Managed HSM *release* call: ``POST {vault}/keys/{name}[/{version}]/release``.

Owns: the call on skr's upstream client (its timeouts, its retry policy, the per-request deadline), the
vault's authentication challenge, the in-flight cap per vault, and the mapping of the vault's answers to
skr errors that carry the vault's error code plus a hint on what to fix (RBAC role, release policy, key
name). It takes the key parsed (:class:`skr.endpoints.KeyRef`) and returns the release JWS untouched:
verifying and unwrapping it is :mod:`skr.akv.jws`'s job. The wire is the one the Azure SDK speaks
(docs/wire-formats.md, "Key Vault"); the sidecar does not load the SDK (its memory and per-call CPU).

Authentication as the SDK does it: the first release to a vault goes out without a token and with an empty
body; the vault's 401 challenge must name a resource in the vault's own domain (checked for every Azure
domain, relaxed only for explicitly allow-listed non-Azure hosts such as local emulators), and whatever it
names, a token is only ever requested for the vault kind's own scope
(:class:`skr.identity.VaultScopedCredential`). The vault's challenge is remembered, so later releases
carry the token at once. TLS is always verified (a CA bundle only *adds* anchors), no redirect is followed
(any 3xx is ``upstream_redirect``) and no answer is buffered past ``SdkSettings.max_body``. A vault's error
text is reduced to its codes and the claim names it mentions.
Never logs or puts into a message the attestation token, the access token or the released key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import ssl
from collections.abc import Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

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
from skr.identity import CredentialFactory, VaultScopedCredential
from skr.upstream import (
    DEFAULT_MAX_UPSTREAM_BODY,
    Deadline,
    HttpResult,
    RetryPolicy,
    client_ssl_context,
    host_of_url,
    request,
)

if TYPE_CHECKING:  # the commands' SDK exceptions (skr keys); the sidecar never imports azure-core
    from azure.core.exceptions import HttpResponseError

DEFAULT_API_VERSION = "2025-07-01"  # what azure-keyvault-keys 4.11 sends

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
# A release changes nothing in the vault (it only wraps the key for the target), so it is safe to repeat on
# 408/429/5xx and after a reset connection.


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
    """Per-attempt timeouts and the retry policy of each release call (the name is from when the Azure
    SDK made it). Transient failures (408, 429, 5xx, connection errors) are retried by the policy every
    upstream call uses, which honours Retry-After and never sleeps past the request deadline.
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
    """The vault's error from an Azure SDK exception (the commands' ``KeyClient`` calls): the body first,
    the SDK's error model second."""
    response = exc.response
    model = getattr(exc, "error", None)
    try:
        text = response.text() if response is not None else ""
    except (ValueError, UnicodeDecodeError):
        text = ""
    reason = getattr(response, "reason", None) if response is not None else None
    error = _error_from_body(int(exc.status_code or 0), text.encode(), "")
    return dataclasses.replace(
        error,
        code=error.code or str(getattr(model, "code", "") or ""),
        message=error.message or str(getattr(model, "message", None) or reason or "no error body"),
    )


def _error_from_body(status: int, body: bytes, fallback: str = "no error body") -> VaultError:
    """The vault's ``{"error": {"code", "message", "innererror": {"code"}}}`` as it answered; ``fallback``
    is the message when it has none."""
    try:
        document = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    code, message, inner = "", "", None
    if isinstance(error, dict):
        code, message = str(error.get("code") or ""), str(error.get("message") or "")
        inner_obj = error.get("innererror")
        if isinstance(inner_obj, dict) and inner_obj.get("code"):
            inner = str(inner_obj["code"])
    return VaultError(status=status, code=code, message=message or fallback, inner_code=inner)


_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)="([^"]*)"')


def challenge_scope(header: str) -> str | None:
    """The scope a ``WWW-Authenticate: Bearer authorization="…", resource="…"`` challenge asks for
    (``scope=`` as given, else ``resource`` + ``/.default``); None when it is not a Bearer challenge with
    an authorization URI and a resource or scope."""
    if not header.strip().lower().startswith("bearer"):
        return None
    params: dict[str, str] = {k.lower(): v.strip() for k, v in _CHALLENGE_PARAM.findall(header)}
    if not (params.get("authorization") or params.get("authorization_uri")):
        return None
    if params.get("scope"):
        return params["scope"]
    return params["resource"].rstrip("/") + "/.default" if params.get("resource") else None


class KeyVaultReleaser:
    """Releases keys from Key Vault / Managed HSM.

    ``credentials`` chooses the credential per call; ``api_version`` overrides :data:`DEFAULT_API_VERSION`;
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
        self._api_version = (api_version or "").strip() or DEFAULT_API_VERSION
        self._ca_bundle = ca_bundle
        self._sdk = sdk or SdkSettings()
        self._insecure_challenge = frozenset(
            parse_endpoint(h, what="an insecure challenge host") for h in allow_insecure_challenge_hosts
        )
        self._session: aiohttp.ClientSession | None = None
        self._own_ssl_context: ssl.SSLContext | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._challenges: dict[str, str] = {}  # vault URL -> the scope its (checked) challenge named

    def verify_challenge_resource(self, vault: Endpoint) -> bool:
        """False only for allow-listed endpoints outside Azure's domains; True for everything else.

        A listed ``host`` without a port (port 443 once parsed) names the host on any port."""
        listed = vault in self._insecure_challenge or Endpoint(vault.host) in self._insecure_challenge
        return not (listed and not is_azure_host(vault))

    def _ssl_context(self) -> ssl.SSLContext:
        """System roots plus the CA bundle, built once (the factory's, unless a bundle of our own)."""
        factory = self._credentials
        if self._ca_bundle is None or self._ca_bundle == factory.ca_bundle:
            return factory.ssl_context()
        if self._own_ssl_context is None:
            self._own_ssl_context = client_ssl_context(self._ca_bundle)
        return self._own_ssl_context

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            limit = max(self._sdk.max_connections, 0)
            connector = aiohttp.TCPConnector(ssl=self._ssl_context(), limit=0, limit_per_host=limit)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def _slot(self, vault_url: str) -> AbstractAsyncContextManager[Any]:
        """The vault's in-flight limit (``SdkSettings.max_connections``; 0 or less: none)."""
        if self._sdk.max_connections <= 0:
            return contextlib.nullcontext()
        return self._slots.setdefault(vault_url, asyncio.Semaphore(self._sdk.max_connections))

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
        retries, a challenge for another resource) or :class:`UpstreamTimeout` (``deadline`` ran out).
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
        service = self._service(vault_url)
        what = f"{name}/{version}" if version else name
        # "latest" is an empty version segment, as the SDK and the Go sidecar send it
        url = f"{vault_url}/keys/{name}/{version or ''}/release?api-version={self._api_version}"
        credential = self._credentials.scoped(self._credentials.for_request(access_token), vault_url)
        deadline = deadline or Deadline.after(self._sdk.read_timeout * self._sdk.retry.attempts)
        try:
            if deadline.remaining() <= 0:
                raise TimeoutError
            async with asyncio.timeout(deadline.remaining()):
                scope = self._challenges.get(vault_url) or await self._challenge(
                    ref.vault, url, service, deadline
                )
                token = await self._token(credential, scope, service, vault_url)
                body = json.dumps({"target": target_token, "enc": algorithm}).encode()
                result = await self._call(vault_url, url, service, deadline, body=body, token=token)
        except TimeoutError:
            raise UpstreamTimeout(
                f"{service} {vault_url} did not answer the release of {name} before the "
                f"request deadline ({host_of_url(vault_url)}: timeout)",
                hint="the vault or the network is slow; retry, or raise the request timeout",
            ) from None
        if result.status != 200:
            raise self._map_status(_error_from_body(result.status, result.body), service, vault_url, what)
        try:
            value = result.json().get("value")
        except (UpstreamError, AttributeError):
            value = None
        if not isinstance(value, str) or not value:
            raise UpstreamError(
                f"{service} {vault_url} answered the release of {name} without a value",
                hint="the endpoint does not speak the Key Vault release protocol",
            )
        return ReleaseResult(jws=value, vault_url=vault_url, name=name, version=version)

    async def _call(
        self,
        vault_url: str,
        url: str,
        service: str,
        deadline: Deadline,
        *,
        body: bytes,
        token: str | None = None,
    ) -> HttpResult:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await request(
            self._http(),
            "POST",
            url,
            service=service,
            data=body,
            headers=headers,
            ssl_context=self._ssl_context(),
            timeout=self._sdk.read_timeout,
            deadline=deadline,
            retry=self._sdk.retry,
            max_body=self._sdk.max_body,
            slot=self._slot(vault_url),
            return_last=True,
        )

    async def _challenge(self, vault: Endpoint, url: str, what: str, deadline: Deadline) -> str:
        """The scope the vault's challenge names, from a release without a token or a body (as the SDK
        asks); refused when it names a resource outside the vault's domain (unless allow-listed)."""
        service = self._service(vault.url)
        result = await self._call(vault.url, url, service, deadline, body=b"")
        header = result.headers.get("WWW-Authenticate", "") if result.status == 401 else ""
        scope = challenge_scope(header)
        if scope is None:
            if result.status in (400, 403, 404) or result.status >= 500:
                raise self._map_status(_error_from_body(result.status, result.body), service, vault.url, what)
            raise UpstreamError(
                f"{service} {vault.url} did not answer a release without a token with a Bearer challenge "
                f"(HTTP {result.status})",
                hint="the endpoint does not speak the Key Vault protocol; check the vault URL",
                upstream_status=result.status,
            )
        resource = scope.removesuffix("/.default")
        resource_host = resource.split("://", 1)[-1].split("/", 1)[0].lower()
        if self.verify_challenge_resource(vault) and not (
            vault.host == resource_host or vault.host.endswith("." + resource_host)
        ):
            raise UpstreamError(
                f"{service} {vault.url} sent an authentication challenge for another resource: "
                f"{resource[:100]!r} is not in the domain of {vault.host}",
                hint="check the vault URL; for a trusted local emulator add its host to "
                "allow_insecure_challenge_hosts",
                code=Code.VAULT_CHALLENGE_MISMATCH,
            )
        self._challenges[vault.url] = scope
        return scope

    async def _token(
        self, credential: VaultScopedCredential, scope: str, service: str, vault_url: str
    ) -> str:
        try:
            return (await credential.get_token_info(scope)).token
        except IdentityError as exc:
            raise IdentityError(
                f"no access token for {service} {vault_url}: {exc.message}",
                hint=f"check the {self._credentials.kind.replace('_', ' ')} configuration "
                f"(scope {self._credentials.scope_for(vault_url)}), or pass access_token",
                upstream_status=exc.upstream_status,
            ) from None

    def _service(self, vault_url: str) -> str:
        return "Managed HSM" if self._credentials.is_managed_hsm(vault_url) else "Key Vault"

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
        """Close the connections to the vaults (the credentials belong to the factory)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
