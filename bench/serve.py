"""Serving benchmark client for any OpenAI-compatible endpoint (the `vllm bench serve` method).

Request mode: `--num-prompts` random prompts sent at `--request-rate` (gamma/Poisson arrivals, or all
at once with `inf`), optionally capped by `--max-concurrency`. Every request streams with
`stream_options.include_usage`; results are printed as vLLM's summary block and written as JSON under
`--result-dir` (latencies in ms, keys as vLLM's: `median_ttft_ms`, `p99_itl_ms`, ...).

Multi-turn mode (`--multi-turn`): `--sessions` concurrent conversations, each `--turns` sequential
turns of `--input-len` new random characters. Each session has a fresh random 32-hex `session_id`,
sent in the body and as `X-Session-ID`, and only the new text is sent; with `--stateless-history` no
id is sent and the whole history (prompts and replies) is re-sent instead. Between turns a session
pauses for an exponentially distributed think time of mean `--think-time` (seeded). A turn's context
length is the session's tokens before it: the server's `usage.session_tokens_total` after the
previous turn when reported, else the client's sum of prompt + completion tokens (the last prompt +
completion with `--stateless-history`). A failed turn ends its session. Latency is reported by turn
index and by context-length bucket, and sleep activity summed from the usage fields.

    python -m bench.serve --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4
    python -m bench.serve --multi-turn --sessions 8 --turns 32 --input-len 256 --output-len 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import string
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench.record import write_result
from bench.stats import (
    RequestRecord,
    arrival_times,
    by_context,
    by_turn,
    parse_buckets,
    parse_goodput,
    sleep_totals,
    spread_itl,
    summarize,
)

__all__ = [
    "BenchmarkResult",
    "MultiTurnConfig",
    "MultiTurnResult",
    "RequestConfig",
    "main",
    "run_multiturn",
    "run_requests",
    "summarize",
]

PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


@dataclass
class ClientConfig:
    """Settings shared by both modes."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id from GET /v1/models
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    input_len: int = 256  # characters of new prompt text per request (= tokens for a byte-level model)
    output_len: int = 128  # max_tokens
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in ms: ttft, tpot, e2el
    percentiles: tuple[float, ...] = (90, 99)
    timeout_s: float = 6 * 3600
    label: str = "serve"
    progress: bool = True


@dataclass
class RequestConfig(ClientConfig):
    """Request mode: independent single-turn requests."""

    num_prompts: int = 100
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None


@dataclass
class MultiTurnConfig(ClientConfig):
    """Multi-turn mode: concurrent sessions of sequential turns."""

    sessions: int = 4
    turns: int = 8
    think_time: float = 0.0  # mean of the exponential pause between a session's turns (s)
    stateless_history: bool = False  # re-send the whole history instead of a session_id
    context_buckets: list[int] | None = None  # bucket edges; None: powers of two


def _config_dict(config: ClientConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict (inf becomes "inf", tuples lists)."""
    out = dataclasses.asdict(config)
    out["percentiles"] = list(config.percentiles)
    if isinstance(config, RequestConfig) and math.isinf(config.request_rate):
        out["request_rate"] = "inf"
    return out


@dataclass
class BenchmarkResult:
    """Request mode outcome: the records and their summary."""

    config: RequestConfig
    records: list[RequestRecord]
    duration_s: float
    summary: dict[str, Any]
    date: str = field(default_factory=_now)  # UTC, when the run finished

    def to_dict(self, detailed: bool = False) -> dict[str, Any]:
        """Config + summary (+ per-request records when `detailed`) as a plain dict."""
        out = {"date": self.date, "mode": "requests", **_config_dict(self.config), **self.summary}
        if detailed:
            out["requests"] = [r.to_dict() for r in self.records]
        return out


@dataclass
class MultiTurnResult:
    """Multi-turn outcome: overall summary, per-turn and per-context-bucket statistics, sleep totals."""

    config: MultiTurnConfig
    records: list[RequestRecord]
    duration_s: float
    summary: dict[str, Any]
    by_turn: list[dict[str, Any]]
    by_context: list[dict[str, Any]]
    sleep: dict[str, Any]
    date: str = field(default_factory=_now)  # UTC, when the run finished

    def to_dict(self, detailed: bool = False) -> dict[str, Any]:
        """Config + summaries (+ per-request records when `detailed`) as a plain dict."""
        out = {
            "date": self.date,
            "mode": "multi_turn",
            **_config_dict(self.config),
            **self.summary,
            "sessions_completed": len(
                {r.session_id for r in self.records if r.success and r.turn == self.config.turns - 1}
            ),
            "by_turn": self.by_turn,
            "by_context": self.by_context,
            "sleep": self.sleep,
        }
        if detailed:
            out["requests"] = [r.to_dict() for r in self.records]
        return out


def random_text(rng: random.Random, n: int) -> str:
    """`n` random printable ASCII characters."""
    return "".join(rng.choices(PRINTABLE, k=n))


def _client(config: ClientConfig) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=config.base_url,
        timeout=httpx.Timeout(config.timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


async def _resolve_model(client: httpx.AsyncClient, config: ClientConfig) -> str:
    if config.model:
        return config.model
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def _body(
    config: ClientConfig, model: str, content: str | list[dict[str, str]], session_id: str | None
) -> dict:
    """A streaming completions or chat request; `content` is a prompt or a message list."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": config.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if "chat" in config.endpoint:
        body["messages"] = [{"role": "user", "content": content}] if isinstance(content, str) else content
    else:
        body["prompt"] = content
    if config.ignore_eos:
        body["ignore_eos"] = True
    if session_id:
        body["session_id"] = session_id
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def stream_request(
    client: httpx.AsyncClient, endpoint: str, body: dict[str, Any], t0: float, prompt_chars: int
) -> RequestRecord:
    """POST one streaming request and time its content chunks; never raises for request errors."""
    headers = {"X-Session-ID": body["session_id"]} if "session_id" in body else {}
    rec = RequestRecord()
    texts: list[str] = []
    gaps: list[float] = []
    st = last = time.perf_counter()
    rec.start_s = st - t0
    try:
        async with client.stream("POST", endpoint, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
                    continue
                chunk = json.loads(data)
                if chunk.get("error"):
                    rec.error = f"stream error: {json.dumps(chunk['error'])}"
                    return rec
                if chunk.get("usage"):
                    rec.usage = chunk["usage"]
                if text := _chunk_text(chunk):
                    now = time.perf_counter()
                    if texts:
                        gaps.append(now - last)
                    else:
                        rec.ttft_s = now - st
                    last = now
                    texts.append(text)
    except Exception as exc:  # a benchmark records every failure instead of stopping
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    if not texts:
        rec.error = "Never received a valid chunk to calculate TTFT."
        return rec
    usage = rec.usage or {}
    rec.success = True
    rec.e2el_s = last - st
    rec.text = "".join(texts)
    rec.prompt_tokens = usage.get("prompt_tokens") or prompt_chars
    rec.completion_tokens = usage.get("completion_tokens") or len(texts)
    rec.itl_s = spread_itl(gaps, rec.completion_tokens)
    return rec


async def run_requests(config: RequestConfig) -> BenchmarkResult:
    """Send `num_prompts` random prompts on the configured arrival process; return records and summary."""
    rng = random.Random(config.seed)
    prompts = [random_text(rng, config.input_len) for _ in range(config.num_prompts)]
    times = arrival_times(config.num_prompts, config.request_rate, config.burstiness, config.seed)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    async with _client(config) as client:
        model = await _resolve_model(client, config)
        with tqdm(total=config.num_prompts, disable=not config.progress) as bar:
            t0 = time.perf_counter()

            async def one(prompt: str, at: float) -> RequestRecord:
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                async with limit or contextlib.nullcontext():  # TTFT excludes time queued here, as in vLLM
                    rec = await stream_request(
                        client, config.endpoint, _body(config, model, prompt, None), t0, len(prompt)
                    )
                bar.update()
                return rec

            records = list(await asyncio.gather(*(one(p, at) for p, at in zip(prompts, times, strict=True))))
            duration = time.perf_counter() - t0
    config = dataclasses.replace(config, model=model)
    return BenchmarkResult(
        config, records, duration, summarize(records, duration, config.goodput, config.percentiles)
    )


async def _session(
    client: httpx.AsyncClient, config: MultiTurnConfig, model: str, index: int, t0: float, bar: tqdm
) -> list[RequestRecord]:
    """One conversation: `turns` sequential requests; a failed turn ends the session."""
    rng = random.Random(f"{config.seed}-{index}")
    session_id = uuid.uuid4().hex  # fresh per run, so a rerun never resumes an old server-side session
    if not config.stateless_history:  # servers with a session API (sleepserve) want it created first
        created = await client.post("/v1/sessions", json={"session_id": session_id})
        if created.status_code not in (200, 404, 405):  # 404/405: no such API; session_id is then ignored
            created.raise_for_status()
    chat = "chat" in config.endpoint
    messages: list[dict[str, str]] = []
    history = ""
    context = 0
    records: list[RequestRecord] = []
    for turn in range(config.turns):
        if turn and config.think_time > 0:
            await asyncio.sleep(rng.expovariate(1.0 / config.think_time))
        new = random_text(rng, config.input_len)
        content: str | list[dict[str, str]] = new
        if config.stateless_history:
            content = [*messages, {"role": "user", "content": new}] if chat else history + new
        sent_id = None if config.stateless_history else session_id
        body = _body(config, model, content, sent_id)
        prompt_chars = sum(len(m["content"]) for m in content) if isinstance(content, list) else len(content)
        rec = await stream_request(client, config.endpoint, body, t0, prompt_chars)
        rec.session_id, rec.turn, rec.context_tokens = session_id, turn, context
        records.append(rec)
        bar.update()
        if not rec.success:
            break
        messages += [{"role": "user", "content": new}, {"role": "assistant", "content": rec.text}]
        history += new + rec.text
        reported = (rec.usage or {}).get("session_tokens_total")
        if reported is not None:
            context = int(reported)
        elif config.stateless_history:  # the prompt already holds the whole history
            context = rec.prompt_tokens + rec.completion_tokens
        else:
            context += rec.prompt_tokens + rec.completion_tokens
    return records


async def run_multiturn(config: MultiTurnConfig) -> MultiTurnResult:
    """Run `sessions` concurrent conversations; summarise by turn, by context length and sleep activity."""
    async with _client(config) as client:
        model = await _resolve_model(client, config)
        with tqdm(total=config.sessions * config.turns, disable=not config.progress) as bar:
            t0 = time.perf_counter()
            sessions = await asyncio.gather(
                *(_session(client, config, model, i, t0, bar) for i in range(config.sessions))
            )
            duration = time.perf_counter() - t0
    records = [r for s in sessions for r in s]
    config = dataclasses.replace(config, model=model)
    return MultiTurnResult(
        config,
        records,
        duration,
        summarize(records, duration, config.goodput, config.percentiles),
        by_turn(records, config.percentiles),
        by_context(records, config.context_buckets, config.percentiles),
        sleep_totals(records),
    )


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _rule(title: str, char: str) -> str:
    return f"{title:{char}^50}"


def format_summary(
    summary: dict[str, Any],
    config: ClientConfig,
    percentiles: Sequence[float],
    title: str = "Serving Benchmark Result",
) -> str:
    """vLLM's `Serving Benchmark Result` block."""
    lines = [_rule(f" {title} ", "=")]

    def row(name: str, value: Any, spec: str = ".2f") -> None:
        lines.append(f"{name:<40} {_fmt(value, spec):<10}")

    row("Successful requests:", summary["completed"], "d")
    row("Failed requests:", summary["failed"], "d")
    if isinstance(config, RequestConfig):
        row("Maximum request concurrency:", config.max_concurrency, "d")
        row("Request rate configured (RPS):", config.request_rate, ".2f")
    row("Benchmark duration (s):", summary["duration"])
    row("Total input tokens:", summary["total_input_tokens"], "d")
    row("Total generated tokens:", summary["total_output_tokens"], "d")
    row("Request throughput (req/s):", summary["request_throughput"])
    if summary["request_goodput"] is not None:
        row("Request goodput (req/s):", summary["request_goodput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Peak concurrent requests:", summary["max_concurrent_requests"], "d")
    row("Total Token throughput (tok/s):", summary["total_token_throughput"])
    for metric, header, name in (
        ("ttft", "Time to First Token", "TTFT"),
        ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl", "Inter-token Latency", "ITL"),
        ("e2el", "End-to-end Latency", "E2EL"),
    ):
        lines.append(_rule(header, "-"))
        row(f"Mean {name} (ms):", summary[f"mean_{metric}_ms"])
        row(f"Median {name} (ms):", summary[f"median_{metric}_ms"])
        for p in percentiles:
            row(f"P{p:g} {name} (ms):", summary[f"p{p:g}_{metric}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def format_groups(rows: list[dict[str, Any]], key: str, percentiles: Sequence[float]) -> str:
    """A table of TTFT / ITL / TPOT median and top percentile per group (turn or context bucket)."""
    top = f"p{max(percentiles, default=50):g}"
    columns = [  # (header, row key, format)
        ("n", "completed", "d"),
        ("ctx mean", "mean_context_tokens", ".1f"),
        ("TTFT med", "median_ttft_ms", ".2f"),
        (f"TTFT {top}", f"{top}_ttft_ms", ".2f"),
        ("ITL med", "median_itl_ms", ".2f"),
        (f"ITL {top}", f"{top}_itl_ms", ".2f"),
        ("TPOT med", "median_tpot_ms", ".2f"),
    ]
    lines = [f"{key:>16} " + " ".join(f"{header:>10}" for header, _, _ in columns)]
    for r in rows:
        lines.append(f"{r[key]!s:>16} " + " ".join(f"{_fmt(r.get(k), spec):>10}" for _, k, spec in columns))
    return "\n".join(lines)


def format_multiturn(result: MultiTurnResult) -> str:
    """Summary block, the per-turn and per-context tables (ms) and sleep totals."""
    pct = result.config.percentiles
    sleep = result.sleep
    parts = [
        format_summary(result.summary, result.config, pct, "Multi-turn Benchmark Result"),
        _rule(" Latency by turn (ms) ", "-"),
        format_groups(result.by_turn, "turn", pct),
        _rule(" Latency by context tokens (ms) ", "-"),
        format_groups(result.by_context, "bucket", pct),
    ]
    if sleep["requests_reporting"]:
        parts.append(
            f"Sleep: {sleep['consolidated_tokens']} tokens consolidated, {sleep['sleep_passes']} passes, "
            f"{sleep['sleep_seconds']:.3f} s, in {sleep['requests_with_sleep']} of {sleep['requests_reporting']} requests"
        )
    return "\n".join(parts)


def default_filename(result: BenchmarkResult | MultiTurnResult) -> str:
    """`{label}-{rate}qps[-concurrency{c}]-{model}-{date}.json` (vLLM's pattern) or the multi-turn analogue."""
    config = result.config
    model = (config.model or "model").replace("/", "_")
    if isinstance(config, MultiTurnConfig):
        return f"{config.label}-multiturn-{config.sessions}x{config.turns}-{model}-{result.date}.json"
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
    conc = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
    return f"{config.label}-{rate}qps{conc}-{model}-{result.date}.json"


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (names follow `vllm bench serve`)."""
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first model from GET /v1/models")
    p.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"]
    )
    p.add_argument("--label", default="serve", help="result file prefix, recorded in the JSON")
    p.add_argument("--input-len", type=int, default=256, help="new prompt characters per request")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true")
    p.add_argument(
        "--goodput", nargs="+", default=[], metavar="KEY:MS", help="SLOs, e.g. ttft:200 tpot:50 e2el:5000"
    )
    p.add_argument("--metric-percentiles", default="90,99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="per-request timeout (s)")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--result-dir", default="bench/results")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--save-detailed", action="store_true", help="include per-request records in the JSON")
    req = p.add_argument_group("request mode")
    req.add_argument("--num-prompts", type=int, default=100)
    req.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, or inf (all at t=0)")
    req.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier")
    req.add_argument("--max-concurrency", type=int, default=None)
    mt = p.add_argument_group("multi-turn mode")
    mt.add_argument("--multi-turn", action="store_true")
    mt.add_argument("--sessions", type=int, default=4, help="concurrent conversations")
    mt.add_argument("--turns", type=int, default=8, help="turns per conversation")
    mt.add_argument(
        "--think-time", type=float, default=0.0, help="mean of the exponential pause between turns (s)"
    )
    mt.add_argument(
        "--stateless-history", action="store_true", help="re-send the whole history, no session_id"
    )
    mt.add_argument("--context-buckets", default="pow2", help="'pow2' or edges, e.g. 0,1024,4096,16384")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: run, print the summary, write the JSON; returns the JSON dict."""
    args = build_parser().parse_args(argv)
    common = {
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": args.endpoint,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "goodput": parse_goodput(args.goodput),
        "percentiles": tuple(float(x) for x in args.metric_percentiles.split(",") if x.strip()),
        "timeout_s": args.timeout,
        "label": args.label,
        "progress": not args.disable_tqdm,
    }
    result: BenchmarkResult | MultiTurnResult
    if args.multi_turn:
        mt_config = MultiTurnConfig(
            **common,
            sessions=args.sessions,
            turns=args.turns,
            think_time=args.think_time,
            stateless_history=args.stateless_history,
            context_buckets=parse_buckets(args.context_buckets),
        )
        result = asyncio.run(run_multiturn(mt_config))
        print(format_multiturn(result))
    else:
        req_config = RequestConfig(
            **common,
            num_prompts=args.num_prompts,
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
        )
        result = asyncio.run(run_requests(req_config))
        print(format_summary(result.summary, result.config, result.config.percentiles))
    data = result.to_dict(detailed=args.save_detailed)
    path = Path(args.result_dir) / (args.result_filename or default_filename(result))
    # the server under test may run any model: the harness records what it asked for
    data = write_result(
        path, data, {"weights": "served", "base_url": args.base_url, "model": result.config.model}
    )
    print(f"Results written to {path}")
    return data


if __name__ == "__main__":
    main()
