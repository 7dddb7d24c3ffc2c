"""Prometheus metrics of design.md (prefix `sleepserve_`), on a registry of their own so that several
apps in one process (tests) never collide. The engine, scheduler and stores receive a `Metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from scheduler.metrics import LATENCY_BUCKETS, ConsolidationMetrics

# Token-gap buckets finer at the low end than the latency ones.
_GAP = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5)
_BYTES = tuple(2**p for p in range(10, 31, 2))  # 1 KiB … 1 GiB


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, "sleepserve_"
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            p + "inter_token_latency_seconds",
            "Gap between consecutive tokens of a stream.",
            buckets=_GAP,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            p + "e2e_request_latency_seconds",
            "Request arrival to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_running = Gauge(p + "requests_running", "Requests in the decode batch.", registry=r)
        self.requests_waiting = Gauge(
            p + "requests_waiting", "Requests queued for the decode batch.", registry=r
        )
        self.sessions_active = Gauge(
            p + "sessions_active", "Sessions held in this replica's store.", registry=r
        )
        self.kv_window_usage_ratio = Gauge(
            p + "kv_window_usage_ratio", "Mean fill of the running sequences' attention windows.", registry=r
        )
        self.sleep_queue_depth = Gauge(p + "sleep_queue_depth", "Consolidation jobs waiting.", registry=r)
        self.engine_step = Histogram(
            p + "engine_step_seconds",
            "Duration of an engine iteration that did work (interleaved sleep slices included), by "
            "whether it crossed a window boundary (swapped a sleep's memory in and rebuilt or, with "
            "stale-kv, moved windows).",
            ["boundary"],
            buckets=_GAP,
            registry=r,
        )
        self.output_handoff = Histogram(
            p + "output_handoff_seconds",
            "Time from the engine handing a step's outputs to the event loop until the loop runs them: "
            "how long the loop waited for a core or the GIL.",
            buckets=_GAP,
            registry=r,
        )
        self.decode_batch_size = Histogram(
            p + "decode_batch_size",
            "Sequences stepped together per engine iteration.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens fed to the model.", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            p + "request_success", "Finished requests by reason.", ["finished_reason"], registry=r
        )
        consolidation = ConsolidationMetrics(r, p)  # the same definitions `sleepserve worker` exports
        self.sleep_duration = consolidation.sleep_duration
        self.sleep_passes = consolidation.sleep_passes
        self.sleep_tokens = consolidation.sleep_tokens
        self.sleep_deadline_misses = Counter(
            p + "sleep_deadline_misses",
            "Consolidations that finished after their deadline, or once their session waited for them.",
            registry=r,
        )
        self.sleep_rolling_passes = Counter(
            p + "sleep_rolling_passes",
            "Passes of interleaved sleep over its rolling batch, by what ran them: the decode thread, or "
            "(offload) the sleeper process.",
            ["runner"],
            registry=r,
        )
        self.sleeper_restarts = Counter(
            p + "sleeper_restarts",
            "Sleeper processes (process, offload) that died and were started anew.",
            registry=r,
        )
        self.decode_stall = Histogram(
            p + "decode_stall_seconds",
            "Time a session's decode waited for its own sleep.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.session_state_bytes = Histogram(
            p + "session_state_bytes", "Size of stored session blobs.", buckets=_BYTES, registry=r
        )
        self.store_operation = Histogram(
            p + "store_operation_seconds",
            "Session store operations.",
            ["op", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            p + "store_errors", "Session store operations that failed.", ["op", "backend"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
