"""The sidecar's own attestations: the wrapping-key pool and the token cache with single-flight.

Owns: the next ephemeral wrapping key, generated ahead off the event loop; one attestation token per MAA
endpoint reused while it is fresh for ``margin`` more seconds; one attestation in flight per endpoint
that concurrent requests share; and forgetting a token a vault refused so it is never handed out again.
How a token is obtained is the caller's (``mint``): this module does no I/O of its own.

Never logs a token or key; an :class:`Attestation`'s repr hides both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from skr.endpoints import Endpoint
from skr.maa.runtime import WrappingKey
from skr.maa.token import unverified_claims
from skr.metrics import Metrics
from skr.ports import Clock

#: Where an attestation came from: the cache, a new attestation, or one in flight for another request.
Source = Literal["cached", "fresh", "shared"]
#: A token for this wrapping key (attests evidence binding the key's runtime data).
Mint = Callable[[WrappingKey], Awaitable[str]]
_DEFAULT_LIFETIME = 300.0  # seconds, for a token without ``exp``


@dataclass
class Attestation:
    token: str = field(repr=False)
    key: WrappingKey = field(repr=False)
    claims: dict[str, Any]
    expires_at: float  # epoch seconds


class AttestationCache:
    """Wrapping keys and attestation tokens for one daemon (``reuse=False``: every request attests)."""

    def __init__(
        self,
        *,
        reuse: bool,
        margin: float,
        metrics: Metrics,
        clock: Clock,
        new_key: Callable[[], WrappingKey],
    ) -> None:
        self.reuse = reuse
        self.margin = margin
        self.metrics = metrics
        self.clock = clock
        self._new_key = new_key
        self.tokens: dict[str, Attestation] = {}  # by MAA authority
        self._inflight: dict[str, asyncio.Future[Attestation]] = {}
        self._next_key: asyncio.Future[WrappingKey] | None = None
        self._keys_generated = False

    # --- wrapping keys ---------------------------------------------------------------------------------

    async def start(self, first_key: concurrent.futures.Future[WrappingKey] | None = None) -> None:
        """Generate the first wrapping key (``first_key``: one already being generated)."""
        if first_key is not None and self._next_key is None:
            self._next_key = asyncio.wrap_future(first_key)
        self._prepare_key()
        assert self._next_key is not None
        await asyncio.shield(self._next_key)
        self._keys_generated = True

    @property
    def wrapping_key_ready(self) -> bool:
        """True once a wrapping key has been generated and the latest generation has not failed."""
        nxt = self._next_key
        if nxt is not None and nxt.done() and not nxt.cancelled() and nxt.exception() is not None:
            return False
        return self._keys_generated

    def _prepare_key(self) -> None:
        if self._next_key is None or (self._next_key.done() and self._next_key.exception() is not None):
            self._next_key = asyncio.ensure_future(asyncio.to_thread(self._new_key))

    async def take_key(self) -> WrappingKey:
        """A fresh wrapping key; the next one starts generating right away (off the loop)."""
        self._prepare_key()
        assert self._next_key is not None
        current = self._next_key
        self._next_key = None
        key = await current
        self._prepare_key()
        return key

    def close(self) -> None:
        for fut in self._inflight.values():
            fut.cancel()
        if self._next_key is not None:
            self._next_key.cancel()

    # --- tokens ----------------------------------------------------------------------------------------

    async def _attest(self, mint: Mint) -> Attestation:
        key = await self.take_key()
        token = await mint(key)
        claims = unverified_claims(token)
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) else self.clock.time() + _DEFAULT_LIFETIME
        return Attestation(token=token, key=key, claims=claims, expires_at=expires_at)

    def get(
        self, maa: Endpoint, mint: Mint, *, reject: str | None = None
    ) -> tuple[Source, Awaitable[Attestation]]:
        """Where an attestation token for ``maa`` comes from, and the token with its wrapping key to await:
        cached, shared with a concurrent request, or fresh from ``mint``. ``reject``: a token a vault
        refused — never hand it out again."""
        if not self.reuse:
            return "fresh", self._attest(mint)
        slot = maa.authority
        cached = self.tokens.get(slot)
        if cached is not None and reject is not None and cached.token == reject:
            del self.tokens[slot]
            cached = None
        if cached is not None and self.clock.time() < cached.expires_at - self.margin:
            self.metrics.token_cache.inc(result="hit")
            return "cached", _ready(cached)
        fut = self._inflight.get(slot)
        if fut is not None:
            self.metrics.token_cache.inc(result="shared")
            return "shared", asyncio.shield(fut)
        self.metrics.token_cache.inc(result="miss")
        fut = asyncio.ensure_future(self._attest(mint))
        self._inflight[slot] = fut

        def done(f: asyncio.Future[Attestation]) -> None:
            if self._inflight.get(slot) is f:
                del self._inflight[slot]
            if not f.cancelled() and f.exception() is None:
                self.tokens[slot] = f.result()

        fut.add_done_callback(done)
        return "fresh", asyncio.shield(fut)


async def _ready(attestation: Attestation) -> Attestation:
    return attestation
