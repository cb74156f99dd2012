"""A software SEV-SNP TEE for local mode and tests: its own ARK -> ASK -> VCEK, well-formed reports.

Owns a state directory (mode 0700; every file mode 0600) holding an RSA-4096 ARK (self-signed,
RSASSA-PSS SHA-384), an RSA-4096 ASK signed by it, a P-384 VCEK with the AMD extensions (hwID equal
to its chip id, SPLs equal to the reported TCB), and the random chip seed. Keys are generated once and
reloaded on every later start; only the VCEK is re-issued when the product or reported TCB changes,
just as real hardware gets a new VCEK per TCB. Its reports verify with
:func:`skr.snp.verify.verify_report` when its ARK is passed as a trusted anchor, and never otherwise.

It also carries the virtual UVM's endorsement (``uvm-endorsement.cose`` in the state directory, what
ACI's ``reference-info-base64`` is on real hardware): a COSE_Sign1 over its launch measurement and guest
SVN made by :meth:`VirtualTee.endorse` with local mode's UVM signing key, sent with every report as
``Endorsements.Uvm``. Every process using the same state directory sends the same endorsement;
:meth:`VirtualTee.withdraw_uvm_endorsement` removes it (``skr local --no-uvm-endorsement``).

Must never: be picked without explicit configuration (see ``skr.evidence.create_provider``), claim
to be AMD (its certificates name the organisation "skr virtual TEE"), or put key material in a
message, log or repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Generic, TypeGuard, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from skr.errors import BadRequest, CertificateError, ConfigError
from skr.evidence.base import REPORT_DATA_SIZE, Evidence
from skr.files import O_CLOEXEC, O_NOFOLLOW, ensure_directory, read_regular_file, write_private_file
from skr.snp import certs
from skr.snp.hostdata import host_data_of_policy
from skr.snp.report import AttestationReport, Product, TcbVersion

PROVIDER_NAME = "virtual"
GUEST_SVN = 0  # of every report, and of the UVM endorsement
UVM_ENDORSEMENT_FILE = "uvm-endorsement.cose"
DEFAULT_GUEST_POLICY = 0x30000
DEFAULT_REPORTED_TCB = 0x7308000000000003
MEASUREMENT_SIZE = 48
CHIP_SEED_SIZE = 64

_ORGANISATION = "skr virtual TEE"
_CPUID: dict[Product, tuple[int, int, int]] = {
    Product.MILAN: (0x19, 0x01, 0x01),
    Product.GENOA: (0x19, 0x11, 0x01),
    Product.TURIN: (0x1A, 0x02, 0x01),
}
_PRODUCT_NAME = {Product.MILAN: "Milan-B0", Product.GENOA: "Genoa-B0", Product.TURIN: "Turin-B0"}
_FIRMWARE = (1, 55, 40)  # major, minor, build reported by the virtual firmware
_ROOT_LIFETIME = timedelta(days=25 * 365)
_VCEK_LIFETIME = timedelta(days=7 * 365)
_BACKDATE = timedelta(days=1)


# --- state directory -------------------------------------------------------------------------------


def _read_private(path: Path) -> bytes | None:
    """The file's bytes, or ``None`` when it does not exist."""
    with contextlib.suppress(FileNotFoundError):
        return read_regular_file(path)
    return None


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise creation between processes sharing one state directory."""
    lock = state_dir / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open {lock} ({exc.strerror})", hint="it must be a regular file") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _prepare_dir(state_dir: Path) -> None:
    """Create the directory (0700) and tighten anything in it that others could read to 0600."""
    try:
        ensure_directory(state_dir)  # a link there is refused, so chmod below cannot reach another file
        os.chmod(state_dir, 0o700)
        for entry in state_dir.iterdir():
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ConfigError(
                    f"{entry} is not a regular file: skr does not follow links in its state directory",
                    hint="remove it; the virtual TEE recreates what it needs",
                )
            if stat.S_ISREG(mode) and mode & 0o077:
                os.chmod(entry, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot use {state_dir} as the virtual TEE state directory ({exc.strerror})",
            hint="choose a writable directory (--state-dir / SKR_STATE_DIR)",
        ) from None


# --- certificates ----------------------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANISATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "not AMD; for local use only"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(1, "big") if value < 0x80 else b"\x00" + value.to_bytes(1, "big")
    return bytes([0x02, len(body)]) + body


def _der_ia5(text: str) -> bytes:
    body = text.encode("ascii")
    return bytes([0x16, len(body)]) + body


def _issue(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    *,
    lifetime: timedelta,
    ca: bool,
    extensions: dict[x509.ObjectIdentifier, bytes] | None = None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for oid, value in (extensions or {}).items():
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=certs.AMD_PSS)


def _vcek_extensions(product: Product, tcb: TcbVersion, hwid: bytes) -> dict[x509.ObjectIdentifier, bytes]:
    exts = {
        certs.OID_STRUCT_VERSION: _der_integer(1 if product is Product.TURIN else 0),
        certs.OID_PRODUCT_NAME: _der_ia5(_PRODUCT_NAME[product]),
        certs.OID_BL_SPL: _der_integer(tcb.bl),
        certs.OID_TEE_SPL: _der_integer(tcb.tee),
        certs.OID_SNP_SPL: _der_integer(tcb.snp),
        certs.OID_UCODE_SPL: _der_integer(tcb.ucode),
        certs.OID_HWID: hwid,
    }
    if tcb.fmc is not None:
        exts[certs.OID_FMC_SPL] = _der_integer(tcb.fmc)
    return exts


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


_K = TypeVar("_K", rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)


@dataclasses.dataclass(frozen=True)
class _Pair(Generic[_K]):
    key: _K
    cert: x509.Certificate


class _State:
    """Reads and writes the persisted identity inside a locked state directory.

    Certificates are read eagerly; private keys only when something must be signed with them
    (loading a 4096-bit RSA key includes a slow consistency check).
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def chip_seed(self) -> bytes:
        path = self.dir / "chip_seed.bin"
        seed = _read_private(path)
        if seed is None or len(seed) != CHIP_SEED_SIZE:
            seed = secrets.token_bytes(CHIP_SEED_SIZE)
            write_private_file(path, seed)
        return seed

    def certificate(self, stem: str) -> x509.Certificate | None:
        data = _read_private(self.dir / f"{stem}.pem")
        try:
            return None if data is None else certs.read_certificates(data)[0]
        except ValueError:
            return None

    def key(self, stem: str, cert: x509.Certificate) -> PrivateKeyTypes | None:
        """The private key of ``cert`` if ``stem.key`` holds it."""
        data = _read_private(self.dir / f"{stem}.key")
        if data is None:
            return None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError:
            return None
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        same = key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
        return key if same else None

    def save(self, stem: str, pair: _Pair[_K]) -> _Pair[_K]:
        write_private_file(self.dir / f"{stem}.key", _key_pem(pair.key))
        write_private_file(self.dir / f"{stem}.pem", _pem(pair.cert))
        return pair


def _signed_by(cert: x509.Certificate | None, issuer: x509.Certificate | None) -> TypeGuard[x509.Certificate]:
    """``cert`` is there, signed by ``issuer`` and valid now."""
    if cert is None or issuer is None:
        return False
    try:
        certs.check_amd_signature(cert, issuer)
        certs.check_validity(cert, datetime.now(UTC))
    except CertificateError:
        return False
    return True


def _new_authority(
    state: _State, stem: str, common: str, issuer: _Pair[rsa.RSAPrivateKey] | None
) -> _Pair[rsa.RSAPrivateKey]:
    """A fresh RSA-4096 ARK (self-signed: no ``issuer``) or ASK (signed by ``issuer``), saved as ``stem``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    name = _name(common)
    issuer_name, signer = (issuer.cert.subject, issuer.key) if issuer is not None else (name, key)
    cert = _issue(name, issuer_name, key.public_key(), signer, lifetime=_ROOT_LIFETIME, ca=True)
    return state.save(stem, _Pair(key, cert))


def _new_vcek(
    state: _State, ask: _Pair[rsa.RSAPrivateKey], product: Product, tcb: TcbVersion, hwid: bytes
) -> _Pair[ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _issue(
        _name("SEV-VCEK"),
        ask.cert.subject,
        key.public_key(),
        ask.key,
        lifetime=_VCEK_LIFETIME,
        ca=False,
        extensions=_vcek_extensions(product, tcb, hwid),
    )
    return state.save("vcek", _Pair(key, cert))


def _vcek_matches(vcek: x509.Certificate, product: Product, tcb: TcbVersion, hwid: bytes) -> bool:
    try:
        info = certs.parse_vek_extensions(vcek)
    except CertificateError:
        return False
    certified = (info.bl_spl, info.tee_spl, info.snp_spl, info.ucode_spl, info.fmc_spl)
    return (
        info.product == product
        and info.hwid == hwid
        and certified == (tcb.bl, tcb.tee, tcb.snp, tcb.ucode, tcb.fmc)
    )


def _ask_signer(state: _State, product: Product) -> tuple[x509.Certificate, _Pair[rsa.RSAPrivateKey]]:
    """The ARK certificate and the ASK with its key, re-creating whatever is missing or broken."""
    ark_cert, ask_cert = state.certificate("ark"), state.certificate("ask")
    ark_key = None
    if _signed_by(ark_cert, ark_cert):
        if _signed_by(ask_cert, ark_cert) and isinstance(
            ask_key := state.key("ask", ask_cert), rsa.RSAPrivateKey
        ):
            return ark_cert, _Pair(ask_key, ask_cert)
        ark_key = state.key("ark", ark_cert)
    if isinstance(ark_key, rsa.RSAPrivateKey) and ark_cert is not None:
        ark = _Pair(ark_key, ark_cert)
    else:
        ark = _new_authority(state, "ark", f"ARK-{product}", None)
    return ark.cert, _new_authority(state, "ask", f"SEV-{product}", ark)


def _ensure_chain(
    state: _State, product: Product, tcb: TcbVersion, hwid: bytes
) -> tuple[x509.Certificate, x509.Certificate, _Pair[ec.EllipticCurvePrivateKey]]:
    """ARK, ASK and the VCEK (with its key) for ``product``/``tcb``/``hwid``; only what is stale is redone."""
    ark, ask, vcek = state.certificate("ark"), state.certificate("ask"), state.certificate("vcek")
    if (
        _signed_by(ark, ark)
        and _signed_by(ask, ark)
        and _signed_by(vcek, ask)
        and _vcek_matches(vcek, product, tcb, hwid)
        and isinstance(key := state.key("vcek", vcek), ec.EllipticCurvePrivateKey)
    ):
        return ark, ask, _Pair(key, vcek)
    ark, signer = _ask_signer(state, product)
    return ark, signer.cert, _new_vcek(state, signer, product, tcb, hwid)


# --- the provider ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What the virtual guest was "launched" with: fixed for the life of the provider."""

    product: Product
    measurement: bytes
    host_data: bytes
    chip_id: bytes
    vmpl: int
    guest_policy: int
    reported_tcb: int
    report_version: int


class VirtualTee:
    """A software SEV-SNP TEE (an :class:`skr.evidence.base.EvidenceProvider` named ``virtual``).

    Create it with :meth:`load_or_create`; it is not a substitute for hardware evidence and is
    refused by any verifier that does not explicitly trust its ARK.
    """

    def __init__(
        self,
        state_dir: Path,
        launch: _Launch,
        ark: x509.Certificate,
        ask: x509.Certificate,
        vcek: _Pair[ec.EllipticCurvePrivateKey],
        *,
        uvm_endorsement: bytes | None = None,
    ) -> None:
        self._state_dir = state_dir
        self._launch = launch
        self._ark = ark
        self._vcek = vcek
        self._chain_pem = _pem(vcek.cert) + _pem(ask) + _pem(ark)
        self._uvm_endorsement = uvm_endorsement

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        *,
        security_policy: bytes,
        measurement: bytes | None = None,
        product: Product = Product.MILAN,
        vmpl: int = 0,
        guest_policy: int = DEFAULT_GUEST_POLICY,
        reported_tcb: int = DEFAULT_REPORTED_TCB,
        report_version: int = 3,
    ) -> VirtualTee:
        """Load the identity persisted in ``state_dir`` or create it (RSA-4096 keygen: about a second).

        ``security_policy`` (raw Rego or its base64 form) fixes HOST_DATA = SHA-256(raw policy).
        ``measurement`` defaults to 48 bytes derived from the persisted chip seed. ``report_version``
        is 2, 3 or 5 (v3 and later carry CPUID). Raises :class:`ConfigError` for unusable settings.
        """
        product = Product(product)
        if measurement is not None and len(measurement) != MEASUREMENT_SIZE:
            raise ConfigError(
                f"the virtual TEE measurement must be {MEASUREMENT_SIZE} bytes, found {len(measurement)}"
            )
        if not 0 <= vmpl <= 3:
            raise ConfigError(f"VMPL must be 0-3, found {vmpl}")
        if not 0 <= guest_policy < 1 << 64:
            raise ConfigError(f"the guest policy is a 64-bit value, found {guest_policy:#x}")
        if report_version not in (2, 3, 5):
            raise ConfigError(f"the virtual TEE writes report versions 2, 3 or 5, not {report_version}")
        if not 0 <= reported_tcb < 1 << 64:
            raise ConfigError(f"the reported TCB is a 64-bit value, found {reported_tcb:#x}")
        tcb = TcbVersion.from_raw(reported_tcb, product)
        recomposed = TcbVersion.from_parts(
            product, bl=tcb.bl, tee=tcb.tee, snp=tcb.snp, ucode=tcb.ucode, fmc=tcb.fmc
        )
        if recomposed.raw != reported_tcb:
            raise ConfigError(
                f"reported TCB 0x{reported_tcb:016x} sets reserved bytes of the {product} TCB layout",
                hint="Turin TCBs are [fmc, bl, tee, snp, 0, 0, 0, ucode]; "
                "Milan/Genoa [bl, tee, 0, 0, 0, 0, snp, ucode]",
            )
        host_data = host_data_of_policy(security_policy)
        state_dir = Path(state_dir)
        _prepare_dir(state_dir)
        with _locked(state_dir):
            state = _State(state_dir)
            seed = state.chip_seed()
            chip_id = seed[:8] + bytes(56) if product is Product.TURIN else seed
            hwid = chip_id[:8] if product is Product.TURIN else chip_id
            ark, ask, vcek = _ensure_chain(state, product, tcb, hwid)
            endorsement = _read_private(state_dir / UVM_ENDORSEMENT_FILE) or None
        derived = hashlib.sha384(b"skr virtual TEE launch measurement\x00" + seed).digest()
        launch = _Launch(
            product=product,
            measurement=measurement if measurement is not None else derived,
            host_data=host_data,
            chip_id=chip_id,
            vmpl=vmpl,
            guest_policy=guest_policy,
            reported_tcb=reported_tcb,
            report_version=report_version,
        )
        return cls(state_dir, launch, ark, ask, vcek, uvm_endorsement=endorsement)

    # -- identity --

    @property
    def name(self) -> str:
        """``virtual``."""
        return PROVIDER_NAME

    @property
    def ark_certificate(self) -> x509.Certificate:
        """The self-signed root to pass as ``trusted_arks`` when verifying this TEE's reports."""
        return self._ark

    @property
    def vcek_certificate(self) -> x509.Certificate:
        """The VCEK that signs the reports."""
        return self._vcek.cert

    @property
    def vcek_chain_pem(self) -> bytes:
        """VCEK, ASK, ARK as PEM (the order :class:`Evidence` uses)."""
        return self._chain_pem

    @property
    def host_data(self) -> bytes:
        """HOST_DATA of every report: SHA-256 of the raw security policy."""
        return self._launch.host_data

    @property
    def measurement(self) -> bytes:
        """MEASUREMENT of every report (48 bytes)."""
        return self._launch.measurement

    @property
    def chip_id(self) -> bytes:
        """CHIP_ID of every report (64 bytes; on Turin only the first 8 are non-zero)."""
        return self._launch.chip_id

    @property
    def state_dir(self) -> Path:
        """Where the keys live."""
        return self._state_dir

    @property
    def uvm_endorsement(self) -> bytes | None:
        """The UVM endorsement (COSE_Sign1) sent with every report, or ``None``."""
        return self._uvm_endorsement

    def __repr__(self) -> str:
        return f"VirtualTee(product={self._launch.product!s}, state_dir={str(self._state_dir)!r})"

    # -- the UVM endorsement --

    def endorse(
        self,
        signing_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        chain: Sequence[x509.Certificate],
        *,
        at: datetime | None = None,
    ) -> bytes:
        """Sign this TEE's launch measurement and guest SVN as a UVM endorsement and keep it (state dir too).

        ``chain``: the UVM signing certificate first, then its issuers (the local CA's
        :meth:`skr.local.ca.LocalCA.uvm_signer`). Blocking (file I/O, a signature): use a thread.
        """
        from skr.evidence.endorsement import sign_uvm_endorsement  # lazy: CBOR is needed in local mode only

        endorsement = sign_uvm_endorsement(
            signing_key,
            chain,
            launch_measurement=self._launch.measurement,
            guest_svn=GUEST_SVN,
            signing_time=at or datetime.now(UTC),
        )
        with _locked(self._state_dir):
            write_private_file(self._state_dir / UVM_ENDORSEMENT_FILE, endorsement)
        self._uvm_endorsement = endorsement
        return endorsement

    def withdraw_uvm_endorsement(self) -> None:
        """Send no UVM endorsement from now on (and remove it from the state directory)."""
        with _locked(self._state_dir), contextlib.suppress(FileNotFoundError):
            (self._state_dir / UVM_ENDORSEMENT_FILE).unlink()
        self._uvm_endorsement = None

    # -- reports --

    def sign_report(self, report_data: bytes) -> bytes:
        """A fresh signed 1184-byte report binding ``report_data`` (exactly 64 bytes)."""
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
            size = len(report_data) if isinstance(report_data, bytes) else type(report_data).__name__
            raise BadRequest(f"REPORT_DATA must be {REPORT_DATA_SIZE} bytes, found {size}")
        launch = self._launch
        cpuid = _CPUID[launch.product] if launch.report_version >= 3 else (0, 0, 0)
        major, minor, build = _FIRMWARE
        unsigned = AttestationReport(
            version=launch.report_version,
            guest_svn=GUEST_SVN,
            policy=launch.guest_policy,
            family_id=bytes(16),
            image_id=bytes(16),
            vmpl=launch.vmpl,
            signature_algo=1,
            current_tcb=launch.reported_tcb,
            platform_info=0x1,
            key_info=0,  # AUTHOR_KEY_EN 0, MASK_CHIP_KEY 0, SIGNING_KEY VCEK
            report_data=report_data,
            measurement=launch.measurement,
            host_data=launch.host_data,
            id_key_digest=bytes(48),
            author_key_digest=bytes(48),
            report_id=secrets.token_bytes(32),
            report_id_ma=b"\xff" * 32,
            reported_tcb=launch.reported_tcb,
            cpuid_fam_id=cpuid[0],
            cpuid_mod_id=cpuid[1],
            cpuid_step=cpuid[2],
            chip_id=launch.chip_id,
            committed_tcb=launch.reported_tcb,
            current_build=build,
            current_minor=minor,
            current_major=major,
            committed_build=build,
            committed_minor=minor,
            committed_major=major,
            launch_tcb=launch.reported_tcb,
            launch_mit_vector=0,
            current_mit_vector=0,
            signature_r=0,
            signature_s=0,
        )
        r, s = decode_dss_signature(self._vcek.key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA384())))
        return dataclasses.replace(unsigned, signature_r=r, signature_s=s).serialize()

    async def collect(self, report_data: bytes) -> Evidence:
        """Sign a report off the event loop and return it with the VCEK chain."""
        report = await asyncio.to_thread(self.sign_report, report_data)
        return Evidence(
            report=report,
            vcek_chain_pem=self._chain_pem,
            provider=PROVIDER_NAME,
            uvm_endorsements=self._uvm_endorsement,
            endorsed_tcb=f"{self._launch.reported_tcb:016x}",
        )

    async def aclose(self) -> None:
        """Nothing to release."""
