"""One bad sequence never fails another: non-finite logits, a model error on one row of a batch, or a
sleep that fails end that sequence alone with an error, and every other stream finishes exactly as it
would have alone. Sampling is safe at every temperature the schema admits; stop strings are matched in
linear time with the same answers as a plain search."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from support import tiny_model

from model.session import generate, new_state
from model.tokenizer import ByteTokenizer
from scheduler.isolation import create_executor
from scheduler.policy import DepthPolicy
from server.engine import Engine
from server.metrics import Metrics
from server.sampling import StopMatcher, sample
from server.sequence import EngineRequest, SamplingParams

TOKENIZER = ByteTokenizer()
PROMPTS = [f"stream {i}: hello" for i in range(5)]


@pytest.fixture(params=["inline", "interleaved"])
async def make_engine(request):
    engines: list[Engine] = []

    def make(model, **kwargs) -> Engine:
        metrics = Metrics()
        executor = None
        if request.param == "interleaved":
            executor = create_executor(model, "interleaved", metrics=metrics, policy=DepthPolicy(1, 8))
        engine = Engine(model, passes=model.config.sleep_passes, metrics=metrics, executor=executor, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown(grace=0)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_tokens=frozenset())


def reference(model, prompt: str, max_tokens: int) -> list[int]:
    return generate(model, new_state(model), TOKENIZER.encode(prompt), max_tokens)[0]


async def collect(handle) -> tuple[str, object]:
    parts = []
    async for out in handle:
        parts.append(out.text)
    return "".join(parts), out


async def run_alongside(engine: Engine, model, culprit: EngineRequest, max_tokens: int = 20):
    """Submit the culprit among five ordinary streams in one batch; return the culprit's final output
    after checking that every other stream gave exactly its text alone."""
    handles = [
        engine.submit(EngineRequest(new_state(model), TOKENIZER.encode(p), greedy(max_tokens)))
        for p in PROMPTS
    ]
    bad = engine.submit(culprit)
    engine.start()
    results = await asyncio.gather(*(collect(h) for h in [*handles, bad]))
    for prompt, (text, final) in zip(PROMPTS, results, strict=False):
        assert final.finish_reason == "length", (prompt, final)
        assert text == TOKENIZER.decode(reference(model, prompt, max_tokens)), prompt
    assert engine.alive
    return results[-1][1]


@pytest.mark.parametrize("temperature", [5e-324, 1e-320, 1e-40, 1e-30, 1e-8])
def test_tiny_temperatures_sample_the_likeliest_token(temperature):
    logits = torch.tensor([0.5, 3.0, -1.0, 2.999, float("-inf")]) * 1e3
    generator = torch.Generator().manual_seed(0)
    for top_p, top_k in [(1.0, 0), (0.5, 0), (1.0, 2), (1e-9, 3)]:
        params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
        assert sample(logits, params, generator) == 1


def test_large_logits_at_high_temperature_stay_finite():
    logits = torch.tensor([3e38, -3e38, 0.0])
    params = SamplingParams(max_tokens=1, temperature=2.0)
    assert sample(logits, params, torch.Generator().manual_seed(0)) == 0


async def test_subnormal_temperature_among_running_streams(make_engine):
    model = tiny_model()
    engine = make_engine(model)
    params = SamplingParams(max_tokens=20, temperature=1e-40, stop_tokens=frozenset())
    prompt = "subnormal"
    final = await run_alongside(
        engine, model, EngineRequest(new_state(model), TOKENIZER.encode(prompt), params)
    )
    assert final.finish_reason == "length"  # and greedy in effect: the argmax at every step
    assert final.reply == TOKENIZER.decode(reference(model, prompt, 20))


def nan_memory(state) -> None:
    state.memory[0][0, 0, 0] = float("nan")


def token_outside_the_vocabulary(state) -> None:
    state.tail, state.tokens_seen = [5, 100_000], 2


@pytest.mark.parametrize(
    ("poison", "message"),
    [(nan_memory, "non-finite"), (token_outside_the_vocabulary, "window could not be rebuilt")],
)
async def test_a_poisoned_session_fails_alone(make_engine, poison, message):
    """A state that validation would refuse, given to the engine anyway (it must not trust states
    either): that request ends with an error, the batch runs on."""
    model = tiny_model()
    engine = make_engine(model)
    poisoned = new_state(model)
    poison(poisoned)
    culprit = EngineRequest(poisoned, TOKENIZER.encode("poison"), greedy(20))
    final = await run_alongside(engine, model, culprit)
    assert final.finish_reason == "error" and message in final.error


async def test_a_row_that_breaks_the_batch_is_found_and_fails_alone(make_engine):
    """A model error that the batch cannot tie to a row (the batched call raises) is retried row by
    row: only the culprit's request fails, mid-decode, and the other streams are unaffected."""
    model = tiny_model()
    others = set()
    for prompt in PROMPTS:
        others |= set(TOKENIZER.encode(prompt)) | set(reference(model, prompt, 20))
    culprit, marker = next(
        (p, t)
        for p in (f"culprit {i}" for i in range(50))
        for t in reference(model, p, 20)[2:]
        if t not in others and t not in TOKENIZER.encode(p)
    )
    extend = model.extend

    def failing_extend(tokens, cache):
        if bool((tokens == marker).any()):
            raise RuntimeError("kernel failure")
        return extend(tokens, cache)

    model.extend = failing_extend
    engine = make_engine(model)
    final = await run_alongside(
        engine, model, EngineRequest(new_state(model), TOKENIZER.encode(culprit), greedy(20))
    )
    assert final.finish_reason == "error" and "model failed" in final.error
    assert 2 <= final.stats.completion_tokens < 20  # it failed in the decode batch, not before


@pytest.mark.parametrize("isolation", ["inline", "thread"])
async def test_a_failing_sleep_fails_its_sequence_alone(isolation):
    """A sleep runs on one session's chunk: when it raises, that session's request ends with an error.
    (On the decode thread, or on the worker thread whose result the engine collects.)"""
    model = tiny_model()
    poisoned_prompt = TOKENIZER.encode("y" * 30)  # crosses boundaries while the others are short
    sleep = model.sleep

    def failing_sleep(memory, chunk, passes):
        if bool((chunk == poisoned_prompt[0]).all(-1).any()):
            raise RuntimeError("sleep failure")
        return sleep(memory, chunk, passes)

    model.sleep = failing_sleep
    metrics = Metrics()
    executor = None if isolation == "inline" else create_executor(model, metrics=metrics, isolation=isolation)
    engine = Engine(model, passes=2, metrics=metrics, executor=executor)
    try:
        culprit = EngineRequest(new_state(model), poisoned_prompt, greedy(6))
        final = await run_alongside(engine, model, culprit, 6)
    finally:
        await engine.shutdown(grace=0)
    assert final.finish_reason == "error" and "sleep failed" in final.error


async def test_a_window_that_cannot_be_rebuilt_after_a_sleep_fails_alone():
    """Background sleep, lagged: at a boundary the window is rebuilt from the new memory for every
    sequence crossing it, in one batch; when that raises, each is rebuilt alone and only the culprit
    (whose chunk holds a token the model cannot take) fails."""
    model = tiny_model("lagged")
    others = set()
    for prompt in PROMPTS:
        others |= set(TOKENIZER.encode(prompt)) | set(reference(model, prompt, 20))
    marker = next(t for t in range(256) if t not in others)
    fill = model.fill

    def failing_fill(tokens, cache):
        if bool((tokens == marker).any()):
            raise RuntimeError("kernel failure")
        return fill(tokens, cache)

    model.fill = failing_fill
    metrics = Metrics()
    engine = Engine(
        model, passes=2, metrics=metrics, executor=create_executor(model, "thread", metrics=metrics)
    )
    prompt = [ord("y")] * 10 + [marker] + [ord("y")] * 19  # the marker in the second chunk
    try:
        final = await run_alongside(engine, model, EngineRequest(new_state(model), prompt, greedy(20)))
    finally:
        await engine.shutdown(grace=0)
    assert final.finish_reason == "error" and "rebuilt" in final.error


def brute_force_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string to be completed, reading the text character by character, begins
    (the longest of those completed by one character)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return min(starts)
    return None


def test_stop_matcher_agrees_with_a_plain_search():
    rng = random.Random(0)
    for _ in range(400):
        stops = tuple(
            "".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))
        )
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        matcher, found, at = StopMatcher(stops), None, 0
        while at < len(text) and found is None:
            piece = text[at : at + rng.randint(1, 3)]
            found = matcher.feed(piece, at)
            at += len(piece)
        assert found == brute_force_stop(text, stops), (text, stops)
        if found is None:  # what is held back is exactly the longest end that starts a stop string
            held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert matcher.partial == held


def test_stop_matching_is_linear():
    """Four 4 KB stop strings against 20,000 characters that almost match them: quadratic matching
    took minutes; the automaton a fraction of a second (a generous bound for a busy CI machine)."""
    import time

    stops = tuple("a" * 4095 + c for c in "bcde")
    matcher = StopMatcher(stops)
    start = time.perf_counter()
    for i in range(20_000):
        assert matcher.feed("a", i) is None
        assert matcher.partial == min(i + 1, 4095)
    assert time.perf_counter() - start < 5.0
