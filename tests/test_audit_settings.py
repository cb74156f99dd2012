"""The checkpoint settings: flags > environment > defaults (60 s, 1000 records)."""

from __future__ import annotations

import argparse

import pytest

from skr.config import add_arguments, load_settings
from skr.errors import ConfigError


def test_checkpoint_defaults():
    settings = load_settings(env={})
    assert (settings.audit_checkpoint_interval, settings.audit_checkpoint_records) == (60.0, 1000)


def test_checkpoint_settings_from_the_environment_and_flags():
    env = {"SKR_AUDIT_CHECKPOINT_INTERVAL": "5", "SKR_AUDIT_CHECKPOINT_RECORDS": "0"}
    settings = load_settings(env=env)
    assert (settings.audit_checkpoint_interval, settings.audit_checkpoint_records) == (5.0, 0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--audit-checkpoint-interval", "2.5", "--audit-checkpoint-records", "7"])
    settings = load_settings(args, env)
    assert (settings.audit_checkpoint_interval, settings.audit_checkpoint_records) == (2.5, 7)


@pytest.mark.parametrize(
    "env",
    [{"SKR_AUDIT_CHECKPOINT_INTERVAL": "soon"}, {"SKR_AUDIT_CHECKPOINT_RECORDS": "1.5"}],
)
def test_bad_checkpoint_settings_are_refused(env):
    with pytest.raises(ConfigError):
        load_settings(env=env)
