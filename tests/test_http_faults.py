"""The retry layer against a real local server misbehaving per a fault plan."""

import json
import time

import aiohttp
import pytest
from aiohttp import web

from skr.errors import ConfigError, UpstreamError, UpstreamTimeout
from skr.local.faults import FaultPlan, FaultRule
from skr.upstream import Deadline, RetryPolicy, parse_retry_after, request, summarize_body

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
async def upstream():
    plan = FaultPlan(seed=1)
    faults = plan.scoped("svc")

    async def handler(req: web.Request) -> web.StreamResponse:
        injected = await faults.before("thing", req)
        if injected is not None:
            return injected
        return web.json_response({"ok": True, "mutations": sorted(faults.mutations_for(req))})

    app = web.Application()
    app.router.add_route("*", "/thing", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        yield plan, session, f"http://127.0.0.1:{port}/thing"
    await runner.cleanup()


async def test_transient_statuses_are_retried_until_success(upstream):
    plan, session, url = upstream
    plan.add(FaultRule(route="svc.thing", action="status", status=503, times=2))
    result = await request(session, "GET", url, service="test", retry=FAST)
    assert result.status == 200 and result.attempts == 3
    assert plan.count("svc.thing") == 3


async def test_retry_after_is_honoured(upstream):
    plan, session, url = upstream
    plan.add(FaultRule(route="svc.*", action="status", status=429, times=1, retry_after=0.4))
    started = time.monotonic()
    result = await request(session, "GET", url, service="test", retry=FAST)
    assert result.status == 200
    assert time.monotonic() - started >= 0.4


async def test_persistent_failure_is_an_upstream_error_naming_the_service(upstream):
    plan, session, url = upstream
    plan.add(FaultRule(route="svc.thing", action="status", status=502))
    with pytest.raises(UpstreamError) as info:
        await request(session, "GET", url, service="Test Service", retry=FAST)
    assert "Test Service" in info.value.message and "502" in info.value.message
    assert plan.count() == FAST.attempts


async def test_non_transient_errors_are_returned_not_retried(upstream):
    plan, session, url = upstream
    plan.add(FaultRule(route="svc.thing", action="status", status=404))
    result = await request(session, "GET", url, service="test", retry=FAST)
    assert result.status == 404 and result.attempts == 1


async def test_hanging_upstream_times_out_at_the_deadline(upstream):
    plan, session, url = upstream
    plan.add(FaultRule(route="svc.thing", action="delay", seconds=5))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await request(
            session, "GET", url, service="test", timeout=5, deadline=Deadline.after(0.5), retry=FAST
        )
    assert time.monotonic() - started < 1.5


async def test_connection_reset_is_retried(upstream):
    plan, session, url = upstream
    plan.add(FaultRule(route="svc.thing", action="reset", times=1))
    # POST: aiohttp itself never replays it, so the second attempt is ours
    result = await request(session, "POST", url, service="test", json_body={}, retry=FAST)
    assert result.status == 200 and result.attempts == 2


async def test_malformed_json_is_reported(upstream):
    plan, session, url = upstream
    plan.add(FaultRule(route="svc.thing", action="malformed", times=1))
    result = await request(session, "GET", url, service="test", retry=FAST)
    with pytest.raises(UpstreamError):
        result.json()


async def test_mutations_are_chosen_per_request(upstream):
    plan, session, url = upstream
    plan.add(FaultRule(route="svc.thing", action="mutate", mutation="resign_jws", times=1))
    first = (await request(session, "GET", url, service="test")).json()
    second = (await request(session, "GET", url, service="test")).json()
    assert first["mutations"] == ["resign_jws"] and second["mutations"] == []


def test_rate_faults_are_reproducible_with_a_seed():
    plan = FaultPlan([FaultRule(route="svc.thing", action="status", status=500, rate=0.5)], seed=1)
    outcomes = [plan.decide("svc.thing")[1] is not None for _ in range(200)]
    again = FaultPlan([FaultRule(route="svc.thing", action="status", status=500, rate=0.5)], seed=1)
    assert outcomes == [again.decide("svc.thing")[1] is not None for _ in range(200)]
    assert 60 < sum(outcomes) < 140


def test_plan_file_is_validated(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"rules": [{"route": "*", "action": "explode"}]}))
    with pytest.raises(ConfigError):
        FaultPlan.load(path)
    path.write_text(json.dumps({"rules": [{"route": "*", "action": "status", "status": 503, "bogus": 1}]}))
    with pytest.raises(ConfigError):
        FaultPlan.load(path)
    path.write_text(
        json.dumps({"seed": 3, "rules": [{"route": "hsm.*", "action": "delay", "seconds": 0.02}]})
    )
    assert FaultPlan.load(path).rules[0].seconds == 0.02


def test_retry_after_forms():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_error_bodies_are_summarized_to_their_error_code_only():
    body = json.dumps(
        {"error": {"code": "Forbidden", "message": "Target environment  attestation\nstatement"}}
    )
    assert summarize_body(body.encode()) == "Forbidden"
    assert summarize_body(b'{"error": "invalid_request"}') == "invalid_request"
    assert summarize_body(b"x" * 1000) == ""  # not JSON: nothing of it is passed on
    assert summarize_body(b'{"error": {"code": "Go to http://evil.example now"}}') == ""
    assert summarize_body(b'{"error": {"message": "only text"}}') == ""
