"""What an evidence provider hands out, and the protocol every provider follows.

A provider turns 64 bytes of REPORT_DATA into hardware evidence: the raw SEV-SNP attestation report, the
certificate chain that proves it (VCEK or VLEK, then ASK/ASVK, then ARK, as PEM), and the UVM endorsement
when the platform supplies one. Providers never fall back to anything fake: if the hardware or the
security context is missing they raise :class:`skr.errors.EvidenceUnavailable` and say why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

REPORT_DATA_SIZE = 64


@dataclass(frozen=True)
class Evidence:
    """One piece of hardware evidence.

    ``report``: the raw 1184-byte ATTESTATION_REPORT.
    ``vcek_chain_pem``: PEM text, the VCEK/VLEK certificate first, then ASK/ASVK, then ARK.
    ``uvm_endorsements``: the UVM reference-info COSE_Sign1 bytes (ACI), or ``None``.
    ``endorsed_tcb``: the TCB the certificate chain was issued for as 16 hex digits (THIM ``tcbm``),
    or ``None`` when unknown.
    ``provider``: the name of the provider that produced it (``sevguest``, ``tsm``, ``virtual`` ...).
    """

    report: bytes
    vcek_chain_pem: bytes
    provider: str
    uvm_endorsements: bytes | None = None
    endorsed_tcb: str | None = None

    def __repr__(self) -> str:  # the report is not secret, but it is long
        return f"Evidence(provider={self.provider!r}, report=<{len(self.report)} bytes>)"


@runtime_checkable
class EvidenceProvider(Protocol):
    """A source of SEV-SNP evidence."""

    @property
    def name(self) -> str:
        """A short stable name: ``sevguest``, ``sev``, ``tsm`` or ``virtual``."""
        ...

    async def collect(self, report_data: bytes) -> Evidence:
        """Fetch a fresh report binding ``report_data`` (exactly 64 bytes) plus its collateral.

        Raises :class:`skr.errors.BadRequest` for wrong-sized report data and
        :class:`skr.errors.EvidenceUnavailable` when the TEE cannot produce a report.
        """
        ...

    async def aclose(self) -> None:
        """Release sessions and file handles; calling it twice is harmless."""
        ...


def report_data_for(runtime_data: bytes) -> bytes:
    """REPORT_DATA as MAA and the Go sidecar expect it: SHA-256(runtime_data) followed by 32 zero bytes."""
    return hashlib.sha256(runtime_data).digest() + bytes(32)
