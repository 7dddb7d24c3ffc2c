"""The hybrid LM and its sessions: decode vs prefill, sleep vs a naive Algorithm 1, batching, schedules."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from support import SCHEDULES

from model.config import ModelConfig
from model.hybrid import HybridLM, WindowCache
from model.session import feed, new_state, open_window, open_windows

SHAPES = {
    "small": dict(d_model=32, n_heads=2, head_dim=16, gdn_heads=2, gdn_key_dim=8, gdn_value_dim=16, window=8),
    "default-ish": dict(window=16, gdn_chunk_size=8),
    "deep": dict(
        d_model=48, layers=["attn", "gdn", "attn", "gdn", "gdn", "attn"], n_heads=3, head_dim=16, window=12
    ),
}


def make_model(
    shape: str, schedule: str, passes: int = 3, seed: int = 0, construction: str = "re-prefill"
) -> HybridLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        schedule=schedule, sleep_passes=passes, lagged_construction=construction, **SHAPES[shape]
    )
    model = HybridLM(config).eval()
    # Untrained decay gates forget within a few tokens; slow them so memory matters in these tests.
    for block in model.blocks:
        if block.kind == "gdn":
            block.mixer.A_log.data.fill_(math.log(0.5))
    return model


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# stale-kv needs the first block to be the only attention block.
DECODE_CASES = [
    (shape, schedule, construction)
    for shape in SHAPES
    for schedule, construction in SCHEDULES
    if construction != "stale-kv" or SHAPES[shape].get("layers", ["attn", "gdn"]).count("attn") == 1
]


@pytest.mark.parametrize("shape, schedule, construction", DECODE_CASES)
def test_decode_token_by_token_equals_prefill(shape, schedule, construction):
    model = make_model(shape, schedule, construction=construction)
    L = model.config.window
    tokens = random_tokens(4 * L + L // 2 + 1, seed=1)  # spans more than 4 windows

    one_shot = new_state(model)
    logits_prefill, cache_prefill, sleeps = feed(
        model, one_shot, open_window(model, one_shot)[0], tokens, return_all=True
    )

    stepped = new_state(model)
    cache = open_window(model, stepped)[0]
    logits_steps = []
    for token in tokens:
        logits, cache, _ = feed(model, stepped, cache, [token])
        logits_steps.append(logits)

    assert len(sleeps) == (4 if schedule == "hard" else 3)
    assert (torch.stack(logits_steps) - logits_prefill).abs().max() < 1e-4
    assert stepped.tail == one_shot.tail and stepped.prev_len == one_shot.prev_len
    for a, b in zip(stepped.memory, one_shot.memory, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(cache.fast_weights(), cache_prefill.fast_weights(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert stepped.chunks_consolidated == one_shot.chunks_consolidated == len(sleeps)


@pytest.mark.parametrize("schedule", ["hard", "lagged"])
def test_one_pass_equals_plain_hybrid(schedule):
    """N = 1 is the plain hybrid: the fast weights simply carry on from where the window's pass left them."""
    model = make_model("small", schedule, passes=1)
    L = model.config.window
    tokens = random_tokens(5 * L + 3, seed=2)
    state = new_state(model)
    slept_logits, _, _ = feed(model, state, open_window(model, state)[0], tokens, return_all=True)

    # Reference with no sleep call: windows run with model.forward, the next memory is read off the
    # wake pass itself (hard: the whole chunk; lagged: the previous chunk, the prefix of the window).
    memory, reference = model.empty_memory(1), []
    chunks = [tokens[i : i + L] for i in range(0, len(tokens), L)]
    for j, chunk in enumerate(chunks):
        previous = chunks[j - 1] if schedule == "lagged" and j > 0 else []
        window = torch.tensor([previous + chunk])
        reference.append(model(window, memory)[0, len(previous) :])
        carry = chunk if schedule == "hard" else previous
        if carry:
            _, memory = model.run_blocks(model.embed(torch.tensor([carry])), memory)
    assert (torch.cat(reference) - slept_logits).abs().max() < 1e-4


def naive_sleep(
    model: HybridLM, memory: list[torch.Tensor], chunk: list[int], passes: int
) -> list[torch.Tensor]:
    """Algorithm 1 written out token by token with explicit loops, using the design's S (V × K) layout."""
    c = model.config

    def rms(x, weight):
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + c.norm_eps) * weight

    def rope(x, pos):  # x: [H, D]
        half = x.shape[-1] // 2
        freqs = c.rope_base ** (-torch.arange(half) / half)
        cos, sin = torch.cos(pos * freqs), torch.sin(pos * freqs)
        return torch.cat([x[:, :half] * cos - x[:, half:] * sin, x[:, :half] * sin + x[:, half:] * cos], -1)

    S = [m[0].transpose(-1, -2).clone() for m in memory]  # [H, V, K]
    h = model.embed.weight[chunk]  # [T, d]
    T = len(chunk)
    for _ in range(passes):
        gdn_index = 0
        for block in model.blocks:
            x = rms(h, block.mixer_norm.weight)
            mixer = block.mixer
            if block.kind == "attn":
                H, D = c.n_heads, c.head_dim
                qkv = (x @ mixer.qkv.weight.T).view(T, 3, H, D)
                q = torch.stack([rope(qkv[t, 0], t) for t in range(T)])
                k = torch.stack([rope(qkv[t, 1], t) for t in range(T)])
                v = qkv[:, 2]
                out = torch.zeros(T, H, D)
                for t in range(T):
                    for head in range(H):
                        scores = torch.stack([q[t, head] @ k[j, head] for j in range(t + 1)]) / math.sqrt(D)
                        weights = torch.softmax(scores, dim=0)
                        out[t, head] = sum(weights[j] * v[j, head] for j in range(t + 1))
                y = out.view(T, H * D) @ mixer.out.weight.T
            else:
                H, K, V = c.gdn_heads, c.gdn_key_dim, c.gdn_value_dim
                proj = x @ mixer.qkv.weight.T  # [T, channels]
                kernel = mixer.conv.weight[:, 0]  # [channels, W]
                W = kernel.shape[1]
                conv = torch.zeros_like(proj)
                for t in range(T):
                    for i in range(W):
                        source = t - (W - 1) + i
                        if source >= 0:
                            conv[t] += kernel[:, i] * proj[source]
                conv = F.silu(conv)
                S_layer = S[gdn_index]
                out = torch.zeros(T, H, V)
                for t in range(T):
                    q_t = F.normalize(conv[t, : H * K].view(H, K), dim=-1)
                    k_t = F.normalize(conv[t, H * K : 2 * H * K].view(H, K), dim=-1)
                    v_t = conv[t, 2 * H * K :].view(H, V)
                    dt = F.softplus(x[t] @ mixer.decay_proj.weight.T + mixer.dt_bias)
                    alpha = torch.exp(-mixer.A_log.exp() * dt)
                    beta = torch.sigmoid(x[t] @ mixer.beta_proj.weight.T)
                    for head in range(H):
                        kk = k_t[head]
                        transition = torch.eye(K) - beta[head] * torch.outer(kk, kk)
                        S_layer[head] = alpha[head] * S_layer[head] @ transition + beta[head] * torch.outer(
                            v_t[head], kk
                        )
                        out[t, head] = S_layer[head] @ (q_t[head] * K**-0.5)
                normed = rms(out, mixer.out_norm.weight)
                gate = F.silu(x @ mixer.gate_proj.weight.T).view(T, H, V)
                y = (normed * gate).view(T, H * V) @ mixer.out.weight.T
                gdn_index += 1
            h = h + y
            hidden = rms(h, block.mlp_norm.weight)
            h = h + F.gelu(hidden @ block.mlp.up.weight.T) @ block.mlp.down.weight.T
    return [s.transpose(-1, -2)[None] for s in S]


@pytest.mark.parametrize("shape", ["small", "deep"])
def test_sleep_matches_naive_algorithm_1(shape):
    model = make_model(shape, "hard")
    L = model.config.window
    memory = [torch.randn_like(m) * 0.3 for m in model.empty_memory(1)]
    chunk = random_tokens(L, seed=3)
    with torch.no_grad():
        fast = model.sleep(memory, torch.tensor([chunk]), passes=3)
        slow = naive_sleep(model, memory, chunk, passes=3)
        once = model.sleep(memory, torch.tensor([chunk]), passes=1)
    for a, b, c in zip(fast, slow, once, strict=True):
        assert ((a - b).norm() / b.norm()) < 1e-5
        assert ((a - c).norm() / c.norm()) > 1e-3  # the extra passes do change the memory


def test_sleep_is_pure():
    model = make_model("small", "hard")
    memory = [torch.randn_like(m) for m in model.empty_memory(2)]
    before = [m.clone() for m in memory]
    chunk = torch.randint(0, 256, (2, model.config.window))
    with torch.no_grad():
        first = model.sleep(memory, chunk, 2)
        second = model.sleep(memory, chunk, 2)
    for m, b, x, y in zip(memory, before, first, second, strict=True):
        assert torch.equal(m, b) and torch.equal(x, y)


def test_sleep_loops_only_the_sleep_blocks():
    """sleep_blocks [1, 4) of 6, N = 3: blocks 0-3, then 1-3, then 1-5, h carried throughout (the
    paper looped the middle of Jet-Nemotron's blocks); every gdn layer's memory is written."""
    model = make_model("deep", "hard")
    looped = copy.copy(model)
    looped.config = model.config.replace(sleep_blocks=(1, 4))
    memory = [torch.randn_like(m) * 0.3 for m in model.empty_memory(2)]
    chunk = torch.randint(0, 256, (2, model.config.window))
    with torch.no_grad():
        h, fast = model.embed(chunk), list(memory)
        for blocks in (range(0, 4), range(1, 4), range(1, 6)):
            for i in blocks:
                block = model.blocks[i]
                if block.kind == "attn":
                    h = block.attend(h)
                else:
                    j = model.gdn_index[i]
                    y, fast[j], _ = block.mixer(block.mixer_norm(h), fast[j])
                    h = h + y
                h = block.feed_forward(h)
        got, everything = looped.sleep(memory, chunk, 3), model.sleep(memory, chunk, 3)
        slices = sum(1 for _ in looped.sleep_slices(memory, chunk, 3))
    assert slices == looped.sleep_slice_count(3) < model.sleep_slice_count(3)
    for a, b, c in zip(got, fast, everything, strict=True):
        assert (a - b).abs().max() < 1e-6
        assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("shape", ["small", "deep"])
def test_sleep_slices_interleaved_with_other_work_equal_sleep(shape):
    """A sleep run a slice at a time (as the decode thread runs one between its steps) takes
    `sleep_slice_count` slices and gives `sleep`'s memory, even with another sleep's slices and a
    decode step run in between."""
    model = make_model(shape, "lagged")
    memory = [torch.randn_like(m) * 0.3 for m in model.empty_memory(2)]
    chunks = torch.randint(0, 256, (2, model.config.window))
    with torch.no_grad():
        want = [model.sleep(memory, chunks, 3), model.sleep([m[:1] for m in memory], chunks[:1], 2)]
        runs = [
            model.sleep_slices(memory, chunks, 3),
            model.sleep_slices([m[:1] for m in memory], chunks[:1], 2),
        ]
        got, counts = [None, None], [0, 0]
        cache = model.open_window(model.empty_memory(2))
        while None in got:
            for i, run in enumerate(runs):
                if got[i] is None:
                    try:
                        next(run)
                        counts[i] += 1
                    except StopIteration as end:
                        got[i] = end.value
            if int(cache.lengths.max()) < model.config.window_capacity:
                _, cache = model.extend(torch.randint(0, 256, (2, 1)), cache)
    assert counts == [model.sleep_slice_count(3), model.sleep_slice_count(2)]
    for new, old in zip(got, want, strict=True):
        for a, b in zip(new, old, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", ["hard", "lagged"])
def test_batched_decode_equals_each_alone(schedule):
    model = make_model("default-ish", schedule)
    lengths = [3, 20, 37, 50]  # sessions at different positions, some past a boundary
    states, caches = [], []
    for i, n in enumerate(lengths):
        state = new_state(model)
        cache = open_window(model, state)[0]
        _, cache, _ = feed(model, state, cache, random_tokens(n, seed=10 + i))
        states.append(state)
        caches.append(cache)
    next_tokens = torch.tensor([[7], [42], [99], [200]])

    with torch.no_grad():
        batch = WindowCache.stack([c.select([0]) for c in caches])
        batched_logits, batch = model.extend(next_tokens, batch)
        for row, cache in enumerate(caches):
            alone_logits, alone = model.extend(next_tokens[row : row + 1], cache)
            assert (batched_logits[row] - alone_logits[0]).abs().max() < 1e-5
            mine = batch.select([row])
            assert torch.equal(mine.lengths, alone.lengths)
            for a, b in zip(mine.fast_weights(), alone.fast_weights(), strict=True):
                assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("construction", ["re-prefill", "stale-kv"])
def test_open_windows_equals_open_window_for_each_state(construction):
    """The batched rebuild of the engine's lagged boundaries gives each session the window that
    `open_window` gives it alone, whatever the mix of tail lengths (grouped by length inside)."""
    model = make_model("default-ish", "lagged", construction=construction)
    states = []
    for i, n in enumerate([16, 40, 16, 5, 40]):  # tails of 16, 24, 16, 5 and 24 tokens
        state = new_state(model)
        feed(model, state, open_window(model, state)[0], random_tokens(n, seed=30 + i))
        states.append(state)
    with torch.no_grad():
        rebuilt = open_windows(model, states)
        for state, (batch, row) in zip(states, rebuilt, strict=True):
            alone = open_window(model, state)[0]
            mine = batch.select([row])
            assert int(mine.lengths[0]) == int(alone.lengths[0]) == len(state.tail)
            for a, b in zip(mine.layers, alone.layers, strict=True):
                for x, y in zip(vars(a).values(), vars(b).values(), strict=True):
                    assert (x - y).abs().max() < 1e-5


@pytest.mark.parametrize("schedule", ["hard", "lagged"])
def test_fill_builds_the_window_extend_builds(schedule):
    """`fill` (window rebuilds: no logits, no last MLP) leaves the very cache `extend` leaves, from an
    empty window and from a part-filled one."""
    model = make_model("default-ish", schedule)
    memory = [torch.randn_like(m) for m in model.empty_memory(3)]
    tokens = torch.tensor([random_tokens(model.config.window, seed=60 + i) for i in range(3)])
    with torch.no_grad():
        for start in (0, 5):
            via_extend, via_fill = model.open_window(memory), model.open_window(memory)
            if start:
                _, via_extend = model.extend(tokens[:, :start], via_extend)
                via_fill = model.fill(tokens[:, :start], via_fill)
            _, via_extend = model.extend(tokens[:, start:], via_extend)
            via_fill = model.fill(tokens[:, start:], via_fill)
            assert torch.equal(via_fill.lengths, via_extend.lengths)
            for a, b in zip(via_fill.layers, via_extend.layers, strict=True):
                for x, y in zip(vars(a).values(), vars(b).values(), strict=True):
                    assert torch.equal(x, y)


def test_a_stale_window_equals_the_window_rebuilt_from_its_state():
    """stale-kv: the window a boundary moves (decoded keys re-rotated, fast weights from the memory)
    is the one a resumed session rebuilds from (memory, tail), and both go on alike."""
    model = make_model("default-ish", "lagged", construction="stale-kv")
    L = model.config.window
    state = new_state(model)
    _, live, sleeps = feed(model, state, open_window(model, state)[0], random_tokens(3 * L + 5, seed=4))
    assert len(sleeps) == 2 and state.prev_len == L and len(state.tail) == L + 5
    rebuilt, _ = open_window(model, state)
    torch.testing.assert_close(rebuilt.lengths, live.lengths)
    for mine, theirs in zip(rebuilt.layers, live.layers, strict=True):
        for a, b in zip(vars(mine).values(), vars(theirs).values(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    after = random_tokens(L, seed=5)
    resumed, _, _ = feed(model, copy.deepcopy(state), rebuilt, after, return_all=True)
    went_on, _, _ = feed(model, state, live, after, return_all=True)
    torch.testing.assert_close(resumed, went_on, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [[0, 2], [1, 2], [1]])
def test_moving_stale_windows_in_place_touches_their_rows_only(rows):
    """`move_stale` on some rows of a decode batch (consecutive ones as views, others by index) gives
    those rows what `stale_window` gives for them alone, and leaves the other rows as they were."""
    model = make_model("default-ish", "lagged", construction="stale-kv")
    L = model.config.window
    with torch.no_grad():
        batch = model.open_window(model.empty_memory(3))
        batch = model.fill(torch.tensor([random_tokens(L + 5, seed=s) for s in range(3)]), batch)
        memory = [torch.randn(len(rows), *m.shape[1:]) for m in model.empty_memory(1)]
        before = batch.select([0, 1, 2])
        expected = model.stale_window(batch.select(rows), memory, 5)
        model.move_stale(batch, rows, memory, 5)
    for b in range(3):
        want = expected.select([rows.index(b)]) if b in rows else before.select([b])
        got = batch.select([b])
        assert torch.equal(got.lengths, want.lengths)
        for mine, theirs in zip(got.layers, want.layers, strict=True):
            for x, y in zip(vars(mine).values(), vars(theirs).values(), strict=True):
                assert torch.equal(x, y)


def test_stale_kv_needs_the_first_block_to_be_the_only_attention():
    with pytest.raises(ValueError, match="stale-kv needs the first block"):
        ModelConfig(layers=["gdn", "attn"], lagged_construction="stale-kv")
    with pytest.raises(ValueError, match="stale-kv needs the first block"):
        ModelConfig(layers=["attn", "gdn", "attn"], lagged_construction="stale-kv")
    assert ModelConfig(layers=["attn", "gdn", "gdn"], lagged_construction="stale-kv").stale_kv


def test_extend_refuses_window_overflow():
    model = make_model("small", "hard")
    cache = model.open_window(model.empty_memory(1))
    with pytest.raises(ValueError, match="window overflow"):
        model.extend(torch.zeros(1, model.config.window + 1, dtype=torch.long), cache)


@pytest.mark.parametrize("dt_range", [(1e-3, 1e-1), (1e-4, 1e-3)])
def test_gdn_decay_starts_in_the_configured_range(dt_range):
    """dt = softplus(dt_bias) starts within [gdn_dt_min, gdn_dt_max]; the draws are the same whatever the
    range, so the other weights of a seed do not move with it."""
    config = ModelConfig(gdn_heads=8, gdn_dt_min=dt_range[0], gdn_dt_max=dt_range[1])
    torch.manual_seed(0)
    model = HybridLM(config)
    dt = F.softplus(model.blocks[1].mixer.dt_bias)
    assert ((dt >= dt_range[0] * 0.999) & (dt <= dt_range[1] * 1.001)).all()
    torch.manual_seed(0)
    default = HybridLM(ModelConfig(gdn_heads=8))
    torch.testing.assert_close(model.head.weight, default.head.weight)
