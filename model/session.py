"""A session's life on top of the model: feeding tokens, window boundaries, sleep, greedy decoding.

The two schedules differ only in how much completed text attention keeps (docs/design.md, Sleep):
- `hard`: the window is the current chunk. When it fills, M_j = Sleep_N(M_{j-1}, chunk j) and the
  window empties.
- `lagged` (re-prefill): the window is the previous chunk plus the current one, run from M_{j-2}.
  When the current chunk fills, the previous one is slept (M_{j-1} = Sleep_N(M_{j-2}, chunk j-1)) and
  the window is rebuilt as the just-completed chunk run from M_{j-1}; that run is pass 1 of its own
  later sleep. Attention over the window is plain causal, so the previous chunk only sees itself.
- `lagged` (stale-kv): the same chunks and sleeps, but at a boundary the just-completed chunk keeps
  the first block's keys and values of its own decoding (`HybridLM.stale_window`) and the fast
  weights restart from M_{j-1}: nothing is recomputed. The first block is the only attention block
  and sees only tokens, so those keys and values too follow from the tail (`HybridLM.stale_prefix`).

Either way the window is a pure function of (memory, tail): `open_window` rebuilds it from the state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from model.hybrid import HybridLM, WindowCache
from model.state import SessionState


@dataclass
class SleepReport:
    tokens: int
    passes: int
    seconds: float


def new_state(model: HybridLM) -> SessionState:
    return SessionState(memory=[m[0] for m in model.empty_memory(1)], schedule=model.config.schedule)


def batch_memory(model: HybridLM, states: list[SessionState]) -> list[Tensor]:
    """The memories of `states` as one batch on the model's device: one [B, H, K, V] per gdn layer."""
    return [torch.stack(layer).to(model.device) for layer in zip(*(s.memory for s in states), strict=True)]


def open_window(model: HybridLM, state: SessionState) -> tuple[WindowCache, Tensor | None]:
    """Rebuild the window of a session from its state. Returns the cache and the logits [vocab] that
    follow the last tail token (None when the tail is empty)."""
    cache = model.open_window(batch_memory(model, [state]))
    tail = state.tail
    if model.config.stale_kv and state.prev_len:
        cache = model.stale_prefix(torch.tensor([tail[: state.prev_len]], device=model.device), cache)
        tail = tail[state.prev_len :]
    if not tail:
        return cache, None
    logits, cache = model.extend(torch.tensor([tail], device=model.device), cache)
    return cache, logits[0, -1]


def open_windows(model: HybridLM, states: list[SessionState]) -> list[tuple[WindowCache, int]]:
    """`open_window` for several sessions at once (no logits): one batched prefill per tail length.
    Returns, for each state, the batch of windows that holds its window and its row there."""
    if model.config.stale_kv:  # the engine moves stale windows instead (`HybridLM.stale_window`)
        return [(open_window(model, state)[0], 0) for state in states]
    windows: list[tuple[WindowCache, int] | None] = [None] * len(states)
    by_length: dict[int, list[int]] = {}
    for i, state in enumerate(states):
        by_length.setdefault(len(state.tail), []).append(i)
    for length, members in by_length.items():
        batch = model.open_window(batch_memory(model, [states[i] for i in members]))
        if length:
            batch = model.fill(torch.tensor([states[i].tail for i in members], device=model.device), batch)
        for row, i in enumerate(members):
            windows[i] = (batch, row)
    return windows  # type: ignore[return-value]


def room_in_chunk(model: HybridLM, state: SessionState) -> int:
    """Tokens the current chunk can take before its boundary."""
    return model.config.window - (len(state.tail) - state.prev_len)


def sleep_on(model: HybridLM, state: SessionState, n_tokens: int, passes: int) -> SleepReport:
    """Consolidate the first n_tokens of the tail into memory (in place) and drop them from the tail."""
    chunk = torch.tensor([state.tail[:n_tokens]], device=model.device)
    start = time.perf_counter()
    memory = model.sleep([m[None].to(model.device) for m in state.memory], chunk, passes)
    seconds = time.perf_counter() - start
    apply_sleep(state, [m[0] for m in memory], n_tokens, passes, seconds)
    return SleepReport(n_tokens, passes, seconds)


def apply_sleep(
    state: SessionState, memory: list[Tensor], n_tokens: int, passes: int, seconds: float
) -> None:
    """Swap in the memory that consolidated the first n_tokens of the tail, and count it."""
    state.memory = memory
    del state.tail[:n_tokens]
    state.prev_len = max(0, state.prev_len - n_tokens)
    state.chunks_consolidated += 1
    state.consolidated_tokens += n_tokens
    state.sleep_passes += passes
    state.last_passes = passes
    state.sleep_seconds += seconds


def boundary_chunk(model: HybridLM, state: SessionState) -> int:
    """At a full chunk: how many tokens the schedule consolidates now (0 for lagged's first chunk)."""
    if model.config.schedule == "hard":
        return len(state.tail)
    return state.prev_len


def cross_boundary(
    model: HybridLM, state: SessionState, passes: int, cache: WindowCache | None = None
) -> tuple[WindowCache | None, SleepReport | None]:
    """Handle a full chunk: sleep what the schedule says and return the rebuilt window (None when
    the window is unchanged, as at lagged's first chunk). `cache` is the session's full window."""
    n_tokens = boundary_chunk(model, state)
    if n_tokens and passes == 1 and cache is not None and model.config.schedule == "hard":
        # N = 1 is the plain hybrid: the wake pass over the chunk (from the memory, attention within
        # the chunk) is the whole sleep, so its fast weights are the new memory. Nothing to compute.
        apply_sleep(state, [m[0] for m in model.window_memory(cache)], n_tokens, 1, 0.0)
        report = SleepReport(n_tokens, 1, 0.0)
    else:
        report = sleep_on(model, state, n_tokens, passes) if n_tokens else None
    if model.config.schedule == "lagged":
        state.prev_len = len(state.tail)  # the completed chunk stays visible until its own sleep
    if report is None:
        return None, None
    if model.config.stale_kv and cache is not None:
        return model.stale_window(cache, batch_memory(model, [state]), len(state.tail)), report
    return open_window(model, state)[0], report


def consolidate_all(model: HybridLM, state: SessionState, passes: int) -> list[SleepReport]:
    """Early consolidation (end of turn, idle, explicit request): sleep the whole tail chunk by chunk,
    leaving an empty window. Only for checkpoints trained with variable chunk lengths."""
    reports = []
    if state.prev_len:
        reports.append(sleep_on(model, state, state.prev_len, passes))
    if state.tail:
        reports.append(sleep_on(model, state, len(state.tail), passes))
    return reports


@torch.no_grad()
def feed(
    model: HybridLM,
    state: SessionState,
    cache: WindowCache,
    tokens: list[int],
    passes: int | None = None,
    return_all: bool = False,
) -> tuple[Tensor, WindowCache, list[SleepReport]]:
    """Feed tokens to a session, sleeping at every window boundary (synchronously).

    Updates `state` in place; returns the logits after the last token ([vocab], or [T, vocab] with
    return_all), the window cache, and a report per sleep.
    """
    if not tokens:
        raise ValueError("feed needs at least one token")
    passes = passes or model.config.sleep_passes
    outputs, reports = [], []
    start = 0
    while start < len(tokens):
        piece = tokens[start : start + room_in_chunk(model, state)]
        logits, cache = model.extend(torch.tensor([piece], device=model.device), cache)
        outputs.append(logits[0] if return_all else logits[0, -1:])
        state.tail += piece
        state.tokens_seen += len(piece)
        start += len(piece)
        if room_in_chunk(model, state) == 0:
            rebuilt, report = cross_boundary(model, state, passes, cache)
            if report is not None:
                cache = rebuilt
                reports.append(report)
    logits = torch.cat(outputs)
    return (logits if return_all else logits[-1]), cache, reports


@torch.no_grad()
def generate(
    model: HybridLM,
    state: SessionState,
    prompt: list[int],
    max_new_tokens: int,
    passes: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    cache: WindowCache | None = None,
) -> tuple[list[int], WindowCache]:
    """Greedy decoding (temperature 0): feed the prompt, then each argmax token in turn."""
    if cache is None:
        cache, _ = open_window(model, state)
    logits, cache, _ = feed(model, state, cache, prompt, passes)
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(int(logits.argmax()))
        logits, cache, _ = feed(model, state, cache, out[-1:], passes)  # the reply joins the session
        if stop is not None and stop(out):
            break
    return out, cache
