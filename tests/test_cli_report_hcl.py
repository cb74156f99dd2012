"""``skr report show|verify`` on whole Azure vTPM HCL reports, and a VEK without its chain (exit 2)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from skr.cli import main
from skr.errors import ReportError
from skr.snp.hcl import parse_hcl_report

HCL_DIR = "azure-vtpm/trustee-az-snp-vtpm"
HCL = f"{HCL_DIR}/hcl-report.bin"
HCL_VCEK = f"{HCL_DIR}/vcek.pem"  # VCEK + ASK + ARK
ACI = "snp/aci-confidential-sidecar/snp_report.bin"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _runtime_slice(raw: bytes) -> tuple[int, bytes]:
    """Read the runtime data independently: request data at 0x20 + 1184, size at +16, data at +20."""
    (size,) = struct.unpack_from("<I", raw, 0x20 + 1184 + 16)
    return size, raw[0x20 + 1184 + 20 : 0x20 + 1184 + 20 + size]


def test_show_prints_the_snp_fields_and_the_hcl_runtime_data(capsys, vectors):
    code, out, err = run(capsys, "report", "show", str(vectors / HCL))
    assert (code, err) == (0, "")
    _, derived, _ = run(
        capsys, "report", "show", str(vectors / f"{HCL_DIR}/hcl-report.snp_report.DERIVED.bin")
    )
    assert out.startswith(derived)  # the SNP report at 0x20 decodes exactly as the extracted one
    tail = out[len(derived) :]
    assert "HCL report v1, snp hardware report, 2346 bytes" in tail
    assert "keys                 HCLAkPub (RSA, sign), HCLEkPub (RSA, encrypt)" in tail
    assert 'vmUniqueId="911B0EF8-9DBA-48B0-B275-4E4DF2D39252"' in tail and "secure-boot=true" in tail
    assert "user-data            " + "0" * 128 in tail
    raw = (vectors / HCL).read_bytes()
    _, runtime = _runtime_slice(raw)
    assert f"sha256 {hashlib.sha256(runtime).hexdigest()} (bound by REPORT_DATA)" in tail


def test_show_json_and_hex_text_of_an_hcl_report(capsys, vectors, tmp_path):
    raw = (vectors / HCL).read_bytes()
    text = tmp_path / "hcl.hex"
    text.write_text(raw.hex() + "\n")
    code, out, _ = run(capsys, "report", "show", "--json", str(text))
    assert code == 0
    doc = json.loads(out)
    size, runtime = _runtime_slice(raw)
    assert doc["report_data"].startswith(hashlib.sha256(runtime).hexdigest())
    hcl = doc["hcl"]
    assert hcl["runtime_data_size"] == size == 1110
    assert hcl["runtime_data_bound"] is True and hcl["report_type"] == "snp"
    assert hcl["runtime_data"]["vm-configuration"] == json.loads(runtime)["vm-configuration"]
    assert [k["kid"] for k in hcl["runtime_data"]["keys"]] == ["HCLAkPub", "HCLEkPub"]


def test_verify_a_genuine_milan_hcl_report(capsys, vectors):
    code, out, err = run(capsys, "report", "verify", str(vectors / HCL), "--vek", str(vectors / HCL_VCEK))
    assert (code, err) == (0, "")
    assert out.startswith("valid: Milan report v2 signed by the VCEK") and "HCL runtime data bound" in out


def test_verify_a_genuine_genoa_hcl_report_from_trustee_evidence(capsys, vectors, tmp_path):
    evidence = json.loads((vectors / f"{HCL_DIR}/evidence-genoa.json").read_text())
    path = tmp_path / "genoa-hcl.bin"
    path.write_bytes(bytes(evidence["report"]))
    chain = tmp_path / "chain.pem"
    chain.write_text((vectors / f"{HCL_DIR}/vcek-genoa.pem").read_text())
    argv = [
        "report",
        "verify",
        str(path),
        "--vek",
        str(chain),
        "--chain",
        str(vectors / "amd-roots/ask_ark_genoa.pem"),
    ]
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, ""), err
    verdict = json.loads(out)
    assert verdict["product"] == "Genoa" and verdict["hcl"]["runtime_data_bound"] is True


def test_runtime_data_changed_after_attestation_is_invalid(capsys, vectors, tmp_path):
    raw = bytearray((vectors / HCL).read_bytes())
    start = raw.index(b"911B0EF8")
    size, _ = _runtime_slice(bytes(raw))
    assert 0x4D4 <= start < 0x4D4 + size  # inside the runtime data, outside the signed SNP report
    raw[start] = ord("A")  # a different vmUniqueId; the SNP report (and its signature) is untouched
    path = tmp_path / "edited.bin"
    path.write_bytes(bytes(raw))
    code, out, err = run(capsys, "report", "verify", str(path), "--vek", str(vectors / HCL_VCEK))
    assert code == 1 and out == ""
    assert "does not start with the sha256 of the HCL runtime data" in err
    code, out, _ = run(capsys, "report", "show", str(path))
    assert code == 0 and "(NOT bound by REPORT_DATA)" in out


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda raw: raw[:1000], "need 1236"),
        (lambda raw: raw[: 0x4C0 + 8] + struct.pack("<I", 4) + raw[0x4C0 + 12 :], "only SEV-SNP"),
        (lambda raw: raw[: 0x4C0 + 12] + struct.pack("<I", 9) + raw[0x4C0 + 16 :], "hash type"),
        (lambda raw: raw[: 0x4C0 + 16] + struct.pack("<I", 5000) + raw[0x4C0 + 20 :], "past its end"),
    ],
)
def test_malformed_hcl_reports_are_unusable_input(capsys, vectors, tmp_path, edit, complaint):
    raw = (vectors / HCL).read_bytes()
    with pytest.raises(ReportError, match=complaint):
        parse_hcl_report(edit(raw))
    path = tmp_path / "bad.bin"
    path.write_bytes(edit(raw))
    code, out, err = run(capsys, "report", "show", str(path))
    assert code == 2 and out == "" and complaint in err


def _vek_only(vectors: Path, tmp_path: Path, bundle: str) -> Path:
    text = (vectors / bundle).read_text()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    path = tmp_path / "vek-only.pem"
    path.write_text(text[:end] + "\n")
    return path


@pytest.mark.parametrize(
    ("report", "bundle"),
    [(ACI, "snp/aci-confidential-sidecar/uvm_host_amd_certificate.pem"), (HCL, HCL_VCEK)],
)
def test_a_vek_without_its_amd_chain_is_unusable_input(capsys, vectors, tmp_path, report, bundle):
    vek = _vek_only(vectors, tmp_path, bundle)
    code, out, err = run(capsys, "report", "verify", str(vectors / report), "--vek", str(vek), "--json")
    assert code == 2 and out == ""
    assert err.startswith("skr: unusable input: the chain has no certificate for the VCEK/VLEK issuer")
    assert "--chain" in err and len(err.strip().splitlines()) == 1
