"""The ports of the release use case: what :class:`skr.service.ReleaseService` needs from the world.

Small Protocols the real clients satisfy structurally (the provider, ``MaaClient``, ``KeyVaultReleaser``,
``AsyncAuditLog``) and in-memory fakes satisfy in tests; the clock; and the audit record the service
writes, a frozen value turned into the writer's dict only at the sink.

Pure: no I/O. Never holds key material or tokens (a record holds token fingerprints only).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from skr.akv.keywrap import Enc
from skr.akv.release import ReleaseResult
from skr.endpoints import Endpoint, KeyRef
from skr.evidence.base import Evidence, EvidenceProvider
from skr.maa.runtime import WrappingKey
from skr.upstream import Deadline

EvidenceSource = EvidenceProvider  # where reports come from: the hardware, a virtual TEE, a fake


class Attester(Protocol):
    """An attestation service (MAA): evidence and runtime data in, a signed token out."""

    async def attest(
        self, endpoint: Endpoint, evidence: Evidence, runtime_data: bytes, *, deadline: Deadline | None = None
    ) -> str: ...


class Releaser(Protocol):
    """A key vault's release call: the key ``ref`` wrapped for the TEE the token describes."""

    async def release(
        self,
        ref: KeyRef,
        target_token: str,
        *,
        access_token: str | None = None,
        enc: Enc = Enc.CKM_RSA_AES_KEY_WRAP,
        deadline: Deadline | None = None,
    ) -> ReleaseResult: ...


@dataclass(frozen=True)
class ReleasedKeyResult:
    """What ``/key/release`` returns: the JWK as a compact JSON string (the Go sidecar's shape)."""

    key_json: str = field(repr=False)
    key_id: str
    version: str | None
    expires_at: float = field(default=0.0, compare=False)  # the attestation token's expiry (epoch s)


class ReleaseOpener(Protocol):
    """Opens what a vault released: verifies the release JWS for ``ref`` and unwraps it with ``key``."""

    def __call__(self, jws: str, ref: KeyRef, key: WrappingKey) -> ReleasedKeyResult: ...


class AuditSink(Protocol):
    """Where the records go: the durable, hash-chained audit log."""

    @property
    def head(self) -> tuple[int, str]: ...

    instance: str

    async def append(self, fields: Mapping[str, Any]) -> Mapping[str, Any]: ...


class Clock(Protocol):
    def time(self) -> float: ...  # wall-clock seconds since the epoch (token expiry)

    def monotonic(self) -> float: ...  # seconds on a clock that never goes back (durations)


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class Absent(enum.Enum):
    """A record field that is not in the record at all (as opposed to one that is ``null``)."""

    ABSENT = 0


ABSENT = Absent.ABSENT


@dataclass(frozen=True)
class AuditRecord:
    """One decision as the audit log holds it; :meth:`as_fields` is the writer's dict (absent keys left
    out, ``None`` kept as ``null``)."""

    event: str
    request_id: str
    client: str | None
    extra: Mapping[str, Any] = field(default_factory=dict)  # what another face of a use case adds
    kid: str | Absent | None = ABSENT
    identity: str | Absent = ABSENT
    client_token_id: str | Absent | None = ABSENT
    maa: str | Absent = ABSENT
    vault: str | Absent = ABSENT
    maa_jti: Any | Absent = ABSENT
    token_sha256: str | Absent = ABSENT
    host_data: Any | Absent = ABSENT
    measurement: Any | Absent = ABSENT
    key_version: str | Absent | None = ABSENT
    note: str | Absent = ABSENT
    outcome: str | Absent = ABSENT
    error_code: str | Absent = ABSENT
    reason: str | Absent = ABSENT
    upstream_status: int | Absent | None = ABSENT
    attestation: str | Absent | None = ABSENT
    duration_ms: float | Absent = ABSENT

    def as_fields(self) -> dict[str, Any]:
        out = dict(self.extra)
        for name in _RECORD_FIELDS:
            value = getattr(self, name)
            if value is not ABSENT:
                out[name] = value
        return out


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord) if f.name != "extra")
