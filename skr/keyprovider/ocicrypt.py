"""The ocicrypt key-provider protocol and the Go sidecar's annotation packet.

Owns: the JSON that travels in the key-provider bytes field (gRPC) or on stdin/stdout (``cmd``):
``{"op", "keywrapparams": {"ec", "optsdata"}, "keyunwrapparams": {"dc", "annotation"}}`` with Go field
names; ``<bytes>`` accepted as a standard-base64 string, an array of integers or ``null`` (Go ocicrypt
sends base64, ocicrypt-rs reads only integer arrays), answered as an integer array with the unused
results object left out, which both accept. The decrypt-parameter authorization
(``attestation-agent`` = ``skr``, case-insensitive, as the Go sidecar requires), the ``WrapKey``
parameter ``skr:<keypath>``, the annotation packet
``{"kid","wrapped_data","wrap_type","kms_endpoint","attester_endpoint"}`` in Go's field order, and
RSA-OAEP with SHA-256 / MGF1-SHA-256 / empty label with its plaintext limit.

Pure: no I/O, no asyncio. Never puts a plaintext, wrapped data or key material into a message or repr.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from skr.errors import BadRequest, Code

#: The decrypt/encrypt parameter name the Go sidecar reads (and CoCo's attestation agent uses).
PARAMETER = "attestation-agent"
#: The value that authorizes skr (``provider:attestation-agent:skr`` in the client's key list).
AUTHORIZING_VALUE = "skr"
#: What the Go sidecar writes as ``wrap_type`` (it never checks it when unwrapping).
WRAP_TYPE = "rsa_3072"
_SHA256_BYTES = 32

KEYWRAP = "keywrap"
KEYUNWRAP = "keyunwrap"


def _refuse(message: str, code: Code = Code.INVALID_KEYPROVIDER_REQUEST) -> BadRequest:
    return BadRequest(message, code=code)


# --- <bytes> ---------------------------------------------------------------------------------------------


def decode_bytes(value: object, *, what: str) -> bytes | None:
    """A Go ``[]byte`` / Rust ``Vec<u8>`` JSON value: standard base64 string, integer array, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _refuse(f"{what} is neither standard base64 nor an array of byte values") from None
    if isinstance(value, list):
        if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value):
            raise _refuse(f"{what} is an array, but not of byte values (integers 0 to 255)")
        return bytes(value)
    raise _refuse(f"{what} must be a base64 string, an array of byte values or null")


# --- requests --------------------------------------------------------------------------------------------


Parameters = Mapping[str, tuple[bytes, ...]]


@dataclass(frozen=True)
class KeyProviderRequest:
    """One parsed key-provider request; absent parts are None."""

    op: str
    ec_parameters: Parameters | None = None
    optsdata: bytes | None = field(default=None, repr=False)
    dc_parameters: Parameters | None = None
    annotation: bytes | None = field(default=None, repr=False)


def _object(value: object, what: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _refuse(f"{what} must be a JSON object or null")
    return value


def _parameters(config: Mapping[str, Any] | None, what: str) -> Parameters | None:
    """``{"Parameters": {"<name>": [<bytes>, ...]}}`` (Go ``map[string][][]byte``)."""
    if config is None:
        return None
    params = _object(config.get("Parameters"), f"{what}.Parameters")
    if params is None:
        return {}
    out: dict[str, tuple[bytes, ...]] = {}
    for name, values in params.items():
        if values is None:
            out[name] = ()
            continue
        if not isinstance(values, list):
            raise _refuse(f"{what}.Parameters[{name[:40]!r}] must be an array")
        decoded = (decode_bytes(v, what=f"a value of {what}.Parameters[{name[:40]!r}]") for v in values)
        out[name] = tuple(v for v in decoded if v is not None)
    return out


def parse_request(raw: bytes) -> KeyProviderRequest:
    """Parse the key-provider JSON. Raises :class:`BadRequest` (``invalid_keyprovider_request``)."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise _refuse("the key-provider request is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise _refuse("the key-provider request is not JSON") from None
    if not isinstance(doc, dict):
        raise _refuse("the key-provider request must be a JSON object")
    op = doc.get("op")
    if op not in (KEYWRAP, KEYUNWRAP):
        raise _refuse('the key-provider request\'s "op" must be "keywrap" or "keyunwrap"')
    wrap = _object(doc.get("keywrapparams"), "keywrapparams") or {}
    unwrap = _object(doc.get("keyunwrapparams"), "keyunwrapparams") or {}
    ec = _object(wrap.get("ec"), "keywrapparams.ec")
    return KeyProviderRequest(
        op=op,
        ec_parameters=_parameters(ec, "keywrapparams.ec"),
        optsdata=decode_bytes(wrap.get("optsdata"), what="keywrapparams.optsdata"),
        dc_parameters=_parameters(_object(unwrap.get("dc"), "keyunwrapparams.dc"), "keyunwrapparams.dc"),
        annotation=decode_bytes(unwrap.get("annotation"), what="keyunwrapparams.annotation"),
    )


def _first(params: Parameters | None, where: str) -> bytes:
    values = (params or {}).get(PARAMETER, ())
    if not values:
        raise _refuse(
            f"{where} has no {PARAMETER!r} parameter: this layer is not for skr "
            f"(decrypt with the key provider:{PARAMETER}:{AUTHORIZING_VALUE})",
            code=Code.PROVIDER_PARAMETER_MISMATCH,
        )
    return values[0]


def authorize_unwrap(request: KeyProviderRequest) -> None:
    """The Go sidecar's check: ``dc.Parameters["attestation-agent"][0]`` is ``skr`` (any case).

    ocicrypt calls every configured provider whose annotation is on a layer, whatever key the user named,
    so this is what keeps skr from answering a request that was not meant for it.
    """
    value = _first(request.dc_parameters, "the decrypt config")
    if value.decode("utf-8", "replace").lower() != AUTHORIZING_VALUE:
        raise _refuse(
            f"the decrypt parameter {PARAMETER!r} does not name skr: this request is for another provider",
            code=Code.PROVIDER_PARAMETER_MISMATCH,
        )


def wrap_keypath(request: KeyProviderRequest) -> str:
    """The key path of ``WrapKey``'s ``ec.Parameters["attestation-agent"][0]`` = ``skr:<keypath>``."""
    value = _first(request.ec_parameters, "the encrypt config").decode("utf-8", "replace")
    tokens = value.split(":")
    if len(tokens) < 2 or not tokens[1]:
        raise _refuse(
            f"the encrypt parameter {PARAMETER!r} must be skr:<keypath>",
            code=Code.PROVIDER_PARAMETER_MISMATCH,
        )
    if tokens[0].lower() != AUTHORIZING_VALUE:
        raise _refuse(
            f"the encrypt parameter {PARAMETER!r} does not name skr: this request is for another provider",
            code=Code.PROVIDER_PARAMETER_MISMATCH,
        )
    return tokens[1]


# --- answers -------------------------------------------------------------------------------------------


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def unwrap_answer(optsdata: bytes) -> bytes:
    """``{"keyunwrapresults":{"optsdata":[...]}}``: the unused ``keywrapresults`` is left out."""
    return _dumps({"keyunwrapresults": {"optsdata": list(optsdata)}})


def wrap_answer(annotation: bytes) -> bytes:
    """``{"keywrapresults":{"annotation":[...]}}``: the unused ``keyunwrapresults`` is left out."""
    return _dumps({"keywrapresults": {"annotation": list(annotation)}})


def unwrap_request(annotation: bytes) -> bytes:
    """An unwrap request as Go ocicrypt sends it (base64 strings), authorized for skr."""
    return _dumps(
        {
            "op": KEYUNWRAP,
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {
                "dc": {"Parameters": {PARAMETER: [base64.b64encode(AUTHORIZING_VALUE.encode()).decode()]}},
                "annotation": base64.b64encode(annotation).decode(),
            },
        }
    )


def parse_answer(raw: bytes) -> tuple[bytes | None, bytes | None]:
    """(annotation, optsdata) of a provider's answer, in either byte encoding (for clients and tests)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _refuse("the key-provider answer is not JSON") from None
    if not isinstance(doc, dict):
        raise _refuse("the key-provider answer must be a JSON object")
    wrapped = _object(doc.get("keywrapresults"), "keywrapresults") or {}
    unwrapped = _object(doc.get("keyunwrapresults"), "keyunwrapresults") or {}
    return (
        decode_bytes(wrapped.get("annotation"), what="keywrapresults.annotation"),
        decode_bytes(unwrapped.get("optsdata"), what="keyunwrapresults.optsdata"),
    )


# --- the Go sidecar's annotation packet -------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotationPacket:
    """What the wrap tool writes and ``UnWrapKey`` reads: which key to release from where, and the
    RSA-OAEP-SHA256 ciphertext."""

    kid: str
    wrapped_data: bytes = field(repr=False)
    wrap_type: str = WRAP_TYPE
    kms_endpoint: str = ""
    attester_endpoint: str = ""
    iv: bytes = b""


_GO_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def encode_annotation(packet: AnnotationPacket) -> bytes:
    """The packet's JSON exactly as Go's ``json.Marshal`` writes it (field order, empty fields omitted)."""
    doc: dict[str, Any] = {"kid": packet.kid, "wrapped_data": base64.b64encode(packet.wrapped_data).decode()}
    if packet.iv:
        doc["iv"] = base64.b64encode(packet.iv).decode()
    for name in ("wrap_type", "kms_endpoint", "attester_endpoint"):
        if getattr(packet, name):
            doc[name] = getattr(packet, name)
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in _GO_HTML_ESCAPES.items():
        text = text.replace(char, escaped)
    return text.encode()


def _text(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _refuse(f"the annotation packet's {name!r} must be a string", code=Code.INVALID_ANNOTATION)
    return value


def parse_annotation(raw: bytes) -> AnnotationPacket:
    """The Go sidecar's annotation packet. Raises :class:`BadRequest` (``invalid_annotation``)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _refuse(
            "the annotation is not the JSON packet skr wrap (or the Go sidecar) writes",
            code=Code.INVALID_ANNOTATION,
        ) from None
    if not isinstance(doc, dict):
        raise _refuse("the annotation packet must be a JSON object", code=Code.INVALID_ANNOTATION)
    kid = _text(doc, "kid")
    if not kid:
        raise _refuse("the annotation packet has no kid", code=Code.INVALID_ANNOTATION)
    wrapped = doc.get("wrapped_data")
    if not isinstance(wrapped, str) or not wrapped:
        raise _refuse("the annotation packet has no wrapped_data", code=Code.INVALID_ANNOTATION)
    try:
        wrapped_data = base64.b64decode(wrapped, validate=True)
        iv = base64.b64decode(_text(doc, "iv"), validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(
            "the annotation packet's wrapped_data or iv is not standard base64", code=Code.INVALID_ANNOTATION
        ) from None
    return AnnotationPacket(
        kid=kid,
        wrapped_data=wrapped_data,
        wrap_type=_text(doc, "wrap_type"),
        kms_endpoint=_text(doc, "kms_endpoint"),
        attester_endpoint=_text(doc, "attester_endpoint"),
        iv=iv,
    )


# --- RSA-OAEP-SHA256 ------------------------------------------------------------------------------------


def oaep_sha256() -> padding.OAEP:
    """RSA-OAEP, SHA-256, MGF1-SHA-256, empty label: Go's ``rsa.EncryptOAEP(sha256.New(), …, nil)``."""
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def oaep_sha256_limit(key_size: int) -> int:
    """The longest plaintext RSA-OAEP-SHA256 takes for a key of ``key_size`` bits (318 B for RSA-3072)."""
    return (key_size + 7) // 8 - 2 * _SHA256_BYTES - 2


def oaep_wrap(public_key: rsa.RSAPublicKey, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext``; refuses, with a sentence, one over the key size's limit."""
    limit = oaep_sha256_limit(public_key.key_size)
    if len(plaintext) > limit:
        raise BadRequest(
            f"the plaintext is {len(plaintext)} bytes, but RSA-OAEP-SHA256 with an RSA-{public_key.key_size} "
            f"key takes at most {limit} bytes",
            hint="wrap a short secret such as an image layer's key options or an AES key, not a file",
            code=Code.PLAINTEXT_TOO_LONG,
        )
    return public_key.encrypt(plaintext, oaep_sha256())
