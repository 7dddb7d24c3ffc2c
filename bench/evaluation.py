"""What the shipped model can do: its accuracy on each of its training tasks by difficulty, at sleep
depths N = 1-3, on held-out examples (`sleepserve eval`'s batched window/sleep path). "label" is the
share of answer characters right, "exact" the share of answers right in full.

    python -m bench.evaluation          # writes bench/results/evaluation.{json,png}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.decode_scaling import machine
from bench.record import RESULTS, checkpoint_record, write_result
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.evaluate import HELD_OUT_SEED, checkpoint_tasks
from model.train import evaluate


def plot(accuracy: dict[str, dict[str, dict[str, dict[str, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(accuracy.values())))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), sharey=True)
    for ax, task in zip(axes, tasks, strict=True):
        for depth, by_task in accuracy.items():
            table = by_task[task]
            ax.plot(list(table), [row["exact"] for row in table.values()], marker="o", label=depth)
        ax.set(title=task, xlabel="difficulty", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact answers")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 3], help="sleep depths N")
    parser.add_argument("--per-difficulty", type=int, default=400, help="examples per task and difficulty")
    parser.add_argument("--out", type=Path, default=RESULTS / "evaluation.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model = load_checkpoint(args.checkpoint)
    tasks = checkpoint_tasks(args.checkpoint, model.config.window)
    accuracy = {
        f"N={passes}": {
            task.name: evaluate(model, task, passes, args.per_difficulty, seed=HELD_OUT_SEED)
            for task in tasks
        }
        for passes in args.passes
    }
    for depth, by_task in accuracy.items():
        for task, table in by_task.items():
            cells = ", ".join(f"{d}: {row['exact']:.2f}" for d, row in table.items())
            print(f"{depth} {task:>8} exact by difficulty: {cells}")
    report = {
        "machine": machine(),
        "trained_passes": model.config.sleep_passes,
        "schedule": model.config.schedule,
        "per_difficulty": args.per_difficulty,
        "seed": HELD_OUT_SEED,
        "accuracy": accuracy,
    }
    report = write_result(args.out, report, checkpoint_record(args.checkpoint))
    plot(accuracy, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
