"""Server settings: environment variables with the `SLEEPSERVE_` prefix, overridable by CLI flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.checkpoint import DEFAULT_CHECKPOINT
from scheduler.isolation import Isolation


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLEEPSERVE_", extra="ignore")

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    model: str | None = Field(
        None,
        description="what to serve: a checkpoint folder (a native `sleepy` one, or a Hugging Face one with `config.json`, safetensors and its tokenizer) or a Hugging Face hub id; none: the shipped demo checkpoint",
    )
    checkpoint: Path | None = Field(None, description="the older name of `model`: a checkpoint folder")
    served_model_name: str | None = Field(
        None,
        description="the model id clients send and `/v1/models` lists; none: the checkpoint folder's (hub id's) name",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="the weights' dtype; none: float32 on CPU. The GDN state is float32 whatever this is",
    )
    device: str = Field("cpu", description="torch device: `cpu`, `cuda`, `cuda:1`, …")
    store: str = Field(
        "memory",
        description="where sessions live between requests: `memory` (in-process: LRU, idle TTL, byte budget) or `redis://host:port/db` (shared by replicas)",
    )
    # Sleep for a checkpoint that records none of its own (a sleep-trained one has its own; overriding
    # them is logged): the window L, the schedule, N (sleep_passes, below) and the blocks that loop.
    window: int | None = Field(
        None, ge=1, description="tokens per sleep window L; none: the checkpoint's, or its family's default"
    )
    schedule: Literal["hard", "lagged"] | None = Field(
        None,
        description="`lagged` (sleep in the background, nobody waits) or `hard` (the paper's: a session waits once a window for its own sleep); none: the checkpoint's",
    )
    sleep_blocks: str | None = Field(
        None, description="`FIRST:LAST`: the blocks [FIRST, LAST) that loop N times in a sleep; none: all"
    )
    # Sleep: "background" runs it on the scheduler's worker thread, off the decode path; "inline" on
    # the decode thread. N: sleep_passes if set (None: the checkpoint's own N, so that temperature 0 is
    # deterministic); "auto" chooses it per sleep in [min_passes, max_passes] from the slack to its
    # deadline (background only): deep when idle, shallow under load.
    sleep_mode: Literal["background", "inline"] = Field(
        "background",
        description="`background`: sleep scheduled off the decode path; `inline`: on the decode thread at the boundary, every stream waiting",
    )
    # Where a background sleep runs: a thread of this process ("thread": on CUDA in its own stream), a
    # child process ("process": on CPU it then never holds the decode loop's GIL), or the decode
    # thread itself between its steps ("interleaved": a slice at a time, paced to the deadlines, N
    # planned to take at most `sleep_share` of its time), or interleaved with its passes handed to a
    # child process on the cores the server's threads leave free while that one keeps up ("offload":
    # the child runs only on time no other thread wants, and the decode thread runs a pass itself
    # where the child is late). "auto": on CPU offload where the server's threads leave cores free
    # (`cpu_affinity` auto on two cores or more), else interleaved (a sleeper beside the decode loop
    # would compete with it and the event loop for the cores); thread on CUDA.
    sleep_worker: Literal["auto"] | Isolation = Field(
        "auto",
        description="where a background sleep runs: `auto` (CPU: `offload` where the server's threads leave cores free, else `interleaved`; GPU: `thread`), `offload` (passes in a low-priority child process, the decode thread covering for it when late), `interleaved` (slices between decode steps), `thread` (own CUDA stream on GPU), `process` (a child process runs whole sleeps)",
    )
    sleep_share: float = Field(
        0.35,
        gt=0,
        lt=1,
        description="`interleaved`, `offload`: each sleep gets the deepest N whose planned cost takes at most this share of the decode thread",
    )
    # How far below the server the sleeper process runs (a nice value, 0-19): on a machine whose cores
    # the sleeper shares with the decode loop and the event loop, a high value (with the kernel's
    # shortest time slice, where it has one) keeps the loop's hand-out of tokens from waiting behind a
    # sleep, at the cost of shallower sleeps when the CPU is short.
    sleeper_nice: int = Field(
        0, ge=0, le=19, description="`process`: how far below the server its sleeper process runs (nice 0–19)"
    )
    # The CPUs `sleepserve serve` runs its own threads on (the event loop and the decode loop). They
    # take turns on one GIL, and on different cores each turn moves the interpreter's hot state
    # between their caches: on 2 cores, decode steps took 1.35-2.4 ms, switching between the two as
    # the kernel moved the threads, against a steady 1.2 ms on one core (a throwaway timing of the
    # engine in-process; docs/design.md has why). "auto": one core, the last the process may use, on CPU
    # when torch runs one thread and background sleep is interleaved or offloaded (whose child then
    # runs on the other cores; a sleeper thread or process needs cores of its own, and so do torch's
    # threads); "none": as the kernel places them; else CPU ids, comma-separated.
    cpu_affinity: str = Field(
        "auto",
        description="CPUs of the server's own threads (event loop, decode loop): `auto` (one core on CPU with one torch thread and interleaved or offloaded sleep, the sleeper taking the others), `none`, or ids like `0,1`",
    )
    # torch's intra-op threads for the server's model. None: OMP_NUM_THREADS where it is set, else one
    # (on CPU the shipped model's ops are too small to split: a decode step took 0.85 ms on one thread
    # and 0.91 on two, and one thread lets `cpu_affinity` auto keep the server's threads on one core
    # and offload sleep to the others; on a GPU the CPU only launches kernels, as vLLM's one thread
    # per worker). A larger model on CPU may want more.
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of the server's model; none: `OMP_NUM_THREADS` where set, else 1 (the shipped model's ops are too small to split; a larger model on CPU may want more)",
    )
    sleep_passes: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description="sleep depth N: a number, or `auto` (per sleep in [`min_passes`, `max_passes`] from its slack); none: the checkpoint's",
    )
    # The idle trigger: consolidate a session's tail after this many idle seconds (None: off; needs a
    # checkpoint trained with variable chunk lengths), on this replica or ("remote") by `sleepserve
    # worker` through the Redis Stream `sleep_stream` (Redis store only).
    idle_consolidation: float | None = Field(
        None,
        gt=0,
        description="seconds of inactivity after which a session's unconsolidated tail is slept on (needs a checkpoint trained with variable chunks); none: off",
    )
    idle_worker: Literal["local", "remote"] = Field(
        "local",
        description="who runs idle consolidation: `local` (this replica) or `remote` (`sleepserve worker` through a Redis Stream; Redis store only)",
    )
    sleep_stream: str = Field(
        "sleepserve:sleep-jobs", description="the Redis Stream of remote consolidation jobs"
    )
    # Seconds a sleep may wait for equal ones to join its batch (sessions crossing their boundaries a
    # few steps apart), while it still finishes by its deadline (interleaved: at the most its pace may
    # take). Interleaved, this holds back a new rolling batch only: later jobs join it between passes.
    sleep_batch_wait: float = Field(
        0.015,
        ge=0,
        description="seconds a sleep may wait for equal ones to join its batch, while it still meets its deadline",
    )
    min_passes: int = Field(1, ge=1, description="smallest N of adaptive depth (and of idle consolidation)")
    max_passes: int = Field(4, ge=1, description="largest N of adaptive depth (and of idle consolidation)")
    max_waiting: int = Field(
        256, ge=0, description="requests that may wait for a decode slot; past it, 429 with `Retry-After`"
    )
    max_running: int = Field(64, ge=1, description="sequences decoded together per engine step")
    prefill_chunk: int | None = Field(
        None,
        ge=1,
        description="prompt tokens fed per engine iteration, so a long prompt never freezes running streams; none: 4 windows",
    )
    max_tokens: int = Field(4096, ge=1, description="cap on a request's `max_tokens` (and its default)")
    request_timeout: float = Field(
        600.0, gt=0, description="seconds from a request's arrival to its last token"
    )
    session_ttl: float = Field(
        7 * 24 * 3600.0, gt=0, description="idle seconds before a stored session expires"
    )
    session_lease_wait: float = Field(
        5.0, ge=0, description="seconds a request waits for a session another request is using"
    )
    session_lease_ttl: float = Field(
        15.0, gt=0, description="seconds a request's lease on its session lasts (renewed while it runs)"
    )
    store_max_bytes: int = Field(
        1 << 30,
        ge=1,
        description="the memory store's byte budget (least recently used sessions evicted beyond it)",
    )
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="seconds running streams get to finish on SIGTERM before they are cut and saved",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys; then every route but `/health`, `/ready`, `/metrics` needs `Authorization: Bearer <key>`",
    )
    # Limits: each input that can make work has one, refused with a 4xx that names it.
    max_prompt_tokens: int = Field(
        65536, ge=1, description="most prompt tokens one request may feed (its new tokens, in a session)"
    )
    max_request_bytes: int = Field(
        8 << 20, ge=1024, description="most bytes of a JSON request body; a larger one gets 413, unread"
    )
    max_import_bytes: int = Field(
        256 << 20,
        ge=1024,
        description="most bytes of a session blob to import; the upload is cut at this size (413)",
    )
    session_history_messages: int = Field(
        1024,
        ge=1,
        description="chat message hashes a session record keeps to recognise a re-sent history (the "
        "first and the latest; those between are counted and trusted); a conversation up to this many "
        "messages is also kept whole for the chat template (longer: new messages are rendered alone)",
    )
    session_signing_key: SecretStr | None = Field(
        None,
        description="sign exported session blobs with this key (HMAC-SHA256) and refuse imports without "
        "a valid signature; unset: blobs are checksummed only",
    )
    log_level: str = Field("info", description="`debug`, `info`, `warning` or `error`")

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
