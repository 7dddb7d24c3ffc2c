"""`make bench` / `sleepserve bench suite`: refresh bench/results in one run on one machine — the steps of
bench/registry.py marked `in_suite`: decode scaling, session state, a sleep's cost, sleep overlap (served
and engine-level), the multi-turn comparison and the shipped model's accuracy, sized to finish in under
10 minutes on 2 idle CPU cores. Each step writes its JSON (and a PNG where a picture helps); the
multi-turn step prints whether each floor holds. `python -m bench.report` then renders the tables.

    python -m bench.suite                       # all steps
    python -m bench.suite --steps state         # some of them
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

from bench.registry import BENCHMARKS

NAMES = tuple(benchmark.name for benchmark in BENCHMARKS if benchmark.in_suite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in each server")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    took = {}
    for benchmark in BENCHMARKS:
        if benchmark.name not in args.steps:
            continue
        step_args = ["--threads", str(args.threads)] if benchmark.takes_threads else []
        print(f"==== bench {benchmark.name} {' '.join(step_args)}".rstrip(), flush=True)
        start = time.perf_counter()
        importlib.import_module(benchmark.module).main(step_args)
        took[benchmark.name] = time.perf_counter() - start
    print(
        "==== suite: "
        + ", ".join(f"{name} {s:.0f} s" for name, s in took.items())
        + f"; total {sum(took.values()):.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
