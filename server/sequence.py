"""A request's way through the engine: what the API submits (`EngineRequest`, its `SamplingParams`),
what comes back (`Output`s through a `RequestHandle`, `TurnStats` with the last), and the engine's own
record of it while it runs (`Sequence`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.hybrid import WindowCache
from model.state import SessionState
from model.tokenizer import EOS, StreamDecoder, TextStream
from scheduler.executor import SleepResult
from scheduler.jobs import ConsolidationJob
from server.logprobs import TokenLogprob
from server.sampling import StopMatcher

if TYPE_CHECKING:
    from server.engine import Engine


class QueueFull(Exception):
    """The waiting queue is at `max_waiting`."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: excluded from the text, which ends before them
    stop_tokens: frozenset[int] = frozenset({EOS})
    # Log-probabilities (of the model's own distribution, before temperature and top-k/p) of each
    # generated token, with this many likeliest alternatives (None: none), and of the prompt's tokens
    # (completions' echo).
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass
class EngineRequest:
    state: SessionState  # updated in place
    prompt: list[int]  # the new tokens to feed (non-empty)
    params: SamplingParams
    # Stateful requests feed their last token too (the reply joins the session); stateless ones stop at
    # the last sample.
    stateful: bool = False
    arrival: float = field(default_factory=time.monotonic)
    timeout: float | None = None


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # prompt tokens fed (all of them unless aborted mid-prompt)
    completion_tokens: int = 0
    consolidated_tokens: int = 0
    sleep_passes: int = 0
    sleep_seconds: float = 0.0
    session_tokens_total: int = 0


@dataclass
class Output:
    """A piece of generated text; the last one of a request has `finish_reason` and `stats`."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens generated since the last
    # The prompt's tokens (params.prompt_logprobs), in one output once the whole prompt is in; None for
    # a first token that follows nothing (a new sequence).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stats: TurnStats | None = None
    prompt_complete: bool = True  # False when the request ended before its whole prompt was fed
    reply: str = ""  # the last output: the whole generated text
    reply_tokens: list[int] = field(default_factory=list)  # the last output: the generated ids fed
    error: str = ""  # finish_reason "error": what failed


class RequestHandle:
    """The API side of a submitted request: iterate its outputs; `abort()` when the client is gone."""

    def __init__(self, engine: Engine, seq: Sequence) -> None:
        self._engine, self._seq = engine, seq
        self.id = seq.id
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.result: asyncio.Future[Output] = asyncio.get_running_loop().create_future()

    def abort(self) -> None:
        self._engine.abort(self._seq)

    async def __aiter__(self) -> AsyncIterator[Output]:
        while True:
            out = await self.queue.get()
            yield out
            if out.finish_reason is not None:
                return


@dataclass
class PendingSleep:
    """A submitted consolidation: its job (whose deadline the engine moves as the session nears its
    boundary) and the future of its result."""

    job: ConsolidationJob
    future: concurrent.futures.Future[SleepResult]


@dataclass(eq=False)
class Sequence:
    """A request inside the engine."""

    id: str
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    handle: RequestHandle | None = None
    deadline: float = float("inf")
    cache: WindowCache | None = None
    logits: Tensor | None = None  # after the last fed token
    fed: int = 0  # prompt tokens fed so far (an offset, so that a slice never copies the rest)
    pending: list[int] = field(default_factory=list)  # sampled tokens not fed yet
    generated: list[int] = field(default_factory=list)
    text: str = ""  # generated text so far (cut before a stop string)
    sent: int = 0  # characters of `text` already emitted
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    finish_reason: str | None = None
    error: str = ""
    done: bool = False  # its last output is out
    stats: TurnStats = field(default_factory=TurnStats)
    generator: torch.Generator | None = None
    decoder: TextStream = field(default_factory=StreamDecoder)  # the model's tokenizer's (`submit`)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # generated, not yet sent
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    last_token_at: float = 0.0
    # Background sleep (with an executor): the pending consolidation of the tail's first chunk, and
    # since when the sequence has been waiting at a boundary for it.
    sleep: PendingSleep | None = None
    blocked_since: float | None = None

    @property
    def state(self) -> SessionState:
        return self.request.state

    @property
    def to_feed(self) -> int:
        """Prompt tokens not fed yet."""
        return len(self.request.prompt) - self.fed
