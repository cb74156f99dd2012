"""Assembling and running the sidecar: collaborators from :class:`Settings`, the HTTP server (and with
``--server-type grpc|both`` the gRPC key provider on the same release service), shutdown.

Owns the process lifecycle: one shared aiohttp client session, credentials and Key Vault clients
created once, the evidence provider and its self-check, the audit log, and graceful shutdown
(SIGTERM stops accepting, lets in-flight requests finish within the grace period, then flushes the
audit log).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from cryptography import x509

from skr import __version__
from skr.akv.jws import TrustStore
from skr.akv.release import KeyVaultReleaser, SdkSettings
from skr.audit import AsyncAuditLog, AuditLog
from skr.audit.checkpoint import Checkpointer
from skr.config import EvidenceKind, Settings, describe
from skr.connections import ConnectionGuard, GuardedRunner
from skr.errors import ConfigError
from skr.evidence.base import EvidenceProvider
from skr.files import check_state_tree
from skr.identity import CredentialFactory
from skr.maa.client import MaaClient
from skr.maa.runtime import WrappingKey
from skr.maa.token import TokenVerifier
from skr.metrics import Metrics
from skr.server import AUDIT_HEAD_KEY, create_app
from skr.service import ReleaseService
from skr.upstream import client_ssl_context

if TYPE_CHECKING:
    from skr.keyprovider.grpc_server import GrpcServer

log = logging.getLogger("skr.daemon")


@dataclass
class Runtime:
    """Everything a running sidecar holds; :meth:`aclose` releases it all."""

    settings: Settings
    service: ReleaseService
    metrics: Metrics
    session: aiohttp.ClientSession
    releaser: KeyVaultReleaser
    credentials: CredentialFactory
    audit: AsyncAuditLog | None
    app: web.Application
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    checkpointer: Checkpointer | None = None

    async def start_audit(self) -> None:
        """Seal the log's previous head with a hardware checkpoint and write ``audit.start``."""
        if self.checkpointer is not None and not self.checkpointer.started:
            await self.checkpointer.start(
                version=__version__,
                evidence_kind=self.service.provider.name,
                settings=audit_settings(self.settings),
            )

    async def aclose(self) -> None:
        if self.checkpointer is not None:  # audit.stop and the final checkpoint need the evidence provider
            await self.checkpointer.stop()
        await self.service.aclose()
        await self.releaser.aclose()
        await self.credentials.aclose()
        await self.session.close()
        for close in reversed(self.closers):
            await close()
        if self.audit is not None:
            await self.audit.aclose()


def _echo(line: str) -> None:
    """To stdout: audit records with --audit-stdout, checkpoint copies always (log pipelines keep them)."""
    sys.stdout.write(line)
    sys.stdout.flush()


def audit_settings(settings: Settings) -> dict[str, object]:
    """The settings that decide what may be released, as ``audit.start`` records them."""
    return {
        "maa_endpoint": str(settings.maa_endpoint) if settings.maa_endpoint else None,
        "akv_endpoint": str(settings.akv_endpoint) if settings.akv_endpoint else None,
        "allowed_endpoints": list(settings.allowlist.patterns),
        "token_reuse": settings.token_reuse,
        "evidence": settings.evidence,
        "client_auth": settings.client_token is not None,
    }


def open_audit(settings: Settings) -> AsyncAuditLog | None:
    if settings.audit_log is None and not settings.audit_stdout:
        return None
    if settings.audit_log is None:
        raise ConfigError("--audit-stdout needs --audit-log (the chain must be persisted to be verifiable)")
    echo = _echo if settings.audit_stdout else None
    return AsyncAuditLog(AuditLog(settings.audit_log, max_bytes=settings.audit_max_bytes, echo=echo))


async def create_evidence_provider(
    settings: Settings,
    session: aiohttp.ClientSession,
    env: Mapping[str, str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    virtual_policy: bytes | None = None,
) -> tuple[EvidenceProvider, list[x509.Certificate], bytes | None]:
    """The configured evidence provider, extra ARKs to trust (the virtual TEE's), and the security policy.

    ``virtual_policy``: the policy a virtual TEE launches with when the security context has none (the
    caller's choice — ``skr serve`` passes local mode's demo policy; the daemon never imports local mode).

    Device probing, security-context reading and the virtual TEE's first key generation are blocking,
    so they run in a worker thread.
    """
    from skr.evidence import create_provider
    from skr.evidence.context import load_security_context
    from skr.snp.collateral import CollateralClient

    context = await asyncio.to_thread(load_security_context, env)
    policy = context.security_policy
    if settings.evidence == EvidenceKind.VIRTUAL and policy is None:
        policy = virtual_policy
    collateral = CollateralClient.from_certcache(
        session,
        settings.certcache,
        ssl_context=ssl_context or client_ssl_context(settings.ca_bundle),
        timeout=settings.upstream_timeout,
        max_body=settings.max_upstream_body,
    )
    provider = await asyncio.to_thread(
        create_provider,
        settings.evidence,
        context=context,
        state_dir=settings.state_dir / "tee",
        collateral=collateral,
        security_policy=policy,
    )
    arks: list[x509.Certificate] = []
    if settings.evidence == EvidenceKind.VIRTUAL:
        from skr.evidence.virtual import VirtualTee  # already imported by create_provider

        if isinstance(provider, VirtualTee):  # a software TEE's reports chain to its own ARK
            arks.append(provider.ark_certificate)
    return provider, arks, policy


async def build_runtime(
    settings: Settings,
    *,
    env: Mapping[str, str],
    provider: EvidenceProvider | None = None,
    trusted_arks: Sequence[x509.Certificate] = (),
    security_policy: bytes | None = None,
    virtual_policy: bytes | None = None,
) -> Runtime:
    """Create every collaborator. ``provider`` overrides the configured evidence source (local mode);
    ``virtual_policy`` is the launch policy of a configured virtual TEE (:func:`create_evidence_provider`)."""
    await asyncio.to_thread(check_state_tree, settings.state_dir)  # no link anywhere in it (before use)
    metrics = Metrics(__version__)
    connector = aiohttp.TCPConnector(limit=100, ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": settings.user_agent})
    try:
        ssl_ctx = client_ssl_context(settings.ca_bundle)  # one context (CA parsing is ~30 ms per context)
        if provider is None:
            provider, arks, security_policy = await create_evidence_provider(
                settings, session, env, ssl_context=ssl_ctx, virtual_policy=virtual_policy
            )
            trusted_arks = [*trusted_arks, *arks]
        maa = MaaClient(
            session,
            ssl_context=ssl_ctx,
            tee_path=settings.maa_tee_path,
            api_version=settings.maa_api_version,
            user_agent=settings.user_agent,
            timeout=settings.upstream_timeout,
            max_body=settings.max_upstream_body,
        )
        credentials = CredentialFactory(
            env,
            client_id=settings.identity_client_id,
            ca_bundle=settings.ca_bundle,
            max_body=settings.max_upstream_body,
            ssl_context=ssl_ctx,
        )
        local_vaults = [
            ep.authority
            for ep in (settings.akv_endpoint,)
            if ep is not None and not ep.is_azure() and settings.allowlist.explicitly_names(ep)
        ]
        releaser = KeyVaultReleaser(
            credentials=credentials,
            api_version=settings.akv_api_version,
            ca_bundle=settings.ca_bundle,
            allow_insecure_challenge_hosts=[*local_vaults, *_named_non_azure(settings)],
            sdk=SdkSettings(
                connection_timeout=min(5.0, settings.upstream_timeout),
                read_timeout=settings.upstream_timeout,
                max_connections=settings.akv_max_connections,
                max_body=settings.max_upstream_body,
            ),
        )
        trust = TrustStore([settings.ca_bundle] if settings.ca_bundle else [])
        audit = open_audit(settings)
    except BaseException:
        await session.close()
        raise
    service = ReleaseService(
        settings,
        provider=provider,
        maa=maa,
        releaser=releaser,
        trust=trust,
        audit=audit,
        metrics=metrics,
        trusted_arks=trusted_arks,
        security_policy=security_policy,
        token_verifier=TokenVerifier(
            session,
            ssl_context=ssl_ctx,
            timeout=settings.upstream_timeout,
            max_body=settings.max_upstream_body,
            allowlist=settings.allowlist,
        ),
        ambient_identity=lambda: credentials.kind,
    )
    app = create_app(service, metrics)
    checkpointer = None
    if audit is not None:
        checkpointer = Checkpointer(
            audit,
            provider.collect,
            interval=settings.audit_checkpoint_interval,
            every_records=settings.audit_checkpoint_records,
            emit=_echo,
        )
        app[AUDIT_HEAD_KEY] = checkpointer
    return Runtime(
        settings, service, metrics, session, releaser, credentials, audit, app, checkpointer=checkpointer
    )


def _named_non_azure(settings: Settings) -> list[str]:
    """Exact (non-wildcard) allowlist entries outside Azure's domains: local or private vaults."""
    from skr.endpoints import parse_endpoint

    out = []
    for pattern in settings.allowlist.patterns:
        if "*" in pattern:
            continue
        try:
            ep = parse_endpoint(pattern)
        except Exception:  # noqa: S112 - a pattern that is not a plain endpoint names nothing to relax
            continue
        if not ep.is_azure():
            out.append(ep.authority)
    return out


async def start_site(runtime: Runtime) -> tuple[web.AppRunner, int]:
    """Bind the HTTP server; returns the runner and the bound port (useful with port 0)."""
    settings = runtime.settings
    await runtime.start_audit()  # before the first request can be recorded
    # aiohttp waits up to shutdown_timeout for a busy handler, then up to shutdown_timeout again after
    # cancelling its request body, then cancels it: half the grace period each keeps the total the grace
    # period (a handler that already read its body may finish in either half).
    guard = ConnectionGuard(client_timeout=settings.client_timeout, max_connections=settings.max_connections)
    runner = GuardedRunner(
        runtime.app,
        guard=guard,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.grace_period / 2,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    # the bound address, useful with port 0
    return runner, next((int(address[1]) for address in runner.addresses), settings.port)


def announce(settings: Settings, port: int) -> None:
    log.info(
        "skr sidecar listening", extra={"address": f"{settings.host}:{port}", "settings": describe(settings)}
    )
    if settings.allow_remote:
        log.warning("--allow-remote: clients outside the loopback interface are accepted")
    if settings.evidence == EvidenceKind.VIRTUAL:
        log.warning(
            "evidence source is the VIRTUAL TEE: reports are signed by a software key, "
            "nothing is confidential; use only for local development"
        )


def on_signal(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``. Only the main thread can own signals: an embedded daemon (tests,
    another program's thread) is stopped through ``stop`` directly."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve_forever(
    runtime: Runtime,
    stop: asyncio.Event | None = None,
    *,
    first_key: concurrent.futures.Future[WrappingKey] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``), then shut down gracefully. ``first_key``: see
    :meth:`ReleaseService.start`."""
    stop = stop or asyncio.Event()
    on_signal(stop)
    settings = runtime.settings
    runner: web.AppRunner | None = None
    grpc_server: GrpcServer | None = None
    try:
        if settings.server_type != "grpc":
            runner, port = await start_site(runtime)
            announce(settings, port)
        if settings.server_type != "http":
            grpc_server, grpc_port = await start_grpc(runtime)
            announce_grpc(settings, grpc_port)
        await runtime.service.start(first_key)
        if grpc_server is not None:
            await grpc_server.mark_ready()
        await stop.wait()
        log.info(
            "shutting down: finishing in-flight requests", extra={"grace_seconds": settings.grace_period}
        )
    finally:
        if grpc_server is not None:
            await grpc_server.stop(settings.grace_period)
        if runner is not None:
            await runner.cleanup()  # stops accepting, waits for in-flight handlers up to the grace period
        await runtime.aclose()
        log.info("stopped")


async def start_grpc(runtime: Runtime) -> tuple[GrpcServer, int]:
    """Bind the gRPC key provider (optional extra ``grpc``) on the runtime's release service; returns the
    server and its bound port. ``grpc`` alone listens on ``--port`` as the Go sidecar does; ``both`` on
    ``--grpc-port``."""
    settings = runtime.settings
    try:
        from skr.keyprovider.grpc_server import GrpcServer
    except ImportError:
        raise ConfigError(
            f"--server-type {settings.server_type} needs the gRPC packages, which are not installed",
            hint="install skr with its grpc extra: pip install 'skr[grpc]'",
        ) from None
    port = settings.port if settings.server_type == "grpc" else settings.grpc_port
    server = GrpcServer(runtime.service, host=settings.host, port=port)
    return server, await server.start()


def announce_grpc(settings: Settings, port: int) -> None:
    log.info(
        "skr grpc listening",
        extra={"address": f"{settings.host}:{port}", "server_type": settings.server_type},
    )
    if settings.server_type == "grpc":
        announce(settings, port)
