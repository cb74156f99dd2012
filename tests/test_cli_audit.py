import json
import subprocess
import sys

from skr.audit import AuditLog
from skr.cli import main


def _log(path, n=3):
    log = AuditLog(path)
    for i in range(n):
        log.append({"event": "key.release", "outcome": "granted" if i % 2 == 0 else "denied", "kid": f"k{i}"})
    log.close()


def test_verify_intact_exits_0(tmp_path, capsys):
    path = tmp_path / "a.log"
    _log(path)
    assert main(["audit", "verify", str(path)]) == 0
    assert "intact: 3 records" in capsys.readouterr().out


def test_verify_tampered_exits_1_naming_the_record(tmp_path, capsys):
    path = tmp_path / "a.log"
    _log(path)
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[1]
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2 (seq 3)" in err and "deleted" in err


def test_verify_json(tmp_path, capsys):
    path = tmp_path / "a.log"
    _log(path)
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["audit", "verify", "--json", str(path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["intact"] is False and doc["finding"]["kind"] == "truncated_tail"


def test_show_filters(tmp_path, capsys):
    path = tmp_path / "a.log"
    _log(path, 4)
    assert main(["audit", "show", str(path), "--outcome", "denied", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["kid"] for r in rows] == ["k1", "k3"]
    assert main(["audit", "show", str(path), "--kid", "k2"]) == 0
    out = capsys.readouterr().out
    assert "k2" in out and "k1" not in out and "1 record(s)" in out
    assert main(["audit", "show", str(path), "--since", "2999-01-01T00:00:00Z", "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_missing_file_and_bad_since_are_one_line_errors(tmp_path, capsys):
    assert main(["audit", "verify", str(tmp_path / "nope.log")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    path = tmp_path / "a.log"
    _log(path)
    assert main(["audit", "show", str(path), "--since", "yesterday"]) == 2


def test_cli_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "skr.cli", "audit", "verify", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("skr: ")


# --- show and summary (issue 12) -------------------------------------------------------------------------


def _two_runs(path):
    """Two sidecar runs: each starts with audit.start naming its instance."""
    log = AuditLog(path)
    for instance, outcomes in (("run-a", ["granted", "denied"]), ("run-b", ["granted", "error", "granted"])):
        log.append({"event": "audit.start", "instance": instance, "version": "t"})
        for i, outcome in enumerate(outcomes):
            log.append(
                {
                    "event": "key.release",
                    "outcome": outcome,
                    "kid": "k-a" if i % 2 == 0 else "k-b",
                    "host_data": "ab" * 32 if instance == "run-a" else "cd" * 32,
                    "reason": "=cmd|' /C calc'!A0" if outcome == "denied" else None,
                }
            )
    log.close()


def test_show_filters_by_event_instance_and_until(tmp_path, capsys):
    path = tmp_path / "a.log"
    _two_runs(path)
    assert main(["audit", "show", str(path), "--instance", "run-b", "--event", "key.release", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["outcome"] for r in rows] == ["granted", "error", "granted"]
    assert main(["audit", "show", str(path), "--until", "2000-01-01T00:00:00Z", "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "show", str(path), "--until", "tomorrow"]) == 2


def test_show_writes_csv_that_a_spreadsheet_will_not_execute(tmp_path, capsys):
    import csv
    import io

    path = tmp_path / "a.log"
    _two_runs(path)
    assert main(["audit", "show", str(path), "--outcome", "denied", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["kid"] == "k-b" and rows[0]["outcome"] == "denied"
    assert rows[0]["reason"].startswith("'=")  # a formula is shown as text


def test_summary_counts_per_key_with_times_and_host_data(tmp_path, capsys):
    path = tmp_path / "a.log"
    _two_runs(path)
    assert main(["audit", "summary", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["k-a"]["granted"] == 3 and doc["k-a"]["denied"] == 0
    assert (doc["k-b"]["denied"], doc["k-b"]["error"]) == (1, 1)
    assert doc["k-a"]["host_data"] == ["ab" * 32, "cd" * 32]
    assert doc["k-a"]["first"] <= doc["k-a"]["last"]
    assert main(["audit", "summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["KID", "GRANTED", "DENIED", "ERROR", "FIRST", "LAST", "HOST_DATA"]
    assert "2 key(s)" in out


def test_rotated_files_given_in_any_order_verify_by_seq(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=300)
    for i in range(6):
        log.append({"event": "key.release", "outcome": "granted", "kid": f"k{i}"})
    log.close()
    files = sorted(str(p) for p in tmp_path.glob("audit.jsonl*"))  # the hidden lock file is not matched
    assert len(files) > 2
    assert main(["audit", "verify", *reversed(files)]) == 0
    assert "intact: 6 records" in capsys.readouterr().out
