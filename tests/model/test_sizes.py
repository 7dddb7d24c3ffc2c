"""The shape-only size calculator (model/sizes.py) against real session blobs and the known shapes of
Qwen3.5-0.8B."""

import torch

from model.checkpoint import fingerprint
from model.config import ModelConfig
from model.families import qwen3_5
from model.hybrid import HybridLM
from model.session import feed, new_state, open_window
from model.sizes import QWEN3_5_0_8B, session_sizes


def test_blob_size_is_a_real_session_blob_at_any_length() -> None:
    config = ModelConfig(window=8, gdn_conv_state="carry")
    model = HybridLM(config).eval()
    expected = session_sizes(config).blob_bytes
    for n in (1, 13, 40):
        state = new_state(model)
        cache, _ = open_window(model, state)
        feed(model, state, cache, list(range(n)), passes=2)
        assert len(state.to_bytes(fingerprint(model), config.window_capacity)) == expected


def test_qwen3_5_0_8b_sizes() -> None:
    config, trained = qwen3_5.model_config(QWEN3_5_0_8B)
    assert not trained and config.layers.count("attn") == 6 and config.rope_dim == 64
    sizes = session_sizes(config)
    fast = 18 * 16 * 128 * 128 * 4  # 18 gdn layers of float32 [16, 128, 128]: 18 MiB
    conv = 18 * 3 * (2 * 16 * 128 + 16 * 128) * 4
    assert sizes.memory_bytes == fast + conv
    assert sizes.memory_bytes < sizes.blob_bytes < sizes.memory_bytes + 2 * 4 * config.window_capacity
    per_token = 6 * 2 * 2 * 256 * torch.bfloat16.itemsize  # 12 KiB
    assert sizes.kv_cache_bytes == {32768: 32768 * per_token, 131072: 131072 * per_token}
