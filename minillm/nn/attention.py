"""Causal multi-head self-attention (GPT-2), forward/backward pair and the KV-cache step.

    attention_forward(x, p, config) -> (y, cache)        x, y: (B, T, C)
    attention_backward(dy, cache) -> (dx, grads)          grads keyed like p
    init_kv_cache(batch, config, dtype, xp) -> {"k", "v"}  each (B, H, context, hd), preallocated
    attention_step(x_t, p, config, kv_cache, pos) -> (y_t, kv_cache)   x_t, y_t: (B, C)

p is keyed like HF GPT2Attention: {"c_attn": {"weight": (C, 3C), "bias": (3C,)},
"c_proj": {"weight": (C, C), "bias": (C,)}}, weights in Conv1D (in, out) layout; both projections go
through the dense hook (minillm.nn.dense), so LoRA / ternary weights plug in here.

Math (Vaswani et al. 2017, eq. 1): per head, Y = softmax(Q K^T / sqrt(hd) + M) V with M = -inf above
the diagonal. HF masks with the dtype's minimum instead of -inf; both give exactly zero weight after
the softmax (exp underflows to 0), and every row keeps its diagonal entry, so no row is all-masked.
The 1/sqrt(hd) scale is folded into Q (B*T*C multiplies instead of B*H*T*T).
Heads never loop in Python: Q, K, V are strided views of the fused qkv projection (no copies), the
head outputs are written straight into (B, T, C) order, and every product is one batched matmul over
(B, H) (`bmm` of nn/blas.py, with the BLAS threading notes); the masked softmax and its backward
run in Numba kernels (minillm/kernels/softmax.py) that touch only the causal half of each score matrix.
"""

import math

import numpy as np

from minillm.nn import dense
from minillm.nn.blas import bmm as _bmm, single_threaded_blas  # noqa: F401  (gpt.step uses the latter)
from minillm import kernels
from minillm.nn.ops import array_module

CAUSAL_BLOCKS = 4           # row blocks of the causal products (each at least 64 rows)


def _heads(config, C):
    H = int(config["n_head"])
    if C % H:
        raise ValueError(f"d_model {C} is not divisible by n_head {H}")
    return H, C // H


# --- causal products: skip the blocks above the diagonal ---------------------------------------------
# With the rows cut in nb blocks, row block r only needs the first e_{r+1} columns (e: block edges), so
# each of the six (T x T)-sized products costs (nb + 1) / (2 nb) of the dense one (5/8 for nb = 4).
# The skipped blocks of S and dP are left unwritten: the Numba softmax kernels read only j <= i and
# write the masked half themselves (the NumPy reference path reads whole rows: it gets nb = 1).


def _edges(T, blocked):
    nb = max(1, min(CAUSAL_BLOCKS, T // 64)) if blocked else 1
    return [(T * r // nb, T * (r + 1) // nb) for r in range(nb)]


def _tril_matmul(lower, b, out, edges):
    """out = lower @ b for lower-triangular lower: (B, H, T, T), b: (B, H, T, N)."""
    for r0, r1 in edges:
        _bmm(lower[..., r0:r1, :r1], b[..., :r1, :], out=out[..., r0:r1, :])


def _matmul_lower_part(a, bt, out, edges):
    """The j <= i part (at least) of out = a @ bt; a: (B, H, T, K), bt: (B, H, K, T)."""
    for r0, r1 in edges:
        _bmm(a[..., r0:r1, :], bt[..., :r1], out=out[..., r0:r1, :r1])


def _tril_t_matmul(lower, b, out, edges):
    """out = lower^T @ b for lower-triangular lower: (B, H, T, T), b: (B, H, T, N)."""
    upper = lower.transpose(0, 1, 3, 2)
    for c0, c1 in edges:
        _bmm(upper[..., c0:c1, c0:], b[..., c0:, :], out=out[..., c0:c1, :])


def _causal_softmax(s):
    """s: (B, H, T, T) scores -> causal softmax in place (zeros above the diagonal), kernels/softmax.py."""
    return kernels.pick("softmax", "causal", s)(s)


def _causal_softmax_backward(dp, prob):
    """dp, prob: (B, H, T, T) -> dS in place of dp."""
    return kernels.pick("softmax", "causal_backward", dp)(dp, prob)


def _blocked(a):
    """The Numba kernels read only the causal half of the score matrices, so the products may skip the
    blocks above the diagonal; the reference (and CUDA) softmax read whole rows."""
    return kernels.implementation_for(a) == "numba"


def attention_forward(x, p, config):
    """x: (B, T, C) -> y: (B, T, C). Returns (y, cache)."""
    xp = array_module(x)
    B, T, C = x.shape
    H, hd = _heads(config, C)
    conv1d = dense.mode(config, "in_out")
    qkv, c_attn_cache = dense.dense_forward(x.reshape(B * T, C), p["c_attn"], conv1d)
    qkv = qkv.reshape(B, T, 3, H, hd)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)               # (B, H, T, hd) strided views, no copies
    k = qkv[:, :, 1].transpose(0, 2, 1, 3)
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)
    q = q * (1.0 / math.sqrt(hd))                         # keeps qkv's strides (K order)
    edges = _edges(T, _blocked(x))
    s = xp.empty((B, H, T, T), dtype=x.dtype)
    _matmul_lower_part(q, k.transpose(0, 1, 3, 2), s, edges)
    prob = _causal_softmax(s)                             # (B, H, T, T), zero above the diagonal
    o = xp.empty((B, T, H, hd), dtype=x.dtype)            # heads written straight into (B, T, C) order
    _tril_matmul(prob, v, o.transpose(0, 2, 1, 3), edges)
    y, c_proj_cache = dense.dense_forward(o.reshape(B * T, C), p["c_proj"], conv1d)
    return y.reshape(B, T, C), (c_attn_cache, c_proj_cache, q, k, v, prob, hd)


def attention_backward(dy, cache):
    """dy: (B, T, C) -> (dx: (B, T, C), grads keyed like p)."""
    c_attn_cache, c_proj_cache, q, k, v, prob, hd = cache
    xp = array_module(dy)
    B, T, C = dy.shape
    H = C // hd
    do, g_proj = dense.dense_backward(dy.reshape(B * T, C), c_proj_cache)
    do = do.reshape(B, T, H, hd).transpose(0, 2, 1, 3)   # (B, H, T, hd)
    dqkv = xp.empty((B, T, 3, H, hd), dtype=dy.dtype)
    dq = dqkv[:, :, 0].transpose(0, 2, 1, 3)
    dk = dqkv[:, :, 1].transpose(0, 2, 1, 3)
    dv = dqkv[:, :, 2].transpose(0, 2, 1, 3)
    edges = _edges(T, _blocked(prob))
    _tril_t_matmul(prob, do, dv, edges)
    dp = xp.empty_like(prob)
    _matmul_lower_part(do, v.transpose(0, 1, 3, 2), dp, edges)
    ds = _causal_softmax_backward(dp, prob)              # lower-triangular
    # S = (Q / sqrt(hd)) K^T, with q already scaled: dQ = dS K / sqrt(hd), dK = dS^T q.
    _tril_matmul(ds, k, dq, edges)
    dq *= 1.0 / math.sqrt(hd)
    _tril_t_matmul(ds, q, dk, edges)
    dx, g_attn = dense.dense_backward(dqkv.reshape(B * T, 3 * C), c_attn_cache)
    return dx.reshape(B, T, C), {"c_attn": g_attn, "c_proj": g_proj}


# --- generation: one token at a time against a preallocated KV cache --------------------------------


def init_kv_cache(batch, config, dtype, xp=np):
    """-> {"k": (B, H, context, hd), "v": (B, H, context, hd)} zeros of array module xp."""
    C = int(config["d_model"])
    H, hd = _heads(config, C)
    shape = (batch, H, int(config["context"]), hd)
    return {"k": xp.zeros(shape, dtype=dtype), "v": xp.zeros(shape, dtype=dtype)}


def attention_step(x_t, p, config, kv_cache, pos):
    """x_t: (B, C), the token at position `pos` -> (y_t: (B, C), kv_cache).

    Writes this token's key and value at `pos` of kv_cache (in place) and attends over positions
    0..pos; equals row `pos` of attention_forward on the whole prefix.
    """
    xp = array_module(x_t)
    B, C = x_t.shape
    H, hd = _heads(config, C)
    if not 0 <= pos < kv_cache["k"].shape[2]:
        raise ValueError(f"position {pos} is outside the KV cache of {kv_cache['k'].shape[2]} positions")
    conv1d = dense.mode(config, "in_out")
    qkv, _ = dense.dense_forward(x_t, p["c_attn"], conv1d)
    qkv = qkv.reshape(B, 3, H, hd)
    kv_cache["k"][:, :, pos] = qkv[:, 1]
    kv_cache["v"][:, :, pos] = qkv[:, 2]
    keys = kv_cache["k"][:, :, : pos + 1]                 # (B, H, L, hd)
    values = kv_cache["v"][:, :, : pos + 1]
    q = qkv[:, 0, :, None, :] * (1.0 / math.sqrt(hd))    # (B, H, 1, hd)
    s = q @ keys.transpose(0, 1, 3, 2)                    # (B, H, 1, L)
    e = kernels.pick("softmax", "rows", s)(s)
    o = (e @ values).reshape(B, C)
    y, _ = dense.dense_forward(o, p["c_proj"], conv1d)
    return y, kv_cache
