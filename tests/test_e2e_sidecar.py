"""The sidecar end to end through `skr local`: real SDKs, real HTTPS, virtual TEE; nothing mocked.

One local stack serves the whole module (its key generation is the expensive part).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from skr.audit import verify_chain
from skr.openapi import document
from skr.snp.hostdata import host_data_of_policy
from tests.e2e import b64, bound_policy, expected_ec_jwk, expected_rsa_jwk, post, stack_session

pytestmark = pytest.mark.asyncio(loop_scope="module")


# --- compatible success bodies ------------------------------------------------------------------------


async def test_status_is_exactly_the_go_body(env):
    _, client = env
    async with client.get("/status") as resp:
        assert resp.status == 200
        assert await resp.read() == b'{"message":"Status OK"}'
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"


async def test_readyz_reports_the_self_check(env):
    stack, client = env
    async with client.get("/readyz") as resp:
        body = await resp.json()
    assert resp.status == 200 and body["ready"] is True
    assert body["checks"]["host_data"] == stack.info["host_data"]
    assert body["checks"]["policy_hash"] == "ok"
    # readiness does not flap while the next wrapping key is being generated after a release
    assert (await post(client, "/key/release", {"kid": "demo-oct"}))[0] == 200
    async with client.get("/readyz") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("name", ["demo-oct", "demo-rsa", "demo-ec"])
async def test_demo_keys_release_as_a_jwk_string(env, name):
    _, client = env
    status, body = await post(client, "/key/release", {"kid": name})
    assert status == 200, body
    assert set(body) == {"key"} and isinstance(body["key"], str)
    jwk = json.loads(body["key"])
    assert body["key"] == json.dumps(jwk, sort_keys=True, separators=(",", ":"))
    assert jwk["kty"] in ("oct", "RSA", "EC") and "kid" not in jwk


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: os.urandom(32), id="oct-256"),
        pytest.param(lambda: os.urandom(16), id="oct-128"),
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), id="rsa-2048"),
        pytest.param(lambda: rsa.generate_private_key(65537, 3072), id="rsa-3072"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="ec-p256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
    ],
)
async def test_release_returns_the_imported_key_material(env, make, request):
    stack, client = env
    key = make()
    name = "imported-" + request.node.callspec.id
    await stack.key_service.import_key(name, key, release_policy=bound_policy(stack))
    status, body = await post(client, "/key/release", {"kid": name})
    assert status == 200, body
    jwk = json.loads(body["key"])
    if isinstance(key, bytes):
        assert jwk["kty"] == "oct"
        assert base64.urlsafe_b64decode(jwk["k"] + "==") == key
    elif isinstance(key, rsa.RSAPrivateKey):
        assert {k: jwk[k] for k in expected_rsa_jwk(key)} == expected_rsa_jwk(key)
    else:
        assert {k: jwk[k] for k in expected_ec_jwk(key)} == expected_ec_jwk(key)
    assert isinstance(jwk.get("key_ops"), list)


async def test_release_by_name_and_version(env):
    stack, client = env
    version = await stack.key_service.import_key(
        "versioned", os.urandom(32), release_policy=bound_policy(stack)
    )
    status, body = await post(client, "/key/release", {"kid": f"versioned/{version.version}"})
    assert status == 200, body


async def test_attest_raw_binds_runtime_data(env):
    _, client = env
    runtime = b'{"nonce":"abc"}'
    status, body = await post(client, "/attest/raw", {"runtime_data": b64(runtime)})
    assert status == 200
    report = bytes.fromhex(body["report"])
    assert len(report) == 1184 and body["report"] == body["report"].lower()
    assert report[0x50:0x90] == hashlib.sha256(runtime).digest() + bytes(32)


async def test_attest_combined_fields_in_go_order(env):
    stack, client = env
    status, body = await post(client, "/attest/combined", {"runtime_data": b64(b"x")})
    assert status == 200
    assert list(body) == ["endorsed_tcb", "endorsements", "evidence", "uvm_endorsements"]
    assert base64.b64decode(body["endorsements"]).startswith(b"-----BEGIN CERTIFICATE-----")
    report = base64.b64decode(body["evidence"])
    assert report[0xC0:0xE0].hex() == stack.info["host_data"]
    assert body["endorsed_tcb"] == f"{int.from_bytes(report[0x180:0x188], 'little'):016x}"


async def test_attest_maa_token_carries_host_data_and_runtime_keys(env):
    stack, client = env
    runtime = json.dumps({"keys": [{"kid": "app", "kty": "oct"}]}).encode()
    status, body = await post(client, "/attest/maa", {"runtime_data": b64(runtime)})
    assert status == 200
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["x-ms-sevsnpvm-hostdata"] == stack.info["host_data"]
    assert claims["x-ms-runtime"] == json.loads(runtime)
    assert claims["iss"] == stack.info["attestation_url"]


async def test_body_is_parsed_whatever_the_content_type(env):
    _, client = env
    body = json.dumps({"runtime_data": b64(b"curl -d")})
    async with client.post(
        "/attest/raw", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    ) as resp:
        assert resp.status == 200


# --- errors -------------------------------------------------------------------------------------------


def _assert_error(status, body, expected_status, code=None):
    assert status == expected_status, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["code"], str) and body["code"].islower()
    assert isinstance(body["request_id"], str) and body["request_id"]
    if code:
        assert body["code"] == code


async def test_denied_key_names_the_failing_claim(env):
    _, client = env
    status, body = await post(client, "/key/release", {"kid": "demo-denied"})
    _assert_error(status, body, 403, "release_denied")
    assert "x-ms-sevsnpvm-hostdata" in body["error"]


async def test_unknown_key_is_404(env):
    _, client = env
    status, body = await post(client, "/key/release", {"kid": "no-such-key"})
    _assert_error(status, body, 404, "key_not_found")


async def test_foreign_vault_is_refused_before_any_connection(env):
    _, client = env
    accepted: list[str] = []

    def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append("connection")
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, body = await post(
            client, "/key/release", {"kid": "demo-oct", "akv_endpoint": f"127.0.0.1:{port}"}
        )
        _assert_error(status, body, 403, "endpoint_not_allowed")
        status, body = await post(
            client, "/attest/maa", {"runtime_data": b64(b"{}"), "maa_endpoint": f"https://127.0.0.1:{port}"}
        )
        _assert_error(status, body, 403, "endpoint_not_allowed")
        await asyncio.sleep(0.1)
        assert accepted == []
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/key/release", b"", "invalid_json"),
        ("/key/release", b"{not json", "invalid_json"),
        ("/key/release", b"[1,2]", "invalid_json"),
        ("/key/release", {}, "missing_field"),
        ("/key/release", {"kid": ""}, "missing_field"),
        ("/key/release", {"kid": None}, "missing_field"),
        ("/key/release", {"kid": 7}, "invalid_field"),
        ("/key/release", {"kid": "../secret"}, "invalid_kid"),
        ("/key/release", {"kid": "a%2Fb"}, "invalid_kid"),
        ("/key/release", {"kid": "a\r\nb"}, "invalid_kid"),
        ("/key/release", {"kid": "clé"}, "invalid_kid"),
        ("/key/release", {"kid": "demo-oct", "akv_endpoint": "http://127.0.0.1:1"}, None),
        ("/key/release", {"kid": "demo-oct", "akv_endpoint": "user@host.vault.azure.net"}, None),
        ("/key/release", {"kid": "demo-oct", "maa_endpoint": "a.attest.azure.net/path"}, None),
        ("/attest/raw", {"runtime_data": "not base64!"}, "invalid_base64"),
        ("/attest/raw", {"runtime_data": "YWJj-_=="}, "invalid_base64"),
        ("/attest/raw", {"runtime_data": "YWJjZA"}, "invalid_base64"),
        ("/attest/raw", {}, "missing_field"),
        ("/attest/combined", {"runtime_data": 5}, "invalid_field"),
        ("/attest/maa", {"runtime_data": ""}, "missing_field"),
    ],
)
async def test_bad_input_is_a_400_json_error(env, path, body, code):
    _, client = env
    status, doc = await post(client, path, body)
    _assert_error(status, doc, 400, code)


async def test_unknown_path_and_method_are_json_errors(env):
    _, client = env
    async with client.get("/nope") as resp:
        _assert_error(resp.status, await resp.json(), 404, "not_found")
    async with client.get("/key/release") as resp:
        _assert_error(resp.status, await resp.json(), 405, "method_not_allowed")


async def test_huge_body_is_413(env):
    _, client = env
    status, body = await post(client, "/key/release", {"kid": "x" * 70_000})
    _assert_error(status, body, 413, "payload_too_large")


async def test_request_id_is_echoed(env):
    _, client = env
    async with client.post("/key/release", data="{}", headers={"X-Request-Id": "abc-123"}) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"
        assert (await resp.json())["request_id"] == "abc-123"


# --- caching and concurrency --------------------------------------------------------------------------


async def test_concurrent_releases_share_one_attestation(tmp_path):
    async for stack, client in stack_session(tmp_path):
        before = stack.faults.count("maa.attest")
        results = await asyncio.gather(
            *(post(client, "/key/release", {"kid": "demo-oct"}) for _ in range(50))
        )
        assert all(status == 200 for status, _ in results)
        assert stack.faults.count("maa.attest") - before == 1
        assert len({body["key"] for _, body in results}) == 1
        # warm: the next release needs exactly one upstream call (Key Vault)
        calls = sum(stack.faults.requests.values())
        assert (await post(client, "/key/release", {"kid": "demo-oct"}))[0] == 200
        assert sum(stack.faults.requests.values()) - calls == 1


async def test_token_reuse_off_attests_every_release(tmp_path):
    async for stack, client in stack_session(tmp_path, token_reuse=False):
        for _ in range(3):
            assert (await post(client, "/key/release", {"kid": "demo-ec"}))[0] == 200
        assert stack.faults.count("maa.attest") == 3


# --- OpenAPI and metrics ------------------------------------------------------------------------------


async def test_openapi_documents_every_route(env):
    stack, client = env
    async with client.get("/openapi.json") as resp:
        doc = await resp.json()
    assert doc == document() and doc["openapi"].startswith("3.1")
    app_routes = {
        (r.method.lower(), r.resource.canonical)
        for r in stack.runtime.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert app_routes == documented


async def test_metrics_count_releases(env):
    _, client = env
    await post(client, "/key/release", {"kid": "demo-oct"})
    async with client.get("/metrics") as resp:
        text = await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'skr_key_releases_total{outcome="granted"}' in text
    assert 'skr_http_requests_total{route="/key/release",status="200"}' in text


# --- audit --------------------------------------------------------------------------------------------


async def test_audit_log_of_the_run_verifies_and_holds_no_secrets(env):
    stack, client = env
    status, body = await post(client, "/key/release", {"kid": "demo-oct"})
    assert status == 200
    key = json.loads(body["key"])["k"]
    path = stack.options.audit_log
    assert verify_chain([path]).intact
    text = path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    granted = [r for r in records if r["event"] == "key.release" and r["outcome"] == "granted"]
    assert granted and granted[-1]["kid"] == "demo-oct"
    assert granted[-1]["host_data"] == stack.info["host_data"]
    assert any(r.get("outcome") == "denied" and r["kid"] == "demo-denied" for r in records)
    assert key not in text and base64.urlsafe_b64decode(key + "==").hex() not in text
    # no JWT anywhere: a compact JWS is base64url '{"…' + '.' + …; checkpoint evidence (standard base64 of
    # a report, PEM) may contain the letters "eyJ" by chance but never a '.' inside one value
    assert re.search(r"eyJ[\w-]*\.[\w-]+\.", text) is None


async def test_virtual_tee_host_data_is_the_demo_policy_hash(env):
    from skr.local.demo import DEMO_SECURITY_POLICY

    stack, _ = env
    assert stack.info["host_data"] == host_data_of_policy(DEMO_SECURITY_POLICY).hex()


async def test_attest_maa_never_returns_a_forged_or_foreign_token(tmp_path):
    """/attest/maa hands the token to the app as proof, so it is verified against the endpoint first."""
    from skr.local.faults import FaultRule

    async for stack, client in stack_session(tmp_path):
        for mutation in ("wrong_issuer", "resign_jws"):
            stack.faults.add(FaultRule("maa.attest", "mutate", mutation=mutation, times=1))
            status, body = await post(client, "/attest/maa", {"runtime_data": b64(b'{"a":1}')})
            _assert_error(status, body, 502)
            assert body["code"].startswith("token_") and "token" not in body
        status, body = await post(client, "/attest/maa", {"runtime_data": b64(b'{"a":1}')})
        assert status == 200 and body["token"].count(".") == 2
