"""Causal grouped-query self-attention with rotary embeddings (HF LlamaAttention, MistralAttention).

    heads(config) -> (H, H_kv, hd)
    rotary(config, positions, dtype, xp) -> (cos, sin)                each (T, hd/2), see nn/rope.py
    gqa_forward(x, p, config, rot=None) -> (y, AttentionCache)       x, y: (B, T, C)
    gqa_backward(dy, cache) -> (dx, grads)                           grads keyed like p
    init_kv_cache(batch, config, dtype, xp) -> {"k", "v"}            each (B, H_kv, capacity, hd)
    gqa_step(x_t, p, config, kv, pos) -> (y_t, kv)                   x_t, y_t: (B, C), the token at `pos`

p is keyed like HF LlamaAttention, nn.Linear (out, in) weights, no biases (attention_bias=False; a "bias"
entry would be used): q_proj (H hd, C), k_proj (H_kv hd, C), v_proj (H_kv hd, C), o_proj (C, H hd). Every
projection goes through the dense hook (nn/dense.py, layout "out_in"): LoRA and ternary plug in here.

Math (Ainslie et al. 2023, GQA): H query heads share H_kv key/value heads (H_kv divides H, G = H / H_kv);
query head h reads kv head h // G, as HF's repeat_kv. H_kv = H is multi-head attention, H_kv = 1
multi-query attention (Shazeer 2019). Queries and keys are rotated by their position (RoPE, nn/rope.py)
before the scores, so a score depends on positions only through their difference:

    per head: Y = softmax(R(Q) R(K)^T / sqrt(hd) + M) V,    M_ij = -inf unless i - W < j <= i

with W = config["sliding_window"] (Mistral; HF's sliding_window_overlay: kv_idx > q_idx - W) or no lower
bound when it is None. HF masks with the dtype's minimum; both give weight exactly 0.

No K/V copies per query head: the G query heads of one kv head are stacked as G T rows (Q is laid out
(B, H_kv, G T, hd)), so each product is one GEMM per (batch, kv head) over nn/blas.bmm's threads, and
the backward's sums over the G heads of dK, dV happen inside those GEMMs. The masked softmax runs in the
causal softmax kernel (kernels/softmax.py), which writes exact zeros above the diagonal.

KV cache: keys are stored rotated, at their absolute position, so a step at position `pos` rotates its
query and key by `pos` and continues the phase of the prefix; the step equals row `pos` of the full
forward. The cache doubles when full (RoPE has no position table that bounds a sequence; `context` is the
trained length). With a sliding window the step reads only the last W keys.
"""

import math
from typing import NamedTuple

import numpy as np

from minillm import kernels
from minillm.arrays import array_module
from minillm.nn import dense, rope
from minillm.nn.blas import bmm

DEFAULT_THETA = 10000.0


class AttentionCache(NamedTuple):
    q_proj: tuple
    k_proj: tuple
    v_proj: tuple
    o_proj: tuple
    q: object           # (B, H, T, hd): rotated queries, scaled by 1 / sqrt(hd)
    k: object           # (B, H_kv, T, hd): rotated keys
    v: object           # (B, H_kv, T, hd): a strided view of the v_proj output
    prob: object        # (B, H, T, T): attention weights, zero where masked
    rot: tuple          # (cos, sin), each (T, hd/2)
    heads: tuple        # (H, H_kv, hd)


def heads(config):
    """-> (n_head, n_kv_head, head_dim) of config, checked: n_kv_head (default n_head) divides n_head,
    head_dim = config["head_dim"] or d_model / n_head, even."""
    C, H = int(config["d_model"]), int(config["n_head"])
    Hkv = int(config.get("n_kv_head") or H)
    if not 1 <= Hkv <= H or H % Hkv:
        raise ValueError(f"n_kv_head {Hkv} must divide n_head {H}")
    hd = config.get("head_dim")
    if hd is None:
        if C % H:
            raise ValueError(f"d_model {C} is not divisible by n_head {H}")
        hd = C // H
    if int(hd) % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {hd}")
    return H, Hkv, int(hd)


def rotary(config, positions, dtype, xp=np):
    """(cos, sin) tables for `positions` (ints), each (len(positions), hd/2), theta = config["rope_theta"]."""
    return rope.tables(positions, heads(config)[2], config.get("rope_theta", DEFAULT_THETA), dtype, xp)


def _window(config):
    w = config.get("sliding_window")
    if w is not None and int(w) < 1:
        raise ValueError(f"sliding_window must be positive, got {w}")
    return None if w is None else int(w)


def _split_heads(a, B, T, n, hd):
    """a: (B*T, n hd) -> (B, n, T, hd), a strided view."""
    return a.reshape(B, T, n, hd).transpose(0, 2, 1, 3)


def _merge_heads(a):
    """a: (B, n, T, hd) -> (B*T, n hd), a copy in token order."""
    B, n, T, hd = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B * T, n * hd)


def gqa_forward(x, p, config, rot=None):
    """x: (B, T, C) -> y: (B, T, C). rot: (cos, sin) for positions 0..T-1 (computed when None; a model
    computes them once for all its layers). Returns (y, AttentionCache)."""
    xp = array_module(x)
    B, T, C = x.shape
    H, Hkv, hd = heads(config)
    G = H // Hkv
    if rot is None:
        rot = rotary(config, np.arange(T), x.dtype, xp)
    linear = dense.mode(config, "out_in")
    x2 = x.reshape(B * T, C)
    q, c_q = dense.dense_forward(x2, p["q_proj"], linear)
    k, c_k = dense.dense_forward(x2, p["k_proj"], linear)
    v, c_v = dense.dense_forward(x2, p["v_proj"], linear)
    q, _ = rope.rope_forward(_split_heads(q, B, T, H, hd), *rot)      # (B, H, T, hd), contiguous
    k, _ = rope.rope_forward(_split_heads(k, B, T, Hkv, hd), *rot)    # (B, H_kv, T, hd)
    v = _split_heads(v, B, T, Hkv, hd)
    q *= 1.0 / math.sqrt(hd)
    s = xp.empty((B, H, T, T), dtype=x.dtype)
    bmm(q.reshape(B, Hkv, G * T, hd), k.transpose(0, 1, 3, 2), out=s.reshape(B, Hkv, G * T, T))
    window = _window(config)
    if window is not None and window < T:
        s[..., xp.tril(xp.ones((T, T), dtype=bool), -window)] = -xp.inf   # keys at j <= i - W
    prob = kernels.pick("softmax", "causal", s)(s)
    o = bmm(prob.reshape(B, Hkv, G * T, T), v)                       # (B, H_kv, G T, hd) = (B, H, T, hd)
    y, c_o = dense.dense_forward(_merge_heads(o.reshape(B, H, T, hd)), p["o_proj"], linear)
    return y.reshape(B, T, C), AttentionCache(c_q, c_k, c_v, c_o, q, k, v, prob, rot, (H, Hkv, hd))


def gqa_backward(dy, cache):
    """dy: (B, T, C) -> (dx: (B, T, C), grads keyed like p)."""
    xp = array_module(dy)
    B, T, C = dy.shape
    H, Hkv, hd = cache.heads
    G = H // Hkv
    do, g_o = dense.dense_backward(dy.reshape(B * T, C), cache.o_proj)
    do = xp.ascontiguousarray(_split_heads(do, B, T, H, hd)).reshape(B, Hkv, G * T, hd)
    prob = cache.prob.reshape(B, Hkv, G * T, T)
    dv = bmm(prob.transpose(0, 1, 3, 2), do)                          # (B, H_kv, T, hd), summed over G
    dp = bmm(do, cache.v.transpose(0, 1, 3, 2))                       # (B, H_kv, G T, T)
    ds = kernels.pick("softmax", "causal_backward", dp)(dp.reshape(B, H, T, T), cache.prob)
    ds = ds.reshape(B, Hkv, G * T, T)
    # S = q k^T with q already scaled by 1/sqrt(hd): d(rotated Q) = dS k / sqrt(hd), d(rotated K) = dS^T q
    dq = bmm(ds, cache.k)
    dq *= 1.0 / math.sqrt(hd)
    dk = bmm(ds.transpose(0, 1, 3, 2), cache.q.reshape(B, Hkv, G * T, hd))
    dq = rope.rope_backward(dq.reshape(B, H, T, hd), cache.rot)
    dk = rope.rope_backward(dk, cache.rot)
    dx, g_q = dense.dense_backward(_merge_heads(dq), cache.q_proj)
    dxk, g_k = dense.dense_backward(_merge_heads(dk), cache.k_proj)
    dxv, g_v = dense.dense_backward(_merge_heads(dv), cache.v_proj)
    dx += dxk
    dx += dxv
    return dx.reshape(B, T, C), {"q_proj": g_q, "k_proj": g_k, "v_proj": g_v, "o_proj": g_o}


# --- generation: one token at a time against a growing KV cache -------------------------------------


def init_kv_cache(batch, config, dtype, xp=np, capacity=None):
    """-> {"k": (B, H_kv, capacity, hd), "v": ...} zeros; capacity defaults to config["context"]."""
    _, Hkv, hd = heads(config)
    shape = (batch, Hkv, int(capacity or config["context"]), hd)
    return {"k": xp.zeros(shape, dtype=dtype), "v": xp.zeros(shape, dtype=dtype)}


def _room(kv, pos):
    """Double the cache (in place in the dict) until position `pos` fits."""
    cap = kv["k"].shape[2]
    if pos < cap:
        return
    xp = array_module(kv["k"])
    new = max(2 * cap, pos + 1)
    for key in ("k", "v"):
        old = kv[key]
        kv[key] = xp.zeros(old.shape[:2] + (new,) + old.shape[3:], dtype=old.dtype)
        kv[key][:, :, :cap] = old


def gqa_step(x_t, p, config, kv, pos, rot=None):
    """x_t: (B, C), the tokens at position `pos` -> (y_t: (B, C), kv). Writes the rotated key and the value
    at `pos` (in place; the cache grows when full) and attends over positions max(0, pos - W + 1)..pos.
    rot: (cos, sin) of position pos, each (1, hd/2) (computed when None)."""
    xp = array_module(x_t)
    B, C = x_t.shape
    H, Hkv, hd = heads(config)
    G = H // Hkv
    if pos < 0:
        raise ValueError(f"position {pos} is negative")
    if rot is None:
        rot = rotary(config, [pos], x_t.dtype, xp)
    linear = dense.mode(config, "out_in")
    q, _ = dense.dense_forward(x_t, p["q_proj"], linear)
    k, _ = dense.dense_forward(x_t, p["k_proj"], linear)
    v, _ = dense.dense_forward(x_t, p["v_proj"], linear)
    q, _ = rope.rope_forward(q.reshape(B, H, 1, hd), *rot)
    k, _ = rope.rope_forward(k.reshape(B, Hkv, 1, hd), *rot)
    _room(kv, pos)
    kv["k"][:, :, pos] = k[:, :, 0]
    kv["v"][:, :, pos] = v.reshape(B, Hkv, hd)
    window = _window(config)
    lo = 0 if window is None else max(0, pos - window + 1)
    keys, values = kv["k"][:, :, lo:pos + 1], kv["v"][:, :, lo:pos + 1]      # (B, H_kv, L, hd)
    q = q.reshape(B, Hkv, G, hd) * (1.0 / math.sqrt(hd))
    s = q @ keys.transpose(0, 1, 3, 2)                                         # (B, H_kv, G, L)
    e = kernels.pick("softmax", "rows", s)(s)
    o = (e @ values).reshape(B, H * hd)
    y, _ = dense.dense_forward(o, p["o_proj"], linear)
    return y, kv
