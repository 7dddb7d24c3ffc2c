"""`make bench` / `sleepserve bench suite`: refresh bench/results in one run on one machine — decode
scaling, session state, a sleep's cost, sleep overlap (served and engine-level) and the multi-turn comparison, sized to finish in
under 10 minutes on 2 CPU cores. Each step writes its JSON (and a PNG where a picture helps); the multi-turn step
prints whether each floor holds.

    python -m bench.suite                       # all steps
    python -m bench.suite --steps state         # some of them
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from bench import decode_scaling, engine_itl, multiturn, sleep_overlap, sleep_pass, state

NAMES = ("decode-scaling", "state", "sleep-pass", "sleep-overlap", "engine-itl", "multiturn")


def steps(threads: int) -> dict[str, tuple[Callable[[list[str]], object], list[str]]]:
    """name -> (its main, its arguments)."""
    return {
        "decode-scaling": (decode_scaling.main, []),
        "state": (state.main, []),
        "sleep-pass": (sleep_pass.main, []),
        "sleep-overlap": (sleep_overlap.main, ["--threads", str(threads)]),
        "engine-itl": (engine_itl.main, ["--threads", str(threads)]),
        "multiturn": (multiturn.main, ["--disable-tqdm", "--threads", str(threads)]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in each server")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    took = {}
    for name in args.steps:
        run, step_args = steps(args.threads)[name]
        print(f"==== bench {name} {' '.join(step_args)}".rstrip(), flush=True)
        start = time.perf_counter()
        run(step_args)
        took[name] = time.perf_counter() - start
    print(
        "==== suite: "
        + ", ".join(f"{name} {s:.0f} s" for name, s in took.items())
        + f"; total {sum(took.values()):.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
