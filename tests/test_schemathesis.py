"""Schemathesis against ``/openapi.json``: the document the sidecar serves is true of the running sidecar.

The sidecar runs on the local stack (virtual TEE, local attestation and key services) in a background
thread with its own event loop, because Schemathesis' client is synchronous. The schema is fetched from
the running sidecar's ``/openapi.json`` (so what is tested is what is served). For every operation
Schemathesis generates schema-conforming and schema-violating requests and runs its checks: no 5xx,
status codes documented, Content-Type and bodies as documented, headers as documented, schema-violating
input refused with a 4xx, unsupported methods answered 405 with ``Allow``.

Bounded: a fixed number of examples per operation, derandomized, loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, assume, settings

from skr.openapi import document
from tests.e2e import start_stack

EXAMPLES_PER_OPERATION = 25


class _StackThread:
    """The local stack in a thread with its own event loop; :meth:`stop` ends both."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="skr-stack", daemon=True
        )

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            stack = await start_stack(self._state_dir)
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            raise
        try:
            self.url = stack.info["sidecar"]
            self._ready.set()
            await self._stop.wait()
        finally:
            await stack.stop()

    def start(self) -> str:
        self._thread.start()
        if not self._ready.wait(timeout=60) or self.error is not None:
            raise RuntimeError(f"the local stack did not start: {self.error!r}")
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory) -> Iterator[str]:
    runner = _StackThread(tmp_path_factory.mktemp("stack"))
    try:
        yield runner.start()
    finally:
        runner.stop()


# The document the code builds; the fixture below proves the running sidecar serves exactly this one.
# (schemathesis.pytest.from_fixture would load it from the server, but it sets pytest's private
# Function._nodeid, which pytest 9 no longer has.)
schema = schemathesis.openapi.from_dict(document())


@pytest.fixture(scope="module")
def served(sidecar) -> str:
    answer = requests.get(sidecar + "/openapi.json", timeout=10)
    assert answer.status_code == 200 and answer.json() == document()
    url: str = sidecar
    return url


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_api_conforms_to_its_openapi_document(case, served):
    body = case.body if isinstance(case.body, dict) else {}
    # Two rules a JSON Schema pattern cannot say (the document says them in words and annotations):
    # a key URL's vault must be akv_endpoint's when both are given, and /attest/maa's runtime data must be
    # base64 of a JSON object. Random strings rarely satisfy them; tests/test_bad_input.py covers both.
    if isinstance(body.get("kid"), str) and body["kid"].startswith("https://"):
        assume(not body.get("akv_endpoint"))
    if case.path == "/attest/maa" and isinstance(body.get("runtime_data"), str):
        assume(_json_if_base64(body["runtime_data"]))
    case.call_and_validate(base_url=served, timeout=15)


def _json_if_base64(value: str) -> bool:
    """False only for standard base64 whose bytes are not a JSON object (what MAA would refuse)."""
    try:
        data = base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
    except ValueError:
        return True  # not base64: the sidecar must refuse it, so let Schemathesis check that
    try:
        return isinstance(json.loads(data.decode("utf-8"), parse_constant=float), dict)
    except (ValueError, RecursionError):
        return False
