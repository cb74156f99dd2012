"""One writer, nothing lost: the lock, safe opening, and all-or-nothing batches on a full volume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from skr.audit import AuditLog, chain_files, read_records, verify_chain
from skr.errors import AuditError
from tests.test_audit import _grant, _write

# --- one writer -----------------------------------------------------------------------------------------


def test_a_second_writer_in_another_process_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "audit.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from skr.audit import AuditLog; log = AuditLog(sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(AuditError) as refused:
            AuditLog(path)
        assert refused.value.code == "config_invalid"
        assert f"pid {holder.pid}" in refused.value.message
    finally:
        holder.communicate("", timeout=10)
    # once the holder is gone the log opens again and continues its chain
    log = AuditLog(path)
    log.append(_grant(1))
    log.close()
    assert verify_chain([path]).intact


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    first = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match=f"pid {os.getpid()}"):
        AuditLog(tmp_path / "audit.jsonl")
    first.close()


# --- safe opening (issue 11) ----------------------------------------------------------------------------


def test_a_symlinked_log_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    (tmp_path / "audit.jsonl").symlink_to(target)
    with pytest.raises(AuditError, match="symbolic link"):
        AuditLog(tmp_path / "audit.jsonl")
    assert target.read_bytes() == b"precious\n"


def test_a_dangling_symlink_is_not_followed_to_create_a_file(tmp_path):
    (tmp_path / "audit.jsonl").symlink_to(tmp_path / "created-through-link")
    with pytest.raises(AuditError):
        AuditLog(tmp_path / "audit.jsonl")
    assert not (tmp_path / "created-through-link").exists()


def test_a_symlinked_rotated_file_or_lock_is_refused(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, 1)
    (tmp_path / "audit.jsonl.1").symlink_to(tmp_path / "x")
    with pytest.raises(AuditError, match="not a regular file"):
        AuditLog(path)
    (tmp_path / "audit.jsonl.1").unlink()
    (tmp_path / ".audit.jsonl.lock").unlink()
    (tmp_path / ".audit.jsonl.lock").symlink_to(tmp_path / "y")
    with pytest.raises(AuditError, match="symbolic link"):
        AuditLog(path)
    assert not (tmp_path / "y").exists()


def test_a_directory_or_fifo_is_refused(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(AuditError):
        AuditLog(tmp_path / "dir.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(AuditError, match="not a regular file"):
        AuditLog(tmp_path / "fifo.jsonl")


@pytest.mark.parametrize("content", [b"a config file without newline", b"not an audit log\nat all"])
def test_a_file_that_holds_no_audit_records_is_never_truncated(tmp_path, content):
    path = tmp_path / "important.conf"
    path.write_bytes(content)
    with pytest.raises(AuditError):
        AuditLog(path)
    assert path.read_bytes() == content


def test_a_new_log_is_created_exclusively_with_mode_0600(tmp_path):
    path = tmp_path / "audit.jsonl"
    _write(path, 1)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / ".audit.jsonl.lock").read_text().strip() == str(os.getpid())


# --- canonical lines --------------------------------------------------------------------------------------


def _sha(body: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize(
    "rewrite",
    [
        # a duplicate key: json keeps the last "outcome", a naive reader may show the first
        lambda line: line.replace(b'{"event"', b'{"outcome":"denied","event"', 1),
        lambda line: line.replace(b'","', b'", "', 1),  # extra whitespace
        lambda line: line.replace(b'"key-1"', b'"\\u006bey-1"', 1),  # a needless escape
    ],
    ids=["duplicate-key", "whitespace", "escape"],
)
def test_a_line_that_is_not_canonical_is_tampering_even_with_a_valid_hash(tmp_path, rewrite):
    path = tmp_path / "audit.jsonl"
    _write(path, 3)
    lines = path.read_bytes().splitlines(keepends=True)
    edited = rewrite(lines[1])
    assert edited != lines[1]
    record = json.loads(edited)
    assert record["hash"] == _sha({k: v for k, v in record.items() if k != "hash"})  # the hash still fits
    lines[1] = edited
    path.write_bytes(b"".join(lines))
    finding = verify_chain([path]).finding
    assert finding is not None and finding.line == 2 and "canonical" in finding.reason


# --- rotation ------------------------------------------------------------------------------------------


def test_rotation_names_the_newest_rotated_file_1_and_verify_orders_by_seq(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=400)
    for i in range(8):
        log.append(_grant(i))
    log.close()
    rotated = sorted(tmp_path.glob("audit.jsonl.[0-9]*"))
    assert len(rotated) >= 3
    first = {p.name: next(read_records([p]))["seq"] for p in rotated}
    assert first["audit.jsonl.1"] == max(first.values())  # .1 is the newest
    files = chain_files(path)
    assert verify_chain(files).intact
    from skr.audit import order_by_seq

    shuffled = [path, *sorted(rotated)]  # a shell's alphabetical order
    assert order_by_seq(shuffled) == files


# --- a full volume -------------------------------------------------------------------------------------

_FILL = textwrap.dedent(
    """
    import json, resource, sys
    from skr.audit import AuditLog
    from skr.errors import AuditError

    path, limit = sys.argv[1], int(sys.argv[2])
    log = AuditLog(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # the volume is full at `limit` bytes
    granted, failed = [], 0
    for i in range(40):
        try:
            batch = [{"event": "key.release", "outcome": "granted", "kid": f"k{i}-{j}"} for j in range(3)]
            log.append_many(batch)
            granted += [f"k{i}-{j}" for j in range(3)]
        except AuditError as exc:
            assert exc.code == "audit_failed"
            failed += 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space returns
    for i in range(5):
        log.append({"event": "key.release", "outcome": "granted", "kid": f"after-{i}"})
        granted.append(f"after-{i}")
    log.close()
    print(json.dumps({"granted": granted, "failed": failed}))
    """
)


def test_a_full_volume_loses_nothing_and_replays_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", _FILL, str(path), "3000"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    outcome = json.loads(done.stdout)
    assert outcome["failed"] > 0, "the limit should have been hit"
    result = verify_chain([path])
    assert result.intact, result.finding
    records = list(read_records([path]))
    # exactly the acknowledged records, in order, no gap and no replay
    assert [r["kid"] for r in records] == outcome["granted"]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


def test_verify_refuses_a_fifo_without_hanging(tmp_path, capsys):
    from skr.cli import main

    os.mkfifo(tmp_path / "audit.jsonl")
    assert main(["audit", "verify", str(tmp_path / "audit.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("skr: ")
