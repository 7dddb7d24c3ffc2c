"""Session state size and store round trip by context length, against a full-attention KV cache.

One session of the product model (bench.models.product_model) is really driven to each context length
with `model.session.feed` (a sleep at every window boundary). At each length its state is serialised
(`SessionState.to_bytes`, the blob the server stores) and round-tripped through the memory store and a
Redis store (a real `redis-server` started on a free port): save = serialise + put, load = get + parse
and verify. Baseline: the bytes of the KV cache that a full-attention model of the same width and depth
keeps for the same context, 2 × layers × context × heads × head_dim × 4.

    python -m bench.state            # writes bench/results/state.json and state.png
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.decode_scaling import RESULTS, machine
from bench.models import kv_cache_bytes, product_model
from bench.procs import redis_server
from bench.record import made_with, write_result
from model.checkpoint import fingerprint
from model.hybrid import HybridLM
from model.session import feed, new_state, open_window
from model.state import SessionState
from server.sessions import ChatHistory, pack_record, unpack_record
from server.stores import SessionStore, open_store

STORES = ("memory", "redis")


async def _round_trips(
    store: SessionStore, state: SessionState, model: HybridLM, fp: str, repeats: int
) -> dict[str, float]:
    """Median ms of save (serialise + put) and load (get + parse) of one session, `repeats` times."""
    capacity, schedule = model.config.window_capacity, model.config.schedule
    session_id, version = uuid.uuid4().hex, None
    saves, loads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        version = await store.put(
            session_id, pack_record(state.to_bytes(fp, capacity), ChatHistory()), version
        )
        middle = time.perf_counter()
        stored = await store.get(session_id)
        blob, _ = unpack_record(stored.blob)
        SessionState.from_bytes(blob, fp, schedule)
        saves.append((middle - start) * 1e3)
        loads.append((time.perf_counter() - middle) * 1e3)
    await store.delete(session_id)
    save, load = statistics.median(saves), statistics.median(loads)
    return {"save_ms": save, "load_ms": load, "round_trip_ms": save + load}


async def measure(
    model: HybridLM, contexts: list[int], stores: dict[str, SessionStore], repeats: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Feed one session to each context length (ascending) and measure its state there."""
    fp = fingerprint(model)
    capacity = model.config.window_capacity
    state = new_state(model)
    cache, _ = open_window(model, state)
    rng = torch.Generator().manual_seed(seed)
    rows = []
    with tqdm(total=max(contexts), unit="tok", desc="state: feeding") as bar:
        for context in sorted(contexts):
            tokens = torch.randint(0, 256, (context - state.tokens_seen,), generator=rng).tolist()
            if tokens:
                _, cache, _ = feed(model, state, cache, tokens)
                bar.update(len(tokens))
            row: dict[str, Any] = {
                "context_tokens": context,
                "state_bytes": len(state.to_bytes(fp, capacity)),
                "tail_tokens": len(state.tail),
                "chunks_consolidated": state.chunks_consolidated,
                "full_attention_kv_bytes": kv_cache_bytes(model.config, context),
            }
            for name, store in stores.items():
                row[name] = await _round_trips(store, state, model, fp, repeats)
            rows.append(row)
    return rows


async def run(model: HybridLM, contexts: list[int], store_names: list[str], repeats: int) -> list[dict]:
    """`measure` with the named stores opened (and a redis-server started for `redis`)."""

    async def with_stores(redis_url: str | None) -> list[dict]:
        urls = {name: redis_url if name == "redis" else name for name in store_names}
        stores = {name: open_store(url, session_ttl=3600.0) for name, url in urls.items()}
        try:
            return await measure(model, contexts, stores, repeats)
        finally:
            for store in stores.values():
                await store.close()

    if "redis" not in store_names:
        return await with_stores(None)
    with redis_server() as url:
        return await with_stores(url)


def plot(rows: list[dict], store_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["context_tokens"] for r in rows]
    fig, (size, trip) = plt.subplots(1, 2, figsize=(11, 4))
    size.plot(xs, [r["state_bytes"] for r in rows], marker="o", label="sleepserve session blob")
    size.plot(xs, [r["full_attention_kv_bytes"] for r in rows], marker="o", label="full-attention KV cache")
    size.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="bytes", title="Per-session state")
    for name in store_names:
        trip.plot(xs, [r[name]["round_trip_ms"] for r in rows], marker="o", label=f"{name} store")
    trip.set(xscale="log", xlabel="context (tokens)", ylabel="median ms", title="Save + load round trip")
    trip.set_ylim(bottom=0)
    for ax in (size, trip):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.state",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[1024 << i for i in range(7)], help="tokens (1k..64k)"
    )
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    parser.add_argument("--repeats", type=int, default=20, help="round trips timed per context and store")
    parser.add_argument("--out", type=Path, default=RESULTS / "state.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model, source = product_model()
    rows = asyncio.run(run(model, args.contexts, args.stores, args.repeats))
    sizes = {r["state_bytes"] for r in rows}
    result = {
        "machine": machine(),
        "model": source,
        "config": model.config.to_dict(),
        "stores": args.stores,
        "repeats": args.repeats,
        "state_constant": len(sizes) == 1,
        "results": rows,
    }
    write_result(args.out, result, made_with(source, model.config))
    plot(rows, args.stores, args.out.with_suffix(".png"))
    for r in rows:
        trips = ", ".join(f"{name} {r[name]['round_trip_ms']:.2f} ms" for name in args.stores)
        ratio = r["full_attention_kv_bytes"] / r["state_bytes"]
        print(
            f"context {r['context_tokens']:>6}: state {r['state_bytes']:>8,} B "
            f"(full-attention KV {r['full_attention_kv_bytes']:>12,} B, {ratio:,.0f}×); round trip {trips}"
        )
    print(f"state size constant in context: {result['state_constant']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
