"""Nothing lost: the audit log survives a SIGKILL of the daemon in the middle of a burst (issue 7).

The sidecar is a real ``skr serve`` process against ``skr local --no-sidecar`` (so killing the daemon
leaves the upstreams running, as in a pod). The test chooses every request's X-Request-Id, so it can
match what the app saw with what the log holds:

- every release the app saw granted (HTTP 200) has a granted record — the record is fsynced before the
  answer is sent;
- after the kill the chain verifies (``skr audit verify`` exit 0);
- a torn last line (a crash during a write) is reported as ``truncated_tail``, distinct from tampering,
  and the restarted daemon cuts it off, records ``audit.recovered`` and continues the same chain.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import Proc, Processes, skr_cli, start_local, start_serve

BURST_WORKERS = 12
KILL_AFTER_GRANTED = 30
# a little latency in the key service keeps a dozen releases in flight at any moment
FAULTS = {"seed": 5, "rules": [{"route": "hsm.release", "action": "delay", "seconds": 0.05}]}


@pytest.fixture
def procs(tmp_path):
    processes = Processes(tmp_path / "logs")
    yield processes
    processes.close()


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _granted_ids(records: list[dict[str, Any]]) -> set[str]:
    return {
        r["request_id"] for r in records if r.get("event") == "key.release" and r.get("outcome") == "granted"
    }


def _verify(path: Path) -> tuple[int, dict[str, Any]]:
    done = skr_cli("audit", "verify", "--json", str(path))
    assert "Traceback" not in done.stderr
    return done.returncode, json.loads(done.stdout)


async def _burst(base: str, prefix: str, until: asyncio.Event, on_granted: Any = None) -> dict[str, Any]:
    """Releases from BURST_WORKERS concurrent clients until ``until`` is set; request id → status or error."""
    outcomes: dict[str, Any] = {}

    async def worker(client: aiohttp.ClientSession, w: int) -> None:
        n = 0
        while not until.is_set():
            request_id = f"{prefix}-{w:02d}-{n:04d}"
            n += 1
            try:
                async with client.post(
                    "/key/release", data='{"kid": "demo-oct"}', headers={"X-Request-Id": request_id}
                ) as resp:
                    body = await resp.json()
                    outcomes[request_id] = resp.status
                    if resp.status == 200:
                        assert "key" in body
                        if on_granted is not None:
                            on_granted(outcomes)
            except aiohttp.ClientError as exc:
                outcomes[request_id] = type(exc).__name__

    async with aiohttp.ClientSession(base_url=base) as client:
        await asyncio.gather(*(worker(client, w) for w in range(BURST_WORKERS)))
    return outcomes


async def test_sigkill_mid_burst_loses_no_granted_release_and_a_torn_tail_is_recovered(tmp_path, procs):
    state, audit = tmp_path / "state", tmp_path / "audit.log"
    local, info = await asyncio.to_thread(start_local, procs, state, faults=FAULTS)
    first, base = await asyncio.to_thread(start_serve, procs, state, info, args=["--audit-log", str(audit)])

    # 1. a burst; SIGKILL once KILL_AFTER_GRANTED releases were answered 200, with more in flight
    stop = asyncio.Event()

    def kill_when_enough(outcomes: dict[str, Any]) -> None:
        if not stop.is_set() and sum(s == 200 for s in outcomes.values()) >= KILL_AFTER_GRANTED:
            first.send(signal.SIGKILL)
            stop.set()

    outcomes = await asyncio.wait_for(_burst(base, "one", stop, kill_when_enough), timeout=20)
    assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL
    seen_granted = {rid for rid, status in outcomes.items() if status == 200}
    cut_off = {rid for rid, status in outcomes.items() if status != 200}
    assert len(seen_granted) >= KILL_AFTER_GRANTED
    assert cut_off, "the kill should have caught releases in flight"
    assert all(isinstance(outcomes[rid], str) for rid in cut_off)  # cut off by the kill, no error answers

    # 2. the chain as the kill left it: intact, and every release the app saw granted is in it
    code, result = await asyncio.to_thread(_verify, audit)
    assert code == 0 and result["intact"], result
    before = _records(audit)
    assert seen_granted <= _granted_ids(before), sorted(seen_granted - _granted_ids(before))

    # 3. a torn last line (what a crash during write() leaves): truncated tail, not tampering
    fragment = b'{"attestation":"cached","client":"127.0.0.1","duration_ms":12.5,"event":"key.rel'
    audit.write_bytes(audit.read_bytes() + fragment)
    code, result = await asyncio.to_thread(_verify, audit)
    assert code == 1 and result["finding"]["kind"] == "truncated_tail", result
    assert result["records"] == len(before)
    tampered = tmp_path / "tampered.log"
    shutil.copy(audit, tampered)
    lines = tampered.read_bytes().split(b"\n")
    lines[len(lines) // 2] = lines[len(lines) // 2].replace(b'"kid":"demo-oct"', b'"kid":"demo-rsa"', 1)
    tampered.write_bytes(b"\n".join(lines))
    code, result = await asyncio.to_thread(_verify, tampered)
    assert code == 1 and result["finding"]["kind"] == "tampered", result

    # 4. restart on the same log: the tail is cut, the cut recorded, the chain continues
    second, base = await asyncio.to_thread(start_serve, procs, state, info, args=["--audit-log", str(audit)])
    recovered = _records(audit)[len(before)]
    assert recovered["event"] == "audit.recovered" and recovered["truncated_bytes"] == len(fragment)
    assert recovered["seq"] == before[-1]["seq"] + 1 and recovered["prev"] == before[-1]["hash"]

    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.0, stop.set)
    again = await asyncio.wait_for(_burst(base, "two", stop), timeout=20)
    assert again and set(again.values()) == {200}
    await _stop(second)

    # 5. the whole log — before the kill, the recovery, after the restart — verifies
    code, result = await asyncio.to_thread(_verify, audit)
    assert code == 0 and result["intact"], result
    after = _records(audit)
    assert result["records"] == len(after) and after[-1]["seq"] == len(after)
    assert seen_granted | set(again) <= _granted_ids(after)
    assert b'"key"' not in audit.read_bytes()
    local.send(signal.SIGTERM)
    assert await asyncio.to_thread(local.wait, 10) == 0


async def _stop(proc: Proc) -> None:
    started = time.monotonic()
    proc.send(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0, proc.describe()
    assert time.monotonic() - started < 5


# --- a full audit volume (issue 12) ----------------------------------------------------------------------


@pytest.fixture
def small_volume(tmp_path):
    """A 1 MiB tmpfs for the audit log (needs root; skipped elsewhere)."""
    volume = tmp_path / "volume"
    volume.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(volume)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    yield volume
    subprocess.run(["umount", "-l", str(volume)], capture_output=True, check=False)


def _fill(volume: Path) -> Path:
    filler = volume / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: the volume is full
    finally:
        os.close(fd)
    return filler


async def _releases(base: str, prefix: str, n: int) -> dict[str, tuple[int, dict[str, Any]]]:
    answers: dict[str, tuple[int, dict[str, Any]]] = {}
    async with aiohttp.ClientSession(base_url=base) as client:
        for i in range(n):
            request_id = f"{prefix}-{i:03d}"
            async with client.post(
                "/key/release", data='{"kid": "demo-oct"}', headers={"X-Request-Id": request_id}
            ) as resp:
                answers[request_id] = (resp.status, await resp.json())
    return answers


async def test_a_full_audit_volume_refuses_releases_and_the_chain_continues_when_space_returns(
    tmp_path, procs, small_volume
):
    state, audit = tmp_path / "state", small_volume / "audit.jsonl"
    local, info = await asyncio.to_thread(start_local, procs, state)
    serve, base = await asyncio.to_thread(start_serve, procs, state, info, args=["--audit-log", str(audit)])

    before = await _releases(base, "before", 5)
    filler = await asyncio.to_thread(_fill, small_volume)
    full = await _releases(base, "full", 40)
    filler.unlink()  # space returns
    after = await _releases(base, "after", 5)
    await _stop(serve)

    refused = {rid: body for rid, (status, body) in full.items() if status != 200}
    assert refused, "the full volume should have refused some releases"
    for body in refused.values():
        assert body["code"] == "audit_failed" and "key" not in body
    assert {status for status, _ in (*before.values(), *after.values())} == {200}

    code, result = await asyncio.to_thread(_verify, audit)
    assert code == 0 and result["intact"], result
    records = _records(audit)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # no gap, no replay
    # without --audit-stdout, stdout holds exactly the checkpoint copies, and they match the log
    copies = [json.loads(line)["skr_audit_checkpoint"] for line in serve.stdout().splitlines()]
    assert copies == [r for r in records if r["event"] == "audit.checkpoint"] and len(copies) >= 2
    done = await asyncio.to_thread(
        skr_cli, "audit", "verify", str(audit), "--checkpoints", str(serve.stdout_path)
    )
    assert done.returncode == 0, done.stderr
    received = {rid for rid, (status, _) in {**before, **full, **after}.items() if status == 200}
    granted = [
        r["request_id"] for r in records if r.get("event") == "key.release" and r["outcome"] == "granted"
    ]
    assert sorted(granted) == sorted(received)  # one granted record per key the app received, no more
    local.send(signal.SIGTERM)
    assert await asyncio.to_thread(local.wait, 10) == 0
