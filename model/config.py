"""ModelConfig: everything that shapes the network and its sleep, passed whole to every module."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Schedule = Literal["hard", "lagged"]
SCHEDULES: tuple[str, ...] = ("hard", "lagged")
LAYER_KINDS: tuple[str, ...] = ("attn", "gdn")
Construction = Literal["re-prefill", "stale-kv"]
CONSTRUCTIONS: tuple[str, ...] = ("re-prefill", "stale-kv")
NORMS: tuple[str, ...] = ("plain", "zero-centred")
MLPS: tuple[str, ...] = ("gelu", "swiglu")
CONV_STATES: tuple[str, ...] = ("restart", "carry")


@dataclass
class ModelConfig:
    family: str = "sleepy"  # which module of model/families maps its checkpoints (docs/models.md)
    vocab_size: int = 272  # 256 bytes + special tokens (see tokenizer.py), rounded up to a multiple of 16
    d_model: int = 64
    layers: list[str] = field(default_factory=lambda: ["attn", "gdn"])
    n_heads: int = 4  # attention (query) heads
    head_dim: int = 16  # attention head size
    kv_heads: int | None = None  # grouped-query attention: key/value heads (None: n_heads)
    rotary_dim: int | None = None  # RoPE on the first rotary_dim dims of a head (None: all of them)
    attn_output_gate: bool = False  # q_proj also gives a per-head gate: out(attn · sigmoid(gate))
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE
    gdn_heads: int = 2  # value heads of the gdn layer: its memory is [gdn_heads, key_dim, value_dim]
    gdn_key_heads: int | None = None  # q/k heads, each shared by gdn_heads // gdn_key_heads (None: all)
    gdn_key_dim: int = 32  # fast-weight memory per gdn head is gdn_key_dim × gdn_value_dim
    gdn_value_dim: int = 32
    # q and k of the delta rule are L2-normalised: 0 divides by the norm (F.normalize); > 0 multiplies
    # by rsqrt(sum of squares + eps), as transformers and fla do for Qwen3.5.
    gdn_l2norm_eps: float = 0.0
    conv_size: int = 4  # short causal convolution on q, k, v of the gdn layer
    # What the short convolution sees before a window's (or a sleep pass's) first token: "restart",
    # nothing (zeros); "carry", the inputs before it, kept with the fast weights as part of the memory
    # (docs/models.md).
    gdn_conv_state: Literal["restart", "carry"] = "restart"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_ratio: int = 4
    mlp_hidden: int | None = None  # the MLP's hidden size (None: mlp_ratio × d_model)
    norm: Literal["plain", "zero-centred"] = "plain"  # RMSNorm weight w, or (1 + w) with w from 0
    tie_embeddings: bool = False  # the output head is the embedding matrix
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    window: int = 24  # L: tokens per chunk; attention sees 1 (hard) or 2 (lagged) chunks
    schedule: Schedule = "lagged"
    sleep_passes: int = 2  # default N
    gdn_chunk_size: int = 32  # block size of the chunk-parallel gated delta rule
    # Initial decay of the gdn memory: dt ~ logU(min, max) per head, α = exp(−A·dt) with A ~ U(1, 16)
    # (Mamba2's range by default). A task whose facts must survive many sleep passes needs slow decay
    # from the start, or the gradient never reaches the facts.
    gdn_dt_min: float = 1e-3
    gdn_dt_max: float = 1e-1
    # The lagged construction this model was trained with (docs/design.md). "re-prefill": at each boundary
    # the completed chunk is run once more from M_{j-1}, so its keys and values are pass 1 of its
    # sleep. "stale-kv": it keeps the keys and values of its own decoding and the fast weights restart
    # from the memory, so a boundary recomputes nothing; the completed chunk then reaches the network
    # only through the first block's attention, which needs that block to be the only attention block.
    lagged_construction: Construction = "re-prefill"
    # Trained with chunk lengths drawn from [window // 2, window]: the server may consolidate early.
    variable_chunks: bool = False
    # Blocks [first, last) that loop N times in a sleep; the others run once, those before in the first
    # pass and those after in the last (the paper looped the middle half of Jet-Nemotron's). None: all.
    sleep_blocks: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        bad = [kind for kind in self.layers if kind not in LAYER_KINDS]
        if bad or not self.layers:
            raise ValueError(f"layers must be a non-empty list of {LAYER_KINDS}, got {self.layers}")
        if self.window < 1 or self.sleep_passes < 1:
            raise ValueError("window and sleep_passes must be positive")
        if self.lagged_construction not in CONSTRUCTIONS:
            raise ValueError(f"unknown lagged_construction {self.lagged_construction!r}")
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("mlp", self.mlp, MLPS),
            ("gdn_conv_state", self.gdn_conv_state, CONV_STATES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.n_heads % self.n_kv_heads or self.gdn_heads % self.n_gdn_key_heads:
            raise ValueError("n_heads and gdn_heads must be multiples of kv_heads and gdn_key_heads")
        if not 0 < self.rope_dim <= self.head_dim or self.rope_dim % 2:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim], got {self.rotary_dim}")
        if self.sleep_blocks is not None:
            self.sleep_blocks = tuple(self.sleep_blocks)  # JSON gives a list
            first, last = self.sleep_blocks
            if not 0 <= first < last <= len(self.layers):
                raise ValueError(f"sleep_blocks must be [first, last) within the {len(self.layers)} blocks")
        if self.lagged_construction == "stale-kv" and (self.layers[0] != "attn" or "attn" in self.layers[1:]):
            raise ValueError(
                "lagged_construction stale-kv needs the first block, and only it, to be attention"
            )

    @property
    def lag(self) -> int:
        """Completed chunks that attention still sees: 0 for hard, 1 for lagged."""
        return 1 if self.schedule == "lagged" else 0

    @property
    def stale_kv(self) -> bool:
        """Whether the previous chunk stays in the window as stale keys and values (lagged only)."""
        return self.schedule == "lagged" and self.lagged_construction == "stale-kv"

    @property
    def window_capacity(self) -> int:
        """Most tokens the attention window ever holds: (lag + 1) × L."""
        return (self.lag + 1) * self.window

    @property
    def n_gdn(self) -> int:
        return self.layers.count("gdn")

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.n_heads

    @property
    def n_gdn_key_heads(self) -> int:
        return self.gdn_key_heads or self.gdn_heads

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def gdn_channels(self) -> int:
        """Channels of a gdn layer's short convolution: q, k (key heads) and v (value heads)."""
        return 2 * self.n_gdn_key_heads * self.gdn_key_dim + self.gdn_heads * self.gdn_value_dim

    def memory_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of one session's memory tensors (all float32): the fast weights [H, K, V] of each gdn
        layer, then, when the convolution state carries, its last inputs [conv_size - 1, channels]."""
        shapes: list[tuple[int, ...]] = [(self.gdn_heads, self.gdn_key_dim, self.gdn_value_dim)] * self.n_gdn
        if self.gdn_conv_state == "carry":
            shapes += [(self.conv_size - 1, self.gdn_channels)] * self.n_gdn
        return shapes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_json(Path(path).read_text())

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
