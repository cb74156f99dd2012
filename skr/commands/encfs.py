"""``skr encfs``: mount encrypted blob images for the app (the Go encfs sidecar's job), and the owner's
tools ``skr encfs create · upload · inspect``.

Keys never touch the disk: ``create --vault`` generates the key in memory, formats with it on
cryptsetup's stdin and imports it into the HSM with its release policy; ``inspect --key-file`` reads a key
the owner already holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from skr.commands import credential_factory, vault_client_arguments
from skr.config import add_arguments, load_settings
from skr.errors import BadRequest
from skr.logs import setup_logging

GO_ENV = "EncfsSideCarArgs"  # the Go encfs sidecar's variable (a contract: an existing deployment works)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "encfs",
        help="mount encrypted filesystem images from Azure blobs (EncfsSideCarArgs); create/upload/inspect",
        description="Mount LUKS2-encrypted ext4 images stored in Azure blobs, with keys released under "
        "attestation; or create, upload and inspect such images.",
    )
    actions = parser.add_subparsers(dest="encfs_command", metavar="ACTION")

    create = actions.add_parser("create", help="build an encrypted ext4 image from a directory")
    create.add_argument("--from", dest="source", required=True, type=Path, metavar="DIR", help="content")
    create.add_argument("--out", required=True, type=Path, metavar="IMAGE", help="the image file to write")
    create.add_argument("--size", help="image size (e.g. 64M); default: fits the content")
    key = create.add_mutually_exclusive_group(required=True)
    key.add_argument("--key-file", type=Path, metavar="FILE", help="an existing 32-byte key")
    key.add_argument("--vault", help="generate the key and import it into this vault / managed HSM")
    create.add_argument("--kid", help="with --vault: the key name to import as")
    create.add_argument("--policy", type=Path, metavar="FILE", help="with --vault: the release policy JSON")
    vault_client_arguments(create)
    create.set_defaults(func=_create)

    inspect = actions.add_parser("inspect", help="LUKS2 header summary, and whether a key opens it")
    inspect.add_argument("image", type=Path, metavar="IMAGE", help="the LUKS2 image file")
    inspect.add_argument("--key-file", type=Path, metavar="FILE", help="check whether this key opens it")
    inspect.set_defaults(func=_inspect)

    upload = actions.add_parser("upload", help="upload an image to a blob (--page for read-write mounts)")
    upload.add_argument("image", type=Path, metavar="IMAGE", help="the image file to upload")
    upload.add_argument(
        "--url", required=True, help="https://<account>.blob.core.windows.net/<container>/<blob>"
    )
    upload.add_argument("--page", action="store_true", help="a page blob (needed for read-write mounts)")
    upload.add_argument("--client-id", help="user-assigned managed identity client id")
    upload.add_argument("--ca-bundle", type=Path, help="extra trust anchors PEM (default: env SKR_CA_BUNDLE)")
    upload.set_defaults(func=_upload)

    parser.add_argument("--config", type=Path, metavar="FILE", help="the EncfsSideCarArgs JSON (not base64)")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "dm-crypt", "userspace"),
        help="auto: dm-crypt when the kernel has device-mapper (/proc/misc), else userspace",
    )
    parser.add_argument("--cache-blocks", type=int, default=32, help="blocks in the cache (32)")
    parser.add_argument(
        "--block-size", type=int, default=512, metavar="KIB", help="cache block size (512 KiB)"
    )
    parser.add_argument("--ready-file", type=Path, help="write 1 here when every filesystem is published")
    parser.add_argument("--work-dir", type=Path, default=Path("/run/skr-encfs"), help="FUSE mount points")
    add_arguments(parser)  # the release settings, and --port for /healthz /readyz
    parser.set_defaults(func=_mount)


def _mount(args: argparse.Namespace) -> int:
    """``skr encfs``: mount every filesystem of EncfsSideCarArgs (env) or --config, until SIGTERM."""
    from skr.encfs.args import decode_encfs_args, parse_encfs_json
    from skr.encfs.blob import blob_allowlist
    from skr.encfs.mount import Options
    from skr.encfs.run import base_settings, resolve_backend, run_encfs
    from skr.local.demo import DEMO_SECURITY_POLICY

    if args.config is not None:
        encfs_args = parse_encfs_json(args.config.read_bytes(), source=str(args.config))
    elif os.environ.get(GO_ENV):
        encfs_args = decode_encfs_args(os.environ[GO_ENV])
    else:
        raise BadRequest(
            "skr encfs needs EncfsSideCarArgs (env) or --config FILE; or an action: create, upload, inspect"
        )
    if args.cache_blocks < 1 or args.block_size < 4 or args.block_size % 4:
        raise BadRequest("--cache-blocks must be at least 1 and --block-size a multiple of 4 KiB")
    settings = load_settings(args, base=base_settings(encfs_args, os.environ))
    setup_logging(settings.log_level, settings.log_file)
    options = Options(
        backend=resolve_backend(args.backend),
        block_size=args.block_size * 1024,
        cache_blocks=args.cache_blocks,
        work_dir=args.work_dir,
        blob_allowlist=blob_allowlist(os.environ),
        ca_bundle=settings.ca_bundle,
        client_id=settings.identity_client_id,
    )
    asyncio.run(
        run_encfs(
            settings,
            encfs_args,
            options,
            env=os.environ,
            stop=asyncio.Event(),
            port=args.port,
            ready_file=args.ready_file,
            virtual_policy=DEMO_SECURITY_POLICY,  # a virtual TEE without a context launches with it
        )
    )
    return 0


def _read_key_file(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != 32:
        raise BadRequest(f"{path} holds {len(key)} bytes; an encfs key file holds exactly 32")
    return key


def _create(args: argparse.Namespace) -> int:
    from skr.encfs.image import create_image, parse_size
    from skr.encfs.system import System

    size = parse_size(args.size) if args.size else None
    if args.vault is None:
        for flag in ("kid", "policy"):
            if getattr(args, flag) is not None:
                raise BadRequest(f"--{flag} goes with --vault")
        key = _read_key_file(args.key_file)
        created = create_image(args.source, args.out, key, size=size, system=System())
        print(f"created {created.path} ({created.size} bytes, ext4 {created.fs_size} bytes)", file=sys.stderr)
        return 0
    if not args.kid or args.policy is None:
        raise BadRequest("--vault needs --kid NAME and --policy FILE (the release policy bound to HOST_DATA)")
    from azure.keyvault.keys import KeyReleasePolicy

    from skr.commands import keys

    policy = KeyReleasePolicy(keys.read_policy(args.policy))
    key = secrets.token_bytes(32)  # the only copy outside the HSM, in memory only
    created = create_image(args.source, args.out, key, size=size, system=System())
    args.name, args.api_version = args.kid, None

    async def call(client: Any) -> Any:
        return await client.import_key(
            args.kid,
            keys.private_key_to_json_web_key(key),
            hardware_protected=True,
            exportable=True,
            release_policy=policy,
        )

    try:
        imported = asyncio.run(keys._with_client(args, call))
    except BaseException:
        args.out.unlink(missing_ok=True)  # without the key in the vault the image can never be opened
        raise
    print(f"created {created.path} ({created.size} bytes); key {imported.id}", file=sys.stderr)
    sys.stdout.write(f"{imported.id}\n")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from skr.encfs.image import file_reader, inspect_image

    if not args.image.is_file():
        raise BadRequest(f"{args.image} is not a file")
    key = _read_key_file(args.key_file) if args.key_file is not None else None
    result = inspect_image(file_reader(args.image), image_size=args.image.stat().st_size, key=key)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 1 if result.get("key_opens") is False else 0


def _upload(args: argparse.Namespace) -> int:
    from skr.encfs.blob import blob_allowlist, blob_transport_kwargs, parse_blob_url, upload_image

    if not args.image.is_file():
        raise BadRequest(f"{args.image} is not a file")
    url = parse_blob_url(args.url, allowlist=blob_allowlist(os.environ), what="--url")

    async def run() -> int:
        factory = credential_factory(args)
        try:
            credential = None if url.sas else factory.for_request(None)
            return await upload_image(
                str(args.image),
                url,
                page=args.page,
                credential=credential,
                transport_kwargs=blob_transport_kwargs(factory),
            )
        finally:
            await factory.aclose()

    size = asyncio.run(run())
    kind = "page" if args.page else "block"
    print(f"uploaded {args.image} ({size} bytes) to {url} as a {kind} blob", file=sys.stderr)
    return 0
