"""Causal (lower-triangular) softmax over attention scores, forward and backward, in place.

For scores s: (..., T, T) and each row i, with the future masked (j > i gets weight exactly 0):

    p_ij = exp(s_ij - m_i) / sum_{k<=i} exp(s_ik - m_i)   for j <= i,   m_i = max_{k<=i} s_ik
    p_ij = 0                                               for j > i
    backward:  ds_ij = p_ij (dp_ij - sum_k dp_ik p_ik)     (ds_ij = 0 for j > i, since p_ij = 0)

The NumPy reference masks with -inf and runs the full rows (the specification). The Numba forward
subtracts the row maximum of the j <= i half and writes -inf above the diagonal in one pass, leaves
exp to NumPy (vectorised; Numba without SVML calls a scalar libm exp per element, 2x slower here) and
normalises the j <= i half in a second pass; the backward is one pass over the j <= i half. Rows are
reduced sequentially in a fixed order (deterministic). No fastmath. `softmax_rows_*` is the plain
(unmasked) softmax of the decoding step, where a few short rows make one Numba call cheaper than
NumPy's five.

The kernels are serial on purpose: they run between BLAS calls whose OpenBLAS worker threads keep
spinning on the other cores for a while after each GEMM; on a 2-core machine a parallel Numba region
(OpenMP layer) fought them and made both the kernel and the next GEMM slower (measured: GELU 6 ms
serial vs 15-20 ms parallel, the following GEMM 18 vs 23 ms).
"""

import math

import numba
import numpy as np

from minillm.arrays import array_module



def _check(s):
    if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
        raise ValueError(f"causal softmax needs square score matrices (..., T, T), got {s.shape}")


# --- NumPy reference (the specification) ------------------------------------------------------------


def causal_reference(s):
    """s: (..., T, T) float -> p (the same array, overwritten)."""
    _check(s)
    xp = array_module(s)
    T = s.shape[-1]
    future = xp.triu(xp.ones((T, T), dtype=bool), 1)
    s[..., future] = -xp.inf
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def causal_backward_reference(dp, p):
    """dp, p: (..., T, T) -> ds (dp's array, overwritten)."""
    _check(dp)
    dp -= (dp * p).sum(axis=-1, keepdims=True)
    dp *= p
    return dp


def rows_reference(s):
    """s: (..., L) -> plain softmax over the last axis, in place (the decoding step: no mask)."""
    s -= s.max(axis=-1, keepdims=True)
    array_module(s).exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


# --- log-softmax and cross-entropy (no Numba twin: one NumPy pass is already fast; CUDA in softmax_cuda) ---


def log_softmax(x, axis=-1):
    """log softmax along `axis` (forward only; cross_entropy has the fused backward)."""
    xp = array_module(x)
    z = x - x.max(axis=axis, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))


def cross_entropy_forward_reference(logits, targets, ignore_index=-100):
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


def cross_entropy_backward_reference(dloss, cache):
    """dloss: scalar -> dlogits: same shape as logits. d/dz of -log softmax(z)_t = softmax(z) - onehot(t)."""
    logp, safe_t, keep, n, shape = cache
    xp = array_module(logp)
    d = xp.exp(logp)
    d[xp.arange(d.shape[0]), safe_t] -= 1.0
    d *= (keep * (dloss / n))[:, None].astype(d.dtype, copy=False)
    return d.reshape(shape)


cross_entropy_forward = cross_entropy_forward_reference
cross_entropy_backward = cross_entropy_backward_reference


# --- Numba CPU kernels ------------------------------------------------------------------------------


@numba.njit(cache=True)
def _shift_and_mask(s):
    n, T, _ = s.shape
    for r in range(n * T):
        row = s[r // T, r % T]
        i = r % T
        m = row[0]
        for j in range(1, i + 1):
            m = max(m, row[j])
        for j in range(i + 1):
            row[j] -= m
        for j in range(i + 1, T):
            row[j] = -np.inf


@numba.njit(cache=True)
def _normalise(s):
    n, T, _ = s.shape
    for r in range(n * T):
        row = s[r // T, r % T]
        i = r % T
        total = 0.0
        for j in range(i + 1):
            total += row[j]
        inv = 1.0 / total
        for j in range(i + 1):
            row[j] *= inv


@numba.njit(cache=True)
def _softmax_backward_rows(dp, p):
    n, T, _ = dp.shape
    for r in range(n * T):
        d = dp[r // T, r % T]
        pr = p[r // T, r % T]
        i = r % T
        dot = 0.0
        for j in range(i + 1):
            dot += d[j] * pr[j]
        for j in range(i + 1):
            d[j] = pr[j] * (d[j] - dot)
        for j in range(i + 1, T):
            d[j] = 0.0


@numba.njit(cache=True)
def _plain_rows(s):
    for r in range(s.shape[0]):
        row = s[r]
        m = row[0]
        for j in range(1, row.size):
            m = max(m, row[j])
        total = 0.0
        for j in range(row.size):
            row[j] = math.exp(row[j] - m)
            total += row[j]
        inv = 1.0 / total
        for j in range(row.size):
            row[j] *= inv


def rows(s):
    """As rows_reference, in one call (few short rows: the one-token decoding step)."""
    if not s.flags.c_contiguous:
        raise ValueError("rows needs a C-contiguous array")
    _plain_rows(s.reshape(-1, s.shape[-1]))
    return s


def causal(s):
    """s: (..., T, T) C-contiguous float32/float64 -> p (the same array, overwritten)."""
    _check(s)
    if not s.flags.c_contiguous:
        raise ValueError("causal needs a C-contiguous array")
    s3 = s.reshape(-1, s.shape[-2], s.shape[-1])
    _shift_and_mask(s3)
    np.exp(s, out=s)          # NumPy's vectorised exp; exp(-inf) = 0 exactly above the diagonal
    _normalise(s3)
    return s


def causal_backward(dp, p):
    """dp, p: (..., T, T) C-contiguous -> ds (dp's array, overwritten)."""
    _check(dp)
    if dp.shape != p.shape or not (dp.flags.c_contiguous and p.flags.c_contiguous):
        raise ValueError("causal_backward needs two C-contiguous arrays of one shape")
    T = dp.shape[-1]
    _softmax_backward_rows(dp.reshape(-1, T, T), p.reshape(-1, T, T))
    return dp
