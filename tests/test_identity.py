"""Which credential the sidecar uses, for which scope — and that skr's managed and workload identity
credentials speak the identity endpoints' wire (docs/wire-formats.md, "Identity"), checked request by request
against stand-ins written here and against the local identity service (itself checked against the real
azure-identity in tests/test_local_identity.py), over HTTPS trusted through the CA bundle."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from azure.core.credentials_async import AsyncTokenCredential
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.endpoints import is_azure_host, is_managed_hsm
from skr.errors import BadRequest, ConfigError, IdentityError, UpstreamError
from skr.identity import (
    MANAGED_HSM_SCOPE,
    VAULT_SCOPE,
    CredentialFactory,
    ManagedIdentityCredential,
    StaticTokenCredential,
    WorkloadIdentityCredential,
    scope_for,
)
from skr.local.ca import LocalCA
from skr.local.identity import LocalIdentityService
from tests.kvstack import MI_ENV, TENANT, serve


@pytest.mark.parametrize(
    ("host", "scope"),
    [
        ("myvault.vault.azure.net", VAULT_SCOPE),
        ("https://myvault.vault.azure.net/", VAULT_SCOPE),
        ("MyVault.Vault.Azure.Net:443", VAULT_SCOPE),
        ("myhsm.managedhsm.azure.net", MANAGED_HSM_SCOPE),
        ("https://myhsm.managedhsm.azure.net:443", MANAGED_HSM_SCOPE),
        ("myvault.vault.azure.cn", "https://vault.azure.cn/.default"),
        ("myhsm.managedhsm.azure.cn", "https://managedhsm.azure.cn/.default"),
        ("myvault.vault.usgovcloudapi.net", "https://vault.usgovcloudapi.net/.default"),
        ("myhsm.managedhsm.usgovcloudapi.net", "https://managedhsm.usgovcloudapi.net/.default"),
        ("myvault.privatelink.vaultcore.azure.net", VAULT_SCOPE),
        ("managedhsm.azure.net.example.com", VAULT_SCOPE),  # suffix must match whole labels
        ("evilmanagedhsm.azure.net", VAULT_SCOPE),
        ("127.0.0.1:8443", VAULT_SCOPE),  # unknown host, not configured
        ("keys.internal.example", VAULT_SCOPE),
    ],
)
def test_scope_for(host, scope):
    assert scope_for(host) == scope


@pytest.mark.parametrize(
    ("host", "configured", "scope"),
    [
        ("127.0.0.1:8443", ["127.0.0.1:8443"], MANAGED_HSM_SCOPE),
        ("https://127.0.0.1:9999", ["127.0.0.1"], MANAGED_HSM_SCOPE),
        ("keys.internal.example", ["keys.internal.example"], MANAGED_HSM_SCOPE),
        # configuring an Azure vault as "managed HSM" cannot change Azure's own rule
        ("myvault.vault.azure.net", ["myvault.vault.azure.net"], VAULT_SCOPE),
    ],
)
def test_scope_for_configured_managed_hsm_hosts(host, configured, scope):
    assert scope_for(host, managed_hsm_hosts=configured) == scope
    assert CredentialFactory({}, managed_hsm_hosts=configured).scope_for(host) == scope


@pytest.mark.parametrize(
    ("host", "azure"),
    [
        ("x.vault.azure.net", True),
        ("x.managedhsm.azure.net", True),
        ("x.vault.azure.cn", True),
        ("x.vault.usgovcloudapi.net", True),
        ("sharedeus.eus.attest.azure.net", True),
        ("127.0.0.1", False),
        ("localhost", False),
        ("azure.net.evil.com", False),
        ("notazure.net", False),
    ],
)
def test_is_azure_host(host, azure):
    assert is_azure_host(host) is azure


def test_is_managed_hsm():
    assert is_managed_hsm("x.managedhsm.azure.net")
    assert not is_managed_hsm("x.vault.azure.net")
    assert is_managed_hsm("localhost:1", managed_hsm_hosts=["localhost"])


def _jwt(exp: int | None) -> str:
    claims = {"aud": "https://vault.azure.net"} | ({"exp": exp} if exp is not None else {})
    return jwt.encode(
        claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256"
    )


async def test_static_credential_presents_the_token_with_its_jwt_expiry():
    exp = int(time.time()) + 1234
    token = _jwt(exp)
    credential = StaticTokenCredential(token)
    assert isinstance(credential, AsyncTokenCredential)
    got = await credential.get_token(VAULT_SCOPE, tenant_id="other", enable_cae=True)
    info = await credential.get_token_info(MANAGED_HSM_SCOPE)
    assert got.token == token == info.token and got.expires_on == exp == info.expires_on
    assert token not in repr(credential) and token not in str(credential)


async def test_static_credential_without_exp_lasts_an_hour():
    now = time.time()
    assert StaticTokenCredential("opaque-token", now=now).expires_on == int(now) + 3600
    assert StaticTokenCredential(_jwt(None), now=now).expires_on == int(now) + 3600
    with pytest.raises(BadRequest):
        StaticTokenCredential("   ")


def _workload_env(tmp_path: Path) -> dict[str, str]:
    token_file = tmp_path / "token"
    token_file.write_text("federated-assertion")
    return {
        "AZURE_CLIENT_ID": "cid",
        "AZURE_TENANT_ID": TENANT,
        "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
    }


async def test_factory_prefers_request_token_then_workload_then_managed_identity(tmp_path, monkeypatch):
    for name in MI_ENV:
        monkeypatch.delenv(name, raising=False)
    workload = CredentialFactory(_workload_env(tmp_path))
    managed = CredentialFactory({"AZURE_CLIENT_ID": "cid"}, client_id="uami")  # incomplete workload env
    try:
        assert isinstance(workload.for_request("tok"), StaticTokenCredential)
        assert isinstance(workload.for_request(None), WorkloadIdentityCredential)
        assert workload.kind == "workload_identity"
        assert isinstance(managed.for_request(""), ManagedIdentityCredential)
        assert managed.kind == "managed_identity"
        assert managed.for_request() is managed.for_request()  # created once, reused
        assert managed.for_request("a") is not managed.for_request("a")
    finally:
        await workload.aclose()
        await managed.aclose()


def test_factory_refuses_a_missing_ca_bundle(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CredentialFactory({}, ca_bundle=tmp_path / "nope.pem")


@pytest.fixture
async def identity(tmp_path: Path, ca: LocalCA) -> AsyncIterator[tuple[LocalIdentityService, str]]:
    service = LocalIdentityService.create(tmp_path / "identity", tenant_id=TENANT)
    runner, url = await serve(service.app, ca)
    yield service, url
    await runner.cleanup()


async def test_factory_managed_identity_over_https_with_ca_bundle_and_cache(identity, ca, monkeypatch):
    service, url = identity
    for name in MI_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", url)
    factory = CredentialFactory({}, client_id="uami-client", ca_bundle=ca.ca_pem_path)
    try:
        credential = factory.for_request()
        first = await credential.get_token(factory.scope_for("myhsm.managedhsm.azure.net"))
        second = await factory.for_request().get_token(factory.scope_for("myhsm.managedhsm.azure.net"))
    finally:
        await factory.aclose()
    claims = service.verify_access_token(first.token, "https://managedhsm.azure.net")
    assert claims["appid"] == "uami-client"
    assert second.token == first.token and service.issued == 1


async def test_factory_managed_identity_without_the_ca_bundle_does_not_trust_the_local_ca(
    identity, monkeypatch
):
    service, url = identity
    for name in MI_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", url)
    factory = CredentialFactory({})
    try:
        with pytest.raises(UpstreamError) as info:
            await factory.for_request().get_token(VAULT_SCOPE)
    finally:
        await factory.aclose()
    assert info.value.code == "upstream_tls_untrusted"
    assert service.issued == 0  # the TLS handshake failed before any token request


async def test_factory_workload_identity_posts_the_federated_assertion(tmp_path, ca, monkeypatch):
    """A local Entra token endpoint over HTTPS: the workload identity credential sends the assertion
    from AZURE_FEDERATED_TOKEN_FILE and the factory's CA bundle makes TLS verify."""
    for name in MI_ENV:
        monkeypatch.delenv(name, raising=False)
    seen: list[dict[str, str]] = []

    async def token(request: web.Request) -> web.Response:
        form = dict(await request.post())
        seen.append({k: str(v) for k, v in form.items()} | {"path": request.path})
        return web.json_response({"token_type": "Bearer", "expires_in": 3599, "access_token": "entra-token"})

    app = web.Application()
    app.router.add_post(f"/{TENANT}/oauth2/v2.0/token", token)
    runner, url = await serve(app, ca)
    env = _workload_env(tmp_path) | {"AZURE_AUTHORITY_HOST": url}
    factory = CredentialFactory(env, ca_bundle=ca.ca_pem_path)
    try:
        got = await factory.for_request().get_token(MANAGED_HSM_SCOPE)
    finally:
        await factory.aclose()
        await runner.cleanup()
    assert got.token == "entra-token"
    assert seen == [
        {
            "client_assertion": "federated-assertion",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_id": "cid",
            "grant_type": "client_credentials",
            "scope": MANAGED_HSM_SCOPE,
            "path": f"/{TENANT}/oauth2/v2.0/token",
        }
    ]


# --- the managed identity wire, request by request ------------------------------------------------------


class TokenEndpoint:
    """A stand-in identity endpoint recording each request and answering from a list (last one repeats)."""

    def __init__(self, *answers: tuple[int, dict[str, object]]) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, str, dict[str, str], dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.query), dict(request.headers)))
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return web.json_response(body, status=status)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[TokenEndpoint, str]]:
    stand_in = TokenEndpoint((200, {}))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stand_in.handle)
    runner, url = await serve(app, None)
    yield stand_in, url
    await runner.cleanup()


def _managed(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], client_id: str | None = None
) -> CredentialFactory:
    for name in MI_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return CredentialFactory({}, client_id=client_id)


async def test_imds_request_and_answer_with_string_values(endpoint, monkeypatch):
    """IMDS: GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=…&client_id=…, header
    Metadata: true; the real IMDS sends every value as a string."""
    stand_in, url = endpoint
    expires = int(time.time()) + 86400
    stand_in.answers = [
        (
            200,
            {
                "access_token": "imds-token",
                "expires_in": "86399",
                "expires_on": str(expires),
                "ext_expires_in": "86399",
                "not_before": str(expires - 86400),
                "resource": "https://managedhsm.azure.net",
                "token_type": "Bearer",
            },
        )
    ]
    factory = _managed(monkeypatch, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": url}, client_id="uami")
    credential = factory.for_request()
    assert isinstance(credential, ManagedIdentityCredential)
    try:
        got = await credential.get_token_info(MANAGED_HSM_SCOPE)
    finally:
        await factory.aclose()
    assert (got.token, got.expires_on) == ("imds-token", expires)
    method, path, query, headers = stand_in.requests[0]
    assert (method, path) == ("GET", "/metadata/identity/oauth2/token")
    assert query == {
        "api-version": "2018-02-01",
        "resource": "https://managedhsm.azure.net",
        "client_id": "uami",
    }
    assert headers["Metadata"] == "true" and "Authorization" not in headers


async def test_app_service_request_and_answer(endpoint, monkeypatch):
    """App Service: GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=…, header X-IDENTITY-HEADER;
    expires_on in epoch seconds as a number."""
    stand_in, url = endpoint
    expires = int(time.time()) + 3600
    stand_in.answers = [(200, {"access_token": "msi-token", "expires_on": expires, "token_type": "Bearer"})]
    env = {"IDENTITY_ENDPOINT": f"{url}/msi/token", "IDENTITY_HEADER": "secret-header"}
    factory = _managed(monkeypatch, env)
    try:
        got = await factory.for_request().get_token(VAULT_SCOPE)
    finally:
        await factory.aclose()
    assert (got.token, got.expires_on) == ("msi-token", expires)
    method, path, query, headers = stand_in.requests[0]
    assert (method, path) == ("GET", "/msi/token")
    assert query == {"api-version": "2019-08-01", "resource": "https://vault.azure.net"}
    assert headers["X-IDENTITY-HEADER"] == "secret-header"


async def test_a_token_is_fetched_once_for_concurrent_callers(endpoint, monkeypatch):
    import asyncio

    stand_in, url = endpoint
    stand_in.answers = [(200, {"access_token": "only", "expires_on": str(int(time.time()) + 3600)})]
    factory = _managed(monkeypatch, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": url})
    credential = factory.for_request()
    try:
        tokens = await asyncio.gather(*(credential.get_token(VAULT_SCOPE) for _ in range(20)))
        tokens.append(await factory.for_request().get_token(VAULT_SCOPE))
    finally:
        await factory.aclose()
    assert {t.token for t in tokens} == {"only"} and len(stand_in.requests) == 1


async def test_a_token_is_refreshed_within_five_minutes_of_its_expiry(endpoint, monkeypatch):
    stand_in, url = endpoint
    stand_in.answers = [
        (200, {"access_token": "first", "expires_on": str(int(time.time()) + 200)}),
        (200, {"access_token": "second", "expires_on": str(int(time.time()) + 3600)}),
    ]
    factory = _managed(monkeypatch, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": url})
    credential = factory.for_request()
    try:
        tokens = [(await credential.get_token(VAULT_SCOPE)).token for _ in range(3)]
    finally:
        await factory.aclose()
    assert tokens == ["first", "second", "second"] and len(stand_in.requests) == 2


async def test_a_refusal_names_the_status_code_and_description_and_a_valid_token_survives_it(
    endpoint, monkeypatch
):
    stand_in, url = endpoint
    soon = int(time.time()) + 200
    refusal = (400, {"error": "invalid_request", "error_description": "Identity not found\nTrace ID: x"})
    stand_in.answers = [(200, {"access_token": "still-valid", "expires_on": str(soon)}), refusal]
    factory = _managed(monkeypatch, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": url})
    credential = factory.for_request()
    try:
        assert (await credential.get_token(VAULT_SCOPE)).token == "still-valid"
        assert (await credential.get_token(VAULT_SCOPE)).token == "still-valid"  # refresh refused, kept
        with pytest.raises(IdentityError) as info:
            await credential.get_token(MANAGED_HSM_SCOPE)  # nothing cached for this scope
    finally:
        await factory.aclose()
    assert info.value.upstream_status == 400 and info.value.message == (
        f"the IMDS refused a token for {MANAGED_HSM_SCOPE} (HTTP 400 invalid_request): Identity not found"
    )
    assert len(stand_in.requests) == 3


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"access_token": "", "expires_on": "1"},
        {"access_token": "t"},
        {"access_token": "t", "expires_on": "x"},
    ],
)
async def test_an_answer_without_a_token_and_expiry_is_refused(endpoint, monkeypatch, answer):
    stand_in, url = endpoint
    stand_in.answers = [(200, answer)]
    factory = _managed(monkeypatch, {"AZURE_POD_IDENTITY_AUTHORITY_HOST": url})
    try:
        with pytest.raises(IdentityError, match="without an access_token"):
            await factory.for_request().get_token(VAULT_SCOPE)
    finally:
        await factory.aclose()


async def test_workload_identity_refuses_an_http_authority_before_sending_the_assertion(tmp_path, endpoint):
    stand_in, url = endpoint
    factory = CredentialFactory(_workload_env(tmp_path) | {"AZURE_AUTHORITY_HOST": url})
    try:
        with pytest.raises(IdentityError, match="https"):
            await factory.for_request().get_token(VAULT_SCOPE)
    finally:
        await factory.aclose()
    assert stand_in.requests == []


# --- the same requests as the real azure-identity -------------------------------------------------------

IDENTITY_HEADERS = ("Metadata", "X-IDENTITY-HEADER", "Content-Type")


@pytest.mark.parametrize("mode", ["imds", "app_service"])
async def test_managed_identity_requests_are_the_ones_azure_identity_sends(endpoint, monkeypatch, mode):
    """The real azure-identity credential and skr's against one recording endpoint: the same method, path,
    query (api-version, resource, client_id) and identity headers."""
    from azure.identity.aio import ManagedIdentityCredential as SdkManagedIdentity

    stand_in, url = endpoint
    expires = int(time.time()) + 3600
    stand_in.answers = [
        (
            200,
            {
                "access_token": "tok",
                "expires_in": "3600",
                "expires_on": str(expires),
                "resource": "https://vault.azure.net",
                "token_type": "Bearer",
            },
        )
    ]
    env = (
        {"AZURE_POD_IDENTITY_AUTHORITY_HOST": url}
        if mode == "imds"
        else {"IDENTITY_ENDPOINT": f"{url}/msi/token", "IDENTITY_HEADER": "secret-header"}
    )
    factory = _managed(monkeypatch, env, client_id="uami")
    async with SdkManagedIdentity(client_id="uami") as sdk:
        await sdk.get_token(VAULT_SCOPE)
    try:
        await factory.for_request().get_token(VAULT_SCOPE)
    finally:
        await factory.aclose()
    theirs, ours = stand_in.requests
    assert ours[:3] == theirs[:3]
    assert {h: ours[3].get(h) for h in IDENTITY_HEADERS} == {h: theirs[3].get(h) for h in IDENTITY_HEADERS}


async def test_workload_identity_request_is_the_one_azure_identity_sends(tmp_path, ca, monkeypatch):
    from azure.identity.aio import WorkloadIdentityCredential as SdkWorkloadIdentity

    for name in MI_ENV:
        monkeypatch.delenv(name, raising=False)
    seen: list[tuple[str, str, dict[str, str]]] = []

    async def token(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, {k: str(v) for k, v in (await request.post()).items()}))
        return web.json_response({"token_type": "Bearer", "expires_in": 3599, "access_token": "entra-token"})

    app = web.Application()
    app.router.add_post(f"/{TENANT}/oauth2/v2.0/token", token)
    runner, url = await serve(app, ca)
    env = _workload_env(tmp_path) | {"AZURE_AUTHORITY_HOST": url}
    try:
        async with SdkWorkloadIdentity(
            tenant_id=TENANT,
            client_id="cid",
            token_file_path=env["AZURE_FEDERATED_TOKEN_FILE"],
            authority=url,
            connection_verify=str(ca.ca_pem_path),
        ) as sdk:
            await sdk.get_token(MANAGED_HSM_SCOPE)
        factory = CredentialFactory(env, ca_bundle=ca.ca_pem_path)
        try:
            await factory.for_request().get_token(MANAGED_HSM_SCOPE)
        finally:
            await factory.aclose()
    finally:
        await runner.cleanup()
    theirs, ours = seen
    assert ours == theirs


def test_an_identity_endpoint_that_is_no_url_is_a_configuration_error(monkeypatch):
    factory = _managed(monkeypatch, {"IDENTITY_ENDPOINT": "not a url", "IDENTITY_HEADER": "x"})

    async def fetch() -> None:
        try:
            await factory.for_request().get_token(VAULT_SCOPE)
        finally:
            await factory.aclose()

    import asyncio

    with pytest.raises(ConfigError, match="not a valid URL"):
        asyncio.run(fetch())
