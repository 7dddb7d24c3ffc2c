"""The native family: sleepserve's own checkpoints (`sleepserve train`), whose `config.json` is a
`ModelConfig` and whose weights carry our parameter names. Always sleep-trained."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from model.config import ModelConfig
from model.tokenizer import ByteTokenizer

NAME = "sleepy"
MODEL_TYPES = ("",)  # its config.json has no model_type


def model_config(raw: dict) -> tuple[ModelConfig, bool]:
    return ModelConfig.from_dict(raw), True


def weight_name(name: str) -> str | None:
    return name


def assemble(weights: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    return weights


def tokenizer(folder: Path) -> ByteTokenizer:
    return ByteTokenizer()


def split(weights: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    return weights


def trained_config(raw: dict, config: ModelConfig) -> dict:
    return config.to_dict()
