"""The one error hierarchy of skr.

Every error knows the HTTP status it maps to, a stable snake_case ``code`` that scripts and the
troubleshooting table rely on, a one-sentence user-facing message, and an optional ``hint`` that says
what to check. The HTTP layer and the CLI are the only places that catch these; everything else raises
early with context.

Never put key material, access tokens or attestation tokens into a message or a hint: messages are
returned to callers, logged and written to the audit log.
"""

from __future__ import annotations

from typing import ClassVar


class SkrError(Exception):
    """Base of every error skr raises on purpose."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code or self.default_code

    def diagnostics(self) -> str:
        """The message followed by the hint, for humans (CLI, logs)."""
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


# --- input ------------------------------------------------------------------------------------------


class BadRequest(SkrError):
    """The caller sent something we cannot use (HTTP 400)."""

    status = 400
    default_code = "bad_request"


class PayloadTooLarge(BadRequest):
    status = 413
    default_code = "payload_too_large"


class UnwrapFailed(BadRequest):
    """Wrapped data that does not decrypt with the released key (``/key/unwrap``, the key provider)."""

    default_code = "unwrap_failed"


class Unauthenticated(SkrError):
    """The caller did not present the client token the sidecar was configured with (HTTP 401)."""

    status = 401
    default_code = "unauthenticated"


# --- refusals ---------------------------------------------------------------------------------------


class Forbidden(SkrError):
    """A refusal (HTTP 403)."""

    status = 403
    default_code = "forbidden"


class EndpointNotAllowed(Forbidden):
    """An endpoint outside the allowlist; no connection was made."""

    default_code = "endpoint_not_allowed"


class RemoteClientRefused(Forbidden):
    default_code = "remote_client_refused"


class ForbiddenHost(Forbidden):
    """A ``Host`` header that names neither loopback nor the listen address (DNS rebinding)."""

    default_code = "forbidden_host"


class ForbiddenOrigin(Forbidden):
    """A browser ``Origin`` that is not loopback (a cross-site request)."""

    default_code = "forbidden_origin"


class ReleaseDenied(Forbidden):
    """Key Vault / Managed HSM refused to release the key (policy not met, or not authorized)."""

    default_code = "release_denied"


class NotFound(SkrError):
    status = 404
    default_code = "not_found"


class KeyNotFound(NotFound):
    default_code = "key_not_found"


# --- parsing and verification of untrusted bytes -----------------------------------------------------


class ReportError(BadRequest):
    """An SEV-SNP attestation report that cannot be parsed (wrong size, unknown version, ...)."""

    default_code = "invalid_report"


class VerificationError(SkrError):
    """A signature, certificate chain or claim check failed.

    As a server-side failure of *upstream* evidence this is a 502; callers that verify user input
    re-raise it as they see fit.
    """

    status = 502
    default_code = "verification_failed"


class CertificateError(VerificationError):
    default_code = "certificate_invalid"


class ReportVerificationError(VerificationError):
    default_code = "report_invalid"


class ValidationError(VerificationError):
    """A verified report does not meet the validation options (host data, TCB, VMPL, ...)."""

    default_code = "report_rejected"


class TokenError(VerificationError):
    """An attestation token (MAA JWT) failed parsing or verification."""

    default_code = "token_invalid"


class JwsError(VerificationError):
    """The release JWS from Key Vault failed parsing or verification."""

    default_code = "release_jws_invalid"


class KeyWrapError(VerificationError):
    """The released key could not be unwrapped (wrong wrapping key, corrupt key_hsm, ...)."""

    default_code = "key_unwrap_failed"


class PolicyError(BadRequest):
    """A release policy that does not follow the grammar."""

    default_code = "invalid_policy"


class ConfigError(SkrError):
    """Configuration that cannot work; raised at start-up."""

    status = 500
    default_code = "config_invalid"


# --- evidence and upstreams -------------------------------------------------------------------------


class EvidenceUnavailable(SkrError):
    """No usable TEE evidence source (no device, security context missing or inconsistent)."""

    status = 503
    default_code = "evidence_unavailable"


class CollateralError(EvidenceUnavailable):
    """The VCEK certificate chain could not be obtained."""

    default_code = "collateral_unavailable"


class UpstreamError(SkrError):
    """An upstream service (MAA, Key Vault, identity, KDS/THIM) failed (HTTP 502)."""

    status = 502
    default_code = "upstream_error"


class AttestationFailed(UpstreamError):
    default_code = "attestation_failed"


class IdentityError(UpstreamError):
    default_code = "identity_failed"


class UpstreamTimeout(SkrError):
    """The per-request deadline ran out waiting on an upstream (HTTP 504)."""

    status = 504
    default_code = "upstream_timeout"


class AuditError(SkrError):
    """The audit log is damaged or cannot be written."""

    status = 500
    default_code = "audit_failed"
