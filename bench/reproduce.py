"""The CPU reproduction of the paper's claim that deeper sleep (larger N) helps deep reasoning.

Rule 110 (10 cells, 2 strings, t uniform in 1–6, one filler window), a 2-layer (attn, gdn) stack of
width 64, 1000 steps of batch 128. Runs: `hard` N ∈ {1, 2, 4} and `lagged` N ∈ {1, 4}, three seeds
each, plus a compute-matched control per seed (N = 1 trained for as many seconds as N = 4, by scaling
its step count with the measured step times). Writes bench/results/reproduction.json and .png.
Finished runs are kept in the JSON and skipped when the script is run again; an interrupted run resumes
from its last evaluation. Processes started with different `--only` share the JSON (each run is merged
in under a file lock), so the plan can be split over cores.

    python -m bench.reproduce            # or: make reproduce
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import statistics
from pathlib import Path

import torch

from bench.record import trained_record, write_result
from model.train import PRESETS, TrainConfig, build_tasks, evaluate, train

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent.parent / "runs" / "reproduce"
EVAL_SEED = 123_457  # held out: training draws its data from the run's seed
PLAN = [("hard", 1), ("hard", 2), ("hard", 4), ("lagged", 1), ("lagged", 4)]


def run_name(schedule: str, passes: int, seed: int, control: bool) -> str:
    return f"{schedule}-n{passes}-s{seed}" + ("-control" if control else "")


def run_one(
    base: TrainConfig,
    schedule: str,
    passes: int,
    seed: int,
    steps: int,
    control: bool,
    per_t: int,
    runs: Path = RUNS,
) -> dict:
    model_config = base.model.replace(schedule=schedule, sleep_passes=passes)
    config = dataclasses.replace(base, model=model_config, seed=seed, steps=steps, eval_every=steps)
    out = runs / run_name(schedule, passes, seed, control)
    model = train(config, out, resume=True)
    train_seconds = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["train_seconds"]
    (task,) = build_tasks(config)
    return {
        "schedule": schedule,
        "passes": passes,
        "seed": seed,
        "steps": steps,
        "train_seconds": train_seconds,
        "control": control,
        "accuracy_by_difficulty": evaluate(model, task, passes, per_t, seed=EVAL_SEED),
    }


def deep_exact(run: dict, deep: list[str]) -> float:
    return statistics.mean(run["accuracy_by_difficulty"][t]["exact"] for t in deep)


def mean_and_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (None from one value)."""
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return mean, se


def summarise(report: dict) -> dict:
    """Floors of the issue on the deepest third of the t range (control runs excluded)."""
    ts = sorted(report["runs"][0]["accuracy_by_difficulty"], key=int)
    deep = ts[-max(1, len(ts) // 3) :]

    def scores(schedule: str, passes: int, control: bool = False) -> list[float]:
        return [
            deep_exact(r, deep)
            for r in sorted(report["runs"], key=lambda r: r["seed"])
            if (r["schedule"], r["passes"], r["control"]) == (schedule, passes, control)
        ]

    def difference(a: list[float], b: list[float]) -> dict:
        diff, se = mean_and_se([x - y for x, y in zip(a, b, strict=True)])  # paired by seed
        return {"mean": diff, "se": se}

    summary = {"deep_t": deep, "mean_exact": {}}
    for schedule, passes in PLAN:
        values = scores(schedule, passes)
        if values:
            summary["mean_exact"][f"{schedule}-n{passes}"] = dict(
                zip(("mean", "se"), mean_and_se(values), strict=True)
            )
    control = scores("hard", 1, control=True)
    if control:
        summary["mean_exact"]["hard-n1-control"] = dict(
            zip(("mean", "se"), mean_and_se(control), strict=True)
        )
    h1, h2, h4, l4 = scores("hard", 1), scores("hard", 2), scores("hard", 4), scores("lagged", 4)
    if len(h1) == len(h4) > 1:
        summary["hard_n4_minus_n1"] = difference(h4, h1)
    if len(h1) == len(h2) > 1:
        summary["hard_n2_minus_n1"] = difference(h2, h1)
    if len(h4) == len(l4) > 1:
        summary["lagged_n4_minus_hard_n4"] = difference(l4, h4)
    if len(control) == len(h4) > 1:
        summary["hard_n4_minus_control"] = difference(h4, control)

    def at_t(schedule: str, passes: int, t: str) -> list[float]:
        runs = sorted(report["runs"], key=lambda r: r["seed"])
        return [
            r["accuracy_by_difficulty"][t]["exact"]
            for r in runs
            if (r["schedule"], r["passes"], r["control"]) == (schedule, passes, False)
        ]

    if len(h1) == len(h4) > 1:  # where along t the depth of sleep makes its difference
        summary["hard_n4_minus_n1_by_t"] = {t: difference(at_t("hard", 4, t), at_t("hard", 1, t)) for t in ts}
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ts = sorted(report["runs"][0]["accuracy_by_difficulty"], key=int)
    groups = [(s, n, False) for s, n in PLAN] + [("hard", 1, True)]
    for schedule, passes, control in groups:
        runs = [
            r
            for r in report["runs"]
            if (r["schedule"], r["passes"], r["control"]) == (schedule, passes, control)
        ]
        if not runs:
            continue
        stats = [mean_and_se([r["accuracy_by_difficulty"][t]["exact"] for r in runs]) for t in ts]
        label = f"{schedule} N={passes}" + (" (compute-matched)" if control else "")
        style = "--" if schedule == "lagged" else (":" if control else "-")
        ax.errorbar(
            [int(t) for t in ts], [m for m, _ in stats], yerr=[e or 0 for _, e in stats],
            label=label, linestyle=style, marker="o", capsize=3,
        )  # fmt: skip
    ax.axhline(0.25, color="grey", linewidth=0.8, label="chance (2 labels)")
    ax.set(xlabel="Rule 110 steps t", ylabel="exact accuracy (mean ± s.e. over seeds)", ylim=(0, 1.02))
    ax.set_title("Rule 110 at CPU scale: exact accuracy by depth of sleep (3 seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # a figure per call: callers in one process would pile them up


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=PRESETS["reproduce"].steps)
    parser.add_argument("--eval-per-t", type=int, default=500)
    preset = PRESETS["reproduce"]
    parser.add_argument("--batch-size", type=int, default=preset.batch_size)
    parser.add_argument(
        "--train-eval-per-t",
        type=int,
        default=preset.eval_per_difficulty,
        help="examples per t of the evaluation each run logs at its end (the training curves')",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        help="run only these (e.g. hard-n1 lagged-n4 control), to split the work over processes",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "reproduction.json")
    parser.add_argument("--runs", type=Path, default=RUNS, help="the runs' folders (checkpoints and logs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    base = dataclasses.replace(
        PRESETS["reproduce"], batch_size=args.batch_size, eval_per_difficulty=args.train_eval_per_t
    )
    report = {"task": base.tasks, "config": {**base.to_dict(), "steps": args.steps}, "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = args.out.with_suffix(".lock")

    def write(run: dict | None = None) -> None:
        """Merge the runs other processes wrote, add `run`, and write the JSON and the PNG."""
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if args.out.exists():
                report["runs"] = json.loads(args.out.read_text())["runs"]
            if run is not None:
                report["runs"].append(run)
            if report["runs"]:
                report["summary"] = summarise(report)
                plot(report, args.out.with_suffix(".png"))
            write_result(args.out, report, trained_record("the Rule 110 runs listed in runs"))

    write()
    done = {run_name(r["schedule"], r["passes"], r["seed"], r["control"]) for r in report["runs"]}

    def wanted(name: str) -> bool:
        return args.only is None or name in args.only

    for seed in args.seeds:
        for schedule, passes in PLAN:
            if run_name(schedule, passes, seed, False) not in done and wanted(f"{schedule}-n{passes}"):
                write(run_one(base, schedule, passes, seed, args.steps, False, args.eval_per_t, args.runs))
        if run_name("hard", 1, seed, True) not in done and wanted("control"):
            write()  # the N = 1 and N = 4 runs of this seed may come from another process
            seconds = {
                r["passes"]: r["train_seconds"]
                for r in report["runs"]
                if r["seed"] == seed and r["schedule"] == "hard" and not r["control"]
            }
            steps = round(args.steps * seconds[4] / seconds[1])
            write(run_one(base, "hard", 1, seed, steps, True, args.eval_per_t, args.runs))
    write()
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
