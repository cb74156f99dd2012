"""The audit log as an auditor relies on it: every change to the file is detected and located."""

import asyncio
import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest

from skr.audit import (
    GENESIS,
    AsyncAuditLog,
    AuditLog,
    chain_files,
    read_records,
    token_fingerprint,
    verify_chain,
)
from skr.errors import AuditError


def _grant(i: int) -> dict[str, str]:
    return {"event": "key.release", "outcome": "granted", "kid": f"key-{i}", "request_id": f"r{i}"}


def _write(path: Path, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append(_grant(i))
    log.close()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_record_hash_is_sha256_of_canonical_json_without_hash(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 2)
    first, second = (json.loads(x) for x in _lines(path))
    body = {k: v for k, v in first.items() if k != "hash"}
    # independent construction of the canonical form
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert first["hash"] == expected
    assert first["prev"] == GENESIS and first["seq"] == 1
    assert second["prev"] == first["hash"] and second["seq"] == 2
    assert first["ts"].endswith("Z")
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_intact_log_verifies(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 5)
    result = verify_chain([path])
    assert result.intact and result.records == 5 and result.last_seq == 5


def test_edited_line_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 4)
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"granted"', b'"denied"')
    path.write_bytes(b"".join(lines))
    finding = verify_chain([path]).finding
    assert finding is not None and finding.line == 3 and finding.kind == "tampered"
    assert "hash" in finding.reason


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 4)
    lines = _lines(path)
    rec = json.loads(lines[1])
    rec["kid"] = "other"
    body = {k: v for k, v in rec.items() if k != "hash"}
    rec["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    finding = verify_chain([path]).finding
    assert finding is not None and finding.line == 3 and "prev" in finding.reason


def test_deleted_line_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 4)
    lines = _lines(path)
    del lines[1]
    path.write_bytes(b"".join(lines))
    finding = verify_chain([path]).finding
    assert finding is not None and finding.line == 2 and "deleted" in finding.reason


def test_deleted_first_line_is_detected(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 3)
    path.write_bytes(b"".join(_lines(path)[1:]))
    finding = verify_chain([path]).finding
    assert finding is not None and finding.line == 1


def test_reordered_lines_are_detected(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 4)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    finding = verify_chain([path]).finding
    assert finding is not None and finding.line == 2 and finding.kind == "tampered"


def test_torn_last_line_is_a_truncated_tail_not_tampering(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 3)
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # cut inside the last record
    finding = verify_chain([path]).finding
    assert finding is not None and finding.kind == "truncated_tail" and finding.line == 3


def test_restart_after_torn_tail_recovers_and_continues_the_chain(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 3)
    data = path.read_bytes()
    path.write_bytes(data + b'{"event":"key.rel')  # a crash mid-write
    log = AuditLog(path)
    log.append(_grant(9))
    log.close()
    result = verify_chain([path])
    assert result.intact
    records = list(read_records([path]))
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["event"] == "audit.recovered" and records[3]["truncated_bytes"] == 17
    assert records[4]["kid"] == "key-9"


def test_restart_continues_the_chain(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 2)
    _write(path, 2)
    result = verify_chain([path])
    assert result.intact and result.last_seq == 4


def test_restart_refuses_to_append_to_an_edited_tail(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 2)
    path.write_bytes(path.read_bytes() + b"garbage\n")
    with pytest.raises(AuditError):
        AuditLog(path)


def test_rotation_keeps_one_chain_across_files(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=600)
    for i in range(12):
        log.append(_grant(i))
    log.close()
    files = chain_files(path)
    assert len(files) > 2
    result = verify_chain(files)
    assert result.intact and result.last_seq == 12
    # a restart after rotation continues from the rotated file
    log = AuditLog(path, max_bytes=600)
    log.append(_grant(99))
    log.close()
    assert verify_chain(chain_files(path)).last_seq == 13
    # dropping a rotated file in the middle is detected
    broken = [f for i, f in enumerate(chain_files(path)) if i != 1]
    assert not verify_chain(broken).intact


def test_fields_outside_the_schema_are_refused(tmp_path):
    log = AuditLog(tmp_path / "a.log")
    with pytest.raises(AuditError):
        log.append({"event": "key.release", "outcome": "granted", "access_token": "secret"})
    with pytest.raises(AuditError):
        log.append({"event": "key.release", "outcome": "maybe"})
    log.close()


def test_token_fingerprint_is_sha256():
    assert token_fingerprint("abc") == hashlib.sha256(b"abc").hexdigest()


async def test_async_log_group_commits_concurrent_appends_in_order(tmp_path):
    path = tmp_path / "audit.log"
    alog = AsyncAuditLog(AuditLog(path))
    records = await asyncio.gather(*(alog.append(_grant(i)) for i in range(50)))
    await alog.aclose()
    assert sorted(r["seq"] for r in records) == list(range(1, 51))
    assert verify_chain([path]).records == 50


# --- start-up reads the tail only -----------------------------------------------------------------------


def _big_log_then(path: Path, tail: bytes, *, filler_bytes: int = 8 << 20) -> None:
    """A valid log of 3 records, with megabytes of earlier history in front (only the tail is read)."""
    _write(path, 3)
    records = path.read_bytes()
    line = b"x" * 1023 + b"\n"
    path.write_bytes(line * (filler_bytes // len(line)) + records + tail)


@pytest.mark.parametrize(
    "tail", [b"", b'{"event":"key.rel', b"y" * (200 * 1024)], ids=["clean", "torn", "long-torn"]
)
def test_restart_reads_only_the_tail_of_a_large_log(tmp_path, tail):
    path = tmp_path / "audit.log"
    _big_log_then(path, tail)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        log = AuditLog(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    log.append(_grant(9))
    log.close()
    assert peak < 1 << 20, f"opening a {size >> 20} MiB log allocated {peak >> 10} KiB"
    records = path.read_bytes().splitlines()[-2 if tail else -1 :]
    last = json.loads(records[-1])
    assert last["kid"] == "key-9" and last["seq"] == (5 if tail else 4)
    if tail:
        assert json.loads(records[0])["truncated_bytes"] == len(tail)


def test_last_record_split_across_read_blocks_is_found(tmp_path):
    """Records straddling the 64 KiB read blocks: the chain continues from the true last record."""
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(700):  # ~170 KiB: several blocks, boundaries inside records
        log.append(_grant(i))
    log.close()
    for cut in range(0, 400, 37):  # shift the block boundaries against the records
        shifted = tmp_path / f"shifted-{cut}.log"
        shifted.write_bytes(b"z" * cut + b"\n" + path.read_bytes())
        reopened = AuditLog(shifted)
        assert (reopened.last_seq, reopened.last_hash) == (700, verify_chain([path]).last_hash)
        reopened.close()


def test_an_enormous_last_line_is_refused_as_damage(tmp_path):
    path = tmp_path / "audit.log"
    _write(path, 1)
    path.write_bytes(path.read_bytes() + b"{" + b" " * (2 << 20) + b"}\n")
    with pytest.raises(AuditError, match="not a valid audit record"):
        AuditLog(path)
