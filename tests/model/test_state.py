"""Session state blobs, checkpoints, config and tokenizer round trips."""

import json
import struct

import pytest
import torch

from model.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.hybrid import HybridLM
from model.session import feed, new_state, open_window
from model.state import SessionState, SessionStateError
from model.tokenizer import EOS, ByteTokenizer, StreamDecoder


@pytest.fixture(scope="module", params=["hard", "lagged"])
def model(request):
    torch.manual_seed(0)
    return HybridLM(ModelConfig(d_model=32, n_heads=2, head_dim=16, window=8, schedule=request.param)).eval()


def session_after(model, n_tokens: int, seed: int = 0) -> SessionState:
    state = new_state(model)
    tokens = torch.randint(0, 256, (n_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    feed(model, state, open_window(model, state)[0], tokens)
    state.sleep_seconds = 0.123456789  # a float that must survive exactly
    return state


def test_round_trip_is_bit_exact(model):
    state = session_after(model, 45)
    fp, capacity = fingerprint(model), model.config.window_capacity
    blob = state.to_bytes(fp, capacity)
    back = SessionState.from_bytes(blob, fp, model.config.schedule)
    assert len(back.to_bytes(fp, capacity)) == len(blob)  # (safetensors orders metadata keys freely)
    for a, b in zip(back.memory, state.memory, strict=True):
        assert torch.equal(a, b)
    fields = ("tail", "prev_len", "tokens_seen", "chunks_consolidated", "consolidated_tokens", "sleep_passes")
    for name in (*fields, "last_passes", "sleep_seconds", "schedule"):
        assert getattr(back, name) == getattr(state, name), name


def test_resumed_session_continues_identically(model):
    """Save, load, rebuild the window from the tail: the next logits are those of the live session."""
    state = new_state(model)
    cache = open_window(model, state)[0]
    _, cache, _ = feed(model, state, cache, list(range(60, 80)))
    live_logits, _, _ = feed(model, state.clone(), cache, [5])
    fp = fingerprint(model)
    resumed = SessionState.from_bytes(state.to_bytes(fp, model.config.window_capacity), fp)
    resumed_logits, _, _ = feed(model, resumed, open_window(model, resumed)[0], [5])
    assert (live_logits - resumed_logits).abs().max() < 1e-4


def test_blob_size_does_not_grow_with_the_conversation(model):
    fp, capacity = fingerprint(model), model.config.window_capacity
    short = session_after(model, 2 * model.config.window).to_bytes(fp, capacity)
    long = session_after(model, 20 * model.config.window + 3).to_bytes(fp, capacity)
    assert len(short) == len(long)


def test_blob_from_another_model_is_refused(model):
    blob = session_after(model, 10).to_bytes(fingerprint(model), model.config.window_capacity)
    torch.manual_seed(1)
    other = HybridLM(model.config)
    with pytest.raises(SessionStateError, match="written by model") as info:
        SessionState.from_bytes(blob, fingerprint(other))
    assert info.value.reason == "fingerprint"


def test_blob_of_another_schedule_is_refused(model):
    blob = session_after(model, 10).to_bytes(fingerprint(model), model.config.window_capacity)
    other = "hard" if model.config.schedule == "lagged" else "lagged"
    with pytest.raises(SessionStateError) as info:
        SessionState.from_bytes(blob, fingerprint(model), other)
    assert info.value.reason == "schedule"


def rewrite_header(blob: bytes, **changes) -> bytes:
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * ((-len(encoded)) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + blob[8 + size :]


def test_other_format_version_is_refused(model):
    blob = session_after(model, 10).to_bytes(fingerprint(model), model.config.window_capacity)
    with pytest.raises(SessionStateError, match="version") as info:
        SessionState.from_bytes(rewrite_header(blob, version="99"), fingerprint(model))
    assert info.value.reason == "version"


@pytest.mark.parametrize("where", ["payload", "counters", "header-json", "truncated", "not-a-blob"])
def test_corrupted_blob_is_refused(model, where):
    fp = fingerprint(model)
    state = session_after(model, 30)
    blob = bytearray(state.to_bytes(fp, model.config.window_capacity))
    if where == "payload":
        blob[-100] ^= 0x40  # a bit inside the tensor data
    elif where == "counters":
        blob = bytearray(rewrite_header(bytes(blob), schedule=state.schedule, checksum="0" * 64))
    elif where == "header-json":
        blob[12] = ord("}")
    elif where == "truncated":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray(b"hello world, this is not safetensors")
    with pytest.raises(SessionStateError) as info:
        SessionState.from_bytes(bytes(blob), fp)
    assert info.value.reason in {"checksum", "format"}


def test_checkpoint_round_trip(tmp_path, model):
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert fingerprint(loaded) == fingerprint(model)
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded(tokens, loaded.empty_memory(1)), model(tokens, model.empty_memory(1)))
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_config_json_round_trip_and_validation():
    config = ModelConfig(layers=["attn", "gdn", "gdn"], schedule="hard", window=32, variable_chunks=True)
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.window_capacity == 32 and config.replace(schedule="lagged").window_capacity == 64
    with pytest.raises(ValueError, match="schedule"):
        ModelConfig(schedule="soft")
    with pytest.raises(ValueError, match="layers"):
        ModelConfig(layers=["attn", "mamba"])
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"width": 3})


@pytest.mark.parametrize("text", ["", "hello", "naïve café ☕ 日本語 🦙", "\x00\n\t", "a" * 1000])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    stream = StreamDecoder()
    assert "".join(stream.push(i) for i in [*ids, EOS]) + stream.flush() == text


def test_chat_template_marks_roles():
    tok = ByteTokenizer()
    ids = tok.encode_chat([("system", "be brief"), ("user", "hi")])
    assert tok.decode(ids) == "be briefhi"
    assert ids[0] == 258 and ids[-1] == 260 and ids.count(261) == 2
