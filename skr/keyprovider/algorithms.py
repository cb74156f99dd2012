"""Decrypting wrapped data with a released key, by JOSE algorithm name (``POST /key/unwrap``).

Owns the supported algorithms and what each needs: ``RSA-OAEP-256`` (OAEP, SHA-256, MGF1-SHA-256) and
``RSA-OAEP`` (OAEP, SHA-1, MGF1-SHA-1) with an RSA key; ``A128KW`` / ``A192KW`` / ``A256KW`` (RFC 3394
AES key wrap) with an oct key of that size. ``RSA1_5`` is refused on purpose: PKCS#1 v1.5 decryption
behind an API is a padding oracle.

Pure. Never puts key material or plaintexts into a message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from skr.akv.jwk import jose_kty, jwk_to_private_key
from skr.akv.keywrap import b64url_decode
from skr.errors import BadRequest, Code, KeyWrapError, UnwrapFailed

_AES_KW_BYTES = {"A128KW": 16, "A192KW": 24, "A256KW": 32}
_RSA_OAEP_HASHES: Mapping[str, Callable[[], hashes.HashAlgorithm]] = {
    "RSA-OAEP-256": hashes.SHA256,
    "RSA-OAEP": hashes.SHA1,
}
#: The algorithms ``/key/unwrap`` accepts, in the order the README lists them.
SUPPORTED_ALGORITHMS: tuple[str, ...] = (*_RSA_OAEP_HASHES, *_AES_KW_BYTES)


def check_algorithm(alg: str) -> str:
    """``alg`` if supported, else a 400 naming the supported ones."""
    if alg not in SUPPORTED_ALGORITHMS:
        raise BadRequest(
            f"alg {alg[:32]!r} is not supported; use one of {', '.join(SUPPORTED_ALGORITHMS)}",
            code=Code.UNSUPPORTED_ALG,
        )
    return alg


def _failed(alg: str) -> UnwrapFailed:
    return UnwrapFailed(
        f"the wrapped data does not decrypt with the released key ({alg})",
        hint="it was wrapped for another key, another key version or another algorithm, or it is damaged",
    )


def _mismatch(alg: str, kty: str) -> BadRequest:
    return BadRequest(f"alg {alg} does not apply to the released {kty} key", code=Code.KEY_TYPE_MISMATCH)


def decrypt(alg: str, jwk_json: str, wrapped: bytes) -> bytes:
    """The plaintext of ``wrapped`` under the released key (its JWK JSON string) with ``alg``."""
    check_algorithm(alg)
    jwk: dict[str, Any] = json.loads(jwk_json)
    kty = jose_kty(str(jwk.get("kty", "")))
    if alg in _RSA_OAEP_HASHES:
        if kty != "RSA":
            raise _mismatch(alg, kty)
        key = jwk_to_private_key(jwk)
        assert isinstance(key, rsa.RSAPrivateKey)
        digest = _RSA_OAEP_HASHES[alg]
        oaep = padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)
        try:
            return key.decrypt(wrapped, oaep)
        except ValueError:
            raise _failed(alg) from None
    if kty != "oct":
        raise _mismatch(alg, kty)
    k = jwk.get("k")
    try:
        secret = b64url_decode(k if isinstance(k, str) else "", what="JWK member 'k'")
    except KeyWrapError:
        raise _mismatch(alg, kty) from None
    if len(secret) != _AES_KW_BYTES[alg]:
        raise BadRequest(
            f"alg {alg} needs a {_AES_KW_BYTES[alg] * 8}-bit key; "
            f"the released key has {len(secret) * 8} bits",
            code=Code.KEY_TYPE_MISMATCH,
        )
    try:
        return aes_key_unwrap(secret, wrapped)
    except (InvalidUnwrap, ValueError):
        raise _failed(alg) from None
