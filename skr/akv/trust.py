"""The trust anchors for release-JWS signer chains, and the chains already validated against them.

Owns: the anchors (the OS trust store, PEM bundles such as ``SKR_CA_BUNDLE``, certificates passed in),
read once and without duplicates; path validation of a TLS-server chain to them (cryptography's WebPKI
verifier: SAN and wildcards, validity, basic constraints); and the cache of chains that validated.

Never fetches anything (no AIA, no CRL, no OCSP) and never trusts a certificate a chain brings by itself.
JWS parsing and the signature are :mod:`skr.akv.jws`.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, Subject

from skr.errors import ConfigError, JwsError
from skr.snp.certs import read_certificates

__all__ = ["TRUST_HINT", "TrustStore"]

TRUST_HINT = (
    "the signer chain must end at a trusted root: the system roots, or a PEM bundle named by "
    "SKR_CA_BUNDLE (e.g. the local CA of `skr local`)"
)
_CHAIN_CACHE_SIZE = 64
_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)

# (subject, x5c DER...) -> validity window of the chain that was built
_ChainKey = tuple[str, tuple[bytes, ...]]


def _pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle that parses; unparsable blocks are skipped."""
    certs = []
    for block in _PEM_RE.findall(data):
        try:
            certs.extend(read_certificates(block, encoding=Encoding.PEM))
        except ValueError:
            continue
    return certs


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@functools.cache
def _system_anchors() -> tuple[x509.Certificate, ...]:
    """The OS trust store: OpenSSL's default CA file and directory, plus what ``ssl`` loaded itself.

    Each distinct PEM block is parsed once: the directory holds every certificate of the CA file again,
    under its own name and under its hash link. ``ssl``'s default context is asked only when OpenSSL has no
    default CA file (where it has one, the context loads exactly that file; building it costs ~30 ms).
    """
    paths = ssl.get_default_verify_paths()
    files = [Path(paths.cafile)] if paths.cafile else []
    if paths.capath and Path(paths.capath).is_dir():
        files.extend(entry for entry in sorted(Path(paths.capath).iterdir()) if entry.is_file())
    blocks: dict[bytes, None] = {}
    for path in files:
        blocks.update(dict.fromkeys(_PEM_RE.findall(_read(path))))
    certs = _pem_certificates(b"\n".join(blocks))
    loaded_by_ssl = [] if paths.cafile else ssl.create_default_context().get_ca_certs(binary_form=True)
    for der in loaded_by_ssl:
        try:
            certs.extend(read_certificates(der, encoding=Encoding.DER))
        except ValueError:
            continue
    return tuple(_unique(certs))


def _unique(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    seen: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        seen.setdefault(cert.public_bytes(Encoding.DER), cert)
    return list(seen.values())


@dataclass(frozen=True)
class _Anchors:
    certificates: tuple[x509.Certificate, ...]
    fingerprints: frozenset[bytes]  # DER
    store: Store | None


class TrustStore:
    """Trust anchors for release-JWS signer chains: system roots and/or extra PEM bundles.

    Extra bundles are read and checked at once. The OS trust store is read on first use (thread-safe): it
    takes tens of milliseconds that the sidecar's start-up need not wait for.
    """

    def __init__(
        self,
        extra_pem_paths: Sequence[str | os.PathLike[str]] = (),
        *,
        include_system: bool = True,
        extra_certificates: Sequence[x509.Certificate] = (),
    ) -> None:
        extra: list[x509.Certificate] = []
        if isinstance(extra_pem_paths, str | os.PathLike):  # one path given bare, not in a list
            extra_pem_paths = [extra_pem_paths]
        for name in extra_pem_paths:
            path = Path(name)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the CA bundle {path}: {exc.strerror or exc}",
                    hint="check SKR_CA_BUNDLE or the path given",
                ) from None
            certs = _pem_certificates(data)
            if not certs:
                raise ConfigError(
                    f"the CA bundle {path} holds no PEM certificate",
                    hint="expected one or more '-----BEGIN CERTIFICATE-----' blocks",
                )
            extra.extend(certs)
        extra.extend(extra_certificates)
        self._include_system = include_system
        self._extra = tuple(extra)
        self._lock = threading.Lock()
        self._loaded: _Anchors | None = None
        self._chain_cache: dict[_ChainKey, tuple[datetime, datetime]] = {}

    def _load(self) -> _Anchors:
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    system = _system_anchors() if self._include_system else ()
                    unique = tuple(_unique([*system, *self._extra]))
                    fingerprints = frozenset(c.public_bytes(Encoding.DER) for c in unique)
                    self._loaded = _Anchors(unique, fingerprints, Store(list(unique)) if unique else None)
        return self._loaded

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrustStore:
        """System roots plus the PEM bundle named by ``SKR_CA_BUNDLE`` (when set)."""
        from skr.upstream import ca_bundle_from_env  # keeps aiohttp out of the import of this module

        bundle = ca_bundle_from_env(env)
        return cls([bundle] if bundle is not None else [])

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        """The trust anchors, without duplicates."""
        return self._load().certificates

    def __contains__(self, cert: object) -> bool:
        return (
            isinstance(cert, x509.Certificate)
            and cert.public_bytes(Encoding.DER) in self._load().fingerprints
        )

    def __len__(self) -> int:
        return len(self._load().certificates)

    def __repr__(self) -> str:
        return f"TrustStore({len(self)} anchors)"

    def store(self) -> Store:
        """The anchors as a cryptography verification store (JwsError when there are none)."""
        store = self._load().store
        if store is None:
            raise JwsError("the trust store for release signatures is empty", hint=TRUST_HINT)
        return store

    def verify_server_chain(self, certs: Sequence[x509.Certificate], subject: Subject, at: datetime) -> None:
        """Path validation of ``certs`` (leaf first) to these anchors, for a TLS server ``subject`` at ``at``.

        Raises cryptography's ``VerificationError`` saying why not (JwsError when the store is empty). A
        success is remembered for the same subject and the same certificate bytes, and reused only while
        ``at`` lies inside the validity window of every certificate of the built chain (the anchor
        included): the answer cannot change inside it, since nothing else the check depends on does.
        """
        key = (repr(subject), tuple(c.public_bytes(Encoding.DER) for c in certs))
        if self._validated(key, at):
            return
        verifier = PolicyBuilder().store(self.store()).time(at).build_server_verifier(subject)
        self._remember(key, verifier.verify(certs[0], list(certs[1:])))

    def _validated(self, key: _ChainKey, at: datetime) -> bool:
        window = self._chain_cache.get(key)
        return window is not None and window[0] <= at <= window[1]

    def _remember(self, key: _ChainKey, built: Sequence[x509.Certificate]) -> None:
        not_before = max(c.not_valid_before_utc for c in built)
        not_after = min(c.not_valid_after_utc for c in built)
        with self._lock:
            if len(self._chain_cache) >= _CHAIN_CACHE_SIZE:
                self._chain_cache.pop(next(iter(self._chain_cache)))
            self._chain_cache[key] = (not_before, not_after)
