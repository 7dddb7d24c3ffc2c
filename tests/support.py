"""Helpers shared by the tests (the fixtures built on them are in conftest.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
import redis

from bench.procs import redis_args

if TYPE_CHECKING:
    from model.hybrid import HybridLM

REDIS_MISSING = (
    "redis-server is not on PATH: the Redis tests need a real server. Run `make test` (it installs "
    "redis-server) or install it yourself: `apt-get update && apt-get install -y redis-server`."
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A `redis-server` child process on 127.0.0.1, persisting (AOF only) into `directory`."""

    def __init__(self, directory: Path, port: int | None = None, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(REDIS_MISSING, pytrace=False)
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        args = redis_args(binary, self.port, self.directory, self.appendonly)
        with log.open("ab") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"redis-server exited at start:\n{log.read_text()}", pytrace=False)
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop(kill=True)
                        pytest.fail(
                            f"redis-server did not answer PING in {timeout} s:\n{log.read_text()}",
                            pytrace=False,
                        )
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGKILL (`kill -9`) when `kill`, else SIGTERM (a clean shutdown)."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.process.wait(timeout=10)
        self.process = None


# -- gated delta rule inputs (model and GPU tests) ---------------------------------------------------


def random_inputs(B, T, H, K, V, seed, zero_state=False):
    """q, k (L2-normalised), v, log α (near 0, as trained decays are), β and an initial state."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    log_alpha = F.logsigmoid(torch.randn(B, T, H, generator=g) + 3)
    beta = torch.rand(B, T, H, generator=g)
    state = torch.zeros(B, H, K, V) if zero_state else torch.randn(B, H, K, V, generator=g)
    return q, k, v, log_alpha, beta, state


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖, on the CPU in fp32 (either may live on a GPU)."""
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


# -- tiny checkpoints (server tests) --------------------------------------------------------------


# (schedule, lagged construction) pairs the model, training and engine tests run: stale-kv is lagged only.
SCHEDULES = [("hard", "re-prefill"), ("lagged", "re-prefill"), ("lagged", "stale-kv")]


def tiny_model(
    schedule: str = "lagged",
    variable_chunks: bool = False,
    seed: int = 0,
    lagged_construction: str = "re-prefill",
):
    """A random 2-layer model (d_model 32, window 8) whose logits are peaked enough that greedy decoding
    does not hinge on float rounding (its head is scaled up)."""
    import torch

    from model.config import ModelConfig
    from model.hybrid import HybridLM

    torch.manual_seed(seed)
    config = ModelConfig(
        d_model=32,
        layers=["attn", "gdn"],
        n_heads=2,
        head_dim=16,
        gdn_heads=2,
        gdn_key_dim=16,
        gdn_value_dim=16,
        window=8,
        gdn_chunk_size=8,
        sleep_passes=2,
        schedule=schedule,
        variable_chunks=variable_chunks,
        lagged_construction=lagged_construction,
    )
    model = HybridLM(config).eval()
    with torch.no_grad():
        model.head.weight.mul_(200.0)
    return model


def forge_blob(blob: bytes, change) -> bytes:
    """A session blob with its tensors changed by `change(tensors)` and a checksum that matches again
    (what any client can do: the checksum is not a secret)."""
    import json

    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors

    from model.state import _checksum

    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])["__metadata__"]
    header.pop("checksum")
    header.pop("signature", None)
    tensors = {name: t.clone() for name, t in load_tensors(blob).items()}
    change(tensors)
    header["checksum"] = _checksum(tensors, header)
    return save_tensors(tensors, metadata=header)


# -- a real server process -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`python -m server` on a free port, ready once /health answers; `args` are extra serve flags."""

    def __init__(
        self, checkpoint: Path, store: str, log: Path, model_name: str = "tiny", args: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        flags = ["--port", str(self.port), "--host", "127.0.0.1", "--model", str(checkpoint), *args]
        env = {
            **os.environ,
            "SLEEPSERVE_STORE": store,
            "SLEEPSERVE_SERVED_MODEL_NAME": model_name,
            "SLEEPSERVE_SHUTDOWN_TIMEOUT": "0.5",
            "OMP_NUM_THREADS": "1",
        }
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", *flags],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not come up:\n{log.read_text()}"
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=30)

    def new_session(self) -> str:
        return httpx.post(self.url + "/v1/sessions").json()["id"]

    def session(self, session_id: str) -> dict:
        return httpx.get(f"{self.url}/v1/sessions/{session_id}").json()


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
