"""Embedding backward on the GPU (numba.cuda), deterministic: the same sums, in the same order, as
kernels/embedding.py (whose NumPy reference is the specification):

    dw[ids[n], :] += dy[n, :]   for n = 0 .. N-1, in this order

A scatter with atomic adds (what cupy.add.at does) sums repeated ids in whatever order the threads
arrive, so the gradient, and every later step, would change from run to run in the last bits. Here the
token positions are first sorted by id with a stable sort (positions of one id stay in increasing
order); then one block per run of equal ids, its threads across channels, adds the run's rows in that
order into dw. A frequent id makes a long run, but the run's loads are independent and coalesced. Only
additions, no fused multiply-adds: the result equals the CPU kernel bit for bit.

    backward(dy, ids, shape, out=None)   dy: (..., C), ids: (...) int, shape (V, C)

Arrays may be NumPy, CuPy or numba device arrays (results of dy's kind; see cuda_arrays.py). The sort
runs in CuPy for CuPy arrays, else in NumPy on the host. This module imports nothing else of minillm.
"""

import numpy as np
from numba import cuda

from minillm.kernels.cuda_arrays import array_kind, empty, float_dtype, on_device, to_kind

THREADS = 128


@cuda.jit
def _add_runs_kernel(dy, sorted_ids, order, dw):
    """Block n (when a run of equal ids starts at sorted position n) adds the run's rows into dw."""
    n = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    N = sorted_ids.shape[0]
    if c >= dw.shape[1] or (n > 0 and sorted_ids[n - 1] == sorted_ids[n]):
        return
    v = sorted_ids[n]
    acc = dw[v, c]
    k = n
    while k < N and sorted_ids[k] == v:
        acc += dy[order[k], c]
        k += 1
    dw[v, c] = acc


def _stable_order(ids, kind, V):
    """(sorted ids, positions in sorted order) as GPU arrays of kind `kind`; ties keep position order.
    Raises ValueError for ids outside [0, V) (one small transfer to the host)."""
    if kind == "cupy":
        import cupy

        flat = cupy.asarray(ids).reshape(-1).astype(cupy.int64)
        order = cupy.argsort(flat)      # CuPy's sort is stable (a CUB radix sort)
        flat = cupy.ascontiguousarray(flat[order])
        lo, hi = (int(v) for v in flat[cupy.asarray([0, flat.size - 1])].get()) if flat.size else (0, 0)
    else:
        host = ids.copy_to_host() if array_kind(ids) == "device" else np.asarray(ids)
        host = host.reshape(-1).astype(np.int64)
        order = np.argsort(host, kind="stable")
        lo, hi = (int(host.min()), int(host.max())) if host.size else (0, 0)
        flat, order = cuda.to_device(np.ascontiguousarray(host[order])), cuda.to_device(order)
    if lo < 0 or hi >= V:
        raise ValueError(f"embedding backward: ids outside [0, {V})")
    return flat, order


def backward(dy, ids, shape, out=None):
    """dy: (..., C), ids: (...) int, shape: (V, C) -> dw: (V, C); adds into `out` instead of zeros when given
    (out must then be a GPU array of dy's dtype)."""
    V, C = (int(s) for s in shape)
    kind = array_kind(dy)
    dy_shape = tuple(dy.shape)   # (the CUDA simulator's shapes take no negative index)
    if dy_shape[:-1] != tuple(ids.shape) or dy_shape[-1] != C:
        raise ValueError(f"embedding backward: dy must be ids.shape + ({C},), got {tuple(dy.shape)} for ids "
                         f"{tuple(ids.shape)}")
    dtype = float_dtype(dy, "embedding backward")
    sorted_ids, order = _stable_order(ids, kind, V)
    N = int(sorted_ids.shape[0])
    if out is None:
        dw = empty(kind, (V, C), dtype)
        if kind == "cupy":
            dw.fill(0)
        else:
            dw = cuda.to_device(np.zeros((V, C), dtype))
    else:
        if array_kind(out) == "host" or tuple(out.shape) != (V, C) or np.dtype(out.dtype) != dtype:
            raise ValueError(f"embedding backward: out must be a {dtype} GPU array of shape ({V}, {C})")
        dw = out
    dy2 = on_device(dy, kind, dtype).reshape(N, C)
    if N and C:
        _add_runs_kernel[(N, (C + THREADS - 1) // THREADS), THREADS](dy2, sorted_ids, order, dw)
    return to_kind(dw, kind)
