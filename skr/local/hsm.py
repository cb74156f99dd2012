"""The local key service of ``skr local``: a Managed-HSM-compatible subset of the Key Vault data plane.

Owns, on the wire exactly as Azure does it (docs/wire-formats.md §2, §5), so the unmodified
``azure-keyvault-keys`` SDK works against it:

* challenge auth — a request without a bearer token gets ``401`` with
  ``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
  resource="https://managedhsm.azure.net"`` before its body is read; a bearer must be a valid token of the
  local identity service for that resource;
* ``POST /keys/{name}/create``, ``PUT /keys/{name}`` (import), ``GET /keys/{name}[/{version}]``,
  ``PATCH /keys/{name}/{version}`` (release policy / enabled), and the release —
  ``POST /keys/{name}/{version}/release``, ``/keys/{name}//release``, ``/keys/{name}/release``;
* Azure's rules: exportable keys need a release policy (``AKV.SKR.1004``), non-exportable keys must not
  have one (``AKV.SKR.1005``), an immutable policy cannot change (``AKV.SKR.1020``);
* the release: the target token verified through its issuer's OpenID metadata over HTTPS (only issuers the
  key's policy names as authority are ever contacted), the policy evaluated with :mod:`skr.akv.policy`, the
  key wrapped to the first suitable ``x-ms-runtime.keys`` key, and ``{"value": JWS}`` signed with a
  certificate chain for this host.

Keys persist as JSON in ``state_dir/keys`` (directory 0700, files 0600). The service never logs key
material or tokens, and it never releases a key it could not verify a token for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from skr.akv.jwk import CURVES, jwk_to_private_key, private_key_to_jwk, private_key_to_plaintext
from skr.akv.jws import ALLOWED_ALGORITHMS, sign_release_jws
from skr.akv.keywrap import Enc, b64url_encode, encode_key_hsm, wrap
from skr.akv.policy import ReleasePolicy, evaluate, normalize_authority, parse_policy
from skr.errors import BadRequest, ConfigError, KeyWrapError, PolicyError, SkrError
from skr.files import ensure_directory, read_regular_file, write_private_file
from skr.local.identity import InvalidAccessToken
from skr.local.kit import Faults, Route, ServiceError, azure_error, local_app, mutations_of
from skr.maa.token import unverified_claims

MANAGED_HSM_RESOURCE = "https://managedhsm.azure.net"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
POLICY_CONTENT_TYPE = "application/json; charset=utf-8"
RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90
MAX_BODY = 256 * 1024

OCT_SIZES = (128, 192, 256)
RSA_SIZES = (2048, 3072, 4096)
KEY_TYPES = ("oct-HSM", "RSA-HSM", "EC-HSM")
KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export")
DEFAULT_KEY_OPS: Mapping[str, tuple[str, ...]] = {
    "oct-HSM": ("encrypt", "decrypt", "wrapKey", "unwrapKey"),
    "RSA-HSM": ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"),
    "EC-HSM": ("sign", "verify"),
}
_KTY_ALIASES: Mapping[str, str] = {
    "oct": "oct-HSM",
    "oct-hsm": "oct-HSM",
    "rsa": "RSA-HSM",
    "rsa-hsm": "RSA-HSM",
    "ec": "EC-HSM",
    "ec-hsm": "EC-HSM",
}
_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
_API_VERSION_RE = re.compile(r"^(7\.[3-9](-preview(\.\d+)?)?|20\d\d-\d\d-\d\d(-preview)?)$")

CANNOT_VERIFY = "Target environment attestation statement cannot be verified."
ERR_1004 = "AKV.SKR.1004: Exportable keys must have release policy."
ERR_1005 = "AKV.SKR.1005: Non-exportable keys must not have release policy."
ERR_1020 = "AKV.SKR.1020: Immutable Key Release Policy cannot be modified."
ERR_1003 = "AKV.SKR.1003: The exportable attribute of an existing key cannot be changed."


class AccessTokenVerifier(Protocol):
    """Checks bearer tokens (the local identity service)."""

    def verify_access_token(self, token: str, resource: str) -> dict[str, Any]:
        """The token's claims, or :class:`skr.local.identity.InvalidAccessToken`."""
        ...


class AttestationTokenVerifier(Protocol):
    """Verifies MAA tokens through their issuer's OpenID metadata (``skr.maa.token.TokenVerifier``)."""

    async def verify(self, token: str, *, issuer: str) -> dict[str, Any]:
        """The verified claims of ``token`` issued by ``issuer``."""
        ...


# --- the model ------------------------------------------------------------------------------------------


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

    def public_members(self) -> dict[str, Any]:
        """``n``/``e`` or ``crv``/``x``/``y`` (nothing for oct keys)."""
        members = ("n", "e") if self.kty == "RSA-HSM" else ("crv", "x", "y") if self.kty == "EC-HSM" else ()
        return {m: self.material[m] for m in members}

    def to_json(self) -> dict[str, Any]:
        """The persisted form (holds the private key: write only to 0600 files)."""
        return {
            "name": self.name,
            "version": self.version,
            "kty": self.kty,
            "key_ops": list(self.key_ops),
            "material": dict(self.material),
            "created": self.created,
            "updated": self.updated,
            "exportable": self.exportable,
            "enabled": self.enabled,
            "release_policy": None
            if self.release_policy is None
            else {
                "data": b64url_encode(self.release_policy.data),
                "contentType": self.release_policy.content_type,
                "immutable": self.release_policy.immutable,
            },
            "tags": dict(self.tags),
        }

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
                data=_b64url_decode(policy["data"]),
                content_type=policy.get("contentType", POLICY_CONTENT_TYPE),
                immutable=bool(policy.get("immutable", False)),
            ),
            tags=dict(doc.get("tags") or {}),
        )


class KeyRejected(BadRequest):
    """The programmatic API (:meth:`LocalKeyService.create_key` / ``import_key``) refused a key the way the
    HTTP API answers 400 — the message carries Azure's code and text."""

    default_code = "local_key_rejected"


@contextmanager
def _rejections() -> Iterator[None]:
    try:
        yield
    except ServiceError as exc:
        raise KeyRejected(f"{exc.code}: {exc.message}") from None


def _bad(message: str) -> ServiceError:
    return ServiceError(400, "BadParameter", message)


def _denied(message: str) -> ServiceError:
    return ServiceError(403, "Forbidden", message, "AccessDenied")


def _b64url_decode(value: str) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", value):
        raise _bad("a value is not base64url")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise _bad("a value is not base64url") from None


def _ci(doc: Mapping[str, Any], name: str) -> Any:
    """A member looked up case-insensitively (Key Vault matches JSON property names that way)."""
    if name in doc:
        return doc[name]
    lowered = name.lower()
    for key, value in doc.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None


# --- key generation and import ------------------------------------------------------------------------


def _normalize_kty(value: object) -> str:
    """The stored key type; a Managed HSM keeps every key in the HSM, so ``RSA`` means ``RSA-HSM``."""
    kty = _KTY_ALIASES.get(str(value).lower()) if isinstance(value, str) else None
    if kty is None:
        raise _bad(f"The key type '{str(value)[:32]}' is not supported. Supported: {', '.join(KEY_TYPES)}.")
    return kty


def generate_material(kty: str, *, size: int | None, curve: str | None) -> dict[str, Any]:
    """A fresh private key as a JWK (CPU-heavy for RSA: run in a thread)."""
    if kty == "oct-HSM":
        bits = size or 256
        if bits not in OCT_SIZES:
            raise _bad(f"The key size {bits} is not supported for oct-HSM keys. Supported: 128, 192, 256.")
        return {"kty": "oct", "k": b64url_encode(secrets.token_bytes(bits // 8))}
    if kty == "RSA-HSM":
        bits = size or 2048
        if bits not in RSA_SIZES:
            raise _bad(f"The key size {bits} is not supported for RSA-HSM keys. Supported: 2048, 3072, 4096.")
        return private_key_to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=bits))
    crv = curve or "P-256"
    if crv not in CURVES:
        raise _bad(f"The curve '{crv[:16]}' is not supported. Supported: {', '.join(CURVES)}.")
    return private_key_to_jwk(ec.generate_private_key(CURVES[crv]()))


def import_material(kty: str, jwk: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an imported private JWK and return it in stored form."""
    if kty == "oct-HSM":
        raw = jwk.get("k")
        if not isinstance(raw, str):
            raise _bad("The imported oct key has no 'k'.")
        key_bytes = _b64url_decode(raw)
        if len(key_bytes) * 8 not in OCT_SIZES:
            raise _bad(f"The imported oct key is {len(key_bytes) * 8} bits; supported: 128, 192, 256.")
        return {"kty": "oct", "k": b64url_encode(key_bytes)}
    try:
        key = jwk_to_private_key({**jwk, "kty": "RSA" if kty == "RSA-HSM" else "EC"})
    except KeyWrapError as exc:
        raise _bad(f"The imported key is not a valid private key: {exc.message}") from None
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size not in RSA_SIZES:
        raise _bad(f"The imported RSA key is {key.key_size} bits; supported: 2048, 3072, 4096.")
    try:
        return private_key_to_jwk(key)
    except KeyWrapError as exc:
        raise _bad(f"The imported key is not supported: {exc.message}") from None


def _key_ops(value: object, kty: str) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_KEY_OPS[kty]
    if not isinstance(value, list) or not all(isinstance(op, str) and op in KEY_OPS for op in value):
        raise _bad(f"key_ops must be a list of: {', '.join(KEY_OPS)}.")
    return tuple(dict.fromkeys(value))


def _parse_stored_policy(value: object) -> StoredPolicy | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _bad("release_policy must be an object.")
    data = _ci(value, "data")
    if data is None:
        raise _bad("Key Release Policy: missing 'data'.")
    raw = _b64url_decode(data)
    try:
        parse_policy(raw)
    except PolicyError as exc:
        raise _bad(f"Key Release Policy: {exc.message}") from None
    content_type = _ci(value, "contentType") or POLICY_CONTENT_TYPE
    immutable = _ci(value, "immutable")
    return StoredPolicy(data=raw, content_type=str(content_type), immutable=bool(immutable))


def _policy_changed(old: StoredPolicy, new: StoredPolicy | None) -> bool:
    if new is None:
        return False
    same = json.loads(old.data) == json.loads(new.data) and old.immutable == new.immutable
    return not same


# --- the wrapping key in the token ---------------------------------------------------------------------


def select_wrapping_key(claims: Mapping[str, Any]) -> tuple[str, rsa.RSAPublicKey]:
    """``(kid, public key)`` of the first ``x-ms-runtime.keys`` RSA JWK with ``key_ops`` ∋ ``encrypt`` or
    ``use`` = ``enc``. :class:`ServiceError` 400 when there is none."""
    runtime = claims.get("x-ms-runtime")
    keys = runtime.get("keys") if isinstance(runtime, Mapping) else None
    for jwk in keys if isinstance(keys, list) else []:
        if not isinstance(jwk, Mapping):
            continue
        ops = jwk.get("key_ops")
        suitable = (isinstance(ops, list) and "encrypt" in ops) or jwk.get("use") == "enc"
        if not suitable:
            continue
        if jwk.get("kty") != "RSA":
            raise _bad(
                f"The wrapping key in x-ms-runtime.keys has kty {str(jwk.get('kty'))[:16]!r}; "
                "RSA is required."
            )
        try:
            n = int.from_bytes(_b64url_decode(jwk["n"]), "big")
            e = int.from_bytes(_b64url_decode(jwk["e"]), "big")
            public = rsa.RSAPublicNumbers(e, n).public_key()
        except (KeyError, ValueError, ServiceError):
            raise _bad("The wrapping key in x-ms-runtime.keys is not a valid RSA public key.") from None
        if public.key_size not in RSA_SIZES:
            raise _bad(f"The wrapping key is RSA-{public.key_size}; supported: 2048, 3072, 4096.")
        return str(jwk.get("kid", "")), public
    raise _bad(
        "Target environment attestation statement does not contain a suitable wrapping key "
        "(x-ms-runtime.keys needs an RSA key with key_ops 'encrypt' or use 'enc')."
    )


def _policy_authorities(policy: ReleasePolicy) -> set[str]:
    return {normalize_authority(a) for a in policy.authorities}


# --- the service ---------------------------------------------------------------------------------------


class LocalKeyService:
    """A Managed-HSM-compatible key service (aiohttp app in :attr:`app`).

    ``host`` is the name clients use (``host`` or ``host:port``; key ids are ``https://<host>/keys/...``,
    taking the port from the request when the host name matches); ``signing_key``/``chain`` sign release
    JWS (``chain[0]`` must be a certificate for ``host``); ``identity`` checks bearer tokens;
    ``token_verifier`` verifies target tokens through their issuer's OpenID metadata.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str,
        tenant_id: str,
        identity: AccessTokenVerifier,
        signing_key: rsa.RSAPrivateKey,
        chain: Sequence[x509.Certificate],
        token_verifier: AttestationTokenVerifier,
        resource: str = MANAGED_HSM_RESOURCE,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        faults: Faults | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.host = host.strip().lower()
        self.tenant_id = tenant_id
        self.resource = resource.rstrip("/")
        self._authority = f"{authority_host.rstrip('/')}/{tenant_id}"
        self._identity = identity
        self._signing_key = signing_key
        self._chain = list(chain)
        self._verifier = token_verifier
        self._keys_dir = state_dir / "keys"
        ensure_directory(self._keys_dir)
        os.chmod(self._keys_dir, 0o700)
        self._keys: dict[str, list[KeyVersion]] = self._load()
        self._lock = asyncio.Lock()
        self.challenged: deque[tuple[str, str]] = deque(maxlen=256)
        """(method, path) of the latest requests answered with the 401 challenge (diagnostics, tests)."""
        self.app = local_app(self._routes(), faults=faults, client_max_size=max_body)

    # --- persistence --------------------------------------------------------------------------------

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
            kty = _normalize_kty(kty)
            policy = StoredPolicy(release_policy, immutable=immutable) if release_policy is not None else None
            if policy is not None:
                try:
                    parse_policy(policy.data)
                except PolicyError as exc:
                    raise _bad(f"Key Release Policy: {exc.message}") from None
            material = await asyncio.to_thread(generate_material, kty, size=size, curve=curve)
            ops = _key_ops(list(key_ops) if key_ops else None, kty)
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
        if not _NAME_RE.match(name):
            raise _bad("The key name is invalid: 1-127 letters, digits and dashes.")
        async with self._lock:
            existing = self._find(name)
            latest = existing[-1] if existing else None
            if latest is not None:
                name = latest.name
                if latest.exportable != exportable:
                    raise _bad(ERR_1003)
                if latest.release_policy is not None and latest.release_policy.immutable:
                    if _policy_changed(latest.release_policy, policy):
                        raise _bad(ERR_1020)
                    policy = latest.release_policy
                elif policy is None and exportable:
                    policy = latest.release_policy
            if exportable and policy is None:
                raise _bad(ERR_1004)
            if not exportable and policy is not None:
                raise _bad(ERR_1005)
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

    # --- HTTP plumbing ------------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        version = "{version:[^{}/]*}"
        return [
            ("POST", "/keys/{name}/create", "create", self._wrap(self._create)),
            ("POST", f"/keys/{{name}}/{version}/release", "release", self._wrap(self._release)),
            ("POST", "/keys/{name}/release", "release", self._wrap(self._release)),
            ("PUT", "/keys/{name}", "import", self._wrap(self._import)),
            ("GET", "/keys/{name}", "get", self._wrap(self._get)),
            ("GET", f"/keys/{{name}}/{version}", "get", self._wrap(self._get)),
            ("PATCH", f"/keys/{{name}}/{version}", "update", self._wrap(self._update)),
        ]

    def _challenge(self, request: web.Request, message: str) -> web.Response:
        self.challenged.append((request.method, request.path))
        header = f'Bearer authorization="{self._authority}", resource="{self.resource}"'
        return azure_error(401, "Unauthorized", message, headers={"WWW-Authenticate": header})

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """None when the bearer is valid; else the 401 challenge (sent before the body is read)."""
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._challenge(request, "AKV10000: Request is missing a Bearer or PoP token.")
        try:
            self._identity.verify_access_token(token.strip(), self.resource)
        except InvalidAccessToken as exc:
            return self._challenge(request, f"AKV10032: Invalid bearer token: {exc.message}")
        return None

    def _wrap(self, handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            challenge = self._authenticate(request)
            if challenge is not None:
                return challenge
            api_version = request.query.get("api-version", "")
            if not api_version:
                raise _bad("The 'api-version' query parameter is missing.")
            if not _API_VERSION_RE.match(api_version):
                raise _bad(f"The specified api-version '{api_version[:32]}' is not supported.")
            response: web.StreamResponse = await handler(request, api_version)
            return response

        return wrapped

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ServiceError(413, "RequestTooLarge", "The request body is too large.") from None
        try:
            doc = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise _bad("The request body is not valid JSON.") from None
        if not isinstance(doc, dict):
            raise _bad("The request body must be a JSON object.")
        return doc

    def _base_url(self, request: web.Request | None) -> str:
        configured = self.host.split(":")[0] if not self.host.startswith("[") else self.host
        if request is not None and request.host:
            seen = request.host.lower()
            if seen.split(":")[0] == configured:
                return f"https://{seen}"
        return f"https://{self.host}"

    def _bundle(self, key: KeyVersion, request: web.Request | None) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            "kid": f"{self._base_url(request)}/keys/{key.name}/{key.version}",
            "kty": key.kty,
            "key_ops": list(key.key_ops),
            **key.public_members(),
        }
        bundle: dict[str, Any] = {"key": jwk, "attributes": self._attributes(key), "tags": dict(key.tags)}
        if key.release_policy is not None:
            bundle["release_policy"] = key.release_policy.to_wire()
        return bundle

    @staticmethod
    def _attributes(key: KeyVersion) -> dict[str, Any]:
        return {
            "enabled": key.enabled,
            "created": key.created,
            "updated": key.updated,
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": RECOVERABLE_DAYS,
            "exportable": key.exportable,
        }

    # --- handlers -----------------------------------------------------------------------------------

    @staticmethod
    def _attributes_in(body: Mapping[str, Any]) -> Mapping[str, Any]:
        attributes = _ci(body, "attributes") or {}
        if not isinstance(attributes, Mapping):
            raise _bad("attributes must be an object.")
        return attributes

    async def _create(self, request: web.Request, api_version: str) -> web.StreamResponse:
        body = await self._json_body(request)
        kty = _normalize_kty(_ci(body, "kty"))
        size, curve = _ci(body, "key_size"), _ci(body, "crv")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise _bad("key_size must be an integer.")
        if curve is not None and not isinstance(curve, str):
            raise _bad("crv must be a string.")
        attributes = self._attributes_in(body)
        policy = _parse_stored_policy(_ci(body, "release_policy"))
        key_ops = _key_ops(_ci(body, "key_ops"), kty)
        material = await asyncio.to_thread(generate_material, kty, size=size, curve=curve)
        key = await self._add_version(
            request.match_info["name"],
            kty=kty,
            material=material,
            key_ops=key_ops,
            exportable=bool(_ci(attributes, "exportable")),
            policy=policy,
            tags=_tags(body),
        )
        return web.json_response(self._bundle(key, request))

    async def _import(self, request: web.Request, api_version: str) -> web.StreamResponse:
        body = await self._json_body(request)
        jwk = _ci(body, "key")
        if not isinstance(jwk, Mapping):
            raise _bad("The request has no 'key' JSON web key.")
        kty = _normalize_kty(jwk.get("kty"))
        material = import_material(kty, jwk)
        attributes = self._attributes_in(body)
        key = await self._add_version(
            request.match_info["name"],
            kty=kty,
            material=material,
            key_ops=_key_ops(jwk.get("key_ops"), kty),
            exportable=bool(_ci(attributes, "exportable")),
            policy=_parse_stored_policy(_ci(body, "release_policy")),
            tags=_tags(body),
        )
        return web.json_response(self._bundle(key, request))

    async def _get(self, request: web.Request, api_version: str) -> web.StreamResponse:
        key = self._version(request.match_info["name"], request.match_info.get("version") or None)
        return web.json_response(self._bundle(key, request))

    async def _update(self, request: web.Request, api_version: str) -> web.StreamResponse:
        body = await self._json_body(request)
        name, version = request.match_info["name"], request.match_info.get("version") or None
        async with self._lock:
            key = self._version(name, version)
            policy = _parse_stored_policy(_ci(body, "release_policy"))
            attributes = self._attributes_in(body)
            exportable = _ci(attributes, "exportable")
            if exportable is not None and bool(exportable) != key.exportable:
                raise _bad(ERR_1003)
            if key.release_policy is not None and key.release_policy.immutable:
                if _policy_changed(key.release_policy, policy):
                    raise _bad(ERR_1020)
                policy = None
            if policy is not None and not key.exportable:
                raise _bad(ERR_1005)
            enabled = _ci(attributes, "enabled")
            updated = replace(
                key,
                release_policy=policy or key.release_policy,
                enabled=key.enabled if enabled is None else bool(enabled),
                updated=int(time.time()),
            )
            versions = self._keys[key.name]
            versions[versions.index(key)] = updated
            await asyncio.to_thread(self._save, key.name)
        return web.json_response(self._bundle(updated, request))

    # --- release ------------------------------------------------------------------------------------

    async def _release(self, request: web.Request, api_version: str) -> web.StreamResponse:
        body = await self._json_body(request)
        name, version = request.match_info["name"], request.match_info.get("version") or None
        target = _ci(body, "target")
        if not isinstance(target, str) or not target.strip():
            raise _bad("The 'target' attestation token is missing.")
        enc = self._enc(_ci(body, "enc"))
        key = self._version(name, version)
        if not key.enabled:
            raise _denied(f"Operation release is not allowed on a disabled key {key.name}.")
        if not key.exportable or key.release_policy is None:
            raise _bad(f"The key {key.name} is not exportable.")
        claims = await self.check_target(target.strip(), key.release_policy)
        kid, wrapping_key = select_wrapping_key(claims)
        payload = self._release_payload(
            request,
            key,
            api_version=api_version,
            enc=enc,
            wrapping_kid=kid,
            wrapping_key=wrapping_key,
            requested_version=version,
        )
        jws = self._sign(payload, mutations_of(request))
        return web.json_response({"value": jws})

    def _sign(self, payload: Mapping[str, Any], mutations: frozenset[str]) -> str:
        """The release JWS; a fault plan can corrupt it: ``truncate_jws``, ``resign_jws`` (signature by
        another key), ``expired_cert`` (an expired, self-issued signer certificate)."""
        chain = self._chain
        if "expired_cert" in mutations:
            chain = [_expired_copy(self._signing_key, chain[0]), *chain[1:]]
        jws = sign_release_jws(payload, self._signing_key, chain)
        if "resign_jws" in mutations:
            signing_input = jws.rsplit(".", 1)[0]
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            signature = ALLOWED_ALGORITHMS["RS256"].sign(signing_input.encode("ascii"), other)
            jws = f"{signing_input}.{b64url_encode(signature)}"
        return jws[: len(jws) // 2] if "truncate_jws" in mutations else jws

    @staticmethod
    def _enc(value: object) -> Enc:
        if value is None:
            return Enc.CKM_RSA_AES_KEY_WRAP
        try:
            return Enc(str(value).upper())
        except ValueError:
            raise _bad(
                f"The enc '{str(value)[:32]}' is not supported. Supported: {', '.join(e.value for e in Enc)}."
            ) from None

    async def check_target(self, token: str, stored: StoredPolicy) -> Mapping[str, Any]:
        """Verify the target token (only against issuers the policy names) and evaluate the policy.

        Returns the verified claims; raises :class:`ServiceError` 403 with the reason otherwise.
        """
        policy = parse_policy(stored.data)
        try:
            issuer = unverified_claims(token).get("iss")
        except SkrError:
            raise _denied(CANNOT_VERIFY) from None
        if not isinstance(issuer, str) or normalize_authority(issuer) not in _policy_authorities(policy):
            decision = evaluate(policy, {"iss": issuer})
            raise _denied(f"{CANNOT_VERIFY} {decision.reason}")
        try:
            claims = await self._verifier.verify(token, issuer=issuer)
        except SkrError as exc:
            raise _denied(f"{CANNOT_VERIFY} {exc.message}") from None
        decision = evaluate(policy, claims)
        if not decision.allowed:
            raise _denied(
                f"Target environment attestation statement does not satisfy the key release policy: "
                f"{decision.reason.removeprefix('release policy not satisfied: ')}"
            )
        return claims

    def _release_payload(
        self,
        request: web.Request,
        key: KeyVersion,
        *,
        api_version: str,
        enc: Enc,
        wrapping_kid: str,
        wrapping_key: rsa.RSAPublicKey,
        requested_version: str | None,
    ) -> dict[str, Any]:
        base = self._base_url(request)
        requested = f"{base}/keys/{key.name}" + (f"/{requested_version}" if requested_version else "")
        plaintext = private_key_to_plaintext(
            _b64url_decode(key.material["k"]) if key.kty == "oct-HSM" else dict(key.material)
        )
        key_hsm = encode_key_hsm(wrapping_kid, enc, wrap(plaintext, wrapping_key, enc))
        released = {
            "kid": f"{base}/keys/{key.name}/{key.version}",
            "kty": key.kty,
            "key_ops": list(key.key_ops),
            **key.public_members(),
            "key_hsm": key_hsm,
        }
        assert key.release_policy is not None
        return {
            "request": {"api-version": api_version, "enc": enc.value, "kid": requested},
            "response": {
                "key": {
                    "key": released,
                    "attributes": self._attributes(key),
                    "release_policy": {
                        "contentType": key.release_policy.content_type,
                        "data": b64url_encode(key.release_policy.data),
                    },
                }
            },
        }

    def __repr__(self) -> str:
        return f"LocalKeyService(host={self.host!r}, keys={len(self._keys)})"


def _expired_copy(key: rsa.RSAPrivateKey, like: x509.Certificate) -> x509.Certificate:
    """An expired certificate with ``like``'s names for ``key``, signed by ``key`` (fault injection)."""
    now = datetime.now(UTC)
    start, end = now - timedelta(days=30), now - timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(like.subject)
        .issuer_name(like.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    try:
        san = like.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(san.value, critical=san.critical)
    except x509.ExtensionNotFound:
        pass
    return builder.sign(key, hashes.SHA256())


def _tags(body: Mapping[str, Any]) -> dict[str, str]:
    tags = _ci(body, "tags") or {}
    if not isinstance(tags, Mapping) or not all(isinstance(v, str) for v in tags.values()):
        raise _bad("tags must be an object of strings.")
    return {str(k): v for k, v in tags.items()}
