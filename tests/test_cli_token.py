"""``skr token verify`` and ``skr policy check --jwks --at``: recorded MAA tokens verified offline."""

from __future__ import annotations

import json
import socket

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.cli import main
from tests import test_cli_policy

_token = test_cli_policy._token
issuer_key = test_cli_policy.issuer_key  # fixtures shared with the policy-check tests
local_issuer = test_cli_policy.local_issuer

TOKEN_2022 = "maa/azurevm-sevsnp-sharedweu-2022-12.jwt"
TOKEN_2023 = "maa/azurevm-sevsnp-sharedweu-2023-03.EXTRACTED.jwt"
JWKS = "maa/sharedweu-certs-snapshot.jwks.jsonc"
ISSUER = "https://sharedweu.weu.attest.azure.net"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: these checks are offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("asyncio.base_events.BaseEventLoop.create_connection", refuse)
    monkeypatch.setattr("asyncio.base_events.BaseEventLoop.getaddrinfo", refuse)


@pytest.mark.parametrize(
    ("name", "at"), [(TOKEN_2022, "2022-12-24T00:00:00Z"), (TOKEN_2023, "2023-03-30T12:00:00+00:00")]
)
def test_genuine_tokens_verify_at_their_time_and_fail_now_as_expired(vectors, capsys, no_network, name, at):
    token, jwks = vectors / name, vectors / JWKS
    code, out, err = run(capsys, "token", "verify", str(token), "--jwks", str(jwks), "--at", at)
    assert (code, err) == (0, ""), err
    assert out.startswith(
        "valid: RS256 signature by key dRKh+hBcWUfQimSl3Iv6ZhStW3TSOt0ThwiTgUUqZAo= of " + ISSUER
    )
    assert "checked at 20" in out
    assert token.read_text().strip()[:40] not in out

    code, out, err = run(capsys, "token", "verify", str(token), "--jwks", str(jwks), "--json")
    assert code == 1
    verdict = json.loads(out)
    assert verdict["valid"] is False and verdict["code"] == "token_expired"
    assert "expired at 20" in err and len(err.strip().splitlines()) == 1


def test_json_verdict_carries_the_claims_and_times(vectors, capsys, no_network):
    code, out, _ = run(
        capsys,
        "token",
        "verify",
        str(vectors / TOKEN_2022),
        "--jwks",
        str(vectors / JWKS),
        "--at",
        "1671836418",
        "--json",
    )
    assert code == 0
    verdict = json.loads(out)
    assert verdict["valid"] is True
    assert verdict["issuer"] == ISSUER
    assert verdict["iat"] == "2022-12-23T23:00:18Z" and verdict["exp"] == "2022-12-24T07:00:18Z"
    assert verdict["checked_at"] == "2022-12-23T23:00:18Z"
    assert verdict["claims"]["x-ms-isolation-tee"]["x-ms-attestation-type"] == "sevsnpvm"


def test_a_tampered_genuine_token_is_invalid(vectors, tmp_path, capsys, no_network):
    header, payload, signature = (vectors / TOKEN_2022).read_text().strip().split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    path = tmp_path / "t.jwt"
    path.write_text(f"{header}.{payload}.{flipped}\n")
    code, _, err = run(
        capsys, "token", "verify", str(path), "--jwks", str(vectors / JWKS), "--at", "2022-12-24"
    )
    assert code == 1
    assert "signature does not verify" in err


def test_a_key_set_without_the_tokens_key_is_invalid(vectors, tmp_path, capsys, no_network):
    jwks = tmp_path / "other.json"
    jwks.write_text(json.dumps({"keys": []}))
    code, _, err = run(
        capsys, "token", "verify", str(vectors / TOKEN_2022), "--jwks", str(jwks), "--at", "2022-12-24"
    )
    assert code == 1
    assert "does not publish" in err


@pytest.mark.parametrize(
    ("token_text", "jwks_text", "at", "complaint"),
    [
        ("not a token", '{"keys": []}', None, "does not hold a JWT"),
        (None, "{nope", None, "is not JSON"),
        (None, '{"no": "keys"}', None, "is not a JWKS"),
        (None, '{"keys": []}', "yesterday", "--at is not an ISO 8601 time"),
    ],
)
def test_unusable_input_exits_2(vectors, tmp_path, capsys, token_text, jwks_text, at, complaint):
    token = tmp_path / "t.jwt"
    token.write_text(token_text if token_text is not None else (vectors / TOKEN_2022).read_text())
    jwks = tmp_path / "k.json"
    jwks.write_text(jwks_text)
    code, out, err = run(
        capsys, "token", "verify", str(token), "--jwks", str(jwks), *(["--at", at] if at else [])
    )
    assert code == 2 and out == ""
    assert complaint in err and len(err.strip().splitlines()) == 1


def test_issuer_flag_fetches_the_keys_that_issuer_publishes(local_issuer, issuer_key, tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"token": _token(local_issuer, issuer_key)}))
    code, out, err = run(capsys, "token", "verify", str(path), "--issuer", local_issuer)
    assert (code, err) == (0, "")
    assert f"of {local_issuer} ({local_issuer} (published keys))" in out
    forged = tmp_path / "forged.jwt"
    forged.write_text(_token(local_issuer, rsa.generate_private_key(65537, 2048)))
    code, _, err = run(capsys, "token", "verify", str(forged), "--issuer", local_issuer)
    assert code == 1 and "signature" in err
    code, _, err = run(capsys, "token", "verify", str(path), "--issuer", "https://other.attest.azure.net")
    assert code == 1 and "expected 'https://other.attest.azure.net'" in err


def test_policy_check_verifies_a_recorded_token_offline_at_a_time(vectors, capsys, no_network):
    policy, token, jwks = vectors / "akv/cvm-release-policy.json", vectors / TOKEN_2022, vectors / JWKS
    args = ["policy", "check", "--policy", str(policy), "--token", str(token), "--jwks", str(jwks)]
    code, out, _ = run(capsys, *args, "--at", "2022-12-24T00:00:00Z")
    assert code == 0, out
    assert out.splitlines()[-1].startswith("allowed:")
    code, out, _ = run(capsys, *args)
    assert code == 1
    assert "does not verify" in out and "expired" in out
