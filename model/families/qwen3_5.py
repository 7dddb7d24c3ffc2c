"""Qwen3.5 (dense): Gated DeltaNet and gated attention, 3:1 (`model_type` `qwen3_5`, the Hub's
vision-language checkpoints, whose text model is under `text_config` and `model.language_model.*`;
and `qwen3_5_text`, `Qwen3_5ForCausalLM`'s, under `model.*`). The vision tower (`model.visual.*`) and
the multi-token-prediction head (`mtp.*`) are skipped. research/real-models.md §2 has the layers.

A checkpoint that was not trained with sleep gets the serve-time settings of `load_model` (defaults:
`SERVE_DEFAULTS`); one that was records them in its `config.json` under "sleepserve".
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from model.config import ModelConfig
from model.tokenizer import HFTokenizer

NAME = "qwen3_5"
MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
# lagged N = 1 is the plain model with attention over the last window to two windows of tokens, and
# the recurrent state exactly transformers' (docs/models.md).
SERVE_DEFAULTS = {"window": 2048, "schedule": "lagged", "sleep_passes": 1, "sleep_blocks": None}
SLEEP_SETTINGS = "sleepserve"  # the config.json key of a sleep-trained checkpoint's settings
SLEEP_KEYS = (*SERVE_DEFAULTS, "variable_chunks")

_LAYER = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.(.+)$")
_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.language_model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.language_model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
_IN_LAYER = {
    "input_layernorm.weight": "mixer_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
    # q, k and v are fused by `assemble` into mixer.qkv.weight
    "self_attn.q_proj.weight": "mixer.q_proj.weight",
    "self_attn.k_proj.weight": "mixer.k_proj.weight",
    "self_attn.v_proj.weight": "mixer.v_proj.weight",
    "self_attn.o_proj.weight": "mixer.out.weight",
    "self_attn.q_norm.weight": "mixer.q_norm.weight",
    "self_attn.k_norm.weight": "mixer.k_norm.weight",
    "linear_attn.in_proj_qkv.weight": "mixer.qkv.weight",
    "linear_attn.in_proj_z.weight": "mixer.gate_proj.weight",
    "linear_attn.in_proj_a.weight": "mixer.decay_proj.weight",
    "linear_attn.in_proj_b.weight": "mixer.beta_proj.weight",
    "linear_attn.conv1d.weight": "mixer.conv.weight",
    "linear_attn.dt_bias": "mixer.dt_bias",
    "linear_attn.A_log": "mixer.A_log",
    "linear_attn.norm.weight": "mixer.out_norm.weight",
    "linear_attn.out_proj.weight": "mixer.out.weight",
}


def model_config(raw: dict) -> tuple[ModelConfig, bool]:
    text = raw.get("text_config", raw) if raw.get("model_type") == "qwen3_5" else raw
    if text.get("hidden_act", "silu") != "silu" or text.get("attention_bias", False):
        raise ValueError("this Qwen3.5 checkpoint uses an activation or attention bias sleepserve does not")
    rope = dict(text.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r} is not supported (only the default)")
    head_dim = text.get("head_dim", 256)
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    layer_types = text.get("layer_types") or [
        "full_attention" if (i + 1) % text.get("full_attention_interval", 4) == 0 else "linear_attention"
        for i in range(text["num_hidden_layers"])
    ]
    trained = SLEEP_SETTINGS in raw
    recorded = raw.get(SLEEP_SETTINGS, {})
    if set(recorded) - set(SLEEP_KEYS):
        raise ValueError(
            f"unknown sleep settings {sorted(set(recorded) - set(SLEEP_KEYS))}: known {SLEEP_KEYS}"
        )
    sleep = {**SERVE_DEFAULTS, **recorded}
    config = ModelConfig(
        family=NAME,
        vocab_size=text["vocab_size"],
        d_model=text["hidden_size"],
        layers=["attn" if kind == "full_attention" else "gdn" for kind in layer_types],
        n_heads=text["num_attention_heads"],
        head_dim=head_dim,
        kv_heads=text["num_key_value_heads"],
        rotary_dim=int(head_dim * partial),
        attn_output_gate=True,
        qk_norm=True,
        gdn_heads=text["linear_num_value_heads"],
        gdn_key_heads=text["linear_num_key_heads"],
        gdn_key_dim=text["linear_key_head_dim"],
        gdn_value_dim=text["linear_value_head_dim"],
        gdn_l2norm_eps=1e-6,
        gdn_chunk_size=64,  # transformers' and fla's: the same sums in the same order
        conv_size=text["linear_conv_kernel_dim"],
        gdn_conv_state="carry",
        mlp="swiglu",
        mlp_hidden=text["intermediate_size"],
        norm="zero-centred",
        tie_embeddings=bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))),
        rope_base=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        norm_eps=text.get("rms_norm_eps", 1e-6),
        # Attention at layers 3, 7, …: stale-kv needs the first block, and only it, to be attention.
        lagged_construction="re-prefill",
        **sleep,
    )
    return config, trained


def weight_name(name: str) -> str | None:
    if name.startswith(("mtp.", "model.visual.")):
        return None
    if name in _TOP:
        return _TOP[name]
    match = _LAYER.match(name)
    if match is None or match.group(2) not in _IN_LAYER:
        raise ValueError(f"unexpected tensor {name!r} in a Qwen3.5 checkpoint")
    return f"blocks.{match.group(1)}.{_IN_LAYER[match.group(2)]}"


def assemble(weights: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Fuse each attention block's q_proj, k_proj and v_proj into one projection (the gpt-fast way:
    one matmul); tie the head to the embedding where the checkpoint does."""
    for i, kind in enumerate(config.layers):
        if kind == "attn":
            parts = [weights.pop(f"blocks.{i}.mixer.{p}_proj.weight") for p in "qkv"]
            weights[f"blocks.{i}.mixer.qkv.weight"] = torch.cat(parts)
    if config.tie_embeddings:
        weights["head.weight"] = weights["embed.weight"]
    elif "head.weight" not in weights:
        raise ValueError("the checkpoint has no lm_head.weight and does not tie its embeddings")
    return weights


def split(weights: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """`assemble` undone: each attention block's fused projection back into q_proj ([query | gate] per
    head), k_proj and v_proj."""
    weights = dict(weights)
    kv = config.n_kv_heads * config.head_dim
    for i, kind in enumerate(config.layers):
        if kind == "attn":
            fused = weights.pop(f"blocks.{i}.mixer.qkv.weight")
            parts = fused.split([fused.shape[0] - 2 * kv, kv, kv])
            weights |= {f"blocks.{i}.mixer.{p}_proj.weight": t for p, t in zip("qkv", parts, strict=True)}
    return weights


def trained_config(raw: dict, config: ModelConfig) -> dict:
    settings = {key: getattr(config, key) for key in SLEEP_KEYS}
    if settings["sleep_blocks"] is not None:
        settings["sleep_blocks"] = list(settings["sleep_blocks"])
    return {**raw, SLEEP_SETTINGS: settings}


def tokenizer(folder: Path) -> HFTokenizer:
    return HFTokenizer(folder)
