"""Fault plans for the local services: make upstreams misbehave on purpose, and count their requests.

A plan is a list of rules. Each rule names routes (``service.route`` names with ``*`` globs, e.g.
``hsm.release``, ``maa.*``), an action, and when it fires: the first ``times`` matching requests, or at
``rate`` (a probability, from a seeded generator so runs repeat), or always.

Actions:
- ``status``: answer with that HTTP status (e.g. 429 with ``retry_after``, 500, 502, 503) in the
  service's error shape;
- ``delay``: add ``seconds`` before handling (cumulative with other rules; 20 ms models a remote cloud,
  3600 s a hanging upstream);
- ``reset``: drop the connection without an answer;
- ``malformed``: answer 200 with a body that is not JSON;
- ``mutate``: let the request through but have the service corrupt its answer the named way
  (``truncate_jws``, ``resign_jws``, ``wrong_issuer``, ``expired_cert``); the service asks
  :meth:`FaultPlan.mutations_for` while building its response.

Delays add up and mutations combine, but a request gets at most one answer (``status``, ``reset``,
``malformed``): the first answer rule that fires; later answer rules are not consumed, so answer rules
with ``times`` form a sequence (e.g. 500 once, then 502 once, then 429 once).

File format (``skr local --faults FILE``)::

    {"seed": 7, "rules": [
        {"route": "hsm.release", "action": "status", "status": 503, "times": 2, "retry_after": 0.1},
        {"route": "*", "action": "delay", "seconds": 0.02},
        {"route": "maa.attest", "action": "mutate", "mutation": "wrong_issuer", "times": 1}]}

The plan also counts every request per route, which benchmarks and tests read.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import random
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from skr.errors import ConfigError
from skr.local.kit import azure_error

ACTIONS = ("status", "delay", "reset", "malformed", "mutate")
MUTATIONS = ("truncate_jws", "resign_jws", "wrong_issuer", "expired_cert")
_MUTATIONS_KEY: web.RequestKey[frozenset[str]] = web.RequestKey("skr.faults.mutations", frozenset)


@dataclass
class FaultRule:
    route: str
    action: str
    status: int = 503
    seconds: float = 0.0
    retry_after: float | None = None
    mutation: str | None = None
    times: int | None = None  # fire on the first N matching requests; None = no limit
    rate: float | None = None  # probability per matching request; None = always (within times)
    fired: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"fault action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.action == "mutate" and self.mutation not in MUTATIONS:
            raise ConfigError(f"fault mutation must be one of {', '.join(MUTATIONS)}, got {self.mutation!r}")
        if self.action == "status" and not 400 <= self.status <= 599:
            raise ConfigError(f"fault status must be an HTTP error status, got {self.status}")
        if self.rate is not None and not 0.0 <= self.rate <= 1.0:
            raise ConfigError("fault rate must be between 0 and 1")
        if self.seconds < 0 or (self.times is not None and self.times < 0):
            raise ConfigError("fault seconds and times must not be negative")


class FaultPlan:
    """Decides, per request, which faults apply; counts requests per route. Thread-safe."""

    def __init__(self, rules: Sequence[FaultRule] = (), *, seed: int = 0) -> None:
        self.rules = list(rules)
        self._random = random.Random(seed)  # noqa: S311 - reproducible fault injection, not cryptography
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> FaultPlan:
        rules_doc = doc.get("rules", [])
        if not isinstance(rules_doc, list):
            raise ConfigError("a fault plan needs a list under 'rules'")
        rules = []
        known = set(FaultRule.__dataclass_fields__) - {"fired"}
        for i, item in enumerate(rules_doc):
            if not isinstance(item, dict) or "route" not in item or "action" not in item:
                raise ConfigError(f"fault rule {i} needs 'route' and 'action'")
            unknown = set(item) - known
            if unknown:
                raise ConfigError(f"fault rule {i} has unknown fields {sorted(unknown)}")
            try:
                rules.append(FaultRule(**item))
            except TypeError as exc:
                raise ConfigError(f"fault rule {i}: {exc}") from None
        seed = doc.get("seed", 0)
        return cls(rules, seed=seed if isinstance(seed, int) else 0)

    @classmethod
    def load(cls, path: Path) -> FaultPlan:
        try:
            doc = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the fault plan {path}: {exc.strerror}") from None
        except ValueError:
            raise ConfigError(f"the fault plan {path} is not JSON") from None
        if not isinstance(doc, dict):
            raise ConfigError("a fault plan is a JSON object")
        return cls.from_dict(doc)

    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self.rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _fires(self, rule: FaultRule) -> bool:
        if rule.times is not None and rule.fired >= rule.times:
            return False
        if rule.rate is not None and self._random.random() >= rule.rate:
            return False
        rule.fired += 1
        return True

    def decide(self, route: str) -> tuple[float, FaultRule | None, frozenset[str]]:
        """For one request: total added delay, the terminal rule that fires (if any), mutations."""
        delay, terminal, mutations = 0.0, None, set()
        with self._lock:
            self.requests[route] += 1
            for rule in self.rules:
                if not fnmatch.fnmatchcase(route, rule.route):
                    continue
                if terminal is not None and rule.action not in ("delay", "mutate"):
                    continue  # one answer per request: later answer rules keep their turn (a sequence)
                if not self._fires(rule):
                    continue
                self.injected[f"{route}:{rule.action}"] += 1
                if rule.action == "delay":
                    delay += rule.seconds
                elif rule.action == "mutate":
                    assert rule.mutation is not None
                    mutations.add(rule.mutation)
                elif terminal is None:
                    terminal = rule
        return delay, terminal, frozenset(mutations)

    async def before(self, route: str, request: web.Request) -> web.StreamResponse | None:
        """Called by a local service before it handles ``request``; a response means "answer this"."""
        delay, rule, mutations = self.decide(route)
        request[_MUTATIONS_KEY] = mutations
        if delay:
            await asyncio.sleep(delay)
        if rule is None:
            return None
        if rule.action == "reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never delivered: the connection is gone
        if rule.action == "malformed":
            return web.Response(status=200, text='{"value": "truncated', content_type="application/json")
        headers = {"Retry-After": f"{rule.retry_after:g}"} if rule.retry_after is not None else None
        return azure_error(
            rule.status, "InjectedFault", f"fault plan answered {rule.status}", headers=headers
        )

    @staticmethod
    def mutations_for(request: web.Request) -> frozenset[str]:
        """The answer corruptions chosen for this request by :meth:`before`."""
        chosen: frozenset[str] = request.get(_MUTATIONS_KEY, frozenset())
        return chosen

    def count(self, pattern: str = "*") -> int:
        with self._lock:
            return sum(n for route, n in self.requests.items() if fnmatch.fnmatchcase(route, pattern))

    def scoped(self, service: str) -> ScopedFaults:
        """The view one service gets: its route names are prefixed with ``service.``."""
        return ScopedFaults(self, service)


@dataclass(frozen=True)
class ScopedFaults:
    plan: FaultPlan
    service: str

    async def before(self, route: str, request: web.Request) -> web.StreamResponse | None:
        return await self.plan.before(f"{self.service}.{route}", request)

    def mutations_for(self, request: web.Request) -> frozenset[str]:
        return self.plan.mutations_for(request)
