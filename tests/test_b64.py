"""The one base64url module: unpadded encoding, and the strictness every caller relies on."""

from __future__ import annotations

import base64

import pytest

from skr.b64 import b64url_decode, b64url_encode, b64url_uint, go_std_b64decode

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("data", [b"", b"\xfb", b"\xfb\xff", b"\xfb\xff\xfe", bytes(range(256))])
def test_encode_is_urlsafe_base64_without_padding(data):
    assert b64url_encode(data) == base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert b64url_decode(b64url_encode(data), padding=False) == data


@pytest.mark.parametrize(
    ("text", "data"), [("-_8", b"\xfb\xff"), ("-_8=", b"\xfb\xff"), ("QQ==", b"A"), ("", b"")]
)
def test_decode_accepts_padded_and_unpadded(text, data):
    assert b64url_decode(text) == data


@pytest.mark.parametrize("text", ["+/8", "QQ===", "Q=Q", " QQ", "QQ\n", "Q", "QUJDR", "QQ\u00e9"])
def test_decode_refuses_other_alphabets_whitespace_and_impossible_lengths(text):
    with pytest.raises(ValueError):
        b64url_decode(text)


@pytest.mark.parametrize("text", ["QQ==", "QUI="])
def test_decode_without_padding_refuses_padding(text):
    with pytest.raises(ValueError):
        b64url_decode(text, padding=False)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "AA"), (1, "AQ"), (65537, "AQAB"), (255, "_w"), (256, "AQA"), (2**64 - 1, "__________8")],
)
def test_base64url_uint_is_big_endian_in_the_fewest_octets(value, text):
    assert b64url_uint(value) == text


def test_go_std_base64_ignores_cr_lf_and_nothing_else():
    assert go_std_b64decode("QUJD\r\nREVG\n") == b"ABCDEF"
    for text in ("-_8=", "QQ", "QU JD", "QUJD\t"):
        with pytest.raises(ValueError):
            go_std_b64decode(text)
