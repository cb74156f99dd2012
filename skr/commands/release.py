"""``skr release``: one release through the same service as the daemon, for init containers."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path

from skr.commands import read_access_token
from skr.config import RELEASE_FLAGS, add_arguments, load_settings
from skr.daemon import build_runtime
from skr.errors import ReleaseDenied
from skr.files import check_output_file, write_private_file
from skr.local.demo import DEMO_SECURITY_POLICY
from skr.logs import setup_logging
from skr.service import RequestContext


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "release",
        help="release one key, write its JWK (stdout or --out, 0600); exit 1 when denied",
    )
    parser.add_argument("--kid", required=True, help="key name, name/version or key URL")
    parser.add_argument(
        "--out", type=Path, help="write the JWK here (0600, never through a symlink) instead of stdout"
    )
    parser.add_argument("--access-token-file", type=Path, help="a file holding an AAD token for the vault")
    add_arguments(parser, only=RELEASE_FLAGS)
    parser.set_defaults(func=_release)


def _release(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    setup_logging(settings.log_level if args.log_level else "warning", settings.log_file)
    if args.out is not None:
        check_output_file(args.out)  # a link or a non-file there is refused before a key is released
    access_token = read_access_token(args.access_token_file)

    async def run() -> str:
        runtime = await build_runtime(settings, env=os.environ, virtual_policy=DEMO_SECURITY_POLICY)
        try:
            result = await runtime.service.release(
                kid=args.kid,
                maa_endpoint=None,
                akv_endpoint=None,
                access_token=access_token,
                ctx=RequestContext(request_id=uuid.uuid4().hex, client="cli"),
            )
        finally:
            await runtime.aclose()
        return result.key_json

    try:
        key_json = asyncio.run(run())
    except ReleaseDenied as exc:  # a negative verdict, not unusable input: exit 1
        print(f"skr: {exc.diagnostics()}", file=sys.stderr)
        return 1
    if args.out is not None:
        write_private_file(args.out, key_json)
        print(f"released {args.kid} to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(key_json + "\n")
    return 0
