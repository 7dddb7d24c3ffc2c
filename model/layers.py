"""The small pieces every block uses, in the variants the families need: RMSNorm and the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig


def wide(x: Tensor) -> Tensor:
    """x in float32, or in float64 where it is (gradient checks): what norms, decays and the gdn state
    are computed in, never less."""
    return x if x.dtype == torch.float64 else x.float()


class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm with weight (1 + w), w initialised to 0, computed in float32 (Qwen3.5's, and Gemma's).
    A plain `nn.RMSNorm` on these weights silently breaks the model."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = wide(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + wide(self.weight))).type_as(x)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "zero-centred":
        return ZeroCentredRMSNorm(dim, config.norm_eps)
    return nn.RMSNorm(dim, eps=config.norm_eps)


class MLP(nn.Module):
    """GELU (`up`, `down`) or SwiGLU (`gate`, `up`, `down`: down(silu(gate x) · up x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden or config.mlp_ratio * config.d_model
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(config.d_model, hidden, bias=False)
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))
