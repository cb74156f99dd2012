"""The example's file format: a JWE in compact serialization with direct encryption (``"alg": "dir"``).

A standard format (RFC 7516), so the data owner can produce it with any JOSE library, and the file says
which key opens it (``kid``). The content key *is* the released Key Vault ``oct`` key — 256 bits, which is
exactly what both supported content encryptions take:

- ``A256GCM`` (RFC 7518 §5.3) — AES-256-GCM; the default.
- ``A128CBC-HS256`` (RFC 7518 §5.2.3) — AES-128-CBC + HMAC-SHA-256 (encrypt-then-MAC, the first 16 bytes
  of the key are the MAC key, the last 16 the AES key). The one JWE content encryption that the plain
  ``openssl`` command line can verify and decrypt (``openssl enc`` has no AEAD mode), which is why
  ``examples/curl`` reads only this one.

Pure: no I/O. Never puts key material into exceptions or reprs. Authentication is always checked before
any plaintext is returned; every failure of it is the same :class:`JweError` message.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

A256GCM = "A256GCM"
A128CBC_HS256 = "A128CBC-HS256"
ENCS = (A256GCM, A128CBC_HS256)
KEY_BYTES = 32  # both encs take a 256-bit key
_IV_BYTES = {A256GCM: 12, A128CBC_HS256: 16}
_TAG_BYTES = 16
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_AUTH_FAILED = "authentication failed: the file was modified, or it was encrypted under another key"


class JweError(ValueError):
    """The input is not a JWE this example can open."""


class AuthenticationFailed(JweError):
    """The tag did not verify: the file was modified, or it is not for this key."""


@dataclass(frozen=True)
class Header:
    """The protected header fields this example uses."""

    alg: str
    enc: str
    kid: str | None


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    """Strict base64url without padding; ``what`` names the part in the error."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise JweError(f"the JWE {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JweError(f"the JWE {what} is not base64url") from None


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise JweError(f"the content key must be {KEY_BYTES * 8} bits, got {len(key) * 8}")


def _al(aad: bytes) -> bytes:
    """AL: the AAD length in bits as a 64-bit big-endian integer (RFC 7518 §5.2.2.1 step 4)."""
    return (len(aad) * 8).to_bytes(8, "big")


def _cbc_hmac_tag(mac_key: bytes, aad: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    mac = crypto_hmac.HMAC(mac_key, hashes.SHA256())
    mac.update(aad + iv + ciphertext + _al(aad))
    return mac.finalize()[:_TAG_BYTES]


def cbc_hmac_encrypt(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """AES_128_CBC_HMAC_SHA_256 (RFC 7518 §5.2.2.1): returns (ciphertext, tag)."""
    _check_key(key)
    mac_key, enc_key = key[:16], key[16:]
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return ciphertext, _cbc_hmac_tag(mac_key, aad, iv, ciphertext)


def cbc_hmac_decrypt(key: bytes, iv: bytes, ciphertext: bytes, aad: bytes, tag: bytes) -> bytes:
    """AES_128_CBC_HMAC_SHA_256 decryption: the tag is checked (constant time) before anything else."""
    _check_key(key)
    mac_key, enc_key = key[:16], key[16:]
    if not hmac.compare_digest(_cbc_hmac_tag(mac_key, aad, iv, ciphertext), tag):
        raise AuthenticationFailed(_AUTH_FAILED)
    if not ciphertext or len(ciphertext) % 16:
        raise AuthenticationFailed(_AUTH_FAILED)
    decryptor = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise AuthenticationFailed(_AUTH_FAILED) from None


def encrypt(plaintext: bytes, key: bytes, *, kid: str, enc: str = A256GCM) -> str:
    """Encrypt ``plaintext`` under the 256-bit ``key``; returns the JWE compact serialization."""
    if enc not in ENCS:
        raise JweError(f"enc must be one of {', '.join(ENCS)}, got {enc!r}")
    _check_key(key)
    header = {"alg": "dir", "enc": enc, "kid": kid}
    protected = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    aad = protected.encode("ascii")
    iv = os.urandom(_IV_BYTES[enc])
    if enc == A256GCM:
        sealed = AESGCM(key).encrypt(iv, plaintext, aad)
        ciphertext, tag = sealed[:-_TAG_BYTES], sealed[-_TAG_BYTES:]
    else:
        ciphertext, tag = cbc_hmac_encrypt(key, iv, plaintext, aad)
    return ".".join([protected, "", b64url_encode(iv), b64url_encode(ciphertext), b64url_encode(tag)])


def _split(token: str) -> list[str]:
    parts = token.strip().split(".")
    if len(parts) != 5:
        raise JweError(f"not a JWE in compact serialization: {len(parts)} parts, expected 5")
    return parts


def read_header(token: str) -> Header:
    """The checked protected header: ``alg`` dir, a supported ``enc``, no ``zip`` and no ``crit``."""
    raw = b64url_decode(_split(token)[0], "header")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise JweError("the JWE header is not JSON") from None
    if not isinstance(doc, dict):
        raise JweError("the JWE header is not a JSON object")
    if doc.get("alg") != "dir":
        raise JweError(
            f'the JWE alg must be "dir" (the released key is the content key), got {doc.get("alg")!r}'
        )
    if doc.get("enc") not in ENCS:
        raise JweError(f"the JWE enc must be one of {', '.join(ENCS)}, got {doc.get('enc')!r}")
    for name in ("zip", "crit"):
        if name in doc:
            raise JweError(f'the JWE header has "{name}", which this example does not support')
    kid = doc.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise JweError("the JWE kid must be a non-empty string")
    return Header(alg="dir", enc=doc["enc"], kid=kid)


def decrypt(token: str, key: bytes) -> bytes:
    """Verify and decrypt a JWE produced by :func:`encrypt` (or any JOSE library, same alg/enc)."""
    header = read_header(token)
    _check_key(key)
    protected, encrypted_key, iv_b64, ct_b64, tag_b64 = _split(token)
    if encrypted_key:
        raise JweError('a "dir" JWE has an empty encrypted-key part')
    iv = b64url_decode(iv_b64, "IV")
    ciphertext = b64url_decode(ct_b64, "ciphertext")
    tag = b64url_decode(tag_b64, "tag")
    if len(iv) != _IV_BYTES[header.enc] or len(tag) != _TAG_BYTES:
        raise JweError(
            f"{header.enc} needs a {_IV_BYTES[header.enc]}-byte IV and a {_TAG_BYTES}-byte tag, "
            f"got {len(iv)} and {len(tag)}"
        )
    aad = protected.encode("ascii")
    if header.enc == A256GCM:
        try:
            return AESGCM(key).decrypt(iv, ciphertext + tag, aad)
        except InvalidTag:
            raise AuthenticationFailed(_AUTH_FAILED) from None
    return cbc_hmac_decrypt(key, iv, ciphertext, aad, tag)
