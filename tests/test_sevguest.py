"""/dev/sev-guest and /dev/sev: uapi structures byte for byte, then the providers against a simulated kernel.

The simulated kernel is an ioctl function that reads the request structures through the addresses the
provider put in them and writes a response holding a *genuine* report, like the driver would.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import os
import struct
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from skr.errors import BadRequest, ConfigError, EvidenceUnavailable
from skr.evidence import create_provider
from skr.evidence.certtable import ARK_GUID, ASK_GUID, VCEK_GUID, parse_cert_table
from skr.evidence.context import SecurityContext
from skr.evidence.sevguest import (
    SEV_SNP_GUEST_MSG_REPORT,
    SNP_GET_EXT_REPORT,
    SNP_GET_REPORT,
    LegacySevProvider,
    SevGuestProvider,
    pack_ext_report_request,
    pack_guest_request,
    pack_legacy_request,
    pack_report_request,
    parse_report_response,
)
from skr.evidence.tsm import TsmProvider
from skr.server import http_status
from skr.snp.kds import parse_thim_json
from skr.snp.report import AttestationReport
from skr.snp.verify import verify_evidence_chain

ACI = "snp/aci-confidential-sidecar"
AT = datetime(2024, 6, 1, tzinfo=UTC)


def _iowr(kind: str, nr: int, size: int) -> int:
    """Linux _IOWR on x86-64: dir (read|write = 3) << 30 | size << 16 | type << 8 | nr."""
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | nr


def test_ioctl_numbers_are_iowr_s_with_the_struct_sizes() -> None:
    assert SNP_GET_REPORT == _iowr("S", 0x0, 32) == 0xC0205300
    assert SNP_GET_EXT_REPORT == _iowr("S", 0x2, 32) == 0xC0205302
    assert SEV_SNP_GUEST_MSG_REPORT == _iowr("S", 0x1, 40) == 0xC0285301


# --- structures ------------------------------------------------------------------------------------


def test_guest_request_ioctl_layout() -> None:
    packed = pack_guest_request(0x1122334455667788, 0x99AABBCCDDEEFF00)
    expected = (
        bytes([1])  # u8 msg_version
        + bytes(7)  # padding to the u64 alignment
        + (0x1122334455667788).to_bytes(8, "little")  # req_data
        + (0x99AABBCCDDEEFF00).to_bytes(8, "little")  # resp_data
        + bytes(8)  # exitinfo2 (fw_error, vmm_error)
    )
    assert packed == expected
    assert len(packed) == 32


def test_report_request_layout() -> None:
    user_data = bytes(range(64))
    packed = pack_report_request(user_data, 2)
    assert packed == user_data + (2).to_bytes(4, "little") + bytes(28)
    assert len(packed) == 96


def test_ext_report_request_layout() -> None:
    user_data = bytes(range(64))
    packed = pack_ext_report_request(user_data, 1, 0x7F0000001000, 0x4000)
    assert len(packed) == 112  # 96 + u64 + u32, padded to 8
    assert packed[:96] == user_data + (1).to_bytes(4, "little") + bytes(28)
    assert packed[96:104] == (0x7F0000001000).to_bytes(8, "little")
    assert packed[104:108] == (0x4000).to_bytes(4, "little")
    assert packed[108:] == bytes(4)


def test_legacy_request_layout() -> None:
    packed = pack_legacy_request(0xAAAA, 0xBBBB)
    expected = bytearray(40)
    expected[0], expected[1], expected[2] = 5, 6, 1  # MSG_REPORT_REQ, MSG_REPORT_RSP, msg_version
    expected[4:6] = (96).to_bytes(2, "little")  # request_len
    expected[8:16] = (0xAAAA).to_bytes(8, "little")  # request_uaddr
    expected[16:18] = (1280).to_bytes(2, "little")  # response_len
    expected[24:32] = (0xBBBB).to_bytes(8, "little")  # response_uaddr
    assert packed == bytes(expected)  # error (u32 @32) and padding are zero


def _response(report: bytes, *, status: int = 0, size: int | None = None, total: int = 4000) -> bytes:
    header = status.to_bytes(4, "little") + (len(report) if size is None else size).to_bytes(4, "little")
    body = header + bytes(24) + report
    return body + bytes(total - len(body))


def test_report_response_yields_the_genuine_report(vectors: Path) -> None:
    report = (vectors / ACI / "snp_report.bin").read_bytes()
    assert parse_report_response(_response(report), device="test") == report


def test_report_response_firmware_status_is_reported_by_name(vectors: Path) -> None:
    report = (vectors / ACI / "snp_report.bin").read_bytes()
    with pytest.raises(EvidenceUnavailable, match=r"status 0x16 \(INVALID_PARAM\)"):
        parse_report_response(_response(report, status=0x16), device="test")
    with pytest.raises(EvidenceUnavailable, match="1000-byte report"):
        parse_report_response(_response(report, size=1000), device="test")


# --- certificate table -----------------------------------------------------------------------------


def _aci_chain_der(vectors: Path) -> tuple[bytes, bytes, bytes]:
    """VCEK, ASK, ARK of the ACI host, as DER, decoded here with the standard library only."""
    pem = (vectors / ACI / "uvm_host_amd_certificate.pem").read_text()
    blocks = [b.split("-----END CERTIFICATE-----")[0] for b in pem.split("-----BEGIN CERTIFICATE-----")[1:]]
    vcek, ask, ark = (base64.b64decode("".join(b.split())) for b in blocks)
    return vcek, ask, ark


def _cert_table(entries: list[tuple[str, bytes]], *, pad_to: int = 0) -> bytes:
    """The GHCB table: 24-byte entries (GUID, u32 offset, u32 length), a zero entry, then the blobs."""
    header_size = 24 * (len(entries) + 1)
    header, blobs = b"", b""
    for guid, blob in entries:
        header += uuid.UUID(guid).bytes + struct.pack("<II", header_size + len(blobs), len(blob))
        blobs += blob
    table = header + bytes(24) + blobs
    return table + bytes(max(0, pad_to - len(table)))


VCEK = "63da758d-e664-4564-adc5-f4b93be8accd"
ASK = "4ab7b379-bbac-4fe4-a02f-05aef327c782"
ARK = "c0b406a4-a803-4952-9743-3fb6014cd0ae"


def test_cert_table_guids_are_the_ghcb_ones() -> None:
    assert (str(VCEK_GUID), str(ASK_GUID), str(ARK_GUID)) == (VCEK, ASK, ARK)


def test_cert_table_parses_entries_and_builds_the_chain(vectors: Path) -> None:
    vcek, ask, ark = _aci_chain_der(vectors)
    unknown = "11111111-2222-3333-4444-555555555555"
    table = parse_cert_table(
        _cert_table([(ARK, ark), (unknown, b"x"), (VCEK, vcek), (ASK, ask)], pad_to=16384)
    )
    assert [e.name for e in table.entries] == ["ARK", unknown, "VCEK", "ASK"]
    assert table.get(VCEK_GUID) == vcek
    chain = table.chain_pem()
    assert chain is not None
    report = (vectors / ACI / "snp_report.bin").read_bytes()
    verify_evidence_chain(report, chain, at=AT)  # VCEK first, then ASK, then ARK


def test_cert_table_without_vcek_has_no_chain(vectors: Path) -> None:
    _, ask, ark = _aci_chain_der(vectors)
    assert parse_cert_table(_cert_table([(ASK, ask), (ARK, ark)])).chain_pem() is None
    assert parse_cert_table(bytes(4096)).entries == ()


@pytest.mark.parametrize(
    "blob",
    [
        uuid.UUID(VCEK).bytes + struct.pack("<II", 48, 10_000) + bytes(24),  # past the end
        uuid.UUID(VCEK).bytes + struct.pack("<II", 8, 4) + bytes(24),  # inside the header
        uuid.UUID(VCEK).bytes + struct.pack("<II", 48, 4),  # no terminator
    ],
)
def test_malformed_cert_table_is_rejected(blob: bytes) -> None:
    with pytest.raises(EvidenceUnavailable):
        parse_cert_table(blob + bytes(8))


# --- the simulated kernel --------------------------------------------------------------------------


@dataclass
class FakeSevGuest:
    """Plays the sev-guest driver: reads the request through its addresses, writes the response."""

    device: Path
    report: bytes
    table: bytes = b""
    ext_supported: bool = True
    errors: list[tuple[int, int]] = field(default_factory=list)  # (errno, exitinfo2) answered first
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(self.device)
        if request == SEV_SNP_GUEST_MSG_REPORT:
            return self._legacy(arg)
        version, req_addr, resp_addr, _ = struct.unpack("<B7xQQQ", bytes(arg))
        assert version == 1
        size = 112 if request == SNP_GET_EXT_REPORT else 96
        user_data, vmpl = struct.unpack_from("<64sI", ctypes.string_at(req_addr, size))
        call: dict[str, Any] = {"request": request, "user_data": user_data, "vmpl": vmpl}
        self.calls.append(call)
        if request == SNP_GET_EXT_REPORT:
            if not self.ext_supported:
                raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
            certs_addr, certs_len = struct.unpack_from("<QI", ctypes.string_at(req_addr, size), 96)
            call["certs_len"] = certs_len
            if certs_len < len(self.table):
                needed = -(-len(self.table) // 4096) * 4096
                ctypes.memmove(req_addr + 104, needed.to_bytes(4, "little"), 4)
                self._fail(arg, errno.EIO, 1 << 32)  # VMM error 1: INVALID_LEN
            ctypes.memmove(certs_addr, self.table, len(self.table))
        if self.errors:
            self._fail(arg, *self.errors.pop(0))
        ctypes.memmove(resp_addr, _response(self.report), 4000)
        return 0

    def _legacy(self, arg: Any) -> int:
        fields = struct.unpack("<BBBxH2xQH6xQI4x", bytes(arg))
        req_type, rsp_type, version, req_len, req_addr, resp_len, resp_addr, _ = fields
        assert (req_type, rsp_type, version, req_len, resp_len) == (5, 6, 1, 96, 1280)
        user_data, vmpl = struct.unpack_from("<64sI", ctypes.string_at(req_addr, req_len))
        self.calls.append({"request": SEV_SNP_GUEST_MSG_REPORT, "user_data": user_data, "vmpl": vmpl})
        ctypes.memmove(resp_addr, _response(self.report, total=1280), 1280)
        return 0

    @staticmethod
    def _fail(arg: Any, code: int, exitinfo2: int) -> None:
        arg[24:32] = exitinfo2.to_bytes(8, "little")
        raise OSError(code, os.strerror(code))


def _genuine(vectors: Path) -> tuple[bytes, AttestationReport]:
    raw = (vectors / ACI / "snp_report.bin").read_bytes()
    return raw, AttestationReport.parse(raw)


def _device(tmp_path: Path, name: str = "sev-guest") -> Path:
    path = tmp_path / name
    path.write_bytes(b"")
    return path


def _aci_context(vectors: Path, policy: bytes | None = None) -> SecurityContext:
    return SecurityContext(
        directory=None,
        security_policy=policy
        if policy is not None
        else base64.b64decode((vectors / ACI / "uvm_security_policy.base64").read_bytes()),
        thim=parse_thim_json((vectors / ACI / "uvm_host_amd_certificate.json").read_bytes()),
        uvm_reference_info=(vectors / ACI / "body.uvm_reference_info.bin").read_bytes(),
    )


def _device_fds(device: Path) -> list[str]:
    fds = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == str(device):
                fds.append(entry)
        except OSError:
            continue
    return fds


# --- SevGuestProvider ------------------------------------------------------------------------------


async def test_extended_report_brings_the_genuine_report_and_its_host_chain(
    vectors: Path, tmp_path: Path
) -> None:
    raw, report = _genuine(vectors)
    vcek, ask, ark = _aci_chain_der(vectors)
    device = _device(tmp_path)
    kernel = FakeSevGuest(device, raw, table=_cert_table([(VCEK, vcek), (ASK, ask), (ARK, ark)]))
    provider = SevGuestProvider(device=device, ioctl=kernel)

    evidence = await provider.collect(report.report_data)

    assert evidence.report == raw
    assert evidence.provider == "sevguest"
    assert [c["request"] for c in kernel.calls] == [SNP_GET_EXT_REPORT]
    assert kernel.calls[0]["user_data"] == report.report_data
    assert kernel.calls[0]["vmpl"] == 0
    verify_evidence_chain(evidence.report, evidence.vcek_chain_pem, at=AT)
    assert evidence.endorsed_tcb == "7308000000000003"
    assert _device_fds(device) == []  # closed after the call


async def test_host_table_with_a_vcek_for_another_tcb_is_passed_over(vectors: Path, tmp_path: Path) -> None:
    raw, report = _genuine(vectors)
    _, ask, ark = _aci_chain_der(vectors)
    stale_vcek = (vectors / "snp/go-sev-guest/vcek.der").read_bytes()  # issued for TCB 0x4405000000000002
    device = _device(tmp_path)
    kernel = FakeSevGuest(device, raw, table=_cert_table([(VCEK, stale_vcek), (ASK, ask), (ARK, ark)]))
    context = _aci_context(vectors)
    evidence = await SevGuestProvider(device=device, ioctl=kernel, context=context).collect(
        report.report_data
    )
    assert context.thim is not None
    assert evidence.vcek_chain_pem == context.thim.chain_pem()
    verify_evidence_chain(evidence.report, evidence.vcek_chain_pem, at=AT)


async def test_stale_host_table_and_nothing_else_says_which_tcbs_differ(
    vectors: Path, tmp_path: Path
) -> None:
    raw, report = _genuine(vectors)
    _, ask, ark = _aci_chain_der(vectors)
    stale_vcek = (vectors / "snp/go-sev-guest/vcek.der").read_bytes()
    device = _device(tmp_path)
    kernel = FakeSevGuest(device, raw, table=_cert_table([(VCEK, stale_vcek), (ASK, ask), (ARK, ark)]))
    with pytest.raises(EvidenceUnavailable) as info:
        await SevGuestProvider(device=device, ioctl=kernel).collect(report.report_data)
    assert "its VEK is for bl=2 tee=0 snp=5 ucode=68" in info.value.message
    assert "0x7308000000000003" in info.value.message


async def test_invalid_len_is_retried_with_the_size_the_kernel_asks_for(
    vectors: Path, tmp_path: Path
) -> None:
    raw, report = _genuine(vectors)
    vcek, ask, ark = _aci_chain_der(vectors)
    table = _cert_table([(VCEK, vcek), (ASK, ask), (ARK, ark)], pad_to=3 * 4096 + 1)
    device = _device(tmp_path)
    kernel = FakeSevGuest(device, raw, table=table)
    provider = SevGuestProvider(device=device, ioctl=kernel, certs_len=4096)

    evidence = await provider.collect(report.report_data)

    assert [c["certs_len"] for c in kernel.calls] == [4096, 4 * 4096]
    verify_evidence_chain(evidence.report, evidence.vcek_chain_pem, at=AT)
    assert _device_fds(device) == []


async def test_busy_vmm_is_retried(vectors: Path, tmp_path: Path) -> None:
    raw, report = _genuine(vectors)
    device = _device(tmp_path)
    kernel = FakeSevGuest(device, raw, errors=[(errno.EIO, 2 << 32)])
    provider = SevGuestProvider(device=device, ioctl=kernel, context=_aci_context(vectors))
    evidence = await provider.collect(report.report_data)
    assert len(kernel.calls) == 2
    assert evidence.report == raw


async def test_firmware_error_is_reported_by_name(vectors: Path, tmp_path: Path) -> None:
    raw, report = _genuine(vectors)
    device = _device(tmp_path)
    kernel = FakeSevGuest(device, raw, errors=[(errno.EIO, 0x16)])
    provider = SevGuestProvider(device=device, ioctl=kernel, vmpl=1)
    with pytest.raises(EvidenceUnavailable) as info:
        await provider.collect(report.report_data)
    assert "EIO" in info.value.message
    assert "firmware error 0x16 (INVALID_PARAM)" in info.value.message
    assert kernel.calls[0]["vmpl"] == 1
    assert _device_fds(device) == []


async def test_without_extended_reports_the_chain_comes_from_the_security_context(
    vectors: Path, tmp_path: Path
) -> None:
    raw, report = _genuine(vectors)
    device = _device(tmp_path)
    kernel = FakeSevGuest(device, raw, ext_supported=False)
    context = _aci_context(vectors)
    provider = SevGuestProvider(device=device, ioctl=kernel, context=context)

    evidence = await provider.collect(report.report_data)

    assert [c["request"] for c in kernel.calls] == [SNP_GET_EXT_REPORT, SNP_GET_REPORT]
    assert context.thim is not None
    assert evidence.vcek_chain_pem == context.thim.chain_pem()
    assert evidence.endorsed_tcb == "7308000000000003"
    assert evidence.uvm_endorsements == context.uvm_reference_info
    verify_evidence_chain(evidence.report, evidence.vcek_chain_pem, at=AT)


async def test_policy_that_does_not_match_host_data_refuses_the_evidence(
    vectors: Path, tmp_path: Path
) -> None:
    raw, report = _genuine(vectors)
    device = _device(tmp_path)
    provider = SevGuestProvider(
        device=device, ioctl=FakeSevGuest(device, raw), context=_aci_context(vectors, policy=b"package other")
    )
    with pytest.raises(EvidenceUnavailable) as info:
        await provider.collect(report.report_data)
    assert info.value.code == "host_data_mismatch"
    assert report.host_data.hex() in info.value.message


async def test_report_for_other_report_data_is_refused(vectors: Path, tmp_path: Path) -> None:
    raw, _ = _genuine(vectors)
    device = _device(tmp_path)
    provider = SevGuestProvider(device=device, ioctl=FakeSevGuest(device, raw), context=_aci_context(vectors))
    with pytest.raises(EvidenceUnavailable, match="not the requested"):
        await provider.collect(bytes(64))


async def test_a_report_from_the_device_that_does_not_parse_is_unavailable_evidence_not_bad_input(
    vectors: Path, tmp_path: Path
) -> None:
    raw, report = _genuine(vectors)
    device = _device(tmp_path)
    garbage = struct.pack("<I", 0xFFFF) + raw[4:]  # the firmware's fault: a report version nobody defined
    provider = SevGuestProvider(device=device, ioctl=FakeSevGuest(device, garbage))
    with pytest.raises(EvidenceUnavailable, match="returned a report that does not parse") as info:
        await provider.collect(report.report_data)
    assert info.value.code == "device_report_invalid" and http_status(info.value) == 503
    assert info.value.hint is not None and "firmware" in info.value.hint


async def test_no_chain_anywhere_lists_what_was_tried(vectors: Path, tmp_path: Path) -> None:
    raw, report = _genuine(vectors)
    device = _device(tmp_path)
    provider = SevGuestProvider(device=device, ioctl=FakeSevGuest(device, raw))
    with pytest.raises(EvidenceUnavailable) as info:
        await provider.collect(report.report_data)
    assert "host certificate table" in info.value.message
    assert "collateral" in info.value.message


async def test_missing_device_and_wrong_report_data_size(tmp_path: Path) -> None:
    provider = SevGuestProvider(device=tmp_path / "absent")
    with pytest.raises(EvidenceUnavailable, match="does not exist"):
        await provider.collect(bytes(64))
    with pytest.raises(BadRequest, match="exactly 64 bytes"):
        await provider.collect(bytes(32))


# --- LegacySevProvider -----------------------------------------------------------------------------


async def test_legacy_dev_sev_returns_the_genuine_report(vectors: Path, tmp_path: Path) -> None:
    raw, report = _genuine(vectors)
    device = _device(tmp_path, "sev")
    kernel = FakeSevGuest(device, raw)
    provider = LegacySevProvider(device=device, ioctl=kernel, context=_aci_context(vectors))

    evidence = await provider.collect(report.report_data)

    assert evidence.provider == "sev"
    assert evidence.report == raw
    assert kernel.calls == [{"request": SEV_SNP_GUEST_MSG_REPORT, "user_data": report.report_data, "vmpl": 0}]
    verify_evidence_chain(evidence.report, evidence.vcek_chain_pem, at=AT)
    assert _device_fds(device) == []


# --- choosing a provider ---------------------------------------------------------------------------


def test_auto_prefers_dev_sev_guest(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/sev-guest").touch()
    (tmp_path / "dev/sev").touch()
    provider = create_provider("auto", root=tmp_path)
    assert isinstance(provider, SevGuestProvider)
    assert provider.device == tmp_path / "dev/sev-guest"


def test_auto_then_configfs_tsm_then_legacy(tmp_path: Path) -> None:
    (tmp_path / "sys/kernel/config/tsm/report").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/sev").touch()
    assert isinstance(create_provider(root=tmp_path), TsmProvider)
    (tmp_path / "sys/kernel/config/tsm/report").rmdir()
    legacy = create_provider(root=tmp_path)
    assert isinstance(legacy, LegacySevProvider)
    assert legacy.device == tmp_path / "dev/sev"


def test_auto_never_picks_virtual_and_says_what_it_probed(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailable) as info:
        create_provider("auto", root=tmp_path, state_dir=tmp_path / "state", security_policy=b"package p")
    for probed in ("dev/sev-guest", "sys/kernel/config/tsm/report", "dev/sev"):
        assert probed in info.value.message
    assert info.value.hint is not None and "--evidence virtual" in info.value.hint


def test_unknown_kind_and_incomplete_virtual_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown evidence source"):
        create_provider("sgx")
    with pytest.raises(ConfigError, match="state directory"):
        create_provider("virtual", security_policy=b"package p")
    with pytest.raises(ConfigError, match="security policy"):
        create_provider("virtual", state_dir=tmp_path)


def test_explicit_kinds_build_their_providers(tmp_path: Path) -> None:
    assert isinstance(create_provider("sevguest", root=tmp_path), SevGuestProvider)
    assert isinstance(create_provider("sev", root=tmp_path), LegacySevProvider)
    assert isinstance(create_provider("TSM", root=tmp_path), TsmProvider)


async def test_virtual_only_when_named(tmp_path: Path) -> None:
    provider = create_provider("virtual", state_dir=tmp_path / "tee", security_policy=b"package policy\n")
    assert provider.name == "virtual"
    evidence = await provider.collect(bytes(range(64)))
    assert AttestationReport.parse(evidence.report).report_data == bytes(range(64))
