"""The GHCB certificate table the host hands out with an extended report, and where a chain comes from.

Owns: parsing the table that ``SNP_GET_EXT_REPORT`` writes to the guest's certificate buffer and that
configfs-tsm exposes as ``auxblob`` (GHCB specification 56421, "certificate table": entries of a 16-byte
GUID in RFC 4122 byte order, a u32 offset and a u32 length, all relative to the start of the table, ended by
an all-zero entry), turning the VCEK/VLEK, ASK/ASVK and ARK entries into one PEM chain, the order in
which a provider looks for that chain (the cert table if its VEK matches the report's TCB, then the security
context's THIM certificates, then the collateral client), and :func:`assemble_evidence`, the checks
every hardware provider runs on what the device returned before handing it out.

Never trusts the table: offsets and lengths are checked against the buffer, and the certificates are only
*transported* here — :mod:`skr.snp.verify` decides whether they prove anything.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import struct
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from skr.errors import BadRequest, CertificateError, Code, EvidenceUnavailable, ReportError
from skr.evidence.base import REPORT_DATA_SIZE, Evidence
from skr.evidence.context import SecurityContext, check_policy_hash
from skr.snp.certs import parse_vek_extensions, read_certificates
from skr.snp.report import AttestationReport, Product

if TYPE_CHECKING:
    from skr.snp.collateral import CollateralClient

log = logging.getLogger(__name__)

ENTRY_SIZE: Final = 24
_ENTRY = struct.Struct("<16sII")

# GUIDs from the GHCB specification (the same values go-sev-guest `abi` and virtee/sev use).
VCEK_GUID: Final = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID: Final = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID: Final = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")  # also carries the ASVK
ARK_GUID: Final = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_NAMES: Final = {VCEK_GUID: "VCEK", VLEK_GUID: "VLEK", ASK_GUID: "ASK", ARK_GUID: "ARK"}
_ZERO_GUID: Final = bytes(16)


@dataclass(frozen=True)
class CertTableEntry:
    """One entry: the GUID that names the certificate and its bytes (DER for the AMD certificates)."""

    guid: uuid.UUID
    data: bytes

    @property
    def name(self) -> str:
        """``VCEK``, ``VLEK``, ``ASK``, ``ARK`` or the GUID itself for entries we do not know."""
        return _NAMES.get(self.guid, str(self.guid))


@dataclass(frozen=True)
class CertTable:
    """A parsed certificate table, entries in table order."""

    entries: tuple[CertTableEntry, ...]

    def get(self, guid: uuid.UUID) -> bytes | None:
        """The bytes of the first entry with ``guid``, or None."""
        return next((entry.data for entry in self.entries if entry.guid == guid), None)

    def chain_pem(self) -> bytes | None:
        """VCEK (or VLEK), then ASK/ASVK, then ARK as one PEM text; None when the VEK or ASK is missing.

        A table with only some of the certificates is legal (the GHCB spec lets the host choose), so a
        partial table is "no chain here", not an error. The ARK is optional: verifiers pin it anyway.
        """
        parts = {"VEK": self.get(VCEK_GUID) or self.get(VLEK_GUID), "ASK": self.get(ASK_GUID)}
        if parts["VEK"] is None or parts["ASK"] is None:
            return None
        parts["ARK"] = self.get(ARK_GUID)
        return b"".join(
            load_one_certificate(part, what=name).public_bytes(Encoding.PEM)
            for name, part in parts.items()
            if part is not None
        )


def parse_cert_table(blob: bytes) -> CertTable:
    """Parse a GHCB certificate table. An empty (or all-zero) buffer is an empty table.

    Raises :class:`EvidenceUnavailable` when the table is malformed: no terminator inside the buffer,
    an entry pointing into the header or past the end of the buffer.
    """
    entries: list[tuple[uuid.UUID, int, int]] = []
    offset = 0
    while True:
        if offset + ENTRY_SIZE > len(blob):
            if not blob.strip(b"\0"):
                return CertTable(())
            raise EvidenceUnavailable(
                f"the host certificate table has no terminating all-zero entry within its {len(blob)} bytes",
                hint="the hypervisor supplied a malformed GHCB certificate table",
                code=Code.CERT_TABLE_INVALID,
            )
        raw_guid, cert_offset, length = _ENTRY.unpack_from(blob, offset)
        offset += ENTRY_SIZE
        if raw_guid == _ZERO_GUID and cert_offset == 0 and length == 0:
            break
        entries.append((uuid.UUID(bytes=raw_guid), cert_offset, length))
    parsed: list[CertTableEntry] = []
    for index, (guid, cert_offset, length) in enumerate(entries):
        if cert_offset < offset or cert_offset + length > len(blob):
            raise EvidenceUnavailable(
                f"host certificate table entry {index} ({_NAMES.get(guid, str(guid))}) points at bytes "
                f"[{cert_offset}, {cert_offset + length}) but the table header ends at {offset} and the "
                f"buffer holds {len(blob)} bytes",
                hint="the hypervisor supplied a malformed GHCB certificate table",
                code=Code.CERT_TABLE_INVALID,
            )
        parsed.append(CertTableEntry(guid, bytes(blob[cert_offset : cert_offset + length])))
    return CertTable(tuple(parsed))


def load_one_certificate(data: bytes, *, what: str = "certificate") -> x509.Certificate:
    """One certificate given as DER or PEM. EvidenceUnavailable if it is neither."""
    try:
        return read_certificates(data)[0]
    except ValueError as exc:
        raise EvidenceUnavailable(
            f"the {what} certificate ({len(data)} bytes) is neither DER nor PEM X.509: {exc}",
            hint="the host or certificate service returned something that is not a certificate",
            code=Code.CERTIFICATE_UNREADABLE,
        ) from None


def _table_chain(report: AttestationReport, table: CertTable) -> tuple[bytes | None, str]:
    """The table's chain if its VEK was issued for the report's REPORTED_TCB, else (None, why not)."""
    try:
        chain = table.chain_pem()
    except EvidenceUnavailable as exc:
        return None, exc.message
    vek_bytes = table.get(VCEK_GUID) or table.get(VLEK_GUID)
    if chain is None or vek_bytes is None:
        return None, "no VCEK/VLEK + ASK entries"
    try:
        info = parse_vek_extensions(load_one_certificate(vek_bytes, what="VEK"))
    except CertificateError as exc:
        return None, f"its VEK has unreadable AMD extensions: {exc.message}"
    tcb = report.reported_tcb_version(info.product or Product.MILAN)
    endorsed = (info.bl_spl, info.tee_spl, info.snp_spl, info.ucode_spl, info.fmc_spl)
    if endorsed != (tcb.bl, tcb.tee, tcb.snp, tcb.ucode, tcb.fmc):
        return None, (
            f"its VEK is for bl={info.bl_spl} tee={info.tee_spl} snp={info.snp_spl} ucode={info.ucode_spl} "
            f"but the report's REPORTED_TCB is {tcb}"
        )
    return chain, ""


async def resolve_chain(
    report: AttestationReport,
    *,
    cert_table: CertTable | None,
    context: SecurityContext | None,
    collateral: CollateralClient | None,
) -> tuple[bytes, str]:
    """The VEK chain PEM for ``report`` and the TCB it was endorsed for (16 hex digits).

    Order: the host's certificate table (extended report / auxblob) when its VEK's SPLs equal the
    report's REPORTED_TCB; then the security context's THIM certificates when their ``tcbm`` equals the
    REPORTED_TCB; then the collateral client (which fetches for the report's TCB). Raises
    :class:`EvidenceUnavailable` naming every source tried.
    """
    tried: list[str] = []
    if cert_table is not None:
        chain, problem = _table_chain(report, cert_table)
        if chain is not None:
            return chain, f"{report.reported_tcb:016x}"
        log.info("not using the host certificate table: %s", problem)
        tried.append(f"the host certificate table ({problem})")
    thim = context.thim if context is not None else None
    if thim is not None:
        if thim.tcb_raw == report.reported_tcb:
            return thim.chain_pem(), thim.tcbm
        log.info(
            "security-context THIM certificates are for TCB %s but the report's REPORTED_TCB is %016x; "
            "fetching certificates for the reported TCB",
            thim.tcbm,
            report.reported_tcb,
        )
        tried.append(
            f"the security context's THIM certificates (tcbm {thim.tcbm} != {report.reported_tcb:016x})"
        )
    if collateral is not None:
        return await collateral.get_chain(report)
    tried.append("no certificate service (collateral client) is configured")
    raise EvidenceUnavailable(
        "no VCEK certificate chain for the report: tried " + "; ".join(tried),
        hint="provide host-amd-cert-base64 in the security context or configure a certificate source "
        "(certcache)",
        code=Code.COLLATERAL_UNAVAILABLE,
    )


def check_report_data(report_data: bytes) -> bytes:
    """``report_data`` as bytes if it is exactly 64 bytes; BadRequest otherwise."""
    if not isinstance(report_data, bytes | bytearray | memoryview) or len(report_data) != REPORT_DATA_SIZE:
        size = len(report_data) if isinstance(report_data, bytes | bytearray | memoryview) else "not bytes"
        raise BadRequest(f"REPORT_DATA must be exactly {REPORT_DATA_SIZE} bytes, found {size}")
    return bytes(report_data)


class HardwareProvider(abc.ABC):
    """A provider that reads a report (and a certificate table) from the guest kernel, off the event loop."""

    name: str = ""
    context: SecurityContext | None
    collateral: CollateralClient | None

    async def collect(self, report_data: bytes) -> Evidence:
        """A fresh report for ``report_data`` plus its VCEK chain; see :class:`EvidenceProvider`."""
        report_data = check_report_data(report_data)
        raw, table = await asyncio.to_thread(self._fetch, report_data)
        return await assemble_evidence(
            self.name, raw, table, report_data=report_data, context=self.context, collateral=self.collateral
        )

    async def aclose(self) -> None:  # noqa: B027 - a deliberate no-op, not an abstract hook
        """Nothing is held open between calls."""

    @abc.abstractmethod
    def _fetch(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        """The raw report and the GHCB certificate table (if the interface returns one); blocking."""


async def assemble_evidence(
    provider: str,
    raw_report: bytes,
    cert_table_blob: bytes | None,
    *,
    report_data: bytes,
    context: SecurityContext | None,
    collateral: CollateralClient | None,
) -> Evidence:
    """Check what a device returned and attach its certificate chain.

    The report must parse, must carry the REPORT_DATA that was asked for (a device answering with some
    other report is a fault, not evidence), and when the security context has a policy its SHA-256 must
    equal HOST_DATA. Then the chain comes from :func:`resolve_chain`.
    """
    try:
        report = AttestationReport.parse(raw_report)
    except ReportError as exc:
        raise EvidenceUnavailable(
            f"the {provider} device returned a report that does not parse: {exc.message}",
            hint="the guest driver or firmware misbehaved; see the kernel log",
            code=Code.DEVICE_REPORT_INVALID,
        ) from None
    if report.report_data != report_data:
        raise EvidenceUnavailable(
            f"the {provider} device returned a report for REPORT_DATA {report.report_data.hex()[:32]}…, "
            f"not the requested {report_data.hex()[:32]}…",
            hint="another process may share the report interface; retry",
            code=Code.DEVICE_REPORT_MISMATCH,
        )
    if context is not None and context.security_policy is not None:
        check_policy_hash(context, report.host_data)
    table = parse_cert_table(cert_table_blob) if cert_table_blob else None
    chain, endorsed_tcb = await resolve_chain(
        report, cert_table=table, context=context, collateral=collateral
    )
    return Evidence(
        report=bytes(raw_report),
        vcek_chain_pem=chain,
        provider=provider,
        uvm_endorsements=context.uvm_reference_info if context is not None else None,
        endorsed_tcb=endorsed_tcb,
    )
