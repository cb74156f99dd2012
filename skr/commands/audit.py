"""``skr audit verify`` and ``skr audit show``: what auditors run on release logs."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skr.audit import OUTCOMES, chain_files, read_records, rotated_files, verify_chain
from skr.errors import BadRequest


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("audit", help="verify and read the tamper-evident audit log")
    inner = group.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=type(group))
    inner.required = True

    verify = inner.add_parser("verify", help="check the hash chain; exit 0 intact, 1 damaged")
    verify.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="log files, oldest first")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=_verify)

    show = inner.add_parser("show", help="print the records as a table")
    show.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="log files, oldest first")
    show.add_argument("--kid", help="only this key (name, name/version or URL as requested)")
    show.add_argument("--outcome", choices=OUTCOMES, help="only records with this outcome")
    show.add_argument("--since", help="only records at or after this RFC 3339 time")
    show.add_argument("--json", action="store_true", help="print matching records as JSON lines")
    show.set_defaults(func=_show)


def _files(paths: list[Path]) -> list[Path]:
    for p in paths:
        if not p.is_file():
            raise BadRequest(f"no such audit log: {p}")
    # one live file given: include its rotated predecessors, oldest first
    if len(paths) == 1 and rotated_files(paths[0]):
        return chain_files(paths[0])
    return paths


def _verify(args: argparse.Namespace) -> int:
    files = _files(args.paths)
    result = verify_chain(files)
    if args.json:
        doc: dict[str, Any] = {
            "intact": result.intact,
            "records": result.records,
            "last_seq": result.last_seq,
            "last_hash": result.last_hash,
            "files": [str(f) for f in files],
        }
        if result.finding:
            f = result.finding
            doc["finding"] = {
                "file": f.file,
                "line": f.line,
                "seq": f.seq,
                "kind": f.kind,
                "reason": f.reason,
            }
        print(json.dumps(doc))
    elif result.intact:
        print(
            f"intact: {result.records} records in {len(files)} file(s), "
            f"last seq {result.last_seq}, last hash {result.last_hash}"
        )
    if result.finding is not None:
        print(f"skr: audit log damaged at {result.finding}", file=sys.stderr)
        return 1
    return 0


def _parse_time(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"--since is not an RFC 3339 time: {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _show(args: argparse.Namespace) -> int:
    since = _parse_time(args.since) if args.since else None
    rows = []
    for rec in read_records(_files(args.paths)):
        if args.kid and rec.get("kid") != args.kid:
            continue
        if args.outcome and rec.get("outcome") != args.outcome:
            continue
        if since is not None:
            try:
                if _parse_time(str(rec.get("ts", ""))) < since:
                    continue
            except BadRequest:
                continue
        rows.append(rec)
    if args.json:
        for rec in rows:
            print(json.dumps(rec, sort_keys=True))
        return 0
    columns = ("seq", "ts", "event", "outcome", "kid", "key_version", "host_data", "error_code", "request_id")
    table = [[_cell(rec.get(c), c) for c in columns] for rec in rows]
    widths = [max([len(c), *(len(r[i]) for r in table)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    print(f"{len(rows)} record(s)")
    return 0


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    text = str(value)
    if column == "host_data" and len(text) > 16:
        return text[:12] + "…"
    return text
