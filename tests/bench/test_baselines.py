"""The benchmark baselines: the transformers wrapper speaks OpenAI streaming, bench.state writes its JSON,
and the multi-turn result writer produces exactly the required shape."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvicorn

from bench import multiturn, state
from bench.hf_server import build_model, create_app, llama_config
from bench.models import kv_cache_bytes, product_config
from bench.procs import free_port
from bench.serve import BenchmarkResult, MultiTurnConfig, MultiTurnResult, RequestConfig, run_multiturn
from bench.stats import RequestRecord, by_context, by_turn, sleep_totals, summarize
from model.config import ModelConfig

TINY = ModelConfig(d_model=32, n_heads=2, head_dim=16, layers=["attn", "gdn"], window=8)


@pytest.fixture(scope="module")
def hf_url() -> Iterator[str]:
    """The transformers wrapper on a tiny random Llama, served by uvicorn in a thread."""
    app = create_app(build_model(llama_config(TINY, max_context=4096)), "tiny-llama")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the wrapper did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_hf_wrapper_streams_openai_format(hf_url: str) -> None:
    client = openai.OpenAI(base_url=hf_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    args = {"model": "tiny-llama", "prompt": "Hello there", "max_tokens": 6, "temperature": 0.0}
    extra = {"ignore_eos": True}
    chunks = list(
        client.completions.create(
            **args, stream=True, stream_options={"include_usage": True}, extra_body=extra
        )
    )
    content = [c for c in chunks if c.choices]
    assert all(c.usage is None for c in content)
    assert content[-1].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(b"Hello there"), 6)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    whole = client.completions.create(**args, extra_body=extra)
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text  # greedy: same text
    assert whole.usage.completion_tokens == 6
    with pytest.raises(openai.NotFoundError):
        client.completions.create(**{**args, "model": "gpt-4"})


def test_harness_drives_hf_wrapper_with_history(hf_url: str) -> None:
    """Two concurrent stateless conversations: every turn re-sends the history, so its context grows."""
    config = MultiTurnConfig(
        base_url=hf_url,
        sessions=2,
        turns=2,
        input_len=16,
        output_len=4,
        stateless_history=True,
        progress=False,
    )
    result = asyncio.run(run_multiturn(config))
    assert result.summary["completed"] == 4 and result.summary["failed"] == 0
    second = [r for r in result.records if r.turn == 1]
    assert all(r.prompt_tokens >= 16 + 16 and r.context_tokens >= 16 + 4 for r in second)


def test_state_bench_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "state.json"
    assert state.main(["--contexts", "8", "40", "--repeats", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"machine", "model", "config", "stores", "repeats", "state_constant", "results"} <= data.keys()
    assert data["state_constant"] is True
    assert [r["context_tokens"] for r in data["results"]] == [8, 40]
    for row in data["results"]:
        assert row["full_attention_kv_bytes"] == kv_cache_bytes(product_config(), row["context_tokens"])
        for store in ("memory", "redis"):
            assert set(row[store]) == {"save_ms", "load_ms", "round_trip_ms"}
            assert row[store]["round_trip_ms"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def _multiturn_result(itl_ms: list[float], contexts: list[int], stateless: bool) -> MultiTurnResult:
    """Two sessions, one turn per context, each with three gaps of the given ITL."""
    records = []
    for session in range(2):
        for turn, (context, itl) in enumerate(zip(contexts, itl_ms, strict=True)):
            records.append(
                RequestRecord(
                    success=True,
                    ttft_s=0.1 + context / 1e5,
                    e2el_s=0.1 + context / 1e5 + 3 * itl / 1e3,
                    itl_s=[itl / 1e3] * 3,
                    prompt_tokens=100,
                    completion_tokens=4,
                    session_id=f"s{session}",
                    turn=turn,
                    context_tokens=context + session,  # the sessions' mean context is context + 0.5
                )
            )
    config = MultiTurnConfig(sessions=2, turns=len(contexts), stateless_history=stateless)
    return MultiTurnResult(
        config,
        records,
        10.0,
        summarize(records, 10.0),
        by_turn(records),
        by_context(records, None),
        sleep_totals(records),
    )


def _throughput(tokens_per_s: float) -> BenchmarkResult:
    records = [RequestRecord(success=True, ttft_s=0.1, e2el_s=0.5, completion_tokens=int(tokens_per_s))]
    return BenchmarkResult(RequestConfig(), records, 1.0, summarize(records, 1.0))


def test_multiturn_writer_shape(tmp_path: Path) -> None:
    contexts = [0, 8192, 16384]
    systems = [
        multiturn.system_entry(
            "sleepserve", _multiturn_result([5, 5, 5.5], contexts, False), _throughput(200), lambda _: 17296
        ),
        multiturn.system_entry(
            "full-attention",
            _multiturn_result([5, 12, 20], contexts, False),
            _throughput(50),
            lambda c: 512 * c,
        ),
        multiturn.system_entry(
            "transformers", _multiturn_result([4, 9, 15], contexts, True), _throughput(100), lambda c: 512 * c
        ),
    ]
    for system in systems:
        assert set(system) == {"name", "by_context", "state_bytes_by_context", "output_tokens_per_s"}
        assert isinstance(system["output_tokens_per_s"], float)
        assert [p["context_tokens"] for p in system["by_context"]] == [0, 8192, 16384]  # round(context + 0.5)
        for point in system["by_context"]:
            assert set(point) == {"context_tokens", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms"}
            assert isinstance(point["context_tokens"], int)
            assert all(isinstance(point[k], float) for k in ("itl_p50_ms", "itl_p99_ms", "ttft_p50_ms"))
        for point in system["state_bytes_by_context"]:
            assert set(point) == {"context_tokens", "bytes"} and isinstance(point["bytes"], int)
    assert systems[0]["by_context"][2]["itl_p99_ms"] == pytest.approx(5.5)
    assert systems[0]["by_context"][0]["ttft_p50_ms"] == pytest.approx(100.0, abs=0.1)
    assert systems[1]["state_bytes_by_context"][2] == {"context_tokens": 16384, "bytes": 512 * 16384}
    cut = multiturn.system_entry(
        "x", _multiturn_result([5, 5, 9], contexts, False), _throughput(1), int, range(2)
    )
    assert [p["context_tokens"] for p in cut["by_context"]] == [0, 8192]  # a cool-down turn left out

    systems[1]["kv_bytes_at_reference"] = 512 * 16384
    checks = multiturn.floors(systems)
    assert {name: c["holds"] for name, c in checks.items()} == {
        "sleepserve_p99_itl_flat": True,  # 5.5 / 5 = 1.1
        "full_attention_p99_itl_grows": True,  # 20 / 5 = 4
        "sleepserve_state_constant_and_50x_smaller": True,  # 8 MiB / 17296 B
        "sleepserve_throughput_at_least_transformers": True,
        "sessions_reach_16k": True,
    }
    assert checks["full_attention_p99_itl_grows"]["value"] == pytest.approx(4.0)

    result = {"systems": systems, "floors": checks}
    json.dumps(result, allow_nan=False)
    multiturn.plot(result, tmp_path / "serve_multiturn.png")
    assert (tmp_path / "serve_multiturn.png").stat().st_size > 0
