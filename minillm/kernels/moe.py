"""MoE dispatch and combine (and the fused SwiGLU of the experts): NumPy reference and Numba CPU kernels.

With N tokens, each routed to k experts (idx: (N, k) expert ids, distinct within a row), an
*assignment* is a pair (token n, slot j), flat id a = n k + j. Dispatch is a counting sort of the
assignments by expert: the rows routed to expert e become the contiguous block
xs[offsets[e]:offsets[e+1]] of a (N k, C) buffer, so each expert runs one dense matmul on a
contiguous slice (only chosen experts compute). Within an expert the rows keep ascending
assignment id (a stable sort), so the layout is fully determined by idx.

    order: (N k,)    order[r] = the assignment id stored in sorted row r
    offsets: (E+1,)  expert e owns sorted rows offsets[e] .. offsets[e+1]-1
    pos: (N, k)      pos[n, j] = the sorted row holding assignment (n, j) (inverse of order)

Combine is the scatter-add back, written as a gather over pos so that it is deterministic without
atomics: y[n] = sum_{j = 0..k-1} w[n, j] ys[pos[n, j]], summed in ascending j. Its backward sends
w[n, j] dy[n] to row pos[n, j] and gives dw[n, j] = <dy[n], ys[pos[n, j]]>; the backward of
dispatch is combine with unit weights. The Numba kernels run in parallel over tokens or sorted rows;
each output element is written by exactly one iteration in a fixed order, so results do not depend
on the thread count (combine is bitwise equal to the reference).

SwiGLU (Shazeer 2020, eq. 6, as in Mixtral's experts): a = silu(h1) * h3 with h1 = x W1^T, h3 = x W3^T.
The pair forms take h1 and h3 stacked, h = [h1; h3]: (2F, ...), e.g. the transposed output
[W1; W3] x^T: (2F, M) of one fused product (HF's gate_up_proj), and give a = silu(h1) * h3: (F, ...) and
dh = [dh1; dh3]: (2F, ...) with the same arithmetic (elementwise: the layout of the rest is free).
"""

import numba
import numpy as np

from minillm.kernels.fastexp import fast_exp


def _check_idx(idx, n_experts):
    if idx.ndim != 2:
        raise ValueError(f"moe dispatch: idx must be (N, k), got shape {idx.shape}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n_experts):
        raise ValueError(f"moe dispatch: expert ids must lie in [0, {n_experts}), "
                         f"got {int(idx.min())}..{int(idx.max())}")


# --- NumPy reference (the specification) ------------------------------------------------------------


def sort_reference(idx, n_experts):
    """idx: (N, k) int -> (order: (N k,), offsets: (E+1,), pos: (N, k)), all int64."""
    _check_idx(idx, n_experts)
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable").astype(np.int64)
    counts = np.bincount(flat, minlength=n_experts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    pos = np.empty(flat.size, np.int64)
    pos[order] = np.arange(flat.size)
    return order, offsets, pos.reshape(idx.shape)


def dispatch_reference(x, idx, n_experts):
    """x: (N, C), idx: (N, k) -> (xs: (N k, C) = x[order // k], order, offsets, pos)."""
    order, offsets, pos = sort_reference(idx, n_experts)
    return x[order // idx.shape[1]], order, offsets, pos


def combine_reference(ys, pos, w=None):
    """ys: (N k, C), pos: (N, k), w: (N, k) or None (unit weights) -> y: (N, C)."""
    y = np.zeros((pos.shape[0], ys.shape[1]), ys.dtype)
    for j in range(pos.shape[1]):
        rows = ys[pos[:, j]]
        y += rows if w is None else w[:, j, None] * rows
    return y


def combine_backward_reference(dy, ys, pos, w):
    """dy: (N, C) -> (dys: (N k, C), dw: (N, k))."""
    dys = np.empty_like(ys)
    dw = np.empty(pos.shape, dy.dtype)
    for j in range(pos.shape[1]):
        dys[pos[:, j]] = w[:, j, None] * dy
        dw[:, j] = (dy * ys[pos[:, j]]).sum(axis=1)
    return dys, dw


def _sigmoid_reference(h):
    """sigmoid(h) = 1 / (1 + e^-h), from e = e^-|h| <= 1 so nothing overflows."""
    e = np.exp(-np.abs(h))
    r = 1.0 / (1.0 + e)
    return np.where(h >= 0, r, e * r).astype(h.dtype, copy=False)


def swiglu_reference(h1, h3):
    """h1, h3: (M, F) -> a = silu(h1) * h3."""
    return h1 * _sigmoid_reference(h1) * h3


def swiglu_backward_reference(da, h1, h3):
    """da: (M, F) -> (dh1, dh3); silu'(h) = s (1 + h (1 - s)), s = sigmoid(h)."""
    s = _sigmoid_reference(h1)
    return da * h3 * s * (1.0 + h1 * (1.0 - s)), da * h1 * s


def swiglu_pair_reference(h):
    """h = [h1; h3]: (2F, ...) -> a = silu(h1) * h3: (F, ...)."""
    F = h.shape[0] // 2
    return swiglu_reference(h[:F], h[F:])


def swiglu_pair_backward_reference(da, h):
    """da: (F, ...), h = [h1; h3]: (2F, ...) -> dh = [dh1; dh3]: (2F, ...)."""
    F = h.shape[0] // 2
    return np.concatenate(swiglu_backward_reference(da, h[:F], h[F:]), axis=0)


# --- Numba CPU kernels ----------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _sort_kernel(idx, n_experts):
    N, k = idx.shape
    counts = np.zeros(n_experts, np.int64)
    for n in range(N):
        for j in range(k):
            counts[idx[n, j]] += 1
    offsets = np.zeros(n_experts + 1, np.int64)
    for e in range(n_experts):
        offsets[e + 1] = offsets[e] + counts[e]
    fill = offsets[:-1].copy()
    order = np.empty(N * k, np.int64)
    pos = np.empty((N, k), np.int64)
    for n in range(N):  # ascending assignment id: the stable order
        for j in range(k):
            e = idx[n, j]
            r = fill[e]
            fill[e] = r + 1
            order[r] = n * k + j
            pos[n, j] = r
    return order, offsets, pos


@numba.njit(parallel=True, cache=True, nogil=True)
def _gather_kernel(x, order, k, xs):
    C = x.shape[1]
    for r in numba.prange(order.shape[0]):
        n = order[r] // k
        for c in range(C):
            xs[r, c] = x[n, c]


@numba.njit(parallel=True, cache=True, nogil=True)
def _combine_kernel(ys, pos, w, y):
    N, k = pos.shape
    C = ys.shape[1]
    for n in numba.prange(N):
        for c in range(C):
            y[n, c] = 0.0
        for j in range(k):
            r = pos[n, j]
            wj = w[n, j]
            for c in range(C):
                y[n, c] += wj * ys[r, c]


@numba.njit(parallel=True, cache=True, nogil=True)
def _combine_backward_kernel(dy, ys, pos, w, dys, dw):
    N, k = pos.shape
    C = ys.shape[1]
    for n in numba.prange(N):
        for j in range(k):
            r = pos[n, j]
            wj = w[n, j]
            s = 0.0
            for c in range(C):
                dys[r, c] = wj * dy[n, c]
                s += dy[n, c] * ys[r, c]
            dw[n, j] = s


@numba.njit(inline="always")
def _sigmoid(h, one):
    # `one` is 1 in the arrays' dtype: a float literal would promote float32 arithmetic to float64.
    # fast_exp is a vectorisable exp (libm's scalar exp is not vectorised: 15x slower here); it
    # differs from np.exp by about an ulp.
    e = fast_exp(-abs(h))
    r = one / (one + e)
    return r if h >= 0 else e * r


@numba.njit(parallel=True, cache=True, nogil=True)
def _swiglu_kernel(h1, h3, a, one):
    M, F = h1.shape
    for m in numba.prange(M):
        for f in range(F):
            h = h1[m, f]
            a[m, f] = h * _sigmoid(h, one) * h3[m, f]


@numba.njit(parallel=True, cache=True, nogil=True)
def _swiglu_backward_kernel(da, h1, h3, dh1, dh3, one):
    M, F = h1.shape
    for m in numba.prange(M):
        for f in range(F):
            h = h1[m, f]
            s = _sigmoid(h, one)
            g = da[m, f]
            dh1[m, f] = g * h3[m, f] * s * (one + h * (one - s))
            dh3[m, f] = g * h * s


@numba.njit(parallel=True, cache=True, nogil=True)
def _swiglu_pair_kernel(h, a, one, n_jobs):
    n = a.shape[0]  # h: (2 n,) = [h1; h3] flat
    for j in numba.prange(n_jobs):
        lo, hi = j * n // n_jobs, (j + 1) * n // n_jobs
        h1, h3, aj = h[lo:hi], h[n + lo:n + hi], a[lo:hi]  # views indexed from 0: vectorised
        for i in range(aj.shape[0]):
            v = h1[i]
            aj[i] = v * _sigmoid(v, one) * h3[i]


@numba.njit(parallel=True, cache=True, nogil=True)
def _swiglu_pair_backward_kernel(da, h, dh, one, n_jobs):
    n = da.shape[0]
    for j in numba.prange(n_jobs):
        lo, hi = j * n // n_jobs, (j + 1) * n // n_jobs
        h1, h3, g, d1, d3 = h[lo:hi], h[n + lo:n + hi], da[lo:hi], dh[lo:hi], dh[n + lo:n + hi]
        for i in range(g.shape[0]):
            v = h1[i]
            s = _sigmoid(v, one)
            d1[i] = g[i] * h3[i] * s * (one + v * (one - s))
            d3[i] = g[i] * v * s


def _c(a):
    return np.ascontiguousarray(a)


def sort(idx, n_experts):
    """Numba twin of sort_reference."""
    _check_idx(idx, n_experts)
    return _sort_kernel(_c(idx.astype(np.int64, copy=False)), int(n_experts))


def dispatch(x, idx, n_experts):
    """Numba twin of dispatch_reference: x: (N, C), idx: (N, k) -> (xs, order, offsets, pos)."""
    order, offsets, pos = sort(idx, n_experts)
    x = _c(x)
    xs = np.empty((order.shape[0], x.shape[1]), x.dtype)
    _gather_kernel(x, order, idx.shape[1], xs)
    return xs, order, offsets, pos


def combine(ys, pos, w=None):
    """Numba twin of combine_reference: ys: (N k, C), pos: (N, k), w: (N, k) or None -> y: (N, C)."""
    ys = _c(ys)
    w = np.ones(pos.shape, ys.dtype) if w is None else _c(w.astype(ys.dtype, copy=False))
    y = np.empty((pos.shape[0], ys.shape[1]), ys.dtype)
    _combine_kernel(ys, _c(pos), w, y)
    return y


def combine_backward(dy, ys, pos, w):
    """Numba twin of combine_backward_reference: dy: (N, C) -> (dys: (N k, C), dw: (N, k))."""
    dy, ys = _c(dy), _c(ys)
    dys = np.empty_like(ys)
    dw = np.empty(pos.shape, dy.dtype)
    _combine_backward_kernel(dy, ys, _c(pos), _c(w.astype(dy.dtype, copy=False)), dys, dw)
    return dys, dw


def swiglu(h1, h3):
    """Numba twin of swiglu_reference: h1, h3: (M, F) -> silu(h1) * h3."""
    h1, h3 = _c(h1), _c(h3)
    a = np.empty_like(h1)
    if h1.size:
        _swiglu_kernel(h1.reshape(-1, h1.shape[-1]), h3.reshape(-1, h3.shape[-1]),
                       a.reshape(-1, a.shape[-1]), h1.dtype.type(1))
    return a


def swiglu_backward(da, h1, h3):
    """Numba twin of swiglu_backward_reference: da: (M, F) -> (dh1, dh3)."""
    da, h1, h3 = _c(da), _c(h1), _c(h3)
    dh1, dh3 = np.empty_like(h1), np.empty_like(h1)
    if h1.size:
        F = h1.shape[-1]
        _swiglu_backward_kernel(da.reshape(-1, F), h1.reshape(-1, F), h3.reshape(-1, F),
                                dh1.reshape(-1, F), dh3.reshape(-1, F), h1.dtype.type(1))
    return dh1, dh3


def _check_pair(h):
    if h.ndim < 1 or h.shape[0] % 2:
        raise ValueError(f"swiglu pair: h must stack h1 and h3 as (2F, ...), got shape {h.shape}")


def _pair_jobs(n):
    return max(1, min(n // 4096, 4 * numba.get_num_threads()))


def swiglu_pair(h):
    """Numba twin of swiglu_pair_reference: h = [h1; h3]: (2F, ...) -> (F, ...)."""
    _check_pair(h)
    h = _c(h)
    a = np.empty((h.shape[0] // 2,) + h.shape[1:], h.dtype)
    if a.size:
        _swiglu_pair_kernel(h.reshape(-1), a.reshape(-1), h.dtype.type(1), _pair_jobs(a.size))
    return a


def swiglu_pair_backward(da, h):
    """Numba twin of swiglu_pair_backward_reference: da: (F, ...), h: (2F, ...) -> dh: (2F, ...)."""
    _check_pair(h)
    da, h = _c(da), _c(h)
    dh = np.empty_like(h)
    if da.size:
        _swiglu_pair_backward_kernel(da.reshape(-1), h.reshape(-1), dh.reshape(-1), h.dtype.type(1),
                                     _pair_jobs(da.size))
    return dh
