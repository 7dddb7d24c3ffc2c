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


def test_qwen3_5_0_8b_weights_map_onto_our_shapes() -> None:
    """The real config's weights, as transformers lays them out, map onto ours shape for shape (no
    weights: both models on the meta device), with the parameter count of the card's text model."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    text = Qwen3_5TextConfig(**{k: v for k, v in QWEN3_5_0_8B.items() if k != "model_type"})
    config, _ = qwen3_5.model_config(QWEN3_5_0_8B)
    with torch.device("meta"):
        theirs = Qwen3_5ForCausalLM(text)
        ours = HybridLM(config)
    mapped = {qwen3_5.weight_name(name): t for name, t in theirs.state_dict().items()}
    mapped = qwen3_5.assemble(mapped, config)
    assert {n: t.shape for n, t in mapped.items()} == {n: t.shape for n, t in ours.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())  # tied: the embedding once
    assert count == sum(p.numel() for p in theirs.parameters())
    assert 0.7e9 < count < 0.8e9
