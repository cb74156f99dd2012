"""Upstream endpoints and keys named by requests and configuration, and the allowlist that guards them.

Owns the one host parser (:func:`parse_endpoint`; :func:`split_url` for URLs with a path), the one "is
this a Microsoft cloud host?" rule (:func:`is_azure_host`, with the sovereign clouds), the Managed HSM host
rule, and the one key name / version rule with its parser (:class:`KeyRef`, :func:`parse_kid`). Values
are parsed here once, at the edge, and passed on typed.

A request may name the attestation and key vault endpoints it wants. The sidecar sends the pod's
identity token to the vault and hardware evidence to the attestation service, so an endpoint outside
the allowlist is refused *before* any connection is made.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

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
# Data-plane DNS suffixes per cloud: (Key Vault, Managed HSM). The AAD resource of a vault is
# ``https://<suffix>`` of its cloud (:mod:`skr.identity`).
CLOUD_VAULT_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("vault.azure.net", "managedhsm.azure.net"),  # public
    ("vault.azure.cn", "managedhsm.azure.cn"),  # Azure China (21Vianet)
    ("vault.usgovcloudapi.net", "managedhsm.usgovcloudapi.net"),  # Azure US Government
    ("vault.microsoftazure.de", "managedhsm.microsoftazure.de"),  # Azure Germany (legacy)
)
# Domains of the Microsoft clouds (public, US Government, China; vault, managedhsm and attest hosts are all
# below them). The Key Vault SDK's challenge-resource check is never relaxed for these.
AZURE_DOMAIN_SUFFIXES: tuple[str, ...] = (
    "azure.net",
    "azure.com",
    "azure.cn",
    "azure.us",
    "usgovcloudapi.net",
    "microsoftazure.de",
    "windows.net",
    "chinacloudapi.cn",
    "microsoft.com",
    "microsoftonline.com",
)
#: The one key name / version rule (they end up in a URL path); :mod:`skr.openapi` derives its pattern.
KEY_NAME_PATTERN = "[0-9A-Za-z-]{1,127}"
KEY_VERSION_PATTERN = "[0-9A-Za-z]{1,64}"
_KEY_NAME = re.compile(f"^{KEY_NAME_PATTERN}$")
_KEY_VERSION = re.compile(f"^{KEY_VERSION_PATTERN}$")
_KID_HINT = "kid is name, name/version or https://<vault>/keys/<name>[/<version>]"
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
        return is_azure_host(self)

    def __str__(self) -> str:
        return self.authority


def parse_endpoint(value: str, *, what: str = "endpoint") -> Endpoint:
    """Parse ``host``, ``host:port`` or ``https://host[:port][/]`` strictly.

    Refused with a clear :class:`BadRequest`: other schemes, user info, paths, queries, fragments,
    empty or malformed host names, bad ports, whitespace and control characters.
    """
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{what} must be a non-empty host name")
    return _parse_endpoint(value.strip(), what)


@functools.lru_cache(maxsize=256)  # pure; the same few endpoints come with every request
def _parse_endpoint(raw: str, what: str) -> Endpoint:
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


def split_url(url: str, *, what: str = "URL") -> tuple[Endpoint, SplitResult]:
    """The endpoint of an ``https://host[:port]/...`` URL by the one host rule of :func:`parse_endpoint`, and
    the URL's parts (its path, query and fragment are the caller's to check).

    :class:`ValueError` when the URL does not split at all, :class:`BadRequest` when its origin is refused.
    """
    parts = urlsplit(url.strip())
    return parse_endpoint(f"{parts.scheme}://{parts.netloc}", what=what), parts


def host_of(value: Endpoint | str) -> str:
    """The lower-case host of an endpoint given as ``host``, ``host:port`` or ``https://host[:port][/]``."""
    return value.host if isinstance(value, Endpoint) else parse_endpoint(value).host


def _within(host: str, suffix: str) -> bool:
    return host == suffix or host.endswith("." + suffix)  # whole DNS labels only


@functools.lru_cache(maxsize=256)
def is_azure_host(value: Endpoint | str) -> bool:
    """True when the host is in a Microsoft cloud domain (public, sovereign or Microsoft-owned)."""
    host = host_of(value)
    return any(_within(host, suffix) for suffix in AZURE_DOMAIN_SUFFIXES)


@functools.lru_cache(maxsize=256)
def cloud_suffix(value: Endpoint | str) -> str | None:
    """``managedhsm.<cloud>`` or ``vault.<cloud>`` for a vault host in a Microsoft cloud, else None."""
    host = host_of(value)
    return next((s for pair in CLOUD_VAULT_SUFFIXES for s in reversed(pair) if _within(host, s)), None)


def is_managed_hsm(value: Endpoint | str, *, managed_hsm_hosts: Iterable[str] = ()) -> bool:
    """True for ``*.managedhsm.<cloud>`` hosts and for non-Azure hosts configured as Managed HSM."""
    host = host_of(value)
    if (cloud_suffix(host) or "").startswith("managedhsm."):
        return True
    return host in {host_of(h) for h in managed_hsm_hosts} and not is_azure_host(host)


@dataclass(frozen=True)
class KeyRef:
    """A key in a vault: its vault endpoint, name and version (None: the latest), checked by the one rule."""

    vault: Endpoint
    name: str
    version: str | None = None

    @property
    def kid(self) -> str:
        """``name`` or ``name/version``."""
        return f"{self.name}/{self.version}" if self.version else self.name

    def __str__(self) -> str:
        return f"{self.vault.url}/keys/{self.kid}"

    @classmethod
    def parse(cls, kid: str, *, vault: Endpoint | str | None = None) -> KeyRef:
        """The key ``kid`` names (``name``, ``name/version`` or a key URL) in ``vault`` (or the key URL's).

        For callers that name a key and a vault as text (the CLI, tools); the request edge is
        :meth:`skr.service.ReleaseService.resolve_vault`, which has its own error codes.
        """
        kid_vault, name, version = parse_kid(kid)
        given = vault if isinstance(vault, Endpoint) else None
        if isinstance(vault, str) and vault.strip():
            given = parse_endpoint(vault, what="the vault endpoint")
        if given is not None and kid_vault is not None and given != kid_vault:
            raise BadRequest(
                f"kid names vault {kid_vault.url} but the request names {given.url}",
                hint="drop one of them or make them agree",
            )
        chosen = given or kid_vault
        if chosen is None:
            raise BadRequest(
                "no vault named: kid is not a key URL and no akv_endpoint was given",
                hint="set akv_endpoint or configure a default vault",
            )
        return cls(chosen, name, version)


def is_key_name(text: str) -> bool:
    """True for a valid Key Vault key name: the one rule, also for the local key service."""
    return _KEY_NAME.match(text) is not None


def parse_kid(kid: str) -> tuple[Endpoint | None, str, str | None]:
    """``(vault | None, name, version | None)`` for ``name``, ``name/version`` or a key URL
    ``https://host[:port]/keys/name[/version]``. Names and versions are checked for their character set
    (they end up in a URL path)."""
    text = kid.strip() if isinstance(kid, str) else ""
    if not text:
        raise BadRequest("kid is empty", hint="name the key to release")
    if "://" in text:
        try:
            vault, parts = split_url(text, what="the vault endpoint")
        except ValueError:
            raise BadRequest(f"kid {kid[:200]!r} is not a valid URL") from None
        if parts.query or parts.fragment:
            raise BadRequest(
                f"kid {kid[:200]!r} has a query or fragment; expected .../keys/<name>[/<version>]"
            )
        keys, *segments = parts.path.strip("/").split("/")
        if len(segments) not in (1, 2) or keys != "keys":
            raise BadRequest(
                f"kid {kid[:200]!r} is not a key URL; expected https://<vault>/keys/<name>[/<version>]"
            )
    else:
        vault, segments = None, text.split("/")
        if len(segments) > 2:
            raise BadRequest(
                f"kid {kid[:200]!r} has too many '/' parts; expected name or name/version",
                hint="or give the full key URL https://<vault>/keys/<name>/<version>",
            )
    name, version = segments[0], segments[1] if len(segments) == 2 else ""
    if not _KEY_NAME.match(name):
        raise BadRequest(
            f"the key name in kid {kid[:200]!r} is not valid; expected 1-127 letters, digits or '-'",
            hint=_KID_HINT,
        )
    if version and not _KEY_VERSION.match(version):
        raise BadRequest(
            f"the key version in kid {kid[:200]!r} is not valid; expected letters and digits (32 hex)",
            hint=_KID_HINT,
        )
    return vault, name, version or None


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
