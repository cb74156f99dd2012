"""The daemon commands as real processes: ``skr local``, ``skr release``, ``skr doctor``, ``skr serve``.

Every test runs ``python -m skr.cli`` in a subprocess on loopback, waits for it with a bound, and kills it
in ``finally``. The local stacks start from a copy of one state directory generated once per session
(the virtual TEE's RSA-4096 keys are the slow part), so each stack is fresh but starts in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from skr.cli import COMMAND_MODULES, build_parser, main

SKR = [sys.executable, "-m", "skr.cli"]
TEMPLATE = "skr-local-template"
MANIFEST_KEYS = {
    "sidecar",
    "maa_endpoint",
    "akv_endpoint",
    "attestation_url",
    "key_vault_url",
    "identity_endpoint",
    "ca_bundle",
    "tenant_id",
    "host_data",
    "keys",
    "env",
}
CLIENT_ENV = {
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "SKR_CA_BUNDLE",
    "SKR_MAA_ENDPOINT",
    "SKR_AKV_ENDPOINT",
    "SKR_ALLOWED_ENDPOINTS",
}
# Settings the outer environment could leak into a subprocess (skr's own and the Go sidecar's names, and
# what the Azure identity SDK reads).
_LEAKY_PREFIXES = ("SKR_", "IDENTITY_", "MSI_", "AZURE_", "IMDS_", "UVM_", "SkrSideCarArgs")
_LEAKY_NAMES = {"Port", "LogLevel", "LogFile"}


# --- helpers (also used by tests/test_examples.py) -----------------------------------------------------


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any skr/identity setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES) and k not in _LEAKY_NAMES}
    env.update(extra or {})
    return env


class Proc:
    """A subprocess whose output is collected by reader threads, so every wait has a bound."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.popen.poll() is not None:
                time.sleep(0.2)  # let the readers drain
                pytest.fail(
                    f"{what}: the process exited {self.popen.returncode}\n{self.stdout}\n{self.stderr}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout} s\n{self.stdout}\n{self.stderr}")
            time.sleep(0.05)

    def stop(self, sig: signal.Signals, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait (bounded) for the exit code."""
        self.popen.send_signal(sig)
        rc = self.popen.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def run(argv: list[str], env: Mapping[str, str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)


def _make_template(path: Path) -> None:
    """Generate a local-mode state directory once (CA, virtual TEE, service keys, demo keys)."""
    if (path / "local.json").is_file():
        return
    proc = Proc([*SKR, "local", "--port", "0", "--no-sidecar", "--state-dir", str(path)], clean_env())
    try:
        proc.wait_for((path / "local.json").is_file, "template stack start", timeout=60)
        assert proc.stop(signal.SIGINT) == 0, proc.stderr
    finally:
        proc.kill()


def fresh_state(factory: pytest.TempPathFactory, name: str) -> Path:
    """A state directory of its own for one local stack, copied from the session's template."""
    template = factory.getbasetemp() / TEMPLATE
    _make_template(template)
    target = factory.mktemp(name)
    shutil.copytree(template, target, dirs_exist_ok=True)
    (target / "local.json").unlink()
    return target


def start_local(state: Path) -> Proc:
    """``skr local --port 0`` in ``state``; returns once it printed its banner."""
    proc = Proc([*SKR, "local", "--port", "0", "--state-dir", str(state)], clean_env())
    try:
        proc.wait_for(lambda: "Ctrl-C stops everything" in proc.stdout, "skr local start")
    except BaseException:
        proc.kill()
        raise
    return proc


def http(url: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """GET (or POST ``body`` as JSON) on loopback, never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=20) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# --- a running stack shared by the release / doctor / serve tests --------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from local_stack(tmp_path_factory, "daemon-stack")


def local_stack(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[dict[str, Any]]:
    """A running ``skr local`` process on a copy of the prepared state: local.json plus ``state_dir``;
    stopped with SIGINT (which must exit 0) afterwards."""
    state = fresh_state(tmp_path_factory, name)
    proc = start_local(state)
    try:
        info: dict[str, Any] = json.loads((state / "local.json").read_text())
        info["state_dir"] = str(state)
        yield info
        assert proc.stop(signal.SIGINT) == 0, proc.stderr
    finally:
        proc.kill()


def stack_env(stack: dict[str, Any], **extra: str) -> dict[str, str]:
    """What a process needs to use the stack: the ``env`` block of local.json."""
    return clean_env({**stack["env"], **extra})


def virtual(stack: dict[str, Any]) -> list[str]:
    """Evidence from the stack's own virtual TEE (STATE_DIR/tee), hence the same HOST_DATA."""
    return ["--evidence", "virtual", "--state-dir", stack["state_dir"]]


# --- skr local ------------------------------------------------------------------------------------------


def test_local_writes_its_manifest_prints_a_working_curl_and_stops_on_sigint(tmp_path_factory):
    state = fresh_state(tmp_path_factory, "local-cli")
    proc = start_local(state)
    try:
        manifest = state / "local.json"
        info = json.loads(manifest.read_text())
        assert set(info) >= MANIFEST_KEYS
        assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
        assert set(info["env"]) == CLIENT_ENV
        assert {"demo-oct", "demo-rsa", "demo-ec"} <= set(info["keys"]["granted"])
        assert info["keys"]["denied"] == ["demo-denied"]
        assert len(bytes.fromhex(info["host_data"])) == 32
        assert Path(info["ca_bundle"]).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        assert f"sidecar          {info['sidecar']}" in proc.stdout
        assert f"HOST_DATA        {info['host_data']}" in proc.stdout

        curl_line = next(line.strip() for line in proc.out if line.strip().startswith("curl "))
        argv = shlex.split(curl_line)
        assert argv[:2] == ["curl", "-s"] and argv[2] == f"{info['sidecar']}/key/release"
        body = json.loads(argv[argv.index("-d") + 1])
        assert body == {"kid": "demo-oct"}
        if shutil.which("curl"):  # run the printed line itself
            done = run([*argv, "--noproxy", "*", "--max-time", "20"], clean_env())
            released = json.loads(done.stdout)
        else:
            status, released = http(argv[2], body)
            assert status == 200
        jwk = json.loads(released["key"])
        assert jwk["kty"] == "oct" and len(jwk["k"]) == 43  # 32 bytes, base64url

        assert proc.stop(signal.SIGINT) == 0
        assert "skr local stopped" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        proc.kill()


# --- skr release --------------------------------------------------------------------------------------


def test_release_writes_the_jwk_0600_with_the_stacks_tee(stack, tmp_path):
    out = tmp_path / "demo-oct.jwk"
    done = run([*SKR, "release", "--kid", "demo-oct", "--out", str(out), *virtual(stack)], stack_env(stack))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    jwk = json.loads(out.read_text())
    assert jwk["kty"] == "oct" and "decrypt" in jwk["key_ops"]
    # the same key the stack's sidecar releases: the release policy (bound to the stack's HOST_DATA)
    # accepted this process's evidence, so its virtual TEE is the stack's
    status, body = http(stack["sidecar"] + "/key/release", {"kid": "demo-oct"})
    assert status == 200 and json.loads(body["key"])["k"] == jwk["k"]
    assert done.stdout == ""
    assert jwk["k"] not in done.stderr and f"released demo-oct to {out}" in done.stderr


def test_release_of_a_denied_key_is_one_line_naming_the_claim(stack, tmp_path):
    out = tmp_path / "denied.jwk"
    done = run(
        [*SKR, "release", "--kid", "demo-denied", "--out", str(out), *virtual(stack)], stack_env(stack)
    )
    assert done.returncode == 1  # a denial is a negative verdict, not unusable input
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "Traceback" not in done.stderr
    error = one_line("\n".join(line for line in done.stderr.splitlines() if line.startswith("skr: ")))
    assert "x-ms-sevsnpvm-hostdata" in error and stack["host_data"] in error
    assert "refused to release demo-denied" in error


# --- skr doctor ---------------------------------------------------------------------------------------


def test_doctor_passes_against_the_running_stack(stack):
    done = run([*SKR, "doctor", *virtual(stack)], stack_env(stack))
    assert done.returncode == 0, done.stdout + done.stderr
    checks = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(checks) >= 6 and all(line.startswith("[ok  ]") for line in checks), done.stdout
    names = {line[7:].split(":")[0] for line in checks}
    assert {"evidence source", "report and AMD chain", "policy hash", "attestation endpoint"} <= names
    assert {"key vault endpoint", "identity token"} <= names
    assert f"HOST_DATA {stack['host_data']}" in done.stdout
    assert f"{len(checks)} of {len(checks)} checks passed" in done.stdout


def test_doctor_names_an_unreachable_attestation_endpoint_and_the_fix(stack):
    dead = f"127.0.0.1:{closed_port()}"
    env = stack_env(
        stack,
        SKR_MAA_ENDPOINT=dead,
        SKR_ALLOWED_ENDPOINTS=f"{stack['env']['SKR_ALLOWED_ENDPOINTS']},{dead}",
    )
    done = run([*SKR, "doctor", *virtual(stack)], env)
    assert done.returncode == 1, done.stdout
    lines = done.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("[FAIL]")]
    assert len(failed) == 1 and lines[failed[0]].startswith(
        f"[FAIL] attestation endpoint: {dead} unreachable"
    )
    assert lines[failed[0] + 1].strip().startswith("fix: ")
    assert "Traceback" not in done.stderr


def test_doctor_names_an_endpoint_outside_the_allowlist(stack):
    dead = f"127.0.0.1:{closed_port()}"
    done = run([*SKR, "doctor", *virtual(stack)], stack_env(stack, SKR_MAA_ENDPOINT=dead))
    assert done.returncode == 1
    assert f"[FAIL] attestation endpoint: {dead} is not in the endpoint allowlist" in done.stdout
    assert "fix: add it to SKR_ALLOWED_ENDPOINTS" in done.stdout


# --- skr serve ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        pytest.param(["--port", "abc"], {}, "invalid int value: 'abc'", id="port-flag"),
        pytest.param([], {"Port": "abc"}, "port must be a port number", id="port-env"),
        pytest.param([], {"SkrSideCarArgs": "notbase64"}, "SkrSideCarArgs is not base64", id="sidecar-args"),
        pytest.param([], {"SKR_MAA_ENDPOINT": "https://"}, "SKR_MAA_ENDPOINT", id="maa-endpoint"),
        pytest.param(["--log-level", "loud"], {}, "log level must be one of", id="log-level"),
        pytest.param(["--evidence", "magic"], {}, "invalid choice: 'magic'", id="evidence"),
    ],
)
def test_serve_with_bad_config_says_one_line_and_exits_non_zero(argv, env, says):
    done = run([*SKR, "serve", *argv], clean_env(env))
    assert done.returncode == 2
    assert says in one_line(done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""


def _listening_address(proc: Proc) -> str:
    def address() -> str | None:
        for line in proc.err:
            if '"skr sidecar listening"' in line:
                return str(json.loads(line)["address"])
        return None

    proc.wait_for(lambda: address() is not None, "skr serve start")
    return str(address())


def test_serve_releases_and_stops_cleanly_on_sigterm(stack):
    proc = Proc([*SKR, "serve", "--port", "0", "--log-level", "info", *virtual(stack)], stack_env(stack))
    try:
        base = "http://" + _listening_address(proc)
        assert http(base + "/status") == (200, {"message": "Status OK"})
        status, body = http(base + "/key/release", {"kid": "demo-oct"})
        assert status == 200 and json.loads(body["key"])["kty"] == "oct"
        assert proc.stop(signal.SIGTERM) == 0
        assert '"msg":"stopped"' in proc.stderr and "Traceback" not in proc.stderr
    finally:
        proc.kill()


# --- --help of every command ----------------------------------------------------------------------------


def _command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(child, (*prefix, name))


def test_every_command_is_covered_by_the_help_smoke():
    top = {path[0] for path in _command_paths(build_parser())}
    assert top == set(COMMAND_MODULES)


@pytest.mark.parametrize("path", [" ".join(p) for p in _command_paths(build_parser())])
def test_help_of_every_command(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: skr {path}") and "options:" in out


def test_help_through_a_subprocess_lists_every_command():
    done = run([*SKR, "--help"], clean_env())
    assert done.returncode == 0 and done.stderr == ""
    assert all(name in done.stdout for name in COMMAND_MODULES)
    serve = run([*SKR, "serve", "--help"], clean_env())
    assert serve.returncode == 0 and "--evidence" in serve.stdout and "Traceback" not in serve.stderr
