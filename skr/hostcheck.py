"""Which ``Host`` and ``Origin`` a request may carry: the defence against DNS rebinding and cross-site calls.

A web page opened in a browser on the same machine (or in the same container group) can make the browser
send requests to the sidecar: through a name whose DNS answer the attacker switches to 127.0.0.1 (the
``Host`` header then still names the attacker's domain), or directly as a cross-site request (the
``Origin`` header names the page). The peer address is loopback in both cases, so the loopback check alone
does not stop them. skr therefore answers only requests addressed to

- a loopback name: ``localhost``, an IPv4 address in 127.0.0.0/8, ``[::1]`` (any port, or none);
- the configured listen address, unless it is a wildcard (``0.0.0.0``, ``::``: browsers have sent
  requests for ``http://0.0.0.0`` to the local machine);
- with ``--allow-remote``, any other IP literal too (remote clients address the sidecar by IP; DNS
  rebinding needs a name),

and refuses a request whose ``Origin`` (present on browser cross-origin and ``POST`` requests) is not a
loopback origin. A request without ``Host`` (HTTP/1.0) or without ``Origin`` (curl, SDKs) is accepted:
browsers always send ``Host``, and the content type is not checked (``curl -d`` sends a form type).

Pure functions of the header values and the settings. Never echoes or logs the header values (attacker
text).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from skr.errors import ForbiddenHost, ForbiddenOrigin

LOOPBACK_NAMES = frozenset({"localhost"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """A ``Host`` header (``name``, ``name:port``, ``[v6]:port``) as (lowercase host without a trailing dot
    or brackets, port); None when it is not a well-formed authority."""
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, sep, port_text = text.partition(":")
        rest = sep + port_text
    port: int | None = None
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or not digits.isascii() or not digits.isdigit() or len(digits) > 5:
            return None
        port = int(digits)
        if port > 65535:
            return None
    host = host.lower().removesuffix(".")
    if not host or any(c.isspace() or c in "/?#@[]" for c in host):
        return None
    return host, port


@functools.lru_cache(maxsize=256)  # pure; the same few Host values come with every request
def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP literal (``host`` as :func:`split_host` returns it)."""
    if host in LOOPBACK_NAMES:
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


def host_allowed(host: str, *, listen_host: str, allow_remote: bool) -> bool:
    if is_loopback_host(host):
        return True
    address = _ip(host)
    if address is not None and address.is_unspecified:
        return False  # 0.0.0.0 / :: is where a server listens, never where a client should send
    configured = split_host(listen_host) or split_host(f"[{listen_host}]")
    if configured is not None and configured[0] == host:
        return True
    return allow_remote and address is not None


def origin_allowed(origin: str) -> bool:
    """A browser origin (``scheme://host[:port]``) on loopback; ``null`` and anything else are not."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.fragment:
        return False
    if "@" in parts.netloc:
        return False
    split = split_host(parts.netloc)
    return split is not None and is_loopback_host(split[0])


def check_host_and_origin(
    hosts: Iterable[str], origins: Iterable[str], *, listen_host: str, allow_remote: bool
) -> None:
    """Raise 403 ``forbidden_host`` / ``forbidden_origin`` unless every ``Host`` and ``Origin`` is allowed."""
    for value in hosts:
        split = split_host(value)
        if split is None or not host_allowed(split[0], listen_host=listen_host, allow_remote=allow_remote):
            raise ForbiddenHost(
                "the request's Host header names neither a loopback host nor this sidecar's listen address",
                hint="call http://localhost:<port> or http://127.0.0.1:<port> (DNS-rebinding protection)",
            )
    for value in origins:
        if not origin_allowed(value):
            raise ForbiddenOrigin(
                "cross-site requests are refused: the request's Origin is not a loopback origin",
                hint="call the sidecar from a process in the container group, not from a web page",
            )
