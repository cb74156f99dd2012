"""``skr serve``: the sidecar daemon (what the container image runs)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from skr.config import SERVER_TYPES, add_arguments, check_startup, load_settings
from skr.errors import ConfigError
from skr.logs import setup_logging

if TYPE_CHECKING:
    from skr.maa.runtime import WrappingKey


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("serve", help="run the sidecar HTTP API (default 127.0.0.1:8080)")
    add_arguments(parser)
    parser.add_argument("--client-token-file", help="require this bearer token (file)")
    parser.add_argument(
        "--server-type",
        "-server_type",
        type=str.lower,
        choices=SERVER_TYPES,
        help="http (default), grpc (the Go sidecar's gRPC key provider on --port) or both (env ServerType)",
    )
    parser.add_argument("--grpc-port", type=int, help="gRPC port with --server-type both (default 50000)")
    # The Go image's /skr.sh takes SkrSideCarArgs as $1 and the port as $2 (the environment wins).
    parser.add_argument(
        "sidecar_args_positional", nargs="?", metavar="SKRSIDECARARGS", help="as env SkrSideCarArgs"
    )
    parser.add_argument("port_positional", nargs="?", metavar="PORT", help="as env Port")
    parser.set_defaults(func=_serve)


def check_server_type(env: Mapping[str, str]) -> None:
    """The Go image's ``ServerType`` must be http, grpc or both; grpc needs the optional ``grpc`` extra."""
    server_type = env.get("ServerType", "").strip().lower()
    if server_type and server_type not in SERVER_TYPES:
        raise ConfigError(
            f"ServerType={env['ServerType'].strip()} is not supported: use {', '.join(SERVER_TYPES)}",
            hint="the Go sidecar knows http and grpc; skr adds both",
        )


def _first_key() -> Future[WrappingKey]:
    """Start generating the first wrapping key now, on another core (OpenSSL releases the GIL), so that
    readiness does not wait for it after the daemon's imports and set-up."""
    from skr.maa.runtime import WrappingKey

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skr-first-key")
    try:
        return pool.submit(WrappingKey.generate)
    finally:
        pool.shutdown(wait=False)


def _serve(args: argparse.Namespace) -> int:
    check_server_type(os.environ)
    settings = load_settings(args)
    check_startup(settings)
    setup_logging(settings.log_level, settings.log_file)
    first_key = _first_key()
    from skr.daemon import build_runtime, serve_forever  # the heavy imports, while the key is made
    from skr.local.demo import DEMO_SECURITY_POLICY  # a virtual TEE without a context launches with it

    async def run() -> None:
        runtime = await build_runtime(settings, env=os.environ, virtual_policy=DEMO_SECURITY_POLICY)
        await serve_forever(runtime, first_key=first_key)

    asyncio.run(run())
    return 0
