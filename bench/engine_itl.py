"""Is `lagged`'s inter-token tail the engine's, or the HTTP path's and the client's? The streams of
bench/sleep_overlap.py (8 concurrent, each across 16 window boundaries) run through the engine of a
server built in this process (`server.context.build_server`: the same scheduler, sleeper child and
depth policy as `sleepserve serve`), with no HTTP and no client process. Each output is timed where it
reaches its request's asyncio queue, and each gap is spread over the tokens it carried as the HTTP
harness spreads its chunks (`bench.stats.spread_itl`), so the numbers compare with sleep_overlap's.

Systems: sleep_overlap's no-sleep (`hard`, N = 1) and lagged-scheduled (`lagged`, adaptive N), from its
serve flags, on the CPUs `sleepserve serve` would run them on (`--cpu-affinity auto`); warm, like
sleep_overlap's servers: both engines built once, one round each not counted, then interleaved rounds
(each round's counters their change over it); percentiles over the pooled gaps, the engine's mean
iteration apart and at a window boundary (`sleepserve_engine_step_seconds{boundary}`) and the mean
hand-off of outputs to the event loop (`sleepserve_output_handoff_seconds`). Writes
bench/results/engine_itl.json and a PNG of each system's p99 by round and its steps.

`--weights`: `random` (default, as sleep_overlap; its lagged construction `--lagged-construction`) or
`checkpoint` (the shipped model, or the one in `--checkpoint`). The weights do
not change a step's cost, but they change how the text is cut: random weights emit random bytes, many
of them parts of a multi-byte character, so an output often waits for several tokens and its gap spans
several steps; the trained model writes ASCII, about one output per token, so its gaps are the steps.

    python -m bench.engine_itl
    python -m bench.engine_itl --weights checkpoint --out runs/engine_itl_checkpoint.json
    python -m bench.engine_itl --weights checkpoint --sleep-worker process --sleeper-nice 19 \
        --out runs/engine_itl_checkpoint_nice19.json
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench import sleep_overlap
from bench.decode_scaling import machine
from bench.models import random_model_config
from bench.record import checkpoint_record, random_record, write_result
from bench.sleep_overlap import rounds_in_turn, server_means, server_times, workload_arguments
from bench.stats import spread_itl
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.hybrid import HybridLM
from model.session import new_state
from model.tokenizer import ByteTokenizer
from server.cli import server_cpus, settings_from_args, sleeper_cpus
from server.context import Server, build_server
from server.engine import Engine
from server.sequence import EngineRequest, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
TOKENIZER = ByteTokenizer()


SYSTEMS = ("no-sleep", "lagged-scheduled")  # of bench/sleep_overlap.py, with its serve flags


async def stream(engine: Engine, model: HybridLM, index: int, tokens: int) -> list[float]:
    """One greedy request of `tokens` tokens; returns its inter-token gaps in seconds."""
    await asyncio.sleep(0.001 * index)  # arrivals a little apart, as the HTTP clients' are
    params = SamplingParams(max_tokens=tokens, temperature=0.0, stop_tokens=frozenset())
    handle = engine.submit(EngineRequest(new_state(model), TOKENIZER.encode(f"stream {index}:"), params))
    gaps, last = [], None
    async for out in handle:
        if out.text:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
        if out.stats is not None:
            return spread_itl(gaps, out.stats.completion_tokens)
    raise AssertionError("a request ended without its final output")


def load_model(source: str, schedule: str, construction: str | None = None) -> HybridLM:
    """sleep_overlap's random-weight model (seed 0; `construction`, default the shipped one) where
    `source` is "random", else the checkpoint in folder `source`; in `schedule`."""
    if source != "random":
        model = load_checkpoint(source)
        model.config = model.config.replace(schedule=schedule)
        return model
    torch.manual_seed(0)
    return HybridLM(random_model_config(construction).replace(schedule=schedule)).eval()


def samples(server: Server) -> dict[tuple[str, frozenset], float]:
    """Every sample of the server's metrics, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for metric in server.metrics.registry.collect()
        for sample in metric.samples
    }


async def measure(server: Server, model: HybridLM, streams: int, tokens: int) -> dict:
    """One round of one system on its running engine: `streams` concurrent streams; the server's
    counters as their change over the round."""
    before = samples(server)
    gaps = await asyncio.gather(*(stream(server.engine, model, i, tokens) for i in range(streams)))
    after = samples(server)

    def change(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    return {
        "itl_ms": [gap * 1e3 for one in gaps for gap in one],
        "sleeps": change("sleepserve_sleep_passes_count"),
        "passes": change("sleepserve_sleep_passes_sum"),
        "deadline_misses": int(change("sleepserve_sleep_deadline_misses_total")),
        **server_times(change),
    }


async def measure_rounds(
    servers: dict[str, tuple[Server, HybridLM]], rounds: int, streams: int, tokens: int
) -> dict[str, list[dict]]:
    """Start the engines, run one round of each that is not counted, then `rounds` rounds of every
    system in turn (in reverse order every other round); stop them."""
    gc.collect()
    gc.freeze()  # as the app does before it starts the engine
    for server, _ in servers.values():
        server.engine.start()
    measured: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for i, name in rounds_in_turn(list(servers), rounds):
            one = await measure(*servers[name], streams, tokens)
            if i:
                measured[name].append(one)
            p99 = np.percentile(one["itl_ms"], 99)
            print(f"round {i}/{rounds} {name:>17}: ITL p99 {p99:6.2f} ms" + ("" if i else " (warm-up)"))
    finally:
        for server, _ in servers.values():
            await server.engine.shutdown(grace=0)
        gc.unfreeze()
    return measured


def pool(name: str, rounds: list[dict]) -> dict:
    itl = np.array([gap for one in rounds for gap in one["itl_ms"]])
    sleeps = sum(one["sleeps"] for one in rounds)
    return {
        "name": name,
        "itl_p50_ms": float(np.percentile(itl, 50)),
        "itl_p99_ms": float(np.percentile(itl, 99)),
        "itl_p99_ms_rounds": [float(np.percentile(one["itl_ms"], 99)) for one in rounds],
        "deadline_misses": sum(one["deadline_misses"] for one in rounds),
        "mean_passes": sum(one["passes"] for one in rounds) / sleeps if sleeps else 0.0,
        "sleeps": int(sleeps),
        **server_means(rounds),
    }


def plot(rows: list[dict], path: Path) -> None:
    """Each system's p99 ITL round by round (pooled p99 dashed) and its mean steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (p99, steps) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, row in enumerate(rows):
        rounds = row["itl_p99_ms_rounds"]
        p99.plot(range(1, len(rounds) + 1), rounds, "o-", color=f"C{i}", label=row["name"])
        p99.axhline(row["itl_p99_ms"], color=f"C{i}", linestyle="--", linewidth=0.8)
    p99.set(xlabel="round", ylabel="ms", title="ITL p99 by round (dashed: pooled)")
    names = [row["name"] for row in rows]
    for j, boundary in enumerate(("none", "crossed")):
        xs = [k + 0.4 * j for k in range(len(rows))]
        steps.bar(xs, [row[f"step_ms_{boundary}"] for row in rows], width=0.4, label=f"boundary: {boundary}")
    steps.set_xticks([k + 0.2 for k in range(len(rows))], names)
    steps.set(ylabel="ms", title="Mean engine step")
    for ax in (p99, steps):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = workload_arguments(__doc__, rounds=4)
    parser.add_argument("--weights", choices=["random", "checkpoint"], default="random")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="with --weights checkpoint")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_itl.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    source = args.checkpoint if args.weights == "checkpoint" else "random"
    lagged = load_model(source, "lagged", args.lagged_construction).config
    tokens = (args.boundaries + 1) * lagged.window
    flags = sleep_overlap.systems(args)
    settings = {name: settings_from_args(flags[name]) for name in SYSTEMS}
    allowed = os.sched_getaffinity(0)
    cpus = server_cpus(settings["lagged-scheduled"], allowed, torch.get_num_threads())
    try:
        if cpus is not None:  # where `sleepserve serve` would run these threads (the engine's inherits it)
            os.sched_setaffinity(0, cpus)
        servers = {}
        for name in SYSTEMS:
            assert settings[name].schedule is not None  # every system names its schedule
            model = load_model(source, settings[name].schedule, args.lagged_construction)
            servers[name] = (build_server(settings[name], model, sleeper_cpus(allowed, cpus)), model)
        rounds = asyncio.run(measure_rounds(servers, args.rounds, args.streams, tokens))
    finally:
        os.sched_setaffinity(0, allowed)  # the caller's thread as it was (a test's, say)
    rows = [pool(name, one) for name, one in rounds.items()]
    base, product = rows
    report = {
        "machine": machine(),
        "streams": args.streams,
        "tokens_per_stream": tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "weights": args.weights,
        "checkpoint": None if source == "random" else source,
        "lagged_construction": lagged.lagged_construction,
        "sleeper_nice": args.sleeper_nice,
        "sleep_worker": args.sleep_worker,
        "sleep_share": args.sleep_share,
        "systems": rows,
        "p99_ratio": product["itl_p99_ms"] / base["itl_p99_ms"],
    }
    for row in rows:
        print(
            f"{row['name']:>17}: ITL p50 {row['itl_p50_ms']:5.2f} ms  p99 {row['itl_p99_ms']:6.2f} ms  "
            f"misses {row['deadline_misses']}  mean N {row['mean_passes']:.2f}  "
            f"step {row['step_ms_none']:.2f} ms, crossing {row['step_ms_crossed']:.2f} ms  "
            f"hand-off {row['handoff_ms_mean']:.2f} ms ({row['handoff_share_slow']:.1%} over 2 ms)"
        )
    print(f"p99 ratio {report['p99_ratio']:.2f}")
    made_with = random_record(lagged) if source == "random" else checkpoint_record(Path(source))
    report = write_result(args.out, report, made_with)
    plot(rows, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
