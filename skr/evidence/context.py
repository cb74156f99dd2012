"""The UVM security context: the files the confidential-container platform mounts next to the workload.

Owns: finding the security-context directory (``UVM_SECURITY_CONTEXT_DIR``; else the first
``/security-context-*`` directory under the root; else the Kata default
``/opt/confidential-containers/share/kata-containers``), reading its three base64 files
(``security-policy-base64`` — the CCE Rego policy; ``host-amd-cert-base64`` — THIM JSON with the host's
VCEK chain; ``reference-info-base64`` — the UVM endorsement COSE_Sign1), the legacy environment fallbacks
(``UVM_SECURITY_POLICY``, ``UVM_HOST_AMD_CERTIFICATE``, ``UVM_REFERENCE_INFO``), and the policy-hash
self-check: SHA-256 of the decoded policy must equal the report's HOST_DATA, and the warning for a
policy that comes without a UVM endorsement (:func:`missing_uvm_endorsement_warning`, for ``skr doctor``
and ``/readyz``): MAA then emits no ``x-ms-compliance-status`` and the default release policy is denied.

Never guesses: a file that exists but does not decode is an error naming the file, not a silent skip.
Never verifies the UVM endorsement's signature (MAA does); it only checks it is a COSE_Sign1.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from skr.errors import Code, CollateralError, EvidenceUnavailable
from skr.snp.kds import ThimCertificates, parse_thim_json

CONTEXT_DIR_ENV: Final = "UVM_SECURITY_CONTEXT_DIR"
POLICY_ENV: Final = "UVM_SECURITY_POLICY"
HOST_AMD_CERT_ENV: Final = "UVM_HOST_AMD_CERTIFICATE"
REFERENCE_INFO_ENV: Final = "UVM_REFERENCE_INFO"

POLICY_FILE: Final = "security-policy-base64"
HOST_AMD_CERT_FILE: Final = "host-amd-cert-base64"
REFERENCE_INFO_FILE: Final = "reference-info-base64"

CONTEXT_GLOB: Final = "security-context-*"
KATA_DEFAULT_DIR: Final = Path("opt/confidential-containers/share/kata-containers")

_COSE_SIGN1_TAG: Final = b"\xd2"  # CBOR tag 18
_CBOR_ARRAY_4: Final = 0x84


@dataclass(frozen=True)
class SecurityContext:
    """What the platform told the workload about itself. Every part is optional.

    ``directory``: the directory the files were read from (None when nothing was found on disk).
    ``security_policy``: the raw CCE policy bytes (Rego text, already base64-decoded).
    ``thim``: the host's VCEK chain as THIM certificates.
    ``uvm_reference_info``: the UVM endorsement (COSE_Sign1 bytes).
    """

    directory: Path | None
    security_policy: bytes | None
    thim: ThimCertificates | None
    uvm_reference_info: bytes | None

    @property
    def host_data(self) -> bytes | None:
        """The HOST_DATA this policy binds the report to: SHA-256 of the raw policy, or None."""
        return hashlib.sha256(self.security_policy).digest() if self.security_policy is not None else None

    @property
    def is_empty(self) -> bool:
        """True when neither files nor environment variables supplied anything."""
        return self.security_policy is None and self.thim is None and self.uvm_reference_info is None

    def __repr__(self) -> str:
        parts = [
            f"directory={str(self.directory) if self.directory else None!r}",
            f"host_data={self.host_data.hex() if self.host_data else None!r}",
            f"thim_tcbm={self.thim.tcbm if self.thim else None!r}",
            f"uvm_reference_info={_size(self.uvm_reference_info)}",
        ]
        return f"SecurityContext({', '.join(parts)})"


def _size(data: bytes | None) -> str:
    return f"<{len(data)} bytes>" if data is not None else "None"


def find_security_context_dir(env: Mapping[str, str] = os.environ, root: Path = Path("/")) -> Path | None:
    """The security-context directory, or None when there is none.

    ``UVM_SECURITY_CONTEXT_DIR`` wins (and must exist: a named directory that is missing is an error);
    else the first ``security-context-*`` directory directly under ``root`` (sorted by name); else the Kata
    default under ``root`` if it exists.
    """
    named = env.get(CONTEXT_DIR_ENV, "").strip()
    if named:
        path = Path(named)
        if not path.is_dir():
            raise EvidenceUnavailable(
                f"{CONTEXT_DIR_ENV} names {named!r}, which is not a directory",
                hint="mount the security context there or unset the variable",
                code=Code.SECURITY_CONTEXT_MISSING,
            )
        return path
    try:
        candidates = sorted(p for p in root.glob(CONTEXT_GLOB) if p.is_dir())
    except OSError:
        candidates = []
    if candidates:
        return candidates[0]
    kata = root / KATA_DEFAULT_DIR
    return kata if kata.is_dir() else None


def load_security_context(env: Mapping[str, str] = os.environ, root: Path = Path("/")) -> SecurityContext:
    """Read the security context: each file from the directory, else its legacy environment variable.

    A source that is absent leaves its field None; a source that is present but malformed raises
    :class:`EvidenceUnavailable` naming the file or variable and what was wrong.
    """
    directory = find_security_context_dir(env, root)
    policy = _read(directory, POLICY_FILE, env, POLICY_ENV)
    thim_raw = _read(directory, HOST_AMD_CERT_FILE, env, HOST_AMD_CERT_ENV)
    reference = _read(directory, REFERENCE_INFO_FILE, env, REFERENCE_INFO_ENV)
    thim: ThimCertificates | None = None
    if thim_raw is not None:
        data, origin = thim_raw
        try:
            thim = parse_thim_json(data)
        except CollateralError as exc:
            raise EvidenceUnavailable(
                f"{origin} does not hold valid THIM certificates: {exc.message}",
                hint=exc.hint,
                code=Code.SECURITY_CONTEXT_INVALID,
            ) from None
    if reference is not None:
        _check_cose_sign1(*reference)
    return SecurityContext(
        directory=directory,
        security_policy=policy[0] if policy else None,
        thim=thim,
        uvm_reference_info=reference[0] if reference else None,
    )


def missing_uvm_endorsement_warning(
    security_policy: bytes | None, uvm_reference_info: bytes | None
) -> str | None:
    """The warning for a security policy without a UVM endorsement (``reference-info-base64``), else None.

    Without ``Endorsements.Uvm`` MAA emits no ``x-ms-compliance-status``, so a release policy that requires
    ``azure-compliant-uvm`` (the default one) is denied; the sidecar still runs, so this is a warning.
    """
    if security_policy is None or uvm_reference_info:
        return None
    return (
        f"a security policy is set but no UVM endorsement ({REFERENCE_INFO_FILE}) comes with the evidence: "
        "MAA will not emit x-ms-compliance-status, so policies requiring azure-compliant-uvm deny the release"
    )


def check_policy_hash(context: SecurityContext, report_host_data: bytes) -> None:
    """Require SHA-256(security policy) == the report's HOST_DATA; EvidenceUnavailable naming both if not.

    A context without a policy cannot be checked and is an error too: call this only where a policy is
    expected (ACI, Kata confidential pods).
    """
    expected = context.host_data
    if expected is None:
        raise EvidenceUnavailable(
            "the security context has no security policy, so HOST_DATA cannot be checked",
            hint=f"mount {POLICY_FILE} (or set {POLICY_ENV}); security-context directory: "
            f"{context.directory or 'none found'}",
            code=Code.SECURITY_POLICY_MISSING,
        )
    if bytes(report_host_data) != expected:
        raise EvidenceUnavailable(
            f"the report's HOST_DATA is {bytes(report_host_data).hex()} but SHA-256 of the security "
            f"policy is {expected.hex()}",
            hint="the mounted security policy is not the one this container group was launched with; check "
            f"{CONTEXT_DIR_ENV} and the deployment's ccePolicy",
            code=Code.HOST_DATA_MISMATCH,
        )


def _read(
    directory: Path | None, name: str, env: Mapping[str, str], variable: str
) -> tuple[bytes, str] | None:
    """(decoded bytes, where they came from) from ``directory/name``, else env ``variable``, else None."""
    if directory is not None:
        path = directory / name
        if path.is_file():
            try:
                text = path.read_bytes()
            except OSError as exc:
                raise EvidenceUnavailable(
                    f"cannot read {path}: {exc.strerror or exc}",
                    hint="check the file's permissions",
                    code=Code.SECURITY_CONTEXT_UNREADABLE,
                ) from None
            return _decode_base64(text, str(path)), str(path)
    value = env.get(variable, "")
    if value.strip():
        return _decode_base64(value.encode("ascii", "replace"), f"${variable}"), f"${variable}"
    return None


def _decode_base64(data: bytes, origin: str) -> bytes:
    compact = b"".join(data.split())
    if not compact:
        raise EvidenceUnavailable(
            f"{origin} is empty",
            hint="expected standard base64 text",
            code=Code.SECURITY_CONTEXT_INVALID,
        )
    try:
        decoded = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EvidenceUnavailable(
            f"{origin} is not valid standard base64 ({exc})",
            hint="the platform writes these files base64-encoded; check the file was not altered",
            code=Code.SECURITY_CONTEXT_INVALID,
        ) from None
    if not decoded:
        raise EvidenceUnavailable(f"{origin} decodes to nothing", code=Code.SECURITY_CONTEXT_INVALID)
    return decoded


def _check_cose_sign1(data: bytes, origin: str) -> None:
    """COSE_Sign1 is CBOR tag 18 around an array of 4 (``d2 84``); the untagged array (``84``) is accepted."""
    body = data[1:] if data[:1] == _COSE_SIGN1_TAG else data
    if not body or body[0] != _CBOR_ARRAY_4:
        raise EvidenceUnavailable(
            f"{origin} does not hold a COSE_Sign1 (starts with {data[:2].hex() or 'nothing'}, expected d284)",
            hint="reference-info-base64 must be the base64 of the UVM endorsement COSE_Sign1",
            code=Code.SECURITY_CONTEXT_INVALID,
        )
