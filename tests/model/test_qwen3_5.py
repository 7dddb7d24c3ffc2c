"""The qwen3_5 family against transformers' own `Qwen3_5ForCausalLM` on the same random weights (tiny
checkpoints saved with `save_pretrained`, tests/qwen_support.py): while a sequence fits in the window
our model is the same function, whatever the key layout, value-head grouping and embedding tying."""

from __future__ import annotations

import copy

import pytest
import torch
from qwen_support import make_checkpoint
from transformers import DynamicCache, Qwen3_5ForCausalLM

from model.hybrid import HybridLM, WindowCache
from model.loading import LoadedModel, load_model
from model.session import feed, generate, new_state, open_window

TOL = 1e-4
VARIANTS = {  # name: make_checkpoint arguments
    "text": {"grouped": True, "tied": False, "layout": "text"},
    "text-ungrouped-tied": {"grouped": False, "tied": True, "layout": "text"},
    "vlm": {"grouped": True, "tied": True, "layout": "vlm"},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory) -> tuple[LoadedModel, Qwen3_5ForCausalLM]:
    folder = make_checkpoint(tmp_path_factory.mktemp(request.param), seed=1, **VARIANTS[request.param])
    ref = Qwen3_5ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return load_model(folder, window=96), ref


def served(loaded: LoadedModel, **settings) -> HybridLM:
    """The fixture's model with other sleep settings (a shallow copy: the same weights)."""
    model = copy.copy(loaded.model)
    model.config = model.config.replace(**settings)
    return model


def tokens(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


def gdn_states(ref_cache: DynamicCache, layer_types: list[str], row: int = 0):
    """transformers' (recurrent, conv) states of each linear-attention layer, conv as our [W-1, C]."""
    layers = [ref_cache.layers[i] for i, kind in enumerate(layer_types) if kind == "linear_attention"]
    return [(layer.recurrent_states[0][row], layer.conv_states[0][row, :, 1:].T) for layer in layers]


def our_states(cache: WindowCache, row: int = 0):
    return [(layer.fast[row], layer.conv[row]) for layer in cache.layers if hasattr(layer, "fast")]


@torch.no_grad()
def test_config_and_weights_map_onto_the_blocks(pair) -> None:
    loaded, ref = pair
    config, text = loaded.model.config, ref.config
    assert loaded.family == "qwen3_5"
    assert config.layers == ["attn" if t == "full_attention" else "gdn" for t in text.layer_types]
    assert (config.rotary_dim, config.kv_heads, config.gdn_key_heads) == (
        8,
        text.num_key_value_heads,
        text.linear_num_key_heads,
    )
    assert config.tie_embeddings == text.tie_word_embeddings
    if config.tie_embeddings:
        assert loaded.model.head.weight is loaded.model.embed.weight


@torch.no_grad()
def test_prefill_logits_and_states_equal_transformers(pair) -> None:
    loaded, ref = pair
    model, ids = loaded.model, tokens(70, batch=2)
    cache = DynamicCache(config=ref.config)
    expected = ref(input_ids=ids, cache=cache, use_cache=True).logits
    logits, window = model.extend(ids, model.open_window(model.empty_memory(2)))
    assert (logits - expected).abs().max() < TOL
    for row in range(2):
        for (fast, conv), (ref_fast, ref_conv) in zip(
            our_states(window, row), gdn_states(cache, ref.config.layer_types, row), strict=True
        ):
            assert fast.dtype == torch.float32
            assert (fast - ref_fast).abs().max() < TOL
            assert (conv - ref_conv).abs().max() < TOL


@torch.no_grad()
def test_token_by_token_decode_and_pieces_equal_transformers(pair) -> None:
    """A prompt fed in arbitrary pieces, then token by token: the logits of every position."""
    loaded, ref = pair
    model, ids = loaded.model, tokens(60)
    expected = ref(input_ids=ids).logits[0]
    window = model.open_window(model.empty_memory(1))
    got, start = [], 0
    for size in [5, 1, 13, 2, 9, 1, 1, 1, 1, 1, 7, 1, 1, 16]:
        logits, window = model.extend(ids[:, start : start + size], window)
        got.append(logits[0])
        start += size
    assert start == 60
    assert (torch.cat(got) - expected).abs().max() < TOL


@torch.no_grad()
def test_batch_of_sessions_at_different_lengths_decodes_together(pair) -> None:
    loaded, ref = pair
    model = loaded.model
    prompts = [tokens(n, seed=n)[0].tolist() for n in (3, 17, 40)]
    windows = []
    for prompt in prompts:  # each its own prefill, then one batch
        _, window = model.extend(torch.tensor([prompt]), model.open_window(model.empty_memory(1)))
        windows.append(window)
    batch = WindowCache.stack(windows)
    nexts = [[7, 11, 13], [19, 23, 29], [31, 37, 41]]
    for step in range(3):
        logits, batch = model.extend(torch.tensor([[n[step]] for n in nexts]), batch)
        for row, prompt in enumerate(prompts):
            sequence = torch.tensor([prompt + nexts[row][: step + 1]])
            assert (logits[row, -1] - ref(input_ids=sequence).logits[0, -1]).abs().max() < TOL


@torch.no_grad()
def test_64_greedy_tokens_identical_and_states_equal_the_cache(pair) -> None:
    loaded, ref = pair
    model, prompt = loaded.model, tokens(12)[0].tolist()
    state = new_state(model)
    ours, window = generate(model, state, prompt, 64)
    cache = DynamicCache(config=ref.config)
    logits = ref(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True).logits
    theirs = []
    for _ in range(64):
        theirs.append(int(logits[0, -1].argmax()))
        logits = ref(input_ids=torch.tensor([theirs[-1:]]), cache=cache, use_cache=True).logits
    assert ours == theirs
    assert len(set(ours)) > 3  # not a degenerate repetition that any model would produce
    for (fast, conv), (ref_fast, ref_conv) in zip(
        our_states(window), gdn_states(cache, ref.config.layer_types), strict=True
    ):
        assert (fast - ref_fast).abs().max() < TOL
        assert (conv - ref_conv).abs().max() < TOL


@torch.no_grad()
def test_hard_one_pass_past_the_window_equals_transformers_window_by_window(pair) -> None:
    """N = 1 `hard` over 3.5 windows equals transformers' own layers run window by window: attention
    restarts (positions from 0, a fresh KV cache) and the linear-attention layers carry their
    recurrent and convolution states across the boundary."""
    loaded, ref = pair
    window = 24
    model = served(loaded, window=window, schedule="hard", sleep_passes=1)
    ids = tokens(84)
    state = new_state(model)
    cache, _ = open_window(model, state)
    logits, _, reports = feed(model, state, cache, ids[0].tolist(), passes=1, return_all=True)
    assert len(reports) == 3

    expected, carried = [], None
    for start in range(0, 84, window):
        chunk = ids[:, start : start + window]
        ref_cache = DynamicCache(config=ref.config)
        if carried is not None:  # the linear-attention layers continue; attention starts empty
            for i, kind in enumerate(ref.config.layer_types):
                if kind == "linear_attention":
                    ref_cache.layers[i] = carried.layers[i]
        positions = torch.arange(chunk.shape[1])[None]
        expected.append(
            ref(input_ids=chunk, cache=ref_cache, position_ids=positions, use_cache=True).logits[0]
        )
        carried = ref_cache
    assert (logits - torch.cat(expected)).abs().max() < TOL


@torch.no_grad()
def test_sleep_of_one_pass_is_the_wake_pass_with_its_convolution_history(pair) -> None:
    """`sleep(memory, chunk, 1)` leaves the memory the window reached over the chunk: the fast weights
    and the convolution's last inputs (carried, docs/models.md), from a memory that already has both."""
    model = pair[0].model
    first, chunk = tokens(30, seed=1), tokens(24, seed=2)
    _, window = model.extend(first, model.open_window(model.empty_memory(1)))
    memory = model.window_memory(window)
    assert len(memory) == 2 * model.config.n_gdn and memory[-1].abs().sum() > 0
    _, window = model.extend(chunk, model.open_window(memory))
    for slept, woken in zip(model.sleep(memory, chunk, 1), model.window_memory(window), strict=True):
        assert (slept - woken).abs().max() < TOL


@torch.no_grad()
def test_lagged_window_rebuilt_from_the_state_equals_the_live_one(pair) -> None:
    """Past two boundaries of `lagged` (re-prefill) N = 2, the window is a function of (memory, tail):
    rebuilding it from the session state gives the live window's next logits."""
    model = served(pair[0], window=16, schedule="lagged", sleep_passes=2)
    state = new_state(model)
    cache, _ = open_window(model, state)
    logits, cache, reports = feed(model, state, cache, tokens(45)[0].tolist(), passes=2)
    assert len(reports) == 1 and state.memory[-1].abs().sum() > 0  # the conv history is in the memory
    _, rebuilt = open_window(model, state.clone())
    assert (rebuilt - logits).abs().max() < TOL


@torch.no_grad()
def test_bf16_weights_keep_float32_state(pair) -> None:
    """bf16 weights: the gdn state stays float32 (window, memory, sleep), and the logits are as close to
    float32's as transformers' own in bf16 are."""
    loaded, ref = pair
    model = load_model(loaded.path, dtype=torch.bfloat16, window=64).model
    assert model.embed.weight.dtype == torch.bfloat16
    ids, memory = tokens(40), model.empty_memory(1)
    logits, window = model.extend(ids, model.open_window(memory))
    assert all(m.dtype == torch.float32 for m in model.window_memory(window))
    assert all(m.dtype == torch.float32 for m in model.sleep(memory, ids, 2))
    exact = ref(input_ids=ids).logits
    theirs = (
        Qwen3_5ForCausalLM.from_pretrained(loaded.path, dtype=torch.bfloat16).eval()(input_ids=ids).logits
    )
    ours_error, their_error = ((x.float() - exact).abs().mean() for x in (logits, theirs))
    assert ours_error < 1.5 * their_error


@torch.no_grad()
def test_each_sleep_pass_continues_the_convolution_where_the_last_one_ended(pair) -> None:
    """N = 2 written out with the block modules: the convolution history is recurrent state like the
    fast weights, so pass 2 starts from pass 1's, and the new memory keeps pass 2's (docs/models.md)."""
    model = pair[0].model
    memory = [torch.randn_like(m) * 0.1 for m in model.empty_memory(1)]
    chunk = tokens(24, seed=3)
    fast, conv = model.split_memory(memory)
    h = model.embed(chunk)
    for _ in range(2):
        for i, block in enumerate(model.blocks):
            if block.kind == "attn":
                h = block.attend(h)
            else:
                j = model.gdn_index[i]
                y, fast[j], conv[j] = block.mixer(block.mixer_norm(h), fast[j], conv[j])
                h = h + y
            h = block.feed_forward(h)
    for slept, expected in zip(model.sleep(memory, chunk, 2), fast + conv, strict=True):
        assert (slept - expected).abs().max() < 1e-6
