"""Helpers for tests that run skr as real processes: ``skr local`` and ``skr serve`` subprocesses.

Each process writes stdout and stderr to files in a test's directory (no pipes to fill up), is found by
its own pid only, and is SIGKILLed by :meth:`Processes.close` if a test leaves it running.

The usual arrangement: ``skr local --no-sidecar`` runs the local attestation, key and identity services
(with a fault plan), and ``skr serve --evidence virtual`` is the sidecar under test, configured from the
stack's ``local.json`` exactly as a container would be (environment variables), sharing the stack's
state directory so that its virtual TEE is the one the local attestation service trusts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SKR = (sys.executable, "-m", "skr.cli")
START_TIMEOUT = 30.0


@dataclass
class Proc:
    """One skr process and the files its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines the process wrote to stderr (other lines are skipped)."""
        records = []
        for line in self.stderr().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                records.append(doc)
        return records

    def send(self, sig: signal.Signals) -> None:
        if self.running():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def describe(self) -> str:
        return (
            f"{self.name} (pid {self.pid}) stderr:\n{self.stderr()[-4000:]}\nstdout:\n{self.stdout()[-2000:]}"
        )


@dataclass
class Processes:
    """Starts skr processes for one test and makes sure none outlives it."""

    directory: Path
    started: list[Proc] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> Proc:
        self.directory.mkdir(parents=True, exist_ok=True)
        index = len(self.started)
        out = self.directory / f"{index:02d}-{name}.out"
        err = self.directory / f"{index:02d}-{name}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(
                [*SKR, *args],
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env=dict(env if env is not None else clean_env()),
                cwd=cwd,
                preexec_fn=preexec_fn,  # noqa: PLW1509 - resource limits only, set before exec
            )
        proc = Proc(name, popen, out, err)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            if proc.running():
                proc.send(signal.SIGKILL)
                proc.wait(10)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything skr or azure-identity would read, plus ``extra``."""
    drop = ("SKR_", "IDENTITY_", "AZURE_", "MSI_", "IMDS_", "LogLevel", "LogFile", "Port", "SkrSideCarArgs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def wait_until(check: Callable[[], Any], proc: Proc, what: str, timeout: float = START_TIMEOUT) -> Any:
    """Poll ``check`` until it returns something truthy; fail early (with the logs) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if not proc.running():
            raise AssertionError(f"{what}: process exited with {proc.popen.returncode}\n{proc.describe()}")
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s\n{proc.describe()}")


def read_manifest(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / "local.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc


def start_local(
    procs: Processes,
    state_dir: Path,
    *,
    faults: Mapping[str, Any] | None = None,
    sidecar: bool = False,
    args: Sequence[str] = (),
) -> tuple[Proc, dict[str, Any]]:
    """``skr local`` (by default without its own sidecar); returns the process and its ``local.json``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "local.json").unlink(missing_ok=True)
    argv = ["local", "--state-dir", str(state_dir), "--port", "0", *args]
    if faults is not None:
        plan = state_dir.parent / f"{state_dir.name}-faults.json"
        plan.write_text(json.dumps(faults))
        argv += ["--faults", str(plan)]
    if not sidecar:
        argv.append("--no-sidecar")
    proc = procs.spawn("local", argv)
    info = wait_until(lambda: read_manifest(state_dir), proc, "skr local writes local.json")
    return proc, info


def sidecar_env(info: Mapping[str, Any], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a container would give ``skr serve`` to use the local stack described by ``info``."""
    return clean_env({**info["env"], **(extra or {})})


def start_serve(
    procs: Processes,
    state_dir: Path,
    info: Mapping[str, Any],
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready: bool = True,
    cwd: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[Proc, str]:
    """``skr serve --evidence virtual`` on an ephemeral port against the stack; returns (process, base URL).

    Waits for the "listening" log line (for the port) and, with ``ready``, for ``/readyz`` to answer 200.
    """
    argv = ["serve", "--evidence", "virtual", "--state-dir", str(state_dir), "--port", "0", *args]
    proc = procs.spawn("serve", argv, sidecar_env(info, env), cwd=cwd, preexec_fn=preexec_fn)
    address = wait_until(lambda: listening_address(proc), proc, "skr serve logs its address")
    port = int(address.rsplit(":", 1)[1])
    base = f"http://127.0.0.1:{port}"
    if ready:
        wait_until(lambda: http_status(base + "/readyz") == 200, proc, "skr serve becomes ready")
    return proc, base


def listening_address(proc: Proc) -> str | None:
    for record in proc.log_records():
        if record.get("msg") == "skr sidecar listening":
            address: str = record["address"]
            return address
    return None


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET (loopback only), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def skr_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run one skr command to completion (e.g. ``audit verify``)."""
    return subprocess.run(
        [*SKR, *args], capture_output=True, text=True, timeout=timeout, env=clean_env(), check=False
    )
