"""Helpers for the encfs tests: the real system tools (cryptsetup, mkfs.ext4), or a skip that says why.

Images are made by the real ``cryptsetup``, never by skr's own code, so the LUKS2 tests check skr against
an independent implementation.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --- Azurite (tests/azurite, pinned; `make install` runs npm ci there) ----------------------------------

AZURITE_DIR = Path(__file__).resolve().parent / "azurite"
AZURITE_BIN = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# The emulator's well-known, public development key (used only to create containers in tests).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def require_mounts() -> None:
    """Root, /dev/fuse, loop devices and the tools: the userspace backend's needs, or a skip saying which."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root (CI runs make test as root)")
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing: no FUSE in this kernel or container")
    require_tools("losetup", "mount", "umount", "fusermount3", "cryptsetup", "mkfs.ext4")


@dataclass
class Azurite:
    proc: subprocess.Popen[str]
    port: int
    cert_pem: Path

    @property
    def account_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/{ACCOUNT}"

    def blob_url(self, container: str, name: str) -> str:
        return f"{self.account_url}/{container}/{name}"

    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.account_url};"
        )


@contextlib.contextmanager
def azurite(workdir: Path, ca: Any) -> Iterator[Azurite]:
    """Azurite blob on 127.0.0.1 (ephemeral port), HTTPS with a certificate from ``ca``, ``--oauth basic``,
    and ALWAYS ``--disableTelemetry`` (without it Azurite calls an outside telemetry host)."""
    if not AZURITE_BIN.exists():
        pytest.skip(f"Azurite is not installed at {AZURITE_BIN} (make install runs npm ci in tests/azurite)")
    if shutil.which("node") is None:
        pytest.skip("node is not installed: Azurite cannot run")
    issued = ca.issue(["127.0.0.1", "localhost"])
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / "azurite-cert.pem", workdir / "azurite-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    argv = [
        str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", str(workdir / "data"),
        "--skipApiVersionCheck", "--loose", "--disableTelemetry",
        "--cert", str(cert), "--key", str(key), "--oauth", "basic",
    ]  # fmt: skip
    assert "--disableTelemetry" in argv
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        port = None
        seen: list[str] = []
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            seen.append(line)
            found = re.search(r"listens on https://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        if port is None:
            raise AssertionError("Azurite did not start:\n" + "".join(seen))
        yield Azurite(proc, port, cert)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def force_cleanup(root: Path) -> None:
    """After a failed test killed skr encfs: unmount, detach and unmount FUSE under ``root``, in order."""
    from skr.encfs.mount import loops_backed_by, mounted_paths

    mounts = [m for m in mounted_paths() if m.startswith(str(root) + "/")]
    for path in sorted(mounts, key=len, reverse=True):
        if "/.filesystem-" in path:
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)
    for device in loops_backed_by(root):
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
    for path in mounts:
        if "/.filesystem-" not in path:
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, check=False)
