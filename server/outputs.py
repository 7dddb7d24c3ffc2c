"""Outputs: the engine's token-by-token replies. After each step a sequence past its prompt samples its
next token (`_sample`), its text is matched against its stop strings and sent as far as no stop string
can still begin, and a finished request gets its final `Output` (`_finish`). Outputs gather in the
engine's outbox and reach each request's event loop once a step (`_flush`): every call wakes the loop,
which then takes the GIL from the decode loop.

The engine inherits these methods (`Engine(..., TokenOutputs)`), as it does `WindowBoundaries`': they
work on its running and waiting sequences, its outbox and its failure path.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable

from scheduler.executor import SleepExecutor
from server.logprobs import TokenLogprob, token_logprobs
from server.metrics import Metrics
from server.sampling import sample
from server.sequence import Output, Sequence


class TokenOutputs:
    """The engine's output half: sampling, stop strings, streamed text and finished requests."""

    # The engine's, which these methods share with its step loop.
    executor: SleepExecutor | None
    metrics: Metrics
    running: list[Sequence]
    waiting: deque[Sequence]
    _wake: threading.Condition
    _outbox: list[tuple[asyncio.AbstractEventLoop, Callable[..., object], tuple]]
    _fail: Callable[..., None]

    def _prompt_fed(self, seq: Sequence) -> None:
        """The whole prompt is in: start replying (max_tokens 0: the request only fed its prompt)."""
        if seq.request.params.prompt_logprobs is not None:
            self._deliver(seq, Output("", prompt_logprobs=seq.prompt_logprobs))
        if seq.request.params.max_tokens == 0:
            self._finish(seq, "length")
        else:
            self._sample(seq)

    def _sample(self, seq: Sequence) -> None:
        """Sample the next token after `seq.logits`, emit its text, and decide whether the request ends."""
        params = seq.request.params
        try:
            token = sample(seq.logits, params, seq.generator)
        except Exception as exc:
            self._fail(seq, "sampling failed", exc)
            return
        now = time.monotonic()
        if seq.generated:
            self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        else:
            self.metrics.time_to_first_token.observe(now - seq.request.arrival)
        seq.last_token_at = now
        if params.logprobs is not None:
            seq.logprobs += token_logprobs(seq.logits[None], [token], params.logprobs)
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
        seq.pending = [token]

    def _append_text(self, seq: Sequence, token: int) -> str | None:
        """Add the token's text; on a stop string cut the text before it and return "stop"."""
        piece = seq.decoder.push(token)
        at = seq.stops.feed(piece, len(seq.text))
        seq.text += piece
        if at is None:
            return None
        seq.text = seq.text[:at]
        seq.decoder.flush()  # drop a partial character after the stop string
        return "stop"

    def _emit(self, seq: Sequence, final: bool) -> None:
        """Send the text not yet sent, holding back an end that may still become a stop string."""
        end = len(seq.text) if final else len(seq.text) - seq.stops.partial
        if end > seq.sent:
            self._deliver(seq, Output(seq.text[seq.sent : end], self._take_logprobs(seq)))
            seq.sent = end

    @staticmethod
    def _take_logprobs(seq: Sequence) -> list[TokenLogprob]:
        """The generated tokens' log-probabilities not yet sent: they go with the next text sent."""
        taken, seq.logprobs = seq.logprobs, []
        return taken

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.done:  # failed earlier in this step
            return
        seq.done = True
        if seq.sleep is not None:  # the stored state does not need it: the next request sleeps anew
            assert self.executor is not None
            self.executor.cancel_session(seq.id)
            seq.sleep = None
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
        final = Output(
            "",
            self._take_logprobs(seq),
            finish_reason=reason,
            stats=seq.stats,
            prompt_complete=not seq.to_feed,
            reply=seq.text,
            reply_tokens=seq.generated[: len(seq.generated) - len(seq.pending)]
            if seq.request.stateful
            else [],
            error=seq.error,
        )
        self._deliver(seq, final)
        self._outbox.append((seq.loop, _set_result, (seq.handle.result, final)))

    def _deliver(self, seq: Sequence, out: Output) -> None:
        self._outbox.append((seq.loop, seq.handle.queue.put_nowait, (out,)))

    def _flush(self) -> None:
        """Hand the outputs gathered so far to their event loops, one call per loop."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., object], tuple]]] = {}
        for loop, fn, args in outbox:
            by_loop.setdefault(loop, []).append((fn, args))
        handed = time.perf_counter()
        for loop, calls in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(self._hand_over, handed, calls)

    def _hand_over(self, handed: float, calls: list[tuple[Callable[..., object], tuple]]) -> None:
        """On the event loop: run a flush's calls, timing how long they waited for the loop."""
        self.metrics.output_handoff.observe(time.perf_counter() - handed)
        for fn, args in calls:
            fn(*args)


def _set_result(future: asyncio.Future, value: Output) -> None:
    if not future.done():
        future.set_result(value)
