"""The release use case in memory: fake ports, no sockets, no subprocess (python-tuf's simulator style).

What is specified here: the attestation-token cache (hit, miss, expiry margin), single-flight per MAA
endpoint, the retry after a vault refuses a *reused* token (and no retry for a fresh one), the request
deadline, and the audit record each outcome leaves. The real clients and the real release JWS are covered
end to end (tests/test_e2e_sidecar.py, tests/test_audit_e2e.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from skr import __version__
from skr.akv.keywrap import Enc
from skr.akv.release import ReleaseResult
from skr.audit import token_fingerprint
from skr.config import Settings
from skr.endpoints import Endpoint, KeyRef, parse_endpoint
from skr.errors import BadRequest, ReleaseDenied, UpstreamTimeout
from skr.evidence.base import Evidence
from skr.maa.runtime import WrappingKey
from skr.metrics import Metrics
from skr.ports import ReleasedKeyResult
from skr.service import ReleaseService, RequestContext
from skr.upstream import Deadline

pytestmark = pytest.mark.unit

MAA = "shared.eus.attest.azure.net"
VAULT = "myvault.vault.azure.net"
HOST_DATA = "ab" * 32
MEASUREMENT = "cd" * 48


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class FakeClock:
    now: float = 1_700_000_000.0
    mono: float = 100.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


@dataclass
class FakeTee:
    name: str = "fake"
    collected: list[bytes] = field(default_factory=list)

    async def collect(self, report_data: bytes) -> Evidence:
        self.collected.append(report_data)
        return Evidence(report=bytes(1184), vcek_chain_pem=b"", provider=self.name)

    async def aclose(self) -> None:
        return None


@dataclass
class FakeMaa:
    """Issues ``t1``, ``t2``... valid for ``lifetime`` s of the fake clock; ``gate`` holds every call."""

    clock: FakeClock
    lifetime: float = 3600.0
    gate: asyncio.Event | None = None
    issued: list[str] = field(default_factory=list)

    async def attest(
        self, endpoint: Endpoint, evidence: Evidence, runtime_data: bytes, *, deadline: Deadline | None = None
    ) -> str:
        assert endpoint == parse_endpoint(MAA) and json.loads(runtime_data)["keys"]
        if self.gate is not None:
            await self.gate.wait()
        jti = f"t{len(self.issued) + 1}"
        claims = {
            "jti": jti,
            "exp": self.clock.now + self.lifetime,
            "x-ms-sevsnpvm-hostdata": HOST_DATA,
            "x-ms-sevsnpvm-launchmeasurement": MEASUREMENT,
        }
        token = ".".join(_b64url(json.dumps(part).encode()) for part in ({"alg": "none"}, claims)) + ".sig"
        self.issued.append(token)
        return token


@dataclass
class FakeVault:
    """Releases to any token but those in ``refused``; the JWS names the token it was released to."""

    refused: set[str] = field(default_factory=set)
    refuse_all: bool = False
    seen: list[str] = field(default_factory=list)

    async def release(
        self,
        ref: KeyRef,
        target_token: str,
        *,
        access_token: str | None = None,
        enc: Enc = Enc.CKM_RSA_AES_KEY_WRAP,
        deadline: Deadline | None = None,
    ) -> ReleaseResult:
        self.seen.append(target_token)
        if self.refuse_all or target_token in self.refused:
            raise ReleaseDenied(
                f"Key Vault {ref.vault.url} refused to release {ref.kid}: HTTP 403 Forbidden",
                upstream_status=403,  # as the real releaser reports the vault's answer
            )
        return ReleaseResult(jws=f"jws:{target_token}", vault_url=ref.vault.url, name=ref.name, version=None)


def open_fake(jws: str, ref: KeyRef, key: WrappingKey) -> ReleasedKeyResult:
    """Opens what :class:`FakeVault` released (the real opener is covered end to end)."""
    assert jws.startswith("jws:") and key.kid
    return ReleasedKeyResult(key_json='{"kty":"oct"}', key_id=str(ref), version="0" * 32)


@dataclass
class FakeAudit:
    instance: str = "test-instance"
    head: tuple[int, str] = (7, "0" * 64)
    records: list[dict[str, Any]] = field(default_factory=list)

    async def append(self, fields: Mapping[str, Any]) -> Mapping[str, Any]:
        self.records.append(dict(fields))
        return fields


@dataclass
class World:
    service: ReleaseService
    clock: FakeClock
    maa: FakeMaa
    vault: FakeVault
    audit: FakeAudit

    async def release(
        self, request_id: str = "r", kid: str = "k"
    ) -> tuple[ReleasedKeyResult, RequestContext]:
        ctx = RequestContext(request_id=request_id, client="127.0.0.1")
        result = await self.service.release(
            kid=kid, maa_endpoint=None, akv_endpoint=None, access_token=None, ctx=ctx
        )
        return result, ctx


@pytest.fixture
def world(wrapping_key: WrappingKey) -> World:
    return make_world(wrapping_key)


def make_world(wrapping_key: WrappingKey, *, deadline: float = 30.0) -> World:
    clock = FakeClock()
    maa, vault, audit = FakeMaa(clock), FakeVault(), FakeAudit()
    settings = Settings(
        maa_endpoint=parse_endpoint(MAA), akv_endpoint=parse_endpoint(VAULT), request_deadline=deadline
    )
    service = ReleaseService(
        settings,
        provider=FakeTee(),
        maa=maa,
        releaser=vault,
        audit=audit,
        metrics=Metrics(__version__),
        opener=open_fake,
        clock=clock,
        new_key=lambda: WrappingKey(wrapping_key.private_key),
    )
    return World(service, clock, maa, vault, audit)


async def test_a_second_release_reuses_the_cached_token(world: World) -> None:
    _, first = await world.release("r1")
    result, second = await world.release("r2")
    assert (first.attestation, second.attestation) == ("fresh", "cached")
    assert len(world.maa.issued) == 1 and world.vault.seen == world.maa.issued * 2
    assert result.expires_at == world.clock.now + 3600


async def test_a_token_within_the_margin_of_its_expiry_is_not_reused(world: World) -> None:
    await world.release("r1")
    world.clock.now += 3600 - world.service.settings.token_margin  # exactly at the margin: stale
    _, ctx = await world.release("r2")
    assert ctx.attestation == "fresh" and len(world.maa.issued) == 2


async def test_fifty_concurrent_releases_share_one_attestation(world: World) -> None:
    world.maa.gate = asyncio.Event()
    releases = [asyncio.create_task(world.release(f"r{i}")) for i in range(50)]
    await asyncio.sleep(0.01)
    world.maa.gate.set()
    done = await asyncio.gather(*releases)
    assert len(world.maa.issued) == 1
    assert sorted(ctx.attestation or "" for _, ctx in done) == ["fresh"] + ["shared"] * 49
    assert world.vault.seen == world.maa.issued * 50


async def test_a_reused_token_the_vault_refuses_is_replaced_once(world: World) -> None:
    await world.release("r1")
    (t1,) = world.maa.issued
    world.vault.refused.add(t1)  # e.g. the key's release policy changed since t1 was issued
    await world.release("r2")
    t2 = world.maa.issued[1]
    assert world.vault.seen == [t1, t1, t2]
    assert world.service.attestations.tokens[parse_endpoint(MAA).authority].token == t2
    assert world.audit.records[-1]["outcome"] == "granted"
    assert world.audit.records[-1]["token_sha256"] == token_fingerprint(t2)


async def test_a_fresh_token_the_vault_refuses_is_not_retried(world: World) -> None:
    world.vault.refuse_all = True
    with pytest.raises(ReleaseDenied):
        await world.release("r1")
    assert len(world.maa.issued) == 1 and len(world.vault.seen) == 1
    assert world.audit.records[-1]["outcome"] == "denied"


async def test_a_slow_attester_ends_at_the_request_deadline(wrapping_key: WrappingKey) -> None:
    world = make_world(wrapping_key, deadline=0.05)
    world.maa.gate = asyncio.Event()  # never set
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"0\.05 s request deadline"):
        await world.release("r1")
    assert 0.04 <= time.monotonic() - started < 0.5
    assert world.vault.seen == []
    assert world.audit.records[-1]["error_code"] == "upstream_timeout"


async def test_a_granted_release_leaves_this_audit_record(world: World) -> None:
    await world.release("r1")  # the fake monotonic clock does not move: duration 0
    token = world.maa.issued[0]
    assert world.audit.records == [
        {
            "event": "key.release",
            "request_id": "r1",
            "client": "127.0.0.1",
            "kid": "k",
            "identity": "managed",
            "client_token_id": None,
            "maa": MAA,
            "vault": VAULT,
            "maa_jti": "t1",
            "token_sha256": token_fingerprint(token),
            "host_data": HOST_DATA,
            "measurement": MEASUREMENT,
            "key_version": "0" * 32,
            "outcome": "granted",
            "attestation": "fresh",
            "duration_ms": 0.0,
        }
    ]


async def test_a_denied_release_records_the_refused_token_and_why(world: World) -> None:
    world.vault.refuse_all = True
    with pytest.raises(ReleaseDenied):
        await world.release("r1")
    (record,) = world.audit.records
    assert record["outcome"] == "denied" and record["error_code"] == "release_denied"
    assert record["token_sha256"] == token_fingerprint(world.maa.issued[0])
    assert record["upstream_status"] == 403 and "refused to release k" in record["reason"]
    assert "key_version" not in record and record["attestation"] == "fresh"


async def test_a_bad_kid_is_recorded_before_any_upstream_is_named(world: World) -> None:
    with pytest.raises(BadRequest, match="kid"):
        await world.release("r1", kid="bad_name")
    (record,) = world.audit.records
    assert record["outcome"] == "error" and record["error_code"] == "invalid_kid"
    assert {"maa", "vault", "token_sha256", "key_version"}.isdisjoint(record)
    assert world.maa.issued == [] and world.vault.seen == []
