"""``examples/``: the Python app and the curl script, run for real against ``skr local``.

A ``skr local`` process serves the module. The data owner's key is made and imported exactly as the
examples' READMEs say (``app.py keygen``, ``skr policy release``, ``skr keys import``); the encrypted files
the apps open are built here, independently, from ``cryptography`` primitives (RFC 7516 / RFC 7518 — the
CBC-HMAC construction is pinned to RFC 7518's test vector), and the apps run as subprocesses pointed at
the sidecar (``--skr-url`` / ``SKR_URL``).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.test_cli_daemon import (
    SKR,
    Proc,
    clean_env,
    closed_port,
    http,
    local_stack,
    run,
)

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "python-app" / "app.py"
SCRIPT = ROOT / "examples" / "curl" / "release-and-decrypt.sh"
OWNER_KID = "owner-data-key"
SHELL_TOOLS = ("sh", "curl", "jq", "openssl", "od")
_missing = [tool for tool in SHELL_TOOLS if shutil.which(tool) is None]
needs_shell_tools = pytest.mark.skipif(
    bool(_missing), reason=f"examples/curl needs {', '.join(_missing)} (apt-get install curl jq openssl)"
)
PLAINTEXT = b"quarterly numbers \x00\x01\xff with a trailing newline\n" * 50


# --- the independent construction: JWE compact, alg dir (RFC 7516), enc per RFC 7518 -----------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def a128cbc_hs256(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """RFC 7518 §5.2.2.1 written out: MAC_KEY = K[:16], ENC_KEY = K[16:], T = HMAC(A||IV||E||AL)[:16]."""
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(key[16:]), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(plaintext) + padder.finalize()) + encryptor.finalize()
    mac = hmac.HMAC(key[:16], hashes.SHA256())
    mac.update(aad + iv + ciphertext + (len(aad) * 8).to_bytes(8, "big"))
    return ciphertext, mac.finalize()[:16]


def make_jwe(
    key: bytes, plaintext: bytes, *, kid: str, enc: str, header: dict[str, Any] | None = None
) -> str:
    """A JWE of ``plaintext``; ``header`` replaces protected-header fields (the content stays ``enc``)."""
    protected = b64url(json.dumps({"alg": "dir", "enc": enc, "kid": kid, **(header or {})}).encode())
    aad = protected.encode()
    if enc == "A256GCM":
        iv = os.urandom(12)
        sealed = AESGCM(key).encrypt(iv, plaintext, aad)
        ciphertext, tag = sealed[:-16], sealed[-16:]
    else:
        iv = os.urandom(16)
        ciphertext, tag = a128cbc_hs256(key, iv, plaintext, aad)
    return f"{protected}..{b64url(iv)}.{b64url(ciphertext)}.{b64url(tag)}"


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def open_jwe(key: bytes, token: str) -> bytes:
    """Verify and decrypt here, independently of the examples (for the files the app encrypts)."""
    protected, encrypted_key, iv, ciphertext, tag = token.strip().split(".")
    assert encrypted_key == ""
    aad = protected.encode()
    if json.loads(unb64url(protected))["enc"] == "A256GCM":
        return AESGCM(key).decrypt(unb64url(iv), unb64url(ciphertext) + unb64url(tag), aad)
    mac = hmac.HMAC(key[:16], hashes.SHA256())
    mac.update(aad + unb64url(iv) + unb64url(ciphertext) + (len(aad) * 8).to_bytes(8, "big"))
    assert mac.finalize()[:16] == unb64url(tag)
    decryptor = Cipher(algorithms.AES(key[16:]), modes.CBC(unb64url(iv))).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    padded = decryptor.update(unb64url(ciphertext)) + decryptor.finalize()
    return unpadder.update(padded) + unpadder.finalize()


@functools.cache
def load_example_jwe() -> ModuleType:
    """examples/python-app/jwe.py, imported from its file (the example is not a package)."""
    spec = importlib.util.spec_from_file_location("skr_example_jwe", APP.parent / "jwe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# RFC 7518 Appendix B.1, "Test Cases for AES_128_CBC_HMAC_SHA_256"
RFC7518_B1 = {
    "K": bytes(range(32)),
    "P": b"A cipher system must not be required to be secret, and it must be able to fall into the hands"
    b" of the enemy without inconvenience",
    "IV": bytes.fromhex("1af38c2dc2b96ffdd86694092341bc04"),
    "A": b"The second principle of Auguste Kerckhoffs",
    "E": bytes.fromhex(
        "c80edfa32ddf39d5ef00c0b468834279a2e46a1b8049f792f76bfe54b903a9c9"
        "a94ac9b47ad2655c5f10f9aef71427e2fc6f9b3f399a221489f16362c7032336"
        "09d45ac69864e3321cf82935ac4096c86e133314c54019e8ca7980dfa4b9cf1b"
        "384c486f3a54c51078158ee5d79de59fbd34d848b3d69550a67646344427ade5"
        "4b8851ffb598f7f80074b9473c82e2db"
    ),
    "T": bytes.fromhex("652c3fa36b0a7c5b3219fab3a30bc1c4"),
}


# --- the stack, the data owner's key, and how the examples are run -----------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from local_stack(tmp_path_factory, "examples-stack")


@pytest.fixture(scope="module")
def owner_key(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The data owner's flow of examples/python-app/README.md: keygen, policy, import into the vault."""
    work = tmp_path_factory.mktemp("owner")
    env = clean_env(stack["env"])
    key_file, policy = work / "data.key", work / "policy.json"
    done = run([sys.executable, str(APP), "keygen", "--out", str(key_file)], env)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    made = run(
        [
            *SKR,
            "policy",
            "release",
            "--authority",
            stack["attestation_url"],
            "--host-data",
            stack["host_data"],
        ],
        env,
    )
    assert made.returncode == 0, made.stderr
    policy.write_text(made.stdout)
    imported = run(
        [
            *SKR,
            "keys",
            "import",
            "--vault",
            stack["akv_endpoint"],
            "--name",
            OWNER_KID,
            "--key",
            str(key_file),
            "--key-format",
            "raw",
            "--policy",
            str(policy),
            "--allow-insecure-challenge",
        ],
        env,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(f"{stack['key_vault_url']}/keys/{OWNER_KID}/")
    return key_file.read_bytes()


def app(stack: dict[str, Any], *args: str, **env: str) -> Any:
    return run([sys.executable, str(APP), "--skr-url", stack["sidecar"], *args], clean_env(env))


def script(stack: dict[str, Any], *args: str, **env: str) -> Any:
    return run(["sh", str(SCRIPT), *args], clean_env({"SKR_URL": stack["sidecar"], **env}))


def run_binary(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """Like ``run``, for binary stdout."""
    return subprocess.run(argv, env=clean_env(env), capture_output=True, timeout=20, check=False)


def never_shows(key: bytes, *texts: str | bytes) -> None:
    for text in texts:
        blob = text if isinstance(text, bytes) else text.encode()
        for form in (key, key.hex().encode(), b64url(key).encode(), base64.b64encode(key)):
            assert form not in blob


# --- the file format ---------------------------------------------------------------------------------


def test_the_cbc_hmac_construction_matches_rfc7518_b1():
    v = RFC7518_B1
    assert a128cbc_hs256(v["K"], v["IV"], v["P"], v["A"]) == (v["E"], v["T"])  # this test's own
    jwe = load_example_jwe()
    assert jwe.cbc_hmac_encrypt(v["K"], v["IV"], v["P"], v["A"]) == (v["E"], v["T"])
    assert jwe.cbc_hmac_decrypt(v["K"], v["IV"], v["E"], v["A"], v["T"]) == v["P"]
    with pytest.raises(jwe.AuthenticationFailed):
        jwe.cbc_hmac_decrypt(v["K"], v["IV"], v["E"], v["A"] + b"!", v["T"])


@pytest.mark.parametrize("enc", ["A256GCM", "A128CBC-HS256"])
def test_the_example_format_is_plain_jwe_both_ways(enc):
    jwe = load_example_jwe()
    key = os.urandom(32)
    assert jwe.decrypt(make_jwe(key, PLAINTEXT, kid="k", enc=enc), key) == PLAINTEXT
    token = jwe.encrypt(PLAINTEXT, key, kid="k", enc=enc)
    assert open_jwe(key, token) == PLAINTEXT
    assert jwe.read_header(token) == jwe.Header(alg="dir", enc=enc, kid="k")


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ({"alg": "A256KW"}, 'alg must be "dir"'),
        ({"enc": "A128GCM"}, "enc must be one of"),
        ({"zip": "DEF"}, '"zip"'),
        ({"crit": ["exp"]}, '"crit"'),
    ],
)
def test_the_example_refuses_headers_it_cannot_honour(header, says):
    jwe = load_example_jwe()
    key = os.urandom(32)
    token = make_jwe(key, b"x", kid="k", enc="A256GCM", header=header)
    with pytest.raises(jwe.JweError, match=says):
        jwe.decrypt(token, key)


# --- the Python app ----------------------------------------------------------------------------------


@pytest.mark.parametrize("enc", ["A256GCM", "A128CBC-HS256"])
def test_python_app_decrypts_what_the_data_owner_encrypted(stack, owner_key, tmp_path, enc):
    sealed, out = tmp_path / "report.jwe", tmp_path / "report.txt"
    sealed.write_text(make_jwe(owner_key, PLAINTEXT, kid=OWNER_KID, enc=enc))
    done = app(stack, "decrypt", str(sealed), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == PLAINTEXT and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"released {OWNER_KID} (oct, 256 bits)" in done.stderr
    never_shows(owner_key, done.stdout, done.stderr)


def test_python_app_writes_binary_plaintext_to_stdout_with_skr_url_from_the_environment(
    stack, owner_key, tmp_path
):
    sealed = tmp_path / "report.jwe"
    sealed.write_text(make_jwe(owner_key, PLAINTEXT, kid=OWNER_KID, enc="A256GCM"))
    done = run_binary([sys.executable, str(APP), "decrypt", str(sealed)], {"SKR_URL": stack["sidecar"]})
    assert done.returncode == 0, done.stderr
    assert done.stdout == PLAINTEXT


def test_python_app_encrypts_under_a_released_demo_key(stack, tmp_path):
    source, sealed = tmp_path / "plain.bin", tmp_path / "plain.jwe"
    source.write_bytes(PLAINTEXT)
    done = app(stack, "encrypt", str(source), "--kid", "demo-oct", "--out", str(sealed))
    assert done.returncode == 0, done.stderr
    status, body = http(stack["sidecar"] + "/key/release", {"kid": "demo-oct"})
    assert status == 200
    key = unb64url(json.loads(body["key"])["k"])
    assert open_jwe(key, sealed.read_text()) == PLAINTEXT  # opened here, not by the app
    assert json.loads(unb64url(sealed.read_text().split(".")[0])) == {
        "alg": "dir",
        "enc": "A256GCM",
        "kid": "demo-oct",
    }
    never_shows(key, done.stdout, done.stderr, sealed.read_bytes())


def test_python_app_data_owner_encrypts_with_a_local_key(stack, owner_key, tmp_path):
    key_file, source, sealed = tmp_path / "k", tmp_path / "plain.bin", tmp_path / "plain.jwe"
    key_file.write_bytes(owner_key)
    source.write_bytes(PLAINTEXT)
    encrypt = ["encrypt", str(source), "--kid", OWNER_KID, "--key-file", str(key_file), "--out", str(sealed)]
    done = run([sys.executable, str(APP), *encrypt], clean_env())
    assert done.returncode == 0, done.stderr  # no sidecar involved
    assert open_jwe(owner_key, sealed.read_text()) == PLAINTEXT
    back = app(stack, "decrypt", str(sealed), "--out", str(tmp_path / "back"))
    assert back.returncode == 0 and (tmp_path / "back").read_bytes() == PLAINTEXT


# --- the curl script ---------------------------------------------------------------------------------


@needs_shell_tools
def test_curl_script_decrypts_what_the_data_owner_encrypted(stack, owner_key, tmp_path):
    sealed, out = tmp_path / "report.jwe", tmp_path / "report.txt"
    sealed.write_text(make_jwe(owner_key, PLAINTEXT, kid=OWNER_KID, enc="A128CBC-HS256") + "\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = script(stack, str(sealed), str(out), TMPDIR=str(scratch))
    assert done.returncode == 0, done.stderr
    assert not list(scratch.iterdir())  # its work directory is gone, and the key was never in it
    assert out.read_bytes() == PLAINTEXT and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert done.stdout == "" and f"released {OWNER_KID} (oct, 256 bits)" in done.stderr
    never_shows(owner_key, done.stdout, done.stderr)


@needs_shell_tools
def test_curl_script_writes_to_stdout_and_reads_what_the_app_encrypted(stack, tmp_path):
    source, sealed = tmp_path / "plain.bin", tmp_path / "plain.jwe"
    source.write_bytes(PLAINTEXT)
    made = app(
        stack, "encrypt", str(source), "--kid", "demo-oct", "--enc", "A128CBC-HS256", "--out", str(sealed)
    )
    assert made.returncode == 0, made.stderr
    done = run_binary(["sh", str(SCRIPT), str(sealed)], {"SKR_URL": stack["sidecar"]})
    assert done.returncode == 0, done.stderr
    assert done.stdout == PLAINTEXT  # binary-safe, trailing newline kept


@needs_shell_tools
def test_curl_script_explains_that_a256gcm_needs_the_python_app(stack, owner_key, tmp_path):
    sealed = tmp_path / "gcm.jwe"
    sealed.write_text(make_jwe(owner_key, b"x", kid=OWNER_KID, enc="A256GCM"))
    done = script(stack, str(sealed))
    assert done.returncode == 2
    assert "A256GCM" in done.stderr and "examples/python-app" in done.stderr and done.stdout == ""


@needs_shell_tools
@pytest.mark.parametrize("junk", ["", "a.b.c", "a..b.c.d.e", "not a jwe at all"])
def test_curl_script_rejects_what_is_not_a_jwe(stack, tmp_path, junk):
    sealed = tmp_path / "junk.jwe"
    sealed.write_text(junk)
    done = script(stack, str(sealed))
    assert done.returncode == 2 and done.stderr.startswith("release-and-decrypt: ") and done.stdout == ""


# --- both clients: refusals and tampering -------------------------------------------------------------


CLIENTS = [pytest.param("python", id="python-app"), pytest.param("curl", id="curl", marks=needs_shell_tools)]


def decrypt_with(client: str, stack: dict[str, Any], sealed: Path, out: Path, **env: str) -> Any:
    if client == "python":
        return app(stack, "decrypt", str(sealed), "--out", str(out), **env)
    return script(stack, str(sealed), str(out), **env)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_denied_key_is_one_line_naming_the_failing_claim(stack, owner_key, tmp_path, client):
    sealed, out = tmp_path / "denied.jwe", tmp_path / "out"
    sealed.write_text(make_jwe(owner_key, PLAINTEXT, kid="demo-denied", enc="A128CBC-HS256"))
    done = decrypt_with(client, stack, sealed, out)
    assert done.returncode == 1
    line = done.stderr.strip()
    assert "\n" not in line and "HTTP 403 release_denied" in line and "x-ms-sevsnpvm-hostdata" in line
    assert not out.exists() and done.stdout == ""


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("part", [0, 2, 3, 4], ids=["header", "iv", "ciphertext", "tag"])
def test_a_tampered_file_is_refused_before_decryption(stack, owner_key, tmp_path, client, part):
    parts = make_jwe(owner_key, PLAINTEXT, kid=OWNER_KID, enc="A128CBC-HS256").split(".")
    if part == 0:  # a different, still valid, header: the AAD changes
        parts[0] = b64url(json.dumps({"kid": OWNER_KID, "alg": "dir", "enc": "A128CBC-HS256"}).encode())
    else:
        raw = bytearray(unb64url(parts[part]))
        raw[len(raw) // 2] ^= 0x01
        parts[part] = b64url(bytes(raw))
    sealed, out = tmp_path / "tampered.jwe", tmp_path / "out"
    sealed.write_text(".".join(parts))
    done = decrypt_with(client, stack, sealed, out)
    assert done.returncode == 1, done.stderr
    assert "authentication failed" in done.stderr
    assert not out.exists() and done.stdout == ""


@pytest.mark.parametrize("client", CLIENTS)
def test_a_file_for_another_key_fails_authentication(stack, owner_key, tmp_path, client):
    sealed, out = tmp_path / "other.jwe", tmp_path / "out"
    sealed.write_text(make_jwe(os.urandom(32), PLAINTEXT, kid=OWNER_KID, enc="A128CBC-HS256"))
    done = decrypt_with(client, stack, sealed, out)
    assert done.returncode == 1 and "authentication failed" in done.stderr and not out.exists()


@pytest.fixture(scope="module")
def guarded_sidecar(
    stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """``skr serve`` on the stack's services, requiring a client token (SKR_CLIENT_TOKEN_FILE)."""
    token_file = tmp_path_factory.mktemp("token") / "client-token"
    token_file.write_text(b64url(os.urandom(24)))
    argv = [*SKR, "serve", "--port", "0", "--log-level", "info", "--evidence", "virtual"]
    env = clean_env({**stack["env"], "SKR_CLIENT_TOKEN_FILE": str(token_file)})
    proc = Proc([*argv, "--state-dir", stack["state_dir"]], env)
    try:
        proc.wait_for(lambda: '"skr sidecar listening"' in proc.stderr, "skr serve start")
        line = next(line for line in proc.err if '"skr sidecar listening"' in line)
        yield {"sidecar": "http://" + json.loads(line)["address"], "token_file": str(token_file)}
        assert proc.stop(signal.SIGTERM) == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("client", CLIENTS)
def test_both_clients_present_the_client_token(guarded_sidecar, owner_key, tmp_path, client):
    sealed, out = tmp_path / "report.jwe", tmp_path / "out"
    sealed.write_text(make_jwe(owner_key, PLAINTEXT, kid=OWNER_KID, enc="A128CBC-HS256"))
    refused = decrypt_with(client, guarded_sidecar, sealed, out)
    assert refused.returncode == 1 and "HTTP 401 unauthenticated" in refused.stderr
    done = decrypt_with(
        client, guarded_sidecar, sealed, out, SKR_CLIENT_TOKEN_FILE=guarded_sidecar["token_file"]
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == PLAINTEXT


@pytest.mark.parametrize("client", CLIENTS)
def test_no_sidecar_is_a_clear_error(owner_key, tmp_path, client):
    nobody = {"sidecar": f"http://127.0.0.1:{closed_port()}"}
    sealed, out = tmp_path / "report.jwe", tmp_path / "out"
    sealed.write_text(make_jwe(owner_key, PLAINTEXT, kid=OWNER_KID, enc="A128CBC-HS256"))
    if client == "python":
        done = app(nobody, "--wait", "0", "decrypt", str(sealed), "--out", str(out))
        assert "is not ready after 0 s" in done.stderr
    else:
        done = script(nobody, str(sealed), str(out))
        assert "cannot reach the sidecar" in done.stderr
    assert done.returncode == 2 and "Traceback" not in done.stderr and not out.exists()
