"""SKR_CLIENT_TOKEN_FILE: the original one-token file keeps working; several named tokens are new."""

from __future__ import annotations

import pytest

from skr.config import describe, load_settings, read_client_tokens
from skr.errors import ConfigError

TOKEN = "ct-" + "7f3a9c2e" * 5


def test_the_one_token_file_still_works(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    settings = load_settings(env={"SKR_CLIENT_TOKEN_FILE": str(path)})
    assert settings.client_token == TOKEN
    assert settings.client_tokens == (("default", TOKEN),)


def test_one_named_line_accepts_the_token_and_the_whole_line(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"app:{TOKEN}")
    assert read_client_tokens(path) == (("app", TOKEN), ("default", f"app:{TOKEN}"))


def test_several_named_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"app:{TOKEN}\n\nmonitor:{'m' * 20}\n")
    settings = load_settings(env={"SKR_CLIENT_TOKEN_FILE": str(path)})
    assert settings.client_tokens == (("app", TOKEN), ("monitor", "m" * 20))
    shown = describe(settings)
    assert shown["client_token_ids"] == ["app", "monitor"] and TOKEN not in repr(shown)
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"app:{TOKEN}\nno-colon-{TOKEN}\n", "line 2"),
        (f"app:{TOKEN}\napp:{'x' * 20}\n", "twice"),
        (f"app:{TOKEN}\nshort:abc\n", "line 2"),
    ],
)
def test_a_bad_token_file_is_refused_without_showing_a_token(tmp_path, content, message):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as refused:
        read_client_tokens(path)
    assert TOKEN not in refused.value.diagnostics()
