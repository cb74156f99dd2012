"""Collateral: THIM JSON, AMD KDS / THIM / AzCache URLs and the caching client, against local servers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from skr.errors import CollateralError, ConfigError, UpstreamError
from skr.snp.collateral import CollateralClient, CollateralSource
from skr.snp.kds import ThimCertificates, azcache_url, kds_cert_chain_url, kds_vcek_url, parse_thim_json
from skr.snp.report import AttestationReport, Product
from skr.snp.verify import verify_evidence_chain
from skr.upstream import RetryPolicy

ACI = "snp/aci-confidential-sidecar"
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
OID_HWID = "1.3.6.1.4.1.3704.1.4"


def _der_cert(data: bytes) -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.load_der_x509_certificate(data)


def _pem_certs(data: bytes) -> list[x509.Certificate]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.load_pem_x509_certificates(data)


def _report(vectors: Path, name: str) -> AttestationReport:
    return AttestationReport.parse((vectors / name).read_bytes())


# --- THIM JSON ---------------------------------------------------------------------------------------


def test_genuine_thim_json_parses_to_vcek_chain_and_tcbm(vectors: Path) -> None:
    raw = (vectors / ACI / "uvm_host_amd_certificate.json").read_bytes()
    thim = parse_thim_json(raw)
    doc = json.loads(raw)
    assert thim.tcbm == "7308000000000003"
    assert thim.tcb_raw == 0x7308000000000003 == _report(vectors, f"{ACI}/snp_report.bin").reported_tcb
    assert thim.cache_control == 86400
    assert thim.vcek_pem == doc["vcekCert"].encode()
    chain = _pem_certs(thim.chain_pem())
    names = [c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value for c in chain]
    assert names == ["SEV-VCEK", "SEV-Milan", "ARK-Milan"]


def test_genuine_thim_chain_verifies_the_genuine_aci_report(vectors: Path) -> None:
    thim = parse_thim_json((vectors / ACI / "uvm_host_amd_certificate.json").read_bytes())
    report = (vectors / ACI / "snp_report.bin").read_bytes()
    verified = verify_evidence_chain(report, thim.chain_pem(), at=datetime(2024, 6, 1, tzinfo=UTC))
    assert verified.product is Product.MILAN


def _thim_doc(vectors: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((vectors / ACI / "uvm_host_amd_certificate.json").read_bytes())
    return doc


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"{not json", "not JSON"),
        (lambda d: b"[1, 2]", "JSON list"),
        (lambda d: {k: v for k, v in d.items() if k != "vcekCert"}, "'vcekCert' is missing"),
        (lambda d: {**d, "vcekCert": 7}, "'vcekCert' is a JSON int"),
        (lambda d: {**d, "certificateChain": ""}, "'certificateChain' is empty"),
        (lambda d: {**d, "tcbm": "73080000000000031"}, "tcbm"),
        (lambda d: {**d, "tcbm": "zz"}, "tcbm"),
        (
            lambda d: {**d, "vcekCert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
            "vcekCert",
        ),
        (lambda d: {**d, "vcekCert": d["vcekCert"] + d["vcekCert"]}, "exactly one"),
        (lambda d: {**d, "cacheControl": "soon"}, "cacheControl"),
        (lambda d: {**d, "cacheControl": [1]}, "cacheControl"),
    ],
)
def test_malformed_thim_json_is_a_collateral_error(
    vectors: Path, mutate: Callable[[dict[str, Any]], Any], message: str
) -> None:
    mutated = mutate(_thim_doc(vectors))
    data = mutated if isinstance(mutated, bytes) else json.dumps(mutated).encode()
    with pytest.raises(CollateralError) as info:
        parse_thim_json(data)
    assert message in info.value.message


# --- URLs --------------------------------------------------------------------------------------------


def test_kds_vcek_url_for_milan_uses_the_whole_chip_id_and_four_spls() -> None:
    chip = bytes(range(64))
    url = kds_vcek_url(Product.MILAN, chip, bl=3, tee=0, snp=8, ucode=115)
    assert url == (
        "https://kdsintf.amd.com/vcek/v1/Milan/" + chip.hex() + "?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
    )


def test_kds_vcek_url_for_turin_uses_eight_byte_hwid_and_fmc() -> None:
    chip = bytes.fromhex("6bb1229b7692b710") + bytes(56)
    url = kds_vcek_url(Product.TURIN, chip, bl=1, tee=1, snp=4, ucode=82, fmc=1)
    # the same URL go-sev-guest's kds tests expect for this hwID and TCB
    assert (
        url
        == "https://kdsintf.amd.com/vcek/v1/Turin/6bb1229b7692b710?blSPL=1&teeSPL=1&snpSPL=4&ucodeSPL=82&fmcSPL=1"
    )


def test_kds_url_rejects_fmc_off_turin_and_missing_fmc_on_turin() -> None:
    with pytest.raises(CollateralError, match="no FMC"):
        kds_vcek_url(Product.GENOA, bytes(64), bl=1, tee=1, snp=1, ucode=1, fmc=0)
    with pytest.raises(CollateralError, match="FMC SPL"):
        kds_vcek_url(Product.TURIN, bytes(64), bl=1, tee=1, snp=1, ucode=1)


def test_cert_chain_and_azcache_urls() -> None:
    assert kds_cert_chain_url(Product.GENOA) == "https://kdsintf.amd.com/vcek/v1/Genoa/cert_chain"
    assert azcache_url(bytes([0xAB]) * 64, 0x0008000000000003) == (
        "https://global.acccache.azure.net/SevSnpVM/certificates/"
        + "ab" * 64
        + "/8000000000003?api-version=2020-10-15-preview&clientId=ConfidentialACI"
    )


# --- a local upstream --------------------------------------------------------------------------------


@dataclasses.dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float


class Upstream:
    """KDS, THIM and AzCache on one local server. ``failures`` are answered first, one per request."""

    def __init__(self, vectors: Path) -> None:
        roots = vectors / "amd-roots"
        self.vcek: dict[str, bytes] = {
            "Milan": (vectors / "snp/virtee-sev/vcek_milan.der").read_bytes(),
            "Turin": (vectors / "snp/virtee-sev/vcek_turin.der").read_bytes(),
            "Genoa": (vectors / "snp/virtee-sev/vcek_milan.der").read_bytes(),
        }
        self.chains = {
            p: (roots / f"ask_ark_{p.lower()}.pem").read_bytes() for p in ("Milan", "Genoa", "Turin")
        }
        self.thim = (vectors / ACI / "uvm_host_amd_certificate.json").read_bytes()
        self.azcache_pem = (vectors / ACI / "uvm_host_amd_certificate.pem").read_bytes()
        self.products_without_vcek: set[str] = set()
        self.failures: list[tuple[int, dict[str, str]]] = []
        self.always_fail: int | None = None
        self.seen: list[Seen] = []
        self.base = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/vcek/v1/{product}/cert_chain", self.cert_chain)
        app.router.add_get("/vcek/v1/{product}/{hwid}", self.vcek_cert)
        app.router.add_get("/metadata/THIM/amd/certification", self.thim_json)
        app.router.add_get("/SevSnpVM/certificates/{chip}/{tcb}", self.azcache)
        return app

    def _record(self, request: web.Request) -> web.Response | None:
        self.seen.append(Seen(request.path, dict(request.query), dict(request.headers), time.monotonic()))
        if self.always_fail is not None:
            return web.Response(status=self.always_fail, text="upstream down")
        if self.failures:
            status, headers = self.failures.pop(0)
            return web.Response(status=status, headers=headers, text="try again")
        return None

    async def cert_chain(self, request: web.Request) -> web.Response:
        return self._record(request) or web.Response(body=self.chains[request.match_info["product"]])

    async def vcek_cert(self, request: web.Request) -> web.Response:
        product = request.match_info["product"]
        if product in self.products_without_vcek:
            self._record(request)
            return web.Response(status=404, text="Not Found")
        return self._record(request) or web.Response(
            body=self.vcek[product],
            content_type="application/pkix-cert",
            headers={"Cache-Control": "max-age=60"},
        )

    async def thim_json(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata") != "true":
            return web.Response(status=400, text="Required metadata header not specified")
        return self._record(request) or web.Response(body=self.thim, content_type="application/json")

    async def azcache(self, request: web.Request) -> web.Response:
        return self._record(request) or web.Response(body=self.azcache_pem)

    def vcek_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith("/vcek/") and not s.path.endswith("/cert_chain")]


@pytest.fixture
async def upstream(vectors: Path) -> AsyncIterator[Upstream]:
    server = Upstream(vectors)
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.base = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _kds_client(session: aiohttp.ClientSession, upstream: Upstream, **options: Any) -> CollateralClient:
    return CollateralClient(
        session, source=CollateralSource.AMD, kds_base=upstream.base, retry=FAST_RETRY, **options
    )


def _turin_report(vectors: Path) -> AttestationReport:
    """A v3 Turin-family report for the genuine Turin VCEK's 8-byte hwID, with distinct TCB parts."""
    milan = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    vcek = _der_cert((vectors / "snp/virtee-sev/vcek_turin.der").read_bytes())
    hwid = vcek.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_HWID)).value.value  # type: ignore[attr-defined]
    assert len(hwid) == 8
    # Turin TCB_VERSION bytes: fmc, bl, tee, snp, 0, 0, 0, ucode
    tcb = int.from_bytes(bytes([1, 2, 3, 4, 0, 0, 0, 82]), "little")
    return dataclasses.replace(
        milan, version=3, cpuid_fam_id=0x1A, cpuid_mod_id=0x02, chip_id=hwid + bytes(56), reported_tcb=tcb
    )


# --- KDS -----------------------------------------------------------------------------------------------


async def test_kds_milan_fetch_asks_the_exact_url_and_returns_a_verifiable_chain(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    raw = (vectors / "snp/virtee-sev/report_milan.DERIVED.bin").read_bytes()
    report = AttestationReport.parse(raw)
    chain, tcbm = await _kds_client(session, upstream).get_chain(report, product=Product.MILAN)

    [vcek_request] = upstream.vcek_requests()
    assert vcek_request.path == "/vcek/v1/Milan/" + report.chip_id.hex()
    assert vcek_request.query == {"blSPL": "3", "teeSPL": "0", "snpSPL": "8", "ucodeSPL": "115"}
    assert [s.path for s in upstream.seen if s.path.endswith("cert_chain")] == ["/vcek/v1/Milan/cert_chain"]
    assert tcbm == "7308000000000003"
    certs = _pem_certs(chain)
    assert certs[0].public_bytes(Encoding.DER) == upstream.vcek["Milan"]
    assert len(certs) == 3
    verify_evidence_chain(raw, chain, at=datetime(2024, 6, 1, tzinfo=UTC))


async def test_kds_turin_fetch_uses_hwid_prefix_and_fmc_spl(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = _turin_report(vectors)
    chain, tcbm = await _kds_client(session, upstream).get_chain(report)  # product from the report's CPUID

    [vcek_request] = upstream.vcek_requests()
    assert vcek_request.path == "/vcek/v1/Turin/1e550a8ee5cf9f4d"
    assert vcek_request.query == {"blSPL": "2", "teeSPL": "3", "snpSPL": "4", "ucodeSPL": "82", "fmcSPL": "1"}
    assert tcbm == "5200000004030201"
    assert _pem_certs(chain)[0].public_bytes(Encoding.DER) == upstream.vcek["Turin"]


async def test_kds_falls_back_from_milan_to_genoa_for_a_v2_report(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    assert report.product_hint() is None  # version 2: no CPUID
    upstream.products_without_vcek.add("Milan")
    await _kds_client(session, upstream).get_chain(report)
    assert [s.path.split("/")[3] for s in upstream.vcek_requests()] == ["Milan", "Genoa"]


async def test_kds_404_for_every_candidate_is_a_collateral_error(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.products_without_vcek.update({"Milan", "Genoa"})
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    with pytest.raises(
        CollateralError, match=r"no VCEK for this chip and TCB 7308000000000003 \(tried Milan, Genoa\)"
    ):
        await _kds_client(session, upstream).get_chain(report)


async def test_transient_503_is_retried_then_succeeds(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.failures = [(503, {})]
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    chain, _ = await _kds_client(session, upstream).get_chain(report, product=Product.MILAN)
    assert len(upstream.vcek_requests()) == 2
    assert len(_pem_certs(chain)) == 3


async def test_retry_after_is_honoured(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.failures = [(429, {"Retry-After": "1"})]
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    await _kds_client(session, upstream).get_chain(report, product=Product.MILAN)
    first, second = upstream.vcek_requests()
    # the backoff policy alone would wait at most 0.02 s
    assert second.at - first.at >= 0.9


async def test_fresh_cache_entry_is_served_without_network(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    client = _kds_client(session, upstream)
    first = await client.get_chain(report, product=Product.MILAN)
    count = len(upstream.seen)
    assert await client.get_chain(report, product=Product.MILAN) == first
    assert len(upstream.seen) == count


async def test_concurrent_requests_for_one_chip_and_tcb_share_one_fetch(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    client = _kds_client(session, upstream)
    results = await asyncio.gather(*(client.get_chain(report, product=Product.MILAN) for _ in range(5)))
    assert len(set(results)) == 1
    assert len(upstream.vcek_requests()) == 1


async def test_stale_chain_is_served_when_the_refresh_fails(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    clock = Clock()
    client = _kds_client(session, upstream, clock=clock)
    good = await client.get_chain(report, product=Product.MILAN)
    clock.now += 61  # past the VCEK's Cache-Control max-age=60
    upstream.always_fail = 500
    with caplog.at_level(logging.WARNING, logger="skr.snp.collateral"):
        assert await client.get_chain(report, product=Product.MILAN) == good
    assert "stale" in caplog.text
    assert "HTTP 500" in caplog.text
    assert len(upstream.vcek_requests()) == 1 + FAST_RETRY.attempts


async def test_failure_without_a_cached_chain_raises(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.always_fail = 502
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    with pytest.raises(UpstreamError, match="AMD KDS kept failing with HTTP 502"):
        await _kds_client(session, upstream).get_chain(report, product=Product.MILAN)


async def test_tcb_change_triggers_a_refetch(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = _report(vectors, "snp/virtee-sev/report_milan.DERIVED.bin")
    newer = dataclasses.replace(report, reported_tcb=0x7409000000000003)  # snp 8 -> 9, ucode 0x73 -> 0x74
    client = _kds_client(session, upstream)
    await client.get_chain(report, product=Product.MILAN)
    _, tcbm = await client.get_chain(newer, product=Product.MILAN)
    assert tcbm == "7409000000000003"
    queries = [s.query for s in upstream.vcek_requests()]
    assert queries == [
        {"blSPL": "3", "teeSPL": "0", "snpSPL": "8", "ucodeSPL": "115"},
        {"blSPL": "3", "teeSPL": "0", "snpSPL": "9", "ucodeSPL": "116"},
    ]


async def test_vlek_reports_cannot_be_served_by_certificate_services(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = _report(vectors, "snp/trustee/test-vlek-report.bin")
    with pytest.raises(CollateralError, match="VLEK"):
        await _kds_client(session, upstream).get_chain(report)
    assert upstream.seen == []


# --- THIM and AzCache ---------------------------------------------------------------------------------


async def test_local_thim_source_sends_metadata_header_and_returns_the_thim_chain(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = _report(vectors, f"{ACI}/snp_report.bin")
    client = CollateralClient(
        session,
        source=CollateralSource.LOCAL_THIM,
        thim_url=upstream.base + "/metadata/THIM/amd/certification",
        retry=FAST_RETRY,
    )
    chain, tcbm = await client.get_chain(report)
    assert upstream.seen[0].headers["Metadata"] == "true"
    assert tcbm == "7308000000000003"
    assert chain == parse_thim_json(upstream.thim).chain_pem()


async def test_local_thim_for_another_tcb_is_an_error_naming_both(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = dataclasses.replace(_report(vectors, f"{ACI}/snp_report.bin"), reported_tcb=0x7409000000000003)
    client = CollateralClient(
        session,
        source=CollateralSource.LOCAL_THIM,
        thim_url=upstream.base + "/metadata/THIM/amd/certification",
    )
    with pytest.raises(CollateralError) as info:
        await client.get_chain(report)
    assert "7308000000000003" in info.value.message
    assert "7409000000000003" in info.value.message


async def test_azcache_source_asks_the_exact_url(
    vectors: Path, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    report = dataclasses.replace(_report(vectors, f"{ACI}/snp_report.bin"), reported_tcb=0x0008000000000003)
    client = CollateralClient(
        session, source=CollateralSource.AZCACHE, azcache_base=upstream.base + "/SevSnpVM", retry=FAST_RETRY
    )
    chain, tcbm = await client.get_chain(report)
    [seen] = upstream.seen
    assert seen.path == f"/SevSnpVM/certificates/{report.chip_id.hex()}/8000000000003"
    assert seen.query == {"api-version": "2020-10-15-preview", "clientId": "ConfidentialACI"}
    assert tcbm == "0008000000000003"
    assert len(_pem_certs(chain)) == 3


def test_certcache_json_maps_like_the_go_sidecar() -> None:
    session: Any = object()  # never used: nothing is fetched here
    thim = CollateralClient.from_certcache(
        session, {"endpoint_type": "LocalTHIM", "endpoint": "169.254.169.254/metadata/THIM/amd/certification"}
    )
    assert thim.source is CollateralSource.LOCAL_THIM
    assert thim.thim_url == "http://169.254.169.254/metadata/THIM/amd/certification"
    azcache = CollateralClient.from_certcache(
        session,
        {
            "endpoint_type": "AzCache",
            "endpoint": "americas.acccache.azure.net",
            "tee_type": "SevSnpVM",
            "api_version": "api-version=2020-10-15-preview",
            "client_id": "clientId=ConfidentialACI",
        },
    )
    assert azcache.source is CollateralSource.AZCACHE
    assert azcache.azcache_base == "https://americas.acccache.azure.net/SevSnpVM"
    amd = CollateralClient.from_certcache(
        session, {"endpoint_type": "AMD", "endpoint": "kdsintf.amd.com/vcek/v1"}
    )
    assert (amd.source, amd.kds_base) == (CollateralSource.AMD, "https://kdsintf.amd.com")
    assert CollateralClient.from_certcache(session, {}).source is CollateralSource.AMD


def test_unknown_endpoint_type_is_a_config_error_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match="Intel") as info:
        CollateralSource.parse("Intel")
    assert info.value.hint is not None
    assert "AMD, AzCache, LocalTHIM" in info.value.hint


def test_thim_certificates_chain_pem_joins_with_newlines() -> None:
    thim = ThimCertificates(vcek_pem=b"A", certificate_chain_pem=b"B\n", tcbm="1", cache_control=None)
    assert thim.chain_pem() == b"A\nB\n"
    assert thim.tcb_raw == 1


@dataclasses.dataclass(frozen=True)
class _CertCache:
    endpoint_type: str = ""
    endpoint: str = ""
    tee_type: str = ""
    api_version: str = ""
    client_id: str = ""


def test_certcache_settings_object_is_accepted_like_the_json() -> None:
    session: Any = object()
    client = CollateralClient.from_certcache(
        session,
        _CertCache(
            endpoint_type="AzCache", endpoint="global.acccache.azure.net", api_version="2020-10-15-preview"
        ),
    )
    assert client.source is CollateralSource.AZCACHE
    assert client.azcache_base == "https://global.acccache.azure.net/SevSnpVM"
    assert CollateralClient.from_certcache(session, _CertCache()).source is CollateralSource.AMD
