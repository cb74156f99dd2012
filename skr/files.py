"""Files that hold secrets or state: written atomically, never readable by others in between, and never
through a symbolic link.

Used for private keys, the local services' state, the client's released-key file and manifests. No
symlink is followed for the state directory, anything under it, or ``skr release --out``: files are opened
with ``O_NOFOLLOW`` (temporary files also with ``O_EXCL``) relative to a directory opened with
``O_NOFOLLOW``, must be regular files (directories: real directories), and anything else is refused with
``config_invalid`` naming the path. A link planted where skr keeps keys cannot redirect a write (or a
``chmod``) to another file, nor feed skr another file's content.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.errors import ConfigError

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_LINK_ERRNOS = frozenset({errno.ELOOP, errno.EMLINK})  # what O_NOFOLLOW on a link gives (Linux, BSD)


def _is_a_link(path: Path | str) -> ConfigError:
    return ConfigError(
        f"{path} is a symbolic link: skr does not follow links for its state directory or output files",
        hint="replace the link with a real file or directory (or choose another path)",
    )


def _not_a(path: Path | str, what: str) -> ConfigError:
    return ConfigError(f"{path} is not a {what}", hint="move it away or choose another path")


def _require(path: Path | str, mode: int, is_kind: Callable[[int], bool], what: str) -> None:
    """``mode`` (from ``lstat``) is not a link and ``is_kind``: else ConfigError naming ``path``."""
    if stat.S_ISLNK(mode):
        raise _is_a_link(path)
    if not is_kind(mode):
        raise _not_a(path, what)


def check_directory(path: Path, *, missing_ok: bool = False) -> None:
    """``path`` is a real directory: not a symbolic link, not a file. Raises ConfigError otherwise."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return
        raise ConfigError(f"{path} does not exist") from None
    _require(path, info.st_mode, stat.S_ISDIR, "directory")


def ensure_directory(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` (``mode``, with parents) if missing; refuse a link or a non-directory there."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a dangling link or a file: named below
    except OSError as exc:
        raise ConfigError(f"cannot create the directory {path}: {exc.strerror}") from None
    check_directory(path)


def check_state_tree(root: Path) -> None:
    """When ``root`` exists: it and everything under it are real directories or regular files, no links.

    Run at start for the state directory, so that a planted link is refused before anything is read.
    """
    check_directory(root, missing_ok=True)
    if not os.path.lexists(root):
        return
    for directory, subdirectories, files in os.walk(root, followlinks=False):
        for name in [*subdirectories, *files]:
            entry = os.path.join(directory, name)
            try:
                mode = os.lstat(entry).st_mode
            except FileNotFoundError:  # removed meanwhile
                continue
            _require(entry, mode, lambda m: stat.S_ISDIR(m) or stat.S_ISREG(m), "regular file or directory")


def check_output_file(path: Path) -> None:
    """Before any work is done for it: ``path`` is absent or a regular file, in a real directory."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        _require(path, mode, stat.S_ISREG, "regular file")
    check_directory(path.parent, missing_ok=True)


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``, opened without following a link; FileNotFoundError when it is absent,
    ConfigError when it is a link or not a regular file (a FIFO or a device is never read)."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in _LINK_ERRNOS:
            raise _is_a_link(path) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_a(path, "regular file")
        return handle.read()


def _open_directory(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _LINK_ERRNOS:
            raise _is_a_link(path) from None
        if exc.errno == errno.ENOTDIR:
            raise _not_a(path, "directory") from None
        raise


def write_atomically(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write ``data`` to a sibling temp file created with ``mode``, fsync it, then rename over ``path``.

    A reader sees the old content or the new, never half a key; the file is never briefly
    world-readable (the mode is set at creation, not after). The directory is opened without following a
    link and every name is resolved relative to it; an existing ``path`` must be a regular file.
    """
    payload = data.encode() if isinstance(data, str) else data
    directory = _open_directory(path.parent)
    try:
        try:
            existing = os.stat(path.name, dir_fd=directory, follow_symlinks=False).st_mode
        except FileNotFoundError:
            pass
        else:
            _require(path, existing, stat.S_ISREG, "regular file")
        tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC
        fd = os.open(tmp, flags, mode, dir_fd=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)  # the umask may have narrowed it; never widened
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=directory)
            raise
    finally:
        os.close(directory)


def write_private_file(path: Path, data: bytes | str) -> None:
    """:func:`write_atomically` with mode 0600, creating the parent directory (0700) if needed."""
    ensure_directory(path.parent)
    write_atomically(path, data, 0o600)


def load_or_create_rsa_key(path: Path, *, bits: int = 2048) -> rsa.RSAPrivateKey:
    """The RSA private key in ``path`` (PEM), or a new one written there with mode 0600.

    Blocking (key generation on first use): call through ``asyncio.to_thread`` from async code.
    """
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        pass
    else:
        loaded = serialization.load_pem_private_key(data, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ConfigError(
                f"{path} does not hold an RSA private key", hint="delete it to create a new one"
            )
        return loaded
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem)
    return key
