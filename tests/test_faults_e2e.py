"""Faults in the upstreams, through the whole local stack and the real sidecar (issue 7, "Fault injection").

The local attestation, key and identity services misbehave per a seeded fault plan; the sidecar talks to
them with exactly the clients it uses for Azure (skr.upstream for MAA, Key Vault and the identity
endpoints). What the app sees is checked, and what the audit log
says about each request (matched by the X-Request-Id the test chooses).

Retry budgets these tests rely on, as the code has them:
- MAA (skr.upstream.RetryPolicy): 5 attempts, transient = connection errors, timeouts, 408, 429, 5xx;
  Retry-After honoured (capped by the deadline).
- Key Vault (skr.akv.release.SdkSettings): the same policy for each release call (5 attempts; 408, 429,
  5xx and connection errors; Retry-After honoured).
- Both: a Retry-After that would end past the request deadline is not waited out.
- Identity (skr.identity): the same policy again; tokens are cached, so only the first token can fail.

Module stacks run with ``token_reuse=False`` so that every release attests (MAA faults always bite) and are
warmed up once (the vault's challenge round trip and the identity token are behind us), so the
request counts per route are exact.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from skr.audit import verify_chain
from skr.local.faults import FaultPlan, FaultRule
from skr.local.stack import LocalStack, StackOptions
from tests.e2e import bound_policy
from tests.procs import Processes, start_local
from tests.sidecars import audit_records, extra_sidecar, granted_releases

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEADLINE = 10.0  # the module stack's request deadline: persistent failures must answer well inside it
SHORT_DEADLINE = 2.0  # the hanging-upstream stack's


class Env:
    """A running stack, a client for its sidecar, and helpers that time and identify each release."""

    def __init__(self, stack: LocalStack, client: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.client = client
        self.faults = stack.faults
        assert stack.options.audit_log is not None
        self.audit = stack.options.audit_log

    def counts(self) -> dict[str, int]:
        return {route: self.faults.count(route) for route in ("maa.attest", "hsm.release")}

    def delta(self, before: dict[str, int]) -> dict[str, int]:
        return {route: n - before[route] for route, n in self.counts().items()}

    async def release(self, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], float, str]:
        """POST /key/release; returns (status, JSON body, seconds, request id)."""
        request_id = "t7-" + uuid.uuid4().hex[:16]
        started = time.monotonic()
        async with self.client.post(
            "/key/release",
            data=json.dumps(body or {"kid": "demo-oct"}),
            headers={"X-Request-Id": request_id},
        ) as resp:
            doc = json.loads(await resp.read())
            status = resp.status
        return status, doc, time.monotonic() - started, request_id


async def _env(state: Path, **options: Any) -> Env:
    stack = await LocalStack.start(
        StackOptions(
            state_dir=state,
            sidecar_port=0,
            audit_log=state / "audit.log",
            faults=FaultPlan(seed=7),
            token_reuse=False,
            **options,
        )
    )
    client = aiohttp.ClientSession(base_url=stack.info["sidecar"])
    env = Env(stack, client)
    status, body, _, _ = await env.release()  # warm-up: the vault's challenge and the identity token
    assert status == 200, body
    return env


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def env(tmp_path_factory):
    env = await _env(tmp_path_factory.mktemp("faults"), request_deadline=DEADLINE)
    yield env
    await env.client.close()
    await env.stack.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def short(tmp_path_factory):
    env = await _env(tmp_path_factory.mktemp("deadline"), request_deadline=SHORT_DEADLINE)
    yield env
    await env.client.close()
    await env.stack.stop()


@pytest.fixture(autouse=True)
def _no_leftover_faults(request):
    """Every test starts and ends with an empty plan on the stack it uses."""
    stacks = [request.getfixturevalue(n) for n in ("env", "short") if n in request.fixturenames]
    for e in stacks:
        e.faults.clear()
    yield
    for e in stacks:
        e.faults.clear()


def _assert_json_error(status: int, body: dict[str, Any], expected: int) -> None:
    assert status == expected, body
    assert "key" not in body
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("code"), str) and body["code"]
    assert isinstance(body.get("request_id"), str)


def _one_decision(audit: Path, request_id: str) -> dict[str, Any]:
    records = [r for r in audit_records(audit, request_id) if r["event"] == "key.release"]
    assert len(records) == 1, records
    return records[0]


# --- the plan itself ----------------------------------------------------------------------------------


async def test_answer_rules_with_times_form_a_sequence():
    plan = FaultPlan(
        [
            FaultRule(route="maa.attest", action="status", status=500, times=1),
            FaultRule(route="maa.attest", action="status", status=502, times=1),
            FaultRule(route="maa.*", action="delay", seconds=0.01, times=2),
            FaultRule(route="maa.attest", action="reset", times=1),
        ]
    )
    answers = []
    for _ in range(4):
        delay, rule, _ = plan.decide("maa.attest")
        answers.append((delay, rule and (rule.action, rule.status)))
    assert answers == [(0.01, ("status", 500)), (0.01, ("status", 502)), (0.0, ("reset", 503)), (0.0, None)]


# --- transient faults within the retry budget: one granted release ---------------------------------

TRANSIENT = {
    "maa 503 twice": ([FaultRule("maa.attest", "status", status=503, times=2)], {"maa.attest": 3}),
    "maa 500, 502, 429, 503 (the whole budget)": (
        [
            FaultRule("maa.attest", "status", status=500, times=1),
            FaultRule("maa.attest", "status", status=502, times=1),
            FaultRule("maa.attest", "status", status=429, retry_after=0.1, times=1),
            FaultRule("maa.attest", "status", status=503, times=1),
        ],
        {"maa.attest": 5},
    ),
    "maa connection reset": ([FaultRule("maa.attest", "reset", times=1)], {"maa.attest": 2}),
    "maa slow (0.3 s)": ([FaultRule("maa.attest", "delay", seconds=0.3, times=1)], {"maa.attest": 1}),
    "vault 503 twice": ([FaultRule("hsm.release", "status", status=503, times=2)], {"hsm.release": 3}),
    "vault 502 then reset": (
        [FaultRule("hsm.release", "status", status=502, times=1), FaultRule("hsm.release", "reset", times=1)],
        {"hsm.release": 3},
    ),
    "vault 429 with Retry-After": (
        [FaultRule("hsm.release", "status", status=429, retry_after=0.1, times=1)],
        {"hsm.release": 2},
    ),
    "both at once": (
        [
            FaultRule("maa.attest", "status", status=503, times=1),
            FaultRule("hsm.release", "reset", times=1),
            FaultRule("*", "delay", seconds=0.02),
        ],
        {"maa.attest": 2, "hsm.release": 2},
    ),
}


@pytest.mark.parametrize("case", list(TRANSIENT))
async def test_transient_faults_within_the_budget_end_in_one_granted_release(env, case):
    rules, expected_calls = TRANSIENT[case]
    for rule in rules:
        env.faults.add(rule)
    before = env.counts()
    status, body, _, request_id = await env.release()
    assert status == 200, body
    assert set(body) == {"key"} and json.loads(body["key"])["kty"] == "oct"
    calls = env.delta(before)
    assert calls == {"maa.attest": 1, "hsm.release": 1, **expected_calls}
    assert all(rule.fired == (rule.times or rule.fired) for rule in rules)  # every fault really happened
    decision = _one_decision(env.audit, request_id)
    assert decision["outcome"] == "granted" and decision["kid"] == "demo-oct"
    assert len(granted_releases(env.audit, request_id)) == 1


async def test_a_seeded_rate_of_transient_faults_loses_no_release(env):
    """20 % of MAA and Key Vault answers fail (seeded: the run repeats); every release still succeeds."""
    env.faults.add(FaultRule("maa.attest", "status", status=503, rate=0.2))
    env.faults.add(FaultRule("hsm.release", "status", status=500, rate=0.2))
    before = env.counts()
    results = [await env.release() for _ in range(8)]
    assert [status for status, *_ in results] == [200] * 8
    assert sum(env.delta(before).values()) > 16  # the seed does inject faults into these 8 releases
    for *_, request_id in results:
        assert len(granted_releases(env.audit, request_id)) == 1


# --- Retry-After is honoured ---------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["maa.attest", "hsm.release"])
async def test_retry_after_is_waited_out(env, route):
    baseline = (await env.release())[2]
    env.faults.add(FaultRule(route, "status", status=429, retry_after=1.5, times=1))
    before = env.counts()
    status, body, elapsed, request_id = await env.release()
    assert status == 200, body
    assert env.delta(before)[route] == 2
    assert elapsed >= 1.5, f"answered after {elapsed:.2f} s, before the Retry-After of 1.5 s"
    assert elapsed < 1.5 + baseline + 1.0
    assert len(granted_releases(env.audit, request_id)) == 1


# --- persistent failure: 502 with a clear message, inside the deadline -----------------------------

PERSISTENT = {
    "vault always 502": (
        FaultRule("hsm.release", "status", status=502),
        "upstream_error",
        ["Key Vault", "502", "demo-oct"],
        {"hsm.release": 5},
    ),
    "vault always 503": (
        FaultRule("hsm.release", "status", status=503),
        "upstream_error",
        ["Key Vault", "503"],
        {"hsm.release": 5},
    ),
    "vault always resets": (
        FaultRule("hsm.release", "reset"),
        "upstream_unreachable",
        ["Key Vault", "could not be reached"],
        {"hsm.release": 5},
    ),
    "maa always 503": (
        FaultRule("maa.attest", "status", status=503),
        "upstream_error",
        ["Microsoft Azure Attestation", "503", "5 attempts"],
        {"maa.attest": 5, "hsm.release": 0},
    ),
    "maa always resets": (
        FaultRule("maa.attest", "reset"),
        "upstream_unreachable",
        ["Microsoft Azure Attestation", "could not be reached", "5 attempts"],
        {"maa.attest": 5, "hsm.release": 0},
    ),
}


@pytest.mark.parametrize("case", list(PERSISTENT))
async def test_persistent_failure_is_a_502_naming_the_upstream_inside_the_deadline(env, case):
    rule, code, words, expected_calls = PERSISTENT[case]
    env.faults.add(rule)
    before = env.counts()
    status, body, elapsed, request_id = await env.release()
    _assert_json_error(status, body, 502)
    assert body["code"] == code
    for word in words:
        assert word in body["error"], body["error"]
    assert body.get("hint")
    assert elapsed < DEADLINE - 2, f"took {elapsed:.2f} s of the {DEADLINE:g} s deadline"
    assert env.delta(before) == {"maa.attest": 1, "hsm.release": 1, **expected_calls}
    decision = _one_decision(env.audit, request_id)
    assert decision["outcome"] == "error" and decision["error_code"] == code


# --- forged or wrong answers: refused, the key never reaches the app ---------------------------------

FORGED = {
    "release JWS truncated": ("hsm.release", "truncate_jws", 502, "release_jws_invalid"),
    "release JWS re-signed by another key": ("hsm.release", "resign_jws", 502, "release_jws_invalid"),
    "release JWS signer certificate expired": ("hsm.release", "expired_cert", 502, "release_jws_invalid"),
    "release answer not JSON": ("hsm.release", "malformed", 502, "upstream_error"),
    "MAA token from a wrong issuer": ("maa.attest", "wrong_issuer", 403, "release_denied"),
    "MAA token re-signed by another key": ("maa.attest", "resign_jws", 403, "release_denied"),
    "MAA token truncated": ("maa.attest", "truncate_jws", 403, "release_denied"),
    "MAA token expired": ("maa.attest", "expired_cert", 403, "release_denied"),
    "MAA answer not JSON": ("maa.attest", "malformed", 502, "attestation_failed"),
}


def _encodings(secret: bytes) -> list[bytes]:
    return [
        secret,
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        secret.hex().encode(),
        secret.hex().upper().encode(),
    ]


@pytest.mark.parametrize("case", list(FORGED))
async def test_a_forged_or_wrong_answer_is_refused_and_the_key_never_reaches_the_app(env, case):
    route, corruption, expected_status, code = FORGED[case]
    secret = os.urandom(32)
    name = "forged-" + uuid.uuid4().hex[:12]
    await env.stack.key_service.import_key(name, secret, release_policy=bound_policy(env.stack))
    if corruption == "malformed":
        env.faults.add(FaultRule(route, "malformed"))
    else:
        env.faults.add(FaultRule(route, "mutate", mutation=corruption))

    async with env.client.post(
        "/key/release", data=json.dumps({"kid": name}), headers={"X-Request-Id": f"forged-{name}"}
    ) as resp:
        raw = await resp.read()
        status = resp.status
    body = json.loads(raw)
    _assert_json_error(status, body, expected_status)
    assert body["code"] == code, body
    for form in _encodings(secret):
        assert form not in raw
    decision = _one_decision(env.audit, f"forged-{name}")
    assert decision["outcome"] in ("denied", "error") and decision["error_code"] == code

    # the same key, the same sidecar, no fault: released — so it was the forgery that was refused
    env.faults.clear()
    status, doc, _, _ = await env.release({"kid": name})
    assert status == 200, doc
    assert base64.urlsafe_b64decode(json.loads(doc["key"])["k"] + "==") == secret


async def test_a_token_the_vault_refused_is_not_reused(env):
    """With token reuse on, a wrong-issuer token is cached once; the vault's refusal evicts it."""
    async with (
        extra_sidecar(env.stack, token_reuse=True) as (_, base),
        aiohttp.ClientSession(base_url=base) as client,
    ):
        env.faults.add(FaultRule("maa.attest", "mutate", mutation="wrong_issuer", times=1))
        before = env.counts()
        async with client.post("/key/release", data='{"kid": "demo-oct"}') as resp:
            first = resp.status, await resp.json()
        async with client.post("/key/release", data='{"kid": "demo-oct"}') as resp:
            second = resp.status, await resp.json()
    _assert_json_error(*first, 403)
    assert second[0] == 200 and "key" in second[1]
    assert env.delta(before)["maa.attest"] == 2


# --- a hanging upstream: 504 at the deadline, never later; health stays fast ---------------------

HANGING = {
    "MAA hangs": FaultRule("maa.attest", "delay", seconds=3600),
    "Key Vault hangs": FaultRule("hsm.release", "delay", seconds=3600),
}


async def _timed_get(client: aiohttp.ClientSession, path: str) -> tuple[int, float]:
    started = time.monotonic()
    async with client.get(path) as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


@pytest.mark.parametrize("case", list(HANGING))
async def test_a_hanging_upstream_is_a_504_at_the_deadline_and_health_stays_fast(short, case):
    short.faults.add(HANGING[case])
    release = asyncio.create_task(short.release())
    await asyncio.sleep(0.5)  # the release is waiting on the upstream (and the next wrapping key is made)
    probes = [await _timed_get(short.client, path) for path in ("/status", "/healthz", "/readyz") * 3]
    status, body, elapsed, request_id = await release

    assert not release.cancelled()
    for probe_status, seconds in probes:
        assert probe_status == 200 and seconds < 0.1, probes
    _assert_json_error(status, body, 504)
    assert body["code"] == "upstream_timeout"
    assert SHORT_DEADLINE - 0.05 <= elapsed < SHORT_DEADLINE + 1.0, f"answered after {elapsed:.2f} s"
    decision = _one_decision(short.audit, request_id)
    assert decision["outcome"] == "error" and decision["error_code"] == "upstream_timeout"


@pytest.mark.parametrize("route", ["maa.attest", "hsm.release"])
async def test_a_retry_after_beyond_the_deadline_is_not_waited_out(short, route):
    short.faults.add(FaultRule(route, "status", status=429, retry_after=60))
    status, body, elapsed, request_id = await short.release()
    _assert_json_error(status, body, 502)
    assert body["code"] == "upstream_error" and "429" in body["error"]
    assert elapsed < 1.0, f"answered after {elapsed:.2f} s"
    assert _one_decision(short.audit, request_id)["error_code"] == "upstream_error"


async def test_the_audit_logs_of_all_these_faults_verify(env, short):
    """Runs after the tests above (file order): every fault, retry and refusal left an intact chain."""
    for e in (env, short):
        result = verify_chain([e.audit])
        assert result.intact, result.finding
        assert result.records > 40 if e is env else result.records >= 5


# --- identity: only the first token can fail (the credential caches it) -------------------------------


@pytest.fixture(scope="module")
def identity_state(tmp_path_factory):
    """One state directory for the identity stacks below (each started fresh, one after the other)."""
    return tmp_path_factory.mktemp("identity")


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        pytest.param(FaultRule("identity.app_service", "status", status=503, times=2), 200, id="503-twice"),
        pytest.param(FaultRule("identity.app_service", "reset", times=1), 200, id="reset"),
        pytest.param(
            FaultRule("identity.app_service", "status", status=429, retry_after=0.3, times=1), 200, id="429"
        ),
        pytest.param(FaultRule("identity.app_service", "delay", seconds=3600), 504, id="hangs"),
    ],
)
async def test_identity_faults_on_the_first_token(identity_state, rule, expected):
    stack = await LocalStack.start(
        StackOptions(
            state_dir=identity_state,
            sidecar_port=0,
            audit_log=identity_state / "audit.log",
            faults=FaultPlan([rule], seed=7),
            # azure-identity backs off ~1.6 s after its second failure: the short deadline only to hang
            request_deadline=DEADLINE if expected == 200 else SHORT_DEADLINE,
        )
    )
    try:
        async with aiohttp.ClientSession(base_url=stack.info["sidecar"]) as client:
            started = time.monotonic()
            async with client.post("/key/release", data='{"kid": "demo-oct"}') as resp:
                status, body = resp.status, await resp.json()
            elapsed = time.monotonic() - started
            assert stack.faults.count("identity.*") >= 1 and rule.fired >= 1
            if expected == 200:
                assert status == 200, body
                calls = stack.faults.count("identity.*")
                async with client.post("/key/release", data='{"kid": "demo-rsa"}') as resp:
                    assert resp.status == 200
                assert stack.faults.count("identity.*") == calls  # the token is cached
            else:
                _assert_json_error(status, body, 504)
                assert elapsed < SHORT_DEADLINE + 1.0
    finally:
        await stack.stop()


# --- `skr local --faults FILE` as a process ----------------------------------------------------------


async def test_skr_local_with_a_fault_plan_file_releases_and_stops_cleanly_on_sigint(tmp_path):
    plan = {
        "seed": 11,
        "rules": [
            {"route": "maa.attest", "action": "status", "status": 503, "times": 2},
            {"route": "hsm.release", "action": "status", "status": 429, "retry_after": 1.0, "times": 1},
            {"route": "hsm.release", "action": "reset", "times": 1},
            {"route": "identity.*", "action": "status", "status": 500, "times": 1},
            {"route": "*", "action": "delay", "seconds": 0.01},
        ],
    }
    procs = Processes(tmp_path / "logs")
    try:
        local, info = await asyncio.to_thread(
            start_local, procs, tmp_path / "state", faults=plan, sidecar=True
        )
        started = time.monotonic()
        async with (
            aiohttp.ClientSession(base_url=info["sidecar"]) as client,
            client.post(
                "/key/release", data='{"kid": "demo-ec"}', headers={"X-Request-Id": "via-skr-local"}
            ) as resp,
        ):
            status, body = resp.status, await resp.json()
        assert status == 200, (body, local.describe())
        assert time.monotonic() - started >= 1.0  # the plan was in force: its Retry-After was waited out
        assert json.loads(body["key"])["kty"] == "EC"
        assert len(granted_releases(tmp_path / "state" / "audit.log", "via-skr-local")) == 1

        started = time.monotonic()
        local.send(signal.SIGINT)
        code = await asyncio.to_thread(local.wait, 10)
        assert code == 0, local.describe()
        assert time.monotonic() - started < 5
        assert "skr local stopped" in local.stderr()
        assert "Traceback" not in local.stderr() + local.stdout()
    finally:
        procs.close()
