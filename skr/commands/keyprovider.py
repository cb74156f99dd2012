"""``skr keyprovider``: the ocicrypt ``cmd`` key provider (skopeo, containerd's ctd-decoder, CRI-O).

ocicrypt runs the command with the ``args`` of its ``OCICRYPT_KEYPROVIDER_CONFIG`` entry, writes one request
JSON on stdin and reads one answer JSON from stdout. ``keywrap`` is answered here (it needs only the public
key named by ``<keypath>-info.json``). ``keyunwrap`` is checked here (``op``, the decrypt parameter
``attestation-agent`` = ``skr``, the annotation packet) and then released through the same release path as
everything else: by default by a running sidecar's ``POST /key/unwrap`` on the loopback interface (the key
stays in the sidecar), or with ``--direct`` in this process, with the sidecar's settings (flags and
environment as ``skr serve`` reads them).

On failure: exit 1 when the release was denied, exit 2 otherwise, with one line on stderr (ocicrypt puts it
in its error); stdout then stays empty. Never writes key material, and the plaintext only as the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import uuid
from typing import BinaryIO
from urllib.parse import urlsplit

from skr.config import Settings, add_arguments, load_settings
from skr.errors import BadRequest, Code, ConfigError, ReleaseDenied, SkrError, UpstreamError
from skr.hostcheck import is_loopback_host
from skr.logs import setup_logging

#: ocicrypt's requests are a few hundred bytes; anything near this is not one.
MAX_REQUEST = 1024 * 1024
DEFAULT_SIDECAR = "http://127.0.0.1:8080"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "keyprovider",
        help="the ocicrypt cmd key provider: one request on stdin, the answer on stdout",
        description="An ocicrypt key provider (cmd form) for skopeo, containerd and CRI-O. keyunwrap goes "
        "to a running sidecar's /key/unwrap, or with --direct releases in this process.",
    )
    parser.add_argument(
        "--sidecar",
        metavar="URL",
        help=f"the running sidecar (default {DEFAULT_SIDECAR}; env SKR_SIDECAR_URL); loopback only",
    )
    parser.add_argument("--client-token-file", help="the sidecar's client token (SKR_CLIENT_TOKEN_FILE)")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="release in this process with the sidecar's settings, no sidecar",
    )
    add_arguments(parser)
    parser.set_defaults(func=_keyprovider)


def read_request(stream: BinaryIO | None = None) -> bytes:
    """One request from stdin, bounded."""
    raw = (stream or sys.stdin.buffer).read(MAX_REQUEST + 1)
    if len(raw) > MAX_REQUEST:
        raise BadRequest(
            f"the key-provider request exceeds {MAX_REQUEST} bytes", code=Code.INVALID_KEYPROVIDER_REQUEST
        )
    if not raw.strip():
        raise BadRequest(
            "no key-provider request on stdin (ocicrypt writes one JSON request)",
            code=Code.INVALID_KEYPROVIDER_REQUEST,
        )
    return raw


def sidecar_url(value: str | None) -> str:
    """The sidecar's base URL: http on a loopback address (the plaintext travels back over it) or https."""
    url = (value or os.environ.get("SKR_SIDECAR_URL") or DEFAULT_SIDECAR).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--sidecar must be an http(s) URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"--sidecar {url} is plain http off the loopback interface: "
            "the plaintext would cross the network",
            hint="run the sidecar in the same group and call it on 127.0.0.1",
        )
    return url


def _keyprovider(args: argparse.Namespace) -> int:
    from skr.keyprovider.ocicrypt import KEYWRAP, parse_request
    from skr.keyprovider.provider import wrap_key_locally

    raw = read_request()
    settings = load_settings(args)
    setup_logging(settings.log_level if args.log_level else "warning", settings.log_file)
    try:
        if parse_request(raw).op == KEYWRAP:
            answer = wrap_key_locally(raw)
        elif args.direct:
            answer = asyncio.run(_unwrap_direct(raw, settings))
        else:
            url, token = sidecar_url(args.sidecar), settings.client_token
            answer = asyncio.run(_unwrap_via_sidecar(raw, url, token, settings.request_deadline))
    except ReleaseDenied as exc:  # a negative verdict, not unusable input: exit 1, as `skr release`
        print(f"skr: {exc.diagnostics()}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(answer)
    sys.stdout.buffer.flush()
    return 0


async def _unwrap_direct(raw: bytes, settings: Settings) -> bytes:
    from skr.daemon import build_runtime
    from skr.keyprovider.provider import KeyProvider
    from skr.local.demo import DEMO_SECURITY_POLICY  # a virtual TEE without a context launches with it
    from skr.service import RequestContext

    runtime = await build_runtime(settings, env=os.environ, virtual_policy=DEMO_SECURITY_POLICY)
    try:
        ctx = RequestContext(request_id=uuid.uuid4().hex, client="keyprovider")
        return await KeyProvider(runtime.service).unwrap_key(raw, ctx)
    finally:
        await runtime.aclose()


async def _unwrap_via_sidecar(raw: bytes, base: str, token: str | None, deadline_seconds: float) -> bytes:
    import aiohttp

    from skr.keyprovider.ocicrypt import unwrap_answer
    from skr.keyprovider.provider import PACKET_ALG, unwrap_packet
    from skr.upstream import Deadline, RetryPolicy, request

    packet = unwrap_packet(raw)  # refuse a request for another provider before any call
    body = {
        "kid": packet.kid,
        "wrapped_data": base64.b64encode(packet.wrapped_data).decode(),
        "alg": PACKET_ALG,
        "maa_endpoint": packet.attester_endpoint or None,
        "akv_endpoint": packet.kms_endpoint or None,
    }
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = Deadline.after(deadline_seconds + 5.0)
    async with aiohttp.ClientSession() as session:
        result = await request(
            session,
            "POST",
            f"{base}/key/unwrap",
            service=f"the skr sidecar at {base}",
            json_body=body,
            headers=headers,
            timeout=deadline_seconds + 5.0,
            deadline=deadline,
            retry=RetryPolicy(attempts=3),
        )
    try:
        doc = json.loads(result.body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise UpstreamError(f"the skr sidecar at {base} answered HTTP {result.status} without a JSON body")
    if result.status != 200:
        message = str(doc.get("error") or f"HTTP {result.status}")
        try:
            code = Code(str(doc.get("code") or Code.UPSTREAM_ERROR))
        except ValueError:  # a code this version of skr does not know
            code = Code.UPSTREAM_ERROR
        kind = ReleaseDenied if code is Code.RELEASE_DENIED else SkrError
        raise kind(f"the sidecar refused the unwrap: {message}", code=code)
    try:
        plaintext = base64.b64decode(str(doc["plaintext"]), validate=True)
    except (KeyError, ValueError):
        raise UpstreamError(f"the skr sidecar at {base} answered without a plaintext") from None
    return unwrap_answer(plaintext)
