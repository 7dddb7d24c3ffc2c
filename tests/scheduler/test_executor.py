from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
import torch
from support import GatedModel

from model.hybrid import HybridLM
from scheduler.executor import SleepExecutor
from scheduler.isolation import Isolation, create_executor
from scheduler.jobs import ConsolidationJob
from scheduler.offload import MOST_RESTARTS, OffloadExecutor
from scheduler.policy import DepthPolicy, PassCosts
from scheduler.process import ProcessSleeper
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


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


@contextlib.contextmanager
def busy_executor(model: HybridLM, max_batch: int) -> Iterator[tuple[SleepExecutor, GatedModel, float]]:
    """An executor whose clock stands still at `now` and whose policy plans a pass over 8 tokens at
    10 ms whatever the batch's size, its worker busy on a first 1-pass job until `gated.release` is set (jobs
    queue up meanwhile)."""
    now = 100.0
    policy = DepthPolicy(1, 8, deviations=0.0, clock=lambda: now)
    for rows in (1, max_batch):
        policy.seed(8, 0.01, rows)
    gated = GatedModel(model)
    executor = create_executor(gated, max_batch=max_batch, policy=policy, clock=lambda: now)  # type: ignore[arg-type]
    try:
        running = executor.submit(random_job(model, 0, tokens=8, passes=1, deadline=now))
        assert gated.started.wait(10)
        yield executor, gated, now
        running.result(timeout=30)
    finally:
        gated.release.set()
        executor.shutdown()


@pytest.mark.parametrize("isolation, runs_as", [("interleaved", "thread"), ("offload", "process")])
def test_a_model_looping_some_blocks_gets_whole_sleeps(model: HybridLM, isolation, runs_as) -> None:
    """The rolling batch runs every block each pass: a model with sleep_blocks runs whole sleeps, whose
    result loops only those blocks (and differs from looping all of them)."""
    looped = copy.deepcopy(model)
    looped.config = model.config.replace(sleep_blocks=(1, 2))
    executor = create_executor(looped, isolation, policy=DepthPolicy(1, 4))
    try:
        assert executor.isolation == runs_as
        job = random_job(looped, 5, passes=3)
        result = executor.submit(job).result(timeout=60)
    finally:
        executor.shutdown()
    every_block = direct(model, job, 3)
    for got, want, unlooped in zip(result.memory, direct(looped, job, 3), every_block, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert not torch.allclose(got, unlooped, atol=1e-4)


def test_results_equal_model_sleep_and_metrics_count(model: HybridLM) -> None:
    metrics = Metrics()
    executor = create_executor(model, metrics=metrics)
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


class RecordingPolicy(DepthPolicy):
    """Records the batch shapes its costs are learnt from."""

    def __init__(self) -> None:
        super().__init__(1, 4)
        self.observed: list[tuple[int, int, int]] = []

    def observe(self, tokens: int, passes: int, seconds: float, rows: int = 1) -> None:
        self.observed.append((tokens, passes, rows))
        super().observe(tokens, passes, seconds, rows)


def test_equal_jobs_run_as_one_batch_that_equals_each_alone(model: HybridLM) -> None:
    """Equal jobs queued behind a running one run as one batch, each result equal to its job run alone;
    the policy learns the batch's cost under the batch's own shape (chunk length, rows)."""
    gated = GatedModel(model)
    metrics = Metrics()
    policy = RecordingPolicy()
    executor = create_executor(gated, max_batch=4, metrics=metrics, policy=policy)  # type: ignore[arg-type]
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
    assert policy.observed == [(5, 2, 1), (8, 2, 3)]
    assert [r.batch_size for r in results] == [3, 3, 3]
    for job, result in zip(jobs, results, strict=True):
        for got, want in zip(result.memory, direct(model, job, 2), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_deadline_miss_is_counted_and_makes_the_policy_shallower(model: HybridLM) -> None:
    metrics = Metrics()
    policy = DepthPolicy(1, 6, miss_penalty=2.0)
    executor = create_executor(model, metrics=metrics, policy=policy)
    try:
        late = executor.submit(random_job(model, 4, deadline=time.monotonic() - 1.0)).result(timeout=30)
    finally:
        executor.shutdown()
    assert late.deadline_missed
    assert sample(metrics, "sleepserve_sleep_deadline_misses_total") == 1
    assert policy.penalty() > 1.5


def test_policy_chooses_the_depth_when_the_job_leaves_it_open(model: HybridLM) -> None:
    policy = DepthPolicy(1, 5)
    executor = create_executor(model, policy=policy)
    try:
        assert executor.calibrate(8) > 0 and policy.pass_seconds(8) > 0
        idle = executor.submit(random_job(model, 5, passes=None, deadline=time.monotonic() + 3600))
        rushed = executor.submit(random_job(model, 6, passes=None, deadline=time.monotonic()))
        assert idle.result(timeout=30).passes == 5
        assert rushed.result(timeout=30).passes == 1
    finally:
        executor.shutdown()
    with pytest.raises(ValueError):
        create_executor(model).submit(random_job(model, 7, passes=None))


def test_cancel_session_and_shutdown(model: HybridLM) -> None:
    gated = GatedModel(model)
    executor = create_executor(gated)  # type: ignore[arg-type]
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


def test_a_running_job_of_a_cancelled_session_ends_cancelled_not_as_a_sleep(model: HybridLM) -> None:
    """A session that ends while its sleep runs does not want it: the job's future ends cancelled, and
    neither the sleep nor its missed deadline (nobody waits for it) is counted."""
    metrics = Metrics()
    gated = GatedModel(model)
    executor = create_executor(gated, metrics=metrics)  # type: ignore[arg-type]
    try:
        running = executor.submit(random_job(model, 0, deadline=time.monotonic()))  # due at once
        assert gated.started.wait(10)
        assert executor.cancel_session("s0") == 1
        gated.release.set()
        with pytest.raises(CancelledError):
            running.result(timeout=30)
        assert executor.submit(random_job(model, 1)).result(timeout=30).passes == 2  # still serving
    finally:
        gated.release.set()
        executor.shutdown()
    assert sample(metrics, "sleepserve_sleep_passes_count") == 1
    assert sample(metrics, "sleepserve_sleep_deadline_misses_total") == 0


def test_a_failing_sleep_fails_its_future(model: HybridLM) -> None:
    executor = create_executor(model)
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
    SIGKILL is restarted (counted) and the job still completes; an error in the child fails only its
    future."""
    metrics = Metrics()
    executor = create_executor(model, max_batch=4, isolation="process", metrics=metrics)
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
        assert sample(metrics, "sleepserve_sleeper_restarts_total") == 1
    finally:
        executor.shutdown()
    assert not sleeper._process.is_alive()


def test_a_niced_sleeper_process_runs_behind_the_server(model: HybridLM) -> None:
    """`nice` lowers the child's priority by that much and, on a kernel that takes custom slices
    (EEVDF, Linux ≥ 6.12), gives it the shortest; its results do not change."""
    with pytest.raises(ValueError, match="isolation='process'"):
        create_executor(model, isolation="thread", nice=5)
    executor = create_executor(model, isolation="process", nice=5)
    try:
        job = random_job(model, 27)
        result = executor.submit(job).result(timeout=60)  # the child has set its priority by now
        for got, want in zip(result.memory, direct(model, job, 2), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        pid = executor._sleepers[0]._process.pid
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(os.getpriority(os.PRIO_PROCESS, 0) + 5, 19)
        release = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
        if platform.system() == "Linux" and release >= (6, 12):
            sched = Path(f"/proc/{pid}/sched").read_text()
            assert re.search(r"^se\.slice\s+:\s+100000$", sched, flags=re.M), sched
    finally:
        executor.shutdown()


def test_jobs_submitted_together_run_as_one_batch(model: HybridLM) -> None:
    """An idle worker does not start on the first of `submit_all`'s jobs alone."""
    executor = create_executor(model, max_batch=8)
    try:
        futures = executor.submit_all([random_job(model, seed, passes=2) for seed in range(5)])
        assert [f.result(timeout=30).batch_size for f in futures] == [5] * 5
    finally:
        executor.shutdown()


def test_batch_wait_lets_equal_jobs_submitted_a_moment_later_join(model: HybridLM) -> None:
    """With `batch_wait`, a job with slack is held back briefly so that an equal job submitted a step
    later runs in its batch; a job due now is never held, and a full batch starts at once."""
    executor = create_executor(model, max_batch=3, batch_wait=0.5)
    try:
        soon = time.monotonic() + 60.0
        first = executor.submit(random_job(model, 1, passes=2, deadline=soon))
        time.sleep(0.05)
        second = executor.submit(random_job(model, 2, passes=2, deadline=soon))
        assert [f.result(timeout=30).batch_size for f in (first, second)] == [2, 2]
        start = time.monotonic()
        due_now = executor.submit(random_job(model, 3, passes=2, deadline=time.monotonic()))
        assert due_now.result(timeout=30).batch_size == 1 and time.monotonic() - start < 0.4
        start = time.monotonic()
        full = executor.submit_all([random_job(model, s, passes=2, deadline=soon) for s in (4, 5, 6)])
        assert [f.result(timeout=30).batch_size for f in full] == [3] * 3
        assert time.monotonic() - start < 0.4
        held = executor.submit(random_job(model, 7, passes=2, deadline=soon))
        time.sleep(0.05)
        assert executor.cancel_session("s7") == 1 and held.cancelled()  # cancelled while held back
        time.sleep(0.6)  # the worker finds the queue empty at the end of its wait: it must go on serving
        assert executor.submit(random_job(model, 8, passes=2, deadline=soon)).result(timeout=30).passes == 2
    finally:
        executor.shutdown()


def test_a_job_rides_along_with_a_deeper_queued_batch_that_has_room(model: HybridLM) -> None:
    """Joining a queued batch of equal chunks costs it nearly nothing, so a job whose own slack would
    allow fewer passes takes that batch's depth when it still finishes in time; a full batch, a
    deadline already out of reach, or a batch due later whose own passes would not fit leave the
    policy's choice."""
    with busy_executor(model, max_batch=3) as (executor, gated, now):
        deep = [executor.submit(random_job(model, s, passes=6, deadline=now + 0.08)) for s in (1, 2)]
        # the running pass (10 ms) alone is already past this one's deadline: the policy's 1 pass
        late = executor.submit(random_job(model, 3, passes=None, deadline=now + 0.005))
        # ahead: 10 ms running, the late pass and 60 ms of the deep batch: 40 ms left, 4 passes alone
        rider = executor.submit(random_job(model, 4, passes=None, deadline=now + 0.12))
        # the deep batch is now full (3 of 3), and the late pass is ahead too: 40 ms left, the policy's 4
        alone = executor.submit(random_job(model, 5, passes=None, deadline=now + 0.12))
        # a batch due after this job would run at its turn, its 2 passes included: 10 + 10 ms ahead
        # + 20 ms misses 35 ms, so the job keeps the policy's 1 pass (15 ms of slack)
        later = [executor.submit(random_job(model, s, passes=2, deadline=now + 1.0)) for s in (6, 7)]
        too_deep = executor.submit(random_job(model, 8, passes=None, deadline=now + 0.035))
        gated.release.set()
        assert late.result(timeout=30).passes == 1
        assert rider.result(timeout=30).passes == 6 and rider.result().batch_size == 3
        assert alone.result(timeout=30).passes == 4
        assert too_deep.result(timeout=30).passes == 1
        assert [f.result(timeout=30).batch_size for f in later] == [2, 2]
        assert [f.result(timeout=30).batch_size for f in deep] == [3, 3]


def test_work_ahead_counts_batches_not_jobs(model: HybridLM) -> None:
    """Queued equal jobs will run as one batch, so the depth of the next job is chosen behind one batch
    of them, not behind each one."""
    with busy_executor(model, max_batch=8) as (executor, gated, now):
        queued = [executor.submit(random_job(model, s, passes=2, deadline=now + 0.05)) for s in (1, 2, 3, 4)]
        # ahead: the running batch (1 pass, 10 ms) and one batch of the four (2 passes, 20 ms): 30 ms of a
        # 100 ms slack leaves 7 passes (counted job by job, 90 ms, it would leave 1).
        chosen = executor.submit(random_job(model, 5, passes=None, deadline=now + 0.1))
        gated.release.set()
        assert chosen.result(timeout=30).passes == 7
        assert [f.result(timeout=30).batch_size for f in queued] == [4, 4, 4, 4]


def interleaved(
    model: HybridLM, clock: Callable[[], float] = time.monotonic, isolation: Isolation = "interleaved", **kw
) -> SleepExecutor:
    """An interleaved executor whose policy plans a pass over 8 tokens at 1 ms for any batch (no margin)."""
    policy = DepthPolicy(1, 8, deviations=0.0, clock=clock)
    for rows in (1, 8):
        policy.seed(8, 0.001, rows)
    return create_executor(model, policy=policy, isolation=isolation, clock=clock, **kw)


def test_interleaved_equals_model_sleep_and_runs_only_on_the_callers_turn(model: HybridLM) -> None:
    """Interleaved, nothing runs until the caller lends its thread (`run_interleaved`, `wait`); the
    batch's results equal each job run alone by `model.sleep`, and the metrics count them."""
    metrics = Metrics()
    executor = interleaved(model, metrics=metrics)
    try:
        jobs = [random_job(model, seed, passes=3) for seed in (31, 32, 33)]
        futures = executor.submit_all(jobs)
        time.sleep(0.05)
        assert not any(f.running() or f.done() for f in futures)  # no worker of its own
        executor.wait(futures, timeout=30)
        results = [f.result(timeout=0) for f in futures]
    finally:
        executor.shutdown()
    assert [r.batch_size for r in results] == [3, 3, 3]
    for job, result in zip(jobs, results, strict=True):
        for got, want in zip(result.memory, direct(model, job, 3), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert sample(metrics, "sleepserve_sleep_passes_sum") == 9
    assert sample(metrics, "sleepserve_sleep_tokens_total") == 24


def test_interleaved_paces_its_slices_to_the_deadline(model: HybridLM, clock) -> None:
    """Each turn runs the share of the caller's time that finishes the batch by its deadline: a job due
    in a second gets a slice now and then, one due now the most a turn allows (halfway from `share`
    to all), so it takes far fewer turns."""

    def turns_to_finish(due_in: float) -> int:
        executor = interleaved(model, clock)
        try:
            future = executor.submit(random_job(model, 41, passes=4, deadline=clock() + due_in))
            turns = 0
            while not future.done():
                executor.run_interleaved(busy=0.002)
                turns += 1
                assert turns < 10_000
            return turns
        finally:
            executor.shutdown()

    slices = model.sleep_slice_count(4) + 1
    assert turns_to_finish(1.0) > slices  # a slice now and then: each overshoots the credit of a turn
    assert turns_to_finish(0.0) < slices / 2


def test_interleaved_depth_per_job_and_a_rolling_batch(model: HybridLM, clock) -> None:
    """Jobs of one chunk length run as one rolling batch, each with the deepest N whose expected cost
    (1 ms a pass) fits in `share` of its own slack, leaving the batch after its own passes; a job
    queued meanwhile joins between passes. Every result equals its job run alone."""
    executor = interleaved(model, clock, share=0.05, max_batch=4)
    jobs = [
        random_job(model, seed, passes=None, deadline=clock() + due) for seed, due in [(61, 0.1), (62, 0.04)]
    ]
    futures = executor.submit_all(jobs)
    executor.wait(futures[1:], timeout=30)  # 2 passes: the third has started, for the first job alone
    late = random_job(model, 63, passes=3)
    futures.append(executor.submit(late))  # joins it for passes 4-6
    executor.shutdown()  # the caller's thread runs the rest
    results = [f.result(timeout=0) for f in futures]
    assert [r.passes for r in results] == [5, 2, 3]
    assert [r.batch_size for r in results] == [2, 2, 1]  # rows in the batch at their last pass
    for job, result in zip([*jobs, late], results, strict=True):
        for got, want in zip(result.memory, direct(model, job, result.passes), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_interleaved_learns_the_pass_cost_from_one_pass_sleeps_too(model: HybridLM) -> None:
    """A sleep's only pass is memory-only (shorter): the policy learns from it all the same, or a
    server whose sleeps all get N = 1 would plan with its first estimate forever."""
    policy = RecordingPolicy()
    executor = create_executor(model, policy=policy, isolation="interleaved")
    try:
        futures = executor.submit_all([random_job(model, seed, passes=1) for seed in (71, 72)])
        executor.wait(futures, timeout=30)
        assert all(f.result(timeout=0).passes == 1 for f in futures)
    finally:
        executor.shutdown()
    assert policy.observed == [(8, 1, 2)]
    # planned from the pass it timed, no longer from the per-token default
    assert policy.pass_seconds(8, rows=2, margin=False) != policy.token_pass_seconds * 8 * 2


def offloading(model: HybridLM, helper_pass_seconds: float, **kw) -> OffloadExecutor:
    """`interleaved`'s executor with its passes offloaded, the helper expected to take
    `helper_pass_seconds` a pass (no margin), on a CPU of this process's."""
    executor = interleaved(model, isolation="offload", sleeper_cpus={min(os.sched_getaffinity(0))}, **kw)
    assert isinstance(executor, OffloadExecutor)
    executor._helper_costs = PassCosts(deviations=0.0)
    for rows in range(1, 9):  # every batch size: a first observation of one not seeded would replace it
        executor._helper_costs.seed(8, helper_pass_seconds, rows)
    return executor


def run_until_done(executor: SleepExecutor, futures: list, timeout: float = 60.0) -> None:
    """Lend the executor the caller's turns, as the engine does after each step, until `futures` are done
    (what the decode thread runs is paced to the jobs' deadlines: give them deadlines well inside
    `timeout`)."""
    end = time.monotonic() + timeout
    while not all(f.done() for f in futures):
        executor.run_interleaved(busy=0.001)
        time.sleep(0.001)
        assert time.monotonic() < end, "the offloaded sleeps did not finish"


def test_offload_runs_the_passes_in_an_idle_sleeper_process_with_model_sleeps_results(
    model: HybridLM,
) -> None:
    """Offloaded, a batch's passes run in the sleeper process (on the CPUs given, only on time nothing
    else wants) while it keeps to its expected pace: the caller's turns run no slice, and the results
    equal each job run alone by `model.sleep`."""
    metrics = Metrics()
    executor = offloading(model, helper_pass_seconds=30.0, metrics=metrics)
    try:
        helper = executor._helper
        assert helper is not None
        jobs = [random_job(model, seed, passes=3) for seed in (81, 82, 83)]
        futures = executor.submit_all(jobs)
        run_until_done(executor, futures)
        assert executor._slept == 0.0  # not a slice on the caller's thread
        assert os.sched_getaffinity(helper._process.pid) == {min(os.sched_getaffinity(0))}
        assert os.sched_getscheduler(helper._process.pid) == os.SCHED_IDLE
    finally:
        executor.shutdown()
    assert not helper._process.is_alive()
    for job, future in zip(jobs, futures, strict=True):
        result = future.result(timeout=0)
        assert (result.passes, result.batch_size) == (3, 3) and result.seconds > 0
        for got, want in zip(result.memory, direct(model, job, 3), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    passes = "sleepserve_sleep_rolling_passes_total"
    assert sample(metrics, passes, {"runner": "sleeper_process"}) == 3
    assert sample(metrics, passes, {"runner": "decode_thread"}) == 0
    assert sample(metrics, "sleepserve_sleep_passes_sum") == 9


def test_offload_races_a_late_sleeper(model: HybridLM) -> None:
    """A pass the sleeper process takes longer over than its passes take is run on the caller's turns
    too, the first to finish ending it. The result equals its job run alone."""
    metrics = Metrics()
    executor = offloading(model, helper_pass_seconds=0.0, metrics=metrics)  # always late: raced
    try:
        job = random_job(model, 91, passes=3, deadline=time.monotonic() + 2.0)
        future = executor.submit(job)
        run_until_done(executor, [future])
        assert executor._slept > 0  # the caller's turns ran slices
        runners = [
            sample(metrics, "sleepserve_sleep_rolling_passes_total", {"runner": r})
            for r in ("decode_thread", "sleeper_process")
        ]
        assert sum(runners) == 3  # each pass ended once, by whichever finished it first
        for got, want in zip(future.result(timeout=0).memory, direct(model, job, 3), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    finally:
        executor.shutdown()


def kill(helper: ProcessSleeper) -> None:
    os.kill(helper._process.pid, signal.SIGKILL)
    helper._process.join(timeout=10)


def test_offload_restarts_a_sleeper_that_dies(model: HybridLM, caplog) -> None:
    """A sleeper process killed with SIGKILL mid-pass is restarted at once (a log line, a metric) and
    takes passes again; the pass it lost runs on the caller's turns. One that dies `MOST_RESTARTS` times
    without answering a pass in between leaves the decode thread to run every pass from then on. Every
    result equals its job run alone."""
    metrics = Metrics()
    executor = offloading(model, helper_pass_seconds=30.0, metrics=metrics)
    try:
        helper = executor._helper
        assert helper is not None
        jobs = [random_job(model, seed, passes=2, deadline=time.monotonic() + 2.0) for seed in (92, 93)]
        futures = executor.submit_all(jobs)
        executor.run_interleaved(busy=0.001)  # the first pass goes to the sleeper
        assert executor._at_helper is not None
        first_child = helper._process.pid
        kill(helper)
        with caplog.at_level(logging.WARNING, logger="sleepserve.scheduler"):
            executor.wait(futures, timeout=60)  # a waiter runs the pass itself, and finds the sleeper gone
        assert all(f.done() for f in futures)  # one batch
        assert executor._helper is helper and helper.alive() and helper._process.pid != first_child
        assert sample(metrics, "sleepserve_sleeper_restarts_total") == 1
        assert "the sleeper process died (exit code -9); restarting it" in caplog.text
        jobs.append(random_job(model, 94, passes=2))
        futures.append(executor.submit(jobs[-1]))
        executor.run_interleaved(busy=0.001)
        assert executor._at_helper is not None  # the new child takes passes
        executor.wait(futures[2:], timeout=60)  # a waiter runs the pass too: the first to finish ends it

        executor._restarts = MOST_RESTARTS  # as if it had died that often in a row
        jobs.append(random_job(model, 96, passes=2, deadline=time.monotonic() + 2.0))
        futures.append(executor.submit(jobs[-1]))
        executor.run_interleaved(busy=0.001)
        assert executor._at_helper is not None
        kill(helper)
        with caplog.at_level(logging.WARNING, logger="sleepserve.scheduler"):
            executor.wait(futures[3:], timeout=60)  # runs the pass itself, and finds the sleeper gone
        assert executor._helper is None and "run on the decode thread from now on" in caplog.text
        assert sample(metrics, "sleepserve_sleeper_restarts_total") == 1
    finally:
        executor.shutdown()
    for job, future in zip(jobs, futures, strict=True):
        for got, want in zip(future.result(timeout=0).memory, direct(model, job, 2), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_offload_learns_the_helpers_pass_with_the_rows_it_was_sent(model: HybridLM) -> None:
    """A pass the decode thread finished first ends its rows; the helper's reply, later, still teaches
    the cost of a pass over the rows it was sent (not over none, which planned the next pass with a
    division by zero)."""
    executor = offloading(model, helper_pass_seconds=30.0)
    try:
        future = executor.submit(random_job(model, 97, passes=1))
        executor.run_interleaved(busy=0.001)  # the pass goes to the sleeper
        at = executor._at_helper
        assert at is not None
        at.timed = True  # as if the sleeper had answered a pass before
        executor.wait([future], timeout=30)  # a waiter runs it too, and finishes first: no rows left
        assert future.done() and not at.rolling.rows
        end = time.monotonic() + 60
        while executor._at_helper is not None:  # the sleeper's reply
            executor.run_interleaved(busy=0.001)
            time.sleep(0.01)
            assert time.monotonic() < end, "the sleeper did not answer"
        assert executor._helper_costs.pass_seconds(8, rows=1, margin=False) < 30.0  # learnt for 1 row
        later = executor.submit(random_job(model, 98, passes=1))
        executor.run_interleaved(busy=0.001)  # plans the next pass from what it learnt
        executor.wait([later], timeout=30)
        assert later.result(timeout=0).passes == 1
    finally:
        executor.shutdown()


def test_offload_takes_a_pass_back_once_its_rows_cannot_wait(model: HybridLM) -> None:
    """However long the sleeper's passes may take, the decode thread takes a pass up once its rows
    could wait no longer without a pace at its most; a row due sooner (`reschedule`) brings that
    moment forward."""
    executor = offloading(model, helper_pass_seconds=30.0)
    try:
        job = random_job(model, 95, passes=3)  # due in a minute
        future = executor.submit(job)
        executor.run_interleaved(busy=0.001)  # the first pass goes to the sleeper
        assert executor._at_helper is not None and not executor._helper_late()
        executor.reschedule(job, executor.now() + 0.001)  # 3 passes of 1 ms left: no time to wait
        assert executor._helper_late()
        run_until_done(executor, [future])
    finally:
        executor.shutdown()
    for got, want in zip(future.result(timeout=0).memory, direct(model, job, 3), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_interleaved_shutdown_finishes_or_fails_the_batch_in_progress(model: HybridLM) -> None:
    executor = interleaved(model)
    running, queued = executor.submit_all([random_job(model, 51, passes=2), random_job(model, 52, tokens=5)])
    executor.run_interleaved(busy=1e-9)  # the first batch starts: one slice
    executor.shutdown(cancel_pending=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        running.result(timeout=0)

    executor = interleaved(model)
    future = executor.submit(random_job(model, 53))
    executor.shutdown()  # the caller's thread runs what is left
    assert future.result(timeout=0).passes == 2
    executor = interleaved(model)
    bad = random_job(model, 54)
    bad.chunk[0] = model.config.vocab_size  # no such token
    failed = executor.submit(bad)
    executor.wait([failed], timeout=30)
    with pytest.raises(IndexError):
        failed.result(timeout=0)
    good = executor.submit(random_job(model, 55))
    executor.shutdown()
    assert good.result(timeout=0).passes == 2  # still serving
    with pytest.raises(ValueError, match="depth policy"):
        create_executor(model, isolation="interleaved")
    with pytest.raises(ValueError, match="share"):
        interleaved(model, share=1.0)


def test_interleaved_cancelled_rows_leave_the_rolling_batch(model: HybridLM) -> None:
    """Interleaved, a row whose session ended leaves the rolling batch at the end of the pass under way
    (the others go on, and equal their jobs run alone); a batch left with cancelled rows only is
    dropped before its next slice, and nothing of it is counted."""
    metrics = Metrics()
    executor = interleaved(model, metrics=metrics)
    try:
        kept, dropped = executor.submit_all(
            [random_job(model, 71, passes=3), random_job(model, 72, passes=3)]
        )
        executor.run_interleaved(busy=1e-9)  # one slice of their first pass
        assert executor.cancel_session("s72") == 1
        executor.wait([kept], timeout=30)
        assert kept.result(timeout=0).batch_size == 1  # alone at its last pass
        for got, want in zip(kept.result().memory, direct(model, random_job(model, 71), 3), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        with pytest.raises(CancelledError):
            dropped.result(timeout=0)

        gone = executor.submit(random_job(model, 73, passes=4, deadline=time.monotonic()))
        executor.run_interleaved(busy=1e-9)
        assert gone.running() and executor.cancel_session("s73") == 1
        executor.run_interleaved(busy=1.0)  # no slice of it runs: the batch is dropped
        with pytest.raises(CancelledError):
            gone.result(timeout=0)
        assert executor._rolling is None
    finally:
        executor.shutdown()
    assert sample(metrics, "sleepserve_sleep_passes_count") == 1
    assert sample(metrics, "sleepserve_sleep_deadline_misses_total") == 0


def test_a_job_rescheduled_to_now_runs_first_and_counts_a_missed_deadline(model: HybridLM) -> None:
    """A session waiting at its boundary for its sleep makes it due now: it runs ahead of a job due
    earlier, and its result counts a missed deadline (it was needed sooner than planned); the other
    job's does not."""
    metrics = Metrics()
    executor = interleaved(model, metrics=metrics)
    try:
        earlier = random_job(model, 81, tokens=8, deadline=time.monotonic() + 10.0)
        waited_for = random_job(model, 82, tokens=5, deadline=time.monotonic() + 20.0)
        first, second = executor.submit_all([earlier, waited_for])
        executor.reschedule(waited_for, executor.now())
        executor.wait([second], timeout=30)
        assert second.done() and not (first.running() or first.done())  # the other has not started
        executor.wait([first], timeout=30)
    finally:
        executor.shutdown()
    assert second.result().deadline_missed and not first.result().deadline_missed
    assert sample(metrics, "sleepserve_sleep_deadline_misses_total") == 1


def test_an_estimated_deadline_counts_a_miss_only_when_the_session_waits(model: HybridLM) -> None:
    """A lagged session's deadline is its next boundary, tokens away, estimated in time: a sleep that
    ends after the estimate but before its session needs it missed nothing; one its session waits for
    (`due_now`) missed its deadline, whatever the estimate."""
    metrics = Metrics()
    executor = interleaved(model, metrics=metrics)
    try:
        passed = random_job(model, 101, deadline=time.monotonic() - 1.0, deadline_estimated=True)
        waited_for = random_job(
            model, 102, tokens=5, deadline=time.monotonic() + 60.0, deadline_estimated=True
        )
        first, second = executor.submit_all([passed, waited_for])
        executor.wait([first], timeout=30)
        executor.due_now(waited_for)
        executor.wait([second], timeout=30)
    finally:
        executor.shutdown()
    assert not first.result().deadline_missed and second.result().deadline_missed
    assert sample(metrics, "sleepserve_sleep_deadline_misses_total") == 1


def test_interleaved_holds_a_new_batch_briefly_for_equal_jobs(model: HybridLM) -> None:
    """With `batch_wait`, the decode thread's turn does not start a batch for a lone job with slack:
    sessions crossing their boundaries a few steps apart then sleep their passes together. A full
    batch, a job due now, a hold that ran out, or a caller that waits for a result start it at once."""
    executor = interleaved(model, max_batch=3, batch_wait=0.3)
    try:
        held = executor.submit(random_job(model, 91))
        executor.run_interleaved(busy=0.01)
        assert not (held.running() or held.done())  # held back: not started
        joined = executor.submit_all([random_job(model, seed) for seed in (92, 93)])
        executor.run_interleaved(busy=0.01)  # full: it starts (and may end within the turn's credit)
        assert held.running() or held.done()
        executor.wait(joined, timeout=30)
        assert [f.result(timeout=30).batch_size for f in (held, *joined)] == [3, 3, 3]

        due_now = executor.submit(random_job(model, 94, deadline=executor.now()))  # its clock
        executor.run_interleaved(busy=0.01)
        assert due_now.running() or due_now.done()  # it started (due now: perhaps finished too)
        executor.wait([due_now], timeout=30)

        alone = executor.submit(random_job(model, 95))
        executor.run_interleaved(busy=0.01)
        assert not alone.running()
        time.sleep(0.35)
        executor.run_interleaved(busy=0.01)
        assert alone.running()  # the hold ran out
        executor.wait([alone], timeout=30)
        assert alone.result(timeout=0).batch_size == 1

        waited = executor.submit(random_job(model, 96))
        assert executor.result(waited).passes == 2  # no hold for a caller that waits
    finally:
        executor.shutdown()


def test_interleaved_holds_a_job_deeper_than_its_share_while_the_most_pace_fits(
    model: HybridLM, clock
) -> None:
    """A job whose N costs more than `share` of its slack (one held at `min_passes`, say) still waits
    for equal jobs while its work fits in the most a pace may take (halfway from `share` to all) of the
    time a pace plans to finish in: a row that joined late would take a pass more. One whose work does
    not fit even so starts at once."""
    executor = interleaved(model, clock, share=0.05, max_batch=2, batch_wait=30.0)
    try:
        # 2 passes of 1 ms: over `share` of 20 ms (1 ms), within the most (0.525: 22 ms).
        held = executor.submit(random_job(model, 97, deadline=executor.now() + 0.02))
        executor.run_interleaved(busy=0.01)
        assert not (held.running() or held.done())  # held back: not started
        joined = executor.submit(random_job(model, 98, deadline=executor.now() + 0.02))
        executor.run_interleaved(busy=0.01)  # full: it starts (and may end within the turn's credit)
        assert held.running() or held.done()
        executor.wait([held, joined], timeout=30)
        assert [f.result(timeout=30).batch_size for f in (held, joined)] == [2, 2]

        # 2 ms in the most of 2.5 ms (2.76 ms) would fit, but not in the share of it a pace plans to take
        # (`PACE_TARGET`, 60%: 1.66 ms), whose rest is the margin for the deadline's estimate
        tight = executor.submit(random_job(model, 99, deadline=executor.now() + 0.0025))
        executor.run_interleaved(busy=0.01)
        assert tight.running() or tight.done()
        executor.wait([tight], timeout=30)
    finally:
        executor.shutdown()


@pytest.mark.parametrize(("min_passes", "due_in", "shed_to"), [(1, 0.03, 2), (1, 0.0, 1), (3, 0.0, 3)])
def test_interleaved_sheds_passes_that_would_miss_the_deadline(
    model: HybridLM, clock, min_passes: int, due_in: float, shed_to: int
) -> None:
    """An adaptive sleep (its N the policy's) whose passes left no longer fit before its deadline, even
    at the most a pace may take, ends shallower and on time, after the passes that fit (never fewer than
    `min_passes`): its result is `model.sleep`'s at that N. A fixed N in the same batch runs every pass
    and misses its deadline."""
    metrics = Metrics()
    policy = DepthPolicy(min_passes, 4, deviations=0.0, clock=clock)
    for rows in (1, 8):
        policy.seed(8, 0.05, rows)  # planned at 50 ms a pass: far more than the tiny model's passes take
    executor = create_executor(model, policy=policy, isolation="interleaved", clock=clock, metrics=metrics)
    try:
        adaptive = random_job(model, 111, passes=None, deadline=executor.now() + 10.0)
        fixed = random_job(model, 112, passes=4, deadline=executor.now() + 10.0)
        futures = executor.submit_all([adaptive, fixed])
        executor.run_interleaved(busy=1e-9)  # the batch starts: one slice of its first pass
        assert adaptive.passes == 4  # ten seconds of slack: the deepest
        for job in (adaptive, fixed):  # then their sessions come close: `due_in` of decoding left
            executor.reschedule(job, executor.now() + due_in)
        executor.wait(futures[:1], timeout=30)
        clock.advance(1.0)  # the decode time runs out before the fixed one is done
        executor.wait(futures[1:], timeout=30)
    finally:
        executor.shutdown()
    shallow, deep = (f.result(timeout=0) for f in futures)
    # After pass 1, 3 passes of 50 ms are left, and 30 ms of decoding at a pace of at most 2.08x (share
    # 0.35) fit one of them; due now, none.
    assert (shallow.passes, shallow.deadline_missed) == (shed_to, False)
    assert (deep.passes, deep.deadline_missed) == (4, True)
    for got, want in zip(shallow.memory, direct(model, adaptive, shed_to), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert sample(metrics, "sleepserve_sleep_deadline_misses_total") == 1
    assert sample(metrics, "sleepserve_sleep_passes_sum") == shed_to + 4


def test_a_worker_sheds_the_passes_a_late_batch_has_no_time_left_for(model: HybridLM) -> None:
    """A batch of adaptive jobs whose N, planned at submission, no longer fits before its deadline when
    a worker gets to it (the work ahead of it ran late) starts with the passes that fit (never fewer
    than `min_passes`), and its result is `model.sleep`'s at that N; a fixed N runs whole."""
    with busy_executor(model, max_batch=4) as (executor, gated, now):
        adaptive = random_job(model, 131, passes=None, deadline=now + 1.0)
        fixed = random_job(model, 132, tokens=5, passes=6, deadline=now + 0.025)
        futures = executor.submit_all([adaptive, fixed])
        assert adaptive.passes == 8  # planned with a second of slack: the deepest
        # 15 ms left: 2 passes fit, as the policy plans them by then (7 ms: it learnt the first job's
        # pass, 0 s on the clock that stands still, into the 10 ms it was seeded with)
        executor.reschedule(adaptive, now + 0.015)
        late = random_job(model, 133, tokens=6, passes=None, deadline=now + 1.0)  # a batch of its own
        futures.append(executor.submit(late))
        executor.reschedule(late, now - 1.0)  # past due: none fit, `min_passes` run
        gated.release.set()
        results = [f.result(timeout=30) for f in futures]
    assert [r.passes for r in results] == [2, 6, 1]
    for job, result in zip([adaptive, fixed, late], results, strict=True):
        for got, want in zip(result.memory, direct(model, job, result.passes), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
