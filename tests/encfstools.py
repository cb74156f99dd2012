"""Helpers for the encfs tests: the real system tools (cryptsetup, mkfs.ext4), or a skip that says why.

Images are made by the real ``cryptsetup``, never by skr's own code, so the LUKS2 tests check skr against
an independent implementation.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MiB = 1024 * 1024


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed "
            "(make install puts fuse3, cryptsetup-bin and e2fsprogs in place)"
        )


def run(*argv: str | Path, input: bytes | None = None) -> bytes:
    done = subprocess.run([str(a) for a in argv], input=input, capture_output=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return done.stdout


def luks_format(image: Path, key: bytes, *, size: int = 20 * MiB, pbkdf: str = "pbkdf2") -> Path:
    """An empty LUKS2 image formatted by cryptsetup with the Go tools' cipher and sector size."""
    require_tools("cryptsetup")
    with image.open("wb") as f:
        f.truncate(size)
    kdf = (
        ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
        if pbkdf == "pbkdf2"
        else [
            "--pbkdf",
            pbkdf,
            "--pbkdf-memory",
            "64",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-parallel",
            "2",
        ]
    )
    run(
        "cryptsetup", "luksFormat", "--type", "luks2", "--sector-size", "4096", "--cipher", "aes-xts-plain64",
        *kdf, "--key-file", "-", "--batch-mode", image, input=key,
    )  # fmt: skip
    return image


def encrypted_ext4(workdir: Path, content: Path, key: bytes) -> tuple[Path, Path]:
    """(encrypted image, the plaintext ext4 it was made from) — mkfs.ext4 -d + offline reencrypt, the
    no-device-mapper recipe of ENCFS.md §5."""
    require_tools("cryptsetup", "mkfs.ext4")
    plain = workdir / "plain.ext4"
    run("mkfs.ext4", "-q", "-b", "4096", "-d", content, plain, "32M")
    image = workdir / "image.luks"
    shutil.copyfile(plain, image)
    with image.open("r+b") as f:
        f.truncate(64 * MiB)
    run(
        "cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size", "32M",
        "--cipher", "aes-xts-plain64", "--sector-size", "4096", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", "-", "--batch-mode", image, input=key,
    )  # fmt: skip
    return image, plain


def volume_key_of(image: Path, key: bytes) -> bytes:
    """The volume key as cryptsetup itself reads it (``luksDump --dump-volume-key``)."""
    out = run(
        "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", "-", image, input=key
    )
    text = out.decode()
    hexdump = text.split("MK dump:", 1)[1]
    return bytes.fromhex("".join(hexdump.split()))
