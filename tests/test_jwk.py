"""Released plaintext → JWK, in the exact shape the Go sidecar returns from /key/release.

Expected members are computed here from ``private_numbers()`` with plain int→bytes→base64url code.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from skr.akv.jwk import (
    jose_kty,
    jwk_to_json,
    jwk_to_private_key,
    plaintext_to_jwk,
    private_key_to_jwk,
    private_key_to_plaintext,
)
from skr.errors import KeyWrapError


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def minimal(value: int) -> str:
    return b64u(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def fixed(value: int, size: int) -> str:
    return b64u(value.to_bytes(size, "big"))


def pkcs8(key) -> bytes:
    der: bytes = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return der


@pytest.fixture(scope="module", params=[2048, 3072, 4096])
def rsa_key(request) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, request.param)


CURVES = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
    "P-256K": (ec.SECP256K1, 32),
}


@pytest.mark.parametrize("kty", ["RSA", "RSA-HSM"])
def test_rsa_pkcs8_becomes_a_full_private_jwk(rsa_key, kty):
    numbers = rsa_key.private_numbers()
    jwk = plaintext_to_jwk(pkcs8(rsa_key), kty=kty, key_ops=["encrypt", "decrypt"])
    assert jwk == {
        "kty": "RSA",
        "n": minimal(numbers.public_numbers.n),
        "e": minimal(numbers.public_numbers.e),
        "d": minimal(numbers.d),
        "p": minimal(numbers.p),
        "q": minimal(numbers.q),
        "dp": minimal(numbers.dmp1),
        "dq": minimal(numbers.dmq1),
        "qi": minimal(numbers.iqmp),
        "key_ops": ["encrypt", "decrypt"],
    }
    assert jwk["e"] == "AQAB"


@pytest.mark.parametrize("crv", list(CURVES))
@pytest.mark.parametrize("kty", ["EC", "EC-HSM"])
def test_ec_pkcs8_becomes_a_private_jwk_with_fixed_width_coordinates(crv, kty):
    curve, size = CURVES[crv]
    # Find a key whose x or d has a leading zero byte, to prove the width is fixed (not minimal).
    for _ in range(2000):
        key = ec.generate_private_key(curve())
        numbers = key.private_numbers()
        if (
            min(numbers.public_numbers.x, numbers.public_numbers.y, numbers.private_value).bit_length()
            <= 8 * size - 8
        ):
            break
    jwk = plaintext_to_jwk(pkcs8(key), kty=kty, key_ops=None)
    assert jwk == {
        "kty": "EC",
        "crv": crv,
        "x": fixed(numbers.public_numbers.x, size),
        "y": fixed(numbers.public_numbers.y, size),
        "d": fixed(numbers.private_value, size),
    }
    for member in ("x", "y", "d"):
        assert len(base64.urlsafe_b64decode(jwk[member] + "==")) == size


@pytest.mark.parametrize("size", [16, 24, 32])
@pytest.mark.parametrize("kty", ["oct", "oct-HSM"])
def test_oct_raw_bytes_become_k(size, kty):
    raw = os.urandom(size)
    assert plaintext_to_jwk(raw, kty=kty, key_ops=None) == {"kty": "oct", "k": b64u(raw)}


@pytest.mark.parametrize(
    "key_ops",
    [["encrypt", "decrypt", "wrapKey", "unwrapKey"], ["export", "import"], ["sign", "export"]],
    ids=["usual", "export-import", "mixed"],
)
def test_key_ops_are_copied_in_order_including_export_and_import(key_ops):
    jwk = plaintext_to_jwk(b"\x07" * 32, kty="oct-HSM", key_ops=key_ops)
    assert jwk["key_ops"] == key_ops


@pytest.mark.parametrize("key_ops", [None, []])
def test_key_ops_are_omitted_when_absent_or_empty(key_ops):
    assert "key_ops" not in plaintext_to_jwk(b"\x07" * 32, kty="oct", key_ops=key_ops)


def test_no_kid_in_the_jwk():
    key = ec.generate_private_key(ec.SECP256R1())
    assert "kid" not in plaintext_to_jwk(pkcs8(key), kty="EC-HSM", key_ops=["sign"])


def test_json_form_is_sorted_and_has_no_spaces():
    raw = bytes(range(32))
    jwk = plaintext_to_jwk(raw, kty="oct-HSM", key_ops=["encrypt", "decrypt", "wrapKey", "unwrapKey"])
    assert jwk_to_json(jwk) == (
        '{"k":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",'
        '"key_ops":["encrypt","decrypt","wrapKey","unwrapKey"],"kty":"oct"}'
    )


def test_json_form_of_an_rsa_jwk_has_the_go_member_order(rsa_key):
    text = jwk_to_json(plaintext_to_jwk(pkcs8(rsa_key), kty="RSA-HSM", key_ops=["decrypt"]))
    assert list(json.loads(text)) == ["d", "dp", "dq", "e", "key_ops", "kty", "n", "p", "q", "qi"]
    assert " " not in text


@pytest.mark.parametrize(
    ("akv", "jose"),
    [("oct", "oct"), ("oct-HSM", "oct"), ("RSA", "RSA"), ("RSA-HSM", "RSA"), ("EC", "EC"), ("EC-HSM", "EC")],
)
def test_akv_kty_maps_to_jose_kty(akv, jose):
    assert jose_kty(akv) == jose


# --- mismatches --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_rsa_pkcs8() -> bytes:
    return pkcs8(rsa.generate_private_key(65537, 2048))


def test_rsa_kty_with_ec_plaintext_is_refused():
    with pytest.raises(KeyWrapError, match="kty RSA-HSM"):
        plaintext_to_jwk(pkcs8(ec.generate_private_key(ec.SECP256R1())), kty="RSA-HSM", key_ops=None)


def test_ec_kty_with_rsa_plaintext_is_refused(small_rsa_pkcs8):
    with pytest.raises(KeyWrapError, match="kty EC"):
        plaintext_to_jwk(small_rsa_pkcs8, kty="EC", key_ops=None)


def test_oct_kty_with_pkcs8_plaintext_is_refused(small_rsa_pkcs8):
    with pytest.raises(KeyWrapError, match="oct-HSM"):
        plaintext_to_jwk(small_rsa_pkcs8, kty="oct-HSM", key_ops=None)


def test_rsa_kty_with_raw_bytes_is_refused():
    with pytest.raises(KeyWrapError, match="not a PKCS#8"):
        plaintext_to_jwk(os.urandom(32), kty="RSA", key_ops=None)


def test_unsupported_key_algorithm_is_refused():
    with pytest.raises(KeyWrapError):
        plaintext_to_jwk(pkcs8(ed25519.Ed25519PrivateKey.generate()), kty="EC-HSM", key_ops=None)


@pytest.mark.parametrize("kty", ["OKP", "oct-HSM-x", "", "AES"])
def test_unknown_kty_is_refused(kty):
    with pytest.raises(KeyWrapError, match="not supported"):
        plaintext_to_jwk(b"\0" * 32, kty=kty, key_ops=None)


def test_errors_do_not_contain_the_plaintext():
    raw = b"\xab" * 70
    with pytest.raises(KeyWrapError) as info:
        plaintext_to_jwk(raw, kty="oct", key_ops=None)
    assert raw.hex() not in info.value.diagnostics()
    assert b64u(raw) not in info.value.diagnostics()


# --- the wrap side -----------------------------------------------------------------------------------


def test_private_key_to_plaintext_is_pkcs8_der(rsa_key):
    assert private_key_to_plaintext(rsa_key) == pkcs8(rsa_key)
    key = ec.generate_private_key(ec.SECP384R1())
    assert private_key_to_plaintext(key) == pkcs8(key)


def test_private_key_to_plaintext_of_oct_bytes_and_jwk():
    raw = os.urandom(32)
    assert private_key_to_plaintext(raw) == raw
    assert private_key_to_plaintext({"kty": "oct-HSM", "k": b64u(raw)}) == raw


@pytest.mark.parametrize("crv", list(CURVES))
def test_ec_jwk_round_trips_to_the_same_key(crv):
    key = ec.generate_private_key(CURVES[crv][0]())
    jwk = private_key_to_jwk(key)
    assert jwk_to_private_key(jwk).private_numbers() == key.private_numbers()
    assert private_key_to_plaintext(jwk) == pkcs8(key)


def test_rsa_jwk_round_trips_to_the_same_key(rsa_key):
    jwk = private_key_to_jwk(rsa_key, key_ops=["sign"])
    assert jwk_to_private_key(jwk).private_numbers() == rsa_key.private_numbers()


def test_inconsistent_rsa_jwk_is_refused(rsa_key):
    jwk = private_key_to_jwk(rsa_key)
    jwk["d"] = minimal(rsa_key.private_numbers().d + 2)
    with pytest.raises(KeyWrapError, match="not a consistent"):
        jwk_to_private_key(jwk)


@pytest.mark.parametrize("field", ["dmp1", "dmq1", "iqmp", "d"])
def test_inconsistent_rsa_plaintext_is_refused(field):
    """Keys are loaded without OpenSSL's slow primality checks, so the arithmetic is checked instead."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod

    from skr.akv.jwk import plaintext_to_jwk
    from skr.errors import KeyWrapError

    good = rsa_mod.generate_private_key(65537, 2048).private_numbers()
    values = {
        "p": good.p,
        "q": good.q,
        "d": good.d,
        "dmp1": good.dmp1,
        "dmq1": good.dmq1,
        "iqmp": good.iqmp,
    }
    values[field] += 2
    bad = rsa_mod.RSAPrivateNumbers(public_numbers=good.public_numbers, **values).private_key(
        unsafe_skip_rsa_key_validation=True
    )
    der = bad.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyWrapError):
        plaintext_to_jwk(der, kty="RSA-HSM", key_ops=None)
