"""GELU, tanh approximation (HF `gelu_new`), forward and backward as numba.cuda kernels.

Same math, cache and contract as kernels/gelu.py (its NumPy reference is the specification):

    t = tanh(c (x + a x^3)),  c = sqrt(2 / pi),  a = 0.044715,   y = x (1 + t) / 2
    dx = dy ((1 + t) / 2 + x (1 - t^2) c (1 + 3 a x^2) / 2)

    forward(x) -> (y, (x, t))       x: (...) float32/float64
    backward(dy, cache) -> dx

Elementwise, one launch each: a grid-stride loop over the flattened array (adjacent threads take
adjacent elements: coalesced), the constants passed in x's dtype so float32 stays float32, the
operations in the reference's order. The GPU compiler may fuse multiply-adds, so results agree with
NumPy to a few ulps (bit for bit in the simulator's float64); each element is independent, so results
are deterministic. The cache is (x, t) of the caller's kind, as kernels/gelu.py's and ops.gelu_forward's,
so either backward takes either forward's cache.

Arrays may be NumPy (copied to the GPU, results copied back), CuPy or numba device arrays (results of
the same kind; see cuda_arrays.py). This module imports nothing else of minillm.
"""

import math

import numpy as np
from numba import cuda

from minillm.kernels.cuda_arrays import array_kind, empty, float_dtype, on_device, to_kind

C = math.sqrt(2.0 / math.pi)
A = 0.044715
THREADS = 256
MAX_BLOCKS = 4096  # grid-stride loop beyond this many blocks


@cuda.jit
def _forward_kernel(x, y, t, c, a, half, one):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        th = math.tanh(c * (v + a * v * v * v))
        t[i] = th
        y[i] = half * v * (one + th)


@cuda.jit
def _backward_kernel(dy, x, t, dx, c, a3, half, one):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v, th = x[i], t[i]
        dx[i] = dy[i] * (half * (one + th) + half * v * (one - th * th) * (c * (one + a3 * v * v)))


def _launch(n):
    return min(MAX_BLOCKS, (n + THREADS - 1) // THREADS), THREADS


def _flat(a):
    return a.reshape(int(np.prod(tuple(a.shape), dtype=np.int64)))


def forward(x):
    """x: (...) float32/float64 -> (y, (x, t)), y and t of x's shape and kind."""
    dtype = float_dtype(x, "forward")
    kind = array_kind(x)
    shape = tuple(x.shape)
    xd = on_device(x, kind, dtype, check="forward")
    y, t = empty(kind, shape, dtype), empty(kind, shape, dtype)
    n = int(np.prod(shape, dtype=np.int64))
    if n:
        s = dtype.type
        _forward_kernel[_launch(n)](_flat(xd), _flat(y), _flat(t), s(C), s(A), s(0.5), s(1.0))
    # the cache holds the caller's x for host and numba device calls, the contiguous copy for CuPy
    return to_kind(y, kind), (x if kind != "cupy" else xd, to_kind(t, kind))


def backward(dy, cache):
    """dy: (...) -> dx, of dy's kind; cache: (x, t) from forward or kernels/gelu.py / ops."""
    x, t = cache
    shape = tuple(x.shape)
    if tuple(dy.shape) != shape or tuple(t.shape) != shape:
        raise ValueError(f"backward: dy is {tuple(dy.shape)}, x is {shape}, t is {tuple(t.shape)}")
    dtype = float_dtype(x, "backward")
    kind = array_kind(dy)
    dyd, xd, td = (on_device(a, kind, dtype, check="backward") for a in (dy, x, t))
    dx = empty(kind, shape, dtype)
    n = int(np.prod(shape, dtype=np.int64))
    if n:
        s = dtype.type
        _backward_kernel[_launch(n)](_flat(dyd), _flat(xd), _flat(td), _flat(dx), s(C), s(3.0 * A),
                                     s(0.5), s(1.0))
    return to_kind(dx, kind)
