"""The 32-byte filesystem key (the LUKS passphrase) from a released JWK, exactly as the Go tools make it.

- ``oct``: the key itself, which must be exactly 32 bytes.
- ``RSA``: HKDF-SHA256 over the private exponent ``d`` (big-endian, no leading zeros: Go's
  ``big.Int.Bytes()``), salt = ``key_derivation.salt`` (hex), info = ``key_derivation.label`` or
  ``"Symmetric Encryption Key"``, 32 bytes out (``cmd/remotefs``, ``tools/importkey``).

An empty salt is legal but is the known pitfall (``importkey`` then picks a random salt that ``remotefs``
never sees): it is logged as a warning. Pure apart from that warning; never logs or returns key bytes in
a message.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from skr.b64 import b64url_decode
from skr.encfs.args import KeyDerivation
from skr.encfs.errors import EncfsKeyError

log = logging.getLogger("skr.encfs")

KEY_BYTES = 32


def _b64url(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise EncfsKeyError(f"the released key has no {what}")
    try:
        return b64url_decode(value, padding=False)
    except ValueError:
        raise EncfsKeyError(f"the released key's {what} is not base64url") from None


def derive_from_rsa_exponent(d: int, derivation: KeyDerivation, *, where: str = "") -> bytes:
    """HKDF-SHA256(IKM = ``d`` big-endian without leading zeros, salt, info) → 32 bytes."""
    salt = derivation.salt
    if not salt:
        log.warning(
            "%skey_derivation.salt is empty: the key is derived with an empty salt; if the image was made "
            "with importkey and no salt, importkey used a random one and this key will not open it",
            f"{where}: " if where else "",
        )
    ikm = d.to_bytes((d.bit_length() + 7) // 8, "big")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=derivation.info).derive(ikm)


def filesystem_key(jwk_json: str, derivation: KeyDerivation, *, where: str = "") -> bytes:
    """The 32-byte LUKS passphrase from the JWK ``/key/release`` returns (a JSON string)."""
    try:
        jwk = json.loads(jwk_json)
    except ValueError:
        raise EncfsKeyError("the released key is not a JWK") from None
    if not isinstance(jwk, dict):
        raise EncfsKeyError("the released key is not a JWK")
    kty = jwk.get("kty")
    if kty in ("oct", "oct-HSM"):
        key = _b64url(jwk.get("k"), "k")
        if len(key) != KEY_BYTES:
            raise EncfsKeyError(
                f"{where + ': ' if where else ''}the released oct key is {len(key)} bytes; "
                f"an encfs key must be exactly {KEY_BYTES}",
                hint="create the key with 256 bits (skr keys create --kty oct-HSM --size 256)",
            )
        return key
    if kty in ("RSA", "RSA-HSM"):
        d = int.from_bytes(_b64url(jwk.get("d"), "private exponent d"), "big")
        return derive_from_rsa_exponent(d, derivation, where=where)
    raise EncfsKeyError(
        f"{where + ': ' if where else ''}a released {kty!r} key cannot open an encfs image",
        hint="use an oct-HSM (32 bytes) or an RSA-HSM key with key_derivation",
    )
