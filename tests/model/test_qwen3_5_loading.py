"""Loading checkpoints of both families (model/loading.py) and the Hugging Face tokenizer behind the
`Tokenizer` interface: chat ids equal `apply_chat_template`, streaming never breaks a character."""

from __future__ import annotations

import json
import logging
import re

import huggingface_hub.constants
import pytest
import torch
from qwen_support import SPECIAL_IDS, make_checkpoint, make_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.families import qwen3_5
from model.loading import ModelNotFoundError, load_model
from model.session import new_state
from model.state import SessionState
from model.tokenizer import ByteTokenizer, HFTokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in 東京, with 🙂?"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen"), layout="vlm", tied=True)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder)
    return folder


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_equal_apply_chat_template(tokenizer_folder, add_generation_prompt) -> None:
    ours = HFTokenizer(tokenizer_folder)
    theirs = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    expected = theirs.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours.encode_chat(CONVERSATION, add_generation_prompt) == expected
    as_pairs = [(m["role"], m["content"]) for m in CONVERSATION]
    assert ours.encode_chat(as_pairs, add_generation_prompt) == expected
    assert ours.decode(expected).startswith("system\nYou are terse.")  # special tokens skipped


def test_stream_decoder_never_emits_a_broken_character(tokenizer_folder) -> None:
    tokenizer = HFTokenizer(tokenizer_folder)
    text = "Café naïve 東京 🙂 and the quick brown fox"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(bool(piece) for piece in pieces) > len(pieces) // 2  # it streams, not all at the end


def test_stop_tokens_from_generation_config_and_tokenizer(checkpoint) -> None:
    tokenizer = load_model(checkpoint).tokenizer
    assert tokenizer.eos_ids == {SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]}
    assert tokenizer.vocab_size == len(AutoTokenizer.from_pretrained(str(checkpoint)))


def test_byte_tokenizer_keeps_its_chat_format_for_both_message_forms() -> None:
    tokenizer = ByteTokenizer()
    pairs = [(m["role"], m["content"]) for m in CONVERSATION]
    assert tokenizer.encode_chat(CONVERSATION) == tokenizer.encode_chat(pairs)
    stream = tokenizer.stream_decoder()
    ids = tokenizer.encode("東京")
    assert [stream.push(i) for i in ids] == ["", "", "東", "", "", "京"]


def test_vlm_checkpoint_skips_vision_and_mtp_and_uses_serve_defaults(checkpoint) -> None:
    loaded = load_model(checkpoint)
    config = loaded.model.config
    assert (loaded.family, loaded.path) == ("qwen3_5", str(checkpoint))
    assert {name: getattr(config, name) for name in qwen3_5.SERVE_DEFAULTS} == qwen3_5.SERVE_DEFAULTS
    assert config.lagged_construction == "re-prefill"  # attention is not the first block
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert loaded.model.head.weight is loaded.model.embed.weight


def test_overrides_apply_and_a_sleep_trained_checkpoint_records_its_own(checkpoint, tmp_path, caplog) -> None:
    model = load_model(checkpoint, window=32, schedule="hard", sleep_passes=3, sleep_blocks=(1, 3)).model
    assert (model.config.window, model.config.schedule, model.config.sleep_passes) == (32, "hard", 3)
    assert model.config.sleep_blocks == (1, 3)
    trained = tmp_path / "trained"
    trained.mkdir()
    for path in checkpoint.iterdir():
        (trained / path.name).write_bytes(path.read_bytes())
    raw = json.loads((trained / "config.json").read_text())
    raw["sleepserve"] = {"window": 48, "schedule": "hard", "sleep_passes": 2}
    (trained / "config.json").write_text(json.dumps(raw))
    assert load_model(trained).model.config.window == 48
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        assert load_model(trained, window=64).model.config.window == 64
    assert "trained with window=48" in caplog.text


def test_unexpected_tensor_is_refused_by_name(tmp_path) -> None:
    folder = make_checkpoint(tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.linear_attn.surprise"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape("model.layers.0.linear_attn.surprise")):
        load_model(folder)


def test_unsupported_model_type_names_the_supported_ones(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'llama'.*qwen3_5"):
        load_model(tmp_path)


def test_offline_hub_id_gives_one_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="pass the folder: --model DIR"):
        load_model("sleepserve-tests/no-such-model")
    with pytest.raises(ModelNotFoundError, match="not a checkpoint"):
        load_model(tmp_path)


def test_native_checkpoint_loads_as_the_sleepy_family() -> None:
    loaded = load_model(DEFAULT_CHECKPOINT)
    assert loaded.family == "sleepy" and isinstance(loaded.tokenizer, ByteTokenizer)
    native = load_checkpoint(DEFAULT_CHECKPOINT)
    assert loaded.model.config == native.config
    for (name, ours), (_, theirs) in zip(
        loaded.model.state_dict().items(), native.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name


def test_session_blob_holds_the_convolution_history_at_a_fixed_size(checkpoint) -> None:
    model = load_model(checkpoint, window=16).model
    state = new_state(model)
    assert [tuple(m.shape) for m in state.memory] == model.config.memory_shapes()
    empty = state.to_bytes("f", model.config.window_capacity)
    state.memory = [torch.randn(shape) for shape in model.config.memory_shapes()]
    state.tail = [5, 6, 7]
    state.tokens_seen = len(state.tail)  # consistent counters: a blob is validated on the way back
    blob = state.to_bytes("f", model.config.window_capacity)
    assert len(blob) == len(empty)
    back = SessionState.from_bytes(blob, "f")
    assert all(torch.equal(a, b) for a, b in zip(back.memory, state.memory, strict=True))
