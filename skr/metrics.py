"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Owns counters and histograms with labels and their rendering. Label values are ours (routes,
outcomes, services, status codes) — never key ids, tokens or anything a caller controls verbatim.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = (*labels, *extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple((n, str(labels[n])) for n in self.labelnames)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple((n, str(labels[n])) for n in self.labelnames), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_fmt_labels(key)} {_fmt(value)}"


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = tuple((n, str(labels[n])) for n in self.labelnames)
        with self._lock:
            self._values[key] = value


class Histogram:
    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[Labels, tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple((n, str(labels[n])) for n in self.labelnames)
        with self._lock:
            counts, sums = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            counts[-1] += 1
            sums[0] += value

    def count(self, **labels: str) -> int:
        data = self._data.get(tuple((n, str(labels[n])) for n in self.labelnames))
        return data[0][-1] if data else 0

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for key, (counts, sums) in sorted(self._data.items()):
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                yield f"{self.name}_bucket{_fmt_labels(key, (('le', _fmt(bound)),))} {n}"
            yield f"{self.name}_sum{_fmt_labels(key)} {_fmt(sums[0])}"
            yield f"{self.name}_count{_fmt_labels(key)} {counts[-1]}"


class Metrics:
    """The sidecar's metrics."""

    def __init__(self, version: str) -> None:
        self.build_info = Gauge("skr_build_info", "skr build information.", ("version",))
        self.build_info.set(1, version=version)
        self.http_requests = Counter(
            "skr_http_requests_total", "HTTP requests by route and status.", ("route", "status")
        )
        self.http_duration = Histogram(
            "skr_http_request_duration_seconds", "HTTP request latency.", ("route",)
        )
        self.releases = Counter("skr_key_releases_total", "Key release decisions.", ("outcome",))
        self.attestations = Counter(
            "skr_attestations_total", "Attestations performed with MAA.", ("outcome",)
        )
        self.token_cache = Counter("skr_token_cache_total", "Attestation token cache lookups.", ("result",))
        self.upstream_calls = Counter(
            "skr_upstream_requests_total", "Upstream calls by service.", ("service",)
        )
        self.upstream_wait = Histogram(
            "skr_upstream_wait_seconds", "Time spent waiting on upstreams.", ("service",)
        )
        self.evidence = Counter("skr_evidence_reports_total", "Hardware reports fetched.", ("outcome",))
        self.grpc_requests = Counter(
            "skr_grpc_requests_total",
            "gRPC key-provider calls by method and status code.",
            ("method", "code"),
        )

    def render(self) -> str:
        """Every metric above, in the order defined."""
        return "\n".join(line for metric in vars(self).values() for line in metric.render()) + "\n"
