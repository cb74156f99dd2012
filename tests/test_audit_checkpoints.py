"""Hardware-signed checkpoints: what an attacker with write access to the log volume can no longer hide.

The log is written by the real writer and checkpointer with the virtual TEE's reports; ``skr audit verify``
is the auditor. Attacks are made by hand with ``hashlib``/``json`` (an independent construction of the
chain), not through our own writer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from skr.audit import AsyncAuditLog, AuditLog
from skr.audit.chain import statement_report_data
from skr.audit.checkpoint import AuditRateLimited, Checkpointer
from skr.audit.proof import ProofOptions, prove_checkpoint
from skr.cli import main
from skr.server import http_status

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors"


def _grant(i: int, outcome: str = "granted") -> dict[str, Any]:
    return {"event": "key.release", "outcome": outcome, "kid": f"key-{i % 2}", "request_id": f"r{i}"}


async def _sealed_log(path: Path, tee: Any, n: int = 7, every: int = 3) -> list[str]:
    """A log of ``n`` releases sealed at start, every ``every`` records and at stop; the stdout copies."""
    copies: list[str] = []
    alog = AsyncAuditLog(AuditLog(path))
    checkpointer = Checkpointer(alog, tee.collect, interval=0, every_records=every, emit=copies.append)
    await checkpointer.start(version="test", evidence_kind="virtual", settings={"token_reuse": True})
    for i in range(n):
        await alog.append(_grant(i, "denied" if i == 2 else "granted"))
        await asyncio.sleep(0.01)  # let a triggered checkpoint run
    await checkpointer.stop()
    await alog.aclose()
    return copies


@pytest.fixture
def ark(tee: Any, tmp_path: Path) -> Path:
    path = tmp_path / "virtual-ark.pem"
    path.write_bytes(tee.ark_certificate.public_bytes(Encoding.PEM))
    return path


@pytest.fixture
def sealed(tee: Any, tmp_path: Path) -> tuple[Path, Path]:
    """(log, file of its stdout checkpoint copies)."""
    path = tmp_path / "audit.jsonl"
    copies = asyncio.run(_sealed_log(path, tee))
    stdout = tmp_path / "stdout.log"
    stdout.write_text("".join(copies))
    return path, stdout


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _rechain(records: list[dict[str, Any]]) -> bytes:
    """What an attacker does after an edit: recompute every prev and hash (independent construction)."""
    prev, out = "0" * 64, []
    for rec in records:
        body = {k: v for k, v in rec.items() if k != "hash"}
        body["prev"] = prev
        prev = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        out.append(json.dumps({**body, "hash": prev}, sort_keys=True, separators=(",", ":")).encode())
    return b"\n".join(out) + b"\n"


def _verify(capsys: Any, *args: str) -> tuple[int, str, str]:
    code = main(["audit", "verify", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the checkpoints themselves ----------------------------------------------------------------------------


def test_checkpoints_are_written_at_start_every_n_records_and_at_stop(sealed):
    path, stdout = sealed
    records = _records(path)
    events = [r["event"] for r in records]
    assert events[:2] == ["audit.checkpoint", "audit.start"]
    assert events[-2:] == ["audit.stop", "audit.checkpoint"]
    assert events.count("audit.checkpoint") >= 4  # start, two record-count triggers, stop
    assert records[-2]["counts"] == {"granted": 6, "denied": 1, "error": 0}
    checkpoints = [r for r in records if r["event"] == "audit.checkpoint"]
    for cp in checkpoints:
        covered = next((r for r in records if r["seq"] == cp["covers_seq"]), None)
        assert cp["head"] == (covered["hash"] if covered else "0" * 64)
        report = base64.b64decode(cp["evidence"]["report"])
        stmt = {k: cp[k] for k in ("covers_seq", "head", "instance", "time")}
        canonical = json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()
        assert report[0x50:0x90] == hashlib.sha512(canonical).digest()  # REPORT_DATA, independently
    # the stdout copies are the same records, one JSON line each
    copies = [json.loads(line)["skr_audit_checkpoint"] for line in stdout.read_text().splitlines()]
    assert copies == checkpoints


def test_a_virtual_checkpoint_verifies_with_its_ark_and_says_virtual(sealed, ark, capsys):
    path, _ = sealed
    code, out, err = _verify(capsys, str(path), "--trust-ark", str(ark))
    assert code == 0, err
    last = _records(path)[-1]
    assert f"records 1\N{EN DASH}{last['covers_seq']} sealed by" in out
    sealed_by = sum(r["event"] == "audit.checkpoint" for r in _records(path))
    assert (
        f"sealed by {sealed_by} virtual checkpoints" in out and "1 records after the last checkpoint" in out
    )
    assert "VIRTUAL TEE" in err


def test_a_log_sealed_only_at_its_start_says_no_records_are_sealed_yet(sealed, ark, capsys, tmp_path):
    path, _ = sealed
    start = tmp_path / "start.jsonl"
    start.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:2]))  # checkpoint + audit.start
    code, out, err = _verify(capsys, str(start), "--trust-ark", str(ark))
    assert code == 0, err
    assert "no records sealed yet: 1 virtual checkpoints" in out and "cover only the log's start" in out
    assert "records 1\N{EN DASH}0" not in out


def test_a_virtual_checkpoint_proves_nothing_without_its_ark_and_fails_with_another(sealed, capsys):
    path, _ = sealed
    code, out, err = _verify(capsys, str(path))  # not checked: sealed by nothing, and it says so
    assert code == 0 and "sealed by 0 hardware checkpoints" in out
    assert "VIRTUAL TEE" in err and "--trust-ark" in err
    code, out, _ = _verify(capsys, str(path), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["checkpoints"] == 0 and doc["unverified_checkpoints"] >= 4
    code, _, err = _verify(capsys, str(path), "--expect-host-data", "00" * 32)
    assert code == 1 and "--trust-ark" in err
    code, _, err = _verify(capsys, str(path), "--trust-ark", str(VECTORS / "amd-roots" / "ark_milan.pem"))
    assert code == 1 and "not proven" in err


def test_expected_host_data_and_measurement_are_checked(sealed, ark, tee, capsys):
    path, _ = sealed
    report = base64.b64decode(_records(path)[0]["evidence"]["report"])
    host_data, measurement = report[0xC0:0xE0].hex(), report[0x90:0xC0].hex()
    args = [str(path), "--trust-ark", str(ark), "--expect-measurement", measurement]
    code, out, _ = _verify(capsys, *args, "--expect-host-data", host_data)
    assert code == 0 and host_data in out
    code, _, err = _verify(capsys, *args, "--expect-host-data", "ab" * 32)
    assert code == 1 and "HOST_DATA" in err
    code, _, _ = _verify(capsys, str(path), "--expect-host-data", "zz")
    assert code == 2


def test_a_genuine_snp_report_swapped_into_a_checkpoint_fails_on_the_binding(sealed, ark, capsys):
    path, _ = sealed
    records = _records(path)
    genuine = bytes.fromhex((VECTORS / "snp" / "virtee-sev" / "report_milan.hex").read_text().strip())
    vcek = (VECTORS / "snp" / "virtee-sev" / "vcek_milan.der").read_bytes()
    from cryptography import x509

    vcek_pem = x509.load_der_x509_certificate(vcek).public_bytes(Encoding.PEM)
    chain = vcek_pem + (VECTORS / "snp" / "virtee-sev" / "cert_chain_milan").read_bytes()
    records[-1]["evidence"] = {  # the final checkpoint: no later one covers it
        "provider": "sevguest",
        "report": base64.b64encode(genuine).decode(),
        "vcek_chain": chain.decode(),
    }
    path.write_bytes(_rechain(records))
    code, _, err = _verify(capsys, str(path), "--trust-ark", str(ark))
    assert code == 1
    assert "REPORT_DATA expected" in err and statement_report_data(records[-1]).hex() in err


# --- attacks --------------------------------------------------------------------------------------------


def test_a_rebuilt_history_fails(sealed, ark, capsys):
    path, _ = sealed
    records = _records(path)
    denied = next(i for i, r in enumerate(records) if r.get("outcome") == "denied")
    records[denied]["outcome"] = "granted"
    path.write_bytes(_rechain(records))
    code, _, err = _verify(capsys, str(path), "--trust-ark", str(ark))
    assert code == 1 and "history rewritten" in err
    # the attacker also moves every checkpoint's head to the new hashes: the reports no longer bind
    for rec in records:
        if rec["event"] == "audit.checkpoint" and rec["covers_seq"] >= denied + 1:
            rec["head"] = json.loads(_rechain(records).splitlines()[rec["covers_seq"] - 1])["hash"]
    path.write_bytes(_rechain(records))
    code, _, err = _verify(capsys, str(path), "--trust-ark", str(ark))
    assert code == 1 and "REPORT_DATA" in err


def test_a_deleted_tail_is_detected_with_the_stdout_copies_or_an_anchor(sealed, ark, capsys):
    path, stdout = sealed
    records = path.read_bytes().splitlines(keepends=True)
    last = json.loads(records[-1])
    path.write_bytes(b"".join(records[:-4]))  # the newest records, with the final checkpoint, are gone
    code, _, err = _verify(capsys, str(path), "--trust-ark", str(ark))
    assert code == 0  # the chain alone cannot tell
    code, _, err = _verify(capsys, str(path), "--trust-ark", str(ark), "--checkpoints", str(stdout))
    assert code == 1 and "truncated" in err
    code, _, err = _verify(capsys, str(path), "--anchor", f"{last['seq']}:{last['hash']}")
    assert code == 1 and "truncated" in err
    code, _, _ = _verify(capsys, str(path), "--anchor", "nonsense")
    assert code == 2


def test_an_anchor_noted_earlier_matches_an_intact_log(sealed, ark, capsys):
    path, stdout = sealed
    third = _records(path)[2]
    args = [
        "--trust-ark",
        str(ark),
        "--checkpoints",
        str(stdout),
        "--anchor",
        f"{third['seq']}:{third['hash']}",
    ]
    code, out, err = _verify(capsys, str(path), *args)
    assert code == 0, err
    assert "1 anchor(s) matched" in out


def test_a_mixed_container_log_is_verified_and_its_other_lines_counted(sealed, ark, tmp_path, capsys):
    path, stdout = sealed
    lines = path.read_bytes().splitlines()
    copies = stdout.read_bytes().splitlines()
    stream = [b'{"level":"info","msg":"skr sidecar listening","address":"127.0.0.1:8080"}', b"plain text"]
    for i, line in enumerate(lines):
        stream.append(b"2026-01-02T03:04:05.123456789Z " + line if i % 2 else line)
        if i == 3:
            stream.append(copies[0])
    mixed = tmp_path / "kubectl-logs.txt"
    mixed.write_bytes(b"\n".join(stream) + b"\n")
    code, out, err = _verify(capsys, str(mixed), "--trust-ark", str(ark))
    assert code == 0, err
    assert "2 line(s) that are not audit records were skipped" in out
    assert main(["audit", "show", str(mixed), "--event", "audit.start", "--format", "json"]) == 0
    assert [json.loads(x)["event"] for x in capsys.readouterr().out.splitlines()] == ["audit.start"]


# --- the statement GET /audit/head answers ------------------------------------------------------------


async def test_a_head_statement_binds_the_current_head_and_is_rate_limited(tee, tmp_path):
    alog = AsyncAuditLog(AuditLog(tmp_path / "audit.jsonl"))
    checkpointer = Checkpointer(alog, tee.collect, interval=0, every_records=0)
    record = await alog.append(_grant(1))
    stmt = await checkpointer.head_statement()
    assert (stmt["covers_seq"], stmt["head"], stmt["instance"]) == (1, record["hash"], alog.instance)
    proof = prove_checkpoint(stmt, ProofOptions(trusted_arks=[tee.ark_certificate]))
    assert proof.virtual and proof.covers_seq == 1
    with pytest.raises(AuditRateLimited) as limited:
        await checkpointer.head_statement()
    assert http_status(limited.value) == 429 and limited.value.code == "rate_limited"
    assert alog.head[0] == 1  # nothing was written
    await alog.aclose()


def test_a_container_log_of_two_runs_is_verified_one_run_at_a_time(tee, ark, tmp_path, capsys):
    """ACI without a volume: a restarted container starts a new chain; its stdout holds both runs."""
    first, second = tmp_path / "run1.jsonl", tmp_path / "run2.jsonl"
    asyncio.run(_sealed_log(first, tee, n=2))
    asyncio.run(_sealed_log(second, tee, n=3))
    exported = tmp_path / "container-log.txt"
    noise = b'{"level":"info","msg":"skr sidecar listening"}\n'
    exported.write_bytes(noise + first.read_bytes() + noise + second.read_bytes())
    code, _, err = _verify(capsys, str(exported), "--trust-ark", str(ark))
    assert code == 1 and "a new chain starts here" in err
    instance = _records(second)[0]["instance"]
    assert main(["audit", "show", str(exported), "--instance", instance, "--format", "json"]) == 0
    run = tmp_path / "run.jsonl"
    run.write_text(capsys.readouterr().out)
    assert run.read_bytes() == second.read_bytes()  # the export is byte-identical to the run's own log
    code, out, _ = _verify(capsys, str(run), "--trust-ark", str(ark))
    assert code == 0 and "virtual checkpoints" in out


def test_certificates_are_checked_at_the_time_asked_for(sealed, ark, capsys):
    path, _ = sealed
    code, _, err = _verify(capsys, str(path), "--trust-ark", str(ark), "--at", "2199-01-01T00:00:00Z")
    assert code == 1 and "not proven" in err  # the virtual TEE's certificates have long expired by then
    code, _, _ = _verify(capsys, str(path), "--trust-ark", str(ark), "--at", "someday")
    assert code == 2


def test_a_stream_on_standard_input_is_verified(sealed, ark):
    import subprocess
    import sys

    path, _ = sealed
    stream = b"starting\n" + path.read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "skr.cli", "audit", "verify", "-", "--trust-ark", str(ark)],
        input=stream,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert b"1 line(s) that are not audit records were skipped" in done.stdout


def test_a_stream_that_starts_late_ignores_copies_of_checkpoints_over_records_it_lacks(
    sealed, ark, tmp_path, capsys
):
    """kubectl logs keeps only the newest lines: an early checkpoint copy has nothing to compare with."""
    path, stdout = sealed
    lines = path.read_bytes().splitlines()
    copies = stdout.read_bytes().splitlines()
    start = 6  # the stream begins with record seq 7
    early = [c for c in copies if json.loads(c)["skr_audit_checkpoint"]["covers_seq"] < start + 1]
    assert early
    stream = tmp_path / "late.txt"
    stream.write_bytes(b"\n".join([b'{"msg":"rotated"}', *early, *lines[start:], *copies]) + b"\n")
    code, out, err = _verify(capsys, str(stream), "--trust-ark", str(ark))
    assert code == 0, err
    assert f"records {start + 1}\N{EN DASH}" in out


async def test_a_slow_first_report_does_not_hold_the_sidecar_back(tee, tmp_path, monkeypatch):
    import skr.audit.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "START_SEAL_TIMEOUT", 0.1)
    release = asyncio.Event()

    async def slow_collect(report_data: bytes) -> Any:
        await release.wait()  # collateral still being fetched
        return await tee.collect(report_data)

    alog = AsyncAuditLog(AuditLog(tmp_path / "audit.jsonl"))
    checkpointer = Checkpointer(alog, slow_collect, interval=0, every_records=0)
    await asyncio.wait_for(checkpointer.start(version="t", evidence_kind="virtual", settings={}), 5)
    release.set()
    await checkpointer.stop()
    await alog.aclose()
    events = [r["event"] for r in _records(tmp_path / "audit.jsonl")]
    assert events[0] == "audit.start" and "audit.checkpoint" in events  # the seal finished later
    assert events[-2:] == ["audit.stop", "audit.checkpoint"]
