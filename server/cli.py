"""`sleepserve` console entry: `serve` here; `train`, `eval`, `bench`, `worker` dispatch to their packages."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import math
import os
import platform
import socket
import sys
from collections.abc import Callable, Mapping
from importlib.metadata import version as package_version

import torch
import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.context import CheckpointError
from server.engine import Engine
from server.settings import Settings

# Subcommands implemented elsewhere: name -> "module:function", imported only when asked for. Each
# function takes the remaining command-line arguments.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("model.train:main", "train a checkpoint"),
    "eval": ("model.evaluate:main", "evaluate a checkpoint"),
    "bench": ("bench.cli:main", "run a benchmark"),
    "worker": ("scheduler.worker:main", "run a remote consolidation worker"),
}

# serve flags: (flag, Settings field, type, help). CLI values override SLEEPSERVE_* environment variables.
# `serve --help` appends each field's default from Settings; a help text says what an unset (None)
# field means itself.
SERVE_FLAGS: list[tuple[str, str, Callable, str]] = [
    ("--host", "host", str, "bind address"),
    ("--port", "port", int, "port"),
    ("--model", "model", str, "checkpoint folder or Hugging Face hub id (default: the shipped demo)"),
    (
        "--checkpoint",
        "checkpoint",
        str,
        "a checkpoint folder: the older name of --model (default: the shipped demo)",
    ),
    ("--served-model-name", "served_model_name", str, "model id clients send (default: the folder's name)"),
    ("--dtype", "dtype", str, "weights' dtype: float32 | bfloat16 | float16 (default: float32 on CPU)"),
    ("--device", "device", str, "torch device"),
    ("--store", "store", str, "session store: memory | redis://host:port/db"),
    ("--window", "window", int, "sleep window L in tokens (default: the checkpoint's or its family's)"),
    ("--schedule", "schedule", str, "hard | lagged (default: the checkpoint's)"),
    (
        "--sleep-blocks",
        "sleep_blocks",
        str,
        "FIRST:LAST: the blocks [FIRST, LAST) that loop in a sleep (default: all)",
    ),
    ("--sleep-mode", "sleep_mode", str, "background (off the decode path) | inline"),
    (
        "--sleep-worker",
        "sleep_worker",
        str,
        "auto | thread | process | interleaved | offload: where background sleep runs",
    ),
    (
        "--sleep-share",
        "sleep_share",
        float,
        "interleaved, offload: share of the decode thread's time N is planned for",
    ),
    ("--sleeper-nice", "sleeper_nice", int, "nice value of the sleeper process, 0 to 19"),
    (
        "--torch-threads",
        "torch_threads",
        int,
        "torch threads (default: OMP_NUM_THREADS where set, else 1)",
    ),
    (
        "--cpu-affinity",
        "cpu_affinity",
        str,
        "auto | none | CPU ids: where the server's threads run",
    ),
    (
        "--sleep-passes",
        "sleep_passes",
        str,
        "sleep passes N, or auto: adaptive in [min, max] (default: the checkpoint's N)",
    ),
    ("--sleep-batch-wait", "sleep_batch_wait", float, "seconds a sleep may wait for others to batch with"),
    (
        "--idle-consolidation",
        "idle_consolidation",
        float,
        "consolidate a session idle this many seconds (default: off)",
    ),
    ("--idle-worker", "idle_worker", str, "local | remote (sleepserve worker, via the Redis Stream)"),
    ("--min-passes", "min_passes", int, "smallest N"),
    ("--max-passes", "max_passes", int, "largest N"),
    ("--max-waiting", "max_waiting", int, "waiting requests before 429"),
    ("--max-running", "max_running", int, "sequences decoded per batch"),
    ("--prefill-chunk", "prefill_chunk", int, "prompt tokens fed per engine iteration (default: 4 windows)"),
    ("--max-tokens", "max_tokens", int, "cap on a request's max_tokens"),
    ("--request-timeout", "request_timeout", float, "seconds a request may take"),
    ("--session-ttl", "session_ttl", float, "idle seconds before a session expires"),
    ("--shutdown-timeout", "shutdown_timeout", float, "seconds running streams get on shutdown"),
    (
        "--api-keys",
        "api_keys",
        str,
        "comma-separated API keys (prefer SLEEPSERVE_API_KEYS; default: none, no auth)",
    ),
    ("--log-level", "log_level", str, "debug | info | warning | error"),
]


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sleepserve serve",
        description="Serve the OpenAI-compatible API. Every flag can also be set as an environment "
        "variable: --sleep-share as SLEEPSERVE_SLEEP_SHARE; flags win.",
    )
    for flag, dest, kind, help_text in SERVE_FLAGS:
        default = Settings.model_fields[dest].get_default(call_default_factory=True)
        shown = help_text if default in (None, []) else f"{help_text} (default: {default})"
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=shown.replace("%", "%%"))
    return parser


def settings_from_args(argv: list[str]) -> Settings:
    """Settings from the environment, overridden by the serve flags given."""
    args = serve_parser().parse_args(argv)
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


def describe_invalid(exc: ValidationError) -> str:
    """Pydantic's errors as one line per setting, named as flag and environment variable."""
    flags = {dest: flag for flag, dest, _, _ in SERVE_FLAGS}
    problems: dict[str, list[str]] = {}
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if field:
            message = f"{message} (got {error['input']!r})"
        problems.setdefault(field, []).append(message)
    lines = []
    for field, messages in problems.items():
        name = f"{flags.get(field, field)} / SLEEPSERVE_{field.upper()}: " if field else ""
        lines.append(f"  {name}{'; or '.join(messages)}")
    return "\n".join(lines)


def torch_threads(settings: Settings, environ: Mapping[str, str]) -> int:
    """The torch thread count to serve with (`Settings.torch_threads`)."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) > 0 else 1


def server_cpus(settings: Settings, allowed: set[int], torch_threads: int) -> set[int] | None:
    """The CPUs to run the server's threads on (`Settings.cpu_affinity`), None to leave them be."""
    if settings.cpu_affinity == "none":
        return None
    if settings.cpu_affinity != "auto":
        cpus = {int(part) for part in settings.cpu_affinity.split(",")}
        if not cpus <= allowed:
            raise ValueError(f"cpu_affinity {sorted(cpus)}: this process may only use CPUs {sorted(allowed)}")
        return cpus
    # interleaved and offloaded sleep run on the decode thread or outside this process's cores
    turns_only = (
        settings.sleep_worker in ("auto", "interleaved", "offload") or settings.sleep_mode == "inline"
    )
    if settings.device != "cpu" or torch_threads != 1 or not turns_only or len(allowed) < 2:
        return None
    return {max(allowed)}


def sleeper_cpus(allowed: set[int], server: set[int] | None) -> set[int] | None:
    """The CPUs of `allowed` that the server's threads, pinned to `server` (None: not pinned), leave
    free for a sleeper process; None if none."""
    if server is None:
        return None
    return (allowed - server) or None


def serve(argv: list[str]) -> int:
    """Run the server with uvicorn."""
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"sleepserve: invalid settings:\n{describe_invalid(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    torch.set_num_threads(torch_threads(settings, os.environ))  # before any thread starts
    logging.getLogger("sleepserve").info("torch threads: %d", torch.get_num_threads())
    try:
        allowed = os.sched_getaffinity(0)
        cpus = server_cpus(settings, allowed, torch.get_num_threads())
        if cpus is not None:  # before any thread starts: they all inherit it
            os.sched_setaffinity(0, cpus)
            logging.getLogger("sleepserve").info("the server's threads run on CPUs %s", sorted(cpus))
        app = create_app(settings, sleeper_cpus=sleeper_cpus(allowed, cpus))
    except (CheckpointError, ValueError) as exc:
        print(f"sleepserve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout) + 10,  # a backstop: see below
    )
    GracefulServer(config, app.state.server.engine, settings.shutdown_timeout).run()
    return 0


class GracefulServer(uvicorn.Server):
    """Drains the engine as soon as uvicorn starts shutting down: running streams get `grace` seconds to
    finish, then end at a token boundary (finish reason "abort", then `[DONE]`) before uvicorn would
    cancel them; the lifespan then saves their sessions."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float) -> None:
        super().__init__(config)
        self.engine, self.grace = engine, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(self.engine.shutdown(self.grace))
        await super().shutdown(sockets)
        await drain


def _dispatch(name: str, argv: list[str]) -> int:
    target, _ = COMMANDS[name]
    module_name, function = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            print(
                f"sleepserve {name}: not available in this installation ({module_name} is missing)",
                file=sys.stderr,
            )
            return 2
        raise
    return getattr(module, function)(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": "serve the OpenAI-compatible API", **{k: v[1] for k, v in COMMANDS.items()}}
    listing = "\n".join(f"  {name:8} {text}" for name, text in commands.items())
    usage = (
        f"usage: sleepserve {{{','.join(commands)}}} [options]  (sleepserve COMMAND --help: its options)\n"
        f"       sleepserve --version\n\n{listing}"
    )
    if argv and argv[0] in ("-V", "--version"):
        print(
            f"sleepserve {package_version('sleepserve')} (torch {torch.__version__}, Python {platform.python_version()})"
        )
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "serve":
        return serve(rest)
    if name in COMMANDS:
        return _dispatch(name, rest)
    print(f"sleepserve: unknown command {name!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
