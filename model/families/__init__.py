"""Checkpoint families: each maps its checkpoints' `config.json` and weight names onto `ModelConfig` and
`HybridLM` (one implementation of the blocks), and names its tokenizer. docs/models.md says how to add
one. A family module provides:

- `NAME`, and `MODEL_TYPES`: the `model_type` values of `config.json` it reads;
- `model_config(raw) -> (ModelConfig, sleep_trained)`: the config, with the checkpoint's own sleep
  settings where it records them (`sleep_trained`), else the family's serve-time defaults;
- `weight_name(name) -> str | None`: our parameter name for a checkpoint tensor, None to skip it;
- `assemble(weights, config) -> weights`: the last renames that need several tensors (fusions);
- `tokenizer(folder) -> Tokenizer`;
- `split(weights, config) -> weights`: `assemble` undone, for saving in the checkpoint's own names;
- `trained_config(raw, config) -> raw`: the checkpoint's `config.json` recording the sleep settings
  it was trained with (`sleepserve train --init-from`).
"""

from __future__ import annotations

from types import ModuleType

from model.families import qwen3_5, sleepy

FAMILIES: tuple[ModuleType, ...] = (sleepy, qwen3_5)


def family_of(raw: dict) -> ModuleType:
    """The family of a checkpoint's `config.json` (no `model_type`: a native sleepy checkpoint)."""
    model_type = raw.get("model_type", sleepy.MODEL_TYPES[0])
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    known = sorted(t for family in FAMILIES for t in family.MODEL_TYPES if t)
    raise ValueError(f"unsupported model_type {model_type!r}: sleepserve serves {', '.join(known)}")
