"""The engine: one thread that runs every admitted sequence, decoding them together as one batch.

Each iteration (`Engine.step`) does, in order:
1. finish the sequences that were aborted (client gone) or passed their deadline, at a token boundary;
2. admit waiting sequences while fewer than `max_running` run (their window is rebuilt from the state);
3. prefill: feed at most `prefill_chunk` prompt tokens, a piece per prefilling sequence (oldest first),
   batched by piece length, so that long prompts never freeze the running streams for more than one
   slice;
4. decode: one token for every sequence past its prompt, as a single `model.extend` over their stacked
   window caches (continuous batching: membership may change at every step; the stacked cache persists
   and is only cut and re-stacked when sequences join or leave).

A sequence's `SessionState` is updated in place token by token, exactly as `model.session.feed` does,
so an aborted request leaves its session as of its last fully processed token.

The engine inherits its two other halves: window boundaries (a sequence's chunk is full: its sleep, and
the window rebuilt after it) from `server/boundaries.py`, and outputs (sampling, stop strings, the text
sent, finished requests, the hand-off to the event loops) from `server/outputs.py`.

Finish reasons: `stop` (EOS, a stop token or a stop string), `length` (max_tokens), `abort` (client
gone or server shutdown), `timeout` (request_timeout passed), `error` (the model failed on this
sequence; the session must not be saved).

Containment: a failure tied to one sequence (its window does not open, its logits are not finite, its
sampling or its sleep raises) finishes that sequence alone with `error`. A batched model call that
raises is run again row by row, so that only the rows that fail again end (`_decode_apart`,
`_prefill_group`, `WindowBoundaries._reopen_windows`); the others go on as if nothing happened. A
background sleep batch that raises is retried job by job the same way (`scheduler/thread.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

from model.hybrid import HybridLM, WindowCache
from model.session import open_window, room_in_chunk
from model.tokenizer import ByteTokenizer, Tokenizer
from scheduler.executor import SleepExecutor
from scheduler.policy import DecodeRate
from server.boundaries import WindowBoundaries
from server.logprobs import token_logprobs
from server.metrics import Metrics
from server.outputs import TokenOutputs
from server.sampling import StopMatcher, finite_rows
from server.sequence import EngineClosed, EngineRequest, QueueFull, RequestHandle, Sequence

log = logging.getLogger("sleepserve.engine")


class Engine(WindowBoundaries, TokenOutputs):
    def __init__(
        self,
        model: HybridLM,
        *,
        passes: int | None,
        metrics: Metrics,
        max_running: int = 64,
        max_waiting: int = 256,
        prefill_chunk: int | None = None,
        executor: SleepExecutor | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """`passes`: N of every sleep; None lets the executor's depth policy choose it per job.
        `executor`: where sleeps run; None: inline, on the decode thread. `tokenizer`: the model's, which
        turns generated ids into text (default: the native byte tokenizer)."""
        if passes is None and (executor is None or executor.policy is None):
            raise ValueError("adaptive depth (passes=None) needs an executor with a depth policy")
        self.model, self.passes, self.metrics = model, passes, metrics
        self.tokenizer = tokenizer or ByteTokenizer()
        self.executor = executor
        self.max_running, self.max_waiting = max_running, max_waiting
        self.prefill_chunk = prefill_chunk or 4 * model.config.window
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._rows: list[Sequence] = []  # the decode batch, row by row
        self._cache: WindowCache | None = None  # the batch's stacked windows
        self.max_batch = 0  # largest decode batch so far
        # Lagged deadlines convert tokens to time at this rate, measured on `_decode_clock` from one
        # decode step to the next (`_last_decode`: the last one, None after a step that decoded none).
        self._rate = DecodeRate(initial=50.0, window=model.config.window)
        self._last_decode: float | None = None
        self._aborted: set[Sequence] = set()
        self._wake = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        # Outputs not yet handed to their event loops (`_flush`, one call per loop): a step wakes the
        # loop once for its tokens and at most once more for what ended after them, not once per token.
        self._outbox: list[tuple[asyncio.AbstractEventLoop, Callable[..., object], tuple]] = []
        self._crossed = False  # whether this step crossed a window boundary (metric label)
        self._step_started, self._slept = 0.0, False  # this step's start, whether it had its sleep turn
        self._step_seconds = {
            crossed: metrics.engine_step.labels(boundary="crossed" if crossed else "none")
            for crossed in (False, True)
        }  # resolved once: the decode loop observes one each step

    # -- API side (event loop thread) ---------------------------------------------------------------

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request; raises QueueFull past `max_waiting`, EngineClosed while shutting down."""
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in request.prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        seq = Sequence(f"{next(self._ids)}-{secrets.token_hex(4)}", request, asyncio.get_running_loop())
        seq.handle = RequestHandle(self, seq)
        seq.decoder = self.tokenizer.stream_decoder()
        seq.stops = StopMatcher(request.params.stop)
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
                        seq.blocked_since = None  # its session is not saved: nothing to settle
                        self._finish(seq, "error")
                    self._rows, self._cache = [], None
                    self._flush()
            for seq in [*self.running, *self.waiting]:
                self._settle(seq)
                self._finish(seq, "abort")
            self._flush()
        if self.executor is not None:
            self.executor.shutdown(cancel_pending=True)

    def step(self) -> None:
        """One iteration: aborts and timeouts, admission, finished sleeps, one prefill slice, one batched
        decode step."""
        self._step_started, self._crossed, self._slept = time.perf_counter(), False, False
        now = time.monotonic()
        with self._wake:
            aborted, self._aborted = self._aborted, set()
        for seq in [*self.waiting, *self.running]:
            if seq in aborted or now > seq.deadline:
                self._settle(seq)
                self._finish(seq, "abort" if seq in aborted else "timeout")
        self._admit()
        self._collect_sleeps()
        fed = self._prefill()
        fed += self._decode()
        self._flush()
        self._update_gauges()
        self._sleep_turn()  # where no decode step had it
        if fed or self._crossed:
            self._step_seconds[self._crossed].observe(time.perf_counter() - self._step_started)
        blocked = [s.sleep.future for s in self.running if s.blocked_since is not None and s.sleep]
        if not fed and blocked:  # everyone waits for a sleep: wait with them instead of spinning
            assert self.executor is not None
            self.executor.wait(blocked, timeout=0.05)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            with self._wake:
                seq = self.waiting.popleft()
            self.running.append(seq)
            try:
                seq.cache, seq.logits = open_window(self.model, seq.state)
            except Exception as exc:
                self._fail(seq, "its session's window could not be rebuilt", exc)
                continue
            if self.executor is not None and seq.state.prev_len:
                self._start_sleeps([seq])  # a resumed lagged session: its previous chunk is not slept yet

    def _prefill(self) -> int:
        """Feed prompt tokens: one piece per sequence still reading its prompt (up to its chunk's
        boundary), `prefill_chunk` tokens in all, oldest sequences first; the pieces of equal length go
        through the model as one batch. Returns how many tokens were fed."""
        budget, groups = self.prefill_chunk, {}
        for seq in self.running:
            if budget and seq.to_feed and seq.blocked_since is None:
                n = min(budget, room_in_chunk(self.model, seq.state), seq.to_feed)
                groups.setdefault(n, []).append(seq)
                budget -= n
        for n, group in groups.items():
            self._prefill_group(group, n)
        return self.prefill_chunk - budget

    def _prefill_group(self, group: list[Sequence], n: int) -> None:
        """Feed the next n prompt tokens of each of `group` as one batch; should that fail, each alone."""
        window = WindowCache.stack([seq.cache for seq in group]) if len(group) > 1 else group[0].cache
        pieces = [seq.request.prompt[seq.fed : seq.fed + n] for seq in group]
        try:
            logits, window = self.model.extend(torch.tensor(pieces, device=self.model.device), window)
        except Exception as exc:
            if len(group) == 1:
                self._fail(group[0], "the model failed on its prompt", exc)
                return
            log.warning("a prefill batch of %d failed (%s): running its rows one by one", len(group), exc)
            for seq in group:
                self._prefill_group([seq], n)
            return
        at_boundary = []
        finite = finite_rows(logits[:, -1])
        for row, (seq, piece) in enumerate(zip(group, pieces, strict=True)):
            if not finite[row]:
                self._fail(seq, "the model produced non-finite logits for this request")
                continue
            if seq.request.params.prompt_logprobs is not None:
                self._score_prompt(seq, piece, logits[row])
            seq.cache = window.select([row]) if len(group) > 1 else window
            seq.fed += n
            seq.stats.prompt_tokens += n
            if not self._advance(seq, piece, logits[row, -1]):
                at_boundary.append(seq)
        self.metrics.prompt_tokens.inc(n * len(group))
        self._consolidate(at_boundary)
        for seq in group:
            if not seq.to_feed and seq.blocked_since is None and not seq.done:
                self._prompt_fed(seq)

    def _score_prompt(self, seq: Sequence, piece: list[int], logits: Tensor) -> None:
        """The log-probabilities of a prompt piece: its first token after the logits that preceded it
        (none for a new sequence's first token), the rest after the piece's own logits [n, vocab]."""
        top = seq.request.params.prompt_logprobs
        if seq.logits is None:
            seq.prompt_logprobs.append(None)
        else:
            seq.prompt_logprobs += token_logprobs(seq.logits[None], piece[:1], top)
        seq.prompt_logprobs += token_logprobs(logits[:-1], piece[1:], top)

    def _decode(self) -> int:
        """One token for every decoding sequence, as one batch; returns the number of sequences stepped."""
        members = [s for s in self.running if s.pending and not s.to_feed and s.blocked_since is None]
        self._regroup(members)
        if not self._rows:
            self._last_decode = None
            return 0
        rows = list(self._rows)
        tokens = torch.tensor([[seq.pending[0]] for seq in rows], device=self.model.device)
        try:
            logits, self._cache = self.model.extend(tokens, self._cache)
            outputs: list[Tensor | None] = list(logits[:, -1])
            finite = finite_rows(logits[:, -1])
        except Exception as exc:
            log.warning("a decode batch of %d failed (%s): running its rows one by one", len(rows), exc)
            outputs = self._decode_apart(rows)
            finite = [out is None or finite_rows(out[None])[0] for out in outputs]
        decoded = self._decode_clock()
        if self._last_decode is not None:
            self._rate.observe(decoded - self._last_decode)
        self._last_decode = decoded
        self.max_batch = max(self.max_batch, len(rows))
        self.metrics.decode_batch_size.observe(len(rows))
        at_boundary = []
        for seq, out, ok in zip(rows, outputs, finite, strict=True):
            if out is None:
                continue  # failed alone (`_decode_apart`)
            if not ok:
                self._fail(seq, "the model produced non-finite logits for this request")
                continue
            room = self._advance(seq, [seq.pending.pop(0)], out)
            if not room:
                at_boundary.append(seq)
            elif seq.sleep is not None and room & (room - 1) == 0:
                self._refresh_deadline(seq, room)
            if seq.finish_reason is None:
                self._sample(seq)
        self._sleep_turn()
        self._flush()  # the tokens go out before any boundary work
        # After the loop, as a boundary may reorder the batch's rows; a request that just ended (a
        # stateless one at its last sample) leaves its session unsaved: nothing to consolidate.
        self._consolidate([seq for seq in at_boundary if seq in self.running])
        for seq in rows:
            if seq.finish_reason is not None and not seq.pending and seq.blocked_since is None:
                self._finish(seq, seq.finish_reason)
        return len(rows)

    def _decode_apart(self, rows: list[Sequence]) -> list[Tensor | None]:
        """After a batched decode step raised: step each row alone, failing those that raise again.
        Returns each row's logits (None: failed). The batch is dissolved (each sequence holds its own
        window again) and re-stacked at the next step."""
        outputs: list[Tensor | None] = []
        for row, seq in enumerate(rows):
            seq.cache = self._cache.select([row])
            token = torch.tensor([[seq.pending[0]]], device=self.model.device)
            try:
                logits, seq.cache = self.model.extend(token, seq.cache)
                outputs.append(logits[0, -1])
            except Exception as exc:
                self._fail(seq, "the model failed on this request", exc)
                outputs.append(None)
        self._rows, self._cache = [], None
        return outputs

    def _fail(self, seq: Sequence, message: str, exc: BaseException | None = None) -> None:
        """Finish one sequence with an error, its session unsaved; the others run on."""
        log.error("request %s failed: %s%s", seq.id, message, f" ({exc!r})" if exc else "")
        seq.error = message
        seq.blocked_since = None  # its session is not saved: nothing to settle
        self._finish(seq, "error")

    def _sleep_turn(self) -> None:
        """Interleaved sleep's slices of this thread's time, once a step: right after the model's decode
        step, before its tokens go out. The outputs wake the event loop, which shares this thread's
        core and GIL: slices run after them ran with the loop's work cut in between (served, 8
        streams, N = 3, 5 throwaway pairs of runs: lagged's p99 1.19-1.37x no sleep's that way,
        1.15-1.26x this way, lower in each pair). The tokens wait for the slice; the time between
        them does not change."""
        if self.executor is not None and not self._slept:
            self._slept = True
            self.executor.run_interleaved(busy=time.perf_counter() - self._step_started)

    def _regroup(self, members: list[Sequence]) -> None:
        """Make the decode batch hold exactly `members`. The batch's stacked cache persists from step to
        step; only when rows join or leave is it cut (`select`) and extended (`stack`). While in the
        batch a sequence's own `cache` is None: its window is its row of `self._cache`."""
        if set(members) == set(self._rows):
            return
        for row, seq in enumerate(self._rows):
            if seq not in members and seq in self.running:  # leaves, but lives on
                seq.cache = self._cache.select([row])
        keep = [row for row, seq in enumerate(self._rows) if seq in members]
        joining = [seq for seq in members if seq not in self._rows]
        parts = [self._cache.select(keep)] if keep else []
        for seq in joining:
            parts.append(seq.cache)
            seq.cache = None
        self._rows = [self._rows[row] for row in keep] + joining
        self._cache = (WindowCache.stack(parts) if len(parts) > 1 else parts[0]) if parts else None

    def _advance(self, seq: Sequence, tokens: list[int], logits: Tensor) -> int:
        """Account for tokens the model has just processed, as `model.session.feed` does. Returns the
        room left in the sequence's chunk (none: it is full, the caller then calls `_consolidate`)."""
        seq.logits = logits
        seq.state.tail += tokens
        seq.state.tokens_seen += len(tokens)
        return room_in_chunk(self.model, seq.state)

    def _decode_clock(self) -> float:
        """The clock sleep deadlines are set on (`SleepExecutor.now`: with interleaved sleep it leaves
        out the decode thread's sleeping, so that the decode rate and deadlines count decoding only)."""
        return self.executor.now() if self.executor is not None else time.monotonic()

    def _update_gauges(self) -> None:
        self.metrics.requests_running.set(len(self.running))
        self.metrics.requests_waiting.set(len(self.waiting))
        capacity = self.model.config.window_capacity
        fills = [len(s.state.tail) / capacity for s in self.running]
        self.metrics.kv_window_usage_ratio.set(sum(fills) / len(fills) if fills else 0.0)
