"""Helpers for end-to-end tests: a local stack in a temporary state directory, and a sidecar client."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from skr.akv.policy import build_confidential_containers_policy, encode_policy_for_wire
from skr.local.faults import FaultPlan
from skr.local.stack import LocalStack, StackOptions


async def start_stack(state_dir: Path, **options: Any) -> LocalStack:
    opts = StackOptions(
        state_dir=state_dir,
        sidecar_port=0,
        audit_log=state_dir / "audit.log",
        faults=options.pop("faults", None) or FaultPlan(seed=1),
        **options,
    )
    return await LocalStack.start(opts)


async def stack_session(
    state_dir: Path, **options: Any
) -> AsyncIterator[tuple[LocalStack, aiohttp.ClientSession]]:
    stack = await start_stack(state_dir, **options)
    try:
        async with aiohttp.ClientSession(base_url=stack.info["sidecar"]) as client:
            yield stack, client
    finally:
        await stack.stop()


def bound_policy(stack: LocalStack, host_data: str | None = None) -> bytes:
    return encode_policy_for_wire(
        build_confidential_containers_policy(
            authority=stack.info["attestation_url"], host_data=host_data or stack.info["host_data"]
        )
    )


async def post(client: aiohttp.ClientSession, path: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    async with client.post(path, data=data, **kw) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64url_int(value: int, length: int | None = None) -> str:
    raw = value.to_bytes(length or (value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def expected_rsa_jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    """The JWK of an RSA key, computed from its numbers (independently of skr.akv.jwk)."""
    n = key.private_numbers()
    return {
        "kty": "RSA",
        "n": b64url_int(n.public_numbers.n),
        "e": b64url_int(n.public_numbers.e),
        "d": b64url_int(n.d),
        "p": b64url_int(n.p),
        "q": b64url_int(n.q),
        "dp": b64url_int(n.dmp1),
        "dq": b64url_int(n.dmq1),
        "qi": b64url_int(n.iqmp),
    }


def expected_ec_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    size = (key.curve.key_size + 7) // 8
    n = key.private_numbers()
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
    return {
        "kty": "EC",
        "crv": crv,
        "x": b64url_int(n.public_numbers.x, size),
        "y": b64url_int(n.public_numbers.y, size),
        "d": b64url_int(n.private_value, size),
    }


@asynccontextmanager
async def serve_local(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (ephemeral port; HTTPS with ``ssl_context``); yields ``host:port``."""
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
