"""The claims of the local attestation service's tokens, as MAA issues them for SEV-SNP evidence (pure).

Owns the ``AttestSevSnpVm`` request body (:func:`parse_attest_request`), the checks MAA makes before it
issues a token (the VCEK chain to a pinned AMD ARK or one of ``trusted_arks``, the report signature,
SHA-256(``runtimeData``) == REPORT_DATA[0:32] with REPORT_DATA[32:64] zero, SHA-256(``initTimeData``) ==
HOST_DATA), the ``x-ms-sevsnpvm-*`` claim set of a verified report (docs/wire-formats.md §1.5), the
assembly of a token's claims (:func:`attested_claims`; the request's ``nonce`` echoed as a string, also
when the Go sidecar sends a number).

UVM endorsements are evaluated as on ACI: ``x-ms-compliance-status: azure-compliant-uvm`` and the
``x-ms-sevsnpvm-uvm-endorsement`` object (``x-ms-sevsnpvm-guestsvn``, ``x-ms-sevsnpvm-launchmeasurement``,
string values) are emitted only when an ``Endorsements.Uvm`` COSE_Sign1 verifies
(:func:`skr.evidence.endorsement.verify_uvm_endorsement`: signature, ``x5chain`` to one of
``uvm_signing_roots`` through a UVM-signing leaf, ``iss``, ``feed``) and its launch measurement equals the
report's MEASUREMENT. No endorsement or a bad one: neither claim (the token is still issued, so a release
policy that requires compliance is denied, exactly as MAA's tokens make Key Vault deny it).

No HTTP, no files, no signing: refusals are :class:`AttestationRefused` (code and message in MAA's terms).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from skr.b64 import b64url_encode
from skr.errors import BadRequest, SkrError
from skr.evidence.endorsement import (
    CLAIM_UVM_ENDORSEMENT,
    UvmEndorsement,
    parse_uvm_endorsement,
    verify_uvm_endorsement,
)
from skr.maa.client import (
    DATA_TYPE_BINARY,
    DATA_TYPE_JSON,
    ReportEnvelope,
    b64url_decode,
    decode_report,
)
from skr.snp.report import AttestationReport, Product
from skr.snp.verify import verify_evidence_chain

log = logging.getLogger(__name__)

TOKEN_LIFETIME = 8 * 60 * 60
ATTESTATION_TYPE = "sevsnpvm"
COMPLIANT_UVM = "azure-compliant-uvm"

CLAIMS_SUPPORTED = (
    "nonce",
    "x-ms-ver",
    "x-ms-attestation-type",
    "x-ms-policy-hash",
    "x-ms-runtime",
    "x-ms-inittime",
    "x-ms-compliance-status",
    "x-ms-sevsnpvm-authorkeydigest",
    "x-ms-sevsnpvm-bootloader-svn",
    "x-ms-sevsnpvm-familyId",
    "x-ms-sevsnpvm-guestsvn",
    "x-ms-sevsnpvm-hostdata",
    "x-ms-sevsnpvm-idkeydigest",
    "x-ms-sevsnpvm-imageId",
    "x-ms-sevsnpvm-is-debuggable",
    "x-ms-sevsnpvm-launchmeasurement",
    "x-ms-sevsnpvm-microcode-svn",
    "x-ms-sevsnpvm-migration-allowed",
    "x-ms-sevsnpvm-reportdata",
    "x-ms-sevsnpvm-reportid",
    "x-ms-sevsnpvm-smt-allowed",
    "x-ms-sevsnpvm-snpfw-svn",
    "x-ms-sevsnpvm-tee-svn",
    "x-ms-sevsnpvm-uvm-endorsement",
    "x-ms-sevsnpvm-vmpl",
)


class AttestationRefused(Exception):
    """Evidence or a request the service refuses; MAA answers it with a 400 naming ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def policy_hash(policy_text: str) -> str:
    """``x-ms-policy-hash``: BASE64URL(SHA256(UTF8(BASE64URL(UTF8(policy text))))) (MAA claim sets)."""
    return b64url_encode(hashlib.sha256(b64url_encode(policy_text.encode("utf-8")).encode("utf-8")).digest())


def sevsnp_claims(report: AttestationReport, product: Product) -> dict[str, Any]:
    """The ``x-ms-sevsnpvm-*`` claims MAA derives from a verified report (docs/wire-formats.md §1.5).

    Byte fields are lowercase hex strings, SVNs and VMPL numbers, policy bits booleans; the TCB
    parts come from REPORTED_TCB decoded for ``product``.
    """
    tcb = report.reported_tcb_version(product)
    policy = report.guest_policy
    return {
        "x-ms-sevsnpvm-authorkeydigest": report.author_key_digest.hex(),
        "x-ms-sevsnpvm-bootloader-svn": tcb.bl,
        "x-ms-sevsnpvm-familyId": report.family_id.hex(),
        "x-ms-sevsnpvm-guestsvn": report.guest_svn,
        "x-ms-sevsnpvm-hostdata": report.host_data.hex(),
        "x-ms-sevsnpvm-idkeydigest": report.id_key_digest.hex(),
        "x-ms-sevsnpvm-imageId": report.image_id.hex(),
        "x-ms-sevsnpvm-is-debuggable": policy.debug,
        "x-ms-sevsnpvm-launchmeasurement": report.measurement.hex(),
        "x-ms-sevsnpvm-microcode-svn": tcb.ucode,
        "x-ms-sevsnpvm-migration-allowed": policy.migrate_ma,
        "x-ms-sevsnpvm-reportdata": report.report_data.hex(),
        "x-ms-sevsnpvm-reportid": report.report_id.hex(),
        "x-ms-sevsnpvm-smt-allowed": policy.smt,
        "x-ms-sevsnpvm-snpfw-svn": tcb.snp,
        "x-ms-sevsnpvm-tee-svn": tcb.tee,
        "x-ms-sevsnpvm-vmpl": report.vmpl,
    }


@dataclass(frozen=True)
class ClaimData:
    """``runtimeData`` or ``initTimeData`` of a request: the bytes bound to the report and their type."""

    raw: bytes
    data_type: str


@dataclass(frozen=True)
class AttestRequest:
    """A parsed ``AttestSevSnpVm`` request body."""

    envelope: ReportEnvelope
    runtime_data: ClaimData | None
    init_time_data: ClaimData | None
    nonce: str | None


def _parse_data(body: dict[str, Any], name: str) -> ClaimData | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise AttestationRefused("InvalidParameter", f"{name} must be an object {{data, dataType}}")
    data_type = value.get("dataType", DATA_TYPE_BINARY)
    if data_type not in (DATA_TYPE_JSON, DATA_TYPE_BINARY):
        raise AttestationRefused(
            "InvalidParameter", f"{name}.dataType must be 'JSON' or 'Binary', found {data_type!r}"
        )
    data = value.get("data")
    if not isinstance(data, str) or not data:
        raise AttestationRefused("InvalidParameter", f"{name}.data must be a non-empty base64url string")
    try:
        return ClaimData(raw=b64url_decode(data, what=f"{name}.data"), data_type=data_type)
    except BadRequest as exc:
        raise AttestationRefused("InvalidParameter", exc.message) from None


def parse_attest_request(body: Any) -> AttestRequest:
    """The request in the JSON ``body``; :class:`AttestationRefused` when it is not one."""
    if not isinstance(body, dict):
        raise AttestationRefused("InvalidParameter", "the request body must be a JSON object")
    report = body.get("report")
    if not isinstance(report, str) or not report:
        raise AttestationRefused("InvalidParameter", "the request has no 'report' string")
    try:
        envelope = decode_report(report)
    except BadRequest as exc:
        raise AttestationRefused("InvalidReport", f"the report could not be decoded: {exc.message}") from None
    nonce = body.get("nonce")
    if nonce is not None and not isinstance(nonce, str):
        if isinstance(nonce, bool) or not isinstance(nonce, int):
            raise AttestationRefused("InvalidParameter", "nonce must be a string")
        nonce = str(nonce)  # the Go sidecar sends a number; MAA echoes it as a string
    return AttestRequest(
        envelope=envelope,
        runtime_data=_parse_data(body, "runtimeData"),
        init_time_data=_parse_data(body, "initTimeData"),
        nonce=nonce or None,
    )


def _json_claim(data: ClaimData | None, name: str) -> Any:
    """The JSON object a ``dataType: JSON`` runtimeData/initTimeData carries, else None."""
    if data is None or data.data_type != DATA_TYPE_JSON:
        return None
    try:
        doc = json.loads(data.raw)
    except (ValueError, UnicodeDecodeError):
        raise AttestationRefused(
            "InvalidParameter", f"{name}.data has dataType JSON but is not valid JSON"
        ) from None
    if not isinstance(doc, dict):
        raise AttestationRefused(
            "InvalidParameter", f"{name}.data must be a JSON object, found {type(doc).__name__}"
        )
    return doc


def check_binding(report: AttestationReport, request: AttestRequest) -> None:
    """REPORT_DATA binds ``runtimeData`` and HOST_DATA ``initTimeData`` (when sent), as MAA requires."""
    runtime = request.runtime_data
    if runtime is not None:
        digest = hashlib.sha256(runtime.raw).digest()
        if report.report_data[:32] != digest:
            raise AttestationRefused(
                "RuntimeDataMismatch",
                f"SHA-256 of runtimeData is {digest.hex()}"
                f" but REPORT_DATA[0:32] is {report.report_data[:32].hex()}",
            )
        if any(report.report_data[32:]):
            raise AttestationRefused(
                "RuntimeDataMismatch",
                "REPORT_DATA[32:64] must be zero when runtimeData is bound,"
                f" found {report.report_data[32:].hex()}",
            )
    init = request.init_time_data
    if init is not None:
        digest = hashlib.sha256(init.raw).digest()
        if report.host_data != digest:
            raise AttestationRefused(
                "InitTimeDataMismatch",
                f"SHA-256 of initTimeData is {digest.hex()} but HOST_DATA is {report.host_data.hex()}",
            )


def attested_claims(
    request: AttestRequest,
    *,
    issuer: str,
    now: float,
    issued_at: int,
    trusted_arks: Sequence[x509.Certificate],
    uvm_signing_roots: Sequence[x509.Certificate],
    policy_hash: str,
) -> dict[str, Any]:
    """Verify the evidence of ``request`` at ``now`` as MAA does; the claims of its token (``iat``
    ``issued_at``). :class:`AttestationRefused` when a check fails."""
    envelope, at = request.envelope, datetime.fromtimestamp(now, tz=UTC)
    try:
        verified = verify_evidence_chain(
            envelope.report, envelope.vcek_chain_pem, at=at, trusted_arks=trusted_arks
        )
    except SkrError as exc:
        raise AttestationRefused(
            "InvalidReport" if isinstance(exc, BadRequest) else "EvidenceVerificationFailed",
            f"the SEV-SNP evidence failed verification: {exc.message}",
        ) from None
    check_binding(verified.report, request)
    endorsement = compliant_endorsement(
        envelope.uvm_endorsements, verified.report, trusted_roots=uvm_signing_roots, at=at
    )
    return token_claims(
        verified.report,
        verified.product,
        request,
        issuer=issuer,
        issued_at=issued_at,
        policy_hash=policy_hash,
        endorsement=endorsement,
    )


def compliant_endorsement(
    endorsements: Sequence[bytes],
    report: AttestationReport,
    *,
    trusted_roots: Sequence[x509.Certificate],
    at: datetime,
) -> UvmEndorsement | None:
    """The first endorsement that verifies and endorses the report's MEASUREMENT, else ``None``."""
    if not endorsements:
        log.info("no UVM endorsement in the request: no x-ms-compliance-status")
    for raw in endorsements:
        try:
            endorsement = parse_uvm_endorsement(raw)
            verify_uvm_endorsement(endorsement, trusted_roots=trusted_roots, at=at)
        except SkrError as exc:
            log.warning("UVM endorsement refused: %s", exc.message)
            continue
        if endorsement.launch_measurement != report.measurement:
            log.warning(
                "UVM endorsement refused: it endorses launch measurement %s, the report has %s",
                endorsement.launch_measurement.hex(),
                report.measurement.hex(),
            )
            continue
        return endorsement
    return None


def token_claims(
    report: AttestationReport,
    product: Product,
    request: AttestRequest,
    *,
    issuer: str,
    issued_at: int,
    policy_hash: str,
    endorsement: UvmEndorsement | None,
) -> dict[str, Any]:
    """The claims of a token for a verified ``report`` of ``product`` (sorted by name, as MAA's)."""
    claims: dict[str, Any] = {
        "exp": issued_at + TOKEN_LIFETIME,
        "iat": issued_at,
        "iss": issuer,
        "jti": secrets.token_hex(32),
        "nbf": issued_at,
        "x-ms-attestation-type": ATTESTATION_TYPE,
        "x-ms-policy-hash": policy_hash,
        "x-ms-ver": "1.0",
    }
    claims.update(sevsnp_claims(report, product))
    if endorsement is not None:
        claims["x-ms-compliance-status"] = COMPLIANT_UVM
        claims[CLAIM_UVM_ENDORSEMENT] = endorsement.claims()
    runtime = _json_claim(request.runtime_data, "runtimeData")
    init = _json_claim(request.init_time_data, "initTimeData")
    if runtime is not None:
        claims["x-ms-runtime"] = runtime
    if init is not None:
        claims["x-ms-inittime"] = init
    if request.nonce is not None:
        claims["nonce"] = request.nonce
    return dict(sorted(claims.items()))
