"""CLI command groups. Each module exposes ``register(subparsers)``; :mod:`skr.cli` wires them."""

from __future__ import annotations

import argparse
from pathlib import Path


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
