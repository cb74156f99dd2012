"""``skr report``: show, verify and fetch SEV-SNP attestation reports.

``show FILE`` decodes a report (raw 1184 bytes or hex text). ``verify FILE --vek CERT`` checks the
signature, the AMD chain and the certificate/report bindings, plus any expectations given (exit 0 valid,
1 invalid with the reason on one line of stderr, 2 unusable input). ``fetch`` asks an evidence provider
for a fresh report. Reports are not secret; keys and tokens never pass through here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from skr.errors import BadRequest, CertificateError, VerificationError
from skr.evidence.base import REPORT_DATA_SIZE, Evidence, report_data_for
from skr.snp.certs import load_certificates
from skr.snp.report import REPORT_SIZE, AttestationReport, Product
from skr.snp.verify import ValidationOptions, VerifiedReport, validate_report, verify_report

_EXIT_VALID = 0
_EXIT_INVALID = 1
_PRODUCTS = {p.value.lower(): p for p in Product}
_EVIDENCE_KINDS = ("auto", "sevguest", "sev", "tsm", "virtual")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``skr report {show,verify,fetch}``."""
    parser = sub.add_parser(
        "report",
        help="show, verify or fetch an SEV-SNP attestation report",
        description="Work with AMD SEV-SNP attestation reports (raw binary or hex text).",
    )
    actions = parser.add_subparsers(dest="report_command", metavar="ACTION")
    actions.required = True

    show = actions.add_parser("show", help="decode a report and print its fields")
    show.add_argument("file", type=Path, metavar="FILE", help="the report: raw 1184 bytes or hex text")
    show.add_argument("--json", action="store_true", help="print one JSON object keyed by field name")
    show.set_defaults(func=_show)

    verify = actions.add_parser("verify", help="verify signature, AMD chain and expectations")
    verify.add_argument("file", type=Path, metavar="FILE", help="the report: raw 1184 bytes or hex text")
    verify.add_argument(
        "--vek",
        required=True,
        type=Path,
        metavar="CERT",
        help="VCEK/VLEK, DER or PEM; in a PEM bundle the first is the VEK and the rest may be its chain",
    )
    verify.add_argument("--chain", type=Path, metavar="PEM", help="ASK/ASVK and ARK (PEM)")
    verify.add_argument("--product", choices=sorted(_PRODUCTS), help="milan, genoa or turin")
    verify.add_argument(
        "--at", metavar="ISO8601", help="check certificate validity at this time (default now)"
    )
    verify.add_argument("--expect-host-data", metavar="HEX", help="HOST_DATA must equal these 32 bytes")
    verify.add_argument(
        "--expect-report-data",
        metavar="HEX",
        help="REPORT_DATA must equal this (up to 64 bytes; shorter values are padded with zero bytes)",
    )
    verify.add_argument(
        "--trusted-ark",
        type=Path,
        action="append",
        default=[],
        metavar="CERT",
        help="an extra root to trust besides the pinned AMD ARKs (e.g. the local virtual TEE's ark.pem)",
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    verify.set_defaults(func=_verify)

    fetch = actions.add_parser("fetch", help="get a fresh report from the TEE")
    data = fetch.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--runtime-data", type=Path, metavar="FILE", help="REPORT_DATA = SHA-256(file) + 32 zero bytes"
    )
    data.add_argument("--report-data", metavar="HEX", help="REPORT_DATA itself (up to 64 bytes, zero-padded)")
    fetch.add_argument("--evidence", choices=_EVIDENCE_KINDS, default="auto", help="evidence source")
    fetch.add_argument("--state-dir", type=Path, metavar="DIR", help="key directory of the virtual TEE")
    fetch.add_argument(
        "--security-policy",
        type=Path,
        metavar="FILE",
        help="CCE policy (virtual TEE: HOST_DATA = its SHA-256)",
    )
    fetch.add_argument(
        "--out", type=Path, metavar="FILE", help="write the raw report here (default: hex on stdout)"
    )
    fetch.add_argument("--chain-out", type=Path, metavar="FILE", help="also write the VCEK chain PEM here")
    fetch.set_defaults(func=_fetch)


# --- input -----------------------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _parse_hex(text: str, what: str) -> bytes:
    cleaned = "".join(text.split())
    cleaned = cleaned[2:] if cleaned.lower().startswith("0x") else cleaned
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise BadRequest(f"{what} is not hex: {text[:40]!r}") from None


def read_report(path: Path) -> AttestationReport:
    """A report from a file holding either the raw 1184 bytes or their hex text."""
    data = _read(path, "report")
    if len(data) != REPORT_SIZE:
        try:
            data = _parse_hex(data.decode("ascii"), "report text")
        except (UnicodeDecodeError, BadRequest):
            raise BadRequest(
                f"{path}: expected {REPORT_SIZE} raw bytes or {2 * REPORT_SIZE} hex digits, "
                f"found {len(data)} bytes that are not hex text"
            ) from None
    return AttestationReport.parse(data)


def _certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        return load_certificates(_read(path, what))
    except CertificateError as exc:
        raise BadRequest(f"{path}: {exc.message}", hint=exc.hint) from None


def _report_data(text: str) -> bytes:
    value = _parse_hex(text, "report data")
    if not 0 < len(value) <= REPORT_DATA_SIZE:
        raise BadRequest(f"report data must be 1-{REPORT_DATA_SIZE} bytes, found {len(value)}")
    return value.ljust(REPORT_DATA_SIZE, b"\x00")


def _moment(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"--at is not an ISO 8601 time: {text!r}", hint="e.g. 2025-06-01T00:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- show ------------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    report = read_report(args.file)
    fields = report.to_json_dict()
    if args.json:
        print(json.dumps(fields, indent=2))
        return 0
    for name, value in fields.items():
        print(f"{name:20} {_render(name, value)}")
    return 0


def _render(name: str, value: Any) -> str:
    if isinstance(value, dict) and "raw" in value:
        parts = ", ".join(f"{k}={v}" for k, v in value.items() if k != "raw")
        return f"{value['raw']} ({parts})"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, int) and not isinstance(value, bool) and name not in ("version", "vmpl"):
        return f"{value} (0x{value:x})"
    return str(value)


# --- verify ----------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    report = read_report(args.file)
    bundle = _certificates(args.vek, "VCEK/VLEK")
    chain = bundle[1:] + (_certificates(args.chain, "chain") if args.chain else [])
    anchors = [cert for path in args.trusted_ark for cert in _certificates(path, "trusted ARK")]
    options = ValidationOptions(
        host_data=None if args.expect_host_data is None else _host_data(args.expect_host_data),
        report_data=None if args.expect_report_data is None else _report_data(args.expect_report_data),
        allow_debug=True,  # only the expectations given on the command line are judged
    )
    product = _PRODUCTS[args.product] if args.product else None
    try:
        verified = verify_report(
            report, bundle[0], chain, at=_moment(args.at), product=product, trusted_arks=anchors
        )
        if options.host_data is not None or options.report_data is not None:
            validate_report(report, options)
    except VerificationError as exc:
        if args.json:
            print(json.dumps({"valid": False, "code": exc.code, "reason": exc.message}))
        print(f"skr: report invalid: {exc.diagnostics()}", file=sys.stderr)
        return _EXIT_INVALID
    if args.json:
        print(json.dumps(_verdict(verified), indent=2))
    else:
        info = verified.vek_info
        print(
            f"valid: {verified.product} report v{report.version} signed by the {info.kind.upper()} "
            f"({info.product_name}), REPORTED_TCB {report.reported_tcb_version(verified.product)}"
        )
    return _EXIT_VALID


def _host_data(text: str) -> bytes:
    value = _parse_hex(text, "host data")
    if len(value) != 32:
        raise BadRequest(f"host data is 32 bytes (64 hex digits), found {len(value)} bytes")
    return value


def _verdict(verified: VerifiedReport) -> dict[str, Any]:
    info = verified.vek_info
    return {
        "valid": True,
        "product": str(verified.product),
        "ark_sha256": verified.ark_sha256,
        "vek": {
            "kind": info.kind,
            "product_name": info.product_name,
            "struct_version": info.struct_version,
            "bl_spl": info.bl_spl,
            "tee_spl": info.tee_spl,
            "snp_spl": info.snp_spl,
            "ucode_spl": info.ucode_spl,
            "fmc_spl": info.fmc_spl,
            "hwid": None if info.hwid is None else info.hwid.hex(),
            "csp_id": info.csp_id,
        },
        "report": verified.report.to_json_dict(verified.product),
    }


# --- fetch -----------------------------------------------------------------------------------------


def _fetch(args: argparse.Namespace) -> int:
    if args.runtime_data is not None:
        report_data = report_data_for(_read(args.runtime_data, "runtime data"))
    else:
        report_data = _report_data(args.report_data)
    policy = _read(args.security_policy, "security policy") if args.security_policy else None
    evidence = asyncio.run(_collect(args.evidence, report_data, state_dir=args.state_dir, policy=policy))
    if args.chain_out is not None:
        args.chain_out.write_bytes(evidence.vcek_chain_pem)
    if args.out is not None:
        args.out.write_bytes(evidence.report)
        print(
            f"wrote {len(evidence.report)}-byte report from {evidence.provider} to {args.out}",
            file=sys.stderr,
        )
    else:
        print(evidence.report.hex())
    return 0


async def _collect(
    kind: str, report_data: bytes, *, state_dir: Path | None, policy: bytes | None
) -> Evidence:
    # Imported here: the providers pull in device and HTTP code that show/verify never need.
    from skr.evidence import create_provider
    from skr.evidence.context import load_security_context

    context = None if kind == "virtual" and policy is not None else load_security_context()
    provider = create_provider(kind, context=context, state_dir=state_dir, security_policy=policy)
    try:
        return await provider.collect(report_data)
    finally:
        await provider.aclose()
