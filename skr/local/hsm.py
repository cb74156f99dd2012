"""The local key service of ``skr local``: a Managed-HSM-compatible subset of the Key Vault data plane.

Owns, on the wire exactly as Azure does it (docs/wire-formats.md §2, §5), so the unmodified
``azure-keyvault-keys`` SDK works against it:

* challenge auth — a request without a bearer token gets ``401`` with
  ``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
  resource="https://managedhsm.azure.net"`` before its body is read; a bearer must be a valid token of the
  local identity service for that resource;
* ``POST /keys/{name}/create``, ``PUT /keys/{name}`` (import), ``GET /keys/{name}[/{version}]``,
  ``PATCH /keys/{name}/{version}`` (release policy / enabled), and the release —
  ``POST /keys/{name}/{version}/release``, ``/keys/{name}//release``, ``/keys/{name}/release``;
* the key store's rules and persistence (:mod:`skr.local.keystore`) and the release
  (:mod:`skr.local.keyrelease`) behind those routes; request parsing and Azure's error bodies here.

Never logs key material or tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.local.identity import InvalidAccessToken, LocalIdentityService
from skr.local.keyrelease import KeyReleaser, parse_enc
from skr.local.keystore import (
    KeyStore,
    KeyVersion,
    bad,
    ci_member,
    generate_material,
    import_material,
    key_ops_of,
    normalize_kty,
    parse_stored_policy,
)
from skr.local.kit import Faults, Handler, Route, ServiceError, azure_error, local_app, mutations_of
from skr.maa.token import TokenVerifier

MANAGED_HSM_RESOURCE = "https://managedhsm.azure.net"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
MAX_BODY = 256 * 1024
_API_VERSION_RE = re.compile(r"^(7\.[3-9](-preview(\.\d+)?)?|20\d\d-\d\d-\d\d(-preview)?)$")


class LocalKeyService(KeyStore):
    """A Managed-HSM-compatible key service (aiohttp app in :attr:`app`) over its key store.

    ``host`` is the name clients use (``host`` or ``host:port``; key ids are ``https://<host>/keys/...``,
    taking the port from the request when the host name matches); ``signing_key``/``chain`` sign release
    JWS (``chain[0]`` must be a certificate for ``host``); ``identity`` checks bearer tokens;
    ``token_verifier`` verifies target tokens through their issuer's OpenID metadata.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str,
        tenant_id: str,
        identity: LocalIdentityService,
        signing_key: rsa.RSAPrivateKey,
        chain: Sequence[x509.Certificate],
        token_verifier: TokenVerifier,
        resource: str = MANAGED_HSM_RESOURCE,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        faults: Faults | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.host = host.strip().lower()
        self.tenant_id = tenant_id
        self.resource = resource.rstrip("/")
        self._authority = f"{authority_host.rstrip('/')}/{tenant_id}"
        self._identity = identity
        self._releaser = KeyReleaser(token_verifier, signing_key, chain)
        super().__init__(state_dir)
        self.challenged: deque[tuple[str, str]] = deque(maxlen=256)
        """(method, path) of the latest requests answered with the 401 challenge (diagnostics, tests)."""
        self.app = local_app(self._routes(), faults=faults, client_max_size=max_body)

    # --- HTTP plumbing ------------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        version = "{version:[^{}/]*}"
        return [
            ("POST", "/keys/{name}/create", "create", self._wrap(self._create)),
            ("POST", f"/keys/{{name}}/{version}/release", "release", self._wrap(self._release)),
            ("POST", "/keys/{name}/release", "release", self._wrap(self._release)),
            ("PUT", "/keys/{name}", "import", self._wrap(self._import)),
            ("GET", "/keys/{name}", "get", self._wrap(self._get)),
            ("GET", f"/keys/{{name}}/{version}", "get", self._wrap(self._get)),
            ("PATCH", f"/keys/{{name}}/{version}", "update", self._wrap(self._update)),
        ]

    def _challenge(self, request: web.Request, message: str) -> web.Response:
        self.challenged.append((request.method, request.path))
        header = f'Bearer authorization="{self._authority}", resource="{self.resource}"'
        return azure_error(401, "Unauthorized", message, headers={"WWW-Authenticate": header})

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """None when the bearer is valid; else the 401 challenge (sent before the body is read)."""
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._challenge(request, "AKV10000: Request is missing a Bearer or PoP token.")
        try:
            self._identity.verify_access_token(token.strip(), self.resource)
        except InvalidAccessToken as exc:
            return self._challenge(request, f"AKV10032: Invalid bearer token: {exc.message}")
        return None

    def _wrap(self, handler: Callable[[web.Request, str], Awaitable[web.StreamResponse]]) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            challenge = self._authenticate(request)
            if challenge is not None:
                return challenge
            api_version = request.query.get("api-version", "")
            if not api_version:
                raise bad("The 'api-version' query parameter is missing.")
            if not _API_VERSION_RE.match(api_version):
                raise bad(f"The specified api-version '{api_version[:32]}' is not supported.")
            return await handler(request, api_version)

        return wrapped

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ServiceError(413, "RequestTooLarge", "The request body is too large.") from None
        try:
            doc = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise bad("The request body is not valid JSON.") from None
        if not isinstance(doc, dict):
            raise bad("The request body must be a JSON object.")
        return doc

    def _base_url(self, request: web.Request | None) -> str:
        configured = self.host.split(":")[0] if not self.host.startswith("[") else self.host
        if request is not None and request.host:
            seen = request.host.lower()
            if seen.split(":")[0] == configured:
                return f"https://{seen}"
        return f"https://{self.host}"

    def _bundle(self, key: KeyVersion, request: web.Request | None) -> dict[str, Any]:
        jwk = key.public_jwk(self._base_url(request))
        bundle: dict[str, Any] = {"key": jwk, "attributes": key.attributes(), "tags": dict(key.tags)}
        if key.release_policy is not None:
            bundle["release_policy"] = key.release_policy.to_wire()
        return bundle

    # --- handlers -----------------------------------------------------------------------------------

    @staticmethod
    def _attributes_in(body: Mapping[str, Any]) -> Mapping[str, Any]:
        attributes = ci_member(body, "attributes") or {}
        if not isinstance(attributes, Mapping):
            raise bad("attributes must be an object.")
        return attributes

    async def _create(self, request: web.Request, api_version: str) -> web.StreamResponse:
        body = await self._json_body(request)
        kty = normalize_kty(ci_member(body, "kty"))
        size, curve = ci_member(body, "key_size"), ci_member(body, "crv")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise bad("key_size must be an integer.")
        if curve is not None and not isinstance(curve, str):
            raise bad("crv must be a string.")
        attributes = self._attributes_in(body)
        policy = parse_stored_policy(ci_member(body, "release_policy"))
        key_ops = key_ops_of(ci_member(body, "key_ops"), kty)
        material = await asyncio.to_thread(generate_material, kty, size=size, curve=curve)
        key = await self._add_version(
            request.match_info["name"],
            kty=kty,
            material=material,
            key_ops=key_ops,
            exportable=bool(ci_member(attributes, "exportable")),
            policy=policy,
            tags=_tags(body),
        )
        return web.json_response(self._bundle(key, request))

    async def _import(self, request: web.Request, api_version: str) -> web.StreamResponse:
        body = await self._json_body(request)
        jwk = ci_member(body, "key")
        if not isinstance(jwk, Mapping):
            raise bad("The request has no 'key' JSON web key.")
        kty = normalize_kty(jwk.get("kty"))
        material = import_material(kty, jwk)
        attributes = self._attributes_in(body)
        key = await self._add_version(
            request.match_info["name"],
            kty=kty,
            material=material,
            key_ops=key_ops_of(jwk.get("key_ops"), kty),
            exportable=bool(ci_member(attributes, "exportable")),
            policy=parse_stored_policy(ci_member(body, "release_policy")),
            tags=_tags(body),
        )
        return web.json_response(self._bundle(key, request))

    async def _get(self, request: web.Request, api_version: str) -> web.StreamResponse:
        key = self._version(*_key_ref(request))
        return web.json_response(self._bundle(key, request))

    async def _update(self, request: web.Request, api_version: str) -> web.StreamResponse:
        body = await self._json_body(request)
        name, version = _key_ref(request)
        self._version(name, version)  # an unknown key is a 404 before any 400 about the body
        policy = parse_stored_policy(ci_member(body, "release_policy"))
        attributes = self._attributes_in(body)
        updated = await self.update_version(
            name,
            version,
            policy=policy,
            exportable=ci_member(attributes, "exportable"),
            enabled=ci_member(attributes, "enabled"),
        )
        return web.json_response(self._bundle(updated, request))

    # --- release ------------------------------------------------------------------------------------

    async def _release(self, request: web.Request, api_version: str) -> web.StreamResponse:
        body = await self._json_body(request)
        name, version = _key_ref(request)
        target = ci_member(body, "target")
        if not isinstance(target, str) or not target.strip():
            raise bad("The 'target' attestation token is missing.")
        enc = parse_enc(ci_member(body, "enc"))
        jws = await self._releaser.release(
            self._version(name, version),
            target.strip(),
            base_url=self._base_url(request),
            api_version=api_version,
            enc=enc,
            requested_version=version,
            mutations=mutations_of(request),
        )
        return web.json_response({"value": jws})

    def __repr__(self) -> str:
        return f"LocalKeyService(host={self.host!r}, keys={len(self._keys)})"


def _key_ref(request: web.Request) -> tuple[str, str | None]:
    """The key name and version (None: the latest) of a ``/keys/{name}[/{version}]`` route."""
    return request.match_info["name"], request.match_info.get("version") or None


def _tags(body: Mapping[str, Any]) -> dict[str, str]:
    tags = ci_member(body, "tags") or {}
    if not isinstance(tags, Mapping) or not all(isinstance(v, str) for v in tags.values()):
        raise bad("tags must be an object of strings.")
    return {str(k): v for k, v in tags.items()}
