"""The gRPC key provider against the local stack: a Python grpcio client calls every method under both
service names (``key_provider.KeyProviderService`` and ``keyprovider.KeyProviderService``).

The server is the real :class:`GrpcServer` on the stack sidecar's own release service (one token cache,
one audit log); requests are built from the checked-in protos, the ocicrypt JSON as the Go client sends it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc import aio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from skr.cli import main
from skr.errors import ConfigError
from skr.keyprovider.grpc_server import SERVICE_NAMES, GrpcServer
from skr.keyprovider.keyinfo import write_key_info
from skr.keyprovider.protos import key_provider_pb2, keyprovider_pb2
from skr.local.faults import FaultRule
from tests.e2e import b64, bound_policy, post, stack_session
from tests.kvstack import OTHER_HOST_DATA
from tests.sidecars import audit_records, extra_sidecar

pytestmark = pytest.mark.asyncio(loop_scope="module")

OPTSDATA = (
    b'{"symkey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","digest":"sha256:cd","cipheroptions":{}}'
)
NEW, OLD = SERVICE_NAMES
BOTH = pytest.mark.parametrize("service", SERVICE_NAMES)


class Client:
    """Calls ``/<service>/<Method>`` with the messages of that service's package."""

    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel

    @staticmethod
    def messages(service: str) -> dict[str, tuple[Any, Any]]:
        if service == NEW:
            m: Any = key_provider_pb2
            wrap = (m.KeyProviderKeyWrapProtocolInput, m.KeyProviderKeyWrapProtocolOutput)
            return {
                "WrapKey": wrap,
                "UnWrapKey": wrap,
                "GetReport": (m.KeyProviderGetReportInput, m.KeyProviderGetReportOutput),
                "GetAttestationData": (
                    m.KeyProviderGetAttestationDataInput,
                    m.KeyProviderGetAttestationDataOutput,
                ),
                "SayHello": (m.HelloRequest, m.HelloReply),
            }
        m = keyprovider_pb2
        wrap = (m.keyProviderKeyWrapProtocolInput, m.keyProviderKeyWrapProtocolOutput)
        return {
            "WrapKey": wrap,
            "UnWrapKey": wrap,
            "GetReport": (m.keyProviderGetReportInput, m.keyProviderGetReportOutput),
            "GetAttestationData": (
                m.keyProviderGetAttestationDataInput,
                m.keyProviderGetAttestationDataOutput,
            ),
            "SayHello": (m.HelloRequest, m.HelloReply),
        }

    async def call(self, service: str, method: str, value: Any, metadata: Any = None) -> Any:
        request_type, response_type = self.messages(service)[method]
        field = request_type.DESCRIPTOR.fields[0].name
        rpc = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return await rpc(request_type(**{field: value}), metadata=metadata, timeout=30)

    async def keywrap(self, service: str, method: str, payload: bytes, metadata: Any = None) -> bytes:
        response = await self.call(service, method, payload, metadata)
        data: bytes = getattr(response, response.DESCRIPTOR.fields[0].name)
        return data


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def env(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    async for stack, http in stack_session(state):
        assert stack.runtime is not None
        server = GrpcServer(stack.runtime.service, host="127.0.0.1", port=0)
        port = await server.start()
        await server.mark_ready()
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield stack, http, Client(channel), server
        await server.stop(1.0)


@pytest.fixture(scope="module")
def image_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 3072)


def unwrap_json(annotation_b64: str, dc: str = "c2ty") -> bytes:
    """The Go sidecar's documented UnWrapKey input (GO_SIDECAR.md §1), as Go ocicrypt encodes it."""
    return (
        b'{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":'
        b'{"attestation-agent":["' + dc.encode() + b'"]}},"annotation":"' + annotation_b64.encode() + b'"}}'
    )


async def wrapped(stack, tmp_path, name, key, host_data=None):
    """Import ``key`` under a release policy and run `skr wrap` on OPTSDATA: the outfile's text."""
    await stack.key_service.import_key(name, key, release_policy=bound_policy(stack, host_data))
    keypath = tmp_path / name
    write_key_info(
        keypath,
        key.public_key(),
        kms_endpoint=stack.info["akv_endpoint"],
        attester_endpoint=stack.info["maa_endpoint"],
    )
    (tmp_path / "in").write_bytes(OPTSDATA)
    out = tmp_path / f"{name}.out"
    assert (
        main(["wrap", "--infile", str(tmp_path / "in"), "--keypath", str(keypath), "--outfile", str(out)])
        == 0
    )
    return out.read_text()


def trailing(exc: aio.AioRpcError) -> dict[str, str]:
    return {k: str(v) for k, v in (exc.trailing_metadata() or ())}


# --- every method under both names ----------------------------------------------------------------------


@BOTH
async def test_say_hello(env, service):
    _, _, client, _ = env
    assert (await client.call(service, "SayHello", "skr")).message == "Hello skr"


@BOTH
async def test_get_report_hashes_the_hex_string_as_go_does(env, service):
    _, _, client, _ = env
    hex_string = "00112233" * 8
    answer = await client.call(service, "GetReport", hex_string)
    report = bytes.fromhex(answer.report_hex_string if service == NEW else answer.reportHexString)
    assert len(report) == 1184
    # the Go quirk: SHA-256 over the UTF-8 of the hex *string*, not over the 32 bytes it spells
    assert report[0x50:0x90] == hashlib.sha256(hex_string.encode()).digest() + bytes(32)


@BOTH
async def test_get_attestation_data_is_attest_combined(env, service):
    _, http, client, _ = env
    runtime = b'{"nonce":"grpc"}'
    answer = await client.call(service, "GetAttestationData", b64(runtime))
    status, combined = await post(http, "/attest/combined", {"runtime_data": b64(runtime)})
    assert status == 200
    assert answer.endorsed_tcb == combined["endorsed_tcb"]
    assert answer.certs == combined["endorsements"]
    assert answer.uvm_reference_info == combined["uvm_endorsements"]
    report = base64.b64decode(answer.attestation_report)
    assert len(report) == 1184 and report[0x50:0x90] == hashlib.sha256(runtime).digest() + bytes(32)


@BOTH
async def test_wrap_key_makes_the_go_packet_for_the_keypath(env, service, tmp_path, image_key):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    _, _, client, _ = env
    keypath = tmp_path / "wrap-key"
    write_key_info(
        keypath, image_key.public_key(), kms_endpoint="hsm.example", attester_endpoint="maa.example"
    )
    request = json.dumps(
        {
            "op": "keywrap",
            "keywrapparams": {
                "ec": {
                    "Parameters": {"attestation-agent": [b64(f"skr:{keypath}".encode())]},
                    "DecryptConfig": {"Parameters": {}},
                },
                "optsdata": b64(OPTSDATA),
            },
            "keyunwrapparams": {"dc": None, "annotation": None},
        }
    ).encode()
    answer = json.loads(await client.keywrap(service, "WrapKey", request))
    assert set(answer) == {"keywrapresults"}
    packet = json.loads(bytes(answer["keywrapresults"]["annotation"]))
    assert packet["kid"] == "wrap-key" and packet["kms_endpoint"] == "hsm.example"
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert image_key.decrypt(base64.b64decode(packet["wrapped_data"]), oaep) == OPTSDATA


@BOTH
async def test_skr_wrap_then_unwrap_key_gives_the_original_bytes(env, service, tmp_path, image_key):
    stack, _, client, _ = env
    annotation = await wrapped(stack, tmp_path, f"image-{service.split('.')[0].replace('_', '-')}", image_key)
    answer = await client.keywrap(
        service, "UnWrapKey", unwrap_json(annotation), [("x-request-id", f"u-{service}")]
    )
    assert json.loads(answer) == {"keyunwrapresults": {"optsdata": list(OPTSDATA)}}
    [record] = audit_records(stack.options.audit_log, f"u-{service}")
    assert (record["event"], record["outcome"]) == ("key.unwrap", "granted")


async def test_unwrap_accepts_integer_arrays_as_ocicrypt_rs_sends_them(env, tmp_path, image_key):
    stack, _, client, _ = env
    annotation = base64.b64decode(await wrapped(stack, tmp_path, "rust-client", image_key))
    request = json.dumps(
        {
            "op": "keyunwrap",
            "keyunwrapparams": {
                "dc": {"Parameters": {"attestation-agent": [list(b"skr")]}},
                "annotation": list(annotation),
            },
        }
    ).encode()
    assert json.loads(await client.keywrap(OLD, "UnWrapKey", request))["keyunwrapresults"][
        "optsdata"
    ] == list(OPTSDATA)


# --- errors are status codes with one sentence --------------------------------------------------------------


@BOTH
async def test_a_key_bound_to_another_host_data_is_permission_denied(env, service, tmp_path, image_key):
    stack, _, client, _ = env
    name = f"other-{service.split('.')[0].replace('_', '-')}"
    annotation = await wrapped(stack, tmp_path, name, image_key, host_data=OTHER_HOST_DATA)
    with pytest.raises(aio.AioRpcError) as info:
        await client.keywrap(service, "UnWrapKey", unwrap_json(annotation))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "\n" not in str(info.value.details()) and "Traceback" not in str(info.value.details())
    assert trailing(info.value)["skr-error-code"] == "release_denied"
    metrics = stack.runtime.metrics.grpc_requests
    assert metrics.value(method="UnWrapKey", code="PERMISSION_DENIED") >= 1
    assert "skr_grpc_requests_total" in stack.runtime.metrics.render()


async def test_a_request_for_another_provider_is_invalid_argument(env):
    _, _, client, _ = env
    with pytest.raises(aio.AioRpcError) as info:
        await client.keywrap(
            NEW, "UnWrapKey", unwrap_json(b64(b'{"kid":"k","wrapped_data":"AA=="}'), dc="eA==")
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another provider" in str(info.value.details())
    assert trailing(info.value)["skr-error-code"] == "provider_parameter_mismatch"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "invalid_keyprovider_request"),
        (b'{"op":"keywrap"}', "invalid_keyprovider_request"),
        (unwrap_json(b64(b"not a packet")), "invalid_annotation"),
    ],
)
async def test_malformed_unwrap_requests_are_invalid_argument(env, payload, code):
    _, _, client, _ = env
    with pytest.raises(aio.AioRpcError) as info:
        await client.keywrap(OLD, "UnWrapKey", payload)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(info.value)["skr-error-code"] == code


async def test_an_unknown_key_path_for_wrap_key_is_not_found(env, tmp_path):
    _, _, client, _ = env
    request = json.dumps(
        {
            "op": "keywrap",
            "keywrapparams": {
                "ec": {"Parameters": {"attestation-agent": [b64(f"skr:{tmp_path}/none".encode())]}},
                "optsdata": b64(b"x"),
            },
        }
    ).encode()
    with pytest.raises(aio.AioRpcError) as info:
        await client.keywrap(NEW, "WrapKey", request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_base64_for_attestation_data_is_invalid_argument(env):
    _, _, client, _ = env
    with pytest.raises(aio.AioRpcError) as info:
        await client.call(NEW, "GetAttestationData", "not base64!")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- reflection, health, client token -------------------------------------------------------------------


async def test_reflection_lists_both_service_names(env):
    _, _, client, _ = env
    rpc = client.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = rpc(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for response in call:
        names |= {s.name for s in response.list_services_response.service}
    assert {NEW, OLD, "grpc.health.v1.Health"} <= names


async def test_health_is_serving_when_the_sidecar_is_ready(env):
    _, _, client, _ = env
    rpc = client.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    for name in ("", NEW, OLD):
        response = await rpc(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_client_token_is_bearer_metadata(env, tmp_path, image_key):
    stack, _, _, _ = env
    token = "t" * 24
    async with extra_sidecar(stack, client_token=token) as (runtime, _):
        server = GrpcServer(runtime.service, host="127.0.0.1", port=0)
        port = await server.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                client = Client(channel)
                for metadata in (
                    None,
                    [("authorization", "Bearer wrong-token-wrong-token")],
                    [("authorization", token)],
                ):
                    with pytest.raises(aio.AioRpcError) as info:
                        await client.call(NEW, "GetReport", "00", metadata)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "authorization: Bearer" in str(info.value.details())
                answer = await client.call(NEW, "GetReport", "00", [("authorization", f"Bearer {token}")])
                assert len(answer.report_hex_string) == 2368
                assert (await client.call(OLD, "SayHello", "x")).message == "Hello x"  # like /status: open
        finally:
            await server.stop(0.5)


async def test_a_message_over_the_body_limit_is_resource_exhausted(env):
    _, _, client, _ = env
    with pytest.raises(aio.AioRpcError) as info:
        await client.keywrap(NEW, "UnWrapKey", b"x" * (65 * 1024))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_port_in_use_is_a_one_sentence_config_error(env):
    stack, _, _, _ = env
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        server = GrpcServer(stack.runtime.service, host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match=r"cannot listen for gRPC on 127\.0\.0\.1:"):
            await server.start()
        await server.stop(0)


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:51234", True),
        ("ipv4:127.8.9.10:1", True),
        ("ipv6:[::1]:51234", True),
        ("ipv6:[::ffff:127.0.0.1]:5", True),
        ("unix:/run/skr.sock", True),
        ("ipv4:10.1.2.3:51234", False),
        ("ipv6:[fe80::1%eth0]:5", False),
        ("ipv4:not-an-address:1", False),
        ("", False),
    ],
)
async def test_only_loopback_peers_are_served(peer, loopback):
    from skr.keyprovider.grpc_server import _is_loopback_peer

    assert _is_loopback_peer(peer) is loopback


def packet_for(stack, kid: str) -> str:
    packet = {
        "kid": kid,
        "wrapped_data": "AA==",
        "kms_endpoint": stack.info["akv_endpoint"],
        "attester_endpoint": stack.info["maa_endpoint"],
    }
    return b64(json.dumps(packet).encode())


async def test_a_key_service_that_keeps_failing_is_unavailable(env):
    stack, _, client, _ = env
    stack.faults.add(FaultRule("hsm.release", "status", status=503))
    try:
        with pytest.raises(aio.AioRpcError) as info:
            await client.keywrap(NEW, "UnWrapKey", unwrap_json(packet_for(stack, "demo-oct")))
    finally:
        stack.faults.clear()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert trailing(info.value)["skr-error-code"] == "upstream_error"


async def test_the_request_deadline_is_deadline_exceeded(env):
    stack, _, _, _ = env
    async with extra_sidecar(stack, request_deadline=1.0) as (runtime, _):
        server = GrpcServer(runtime.service, host="127.0.0.1", port=0)
        port = await server.start()
        stack.faults.add(FaultRule("hsm.release", "delay", seconds=3.0))
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(aio.AioRpcError) as info:
                    await Client(channel).keywrap(OLD, "UnWrapKey", unwrap_json(packet_for(stack, "demo-ec")))
        finally:
            stack.faults.clear()
            await server.stop(0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "request deadline" in str(info.value.details())
