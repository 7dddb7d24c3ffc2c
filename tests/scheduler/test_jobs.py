from __future__ import annotations

import torch

from scheduler.jobs import ConsolidationJob, JobQueue


def job(session: str, deadline: float, tokens: int = 8, passes: int | None = 2) -> ConsolidationJob:
    return ConsolidationJob(session, list(range(tokens)), [torch.zeros(2, 4, 4)], passes, deadline)


def test_edf_order_and_fifo_ties() -> None:
    queue = JobQueue()
    jobs = [job("c", 3.0), job("a", 1.0), job("tie1", 2.0), job("tie2", 2.0), job("tie3", 2.0)]
    for j in jobs:
        queue.push(j)
    assert len(queue) == 5
    order = [queue.pop_batch(1)[0].session for _ in range(5)]
    assert order == ["a", "tie1", "tie2", "tie3", "c"]
    assert queue.pop_batch(4) == []
    assert len(queue) == 0


def test_pop_batch_groups_equal_chunk_length_and_passes() -> None:
    queue = JobQueue()
    for j in [
        job("s1", 1.0, tokens=8),
        job("s2", 2.0, tokens=5),
        job("s3", 3.0, tokens=8),
        job("s4", 4.0, tokens=8, passes=3),
        job("s5", 5.0, tokens=8),
        job("s6", 6.0, tokens=8),
    ]:
        queue.push(j)
    assert [j.session for j in queue.pop_batch(3)] == ["s1", "s3", "s5"]  # EDF within the batch
    assert [j.session for j in queue.pop_batch(8)] == ["s2"]
    assert [j.session for j in queue.pop_batch(8)] == ["s4"]
    assert [j.session for j in queue.pop_batch(8)] == ["s6"]


def test_cancel_by_session() -> None:
    queue = JobQueue()
    for j in [job("a", 1.0), job("b", 2.0), job("a", 3.0)]:
        queue.push(j)
    assert [j.deadline for j in queue.cancel("a")] == [1.0, 3.0]
    assert queue.cancel("zzz") == []
    assert [j.session for j in queue.snapshot()] == ["b"]
    assert [j.session for j in queue.clear()] == ["b"]
    assert len(queue) == 0


def test_reschedule_moves_a_job_whose_deadline_changed() -> None:
    queue = JobQueue()
    first, second, third = job("a", 1.0), job("b", 2.0), job("c", 3.0)
    for j in (first, second, third):
        queue.push(j)
    third.deadline = 0.5
    queue.reschedule(third)
    queue.reschedule(job("not queued", 0.1))  # nothing happens
    assert [j.session for j in queue.snapshot()] == ["c", "a", "b"]
    assert queue.pop_batch(1) == [third]
