"""Checkpoints: one folder holding `model.safetensors` (weights) and `config.json` (ModelConfig)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.hybrid import HybridLM

WEIGHTS, CONFIG = "model.safetensors", "config.json"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "sleepy-mix"


def save_checkpoint(model: HybridLM, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(state, folder / WEIGHTS)
    model.config.save(folder / CONFIG)


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> HybridLM:
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint: it needs {WEIGHTS} and {CONFIG}")
    model = HybridLM(ModelConfig.load(folder / CONFIG))
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model.to(device).eval()


def fingerprint(model: HybridLM) -> str:
    """SHA-256 of the config and every weight: a session blob is only valid for this exact model."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
