"""The release of the local key service: policy against the target token, key wrapped, JWS signed.

Owns what ``POST /keys/{name}/{version}/release`` does once the key is found (docs/wire-formats.md §5):
the target token verified through its issuer's OpenID metadata over HTTPS (only issuers the key's policy
names as authority are ever contacted), the policy evaluated with :mod:`skr.akv.policy`, the key wrapped
to the first suitable ``x-ms-runtime.keys`` key, and the ``{"request", "response"}`` payload signed as a
JWS with the certificate chain of the key service's host.

Refusals are :class:`skr.local.kit.ServiceError` answers (403 ``Forbidden`` / ``AccessDenied``, 400
``BadParameter``). Never releases a key it could not verify a token for; never logs key material or tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.akv.jwk import private_key_to_plaintext
from skr.akv.jws import ALLOWED_ALGORITHMS, sign_release_jws
from skr.akv.keywrap import Enc, encode_key_hsm, wrap
from skr.akv.policy import evaluate, normalize_authority, parse_policy
from skr.b64 import b64url_encode
from skr.errors import SkrError
from skr.local.keystore import RSA_SIZES, KeyVersion, StoredPolicy, bad, decode_b64url
from skr.local.kit import ServiceError
from skr.maa.token import TokenVerifier, unverified_claims

CANNOT_VERIFY = "Target environment attestation statement cannot be verified."


def denied(message: str) -> ServiceError:
    """Key Vault's 403 answer."""
    return ServiceError(403, "Forbidden", message, "AccessDenied")


def parse_enc(value: object) -> Enc:
    """The ``enc`` of a release request (default ``CKM_RSA_AES_KEY_WRAP``)."""
    if value is None:
        return Enc.CKM_RSA_AES_KEY_WRAP
    try:
        return Enc(str(value).upper())
    except ValueError:
        raise bad(
            f"The enc '{str(value)[:32]}' is not supported. Supported: {', '.join(e.value for e in Enc)}."
        ) from None


def select_wrapping_key(claims: Mapping[str, Any]) -> tuple[str, rsa.RSAPublicKey]:
    """``(kid, public key)`` of the first ``x-ms-runtime.keys`` RSA JWK with ``key_ops`` ∋ ``encrypt`` or
    ``use`` = ``enc``. :class:`ServiceError` 400 when there is none."""
    runtime = claims.get("x-ms-runtime")
    keys = runtime.get("keys") if isinstance(runtime, Mapping) else None
    for jwk in keys if isinstance(keys, list) else []:
        if not isinstance(jwk, Mapping):
            continue
        ops = jwk.get("key_ops")
        suitable = (isinstance(ops, list) and "encrypt" in ops) or jwk.get("use") == "enc"
        if not suitable:
            continue
        if jwk.get("kty") != "RSA":
            raise bad(
                f"The wrapping key in x-ms-runtime.keys has kty {str(jwk.get('kty'))[:16]!r}; "
                "RSA is required."
            )
        try:
            n = int.from_bytes(decode_b64url(jwk["n"]), "big")
            e = int.from_bytes(decode_b64url(jwk["e"]), "big")
            public = rsa.RSAPublicNumbers(e, n).public_key()
        except (KeyError, ValueError, ServiceError):
            raise bad("The wrapping key in x-ms-runtime.keys is not a valid RSA public key.") from None
        if public.key_size not in RSA_SIZES:
            raise bad(f"The wrapping key is RSA-{public.key_size}; supported: 2048, 3072, 4096.")
        return str(jwk.get("kid", "")), public
    raise bad(
        "Target environment attestation statement does not contain a suitable wrapping key "
        "(x-ms-runtime.keys needs an RSA key with key_ops 'encrypt' or use 'enc')."
    )


class KeyReleaser:
    """Releases stored keys to verified targets, signing with ``signing_key`` and ``chain`` (``chain[0]``
    a certificate for the key service's host)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        signing_key: rsa.RSAPrivateKey,
        chain: Sequence[x509.Certificate],
    ) -> None:
        self._verifier = verifier
        self._signing_key = signing_key
        self._chain = list(chain)

    async def release(
        self,
        key: KeyVersion,
        target: str,
        *,
        base_url: str,
        api_version: str,
        enc: Enc,
        requested_version: str | None,
        mutations: frozenset[str] = frozenset(),
    ) -> str:
        """The release JWS of ``key`` for the ``target`` token; ``mutations`` corrupt it (fault plans)."""
        if not key.enabled:
            raise denied(f"Operation release is not allowed on a disabled key {key.name}.")
        if not key.exportable or key.release_policy is None:
            raise bad(f"The key {key.name} is not exportable.")
        claims = await self.check_target(target, key.release_policy)
        kid, wrapping_key = select_wrapping_key(claims)
        requested = f"{base_url}/keys/{key.name}" + (f"/{requested_version}" if requested_version else "")
        plaintext = private_key_to_plaintext(
            decode_b64url(key.material["k"]) if key.kty == "oct-HSM" else dict(key.material)
        )
        key_hsm = encode_key_hsm(kid, enc, wrap(plaintext, wrapping_key, enc))
        payload = {
            "request": {"api-version": api_version, "enc": enc.value, "kid": requested},
            "response": {
                "key": {
                    "key": {**key.public_jwk(base_url), "key_hsm": key_hsm},
                    "attributes": key.attributes(),
                    "release_policy": {
                        "contentType": key.release_policy.content_type,
                        "data": b64url_encode(key.release_policy.data),
                    },
                }
            },
        }
        return self._sign(payload, mutations)

    def _sign(self, payload: Mapping[str, Any], mutations: frozenset[str]) -> str:
        """The release JWS; a fault plan can corrupt it: ``truncate_jws``, ``resign_jws`` (signature by
        another key), ``expired_cert`` (an expired, self-issued signer certificate)."""
        chain = self._chain
        if "expired_cert" in mutations:
            chain = [_expired_copy(self._signing_key, chain[0]), *chain[1:]]
        jws = sign_release_jws(payload, self._signing_key, chain)
        if "resign_jws" in mutations:
            signing_input = jws.rsplit(".", 1)[0]
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            signature = ALLOWED_ALGORITHMS["RS256"].sign(signing_input.encode("ascii"), other)
            jws = f"{signing_input}.{b64url_encode(signature)}"
        return jws[: len(jws) // 2] if "truncate_jws" in mutations else jws

    async def check_target(self, token: str, stored: StoredPolicy) -> Mapping[str, Any]:
        """Verify the target token (only against issuers the policy names) and evaluate the policy.

        Returns the verified claims; raises :class:`ServiceError` 403 with the reason otherwise.
        """
        policy = parse_policy(stored.data)
        try:
            issuer = unverified_claims(token).get("iss")
        except SkrError:
            raise denied(CANNOT_VERIFY) from None
        authorities = {normalize_authority(a) for a in policy.authorities}
        if not isinstance(issuer, str) or normalize_authority(issuer) not in authorities:
            decision = evaluate(policy, {"iss": issuer})
            raise denied(f"{CANNOT_VERIFY} {decision.reason}")
        try:
            claims = await self._verifier.verify(token, issuer=issuer)
        except SkrError as exc:
            raise denied(f"{CANNOT_VERIFY} {exc.message}") from None
        decision = evaluate(policy, claims)
        if not decision.allowed:
            raise denied(
                f"Target environment attestation statement does not satisfy the key release policy: "
                f"{decision.reason.removeprefix('release policy not satisfied: ')}"
            )
        return claims


def _expired_copy(key: rsa.RSAPrivateKey, like: x509.Certificate) -> x509.Certificate:
    """An expired certificate with ``like``'s names for ``key``, signed by ``key`` (fault injection)."""
    now = datetime.now(UTC)
    start, end = now - timedelta(days=30), now - timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(like.subject)
        .issuer_name(like.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    with contextlib.suppress(x509.ExtensionNotFound):
        san = like.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(san.value, critical=san.critical)
    return builder.sign(key, hashes.SHA256())
