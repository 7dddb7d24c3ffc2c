"""The engine: one thread that runs every admitted sequence, decoding them together as one batch.

Each iteration (`Engine.step`) does, in order:
1. finish the sequences that were aborted (client gone) or passed their deadline, at a token boundary;
2. admit waiting sequences while fewer than `max_running` run (their window is rebuilt from the state);
3. prefill: feed at most `prefill_chunk` prompt tokens (of the oldest prefilling sequences), so that
   a long prompt never freezes the running streams for more than one slice;
4. decode: one token for every sequence past its prompt, as a single `model.extend` over their stacked
   window caches (continuous batching: membership may change at every step; the stacked cache persists
   and is only cut and re-stacked when sequences join or leave).

A sequence's `SessionState` is updated in place token by token, exactly as `model.session.feed` does,
so an aborted request leaves its session as of its last fully processed token. When a window fills the
sequence sleeps synchronously in `Engine._consolidate` (the one place a scheduler will take over).
Outputs reach each request's asyncio queue through `loop.call_soon_threadsafe`.

Finish reasons: `stop` (EOS, a stop token or a stop string), `length` (max_tokens), `abort` (client
gone or server shutdown), `timeout` (request_timeout passed), `error` (the model raised; the session
must not be saved).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.attention import KVCache
from model.hybrid import HybridLM, WindowCache
from model.session import cross_boundary, open_window, room_in_chunk
from model.state import SessionState
from model.tokenizer import EOS, StreamDecoder
from server.metrics import Metrics

log = logging.getLogger("sleepserve.engine")


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


@dataclass
class EngineRequest:
    state: SessionState  # updated in place
    prompt: list[int]  # the new tokens to feed (non-empty)
    params: SamplingParams
    # Stateful requests feed their last token too (the reply joins the session), then `close_token`
    # when the reply did not end with it (chat: <|end|>). Stateless ones stop at the last sample.
    stateful: bool = False
    close_token: int | None = None
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
    finish_reason: str | None = None
    stats: TurnStats | None = None
    prompt_complete: bool = True  # False when the request ended before its whole prompt was fed
    reply: str = ""  # the last output: the whole generated text


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
    to_feed: list[int] = field(default_factory=list)  # prompt tokens not fed yet
    pending: list[int] = field(default_factory=list)  # sampled (or closing) tokens not fed yet
    generated: list[int] = field(default_factory=list)
    text: str = ""  # generated text so far (cut before a stop string)
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None
    stats: TurnStats = field(default_factory=TurnStats)
    generator: torch.Generator | None = None
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    last_token_at: float = 0.0

    @property
    def state(self) -> SessionState:
        return self.request.state


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [vocab]: argmax at temperature 0, else top-k / top-p sampling."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _stop_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max(
        (k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])),
        default=0,
    )


class Engine:
    def __init__(
        self,
        model: HybridLM,
        *,
        passes: int,
        metrics: Metrics,
        max_running: int = 64,
        max_waiting: int = 256,
        prefill_chunk: int | None = None,
    ) -> None:
        self.model, self.passes, self.metrics = model, passes, metrics
        self.max_running, self.max_waiting = max_running, max_waiting
        self.prefill_chunk = prefill_chunk or model.config.window
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.max_batch = 0  # largest decode batch so far
        self._rows: list[Sequence] = []  # the decode batch, in the row order of `_cache`
        self._cache: WindowCache | None = None
        self._aborted: set[Sequence] = set()
        self._wake = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    # -- API side (event loop thread) ---------------------------------------------------------------

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request; raises QueueFull past `max_waiting`, EngineClosed while shutting down."""
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token")
        seq = Sequence(f"{next(self._ids)}-{secrets.token_hex(4)}", request, asyncio.get_running_loop())
        seq.handle = RequestHandle(self, seq)
        seq.to_feed = list(request.prompt)
        if request.timeout is not None:
            seq.deadline = request.arrival + request.timeout
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        seq.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        with self._wake:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.append(seq)
            self.metrics.requests_waiting.set(len(self.waiting))
            self._wake.notify()
        return seq.handle

    def abort(self, seq: Sequence) -> None:
        with self._wake:
            self._aborted.add(seq)
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sleepserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, grace: float) -> None:
        """Stop taking requests, let the admitted ones finish for up to `grace` seconds, then cut the
        rest at a token boundary (finish reason `abort`) and stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self.busy or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self.step()
                except Exception:
                    log.exception("engine step failed; failing the running requests")
                    for seq in list(self.running):
                        self._finish(seq, "error")
                    self._rows, self._cache = [], None
            for seq in [*self.running, *self.waiting]:
                self._finish(seq, "abort")

    def step(self) -> None:
        """One iteration: aborts and timeouts, admission, one prefill slice, one batched decode step."""
        now = time.monotonic()
        with self._wake:
            aborted, self._aborted = self._aborted, set()
        for seq in [*self.waiting, *self.running]:
            if seq in aborted:
                self._finish(seq, "abort")
            elif now > seq.deadline:
                self._finish(seq, "timeout")
        self._admit()
        self._prefill()
        self._decode()
        self._update_gauges()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            with self._wake:
                seq = self.waiting.popleft()
            self.running.append(seq)  # first: should the window fail to open, the request fails visibly
            seq.cache, seq.logits = open_window(self.model, seq.state)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for seq in [s for s in self.running if s.to_feed]:
            while budget and seq.to_feed:
                n = min(budget, room_in_chunk(self.model, seq.state), len(seq.to_feed))
                piece, seq.to_feed = seq.to_feed[:n], seq.to_feed[n:]
                logits, seq.cache = self.model.extend(
                    torch.tensor([piece], device=self.model.device), seq.cache
                )
                self._advance(seq, piece, logits[0, -1])
                seq.stats.prompt_tokens += n
                self.metrics.prompt_tokens.inc(n)
                budget -= n
            if not seq.to_feed:
                self._sample(seq)
            if not budget:
                return

    def _decode(self) -> None:
        self._regroup([s for s in self.running if s.pending and not s.to_feed])
        if not self._rows:
            return
        batch = list(self._rows)
        tokens = torch.tensor([[s.pending[0]] for s in batch], device=self.model.device)
        logits, self._cache = self.model.extend(tokens, self._cache)
        self.max_batch = max(self.max_batch, len(batch))
        self.metrics.decode_batch_size.observe(len(batch))
        for row, seq in enumerate(batch):
            self._advance(seq, [seq.pending.pop(0)], logits[row, -1])
            if seq.finish_reason is None:
                self._sample(seq)
            elif not seq.pending:
                self._finish(seq, seq.finish_reason)

    def _regroup(self, members: list[Sequence]) -> None:
        """Make the decode batch hold exactly `members`. The batch's stacked cache persists from step to
        step; only when sequences join or leave is it cut (`select`) and extended (`stack`). While in the
        batch a sequence's own `cache` is None: its window is its row of `self._cache`."""
        if set(members) == set(self._rows):
            return
        keep = [row for row, seq in enumerate(self._rows) if seq in members]
        joining = [seq for seq in members if seq.cache is not None]
        parts = ([self._cache.select(keep)] if keep else []) + [seq.cache for seq in joining]
        self._rows = [self._rows[row] for row in keep] + joining
        self._cache = (WindowCache.stack(parts) if len(parts) > 1 else parts[0]) if parts else None
        for seq in joining:
            seq.cache = None

    def _advance(self, seq: Sequence, tokens: list[int], logits: Tensor) -> None:
        """Account for tokens the model has just processed, as `model.session.feed` does."""
        seq.logits = logits
        seq.state.tail += tokens
        seq.state.tokens_seen += len(tokens)
        if room_in_chunk(self.model, seq.state) == 0:
            self._consolidate(seq)

    def _consolidate(self, seq: Sequence) -> None:
        """The window of `seq` is full: sleep now, synchronously, and rebuild its window."""
        start = time.perf_counter()
        rebuilt, report = cross_boundary(self.model, seq.state, self.passes)
        if report is None:  # lagged's first chunk: it stays in the window, nothing to sleep on yet
            return
        if seq.cache is None:  # a member of the decode batch: replace its row
            _write_row(self._cache, self._rows.index(seq), rebuilt)
        else:
            seq.cache = rebuilt
        seq.stats.consolidated_tokens += report.tokens
        seq.stats.sleep_passes += report.passes
        seq.stats.sleep_seconds += report.seconds
        self.metrics.sleep_duration.labels(trigger="window_full").observe(report.seconds)
        self.metrics.sleep_passes.observe(report.passes)
        self.metrics.sleep_tokens.inc(report.tokens)
        if seq.generated:
            self.metrics.decode_stall.observe(time.perf_counter() - start)

    def _sample(self, seq: Sequence) -> None:
        """Sample the next token after `seq.logits`, emit its text, and decide whether the request ends."""
        params = seq.request.params
        token = sample(seq.logits, params, seq.generator)
        now = time.monotonic()
        if seq.generated:
            self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        else:
            self.metrics.time_to_first_token.observe(now - seq.request.arrival)
        seq.last_token_at = now
        seq.generated.append(token)
        seq.stats.completion_tokens += 1
        self.metrics.generation_tokens.inc()
        reason = "stop" if token in params.stop_tokens else self._append_text(seq, token)
        if reason is None and len(seq.generated) >= params.max_tokens:
            reason = "length"
        if reason is None:
            seq.pending = [token]
            self._emit(seq, final=False)
            return
        seq.finish_reason = reason
        if not seq.request.stateful:
            self._finish(seq, reason)
            return
        close = seq.request.close_token
        seq.pending = [token] if close is None or token == close else [token, close]

    def _append_text(self, seq: Sequence, token: int) -> str | None:
        """Add the token's text; on a stop string cut the text before it and return "stop"."""
        before = len(seq.text)
        seq.text += seq.decoder.push(token)
        hits = [
            i
            for stop in seq.request.params.stop
            if (i := seq.text.find(stop, max(0, before - len(stop) + 1))) >= 0
        ]
        if not hits:
            return None
        seq.text = seq.text[: min(hits)]
        seq.decoder.flush()  # drop a partial character after the stop string
        return "stop"

    def _emit(self, seq: Sequence, final: bool) -> None:
        """Send the text not yet sent, holding back an end that may still become a stop string."""
        end = len(seq.text) if final else len(seq.text) - _stop_overlap(seq.text, seq.request.params.stop)
        if end > seq.sent:
            self._deliver(seq, Output(seq.text[seq.sent : end]))
            seq.sent = end

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            with self._wake:
                self.waiting.remove(seq)
        seq.text += seq.decoder.flush()
        self._emit(seq, final=True)
        seq.stats.session_tokens_total = seq.state.tokens_seen
        self.metrics.request_success.labels(finished_reason=reason).inc()
        self.metrics.e2e_request_latency.observe(time.monotonic() - seq.request.arrival)
        final = Output("", reason, seq.stats, prompt_complete=not seq.to_feed, reply=seq.text)
        self._deliver(seq, final)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            seq.loop.call_soon_threadsafe(_set_result, seq.handle.result, final)

    def _deliver(self, seq: Sequence, out: Output) -> None:
        with contextlib.suppress(RuntimeError):
            seq.loop.call_soon_threadsafe(seq.handle.queue.put_nowait, out)

    def _update_gauges(self) -> None:
        self.metrics.requests_running.set(len(self.running))
        self.metrics.requests_waiting.set(len(self.waiting))
        capacity = self.model.config.window_capacity
        fills = [len(s.state.tail) / capacity for s in self.running]
        self.metrics.kv_window_usage_ratio.set(sum(fills) / len(fills) if fills else 0.0)


def _write_row(batch: WindowCache, row: int, window: WindowCache) -> None:
    """Overwrite one row of a batch of windows with a single-session window, in place."""
    for mine, theirs in zip(batch.layers, window.layers, strict=True):
        if isinstance(mine, KVCache):
            mine.keys[row], mine.values[row] = theirs.keys[0], theirs.values[0]
        else:
            mine.fast[row], mine.conv[row] = theirs.fast[0], theirs.conv[0]
    batch.lengths[row] = window.lengths[0]


def _set_result(future: asyncio.Future, value: Output) -> None:
    if not future.done():
        future.set_result(value)
