"""Prove an SEV-SNP attestation report genuine, then judge it against expectations.

Owns two layers, as go-sev-guest separates ``verify`` and ``validate``:

* :func:`verify_report` / :func:`verify_evidence_chain`: the report signature (ECDSA P-384 / SHA-384
  over bytes 0x000-0x29F by the VCEK or VLEK), the AMD certificate chain to a pinned or explicitly
  trusted ARK, and the bindings between certificate and report (TCB, chip id, signing-key kind,
  product line).
* :func:`validate_report`: a report that is already verified, checked against
  :class:`ValidationOptions` (expected report/host data, measurement, minimum TCB, VMPL, policy).

Must never: accept a report whose signature or chain was not checked, fetch collateral, or log
report contents beyond what an error message needs to say what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from skr.errors import CertificateError, Code, ReportVerificationError, ValidationError
from skr.snp.certs import VekInfo, common_name, load_certificates, parse_vek_extensions, verify_vek_chain
from skr.snp.report import AttestationReport, Product, TcbVersion

ASVK_CN_PREFIX = "SEV-VLEK-"


@dataclass(frozen=True)
class VerifiedReport:
    """A report whose signature and certificate chain verified, with what the VEK says."""

    report: AttestationReport
    vek_info: VekInfo
    product: Product
    ark_sha256: str = ""


def verify_report(
    report: AttestationReport,
    vek: x509.Certificate,
    chain: Sequence[x509.Certificate],
    *,
    at: datetime | None = None,
    product: Product | None = None,
    trusted_arks: Sequence[x509.Certificate] = (),
) -> VerifiedReport:
    """Verify ``report`` with its VCEK/VLEK ``vek`` and the ASK/ASVK + ARK in ``chain``.

    The product line is ``product`` if given, else the one whose pinned ARK anchors the chain, else
    the report's CPUID (v3+), else the VEK's productName; all that are known must agree.
    Raises :class:`CertificateError` (chain) or :class:`ReportVerificationError` (report).
    """
    info = parse_vek_extensions(vek)
    result = verify_vek_chain(vek, chain, at=at, trusted_arks=trusted_arks)
    _check_intermediate_kind(info, result.intermediate)
    resolved = _resolve_product(report, info, explicit=product, pinned=result.pinned_product)
    _check_signing_key(report, info)
    _check_tcb(report, info, resolved)
    _check_chip_id(report, info, resolved)
    _check_signature(report, vek)
    return VerifiedReport(report=report, vek_info=info, product=resolved, ark_sha256=result.ark_sha256)


def verify_evidence_chain(
    report_bytes: bytes,
    vcek_chain_pem: bytes,
    *,
    at: datetime | None = None,
    trusted_arks: Sequence[x509.Certificate] = (),
    product: Product | None = None,
) -> VerifiedReport:
    """Parse and verify raw evidence: the first certificate of the PEM is the VEK, the rest ASK/ARK."""
    report = AttestationReport.parse(report_bytes)
    certs = load_certificates(vcek_chain_pem)
    return verify_report(report, certs[0], certs[1:], at=at, product=product, trusted_arks=trusted_arks)


# --- the individual bindings -----------------------------------------------------------------------


def _check_intermediate_kind(info: VekInfo, intermediate: x509.Certificate) -> None:
    is_asvk = common_name(intermediate.subject).startswith(ASVK_CN_PREFIX)
    if (info.kind == "vlek") != is_asvk:
        wanted = "an ASVK (SEV-VLEK-…)" if info.kind == "vlek" else "an ASK (SEV-<product>)"
        raise CertificateError(
            f"a {info.kind.upper()} must be issued by {wanted}, "
            f"found issuer {common_name(intermediate.subject)!r}",
            hint="use the VLEK chain for VLEK reports and the VCEK chain for VCEK reports",
        )


def _resolve_product(
    report: AttestationReport, info: VekInfo, *, explicit: Product | None, pinned: Product | None
) -> Product:
    sources = [
        ("requested", explicit),
        ("pinned ARK", pinned),
        ("report CPUID", report.product_hint()),
        ("VEK productName", info.product),
    ]
    known = [(name, Product(p)) for name, p in sources if p is not None]
    if not known:
        raise ReportVerificationError(
            f"cannot tell the product line (report v{report.version} has no CPUID, "
            f"VEK productName {info.product_name!r})",
            hint="pass the product explicitly (milan, genoa or turin)",
        )
    chosen_by, chosen = known[0]
    for name, other in known[1:]:
        if other is not chosen:
            # A disagreement with the pinned root is a chain problem; otherwise the report is at odds.
            error = CertificateError if "pinned ARK" in (name, chosen_by) else ReportVerificationError
            raise error(
                f"product mismatch: {chosen_by} says {chosen}, {name} says {other}",
                hint="check the product and that the chain belongs to this report",
            )
    return chosen


def _check_signing_key(report: AttestationReport, info: VekInfo) -> None:
    if report.signing_key == "none":
        raise ReportVerificationError(
            "the report is not signed (KEY_INFO SIGNING_KEY = none)",
            hint="the platform masks its chip key; such reports cannot be verified",
        )
    if report.signing_key != info.kind:
        raise ReportVerificationError(
            f"the report says it is signed by the {report.signing_key.upper()}, "
            f"but the certificate is a {info.kind.upper()}",
            hint="use the certificate of the key that signed the report",
        )


def _check_tcb(report: AttestationReport, info: VekInfo, product: Product) -> None:
    if (info.fmc_spl is not None) != (product is Product.TURIN):
        raise ReportVerificationError(
            f"a {product} VEK {'must' if product is Product.TURIN else 'must not'} carry an fmcSPL "
            f"extension; found fmcSPL={info.fmc_spl}"
        )
    certified = TcbVersion.from_parts(
        product, bl=info.bl_spl, tee=info.tee_spl, snp=info.snp_spl, ucode=info.ucode_spl, fmc=info.fmc_spl
    )
    if certified.raw != report.reported_tcb:
        raise ReportVerificationError(
            f"the {info.kind.upper()} is for TCB {certified}, the report's REPORTED_TCB is "
            f"{report.reported_tcb_version(product)}",
            hint="fetch the VCEK for the report's REPORTED_TCB",
        )


def _check_chip_id(report: AttestationReport, info: VekInfo, product: Product) -> None:
    if info.kind != "vcek" or info.hwid is None:
        return
    if report.mask_chip_key or not any(report.chip_id):
        return  # the firmware masked the chip id; the VCEK signature still binds the chip
    expected_size = 8 if product is Product.TURIN else 64
    if len(info.hwid) != expected_size:
        raise ReportVerificationError(
            f"a {product} VCEK hwID is {expected_size} bytes, found {len(info.hwid)}"
        )
    if report.chip_id[:expected_size] != info.hwid:
        raise ReportVerificationError(
            f"the VCEK hwID {info.hwid.hex()[:16]}… does not match the report CHIP_ID "
            f"{report.chip_id.hex()[:16]}…",
            hint="this VCEK belongs to another chip",
        )


def _check_signature(report: AttestationReport, vek: x509.Certificate) -> None:
    key = vek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise CertificateError("the VCEK/VLEK key is not an ECDSA P-384 key")
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(signature, report.signed_bytes(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise ReportVerificationError(
            "the report signature does not verify with the VCEK/VLEK",
            hint="the report was altered, or the certificate belongs to another report",
        ) from None


# --- validation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationOptions:
    """What a verified report must satisfy. ``None`` means "not checked".

    ``minimum_tcb``: every component of REPORTED_TCB (decoded for ``minimum_tcb.product``) must be at
    least the minimum. ``maximum_vmpl``: VMPL must not exceed it. ``allow_debug`` /
    ``allow_migrate_ma`` / ``allow_smt``: whether the guest policy may permit debugging, a migration
    agent, SMT. ``permit_provisional_firmware``: when false, COMMITTED_TCB and the committed version
    must equal CURRENT_TCB and the current version. ``require_author_key``: AUTHOR_KEY_EN must be set.
    ``signing_keys``: which keys may have signed the report.
    """

    report_data: bytes | None = None
    host_data: bytes | None = None
    measurement: bytes | None = None
    family_id: bytes | None = None
    image_id: bytes | None = None
    id_key_digest: bytes | None = None
    author_key_digest: bytes | None = None
    chip_id: bytes | None = None
    minimum_tcb: TcbVersion | None = None
    minimum_guest_svn: int | None = None
    minimum_build: int | None = None
    minimum_version: tuple[int, int] | None = None
    maximum_vmpl: int | None = None
    allow_debug: bool = False
    allow_migrate_ma: bool = True
    allow_smt: bool = True
    permit_provisional_firmware: bool = True
    require_author_key: bool = False
    signing_keys: frozenset[str] = frozenset({"vcek", "vlek"})


_BYTE_CHECKS = (
    "report_data",
    "host_data",
    "measurement",
    "family_id",
    "image_id",
    "id_key_digest",
    "author_key_digest",
    "chip_id",
)


def validate_report(report: AttestationReport, options: ValidationOptions) -> None:
    """Raise :class:`ValidationError` listing every way ``report`` misses ``options``."""
    problems = _byte_problems(report, options) + _policy_problems(report, options)
    problems += _version_problems(report, options)
    if problems:
        raise ValidationError(
            "; ".join(problems),
            hint="the report is genuine but not the one expected",
            code=Code.REPORT_REJECTED,
        )


def _byte_problems(report: AttestationReport, options: ValidationOptions) -> list[str]:
    problems = []
    for name in _BYTE_CHECKS:
        want: bytes | None = getattr(options, name)
        found: bytes = getattr(report, name)
        if want is not None and want != found:
            problems.append(f"{name.upper()} expected {want.hex()}, found {found.hex()}")
    return problems


def _policy_problems(report: AttestationReport, options: ValidationOptions) -> list[str]:
    problems = []
    policy = report.guest_policy
    if not policy.reserved_one_set or policy.unknown_bits:
        problems.append(f"POLICY 0x{report.policy:x} has reserved bits wrong (bit 17 must be 1, 26-63 zero)")
    for name in ("debug", "migrate_ma", "smt"):
        if getattr(policy, name) and not getattr(options, f"allow_{name}"):
            problems.append(f"POLICY allows {name.upper()}, which is not permitted")
    if options.maximum_vmpl is not None and report.vmpl > options.maximum_vmpl:
        problems.append(f"VMPL expected at most {options.maximum_vmpl}, found {report.vmpl}")
    if options.require_author_key and not report.author_key_en:
        problems.append("AUTHOR_KEY_EN expected set, found clear")
    if report.signing_key not in options.signing_keys:
        wanted = ", ".join(sorted(options.signing_keys))
        problems.append(f"signing key expected one of {wanted}, found {report.signing_key}")
    return problems


def _version_problems(report: AttestationReport, options: ValidationOptions) -> list[str]:
    problems = []
    if options.minimum_tcb is not None:
        found = report.reported_tcb_version(options.minimum_tcb.product)
        if not found.is_at_least(options.minimum_tcb):
            problems.append(f"REPORTED_TCB expected at least {options.minimum_tcb}, found {found}")
    if options.minimum_guest_svn is not None and report.guest_svn < options.minimum_guest_svn:
        problems.append(f"GUEST_SVN expected at least {options.minimum_guest_svn}, found {report.guest_svn}")
    if options.minimum_build is not None and report.current_build < options.minimum_build:
        problems.append(
            f"CURRENT_BUILD expected at least {options.minimum_build}, found {report.current_build}"
        )
    current = (report.current_major, report.current_minor)
    if options.minimum_version is not None and current < options.minimum_version:
        want = "{}.{}".format(*options.minimum_version)
        problems.append(f"firmware version expected at least {want}, found {current[0]}.{current[1]}")
    committed = (report.committed_tcb, report.committed_major, report.committed_minor, report.committed_build)
    running = (report.current_tcb, report.current_major, report.current_minor, report.current_build)
    if not options.permit_provisional_firmware and committed != running:
        problems.append(
            f"provisional firmware: committed TCB 0x{report.committed_tcb:016x} "
            f"v{report.committed_major}.{report.committed_minor} build {report.committed_build}, "
            f"current 0x{report.current_tcb:016x} v{current[0]}.{current[1]} build {report.current_build}"
        )
    return problems
