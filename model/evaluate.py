"""`sleepserve eval`: accuracy of a checkpoint by task difficulty, optionally at other sleep depths.

Accuracy (per label and exact) comes from the batched window/sleep path that training uses. With
--answers, each example is also answered by greedy decoding through the session path the server
runs (`model.session.generate`), and the answers are written as JSON lines: the reference that the
server's end-to-end fidelity test compares against.

    sleepserve eval --checkpoint checkpoints/sleepy-mix --passes 1 2 4
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.cli_help import DefaultsHelpFormatter
from model.hybrid import HybridLM
from model.session import generate, new_state
from model.tasks import Example, make_task
from model.tasks.base import Task
from model.train import evaluate

HELD_OUT_SEED = 987_654


def checkpoint_tasks(folder: Path, window: int) -> list[Task]:
    """The tasks a checkpoint was trained on (its train_config.json), laid out as in training."""
    config_path = folder / "train_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass --task to say what to evaluate")
    tasks = json.loads(config_path.read_text())["tasks"]
    return [make_task(name, **{"window": window, **knobs}) for name, knobs in tasks.items()]


def held_out_examples(task: Task, count: int, seed: int = HELD_OUT_SEED) -> list[Example]:
    """`count` examples spread evenly over the task's difficulties, from a seed training never uses."""
    rng = random.Random(seed)
    levels = list(task.difficulties)
    return [task.example(rng, difficulty=levels[i % len(levels)]) for i in range(count)]


@torch.no_grad()
def greedy_answer(model: HybridLM, example: Example, passes: int | None = None) -> str:
    """The answer a fresh session gives at temperature 0 after reading context + query."""
    state = new_state(model)
    ids, _ = generate(
        model, state, list((example.context + example.query).encode()), len(example.answer), passes
    )
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sleepserve eval", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint folder")
    parser.add_argument(
        "--task", action="append", help="task name (default: the checkpoint's training tasks)"
    )
    parser.add_argument("--passes", type=int, nargs="+", help="sleep depths to evaluate (default: trained N)")
    parser.add_argument("--per-difficulty", type=int, default=200, help="examples per difficulty")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="the held-out examples' seed")
    parser.add_argument(
        "--answers", type=Path, help="also write greedy session-path answers (JSON lines; default: not)"
    )
    parser.add_argument("--answers-count", type=int, default=200, help="answers written")
    parser.add_argument("--json", type=Path, help="write the accuracy table here (default: print it only)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model = load_checkpoint(args.checkpoint)
    window = model.config.window
    if args.task:
        tasks = [make_task(name, window=window) for name in args.task]
    else:
        tasks = checkpoint_tasks(args.checkpoint, window)
    report = {}
    for passes in args.passes or [model.config.sleep_passes]:
        for task in tasks:
            table = evaluate(model, task, passes, args.per_difficulty, seed=args.seed)
            report.setdefault(f"N={passes}", {})[task.name] = table
            print(f"{task.name} N={passes} ({model.config.schedule}):")
            for difficulty, row in table.items():
                print(f"  difficulty {difficulty:>3}: label {row['label']:.3f}  exact {row['exact']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.answers:
        with args.answers.open("w") as out:
            for task in tasks:
                for example in held_out_examples(task, args.answers_count, args.seed):
                    answer = greedy_answer(model, example)
                    out.write(json.dumps({"task": task.name, **example.__dict__, "predicted": answer}) + "\n")
        print(f"answers written to {args.answers}")


if __name__ == "__main__":
    main()
