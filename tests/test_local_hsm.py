"""The local key service speaks the Managed HSM data plane: the real azure-keyvault-keys SDK creates,
imports and releases keys against it over HTTPS, with tokens the real azure-identity
ManagedIdentityCredential gets from the local identity service and target tokens from the local
attestation service with virtual-TEE evidence.

The shared stack lives in tests/kvstack.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from azure.core.exceptions import HttpResponseError
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.keys import JsonWebKey, KeyReleasePolicy
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from skr.akv.jws import open_release
from skr.akv.keywrap import Enc
from skr.akv.release import vault_error
from skr.endpoints import parse_endpoint
from skr.evidence.base import report_data_for
from skr.local.attestation import LocalAttestationService
from skr.local.faults import FaultRule
from skr.maa.client import MaaClient
from skr.maa.runtime import WrappingKey
from tests.kvstack import HSM_RESOURCE, OTHER_HOST_DATA, TENANT, Stack, point_imds_at, serve


@pytest.fixture
async def mi_credential(
    monkeypatch: pytest.MonkeyPatch, stack: Stack
) -> AsyncIterator[ManagedIdentityCredential]:
    point_imds_at(monkeypatch, stack.identity_url)
    credential = ManagedIdentityCredential(connection_verify=stack.ca_pem)
    yield credential
    await credential.close()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_jwk(key: rsa.RSAPrivateKey) -> JsonWebKey:
    n = key.private_numbers()

    def raw(value: int) -> bytes:
        return value.to_bytes((value.bit_length() + 7) // 8, "big")

    return JsonWebKey(
        kty="RSA-HSM",
        n=raw(n.public_numbers.n),
        e=raw(n.public_numbers.e),
        d=raw(n.d),
        p=raw(n.p),
        q=raw(n.q),
        dp=raw(n.dmp1),
        dq=raw(n.dmq1),
        qi=raw(n.iqmp),
    )


def ec_jwk(key: ec.EllipticCurvePrivateKey, crv: str) -> JsonWebKey:
    size = (key.curve.key_size + 7) // 8
    n = key.private_numbers()
    return JsonWebKey(
        kty="EC-HSM",
        crv=crv,
        x=n.public_numbers.x.to_bytes(size, "big"),
        y=n.public_numbers.y.to_bytes(size, "big"),
        d=n.private_value.to_bytes(size, "big"),
    )


async def release_raw(
    stack: Stack, path: str, body: Any, *, bearer: str | None = None
) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return await stack.session.post(
        f"{stack.hsm_url}{path}", json=body, headers=headers, ssl=stack.ca.client_ssl_context()
    )


# --- create and import through the real SDK ----------------------------------------------------------


async def test_sdk_creates_rsa_key_with_release_policy_after_a_401_challenge(stack, mi_credential):
    policy = stack.policy()
    async with stack.key_client(mi_credential) as client:
        key = await client.create_rsa_key(
            "rsa-key",
            size=2048,
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(policy),
        )
    assert ("POST", "/keys/rsa-key/create") in stack.hsm.challenged  # the SDK's unauthenticated first try
    assert key.key_type == "RSA-HSM" and key.properties.exportable is True
    assert key.properties.release_policy is not None
    assert json.loads(key.properties.release_policy.encoded_policy) == json.loads(policy)
    assert len(key.properties.version) == 32 and int(key.properties.version, 16) >= 0
    assert key.id == f"{stack.hsm_url}/keys/rsa-key/{key.properties.version}"
    assert len(key.key.n) == 256


@pytest.mark.parametrize(
    ("kind", "kwargs", "expected_kty"),
    [
        ("oct", {"size": 128}, "oct-HSM"),
        ("oct", {"size": 256}, "oct-HSM"),
        ("ec", {"curve": "P-256"}, "EC-HSM"),
        ("ec", {"curve": "P-384"}, "EC-HSM"),
        ("ec", {"curve": "P-521"}, "EC-HSM"),
        ("ec", {"curve": "P-256K"}, "EC-HSM"),
    ],
)
async def test_sdk_creates_oct_and_ec_keys(stack, mi_credential, kind, kwargs, expected_kty):
    create = {"oct": "create_oct_key", "ec": "create_ec_key"}[kind]
    async with stack.key_client(mi_credential) as client:
        key = await getattr(client, create)(
            f"{kind}-key",
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(stack.policy()),
            **kwargs,
        )
        fetched = await client.get_key(f"{kind}-key")
    assert key.key_type == expected_kty and fetched.id == key.id
    if kind == "ec":
        assert fetched.key.crv == kwargs["curve"]
    else:
        assert fetched.key.k is None  # the secret never leaves except wrapped


async def test_unsupported_sizes_are_bad_parameter(stack, mi_credential):
    async with stack.key_client(mi_credential) as client:
        with pytest.raises(HttpResponseError) as info:
            await client.create_rsa_key(
                "k",
                size=1024,
                hardware_protected=True,
                exportable=True,
                release_policy=KeyReleasePolicy(stack.policy()),
            )
    assert info.value.status_code == 400 and vault_error(info.value).code == "BadParameter"


async def test_exportable_key_without_policy_is_akv_skr_1004(stack, mi_credential):
    async with stack.key_client(mi_credential) as client:
        with pytest.raises(HttpResponseError) as info:
            await client.create_rsa_key("k", size=2048, hardware_protected=True, exportable=True)
    assert info.value.status_code == 400 and vault_error(info.value).code == "BadParameter"
    assert "AKV.SKR.1004: Exportable keys must have release policy." in info.value.message


async def test_non_exportable_key_with_policy_is_akv_skr_1005(stack, mi_credential):
    async with stack.key_client(mi_credential) as client:
        with pytest.raises(HttpResponseError) as info:
            await client.create_ec_key(
                "k", curve="P-256", hardware_protected=True, release_policy=KeyReleasePolicy(stack.policy())
            )
    assert info.value.status_code == 400
    assert "AKV.SKR.1005: Non-exportable keys must not have release policy." in info.value.message


async def test_immutable_policy_cannot_change_akv_skr_1020(stack, mi_credential):
    immutable = KeyReleasePolicy(stack.policy(), immutable=True)
    other = KeyReleasePolicy(stack.policy(host_data=OTHER_HOST_DATA))
    async with stack.key_client(mi_credential) as client:
        key = await client.create_oct_key(
            "locked", size=256, hardware_protected=True, exportable=True, release_policy=immutable
        )
        assert key.properties.release_policy.immutable is True
        with pytest.raises(HttpResponseError) as new_version:
            await client.create_oct_key(
                "locked", size=256, hardware_protected=True, exportable=True, release_policy=other
            )
        with pytest.raises(HttpResponseError) as update:
            await client.update_key_properties("locked", key.properties.version, release_policy=other)
        same = await client.create_oct_key(
            "locked", size=256, hardware_protected=True, exportable=True, release_policy=immutable
        )
    for info in (new_version, update):
        assert info.value.status_code == 400
        assert "AKV.SKR.1020: Immutable Key Release Policy cannot be modified." in info.value.message
    assert same.properties.version != key.properties.version


async def test_mutable_policy_can_be_updated(stack, mi_credential):
    async with stack.key_client(mi_credential) as client:
        key = await client.create_oct_key(
            "soft",
            size=256,
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(stack.policy()),
        )
        changed = stack.policy(host_data=OTHER_HOST_DATA)
        updated = await client.update_key_properties(
            "soft", key.properties.version, release_policy=KeyReleasePolicy(changed)
        )
    assert json.loads(updated.properties.release_policy.encoded_policy) == json.loads(changed)


async def test_malformed_release_policy_is_bad_parameter(stack, mi_credential):
    async with stack.key_client(mi_credential) as client:
        with pytest.raises(HttpResponseError) as info:
            await client.create_oct_key(
                "k",
                size=256,
                hardware_protected=True,
                exportable=True,
                release_policy=KeyReleasePolicy(b'{"anyOf": 3}'),
            )
    assert info.value.status_code == 400 and "Key Release Policy" in info.value.message


# --- release end to end ------------------------------------------------------------------------------


async def test_imported_rsa_key_is_released_wrapped_to_the_attested_key(stack, mi_credential, wrapping_key):
    target = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with stack.key_client(mi_credential) as client:
        imported = await client.import_key(
            "imported-rsa",
            rsa_jwk(target),
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(stack.policy()),
        )
        token = await stack.target_token(wrapping_key)
        result = await client.release_key("imported-rsa", token)
    opened = open_release(
        result.value,
        host=parse_endpoint("127.0.0.1"),
        trust=stack.trust(),
        wrapping_key=wrapping_key.private_key,
        expected_wrapping_kid=wrapping_key.kid,
    )
    assert opened.enc is Enc.CKM_RSA_AES_KEY_WRAP and opened.kty == "RSA-HSM"
    assert opened.key_id == imported.id
    numbers = target.private_numbers()
    assert int.from_bytes(base64.urlsafe_b64decode(opened.jwk["d"] + "=="), "big") == numbers.d
    assert opened.jwk["n"] == b64url(numbers.public_numbers.n.to_bytes(256, "big"))


@pytest.mark.parametrize("enc", list(Enc))
async def test_release_payload_has_the_azure_shape(stack, mi_credential, wrapping_key, enc):
    secret = os.urandom(32)
    async with stack.key_client(mi_credential) as client:
        key = await client.import_key(
            "aes",
            JsonWebKey(kty="oct-HSM", k=secret),
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(stack.policy()),
        )
        token = await stack.target_token(wrapping_key)
        result = await client.release_key("aes", token, version=key.properties.version, algorithm=enc.value)
    header_b64, payload_b64, _ = result.value.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    assert header["alg"] == "RS256" and header["kid"] == header["x5t#S256"] and len(header["x5c"]) == 2
    assert payload["request"] == {"api-version": "2025-07-01", "enc": enc.value, "kid": key.id}
    released = payload["response"]["key"]
    assert set(released) == {"key", "attributes", "release_policy"}
    assert set(released["key"]) == {"kid", "kty", "key_ops", "key_hsm"}
    assert released["attributes"]["exportable"] is True and released["attributes"]["enabled"] is True
    policy = base64.urlsafe_b64decode(released["release_policy"]["data"] + "==")
    assert json.loads(policy) == json.loads(stack.policy())
    assert released["release_policy"]["contentType"] == "application/json; charset=utf-8"
    opened = open_release(
        result.value,
        host=parse_endpoint("127.0.0.1"),
        trust=stack.trust(),
        wrapping_key=wrapping_key.private_key,
    )
    assert opened.enc is enc and opened.jwk["k"] == b64url(secret)


@pytest.mark.parametrize(
    ("curve", "crv"), [(ec.SECP256R1(), "P-256"), (ec.SECP384R1(), "P-384"), (ec.SECP521R1(), "P-521")]
)
async def test_imported_ec_key_round_trips(stack, mi_credential, wrapping_key, curve, crv):
    target = ec.generate_private_key(curve)
    async with stack.key_client(mi_credential) as client:
        await client.import_key(
            "ec",
            ec_jwk(target, crv),
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(stack.policy()),
        )
        result = await client.release_key("ec", await stack.target_token(wrapping_key))
    opened = open_release(
        result.value,
        host=parse_endpoint("127.0.0.1"),
        trust=stack.trust(),
        wrapping_key=wrapping_key.private_key,
    )
    assert opened.jwk["crv"] == crv
    d = int.from_bytes(base64.urlsafe_b64decode(opened.jwk["d"] + "=="), "big")
    assert d == target.private_numbers().private_value


async def test_release_without_version_segment_is_the_latest_version(stack, wrapping_key):
    await stack.hsm.create_key("demo", kty="oct-HSM", size=256, release_policy=stack.policy())
    latest = await stack.hsm.create_key("demo", kty="oct-HSM", size=256, release_policy=stack.policy())
    token = await stack.target_token(wrapping_key)
    for path in ("/keys/demo/release", "/keys/demo//release"):
        resp = await release_raw(stack, f"{path}?api-version=7.4", {"target": token}, bearer=stack.bearer())
        assert resp.status == 200, await resp.text()
        opened = open_release(
            (await resp.json())["value"],
            host=parse_endpoint("127.0.0.1"),
            trust=stack.trust(),
            wrapping_key=wrapping_key.private_key,
        )
        assert opened.version == latest.version
        assert opened.jwk["k"] == latest.material["k"]


# --- refusals ----------------------------------------------------------------------------------------


async def test_missing_bearer_gets_the_azure_challenge_before_the_body_is_read(stack):
    resp = await release_raw(stack, "/keys/any//release?api-version=7.5", {"target": "x"})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="https://managedhsm.azure.net"'
    )
    assert "Server-Timing" in resp.headers


async def test_bearer_for_another_resource_is_challenged(stack):
    resp = await release_raw(
        stack,
        "/keys/any//release?api-version=7.5",
        {"target": "x"},
        bearer=stack.bearer("https://vault.azure.net"),
    )
    assert resp.status == 401 and "audience" in (await resp.json())["error"]["message"]


async def test_foreign_bearer_is_challenged(stack):
    forged = jwt.encode(
        {"aud": HSM_RESOURCE, "iss": stack.identity.issuer, "exp": int(time.time()) + 60, "iat": 0, "nbf": 0},
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
    )
    resp = await release_raw(stack, "/keys/any//release?api-version=7.5", {"target": "x"}, bearer=forged)
    assert resp.status == 401


async def test_wrong_host_data_is_403_naming_the_claim(stack, wrapping_key):
    await stack.hsm.create_key("other", kty="oct-HSM", release_policy=stack.policy(host_data=OTHER_HOST_DATA))
    token = await stack.target_token(wrapping_key)
    resp = await release_raw(
        stack, "/keys/other//release?api-version=7.5", {"target": token}, bearer=stack.bearer()
    )
    body = await resp.json()
    assert resp.status == 403
    assert body["error"]["code"] == "Forbidden" and body["error"]["innererror"] == {"code": "AccessDenied"}
    message = body["error"]["message"]
    assert (
        "x-ms-sevsnpvm-hostdata" in message
        and OTHER_HOST_DATA in message
        and stack.tee.host_data.hex() in message
    )


async def test_resigned_target_token_cannot_be_verified(stack, wrapping_key):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    token = await stack.target_token(wrapping_key)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    resigned = jwt.encode(
        claims,
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
        headers=header,
    )
    resp = await release_raw(
        stack, "/keys/k//release?api-version=7.5", {"target": resigned}, bearer=stack.bearer()
    )
    body = await resp.json()
    assert resp.status == 403
    assert body["error"]["message"].startswith("Target environment attestation statement cannot be verified.")


async def test_expired_target_token_cannot_be_verified(stack, wrapping_key):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    # the same attestation identity (state dir), with a clock nine hours behind: a genuine but expired token
    past = await LocalAttestationService.create(
        stack.state_dir / "maa",
        trusted_arks=[stack.tee.ark_certificate],
        uvm_signing_roots=[stack.ca.ca_certificate],
        clock=lambda: time.time() - 9 * 3600,
    )
    past.issuer = stack.maa_url
    runner, past_url = await serve(past.app, stack.ca)
    try:
        data = wrapping_key.runtime_data()
        evidence = await stack.tee.collect(report_data_for(data))
        token = await MaaClient(stack.session, ssl_context=stack.ca.client_ssl_context()).attest(
            parse_endpoint(past_url), evidence, data
        )
    finally:
        await runner.cleanup()
    resp = await release_raw(
        stack, "/keys/k//release?api-version=7.5", {"target": token}, bearer=stack.bearer()
    )
    body = await resp.json()
    assert resp.status == 403
    assert "cannot be verified" in body["error"]["message"] and "expired" in body["error"]["message"]


async def test_token_from_an_issuer_the_policy_does_not_name_is_refused_without_contacting_it(
    stack, wrapping_key
):
    await stack.hsm.create_key(
        "k", kty="oct-HSM", release_policy=stack.policy(authority="https://sharedeus.eus.attest.azure.net")
    )
    token = await stack.target_token(wrapping_key)
    resp = await release_raw(
        stack, "/keys/k//release?api-version=7.5", {"target": token}, bearer=stack.bearer()
    )
    body = await resp.json()
    assert resp.status == 403 and "matches no authority" in body["error"]["message"]


async def test_not_a_jwt_cannot_be_verified(stack):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    resp = await release_raw(
        stack, "/keys/k//release?api-version=7.5", {"target": "not-a-token"}, bearer=stack.bearer()
    )
    assert resp.status == 403


async def test_token_without_runtime_key_is_400(stack):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    token = await stack.target_token(WrappingKey.generate(), runtime_data=b'{"keys":[]}')
    resp = await release_raw(
        stack, "/keys/k//release?api-version=7.5", {"target": token}, bearer=stack.bearer()
    )
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "BadParameter"
    assert "x-ms-runtime.keys" in body["error"]["message"]


async def test_unknown_key_is_404_key_not_found(stack):
    resp = await release_raw(
        stack, "/keys/nope//release?api-version=7.5", {"target": "x"}, bearer=stack.bearer()
    )
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "KeyNotFound"


async def test_api_version_is_required(stack):
    resp = await release_raw(stack, "/keys/nope//release", {"target": "x"}, bearer=stack.bearer())
    assert resp.status == 400 and "api-version" in (await resp.json())["error"]["message"]


async def test_missing_target_and_unknown_enc_are_400(stack):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    for body in ({}, {"target": ""}, {"target": "x", "enc": "RSA1_5"}):
        resp = await release_raw(stack, "/keys/k//release?api-version=7.5", body, bearer=stack.bearer())
        assert resp.status == 400, body


async def test_oversized_body_is_413(stack):
    resp = await release_raw(
        stack, "/keys/k//release?api-version=7.5", {"target": "x" * 400_000}, bearer=stack.bearer()
    )
    assert resp.status == 413


async def test_fault_plan_can_corrupt_the_release_jws(stack, wrapping_key):
    from skr.errors import JwsError

    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    stack.faults.add(FaultRule(route="hsm.release", action="mutate", mutation="resign_jws", times=1))
    token = await stack.target_token(wrapping_key)
    resp = await release_raw(
        stack, "/keys/k//release?api-version=7.5", {"target": token}, bearer=stack.bearer()
    )
    with pytest.raises(JwsError, match="signature"):
        open_release(
            (await resp.json())["value"],
            host=parse_endpoint("127.0.0.1"),
            trust=stack.trust(),
            wrapping_key=wrapping_key.private_key,
        )
    assert stack.faults.count("hsm.release") == 1


# --- persistence -------------------------------------------------------------------------------------


async def test_keys_persist_across_restart_in_private_files(stack, wrapping_key):
    created = await stack.hsm.create_key("kept", kty="RSA-HSM", size=2048, release_policy=stack.policy())
    restarted = await asyncio.to_thread(stack.new_hsm)
    runner, url = await serve(restarted.app, stack.ca)
    try:
        token = await stack.target_token(wrapping_key)
        resp = await stack.session.post(
            f"{url}/keys/kept/{created.version}/release?api-version=7.5",
            json={"target": token},
            headers={"Authorization": f"Bearer {stack.bearer()}"},
            ssl=stack.ca.client_ssl_context(),
        )
        assert resp.status == 200
        opened = open_release(
            (await resp.json())["value"],
            host=parse_endpoint("127.0.0.1"),
            trust=stack.trust(),
            wrapping_key=wrapping_key.private_key,
        )
    finally:
        await runner.cleanup()
    assert opened.jwk["d"] == created.material["d"]
    keys_dir = stack.state_dir / "hsm" / "keys"
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    for path in keys_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert restarted.key_names == ("kept",)
    assert created.material["d"] not in repr(created)  # private material stays out of reprs


def test_release_policy_serialization_is_unpadded_base64url():
    from skr.local.keystore import StoredPolicy

    wire = StoredPolicy(b'{"version":"1.0.0"}', immutable=True).to_wire()
    assert "=" not in wire["data"] and wire["immutable"] is True
    assert base64.urlsafe_b64decode(wire["data"] + "=" * (-len(wire["data"]) % 4)) == b'{"version":"1.0.0"}'


async def test_programmatic_create_follows_the_same_rules(stack):
    from skr.local.keystore import KeyRejected

    with pytest.raises(KeyRejected, match=r"AKV\.SKR\.1004"):
        await stack.hsm.create_key("x", kty="oct-HSM")
    with pytest.raises(KeyRejected, match=r"AKV\.SKR\.1005"):
        await stack.hsm.create_key("x", kty="oct-HSM", exportable=False, release_policy=stack.policy())
    with pytest.raises(KeyRejected, match="40 bits; supported: 128, 192, 256"):
        await stack.hsm.import_key("x", b"short", release_policy=stack.policy())
    assert stack.hsm.key_names == ()


async def test_latest_policy_is_what_the_newest_version_carries(stack):
    assert stack.hsm.latest_policy("demo") is None
    await stack.hsm.create_key("demo", kty="oct-HSM", release_policy=stack.policy())
    changed = stack.policy(host_data=OTHER_HOST_DATA)
    newest = await stack.hsm.create_key("DEMO", kty="oct-HSM", release_policy=changed)
    assert stack.hsm.latest_policy("Demo") == changed
    assert stack.hsm.latest("demo") == newest and newest.name == "demo"
