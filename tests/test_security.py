"""Security properties of the sidecar, each proven against the running thing (issue 7, "Security properties").

- loopback only by default, checked with a genuine non-loopback peer; ``--allow-remote`` is explicit and
  logged at start;
- the endpoint allowlist stops token exfiltration: a foreign host gets no connection;
- TLS verification cannot be turned off; an untrusted or wrong-host certificate on MAA or Key Vault is
  an error and nothing is released;
- no key material, access token, attestation token or identity secret in logs (debug level), audit
  records, error bodies or metrics;
- optional client authentication (``SKR_CLIENT_TOKEN_FILE``) on every route but the health checks;
- the virtual TEE is never chosen by ``auto``; ``skr serve --evidence virtual`` warns loudly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from skr.config import Settings, describe, load_settings
from skr.errors import ConfigError, EvidenceUnavailable
from skr.evidence import create_provider
from skr.evidence.sevguest import LEGACY_SEV_DEVICE, SEV_GUEST_DEVICE
from skr.evidence.tsm import TSM_REPORT_ROOT
from skr.local.ca import LocalCA
from skr.local.demo import DEMO_SECURITY_POLICY
from skr.local.faults import FaultRule
from skr.logs import setup_logging
from skr.upstream import client_ssl_context
from tests.e2e import b64, bound_policy
from tests.procs import Processes, clean_env, http_status, listening_address, wait_until
from tests.sidecars import audit_records, extra_sidecar, non_loopback_address

pytestmark = pytest.mark.asyncio(loop_scope="module")

CLIENT_TOKEN = "ct-" + "7f3a9c2e" * 5  # what SKR_CLIENT_TOKEN_FILE would hold


async def _post(client: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, bytes]:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    async with client.post(url, data=data, **kw) as resp:
        return resp.status, await resp.read()


def _error(status: int, raw: bytes, expected: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(raw)
    assert status == expected, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and "key" not in body
    return body


# --- loopback only by default --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote_address() -> str:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to act as a remote peer from")
    return address


def _from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``address`` (a genuine non-loopback peer)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def test_defaults_are_loopback_only():
    assert Settings().host == "127.0.0.1" and Settings().allow_remote is False
    settings = load_settings(env={})
    assert settings.host == "127.0.0.1" and settings.allow_remote is False


async def test_a_non_loopback_peer_is_refused_even_when_bound_to_all_interfaces(env, remote_address):
    stack, _ = env
    async with extra_sidecar(stack, host="0.0.0.0") as (runtime, base), _from(remote_address) as remote:
        port = base.rsplit(":", 1)[1]
        url = f"http://{remote_address}:{port}"
        for method, path, body in [
            ("GET", "/status", None),
            ("GET", "/healthz", None),
            ("GET", "/metrics", None),
            ("POST", "/key/release", '{"kid": "demo-oct"}'),
            ("POST", "/attest/raw", json.dumps({"runtime_data": b64(b"x")})),
        ]:
            async with remote.request(method, url + path, data=body) as resp:
                _error(resp.status, await resp.read(), 403, "remote_client_refused")
        async with aiohttp.ClientSession() as local, local.get(base + "/status") as resp:
            assert resp.status == 200  # the same sidecar still answers on loopback
    decisions = [r for r in audit_records(runtime.settings.audit_log) if not r["event"].startswith("audit.")]
    assert decisions == []  # a refused client never reached a use case


async def test_allow_remote_is_what_lets_a_remote_peer_in(env, remote_address):
    stack, _ = env
    async with (
        extra_sidecar(stack, host="0.0.0.0", allow_remote=True) as (runtime, base),
        _from(remote_address) as remote,
    ):
        port = base.rsplit(":", 1)[1]
        async with remote.post(f"http://{remote_address}:{port}/key/release", data='{"kid":"demo-oct"}') as r:
            assert r.status == 200 and "key" in await r.json()
    granted = [r for r in audit_records(runtime.settings.audit_log) if r.get("outcome") == "granted"]
    assert [r["client"] for r in granted] == [remote_address]  # the server saw a genuine remote peer


def _serve(procs: Processes, state: Path, *args: str) -> tuple[Any, int]:
    proc = procs.spawn(
        "serve",
        [
            "serve",
            "--evidence",
            "virtual",
            "--state-dir",
            str(state),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            *args,
        ],
        clean_env(),
    )
    address = wait_until(lambda: listening_address(proc), proc, "skr serve logs its address")
    port = int(address.rsplit(":", 1)[1])
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}/status") == 200, proc, "skr serve answers")
    return proc, port


def _warnings(proc: Any) -> list[str]:
    return [r["msg"] for r in proc.log_records() if r.get("level") == "warning"]


async def test_skr_serve_is_loopback_only_until_allow_remote_which_it_logs(env, tmp_path, remote_address):
    stack, _ = env
    procs = Processes(tmp_path / "logs")
    try:
        plain, port = await asyncio.to_thread(_serve, procs, stack.options.state_dir)
        async with _from(remote_address) as remote:
            async with remote.get(f"http://{remote_address}:{port}/status") as resp:
                _error(resp.status, await resp.read(), 403, "remote_client_refused")
            assert not any("allow-remote" in w for w in _warnings(plain))
            plain.send(signal.SIGTERM)
            assert await asyncio.to_thread(plain.wait, 15) == 0

            opened, port = await asyncio.to_thread(_serve, procs, stack.options.state_dir, "--allow-remote")
            async with remote.get(f"http://{remote_address}:{port}/status") as resp:
                assert resp.status == 200
        listening = next(r for r in opened.log_records() if r.get("msg") == "skr sidecar listening")
        assert listening["settings"]["allow_remote"] is True
        assert any("--allow-remote" in w and "loopback" in w for w in _warnings(opened)), opened.stderr()
        opened.send(signal.SIGTERM)
        assert await asyncio.to_thread(opened.wait, 15) == 0
    finally:
        procs.close()


# --- the allowlist stops token exfiltration ---------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def foreign_listener():
    """A TCP listener on 127.0.0.1 that is in no allowlist; records every connection it accepts."""
    accepted: list[bytes] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(await reader.read(4096))
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], accepted
    server.close()
    await server.wait_closed()


async def test_a_foreign_endpoint_gets_no_connection_and_no_token(env, foreign_listener):
    stack, client = env
    port, accepted = foreign_listener
    access_token = stack.identity.issue_token(stack.key_service.resource)["access_token"]
    foreign = f"127.0.0.1:{port}"
    attempts = [
        ("/key/release", {"kid": "demo-oct", "akv_endpoint": foreign, "access_token": access_token}),
        ("/key/release", {"kid": "demo-oct", "akv_endpoint": f"https://localhost:{port}"}),
        ("/key/release", {"kid": f"https://{foreign}/keys/demo-oct", "access_token": access_token}),
        ("/key/release", {"kid": "demo-oct", "maa_endpoint": foreign, "access_token": access_token}),
        ("/attest/maa", {"runtime_data": b64(b"{}"), "maa_endpoint": f"https://{foreign}"}),
    ]
    for path, body in attempts:
        request_id = "exfil-" + uuid.uuid4().hex[:12]
        status, raw = await _post(client, path, body, headers={"X-Request-Id": request_id})
        _error(status, raw, 403, "endpoint_not_allowed")
        assert access_token.encode() not in raw
        record = audit_records(stack.options.audit_log, request_id)
        assert [r["outcome"] for r in record] == ["denied"], record
    await asyncio.sleep(0.2)
    assert accepted == []


# --- TLS verification cannot be turned off -------------------------------------------------------------


async def test_there_is_no_setting_that_turns_tls_verification_off(tmp_path):
    names = {f.name for f in fields(Settings)}
    assert not {n for n in names if any(w in n for w in ("insecure", "verify", "tls", "ssl", "skip"))}
    knobs = {
        "SKR_INSECURE": "1",
        "SKR_TLS_VERIFY": "false",
        "SKR_SKIP_TLS_VERIFY": "true",
        "SKR_SSL_VERIFY": "0",
        "AZURE_INSECURE_CONNECTION": "true",
    }
    base = Settings(state_dir=tmp_path)
    assert load_settings(env=knobs, base=base) == base
    bundle = LocalCA.load_or_create(tmp_path / "ca").ca_pem_path
    for context in (client_ssl_context(), client_ssl_context(bundle)):
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


async def test_an_untrusted_attestation_service_is_an_error_and_nothing_is_released(env):
    stack, _ = env
    calls = stack.faults.count("hsm.*"), stack.faults.count("maa.*")
    async with extra_sidecar(stack, ca_bundle=None) as (_, base), aiohttp.ClientSession(base_url=base) as c:
        for path, body in [
            ("/key/release", {"kid": "demo-oct"}),
            ("/attest/maa", {"runtime_data": b64(b"{}")}),
        ]:
            status, raw = await _post(c, path, body)
            doc = _error(status, raw, 502, "upstream_tls_untrusted")
            assert "Microsoft Azure Attestation" in doc["error"] and "not trusted" in doc["error"]
    # no HTTP request (no evidence) went over the untrusted connection, and no release was attempted
    assert (stack.faults.count("hsm.*"), stack.faults.count("maa.*")) == calls


@pytest.mark.parametrize("who", ["another CA", "the trusted CA, for another host"])
async def test_an_untrusted_key_vault_certificate_is_an_error_and_nothing_is_sent(env, tmp_path, who):
    stack, _ = env
    if who == "another CA":
        ca = LocalCA.load_or_create(tmp_path / "other-ca")
        server_ctx = ca.server_ssl_context(["127.0.0.1", "localhost"])
    else:
        ca = LocalCA.load_or_create(stack.options.state_dir / "ca")
        server_ctx = ca.server_ssl_context(["vault.elsewhere.example"])
    requests: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        requests.append(f"{request.method} {request.path}")
        return web.json_response({"value": "not.a.jws"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    impostor = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        allow = stack.runtime.settings.allowlist.extended([impostor])
        async with (
            extra_sidecar(stack, allowlist=allow) as (_, base),
            aiohttp.ClientSession(base_url=base) as client,
        ):
            status, raw = await _post(client, "/key/release", {"kid": "demo-oct", "akv_endpoint": impostor})
        doc = _error(status, raw, 502, "upstream_tls_untrusted")
        assert "Key Vault" in doc["error"] and "not trusted" in doc["error"]
        assert requests == []  # no request (no attestation token, no access token) went over that TLS
    finally:
        await runner.cleanup()


# --- no secrets in logs, audit records, error bodies or metrics ------------------------------------------


@pytest.fixture
def debug_log(tmp_path) -> Iterator[Path]:
    """The skr JSON log at debug level into a file, for the length of one test; restores logging after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("azure").level)
    path = tmp_path / "skr-debug.log"
    setup_logging("debug", path)
    try:
        yield path
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("azure").setLevel(saved[2])


def _forms(secret: bytes) -> set[bytes]:
    """The ways bytes can show up in text: raw, base64 (padded or not), base64url, hex (either case)."""
    return {
        secret,
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        secret.hex().encode(),
        secret.hex().upper().encode(),
    }


def _key_material(jwk: dict[str, Any]) -> list[bytes]:
    private = [name for name in ("k", "d", "p", "q", "dp", "dq", "qi") if name in jwk]
    assert private, jwk
    return [base64.urlsafe_b64decode(jwk[name] + "=" * (-len(jwk[name]) % 4)) for name in private]


def _token_parts(token: str) -> list[bytes]:
    """A JWT and its payload and signature segments (a leak of either alone is still a leak)."""
    _, payload, signature = token.split(".")
    return [token.encode(), payload.encode(), signature.encode()]


async def test_no_secret_reaches_logs_audit_errors_or_metrics(env, debug_log):
    stack, client = env
    secrets_: dict[str, list[bytes]] = {}
    error_bodies: list[bytes] = []

    async def call(path: str, body: Any, expected: int) -> bytes:
        status, raw = await _post(client, path, body)
        assert status == expected, raw
        if status != 200:
            error_bodies.append(raw)
        return raw

    # key material, released in every shape (imported keys: we know their bytes independently too)
    imported = os.urandom(32)
    await stack.key_service.import_key("scan-oct", imported, release_policy=bound_policy(stack))
    secrets_["imported oct key"] = [imported]
    for kid in ("demo-oct", "demo-rsa", "demo-ec", "scan-oct"):
        raw = await call("/key/release", {"kid": kid}, 200)
        jwk = json.loads(json.loads(raw)["key"])
        secrets_[f"{kid} key"] = _key_material(jwk)
        for material in secrets_[f"{kid} key"]:  # sanity: the forms we look for are the wire's
            assert base64.urlsafe_b64encode(material).rstrip(b"=") in raw

    # tokens: an app's MAA token, the attestation token the releases used, access tokens
    raw = await call("/attest/maa", {"runtime_data": b64(b'{"keys":[]}')}, 200)
    secrets_["MAA token from /attest/maa"] = _token_parts(json.loads(raw)["token"])
    cached = list(
        stack.runtime.service.attestations.tokens.values()
    )  # the sidecar's own attestation token(s)
    assert cached
    for i, attestation in enumerate(cached):
        secrets_[f"release attestation token {i}"] = _token_parts(attestation.token)
    credential = stack.runtime.credentials.for_request(None)
    managed = await credential.get_token(stack.runtime.credentials.scope_for(stack.info["akv_endpoint"]))
    secrets_["managed identity access token"] = _token_parts(managed.token)
    app_token = stack.identity.issue_token(stack.key_service.resource)["access_token"]
    secrets_["access token passed by the app"] = _token_parts(app_token)
    forged = app_token[:-8] + ("A" * 8 if not app_token.endswith("A" * 8) else "B" * 8)
    secrets_["invalid access token passed by the app"] = _token_parts(forged)
    secrets_["identity header secret"] = [stack.info["env"]["IDENTITY_HEADER"].encode()]

    await call("/key/release", {"kid": "demo-oct", "access_token": app_token}, 200)
    await call("/key/release", {"kid": "demo-oct", "access_token": forged}, 403)
    await call("/key/release", {"kid": "demo-denied", "access_token": app_token}, 403)
    await call("/key/release", {"kid": "no-such-key"}, 404)
    await call(
        "/key/release", {"kid": "demo-oct", "akv_endpoint": "127.0.0.1:9", "access_token": app_token}, 403
    )
    stack.faults.add(FaultRule("hsm.release", "mutate", mutation="truncate_jws", times=1))
    await call("/key/release", {"kid": "scan-oct"}, 502)
    stack.faults.add(FaultRule("hsm.release", "status", status=503, times=1))
    await call("/key/release", {"kid": "scan-oct"}, 200)
    await call("/attest/raw", {"runtime_data": b64(b"nonce")}, 200)
    await call("/attest/combined", {"runtime_data": b64(b"nonce")}, 200)
    async with client.get("/metrics") as resp:
        metrics = await resp.read()

    log_bytes = debug_log.read_bytes()
    assert stack.options.audit_log is not None
    outputs = {
        "debug log": log_bytes,
        "audit log": stack.options.audit_log.read_bytes(),
        "metrics": metrics,
        "error bodies": b"\n".join(error_bodies),
    }
    # the scan is not vacuous: every output has content, the log has debug and upstream lines
    assert all(outputs.values())
    assert len(error_bodies) == 5
    levels = {json.loads(line)["level"] for line in log_bytes.splitlines()}
    assert {"debug", "warning"} <= levels, levels
    assert b"skr_key_releases_total" in metrics

    planted = base64.b64encode(secrets_["demo-rsa key"][0])
    assert _leaks(secrets_, {"planted": b"x" + planted + b"x"}) == ["demo-rsa key in the planted"]
    assert _leaks(secrets_, outputs) == []


def _leaks(secrets_: dict[str, list[bytes]], outputs: dict[str, bytes]) -> list[str]:
    return sorted(
        {
            f"{what} in the {where}"
            for what, values in secrets_.items()
            for value in values
            for form in _forms(value)
            for where, text in outputs.items()
            if form in text
        }
    )


# --- optional client authentication ---------------------------------------------------------------------


async def test_client_token_file_is_read_and_never_shown(tmp_path):
    path = tmp_path / "client-token"
    path.write_text(CLIENT_TOKEN + "\n")
    settings = load_settings(env={"SKR_CLIENT_TOKEN_FILE": str(path)}, base=Settings(state_dir=tmp_path))
    assert settings.client_token == CLIENT_TOKEN
    assert CLIENT_TOKEN not in repr(settings) and CLIENT_TOKEN not in json.dumps(
        describe(settings), default=str
    )
    assert describe(settings)["client_auth"] is True
    path.write_text("short")
    with pytest.raises(ConfigError):
        load_settings(env={"SKR_CLIENT_TOKEN_FILE": str(path)}, base=Settings(state_dir=tmp_path))


PROTECTED = [
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/no-such-path", None),
    ("POST", "/attest/raw", {"runtime_data": b64(b"x")}),
    ("POST", "/attest/combined", {"runtime_data": b64(b"x")}),
    ("POST", "/attest/maa", {"runtime_data": b64(b"{}")}),
    ("POST", "/key/release", {"kid": "demo-oct"}),
]
WRONG = {
    "none": {},
    "empty bearer": {"Authorization": "Bearer "},
    "last character differs": {"Authorization": "Bearer " + CLIENT_TOKEN[:-1] + "0"},
    "prefix": {"Authorization": "Bearer " + CLIENT_TOKEN[:-1]},
    "longer": {"Authorization": "Bearer " + CLIENT_TOKEN + "0"},
    "other scheme": {"Authorization": "Basic " + CLIENT_TOKEN},
    "token without scheme": {"Authorization": CLIENT_TOKEN},
}


async def test_with_a_client_token_every_route_but_health_needs_it(env):
    stack, _ = env
    async with (
        extra_sidecar(stack, client_token=CLIENT_TOKEN) as (_, base),
        aiohttp.ClientSession(base_url=base) as client,
    ):
        for path in ("/status", "/healthz", "/readyz"):
            async with client.get(path) as resp:
                assert resp.status == 200, path
        for method, path, body in PROTECTED:
            data = json.dumps(body) if body is not None else None
            for why, headers in WRONG.items():
                async with client.request(method, path, data=data, headers=headers) as resp:
                    raw = await resp.read()
                    _error(resp.status, raw, 401, "unauthenticated")
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer"), (path, why)
                    assert CLIENT_TOKEN[:-1].encode() not in raw
            good = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
            async with client.request(method, path, data=data, headers=good) as resp:
                assert resp.status == (404 if path == "/no-such-path" else 200), (path, await resp.read())
        async with client.post(
            "/key/release", data='{"kid":"demo-ec"}', headers={"authorization": f"bearer {CLIENT_TOKEN}"}
        ) as resp:
            assert resp.status == 200 and "key" in await resp.json()


# --- the virtual TEE is never chosen on its own ----------------------------------------------------------


def _no_tee_on_this_machine() -> None:
    present = [str(p) for p in (SEV_GUEST_DEVICE, TSM_REPORT_ROOT, LEGACY_SEV_DEVICE) if Path(p).exists()]
    if present:
        pytest.skip(f"this machine has an SEV interface ({', '.join(present)}); auto would use it")


async def test_auto_never_picks_the_virtual_tee(env, tmp_path):
    stack, _ = env
    empty = tmp_path / "root"
    empty.mkdir()
    state = stack.options.state_dir / "tee"  # a ready virtual TEE is right there
    virtual = create_provider("virtual", state_dir=state, security_policy=DEMO_SECURITY_POLICY)
    assert virtual.name == "virtual"  # it exists and works when named ...
    with pytest.raises(EvidenceUnavailable) as info:  # ... and still auto does not fall back to it
        create_provider("auto", root=empty, state_dir=state, security_policy=DEMO_SECURITY_POLICY)
    assert info.value.code == "no_tee" and "--evidence virtual" in (info.value.hint or "")
    assert Settings().evidence == "auto" and load_settings(env={}).evidence == "auto"


async def test_skr_serve_without_a_tee_refuses_to_start_rather_than_go_virtual(env, tmp_path):
    _no_tee_on_this_machine()
    stack, _ = env
    procs = Processes(tmp_path / "logs")
    try:  # a state directory that holds a ready virtual TEE, and no --evidence
        proc = procs.spawn("serve", ["serve", "--state-dir", str(stack.options.state_dir), "--port", "0"])
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 2, proc.describe()
        assert "no SEV-SNP guest interface" in proc.stderr()
        assert listening_address(proc) is None and "Traceback" not in proc.stderr()
    finally:
        procs.close()


async def test_skr_serve_with_the_virtual_tee_warns_that_nothing_is_confidential(env, tmp_path):
    stack, _ = env
    procs = Processes(tmp_path / "logs")
    try:
        proc = procs.spawn(
            "serve",
            ["serve", "--evidence", "virtual", "--state-dir", str(stack.options.state_dir), "--port", "0"],
        )
        await asyncio.to_thread(wait_until, lambda: listening_address(proc), proc, "skr serve starts")
        proc.send(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        warnings = _warnings(proc)
        assert any("VIRTUAL TEE" in w and "nothing is confidential" in w for w in warnings), proc.stderr()
    finally:
        procs.close()


async def test_the_virtual_warning_is_logged_by_the_daemon_itself(env, caplog):
    """In-process too: announce() warns whenever the evidence source is virtual."""
    from skr.daemon import announce

    stack, _ = env
    with caplog.at_level(logging.WARNING, logger="skr.daemon"):
        announce(stack.runtime.settings, 1234)
    assert any("VIRTUAL TEE" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
