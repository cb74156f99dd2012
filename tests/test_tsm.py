"""configfs-tsm: the report-entry protocol against a simulated kernel working in a temporary directory.

The simulation is a :class:`LinuxConfigfs` (real files under tmp_path) that also does what the kernel
does: ``mkdir`` makes the attribute files appear, writes bump ``generation``, writing ``inblob`` makes
``outblob`` (a genuine report) and ``auxblob`` (a certificate table) readable, ``rmdir`` removes it all.
"""

from __future__ import annotations

import base64
import struct
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from skr.errors import EvidenceUnavailable
from skr.evidence.context import SecurityContext
from skr.evidence.tsm import LinuxConfigfs, TsmProvider
from skr.server import http_status
from skr.snp.kds import parse_thim_json
from skr.snp.report import AttestationReport
from skr.snp.verify import verify_evidence_chain

ACI = "snp/aci-confidential-sidecar"
AT = datetime(2024, 6, 1, tzinfo=UTC)


class FakeTsmKernel(LinuxConfigfs):
    def __init__(self, report: bytes, auxblob: bytes = b"", provider: str = "sev_guest") -> None:
        self.report = report
        self.auxblob = auxblob
        self.provider = provider
        self.races = 0  # how many outblob reads see a concurrent inblob write
        self.made: list[Path] = []
        self.removed: list[Path] = []
        self.writes: list[tuple[str, bytes]] = []

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        self.made.append(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "privlevel_floor").write_text("0\n")

    def rmdir(self, path: Path) -> None:
        self.removed.append(path)
        for child in path.iterdir():
            child.unlink()
        super().rmdir(path)

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        self.writes.append((path.name, data))
        self._bump(path.parent)
        if path.name == "inblob":
            (path.parent / "outblob").write_bytes(self.report)
            (path.parent / "auxblob").write_bytes(self.auxblob)

    def read(self, path: Path) -> bytes:
        if path.name == "outblob" and self.races:
            self.races -= 1
            self._bump(path.parent)  # someone else wrote inblob meanwhile
        return super().read(path)

    @staticmethod
    def _bump(entry: Path) -> None:
        generation = entry / "generation"
        generation.write_text(f"{int(generation.read_text()) + 1}\n")


def _genuine(vectors: Path) -> tuple[bytes, AttestationReport]:
    raw = (vectors / ACI / "snp_report.bin").read_bytes()
    return raw, AttestationReport.parse(raw)


def _context(vectors: Path) -> SecurityContext:
    return SecurityContext(
        directory=None,
        security_policy=base64.b64decode((vectors / ACI / "uvm_security_policy.base64").read_bytes()),
        thim=parse_thim_json((vectors / ACI / "uvm_host_amd_certificate.json").read_bytes()),
        uvm_reference_info=None,
    )


def _aux_table(vectors: Path) -> bytes:
    pem = (vectors / ACI / "uvm_host_amd_certificate.pem").read_text()
    blocks = [b.split("-----END")[0] for b in pem.split("-----BEGIN CERTIFICATE-----")[1:]]
    ders = [base64.b64decode("".join(b.split())) for b in blocks]
    guids = ["63da758d-e664-4564-adc5-f4b93be8accd", "4ab7b379-bbac-4fe4-a02f-05aef327c782",
             "c0b406a4-a803-4952-9743-3fb6014cd0ae"]  # fmt: skip
    header_size, header, blobs = 24 * 4, b"", b""
    for guid, der in zip(guids, ders, strict=True):
        header += uuid.UUID(guid).bytes + struct.pack("<II", header_size + len(blobs), len(der))
        blobs += der
    return header + bytes(24) + blobs


def _left_behind(root: Path) -> list[Path]:
    return list(root.iterdir())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "tsm/report"
    path.mkdir(parents=True)
    return path


async def test_report_and_auxblob_chain_from_one_entry_that_is_removed(vectors: Path, root: Path) -> None:
    raw, report = _genuine(vectors)
    kernel = FakeTsmKernel(raw, auxblob=_aux_table(vectors))
    provider = TsmProvider(root=root, fs=kernel)

    evidence = await provider.collect(report.report_data)

    assert evidence.report == raw
    assert evidence.provider == "tsm"
    assert kernel.writes == [("inblob", report.report_data)]
    assert len(kernel.made) == 1 and kernel.made[0].parent == root
    assert kernel.removed == kernel.made
    assert _left_behind(root) == []
    verify_evidence_chain(evidence.report, evidence.vcek_chain_pem, at=AT)


async def test_privlevel_is_written_before_inblob_when_configured(vectors: Path, root: Path) -> None:
    raw, report = _genuine(vectors)
    kernel = FakeTsmKernel(raw)
    await TsmProvider(root=root, fs=kernel, privlevel=2, context=_context(vectors)).collect(
        report.report_data
    )
    assert kernel.writes == [("privlevel", b"2"), ("inblob", report.report_data)]


async def test_empty_auxblob_takes_the_chain_from_the_security_context(vectors: Path, root: Path) -> None:
    raw, report = _genuine(vectors)
    context = _context(vectors)
    evidence = await TsmProvider(root=root, fs=FakeTsmKernel(raw), context=context).collect(
        report.report_data
    )
    assert context.thim is not None
    assert evidence.vcek_chain_pem == context.thim.chain_pem()
    assert evidence.endorsed_tcb == "7308000000000003"


async def test_a_generation_change_discards_the_report_and_retries(vectors: Path, root: Path) -> None:
    raw, report = _genuine(vectors)
    kernel = FakeTsmKernel(raw)
    kernel.races = 1
    evidence = await TsmProvider(root=root, fs=kernel, context=_context(vectors)).collect(report.report_data)
    assert evidence.report == raw
    assert len(kernel.made) == 2
    assert kernel.removed == kernel.made
    assert _left_behind(root) == []


async def test_generation_that_keeps_changing_is_an_error_and_every_entry_is_removed(
    vectors: Path, root: Path
) -> None:
    raw, report = _genuine(vectors)
    kernel = FakeTsmKernel(raw)
    kernel.races = 99
    with pytest.raises(EvidenceUnavailable, match="generation kept changing during 3 attempts") as info:
        await TsmProvider(root=root, fs=kernel, attempts=3).collect(report.report_data)
    assert info.value.code == "tsm_conflict"
    assert len(kernel.made) == 3
    assert kernel.removed == kernel.made
    assert _left_behind(root) == []


async def test_wrong_provider_is_refused_and_the_entry_removed(vectors: Path, root: Path) -> None:
    raw, report = _genuine(vectors)
    kernel = FakeTsmKernel(raw, provider="tdx_guest")
    with pytest.raises(EvidenceUnavailable, match="provider is 'tdx_guest', expected 'sev_guest'"):
        await TsmProvider(root=root, fs=kernel).collect(report.report_data)
    assert kernel.writes == []
    assert kernel.removed == kernel.made
    assert _left_behind(root) == []


async def test_missing_configfs_tsm_is_a_clear_error(tmp_path: Path) -> None:
    provider = TsmProvider(root=tmp_path / "sys/kernel/config/tsm/report")
    with pytest.raises(EvidenceUnavailable, match="does not exist") as info:
        await provider.collect(bytes(64))
    assert info.value.hint is not None and "6.7" in info.value.hint


async def test_failing_outblob_read_is_reported_and_the_entry_removed(vectors: Path, root: Path) -> None:
    raw, report = _genuine(vectors)

    class FailingKernel(FakeTsmKernel):
        def read(self, path: Path) -> bytes:
            if path.name == "outblob":
                raise OSError(5, "Input/output error")
            return super().read(path)

    kernel = FailingKernel(raw)
    with pytest.raises(EvidenceUnavailable, match="outblob failed: Input/output error"):
        await TsmProvider(root=root, fs=kernel).collect(report.report_data)
    assert _left_behind(root) == []


async def test_a_report_from_the_device_that_does_not_parse_is_unavailable_evidence_not_bad_input(
    vectors: Path, root: Path
) -> None:
    raw, report = _genuine(vectors)
    kernel = FakeTsmKernel(b"\xff" * len(raw))  # the TEE's fault: version 0xffffffff, nothing the caller sent
    with pytest.raises(
        EvidenceUnavailable, match="the tsm device returned a report that does not parse"
    ) as info:
        await TsmProvider(root=root, fs=kernel).collect(report.report_data)
    assert info.value.code == "device_report_invalid" and http_status(info.value) == 503
    assert _left_behind(root) == []
