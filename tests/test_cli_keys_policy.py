"""``skr keys show | update-policy`` and ``create``/``import`` on an existing name, against the local key
service (the real SDK, the PATCH the local service implements)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.kvstack import OTHER_HOST_DATA
from tests.test_cli_keys import cli_env, keys, run, write_policy

__all__ = ["cli_env"]  # the fixture


def vault_args(stack, name: str, *extra: str) -> list[str]:
    return ["--vault", stack.hsm_host, "--name", name, "--allow-insecure-challenge", *extra]


async def test_show_prints_attributes_and_the_decoded_policy(cli_env, tmp_path, capsys):
    stack = cli_env
    policy = write_policy(stack, tmp_path)
    assert await run(keys("create", stack, "shown", policy, "--kty", "RSA-HSM")) == 0
    key_id = capsys.readouterr().out.strip()
    assert await run(["keys", "show", *vault_args(stack, "shown"), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["id"] == key_id and description["kty"] == "RSA-HSM"
    assert description["attributes"]["exportable"] is True and description["attributes"]["enabled"] is True
    assert description["release_policy"]["immutable"] is False
    assert description["release_policy"]["policy"] == json.loads(policy.read_bytes())
    assert "key" not in description  # no key members at all
    assert await run(["keys", "show", *vault_args(stack, "shown")]) == 0
    out = capsys.readouterr().out
    assert f"id               {key_id}" in out
    assert "exportable       true" in out and "release policy   mutable" in out
    assert json.loads(out[out.index("\n{") :]) == json.loads(policy.read_bytes())


async def test_update_policy_replaces_the_policy_without_new_key_material(cli_env, tmp_path, capsys):
    stack = cli_env
    assert await run(keys("create", stack, "rolled", write_policy(stack, tmp_path), "--kty", "oct-HSM")) == 0
    key_id = capsys.readouterr().out.strip()
    before = stack.hsm.latest("rolled")
    changed = write_policy(stack, tmp_path, host_data=OTHER_HOST_DATA)
    code = await run(["keys", "update-policy", *vault_args(stack, "rolled"), "--policy", str(changed)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == key_id  # the same version
    assert "release policy of rolled version" in err and "replaced" in err
    after = stack.hsm.latest("rolled")
    assert after.version == before.version and after.material == before.material
    assert len(stack.hsm._keys["rolled"]) == 1
    assert json.loads(stack.hsm.latest_policy("rolled")) == json.loads(changed.read_bytes())
    # a named version, made immutable; after that a change is refused with the vault's code
    version = key_id.rsplit("/", 1)[1]
    argv = ["keys", "update-policy", *vault_args(stack, "rolled"), "--policy", str(changed)]
    assert await run([*argv, "--version", version, "--immutable"]) == 0
    capsys.readouterr()
    code = await run([*argv[:-1], str(write_policy(stack, tmp_path)), "--version", version])
    _, err = capsys.readouterr()
    assert code == 2 and "AKV.SKR.1020" in err


async def test_update_policy_of_a_missing_key_and_a_bad_policy(cli_env, tmp_path, capsys):
    stack = cli_env
    policy = write_policy(stack, tmp_path)
    assert await run(["keys", "update-policy", *vault_args(stack, "nothing"), "--policy", str(policy)]) == 2
    assert "404" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"anyOf": []}')
    assert await run(["keys", "update-policy", *vault_args(stack, "nothing"), "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("skr: ") and err.count("\n") == 1


async def test_create_on_an_existing_name_refuses_unless_new_version(cli_env, tmp_path, capsys):
    stack = cli_env
    policy = write_policy(stack, tmp_path)
    assert await run(keys("create", stack, "taken", policy, "--kty", "oct-HSM")) == 0
    first = capsys.readouterr().out.strip()
    code = await run(keys("create", stack, "taken", policy, "--kty", "oct-HSM"))
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith(
        f"skr: key taken already exists in {stack.hsm_url} (current version {first.rsplit('/', 1)[1]})"
    )
    assert "data encrypted under the old version can only be decrypted with the old version" in err
    assert "--new-version" in err and err.count("\n") == 1
    assert len(stack.hsm._keys["taken"]) == 1
    assert await run(keys("create", stack, "taken", policy, "--kty", "oct-HSM", "--new-version")) == 0
    second = capsys.readouterr().out.strip()
    assert second != first and len(stack.hsm._keys["taken"]) == 2


async def test_import_on_an_existing_name_refuses_too(cli_env, tmp_path: Path, capsys):
    stack = cli_env
    pem = tmp_path / "k.pem"
    pem.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    raw = tmp_path / "k.bin"
    raw.write_bytes(base64.b16decode("00" * 32))
    policy = write_policy(stack, tmp_path)
    assert await run(keys("import", stack, "imported", policy, "--key", str(pem))) == 0
    capsys.readouterr()
    assert await run(keys("import", stack, "imported", policy, "--key", str(raw), "--key-format", "raw")) == 2
    assert "already exists" in capsys.readouterr().err
