"""Tiny Qwen3.5 checkpoints for tests: random weights from transformers' own `Qwen3_5ForCausalLM`, saved
with `save_pretrained`, and a small byte-level BPE tokenizer with a ChatML chat template. Nothing is
downloaded. Used by tests/model (parity with transformers) and tests/server (serving a real family).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 2+2? It is 4. Sleep consolidates the window into fast weights.",
    "Hello, world! Café, naïve, 東京, emoji 🙂 and more text to merge into tokens.",
    "user assistant system: a conversation goes on and on, one turn after another.",
]
SPECIAL_IDS = {name: i for i, name in enumerate(SPECIAL)}  # trainers put special tokens first
VOCAB = 320  # the model's; the tokenizer uses fewer ids


def make_tokenizer(folder: str | Path, vocab_size: int = 300) -> None:
    """A byte-level BPE (any text round-trips; a character may span tokens) with ChatML special tokens
    and chat template, saved as transformers saves a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(str(folder))


def text_config(grouped: bool = True, tied: bool = False, layers: int = 4):
    """A tiny Qwen3.5 text config: full attention every 4th layer, GQA, partial RoPE (8 of 32 dims), and
    value-head grouping (4 value heads on 2 key heads) when `grouped`."""
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4 if grouped else 2,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        tie_word_embeddings=tied,
        initializer_range=0.1,  # livelier than 0.02: logits far enough apart for greedy parity
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        eos_token_id=[SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]],
    )


def make_checkpoint(
    folder: str | Path, *, grouped: bool = True, tied: bool = False, layout: str = "text", seed: int = 0
) -> Path:
    """A tiny random Qwen3.5 checkpoint with its tokenizer in `folder`. layout "text": what
    `Qwen3_5ForCausalLM.save_pretrained` writes (`model.layers.*`); "vlm": a `qwen3_5` checkpoint as
    the Hub ships them (`text_config`, `model.language_model.*` in two shards, with `model.visual.*` and
    `mtp.*` tensors the loader must skip). The zero- and one-initialised norms and gates get noise so a
    mix-up between them cannot pass."""
    from transformers import GenerationConfig, Qwen3_5ForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    config = text_config(grouped, tied)
    model = Qwen3_5ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "dt_bias")):
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(str(folder))
    GenerationConfig(eos_token_id=config.eos_token_id).save_pretrained(str(folder))
    make_tokenizer(folder)
    if layout == "vlm":
        _to_vlm_layout(folder)
    return folder


def _to_vlm_layout(folder: Path) -> None:
    """Rewrite a text checkpoint as the Hub's `qwen3_5` VLM layout, in two shards."""
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    renamed = {name.replace("model.", "model.language_model.", 1): t for name, t in weights.items()}
    renamed["model.visual.patch_embed.proj.weight"] = torch.zeros(8, 3)
    renamed["mtp.fc.weight"] = torch.zeros(8, 8)
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, members in shards.items():
        save_file({name: renamed[name].contiguous() for name in members}, folder / file)
        weight_map |= dict.fromkeys(members, file)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    text = json.loads((folder / "config.json").read_text())
    text.pop("architectures", None)
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": {"depth": 1},
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def hf_model(folder: str | Path):
    """transformers' own `Qwen3_5ForCausalLM` on a checkpoint of `make_checkpoint` (fp32, eval)."""
    from transformers import Qwen3_5ForCausalLM

    return Qwen3_5ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
