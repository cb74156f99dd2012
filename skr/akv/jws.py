"""The release JWS of Key Vault / Managed HSM: verification, signing (local key service), opening.

Owns: compact JWS parsing (three unpadded base64url parts, nothing else tolerated); verification — ``alg``
allowlist (RS256/384/512, PS256/384/512), the ``x5c`` chain validated for the vault host at the validation
time by the :class:`~skr.akv.trust.TrustStore` (system roots plus PEM bundles, ``SKR_CA_BUNDLE``; its
own module), the signature with the leaf key, and ``x5t`` / ``x5t#S256`` when present; signing of
release payloads in the Managed HSM header style; and :func:`open_release`, which verifies a release,
checks that the released key (``response.key.key.kid``) is the requested one, and turns its ``key_hsm``
into a JWK with the caller's wrapping key.

Never trusts a key the header carries by itself (``jwk``, ``jku``, ``x5u`` are ignored), never fetches
anything, and never puts key material or the JWS into a message or repr.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import Subject, VerificationError
from jwt.algorithms import RSAAlgorithm, RSAPSSAlgorithm

from skr import b64
from skr.akv.jwk import jose_kty, jwk_to_json, plaintext_to_jwk
from skr.akv.keywrap import Enc, b64url_decode, parse_key_hsm, select_enc, unwrap
from skr.akv.trust import TRUST_HINT, TrustStore
from skr.b64 import b64url_encode
from skr.endpoints import Endpoint, split_url
from skr.errors import BadRequest, ConfigError, JwsError, KeyWrapError
from skr.snp.certs import read_certificates

__all__ = [
    "ALLOWED_ALGORITHMS",
    "ReleasedKey",
    "TrustStore",
    "key_version",
    "open_release",
    "sign_release_jws",
    "verify_release_jws",
]

#: The only signature algorithms a release JWS may use.
ALLOWED_ALGORITHMS: Mapping[str, RSAAlgorithm] = {
    "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
    "RS384": RSAAlgorithm(RSAAlgorithm.SHA384),
    "RS512": RSAAlgorithm(RSAAlgorithm.SHA512),
    "PS256": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256),
    "PS384": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA384),
    "PS512": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA512),
}

_MIN_SIGNER_BITS = 2048
_MAX_X5C = 10
_MAX_COMPACT_CHARS = 1 << 20


# --- compact JWS ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Compact:
    header: dict[str, Any]
    payload: bytes = field(repr=False)
    signing_input: bytes = field(repr=False)
    signature: bytes = field(repr=False)


def _part(value: str, name: str) -> bytes:
    if not value and name == "signature":
        return b""  # refused after the alg check, which gives the better message for alg "none"
    try:
        if value:
            return b64.b64url_decode(value, padding=False)
    except ValueError:
        pass
    raise JwsError(
        f"the release JWS {name} is not unpadded base64url",
        hint="a compact JWS is three base64url parts without '=' padding, joined by '.'",
    )


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JwsError(f"the release JWS {name} is not JSON") from None
    if not isinstance(value, dict):
        raise JwsError(f"the release JWS {name} is a JSON {type(value).__name__}; expected an object")
    return value


def _split(compact: str) -> _Compact:
    if not isinstance(compact, str) or len(compact) > _MAX_COMPACT_CHARS:
        raise JwsError("the release JWS is not a string of reasonable size")
    parts = compact.strip().split(".")
    if len(parts) != 3:
        raise JwsError(
            f"the release JWS has {len(parts)} parts; expected 3 (header.payload.signature)",
            hint="Key Vault returns a compact JWS in the 'value' field of the release response",
        )
    header_b64, payload_b64, signature_b64 = parts
    header = _json_object(_part(header_b64, "header"), "header")
    payload = _part(payload_b64, "payload")
    signature = _part(signature_b64, "signature")
    return _Compact(header, payload, f"{header_b64}.{payload_b64}".encode("ascii"), signature)


def _algorithm(header: Mapping[str, Any]) -> RSAAlgorithm:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        shown = alg[:16] if isinstance(alg, str) else type(alg).__name__
        raise JwsError(
            f"the release JWS uses alg {shown!r}; expected one of {', '.join(ALLOWED_ALGORITHMS)}",
            hint="Key Vault signs releases with RS256; anything else is refused",
        )
    if "crit" in header:
        raise JwsError("the release JWS header has a 'crit' member; no critical extension is supported")
    return ALLOWED_ALGORITHMS[alg]


def _certificates(header: Mapping[str, Any]) -> list[x509.Certificate]:
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c:
        raise JwsError(
            "the release JWS header has no x5c certificate chain",
            hint="Key Vault and Managed HSM always include the signer chain",
        )
    if len(x5c) > _MAX_X5C:
        raise JwsError(f"the release JWS x5c has {len(x5c)} certificates; at most {_MAX_X5C} are accepted")
    certs = []
    for index, value in enumerate(x5c):
        try:
            if not isinstance(value, str):
                raise ValueError
            certs.append(_x5c_certificate(value))
        except (ValueError, binascii.Error):
            raise JwsError(
                f"x5c[{index}] of the release JWS is not a base64 DER certificate",
                hint="x5c holds standard (not URL-safe) base64 of DER certificates",
            ) from None
    return certs


@functools.lru_cache(maxsize=32)  # a vault signs every release with the same chain: parse it once
def _x5c_certificate(value: str) -> x509.Certificate:
    (cert,) = read_certificates(base64.b64decode(value, validate=True), encoding=Encoding.DER)
    return cert


def _subject(host: Endpoint) -> Subject:
    """The name the signer certificate must carry: the vault's IP address or DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.host))
    except ValueError:
        return x509.DNSName(host.host)


def _verify_chain(certs: list[x509.Certificate], host: Endpoint, trust: TrustStore, at: datetime) -> None:
    """Path validation of ``certs`` to the trust store for ``host`` at ``at``; JwsError saying why not."""
    try:
        trust.verify_server_chain(certs, _subject(host), at)
    except VerificationError as exc:
        detail = str(exc).split(" (encountered", 1)[0]
        raise JwsError(
            f"the release JWS signer certificate {certs[0].subject.rfc4514_string()[:120]!r} is not "
            f"trusted for host {host.host!r} at {at.isoformat(timespec='seconds')}: {detail}",
            hint=TRUST_HINT,
        ) from None


@functools.lru_cache(maxsize=32)
def _thumbprints(leaf: x509.Certificate) -> tuple[tuple[str, str], ...]:
    der = leaf.public_bytes(Encoding.DER)
    digests = (("x5t", hashlib.sha1(der).digest()), ("x5t#S256", hashlib.sha256(der).digest()))  # noqa: S324
    return tuple((name, b64url_encode(digest)) for name, digest in digests)


def _check_thumbprints(header: Mapping[str, Any], leaf: x509.Certificate) -> None:
    for name, thumbprint in _thumbprints(leaf):
        if name in header and header[name] != thumbprint:
            raise JwsError(
                f"the release JWS header {name} does not match the signer certificate x5c[0]",
                hint="the header was altered or names another certificate",
            )


def verify_release_jws(
    compact: str, *, host: Endpoint, trust: TrustStore, at: datetime | None = None
) -> dict[str, Any]:
    """Verify a release JWS signed for ``host`` and return its payload.

    ``at`` is the validation time (default: now, UTC). Raises :class:`JwsError` saying what failed.
    """
    at = datetime.now(UTC) if at is None else at
    when = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    jws = _split(compact)
    algorithm = _algorithm(jws.header)
    if not jws.signature:
        raise JwsError("the release JWS has an empty signature")
    certs = _certificates(jws.header)
    _verify_chain(certs, host, trust, when)
    leaf_key = certs[0].public_key()
    if not isinstance(leaf_key, rsa.RSAPublicKey) or leaf_key.key_size < _MIN_SIGNER_BITS:
        raise JwsError(
            f"the release JWS signer key is {type(leaf_key).__name__}"
            f"{'-' + str(leaf_key.key_size) if isinstance(leaf_key, rsa.RSAPublicKey) else ''}; "
            f"expected RSA of at least {_MIN_SIGNER_BITS} bits"
        )
    _check_thumbprints(jws.header, certs[0])
    if not algorithm.verify(jws.signing_input, leaf_key, jws.signature):
        raise JwsError(
            "the release JWS signature does not verify with the signer certificate",
            hint="the payload or header was altered after signing",
        )
    return _json_object(jws.payload, "payload")


def sign_release_jws(
    payload: Mapping[str, Any], private_key: rsa.RSAPrivateKey, chain: Sequence[x509.Certificate]
) -> str:
    """Sign a release payload like Managed HSM: RS256, ``kid`` = ``x5t#S256``, ``x5c`` = ``chain``.

    ``chain[0]`` must be the certificate of ``private_key`` (leaf first).
    """
    if not chain:
        raise ConfigError("a release signature needs the signer certificate chain")
    if chain[0].public_key() != private_key.public_key():
        raise ConfigError("the release signing key does not match the first certificate of its chain")
    leaf_der = chain[0].public_bytes(Encoding.DER)
    thumbprint = b64url_encode(hashlib.sha256(leaf_der).digest())
    header = {
        "alg": "RS256",
        "kid": thumbprint,
        "x5c": [base64.b64encode(c.public_bytes(Encoding.DER)).decode("ascii") for c in chain],
        "x5t#S256": thumbprint,
    }
    signing_input = ".".join(
        b64url_encode(json.dumps(part, separators=(",", ":")).encode("utf-8")) for part in (header, payload)
    )
    signature = ALLOWED_ALGORITHMS["RS256"].sign(signing_input.encode("ascii"), private_key)
    return f"{signing_input}.{b64url_encode(signature)}"


# --- opening a release ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleasedKey:
    """A verified, unwrapped released key.

    ``jwk`` is the private JWK (never shown in the repr), ``key_id`` the key URL (the released key's
    ``kid``), ``kty`` the vault's key type, ``enc`` the wrap algorithm used, ``version`` the key version
    parsed from ``key_id`` (``None`` when the URL has none).
    """

    jwk: dict[str, Any] = field(repr=False)
    key_id: str
    kty: str
    enc: Enc
    version: str | None = None

    @property
    def jwk_json(self) -> str:
        """The JWK as the ``/key/release`` response carries it (sorted keys, no spaces)."""
        return jwk_to_json(self.jwk)


def _member(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    walked = []
    for name in path.split("."):
        walked.append(name)
        if not isinstance(value, Mapping) or name not in value:
            raise JwsError(
                f"the release payload has no {'.'.join(walked)}",
                hint="expected {request, response: {key: {key: {kid, kty, key_hsm, ...}}}}",
            )
        value = value[name]
    return value


def _string(obj: Mapping[str, Any], path: str) -> str:
    value = _member(obj, path)
    if not isinstance(value, str) or not value:
        raise JwsError(f"the release payload's {path} is not a non-empty string")
    return value


def key_version(key_id: str) -> str | None:
    """The version segment of a key URL ``https://<vault>/keys/<name>/<version>``, if present."""
    segments = [s for s in urlsplit(key_id).path.split("/") if s]
    return segments[2] if len(segments) == 3 and segments[0] == "keys" else None


def _b64_int(value: object) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int.from_bytes(b64url_decode(value, what="public key member"), "big")
    except KeyWrapError:
        return None


def _check_public_part(jwk: Mapping[str, Any], released: Mapping[str, Any]) -> None:
    """The unwrapped private key must belong to the public key the vault put next to it."""
    names = {"RSA": ("n", "e"), "EC": ("x", "y")}.get(str(jwk.get("kty")), ())
    for name in names:
        if name in released and _b64_int(released[name]) != _b64_int(jwk[name]):
            raise KeyWrapError(
                f"the unwrapped key does not match the public '{name}' of the released key",
                hint="the wrapped key material does not belong to the key the vault describes",
            )
    if "crv" in released and "crv" in jwk and released["crv"] != jwk["crv"]:
        raise KeyWrapError("the unwrapped key is on another curve than the released key")


def check_released_key_id(key_id: str, *, host: Endpoint, name: str, version: str | None = None) -> None:
    """The released key is the requested key: ``key_id`` (the payload's ``response.key.key.kid``,
    ``https://<vault>/keys/<name>/<version>``) names the vault ``host``, the key ``name`` and — when the
    request named one — the ``version``. Names and versions compare case-insensitively, as Key Vault's do.
    """
    try:
        kid_vault, parts = split_url(key_id, what="the released key's kid")
        kid_host, segments = kid_vault.host, [s for s in parts.path.split("/") if s]
    except (BadRequest, ValueError):
        kid_host, segments = "", []
    wanted = host.host
    found_name = segments[1] if len(segments) in (2, 3) and segments[0] == "keys" else None
    found_version = segments[2] if len(segments) == 3 else None
    problems = []
    if kid_host != wanted:
        problems.append(f"vault {kid_host[:100]!r} instead of {wanted!r}")
    if found_name is None or found_name.lower() != name.lower():
        problems.append(f"key {(found_name or '')[:128]!r} instead of {name!r}")
    if version is not None and (found_version is None or found_version.lower() != version.lower()):
        problems.append(f"version {(found_version or '')[:64]!r} instead of {version!r}")
    if problems:
        raise JwsError(
            f"the vault released another key than the one requested: {'; '.join(problems)}",
            hint="the vault answered with the release of a different key; the key was not used",
        )


def open_release(
    compact: str,
    *,
    host: Endpoint,
    trust: TrustStore,
    wrapping_key: rsa.RSAPrivateKey,
    at: datetime | None = None,
    expected_wrapping_kid: str | None = None,
    expected_name: str | None = None,
    expected_version: str | None = None,
) -> ReleasedKey:
    """Verify a release JWS, unwrap its ``key_hsm`` with ``wrapping_key`` and return the key as a JWK.

    ``expected_wrapping_kid``: when given, ``key_hsm.header.kid`` must equal it (the kid of the
    wrapping key in the attestation token's runtime keys). ``expected_name`` (and ``expected_version``,
    when the request named one): the released key's ``kid`` must name ``host``, that key and that version
    (:func:`check_released_key_id`), checked before anything is unwrapped.
    """
    payload = verify_release_jws(compact, host=host, trust=trust, at=at)
    released = _member(payload, "response.key.key")
    if not isinstance(released, Mapping):
        raise JwsError("the release payload's response.key.key is not an object")
    key_id = _string(payload, "response.key.key.kid")
    if expected_name is not None:
        check_released_key_id(key_id, host=host, name=expected_name, version=expected_version)
    kty = _string(payload, "response.key.key.kty")
    jose_kty(kty)
    key_ops = released.get("key_ops")
    if key_ops is not None and (
        not isinstance(key_ops, list) or not all(isinstance(op, str) for op in key_ops)
    ):
        raise JwsError("the release payload's response.key.key.key_ops is not a list of strings")
    key_hsm = parse_key_hsm(_string(payload, "response.key.key.key_hsm"))
    if expected_wrapping_kid is not None and key_hsm.kid != expected_wrapping_kid:
        raise KeyWrapError(
            f"the key was wrapped to key {key_hsm.kid[:80]!r}, not to this request's wrapping key "
            f"{expected_wrapping_kid[:80]!r}",
            hint="the attestation token's runtime keys do not name this request's wrapping key",
        )
    request = payload.get("request")
    request_enc = request.get("enc") if isinstance(request, Mapping) else None
    enc = select_enc(request_enc, key_hsm.enc)
    plaintext = unwrap(key_hsm.ciphertext, wrapping_key, enc)
    jwk = plaintext_to_jwk(plaintext, kty=kty, key_ops=key_ops)
    _check_public_part(jwk, released)
    return ReleasedKey(jwk=jwk, key_id=key_id, kty=kty, enc=enc, version=key_version(key_id))
