"""The Azure confidential-VM (vTPM) HCL report: its SNP report and its runtime data.

On Azure CVMs (and AKS nodes backed by them) the paravisor (HCL) puts an "HCL report" into vTPM NV index
0x01400001. Its layout (little-endian, as the ``az-snp-vtpm`` crate and Azure's guest-attestation
library read it)::

    0x000  header      "HCLA", version u32, report_size u32, request_type u32, status u32, 3 reserved u32s
    0x020  hw_report   the 1184-byte SEV-SNP attestation report
    0x4C0  IGVM request data: data_size u32, version u32, report_type u32 (2 = SNP),
                              report_data_hash_type u32 (1 = SHA-256, 2 = SHA-384, 3 = SHA-512),
                              variable_data_size u32
    0x4D4  variable data (the runtime data): JSON ``{"keys": [HCLAkPub, HCLEkPub], "vm-configuration",
           "user-data"}``; the rest of the blob is zero padding

The SNP report binds the runtime data: REPORT_DATA starts with its hash. Owns parsing that layout and
checking that binding; never verifies the SNP report itself (:mod:`skr.snp.verify` does). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from skr.errors import ReportError
from skr.snp.report import REPORT_SIZE

HCL_SIGNATURE = b"HCLA"
HEADER_SIZE = 0x20
REQUEST_DATA_OFFSET = HEADER_SIZE + REPORT_SIZE  # 0x4C0
REQUEST_HEADER_SIZE = 20
RUNTIME_DATA_OFFSET = REQUEST_DATA_OFFSET + REQUEST_HEADER_SIZE  # 0x4D4
REPORT_TYPE_SNP = 2
REPORT_TYPES = {0: "invalid", 1: "reserved", 2: "snp", 3: "tvm", 4: "tdx"}
HASH_TYPES = {1: "sha256", 2: "sha384", 3: "sha512"}


@dataclass(frozen=True)
class HclReport:
    """A parsed HCL report. ``runtime`` is the runtime data's JSON object (empty if it is not JSON)."""

    version: int
    report_size: int
    request_type: int
    status: int
    request_version: int
    report_type: int
    hash_type: int
    snp_report: bytes = field(repr=False)
    runtime_data: bytes = field(repr=False)
    runtime: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def hash_name(self) -> str:
        return HASH_TYPES[self.hash_type]

    def runtime_data_digest(self) -> bytes:
        """The hash of the runtime data with the report's hash type (what REPORT_DATA must start with)."""
        return hashlib.new(self.hash_name, self.runtime_data).digest()

    def binds_runtime_data(self) -> bool:
        """True when the SNP report's REPORT_DATA (offset 0x50) starts with the runtime data's hash."""
        digest = self.runtime_data_digest()
        return self.snp_report[0x50 : 0x50 + len(digest)] == digest

    def runtime_summary(self) -> dict[str, Any]:
        """The runtime data for display: key ids and types, ``vm-configuration``, ``user-data``."""
        keys = self.runtime.get("keys")
        return {
            "keys": [
                {k: entry.get(k) for k in ("kid", "kty", "key_ops") if k in entry}
                for entry in (keys if isinstance(keys, list) else [])
                if isinstance(entry, dict)
            ],
            "vm-configuration": self.runtime.get("vm-configuration"),
            "user-data": self.runtime.get("user-data"),
        }

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "report_size": self.report_size,
            "request_type": self.request_type,
            "status": self.status,
            "report_type": REPORT_TYPES.get(self.report_type, str(self.report_type)),
            "report_data_hash": self.hash_name,
            "runtime_data_size": len(self.runtime_data),
            "runtime_data_hash": self.runtime_data_digest().hex(),
            "runtime_data_bound": self.binds_runtime_data(),
            "runtime_data": self.runtime_summary(),
        }


def is_hcl_report(data: bytes) -> bool:
    """Whether ``data`` starts like an HCL report (the ``HCLA`` signature)."""
    return data[:4] == HCL_SIGNATURE


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an HCL report; :class:`ReportError` naming the offset of anything malformed."""
    if not is_hcl_report(data):
        raise ReportError("not an Azure HCL report: it does not start with the 'HCLA' signature")
    if len(data) < RUNTIME_DATA_OFFSET:
        raise ReportError(
            f"the HCL report is {len(data)} bytes; its header, SNP report and request data need "
            f"{RUNTIME_DATA_OFFSET}"
        )
    version, report_size, request_type, status = struct.unpack_from("<4I", data, 4)
    _data_size, request_version, report_type, hash_type, variable_size = struct.unpack_from(
        "<5I", data, REQUEST_DATA_OFFSET
    )
    if report_type != REPORT_TYPE_SNP:
        name = REPORT_TYPES.get(report_type, f"unknown ({report_type})")
        raise ReportError(
            f"the HCL report at 0x{REQUEST_DATA_OFFSET + 8:x} says its hardware report is {name}; "
            "only SEV-SNP (2) is supported",
            hint="Azure TDX confidential VMs are not supported",
        )
    if hash_type not in HASH_TYPES:
        raise ReportError(
            f"the HCL report's report-data hash type at 0x{REQUEST_DATA_OFFSET + 12:x} is {hash_type}; "
            "expected 1 (SHA-256), 2 (SHA-384) or 3 (SHA-512)"
        )
    end = RUNTIME_DATA_OFFSET + variable_size
    if end > len(data):
        raise ReportError(
            f"the HCL report's runtime data is {variable_size} bytes from 0x{RUNTIME_DATA_OFFSET:x}, "
            f"past its end at {len(data)} bytes"
        )
    runtime_data = data[RUNTIME_DATA_OFFSET:end]
    try:
        runtime = json.loads(runtime_data)
    except (UnicodeDecodeError, ValueError):
        runtime = None
    return HclReport(
        version=version,
        report_size=report_size,
        request_type=request_type,
        status=status,
        request_version=request_version,
        report_type=report_type,
        hash_type=hash_type,
        snp_report=data[HEADER_SIZE:REQUEST_DATA_OFFSET],
        runtime_data=runtime_data,
        runtime=runtime if isinstance(runtime, dict) else {},
    )
