"""The wrapping key and its runtime data: RFC 7638 kid, exact JWKS bytes, no private key exposure."""

import base64
import hashlib
import json
import pickle

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from skr.errors import BadRequest
from skr.evidence.base import report_data_for
from skr.maa.runtime import WrappingKey, jwk_thumbprint


@pytest.fixture(scope="module")
def key() -> WrappingKey:
    return WrappingKey.generate()


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_generate_makes_rsa_2048_with_exponent_65537(key):
    assert key.key_size == 2048
    assert key.private_key.public_key().public_numbers().e == 65537


def test_kid_is_the_rfc7638_sha256_thumbprint(key):
    numbers = key.private_key.public_key().public_numbers()
    # RFC 7638 §3.2: required members only, lexicographic order, no white space
    canonical = '{"e":"' + _b64url_uint(numbers.e) + '","kty":"RSA","n":"' + _b64url_uint(numbers.n) + '"}'
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    assert key.kid == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert len(key.kid) == 43


def test_rfc7638_example_thumbprint():
    # The RSA key of RFC 7638 §3.1 has the thumbprint NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
    n_b64 = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCi"
        "FV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgn"
        "Yb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqb"
        "w0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    n = int.from_bytes(base64.urlsafe_b64decode(n_b64 + "=" * (-len(n_b64) % 4)), "big")
    public = rsa.RSAPublicNumbers(65537, n).public_key()
    assert jwk_thumbprint(public) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_runtime_data_is_the_exact_go_compatible_jwks(key):
    numbers = key.private_key.public_key().public_numbers()
    expected = (
        '{"keys":[{"e":"AQAB","key_ops":["encrypt"],"kid":"'
        + key.kid
        + '","kty":"RSA","n":"'
        + _b64url_uint(numbers.n)
        + '"}]}'
    ).encode("ascii")
    assert key.runtime_data() == expected
    assert b" " not in key.runtime_data()
    assert b"=" not in key.runtime_data()


def test_public_jwk_has_sorted_members_and_no_private_parts(key):
    jwk = key.public_jwk()
    assert list(jwk) == ["e", "key_ops", "kid", "kty", "n"]
    assert json.loads(key.runtime_data()) == {"keys": [jwk]}
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)


def test_report_data_binds_the_runtime_data_bytes(key):
    report_data = report_data_for(key.runtime_data())
    assert report_data[:32] == hashlib.sha256(key.runtime_data()).digest()
    assert report_data[32:] == bytes(32)


def test_each_generated_key_is_fresh(key):
    assert WrappingKey.generate().kid != key.kid


def test_repr_never_shows_the_private_key(key):
    d = key.private_key.private_numbers().d
    text = repr(key)
    assert key.kid in text
    assert str(d) not in text and hex(d)[2:12] not in text
    assert "PRIVATE" not in text


def test_wrapping_key_refuses_to_be_pickled(key):
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_small_or_non_rsa_keys_are_refused():
    with pytest.raises(BadRequest):
        WrappingKey.generate(bits=1024)
    with pytest.raises(BadRequest):
        WrappingKey(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
