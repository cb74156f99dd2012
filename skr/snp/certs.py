"""AMD SEV-SNP certificates: pinned ARK fingerprints, loading, VCEK/VLEK extensions, chain checks.

Owns the trust anchors (the AMD Root Keys of Milan, Genoa and Turin, pinned by the SHA-256 of their
DER encoding; the certificates themselves travel with the evidence), the AMD X.509 extensions
(arc 1.3.6.1.4.1.3704.1, values DER-encoded), and the AMD chain rule: ARK self-signed,
ASK/ASVK signed by the ARK, VCEK/VLEK signed by the ASK/ASVK, every signature RSASSA-PSS with
SHA-384, MGF1-SHA-384 and a 48-byte salt, every certificate valid at the time of the check.

Must never: trust a root that is neither pinned here nor passed in explicitly, fetch anything, or
let the serial-number-0 deprecation warning of genuine VCEKs escape.
"""

from __future__ import annotations

import hashlib
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from skr.errors import CertificateError, Code
from skr.snp.report import Product

# SHA-256 over the DER of each AMD Root Key certificate (CN=ARK-<product>), as published by AMD KDS
# (``/vcek/v1/<product>/cert_chain``) and shipped by virtee/sev and go-sev-guest.
AMD_ARK_SHA256: Mapping[Product, str] = types.MappingProxyType(
    {
        Product.MILAN: "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        Product.GENOA: "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        Product.TURIN: "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    }
)

_AMD_ARC = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = x509.ObjectIdentifier(f"{_AMD_ARC}.1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{_AMD_ARC}.2")
OID_BL_SPL = x509.ObjectIdentifier(f"{_AMD_ARC}.3.1")
OID_TEE_SPL = x509.ObjectIdentifier(f"{_AMD_ARC}.3.2")
OID_SNP_SPL = x509.ObjectIdentifier(f"{_AMD_ARC}.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(f"{_AMD_ARC}.3.8")
OID_FMC_SPL = x509.ObjectIdentifier(f"{_AMD_ARC}.3.9")
OID_HWID = x509.ObjectIdentifier(f"{_AMD_ARC}.4")
OID_CSP_ID = x509.ObjectIdentifier(f"{_AMD_ARC}.5")

HWID_SIZES = (64, 8)  # 64 bytes up to Genoa, 8 bytes on Turin
AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)

VekKind = Literal["vcek", "vlek"]


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def product_of_ark(cert: x509.Certificate) -> Product | None:
    """The product whose pinned AMD ARK this certificate is, else ``None``."""
    fingerprint = sha256_fingerprint(cert)
    return next((product for product, pinned in AMD_ARK_SHA256.items() if pinned == fingerprint), None)


def common_name(name: x509.Name) -> str:
    """The CN of a distinguished name, or an empty string."""
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# --- loading ---------------------------------------------------------------------------------------


def read_certificates(data: bytes, *, encoding: Encoding | None = None) -> list[x509.Certificate]:
    """skr's one X.509 reader: every certificate of a PEM bundle, or the one certificate of a DER blob.

    ``encoding`` insists on one form; by default a ``BEGIN CERTIFICATE`` line means PEM. Genuine
    VCEKs/VLEKs carry serial number 0, which ``cryptography`` warns about when parsing; the warning is
    suppressed here and nowhere else (nothing in skr reads ``serial_number``, which would warn again).
    Raises ``ValueError`` (cryptography's message) when nothing can be read; callers say what they expected.
    """
    if encoding is None:
        encoding = Encoding.PEM if b"-----BEGIN CERTIFICATE-----" in data else Encoding.DER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        if encoding is Encoding.PEM:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """:func:`read_certificates` for evidence: :class:`CertificateError` when nothing can be read."""
    try:
        return read_certificates(data)
    except ValueError as exc:
        raise CertificateError(
            f"cannot read a certificate ({exc})",
            hint="expected DER or PEM X.509 certificates",
            code=Code.CERTIFICATE_UNREADABLE,
        ) from None


# --- DER helpers for the AMD extension values ------------------------------------------------------

_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_UTF8_STRING = 0x0C
_TAG_IA5_STRING = 0x16


def _der_single(data: bytes, what: str) -> tuple[int, bytes]:
    """Decode exactly one DER TLV with a low tag number; returns (tag, contents)."""
    if len(data) < 2:
        raise CertificateError(f"extension {what}: {len(data)} bytes is too short for a DER value")
    tag, first = data[0], data[1]
    if tag & 0x1F == 0x1F:
        raise CertificateError(f"extension {what}: unexpected multi-byte DER tag")
    offset = 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise CertificateError(f"extension {what}: malformed DER length")
        length = int.from_bytes(data[2 : 2 + count], "big")
        if length < 0x80 or data[2] == 0:
            raise CertificateError(f"extension {what}: non-minimal DER length")
        offset += count
    if len(data) != offset + length:
        raise CertificateError(
            f"extension {what}: DER value declares {length} content bytes, found {len(data) - offset}"
        )
    return tag, data[offset:]


def _der_small_integer(data: bytes, what: str) -> int:
    tag, body = _der_single(data, what)
    if tag != _TAG_INTEGER or not body:
        raise CertificateError(f"extension {what}: expected a DER INTEGER, found tag 0x{tag:02x}")
    if len(body) > 1 and ((body[0] == 0 and body[1] < 0x80) or (body[0] == 0xFF and body[1] >= 0x80)):
        raise CertificateError(f"extension {what}: non-minimal DER INTEGER")
    value = int.from_bytes(body, "big", signed=True)
    if not 0 <= value <= 0xFF:
        raise CertificateError(f"extension {what}: expected a value 0-255, found {value}")
    return value


def _der_string(data: bytes, what: str) -> str:
    tag, body = _der_single(data, what)
    if tag == _TAG_IA5_STRING:
        try:
            return body.decode("ascii")
        except UnicodeDecodeError:
            raise CertificateError(f"extension {what}: IA5String is not ASCII") from None
    if tag == _TAG_UTF8_STRING:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise CertificateError(f"extension {what}: UTF8String is not UTF-8") from None
    raise CertificateError(f"extension {what}: expected an IA5String, found tag 0x{tag:02x}")


def _hwid(data: bytes) -> bytes:
    """The hwID extension: raw 64 (or 8 on Turin) bytes, or the same wrapped in a DER OCTET STRING."""
    if len(data) in HWID_SIZES:
        return data
    tag, body = _der_single(data, "hwID")
    if tag != _TAG_OCTET_STRING or len(body) not in HWID_SIZES:
        raise CertificateError(
            f"extension hwID: expected 64 or 8 raw bytes or an OCTET STRING of them, found {len(data)} bytes"
        )
    return body


# --- VCEK / VLEK extensions ------------------------------------------------------------------------


@dataclass(frozen=True)
class VekInfo:
    """What a VCEK or VLEK certificate says about the chip and TCB it was issued for."""

    kind: VekKind
    product_name: str
    struct_version: int
    bl_spl: int
    tee_spl: int
    snp_spl: int
    ucode_spl: int
    fmc_spl: int | None
    hwid: bytes | None
    csp_id: str | None

    @property
    def product(self) -> Product | None:
        """The product line named by ``product_name`` ("Milan-B0" -> Milan), if recognised."""
        head = self.product_name.split("-", 1)[0].strip().lower()
        return next((product for product in Product if product.value.lower() == head), None)


def _extension_values(cert: x509.Certificate) -> dict[str, bytes]:
    return {
        ext.oid.dotted_string: ext.value.value
        for ext in cert.extensions
        if ext.oid.dotted_string.startswith(_AMD_ARC + ".")
        and isinstance(ext.value, x509.UnrecognizedExtension)
    }


def parse_vek_extensions(cert: x509.Certificate) -> VekInfo:
    """Decode the AMD extensions of a VCEK or VLEK. Raises :class:`CertificateError` when malformed.

    A VCEK carries hwID (the chip id); a VLEK carries cspId instead. SPL values are DER INTEGERs,
    productName an IA5String.
    """
    try:
        values = _extension_values(cert)
    except ValueError as exc:
        raise CertificateError(f"cannot read the certificate extensions ({exc})") from None

    def required(oid: x509.ObjectIdentifier, what: str) -> bytes:
        value = values.get(oid.dotted_string)
        if value is None:
            raise CertificateError(
                f"the VCEK/VLEK has no {what} extension ({oid.dotted_string})",
                hint="is this an AMD VCEK or VLEK certificate?",
            )
        return value

    hwid_raw = values.get(OID_HWID.dotted_string)
    csp_raw = values.get(OID_CSP_ID.dotted_string)
    if (hwid_raw is None) == (csp_raw is None):
        raise CertificateError(
            "a VCEK carries a hwID extension and a VLEK a cspId extension; found "
            + ("both" if hwid_raw is not None else "neither"),
            hint="is this an AMD VCEK or VLEK certificate?",
        )
    fmc_raw = values.get(OID_FMC_SPL.dotted_string)
    return VekInfo(
        kind="vcek" if hwid_raw is not None else "vlek",
        product_name=_der_string(required(OID_PRODUCT_NAME, "productName"), "productName"),
        struct_version=_der_small_integer(required(OID_STRUCT_VERSION, "structVersion"), "structVersion"),
        bl_spl=_der_small_integer(required(OID_BL_SPL, "blSPL"), "blSPL"),
        tee_spl=_der_small_integer(required(OID_TEE_SPL, "teeSPL"), "teeSPL"),
        snp_spl=_der_small_integer(required(OID_SNP_SPL, "snpSPL"), "snpSPL"),
        ucode_spl=_der_small_integer(required(OID_UCODE_SPL, "ucodeSPL"), "ucodeSPL"),
        fmc_spl=None if fmc_raw is None else _der_small_integer(fmc_raw, "fmcSPL"),
        hwid=None if hwid_raw is None else _hwid(hwid_raw),
        csp_id=None if csp_raw is None else _der_string(csp_raw, "cspId"),
    )


# --- chain checks ----------------------------------------------------------------------------------


def _describe(cert: x509.Certificate) -> str:
    return common_name(cert.subject) or cert.subject.rfc4514_string()


def check_validity(cert: x509.Certificate, at: datetime) -> None:
    """Raise :class:`CertificateError` unless ``at`` lies within the certificate's validity."""
    moment = at if at.tzinfo else at.replace(tzinfo=UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= moment <= end:
        raise CertificateError(
            f"certificate {_describe(cert)} is not valid at {moment.isoformat()} "
            f"(valid {start.isoformat()} to {end.isoformat()})",
            hint="check the system clock, or fetch a current certificate",
            code=Code.CERTIFICATE_EXPIRED,
        )


def check_amd_signature(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """``cert`` must be signed by ``issuer`` with RSASSA-PSS / SHA-384 / MGF1-SHA-384 / salt 48."""
    if cert.issuer != issuer.subject:
        raise CertificateError(
            f"certificate {_describe(cert)} names issuer {common_name(cert.issuer)!r}, "
            f"not {_describe(issuer)!r}"
        )
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
        cert.signature_hash_algorithm, hashes.SHA384
    ):
        raise CertificateError(
            f"certificate {_describe(cert)} is not signed with RSASSA-PSS SHA-384 "
            f"(found {cert.signature_algorithm_oid.dotted_string})"
        )
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateError(f"issuer {_describe(issuer)} does not have an RSA key")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, AMD_PSS, hashes.SHA384())
    except InvalidSignature:
        raise CertificateError(
            f"the signature on {_describe(cert)} does not verify with the key of {_describe(issuer)}",
            hint="the certificate was altered or belongs to another chain",
        ) from None


@dataclass(frozen=True)
class ChainResult:
    """A VCEK/VLEK chain that verified: the ARK and ASK/ASVK used, and the pinned product if any."""

    ark: x509.Certificate
    intermediate: x509.Certificate
    ark_sha256: str
    pinned_product: Product | None


def verify_vek_chain(
    vek: x509.Certificate,
    chain: Sequence[x509.Certificate],
    *,
    at: datetime | None = None,
    trusted_arks: Sequence[x509.Certificate] = (),
) -> ChainResult:
    """Verify VEK <- ASK/ASVK <- ARK (self-signed) and that the ARK is a trust anchor.

    The intermediate comes from ``chain``; the ARK from ``chain`` or ``trusted_arks``. The ARK is
    trusted when its SHA-256 is pinned in :data:`AMD_ARK_SHA256` or it is one of ``trusted_arks``.
    Every certificate must be valid at ``at`` (default: now). Raises :class:`CertificateError`.
    """
    moment = at or datetime.now(UTC)
    if not isinstance(vek.public_key(), ec.EllipticCurvePublicKey):
        raise CertificateError(f"the VCEK/VLEK {_describe(vek)} does not have an EC public key")
    intermediates = [c for c in chain if c.subject == vek.issuer and c.subject != c.issuer]
    if not intermediates:
        raise CertificateError(
            f"the chain has no certificate for the VCEK/VLEK issuer {common_name(vek.issuer)!r}",
            hint="supply the ASK/ASVK and ARK (KDS cert_chain, THIM certificateChain)",
            code=Code.CERTIFICATE_CHAIN_INCOMPLETE,
        )
    intermediate = _first_signer(vek, intermediates)
    anchors = {sha256_fingerprint(c) for c in trusted_arks}
    candidates = [c for c in [*chain, *trusted_arks] if c.subject == intermediate.issuer]
    ark = _first_signer(intermediate, candidates, missing_hint="supply the ARK with the chain")
    fingerprint = sha256_fingerprint(ark)
    pinned = product_of_ark(ark)
    if pinned is None and fingerprint not in anchors:
        raise CertificateError(
            f"the root {_describe(ark)} (sha256 {fingerprint}) is not a pinned AMD ARK "
            "and not a trusted anchor",
            hint="the chain does not lead to AMD; pass the ARK as a trusted anchor only if you mean it",
            code=Code.UNTRUSTED_ROOT,
        )
    check_amd_signature(ark, ark)
    for cert in (ark, intermediate, vek):
        check_validity(cert, moment)
    return ChainResult(ark=ark, intermediate=intermediate, ark_sha256=fingerprint, pinned_product=pinned)


def _first_signer(
    cert: x509.Certificate,
    candidates: Sequence[x509.Certificate],
    *,
    missing_hint: str = "supply the ASK/ASVK and ARK",
) -> x509.Certificate:
    """The first candidate whose key verifies ``cert``; the last error if none does."""
    if not candidates:
        raise CertificateError(
            f"no certificate named {common_name(cert.issuer)!r} to verify {_describe(cert)}",
            hint=missing_hint,
            code=Code.CERTIFICATE_CHAIN_INCOMPLETE,
        )
    for candidate in candidates:
        try:
            check_amd_signature(cert, candidate)
            return candidate
        except CertificateError as exc:
            last = exc
    raise last
