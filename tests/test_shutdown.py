"""Graceful shutdown (issue 7, "Nothing lost"): SIGTERM stops accepting, lets in-flight releases finish
within the grace period, flushes the audit log, exits 0 — and the grace period really is a bound.

The first test runs the real daemon (``skr serve``, a subprocess) against ``skr local --no-sidecar`` whose
key service answers slowly (a delay fault), so releases are in flight when SIGTERM arrives. The second
runs :func:`skr.daemon.serve_forever` in this process with a short grace period and a key service that
never answers, to show that shutdown does not wait for it longer than the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import aiohttp
import pytest

from skr.audit import verify_chain
from skr.daemon import build_runtime, serve_forever
from skr.local.demo import DEMO_SECURITY_POLICY
from skr.local.faults import FaultRule
from tests.e2e import start_stack
from tests.procs import Processes, http_status, skr_cli, start_local, start_serve
from tests.sidecars import audit_records, granted_releases

SLOW = 1.5  # seconds the key service takes per release in the first test
IN_FLIGHT = 6


@pytest.fixture
def procs(tmp_path):
    processes = Processes(tmp_path / "logs")
    yield processes
    processes.close()


async def _release(client: aiohttp.ClientSession, request_id: str) -> tuple[int | str, dict[str, Any]]:
    try:
        async with client.post(
            "/key/release", data='{"kid": "demo-oct"}', headers={"X-Request-Id": request_id}
        ) as resp:
            return resp.status, await resp.json()
    except aiohttp.ClientError as exc:
        return type(exc).__name__, {}


async def test_sigterm_finishes_in_flight_releases_and_flushes_the_audit_log(tmp_path, procs):
    state, audit = tmp_path / "state", tmp_path / "audit.log"
    faults = {"seed": 1, "rules": [{"route": "hsm.release", "action": "delay", "seconds": SLOW}]}
    local, info = await asyncio.to_thread(start_local, procs, state, faults=faults)
    serve, base = await asyncio.to_thread(start_serve, procs, state, info, args=["--audit-log", str(audit)])

    async with aiohttp.ClientSession(base_url=base) as client:
        assert (await _release(client, "warm-up"))[0] == 200  # identity token and vault challenge behind us
        ids = [f"inflight-{i}" for i in range(IN_FLIGHT)]
        started = time.monotonic()
        releases = [asyncio.create_task(_release(client, rid)) for rid in ids]
        await asyncio.sleep(0.5)  # accepted and waiting on the slow key service
        assert not any(task.done() for task in releases)
        serve.send(signal.SIGTERM)
        terminated = time.monotonic()

        # it stops accepting at once ...
        refused_at = None
        while time.monotonic() - terminated < 1.0:
            if await asyncio.to_thread(http_status, base + "/status", 0.2) is None:
                refused_at = time.monotonic() - terminated
                break
            await asyncio.sleep(0.05)
        assert refused_at is not None, "the sidecar still accepted connections 1 s after SIGTERM"

        # ... and the releases already in flight complete
        results = await asyncio.gather(*releases)
    assert [status for status, _ in results] == [200] * IN_FLIGHT, results
    assert all("key" in body for _, body in results)
    assert time.monotonic() - started >= SLOW

    code = await asyncio.to_thread(serve.wait, 15)
    assert code == 0, serve.describe()
    exited_after = time.monotonic() - terminated
    assert exited_after < 10.0  # the default grace period
    messages = [r["msg"] for r in serve.log_records()]
    assert "shutting down: finishing in-flight requests" in messages and messages[-1] == "stopped"

    for rid in ids:
        assert len(granted_releases(audit, rid)) == 1, rid
    done = await asyncio.to_thread(skr_cli, "audit", "verify", str(audit))
    assert done.returncode == 0, done.stderr
    local.send(signal.SIGTERM)
    assert await asyncio.to_thread(local.wait, 10) == 0


async def test_the_grace_period_bounds_shutdown_when_an_upstream_hangs(tmp_path, caplog):
    """Grace 2 s: a release that needs 1.6 s more still completes; one stuck on a hanging key service is
    cut off when the grace period ends — not later (aiohttp alone would wait twice the timeout)."""
    grace = 2.0
    audit = tmp_path / "daemon-audit.log"
    stack = await start_stack(tmp_path / "state")
    assert stack.runtime is not None
    try:
        base_service = stack.runtime.service
        settings = stack.runtime.settings.with_(port=0, grace_period=grace, audit_log=audit)
        runtime = await build_runtime(
            settings,
            env={},
            provider=base_service.provider,
            trusted_arks=base_service.trusted_arks,
            security_policy=DEMO_SECURITY_POLICY,
        )
        stop = asyncio.Event()
        with caplog.at_level(logging.INFO, logger="skr.daemon"):
            daemon = asyncio.create_task(serve_forever(runtime, stop))
            address = await _listening(caplog)
            async with aiohttp.ClientSession(base_url=f"http://{address}") as client:
                assert (await _release(client, "before"))[0] == 200
                hang = FaultRule("hsm.release", "delay", seconds=3600, times=1)
                stack.faults.add(hang)
                stuck = asyncio.create_task(_release(client, "stuck"))
                await _until(lambda: hang.fired == 1)
                slow = FaultRule("hsm.release", "delay", seconds=1.6, times=1)
                stack.faults.add(slow)
                finishing = asyncio.create_task(_release(client, "finishing"))
                await _until(lambda: slow.fired == 1)
                stop.set()
                started = time.monotonic()
                await asyncio.wait_for(daemon, timeout=grace * 2 + 3)
                took = time.monotonic() - started
                stuck_status, _ = await asyncio.wait_for(stuck, timeout=2)
                finishing_status, body = await asyncio.wait_for(finishing, timeout=2)
        assert grace - 0.1 <= took < grace + 0.5, f"shutdown took {took:.2f} s with a {grace:g} s grace"
        assert finishing_status == 200 and "key" in body
        assert stuck_status != 200  # cut off, never half-answered as granted
        assert verify_chain([audit]).intact
        assert [r["outcome"] for r in audit_records(audit, "before")] == ["granted"]
        assert len(granted_releases(audit, "finishing")) == 1
        assert granted_releases(audit, "stuck") == []
        # the cut-off attempt is still on the record, as an error
        assert [(r["outcome"], r.get("error_code")) for r in audit_records(audit, "stuck")] == [
            ("error", "cancelled")
        ]
    finally:
        stack.faults.clear()
        await stack.stop()


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _listening(caplog: pytest.LogCaptureFixture) -> str:
    for _ in range(200):
        for record in caplog.records:
            if record.getMessage() == "skr sidecar listening":
                address: str = record.__dict__["address"]
                return address
        await asyncio.sleep(0.02)
    raise AssertionError("serve_forever did not log its address")
