"""The local attestation service: an MAA-compatible ``AttestSevSnpVm`` endpoint for local mode.

Owns an aiohttp application that speaks MAA's wire format (docs/wire-formats.md §1):

* ``POST /attest/SevSnpVm`` and ``/attest/SevSnpVM`` with ``api-version`` 2020-10-01, 2022-08-01 or
  2025-06-01 — anything else is a 400 in MAA's error shape ``{"error": {"code", "message"}}``;
* ``GET /.well-known/openid-configuration`` and ``GET /certs`` (the JWKS with ``x5c``), so verifiers
  (Key Vault, the local key service, :class:`skr.maa.token.TokenVerifier`) use the real trust path.

It verifies the evidence and assembles the claims as MAA does (:mod:`skr.local.claims`), then signs an
RS256 JWT valid 8 hours with its persisted key.

Issuer: the ``issuer`` given (or assigned later through the ``issuer`` property once the server has
bound its port); when none is set, each request's issuer is ``https://`` + its ``Host`` header. The
``x5c`` certificate is self-signed with CN = issuer (minted for the current issuer when it changes);
the ``kid`` derives from the signing key, so it is stable across restarts and ports.

Every response carries ``Server-Timing: app;dur=<ms>`` (time spent inside the service). An optional
fault hook (:class:`skr.local.kit.Faults`) can answer in place of a route (``attest``, both path casings;
``openid-configuration``; ``certs``), for resilience tests and demos, or corrupt an issued token:
``wrong_issuer`` (another ``iss``), ``resign_jws`` (a stranger's key, same ``kid``), ``truncate_jws``,
``expired_cert`` (a token that expired an hour ago).

Never issues a token for evidence that failed a check, and never logs tokens or request bodies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict, Unpack

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from skr.errors import BadRequest
from skr.files import ensure_directory, load_or_create_rsa_key, read_regular_file, write_private_file
from skr.local.claims import (
    CLAIMS_SUPPORTED,
    TOKEN_LIFETIME,
    AttestationRefused,
    AttestRequest,
    attested_claims,
    parse_attest_request,
    policy_hash,
)
from skr.local.kit import Faults, Handler, Route, azure_error, local_app, mutations_of
from skr.maa.client import normalize_endpoint
from skr.maa.runtime import rsa_public_members

log = logging.getLogger(__name__)

SUPPORTED_API_VERSIONS = ("2020-10-01", "2022-08-01", "2025-06-01")
MAX_BODY = 1024 * 1024
SIGNING_KEY_FILE = "attestation-signing-key.pem"
SIGNING_CERT_FILE = "attestation-signing-cert.pem"

DEFAULT_POLICY = """version= 1.0;
authorizationrules
{
    => permit();
};
issuancerules
{
};
"""
"""The policy text the local service evaluates: permit everything that passed verification."""

WRONG_ISSUER = "https://wrong-issuer.invalid"

ROUTE_ATTEST = "attest"
ROUTE_OPENID = "openid-configuration"
ROUTE_CERTS = "certs"


# --- signing key and certificates ---------------------------------------------------------------


def signing_kid(public_key: rsa.RSAPublicKey) -> str:
    """The JWKS ``kid`` of the signing key: standard base64 of its RFC 7638 SHA-256 thumbprint.

    MAA's kids look the same (44 base64 characters); relying parties treat them as opaque.
    """
    canonical = json.dumps(rsa_public_members(public_key), sort_keys=True, separators=(",", ":"))
    return base64.b64encode(hashlib.sha256(canonical.encode("ascii")).digest()).decode("ascii")


def self_signed_certificate(
    private_key: rsa.RSAPrivateKey, issuer: str, *, now: datetime | None = None
) -> x509.Certificate:
    """A self-signed certificate CN=``issuer`` for ``x5c`` (MAA publishes the same kind)."""
    start = (now or datetime.now(tz=UTC)) - timedelta(days=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[:64])])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


# --- the service --------------------------------------------------------------------------------


class AttestationOptions(TypedDict, total=False):
    """What a :class:`LocalAttestationService` trusts and how it runs, beside its key and issuer.

    ``uvm_signing_roots``: the roots a UVM endorsement's ``x5chain`` must lead to (local mode: the local
    CA, whose UVM signing leaf signs the virtual TEE's endorsement); none = nothing is compliant.
    """

    trusted_arks: Sequence[x509.Certificate]
    uvm_signing_roots: Sequence[x509.Certificate]
    faults: Faults | None
    policy_text: str
    clock: Callable[[], float]


class LocalAttestationService:
    """An MAA-compatible attestation service for SEV-SNP evidence (see module docstring)."""

    def __init__(
        self,
        signing_key: rsa.RSAPrivateKey,
        certificate: x509.Certificate,
        *,
        issuer: str | None = None,
        trusted_arks: Sequence[x509.Certificate] = (),
        uvm_signing_roots: Sequence[x509.Certificate] = (),
        faults: Faults | None = None,
        policy_text: str = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(signing_key, rsa.RSAPrivateKey) or signing_key.key_size < 2048:
            raise BadRequest("the attestation signing key must be an RSA key of at least 2048 bits")
        if certificate.public_key() != signing_key.public_key():
            raise BadRequest("the attestation certificate does not belong to the signing key")
        self._signing_key = signing_key
        self._certificates: dict[str, x509.Certificate] = {}
        cn = _common_name(certificate)
        if cn is not None:
            self._certificates[cn] = certificate
        self._issuer: str | None = None
        self.issuer = issuer
        self._trusted_arks = tuple(trusted_arks)
        self._uvm_signing_roots = tuple(uvm_signing_roots)
        self._policy_hash = policy_hash(policy_text)
        self._clock = clock
        self._kid = signing_kid(signing_key.public_key())
        routes: list[Route] = [
            ("POST", "/attest/SevSnpVm", ROUTE_ATTEST, self._attest),
            ("POST", "/attest/SevSnpVM", ROUTE_ATTEST, self._attest),
            ("GET", "/.well-known/openid-configuration", ROUTE_OPENID, self._openid),
            ("GET", "/certs", ROUTE_CERTS, self._certs),
        ]
        self.app = local_app(routes, faults=faults, client_max_size=MAX_BODY, middlewares=[_maa_errors])

    # -- construction helpers --

    @classmethod
    async def create(
        cls, state_dir: Path, *, issuer: str | None = None, **options: Unpack[AttestationOptions]
    ) -> LocalAttestationService:
        """Load the signing key and certificate from ``state_dir`` (files mode 0600), creating them once.

        The RSA-2048 key survives restarts, so tokens and the ``kid`` stay verifiable across them.
        """
        key, cert = await asyncio.to_thread(_load_or_create_signing_material, Path(state_dir), issuer)
        return cls(key, cert, issuer=issuer, **options)

    def __repr__(self) -> str:
        return f"LocalAttestationService(issuer={self._issuer!r}, kid={self._kid!r})"

    # -- properties --

    @property
    def issuer(self) -> str | None:
        """The ``iss`` of issued tokens (``https://host:port``); ``None`` = taken from each request's Host."""
        return self._issuer

    @issuer.setter
    def issuer(self, value: str | None) -> None:
        self._issuer = normalize_endpoint(value) if value is not None else None

    @property
    def kid(self) -> str:
        """The ``kid`` of the signing key in headers and ``/certs``."""
        return self._kid

    # -- handlers --
    def _issuer_for(self, request: web.Request) -> str:
        if self._issuer is not None:
            return self._issuer
        try:
            return normalize_endpoint(request.host)
        except BadRequest:
            raise AttestationRefused(
                "InvalidParameter", f"the Host header {request.host!r} is not a host"
            ) from None

    async def _attest(self, request: web.Request) -> web.Response:
        api_version = request.query.get("api-version")
        if api_version not in SUPPORTED_API_VERSIONS:
            raise AttestationRefused(
                "InvalidApiVersion",
                f"api-version {api_version!r} is not supported;"
                f" expected one of {', '.join(SUPPORTED_API_VERSIONS)}",
            )
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise AttestationRefused("InvalidParameter", "the request body is not JSON") from None
        parsed = parse_attest_request(body)
        issuer = self._issuer_for(request)
        token = await asyncio.to_thread(self._issue, parsed, issuer, mutations_of(request))
        return web.json_response({"token": token})

    async def _openid(self, request: web.Request) -> web.Response:
        issuer = self._issuer_for(request)
        return web.json_response(
            {
                "issuer": issuer,
                "jwks_uri": f"{issuer}/certs",
                "response_types_supported": ["token", "none"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "revocation_endpoint": f"{issuer}/revoke",
                "claims_supported": list(CLAIMS_SUPPORTED),
            }
        )

    async def _certs(self, request: web.Request) -> web.Response:
        issuer = self._issuer_for(request)
        cert = self._certificate_for(issuer)
        jwk: dict[str, Any] = {
            "alg": "RS256",
            "kid": self._kid,
            **rsa_public_members(self._signing_key.public_key()),
            "use": "sig",
            "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")],
        }
        return web.json_response({"keys": [jwk]})

    def _certificate_for(self, issuer: str) -> x509.Certificate:
        if issuer[:64] not in self._certificates:
            self._certificates[issuer[:64]] = self_signed_certificate(self._signing_key, issuer)
        return self._certificates[issuer[:64]]

    # -- verification and issuance (runs in a worker thread) --

    def _issue(self, request: AttestRequest, issuer: str, mutations: frozenset[str] = frozenset()) -> str:
        now = self._clock()
        claims = attested_claims(
            request,
            issuer=issuer,
            now=now,
            issued_at=int(now) - (TOKEN_LIFETIME + 3600 if "expired_cert" in mutations else 0),
            trusted_arks=self._trusted_arks,
            uvm_signing_roots=self._uvm_signing_roots,
            policy_hash=self._policy_hash,
        )
        if "wrong_issuer" in mutations:
            claims["iss"] = WRONG_ISSUER
        key = self._signing_key
        if "resign_jws" in mutations:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        headers = {"jku": f"{issuer}/certs", "kid": self._kid, "typ": "JWT"}
        token = jwt.encode(claims, key, algorithm="RS256", headers=headers)
        return token[:-16] if "truncate_jws" in mutations else token


# --- responses ----------------------------------------------------------------------------------


@web.middleware
async def _maa_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413) and failures in MAA's error shape (plus ``x-ms-error-code``)."""
    try:
        return await handler(request)
    except AttestationRefused as exc:
        return azure_error(400, exc.code, exc.message, code_header=True)
    except web.HTTPException as exc:
        code, message = exc.reason.replace(" ", ""), f"{request.method} {request.path}: {exc.reason}"
        return azure_error(exc.status, code, message, code_header=True)
    except Exception:
        log.exception("local attestation service failed on %s %s", request.method, request.path)
        return azure_error(
            500, "InternalError", "the local attestation service failed; see its log", code_header=True
        )


# --- signing material on disk -------------------------------------------------------------------


def _load_or_create_signing_material(
    state_dir: Path, issuer: str | None
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    ensure_directory(state_dir)
    key_path, cert_path = state_dir / SIGNING_KEY_FILE, state_dir / SIGNING_CERT_FILE
    subject = normalize_endpoint(issuer) if issuer else "skr local attestation"
    key = load_or_create_rsa_key(key_path)
    cert: x509.Certificate | None = None
    if os.path.lexists(cert_path):
        cert = x509.load_pem_x509_certificate(read_regular_file(cert_path))
        if cert.public_key() != key.public_key() or (issuer and _common_name(cert) != subject[:64]):
            cert = None
    if cert is None:
        cert = self_signed_certificate(key, subject)
        write_private_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert
