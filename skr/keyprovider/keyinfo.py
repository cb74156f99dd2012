"""The image owner's files for wrapping: ``<keypath>-info.json`` and the RSA public key it names.

Owns the Go sidecar's one-shot wrap contract: ``<keypath>-info.json`` holds
``{"public_key_path", "kms_endpoint", "attester_endpoint"}``; the public key is a PEM
SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``) RSA key; the annotation's ``kid`` is the base name
of ``<keypath>``. A relative ``public_key_path`` is read from the current directory, as the Go tool does.

Reads and writes files only; blocking (callers on an event loop use a worker thread). Holds public keys
only: nothing here can decrypt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.errors import BadRequest, Code, NotFound
from skr.files import write_atomically
from skr.keyprovider.ocicrypt import WRAP_TYPE, AnnotationPacket, encode_annotation, oaep_wrap


@dataclass(frozen=True)
class KeyInfo:
    """The contents of ``<keypath>-info.json``."""

    public_key_path: str
    kms_endpoint: str
    attester_endpoint: str


def info_path(keypath: str | Path) -> Path:
    return Path(f"{keypath}-info.json")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"the {what} {path} does not exist", code=Code.KEY_INFO_NOT_FOUND) from None
    except OSError as exc:
        raise BadRequest(
            f"cannot read the {what} {path}: {exc.strerror}", code=Code.INVALID_KEY_INFO
        ) from None


def read_key_info(keypath: str | Path) -> tuple[KeyInfo, rsa.RSAPublicKey]:
    path = info_path(keypath)
    try:
        doc = json.loads(_read(path, "key info file"))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"the key info file {path} is not JSON", code=Code.INVALID_KEY_INFO) from None
    values = {f.name: doc.get(f.name, "") for f in fields(KeyInfo)} if isinstance(doc, dict) else {}
    if not values or not all(isinstance(value, str) for value in values.values()):
        raise BadRequest(
            f"the key info file {path} must be an object of strings "
            "public_key_path, kms_endpoint and attester_endpoint",
            code=Code.INVALID_KEY_INFO,
        )
    info = KeyInfo(**values)
    if not info.public_key_path:
        raise BadRequest(f"the key info file {path} names no public_key_path", code=Code.INVALID_KEY_INFO)
    pem = _read(Path(info.public_key_path), "public key file")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadRequest(
            f"{info.public_key_path} is not a PEM public key", code=Code.INVALID_KEY_INFO
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadRequest(f"{info.public_key_path} is not an RSA public key", code=Code.INVALID_KEY_INFO)
    return info, key


def wrap_for_keypath(keypath: str | Path, plaintext: bytes) -> bytes:
    """The annotation packet JSON for ``plaintext`` wrapped to ``keypath``'s key (Go's ``DirectWrap``)."""
    info, public_key = read_key_info(keypath)
    packet = AnnotationPacket(
        kid=Path(keypath).name,
        wrapped_data=oaep_wrap(public_key, plaintext),
        wrap_type=WRAP_TYPE,
        kms_endpoint=info.kms_endpoint,
        attester_endpoint=info.attester_endpoint,
    )
    return encode_annotation(packet)


def write_key_info(
    keypath: str | Path, public_key: rsa.RSAPublicKey, *, kms_endpoint: str, attester_endpoint: str
) -> tuple[Path, Path]:
    """Write ``<keypath>-pub.pem`` and ``<keypath>-info.json`` (naming the PEM by absolute path)."""
    pem_path = Path(f"{keypath}-pub.pem").absolute()
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomically(pem_path, pem, 0o644)
    path = info_path(keypath)
    doc = asdict(KeyInfo(str(pem_path), kms_endpoint, attester_endpoint))
    write_atomically(path, json.dumps(doc, indent=2) + "\n", 0o644)
    return path, pem_path
