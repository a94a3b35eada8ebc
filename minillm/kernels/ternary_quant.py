"""BitNet b1.58 fake quantisation for training (BitLinear, nn/ternary.py): NumPy reference and Numba kernels.

    weight_quant(w, eps) -> (w_q, s)        s = max(mean |w|, eps) (per tensor), w_q = clip(rint(w (1/s)), -1, 1)
    activation_quant(x, eps) -> (x_q, a)    a = 127 / max(max_j |x_j|, eps) (per row), x_q = clip(rint(x a), -128, 127)
    rescale(acc, s, a, b) -> y              y = acc (s / a) + b    (acc = x_q w_q^T: the integer-valued product)
    weight_dequant(w_q, s) -> s w_q         activation_dequant(x_q, a) -> x_q / a
                                            (the straight-through backward's operands, nn/ternary.py)

Shapes: w any shape (contiguous for the kernel); x: (..., C) with a: (..., 1); acc: (..., O), b: (O,) or None.
Every output keeps its input's float dtype; s is a scalar of w's dtype.

The kernels give the reference's bits exactly. Elementwise steps round as NumPy does (one operation
at a time, no fma, no fastmath); the one reduction that depends on order, sum |w| for the mean, is
NumPy's own pairwise summation (numpy/_core/src/umath/loops_utils.h.src, pairwise_sum: blocks of at most
128 summed in 8 interleaved accumulators, longer runs split in two at a multiple of 8), so the sum is
bit-identical to `np.abs(w).mean()` on a contiguous array. The top levels of that recursion are cut into
up to 2^DEPTH leaves summed in parallel and then added back pairwise in the recursion's order, so the
result does not depend on the thread count. NumPy's mean then divides in float64 and rounds to w's dtype;
so does the kernel. The maxima are order-free. NaN propagates as in np.maximum / np.clip.

The CUDA twins (ternary_quant_cuda.py) are these references on CuPy arrays. This module imports
nothing else of minillm but minillm.arrays.
"""

import numba
import numpy as np
from numba import prange

from minillm.arrays import array_module

QMIN, QMAX = -128, 127
BLOCK = 128     # numpy's PW_BLOCKSIZE
DEPTH = 6       # up to 64 parallel leaves of the pairwise sum
MIN_LEAF = 4096  # ... each of at least this many elements


# --- NumPy reference (the specification; array-module generic, so CuPy runs it too) ------------------


def weight_quant_reference(w, eps):
    """w: any shape (float) -> (w_q: same shape and dtype in {-1, 0, 1}, s: scalar of w's dtype)."""
    xp = array_module(w)
    s = xp.maximum(xp.abs(w).mean(), w.dtype.type(eps))
    inv = w.dtype.type(1) / s  # HF rounds w * (1 / s)
    return xp.clip(xp.rint(w * inv), -1, 1), s


def activation_quant_reference(x, eps):
    """x: (..., C) float -> (x_q: (..., C) same dtype, integers in [-128, 127]; a: (..., 1))."""
    xp = array_module(x)
    a = QMAX / xp.maximum(xp.abs(x).max(axis=-1, keepdims=True), x.dtype.type(eps))
    return xp.clip(xp.rint(x * a), QMIN, QMAX), a


def rescale_reference(acc, s, a, b=None):
    """acc: (..., O), s: scalar, a: (..., 1), b: (O,) or None -> y = acc (s / a) + b."""
    y = acc * (s / a)
    return y if b is None else y + b


def weight_dequant_reference(wq, s):
    """w_q: any shape, s: scalar -> s w_q (the weight the straight-through backward multiplies by)."""
    return wq * s


def activation_dequant_reference(xq, a):
    """x_q: (..., C), a: (..., 1) -> x_q / a."""
    return xq / a


# --- Numba CPU kernels --------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _pairwise_abs_sum(v, zero):
    """numpy's pairwise_sum of |v| (v: 1-D contiguous), in v's dtype. (Kernels index views from 0: LLVM
    then drops Numba's negative-index wraparound and vectorises.)"""
    n = v.shape[0]
    if n < 8:
        res = zero
        for i in range(n):
            res += abs(v[i])
        return res
    if n <= BLOCK:
        r0, r1, r2, r3 = abs(v[0]), abs(v[1]), abs(v[2]), abs(v[3])
        r4, r5, r6, r7 = abs(v[4]), abs(v[5]), abs(v[6]), abs(v[7])
        m = n - n % 8
        for i in range(8, m, 8):
            r0 += abs(v[i])
            r1 += abs(v[i + 1])
            r2 += abs(v[i + 2])
            r3 += abs(v[i + 3])
            r4 += abs(v[i + 4])
            r5 += abs(v[i + 5])
            r6 += abs(v[i + 6])
            r7 += abs(v[i + 7])
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for i in range(m, n):
            res += abs(v[i])
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_abs_sum(v[:n2], zero) + _pairwise_abs_sum(v[n2:], zero)


def _leaves(n):
    """(starts, lengths) of the 2^d nodes at depth d of pairwise_sum's recursion over n elements, d as deep
    as DEPTH allows while every node above stays longer than BLOCK (it splits) and leaves hold >= MIN_LEAF."""
    nodes = [(0, n)]
    for _ in range(DEPTH):
        if any(m <= BLOCK or m // 2 < MIN_LEAF for _, m in nodes):
            break
        split = []
        for lo, m in nodes:
            m2 = m // 2 - (m // 2) % 8
            split += [(lo, m2), (lo + m2, m - m2)]
        nodes = split
    return np.array([lo for lo, _ in nodes], np.int64), np.array([m for _, m in nodes], np.int64)


@numba.njit(parallel=True, cache=True, nogil=True)
def _abs_sum_kernel(a, starts, lengths, zero):
    parts = np.empty(starts.shape[0], a.dtype)
    for i in prange(starts.shape[0]):
        parts[i] = _pairwise_abs_sum(a[starts[i]:starts[i] + lengths[i]], zero)
    n = parts.shape[0]
    while n > 1:  # the recursion's additions, level by level (n is a power of two)
        for i in range(n // 2):
            parts[i] = parts[2 * i] + parts[2 * i + 1]
        n //= 2
    return parts[0]


@numba.njit(inline="always")
def _max_nan(u, v):
    # np.maximum: NaN wins
    return u if (u > v or u != u) else v


@numba.njit(inline="always")
def _clip(v, lo, hi):
    # np.clip: NaN stays NaN, -0.0 stays -0.0
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


@numba.njit(parallel=True, cache=True, nogil=True)
def _round_clip_kernel(w, inv, out, lo, hi, n_jobs):
    n = w.shape[0]
    for j in prange(n_jobs):
        wj, oj = w[j * n // n_jobs:(j + 1) * n // n_jobs], out[j * n // n_jobs:(j + 1) * n // n_jobs]
        for i in range(wj.shape[0]):
            oj[i] = _clip(np.rint(wj[i] * inv), lo, hi)


@numba.njit(parallel=True, cache=True, nogil=True)
def _activation_quant_kernel(x, eps, qmax, lo, hi, xq, a):
    N, C = x.shape
    for n in prange(N):
        xn, qn = x[n], xq[n]
        m = abs(xn[0])
        nan = False
        for c in range(1, C):  # a branch-free max (vectorised); NaN tracked on the side, as np.max
            v = abs(xn[c])
            m = v if v > m else m
            nan |= v != v
        if nan:  # np.max propagates NaN: take the row's first one
            for c in range(C):
                if xn[c] != xn[c]:
                    m = abs(xn[c])
                    break
        an = qmax / _max_nan(m, eps)
        a[n, 0] = an
        for c in range(C):
            qn[c] = _clip(np.rint(xn[c] * an), lo, hi)


@numba.njit(parallel=True, cache=True, nogil=True)
def _rescale_kernel(acc, s, a, b, has_bias, y):
    N, O = acc.shape
    for n in prange(N):
        f = s / a[n, 0]
        an, yn = acc[n], y[n]
        if has_bias:
            for o in range(O):
                yn[o] = an[o] * f + b[o]  # two roundings: no fma without fastmath
        else:
            for o in range(O):
                yn[o] = an[o] * f


@numba.njit(parallel=True, cache=True, nogil=True)
def _scale_kernel(q, s, out, n_jobs):
    n = q.shape[0]
    for j in prange(n_jobs):
        qj, oj = q[j * n // n_jobs:(j + 1) * n // n_jobs], out[j * n // n_jobs:(j + 1) * n // n_jobs]
        for i in range(qj.shape[0]):
            oj[i] = qj[i] * s


@numba.njit(parallel=True, cache=True, nogil=True)
def _divide_rows_kernel(q, a, out):
    N, C = q.shape
    for n in prange(N):
        an, qn, on = a[n, 0], q[n], out[n]
        for c in range(C):
            on[c] = qn[c] / an


def _float(*arrays):
    """True when the kernels apply: NumPy float32 / float64 arrays of one dtype (else: the reference)."""
    dt = arrays[0].dtype
    return all(isinstance(v, np.ndarray) and v.dtype == dt for v in arrays) and dt in (np.float32, np.float64)


def _jobs(n):
    return max(1, min(n // 16384, 4 * numba.get_num_threads()))


def weight_quant(w, eps):
    """Numba twin of weight_quant_reference (bit-identical on C-contiguous w; see the module docstring)."""
    if not (_float(w) and w.flags.c_contiguous) or w.size == 0:
        return weight_quant_reference(w, eps)
    flat = w.reshape(-1)
    zero = w.dtype.type(0)
    total = _abs_sum_kernel(flat, *_leaves(flat.size), zero)
    mean = w.dtype.type(np.float64(total) / np.float64(flat.size))  # numpy's _mean: float64 division
    s = np.maximum(mean, w.dtype.type(eps))
    out = np.empty_like(flat)
    _round_clip_kernel(flat, w.dtype.type(1) / s, out, w.dtype.type(-1), w.dtype.type(1), _jobs(flat.size))
    return out.reshape(w.shape), s


def activation_quant(x, eps):
    """Numba twin of activation_quant_reference."""
    if not _float(x) or x.ndim == 0 or x.shape[-1] == 0:
        return activation_quant_reference(x, eps)
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    t = x.dtype.type
    xq, a = np.empty_like(x2), np.empty((x2.shape[0], 1), x.dtype)
    _activation_quant_kernel(x2, t(eps), t(QMAX), t(QMIN), t(QMAX), xq, a)
    return xq.reshape(x.shape), a.reshape(x.shape[:-1] + (1,))


def rescale(acc, s, a, b=None):
    """Numba twin of rescale_reference; writes into acc (the caller's temporary) and returns it."""
    s = np.asarray(s)
    if not (_float(acc, a, s) and (b is None or _float(acc, b)) and acc.ndim >= 1 and s.ndim == 0
            and acc.flags.c_contiguous and a.shape == acc.shape[:-1] + (1,)):
        return rescale_reference(acc, s[()], a, b)
    O = acc.shape[-1]
    acc2 = acc.reshape(-1, O)
    bias = np.ascontiguousarray(b) if b is not None else np.zeros(0, acc.dtype)
    if acc2.size:
        _rescale_kernel(acc2, acc.dtype.type(s), np.ascontiguousarray(a).reshape(-1, 1), bias, b is not None, acc2)
    return acc


def weight_dequant(wq, s):
    """Numba twin of weight_dequant_reference."""
    s = np.asarray(s)
    if not (_float(wq, s) and wq.flags.c_contiguous and s.ndim == 0):
        return weight_dequant_reference(wq, s[()])
    flat = wq.reshape(-1)
    out = np.empty_like(flat)
    _scale_kernel(flat, wq.dtype.type(s), out, _jobs(flat.size))
    return out.reshape(wq.shape)


def activation_dequant(xq, a):
    """Numba twin of activation_dequant_reference."""
    if not (_float(xq, a) and xq.ndim >= 1 and a.shape == xq.shape[:-1] + (1,)):
        return activation_dequant_reference(xq, a)
    q2 = np.ascontiguousarray(xq).reshape(-1, xq.shape[-1])
    out = np.empty_like(q2)
    if q2.size:
        _divide_rows_kernel(q2, np.ascontiguousarray(a).reshape(-1, 1), out)
    return out.reshape(xq.shape)
