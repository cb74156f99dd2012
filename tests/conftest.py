"""Shared fixtures. Genuine vectors are read from ../shared/testvectors (override: SKR_TESTVECTORS)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

_DEFAULT_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors"


def testvectors_dir() -> Path:
    return Path(os.environ.get("SKR_TESTVECTORS", str(_DEFAULT_VECTORS)))


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The genuine test-vector folder; tests that need it skip (with the reason) only when it is absent."""
    path = testvectors_dir()
    if not (path / "MANIFEST.md").is_file():
        pytest.skip(f"genuine test vectors not found at {path} (set SKR_TESTVECTORS)")
    return path


@pytest.fixture(scope="session")
def expected(vectors: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((vectors / "EXPECTED.json").read_text())
    return data
