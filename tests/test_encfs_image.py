"""skr encfs create / inspect: images with the Go tools' settings, checked with cryptsetup and debugfs."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from skr.cli import main
from skr.encfs.image import file_reader
from skr.encfs.luks2 import DataCipher, read_header, unlock
from skr.maa.runtime import WrappingKey
from tests.encfstools import MiB, require_tools, volume_key_of
from tests.test_cli_keys import release_jwk

KEY = bytes(range(100, 132))


@pytest.fixture
def content(tmp_path: Path) -> Path:
    root = tmp_path / "content"
    (root / "deep" / "er").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "deep" / "er" / "b.bin").write_bytes(bytes(range(256)) * 4000)
    return root


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key.bin"
    path.write_bytes(KEY)
    return path


def debugfs_cat(plain: Path, inside: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", f"cat {inside}", str(plain)], capture_output=True, check=True
    ).stdout


def test_create_writes_an_image_with_the_go_tools_settings(
    tmp_path: Path, content: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tools("cryptsetup", "mkfs.ext4", "debugfs")
    out = tmp_path / "out" / "image.img"
    assert (
        main(["encfs", "create", "--from", str(content), "--out", str(out), "--key-file", str(key_file)]) == 0
    )
    meta = json.loads(
        subprocess.run(
            ["cryptsetup", "luksDump", "--dump-json-metadata", str(out)], capture_output=True, check=True
        ).stdout
    )
    (slot,) = meta["keyslots"].values()
    assert slot["kdf"]["type"] == "pbkdf2" and slot["kdf"]["iterations"] == 1000
    segment = meta["segments"]["0"]
    assert (segment["encryption"], segment["sector_size"], segment["offset"]) == (
        "aes-xts-plain64",
        4096,
        "16777216",
    )
    assert slot["key_size"] == 64
    assert not list(out.parent.glob(".*partial"))

    # decrypt with cryptsetup's own volume key and read the files back with debugfs
    header = read_header(file_reader(out))
    opened = unlock(header, KEY, file_reader(out))
    assert opened.key == volume_key_of(out, KEY)
    data = out.read_bytes()[16 * MiB :]
    plain = tmp_path / "plain.ext4"
    plain.write_bytes(DataCipher(opened, header.data_segment).decrypt(0, data))
    assert debugfs_cat(plain, "/a.txt") == b"alpha\n"
    assert debugfs_cat(plain, "/deep/er/b.bin") == bytes(range(256)) * 4000


def test_create_with_an_explicit_size(tmp_path: Path, content: Path, key_file: Path) -> None:
    require_tools("cryptsetup", "mkfs.ext4")
    out = tmp_path / "sized.img"
    assert main(["encfs", "create", "--from", str(content), "--out", str(out), "--key-file", str(key_file),
                 "--size", "64M"]) == 0  # fmt: skip
    assert out.stat().st_size == 64 * MiB


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "20M"], "at least"),
        (["--size", "lots"], "not a number"),
        (["--kid", "k"], "--kid goes with --vault"),
    ],
)
def test_create_refuses_bad_input_with_one_line(
    tmp_path: Path,
    content: Path,
    key_file: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "x.img"
    argv = ["encfs", "create", "--from", str(content), "--out", str(out), "--key-file", str(key_file), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_create_refuses_a_key_file_that_is_not_32_bytes(
    tmp_path: Path, content: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789")
    assert (
        main(
            [
                "encfs",
                "create",
                "--from",
                str(content),
                "--out",
                str(tmp_path / "o"),
                "--key-file",
                str(short),
            ]
        )
        == 2
    )
    assert "exactly 32" in capsys.readouterr().err


def test_inspect_says_whether_a_key_opens_it(
    tmp_path: Path, content: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tools("cryptsetup", "mkfs.ext4")
    out = tmp_path / "image.img"
    assert (
        main(["encfs", "create", "--from", str(content), "--out", str(out), "--key-file", str(key_file)]) == 0
    )
    capsys.readouterr()
    assert main(["encfs", "inspect", str(out), "--key-file", str(key_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["key_opens"] is True and report["keyslot"] == "0"
    assert report["cipher"] == "aes-xts-plain64" and report["sector_size"] == 4096
    assert report["keyslots"][0]["kdf"] == "pbkdf2" and report["keyslots"][0]["iterations"] == 1000
    assert report["data_size"] == out.stat().st_size - 16 * MiB
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(bytes(32))
    assert main(["encfs", "inspect", str(out), "--key-file", str(wrong)]) == 1
    assert json.loads(capsys.readouterr().out)["key_opens"] is False
    assert main(["encfs", "inspect", str(out)]) == 0
    assert "key_opens" not in json.loads(capsys.readouterr().out)


def test_inspect_a_file_that_is_not_luks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 8192)
    assert main(["encfs", "inspect", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "not a LUKS2 image" in err and "Traceback" not in err


async def test_create_with_vault_imports_the_only_copy_of_the_key(
    stack: Any, imds_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: Path
) -> None:
    require_tools("cryptsetup", "mkfs.ext4")
    monkeypatch.setenv("SKR_CA_BUNDLE", stack.ca_pem)
    policy = tmp_path / "policy.json"
    policy.write_bytes(stack.policy())
    out = tmp_path / "vault.img"
    argv = ["encfs", "create", "--from", str(content), "--out", str(out), "--vault", stack.hsm_host,
            "--kid", "fs-key", "--policy", str(policy), "--allow-insecure-challenge"]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    jwk = await release_jwk(stack, "fs-key", WrappingKey.generate())
    assert jwk["kty"] == "oct"
    key = base64.urlsafe_b64decode(jwk["k"] + "==")
    assert unlock(read_header(file_reader(out)), key, file_reader(out)).key == volume_key_of(out, key)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == key]  # noqa: ASYNC240


async def test_create_with_vault_needs_kid_and_policy(tmp_path: Path, content: Path) -> None:
    argv = [
        "encfs",
        "create",
        "--from",
        str(content),
        "--out",
        str(tmp_path / "x"),
        "--vault",
        "v.vault.azure.net",
    ]
    assert await asyncio.to_thread(main, argv) == 2
