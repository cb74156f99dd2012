"""The privileged and system steps of encfs, behind one small interface tests replace with a recording fake.

Every external program encfs runs (``mkfs.ext4``, ``cryptsetup``, ``losetup``, ``mount``, ``umount``,
``fusermount3``) goes through :class:`Runner`. The command lines are built here, once; a key is only ever
passed on **stdin** (``--key-file -``), never as a file or an argument.

Never logs stdin; a failure message carries the program's own stderr (which never holds the key).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from skr.encfs.errors import MountError

log = logging.getLogger("skr.encfs")

DEFAULT_TIMEOUT = 120.0
MiB = 1024 * 1024

# The Go tools' format (generatefs.sh): LUKS2, AES-XTS-plain64 with a 512-bit key, 4096-byte sectors,
# PBKDF2 with 1000 iterations (enough for a random 32-byte key, never for a human passphrase).
LUKS_FORMAT_ARGS = (
    "--type", "luks2", "--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096",
    "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
)  # fmt: skip
REDUCE_DEVICE = 32 * MiB  # reencrypt --encrypt moves the data by half of this: data offset 16 MiB


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""

    def first_error_line(self) -> str:
        lines = [ln.strip() for ln in self.stderr.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit code {self.returncode}"


class Runner(Protocol):
    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Completed:
        """Run ``argv``; ``stdin`` is the only way key material reaches a program."""
        ...


class HostRunner:
    """Runs the real programs."""

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Completed:
        log.debug("running %s", " ".join(argv))
        try:
            done = subprocess.run(  # noqa: S603 - fixed programs, arguments built in this module
                list(argv),
                input=stdin if stdin is not None else b"",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            return Completed(127, b"", f"{argv[0]}: not installed".encode())
        except subprocess.TimeoutExpired:
            return Completed(124, b"", f"{argv[0]} did not finish within {timeout:g} s".encode())
        return Completed(done.returncode, done.stdout, done.stderr)


@dataclass
class System:
    """The steps, as methods that raise :class:`MountError` naming the step on failure."""

    runner: Runner = field(default_factory=HostRunner)

    def _must(self, step: str, argv: Sequence[str], *, stdin: bytes | None = None) -> Completed:
        done = self.runner.run(argv, stdin=stdin)
        if done.returncode != 0:
            raise MountError(f"{step} failed: {done.first_error_line()}")
        return done

    # --- image creation ---------------------------------------------------------------------------------

    def mkfs_ext4(self, content: Path, image: Path, size: int) -> None:
        self._must(
            "mkfs.ext4",
            ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(image), f"{size // 1024}k"],
        )

    def luks_encrypt_in_place(self, image: Path, key: bytes) -> None:
        """``cryptsetup reencrypt --encrypt``: no device-mapper needed; the key comes on stdin."""
        self._must(
            "cryptsetup reencrypt --encrypt",
            [
                "cryptsetup", "reencrypt", "--encrypt", *LUKS_FORMAT_ARGS,
                "--reduce-device-size", f"{REDUCE_DEVICE // MiB}M",
                "--key-file", "-", "--batch-mode", str(image),
            ],
            stdin=key,
        )  # fmt: skip

    # --- dm-crypt -----------------------------------------------------------------------------------------

    def cryptsetup_open(
        self, source: Path, name: str, key: bytes, *, header: Path | None = None
    ) -> Completed:
        argv = ["cryptsetup", "open", "--type", "luks2", str(source), name, "--key-file", "-"]
        if header is not None:
            argv += ["--header", str(header)]
        argv += ["--integrity-no-journal", "--persistent"]
        return self.runner.run(argv, stdin=key)

    def cryptsetup_close(self, name: str) -> Completed:
        return self.runner.run(["cryptsetup", "close", name])

    # --- loop devices and mounts ------------------------------------------------------------------------

    def losetup_attach(self, file: Path, *, read_only: bool) -> str:
        argv = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [str(file)]
        return self._must("losetup", argv).stdout.decode().strip()

    def losetup_detach(self, device: str) -> Completed:
        return self.runner.run(["losetup", "-d", device])

    def mount_ext4(self, device: str, target: Path, *, read_only: bool) -> None:
        options = ["-o", "ro,noload"] if read_only else []
        self._must("mount", ["mount", "-t", "ext4", *options, device, str(target)])

    def umount(self, target: Path, *, lazy: bool = False) -> Completed:
        return self.runner.run(["umount", *(["-l"] if lazy else []), str(target)])

    def fuse_unmount(self, target: Path, *, lazy: bool = False) -> Completed:
        tool = "fusermount3" if shutil.which("fusermount3") else "fusermount"
        return self.runner.run([tool, "-u", *(["-z"] if lazy else []), str(target)])


def has_device_mapper(proc_misc: Path = Path("/proc/misc")) -> bool:
    """Whether the kernel has device-mapper, as ``/proc/misc`` says (``/dev/mapper/control`` may be dead)."""
    try:
        return any(line.split()[-1:] == ["device-mapper"] for line in proc_misc.read_text().splitlines())
    except OSError:
        return False
