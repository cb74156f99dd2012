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
