"""MoE dispatch/combine and SwiGLU as numba.cuda kernels: the GPU twins of kernels/moe.py.

Same functions, arguments and results as kernels/moe.py (whose NumPy reference is the specification):
sort, dispatch, combine, combine_backward, swiglu, swiglu_backward. Inputs may be CuPy arrays (or any
__cuda_array_interface__ array): the results are then CuPy / Numba device arrays on the GPU. NumPy
inputs are copied to the device and the results copied back (that is how the tests call them, also
under NUMBA_ENABLE_CUDASIM=1).

Determinism without atomics. The stable counting sort splits the N k assignments into chunks of
CHUNK ids: one thread per chunk counts its experts, one thread turns the counts into each chunk's
first row per expert (an exclusive scan in a fixed order), and one thread per assignment adds its
rank among the earlier assignments of the same expert in its chunk. Combine sums each token's k rows
in ascending slot order; dw is a sequential dot product per assignment. So every result is the same
on every run; it can differ from the CPU reference in the last bits because the GPU compiler fuses
multiply-adds (FMA) and its exp differs from NumPy's.
"""

import math

import numpy as np
from numba import cuda

from minillm.kernels.cuda_arrays import array_kind, empty, on_device, to_kind

CHUNK = 256  # assignments per counting chunk
TPB = 256  # threads per block, 1-D kernels
TILE = (32, 8)  # threads per block, 2-D kernels: 32 along the channels (coalesced), 8 rows


def _blocks(n, tpb=TPB):
    return max(1, (n + tpb - 1) // tpb)


def _grid2(rows, cols):
    return (_blocks(cols, TILE[0]), _blocks(rows, TILE[1])), TILE


class _On:
    """Where the results live (kernels/cuda_arrays.py): NumPy inputs -> computed on the device, copied
    back to the host; CuPy / numba device inputs -> results of the same kind, on the device."""

    def __init__(self, like):
        self.kind = array_kind(like)
        self.cupy = self.kind == "cupy"

    def dev(self, a, dtype=None):
        return on_device(a, self.kind, dtype)

    def empty(self, shape, dtype):
        return empty(self.kind, shape, dtype)

    def out(self, a):
        return to_kind(a, self.kind)


# --- kernels --------------------------------------------------------------------------------------


@cuda.jit
def _chunk_count_kernel(flat, chunk, counts):
    c = cuda.grid(1)
    if c < counts.shape[0]:
        for e in range(counts.shape[1]):
            counts[c, e] = 0
        end = (c + 1) * chunk
        if end > flat.shape[0]:   # (no 2-argument min in kernels: numba#10753)
            end = flat.shape[0]
        for a in range(c * chunk, end):
            counts[c, flat[a]] += 1


@cuda.jit
def _scan_kernel(counts, start, offsets):
    if cuda.grid(1) == 0:  # one thread: experts in order, then chunks in order
        total = 0
        for e in range(counts.shape[1]):
            offsets[e] = total
            for c in range(counts.shape[0]):
                start[c, e] = total
                total += counts[c, e]
        offsets[counts.shape[1]] = total


@cuda.jit
def _place_kernel(flat, chunk, start, order, pos):
    a = cuda.grid(1)
    if a < flat.shape[0]:
        e = flat[a]
        c = a // chunk
        r = start[c, e]
        for b in range(c * chunk, a):  # rank among the chunk's earlier assignments to e
            if flat[b] == e:
                r += 1
        order[r] = a
        pos[a] = r


@cuda.jit
def _gather_kernel(x, order, k, xs):
    col, r = cuda.grid(2)
    if r < xs.shape[0] and col < xs.shape[1]:
        xs[r, col] = x[order[r] // k, col]


@cuda.jit
def _combine_kernel(ys, pos, w, y):
    col, n = cuda.grid(2)
    if n < y.shape[0] and col < y.shape[1]:
        acc = w[n, 0] * ys[pos[n, 0], col]
        for j in range(1, pos.shape[1]):
            acc += w[n, j] * ys[pos[n, j], col]
        y[n, col] = acc


@cuda.jit
def _scatter_weighted_kernel(dy, pos, w, dys):
    col, a = cuda.grid(2)
    k = pos.shape[1]
    if a < dys.shape[0] and col < dys.shape[1]:
        n, j = a // k, a % k
        dys[pos[n, j], col] = w[n, j] * dy[n, col]


@cuda.jit
def _dot_kernel(dy, ys, pos, dw):
    a = cuda.grid(1)
    k = pos.shape[1]
    if a < pos.shape[0] * k:
        n, j = a // k, a % k
        r = pos[n, j]
        s = 0.0
        for col in range(dy.shape[1]):
            s += dy[n, col] * ys[r, col]
        dw[n, j] = s


@cuda.jit(device=True, inline=True)
def _sigmoid(h, one):
    e = math.exp(-abs(h))
    r = one / (one + e)
    return r if h >= 0 else e * r


@cuda.jit
def _swiglu_kernel(h1, h3, a, one):
    i = cuda.grid(1)
    if i < a.shape[0]:
        h = h1[i]
        a[i] = h * _sigmoid(h, one) * h3[i]


@cuda.jit
def _swiglu_backward_kernel(da, h1, h3, dh1, dh3, one):
    i = cuda.grid(1)
    if i < h1.shape[0]:
        h = h1[i]
        s = _sigmoid(h, one)
        g = da[i]
        dh1[i] = g * h3[i] * s * (one + h * (one - s))
        dh3[i] = g * h * s


@cuda.jit
def _swiglu_pair_kernel(h, a, one):
    i = cuda.grid(1)  # h: (2 n,) = [h1; h3] flat, a: (n,)
    n = a.shape[0]
    if i < n:
        v = h[i]
        a[i] = v * _sigmoid(v, one) * h[n + i]


@cuda.jit
def _swiglu_pair_backward_kernel(da, h, dh, one):
    i = cuda.grid(1)
    n = da.shape[0]
    if i < n:
        v = h[i]
        s = _sigmoid(v, one)
        g = da[i]
        dh[i] = g * h[n + i] * s * (one + v * (one - s))
        dh[n + i] = g * v * s


# --- the functions (as kernels/moe.py) ------------------------------------------------------------


def _check_idx(idx, n_experts):
    if idx.ndim != 2:
        raise ValueError(f"moe dispatch: idx must be (N, k), got shape {idx.shape}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n_experts):
        raise ValueError(f"moe dispatch: expert ids must lie in [0, {n_experts}), "
                         f"got {int(idx.min())}..{int(idx.max())}")


def _sort(on, idx, n_experts, chunk=CHUNK):
    N, k = idx.shape
    flat = on.dev(idx, np.int64).reshape(N * k)
    n_chunks = _blocks(N * k, chunk)
    counts = on.empty((n_chunks, n_experts), np.int64)
    start = on.empty((n_chunks, n_experts), np.int64)
    offsets = on.empty((n_experts + 1,), np.int64)
    order = on.empty((N * k,), np.int64)
    pos = on.empty((N * k,), np.int64)
    _chunk_count_kernel[_blocks(n_chunks), TPB](flat, chunk, counts)
    _scan_kernel[1, 1](counts, start, offsets)
    if N * k:
        _place_kernel[_blocks(N * k), TPB](flat, chunk, start, order, pos)
    return order, offsets, pos.reshape(N, k)


def sort(idx, n_experts, chunk=CHUNK):
    """idx: (N, k) int -> (order: (N k,), offsets: (E+1,), pos: (N, k)), all int64."""
    _check_idx(idx, n_experts)
    on = _On(idx)
    return tuple(on.out(a) for a in _sort(on, idx, int(n_experts), int(chunk)))


def dispatch(x, idx, n_experts):
    """x: (N, C), idx: (N, k) -> (xs: (N k, C) = x[order // k], order, offsets, pos)."""
    _check_idx(idx, n_experts)
    on = _On(x)
    order, offsets, pos = _sort(on, idx, int(n_experts))
    xd = on.dev(x)
    xs = on.empty((order.shape[0], x.shape[1]), xd.dtype)
    if xs.size:
        _gather_kernel[_grid2(*xs.shape)](xd, order, idx.shape[1], xs)
    return tuple(on.out(a) for a in (xs, order, offsets, pos))


def combine(ys, pos, w=None):
    """ys: (N k, C), pos: (N, k), w: (N, k) or None (unit weights) -> y[n] = sum_j w[n, j] ys[pos[n, j]]."""
    on = _On(ys)
    ysd = on.dev(ys)
    wd = _ones(pos.shape, ysd.dtype, on) if w is None else on.dev(w, ysd.dtype)
    y = on.empty((pos.shape[0], ys.shape[1]), ysd.dtype)
    if y.size:
        _combine_kernel[_grid2(*y.shape)](ysd, on.dev(pos, np.int64), wd, y)
    return on.out(y)


def _ones(shape, dtype, on):
    if on.cupy:
        import cupy

        return cupy.ones(shape, dtype)
    return cuda.to_device(np.ones(shape, dtype))


def combine_backward(dy, ys, pos, w):
    """dy: (N, C) -> (dys: (N k, C), dw: (N, k))."""
    on = _On(dy)
    dyd, ysd, posd = on.dev(dy), on.dev(ys), on.dev(pos, np.int64)
    wd = on.dev(w, dyd.dtype)
    dys = on.empty(ys.shape, dyd.dtype)
    dw = on.empty(pos.shape, dyd.dtype)
    if dys.size:
        _scatter_weighted_kernel[_grid2(*dys.shape)](dyd, posd, wd, dys)
    if dw.size:
        _dot_kernel[_blocks(dw.size), TPB](dyd, ysd, posd, dw)
    return on.out(dys), on.out(dw)


def swiglu(h1, h3):
    """h1, h3: (M, F) -> silu(h1) * h3."""
    on = _On(h1)
    h1d, h3d = on.dev(h1), on.dev(h3)
    a = on.empty(h1.shape, h1d.dtype)
    if a.size:
        n = a.size
        _swiglu_kernel[_blocks(n), TPB](h1d.reshape(n), h3d.reshape(n), a.reshape(n),
                                        h1d.dtype.type(1))
    return on.out(a)


def swiglu_backward(da, h1, h3):
    """da: (M, F) -> (dh1, dh3)."""
    on = _On(da)
    dad, h1d, h3d = on.dev(da), on.dev(h1), on.dev(h3)
    dh1, dh3 = on.empty(h1.shape, h1d.dtype), on.empty(h1.shape, h1d.dtype)
    if h1d.size:
        n = h1d.size
        _swiglu_backward_kernel[_blocks(n), TPB](dad.reshape(n), h1d.reshape(n), h3d.reshape(n),
                                                 dh1.reshape(n), dh3.reshape(n), h1d.dtype.type(1))
    return on.out(dh1), on.out(dh3)


def _check_pair(h):
    if h.ndim < 1 or h.shape[0] % 2:
        raise ValueError(f"swiglu pair: h must stack h1 and h3 as (2F, ...), got shape {h.shape}")


def swiglu_pair(h):
    """h = [h1; h3]: (2F, ...) -> silu(h1) * h3: (F, ...)."""
    _check_pair(h)
    on = _On(h)
    hd = on.dev(h)
    a = on.empty((h.shape[0] // 2,) + tuple(h.shape[1:]), hd.dtype)
    if a.size:
        _swiglu_pair_kernel[_blocks(a.size), TPB](hd.reshape(hd.size), a.reshape(a.size), hd.dtype.type(1))
    return on.out(a)


def swiglu_pair_backward(da, h):
    """da: (F, ...), h = [h1; h3]: (2F, ...) -> dh = [dh1; dh3]: (2F, ...)."""
    _check_pair(h)
    on = _On(da)
    dad, hd = on.dev(da), on.dev(h)
    dh = on.empty(tuple(h.shape), hd.dtype)
    if dad.size:
        _swiglu_pair_backward_kernel[_blocks(dad.size), TPB](dad.reshape(dad.size), hd.reshape(hd.size),
                                                             dh.reshape(dh.size), hd.dtype.type(1))
    return on.out(dh)
