"""Appending to the audit log: one writer, durable all-or-nothing batches, crash recovery, rotation.

Owns:
- the writer lock: an exclusive ``flock`` on the hidden sibling ``.<log>.lock`` (rotation never moves
  it), so a second sidecar on the same file refuses to start, naming the holder's pid;
- safe opening: ``O_NOFOLLOW`` for the log and its rotated files, ``O_EXCL`` when creating, regular files
  only, else ``config_invalid``;
- durable batches: records are written unbuffered and fsynced before anyone is told they exist; on a
  write or fsync error the file is cut back to the last good offset and ``seq`` does not advance, so when
  space returns the chain continues with no gap and no replay;
- recovery: a torn last line (a crash mid-write) of a file that holds audit records is cut off and the
  cut recorded; a file that holds no audit records is never truncated;
- rotation by size: the live file becomes ``.1`` and older files move up one number.

Never writes key material or tokens (see :func:`skr.audit.chain.check_fields`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skr.audit.chain import GENESIS, HEX64, canonical, check_fields, parse_record, record_hash, rfc3339_now
from skr.audit.files import open_or_create, open_regular, refusal, rotated_files
from skr.errors import AuditError

log = logging.getLogger("skr.audit")

_BLOCK = 64 * 1024
_MAX_RECORD_LINE = 1 << 20  # far above any record we write (check_fields bounds them)
_APPEND = os.O_RDWR | os.O_APPEND  # read: the tail at start; write: records


def acquire_writer_lock(path: Path) -> int:
    """Take the exclusive writer lock for the log at ``path``; the fd holds it until closed."""
    target = path.with_name(f".{path.name}.lock")  # hidden: `audit.jsonl*` in a shell never picks it
    fd = open_or_create(target, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "another process"
        raise refusal(
            f"the audit log {path} is already being written by {who} (lock {target})",
            hint="give every sidecar its own audit file (the chart names it per pod)",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(frozen=True)
class _Tail:
    seq: int
    hash: str
    valid_bytes: int  # length of the file up to and including the last complete, valid line
    size: int


def _rfind_newline(fd: int, before: int) -> int:
    """Offset of the last ``\n`` in the file before ``before``, or -1; reads backwards one block at a time."""
    pos = before
    while pos > 0:
        start = max(0, pos - _BLOCK)
        found = os.pread(fd, pos - start, start).rfind(b"\n")
        if found >= 0:
            return start + found
        pos = start
    return -1


def _read_tail(fd: int, path: Path) -> _Tail | None:
    """The last valid record of the open file and where it ends; None if the file is empty.

    Reads from the end: start-up costs the same for a log of ten records and of ten million. A
    non-empty file without one complete audit record is refused: it is not ours to truncate.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    last_newline = _rfind_newline(fd, size)
    if last_newline < 0:
        raise refusal(
            f"{path} holds no audit record; refusing to write to (or truncate) it",
            hint="point --audit-log at a new file or an existing skr audit log",
        )
    start = _rfind_newline(fd, last_newline) + 1
    if last_newline - start > _MAX_RECORD_LINE:
        raise _damaged_tail(path)
    line = os.pread(fd, last_newline - start, start)
    rec = parse_record(line)
    try:
        if rec is None:
            raise ValueError(line[:16])
        seq, digest = rec["seq"], rec["hash"]
        if not isinstance(seq, int) or not isinstance(digest, str) or not HEX64.match(digest):
            raise ValueError(digest)
        if record_hash(rec) != digest or canonical(rec) != line:
            raise ValueError(digest)
    except (ValueError, KeyError, TypeError):
        # A complete but unparsable last line is tampering (or not an audit log): leave it for `verify`.
        raise _damaged_tail(path) from None
    return _Tail(seq, digest, last_newline + 1, size)


def _damaged_tail(path: Path) -> AuditError:
    return AuditError(
        f"the last complete line of {path} is not a valid audit record",
        hint="run `skr audit verify` on it; the daemon will not append to a damaged log",
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class AuditLog:
    """Appends hash-chained records to a JSON-lines file. Thread-safe; see :class:`AsyncAuditLog`.

    ``max_bytes``: rotate the live file once it reaches this size (0 = never). ``echo``: a callable that
    also receives each line (for shipping to stdout). Raises ``config_invalid`` when another process
    writes the file or the path is not a regular file.
    """

    def __init__(self, path: Path | str, *, max_bytes: int = 0, echo: Any = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._echo = echo
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_writer_lock(self.path)
        self._fd = -1
        self.head: tuple[int, str] = (0, GENESIS)  # (seq, hash) of the last durable record, one value
        try:
            for older in rotated_files(self.path):
                if not stat.S_ISREG(os.lstat(older).st_mode):
                    raise refusal(f"{older} is not a regular file (a symbolic link?); refusing")
            self._fd = open_or_create(self.path, _APPEND)
            recovered = self._recover()
        except BaseException:
            self._close_fds()
            raise
        self._offset = os.fstat(self._fd).st_size
        if recovered:
            self._write_batch([{"event": "audit.recovered", "outcome": "error", **recovered}])

    def _recover(self) -> dict[str, Any] | None:
        tail = _read_tail(self._fd, self.path)
        if tail is None:
            # nothing in the live file (new, or rotated just now): continue from the newest rotated record
            best: tuple[int, str] = (0, GENESIS)
            for older in rotated_files(self.path):
                fd = open_regular(older, os.O_RDONLY)
                try:
                    previous = _read_tail(fd, older)
                finally:
                    os.close(fd)
                if previous is not None and previous.seq > best[0]:
                    best = (previous.seq, previous.hash)
            self.head = best
            return None
        self.head = (tail.seq, tail.hash)
        if tail.valid_bytes == tail.size:
            return None
        # A crash tore the last line. That record was never acknowledged (we fsync before answering),
        # so cut it off and say so in the chain itself.
        os.ftruncate(self._fd, tail.valid_bytes)
        os.fsync(self._fd)
        return {"truncated_bytes": tail.size - tail.valid_bytes, "note": "torn last line removed on start"}

    @property
    def last_seq(self) -> int:
        return self.head[0]

    @property
    def last_hash(self) -> str:
        return self.head[1]

    def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record, durable on return (written and fsynced). Returns the full record."""
        return self.append_many([fields])[0]

    def append_many(self, batch: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append records with a single fsync (group commit): all of them, or none."""
        for fields in batch:
            check_fields(fields)
        with self._lock:
            return self._write_batch(batch)

    def _write_batch(self, batch: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if self._fd < 0:
            raise AuditError("the audit log is closed")
        records: list[dict[str, Any]] = []
        lines: list[bytes] = []
        seq, prev = self.head
        for fields in batch:
            seq += 1
            record: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
            record.update(seq=seq, ts=rfc3339_now(), prev=prev)
            record["hash"] = prev = record_hash(record)
            records.append(record)
            lines.append(canonical(record) + b"\n")
        data = b"".join(lines)
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            self._undo()
            raise AuditError(
                f"cannot write the audit log {self.path}: {exc.strerror}",
                hint="free space on the audit volume; nothing was released without its record",
            ) from None
        self._offset += len(data)
        self.head = (seq, prev)
        if self._echo is not None:
            for line in lines:
                self._echo(line.decode())
        if self.max_bytes and self._offset >= self.max_bytes:
            try:
                self._rotate()
            except (OSError, AuditError) as exc:
                log.warning("cannot rotate the audit log; still writing to it", extra={"error": str(exc)})
        return records

    def _undo(self) -> None:
        """Cut the file back to the end of the last durable batch (a partial write leaves half a line)."""
        try:
            os.ftruncate(self._fd, self._offset)
            os.fsync(self._fd)
        except OSError:
            # Without the cut the next batch would follow a torn line: stop writing rather than fork.
            log.error("cannot cut a failed write from the audit log; no further records are written")
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:
        for path in rotated_files(self.path):  # oldest first: the highest number moves first
            index = int(path.name.rsplit(".", 1)[1])
            os.replace(path, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        fd = open_regular(self.path, _APPEND | os.O_CREAT | os.O_EXCL)
        os.close(self._fd)
        self._fd, self._offset = fd, 0
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _close_fds(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def close(self) -> None:
        with self._lock:
            self._close_fds()


Listener = Callable[[dict[str, Any]], None]


class AsyncAuditLog:
    """The daemon's view of the audit log: appends run on one writer thread with group commit, so the
    event loop never blocks on fsync and concurrent releases share one fsync.

    Listeners (:meth:`add_listener`) see every durable record on the event loop (checkpoint triggers).
    ``instance``: a random id for this process's run of the log (checkpoints and MAA runtime data name it).
    """

    def __init__(self, log: AuditLog, *, instance: str | None = None) -> None:
        self.log = log
        self.instance = instance or secrets.token_hex(8)
        self._pending: list[tuple[Mapping[str, Any], Future[dict[str, Any]]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._listeners: list[Listener] = []
        self.counts: dict[str, int] = {"granted": 0, "denied": 0, "error": 0}
        self._thread = threading.Thread(target=self._run, name="skr-audit", daemon=True)
        self._thread.start()

    @property
    def head(self) -> tuple[int, str]:
        return self.log.head

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

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
        record = await asyncio.wrap_future(fut)
        outcome = record.get("outcome")
        if isinstance(outcome, str) and outcome in self.counts:
            self.counts[outcome] += 1
        for listener in self._listeners:
            listener(record)
        return record

    async def aclose(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self.log.close()
