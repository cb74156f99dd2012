"""MAA token verification: genuine production tokens against the recorded JWKS, and every refusal.

The issuer of the genuine tokens is https://sharedweu.weu.attest.azure.net; its JWKS snapshot is served
by a local HTTPS server and the verifier is pointed at it with ``metadata_url_for`` (the trust path is
otherwise identical: metadata → jwks_uri → key by kid from x5c[0]).
"""

import asyncio
import base64
import json
import ssl
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.errors import TokenError
from skr.local.ca import LocalCA
from skr.maa.token import TokenVerifier, token_expiry, unverified_claims, unverified_header
from tests.e2e import serve_local as serve

SHAREDWEU = "https://sharedweu.weu.attest.azure.net"
GENUINE = {
    "maa/azurevm-sevsnp-sharedweu-2022-12.jwt": 1671836418,
    "maa/azurevm-sevsnp-sharedweu-2023-03.EXTRACTED.jwt": 1680173374,
}


def load_jsonc(path) -> dict[str, Any]:
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("//")]
    doc: dict[str, Any] = json.loads("\n".join(lines))
    return doc


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


class FakeIssuer:
    """Serves OpenID metadata naming ``issuer`` and a JWKS; counts how often each is fetched."""

    def __init__(self, issuer: str, jwks: dict[str, Any]) -> None:
        self.issuer = issuer
        self.jwks = jwks
        self.metadata_hits = 0
        self.jwks_hits = 0
        self.host = ""

    async def metadata(self, request: web.Request) -> web.Response:
        self.metadata_hits += 1
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"https://{self.host}/certs"})

    async def certs(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        return web.json_response(self.jwks)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.metadata)
        app.router.add_get("/certs", self.certs)
        return app


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))
    return ca.server_ssl_context(["127.0.0.1"]), ca.client_ssl_context()


@pytest.fixture(scope="module")
def signer() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def own_jwks(key: rsa.RSAPrivateKey, kid: str = "own-key") -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    return {
        "keys": [
            {
                "kid": kid,
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "n": uint(numbers.n),
                "e": uint(numbers.e),
            }
        ]
    }


def own_token(key: rsa.RSAPrivateKey, *, kid: str = "own-key", issuer: str = SHAREDWEU, **claims) -> str:
    now = int(time.time())
    payload = {"iss": issuer, "iat": now, "nbf": now, "exp": now + 28800, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture
async def snapshot_issuer(vectors, tls):
    server_ctx, client_ctx = tls
    issuer = FakeIssuer(SHAREDWEU, load_jsonc(vectors / "maa/sharedweu-certs-snapshot.jwks.jsonc"))
    async with serve(issuer.app(), server_ctx) as host, aiohttp.ClientSession() as session:
        issuer.host = host
        verifier = TokenVerifier(
            session,
            ssl_context=client_ctx,
            metadata_url_for=lambda iss: f"https://{host}/.well-known/openid-configuration",
        )
        yield issuer, verifier


def pinned(iat: int) -> datetime:
    return datetime.fromtimestamp(iat, tz=UTC) + timedelta(hours=1)


# --- genuine tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "iat"), GENUINE.items())
async def test_genuine_maa_tokens_verify_against_the_recorded_jwks(vectors, snapshot_issuer, name, iat):
    issuer, verifier = snapshot_issuer
    token = (vectors / name).read_text().strip()
    claims = await verifier.verify(token, issuer="sharedweu.weu.attest.azure.net", at=pinned(iat))
    assert claims["iss"] == SHAREDWEU
    assert claims["iat"] == iat
    assert claims["exp"] - claims["iat"] == 28800
    assert claims["x-ms-isolation-tee"]["x-ms-attestation-type"] == "sevsnpvm"
    assert (issuer.metadata_hits, issuer.jwks_hits) == (1, 1)


async def test_keys_are_cached_per_issuer(vectors, snapshot_issuer):
    issuer, verifier = snapshot_issuer
    for name, iat in GENUINE.items():
        await verifier.verify((vectors / name).read_text().strip(), issuer=SHAREDWEU + "/", at=pinned(iat))
    assert issuer.jwks_hits == 1


async def test_concurrent_verifications_share_one_fetch(vectors, snapshot_issuer):
    issuer, verifier = snapshot_issuer
    token = (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip()
    at = pinned(GENUINE["maa/azurevm-sevsnp-sharedweu-2022-12.jwt"])
    results = await asyncio.gather(*(verifier.verify(token, issuer=SHAREDWEU, at=at) for _ in range(5)))
    assert len({r["jti"] for r in results}) == 1
    assert issuer.jwks_hits == 1


async def test_pinned_jwks_verifies_without_network(vectors):
    async with aiohttp.ClientSession() as session:
        verifier = TokenVerifier(session, metadata_url_for=lambda iss: "https://127.0.0.1:1/unreachable")
        verifier.add_jwks(SHAREDWEU, load_jsonc(vectors / "maa/sharedweu-certs-snapshot.jwks.jsonc"))
        name = "maa/azurevm-sevsnp-sharedweu-2023-03.EXTRACTED.jwt"
        claims = await verifier.verify(
            (vectors / name).read_text().strip(), issuer=SHAREDWEU, at=pinned(GENUINE[name])
        )
    assert claims["x-ms-runtime"]["client-payload"] == {"nonce": "QURFMDEwMQ=="}


# --- refusals ---------------------------------------------------------------------------------------


async def test_genuine_token_is_expired_today(vectors, snapshot_issuer):
    _, verifier = snapshot_issuer
    token = (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip()
    with pytest.raises(TokenError) as info:
        await verifier.verify(token, issuer=SHAREDWEU)
    assert info.value.code == "token_expired"
    assert "2022-12-24T07:00:18Z" in info.value.message


async def test_expiry_allows_the_leeway_and_no_more(vectors, snapshot_issuer):
    _, verifier = snapshot_issuer
    token = (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip()
    exp = datetime.fromtimestamp(1671865218, tz=UTC)
    await verifier.verify(token, issuer=SHAREDWEU, at=exp + timedelta(seconds=59))
    with pytest.raises(TokenError):
        await verifier.verify(token, issuer=SHAREDWEU, at=exp + timedelta(seconds=61))


async def test_not_yet_valid_token_is_refused(vectors, snapshot_issuer):
    _, verifier = snapshot_issuer
    token = (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip()
    with pytest.raises(TokenError) as info:
        await verifier.verify(token, issuer=SHAREDWEU, at=datetime(2022, 12, 1, tzinfo=UTC))
    assert info.value.code == "token_not_yet_valid"


async def test_tampered_claims_break_the_signature(vectors, snapshot_issuer):
    _, verifier = snapshot_issuer
    header, payload, signature = (
        (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip().split(".")
    )
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["x-ms-isolation-tee"]["x-ms-sevsnpvm-is-debuggable"] = True
    forged = ".".join([header, b64url(json.dumps(claims).encode()), signature])
    with pytest.raises(TokenError) as info:
        await verifier.verify(forged, issuer=SHAREDWEU, at=pinned(1671836418))
    assert "signature does not verify" in info.value.message
    assert forged not in info.value.diagnostics()


async def test_token_of_another_issuer_is_refused_before_fetching_keys(vectors, snapshot_issuer):
    issuer, verifier = snapshot_issuer
    token = (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip()
    with pytest.raises(TokenError) as info:
        await verifier.verify(token, issuer="sharedeus2.eus2.attest.azure.net", at=pinned(1671836418))
    assert "https://sharedeus2.eus2.attest.azure.net" in info.value.message
    assert SHAREDWEU in info.value.message
    assert issuer.metadata_hits == 0


async def test_resigned_token_with_unknown_kid_triggers_exactly_one_refresh(vectors, snapshot_issuer, signer):
    issuer, verifier = snapshot_issuer
    genuine = (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip()
    await verifier.verify(genuine, issuer=SHAREDWEU, at=pinned(1671836418))
    assert issuer.jwks_hits == 1
    verifier.min_refresh_interval = 0
    with pytest.raises(TokenError) as info:
        await verifier.verify(own_token(signer, kid="rotated-key"), issuer=SHAREDWEU)
    assert "'rotated-key'" in info.value.message
    assert issuer.jwks_hits == 2


async def test_unknown_kid_refresh_is_rate_limited(vectors, snapshot_issuer, signer):
    issuer, verifier = snapshot_issuer
    await verifier.verify(
        (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip(),
        issuer=SHAREDWEU,
        at=pinned(1671836418),
    )
    for _ in range(3):
        with pytest.raises(TokenError):
            await verifier.verify(own_token(signer, kid="rotated-key"), issuer=SHAREDWEU)
    assert issuer.jwks_hits == 1  # the default 30 s interval has not passed


async def test_new_key_is_found_by_the_refresh(tls, signer):
    server_ctx, client_ctx = tls
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake = FakeIssuer("https://127.0.0.1", own_jwks(other, kid="old"))
    async with serve(fake.app(), server_ctx) as host, aiohttp.ClientSession() as session:
        fake.host = host
        fake.issuer = f"https://{host}"
        verifier = TokenVerifier(session, ssl_context=client_ctx, min_refresh_interval=0)
        await verifier.verify(own_token(other, kid="old", issuer=fake.issuer), issuer=host)
        fake.jwks = own_jwks(signer, kid="new")  # key rotation
        claims = await verifier.verify(
            own_token(signer, kid="new", issuer=fake.issuer, nonce="x"), issuer=host
        )
    assert claims["nonce"] == "x"
    assert fake.jwks_hits == 2


@pytest.mark.parametrize("alg", ["none", "HS256", "ES256"])
async def test_non_rsa_algorithms_are_refused(snapshot_issuer, alg):
    issuer, verifier = snapshot_issuer
    header = b64url(json.dumps({"alg": alg, "kid": "dRKh+hBcWUfQimSl3Iv6ZhStW3TSOt0ThwiTgUUqZAo="}).encode())
    payload = b64url(json.dumps({"iss": SHAREDWEU, "exp": 9999999999}).encode())
    with pytest.raises(TokenError) as info:
        await verifier.verify(f"{header}.{payload}.", issuer=SHAREDWEU)
    assert repr(alg) in info.value.message
    assert issuer.metadata_hits == 0


async def test_jwks_key_whose_n_e_contradict_x5c_is_not_used(vectors, tls):
    server_ctx, client_ctx = tls
    jwks = load_jsonc(vectors / "maa/sharedweu-certs-snapshot.jwks.jsonc")
    jwks["keys"][0]["n"], jwks["keys"][0]["e"] = uint(12345678901234567), "AQAB"
    fake = FakeIssuer(SHAREDWEU, jwks)
    async with serve(fake.app(), server_ctx) as host, aiohttp.ClientSession() as session:
        fake.host = host
        verifier = TokenVerifier(
            session,
            ssl_context=client_ctx,
            metadata_url_for=lambda iss: f"https://{host}/.well-known/openid-configuration",
        )
        token = (vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt").read_text().strip()
        with pytest.raises(TokenError) as info:
            await verifier.verify(token, issuer=SHAREDWEU, at=pinned(1671836418))
    assert "cannot be used" in info.value.message


async def test_metadata_naming_another_issuer_is_refused(tls, signer):
    server_ctx, client_ctx = tls
    fake = FakeIssuer("https://evil.example", own_jwks(signer))
    async with serve(fake.app(), server_ctx) as host, aiohttp.ClientSession() as session:
        fake.host = host
        verifier = TokenVerifier(session, ssl_context=client_ctx)
        with pytest.raises(TokenError) as info:
            await verifier.verify(own_token(signer, issuer=f"https://{host}"), issuer=host)
    assert "evil.example" in info.value.message


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c.d", "!!.??.x"])
async def test_malformed_tokens_are_refused(snapshot_issuer, token):
    _, verifier = snapshot_issuer
    with pytest.raises(TokenError):
        await verifier.verify(token, issuer=SHAREDWEU)


# --- unverified views and expiry --------------------------------------------------------------------


def test_unverified_views_decode_header_and_claims(vectors):
    token = (vectors / "maa/sevsnpvm-aci-sharedweu-test-2025-04.jwt").read_text().strip()
    header = unverified_header(token)
    assert header == {
        "alg": "RS256",
        "jku": "https://sharedweu.weu.test.attest.azure.net/certs",
        "kid": "jNolL7YTrRkDIukgm3on/fz5uMi9kjxhfUBTh6Or8No=",
        "typ": "JWT",
    }
    claims = unverified_claims(token)
    assert claims["x-ms-attestation-type"] == "sevsnpvm"
    assert token_expiry(claims) == datetime(2025, 4, 8, 12, 15, tzinfo=UTC)


def test_token_expiry_requires_a_numeric_exp():
    with pytest.raises(TokenError):
        token_expiry({})
    with pytest.raises(TokenError):
        token_expiry({"exp": "tomorrow"})
