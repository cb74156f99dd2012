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
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from skr import __version__
from skr.endpoints import Allowlist, Endpoint, parse_endpoint
from skr.errors import ConfigError


class EvidenceKind(StrEnum):
    """Where reports come from (``--evidence``, ``SKR_EVIDENCE``); see ``skr.evidence.create_provider``."""

    AUTO = "auto"
    SEVGUEST = "sevguest"
    SEV = "sev"
    TSM = "tsm"
    VIRTUAL = "virtual"


EVIDENCE_KINDS = tuple(kind.value for kind in EvidenceKind)
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
    evidence: str = EvidenceKind.AUTO
    state_dir: Path = field(default_factory=default_state_dir)
    ca_bundle: Path | None = None
    request_deadline: float = 30.0
    upstream_timeout: float = 10.0
    token_reuse: bool = True
    token_margin: float = 300.0
    audit_log: Path | None = None
    audit_stdout: bool = False
    audit_max_bytes: int = 0
    audit_checkpoint_interval: float = 60.0  # seconds between hardware checkpoints (0 = only start/stop)
    audit_checkpoint_records: int = 1000  # a checkpoint after this many records (0 = no count trigger)
    log_level: str = "info"
    log_file: Path | None = None
    client_token: str | None = field(default=None, repr=False)
    # several named client tokens (``name:token`` lines in SKR_CLIENT_TOKEN_FILE); audit records name them
    client_tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_body: int = 64 * 1024
    maa_api_version: str = "2022-08-01"
    maa_tee_path: str = "SevSnpVm"
    user_agent: str = f"skr/{__version__}"
    akv_api_version: str | None = None
    akv_max_connections: int = 16
    identity_client_id: str | None = None
    certcache: CertCacheConfig = field(default_factory=CertCacheConfig)
    grace_period: float = 10.0
    client_timeout: float = 10.0
    max_connections: int = 256
    max_upstream_body: int = 4 * 1024 * 1024
    server_type: str = "http"
    # with server_type "both"; "grpc" alone listens on ``port``, as the Go sidecar does
    grpc_port: int = 50000

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


#: The daemon flags (by destination) ``skr doctor`` and ``skr release`` use; their --help shows no others.
DOCTOR_FLAGS = frozenset(
    {
        "maa_endpoint",
        "akv_endpoint",
        "allowed_endpoints",
        "evidence",
        "state_dir",
        "ca_bundle",
        "sidecar_args",
    }
)
RELEASE_FLAGS = DOCTOR_FLAGS | {"deadline", "audit_log", "log_level", "log_file"}


def add_arguments(parser: argparse.ArgumentParser, *, only: frozenset[str] | None = None) -> None:
    """The daemon's flags (used by ``skr serve``, ``skr local`` and ``skr release``). Defaults are None
    so that an unset flag falls through to the environment. ``only`` keeps the flags with these
    destinations (a command's --help then shows only what it uses)."""

    def a(*names: str, **options: Any) -> None:
        dest = options.get("dest") or names[0].lstrip("-").replace("-", "_")
        if only is None or dest in only:
            parser.add_argument(*names, **options)

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
    a(
        "--audit-checkpoint-interval",
        type=float,
        default=None,
        help="seconds between hardware audit checkpoints (default 60; env SKR_AUDIT_CHECKPOINT_INTERVAL)",
    )
    a(
        "--audit-checkpoint-records",
        type=int,
        default=None,
        help="a checkpoint every N audit records (default 1000; env SKR_AUDIT_CHECKPOINT_RECORDS)",
    )
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
        if problems := allowlist_value_problems(str(v)):
            raise ConfigError("; ".join(problems), hint=_ALLOWLIST_HINT)
        try:
            changes["allowlist"] = Allowlist.parse(v)
        except Exception as exc:
            raise ConfigError(str(exc)) from None
    if (v := pick("evidence", "SKR_EVIDENCE")) is not None:
        if v not in EVIDENCE_KINDS:
            raise ConfigError(f"evidence must be one of {', '.join(EVIDENCE_KINDS)}, got {v!r}")
        changes["evidence"] = EvidenceKind(v)
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
    if (v := pick("audit_checkpoint_interval", "SKR_AUDIT_CHECKPOINT_INTERVAL")) is not None:
        changes["audit_checkpoint_interval"] = _number(v, "SKR_AUDIT_CHECKPOINT_INTERVAL")
    if (v := pick("audit_checkpoint_records", "SKR_AUDIT_CHECKPOINT_RECORDS")) is not None:
        changes["audit_checkpoint_records"] = _count(v, "SKR_AUDIT_CHECKPOINT_RECORDS", minimum=0)
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
    if (v := pick("client_timeout", "SKR_CLIENT_TIMEOUT")) is not None:
        changes["client_timeout"] = _number(v, "SKR_CLIENT_TIMEOUT", minimum=0.1)
    if (v := pick("max_connections", "SKR_MAX_CONNECTIONS")) is not None:
        changes["max_connections"] = _count(v, "SKR_MAX_CONNECTIONS")
    if (v := pick("max_upstream_body", "SKR_MAX_UPSTREAM_BODY")) is not None:
        changes["max_upstream_body"] = int(_number(v, "SKR_MAX_UPSTREAM_BODY", minimum=64 * 1024))
    if (v := pick("server_type", "SKR_SERVER_TYPE", "ServerType")) is not None:
        server_type = str(v).strip().lower()
        if server_type not in SERVER_TYPES:
            raise ConfigError(f"server type must be one of {', '.join(SERVER_TYPES)}, got {v!r}")
        changes["server_type"] = server_type
    if (v := pick("grpc_port", "SKR_GRPC_PORT")) is not None:
        changes["grpc_port"] = _port(v, "gRPC port")
    if (v := pick("client_token_file", "SKR_CLIENT_TOKEN_FILE")) is not None:
        tokens = read_client_tokens(Path(v))
        changes["client_tokens"] = tokens
        changes["client_token"] = next((t for n, t in tokens if n == DEFAULT_TOKEN_NAME), tokens[0][1])
    return replace(s, **changes)


_TOKEN_LINE = re.compile(r"^([A-Za-z0-9._-]{1,64}):(\S{16,})$")
DEFAULT_TOKEN_NAME = "default"  # noqa: S105 - a name for a token, not a token


def read_client_tokens(path: Path) -> tuple[tuple[str, str], ...]:
    """The client tokens of ``SKR_CLIENT_TOKEN_FILE`` as ``(name, token)``.

    One line is one token (the original format), named ``default``; if that line reads ``name:token``,
    the part after the colon is also accepted, named ``name``. Several lines are ``name:token`` each.
    Messages name the line, never its content.
    """
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read the client token file {path}: {exc.strerror}") from None
    if len(lines) == 1:
        token = lines[0]
        if len(token) < 16:
            raise ConfigError(f"the client token in {path} is shorter than 16 characters")
        named = _TOKEN_LINE.match(token)
        return (
            ((named[1], named[2]), (DEFAULT_TOKEN_NAME, token)) if named else ((DEFAULT_TOKEN_NAME, token),)
        )
    tokens: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        match = _TOKEN_LINE.match(line)
        if match is None:
            raise ConfigError(
                f"line {number} of the client token file {path} is not name:token",
                hint="one per line: a name (letters, digits, . _ -), a colon, a token of 16+ characters",
            )
        if any(name == match[1] for name, _ in tokens):
            raise ConfigError(f"the client token file {path} names {match[1]!r} twice")
        tokens.append((match[1], match[2]))
    if not tokens:
        raise ConfigError(f"the client token file {path} is empty")
    return tuple(tokens)


def describe(settings: Settings) -> dict[str, Any]:
    """The settings as plain values for the start-up log line (the client token is never included)."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        if f.name == "client_token":
            out["client_auth"] = settings.client_token is not None
            continue
        if f.name == "client_tokens":
            out["client_token_ids"] = [name for name, _ in settings.client_tokens]
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


# --- start-up checks (``skr serve`` refuses, ``skr doctor`` reports) ---------------------------------

_PATTERN_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def allowlist_pattern_problem(pattern: str) -> str | None:
    """Why an ``SKR_ALLOWED_ENDPOINTS`` pattern cannot match anything as meant, or None when it parses:
    ``host``, ``*.domain`` or an IP literal (``[v6]`` with a port), optionally ``:port`` or ``:*``."""
    text = pattern.strip().lower()
    if "://" in text or "/" in text:
        return "is a URL; give the host name only (e.g. myvault.vault.azure.net)"
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return "has an unclosed '['"
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return "has text after ']'"
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return "is not a host name (an IPv6 address with a port needs brackets: [::1]:8443)"
        return None
    if port is not None and port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        return f"has a bad port {port!r} (1-65535 or *)"
    if host.startswith("*."):
        host = host[2:]
    if "*" in host:
        return "has a wildcard that is not a leading '*.' (only '*.domain' is supported)"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host or not all(_PATTERN_LABEL_RE.match(label) for label in host.rstrip(".").split(".")):
            return "is not a valid host name"
    return None


_ALLOWLIST_HINT = "write host, *.domain, host:port or [v6]:port, comma-separated"


def allowlist_value_problems(value: str) -> list[str]:
    """One line per pattern of an ``SKR_ALLOWED_ENDPOINTS`` value that does not parse."""
    reasons = ((p, allowlist_pattern_problem(p)) for p in (p.strip() for p in value.split(",")) if p)
    return [f"SKR_ALLOWED_ENDPOINTS pattern {p!r} {reason}" for p, reason in reasons if reason is not None]


def allowlist_problems(settings: Settings) -> list[str]:
    """One line per pattern of the settings' allowlist that does not parse."""
    return allowlist_value_problems(",".join(settings.allowlist.patterns))


def default_endpoint_problems(settings: Settings) -> list[tuple[str, Endpoint, str]]:
    """``(setting, endpoint, one line naming both settings)`` for each default endpoint the allowlist
    refuses: every request without its own endpoint would be refused."""
    patterns = ", ".join(settings.allowlist.patterns) or "(empty)"
    defaults = (("SKR_MAA_ENDPOINT", settings.maa_endpoint), ("SKR_AKV_ENDPOINT", settings.akv_endpoint))
    return [
        (name, ep, f"{name} {ep} is not in the endpoint allowlist SKR_ALLOWED_ENDPOINTS ({patterns})")
        for name, ep in defaults
        if ep is not None and not settings.allowlist.allows(ep)
    ]


def check_startup(settings: Settings) -> None:
    """Refuse a configuration that would fail on the first request: :class:`ConfigError` on one line."""
    problems = allowlist_problems(settings) + [line for _, _, line in default_endpoint_problems(settings)]
    if problems:
        raise ConfigError(
            "; ".join(problems),
            hint="fix SKR_ALLOWED_ENDPOINTS or the default endpoint (flags --allowed-endpoints, "
            "--maa-endpoint, --akv-endpoint)",
        )
