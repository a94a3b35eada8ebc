"""Primitive forward/backward pairs.

Every `*_forward` returns `(y, cache)`; the matching `*_backward(dy, cache)` returns the gradients of
the forward's array arguments, in order. Pure functions: no state, dtype flows from the inputs, and the
array module comes from the inputs (`array_module`) so the same code runs on NumPy and CuPy.
The ops that have kernels (embedding backward, layernorm, gelu, cross-entropy) take their implementation
from the one dispatch, kernels.pick; their NumPy reference is in kernels/<op>.py. This module imports
only minillm.kernels and minillm.arrays.
"""

from minillm import kernels
from minillm.arrays import array_module
from minillm.kernels.softmax import log_softmax


# --- linear and embedding -------------------------------------------------------------------------


def linear_forward(x, w, b=None):
    """x: (..., I), w: (I, O), b: (O,) or None -> y: (..., O) = x @ w + b."""
    y = x @ w
    if b is not None:
        y += b               # into the product's new array: no second (..., O) array
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


def embedding_backward(dy, cache, out=None):
    """dy: (..., C) -> dw: (V, C), added into `out` when given. Repeated ids accumulate in a fixed order on
    every device (cupy.add.at would add them atomically, in another order each run)."""
    ids, shape = cache
    return kernels.pick("embedding", "backward", dy)(dy, ids, shape, out=out)


# --- normalisation --------------------------------------------------------------------------------


def layernorm_forward(x, w, b, eps=1e-5):
    """x: (..., C), w, b: (C,) -> y: (..., C); biased variance, as torch.nn.LayerNorm (kernels/layernorm.py)."""
    return kernels.pick("layernorm", "forward", x)(x, w, b, eps)


def layernorm_backward(dy, cache):
    """dy: (..., C) -> (dx, dw, db)."""
    return kernels.pick("layernorm", "backward", dy)(dy, cache)


def layernorm_rows(x, w, b, eps=1e-5):
    """Forward only, no cache: LayerNorm of a few rows (the decoding step), in one kernel call."""
    return kernels.pick("layernorm", "rows", x)(x, w, b, eps)


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

def gelu_forward(x):
    """GELU, tanh approximation (HF `gelu_new`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (kernels/gelu.py)."""
    return kernels.pick("gelu", "forward", x)(x)


def gelu_backward(dy, cache):
    return kernels.pick("gelu", "backward", dy)(dy, cache)


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


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """logits: (..., V), targets: (...) int -> mean negative log-likelihood over non-ignored targets.

    Targets equal to `ignore_index` contribute nothing (as torch). Returns (loss: float, cache); on a GPU
    one fused kernel, with only the loss crossing to the host (kernels/softmax.py, softmax_cuda.py).
    """
    loss, cache = kernels.pick("softmax", "cross_entropy_forward", logits)(logits, targets, ignore_index)
    return loss, (kernels.pick("softmax", "cross_entropy_backward", logits), cache)


def cross_entropy_backward(dloss, cache):
    """dloss: scalar -> dlogits: same shape as logits. d/dz of -log softmax(z)_t = softmax(z) - onehot(t)."""
    backward, inner = cache
    return backward(dloss, inner)
