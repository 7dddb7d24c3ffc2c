"""The consolidation metrics both the server and `sleepserve worker` export, defined once so that their
names, help texts and buckets agree (Prometheus sums them across processes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PASSES_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


class ConsolidationMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str = "sleepserve_") -> None:
        self.sleep_duration = Histogram(
            prefix + "sleep_duration_seconds",
            "Wall time of one consolidation.",
            ["trigger"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.sleep_passes = Histogram(
            prefix + "sleep_passes",
            "Passes N used per consolidation.",
            buckets=PASSES_BUCKETS,
            registry=registry,
        )
        self.sleep_tokens = Counter(
            prefix + "sleep_tokens", "Tokens consolidated into fast weights.", registry=registry
        )
