"""A local certificate authority for the local-mode HTTPS services (attestation, key vault, identity).

Owns: one root certificate and key persisted in the state directory (``local-ca.pem``, and
``local-ca.key`` with mode 0600), issuing short-lived server certificates for 127.0.0.1 / localhost /
other names (SAN with IP and DNS entries, serverAuth EKU), and the SSL contexts both ends need: a server
context with a freshly issued certificate, and a client context that trusts this CA plus the system roots.

Keys are RSA-2048 (the root too): the local key service signs release JWS with RS256 using an issued
certificate's key, and RSA keeps every verifier in the stack on one code path.

It also holds local mode's "UVM signing" certificate (``uvm-signer.pem`` / ``uvm-signer.key``): a leaf with
the UVM-signing EKU (never serverAuth) that signs the virtual TEE's UVM endorsement, the way Microsoft's
"ContainerPlat" certificate signs ACI's ``reference-info-base64``; the local attestation service trusts
endorsements chained to this CA's root only when signed by such a leaf.

Never a production CA: it exists so ``skr local`` can speak real TLS to real Azure SDK clients on one
machine. Never logs or reprs private keys. Key generation is synchronous; call from async code through
:func:`asyncio.to_thread`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skr.errors import ConfigError
from skr.files import ensure_directory, read_regular_file, write_atomically, write_private_file

log = logging.getLogger(__name__)

CA_CERT_FILE: Final = "local-ca.pem"
CA_KEY_FILE: Final = "local-ca.key"
UVM_SIGNER_CERT_FILE: Final = "uvm-signer.pem"
UVM_SIGNER_KEY_FILE: Final = "uvm-signer.key"
UVM_SIGNER_VALIDITY: Final = dt.timedelta(days=365)
CA_VALIDITY: Final = dt.timedelta(days=3650)
LEAF_VALIDITY: Final = dt.timedelta(days=90)
CLOCK_SKEW: Final = dt.timedelta(minutes=5)
KEY_BITS: Final = 2048
_CA_NAME: Final = "skr local CA"


@dataclass(frozen=True)
class IssuedCert:
    """A server certificate issued by the local CA.

    ``cert_pem``: the leaf certificate followed by the CA certificate (what a TLS server sends).
    ``key_pem``: the leaf's PKCS#8 private key (unencrypted PEM). ``chain``: [leaf, CA].
    """

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    chain: list[x509.Certificate]
    private_key: rsa.RSAPrivateKey = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate."""
        return self.chain[0]


class LocalCA:
    """A persisted local root CA. Create or load it with :meth:`load_or_create`."""

    def __init__(self, directory: Path, certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
        self._directory = directory
        self._certificate = certificate
        self._key = key

    def __repr__(self) -> str:
        return (
            f"LocalCA(subject={self._certificate.subject.rfc4514_string()!r}, dir={str(self._directory)!r})"
        )

    @classmethod
    def load_or_create(cls, state_dir: Path) -> LocalCA:
        """Load the CA from ``state_dir``, or create and persist a new one (directory 0700, key 0600).

        An expired (or nearly expired) CA is replaced. A key file readable by others is tightened to 0600
        with a warning. Files that exist but do not load raise :class:`ConfigError`.
        """
        ensure_directory(state_dir)
        cert_path, key_path = state_dir / CA_CERT_FILE, state_dir / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            ca = cls._load(state_dir, cert_path, key_path)
            if ca._certificate.not_valid_after_utc - dt.timedelta(days=30) > _now():
                return ca
            log.warning("local CA in %s expires soon or has expired; creating a new one", state_dir)
        return cls._create(state_dir, cert_path, key_path)

    @classmethod
    def _load(cls, state_dir: Path, cert_path: Path, key_path: Path) -> LocalCA:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            log.warning("local CA key %s had mode %o; tightening to 600", key_path, mode)
            key_path.chmod(0o600)
        try:
            certificate = x509.load_pem_x509_certificate(read_regular_file(cert_path))
            key = serialization.load_pem_private_key(read_regular_file(key_path), password=None)
        except ValueError as exc:
            raise ConfigError(
                f"the local CA files in {state_dir} do not load ({exc})",
                hint=f"delete {cert_path.name} and {key_path.name} to create a new local CA",
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey) or key.public_key() != certificate.public_key():
            raise ConfigError(
                f"the local CA key in {key_path} does not belong to {cert_path}",
                hint=f"delete {cert_path.name} and {key_path.name} to create a new local CA",
            )
        return cls(state_dir, certificate, key)

    @classmethod
    def _create(cls, state_dir: Path, cert_path: Path, key_path: Path) -> LocalCA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"skr local mode ({os.uname().nodename})"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private_file(key_path, key_pem)
        write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        log.info("created local CA %s in %s", _fingerprint(certificate), state_dir)
        return cls(state_dir, certificate, key)

    @property
    def ca_pem_path(self) -> Path:
        """The CA certificate file: give it to clients (``SKR_CA_BUNDLE``, ``connection_verify``, curl)."""
        return self._directory / CA_CERT_FILE

    @property
    def ca_certificate(self) -> x509.Certificate:
        """The root certificate."""
        return self._certificate

    def issue(self, hosts: Sequence[str]) -> IssuedCert:
        """A server certificate for ``hosts`` (IP addresses become IP SANs, the rest DNS SANs)."""
        if not hosts:
            raise ConfigError("a server certificate needs at least one host name or IP address")
        return self._issue_leaf(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]),
            LEAF_VALIDITY,
            (x509.SubjectAlternativeName([_san(host) for host in hosts]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_key_usage(key_encipherment=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        )

    def uvm_signer(self) -> IssuedCert:
        """The persisted UVM-signing certificate and key (created once; re-issued when it belongs to another
        CA or expires within 30 days). ``chain`` is [signer, CA]: what goes into the endorsement's x5chain.
        """
        cert_path, key_path = self._directory / UVM_SIGNER_CERT_FILE, self._directory / UVM_SIGNER_KEY_FILE
        if cert_path.exists() and key_path.exists():
            loaded = self._load_uvm_signer(cert_path, key_path)
            if loaded is not None:
                return loaded
        from skr.evidence.endorsement import UVM_SIGNING_EKU

        issued = self._issue_leaf(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "skr local UVM signing"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skr local mode (not Microsoft)"),
                ]
            ),
            UVM_SIGNER_VALIDITY,
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_key_usage(), True),
            (x509.ExtendedKeyUsage([UVM_SIGNING_EKU]), False),
        )
        write_private_file(key_path, issued.key_pem)
        write_atomically(cert_path, issued.cert_pem, 0o644)
        log.info("issued the local UVM signing certificate %s", _fingerprint(issued.chain[0]))
        return issued

    def _load_uvm_signer(self, cert_path: Path, key_path: Path) -> IssuedCert | None:
        try:
            leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            leaf.verify_directly_issued_by(self._certificate)
        except (ValueError, TypeError, InvalidSignature):
            return None
        if not isinstance(key, rsa.RSAPrivateKey) or key.public_key() != leaf.public_key():
            return None
        if leaf.not_valid_after_utc - dt.timedelta(days=30) <= _now():
            return None
        return self._issued(leaf, key)

    def _issue_leaf(
        self, subject: x509.Name, validity: dt.timedelta, *extensions: tuple[x509.ExtensionType, bool]
    ) -> IssuedCert:
        """A fresh key and its certificate from this CA: ``extensions`` (value, critical) in order, then
        the subject and authority key identifiers."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + validity, self._certificate.not_valid_after_utc))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        leaf = (
            builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return self._issued(leaf, key)

    def _issued(self, leaf: x509.Certificate, key: rsa.RSAPrivateKey) -> IssuedCert:
        pem = serialization.Encoding.PEM
        return IssuedCert(
            cert_pem=leaf.public_bytes(pem) + self._certificate.public_bytes(pem),
            key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            chain=[leaf, self._certificate],
            private_key=key,
        )

    def server_ssl_context(self, hosts: Sequence[str]) -> ssl.SSLContext:
        """A TLS server context (TLS 1.2+) with a fresh certificate for ``hosts``."""
        return self.tls_context(self.issue(hosts))

    @staticmethod
    def tls_context(issued: IssuedCert) -> ssl.SSLContext:
        """A TLS server context (TLS 1.2+) serving ``issued``."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # ssl only loads certificates from files: use a private temporary directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="skr-tls-") as tmp:
            cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_file.write_bytes(issued.cert_pem)
            write_private_file(key_file, issued.key_pem)
            context.load_cert_chain(cert_file, key_file)
        return context

    def client_ssl_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this CA in addition to the system roots."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.load_verify_locations(
            cadata=self._certificate.public_bytes(serialization.Encoding.PEM).decode()
        )
        return context


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(*, key_encipherment: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    """Digital signature plus, for a TLS leaf, key encipherment; for a CA, certificate and CRL signing."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _fingerprint(certificate: x509.Certificate) -> str:
    return "sha256:" + hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
