"""``skr serve``: the sidecar daemon (what the container image runs)."""

from __future__ import annotations

import argparse
import asyncio
import os

from skr.config import add_arguments, load_settings
from skr.daemon import build_runtime, serve_forever
from skr.logs import setup_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("serve", help="run the sidecar HTTP API (default 127.0.0.1:8080)")
    add_arguments(parser)
    parser.add_argument(
        "--client-token-file", type=str, default=None, help="require this bearer token (file)"
    )
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    setup_logging(settings.log_level, settings.log_file)

    async def run() -> None:
        runtime = await build_runtime(settings, env=os.environ)
        await serve_forever(runtime)

    asyncio.run(run())
    return 0
