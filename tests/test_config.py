"""Settings: flags > environment > SkrSideCarArgs > defaults, the Go sidecar's names, clear refusals.

The parser is the real ``skr serve`` parser (``skr.cli.build_parser``), so flag spellings, the Go
single-dash aliases and the ``/skr.sh`` positionals are tested as users type them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from skr.cli import build_parser, main
from skr.commands.serve import check_server_type
from skr.config import EvidenceKind, Settings, load_settings
from skr.errors import ConfigError


def serve_settings(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    args = build_parser("serve").parse_args(["serve", *argv])
    return load_settings(args, env or {"HOME": "/nonexistent"})


def sidecar_args(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


KATA_ARGS = sidecar_args(
    {
        "certcache": {
            "endpoint_type": "LocalTHIM",
            "endpoint": "169.254.169.254/metadata/THIM/amd/certification",
        }
    }
)


def test_defaults_are_the_safe_ones():
    s = serve_settings([])
    assert (s.host, s.port, s.allow_remote) == ("127.0.0.1", 8080, False)
    assert s.evidence == "auto" and s.token_reuse is True and s.max_body == 64 * 1024
    assert s.request_deadline == 30.0 and s.token_margin == 300.0 and s.akv_max_connections == 16


@pytest.mark.parametrize(
    ("argv", "env", "port"),
    [
        ([], {"Port": "9000"}, 9000),  # the Go image's variable
        ([], {"SKR_PORT": "9001", "Port": "9000"}, 9001),
        (["-port", "9002"], {"SKR_PORT": "9001"}, 9002),  # the Go flag spelling, flags win
        (["--port", "9003"], {"Port": "9000"}, 9003),
        (["", "9004"], {}, 9004),  # /skr.sh "$1" "$2": the port is the second positional
        (["", "9004"], {"Port": "9000"}, 9000),  # the environment wins over the positional, as in skr.sh
    ],
)
def test_port_precedence(argv, env, port):
    assert serve_settings(argv, env).port == port


def test_go_log_names():
    s = serve_settings([], {"LogLevel": "debug", "LogFile": "/tmp/skr.log"})
    assert (s.log_level, s.log_file) == ("debug", Path("/tmp/skr.log"))
    s = serve_settings(["-loglevel", "warning", "-logfile", "/tmp/other.log"], {"LogLevel": "debug"})
    assert (s.log_level, s.log_file) == ("warning", Path("/tmp/other.log"))


def test_sidecar_args_from_env_flag_or_positional():
    doc = {"identity": {"client_id": "mi-client"}, "maaconfig": {"user_agent": "my-agent/1"}}
    for argv, env in (
        ([], {"SkrSideCarArgs": sidecar_args(doc)}),
        (["-base64", sidecar_args(doc)], {}),
        ([sidecar_args(doc)], {}),  # /skr.sh "$1"
    ):
        s = serve_settings(argv, env)
        assert (s.identity_client_id, s.user_agent) == ("mi-client", "my-agent/1")
    # the environment wins over the positional, the flag over both
    other = sidecar_args({"identity": {"client_id": "other"}})
    assert serve_settings([other], {"SkrSideCarArgs": sidecar_args(doc)}).identity_client_id == "mi-client"
    assert (
        serve_settings(["-base64", other], {"SkrSideCarArgs": sidecar_args(doc)}).identity_client_id
        == "other"
    )


def test_kata_example_certcache():
    s = serve_settings([], {"SkrSideCarArgs": KATA_ARGS})
    assert s.certcache.endpoint_type == "LocalTHIM"
    assert s.certcache.endpoint == "169.254.169.254/metadata/THIM/amd/certification"


def test_skr_variables_override_sidecar_args():
    s = serve_settings(
        [],
        {
            "SkrSideCarArgs": sidecar_args({"maaconfig": {"user_agent": "from-args"}}),
            "SKR_MAA_ENDPOINT": "sharedeus2.eus2.attest.azure.net",
            "SKR_AKV_ENDPOINT": "https://myvault.vault.azure.net",
            "SKR_TOKEN_REUSE": "off",
            "SKR_REQUEST_DEADLINE": "12.5",
            "SKR_UPSTREAM_TIMEOUT": "4",
            "SKR_MAX_BODY": "2048",
            "SKR_AKV_MAX_CONNECTIONS": "4",
        },
    )
    assert s.user_agent == "from-args"
    assert s.maa_endpoint is not None and s.maa_endpoint.host == "sharedeus2.eus2.attest.azure.net"
    assert s.akv_endpoint is not None and s.akv_endpoint.host == "myvault.vault.azure.net"
    assert (s.token_reuse, s.request_deadline, s.upstream_timeout) == (False, 12.5, 4.0)
    assert (s.max_body, s.akv_max_connections) == (2048, 4)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"SkrSideCarArgs": "not base64!"}, "SkrSideCarArgs is not base64"),
        ([], {"SkrSideCarArgs": base64.b64encode(b"[1]").decode()}, "JSON object"),
        ([], {"SkrSideCarArgs": sidecar_args({"identity": "x"})}, "SkrSideCarArgs.identity"),
        ([], {"Port": "http"}, "port must be a port number"),
        ([], {"Port": "70000"}, "between 0 and 65535"),
        ([], {"SKR_TOKEN_REUSE": "maybe"}, "on/off"),
        ([], {"SKR_REQUEST_DEADLINE": "0"}, "at least 0.1"),
        ([], {"SKR_MAX_BODY": "10"}, "at least 1024"),
        ([], {"SKR_AKV_MAX_CONNECTIONS": "0"}, "SKR_AKV_MAX_CONNECTIONS must be at least 1"),
        ([], {"SKR_AKV_MAX_CONNECTIONS": "2.5"}, "whole number"),
        ([], {"LogLevel": "chatty"}, "log level must be one of"),
        ([], {"SKR_MAA_ENDPOINT": "http://maa.example"}, "SKR_MAA_ENDPOINT"),
    ],
)
def test_bad_values_are_config_errors_naming_the_setting(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        serve_settings(argv, env)


@pytest.mark.parametrize("value", ["", "http", "HTTP", "grpc", "GRPC", "both"])
def test_server_types_of_the_go_image_and_both_are_accepted(value):
    check_server_type({"ServerType": value})


def test_an_unknown_server_type_is_refused_clearly():
    with pytest.raises(ConfigError, match="ServerType=ttrpc is not supported: use http, grpc, both"):
        check_server_type({"ServerType": "ttrpc"})


def test_serve_with_an_unknown_server_type_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("ServerType", "ttrpc")
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("skr: ServerType=ttrpc is not supported")


@pytest.mark.parametrize(
    ("argv", "env", "server_type", "grpc_port"),
    [
        ([], {}, "http", 50000),
        ([], {"ServerType": "grpc"}, "grpc", 50000),
        ([], {"ServerType": "GRPC", "SKR_SERVER_TYPE": "both"}, "both", 50000),
        (["--server-type", "both", "--grpc-port", "7000"], {"ServerType": "grpc"}, "both", 7000),
        (["-server_type", "grpc"], {}, "grpc", 50000),
        ([], {"SKR_GRPC_PORT": "6000"}, "http", 6000),
    ],
)
def test_server_type_and_grpc_port_resolution(argv, env, server_type, grpc_port):
    settings = serve_settings(argv, env)
    assert (settings.server_type, settings.grpc_port) == (server_type, grpc_port)


def test_bad_server_type_and_grpc_port_name_the_setting():
    with pytest.raises(ConfigError, match="server type must be one of http, grpc, both"):
        serve_settings([], {"SKR_SERVER_TYPE": "ttrpc"})
    with pytest.raises(ConfigError, match="gRPC port must be between 0 and 65535"):
        serve_settings([], {"SKR_GRPC_PORT": "70000"})


@pytest.mark.parametrize("kind", ["auto", "sevguest", "sev", "tsm", "virtual"])
def test_every_evidence_kind_is_accepted_by_flag_and_environment_as_the_same_string(kind):
    by_flag = serve_settings(["--evidence", kind]).evidence
    by_env = serve_settings([], {"SKR_EVIDENCE": kind}).evidence
    assert by_flag is by_env is EvidenceKind(kind) and by_flag == kind and f"{by_flag}" == kind


def test_an_unknown_evidence_kind_is_refused_naming_the_accepted_ones(capsys):
    refusal = "evidence must be one of auto, sevguest, sev, tsm, virtual, got 'sgx'"
    with pytest.raises(ConfigError, match=refusal):
        serve_settings([], {"SKR_EVIDENCE": "sgx"})
    with pytest.raises(SystemExit):
        serve_settings(["--evidence", "SEVGUEST"])
    assert "(choose from 'auto', 'sevguest', 'sev', 'tsm', 'virtual')" in capsys.readouterr().err
