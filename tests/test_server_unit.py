import pytest

from skr.errors import BadRequest
from skr.server import _is_loopback, decode_runtime_data


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", None])
def test_loopback_peers(peer):
    assert _is_loopback(peer)


@pytest.mark.parametrize("peer", ["10.0.0.1", "192.168.1.2", "::ffff:10.0.0.1", "2001:db8::1", "garbage", ""])
def test_non_loopback_peers(peer):
    assert not _is_loopback(peer)


def test_runtime_data_is_go_std_base64():
    assert decode_runtime_data("YWJj\r\nZA==") == b"abcd"  # Go's StdEncoding ignores CR/LF
    for bad in ("YWJjZA", "YW-j", "YW_j", "YWJj ZA==", "@@@@"):
        with pytest.raises(BadRequest):
            decode_runtime_data(bad)
