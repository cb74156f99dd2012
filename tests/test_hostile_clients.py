"""Hostile neighbours get nothing (issue 11, "Local clients" and "Files and process").

- DNS rebinding and cross-site requests: a ``Host`` that is neither loopback nor the listen address, or a
  browser ``Origin`` that is not loopback, is refused with 403 before anything happens;
- slow clients cannot starve the sidecar: a request that does not arrive within ``SKR_CLIENT_TIMEOUT`` is
  closed, at most ``SKR_MAX_CONNECTIONS`` connections are held, and with 300 half-sent requests open
  ``/status`` and a release still answer within a second;
- no symlink is followed for the state directory, anything under it, or ``skr release --out``: refused at
  start with one line (``config_invalid``), and nothing is read, written or chmod-ed through the link;
- no core dumps: a sidecar that has released keys, crashed with SIGABRT while cores are enabled, leaves
  no core file; its open-file limit is raised to the hard limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from skr.config import Settings, load_settings
from skr.errors import ConfigError
from skr.local.faults import FaultRule
from tests.procs import Processes, clean_env, sidecar_env, start_serve
from tests.sidecars import audit_records, extra_sidecar, non_loopback_address

pytestmark = pytest.mark.asyncio(loop_scope="module")

RELEASE = b'{"kid":"demo-oct"}'


async def _request(
    base: str, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


# --- DNS rebinding and cross-site requests ----------------------------------------------------------------


REBOUND_HOSTS = [
    "evil.example",
    "evil.example:{port}",
    "localhost.evil.example:{port}",
    "127.0.0.1.nip.io:{port}",
    "0.0.0.0:{port}",
    "[::]:{port}",
    "10.1.2.3:{port}",
    "localhost:notaport",
    "localhost:{port}/x",
    "user@localhost:{port}",
]


@pytest.mark.parametrize("host", REBOUND_HOSTS)
async def test_a_foreign_host_header_is_refused_before_anything_happens(env, host):
    stack, _ = env
    base = stack.info["sidecar"]
    port = _port(base)
    audit_before = len(audit_records(stack.options.audit_log))
    for method, path, body in [("GET", "/status", None), ("POST", "/key/release", RELEASE)]:
        status, doc = await _request(base, method, path, body, Host=host.format(port=port))
        assert (status, doc["code"]) == (403, "forbidden_host"), doc
        assert host.split(":")[0] not in doc["error"]  # attacker text is never echoed
        assert doc["request_id"]
    assert len(audit_records(stack.options.audit_log)) == audit_before  # no use case ran


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:{port}", "LOCALHOST.:{port}", "127.0.0.1:{port}", "127.9.8.7", "[::1]:{port}"],
)
async def test_loopback_host_headers_are_answered(env, host):
    stack, _ = env
    base = stack.info["sidecar"]
    status, doc = await _request(base, "GET", "/status", Host=host.format(port=_port(base)))
    assert status == 200, doc


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "null",
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io:8080",
        "file://",
    ],
)
async def test_a_cross_site_origin_is_refused(env, origin):
    stack, _ = env
    base = stack.info["sidecar"]
    audit_before = len(audit_records(stack.options.audit_log))
    status, doc = await _request(
        base,
        "POST",
        "/key/release",
        RELEASE,
        Origin=origin,
        **{"Content-Type": "application/x-www-form-urlencoded"},  # what an HTML form or fetch() sends
    )
    assert (status, doc["code"]) == (403, "forbidden_origin"), doc
    assert "key" not in doc
    assert len(audit_records(stack.options.audit_log)) == audit_before


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:8080", "https://[::1]"])
async def test_a_loopback_origin_and_curl_d_still_release(env, origin):
    stack, _ = env
    base = stack.info["sidecar"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # curl -d
    status, doc = await _request(base, "POST", "/key/release", RELEASE, Origin=origin, **form)
    assert status == 200 and "key" in doc, doc
    status, doc = await _request(base, "POST", "/key/release", RELEASE, **form)
    assert status == 200 and "key" in doc, doc


async def test_the_configured_listen_host_and_allow_remote():
    from skr.hostcheck import host_allowed, origin_allowed, split_host

    assert split_host("Sidecar.Internal.:8080") == ("sidecar.internal", 8080)
    assert split_host("[::1]") == ("::1", None)
    assert split_host("[::1") is None and split_host("a b") is None and split_host("x:99999") is None
    # a named listen address is accepted as Host; other names are not, even with --allow-remote
    assert host_allowed("sidecar.internal", listen_host="sidecar.internal", allow_remote=False)
    assert not host_allowed("evil.example", listen_host="sidecar.internal", allow_remote=True)
    # an IPv6 listen address given without brackets
    assert host_allowed("fd00::5", listen_host="fd00::5", allow_remote=False)
    # a wildcard listen address is never a Host; with --allow-remote remote clients use IP literals
    assert not host_allowed("0.0.0.0", listen_host="0.0.0.0", allow_remote=True)
    assert not host_allowed("10.0.0.5", listen_host="0.0.0.0", allow_remote=False)
    assert host_allowed("10.0.0.5", listen_host="0.0.0.0", allow_remote=True)
    assert not origin_allowed("http://evil.example@127.0.0.1")
    assert not origin_allowed("http://127.0.0.1/path")
    assert origin_allowed("http://127.0.0.1")


async def test_a_remote_client_addresses_an_allow_remote_sidecar_by_ip_but_not_by_a_rebound_name(env):
    stack, _ = env
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to act as a remote peer from")
    async with (
        extra_sidecar(stack, host=address, allow_remote=True) as (_, base),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0))) as remote,
    ):
        url = f"http://{address}:{_port(base)}"
        async with remote.post(url + "/key/release", data=RELEASE) as resp:
            assert resp.status == 200, await resp.text()
        async with remote.get(url + "/status", headers={"Host": "rebound.example"}) as resp:
            assert resp.status == 403 and (await resp.json())["code"] == "forbidden_host"


# --- slow clients --------------------------------------------------------------------------------------


async def test_client_limits_default_and_parse():
    assert (Settings().client_timeout, Settings().max_connections) == (10.0, 256)
    settings = load_settings(env={"HOME": "/nonexistent"})
    assert (settings.client_timeout, settings.max_connections) == (10.0, 256)
    settings = load_settings(env={"SKR_CLIENT_TIMEOUT": "2.5", "SKR_MAX_CONNECTIONS": "32"})
    assert (settings.client_timeout, settings.max_connections) == (2.5, 32)
    for bad in ({"SKR_CLIENT_TIMEOUT": "0"}, {"SKR_CLIENT_TIMEOUT": "x"}, {"SKR_MAX_CONNECTIONS": "1.5"}):
        with pytest.raises(ConfigError):
            load_settings(env=bad)


class _Raw:
    """One raw TCP connection to the sidecar."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str, first: bytes = b"") -> _Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
        raw = cls(reader, writer)
        if first:
            writer.write(first)
            await writer.drain()
        return raw

    async def closed_within(self, seconds: float) -> bytes | None:
        """What the server sent before closing, or None if the connection is still open after ``seconds``."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout=seconds)
        except TimeoutError:
            return None
        except ConnectionError:
            return b""

    def close(self) -> None:
        self.writer.close()


@pytest_asyncio.fixture(loop_scope="module")
async def raws() -> AsyncIterator[list[_Raw]]:
    opened: list[_Raw] = []
    yield opened
    for raw in opened:
        raw.close()


HALF_HEADERS = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
HALF_BODY = b'POST /key/release HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"kid"'


async def _timed(base: str, method: str, path: str, body: bytes | None = None) -> tuple[int, float]:
    started = time.monotonic()
    status, _ = await _request(base, method, path, body)
    return status, time.monotonic() - started


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []  # closing slow clients is routine: no "Unhandled exception", no 5xx


async def test_300_half_sent_requests_do_not_starve_status_or_a_release(env, raws, caplog):
    """Default limits (10 s, 256 connections): the 300 slow connections cannot keep a client out."""
    stack, _ = env
    async with extra_sidecar(stack) as (runtime, base):
        assert (runtime.settings.client_timeout, runtime.settings.max_connections) == (10.0, 256)
        status, _ = await _request(base, "POST", "/key/release", RELEASE)  # an attestation token to reuse
        assert status == 200
        for i in range(300):
            raws.append(await _Raw.open(base, HALF_HEADERS if i % 2 else HALF_BODY))
        await asyncio.sleep(0.2)
        status, elapsed = await _timed(base, "GET", "/status")
        assert status == 200 and elapsed < 1.0, elapsed
        status, elapsed = await _timed(base, "POST", "/key/release", RELEASE)
        assert status == 200 and elapsed < 1.0, elapsed
        await asyncio.sleep(0.2)
        closed = [r for r in raws if r.reader.at_eof()]
        # never more than 256 held: the oldest slow connections made room for newer ones and the clients
        assert len(closed) >= 300 - 256, len(closed)
        for raw in raws:
            raw.close()  # before the sidecar stops: its shutdown would wait for the half-sent bodies
    _no_errors_logged(caplog)


async def test_a_request_that_does_not_arrive_within_the_client_timeout_is_closed(env, raws, caplog):
    stack, _ = env
    stack.faults.add(FaultRule("hsm.release", "delay", seconds=1.5, times=1))
    try:
        async with extra_sidecar(stack, client_timeout=0.5) as (_, base):
            status, _ = await _request(base, "POST", "/key/release", RELEASE)  # warm: token cached
            assert status == 200
            silent = await _Raw.open(base)
            half_headers = await _Raw.open(base, HALF_HEADERS)
            half_body = await _Raw.open(base, HALF_BODY)
            trickle = await _Raw.open(base, b"G")
            raws.extend([silent, half_headers, half_body, trickle])
            started = time.monotonic()
            # a complete request whose handler outlasts the client timeout is not cut off
            slow_release = asyncio.create_task(_request(base, "POST", "/key/release", RELEASE))
            for byte in b"ET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n":
                await asyncio.sleep(0.05)  # busy, but never finishing its headers
                if trickle.writer.is_closing():
                    break
                try:
                    trickle.writer.write(bytes([byte]))
                except ConnectionError:
                    break
            for raw in (silent, half_headers, half_body, trickle):
                answer = await raw.closed_within(3.0)
                assert answer is not None, "a slow connection was still open"
                assert b" 200 " not in answer
            assert time.monotonic() - started < 3.0
            status, doc = await slow_release
            assert status == 200 and "key" in doc, doc
    finally:
        stack.faults.clear()
    _no_errors_logged(caplog)


async def test_a_trickled_body_is_cut_off_but_an_idle_keep_alive_connection_is_not(env, raws):
    stack, _ = env
    async with extra_sidecar(stack, client_timeout=0.6) as (_, base):
        # headers at once, then the body one byte at a time: busy, but later than the deadline
        trickle = await _Raw.open(base, HALF_BODY)
        raws.append(trickle)
        started = time.monotonic()
        while time.monotonic() - started < 3.0 and not trickle.reader.at_eof():
            try:
                trickle.writer.write(b" ")
                await trickle.writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.05)
        assert await trickle.closed_within(1.0) is not None
        assert time.monotonic() - started < 2.0

        # a keep-alive connection that delivered its request in time stays open while idle, and is reused
        keep = await _Raw.open(base)
        raws.append(keep)
        for _ in range(2):
            keep.writer.write(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await keep.writer.drain()
            answer = await asyncio.wait_for(keep.reader.readuntil(b'"Status OK"}'), timeout=5)
            assert answer.startswith(b"HTTP/1.1 200 ")
            await asyncio.sleep(1.0)  # idle for longer than the client timeout
            assert not keep.reader.at_eof()


async def test_at_the_cap_busy_connections_are_kept_and_a_newcomer_is_refused(env, raws):
    stack, _ = env
    async with extra_sidecar(stack, max_connections=3) as (_, base):
        status, _ = await _request(base, "POST", "/key/release", RELEASE)  # warm
        assert status == 200
        stack.faults.add(FaultRule("hsm.release", "delay", seconds=1.0, times=3))
        try:
            busy = [asyncio.create_task(_request(base, "POST", "/key/release", RELEASE)) for _ in range(3)]
            await asyncio.sleep(0.4)  # all three are in their handlers, waiting on the vault
            newcomer = await _Raw.open(base, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            raws.append(newcomer)
            assert await newcomer.closed_within(0.5) == b""  # closed at once, nothing answered
            results = await asyncio.gather(*busy)
            assert [status for status, _ in results] == [200, 200, 200]
        finally:
            stack.faults.clear()
        status, _ = await _request(base, "GET", "/status")
        assert status == 200


# --- the process: no core dumps, open-file limit -----------------------------------------------------------


def _enable_cores_and_lower_nofile() -> None:
    """In the child before exec: cores unlimited (as a debugging shell might set) and a small soft NOFILE."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):  # not privileged, and the hard limit is lower: as high as allowed
        hard_core = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard_core, hard_core))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        parts = line[26:].split()
        out[line[:26].strip()] = (parts[0], parts[1])
    return out


def _cores(directory: Path) -> list[Path]:
    return sorted(directory.glob("core*"))


async def test_harden_makes_the_process_not_dumpable():
    from skr.cli import HARDENED_COMMANDS

    code = (
        "from skr.process import harden, is_dumpable; import resource; "
        "assert is_dumpable() is True; harden(); "
        "print(is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE))"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        preexec_fn=_enable_cores_and_lower_nofile,
    )
    assert done.stdout.strip() == "False (0, 0)", done.stderr
    assert {"serve", "local", "release", "keys", "keyprovider", "encfs"} <= HARDENED_COMMANDS


async def test_harden_cuts_the_tls_read_buffer():
    code = (
        "import asyncio.sslproto; from skr.process import harden; "
        "before = asyncio.sslproto.SSLProtocol.max_size; harden(); "
        "print(before, asyncio.sslproto.SSLProtocol.max_size)"
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.stdout.split() == [str(256 * 1024), str(16 * 1024)], done.stderr


async def test_tls_connections_allocate_the_smaller_buffer_and_still_read_large_bodies(ca, monkeypatch):
    """Each TLS connection's read buffer is 16 KiB after the limit, and a 1 MiB answer (many buffers, many
    16 KiB records) still arrives byte for byte."""
    import asyncio.sslproto

    from skr.process import TLS_READ_BUFFER, limit_tls_read_buffer

    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    assert limit_tls_read_buffer() == TLS_READ_BUFFER == 16 * 1024  # one TLS record's plaintext
    assert limit_tls_read_buffer(1 << 20) == TLS_READ_BUFFER  # only ever lowers it
    body = os.urandom(1 << 20)

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/big", big)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_ssl_context(["127.0.0.1"]))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        url = f"https://127.0.0.1:{port}/big"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, ssl=ca.client_ssl_context()) as resp,
        ):
            assert resp.connection is not None and resp.connection.transport is not None
            protocol = resp.connection.transport._ssl_protocol  # type: ignore[attr-defined]
            assert len(protocol._ssl_buffer) == 16 * 1024
            assert await resp.read() == body
    finally:
        await runner.cleanup()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and core_pattern are Linux")
async def test_a_crashed_sidecar_that_released_keys_leaves_no_core_file(env, tmp_path):
    stack, _ = env
    # Control: with these limits, an ordinary Python process that aborts does leave a core here.
    control = tmp_path / "control"
    control.mkdir()
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "import os; os.abort()"],
        cwd=control,
        timeout=60,
        check=False,
        preexec_fn=_enable_cores_and_lower_nofile,
    )
    cores_land_here = bool(_cores(control))
    for core in _cores(control):
        core.unlink()

    cwd = tmp_path / "sidecar"
    cwd.mkdir()
    procs = Processes(tmp_path / "logs")
    try:
        proc, base = await asyncio.to_thread(
            start_serve,
            procs,
            stack.options.state_dir,
            stack.info,
            cwd=cwd,
            preexec_fn=_enable_cores_and_lower_nofile,
        )
        status, doc = await _request(base, "POST", "/key/release", RELEASE)
        assert status == 200 and "key" in doc, doc
        limits = _limits(proc.pid)
        assert limits["Max core file size"] == ("0", "0")
        soft, hard = limits["Max open files"]
        assert soft == hard and int(soft) > 256, limits["Max open files"]
        if os.geteuid() != 0:  # a process that is not dumpable has its /proc entries owned by root
            assert (await asyncio.to_thread(os.stat, f"/proc/{proc.pid}/mem")).st_uid == 0
        proc.send(signal.SIGABRT)
        assert await asyncio.to_thread(proc.wait, 30) == -signal.SIGABRT
        await asyncio.sleep(0.5)
    finally:
        procs.close()
    assert _cores(cwd) == []
    if not cores_land_here:
        pytest.skip(
            "this machine writes no core files to the working directory (core_pattern); limits checked"
        )


# --- no symlink is followed for the state directory or skr release --out --------------------------------


def _skr(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "skr.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _one_line_refusal(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("skr: ")]
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


async def test_release_out_through_a_symlink_is_refused_before_any_release(env, tmp_path):
    stack, _ = env
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = tmp_path / "key.jwk"
    link.symlink_to(victim)
    argv = [
        "release",
        "--kid",
        "demo-oct",
        "--evidence",
        "virtual",
        "--state-dir",
        str(stack.options.state_dir),
    ]
    releases = stack.faults.count("hsm.release")
    done = await asyncio.to_thread(_skr, [*argv, "--out", str(link)], sidecar_env(stack.info))
    _one_line_refusal(done, str(link), "symbolic link")
    assert victim.read_text() == "precious\n" and link.is_symlink()
    done = await asyncio.to_thread(_skr, [*argv, "--out", str(tmp_path)], sidecar_env(stack.info))
    _one_line_refusal(done, "not a regular file")
    assert stack.faults.count("hsm.release") == releases  # nothing was released for a refused output
    # a plain path still works, and so does replacing an earlier output
    out = tmp_path / "real.jwk"
    for _ in range(2):
        done = await asyncio.to_thread(_skr, [*argv, "--out", str(out)], sidecar_env(stack.info))
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(out.lstat().st_mode) == 0o600 and json.loads(out.read_text())["kty"] == "oct"


async def test_a_symlinked_state_directory_or_a_link_inside_it_is_refused_at_start(env, tmp_path):
    stack, _ = env
    link = tmp_path / "state-link"
    link.symlink_to(stack.options.state_dir)
    serve = ["serve", "--evidence", "virtual", "--port", "0", "--state-dir"]
    done = await asyncio.to_thread(_skr, [*serve, str(link)], sidecar_env(stack.info))
    _one_line_refusal(done, str(link), "symbolic link")
    done = await asyncio.to_thread(_skr, ["local", "--port", "0", "--state-dir", str(link)], clean_env())
    _one_line_refusal(done, str(link), "symbolic link")

    # a link planted inside the state directory (here: the virtual TEE's chip seed)
    state = tmp_path / "state"
    (state / "tee").mkdir(parents=True)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 64)
    (state / "tee" / "chip_seed.bin").symlink_to(outside)
    done = await asyncio.to_thread(_skr, [*serve, str(state)], sidecar_env(stack.info))
    _one_line_refusal(done, "chip_seed.bin", "symbolic link")
    done = await asyncio.to_thread(_skr, ["local", "--port", "0", "--state-dir", str(state)], clean_env())
    _one_line_refusal(done, "chip_seed.bin", "symbolic link")
    assert outside.read_bytes() == b"\0" * 64


def _load_tee(state: Path) -> object:
    from skr.evidence.virtual import VirtualTee
    from skr.local.demo import DEMO_SECURITY_POLICY

    return VirtualTee.load_or_create(state, security_policy=DEMO_SECURITY_POLICY)


async def test_the_virtual_tee_never_reads_or_chmods_through_a_link(tmp_path):
    outside = tmp_path / "outside.pem"
    outside.write_text("not yours\n")
    outside.chmod(0o644)
    state = tmp_path / "tee"
    state.mkdir()
    (state / "ark.pem").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"ark\.pem"):
        await asyncio.to_thread(_load_tee, state)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # not tightened to 0600 through the link
    (state / "ark.pem").unlink()
    os.mkfifo(state / "chip_seed.bin")  # a FIFO is refused, not read (reading would block forever)
    with pytest.raises(ConfigError, match=r"chip_seed\.bin"):
        await asyncio.wait_for(asyncio.to_thread(_load_tee, state), timeout=20)


async def test_private_files_are_never_written_or_read_through_a_link(tmp_path):
    from skr.files import read_regular_file, write_private_file

    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    (tmp_path / "file-link").symlink_to(outside)
    with pytest.raises(ConfigError, match="symbolic link"):
        write_private_file(tmp_path / "file-link", b"secret")
    with pytest.raises(ConfigError, match="symbolic link"):
        read_regular_file(tmp_path / "file-link")
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    (tmp_path / "dir-link").symlink_to(real_dir)
    with pytest.raises(ConfigError, match="symbolic link"):
        write_private_file(tmp_path / "dir-link" / "key.pem", b"secret")
    assert outside.read_text() == "keep\n" and list(real_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dir-link",
        "file-link",
        "outside",
        "real",
    ]  # no tmp
    write_private_file(tmp_path / "new" / "key.pem", b"secret")
    assert read_regular_file(tmp_path / "new" / "key.pem") == b"secret"
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "absent")
