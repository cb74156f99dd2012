"""CLI command groups. Each module exposes ``register(subparsers)``; :mod:`skr.cli` wires them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from skr.errors import BadRequest

if TYPE_CHECKING:
    from skr.identity import CredentialFactory


def vault_client_arguments(parser: argparse.ArgumentParser) -> None:
    """How a command authenticates to the vault and trusts it (``skr keys``, ``image-key``, ``encfs``)."""
    parser.add_argument("--client-id", help="user-assigned managed identity client id")
    parser.add_argument("--access-token-file", type=Path, metavar="FILE", help="an AAD token for the vault")
    parser.add_argument("--ca-bundle", type=Path, help="extra trust anchors PEM (default: env SKR_CA_BUNDLE)")
    parser.add_argument(
        "--allow-insecure-challenge",
        action="store_true",
        help="accept an auth challenge for another domain (local emulators only; never for Azure domains)",
    )


def credential_factory(args: argparse.Namespace) -> CredentialFactory:
    """The credentials of ``--client-id``, trusting ``--ca-bundle`` (default: env SKR_CA_BUNDLE)."""
    from skr.identity import CredentialFactory  # aiohttp and the identity client: only where used
    from skr.upstream import ca_bundle_from_env

    bundle = args.ca_bundle if args.ca_bundle is not None else ca_bundle_from_env()
    return CredentialFactory(client_id=args.client_id, ca_bundle=bundle)


def read_access_token(path: Path | None) -> str | None:
    """The AAD token in ``--access-token-file`` (an empty file is refused), or None without the flag."""
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise BadRequest(f"{path} is empty")
    return token
