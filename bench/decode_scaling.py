"""Per-token decode latency against context position: the sleeping hybrid (both schedules) and a
full-attention transformer of the same width and depth that keeps its whole KV cache.

The hybrid really is driven to each position (prefill with a sleep at every window boundary), so the
latency it shows at 64k is the latency of a session that has consumed 64k tokens. The full-attention
cache is filled with random keys and values: its cost depends on their number, not their values.
The hybrid is the shipped checkpoint's config with random weights (latency depends on the shapes, not
the weights), in both schedules. Also times one sleep at N ∈ {1, 2, 4} against one prefill of the same
chunk, and what a re-prefill lagged boundary costs the decode loop when 8 sessions cross it in the same
step (their batched re-prefill; a stale-kv boundary, the shipped one, recomputes nothing).

    python -m bench.decode_scaling            # writes bench/results/decode_scaling.{json,png}
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.models import full_attention_config, random_model_config
from bench.record import random_record, write_result
from model.checkpoint import fingerprint
from model.config import ModelConfig
from model.hybrid import HybridLM
from model.session import feed, new_state, open_window, open_windows

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}"


def time_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@torch.no_grad()
def hybrid_scaling(config: ModelConfig, positions: list[int], probe: int, progress: tqdm) -> list[dict]:
    """Feed one session up to each position, then time `probe` single-token decode steps there."""
    torch.manual_seed(0)
    model = HybridLM(config).eval()
    fp = fingerprint(model)
    state = new_state(model)
    cache, _ = open_window(model, state)
    rng = torch.Generator().manual_seed(0)
    results = []
    for position in positions:
        while state.tokens_seen < position:
            step = min(config.window, position - state.tokens_seen)
            _, cache, _ = feed(model, state, cache, torch.randint(0, 256, (step,), generator=rng).tolist())
            progress.update(step)
        samples = []
        for token in torch.randint(0, 256, (probe,), generator=rng).tolist():
            start = time.perf_counter()
            _, cache, _ = feed(model, state, cache, [token])
            samples.append((time.perf_counter() - start) * 1e3)
        progress.update(probe)
        blob = state.to_bytes(fp, config.window_capacity)
        results.append(
            {
                "system": f"hybrid-{config.schedule}",
                "position": position,
                "median_ms": statistics.median(samples),
                "state_bytes": len(blob),
            }
        )
    return results


@torch.no_grad()
def full_attention_scaling(
    config: ModelConfig, positions: list[int], probe: int, progress: tqdm
) -> list[dict]:
    """Decode steps of an attention-only model whose cache already holds `position` random entries."""
    results = []
    for position in positions:
        torch.manual_seed(0)
        dense = full_attention_config(config, position + probe)
        model = HybridLM(dense).eval()
        cache = model.open_window([])
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
        cache.lengths.fill_(position)
        token = torch.tensor([[65]])
        samples = []
        for _ in range(probe):
            start = time.perf_counter()
            _, cache = model.extend(token, cache)
            samples.append((time.perf_counter() - start) * 1e3)
        progress.update(position + probe)
        kv_bytes = 2 * len(dense.layers) * position * dense.n_heads * dense.head_dim * 4  # fp32 K and V
        results.append(
            {
                "system": "full-attention",
                "position": position,
                "median_ms": statistics.median(samples),
                "state_bytes": kv_bytes,
            }
        )
    return results


@torch.no_grad()
def sleep_costs(config: ModelConfig, passes_list: list[int], repeats: int, sessions: int = 1) -> list[dict]:
    """One sleep of N passes over a full chunk of each of `sessions` sessions (one batch) against one
    prefill of those chunks into empty windows: the median of `repeats` calls each, timed in turn (one
    call of each per repeat), so that a slow spell of a shared host falls on all of them alike."""
    torch.manual_seed(0)
    model = HybridLM(config).eval()
    memory = model.empty_memory(sessions)
    chunk = torch.randint(0, 256, (sessions, config.window))
    calls = {"prefill": lambda: model.extend(chunk, model.open_window(memory))}
    calls |= {n: lambda n=n: model.sleep(memory, chunk, n) for n in passes_list}
    samples: dict[object, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            samples[name].append(time_ms(call, 1))
    return [
        {
            "schedule": config.schedule,
            "sessions": sessions,
            "passes": n,
            "sleep_ms": statistics.median(samples[n]),
            "chunk_prefill_ms": statistics.median(samples["prefill"]),
        }
        for n in passes_list
    ]


@torch.no_grad()
def boundary_costs(config: ModelConfig, sessions: int, repeats: int) -> dict:
    """What a lagged boundary costs the decode loop when `sessions` sessions cross it in the same
    step: the batched re-prefill of their windows (`open_windows`) against one decode step of them."""
    torch.manual_seed(0)
    model = HybridLM(config.replace(schedule="lagged", lagged_construction="re-prefill")).eval()
    states = [new_state(model) for _ in range(sessions)]
    for state in states:
        state.tail = torch.randint(0, 256, (config.window,)).tolist()
    window = model.open_window(model.empty_memory(sessions))
    _, window = model.extend(torch.randint(0, 256, (sessions, config.window)), window)
    step = torch.randint(0, 256, (sessions, 1))  # written at the same slot each time: the window stays
    return {
        "sessions": sessions,
        "decode_step_ms": time_ms(lambda: model.extend(step, window), repeats),
        "re_prefill_ms": time_ms(lambda: open_windows(model, states), repeats),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, size) = plt.subplots(1, 2, figsize=(11, 4))
    for system in sorted({r["system"] for r in results}):
        rows = [r for r in results if r["system"] == system]
        xs = [r["position"] for r in rows]
        latency.plot(xs, [r["median_ms"] for r in rows], marker="o", label=system)
        size.plot(xs, [r["state_bytes"] / 2**20 for r in rows], marker="o", label=system)
    latency.set(
        xscale="log", xlabel="context position (tokens)", ylabel="median ms / token", title="Decode latency"
    )
    size.set(
        xscale="log",
        yscale="log",
        xlabel="context position (tokens)",
        ylabel="MiB",
        title="Per-session state",
    )
    for ax in (latency, size):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--probe", type=int, default=128, help="decode steps timed at each position")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_scaling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    base = random_model_config(None)
    total = 2 * (max(args.positions) + args.probe * len(args.positions))
    total += sum(p + args.probe for p in args.positions)
    results = []
    with tqdm(total=total, unit="tok", desc="decode scaling") as progress:
        for schedule in ("hard", "lagged"):
            results += hybrid_scaling(base.replace(schedule=schedule), args.positions, args.probe, progress)
        results += full_attention_scaling(base, args.positions, args.probe, progress)
    sleep = [
        row
        for s in ("hard", "lagged")
        for row in sleep_costs(base.replace(schedule=s), [1, 2, 4], repeats=20)
    ]

    boundary = boundary_costs(base, sessions=8, repeats=50)

    report = {"machine": machine(), "config": base.to_dict(), "results": results, "sleep": sleep}
    write_result(args.out, {**report, "lagged_boundary": boundary}, random_record(base))
    plot(results, args.out.with_suffix(".png"))
    for row in results:
        print(
            f"{row['system']:>15} @ {row['position']:>6}: {row['median_ms']:7.3f} ms/token, state {row['state_bytes']:>11,} B"
        )
    for row in sleep:
        ratio = row["sleep_ms"] / (row["passes"] * row["chunk_prefill_ms"])
        print(
            f"sleep {row['schedule']:>6} N={row['passes']}: {row['sleep_ms']:.2f} ms = {ratio:.2f} × N × prefill"
        )
    print(
        f"lagged boundary, {boundary['sessions']} sessions crossing together: re-prefill "
        f"{boundary['re_prefill_ms']:.2f} ms against a decode step of {boundary['decode_step_ms']:.2f} ms"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
