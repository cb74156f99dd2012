"""skr.akv.trust: the anchors and the validated-chain cache, used directly with the genuine AKV chain."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import VerificationError

from skr.akv.trust import TrustStore
from skr.errors import JwsError
from skr.snp.certs import read_certificates

pytestmark = pytest.mark.unit

GENUINE_HOST = "skr-kvq6srllol2jntw.vault.azure.net"
GENUINE_TIME = datetime(2022, 12, 24, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def x5c(vectors: Path) -> list[x509.Certificate]:
    """The signer chain of the genuine release JWS (leaf first, DigiCert Global Root G2 last)."""
    compact = json.loads((vectors / "akv/release-response.json").read_text())["value"]
    header_b64 = compact.split(".")[0]
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    return [read_certificates(base64.b64decode(c), encoding=Encoding.DER)[0] for c in header["x5c"]]


def test_the_genuine_chain_validates_for_its_vault_at_its_time(x5c: list[x509.Certificate]) -> None:
    trust = TrustStore(include_system=False, extra_certificates=[x5c[-1]])
    trust.verify_server_chain(x5c, x509.DNSName(GENUINE_HOST), GENUINE_TIME)
    trust.verify_server_chain(x5c, x509.DNSName(GENUINE_HOST), GENUINE_TIME)  # remembered


def test_a_remembered_chain_answers_only_for_its_subject_and_window(x5c: list[x509.Certificate]) -> None:
    trust = TrustStore(include_system=False, extra_certificates=[x5c[-1]])
    trust.verify_server_chain(x5c, x509.DNSName(GENUINE_HOST), GENUINE_TIME)
    with pytest.raises(VerificationError, match="subjectAltName"):
        trust.verify_server_chain(x5c, x509.DNSName("evil.example.com"), GENUINE_TIME)
    with pytest.raises(VerificationError, match="not valid at validation time"):
        trust.verify_server_chain(x5c, x509.DNSName(GENUINE_HOST), datetime(2024, 1, 10, tzinfo=UTC))


def test_a_chain_validated_by_one_store_is_not_trusted_by_another(
    vectors: Path, x5c: list[x509.Certificate]
) -> None:
    TrustStore(include_system=False, extra_certificates=[x5c[-1]]).verify_server_chain(
        x5c, x509.DNSName(GENUINE_HOST), GENUINE_TIME
    )
    amd_only = TrustStore([vectors / "amd-roots/ark_milan.pem"], include_system=False)
    with pytest.raises(VerificationError, match="candidates exhausted"):
        amd_only.verify_server_chain(x5c, x509.DNSName(GENUINE_HOST), GENUINE_TIME)
    with pytest.raises(JwsError, match="trust store for release signatures is empty"):
        TrustStore(include_system=False).verify_server_chain(x5c, x509.DNSName(GENUINE_HOST), GENUINE_TIME)


def test_a_bundle_keeps_its_readable_certificates_and_skips_broken_blocks(
    tmp_path: Path, x5c: list[x509.Certificate]
) -> None:
    broken = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(broken + x5c[-1].public_bytes(Encoding.PEM) + broken)
    trust = TrustStore([bundle], include_system=False)
    assert trust.anchors == (x5c[-1],) and x5c[-1] in trust and x5c[0] not in trust
