"""The confidential-computing security policy and the HOST_DATA it is bound to.

On ACI, HOST_DATA (report offset 0xC0) is SHA-256 of the raw CCE policy text (Rego); the security
context carries that text base64-encoded (``security-policy-base64``). Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from skr.errors import BadRequest


def decode_cce_policy(data: bytes) -> bytes:
    """The raw policy text from either its base64 form (as ACI ships it) or the raw Rego itself.

    Base64 is recognised only when the whole input decodes strictly to UTF-8 text; raw Rego
    (which contains spaces, newlines and punctuation outside the alphabet) never does.
    """
    stripped = b"".join(data.split())
    if not stripped:
        raise BadRequest("the security policy is empty")
    try:
        decoded = base64.b64decode(stripped, validate=True)
        decoded.decode("utf-8")
    except (binascii.Error, ValueError):
        return data
    return decoded if decoded else data


def host_data_of_policy(policy: bytes) -> bytes:
    """HOST_DATA for a CCE policy given in base64 or raw form: SHA-256 of the raw text."""
    return hashlib.sha256(decode_cce_policy(policy)).digest()


def trailing_whitespace(policy: bytes) -> bytes:
    """The whitespace a *raw* policy file ends in (``b""`` if none, or if the file is base64).

    ``acipolicygen --outraw`` output saved by a shell ends in a newline that the deployed policy (the
    base64 in the template) does not have, so hashing the file gives another HOST_DATA. The base64 form
    is exactly what was deployed, whatever its decoded text ends in.
    """
    if decode_cce_policy(policy) != policy:
        return b""
    return policy[len(policy.rstrip()) :]


def strip_policy(policy: bytes) -> bytes:
    """The raw policy text without trailing whitespace (from its base64 or raw form)."""
    return decode_cce_policy(policy).rstrip()
