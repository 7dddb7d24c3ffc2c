"""The ways a background sleep runs, and the executor of each (`create_executor`)."""

from __future__ import annotations

import logging
from typing import Literal, get_args

from model.hybrid import HybridLM
from scheduler.executor import SleepExecutor
from scheduler.interleaved import InterleavedExecutor
from scheduler.offload import OffloadExecutor
from scheduler.process import ProcessSleeper
from scheduler.thread import LocalSleeper, WorkerExecutor

# "thread": worker threads of this process (on CUDA each in its own stream); "process": worker threads
# each handing its sleeps to a child process; "interleaved": the decode thread between its steps;
# "offload": interleaved, the passes handed to a child process while it keeps up.
Isolation = Literal["thread", "process", "interleaved", "offload"]
ISOLATIONS: tuple[str, ...] = get_args(Isolation)
# The rolling batch of interleaved and offloaded sleep runs one pass over rows at different passes, so
# every row must run the same blocks each pass: a model that loops only `sleep_blocks` runs whole
# sleeps (`HybridLM.sleep`) instead, in this process or a child one.
WHOLE_SLEEP = {"interleaved": "thread", "offload": "process"}

log = logging.getLogger(__name__)


def create_executor(
    model: HybridLM,
    isolation: Isolation = "thread",
    *,
    workers: int = 1,
    nice: int = 0,
    share: float = 0.35,
    sleeper_cpus: set[int] | None = None,
    **kw,
) -> SleepExecutor:
    """The executor that runs sleeps the `isolation` way. `workers`: worker threads (thread, process);
    `nice`: how far below the server a sleeper process runs (process); `share`: the share of the decode
    thread's time a sleep's N is planned to take (interleaved, offload); `sleeper_cpus`: the CPUs a
    sleeper process runs on (process, offload; None: where the server does). `kw`: `SleepExecutor`'s.
    A model with `sleep_blocks` gets whole sleeps: thread for interleaved, process for offload."""
    if isolation in WHOLE_SLEEP and model.config.sleep_blocks is not None:
        log.warning(
            "sleep_blocks %s loop in a sleep: %s sleep runs every block each pass, using %s instead",
            model.config.sleep_blocks,
            isolation,
            WHOLE_SLEEP[isolation],
        )
        isolation = WHOLE_SLEEP[isolation]
    if nice and isolation != "process":
        raise ValueError("nice sets the priority of a sleeper process: it needs isolation='process'")
    if isolation == "interleaved":
        return InterleavedExecutor(model, share=share, **kw)
    if isolation == "offload":
        return OffloadExecutor(model, share=share, sleeper_cpus=sleeper_cpus, **kw)
    if isolation == "process":
        metrics = kw.get("metrics")
        restarted = metrics.sleeper_restarts.inc if metrics is not None else None
        return WorkerExecutor(
            model,
            lambda: ProcessSleeper(model, nice, sleeper_cpus, on_restart=restarted),
            workers=workers,
            isolation=isolation,
            **kw,
        )
    if isolation == "thread":
        return WorkerExecutor(model, lambda: LocalSleeper(model), workers=workers, **kw)
    raise ValueError(f"isolation is one of {', '.join(ISOLATIONS)}; got {isolation!r}")
