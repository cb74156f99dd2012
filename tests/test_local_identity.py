"""The local identity service answers the real azure-identity ManagedIdentityCredential over both
protocols it can be pointed at (IMDS through AZURE_POD_IDENTITY_AUTHORITY_HOST, App Service through
IDENTITY_ENDPOINT/IDENTITY_HEADER), and refuses what IMDS refuses."""

from __future__ import annotations

import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from azure.identity.aio import ManagedIdentityCredential
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDictProxy

from skr.local.ca import LocalCA
from skr.local.identity import SIGNING_KEY_FILE, InvalidAccessToken, LocalIdentityService
from tests.kvstack import MI_ENV, TENANT, serve

VAULT = "https://vault.azure.net"
UAMI = "0b5fbb31-8d44-4c0f-9b7e-0f8b0b6a1c11"


@pytest.fixture
async def identity(tmp_path: Path, ca: LocalCA) -> AsyncIterator[tuple[LocalIdentityService, str]]:
    service = LocalIdentityService.create(tmp_path / "identity", tenant_id=TENANT)
    runner, url = await serve(service.app, ca)
    yield service, url
    await runner.cleanup()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in MI_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_managed_identity_credential_gets_a_token_over_imds(identity, clean_env, ca):
    service, url = identity
    clean_env.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", url)
    async with ManagedIdentityCredential(connection_verify=str(ca.ca_pem_path)) as credential:
        info = await credential.get_token_info(f"{VAULT}/.default")
        again = await credential.get_token_info(f"{VAULT}/.default")
    claims = service.verify_access_token(info.token, VAULT)
    assert claims["aud"] == VAULT and claims["tid"] == TENANT and claims["iss"] == service.issuer
    assert claims["exp"] - claims["iat"] == 3600 and abs(info.expires_on - claims["exp"]) <= 1
    assert claims["oid"] and claims["appid"] == service.client_id
    assert again.token == info.token and service.issued == 1  # the SDK's token cache works


async def test_user_assigned_client_id_is_honoured(identity, clean_env, ca):
    service, url = identity
    clean_env.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", url)
    async with ManagedIdentityCredential(client_id=UAMI, connection_verify=str(ca.ca_pem_path)) as credential:
        token = await credential.get_token("https://managedhsm.azure.net/.default")
    claims = service.verify_access_token(token.token, "https://managedhsm.azure.net")
    assert claims["appid"] == UAMI


async def test_managed_identity_credential_gets_a_token_over_app_service(identity, clean_env, ca):
    service, url = identity
    clean_env.setenv("IDENTITY_ENDPOINT", f"{url}/msi/token")
    clean_env.setenv("IDENTITY_HEADER", service.identity_header)
    async with ManagedIdentityCredential(connection_verify=str(ca.ca_pem_path)) as credential:
        info = await credential.get_token_info(f"{VAULT}/.default")
    assert service.verify_access_token(info.token, VAULT)["aud"] == VAULT


async def _get(
    url: str, ca: LocalCA, headers: dict[str, str]
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, ssl=ca.client_ssl_context()) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


IMDS_QUERY = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"


async def test_imds_answers_with_string_fields_the_sdk_and_go_sidecar_expect(identity, ca):
    _, url = identity
    status, body, headers = await _get(url + IMDS_QUERY, ca, {"Metadata": "true"})
    assert status == 200
    assert set(body) == {
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    }
    assert all(isinstance(v, str) for v in body.values())
    assert body["resource"] == VAULT and body["token_type"] == "Bearer" and body["expires_in"] == "3600"
    assert headers["Server-Timing"].startswith("app;dur=")


@pytest.mark.parametrize(
    "headers", [{}, {"Metadata": "false"}, {"Metadata": "true", "X-Forwarded-For": "10.0.0.1"}]
)
async def test_imds_refuses_requests_without_the_metadata_header_or_proxied(identity, ca, headers):
    _, url = identity
    status, body, _ = await _get(url + IMDS_QUERY, ca, headers)
    assert status == 400 and body["error"] == "invalid_request"


@pytest.mark.parametrize(
    "query",
    [
        "/metadata/identity/oauth2/token?resource=https%3A%2F%2Fvault.azure.net",
        "/metadata/identity/oauth2/token?api-version=2018-02-01",
        "/metadata/identity/oauth2/token?api-version=2017-01-01&resource=https%3A%2F%2Fvault.azure.net",
    ],
)
async def test_imds_requires_api_version_and_resource(identity, ca, query):
    _, url = identity
    status, body, _ = await _get(url + query, ca, {"Metadata": "true"})
    assert status == 400 and body["error_description"]


async def test_app_service_requires_the_identity_header(identity, ca):
    service, url = identity
    query = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net"
    assert (await _get(url + query, ca, {}))[0] == 401
    assert (await _get(url + query, ca, {"X-IDENTITY-HEADER": "wrong"}))[0] == 401
    status, body, _ = await _get(url + query, ca, {"X-IDENTITY-HEADER": service.identity_header})
    assert status == 200 and set(body) >= {"access_token", "expires_on", "resource", "token_type"}


def test_verify_access_token_refuses_wrong_audience_expired_and_foreign_tokens(tmp_path):
    service = LocalIdentityService.create(tmp_path, tenant_id=TENANT)
    good = service.issue_token(VAULT)["access_token"]
    assert service.verify_access_token(good, VAULT + "/")["aud"] == VAULT  # trailing slash tolerated
    with pytest.raises(InvalidAccessToken, match="audience"):
        service.verify_access_token(good, "https://managedhsm.azure.net")
    expired = service.issue_token(VAULT, now=int(time.time()) - 7200)["access_token"]
    with pytest.raises(InvalidAccessToken, match="expired"):
        service.verify_access_token(expired, VAULT)
    claims = jwt.decode(good, options={"verify_signature": False})
    foreign = jwt.encode(
        claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256"
    )
    with pytest.raises(InvalidAccessToken) as info:
        service.verify_access_token(foreign, VAULT)
    assert good not in info.value.message and foreign not in str(info.value)


def test_signing_key_and_secret_persist_with_private_modes(tmp_path):
    first = LocalIdentityService.create(tmp_path, tenant_id=TENANT)
    token = first.issue_token(VAULT)["access_token"]
    second = LocalIdentityService.create(tmp_path, tenant_id=TENANT)
    assert second.verify_access_token(token, VAULT)["tid"] == TENANT
    assert second.identity_header == first.identity_header
    for name in (SIGNING_KEY_FILE, "identity-header"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert first.identity_header not in repr(first)
