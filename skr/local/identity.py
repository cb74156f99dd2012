"""The local managed-identity token endpoint of ``skr local``.

Owns two wire protocols that the real ``azure.identity.aio.ManagedIdentityCredential`` speaks
(docs/wire-formats.md §6), so the unmodified SDK gets tokens from it:

* IMDS — ``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=…[&client_id=…]`` with the
  header ``Metadata: true`` (reached through ``AZURE_POD_IDENTITY_AUTHORITY_HOST``);
* App Service — ``GET /msi/token?api-version=2019-08-01&resource=…`` with ``X-IDENTITY-HEADER: <secret>``
  (reached through ``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``).

It issues RS256 JWT access tokens (``aud`` = resource, ``iss``, ``tid``, ``oid``, one hour) and verifies
them for the local key service (:meth:`LocalIdentityService.verify_access_token`).

It never logs or echoes a token except in the body of the token response itself, and refuses what IMDS
refuses (missing ``Metadata`` header, proxied requests, missing parameters).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.errors import Code, ConfigError, Unauthenticated
from skr.files import ensure_directory, load_or_create_rsa_key, read_regular_file, write_private_file
from skr.local.kit import Faults, Route, local_app

IMDS_TOKEN_PATH = "/metadata/identity/oauth2/token"  # noqa: S105 - a URL path, not a secret
APP_SERVICE_TOKEN_PATH = "/msi/token"  # noqa: S105 - a URL path, not a secret
APP_SERVICE_API_VERSION = "2019-08-01"
IMDS_MIN_API_VERSION = "2018-02-01"
TOKEN_LIFETIME = 3600
DEFAULT_LEEWAY = 60
SIGNING_KEY_FILE = "identity-signing-key.pem"
IDENTITY_HEADER_FILE = "identity-header"
_API_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_OID_NAMESPACE = uuid.UUID("5f0c2d4e-8a4b-4c53-9d0e-7a3b4f6c1e21")


class InvalidAccessToken(Unauthenticated):
    """A bearer token that the local identity service did not issue for the resource asked."""

    default_code = Code.ACCESS_TOKEN_INVALID


def key_thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """A stable key id: the first 32 hex digits of SHA-256 over the SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:32]


def _normalize_resource(resource: str) -> str:
    return resource.strip().rstrip("/")


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _app_service_error(status: int, message: str) -> web.Response:
    return web.json_response({"statusCode": status, "message": message}, status=status)


class LocalIdentityService:
    """IMDS- and App-Service-compatible token endpoint issuing RS256 access tokens.

    ``issuer`` is the ``iss`` of issued tokens (Entra form: ``https://sts.windows.net/<tenant>/``);
    ``identity_header`` is the App Service secret; ``client_id`` is the system-assigned identity's client id
    (a user-assigned ``client_id`` in the request is honoured as is).
    """

    def __init__(
        self,
        signing_key: rsa.RSAPrivateKey,
        *,
        issuer: str,
        tenant_id: str,
        identity_header: str,
        client_id: str | None = None,
        token_lifetime: int = TOKEN_LIFETIME,
        faults: Faults | None = None,
    ) -> None:
        if not identity_header:
            raise ConfigError("the local identity service needs a non-empty identity header secret")
        self._key = signing_key
        self._public_key = signing_key.public_key()
        self._kid = key_thumbprint(self._public_key)
        self.issuer = issuer
        self.tenant_id = tenant_id
        self._identity_header = identity_header
        self.client_id = client_id or str(uuid.uuid5(_OID_NAMESPACE, f"system:{tenant_id}"))
        self._lifetime = token_lifetime
        self.issued = 0
        routes: list[Route] = [
            ("GET", IMDS_TOKEN_PATH, "imds", self._imds_token),
            ("GET", APP_SERVICE_TOKEN_PATH, "app_service", self._app_service_token),
        ]
        self.app = local_app(routes, faults=faults, client_max_size=16 * 1024)

    @classmethod
    def create(
        cls,
        state_dir: Path,
        *,
        tenant_id: str,
        issuer: str | None = None,
        identity_header: str | None = None,
        client_id: str | None = None,
        faults: Faults | None = None,
    ) -> LocalIdentityService:
        """Load or create the signing key (and the App Service secret) in ``state_dir`` (files 0600).

        Synchronous (RSA key generation on first start); call through ``asyncio.to_thread`` from async code.
        """
        ensure_directory(state_dir)
        key = load_or_create_rsa_key(state_dir / SIGNING_KEY_FILE)
        if identity_header is None:
            header_path = state_dir / IDENTITY_HEADER_FILE
            if os.path.lexists(header_path):
                identity_header = read_regular_file(header_path).decode().strip()
            if not identity_header:
                identity_header = secrets.token_urlsafe(32)
                write_private_file(header_path, identity_header.encode())
        return cls(
            key,
            issuer=issuer or f"https://sts.windows.net/{tenant_id}/",
            tenant_id=tenant_id,
            identity_header=identity_header,
            client_id=client_id,
            faults=faults,
        )

    @property
    def identity_header(self) -> str:
        """The App Service secret clients must send as ``X-IDENTITY-HEADER``."""
        return self._identity_header

    # --- tokens ---------------------------------------------------------------------------------------

    def issue_token(
        self, resource: str, *, client_id: str | None = None, now: int | None = None
    ) -> dict[str, Any]:
        """Sign an access token for ``resource``; returns its claims plus ``access_token``."""
        issued_at = int(now if now is not None else time.time())
        app_id = client_id or self.client_id
        oid = str(uuid.uuid5(_OID_NAMESPACE, f"{self.tenant_id}:{app_id}"))
        claims: dict[str, Any] = {
            "aud": resource,
            "iss": self.issuer,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + self._lifetime,
            "tid": self.tenant_id,
            "oid": oid,
            "sub": oid,
            "appid": app_id,
            "idtyp": "app",
            "ver": "1.0",
            "uti": secrets.token_urlsafe(16),
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self._kid, "typ": "JWT"})
        self.issued += 1
        return {**claims, "access_token": token}

    def verify_access_token(
        self, token: str, resource: str, *, leeway: int = DEFAULT_LEEWAY
    ) -> dict[str, Any]:
        """Check an access token's signature, issuer, audience (``resource``, trailing slash tolerated) and
        lifetime. Returns the claims; raises :class:`InvalidAccessToken` saying what failed."""
        wanted = _normalize_resource(resource)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public_key,
                algorithms=["RS256"],
                issuer=self.issuer,
                leeway=leeway,
                options={"require": ["exp", "iat", "nbf", "aud", "iss"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidAccessToken(
                "the bearer token has expired", hint="get a fresh token from the identity endpoint"
            ) from None
        except jwt.InvalidIssuerError:
            raise InvalidAccessToken(
                f"the bearer token was not issued by {self.issuer}",
                hint="get the token from this stack's identity endpoint",
            ) from None
        except jwt.PyJWTError as exc:
            raise InvalidAccessToken(
                f"the bearer token is not valid: {type(exc).__name__}",
                hint="get the token from this stack's identity endpoint",
            ) from None
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if wanted not in {_normalize_resource(str(a)) for a in audiences}:
            raise InvalidAccessToken(
                f"the bearer token is for audience {aud!r}, expected {wanted!r}",
                hint=f"request the token for scope {wanted}/.default",
            )
        return claims

    # --- HTTP -----------------------------------------------------------------------------------------

    async def _imds_token(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Metadata", "").strip().lower() != "true":
            return _error(400, "invalid_request", "Required metadata header not specified")
        if "X-Forwarded-For" in request.headers:
            return _error(400, "invalid_request", "Request cannot contain X-Forwarded-For header")
        problem = self._check_query(request.query, minimum_api_version=IMDS_MIN_API_VERSION)
        if problem:
            return _error(400, "invalid_request", problem)
        issued = self.issue_token(request.query["resource"], client_id=request.query.get("client_id") or None)
        lifetime = str(issued["exp"] - issued["iat"])
        return _token_response(
            issued, expires_in=lifetime, ext_expires_in=lifetime, not_before=str(issued["nbf"])
        )

    async def _app_service_token(self, request: web.Request) -> web.StreamResponse:
        presented = request.headers.get("X-IDENTITY-HEADER", "")
        if not hmac.compare_digest(presented.encode(), self._identity_header.encode()):
            return _app_service_error(401, "Unauthorized: the X-IDENTITY-HEADER header is missing or wrong")
        if request.query.get("api-version") != APP_SERVICE_API_VERSION:
            return _app_service_error(400, f"api-version must be {APP_SERVICE_API_VERSION}")
        problem = self._check_query(request.query, minimum_api_version=APP_SERVICE_API_VERSION)
        if problem:
            return _app_service_error(400, problem)
        issued = self.issue_token(request.query["resource"], client_id=request.query.get("client_id") or None)
        return _token_response(issued)

    @staticmethod
    def _check_query(query: Mapping[str, str], *, minimum_api_version: str) -> str | None:
        api_version = query.get("api-version", "")
        if not api_version:
            return "Required query variable 'api-version' is missing"
        if not _API_VERSION_RE.match(api_version) or api_version[:10] < minimum_api_version:
            return f"Bad request. api-version '{api_version}' is not supported"
        resource = query.get("resource", "").strip()
        if not resource:
            return "Required audience parameter not specified"
        if any(c in resource for c in ", \t\r\n"):
            return f"Invalid resource {resource[:100]!r}"
        return None

    def __repr__(self) -> str:
        return f"LocalIdentityService(issuer={self.issuer!r}, tenant_id={self.tenant_id!r})"


def _token_response(issued: Mapping[str, Any], **extra: str) -> web.Response:
    """The token answer both protocols share (members sorted by name), plus ``extra`` members."""
    body = {
        "access_token": issued["access_token"],
        "client_id": issued["appid"],
        "expires_on": str(issued["exp"]),
        "resource": issued["aud"],
        "token_type": "Bearer",
        **extra,
    }
    return web.Response(
        text=json.dumps(body, sort_keys=True),
        content_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )
