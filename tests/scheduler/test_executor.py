from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from model.hybrid import HybridLM
from scheduler.executor import SleepExecutor
from scheduler.jobs import ConsolidationJob
from scheduler.policy import DepthPolicy
from server.metrics import Metrics


def random_job(model: HybridLM, seed: int, tokens: int = 8, passes: int | None = 2, **kw) -> ConsolidationJob:
    g = torch.Generator().manual_seed(seed)
    memory = [m[0] + 0.1 * torch.randn(m.shape[1:], generator=g) for m in model.empty_memory(1)]
    chunk = torch.randint(0, model.config.vocab_size, (tokens,), generator=g).tolist()
    deadline = kw.pop("deadline", time.monotonic() + 60.0)
    return ConsolidationJob(f"s{seed}", chunk, memory, passes, deadline, **kw)


def direct(model: HybridLM, job: ConsolidationJob, passes: int) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.sleep([m[None] for m in job.memory], torch.tensor([job.chunk]), passes)
    return [m[0] for m in out]


class GatedModel:
    """Wraps a model so that its first sleep waits for `release` (to let jobs pile up behind it)."""

    def __init__(self, model: HybridLM) -> None:
        self.model, self.device = model, model.device
        self.started, self.release = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def sleep(self, memory, chunk, passes):
        self.batches.append(chunk.shape[0])
        if len(self.batches) == 1:
            self.started.set()
            self.release.wait(10)
        return self.model.sleep(memory, chunk, passes)


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_results_equal_model_sleep_and_metrics_count(model: HybridLM) -> None:
    metrics = Metrics()
    executor = SleepExecutor(model, metrics=metrics)
    try:
        jobs = [random_job(model, seed, passes=p) for seed, p in [(1, 1), (2, 3), (3, 2)]]
        jobs[2].trigger = "idle"
        results = [executor.submit(job).result(timeout=30) for job in jobs]
    finally:
        executor.shutdown()
    for job, result in zip(jobs, results, strict=True):
        assert (result.session, result.passes, result.tokens) == (job.session, job.passes, 8)
        assert not result.deadline_missed and result.seconds > 0
        for got, want in zip(result.memory, direct(model, job, job.passes), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert sample(metrics, "sleepserve_sleep_tokens_total") == 24
    assert sample(metrics, "sleepserve_sleep_passes_sum") == 6
    assert sample(metrics, "sleepserve_sleep_duration_seconds_count", {"trigger": "window_full"}) == 2
    assert sample(metrics, "sleepserve_sleep_duration_seconds_count", {"trigger": "idle"}) == 1
    assert sample(metrics, "sleepserve_sleep_deadline_misses_total") == 0
    assert sample(metrics, "sleepserve_sleep_queue_depth") == 0


def test_equal_jobs_run_as_one_batch_that_equals_each_alone(model: HybridLM) -> None:
    gated = GatedModel(model)
    metrics = Metrics()
    executor = SleepExecutor(gated, max_batch=4, metrics=metrics)  # type: ignore[arg-type]
    try:
        blocker = executor.submit(random_job(model, 0, tokens=5))
        assert gated.started.wait(10)
        jobs = [random_job(model, seed) for seed in (11, 12, 13)]
        futures = [executor.submit(job) for job in jobs]
        assert len(executor) == 3 and sample(metrics, "sleepserve_sleep_queue_depth") == 3
        gated.release.set()
        results = [f.result(timeout=30) for f in futures]
        blocker.result(timeout=30)
    finally:
        executor.shutdown()
    assert gated.batches == [1, 3]
    assert [r.batch_size for r in results] == [3, 3, 3]
    for job, result in zip(jobs, results, strict=True):
        for got, want in zip(result.memory, direct(model, job, 2), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_deadline_miss_is_counted_and_makes_the_policy_shallower(model: HybridLM) -> None:
    metrics = Metrics()
    policy = DepthPolicy(1, 6, miss_penalty=2.0)
    executor = SleepExecutor(model, metrics=metrics, policy=policy)
    try:
        late = executor.submit(random_job(model, 4, deadline=time.monotonic() - 1.0)).result(timeout=30)
    finally:
        executor.shutdown()
    assert late.deadline_missed
    assert sample(metrics, "sleepserve_sleep_deadline_misses_total") == 1
    assert policy.penalty() > 1.5


def test_policy_chooses_the_depth_when_the_job_leaves_it_open(model: HybridLM) -> None:
    policy = DepthPolicy(1, 5)
    executor = SleepExecutor(model, policy=policy)
    try:
        assert executor.calibrate(8) > 0 and policy.pass_seconds(8) > 0
        idle = executor.submit(random_job(model, 5, passes=None, deadline=time.monotonic() + 3600))
        rushed = executor.submit(random_job(model, 6, passes=None, deadline=time.monotonic()))
        assert idle.result(timeout=30).passes == 5
        assert rushed.result(timeout=30).passes == 1
    finally:
        executor.shutdown()
    with pytest.raises(ValueError):
        SleepExecutor(model).submit(random_job(model, 7, passes=None))


def test_cancel_session_and_shutdown(model: HybridLM) -> None:
    gated = GatedModel(model)
    executor = SleepExecutor(gated)  # type: ignore[arg-type]
    first = executor.submit(random_job(model, 0))
    assert gated.started.wait(10)
    queued = [executor.submit(random_job(model, seed)) for seed in (1, 2, 1)]
    assert executor.cancel_session("s1") == 2
    assert queued[0].cancelled() and queued[2].cancelled() and not queued[1].cancelled()
    gated.release.set()
    executor.shutdown(wait=True)
    assert first.done() and queued[1].result(timeout=0).session == "s2"
    with pytest.raises(RuntimeError):
        executor.submit(random_job(model, 3))


def test_a_failing_sleep_fails_its_future(model: HybridLM) -> None:
    executor = SleepExecutor(model)
    try:
        job = random_job(model, 8)
        job.memory = job.memory[:0]  # no memory for the gdn layer
        with pytest.raises(Exception):  # noqa: B017 - whatever the model raises reaches the caller
            executor.submit(job).result(timeout=30)
        assert executor.submit(random_job(model, 9)).result(timeout=30).passes == 2  # still serving
    finally:
        executor.shutdown()


def test_process_isolation_equals_model_sleep_and_survives_a_killed_child(model: HybridLM) -> None:
    """The child-process sleeper gives the batched results of `model.sleep`; a child killed with
    SIGKILL is restarted and the job still completes; an error in the child fails only its future."""
    executor = SleepExecutor(model, max_batch=4, isolation="process")
    try:
        assert executor.calibrate(8) > 0
        jobs = [random_job(model, seed) for seed in (21, 22, 23)]
        results = [f.result(timeout=60) for f in [executor.submit(job) for job in jobs]]
        for job, result in zip(jobs, results, strict=True):
            for got, want in zip(result.memory, direct(model, job, 2), strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        (sleeper,) = executor._sleepers
        os.kill(sleeper._process.pid, signal.SIGKILL)
        sleeper._process.join(timeout=10)
        job = random_job(model, 24)
        after_kill = executor.submit(job).result(timeout=60)
        for got, want in zip(after_kill.memory, direct(model, job, 2), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        bad = random_job(model, 25)
        bad.chunk[0] = model.config.vocab_size  # out of the embedding's range: raised in the child
        with pytest.raises(IndexError):
            executor.submit(bad).result(timeout=60)
        assert executor.submit(random_job(model, 26)).result(timeout=60).passes == 2  # still serving
    finally:
        executor.shutdown()
    assert not sleeper._process.is_alive()


def test_work_ahead_counts_batches_not_jobs(model: HybridLM) -> None:
    """Queued equal jobs will run as one batch, so the depth of the next job is chosen behind one batch
    of them, not behind each one."""
    now = 100.0
    policy = DepthPolicy(1, 8, clock=lambda: now)
    policy.seed(8, 0.01)  # 10 ms a pass over 8 tokens
    gated = GatedModel(model)
    executor = SleepExecutor(gated, max_batch=8, policy=policy, clock=lambda: now)  # type: ignore[arg-type]
    try:
        running = executor.submit(random_job(model, 0, tokens=8, passes=1, deadline=now))
        assert gated.started.wait(10)
        queued = [executor.submit(random_job(model, s, passes=2, deadline=now + 0.05)) for s in (1, 2, 3, 4)]
        # ahead: the running batch (1 pass, 10 ms) and one batch of the four (2 passes, 20 ms): 30 ms of a
        # 100 ms slack leaves 7 passes (counted job by job, 90 ms, it would leave 1).
        chosen = executor.submit(random_job(model, 5, passes=None, deadline=now + 0.1))
        gated.release.set()
        assert chosen.result(timeout=30).passes == 7
        assert [f.result(timeout=30).batch_size for f in queued] == [4, 4, 4, 4]
        running.result(timeout=30)
    finally:
        executor.shutdown()
