"""The CUDA path: the model's fast paths, sleep on its own stream, and the engine with the scheduler's
thread sleeper, on a GPU against the CPU and against the single-session reference.

These run only where CUDA is available (a GPU machine: `pytest tests/gpu`); elsewhere they are reported
as skipped, never as passed.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from support import random_inputs, rel_err, tiny_model

from model.gated_delta import gated_delta_chunk, gated_delta_recurrent
from model.session import feed, generate, new_state, open_window
from model.state import SessionState
from model.tokenizer import ByteTokenizer
from scheduler.isolation import create_executor
from scheduler.thread import LocalSleeper
from server.engine import Engine
from server.metrics import Metrics
from server.sequence import EngineRequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOKENIZER = ByteTokenizer()
CUDA = torch.device("cuda")


def on_cuda(model):
    """A copy of `model` on the GPU (the CPU model stays as it is)."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin.to(CUDA)


@pytest.mark.parametrize(
    "B,T,H,K,V,chunk", [(1, 1, 1, 8, 8, 4), (2, 37, 3, 16, 24, 8), (3, 130, 2, 32, 32, 32)]
)
def test_chunk_matches_recurrent_on_cuda(B, T, H, K, V, chunk):
    q, k, v, log_alpha, beta, state = random_inputs(B, T, H, K, V, seed=T)
    inputs = [x.to(CUDA) for x in (q, k, v, log_alpha, beta, state)]
    o_rec, s_rec = gated_delta_recurrent(*inputs)
    o_chunk, s_chunk = gated_delta_chunk(*inputs, chunk_size=chunk)
    assert o_chunk.device.type == s_chunk.device.type == "cuda"
    assert rel_err(o_chunk, o_rec) < 1e-5 and rel_err(s_chunk, s_rec) < 1e-5
    o_cpu, s_cpu = gated_delta_chunk(q, k, v, log_alpha, beta, state, chunk_size=chunk)
    assert rel_err(o_chunk, o_cpu) < 1e-5 and rel_err(s_chunk, s_cpu) < 1e-5


@pytest.mark.parametrize("schedule", ["hard", "lagged"])
def test_token_by_token_decode_matches_prefill_and_the_cpu(schedule):
    cpu_model = tiny_model(schedule)
    model = on_cuda(cpu_model)
    tokens = TOKENIZER.encode("the sleeping model reads this across many windows")
    with torch.no_grad():
        stepwise, state = [], new_state(model)
        cache, _ = open_window(model, state)
        for token in tokens:
            logits, cache, _ = feed(model, state, cache, [token])
            stepwise.append(logits)
        prefill_state = new_state(model)
        prefilled, _, _ = feed(
            model, prefill_state, open_window(model, prefill_state)[0], tokens, return_all=True
        )
        cpu_state = new_state(cpu_model)
        on_cpu, _, _ = feed(
            cpu_model, cpu_state, open_window(cpu_model, cpu_state)[0], tokens, return_all=True
        )
    assert state.chunks_consolidated >= 4
    assert rel_err(torch.stack(stepwise), prefilled) < 1e-4
    assert rel_err(prefilled, on_cpu) < 1e-4
    for mine, theirs in zip(state.memory, cpu_state.memory, strict=True):
        assert mine.device.type == "cuda"
        assert rel_err(mine, theirs) < 1e-4


def test_sleep_on_its_own_stream_equals_the_default_stream():
    model = on_cuda(tiny_model())
    torch.manual_seed(1)
    memory = [m.normal_() for m in model.empty_memory(4)]
    chunk = torch.randint(0, 256, (4, model.config.window), device=CUDA)
    with torch.no_grad():
        expected = model.sleep(memory, chunk, 3)
    sleeper = LocalSleeper(model)
    for _ in range(3):  # the stream is made once per thread and reused
        out = sleeper(memory, chunk, 3)
        for mine, theirs in zip(out, expected, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_state_saved_on_cuda_loads_on_cpu():
    """The stored blob does not depend on the device that wrote it."""
    cpu_model = tiny_model()
    model = on_cuda(cpu_model)
    state = new_state(model)
    generate(model, state, TOKENIZER.encode("a session that moves between replicas"), 12)
    blob = state.to_bytes("fp", model.config.window_capacity)
    loaded = SessionState.from_bytes(blob, "fp")
    assert loaded.tail == state.tail and loaded.tokens_seen == state.tokens_seen
    for mine, theirs in zip(loaded.memory, state.memory, strict=True):
        assert mine.device.type == "cpu"
        torch.testing.assert_close(mine, theirs.cpu(), rtol=0, atol=0)
    prompt = TOKENIZER.encode(" and goes on")
    out_cuda, _ = generate(model, state, prompt, 10)
    out_cpu, _ = generate(cpu_model, loaded, prompt, 10)
    assert out_cuda == out_cpu


@pytest.mark.parametrize("schedule", ["hard", "lagged"])
async def test_engine_with_the_stream_sleeper_matches_the_reference(schedule):
    """Eight concurrent multi-turn sessions on the GPU, sleeping on the worker's own CUDA stream, give
    the reference's greedy tokens and memory."""
    model = on_cuda(tiny_model(schedule))
    metrics = Metrics()
    executor = create_executor(model, metrics=metrics, isolation="thread")
    engine = Engine(model, passes=model.config.sleep_passes, metrics=metrics, executor=executor)
    engine.start()
    try:
        states = [new_state(model) for _ in range(8)]
        refs = [new_state(model) for _ in range(8)]
        for turn in range(3):
            prompts = [TOKENIZER.encode(f"s{i} turn {turn}:") for i in range(8)]
            params = SamplingParams(max_tokens=13, temperature=0.0, stop_tokens=frozenset())
            handles = [
                engine.submit(EngineRequest(state, prompt, params, stateful=True))
                for state, prompt in zip(states, prompts, strict=True)
            ]
            texts = await asyncio.gather(*(_collect(h) for h in handles))
            for text, prompt, state, ref in zip(texts, prompts, states, refs, strict=True):
                out, _ = generate(model, ref, prompt, 13)
                assert text == TOKENIZER.decode(out)
                assert state.tail == ref.tail and state.chunks_consolidated == ref.chunks_consolidated
                for mine, theirs in zip(state.memory, ref.memory, strict=True):
                    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        assert all(state.chunks_consolidated >= 4 for state in states)
    finally:
        await engine.shutdown(grace=0)


async def _collect(handle) -> str:
    return "".join([out.text async for out in handle])
