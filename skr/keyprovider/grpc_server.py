"""The gRPC server: a drop-in for the Go sidecar's ``-server_type grpc`` mode (optional extra ``grpc``).

Owns: one ``grpc.aio`` server on the sidecar's event loop, serving ``WrapKey``, ``UnWrapKey``,
``GetReport``, ``GetAttestationData`` and ``SayHello`` under **both** service names —
``key_provider.KeyProviderService`` (the Go sidecar since its July 2025 rename) and
``keyprovider.KeyProviderService`` (ocicrypt, and the Go sidecar before it) — with the messages of the
checked-in protos (``skr/keyprovider/protos``); server reflection; the standard health service (SERVING once
the sidecar is ready); the loopback-only rule and the client token (``authorization: Bearer`` metadata);
and the error model: a gRPC status code (:data:`STATUS_CODES`) with a one-sentence message, the stable
error code and the request id in trailing metadata, never a traceback.

``GetReport`` keeps the Go sidecar's quirk: REPORT_DATA = SHA-256 of the UTF-8 bytes of the hex string the
caller sends (not of the bytes it spells) ‖ 32 zero bytes. ``GetAttestationData`` answers what
``/attest/combined`` answers.

Every use case is :class:`skr.service.ReleaseService`'s (one token cache, audit log, allowlist and deadline
with the HTTP API). Never logs a request body, an annotation or a plaintext.
"""

from __future__ import annotations

import binascii
import hmac
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from skr.b64 import go_std_b64decode
from skr.errors import (
    BadRequest,
    Code,
    ConfigError,
    EvidenceUnavailable,
    Forbidden,
    NotFound,
    RemoteClientRefused,
    SkrError,
    Unauthenticated,
    UpstreamError,
    UpstreamTimeout,
    VerificationError,
    by_class,
)
from skr.hostcheck import is_loopback_host
from skr.keyprovider.protos import key_provider_pb2, keyprovider_pb2
from skr.keyprovider.provider import KeyProvider
from skr.logs import request_id_var
from skr.service import ReleaseService, RequestContext

log = logging.getLogger("skr.grpc")

T = TypeVar("T")

#: The two names one handler answers under (method paths ``/<name>/<Method>``).
SERVICE_NAMES: tuple[str, ...] = ("key_provider.KeyProviderService", "keyprovider.KeyProviderService")
_PACKAGES: tuple[ModuleType, ...] = (key_provider_pb2, keyprovider_pb2)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: The gRPC status of each domain error class, most specific class first by MRO (see
#: :func:`skr.errors.by_class`); anything else is INTERNAL. The same classes as the HTTP table in
#: ``skr/server.py``: a 413 is INVALID_ARGUMENT, 502 and 503 are UNAVAILABLE.
STATUS_CODES: dict[type[SkrError], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    VerificationError: grpc.StatusCode.UNAVAILABLE,
    UpstreamError: grpc.StatusCode.UNAVAILABLE,
    EvidenceUnavailable: grpc.StatusCode.UNAVAILABLE,
    UpstreamTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
}

#: The statuses that blame the caller: logged as warnings, everything else as errors.
CALLER_FAULTS = frozenset(STATUS_CODES[c] for c in (BadRequest, Unauthenticated, Forbidden, NotFound))


def status_code(exc: SkrError) -> grpc.StatusCode:
    return by_class(STATUS_CODES, exc, grpc.StatusCode.INTERNAL)


def _is_loopback_peer(peer: str) -> bool:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` / ``unix:…`` → on this machine's loopback?"""
    host = _peer_host(peer)
    return peer.startswith("unix:") or (host is not None and is_loopback_host(host.split("%")[0]))


def _peer_host(peer: str) -> str | None:
    kind, _, rest = peer.partition(":")
    return rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else None


def decode_b64_runtime_data(value: str) -> bytes:
    """Standard base64 with padding, CR/LF ignored (Go's ``base64.StdEncoding``), as ``/attest/*`` reads."""
    try:
        return go_std_b64decode(value)
    except (binascii.Error, ValueError):
        raise BadRequest(
            "b64_runtime_data_string is not standard base64 (RFC 4648 §4 alphabet with '=' padding)",
            code=Code.INVALID_BASE64,
        ) from None


@dataclass(frozen=True)
class _Messages:
    """One package's message classes and the name of the bytes field of its key-wrap messages."""

    hello_in: Any
    hello_out: Any
    wrap_in: Any
    wrap_out: Any
    report_in: Any
    report_out: Any
    data_in: Any
    data_out: Any

    @classmethod
    def of(cls, module: ModuleType) -> _Messages:
        # ocicrypt's package spells the names keyProvider…, the Go sidecar's renamed one KeyProvider…
        prefix = "KeyProvider" if module is key_provider_pb2 else "keyProvider"
        kinds = ("KeyWrapProtocol", "GetReport", "GetAttestationData")
        messages = [getattr(module, f"{prefix}{kind}{end}") for kind in kinds for end in ("Input", "Output")]
        return cls(module.HelloRequest, module.HelloReply, *messages)

    def bytes_in(self, request: Any) -> bytes:
        value: bytes = getattr(request, self.wrap_in.DESCRIPTOR.fields[0].name)
        return value

    def bytes_out(self, data: bytes) -> Any:
        return self.wrap_out(**{self.wrap_out.DESCRIPTOR.fields[0].name: data})

    @staticmethod
    def text_out(message_type: Any, text: str) -> Any:
        return message_type(**{message_type.DESCRIPTOR.fields[0].name: text})

    def text_in(self, request: Any) -> str:
        value: str = getattr(request, request.DESCRIPTOR.fields[0].name)
        return value


class KeyProviderServicer:
    """The five methods over one :class:`ReleaseService`; ``handlers()`` registers them under a name."""

    def __init__(self, service: ReleaseService) -> None:
        self.service = service
        self.provider = KeyProvider(service)

    # --- the frame every method runs in ------------------------------------------------------------------

    async def _answer(
        self,
        context: aio.ServicerContext[Any, Any],
        method: str,
        work: Callable[[RequestContext], Awaitable[T]],
        *,
        authenticated: bool = True,
    ) -> T:
        supplied = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        request_id = (
            supplied if isinstance(supplied, str) and _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        )
        token = request_id_var.set(request_id)
        peer = context.peer() or ""
        ctx = RequestContext(request_id=request_id, client=_peer_host(peer))
        metrics = self.service.metrics
        try:
            if not self.service.settings.allow_remote and not _is_loopback_peer(peer):
                raise RemoteClientRefused("this sidecar only answers clients on the loopback interface")
            if authenticated:
                self._authenticate(context)
            result = await work(ctx)
            metrics.grpc_requests.inc(method=method, code="OK")
            return result
        except SkrError as exc:
            code = status_code(exc)
            level = logging.WARNING if code in CALLER_FAULTS else logging.ERROR
            log.log(
                level, "grpc call failed", extra={"method": method, "status": code.name, "code": exc.code}
            )
            metrics.grpc_requests.inc(method=method, code=code.name)
            context.set_trailing_metadata((("skr-error-code", exc.code), ("x-request-id", request_id)))
            await context.abort(code, exc.message)
        except aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error", extra={"method": method})
            metrics.grpc_requests.inc(method=method, code="INTERNAL")
            context.set_trailing_metadata(
                (("skr-error-code", "internal_error"), ("x-request-id", request_id))
            )
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal error; see the sidecar log for this request id"
            )
        finally:
            request_id_var.reset(token)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _authenticate(self, context: aio.ServicerContext[Any, Any]) -> None:
        expected = self.service.settings.client_token
        if expected is None:
            return
        header = str(dict(context.invocation_metadata() or ()).get("authorization", ""))
        presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise Unauthenticated(
                "this sidecar requires a client token: send metadata authorization: Bearer <token>"
            )

    # --- handlers --------------------------------------------------------------------------------------

    def handlers(self, name: str, messages: _Messages) -> grpc.GenericRpcHandler:
        async def wrap_key(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            raw = messages.bytes_in(request)
            return messages.bytes_out(
                await self._answer(context, "WrapKey", lambda _: self.provider.wrap_key(raw))
            )

        async def unwrap_key(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            raw = messages.bytes_in(request)
            answer = await self._answer(context, "UnWrapKey", lambda ctx: self.provider.unwrap_key(raw, ctx))
            return messages.bytes_out(answer)

        async def get_report(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            # The Go quirk, kept: the report binds SHA-256 of the hex *string*, not of the bytes it spells.
            text = messages.text_in(request).encode("utf-8")
            report = await self._answer(context, "GetReport", lambda ctx: self.service.raw_report(text, ctx))
            return messages.text_out(messages.report_out, report.hex())

        async def get_attestation_data(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            text = messages.text_in(request)
            body = await self._answer(
                context,
                "GetAttestationData",
                lambda ctx: self.service.combined(decode_b64_runtime_data(text), ctx),
            )
            return messages.data_out(
                endorsed_tcb=body["endorsed_tcb"],
                certs=body["endorsements"],
                attestation_report=body["evidence"],
                uvm_reference_info=body["uvm_endorsements"],
            )

        async def say_hello(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            name_ = messages.text_in(request)

            async def work(_: RequestContext) -> str:
                return "Hello " + name_

            return messages.hello_out(
                message=await self._answer(context, "SayHello", work, authenticated=False)
            )

        def unary(
            fn: Callable[..., Any], request_type: Any, response_type: Any
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            name,
            {
                "WrapKey": unary(wrap_key, messages.wrap_in, messages.wrap_out),
                "UnWrapKey": unary(unwrap_key, messages.wrap_in, messages.wrap_out),
                "GetReport": unary(get_report, messages.report_in, messages.report_out),
                "GetAttestationData": unary(get_attestation_data, messages.data_in, messages.data_out),
                "SayHello": unary(say_hello, messages.hello_in, messages.hello_out),
            },
        )


class GrpcServer:
    """The running gRPC server of one sidecar: :meth:`start`, :meth:`mark_ready`, :meth:`stop`."""

    def __init__(self, service: ReleaseService, *, host: str, port: int) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.server = aio.server(
            options=[
                # the HTTP API's body limit (SKR_MAX_BODY); larger messages get RESOURCE_EXHAUSTED
                ("grpc.max_receive_message_length", service.settings.max_body),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
            ]
        )
        servicer = KeyProviderServicer(service)
        self.server.add_generic_rpc_handlers(
            [
                servicer.handlers(name, _Messages.of(module))
                for name, module in zip(SERVICE_NAMES, _PACKAGES, strict=True)
            ]
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with port 0). :class:`ConfigError` if it cannot."""
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            bound = self.server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(f"cannot listen for gRPC on {address}: the address is in use or not available")
        await self.server.start()
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        return bound

    async def mark_ready(self) -> None:
        """Health SERVING when the sidecar's self-check passed (``/readyz``'s verdict), else NOT_SERVING."""
        ready = self.service.ready and self.service.wrapping_key_ready
        await self._set(
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def _set(self, status: Any) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace`` seconds, then cancel them."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
