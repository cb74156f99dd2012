"""What AMD KDS, THIM and the Azure certificate cache speak: URLs and the THIM document, and nothing else.

Owns: the THIM JSON format (``{vcekCert, tcbm, certificateChain, cacheControl}``, as IMDS serves it and as
ACI ships it base64-encoded in ``host-amd-cert-base64``), the AMD KDS URLs (per product; Turin's 8-byte
hwID and ``fmcSPL``), the Azure certificate-cache URL, and which KDS product paths fit a report.

Pure: no sockets, no event loop, no files (go-sev-guest's ``kds/``). :mod:`skr.snp.collateral` is the HTTP
client and cache over it. Never decides trust: a chain read here is only a candidate for
:mod:`skr.snp.verify`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from skr.errors import CollateralError
from skr.snp.certs import read_certificates
from skr.snp.report import AttestationReport, Product

THIM_URL: Final = "http://169.254.169.254/metadata/THIM/amd/certification"
KDS_BASE: Final = "https://kdsintf.amd.com"
AZCACHE_BASE: Final = "https://global.acccache.azure.net/SevSnpVM"
AZCACHE_API_VERSION: Final = "2020-10-15-preview"
AZCACHE_CLIENT_ID: Final = "ConfidentialACI"

_TCBM_RE: Final = re.compile(r"[0-9a-fA-F]{1,16}")
_MAX_AGE_RE: Final = re.compile(r"(?:.*\bmax-age=)?\s*(\d+)\s*", re.IGNORECASE)
_THIM_HINT: Final = "expected {vcekCert, tcbm, certificateChain, cacheControl}"


# --- THIM --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThimCertificates:
    """The THIM answer: the VCEK, its ASK+ARK chain, and the TCB (``tcbm``) the VCEK was issued for."""

    vcek_pem: bytes
    certificate_chain_pem: bytes
    tcbm: str
    cache_control: int | None

    def chain_pem(self) -> bytes:
        """VCEK followed by ASK and ARK, as one PEM text."""
        return _with_newline(self.vcek_pem) + _with_newline(self.certificate_chain_pem)

    @property
    def tcb_raw(self) -> int:
        """``tcbm`` as the u64 TCB_VERSION it encodes (compare with the report's REPORTED_TCB)."""
        return int(self.tcbm, 16)


def tcbm(reported_tcb: int) -> str:
    """A TCB_VERSION as THIM's ``tcbm`` writes it: 16 hex digits (``"7308000000000003"``)."""
    return f"{reported_tcb:016x}"


def parse_thim_json(data: bytes) -> ThimCertificates:
    """Parse THIM JSON strictly. Raises :class:`CollateralError` saying which field is wrong and how."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CollateralError(
            f"the THIM certificate document is not JSON ({exc.__class__.__name__}: {exc})", hint=_THIM_HINT
        ) from None
    if not isinstance(doc, dict):
        raise CollateralError(
            f"the THIM certificate document is a JSON {type(doc).__name__}, expected an object",
            hint=_THIM_HINT,
        )
    vcek = _thim_string(doc, "vcekCert")
    chain = _thim_string(doc, "certificateChain")
    tcbm = _thim_string(doc, "tcbm").strip()
    if not _TCBM_RE.fullmatch(tcbm):
        raise CollateralError(
            f"THIM tcbm {tcbm[:40]!r} is not a TCB_VERSION in hex (1 to 16 hex digits)",
            hint='expected e.g. "7308000000000003"',
        )
    vcek_certs = load_pem_certificates(vcek.encode(), what="THIM vcekCert")
    if len(vcek_certs) != 1:
        raise CollateralError(f"THIM vcekCert holds {len(vcek_certs)} certificates, expected exactly one")
    load_pem_certificates(chain.encode(), what="THIM certificateChain")
    return ThimCertificates(
        vcek_pem=vcek.encode(),
        certificate_chain_pem=chain.encode(),
        tcbm=tcbm,
        cache_control=_thim_cache_control(doc.get("cacheControl")),
    )


def _thim_string(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value.strip():
        kind = "empty" if isinstance(value, str) else f"a JSON {type(value).__name__}"
        found = "missing" if value is None else kind
        raise CollateralError(f"THIM field {name!r} is {found}, expected a non-empty string", hint=_THIM_HINT)
    if not value.isascii():  # PEM and hex are ASCII; this also refuses lone surrogates before .encode()
        raise CollateralError(f"THIM field {name!r} holds non-ASCII text, expected PEM or hex")
    return value


def _thim_cache_control(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _MAX_AGE_RE.fullmatch(value)
        if match:
            return int(match.group(1))
    raise CollateralError(
        f"THIM cacheControl {str(value)[:40]!r} is not a number of seconds", hint='expected e.g. "86400"'
    )


# --- URLs --------------------------------------------------------------------------------------------


def kds_vcek_url(
    product: Product,
    chip_id: bytes,
    *,
    bl: int,
    tee: int,
    snp: int,
    ucode: int,
    fmc: int | None = None,
    base: str = KDS_BASE,
) -> str:
    """The AMD KDS VCEK URL (the answer is DER).

    Milan/Genoa: ``{base}/vcek/v1/{product}/{64-byte CHIP_ID hex}?blSPL=&teeSPL=&snpSPL=&ucodeSPL=``.
    Turin: the hwID is the first 8 bytes of CHIP_ID (16 hex digits) and ``&fmcSPL=`` is appended.
    SPLs are unpadded decimal (as go-sev-guest writes them).
    """
    for name, value in (("bl", bl), ("tee", tee), ("snp", snp), ("ucode", ucode), ("fmc", fmc)):
        if value is not None and not 0 <= value <= 255:
            raise CollateralError(f"TCB part {name}={value} is outside 0..255")
    query = f"blSPL={bl}&teeSPL={tee}&snpSPL={snp}&ucodeSPL={ucode}"
    if product is Product.TURIN:
        if fmc is None:
            raise CollateralError("a Turin VCEK URL needs the FMC SPL, but none was given")
        if len(chip_id) not in (8, 64):
            raise CollateralError(f"CHIP_ID is {len(chip_id)} bytes, expected 64 (or the 8-byte Turin hwID)")
        hwid = chip_id[:8].hex()
        query += f"&fmcSPL={fmc}"
    else:
        if fmc is not None:
            raise CollateralError(f"{product.value} has no FMC SPL, but fmc={fmc} was given")
        if len(chip_id) != 64:
            raise CollateralError(f"CHIP_ID is {len(chip_id)} bytes, expected 64")
        hwid = chip_id.hex()
    return f"{base.rstrip('/')}/vcek/v1/{product.value}/{hwid}?{query}"


def kds_vcek_url_for_report(report: AttestationReport, product: Product, *, base: str = KDS_BASE) -> str:
    """:func:`kds_vcek_url` for a report's CHIP_ID and REPORTED_TCB decoded for ``product``."""
    tcb = report.reported_tcb_version(product)
    return kds_vcek_url(
        product, report.chip_id, bl=tcb.bl, tee=tcb.tee, snp=tcb.snp, ucode=tcb.ucode, fmc=tcb.fmc, base=base
    )


def kds_cert_chain_url(product: Product, *, base: str = KDS_BASE) -> str:
    """The AMD KDS ``cert_chain`` URL for VCEKs: PEM, ASK first, then ARK."""
    return f"{base.rstrip('/')}/vcek/v1/{product.value}/cert_chain"


def azcache_url(
    chip_id: bytes,
    reported_tcb: int,
    *,
    base: str = AZCACHE_BASE,
    api_version: str = AZCACHE_API_VERSION,
    client_id: str = AZCACHE_CLIENT_ID,
) -> str:
    """The Azure certificate-cache URL: ``{base}/certificates/{chip_id hex}/{tcb hex, no leading zeros}``."""
    query = f"api-version={api_version}"
    if client_id:
        query += f"&clientId={client_id}"
    return f"{base.rstrip('/')}/certificates/{chip_id.hex()}/{reported_tcb:x}?{query}"


def candidate_products(report: AttestationReport, product: Product | None) -> list[Product]:
    """Which KDS product paths to try: the given one, the report's CPUID hint, else by CHIP_ID shape.

    Version 2 reports carry no CPUID. A CHIP_ID whose bytes 8..63 are zero is a Turin hwID (virtee's
    heuristic); otherwise Milan is tried first, then Genoa.
    """
    chosen = product or report.product_hint()
    if chosen is not None:
        return [chosen]
    if any(report.chip_id[:8]) and not any(report.chip_id[8:]):
        return [Product.TURIN]
    return [Product.MILAN, Product.GENOA]


# --- answers -----------------------------------------------------------------------------------------


def load_pem_certificates(data: bytes, *, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle a certificate service returned; CollateralError otherwise."""
    try:
        return read_certificates(data, encoding=Encoding.PEM)
    except ValueError as exc:
        raise CollateralError(
            f"the {what} is not a PEM certificate bundle ({exc})",
            hint="the certificate service returned something other than certificates",
        ) from None


def load_der_certificate(data: bytes, *, what: str) -> x509.Certificate:
    """The one DER certificate a certificate service returned; CollateralError otherwise."""
    try:
        (cert,) = read_certificates(data, encoding=Encoding.DER)
    except ValueError as exc:
        raise CollateralError(
            f"the {what} ({len(data)} bytes) is not a DER X.509 certificate ({exc})",
            hint="the certificate service returned something other than a certificate",
        ) from None
    return cert


def _with_newline(pem: bytes) -> bytes:
    return pem if pem.endswith(b"\n") else pem + b"\n"
