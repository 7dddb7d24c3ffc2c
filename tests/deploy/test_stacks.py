"""The deployed stacks run what `make serve` runs and give the consolidation worker work. Each stack's
settings are read from its files as its processes get them: the image's ENV under docker/compose.yaml's
service environment, or under the rendered Kubernetes base's ConfigMap and container env."""

from __future__ import annotations

import asyncio
import os
import shlex
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import yaml
from test_deploy import DOCKER, KUSTOMIZE, ROOT, dockerfile_instructions, find, render

import scheduler.worker
from server import cli
from server.app import create_app
from server.settings import Settings

# The image's checkpoint (docker/Dockerfile copies checkpoints/ to /opt/sleepserve/checkpoints).
SHIPPED = ROOT / "checkpoints" / "sleepy-mix"
PROMPT = "1:1101111110 2:0110011010 3:1011001110 4:0011101101 5:1110010110 6:0101101011?"
# What decides how the server threads and sleeps: a stack must leave them as `make serve` does.
SLEEP_FIELDS = ("sleep_mode", "sleep_worker", "cpu_affinity", "torch_threads", "sleep_passes", "sleep_share")


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in dockerfile_instructions(DOCKER / "Dockerfile"):
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def compose_env(service: str) -> dict[str, str]:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]  # `<<` merges
    return {**image_env(), **{k: str(v) for k, v in services[service].get("environment", {}).items()}}


def kubernetes_env(deployment: str) -> dict[str, str]:
    docs = render(KUSTOMIZE / "base")
    container = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
    env = image_env()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


STACKS = {
    "compose": lambda: (compose_env("server"), compose_env("worker")),
    "kubernetes": lambda: (kubernetes_env("sleepserve-server"), kubernetes_env("sleepserve-worker")),
}


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """The process environment `env` (SLEEPSERVE_* and OMP_NUM_THREADS of the test run cleared)."""
    for name in list(os.environ):
        if name.startswith("SLEEPSERVE_") or name == "OMP_NUM_THREADS":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("stack", STACKS)
def test_the_server_picks_its_threads_and_sleep_as_make_serve_does(stack, monkeypatch):
    server_env, _ = STACKS[stack]()
    use_env(monkeypatch, server_env)
    deployed = Settings()
    use_env(monkeypatch, {})
    local = Settings()
    assert {f: getattr(deployed, f) for f in SLEEP_FIELDS} == {f: getattr(local, f) for f in SLEEP_FIELDS}
    assert cli.torch_threads(deployed, server_env) == cli.torch_threads(local, {}) == 1


@pytest.mark.parametrize("stack", STACKS)
async def test_the_worker_gets_the_jobs_of_idle_sessions(stack, monkeypatch, redis_server):
    """The server's settings route idle sessions to the Redis Stream that the worker's settings read;
    run against a real Redis (the stores pointed at it, the idle time shortened), a session left idle
    becomes a job that the worker, built from its settings, consolidates."""
    server_env, worker_env = STACKS[stack]()
    use_env(monkeypatch, server_env)
    settings = Settings()
    assert settings.idle_consolidation is not None and settings.idle_worker == "remote"
    use_env(monkeypatch, worker_env)
    args = scheduler.worker.parse_args([])
    assert (args.store, args.stream) == (settings.store, settings.sleep_stream)
    assert (
        Path(settings.checkpoint)
        == Path(args.checkpoint)
        == Path("/opt/sleepserve") / SHIPPED.relative_to(ROOT)
    )

    url = redis_server.replace("/0", f"/{7 + list(STACKS).index(stack)}")
    here = settings.model_copy(update={"store": url, "idle_consolidation": 0.2, "checkpoint": SHIPPED})
    async with AsyncExitStack() as stack_:
        app = create_app(here)
        await stack_.enter_async_context(app.router.lifespan_context(app))
        client = await stack_.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        )
        session = (await client.post("/v1/sessions")).json()["id"]
        body = {"model": here.served_model_name, "prompt": PROMPT, "max_tokens": 2, "session_id": session}
        assert (await client.post("/v1/completions", json=body)).status_code == 200
        before = (await client.get(f"/v1/sessions/{session}")).json()
        assert before["tail_tokens"] > 0
        await asyncio.sleep(0.8)  # idle: the job is on the stream

        args.store, args.checkpoint, args.consumer = url, SHIPPED, "test"
        worker = scheduler.worker.build_worker(args)
        worker.options.block_seconds = 0.05
        worker.ensure_group()
        assert await asyncio.to_thread(worker.poll) == 1 and worker.outcomes == {"done": 1}
        after = (await client.get(f"/v1/sessions/{session}")).json()
    assert after["tail_tokens"] == 0 and after["version"] == before["version"] + 1
    assert after["consolidated_tokens"] == before["consolidated_tokens"] + before["tail_tokens"]
