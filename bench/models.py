"""The models the benchmarks compare: the product (sleepserve's shipped checkpoint, or a random-weight
model of the default config when none is shipped) and its full-attention twin that never sleeps."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.hybrid import HybridLM


def product_config(checkpoint: Path = DEFAULT_CHECKPOINT) -> ModelConfig:
    """The checkpoint's config when it exists, else the default one."""
    path = checkpoint / "config.json"
    return ModelConfig.load(path) if path.is_file() else ModelConfig()


def random_model_config(construction: str | None) -> ModelConfig:
    """The config of the latency benchmarks' random-weight model: the shipped checkpoint's (`product_config`),
    with `construction` when one is given."""
    config = product_config()
    return config.replace(lagged_construction=construction) if construction else config


def product_model(checkpoint: Path = DEFAULT_CHECKPOINT) -> tuple[HybridLM, str]:
    """The checkpoint when it exists, else a random-weight `ModelConfig()` model (seed 0): latency and
    state size depend on the shapes, not the weights. Also returns which one it is, for the record."""
    if (checkpoint / "config.json").is_file():
        return load_checkpoint(checkpoint), str(checkpoint)
    torch.manual_seed(0)
    return HybridLM(ModelConfig()).eval(), "random weights, default ModelConfig"


def full_attention_config(base: ModelConfig, max_context: int) -> ModelConfig:
    """Attention-only blocks of the same width and depth, one window of `max_context` tokens: it keeps
    every token (baseline 2). Hard schedule, so the window capacity is `max_context`, not twice it; the
    lagged construction reset to the default, since stale-kv needs a gdn block behind the first."""
    return base.replace(
        layers=["attn"] * len(base.layers),
        window=max_context,
        schedule="hard",
        lagged_construction="re-prefill",
    )


def save_random(config: ModelConfig, folder: Path, seed: int = 0) -> Path:
    """A random-weight model of `config` saved as a checkpoint in `folder`."""
    torch.manual_seed(seed)
    save_checkpoint(HybridLM(config).eval(), folder)
    return folder


def kv_cache_bytes(config: ModelConfig, context: int) -> int:
    """Bytes of an fp32 KV cache holding `context` tokens in every block of `config`'s width and depth:
    2 (K, V) × layers × context × heads × head_dim × 4."""
    return 2 * len(config.layers) * context * config.n_heads * config.head_dim * 4
