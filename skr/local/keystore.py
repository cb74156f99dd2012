"""The key store of the local key service: keys, their versions and their material, persisted.

Owns the key model (:class:`KeyVersion`, :class:`StoredPolicy`), key generation and import as a Managed
HSM does them (``oct-HSM``, ``RSA-HSM``, ``EC-HSM``; private JWKs), Azure's rules on release policies
(exportable keys need one, ``AKV.SKR.1004``; non-exportable keys must not have one, ``AKV.SKR.1005``; an
immutable policy cannot change, ``AKV.SKR.1020``; ``exportable`` cannot change, ``AKV.SKR.1003``), and
their persistence as JSON in ``state_dir/keys`` (directory 0700, files 0600).

Refusals are :class:`skr.local.kit.ServiceError` answers (400 ``BadParameter``, 404 ``KeyNotFound``) or,
through the programmatic API, :class:`KeyRejected`. Knows nothing of HTTP requests; never logs key
material.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from skr.akv.jwk import CURVES, jwk_to_private_key, private_key_to_jwk
from skr.akv.keywrap import b64url_decode
from skr.akv.policy import parse_policy
from skr.b64 import b64url_encode
from skr.endpoints import is_key_name
from skr.errors import BadRequest, Code, ConfigError, KeyWrapError, PolicyError
from skr.files import ensure_directory, read_regular_file, write_private_file
from skr.local.kit import ServiceError

POLICY_CONTENT_TYPE = "application/json; charset=utf-8"
RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90

OCT_SIZES = (128, 192, 256)
RSA_SIZES = (2048, 3072, 4096)
KEY_TYPES = ("oct-HSM", "RSA-HSM", "EC-HSM")
KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export")
DEFAULT_KEY_OPS: Mapping[str, tuple[str, ...]] = {
    "oct-HSM": ("encrypt", "decrypt", "wrapKey", "unwrapKey"),
    "RSA-HSM": ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"),
    "EC-HSM": ("sign", "verify"),
}
# "oct", "oct-hsm", "rsa", ... (any case): a Managed HSM keeps every key in the HSM
_KTY_ALIASES: Mapping[str, str] = {
    alias.lower(): kty for kty in KEY_TYPES for alias in (kty, kty.removesuffix("-HSM"))
}

ERR_1004 = "AKV.SKR.1004: Exportable keys must have release policy."
ERR_1005 = "AKV.SKR.1005: Non-exportable keys must not have release policy."
ERR_1020 = "AKV.SKR.1020: Immutable Key Release Policy cannot be modified."
ERR_1003 = "AKV.SKR.1003: The exportable attribute of an existing key cannot be changed."


@dataclass(frozen=True)
class StoredPolicy:
    """A key release policy as stored: the raw JSON bytes, its content type and immutability."""

    data: bytes
    content_type: str = POLICY_CONTENT_TYPE
    immutable: bool = False

    def to_wire(self) -> dict[str, Any]:
        """The ``release_policy`` member of a key bundle."""
        return {
            "contentType": self.content_type,
            "data": b64url_encode(self.data),
            "immutable": self.immutable,
        }


@dataclass(frozen=True)
class KeyVersion:
    """One version of a key. ``material`` is the private JWK (``oct``: ``{"kty":"oct","k"}``)."""

    name: str
    version: str
    kty: str
    key_ops: tuple[str, ...]
    material: Mapping[str, Any] = field(repr=False)
    created: int
    updated: int
    exportable: bool
    enabled: bool = True
    release_policy: StoredPolicy | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def public_jwk(self, base_url: str) -> dict[str, Any]:
        """The public JWK of a key bundle: ``kid`` under ``base_url``, ``kty``, ``key_ops``, and ``n``/``e``
        or ``crv``/``x``/``y`` (nothing more for oct keys)."""
        members = ("n", "e") if self.kty == "RSA-HSM" else ("crv", "x", "y") if self.kty == "EC-HSM" else ()
        return {
            "kid": f"{base_url}/keys/{self.name}/{self.version}",
            "kty": self.kty,
            "key_ops": list(self.key_ops),
            **{m: self.material[m] for m in members},
        }

    def attributes(self) -> dict[str, Any]:
        """The ``attributes`` member of a key bundle."""
        return {
            "enabled": self.enabled,
            "created": self.created,
            "updated": self.updated,
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": RECOVERABLE_DAYS,
            "exportable": self.exportable,
        }

    def to_json(self) -> dict[str, Any]:
        """The persisted form (holds the private key: write only to 0600 files)."""
        policy = self.release_policy
        return {**asdict(self), "release_policy": None if policy is None else policy.to_wire()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> KeyVersion:
        """Read the persisted form back."""
        policy = doc.get("release_policy")
        return cls(
            name=doc["name"],
            version=doc["version"],
            kty=doc["kty"],
            key_ops=tuple(doc["key_ops"]),
            material=dict(doc["material"]),
            created=int(doc["created"]),
            updated=int(doc["updated"]),
            exportable=bool(doc["exportable"]),
            enabled=bool(doc.get("enabled", True)),
            release_policy=None
            if not policy
            else StoredPolicy(
                data=decode_b64url(policy["data"]),
                content_type=policy.get("contentType", POLICY_CONTENT_TYPE),
                immutable=bool(policy.get("immutable", False)),
            ),
            tags=dict(doc.get("tags") or {}),
        )


class KeyRejected(BadRequest):
    """The programmatic API (:meth:`LocalKeyService.create_key` / ``import_key``) refused a key the way the
    HTTP API answers 400 — the message carries Azure's code and text."""

    default_code = Code.LOCAL_KEY_REJECTED


@contextmanager
def _rejections() -> Iterator[None]:
    try:
        yield
    except ServiceError as exc:
        raise KeyRejected(f"{exc.code}: {exc.message}") from None


def bad(message: str) -> ServiceError:
    """Key Vault's 400 ``BadParameter`` answer."""
    return ServiceError(400, "BadParameter", message)


def decode_b64url(value: str) -> bytes:
    """base64url, padded or not; a 400 ``BadParameter`` otherwise."""
    try:
        return b64url_decode(value, what="a value")
    except KeyWrapError:
        raise bad("a value is not base64url") from None


def ci_member(doc: Mapping[str, Any], name: str) -> Any:
    """A member looked up case-insensitively (Key Vault matches JSON property names that way)."""
    if name in doc:
        return doc[name]
    lowered = name.lower()
    return next((v for k, v in doc.items() if isinstance(k, str) and k.lower() == lowered), None)


def normalize_kty(value: object) -> str:
    """The stored key type; a Managed HSM keeps every key in the HSM, so ``RSA`` means ``RSA-HSM``."""
    kty = _KTY_ALIASES.get(str(value).lower()) if isinstance(value, str) else None
    if kty is None:
        raise bad(f"The key type '{str(value)[:32]}' is not supported. Supported: {', '.join(KEY_TYPES)}.")
    return kty


def generate_material(kty: str, *, size: int | None, curve: str | None) -> dict[str, Any]:
    """A fresh private key as a JWK (CPU-heavy for RSA: run in a thread)."""
    if kty == "oct-HSM":
        bits = size or 256
        if bits not in OCT_SIZES:
            raise bad(f"The key size {bits} is not supported for oct-HSM keys. Supported: 128, 192, 256.")
        return {"kty": "oct", "k": b64url_encode(secrets.token_bytes(bits // 8))}
    if kty == "RSA-HSM":
        bits = size or 2048
        if bits not in RSA_SIZES:
            raise bad(f"The key size {bits} is not supported for RSA-HSM keys. Supported: 2048, 3072, 4096.")
        return private_key_to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=bits))
    crv = curve or "P-256"
    if crv not in CURVES:
        raise bad(f"The curve '{crv[:16]}' is not supported. Supported: {', '.join(CURVES)}.")
    return private_key_to_jwk(ec.generate_private_key(CURVES[crv]()))


def import_material(kty: str, jwk: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an imported private JWK and return it in stored form."""
    if kty == "oct-HSM":
        raw = jwk.get("k")
        if not isinstance(raw, str):
            raise bad("The imported oct key has no 'k'.")
        key_bytes = decode_b64url(raw)
        if len(key_bytes) * 8 not in OCT_SIZES:
            raise bad(f"The imported oct key is {len(key_bytes) * 8} bits; supported: 128, 192, 256.")
        return {"kty": "oct", "k": b64url_encode(key_bytes)}
    try:
        key = jwk_to_private_key({**jwk, "kty": "RSA" if kty == "RSA-HSM" else "EC"})
    except KeyWrapError as exc:
        raise bad(f"The imported key is not a valid private key: {exc.message}") from None
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size not in RSA_SIZES:
        raise bad(f"The imported RSA key is {key.key_size} bits; supported: 2048, 3072, 4096.")
    try:
        return private_key_to_jwk(key)
    except KeyWrapError as exc:
        raise bad(f"The imported key is not supported: {exc.message}") from None


def key_ops_of(value: object, kty: str) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_KEY_OPS[kty]
    if not isinstance(value, list) or not all(isinstance(op, str) and op in KEY_OPS for op in value):
        raise bad(f"key_ops must be a list of: {', '.join(KEY_OPS)}.")
    return tuple(dict.fromkeys(value))


def parse_stored_policy(value: object) -> StoredPolicy | None:
    """The ``release_policy`` member of a request (None when absent); a 400 when it is not a policy."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise bad("release_policy must be an object.")
    data = ci_member(value, "data")
    if data is None:
        raise bad("Key Release Policy: missing 'data'.")
    content_type = str(ci_member(value, "contentType") or POLICY_CONTENT_TYPE)
    return _checked_policy(decode_b64url(data), content_type, bool(ci_member(value, "immutable")))


def _checked_policy(data: bytes, content_type: str, immutable: bool) -> StoredPolicy:
    try:
        parse_policy(data)
    except PolicyError as exc:
        raise bad(f"Key Release Policy: {exc.message}") from None
    return StoredPolicy(data=data, content_type=content_type, immutable=immutable)


def _keeps_immutable(old: StoredPolicy | None, new: StoredPolicy | None) -> bool:
    """Whether ``old`` is immutable; then ``new`` may only repeat it (``AKV.SKR.1020`` otherwise)."""
    if old is None or not old.immutable:
        return False
    if new is not None and (json.loads(old.data) != json.loads(new.data) or not new.immutable):
        raise bad(ERR_1020)
    return True


class KeyStore:
    """The stored keys of ``state_dir/keys``, with Azure's rules on creating and changing versions."""

    def __init__(self, state_dir: Path) -> None:
        self._keys_dir = state_dir / "keys"
        ensure_directory(self._keys_dir)
        os.chmod(self._keys_dir, 0o700)
        self._keys: dict[str, list[KeyVersion]] = self._load()
        self._lock = asyncio.Lock()

    def _load(self) -> dict[str, list[KeyVersion]]:
        keys: dict[str, list[KeyVersion]] = {}
        for path in sorted(self._keys_dir.glob("*.json")):
            try:
                doc = json.loads(read_regular_file(path))
                versions = [KeyVersion.from_json(v) for v in doc["versions"]]
            except (ValueError, KeyError, TypeError, ServiceError):
                raise ConfigError(
                    f"the stored key file {path} is damaged",
                    hint="restore it from a backup or delete it (the key is then lost)",
                ) from None
            if versions:
                keys[versions[0].name] = versions
        return keys

    def _save(self, name: str) -> None:
        doc = {"name": name, "versions": [v.to_json() for v in self._keys[name]]}
        write_private_file(self._keys_dir / f"{name.lower()}.json", json.dumps(doc, indent=1).encode())

    @property
    def key_names(self) -> tuple[str, ...]:
        """The names of the stored keys."""
        return tuple(sorted(self._keys))

    def latest(self, name: str) -> KeyVersion | None:
        """The latest version of ``name`` (case-insensitive), or None when there is no such key."""
        versions = self._find(name)
        return versions[-1] if versions else None

    def latest_policy(self, name: str) -> bytes | None:
        """The release policy JSON of the latest version of ``name``; None without key or policy."""
        key = self.latest(name)
        return key.release_policy.data if key is not None and key.release_policy is not None else None

    def _find(self, name: str) -> list[KeyVersion] | None:
        """Key names are case-insensitive in Key Vault."""
        versions = self._keys.get(name)
        if versions is not None:
            return versions
        lowered = name.lower()
        return next((v for k, v in self._keys.items() if k.lower() == lowered), None)

    def _version(self, name: str, version: str | None) -> KeyVersion:
        versions = self._find(name)
        if versions and version:
            found = next((v for v in versions if v.version == version.lower()), None)
        else:
            found = versions[-1] if versions else None
        if found is None:
            shown = (f"{name}/{version}" if version else name)[:200]
            raise ServiceError(
                404,
                "KeyNotFound",
                f"A key with (name/id) {shown} was not found in this key vault. If you recently deleted this "
                "key you may be able to recover it using the correct recovery command.",
            )
        return found

    # --- programmatic API (the stack's demo keys) --------------------------------------------------

    async def create_key(
        self,
        name: str,
        *,
        kty: str,
        size: int | None = None,
        curve: str | None = None,
        release_policy: bytes | None = None,
        immutable: bool = False,
        exportable: bool = True,
        key_ops: Sequence[str] | None = None,
    ) -> KeyVersion:
        """Create a new version of ``name`` exactly as ``POST /keys/{name}/create`` would.

        Raises :class:`KeyRejected` with Azure's code and message (e.g. ``AKV.SKR.1004``) on a rule violation.
        """
        with _rejections():
            kty = normalize_kty(kty)
            policy = None
            if release_policy is not None:
                policy = _checked_policy(release_policy, POLICY_CONTENT_TYPE, immutable)
            material = await asyncio.to_thread(generate_material, kty, size=size, curve=curve)
            ops = key_ops_of(list(key_ops) if key_ops else None, kty)
            return await self._add_version(
                name, kty=kty, material=material, key_ops=ops, exportable=exportable, policy=policy
            )

    async def import_key(
        self,
        name: str,
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | bytes,
        *,
        release_policy: bytes | None = None,
        immutable: bool = False,
        exportable: bool = True,
    ) -> KeyVersion:
        """Import key material as a new version of ``name`` (like ``PUT /keys/{name}``); :class:`KeyRejected`
        on a rule violation."""
        with _rejections():
            if isinstance(key, bytes):
                kty, material = "oct-HSM", import_material("oct-HSM", {"k": b64url_encode(key)})
            else:
                kty = "RSA-HSM" if isinstance(key, rsa.RSAPrivateKey) else "EC-HSM"
                material = import_material(kty, private_key_to_jwk(key))
            policy = StoredPolicy(release_policy, immutable=immutable) if release_policy is not None else None
            return await self._add_version(
                name,
                kty=kty,
                material=material,
                key_ops=DEFAULT_KEY_OPS[kty],
                exportable=exportable,
                policy=policy,
            )

    async def _add_version(
        self,
        name: str,
        *,
        kty: str,
        material: Mapping[str, Any],
        key_ops: tuple[str, ...],
        exportable: bool,
        policy: StoredPolicy | None,
        tags: Mapping[str, str] | None = None,
    ) -> KeyVersion:
        if not is_key_name(name):
            raise bad("The key name is invalid: 1-127 letters, digits and dashes.")
        async with self._lock:
            existing = self._find(name)
            latest = existing[-1] if existing else None
            if latest is not None:
                name = latest.name
                if latest.exportable != exportable:
                    raise bad(ERR_1003)
                if _keeps_immutable(latest.release_policy, policy) or (policy is None and exportable):
                    policy = latest.release_policy
            if exportable and policy is None:
                raise bad(ERR_1004)
            if not exportable and policy is not None:
                raise bad(ERR_1005)
            now = int(time.time())
            version = KeyVersion(
                name=name,
                version=secrets.token_hex(16),
                kty=kty,
                key_ops=key_ops,
                material=dict(material),
                created=now,
                updated=now,
                exportable=exportable,
                release_policy=policy,
                tags=dict(tags or {}),
            )
            self._keys.setdefault(name, []).append(version)
            await asyncio.to_thread(self._save, name)
            return version

    async def update_version(
        self,
        name: str,
        version: str | None,
        *,
        policy: StoredPolicy | None,
        exportable: object,
        enabled: object,
    ) -> KeyVersion:
        """Set a version's release policy and ``enabled`` (``PATCH``); ``exportable`` may only be repeated."""
        async with self._lock:
            key = self._version(name, version)
            if exportable is not None and bool(exportable) != key.exportable:
                raise bad(ERR_1003)
            if _keeps_immutable(key.release_policy, policy):
                policy = None
            if policy is not None and not key.exportable:
                raise bad(ERR_1005)
            updated = replace(
                key,
                release_policy=policy or key.release_policy,
                enabled=key.enabled if enabled is None else bool(enabled),
                updated=int(time.time()),
            )
            versions = self._keys[key.name]
            versions[versions.index(key)] = updated
            await asyncio.to_thread(self._save, key.name)
        return updated
