"""Verification of MAA attestation tokens (JWTs) through the issuer's OpenID metadata.

Owns the trust path Key Vault itself uses (docs/wire-formats.md §1.6): the *expected* issuer's
``/.well-known/openid-configuration`` → ``jwks_uri`` → the key whose ``kid`` the token names, taken from
``x5c[0]`` (else ``n``/``e``). Keys are cached per issuer; an unknown ``kid`` triggers at most one
refresh (and not more often than ``min_refresh_interval``). Only RSA signatures are accepted (RS256/384/
512, PS256/384/512). ``iss`` must equal the issuer asked for; ``exp``/``nbf`` are checked with a small
leeway against ``at`` (default: now), so recorded tokens can be verified at a pinned time.

Never trusts the token's own ``jku`` or ``iss`` to decide where keys come from, never follows a
``jwks_uri`` to another origin than the issuer's unless the endpoint allowlist (when given) names that
host, and never puts a token into a message or log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from skr.endpoints import Allowlist, Endpoint, split_url
from skr.errors import BadRequest, Code, TokenError, UpstreamError
from skr.maa.client import b64url_decode, normalize_endpoint
from skr.snp.certs import read_certificates
from skr.upstream import (
    DEFAULT_MAX_UPSTREAM_BODY,
    DEFAULT_RETRY,
    Deadline,
    RetryPolicy,
    client_ssl_context,
    request,
    summarize_body,
)

ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
MAX_TOKEN_LENGTH = 64 * 1024
MIN_KEY_BITS = 2048
METADATA_SERVICE = "attestation token issuer (OpenID metadata)"
JWKS_SERVICE = "attestation token issuer (JWKS)"


# --- unverified views ---------------------------------------------------------------------------


def _segments(token: str) -> list[str]:
    if not isinstance(token, str) or not token:
        raise TokenError("the attestation token is empty or not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(
            f"the attestation token is {len(token)} characters long; at most {MAX_TOKEN_LENGTH} are accepted"
        )
    parts = token.strip().split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise TokenError(
            "the attestation token is not a compact JWT (three base64url parts separated by dots)",
            hint="pass the value of the 'token' member MAA returned",
        )
    return parts


def _segment_json(segment: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(b64url_decode(segment, what=what))
    except BadRequest as exc:
        raise TokenError(f"the attestation token's {what} is not base64url") from exc
    except (ValueError, UnicodeDecodeError):
        raise TokenError(f"the attestation token's {what} is not JSON") from None
    if not isinstance(doc, dict):
        raise TokenError(f"the attestation token's {what} must be a JSON object, found {type(doc).__name__}")
    return doc


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, **not verified**. For diagnostics and key selection only."""
    return _segment_json(_segments(token)[0], "header")


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims, **not verified**. Never base a decision on them; use :meth:`TokenVerifier.verify`."""
    return _segment_json(_segments(token)[1], "claims")


def _numeric_claim(claims: Mapping[str, Any], name: str) -> int | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(
            f"the token's {name!r} claim must be a number of seconds, found {type(value).__name__}"
        )
    if not math.isfinite(value):  # JSON decoders accept Infinity/NaN and 1e999
        raise TokenError(f"the token's {name!r} claim must be a finite number of seconds")
    return int(value)


def token_expiry(claims: Mapping[str, Any]) -> datetime:
    """When a token expires (``exp``, UTC); :class:`TokenError` if it has none."""
    exp = _numeric_claim(claims, "exp")
    if exp is None:
        raise TokenError("the attestation token has no 'exp' claim")
    try:
        return datetime.fromtimestamp(exp, tz=UTC)
    except (OverflowError, ValueError, OSError):
        raise TokenError(f"the attestation token's 'exp' claim {exp} is not a representable time") from None


def normalize_issuer(value: str) -> str:
    """An issuer as compared: ``https://host[:port]`` (lower-case host, no trailing slash)."""
    try:
        return normalize_endpoint(value)
    except BadRequest as exc:
        raise TokenError(f"{value!r} is not a usable issuer: {exc.message}") from None


# --- keys --------------------------------------------------------------------------------------


@dataclass
class _IssuerKeys:
    keys: dict[str, rsa.RSAPublicKey]
    skipped: dict[str, str]
    fetched_at: float
    static: bool = False

    def age(self) -> float:
        return time.monotonic() - self.fetched_at


def _uint(value: Any, what: str) -> int:
    data = b64url_decode(value, what=what)
    if not data:
        raise BadRequest(f"{what} is empty")
    return int.from_bytes(data, "big")


def _public_key_of(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    """The RSA key of a JWKS entry: ``x5c[0]``'s certificate key, else ``n``/``e``; ValueError or
    BadRequest (bad base64url) saying why it is unusable."""
    if jwk.get("kty") != "RSA":
        raise ValueError(f"kty is {jwk.get('kty')!r}, not RSA")
    if jwk.get("use") not in (None, "sig"):
        raise ValueError(f"use is {jwk.get('use')!r}, not sig")
    key: rsa.RSAPublicKey
    x5c = jwk.get("x5c")
    if x5c:
        if not isinstance(x5c, list) or not isinstance(x5c[0], str):
            raise ValueError("x5c is not a list of base64 certificates")
        try:
            der = base64.b64decode(x5c[0], validate=True)
            cert_key = read_certificates(der, encoding=Encoding.DER)[0].public_key()
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"x5c[0] is not a DER certificate ({exc})") from None
        if not isinstance(cert_key, rsa.RSAPublicKey):
            raise ValueError("x5c[0] does not hold an RSA key")
        key = cert_key
        if "n" in jwk and "e" in jwk:
            numbers = key.public_numbers()
            if (_uint(jwk["n"], "n"), _uint(jwk["e"], "e")) != (numbers.n, numbers.e):
                raise ValueError("n/e do not match the x5c[0] certificate key")
    elif "n" in jwk and "e" in jwk:
        key = rsa.RSAPublicNumbers(_uint(jwk["e"], "e"), _uint(jwk["n"], "n")).public_key()
    else:
        raise ValueError("neither x5c nor n/e present")
    if key.key_size < MIN_KEY_BITS:
        raise ValueError(f"RSA key of {key.key_size} bits is too short")
    return key


def parse_jwks(jwks: Mapping[str, Any]) -> tuple[dict[str, rsa.RSAPublicKey], dict[str, str]]:
    """``(usable keys by kid, reasons for skipped kids)`` of a JWKS document."""
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(entries, list):
        raise TokenError("the issuer's JWKS has no 'keys' list", hint="check the issuer's jwks_uri")
    keys: dict[str, rsa.RSAPublicKey] = {}
    skipped: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("kid"), str):
            continue
        try:
            keys[entry["kid"]] = _public_key_of(entry)
        except (ValueError, BadRequest) as exc:
            skipped[entry["kid"]] = exc.message if isinstance(exc, BadRequest) else str(exc)
    return keys, skipped


def _default_metadata_url(issuer: str) -> str:
    return f"{issuer}/.well-known/openid-configuration"


# --- the verifier -----------------------------------------------------------------------------


class TokenVerifier:
    """Verifies MAA JWTs against the keys their expected issuer publishes.

    ``metadata_url_for`` maps a normalized issuer to its OpenID metadata URL (default
    ``{issuer}/.well-known/openid-configuration``); override it to check recorded tokens against a
    locally served key set. ``add_jwks`` pins a key set for an issuer without any network access.
    ``max_body`` caps every answer read; ``allowlist`` may name hosts other than the issuer's that the
    metadata's ``jwks_uri`` may point at (without one, only the issuer's own origin is accepted).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        ssl_context: ssl.SSLContext | None = None,
        leeway: int = 60,
        timeout: float = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        cache_ttl: float = 3600.0,
        min_refresh_interval: float = 30.0,
        metadata_url_for: Callable[[str], str] | None = None,
        max_body: int = DEFAULT_MAX_UPSTREAM_BODY,
        allowlist: Allowlist | None = None,
    ) -> None:
        self._session = session
        self._ssl_context = ssl_context if ssl_context is not None else client_ssl_context()
        self.leeway = leeway
        self.timeout = timeout
        self.retry = retry
        self.cache_ttl = cache_ttl
        self.min_refresh_interval = min_refresh_interval
        self._metadata_url_for = metadata_url_for or _default_metadata_url
        self.max_body = max_body
        self._allowlist = allowlist
        self._cache: dict[str, _IssuerKeys] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0
        """How many key sets were fetched from the network (for diagnostics and tests)."""

    def add_jwks(self, issuer: str, jwks: Mapping[str, Any]) -> None:
        """Pin ``jwks`` as the key set of ``issuer``; pinned sets are never refetched."""
        keys, skipped = parse_jwks(jwks)
        self._cache[normalize_issuer(issuer)] = _IssuerKeys(keys, skipped, time.monotonic(), static=True)

    async def verify(
        self, token: str, *, issuer: str, at: datetime | None = None, deadline: Deadline | None = None
    ) -> dict[str, Any]:
        """The verified claims of ``token`` issued by ``issuer`` (host or https URL), checked at ``at``.

        Raises :class:`TokenError` for anything wrong with the token (format, algorithm, unknown key,
        signature, issuer, lifetime) and :class:`skr.errors.UpstreamError` /
        :class:`skr.errors.UpstreamTimeout` when the issuer's keys cannot be fetched.
        """
        expected = normalize_issuer(issuer)
        token = token.strip() if isinstance(token, str) else token
        header = unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise TokenError(
                f"the attestation token uses algorithm {alg!r};"
                f" expected one of {', '.join(sorted(ALLOWED_ALGORITHMS))}",
                hint="MAA signs with RS256; anything else is not an MAA token",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("the attestation token's header names no 'kid'")
        claimed = unverified_claims(token).get("iss")
        if not isinstance(claimed, str) or _loose_issuer(claimed) != expected:
            raise TokenError(
                f"the attestation token was issued by {claimed!r}, expected {expected!r}",
                hint="the token comes from a different attestation instance than the one asked for",
            )
        key = await self._key(expected, kid, deadline)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": [],
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenError(
                f"the attestation token's signature does not verify with key {kid!r} of {expected}",
                hint="the token was altered or re-signed",
            ) from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"the attestation token could not be verified: {exc}") from None
        self._check_lifetime(claims, at)
        return claims

    def _check_lifetime(self, claims: Mapping[str, Any], at: datetime | None) -> None:
        when = at if at is not None else datetime.now(tz=UTC)
        now = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()
        exp = _numeric_claim(claims, "exp")
        nbf = _numeric_claim(claims, "nbf")
        _numeric_claim(claims, "iat")
        if exp is None:
            raise TokenError("the attestation token has no 'exp' claim")
        if now > exp + self.leeway:
            raise TokenError(
                f"the attestation token expired at {_iso(exp)} (checked at {_iso(now)})",
                hint="get a fresh token; MAA tokens live 8 hours",
                code=Code.TOKEN_EXPIRED,
            )
        if nbf is not None and now < nbf - self.leeway:
            raise TokenError(
                f"the attestation token is not valid before {_iso(nbf)} (checked at {_iso(now)})",
                hint="check the clocks of this host and the attestation service",
                code=Code.TOKEN_NOT_YET_VALID,
            )

    async def _key(self, issuer: str, kid: str, deadline: Deadline | None) -> rsa.RSAPublicKey:
        entry = self._cache.get(issuer)
        fetched_now = False
        if entry is None or (not entry.static and entry.age() > self.cache_ttl):
            entry = await self._refresh(issuer, seen=entry, deadline=deadline)
            fetched_now = True
        stale_enough = entry.age() >= self.min_refresh_interval
        if kid not in entry.keys and not entry.static and not fetched_now and stale_enough:
            entry = await self._refresh(issuer, seen=entry, deadline=deadline)
        if kid in entry.keys:
            return entry.keys[kid]
        if kid in entry.skipped:
            raise TokenError(
                f"the issuer {issuer} publishes key {kid!r} in a form that cannot be used:"
                f" {entry.skipped[kid]}"
            )
        raise TokenError(
            f"the attestation token names signing key {kid!r}, which {issuer} does not publish",
            hint="the token was not issued by this attestation instance, or its key was rotated out",
        )

    async def _refresh(
        self, issuer: str, *, seen: _IssuerKeys | None, deadline: Deadline | None
    ) -> _IssuerKeys:
        lock = self._locks.setdefault(issuer, asyncio.Lock())
        async with lock:
            current = self._cache.get(issuer)
            if current is not None and current is not seen:
                return current  # another task refreshed while we waited
            fresh = await self._fetch(issuer, deadline)
            self._cache[issuer] = fresh
            return fresh

    async def _get_json(self, url: str, service: str, deadline: Deadline | None) -> Any:
        result = await request(
            self._session,
            "GET",
            url,
            service=service,
            headers={"Accept": "application/json"},
            ssl_context=self._ssl_context,
            timeout=self.timeout,
            deadline=deadline,
            retry=self.retry,
            max_body=self.max_body,
        )
        if result.status != 200:
            code = summarize_body(result.body)
            raise UpstreamError(
                f"{service} at {url} answered HTTP {result.status}" + (f": {code}" if code else ""),
                hint="check the attestation endpoint",
                upstream_status=result.status,
            )
        try:
            return result.json()
        except UpstreamError:
            raise TokenError(f"{service} at {url} did not answer JSON") from None

    def _check_jwks_origin(self, jwks_uri: str, *, issuer: str, metadata_url: str) -> None:
        """The metadata may not send skr elsewhere: ``jwks_uri`` is on the issuer's origin, or on a host
        the allowlist names; checked before any connection to it."""
        # the metadata URL is skr's choice (the issuer's, unless overridden for recorded tokens)
        jwks = _endpoint_of(jwks_uri)
        if jwks is not None and (
            jwks.url == issuer
            or jwks == _endpoint_of(metadata_url)
            or (self._allowlist is not None and self._allowlist.allows(jwks))
        ):
            return
        raise TokenError(
            f"the OpenID metadata at {metadata_url} points jwks_uri at {urlsplit(jwks_uri).netloc[:100]!r}, "
            f"not at the issuer {issuer}; no request was sent to it",
            hint="the attestation endpoint's metadata names a key set on another host; check the endpoint",
        )

    async def _fetch(self, issuer: str, deadline: Deadline | None) -> _IssuerKeys:
        metadata_url = self._metadata_url_for(issuer)
        metadata = await self._get_json(metadata_url, METADATA_SERVICE, deadline)
        if not isinstance(metadata, Mapping):
            raise TokenError(f"the OpenID metadata at {metadata_url} is not a JSON object")
        named = metadata.get("issuer")
        if named is not None and (not isinstance(named, str) or _loose_issuer(named) != issuer):
            raise TokenError(
                f"the OpenID metadata at {metadata_url} names issuer {named!r}, expected {issuer!r}"
            )
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or _endpoint_of(jwks_uri) is None:
            raise TokenError(
                f"the OpenID metadata at {metadata_url} has no https 'jwks_uri' (found {jwks_uri!r})",
                hint="check that the endpoint is an attestation instance",
            )
        self._check_jwks_origin(jwks_uri, issuer=issuer, metadata_url=metadata_url)
        jwks = await self._get_json(jwks_uri, JWKS_SERVICE, deadline)
        keys, skipped = parse_jwks(jwks)
        self.fetches += 1
        return _IssuerKeys(keys, skipped, time.monotonic())


def _endpoint_of(url: str) -> Endpoint | None:
    try:
        return split_url(url)[0]
    except (BadRequest, ValueError):
        return None


def _loose_issuer(value: str) -> str | None:
    try:
        return normalize_endpoint(value)
    except BadRequest:
        return None


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):  # a hostile exp/nbf far outside datetime's range
        return f"{seconds:.0f} s after the epoch"
