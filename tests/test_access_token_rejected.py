"""A vault that rejects the access token (401) answers ``access_token_rejected``, not ``release_denied``."""

from __future__ import annotations

import pytest

from skr.endpoints import KeyRef
from skr.errors import ReleaseDenied
from skr.server import http_status
from tests import test_akv_release

releaser = test_akv_release.releaser  # the fixture: a KeyVaultReleaser on the local stack


async def test_a_rejected_access_token_has_its_own_code(stack, releaser):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy())
    wrong_audience = stack.bearer("https://vault.azure.net")
    with pytest.raises(ReleaseDenied) as info:
        await releaser.release(KeyRef.parse("k", vault=stack.hsm_host), "t.t.t", access_token=wrong_audience)
    assert info.value.code == "access_token_rejected" and http_status(info.value) == 403
    assert "HTTP 401" in info.value.message and "access token was rejected" in (info.value.hint or "")
    assert wrong_audience not in info.value.diagnostics()


async def test_a_policy_denial_stays_release_denied(stack, releaser, wrapping_key):
    await stack.hsm.create_key("k", kty="oct-HSM", release_policy=stack.policy(host_data="00" * 32))
    with pytest.raises(ReleaseDenied) as info:
        await releaser.release(
            KeyRef.parse("k", vault=stack.hsm_host),
            await stack.target_token(wrapping_key),
            access_token=stack.bearer(),
        )
    assert info.value.code == "release_denied" and http_status(info.value) == 403
