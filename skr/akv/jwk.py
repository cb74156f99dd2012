"""Released key material as a JWK, exactly as the Go sidecar returns it from ``/key/release``.

Owns: plaintext (raw bytes for ``oct``, PKCS#8 DER for ``RSA``/``EC``) → private JWK
(``oct``: ``k``; ``RSA``: ``d, dp, dq, e, n, p, q, qi``; ``EC``: ``crv, x, y, d`` with fixed-width
coordinates), base64url without padding, ``key_ops`` copied from the released key (including values
such as ``export``/``import`` that the Go sidecar chokes on), no ``kid``; the canonical JSON string form
(sorted keys, no spaces); and the reverse direction for the wrap side (key object or JWK → plaintext).

Pure. Must never put key material into messages, logs or reprs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from skr.akv.keywrap import b64url_decode
from skr.b64 import b64url_encode, b64url_uint
from skr.errors import KeyWrapError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: AKV / JOSE curve names → cryptography curves. ``P-256K`` is Key Vault's name for secp256k1.
CURVES: Mapping[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
    "P-256K": ec.SECP256K1,
}
_CURVE_NAMES: Mapping[str, str] = {curve().name: name for name, curve in CURVES.items()}

#: JOSE ``kty`` by Key Vault ``kty`` in lower case, without its ``-HSM`` suffix.
_JOSE_KTY: Mapping[str, str] = {"oct": "oct", "rsa": "RSA", "ec": "EC"}

#: Raw symmetric key sizes accepted for ``oct`` (AES-128/192/256 up to HMAC-512 keys).
_OCT_MIN_BYTES = 16
_OCT_MAX_BYTES = 64


def jose_kty(kty: str) -> str:
    """The JOSE ``kty`` (``oct``, ``RSA``, ``EC``) of a Key Vault ``kty`` (``oct-HSM``, ``RSA-HSM``, ...)."""
    try:
        return _JOSE_KTY[kty.lower().removesuffix("-hsm")]
    except (KeyError, AttributeError):
        raise KeyWrapError(
            f"released key type {str(kty)[:32]!r} is not supported; expected oct, RSA or EC (plain or -HSM)"
        ) from None


def _fixed(value: int, size: int) -> str:
    return b64url_encode(value.to_bytes(size, "big"))


def _with_key_ops(jwk: dict[str, Any], key_ops: Sequence[str] | None) -> dict[str, Any]:
    if key_ops:
        if isinstance(key_ops, str) or not all(isinstance(op, str) for op in key_ops):
            raise KeyWrapError("key_ops of the released key must be a list of strings")
        jwk["key_ops"] = list(key_ops)
    return jwk


def private_key_to_jwk(key: PrivateKey, *, key_ops: Sequence[str] | None = None) -> dict[str, Any]:
    """The private JWK of an RSA or EC key object (no ``kid``; ``key_ops`` only when non-empty)."""
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        public = numbers.public_numbers
        jwk: dict[str, Any] = {
            "kty": "RSA",
            "n": b64url_uint(public.n),
            "e": b64url_uint(public.e),
            "d": b64url_uint(numbers.d),
            "p": b64url_uint(numbers.p),
            "q": b64url_uint(numbers.q),
            "dp": b64url_uint(numbers.dmp1),
            "dq": b64url_uint(numbers.dmq1),
            "qi": b64url_uint(numbers.iqmp),
        }
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        crv = _CURVE_NAMES.get(key.curve.name)
        if crv is None:
            raise KeyWrapError(
                f"EC curve {key.curve.name} is not supported; expected P-256, P-384, P-521 or P-256K"
            )
        size = (key.curve.key_size + 7) // 8
        ec_numbers = key.private_numbers()
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": _fixed(ec_numbers.public_numbers.x, size),
            "y": _fixed(ec_numbers.public_numbers.y, size),
            "d": _fixed(ec_numbers.private_value, size),
        }
    else:
        raise KeyWrapError(f"a {type(key).__name__} cannot be released; expected an RSA or EC private key")
    return _with_key_ops(jwk, key_ops)


def _check_rsa_consistency(key: rsa.RSAPrivateKey, kty: str) -> None:
    """The arithmetic a released RSA key must satisfy, checked with plain integers in microseconds.

    OpenSSL's full validation (primality of p and q) costs 50-500 ms with the GIL held, which would
    stall every request of the sidecar. The plaintext is already authenticated (release JWS signature,
    AES-KWP integrity, match with the payload's public key), so these consistency checks suffice.
    """
    n = key.private_numbers()
    p, q, d, e = n.p, n.q, n.d, n.public_numbers.e
    ok = (
        p > 1
        and q > 1
        and p * q == n.public_numbers.n
        and d * e % math.lcm(p - 1, q - 1) == 1
        and n.dmp1 == d % (p - 1)
        and n.dmq1 == d % (q - 1)
        and n.iqmp * q % p == 1
    )
    if not ok:
        raise KeyWrapError(f"the released plaintext for kty {kty} is not a consistent RSA private key")


def _load_pkcs8(plaintext: bytes, kty: str) -> PrivateKeyTypes:
    try:
        key = serialization.load_der_private_key(
            plaintext, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError):
        raise KeyWrapError(
            f"the released plaintext for kty {kty} is not a PKCS#8 private key",
            hint="the key type reported by the vault does not match the wrapped key material",
        ) from None
    except UnsupportedAlgorithm:
        raise KeyWrapError(
            f"the released plaintext for kty {kty} uses an unsupported key algorithm"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        _check_rsa_consistency(key, kty)
    return key


def plaintext_to_jwk(plaintext: bytes, *, kty: str, key_ops: Sequence[str] | None) -> dict[str, Any]:
    """The JWK of an unwrapped released key. ``kty`` is the vault's (``oct-HSM``, ``RSA``, ``EC-HSM``, ...).

    A plaintext that does not match ``kty`` raises :class:`KeyWrapError`.
    """
    jose = jose_kty(kty)
    if jose == "oct":
        if not _OCT_MIN_BYTES <= len(plaintext) <= _OCT_MAX_BYTES:
            raise KeyWrapError(
                f"the released plaintext for kty {kty} is {len(plaintext)} bytes; expected a raw "
                f"symmetric key of {_OCT_MIN_BYTES} to {_OCT_MAX_BYTES} bytes",
                hint="the key type reported by the vault does not match the wrapped key material",
            )
        return _with_key_ops({"kty": "oct", "k": b64url_encode(plaintext)}, key_ops)
    key = _load_pkcs8(plaintext, kty)
    wanted = rsa.RSAPrivateKey if jose == "RSA" else ec.EllipticCurvePrivateKey
    if not isinstance(key, wanted):
        raise KeyWrapError(
            f"the released plaintext for kty {kty} holds a {type(key).__name__.lstrip('_')}",
            hint="the key type reported by the vault does not match the wrapped key material",
        )
    return private_key_to_jwk(key, key_ops=key_ops)


def jwk_to_json(jwk: Mapping[str, Any]) -> str:
    """The JWK as the Go sidecar serializes it: sorted keys, no spaces."""
    return json.dumps(jwk, sort_keys=True, separators=(",", ":"))


# --- the wrap side --------------------------------------------------------------------------------------


def _jwk_int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise KeyWrapError(f"JWK member {name!r} is missing or not a string")
    return int.from_bytes(b64url_decode(value, what=f"JWK member {name!r}"), "big")


def jwk_to_private_key(jwk: Mapping[str, Any]) -> PrivateKey:
    """The key object of a private RSA or EC JWK (``kty`` in JOSE or Key Vault form)."""
    kty = jose_kty(str(jwk.get("kty", "")))
    try:
        if kty == "RSA":
            public = rsa.RSAPublicNumbers(_jwk_int(jwk, "e"), _jwk_int(jwk, "n"))
            return rsa.RSAPrivateNumbers(
                p=_jwk_int(jwk, "p"),
                q=_jwk_int(jwk, "q"),
                d=_jwk_int(jwk, "d"),
                dmp1=_jwk_int(jwk, "dp"),
                dmq1=_jwk_int(jwk, "dq"),
                iqmp=_jwk_int(jwk, "qi"),
                public_numbers=public,
            ).private_key()
        if kty == "EC":
            crv = jwk.get("crv")
            curve = CURVES.get(crv) if isinstance(crv, str) else None
            if curve is None:
                raise KeyWrapError(f"JWK crv {str(crv)[:16]!r} is not one of {', '.join(CURVES)}")
            point = ec.EllipticCurvePublicNumbers(_jwk_int(jwk, "x"), _jwk_int(jwk, "y"), curve())
            return ec.EllipticCurvePrivateNumbers(_jwk_int(jwk, "d"), point).private_key()
    except ValueError:
        raise KeyWrapError(f"the {kty} JWK is not a consistent private key") from None
    raise KeyWrapError("an oct JWK has no key object; use its 'k' bytes")


def private_key_to_plaintext(key: PrivateKey | bytes | Mapping[str, Any]) -> bytes:
    """What Key Vault wraps for a key: PKCS#8 DER for RSA/EC (key object or JWK), raw bytes for oct.

    ``key`` is a key object, the raw bytes of a symmetric key, or a private JWK.
    """
    if isinstance(key, bytes | bytearray):
        if not _OCT_MIN_BYTES <= len(key) <= _OCT_MAX_BYTES:
            raise KeyWrapError(
                f"a symmetric key of {len(key)} bytes; expected {_OCT_MIN_BYTES} to {_OCT_MAX_BYTES}"
            )
        return bytes(key)
    if isinstance(key, Mapping):
        if jose_kty(str(key.get("kty", ""))) == "oct":
            raw = key.get("k")
            if not isinstance(raw, str):
                raise KeyWrapError("oct JWK member 'k' is missing or not a string")
            return private_key_to_plaintext(b64url_decode(raw, what="JWK member 'k'"))
        key = jwk_to_private_key(key)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyWrapError(f"a {type(key).__name__} cannot be wrapped; expected an RSA or EC private key")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _CURVE_NAMES:
        raise KeyWrapError(f"EC curve {key.curve.name} is not supported")
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
