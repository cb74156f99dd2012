"""Where VCEK certificate chains come from: the HTTP client and cache over THIM, AMD KDS and the Azure cache.

Owns: the choice of source (the Go sidecar's ``certcache`` ``endpoint_type``: ``AMD`` | ``AzCache`` |
``LocalTHIM``), the fetches, and an in-memory cache keyed by (CHIP_ID, REPORTED_TCB) that serves the last
good chain when the upstream fails (stale-on-error, always logged). The URLs and the THIM document are
:mod:`skr.snp.kds` (pure).

Never decides trust: a chain fetched here is only a candidate that :mod:`skr.snp.verify` checks against the
pinned AMD roots. Never sends anything but the chip id and TCB upstream. All HTTP goes through
:func:`skr.upstream.request` (timeouts, retries of transient failures, ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

import aiohttp
from cryptography.hazmat.primitives.serialization import Encoding

from skr.errors import CollateralError, ConfigError, UpstreamError, UpstreamTimeout
from skr.snp import kds
from skr.snp.report import AttestationReport, Product
from skr.upstream import (
    DEFAULT_MAX_UPSTREAM_BODY,
    DEFAULT_RETRY,
    Deadline,
    HttpResult,
    RetryPolicy,
    request,
    summarize_body,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE: Final = 86400.0

_THIM_SERVICE: Final = "THIM (IMDS)"
_KDS_SERVICE: Final = "AMD KDS"
_AZCACHE_SERVICE: Final = "Azure certificate cache"


class CollateralSource(StrEnum):
    """Where :class:`CollateralClient` fetches chains from; the Go sidecar's ``certcache.endpoint_type``."""

    AMD = "AMD"
    AZCACHE = "AzCache"
    LOCAL_THIM = "LocalTHIM"

    @classmethod
    def parse(cls, value: str) -> CollateralSource:
        """Case-insensitive lookup; ConfigError naming the accepted values otherwise."""
        for member in cls:
            if member.value.lower() == value.strip().lower():
                return member
        raise ConfigError(
            f"unknown certificate source {value!r}",
            hint="certcache.endpoint_type must be one of " + ", ".join(m.value for m in cls),
        )


class CertCacheSettings(Protocol):
    """The Go sidecar's ``certcache`` block as a settings object (e.g. ``skr.config.CertCacheConfig``)."""

    @property
    def endpoint_type(self) -> str: ...

    @property
    def endpoint(self) -> str: ...

    @property
    def tee_type(self) -> str: ...

    @property
    def api_version(self) -> str: ...

    @property
    def client_id(self) -> str: ...


# --- the client --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cached:
    chain_pem: bytes
    tcbm: str
    fetched_at: float
    max_age: float


class CollateralClient:
    """Fetches and caches VCEK chains for reports from one configured source.

    The cache is keyed by (CHIP_ID, REPORTED_TCB): a report with a different TCB is a cache miss and is
    fetched afresh. An entry is reused for ``max_age`` seconds (THIM ``cacheControl``, the upstream's
    ``Cache-Control: max-age``, else ``default_max_age``); after that it is refreshed, and if the refresh
    fails the old chain is served and a warning is logged. The client does not own ``session``.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        source: CollateralSource = CollateralSource.AMD,
        ssl_context: ssl.SSLContext | None = None,
        thim_url: str = kds.THIM_URL,
        kds_base: str = kds.KDS_BASE,
        azcache_base: str = kds.AZCACHE_BASE,
        azcache_api_version: str = kds.AZCACHE_API_VERSION,
        azcache_client_id: str = kds.AZCACHE_CLIENT_ID,
        timeout: float = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        product: Product | None = None,
        default_max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
        max_body: int = DEFAULT_MAX_UPSTREAM_BODY,
    ) -> None:
        self._session = session
        self._max_body = max_body
        self.source = source
        self._ssl = ssl_context
        self.thim_url = thim_url
        self.kds_base = kds_base
        self.azcache_base = azcache_base
        self._azcache_api_version = azcache_api_version
        self._azcache_client_id = azcache_client_id
        self._timeout = timeout
        self._retry = retry
        self._product = product
        self._default_max_age = default_max_age
        self._clock = clock
        self._cache: dict[tuple[bytes, int], _Cached] = {}
        self._kds_chains: dict[Product, _Cached] = {}
        self._locks: dict[tuple[bytes, int], asyncio.Lock] = {}

    @classmethod
    def from_certcache(
        cls, session: aiohttp.ClientSession, certcache: Mapping[str, Any] | CertCacheSettings, **options: Any
    ) -> CollateralClient:
        """A client configured like the Go sidecar's ``certcache`` block (a JSON mapping or settings object).

        ``{"endpoint_type": "AMD"|"AzCache"|"LocalTHIM", "endpoint": "host[/path]", "tee_type": ...,
        "api_version": "api-version=...", "client_id": "clientId=..."}``; an empty endpoint_type means
        AMD. Endpoints without a scheme get ``https://`` (``http://`` for LocalTHIM, which is plain HTTP on
        IMDS). Other keyword options are passed to the constructor.
        """

        def setting(name: str) -> str:
            value = certcache.get(name) if isinstance(certcache, Mapping) else getattr(certcache, name, None)
            return str(value or "").strip()

        source = CollateralSource.parse(setting("endpoint_type") or "AMD")
        endpoint = setting("endpoint").rstrip("/")
        if source is CollateralSource.LOCAL_THIM:
            options["thim_url"] = _with_scheme(endpoint, "http") if endpoint else kds.THIM_URL
        elif source is CollateralSource.AZCACHE:
            tee = setting("tee_type").strip("/") or "SevSnpVM"
            host = _with_scheme(endpoint, "https") if endpoint else kds.AZCACHE_BASE.rsplit("/", 1)[0]
            options["azcache_base"] = f"{host}/{tee}"
            options["azcache_api_version"] = _fragment_value(
                setting("api_version"), "api-version", kds.AZCACHE_API_VERSION
            )
            options["azcache_client_id"] = _fragment_value(
                setting("client_id"), "clientId", kds.AZCACHE_CLIENT_ID
            )
        elif endpoint:
            base = _with_scheme(endpoint, "https")
            options["kds_base"] = base[: -len("/vcek/v1")] if base.endswith("/vcek/v1") else base
        return cls(session, source=source, **options)

    async def get_chain(
        self, report: AttestationReport, *, product: Product | None = None, deadline: Deadline | None = None
    ) -> tuple[bytes, str]:
        """The VCEK chain PEM (VCEK, ASK, ARK) for ``report`` and the TCB it is for (16 hex digits).

        ``product`` picks the AMD KDS path; when None the client's configured product, then the report's
        CPUID hint, then the CHIP_ID shape decide (see :func:`skr.snp.kds.candidate_products`). Raises
        :class:`CollateralError` (or UpstreamError/UpstreamTimeout) when no chain can be had and none
        is cached.
        """
        _check_fetchable(report, self.source)
        key = (bytes(report.chip_id), report.reported_tcb)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one fetch per (chip, TCB) at a time; the others then hit the cache
            cached = self._cache.get(key)
            now = self._clock()
            if cached is not None and now - cached.fetched_at < cached.max_age:
                return cached.chain_pem, cached.tcbm
            try:
                fresh = await self._fetch(report, product, deadline)
            except (CollateralError, UpstreamError, UpstreamTimeout) as exc:
                if cached is None:
                    raise
                log.warning(
                    "%s failed (%s); serving the cached VCEK chain for TCB %s fetched %.0f s ago (stale)",
                    self.source.value,
                    exc.message,
                    cached.tcbm,
                    now - cached.fetched_at,
                )
                return cached.chain_pem, cached.tcbm
            self._cache[key] = fresh
            return fresh.chain_pem, fresh.tcbm

    async def fetch_thim(self, *, deadline: Deadline | None = None) -> kds.ThimCertificates:
        """GET THIM (``Metadata: true``) and parse it; no caching, no TCB check."""
        result = await self._get(self.thim_url, _THIM_SERVICE, deadline, headers={"Metadata": "true"})
        return kds.parse_thim_json(result.body)

    # --- sources -------------------------------------------------------------------------------------

    async def _fetch(
        self, report: AttestationReport, product: Product | None, deadline: Deadline | None
    ) -> _Cached:
        if self.source is CollateralSource.LOCAL_THIM:
            return await self._fetch_thim(report, deadline)
        if self.source is CollateralSource.AZCACHE:
            return await self._fetch_azcache(report, deadline)
        return await self._fetch_kds(report, product, deadline)

    async def _fetch_thim(self, report: AttestationReport, deadline: Deadline | None) -> _Cached:
        thim = await self.fetch_thim(deadline=deadline)
        if thim.tcb_raw != report.reported_tcb:
            raise CollateralError(
                f"THIM returned certificates for TCB {thim.tcbm} but the report's REPORTED_TCB is "
                f"{kds.tcbm(report.reported_tcb)}",
                hint="the host's TCB changed after the report was taken, or THIM is stale; retry, or use "
                "the AMD or AzCache certificate source",
            )
        max_age = float(thim.cache_control) if thim.cache_control is not None else self._default_max_age
        return _Cached(thim.chain_pem(), thim.tcbm, self._clock(), max_age)

    async def _fetch_azcache(self, report: AttestationReport, deadline: Deadline | None) -> _Cached:
        url = kds.azcache_url(
            report.chip_id,
            report.reported_tcb,
            base=self.azcache_base,
            api_version=self._azcache_api_version,
            client_id=self._azcache_client_id,
        )
        result = await self._get(url, _AZCACHE_SERVICE, deadline)
        certs = kds.load_pem_certificates(result.body, what=f"{_AZCACHE_SERVICE} answer")
        chain = b"".join(cert.public_bytes(Encoding.PEM) for cert in certs)
        return _Cached(chain, kds.tcbm(report.reported_tcb), self._clock(), self._max_age(result))

    async def _fetch_kds(
        self, report: AttestationReport, product: Product | None, deadline: Deadline | None
    ) -> _Cached:
        candidates = kds.candidate_products(report, product or self._product)
        for index, candidate in enumerate(candidates):
            url = kds.kds_vcek_url_for_report(report, candidate, base=self.kds_base)
            result = await self._get(url, _KDS_SERVICE, deadline, accept=(200, 400, 404))
            if result.status == 200:
                vcek = kds.load_der_certificate(result.body, what="AMD KDS VCEK")
                ask_ark = await self._kds_cert_chain(candidate, deadline)
                chain = vcek.public_bytes(Encoding.PEM) + ask_ark
                return _Cached(chain, kds.tcbm(report.reported_tcb), self._clock(), self._max_age(result))
            if index + 1 < len(candidates):
                log.info(
                    "AMD KDS has no %s VCEK for this chip (HTTP %d); trying %s",
                    candidate.value,
                    result.status,
                    candidates[index + 1].value,
                )
        raise CollateralError(  # every candidate product answered 400/404 (there is always at least one)
            f"AMD KDS has no VCEK for this chip and TCB {kds.tcbm(report.reported_tcb)} "
            f"(tried {', '.join(p.value for p in candidates)}): HTTP {result.status} "
            f"{summarize_body(result.body)}".rstrip(),
            hint="check the product and that the chip id is not masked; or use the THIM / AzCache source",
            upstream_status=result.status,
        )

    async def _kds_cert_chain(self, product: Product, deadline: Deadline | None) -> bytes:
        """ASK + ARK for ``product``, cached separately (they are shared by every chip of the product)."""
        cached = self._kds_chains.get(product)
        if cached is not None and self._clock() - cached.fetched_at < cached.max_age:
            return cached.chain_pem
        try:
            url = kds.kds_cert_chain_url(product, base=self.kds_base)
            result = await self._get(url, _KDS_SERVICE, deadline)
            certs = kds.load_pem_certificates(result.body, what=f"AMD KDS {product.value} cert_chain")
            if len(certs) != 2:
                raise CollateralError(
                    f"AMD KDS {product.value} cert_chain holds {len(certs)} certificates, "
                    "expected ASK then ARK"
                )
        except (CollateralError, UpstreamError, UpstreamTimeout) as exc:
            if cached is None:
                raise
            log.warning("AMD KDS cert_chain failed (%s); serving the cached ASK/ARK (stale)", exc.message)
            return cached.chain_pem
        chain = b"".join(cert.public_bytes(Encoding.PEM) for cert in certs)
        self._kds_chains[product] = _Cached(chain, "", self._clock(), self._max_age(result))
        return chain

    async def _get(
        self,
        url: str,
        service: str,
        deadline: Deadline | None,
        *,
        headers: Mapping[str, str] | None = None,
        accept: tuple[int, ...] = (200,),
    ) -> HttpResult:
        result = await request(
            self._session,
            "GET",
            url,
            service=service,
            headers=headers,
            ssl_context=self._ssl,
            timeout=self._timeout,
            deadline=deadline,
            retry=self._retry,
            max_body=self._max_body,
        )
        if result.status not in accept:
            what = (
                "has no certificate for this chip and TCB" if result.status == 404 else "refused the request"
            )
            raise CollateralError(
                f"{service} {what}: HTTP {result.status} {summarize_body(result.body)}".rstrip(),
                hint=f"check the certificate source configuration ({self.source.value}) and its endpoint",
                upstream_status=result.status,
            )
        return result

    def _max_age(self, result: HttpResult) -> float:
        value = result.headers.get("Cache-Control", "")
        match = re.search(r"\bmax-age=(\d+)", value, re.IGNORECASE)
        return float(match.group(1)) if match else self._default_max_age


def _check_fetchable(report: AttestationReport, source: CollateralSource) -> None:
    if report.signing_key != "vcek":
        raise CollateralError(
            f"the report is signed with a {report.signing_key.upper()} key; certificate services only serve "
            "VCEK chains",
            hint="a VLEK and its ASVK chain come from the host's certificate table (extended report / "
            "auxblob)",
        )
    if source is not CollateralSource.LOCAL_THIM and not any(report.chip_id):
        raise CollateralError(
            "the report's CHIP_ID is masked (all zeros), so its VCEK cannot be looked up by chip id",
            hint="take the chain from the host's certificate table or the security context",
        )


def _with_scheme(endpoint: str, scheme: str) -> str:
    return endpoint if "://" in endpoint else f"{scheme}://{endpoint}"


def _fragment_value(text: str, name: str, default: str) -> str:
    """``"api-version=X"`` (the Go sidecar's literal query fragment) or plain ``"X"`` → ``"X"``."""
    if not text:
        return default
    prefix = f"{name}="
    return text[len(prefix) :] if text.lower().startswith(prefix.lower()) else text


__all__ = ["CertCacheSettings", "CollateralClient", "CollateralSource"]
