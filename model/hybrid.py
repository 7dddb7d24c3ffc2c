"""The hybrid LM: blocks alternating attention and gated-delta-rule layers, with explicit state.

Three operations, each taking its state and returning the new one:
- `forward(tokens, memory)`: one pass over a window that starts from consolidated memory (training);
- `extend(tokens, cache)`: append tokens to a batch of windows at different fill levels (decode, prefill);
- `sleep(memory, chunk, passes)`: Algorithm 1's consolidation, a pure function of its arguments.

The memory is a list of float32 tensors (`ModelConfig.memory_shapes`): each gdn layer's fast weights
and, when the convolution state carries (`gdn_conv_state`), then each one's convolution history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import KVCache, WindowAttention, rotary
from model.config import ModelConfig
from model.gdn import FastWeightCache, GatedDeltaNet
from model.layers import MLP, make_norm
from model.slices import Slices, run_to_end

# Consolidated state: one [B, H, K, V] fast-weight tensor per gdn layer, then (conv state "carry") one
# [B, conv_size - 1, channels] convolution history per gdn layer.
Memory = list[Tensor]


@dataclass
class WindowCache:
    """Everything the current attention window holds for a batch of sessions (dim 0).

    Derived from (memory, unconsolidated tokens) by `extend`, so it is never stored: a session resumes
    by re-running its ≤ 2L window tokens.
    """

    layers: list[KVCache | FastWeightCache]  # one entry per block, by its kind
    lengths: Tensor  # [B] tokens in each window

    def fast_weights(self) -> Memory:
        return [c.fast for c in self.layers if isinstance(c, FastWeightCache)]

    @staticmethod
    def stack(caches: list[WindowCache]) -> WindowCache:
        """Joins single-session caches into one batch (all of the same model)."""
        layers: list[KVCache | FastWeightCache] = []
        for parts in zip(*(c.layers for c in caches), strict=True):
            if isinstance(parts[0], KVCache):
                layers.append(
                    KVCache(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]))
                )
            else:
                layers.append(
                    FastWeightCache(torch.cat([p.fast for p in parts]), torch.cat([p.conv for p in parts]))
                )
        return WindowCache(layers, torch.cat([c.lengths for c in caches]))

    def write_row(self, row: int, window: WindowCache, source: int = 0) -> None:
        """Overwrite one row of this batch with row `source` of `window`, in place."""
        for mine, theirs in zip(self.layers, window.layers, strict=True):
            if isinstance(mine, KVCache):
                mine.keys[row], mine.values[row] = theirs.keys[source], theirs.values[source]
            else:
                mine.fast[row], mine.conv[row] = theirs.fast[source], theirs.conv[source]
        self.lengths[row] = window.lengths[source]

    def select(self, rows: list[int] | Tensor) -> WindowCache:
        """The sub-batch of the given rows (copies)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        layers: list[KVCache | FastWeightCache] = []
        for c in self.layers:
            if isinstance(c, KVCache):
                layers.append(KVCache(c.keys[index], c.values[index]))
            else:
                layers.append(FastWeightCache(c.fast[index], c.conv[index]))
        return WindowCache(layers, self.lengths[index])


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)).

    `attend` (an attention block's mixer) and `feed_forward` are pieces of a pass that a sleep runs
    between pauses (`HybridLM.pass_slices`), as are a gdn mixer's (`GatedDeltaNet.forward`)."""

    def __init__(self, config: ModelConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.mixer_norm = make_norm(config, config.d_model)
        self.mixer = WindowAttention(config) if kind == "attn" else GatedDeltaNet(config)
        self.mlp_norm = make_norm(config, config.d_model)
        self.mlp = MLP(config)

    def attend(self, h: Tensor, stale: int = 0) -> Tensor:
        """h [B, T, d] + attention over the window; of the last T - stale positions only."""
        y, _, _ = self.mixer(self.mixer_norm(h))
        return h[:, stale:] + y[:, stale:]

    def feed_forward(self, h: Tensor) -> Tensor:
        return h + self.mlp(self.mlp_norm(h))


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, kind) for kind in config.layers)
        self.norm = make_norm(config, config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        # Which entry of the memory each gdn block reads and writes.
        self.gdn_index = {
            i: j for j, i in enumerate(i for i, kind in enumerate(config.layers) if kind == "gdn")
        }

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # -- state -------------------------------------------------------------------------------------

    def empty_memory(self, batch: int = 1) -> Memory:
        return [torch.zeros(batch, *shape, device=self.device) for shape in self.config.memory_shapes()]

    def split_memory(self, memory: Memory) -> tuple[list[Tensor], list[Tensor | None]]:
        """The fast weights and the convolution histories (None where they restart) of each gdn layer."""
        n = self.config.n_gdn
        if self.config.gdn_conv_state == "carry":
            return list(memory[:n]), list(memory[n:])
        return list(memory), [None] * n

    def join_memory(self, fast: list[Tensor], conv: list[Tensor | None]) -> Memory:
        return fast + conv if self.config.gdn_conv_state == "carry" else fast  # type: ignore[operator]

    def window_memory(self, cache: WindowCache) -> Memory:
        """The memory the window's gdn layers have reached: what a plain hybrid (N = 1) carries on."""
        layers = [c for c in cache.layers if isinstance(c, FastWeightCache)]
        return self.join_memory([c.fast for c in layers], [c.conv for c in layers])

    def open_window(self, memory: Memory) -> WindowCache:
        """An empty window whose gdn layers start from `memory` (not modified). A model without gdn
        layers (the full-attention baseline) has no memory: its window is one session's whole context."""
        c, batch = self.config, memory[0].shape[0] if memory else 1
        fast, conv = self.split_memory(memory)
        layers: list[KVCache | FastWeightCache] = []
        for i, block in enumerate(self.blocks):
            if block.kind == "attn":
                shape = (batch, c.n_kv_heads, c.window_capacity, c.head_dim)
                keys, values = (torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(2))
                layers.append(KVCache(keys, values))
            else:
                j = self.gdn_index[i]
                history = conv[j] if conv[j] is not None else block.mixer.empty_conv(batch, memory[0])
                layers.append(FastWeightCache(fast[j], history))
        return WindowCache(layers, torch.zeros(batch, dtype=torch.long, device=self.device))

    # -- passes ------------------------------------------------------------------------------------

    def run_blocks(self, h: Tensor, fast: Memory, stale: int = 0) -> tuple[Tensor, Memory]:
        """One pass of the block stack over a window from its start. h: [B, T, d] -> (h, fast), h of the
        last T - stale positions: the first `stale` tokens (stale-kv's previous chunk) are keys and
        values of the first block's attention and nothing else."""
        return run_to_end(self.pass_slices(h, fast, stale))

    def pass_slice_count(self, memory_only: bool = False, blocks: range | None = None) -> int:
        """How many times `pass_slices` yields: between blocks, after each attention mixer and twice inside
        each gdn mixer; `memory_only`, up to the last gdn block's delta rule."""
        blocks = blocks if blocks is not None else range(len(self.blocks))
        kinds = [self.blocks[i].kind for i in blocks]
        per_block = [(n > 0) + (1 if kind == "attn" else 2) for n, kind in enumerate(kinds)]
        if not memory_only or "gdn" not in kinds:
            return sum(per_block)
        last_gdn = len(kinds) - 1 - kinds[::-1].index("gdn")
        return sum(per_block[:last_gdn]) + (last_gdn > 0) + 1  # and its yield after the gdn inputs

    def sleep_plan(self, passes: int) -> list[tuple[range, bool]]:
        """The blocks each of a sleep's passes runs, and whether it is memory-only (the last). With
        `sleep_blocks` [a, b) only those loop: blocks before a run in the first pass, after b in the last."""
        everything = range(len(self.blocks))
        if self.config.sleep_blocks is None or passes == 1:
            return [(everything, n == passes - 1) for n in range(passes)]
        first, last = self.config.sleep_blocks
        middle = [(range(first, last), False)] * (passes - 2)
        return [(range(0, last), False), *middle, (range(first, len(self.blocks)), True)]

    def sleep_slice_count(self, passes: int) -> int:
        """How many times `sleep_slices` yields."""
        return sum(
            self.pass_slice_count(memory_only, blocks) for blocks, memory_only in self.sleep_plan(passes)
        )

    def pass_slices(
        self, h: Tensor, fast: Memory, stale: int = 0, memory_only: bool = False, blocks: range | None = None
    ) -> Slices[tuple[Tensor, Memory]]:
        """`run_blocks` a slice at a time: yields between blocks, after each attention mixer, and inside
        the gdn mixers after their inputs and after the delta rule (their output and the MLP after it
        are one slice); returns (h, memory) with the last slice. Each pause costs the caller's work
        between slices a few percent of the pass, so the slices are as few as keep each one short.
        `memory_only`: only the memory is wanted (a sleep's last pass), so it returns at the last
        gdn block's delta rule, leaving out what feeds nothing but h. `blocks`: run only these (a sleep
        that loops some of them); the memory of the others passes through."""
        blocks = blocks if blocks is not None else range(len(self.blocks))
        last_gdn = max((i for i in blocks if self.blocks[i].kind == "gdn"), default=-1)
        weights, history = self.split_memory(fast)
        carry = self.config.gdn_conv_state == "carry"
        for i in blocks:
            block = self.blocks[i]
            if i != blocks[0]:
                yield
            if block.kind == "attn":
                h = block.attend(h, stale if i == 0 else 0)
                yield
            else:
                j = self.gdn_index[i]
                x = block.mixer_norm(h)
                q, k, v, g, beta, conv = block.mixer.project(x, history[j])
                yield
                o, weights[j] = block.mixer.delta_rule(q, k, v, g, beta, weights[j])
                history[j] = conv if carry else None
                if memory_only and i == last_gdn:
                    return h, self.join_memory(weights, history)
                yield
                h = h + block.mixer.output(x, o)
            h = block.feed_forward(h)
        return h, self.join_memory(weights, history)

    def logits(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))

    def forward(self, tokens: Tensor, memory: Memory, stale: int = 0) -> Tensor:
        """Logits [B, T - stale, vocab] of one window pass over tokens [B, T] that starts from `memory`;
        the first `stale` tokens are a stale-kv window's previous chunk (see `run_blocks`)."""
        h, _ = self.run_blocks(self.embed(tokens), memory, stale)
        return self.logits(h)

    def sleep(self, memory: Memory, chunk: Tensor, passes: int) -> Memory:
        """Algorithm 1: h ← Embed(chunk); N times: h, S ← Blocks(h, S). Returns the new memory S.

        Hidden states carry from pass to pass, the fast weights accumulate, attention is rebuilt within
        each pass over the chunk alone; h and the keys and values are discarded afterwards.
        chunk: [B, T] token ids; memory: M_{j-1} (not modified). Returns M_j.
        """
        if passes < 1:
            raise ValueError(f"sleep needs at least one pass, got {passes}")
        return run_to_end(self.sleep_slices(memory, chunk, passes))

    def sleep_slices(self, memory: Memory, chunk: Tensor, passes: int) -> Slices[Memory]:
        """`sleep` a slice at a time (see `pass_slices`), for a caller that runs it between other
        work; returns the new memory (passes ≥ 1)."""
        h, fast = self.embed(chunk), memory
        for blocks, memory_only in self.sleep_plan(passes):
            h, fast = yield from self.pass_slices(h, fast, memory_only=memory_only, blocks=blocks)
        return fast

    def extend(self, tokens: Tensor, cache: WindowCache) -> tuple[Tensor, WindowCache]:
        """Append tokens [B, T] to each window of the batch (which may hold different numbers of tokens).

        Returns logits [B, T, vocab] and the cache, whose attention buffers are updated in place.
        The caller keeps each window within its capacity (the session's schedule does).
        """
        h, cache = self._append(tokens, cache, last_mlp=True)
        return self.logits(h), cache

    def fill(self, tokens: Tensor, cache: WindowCache) -> WindowCache:
        """`extend` when only the window is wanted (rebuilding it): the same cache, without the logits
        and the last block's MLP, which feeds nothing but them."""
        return self._append(tokens, cache, last_mlp=False)[1]

    def stale_prefix(self, tokens: Tensor, cache: WindowCache) -> WindowCache:
        """stale-kv: put tokens [B, P] into empty windows as their previous chunk: the first block's keys
        and values at positions 0..P-1 and nothing else, as `forward(..., stale=P)` sees them."""
        block = self.blocks[0]
        _, keys_values = block.mixer.extend(
            block.mixer_norm(self.embed(tokens)), cache.layers[0], cache.lengths
        )
        return WindowCache([keys_values, *cache.layers[1:]], cache.lengths + tokens.shape[1])

    def stale_window(self, cache: WindowCache, memory: Memory, keep: int) -> WindowCache:
        """stale-kv's boundary: new windows that keep the last `keep` tokens of each of `cache`'s as the
        keys and values they were decoded with (see `move_stale`), and whose fast weights restart from
        `memory`. `cache` is not modified."""
        rows = list(range(cache.lengths.shape[0]))
        windows = cache.select(rows)
        self.move_stale(windows, rows, memory, keep)
        return windows

    def move_stale(self, cache: WindowCache, rows: list[int], memory: Memory, keep: int) -> None:
        """stale-kv's boundary in place, for the windows of `cache` in `rows`: each keeps its last `keep`
        tokens as the keys and values they were decoded with, moved to the window's start (their rotary
        positions shifted to match: scores depend on distances only; the rest of its buffers zeroed),
        and its fast weights restart from its row of `memory` (one per entry of `rows`). Nothing runs
        through the network."""
        if rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive (one, say): views, no copies
            index: slice | Tensor = slice(rows[0], rows[0] + len(rows))
        else:
            index = torch.as_tensor(rows, dtype=torch.long, device=cache.lengths.device)
        offset = cache.lengths[index] - keep  # [R] where the kept tokens start
        source = offset[:, None] + torch.arange(keep, device=offset.device)  # [R, keep]
        fast, conv = self.split_memory(memory)
        c = self.config
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, KVCache):
                R, H, capacity, D = len(rows), *layer.keys.shape[1:]
                at = source[:, None, :, None].expand(R, H, keep, D)
                keys = rotary(layer.keys[index].gather(2, at), -offset[:, None], c.rope_base, c.rope_dim)
                values = layer.values[index].gather(2, at)
                layer.keys[index] = F.pad(keys, (0, 0, 0, capacity - keep))
                layer.values[index] = F.pad(values, (0, 0, 0, capacity - keep))
            else:
                j = self.gdn_index[i]
                layer.fast[index] = fast[j]
                layer.conv[index] = conv[j] if conv[j] is not None else 0.0
        cache.lengths[index] = keep

    def _append(self, tokens: Tensor, cache: WindowCache, last_mlp: bool) -> tuple[Tensor, WindowCache]:
        """The blocks over tokens [B, T] appended to the windows: the last hidden states and the cache."""
        if int(cache.lengths.max()) + tokens.shape[1] > self.config.window_capacity:
            raise ValueError("window overflow: consolidate before extending past (lag + 1) × window")
        h = self.embed(tokens)
        layers: list[KVCache | FastWeightCache] = []
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block.mixer_norm(h)
            if isinstance(layer_cache, KVCache):
                y, layer_cache = block.mixer.extend(x, layer_cache, cache.lengths)
            else:
                y, fast, conv = block.mixer(x, layer_cache.fast, layer_cache.conv)
                layer_cache = FastWeightCache(fast, conv)
            layers.append(layer_cache)
            h = h + y
            if last_mlp or len(layers) < len(self.blocks):
                h = block.feed_forward(h)
        return h, WindowCache(layers, cache.lengths + tokens.shape[1])
