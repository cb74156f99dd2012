"""UVM endorsements (ACI's ``reference-info-base64``): the genuine one, and local mode's.

The genuine ACI endorsement (COSE_Sign1, PS384, x5chain to "Microsoft Supply Chain RSA Root CA 2022") is
decoded and its signature checked here twice: by skr.evidence.endorsement, and independently in the test with
cbor2 + cryptography over the RFC 9052 Sig_structure. Local endorsements made by the virtual TEE are
decoded independently the same way, and endorsements built in the test by hand exercise each refusal.
"""

import base64
import contextlib
import hashlib
import json
import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from skr.errors import VerificationError
from skr.evidence.base import report_data_for
from skr.evidence.endorsement import (
    UVM_FEED,
    UVM_SIGNING_EKU,
    did_x509,
    parse_uvm_endorsement,
    verify_uvm_endorsement,
    verify_uvm_endorsement_signature,
)
from skr.evidence.virtual import UVM_ENDORSEMENT_FILE, VirtualTee
from skr.local.ca import LocalCA
from tests.e2e import post, stack_session
from tests.kvstack import SECURITY_POLICY
from tests.test_cli_daemon import SKR, Proc, clean_env, fresh_state, http, run

ACI = "snp/aci-confidential-sidecar"
GENUINE_ISS = "did:x509:0:sha256:I__iuL25oXEVFdTP_aBLx_eT1RPHbCQ_ECBQfYZpt9s::eku:1.3.6.1.4.1.311.76.59.1.2"
GENUINE_SIGNED_AT = datetime(2023, 2, 8, 5, 42, 23, tzinfo=UTC)
PSS_384 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 §4.4, built here with cbor2 directly."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def independent_did(root: x509.Certificate, eku: str = UVM_SIGNING_EKU.dotted_string) -> str:
    digest = hashlib.sha256(der(root)).digest()
    return "did:x509:0:sha256:" + base64.urlsafe_b64encode(digest).decode().rstrip("=") + "::eku:" + eku


def cose_sign1(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    chain: list[x509.Certificate],
    payload: dict[str, Any] | bytes,
    **overrides: Any,
) -> bytes:
    """An endorsement built by hand: PS384 for RSA keys, ES384 (raw r||s) for EC keys."""
    headers: dict[Any, Any] = {
        1: -38 if isinstance(key, rsa.RSAPrivateKey) else -35,
        3: "application/json",
        33: [der(c) for c in chain],
        "iss": independent_did(chain[-1]),
        "feed": UVM_FEED,
    }
    for name, value in overrides.items():
        label = int(name) if name.isdigit() else name  # COSE labels 1, 33, 34 are integers
        if value is None:
            headers.pop(label, None)
        else:
            headers[label] = value
    protected = cbor2.dumps(headers)
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    message = sig_structure(protected, body)
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(message, PSS_384, hashes.SHA384())
    else:
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, body, signature]))


def issue(
    ca: LocalCA, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, ekus: list[x509.ObjectIdentifier]
) -> x509.Certificate:
    """A leaf for ``key`` signed by the local CA's key, built here with cryptography."""
    ca_key = serialization.load_pem_private_key((ca.ca_pem_path.parent / "local-ca.key").read_bytes(), None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test UVM signer")]))
        .issuer_name(ca.ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def payload(measurement: bytes, svn: str = "7") -> dict[str, str]:
    return {"x-ms-sevsnpvm-guestsvn": svn, "x-ms-sevsnpvm-launchmeasurement": measurement.hex()}


@pytest.fixture(scope="module")
def genuine(vectors: Path) -> bytes:
    return (vectors / ACI / "body.uvm_reference_info.bin").read_bytes()


@pytest.fixture
def own_tee(tee: VirtualTee, tmp_path: Path) -> VirtualTee:
    """A private copy of the session's virtual TEE (same keys, no key generation)."""
    shutil.copytree(tee.state_dir, tmp_path / "tee")
    (tmp_path / "tee" / UVM_ENDORSEMENT_FILE).unlink(missing_ok=True)
    return VirtualTee.load_or_create(tmp_path / "tee", security_policy=SECURITY_POLICY)


# --- the genuine ACI endorsement ---------------------------------------------------------------------


def test_genuine_aci_endorsement_decodes_to_its_headers_and_payload(vectors, genuine):
    endorsement = parse_uvm_endorsement(genuine)
    assert genuine[:2] == b"\xd2\x84"  # CBOR tag 18, array of 4
    assert (endorsement.algorithm, endorsement.algorithm_name) == (-38, "PS384")
    assert endorsement.content_type == "application/json"
    assert [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in endorsement.x5chain] == [
        "ContainerPlat",
        "Microsoft SCD Products RSA CA",
        "Microsoft Supply Chain RSA Root CA 2022",
    ]
    assert endorsement.issuer == GENUINE_ISS
    assert endorsement.feed == "ContainerPlat-AMD-UVM"
    assert endorsement.signing_time == GENUINE_SIGNED_AT
    report = (vectors / ACI / "snp_report.bin").read_bytes()
    assert endorsement.launch_measurement == report[0x90:0xC0]  # MEASUREMENT of the genuine ACI report
    assert endorsement.guest_svn == "22"
    assert endorsement.claims() == {
        "x-ms-sevsnpvm-guestsvn": "22",
        "x-ms-sevsnpvm-launchmeasurement": report[0x90:0xC0].hex(),
    }


def test_genuine_aci_endorsement_signature_verifies_with_its_own_leaf(genuine):
    endorsement = parse_uvm_endorsement(genuine)
    verify_uvm_endorsement_signature(endorsement)
    # independently: cbor2 for the structure, cryptography for RSASSA-PSS SHA-384 (salt 48)
    protected, _, body, signature = cbor2.loads(genuine).value
    leaf = x509.load_der_x509_certificate(cbor2.loads(protected)[33][0])
    public_key = leaf.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, sig_structure(protected, body), PSS_384, hashes.SHA384())
    assert endorsement.to_be_signed() == sig_structure(protected, body)


def test_genuine_aci_endorsement_verifies_against_its_root_at_its_signing_time(genuine):
    endorsement = parse_uvm_endorsement(genuine)
    root = endorsement.x5chain[-1]
    assert independent_did(root) == GENUINE_ISS == did_x509(root)
    verify_uvm_endorsement(endorsement, trusted_roots=[root], at=GENUINE_SIGNED_AT)


def test_genuine_endorsement_is_not_trusted_by_a_local_root(genuine, ca):
    endorsement = parse_uvm_endorsement(genuine)
    with pytest.raises(VerificationError, match="not a trusted UVM signing root") as info:
        verify_uvm_endorsement(endorsement, trusted_roots=[ca.ca_certificate], at=GENUINE_SIGNED_AT)
    assert info.value.code == "uvm_endorsement_invalid"


def test_genuine_endorsement_leaf_has_expired_since(genuine):
    endorsement = parse_uvm_endorsement(genuine)
    with pytest.raises(VerificationError, match="not valid at"):
        verify_uvm_endorsement(
            endorsement, trusted_roots=[endorsement.x5chain[-1]], at=datetime(2025, 1, 1, tzinfo=UTC)
        )


def test_one_changed_payload_byte_breaks_the_genuine_signature(genuine):
    protected, unprotected, body, signature = cbor2.loads(genuine).value
    forged = body.replace(b'"22"', b'"99"')
    assert forged != body
    tampered = cbor2.dumps(cbor2.CBORTag(18, [protected, dict(unprotected), forged, signature]))
    endorsement = parse_uvm_endorsement(tampered)
    assert endorsement.guest_svn == "99"
    with pytest.raises(VerificationError, match="COSE signature does not verify"):
        verify_uvm_endorsement(endorsement, trusted_roots=[endorsement.x5chain[-1]], at=GENUINE_SIGNED_AT)


# --- local mode's endorsement ------------------------------------------------------------------------


def test_uvm_signer_is_a_persisted_leaf_with_the_uvm_signing_eku_only(ca):
    signer = ca.uvm_signer()
    leaf, root = signer.chain
    assert root == ca.ca_certificate
    leaf.verify_directly_issued_by(root)
    ekus = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ekus == [x509.ObjectIdentifier("1.3.6.1.4.1.311.76.59.1.2")]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.uvm_signer().chain[0] == leaf  # loaded again, not re-issued
    assert LocalCA.load_or_create(ca.ca_pem_path.parent).uvm_signer().chain[0] == leaf


def test_virtual_tee_endorsement_has_the_genuine_shape(ca, own_tee):
    signer = ca.uvm_signer()
    raw = own_tee.endorse(signer.private_key, signer.chain)
    tagged = cbor2.loads(raw)
    assert tagged.tag == 18
    protected, unprotected, body, signature = tagged.value
    headers = cbor2.loads(protected)
    assert list(headers) == [1, 3, 33, 34, "iss", "feed", "signingtime"]  # the genuine order
    assert headers[1] == -38 and headers[3] == "application/json"
    assert headers[33] == [der(signer.chain[0]), der(ca.ca_certificate)]
    assert headers[34] == [-16, hashlib.sha256(der(signer.chain[0])).digest()]
    assert headers["iss"] == independent_did(ca.ca_certificate)
    assert headers["feed"] == "ContainerPlat-AMD-UVM"
    assert abs(headers["signingtime"] - datetime.now(UTC)) < timedelta(minutes=1)
    assert raw[raw.index(b"signingtime") + 11] == 0xC1  # CBOR tag 1 (epoch), as the genuine one
    assert json.loads(body) == {
        "x-ms-sevsnpvm-guestsvn": "0",
        "x-ms-sevsnpvm-launchmeasurement": own_tee.measurement.hex(),
    }
    public_key = signer.chain[0].public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, sig_structure(protected, body), PSS_384, hashes.SHA384())
    assert dict(unprotected) == {}
    verify_uvm_endorsement(
        parse_uvm_endorsement(raw), trusted_roots=[ca.ca_certificate], at=datetime.now(UTC)
    )


async def test_virtual_tee_sends_its_endorsement_from_the_state_dir(ca, own_tee):
    assert (await own_tee.collect(report_data_for(b"{}"))).uvm_endorsements is None
    signer = ca.uvm_signer()
    raw = own_tee.endorse(signer.private_key, signer.chain)
    assert (await own_tee.collect(report_data_for(b"{}"))).uvm_endorsements == raw
    # another process on the same state directory (skr release --evidence virtual) sends the same one
    again = VirtualTee.load_or_create(own_tee.state_dir, security_policy=SECURITY_POLICY)
    assert again.uvm_endorsement == raw
    assert (await again.collect(report_data_for(b"{}"))).uvm_endorsements == raw
    again.withdraw_uvm_endorsement()
    assert not (own_tee.state_dir / UVM_ENDORSEMENT_FILE).exists()
    assert (
        VirtualTee.load_or_create(own_tee.state_dir, security_policy=SECURITY_POLICY).uvm_endorsement is None
    )


# --- endorsements built by hand ------------------------------------------------------------------------


def test_es384_endorsement_from_a_uvm_signing_leaf_verifies(ca):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = issue(ca, key, [UVM_SIGNING_EKU])
    raw = cose_sign1(key, [leaf, ca.ca_certificate], payload(bytes(range(48))))
    endorsement = parse_uvm_endorsement(raw)
    assert endorsement.algorithm_name == "ES384" and endorsement.guest_svn == "7"
    verify_uvm_endorsement(endorsement, trusted_roots=[ca.ca_certificate], at=datetime.now(UTC))


def test_chain_without_the_root_is_anchored_by_its_issuer(ca):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = issue(ca, key, [UVM_SIGNING_EKU])
    raw = cose_sign1(key, [leaf], payload(bytes(48)), iss=independent_did(ca.ca_certificate))
    verify_uvm_endorsement(
        parse_uvm_endorsement(raw), trusted_roots=[ca.ca_certificate], at=datetime.now(UTC)
    )


def test_a_tls_certificate_of_the_same_ca_cannot_sign_endorsements(ca):
    tls = ca.issue(["127.0.0.1"])
    raw = cose_sign1(tls.private_key, tls.chain, payload(bytes(48)))
    with pytest.raises(VerificationError, match="UVM-signing EKU"):
        verify_uvm_endorsement(
            parse_uvm_endorsement(raw), trusted_roots=[ca.ca_certificate], at=datetime.now(UTC)
        )


def test_a_leaf_with_both_server_auth_and_uvm_signing_is_refused(ca):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = issue(ca, key, [UVM_SIGNING_EKU, ExtendedKeyUsageOID.SERVER_AUTH])
    raw = cose_sign1(key, [leaf, ca.ca_certificate], payload(bytes(48)))
    with pytest.raises(VerificationError, match="UVM-signing EKU"):
        verify_uvm_endorsement(
            parse_uvm_endorsement(raw), trusted_roots=[ca.ca_certificate], at=datetime.now(UTC)
        )


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        ("iss", "did:x509:0:sha256:AAAA::eku:1.3.6.1.4.1.311.76.59.1.2", "iss is"),
        ("feed", "SomeOther-UVM", "feed is"),
    ],
)
def test_wrong_issuer_or_feed_is_refused(ca, header, value, message):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = issue(ca, key, [UVM_SIGNING_EKU])
    raw = cose_sign1(key, [leaf, ca.ca_certificate], payload(bytes(48)), **{header: value})
    with pytest.raises(VerificationError, match=message):
        verify_uvm_endorsement(
            parse_uvm_endorsement(raw), trusted_roots=[ca.ca_certificate], at=datetime.now(UTC)
        )


def test_a_key_that_is_not_the_leafs_does_not_verify(ca):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = issue(ca, ec.generate_private_key(ec.SECP384R1()), [UVM_SIGNING_EKU])
    raw = cose_sign1(key, [leaf, ca.ca_certificate], payload(bytes(48)))
    with pytest.raises(VerificationError, match="COSE signature does not verify"):
        verify_uvm_endorsement(
            parse_uvm_endorsement(raw), trusted_roots=[ca.ca_certificate], at=datetime.now(UTC)
        )


def test_no_trusted_root_means_nothing_verifies(ca):
    signer = ca.uvm_signer()
    raw = cose_sign1(signer.private_key, signer.chain, payload(bytes(48)))
    with pytest.raises(VerificationError, match="no trusted UVM signing root"):
        verify_uvm_endorsement(parse_uvm_endorsement(raw), trusted_roots=[], at=datetime.now(UTC))


def _malformed(ca: LocalCA) -> list[tuple[str, bytes]]:
    signer = ca.uvm_signer()
    good = cose_sign1(signer.private_key, signer.chain, payload(bytes(48)))
    protected, _, body, signature = cbor2.loads(good).value
    return [
        ("empty", b""),
        ("truncated", good[: len(good) // 2]),
        ("not CBOR", b"\xff\xff\xff"),
        ("COSE_Sign (tag 98)", cbor2.dumps(cbor2.CBORTag(98, [protected, {}, body, signature]))),
        ("three elements", cbor2.dumps(cbor2.CBORTag(18, [protected, {}, body]))),
        ("deeply nested", b"\x81" * 64 + b"\x00"),
        ("no x5chain", cose_sign1(signer.private_key, signer.chain, payload(bytes(48)), **{"33": None})),
        ("other alg", cose_sign1(signer.private_key, signer.chain, payload(bytes(48)), **{"1": -257})),
        ("text payload", cose_sign1(signer.private_key, signer.chain, b"not json")),
        ("short measurement", cose_sign1(signer.private_key, signer.chain, payload(bytes(32)))),
        ("svn not decimal", cose_sign1(signer.private_key, signer.chain, payload(bytes(48), svn="x"))),
        (
            "x5t of another certificate",
            cose_sign1(signer.private_key, signer.chain, payload(bytes(48)), **{"34": [-16, bytes(32)]}),
        ),
    ]


def test_malformed_endorsements_are_refused_with_a_stable_code(ca):
    for name, raw in _malformed(ca):
        with pytest.raises(VerificationError) as info:
            parse_uvm_endorsement(raw)
        assert info.value.code == "uvm_endorsement_invalid", name
        assert info.value.message.startswith("UVM endorsement: "), name


# --- local mode end to end: default compliance, --no-uvm-endorsement denial, warnings ---------------------


async def test_stack_without_endorsement_is_denied_and_endorsed_again_on_restart(tmp_path):
    state = tmp_path / "stack"
    async for stack, client in stack_session(state, uvm_endorsement=False):
        assert stack.info["uvm_endorsement"] is False and stack.info["keys"]["granted"] == []
        assert not (state / "tee" / UVM_ENDORSEMENT_FILE).exists()
        status, body = await post(client, "/key/release", {"kid": "demo-oct"})
        assert status == 403 and body["code"] == "release_denied", body
        assert "x-ms-compliance-status" in body["error"]
        async with client.get("/readyz") as resp:
            ready = await resp.json()
        assert resp.status == 200 and ready["ready"] is True  # a warning, not a failure
        assert ready["checks"]["uvm_endorsement"].startswith("warning: ")
        assert len(ready["warnings"]) == 1 and "reference-info-base64" in ready["warnings"][0]
    async for stack, client in stack_session(state):
        assert stack.info["uvm_endorsement"] is True and "demo-oct" in stack.info["keys"]["granted"]
        status, body = await post(client, "/key/release", {"kid": "demo-oct"})
        assert status == 200, body
        async with client.get("/readyz") as resp:
            ready = await resp.json()
        assert ready["checks"]["uvm_endorsement"] == "ok" and "warnings" not in ready


def test_skr_local_no_uvm_endorsement_shows_the_denial_and_doctor_warns(tmp_path_factory):
    state = fresh_state(tmp_path_factory, "no-uvm")
    proc = Proc(
        [*SKR, "local", "--port", "0", "--no-uvm-endorsement", "--state-dir", str(state)], clean_env()
    )
    try:
        proc.wait_for(lambda: "Ctrl-C stops everything" in proc.stdout, "skr local start")
        info = json.loads((state / "local.json").read_text())
        assert "UVM endorsement  NONE (--no-uvm-endorsement)" in proc.stdout
        assert "keys granted     none" in proc.stdout
        assert "See the denial (no UVM endorsement" in proc.stdout
        status, body = http(info["sidecar"] + "/key/release", {"kid": "demo-oct"})
        assert status == 403 and body["code"] == "release_denied"
        doctor = [*SKR, "doctor", "--skip-network", "--evidence", "virtual", "--state-dir", str(state)]
        done = run(doctor, clean_env(info["env"]))
        assert done.returncode == 0, done.stdout + done.stderr  # a warning does not fail the doctor
        warn = [line for line in done.stdout.splitlines() if line.startswith("[warn]")]
        assert (
            len(warn) == 1
            and warn[0].startswith("[warn] UVM endorsement: ")
            and "reference-info-base64" in warn[0]
        )
        assert "fix: " in done.stdout and "--no-uvm-endorsement" in done.stdout
        assert proc.stop(signal.SIGINT) == 0, proc.stderr
    finally:
        proc.kill()


def test_doctor_decodes_the_endorsement_and_compares_its_measurement(vectors, tmp_path_factory):
    # the genuine ACI endorsement given to the virtual TEE: decoded, and it endorses another UVM
    state = fresh_state(tmp_path_factory, "doctor-genuine")
    (state / "tee" / UVM_ENDORSEMENT_FILE).write_bytes(
        (vectors / ACI / "body.uvm_reference_info.bin").read_bytes()
    )
    done = run(
        [*SKR, "doctor", "--skip-network", "--evidence", "virtual", "--state-dir", str(state)], clean_env()
    )
    assert done.returncode == 1, done.stdout
    line = next(line for line in done.stdout.splitlines() if "UVM endorsement:" in line)
    assert line.startswith("[FAIL] UVM endorsement: PS384 by 'CN=ContainerPlat,"), done.stdout
    assert "feed ContainerPlat-AMD-UVM, UVM SVN 22" in line
    assert "endorses launch measurement 51068107cdc7ee3d" in line


def test_doctor_warns_about_a_security_context_policy_without_reference_info(vectors, tmp_path):
    # no TEE here (sevguest has no device): the security context alone shows the missing endorsement
    context = tmp_path / "security-context"
    context.mkdir()
    (context / "security-policy-base64").write_bytes(
        (vectors / ACI / "uvm_security_policy.base64").read_bytes()
    )
    env = clean_env({"UVM_SECURITY_CONTEXT_DIR": str(context)})
    done = run(
        [*SKR, "doctor", "--skip-network", "--evidence", "sevguest", "--state-dir", str(tmp_path)], env
    )
    warn = [line for line in done.stdout.splitlines() if line.startswith("[warn]")]
    assert len(warn) == 1 and "reference-info-base64" in warn[0], done.stdout


# --- hostile bytes -------------------------------------------------------------------------------------


@given(st.binary(max_size=512))
@settings(max_examples=300)
def test_arbitrary_bytes_only_ever_raise_the_documented_error(data):
    with contextlib.suppress(VerificationError):
        parse_uvm_endorsement(data)


_cbor_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.binary(max_size=64), st.text(max_size=32)
)
_cbor_values = st.recursive(
    _cbor_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.integers(-40, 40) | st.text(max_size=8), inner)
    ),
    max_leaves=12,
)


@given(
    headers=st.dictionaries(
        st.sampled_from([1, 3, 33, 34, "iss", "feed", "signingtime"]) | st.integers(-40, 40), _cbor_values
    ),
    body=st.binary(max_size=128) | _cbor_values.map(lambda v: json.dumps(v, default=str).encode()),
    signature=st.binary(max_size=128),
)
@settings(max_examples=300)
def test_cose_shaped_documents_with_hostile_headers_only_raise_the_documented_error(headers, body, signature):
    raw = cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps(headers), {}, body, signature]))
    with contextlib.suppress(VerificationError):
        endorsement = parse_uvm_endorsement(raw)
        verify_uvm_endorsement_signature(endorsement)
