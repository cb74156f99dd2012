"""Upstream endpoints named by requests and configuration, and the allowlist that guards them.

A request may name the attestation and key vault endpoints it wants. The sidecar sends the pod's
identity token to the vault and hardware evidence to the attestation service, so an endpoint outside
the allowlist is refused *before* any connection is made.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from skr.errors import BadRequest, EndpointNotAllowed

# The attestation, Key Vault and Managed HSM domains of the public and sovereign clouds.
DEFAULT_ALLOWED = (
    "*.attest.azure.net",
    "*.attest.azure.us",
    "*.attest.azure.cn",
    "*.vault.azure.net",
    "*.vault.azure.cn",
    "*.vault.usgovcloudapi.net",
    "*.managedhsm.azure.net",
    "*.managedhsm.azure.cn",
    "*.managedhsm.usgovcloudapi.net",
)
# Azure Storage blob endpoints, for ``skr encfs`` only (SKR_ALLOWED_BLOB_ENDPOINTS overrides): kept apart from
# DEFAULT_ALLOWED so the sidecar never sends evidence or vault tokens to a storage host.
DEFAULT_BLOB_ALLOWED = (
    "*.blob.core.windows.net",
    "*.blob.storage.azure.net",
    "*.blob.core.usgovcloudapi.net",
    "*.blob.core.chinacloudapi.cn",
)
AZURE_SUFFIXES = tuple(p[1:] for p in DEFAULT_ALLOWED)  # ".attest.azure.net", ...
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Endpoint:
    """An HTTPS endpoint: lowercase host (or IP literal) and port."""

    host: str
    port: int = 443

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.authority}"

    def is_azure(self) -> bool:
        return self.host.endswith(AZURE_SUFFIXES)

    def __str__(self) -> str:
        return self.authority


def parse_endpoint(value: str, *, what: str = "endpoint") -> Endpoint:
    """Parse ``host``, ``host:port`` or ``https://host[:port][/]`` strictly.

    Refused with a clear :class:`BadRequest`: other schemes, user info, paths, queries, fragments,
    empty or malformed host names, bad ports, whitespace and control characters.
    """
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{what} must be a non-empty host name")
    raw = value.strip()
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise BadRequest(f"{what} contains whitespace or control characters")
    if "://" in raw:
        scheme = raw.split("://", 1)[0].lower()
        if scheme != "https":
            raise BadRequest(f"{what} must use https, not {scheme!r}")
    else:
        raw = "https://" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"{what} is not a valid host[:port]: {exc}") from None
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise BadRequest(f"{what} must not contain user information")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadRequest(f"{what} must be a bare host name without a path or query")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise BadRequest(f"{what} has no host name")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(_LABEL.match(label) for label in host.split(".")):
            raise BadRequest(f"{what} {host!r} is not a valid host name") from None
    if port is not None and not 0 < port < 65536:
        raise BadRequest(f"{what} port must be between 1 and 65535")
    return Endpoint(host, port or 443)


@dataclass(frozen=True)
class _Rule:
    host: str  # exact host, or a suffix starting with "." for "*." rules
    port: int | None  # None = any port

    def matches(self, ep: Endpoint) -> bool:
        if self.port is not None and ep.port != self.port:
            return False
        if self.host.startswith("."):
            return ep.host.endswith(self.host) and len(ep.host) > len(self.host)
        return ep.host == self.host


class Allowlist:
    """Host patterns: ``host``, ``*.domain`` (any subdomain), optionally ``:port`` or ``:*``.

    A pattern without a port allows only 443, the port every Azure endpoint uses.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(p.strip() for p in patterns if p.strip())
        self._rules = tuple(self._compile(p) for p in self.patterns)

    @staticmethod
    def _compile(pattern: str) -> _Rule:
        host, port = pattern.lower(), "443"
        if host.startswith("["):
            end = host.find("]")
            host, rest = host[1:end], host[end + 1 :]
            port = rest[1:] if rest.startswith(":") else port
        elif host.count(":") == 1:
            host, port = host.split(":")
        if host.startswith("*."):
            host = host[1:]
        if port != "*" and not port.isdigit():
            raise BadRequest(f"allowlist pattern {pattern!r} has a bad port")
        return _Rule(host, None if port == "*" else int(port))

    @classmethod
    def parse(cls, value: str | None) -> Allowlist:
        """From ``SKR_ALLOWED_ENDPOINTS`` (comma-separated); unset or empty means the Azure defaults."""
        if value is None or not value.strip():
            return cls(DEFAULT_ALLOWED)
        return cls(value.split(","))

    def extended(self, patterns: Iterable[str]) -> Allowlist:
        return Allowlist((*self.patterns, *patterns))

    def allows(self, ep: Endpoint) -> bool:
        return any(rule.matches(ep) for rule in self._rules)

    def check(self, ep: Endpoint, *, what: str) -> Endpoint:
        if not self.allows(ep):
            raise EndpointNotAllowed(
                f"{what} {ep.authority} is not in the endpoint allowlist; no request was sent to it",
                hint="add it to SKR_ALLOWED_ENDPOINTS if this host is really yours",
            )
        return ep

    def explicitly_names(self, ep: Endpoint) -> bool:
        """True when a non-wildcard rule names this exact host (used to relax the Key Vault SDK's
        challenge-resource check for local, non-Azure vaults only)."""
        return any(not r.host.startswith(".") and r.matches(ep) for r in self._rules)
