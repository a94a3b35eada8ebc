"""Causal softmax over attention scores (forward and backward, in place) and the cross-entropy loss.

For scores s: (..., T, T) and each row i, with the future masked (j > i gets weight exactly 0):

    p_ij = exp(s_ij - m_i) / sum_{k<=i} exp(s_ik - m_i)   for j <= i,   m_i = max_{k<=i} s_ik
    p_ij = 0                                               for j > i
    backward:  ds_ij = p_ij (dp_ij - sum_k dp_ik p_ik)     (ds_ij = 0 for j > i, since p_ij = 0)

The NumPy reference masks with -inf and runs the full rows (the specification). The Numba forward is
one pass per row over its j <= i half: the maximum, exp (kernels/fastexp.py's, vectorisable; NumPy's exp
is scalar on AVX2 machines), the sum and the scaling, and zeros above the diagonal; the backward is one
pass over the j <= i half. Rows run in parallel, in contiguous blocks; each row is reduced sequentially
in a fixed order, so the result does not depend on the thread count. No fastmath. `softmax_rows_*` is
the plain (unmasked) softmax of the decoding step, where a few short rows make one Numba call cheaper
than NumPy's five.

These kernels were serial once: OpenBLAS's and Numba's worker threads spinning after their calls fought
over the two cores (GELU 6 ms serial vs 15-20 ms parallel then). minillm/__init__.py's
OMP_WAIT_POLICY=PASSIVE ended that; in parallel, the forward at (16, 6, 256, 256) float32 takes 9.9 ms
against 27.4 ms for the serial version with NumPy's exp, the backward 8.2 against 12.8 ms (2-core AMD
EPYC).

Cross-entropy (the training loss) has a Numba pair too, parallel over rows. The forward takes each row's
log-sum-exp in one pass with kernels/fastexp.py's vectorisable exp, so it writes no (N, V) array; the
backward writes softmax - onehot in one pass from the cached logits and log-sum-exp. NumPy's exp is
scalar on this project's AVX2 machines (4.7 ms per million float32 values, fast_exp 0.8 ms), and the
reference makes five passes: at N = 2048, V = 2048 float32, forward + backward take 9 ms against 31-41 ms
(2-core AMD EPYC). The kernels equal the reference to a few ulps (fast_exp is within 2 ulp of exp).
"""

import math

import numba
import numpy as np

from minillm.arrays import array_module
from minillm.kernels.fastexp import fast_exp
from minillm.kernels.layernorm import sum8     # a row sum in 8 interleaved float64 partial sums (shared)

ROW_BLOCKS = 64     # causal softmax: parallel jobs, contiguous blocks of rows



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


# --- log-softmax and cross-entropy (the Numba pair is at the end; CUDA in softmax_cuda) ---


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


# --- Numba CPU kernels ------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _max8(row, n):
    """max(row[:n]) for n >= 1, over 8 interleaved running maxima (max is exact: the order does not matter;
    a NaN may be skipped here, but it still reaches the sum that follows, so the row becomes NaN)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    j = 0
    while j + 8 <= n:
        m0, m1, m2, m3 = max(m0, row[j]), max(m1, row[j + 1]), max(m2, row[j + 2]), max(m3, row[j + 3])
        m4, m5, m6, m7 = max(m4, row[j + 4]), max(m5, row[j + 5]), max(m6, row[j + 6]), max(m7, row[j + 7])
        j += 8
    while j < n:
        m0 = max(m0, row[j])
        j += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@numba.njit(cache=True, parallel=True, nogil=True)
def _causal_rows(s):
    n, T, _ = s.shape
    none = np.empty(0, dtype=s.dtype)
    for blk in numba.prange(ROW_BLOCKS):
        for r in range(n * T * blk // ROW_BLOCKS, n * T * (blk + 1) // ROW_BLOCKS):
            row = s[r // T, r % T]
            i = r % T
            m = _max8(row, i + 1)
            for j in range(i + 1):
                row[j] = fast_exp(row[j] - m)
            inv = row.dtype.type(1.0 / sum8(row, 0, i + 1, none))
            for j in range(i + 1):
                row[j] *= inv
            for j in range(i + 1, T):
                row[j] = 0.0


@numba.njit(cache=True, parallel=True, nogil=True)
def _softmax_backward_rows(dp, p):
    n, T, _ = dp.shape
    for blk in numba.prange(ROW_BLOCKS):
        for r in range(n * T * blk // ROW_BLOCKS, n * T * (blk + 1) // ROW_BLOCKS):
            d = dp[r // T, r % T]
            pr = p[r // T, r % T]
            i = r % T
            dot = d.dtype.type(sum8(d, 0, i + 1, pr))
            for j in range(i + 1):
                d[j] = pr[j] * (d[j] - dot)
            for j in range(i + 1, T):
                d[j] = 0.0


@numba.njit(cache=True, nogil=True)
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
    _causal_rows(s.reshape(-1, s.shape[-2], s.shape[-1]))
    return s


def causal_backward(dp, p):
    """dp, p: (..., T, T) C-contiguous -> ds (dp's array, overwritten)."""
    _check(dp)
    if dp.shape != p.shape or not (dp.flags.c_contiguous and p.flags.c_contiguous):
        raise ValueError("causal_backward needs two C-contiguous arrays of one shape")
    T = dp.shape[-1]
    _softmax_backward_rows(dp.reshape(-1, T, T), p.reshape(-1, T, T))
    return dp


# --- cross-entropy: one pass over the logits forward, one backward ----------------------------------
# Forward, per row n: m = max_j z_nj, lse_n = m + log sum_j exp(z_nj - m), loss_n = lse_n - z_n,t.
# Backward: dz_nj = (exp(z_nj - lse_n) - [j = t_n]) * dloss / n_kept, zero for ignored rows. The cache keeps
# the logits and lse (not log-probabilities), so neither pass writes an intermediate (N, V) array. Rows are
# independent (parallel), so the result does not depend on the thread count.


@numba.njit(cache=True, parallel=True, nogil=True)
def _ce_rows(z, t, ignore_index, lse, loss, flag):
    N, V = z.shape
    none = np.empty(0, dtype=z.dtype)
    for n in numba.prange(N):
        row = z[n]
        e = np.empty(V, dtype=z.dtype)
        m = _max8(row, V)
        for j in range(V):
            e[j] = fast_exp(row[j] - m)
        lse[n] = m + math.log(sum8(e, 0, V, none))
        target = t[n]
        if target == ignore_index:
            flag[n], loss[n] = 0, 0.0
        elif 0 <= target < V:
            flag[n], loss[n] = 1, lse[n] - row[target]
        else:
            flag[n], loss[n] = 2, 0.0


@numba.njit(cache=True, parallel=True, nogil=True)
def _ce_backward_rows(z, t, ignore_index, lse, scale, d):
    N, V = z.shape
    for n in numba.prange(N):
        if t[n] == ignore_index:
            d[n, :] = 0.0
            continue
        shift = z.dtype.type(lse[n])
        for j in range(V):
            d[n, j] = fast_exp(z[n, j] - shift) * scale
        d[n, t[n]] -= scale


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """As cross_entropy_forward_reference (float32/float64 logits (..., V), int targets (...))."""
    shape = logits.shape
    if logits.ndim < 1 or shape[-1] < 1 or targets.shape != shape[:-1]:
        raise ValueError(f"cross_entropy_forward: needs logits (..., V) and targets (...), got {shape} and "
                         f"{targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"cross_entropy_forward: targets must be integers, got {targets.dtype}")
    if logits.dtype not in (np.float32, np.float64):
        raise ValueError(f"cross_entropy_forward: logits must be float32 or float64, got {logits.dtype}")
    V = shape[-1]
    z = np.ascontiguousarray(logits).reshape(-1, V)
    t = np.ascontiguousarray(targets).reshape(-1).astype(np.int64, copy=False)
    N = z.shape[0]
    lse, loss, flag = np.empty(N), np.empty(N), np.empty(N, dtype=np.int8)
    _ce_rows(z, t, np.int64(ignore_index), lse, loss, flag)
    bad = int((flag == 2).sum())
    if bad:
        raise ValueError(f"cross_entropy_forward: {bad} targets outside [0, {V}) (and not ignore_index "
                         f"{ignore_index})")
    kept = int((flag == 1).sum())
    if kept == 0:
        raise ValueError("cross_entropy: every target is ignore_index")
    total = float(loss.sum())       # float64, in NumPy's fixed pairwise order
    cache = dict(logits=z, targets=t, ignore_index=int(ignore_index), lse=lse, n=kept, shape=shape)
    return total / kept, cache


def cross_entropy_backward(dloss, cache):
    """dloss: scalar -> dlogits: (..., V) of the logits' dtype."""
    z = cache["logits"]
    d = np.empty_like(z)
    _ce_backward_rows(z, cache["targets"], np.int64(cache["ignore_index"]), cache["lse"],
                      z.dtype.type(float(dloss) / cache["n"]), d)
    return d.reshape(cache["shape"])
