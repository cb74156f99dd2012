"""The OpenAPI 3.1 document of the sidecar's HTTP API, served at ``/openapi.json``.

A test keeps it true: every route of the app is documented, every documented route exists, and the
responses of a real run validate against these schemas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from skr import __version__
from skr.endpoints import KEY_NAME_PATTERN, KEY_VERSION_PATTERN


def _object(required: Sequence[str] = (), /, **properties: Any) -> dict[str, Any]:
    """A JSON object schema with these required names (if any) and properties."""
    return {"type": "object", **({"required": list(required)} if required else {}), "properties": properties}


_ERROR = _object(
    ["error", "code", "request_id"],
    error={"type": "string", "description": "One clear sentence."},
    code={"type": "string", "pattern": "^[a-z][a-z0-9_]*$", "description": "Stable snake_case code."},
    request_id={"type": "string"},
    hint={"type": "string", "description": "What to check."},
)
_B64 = {"type": "string", "description": "Standard base64 (RFC 4648 §4) with padding."}
# What the server accepts, so that the document stays true (tests/test_schemathesis.py): standard base64
# with padding, CR/LF ignored anywhere (Go's base64.StdEncoding); a DNS name or IPv4 address with an
# optional port and https:// prefix ("" means the configured default); a key name[/version] or key URL.
_C = r"[\r\n]*[A-Za-z0-9+/]"
_B64_PATTERN = rf"^(?:(?:{_C}){{4}})*(?:(?:{_C}){{2}}[\r\n]*=[\r\n]*=|(?:{_C}){{3}}[\r\n]*=)?[\r\n]*$"
_B64_NONEMPTY_PATTERN = (
    rf"^(?:(?:{_C}){{4}})*(?:(?:{_C}){{4}}|(?:{_C}){{2}}[\r\n]*=[\r\n]*=|(?:{_C}){{3}}[\r\n]*=)[\r\n]*$"
)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTPORT = rf"{_LABEL}(?:\.{_LABEL})*(?::[1-9][0-9]{{0,3}})?"
_KID_PATTERN = rf"^(?:https://{_HOSTPORT}/keys/)?{KEY_NAME_PATTERN}(?:/{KEY_VERSION_PATTERN})?$"
_RUNTIME = _object(["runtime_data"], runtime_data={**_B64, "minLength": 1, "pattern": _B64_PATTERN})
_HOST = {
    "type": ["string", "null"],
    "pattern": rf"^(?:(?:https://)?{_HOSTPORT}/?)?$",
    "description": "host, host:port or https://host[:port]; must pass the allowlist. Empty or null: the "
    "configured default.",
}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad input.",
        401: "Client token missing or wrong (only when SKR_CLIENT_TOKEN_FILE is set).",
        403: "Release denied, endpoint not allowed, non-loopback client, or a foreign Host or Origin.",
        404: "Unknown key.",
        413: "Body too large.",
        429: "Asked again within a second (GET /audit/head).",
        500: "The audit log cannot be written (code audit_failed); nothing was released.",
        502: "An upstream service failed.",
        503: "Evidence unavailable.",
        504: "Deadline exceeded.",
    }
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _post(summary: str, request: dict[str, Any], ok: dict[str, Any], *codes: int) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {"200": _json(ok, "Success."), **_errors(400, 401, 403, 413, *codes)},
        }
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call)."""
    obj = {"type": "object"}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "skr — Secure Key Release sidecar",
            "version": __version__,
            "description": "Drop-in compatible with Microsoft's confidential-sidecar-containers SKR API.",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "paths": {
            "/status": {
                "get": {
                    "summary": "Go-compatible liveness.",
                    "responses": {
                        "200": _json(_object(["message"], message={"const": "Status OK"}), "Alive.")
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process is alive.",
                    "responses": {"200": _json(_object(status={"const": "ok"}), "Alive.")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Evidence source usable, policy-hash self-check passed, wrapping key ready.",
                    "responses": {
                        code: _json(
                            _object(
                                ["ready", "checks"],
                                ready={"type": "boolean"},
                                checks=obj,
                                warnings={"type": "array", "items": {"type": "string"}},
                            ),
                            text,
                        )
                        for code, text in (("200", "Ready."), ("503", "Not ready; checks say why."))
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text format 0.0.4).",
                    "responses": {
                        "200": {
                            "description": "Metrics.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_errors(401),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {"200": _json(obj, "OpenAPI 3.1."), **_errors(401)},
                }
            },
            "/attest/raw": _post(
                "A raw SEV-SNP report with REPORT_DATA = SHA-256(runtime_data) ‖ 32 zero bytes.",
                _RUNTIME,
                _object(["report"], report={"type": "string", "pattern": "^[0-9a-f]+$"}),
                503,
                504,
            ),
            "/attest/combined": _post(
                "The report with its collateral (VCEK chain, endorsed TCB, UVM endorsement).",
                _RUNTIME,
                _object(
                    ["endorsed_tcb", "endorsements", "evidence", "uvm_endorsements"],
                    endorsed_tcb={"type": "string"},
                    endorsements=_B64,
                    evidence=_B64,
                    uvm_endorsements={"type": "string"},
                ),
                503,
                504,
            ),
            "/attest/maa": _post(
                "An MAA token for the caller's runtime data (sent as JSON runtime data).",
                {
                    **_RUNTIME,
                    "properties": {
                        "runtime_data": {
                            **_B64,
                            "minLength": 1,
                            "pattern": _B64_NONEMPTY_PATTERN,
                            "contentEncoding": "base64",
                            "contentMediaType": "application/json",
                            "description": "Standard base64 of a UTF-8 JSON object"
                            " (MAA receives it as JSON runtime data).",
                            "examples": ["eyJub25jZSI6ImFiYyJ9"],
                        },
                        "maa_endpoint": _HOST,
                    },
                },
                _object(["token"], token={"type": "string"}),
                502,
                503,
                504,
            ),
            "/key/release": _post(
                "Release a key from Azure Key Vault / Managed HSM; the JWK comes back as a JSON string.",
                _object(
                    ["kid"],
                    kid={
                        "type": "string",
                        "minLength": 1,
                        "pattern": _KID_PATTERN,
                        "description": "name, name/version, or a key URL https://<vault>/keys/<name>[/<version>]"
                        " (whose vault must be akv_endpoint's when both are given)",
                    },
                    maa_endpoint=_HOST,
                    akv_endpoint=_HOST,
                    access_token={
                        "type": ["string", "null"],
                        "pattern": r"^(?:[A-Za-z0-9._~+/-]+=*)?$",
                        "description": "Optional AAD token for the vault.",
                    },
                ),
                _object(
                    ["key"], key={"type": "string", "description": "The JWK, serialized with sorted keys."}
                ),
                404,
                500,
                502,
                503,
                504,
            ),
            "/audit/head": {
                "get": {
                    "summary": "A fresh hardware-signed statement over the audit head, not written to the "
                    "log (loopback only; one per second). REPORT_DATA = SHA-512 of the canonical JSON of "
                    '{"covers_seq","head","instance","time"}.',
                    "responses": {
                        "200": _json(
                            _object(
                                ["covers_seq", "head", "instance", "time", "evidence"],
                                covers_seq={"type": "integer", "minimum": 0},
                                head={"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                instance={"type": "string"},
                                time={"type": "string"},
                                evidence=_object(
                                    ["provider", "report", "vcek_chain"],
                                    provider={"type": "string"},
                                    report=_B64,
                                    vcek_chain={"type": "string"},
                                    uvm_endorsement_sha256={"type": "string"},
                                ),
                            ),
                            "The statement and its SEV-SNP evidence.",
                        ),
                        **_errors(401, 403, 404, 429, 503),
                    },
                }
            },
        },
        "components": {"schemas": {"Error": _ERROR}},
    }
    doc["paths"]["/key/unwrap"] = _unwrap_path(doc["paths"]["/key/release"])
    return doc


def _unwrap_path(release: dict[str, Any]) -> dict[str, Any]:
    """``/key/unwrap``: the request of ``/key/release`` plus the wrapped data and its algorithm."""
    from skr.keyprovider.algorithms import SUPPORTED_ALGORITHMS

    request = release["post"]["requestBody"]["content"]["application/json"]["schema"]
    return _post(
        "Release a key inside the sidecar and decrypt wrapped_data with it; only the plaintext comes back.",
        {
            **request,
            "required": ["kid", "wrapped_data", "alg"],
            "properties": {
                **request["properties"],
                "wrapped_data": {**_B64, "minLength": 1, "pattern": _B64_NONEMPTY_PATTERN},
                "alg": {
                    "enum": list(SUPPORTED_ALGORITHMS),
                    "description": "RSA-OAEP-256 / RSA-OAEP (RSA keys), A128KW / A192KW / A256KW (oct keys).",
                },
            },
        },
        _object(["plaintext"], plaintext={**_B64, "description": "The decrypted bytes, standard base64."}),
        404,
        502,
        503,
        504,
    )
