"""``skr policy hash | release | check`` — exit codes 0 allowed, 1 denied, 2 unusable input."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from skr.cli import main

HOST_DATA = "cadd74f71ebb8fbf9782baab649612520f3c416bc5ce9ac768808ddc8d9b031c"
MAA = "https://sharedeus.eus.attest.azure.net"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def aci_claims(**overrides) -> dict[str, Any]:
    claims = {
        "iss": MAA,
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-compliance-status": "azure-compliant-uvm",
        "x-ms-sevsnpvm-hostdata": HOST_DATA,
        "x-ms-sevsnpvm-is-debuggable": False,
        "x-ms-sevsnpvm-vmpl": 0,
    }
    claims.update(overrides)
    return claims


def test_hash_of_the_genuine_aci_policy_is_the_genuine_report_host_data(vectors, capsys):
    policy = vectors / "snp/aci-confidential-sidecar/uvm_security_policy.base64"
    report = (vectors / "snp/aci-confidential-sidecar/snp_report.bin").read_bytes()
    code, out, _ = run(capsys, "hash", "--cce-policy", str(policy))
    assert code == 0
    assert out == report[0xC0:0xE0].hex() + "\n" == HOST_DATA + "\n"


@pytest.fixture
def release_policy(tmp_path, capsys):
    code, out, _ = run(
        capsys, "release", "--authority", "sharedeus.eus.attest.azure.net", "--host-data", HOST_DATA
    )
    assert code == 0
    path = tmp_path / "policy.json"
    path.write_text(out)
    return path


def test_release_prints_the_canonical_policy(release_policy):
    assert json.loads(release_policy.read_text()) == {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": MAA,
                "allOf": [
                    {"claim": "x-ms-sevsnpvm-hostdata", "equals": HOST_DATA},
                    {"claim": "x-ms-compliance-status", "equals": "azure-compliant-uvm"},
                    {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": "false"},
                    {"claim": "x-ms-sevsnpvm-vmpl", "equals": "0"},
                ],
            }
        ],
    }


def test_release_options(capsys):
    code, out, _ = run(
        capsys,
        "release",
        "--authority",
        MAA,
        "--host-data",
        HOST_DATA,
        "--allow-debug",
        "--vmpl",
        "1",
        "--attestation-type",
        "sevsnpvm",
        "--compliance",
        "azure-signed-katacc-uvm",
    )
    assert code == 0
    assert json.loads(out)["anyOf"][0]["allOf"] == [
        {"claim": "x-ms-sevsnpvm-hostdata", "equals": HOST_DATA},
        {"claim": "x-ms-compliance-status", "equals": "azure-signed-katacc-uvm"},
        {"claim": "x-ms-sevsnpvm-vmpl", "equals": "1"},
        {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
    ]


def test_release_then_check_allows_matching_claims(release_policy, tmp_path, capsys):
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps(aci_claims()))
    code, out, _ = run(capsys, "check", "--policy", str(release_policy), "--claims", str(claims))
    assert code == 0
    assert out.splitlines()[-1] == f"allowed: the token meets anyOf[0] (authority {MAA})"
    assert '[met] anyOf[0].allOf[2]: x-ms-sevsnpvm-is-debuggable equals "false" (actual false)' in out


def test_release_then_check_denies_another_host_data_naming_the_claim(release_policy, tmp_path, capsys):
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps(aci_claims(**{"x-ms-sevsnpvm-hostdata": "00" * 32})))
    code, out, _ = run(capsys, "check", "--policy", str(release_policy), "--claims", str(claims))
    assert code == 1
    assert out.splitlines()[-1] == (
        "denied: release policy not satisfied: x-ms-sevsnpvm-hostdata: "
        f'expected "{HOST_DATA}", found "{"00" * 32}"'
    )


def test_check_json_output(release_policy, tmp_path, capsys):
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps(aci_claims(**{"x-ms-sevsnpvm-vmpl": 2})))
    code, out, _ = run(capsys, "check", "--policy", str(release_policy), "--claims", str(claims), "--json")
    assert code == 1
    decision = json.loads(out)
    assert decision["allowed"] is False
    failing = [e for e in decision["trace"] if not e["met"]]
    assert failing == [
        {
            "path": "anyOf[0].allOf[3]",
            "claim": "x-ms-sevsnpvm-vmpl",
            "operator": "equals",
            "expected": '"0"',
            "actual": "2",
            "met": False,
            "note": "",
        }
    ]


def test_check_with_the_genuine_token_file_and_policy(vectors, capsys):
    policy = vectors / "akv/cvm-release-policy.json"
    token = vectors / "maa/azurevm-sevsnp-sharedweu-2022-12.jwt"
    code, out, _ = run(capsys, "check", "--policy", str(policy), "--token", str(token))
    assert code == 0, out
    code, out, _ = run(capsys, "check", "--policy", str(policy), "--token", token.read_text().strip())
    assert code == 0, out
    assert token.read_text().strip()[:40] not in out


def test_check_accepts_the_wire_form_of_a_policy(vectors, tmp_path, capsys):
    body = json.loads((vectors / "akv/release-response.decoded-body.json").read_text())
    wire = tmp_path / "wire.json"
    wire.write_text(json.dumps(body["response"]["key"]["release_policy"]))
    token = vectors / "akv/target-maa-token.jwt"
    code, out, _ = run(capsys, "check", "--policy", str(wire), "--token", str(token))
    assert code == 0, out


@pytest.mark.parametrize(
    ("policy_text", "extra", "complaint"),
    [
        (
            '{"anyOf": [{"authority": "x", "allOf": [{"claim": "a"}]}]}',
            [],
            "anyOf[0].allOf[0]: needs exactly one operator",
        ),
        ("not json", [], "is not valid JSON"),
        (
            '{"version": "1.0.0", "anyOf": [{"authority": "x", "allOf": [{"claim": "a", "equals": "1"}]}]}',
            ["--verify"],
            "--verify needs --token",
        ),
    ],
)
def test_unusable_input_exits_2_with_one_line(tmp_path, capsys, policy_text, extra, complaint):
    policy = tmp_path / "policy.json"
    policy.write_text(policy_text)
    claims = tmp_path / "claims.json"
    claims.write_text("{}")
    code, out, err = run(capsys, "check", "--policy", str(policy), "--claims", str(claims), *extra)
    assert code == 2
    assert out == ""
    assert complaint in err
    assert len(err.strip().splitlines()) == 1


def test_bad_token_and_host_data_exit_2(tmp_path, capsys, release_policy):
    code, _, err = run(capsys, "check", "--policy", str(release_policy), "--token", str(tmp_path / "missing"))
    assert code == 2 and err.strip()
    code, _, err = run(capsys, "release", "--authority", MAA, "--host-data", "xyz")
    assert code == 2
    assert "64 hex digits" in err


def test_malformed_policy_through_a_subprocess_has_no_traceback(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(
        '{"version": "1.0.0", "anyOf": [{"authority": "https://a", '
        '"allOf": [{"claim": "x", "less": "ten"}]}]}'
    )
    claims = tmp_path / "claims.json"
    claims.write_text("{}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "skr.cli",
            "policy",
            "check",
            "--policy",
            str(policy),
            "--claims",
            str(claims),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "anyOf[0].allOf[0].less" in result.stderr


# --- --verify against a local OpenID issuer over HTTPS ------------------------------------------------


def _tls_files(tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CLI test CA")])
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "server.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem"


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture
def local_issuer(tmp_path, monkeypatch, issuer_key):
    """An MAA-like issuer on 127.0.0.1 (OpenID metadata + JWKS over HTTPS), in its own thread."""
    ca_pem = _tls_files(tmp_path)
    numbers = issuer_key.public_key().public_numbers()

    def b64u_int(value: int) -> str:
        return jwt.utils.base64url_encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).decode()

    async def metadata(request: web.Request) -> web.Response:
        base = f"https://{request.host}"
        return web.json_response({"issuer": base, "jwks_uri": f"{base}/certs"})

    async def certs(_: web.Request) -> web.Response:
        key = {"kty": "RSA", "kid": "k1", "use": "sig", "n": b64u_int(numbers.n), "e": b64u_int(numbers.e)}
        return web.json_response({"keys": [key]})

    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", metadata)
        app.router.add_get("/certs", certs)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl).start()
        return runner, runner.addresses[0][1]

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    monkeypatch.setenv("SKR_CA_BUNDLE", str(ca_pem))
    yield f"https://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()


def _token(issuer: str, key: rsa.RSAPrivateKey, **claims) -> str:
    now = int(time.time())
    body = aci_claims(iss=issuer, iat=now, nbf=now, exp=now + 3600, **claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def _policy_for(issuer: str, tmp_path, capsys):
    code, out, _ = run(capsys, "release", "--authority", issuer, "--host-data", HOST_DATA)
    assert code == 0
    path = tmp_path / "issuer-policy.json"
    path.write_text(out)
    return path


def test_verify_checks_the_token_with_its_issuer_keys(local_issuer, issuer_key, tmp_path, capsys):
    policy = _policy_for(local_issuer, tmp_path, capsys)
    code, out, err = run(
        capsys, "check", "--policy", str(policy), "--token", _token(local_issuer, issuer_key), "--verify"
    )
    assert (code, err) == (0, ""), out
    assert out.splitlines()[-1].startswith("allowed:")


def test_verify_denies_a_token_signed_by_another_key(local_issuer, tmp_path, capsys):
    policy = _policy_for(local_issuer, tmp_path, capsys)
    forged = _token(local_issuer, rsa.generate_private_key(65537, 2048))
    code, out, _ = run(capsys, "check", "--policy", str(policy), "--token", forged, "--verify")
    assert code == 1
    assert "does not verify" in out and "signature" in out
