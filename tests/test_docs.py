"""The README stays true: every route, error code, flag and environment variable is documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from skr.config import add_arguments
from skr.errors import Code
from skr.server import ROUTES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SOURCES = [p.read_text() for p in (ROOT / "skr").rglob("*.py")]


def test_quick_start_shows_the_two_commands():
    assert "make run" in README and "make test" in README


def test_every_route_is_documented():
    for _method, path, _handler in ROUTES:
        assert f"`{path}`" in README, path


def _troubleshooting_rows() -> set[str]:
    """The codes named in the first column of the troubleshooting table."""
    section = README.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = (line.split("|")[1] for line in section.splitlines() if line.startswith("|"))
    return {code for cell in rows for code in re.findall(r"`([a-z][a-z0-9_]*)`", cell)}


def test_every_error_code_has_a_troubleshooting_row():
    missing = {code.value for code in Code} - _troubleshooting_rows()
    assert not missing, f"error codes without a troubleshooting row: {sorted(missing)}"


def test_every_troubleshooting_row_names_an_error_code():
    unknown = _troubleshooting_rows() - {code.value for code in Code}
    assert not unknown, f"troubleshooting rows for codes skr never raises: {sorted(unknown)}"


def test_error_codes_are_enum_members_not_strings_at_raise_sites():
    for text in SOURCES:
        assert not re.findall(r'\bcode="[a-z][a-z0-9_]*"', text)
        assert not re.findall(r'default_code(?:: ClassVar\[str\])? = "', text)


def test_every_daemon_flag_is_in_the_configuration_table():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {
        opt for action in parser._actions for opt in action.option_strings if opt not in ("-h", "--help")
    }
    missing = {f for f in flags if f"`{f}" not in README}
    assert not missing, sorted(missing)


def test_every_environment_variable_is_in_the_configuration_table():
    config = (ROOT / "skr" / "config.py").read_text()
    names = set(re.findall(r'pick\("[a-z_]+", ((?:"[A-Za-z_]+"(?:, )?)+)\)', config))
    env = {n for group in names for n in re.findall(r'"([A-Za-z_]+)"', group)} | {"SkrSideCarArgs"}
    assert len(env) > 20
    missing = {n for n in env if f"`{n}`" not in README}
    assert not missing, sorted(missing)
