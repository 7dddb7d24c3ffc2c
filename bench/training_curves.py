"""Training curves from the JSONL logs `sleepserve train` writes: loss per task (smoothed) for the
shipped checkpoint, and for the reproduction runs of one seed at each sleep depth.

    python -m bench.training_curves     # writes bench/results/training_curves.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from model.checkpoint import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def smoothed_losses(log: Path, window: int = 50) -> dict[str, tuple[list[int], list[float]]]:
    """{task: (steps, moving average of the loss over `window` of that task's steps)}."""
    per_task: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in log.read_text().splitlines():
        record = json.loads(line)
        per_task[record["task"]].append((record["step"], record["loss"]))
    curves = {}
    for task, points in per_task.items():
        steps, losses = zip(*points, strict=True)
        averages = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        curves[task] = (list(steps), averages)
    return curves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "runs" / "reproduce", help="reproduction run folders"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "training_curves.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mix, depth) = plt.subplots(1, 2, figsize=(11, 4))
    for task, (steps, losses) in smoothed_losses(args.checkpoint / "log.jsonl").items():
        mix.plot(steps, losses, label=task)
    mix.set(
        title=f"Shipped checkpoint ({args.checkpoint.name})",
        xlabel="step",
        ylabel="answer loss (moving average)",
    )
    for run in sorted(args.runs.glob(f"*-s{args.seed}")):
        (steps, losses), *_ = smoothed_losses(run / "log.jsonl").values()
        depth.plot(
            steps,
            losses,
            label=run.name.removesuffix(f"-s{args.seed}"),
            linestyle="--" if "lagged" in run.name else "-",
        )
    depth.set(
        title=f"Rule 110 reproduction, seed {args.seed}", xlabel="step", ylabel="answer loss (moving average)"
    )
    for ax in (mix, depth):
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:  # no reproduction runs: an empty panel
            ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
