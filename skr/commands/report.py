"""``skr report``: show, verify and fetch SEV-SNP attestation reports.

``show FILE`` decodes a report (raw 1184 bytes or hex text, or a whole Azure vTPM HCL report, whose
runtime data is shown too). ``verify FILE --vek CERT`` checks the
signature, the AMD chain and the certificate/report bindings, plus any expectations given (exit 0 valid,
1 invalid with the reason on one line of stderr, 2 unusable input, which includes a VCEK/VLEK without its
AMD chain; for an HCL report also the binding of its runtime data). ``fetch`` asks an evidence provider
for a fresh report. Reports are not secret; keys and tokens never pass through here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from skr.config import EVIDENCE_KINDS, EvidenceKind
from skr.errors import BadRequest, CertificateError, Code, VerificationError
from skr.evidence.base import REPORT_DATA_SIZE, Evidence, report_data_for
from skr.snp.certs import load_certificates
from skr.snp.hcl import HclReport, is_hcl_report, parse_hcl_report
from skr.snp.report import REPORT_SIZE, AttestationReport, Product
from skr.snp.verify import ValidationOptions, validate_report, verify_report

_EXIT_VALID = 0
_EXIT_INVALID = 1
_PRODUCTS = {p.value.lower(): p for p in Product}
_FILE_HELP = "the report: raw 1184 bytes or hex text, or an Azure vTPM HCL report (raw or hex)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "report",
        help="show, verify or fetch an SEV-SNP attestation report",
        description="Work with AMD SEV-SNP attestation reports (raw binary or hex text).",
    )
    actions = parser.add_subparsers(dest="report_command", metavar="ACTION", required=True)

    show = actions.add_parser("show", help="decode a report and print its fields")
    show.add_argument("file", type=Path, metavar="FILE", help=_FILE_HELP)
    show.add_argument("--json", action="store_true", help="print one JSON object keyed by field name")
    show.set_defaults(func=_show)

    verify = actions.add_parser("verify", help="verify signature, AMD chain and expectations")
    verify.add_argument("file", type=Path, metavar="FILE", help=_FILE_HELP)
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
    fetch.add_argument(
        "--evidence", choices=EVIDENCE_KINDS, default=EvidenceKind.AUTO.value, help="evidence source"
    )
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


def read_report_file(path: Path) -> tuple[AttestationReport, HclReport | None]:
    """The SNP report in a file, and the HCL report around it when the file is one (raw or hex)."""
    data = _read(path, "report")
    if not is_hcl_report(data) and len(data) != REPORT_SIZE:
        try:
            data = _parse_hex(data.decode("ascii"), "report text")
        except (UnicodeDecodeError, BadRequest):
            raise BadRequest(
                f"{path}: expected {REPORT_SIZE} raw bytes or {2 * REPORT_SIZE} hex digits, "
                f"found {len(data)} bytes that are not hex text"
            ) from None
    if is_hcl_report(data):
        hcl = parse_hcl_report(data)
        return AttestationReport.parse(hcl.snp_report), hcl
    return AttestationReport.parse(data), None


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
    report, hcl = read_report_file(args.file)
    fields = report.to_json_dict()
    if args.json:
        print(json.dumps(fields if hcl is None else {**fields, "hcl": hcl.to_json_dict()}, indent=2))
        return 0
    for name, value in fields.items():
        print(f"{name:20} {_render(name, value)}")
    if hcl is not None:
        _show_hcl(hcl)
    return 0


def _show_hcl(hcl: HclReport) -> None:
    info = hcl.to_json_dict()
    bound = "bound by REPORT_DATA" if info["runtime_data_bound"] else "NOT bound by REPORT_DATA"
    print()
    print(
        f"HCL report v{info['version']}, {info['report_type']} hardware report, {info['report_size']} bytes"
    )
    print(
        f"runtime data         {info['runtime_data_size']} bytes, "
        f"{info['report_data_hash']} {info['runtime_data_hash']} ({bound})"
    )
    runtime = info["runtime_data"]
    keys = ", ".join(
        f"{k.get('kid')} ({k.get('kty')}, {'/'.join(k.get('key_ops') or [])})" for k in runtime["keys"]
    )
    print(f"keys                 {keys or '(none)'}")
    config = runtime["vm-configuration"]
    if isinstance(config, dict):
        print("vm-configuration     " + ", ".join(f"{k}={json.dumps(v)}" for k, v in config.items()))
    else:
        print(f"vm-configuration     {json.dumps(config)}")
    print(f"user-data            {runtime['user-data']}")


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
    report, hcl = read_report_file(args.file)
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
        if hcl is not None and not hcl.binds_runtime_data():
            raise VerificationError(
                f"the SNP report's REPORT_DATA does not start with the {hcl.hash_name} of the HCL runtime "
                "data, so the runtime data (its keys, user-data) is not the one the hardware attested",
                code=Code.REPORT_INVALID,
            )
    except VerificationError as exc:
        if exc.code == Code.CERTIFICATE_CHAIN_INCOMPLETE:  # nothing was judged: the input lacks the chain
            raise BadRequest(
                f"unusable input: {exc.message}",
                hint="pass the ASK/ASVK and ARK with --chain, or a PEM bundle VEK+ASK+ARK as --vek",
            ) from None
        if args.json:
            print(json.dumps({"valid": False, "code": exc.code, "reason": exc.message}))
        print(f"skr: report invalid: {exc.diagnostics()}", file=sys.stderr)
        return _EXIT_INVALID
    info = verified.vek_info
    if args.json:
        verdict: dict[str, Any] = {
            "valid": True,
            "product": str(verified.product),
            "ark_sha256": verified.ark_sha256,
            "vek": {**asdict(info), "hwid": None if info.hwid is None else info.hwid.hex()},
            "report": verified.report.to_json_dict(verified.product),
        }
        if hcl is not None:
            verdict["hcl"] = hcl.to_json_dict()
        print(json.dumps(verdict, indent=2))
    else:
        print(
            f"valid: {verified.product} report v{report.version} signed by the {info.kind.upper()} "
            f"({info.product_name}), REPORTED_TCB {report.reported_tcb_version(verified.product)}"
            + ("" if hcl is None else f"; HCL runtime data bound ({hcl.hash_name})")
        )
    return _EXIT_VALID


def _host_data(text: str) -> bytes:
    value = _parse_hex(text, "host data")
    if len(value) != 32:
        raise BadRequest(f"host data is 32 bytes (64 hex digits), found {len(value)} bytes")
    return value


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

    context = None if kind == EvidenceKind.VIRTUAL and policy is not None else load_security_context()
    provider = create_provider(kind, context=context, state_dir=state_dir, security_policy=policy)
    try:
        return await provider.collect(report_data)
    finally:
        await provider.aclose()
