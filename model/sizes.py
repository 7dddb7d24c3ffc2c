"""What a session costs to keep, from a config's shapes alone (no weights): the session blob sleepserve
stores against the attention KV cache a server without sleep holds for the same context.

`python -m model.sizes` prints it for the real Qwen3.5-0.8B (`QWEN3_5_0_8B`, its text config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.state import SessionState

# Qwen/Qwen3.5-0.8B's text_config (research/real-models.md §2.1: four copies of the official config
# agree); the vision tower is not part of the language model.
QWEN3_5_0_8B = {
    "model_type": "qwen3_5_text",
    "vocab_size": 248320,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 24,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
}


@dataclass
class SessionSizes:
    blob_bytes: int  # the stored session: memory (float32), tail tokens, counters, header
    memory_bytes: int  # of which the gdn fast weights and convolution histories
    window_kv_bytes: int  # sleepserve's live attention window at its fullest (rebuilt, never stored)
    kv_cache_bytes: dict[int, int]  # context tokens -> a full-attention KV cache of the same layers


def session_sizes(
    config: ModelConfig, contexts: tuple[int, ...] = (32768, 131072), kv_dtype: torch.dtype = torch.bfloat16
) -> SessionSizes:
    """Sizes of one session of `config`. The blob is measured by serialising an empty session of the
    real shapes (its size never depends on the conversation); KV caches hold keys and values of every
    attention layer in `kv_dtype`."""
    state = SessionState(
        memory=[torch.zeros(shape) for shape in config.memory_shapes()], schedule=config.schedule
    )
    blob = len(state.to_bytes("0" * 64, config.window_capacity))  # a fingerprint is a SHA-256 hex digest
    memory = sum(4 * math.prod(shape) for shape in config.memory_shapes())
    per_token = config.layers.count("attn") * 2 * config.n_kv_heads * config.head_dim * kv_dtype.itemsize
    return SessionSizes(
        blob_bytes=blob,
        memory_bytes=memory,
        window_kv_bytes=per_token * config.window_capacity,
        kv_cache_bytes={tokens: per_token * tokens for tokens in contexts},
    )


def main() -> None:
    from model.families import qwen3_5

    config, _ = qwen3_5.model_config(QWEN3_5_0_8B)
    sizes = session_sizes(config)
    mib = 2**20
    print(f"Qwen3.5-0.8B, window {config.window} ({config.schedule}): one session")
    print(
        f"  sleepserve blob: {sizes.blob_bytes / mib:.1f} MiB at any context (memory {sizes.memory_bytes / mib:.1f} MiB)"
    )
    print(f"  live attention window at its fullest: {sizes.window_kv_bytes / mib:.1f} MiB (bf16, not stored)")
    for tokens, size in sizes.kv_cache_bytes.items():
        print(
            f"  full-attention KV cache at {tokens // 1024}k tokens: {size / mib:.0f} MiB (bf16), "
            f"{size / sizes.blob_bytes:.0f}x the blob"
        )


if __name__ == "__main__":
    main()
