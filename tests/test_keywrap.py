"""RSA-AES key wrap (CKM_RSA_AES_KEY_WRAP family) and the key_hsm envelope.

Every expected ciphertext is built here from cryptography primitives (RSA-OAEP + RFC 5649 AES-KWP),
never through skr's own wrap; skr's wrap output is opened here the same independent way.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding, aes_key_wrap_with_padding

from skr.akv.keywrap import (
    DEFAULT_ENC,
    Enc,
    KeyHsm,
    encode_key_hsm,
    parse_key_hsm,
    select_enc,
    unwrap,
    wrap,
)
from skr.errors import KeyWrapError

# The OAEP/MGF1 hash of each enc, written down independently of skr (docs/wire-formats.md §4).
OAEP_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "CKM_RSA_AES_KEY_WRAP": hashes.SHA1,
    "RSA_AES_KEY_WRAP_256": hashes.SHA256,
    "RSA_AES_KEY_WRAP_384": hashes.SHA384,
}
WRAPPING_SIZES = (2048, 3072, 4096)
TARGETS = (
    "oct-128",
    "oct-192",
    "oct-256",
    "RSA-2048",
    "RSA-3072",
    "RSA-4096",
    "EC-P-256",
    "EC-P-384",
    "EC-P-521",
)


def _oaep(enc: str) -> padding.OAEP:
    algorithm = OAEP_HASH[enc]
    return padding.OAEP(mgf=padding.MGF1(algorithm()), algorithm=algorithm(), label=None)


def independent_wrap(plaintext: bytes, public_key: rsa.RSAPublicKey, enc: str, aes_key: bytes) -> bytes:
    return public_key.encrypt(aes_key, _oaep(enc)) + aes_key_wrap_with_padding(aes_key, plaintext)


def independent_unwrap(blob: bytes, private_key: rsa.RSAPrivateKey, enc: str) -> tuple[bytes, bytes]:
    split = private_key.key_size // 8
    aes_key = private_key.decrypt(blob[:split], _oaep(enc))
    return aes_key, aes_key_unwrap_with_padding(aes_key, blob[split:])


@pytest.fixture(scope="session")
def rsa_keys() -> dict[int, rsa.RSAPrivateKey]:
    """One RSA key per size, shared by wrapping and target roles (RSA keygen is the slow part)."""
    return {bits: rsa.generate_private_key(65537, bits) for bits in WRAPPING_SIZES}


@pytest.fixture(scope="session")
def other_wrapping_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="session")
def plaintexts(rsa_keys) -> dict[str, bytes]:
    def pkcs8(key) -> bytes:
        der: bytes = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return der

    curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
    result = {f"oct-{bits}": os.urandom(bits // 8) for bits in (128, 192, 256)}
    result |= {f"RSA-{bits}": pkcs8(key) for bits, key in rsa_keys.items()}
    result |= {f"EC-{name}": pkcs8(ec.generate_private_key(curve)) for name, curve in curves.items()}
    return result


@pytest.mark.parametrize("wrapping_bits", WRAPPING_SIZES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("enc", list(OAEP_HASH))
def test_unwrap_opens_independently_wrapped_keys(enc, target, wrapping_bits, rsa_keys, plaintexts):
    wrapping_key = rsa_keys[wrapping_bits]
    aes_key = os.urandom(32)
    blob = independent_wrap(plaintexts[target], wrapping_key.public_key(), enc, aes_key)
    assert unwrap(blob, wrapping_key, Enc(enc)) == plaintexts[target]


@pytest.mark.parametrize("wrapping_bits", WRAPPING_SIZES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("enc", list(OAEP_HASH))
def test_wrap_output_opens_independently(enc, target, wrapping_bits, rsa_keys, plaintexts):
    wrapping_key = rsa_keys[wrapping_bits]
    blob = wrap(plaintexts[target], wrapping_key.public_key(), Enc(enc))
    aes_key, plaintext = independent_unwrap(blob, wrapping_key, enc)
    assert plaintext == plaintexts[target]
    assert len(aes_key) == 32, "wrap uses an AES-256 transport key"


def test_wrap_uses_a_fresh_transport_key_each_time(rsa_keys):
    key = rsa_keys[2048]
    first = wrap(b"k" * 32, key.public_key(), Enc.RSA_AES_KEY_WRAP_256)
    second = wrap(b"k" * 32, key.public_key(), Enc.RSA_AES_KEY_WRAP_256)
    assert (
        independent_unwrap(first, key, "RSA_AES_KEY_WRAP_256")[0]
        != independent_unwrap(second, key, "RSA_AES_KEY_WRAP_256")[0]
    )


@pytest.mark.parametrize("aes_bytes", [16, 24, 32])
def test_unwrap_accepts_every_aes_transport_key_size(aes_bytes, rsa_keys):
    key = rsa_keys[2048]
    blob = independent_wrap(b"\x01" * 32, key.public_key(), "CKM_RSA_AES_KEY_WRAP", os.urandom(aes_bytes))
    assert unwrap(blob, key, Enc.CKM_RSA_AES_KEY_WRAP) == b"\x01" * 32


RFC5649_KEK = bytes.fromhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")


@pytest.mark.parametrize(
    ("key", "wrapped"),
    [
        (
            "c37b7e6492584340bed12207808941155068f738",
            "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a",
        ),
        ("466f7250617369", "afbeb0f07dfbf5419200f2ccb50bb24f"),
    ],
    ids=["20-byte", "7-byte"],
)
def test_rfc5649_published_vectors(key, wrapped, rsa_keys):
    """RFC 5649 §6: the AES-KWP half of the blob, with the KEK carried by RSA-OAEP as Key Vault does."""
    assert aes_key_wrap_with_padding(RFC5649_KEK, bytes.fromhex(key)) == bytes.fromhex(wrapped)
    wrapping_key = rsa_keys[2048]
    blob = wrapping_key.public_key().encrypt(RFC5649_KEK, _oaep("CKM_RSA_AES_KEY_WRAP")) + bytes.fromhex(
        wrapped
    )
    assert unwrap(blob, wrapping_key, Enc.CKM_RSA_AES_KEY_WRAP) == bytes.fromhex(key)


# --- refusals -----------------------------------------------------------------------------------------


@pytest.fixture
def blob_2048(rsa_keys) -> bytes:
    return independent_wrap(
        b"secret-key-bytes" * 2, rsa_keys[2048].public_key(), "CKM_RSA_AES_KEY_WRAP", os.urandom(32)
    )


def test_wrong_wrapping_key_is_refused(blob_2048, other_wrapping_key):
    with pytest.raises(KeyWrapError, match="RSA-OAEP"):
        unwrap(blob_2048, other_wrapping_key, Enc.CKM_RSA_AES_KEY_WRAP)


@pytest.mark.parametrize("enc", [Enc.RSA_AES_KEY_WRAP_256, Enc.RSA_AES_KEY_WRAP_384])
def test_wrong_enc_is_refused(blob_2048, rsa_keys, enc):
    with pytest.raises(KeyWrapError, match=enc.value):
        unwrap(blob_2048, rsa_keys[2048], enc)


def test_wrapping_key_of_other_size_is_refused(blob_2048, rsa_keys):
    with pytest.raises(KeyWrapError):
        unwrap(blob_2048, rsa_keys[3072], Enc.CKM_RSA_AES_KEY_WRAP)


@pytest.mark.parametrize("cut", [1, 8, 24, 100, 256, 300])
def test_truncated_ciphertext_is_refused(blob_2048, rsa_keys, cut):
    with pytest.raises(KeyWrapError):
        unwrap(blob_2048[:-cut], rsa_keys[2048], Enc.CKM_RSA_AES_KEY_WRAP)


def test_altered_aes_part_is_refused(blob_2048, rsa_keys):
    tampered = bytearray(blob_2048)
    tampered[-1] ^= 1
    with pytest.raises(KeyWrapError, match="RFC 5649"):
        unwrap(bytes(tampered), rsa_keys[2048], Enc.CKM_RSA_AES_KEY_WRAP)


def test_unsupported_wrapping_key_size_is_refused():
    small = rsa.generate_private_key(65537, 1024)
    with pytest.raises(KeyWrapError, match="RSA-1024"):
        wrap(b"k" * 16, small.public_key(), Enc.CKM_RSA_AES_KEY_WRAP)
    with pytest.raises(KeyWrapError, match="RSA-1024"):
        unwrap(b"\0" * 200, small, Enc.CKM_RSA_AES_KEY_WRAP)


def test_errors_never_contain_key_bytes(rsa_keys):
    secret = b"\x13\x37" * 16
    blob = bytearray(independent_wrap(secret, rsa_keys[2048].public_key(), "CKM_RSA_AES_KEY_WRAP", b"A" * 32))
    blob[-3] ^= 0xFF
    with pytest.raises(KeyWrapError) as info:
        unwrap(bytes(blob), rsa_keys[2048], Enc.CKM_RSA_AES_KEY_WRAP)
    text = info.value.diagnostics() + repr(info.value)
    for needle in (secret.hex(), "AAAA", base64.b64encode(secret).decode()):
        assert needle not in text


# --- enc selection ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_enc", "header_enc", "expected"),
    [
        ("RSA_AES_KEY_WRAP_256", "CKM_RSA_AES_KEY_WRAP", Enc.RSA_AES_KEY_WRAP_256),
        (None, "RSA_AES_KEY_WRAP_384", Enc.RSA_AES_KEY_WRAP_384),
        (None, None, Enc.CKM_RSA_AES_KEY_WRAP),
    ],
    ids=["request-wins", "header-fallback", "service-default"],
)
def test_enc_selection_order(request_enc, header_enc, expected):
    assert select_enc(request_enc, header_enc) is expected


def test_service_default_is_ckm_rsa_aes_key_wrap():
    assert DEFAULT_ENC == "CKM_RSA_AES_KEY_WRAP"


@pytest.mark.parametrize("value", ["RSA_AES_KEY_WRAP_512", "ckm_rsa_aes_key_wrap", 7])
def test_unknown_enc_is_an_error_not_a_fallback(value):
    with pytest.raises(KeyWrapError, match=r"request\.enc"):
        select_enc(value, "CKM_RSA_AES_KEY_WRAP")


# --- key_hsm ------------------------------------------------------------------------------------------


def _b64url(data: bytes, *, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(data).decode()
    return text if pad else text.rstrip("=")


def _key_hsm(document: object, *, pad: bool = False) -> str:
    return _b64url(json.dumps(document).encode(), pad=pad)


def test_genuine_key_hsm_parses(vectors, expected):
    payload = json.loads((vectors / "akv/release-response.decoded-body.json").read_text())
    parsed = parse_key_hsm(payload["response"]["key"]["key"]["key_hsm"])
    want = expected["akv"][0]
    assert parsed.kid == want["key_hsm_header"]["kid"] == "TpmEphemeralEncryptionKey"
    assert parsed.enc is Enc.CKM_RSA_AES_KEY_WRAP
    assert len(parsed.ciphertext) == want["key_hsm_ciphertext_len"] == 2640
    assert "ciphertext" not in repr(parsed), "the repr never shows wrapped key bytes"


def test_encode_key_hsm_is_the_documented_envelope():
    value = encode_key_hsm("kid-1", Enc.RSA_AES_KEY_WRAP_256, b"\xfb\xff" * 5)
    assert "=" not in value
    document = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    assert document == {
        "schema_version": "1.0",
        "header": {"kid": "kid-1", "alg": "dir", "enc": "RSA_AES_KEY_WRAP_256"},
        "ciphertext": _b64url(b"\xfb\xff" * 5),
    }
    assert parse_key_hsm(value) == KeyHsm("kid-1", Enc.RSA_AES_KEY_WRAP_256, b"\xfb\xff" * 5)


def test_key_hsm_tolerates_padded_base64url():
    document = {
        "schema_version": "1.0",
        "header": {"kid": "k", "alg": "dir"},
        "ciphertext": _b64url(b"xy", pad=True),
    }
    parsed = parse_key_hsm(_key_hsm(document, pad=True))
    assert parsed == KeyHsm("k", None, b"xy")


GOOD = {
    "schema_version": "1.0",
    "header": {"kid": "k", "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
    "ciphertext": "eHk",
}


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda d: d.pop("header"), "key_hsm.header is missing"),
        (lambda d: d.pop("ciphertext"), "key_hsm.ciphertext is missing"),
        (lambda d: d.pop("schema_version"), "key_hsm.schema_version is missing"),
        (lambda d: d.update(schema_version="2.0"), "schema_version"),
        (lambda d: d["header"].update(alg="RSA-OAEP"), "key_hsm.header.alg"),
        (lambda d: d["header"].pop("kid"), "key_hsm.header.kid is missing"),
        (lambda d: d["header"].update(kid=5), "key_hsm.header.kid is a int"),
        (lambda d: d["header"].update(enc="A256GCM"), "key_hsm.header.enc"),
        (lambda d: d.update(header=[]), "key_hsm.header is a list"),
        (lambda d: d.update(ciphertext="+/+/"), "key_hsm.ciphertext is not base64url"),
        (lambda d: d.update(ciphertext=""), "key_hsm.ciphertext is empty"),
    ],
)
def test_malformed_key_hsm_names_the_bad_part(mutate, complaint):
    document = json.loads(json.dumps(GOOD))
    mutate(document)
    with pytest.raises(KeyWrapError) as info:
        parse_key_hsm(_key_hsm(document))
    assert complaint in info.value.message


@pytest.mark.parametrize(
    "value",
    ["not base64!", _b64url(b"not json"), _b64url(b"[1,2]"), "a"],
    ids=["alphabet", "not-json", "not-object", "impossible-length"],
)
def test_key_hsm_that_is_not_a_json_object_is_refused(value):
    with pytest.raises(KeyWrapError):
        parse_key_hsm(value)
