"""Sleep in a child process (CPU). On CPU a small model's step is mostly Python, so a sleep on a thread
of the server holds the GIL that the decode loop needs; in a child process it takes another core
instead. `ProcessSleeper` runs whole sleeps there (isolation "process", on a worker thread of
`scheduler.thread.WorkerExecutor`), with `nice` > 0 behind the server's threads
(`_background_priority`), and single passes for the offloading executor (`scheduler.offload`), their
tensors in shared memory. Only the chunk, the memory and the new memory cross the pipe (a few
kilobytes)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import os
import platform
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from torch import Tensor

from model.config import ModelConfig
from model.hybrid import HybridLM
from model.slices import run_to_end
from scheduler.executor import Memory

log = logging.getLogger("sleepserve.scheduler")


def _pass_size(config: ModelConfig, rows: int, tokens: int) -> int:
    """Numbers in a pass's h and memory (see `_pass_views`)."""
    return rows * (tokens * config.d_model + sum(math.prod(shape) for shape in config.memory_shapes()))


def _pass_views(shared: Tensor, config: ModelConfig, rows: int, tokens: int) -> tuple[Tensor, Memory]:
    """A pass's h [rows, tokens, d] and memory (one [rows, *shape] per `ModelConfig.memory_shapes`),
    laid out one after the other at the start of the flat buffer `shared`."""
    start = rows * tokens * config.d_model
    h = shared[:start].view(rows, tokens, config.d_model)
    memory = []
    for shape in config.memory_shapes():
        size = rows * math.prod(shape)
        memory.append(shared[start : start + size].view(rows, *shape))
        start += size
    return h, memory


class ProcessSleeper:
    """Runs `model.sleep` in a child process with a copy of the weights (CPU only), at `nice` below the
    server's priority, or with `idle` only on time no other thread wants (SCHED_IDLE), on `cpus` (None:
    where the server runs). One call at a time; a child that dies is restarted (`restart`: logged, and
    `on_restart` called, for a metric) and the call retried once. With `pass_rows`, it also runs single
    passes of up to that many chunks of up to a window's capacity without the caller waiting for them
    (`send_pass`, then `pass_reply`), for the offloading executor (which restarts a child that died):
    their tensors cross in shared memory, and the pipe carries a few bytes (pickled, a pass's 100 kB
    took 0.1-0.25 ms a way)."""

    def __init__(
        self,
        model: HybridLM,
        nice: int = 0,
        cpus: set[int] | None = None,
        idle: bool = False,
        pass_rows: int = 0,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        if model.device.type != "cpu":
            raise ValueError("the process sleeper runs on CPU; on CUDA use the thread sleeper (own stream)")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must lie in [0, 19], got {nice}")
        self.nice, self.cpus, self.idle, self.on_restart = nice, cpus, idle, on_restart
        self.config = model.config
        size = _pass_size(model.config, pass_rows, model.config.window_capacity)
        with torch.inference_mode(False):  # written in place from the decode thread's inference mode
            self._shared = torch.zeros(size).share_memory_()
        # A child reads the weights from a file: handed through the pipe, they would make starting it
        # wait until it has booted and read them (seconds), which a restart on the decode thread cannot
        # afford; in shared memory, they would need a /dev/shm as large as the model.
        self._folder = tempfile.TemporaryDirectory(prefix="sleepserve-sleeper-")
        self._weights = Path(self._folder.name) / "weights.pt"
        torch.save({name: t.detach() for name, t in model.state_dict().items()}, self._weights)
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork is unsafe in a process with threads
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_sleeps,
            args=(child, self.config.to_dict(), self._weights, self._shared, self.nice, self.cpus, self.idle),
            name="sleepserve-sleeper",
            daemon=True,
        )
        self._process.start()
        child.close()

    def __call__(self, memory: Memory, chunk: Tensor, passes: int) -> Memory:
        request = ("sleep", [m.numpy() for m in memory], chunk.numpy(), passes)
        with self._lock:
            try:
                reply = self._ask(request)
            except (EOFError, OSError):
                self.restart()
                reply = self._ask(request)
        if isinstance(reply, BaseException):
            raise reply
        return [torch.from_numpy(array) for array in reply]

    def alive(self) -> bool:
        return self._process.is_alive()

    def restart(self) -> None:
        """Replace the child, which died or cannot be reached, with a fresh one (a pass it had is lost)."""
        if self._process.is_alive():  # unreachable: end it now, without waiting on the caller's thread
            self._process.kill()
        self._process.join(timeout=5)
        log.warning("the sleeper process died (exit code %s); restarting it", self._process.exitcode)
        self._conn.close()
        self._start()
        if self.on_restart is not None:
            self.on_restart()

    def _ask(self, request: tuple) -> object:
        self._conn.send(request)
        return self._conn.recv()

    def send_pass(self, h: Tensor, fast: Memory, memory_only: bool) -> bool:
        """Start one pass (`HybridLM.pass_slices`'s arguments: h [B, T, d], the fast weights) in the child
        and return at once; False if it is larger than `pass_rows` chunks of a window's capacity. One
        pass at a time: the next after `pass_reply` answered. Raises OSError where the child is gone (the
        caller restarts it)."""
        rows, tokens, _ = h.shape
        if _pass_size(self.config, rows, tokens) > self._shared.numel():
            return False
        shared_h, shared_fast = _pass_views(self._shared, self.config, rows, tokens)
        shared_h.copy_(h)
        for shared, m in zip(shared_fast, fast, strict=True):
            shared.copy_(m)
        self._conn.send(("pass", rows, tokens, memory_only))
        return True

    def pass_reply(self) -> tuple[Tensor, Memory, float] | None:
        """The pass sent last, once the child finished it: (h, fast, its seconds of work); None while it
        runs. Raises what the pass raised, EOFError or OSError where the child is gone."""
        if not self._conn.poll():
            return None
        reply = self._conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        rows, tokens, seconds = reply
        h, fast = _pass_views(self._shared, self.config, rows, tokens)
        return h.clone(), [m.clone() for m in fast], seconds

    def close(self) -> None:
        with self._lock, contextlib.suppress(EOFError, OSError):
            self._conn.send(None)
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()
        self._folder.cleanup()


# The kernel's shortest time slice (struct sched_attr's sched_runtime for SCHED_OTHER, Linux ≥ 6.12) and
# the number of its sched_setattr system call, which Python's os module does not wrap.
_SHORTEST_SLICE_NS = 100_000
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}


def _background_priority(nice: int) -> None:
    """Put this process behind the server's threads: `nice` lowers its share of a contended core, and
    the shortest time slice (where the kernel takes one: EEVDF, Linux ≥ 6.12) lets a thread that wakes
    up, as the event loop does to hand a step's tokens out, take the core from it at once. (Measured on
    2 cores: either alone left the loop waiting milliseconds for a core behind a sleep; both together
    did not.)"""
    os.nice(nice)
    number = _SCHED_SETATTR.get(platform.machine())
    if number is None:
        return
    # struct sched_attr, first version (48 bytes): size, policy, flags, nice, priority, runtime,
    # deadline, period.
    attr = struct.pack(
        "IIQiIQQQ", 48, os.SCHED_OTHER, 0, os.getpriority(os.PRIO_PROCESS, 0), 0, _SHORTEST_SLICE_NS, 0, 0
    )
    if ctypes.CDLL(None, use_errno=True).syscall(number, 0, ctypes.c_char_p(attr), 0) != 0:
        log.debug("sched_setattr: %s (an older kernel: nice alone applies)", os.strerror(ctypes.get_errno()))


def _serve_sleeps(
    conn: Connection,
    config: dict,
    weights: Path,
    shared: Tensor,
    nice: int,
    cpus: set[int] | None,
    idle: bool,
) -> None:
    """The child process of `ProcessSleeper`: answers ("sleep", memory, chunk, passes) with the new
    memory, and ("pass", rows, tokens, memory_only) with (rows, tokens, seconds of work) of one pass
    over the h and fast weights in `shared`, whose results it leaves there."""
    torch.set_num_threads(1)  # the sleeper takes one core beside the decode loop, no more
    if cpus:
        with contextlib.suppress(OSError):  # none of them is this container's: stay where the server is
            os.sched_setaffinity(0, cpus)
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif nice:
        _background_priority(nice)
    model_config = ModelConfig.from_dict(config)
    model = HybridLM(model_config)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the server is gone
            return
        if request is None:
            return
        kind, *args = request
        try:
            with torch.inference_mode():
                if kind == "sleep":
                    memory, chunk, passes = args
                    out = model.sleep([torch.from_numpy(m) for m in memory], torch.from_numpy(chunk), passes)
                    conn.send([m.numpy() for m in out])
                else:
                    rows, tokens, memory_only = args
                    h, fast = _pass_views(shared, model_config, rows, tokens)
                    start = time.perf_counter()
                    h_out, fast_out = run_to_end(model.pass_slices(h, fast, memory_only=memory_only))
                    h.copy_(h_out)
                    for m, out in zip(fast, fast_out, strict=True):
                        m.copy_(out)
                    conn.send((rows, tokens, time.perf_counter() - start))
        except Exception as exc:  # the parent raises it in the job's future, or runs the pass itself
            with contextlib.suppress(OSError):  # the server is gone: the next recv ends this loop
                conn.send(exc)
