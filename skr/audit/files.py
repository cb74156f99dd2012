"""Finding and reading the files of one audit chain: rotated files, mixed streams, safe opening.

Owns: the rotation naming (``audit.jsonl.1`` is the newest rotated file, logrotate's convention), putting
files in chain order by the ``seq`` they hold (not by their names, so ``audit.jsonl*`` works in any shell
order), telling an audit log file (every line a record) from a mixed stream (``-``, ``kubectl logs``),
and opening files without following symlinks.

Never writes; never follows a symlink to an audit file.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from skr.audit.chain import Line, is_record, parse_record
from skr.errors import AuditError, Code

STDIN = "-"
_PROBE_LINES = 64  # how far into a file we look for its first record


def rotated_files(path: Path) -> list[Path]:
    """The rotated predecessors of ``path`` (``path.1`` newest, ``path.2`` older ...), oldest first."""
    found: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for sibling in path.parent.iterdir():
            suffix = sibling.name[len(path.name) + 1 :]
            if sibling.name.startswith(path.name + ".") and suffix.isdigit():
                found.append((int(suffix), sibling))
    return [p for _, p in sorted(found, reverse=True)]


def chain_files(path: Path) -> list[Path]:
    """All files of one chain: the rotated ones (oldest first), then the live file."""
    return [*rotated_files(path), path]


def refusal(message: str, *, hint: str | None = None) -> AuditError:
    """A file the audit log will not use (a link, not a regular file, not an audit log, locked): the
    sidecar does not start (``config_invalid``)."""
    return AuditError(message, hint=hint, code=Code.CONFIG_INVALID)


def open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` with ``O_NOFOLLOW``; the result must be a regular file. Raises :func:`refusal`."""
    try:
        # O_NONBLOCK: opening a FIFO planted in place of the log must not hang (no effect on regular files)
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except FileExistsError:
        raise refusal(f"{path} appeared while the audit log was being created; refusing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symlink
            raise refusal(
                f"{path} is a symbolic link; the audit log never follows links",
                hint="point --audit-log at the real file",
            ) from None
        raise refusal(f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refusal(f"{path} is not a regular file", hint="the audit log must be a plain file")
    return fd


def open_or_create(path: Path, flags: int) -> int:
    """:func:`open_regular`, or when nothing is there (not even a dangling link) create it with ``O_EXCL``."""
    try:
        return open_regular(path, flags)
    except AuditError:
        if os.path.lexists(path):
            raise
    return open_regular(path, flags | os.O_CREAT | os.O_EXCL)


def _open_for_reading(path: Path) -> BinaryIO:
    return os.fdopen(open_regular(path, os.O_RDONLY), "rb")


def first_seq(path: Path) -> int | None:
    """The seq of the first record in ``path`` (looking at its first lines), or None."""
    with _open_for_reading(path) as fh:
        for n, raw in enumerate(fh):
            if n >= _PROBE_LINES:
                break
            doc = parse_record(raw.rstrip(b"\n"))
            if doc is not None and is_record(doc) and isinstance(doc.get("seq"), int):
                return int(doc["seq"])
    return None


def order_by_seq(paths: Sequence[Path]) -> list[Path]:
    """Files in chain order: by the seq of their first record; files without records last."""
    keyed = [(first_seq(p), i, p) for i, p in enumerate(paths)]
    keyed.sort(key=lambda k: (k[0] is None, k[0] or 0, k[1]))
    return [p for _, _, p in keyed]


# ``kubectl logs --timestamps`` / ``az container logs`` put an RFC 3339 time in front of each line
_TIMESTAMP_PREFIX = re.compile(rb"^\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:?\d\d)? (?=\{)")


def _stream_marker(raw: bytes) -> bool:
    """A line only a container log holds: a checkpoint copy, a log line, or a timestamp prefix.
    No edit of one byte turns an audit record into one of these."""
    if _TIMESTAMP_PREFIX.match(raw):
        return True
    doc = parse_record(raw)
    if doc is None or is_record(doc):
        return False
    return "skr_audit_checkpoint" in doc or "msg" in doc or "message" in doc


def _is_log_file(path: Path) -> bool:
    """An audit log file holds records only; a file with container-log lines is read as a mixed stream."""
    with _open_for_reading(path) as fh:
        return not any(_stream_marker(raw.rstrip(b"\n")) for raw in fh)


def iter_lines(sources: Sequence[str | Path]) -> Iterator[Line]:
    """The lines of the sources in the order given; ``-`` reads standard input (always a mixed stream)."""
    for index, source in enumerate(sources):
        final = index == len(sources) - 1
        if str(source) == STDIN:
            yield from _lines(sys.stdin.buffer, STDIN, final=final, strict=False)
            continue
        path = Path(source)
        strict = _is_log_file(path)
        try:
            with _open_for_reading(path) as fh:
                yield from _lines(fh, str(path), final=final, strict=strict)
        except OSError as exc:
            raise AuditError(f"cannot read {path}: {exc.strerror}") from None


def _lines(fh: BinaryIO, name: str, *, final: bool, strict: bool) -> Iterator[Line]:
    for lineno, raw in enumerate(fh, start=1):
        torn = not raw.endswith(b"\n")  # only a source's last line can lack its newline
        text = raw if torn else raw[:-1]
        if not strict:
            text = _TIMESTAMP_PREFIX.sub(b"", text.removesuffix(b"\r"), count=1)
        yield Line(name, lineno, text, torn and final, strict)


def read_records(sources: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Records from the sources, skipping lines that are not records (``verify`` judges them)."""
    for line in iter_lines(list(sources)):
        doc = parse_record(line.raw)
        if doc is not None and is_record(doc):
            yield doc
