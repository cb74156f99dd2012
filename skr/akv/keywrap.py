"""The RSA-AES key wrap family Key Vault and Managed HSM use for secure key release, and ``key_hsm``.

Owns, in both directions: ``CKM_RSA_AES_KEY_WRAP`` (RSA-OAEP with SHA-1 / MGF1-SHA-1),
``RSA_AES_KEY_WRAP_256`` (SHA-256) and ``RSA_AES_KEY_WRAP_384`` (SHA-384). The blob is
``RSA-OAEP(aes_key) || AES-KWP(plaintext)`` (RFC 5649, empty OAEP label), split at the wrapping key's
modulus length. Also owns the ``key_hsm`` envelope of the release payload
(base64url JSON ``{"schema_version", "header": {"kid", "alg": "dir", "enc"}, "ciphertext"}``) and the
choice of ``enc`` (the payload's ``request.enc``, else the envelope's ``header.enc``, else the service
default).

Pure: no I/O. Must never put key bytes (plaintext, AES key, ciphertext) into a message, log or repr.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from skr import b64
from skr.b64 import b64url_encode
from skr.errors import KeyWrapError


class Enc(StrEnum):
    """The ``enc`` values of a Key Vault release (``KeyReleaseParameters.enc``)."""

    CKM_RSA_AES_KEY_WRAP = "CKM_RSA_AES_KEY_WRAP"
    RSA_AES_KEY_WRAP_256 = "RSA_AES_KEY_WRAP_256"
    RSA_AES_KEY_WRAP_384 = "RSA_AES_KEY_WRAP_384"


#: What Key Vault uses when the release request names no ``enc``.
DEFAULT_ENC = Enc.CKM_RSA_AES_KEY_WRAP

#: Wrapping key sizes this module accepts (the Go sidecar only ever uses 2048).
SUPPORTED_WRAPPING_KEY_BITS = (2048, 3072, 4096)

#: The AES key size used when wrapping (PKCS#11 leaves it to the caller; 256 is the strongest).
_WRAP_AES_KEY_BYTES = 32
_AES_KEY_SIZES = (16, 24, 32)
_KEY_HSM_SCHEMA_MAJOR = "1"

_HASHES: dict[Enc, type[hashes.HashAlgorithm]] = {
    Enc.CKM_RSA_AES_KEY_WRAP: hashes.SHA1,
    Enc.RSA_AES_KEY_WRAP_256: hashes.SHA256,
    Enc.RSA_AES_KEY_WRAP_384: hashes.SHA384,
}


def b64url_decode(value: str, *, what: str) -> bytes:
    """Decode base64url with or without ``=`` padding; anything else raises :class:`KeyWrapError`.

    ``what`` names the field in the error message (never the value).
    """
    try:
        if not isinstance(value, str):
            raise ValueError("is not base64url text")
        return b64.b64url_decode(value)
    except ValueError as exc:
        raise KeyWrapError(
            f"{what} {exc}", hint="expected the URL-safe alphabet A-Z a-z 0-9 - _ with optional '=' padding"
        ) from None


# --- enc ----------------------------------------------------------------------------------------------


def parse_enc(value: object, *, source: str = "enc") -> Enc:
    """The :class:`Enc` named by ``value``; :class:`KeyWrapError` naming ``source`` otherwise."""
    if isinstance(value, str):
        try:
            return Enc(value)
        except ValueError:
            pass
    shown = value if isinstance(value, str) and len(value) <= 64 else type(value).__name__
    raise KeyWrapError(
        f"{source} is {shown!r}; expected one of {', '.join(e.value for e in Enc)}",
        hint="the vault named a key wrap algorithm this sidecar does not implement",
    )


def select_enc(request_enc: object = None, header_enc: object = None) -> Enc:
    """The algorithm a release was wrapped with.

    Key Vault reports it as the payload's ``request.enc`` (this is what the Go sidecar reads); the
    ``key_hsm`` header carries it too. Missing both means the service default
    (:data:`DEFAULT_ENC`). A value that is present but unknown is an error, not a fallback.
    """
    if request_enc is not None:
        return parse_enc(request_enc, source="the release payload's request.enc")
    if header_enc is not None:
        return parse_enc(header_enc, source="key_hsm.header.enc")
    return DEFAULT_ENC


def _oaep(enc: Enc) -> padding.OAEP:
    algorithm = _HASHES[Enc(enc)]
    return padding.OAEP(mgf=padding.MGF1(algorithm=algorithm()), algorithm=algorithm(), label=None)


def _modulus_bytes(key_size: int) -> int:
    if key_size not in SUPPORTED_WRAPPING_KEY_BITS:
        raise KeyWrapError(
            f"the wrapping key is RSA-{key_size}; expected RSA-2048, RSA-3072 or RSA-4096",
            hint="generate the ephemeral wrapping key with one of the supported sizes",
        )
    return key_size // 8


# --- wrap / unwrap ------------------------------------------------------------------------------------


def unwrap(ciphertext: bytes, wrapping_key: RSAPrivateKey, enc: Enc) -> bytes:
    """Recover the released key's plaintext (raw bytes for oct keys, PKCS#8 DER for RSA/EC keys).

    ``ciphertext`` is ``RSA-OAEP(aes_key) || AES-KWP(plaintext)``; the RSA part is as long as the
    wrapping key's modulus.
    """
    enc = parse_enc(enc)
    rsa_len = _modulus_bytes(wrapping_key.key_size)
    kwp = ciphertext[rsa_len:]
    if len(ciphertext) <= rsa_len or len(kwp) < 16 or len(kwp) % 8:
        raise KeyWrapError(
            f"the wrapped key is {len(ciphertext)} bytes; expected {rsa_len} bytes of RSA-OAEP for the "
            f"RSA-{wrapping_key.key_size} wrapping key followed by an AES key wrap of a multiple of 8 "
            "bytes (at least 16)",
            hint="the key_hsm ciphertext is truncated, or it was wrapped to a different key size",
        )
    try:
        aes_key = wrapping_key.decrypt(ciphertext[:rsa_len], _oaep(enc))
    except ValueError:
        raise KeyWrapError(
            f"RSA-OAEP decryption of the transport key failed ({enc.value})",
            hint="the key was wrapped to another wrapping key, with another enc, or the ciphertext "
            "was altered",
        ) from None
    if len(aes_key) not in _AES_KEY_SIZES:
        raise KeyWrapError(
            f"the transport key is {len(aes_key)} bytes; expected an AES key of 16, 24 or 32 bytes"
        )
    try:
        return aes_key_unwrap_with_padding(aes_key, kwp)
    except InvalidUnwrap:
        raise KeyWrapError(
            "the AES key wrap (RFC 5649) integrity check failed",
            hint="the ciphertext after the RSA part was altered or truncated",
        ) from None


def wrap(plaintext: bytes, public_key: RSAPublicKey, enc: Enc) -> bytes:
    """Wrap ``plaintext`` to ``public_key`` the way Key Vault does, with a fresh AES-256 transport key."""
    enc = parse_enc(enc)
    _modulus_bytes(public_key.key_size)
    if not plaintext:
        raise KeyWrapError("refusing to wrap an empty key", hint="RFC 5649 needs at least one byte")
    aes_key = os.urandom(_WRAP_AES_KEY_BYTES)
    return public_key.encrypt(aes_key, _oaep(enc)) + aes_key_wrap_with_padding(aes_key, plaintext)


# --- key_hsm --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyHsm:
    """The parsed ``key_hsm`` envelope of a released key.

    ``kid`` is the wrapping key's kid (from the attestation token's ``x-ms-runtime.keys``);
    ``enc`` is ``None`` when the header does not name one.
    """

    kid: str
    enc: Enc | None
    ciphertext: bytes = field(repr=False)


def encode_key_hsm(kid: str, enc: Enc, ciphertext: bytes) -> str:
    """The ``key_hsm`` string Key Vault puts into a release payload (base64url JSON, no padding)."""
    document = {
        "schema_version": "1.0",
        "header": {"kid": kid, "alg": "dir", "enc": parse_enc(enc).value},
        "ciphertext": b64url_encode(ciphertext),
    }
    return b64url_encode(json.dumps(document, separators=(",", ":")).encode("utf-8"))


def _require(obj: dict[str, Any], name: str, where: str, kind: type) -> Any:
    if name not in obj:
        raise KeyWrapError(f"{where}.{name} is missing", hint="the release payload's key_hsm is malformed")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise KeyWrapError(
            f"{where}.{name} is a {type(value).__name__}; expected a {kind.__name__}",
            hint="the release payload's key_hsm is malformed",
        )
    return value


def parse_key_hsm(value: str) -> KeyHsm:
    """Parse ``key_hsm`` (padded or unpadded base64url JSON); strict about its structure."""
    raw = b64url_decode(value, what="key_hsm")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise KeyWrapError(
            "key_hsm does not decode to JSON", hint="expected base64url of a JSON object"
        ) from None
    if not isinstance(document, dict):
        raise KeyWrapError(f"key_hsm is a JSON {type(document).__name__}; expected an object")
    schema = _require(document, "schema_version", "key_hsm", str)
    if schema.split(".")[0] != _KEY_HSM_SCHEMA_MAJOR:
        raise KeyWrapError(
            f"key_hsm.schema_version is {schema[:16]!r}; expected 1.x",
            hint="the vault uses a key_hsm format this sidecar does not know",
        )
    header = _require(document, "header", "key_hsm", dict)
    kid = _require(header, "kid", "key_hsm.header", str)
    alg = _require(header, "alg", "key_hsm.header", str)
    if alg != "dir":
        raise KeyWrapError(f"key_hsm.header.alg is {alg[:32]!r}; expected 'dir'")
    enc = header.get("enc")
    parsed_enc = None if enc is None else parse_enc(enc, source="key_hsm.header.enc")
    ciphertext = b64url_decode(_require(document, "ciphertext", "key_hsm", str), what="key_hsm.ciphertext")
    if not ciphertext:
        raise KeyWrapError("key_hsm.ciphertext is empty")
    return KeyHsm(kid=kid, enc=parsed_enc, ciphertext=ciphertext)
