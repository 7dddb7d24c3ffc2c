"""The multi-turn comparison: sleepserve against two baselines, one run, one machine, the same harness.

Systems, each started as a child process on a free port:
1. `sleepserve`: our server on the product model (bench.models.product_model), memory store.
2. `full-attention`: the same server and settings on an attention-only model of the same width and
   depth whose window holds the whole conversation, so it never sleeps and keeps every token (random
   weights). Between turns the server keeps only the tokens and rebuilds the KV cache at admission.
3. `transformers`: bench.hf_server (a random-weight Llama of the same size behind a minimal
   OpenAI-compatible wrapper). It has no sessions: the harness re-sends the whole history each turn.

For each: one warm-up request, then the harness's multi-turn mode (`--sessions` conversations of
`--turns` + `--cooldown-turns` turns of `--input-len` new characters and `--output-len` reply tokens;
the context before the last reported turn passes 16k tokens; the cool-down turns, where sessions finish
one by one and decode under less load, are reported apart), then request mode at `--concurrency` concurrent requests with short prompts for
the output token throughput. Sampling at temperature 1 with `ignore_eos`, so every reply has exactly
`--output-len` tokens whatever the weights. Latency by context is one point per turn index (every
session has the same context before a given turn): the sessions' mean context, and the median and
p99 of the pooled ITLs and the median TTFT of that turn. State bytes by context: sleepserve's session
blob (its size is fixed by the model: computed from it, and checked against what
`GET /v1/sessions/{id}` reports for every session at the end); the baselines' fp32 KV cache.
Our server answers 404 to a session id it does not know, so the sessions are created first
(`POST /v1/sessions`) and their ids handed to the harness.

Writes bench/results/serve_multiturn.json and .png, and prints whether each floor holds:
- sleepserve's p99 ITL at the longest context is at most 1.2× its p99 ITL at the shortest (the spread
  over all contexts, max/min, is recorded too);
- full-attention's p99 ITL grows by at least 3× from the shortest to the longest context;
- sleepserve's state is constant in context and at least 50× smaller than full-attention's KV cache
  at 16k tokens;
- sleepserve's output token throughput at concurrency 16 is at least transformers'.

    python -m bench.multiturn                 # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.decode_scaling import RESULTS, machine
from bench.hf_server import kv_cache_bytes as llama_kv_bytes
from bench.hf_server import llama_config
from bench.models import full_attention_config, kv_cache_bytes, product_model, save_random
from bench.procs import http_server
from bench.record import made_with, write_result
from bench.serve import (
    BenchmarkResult,
    MultiTurnConfig,
    MultiTurnResult,
    RequestConfig,
    run_multiturn,
    run_requests,
)
from bench.stats import group_stats
from model.checkpoint import fingerprint, save_checkpoint
from model.config import ModelConfig
from model.session import new_state

SYSTEMS = ("sleepserve", "full-attention", "transformers")
KV_REFERENCE_CONTEXT = 16384  # the state floor compares at 16k tokens


@dataclass
class Workload:
    """What every system is driven with."""

    sessions: int = 4
    turns: int = 9  # reported turns: the context before the last passes 16k tokens
    # Turns run after them but left out of `by_context`: there the sessions finish one by one, so those
    # turns decode with fewer concurrent sessions than the others (a closed-loop run's end effect).
    cooldown_turns: int = 1
    input_len: int = 2000  # new characters (= tokens) per turn
    output_len: int = 64  # reply tokens per turn (each reply crosses window boundaries: its sleeps count)
    concurrency: int = 16
    throughput_prompts: int = 64
    throughput_input_len: int = 64
    throughput_output_len: int = 32
    temperature: float = 1.0
    # torch threads of each server process (OMP_NUM_THREADS). One: on 2 cores the other runs the client
    # and the event loop; with two, OpenMP waits swamp the small decode ops whenever anything else runs.
    threads: int = 1

    @property
    def session_tokens(self) -> int:
        """Tokens a session holds after its last turn (prompts and replies)."""
        return (self.turns + self.cooldown_turns) * (self.input_len + self.output_len)


def by_context(result: MultiTurnResult, turns: range | None = None) -> list[dict[str, Any]]:
    """One point per turn index (those in `turns`, default all): mean context before the turn, ITL
    p50/p99 and TTFT p50 (ms)."""
    points = []
    for turn, row in group_stats(result.records, lambda r: r.turn, (99,)):
        if (turns is not None and turn not in turns) or not row["completed"] or row["median_itl_ms"] is None:
            continue
        points.append(
            {
                "context_tokens": round(row["mean_context_tokens"]),
                "itl_p50_ms": row["median_itl_ms"],
                "itl_p99_ms": row["p99_itl_ms"],
                "ttft_p50_ms": row["median_ttft_ms"],
            }
        )
    return points


def system_entry(
    name: str,
    multiturn: MultiTurnResult,
    throughput: BenchmarkResult,
    state_bytes: Callable[[int], int],
    turns: range | None = None,
) -> dict[str, Any]:
    """A system's entry of serve_multiturn.json from the harness's results, reporting the turns in
    `turns` (default all); `state_bytes(context)` is its per-session state at that context."""
    points = by_context(multiturn, turns)
    return {
        "name": name,
        "by_context": points,
        "state_bytes_by_context": [
            {"context_tokens": p["context_tokens"], "bytes": int(state_bytes(p["context_tokens"]))}
            for p in points
        ],
        "output_tokens_per_s": float(throughput.summary["output_throughput"]),
    }


def _ratio(a: float, b: float) -> float | None:
    """a / b; None when b is 0 (nothing measured)."""
    return a / b if b else None


def floors(systems: list[dict[str, Any]], reference_context: int = KV_REFERENCE_CONTEXT) -> dict[str, dict]:
    """Whether each floor holds, with the measured value and its threshold."""
    by_name = {s["name"]: s for s in systems}
    out: dict[str, dict] = {}

    def growth(name: str) -> tuple[float | None, str]:
        points = by_name[name]["by_context"]
        first, last = points[0], points[-1]
        detail = (
            f"p99 ITL {last['itl_p99_ms']:.2f} ms at {last['context_tokens']} tokens vs "
            f"{first['itl_p99_ms']:.2f} ms at {first['context_tokens']}"
        )
        return _ratio(last["itl_p99_ms"], first["itl_p99_ms"]), detail

    if "sleepserve" in by_name:
        ratio, detail = growth("sleepserve")
        p99s = [p["itl_p99_ms"] for p in by_name["sleepserve"]["by_context"]]
        out["sleepserve_p99_itl_flat"] = {
            "holds": ratio is not None and ratio <= 1.2,
            "value": ratio,
            "threshold": "<= 1.2",
            "detail": detail + f"; p99 over all contexts {min(p99s):.2f}..{max(p99s):.2f} ms",
            "max_over_min": _ratio(max(p99s), min(p99s)),
        }
    if "full-attention" in by_name:
        ratio, detail = growth("full-attention")
        out["full_attention_p99_itl_grows"] = {
            "holds": ratio is not None and ratio >= 3,
            "value": ratio,
            "threshold": ">= 3",
            "detail": detail,
        }
    if {"sleepserve", "full-attention"} <= by_name.keys():
        ours = [p["bytes"] for p in by_name["sleepserve"]["state_bytes_by_context"]]
        theirs = by_name["full-attention"]["kv_bytes_at_reference"]
        ratio = _ratio(theirs, max(ours))
        out["sleepserve_state_constant_and_50x_smaller"] = {
            "holds": len(set(ours)) == 1 and ratio is not None and ratio >= 50,
            "value": ratio,
            "threshold": ">= 50, constant",
            "detail": f"{sorted(set(ours))} B vs {theirs} B of KV cache at {reference_context} tokens",
        }
    if {"sleepserve", "transformers"} <= by_name.keys():
        ours, theirs = (
            by_name["sleepserve"]["output_tokens_per_s"],
            by_name["transformers"]["output_tokens_per_s"],
        )
        out["sleepserve_throughput_at_least_transformers"] = {
            "holds": ours >= theirs,
            "value": _ratio(ours, theirs),
            "threshold": ">= 1",
            "detail": f"{ours:.1f} vs {theirs:.1f} output tokens/s",
        }
    longest = min(s["by_context"][-1]["context_tokens"] for s in systems)
    out["sessions_reach_16k"] = {
        "holds": longest >= reference_context,
        "value": longest,
        "threshold": f">= {reference_context}",
        "detail": f"shortest longest-context over the systems: {longest} tokens",
    }
    return out


async def _drive(
    name: str, url: str, work: Workload, progress: bool
) -> tuple[MultiTurnResult, BenchmarkResult]:
    """Warm-up, multi-turn run, throughput run against one server."""
    common = {"base_url": url, "temperature": work.temperature, "ignore_eos": True, "label": name}
    await run_requests(RequestConfig(**common, num_prompts=2, input_len=64, output_len=8, progress=False))
    config = MultiTurnConfig(
        **common,
        sessions=work.sessions,
        turns=work.turns + work.cooldown_turns,
        input_len=work.input_len,
        output_len=work.output_len,
        stateless_history=name == "transformers",
        percentiles=(50, 99),
        progress=progress,
    )
    multiturn = await run_multiturn(config)
    throughput = await run_requests(
        RequestConfig(
            **common,
            num_prompts=work.throughput_prompts,
            input_len=work.throughput_input_len,
            output_len=work.throughput_output_len,
            max_concurrency=work.concurrency,
            percentiles=(50, 99),
            progress=progress,
        )
    )
    return multiturn, throughput


async def _sessions(url: str, result: MultiTurnResult) -> list[dict[str, Any]]:
    """What the server reports for every session of the run: tokens seen and state bytes."""
    ids = sorted({r.session_id for r in result.records if r.session_id})
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        infos = [(await client.get(f"/v1/sessions/{i}")).json() for i in ids]
    return [{"tokens_seen": i["tokens_seen"], "state_bytes": i["state_bytes"]} for i in infos]


def _failures(multiturn: MultiTurnResult, throughput: BenchmarkResult) -> dict[str, Any]:
    return {"multiturn": multiturn.summary["errors"], "throughput": throughput.summary["errors"]}


def run(work: Workload, systems: list[str], folder: Path, progress: bool = True) -> dict[str, Any]:
    """Start each system in turn, drive it, and assemble serve_multiturn.json's content."""
    product, source = product_model()
    product_dir = folder / "sleepserve"
    save_checkpoint(product, product_dir)
    blob_bytes = len(new_state(product).to_bytes(fingerprint(product), product.config.window_capacity))
    dense = full_attention_config(product.config, work.session_tokens + 4 * product.config.window)
    llama = llama_config(product.config, max_context=4 * work.session_tokens)
    # Both of our servers slice prompts by the product's window L (its default prefill chunk).
    server_args = [
        "--store",
        "memory",
        "--prefill-chunk",  # the same prompt budget per engine iteration for both: sleepserve's default
        str(4 * product.config.window),
        "--log-level",
        "warning",
    ]
    dense_dir = save_random(dense, folder / "full-attention")
    launch = {
        "sleepserve": (
            "server",
            [
                "--checkpoint",
                str(product_dir),
                "--served-model-name",
                "sleepserve",
                "--schedule",
                "lagged",
                *server_args,
            ],
        ),
        # It never sleeps (its window holds the whole conversation), so no sleep scheduler: one in the
        # background would time a sleep pass over that 20k-token window at start, for minutes.
        "full-attention": (
            "server",
            [
                "--checkpoint",
                str(dense_dir),
                "--served-model-name",
                "full-attention",
                "--sleep-mode",
                "inline",
                *server_args,
            ],
        ),
        "transformers": (
            "bench.hf_server",
            ["--checkpoint", str(product_dir), "--max-context", str(llama.max_position_embeddings)],
        ),
    }
    state_bytes = {
        "sleepserve": lambda _: blob_bytes,
        "full-attention": lambda c: kv_cache_bytes(dense, c),
        "transformers": lambda c: llama_kv_bytes(llama, c),
    }
    entries = []
    for name in systems:
        print(f"== {name}")
        module, args = launch[name]
        env = {"OMP_NUM_THREADS": str(work.threads)}
        with http_server(module, args, folder / f"{name}.log", env) as url:
            multiturn, throughput = asyncio.run(_drive(name, url, work, progress))
            reported = asyncio.run(_sessions(url, multiturn)) if name == "sleepserve" else []
        entry = system_entry(name, multiturn, throughput, state_bytes[name], range(work.turns))
        entry["cooldown_by_context"] = by_context(
            multiturn, range(work.turns, work.turns + work.cooldown_turns)
        )
        entry["failed_requests"] = _failures(multiturn, throughput)
        entry["multiturn_duration_s"] = multiturn.duration_s
        entry["sleep"] = multiturn.sleep
        if name == "sleepserve":
            sleeps = multiturn.sleep["consolidated_tokens"] / product.config.window
            entry["mean_sleep_ms"] = 1e3 * multiturn.sleep["sleep_seconds"] / sleeps if sleeps else None
            entry["sessions_reported"] = reported
            entry["reported_state_matches"] = all(s["state_bytes"] == blob_bytes for s in reported)
        if name == "full-attention":
            entry["kv_bytes_at_reference"] = kv_cache_bytes(dense, KV_REFERENCE_CONTEXT)
        entries.append(entry)
    return {
        "systems": entries,
        "machine": machine(),
        "models": {
            "sleepserve": {"source": source, "config": product.config.to_dict()},
            "full-attention": {"source": "random weights", "config": dense.to_dict()},
            "transformers": {"source": "random weights, LlamaForCausalLM", "config": llama.to_diff_dict()},
        },
        "workload": asdict(work),
        "floors": floors(entries),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (itl, ttft, size) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, system in enumerate(result["systems"]):
        color = f"C{i}"
        xs = [p["context_tokens"] for p in system["by_context"]]
        for quantile, style in (("p50", "o-"), ("p99", "s--")):
            ys = [p[f"itl_{quantile}_ms"] for p in system["by_context"]]
            itl.plot(xs, ys, style, color=color, label=f"{system['name']} {quantile}")
        ttft.plot(
            xs, [p["ttft_p50_ms"] for p in system["by_context"]], "o-", color=color, label=system["name"]
        )
        sizes = [
            (p["context_tokens"], p["bytes"]) for p in system["state_bytes_by_context"] if p["bytes"] > 0
        ]
        size.plot(*zip(*sizes, strict=True), "o-", color=color, label=system["name"])
    itl.set(xlabel="context before the turn (tokens)", ylabel="ms", title="Inter-token latency", yscale="log")
    ttft.set(
        xlabel="context before the turn (tokens)",
        ylabel="ms",
        title="Time to first token (median)",
        yscale="log",
    )
    size.set(xlabel="context (tokens)", ylabel="bytes", title="Per-session state", yscale="log")
    for ax in (itl, ttft, size):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    defaults = Workload()
    parser = argparse.ArgumentParser(
        prog="python -m bench.multiturn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_multiturn.json")
    parser.add_argument("--disable-tqdm", action="store_true")
    args = parser.parse_args(argv)
    work = Workload(**{field: getattr(args, field) for field in asdict(defaults)})
    torch.set_num_threads(min(2, torch.get_num_threads()))

    with tempfile.TemporaryDirectory(prefix="bench-multiturn-") as folder:
        result = run(work, args.systems, Path(folder), progress=not args.disable_tqdm)
    sleepserve = result["models"]["sleepserve"]  # the product; the baselines have random weights
    write_result(
        args.out, result, made_with(sleepserve["source"], ModelConfig.from_dict(sleepserve["config"]))
    )
    plot(result, args.out.with_suffix(".png"))
    for system in result["systems"]:
        print(
            f"{system['name']}: {system['output_tokens_per_s']:.1f} output tokens/s at concurrency {work.concurrency}"
        )
        for p, s in zip(system["by_context"], system["state_bytes_by_context"], strict=True):
            print(
                f"  context {p['context_tokens']:>6}: ITL p50 {p['itl_p50_ms']:8.2f} ms  p99 {p['itl_p99_ms']:8.2f} ms  "
                f"TTFT p50 {p['ttft_p50_ms']:9.1f} ms  state {s['bytes']:>11,} B"
            )
    for name, floor in result["floors"].items():
        value = "n/a" if floor["value"] is None else f"{floor['value']:.2f}"
        print(
            f"floor {name}: {'HOLDS' if floor['holds'] else 'FAILS'} ({value}, {floor['threshold']}; {floor['detail']})"
        )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
