"""EncfsSideCarArgs (the Go sidecar's schema) and the filesystem key (oct: 32 bytes; RSA: the Go HKDF)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from skr.encfs.args import DEFAULT_LABEL, KeyDerivation, decode_encfs_args, parse_encfs_json
from skr.encfs.errors import EncfsConfigError, EncfsKeyError
from skr.encfs.keys import filesystem_key

# examples/encfs/encfs-sidecar-args.json of microsoft/confidential-sidecar-containers, verbatim.
GO_EXAMPLE = """{
   "azure_filesystems": [
      {
         "mount_point": "/mnt/remote/share",
         "azure_url": "<azure-blob-storage-url>",
         "azure_url_private": true,
         "read_write": true,
         "key": {
            "kid": "<key-vault-akv-key-identifier>",
            "kty": "<key-type-of-key-imported-to-akv>",
            "authority": {
               "endpoint": "<authority-of-key-imported-to-akv>"
            },
            "akv": {
               "endpoint": "<key-vault-akv-endpoint>"
            }
         },
         "key_derivation": {
            "salt": "<salt-for-key-derivation-valid-only-for-RSA-HSM-keys>",
            "label": "<label-for-derived-key-valid-only-for-RSA-HSM-keys>"
         }
      }
   ]
}"""

FILLED = {
    "azure_info": {"certcache": {"endpoint_type": "LocalTHIM"}, "identity": {"client_id": "abc"}},
    "azure_filesystems": [
        {
            "mount_point": "/mnt/remote/share",
            "azure_url": "https://acct.blob.core.windows.net/c/image.img",
            "azure_url_private": True,
            "key": {
                "kid": "fs-key",
                "kty": "RSA-HSM",
                "authority": {"endpoint": "sharedeus2.eus2.attest.azure.net"},
                "akv": {"endpoint": "myhsm.managedhsm.azure.net"},
            },
            "key_derivation": {"salt": "00ff", "label": ""},
            "raw_key": "0011",
            "something_new": 1,
        },
        {"mount_point": "/mnt/remote/two", "azure_url": "https://acct.blob.core.windows.net/c/two.img"},
    ],
}


def b64(doc: object) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def test_the_go_example_args_are_accepted() -> None:
    args = decode_encfs_args(base64.b64encode(GO_EXAMPLE.encode()).decode())
    (fs,) = args.filesystems
    assert (fs.index, fs.mount_point, fs.azure_url) == (0, "/mnt/remote/share", "<azure-blob-storage-url>")
    assert fs.azure_url_private and fs.read_write
    assert fs.key is not None
    assert fs.key.kid == "<key-vault-akv-key-identifier>"
    assert fs.key.maa_endpoint == "<authority-of-key-imported-to-akv>"
    assert fs.key.akv_endpoint == "<key-vault-akv-endpoint>"
    assert fs.key_derivation.label == "<label-for-derived-key-valid-only-for-RSA-HSM-keys>"


def test_all_fields_defaults_and_unknown_fields() -> None:
    args = decode_encfs_args(b64(FILLED))
    first, second = args.filesystems
    assert args.client_id == "abc"
    assert args.certcache == {"endpoint_type": "LocalTHIM"}
    assert first.key is not None and first.key.kty == "RSA-HSM"
    assert first.key_derivation.salt == b"\x00\xff" and first.key_derivation.info == DEFAULT_LABEL.encode()
    assert first.has_raw_key and "0011" not in repr(first)
    assert (second.index, second.read_write, second.azure_url_private, second.key) == (1, False, False, None)
    assert parse_encfs_json(json.dumps(FILLED)) == args


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64!", "not standard base64"),
        (base64.b64encode(b"[1]").decode(), "must be a JSON object"),
        (base64.b64encode(b"{").decode(), "is not JSON"),
        (b64({"azure_filesystems": []}), "no azure_filesystems"),
        (b64({"azure_filesystems": [{"azure_url": "x"}]}), r"azure_filesystems\[0\].mount_point is required"),
        (
            b64({"azure_filesystems": [{"mount_point": "/m", "azure_url": "u", "read_write": "yes"}]}),
            "true or false",
        ),
        (
            b64({"azure_filesystems": [{"mount_point": "/m", "azure_url": "u", "key": []}]}),
            "key must be a JSON object",
        ),
        (b64({"azure_info": 3, "azure_filesystems": [{}]}), "azure_info must be a JSON object"),
    ],
)
def test_bad_args_are_one_clear_error(value: str, message: str) -> None:
    with pytest.raises(EncfsConfigError, match=message) as info:
        decode_encfs_args(value)
    assert info.value.code == "encfs_config_invalid"


def test_bad_salt_hex_is_a_config_error() -> None:
    with pytest.raises(EncfsConfigError, match="hex"):
        _ = KeyDerivation(salt_hex="zz").salt


# --- the filesystem key ---------------------------------------------------------------------------------


def rfc5869_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 for 32 bytes, written out from RFC 5869 with the stdlib (independent of cryptography)."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_jwk(d: int, *, width: int | None = None) -> str:
    raw = d.to_bytes(width or (d.bit_length() + 7) // 8, "big")
    return json.dumps({"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": b64url(raw)})


D = int("a5" * 255, 16)  # a 2040-bit exponent: Go's big.Int.Bytes() drops the leading zero byte


def test_rsa_key_fixed_vectors() -> None:
    salt = KeyDerivation(salt_hex="00112233445566778899aabbccddeeff")
    assert filesystem_key(rsa_jwk(D), salt).hex() == (
        "1e3ee8765baa2bfc20beb2be261e10fb4bc76fa6369fda51dfd400925ffe8398"
    )
    # a JWK that pads d to the modulus width derives the same key (IKM has no leading zeros)
    assert filesystem_key(rsa_jwk(D, width=256), salt) == filesystem_key(rsa_jwk(D), salt)
    labelled = KeyDerivation(salt_hex="", label="my-label")
    assert filesystem_key(rsa_jwk(D), labelled).hex() == (
        "1082d28f99e69b8185fe117f70de36ea712634f568c116f02eb95f6098b27218"
    )


def test_rsa_key_is_hkdf_over_the_private_exponent() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    d = key.private_numbers().d
    derivation = KeyDerivation(salt_hex="c0ffee" * 8, label="Symmetric Encryption Key")
    expected = rfc5869_sha256(
        d.to_bytes((d.bit_length() + 7) // 8, "big"), bytes.fromhex("c0ffee" * 8), DEFAULT_LABEL.encode()
    )
    assert filesystem_key(rsa_jwk(d), derivation) == expected


def test_empty_salt_warns_about_the_importkey_pitfall(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="skr.encfs"):
        key = filesystem_key(rsa_jwk(D), KeyDerivation(), where="filesystem 0 (/mnt/x)")
    assert "salt is empty" in caplog.text and "filesystem 0" in caplog.text
    assert key.hex() not in caplog.text


def test_oct_key_must_be_32_bytes() -> None:
    key = bytes(range(32))
    assert filesystem_key(json.dumps({"kty": "oct", "k": b64url(key)}), KeyDerivation()) == key
    with pytest.raises(EncfsKeyError, match="16 bytes") as info:
        filesystem_key(json.dumps({"kty": "oct", "k": b64url(bytes(16))}), KeyDerivation())
    assert info.value.code == "encfs_key_invalid"


@pytest.mark.parametrize(
    "jwk",
    [
        '{"kty": "EC", "crv": "P-256", "d": "AA"}',
        "[]",
        "nonsense",
        '{"kty": "oct"}',
        '{"kty": "RSA", "d": "!!"}',
    ],
)
def test_unusable_keys_are_refused(jwk: str) -> None:
    with pytest.raises(EncfsKeyError):
        filesystem_key(jwk, KeyDerivation())
