"""The engine against the single-session reference (`model.session`): batching, no cross-talk, sessions
across window boundaries in both schedules, stop handling, aborts, queue bound and timeouts."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import CancelledError, Future

import pytest
import torch
from support import SCHEDULES, GatedModel, tiny_model

from model.session import generate, new_state
from model.tokenizer import EOS, ByteTokenizer
from scheduler.isolation import create_executor
from scheduler.policy import DecodeRate, DepthPolicy
from server.engine import Engine
from server.metrics import Metrics
from server.sequence import EngineRequest, Output, QueueFull, SamplingParams

TOKENIZER = ByteTokenizer()


@pytest.fixture(params=["inline", "thread", "process", "interleaved", "offload"])
async def make_engine(request):
    """Engines that sleep on the decode thread, on the scheduler's worker (a thread or a child
    process), or interleaved with the decode steps, their passes offloaded to a child process or not
    (the answers must agree)."""
    engines: list[Engine] = []

    def make(model, start: bool = True, **kwargs) -> Engine:
        metrics = Metrics()
        executor = None
        if request.param != "inline":
            paced = request.param in ("interleaved", "offload")
            policy = DepthPolicy(1, 8) if paced else None  # paces, N stays fixed
            executor = create_executor(model, metrics=metrics, isolation=request.param, policy=policy)
        engine = Engine(model, passes=model.config.sleep_passes, metrics=metrics, executor=executor, **kwargs)
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.shutdown(grace=0)


async def collect(handle) -> tuple[str, Output]:
    parts = []
    async for out in handle:
        parts.append(out.text)
    return "".join(parts), out


def reference(model, prompt: str, max_tokens: int, state=None) -> str:
    out, _ = generate(
        model, state or new_state(model), TOKENIZER.encode(prompt), max_tokens, stop=lambda o: o[-1] == EOS
    )
    return TOKENIZER.decode(out)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


async def test_sixteen_streams_share_a_batch_without_cross_talk(make_engine):
    model = tiny_model()
    engine = make_engine(model, start=False, prefill_chunk=1024)  # every prompt in the first iteration
    prompts = [f"stream {i}: {'x' * (i % 5)}" for i in range(18)]
    handles = [
        engine.submit(
            EngineRequest(new_state(model), TOKENIZER.encode(p), greedy(24, stop_tokens=frozenset()))
        )
        for p in prompts
    ]
    engine.start()
    results = await asyncio.gather(*(collect(h) for h in handles))
    assert engine.max_batch >= 16
    buckets = {
        s.labels["le"]: s.value
        for s in engine.metrics.decode_batch_size.collect()[0].samples
        if s.name.endswith("_bucket")
    }
    assert buckets["32.0"] - buckets["16.0"] > 0  # the metric saw steps of more than 16 sequences
    for prompt, (text, final) in zip(prompts, results, strict=True):
        out, _ = generate(model, new_state(model), TOKENIZER.encode(prompt), 24)
        assert text == TOKENIZER.decode(out), prompt
        assert final.finish_reason == "length" and final.stats.completion_tokens == 24


@pytest.mark.parametrize("schedule, construction", SCHEDULES)
async def test_session_matches_reference_across_windows(make_engine, schedule, construction):
    model = tiny_model(schedule, lagged_construction=construction)
    engine = make_engine(model)
    state, ref = new_state(model), new_state(model)
    consolidated = 0
    for turn in range(4):  # 4 × (9 + 13) tokens: many boundaries of window 8, prompts cross them
        prompt = TOKENIZER.encode(f"turn {turn}:")
        handle = engine.submit(
            EngineRequest(state, prompt, greedy(13, stop_tokens=frozenset()), stateful=True)
        )
        text, final = await collect(handle)
        out, _ = generate(model, ref, prompt, 13)
        assert text == TOKENIZER.decode(out)
        assert state.tail == ref.tail and state.prev_len == ref.prev_len
        assert state.tokens_seen == ref.tokens_seen == final.stats.session_tokens_total
        assert state.chunks_consolidated == ref.chunks_consolidated
        for mine, theirs in zip(state.memory, ref.memory, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        consolidated += final.stats.consolidated_tokens
        assert final.stats.prompt_tokens == len(prompt) and final.stats.completion_tokens == 13
    assert consolidated == state.consolidated_tokens > 0
    assert state.chunks_consolidated >= 8
    steps = {
        sample.labels["boundary"]: sample.value
        for sample in engine.metrics.engine_step.collect()[0].samples
        if sample.name.endswith("_count")
    }
    assert 0 < steps["crossed"] < steps["none"]  # the boundary steps are timed apart from the others
    counted = engine.metrics.sleep_tokens._value.get()
    # In the background a lagged sleep still running when a request ends is done again by the next
    # request (the stored state never holds a half-used result): the metric counts the work done.
    assert counted == consolidated if engine.executor is None else counted >= consolidated


async def test_prefill_is_sliced_so_running_streams_keep_decoding(make_engine):
    model = tiny_model()
    engine = make_engine(model, start=False, prefill_chunk=4)
    params = greedy(80, stop_tokens=frozenset())
    short = engine.submit(EngineRequest(new_state(model), TOKENIZER.encode("hi"), params))
    engine.start()
    first = await anext(aiter(short))  # the short one decodes
    long_prompt = "a long prompt " * 10  # 140 tokens: 35 slices of 4
    long = engine.submit(EngineRequest(new_state(model), TOKENIZER.encode(long_prompt), greedy(5)))
    events: list[str] = []

    async def drain(name, handle):
        parts = []
        async for out in handle:
            events.append(name)
            parts.append(out.text)
        return "".join(parts)

    short_text, long_text = await asyncio.gather(drain("short", short), drain("long", long))
    assert first.text + short_text == reference(model, "hi", 80)
    assert long_text == reference(model, long_prompt, 5)
    assert events.index("long") >= 20  # the short stream kept streaming while the long prompt was fed


async def test_a_step_wakes_the_event_loop_once(make_engine):
    """The outputs of one engine step reach the requests' event loop in one call for the step's tokens
    (made before any boundary work) and at most one more for what ended after them, not one per stream
    (each call wakes the loop, which then contends with the decode loop for the GIL); in order: every
    text equals the reference. Each call's wait for the loop is observed once."""

    class CountingLoop:
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop, self.calls = loop, 0

        def call_soon_threadsafe(self, *args):
            self.calls += 1
            return self.loop.call_soon_threadsafe(*args)

    model = tiny_model()
    engine = make_engine(model, start=False)
    prompts = [f"stream {i}" for i in range(4)]
    handles = [
        engine.submit(EngineRequest(new_state(model), TOKENIZER.encode(p), greedy(12))) for p in prompts
    ]
    loop = CountingLoop(asyncio.get_running_loop())
    for seq in engine.waiting:
        seq.loop = loop
    calls_per_step = []
    with torch.inference_mode():
        while engine.busy:
            before = loop.calls
            engine.step()
            calls_per_step.append(loop.calls - before)
    time.sleep(0.02)  # the loop is held: every handed-over call waits at least this long for it
    results = await asyncio.gather(*(collect(h) for h in handles))
    assert max(calls_per_step) <= 2 < len(prompts)
    for prompt, (text, _) in zip(prompts, results, strict=True):
        assert text == reference(model, prompt, 12)
    handoff = engine.metrics.output_handoff.collect()[0].samples
    count = next(s.value for s in handoff if s.name.endswith("_count"))
    waited = next(s.value for s in handoff if s.name.endswith("_sum"))
    assert count == sum(calls_per_step)
    assert waited >= 0.02 * count


async def test_stop_strings_cut_the_text(make_engine):
    model = tiny_model()
    engine = make_engine(model)
    full = reference(model, "Hello", 30)
    stop = full[10:13]
    text, final = await collect(
        engine.submit(EngineRequest(new_state(model), TOKENIZER.encode("Hello"), greedy(30, stop=(stop,))))
    )
    assert final.finish_reason == "stop"
    assert text == full[: full.index(stop)]


async def test_abort_keeps_processed_tokens(make_engine):
    model = tiny_model()
    engine = make_engine(model)
    state = new_state(model)
    handle = engine.submit(EngineRequest(state, TOKENIZER.encode("abc"), greedy(10_000), stateful=True))
    async for out in handle:
        if out.text:
            handle.abort()
            break
    final = await handle.result
    assert final.finish_reason == "abort"
    assert state.tokens_seen == 3 + final.stats.completion_tokens - 1  # the last sampled token was not fed
    assert len(state.tail) <= model.config.window_capacity


async def test_queue_bound_and_timeout(make_engine):
    model = tiny_model()
    engine = make_engine(model, start=False, max_waiting=2)
    prompt = TOKENIZER.encode("x")
    engine.submit(EngineRequest(new_state(model), prompt, greedy(1)))
    late = engine.submit(
        EngineRequest(new_state(model), prompt, greedy(1000, stop_tokens=frozenset()), timeout=0.3)
    )
    with pytest.raises(QueueFull):
        engine.submit(EngineRequest(new_state(model), prompt, greedy(1)))
    engine.start()
    _, final = await collect(late)
    assert final.finish_reason == "timeout"
    assert 0 < final.stats.completion_tokens < 1000


async def test_a_model_failure_fails_the_request_not_the_engine(make_engine, monkeypatch):
    model = tiny_model()
    engine = make_engine(model)
    state = new_state(model)
    extend = model.extend
    monkeypatch.setattr(model, "extend", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    _, final = await collect(
        engine.submit(EngineRequest(state, TOKENIZER.encode("abc"), greedy(5), stateful=True))
    )
    assert final.finish_reason == "error" and state.tokens_seen == 0
    monkeypatch.setattr(model, "extend", extend)
    text, final = await collect(
        engine.submit(EngineRequest(new_state(model), TOKENIZER.encode("abc"), greedy(5)))
    )
    assert final.finish_reason in ("stop", "length") and text == reference(model, "abc", 5)


@pytest.mark.parametrize("schedule", ["hard", "lagged"])
async def test_sessions_joining_and_leaving_the_batch(make_engine, schedule):
    """Sequences of different lengths join while others decode and leave at different steps; each one's
    text and state equal the single-session reference."""
    model = tiny_model(schedule)
    engine = make_engine(model, prefill_chunk=6)
    jobs = [(f"session {i}", 5 + 7 * i) for i in range(6)]
    states = [new_state(model) for _ in jobs]

    async def run(index: int) -> str:
        await asyncio.sleep(0.02 * index)  # staggered arrivals
        prompt, n = jobs[index]
        params = greedy(n, stop_tokens=frozenset())
        text, _ = await collect(
            engine.submit(EngineRequest(states[index], TOKENIZER.encode(prompt), params, stateful=True))
        )
        return text

    texts = await asyncio.gather(*(run(i) for i in range(len(jobs))))
    for (prompt, n), text, state in zip(jobs, texts, states, strict=True):
        ref = new_state(model)
        out, _ = generate(model, ref, TOKENIZER.encode(prompt), n)
        assert (
            text == TOKENIZER.decode(out) and state.tail == ref.tail and state.tokens_seen == ref.tokens_seen
        )
        for mine, theirs in zip(state.memory, ref.memory, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert engine.max_batch >= 2


async def test_a_pending_sleep_is_planned_anew_as_its_session_nears_the_boundary(monkeypatch):
    """A lagged sleep's deadline, planned from the decode rate when it starts, is planned anew from the
    rate then at 4, 2 and 1 tokens before its session's boundary (window 8), and made due now when the
    session reaches the boundary and waits for it."""
    monkeypatch.setattr(DecodeRate, "rate", property(lambda self: 100.0))  # 10 ms a token
    model = tiny_model("lagged")
    gated = GatedModel(model)
    executor = create_executor(gated, isolation="thread")
    planned: list[tuple[int, int]] = []  # (job, tokens ahead at the rate, to within 5 ms)
    reschedule = executor.reschedule

    def recording(job, deadline):
        planned.append((job.id, round((deadline - executor.now()) * 100.0)))
        reschedule(job, deadline)

    monkeypatch.setattr(executor, "reschedule", recording)
    engine = Engine(model, passes=model.config.sleep_passes, metrics=Metrics(), executor=executor)
    engine.start()
    try:
        request = EngineRequest(
            new_state(model), TOKENIZER.encode("wait:"), greedy(20, stop_tokens=frozenset())
        )
        task = asyncio.create_task(collect(engine.submit(request)))
        for _ in range(1000):  # the first sleep holds; the session waits at its second boundary
            if any(s.blocked_since for s in engine.running):
                break
            await asyncio.sleep(0.01)
        gated.release.set()
        await asyncio.wait_for(task, timeout=30)
    finally:
        gated.release.set()
        await engine.shutdown(grace=0)
    first = planned[0][0]
    assert [tokens for job, tokens in planned if job == first] == [4, 2, 1, 0]


async def test_a_sleep_started_mid_prompt_is_due_after_the_tokens_left_to_decode(monkeypatch):
    """Lagged (window 8), a sleep that starts while the prompt is still being fed is due once the rest of
    the prompt (fed a piece per step, far faster than decoding) and the tokens decoded after it fill the
    chunk: 13 prompt tokens leave 5 of the second chunk to feed, so its sleep is due 3 decoded tokens
    away, not 8; the next one, started while decoding, 8."""
    monkeypatch.setattr(DecodeRate, "rate", property(lambda self: 100.0))  # 10 ms a token
    model = tiny_model("lagged")
    executor = create_executor(model, isolation="thread")
    planned: list[int] = []  # tokens ahead at the rate, to within 5 ms
    submit_all = executor.submit_all

    def recording(jobs):
        planned.extend(round((job.deadline - executor.now()) * 100.0) for job in jobs)
        return submit_all(jobs)

    monkeypatch.setattr(executor, "submit_all", recording)
    engine = Engine(model, passes=model.config.sleep_passes, metrics=Metrics(), executor=executor)
    engine.start()
    try:
        prompt = TOKENIZER.encode("thirteen byte")
        request = EngineRequest(new_state(model), prompt, greedy(10, stop_tokens=frozenset()))
        await asyncio.wait_for(collect(engine.submit(request)), timeout=30)
    finally:
        await engine.shutdown(grace=0)
    assert len(prompt) == 13 and planned == [3, 8]


@pytest.mark.parametrize("prompt, counted", [("wait:", True), ("a prompt across windows", False)])
async def test_a_session_that_waits_for_its_sleep_counts_a_missed_deadline(monkeypatch, prompt, counted):
    """Lagged, a sleep still running when its session reaches the next boundary while decoding was due
    then, however late its planned deadline: the session waits for it (a decode stall), the job is
    made due now and counts a missed deadline, and the answer is the reference's all the same. A prompt's
    boundaries come a piece per step, faster than any deadline at the decode rate: a wait there is
    neither a decode stall nor a miss."""
    monkeypatch.setattr(DecodeRate, "rate", property(lambda self: 1e-3))  # deadlines hours away
    model = tiny_model("lagged")
    metrics = Metrics()
    gated = GatedModel(model)
    executor = create_executor(gated, metrics=metrics, isolation="thread")
    engine = Engine(model, passes=model.config.sleep_passes, metrics=metrics, executor=executor)
    engine.start()
    tokens = TOKENIZER.encode(prompt)  # "wait:" fits in the first window (8), the other spans three
    max_tokens = 40 if counted else 2
    try:
        handle = engine.submit(
            EngineRequest(new_state(model), tokens, greedy(max_tokens, stop_tokens=frozenset()))
        )
        task = asyncio.create_task(collect(handle))
        # The first sleep starts at the first boundary and holds; the session then waits at the second.
        for _ in range(1000):
            if gated.started.is_set() and any(s.blocked_since for s in engine.running):
                break
            await asyncio.sleep(0.01)
        assert any(s.blocked_since for s in engine.running)
        gated.release.set()
        text, _ = await asyncio.wait_for(task, timeout=30)
    finally:
        gated.release.set()
        await engine.shutdown(grace=0)
    out, _ = generate(model, new_state(model), tokens, max_tokens)
    assert text == TOKENIZER.decode(out)
    assert (metrics.sleep_deadline_misses._value.get() >= 1) is counted
    assert (metrics.decode_stall._sum.get() > 0) is counted


async def test_a_sleep_in_flight_when_its_request_ends_is_dropped_not_finished_later():
    """Interleaved, a lagged request that ends while its sleep runs drops it at the decode thread's next
    turn (its future ends cancelled, no sleep is counted) instead of leaving the rest of it to the next
    requests' steps, where it would end long past its deadline."""
    model = tiny_model("lagged")
    metrics = Metrics()
    policy = DepthPolicy(1, 64)
    for rows in (1, 8):
        policy.seed(8, 0.05, rows)  # passes planned slow: the pace runs slices at every step
    executor = create_executor(model, metrics=metrics, isolation="interleaved", policy=policy)
    engine = Engine(model, passes=64, metrics=metrics, executor=executor)  # a sleep of many steps
    in_flight: list[Future] = []
    cancel = executor.cancel_session

    def recording(session: str) -> int:
        rows = executor._rolling.rows if executor._rolling else []
        in_flight.extend(row.future for row in rows if row.job.session == session)
        return cancel(session)

    executor.cancel_session = recording  # type: ignore[method-assign]
    engine.start()
    try:
        params = greedy(6, stop_tokens=frozenset())  # "wait:" and 3 tokens fill the window (8): 3 more
        await collect(engine.submit(EngineRequest(new_state(model), TOKENIZER.encode("wait:"), params)))
        assert in_flight, "the first request's sleep was not running when it ended"
        await asyncio.sleep(0.1)  # the decode thread idles
        params = greedy(2, stop_tokens=frozenset())  # no boundary
        await collect(engine.submit(EngineRequest(new_state(model), TOKENIZER.encode("hi"), params)))
    finally:
        await engine.shutdown(grace=0)  # would fail a sleep still in flight with "shut down"
    assert all(isinstance(future.exception(timeout=0), CancelledError) for future in in_flight)
    assert metrics.sleep_passes._sum.get() == 0
