"""Session blobs are untrusted input: every class of crafted blob is refused with a reason that names
the problem, a blob that passes runs on the model, and signed blobs demand the server's key."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from support import forge_blob

from model.checkpoint import fingerprint
from model.config import ModelConfig
from model.hybrid import HybridLM
from model.session import feed, new_state, open_window
from model.state import SessionState, SessionStateError, StateSpec

KEY = b"server-key"


@pytest.fixture(scope="module", params=["hard", "lagged"])
def model(request) -> HybridLM:
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_heads=2, head_dim=16, window=8, schedule=request.param)
    return HybridLM(config).eval()


def blob_after(model: HybridLM, n_tokens: int = 21, key: bytes | None = None) -> bytes:
    state = new_state(model)
    feed(model, state, open_window(model, state)[0], list(range(40, 40 + n_tokens)))
    return state.to_bytes(fingerprint(model), model.config.window_capacity, key)


def counters(**values: int) -> Callable[[dict[str, torch.Tensor]], None]:
    names = ("tokens_seen", "chunks_consolidated", "consolidated_tokens", "sleep_passes", "last_passes")
    index = {name: i for i, name in enumerate((*names, "prev_len", "tail_len"))}

    def change(tensors: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            tensors["counters"][index[name]] = value

    return change


def set_tail(position: int, token: int) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors["tail"].__setitem__(position, token)


def set_memory(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors["memory.0"].view(-1).__setitem__(3, value)


def put(name: str, tensor: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(name, tensor)


CRAFTED = {
    "tail token >= vocab": (set_tail(0, 100_000), "tail token ids"),
    "tail token = vocab": (set_tail(0, 272), "tail token ids"),
    "negative tail token": (set_tail(0, -5), "tail token ids"),
    "wrong memory shape": (lambda t: t.__setitem__("memory.0", torch.zeros(2, 32, 16)), "shape"),
    "memory of another dtype": (lambda t: t.__setitem__("memory.0", t["memory.0"].double()), "float32"),
    "inf memory": (set_memory(float("inf")), "non-finite"),
    "nan memory": (set_memory(float("nan")), "non-finite"),
    "missing memory tensor": (lambda t: t.pop("memory.0"), "tensors"),
    "extra memory tensor": (put("memory.1", torch.zeros(2, 32, 32)), "memory tensors"),
    "stray memory tensor": (put("memory.9", torch.zeros(2, 32, 32)), "tensors"),
    "extra tensor": (put("payload", torch.zeros(4)), "tensors"),
    "missing counters": (lambda t: t.pop("counters"), "tensors"),
    "0-d counters": (put("counters", torch.tensor(3)), "counters"),
    "short counters": (put("counters", torch.zeros(3, dtype=torch.int64)), "counters"),
    "negative tail_len": (counters(tail_len=-1), "negative"),
    "negative tokens_seen": (counters(tokens_seen=-3), "negative"),
    "negative prev_len": (counters(prev_len=-8), "negative"),
    "tail_len past the tail": (counters(tail_len=10_000), "tail_len"),
    "prev_len past tail_len": (counters(prev_len=20), "prev_len"),
    "tokens_seen inconsistent": (counters(tokens_seen=1_000_000), "tokens_seen"),
    "more chunks than tokens": (counters(chunks_consolidated=100), "chunks"),
    "last_passes past sleep_passes": (counters(last_passes=1000), "passes"),
    "tokens hidden in the padding": (set_tail(-1, 7), "padding"),
    "nan sleep_seconds": (
        put("sleep_seconds", torch.tensor([float("nan")], dtype=torch.float64)),
        "sleep_seconds",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_blob_is_refused_naming_the_problem(model, case):
    change, fragment = CRAFTED[case]
    good = blob_after(model)
    SessionState.from_bytes(good, fingerprint(model), spec=StateSpec.of(model))  # the original passes
    with pytest.raises(SessionStateError) as info:
        SessionState.from_bytes(forge_blob(good, change), fingerprint(model), spec=StateSpec.of(model))
    assert info.value.reason == "invalid"
    assert fragment in str(info.value)


def test_a_full_chunk_or_an_overlong_tail_is_refused(model):
    """Counters that contradict the schedule: a state the engine would never store."""
    window, spec = model.config.window, StateSpec.of(model)
    state = new_state(model)
    state.tail, state.tokens_seen = [1] * window, window  # a full current chunk, not consolidated
    with pytest.raises(SessionStateError, match="full chunk"):
        state.check(spec)
    state = new_state(model)
    state.tail, state.prev_len, state.tokens_seen = [1] * 3, 2, 3
    if model.config.schedule == "hard":
        with pytest.raises(SessionStateError, match="prev_len"):
            state.check(spec)
    else:
        state.check(spec)  # lagged keeps the previous chunk visible


def test_header_checksum_and_truncation_are_refused(model):
    fp, good = fingerprint(model), blob_after(model)
    damaged = bytearray(good)
    damaged[-3] ^= 0x10  # a bit of tensor data, checksum not recomputed
    truncated = good[: len(good) - 40]
    for blob, reason in [(bytes(damaged), "checksum"), (truncated, "checksum"), (b"\xff" * 7, "format")]:
        with pytest.raises(SessionStateError) as info:
            SessionState.from_bytes(blob, fp, spec=StateSpec.of(model))
        assert info.value.reason == reason


def test_signed_blobs(model):
    fp, spec = fingerprint(model), StateSpec.of(model)
    signed = blob_after(model, key=KEY)
    state = SessionState.from_bytes(signed, fp, spec=spec, signing_key=KEY)
    assert state.tokens_seen == 21
    SessionState.from_bytes(signed, fp, spec=spec)  # a server without a key reads it too
    unsigned = blob_after(model)
    resigned = forge_blob(signed, set_tail(0, 1))  # contents changed, the old signature dropped
    for blob, key in [(unsigned, KEY), (resigned, KEY), (signed, b"another key")]:
        with pytest.raises(SessionStateError, match="signature") as info:
            SessionState.from_bytes(blob, fp, spec=spec, signing_key=key)
        assert info.value.reason == "signature"


def test_memory_is_checked_against_the_models_own_layout():
    """The spec comes from the model's `empty_memory`, not from fixed numbers: a model with other gdn
    dimensions refuses the first model's blob."""
    torch.manual_seed(0)
    small = HybridLM(ModelConfig(d_model=32, n_heads=2, head_dim=16, window=8)).eval()
    wide = HybridLM(ModelConfig(d_model=32, n_heads=2, head_dim=16, window=8, gdn_value_dim=16)).eval()
    blob = blob_after(small)
    with pytest.raises(SessionStateError, match="shape"):
        SessionState.from_bytes(blob, fingerprint(small), spec=StateSpec.of(wide))
