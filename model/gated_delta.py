"""The gated delta rule, two ways: a per-token recurrence (decode) and a chunk-parallel form (prefill,
sleep, training). Both follow flash-linear-attention's conventions so a CUDA kernel can be swapped in:
inputs are [B, T, H, D], the state is key-major [B, H, K, V], and each returns (out, final_state).

Per head and token, with S = stateᵀ (V×K), q and k L2-normalised and q scaled by K^-1/2:

    S_t = α_t S_{t-1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,      o_t = S_t q_t,      α_t = exp(g_t)

References: Yang, Kautz, Hatamizadeh, "Gated Delta Networks" (arXiv 2412.06464); fla's
`ops/gated_delta_rule/naive.py` and transformers' `torch_chunk_gated_delta_rule` (the WY form).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_delta_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor
) -> tuple[Tensor, Tensor]:
    """Token-by-token gated delta rule.

    q, k: [B, T, H, K] (already L2-normalised); v: [B, T, H, V]; g (log α ≤ 0), beta: [B, T, H];
    initial_state: [B, H, K, V]. Returns o [B, T, H, V] and the final state [B, H, K, V].
    """
    scale = q.shape[-1] ** -0.5
    state = initial_state
    outs = []
    for t in range(q.shape[1]):
        q_t, k_t, v_t = q[:, t] * scale, k[:, t], v[:, t]  # [B, H, K], [B, H, K], [B, H, V]
        state = state * g[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)  # what the memory returns for k_t
        update = beta[:, t, :, None] * (v_t - predicted)  # delta: β (v − S k)
        state = state + k_t[..., :, None] * update[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t, state))
    return torch.stack(outs, dim=1), state


@functools.cache
def _above_diagonal(size: int, device: torch.device) -> Tensor:
    """[size, size] True strictly above the diagonal (built once per size and device). Never an
    inference tensor, which autograd could not use: the first call may come from a server's decode
    thread (inference mode) and a later one from training in the same process."""
    with torch.inference_mode(False):
        return torch.ones(size, size, dtype=torch.bool, device=device).triu(1)


def gated_delta_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor,
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel gated delta rule, same contract as `gated_delta_recurrent`.

    Within a chunk of C tokens the product of the generalised Householder transitions is written in WY
    form with one unit-lower-triangular solve; the only sequential loop runs over the T/C chunks.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)  # a shorter sequence is one chunk of its own length, with no padding
    pad = (-T) % C
    if pad:  # padded steps have k = v = β = g = 0: they leave the state untouched
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    n = (T + pad) // C

    def chunked(x: Tensor) -> Tensor:  # [B, T, H, ...] -> [B, H, n, C, ...], contiguous: every matmul
        return x.reshape(B, n, C, H, *x.shape[3:]).movedim(3, 1).contiguous()  # would copy it again

    q = chunked(q) * K**-0.5  # [B, H, n, C, K]
    k, v = chunked(k), chunked(v)  # [B, H, n, C, K], [B, H, n, C, V]
    beta = chunked(beta)  # [B, H, n, C]
    g_cum = chunked(g).cumsum(-1)  # [B, H, n, C] cumulative log-decay within each chunk

    # Γ_ij = exp(G_i − G_j) for i ≥ j: decay applied between token j's write and token i's read.
    decay = (
        (g_cum[..., :, None] - g_cum[..., None, :]).masked_fill(_above_diagonal(C, q.device), -math.inf).exp()
    )

    # WY representation: (I + tril(diag(β) K Kᵀ ⊙ Γ, −1)) [U | W] = [diag(β) V | diag(β) K ⊙ exp(G)]. A
    # unit-triangular solve reads only the strict lower triangle: the product needs no tril and no I.
    k_beta = k * beta[..., None]
    system = k_beta @ k.transpose(-1, -2) * decay
    rhs = torch.cat([v * beta[..., None], k_beta * g_cum.exp()[..., None]], dim=-1)
    # Solved as X Sᵀ = Rᵀ (left=False) on the transposes: the same solve, with operands already in
    # the column-major layout LAPACK takes, so nothing is copied (16 chunks of 24: 120 -> 38 µs).
    solved = torch.linalg.solve_triangular(system.mT, rhs.mT, upper=True, left=False, unitriangular=True).mT
    u, w = solved[..., :V], solved[..., V:]  # [B, H, n, C, V], [B, H, n, C, K]

    intra = q @ k.transpose(-1, -2) * decay  # [B, H, n, C, C] causal, decayed q·k within the chunk
    q_decayed = q * g_cum.exp()[..., None]
    k_to_end = k * (g_cum[..., -1:] - g_cum).exp()[..., None]  # decay from each write to chunk end

    state = initial_state.to(q.dtype)
    outs = []
    for i in range(n):
        u_i = u[:, :, i] - w[:, :, i] @ state  # new values minus what the incoming state predicts
        outs.append(q_decayed[:, :, i] @ state + intra[:, :, i] @ u_i)
        state = state * g_cum[:, :, i, -1, None, None].exp() + k_to_end[:, :, i].transpose(-1, -2) @ u_i
    o = torch.stack(outs, dim=2)  # [B, H, n, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return o, state
