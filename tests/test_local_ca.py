"""The local CA: persisted root, issued server certificates, and TLS both ways on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from skr.errors import ConfigError
from skr.local.ca import LocalCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("state"))


def test_ca_files_are_persisted_with_a_private_key_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = LocalCA.load_or_create(state)
    assert ca.ca_pem_path == state / "local-ca.pem"
    assert x509.load_pem_x509_certificate(ca.ca_pem_path.read_bytes()) == ca.ca_certificate
    assert stat.S_IMODE((state / "local-ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    constraints = ca.ca_certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True


def test_reload_returns_the_same_ca_and_tightens_a_loose_key_file(tmp_path: Path) -> None:
    first = LocalCA.load_or_create(tmp_path)
    (tmp_path / "local-ca.key").chmod(0o644)
    second = LocalCA.load_or_create(tmp_path)
    assert second.ca_certificate == first.ca_certificate
    assert stat.S_IMODE((tmp_path / "local-ca.key").stat().st_mode) == 0o600


def test_damaged_ca_files_are_a_config_error(tmp_path: Path) -> None:
    LocalCA.load_or_create(tmp_path)
    (tmp_path / "local-ca.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="do not load"):
        LocalCA.load_or_create(tmp_path)


def test_issued_certificate_verifies_against_the_ca_for_ip_and_dns(ca: LocalCA) -> None:
    issued = ca.issue(["127.0.0.1", "localhost", "vault.local.test"])
    leaf = issued.certificate
    assert issued.chain == [leaf, ca.ca_certificate]
    leaf.verify_directly_issued_by(ca.ca_certificate)
    store = Store([ca.ca_certificate])
    for name in (
        x509.DNSName("localhost"),
        x509.DNSName("vault.local.test"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        verifier = PolicyBuilder().store(store).time(datetime.now(UTC)).build_server_verifier(name)
        assert verifier.verify(leaf, [])[-1] == ca.ca_certificate
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "vault.local.test"]


def test_issued_key_signs_rs256_for_release_jws(ca: LocalCA) -> None:
    issued = ca.issue(["localhost"])
    signature = issued.private_key.sign(b"payload", padding.PKCS1v15(), hashes.SHA256())
    issued.certificate.public_key().verify(signature, b"payload", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg,arg-type]
    assert b"PRIVATE KEY" not in repr(issued).encode()


def test_issuing_for_no_host_is_a_config_error(ca: LocalCA) -> None:
    with pytest.raises(ConfigError):
        ca.issue([])


@pytest.fixture
async def https_url(ca: LocalCA) -> AsyncIterator[str]:
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello over TLS")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_ssl_context(["127.0.0.1", "localhost"]))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def test_https_server_is_reachable_with_the_ca_client_context(ca: LocalCA, https_url: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(https_url, ssl=ca.client_ssl_context()) as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == "hello over TLS"


async def test_https_server_is_refused_by_a_default_client_context(https_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.get(https_url, ssl=ssl.create_default_context()):
                pass
