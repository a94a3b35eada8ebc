"""Softmax over rows and the fused cross entropy as numba.cuda kernels: one block per row.

Same math and contracts as kernels/softmax.py (causal and plain softmax, in place; its NumPy reference is
the specification) and ops.cross_entropy_forward/backward (mean over the targets that are not
ignore_index; ValueError when all are):

    causal(s)                  s: (..., T, T), in place; p_ij = 0 exactly for j > i
    causal_backward(dp, p)     in place into dp: ds = p (dp - sum_k dp_k p_k)
    rows(s)                    s: (..., L), in place (the decoding step: no mask)
    cross_entropy_forward(logits, targets, ignore_index=-100) -> (loss: float, cache)
    cross_entropy_backward(dloss, cache) -> dlogits

A block's threads stride over its row (coalesced), each keeping one partial sum (max) in the row's
dtype, then the block combines the partials with a fixed binary tree in shared memory
(`block_reduce`): float32 stays float32 (typed zeros and ones are passed in, no float literals), and the
order of every sum depends only on the shapes, so results are bit-identical from run to run. (No
builtin max/min in the kernels: numba 0.66 - 0.68's CUDA target fails to compile them, numba issue 10753.) The block
size is the power of two covering the row, between MIN_THREADS and MAX_THREADS.

Cross entropy: the forward kernel finds each row's max m and log s = log sum_j exp(z_j - m) and the
row's loss log s - (z_t - m) (ops.log_softmax's rounding); a second kernel, one block, sums the kept
rows' losses in float64 (deliberately: N values, negligible cost) and counts kept and out-of-range
targets, and these three numbers are the only copy to the host (one sync). The backward writes
(exp((z - m) - log s) - onehot(t)) * dloss / n straight into dlogits; the cache keeps the logits, the
targets and (m, log s) per row, no log-probability matrix.

Launches: causal, causal_backward, rows and
cross_entropy_backward 1 each; cross_entropy_forward 2. Arrays may be NumPy (copied to the
GPU; in-place results are copied back into the given array), CuPy or numba device arrays (see
cuda_arrays.py). This module imports nothing else of minillm.
"""

import functools
import math

import numpy as np
from numba import cuda, float32, float64

from minillm.kernels.cuda_arrays import array_kind, empty, float_dtype, on_device, to_kind

SHARED = 256       # shared-memory slots per block: the most threads a block may have
MAX_THREADS = 256  # a power of two <= SHARED
MIN_THREADS = 32   # one warp


def threads_for(n):
    """Threads per block for rows of n: the power of two >= n, clamped to [MIN_THREADS, MAX_THREADS]."""
    t = min(MIN_THREADS, MAX_THREADS)
    while t < n and t < MAX_THREADS:
        t *= 2
    return t


@cuda.jit(device=True)
def block_reduce(buf, v, take_max):
    """Sum (or max) of v over the block's threads (blockDim.x a power of two) by a fixed binary tree in
    buf (shared, >= blockDim.x slots). Every thread of the block must call it; each gets the result."""
    tid = cuda.threadIdx.x
    buf[tid] = v
    cuda.syncthreads()
    h = cuda.blockDim.x // 2
    while h > 0:
        if tid < h:
            a, b = buf[tid], buf[tid + h]
            buf[tid] = (a if a > b else b) if take_max else a + b
        cuda.syncthreads()
        h //= 2
    total = buf[0]
    cuda.syncthreads()  # buf may be written again by the next call
    return total


@functools.lru_cache(maxsize=None)
def _kernels(dtype_name):
    """The kernels for float32 or float64 (a shared array needs its type up front)."""
    nbt = {"float32": float32, "float64": float64}[dtype_name]

    @cuda.jit
    def softmax(s, T, causal, one):
        """Row r of s: (R, L) -> softmax of its first i + 1 entries, zeros after (i = r % T if causal,
        else L - 1)."""
        buf = cuda.shared.array(SHARED, nbt)
        r = cuda.blockIdx.x
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        L = s.shape[1]
        live = r % T + 1 if causal else L
        m = s[r, 0]
        for j in range(tid, live, nt):
            v = s[r, j]
            m = v if v > m else m
        m = block_reduce(buf, m, True)
        zero = one - one
        acc = zero
        for j in range(tid, L, nt):
            if j < live:
                e = math.exp(s[r, j] - m)
                s[r, j] = e
                acc += e
            else:
                s[r, j] = zero
        total = block_reduce(buf, acc, False)
        for j in range(tid, live, nt):
            s[r, j] = s[r, j] / total

    @cuda.jit
    def causal_backward(dp, p, one):
        buf = cuda.shared.array(SHARED, nbt)
        r = cuda.blockIdx.x
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        T = dp.shape[1]
        live = r % T + 1
        zero = one - one
        acc = zero
        for j in range(tid, live, nt):
            acc += dp[r, j] * p[r, j]
        dot = block_reduce(buf, acc, False)
        for j in range(tid, T, nt):
            dp[r, j] = (dp[r, j] - dot) * p[r, j] if j < live else zero

    @cuda.jit
    def ce_rows(z, t, ignore, rowmax, rowls, rowloss, flag, one):
        """Per row: m, log s, the row's loss and flag (0 ignored, 1 kept, 2 target out of range)."""
        buf = cuda.shared.array(SHARED, nbt)
        r = cuda.blockIdx.x
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        V = z.shape[1]
        m = z[r, 0]
        for j in range(tid, V, nt):
            v = z[r, j]
            m = v if v > m else m
        m = block_reduce(buf, m, True)
        zero = one - one
        acc = zero
        for j in range(tid, V, nt):
            acc += math.exp(z[r, j] - m)
        ls = math.log(block_reduce(buf, acc, False))
        if tid == 0:
            rowmax[r] = m
            rowls[r] = ls
            tt = t[r]
            if tt == ignore:
                flag[r] = 0
                rowloss[r] = zero
            elif tt >= 0 and tt < V:
                flag[r] = 1
                rowloss[r] = ls - (z[r, tt] - m)
            else:
                flag[r] = 2
                rowloss[r] = zero

    @cuda.jit
    def ce_backward(z, t, ignore, rowmax, rowls, scale, d, one):
        r = cuda.blockIdx.x
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        tt = t[r]
        if tt == ignore:
            for j in range(tid, z.shape[1], nt):
                d[r, j] = one - one
            return
        m, ls = rowmax[r], rowls[r]
        for j in range(tid, z.shape[1], nt):
            e = math.exp((z[r, j] - m) - ls)
            d[r, j] = (e - one if j == tt else e) * scale

    return softmax, causal_backward, ce_rows, ce_backward


@cuda.jit
def _ce_total(rowloss, flag, out):
    """out = (sum of kept rows' losses, kept count, out-of-range count), in float64 (one block). Each sum has
    its own shared buffer (one allocation per line, as the simulator requires), so no sum can ever read
    another's partials: CI twice saw a fractional out-of-range count in the CUDA simulator when the three
    shared one buffer (not reproduced in isolation)."""
    buf_loss = cuda.shared.array(SHARED, float64)
    buf_kept = cuda.shared.array(SHARED, float64)
    buf_bad = cuda.shared.array(SHARED, float64)
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    acc, kept, bad = 0.0, 0.0, 0.0
    for r in range(tid, rowloss.shape[0], nt):
        f = flag[r]
        if f == 1:
            acc += rowloss[r]
            kept += 1.0
        elif f == 2:
            bad += 1.0
    acc = block_reduce(buf_loss, acc, False)
    kept = block_reduce(buf_kept, kept, False)
    bad = block_reduce(buf_bad, bad, False)
    if tid == 0:
        out[0], out[1], out[2] = acc, kept, bad


# --- host side ---------------------------------------------------------------------------------------


def _rows(a, L):
    n = int(np.prod(tuple(a.shape)[:-1], dtype=np.int64))
    return a.reshape(n, L), n


def _in_place(name, which, s, L, *args, p=None):
    """Run kernel `which` on the rows (length L) of s in place (p: a second, read-only array of s's
    shape); for a host or non-contiguous CuPy s, the result is copied back into s. Returns s."""
    dtype = float_dtype(s, name)
    kind = array_kind(s)
    d = on_device(s, kind, None, check=name)
    d2, R = _rows(d, L)
    if R and L:
        extra = () if p is None else (_rows(on_device(p, kind, dtype, check=name), L)[0],)
        _kernels(dtype.name)[which][R, threads_for(L)](d2, *extra, *args, dtype.type(1))
    if kind == "host":
        if s.flags.c_contiguous:
            d.copy_to_host(s)
        else:
            s[...] = d.copy_to_host()
    elif d is not s:  # (a CuPy array that was not C-contiguous was copied)
        s[...] = d
    return s


def _check_square(s, name):
    shape = tuple(s.shape)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"{name}: needs square score matrices (..., T, T), got {shape}")
    return shape[-1]


def causal(s):
    """s: (..., T, T) float32/float64 -> p (the same array, overwritten; zeros above the diagonal)."""
    T = _check_square(s, "causal")
    return _in_place("causal", 0, s, T, T, 1)


def causal_backward(dp, p):
    """dp, p: (..., T, T) -> ds (dp's array, overwritten)."""
    T = _check_square(dp, "causal_backward")
    if tuple(p.shape) != tuple(dp.shape):
        raise ValueError(f"causal_backward: dp is {tuple(dp.shape)}, p is {tuple(p.shape)}")
    return _in_place("causal_backward", 1, dp, T, p=p)


def rows(s):
    """s: (..., L) float32/float64 -> plain softmax over the last axis (the same array, overwritten)."""
    if len(s.shape) < 1:
        raise ValueError("rows: needs an array of at least one dimension")
    return _in_place("rows", 0, s, tuple(s.shape)[-1], 1, 0)


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """logits: (..., V) float, targets: (...) int -> (mean loss over targets != ignore_index, cache)."""
    shape = tuple(logits.shape)
    if len(shape) < 1 or shape[-1] < 1 or tuple(targets.shape) != shape[:-1]:
        raise ValueError(f"cross_entropy_forward: needs logits (..., V) and targets (...), got "
                         f"{shape} and {tuple(targets.shape)}")
    if not np.issubdtype(np.dtype(targets.dtype), np.integer):
        raise ValueError(f"cross_entropy_forward: targets must be integers, got {targets.dtype}")
    dtype = float_dtype(logits, "cross_entropy_forward")
    kind = array_kind(logits)
    V = shape[-1]
    z, N = _rows(on_device(logits, kind, dtype, check="cross_entropy_forward"), V)
    t = on_device(targets, kind).reshape(N)
    if N == 0:
        raise ValueError("cross_entropy: every target is ignore_index")  # (no rows at all)
    rowmax, rowls, rowloss = (empty(kind, (N,), dtype) for _ in range(3))
    flag = empty(kind, (N,), np.int32)
    out = empty(kind, (3,), np.float64)
    one = dtype.type(1)
    _kernels(dtype.name)[2][N, threads_for(V)](z, t, np.int64(ignore_index), rowmax, rowls, rowloss,
                                               flag, one)
    _ce_total[1, threads_for(N)](rowloss, flag, out)
    total, kept, bad = (float(x) for x in (out.get() if kind == "cupy" else out.copy_to_host()))
    if bad:
        raise ValueError(f"cross_entropy_forward: {int(bad)} targets outside [0, {V}) "
                         f"(and not ignore_index {ignore_index})")
    if kept == 0:
        raise ValueError("cross_entropy: every target is ignore_index")
    cache = dict(logits=z, targets=t, ignore_index=int(ignore_index), rowmax=rowmax, rowls=rowls,
                 n=int(kept), shape=shape, kind=kind)
    return total / kept, cache


def cross_entropy_backward(dloss, cache):
    """dloss: scalar -> dlogits: (..., V), of the kind of the forward's logits."""
    z, kind = cache["logits"], cache["kind"]
    N, V = z.shape
    dtype = np.dtype(z.dtype)
    d = empty(kind, (N, V), dtype)
    scale = dtype.type(float(dloss) / cache["n"])
    _kernels(dtype.name)[3][N, threads_for(V)](z, cache["targets"], np.int64(cache["ignore_index"]),
                                               cache["rowmax"], cache["rowls"], scale, d, dtype.type(1))
    return to_kind(d, kind).reshape(cache["shape"])
