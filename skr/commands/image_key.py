"""``skr image-key create``: the image owner's key for encrypted images and ``skr wrap``, in one step.

Creates an exportable ``RSA-HSM`` key (3072 bits by default, as the Go sidecar's example) in a Managed HSM /
Key Vault with a release policy bound to the group's HOST_DATA (``--host-data HEX``, or ``--cce-policy FILE``
hashed as ``skr policy hash`` does) and the attestation authority ``--maa-endpoint``; then writes what the
wrap tools need: ``<keypath>-pub.pem`` (SubjectPublicKeyInfo) and ``<keypath>-info.json``
(``public_key_path``, ``kms_endpoint`` = the vault, ``attester_endpoint`` = the MAA endpoint). The key name
is the base name of ``--keypath``, as the annotation's ``kid`` will be.

Uses ``skr keys``' vault client and credentials. Never sees private key material: the HSM makes the key.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from azure.keyvault.keys import KeyReleasePolicy, KeyVaultKey
from azure.keyvault.keys.aio import KeyClient
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.akv.policy import build_confidential_containers_policy, encode_policy_for_wire
from skr.commands import vault_client_arguments
from skr.commands.keys import RSA_SIZES, _with_client
from skr.endpoints import parse_endpoint
from skr.errors import BadRequest, UpstreamError
from skr.keyprovider.keyinfo import write_key_info
from skr.snp.hostdata import host_data_of_policy


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "image-key",
        help="create the RSA-HSM key for encrypted images and the files skr wrap needs",
        description="Create an exportable RSA-HSM key whose release policy is bound to HOST_DATA, and write "
        "KEYPATH-info.json + KEYPATH-pub.pem for `skr wrap` and the gRPC WrapKey.",
    )
    actions = parser.add_subparsers(dest="image_key_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create the key; prints its id")
    create.add_argument("--vault", required=True, help="managed HSM or vault: host, host:port or https URL")
    create.add_argument(
        "--keypath", required=True, help="DIR/NAME: the key is NAME; writes DIR/NAME-info.json"
    )
    create.add_argument("--maa-endpoint", required=True, help="the attestation endpoint the policy trusts")
    bound = create.add_mutually_exclusive_group(required=True)
    bound.add_argument("--host-data", help="64 hex digits: SHA-256 of the CCE policy (skr policy hash)")
    bound.add_argument("--cce-policy", type=Path, metavar="FILE", help="the CCE policy (base64 or Rego)")
    create.add_argument("--size", type=int, default=3072, choices=RSA_SIZES, help="RSA key size (3072)")
    create.add_argument("--immutable", action="store_true", help="make the release policy immutable")
    create.add_argument("--api-version", help="Key Vault API version (default: the SDK's)")
    vault_client_arguments(create)
    create.set_defaults(func=_create)


def _public_key(key: KeyVaultKey) -> rsa.RSAPublicKey:
    n, e = (getattr(key.key, part, None) for part in ("n", "e"))
    if not isinstance(n, bytes) or not isinstance(e, bytes) or not n or not e:
        raise UpstreamError(f"the vault returned key {key.name} without an RSA public key")
    return rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()


def _create(args: argparse.Namespace) -> int:
    name = Path(args.keypath).name
    if not name:
        raise BadRequest("--keypath must end in the key name (DIR/NAME)")
    args.name = name  # what the shared vault client names in its errors
    host_data = args.host_data or host_data_of_policy(args.cce_policy.read_bytes()).hex()
    maa = parse_endpoint(args.maa_endpoint, what="--maa-endpoint")
    vault = parse_endpoint(args.vault, what="--vault")
    policy = build_confidential_containers_policy(authority=maa.url, host_data=host_data)
    release_policy = KeyReleasePolicy(
        encode_policy_for_wire(policy), immutable=True if args.immutable else None
    )

    async def call(client: KeyClient) -> KeyVaultKey:
        return await client.create_rsa_key(
            name, size=args.size, hardware_protected=True, exportable=True, release_policy=release_policy
        )

    key = asyncio.run(_with_client(args, call))
    info, pem = write_key_info(
        args.keypath, _public_key(key), kms_endpoint=vault.authority, attester_endpoint=maa.authority
    )
    sys.stdout.write(f"{key.id}\n")
    print(f"wrote {info} and {pem} (release bound to HOST_DATA {host_data})", file=sys.stderr)
    return 0
