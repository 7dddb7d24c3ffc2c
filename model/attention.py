"""Causal softmax attention over the session's window only, with its KV cache passed in and returned.

Positions are indices within the window (RoPE restarts at every window): the window is all attention
ever sees, and everything older reaches the model only through the gdn layers' fast weights.

The variants a family may switch on (ModelConfig): grouped-query attention (`kv_heads`), RoPE on part
of each head (`rotary_dim`), RMSNorm on each query and key head before RoPE (`qk_norm`), and an output
gate that q's projection gives per head as [query | gate] (`attn_output_gate`: out(attn · σ(gate))).
q, k and v come from one fused projection (`qkv`: the rows of q, then k, then v).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.layers import make_norm


@dataclass
class KVCache:
    """Keys and values of the window, in preallocated buffers of the window's capacity."""

    keys: Tensor  # [B, kv_heads, capacity, D]
    values: Tensor  # [B, kv_heads, capacity, D]


def rotary(x: Tensor, positions: Tensor, base: float, dim: int | None = None) -> Tensor:
    """Rotate-half RoPE on the first `dim` (default: all) dims. x: [B, H, T, D]; positions: [B, T]."""
    return rotate(x, *rotation(positions, dim or x.shape[-1], base, x.dtype))


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
    """x rotated by `rotation`'s cos and sin, on the first 2 × cos.shape[-1] dims (the rest passes)."""
    half = cos.shape[-1]
    if 2 * half < x.shape[-1]:  # partial RoPE (Qwen3.5 rotates 64 of 256 dims)
        return torch.cat([rotate(x[..., : 2 * half], cos, sin), x[..., 2 * half :]], dim=-1)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class WindowAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_dim, self.rope_base = config.rope_dim, config.rope_base
        self.gated = config.attn_output_gate
        self.q_size = config.n_heads * config.head_dim * (2 if self.gated else 1)
        self.qkv = nn.Linear(config.d_model, self.q_size + 2 * self.kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, self.head_dim), make_norm(config, self.head_dim)

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q [B, H, T, D], k, v [B, kv_heads, T, D] of x [B, T, d], q and k rotated by `rotation`'s cos
        and sin; and the output gate [B, T, H·D] (None without one)."""
        B, T, _ = x.shape
        H, G, D = self.n_heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([self.q_size, G * D, G * D], dim=-1)
        gate = None
        if self.gated:  # per head [query | gate], not the two halves of the whole projection
            q, gate = q.view(B, T, H, 2 * D).chunk(2, dim=-1)
            gate = gate.reshape(B, T, H * D)
        q, k, v = q.reshape(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v, gate

    def _merge(self, o: Tensor, gate: Tensor | None) -> Tensor:  # [B, H, T, D] -> [B, T, d_model]
        B, _, T, _ = o.shape
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.out(o if gate is None else o * torch.sigmoid(gate))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, **mask) -> Tensor:
        if self.kv_heads == self.n_heads:
            return F.scaled_dot_product_attention(q, k, v, **mask)
        return F.scaled_dot_product_attention(q, k, v, **mask, enable_gqa=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A whole window from its start (training, sleep). x: [B, T, d]. Returns y, keys, values."""
        cos, sin = window_rotation(x.shape[1], self.rope_dim, self.rope_base, x.dtype, x.device)
        q, k, v, gate = self._project(x, cos, sin)
        return self._merge(self._attend(q, k, v, is_causal=True), gate), k, v

    def extend(self, x: Tensor, cache: KVCache, lengths: Tensor) -> tuple[Tensor, KVCache]:
        """Append T tokens to windows already holding `lengths` tokens (decode, continued prefill).

        x: [B, T, d]; lengths: [B]. The cache buffers are written in place and returned.
        """
        B, T, _ = x.shape
        positions = lengths[:, None] + torch.arange(T, device=x.device)  # [B, T]
        q, k, v, gate = self._project(x, *rotation(positions, self.rope_dim, self.rope_base, x.dtype))
        slots = positions[:, None, :, None].expand(B, self.kv_heads, T, self.head_dim)
        cache.keys.scatter_(2, slots, k)
        cache.values.scatter_(2, slots, v)
        used = int(positions.max()) + 1  # attend over the filled part of the buffers only
        visible = torch.arange(used, device=x.device) <= positions[..., None]  # [B, T, used]
        keys, values = cache.keys[:, :, :used], cache.values[:, :, :used]
        return self._merge(self._attend(q, keys, values, attn_mask=visible[:, None]), gate), cache
