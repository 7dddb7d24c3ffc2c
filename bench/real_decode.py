"""A Qwen3.5-shaped model served by sleepserve against `transformers` on the same weights, in one run.

The model is a `Qwen3_5TextConfig` scaled down to fit a small CPU (random weights: latency depends on
shapes), saved with `save_pretrained` and loaded by both: sleepserve through `model.loading` (the
`qwen3_5` family, with a serve-time window, lagged schedule and N), transformers as
`Qwen3_5ForCausalLM` with its own cache.

- Per-token latency by context: one session is driven to each context length (sleepserve: fed with a
  sleep at every window boundary; transformers: prefilled into its cache) and a copy kept there; then
  `--probe` single-token steps of each copy are timed, the copies in turn (the median of each). The
  state is what a session holds there: sleepserve's session blob, transformers' cache tensors.
- Output tokens/s at `--concurrent` requests: sleepserve's engine (continuous batching, built as
  `sleepserve serve` builds it, without HTTP) against `generate` called per request, one request at a
  time, as a plain transformers server would (`transformers serve` is not run here: "method" says so).

    python -m bench.real_decode            # writes bench/results/real_decode.{json,png}
    python -m bench.real_decode --smoke    # the smallest size, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bench.decode_scaling import machine
from bench.record import random_record, write_result
from model.checkpoint import fingerprint
from model.loading import load_model
from model.session import feed, new_state, open_window
from server.context import build_server
from server.sequence import EngineRequest, SamplingParams
from server.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"

# Qwen3.5-0.8B's shape (hidden 1024, 24 layers, 3 GDN : 1 attention, 8/2 attention heads of 256 with
# RoPE on a quarter, 16 GDN heads of 128, vocabulary 248k) scaled down for two CPU cores.
FULL = {
    "vocab_size": 16384,
    "hidden_size": 256,
    "intermediate_size": 896,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
}
SMOKE = {
    **FULL,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "head_dim": 32,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
}


def save_checkpoint(folder: Path, shape: dict) -> None:
    """A random Qwen3.5 checkpoint as transformers saves it, with a one-token tokenizer (the benchmark
    feeds token ids: the tokenizer is there because a checkpoint folder has one)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    config = Qwen3_5TextConfig(
        **shape,
        linear_conv_kernel_dim=4,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        eos_token_id=0,
    )
    Qwen3_5ForCausalLM(config).eval().save_pretrained(str(folder))
    vocab = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token="<unk>").save_pretrained(str(folder))


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def medians_in_turn(steps: list[Callable[[], None]], probe: int) -> list[float]:
    """The median ms of each of `steps` over `probe` calls, called in turn (one call of each per round),
    so that a busy spell of a shared host falls on all of them alike."""
    samples: list[list[float]] = [[] for _ in steps]
    for _ in range(probe):
        for step, times in zip(steps, samples, strict=True):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(times) for times in samples]


@torch.inference_mode()
def sleepserve_latency(loaded, contexts: list[int], probe: int, vocab: int) -> list[dict]:
    """One session driven to each context (fed, sleeping at every boundary), a copy of it kept there;
    then single-token steps of the copies, in turn."""
    model = loaded.model
    fp, capacity = fingerprint(model), model.config.window_capacity
    state = new_state(model)
    cache, _ = open_window(model, state)
    copies, seed = [], 0
    for context in contexts:
        while state.tokens_seen < context:
            step = min(model.config.window, context - state.tokens_seen)
            _, cache, _ = feed(model, state, cache, random_ids(step, vocab, seed := seed + 1))
        copies.append({"state": state.clone(), "cache": cache.select([0])})

    def stepper(copy: dict, tokens: Iterator[int]) -> Callable[[], None]:
        def step() -> None:
            _, copy["cache"], _ = feed(model, copy["state"], copy["cache"], [next(tokens)])

        return step

    steps = [stepper(copy, iter(random_ids(probe, vocab, 500 + i))) for i, copy in enumerate(copies)]
    itls = medians_in_turn(steps, probe)
    return [
        {"context_tokens": context, "itl_ms": itl, "state_bytes": len(copy["state"].to_bytes(fp, capacity))}
        for context, itl, copy in zip(contexts, itls, copies, strict=True)
    ]


def cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache holds (attention keys and values, GDN states)."""
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            tensors = value.values() if isinstance(value, dict) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    return total


@torch.inference_mode()
def transformers_latency(hf, contexts: list[int], probe: int, vocab: int, prefill_chunk: int) -> list[dict]:
    """One sequence prefilled into transformers' cache up to each context, a copy of the cache kept
    there; then single-token steps of the copies, in turn."""
    from transformers import DynamicCache

    cache, seen, copies, seed = DynamicCache(config=hf.config), 0, [], 1000
    for context in contexts:
        while seen < context:
            step = min(prefill_chunk, context - seen)
            ids = torch.tensor([random_ids(step, vocab, seed := seed + 1)])
            hf(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            seen += step
        copies.append(copy.deepcopy(cache))
    sizes = [cache_bytes(c) for c in copies]

    def stepper(cache, tokens: Iterator[int]) -> Callable[[], None]:
        return lambda: hf(input_ids=torch.tensor([[next(tokens)]]), cache=cache, use_cache=True)

    steps = [stepper(c, iter(random_ids(probe, vocab, 1500 + i))) for i, c in enumerate(copies)]
    itls = medians_in_turn(steps, probe)
    return [
        {"context_tokens": context, "itl_ms": itl, "state_bytes": size}
        for context, itl, size in zip(contexts, itls, sizes, strict=True)
    ]


async def sleepserve_throughput(
    settings: Settings, requests: int, prompt: int, output: int, vocab: int
) -> float:
    """Output tokens/s of `requests` greedy requests submitted together to the engine of a server built
    as `sleepserve serve` builds it."""
    server = build_server(settings)
    engine = server.engine
    engine.start()
    try:
        params = SamplingParams(max_tokens=output, temperature=0.0, stop_tokens=frozenset())
        start = time.perf_counter()
        handles = [
            engine.submit(EngineRequest(new_state(server.model), random_ids(prompt, vocab, 2000 + i), params))
            for i in range(requests)
        ]
        finals = await asyncio.gather(*(handle.result for handle in handles))
        elapsed = time.perf_counter() - start
    finally:
        await engine.shutdown(0)
    return sum(final.stats.completion_tokens for final in finals) / elapsed


@torch.inference_mode()
def transformers_throughput(hf, requests: int, prompt: int, output: int, vocab: int) -> float:
    """Output tokens/s of `generate` called per request, one request after the other."""
    start, produced = time.perf_counter(), 0
    for i in range(requests):
        ids = torch.tensor([random_ids(prompt, vocab, 2000 + i)])
        out = hf.generate(ids, max_new_tokens=output, min_new_tokens=output, do_sample=False)
        produced += out.shape[1] - prompt
    return produced / (time.perf_counter() - start)


def timed(name: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, size, rate) = plt.subplots(1, 3, figsize=(14, 4))
    for system in report["systems"]:
        rows = system["by_context"]
        xs = [r["context_tokens"] for r in rows]
        latency.plot(xs, [r["itl_ms"] for r in rows], marker="o", label=system["name"])
        size.plot(xs, [r["state_bytes"] / 2**20 for r in rows], marker="o", label=system["name"])
    rate.bar([s["name"] for s in report["systems"]], [s["output_tokens_per_s"] for s in report["systems"]])
    latency.set(
        xscale="log", xlabel="context (tokens)", ylabel="median ms / token", title="Per-token latency"
    )
    size.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB", title="Per-session state")
    rate.set(ylabel="output tokens / s", title=f"{report['workload']['concurrent']} concurrent requests")
    for ax in (latency, size):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the smallest size (a CI check, seconds)")
    parser.add_argument("--contexts", type=int, nargs="+", help="default 1k 4k 16k 32k (smoke: 64 256)")
    parser.add_argument("--probe", type=int, help="decode steps timed at each context (default 64; smoke 4)")
    parser.add_argument("--window", type=int, help="sleepserve's window L (default 512; smoke 32)")
    parser.add_argument("--sleep-passes", type=int, default=2, help="sleepserve's N")
    parser.add_argument("--concurrent", type=int, help="requests at once (default 16; smoke 4)")
    parser.add_argument("--prompt-tokens", type=int, help="per request (default 384; smoke 16)")
    parser.add_argument("--output-tokens", type=int, help="per request (default 160; smoke 8)")
    # One thread by default, for both systems: a small model's ops are too small to split, and on a busy
    # host two threads wait on each other at every op (seen: 10-30x slower steps on 2 shared cores).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_decode.json")
    args = parser.parse_args(argv)
    small = args.smoke
    contexts = args.contexts or ([64, 256] if small else [1024, 4096, 16384, 32768])
    probe = args.probe or (4 if small else 64)
    window = args.window or (32 if small else 512)
    concurrent = args.concurrent or (4 if small else 16)
    prompt = args.prompt_tokens or (16 if small else 384)  # with the output: past one window
    output = args.output_tokens or (8 if small else 160)
    shape = SMOKE if small else FULL
    torch.set_num_threads(args.threads)
    from transformers import Qwen3_5ForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder), shape)
        loaded = load_model(folder, window=window, schedule="lagged", sleep_passes=args.sleep_passes)
        hf = Qwen3_5ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        vocab = shape["vocab_size"]
        ours = timed("sleepserve latency", sleepserve_latency, loaded, contexts, probe, vocab)
        theirs = timed("transformers latency", transformers_latency, hf, contexts, probe, vocab, 4 * window)
        settings = Settings(
            model=folder, window=window, schedule="lagged", sleep_passes=args.sleep_passes, store="memory"
        )
        our_rate = timed(
            "sleepserve throughput",
            asyncio.run,
            sleepserve_throughput(settings, concurrent, prompt, output, vocab),
        )
        their_rate = timed(
            "transformers throughput", transformers_throughput, hf, concurrent, prompt, output, vocab
        )
    config = loaded.model.config
    report = {
        "machine": machine(),
        "model": {
            **shape,
            "layers": "/".join(config.layers),
            "window": window,
            "schedule": "lagged",
            "sleep_passes": args.sleep_passes,
            "parameters": sum(p.numel() for p in hf.parameters()),
        },
        "workload": {
            "concurrent": concurrent,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "probe": probe,
            "threads": args.threads,
        },
        "systems": [
            {
                "name": "sleepserve",
                "method": "the engine of `sleepserve serve` (continuous batching), in process",
                "by_context": ours,
                "output_tokens_per_s": our_rate,
            },
            {
                "name": "transformers",
                "method": "Qwen3_5ForCausalLM with its own cache; generate per request, one at a time",
                "by_context": theirs,
                "output_tokens_per_s": their_rate,
            },
        ],
    }
    report = write_result(args.out, report, made_with=random_record(config))
    plot(report, args.out.with_suffix(".png"))
    for system in report["systems"]:
        for row in system["by_context"]:
            print(
                f"{system['name']:>12} @ {row['context_tokens']:>6}: {row['itl_ms']:7.3f} ms/token, "
                f"state {row['state_bytes']:>11,} B"
            )
        print(
            f"{system['name']:>12}: {system['output_tokens_per_s']:.1f} output tokens/s at {concurrent} concurrent"
        )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
