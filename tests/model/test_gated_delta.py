"""The chunk-parallel gated delta rule against the per-token recurrence (fp32, random inputs)."""

import pytest
import torch
from support import random_inputs, rel_err

from model.gated_delta import gated_delta_chunk, gated_delta_recurrent


@pytest.mark.parametrize(
    "B,T,H,K,V,chunk",
    [
        (1, 1, 1, 8, 8, 4),
        (2, 37, 3, 16, 24, 8),
        (8, 24, 2, 32, 32, 32),  # a sleep's chunk, shorter than the chunk size: one chunk of its own length
        (2, 64, 2, 32, 32, 32),
        (1, 100, 4, 16, 16, 32),
        (3, 130, 2, 8, 40, 64),
    ],
)
@pytest.mark.parametrize("zero_state", [False, True])
def test_chunk_matches_recurrent(B, T, H, K, V, chunk, zero_state):
    inputs = random_inputs(B, T, H, K, V, seed=T * 7 + H, zero_state=zero_state)
    o_rec, s_rec = gated_delta_recurrent(*inputs)
    o_chunk, s_chunk = gated_delta_chunk(*inputs, chunk_size=chunk)
    assert o_chunk.shape == (B, T, H, V) and s_chunk.shape == (B, H, K, V)
    assert rel_err(o_chunk, o_rec) < 1e-5
    assert rel_err(s_chunk, s_rec) < 1e-5


def test_state_threads_across_calls():
    """Two calls that pass the state along equal one call over the whole sequence."""
    q, k, v, g, beta, s0 = random_inputs(2, 80, 2, 16, 16, seed=1)
    o_all, s_all = gated_delta_chunk(q, k, v, g, beta, s0, chunk_size=16)
    o1, s1 = gated_delta_chunk(q[:, :50], k[:, :50], v[:, :50], g[:, :50], beta[:, :50], s0, chunk_size=16)
    o2, s2 = gated_delta_chunk(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], beta[:, 50:], s1, chunk_size=16)
    assert rel_err(torch.cat([o1, o2], dim=1), o_all) < 1e-5
    assert rel_err(s2, s_all) < 1e-5


def test_single_write_is_the_delta_rule():
    """One token with α = 1, β = 1 into an empty memory stores exactly v kᵀ, and reading k returns v."""
    K, V = 4, 3
    k = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, K)
    v = torch.tensor([2.0, -1.0, 0.5]).view(1, 1, 1, V)
    zeros = torch.zeros(1, 1, 1)
    o, state = gated_delta_recurrent(k, k, v, zeros, torch.ones(1, 1, 1), torch.zeros(1, 1, K, V))
    assert torch.allclose(state[0, 0], k.view(K, 1) * v.view(1, V))
    assert torch.allclose(o.view(V), v.view(V) * K**-0.5)  # q is scaled by K^-1/2


def test_chunk_backward_matches_recurrent():
    inputs = random_inputs(1, 24, 2, 8, 8, seed=3)
    grads = []
    for fn in (gated_delta_recurrent, lambda *a: gated_delta_chunk(*a, chunk_size=8)):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        o, s = fn(*leaves)
        (o.square().sum() + s.square().sum()).backward()
        grads.append([x.grad for x in leaves])
    for g_rec, g_chunk in zip(*grads, strict=True):
        assert rel_err(g_chunk, g_rec) < 1e-4


def test_chunk_backward_after_an_inference_mode_call():
    """The chunk form's cached causal mask is shared by every later call of its size: made first in
    inference mode (a server's decode thread), it must still serve a call under autograd (training in
    the same process)."""
    inputs = random_inputs(1, 13, 2, 8, 8, seed=4)  # 13: a chunk size no other test uses
    with torch.inference_mode():
        gated_delta_chunk(*inputs, chunk_size=32)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    o, s = gated_delta_chunk(*leaves, chunk_size=32)
    (o.square().sum() + s.square().sum()).backward()
    assert all(x.grad is not None for x in leaves)
