"""Rotary position embedding (RoPE, Su et al. 2021, "RoFormer", eq. 34) in Hugging Face's layout.

    frequencies(head_dim, theta) -> inv_freq (hd/2,) float64      theta_i = theta^(-2i / hd)
    tables(positions, head_dim, theta, dtype, xp) -> (cos, sin)    each (T, hd/2): cos(p theta_i), sin(p theta_i)
    rope_forward(x, cos, sin) -> (y, cache)                        x, y: (..., T, hd), e.g. (B, H, T, hd)
    rope_backward(dy, cache) -> dx

The layout is HF's half-split `rotate_half` (LlamaRotaryEmbedding / apply_rotary_pos_emb): dimension i of
the first half is paired with dimension i + hd/2, and the pair is turned by the angle p theta_i of the
token's position p:

    y[:h] = x[:h] cos - x[h:] sin,    y[h:] = x[h:] cos + x[:h] sin         (h = hd / 2)

which is HF's q * cat(cos, cos) + rotate_half(q) * cat(sin, sin) with rotate_half(x) = cat(-x[h:], x[:h]).
The map is a rotation, so the backward is the rotation by -p theta_i:

    dx[:h] = dy[:h] cos + dy[h:] sin,   dx[h:] = dy[h:] cos - dy[:h] sin

Meta's original code pairs interleaved dimensions instead, (x[2i], x[2i+1]) as one complex number times
e^{i p theta_i} (`apply_rotary_emb` with torch.view_as_complex). Both rotate the same pairs by the same
angles once the head dimensions are permuted: interleaved index 2i + j (j = 0, 1) is half-split index
j h + i. HF's convert_llama_weights_to_hf.py applies that permutation to the rows of W_q and W_k, head
by head (`permute(w) = w.view(n_heads, hd/2, 2, dim).transpose(1, 2).reshape(dim, dim)`); since a score
q . k is unchanged when q and k are permuted alike, the converted model computes the same attention
(v and o are not touched). So a Meta checkpoint needs that permutation, an HF one none
(tests/test_rope.py checks the equivalence).

The tables are computed in float64 and rounded to the activations' dtype. HF computes inv_freq, the
angles and cos / sin in float32 (then casts them to the input dtype), so an HF float64 model is only
float32-accurate here: the float64 cross-checks patch that (tests/peers.py, llama_float64).
"""

import numpy as np

from minillm.arrays import array_module


def frequencies(head_dim, theta=10000.0):
    """-> inv_freq: (head_dim / 2,) float64, theta^(-2i / head_dim) for i = 0 .. head_dim/2 - 1."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"rope_theta must be positive, got {theta}")
    return 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def tables(positions, head_dim, theta=10000.0, dtype=np.float64, xp=np):
    """positions: (T,) ints -> (cos, sin), each (T, head_dim / 2) of `dtype` in array module xp."""
    angles = np.asarray(positions, dtype=np.float64)[:, None] * frequencies(head_dim, theta)[None, :]
    return xp.asarray(np.cos(angles), dtype=dtype), xp.asarray(np.sin(angles), dtype=dtype)


def rope_forward(x, cos, sin):
    """x: (..., T, hd), cos, sin: (T, hd/2) -> y: (..., T, hd), a new C-contiguous array. Returns (y, cache)."""
    xp = array_module(x)
    h = x.shape[-1] // 2
    if cos.shape != (x.shape[-2], h):
        raise ValueError(f"rotary tables {cos.shape} do not fit x {x.shape}")
    x1, x2 = x[..., :h], x[..., h:]
    y = xp.empty(x.shape, dtype=x.dtype)
    y[..., :h] = x1 * cos - x2 * sin
    y[..., h:] = x2 * cos + x1 * sin
    return y, (cos, sin)


def rope_backward(dy, cache):
    """dy: (..., T, hd) -> dx: (..., T, hd)."""
    cos, sin = cache
    xp = array_module(dy)
    h = dy.shape[-1] // 2
    d1, d2 = dy[..., :h], dy[..., h:]
    dx = xp.empty(dy.shape, dtype=dy.dtype)
    dx[..., :h] = d1 * cos + d2 * sin
    dx[..., h:] = d2 * cos - d1 * sin
    return dx
