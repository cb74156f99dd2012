"""Which Azure credential the sidecar uses to call Key Vault / Managed HSM, and for which scope.

Owns the choice, in the order the Go sidecar uses (request token, then workload identity, then IMDS):

1. an ``access_token`` given in the request → :class:`StaticTokenCredential` (the token as-is);
2. workload identity when ``AZURE_CLIENT_ID``, ``AZURE_TENANT_ID`` and ``AZURE_FEDERATED_TOKEN_FILE`` are
   all set → :class:`WorkloadIdentityCredential` (the federated assertion, re-read for every token, posted to
   ``AZURE_AUTHORITY_HOST``, default Entra ID);
3. otherwise managed identity → :class:`ManagedIdentityCredential`: the App Service protocol when
   ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER`` are set, else IMDS (at ``AZURE_POD_IDENTITY_AUTHORITY_HOST``
   when set), optionally user-assigned by ``client_id``.

Both ambient credentials are skr's own (docs/wire-formats.md, "Identity"): one token per scope, cached until
five minutes before it expires, fetched once for concurrent callers, over skr's upstream client (its retry
policy, no redirects, capped bodies); a refusal is an :class:`skr.errors.IdentityError`. The ambient
credential is created once and reused. TLS to identity endpoints is always verified; a configured CA
bundle *adds* trust anchors to the system roots. Tokens are azure-core's types field for field, so the
commands' Azure SDK clients take these credentials (with the transport of :mod:`skr.sdk`); the sidecar
itself never imports azure-core.

The scope of a vault token is skr's choice, never the vault's: :class:`VaultScopedCredential` asks the
credential only for the data-plane scope of the vault's kind and refuses, before any token is requested,
an authentication challenge that names another resource.

Never logs, formats or stores a token anywhere but in the credential objects themselves.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self
from urllib.parse import urlencode

import aiohttp

from skr.b64 import b64url_decode
from skr.endpoints import cloud_suffix, host_of, is_azure_host, is_managed_hsm
from skr.errors import BadRequest, Code, ConfigError, IdentityError, UpstreamError
from skr.upstream import DEFAULT_MAX_UPSTREAM_BODY, HttpResult, request, summarize_body

if TYPE_CHECKING:  # azure-core is the commands' (their SDK clients); the sidecar never imports it
    from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
    from azure.core.credentials_async import AsyncTokenCredential
else:

    class AccessToken(NamedTuple):
        """azure-core's ``AccessToken``, field for field (tests/test_identity.py compares them)."""

        token: str
        expires_on: int

    class AccessTokenInfo(NamedTuple):
        """azure-core's ``AccessTokenInfo``, attribute for attribute: what the SDKs' auth policies read."""

        token: str
        expires_on: int
        token_type: str = "Bearer"  # noqa: S105 - the scheme's name, not a secret
        refresh_on: int | None = None


VAULT_SCOPE = "https://vault.azure.net/.default"
MANAGED_HSM_SCOPE = "https://managedhsm.azure.net/.default"

WORKLOAD_IDENTITY_ENV = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE")
STATIC_TOKEN_DEFAULT_LIFETIME = 3600

IMDS_URL = "http://169.254.169.254"
IMDS_API_VERSION = "2018-02-01"
APP_SERVICE_API_VERSION = "2019-08-01"
ENTRA_AUTHORITY = "https://login.microsoftonline.com"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
IDENTITY_TIMEOUT = 10.0  # seconds per attempt; the caller's deadline bounds the whole
REFRESH_BEFORE = 300  # seconds before expiry a cached token is refreshed

log = logging.getLogger(__name__)


def scope_for(vault: str, *, managed_hsm_hosts: Collection[str] = ()) -> str:
    """The AAD scope of the data plane a vault host belongs to.

    The rule:

    * ``*.managedhsm.<cloud suffix>`` → ``https://managedhsm.<cloud suffix>/.default`` (public cloud:
      ``https://managedhsm.azure.net/.default``; Azure China ``managedhsm.azure.cn``; US Government
      ``managedhsm.usgovcloudapi.net``);
    * ``*.vault.<cloud suffix>`` → ``https://vault.<cloud suffix>/.default`` (public cloud:
      ``https://vault.azure.net/.default``; ``vault.azure.cn``, ``vault.usgovcloudapi.net`` ...);
    * any other host (private endpoints with custom DNS, local emulators) → the public Managed HSM scope
      when the host is listed in ``managed_hsm_hosts`` (and is not an Azure domain), else the public
      Key Vault scope — the same default as the Go sidecar.

    The port and the scheme are ignored; matching is case-insensitive and on whole DNS labels
    (``evilvault.azure.net.example.com`` is not a vault).
    """
    host = host_of(vault)
    suffix = cloud_suffix(host)
    if suffix is not None:
        return f"https://{suffix}/.default"
    if is_managed_hsm(host, managed_hsm_hosts=managed_hsm_hosts):
        return MANAGED_HSM_SCOPE
    return VAULT_SCOPE


def _jwt_expiry(token: str) -> int | None:
    """The ``exp`` claim of a JWT (not verified; only used to know when to stop presenting it)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(b64url_decode(parts[1]))
    except ValueError:  # not base64url, not UTF-8 or not JSON
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return int(exp)
    return None


class _AsyncCredential(abc.ABC):
    """The base of skr's credentials: ``get_token`` from ``get_token_info``, and ``async with``."""

    @abc.abstractmethod
    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """A token with its expiry for ``scopes``."""

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """:meth:`get_token_info` as azure-core's older ``get_token`` (claims and tenant are not used)."""
        info = await self.get_token_info(*scopes)
        return AccessToken(info.token, info.expires_on)

    async def close(self) -> None:  # noqa: B027 - optional: most credentials hold nothing
        """Nothing to release by default."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.close()


class StaticTokenCredential(_AsyncCredential):
    """An ``AsyncTokenCredential`` that presents one access token given by the caller, whatever the scope.

    Expiry comes from the JWT ``exp`` claim when the token is a decodable JWT, else one hour from now.
    The token never appears in ``repr`` or ``str``.
    """

    def __init__(self, token: str, *, now: float | None = None) -> None:
        token = token.strip()
        if not token:
            raise BadRequest("access_token is empty", hint="pass a bearer token for the vault, or omit it")
        self._token = token
        issued = int(now if now is not None else time.time())
        self._expires_on = _jwt_expiry(token) or issued + STATIC_TOKEN_DEFAULT_LIFETIME

    @property
    def expires_on(self) -> int:
        """When the token stops being valid (epoch seconds)."""
        return self._expires_on

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """The configured token with its expiry."""
        return AccessTokenInfo(self._token, self._expires_on)

    async def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"StaticTokenCredential(expires_on={self._expires_on})"

    __str__ = __repr__


class _AmbientCredential(_AsyncCredential):
    """A token source at an identity endpoint: one token per scope, cached until ``REFRESH_BEFORE`` seconds
    before it expires (a still-valid token is kept when a refresh fails), one fetch for concurrent callers."""

    service = "identity endpoint"

    def __init__(self, ssl_context: ssl.SSLContext, *, max_body: int = DEFAULT_MAX_UPSTREAM_BODY) -> None:
        self._ssl_context = ssl_context
        self._max_body = max_body
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[str, AccessTokenInfo] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """A token with its expiry for the one scope asked for (cached)."""
        if len(scopes) != 1:
            raise ValueError(f"{type(self).__name__} issues a token for exactly one scope")
        scope = scopes[0]
        async with self._locks.setdefault(scope, asyncio.Lock()):
            cached = self._tokens.get(scope)
            now = time.time()
            if cached is not None and cached.expires_on - now > REFRESH_BEFORE:
                return cached
            try:
                self._tokens[scope] = await self._fetch(scope)
            except Exception:
                if cached is not None and cached.expires_on > now:
                    return cached
                raise
            return self._tokens[scope]

    async def _fetch(self, scope: str) -> AccessTokenInfo:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl_context))
        method, url, headers, body = await self._request(scope)
        result = await request(
            self._session,
            method,
            url,
            service=self.service,
            headers=headers,
            data=body,
            ssl_context=self._ssl_context,
            timeout=IDENTITY_TIMEOUT,
            max_body=self._max_body,
        )
        info = _token_info(result, self.service, scope)
        log.debug(
            "identity token issued",
            extra={"endpoint": self.service, "scope": scope, "expires_on": info.expires_on},
        )
        return info

    @abc.abstractmethod
    async def _request(self, scope: str) -> tuple[str, str, dict[str, str], bytes | None]:
        """Method, URL, headers and body of a token request for ``scope``."""

    async def close(self) -> None:
        """Close the connections to the identity endpoint."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scopes={sorted(self._tokens)!r})"


class ManagedIdentityCredential(_AmbientCredential):
    """Managed identity: the App Service protocol when ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` are set,
    else IMDS (at ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` when set). The resource is the scope without
    ``/.default``; ``client_id`` selects a user-assigned identity."""

    def __init__(
        self, ssl_context: ssl.SSLContext, env: Mapping[str, str], *, client_id: str | None = None, **kw: Any
    ) -> None:
        super().__init__(ssl_context, **kw)
        self._client_id = client_id
        endpoint, secret = env.get("IDENTITY_ENDPOINT", "").strip(), env.get("IDENTITY_HEADER", "").strip()
        if endpoint and secret:
            self._url, self._headers = endpoint, {"X-IDENTITY-HEADER": secret}
            self._api_version, self.service = APP_SERVICE_API_VERSION, "managed identity endpoint"
        else:
            host = env.get("AZURE_POD_IDENTITY_AUTHORITY_HOST", "").strip() or IMDS_URL
            self._url, self._headers = (
                host.rstrip("/") + "/metadata/identity/oauth2/token",
                {"Metadata": "true"},
            )
            self._api_version, self.service = IMDS_API_VERSION, "IMDS"

    async def _request(self, scope: str) -> tuple[str, str, dict[str, str], bytes | None]:
        query = {"api-version": self._api_version, "resource": scope.removesuffix("/.default")}
        if self._client_id:
            query["client_id"] = self._client_id
        return "GET", f"{self._url}?{urlencode(query)}", self._headers, None


class WorkloadIdentityCredential(_AmbientCredential):
    """Workload identity: the federated assertion in ``token_file`` (re-read for every token, the kubelet
    rotates it) exchanged at ``{authority}/{tenant}/oauth2/v2.0/token`` (client-credentials grant)."""

    service = "Entra ID token endpoint"

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        tenant_id: str,
        client_id: str,
        token_file: str,
        authority: str,
        **kw: Any,
    ) -> None:
        super().__init__(ssl_context, **kw)
        authority = authority if "://" in authority else f"https://{authority}"
        self._url = f"{authority.rstrip('/')}/{tenant_id}/oauth2/v2.0/token"
        self._client_id, self._token_file = client_id, Path(token_file)

    async def _request(self, scope: str) -> tuple[str, str, dict[str, str], bytes | None]:
        if not self._url.lower().startswith("https://"):
            raise IdentityError(f"AZURE_AUTHORITY_HOST must be an https URL, not {self._url}")
        try:
            assertion = (await asyncio.to_thread(self._token_file.read_text)).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(
                f"AZURE_FEDERATED_TOKEN_FILE {self._token_file} cannot be read ({type(exc).__name__})"
            ) from None
        form = {
            "client_assertion": assertion,
            "client_assertion_type": ASSERTION_TYPE,
            "client_id": self._client_id,
            "grant_type": "client_credentials",
            "scope": scope,
        }
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return "POST", self._url, headers, urlencode(form).encode()


def _token_info(result: HttpResult, service: str, scope: str) -> AccessTokenInfo:
    """The token in an identity endpoint's answer: ``access_token`` with ``expires_on`` (epoch seconds, a
    number or a string) or ``expires_in``. A refusal names the status, the error code and the first line of
    ``error_description`` (never a body that could hold a token)."""
    if result.status != 200:
        code = summarize_body(result.body)
        try:
            described = json.loads(result.body).get("error_description")
        except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
            described = None
        detail = (
            described.strip().splitlines()[0][:300]
            if isinstance(described, str) and described.strip()
            else ""
        )
        raise IdentityError(
            f"the {service} refused a token for {scope} (HTTP {result.status}"
            + (f" {code}" if code else "")
            + ")"
            + (f": {detail}" if detail else ""),
            upstream_status=result.status,
        )
    doc = result.json()
    token = doc.get("access_token") if isinstance(doc, dict) else None
    try:
        if isinstance(doc, dict) and doc.get("expires_on") not in (None, ""):
            expires_on = int(float(doc["expires_on"]))
        else:
            expires_on = int(time.time()) + int(float(doc["expires_in"]))
    except (KeyError, TypeError, ValueError):
        expires_on = 0
    if not isinstance(token, str) or not token or expires_on <= 0:
        raise IdentityError(f"the {service} answered without an access_token and its expiry for {scope}")
    return AccessTokenInfo(token, expires_on)


def _scope_resource(scope: str) -> str:
    """The resource of a scope (``https://vault.azure.net/.default`` → ``https://vault.azure.net``)."""
    text = scope.strip()
    if text.lower().endswith("/.default"):
        text = text[: -len("/.default")]
    return text.rstrip("/").lower()


def vault_scopes(vault: str, *, managed_hsm_hosts: Collection[str] = ()) -> tuple[str, ...]:
    """The scopes a token for ``vault`` may be requested for, the first being the one :func:`scope_for`
    names. An Azure host has exactly one (its kind in its cloud). For a host outside Azure (private
    endpoint with custom DNS, local emulator) the name cannot tell the kind, so a configured Managed HSM
    host has the Managed HSM scope only, and any other host the public Key Vault or Managed HSM scope —
    never another resource."""
    first = scope_for(vault, managed_hsm_hosts=managed_hsm_hosts)
    if is_azure_host(vault) or first == MANAGED_HSM_SCOPE:
        return (first,)
    return (first, MANAGED_HSM_SCOPE)


class VaultScopedCredential(_AsyncCredential):
    """An ``AsyncTokenCredential`` for one vault that asks ``credential`` only for a vault data-plane
    scope (:func:`vault_scopes`), whatever the vault's 401 challenge names.

    A challenge naming any other resource (Azure Resource Manager, Microsoft Graph, ...) is refused with
    ``vault_challenge_mismatch`` before any token is requested. The scope passed on is skr's own string,
    not the challenge's. The tenant in the challenge is passed on (skr's own credentials ignore it).
    """

    def __init__(self, credential: AsyncTokenCredential, vault_url: str, scopes: tuple[str, ...]) -> None:
        self._credential = credential
        self._vault_url = vault_url
        self._scopes = {_scope_resource(s): s for s in scopes}

    @property
    def inner(self) -> AsyncTokenCredential:
        """The credential tokens come from."""
        return self._credential

    def _scope(self, requested: tuple[str, ...]) -> str:
        resources = {_scope_resource(s) for s in requested}
        if len(resources) == 1:
            (resource,) = resources
            if resource in self._scopes:
                return self._scopes[resource]
        named = ", ".join(sorted(r[:100] for r in resources)) or "nothing"
        raise UpstreamError(
            f"the vault {self._vault_url} asked for a token for {named}, not for its own data plane "
            f"({', '.join(self._scopes.values())}); no token was requested",
            hint="the endpoint is not the vault it claims to be, or the vault kind is misconfigured; "
            "check the vault URL",
            code=Code.VAULT_CHALLENGE_MISMATCH,
        )

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """A token (with its expiry) for the vault's own scope; refuses any other."""
        scope = self._scope(scopes)
        get_token_info = getattr(self._credential, "get_token_info", None)
        if get_token_info is not None:
            info: AccessTokenInfo = await get_token_info(scope, options=options)
            return info
        opts: TokenRequestOptions = options or {}
        token = await self._credential.get_token(
            scope,
            claims=opts.get("claims"),
            tenant_id=opts.get("tenant_id"),
            enable_cae=bool(opts.get("enable_cae", False)),
        )
        return AccessTokenInfo(token.token, token.expires_on)

    async def close(self) -> None:
        """Nothing of its own: the wrapped credential belongs to its factory or to the call."""

    def __repr__(self) -> str:
        return f"VaultScopedCredential(vault_url={self._vault_url!r}, scopes={list(self._scopes.values())!r})"


class CredentialFactory:
    """Chooses and keeps the credential for vault calls (request token → workload → managed identity).

    ``env`` decides whether workload identity is configured (default ``os.environ``);
    ``client_id`` selects a user-assigned managed identity (``SkrSideCarArgs.identity.client_id``);
    ``ca_bundle`` adds trust anchors for identity endpoints (local services, tests);
    ``managed_hsm_hosts`` names non-Azure hosts that serve the Managed HSM data plane (for :meth:`scope_for`).

    ``ssl_context`` is the caller's verifying context when it has one (one parse of the system roots).
    The managed identity endpoint (``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``, or
    ``AZURE_POD_IDENTITY_AUTHORITY_HOST``) is read from the process environment when the credential is made.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        client_id: str | None = None,
        ca_bundle: Path | None = None,
        managed_hsm_hosts: Collection[str] = (),
        max_body: int = DEFAULT_MAX_UPSTREAM_BODY,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._env: Mapping[str, str] = dict(env if env is not None else os.environ)
        self._max_body = max_body
        self._client_id = client_id.strip() if client_id and client_id.strip() else None
        self._ca_bundle = ca_bundle
        self._managed_hsm_hosts = tuple(managed_hsm_hosts)
        self._ambient: AsyncTokenCredential | None = None
        self._ssl_context = ssl_context
        if ca_bundle is not None and not ca_bundle.is_file():
            raise ConfigError(
                f"the CA bundle {ca_bundle} does not exist",
                hint="set SKR_CA_BUNDLE to a PEM file or unset it",
            )

    @property
    def ca_bundle(self) -> Path | None:
        """The extra trust anchors for TLS, if any."""
        return self._ca_bundle

    @property
    def managed_hsm_hosts(self) -> tuple[str, ...]:
        """Non-Azure hosts configured as Managed HSM."""
        return self._managed_hsm_hosts

    @property
    def kind(self) -> str:
        """The ambient credential kind: ``workload_identity`` or ``managed_identity``."""
        return "workload_identity" if self._workload_identity_configured() else "managed_identity"

    def ssl_context(self) -> ssl.SSLContext:
        """The verifying client context: system roots plus the CA bundle (built once)."""
        if self._ssl_context is None:
            context = ssl.create_default_context()
            if self._ca_bundle is not None:
                context.load_verify_locations(cafile=str(self._ca_bundle))
            self._ssl_context = context
        return self._ssl_context

    def transport_kwargs(self, **settings: Any) -> dict[str, Any]:
        """Keyword arguments for an azure SDK client: skr's transport (system roots plus the CA bundle, no
        redirects, capped bodies) and no redirect policy. ``service`` (default "Key Vault") names the
        upstream in errors; ``max_body`` overrides the cap (blob data); other settings go to the transport.
        Call while an event loop is running."""
        from skr.sdk import verifying_transport  # azure-core: the commands' SDK clients only

        service = str(settings.pop("service", "Key Vault"))
        max_body = int(settings.pop("max_body", self._max_body))
        transport = verifying_transport(self.ssl_context(), service=service, max_body=max_body, **settings)
        return {"transport": transport, "permit_redirects": False}

    def _workload_identity_configured(self) -> bool:
        return all(self._env.get(name, "").strip() for name in WORKLOAD_IDENTITY_ENV)

    def for_request(self, access_token: str | None = None) -> AsyncTokenCredential:
        """The credential for one vault call.

        A non-empty ``access_token`` gives a fresh :class:`StaticTokenCredential` (owned by the caller);
        otherwise the shared ambient credential, created on first use. Call from inside the event loop.
        """
        if access_token is not None and access_token.strip():
            return StaticTokenCredential(access_token)
        if self._ambient is None:
            self._ambient = self._create_ambient()
        return self._ambient

    def _create_ambient(self) -> AsyncTokenCredential:
        settings: dict[str, Any] = {"max_body": self._max_body}
        if self._workload_identity_configured():
            return WorkloadIdentityCredential(
                self.ssl_context(),
                tenant_id=self._env["AZURE_TENANT_ID"].strip(),
                client_id=self._env["AZURE_CLIENT_ID"].strip(),
                token_file=self._env["AZURE_FEDERATED_TOKEN_FILE"].strip(),
                authority=self._env.get("AZURE_AUTHORITY_HOST", "").strip() or ENTRA_AUTHORITY,
                **settings,
            )
        return ManagedIdentityCredential(
            self.ssl_context(), os.environ, client_id=self._client_id, **settings
        )

    def scope_for(self, vault: str) -> str:
        """The AAD scope for ``vault``; see :func:`scope_for`."""
        return scope_for(vault, managed_hsm_hosts=self._managed_hsm_hosts)

    def vault_scopes(self, vault: str) -> tuple[str, ...]:
        """The scopes a token for ``vault`` may be requested for; see :func:`vault_scopes`."""
        return vault_scopes(vault, managed_hsm_hosts=self._managed_hsm_hosts)

    def scoped(self, credential: AsyncTokenCredential, vault_url: str) -> VaultScopedCredential:
        """``credential`` restricted to ``vault_url``'s own data-plane scope."""
        return VaultScopedCredential(credential, vault_url, self.vault_scopes(vault_url))

    def is_managed_hsm(self, vault: str) -> bool:
        """True when ``vault`` is a Managed HSM (by domain or configuration)."""
        return is_managed_hsm(vault, managed_hsm_hosts=self._managed_hsm_hosts)

    async def aclose(self) -> None:
        """Close the ambient credential (and its transport)."""
        credential, self._ambient = self._ambient, None
        if credential is not None:
            await credential.close()

    def __repr__(self) -> str:
        return f"CredentialFactory(kind={self.kind!r}, client_id={self._client_id!r})"
