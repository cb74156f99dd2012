"""``make soak``: many releases against ``skr serve`` on the local stack with transient faults injected.

What it proves (each a target; the exit status is non-zero when one is missed):

- zero failed releases: every ``POST /key/release`` answers 200 with a JWK, although the local attestation
  and key services answer a seeded share of requests (default 5 %) with ``503`` — faults the sidecar's
  retry budget absorbs;
- memory does not grow: the sidecar's resident set (``VmRSS``) after the run is less than 10 % above
  what it was after the warm-up;
- no file descriptors leak: the sidecar's open descriptors after the run are not more than after the
  warm-up (both counted the same way: load generator disconnected, a short settle);
- the audit log verifies (``skr.audit.verify_chain``) and holds exactly one granted ``key.release`` record
  for every 200 the load generator saw.

The local services run in this process (so their fault plan can be read); the sidecar is a separate
``python -m skr.cli serve`` process, so its RSS and descriptors are its own. Loopback only; bounded by
``--releases`` and a wall-clock ``--timeout``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks._harness import LOOPBACK, free_port, serve_command, sidecar_env
from skr.audit import chain_files, read_records, verify_chain
from skr.local.claims import TOKEN_LIFETIME
from skr.local.faults import FaultPlan, FaultRule
from skr.local.stack import LocalStack, StackOptions

REPO = Path(__file__).resolve().parent.parent
FAULT_ROUTES = ("maa.attest", "hsm.release")


@dataclass
class Phase:
    """What one load phase saw."""

    name: str
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def granted(self) -> int:
        return self.statuses[200]

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# --- the sidecar process ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """``VmRSS`` of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class SidecarProcess:
    """``skr serve`` wired to the local services, in its own process."""

    def __init__(self, stack: LocalStack, state_dir: Path, *, token_refresh: float) -> None:
        self.port = free_port()
        self.audit_log = state_dir / "audit.jsonl"
        self.log_path = state_dir / "sidecar.log"
        env = sidecar_env(stack)
        # Re-attest every ``token_refresh`` seconds (instead of once per 8-hour token), so attestation,
        # its faults, wrapping-key generation and token-cache replacement are soaked too.
        env["SKR_TOKEN_MARGIN"] = str(TOKEN_LIFETIME - token_refresh)
        self._env = env
        self._args = serve_command(stack.options.state_dir, self.port, self.audit_log)
        self.process: asyncio.subprocess.Process | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, timeout: float = 60.0) -> None:
        self._log = self.log_path.open("wb")
        self.process = await asyncio.create_subprocess_exec(
            *self._args, env=self._env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(
                        f"the sidecar exited with {self.process.returncode}: {self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the sidecar was not ready after {timeout:g} s: {self.log_tail()}")

    async def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish, audit log flushed); SIGKILL after ``grace``."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def log_tail(self, lines: int = 6) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --- load -----------------------------------------------------------------------------------------------


async def run_phase(
    name: str, url: str, keys: list[str], *, count: int, concurrency: int, timeout: float
) -> Phase:
    """``count`` releases by ``concurrency`` workers on one keep-alive connection pool, then disconnect."""
    phase = Phase(name)
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            kid = keys[index % len(keys)]
            started = time.perf_counter()
            try:
                async with session.post(url + "/key/release", json={"kid": kid}) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                phase.statuses[0] += 1
                phase.failures.append(f"{kid}: {type(exc).__name__}: {exc}")
                continue
            phase.latencies.append(time.perf_counter() - started)
            phase.statuses[status] += 1
            if len(phase.latencies) % 1000 == 0:  # a sign of life on long runs
                print(f"  {name}: {len(phase.latencies)}/{count} answered", file=sys.stderr, flush=True)
            if status != 200:
                phase.failures.append(f"{kid}: HTTP {status}: {body[:200]!r}")
            elif not _is_jwk_answer(body):
                phase.statuses[200] -= 1
                phase.statuses[-1] += 1
                phase.failures.append(f"{kid}: HTTP 200 without a JWK")

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    phase.seconds = time.perf_counter() - started
    phase.requests = count
    return phase


def _is_jwk_answer(body: bytes) -> bool:
    try:
        jwk = json.loads(json.loads(body)["key"])
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(jwk, dict) and jwk.get("kty") in ("oct", "RSA", "EC")


async def settled_fds(pid: int, settle: float) -> int:
    """Descriptors once the load generator has disconnected and the sidecar has noticed."""
    await asyncio.sleep(settle)
    return fd_count(pid)


# --- the run --------------------------------------------------------------------------------------------


@dataclass
class Result:
    targets: dict[str, tuple[bool, str]]
    lines: list[str]

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.targets.values())


async def soak(args: argparse.Namespace, state_dir: Path) -> Result:
    plan = FaultPlan(
        [FaultRule(route, "status", status=503, rate=args.fault_rate) for route in FAULT_ROUTES],
        seed=args.seed,
    )
    stack = await LocalStack.start(
        StackOptions(state_dir=state_dir / "services", with_sidecar=False, faults=plan, log_level="warning")
    )
    sidecar = SidecarProcess(stack, state_dir, token_refresh=args.token_refresh)
    try:
        await sidecar.start()
        keys = list(stack.info["keys"]["granted"])
        rss_start = rss_kib(sidecar.pid)
        conc, limit = args.concurrency, args.request_timeout
        warm = await run_phase(
            "warm-up", sidecar.url, keys, count=args.warmup, concurrency=conc, timeout=limit
        )
        rss_warm, fds_warm = rss_kib(sidecar.pid), await settled_fds(sidecar.pid, args.settle)
        samples: list[int] = []

        async def sample_rss() -> None:
            while True:
                samples.append(rss_kib(sidecar.pid))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_rss())
        try:
            main = await asyncio.wait_for(
                run_phase("soak", sidecar.url, keys, count=args.releases, concurrency=conc, timeout=limit),
                args.timeout,
            )
        finally:
            sampler.cancel()
        rss_end, fds_end = rss_kib(sidecar.pid), await settled_fds(sidecar.pid, args.settle)
        metrics = await _metrics(sidecar.url)
        exit_code = await sidecar.stop()
    finally:
        await sidecar.stop()
        await stack.stop()

    files = chain_files(sidecar.audit_log)
    verified = verify_chain(files)
    granted_records = sum(
        1 for r in read_records(files) if r.get("event") == "key.release" and r.get("outcome") == "granted"
    )
    seen_granted = warm.granted + main.granted
    growth = (rss_end - rss_warm) / rss_warm
    injected = {
        route: sum(n for k, n in plan.injected.items() if k.startswith(route + ":")) for route in FAULT_ROUTES
    }
    upstream = {route: plan.count(route) for route in FAULT_ROUTES}

    targets = {
        "zero failed releases": (
            main.granted == args.releases and warm.granted == args.warmup,
            f"{main.granted}/{args.releases} granted (warm-up {warm.granted}/{args.warmup})",
        ),
        "RSS growth < 10 %": (growth < args.rss_limit, f"{growth * 100:+.2f} % ({rss_warm} → {rss_end} KiB)"),
        "no fd growth": (fds_end <= fds_warm, f"{fds_warm} → {fds_end} open descriptors"),
        "audit log verifies": (
            verified.intact and granted_records == seen_granted,
            f"{verified.records} records intact={verified.intact}; "
            f"{granted_records} granted key.release records for {seen_granted} granted answers"
            + (f"; {verified.finding}" if verified.finding else ""),
        ),
        "clean shutdown": (exit_code == 0, f"sidecar exit status {exit_code}"),
    }
    rate = main.requests / main.seconds if main.seconds else 0.0
    lines = [
        f"skr soak: {args.releases} releases at concurrency {args.concurrency} "
        f"(+{args.warmup} warm-up), keys {', '.join(keys)}",
        f"attestation token reused for {args.token_refresh:g} s; "
        f"faults: {args.fault_rate * 100:g} % HTTP 503 on {', '.join(FAULT_ROUTES)} (seed {args.seed}); "
        + ", ".join(f"{r}: {injected[r]} injected / {upstream[r]} requests" for r in FAULT_ROUTES),
        f"time: {main.seconds:.1f} s, {rate:.0f} releases/s; latency p50 {main.percentile(0.5):.1f} ms, "
        f"p99 {main.percentile(0.99):.1f} ms, max {main.percentile(1.0):.1f} ms",
        f"answers: {dict(sorted(main.statuses.items()))}; sidecar metrics: "
        + ", ".join(f"{k}={v:g}" for k, v in sorted(metrics.items())),
        f"RSS KiB: start {rss_start}, after warm-up {rss_warm}, "
        f"peak during soak {max(samples, default=rss_end)}, end {rss_end}",
    ]
    for failure in (warm.failures + main.failures)[:5]:
        lines.append(f"  failure: {failure}")
    return Result(targets, lines)


async def _metrics(url: str) -> dict[str, float]:
    wanted = ("skr_key_releases_total", "skr_attestations_total", "skr_token_cache_total")
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(wanted):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--releases", type=int, default=10_000, help="measured releases (default 10000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument(
        "--warmup", type=int, default=1000, help="releases before the baseline (default 1000)"
    )
    parser.add_argument(
        "--fault-rate", type=float, default=0.05, help="share of 503s per route (default 0.05)"
    )
    parser.add_argument("--seed", type=int, default=7, help="fault plan seed (default 7)")
    parser.add_argument(
        "--token-refresh", type=float, default=2.0, help="seconds an attestation token is reused (default 2)"
    )
    parser.add_argument("--rss-limit", type=float, default=0.10, help="allowed RSS growth (default 0.10)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before counting descriptors")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per release")
    parser.add_argument("--timeout", type=float, default=1800.0, help="wall-clock limit of the soak phase")
    parser.add_argument("--state-dir", type=Path, default=None, help="keep state here (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        state_dir = args.state_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="skr-soak-"))
        )
        state_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        result = asyncio.run(soak(args, state_dir))
    for line in result.lines:
        print(line)
    for name, (ok, detail) in result.targets.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    print(f"soak {'passed' if result.ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
