"""``skr encfs`` as a process: release keys through skr's own release path, mount everything, report
readiness (``/healthz``, ``/readyz``, ``--ready-file``), and tear down on SIGTERM / SIGINT.

The key release is :meth:`skr.service.ReleaseService.release` — the same evidence, MAA, allowlist,
deadline and audit log as ``/key/release``, recorded as ``event: "encfs.mount"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from skr.config import Settings
from skr.encfs.args import EncfsArgs, FilesystemSpec
from skr.encfs.errors import EncfsConfigError
from skr.encfs.mount import EncfsMounter, KeySource, Options
from skr.encfs.system import System, has_device_mapper
from skr.service import ReleaseService, RequestContext

log = logging.getLogger("skr.encfs")

BACKENDS = ("auto", "dm-crypt", "userspace")


def base_settings(args: EncfsArgs, env: Mapping[str, str]) -> Settings:
    """The release settings ``azure_info`` implies (``identity.client_id``, ``certcache``), before flags
    and environment variables (``load_settings(..., base=...)``) override them."""
    from dataclasses import fields

    from skr.config import CertCacheConfig, default_state_dir

    changes: dict[str, Any] = {}
    if args.client_id:
        changes["identity_client_id"] = args.client_id
    if args.certcache:
        known = {f.name for f in fields(CertCacheConfig)}
        changes["certcache"] = CertCacheConfig(**{k: str(v) for k, v in args.certcache.items() if k in known})
    return Settings(state_dir=default_state_dir(env)).with_(**changes)


def resolve_backend(name: str, *, proc_misc: Path = Path("/proc/misc")) -> str:
    """``auto``: dm-crypt when the kernel has device-mapper (``/proc/misc`` says), else userspace."""
    if name not in BACKENDS:
        raise EncfsConfigError(f"--backend must be one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    return "dm-crypt" if has_device_mapper(proc_misc) else "userspace"


def service_key_source(service: ReleaseService) -> KeySource:
    """Keys through the release use case, audited as ``encfs.mount``."""

    async def release(spec: FilesystemSpec) -> str:
        assert spec.key is not None
        result = await service.release(
            kid=spec.key.kid,
            maa_endpoint=spec.key.maa_endpoint or None,
            akv_endpoint=spec.key.akv_endpoint or None,
            access_token=None,
            ctx=RequestContext(request_id=uuid.uuid4().hex, client="encfs"),
            event="encfs.mount",
            audit_fields={"note": f"filesystem {spec.index} at {spec.mount_point}"},
        )
        return result.key_json

    return release


def health_app(mounter: EncfsMounter) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        body = {"ready": mounter.ready, "filesystems": dict(mounter.state)}
        return web.json_response(body, status=200 if mounter.ready else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _write_ready(path: Path | None, ok: bool) -> None:
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("1\n" if ok else "0\n")
        tmp.replace(path)


async def serve_encfs(
    mounter: EncfsMounter,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready_file: Path | None = None,
    started: asyncio.Future[int] | None = None,
) -> None:
    """Mount, publish, wait for ``stop``, tear down. ``started`` gets the health port once listening."""
    runner: web.AppRunner | None = None
    published = False
    try:
        if port is not None:
            runner = web.AppRunner(health_app(mounter), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else port
            log.info("encfs health endpoints listening", extra={"address": f"{host}:{bound}"})
            if started is not None and not started.done():
                started.set_result(int(bound))
        mounting = asyncio.ensure_future(mounter.mount_all())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({mounting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not mounting.done():
            log.info("stop requested while mounting: tearing down")
            mounting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await mounting
            return
        stopping.cancel()
        if mounting.exception() is not None:
            _write_ready(ready_file, False)
            mounting.result()
        _write_ready(ready_file, True)
        published = True
        log.info("all %d filesystems published", len(mounter.args.filesystems))
        await stop.wait()
        log.info("stopping: unmounting")
    finally:
        await mounter.teardown()
        if ready_file is not None and published:  # a failure leaves its 0 for whoever watches the file
            with contextlib.suppress(OSError):
                await asyncio.to_thread(ready_file.unlink)
        if runner is not None:
            await runner.cleanup()


async def run_encfs(
    settings: Settings,
    args: EncfsArgs,
    options: Options,
    *,
    env: Mapping[str, str],
    stop: asyncio.Event,
    port: int | None,
    ready_file: Path | None,
    **runtime_options: Any,
) -> None:
    """The whole ``skr encfs`` run with a fresh release runtime (``build_runtime``)."""
    from skr.daemon import build_runtime, on_signal

    on_signal(stop)
    runtime = await build_runtime(settings, env=env, **runtime_options)
    try:
        mounter = EncfsMounter(args, options, key_source=service_key_source(runtime.service), system=System())
        await serve_encfs(mounter, stop, host=settings.host, port=port, ready_file=ready_file)
    finally:
        await runtime.aclose()
