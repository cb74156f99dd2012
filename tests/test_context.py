"""The UVM security context, read from a directory populated at test time with the genuine ACI files."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from skr.errors import EvidenceUnavailable
from skr.evidence.context import (
    SecurityContext,
    check_policy_hash,
    find_security_context_dir,
    load_security_context,
)
from skr.snp.report import AttestationReport

ACI = "snp/aci-confidential-sidecar"


def _write_aci_context(vectors: Path, directory: Path) -> None:
    """The three files as ACI mounts them: each one standard base64 text."""
    directory.mkdir(parents=True, exist_ok=True)
    # the policy vector already is the base64 text ACI ships
    (directory / "security-policy-base64").write_bytes(
        (vectors / ACI / "uvm_security_policy.base64").read_bytes()
    )
    thim = (vectors / ACI / "uvm_host_amd_certificate.json").read_bytes()
    (directory / "host-amd-cert-base64").write_bytes(base64.b64encode(thim))
    cose = (vectors / ACI / "body.uvm_reference_info.bin").read_bytes()
    (directory / "reference-info-base64").write_bytes(base64.b64encode(cose))


def _raw_policy(vectors: Path) -> bytes:
    return base64.b64decode((vectors / ACI / "uvm_security_policy.base64").read_bytes())


def test_genuine_aci_context_loads_policy_thim_and_reference_info(vectors: Path, tmp_path: Path) -> None:
    directory = tmp_path / "ctx"
    _write_aci_context(vectors, directory)
    context = load_security_context({"UVM_SECURITY_CONTEXT_DIR": str(directory)}, root=tmp_path)

    assert context.directory == directory
    assert context.security_policy == _raw_policy(vectors)
    assert context.security_policy is not None and context.security_policy.startswith(b"package policy")
    assert context.thim is not None
    assert context.thim.tcbm == "7308000000000003"
    assert context.uvm_reference_info == (vectors / ACI / "body.uvm_reference_info.bin").read_bytes()
    assert not context.is_empty


def test_genuine_aci_report_host_data_matches_the_genuine_policy(vectors: Path, tmp_path: Path) -> None:
    _write_aci_context(vectors, tmp_path / "ctx")
    context = load_security_context({"UVM_SECURITY_CONTEXT_DIR": str(tmp_path / "ctx")}, root=tmp_path)
    report = AttestationReport.parse((vectors / ACI / "snp_report.bin").read_bytes())

    assert context.host_data == hashlib.sha256(_raw_policy(vectors)).digest() == report.host_data
    check_policy_hash(context, report.host_data)  # does not raise


def test_host_data_mismatch_names_both_values(vectors: Path, tmp_path: Path) -> None:
    _write_aci_context(vectors, tmp_path / "ctx")
    context = load_security_context({"UVM_SECURITY_CONTEXT_DIR": str(tmp_path / "ctx")}, root=tmp_path)
    other = AttestationReport.parse((vectors / "snp/virtee-sev/report_milan.DERIVED.bin").read_bytes())

    with pytest.raises(EvidenceUnavailable) as info:
        check_policy_hash(context, other.host_data)
    assert info.value.code == "host_data_mismatch"
    assert "0" * 64 in info.value.message
    assert "cadd74f71ebb8fbf9782baab649612520f3c416bc5ce9ac768808ddc8d9b031c" in info.value.message


def test_policy_hash_check_without_a_policy_is_an_error() -> None:
    empty = SecurityContext(directory=None, security_policy=None, thim=None, uvm_reference_info=None)
    with pytest.raises(EvidenceUnavailable, match="no security policy"):
        check_policy_hash(empty, bytes(32))


def test_first_security_context_dir_under_root_is_found(vectors: Path, tmp_path: Path) -> None:
    _write_aci_context(vectors, tmp_path / "security-context-b")
    (tmp_path / "security-context-a").mkdir()  # sorted first: chosen even though it is empty
    (tmp_path / "security-context-file").write_text("not a directory")
    assert find_security_context_dir({}, root=tmp_path) == tmp_path / "security-context-a"


def test_kata_default_dir_is_used_last(vectors: Path, tmp_path: Path) -> None:
    kata = tmp_path / "opt/confidential-containers/share/kata-containers"
    _write_aci_context(vectors, kata)
    context = load_security_context({}, root=tmp_path)
    assert context.directory == kata
    assert context.thim is not None


def test_env_fallbacks_when_no_directory_exists(vectors: Path, tmp_path: Path) -> None:
    thim = (vectors / ACI / "uvm_host_amd_certificate.json").read_bytes()
    cose = (vectors / ACI / "body.uvm_reference_info.bin").read_bytes()
    env = {
        "UVM_SECURITY_POLICY": (vectors / ACI / "uvm_security_policy.base64").read_text(),
        "UVM_HOST_AMD_CERTIFICATE": base64.b64encode(thim).decode(),
        "UVM_REFERENCE_INFO": base64.b64encode(cose).decode(),
    }
    context = load_security_context(env, root=tmp_path)
    assert context.directory is None
    assert context.security_policy == _raw_policy(vectors)
    assert context.thim is not None and context.thim.vcek_pem == json.loads(thim)["vcekCert"].encode()
    assert context.uvm_reference_info == cose


def test_files_win_over_env_fallbacks(vectors: Path, tmp_path: Path) -> None:
    _write_aci_context(vectors, tmp_path / "ctx")
    env = {
        "UVM_SECURITY_CONTEXT_DIR": str(tmp_path / "ctx"),
        "UVM_SECURITY_POLICY": base64.b64encode(b"x").decode(),
    }
    assert load_security_context(env, root=tmp_path).security_policy == _raw_policy(vectors)


def test_nothing_anywhere_is_an_empty_context(tmp_path: Path) -> None:
    context = load_security_context({}, root=tmp_path)
    assert context.is_empty
    assert context.directory is None
    assert context.host_data is None


def test_named_directory_that_is_missing_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(EvidenceUnavailable) as info:
        load_security_context({"UVM_SECURITY_CONTEXT_DIR": str(missing)}, root=tmp_path)
    assert str(missing) in info.value.message
    assert "UVM_SECURITY_CONTEXT_DIR" in info.value.message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("security-policy-base64", b"not base64 !!", "not valid standard base64"),
        ("security-policy-base64", b"  \n", "is empty"),
        (
            "host-amd-cert-base64",
            base64.b64encode(b'{"tcbm": "73"}'),
            "does not hold valid THIM certificates",
        ),
        ("reference-info-base64", base64.b64encode(b"\xa1\x01\x02"), "does not hold a COSE_Sign1"),
    ],
)
def test_malformed_file_is_an_error_naming_the_file(
    vectors: Path, tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    directory = tmp_path / "ctx"
    _write_aci_context(vectors, directory)
    (directory / name).write_bytes(content)
    with pytest.raises(EvidenceUnavailable) as info:
        load_security_context({"UVM_SECURITY_CONTEXT_DIR": str(directory)}, root=tmp_path)
    assert expected in info.value.message
    assert name in info.value.message


def test_malformed_env_fallback_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailable, match=r"\$UVM_REFERENCE_INFO"):
        load_security_context({"UVM_REFERENCE_INFO": "%%%"}, root=tmp_path)


def test_repr_does_not_dump_the_policy(vectors: Path, tmp_path: Path) -> None:
    _write_aci_context(vectors, tmp_path / "ctx")
    context = load_security_context({"UVM_SECURITY_CONTEXT_DIR": str(tmp_path / "ctx")}, root=tmp_path)
    text = repr(context)
    assert "package policy" not in text
    assert "cadd74f7" in text
