"""The ATTESTATION_REPORT codec against genuine reports and an independent byte layout."""

from __future__ import annotations

import binascii
import dataclasses
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skr.errors import ReportError
from skr.snp.report import (
    REPORT_SIZE,
    SIGNED_SIZE,
    AttestationReport,
    GuestPolicy,
    Product,
    TcbVersion,
    product_from_cpuid,
)

# Every genuine report listed in EXPECTED.json["snp"]; test_every_expected_case_is_covered keeps this honest.
GENUINE = [
    "snp/virtee-sev/report_milan.hex",
    "snp/go-sev-guest/attestation.bin",
    "snp/trustee/test-report.bin",
    "snp/trustee/test-vlek-report.bin",
    "snp/trustee/e2e-evidence-genoa.report.DERIVED.bin",
    "snp/aci-confidential-sidecar/snp_report.bin",
    "azure-vtpm/trustee-az-snp-vtpm/hcl-report.snp_report.DERIVED.bin",
    "azure-vtpm/trustee-az-snp-vtpm/evidence-genoa.snp_report.DERIVED.bin",
    "maa/sevsnpvm-aci-request.snp_report.DERIVED.bin",
]


def report_bytes(vectors: Path, relative: str) -> bytes:
    """A genuine report as raw bytes (the .hex vector holds hex text)."""
    data = (vectors / relative).read_bytes()
    return binascii.unhexlify(b"".join(data.split())) if relative.endswith(".hex") else data


def case_for(expected: dict[str, Any], relative: str) -> dict[str, Any]:
    (case,) = [c for c in expected["snp"] if c["report"] == relative]
    found: dict[str, Any] = case
    return found


def test_every_expected_case_is_covered(expected):
    assert sorted(c["report"] for c in expected["snp"]) == sorted(GENUINE)


# --- genuine reports -------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", GENUINE)
def test_genuine_report_fields_equal_expected(vectors, expected, relative):
    case = case_for(expected, relative)
    report = AttestationReport.parse(report_bytes(vectors, relative))
    product = Product(case["product"])

    assert report.version == case["version"]
    assert report.guest_svn == case["guest_svn"]
    assert report.policy == int(case["policy"], 16)
    assert report.vmpl == case["vmpl"]
    assert report.signature_algo == 1
    assert report.platform_info == int(case["platform_info"], 16)
    assert report.key_info == int(case["key_info"], 16)
    assert report.signing_key == case["signing_key"].lower()
    assert report.reported_tcb == int(case["reported_tcb_raw"], 16)
    tcb = report.reported_tcb_version(product)
    assert {k: getattr(tcb, k) for k in ("bl", "tee", "snp", "ucode")} == case["reported_tcb"]
    assert (
        f"{report.current_major}.{report.current_minor} (build {report.current_build})" == case["current_fw"]
    )
    assert [report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step] == case["cpuid"]
    for name in ("report_data", "measurement", "host_data", "id_key_digest", "report_id", "chip_id"):
        assert getattr(report, name).hex() == case[name], name


@pytest.mark.parametrize("relative", GENUINE)
def test_parse_then_serialize_returns_the_genuine_bytes(vectors, relative):
    raw = report_bytes(vectors, relative)
    report = AttestationReport.parse(raw)
    assert report.serialize() == raw
    assert report.signed_bytes() == raw[:SIGNED_SIZE]


def test_hex_vector_and_its_binary_form_are_the_same_report(vectors):
    from_hex = report_bytes(vectors, "snp/virtee-sev/report_milan.hex")
    from_bin = (vectors / "snp/virtee-sev/report_milan.DERIVED.bin").read_bytes()
    assert AttestationReport.parse(from_hex) == AttestationReport.parse(from_bin)


def test_vlek_report_key_info_selects_the_vlek(vectors):
    report = AttestationReport.parse(report_bytes(vectors, "snp/trustee/test-vlek-report.bin"))
    assert report.key_info == 0x4
    assert (report.signing_key, report.author_key_en, report.mask_chip_key) == ("vlek", False, False)
    assert report.chip_id == bytes(64)


def test_product_hint_comes_from_cpuid_in_v3_reports_only(vectors):
    hints = {
        relative: AttestationReport.parse(report_bytes(vectors, relative)).product_hint()
        for relative in GENUINE
    }
    assert hints["snp/trustee/test-vlek-report.bin"] is Product.MILAN  # family 0x19 model 0x01
    assert hints["snp/trustee/e2e-evidence-genoa.report.DERIVED.bin"] is Product.GENOA  # model 0xA0
    assert hints["azure-vtpm/trustee-az-snp-vtpm/evidence-genoa.snp_report.DERIVED.bin"] is Product.GENOA
    assert hints["snp/virtee-sev/report_milan.hex"] is None  # v2: no CPUID


@pytest.mark.parametrize(
    ("family", "model", "product"),
    [
        (0x19, 0x01, Product.MILAN),
        (0x19, 0x11, Product.GENOA),
        (0x19, 0xA0, Product.GENOA),
        (0x1A, 0x02, Product.TURIN),
        (0x1A, 0x11, Product.TURIN),
        (0x19, 0x50, None),
        (0x17, 0x31, None),
    ],
)
def test_product_from_cpuid(family, model, product):
    assert product_from_cpuid(family, model) is product


# --- an independent construction of the layout (docs/wire-formats.md §7) ------------------------


def handmade_report(version: int = 5) -> bytes:
    """A report with a distinct value in every field, written offset by offset with struct."""
    buf = bytearray(REPORT_SIZE)
    struct.pack_into("<IIQ", buf, 0x000, version, 0x11223344, 0x000000000103001F)
    buf[0x010:0x020] = bytes([0xF1]) * 16
    buf[0x020:0x030] = bytes([0xF2]) * 16
    struct.pack_into("<IIQQI", buf, 0x030, 2, 1, 0x0A0B000000000C0D, 0x25, 0x1)
    for offset, size, fill in [
        (0x050, 64, 0xA1),
        (0x090, 48, 0xA2),
        (0x0C0, 32, 0xA3),
        (0x0E0, 48, 0xA4),
        (0x110, 48, 0xA5),
        (0x140, 32, 0xA6),
        (0x160, 32, 0xA7),
        (0x1A0, 64, 0xA8),
    ]:
        buf[offset : offset + size] = bytes([fill]) * size
    struct.pack_into("<Q", buf, 0x180, 0x7308000000000003)
    buf[0x188:0x18B] = bytes([0x19, 0x11, 0x01])
    struct.pack_into("<Q", buf, 0x1E0, 0x7208000000000002)
    buf[0x1E8:0x1EB] = bytes([40, 55, 1])
    buf[0x1EC:0x1EF] = bytes([39, 54, 1])
    struct.pack_into("<QQQ", buf, 0x1F0, 0x7108000000000001, 0xAA, 0xBB)
    buf[0x2A0 : 0x2A0 + 72] = (12345).to_bytes(72, "little")
    buf[0x2E8 : 0x2E8 + 72] = (67890).to_bytes(72, "little")
    return bytes(buf)


def test_every_field_sits_at_its_abi_offset():
    report = AttestationReport.parse(handmade_report())
    assert (report.version, report.guest_svn, report.policy) == (5, 0x11223344, 0x103001F)
    assert (report.family_id, report.image_id) == (b"\xf1" * 16, b"\xf2" * 16)
    assert (report.vmpl, report.signature_algo) == (2, 1)
    assert (report.current_tcb, report.platform_info, report.key_info) == (0x0A0B000000000C0D, 0x25, 0x1)
    assert report.report_data == b"\xa1" * 64
    assert report.measurement == b"\xa2" * 48
    assert report.host_data == b"\xa3" * 32
    assert report.id_key_digest == b"\xa4" * 48
    assert report.author_key_digest == b"\xa5" * 48
    assert report.report_id == b"\xa6" * 32
    assert report.report_id_ma == b"\xa7" * 32
    assert report.reported_tcb == 0x7308000000000003
    assert (report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step) == (0x19, 0x11, 0x01)
    assert report.chip_id == b"\xa8" * 64
    assert report.committed_tcb == 0x7208000000000002
    assert (report.current_build, report.current_minor, report.current_major) == (40, 55, 1)
    assert (report.committed_build, report.committed_minor, report.committed_major) == (39, 54, 1)
    assert report.launch_tcb == 0x7108000000000001
    assert (report.launch_mit_vector, report.current_mit_vector) == (0xAA, 0xBB)
    assert (report.signature_r, report.signature_s) == (12345, 67890)
    assert report.author_key_en and report.signing_key == "vcek"


def test_handmade_report_serializes_back_byte_for_byte():
    raw = handmade_report()
    assert AttestationReport.parse(raw).serialize() == raw


def test_version_4_is_read_with_the_version_3_layout():
    raw = bytearray(handmade_report(version=4))
    raw[0x1F8:0x208] = bytes(16)  # mitigation vectors are reserved before v5
    report = AttestationReport.parse(bytes(raw))
    assert (report.version, report.cpuid_fam_id) == (4, 0x19)


# --- TCB_VERSION, GUEST_POLICY ---------------------------------------------------------------------


def test_milan_tcb_worked_example():
    tcb = TcbVersion.from_raw(0x7308000000000003, Product.MILAN)
    assert (tcb.bl, tcb.tee, tcb.snp, tcb.ucode, tcb.fmc) == (3, 0, 8, 115, None)
    assert tcb.to_dict() == {"raw": "0x7308000000000003", "bl": 3, "tee": 0, "snp": 8, "ucode": 115}


def test_turin_tcb_bytes_are_fmc_bl_tee_snp_then_ucode():
    raw = int.from_bytes(bytes([4, 3, 2, 1, 0, 0, 0, 9]), "little")
    tcb = TcbVersion.from_raw(raw, Product.TURIN)
    assert (tcb.fmc, tcb.bl, tcb.tee, tcb.snp, tcb.ucode) == (4, 3, 2, 1, 9)
    assert TcbVersion.from_parts(Product.TURIN, fmc=4, bl=3, tee=2, snp=1, ucode=9).raw == raw


def test_genoa_tcb_from_parts_matches_the_wire_bytes():
    tcb = TcbVersion.from_parts(Product.GENOA, bl=10, tee=0, snp=23, ucode=84)
    assert tcb.raw.to_bytes(8, "little") == bytes([10, 0, 0, 0, 0, 0, 23, 84])
    assert tcb.raw == 0x541700000000000A


def test_fmc_exists_on_turin_only():
    with pytest.raises(ReportError, match="Turin only"):
        TcbVersion.from_parts(Product.MILAN, bl=1, tee=0, snp=1, ucode=1, fmc=1)


def test_tcb_comparison_is_per_component():
    low = TcbVersion.from_parts(Product.MILAN, bl=3, tee=0, snp=8, ucode=115)
    high_snp = TcbVersion.from_parts(Product.MILAN, bl=2, tee=0, snp=9, ucode=115)
    assert low.is_at_least(low)
    assert not low.is_at_least(high_snp)
    assert not high_snp.is_at_least(low)  # bl is lower


def test_guest_policy_bits_are_named():
    policy = GuestPolicy.from_raw(0x3001F)
    assert (policy.abi_major, policy.abi_minor) == (0, 0x1F)
    assert policy.smt and policy.reserved_one_set and not policy.debug and not policy.migrate_ma
    debug = GuestPolicy.from_raw(0xB0000)  # go-sev-guest's attestation.bin
    assert debug.debug and not debug.single_socket


@pytest.mark.parametrize(
    ("bit", "name"),
    [
        (16, "smt"),
        (18, "migrate_ma"),
        (19, "debug"),
        (20, "single_socket"),
        (21, "cxl_allow"),
        (22, "mem_aes_256_xts"),
        (23, "rapl_dis"),
        (24, "ciphertext_hiding"),
        (25, "page_swap_disable"),
    ],
)
def test_each_guest_policy_bit(bit, name):
    policy = GuestPolicy.from_raw(1 << 17 | 1 << bit)
    flags = {k: v for k, v in policy.to_dict().items() if isinstance(v, bool)}
    assert [k for k, v in flags.items() if v] == [name]
    assert policy.unknown_bits == 0


def test_unknown_policy_bits_are_reported_not_rejected():
    policy = GuestPolicy.from_raw(1 << 17 | 1 << 40)
    assert policy.unknown_bits == 1 << 40


# --- strictness ------------------------------------------------------------------------------------


def patched(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


@pytest.mark.parametrize("size", [0, 1, REPORT_SIZE - 1, REPORT_SIZE + 1, 2 * REPORT_SIZE])
def test_wrong_size_is_a_report_error(size):
    with pytest.raises(ReportError, match=f"found {size}"):
        AttestationReport.parse(bytes(size))


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unknown_version_is_a_report_error(vectors, version):
    raw = report_bytes(vectors, GENUINE[0])
    with pytest.raises(ReportError, match="unsupported report version"):
        AttestationReport.parse(patched(raw, 0, version.to_bytes(4, "little")))


@pytest.mark.parametrize("algo", [0, 2, 0x100])
def test_unknown_signature_algorithm_is_a_report_error(vectors, algo):
    raw = report_bytes(vectors, GENUINE[0])
    with pytest.raises(ReportError, match="signature algorithm"):
        AttestationReport.parse(patched(raw, 0x34, algo.to_bytes(4, "little")))


@pytest.mark.parametrize("selector", [2, 3, 4, 5, 6])
def test_reserved_signing_key_selector_is_a_report_error(vectors, selector):
    raw = report_bytes(vectors, GENUINE[0])
    with pytest.raises(ReportError, match="signing-key selector"):
        AttestationReport.parse(patched(raw, 0x48, (selector << 2).to_bytes(4, "little")))


def test_signing_key_none_is_decoded():
    raw = patched(handmade_report(), 0x48, (7 << 2 | 2).to_bytes(4, "little"))
    report = AttestationReport.parse(raw)
    assert (report.signing_key, report.mask_chip_key, report.author_key_en) == ("none", True, False)


@pytest.mark.parametrize("offset", [0x04C, 0x18B, 0x19F, 0x1EB, 0x1EF, 0x208, 0x29F, 0x330, 0x49F])
def test_nonzero_reserved_byte_is_a_report_error(vectors, offset):
    raw = report_bytes(vectors, GENUINE[0])
    with pytest.raises(ReportError, match="reserved bytes"):
        AttestationReport.parse(patched(raw, offset, b"\x01"))


def test_cpuid_bytes_are_reserved_in_version_2(vectors):
    raw = report_bytes(vectors, "snp/virtee-sev/report_milan.hex")
    with pytest.raises(ReportError, match="reserved bytes 0x188"):
        AttestationReport.parse(patched(raw, 0x188, b"\x19"))


def test_mitigation_vectors_are_reserved_before_version_5(vectors):
    raw = report_bytes(vectors, "snp/trustee/test-vlek-report.bin")
    with pytest.raises(ReportError, match="reserved bytes 0x1F8"):
        AttestationReport.parse(patched(raw, 0x1F8, b"\x01"))


def test_non_bytes_input_is_a_report_error():
    with pytest.raises(ReportError):
        AttestationReport.parse("00" * REPORT_SIZE)  # type: ignore[arg-type]


def test_constructing_an_out_of_range_field_is_a_report_error(vectors):
    report = AttestationReport.parse(report_bytes(vectors, GENUINE[0]))
    with pytest.raises(ReportError, match="vmpl"):
        dataclasses.replace(report, vmpl=1 << 32)
    with pytest.raises(ReportError, match="report_data must be 64 bytes"):
        dataclasses.replace(report, report_data=b"short")


# --- JSON ------------------------------------------------------------------------------------------


def test_json_dict_names_every_field_with_hex_bytes_and_tcb_objects(vectors, expected):
    relative = "snp/aci-confidential-sidecar/snp_report.bin"
    out = AttestationReport.parse(report_bytes(vectors, relative)).to_json_dict()
    assert {f.name for f in dataclasses.fields(AttestationReport)} <= set(out)
    assert out["host_data"] == case_for(expected, relative)["host_data"]
    assert out["reported_tcb"] == {"raw": "0x7308000000000003", "bl": 3, "tee": 0, "snp": 8, "ucode": 115}
    assert out["current_tcb"]["raw"] == "0x7308000000000003"
    assert out["cpuid_fam_id"] is None  # v2 has no CPUID
    assert out["guest_policy"]["smt"] is True
    assert out["signing_key"] == "vcek"


# --- properties ------------------------------------------------------------------------------------

_u8 = st.integers(0, 0xFF)
_u32 = st.integers(0, 0xFFFF_FFFF)
_u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
_sig = st.integers(0, (1 << 576) - 1)


@st.composite
def valid_reports(draw: st.DrawFn) -> AttestationReport:
    version = draw(st.sampled_from([2, 3, 4, 5]))
    has_cpuid, has_mit = version >= 3, version >= 5
    key_info = draw(st.integers(0, 3)) | draw(st.sampled_from([0, 1, 7])) << 2 | draw(_u32) >> 5 << 5
    return AttestationReport(
        version=version,
        guest_svn=draw(_u32),
        policy=draw(_u64),
        family_id=draw(st.binary(min_size=16, max_size=16)),
        image_id=draw(st.binary(min_size=16, max_size=16)),
        vmpl=draw(_u32),
        signature_algo=1,
        current_tcb=draw(_u64),
        platform_info=draw(_u64),
        key_info=key_info,
        report_data=draw(st.binary(min_size=64, max_size=64)),
        measurement=draw(st.binary(min_size=48, max_size=48)),
        host_data=draw(st.binary(min_size=32, max_size=32)),
        id_key_digest=draw(st.binary(min_size=48, max_size=48)),
        author_key_digest=draw(st.binary(min_size=48, max_size=48)),
        report_id=draw(st.binary(min_size=32, max_size=32)),
        report_id_ma=draw(st.binary(min_size=32, max_size=32)),
        reported_tcb=draw(_u64),
        cpuid_fam_id=draw(_u8) if has_cpuid else 0,
        cpuid_mod_id=draw(_u8) if has_cpuid else 0,
        cpuid_step=draw(_u8) if has_cpuid else 0,
        chip_id=draw(st.binary(min_size=64, max_size=64)),
        committed_tcb=draw(_u64),
        current_build=draw(_u8),
        current_minor=draw(_u8),
        current_major=draw(_u8),
        committed_build=draw(_u8),
        committed_minor=draw(_u8),
        committed_major=draw(_u8),
        launch_tcb=draw(_u64),
        launch_mit_vector=draw(_u64) if has_mit else 0,
        current_mit_vector=draw(_u64) if has_mit else 0,
        signature_r=draw(_sig),
        signature_s=draw(_sig),
    )


@given(valid_reports())
def test_parse_inverts_serialize_on_generated_reports(report):
    raw = report.serialize()
    assert len(raw) == REPORT_SIZE
    again = AttestationReport.parse(raw)
    assert again == report
    assert again.serialize() == raw


def accepted_exactly_or_report_error(data: bytes) -> bool:
    """Parse ``data``; anything accepted must serialize back to the same bytes."""
    try:
        report = AttestationReport.parse(data)
    except ReportError:
        return True
    return report.serialize() == data


@given(st.one_of(st.binary(max_size=2 * REPORT_SIZE), st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE)))
def test_arbitrary_bytes_raise_nothing_but_report_error(data):
    assert accepted_exactly_or_report_error(data)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), _u8), min_size=1, max_size=8))
def test_mutated_genuine_reports_raise_nothing_but_report_error(vectors, edits):
    raw = bytearray(report_bytes(vectors, "snp/trustee/test-vlek-report.bin"))
    for offset, value in edits:
        raw[offset] = value
    assert accepted_exactly_or_report_error(bytes(raw))
