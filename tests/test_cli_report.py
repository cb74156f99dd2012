"""``skr report show|verify|fetch``: verdicts, exit codes, and one clear line for bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from skr.cli import main
from tests.test_snp_report import case_for
from tests.test_virtual_tee import POLICY, shared_virtual_state

ACI = "snp/aci-confidential-sidecar/snp_report.bin"
ACI_BUNDLE = "snp/aci-confidential-sidecar/uvm_host_amd_certificate.pem"  # VCEK + ASK + ARK
VLEK = "snp/trustee/test-vlek-report.bin"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def tampered(vectors: Path, tmp_path: Path) -> Path:
    raw = bytearray((vectors / ACI).read_bytes())
    raw[0xC0] ^= 0x01  # HOST_DATA
    path = tmp_path / "tampered.bin"
    path.write_bytes(bytes(raw))
    return path


# --- show ------------------------------------------------------------------------------------------


def test_show_reads_hex_text_and_binary_alike(capsys, vectors):
    code_hex, from_hex, _ = run(capsys, "report", "show", str(vectors / "snp/virtee-sev/report_milan.hex"))
    code_bin, from_bin, _ = run(
        capsys, "report", "show", str(vectors / "snp/virtee-sev/report_milan.DERIVED.bin")
    )
    assert code_hex == code_bin == 0
    assert from_hex == from_bin
    assert "0x7308000000000003 (bl=3, tee=0, snp=8, ucode=115)" in from_hex


def test_show_json_is_keyed_by_field_name(capsys, vectors, expected):
    code, out, _ = run(capsys, "report", "show", "--json", str(vectors / VLEK))
    case = case_for(expected, VLEK)
    fields = json.loads(out)
    assert code == 0
    assert fields["version"] == 3 and fields["vmpl"] == 1 and fields["signing_key"] == "vlek"
    assert fields["report_data"] == case["report_data"]
    assert fields["measurement"] == case["measurement"]
    assert fields["reported_tcb"] == {"raw": "0xd918000000000004", "bl": 4, "tee": 0, "snp": 24, "ucode": 217}
    assert [fields["cpuid_fam_id"], fields["cpuid_mod_id"], fields["cpuid_step"]] == case["cpuid"]


def test_show_accepts_hex_text_written_by_hand(capsys, vectors, tmp_path):
    text = tmp_path / "report.txt"
    text.write_text("0x" + (vectors / ACI).read_bytes().hex().upper() + "\n")
    code, out, _ = run(capsys, "report", "show", "--json", str(text))
    assert code == 0
    assert json.loads(out)["host_data"].startswith("cadd74f7")


# --- verify ----------------------------------------------------------------------------------------


def test_verify_genuine_report_with_a_pem_bundle(capsys, vectors):
    code, out, err = run(capsys, "report", "verify", str(vectors / ACI), "--vek", str(vectors / ACI_BUNDLE))
    assert (code, err) == (0, "")
    assert out.startswith("valid: Milan report v2 signed by the VCEK")


def test_verify_with_a_separate_chain_and_expectations(capsys, vectors, expected):
    case = case_for(expected, ACI)
    code, _, err = run(
        capsys,
        "report",
        "verify",
        str(vectors / ACI),
        "--vek",
        str(vectors / case["vek"]),
        "--chain",
        str(vectors / "amd-roots/ask_ark_milan.pem"),
        "--product",
        "milan",
        "--expect-host-data",
        case["host_data"],
        "--expect-report-data",
        case["report_data"][:64],  # the 32-byte hash; the rest is zero padding
    )
    assert (code, err) == (0, "")


def test_vlek_report_is_valid_at_a_pinned_time_and_invalid_now(capsys, vectors):
    argv = ["report", "verify", str(vectors / VLEK), "--vek", str(vectors / "snp/trustee/test-vlek.der")]
    argv += ["--chain", str(vectors / "amd-roots/asvk_ark_milan.pem")]
    code, out, _ = run(capsys, *argv, "--at", "2025-06-01T00:00:00Z", "--json")
    assert code == 0
    verdict = json.loads(out)
    assert verdict["valid"] is True and verdict["vek"]["csp_id"] == "CN=cc-us-east-2.amazonaws.com"
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert "SEV-VLEK is not valid at" in one_line(err)


def test_tampered_report_is_invalid(capsys, vectors, tampered):
    code, _, err = run(capsys, "report", "verify", str(tampered), "--vek", str(vectors / ACI_BUNDLE))
    assert code == 1
    assert one_line(err).startswith("skr: report invalid: the report signature does not verify")


def test_unexpected_host_data_is_invalid_with_json_reason(capsys, vectors):
    argv = ["report", "verify", str(vectors / ACI), "--vek", str(vectors / ACI_BUNDLE)]
    code, out, err = run(capsys, *argv, "--expect-host-data", "00" * 32, "--json")
    assert code == 1
    verdict = json.loads(out)
    assert (verdict["valid"], verdict["code"]) == (False, "report_rejected")
    assert verdict["reason"].startswith("HOST_DATA expected 0000")
    assert "HOST_DATA expected 0000" in one_line(err)


def test_wrong_product_is_invalid(capsys, vectors):
    argv = ["report", "verify", str(vectors / ACI), "--vek", str(vectors / ACI_BUNDLE), "--product", "genoa"]
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert "product mismatch" in one_line(err)


# --- unusable input: exit 2, one line --------------------------------------------------------------


def bad_inputs(vectors: Path, tmp_path: Path) -> dict[str, list[str]]:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\xff" * 100)
    text = tmp_path / "text.txt"
    text.write_text("hello, this is not a report\n")
    report, bundle = str(vectors / ACI), str(vectors / ACI_BUNDLE)
    return {
        "show-missing": ["report", "show", str(tmp_path / "missing.bin")],
        "show-garbage": ["report", "show", str(garbage)],
        "show-text": ["report", "show", str(text)],
        "show-wrong-version": ["report", "show", str(tmp_path / "v9.bin")],
        "verify-garbage-report": ["report", "verify", str(garbage), "--vek", bundle],
        "verify-garbage-vek": ["report", "verify", report, "--vek", str(text)],
        "verify-missing-chain": [
            "report",
            "verify",
            report,
            "--vek",
            bundle,
            "--chain",
            str(tmp_path / "none"),
        ],
        "verify-bad-at": ["report", "verify", report, "--vek", bundle, "--at", "yesterday"],
        "verify-bad-hex": ["report", "verify", report, "--vek", bundle, "--expect-host-data", "xyz"],
        "verify-short-host-data": ["report", "verify", report, "--vek", bundle, "--expect-host-data", "00"],
        "verify-bad-product": ["report", "verify", report, "--vek", bundle, "--product", "naples"],
        "verify-no-vek": ["report", "verify", report],
        "fetch-bad-hex": ["report", "fetch", "--report-data", "zz", "--evidence", "virtual"],
        "fetch-too-long": ["report", "fetch", "--report-data", "00" * 65, "--evidence", "virtual"],
        "fetch-missing-runtime": ["report", "fetch", "--runtime-data", str(tmp_path / "none")],
        "fetch-no-data": ["report", "fetch", "--evidence", "virtual"],
        "fetch-virtual-no-state": [
            "report",
            "fetch",
            "--report-data",
            "01",
            "--evidence",
            "virtual",
            "--security-policy",
            str(text),
        ],
    }


BAD = [
    "show-missing",
    "show-garbage",
    "show-text",
    "show-wrong-version",
    "verify-garbage-report",
    "verify-garbage-vek",
    "verify-missing-chain",
    "verify-bad-at",
    "verify-bad-hex",
    "verify-short-host-data",
    "verify-bad-product",
    "verify-no-vek",
    "fetch-bad-hex",
    "fetch-too-long",
    "fetch-missing-runtime",
    "fetch-no-data",
    "fetch-virtual-no-state",
]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gives_one_line_and_exit_2(capsys, vectors, tmp_path, name):
    v9 = bytearray((vectors / ACI).read_bytes())
    v9[0] = 9
    (tmp_path / "v9.bin").write_bytes(bytes(v9))
    argv = bad_inputs(vectors, tmp_path)[name]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert one_line(err).startswith("skr")


def test_every_bad_input_case_is_exercised(vectors, tmp_path):
    assert sorted(bad_inputs(vectors, tmp_path)) == sorted(BAD)


def test_subprocess_shows_no_traceback(vectors, tmp_path, tampered):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x01" * 10)
    bad = subprocess.run(
        [sys.executable, "-m", "skr.cli", "report", "show", str(garbage)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "found 10 bytes" in one_line(bad.stderr)
    invalid = subprocess.run(
        [
            sys.executable,
            "-m",
            "skr.cli",
            "report",
            "verify",
            str(tampered),
            "--vek",
            str(vectors / ACI_BUNDLE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert invalid.returncode == 1
    assert "report invalid" in one_line(invalid.stderr)


# --- fetch (virtual TEE) ---------------------------------------------------------------------------


def test_fetch_from_the_virtual_tee_then_verify_it(capsys, tmp_path, tmp_path_factory):
    state = shared_virtual_state(tmp_path_factory)
    policy = tmp_path / "policy.rego"
    policy.write_bytes(POLICY)
    runtime = tmp_path / "runtime.json"
    runtime.write_bytes(b'{"keys":[]}')
    out, chain = tmp_path / "report.bin", tmp_path / "chain.pem"
    code, _, _ = run(
        capsys,
        *("report", "fetch", "--runtime-data", str(runtime), "--evidence", "virtual"),
        *("--state-dir", str(state), "--security-policy", str(policy)),
        *("--out", str(out), "--chain-out", str(chain)),
    )
    assert code == 0 and out.stat().st_size == 1184
    host_data = hashlib.sha256(POLICY).hexdigest()
    report_data = hashlib.sha256(b'{"keys":[]}').hexdigest()
    verify = ["report", "verify", str(out), "--vek", str(chain), "--expect-host-data", host_data]
    verify += ["--expect-report-data", report_data]
    code, stdout, err = run(capsys, *verify, "--trusted-ark", str(state / "ark.pem"))
    assert (code, err) == (0, ""), err
    assert "valid: Milan report v3" in stdout
    code, _, err = run(capsys, *verify)
    assert code == 1
    assert "not a pinned AMD ARK" in one_line(err)


def test_fetch_without_out_prints_hex_that_show_reads(capsys, tmp_path, tmp_path_factory):
    state = shared_virtual_state(tmp_path_factory)
    policy = tmp_path / "policy.rego"
    policy.write_bytes(POLICY)
    argv = ["report", "fetch", "--report-data", "ab" * 64, "--evidence", "virtual"]
    code, out, _ = run(capsys, *argv, "--state-dir", str(state), "--security-policy", str(policy))
    assert code == 0
    saved = tmp_path / "report.hex"
    saved.write_text(out)
    code, shown, _ = run(capsys, "report", "show", "--json", str(saved))
    assert code == 0
    assert json.loads(shown)["report_data"] == "ab" * 64
