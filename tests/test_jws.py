"""Release JWS: the genuine Key Vault release, and JWS built here with an independent CA.

JWS, certificates and key_hsm values for the positive cases are assembled in this file directly from
cryptography primitives (JSON → base64url → RSA signature), not through skr's signer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skr.akv.jws import ReleasedKey, TrustStore, open_release, sign_release_jws, verify_release_jws
from skr.akv.keywrap import Enc
from skr.endpoints import parse_endpoint
from skr.errors import ConfigError, JwsError, KeyWrapError

GENUINE_HOST = "skr-kvq6srllol2jntw.vault.azure.net"
GENUINE_TIME = datetime(2022, 12, 24, 12, 0, tzinfo=UTC)
HOST = "hsm1.managedhsm.example"
NOW = datetime.now(UTC)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64u_json(value: object) -> str:
    return b64u(json.dumps(value, separators=(",", ":")).encode())


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem_file(tmp_path, name: str, *certs: x509.Certificate):
    path = tmp_path / name
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


# --- an independent PKI ---------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "Test Root CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=30))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_leaf(ca_key, ca_cert, sans, *, key=None, not_after=None):
    key = key or rsa.generate_private_key(65537, 2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after or NOW + timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def pki():
    ca_key, ca_cert = make_ca()
    leaf_key, leaf_cert = issue_leaf(ca_key, ca_cert, ["*.managedhsm.example"])
    return {"ca_key": ca_key, "ca": ca_cert, "key": leaf_key, "leaf": leaf_cert}


@pytest.fixture(scope="module")
def trust(pki):
    return TrustStore(include_system=False, extra_certificates=[pki["ca"]])


_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def sign_compact(
    header: dict[str, Any], payload: object, key: rsa.RSAPrivateKey, *, payload_b64: str | None = None
) -> str:
    """A compact JWS made by hand: RFC 7515 signing input, PKCS#1 v1.5 or PSS (salt = hash length)."""
    signing_input = f"{b64u_json(header)}.{payload_b64 or b64u_json(payload)}"
    alg = header["alg"]
    algorithm = _HASH[alg[2:]]()
    pad: padding.AsymmetricPadding
    if alg.startswith("PS"):
        pad = padding.PSS(mgf=padding.MGF1(_HASH[alg[2:]]()), salt_length=algorithm.digest_size)
    else:
        pad = padding.PKCS1v15()
    return f"{signing_input}.{b64u(key.sign(signing_input.encode(), pad, algorithm))}"


def header_for(pki, alg: str = "RS256", **extra) -> dict[str, Any]:
    return {"alg": alg, "x5c": [base64.b64encode(der(pki["leaf"])).decode()], **extra}


PAYLOAD = {"request": {"enc": "CKM_RSA_AES_KEY_WRAP"}, "response": {"key": {"key": {"kid": "x"}}}}


# --- the genuine release --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def genuine(vectors):
    return json.loads((vectors / "akv/release-response.json").read_text())["value"]


@pytest.fixture(scope="module")
def genuine_root(genuine) -> x509.Certificate:
    header = json.loads(unb64u(genuine.split(".")[0]))
    return x509.load_der_x509_certificate(base64.b64decode(header["x5c"][-1]))


@pytest.fixture
def digicert_trust(tmp_path, genuine_root) -> TrustStore:
    assert "CN=DigiCert Global Root G2" in genuine_root.subject.rfc4514_string()
    assert genuine_root.issuer == genuine_root.subject, "the chain's last x5c entry is self-signed"
    return TrustStore([pem_file(tmp_path, "digicert.pem", genuine_root)], include_system=False)


def test_genuine_release_verifies_at_its_time(genuine, digicert_trust, vectors):
    payload = verify_release_jws(
        genuine, host=parse_endpoint(GENUINE_HOST), trust=digicert_trust, at=GENUINE_TIME
    )
    decoded = json.loads((vectors / "akv/release-response.decoded-body.json").read_text())
    assert payload == decoded
    assert payload["request"]["enc"] == "CKM_RSA_AES_KEY_WRAP"
    assert payload["response"]["key"]["key"]["kty"] == "RSA-HSM"


def test_genuine_release_is_expired_in_2024(genuine, digicert_trust):
    with pytest.raises(JwsError, match="not valid at validation time"):
        verify_release_jws(
            genuine,
            host=parse_endpoint(GENUINE_HOST),
            trust=digicert_trust,
            at=datetime(2024, 1, 10, tzinfo=UTC),
        )


def test_a_remembered_chain_never_widens_what_is_accepted(genuine, digicert_trust, trust):
    """The chain-validation cache answers only for the same host, inside the chain's validity window,
    and only for the trust store that validated it; the signature is checked every time."""
    verify_release_jws(genuine, host=parse_endpoint(GENUINE_HOST), trust=digicert_trust, at=GENUINE_TIME)
    verify_release_jws(
        genuine, host=parse_endpoint(GENUINE_HOST), trust=digicert_trust, at=GENUINE_TIME
    )  # from the cache
    with pytest.raises(JwsError, match="not valid at validation time"):
        verify_release_jws(
            genuine,
            host=parse_endpoint(GENUINE_HOST),
            trust=digicert_trust,
            at=datetime(2024, 1, 10, tzinfo=UTC),
        )
    with pytest.raises(JwsError, match="subjectAltName"):
        verify_release_jws(
            genuine, host=parse_endpoint("evil.example.com"), trust=digicert_trust, at=GENUINE_TIME
        )
    with pytest.raises(JwsError, match="not trusted"):
        verify_release_jws(genuine, host=parse_endpoint(GENUINE_HOST), trust=trust, at=GENUINE_TIME)
    header, payload, signature = genuine.split(".")
    forged = ".".join((header, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")))
    with pytest.raises(JwsError):
        verify_release_jws(forged, host=parse_endpoint(GENUINE_HOST), trust=digicert_trust, at=GENUINE_TIME)


@pytest.mark.parametrize("host", ["evil.example.com", "vault.azure.net.evil.com", "a.b.vault.azure.net"])
def test_genuine_release_is_not_valid_for_another_host(genuine, digicert_trust, host):
    with pytest.raises(JwsError, match="subjectAltName"):
        verify_release_jws(genuine, host=parse_endpoint(host), trust=digicert_trust, at=GENUINE_TIME)


def test_genuine_release_with_an_untrusted_root_is_refused(genuine, trust):
    """The chain ends at DigiCert Global Root G2, carried in x5c itself; that alone is not trust."""
    with pytest.raises(JwsError, match="not trusted"):
        verify_release_jws(genuine, host=parse_endpoint(GENUINE_HOST), trust=trust, at=GENUINE_TIME)


def test_genuine_release_with_no_anchor_at_all_is_refused(genuine):
    with pytest.raises(JwsError, match="empty"):
        verify_release_jws(
            genuine,
            host=parse_endpoint(GENUINE_HOST),
            trust=TrustStore(include_system=False),
            at=GENUINE_TIME,
        )


def test_genuine_release_with_tampered_payload_is_refused(genuine, digicert_trust):
    header, payload, signature = genuine.split(".")
    document = json.loads(unb64u(payload))
    document["request"]["enc"] = "RSA_AES_KEY_WRAP_256"
    forged = f"{header}.{b64u_json(document)}.{signature}"
    with pytest.raises(JwsError, match="signature does not verify"):
        verify_release_jws(forged, host=parse_endpoint(GENUINE_HOST), trust=digicert_trust, at=GENUINE_TIME)


@pytest.mark.parametrize("alg", ["none", "HS256", "ES256", "RS1", None])
def test_genuine_release_with_another_alg_is_refused(genuine, digicert_trust, alg):
    header_b64, payload, signature = genuine.split(".")
    header = json.loads(unb64u(header_b64))
    header["alg"] = alg
    for forged in (f"{b64u_json(header)}.{payload}.{signature}", f"{b64u_json(header)}.{payload}."):
        with pytest.raises(JwsError, match="alg"):
            verify_release_jws(
                forged, host=parse_endpoint(GENUINE_HOST), trust=digicert_trust, at=GENUINE_TIME
            )


@pytest.mark.parametrize("member", ["x5t", "x5t#S256"])
def test_genuine_release_with_a_wrong_thumbprint_is_refused(genuine, digicert_trust, member):
    header_b64, payload, signature = genuine.split(".")
    header = json.loads(unb64u(header_b64))
    header[member] = b64u(hashlib.sha256(b"another certificate").digest())
    with pytest.raises(JwsError, match=member):
        verify_release_jws(
            f"{b64u_json(header)}.{payload}.{signature}",
            host=parse_endpoint(GENUINE_HOST),
            trust=digicert_trust,
            at=GENUINE_TIME,
        )


def test_genuine_release_header_thumbprints_match_its_leaf(genuine, genuine_root):
    header = json.loads(unb64u(genuine.split(".")[0]))
    leaf = base64.b64decode(header["x5c"][0])
    assert header["x5t"] == b64u(hashlib.sha1(leaf).digest())
    assert header["x5t#S256"] == b64u(hashlib.sha256(leaf).digest())


def test_padded_or_non_base64url_parts_are_refused(genuine, digicert_trust):
    header, payload, signature = genuine.split(".")
    for forged in (
        f"{header}==.{payload}.{signature}",
        f"{header}.{payload}.{signature}=",
        genuine.replace("-", "+", 1),
    ):
        with pytest.raises(JwsError, match="base64url"):
            verify_release_jws(
                forged, host=parse_endpoint(GENUINE_HOST), trust=digicert_trust, at=GENUINE_TIME
            )


def test_empty_signature_is_refused_even_with_an_allowed_alg(genuine, digicert_trust):
    header, payload, _ = genuine.split(".")
    with pytest.raises(JwsError, match="empty signature"):
        verify_release_jws(
            f"{header}.{payload}.", host=parse_endpoint(GENUINE_HOST), trust=digicert_trust, at=GENUINE_TIME
        )


@pytest.mark.parametrize("value", ["", "a.b", "a.b.c.d", "x" * 10])
def test_not_a_compact_jws_is_refused(value, trust):
    with pytest.raises(JwsError):
        verify_release_jws(value, host=parse_endpoint(HOST), trust=trust)


# --- JWS built here with an independent CA ----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_independently_signed_jws_verifies_with_every_allowed_alg(pki, trust, alg):
    compact = sign_compact(header_for(pki, alg), PAYLOAD, pki["key"])
    assert verify_release_jws(compact, host=parse_endpoint(HOST), trust=trust) == PAYLOAD


def test_thumbprints_are_checked_when_present(pki, trust):
    leaf = der(pki["leaf"])
    good = header_for(
        pki, x5t=b64u(hashlib.sha1(leaf).digest()), **{"x5t#S256": b64u(hashlib.sha256(leaf).digest())}
    )
    assert (
        verify_release_jws(sign_compact(good, PAYLOAD, pki["key"]), host=parse_endpoint(HOST), trust=trust)
        == PAYLOAD
    )
    bad = dict(good, x5t=b64u(hashlib.sha1(b"other").digest()))
    with pytest.raises(JwsError, match="x5t"):
        verify_release_jws(sign_compact(bad, PAYLOAD, pki["key"]), host=parse_endpoint(HOST), trust=trust)


def test_signature_by_another_key_is_refused(pki, trust):
    compact = sign_compact(header_for(pki), PAYLOAD, rsa.generate_private_key(65537, 2048))
    with pytest.raises(JwsError, match="signature does not verify"):
        verify_release_jws(compact, host=parse_endpoint(HOST), trust=trust)


def test_expired_leaf_is_refused(pki, trust):
    key, leaf = issue_leaf(
        pki["ca_key"], pki["ca"], [HOST], key=pki["key"], not_after=NOW - timedelta(hours=1)
    )
    header = {"alg": "RS256", "x5c": [base64.b64encode(der(leaf)).decode()]}
    with pytest.raises(JwsError, match="not valid at validation time"):
        verify_release_jws(sign_compact(header, PAYLOAD, key), host=parse_endpoint(HOST), trust=trust)


def test_wildcard_does_not_cover_the_bare_domain_or_deeper_names(pki, trust):
    compact = sign_compact(header_for(pki), PAYLOAD, pki["key"])
    for host in ("managedhsm.example", "a.hsm1.managedhsm.example"):
        with pytest.raises(JwsError, match="subjectAltName"):
            verify_release_jws(compact, host=parse_endpoint(host), trust=trust)


def test_host_given_as_url_or_with_port_is_checked_by_name(pki, trust):
    compact = sign_compact(header_for(pki), PAYLOAD, pki["key"])
    for host in (f"https://{HOST}", f"{HOST}:8443", HOST.upper()):
        assert verify_release_jws(compact, host=parse_endpoint(host), trust=trust) == PAYLOAD


def test_chain_to_an_anchor_only_in_x5c_is_refused(pki, trust):
    other_key, other_ca = make_ca("Attacker Root")
    key, leaf = issue_leaf(other_key, other_ca, [HOST])
    header = {"alg": "RS256", "x5c": [base64.b64encode(der(c)).decode() for c in (leaf, other_ca)]}
    with pytest.raises(JwsError, match="not trusted"):
        verify_release_jws(sign_compact(header, PAYLOAD, key), host=parse_endpoint(HOST), trust=trust)


def test_chain_through_an_intermediate_verifies(pki, trust):
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = (
        x509.CertificateBuilder()
        .subject_name(_name("Test Issuing CA"))
        .issuer_name(pki["ca"].subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki["ca_key"].public_key()), critical=False
        )
        .sign(pki["ca_key"], hashes.SHA256())
    )
    key, leaf = issue_leaf(inter_key, inter, [HOST])
    chain = [leaf, inter, pki["ca"]]
    header = {"alg": "RS256", "x5c": [base64.b64encode(der(c)).decode() for c in chain]}
    assert (
        verify_release_jws(sign_compact(header, PAYLOAD, key), host=parse_endpoint(HOST), trust=trust)
        == PAYLOAD
    )
    header["x5c"] = header["x5c"][:1]
    with pytest.raises(JwsError, match="not trusted"):
        verify_release_jws(sign_compact(header, PAYLOAD, key), host=parse_endpoint(HOST), trust=trust)


def test_ec_signer_is_refused_even_with_a_valid_chain(pki, trust):
    key, leaf = issue_leaf(pki["ca_key"], pki["ca"], [HOST], key=ec.generate_private_key(ec.SECP256R1()))
    header = {"alg": "RS256", "x5c": [base64.b64encode(der(leaf)).decode()]}
    signing_input = f"{b64u_json(header)}.{b64u_json(PAYLOAD)}"
    compact = f"{signing_input}.{b64u(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))}"
    with pytest.raises(JwsError, match="expected RSA"):
        verify_release_jws(compact, host=parse_endpoint(HOST), trust=trust)


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda h: h.pop("x5c"), "no x5c"),
        (lambda h: h.update(x5c=[]), "no x5c"),
        (lambda h: h.update(x5c=["not base64!"]), r"x5c\[0\]"),
        (lambda h: h.update(x5c=[base64.b64encode(b"not a certificate").decode()]), r"x5c\[0\]"),
        (lambda h: h.update(crit=["exp"]), "crit"),
    ],
)
def test_bad_header_members_are_refused(pki, trust, mutate, complaint):
    header = header_for(pki)
    mutate(header)
    with pytest.raises(JwsError, match=complaint):
        verify_release_jws(sign_compact(header, PAYLOAD, pki["key"]), host=parse_endpoint(HOST), trust=trust)


def test_payload_that_is_not_an_object_is_refused(pki, trust):
    with pytest.raises(JwsError, match="payload"):
        verify_release_jws(
            sign_compact(header_for(pki), [1, 2], pki["key"]), host=parse_endpoint(HOST), trust=trust
        )


# --- signing (the local key service) ----------------------------------------------------------------------


def test_sign_release_jws_is_managed_hsm_style_and_verifies_independently(pki, trust):
    compact = sign_release_jws(PAYLOAD, pki["key"], [pki["leaf"], pki["ca"]])
    header_b64, payload_b64, signature_b64 = compact.split(".")
    assert "=" not in compact
    header = json.loads(unb64u(header_b64))
    thumbprint = b64u(hashlib.sha256(der(pki["leaf"])).digest())
    assert header == {
        "alg": "RS256",
        "kid": thumbprint,
        "x5c": [base64.b64encode(der(c)).decode() for c in (pki["leaf"], pki["ca"])],
        "x5t#S256": thumbprint,
    }
    pki["leaf"].public_key().verify(
        unb64u(signature_b64), f"{header_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    assert json.loads(unb64u(payload_b64)) == PAYLOAD
    assert verify_release_jws(compact, host=parse_endpoint(HOST), trust=trust) == PAYLOAD


def test_sign_release_jws_refuses_a_key_that_is_not_the_leafs(pki):
    with pytest.raises(ConfigError):
        sign_release_jws(PAYLOAD, rsa.generate_private_key(65537, 2048), [pki["leaf"]])


# --- trust store --------------------------------------------------------------------------------------------


def test_trust_store_from_env_adds_the_bundle_to_the_system_roots(tmp_path, pki):
    bundle = pem_file(tmp_path, "ca.pem", pki["ca"])
    store = TrustStore.from_env({"SKR_CA_BUNDLE": str(bundle)})
    assert pki["ca"] in store
    assert set(TrustStore().anchors) <= set(store.anchors), "the system roots stay trusted"
    assert pki["ca"] not in TrustStore.from_env({})


def test_trust_store_with_a_missing_or_empty_bundle_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        TrustStore([tmp_path / "missing.pem"])
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    with pytest.raises(ConfigError, match="no PEM certificate"):
        TrustStore([empty])


def test_trust_store_repr_is_short():
    assert repr(TrustStore(include_system=False)) == "TrustStore(0 anchors)"


# --- open_release end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wrapping_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def released_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def independent_key_hsm(plaintext: bytes, wrapping_key, enc_hash, header: dict[str, Any]) -> str:
    aes_key = os.urandom(32)
    oaep = padding.OAEP(mgf=padding.MGF1(enc_hash()), algorithm=enc_hash(), label=None)
    blob = wrapping_key.public_key().encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, plaintext)
    return b64u_json({"schema_version": "1.0", "header": header, "ciphertext": b64u(blob)})


def release_payload(
    released_rsa_key, wrapping_key, *, request_enc="RSA_AES_KEY_WRAP_256", header_enc=None, kid="wk1"
):
    numbers = released_rsa_key.private_numbers().public_numbers
    plaintext = released_rsa_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    header = {"kid": kid, "alg": "dir", "enc": header_enc or request_enc}
    hash_of = {
        "CKM_RSA_AES_KEY_WRAP": hashes.SHA1,
        "RSA_AES_KEY_WRAP_256": hashes.SHA256,
        "RSA_AES_KEY_WRAP_384": hashes.SHA384,
    }
    request = {"api-version": "7.4", "kid": f"https://{HOST}/keys/app-key"}
    if request_enc:
        request["enc"] = request_enc
    return {
        "request": request,
        "response": {
            "key": {
                "key": {
                    "kid": f"https://{HOST}/keys/app-key/0123abcd",
                    "kty": "RSA-HSM",
                    "key_ops": ["encrypt", "decrypt", "export"],
                    "n": b64u(numbers.n.to_bytes(256, "big")),
                    "e": "AQAB",
                    "key_hsm": independent_key_hsm(
                        plaintext, wrapping_key, hash_of[header_enc or request_enc], header
                    ),
                },
                "attributes": {"exportable": True},
            }
        },
    }


def test_open_release_returns_the_key_as_jwk(pki, trust, wrapping_key, released_rsa_key):
    compact = sign_compact(header_for(pki), release_payload(released_rsa_key, wrapping_key), pki["key"])
    released = open_release(
        compact,
        host=parse_endpoint(HOST),
        trust=trust,
        wrapping_key=wrapping_key,
        expected_wrapping_kid="wk1",
    )
    numbers = released_rsa_key.private_numbers()
    assert released.key_id == f"https://{HOST}/keys/app-key/0123abcd"
    assert released.version == "0123abcd"
    assert released.kty == "RSA-HSM"
    assert released.enc is Enc.RSA_AES_KEY_WRAP_256
    assert released.jwk["kty"] == "RSA"
    assert released.jwk["d"] == b64u(numbers.d.to_bytes((numbers.d.bit_length() + 7) // 8, "big"))
    assert released.jwk["key_ops"] == ["encrypt", "decrypt", "export"]
    assert json.loads(released.jwk_json) == released.jwk
    assert released.jwk["d"] not in repr(released)


def test_open_release_falls_back_to_the_key_hsm_header_enc(pki, trust, wrapping_key, released_rsa_key):
    payload = release_payload(
        released_rsa_key, wrapping_key, request_enc=None, header_enc="RSA_AES_KEY_WRAP_384"
    )
    compact = sign_compact(header_for(pki), payload, pki["key"])
    released = open_release(compact, host=parse_endpoint(HOST), trust=trust, wrapping_key=wrapping_key)
    assert released.enc is Enc.RSA_AES_KEY_WRAP_384


def test_open_release_refuses_a_key_wrapped_to_another_kid(pki, trust, wrapping_key, released_rsa_key):
    compact = sign_compact(
        header_for(pki), release_payload(released_rsa_key, wrapping_key, kid="someone-else"), pki["key"]
    )
    with pytest.raises(KeyWrapError, match="someone-else"):
        open_release(
            compact,
            host=parse_endpoint(HOST),
            trust=trust,
            wrapping_key=wrapping_key,
            expected_wrapping_kid="wk1",
        )


def test_open_release_refuses_the_wrong_wrapping_key(pki, trust, wrapping_key, released_rsa_key):
    compact = sign_compact(header_for(pki), release_payload(released_rsa_key, wrapping_key), pki["key"])
    with pytest.raises(KeyWrapError, match="RSA-OAEP"):
        open_release(
            compact,
            host=parse_endpoint(HOST),
            trust=trust,
            wrapping_key=rsa.generate_private_key(65537, 2048),
        )


def test_open_release_refuses_key_material_that_does_not_match_the_public_key(
    pki, trust, wrapping_key, released_rsa_key
):
    payload = release_payload(released_rsa_key, wrapping_key)
    payload["response"]["key"]["key"]["n"] = b64u(
        rsa.generate_private_key(65537, 2048).public_key().public_numbers().n.to_bytes(256, "big")
    )
    with pytest.raises(KeyWrapError, match="public 'n'"):
        open_release(
            sign_compact(header_for(pki), payload, pki["key"]),
            host=parse_endpoint(HOST),
            trust=trust,
            wrapping_key=wrapping_key,
        )


def test_open_release_verifies_before_unwrapping(pki, wrapping_key, released_rsa_key):
    compact = sign_compact(header_for(pki), release_payload(released_rsa_key, wrapping_key), pki["key"])
    with pytest.raises(JwsError):
        open_release(
            compact,
            host=parse_endpoint(HOST),
            trust=TrustStore(include_system=False, extra_certificates=[make_ca()[1]]),
            wrapping_key=wrapping_key,
        )


@pytest.mark.parametrize("missing", ["kid", "kty", "key_hsm"])
def test_open_release_names_a_missing_payload_member(pki, trust, wrapping_key, released_rsa_key, missing):
    payload = release_payload(released_rsa_key, wrapping_key)
    del payload["response"]["key"]["key"][missing]
    with pytest.raises(JwsError, match=f"response.key.key.{missing}"):
        open_release(
            sign_compact(header_for(pki), payload, pki["key"]),
            host=parse_endpoint(HOST),
            trust=trust,
            wrapping_key=wrapping_key,
        )


def test_released_key_repr_hides_the_jwk():
    released = ReleasedKey(
        jwk={"k": "SECRETSECRET", "kty": "oct"},
        key_id="https://h/keys/n/v",
        kty="oct-HSM",
        enc=Enc.CKM_RSA_AES_KEY_WRAP,
    )
    assert "SECRETSECRET" not in repr(released)
