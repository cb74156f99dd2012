"""The audit trail of a running sidecar (the local stack, in process): start and stop records, checkpoints,
``GET /audit/head``, and what the records say about each release."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from skr.audit.proof import ProofOptions, prove_checkpoint
from skr.cli import main
from tests.e2e import post, stack_session
from tests.sidecars import audit_records

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _ark(stack: Any, directory: Path) -> Path:
    path = directory / "ark.pem"
    path.write_bytes(stack.runtime.service.trusted_arks[0].public_bytes(Encoding.PEM))
    return path


async def test_the_log_starts_by_sealing_the_previous_head_then_says_who_started(env):
    stack, _ = env
    records = audit_records(stack.options.audit_log)
    assert [r["event"] for r in records[:2]] == ["audit.checkpoint", "audit.start"]
    checkpoint, start = records[:2]
    assert checkpoint["covers_seq"] == 0 and checkpoint["instance"] == start["instance"]
    assert start["evidence_kind"] == "virtual" and start["host_data"] == stack.info["host_data"]
    assert start["settings"]["token_reuse"] is True and len(start["settings_sha256"]) == 64


async def test_audit_head_answers_a_statement_that_proves_the_current_head(env):
    stack, client = env
    status, _ = await post(client, "/key/release", {"kid": "demo-oct"})
    assert status == 200
    await asyncio.sleep(1.0)  # one statement per second
    async with client.get("/audit/head") as resp:
        assert resp.status == 200
        statement = await resp.json()
    last = audit_records(stack.options.audit_log)[-1]
    assert (statement["covers_seq"], statement["head"]) == (last["seq"], last["hash"])
    proof = prove_checkpoint(statement, ProofOptions(trusted_arks=stack.runtime.service.trusted_arks))
    assert proof.virtual and proof.host_data == stack.info["host_data"]
    async with client.get("/audit/head") as resp:
        assert resp.status == 429 and (await resp.json())["code"] == "rate_limited"
    assert audit_records(stack.options.audit_log)[-1] == last  # a statement is not written


async def test_a_second_sidecar_on_the_same_log_refuses_to_start(env):
    stack, _ = env
    from skr.daemon import open_audit

    with pytest.raises(Exception) as refused:
        open_audit(stack.runtime.settings)
    assert getattr(refused.value, "code", None) == "config_invalid"
    assert "already being written by pid" in str(refused.value)


async def test_the_stopped_log_verifies_with_the_virtual_ark(tmp_path):
    async for stack, client in stack_session(tmp_path / "state"):
        path = stack.options.audit_log
        for _ in range(3):
            assert (await post(client, "/key/release", {"kid": "demo-oct"}))[0] == 200
        ark = _ark(stack, tmp_path)
    records = audit_records(path)
    assert [r["event"] for r in records[-2:]] == ["audit.stop", "audit.checkpoint"]
    assert records[-2]["counts"]["granted"] == 3
    code = await asyncio.to_thread(main, ["audit", "verify", str(path), "--trust-ark", str(ark), "--json"])
    assert code == 0


async def test_audit_head_is_not_there_without_an_audit_log(env):
    stack, _ = env
    from tests.sidecars import extra_sidecar

    async with (
        extra_sidecar(stack, audit_log=None) as (_, base),
        aiohttp.ClientSession(base_url=base) as client,
        client.get("/audit/head") as resp,
    ):
        assert resp.status == 404 and (await resp.json())["code"] == "audit_disabled"


# --- what the records say -----------------------------------------------------------------------------


async def test_a_denial_says_why_and_what_the_vault_answered(env):
    stack, client = env
    status, body = await post(
        client, "/key/release", {"kid": "demo-denied"}, headers={"X-Request-Id": "why-1"}
    )
    assert status == 403
    (record,) = audit_records(stack.options.audit_log, "why-1")
    assert record["outcome"] == "denied" and record["upstream_status"] == 403
    assert record["reason"] == body["error"][:512] and "x-ms-" in record["reason"]
    assert "eyJ" not in record["reason"]  # never a token
    assert record["identity"] in ("managed", "workload") and "client_token_id" not in record


async def test_a_release_with_the_callers_own_access_token_says_identity_request(env):
    stack, client = env
    body = {"kid": "demo-oct", "access_token": "not-a-valid-token"}
    status, _ = await post(client, "/key/release", body, headers={"X-Request-Id": "own-token"})
    assert status != 200
    (record,) = audit_records(stack.options.audit_log, "own-token")
    assert record["identity"] == "request" and record["upstream_status"] == 401
    assert "not-a-valid-token" not in json.dumps(record)


async def test_each_release_names_the_client_token_it_came_with(env, tmp_path):
    from tests.sidecars import extra_sidecar

    stack, _ = env
    tokens = tmp_path / "tokens"
    app_token, monitor_token = "a" * 24, "m" * 24
    tokens.write_text(f"app:{app_token}\nmonitor:{monitor_token}\n")
    from skr.config import read_client_tokens

    named = read_client_tokens(tokens)
    async with (
        extra_sidecar(stack, client_token=app_token, client_tokens=named) as (runtime, base),
        aiohttp.ClientSession(base_url=base) as client,
    ):
        for token, rid in ((app_token, "from-app"), (monitor_token, "from-monitor")):
            headers = {"Authorization": f"Bearer {token}", "X-Request-Id": rid}
            assert (await post(client, "/key/release", {"kid": "demo-oct"}, headers=headers))[0] == 200
        status, _ = await post(
            client, "/key/release", {"kid": "demo-oct"}, headers={"Authorization": "Bearer x"}
        )
        assert status == 401
        async with client.get("/audit/head") as resp:  # the client token applies to /audit/head too
            assert resp.status == 401
        async with client.get("/audit/head", headers={"Authorization": f"Bearer {monitor_token}"}) as resp:
            assert resp.status == 200 and (await resp.json())["covers_seq"] > 0
        path = runtime.settings.audit_log
    assert path is not None
    assert [r["client_token_id"] for r in audit_records(path, "from-app")] == ["app"]
    assert [r["client_token_id"] for r in audit_records(path, "from-monitor")] == ["monitor"]
    assert app_token not in path.read_text() and monitor_token not in path.read_text()


async def test_the_sidecars_attestation_token_names_the_audit_head_of_its_moment(env):
    stack, client = env
    service = stack.runtime.service
    service.attestations.tokens.clear()  # the next release attests afresh
    before = service.audit.head
    assert (await post(client, "/key/release", {"kid": "demo-oct"}))[0] == 200
    (attestation,) = service.attestations.tokens.values()
    named = attestation.claims["x-ms-runtime"]["skr-audit"]
    assert named == {"seq": before[0], "head": before[1], "instance": service.audit.instance}
    assert attestation.claims["x-ms-runtime"]["keys"][0]["kid"] == attestation.key.kid


async def test_the_record_count_setting_reaches_the_running_sidecar(env):
    from tests.sidecars import extra_sidecar

    stack, _ = env
    async with (
        extra_sidecar(stack, audit_checkpoint_records=2, audit_checkpoint_interval=0) as (runtime, base),
        aiohttp.ClientSession(base_url=base) as client,
    ):
        for _ in range(4):
            assert (await post(client, "/key/release", {"kid": "demo-oct"}))[0] == 200
        await asyncio.sleep(0.2)  # a triggered checkpoint is written off the request path
        path = runtime.settings.audit_log
        assert path is not None
    events = [r["event"] for r in audit_records(path)]  # after the sidecar stopped
    between = events[2 : events.index("audit.stop")]  # after the start checkpoint and audit.start
    assert between.count("audit.checkpoint") >= 2
