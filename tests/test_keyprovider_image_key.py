"""``skr image-key create`` against the local key service: an exportable RSA-HSM key bound to HOST_DATA,
and the files ``skr wrap`` needs; what is wrapped to it decrypts with the key the HSM releases."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from skr.akv.jwk import jwk_to_private_key
from skr.cli import main
from skr.snp.hostdata import host_data_of_policy
from tests.kvstack import SECURITY_POLICY, Stack
from tests.test_cli_keys import release_jwk, run

OAEP256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.fixture
def cli_env(stack: Stack, imds_env: None, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setenv("SKR_CA_BUNDLE", stack.ca_pem)
    return stack


def create(stack: Stack, keypath, *bound: str) -> list[str]:
    return [
        "image-key",
        "create",
        "--vault",
        stack.hsm_host,
        "--keypath",
        str(keypath),
        "--maa-endpoint",
        stack.maa_url,
        "--allow-insecure-challenge",
        *bound,
    ]


async def test_create_writes_the_wrap_files_and_wrapped_data_decrypts_with_the_released_key(
    cli_env, tmp_path, capsys, wrapping_key
):
    stack = cli_env
    keypath = tmp_path / "keys" / "image-key"
    keypath.parent.mkdir()
    assert await run(create(stack, keypath, "--host-data", stack.tee.host_data.hex())) == 0
    out = capsys.readouterr().out
    assert out.strip().startswith(f"{stack.hsm_url}/keys/image-key/")

    info = json.loads((tmp_path / "keys" / "image-key-info.json").read_text())
    assert info == {
        "public_key_path": str(tmp_path / "keys" / "image-key-pub.pem"),
        "kms_endpoint": stack.hsm_host,
        "attester_endpoint": stack.maa_url.removeprefix("https://"),
    }
    policy = stack.hsm.latest_policy("image-key")
    assert policy is not None and stack.tee.host_data.hex() in policy.decode()  # bound to HOST_DATA
    assert stack.maa_url in policy.decode()

    secret = b'{"symkey":"c2VjcmV0","digest":"sha256:00","cipheroptions":{}}'
    (tmp_path / "in").write_bytes(secret)
    wrap = [
        "wrap",
        "--infile",
        str(tmp_path / "in"),
        "--keypath",
        str(keypath),
        "--outfile",
        str(tmp_path / "out"),
    ]
    assert main(wrap) == 0
    packet = json.loads(base64.b64decode((tmp_path / "out").read_bytes()))
    jwk = await release_jwk(stack, "image-key", wrapping_key)
    key = jwk_to_private_key(jwk)
    assert key.key_size == 3072
    assert key.decrypt(base64.b64decode(packet["wrapped_data"]), OAEP256) == secret  # type: ignore[union-attr]


async def test_host_data_from_a_cce_policy_file(cli_env, tmp_path, capsys):
    stack = cli_env
    cce = tmp_path / "policy.rego"
    cce.write_bytes(SECURITY_POLICY)
    assert await run(create(stack, tmp_path / "from-cce", "--cce-policy", str(cce), "--size", "2048")) == 0
    assert host_data_of_policy(SECURITY_POLICY).hex() in capsys.readouterr().err
    assert (tmp_path / "from-cce-info.json").exists()


async def test_bad_host_data_is_one_line_and_no_files(cli_env, tmp_path, capsys):
    stack = cli_env
    assert await run(create(stack, tmp_path / "bad", "--host-data", "xyz")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "64 hex digits" in err
    assert not (tmp_path / "bad-info.json").exists()
