"""Pure statistics for the serving benchmark (no I/O): per-request records, percentiles, goodput,
arrival times, context-length buckets and per-turn / per-bucket summaries.

Metric definitions follow `vllm bench serve`: TTFT = first content chunk − send; ITL = gaps between
successive content chunks, pooled over requests; TPOT = (E2EL − TTFT)/(output tokens − 1);
E2EL = last content chunk − send. Only successful requests enter latency statistics.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLEEP_FIELDS = ("consolidated_tokens", "sleep_passes", "sleep_seconds")


@dataclass
class RequestRecord:
    """What the client measured for one streamed request (times in seconds)."""

    success: bool = False
    error: str = ""
    start_s: float = 0.0  # send time, relative to the start of the benchmark
    ttft_s: float = 0.0
    e2el_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage: dict[str, Any] | None = None
    text: str = ""
    session_id: str | None = None
    turn: int | None = None
    context_tokens: int | None = None  # session tokens before this turn (multi-turn mode)

    @property
    def tpot_s(self) -> float | None:
        """(E2EL − TTFT)/(output tokens − 1); None with fewer than two output tokens."""
        if self.completion_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.completion_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with times in milliseconds."""
        tpot = self.tpot_s
        return {
            "success": self.success,
            "error": self.error,
            "start_ms": self.start_s * 1e3,
            "ttft_ms": self.ttft_s * 1e3,
            "tpot_ms": None if tpot is None else tpot * 1e3,
            "e2el_ms": self.e2el_s * 1e3,
            "itl_ms": [g * 1e3 for g in self.itl_s],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usage": self.usage,
            "session_id": self.session_id,
            "turn": self.turn,
            "context_tokens": self.context_tokens,
            "text": self.text,
        }


def spread_itl(chunk_gaps: Sequence[float], completion_tokens: int) -> list[float]:
    """Per-token inter-token latencies from the gaps between content chunks.

    Each content chunk counts as one token (vLLM's per-chunk ITL). When usage reports more completion
    tokens than chunks, some chunks carried several tokens but the stream does not say which: the
    surplus decode tokens are dealt out evenly over the gaps (earlier gaps first when it does not
    divide), and each gap is split into equal parts, one per token it carried — SGLang's
    `chunk_gap / num_new_tokens` adjustment with the per-chunk counts estimated. The sum of the ITLs
    stays E2EL − TTFT, so mean ITL ≈ TPOT.
    """
    n = len(chunk_gaps)
    decode_tokens = completion_tokens - 1
    if n == 0 or decode_tokens <= n:
        return list(chunk_gaps)
    base, extra = divmod(decode_tokens, n)
    out: list[float] = []
    for i, gap in enumerate(chunk_gaps):
        k = base + (1 if i < extra else 0)
        out.extend([gap / k] * k)
    return out


def metric_values_ms(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """All values of `metric` (ttft, tpot, itl, e2el) in ms over the successful records; ITL pooled."""
    ok = [r for r in records if r.success]
    if metric == "itl":
        return [g * 1e3 for r in ok for g in r.itl_s]
    if metric == "tpot":
        return [t * 1e3 for r in ok if (t := r.tpot_s) is not None]
    return [getattr(r, f"{metric}_s") * 1e3 for r in ok]


def metric_stats(
    metric: str, values_ms: Sequence[float], percentiles: Sequence[float]
) -> dict[str, float | None]:
    """mean/median/std/p<p> of `values_ms` under vLLM's key names (`p99_itl_ms`); None when empty."""
    arr = np.asarray(values_ms, dtype=float)
    empty = arr.size == 0
    out: dict[str, float | None] = {
        f"mean_{metric}_ms": None if empty else float(arr.mean()),
        f"median_{metric}_ms": None if empty else float(np.median(arr)),
        f"std_{metric}_ms": None if empty else float(arr.std()),
    }
    for p in percentiles:
        out[f"p{p:g}_{metric}_ms"] = None if empty else float(np.percentile(arr, p))
    return out


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` → `{"ttft": 200.0, "tpot": 50.0}` (SLOs in ms for ttft/tpot/e2el)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"bad --goodput item {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
        slos[name] = float(value)
        if slos[name] < 0:
            raise ValueError(f"bad --goodput item {item!r}: SLO must be >= 0")
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """True when the request succeeded and meets every SLO (TPOT counts as 0 for one-token outputs)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft_s * 1e3, "tpot": (record.tpot_s or 0.0) * 1e3, "e2el": record.e2el_s * 1e3}
    return all(values[name] <= limit for name, limit in slos.items())


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most successful requests in flight at once (sweep over [start, start + E2EL))."""
    events = sorted(
        [(r.start_s, 1) for r in records if r.success]
        + [(r.start_s + r.e2el_s, -1) for r in records if r.success]
    )
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    goodput: dict[str, float] | None = None,
    percentiles: Sequence[float] = (90, 99),
) -> dict[str, Any]:
    """The `vllm bench serve` summary of a run, as a plain dict (latencies in ms)."""
    ok = [r for r in records if r.success]

    def per_s(x: float) -> float:
        return x / duration_s if duration_s > 0 else 0.0

    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.completion_tokens for r in ok)
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(ok)),
        "request_goodput": per_s(sum(meets_slos(r, goodput) for r in ok)) if goodput else None,
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
        "max_concurrent_requests": peak_concurrency(ok),
        "errors": dict(Counter(r.error for r in records if not r.success)),
    }
    for metric in METRICS:
        out.update(metric_stats(metric, metric_values_ms(ok, metric), percentiles))
    return out


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from start) of `n` requests, like `vllm bench serve`.

    Inter-arrival gaps are gamma(shape=burstiness, scale=1/(rate·burstiness)): burstiness 1 is a
    Poisson process, < 1 burstier, > 1 more regular. The cumulative times are rescaled so the last
    lands at exactly n/rate (vLLM does this to stabilise throughput across seeds). `rate=inf` sends
    everything at t=0.
    """
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n))
    if n and times[-1] > 0:
        times *= (n / rate) / times[-1]
    return [float(t) for t in times]


def parse_buckets(spec: str) -> list[int] | None:
    """`pow2` → None (powers of two); `0,512,1024` → sorted bucket edges."""
    if spec.strip() == "pow2":
        return None
    edges = sorted({int(x) for x in spec.split(",") if x.strip()})
    if not edges or edges[0] < 0:
        raise ValueError(f"bad --context-buckets {spec!r}: expected 'pow2' or comma-separated edges >= 0")
    return edges


def context_bucket(tokens: int, edges: Sequence[int] | None) -> tuple[int, int | None]:
    """Half-open bucket [lo, hi) holding `tokens`; hi None means unbounded.

    With `edges` None the buckets are [0, 1), [1, 2), [2, 4), [4, 8), …; otherwise [0, e0), [e0, e1),
    …, [e_last, ∞).
    """
    if edges is None:
        if tokens < 1:
            return (0, 1)
        lo = 1 << (tokens.bit_length() - 1)
        return (lo, 2 * lo)
    i = bisect_right(edges, tokens)
    return (edges[i - 1] if i else 0, edges[i] if i < len(edges) else None)


def bucket_label(bucket: tuple[int, int | None]) -> str:
    """`[lo,hi)` or `[lo,inf)`."""
    lo, hi = bucket
    return f"[{lo},{'inf' if hi is None else hi})"


def group_stats(
    records: Sequence[RequestRecord], key: Callable[[RequestRecord], Any], percentiles: Sequence[float]
) -> list[tuple[Any, dict[str, Any]]]:
    """Per-group statistics sorted by (sortable) key: (key, {requests, completed, mean_context_tokens, <metric stats>})."""
    groups: defaultdict[Any, list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    out = []
    for k in sorted(groups):
        rs = groups[k]
        ctx = [r.context_tokens for r in rs if r.context_tokens is not None]
        row: dict[str, Any] = {
            "requests": len(rs),
            "completed": sum(r.success for r in rs),
            "mean_context_tokens": float(np.mean(ctx)) if ctx else None,
        }
        for metric in METRICS:
            row.update(metric_stats(metric, metric_values_ms(rs, metric), percentiles))
        out.append((k, row))
    return out


def by_turn(
    records: Sequence[RequestRecord], percentiles: Sequence[float] = (90, 99)
) -> list[dict[str, Any]]:
    """Latency statistics per turn index."""
    return [{"turn": k, **row} for k, row in group_stats(records, lambda r: r.turn, percentiles)]


def by_context(
    records: Sequence[RequestRecord], edges: Sequence[int] | None, percentiles: Sequence[float] = (90, 99)
) -> list[dict[str, Any]]:
    """Latency statistics per context-length bucket (the session's tokens before the turn)."""
    rows = group_stats(records, lambda r: context_bucket(r.context_tokens or 0, edges), percentiles)
    return [{"bucket": bucket_label(b), "lo": b[0], "hi": b[1], **row} for b, row in rows]


def sleep_totals(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Sleep activity summed over the usage objects of successful requests that report it.

    Assumes the server's usage fields are per request (what this request's consolidation did).
    """
    totals: dict[str, Any] = dict.fromkeys(SLEEP_FIELDS, 0)
    reporting = [
        r.usage for r in records if r.success and r.usage and any(f in r.usage for f in SLEEP_FIELDS)
    ]
    for usage in reporting:
        for f in SLEEP_FIELDS:
            totals[f] += usage.get(f) or 0
    totals["requests_reporting"] = len(reporting)
    totals["requests_with_sleep"] = sum(1 for u in reporting if (u.get("sleep_passes") or 0) > 0)
    return totals
