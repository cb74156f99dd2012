"""The tamper-evident audit log: one hash-chained JSON line per release or attestation decision.

A package of four parts (see ``DESIGN.md``): :mod:`~skr.audit.chain` (record format, canonical form,
hashing, verification — pure), :mod:`~skr.audit.writer` (the one writer: lock, durable batches, crash
recovery, rotation), :mod:`~skr.audit.checkpoint` and :mod:`~skr.audit.proof` (hardware-signed
checkpoints over the head, and what they prove), :mod:`~skr.audit.files` (files in chain order, mixed
streams, safe opening).

Never writes key material or tokens: records are built from a fixed set of fields, and tokens only
appear as their SHA-256.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from skr.audit.chain import (
    GENESIS,
    OUTCOMES,
    Expectation,
    VerifyResult,
    canonical,
    token_fingerprint,
    verify_lines,
)
from skr.audit.files import chain_files, iter_lines, order_by_seq, read_records, rotated_files
from skr.audit.writer import AsyncAuditLog, AuditLog


def verify_chain(files: Sequence[Path | str], expectations: Sequence[Expectation] = ()) -> VerifyResult:
    """Check the files (in chain order) as one chain; stop at the first problem."""
    return verify_lines(iter_lines(list(files)), expectations)


__all__ = [
    "GENESIS",
    "OUTCOMES",
    "AsyncAuditLog",
    "AuditLog",
    "Expectation",
    "canonical",
    "chain_files",
    "order_by_seq",
    "read_records",
    "rotated_files",
    "token_fingerprint",
    "verify_chain",
]
