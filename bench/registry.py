"""Every benchmark that writes a result under bench/results, in one list: `make bench` (bench.suite) runs
the suite's steps from it, the smoke test (tests/bench/test_smoke.py) runs each at its smallest size,
and bench.report renders the published tables from the files it names. A new benchmark plugs in with
one entry here: its module (whose `main(argv)` takes `--out`), its result file and its smallest run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str  # as `sleepserve bench <name>` and `python -m bench.suite --steps <name>` call it
    module: str  # runs as `python -m <module>`; its main(argv) takes `--out <path>`
    result: str  # the file under bench/results it writes (a JSON with its PNG beside it, or a PNG)
    smoke: str  # the arguments of its smallest run on the shipped checkpoint (or its config), space-separated
    in_suite: bool = False  # a step of `make bench`
    takes_threads: bool = False  # takes `--threads` (torch threads of the servers it starts)
    smoke_folders: tuple[str, ...] = ()  # `{name}`s in `smoke` that the smoke test fills with fresh folders

    def smoke_args(self, folders: dict[str, str]) -> list[str]:
        """`smoke` as arguments, its `{name}`s filled from `folders`."""
        return [arg.format(**folders) for arg in self.smoke.split()]

    @property
    def writes_json(self) -> bool:
        return self.result.endswith(".json")


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "decode-scaling", "bench.decode_scaling", "decode_scaling.json", "--positions 48 96 --probe 4", True
    ),
    Benchmark("state", "bench.state", "state.json", "--contexts 48 96 --repeats 2", True),
    Benchmark("sleep-pass", "bench.sleep_pass", "sleep_pass.json", "--repeats 2", True),
    Benchmark(
        "sleep-overlap",
        "bench.sleep_overlap",
        "sleep_overlap.json",
        "--streams 2 --boundaries 1 --rounds 1",
        in_suite=True,
        takes_threads=True,
    ),
    Benchmark(
        "engine-itl",
        "bench.engine_itl",
        "engine_itl.json",
        "--streams 2 --boundaries 1 --rounds 1",
        in_suite=True,
        takes_threads=True,
    ),
    Benchmark(
        "multiturn",
        "bench.multiturn",
        "serve_multiturn.json",
        "--disable-tqdm --sessions 1 --turns 2 --cooldown-turns 1 --input-len 48 --output-len 4 "
        "--concurrency 2 --throughput-prompts 2 --throughput-input-len 8 --throughput-output-len 4",
        in_suite=True,
        takes_threads=True,
    ),
    Benchmark("evaluation", "bench.evaluation", "evaluation.json", "--per-difficulty 4", True),
    Benchmark(
        "real-decode", "bench.real_decode", "real_decode.json", "--smoke", in_suite=True, takes_threads=True
    ),
    Benchmark("soak", "bench.soak", "soak.json", "--smoke"),  # 8 minutes: run on its own, not in the suite
    Benchmark(
        "reproduce",
        "bench.reproduce",
        "reproduction.json",
        "--seeds 0 1 --steps 2 --batch-size 4 --eval-per-t 2 --train-eval-per-t 2 --runs {runs}",  # two seeds: the summary's differences
        smoke_folders=("runs",),
    ),
    Benchmark(
        "training-curves",
        "bench.training_curves",
        "training_curves.png",
        "--runs {runs}",
        smoke_folders=("runs",),
    ),
)

BY_NAME = {benchmark.name: benchmark for benchmark in BENCHMARKS}
