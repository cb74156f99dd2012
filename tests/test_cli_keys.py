"""``skr keys create|import`` against the local key service: the real SDK and credentials, the key id on
stdout, one clear line and exit 2 on anything wrong."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from skr.akv.jws import open_release
from skr.cli import main
from skr.commands.keys import read_key
from skr.endpoints import parse_endpoint
from skr.errors import BadRequest
from skr.maa.runtime import WrappingKey
from tests.kvstack import OTHER_HOST_DATA, Stack


@pytest.fixture
def cli_env(stack: Stack, imds_env: None, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setenv("SKR_CA_BUNDLE", stack.ca_pem)
    return stack


def write_policy(stack: Stack, tmp_path: Path, *, host_data: str | None = None) -> Path:
    path = tmp_path / f"policy-{host_data or 'tee'}.json"
    path.write_bytes(stack.policy(host_data=host_data))
    return path


async def run(argv: list[str]) -> int:
    """``skr.cli.main`` runs its own event loop: run it in a thread while the stack serves on this one."""
    return await asyncio.to_thread(main, argv)


def keys(action: str, stack: Stack, name: str, policy: Path, *extra: str) -> list[str]:
    """``skr keys <action>`` against the local key service (a non-Azure host: the flag is needed)."""
    common = [
        "--vault",
        stack.hsm_host,
        "--name",
        name,
        "--policy",
        str(policy),
        "--allow-insecure-challenge",
    ]
    return ["keys", action, *common, *extra]


async def release_jwk(stack: Stack, name: str, wrapping_key: WrappingKey) -> dict[str, Any]:
    token = await stack.target_token(wrapping_key)
    resp = await stack.session.post(
        f"{stack.hsm_url}/keys/{name}//release?api-version=7.5",
        json={"target": token},
        headers={"Authorization": f"Bearer {stack.bearer()}"},
        ssl=stack.ca.client_ssl_context(),
    )
    assert resp.status == 200, await resp.text()
    value = (await resp.json())["value"]
    return open_release(
        value, host=parse_endpoint(stack.hsm_host), trust=stack.trust(), wrapping_key=wrapping_key.private_key
    ).jwk


@pytest.mark.parametrize(
    ("extra", "kty"),
    [
        (["--kty", "RSA-HSM"], "RSA-HSM"),
        (["--kty", "RSA-HSM", "--size", "3072"], "RSA-HSM"),
        (["--kty", "oct-HSM", "--size", "128"], "oct-HSM"),
        (["--kty", "EC-HSM", "--curve", "P-256K"], "EC-HSM"),
    ],
)
async def test_create_prints_the_key_id(cli_env, tmp_path, capsys, extra, kty):
    stack = cli_env
    code = await run(keys("create", stack, "made", write_policy(stack, tmp_path), *extra))
    out, err = capsys.readouterr()
    assert code == 0, err
    key_id = out.strip()
    assert key_id.startswith(f"{stack.hsm_url}/keys/made/") and len(key_id.rsplit("/", 1)[1]) == 32
    assert ("GET", "/keys/made/") in stack.hsm.challenged  # the first call: does the name exist yet?
    resp = await stack.session.get(
        f"{key_id}?api-version=7.5",
        headers={"Authorization": f"Bearer {stack.bearer()}"},
        ssl=stack.ca.client_ssl_context(),
    )
    bundle = await resp.json()
    assert bundle["key"]["kty"] == kty and bundle["attributes"]["exportable"] is True
    assert bundle["release_policy"]["immutable"] is False
    if "--size" in extra and kty == "RSA-HSM":
        assert len(base64.urlsafe_b64decode(bundle["key"]["n"] + "==")) == 384


async def test_immutable_policy_then_a_change_is_refused_with_the_vault_code(cli_env, tmp_path, capsys):
    stack = cli_env
    first = keys("create", stack, "locked", write_policy(stack, tmp_path), "--kty", "oct-HSM", "--immutable")
    assert await run(first) == 0
    changed = write_policy(stack, tmp_path, host_data=OTHER_HOST_DATA)
    capsys.readouterr()
    code = await run(keys("create", stack, "locked", changed, "--kty", "oct-HSM", "--new-version"))
    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("skr: ")
    assert "AKV.SKR.1020: Immutable Key Release Policy cannot be modified." in err


async def test_import_pem_rsa_key_releases_the_same_key(cli_env, tmp_path, capsys, wrapping_key):
    stack = cli_env
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    code = await run(keys("import", stack, "imported", write_policy(stack, tmp_path), "--key", str(pem)))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"{stack.hsm_url}/keys/imported/")
    jwk = await release_jwk(stack, "imported", wrapping_key)
    assert int.from_bytes(base64.urlsafe_b64decode(jwk["d"] + "=="), "big") == key.private_numbers().d


async def test_import_pem_ec_key(cli_env, tmp_path, capsys, wrapping_key):
    stack = cli_env
    key = ec.generate_private_key(ec.SECP384R1())
    pem = tmp_path / "ec.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert await run(keys("import", stack, "ec", write_policy(stack, tmp_path), "--key", str(pem))) == 0
    jwk = await release_jwk(stack, "ec", wrapping_key)
    assert jwk["crv"] == "P-384"
    assert (
        int.from_bytes(base64.urlsafe_b64decode(jwk["d"] + "=="), "big")
        == key.private_numbers().private_value
    )


@pytest.mark.parametrize("form", ["raw", "jwk"])
async def test_import_oct_key_from_raw_bytes_or_jwk(cli_env, tmp_path, capsys, wrapping_key, form):
    stack = cli_env
    secret = os.urandom(32)
    path = tmp_path / "aes"
    if form == "raw":
        path.write_bytes(secret)
    else:
        path.write_text(
            json.dumps({"kty": "oct", "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode()})
        )
    assert await run(keys("import", stack, "aes", write_policy(stack, tmp_path), "--key", str(path))) == 0
    jwk = await release_jwk(stack, "aes", wrapping_key)
    assert base64.urlsafe_b64decode(jwk["k"] + "==") == secret


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["--kty", "RSA-HSM", "--size", "1024"], "--size 1024 is not valid"),
        (["--kty", "EC-HSM", "--size", "256"], "--curve for EC-HSM"),
        (["--kty", "oct-HSM", "--curve", "P-256"], "--curve applies to EC-HSM"),
    ],
)
async def test_bad_create_options_fail_before_any_request(cli_env, tmp_path, capsys, argv_tail, message):
    stack = cli_env
    code = await run(keys("create", stack, "k", write_policy(stack, tmp_path), *argv_tail))
    _, err = capsys.readouterr()
    assert code == 2 and message in err and not stack.hsm.challenged


async def test_malformed_policy_and_key_files_are_one_line_errors(cli_env, tmp_path, capsys):
    stack = cli_env
    bad_policy = tmp_path / "bad.json"
    bad_policy.write_text('{"version": "1.0.0", "anyOf": "nope"}')
    assert await run(keys("create", stack, "k", bad_policy, "--kty", "oct-HSM")) == 2
    short_key = tmp_path / "short"
    short_key.write_bytes(b"0123456789")
    policy = write_policy(stack, tmp_path)
    assert await run(keys("import", stack, "k", policy, "--key", str(short_key))) == 2
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("skr: ") for line in lines)
    assert "anyOf" in lines[0] and "16, 24 or 32" in lines[1]


async def test_challenge_for_another_domain_needs_the_explicit_flag(cli_env, tmp_path, capsys):
    stack = cli_env
    argv = keys("create", stack, "k", write_policy(stack, tmp_path))
    argv.remove("--allow-insecure-challenge")
    assert await run([*argv, "--kty", "oct-HSM"]) == 2
    assert "--allow-insecure-challenge" in capsys.readouterr().err


async def test_unreachable_vault(cli_env, tmp_path, capsys):
    stack = cli_env
    argv = keys("create", stack, "k", write_policy(stack, tmp_path))
    argv[argv.index("--vault") + 1] = "127.0.0.1:1"
    assert await run([*argv, "--kty", "oct-HSM"]) == 2
    assert "could not be reached" in capsys.readouterr().err


async def skr_process(*argv: str) -> tuple[int | None, bytes, bytes]:
    """``python -m skr.cli ARGV`` as its own process (the environment is this test's)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skr.cli", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode, out, err


async def test_subprocess_create_has_no_traceback(cli_env, tmp_path):
    stack = cli_env
    policy = write_policy(stack, tmp_path)
    code, out, err = await skr_process(*keys("create", stack, "sub", policy), "--kty", "oct-HSM")
    assert code == 0, err.decode()
    assert out.decode().startswith(f"{stack.hsm_url}/keys/sub/") and b"Traceback" not in err
    missing = tmp_path / "missing.json"
    code, _, err = await skr_process(*keys("create", stack, "sub", missing), "--kty", "oct-HSM")
    assert code == 2 and b"Traceback" not in err and err.decode().startswith("skr: ")


# --- reading the key file (pure, no vault) ----------------------------------------------------------


def _oct_bytes(jwk: Any) -> bytes:
    assert jwk.kty == "oct-HSM"
    return bytes(jwk.k)


@pytest.mark.parametrize("prefix", [b"{", b" {", b"\n{", b"-----BEGIN"])
def test_auto_reads_binary_key_bytes_that_begin_like_text_formats_as_raw(tmp_path, prefix):
    # A random AES key starts with "{" once in 256 keys; it is still a key, not a broken JWK.
    secret = (prefix + b"\xff\xfe" + os.urandom(32))[:32]
    path = tmp_path / "aes"
    path.write_bytes(secret)
    assert _oct_bytes(read_key(path)) == secret


def test_raw_format_takes_the_bytes_even_when_they_are_text(tmp_path):
    secret = b'{"kty":"oct","k":"AAAAAAAAAAAA"}'
    assert len(secret) == 32
    path = tmp_path / "aes"
    path.write_bytes(secret)
    assert _oct_bytes(read_key(path, "raw")) == secret
    with pytest.raises(BadRequest, match="16, 24 or 32"):
        read_key(path)  # auto: a text file starting with "{" is a JWK, and this one holds 9 bytes


def test_broken_jwk_text_is_a_clear_error(tmp_path):
    path = tmp_path / "key.jwk"
    path.write_text('{"kty": "oct", "k": ')
    with pytest.raises(BadRequest, match="looks like JSON but does not parse"):
        read_key(path)
    with pytest.raises(BadRequest, match="not an unencrypted PEM private key"):
        read_key(path, "pem")
