"""The server's parts, wired together: model, engine, session manager, store and metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from redis import asyncio as aioredis

from model.checkpoint import fingerprint
from model.hybrid import HybridLM
from model.loading import LoadedModel, load_model
from model.tokenizer import ByteTokenizer, Tokenizer
from scheduler.isolation import create_executor
from scheduler.policy import DepthPolicy
from server.engine import Engine
from server.idle import IdleConsolidator
from server.metrics import Metrics
from server.serving import TurnContext
from server.sessions import SessionManager
from server.settings import Settings
from server.stores import SessionStore, open_store

log = logging.getLogger("sleepserve")


class CheckpointError(RuntimeError):
    """The configured checkpoint cannot be loaded."""


@dataclass
class Server:
    """Everything the routes use, in `app.state.server`."""

    settings: Settings
    model: HybridLM
    fingerprint: str
    passes: int
    metrics: Metrics
    store: SessionStore
    engine: Engine
    sessions: SessionManager
    turns: TurnContext
    tokenizer: Tokenizer
    family: str

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(settings: Settings) -> LoadedModel:
    """The model of `settings`, with its serve-time sleep settings where given."""
    try:
        return load_model(
            settings.model_path,
            dtype=DTYPES[settings.dtype] if settings.dtype else None,
            device=settings.device,
            window=settings.window,
            schedule=settings.schedule,
            sleep_passes=settings.sleep_passes if isinstance(settings.sleep_passes, int) else None,
            sleep_blocks=settings.sleep_block_range,
        )
    except FileNotFoundError as exc:
        raise CheckpointError(f"cannot load checkpoint {settings.model_path}: {exc}") from exc
    except ValueError as exc:  # an unsupported model type, sleep settings that do not fit the model
        raise CheckpointError(f"cannot serve {settings.model_path}: {exc}") from exc


def build_server(
    settings: Settings, model: HybridLM | None = None, sleeper_cpus: set[int] | None = None
) -> Server:
    """The server of `settings` (`model`: a native model to serve instead of loading one). `sleeper_cpus`: the CPUs
    its threads leave free (`server.cli.sleeper_cpus`), where a sleeper process runs, and where
    `sleep_worker=auto` offloads sleep on CPU (without them it sleeps interleaved)."""
    loaded = load(settings) if model is None else LoadedModel(model, ByteTokenizer(), "sleepy", "")
    model, config = loaded.model, loaded.model.config
    fixed = settings.sleep_passes if isinstance(settings.sleep_passes, int) else config.sleep_passes
    passes = min(max(fixed, settings.min_passes), settings.max_passes)
    metrics = Metrics()
    executor = None
    if settings.sleep_mode == "background":
        policy = DepthPolicy(settings.min_passes, settings.max_passes)
        isolation = settings.sleep_worker
        if isolation == "auto":  # on CPU: offloaded where the server's threads leave cores free
            isolation = (
                ("offload" if sleeper_cpus else "interleaved") if model.device.type == "cpu" else "thread"
            )
        sleeper = isolation in ("process", "offload")
        log.info(
            "background sleep: %s%s",
            isolation,
            f", its process on CPUs {sorted(sleeper_cpus)}" if sleeper_cpus and sleeper else "",
        )
        executor = create_executor(
            model,
            isolation,
            policy=policy,
            metrics=metrics,
            nice=settings.sleeper_nice,
            batch_wait=settings.sleep_batch_wait,
            share=settings.sleep_share,
            sleeper_cpus=sleeper_cpus,
        )
        executor.calibrate(config.window)
    store = open_store(
        settings.store, session_ttl=settings.session_ttl, max_bytes=settings.store_max_bytes, metrics=metrics
    )
    engine = Engine(
        model,
        passes=None if settings.sleep_passes == "auto" else passes,  # None: adaptive
        executor=executor,
        metrics=metrics,
        max_running=settings.max_running,
        max_waiting=settings.max_waiting,
        prefill_chunk=settings.prefill_chunk,
        tokenizer=loaded.tokenizer,
    )
    digest = fingerprint(model)
    sessions = SessionManager(
        store,
        model,
        digest,
        metrics=metrics,
        passes=passes,
        lease_ttl=settings.session_lease_ttl,
        lease_wait=settings.session_lease_wait,
        history_limit=settings.session_history_messages,
        signing_key=settings.session_signing_key.get_secret_value().encode()
        if settings.session_signing_key
        else None,
    )
    idle = None
    if settings.idle_consolidation is not None:
        if not config.variable_chunks:
            raise CheckpointError(
                "idle consolidation needs a checkpoint trained with variable chunk lengths "
                "(config.variable_chunks); this one consolidates full windows only"
            )
        remote = aioredis.from_url(settings.store) if settings.idle_worker == "remote" else None
        idle = IdleConsolidator(
            sessions, settings.idle_consolidation, settings.max_passes, remote, settings.sleep_stream
        )
    turns = TurnContext(model, engine, sessions, settings.request_timeout, set(), idle)
    return Server(
        settings,
        model,
        digest,
        passes,
        metrics,
        store,
        engine,
        sessions,
        turns,
        loaded.tokenizer,
        loaded.family,
    )
