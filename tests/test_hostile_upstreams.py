"""Hostile upstreams get nothing: no redirect is followed, a token is requested only for the vault kind's
own scope, no answer is buffered past the cap, the released key is the requested key, OpenID metadata
cannot send skr elsewhere, an upstream's error text is not echoed, and connection failures say why.

Every hostile stand-in is a tiny aiohttp server on 127.0.0.1 (HTTPS from the session's local CA where the
client insists on TLS); a redirect target is a bare TCP listener that counts the connections it accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from azure.core.credentials import AccessToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.akv.jws import check_released_key_id
from skr.akv.release import KeyVaultReleaser, SdkSettings, VaultError
from skr.config import Settings, load_settings
from skr.endpoints import Allowlist, KeyRef, parse_endpoint
from skr.errors import ConfigError, JwsError, ReleaseDenied, TokenError, UpstreamError, UpstreamTimeout
from skr.identity import CredentialFactory, VaultScopedCredential
from skr.local.ca import LocalCA
from skr.maa.token import TokenVerifier
from skr.server import http_status
from skr.snp.collateral import CollateralClient, CollateralSource
from skr.upstream import RetryPolicy, request
from tests.e2e import post, serve_local, stack_session
from tests.kvstack import point_imds_at, serve
from tests.sidecars import audit_records, extra_sidecar

ONE = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
SDK = SdkSettings(retry=ONE, connection_timeout=2, read_timeout=5)
CHUNK = b"x" * 65536


# --- stand-ins ---------------------------------------------------------------------------------------------


class Listener:
    """A bare TCP listener on 127.0.0.1 that counts the connections it accepts (and answers nothing)."""

    def __init__(self) -> None:
        self.connections = 0
        self.authority = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.authority = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def hostile(handler: Handler, ca: LocalCA | None = None) -> AsyncIterator[tuple[str, list[str]]]:
    """Serve ``handler`` for every path; yields (base URL, the requests it saw as 'METHOD /path')."""
    seen: list[str] = []

    async def recording(req: web.Request) -> web.StreamResponse:
        seen.append(f"{req.method} {req.path}")
        return await handler(req)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recording)
    runner, url = await serve(app, ca)
    try:
        yield url, seen
    finally:
        await runner.cleanup()


def redirect_to(target: str, status: int = 307) -> Handler:
    async def answer(req: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"https://{target}/stolen"})

    return answer


def endless(*, declared: int | None = None, total: int | None = None) -> Handler:
    """200 with chunks of 64 KiB: forever, or ``total`` bytes; ``declared`` sets Content-Length."""

    async def answer(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared is not None:
            resp.content_length = declared
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(req)
        sent = 0
        try:
            while total is None or sent < total:
                await resp.write(CHUNK)
                sent += len(CHUNK)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    return answer


class RecordingCredential:
    """An AsyncTokenCredential that records every scope it is asked for and hands out a dummy token."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("dummy-access-token", int(time.time()) + 3600)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> RecordingCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class RecordingFactory(CredentialFactory):
    def __init__(self, credential: RecordingCredential, **kwargs: Any) -> None:
        super().__init__({}, **kwargs)
        self.recorder = credential

    def _create_ambient(self) -> Any:
        return self.recorder


def challenge(resource: str) -> Handler:
    """A vault that challenges every bearer-less request for ``resource`` and answers 403 otherwise."""

    async def answer(req: web.Request) -> web.Response:
        if not req.headers.get("Authorization"):
            header = f'Bearer authorization="https://login.microsoftonline.com/tenant", resource="{resource}"'
            return web.json_response(
                {"error": {"code": "Unauthorized", "message": "no bearer"}},
                status=401,
                headers={"WWW-Authenticate": header},
            )
        return web.json_response({"error": {"code": "Forbidden", "message": "denied"}}, status=403)

    return answer


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _netloc(url: str) -> str:
    return url.split("://", 1)[1]


# --- no redirects ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_an_error_naming_its_target_and_the_target_gets_no_connection(status):
    async with (
        Listener() as target,
        hostile(redirect_to(target.authority, status)) as (url, seen),
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(UpstreamError) as info:
            await request(session, "GET", f"{url}/thing", service="Test Service", retry=ONE)
    assert info.value.code == "upstream_redirect" and http_status(info.value) == 502
    assert target.authority in info.value.message
    assert seen == ["GET /thing"]  # not retried
    assert target.connections == 0


async def test_the_attestation_issuer_metadata_cannot_redirect(ca):
    async with (
        Listener() as target,
        hostile(redirect_to(target.authority), ca) as (url, seen),
        aiohttp.ClientSession() as session,
    ):
        verifier = TokenVerifier(session, ssl_context=ca.client_ssl_context(), retry=ONE)
        with pytest.raises(UpstreamError) as info:
            await verifier.verify(_maa_like_token(url), issuer=url)
    assert info.value.code == "upstream_redirect" and target.authority in info.value.message
    assert seen == ["GET /.well-known/openid-configuration"] and target.connections == 0


async def test_a_certificate_source_cannot_redirect():
    async with (
        Listener() as target,
        hostile(redirect_to(target.authority, 302)) as (url, seen),
        aiohttp.ClientSession() as session,
    ):
        client = CollateralClient(
            session, source=CollateralSource.LOCAL_THIM, thim_url=f"{url}/metadata/THIM/amd/certification"
        )
        with pytest.raises(UpstreamError) as info:
            await client.fetch_thim()
    assert info.value.code == "upstream_redirect" and target.authority in info.value.message
    assert len(seen) == 1 and target.connections == 0


async def test_key_vault_does_not_follow_a_redirect_with_the_release_body(ca):
    async with Listener() as target, hostile(redirect_to(target.authority), ca) as (url, seen):
        releaser = KeyVaultReleaser(
            credentials=CredentialFactory({}, ca_bundle=ca.ca_pem_path),
            allow_insecure_challenge_hosts=[_netloc(url)],
            sdk=SDK,
        )
        try:
            with pytest.raises(UpstreamError) as info:
                await releaser.release(
                    KeyRef.parse("k", vault=url), "attestation.token.here", access_token="bearer"
                )
        finally:
            await releaser.aclose()
    assert info.value.code == "upstream_redirect" and http_status(info.value) == 502
    assert target.authority in info.value.message
    assert len(seen) == 1 and target.connections == 0  # not retried, not followed


async def test_the_identity_endpoint_cannot_redirect(ca, monkeypatch):
    async with (
        Listener() as target,
        hostile(redirect_to(target.authority)) as (identity_url, identity_seen),
        hostile(challenge("https://vault.azure.net"), ca) as (vault_url, _),
    ):
        point_imds_at(monkeypatch, identity_url)
        credentials = CredentialFactory({})  # no CA bundle: the identity transport is the default one
        releaser = KeyVaultReleaser(
            credentials=credentials,
            ca_bundle=ca.ca_pem_path,
            allow_insecure_challenge_hosts=[_netloc(vault_url)],
            sdk=SDK,
        )
        try:
            with pytest.raises(UpstreamError) as info:
                await releaser.release(KeyRef.parse("k", vault=vault_url), "attestation.token.here")
        finally:
            await releaser.aclose()
            await credentials.aclose()
    assert info.value.code == "upstream_redirect" and target.authority in info.value.message
    assert identity_seen and target.connections == 0


async def test_an_untrusted_certificate_is_not_retried(ca):
    """A certificate the trust store does not accept is final: one connection, no backoff."""
    connections = 0
    tls = ca.server_ssl_context(["127.0.0.1"])

    async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.start_tls(tls)
        writer.close()

    server = await asyncio.start_server(handshake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(UpstreamError) as info:
                await request(session, "GET", f"https://127.0.0.1:{port}/", service="hostile")
    finally:
        server.close()
        await server.wait_closed()
    assert info.value.code == "upstream_tls_untrusted" and connections == 1


# --- the token scope is skr's ------------------------------------------------------------------------------


async def test_a_challenge_for_another_resource_gets_no_token_even_from_an_allow_listed_host(ca):
    recorder = RecordingCredential()
    credentials = RecordingFactory(recorder, ca_bundle=ca.ca_pem_path)
    async with hostile(challenge("https://management.azure.com"), ca) as (url, seen):
        releaser = KeyVaultReleaser(
            credentials=credentials, allow_insecure_challenge_hosts=[_netloc(url)], sdk=SDK
        )
        try:
            with pytest.raises(UpstreamError) as info:
                await releaser.release(KeyRef.parse("k", vault=url), "attestation.token.here")
        finally:
            await releaser.aclose()
    assert recorder.scopes == []
    assert info.value.code == "vault_challenge_mismatch"
    assert (
        "https://management.azure.com" in info.value.message
        and "no token was requested" in info.value.message
    )
    assert len(seen) == 1  # the bodiless challenge request only: the release body was never sent


async def test_the_token_is_requested_for_the_vault_kind_scope_as_skr_spells_it(ca):
    recorder = RecordingCredential()
    credentials = RecordingFactory(recorder, ca_bundle=ca.ca_pem_path)
    async with hostile(challenge("https://VAULT.azure.net/"), ca) as (url, _):
        releaser = KeyVaultReleaser(
            credentials=credentials, allow_insecure_challenge_hosts=[_netloc(url)], sdk=SDK
        )
        try:
            with pytest.raises(ReleaseDenied):  # the stand-in answers 403 to the authorized request
                await releaser.release(KeyRef.parse("k", vault=url), "attestation.token.here")
        finally:
            await releaser.aclose()
    assert recorder.scopes == [("https://vault.azure.net/.default",)]


async def test_a_configured_managed_hsm_gets_only_the_managed_hsm_scope():
    recorder = RecordingCredential()
    scoped = CredentialFactory({}, managed_hsm_hosts=["127.0.0.1"]).scoped(recorder, "https://127.0.0.1:8443")
    with pytest.raises(UpstreamError) as info:
        await scoped.get_token("https://vault.azure.net/.default")
    assert info.value.code == "vault_challenge_mismatch" and recorder.scopes == []
    await scoped.get_token("https://managedhsm.azure.net/.default")
    assert recorder.scopes == [("https://managedhsm.azure.net/.default",)]


@pytest.mark.parametrize(
    "asked",
    [
        ("https://management.azure.com/.default",),
        ("https://graph.microsoft.com/.default",),
        ("https://vault.azure.cn/.default",),  # another cloud's vault is another resource
        ("https://vault.azure.net/.default", "https://management.azure.com/.default"),
        (),
    ],
)
async def test_an_azure_vault_token_is_only_for_its_own_cloud_and_kind(asked):
    recorder = RecordingCredential()
    scoped = VaultScopedCredential(
        recorder, "https://v.vault.azure.net", ("https://vault.azure.net/.default",)
    )
    with pytest.raises(UpstreamError):
        await scoped.get_token(*asked)
    with pytest.raises(UpstreamError):
        await scoped.get_token_info(*asked)
    assert recorder.scopes == []


# --- bounded bodies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [endless(declared=200 * 1024 * 1024), endless(), endless(total=200 * 1024 * 1024)],
    ids=["content-length 200 MB", "endless chunked", "200 MB chunked"],
)
async def test_an_answer_over_the_cap_is_upstream_too_large_and_not_retried(answer):
    async with hostile(answer) as (url, seen), aiohttp.ClientSession() as session:
        with pytest.raises(UpstreamError) as info:
            await request(session, "GET", f"{url}/x", service="Test Service", retry=ONE, max_body=1024 * 1024)
    assert info.value.code == "upstream_too_large" and http_status(info.value) == 502
    assert "1048576 bytes" in info.value.message and seen == ["GET /x"]


async def test_certificates_are_capped():
    async with hostile(endless()) as (url, _), aiohttp.ClientSession() as session:
        client = CollateralClient(
            session, source=CollateralSource.LOCAL_THIM, thim_url=f"{url}/thim", max_body=256 * 1024
        )
        with pytest.raises(UpstreamError) as info:
            await client.fetch_thim()
    assert info.value.code == "upstream_too_large"


async def test_the_key_vault_release_answer_is_capped(ca):
    async with hostile(endless(), ca) as (url, _):
        releaser = KeyVaultReleaser(
            credentials=CredentialFactory({}, ca_bundle=ca.ca_pem_path),
            allow_insecure_challenge_hosts=[_netloc(url)],
            sdk=SdkSettings(retry=ONE, connection_timeout=2, read_timeout=5, max_body=512 * 1024),
        )
        try:
            with pytest.raises(UpstreamError) as info:
                await releaser.release(
                    KeyRef.parse("k", vault=url), "attestation.token.here", access_token="bearer"
                )
        finally:
            await releaser.aclose()
    assert info.value.code == "upstream_too_large" and "Key Vault" in info.value.message


def test_the_cap_is_configurable_with_skr_max_upstream_body(tmp_path):
    base = Settings(state_dir=tmp_path)
    assert base.max_upstream_body == 4 * 1024 * 1024
    assert load_settings(env={"SKR_MAX_UPSTREAM_BODY": "1048576"}, base=base).max_upstream_body == 1048576
    with pytest.raises(ConfigError):
        load_settings(env={"SKR_MAX_UPSTREAM_BODY": "lots"}, base=base)


_PEAK_CHILD = r"""
import asyncio, json, sys
from pathlib import Path

def peak() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM")

async def main(mode: str, url: str, ca: str) -> None:
    import aiohttp
    import azure.keyvault.keys.aio  # noqa: F401 - loaded before the measurement
    from skr.akv.release import KeyVaultReleaser, SdkSettings
    from skr.endpoints import KeyRef
    from skr.errors import SkrError
    from skr.upstream import RetryPolicy, request
    from skr.identity import CredentialFactory

    one = RetryPolicy(attempts=1)
    code = None
    async with aiohttp.ClientSession() as session:
        try:
            if mode == "http":
                await request(session, "GET", url, service="hostile", retry=one)
            else:
                releaser = KeyVaultReleaser(
                    credentials=CredentialFactory({}, ca_bundle=Path(ca)),
                    allow_insecure_challenge_hosts=[url.split("://", 1)[1]],
                    sdk=SdkSettings(retry=one),
                )
                try:
                    await releaser.release(KeyRef.parse("k", vault=url), "t.t.t", access_token="bearer")
                finally:
                    await releaser.aclose()
        except SkrError as exc:
            code = exc.code
    print(json.dumps({"code": code, "peak": peak()}))

asyncio.run(main(*sys.argv[1:4]))
"""


async def _peak_of_a_client(mode: str, url: str, ca: LocalCA) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PEAK_CHILD,
        mode,
        url,
        str(ca.ca_pem_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def _small_error(req: web.Request) -> web.Response:
    return web.json_response({"error": {"code": "Gone", "message": "x" * 1024}}, status=410)


@pytest.mark.parametrize("mode", ["http", "keyvault"])
@pytest.mark.parametrize("answer", [endless(total=200 * 1024 * 1024), endless()], ids=["200 MB", "endless"])
async def test_peak_memory_stays_within_a_few_mib_of_normal_under_a_hostile_answer(ca, mode, answer):
    tls = ca if mode == "keyvault" else None
    async with hostile(_small_error, tls) as (normal_url, _):
        normal = await _peak_of_a_client(mode, f"{normal_url}/x" if mode == "http" else normal_url, ca)
    async with hostile(answer, tls) as (url, _):
        flooded = await _peak_of_a_client(mode, f"{url}/x" if mode == "http" else url, ca)
    assert flooded["code"] == "upstream_too_large", flooded
    grown = flooded["peak"] - normal["peak"]
    assert grown < 10 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.1f} MiB over a normal error answer"


# --- the released key is the requested key --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kid", "name", "version", "wrong"),
    [
        ("https://v.vault.azure.net/keys/other/0123abcd", "mykey", None, "key 'other'"),
        ("https://evil.vault.azure.net/keys/mykey/0123abcd", "mykey", None, "vault 'evil.vault.azure.net'"),
        ("https://v.vault.azure.net/keys/mykey/ffff0000", "mykey", "0123abcd", "version 'ffff0000'"),
        ("https://v.vault.azure.net/keys/mykey", "mykey", "0123abcd", "version ''"),
        ("https://v.vault.azure.net/secrets/mykey/0123abcd", "mykey", None, "key ''"),
        ("not a url", "mykey", None, "vault ''"),
    ],
)
def test_a_released_key_id_that_names_another_key_is_refused(kid, name, version, wrong):
    with pytest.raises(JwsError) as info:
        check_released_key_id(kid, host=parse_endpoint("v.vault.azure.net"), name=name, version=version)
    assert info.value.code == "release_jws_invalid" and wrong in info.value.message


def test_the_released_key_id_of_the_requested_key_passes():
    check_released_key_id(
        "https://V.vault.azure.net/keys/MyKey/0123ABCD",
        host=parse_endpoint("v.vault.azure.net"),
        name="mykey",
    )
    check_released_key_id(
        "https://127.0.0.1:8443/keys/k/0123abcd",
        host=parse_endpoint("127.0.0.1"),
        name="k",
        version="0123ABCD",
    )


def _key_swapping_proxy(hsm: str, ca: LocalCA, rewritten: list[str]) -> web.Application:
    """Forwards to the real key service, but asks it for demo-rsa whenever demo-oct is requested."""

    async def swap_key(req: web.Request) -> web.Response:
        path = req.path_qs.replace("/keys/demo-oct/", "/keys/demo-rsa/", 1)
        if path != req.path_qs:
            rewritten.append(req.method)
        headers = {k: v for k, v in req.headers.items() if k.lower() in ("authorization", "content-type")}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                req.method,
                f"{hsm}{path}",
                data=await req.read(),
                headers=headers,
                ssl=ca.client_ssl_context(),
            ) as resp,
        ):
            keep = {
                k: v for k, v in resp.headers.items() if k.lower() in ("www-authenticate", "content-type")
            }
            return web.Response(status=resp.status, body=await resp.read(), headers=keep)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", swap_key)
    return app


async def test_a_vault_answering_kid_a_with_key_b_releases_nothing_and_the_audit_says_so(tmp_path):
    rewritten: list[str] = []
    async for stack, _ in stack_session(tmp_path / "stack"):
        ca = LocalCA.load_or_create(stack.options.state_dir / "ca")
        app = _key_swapping_proxy(stack.info["key_vault_url"], ca, rewritten)
        assert stack.runtime is not None
        async with serve_local(app, ca.server_ssl_context(["127.0.0.1"])) as proxy:
            allow = stack.runtime.settings.allowlist.extended([proxy])
            async with (
                extra_sidecar(stack, allowlist=allow) as (runtime, base),
                aiohttp.ClientSession(base_url=base) as client,
            ):
                request_id = "swap-" + uuid.uuid4().hex[:12]
                status, body = await post(
                    client,
                    "/key/release",
                    {"kid": "demo-oct", "akv_endpoint": proxy},
                    headers={"X-Request-Id": request_id},
                )
                records = audit_records(runtime.settings.audit_log, request_id)
    assert rewritten, "the stand-in never saw the release"
    assert status == 502 and body["code"] == "release_jws_invalid", body
    assert "demo-rsa" in body["error"] and "key" not in body
    decisions = [r for r in records if r.get("event") == "key.release"]
    assert [(r["outcome"], r["error_code"]) for r in decisions] == [("error", "release_jws_invalid")]


# --- OpenID metadata and error bodies --------------------------------------------------------------------


def _maa_like_token(issuer: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    claims = {"iss": issuer, "exp": int(time.time()) + 600}
    return jwt.encode(claims, pem, algorithm="RS256", headers={"kid": "k1"})


async def test_jwks_uri_on_another_origin_gets_no_connection(ca):
    async with Listener() as elsewhere:

        async def metadata(req: web.Request) -> web.Response:
            issuer = f"https://{req.host}"
            return web.json_response({"issuer": issuer, "jwks_uri": f"https://{elsewhere.authority}/certs"})

        async with hostile(metadata, ca) as (url, seen), aiohttp.ClientSession() as session:
            verifier = TokenVerifier(session, ssl_context=ca.client_ssl_context(), retry=ONE)
            with pytest.raises(TokenError) as info:
                await verifier.verify(_maa_like_token(url), issuer=url)
    assert elsewhere.authority in info.value.message and "no request was sent" in info.value.message
    assert seen == ["GET /.well-known/openid-configuration"] and elsewhere.connections == 0


@pytest.mark.parametrize(
    "jwks_uri", ["https://[::1/certs", "https://bad_host.example/certs", "http://127.0.0.1/c"]
)
async def test_a_jwks_uri_that_is_no_https_url_is_refused_cleanly(ca, jwks_uri):
    async def metadata(req: web.Request) -> web.Response:
        return web.json_response({"issuer": f"https://{req.host}", "jwks_uri": jwks_uri})

    async with hostile(metadata, ca) as (url, seen), aiohttp.ClientSession() as session:
        verifier = TokenVerifier(session, ssl_context=ca.client_ssl_context(), retry=ONE)
        with pytest.raises(TokenError, match="jwks_uri"):
            await verifier.verify(_maa_like_token(url), issuer=url)
    assert seen == ["GET /.well-known/openid-configuration"]


async def test_jwks_uri_on_an_allow_listed_host_is_fetched(ca):
    async def jwks(req: web.Request) -> web.Response:
        return web.json_response({"keys": []})

    async with hostile(jwks, ca) as (keys_url, keys_seen):

        async def metadata(req: web.Request) -> web.Response:
            return web.json_response({"issuer": f"https://{req.host}", "jwks_uri": f"{keys_url}/certs"})

        async with hostile(metadata, ca) as (url, _), aiohttp.ClientSession() as session:
            allowlist = Allowlist.parse(_netloc(keys_url))
            verifier = TokenVerifier(
                session, ssl_context=ca.client_ssl_context(), retry=ONE, allowlist=allowlist
            )
            with pytest.raises(TokenError, match="does not publish"):
                await verifier.verify(_maa_like_token(url), issuer=url)
    assert keys_seen == ["GET /certs"]


async def test_an_upstream_error_body_is_reduced_to_its_code(ca):
    text = "Visit https://phish.example/login and paste your token"

    async def refuse(req: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "InvalidIssuer", "message": text}}, status=404)

    async with hostile(refuse, ca) as (url, _), aiohttp.ClientSession() as session:
        verifier = TokenVerifier(session, ssl_context=ca.client_ssl_context(), retry=ONE)
        with pytest.raises(UpstreamError) as info:
            await verifier.verify(_maa_like_token(url), issuer=url)
    assert "HTTP 404: InvalidIssuer" in info.value.message
    assert "phish" not in info.value.diagnostics()


def test_a_vault_error_keeps_codes_and_claim_names_but_not_its_text():
    error = VaultError(
        status=403,
        code="Forbidden",
        message="Target environment attestation statement cannot be verified: claim x-ms-sevsnpvm-hostdata "
        "does not match (AKV.SKR.1004). Call +1-555-0100 for help.",
        inner_code="AccessDenied",
    )
    text = error.summary()
    assert text.startswith("HTTP 403 Forbidden")
    assert "x-ms-sevsnpvm-hostdata" in text and "AKV.SKR.1004" in text and "AccessDenied" in text
    assert "555" not in text and "Target environment" not in text
    policy = VaultError(
        status=403,
        code="Forbidden",
        message=f"Target environment attestation statement cannot be verified. x-ms-sevsnpvm-hostdata: "
        f"expected {'ab' * 32}, found {'cd' * 32}; x-ms-compliance-status: expected azure-compliant-uvm, "
        "found see https://evil.example for details",
        inner_code="AccessDenied",
    )
    text = policy.summary()
    assert f"x-ms-sevsnpvm-hostdata expected {'ab' * 32}, found {'cd' * 32}" in text
    assert "x-ms-compliance-status" in text and "evil" not in text and "Target" not in text
    odd = VaultError(status=400, code="<script>", message="", inner_code="\nx")
    assert odd.summary() == "HTTP 400"


# --- connection failures say where and why ---------------------------------------------------------------


class _NoSuchName(aiohttp.abc.AbstractResolver):
    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        return None


async def test_a_dns_failure_names_the_host_and_the_cause():
    connector = aiohttp.TCPConnector(resolver=_NoSuchName())
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(UpstreamError) as info:
            await request(
                session, "GET", "http://nosuch.attest.example:8443/x", service="Test Service", retry=ONE
            )
    assert info.value.code == "upstream_unreachable"
    assert "nosuch.attest.example:8443" in info.value.message and "DNS name not found" in info.value.message


async def test_a_refused_connection_names_the_host_and_the_cause():
    port = closed_port()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(UpstreamError) as info:
            await request(session, "GET", f"http://127.0.0.1:{port}/x", service="Test Service", retry=ONE)
    assert info.value.code == "upstream_unreachable"
    assert f"127.0.0.1:{port}" in info.value.message and "connection refused" in info.value.message


async def test_a_tls_failure_names_the_host_and_the_cause():
    async def plain(req: web.Request) -> web.Response:
        return web.Response(text="not TLS")

    async with hostile(plain) as (url, _), aiohttp.ClientSession() as session:
        https = url.replace("http://", "https://")
        with pytest.raises(UpstreamError) as info:
            await request(session, "GET", f"{https}/x", service="Test Service", retry=ONE)
    assert info.value.code == "upstream_unreachable"
    assert _netloc(url) in info.value.message and "TLS failure" in info.value.message


async def test_a_timeout_names_the_host_and_the_cause():
    answered = asyncio.Event()

    async def stall(req: web.Request) -> web.Response:
        await answered.wait()
        return web.Response()

    async with hostile(stall) as (url, _), aiohttp.ClientSession() as session:
        with pytest.raises(UpstreamTimeout) as info:
            await request(session, "GET", f"{url}/x", service="Test Service", timeout=0.2, retry=ONE)
        answered.set()
    assert _netloc(url) in info.value.message and "timeout" in info.value.message


async def test_an_unreachable_vault_names_the_host_and_the_cause():
    port = closed_port()
    releaser = KeyVaultReleaser(
        credentials=CredentialFactory({}), allow_insecure_challenge_hosts=[f"127.0.0.1:{port}"], sdk=SDK
    )
    try:
        with pytest.raises(UpstreamError) as info:
            await releaser.release(
                KeyRef.parse("k", vault=f"127.0.0.1:{port}"), "t.t.t", access_token="bearer"
            )
    finally:
        await releaser.aclose()
    assert info.value.code == "upstream_unreachable"
    assert f"127.0.0.1:{port}" in info.value.message and "connection refused" in info.value.message
