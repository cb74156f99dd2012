"""``skr keyprovider`` as ocicrypt runs it: a process, one request on stdin, one answer on stdout.

Requests are shaped like skopeo's (KEYPROVIDER.md §2: Go field names, base64 strings); the sidecar is the
local stack's, running in this test's event loop while the provider process talks to it.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.cli import main
from skr.keyprovider.keyinfo import write_key_info
from tests.e2e import bound_policy
from tests.kvstack import OTHER_HOST_DATA
from tests.procs import SKR, clean_env
from tests.sidecars import audit_records

pytestmark = pytest.mark.asyncio(loop_scope="module")

OPTSDATA = (
    b'{"symkey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","digest":"sha256:12","cipheroptions":{}}'
)


@pytest.fixture(scope="module")
def image_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 3072)


async def provider(request: bytes, *args: str, env: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    """Run `skr keyprovider ARGS` as ocicrypt does: request on stdin; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *SKR,
        "keyprovider",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(request), timeout=60)
    return proc.returncode or 0, out, err.decode()


def skopeo_wrap(keypath: object) -> bytes:
    """`skopeo copy --encryption-key provider:attestation-agent:skr:<keypath>` → keywrap request."""
    value = base64.b64encode(f"skr:{keypath}".encode()).decode()
    return (
        b'{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"attestation-agent":["'
        + value.encode()
        + b'"]},"DecryptConfig":{"Parameters":{}}},"optsdata":"'
        + base64.b64encode(OPTSDATA)
        + b'"},"keyunwrapparams":{"dc":null,"annotation":null}}'
    )


def skopeo_unwrap(annotation: bytes, value: bytes = b"c2ty", name: bytes = b"attestation-agent") -> bytes:
    """`skopeo copy --decryption-key provider:attestation-agent:skr` → keyunwrap request."""
    return (
        b'{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":{"'
        + name
        + b'":["'
        + value
        + b'"]}},"annotation":"'
        + base64.b64encode(annotation)
        + b'"}}'
    )


async def image_keypath(stack, tmp_path, name, key, host_data=None):
    await stack.key_service.import_key(name, key, release_policy=bound_policy(stack, host_data))
    keypath = tmp_path / name
    write_key_info(
        keypath,
        key.public_key(),
        kms_endpoint=stack.info["akv_endpoint"],
        attester_endpoint=stack.info["maa_endpoint"],
    )
    return keypath


async def test_keywrap_then_keyunwrap_through_the_running_sidecar(env, tmp_path, image_key):
    stack, _ = env
    keypath = await image_keypath(stack, tmp_path, "cmd-key", image_key)
    code, out, err = await provider(skopeo_wrap(keypath))
    assert code == 0, err
    answer = json.loads(out)
    assert set(answer) == {"keywrapresults"}
    annotation = bytes(answer["keywrapresults"]["annotation"])
    assert json.loads(annotation)["kid"] == "cmd-key"

    code, out, err = await provider(skopeo_unwrap(annotation), "--sidecar", stack.info["sidecar"])
    assert code == 0, err
    assert (
        out
        == b'{"keyunwrapresults":{"optsdata":' + json.dumps(list(OPTSDATA)).replace(" ", "").encode() + b"}}"
    )
    assert any(
        r["event"] == "key.unwrap" and r["outcome"] == "granted" and r["kid"] == "cmd-key"
        for r in audit_records(stack.options.audit_log)
    )


async def test_skr_wrap_output_unwraps_with_direct_release(env, tmp_path, image_key):
    stack, _ = env
    keypath = await image_keypath(stack, tmp_path, "direct-key", image_key)
    (tmp_path / "in").write_bytes(OPTSDATA)
    out_file = tmp_path / "packet.b64"
    assert (
        main(
            ["wrap", "--infile", str(tmp_path / "in"), "--keypath", str(keypath), "--outfile", str(out_file)]
        )
        == 0
    )
    annotation = base64.b64decode(out_file.read_bytes())
    sidecar_env = clean_env(stack.info["env"])
    args = ("--direct", "--evidence", "virtual", "--state-dir", str(stack.options.state_dir))
    code, out, err = await provider(skopeo_unwrap(annotation), *args, env=sidecar_env)
    assert code == 0, err
    assert bytes(json.loads(out)["keyunwrapresults"]["optsdata"]) == OPTSDATA


async def test_a_denied_release_exits_1_with_one_line_and_no_answer(env, tmp_path, image_key):
    stack, _ = env
    keypath = await image_keypath(stack, tmp_path, "cmd-denied", image_key, host_data=OTHER_HOST_DATA)
    _, out, _ = await provider(skopeo_wrap(keypath))
    annotation = bytes(json.loads(out)["keywrapresults"]["annotation"])
    code, out, err = await provider(skopeo_unwrap(annotation), "--sidecar", stack.info["sidecar"])
    assert (code, out) == (1, b"")
    assert err.count("\n") == 1 and "release_denied" not in err and "refused the unwrap" in err


async def test_a_request_for_another_provider_is_refused_without_calling_the_sidecar(env):
    stack, _ = env
    before = len(audit_records(stack.options.audit_log))
    # what skopeo sent for `--decryption-key provider:myprov:x` (KEYPROVIDER.md §2, §9)
    request = skopeo_unwrap(b'{"kid":"demo-rsa","wrapped_data":"AA=="}', value=b"eA==", name=b"myprov")
    code, out, err = await provider(request, "--sidecar", stack.info["sidecar"])
    assert (code, out) == (2, b"")
    assert err.count("\n") == 1 and "not for skr" in err and "Traceback" not in err
    assert len(audit_records(stack.options.audit_log)) == before


@pytest.mark.parametrize(
    ("request_", "args", "says"),
    [
        (b"", (), "no key-provider request on stdin"),
        (b"{not json", (), "not JSON"),
        (
            b'{"op":"keyunwrap","keyunwrapparams":{"dc":{"Parameters":{"attestation-agent":["c2ty"]}}}}',
            (),
            "no annotation",
        ),
        (skopeo_unwrap(b"{}"), ("--sidecar", "http://10.1.2.3:8080"), "off the loopback interface"),
    ],
)
async def test_unusable_input_exits_2_with_one_line(request_, args, says):
    code, out, err = await provider(request_, *args)
    assert (code, out) == (2, b"")
    assert err.count("\n") == 1 and says in err, err
