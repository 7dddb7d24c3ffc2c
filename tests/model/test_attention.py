"""Window attention: a pass over a window from its start (training, sleep) against the decode path."""

from __future__ import annotations

import pytest
import torch

from model.attention import KVCache, WindowAttention
from model.config import ModelConfig


def attention(seed: int = 0) -> WindowAttention:
    torch.manual_seed(seed)
    return WindowAttention(ModelConfig(d_model=32, n_heads=2, head_dim=8, window=16))


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 7), (2, 32)])
def test_window_pass_equals_extending_an_empty_window(batch: int, length: int) -> None:
    """`forward` (rotations of positions 0..T-1, cached per length) gives the keys `extend` writes into
    an empty window (rotations of its positions, computed per call), bit for bit, and the same output."""
    mixer = attention()
    x = torch.randn(batch, length, 32)
    with torch.no_grad():
        y, keys, values = mixer(x)
        empty = KVCache(torch.zeros(batch, 2, length, 8), torch.zeros(batch, 2, length, 8))
        y_extend, cache = mixer.extend(x, empty, torch.zeros(batch, dtype=torch.long))
    assert torch.equal(keys, cache.keys) and torch.equal(values, cache.values)
    torch.testing.assert_close(y, y_extend, atol=1e-6, rtol=1e-5)


def test_window_pass_trains_after_an_inference_mode_call() -> None:
    """The cached rotations are shared by every later pass of their length: made first in inference
    mode (a server's decode thread), they must still serve a pass under autograd (training in the same
    process)."""
    mixer = attention(1)
    x = torch.randn(2, 11, 32)  # 11: a length no other test uses
    with torch.inference_mode():
        mixer(x)
    y, _, _ = mixer(x.requires_grad_(True))
    y.square().sum().backward()
    assert x.grad is not None and mixer.qkv.weight.grad is not None
