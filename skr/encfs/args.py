"""``EncfsSideCarArgs``: the Go encfs sidecar's configuration (standard base64 of JSON), parsed once.

Same schema as ``cmd/remotefs`` (``RemoteFilesystemsInformation``): ``azure_info`` (``certcache``,
``identity``) and ``azure_filesystems[]`` with ``mount_point``, ``azure_url``, ``azure_url_private``,
``read_write``, ``key {kid, kty, authority.endpoint, akv.endpoint}``, ``key_derivation {salt, label}`` and
the test-only ``raw_key`` (ignored, as in the Go release image). Unknown fields are ignored, as Go's
``json.Unmarshal`` does. Field *types* are checked here; whether a URL or an endpoint is usable is checked
where it is used (:func:`skr.encfs.blob.parse_blob_url`, the release path's allowlist).

Pure: no I/O. Never logs; ``raw_key`` is kept out of reprs.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from skr.encfs.errors import EncfsConfigError

DEFAULT_LABEL = "Symmetric Encryption Key"  # the Go tools' HKDF info when key_derivation.label is empty


@dataclass(frozen=True)
class KeySpec:
    """``key``: which key to release, from which vault, attested by which MAA."""

    kid: str
    kty: str = ""
    maa_endpoint: str = ""  # key.authority.endpoint
    akv_endpoint: str = ""  # key.akv.endpoint


@dataclass(frozen=True)
class KeyDerivation:
    """``key_derivation``: HKDF inputs for RSA keys (hex salt, label)."""

    salt_hex: str = ""
    label: str = ""

    @property
    def salt(self) -> bytes:
        try:
            return bytes.fromhex(self.salt_hex)
        except ValueError:
            raise EncfsConfigError(
                "key_derivation.salt is not a hex string", hint="use the salt importkey printed, as hex"
            ) from None

    @property
    def info(self) -> bytes:
        return (self.label or DEFAULT_LABEL).encode()


@dataclass(frozen=True)
class FilesystemSpec:
    """One entry of ``azure_filesystems``."""

    index: int
    mount_point: str
    azure_url: str
    azure_url_private: bool = False
    read_write: bool = False
    key: KeySpec | None = None
    key_derivation: KeyDerivation = field(default_factory=KeyDerivation)
    has_raw_key: bool = False  # raw_key was given (and is ignored)


@dataclass(frozen=True)
class EncfsArgs:
    """The whole ``EncfsSideCarArgs`` document."""

    filesystems: tuple[FilesystemSpec, ...]
    certcache: Mapping[str, Any] = field(default_factory=dict)
    identity: Mapping[str, Any] = field(default_factory=dict)

    @property
    def client_id(self) -> str | None:
        value = self.identity.get("client_id")
        return value if isinstance(value, str) and value else None


def decode_encfs_args(value: str) -> EncfsArgs:
    """``EncfsSideCarArgs``: standard base64 (Go ``StdEncoding``) of the JSON document."""
    try:
        raw = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EncfsConfigError(
            "EncfsSideCarArgs is not standard base64", hint="encode the JSON with `base64 -w0`"
        ) from None
    return parse_encfs_json(raw, source="EncfsSideCarArgs")


def parse_encfs_json(raw: bytes | str, *, source: str = "the encfs configuration") -> EncfsArgs:
    """The same JSON as ``EncfsSideCarArgs`` decodes to (``skr encfs --config FILE``)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EncfsConfigError(f"{source} is not JSON") from None
    if not isinstance(doc, dict):
        raise EncfsConfigError(f"{source} must be a JSON object")
    info = _object(doc, "azure_info", source)
    filesystems = doc.get("azure_filesystems")
    if not isinstance(filesystems, list) or not filesystems:
        raise EncfsConfigError(f"{source} has no azure_filesystems (a non-empty list)")
    return EncfsArgs(
        filesystems=tuple(_filesystem(i, fs, source) for i, fs in enumerate(filesystems)),
        certcache=_object(info, "certcache", f"{source}.azure_info"),
        identity=_object(info, "identity", f"{source}.azure_info"),
    )


def _object(doc: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = {} if doc.get(name) is None else doc[name]
    if not isinstance(value, dict):
        raise EncfsConfigError(f"{where}.{name} must be a JSON object")
    return value


def _string(doc: Mapping[str, Any], name: str, where: str, *, required: bool = False) -> str:
    value = "" if doc.get(name) is None else doc[name]
    if not isinstance(value, str):
        raise EncfsConfigError(f"{where}.{name} must be a string")
    if required and not value:
        raise EncfsConfigError(f"{where}.{name} is required")
    return value


def _flag(doc: Mapping[str, Any], name: str, where: str) -> bool:
    value = False if doc.get(name) is None else doc[name]
    if not isinstance(value, bool):
        raise EncfsConfigError(f"{where}.{name} must be true or false")
    return value


def _filesystem(index: int, fs: Any, source: str) -> FilesystemSpec:
    where = f"{source}.azure_filesystems[{index}]"
    if not isinstance(fs, dict):
        raise EncfsConfigError(f"{where} must be a JSON object")
    key_doc = _object(fs, "key", where)
    key = None
    if key_doc:
        key = KeySpec(
            kid=_string(key_doc, "kid", f"{where}.key"),
            kty=_string(key_doc, "kty", f"{where}.key"),
            maa_endpoint=_string(_object(key_doc, "authority", f"{where}.key"), "endpoint", where),
            akv_endpoint=_string(_object(key_doc, "akv", f"{where}.key"), "endpoint", where),
        )
        if not key.kid:
            key = None
    derivation = _object(fs, "key_derivation", where)
    return FilesystemSpec(
        index=index,
        mount_point=_string(fs, "mount_point", where, required=True),
        azure_url=_string(fs, "azure_url", where, required=True),
        azure_url_private=_flag(fs, "azure_url_private", where),
        read_write=_flag(fs, "read_write", where),
        key=key,
        key_derivation=KeyDerivation(
            salt_hex=_string(derivation, "salt", f"{where}.key_derivation"),
            label=_string(derivation, "label", f"{where}.key_derivation"),
        ),
        has_raw_key=bool(_string(fs, "raw_key", where)),
    )
