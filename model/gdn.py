"""Gated DeltaNet layer: the fast-weight memory that sleep writes into.

As in fla's GatedDeltaNet: q, k, v get a short causal depthwise convolution (SiLU); q, k are
L2-normalised; α = exp(g) with a Mamba2-style decay gate g = −exp(A_log)·softplus(a(x) + dt_bias);
β = sigmoid(b(x)); the output passes an RMSNorm gated by SiLU(g_proj(x)). The fast weights enter and
leave explicitly, and so does the convolution's history (None: it restarts from zeros).

Qwen3.5's layer is the same network under other names (model/families/qwen3_5.py), with value-head
grouping: gdn_heads value heads share gdn_key_heads q/k heads, value head j reading key head
j // (gdn_heads / gdn_key_heads). The delta rule and its state run in float32 whatever the weights'
dtype: bf16 state is known to collapse Qwen3.5's outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.gated_delta import gated_delta_chunk, gated_delta_recurrent
from model.layers import wide

# Up to this many tokens per call (decode steps, short prompt pieces) the per-token recurrence is
# cheaper than the chunk-parallel form over a padded chunk (a one-off timing on 2 CPU cores: an
# 8-session extend of 4 tokens 1.5 ms against 1.9 ms; at 8 tokens the chunk form won). Both forms are
# the same function (tests/model/test_gated_delta.py), so this only moves cost.
RECURRENT_TOKENS = 6


@dataclass
class FastWeightCache:
    """A gdn layer's live state inside the window."""

    fast: Tensor  # [B, H, K, V] memory plus this window's updates so far (float32)
    conv: Tensor  # [B, conv_size - 1, channels] last inputs of the short convolution (float32)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, K, V = config.gdn_heads, config.gdn_key_dim, config.gdn_value_dim
        self.heads, self.key_heads, self.key_dim, self.value_dim = H, config.n_gdn_key_heads, K, V
        self.chunk_size = config.gdn_chunk_size
        self.l2norm_eps = config.gdn_l2norm_eps
        self.channels = config.gdn_channels
        self.qkv = nn.Linear(config.d_model, self.channels, bias=False)
        self.conv = nn.Conv1d(
            self.channels, self.channels, config.conv_size, groups=self.channels, bias=False
        )
        self.decay_proj = nn.Linear(config.d_model, H, bias=False)  # a(x)
        self.beta_proj = nn.Linear(config.d_model, H, bias=False)  # b(x)
        self.gate_proj = nn.Linear(config.d_model, H * V, bias=False)
        self.out_norm = nn.RMSNorm(V, eps=config.norm_eps)
        self.out = nn.Linear(H * V, config.d_model, bias=False)
        # Mamba2 initialisation: A ~ U(1, 16), dt ~ logU(dt_min, dt_max) stored as softplus⁻¹(dt).
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(config.gdn_dt_min), math.log(config.gdn_dt_max)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

    def empty_conv(self, batch: int, like: Tensor) -> Tensor:
        return like.new_zeros(batch, self.conv.kernel_size[0] - 1, self.channels, dtype=torch.float32)

    def forward(self, x: Tensor, fast: Tensor, conv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, d]; fast: [B, H, K, V]; conv: [B, conv_size-1, channels] or None (window start).

        Returns y [B, T, d], the fast weights after the T tokens, and the new convolution state. Three
        pieces, which a sleep pass runs between pauses (`HybridLM.pass_slices`).
        """
        q, k, v, g, beta, conv = self.project(x, conv)
        o, fast = self.delta_rule(q, k, v, g, beta, fast)
        return self.output(x, o), fast, conv

    def project(
        self, x: Tensor, conv: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The delta rule's inputs from x [B, T, d]: q, k [B, T, key heads, K] (L2-normalised), v
        [B, T, H, V], g (log α, float32) and β [B, T, H], and the new convolution state (float32)."""
        B, T, _ = x.shape
        H, Hk, K, V = self.heads, self.key_heads, self.key_dim, self.value_dim
        if conv is None:
            conv = self.empty_conv(B, x)
        mixed = torch.cat([conv.to(x.dtype), self.qkv(x)], dim=1)  # [B, W-1+T, channels]
        # Depthwise causal convolution as a sum over its few taps, in the projection's layout (no
        # transposes): much faster than conv1d's CPU backward, and the same numbers.
        taps = self.conv.weight[:, 0].t()  # [W, channels]
        qkv = mixed[:, :T] * taps[0]
        for i in range(1, len(taps)):
            qkv = qkv + mixed[:, i : i + T] * taps[i]
        qk, v = F.silu(qkv).split([2 * Hk * K, H * V], dim=-1)  # [B, T, ...]
        qk = qk.view(B, T, 2, Hk, K)
        if self.l2norm_eps:  # transformers' and fla's form, in float32
            qk = wide(qk) * torch.rsqrt(wide(qk).pow(2).sum(-1, keepdim=True) + self.l2norm_eps)
        else:
            qk = F.normalize(qk, dim=-1)
        q, k = qk.unbind(2)  # both in one go
        # The decay in float32: in half precision exp(A_log) may overflow.
        g = -wide(self.A_log).exp() * F.softplus(wide(self.decay_proj(x)) + self.dt_bias)  # [B, T, H] log α
        beta = torch.sigmoid(self.beta_proj(x))  # [B, T, H]
        return q, k, v.view(B, T, H, V), g, beta, wide(mixed[:, T:])

    def delta_rule(
        self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, fast: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The gated delta rule over `project`'s outputs from the fast weights [B, H, K, V]: its output o
        [B, T, H, V] (in v's dtype) and the fast weights after the T tokens (float32)."""
        if self.key_heads != self.heads:  # value-head grouping: each q/k head serves consecutive v heads
            q, k = (x.repeat_interleave(self.heads // self.key_heads, dim=2) for x in (q, k))
        dtype = v.dtype
        q, k, v, beta = wide(q), wide(k), wide(v), wide(beta)
        # Under autocast (bf16 training) the matmuls would run in bf16 and so would the state.
        with torch.autocast(q.device.type, enabled=False):
            if q.shape[1] <= RECURRENT_TOKENS:  # a few tokens: the recurrence is fewer ops than one chunk
                o, fast = gated_delta_recurrent(q, k, v, g, beta, fast)
            else:
                o, fast = gated_delta_chunk(q, k, v, g, beta, fast, self.chunk_size)
        return o.to(dtype), fast

    def output(self, x: Tensor, o: Tensor) -> Tensor:
        """y [B, T, d] from the delta rule's output o [B, T, H, V]: normed, gated by SiLU(g_proj(x)) and
        projected back."""
        B, T, _ = x.shape
        gate = F.silu(self.gate_proj(x)).view(B, T, self.heads, self.value_dim)
        return self.out((self.out_norm(o) * gate).reshape(B, T, self.heads * self.value_dim))
