"""The virtual TEE: persisted ARK -> ASK -> VCEK, reports the real verifier accepts only with its ARK."""

from __future__ import annotations

import hashlib
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from skr.errors import BadRequest, CertificateError, ConfigError
from skr.evidence.base import EvidenceProvider, report_data_for
from skr.evidence.virtual import VirtualTee
from skr.snp.certs import load_certificates
from skr.snp.report import AttestationReport, Product, TcbVersion
from skr.snp.verify import verify_evidence_chain, verify_report

POLICY = b'package policy\n\napi_version := "0.10.0"\n'
REPORT_DATA = bytes(range(64))
_SHARED: dict[int, Path] = {}


def shared_virtual_state(factory: pytest.TempPathFactory) -> Path:
    """One state directory per test session (RSA-4096 key generation happens once)."""
    key = id(factory)
    if key not in _SHARED:
        path = factory.mktemp("virtual-tee") / "state"
        VirtualTee.load_or_create(path, security_policy=POLICY)
        _SHARED[key] = path
    return _SHARED[key]


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_virtual_state(tmp_path_factory)


@pytest.fixture(scope="session")
def tee(state_dir: Path) -> VirtualTee:
    return VirtualTee.load_or_create(state_dir, security_policy=POLICY)


@pytest.fixture
def state_copy(state_dir: Path, tmp_path: Path) -> Path:
    """A private copy for tests that make the TEE re-issue its VCEK."""
    copy = tmp_path / "state"
    shutil.copytree(state_dir, copy)
    return copy


# --- verification ----------------------------------------------------------------------------------


def test_report_verifies_with_its_ark_as_anchor(tee):
    verified = verify_evidence_chain(
        tee.sign_report(REPORT_DATA), tee.vcek_chain_pem, trusted_arks=[tee.ark_certificate]
    )
    assert verified.product is Product.MILAN
    assert verified.report.report_data == REPORT_DATA
    assert verified.report.host_data == hashlib.sha256(POLICY).digest()
    assert verified.report.measurement == tee.measurement
    assert verified.report.chip_id == tee.chip_id == verified.vek_info.hwid


def test_report_is_refused_without_its_ark(tee):
    with pytest.raises(CertificateError, match="not a pinned AMD ARK") as caught:
        verify_evidence_chain(tee.sign_report(REPORT_DATA), tee.vcek_chain_pem)
    assert caught.value.code == "untrusted_root"


def test_report_signature_checks_out_with_plain_cryptography(tee):
    """r and s are little-endian at 0x2A0/0x2E8; the VCEK signs bytes 0x000-0x29F with P-384/SHA-384."""
    raw = tee.sign_report(REPORT_DATA)
    r = int.from_bytes(raw[0x2A0:0x2E8], "little")
    s = int.from_bytes(raw[0x2E8:0x330], "little")
    key = tee.vcek_certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    key.verify(encode_dss_signature(r, s), raw[:0x2A0], ec.ECDSA(hashes.SHA384()))


def test_chain_is_rsa_4096_pss_with_sha384_and_salt_48(tee):
    vcek, ask, ark = load_certificates(tee.vcek_chain_pem)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    for cert, issuer in ((ark, ark), (ask, ark), (vcek, ask)):
        key = issuer.public_key()
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096
        key.verify(cert.signature, cert.tbs_certificate_bytes, pss, hashes.SHA384())
    assert ark.public_bytes(serialization.Encoding.DER) == tee.ark_certificate.public_bytes(
        serialization.Encoding.DER
    )


def test_vcek_extensions_are_der_encoded_like_amds(tee):
    exts = {e.oid.dotted_string: e.value for e in tee.vcek_certificate.extensions}

    def raw(oid: str) -> bytes:
        value = exts[oid]
        assert isinstance(value, x509.UnrecognizedExtension)
        return value.value

    assert raw("1.3.6.1.4.1.3704.1.1") == b"\x02\x01\x00"
    assert raw("1.3.6.1.4.1.3704.1.2") == b"\x16\x08Milan-B0"
    assert raw("1.3.6.1.4.1.3704.1.3.1") == b"\x02\x01\x03"  # bl of 0x7308000000000003
    assert raw("1.3.6.1.4.1.3704.1.3.3") == b"\x02\x01\x08"  # snp
    assert raw("1.3.6.1.4.1.3704.1.3.8") == b"\x02\x01\x73"  # ucode
    assert raw("1.3.6.1.4.1.3704.1.4") == tee.chip_id  # hwID: 64 raw bytes


def test_reports_are_well_formed_v3_with_fresh_report_ids(tee):
    first = AttestationReport.parse(tee.sign_report(REPORT_DATA))
    second = AttestationReport.parse(tee.sign_report(REPORT_DATA))
    assert first.report_id != second.report_id
    assert (first.version, first.vmpl, first.policy, first.signing_key) == (3, 0, 0x30000, "vcek")
    assert first.product_hint() is Product.MILAN
    assert first.reported_tcb == first.current_tcb == first.committed_tcb == 0x7308000000000003


def test_report_data_must_be_64_bytes(tee):
    with pytest.raises(BadRequest, match="REPORT_DATA must be 64 bytes, found 32"):
        tee.sign_report(bytes(32))


# --- persistence -----------------------------------------------------------------------------------


def test_state_files_are_private(state_dir):
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    files = sorted(p.name for p in state_dir.iterdir())
    assert {"ark.key", "ark.pem", "ask.key", "ask.pem", "vcek.key", "vcek.pem", "chip_seed.bin"} <= set(files)
    for path in state_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_reload_gives_the_same_identity(tee, state_dir):
    again = VirtualTee.load_or_create(state_dir, security_policy=POLICY)
    assert again.vcek_chain_pem == tee.vcek_chain_pem
    assert (again.chip_id, again.measurement, again.host_data) == (
        tee.chip_id,
        tee.measurement,
        tee.host_data,
    )
    verify_evidence_chain(
        again.sign_report(REPORT_DATA), tee.vcek_chain_pem, trusted_arks=[tee.ark_certificate]
    )


def test_widened_file_modes_are_tightened_on_load(state_copy):
    (state_copy / "ark.key").chmod(0o644)
    VirtualTee.load_or_create(state_copy, security_policy=POLICY)
    assert stat.S_IMODE((state_copy / "ark.key").stat().st_mode) == 0o600


def test_new_tcb_reissues_only_the_vcek(tee, state_copy):
    newer = TcbVersion.from_parts(Product.MILAN, bl=4, tee=0, snp=24, ucode=217).raw
    moved = VirtualTee.load_or_create(state_copy, security_policy=POLICY, reported_tcb=newer)
    vcek, ask, ark = load_certificates(moved.vcek_chain_pem)
    assert ark == tee.ark_certificate and ask == load_certificates(tee.vcek_chain_pem)[1]
    assert vcek != tee.vcek_certificate
    verified = verify_evidence_chain(moved.sign_report(REPORT_DATA), moved.vcek_chain_pem, trusted_arks=[ark])
    assert verified.report.reported_tcb == newer
    assert (verified.vek_info.snp_spl, verified.vek_info.ucode_spl) == (24, 217)


def test_turin_uses_its_tcb_layout_and_an_8_byte_hwid(tee, state_copy):
    tcb = TcbVersion.from_parts(Product.TURIN, fmc=1, bl=2, tee=3, snp=4, ucode=5)
    turin = VirtualTee.load_or_create(
        state_copy, security_policy=POLICY, product=Product.TURIN, reported_tcb=tcb.raw
    )
    verified = verify_evidence_chain(
        turin.sign_report(REPORT_DATA), turin.vcek_chain_pem, trusted_arks=[tee.ark_certificate]
    )
    assert verified.product is Product.TURIN
    assert verified.vek_info.hwid == turin.chip_id[:8] and turin.chip_id[8:] == bytes(56)
    assert verified.vek_info.fmc_spl == 1 and verified.vek_info.struct_version == 1


def test_turin_refuses_a_tcb_with_reserved_bytes_set(state_copy):
    with pytest.raises(ConfigError, match="reserved bytes of the Turin TCB layout"):
        VirtualTee.load_or_create(state_copy, security_policy=POLICY, product=Product.TURIN)


def test_version_2_reports_carry_no_cpuid_and_still_verify(tee, state_dir):
    v2 = VirtualTee.load_or_create(state_dir, security_policy=POLICY, report_version=2)
    raw = v2.sign_report(REPORT_DATA)
    report = AttestationReport.parse(raw)
    assert (report.version, report.cpuid_fam_id, report.product_hint()) == (2, 0, None)
    assert (
        verify_report(
            report,
            v2.vcek_certificate,
            load_certificates(v2.vcek_chain_pem)[1:],
            trusted_arks=[tee.ark_certificate],
        ).product
        is Product.MILAN
    )


def test_measurement_vmpl_and_policy_are_configurable(tee, state_dir):
    configured = VirtualTee.load_or_create(
        state_dir, security_policy=POLICY, measurement=b"\x42" * 48, vmpl=2, guest_policy=0x3001F
    )
    report = AttestationReport.parse(configured.sign_report(REPORT_DATA))
    assert (report.measurement, report.vmpl, report.policy) == (b"\x42" * 48, 2, 0x3001F)
    assert tee.measurement != b"\x42" * 48 and len(tee.measurement) == 48


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"measurement": b"short"}, "measurement must be 48 bytes"),
        ({"vmpl": 4}, "VMPL must be 0-3"),
        ({"report_version": 4}, "report versions 2, 3 or 5"),
        ({"guest_policy": 1 << 64}, "64-bit"),
    ],
)
def test_unusable_settings_are_config_errors(state_dir, settings, message):
    with pytest.raises(ConfigError, match=message):
        VirtualTee.load_or_create(state_dir, security_policy=POLICY, **settings)


# --- the provider protocol -------------------------------------------------------------------------


async def test_collect_returns_evidence_bound_to_the_report_data(tee):
    runtime = b'{"keys":[]}'
    evidence = await tee.collect(report_data_for(runtime))
    provider: EvidenceProvider = tee  # statically a provider, too
    assert isinstance(provider, EvidenceProvider) and provider.name == "virtual"
    assert evidence.provider == "virtual"
    assert evidence.endorsed_tcb == "7308000000000003"
    assert evidence.vcek_chain_pem == tee.vcek_chain_pem
    verified = verify_evidence_chain(
        evidence.report, evidence.vcek_chain_pem, trusted_arks=[tee.ark_certificate]
    )
    assert verified.report.report_data == hashlib.sha256(runtime).digest() + bytes(32)
    await tee.aclose()


def test_repr_names_no_key_material(tee):
    text = repr(tee)
    assert text.startswith("VirtualTee(product=Milan")
    assert "PRIVATE" not in text and "BEGIN" not in text
