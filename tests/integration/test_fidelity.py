"""End-to-end fidelity, the product's promise: held-out task instances fed through the HTTP API as
sessions of several `/v1/completions` requests (about one window each, the answer asked for in the
last), with the Redis store, the scheduler on and a server restart in the middle of a quarter of them,
get exactly the answers `sleepserve eval --answers` gives (`model.evaluate.greedy_answer`) at
temperature 0. By the last request, the earlier ones' text lives only in the fast weights in Redis.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from support import ServerProcess

from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.evaluate import checkpoint_tasks, greedy_answer, held_out_examples
from model.tasks import Example

CHECKPOINT = Path(os.environ.get("SLEEPSERVE_TEST_CHECKPOINT", DEFAULT_CHECKPOINT))
INSTANCES = 200


def requests_of(example: Example, window: int) -> list[str]:
    """The example's context + query cut into prompts of one window each."""
    text = example.context + example.query
    return [text[i : i + window] for i in range(0, len(text), window)]


def feed(server: ServerProcess, session: str, prompt: str, max_tokens: int) -> str:
    body = {
        "model": "sleepy",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "session_id": session,
    }
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize("schedule", ["lagged", "hard"])
def test_sessions_through_the_api_answer_as_eval_does(schedule, redis_server, tmp_path):
    model = load_checkpoint(CHECKPOINT)
    model.config = model.config.replace(schedule=schedule)
    tasks = checkpoint_tasks(CHECKPOINT, model.config.window)
    per_task = -(-INSTANCES // len(tasks))
    examples = [ex for task in tasks for ex in held_out_examples(task, per_task)][:INSTANCES]
    expected = [greedy_answer(model, ex) for ex in examples]

    flags = ("--schedule", schedule, "--sleep-passes", str(model.config.sleep_passes))
    store = redis_server.replace("/0", "/1" if schedule == "lagged" else "/2")  # a database per run
    logs = iter(tmp_path / f"server-{i}.log" for i in range(10))
    server = ServerProcess(CHECKPOINT, store, next(logs), model_name="sleepy", args=flags)
    answers: list[str] = []
    quarter = len(examples) // 4
    try:
        for start in range(0, len(examples), quarter):
            group = examples[start : start + quarter]
            pieces = [requests_of(ex, model.config.window) for ex in group]
            sessions = [server.new_session() for _ in group]
            assert all(len(p) >= 3 for p in pieces)  # the answer depends on evicted windows
            for session, prompts in zip(sessions, pieces, strict=True):
                for prompt in prompts[: len(prompts) // 2]:
                    assert feed(server, session, prompt, max_tokens=0) == ""
            if start == 0:  # a restart in the middle of these sessions: their state is in Redis only
                server.stop()
                server = ServerProcess(CHECKPOINT, store, next(logs), model_name="sleepy", args=flags)
            for session, prompts, ex in zip(sessions, pieces, group, strict=True):
                for prompt in prompts[len(prompts) // 2 : -1]:
                    feed(server, session, prompt, max_tokens=0)
                answers.append(feed(server, session, prompts[-1], max_tokens=len(ex.answer)))
    finally:
        server.stop(kill=True)

    mismatches = [(i, a, e) for i, (a, e) in enumerate(zip(answers, expected, strict=True)) if a != e]
    assert not mismatches, f"{len(mismatches)} of {len(examples)} answers differ from eval: {mismatches[:5]}"
    correct = sum(a == ex.answer for a, ex in zip(answers, examples, strict=True))
    print(f"{schedule}: {correct}/{len(examples)} answers right, all {len(examples)} equal to eval's")


def test_idle_trigger_accuracy_reported_beside(redis_server, tmp_path):
    """With the idle trigger on, each pause between requests consolidates the tail early (chunks of
    varying length, as the checkpoint was trained): answers may differ from eval's, so the accuracy of
    both is reported side by side."""
    model = load_checkpoint(CHECKPOINT)
    tasks = checkpoint_tasks(CHECKPOINT, model.config.window)
    examples = [ex for task in tasks for ex in held_out_examples(task, 48 // len(tasks))]
    expected = [greedy_answer(model, ex) for ex in examples]
    flags = ("--sleep-passes", str(model.config.sleep_passes), "--idle-consolidation", "0.1")
    server = ServerProcess(
        CHECKPOINT, redis_server.replace("/0", "/4"), tmp_path / "idle.log", "sleepy", flags
    )
    answers = []
    try:
        for ex in examples:
            session = server.new_session()
            *context, last = requests_of(ex, model.config.window)
            for prompt in context:
                feed(server, session, prompt, max_tokens=0)
                time.sleep(0.3)  # idle: the tail is consolidated before the next request
            assert server.session(session)["tail_tokens"] == 0
            answers.append(feed(server, session, last, max_tokens=len(ex.answer)))
    finally:
        server.stop(kill=True)
    idle_right = sum(a == ex.answer for a, ex in zip(answers, examples, strict=True))
    exact_right = sum(e == ex.answer for e, ex in zip(expected, examples, strict=True))
    same = sum(a == e for a, e in zip(answers, expected, strict=True))
    print(
        f"idle trigger on: {idle_right}/{len(examples)} right; without it (eval): {exact_right}/{len(examples)}; "
        f"{same} answers identical"
    )
