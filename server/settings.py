"""Server settings: environment variables with the `SLEEPSERVE_` prefix, overridable by CLI flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.checkpoint import DEFAULT_CHECKPOINT
from scheduler.isolation import Isolation


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLEEPSERVE_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    # What to serve: a checkpoint folder (a native `sleepy` one, or a Hugging Face one with config.json,
    # safetensors and its tokenizer) or a Hugging Face hub id; default: the shipped demo checkpoint.
    # `checkpoint` is the older name of the same setting.
    model: str | None = None
    checkpoint: Path | None = None
    served_model_name: str | None = None  # the model id clients send; default: the folder's (id's) name
    # Weights' dtype (None: float32 on CPU); the GDN state stays float32 whatever this is.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str = "cpu"
    store: str = "memory"  # "memory" | "redis://host:port/db"
    # Sleep for a checkpoint that records none of its own (a sleep-trained one has its own; overriding
    # them is logged): the window L, the schedule, N (sleep_passes, below) and the blocks that loop in a
    # sleep, "FIRST:LAST" for blocks [FIRST, LAST) (None: all). None: the checkpoint's or its family's.
    window: int | None = Field(None, ge=1)
    schedule: Literal["hard", "lagged"] | None = None
    sleep_blocks: str | None = None
    # Sleep: "background" runs it on the scheduler's worker thread, off the decode path; "inline" on
    # the decode thread. N: sleep_passes if set (None: the checkpoint's own N, so that temperature 0 is
    # deterministic); "auto" chooses it per sleep in [min_passes, max_passes] from the slack to its
    # deadline (background only): deep when idle, shallow under load.
    sleep_mode: Literal["background", "inline"] = "background"
    # Where a background sleep runs: a thread of this process ("thread": on CUDA in its own stream), a
    # child process ("process": on CPU it then never holds the decode loop's GIL), or the decode
    # thread itself between its steps ("interleaved": a slice at a time, paced to the deadlines, N
    # planned to take at most `sleep_share` of its time), or interleaved with its passes handed to a
    # child process on the cores the server's threads leave free while that one keeps up ("offload":
    # the child runs only on time no other thread wants, and the decode thread runs a pass itself
    # where the child is late). "auto": on CPU offload where the server's threads leave cores free
    # (`cpu_affinity` auto on two cores or more), else interleaved (a sleeper beside the decode loop
    # would compete with it and the event loop for the cores); thread on CUDA.
    sleep_worker: Literal["auto"] | Isolation = "auto"
    sleep_share: float = Field(0.35, gt=0, lt=1)
    # How far below the server the sleeper process runs (a nice value, 0-19): on a machine whose cores
    # the sleeper shares with the decode loop and the event loop, a high value (with the kernel's
    # shortest time slice, where it has one) keeps the loop's hand-out of tokens from waiting behind a
    # sleep, at the cost of shallower sleeps when the CPU is short.
    sleeper_nice: int = Field(0, ge=0, le=19)
    # The CPUs `sleepserve serve` runs its own threads on (the event loop and the decode loop). They
    # take turns on one GIL, and on different cores each turn moves the interpreter's hot state
    # between their caches: on 2 cores, decode steps took 1.35-2.4 ms, switching between the two as
    # the kernel moved the threads, against a steady 1.2 ms on one core (a throwaway timing of the
    # engine in-process; the README has it). "auto": one core, the last the process may use, on CPU
    # when torch runs one thread and background sleep is interleaved or offloaded (whose child then
    # runs on the other cores; a sleeper thread or process needs cores of its own, and so do torch's
    # threads); "none": as the kernel places them; else CPU ids, comma-separated.
    cpu_affinity: str = "auto"
    sleep_passes: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    # The idle trigger: consolidate a session's tail after this many idle seconds (None: off; needs a
    # checkpoint trained with variable chunk lengths), on this replica or ("remote") by `sleepserve
    # worker` through the Redis Stream `sleep_stream` (Redis store only).
    idle_consolidation: float | None = Field(None, gt=0)
    idle_worker: Literal["local", "remote"] = "local"
    sleep_stream: str = "sleepserve:sleep-jobs"
    # Seconds a sleep may wait for equal ones to join its batch (sessions crossing their boundaries a
    # few steps apart), while it still finishes by its deadline (interleaved: at the most its pace may
    # take). Interleaved, this holds back a new rolling batch only: later jobs join it between passes.
    sleep_batch_wait: float = Field(0.015, ge=0)
    min_passes: int = Field(1, ge=1)
    max_passes: int = Field(4, ge=1)
    max_waiting: int = Field(256, ge=0)  # requests queued for the batch; past it, 429
    max_running: int = Field(64, ge=1)  # sequences decoded together per step
    prefill_chunk: int | None = Field(None, ge=1)  # prompt tokens per engine iteration; None: 4 windows
    max_tokens: int = Field(4096, ge=1)  # cap on max_tokens of one request (and its default)
    request_timeout: float = Field(600.0, gt=0)  # seconds from arrival to the last token
    session_ttl: float = Field(7 * 24 * 3600.0, gt=0)  # idle seconds before a stored session expires
    session_lease_wait: float = Field(5.0, ge=0)  # how long a request waits for a busy session
    session_lease_ttl: float = Field(15.0, gt=0)  # a request's lease on its session, renewed while it runs
    store_max_bytes: int = Field(1 << 30, ge=1)  # memory store budget (LRU beyond it)
    shutdown_timeout: float = Field(30.0, ge=0)  # seconds running streams get to finish on shutdown
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)  # comma-separated in the env
    log_level: str = "info"

    @field_validator("cpu_affinity")
    @classmethod
    def _check_affinity(cls, value: str) -> str:
        if value not in ("auto", "none") and not all(part.strip().isdigit() for part in value.split(",")):
            raise ValueError(f"cpu_affinity is auto, none or CPU ids like 0,2; got {value!r}")
        return value

    @field_validator("sleep_blocks")
    @classmethod
    def _check_blocks(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+:\d+", value):
            raise ValueError(f"sleep_blocks is FIRST:LAST (blocks [FIRST, LAST) loop), got {value!r}")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _check_model(self) -> Settings:
        if self.model is not None and self.checkpoint is not None and self.model != str(self.checkpoint):
            raise ValueError(f"model ({self.model}) and checkpoint ({self.checkpoint}) name different models")
        if self.served_model_name is None:
            self.served_model_name = Path(self.model_path).name
        return self

    @model_validator(mode="after")
    def _check_passes(self) -> Settings:
        if self.min_passes > self.max_passes:
            raise ValueError(f"min_passes ({self.min_passes}) exceeds max_passes ({self.max_passes})")
        if self.idle_worker == "remote" and not self.store.startswith(("redis://", "rediss://")):
            raise ValueError("idle_worker=remote needs the Redis store")
        if self.sleep_worker in ("process", "offload") and self.device != "cpu":
            raise ValueError(
                f"sleep_worker={self.sleep_worker} runs on CPU; on a GPU use thread (its own CUDA stream)"
            )
        if self.sleeper_nice and self.sleep_worker != "process":
            raise ValueError(
                "sleeper_nice sets the sleeper process's priority: it needs sleep_worker=process"
            )
        if self.sleep_passes == "auto" and self.sleep_mode != "background":
            raise ValueError("sleep_passes=auto (adaptive depth) needs sleep_mode=background")
        if isinstance(self.sleep_passes, int) and not self.min_passes <= self.sleep_passes <= self.max_passes:
            raise ValueError(f"sleep_passes must lie in [min_passes, max_passes], got {self.sleep_passes}")
        return self

    @property
    def sleep_block_range(self) -> tuple[int, int] | None:
        if self.sleep_blocks is None:
            return None
        first, last = self.sleep_blocks.split(":")
        return int(first), int(last)

    @property
    def model_path(self) -> str:
        """The folder or hub id to load."""
        return self.model or str(self.checkpoint or DEFAULT_CHECKPOINT)
