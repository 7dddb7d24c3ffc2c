"""Causal softmax attention over the session's window only, with its KV cache passed in and returned.

Positions are indices within the window (RoPE restarts at every window): the window is all attention
ever sees, and everything older reaches the model only through the gdn layers' fast weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of the window, in preallocated buffers of the window's capacity."""

    keys: Tensor  # [B, H, capacity, D]
    values: Tensor  # [B, H, capacity, D]


def rotary(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotate-half RoPE. x: [B, H, T, D]; positions: [B, T] (ints)."""
    return rotate(x, *rotation(positions, x.shape[-1], base, x.dtype))


def rotation(positions: Tensor, dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [B, 1, T, dim/2] of RoPE's angles at positions [B, T], to `rotate` q and k alike."""
    half = dim // 2
    freqs = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)  # [D/2]
    angles = positions[:, None, :, None].float() * freqs  # [B, 1, T, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


@functools.cache
def window_rotation(
    length: int, dim: int, base: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """`rotation` [1, 1, T, dim/2] of positions 0..length-1, which every pass over a window from its
    start uses (a sleep's, a training window's): built once per shape. Never an inference tensor,
    which autograd could not use (see `gated_delta._above_diagonal`)."""
    with torch.inference_mode(False):
        return rotation(torch.arange(length, device=device)[None], dim, base, dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class WindowAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.rope_base = config.rope_base
        self.qkv = nn.Linear(config.d_model, 3 * config.n_heads * config.head_dim, bias=False)
        self.out = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, T, D] of x [B, T, d], q and k rotated by `rotation`'s cos and sin."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, T, D]
        q, k = rotate(qkv[:2], cos, sin)  # both in one go
        return q, k, qkv[2]

    def _merge(self, o: Tensor) -> Tensor:  # [B, H, T, D] -> [B, T, d_model]
        B, _, T, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A whole window from its start (training, sleep). x: [B, T, d]. Returns y, keys, values."""
        cos, sin = window_rotation(x.shape[1], self.head_dim, self.rope_base, x.dtype, x.device)
        q, k, v = self._project(x, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._merge(o), k, v

    def extend(self, x: Tensor, cache: KVCache, lengths: Tensor) -> tuple[Tensor, KVCache]:
        """Append T tokens to windows already holding `lengths` tokens (decode, continued prefill).

        x: [B, T, d]; lengths: [B]. The cache buffers are written in place and returned.
        """
        B, T, _ = x.shape
        positions = lengths[:, None] + torch.arange(T, device=x.device)  # [B, T]
        q, k, v = self._project(x, *rotation(positions, self.head_dim, self.rope_base, x.dtype))
        slots = positions[:, None, :, None].expand(B, self.n_heads, T, self.head_dim)
        cache.keys.scatter_(2, slots, k)
        cache.values.scatter_(2, slots, v)
        used = int(positions.max()) + 1  # attend over the filled part of the buffers only
        visible = torch.arange(used, device=x.device) <= positions[..., None]  # [B, T, used]
        keys, values = cache.keys[:, :, :used], cache.values[:, :, :used]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None])
        return self._merge(o), cache
