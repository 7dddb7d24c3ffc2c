"""bench.serve against a fake OpenAI-compatible streaming server with known delays, and bench.stats exactly."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import serve
from bench.stats import (
    RequestRecord,
    arrival_times,
    by_context,
    by_turn,
    context_bucket,
    meets_slos,
    parse_buckets,
    parse_goodput,
    sleep_totals,
    spread_itl,
    summarize,
)

TTFT, ITL = 0.050, 0.020
TOL_MS = 5.0


@dataclass
class FakeState:
    """Behaviour knobs and observations of the fake server; reset for every test."""

    ttft: float = TTFT
    itl: float = ITL
    slow_ttft: float = 0.150
    slow_odd: bool = False  # odd-numbered requests wait slow_ttft instead of ttft
    fail: dict[int, int] = field(default_factory=dict)  # request index -> HTTP status
    session_usage: bool = True  # report session fields in usage
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    session_tokens: dict[str, int] = field(default_factory=dict)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app() -> FastAPI:
    """Streaming /v1/completions + /v1/chat/completions with injected timings; /_reset and /_state."""
    app = FastAPI()
    state = FakeState()

    @app.post("/_reset")
    async def reset(knobs: dict[str, Any]) -> dict:
        nonlocal state
        knobs["fail"] = {int(k): v for k, v in knobs.get("fail", {}).items()}
        state = FakeState(**knobs)
        return {}

    @app.get("/_state")
    async def get_state() -> dict:
        return asdict(state)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def handle(request: Request, chat: bool) -> Any:
        st = state
        t0 = time.perf_counter()  # delays count from the request's arrival
        body = await request.json()
        index = len(st.requests)
        st.requests.append({"body": body, "headers": dict(request.headers)})
        if index in st.fail:
            return JSONResponse({"error": {"message": f"injected {index}"}}, status_code=st.fail[index])
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        ttft = st.slow_ttft if st.slow_odd and index % 2 else st.ttft
        n = body["max_tokens"]
        prompt = sum(len(m["content"]) for m in body["messages"]) if chat else len(body["prompt"])
        sid = body.get("session_id")

        async def gen() -> Any:
            try:
                if chat:
                    yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                for i in range(n):  # absolute schedule: token i at t0 + ttft + i*itl
                    await asyncio.sleep(max(0.0, t0 + ttft + i * st.itl - time.perf_counter()))
                    choice = {"index": 0, "delta": {"content": "x"}} if chat else {"index": 0, "text": "x"}
                    yield _sse({"choices": [choice]})
                usage: dict[str, Any] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": n,
                    "total_tokens": prompt + n,
                }
                if st.session_usage and sid:
                    st.session_tokens[sid] = st.session_tokens.get(sid, 0) + prompt + n
                    usage |= {
                        "consolidated_tokens": 8,
                        "sleep_passes": 2,
                        "sleep_seconds": 0.25,
                        "session_tokens_total": st.session_tokens[sid],
                    }
                yield _sse({"choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
            finally:
                st.in_flight -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    """This file run as a script: the fake server in its own process (no GIL shared with the client)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, __file__, str(port)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}
    )
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "fake server did not start"
        try:
            httpx.get(f"{url}/v1/models", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    # warm both sides (first-request code paths, imports) so the timed tests see steady state
    asyncio.run(
        serve.run_requests(
            serve.RequestConfig(base_url=url, model="m", progress=False, num_prompts=4, output_len=2)
        )
    )
    yield url
    proc.terminate()
    proc.wait(10)


class Fake:
    """Handle on the fake server: its URL, knobs set at reset, observations read back."""

    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self, **knobs: Any) -> None:
        httpx.post(f"{self.url}/_reset", json=knobs).raise_for_status()

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_state").json()


@pytest.fixture
def fake(fake_server: str) -> Fake:
    """The fake server, reset to default knobs for each test."""
    handle = Fake(fake_server)
    handle.reset()
    return handle


# ---------------------------------------------------------------- pure statistics


def _rec(ttft_ms: float, itls_ms: list[float], start_s: float = 0.0) -> RequestRecord:
    e2el = ttft_ms + sum(itls_ms)
    return RequestRecord(
        success=True,
        start_s=start_s,
        ttft_s=ttft_ms / 1e3,
        e2el_s=e2el / 1e3,
        itl_s=[x / 1e3 for x in itls_ms],
        prompt_tokens=10,
        completion_tokens=len(itls_ms) + 1,
    )


def test_summary_statistics_exact() -> None:
    records = [_rec(10.0 * (i + 1), [float(i + 1)] * 4, start_s=float(i)) for i in range(10)]
    records.append(RequestRecord(error="HTTP 500: boom"))
    s = summarize(records, duration_s=20.0, percentiles=(90, 99))
    assert (s["completed"], s["failed"], s["errors"]) == (10, 1, {"HTTP 500: boom": 1})
    assert s["total_input_tokens"] == 100 and s["total_output_tokens"] == 50
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(2.5)
    assert s["total_token_throughput"] == pytest.approx(7.5)
    assert s["request_goodput"] is None
    # TTFT 10..100 ms: linear-interpolated percentiles (numpy's default, as vLLM)
    assert s["mean_ttft_ms"] == pytest.approx(55.0)
    assert s["median_ttft_ms"] == pytest.approx(55.0)
    assert s["p90_ttft_ms"] == pytest.approx(91.0)
    assert s["p99_ttft_ms"] == pytest.approx(99.1)
    # TPOT = (E2EL - TTFT)/(out - 1) = the constant gap of each request: 1..10 ms
    assert s["median_tpot_ms"] == pytest.approx(5.5)
    assert s["p99_tpot_ms"] == pytest.approx(9.91)
    # ITL pooled over 40 gaps, four of each of 1..10 ms
    assert s["mean_itl_ms"] == pytest.approx(5.5)
    assert s["p90_itl_ms"] == pytest.approx(np.percentile(np.repeat(np.arange(1, 11), 4), 90))
    assert s["p99_itl_ms"] == pytest.approx(10.0)
    assert s["median_e2el_ms"] == pytest.approx(55.0 + 4 * 5.5)
    # one-second-apart starts, each under 0.2 s long: never two in flight
    assert s["max_concurrent_requests"] == 1


def test_summary_empty_and_peak_concurrency() -> None:
    s = summarize([RequestRecord(error="x")], duration_s=1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] is None and s["p99_itl_ms"] is None
    overlapping = [_rec(100.0, [100.0] * 9, start_s=0.1 * i) for i in range(5)]  # each 1 s long
    assert summarize(overlapping, 2.0)["max_concurrent_requests"] == 5


def test_goodput_counts_only_requests_meeting_all_slos() -> None:
    fast = [_rec(50.0, [10.0] * 9) for _ in range(3)]
    slow_ttft = [_rec(300.0, [10.0] * 9) for _ in range(2)]
    slow_tpot = [_rec(50.0, [40.0] * 9)]
    records = fast + slow_ttft + slow_tpot
    slos = parse_goodput(["ttft:100", "tpot:20"])
    assert slos == {"ttft": 100.0, "tpot": 20.0}
    assert [meets_slos(r, slos) for r in records] == [True] * 3 + [False] * 3
    assert summarize(records, 2.0, slos)["request_goodput"] == pytest.approx(1.5)
    assert summarize(records, 2.0, {"ttft": 100.0})["request_goodput"] == pytest.approx(2.0)
    assert not meets_slos(RequestRecord(error="x"), {"ttft": 1e9})
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])


def test_spread_itl() -> None:
    assert spread_itl([0.02, 0.02], 3) == [0.02, 0.02]  # one token per chunk: unchanged
    assert spread_itl([0.02, 0.04], 5) == pytest.approx([0.01, 0.01, 0.02, 0.02])
    assert spread_itl([0.03, 0.02], 6) == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.01])
    assert sum(spread_itl([0.03, 0.05, 0.07], 11)) == pytest.approx(0.15)
    assert spread_itl([], 4) == []


def test_context_buckets() -> None:
    assert [context_bucket(v, None) for v in (0, 1, 3, 4, 1023, 1024)] == [
        (0, 1),
        (1, 2),
        (2, 4),
        (4, 8),
        (512, 1024),
        (1024, 2048),
    ]
    edges = parse_buckets("1024, 0,256")
    assert edges == [0, 256, 1024]
    assert [context_bucket(v, edges) for v in (0, 255, 256, 5000)] == [
        (0, 256),
        (0, 256),
        (256, 1024),
        (1024, None),
    ]
    assert context_bucket(5, [10]) == (0, 10)
    assert parse_buckets("pow2") is None
    with pytest.raises(ValueError):
        parse_buckets("-5,3")


def test_by_turn_by_context_and_sleep_totals() -> None:
    records = []
    for turn, ctx in enumerate([0, 300, 700, 1500]):
        for k in range(2):
            r = _rec(10.0 * (turn + 1) + k, [1.0 + turn] * 3)
            r.turn, r.context_tokens = turn, ctx
            r.usage = {"consolidated_tokens": 4 * turn, "sleep_passes": turn, "sleep_seconds": 0.5 * turn}
            records.append(r)
    turns = by_turn(records)
    assert [t["turn"] for t in turns] == [0, 1, 2, 3]
    assert [t["median_ttft_ms"] for t in turns] == pytest.approx([10.5, 20.5, 30.5, 40.5])
    assert [t["median_itl_ms"] for t in turns] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    ctx = by_context(records, [0, 512, 1024])
    assert [(c["bucket"], c["requests"]) for c in ctx] == [
        ("[0,512)", 4),
        ("[512,1024)", 2),
        ("[1024,inf)", 2),
    ]
    assert ctx[0]["median_ttft_ms"] == pytest.approx(15.5)
    assert [c["bucket"] for c in by_context(records, None)] == [
        "[0,1)",
        "[256,512)",
        "[512,1024)",
        "[1024,2048)",
    ]
    sleep = sleep_totals([*records, RequestRecord(error="x")])
    assert sleep == {
        "consolidated_tokens": 48,
        "sleep_passes": 12,
        "sleep_seconds": pytest.approx(6.0),
        "requests_reporting": 8,
        "requests_with_sleep": 6,
    }


def test_arrivals_deterministic_with_right_rate() -> None:
    assert arrival_times(5, float("inf")) == [0.0] * 5
    a = arrival_times(2000, 10.0, 1.0, seed=1)
    assert a == arrival_times(2000, 10.0, 1.0, seed=1)
    assert a != arrival_times(2000, 10.0, 1.0, seed=2)
    assert a == sorted(a) and a[-1] == pytest.approx(200.0)  # rescaled: n/rate
    for burstiness, cv in ((1.0, 1.0), (4.0, 0.5), (0.25, 2.0)):
        gaps = np.diff([0.0, *arrival_times(4000, 10.0, burstiness, seed=3)])
        assert gaps.mean() == pytest.approx(0.1, rel=0.01)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)  # gamma shape k: CV = 1/sqrt(k)
    with pytest.raises(ValueError):
        arrival_times(3, 1.0, 0.0)


# ---------------------------------------------------------------- against the fake server


def _cfg(url: str, **kw: Any) -> serve.RequestConfig:
    return serve.RequestConfig(base_url=url, model="fake-model", progress=False, **kw)


async def test_request_mode_measures_known_delays(fake: Fake) -> None:
    url = fake.url
    # one request at a time: a reused keep-alive connection, so TTFT carries no connection set-up
    result = await serve.run_requests(
        _cfg(url, num_prompts=8, input_len=32, output_len=10, max_concurrency=1)
    )
    s = result.summary
    assert (s["completed"], s["failed"]) == (8, 0)
    assert s["total_input_tokens"] == 8 * 32 and s["total_output_tokens"] == 80
    assert s["median_ttft_ms"] == pytest.approx(TTFT * 1e3, abs=TOL_MS)
    assert s["median_itl_ms"] == pytest.approx(ITL * 1e3, abs=TOL_MS)
    assert s["mean_itl_ms"] == pytest.approx(ITL * 1e3, abs=TOL_MS)
    assert s["median_tpot_ms"] == pytest.approx(ITL * 1e3, abs=TOL_MS)
    assert s["median_e2el_ms"] == pytest.approx((TTFT + 9 * ITL) * 1e3, abs=TOL_MS)
    assert all(len(r.itl_s) == 9 and r.text == "x" * 10 for r in result.records)
    assert result.records[0].usage == {"prompt_tokens": 32, "completion_tokens": 10, "total_tokens": 42}
    requests = fake.state()["requests"]
    body = requests[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 10 and body["temperature"] == 0.0 and len(body["prompt"]) == 32
    assert "session_id" not in body and "ignore_eos" not in body
    assert len({r["body"]["prompt"] for r in requests}) == 8


async def test_failures_recorded_and_excluded(fake: Fake) -> None:
    url = fake.url
    fake.reset(fail={1: 500, 4: 429})
    result = await serve.run_requests(_cfg(url, num_prompts=6, output_len=5, max_concurrency=1))
    s = result.summary
    assert (s["completed"], s["failed"]) == (4, 2)
    failed = [r for r in result.records if not r.success]
    assert sorted(r.error.split(":")[0] for r in failed) == ["HTTP 429", "HTTP 500"]
    assert all("injected" in r.error for r in failed)
    assert s["total_output_tokens"] == 20
    assert s["median_ttft_ms"] == pytest.approx(TTFT * 1e3, abs=TOL_MS)
    assert s["max_concurrent_requests"] == 1


async def test_connection_error_recorded() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await serve.run_requests(_cfg(f"http://127.0.0.1:{port}", num_prompts=2, output_len=3))
    assert result.summary["failed"] == 2 and "ConnectError" in result.records[0].error


async def test_goodput_half_meet_ttft_slo(fake: Fake) -> None:
    url = fake.url
    fake.reset(slow_odd=True)  # TTFT 50 ms for even requests, 150 ms for odd
    result = await serve.run_requests(
        _cfg(url, num_prompts=8, output_len=3, max_concurrency=1, goodput={"ttft": 100.0})
    )
    ttfts = sorted(r.ttft_s * 1e3 for r in result.records)
    assert ttfts[0] >= 49.0 and ttfts[3] < 100.0 <= 149.0 <= ttfts[4]
    assert result.summary["request_goodput"] * result.duration_s == pytest.approx(4.0)


async def test_max_concurrency_respected(fake: Fake) -> None:
    url = fake.url
    result = await serve.run_requests(_cfg(url, num_prompts=9, output_len=4, max_concurrency=3))
    assert result.summary["completed"] == 9
    assert fake.state()["max_in_flight"] == 3
    assert result.summary["max_concurrent_requests"] <= 3


async def test_inf_rate_sends_all_at_once(fake: Fake) -> None:
    url = fake.url
    result = await serve.run_requests(_cfg(url, num_prompts=8, output_len=4))
    assert fake.state()["max_in_flight"] == 8
    assert max(r.start_s for r in result.records) < 0.05
    # eight fresh connections at once add set-up time to TTFT, never to the gaps between tokens
    assert min(r.ttft_s for r in result.records) * 1e3 >= TTFT * 1e3 - 1
    assert result.summary["median_itl_ms"] == pytest.approx(ITL * 1e3, abs=TOL_MS)


async def test_request_rate_spaces_sends(fake: Fake) -> None:
    url = fake.url
    result = await serve.run_requests(_cfg(url, num_prompts=5, output_len=2, request_rate=20.0, seed=7))
    starts = sorted(r.start_s for r in result.records)
    for start, planned in zip(starts, arrival_times(5, 20.0, 1.0, seed=7), strict=True):
        assert start == pytest.approx(planned, abs=0.01)


async def test_multi_turn_sessions(fake: Fake) -> None:
    url = fake.url
    cfg = serve.MultiTurnConfig(
        base_url=url, model="fake-model", progress=False, sessions=2, turns=3, input_len=16, output_len=4,
        context_buckets=[0, 16, 32],
    )  # fmt: skip
    result = await serve.run_multiturn(cfg)
    requests = fake.state()["requests"]
    assert len(requests) == 6 and all(r.success for r in result.records)
    ids = {r["body"]["session_id"] for r in requests}
    assert len(ids) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    for req in requests:
        assert req["headers"]["x-session-id"] == req["body"]["session_id"]
        assert len(req["body"]["prompt"]) == 16  # only the new text
    for sid in ids:
        turns = [r for r in result.records if r.session_id == sid]
        assert [(r.turn, r.context_tokens) for r in turns] == [(0, 0), (1, 20), (2, 40)]
    assert [(t["turn"], t["completed"], t["mean_context_tokens"]) for t in result.by_turn] == [
        (0, 2, 0.0),
        (1, 2, 20.0),
        (2, 2, 40.0),
    ]
    assert [(c["bucket"], c["completed"]) for c in result.by_context] == [
        ("[0,16)", 2),
        ("[16,32)", 2),
        ("[32,inf)", 2),
    ]
    for row in result.by_turn:
        assert row["median_itl_ms"] == pytest.approx(ITL * 1e3, abs=TOL_MS)
        assert row["median_ttft_ms"] >= TTFT * 1e3 - 1
    assert result.sleep["consolidated_tokens"] == 48 and result.sleep["sleep_passes"] == 12
    assert result.sleep["sleep_seconds"] == pytest.approx(1.5)
    assert result.to_dict()["sessions_completed"] == 2


async def test_multi_turn_stateless_history_chat(fake: Fake) -> None:
    url = fake.url
    fake.reset(session_usage=False)
    cfg = serve.MultiTurnConfig(
        base_url=url, model="fake-model", progress=False, endpoint="/v1/chat/completions", sessions=1, turns=3,
        input_len=10, output_len=5, stateless_history=True, think_time=0.01,
    )  # fmt: skip
    result = await serve.run_multiturn(cfg)
    requests = fake.state()["requests"]
    bodies = [r["body"] for r in requests]
    assert [len(b["messages"]) for b in bodies] == [1, 3, 5]
    assert all(
        "session_id" not in b and "x-session-id" not in r["headers"]
        for b, r in zip(bodies, requests, strict=True)
    )
    assert bodies[2]["messages"][:2] == bodies[1]["messages"][:2]
    assert bodies[2]["messages"][1] == {"role": "assistant", "content": "xxxxx"}
    assert [r.context_tokens for r in result.records] == [0, 15, 30]  # history length: (10 + 5) per turn
    assert result.sleep["requests_reporting"] == 0


async def test_multi_turn_failed_turn_ends_session(fake: Fake) -> None:
    url = fake.url
    fake.reset(fail={1: 500})
    cfg = serve.MultiTurnConfig(
        base_url=url, model="fake-model", progress=False, sessions=1, turns=4, output_len=2
    )
    result = await serve.run_multiturn(cfg)
    assert [r.success for r in result.records] == [True, False]
    assert result.summary["failed"] == 1


def test_cli_writes_json_and_prints_vllm_block(
    fake: Fake, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = fake.url
    data = serve.main(
        [
            "--base-url", url, "--num-prompts", "4", "--input-len", "8", "--output-len", "3", "--max-concurrency", "1",
            "--ignore-eos", "--temperature", "0.5",
            "--goodput", "ttft:1000", "--result-dir", str(tmp_path), "--save-detailed", "--disable-tqdm",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "====== Serving Benchmark Result ======" in out
    for line in (
        "Successful requests:",
        "Request goodput (req/s):",
        "Median TTFT (ms):",
        "P99 ITL (ms):",
        "P90 E2EL (ms):",
    ):
        assert line in out
    files = list(tmp_path.glob("serve-infqps-concurrency1-fake-model-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved == data
    body = fake.state()["requests"][0]["body"]
    assert body["ignore_eos"] is True and body["temperature"] == 0.5 and body["model"] == "fake-model"
    assert saved["model"] == "fake-model" and saved["request_rate"] == "inf" and saved["completed"] == 4
    assert len(saved["requests"]) == 4 and len(saved["requests"][0]["itl_ms"]) == 2
    assert saved["request_goodput"] > 0 and saved["median_itl_ms"] == pytest.approx(ITL * 1e3, abs=TOL_MS)


def test_cli_multi_turn(fake: Fake, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = fake.url
    data = serve.main(
        [
            "--base-url", url, "--multi-turn", "--sessions", "2", "--turns", "2", "--input-len", "8",
            "--output-len", "2", "--result-dir", str(tmp_path), "--result-filename", "mt.json", "--disable-tqdm",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "Multi-turn Benchmark Result" in out and "Latency by context tokens" in out and "Sleep:" in out
    saved = json.loads((tmp_path / "mt.json").read_text())
    assert saved["mode"] == "multi_turn" and len(saved["by_turn"]) == 2 and data["sessions_completed"] == 2
    assert "requests" not in saved


if __name__ == "__main__":
    uvicorn.run(make_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
