"""Helpers for tests that need a sidecar configured differently from the local stack's own.

:func:`extra_sidecar` starts a second, real sidecar (``build_runtime`` + ``start_site``, exactly what
``skr serve`` runs) in this process, next to a running :class:`LocalStack`: it shares the stack's virtual
TEE and identity environment and starts from the stack sidecar's settings, with the changes a test names
(a client token, another CA bundle, a wider allowlist, another bind address ...).

Also: a seeded fault plan builder, the audit records of one request id, and a way to find a genuine
non-loopback address of this machine.
"""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from skr.daemon import Runtime, build_runtime, start_site
from skr.local.demo import DEMO_SECURITY_POLICY
from skr.local.faults import FaultPlan, FaultRule
from skr.local.stack import LocalStack


@contextlib.asynccontextmanager
async def extra_sidecar(stack: LocalStack, **changes: Any) -> AsyncIterator[tuple[Runtime, str]]:
    """A second sidecar beside ``stack`` with ``Settings`` changed by ``changes``; yields (runtime, base URL).

    The base URL uses 127.0.0.1 whatever the bind address is. The audit log is a file of its own next to
    the stack's (two writers must never share one chain) unless ``audit_log`` is among the changes.
    """
    assert stack.runtime is not None, "the stack must run its own sidecar (it sets the identity environment)"
    base = stack.runtime.settings
    audit = base.audit_log.with_name(f"audit-extra-{uuid.uuid4().hex[:8]}.log") if base.audit_log else None
    settings = base.with_(**{"port": 0, "audit_log": audit, **changes})
    service = stack.runtime.service
    runtime = await build_runtime(
        settings,
        env={},
        provider=service.provider,
        trusted_arks=service.trusted_arks,
        security_policy=DEMO_SECURITY_POLICY,
    )
    runner = None
    try:
        runner, port = await start_site(runtime)
        await runtime.service.start()
        yield runtime, f"http://127.0.0.1:{port}"
    finally:
        if runner is not None:
            await runner.cleanup()
        await runtime.aclose()


def plan(*rules: FaultRule, seed: int = 7) -> FaultPlan:
    """A seeded fault plan (runs repeat exactly)."""
    return FaultPlan(list(rules), seed=seed)


def audit_records(path: Path | None, request_id: str | None = None) -> list[dict[str, Any]]:
    """The records of an audit log, optionally only those of one request id."""
    if path is None or not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if request_id is None or r.get("request_id") == request_id]


def granted_releases(path: Path, request_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in audit_records(path, request_id)
        if r.get("event") == "key.release" and r.get("outcome") == "granted"
    ]


async def get_json(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.get(url, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback and can be bound, or None.

    Uses the source address the kernel would pick for a route off the machine (a UDP ``connect`` sends
    no packet), falling back to the host name's addresses.
    """
    candidates: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 9))
        candidates.append(probe.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += [str(ai[4][0]) for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    for address in _unique(candidates):
        if address.startswith("127.") or address == "0.0.0.0":
            continue
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
            return address
    return None


def _unique(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
