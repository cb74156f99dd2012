"""KeyVaultReleaser: what a caller may name as kid and vault, when the challenge-resource check may be
relaxed, that its requests are the ones the real Azure SDK sends, and — against the local
Managed-HSM-compatible service over HTTPS — the release itself and how every refusal and failure is mapped."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from skr.akv.jws import open_release
from skr.akv.keywrap import Enc
from skr.akv.release import (
    DEFAULT_API_VERSION,
    MANAGED_HSM_RELEASE_ROLE,
    VAULT_RELEASE_ROLE,
    KeyVaultReleaser,
    ReleaseResult,
    SdkSettings,
    challenge_scope,
)
from skr.endpoints import KeyRef, parse_endpoint, parse_kid
from skr.errors import (
    BadRequest,
    IdentityError,
    KeyNotFound,
    ReleaseDenied,
    UpstreamError,
    UpstreamTimeout,
)
from skr.identity import CredentialFactory
from skr.local.faults import FaultRule
from skr.maa.runtime import WrappingKey
from skr.server import http_status
from skr.upstream import Deadline, RetryPolicy
from tests.kvstack import (
    OTHER_HOST_DATA,
    Stack,
    serve,
)

FAST = SdkSettings(
    retry=RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05),
    connection_timeout=2,
    read_timeout=5,
)


# --- naming ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kid", "expected"),
    [
        ("mykey", (None, "mykey", None)),
        ("my-key-2", (None, "my-key-2", None)),
        ("mykey/0123456789abcdef0123456789abcdef", (None, "mykey", "0123456789abcdef0123456789abcdef")),
        ("mykey/", (None, "mykey", None)),
        ("https://v.vault.azure.net/keys/k", ("https://v.vault.azure.net", "k", None)),
        ("https://V.Vault.Azure.Net:443/keys/k/abc123/", ("https://v.vault.azure.net", "k", "abc123")),
        ("https://127.0.0.1:8443/keys/k/abc", ("https://127.0.0.1:8443", "k", "abc")),
    ],
)
def test_parse_kid(kid, expected):
    vault, name, version = parse_kid(kid)
    assert (vault.url if vault else None, name, version) == expected


@pytest.mark.parametrize(
    "kid",
    [
        "",
        "a/b/c",
        "bad_name",
        "bad name",
        "../etc",
        "k/ver-sion",
        "http://v.vault.azure.net/keys/k",
        "https://v.vault.azure.net/secrets/k",
        "https://v.vault.azure.net/keys",
        "https://v.vault.azure.net/keys/k/v/extra",
        "https://v.vault.azure.net/keys/k?x=1",
        "https://user@v.vault.azure.net/keys/k",
    ],
)
def test_parse_kid_refuses(kid):
    with pytest.raises(BadRequest):
        parse_kid(kid)


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("myvault.vault.azure.net", "https://myvault.vault.azure.net"),
        ("MyVault.Vault.Azure.Net.", "https://myvault.vault.azure.net"),
        ("myvault.vault.azure.net:443", "https://myvault.vault.azure.net"),
        ("https://myhsm.managedhsm.azure.net/", "https://myhsm.managedhsm.azure.net"),
        ("127.0.0.1:8443", "https://127.0.0.1:8443"),
        ("https://localhost:9000", "https://localhost:9000"),
        ("[::1]:8443", "https://[::1]:8443"),
    ],
)
def test_normalize_vault(value, url):
    assert parse_endpoint(value).url == url


@pytest.mark.parametrize(
    "value",
    [
        "",
        "http://myvault.vault.azure.net",
        "ftp://myvault.vault.azure.net",
        "https://user:pw@myvault.vault.azure.net",
        "user@myvault.vault.azure.net",
        "myvault.vault.azure.net/keys/k",
        "https://myvault.vault.azure.net/path",
        "https://myvault.vault.azure.net?x=1",
        "https://myvault.vault.azure.net#f",
        "my_vault.vault.azure.net",
        "myvault.vault.azure.net:99999",
        "https://myvault.vault.azure.net\\@evil",
    ],
)
def test_normalize_vault_refuses(value):
    with pytest.raises(BadRequest):
        parse_endpoint(value)


@pytest.mark.parametrize(
    ("allowed", "vault", "verify"),
    [
        ((), "https://127.0.0.1:8443", True),
        (("127.0.0.1:8443",), "https://127.0.0.1:8443", False),
        (("127.0.0.1",), "https://127.0.0.1:8443", False),
        (("127.0.0.1:9999",), "https://127.0.0.1:8443", True),
        (("https://localhost:8443",), "localhost:8443", False),
        (("myvault.vault.azure.net",), "https://myvault.vault.azure.net", True),  # never for Azure domains
        (("x.managedhsm.azure.net:443",), "x.managedhsm.azure.net", True),
    ],
)
def test_challenge_resource_check_is_relaxed_only_for_listed_non_azure_hosts(allowed, vault, verify):
    releaser = KeyVaultReleaser(credentials=CredentialFactory({}), allow_insecure_challenge_hosts=allowed)
    assert releaser.verify_challenge_resource(parse_endpoint(vault)) is verify


def test_release_result_repr_hides_the_jws():
    result = ReleaseResult(jws="header.payload.signature", vault_url="https://v", name="k", version=None)
    assert "payload" not in repr(result)


# --- against the local key service ---------------------------------------------------------------------


@pytest.fixture
async def releaser(stack: Stack, imds_env: None) -> AsyncIterator[KeyVaultReleaser]:
    credentials = CredentialFactory(
        os.environ, ca_bundle=stack.ca.ca_pem_path, managed_hsm_hosts=[stack.hsm_host]
    )
    releaser = KeyVaultReleaser(
        credentials=credentials, allow_insecure_challenge_hosts=[stack.hsm_host], sdk=FAST
    )
    yield releaser
    await releaser.aclose()
    await credentials.aclose()


@pytest.mark.parametrize("enc", list(Enc))
async def test_release_end_to_end_unwraps_to_the_created_key(stack, releaser, wrapping_key, enc):
    key = await stack.hsm.create_key("rsa", kty="RSA-HSM", size=2048, release_policy=stack.policy())
    token = await stack.target_token(wrapping_key)
    result = await releaser.release(KeyRef.parse("rsa", vault=stack.hsm_host), token, enc=enc)
    assert (result.vault_url, result.name, result.version) == (stack.hsm_url, "rsa", None)
    opened = open_release(
        result.jws,
        host=parse_endpoint(stack.hsm_host),
        trust=stack.trust(),
        wrapping_key=wrapping_key.private_key,
        expected_wrapping_kid=wrapping_key.kid,
    )
    assert opened.enc is enc and opened.version == key.version
    assert {k: opened.jwk[k] for k in ("n", "e", "d", "p", "q")} == {
        k: key.material[k] for k in ("n", "e", "d", "p", "q")
    }


async def test_release_by_key_url_with_version_and_reused_credential(stack, releaser, wrapping_key):
    first = await stack.hsm.create_key("ec", kty="EC-HSM", curve="P-384", release_policy=stack.policy())
    await stack.hsm.create_key("ec", kty="EC-HSM", curve="P-384", release_policy=stack.policy())
    token = await stack.target_token(wrapping_key)
    kid = f"{stack.hsm_url}/keys/ec/{first.version}"
    one = await releaser.release(KeyRef.parse(kid, vault=None), token)
    two = await releaser.release(KeyRef.parse(kid, vault=stack.hsm_url + "/"), token)
    assert one.version == two.version == first.version
    opened = open_release(
        one.jws,
        host=parse_endpoint(stack.hsm_host),
        trust=stack.trust(),
        wrapping_key=wrapping_key.private_key,
    )
    assert opened.jwk["d"] == first.material["d"]
    assert stack.identity.issued == 1  # one credential, its token cached across both releases


async def test_request_access_token_is_used_instead_of_managed_identity(stack, releaser, wrapping_key):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    bearer = stack.bearer()
    result = await releaser.release(
        KeyRef.parse("k", vault=stack.hsm_host), await stack.target_token(wrapping_key), access_token=bearer
    )
    assert result.jws.count(".") == 2 and stack.identity.issued == 1  # only the one issued by the test


async def test_policy_denial_names_the_claim_and_the_role(stack, releaser, wrapping_key):
    await stack.hsm.create_key("other", kty="oct-HSM", release_policy=stack.policy(host_data=OTHER_HOST_DATA))
    with pytest.raises(ReleaseDenied) as info:
        await releaser.release(
            KeyRef.parse("other", vault=stack.hsm_host), await stack.target_token(wrapping_key)
        )
    assert "HTTP 403 Forbidden" in info.value.message and "x-ms-sevsnpvm-hostdata" in info.value.message
    assert "(inner error: AccessDenied)" in info.value.message
    assert MANAGED_HSM_RELEASE_ROLE in (info.value.hint or "") and "release policy" in (info.value.hint or "")
    assert http_status(info.value) == 403


async def test_rejected_bearer_is_release_denied(stack, releaser, wrapping_key):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    wrong_audience = stack.bearer("https://vault.azure.net")
    with pytest.raises(ReleaseDenied) as info:
        await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), "t.t.t", access_token=wrong_audience)
    assert "HTTP 401" in info.value.message and "audience" in (info.value.hint or "")
    assert wrong_audience not in info.value.diagnostics()


async def test_unknown_key_is_key_not_found(stack, releaser):
    with pytest.raises(KeyNotFound) as info:
        await releaser.release(KeyRef.parse("missing", vault=stack.hsm_host), "t.t.t")
    assert "KeyNotFound" in info.value.message and http_status(info.value) == 404


async def test_token_without_runtime_key_is_bad_request(stack, releaser):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    token = await stack.target_token(WrappingKey.generate(), runtime_data=b'{"keys":[]}')
    with pytest.raises(BadRequest) as info:
        await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), token)
    assert "BadParameter" in info.value.message and "x-ms-runtime.keys" in info.value.message


async def test_transient_errors_are_retried(stack, releaser, wrapping_key):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    stack.faults.add(FaultRule(route="hsm.release", action="status", status=503, times=2))
    result = await releaser.release(
        KeyRef.parse("k", vault=stack.hsm_host), await stack.target_token(wrapping_key)
    )
    # two 503s (each on the SDK's bodiless challenge request), then the 401 challenge and the release
    assert result.jws and stack.faults.count("hsm.release") == 4


async def test_persistent_5xx_is_upstream_error_after_the_retry_budget(stack, releaser):
    stack.faults.add(FaultRule(route="hsm.release", action="status", status=503))
    with pytest.raises(UpstreamError) as info:
        await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), "t.t.t")
    assert "HTTP 503 InjectedFault" in info.value.message
    assert stack.faults.count("hsm.release") == FAST.retry.attempts


async def test_retry_after_is_honoured(stack, releaser, wrapping_key):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    stack.faults.add(FaultRule(route="hsm.release", action="status", status=429, retry_after=0.5, times=1))
    started = asyncio.get_running_loop().time()
    result = await releaser.release(
        KeyRef.parse("k", vault=stack.hsm_host), await stack.target_token(wrapping_key)
    )
    assert result.jws and asyncio.get_running_loop().time() - started >= 0.5


async def test_throttling_is_upstream_error(stack, releaser):
    stack.faults.add(FaultRule(route="hsm.release", action="status", status=429, retry_after=0))
    with pytest.raises(UpstreamError, match="HTTP 429"):
        await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), "t.t.t")


async def test_deadline_is_upstream_timeout(stack, releaser):
    # the vault answers after 1 s (the stack's teardown waits for that handler): past the 0.5 s deadline
    stack.faults.add(FaultRule(route="hsm.release", action="delay", seconds=1))
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout):
        await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), "t.t.t", deadline=Deadline.after(0.5))
    assert asyncio.get_running_loop().time() - started < 0.9


async def test_expired_deadline_fails_without_calling(stack, releaser):
    with pytest.raises(UpstreamTimeout):
        await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), "t.t.t", deadline=Deadline.after(-1))
    assert stack.faults.count("hsm.*") == 0


async def test_unreachable_vault_is_upstream_error(stack, releaser):
    with pytest.raises(UpstreamError) as info:
        await releaser.release(KeyRef.parse("k", vault="127.0.0.1:1"), "t.t.t", access_token="x")
    assert info.value.code == "upstream_unreachable"


async def test_untrusted_tls_is_upstream_error(stack, imds_env):
    releaser = KeyVaultReleaser(
        credentials=CredentialFactory({}), allow_insecure_challenge_hosts=[stack.hsm_host], sdk=FAST
    )
    try:
        with pytest.raises(UpstreamError) as info:
            await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), "t.t.t", access_token="x")
    finally:
        await releaser.aclose()
    assert info.value.code == "upstream_tls_untrusted"


async def test_challenge_for_another_domain_is_refused_unless_allow_listed(stack, imds_env):
    credentials = CredentialFactory({}, ca_bundle=stack.ca.ca_pem_path)
    releaser = KeyVaultReleaser(credentials=credentials, sdk=FAST)
    try:
        with pytest.raises(UpstreamError) as info:
            await releaser.release(
                KeyRef.parse("k", vault=stack.hsm_host), "t.t.t", access_token=stack.bearer()
            )
    finally:
        await releaser.aclose()
    assert info.value.code == "vault_challenge_mismatch"
    assert stack.identity.issued == 1  # only the test's bearer; no token was sent anywhere


@pytest.mark.parametrize(
    ("status", "description"),
    [(400, "Identity not found"), (403, "The request is not allowed for this identity")],
)
async def test_identity_failure_is_identity_error(stack, releaser, monkeypatch, status, description):
    """An IMDS refusing this VM (400: no identity, 403: forbidden) is not mistaken for the vault."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": "invalid_request", "error_description": description}, status=status
        )

    app = web.Application()
    app.router.add_get("/metadata/identity/oauth2/token", refuse)
    runner, url = await serve(app, None)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", url)
    try:
        with pytest.raises(IdentityError) as info:
            await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), "t.t.t")
    finally:
        await runner.cleanup()
    assert "no access token" in info.value.message and description in info.value.message
    assert "managed identity" in (info.value.hint or "")


async def test_vault_and_kid_must_agree(releaser):
    with pytest.raises(BadRequest, match="kid names vault"):
        await releaser.release(
            KeyRef.parse("https://b.vault.azure.net/keys/k", vault="a.vault.azure.net"), "t.t.t"
        )
    with pytest.raises(BadRequest, match="no vault"):
        await releaser.release(KeyRef.parse("k", vault=None), "t.t.t")
    with pytest.raises(BadRequest, match="empty"):
        await releaser.release(KeyRef.parse("k", vault="a.vault.azure.net"), " ")
    with pytest.raises(BadRequest, match="enc 'RSA1_5'"):
        await releaser.release(KeyRef.parse("k", vault="a.vault.azure.net"), "t.t.t", enc="RSA1_5")


def test_role_names_are_azure_rbac_role_names():
    assert VAULT_RELEASE_ROLE == "Key Vault Crypto Service Release User"
    assert MANAGED_HSM_RELEASE_ROLE == "Managed HSM Crypto Service Release User"


# --- the wire is the SDK's --------------------------------------------------------------------------------


class RecordingVault:
    """A vault stand-in: a 401 Bearer challenge to a request without a token, else a release answer;
    records (method, path, query, Authorization, Content-Type, body) of every request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], str | None, str | None, bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        auth = request.headers.get("Authorization")
        self.seen.append(
            (
                request.method,
                request.path,
                dict(request.query),
                auth,
                request.headers.get("Content-Type"),
                body,
            )
        )
        if auth is None:
            challenge = 'Bearer authorization="https://login.microsoftonline.com/t", resource="https://managedhsm.azure.net"'
            return web.json_response(
                {"error": {"code": "Unauthorized"}}, status=401, headers={"WWW-Authenticate": challenge}
            )
        return web.json_response({"value": "h.p.s"})


@pytest.mark.parametrize("version", ["v1", None])
async def test_the_release_requests_are_the_ones_the_azure_sdk_sends(ca, version):
    """The real azure-keyvault-keys client and skr's releaser against the same recording vault: the same
    unauthenticated empty-bodied first request, then the same authorized release — method, path,
    api-version, content type and JSON body."""
    from azure.keyvault.keys.aio import KeyClient

    from skr.identity import StaticTokenCredential

    vault = RecordingVault()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", vault.handle)
    runner, url = await serve(app, ca)
    host = url.split("://", 1)[1]
    try:
        credentials = CredentialFactory({}, ca_bundle=ca.ca_pem_path, managed_hsm_hosts=[host])
        sdk = KeyClient(
            url,
            credentials.scoped(StaticTokenCredential("bearer-token"), url),
            verify_challenge_resource=False,
            api_version=DEFAULT_API_VERSION,
            **credentials.transport_kwargs(),
        )
        async with sdk:
            await sdk.release_key("k", "target.token.x", version=version, algorithm="CKM_RSA_AES_KEY_WRAP")
        by_sdk, vault.seen = vault.seen, []
        releaser = KeyVaultReleaser(credentials=credentials, allow_insecure_challenge_hosts=[host], sdk=FAST)
        try:
            ref = KeyRef.parse(f"k/{version}" if version else "k", vault=url)
            await releaser.release(ref, "target.token.x", access_token="bearer-token")
            await releaser.release(ref, "target.token.x", access_token="bearer-token")  # challenge remembered
        finally:
            await releaser.aclose()
    finally:
        await runner.cleanup()
    assert len(by_sdk) == 2 and len(vault.seen) == 3
    for ours, theirs in zip(vault.seen, by_sdk, strict=False):
        assert ours[:4] == theirs[:4]  # method, path, query (api-version), Authorization
        assert (ours[5] == b"") == (theirs[5] == b"")
        if ours[5]:
            assert json.loads(ours[5]) == json.loads(theirs[5]) and ours[4] == theirs[4] == "application/json"
    assert by_sdk[0][3] is None and by_sdk[1][3] == "Bearer bearer-token"
    assert vault.seen[2][:4] == vault.seen[1][:4]


@pytest.mark.parametrize(
    ("header", "scope"),
    [
        (
            'Bearer authorization="https://login.microsoftonline.com/t", resource="https://vault.azure.net"',
            "https://vault.azure.net/.default",
        ),
        (
            'Bearer authorization_uri="https://login/t", resource="https://managedhsm.azure.net/"',
            "https://managedhsm.azure.net/.default",
        ),
        (
            'Bearer authorization="https://login/t", scope="https://vault.azure.net/.default"',
            "https://vault.azure.net/.default",
        ),
        ('Bearer resource="https://vault.azure.net"', None),  # no authorization URI
        ('Basic realm="x"', None),
        ("", None),
    ],
)
def test_challenge_scope(header, scope):
    assert challenge_scope(header) == scope


def test_the_sidecar_never_loads_the_azure_sdks():
    """The sidecar's release path is skr's own client: neither azure-core nor azure-keyvault-keys is imported
    by the daemon (memory and per-release CPU); only the commands' SDK clients load them."""
    code = "import sys, skr.daemon, skr.commands.serve; print(sorted(m for m in sys.modules if 'azure' in m))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("cap", [2, 0], ids=["cap-2", "no-cap"])
async def test_connections_to_one_vault_are_capped(stack, imds_env, wrapping_key, cap):
    """Six concurrent releases through two connections take three rounds of the vault's answer time;
    with the cap off (0) they take one."""
    credentials = CredentialFactory(
        os.environ, ca_bundle=stack.ca.ca_pem_path, managed_hsm_hosts=[stack.hsm_host]
    )
    releaser = KeyVaultReleaser(
        credentials=credentials,
        allow_insecure_challenge_hosts=[stack.hsm_host],
        sdk=dataclasses.replace(FAST, max_connections=cap),
    )
    try:
        await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
        token = await stack.target_token(wrapping_key)
        await releaser.release(
            KeyRef.parse("k", vault=stack.hsm_host), token
        )  # challenge + identity token, outside the timing
        stack.faults.add(FaultRule(route="hsm.release", action="delay", seconds=0.4, times=6))
        started = asyncio.get_running_loop().time()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(releaser.release(KeyRef.parse("k", vault=stack.hsm_host), token) for _ in range(6))
            ),
            timeout=10,
        )
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await releaser.aclose()
        await credentials.aclose()
    assert all(r.jws for r in results)
    if cap:
        assert elapsed >= 3 * 0.4 - 0.05, f"6 releases over 2 connections took {elapsed:.2f} s"
    else:
        assert elapsed < 3 * 0.4 - 0.05, f"6 uncapped releases took {elapsed:.2f} s"
