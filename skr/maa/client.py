"""The Microsoft Azure Attestation (MAA) client for SEV-SNP evidence (``AttestSevSnpVm``).

Owns the wire format of ``POST https://{instance}/attest/SevSnpVm?api-version=…`` (docs/wire-formats.md §1):

* body keys are camelCase: ``report``, ``runtimeData {data, dataType: "JSON"}``, optional
  ``initTimeData``, and ``nonce`` (a string): :meth:`MaaClient.attest` sends a fresh random one with
  every request, like the Go sidecar (a random uint64, in decimal), and MAA echoes it as the ``nonce``
  claim; :func:`build_request_body` adds one only when given (the genuine request had none);
* ``report`` = base64url(JSON ``{"SnpReport": b64url(report), "VcekCertChain": b64url(PEM chain),
  "Endorsements": b64url(JSON {"Uvm": [b64url(COSE_Sign1)]})}``), ``Endorsements`` only when the
  platform supplied a UVM endorsement;
* **base64url without padding** everywhere (RFC 7515 §2). This is byte-for-byte what Microsoft's own
  sample client sends (the genuine request in the test vectors re-encodes identically); the Go sidecar
  pads, and MAA accepts both. Our decoders accept both as well.

Takes the endpoint parsed (:class:`skr.endpoints.Endpoint`); :func:`normalize_endpoint` gives an issuer's
origin as text for comparisons. TLS is always verified (system roots plus ``SKR_CA_BUNDLE``). Every call goes
through :func:`skr.upstream.request` (timeouts, retries of transient failures only, deadline).

Never logs or returns the token in a message; error bodies are summarized, never echoed whole.
"""

from __future__ import annotations

import json
import re
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from skr import __version__, b64
from skr.b64 import b64url_encode
from skr.endpoints import Endpoint, parse_endpoint
from skr.errors import AttestationFailed, BadRequest
from skr.evidence.base import Evidence
from skr.upstream import (
    DEFAULT_MAX_UPSTREAM_BODY,
    DEFAULT_RETRY,
    Deadline,
    RetryPolicy,
    client_ssl_context,
    request,
    summarize_body,
)

SERVICE = "Microsoft Azure Attestation"
DEFAULT_TEE_PATH = "SevSnpVm"
DEFAULT_API_VERSION = "2022-08-01"
DEFAULT_USER_AGENT = f"skr/{__version__}"
DATA_TYPE_JSON = "JSON"
DATA_TYPE_BINARY = "Binary"

_TEE_PATH = re.compile(r"^[A-Za-z0-9]+$")


def b64url_decode(text: str, *, what: str = "value") -> bytes:
    """Decode base64url with or without ``=`` padding; :class:`BadRequest` naming ``what`` otherwise."""
    if not isinstance(text, str):
        raise BadRequest(f"{what} must be a base64url string, found {type(text).__name__}")
    try:
        return b64.b64url_decode(text.strip().rstrip("="))
    except ValueError:
        raise BadRequest(
            f"{what} is not base64url",
            hint="base64url uses A-Z a-z 0-9 - _ with optional '=' padding; '+' and '/' are not accepted",
        ) from None


def normalize_endpoint(value: str) -> str:
    """``host``, ``host:port`` or ``https://host[:port][/]`` → ``"https://host[:port]"``.

    The host is lower-cased and the default port 443 dropped, so equal origins compare equal. Refuses
    ``http://`` and other schemes, credentials, paths, queries, fragments, bad hosts and ports
    (:func:`skr.endpoints.parse_endpoint`): an attestation endpoint is an origin, nothing more.
    """
    return parse_endpoint(value, what="the attestation endpoint").url


# --- request body ---------------------------------------------------------------------------------


def encode_report(evidence: Evidence) -> str:
    """The ``report`` string: base64url of the compact JSON SNP bundle (docs/wire-formats.md §1.3)."""
    bundle: dict[str, str] = {
        "SnpReport": b64url_encode(evidence.report),
        "VcekCertChain": b64url_encode(evidence.vcek_chain_pem),
    }
    if evidence.uvm_endorsements:
        endorsements = {"Uvm": [b64url_encode(evidence.uvm_endorsements)]}
        bundle["Endorsements"] = b64url_encode(_compact_json(endorsements))
    return b64url_encode(_compact_json(bundle))


@dataclass(frozen=True)
class ReportEnvelope:
    """The decoded ``report`` string of an ``AttestSevSnpVm`` request."""

    report: bytes
    vcek_chain_pem: bytes
    uvm_endorsements: tuple[bytes, ...] = ()

    def __repr__(self) -> str:
        return (
            f"ReportEnvelope(report=<{len(self.report)} bytes>,"
            f" vcek_chain_pem=<{len(self.vcek_chain_pem)} bytes>,"
            f" uvm_endorsements={len(self.uvm_endorsements)})"
        )


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} must be a JSON object, found {type(doc).__name__}")
    return doc


def decode_report(value: str) -> ReportEnvelope:
    """Inverse of :func:`encode_report` (padded or unpadded base64url); :class:`BadRequest` when malformed."""
    bundle = _json_object(b64url_decode(value, what="report"), "the decoded report")
    for key in ("SnpReport", "VcekCertChain"):
        if not isinstance(bundle.get(key), str) or not bundle[key]:
            raise BadRequest(
                f"the decoded report has no {key!r} string", hint="expected keys SnpReport, VcekCertChain"
            )
    report = b64url_decode(bundle["SnpReport"], what="report.SnpReport")
    chain = b64url_decode(bundle["VcekCertChain"], what="report.VcekCertChain")
    uvm: tuple[bytes, ...] = ()
    if bundle.get("Endorsements"):
        endorsements = _json_object(
            b64url_decode(bundle["Endorsements"], what="report.Endorsements"), "report.Endorsements"
        )
        items = endorsements.get("Uvm", [])
        if not isinstance(items, list):
            raise BadRequest("report.Endorsements.Uvm must be a list of base64url strings")
        uvm = tuple(b64url_decode(item, what="report.Endorsements.Uvm[]") for item in items)
    return ReportEnvelope(report=report, vcek_chain_pem=chain, uvm_endorsements=uvm)


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def build_request_body(
    evidence: Evidence, runtime_data: bytes, nonce: str | None = None, *, init_time_data: bytes | None = None
) -> dict[str, Any]:
    """The JSON body of ``AttestSevSnpVm``.

    ``runtime_data`` must be the exact bytes whose SHA-256 is REPORT_DATA[0:32] (for key release: the
    wrapping key's JWKS, see :mod:`skr.maa.runtime`); it is sent with ``dataType: "JSON"`` so MAA
    places it under ``x-ms-runtime``. ``init_time_data`` (JSON whose SHA-256 is HOST_DATA) is sent only
    when given; ACI never sends it. ``nonce`` is echoed by MAA as the ``nonce`` claim.
    """
    body: dict[str, Any] = {
        "report": encode_report(evidence),
        "runtimeData": {"data": b64url_encode(runtime_data), "dataType": DATA_TYPE_JSON},
    }
    if init_time_data is not None:
        body["initTimeData"] = {"data": b64url_encode(init_time_data), "dataType": DATA_TYPE_JSON}
    if nonce is not None:
        if not isinstance(nonce, str) or not nonce:
            raise BadRequest("the attestation nonce must be a non-empty string")
        body["nonce"] = nonce
    return body


def new_nonce() -> str:
    """A fresh request nonce: a random 64-bit number in decimal, what the Go sidecar's ``Uint64()`` sends
    (as a number) and MAA echoes as a string claim; sent here as the string the REST API specifies."""
    return str(secrets.randbits(64))


def _token_from(body: Any) -> str | None:
    """The ``token`` member, matched case-insensitively like the Go sidecar does."""
    if not isinstance(body, Mapping):
        return None
    for key, value in body.items():
        if isinstance(key, str) and key.lower() == "token" and isinstance(value, str):
            return value
    return None


# --- the client -----------------------------------------------------------------------------------


class MaaClient:
    """Sends SEV-SNP evidence to an MAA instance and returns the attestation token (a JWT).

    ``tee_path`` and ``api_version`` are configurable: the Go sidecar's ``SevSnpVM`` +
    ``2020-10-01`` is one setting away from the default ``SevSnpVm`` + ``2022-08-01``.
    ``timeout`` is per attempt; ``retry`` retries only transient failures.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        ssl_context: ssl.SSLContext | None = None,
        tee_path: str = DEFAULT_TEE_PATH,
        api_version: str = DEFAULT_API_VERSION,
        user_agent: str = DEFAULT_USER_AGENT,
        timeout: float = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_body: int = DEFAULT_MAX_UPSTREAM_BODY,
    ) -> None:
        if not _TEE_PATH.match(tee_path):
            raise BadRequest(f"the MAA TEE path must be alphanumeric (e.g. SevSnpVm), found {tee_path!r}")
        if not api_version or not re.fullmatch(r"[0-9A-Za-z.-]+", api_version):
            raise BadRequest(f"the MAA api-version {api_version!r} is not valid", hint="e.g. 2022-08-01")
        self._session = session
        self._ssl_context = ssl_context if ssl_context is not None else client_ssl_context()
        self.tee_path = tee_path
        self.api_version = api_version
        self.user_agent = user_agent
        self.timeout = timeout
        self.retry = retry
        self.max_body = max_body

    def attest_url(self, endpoint: Endpoint) -> str:
        """``https://{instance}/attest/{tee_path}?api-version={api_version}``."""
        return f"{endpoint.url}/attest/{self.tee_path}?api-version={quote(self.api_version)}"

    async def attest(
        self,
        endpoint: Endpoint,
        evidence: Evidence,
        runtime_data: bytes,
        *,
        nonce: str | None = None,
        init_time_data: bytes | None = None,
        deadline: Deadline | None = None,
    ) -> str:
        """Attest ``evidence`` binding ``runtime_data``; returns the JWT (compact serialization).

        ``nonce``: echoed by MAA as the ``nonce`` claim; ``None`` sends a fresh random one
        (:func:`new_nonce`), the same for every retry of this call.

        Raises :class:`AttestationFailed` when MAA refuses or
        answers something unusable, :class:`skr.errors.UpstreamError` / :class:`UpstreamTimeout` when it
        stays unreachable or the deadline runs out.
        """
        url = self.attest_url(endpoint)
        nonce = new_nonce() if nonce is None else nonce
        body = build_request_body(evidence, runtime_data, nonce, init_time_data=init_time_data)
        result = await request(
            self._session,
            "POST",
            url,
            service=SERVICE,
            data=_compact_json(body),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": self.user_agent,
            },
            ssl_context=self._ssl_context,
            timeout=self.timeout,
            deadline=deadline,
            retry=self.retry,
            max_body=self.max_body,
        )
        if result.status != 200:
            raise _refusal(endpoint.url, result.status, result.body)
        try:
            doc = json.loads(result.body)
        except (ValueError, UnicodeDecodeError):
            raise AttestationFailed(
                f"{SERVICE} at {endpoint.url} answered HTTP 200 with a body that is not JSON",
                hint="check that the endpoint is an attestation instance (https://<name>.<region>.attest.azure.net)",
            ) from None
        token = _token_from(doc)
        if token is None or token.count(".") != 2:
            raise AttestationFailed(
                f"{SERVICE} at {endpoint.url} answered HTTP 200 without a JWT in 'token'",
                hint="check that the endpoint is an attestation instance and the api-version is supported",
            )
        return token


def _refusal(origin: str, status: int, body: bytes) -> AttestationFailed:
    summary = summarize_body(body) or "(no error code)"
    message = f"{SERVICE} at {origin} answered HTTP {status}: {summary}"
    if status == 400:
        hint = (
            f"the attestation service refused the evidence: {summary}; check the report, its VCEK chain "
            "and that REPORT_DATA is SHA-256 of the runtime data"
        )
    elif status in (401, 403):
        hint = "the instance requires authorization or its policy refused the request; check the endpoint"
    elif status == 404:
        hint = "check the endpoint, the TEE path (SevSnpVm) and the api-version"
    else:
        hint = "check the endpoint and the api-version"
    return AttestationFailed(message, hint=hint, upstream_status=status)
