"""``UnWrapKey`` through the sidecar's release path, against the local stack (nothing mocked).

``skr wrap`` output → the Go sidecar's unwrap request → :class:`KeyProvider` → ReleaseService.unwrap
(allowlist, deadline, token cache, audit ``key.unwrap``) → the original bytes.
"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.cli import main
from skr.errors import BadRequest, EndpointNotAllowed, ReleaseDenied
from skr.keyprovider.keyinfo import write_key_info
from skr.keyprovider.ocicrypt import parse_answer, unwrap_request
from skr.keyprovider.provider import KeyProvider
from skr.service import KEPT_KEY_NOTE, RequestContext
from tests.e2e import bound_policy
from tests.kvstack import OTHER_HOST_DATA
from tests.sidecars import audit_records

pytestmark = pytest.mark.asyncio(loop_scope="module")

OPTSDATA = (
    b'{"symkey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","digest":"sha256:ab","cipheroptions":{}}'
)


@pytest.fixture(scope="module")
def image_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 3072)


async def wrapped_for(stack, tmp_path, name, key, *, host_data=None, kms=None) -> bytes:
    """Import ``key`` as ``name`` under a release policy, write its key info, run `skr wrap`: the packet."""
    await stack.key_service.import_key(name, key, release_policy=bound_policy(stack, host_data))
    keypath = tmp_path / name
    write_key_info(
        keypath,
        key.public_key(),
        kms_endpoint=kms or stack.info["akv_endpoint"],
        attester_endpoint=stack.info["maa_endpoint"],
    )
    infile, outfile = tmp_path / "optsdata.json", tmp_path / f"{name}.annotation"
    infile.write_bytes(OPTSDATA)
    assert main(["wrap", "--infile", str(infile), "--keypath", str(keypath), "--outfile", str(outfile)]) == 0
    return base64.b64decode(outfile.read_bytes())


async def test_wrap_then_unwrap_gives_the_original_bytes_and_audits_key_unwrap(env, tmp_path, image_key):
    stack, _ = env
    annotation = await wrapped_for(stack, tmp_path, "image-key", image_key)
    provider = KeyProvider(stack.runtime.service)
    answer = await provider.unwrap_key(unwrap_request(annotation), RequestContext(request_id="unwrap-1"))
    assert json.loads(answer) == {"keyunwrapresults": {"optsdata": list(OPTSDATA)}}
    assert parse_answer(answer) == (None, OPTSDATA)
    [record] = audit_records(stack.options.audit_log, "unwrap-1")
    assert record["event"] == "key.unwrap" and record["outcome"] == "granted"
    assert record["kid"] == "image-key" and "note" not in record
    assert record["host_data"] == stack.info["host_data"]
    assert "optsdata" not in json.dumps(record) and base64.b64encode(OPTSDATA).decode() not in json.dumps(
        record
    )


async def test_a_second_unwrap_uses_the_key_kept_in_memory(env, tmp_path, image_key):
    stack, _ = env
    annotation = await wrapped_for(stack, tmp_path, "kept-key", image_key)
    provider = KeyProvider(stack.runtime.service)
    akv_calls = stack.runtime.metrics.upstream_calls
    calls_before = akv_calls.value(service="akv")
    for request_id in ("kept-1", "kept-2"):
        answer = await provider.unwrap_key(unwrap_request(annotation), RequestContext(request_id=request_id))
        assert parse_answer(answer)[1] == OPTSDATA
    first, second = (audit_records(stack.options.audit_log, r)[0] for r in ("kept-1", "kept-2"))
    assert "note" not in first and second["note"] == KEPT_KEY_NOTE
    assert second["key_version"] == first["key_version"]
    assert akv_calls.value(service="akv") == calls_before + 1  # the second unwrap asked no vault


async def test_a_key_bound_to_another_host_data_is_denied(env, tmp_path, image_key):
    stack, _ = env
    annotation = await wrapped_for(stack, tmp_path, "other-tee-key", image_key, host_data=OTHER_HOST_DATA)
    provider = KeyProvider(stack.runtime.service)
    with pytest.raises(ReleaseDenied):
        await provider.unwrap_key(unwrap_request(annotation), RequestContext(request_id="denied-1"))
    [record] = audit_records(stack.options.audit_log, "denied-1")
    assert (record["event"], record["outcome"], record["error_code"]) == (
        "key.unwrap",
        "denied",
        "release_denied",
    )


async def test_a_vault_outside_the_allowlist_is_refused_before_any_connection(env, tmp_path, image_key):
    stack, _ = env
    annotation = await wrapped_for(stack, tmp_path, "elsewhere", image_key, kms="evil.example.com")
    with pytest.raises(EndpointNotAllowed):
        await KeyProvider(stack.runtime.service).unwrap_key(
            unwrap_request(annotation), RequestContext(request_id="allow-1")
        )


async def test_data_wrapped_for_another_key_is_a_clean_400(env, tmp_path, image_key):
    stack, _ = env
    await wrapped_for(stack, tmp_path, "right-key", image_key)
    stranger = rsa.generate_private_key(65537, 3072)
    annotation = await wrapped_for(stack, tmp_path / "..", "stranger-key", stranger)
    packet = json.loads(annotation)
    packet["kid"] = "right-key"
    with pytest.raises(BadRequest) as info:
        await KeyProvider(stack.runtime.service).unwrap_key(
            unwrap_request(json.dumps(packet).encode()), RequestContext(request_id="mismatch-1")
        )
    assert info.value.code == "unwrap_failed"
    [record] = audit_records(stack.options.audit_log, "mismatch-1")
    assert (record["outcome"], record["error_code"]) == ("error", "unwrap_failed")
