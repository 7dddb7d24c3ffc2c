"""`sleepserve bench <name> [options]`: the benchmarks by name (each also runs as `python -m bench.<module>`)."""

from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("bench.serve", "serving benchmark client for any OpenAI-compatible server (--multi-turn too)"),
    "multiturn": ("bench.multiturn", "sleepserve vs full attention vs transformers by context length"),
    "state": ("bench.state", "session state size and store round trip by context length"),
    "decode-scaling": ("bench.decode_scaling", "per-token decode latency against context position"),
    "real-decode": (
        "bench.real_decode",
        "a Qwen3.5-shaped model: sleepserve vs transformers, latency by context",
    ),
    "sleep-overlap": ("bench.sleep_overlap", "sleep off the decode path: overlap with decoding"),
    "engine-itl": ("bench.engine_itl", "sleep-overlap's streams at the engine, without HTTP or a client"),
    "sleep-pass": ("bench.sleep_pass", "what one sleep of N passes costs the decode thread"),
    "evaluation": ("bench.evaluation", "the shipped model's accuracy by task, difficulty and N"),
    "soak": ("bench.soak", "sustained load on Redis, through a kill -9 of the server and a Redis restart"),
    "reproduce": ("bench.reproduce", "the paper's experiments at small scale"),
    "training-curves": ("bench.training_curves", "training loss curves from the runs' logs"),
    "report": ("bench.report", "render the docs' results and settings tables from their sources"),
    "hf-server": ("bench.hf_server", "serve the transformers baseline (OpenAI-compatible)"),
    "suite": (
        "bench.suite",
        "every step of bench/registry.py marked in_suite (make bench): refresh bench/results",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:15} {text}" for name, (_, text) in COMMANDS.items())
    usage = f"usage: sleepserve bench {{{','.join(COMMANDS)}}} [options]\n\n{listing}"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sleepserve bench: unknown benchmark {name!r}\n{usage}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        print(f"sleepserve bench {name}: not available ({exc.name} is missing)", file=sys.stderr)
        return 2
    code = module.main(rest)
    return code if isinstance(code, int) else 0  # some mains return their result dict


if __name__ == "__main__":
    sys.exit(main())
