"""base64url as JOSE writes it (RFC 7515 §2, RFC 4648 §5): the one encoder and the one strict decoder.

Pure functions, no I/O. The decoder raises :class:`ValueError` with the reason (never the value); each
caller turns it into its own error naming the field (a 400, a refused key, a refused token).
"""

from __future__ import annotations

import base64
import re

__all__ = ["b64url_decode", "b64url_encode", "b64url_uint"]

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_uint(value: int) -> str:
    """Base64urlUInt (RFC 7518 §2): big-endian in the fewest octets (one for zero), without padding."""
    return b64url_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def b64url_decode(text: str, *, padding: bool = True) -> bytes:
    """The bytes of ``text``: the URL-safe alphabet only, and up to two ``=`` of padding unless ``padding``
    is false. ``+``, ``/``, whitespace and an impossible length raise :class:`ValueError`."""
    body = text.rstrip("=") if padding and len(text) - len(text.rstrip("=")) <= 2 else text
    if not _B64URL_RE.fullmatch(body):
        raise ValueError("is not base64url text")
    if len(body) % 4 == 1:
        raise ValueError(f"has an impossible base64url length ({len(body)} characters)")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
