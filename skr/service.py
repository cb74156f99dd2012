"""The sidecar's use cases: raw / combined / MAA attestation and secure key release.

Owns: endpoint resolution and the allowlist check (before any connection), the ephemeral wrapping-key
pool, the attestation-token cache with single-flight per MAA endpoint, the per-request deadline, the
release itself (Key Vault → release JWS verification → unwrap → JWK), and one audit record per decision.

Never caches released keys; never logs or audits a token or key (tokens appear only as SHA-256).
Collaborators are passed in, so the same code runs against Azure and against the local services.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cryptography import x509

from skr.akv.jwk import jwk_to_json
from skr.akv.jws import TrustStore, open_release
from skr.akv.keywrap import Enc
from skr.akv.release import KeyVaultReleaser, ReleaseResult, parse_kid
from skr.audit import AsyncAuditLog, token_fingerprint
from skr.config import Settings
from skr.endpoints import Endpoint, parse_endpoint
from skr.errors import (
    BadRequest,
    EvidenceUnavailable,
    ReleaseDenied,
    SkrError,
    UpstreamTimeout,
)
from skr.evidence.base import Evidence, EvidenceProvider, report_data_for
from skr.http import Deadline
from skr.maa.client import MaaClient
from skr.maa.runtime import DEFAULT_BITS, WrappingKey
from skr.maa.token import TokenVerifier, unverified_claims
from skr.metrics import Metrics

log = logging.getLogger("skr.service")

T = TypeVar("T")

_KEY_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_KEY_VERSION = re.compile(r"^[0-9A-Za-z]{1,64}$")
WRAPPING_KEY_BITS = DEFAULT_BITS  # 2048; `skr serve` makes its first key with this default too


@dataclass
class RequestContext:
    """Who asked, and what the request spent waiting on upstreams (for Server-Timing and benchmarks)."""

    request_id: str
    client: str | None = None
    upstream_seconds: float = 0.0
    attestation: str | None = None  # "cached" | "fresh" | "shared"


@dataclass(frozen=True)
class ReleasedKeyResult:
    """What ``/key/release`` returns: the JWK as a compact JSON string (the Go sidecar's shape)."""

    key_json: str = field(repr=False)
    key_id: str
    version: str | None


@dataclass
class _Attestation:
    token: str = field(repr=False)
    key: WrappingKey = field(repr=False)
    claims: dict[str, Any]
    expires_at: float  # epoch seconds

    def fresh_for(self, margin: float) -> bool:
        return time.time() < self.expires_at - margin


class SelfCheck(Protocol):
    async def __call__(self) -> dict[str, Any]: ...


class ReleaseService:
    """All four use cases, with caches. One instance per daemon."""

    def __init__(
        self,
        settings: Settings,
        *,
        provider: EvidenceProvider,
        maa: MaaClient,
        releaser: KeyVaultReleaser,
        trust: TrustStore,
        audit: AsyncAuditLog | None,
        metrics: Metrics,
        trusted_arks: Sequence[x509.Certificate] = (),
        security_policy: bytes | None = None,
        token_verifier: TokenVerifier | None = None,
    ) -> None:
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
        self._cache: dict[str, _Attestation] = {}
        self._inflight: dict[str, asyncio.Future[_Attestation]] = {}
        self._next_key: asyncio.Future[WrappingKey] | None = None
        self.readiness: dict[str, Any] = {"evidence": "not checked", "policy_hash": "not checked"}
        self._keys_generated = False
        self.ready = False

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self, first_key: concurrent.futures.Future[WrappingKey] | None = None) -> None:
        """Generate the first wrapping key and run the evidence self-check (for /readyz).

        ``first_key``: a key already being generated (``skr serve`` starts one before its imports).
        """
        if first_key is not None and self._next_key is None:
            self._next_key = asyncio.wrap_future(first_key)
        self._prepare_key()
        assert self._next_key is not None
        await asyncio.gather(asyncio.shield(self._next_key), self.self_check())
        self._keys_generated = True

    async def aclose(self) -> None:
        for fut in self._inflight.values():
            fut.cancel()
        if self._next_key is not None:
            self._next_key.cancel()
        await self.provider.aclose()

    async def self_check(self) -> dict[str, Any]:
        """Fetch one report, verify its chain, and check HOST_DATA against the security policy."""
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
            if self.security_policy is not None:
                from skr.snp.hostdata import host_data_of_policy

                expected = host_data_of_policy(self.security_policy)
                if expected != host_data:
                    result["policy_hash"] = (
                        f"mismatch: SHA-256 of the security policy is {expected.hex()} "
                        f"but the report's HOST_DATA is {host_data.hex()}"
                    )
                else:
                    result["policy_hash"] = "ok"
            else:
                result["policy_hash"] = "ok (no security policy in the context to compare)"
        except SkrError as exc:
            result.setdefault("evidence", f"unavailable: {exc.diagnostics()}")
            result.setdefault("policy_hash", "not checked")
        self.readiness = result
        self.ready = result["evidence"].startswith("ok") and result["policy_hash"].startswith("ok")
        return result

    @property
    def wrapping_key_ready(self) -> bool:
        """True once a wrapping key has been generated and the latest generation has not failed."""
        nxt = self._next_key
        if nxt is not None and nxt.done() and not nxt.cancelled() and nxt.exception() is not None:
            return False
        return self._keys_generated

    # --- wrapping keys ---------------------------------------------------------------------------------

    def _prepare_key(self) -> None:
        if self._next_key is None or (self._next_key.done() and self._next_key.exception() is not None):
            self._next_key = asyncio.ensure_future(asyncio.to_thread(WrappingKey.generate, WRAPPING_KEY_BITS))

    async def _take_key(self) -> WrappingKey:
        """A fresh RSA-2048 wrapping key; the next one starts generating right away (off the loop)."""
        self._prepare_key()
        assert self._next_key is not None
        current = self._next_key
        self._next_key = None
        key = await current
        self._prepare_key()
        return key

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
                code="missing_field",
            )
        return self.settings.allowlist.check(ep, what="attestation endpoint")

    def resolve_vault(self, value: str | None, kid: str) -> tuple[Endpoint, str, str | None]:
        """The vault, key name and version for a request. A full key URL in ``kid`` names the vault."""
        if not isinstance(kid, str) or not kid:
            raise BadRequest("kid is required", code="missing_field")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) > 0x7E for c in kid) or "%" in kid or ".." in kid:
            raise BadRequest("kid contains characters that are not allowed in a key name", code="invalid_kid")
        try:
            kid_vault, name, version = parse_kid(kid)
        except SkrError as exc:
            raise BadRequest(
                f"kid is not a key name, name/version or key URL: {exc.message}", code="invalid_kid"
            ) from None
        if not _KEY_NAME.match(name) or (version is not None and not _KEY_VERSION.match(version)):
            raise BadRequest(
                "kid must be a key name (letters, digits, '-'), optionally followed by /<version>",
                code="invalid_kid",
            )
        vault: Endpoint | None = None
        if kid_vault:
            vault = parse_endpoint(kid_vault, what="kid vault")
        if value:
            named = parse_endpoint(value, what="akv_endpoint")
            if vault is not None and vault != named:
                raise BadRequest("kid names a different vault than akv_endpoint", code="invalid_kid")
            vault = named
        if vault is None:
            if self.settings.akv_endpoint is None:
                raise BadRequest(
                    "akv_endpoint is required (no default key vault is configured)",
                    hint="pass akv_endpoint or set SKR_AKV_ENDPOINT",
                    code="missing_field",
                )
            vault = self.settings.akv_endpoint
        return self.settings.allowlist.check(vault, what="key vault endpoint"), name, version

    # --- upstream helpers ------------------------------------------------------------------------------

    async def _timed(self, service: str, ctx: RequestContext, call: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await call
        finally:
            spent = time.monotonic() - started
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

    async def _attest(self, maa: Endpoint, deadline: Deadline, ctx: RequestContext) -> _Attestation:
        key = await self._take_key()
        runtime_data = key.runtime_data()
        try:
            evidence = await self._evidence(report_data_for(runtime_data), ctx)
            token = await self._timed(
                "maa", ctx, self.maa.attest(maa.url, evidence, runtime_data, deadline=deadline)
            )
        except SkrError:
            self.metrics.attestations.inc(outcome="error")
            raise
        self.metrics.attestations.inc(outcome="ok")
        claims = unverified_claims(token)
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) else time.time() + 300
        return _Attestation(token=token, key=key, claims=claims, expires_at=expires_at)

    async def _attestation(
        self, maa: Endpoint, deadline: Deadline, ctx: RequestContext, *, reject: str | None = None
    ) -> _Attestation:
        """An attestation token and its wrapping key for ``maa``: cached, shared with a concurrent
        request, or fresh. ``reject``: a token Key Vault refused — never hand it out again."""
        if not self.settings.token_reuse:
            ctx.attestation = "fresh"
            return await self._attest(maa, deadline, ctx)
        slot = maa.authority
        cached = self._cache.get(slot)
        if cached is not None and reject is not None and cached.token == reject:
            del self._cache[slot]
            cached = None
        if cached is not None and cached.fresh_for(self.settings.token_margin):
            self.metrics.token_cache.inc(result="hit")
            ctx.attestation = "cached"
            return cached
        fut = self._inflight.get(slot)
        if fut is None:
            self.metrics.token_cache.inc(result="miss")
            ctx.attestation = "fresh"
            fut = asyncio.ensure_future(self._attest(maa, deadline, ctx))
            self._inflight[slot] = fut

            def done(f: asyncio.Future[_Attestation]) -> None:
                if self._inflight.get(slot) is f:
                    del self._inflight[slot]
                if not f.cancelled() and f.exception() is None:
                    self._cache[slot] = f.result()

            fut.add_done_callback(done)
        else:
            self.metrics.token_cache.inc(result="shared")
            ctx.attestation = "shared"
        return await asyncio.shield(fut)

    async def _within(self, deadline: Deadline, what: str, work: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(max(deadline.remaining(), 0.0)):
                return await work()
        except TimeoutError:
            raise UpstreamTimeout(
                f"{what} did not finish within the {self.settings.request_deadline:g} s request deadline",
                hint="an upstream service is slow or unreachable; see the sidecar log for which",
            ) from None

    async def _record(self, fields: dict[str, Any]) -> None:
        if self.audit is not None:
            await self.audit.append(fields)

    # --- use cases -------------------------------------------------------------------------------------

    async def _audited_evidence(self, runtime_data: bytes, ctx: RequestContext, event: str) -> Evidence:
        """A report binding ``runtime_data`` within the deadline, with its audit record."""
        started = time.monotonic()
        deadline = Deadline.after(self.settings.request_deadline)
        fields: dict[str, Any] = {"event": event, "request_id": ctx.request_id, "client": ctx.client}
        try:
            evidence = await self._within(
                deadline, "fetching the report", lambda: self._evidence(report_data_for(runtime_data), ctx)
            )
        except SkrError as exc:
            await self._record({**fields, "outcome": "error", "error_code": exc.code, **_duration(started)})
            raise
        await self._record(
            {**fields, "outcome": "granted", **_report_fields(evidence.report), **_duration(started)}
        )
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
        started = time.monotonic()
        fields: dict[str, Any] = {"event": "attest.maa", "request_id": ctx.request_id, "client": ctx.client}
        try:
            maa = self.resolve_maa(maa_endpoint)
            fields["maa"] = maa.authority
            deadline = Deadline.after(self.settings.request_deadline)

            async def work() -> str:
                evidence = await self._evidence(report_data_for(runtime_data), ctx)
                token = await self._timed(
                    "maa", ctx, self.maa.attest(maa.url, evidence, runtime_data, deadline=deadline)
                )
                if self.token_verifier is not None:
                    # the app gets the token as proof: it must really be the endpoint's (issuer, signature)
                    await self._timed(
                        "maa", ctx, self.token_verifier.verify(token, issuer=maa.url, deadline=deadline)
                    )
                return token

            token = await self._within(deadline, "attestation", work)
        except SkrError as exc:
            self.metrics.attestations.inc(outcome="error")
            outcome = "denied" if exc.status == 403 else "error"
            await self._record({**fields, "outcome": outcome, "error_code": exc.code, **_duration(started)})
            raise
        self.metrics.attestations.inc(outcome="ok")
        claims = unverified_claims(token)
        await self._record(
            {**fields, "outcome": "granted", **_token_fields(token, claims), **_duration(started)}
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
        started = time.monotonic()
        fields: dict[str, Any] = {
            **(audit_fields or {}),
            "event": event,
            "request_id": ctx.request_id,
            "client": ctx.client,
            "kid": kid if isinstance(kid, str) and len(kid) <= 256 else None,
        }
        try:
            maa = self.resolve_maa(maa_endpoint)
            vault, name, version = self.resolve_vault(akv_endpoint, kid)
            fields.update(maa=maa.authority, vault=vault.authority)
            deadline = Deadline.after(self.settings.request_deadline)
            result = await self._within(
                deadline,
                "the key release",
                lambda: self._release(
                    maa=maa,
                    vault=vault,
                    name=name,
                    version=version,
                    access_token=access_token,
                    deadline=deadline,
                    ctx=ctx,
                    fields=fields,
                ),
            )
        except asyncio.CancelledError:
            # The client went away or shutdown cut the request off: the attempt still gets its record.
            self.metrics.releases.inc(outcome="error")
            record = {**fields, "outcome": "error", "error_code": "cancelled", **_duration(started)}
            with contextlib.suppress(Exception):
                await asyncio.shield(self._record(record))
            raise
        except SkrError as exc:
            self.metrics.releases.inc(outcome="denied" if exc.status == 403 else "error")
            outcome = "denied" if exc.status in (403, 404) else "error"
            await self._record(
                {
                    **fields,
                    "outcome": outcome,
                    "error_code": exc.code,
                    "attestation": ctx.attestation,
                    **_duration(started),
                }
            )
            raise
        self.metrics.releases.inc(outcome="granted")
        await self._record(
            {
                **fields,
                "outcome": "granted",
                "key_version": result.version,
                "attestation": ctx.attestation,
                **_duration(started),
            }
        )
        return result

    async def _release(
        self,
        *,
        maa: Endpoint,
        vault: Endpoint,
        name: str,
        version: str | None,
        access_token: str | None,
        deadline: Deadline,
        ctx: RequestContext,
        fields: dict[str, Any],
    ) -> ReleasedKeyResult:
        kid = f"{name}/{version}" if version else name

        async def release_to(attestation: _Attestation) -> ReleaseResult:
            fields.update(_token_fields(attestation.token, attestation.claims))
            return await self._timed(
                "akv",
                ctx,
                self.releaser.release(
                    vault.url,
                    kid,
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
        # ~0.5 ms of CPU (RS256 verify, one RSA-2048 OAEP decrypt, AES-KWP; the signer chain is validated
        # once per validity window): cheaper than a worker-thread hop, so it runs on the loop.
        opened = open_release(
            released.jws,
            host=vault.host,
            trust=self.trust,
            wrapping_key=attestation.key.private_key,
            expected_wrapping_kid=attestation.key.kid,
        )
        return ReleasedKeyResult(
            key_json=jwk_to_json(opened.jwk), key_id=opened.key_id, version=opened.version
        )


def _duration(started: float) -> dict[str, Any]:
    return {"duration_ms": round((time.monotonic() - started) * 1000, 3)}


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


__all__ = ["EvidenceUnavailable", "ReleaseService", "ReleasedKeyResult", "RequestContext"]
