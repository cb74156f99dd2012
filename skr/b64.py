"""base64url as JOSE writes it (RFC 7515 §2, RFC 4648 §5): the one encoder and the one strict decoder; and
standard base64 as Go's ``base64.StdEncoding`` reads it.

Pure functions, no I/O. The decoder raises :class:`ValueError` with the reason (never the value); each
caller turns it into its own error naming the field (a 400, a refused key, a refused token).
"""

from __future__ import annotations

import base64
import re

__all__ = ["b64url_decode", "b64url_encode", "b64url_uint", "go_std_b64decode"]

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


def go_std_b64decode(text: str) -> bytes:
    """Strict standard base64 with padding, CR and LF ignored: exactly Go's ``base64.StdEncoding``.
    Anything else raises :class:`ValueError` (``binascii.Error``)."""
    return base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)
