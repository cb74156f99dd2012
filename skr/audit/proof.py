"""What a checkpoint proves: its SEV-SNP report is genuine and signs exactly its statement.

Owns the check of one checkpoint's evidence — report signature and AMD certificate chain (through
:mod:`skr.snp.verify`; no signature code here), REPORT_DATA equal to the SHA-512 of the statement, and
HOST_DATA / measurement when the auditor expects them — and what it says about the signer: a pinned AMD
root, or a root the auditor passed explicitly (the virtual TEE), which is reported as *virtual*.

Pure apart from the cryptography; never fetches collateral.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from skr.audit.chain import statement_report_data
from skr.errors import Code, SkrError, VerificationError
from skr.snp.certs import AMD_ARK_SHA256
from skr.snp.verify import ValidationOptions, validate_report, verify_evidence_chain


@dataclass(frozen=True)
class CheckpointProof:
    """A checkpoint whose report verified and binds its statement."""

    covers_seq: int
    head: str
    instance: str
    time: str
    host_data: str
    measurement: str
    virtual: bool  # signed under a root the auditor trusted explicitly, not AMD's


@dataclass(frozen=True)
class ProofOptions:
    """What the auditor requires. ``at``: check certificate validity then (default: the checkpoint's
    own time, which the report signs)."""

    trusted_arks: Sequence[x509.Certificate] = ()
    expect_host_data: bytes | None = None
    expect_measurement: bytes | None = None
    at: datetime | None = None


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def prove_checkpoint(checkpoint: Mapping[str, Any], options: ProofOptions) -> CheckpointProof:
    """Verify one checkpoint's evidence. Raises :class:`SkrError` saying what failed."""
    evidence = checkpoint["evidence"]
    try:
        report = base64.b64decode(str(evidence.get("report", "")), validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(
            "the checkpoint's report is not base64", code=Code.CHECKPOINT_INVALID
        ) from None
    chain = str(evidence.get("vcek_chain", "")).encode()
    # 1. the report is genuine: signature by the VCEK/VLEK, chain to a pinned or explicitly trusted ARK
    at = options.at or _parse_time(str(checkpoint["time"]))
    verified = verify_evidence_chain(report, chain, at=at, trusted_arks=options.trusted_arks)
    # 2. it signs exactly this statement, and comes from the expected workload
    validate_report(
        verified.report,
        ValidationOptions(
            report_data=statement_report_data(checkpoint),
            host_data=options.expect_host_data,
            measurement=options.expect_measurement,
        ),
    )
    return CheckpointProof(
        covers_seq=int(checkpoint["covers_seq"]),
        head=str(checkpoint["head"]),
        instance=str(checkpoint["instance"]),
        time=str(checkpoint["time"]),
        host_data=verified.report.host_data.hex(),
        measurement=verified.report.measurement.hex(),
        virtual=verified.ark_sha256 not in AMD_ARK_SHA256.values(),
    )


def describe_failure(checkpoint: Mapping[str, Any], exc: SkrError) -> str:
    where = f"checkpoint sealing seq {checkpoint.get('covers_seq')}"
    if "seq" in checkpoint:
        where += f" (record seq {checkpoint['seq']})"
    return f"{where}: {exc.message}"
