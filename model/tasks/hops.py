"""Depo multi-hop retrieval (paper §3.2, §6.2): a directed cycle as shuffled edges; k hops from a node.

Layout of HopsTask(nodes=6, context_windows=2, max_hops=4, name_len=1), window 16:

    context  "....m>y,i>q,y>n," "....n>b,q>m,b>i,"    edges tail>head, in random order, whole
                                                     edges per window, each left-padded with '.'
    query    "3 hops after i?"
    answer   "y"                                     the node reached after k outgoing edges

Nodes are distinct random lowercase names of `name_len` letters forming one random directed cycle. The
edges are split as evenly as possible over `context_windows` windows (the first windows get the extra
ones). k (the difficulty) is uniform over 1..max_hops, written zero-padded to the digits of max_hops.
"""

from __future__ import annotations

import itertools
import random
import string

from model.tasks.base import Example, choose_difficulty, pad_window


class HopsTask:
    name = "hops"

    def __init__(
        self,
        nodes: int = 24,
        context_windows: int = 4,
        max_hops: int = 16,
        name_len: int = 2,
        window: int | None = None,
    ) -> None:
        self.names = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=name_len)]
        if not 2 <= nodes <= len(self.names) or not 1 <= context_windows <= nodes or max_hops < 1:
            raise ValueError("need 2 <= nodes <= 26**name_len, 1 <= context_windows <= nodes, max_hops >= 1")
        self.nodes, self.context_windows, self.max_hops = nodes, context_windows, max_hops
        self.difficulties = range(1, max_hops + 1)
        edges_per_window = -(-nodes // context_windows)
        query_len = len(self._query(max_hops, "a" * name_len))
        natural = max(edges_per_window * (2 * name_len + 2), query_len + name_len)
        if window is not None and window < natural:
            raise ValueError(f"window {window} is smaller than the layout needs ({natural})")
        self.window = natural if window is None else window

    def _query(self, k: int, start: str) -> str:
        return f"{k:0{len(str(self.max_hops))}d} hops after {start}?"

    def example(self, rng: random.Random, difficulty: int | None = None) -> Example:
        k = choose_difficulty(rng, self.difficulties, difficulty)
        cycle = rng.sample(self.names, self.nodes)
        edges = [f"{a}>{b}," for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
        rng.shuffle(edges)
        base, extra = divmod(self.nodes, self.context_windows)
        windows, start = [], 0
        for w in range(self.context_windows):
            stop = start + base + (w < extra)
            windows.append(pad_window("".join(edges[start:stop]), self.window))
            start = stop
        i = rng.randrange(self.nodes)
        return Example(
            context="".join(windows),
            query=self._query(k, cycle[i]),
            answer=cycle[(i + k) % self.nodes],
            difficulty=k,
        )
