"""Load generators for ``make bench``: an aiohttp client for ``/key/release`` and a lean raw-HTTP client
for ``/status`` that runs in its own processes.

The ``/status`` client speaks just enough HTTP/1.1 (keep-alive, ``Content-Length`` bodies) to keep 32
requests in flight with a few microseconds of Python per request, so the sidecar, not the load generator,
is what gets measured. Run it as ``python -m benchmarks._load status --port P ...``; it prints one JSON
line with what it counted.

Never talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

LOOPBACK = "127.0.0.1"
_CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)
_TIMING = re.compile(r"(\w+);dur=([0-9.]+)")


# --- /key/release ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSample:
    """One ``/key/release`` as the client saw it, with the sidecar's own ``Server-Timing`` split."""

    status: int
    client_ms: float
    upstream_ms: float | None
    app_ms: float | None
    total_ms: float | None


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``upstream;dur=1.2, app;dur=0.8`` → ``{"upstream": 1.2, "app": 0.8}``."""
    return {name: float(dur) for name, dur in _TIMING.findall(value or "")}


class ReleaseClient:
    """Sends ``/key/release`` for one key to one sidecar, sequentially or with N workers."""

    def __init__(self, base_url: str, kid: str, *, connections: int = 128) -> None:
        self.url = f"{base_url}/key/release"
        self.body = json.dumps({"kid": kid}).encode()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def release(self) -> ReleaseSample:
        started = time.perf_counter()
        try:
            async with self._session.post(
                self.url, data=self.body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                timing = parse_server_timing(resp.headers.get("Server-Timing"))
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status, timing = 0, {}
        return ReleaseSample(
            status=status,
            client_ms=(time.perf_counter() - started) * 1000,
            upstream_ms=timing.get("upstream"),
            app_ms=timing.get("app"),
            total_ms=timing.get("total"),
        )

    async def sequential(
        self, count: int, *, pause: float = 0.0, each: Callable[[ReleaseSample], None] | None = None
    ) -> list[ReleaseSample]:
        """``count`` releases one after the other, ``pause`` seconds apart."""
        samples = []
        for _ in range(count):
            sample = await self.release()
            samples.append(sample)
            if each is not None:
                each(sample)
            if pause:
                await asyncio.sleep(pause)
        return samples

    async def concurrent(
        self, count: int, concurrency: int, *, progress: Callable[[int], None] | None = None
    ) -> tuple[list[ReleaseSample], float]:
        """``count`` releases from ``concurrency`` closed-loop workers; returns samples and wall seconds."""
        samples: list[ReleaseSample] = []
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                samples.append(await self.release())
                if progress is not None:
                    progress(len(samples))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, time.perf_counter() - started


# --- /status (raw HTTP, separate processes) -------------------------------------------------------------


@dataclass
class _Tally:
    warmup_until: float
    stop_at: float
    count: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


class _StatusConnection(asyncio.Protocol):
    """One keep-alive connection sending ``GET /status`` again as soon as the previous answer is in."""

    def __init__(self, request: bytes, tally: _Tally, done: asyncio.Future[None]) -> None:
        self._request = request
        self._tally = tally
        self._done = done
        self._buffer = b""
        self._sent = 0.0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        self._sent = time.perf_counter()
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = _CONTENT_LENGTH.search(self._buffer, 0, end)
        size = end + 4 + (int(length.group(1)) if length else 0)
        if len(self._buffer) < size:
            return
        status, self._buffer = self._buffer[9:12], self._buffer[size:]
        now = time.perf_counter()
        tally = self._tally
        if now >= tally.warmup_until:
            tally.count += 1
            tally.errors += status != b"200"
            tally.latencies.append(now - self._sent)
        if now < tally.stop_at:
            self._send()
        else:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self._tally.errors += exc is not None
        self._finish()

    def _finish(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        if not self._done.done():
            self._done.set_result(None)


async def status_load(port: int, connections: int, seconds: float, warmup: float) -> dict[str, object]:
    """Keep ``connections`` requests in flight for ``warmup + seconds``; count only after the warm-up."""
    loop = asyncio.get_running_loop()
    request = f"GET /status HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode()
    start = time.perf_counter()
    tally = _Tally(warmup_until=start + warmup, stop_at=start + warmup + seconds)
    finished: list[asyncio.Future[None]] = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda done=done: _StatusConnection(request, tally, done),  # type: ignore[misc]
            LOOPBACK,
            port,
        )
        finished.append(done)
    await asyncio.gather(*finished)
    window = max(time.perf_counter() - tally.warmup_until, 1e-9)
    tally.latencies.sort()
    step = max(len(tally.latencies) // 2000, 1)
    return {
        "count": tally.count,
        "errors": tally.errors,
        "window": window,
        "latencies": tally.latencies[::step],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._load")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="GET /status at a fixed concurrency; prints one JSON line")
    status.add_argument("--port", type=int, required=True)
    status.add_argument("--connections", type=int, default=16)
    status.add_argument("--seconds", type=float, default=3.0)
    status.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args(argv)
    result = asyncio.run(status_load(args.port, args.connections, args.seconds, args.warmup))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
