"""The MAA client: the AttestSevSnpVm wire format, endpoint rules, retries and error mapping.

Requests go to a local HTTPS server (TLS from skr.local.ca.LocalCA) that records what it receives; the
recorded body is decoded here with the standard library, independently of the client's encoder.
"""

import asyncio
import base64
import json
import ssl
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from skr import __version__
from skr.endpoints import parse_endpoint
from skr.errors import AttestationFailed, BadRequest, UpstreamError, UpstreamTimeout
from skr.evidence.base import Evidence
from skr.local.ca import LocalCA
from skr.maa.client import (
    MaaClient,
    b64url_decode,
    build_request_body,
    decode_report,
    encode_report,
    normalize_endpoint,
)
from skr.upstream import Deadline, RetryPolicy
from tests.e2e import serve_local as serve

FAST_RETRY = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
FAKE_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.c2ln"


# --- helpers --------------------------------------------------------------------------------------


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Recorder:
    """A fake MAA that records requests and answers from a script of (status, body) pairs."""

    def __init__(self, *answers: tuple[int, object], delay: float = 0.0) -> None:
        self.answers = list(answers)
        self.delay = delay
        self.requests: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return web.json_response(body, status=status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for 127.0.0.1, client context trusting the local CA)."""
    ca = LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))
    return ca.server_ssl_context(["127.0.0.1"]), ca.client_ssl_context()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def aci_evidence(vectors) -> Evidence:
    maa = vectors / "maa"
    return Evidence(
        report=(maa / "sevsnpvm-aci-request.snp_report.DERIVED.bin").read_bytes(),
        vcek_chain_pem=(maa / "sevsnpvm-aci-request.vcek_chain.DERIVED.pem").read_bytes(),
        provider="test",
    )


RUNTIME = b'{"keys":[{"e":"AQAB","key_ops":["encrypt"],"kid":"k1","kty":"RSA","n":"AQAB"}]}'


# --- the report envelope ----------------------------------------------------------------------------


def test_encode_report_reproduces_the_genuine_maa_request_byte_for_byte(vectors, aci_evidence):
    genuine = (vectors / "maa/sevsnpvm-aci-request.report.EXTRACTED.b64url").read_text().strip()
    assert encode_report(aci_evidence) == genuine


def test_genuine_request_envelope_decodes_to_the_report_and_chain(vectors, aci_evidence):
    genuine = (vectors / "maa/sevsnpvm-aci-request.report.EXTRACTED.b64url").read_text().strip()
    bundle = json.loads(unb64url(genuine))
    assert list(bundle) == ["SnpReport", "VcekCertChain"]
    assert unb64url(bundle["SnpReport"]) == aci_evidence.report
    assert unb64url(bundle["VcekCertChain"]) == aci_evidence.vcek_chain_pem
    ours = json.loads(unb64url(encode_report(aci_evidence)))
    assert ours.keys() == bundle.keys()


def test_uvm_endorsement_is_nested_base64url_json(vectors, aci_evidence):
    cose = (vectors / "snp/aci-confidential-sidecar/body.uvm_reference_info.bin").read_bytes()
    evidence = Evidence(aci_evidence.report, aci_evidence.vcek_chain_pem, "test", uvm_endorsements=cose)
    bundle = json.loads(unb64url(encode_report(evidence)))
    assert list(bundle) == ["SnpReport", "VcekCertChain", "Endorsements"]
    endorsements = json.loads(unb64url(bundle["Endorsements"]))
    assert endorsements == {"Uvm": [base64.urlsafe_b64encode(cose).decode().rstrip("=")]}
    assert decode_report(encode_report(evidence)).uvm_endorsements == (cose,)


def test_decode_report_accepts_go_style_padded_base64url(aci_evidence):
    def padded(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode()

    bundle = {"SnpReport": padded(aci_evidence.report), "VcekCertChain": padded(aci_evidence.vcek_chain_pem)}
    envelope = decode_report(padded(json.dumps(bundle).encode()))
    assert envelope.report == aci_evidence.report
    assert envelope.vcek_chain_pem == aci_evidence.vcek_chain_pem


@pytest.mark.parametrize(
    "value",
    ["", "not base64!", base64.urlsafe_b64encode(b"[1]").decode(), base64.urlsafe_b64encode(b"{}").decode()],
)
def test_decode_report_refuses_malformed_envelopes(value):
    with pytest.raises(BadRequest):
        decode_report(value)


def test_b64url_decode_refuses_standard_base64_alphabet():
    with pytest.raises(BadRequest):
        b64url_decode("ab+/")


def test_request_body_uses_camel_case_and_unpadded_base64url(aci_evidence):
    body = build_request_body(aci_evidence, RUNTIME, nonce="n-1")
    assert set(body) == {"report", "runtimeData", "nonce"}
    assert body["runtimeData"]["dataType"] == "JSON"
    assert unb64url(body["runtimeData"]["data"]) == RUNTIME
    assert "=" not in body["runtimeData"]["data"] and "=" not in body["report"]
    assert body["nonce"] == "n-1"
    assert "nonce" not in build_request_body(aci_evidence, RUNTIME)


# --- endpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("sharedeus2.eus2.attest.azure.net", "https://sharedeus2.eus2.attest.azure.net"),
        ("SharedEUS2.EUS2.attest.azure.net", "https://sharedeus2.eus2.attest.azure.net"),
        ("sharedeus2.eus2.attest.azure.net:8443", "https://sharedeus2.eus2.attest.azure.net:8443"),
        ("https://sharedeus2.eus2.attest.azure.net", "https://sharedeus2.eus2.attest.azure.net"),
        ("https://sharedeus2.eus2.attest.azure.net/", "https://sharedeus2.eus2.attest.azure.net"),
        ("HTTPS://Host.Example:443", "https://host.example"),
        ("  127.0.0.1:9000 ", "https://127.0.0.1:9000"),
        ("[::1]:8443", "https://[::1]:8443"),
        ("https://[::1]", "https://[::1]"),
        ("localhost", "https://localhost"),
    ],
)
def test_endpoint_normalization(given, normalized):
    assert normalize_endpoint(given) == normalized


@pytest.mark.parametrize(
    "given",
    [
        "",
        "   ",
        "http://sharedeus2.eus2.attest.azure.net",
        "ftp://host",
        "https://user@host",
        "https://user:secret@host",
        "user@host",
        "host/attest/SevSnpVm",
        "https://host/path",
        "host?api-version=1",
        "https://host#fragment",
        "host:0",
        "host:99999",
        "host:port",
        "ho st",
        "-bad-.example",
        "https://",
        "bad_host.example",
    ],
)
def test_endpoint_refusals(given):
    with pytest.raises(BadRequest):
        normalize_endpoint(given)


# --- the HTTP exchange ----------------------------------------------------------------------------


async def test_attest_posts_the_documented_request_and_returns_the_token(tls, session, aci_evidence):
    server_ctx, client_ctx = tls
    fake = Recorder((200, {"token": FAKE_JWT}))
    async with serve(fake.app(), server_ctx) as host:
        client = MaaClient(session, ssl_context=client_ctx, retry=FAST_RETRY)
        token = await client.attest(parse_endpoint(host), aci_evidence, RUNTIME, nonce="abc")
    assert token == FAKE_JWT
    (seen,) = fake.requests
    assert seen["path"] == "/attest/SevSnpVm"
    assert seen["query"] == {"api-version": "2022-08-01"}
    assert seen["headers"]["Content-Type"] == "application/json"
    assert seen["headers"]["User-Agent"] == f"skr/{__version__}"
    assert "Authorization" not in seen["headers"]
    body = json.loads(seen["body"])
    assert set(body) == {"report", "runtimeData", "nonce"}
    assert body["nonce"] == "abc"
    assert body["runtimeData"] == {
        "data": base64.urlsafe_b64encode(RUNTIME).decode().rstrip("="),
        "dataType": "JSON",
    }
    bundle = json.loads(unb64url(body["report"]))
    assert unb64url(bundle["SnpReport"]) == aci_evidence.report
    assert unb64url(bundle["VcekCertChain"]) == aci_evidence.vcek_chain_pem
    assert "Endorsements" not in bundle


async def test_every_request_carries_a_fresh_random_nonce_byte_for_byte(vectors, tls, session, aci_evidence):
    server_ctx, client_ctx = tls
    fake = Recorder((200, {"token": FAKE_JWT}))
    async with serve(fake.app(), server_ctx) as host:
        client = MaaClient(session, ssl_context=client_ctx, retry=FAST_RETRY)
        await client.attest(parse_endpoint(host), aci_evidence, RUNTIME)
        await client.attest(parse_endpoint(host), aci_evidence, RUNTIME)
    nonces = [json.loads(seen["body"])["nonce"] for seen in fake.requests]
    for nonce in nonces:  # a random uint64 in decimal, like the Go sidecar's, as the string MAA specifies
        assert isinstance(nonce, str) and nonce.isdigit() and 0 <= int(nonce) < 2**64
    assert nonces[0] != nonces[1]
    # the whole body, rebuilt here from the genuine report string: compact JSON, nonce last, top level
    genuine = (vectors / "maa/sevsnpvm-aci-request.report.EXTRACTED.b64url").read_text().strip()
    runtime = base64.urlsafe_b64encode(RUNTIME).decode().rstrip("=")
    expected = (
        '{"report":"' + genuine + '","runtimeData":{"data":"' + runtime + '","dataType":"JSON"},'
        '"nonce":"' + nonces[0] + '"}'
    ).encode()
    assert fake.requests[0]["body"] == expected


def test_the_genuine_request_without_a_nonce_is_still_built_byte_for_byte(vectors, aci_evidence):
    genuine = (vectors / "maa/sevsnpvm-aci-request.report.EXTRACTED.b64url").read_text().strip()
    body = build_request_body(aci_evidence, RUNTIME)
    assert body["report"] == genuine and "nonce" not in body


async def test_go_sidecar_path_and_version_are_one_setting_away(tls, session, aci_evidence):
    server_ctx, client_ctx = tls
    fake = Recorder((200, {"token": FAKE_JWT}))
    async with serve(fake.app(), server_ctx) as host:
        client = MaaClient(
            session,
            ssl_context=client_ctx,
            tee_path="SevSnpVM",
            api_version="2020-10-01",
            user_agent="ConfidentialSkrContainer",
        )
        await client.attest(parse_endpoint(f"https://{host}/"), aci_evidence, RUNTIME)
    (seen,) = fake.requests
    assert seen["path"] == "/attest/SevSnpVM"
    assert seen["query"] == {"api-version": "2020-10-01"}
    assert seen["headers"]["User-Agent"] == "ConfidentialSkrContainer"


async def test_token_member_is_read_case_insensitively(tls, session, aci_evidence):
    server_ctx, client_ctx = tls
    async with serve(Recorder((200, {"Token": FAKE_JWT})).app(), server_ctx) as host:
        token = await MaaClient(session, ssl_context=client_ctx).attest(
            parse_endpoint(host), aci_evidence, RUNTIME
        )
    assert token == FAKE_JWT


async def test_503_is_retried_then_200_succeeds(tls, session, aci_evidence):
    server_ctx, client_ctx = tls
    fake = Recorder(
        (503, {"error": {"code": "ServiceUnavailable", "message": "busy"}}), (200, {"token": FAKE_JWT})
    )
    async with serve(fake.app(), server_ctx) as host:
        token = await MaaClient(session, ssl_context=client_ctx, retry=FAST_RETRY).attest(
            parse_endpoint(host), aci_evidence, RUNTIME
        )
    assert token == FAKE_JWT
    assert len(fake.requests) == 2
    assert fake.requests[0]["body"] == fake.requests[1]["body"]


async def test_400_is_not_retried_and_the_maa_error_is_summarized(tls, session, aci_evidence):
    server_ctx, client_ctx = tls
    error = {"error": {"code": "InvalidParameter", "message": "Report data mismatch"}}
    fake = Recorder((400, error))
    async with serve(fake.app(), server_ctx) as host:
        with pytest.raises(AttestationFailed) as info:
            await MaaClient(session, ssl_context=client_ctx, retry=FAST_RETRY).attest(
                parse_endpoint(host), aci_evidence, RUNTIME
            )
    assert len(fake.requests) == 1
    assert "HTTP 400" in info.value.message and info.value.upstream_status == 400
    assert "InvalidParameter" in info.value.message
    assert "Report data mismatch" not in info.value.diagnostics()  # the upstream's text is not echoed
    assert info.value.hint is not None
    assert info.value.hint.startswith("the attestation service refused the evidence: InvalidParameter")


async def test_200_without_a_token_is_an_attestation_failure(tls, session, aci_evidence):
    server_ctx, client_ctx = tls
    async with serve(Recorder((200, {"jwt": "not-a-token"})).app(), server_ctx) as host:
        with pytest.raises(AttestationFailed) as info:
            await MaaClient(session, ssl_context=client_ctx).attest(
                parse_endpoint(host), aci_evidence, RUNTIME
            )
    assert "not-a-token" not in info.value.diagnostics()


async def test_slow_service_runs_into_the_deadline(tls, session, aci_evidence):
    server_ctx, client_ctx = tls
    fake = Recorder((200, {"token": FAKE_JWT}), delay=2.0)
    async with serve(fake.app(), server_ctx) as host:
        client = MaaClient(session, ssl_context=client_ctx, timeout=0.2, retry=FAST_RETRY)
        with pytest.raises(UpstreamTimeout):
            await client.attest(parse_endpoint(host), aci_evidence, RUNTIME, deadline=Deadline.after(0.5))


async def test_tls_is_verified_against_the_trust_store(tls, session, aci_evidence):
    server_ctx, _ = tls
    fake = Recorder((200, {"token": FAKE_JWT}))
    async with serve(fake.app(), server_ctx) as host:
        client = MaaClient(session, ssl_context=ssl.create_default_context(), retry=FAST_RETRY)
        with pytest.raises(UpstreamError) as info:
            await client.attest(parse_endpoint(host), aci_evidence, RUNTIME)
    assert info.value.code == "upstream_tls_untrusted"
    assert fake.requests == []


async def test_http_endpoints_are_refused_before_any_connection(session, aci_evidence):
    with pytest.raises(BadRequest):
        await MaaClient(session).attest(parse_endpoint("http://127.0.0.1:1"), aci_evidence, RUNTIME)


async def test_client_settings_are_validated(session):
    with pytest.raises(BadRequest):
        MaaClient(session, tee_path="SevSnpVm/../x")
    with pytest.raises(BadRequest):
        MaaClient(session, api_version="2022-08-01&x=1")
