"""The one error hierarchy of skr.

Every error has a stable snake_case ``code`` (a member of :class:`Code`, which scripts and the
troubleshooting table rely on), a one-sentence user-facing message, and an optional ``hint`` that says
what to check. The classes are domain errors and know nothing of HTTP: the class → HTTP status table
belongs to the server (``skr/server.py``). The HTTP layer and the CLI are the only places that catch
these; everything else raises early with context.

Never put key material, access tokens or attestation tokens into a message or a hint: messages are
returned to callers, logged and written to the audit log.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import ClassVar, TypeVar

_T = TypeVar("_T")


class Code(StrEnum):
    """Every stable error code; a member serializes (JSON, f-strings, logs) as its value."""

    ACCESS_TOKEN_INVALID = "access_token_invalid"  # noqa: S105 - an error code, not a secret
    ACCESS_TOKEN_REJECTED = "access_token_rejected"  # noqa: S105 - an error code, not a secret
    ATTESTATION_FAILED = "attestation_failed"
    AUDIT_DISABLED = "audit_disabled"
    AUDIT_FAILED = "audit_failed"
    BAD_REQUEST = "bad_request"
    BLOB_LEASED = "blob_leased"
    BLOB_NOT_FOUND = "blob_not_found"
    BLOB_NOT_PAGE_BLOB = "blob_not_page_blob"
    BLOB_UNAVAILABLE = "blob_unavailable"
    CANCELLED = "cancelled"
    CERT_TABLE_INVALID = "cert_table_invalid"
    CERTIFICATE_CHAIN_INCOMPLETE = "certificate_chain_incomplete"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_INVALID = "certificate_invalid"
    CERTIFICATE_UNREADABLE = "certificate_unreadable"
    CHECKPOINT_INVALID = "checkpoint_invalid"
    COLLATERAL_UNAVAILABLE = "collateral_unavailable"
    CONFIG_INVALID = "config_invalid"
    DEVICE_BUSY = "device_busy"
    DEVICE_ERROR = "device_error"
    DEVICE_FORBIDDEN = "device_forbidden"
    DEVICE_MISSING = "device_missing"
    DEVICE_REPORT_INVALID = "device_report_invalid"
    DEVICE_REPORT_MISMATCH = "device_report_mismatch"
    ENCFS_CONFIG_INVALID = "encfs_config_invalid"
    ENCFS_IN_USE = "encfs_in_use"
    ENCFS_KEY_INVALID = "encfs_key_invalid"
    ENCFS_MOUNT_FAILED = "encfs_mount_failed"
    ENDPOINT_NOT_ALLOWED = "endpoint_not_allowed"
    EVIDENCE_UNAVAILABLE = "evidence_unavailable"
    FIRMWARE_ERROR = "firmware_error"
    FORBIDDEN = "forbidden"
    FORBIDDEN_HOST = "forbidden_host"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    HOST_DATA_MISMATCH = "host_data_mismatch"
    HTTP_ERROR = "http_error"
    IDENTITY_FAILED = "identity_failed"
    INCOMPLETE_BODY = "incomplete_body"
    INTERNAL_ERROR = "internal_error"
    INVALID_ANNOTATION = "invalid_annotation"
    INVALID_BASE64 = "invalid_base64"
    INVALID_BODY = "invalid_body"
    INVALID_FIELD = "invalid_field"
    INVALID_JSON = "invalid_json"
    INVALID_KEY_INFO = "invalid_key_info"
    INVALID_KEYPROVIDER_REQUEST = "invalid_keyprovider_request"
    INVALID_KID = "invalid_kid"
    INVALID_POLICY = "invalid_policy"
    INVALID_REPORT = "invalid_report"
    KEY_EXISTS = "key_exists"
    KEY_INFO_NOT_FOUND = "key_info_not_found"
    KEY_NOT_FOUND = "key_not_found"
    KEY_TYPE_MISMATCH = "key_type_mismatch"
    KEY_UNWRAP_FAILED = "key_unwrap_failed"
    LOCAL_KEY_REJECTED = "local_key_rejected"
    LUKS_HEADER_INVALID = "luks_header_invalid"
    LUKS_IMAGE_TRUNCATED = "luks_image_truncated"
    LUKS_UNSUPPORTED = "luks_unsupported"
    LUKS_WRONG_KEY = "luks_wrong_key"
    MALFORMED_HTTP = "malformed_http"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MISSING_FIELD = "missing_field"
    NO_TEE = "no_tee"
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    PLAINTEXT_TOO_LONG = "plaintext_too_long"
    PROVIDER_PARAMETER_MISMATCH = "provider_parameter_mismatch"
    RATE_LIMITED = "rate_limited"
    RELEASE_DENIED = "release_denied"
    RELEASE_JWS_INVALID = "release_jws_invalid"
    REMOTE_CLIENT_REFUSED = "remote_client_refused"
    REPORT_INVALID = "report_invalid"
    REPORT_REJECTED = "report_rejected"
    SECURITY_CONTEXT_INVALID = "security_context_invalid"
    SECURITY_CONTEXT_MISSING = "security_context_missing"
    SECURITY_CONTEXT_UNREADABLE = "security_context_unreadable"
    SECURITY_POLICY_MISSING = "security_policy_missing"
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 - an error code, not a secret
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - an error code, not a secret
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"  # noqa: S105 - an error code, not a secret
    TSM_CONFLICT = "tsm_conflict"
    TSM_WRONG_PROVIDER = "tsm_wrong_provider"
    UNAUTHENTICATED = "unauthenticated"
    UNSUPPORTED_ALG = "unsupported_alg"
    UNTRUSTED_ROOT = "untrusted_root"
    UNWRAP_FAILED = "unwrap_failed"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_REDIRECT = "upstream_redirect"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_TLS_UNTRUSTED = "upstream_tls_untrusted"
    UPSTREAM_TOO_LARGE = "upstream_too_large"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UVM_ENDORSEMENT_INVALID = "uvm_endorsement_invalid"
    VAULT_CHALLENGE_MISMATCH = "vault_challenge_mismatch"
    VERIFICATION_FAILED = "verification_failed"


class SkrError(Exception):
    """Base of every error skr raises on purpose."""

    default_code: ClassVar[Code] = Code.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        code: Code | None = None,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code or self.default_code
        self.upstream_status = upstream_status  # the HTTP status an upstream answered, when one did

    def diagnostics(self) -> str:
        """The message followed by the hint, for humans (CLI, logs)."""
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.value!r}, message={self.message!r})"


def by_class(table: Mapping[type[SkrError], _T], exc: SkrError, default: _T) -> _T:
    """The entry of ``exc``'s most specific class in ``table`` (walking its MRO), else ``default``.

    The boundaries that answer callers (the HTTP server, the gRPC server) keep their own class → status
    tables; this is how they read them.
    """
    return next((table[cls] for cls in type(exc).__mro__ if cls in table), default)


# --- input ------------------------------------------------------------------------------------------


class BadRequest(SkrError):
    """The caller sent something we cannot use."""

    default_code = Code.BAD_REQUEST


class PayloadTooLarge(BadRequest):
    default_code = Code.PAYLOAD_TOO_LARGE


class UnwrapFailed(BadRequest):
    """Wrapped data that does not decrypt with the released key (``/key/unwrap``, the key provider)."""

    default_code = Code.UNWRAP_FAILED


class Unauthenticated(SkrError):
    """The caller did not present the client token the sidecar was configured with."""

    default_code = Code.UNAUTHENTICATED


# --- refusals ---------------------------------------------------------------------------------------


class Forbidden(SkrError):
    """A refusal: the caller may not have what it asked for."""

    default_code = Code.FORBIDDEN


class EndpointNotAllowed(Forbidden):
    """An endpoint outside the allowlist; no connection was made."""

    default_code = Code.ENDPOINT_NOT_ALLOWED


class RemoteClientRefused(Forbidden):
    default_code = Code.REMOTE_CLIENT_REFUSED


class ForbiddenHost(Forbidden):
    """A ``Host`` header that names neither loopback nor the listen address (DNS rebinding)."""

    default_code = Code.FORBIDDEN_HOST


class ForbiddenOrigin(Forbidden):
    """A browser ``Origin`` that is not loopback (a cross-site request)."""

    default_code = Code.FORBIDDEN_ORIGIN


class ReleaseDenied(Forbidden):
    """Key Vault / Managed HSM refused to release the key (policy not met, or not authorized)."""

    default_code = Code.RELEASE_DENIED


class NotFound(SkrError):
    default_code = Code.NOT_FOUND


class KeyNotFound(NotFound):
    default_code = Code.KEY_NOT_FOUND


# --- parsing and verification of untrusted bytes -----------------------------------------------------


class ReportError(BadRequest):
    """An SEV-SNP attestation report that cannot be parsed (wrong size, unknown version, ...).

    Unusable input when a caller handed the report in. A report *from the device* that does not parse is
    the TEE's fault, not the caller's: the evidence layer turns it into :class:`EvidenceUnavailable`
    (``device_report_invalid``).
    """

    default_code = Code.INVALID_REPORT


class VerificationError(SkrError):
    """A signature, certificate chain or claim check failed.

    As a failure of *upstream* evidence it is the upstream's fault, not the caller's; callers that verify
    user input re-raise it as they see fit.
    """

    default_code = Code.VERIFICATION_FAILED


class CertificateError(VerificationError):
    default_code = Code.CERTIFICATE_INVALID


class ReportVerificationError(VerificationError):
    default_code = Code.REPORT_INVALID


class ValidationError(VerificationError):
    """A verified report does not meet the validation options (host data, TCB, VMPL, ...)."""

    default_code = Code.REPORT_REJECTED


class TokenError(VerificationError):
    """An attestation token (MAA JWT) failed parsing or verification."""

    default_code = Code.TOKEN_INVALID


class JwsError(VerificationError):
    """The release JWS from Key Vault failed parsing or verification."""

    default_code = Code.RELEASE_JWS_INVALID


class KeyWrapError(VerificationError):
    """The released key could not be unwrapped (wrong wrapping key, corrupt key_hsm, ...)."""

    default_code = Code.KEY_UNWRAP_FAILED


class PolicyError(BadRequest):
    """A release policy that does not follow the grammar."""

    default_code = Code.INVALID_POLICY


class ConfigError(SkrError):
    """Configuration that cannot work; raised at start-up."""

    default_code = Code.CONFIG_INVALID


# --- evidence and upstreams -------------------------------------------------------------------------


class EvidenceUnavailable(SkrError):
    """No usable TEE evidence source (no device, security context missing or inconsistent)."""

    default_code = Code.EVIDENCE_UNAVAILABLE


class CollateralError(EvidenceUnavailable):
    """The VCEK certificate chain could not be obtained."""

    default_code = Code.COLLATERAL_UNAVAILABLE


class UpstreamError(SkrError):
    """An upstream service (MAA, Key Vault, identity, KDS/THIM) failed."""

    default_code = Code.UPSTREAM_ERROR


class AttestationFailed(UpstreamError):
    default_code = Code.ATTESTATION_FAILED


class IdentityError(UpstreamError):
    default_code = Code.IDENTITY_FAILED


class UpstreamTimeout(SkrError):
    """The per-request deadline ran out waiting on an upstream."""

    default_code = Code.UPSTREAM_TIMEOUT


class AuditError(SkrError):
    """The audit log is damaged or cannot be written."""

    default_code = Code.AUDIT_FAILED
