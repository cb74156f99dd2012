"""The ephemeral RSA wrapping key and the runtime data that binds it to an attestation report.

Owns: generating the RSA key that Key Vault wraps a released key to, its RFC 7638 ``kid``, its public
JWK, and the exact ``runtimeData`` bytes sent to MAA (whose SHA-256 goes into REPORT_DATA[0:32]):
``{"keys":[{"e":"AQAB","key_ops":["encrypt"],"kid":"…","kty":"RSA","n":"…"}]}`` — sorted keys, no
spaces, base64url without padding (byte-compatible with Microsoft's Go sidecar). With an audit log the
runtime data also names the log's head at that moment, ``"skr-audit": {"head","instance","seq"}`` next
to ``"keys"``, so every MAA token (the one Key Vault sees) names the log state too; Key Vault still picks
the first ``keys`` entry with ``key_ops`` ∋ ``encrypt``, exactly as before.

Never reveals the private key: not in ``repr``, not in the JWK, not in logs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from skr.b64 import b64url_encode, b64url_uint
from skr.errors import BadRequest

AUDIT_CLAIM = "skr-audit"
DEFAULT_BITS = 2048
MIN_BITS = 2048
PUBLIC_EXPONENT = 65537


@dataclass(frozen=True)
class AuditHead:
    """The audit log's state an attestation names: the last record's ``seq`` and ``head`` hash, and the
    sidecar run (``instance``) that wrote it."""

    seq: int
    head: str
    instance: str


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def rsa_public_members(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """The required RSA JWK members ``{"e", "kty", "n"}`` of a public key."""
    numbers = public_key.public_numbers()
    return {"e": b64url_uint(numbers.e), "kty": "RSA", "n": b64url_uint(numbers.n)}


def jwk_thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of an RSA public key."""
    return b64url_encode(hashlib.sha256(_canonical_json(rsa_public_members(public_key))).digest())


class WrappingKey:
    """An RSA key pair whose public half is published in the runtime data of an attestation.

    Use a fresh one per attestation token. ``generate`` is CPU-heavy: call it through
    ``asyncio.to_thread`` from async code.
    """

    __slots__ = ("_kid", "_private_key")

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise BadRequest(
                f"a wrapping key must be an RSA private key, found {type(private_key).__name__}",
                hint="create it with WrappingKey.generate()",
            )
        if private_key.key_size < MIN_BITS:
            raise BadRequest(
                f"a wrapping key must have at least {MIN_BITS} bits, found {private_key.key_size}",
                hint="Key Vault's RSA-AES key wrap assumes RSA-2048 or larger",
            )
        self._private_key = private_key
        self._kid = jwk_thumbprint(private_key.public_key())

    @classmethod
    def generate(cls, bits: int = DEFAULT_BITS) -> WrappingKey:
        """A fresh RSA key with public exponent 65537 (default 2048 bits, as the Go sidecar uses)."""
        if bits < MIN_BITS:
            raise BadRequest(f"a wrapping key must have at least {MIN_BITS} bits, asked for {bits}")
        return cls(rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=bits))

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        """The private key, for unwrapping the released key. Never log or serialize it."""
        return self._private_key

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self._private_key.public_key()

    @property
    def key_size(self) -> int:
        return self._private_key.key_size

    @property
    def kid(self) -> str:
        """The RFC 7638 SHA-256 thumbprint of the public key, base64url without padding."""
        return self._kid

    def public_jwk(self) -> dict[str, Any]:
        """``{"e", "key_ops": ["encrypt"], "kid", "kty": "RSA", "n"}`` — the JWK Key Vault wraps to."""
        members: dict[str, Any] = dict(rsa_public_members(self.public_key))
        members["key_ops"] = ["encrypt"]
        members["kid"] = self._kid
        return dict(sorted(members.items()))

    def runtime_data(self, audit: AuditHead | None = None) -> bytes:
        """The exact runtime-data bytes: ``{"keys":[<public_jwk>]}`` with sorted keys and no spaces, plus
        ``"skr-audit"`` when ``audit`` names the audit log's head."""
        doc: dict[str, Any] = {"keys": [self.public_jwk()]}
        if audit is not None:
            doc[AUDIT_CLAIM] = {"head": audit.head, "instance": audit.instance, "seq": audit.seq}
        return _canonical_json(doc)

    def __repr__(self) -> str:
        return f"WrappingKey(kid={self._kid!r}, bits={self.key_size})"

    def __reduce__(self) -> Any:
        raise TypeError("a WrappingKey cannot be pickled: it holds a private key")
