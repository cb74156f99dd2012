"""The local key-vault stack the Key Vault, identity and CLI tests share: a local CA, a virtual TEE, the
local attestation, identity and Managed-HSM-compatible key services on 127.0.0.1 over HTTPS.

Fixtures using it (``ca``, ``tee``, ``wrapping_key``, ``stack``, ``imds_env``) live in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from azure.keyvault.keys._shared import http_challenge_cache
from azure.keyvault.keys.aio import KeyClient

from skr.akv.jws import TrustStore
from skr.akv.policy import build_confidential_containers_policy
from skr.endpoints import parse_endpoint
from skr.evidence.base import report_data_for
from skr.evidence.virtual import VirtualTee
from skr.local.attestation import LocalAttestationService
from skr.local.ca import LocalCA
from skr.local.faults import FaultPlan
from skr.local.hsm import LocalKeyService
from skr.local.identity import LocalIdentityService
from skr.maa.client import MaaClient
from skr.maa.runtime import WrappingKey
from skr.maa.token import TokenVerifier

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SECURITY_POLICY = b'package policy\n\napi_version := "0.10.0"\ndefault allow := true\n'
OTHER_HOST_DATA = "ab" * 32
HSM_RESOURCE = "https://managedhsm.azure.net"
MI_ENV = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_AUTHORITY_HOST",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
)


# --- the stack (shared with the other H5 test modules through plain functions) ------------------------


def make_ca(factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(factory.mktemp("ca"))


def make_tee(factory: pytest.TempPathFactory) -> VirtualTee:
    return VirtualTee.load_or_create(factory.mktemp("tee"), security_policy=SECURITY_POLICY)


def clear_identity_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient identity configuration from the machine running the tests."""
    for name in MI_ENV:
        monkeypatch.delenv(name, raising=False)


def point_imds_at(monkeypatch: pytest.MonkeyPatch, identity_url: str) -> None:
    """Point azure-identity's managed identity (IMDS protocol) at a local identity service."""
    clear_identity_env(monkeypatch)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", identity_url)


async def serve(app: web.Application, ca: LocalCA | None) -> tuple[web.AppRunner, str]:
    """Start ``app`` on 127.0.0.1, HTTPS with a local-CA certificate when ``ca`` is given."""
    runner = web.AppRunner(app)
    await runner.setup()
    ssl_context = ca.server_ssl_context(["127.0.0.1", "localhost"]) if ca is not None else None
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"{'https' if ca else 'http'}://127.0.0.1:{port}"


def build_hsm(
    ca: LocalCA,
    state_dir: Path,
    identity: LocalIdentityService,
    session: aiohttp.ClientSession,
    faults: FaultPlan,
) -> LocalKeyService:
    """A key service on ``state_dir/hsm`` whose release JWS chain is issued by ``ca`` for 127.0.0.1."""
    issued = ca.issue(["127.0.0.1", "localhost"])
    return LocalKeyService(
        state_dir / "hsm",
        host="127.0.0.1",
        tenant_id=TENANT,
        identity=identity,
        signing_key=issued.private_key,
        chain=issued.chain,
        token_verifier=TokenVerifier(session, ssl_context=ca.client_ssl_context()),
        faults=faults.scoped("hsm"),
    )


@dataclass
class Stack:
    ca: LocalCA
    tee: VirtualTee
    state_dir: Path
    session: aiohttp.ClientSession
    identity: LocalIdentityService
    identity_url: str
    maa: LocalAttestationService
    maa_url: str
    hsm: LocalKeyService
    hsm_url: str
    faults: FaultPlan

    @property
    def ca_pem(self) -> str:
        return str(self.ca.ca_pem_path)

    @property
    def hsm_host(self) -> str:
        return self.hsm_url.removeprefix("https://")

    def policy(self, *, host_data: str | None = None, authority: str | None = None) -> bytes:
        doc = build_confidential_containers_policy(
            authority=authority or self.maa_url, host_data=host_data or self.tee.host_data.hex()
        )
        return json.dumps(doc).encode()

    async def target_token(self, key: WrappingKey, *, runtime_data: bytes | None = None) -> str:
        """An MAA token from the local attestation service for virtual-TEE evidence binding ``key``."""
        data = runtime_data if runtime_data is not None else key.runtime_data()
        evidence = await self.tee.collect(report_data_for(data))
        client = MaaClient(self.session, ssl_context=self.ca.client_ssl_context())
        return await client.attest(parse_endpoint(self.maa_url), evidence, data)

    def bearer(self, resource: str = HSM_RESOURCE) -> str:
        token: str = self.identity.issue_token(resource)["access_token"]
        return token

    def key_client(self, credential: Any) -> KeyClient:
        return KeyClient(
            self.hsm_url, credential, connection_verify=self.ca_pem, verify_challenge_resource=False
        )

    def trust(self) -> TrustStore:
        return TrustStore([self.ca.ca_pem_path], include_system=False)

    def new_hsm(self) -> LocalKeyService:
        return build_hsm(self.ca, self.state_dir, self.identity, self.session, self.faults)


@asynccontextmanager
async def running_stack(ca: LocalCA, tee: VirtualTee, state_dir: Path) -> AsyncIterator[Stack]:
    """Identity, attestation and key service, each over HTTPS on 127.0.0.1 with ``ca`` certificates."""
    # azure-keyvault-keys remembers each vault's auth challenge process-wide, keyed by host:port. A new
    # stack may get an ephemeral port an earlier test's key service had: it is a new vault all the same.
    http_challenge_cache.clear()
    session = aiohttp.ClientSession()
    runners: list[web.AppRunner] = []
    faults = FaultPlan()
    try:
        identity = await asyncio.to_thread(
            LocalIdentityService.create, state_dir / "identity", tenant_id=TENANT
        )
        runner, identity_url = await serve(identity.app, ca)
        runners.append(runner)
        # the TEE carries a UVM endorsement by the CA's UVM signing key, which the attestation service trusts
        signer = await asyncio.to_thread(ca.uvm_signer)
        await asyncio.to_thread(tee.endorse, signer.private_key, signer.chain)
        maa = await LocalAttestationService.create(
            state_dir / "maa", trusted_arks=[tee.ark_certificate], uvm_signing_roots=[ca.ca_certificate]
        )
        runner, maa_url = await serve(maa.app, ca)
        runners.append(runner)
        maa.issuer = maa_url
        hsm = await asyncio.to_thread(build_hsm, ca, state_dir, identity, session, faults)
        runner, hsm_url = await serve(hsm.app, ca)
        runners.append(runner)
        yield Stack(ca, tee, state_dir, session, identity, identity_url, maa, maa_url, hsm, hsm_url, faults)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await session.close()
