"""Report signature, AMD chain and validation, against genuine reports and a chain built in the test."""

from __future__ import annotations

import base64
import hashlib
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from skr.errors import CertificateError, ReportVerificationError, ValidationError
from skr.evidence.certtable import load_one_certificate
from skr.snp.certs import (
    AMD_ARK_SHA256,
    load_certificates,
    parse_vek_extensions,
    read_certificates,
    verify_vek_chain,
)
from skr.snp.hostdata import host_data_of_policy
from skr.snp.kds import load_der_certificate, load_pem_certificates
from skr.snp.report import AttestationReport, Product, TcbVersion
from skr.snp.verify import ValidationOptions, validate_report, verify_evidence_chain, verify_report
from tests.test_snp_report import GENUINE, case_for, report_bytes

INSIDE_VLEK_VALIDITY = datetime(2025, 6, 1, tzinfo=UTC)
AFTER_VLEK_VALIDITY = datetime(2025, 12, 11, tzinfo=UTC)
ACI = "snp/aci-confidential-sidecar/snp_report.bin"
VLEK = "snp/trustee/test-vlek-report.bin"


def certs_at(vectors: Path, relative: str) -> list[x509.Certificate]:
    return load_certificates((vectors / relative).read_bytes())


def genuine(
    vectors: Path, expected: dict[str, Any], relative: str
) -> tuple[AttestationReport, Any, list[Any]]:
    """(report, VEK, ASK/ASVK+ARK chain) of a genuine case."""
    case = case_for(expected, relative)
    report = AttestationReport.parse(report_bytes(vectors, relative))
    return report, certs_at(vectors, case["vek"])[0], certs_at(vectors, case["ca_chain"])


def at_for(relative: str) -> datetime | None:
    return INSIDE_VLEK_VALIDITY if relative == VLEK else None


# --- genuine evidence ------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", GENUINE)
def test_genuine_report_signature_and_chain_verify(vectors, expected, relative):
    report, vek, chain = genuine(vectors, expected, relative)
    verified = verify_report(report, vek, chain, at=at_for(relative))
    case = case_for(expected, relative)
    assert verified.product is Product(case["product"])
    assert verified.vek_info.kind == case["signing_key"].lower()
    assert verified.ark_sha256 == AMD_ARK_SHA256[verified.product]


def test_vlek_report_is_valid_inside_its_validity_and_invalid_after(vectors, expected):
    report, vlek, chain = genuine(vectors, expected, VLEK)
    verified = verify_report(report, vlek, chain, at=INSIDE_VLEK_VALIDITY)
    assert verified.vek_info.csp_id == "CN=cc-us-east-2.amazonaws.com"
    assert verified.vek_info.hwid is None
    with pytest.raises(CertificateError, match="not valid at 2025-12-11") as caught:
        verify_report(report, vlek, chain, at=AFTER_VLEK_VALIDITY)
    assert caught.value.code == "certificate_expired"


def test_vlek_report_is_invalid_before_its_validity(vectors, expected):
    report, vlek, chain = genuine(vectors, expected, VLEK)
    with pytest.raises(CertificateError, match="not valid"):
        verify_report(report, vlek, chain, at=datetime(2024, 12, 1, tzinfo=UTC))


def test_aci_host_data_is_the_hash_of_its_security_policy(vectors):
    policy = (vectors / "snp/aci-confidential-sidecar/uvm_security_policy.base64").read_bytes()
    report = AttestationReport.parse((vectors / ACI).read_bytes())
    assert report.host_data == host_data_of_policy(policy)
    assert report.host_data == hashlib.sha256(base64.b64decode(policy)).digest()


def test_aci_report_verifies_with_the_chain_from_its_security_context(vectors):
    chain_pem = (vectors / "snp/aci-confidential-sidecar/uvm_host_amd_certificate.pem").read_bytes()
    verified = verify_evidence_chain((vectors / ACI).read_bytes(), chain_pem)
    assert verified.product is Product.MILAN
    assert verified.vek_info.product_name == "Milan-B0"


def test_maa_request_evidence_verifies_as_one_pem(vectors):
    verified = verify_evidence_chain(
        (vectors / "maa/sevsnpvm-aci-request.snp_report.DERIVED.bin").read_bytes(),
        (vectors / "maa/sevsnpvm-aci-request.vcek_chain.DERIVED.pem").read_bytes(),
    )
    assert verified.report.host_data.hex().startswith("73973b78")


@pytest.mark.parametrize("product", list(Product))
def test_pinned_ark_fingerprints_are_the_sha256_of_the_amd_roots(vectors, product):
    der = certs_at(vectors, f"amd-roots/ark_{product.value.lower()}.pem")[0].public_bytes(
        serialization.Encoding.DER
    )
    assert AMD_ARK_SHA256[product] == hashlib.sha256(der).hexdigest()


# --- certificates ----------------------------------------------------------------------------------


def test_turin_vcek_extensions_parse(vectors):
    info = parse_vek_extensions(certs_at(vectors, "snp/virtee-sev/vcek_turin.der")[0])
    assert info.kind == "vcek"
    assert info.product_name == "Turin" and info.product is Product.TURIN
    assert info.struct_version == 1
    assert info.hwid == bytes.fromhex("1e550a8ee5cf9f4d")  # 8 bytes on Turin
    assert (info.fmc_spl, info.bl_spl, info.tee_spl, info.snp_spl, info.ucode_spl) == (0, 0, 0, 0, 9)


def test_turin_vcek_chain_verifies_to_the_pinned_turin_ark(vectors):
    vcek = certs_at(vectors, "snp/virtee-sev/vcek_turin.der")[0]
    result = verify_vek_chain(vcek, certs_at(vectors, "snp/virtee-sev/cert_chain_turin"))
    assert result.pinned_product is Product.TURIN


def test_ucode_spl_above_127_is_read_as_der(vectors):
    info = parse_vek_extensions(certs_at(vectors, "snp/trustee/test-vlek.der")[0])
    assert info.ucode_spl == 217  # encoded 02 02 00 d9


@pytest.mark.parametrize("name", ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"])
def test_invalid_vcek_fixtures_parse_but_fail_the_chain(vectors, name):
    vcek = certs_at(vectors, f"snp/trustee/{name}")[0]
    assert parse_vek_extensions(vcek).hwid == bytes(range(64))  # raw and OCTET STRING forms alike
    with pytest.raises(CertificateError, match="signature on SEV-VCEK does not verify"):
        verify_vek_chain(vcek, certs_at(vectors, "amd-roots/ask_ark_milan.pem"))


def test_loading_a_genuine_vcek_emits_no_serial_warning(vectors):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (vcek,) = load_certificates((vectors / "snp/go-sev-guest/vcek.der").read_bytes())
    assert vcek.serial_number == 0  # outside: cryptography warns again on access


def _thim_vcek(data: bytes) -> x509.Certificate:
    return load_pem_certificates(data, what="THIM")[0]


@pytest.mark.parametrize(
    ("relative", "read"),
    [
        ("snp/go-sev-guest/vcek.der", lambda data: read_certificates(data)[0]),
        ("snp/virtee-sev/vcek_turin.der", lambda data: load_der_certificate(data, what="AMD KDS VCEK")),
        ("snp/trustee/test-vlek.der", load_one_certificate),
        ("snp/aci-confidential-sidecar/uvm_host_amd_certificate.pem", _thim_vcek),
    ],
)
def test_every_certificate_reader_of_skr_keeps_the_serial_warning_in(vectors, relative, read):
    """Certificate tables, KDS answers, THIM and evidence files all go through the one reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cert = read((vectors / relative).read_bytes())
        assert parse_vek_extensions(cert).kind in ("vcek", "vlek")


def test_pem_bundle_loads_in_order(vectors):
    certs = certs_at(vectors, "amd-roots/milan_ask_ark_asvk.pem")
    names = [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in certs]
    assert names == ["SEV-Milan", "ARK-Milan", "SEV-VLEK-Milan"]


@pytest.mark.parametrize("data", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_unreadable_certificates_are_a_certificate_error(data):
    with pytest.raises(CertificateError, match="cannot read a certificate"):
        load_certificates(data)


# --- tampering -------------------------------------------------------------------------------------

FLIPS = {
    "guest_svn": 0x004,
    "policy": 0x008,
    "vmpl": 0x030,
    "report_data": 0x050,
    "measurement": 0x090,
    "host_data": 0x0C0,
    "report_id": 0x140,
    "reported_tcb": 0x180,
    "chip_id": 0x1A0,
    "committed_tcb": 0x1E0,
    "launch_tcb": 0x1F0,
    "signature_r": 0x2A0,
    "signature_s": 0x2E8,
}


@pytest.mark.parametrize(("field", "offset"), FLIPS.items())
def test_any_flipped_byte_fails(vectors, expected, field, offset):
    raw = bytearray(report_bytes(vectors, ACI))
    raw[offset] ^= 0x01
    _, vek, chain = genuine(vectors, expected, ACI)
    with pytest.raises(ReportVerificationError):
        verify_report(AttestationReport.parse(bytes(raw)), vek, chain)


def test_flipped_report_data_is_caught_by_the_signature(vectors, expected):
    raw = bytearray(report_bytes(vectors, ACI))
    raw[0x50] ^= 0x80
    _, vek, chain = genuine(vectors, expected, ACI)
    with pytest.raises(ReportVerificationError, match="signature does not verify"):
        verify_report(AttestationReport.parse(bytes(raw)), vek, chain)


def test_vcek_of_another_chip_fails(vectors, expected):
    report, _, chain = genuine(vectors, expected, ACI)
    other = certs_at(vectors, "snp/trustee/test-vcek.der")[0]  # same TCB, other chip
    with pytest.raises(ReportVerificationError, match="hwID"):
        verify_report(report, other, chain)


def test_vcek_for_another_tcb_fails(vectors, expected):
    report, _, chain = genuine(vectors, expected, "snp/go-sev-guest/attestation.bin")
    other = certs_at(vectors, "snp/trustee/test-vcek.der")[0]
    with pytest.raises(ReportVerificationError, match="REPORTED_TCB"):
        verify_report(report, other, chain)


def test_vlek_report_with_a_vcek_fails(vectors, expected):
    report, _, _ = genuine(vectors, expected, VLEK)
    vcek = certs_at(vectors, "snp/trustee/test-vcek.der")[0]
    chain = certs_at(vectors, "amd-roots/ask_ark_milan.pem")
    with pytest.raises(ReportVerificationError, match="signed by the VLEK"):
        verify_report(report, vcek, chain, at=INSIDE_VLEK_VALIDITY)


def test_vlek_with_the_vcek_chain_fails(vectors, expected):
    report, vlek, _ = genuine(vectors, expected, VLEK)
    with pytest.raises(CertificateError):
        verify_report(report, vlek, certs_at(vectors, "amd-roots/ask_ark_milan.pem"), at=INSIDE_VLEK_VALIDITY)


def test_chain_of_another_product_fails(vectors, expected):
    report, vek, _ = genuine(vectors, expected, ACI)
    with pytest.raises(CertificateError, match="no certificate for the VCEK/VLEK issuer"):
        verify_report(report, vek, certs_at(vectors, "amd-roots/ask_ark_genoa.pem"))


def test_chain_without_the_ark_fails(vectors, expected):
    report, vek, _ = genuine(vectors, expected, ACI)
    with pytest.raises(CertificateError, match="no certificate named 'ARK-Milan' to verify SEV-Milan"):
        verify_report(report, vek, certs_at(vectors, "amd-roots/ask_milan.pem"))


def test_explicit_product_must_match_the_pinned_ark(vectors, expected):
    report, vek, chain = genuine(vectors, expected, ACI)
    with pytest.raises(CertificateError, match="product mismatch"):
        verify_report(report, vek, chain, product=Product.GENOA)


# --- a chain built here, with AMD's names but not AMD's keys ---------------------------------------


def _sign(
    subject: x509.Name, issuer: x509.Name, public_key: Any, signer: rsa.RSAPrivateKey, extra: dict[str, bytes]
) -> Any:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
    )
    for oid, value in extra.items():
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False
        )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=pss)


@pytest.fixture(scope="module")
def forged(vectors) -> dict[str, Any]:
    """ARK-Milan/SEV-Milan/SEV-VCEK lookalikes and the ACI report re-signed by the lookalike VCEK."""
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    chip_id = bytes(range(100, 164))
    arc = "1.3.6.1.4.1.3704.1"
    extensions = {
        f"{arc}.1": b"\x02\x01\x00",
        f"{arc}.2": b"\x16\x08Milan-B0",
        f"{arc}.3.1": b"\x02\x01\x03",
        f"{arc}.3.2": b"\x02\x01\x00",
        f"{arc}.3.3": b"\x02\x01\x08",
        f"{arc}.3.8": b"\x02\x01\x73",
        f"{arc}.4": chip_id,
    }
    amd_ask, amd_ark = certs_at(vectors, "amd-roots/ask_ark_milan.pem")  # borrow AMD's exact names
    vcek_name = certs_at(vectors, "snp/trustee/test-vcek.der")[0].subject
    ark = _sign(amd_ark.subject, amd_ark.subject, ark_key.public_key(), ark_key, {})
    ask = _sign(amd_ask.subject, amd_ark.subject, ask_key.public_key(), ark_key, {})
    vcek = _sign(vcek_name, amd_ask.subject, vcek_key.public_key(), ask_key, extensions)
    raw = bytearray(report_bytes(vectors, ACI))  # reported TCB 0x7308000000000003 = the SPLs above
    raw[0x1A0:0x1E0] = chip_id
    r, s = decode_dss_signature(vcek_key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
    raw[0x2E8:0x330] = s.to_bytes(72, "little")
    return {"ark": ark, "ask": ask, "vcek": vcek, "report": AttestationReport.parse(bytes(raw))}


def test_lookalike_chain_is_refused_without_an_anchor(forged):
    with pytest.raises(CertificateError, match="not a pinned AMD ARK") as caught:
        verify_report(forged["report"], forged["vcek"], [forged["ask"], forged["ark"]])
    assert caught.value.code == "untrusted_root"


def test_lookalike_chain_verifies_when_its_ark_is_passed_as_anchor(forged):
    verified = verify_report(forged["report"], forged["vcek"], [forged["ask"]], trusted_arks=[forged["ark"]])
    assert verified.product is Product.MILAN  # from the VEK productName: v2 report, unpinned ARK
    assert (
        verified.ark_sha256
        == hashlib.sha256(forged["ark"].public_bytes(serialization.Encoding.DER)).hexdigest()
    )


def test_lookalike_ask_does_not_chain_to_the_genuine_ark(vectors, forged):
    genuine_ark = certs_at(vectors, "amd-roots/ark_milan.pem")
    with pytest.raises(CertificateError, match="does not verify"):
        verify_report(forged["report"], forged["vcek"], [forged["ask"], *genuine_ark])


def test_genuine_vcek_with_a_lookalike_ask_fails(vectors, expected, forged):
    report, vek, _ = genuine(vectors, expected, ACI)
    with pytest.raises(CertificateError, match="does not verify"):
        verify_report(report, vek, [forged["ask"], forged["ark"]], trusted_arks=[forged["ark"]])


# --- validation ------------------------------------------------------------------------------------


def aci_report(vectors: Path) -> AttestationReport:
    return AttestationReport.parse((vectors / ACI).read_bytes())


def test_matching_expectations_pass(vectors, expected):
    case = case_for(expected, ACI)
    options = ValidationOptions(
        report_data=bytes.fromhex(case["report_data"]),
        host_data=bytes.fromhex(case["host_data"]),
        measurement=bytes.fromhex(case["measurement"]),
        minimum_tcb=TcbVersion.from_parts(Product.MILAN, bl=3, tee=0, snp=8, ucode=115),
        maximum_vmpl=0,
        minimum_version=(1, 52),
        permit_provisional_firmware=False,
    )
    validate_report(aci_report(vectors), options)
    assert aci_report(vectors).guest_policy.debug is False


def test_wrong_host_data_names_expected_and_found(vectors, expected):
    found = case_for(expected, ACI)["host_data"]
    with pytest.raises(ValidationError, match=f"HOST_DATA expected {'ab' * 32}, found {found}"):
        validate_report(aci_report(vectors), ValidationOptions(host_data=b"\xab" * 32))


def test_every_failing_expectation_is_listed(vectors):
    options = ValidationOptions(
        report_data=bytes(64),
        minimum_tcb=TcbVersion.from_parts(Product.MILAN, bl=3, tee=0, snp=9, ucode=115),
        minimum_guest_svn=3,
    )
    with pytest.raises(ValidationError) as caught:
        validate_report(aci_report(vectors), options)
    message = caught.value.message
    assert "REPORT_DATA expected" in message
    assert "REPORTED_TCB expected at least" in message
    assert "GUEST_SVN expected at least 3, found 2" in message


def test_debug_policy_is_refused_unless_allowed(vectors):
    report = AttestationReport.parse((vectors / "snp/go-sev-guest/attestation.bin").read_bytes())
    with pytest.raises(ValidationError, match="DEBUG"):
        validate_report(report, ValidationOptions())
    validate_report(report, ValidationOptions(allow_debug=True))


def test_vmpl_above_maximum_is_refused(vectors):
    report = AttestationReport.parse((vectors / VLEK).read_bytes())  # VMPL 1
    with pytest.raises(ValidationError, match="VMPL expected at most 0, found 1"):
        validate_report(report, ValidationOptions(maximum_vmpl=0))


def test_provisional_firmware_is_refused_when_not_permitted(vectors):
    report = AttestationReport.parse((vectors / VLEK).read_bytes())  # committed TCB < current TCB
    validate_report(report, ValidationOptions())
    with pytest.raises(ValidationError, match="provisional firmware"):
        validate_report(report, ValidationOptions(permit_provisional_firmware=False))


def test_signing_key_kind_can_be_restricted(vectors):
    report = AttestationReport.parse((vectors / VLEK).read_bytes())
    with pytest.raises(ValidationError, match="signing key expected one of vcek, found vlek"):
        validate_report(report, ValidationOptions(signing_keys=frozenset({"vcek"})))


def test_report_without_a_signing_key_is_refused(vectors, expected):
    raw = bytearray(report_bytes(vectors, ACI))
    raw[0x48] = 7 << 2  # SIGNING_KEY = none
    _, vek, chain = genuine(vectors, expected, ACI)
    with pytest.raises(ReportVerificationError, match="not signed"):
        verify_report(AttestationReport.parse(bytes(raw)), vek, chain)
