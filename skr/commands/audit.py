"""``skr audit verify · show · summary``: what auditors run on release logs.

``verify`` checks the hash chain, then every checkpoint's hardware report, and says what is proven; exit 0
proven, 1 damaged or truncated, 2 unusable input. ``show`` filters and prints records (table, JSON lines,
CSV); ``summary`` counts decisions per key. All three read files in chain order (by seq, whatever the
names) and mixed streams (``-`` or ``kubectl logs`` output), skipping lines that are not records.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skr.audit import OUTCOMES, Expectation, canonical, verify_chain
from skr.audit.chain import HEX64, VerifyResult, checkpoint_copy, parse_record, statement_problem
from skr.audit.files import STDIN, chain_files, iter_lines, order_by_seq, read_records, rotated_files
from skr.audit.proof import CheckpointProof, ProofOptions, describe_failure, prove_checkpoint
from skr.errors import BadRequest, Code, SkrError

EXIT_PROVEN, EXIT_DAMAGED = 0, 1
FORMATS = ("table", "json", "csv")
COLUMNS = ("seq", "ts", "event", "outcome", "kid", "key_version", "host_data", "error_code", "request_id")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("audit", help="verify and read the tamper-evident audit log")
    inner = group.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    verify = inner.add_parser(
        "verify", help="check the chain and its hardware checkpoints; exit 0 proven, 1 damaged, 2 unusable"
    )
    verify.add_argument("paths", nargs="+", metavar="PATH", help="log files in any order, or - for stdin")
    verify.add_argument(
        "--checkpoints",
        metavar="FILE_OR_STREAM",
        help="checkpoint copies (stdout of the sidecar, - for stdin)",
    )
    verify.add_argument(
        "--anchor", action="append", default=[], metavar="SEQ:HASH", help="a head noted earlier"
    )
    verify.add_argument("--expect-host-data", metavar="HEX", help="HOST_DATA every checkpoint must carry")
    verify.add_argument(
        "--expect-measurement", metavar="HEX", help="launch measurement every checkpoint must carry"
    )
    verify.add_argument(
        "--trust-ark", type=Path, metavar="FILE", help="trust this ARK too (the virtual TEE's)"
    )
    verify.add_argument("--at", metavar="TIME", help="check certificates at this RFC 3339 time")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=_verify)

    show = inner.add_parser("show", help="print the records (table, JSON lines or CSV)")
    show.add_argument("paths", nargs="+", metavar="PATH", help="log files or - (any order: sorted by seq)")
    show.add_argument("--kid", help="only this key (name, name/version or URL as requested)")
    show.add_argument("--event", help="only this event (key.release, attest.maa, audit.checkpoint ...)")
    show.add_argument("--outcome", choices=OUTCOMES, help="only records with this outcome")
    show.add_argument("--instance", help="only records written by this sidecar run")
    show.add_argument("--since", help="only records at or after this RFC 3339 time")
    show.add_argument("--until", help="only records before this RFC 3339 time")
    show.add_argument("--format", choices=FORMATS, help="output format (default table)")
    show.add_argument("--json", action="store_true", help="same as --format json")
    show.set_defaults(func=_show)

    summary = inner.add_parser(
        "summary", help="per key: granted/denied/error counts, times, host_data values"
    )
    summary.add_argument("paths", nargs="+", metavar="PATH", help="log files or - (any order: sorted by seq)")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    summary.set_defaults(func=_summary)


# --- inputs -------------------------------------------------------------------------------------------


def _sources(paths: Sequence[str]) -> list[str | Path]:
    """The inputs in chain order: ``-`` alone, or files ordered by seq (a lone live file brings its
    rotated predecessors)."""
    if STDIN in paths:
        if len(paths) > 1:
            raise BadRequest("- (standard input) cannot be combined with files")
        return [STDIN]
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise BadRequest(f"no such audit log: {p}")
    if len(files) == 1 and rotated_files(files[0]):
        files = chain_files(files[0])
    return list(order_by_seq(files))


def _parse_time(value: str, flag: str) -> datetime:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{flag} is not an RFC 3339 time: {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _hex(value: str | None, size: int, flag: str) -> bytes | None:
    if value is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]+", value) or len(value) != 2 * size:
        raise BadRequest(f"{flag} must be {2 * size} hex digits")
    return bytes.fromhex(value)


def _anchor(value: str) -> Expectation:
    seq, _, head = value.partition(":")
    if not seq.isdigit() or not HEX64.match(head.lower()):
        raise BadRequest(f"--anchor must be SEQ:HASH (a record number and its 64-hex hash), got {value!r}")
    return Expectation(int(seq), head.lower(), f"anchor {seq}:{head[:16]}…")


def _checkpoint_copies(source: str) -> list[Expectation]:
    """Checkpoint copies from a file or stream (stdout copies, ``/audit/head`` answers)."""
    if source != STDIN and not Path(source).is_file():
        raise BadRequest(f"no such checkpoint file: {source}")
    found = []
    for line in iter_lines([source]):
        doc = parse_record(line.raw)
        copy = checkpoint_copy(doc) if doc is not None else None
        if copy is None:
            continue
        problem = statement_problem(copy)
        if problem:
            raise BadRequest(f"{line.source}:{line.lineno}: {problem}")
        found.append(
            Expectation(
                copy["covers_seq"], copy["head"], f"checkpoint copy {line.source}:{line.lineno}", copy
            )
        )
    return found


def _proof_options(args: argparse.Namespace) -> ProofOptions:
    arks = []
    if args.trust_ark is not None:
        from skr.snp.certs import load_certificates

        try:
            arks = load_certificates(args.trust_ark.read_bytes())
        except OSError as exc:
            raise BadRequest(f"cannot read --trust-ark {args.trust_ark}: {exc.strerror}") from None
        except SkrError as exc:
            raise BadRequest(f"--trust-ark {args.trust_ark}: {exc.message}") from None
    return ProofOptions(
        trusted_arks=arks,
        expect_host_data=_hex(args.expect_host_data, 32, "--expect-host-data"),
        expect_measurement=_hex(args.expect_measurement, 48, "--expect-measurement"),
        at=_parse_time(args.at, "--at") if args.at else None,
    )


# --- verify -------------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    sources = _sources(args.paths)
    options = _proof_options(args)
    expectations = [_anchor(a) for a in args.anchor]
    if args.checkpoints:
        if args.checkpoints == STDIN and sources == [STDIN]:
            raise BadRequest("the log and --checkpoints cannot both be standard input")
        expectations += _checkpoint_copies(args.checkpoints)
    result = verify_chain(sources, expectations)
    proofs: list[CheckpointProof] = []
    failure: str | None = None
    unverified = 0
    # the auditor named a root or a workload: every checkpoint must be proven under it
    demands = args.trust_ark or args.expect_host_data or args.expect_measurement
    if result.finding is None:
        seen: set[tuple[Any, ...]] = set()
        for checkpoint in result.checkpoints:
            key = (checkpoint["covers_seq"], checkpoint["head"], checkpoint["instance"], checkpoint["time"])
            if key in seen:
                continue
            seen.add(key)
            try:
                proofs.append(prove_checkpoint(checkpoint, options))
            except SkrError as exc:
                if exc.code == Code.UNTRUSTED_ROOT and not demands:
                    unverified += 1  # a virtual TEE's: proves nothing unless its ARK is named
                    continue
                failure = describe_failure(checkpoint, exc)
                if exc.code == Code.UNTRUSTED_ROOT:
                    failure += " (a virtual TEE checkpoint verifies only with --trust-ark and its ARK)"
                break
    _report(args, sources, result, proofs, failure, unverified=unverified)
    if unverified and failure is None:
        print(
            f"WARNING: {unverified} checkpoint(s) are signed by a root that is not AMD's (a VIRTUAL TEE?) "
            "and prove nothing; pass --trust-ark FILE to check them against that root",
            file=sys.stderr,
        )
    return EXIT_PROVEN if result.finding is None and failure is None else EXIT_DAMAGED


def _sentence(result: VerifyResult, proofs: Sequence[CheckpointProof]) -> str:
    sealed = max((p.covers_seq for p in proofs), default=result.first_seq - 1)
    host_data = sorted({p.host_data for p in proofs})
    kind = "virtual" if any(p.virtual for p in proofs) else "hardware"
    where = f" (host_data {', '.join(host_data)})" if host_data else ""
    if not proofs:
        return (
            "no records sealed by 0 hardware checkpoints; "
            f"{result.records} records are chained but not yet sealed"
        )
    if sealed < result.first_seq:  # only the start-up checkpoint of an empty log so far
        return (
            f"no records sealed yet: {len(proofs)} {kind} checkpoints{where} cover only the log's start; "
            f"{result.records} records are chained but not yet sealed"
        )
    return (
        f"records {result.first_seq}–{sealed} sealed by {len(proofs)} {kind} checkpoints{where}; "  # noqa: RUF001 - the en dash is the issue's wording
        f"{result.last_seq - sealed} records after the last checkpoint are chained but not yet sealed"
    )


def _report(
    args: argparse.Namespace,
    sources: Sequence[str | Path],
    result: VerifyResult,
    proofs: Sequence[CheckpointProof],
    failure: str | None,
    *,
    unverified: int = 0,
) -> None:
    virtual = any(p.virtual for p in proofs)
    if args.json:
        doc: dict[str, Any] = {
            "intact": result.finding is None and failure is None,
            "records": result.records,
            "first_seq": result.first_seq,
            "last_seq": result.last_seq,
            "last_hash": result.last_hash,
            "files": [str(f) for f in sources],
            "skipped_lines": result.skipped,
            "checkpoints": len(proofs),
            "sealed_seq": max((p.covers_seq for p in proofs), default=0),
            "host_data": sorted({p.host_data for p in proofs}),
            "virtual": virtual,
            "anchors": result.anchors,
            "unverified_checkpoints": unverified,  # signed under a root not trusted here (virtual TEE)
        }
        if result.finding:
            doc["finding"] = asdict(result.finding)  # file, line, seq, kind, reason
        elif failure:  # a checkpoint that does not prove: no file, line or seq to point at
            where = dict.fromkeys(("file", "line", "seq"))
            doc["finding"] = {**where, "kind": "checkpoint_invalid", "reason": failure}
        else:
            doc["proven"] = _sentence(result, proofs)
        print(json.dumps(doc))
    elif result.finding is None and failure is None:
        print(
            f"intact: {result.records} records in {len(sources)} file(s), "
            f"last seq {result.last_seq}, last hash {result.last_hash}"
        )
        print(_sentence(result, proofs))
        if result.skipped:
            print(f"{result.skipped} line(s) that are not audit records were skipped")
        if result.anchors:
            print(f"{result.anchors} anchor(s) matched")
    if virtual and result.finding is None and failure is None:
        print(
            "WARNING: VIRTUAL TEE checkpoints: signed by the software TEE whose ARK you passed with "
            "--trust-ark, not by AMD hardware; they prove nothing about a confidential environment",
            file=sys.stderr,
        )
    if result.finding is not None:
        print(f"skr: audit log damaged at {result.finding}", file=sys.stderr)
    elif failure is not None:
        print(f"skr: audit checkpoint not proven: {failure}", file=sys.stderr)


# --- show and summary ---------------------------------------------------------------------------------


def _records_with_instance(sources: Sequence[str | Path]) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Records and the sidecar run that wrote them (the instance of the latest ``audit.start``)."""
    instance: str | None = None
    for rec in read_records(sources):
        if rec.get("event") == "audit.start" and isinstance(rec.get("instance"), str):
            instance = rec["instance"]
        yield rec, rec.get("instance") if isinstance(rec.get("instance"), str) else instance


def _show(args: argparse.Namespace) -> int:
    since = _parse_time(args.since, "--since") if args.since else None
    until = _parse_time(args.until, "--until") if args.until else None
    fmt = "json" if args.json else (args.format or "table")
    wanted = {name: getattr(args, name) for name in ("kid", "event", "outcome") if getattr(args, name)}
    rows = []
    for rec, instance in _records_with_instance(_sources(args.paths)):
        if any(rec.get(name) != value for name, value in wanted.items()):
            continue
        if args.instance and instance != args.instance:
            continue
        if since is not None or until is not None:
            try:
                when = _parse_time(str(rec.get("ts", "")), "ts")
            except BadRequest:
                continue
            if (since is not None and when < since) or (until is not None and when >= until):
                continue
        rows.append(rec)
    if fmt == "json":
        for rec in rows:  # the canonical line: one run's records, exported, still verify
            print(canonical(rec).decode())
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([*COLUMNS, "reason"])
        for rec in rows:
            writer.writerow([_csv_cell(rec.get(c)) for c in (*COLUMNS, "reason")])
    else:
        _table(COLUMNS, [[_cell(rec.get(c), c) for c in COLUMNS] for rec in rows])
        print(f"{len(rows)} record(s)")
    return 0


def _table(columns: Sequence[str], table: Sequence[Sequence[str]]) -> None:
    widths = [max([len(c), *(len(r[i]) for r in table)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    # a spreadsheet must not run a cell as a formula (CSV injection)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    text = str(value)
    if column == "host_data" and len(text) > 16:
        return text[:12] + "…"
    return text


def _summary(args: argparse.Namespace) -> int:
    keys: dict[str, dict[str, Any]] = {}
    for rec in read_records(_sources(args.paths)):
        kid = rec.get("kid")
        if rec.get("event") != "key.release" or not isinstance(kid, str):
            continue
        entry = keys.setdefault(
            kid, {"granted": 0, "denied": 0, "error": 0, "first": None, "last": None, "host_data": set()}
        )
        outcome = rec.get("outcome")
        if outcome in OUTCOMES:
            entry[outcome] += 1
        ts = rec.get("ts")
        if isinstance(ts, str):
            entry["first"] = entry["first"] or ts
            entry["last"] = ts
        if isinstance(rec.get("host_data"), str):
            entry["host_data"].add(rec["host_data"])
    if args.json:
        doc = {k: {**v, "host_data": sorted(v["host_data"])} for k, v in sorted(keys.items())}
        print(json.dumps(doc, sort_keys=True))
        return 0
    columns = ("kid", *OUTCOMES, "first", "last", "host_data")
    table = []
    for kid, v in sorted(keys.items()):
        row = {**v, "kid": kid, "host_data": ",".join(sorted(v["host_data"])) or None}
        table.append(["-" if row[c] is None else str(row[c]) for c in columns])
    _table(columns, table)
    print(f"{len(keys)} key(s)")
    return 0
