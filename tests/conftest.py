"""Shared fixtures. Genuine vectors are read from ../shared/testvectors (override: SKR_TESTVECTORS)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# Property tests are reproducible by default: the same examples on every machine, no wall-clock deadline
# (a slow CI machine is not a bug), no example database. HYPOTHESIS_PROFILE=explore draws new examples.
settings.register_profile("skr", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "skr"))
# Hypothesis' caches (constants, unicode data) go to the temp dir, never into the checkout.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"skr-hypothesis-{os.getuid()}")

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


# --- one local stack with its sidecar per test module (tests/e2e.py), for the modules that use `env` ------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """``(stack, client)``: the whole local stack and an HTTP client of its sidecar, shared by a module."""
    from tests.e2e import stack_session

    async for stack, client in stack_session(tmp_path_factory.mktemp("stack")):
        yield stack, client


# --- the local key-vault stack (tests/kvstack.py), shared by the Key Vault, identity and CLI tests ------


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.kvstack import make_ca

    return make_ca(tmp_path_factory)


@pytest.fixture(scope="session")
def tee(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.kvstack import make_tee

    return make_tee(tmp_path_factory)


@pytest.fixture(scope="session")
def wrapping_key() -> Any:
    from skr.maa.runtime import WrappingKey

    return WrappingKey.generate()


@pytest.fixture
async def stack(ca: Any, tee: Any, tmp_path: Path) -> AsyncIterator[Any]:
    from tests.kvstack import running_stack

    async with running_stack(ca, tee, tmp_path) as s:
        yield s


@pytest.fixture
def imds_env(monkeypatch: pytest.MonkeyPatch, stack: Any) -> None:
    from tests.kvstack import point_imds_at

    point_imds_at(monkeypatch, stack.identity_url)


# --- markers: unit (in process, no sockets), e2e (local services over HTTPS), process (skr as a child
# process), chart (Helm chart, Dockerfile, ACI template). `make unit-fast` runs `-m unit`; `make test` all.
# A test file not named here is a unit test file; a test may still carry its own marker.
_FILE_MARKERS: dict[str, str] = {
    "test_aci_template.py": "chart",
    "test_chart.py": "chart",
    "test_dockerfile.py": "chart",
    "test_cli_audit.py": "process",
    "test_cli_daemon.py": "process",
    "test_cli_keys.py": "process",
    "test_cli_policy.py": "process",
    "test_cli_report.py": "process",
    "test_crash_safety.py": "process",
    "test_examples.py": "process",
    "test_shutdown.py": "process",
    "test_akv_release.py": "e2e",
    "test_bad_input.py": "e2e",
    "test_collateral.py": "e2e",
    "test_e2e_sidecar.py": "e2e",
    "test_faults_e2e.py": "e2e",
    "test_http_faults.py": "e2e",
    "test_identity.py": "e2e",
    "test_local_attestation.py": "e2e",
    "test_local_ca.py": "e2e",
    "test_local_hsm.py": "e2e",
    "test_local_identity.py": "e2e",
    "test_maa_client.py": "e2e",
    "test_maa_token.py": "e2e",
    "test_schemathesis.py": "e2e",
    "test_security.py": "e2e",
    "test_encfs_aci.py": "chart",
    "test_encfs_chart.py": "chart",
    "test_encfs_dockerfile.py": "chart",
    "test_audit_checkpoints.py": "process",
    "test_audit_writer.py": "process",
    "test_cli_doctor.py": "process",
    "test_encfs_azurite.py": "process",
    "test_encfs_image.py": "process",
    "test_encfs_luks2.py": "process",
    "test_grpc_serve.py": "process",
    "test_hostile_clients.py": "process",
    "test_keyprovider_cmd.py": "process",
    "test_access_token_rejected.py": "e2e",
    "test_audit_runtime.py": "e2e",
    "test_cli_keys_policy.py": "e2e",
    "test_keyprovider_image_key.py": "e2e",
    "test_audit_e2e.py": "e2e",
    "test_audit_settings.py": "e2e",
    "test_grpc.py": "e2e",
    "test_hostile_upstreams.py": "e2e",
    "test_keyprovider_release.py": "e2e",
    "test_unwrap.py": "e2e",
    "test_uvm_endorsement.py": "e2e",
}
_KINDS = frozenset({"unit", "e2e", "process", "chart"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(mark.name in _KINDS for mark in item.iter_markers()):
            item.add_marker(getattr(pytest.mark, _FILE_MARKERS.get(item.path.name, "unit")))
