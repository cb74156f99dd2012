"""The tamper-evident audit log: one hash-chained JSON line per release or attestation decision.

Owns: the record format, appending (flushed and fsynced before the caller is told the record is
durable), recovery after a crash (a torn last line is cut off and the cut is itself recorded), size-based
rotation that keeps one chain across files, and verification for auditors.

Format: each line is a JSON object with sorted keys. ``hash`` is the SHA-256 (hex) of the canonical JSON
(sorted keys, no spaces, UTF-8) of the record without ``hash``; ``prev`` is the previous record's
``hash`` (64 zeros for the first record ever); ``seq`` counts from 1 without gaps across rotated files.

Never writes key material or tokens: records are built from a fixed set of fields, and tokens only
appear as their SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from skr.errors import AuditError

GENESIS = "0" * 64
OUTCOMES = ("granted", "denied", "error")

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
    }
)
CHAIN_FIELDS = frozenset({"seq", "ts", "prev", "hash"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash of a record: SHA-256 over its canonical JSON without the ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def token_fingerprint(token: str) -> str:
    """What the log keeps of a token: its SHA-256, enough to correlate, useless to replay."""
    return hashlib.sha256(token.encode()).hexdigest()


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rotated_files(path: Path) -> list[Path]:
    """The rotated predecessors of ``path`` (``path.1`` oldest, ``path.2`` ...), in chronological order."""
    found: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for sibling in path.parent.iterdir():
            suffix = sibling.name[len(path.name) + 1 :]
            if sibling.name.startswith(path.name + ".") and suffix.isdigit():
                found.append((int(suffix), sibling))
    return [p for _, p in sorted(found)]


def chain_files(path: Path) -> list[Path]:
    """All files of one chain: the rotated ones, then the live file."""
    return [*rotated_files(path), path]


# --- writing -----------------------------------------------------------------------------------------


def check_fields(fields: Mapping[str, Any]) -> None:
    """Refuse a record the log must not hold: unknown fields, a bad outcome, or values that have no
    canonical UTF-8 JSON form (e.g. a lone surrogate from a hostile request) — before it joins a batch."""
    unknown = set(fields) - RECORD_FIELDS
    if unknown:
        raise AuditError(f"audit record fields not allowed: {sorted(unknown)}")
    if fields.get("outcome") not in OUTCOMES:
        raise AuditError(f"audit outcome must be one of {OUTCOMES}, got {fields.get('outcome')!r}")
    try:
        canonical(fields)
    except (TypeError, ValueError):
        raise AuditError("an audit record value is not JSON text that can be written as UTF-8") from None


@dataclass(frozen=True)
class _Tail:
    seq: int
    hash: str
    valid_bytes: int  # length of the file up to and including the last complete, valid line
    size: int


_BLOCK = 64 * 1024
_MAX_RECORD_LINE = 1 << 20  # far above any record we write (check_fields bounds them)


def _rfind_newline(fh: BinaryIO, before: int) -> int:
    """Offset of the last ``\n`` in ``fh[:before]``, or -1; reads backwards one block at a time."""
    pos = before
    while pos > 0:
        start = max(0, pos - _BLOCK)
        fh.seek(start)
        found = fh.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found
        pos = start
    return -1


def _read_tail(path: Path) -> _Tail | None:
    """The last valid record of ``path`` and where it ends; None if the file holds no record at all.

    Reads from the end: start-up costs the same for a log of ten records and of ten million.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; the size and the reads need one handle
    except FileNotFoundError:
        return None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        last_newline = _rfind_newline(fh, size)
        end = last_newline + 1  # everything after the last newline is a torn line (a crash mid-write)
        if end == 0:
            return _Tail(0, GENESIS, 0, size) if size else None
        start = _rfind_newline(fh, last_newline) + 1
        if last_newline - start > _MAX_RECORD_LINE:
            raise _damaged_tail(path)
        fh.seek(start)
        line = fh.read(last_newline - start)
    try:
        rec = json.loads(line)
        seq, digest = int(rec["seq"]), str(rec["hash"])
        if not _HEX64.match(digest):
            raise ValueError(digest)
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError):
        # A complete but unparsable last line is tampering, not a crash: leave it for `verify`.
        raise _damaged_tail(path) from None
    return _Tail(seq, digest, end, size)


def _damaged_tail(path: Path) -> AuditError:
    return AuditError(
        f"the last complete line of {path} is not a valid audit record",
        hint="run `skr audit verify` on it; the daemon will not append to a damaged log",
    )


class AuditLog:
    """Appends hash-chained records to a JSON-lines file. Thread-safe; see :class:`AsyncAuditLog`.

    ``max_bytes``: rotate the live file once it reaches this size (0 = never). ``echo``: a callable that
    also receives each line (for shipping to stdout).
    """

    def __init__(self, path: Path | str, *, max_bytes: int = 0, echo: Any = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._echo = echo
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = 0, GENESIS
        recovered = self._recover()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        if recovered:
            self._write_batch([{"event": "audit.recovered", "outcome": "error", **recovered}])

    def _recover(self) -> dict[str, Any] | None:
        tail = _read_tail(self.path)
        if tail is None or tail.seq == 0:
            # nothing valid in the live file (new, or rotated just now): continue from the last rotated file
            for older in reversed(rotated_files(self.path)):
                previous = _read_tail(older)
                if previous is not None and previous.seq:
                    self._seq, self._prev = previous.seq, previous.hash
                    break
        else:
            self._seq, self._prev = tail.seq, tail.hash
        if tail is None or tail.valid_bytes == tail.size:
            return None
        # A crash tore the last line. That record was never acknowledged (we fsync before answering),
        # so cut it off and say so in the chain itself.
        with open(self.path, "r+b") as fh:
            fh.truncate(tail.valid_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        return {"truncated_bytes": tail.size - tail.valid_bytes, "note": "torn last line removed on start"}

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def last_hash(self) -> str:
        return self._prev

    def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record, durable on return (flushed and fsynced). Returns the full record."""
        return self.append_many([fields])[0]

    def append_many(self, batch: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append records with a single fsync (group commit)."""
        for fields in batch:
            check_fields(fields)
        with self._lock:
            return self._write_batch(batch)

    def _write_batch(self, batch: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        lines: list[bytes] = []
        seq, prev = self._seq, self._prev
        for fields in batch:
            seq += 1
            record: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
            record.update(seq=seq, ts=rfc3339_now(), prev=prev)
            record["hash"] = prev = record_hash(record)
            records.append(record)
            lines.append(canonical(record) + b"\n")
        try:
            self._file.write(b"".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror}") from None
        self._seq, self._prev = seq, prev
        if self._echo is not None:
            for line in lines:
                self._echo(line.decode())
        if self.max_bytes and self._file.tell() >= self.max_bytes:
            self._rotate()
        return records

    def _rotate(self) -> None:
        self._file.close()
        existing = rotated_files(self.path)
        index = int(existing[-1].name.rsplit(".", 1)[1]) + 1 if existing else 1
        os.replace(self.path, self.path.with_name(f"{self.path.name}.{index}"))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


class AsyncAuditLog:
    """The daemon's view of the audit log: appends run on one writer thread with group commit, so the
    event loop never blocks on fsync and concurrent releases share one fsync."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self._pending: list[tuple[Mapping[str, Any], Future[dict[str, Any]]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="skr-audit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                if not batch and self._closed:
                    return
            try:
                records = self.log.append_many([fields for fields, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    fut.set_exception(exc)
            else:
                for (_, fut), record in zip(batch, records, strict=True):
                    fut.set_result(record)

    async def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        check_fields(fields)  # here, so that one bad record cannot fail the whole group commit
        fut: Future[dict[str, Any]] = Future()
        with self._cond:
            if self._closed:
                raise AuditError("the audit log is closed")
            self._pending.append((fields, fut))
            self._cond.notify()
        return await asyncio.wrap_future(fut)

    async def aclose(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self.log.close()


# --- verification ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """The first problem in a chain: where and why. ``kind`` is ``tampered`` or ``truncated_tail``."""

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

    @property
    def intact(self) -> bool:
        return self.finding is None


def _iter_lines(files: Sequence[Path]) -> Iterator[tuple[Path, int, bytes, bool]]:
    """(file, line number, raw line, is_final_line_of_final_file_without_newline), streamed."""
    for fi, path in enumerate(files):
        final_file = fi == len(files) - 1
        try:
            with open(path, "rb") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    if raw.endswith(b"\n"):
                        yield path, lineno, raw[:-1], False
                    else:  # only a file's last line can lack its newline
                        yield path, lineno, raw, final_file
        except OSError as exc:
            raise AuditError(f"cannot read {path}: {exc.strerror}") from None


def verify_chain(files: Sequence[Path]) -> VerifyResult:
    """Check the files (chronological order) as one chain; stop at the first problem."""
    prev, expected_seq, count = GENESIS, 1, 0
    for path, lineno, raw, torn_candidate in _iter_lines(files):

        def bad(reason: str, seq: int | None = None, kind: str = "tampered") -> VerifyResult:
            return VerifyResult(count, expected_seq - 1, prev, Finding(str(path), lineno, seq, kind, reason))  # noqa: B023

        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise TypeError
        except (ValueError, TypeError, RecursionError):
            if torn_candidate:
                return bad(
                    "truncated tail: the last line is incomplete (a crash during a write)",
                    None,
                    "truncated_tail",
                )
            return bad("line is not a JSON object (edited)")
        seq = rec.get("seq")
        if not isinstance(seq, int):
            return bad("record has no integer seq (edited)")
        digest = rec.get("hash")
        try:
            content_hash = record_hash(rec)
        except ValueError:  # a lone surrogate escape: no canonical UTF-8 form, never written by us
            content_hash = None
        if not isinstance(digest, str) or not _HEX64.match(digest) or content_hash != digest:
            return bad("record hash does not match its content (edited)", seq)
        if seq != expected_seq:
            what = "deleted records before it" if seq > expected_seq else "reordered or duplicated"
            return bad(f"expected seq {expected_seq}, found {seq} ({what})", seq)
        if rec.get("prev") != prev:
            return bad("prev does not match the previous record's hash (deleted, inserted or reordered)", seq)
        unknown = set(rec) - RECORD_FIELDS - CHAIN_FIELDS
        if unknown:
            return bad(f"unexpected fields {sorted(unknown)}", seq)
        prev, expected_seq, count = digest, seq + 1, count + 1
    return VerifyResult(count, expected_seq - 1, prev, None)


def read_records(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Records from the files, skipping lines that do not parse (``verify`` is the place to judge them)."""
    for path in files:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except (ValueError, RecursionError):
                    continue
                if isinstance(rec, dict):
                    yield rec
