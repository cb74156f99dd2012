"""The ★ binding: every MAA token names the audit log's head, and Key Vault still finds the wrapping key."""

from __future__ import annotations

import base64
import json

from skr.akv.jws import open_release
from skr.akv.keywrap import Enc
from skr.endpoints import KeyRef, parse_endpoint
from skr.maa.runtime import AuditHead, WrappingKey
from skr.maa.token import unverified_claims
from tests.test_akv_release import releaser  # noqa: F401 - the releaser fixture against the local stack

HEAD = AuditHead(seq=42, head="ab" * 32, instance="0123456789abcdef")


def _b64url_int(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_runtime_data_names_the_audit_head_next_to_keys_byte_exactly(wrapping_key: WrappingKey):
    numbers = wrapping_key.public_key.public_numbers()
    jwk = {
        "e": _b64url_int(numbers.e),
        "key_ops": ["encrypt"],
        "kid": wrapping_key.kid,
        "kty": "RSA",
        "n": _b64url_int(numbers.n),
    }
    audit = {"head": HEAD.head, "instance": HEAD.instance, "seq": HEAD.seq}
    expected = json.dumps({"keys": [jwk], "skr-audit": audit}, sort_keys=True, separators=(",", ":"))
    assert wrapping_key.runtime_data(HEAD) == expected.encode()
    # without an audit log: exactly the Go sidecar's bytes, as before
    assert (
        wrapping_key.runtime_data()
        == json.dumps({"keys": [jwk]}, sort_keys=True, separators=(",", ":")).encode()
    )


async def test_key_vault_still_finds_the_wrapping_key_when_the_runtime_data_names_the_head(
    stack,
    releaser,  # noqa: F811 - the imported fixture
    wrapping_key,
):
    key = await stack.hsm.create_key("oct", kty="oct-HSM", size=256, release_policy=stack.policy())
    token = await stack.target_token(wrapping_key, runtime_data=wrapping_key.runtime_data(HEAD))
    runtime = unverified_claims(token)["x-ms-runtime"]
    assert runtime["skr-audit"] == {"head": HEAD.head, "instance": HEAD.instance, "seq": HEAD.seq}
    result = await releaser.release(
        KeyRef.parse("oct", vault=stack.hsm_host), token, enc=Enc.CKM_RSA_AES_KEY_WRAP
    )
    opened = open_release(
        result.jws,
        host=parse_endpoint(stack.hsm_host),
        trust=stack.trust(),
        wrapping_key=wrapping_key.private_key,
        expected_wrapping_kid=wrapping_key.kid,
    )
    assert opened.jwk["k"] == key.material["k"]
