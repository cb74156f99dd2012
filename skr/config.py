"""One :class:`Settings` object, from command-line flags > environment > ``SkrSideCarArgs`` > defaults.

The Go sidecar's names keep working: flags ``-port``, ``-loglevel``, ``-logfile``, ``-base64``; environment
``Port``, ``LogLevel``, ``LogFile``, ``SkrSideCarArgs`` (base64 JSON with ``certcache``,
``identity.client_id`` and ``maaconfig.user_agent``).

Pure apart from reading the environment mapping it is given; never logs secrets (the client token is
read from a file and kept out of reprs).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from skr import __version__
from skr.endpoints import Allowlist, Endpoint, parse_endpoint
from skr.errors import ConfigError

EVIDENCE_KINDS = ("auto", "sevguest", "sev", "tsm", "virtual")
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "fatal", "panic")
#: http (the default); grpc: the Go sidecar's gRPC key provider on --port; both: gRPC on --grpc-port
SERVER_TYPES = ("http", "grpc", "both")


@dataclass(frozen=True)
class CertCacheConfig:
    """The Go sidecar's ``certcache`` block: where VCEK chains come from when the context has none."""

    endpoint_type: str = ""  # "AMD" | "AzCache" | "LocalTHIM" | ""
    endpoint: str = ""
    tee_type: str = ""
    api_version: str = ""
    client_id: str = ""


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("SKR_STATE_DIR"):
        return Path(env["SKR_STATE_DIR"])
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "/tmp")) / ".local" / "state")  # noqa: S108
    return Path(base) / "skr"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    allow_remote: bool = False
    maa_endpoint: Endpoint | None = None
    akv_endpoint: Endpoint | None = None
    allowlist: Allowlist = field(default_factory=lambda: Allowlist.parse(None))
    evidence: str = "auto"
    state_dir: Path = field(default_factory=default_state_dir)
    ca_bundle: Path | None = None
    request_deadline: float = 30.0
    upstream_timeout: float = 10.0
    token_reuse: bool = True
    token_margin: float = 300.0
    audit_log: Path | None = None
    audit_stdout: bool = False
    audit_max_bytes: int = 0
    log_level: str = "info"
    log_file: Path | None = None
    client_token: str | None = field(default=None, repr=False)
    max_body: int = 64 * 1024
    maa_api_version: str = "2022-08-01"
    maa_tee_path: str = "SevSnpVm"
    user_agent: str = f"skr/{__version__}"
    akv_api_version: str | None = None
    akv_max_connections: int = 16
    identity_client_id: str | None = None
    certcache: CertCacheConfig = field(default_factory=CertCacheConfig)
    grace_period: float = 10.0
    server_type: str = "http"
    grpc_port: int = (
        50000  # with server_type "both"; "grpc" alone listens on ``port``, as the Go sidecar does
    )

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def decode_sidecar_args(value: str) -> dict[str, Any]:
    """``SkrSideCarArgs``: standard base64 of the Go sidecar's AzureInformation JSON."""
    try:
        doc = json.loads(base64.b64decode(value.strip(), validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ConfigError("SkrSideCarArgs is not base64 of a JSON object") from None
    if not isinstance(doc, dict):
        raise ConfigError("SkrSideCarArgs must decode to a JSON object")
    return doc


def _section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"SkrSideCarArgs.{name} must be an object")
    return value


def _bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be on/off (true/false), got {value!r}")


def _number(value: str | float, name: str, *, minimum: float = 0.0) -> float:
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if n < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return n


def _count(value: str | int, name: str, *, minimum: int = 1) -> int:
    n = _number(value, name, minimum=minimum)
    if not n.is_integer():
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(n)


def _port(value: str | int, name: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a port number, got {value!r}") from None
    if not 0 <= port < 65536:
        raise ConfigError(f"{name} must be between 0 and 65535")
    return port


def _endpoint(value: str, name: str) -> Endpoint:
    try:
        return parse_endpoint(value, what=name)
    except Exception as exc:  # BadRequest from the parser: at start-up this is a configuration error
        raise ConfigError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The daemon's flags (used by ``skr serve``, ``skr local`` and ``skr release``). Defaults are None
    so that an unset flag falls through to the environment."""
    a = parser.add_argument
    a("--port", "-port", type=int, default=None, help="listen port (default 8080; env Port / SKR_PORT)")
    a("--host", default=None, help="listen address (default 127.0.0.1)")
    a("--allow-remote", action="store_true", default=None, help="accept non-loopback clients (unsafe)")
    a("--maa-endpoint", default=None, help="default attestation endpoint (env SKR_MAA_ENDPOINT)")
    a("--akv-endpoint", default=None, help="default Key Vault / Managed HSM (env SKR_AKV_ENDPOINT)")
    a("--allowed-endpoints", default=None, help="comma-separated host patterns (env SKR_ALLOWED_ENDPOINTS)")
    a("--evidence", choices=EVIDENCE_KINDS, default=None, help="evidence source (env SKR_EVIDENCE)")
    a("--state-dir", type=Path, default=None, help="state directory (env SKR_STATE_DIR)")
    a("--ca-bundle", type=Path, default=None, help="extra trust anchors PEM (env SKR_CA_BUNDLE)")
    a("--deadline", type=float, default=None, help="per-request deadline, seconds (env SKR_REQUEST_DEADLINE)")
    a(
        "--token-reuse",
        choices=("on", "off"),
        default=None,
        help="reuse attestation tokens (env SKR_TOKEN_REUSE)",
    )
    a("--audit-log", type=Path, default=None, help="audit log path (env SKR_AUDIT_LOG)")
    a("--audit-stdout", action="store_true", default=None, help="also write audit records to stdout")
    a("--log-level", "-loglevel", default=None, help="log level (env LogLevel / SKR_LOG_LEVEL)")
    a("--log-file", "-logfile", type=Path, default=None, help="log file (env LogFile / SKR_LOG_FILE)")
    a("--base64", "-base64", dest="sidecar_args", default=None, help="SkrSideCarArgs (base64 JSON)")


def load_settings(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    *,
    base: Settings | None = None,
) -> Settings:
    """Resolve the settings. Raises :class:`ConfigError` naming the bad value."""
    env = dict(os.environ if env is None else env)
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None} if args else {}
    s = base or Settings(state_dir=default_state_dir(env))
    changes: dict[str, Any] = {}

    # SkrSideCarArgs (lowest precedence after defaults)
    # skr.sh's order: env SkrSideCarArgs, else its positional $1 (``skr serve <base64> [<port>]``)
    raw_args = (
        flags.get("sidecar_args")
        or env.get("SkrSideCarArgs", "").strip()
        or str(flags.get("sidecar_args_positional") or "").strip()
    )
    if raw_args:
        doc = decode_sidecar_args(raw_args)
        identity, maaconfig, certcache = (_section(doc, n) for n in ("identity", "maaconfig", "certcache"))
        if identity.get("client_id"):
            changes["identity_client_id"] = str(identity["client_id"])
        if maaconfig.get("user_agent"):
            changes["user_agent"] = str(maaconfig["user_agent"])
        if certcache:
            known = {f.name for f in fields(CertCacheConfig)}
            changes["certcache"] = CertCacheConfig(**{k: str(v) for k, v in certcache.items() if k in known})

    def pick(flag: str, *names: str, positional: str | None = None) -> Any:
        if flag in flags:
            return flags[flag]
        for name in names:
            if env.get(name, "").strip():
                return env[name].strip()
        if positional is not None and str(flags.get(positional) or "").strip():
            return str(flags[positional]).strip()
        return None

    if (v := pick("port", "SKR_PORT", "Port", positional="port_positional")) is not None:
        changes["port"] = _port(v, "port")
    if (v := pick("host", "SKR_HOST")) is not None:
        changes["host"] = str(v)
    if (v := pick("allow_remote", "SKR_ALLOW_REMOTE")) is not None:
        changes["allow_remote"] = v if isinstance(v, bool) else _bool(v, "SKR_ALLOW_REMOTE")
    if (v := pick("maa_endpoint", "SKR_MAA_ENDPOINT")) is not None:
        changes["maa_endpoint"] = _endpoint(v, "SKR_MAA_ENDPOINT")
    if (v := pick("akv_endpoint", "SKR_AKV_ENDPOINT")) is not None:
        changes["akv_endpoint"] = _endpoint(v, "SKR_AKV_ENDPOINT")
    if (v := pick("allowed_endpoints", "SKR_ALLOWED_ENDPOINTS")) is not None:
        try:
            changes["allowlist"] = Allowlist.parse(v)
        except Exception as exc:
            raise ConfigError(str(exc)) from None
    if (v := pick("evidence", "SKR_EVIDENCE")) is not None:
        if v not in EVIDENCE_KINDS:
            raise ConfigError(f"evidence must be one of {', '.join(EVIDENCE_KINDS)}, got {v!r}")
        changes["evidence"] = v
    if (v := pick("state_dir", "SKR_STATE_DIR")) is not None:
        changes["state_dir"] = Path(v)
    if (v := pick("ca_bundle", "SKR_CA_BUNDLE")) is not None:
        changes["ca_bundle"] = Path(v)
    if (v := pick("deadline", "SKR_REQUEST_DEADLINE")) is not None:
        changes["request_deadline"] = _number(v, "request deadline", minimum=0.1)
    if (v := pick("upstream_timeout", "SKR_UPSTREAM_TIMEOUT")) is not None:
        changes["upstream_timeout"] = _number(v, "upstream timeout", minimum=0.1)
    if (v := pick("token_reuse", "SKR_TOKEN_REUSE")) is not None:
        changes["token_reuse"] = _bool(v, "token reuse")
    if (v := pick("token_margin", "SKR_TOKEN_MARGIN")) is not None:
        changes["token_margin"] = _number(v, "SKR_TOKEN_MARGIN")
    if (v := pick("audit_log", "SKR_AUDIT_LOG")) is not None:
        changes["audit_log"] = Path(v)
    if (v := pick("audit_stdout", "SKR_AUDIT_STDOUT")) is not None:
        changes["audit_stdout"] = v if isinstance(v, bool) else _bool(v, "SKR_AUDIT_STDOUT")
    if (v := pick("audit_max_bytes", "SKR_AUDIT_MAX_BYTES")) is not None:
        changes["audit_max_bytes"] = int(_number(v, "SKR_AUDIT_MAX_BYTES"))
    if (v := pick("log_level", "SKR_LOG_LEVEL", "LogLevel")) is not None:
        level = str(v).lower()
        if level not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
        changes["log_level"] = level
    if (v := pick("log_file", "SKR_LOG_FILE", "LogFile")) is not None:
        changes["log_file"] = Path(v)
    if (v := pick("max_body", "SKR_MAX_BODY")) is not None:
        changes["max_body"] = int(_number(v, "SKR_MAX_BODY", minimum=1024))
    if (v := pick("maa_api_version", "SKR_MAA_API_VERSION")) is not None:
        changes["maa_api_version"] = str(v)
    if (v := pick("maa_tee_path", "SKR_MAA_TEE_PATH")) is not None:
        changes["maa_tee_path"] = str(v)
    if (v := pick("akv_api_version", "SKR_AKV_API_VERSION")) is not None:
        changes["akv_api_version"] = str(v)
    if (v := pick("akv_max_connections", "SKR_AKV_MAX_CONNECTIONS")) is not None:
        changes["akv_max_connections"] = _count(v, "SKR_AKV_MAX_CONNECTIONS")
    if (v := pick("grace_period", "SKR_SHUTDOWN_GRACE")) is not None:
        changes["grace_period"] = _number(v, "SKR_SHUTDOWN_GRACE")
    if (v := pick("server_type", "SKR_SERVER_TYPE", "ServerType")) is not None:
        server_type = str(v).strip().lower()
        if server_type not in SERVER_TYPES:
            raise ConfigError(f"server type must be one of {', '.join(SERVER_TYPES)}, got {v!r}")
        changes["server_type"] = server_type
    if (v := pick("grpc_port", "SKR_GRPC_PORT")) is not None:
        changes["grpc_port"] = _port(v, "gRPC port")
    if (v := pick("client_token_file", "SKR_CLIENT_TOKEN_FILE")) is not None:
        changes["client_token"] = read_client_token(Path(v))
    return replace(s, **changes)


def read_client_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the client token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"the client token in {path} is shorter than 16 characters")
    return token


def describe(settings: Settings) -> dict[str, Any]:
    """The settings as plain values for the start-up log line (the client token is never included)."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        if f.name == "client_token":
            out["client_auth"] = settings.client_token is not None
            continue
        value = getattr(settings, f.name)
        if isinstance(value, Allowlist):
            value = list(value.patterns)
        elif isinstance(value, Endpoint | Path):
            value = str(value)
        elif isinstance(value, CertCacheConfig):
            value = value.endpoint_type or None
        out[f.name] = value
    return out
