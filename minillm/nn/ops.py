"""Primitive forward/backward pairs.

Every `*_forward` returns `(y, cache)`; the matching `*_backward(dy, cache)` returns the gradients of
the forward's array arguments, in order. Pure functions: no state, dtype flows from the inputs, and the
array module comes from the inputs (`array_module`) so the same code runs on NumPy and CuPy.
This module imports nothing else of minillm.
"""

import math

import numpy as np


def array_module(x):
    """numpy for host arrays, cupy for device arrays (cupy is imported only if x is one of its arrays)."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


# --- linear and embedding -------------------------------------------------------------------------


def linear_forward(x, w, b=None):
    """x: (..., I), w: (I, O), b: (O,) or None -> y: (..., O) = x @ w + b."""
    y = x @ w
    if b is not None:
        y = y + b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    """dy: (..., O) -> (dx: (..., I), dw: (I, O), db: (O,) or None)."""
    x, w, has_bias = cache
    dx = dy @ w.T
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dw = x2.T @ dy2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dw, db


def embedding_forward(ids, w):
    """ids: (...) int, w: (V, C) -> y: (..., C)."""
    return w[ids], (ids, w.shape)


def embedding_backward(dy, cache):
    """dy: (..., C) -> dw: (V, C); repeated ids accumulate."""
    ids, shape = cache
    xp = array_module(dy)
    dw = xp.zeros(shape, dtype=dy.dtype)
    xp.add.at(dw, ids.reshape(-1), dy.reshape(-1, shape[1]))
    return dw


# --- normalisation --------------------------------------------------------------------------------


def layernorm_forward(x, w, b, eps=1e-5):
    """x: (..., C), w, b: (C,) -> y: (..., C); biased variance, as torch.nn.LayerNorm."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    rstd = 1.0 / ((xc * xc).mean(axis=-1, keepdims=True) + eps) ** 0.5
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dy, cache):
    """dy: (..., C) -> (dx, dw, db)."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)
    db = dy.reshape(-1, C).sum(axis=0)
    g = dy * w
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dw, db


def rmsnorm_forward(x, w, eps=1e-5):
    """x: (..., C), w: (C,) -> y = x / sqrt(mean(x^2) + eps) * w."""
    rstd = 1.0 / ((x * x).mean(axis=-1, keepdims=True) + eps) ** 0.5
    xhat = x * rstd
    return xhat * w, (xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    """dy: (..., C) -> (dx, dw)."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)
    g = dy * w
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dw


# --- activations ----------------------------------------------------------------------------------

_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """GELU, tanh approximation (HF `gelu_new`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    xp = array_module(x)
    t = xp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    x, t = cache
    dinner = _GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner)


def sigmoid_forward(x):
    """sigmoid(x) = 1 / (1 + exp(-x)), computed without overflow for large |x|."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    s = xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
    return s, s


def sigmoid_backward(dy, cache):
    s = cache
    return dy * s * (1.0 - s)


def silu_forward(x):
    """SiLU(x) = x * sigmoid(x)."""
    s, _ = sigmoid_forward(x)
    return x * s, (x, s)


def silu_backward(dy, cache):
    x, s = cache
    return dy * s * (1.0 + x * (1.0 - s))


def softplus_forward(x, threshold=20.0):
    """softplus(x) = log(1 + exp(x)); identity above `threshold`, as torch.nn.functional.softplus."""
    xp = array_module(x)
    big = x > threshold
    y = xp.where(big, x, xp.log1p(xp.exp(xp.minimum(x, threshold)))).astype(x.dtype, copy=False)
    return y, (x, big)


def softplus_backward(dy, cache):
    x, big = cache
    s, _ = sigmoid_forward(x)
    xp = array_module(dy)
    return dy * xp.where(big, 1.0, s).astype(dy.dtype, copy=False)


def relu_squared_forward(x):
    """relu(x)^2 (RWKV channel mixing)."""
    xp = array_module(x)
    r = xp.maximum(x, 0)
    return r * r, r


def relu_squared_backward(dy, cache):
    r = cache
    return 2.0 * dy * r


# --- softmax and loss -----------------------------------------------------------------------------


def softmax_forward(x, axis=-1):
    """Numerically stable softmax along `axis`."""
    xp = array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return y, (y, axis)


def softmax_backward(dy, cache):
    y, axis = cache
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


def log_softmax(x, axis=-1):
    """log softmax along `axis` (forward only; cross_entropy has the fused backward)."""
    xp = array_module(x)
    z = x - x.max(axis=axis, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """logits: (..., V), targets: (...) int -> mean negative log-likelihood over non-ignored targets.

    Targets equal to `ignore_index` contribute nothing (as torch). Returns (loss: float, cache).
    """
    xp = array_module(logits)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    t = targets.reshape(-1)
    keep = t != ignore_index
    n = int(keep.sum())
    if n == 0:
        raise ValueError("cross_entropy: every target is ignore_index")
    logp = log_softmax(flat)
    safe_t = xp.where(keep, t, 0)
    picked = logp[xp.arange(flat.shape[0]), safe_t]
    loss = -(picked * keep).sum() / n
    return float(loss), (logp, safe_t, keep, n, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dloss: scalar -> dlogits: same shape as logits. d/dz of -log softmax(z)_t = softmax(z) - onehot(t)."""
    logp, safe_t, keep, n, shape = cache
    xp = array_module(logp)
    d = xp.exp(logp)
    d[xp.arange(d.shape[0]), safe_t] -= 1.0
    d *= (keep * (dloss / n))[:, None].astype(d.dtype, copy=False)
    return d.reshape(shape)
