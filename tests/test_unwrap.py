"""``POST /key/unwrap`` end to end on the local stack: the key is released inside the sidecar, only the
plaintext comes back. Ciphertexts are made here with ``cryptography`` (independent of skr's code), and every
response is scanned for the key's material in every encoding a leak could take.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from skr.keyprovider.algorithms import SUPPORTED_ALGORITHMS
from skr.service import KEPT_KEY_NOTE
from tests.e2e import b64, bound_policy, post
from tests.kvstack import OTHER_HOST_DATA
from tests.sidecars import audit_records

pytestmark = pytest.mark.asyncio(loop_scope="module")

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

OAEP = {
    "RSA-OAEP-256": padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    "RSA-OAEP": padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 3072)


def encodings(secret: bytes) -> list[bytes]:
    """How key material could show up in a body: raw, hex, base64 and base64url (padded or not)."""
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]
    forms.append(base64.urlsafe_b64encode(secret).rstrip(b"="))
    return [f[:24] for f in forms]  # any 24-byte run of the encoding is enough to call it a leak


def rsa_material(key: rsa.RSAPrivateKey) -> list[bytes]:
    n = key.private_numbers()
    values = (n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp)
    return [e for v in values for e in encodings(v.to_bytes((v.bit_length() + 7) // 8, "big"))]


async def unwrap(client, body, request_id):
    async with client.post("/key/unwrap", json=body, headers={"X-Request-Id": request_id}) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA-OAEP"])
async def test_rsa_unwrap_returns_only_the_plaintext(env, rsa_key, alg):
    stack, client = env
    await stack.key_service.import_key("rsa-unwrap", rsa_key, release_policy=bound_policy(stack))
    secret = os.urandom(48)
    wrapped = rsa_key.public_key().encrypt(secret, OAEP[alg])
    status, raw = await unwrap(
        client, {"kid": "rsa-unwrap", "wrapped_data": b64(wrapped), "alg": alg}, f"rsa-{alg}"
    )
    assert status == 200, raw
    assert raw == b'{"plaintext":"' + base64.b64encode(secret) + b'"}'
    for leak in rsa_material(rsa_key):
        assert leak not in raw
    [record] = audit_records(stack.options.audit_log, f"rsa-{alg}")
    assert (record["event"], record["outcome"], record["kid"]) == ("key.unwrap", "granted", "rsa-unwrap")


@pytest.mark.parametrize(("alg", "size"), [("A256KW", 32), ("A192KW", 24), ("A128KW", 16)])
async def test_oct_unwrap_with_aes_key_wrap(env, alg, size):
    stack, client = env
    kek = os.urandom(size)
    name = f"oct-{size * 8}"
    await stack.key_service.import_key(name, kek, release_policy=bound_policy(stack))
    secret = os.urandom(32)
    status, raw = await unwrap(
        client, {"kid": name, "wrapped_data": b64(aes_key_wrap(kek, secret)), "alg": alg}, name
    )
    assert status == 200, raw
    assert raw == b'{"plaintext":"' + base64.b64encode(secret) + b'"}'
    for leak in encodings(kek):
        assert leak[: min(len(leak), 16)] not in raw


async def test_the_key_is_kept_in_memory_for_the_next_unwrap(env):
    stack, client = env
    kek = os.urandom(32)
    await stack.key_service.import_key("kept-oct", kek, release_policy=bound_policy(stack))
    calls = stack.runtime.metrics.upstream_calls
    before = calls.value(service="akv")
    for request_id in ("kept-a", "kept-b", "kept-c"):
        body = {"kid": "kept-oct", "wrapped_data": b64(aes_key_wrap(kek, os.urandom(16))), "alg": "A256KW"}
        assert (await unwrap(client, body, request_id))[0] == 200
    assert calls.value(service="akv") == before + 1
    records = [audit_records(stack.options.audit_log, r)[0] for r in ("kept-a", "kept-b", "kept-c")]
    assert [r.get("note") for r in records] == [None, KEPT_KEY_NOTE, KEPT_KEY_NOTE]
    # the records of kept-key unwraps name the attestation the key was released under
    assert len({(r["token_sha256"], r["host_data"], r["key_version"]) for r in records}) == 1


async def test_a_kept_key_that_no_longer_decrypts_is_released_again_once(env):
    stack, client = env
    old, new = os.urandom(32), os.urandom(32)
    await stack.key_service.import_key("rotating", old, release_policy=bound_policy(stack))
    first = {"kid": "rotating", "wrapped_data": b64(aes_key_wrap(old, os.urandom(16))), "alg": "A256KW"}
    assert (await unwrap(client, first, "rot-1"))[0] == 200
    await stack.key_service.import_key("rotating", new, release_policy=bound_policy(stack))  # a new version
    secret = os.urandom(16)
    second = {"kid": "rotating", "wrapped_data": b64(aes_key_wrap(new, secret)), "alg": "A256KW"}
    status, raw = await unwrap(client, second, "rot-2")
    assert (status, raw) == (200, b'{"plaintext":"' + base64.b64encode(secret) + b'"}')
    [one], [two] = (
        audit_records(stack.options.audit_log, "rot-1"),
        audit_records(stack.options.audit_log, "rot-2"),
    )
    assert "note" not in two and two["key_version"] != one["key_version"]
    # and data for no version of the key is still a clean 400 after one more release
    third = {"kid": "rotating", "wrapped_data": b64(aes_key_wrap(os.urandom(32), secret)), "alg": "A256KW"}
    got, doc = await post(client, "/key/unwrap", third)
    assert (got, doc["code"]) == (400, "unwrap_failed")


async def test_key_release_still_never_keeps_a_key(env):
    stack, client = env
    calls = stack.runtime.metrics.upstream_calls
    before = calls.value(service="akv")
    for _ in range(2):
        assert (await post(client, "/key/release", {"kid": "demo-oct"}))[0] == 200
    assert calls.value(service="akv") == before + 2


async def test_a_key_bound_to_another_host_data_is_403(env, rsa_key):
    stack, client = env
    await stack.key_service.import_key(
        "rsa-elsewhere", rsa_key, release_policy=bound_policy(stack, OTHER_HOST_DATA)
    )
    wrapped = rsa_key.public_key().encrypt(b"x", OAEP["RSA-OAEP-256"])
    body = {"kid": "rsa-elsewhere", "wrapped_data": b64(wrapped), "alg": "RSA-OAEP-256"}
    status, doc = await post(client, "/key/unwrap", body, headers={"X-Request-Id": "denied-u"})
    assert status == 403 and doc["code"] == "release_denied"
    [record] = audit_records(stack.options.audit_log, "denied-u")
    assert (record["event"], record["outcome"]) == ("key.unwrap", "denied")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"kid": "demo-rsa", "wrapped_data": "AAAA", "alg": "RSA1_5"}, 400, "unsupported_alg"),
        ({"kid": "demo-rsa", "wrapped_data": "AAAA", "alg": "A256GCM"}, 400, "unsupported_alg"),
        ({"kid": "demo-rsa", "wrapped_data": "AAAA"}, 400, "missing_field"),
        ({"kid": "demo-rsa", "alg": "RSA-OAEP-256"}, 400, "missing_field"),
        ({"kid": "demo-rsa", "wrapped_data": "AA-_", "alg": "RSA-OAEP-256"}, 400, "invalid_base64"),
        ({"kid": "demo-rsa", "wrapped_data": "AAAA", "alg": "RSA-OAEP-256"}, 400, "unwrap_failed"),
        ({"kid": "demo-oct", "wrapped_data": "AAAA", "alg": "RSA-OAEP-256"}, 400, "key_type_mismatch"),
        ({"kid": "demo-rsa", "wrapped_data": "AAAA", "alg": "A256KW"}, 400, "key_type_mismatch"),
        ({"kid": "no-such-key", "wrapped_data": "AAAA", "alg": "A256KW"}, 404, "key_not_found"),
        (
            {"kid": "demo-rsa", "wrapped_data": "AAAA", "alg": "A256KW", "akv_endpoint": "x.example"},
            403,
            "endpoint_not_allowed",
        ),
    ],
)
async def test_bad_requests_get_the_error_model(env, body, status, code):
    _, client = env
    got, doc = await post(client, "/key/unwrap", body)
    assert (got, doc["code"]) == (status, code), doc
    assert set(doc) <= {"error", "code", "request_id", "hint"} and "\n" not in doc["error"]


async def test_the_readme_lists_every_supported_algorithm():
    section = README[README.index("/key/unwrap") :]
    for alg in SUPPORTED_ALGORITHMS:
        assert f"`{alg}`" in section
