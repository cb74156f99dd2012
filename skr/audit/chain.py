"""The audit chain itself: record format, canonical form, hashing, checkpoint statements, verification.

Pure: no I/O, no asyncio, no clock except :func:`rfc3339_now` (which callers pass in as a value).

Format: each line is the canonical JSON of one record (sorted keys, no spaces, UTF-8 without needless
escapes). ``hash`` is the SHA-256 (hex) of the canonical JSON of the record without ``hash``; ``prev`` is
the previous record's ``hash`` (64 zeros for the first record ever); ``seq`` counts from 1 without gaps
across rotated files. A line that is not byte-identical to its record's canonical JSON (duplicate keys,
extra whitespace, escapes) is an edit.

A checkpoint (``event: "audit.checkpoint"``) is a record whose ``evidence`` is an SEV-SNP report over its
*statement* ``{"covers_seq", "head", "instance", "time"}``: REPORT_DATA is the SHA-512 of the statement's
canonical JSON. The chain code checks that a checkpoint's ``head`` is the hash of the record it covers;
whether the report is genuine is :mod:`skr.audit.proof`'s job.

Never holds key material or tokens: records are built from a fixed set of fields, and tokens only appear
as their SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from skr.errors import AuditError

GENESIS = "0" * 64
OUTCOMES = ("granted", "denied", "error")
CHECKPOINT_EVENT = "audit.checkpoint"
# Records the log writes about itself: they need no outcome.
LOG_EVENTS = frozenset({CHECKPOINT_EVENT, "audit.start", "audit.stop"})
REASON_LIMIT = 512

# Fields a record may carry besides the chain fields. Anything else is refused, so that a careless caller
# cannot put a token or a key into the log.
RECORD_FIELDS = frozenset(
    {
        "event",
        "outcome",
        "kid",
        "key_version",
        "vault",
        "maa",
        "host_data",
        "measurement",
        "maa_jti",
        "token_sha256",
        "client",
        "request_id",
        "duration_ms",
        "error_code",
        "error",
        "attestation",
        "truncated_bytes",
        "note",
        # why a release was refused, and who asked
        "reason",
        "upstream_status",
        "identity",
        "client_token_id",
        # checkpoints
        "covers_seq",
        "head",
        "instance",
        "time",
        "evidence",
        # audit.start / audit.stop
        "version",
        "evidence_kind",
        "settings",
        "settings_sha256",
        "counts",
    }
)
CHAIN_FIELDS = frozenset({"seq", "ts", "prev", "hash"})
STATEMENT_FIELDS = ("covers_seq", "head", "instance", "time")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# How many recent record hashes verification keeps to check checkpoints that arrive after their record.
RECENT_HASHES = 1 << 17


def canonical(record: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8 without escaping non-ASCII: the one byte form of a record."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash of a record: SHA-256 over its canonical JSON without the ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def token_fingerprint(token: str) -> str:
    """What the log keeps of a token: its SHA-256, enough to correlate, useless to replay."""
    return hashlib.sha256(token.encode()).hexdigest()


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trim_reason(text: str) -> str:
    """A reason as the log keeps it: one line, at most :data:`REASON_LIMIT` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= REASON_LIMIT else flat[: REASON_LIMIT - 1] + "…"


def check_fields(fields: Mapping[str, Any]) -> None:
    """Refuse a record the log must not hold: unknown fields, a bad outcome, or values that have no
    canonical UTF-8 JSON form (e.g. a lone surrogate from a hostile request) — before it joins a batch."""
    unknown = set(fields) - RECORD_FIELDS
    if unknown:
        raise AuditError(f"audit record fields not allowed: {sorted(unknown)}")
    if fields.get("event") not in LOG_EVENTS and fields.get("outcome") not in OUTCOMES:
        raise AuditError(f"audit outcome must be one of {OUTCOMES}, got {fields.get('outcome')!r}")
    try:
        canonical(fields)
    except (TypeError, ValueError):
        raise AuditError("an audit record value is not JSON text that can be written as UTF-8") from None


# --- checkpoint statements ----------------------------------------------------------------------------


def statement(covers_seq: int, head: str, instance: str, time: str) -> dict[str, Any]:
    """What a checkpoint asserts: record ``covers_seq`` of this log has hash ``head``."""
    return {"covers_seq": covers_seq, "head": head, "instance": instance, "time": time}


def statement_report_data(stmt: Mapping[str, Any]) -> bytes:
    """REPORT_DATA of a checkpoint: SHA-512 of the canonical JSON of its four statement fields (64 bytes)."""
    return hashlib.sha512(canonical({k: stmt[k] for k in STATEMENT_FIELDS})).digest()


def statement_problem(doc: Mapping[str, Any]) -> str | None:
    """Why ``doc`` is not a well-formed checkpoint statement with evidence, or None."""
    covers, head = doc.get("covers_seq"), doc.get("head")
    if not isinstance(covers, int) or isinstance(covers, bool) or covers < 0:
        return "checkpoint has no covers_seq"
    if not isinstance(head, str) or not HEX64.match(head):
        return "checkpoint head is not a SHA-256"
    if not isinstance(doc.get("instance"), str) or not isinstance(doc.get("time"), str):
        return "checkpoint has no instance or time"
    evidence = doc.get("evidence")
    if not isinstance(evidence, dict) or not isinstance(evidence.get("report"), str):
        return "checkpoint has no evidence report"
    return None


# --- verification -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line of input. ``torn``: the last line of the last source, without its newline.
    ``strict``: the source is an audit log file (every line must be a record), not a mixed stream."""

    source: str
    lineno: int
    raw: bytes
    torn: bool = False
    strict: bool = True


@dataclass(frozen=True)
class Expectation:
    """A hash some record must have: from a checkpoint copy outside the log, or an auditor's anchor."""

    seq: int
    head: str
    origin: str  # "checkpoint copy at <file>:<line>" or "anchor"
    checkpoint: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Finding:
    """The first problem in a chain: where and why. ``kind``: ``tampered``, ``truncated_tail`` (a torn
    last line) or ``truncated`` (records missing at the end, proven by a checkpoint copy or an anchor)."""

    file: str
    line: int
    seq: int | None
    kind: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class VerifyResult:
    records: int
    last_seq: int
    last_hash: str
    finding: Finding | None
    first_seq: int = 1
    skipped: int = 0  # lines of mixed streams that were not records
    checkpoints: tuple[Mapping[str, Any], ...] = ()  # checkpoints (in the chain or copies) whose head matched
    anchors: int = 0

    @property
    def intact(self) -> bool:
        return self.finding is None


@dataclass
class _Walk:
    prev: str = GENESIS
    expected: int = 1
    count: int = 0
    skipped: int = 0
    recent: OrderedDict[int, str] = field(default_factory=OrderedDict)
    pending: dict[int, list[Expectation]] = field(default_factory=dict)
    checkpoints: list[Mapping[str, Any]] = field(default_factory=list)
    anchors: int = 0
    first: int | None = None  # the first seq of the input (a stream may start after seq 1)

    def remember(self, seq: int, digest: str) -> None:
        self.recent[seq] = digest
        if len(self.recent) > RECENT_HASHES:
            self.recent.popitem(last=False)

    def expect(self, item: Expectation) -> str | None:
        """Check ``item`` now if its record was seen, else keep it for later; a problem or None."""
        if self.first is not None and 0 < item.seq < self.first:
            return None  # sealed a record before this input starts: nothing here to compare it with
        if item.seq == 0:
            found: str | None = GENESIS
        elif item.seq < self.expected:
            found = self.recent.get(item.seq)
            if found is None:
                return f"{item.origin} names seq {item.seq}, too far back to check in one pass"
        else:
            self.pending.setdefault(item.seq, []).append(item)
            return None
        return None if found == item.head else _mismatch(item)

    def settle(self, seq: int, digest: str) -> str | None:
        for item in self.pending.pop(seq, []):
            if item.head != digest:
                return _mismatch(item)
            if item.checkpoint is not None:
                self.checkpoints.append(item.checkpoint)
            else:
                self.anchors += 1
        return None


def _mismatch(item: Expectation) -> str:
    return (
        f"{item.origin} says record {item.seq} has hash {item.head[:16]}…, the log differs "
        "(history rewritten after it was sealed)"
    )


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """The JSON object on a line, or None if the line is not one."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def is_record(doc: Mapping[str, Any]) -> bool:
    return "seq" in doc and "hash" in doc


def checkpoint_copy(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The checkpoint in a stdout copy ``{"skr_audit_checkpoint": {...}}`` or a bare statement, else None."""
    inner = doc.get("skr_audit_checkpoint") if len(doc) == 1 else doc
    if isinstance(inner, dict) and "covers_seq" in inner and not is_record(doc):
        return inner
    return None


def verify_lines(lines: Iterable[Line], expectations: Iterable[Expectation] = ()) -> VerifyResult:
    """Check lines (in chain order) as one chain; stop at the first problem.

    ``expectations``: hashes records must have (checkpoint copies, anchors); one naming a seq beyond the
    end of the log means records were deleted from the end.
    """
    walk = _Walk()
    first_seq: int | None = None
    for item in expectations:
        problem = walk.expect(item)
        if problem:
            return _result(walk, first_seq, Finding(item.origin, 0, item.seq, "tampered", problem))
    last: Line | None = None
    for line in lines:
        last = line

        def bad(reason: str, seq: int | None = None, kind: str = "tampered") -> VerifyResult:
            found = Finding(line.source, line.lineno, seq, kind, reason)  # noqa: B023
            return _result(walk, first_seq, found)  # noqa: B023 - called before the loop moves on

        rec = parse_record(line.raw)
        if rec is None or not is_record(rec):
            if rec is not None and not line.strict and (copy := checkpoint_copy(rec)) is not None:
                problem = statement_problem(copy) or walk.expect(
                    Expectation(
                        copy["covers_seq"],
                        copy["head"],
                        f"checkpoint copy at {line.source}:{line.lineno}",
                        copy,
                    )
                )
                if problem:
                    return bad(problem)
                continue
            if not line.strict:
                walk.skipped += 1
                continue
            if line.torn and rec is None:
                return bad(
                    "truncated tail: the last line is incomplete (a crash during a write)",
                    None,
                    "truncated_tail",
                )
            return bad("line is not an audit record (edited)")
        seq = rec.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return bad("record has no integer seq (edited)")
        digest = rec.get("hash")
        try:
            content_hash: str | None = record_hash(rec)
            exact = canonical(rec) == line.raw
        except ValueError:  # a lone surrogate escape: no canonical UTF-8 form, never written by us
            content_hash, exact = None, False
        if not isinstance(digest, str) or not HEX64.match(digest) or content_hash != digest:
            return bad("record hash does not match its content (edited)", seq)
        if not exact:
            return bad(
                "line is not the canonical form of its record (duplicate keys, spacing or escapes)", seq
            )
        if first_seq is None:
            first_seq = walk.first = seq
            for early in [n for n in walk.pending if 0 < n < seq]:
                del walk.pending[early]  # copies of checkpoints over records this stream does not hold
            if not line.strict:
                # a stream (kubectl logs) may start after the first record: the chain is checked from there
                walk.expected, walk.prev = seq, rec.get("prev", GENESIS)
        if seq != walk.expected:
            what = "deleted records before it" if seq > walk.expected else "reordered or duplicated"
            if seq == 1 and rec.get("prev") == GENESIS:
                what = (
                    "a new chain starts here: a sidecar restarted without its old log; "
                    "verify each run on its own (skr audit show --instance ID --format json)"
                )
            return bad(f"expected seq {walk.expected}, found {seq} ({what})", seq)
        if rec.get("prev") != walk.prev:
            return bad("prev does not match the previous record's hash (deleted, inserted or reordered)", seq)
        unknown = set(rec) - RECORD_FIELDS - CHAIN_FIELDS
        if unknown:
            return bad(f"unexpected fields {sorted(unknown)}", seq)
        if rec.get("event") == CHECKPOINT_EVENT:
            problem = statement_problem(rec)
            if problem is None and rec["covers_seq"] >= seq:
                problem = "checkpoint covers a record after itself"
            if problem is None:
                problem = walk.expect(
                    Expectation(rec["covers_seq"], rec["head"], f"checkpoint seq {seq}", rec)
                )
                covers = rec["covers_seq"]
                if problem is None and (covers == 0 or walk.first is None or covers >= walk.first):
                    walk.checkpoints.append(rec)  # one over a record before this input proves nothing here
            if problem:
                return bad(problem, seq)
        problem = walk.settle(seq, digest)
        if problem:
            return bad(problem, seq)
        walk.remember(seq, digest)
        walk.prev, walk.expected, walk.count = digest, seq + 1, walk.count + 1
    if walk.pending:
        beyond = min(walk.pending)
        item = walk.pending[beyond][0]
        where = last.source if last is not None else "(no records)"
        reason = (
            f"truncated: the log ends at seq {walk.expected - 1} but {item.origin} seals seq {beyond} "
            "(records were removed from the end)"
        )
        return _result(
            walk, first_seq, Finding(where, last.lineno if last else 0, beyond, "truncated", reason)
        )
    return _result(walk, first_seq, None)


def _result(walk: _Walk, first_seq: int | None, finding: Finding | None) -> VerifyResult:
    return VerifyResult(
        records=walk.count,
        last_seq=walk.expected - 1,
        last_hash=walk.prev,
        finding=finding,
        first_seq=first_seq or 1,
        skipped=walk.skipped,
        checkpoints=tuple(walk.checkpoints),
        anchors=walk.anchors,
    )
