"""The shipped checkpoint: what its config promises, its size, and accuracy above chance on a held-out
seed (the margins below are floors set under what `sleepserve eval` measured, see the README card)."""

from __future__ import annotations

from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.evaluate import HELD_OUT_SEED, checkpoint_tasks
from model.train import evaluate

# Chance of an exact answer (rule110: 2 bits; hops: one of 6 nodes), and the margin the checkpoint must
# beat it by, mean over difficulties (measured: rule110 0.60, hops 0.23; chains is at chance).
CHANCE_AND_MARGIN = {"rule110": (0.25, 0.20), "hops": (1 / 6, 0.03)}


def test_shipped_checkpoint_config_and_size():
    files = {p.name: p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir()}
    assert {"model.safetensors", "config.json", "train_config.json"} <= set(files)
    assert files["model.safetensors"] <= 20 * 2**20
    config = load_checkpoint(DEFAULT_CHECKPOINT).config
    assert config.schedule == "lagged" and config.variable_chunks  # what the server runs, may sleep early


def test_shipped_checkpoint_beats_chance_on_held_out_data():
    model = load_checkpoint(DEFAULT_CHECKPOINT)
    for task in checkpoint_tasks(DEFAULT_CHECKPOINT, model.config.window):
        if task.name not in CHANCE_AND_MARGIN:
            continue
        chance, margin = CHANCE_AND_MARGIN[task.name]
        table = evaluate(model, task, model.config.sleep_passes, per_difficulty=400, seed=HELD_OUT_SEED)
        exact = sum(row["exact"] for row in table.values()) / len(table)
        assert exact >= chance + margin, f"{task.name}: exact {exact:.3f} vs chance {chance}: {table}"
