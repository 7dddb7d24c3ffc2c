"""Training with sleep: the loss goes down, training reads windows exactly as serving does, resume."""

import dataclasses
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from support import SCHEDULES

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.hybrid import HybridLM
from model.session import feed, new_state, open_window
from model.tasks import make_task
from model.train import TrainConfig, answer_logits, chunk_bounds, encode_batch, make_optimizers, train

TINY = ModelConfig(
    d_model=32,
    n_heads=2,
    head_dim=16,
    gdn_heads=2,
    gdn_key_dim=16,
    gdn_value_dim=16,
    window=24,
    gdn_chunk_size=8,
)
TASK_KNOBS = {
    "rule110": {"cells": 6, "strings": 2, "min_steps": 1, "max_steps": 3},
    "hops": {"nodes": 6, "context_windows": 3, "max_hops": 3},
    "chains": {"max_ops": 2, "context_windows": 2, "statements_per_window": 1},
}


def batch_for(task_name: str, window: int, count: int = 16):
    task = make_task(task_name, window=window, **TASK_KNOBS[task_name])
    rng = random.Random(0)
    return encode_batch([task.example(rng) for _ in range(count)])


@pytest.mark.parametrize("schedule, construction", SCHEDULES)
@pytest.mark.parametrize("task_name", list(TASK_KNOBS))
def test_repeated_step_on_a_fixed_batch_lowers_the_loss(task_name, schedule, construction):
    torch.manual_seed(0)
    model = HybridLM(TINY.replace(schedule=schedule, lagged_construction=construction, sleep_passes=2))
    tokens, first = batch_for(task_name, TINY.window)
    bounds = chunk_bounds(tokens.shape[1], TINY.window)
    assert len(bounds) >= 3  # the answer sits behind consolidated windows
    optimizers = make_optimizers(model, TrainConfig(model=model.config, lr=1e-2))
    losses = []
    for _ in range(8):
        logits = answer_logits(model, tokens, first, bounds, passes=2)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, first:].flatten())
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("schedule, construction", SCHEDULES)
def test_training_reads_windows_exactly_as_serving_does(schedule, construction):
    """The logits training learns from are those a session computes when fed the same tokens (with
    stale-kv: training computes the previous chunk's keys at their window positions, serving moves
    and re-rotates the decoded ones)."""
    torch.manual_seed(1)
    model = HybridLM(TINY.replace(schedule=schedule, lagged_construction=construction, sleep_passes=3)).eval()
    tokens, first = batch_for("hops", TINY.window, count=3)
    with torch.no_grad():
        trained = answer_logits(model, tokens, first, chunk_bounds(tokens.shape[1], TINY.window), passes=3)
    for row in range(tokens.shape[0]):
        state = new_state(model)
        served, _, _ = feed(model, state, open_window(model, state)[0], tokens[row].tolist(), return_all=True)
        assert (served[first - 1 : -1] - trained[row]).abs().max() < 1e-4


def test_variable_chunks_cover_the_sequence():
    rng = random.Random(3)
    for length in (1, 17, 100):
        bounds = chunk_bounds(length, 16, rng)
        assert bounds[0][0] == 0 and bounds[-1][1] == length
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        assert all(8 <= end - start <= 16 for start, end in bounds[:-1])


def test_same_seed_same_start_for_every_depth(tmp_path):
    """Runs that differ only in N start from the same weights and see the same data."""
    base = TrainConfig(
        tasks={"rule110": TASK_KNOBS["rule110"]}, model=TINY, steps=1, batch_size=4, eval_per_difficulty=2
    )
    weights = []
    for passes in (1, 3):
        config = dataclasses.replace(base, model=TINY.replace(sleep_passes=passes), steps=0)
        weights.append(train(config, tmp_path / f"n{passes}").state_dict())
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_resume_continues_the_same_run(tmp_path):
    config = TrainConfig(
        tasks={"rule110": TASK_KNOBS["rule110"]},
        model=TINY,
        steps=4,
        batch_size=4,
        eval_every=2,
        eval_per_difficulty=2,
    )
    straight = train(config, tmp_path / "straight")
    train(dataclasses.replace(config, steps=2), tmp_path / "resumed")
    resumed = train(config, tmp_path / "resumed", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert load_checkpoint(tmp_path / "resumed").config == TINY
