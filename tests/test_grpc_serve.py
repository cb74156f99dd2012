"""``skr serve --server-type both|grpc`` as a real process against ``skr local --no-sidecar``.

``both``: one attestation serves an HTTP release and a gRPC unwrap (one release service, one token cache,
one audit log). ``grpc`` (the Go image's ``ServerType=grpc``): gRPC on ``--port``, no HTTP, readiness
through the standard gRPC health check.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from grpc import aio
from grpc_health.v1 import health_pb2

from skr.keyprovider.protos import key_provider_pb2, keyprovider_pb2
from tests.procs import Proc, Processes, start_local, start_serve, wait_until
from tests.sidecars import audit_records

OPTSDATA = (
    b'{"symkey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","digest":"sha256:ef","cipheroptions":{}}'
)


@pytest.fixture
def procs(tmp_path):
    processes = Processes(tmp_path / "logs")
    yield processes
    processes.close()


def grpc_address(proc: Proc) -> str | None:
    for record in proc.log_records():
        if record.get("msg") == "skr grpc listening":
            address: str = record["address"]
            return address
    return None


def b64u_int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def public_key_of(jwk: dict[str, Any]) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(b64u_int(jwk["e"]), b64u_int(jwk["n"])).public_key()


def go_packet(kid: str, wrapped: bytes, info: dict[str, Any]) -> bytes:
    """The annotation packet as the Go wrap tool writes it (field order of its struct)."""
    return json.dumps(
        {
            "kid": kid,
            "wrapped_data": base64.b64encode(wrapped).decode(),
            "wrap_type": "rsa_3072",
            "kms_endpoint": info["akv_endpoint"],
            "attester_endpoint": info["maa_endpoint"],
        },
        separators=(",", ":"),
    ).encode()


def unwrap_input(annotation: bytes) -> bytes:
    return json.dumps(
        {
            "op": "keyunwrap",
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {
                "dc": {"Parameters": {"attestation-agent": ["c2ty"]}},
                "annotation": base64.b64encode(annotation).decode(),
            },
        }
    ).encode()


async def test_both_one_attestation_serves_an_http_release_and_a_grpc_unwrap(procs, tmp_path):
    state, audit = tmp_path / "state", tmp_path / "audit.log"
    _, info = await asyncio.to_thread(start_local, procs, state)
    proc, base = await asyncio.to_thread(
        start_serve,
        procs,
        state,
        info,
        args=["--server-type", "both", "--grpc-port", "0", "--audit-log", str(audit)],
    )
    address = await asyncio.to_thread(
        wait_until, lambda: grpc_address(proc), proc, "the gRPC address is logged"
    )

    # 1. HTTP: release demo-rsa (a fresh attestation)
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "/key/release", json={"kid": "demo-rsa"}, headers={"X-Request-Id": "http-1"}) as r,
    ):
        assert r.status == 200
        jwk = json.loads((await r.json())["key"])
    wrapped = public_key_of(jwk).encrypt(
        OPTSDATA, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    )

    # 2. gRPC: unwrap data wrapped to the same key, with the token the HTTP release got
    async with aio.insecure_channel(address) as channel:
        rpc = channel.unary_unary(
            "/key_provider.KeyProviderService/UnWrapKey",
            request_serializer=key_provider_pb2.KeyProviderKeyWrapProtocolInput.SerializeToString,
            response_deserializer=key_provider_pb2.KeyProviderKeyWrapProtocolOutput.FromString,
        )
        answer = await rpc(
            key_provider_pb2.KeyProviderKeyWrapProtocolInput(
                key_provider_key_wrap_protocol_input=unwrap_input(go_packet("demo-rsa", wrapped, info))
            ),
            metadata=[("x-request-id", "grpc-1")],
            timeout=30,
        )
    assert json.loads(answer.key_provider_key_wrap_protocol_output) == {
        "keyunwrapresults": {"optsdata": list(OPTSDATA)}
    }
    [released] = audit_records(audit, "http-1")
    [unwrapped] = audit_records(audit, "grpc-1")
    assert (released["event"], released["attestation"]) == ("key.release", "fresh")
    assert (unwrapped["event"], unwrapped["outcome"], unwrapped["attestation"]) == (
        "key.unwrap",
        "granted",
        "cached",
    )
    assert unwrapped["token_sha256"] == released["token_sha256"]
    assert proc.running()


async def test_server_type_grpc_serves_grpc_on_port_and_no_http(procs, tmp_path):
    state = tmp_path / "state"
    _, info = await asyncio.to_thread(start_local, procs, state)
    proc, _ = await asyncio.to_thread(
        start_serve, procs, state, info, env={"ServerType": "grpc"}, ready=False
    )
    address = await asyncio.to_thread(
        wait_until, lambda: grpc_address(proc), proc, "the gRPC address is logged"
    )
    async with aiohttp.ClientSession() as http:  # the port speaks HTTP/2 gRPC only: no HTTP/1.1 API there
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"http://{address}/status", timeout=aiohttp.ClientTimeout(total=5))
    async with aio.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

        async def serving() -> bool:
            try:
                response = await check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            except aio.AioRpcError:
                return False
            return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

        for _ in range(300):
            if await serving():
                break
            await asyncio.sleep(0.1)
        assert await serving(), proc.describe()
        hello = channel.unary_unary(
            "/keyprovider.KeyProviderService/SayHello",
            request_serializer=keyprovider_pb2.HelloRequest.SerializeToString,
            response_deserializer=keyprovider_pb2.HelloReply.FromString,
        )
        assert (await hello(keyprovider_pb2.HelloRequest(name="world"), timeout=5)).message == "Hello world"
        unknown: Any = channel.unary_unary("/other.KeyProviderService/UnWrapKey")
        with pytest.raises(aio.AioRpcError) as info_:
            await unknown(b"", timeout=5)
        assert info_.value.code() == grpc.StatusCode.UNIMPLEMENTED
