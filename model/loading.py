"""`load_model`: a checkpoint of any family (model/families) from a local folder or a Hugging Face hub id,
as a `HybridLM`, its tokenizer, and the serve-time sleep settings.

A folder holds `config.json` and the weights: `model.safetensors`, or shards listed by
`model.safetensors.index.json`. A hub id (`Qwen/Qwen3.5-0.8B`) is downloaded with
`huggingface_hub.snapshot_download` where the network allows; otherwise one error says how to pass a
local folder instead.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from model.families import family_of
from model.hybrid import HybridLM
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# What a download fetches: config, weights, tokenizer and chat template; never the other formats.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "*.model"]


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint at the path, and no way to download it."""


@dataclass
class LoadedModel:
    model: HybridLM
    tokenizer: Tokenizer
    family: str  # "sleepy" | "qwen3_5"
    path: str  # the local folder it was loaded from


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    window: int | None = None,
    schedule: str | None = None,
    sleep_passes: int | None = None,
    sleep_blocks: tuple[int, int] | None = None,
) -> LoadedModel:
    """Load a checkpoint in eval mode. `dtype`: the weights' (default float32 on CPU, bfloat16
    elsewhere; the gdn state is float32 either way). The sleep settings override the checkpoint's: a
    checkpoint not trained with sleep has none of its own (its family's defaults apply); a
    sleep-trained one records its own, and serving it with others is logged as a warning."""
    folder = resolve(path)
    raw = json.loads((folder / "config.json").read_text())
    family = family_of(raw)
    config, trained = family.model_config(raw)
    given = {
        "window": window,
        "schedule": schedule,
        "sleep_passes": sleep_passes,
        "sleep_blocks": sleep_blocks,
    }
    changes = {name: value for name, value in given.items() if value is not None}
    if trained:
        for name, value in changes.items():
            if name != "sleep_passes" and value != getattr(config, name):
                log.warning(
                    "%s was trained with %s=%r, serving it with %r",
                    folder,
                    name,
                    getattr(config, name),
                    value,
                )
    config = config.replace(**changes)
    if dtype is None:
        dtype = (
            torch.float32 if torch.device(device).type == "cpu" or family.NAME == "sleepy" else torch.bfloat16
        )
    weights: dict[str, Tensor] = {}
    for name, tensor in read_weights(folder):
        ours = family.weight_name(name)
        if ours is not None:
            weights[ours] = tensor
    weights = family.assemble(weights, config)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = HybridLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_embeddings:  # assign replaced both parameters: one again
        model.head.weight = model.embed.weight
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, family.tokenizer(folder), family.NAME, str(folder))


def save_model(model: HybridLM, source: str | Path, out: str | Path) -> None:
    """Save `model`, loaded from (and trained on) the checkpoint `source`, as `source` is laid out: the
    same tensor names in the same dtypes (in one file), those it skipped copied, the other files
    (tokenizer, chat template, generation config) copied, and `config.json` recording the model's
    sleep settings, which `load_model` then takes as its defaults."""
    source, out = resolve(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((source / "config.json").read_text())
    family = family_of(raw)
    ours = family.split(model.state_dict(), model.config)
    tensors = {}
    for name, original in read_weights(source):
        mine = family.weight_name(name)
        trained = original if mine is None else ours[mine]
        tensors[name] = trained.detach().to("cpu", original.dtype).contiguous()
    save_file(tensors, out / SINGLE)
    for path in source.iterdir():
        if path.is_file() and path.name not in ("config.json", INDEX) and path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)
    (out / "config.json").write_text(json.dumps(family.trained_config(raw, model.config), indent=2) + "\n")


def resolve(path: str | Path) -> Path:
    """The local folder of a checkpoint: `path` itself, or the download of a hub id."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file() or not (
            (folder / SINGLE).is_file() or (folder / INDEX).is_file()
        ):
            raise ModelNotFoundError(
                f"{folder} is not a checkpoint: it needs config.json and {SINGLE} or {INDEX}"
            )
        return folder
    repo_id = str(path)
    if folder.is_absolute() or repo_id.startswith(".") or repo_id.count("/") != 1:
        raise ModelNotFoundError(
            f"no checkpoint folder at {path} (and it is not a hub id such as Qwen/Qwen3.5-0.8B)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated, interrupted: one message for all
        raise ModelNotFoundError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}: {exc}). Download it "
            f"where the network allows (`hf download {repo_id} --local-dir DIR`) and pass the folder: "
            f"--model DIR"
        ) from exc


def read_weights(folder: Path):
    """(name, tensor) of every tensor of the checkpoint, one shard at a time."""
    if (folder / INDEX).is_file():
        shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    else:
        shards = [SINGLE]
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, tensors.get_tensor(name)
