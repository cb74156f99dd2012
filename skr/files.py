"""Files that hold secrets or state: written atomically, never readable by others in between.

Used for private keys, the local services' state, the client's released-key file and manifests.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.errors import ConfigError


def write_atomically(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write ``data`` to a sibling temp file created with ``mode``, fsync it, then rename over ``path``.

    A reader sees the old content or the new, never half a key; the file is never briefly
    world-readable (the mode is set at creation, not after).
    """
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed it; never widened
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private_file(path: Path, data: bytes | str) -> None:
    """:func:`write_atomically` with mode 0600, creating the parent directory (0700) if needed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(path, data, 0o600)


def load_or_create_rsa_key(path: Path, *, bits: int = 2048) -> rsa.RSAPrivateKey:
    """The RSA private key in ``path`` (PEM), or a new one written there with mode 0600.

    Blocking (key generation on first use): call through ``asyncio.to_thread`` from async code.
    """
    if path.exists():
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
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
