"""What ``make bench`` runs against: the local services (in the bench process) and sidecars (``skr serve``
in their own processes), plus the measurements that need process access (readiness, RSS, metrics).

The local services run in this process so the bench can read their fault plan: request counts per route,
the 20 ms network delay switched on and off, and every response's ``Server-Timing: app;dur=…`` (what the
service itself spent). Each sidecar is a separate ``python -m skr.cli serve`` process with the same
environment ``skr local`` gives its clients, so its event loop shares nothing with the load generator.

Never touches anything but 127.0.0.1 and the temporary state directory it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from benchmarks._load import parse_server_timing
from skr.endpoints import parse_endpoint
from skr.local.faults import FaultPlan, FaultRule
from skr.local.stack import LocalStack, StackOptions

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
NETWORK_DELAY = 0.020  # seconds added to every local-service response: a remote cloud
_METRIC_LINE = re.compile(r"^([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$")


# --- the local services -----------------------------------------------------------------------------


class TimingPlan(FaultPlan):
    """A fault plan that also records each local-service response's ``Server-Timing`` ``app`` time.

    The services call :meth:`before` from the task that handles the request; when that task ends, the
    response (with its ``Server-Timing`` header) is its result.
    """

    def __init__(self) -> None:
        super().__init__(seed=1)
        self.service_ms: list[tuple[str, float]] = []

    async def before(self, route: str, request: web.Request) -> web.StreamResponse | None:
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda t: self._record(route, t))
        return await super().before(route, request)

    def _record(self, route: str, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        response = result[0] if isinstance(result, tuple) and result else result
        headers = getattr(response, "headers", None)
        if headers is not None and "Server-Timing" in headers:
            app = parse_server_timing(headers["Server-Timing"]).get("app")
            if app is not None:
                self.service_ms.append((route, app))

    def network_delay(self, seconds: float | None) -> None:
        """Add ``seconds`` to every local-service response (None: remove the delay)."""
        self.clear()
        if seconds:
            self.add(FaultRule(route="*", action="delay", seconds=seconds))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.requests)


async def start_services(state_dir: Path, plan: TimingPlan) -> LocalStack:
    """The local attestation, key and identity services (no sidecar) on ephemeral loopback ports."""
    return await LocalStack.start(
        StackOptions(
            state_dir=state_dir, with_sidecar=False, faults=plan, sidecar_port=0, log_level="warning"
        )
    )


async def real_release(stack: LocalStack, state_dir: Path) -> tuple[str, rsa.RSAPrivateKey, str]:
    """One genuine release from the local key service, with the sidecar's steps: a fresh wrapping key, a
    report from the virtual TEE, an MAA token, then the release (a direct HTTP call). Returns the release
    JWS, the wrapping key and the vault host (for the crypto floor)."""
    from skr.evidence.base import report_data_for
    from skr.evidence.virtual import VirtualTee
    from skr.local.demo import DEMO_SECURITY_POLICY
    from skr.maa.client import MaaClient
    from skr.maa.runtime import WrappingKey
    from skr.upstream import client_ssl_context

    info = stack.info
    tee = await asyncio.to_thread(
        VirtualTee.load_or_create, state_dir / "tee", security_policy=DEMO_SECURITY_POLICY
    )
    key = await asyncio.to_thread(WrappingKey.generate, 2048)
    runtime_data = key.runtime_data()
    evidence = await tee.collect(report_data_for(runtime_data))
    ssl_context = client_ssl_context(Path(info["ca_bundle"]))
    assert stack.identity is not None and stack.key_service is not None
    bearer = stack.identity.issue_token(stack.key_service.resource)["access_token"]
    async with aiohttp.ClientSession() as session:
        token = await MaaClient(session, ssl_context=ssl_context).attest(
            parse_endpoint(info["attestation_url"]), evidence, runtime_data
        )
        async with session.post(
            f"{info['key_vault_url']}/keys/demo-oct/release?api-version=7.4",
            json={"target": token, "enc": "CKM_RSA_AES_KEY_WRAP"},
            headers={"Authorization": f"Bearer {bearer}"},
            ssl=ssl_context,
        ) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"the local key service refused the floor release: {resp.status} {body}")
    return str(body["value"]), key.private_key, LOOPBACK


# --- sidecars ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def serve_command(state_dir: Path, port: int, audit_log: Path, *extra: str) -> list[str]:
    """``skr serve`` on the virtual TEE kept in ``state_dir`` (the one the local attestation service
    trusts), quiet logs, its own audit log."""
    return [
        sys.executable,
        "-m",
        "skr.cli",
        "serve",
        "--evidence",
        "virtual",
        "--state-dir",
        str(state_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--audit-log",
        str(audit_log),
        *extra,
    ]


async def _http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A one-shot ``GET`` on a fresh connection (cheap enough to poll readiness every few ms)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head[9:12] or 0), body


@dataclass
class Sidecar:
    """One ``skr serve`` process; :meth:`stop` ends it."""

    name: str
    process: asyncio.subprocess.Process
    port: int
    log_path: Path
    started: float
    ready_after: float | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @classmethod
    async def start(
        cls,
        name: str,
        state_dir: Path,
        *,
        env: dict[str, str],
        token_reuse: bool = True,
        audit_dir: Path | None = None,
    ) -> Sidecar:
        port = free_port()
        audit_log = (audit_dir or state_dir) / f"audit-{name}.jsonl"
        args = serve_command(state_dir, port, audit_log, "--token-reuse", "on" if token_reuse else "off")
        log_path = state_dir / f"sidecar-{name}.log"
        log = log_path.open("wb")
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *args, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        return cls(name, process, port, log_path, started, _log=log)

    async def wait_ready(self, timeout: float = 30.0) -> float:
        """Seconds from process start to the first 200 on ``/readyz`` (polled every 2 ms)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"sidecar {self.name} exited: {self.log_tail()}")
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                status, _ = await _http_get(self.port, "/readyz")
                if status == 200:
                    self.ready_after = time.perf_counter() - self.started
                    return self.ready_after
            await asyncio.sleep(0.002)
        raise RuntimeError(f"sidecar {self.name} not ready after {timeout:g} s: {self.log_tail()}")

    def rss_mib(self) -> float:
        """Resident set size of the sidecar process (VmRSS), MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc/<pid>/status")

    def cpu_seconds(self) -> float:
        """User + system CPU time the sidecar process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def metrics(self) -> dict[str, float]:
        """The sidecar's Prometheus counters as ``{"name{labels}": value}``."""
        status, body = await _http_get(self.port, "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            match = _METRIC_LINE.match(line)
            if match:
                out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
        return out

    def log_tail(self, lines: int = 8) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def sidecar_env(stack: LocalStack) -> dict[str, str]:
    """The process environment for ``skr serve`` against the local services (what ``local.json`` lists)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKR_", "AZURE_"))}
    env.update(stack.info["env"])
    env["PYTHONPATH"] = str(REPO)
    return env
