"""``skr serve`` refuses contradictory endpoint settings at start; ``skr doctor`` checks the same and more
without a TEE, keeps going, prints each problem once, has --json and never touches the network with
--skip-network; every --help line has text."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import aiohttp
import pytest

from skr.cli import build_parser
from skr.commands.doctor import Check, _unique
from skr.config import Settings, allowlist_pattern_problem, allowlist_problems, check_startup
from skr.endpoints import Allowlist, parse_endpoint
from skr.errors import ConfigError, UpstreamError
from skr.upstream import RetryPolicy
from tests.procs import SKR, clean_env


def skr(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SKR, *argv], capture_output=True, text=True, timeout=60, env=clean_env(env), check=False
    )


class Listener:
    """A TCP listener on 127.0.0.1 that counts connection attempts and closes each at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


# --- start-up checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("*.vault.azure.net", None),
        ("myvault.vault.azure.net:8443", None),
        ("127.0.0.1:*", None),
        ("[::1]:8443", None),
        ("::1", None),
        ("https://myvault.vault.azure.net", "is a URL"),
        ("myvault.vault.azure.net/keys", "is a URL"),
        ("*", "wildcard that is not a leading"),
        ("vault.*.azure.net", "wildcard that is not a leading"),
        ("**.azure.net", "wildcard that is not a leading"),
        ("myvault.vault.azure.net:99999", "bad port"),
        ("my vault", "is not a valid host name"),
        ("[::1", "unclosed"),
    ],
)
def test_allowlist_patterns_that_do_not_parse_are_named(pattern, problem):
    found = allowlist_pattern_problem(pattern)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_check_startup_names_both_settings_on_one_line():
    settings = Settings(maa_endpoint=parse_endpoint("evil.example.com"))
    with pytest.raises(ConfigError) as info:
        check_startup(settings)
    line = info.value.diagnostics()
    assert "\n" not in line
    assert line.startswith(
        "SKR_MAA_ENDPOINT evil.example.com is not in the endpoint allowlist SKR_ALLOWED_ENDPOINTS"
    )
    check_startup(Settings(maa_endpoint=parse_endpoint("sharedeus.eus.attest.azure.net")))
    bad = Settings(allowlist=Allowlist(["*.vault.azure.net", "vault.*.net"]))
    assert allowlist_problems(bad) == [
        "SKR_ALLOWED_ENDPOINTS pattern 'vault.*.net' has a wildcard that is not a leading '*.' "
        "(only '*.domain' is supported)"
    ]
    with pytest.raises(ConfigError, match=r"pattern 'vault\.\*\.net'"):
        check_startup(bad)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"SKR_MAA_ENDPOINT": "attest.evil.example"}, "SKR_MAA_ENDPOINT attest.evil.example is not in"),
        (
            {"SKR_AKV_ENDPOINT": "127.0.0.1:8443", "SKR_ALLOWED_ENDPOINTS": "*.vault.azure.net"},
            "SKR_AKV_ENDPOINT 127.0.0.1:8443 is not in the endpoint allowlist SKR_ALLOWED_ENDPOINTS "
            "(*.vault.azure.net)",
        ),
        ({"SKR_ALLOWED_ENDPOINTS": "*.vault.azure.net,vault.*.net"}, "pattern 'vault.*.net' has a wildcard"),
        (
            {"SKR_ALLOWED_ENDPOINTS": "https://myvault.vault.azure.net"},
            "pattern 'https://myvault.vault.azure.net' is a URL",
        ),
    ],
)
def test_serve_refuses_contradictory_endpoint_settings_at_start(env, says):
    done = skr("serve", "--evidence", "virtual", env=env)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in done.stderr
    assert "SKR_ALLOWED_ENDPOINTS" in lines[0]


# --- doctor -----------------------------------------------------------------------------------------------


def test_doctor_keeps_going_after_an_evidence_failure_and_never_connects_with_skip_network(
    listener, tmp_path
):
    local = f"127.0.0.1:{listener.port}"
    env = {
        "SKR_MAA_ENDPOINT": local,
        "SKR_AKV_ENDPOINT": "myvault.vault.azure.net",
        "SKR_ALLOWED_ENDPOINTS": f"*.vault.azure.net,{local}",
        "IDENTITY_ENDPOINT": f"http://{local}/token",
        "IDENTITY_HEADER": "x",
        "UVM_SECURITY_CONTEXT_DIR": str(tmp_path / "none"),
    }
    done = skr("doctor", "--evidence", "sevguest", "--skip-network", "--json", env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    report = json.loads(done.stdout)
    names = [c["name"] for c in report["checks"]]
    assert "evidence source" in names  # it failed: no SEV-SNP device here ...
    assert {"endpoint allowlist", "collateral settings", "identity configuration"} <= set(names)
    assert {"attestation endpoint", "key vault endpoint"} <= set(names)  # ... and the rest still ran
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["evidence source"]["ok"] is False and by_name["evidence source"]["fix"]
    assert by_name["attestation endpoint"]["ok"] is True
    assert "not contacted: --skip-network" in by_name["attestation endpoint"]["detail"]
    assert by_name["identity configuration"]["detail"] == f"managed identity through http://{local}/token"
    assert "identity token" not in names
    assert by_name["collateral settings"]["detail"].startswith("VCEK chains from AMD KDS")
    assert report["total"] == len(report["checks"]) and report["ok"] is False
    assert listener.connections == 0


def test_doctor_without_skip_network_does_connect_and_keeps_azure_identity_noise_out(listener, tmp_path):
    local = f"127.0.0.1:{listener.port}"
    env = {
        "SKR_MAA_ENDPOINT": local,
        "SKR_ALLOWED_ENDPOINTS": local,
        "IDENTITY_ENDPOINT": f"http://{local}/token",
        "IDENTITY_HEADER": "x",
        "UVM_SECURITY_CONTEXT_DIR": str(tmp_path / "none"),
    }
    done = skr("doctor", "--evidence", "sevguest", env=env)
    assert done.returncode == 1
    assert listener.connections >= 2  # the attestation endpoint and the identity endpoint
    assert done.stderr == ""  # azure-identity's own warnings and tracebacks are not printed
    assert "[FAIL] identity token: managed_identity could not get a token" in done.stdout
    assert "[FAIL] key vault endpoint: no default configured" in done.stdout


def test_doctor_reports_config_problems_once_each(tmp_path):
    env = {
        "SKR_MAA_ENDPOINT": "attest.evil.example",
        "SKR_ALLOWED_ENDPOINTS": "*.attest.azure.net,https://myvault.vault.azure.net",
        "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
        "UVM_SECURITY_CONTEXT_DIR": str(tmp_path / "none"),
        "SkrSideCarArgs": "eyJjZXJ0Y2FjaGUiOiB7ImVuZHBvaW50X3R5cGUiOiAiQ2FjaGVNZSJ9fQ==",
    }
    done = skr("doctor", "--evidence", "sevguest", "--skip-network", env=env)
    assert done.returncode == 1 and done.stderr == ""
    failures = [line for line in done.stdout.splitlines() if line.startswith("[FAIL]")]
    assert len(failures) == len(set(failures))
    text = done.stdout
    assert text.count("'https://myvault.vault.azure.net' is a URL") == 1
    assert text.count("attest.evil.example is not in the endpoint allowlist") == 1
    assert "[FAIL] identity configuration: workload identity is half configured: AZURE_CLIENT_ID set" in text
    assert "[FAIL] collateral settings: unknown certificate source 'CacheMe'" in text


def test_unique_drops_repeated_problems():
    checks = [Check("a", False, "x", "fix"), Check("b", True, "y"), Check("a", False, "x", "fix")]
    assert _unique(checks) == checks[:2]


def test_doctor_with_settings_that_do_not_load_says_so_as_a_check():
    done = skr("doctor", "--json", env={"SKR_MAA_ENDPOINT": "http://plain.example"})
    assert done.returncode == 1 and done.stderr == ""
    report = json.loads(done.stdout)
    assert report["checks"] == [
        {
            "name": "settings",
            "ok": False,
            "detail": "SKR_MAA_ENDPOINT must use https, not 'http'",
            "fix": "fix the named setting",
            "warn": False,
        }
    ]


# --- --help -----------------------------------------------------------------------------------------------


def _parsers(
    parser: argparse.ArgumentParser, path: str = "skr"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                assert helps.get(name), f"{path} {name} has no help line"
                yield from _parsers(child, f"{path} {name}")


def test_every_help_line_of_every_command_has_text():
    seen = 0
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), (
                f"{path} {action.option_strings or action.dest} has no help text"
            )
            seen += 1
    assert seen > 100


@pytest.mark.parametrize(
    ("command", "absent"),
    [
        ("release", ["--port", "--host", "--allow-remote", "--token-reuse", "--audit-stdout"]),
        (
            "doctor",
            [
                "--port",
                "--host",
                "--allow-remote",
                "--deadline",
                "--token-reuse",
                "--audit-log",
                "--log-level",
            ],
        ),
    ],
)
def test_release_and_doctor_help_show_only_the_flags_they_use(command, absent, capsys):
    parser = dict(_parsers(build_parser()))[f"skr {command}"]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert not flags & set(absent)
    assert {"--maa-endpoint", "--akv-endpoint", "--allowed-endpoints", "--evidence"} <= flags


async def test_a_skip_network_session_refuses_every_request_before_connecting(listener):
    from skr.commands.doctor import NetworkDisabled, _session
    from skr.upstream import request

    async with _session(skip_network=True) as session:
        with pytest.raises(NetworkDisabled, match="--skip-network"):
            await session.get(f"http://127.0.0.1:{listener.port}/metadata/THIM/amd/certification")
        with pytest.raises(UpstreamError) as info:  # what a collateral fetch turns it into
            await request(
                session,
                "GET",
                f"http://127.0.0.1:{listener.port}/x",
                service="THIM",
                retry=RetryPolicy(attempts=1),
            )
        assert info.value.code == "upstream_unreachable"
    assert listener.connections == 0
    async with _session(skip_network=False) as session:  # the listener does count real attempts
        with pytest.raises(aiohttp.ClientError):
            await session.get(f"http://127.0.0.1:{listener.port}/")
    assert listener.connections >= 1
