"""skr.snp.kds: the pure half of collateral (THIM document, tcbm, KDS product choice), kept pure."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest
from cryptography import x509

from skr.errors import CollateralError
from skr.snp.kds import (
    candidate_products,
    kds_vcek_url_for_report,
    load_der_certificate,
    load_pem_certificates,
    parse_thim_json,
    tcbm,
)
from skr.snp.report import AttestationReport, Product

pytestmark = pytest.mark.unit

ACI = "snp/aci-confidential-sidecar"
OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")


def _imports(module: str, seen: set[str]) -> set[str]:
    """Every module ``module`` imports, following skr's own modules (lazy imports included)."""
    found: set[str] = set()
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in set(names) - seen:
            seen.add(name)
            found |= {name} | (_imports(name, seen) if name.startswith("skr.") else set())
    return found


def test_kds_and_what_it_imports_use_no_network_or_event_loop_module() -> None:
    found = {name.split(".")[0] for name in _imports("skr.snp.kds", set())} | _imports("skr.snp.kds", set())
    assert not found & {"aiohttp", "asyncio", "socket", "ssl", "skr.upstream", "skr.snp.collateral"}


def test_tcbm_of_the_aci_report_is_the_tcbm_thim_sent_with_it(vectors: Path) -> None:
    report = AttestationReport.parse((vectors / f"{ACI}/snp_report.bin").read_bytes())
    thim = parse_thim_json((vectors / f"{ACI}/uvm_host_amd_certificate.json").read_bytes())
    assert tcbm(report.reported_tcb) == thim.tcbm == "7308000000000003"


def test_tcbm_keeps_leading_zeros() -> None:
    assert tcbm(0x0008000000000003) == "0008000000000003"


def test_a_version_2_report_without_cpuid_tries_milan_then_genoa(vectors: Path) -> None:
    report = AttestationReport.parse((vectors / "snp/virtee-sev/report_milan.DERIVED.bin").read_bytes())
    assert candidate_products(report, None) == [Product.MILAN, Product.GENOA]
    assert candidate_products(report, Product.GENOA) == [Product.GENOA]


def test_a_chip_id_that_is_an_8_byte_hwid_is_tried_as_turin_with_the_genuine_turin_vcek_hwid(
    vectors: Path,
) -> None:
    vcek = load_der_certificate((vectors / "snp/virtee-sev/vcek_turin.der").read_bytes(), what="Turin VCEK")
    hwid = vcek.extensions.get_extension_for_oid(OID_HWID).value.value  # type: ignore[attr-defined]
    milan = AttestationReport.parse((vectors / "snp/virtee-sev/report_milan.DERIVED.bin").read_bytes())
    report = dataclasses.replace(milan, chip_id=hwid + bytes(56))
    assert candidate_products(report, None) == [Product.TURIN]
    assert f"/vcek/v1/Turin/{hwid.hex()}?" in kds_vcek_url_for_report(report, Product.TURIN)


def test_kds_cert_chain_reads_as_ask_then_ark(vectors: Path) -> None:
    ask, ark = load_pem_certificates((vectors / "amd-roots/ask_ark_genoa.pem").read_bytes(), what="chain")
    assert ask.issuer == ark.subject == ark.issuer


def test_a_pem_answer_where_der_is_expected_is_a_collateral_error(vectors: Path) -> None:
    with pytest.raises(CollateralError, match=r"not a DER X\.509 certificate"):
        load_der_certificate((vectors / "amd-roots/ark_milan.pem").read_bytes(), what="AMD KDS VCEK")
    with pytest.raises(CollateralError, match="not a PEM certificate bundle"):
        load_pem_certificates((vectors / "snp/virtee-sev/vcek_milan.der").read_bytes(), what="answer")
