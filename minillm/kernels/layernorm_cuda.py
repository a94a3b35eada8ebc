"""LayerNorm over the last axis (torch.nn.LayerNorm: biased variance) as numba.cuda kernels.

Same math, cache and contract as kernels/layernorm.py (its NumPy reference is the specification):

    xhat = (x - mean(x)) * rstd,   rstd = 1 / sqrt(var(x) + eps),   y = xhat * w + b
    backward (g = dy * w):  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
                            dw = sum over rows of dy * xhat,   db = sum over rows of dy

    forward(x, w, b, eps=1e-5) -> (y, (xhat, rstd, w))   x: (..., C), rstd: (..., 1)
    backward(dy, cache) -> (dx, dw, db)

The cache is that of kernels/layernorm.py and ops.layernorm_forward (arrays of the caller's kind), so
either backward takes either forward's cache.

Forward (1 launch): one block per row (softmax_cuda.threads_for(C) threads: the power of two covering C,
32 to 256); its threads stride over the row (coalesced) and the row's sums (mean, then the variance of
the centred row: two passes, no cancellation) are combined by a fixed binary tree in shared memory
(softmax_cuda.block_reduce). Backward (2 launches): the rows are split into at most ROW_GROUPS contiguous
groups, one block per group walking its rows in order: per row two tree sums (sum g, sum g xhat) give dx,
and each thread adds dy * xhat and dy for its channels into the group's partial dw, db row in global
memory (a channel belongs to one thread: no races, no atomics; the row stays in cache while the group is
walked); a second kernel, one thread per channel, sums the partials over groups in increasing order. The
group count depends only on the number of rows, so results are bit-identical from run to run.

Precision: everything runs in the input dtype (the CPU kernel accumulates in float64): on most GPUs
float64 runs at 1/32 to 1/64 of the float32 rate, which would make this memory-bound kernel
compute-bound; a tree sum's error grows with log2 of the row length, and each thread's own partial
sums only C / blockDim terms. dw, db sum rows_per_group + groups terms in sequence.

Arrays may be NumPy (copied to the GPU, results copied back), CuPy or numba device arrays (results of
the same kind; see cuda_arrays.py). This module imports nothing else of minillm.
"""

import functools
import math

import numpy as np
from numba import cuda, float32, float64

from minillm.kernels import softmax_cuda
from minillm.kernels.cuda_arrays import array_kind, empty, float_dtype, on_device, to_kind
from minillm.kernels.softmax_cuda import SHARED, block_reduce

ROW_GROUPS = 512  # most row groups (blocks) in the backward; partials are ROW_GROUPS x C per parameter
SUM_THREADS = 128


@cuda.jit(device=True)
def _block_sum2(buf, buf2, a, b):
    """block_reduce (a sum) of two values at once (one tree, half the barriers)."""
    tid = cuda.threadIdx.x
    buf[tid] = a
    buf2[tid] = b
    cuda.syncthreads()
    h = cuda.blockDim.x // 2
    while h > 0:
        if tid < h:
            buf[tid] = buf[tid] + buf[tid + h]
            buf2[tid] = buf2[tid] + buf2[tid + h]
        cuda.syncthreads()
        h //= 2
    a, b = buf[0], buf2[0]
    cuda.syncthreads()
    return a, b


@functools.lru_cache(maxsize=None)
def _kernels(dtype_name):
    """The kernels for float32 or float64 (a shared array needs its type up front)."""
    nbt = {"float32": float32, "float64": float64}[dtype_name]

    @cuda.jit
    def forward(x, w, b, eps, cf, y, xhat, rstd, one):
        buf = cuda.shared.array(SHARED, nbt)
        r = cuda.blockIdx.x
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        C = x.shape[1]
        zero = one - one
        acc = zero
        for j in range(tid, C, nt):
            acc += x[r, j]
        mean = block_reduce(buf, acc, False) / cf
        acc = zero
        for j in range(tid, C, nt):
            d = x[r, j] - mean
            acc += d * d
        rs = one / math.sqrt(block_reduce(buf, acc, False) / cf + eps)
        if tid == 0:
            rstd[r, 0] = rs
        for j in range(tid, C, nt):
            h = (x[r, j] - mean) * rs
            xhat[r, j] = h
            y[r, j] = h * w[j] + b[j]

    @cuda.jit
    def backward(dy, xhat, rstd, w, cf, rows, dx, dw_part, db_part, one):
        buf = cuda.shared.array(SHARED, nbt)
        buf2 = cuda.shared.array(SHARED, nbt)
        gi = cuda.blockIdx.x
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        N, C = dy.shape
        zero = one - one
        for j in range(tid, C, nt):
            dw_part[gi, j] = zero
            db_part[gi, j] = zero
        r1 = gi * rows + rows
        for r in range(gi * rows, r1 if r1 < N else N):  # (no builtin min: see softmax_cuda)
            sg, sgh = zero, zero
            for j in range(tid, C, nt):
                d, h = dy[r, j], xhat[r, j]
                g = d * w[j]
                sg += g
                sgh += g * h
                dw_part[gi, j] += d * h
                db_part[gi, j] += d
            sg, sgh = _block_sum2(buf, buf2, sg, sgh)
            mg, mgh = sg / cf, sgh / cf
            rs = rstd[r, 0]
            for j in range(tid, C, nt):
                dx[r, j] = rs * ((dy[r, j] * w[j] - mg) - xhat[r, j] * mgh)

    return forward, backward


@cuda.jit
def _sum_groups(dw_part, db_part, dw, db):
    """dw[c] = sum over g of dw_part[g, c] in increasing g; the same for db."""
    c = cuda.grid(1)
    if c >= dw.shape[0]:
        return
    a, b = dw_part[0, c], db_part[0, c]
    for g in range(1, dw_part.shape[0]):
        a += dw_part[g, c]
        b += db_part[g, c]
    dw[c], db[c] = a, b


# --- host side ---------------------------------------------------------------------------------------


def _rows(shape):
    return int(np.prod(shape[:-1], dtype=np.int64))


def forward(x, w, b, eps=1e-5):
    """x: (..., C), w, b: (C,) -> (y: (..., C), (xhat: (..., C), rstd: (..., 1), w))."""
    shape = tuple(x.shape)
    if len(shape) < 1 or shape[-1] < 1 or tuple(w.shape) != shape[-1:] or tuple(b.shape) != shape[-1:]:
        raise ValueError(f"forward: needs x (..., C) and w, b (C,), got {shape}, "
                         f"{tuple(w.shape)} and {tuple(b.shape)}")
    dtype = float_dtype(x, "forward")
    kind = array_kind(x)
    C, N = shape[-1], _rows(shape)
    xd, wd, bd = (on_device(a, kind, dtype, check="forward") for a in (x, w, b))
    y, xhat = empty(kind, (N, C), dtype), empty(kind, (N, C), dtype)
    rstd = empty(kind, (N, 1), dtype)
    if N:
        s = dtype.type
        _kernels(dtype.name)[0][N, softmax_cuda.threads_for(C)](xd.reshape(N, C), wd, bd, s(eps), s(C),
                                                                y, xhat, rstd, s(1))
    cache = (to_kind(xhat, kind).reshape(shape), to_kind(rstd, kind).reshape(shape[:-1] + (1,)),
             w if kind != "cupy" else wd)
    return to_kind(y, kind).reshape(shape), cache


def backward(dy, cache):
    """dy: (..., C) -> (dx: (..., C), dw: (C,), db: (C,)), of dy's kind; cache from either forward."""
    xhat, rstd, w = cache
    shape = tuple(xhat.shape)
    C, N = shape[-1], _rows(shape)
    if tuple(dy.shape) != shape or tuple(rstd.shape) != shape[:-1] + (1,) or tuple(w.shape) != (C,):
        raise ValueError(f"backward: dy is {tuple(dy.shape)}, but the cache holds xhat "
                         f"{shape}, rstd {tuple(rstd.shape)} and w {tuple(w.shape)}")
    dtype = float_dtype(xhat, "backward")
    kind = array_kind(dy)
    dyd, hd, rd, wd = (on_device(a, kind, dtype, check="backward")
                       for a in (dy, xhat, rstd, w))
    dx = empty(kind, (N, C), dtype)
    dw, db = empty(kind, (C,), dtype), empty(kind, (C,), dtype)
    if N:
        rows = -(-N // min(N, ROW_GROUPS))
        G = -(-N // rows)
        dw_part, db_part = empty(kind, (G, C), dtype), empty(kind, (G, C), dtype)
        s = dtype.type
        _kernels(dtype.name)[1][G, softmax_cuda.threads_for(C)](
            dyd.reshape(N, C), hd.reshape(N, C), rd.reshape(N, 1), wd, s(C), rows, dx, dw_part, db_part,
            s(1))
        _sum_groups[-(-C // SUM_THREADS), SUM_THREADS](dw_part, db_part, dw, db)
        dw, db = to_kind(dw, kind), to_kind(db, kind)
    else:  # no rows: zero gradients
        dw, db = (to_kind(on_device(np.zeros(C, dtype), kind), kind) for _ in range(2))
    return to_kind(dx, kind).reshape(shape), dw, db


def rows(x, w, b, eps=1e-5):
    """Forward only (the decoding step): forward's y."""
    return forward(x, w, b, eps)[0]
