"""The sidecar's use cases: raw / combined / MAA attestation and secure key release.

Owns: endpoint and kid resolution — the request edge, where they are parsed once — and the allowlist check
(before any connection), the per-request deadline, the release itself (attestation from
:class:`skr.attestations.AttestationCache` → Key Vault → release JWS verification → unwrap → JWK), the
retry of a refused reused token, and one :class:`skr.ports.AuditRecord` per decision.

Never caches keys released to the caller (``/key/release``); a key released for an unwrap (``/key/unwrap``,
the key provider) stays in memory, never on disk, until its attestation token expires, and only plaintexts
leave. Never logs or audits a token or key (tokens appear only as SHA-256).
Collaborators are ports (:mod:`skr.ports`) passed in, so the same code runs against Azure, against the local
services, and against in-memory fakes.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509

from skr.akv.jwk import jwk_to_json
from skr.akv.jws import TrustStore, open_release
from skr.akv.keywrap import Enc
from skr.akv.release import ReleaseResult
from skr.attestations import Attestation, AttestationCache
from skr.audit import token_fingerprint
from skr.audit.chain import trim_reason
from skr.config import Settings
from skr.endpoints import Endpoint, KeyRef, parse_endpoint, parse_kid
from skr.errors import (
    BadRequest,
    Code,
    Forbidden,
    NotFound,
    ReleaseDenied,
    SkrError,
    UnwrapFailed,
    UpstreamTimeout,
)
from skr.evidence.base import Evidence, report_data_for
from skr.maa.runtime import DEFAULT_BITS, AuditHead, WrappingKey
from skr.maa.token import TokenVerifier, unverified_claims
from skr.metrics import Metrics
from skr.ports import (
    ABSENT,
    Attester,
    AuditRecord,
    AuditSink,
    Clock,
    EvidenceSource,
    ReleasedKeyResult,
    ReleaseOpener,
    Releaser,
    SystemClock,
)
from skr.upstream import Deadline

log = logging.getLogger("skr.service")

T = TypeVar("T")

#: The audit note of an unwrap that used a key kept in memory from an earlier release (no Key Vault call).
KEPT_KEY_NOTE = "key kept in memory from an earlier unwrap"
_NEW_WRAPPING_KEY = functools.partial(WrappingKey.generate, DEFAULT_BITS)  # 2048, as `skr serve`'s first key


@dataclass
class RequestContext:
    """Who asked, and what the request spent waiting on upstreams (for Server-Timing and benchmarks)."""

    request_id: str
    client: str | None = None
    upstream_seconds: float = 0.0
    attestation: str | None = None  # "cached" | "fresh" | "shared"
    client_token_id: str | None = None  # the name of the client token presented (SKR_CLIENT_TOKEN_FILE)


#: A key kept for unwraps, with the audit fields of the attestation it was released under.
_KeptKey = tuple[ReleasedKeyResult, dict[str, Any]]
_TOKEN_FIELDS = ("maa_jti", "token_sha256", "host_data", "measurement")


def trusted_opener(trust: TrustStore) -> ReleaseOpener:
    """The real "open the release" step: the JWS verified against ``trust``, the key unwrapped."""

    def open_(jws: str, ref: KeyRef, key: WrappingKey) -> ReleasedKeyResult:
        # ~0.5 ms of CPU (RS256 verify, one RSA-2048 OAEP decrypt, AES-KWP; the signer chain is validated
        # once per validity window): cheaper than a worker-thread hop, so it runs on the loop.
        opened = open_release(
            jws,
            host=ref.vault,
            trust=trust,
            wrapping_key=key.private_key,
            expected_wrapping_kid=key.kid,
            expected_name=ref.name,
            expected_version=ref.version,
        )
        return ReleasedKeyResult(
            key_json=jwk_to_json(opened.jwk), key_id=opened.key_id, version=opened.version
        )

    return open_


class ReleaseService:
    """All four use cases over injected ports (evidence, attester, releaser, opener, audit sink, clock).
    One instance per daemon. ``opener`` defaults to :func:`trusted_opener` over ``trust``."""

    def __init__(
        self,
        settings: Settings,
        *,
        provider: EvidenceSource,
        maa: Attester,
        releaser: Releaser,
        trust: TrustStore | None = None,
        audit: AuditSink | None,
        metrics: Metrics,
        trusted_arks: Sequence[x509.Certificate] = (),
        security_policy: bytes | None = None,
        token_verifier: TokenVerifier | None = None,
        ambient_identity: Callable[[], str] | None = None,
        opener: ReleaseOpener | None = None,
        clock: Clock | None = None,
        new_key: Callable[[], WrappingKey] = _NEW_WRAPPING_KEY,
    ) -> None:
        if opener is None:
            if trust is None:
                raise TypeError("ReleaseService needs a trust store or an opener")
            opener = trusted_opener(trust)
        self.settings = settings
        self.provider = provider
        self.maa = maa
        self.releaser = releaser
        self.trust = trust
        self.audit = audit
        self.metrics = metrics
        self.trusted_arks = tuple(trusted_arks)
        self.security_policy = security_policy
        self.token_verifier = token_verifier
        # "workload_identity" | "managed_identity": which credential a release without access_token uses
        self.ambient_identity = ambient_identity
        self.open = opener
        self.clock = clock or SystemClock()
        self.attestations = AttestationCache(
            reuse=settings.token_reuse,
            margin=settings.token_margin,
            metrics=metrics,
            clock=self.clock,
            new_key=new_key,
        )
        self._unwrap_keys: dict[tuple[str, ...], _KeptKey] = {}
        self.readiness: dict[str, Any] = {"evidence": "not checked", "policy_hash": "not checked"}
        self.ready = False

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self, first_key: concurrent.futures.Future[WrappingKey] | None = None) -> None:
        """Generate the first wrapping key and run the evidence self-check (for /readyz).

        ``first_key``: a key already being generated (``skr serve`` starts one before its imports).
        """
        await asyncio.gather(self.attestations.start(first_key), self.self_check())

    async def aclose(self) -> None:
        self.attestations.close()
        await self.provider.aclose()

    async def self_check(self) -> dict[str, Any]:
        """Fetch one report, verify its chain, and check HOST_DATA against the security policy."""
        from skr.evidence.context import missing_uvm_endorsement_warning
        from skr.snp.hostdata import host_data_of_policy
        from skr.snp.verify import verify_evidence_chain

        result: dict[str, Any] = {}
        try:
            evidence = await self.provider.collect(os.urandom(64))
            verified = await asyncio.to_thread(
                verify_evidence_chain,
                evidence.report,
                evidence.vcek_chain_pem,
                trusted_arks=self.trusted_arks,
            )
            result["evidence"] = f"ok ({evidence.provider})"
            host_data = verified.report.host_data
            result["host_data"] = host_data.hex()
            if self.security_policy is None:
                result["policy_hash"] = "ok (no security policy in the context to compare)"
            elif (expected := host_data_of_policy(self.security_policy)) != host_data:
                result["policy_hash"] = (
                    f"mismatch: SHA-256 of the security policy is {expected.hex()} "
                    f"but the report's HOST_DATA is {host_data.hex()}"
                )
            else:
                result["policy_hash"] = "ok"
            warning = missing_uvm_endorsement_warning(self.security_policy, evidence.uvm_endorsements)
            if warning is not None:
                log.warning("%s", warning)
                result["uvm_endorsement"] = f"warning: {warning}"
            elif self.security_policy is not None:
                result["uvm_endorsement"] = "ok"
        except SkrError as exc:
            result.setdefault("evidence", f"unavailable: {exc.diagnostics()}")
            result.setdefault("policy_hash", "not checked")
        self.readiness = result
        self.ready = result["evidence"].startswith("ok") and result["policy_hash"].startswith("ok")
        return result

    @property
    def wrapping_key_ready(self) -> bool:
        """True once a wrapping key has been generated and the latest generation has not failed."""
        return self.attestations.wrapping_key_ready

    # --- endpoints -------------------------------------------------------------------------------------

    def resolve_maa(self, value: str | None) -> Endpoint:
        if value:
            ep = parse_endpoint(value, what="maa_endpoint")
        elif self.settings.maa_endpoint is not None:
            ep = self.settings.maa_endpoint
        else:
            raise BadRequest(
                "maa_endpoint is required (no default attestation endpoint is configured)",
                hint="pass maa_endpoint or set SKR_MAA_ENDPOINT",
                code=Code.MISSING_FIELD,
            )
        return self.settings.allowlist.check(ep, what="attestation endpoint")

    def resolve_vault(self, value: str | None, kid: str) -> KeyRef:
        """The key a request names, parsed once (the request edge). A full key URL in ``kid`` names the
        vault."""
        if not isinstance(kid, str) or not kid:
            raise BadRequest("kid is required", code=Code.MISSING_FIELD)
        if any(c.isspace() or ord(c) < 0x20 or ord(c) > 0x7E for c in kid) or "%" in kid or ".." in kid:
            raise BadRequest(
                "kid contains characters that are not allowed in a key name", code=Code.INVALID_KID
            )
        try:
            kid_vault, name, version = parse_kid(kid)
        except SkrError as exc:
            raise BadRequest(
                f"kid is not a key name, name/version or key URL: {exc.message}", code=Code.INVALID_KID
            ) from None
        vault = parse_endpoint(value, what="akv_endpoint") if value else kid_vault
        if kid_vault is not None and vault != kid_vault:
            raise BadRequest("kid names a different vault than akv_endpoint", code=Code.INVALID_KID)
        if vault is None:
            if self.settings.akv_endpoint is None:
                raise BadRequest(
                    "akv_endpoint is required (no default key vault is configured)",
                    hint="pass akv_endpoint or set SKR_AKV_ENDPOINT",
                    code=Code.MISSING_FIELD,
                )
            vault = self.settings.akv_endpoint
        return KeyRef(self.settings.allowlist.check(vault, what="key vault endpoint"), name, version)

    # --- upstream helpers ------------------------------------------------------------------------------

    async def _timed(self, service: str, ctx: RequestContext, call: Awaitable[T]) -> T:
        started = self.clock.monotonic()
        try:
            return await call
        finally:
            spent = self.clock.monotonic() - started
            ctx.upstream_seconds += spent
            self.metrics.upstream_calls.inc(service=service)
            self.metrics.upstream_wait.observe(spent, service=service)

    async def _evidence(self, report_data: bytes, ctx: RequestContext) -> Evidence:
        try:
            evidence = await self._timed("evidence", ctx, self.provider.collect(report_data))
        except SkrError:
            self.metrics.evidence.inc(outcome="error")
            raise
        self.metrics.evidence.inc(outcome="ok")
        return evidence

    async def _attest(
        self, maa: Endpoint, runtime_data: bytes, deadline: Deadline, ctx: RequestContext
    ) -> str:
        """A token from ``maa`` for fresh evidence binding ``runtime_data``."""
        evidence = await self._evidence(report_data_for(runtime_data), ctx)
        return await self._timed("maa", ctx, self.maa.attest(maa, evidence, runtime_data, deadline=deadline))

    async def _mint(self, maa: Endpoint, key: WrappingKey, deadline: Deadline, ctx: RequestContext) -> str:
        """An attestation token from ``maa`` for fresh evidence binding ``key``'s runtime data."""
        # the token names the audit head at attestation time (a cached token keeps naming that moment)
        runtime_data = key.runtime_data(self._audit_head())
        try:
            token = await self._attest(maa, runtime_data, deadline, ctx)
        except SkrError:
            self.metrics.attestations.inc(outcome="error")
            raise
        self.metrics.attestations.inc(outcome="ok")
        return token

    async def _attestation(
        self, maa: Endpoint, deadline: Deadline, ctx: RequestContext, *, reject: str | None = None
    ) -> Attestation:
        """The sidecar's attestation for ``maa`` (:class:`AttestationCache`); ``ctx`` learns its source."""
        source, attestation = self.attestations.get(
            maa, lambda key: self._mint(maa, key, deadline, ctx), reject=reject
        )
        ctx.attestation = source
        return await attestation

    async def _within(self, deadline: Deadline, what: str, work: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(max(deadline.remaining(), 0.0)):
                return await work()
        except TimeoutError:
            raise UpstreamTimeout(
                f"{what} did not finish within the {self.settings.request_deadline:g} s request deadline",
                hint="an upstream service is slow or unreachable; see the sidecar log for which",
            ) from None

    def _audit_head(self) -> AuditHead | None:
        if self.audit is None:
            return None
        seq, head = self.audit.head
        return AuditHead(seq=seq, head=head, instance=self.audit.instance)

    def _identity(self, access_token: str | None) -> str:
        """``request`` (the caller's own access_token), ``workload`` or ``managed`` identity."""
        if access_token is not None and access_token.strip():
            return "request"
        kind = self.ambient_identity() if self.ambient_identity is not None else "managed_identity"
        return "workload" if kind == "workload_identity" else "managed"

    async def _record(self, record: AuditRecord) -> None:
        if self.audit is not None:
            await self.audit.append(record.as_fields())

    async def _finish(self, draft: _Draft, started: float, **changes: Any) -> None:
        """Write the request's audit record, with its duration since ``started``."""
        duration_ms = round((self.clock.monotonic() - started) * 1000, 3)
        await self._record(draft.final(**changes, duration_ms=duration_ms))

    # --- use cases -------------------------------------------------------------------------------------

    async def _audited_evidence(self, runtime_data: bytes, ctx: RequestContext, event: str) -> Evidence:
        """A report binding ``runtime_data`` within the deadline, with its audit record."""
        started = self.clock.monotonic()
        deadline = Deadline.after(self.settings.request_deadline)
        draft = _Draft(AuditRecord(event=event, request_id=ctx.request_id, client=ctx.client))
        try:
            evidence = await self._within(
                deadline, "fetching the report", lambda: self._evidence(report_data_for(runtime_data), ctx)
            )
        except SkrError as exc:
            await self._finish(draft, started, outcome="error", **_error_fields(exc))
            raise
        await self._finish(draft, started, outcome="granted", **_report_fields(evidence.report))
        return evidence

    async def raw_report(self, runtime_data: bytes, ctx: RequestContext) -> bytes:
        """``/attest/raw``: a report whose REPORT_DATA is SHA-256(runtime_data) ‖ 32 zero bytes."""
        return (await self._audited_evidence(runtime_data, ctx, "attest.raw")).report

    async def combined(self, runtime_data: bytes, ctx: RequestContext) -> dict[str, str]:
        """``/attest/combined``: the report plus its collateral, in the Go sidecar's field order."""
        evidence = await self._audited_evidence(runtime_data, ctx, "attest.combined")
        uvm = evidence.uvm_endorsements
        return {
            "endorsed_tcb": evidence.endorsed_tcb or "",
            "endorsements": base64.b64encode(evidence.vcek_chain_pem).decode(),
            "evidence": base64.b64encode(evidence.report).decode(),
            "uvm_endorsements": base64.b64encode(uvm).decode() if uvm else "",
        }

    async def maa_token(self, maa_endpoint: str | None, runtime_data: bytes, ctx: RequestContext) -> str:
        """``/attest/maa``: an MAA token for the caller's runtime data (never cached: the data is theirs)."""
        started = self.clock.monotonic()
        draft = _Draft(AuditRecord(event="attest.maa", request_id=ctx.request_id, client=ctx.client))
        try:
            maa = self.resolve_maa(maa_endpoint)
            draft.note(maa=maa.authority)
            deadline = Deadline.after(self.settings.request_deadline)

            async def work() -> str:
                token = await self._attest(maa, runtime_data, deadline, ctx)
                if self.token_verifier is not None:
                    # the app gets the token as proof: it must really be the endpoint's (issuer, signature)
                    await self._timed(
                        "maa", ctx, self.token_verifier.verify(token, issuer=maa.url, deadline=deadline)
                    )
                return token

            token = await self._within(deadline, "attestation", work)
        except SkrError as exc:
            self.metrics.attestations.inc(outcome="error")
            outcome = "denied" if isinstance(exc, Forbidden) else "error"
            await self._finish(draft, started, outcome=outcome, **_error_fields(exc))
            raise
        self.metrics.attestations.inc(outcome="ok")
        await self._finish(
            draft, started, outcome="granted", **_token_fields(token, unverified_claims(token))
        )
        return token

    async def release(
        self,
        *,
        kid: str,
        maa_endpoint: str | None,
        akv_endpoint: str | None,
        access_token: str | None,
        ctx: RequestContext,
        event: str = "key.release",
        audit_fields: dict[str, Any] | None = None,
    ) -> ReleasedKeyResult:
        """``/key/release``: attest (or reuse a token), release from Key Vault, verify, unwrap.

        ``event`` / ``audit_fields``: another face of the same release (``encfs.mount``) and what it adds
        to the audit record (never key material)."""

        async def as_is(result: ReleasedKeyResult) -> ReleasedKeyResult:
            return result

        return await self._release_flow(
            event,
            kid=kid,
            maa_endpoint=maa_endpoint,
            akv_endpoint=akv_endpoint,
            access_token=access_token,
            ctx=ctx,
            use=as_is,
            keep=None,
            audit_fields=audit_fields,
        )

    async def unwrap(
        self,
        *,
        kid: str,
        maa_endpoint: str | None,
        akv_endpoint: str | None,
        access_token: str | None,
        ctx: RequestContext,
        decrypt: Callable[[str], bytes],
    ) -> bytes:
        """``/key/unwrap`` and the key provider: the key released through the same flow as :meth:`release`
        (allowlist, deadline, token cache, audit with ``event: "key.unwrap"``), kept in memory per
        kid/version until its attestation token expires, and used in a worker thread by ``decrypt`` (JWK
        JSON → plaintext). Only the plaintext leaves."""

        async def use(result: ReleasedKeyResult) -> bytes:
            return await asyncio.to_thread(decrypt, result.key_json)

        return await self._release_flow(
            "key.unwrap",
            kid=kid,
            maa_endpoint=maa_endpoint,
            akv_endpoint=akv_endpoint,
            access_token=access_token,
            ctx=ctx,
            use=use,
            keep=self._unwrap_keys if self.settings.token_reuse else None,
        )

    async def _release_flow(
        self,
        event: str,
        *,
        kid: str,
        maa_endpoint: str | None,
        akv_endpoint: str | None,
        access_token: str | None,
        ctx: RequestContext,
        use: Callable[[ReleasedKeyResult], Awaitable[T]],
        keep: dict[tuple[str, ...], _KeptKey] | None,
        audit_fields: dict[str, Any] | None = None,
    ) -> T:
        """Resolve, release (or take the key from ``keep``), ``use`` it — within the deadline, audited."""
        started = self.clock.monotonic()
        draft = _Draft(
            AuditRecord(
                event=event,
                request_id=ctx.request_id,
                client=ctx.client,
                extra=audit_fields or {},
                kid=kid if isinstance(kid, str) and len(kid) <= 256 else None,
                identity=self._identity(access_token),
                client_token_id=ctx.client_token_id,
            )
        )
        try:
            maa = self.resolve_maa(maa_endpoint)
            ref = self.resolve_vault(akv_endpoint, kid)
            draft.note(maa=maa.authority, vault=ref.vault.authority)
            deadline = Deadline.after(self.settings.request_deadline)

            async def work() -> T:
                slot = (
                    maa.authority,
                    ref.vault.authority,
                    ref.name,
                    ref.version or "",
                    token_fingerprint(access_token or ""),
                )
                kept = keep.get(slot) if keep is not None else None
                if keep is not None and kept is not None and self.clock.time() < kept[0].expires_at:
                    ctx.attestation = "cached"
                    draft.note(**kept[1], key_version=kept[0].version, note=KEPT_KEY_NOTE)
                    try:
                        return await use(kept[0])
                    except UnwrapFailed:
                        # A new key version since it was kept? Release the key again, once.
                        keep.pop(slot, None)
                        draft.note(note=ABSENT)
                released = await self._release(
                    maa=maa, ref=ref, access_token=access_token, deadline=deadline, ctx=ctx, draft=draft
                )
                draft.note(key_version=released.version)
                if keep is not None:
                    now = self.clock.time()
                    for old in [k for k, v in keep.items() if v[0].expires_at <= now]:
                        del keep[old]
                    keep[slot] = (released, {k: draft.get(k) for k in _TOKEN_FIELDS})
                return await use(released)

            result = await self._within(deadline, "the key release", work)
        except asyncio.CancelledError:
            # The client went away or shutdown cut the request off: the attempt still gets its record.
            self.metrics.releases.inc(outcome="error")
            with contextlib.suppress(Exception):
                await asyncio.shield(self._finish(draft, started, outcome="error", error_code=Code.CANCELLED))
            raise
        except SkrError as exc:
            self.metrics.releases.inc(outcome="denied" if isinstance(exc, Forbidden) else "error")
            outcome = "denied" if isinstance(exc, Forbidden | NotFound) else "error"
            await self._finish(
                draft, started, outcome=outcome, **_error_fields(exc), attestation=ctx.attestation
            )
            raise
        self.metrics.releases.inc(outcome="granted")
        await self._finish(draft, started, outcome="granted", attestation=ctx.attestation)
        return result

    async def _release(
        self,
        *,
        maa: Endpoint,
        ref: KeyRef,
        access_token: str | None,
        deadline: Deadline,
        ctx: RequestContext,
        draft: _Draft,
    ) -> ReleasedKeyResult:
        async def release_to(attestation: Attestation) -> ReleaseResult:
            draft.note(**_token_fields(attestation.token, attestation.claims))
            return await self._timed(
                "akv",
                ctx,
                self.releaser.release(
                    ref,
                    attestation.token,
                    access_token=access_token,
                    enc=Enc.CKM_RSA_AES_KEY_WRAP,
                    deadline=deadline,
                ),
            )

        attestation = await self._attestation(maa, deadline, ctx)
        try:
            released = await release_to(attestation)
        except ReleaseDenied:
            if ctx.attestation not in ("cached", "shared"):
                raise
            # Key Vault refused a token we reused (revoked signing key, changed policy...): attest once more.
            log.info("key vault refused a reused attestation token; attesting again")
            attestation = await self._attestation(maa, deadline, ctx, reject=attestation.token)
            released = await release_to(attestation)
        opened = self.open(released.jws, ref, attestation.key)
        return dataclasses.replace(opened, expires_at=attestation.expires_at)


@dataclass
class _Draft:
    """The audit record of one request as it grows: the steps' fields collect, the frozen record is built
    once, at the end."""

    record: AuditRecord
    changes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def note(self, **changes: Any) -> None:
        self.changes.update(changes)

    def get(self, name: str) -> Any:
        return self.changes[name] if name in self.changes else getattr(self.record, name)

    def final(self, **changes: Any) -> AuditRecord:
        return dataclasses.replace(self.record, **{**self.changes, **changes})


def _error_fields(exc: SkrError) -> dict[str, Any]:
    """``error_code``, ``reason`` (the error's message: the failing claim and values as Key Vault or the
    policy check said them; error messages never hold tokens) and ``upstream_status`` when an upstream
    answered."""
    return {
        "error_code": exc.code,
        "reason": trim_reason(exc.message),
        "upstream_status": exc.upstream_status,
    }


def _token_fields(token: str, claims: dict[str, Any]) -> dict[str, Any]:
    return {
        "maa_jti": claims.get("jti"),
        "token_sha256": token_fingerprint(token),
        "host_data": claims.get("x-ms-sevsnpvm-hostdata"),
        "measurement": claims.get("x-ms-sevsnpvm-launchmeasurement"),
    }


def _report_fields(report: bytes) -> dict[str, Any]:
    if len(report) < 0xE0:
        return {}
    return {"host_data": report[0xC0:0xE0].hex(), "measurement": report[0x90:0xC0].hex()}
