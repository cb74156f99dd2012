"""``skr local``: the whole secure-key-release flow on one machine, no Azure and no SEV hardware.

Starts on 127.0.0.1: a local CA, the virtual SEV-SNP TEE (launched with the demo security policy, so
HOST_DATA = SHA-256 of it, and endorsed by the local CA's UVM signing key unless ``uvm_endorsement`` is
off), the local attestation service (HTTPS; it trusts UVM endorsements chained to the local CA only),
the local Managed-HSM-compatible key service (HTTPS) with demo keys whose release policies are bound
to that HOST_DATA (plus one bound to a different policy, to show a denial), a local managed-identity
endpoint (plain HTTP on loopback, like the real App Service and IMDS endpoints), and the sidecar wired
to all of it through exactly the clients it uses for Azure.

The managed-identity credential reads ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` from the process
environment, so the stack sets them in this process (and lists them in
``local.json`` for other clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from skr.akv.policy import build_confidential_containers_policy, encode_policy_for_wire, parse_policy
from skr.config import Settings
from skr.daemon import Runtime, build_runtime, start_site
from skr.endpoints import Allowlist, Endpoint
from skr.errors import ConfigError
from skr.files import check_state_tree, ensure_directory, read_regular_file, write_private_file
from skr.local.attestation import LocalAttestationService
from skr.local.ca import LocalCA
from skr.local.demo import DEMO_KEYS, DEMO_SECURITY_POLICY, OTHER_SECURITY_POLICY
from skr.local.faults import FaultPlan
from skr.local.hsm import LocalKeyService
from skr.local.identity import LocalIdentityService
from skr.maa.token import TokenVerifier
from skr.snp.hostdata import host_data_of_policy

log = logging.getLogger("skr.local")

LOOPBACK = "127.0.0.1"
MANIFEST = "local.json"


@dataclass
class StackOptions:
    """Where and how the local stack runs. Port 0 means an ephemeral port."""

    state_dir: Path
    sidecar_port: int = 8080
    attestation_port: int = 0
    key_service_port: int = 0
    identity_port: int = 0
    with_sidecar: bool = True
    faults: FaultPlan | None = None
    audit_log: Path | None = None
    token_reuse: bool = True
    request_deadline: float = 30.0
    log_level: str = "info"
    uvm_endorsement: bool = True  # False: no Endorsements.Uvm, so no x-ms-compliance-status (a denial)


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {LOOPBACK}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _serve(
    app: web.Application, sock: socket.socket, ssl_context: ssl.SSLContext | None
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    return runner


def _tenant(state_dir: Path) -> str:
    path = state_dir / "tenant-id"
    with contextlib.suppress(FileNotFoundError):
        return read_regular_file(path).decode().strip()
    tenant = str(uuid.uuid4())
    write_private_file(path, tenant)
    return tenant


@dataclass
class LocalStack:
    """A running local stack; :meth:`stop` ends it. ``info`` is what ``local.json`` holds."""

    options: StackOptions
    info: dict[str, Any] = field(default_factory=dict)
    faults: FaultPlan = field(default_factory=FaultPlan)
    runtime: Runtime | None = None
    attestation: LocalAttestationService | None = None
    key_service: LocalKeyService | None = None
    identity: LocalIdentityService | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None
    _saved_env: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    async def start(cls, options: StackOptions) -> LocalStack:
        stack = cls(options, faults=options.faults or FaultPlan())
        try:
            await stack._start()
        except BaseException:
            await stack.stop()
            raise
        return stack

    async def _start(self) -> None:
        opts = self.options
        state = opts.state_dir
        await asyncio.to_thread(ensure_directory, state)
        await asyncio.to_thread(check_state_tree, state)  # no link anywhere in it, before anything is read
        from skr.evidence.virtual import VirtualTee

        ca, tee = await asyncio.gather(
            asyncio.to_thread(LocalCA.load_or_create, state / "ca"),
            asyncio.to_thread(VirtualTee.load_or_create, state / "tee", security_policy=DEMO_SECURITY_POLICY),
        )
        if opts.uvm_endorsement:
            signer = await asyncio.to_thread(ca.uvm_signer)
            await asyncio.to_thread(tee.endorse, signer.private_key, signer.chain)
        else:
            await asyncio.to_thread(tee.withdraw_uvm_endorsement)
        tenant = _tenant(state)
        ports = (opts.attestation_port, opts.key_service_port, opts.identity_port)
        maa_sock, hsm_sock, id_sock = map(_bind, ports)
        maa_ep = Endpoint(LOOPBACK, maa_sock.getsockname()[1])
        hsm_ep = Endpoint(LOOPBACK, hsm_sock.getsockname()[1])
        id_port = id_sock.getsockname()[1]
        hosts = [LOOPBACK, "localhost"]

        # identity (plain HTTP on loopback, like App Service's and IMDS's real endpoints)
        self.identity = await asyncio.to_thread(
            LocalIdentityService.create,
            state / "identity",
            tenant_id=tenant,
            faults=self.faults.scoped("identity"),
        )
        self._runners.append(await _serve(self.identity.app, id_sock, None))

        # attestation (HTTPS)
        self.attestation = await LocalAttestationService.create(
            state / "attestation",
            issuer=maa_ep.url,
            trusted_arks=[tee.ark_certificate],
            uvm_signing_roots=[ca.ca_certificate],
            faults=self.faults.scoped("maa"),
        )
        self._runners.append(await _serve(self.attestation.app, maa_sock, ca.server_ssl_context(hosts)))

        # key service (HTTPS); it verifies target tokens through the attestation service's metadata
        self._session = aiohttp.ClientSession()
        verifier = TokenVerifier(self._session, ssl_context=ca.client_ssl_context())
        issued = await asyncio.to_thread(ca.issue, hosts)
        self.key_service = LocalKeyService(
            state / "hsm",
            host=hsm_ep.authority,
            tenant_id=tenant,
            identity=self.identity,
            signing_key=issued.private_key,
            chain=issued.chain,
            token_verifier=verifier,
            faults=self.faults.scoped("hsm"),
        )
        self._runners.append(await _serve(self.key_service.app, hsm_sock, ca.tls_context(issued)))

        granted, denied = await self._demo_keys(self.key_service, maa_ep.url, tee.host_data.hex())
        if tee.uvm_endorsement is None:  # every demo policy requires azure-compliant-uvm
            granted, denied = [], granted + denied

        identity_endpoint = f"http://{LOOPBACK}:{id_port}/msi/token"
        client_env = {
            "IDENTITY_ENDPOINT": identity_endpoint,
            "IDENTITY_HEADER": self.identity.identity_header,
            "SKR_CA_BUNDLE": str(ca.ca_pem_path),
            "SKR_MAA_ENDPOINT": maa_ep.authority,
            "SKR_AKV_ENDPOINT": hsm_ep.authority,
            "SKR_ALLOWED_ENDPOINTS": f"{maa_ep.authority},{hsm_ep.authority}",
        }
        self.info = {
            "maa_endpoint": maa_ep.authority,
            "akv_endpoint": hsm_ep.authority,
            "attestation_url": maa_ep.url,
            "key_vault_url": hsm_ep.url,
            "identity_endpoint": identity_endpoint,
            "ca_bundle": str(ca.ca_pem_path),
            "tenant_id": tenant,
            "host_data": tee.host_data.hex(),
            "measurement": tee.measurement.hex(),
            "uvm_endorsement": tee.uvm_endorsement is not None,
            "keys": {"granted": granted, "denied": denied},
            "env": client_env,
        }
        if opts.with_sidecar:
            await self._start_sidecar(tee, ca.ca_pem_path, maa_ep, hsm_ep, client_env)
        write_private_file(state / MANIFEST, json.dumps(self.info, indent=2, sort_keys=True) + "\n")

    async def _demo_keys(
        self, hsm: LocalKeyService, authority: str, host_data: str
    ) -> tuple[list[str], list[str]]:
        """Create the demo keys once; re-bind their policies when the attestation URL changed."""
        granted: list[str] = []
        denied: list[str] = []
        other = host_data_of_policy(OTHER_SECURITY_POLICY).hex()
        for key in DEMO_KEYS:
            policy = build_confidential_containers_policy(
                authority=authority, host_data=host_data if key.granted else other
            )
            wire = encode_policy_for_wire(policy)
            current = hsm.latest_policy(key.name)
            if current is None or parse_policy(current) != parse_policy(wire):
                await hsm.create_key(
                    key.name, kty=key.kty, size=key.size, curve=key.curve, release_policy=wire
                )
            (granted if key.granted else denied).append(key.name)
        return granted, denied

    async def _start_sidecar(
        self, tee: Any, ca_pem: Path, maa: Endpoint, hsm: Endpoint, client_env: dict[str, str]
    ) -> None:
        opts = self.options
        for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER"):
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = client_env[name]
        settings = Settings(
            port=opts.sidecar_port,
            maa_endpoint=maa,
            akv_endpoint=hsm,
            allowlist=Allowlist.parse(None).extended([maa.authority, hsm.authority]),
            evidence="virtual",
            state_dir=opts.state_dir,
            ca_bundle=ca_pem,
            audit_log=opts.audit_log,
            token_reuse=opts.token_reuse,
            request_deadline=opts.request_deadline,
            log_level=opts.log_level,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_FEDERATED")}
        self.runtime = await build_runtime(
            settings,
            env=env,
            provider=tee,
            trusted_arks=[tee.ark_certificate],
            security_policy=DEMO_SECURITY_POLICY,
        )
        runner, port = await start_site(self.runtime)
        self._runners.insert(0, runner)  # stopped first: drains in-flight releases before upstreams go
        await self.runtime.service.start()
        self.info["sidecar"] = f"http://{LOOPBACK}:{port}"

    async def stop(self) -> None:
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        if self.runtime is not None:
            await self.runtime.aclose()
            self.runtime = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()

    def curl(self, key: str | None = None) -> str:
        name = key or (self.info["keys"]["granted"] or ["demo-oct"])[0]
        base = self.info.get("sidecar", "http://127.0.0.1:8080")
        return f'curl -s {base}/key/release -d \'{{"kid": "{name}"}}\''
