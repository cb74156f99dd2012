"""``skr keys``: create, import, show an exportable key with a release policy in Key Vault / Managed HSM,
and replace that policy.

``create`` generates the key in the HSM; ``import`` uploads local key material (a PEM private key, or for
``oct`` raw key bytes or a JWK JSON file). Both go through ``azure.keyvault.keys.aio.KeyClient`` with the
sidecar's credentials, print the new key id, and refuse a name that already exists unless ``--new-version``
is given: a new version is new key material, and data encrypted under the old version still needs the old
one. ``show`` prints a key's attributes and its release policy decoded; ``update-policy`` replaces the
release policy of a version in place (``PATCH /keys/{name}/{version}``: no new key material).

Never prints key material or tokens; errors are one line naming what the vault said.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.keys import JsonWebKey, KeyReleasePolicy, KeyVaultKey
from azure.keyvault.keys.aio import KeyClient
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from skr.akv.jwk import CURVES, jwk_to_private_key, private_key_to_jwk
from skr.akv.keywrap import b64url_decode
from skr.akv.policy import encode_policy_for_wire
from skr.akv.release import vault_error
from skr.commands import credential_factory, read_access_token, vault_client_arguments
from skr.endpoints import parse_endpoint
from skr.errors import (
    BadRequest,
    Code,
    Forbidden,
    IdentityError,
    KeyWrapError,
    NotFound,
    PolicyError,
    SkrError,
    UpstreamError,
)

KTY_CHOICES = ("oct-HSM", "RSA-HSM", "EC-HSM")
OCT_SIZES = (128, 192, 256)
RSA_SIZES = (2048, 3072, 4096)
_SUPPORTED_CURVES = {curve().name for curve in CURVES.values()}
_TIMEOUTS = {"connection_timeout": 10, "read_timeout": 60}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "keys",
        help="create, import or show exportable keys with a release policy, or replace that policy",
        description="Create or import exportable HSM keys with a key release policy (azure-keyvault-keys).",
    )
    actions = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    create = actions.add_parser("create", help="generate an exportable key in the vault; prints its id")
    _common(create)
    create.add_argument("--kty", required=True, choices=KTY_CHOICES, help="key type")
    create.add_argument("--size", type=int, help="oct-HSM: 128/192/256 (256); RSA-HSM: 2048/3072/4096 (2048)")
    create.add_argument("--curve", choices=tuple(CURVES), help="EC-HSM curve (P-256)")
    _new_version(create)
    create.set_defaults(func=_create)

    imp = actions.add_parser("import", help="import local key material as an exportable key; prints its id")
    _common(imp)
    imp.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="FILE",
        help="PEM private key (RSA/EC), or raw bytes / JWK for oct",
    )
    imp.add_argument(
        "--key-format",
        choices=KEY_FORMATS,
        default="auto",
        help="how to read --key (default auto: PEM or JWK when the file is text, else raw bytes)",
    )
    _new_version(imp)
    imp.set_defaults(func=_import)

    show = actions.add_parser("show", help="print a key's attributes and its release policy, decoded")
    _vault_arguments(show)
    show.add_argument("--version", help="the key version (default: the current one)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=_show)

    update = actions.add_parser(
        "update-policy", help="replace the release policy of a key version, keeping its key material"
    )
    _vault_arguments(update)
    update.add_argument("--policy", required=True, type=Path, metavar="FILE", help="release policy JSON")
    update.add_argument("--immutable", action="store_true", help="make the release policy immutable")
    update.add_argument("--version", help="the key version to change (default: the current one)")
    update.set_defaults(func=_update_policy)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, type=Path, metavar="FILE", help="release policy JSON")
    parser.add_argument("--immutable", action="store_true", help="make the release policy immutable")
    _vault_arguments(parser)


def _new_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--new-version",
        action="store_true",
        help="add a new version when the name exists (data encrypted under an old version needs that one)",
    )


def _vault_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vault", required=True, help="vault or managed HSM: host, host:port or https URL")
    parser.add_argument("--name", required=True, help="key name")
    parser.add_argument("--api-version", help="Key Vault API version (default: the SDK's)")
    vault_client_arguments(parser)


# --- inputs ---------------------------------------------------------------------------------------


def read_policy(path: Path) -> bytes:
    """The release policy file as compact JSON bytes, after checking it against the grammar."""
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise PolicyError(f"{path} is not JSON", hint="write the policy with `skr policy release`") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"{path} holds a JSON {type(doc).__name__}; expected a release policy object")
    return encode_policy_for_wire(doc)


def private_key_to_json_web_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | bytes) -> JsonWebKey:
    """The SDK's ``JsonWebKey`` (``*-HSM`` kty) of a private key or raw symmetric key bytes."""
    if isinstance(key, bytes):
        if len(key) * 8 not in OCT_SIZES:
            raise BadRequest(f"an oct key of {len(key)} bytes; expected 16, 24 or 32 (AES-128/192/256)")
        return JsonWebKey(kty="oct-HSM", k=key)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size not in RSA_SIZES:
        raise BadRequest(f"an RSA-{key.key_size} key; expected 2048, 3072 or 4096 bits")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _SUPPORTED_CURVES:
        raise BadRequest(f"EC curve {key.curve.name} is not supported; expected {', '.join(CURVES)}")
    jwk = private_key_to_jwk(key)  # the JOSE members as base64url; the SDK takes their bytes
    members = {
        name: b64url_decode(value, what=name) for name, value in jwk.items() if name not in ("kty", "crv")
    }
    return JsonWebKey(kty=f"{jwk['kty']}-HSM", crv=jwk.get("crv"), **members)


KEY_FORMATS = ("auto", "pem", "jwk", "raw")


def read_key(path: Path, key_format: str = "auto") -> JsonWebKey:
    """Key material from a file: PEM private key (RSA/EC), a JWK JSON object, or raw oct key bytes.

    ``auto`` decides by content: PEM and JWK files are text, so a file that is not UTF-8 text is raw
    key bytes — even when a random AES key happens to begin with ``{`` or whitespace. ``raw``, ``pem``
    and ``jwk`` remove any doubt.
    """
    data = path.read_bytes()
    if key_format == "auto":
        key_format = _sniff_key_format(data)
    if key_format == "raw":
        return private_key_to_json_web_key(data)
    stripped = data.strip()
    if key_format == "jwk":
        return _jwk_file(path, stripped)
    if key_format != "pem":
        raise BadRequest(f"unknown key format {key_format!r}; expected one of {', '.join(KEY_FORMATS)}")
    try:
        key = serialization.load_pem_private_key(stripped, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadRequest(
            f"{path} is not an unencrypted PEM private key",
            hint="export it with `openssl pkcs8 -nocrypt`",
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise BadRequest(f"{path} holds a {type(key).__name__.lstrip('_')}; expected an RSA or EC key")
    return private_key_to_json_web_key(key)


def _sniff_key_format(data: bytes) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "raw"
    if text.startswith("-----BEGIN"):
        return "pem"
    if text.startswith("{"):
        return "jwk"
    return "raw"


def _jwk_file(path: Path, data: bytes) -> JsonWebKey:
    try:
        jwk = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"{path} looks like JSON but does not parse") from None
    if not isinstance(jwk, dict):
        raise BadRequest(f"{path} is not a JWK object")
    try:
        if str(jwk.get("kty", "")).lower().startswith("oct"):
            k = jwk.get("k")
            if not isinstance(k, str):
                raise BadRequest(f"{path}: the oct JWK has no 'k'")
            return private_key_to_json_web_key(b64url_decode(k, what="JWK member 'k'"))
        return private_key_to_json_web_key(jwk_to_private_key(jwk))
    except KeyWrapError as exc:
        raise BadRequest(f"{path}: {exc.message}") from None


# --- the vault call -------------------------------------------------------------------------------


def _map_error(exc: Exception, vault: str, name: str) -> SkrError:
    if isinstance(exc, ClientAuthenticationError) and exc.response is None:
        first = (exc.message or "").strip().splitlines()
        return IdentityError(
            f"no access token for {vault}: {first[0] if first else 'no details'}",
            hint="check the managed/workload identity, or pass --access-token-file",
        )
    if isinstance(exc, HttpResponseError) and exc.status_code:
        detail = vault_error(exc).describe()
        status = int(exc.status_code)
        if status == 400:
            return BadRequest(f"{vault} refused key {name}: {detail}")
        if status in (401, 403):
            return Forbidden(
                f"{vault} refused key {name}: {detail}",
                hint="the identity needs the 'Key Vault Crypto Officer' (vault) or "
                "'Managed HSM Crypto User' (HSM) role",
            )
        if status == 404:
            return NotFound(f"{vault} answered 404 for key {name}: {detail}", hint="check --vault")
        return UpstreamError(f"{vault} failed for key {name}: {detail}")
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        first = str(exc).strip().splitlines()
        return UpstreamError(
            f"{vault} could not be reached: {first[0] if first else type(exc).__name__}",
            hint="check the vault name, the network, and --ca-bundle for private CAs",
        )
    return UpstreamError(f"{vault}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


async def _with_client(
    args: argparse.Namespace, call: Callable[[KeyClient], Awaitable[KeyVaultKey]]
) -> KeyVaultKey:
    endpoint = parse_endpoint(args.vault, what="the vault endpoint")
    vault = endpoint.url
    factory = credential_factory(args)
    token = read_access_token(args.access_token_file)
    credential = factory.for_request(token)
    kwargs: dict[str, Any] = factory.transport_kwargs(**_TIMEOUTS)
    if args.api_version:
        kwargs["api_version"] = args.api_version
    relax = args.allow_insecure_challenge and not endpoint.is_azure()
    try:
        async with KeyClient(vault, credential, verify_challenge_resource=not relax, **kwargs) as client:
            return await call(client)
    except (HttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
        raise _map_error(exc, vault, args.name) from None
    except ValueError as exc:  # the SDK's challenge-resource check
        raise UpstreamError(
            f"{vault}: {str(exc).splitlines()[0]}",
            hint="for a local emulator pass --allow-insecure-challenge",
        ) from None
    finally:
        if token is not None:
            await credential.close()
        await factory.aclose()


def _release_policy(args: argparse.Namespace) -> KeyReleasePolicy:
    return KeyReleasePolicy(read_policy(args.policy), immutable=True if args.immutable else None)


def _create(args: argparse.Namespace) -> int:
    policy = _release_policy(args)
    kty: str = args.kty
    if kty == "EC-HSM" and args.size is not None:
        raise BadRequest("--size applies to oct-HSM and RSA-HSM keys; use --curve for EC-HSM")
    if kty != "EC-HSM" and args.curve is not None:
        raise BadRequest("--curve applies to EC-HSM keys only")
    sizes = {"oct-HSM": OCT_SIZES, "RSA-HSM": RSA_SIZES}.get(kty)
    if sizes is not None and args.size is not None and args.size not in sizes:
        raise BadRequest(
            f"--size {args.size} is not valid for {kty}; expected one of {', '.join(map(str, sizes))}"
        )

    async def call(client: KeyClient) -> KeyVaultKey:
        await _refuse_existing(client, args)
        common: dict[str, Any] = {"hardware_protected": True, "exportable": True, "release_policy": policy}
        if kty == "oct-HSM":
            return await client.create_oct_key(args.name, size=args.size or 256, **common)
        if kty == "RSA-HSM":
            return await client.create_rsa_key(args.name, size=args.size or 2048, **common)
        return await client.create_ec_key(args.name, curve=args.curve or "P-256", **common)

    key = asyncio.run(_with_client(args, call))
    sys.stdout.write(f"{key.id}\n")
    return 0


def _import(args: argparse.Namespace) -> int:
    policy = _release_policy(args)
    jwk = read_key(args.key, args.key_format)

    async def call(client: KeyClient) -> KeyVaultKey:
        await _refuse_existing(client, args)
        return await client.import_key(
            args.name, jwk, hardware_protected=True, exportable=True, release_policy=policy
        )

    key = asyncio.run(_with_client(args, call))
    sys.stdout.write(f"{key.id}\n")
    return 0


async def _refuse_existing(client: KeyClient, args: argparse.Namespace) -> None:
    """Refuse to add a version to an existing key unless ``--new-version`` says so."""
    if args.new_version:
        return
    try:
        current = await client.get_key(args.name)
    except ResourceNotFoundError:
        return
    vault = parse_endpoint(args.vault, what="the vault endpoint").url
    raise BadRequest(
        f"key {args.name} already exists in {vault} (current version "
        f"{current.properties.version}); a new version is new key material, and data encrypted under "
        "the old version can only be decrypted with the old version",
        hint="pass --new-version to add one anyway, or use `skr keys update-policy` to change only the "
        "release policy",
        code=Code.KEY_EXISTS,
    )


# --- show / update-policy -----------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _text(value: Any) -> str | None:
    """An SDK enum member (``JsonWebKeyType.RSA_HSM``) or string as its wire value (``RSA-HSM``)."""
    return None if value is None else str(getattr(value, "value", value))


def describe_key(key: KeyVaultKey) -> dict[str, Any]:
    """A key's public description: id, type, operations, attributes, tags and its release policy
    decoded (never key material: the public members of an RSA/EC key are left out too)."""
    props = key.properties
    policy: dict[str, Any] | None = None
    if props.release_policy is not None:
        raw = props.release_policy.encoded_policy
        try:
            decoded: Any = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            decoded = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        policy = {
            "immutable": bool(props.release_policy.immutable),
            "content_type": props.release_policy.content_type,
            "policy": decoded,
        }
    return {
        "id": key.id,
        "name": key.name,
        "version": props.version,
        "kty": _text(key.key_type),
        "key_ops": [_text(op) for op in key.key_operations or []],
        "attributes": {
            "enabled": props.enabled,
            "exportable": props.exportable,
            "created": _iso(props.created_on),
            "updated": _iso(props.updated_on),
            "not_before": _iso(props.not_before),
            "expires": _iso(props.expires_on),
            "recovery_level": props.recovery_level,
        },
        "tags": dict(props.tags or {}),
        "release_policy": policy,
    }


def _print_key(description: dict[str, Any]) -> None:
    for name in ("id", "kty"):
        print(f"{name:16} {description[name]}")
    print(f"{'key_ops':16} {', '.join(op for op in description['key_ops'] if op)}")
    for name, value in description["attributes"].items():
        if value is not None:
            print(f"{name:16} {json.dumps(value) if isinstance(value, bool) else value}")
    if description["tags"]:
        print(f"{'tags':16} " + ", ".join(f"{k}={v}" for k, v in description["tags"].items()))
    policy = description["release_policy"]
    if policy is None:
        print("release policy   none")
        return
    print(f"release policy   {'immutable' if policy['immutable'] else 'mutable'}, {policy['content_type']}")
    print(json.dumps(policy["policy"], indent=2, ensure_ascii=False))


def _show(args: argparse.Namespace) -> int:
    key = asyncio.run(_with_client(args, lambda client: client.get_key(args.name, version=args.version)))
    description = describe_key(key)
    if args.json:
        print(json.dumps(description, indent=2, ensure_ascii=False))
    else:
        _print_key(description)
    return 0


def _update_policy(args: argparse.Namespace) -> int:
    policy = _release_policy(args)

    async def call(client: KeyClient) -> KeyVaultKey:
        return await client.update_key_properties(args.name, args.version, release_policy=policy)

    key = asyncio.run(_with_client(args, call))
    sys.stdout.write(f"{key.id}\n")
    print(f"release policy of {key.name} version {key.properties.version} replaced", file=sys.stderr)
    return 0
