"""``WrapKey`` and ``UnWrapKey``: the key-provider operations over the sidecar's release service.

Owns the order of the checks for one key-provider request: parse it, check ``op``, authorize it by the
decrypt parameter (``attestation-agent`` = ``skr``), read the annotation packet, then release the RSA key
through :meth:`skr.service.ReleaseService.unwrap` — the same release path as ``/key/release`` (allowlist,
token cache, deadline, audit record ``key.unwrap``) — and RSA-OAEP-SHA256-decrypt ``wrapped_data``.
``WrapKey`` is the Go sidecar's: ``skr:<keypath>`` names ``<keypath>-info.json`` on this machine.

Transport-free: the gRPC server and the ``cmd`` provider (``skr keyprovider --direct``) call it. Never
logs a request body, an annotation or a plaintext.
"""

from __future__ import annotations

import asyncio

from skr.errors import BadRequest, Code
from skr.keyprovider.algorithms import decrypt
from skr.keyprovider.keyinfo import wrap_for_keypath
from skr.keyprovider.ocicrypt import (
    KEYUNWRAP,
    KEYWRAP,
    AnnotationPacket,
    KeyProviderRequest,
    authorize_unwrap,
    parse_annotation,
    parse_request,
    unwrap_answer,
    wrap_answer,
    wrap_keypath,
)
from skr.service import ReleaseService, RequestContext

#: The algorithm of the Go sidecar's packets (``wrap_type`` is never checked, as in Go).
PACKET_ALG = "RSA-OAEP-256"


def unwrap_packet(raw: bytes) -> AnnotationPacket:
    """The annotation packet of an authorized ``keyunwrap`` request (everything checked before a release)."""
    request = _expect(parse_request(raw), KEYUNWRAP)
    authorize_unwrap(request)
    if not request.annotation:
        raise BadRequest("the unwrap request carries no annotation", code=Code.INVALID_KEYPROVIDER_REQUEST)
    return parse_annotation(request.annotation)


def _expect(request: KeyProviderRequest, op: str) -> KeyProviderRequest:
    if request.op != op:
        raise BadRequest(
            f'this call takes "op": "{op}", the request says "{request.op}"',
            code=Code.INVALID_KEYPROVIDER_REQUEST,
        )
    return request


class KeyProvider:
    """The key-provider operations of one sidecar (one :class:`ReleaseService`)."""

    def __init__(self, service: ReleaseService) -> None:
        self.service = service

    async def unwrap_key(self, raw: bytes, ctx: RequestContext) -> bytes:
        """``UnWrapKey``: the answer JSON ``{"keyunwrapresults":{"optsdata":[...]}}``."""
        packet = unwrap_packet(raw)
        wrapped = packet.wrapped_data
        plaintext = await self.service.unwrap(
            kid=packet.kid,
            maa_endpoint=packet.attester_endpoint or None,
            akv_endpoint=packet.kms_endpoint or None,
            access_token=None,
            ctx=ctx,
            decrypt=lambda jwk_json: decrypt(PACKET_ALG, jwk_json, wrapped),
        )
        return unwrap_answer(plaintext)

    async def wrap_key(self, raw: bytes) -> bytes:
        """``WrapKey``: the answer JSON ``{"keywrapresults":{"annotation":[...]}}``."""
        return await asyncio.to_thread(wrap_key_locally, raw)


def wrap_key_locally(raw: bytes) -> bytes:
    """``WrapKey`` without a sidecar: it needs only the public key named by ``<keypath>-info.json``."""
    request = _expect(parse_request(raw), KEYWRAP)
    keypath = wrap_keypath(request)
    if request.optsdata is None:
        raise BadRequest("the wrap request carries no optsdata", code=Code.INVALID_KEYPROVIDER_REQUEST)
    return wrap_answer(wrap_for_keypath(keypath, request.optsdata))
