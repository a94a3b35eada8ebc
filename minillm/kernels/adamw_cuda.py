"""The AdamW update of one parameter tensor as one numba.cuda kernel (optim.adamw_step is the specification).

optim.adamw_step updates a parameter with eleven array operations, each a pass over memory; on the GPU
this kernel does the same arithmetic in one pass: it reads p, g, m, v and writes p, m, v (7 words per
element, the memory-bandwidth floor of the update). Per element, at step t (s = lr / (1 - b1^t),
c2 = sqrt(1 - b2^t)), in torch's order of operations:

    p <- p * (1 - lr wd)                  only for decayed tensors (decay = 1 - lr wd, else 1)
    m <- m + (g - m) (1 - b1)
    v <- v b2 + (g (1 - b2)) g
    p <- p + (m (-s)) / (sqrt(v) / c2 + eps)

Every scalar is passed in the parameter's dtype, so float32 stays float32. The GPU compiler fuses
multiply-adds, so results agree with the NumPy path to a few ulps, not bit for bit; each element is
independent, so the result is deterministic.

    update(p, g, m, v, decay, beta1, beta2, step_size, bias_correction2_sqrt, eps)

p, m, v are updated in place; they and g must be GPU arrays (CuPy or numba device arrays) of one shape
and dtype (a host call would update copies, so it is refused); p, m, v C-contiguous, g may be any view. This module imports nothing else of
minillm.
"""

import math

import numpy as np
from numba import cuda

from minillm.kernels.cuda_arrays import array_kind, float_dtype

THREADS = 256
MAX_BLOCKS = 4096   # grid-stride loop beyond this many blocks


@cuda.jit
def _update_kernel(p, g, m, v, decay, one_minus_b1, b2, one_minus_b2, neg_step_size, c2, eps):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, p.size, stride):
        gi = g[i]
        mi = m[i] + (gi - m[i]) * one_minus_b1
        vi = v[i] * b2 + (gi * one_minus_b2) * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay + (mi * neg_step_size) / (math.sqrt(vi) / c2 + eps)


def _contiguous(a):
    return a.is_c_contiguous() if array_kind(a) == "device" else a.flags.c_contiguous


def _contiguous_copy(a):
    if array_kind(a) == "cupy":
        import cupy

        return cupy.ascontiguousarray(a)
    return cuda.to_device(np.ascontiguousarray(a.copy_to_host()))   # (numba device arrays: tests only)


def _flat(a):
    """A 1-D view of a C-contiguous GPU array (no copy)."""
    return a.reshape(a.size) if array_kind(a) == "device" else a.reshape(-1)


def update(p, g, m, v, decay, beta1, beta2, step_size, bias_correction2_sqrt, eps):
    """p, g, m, v: GPU arrays of one shape and float dtype; p, m, v updated in place (see module doc)."""
    arrays = (p, g, m, v)
    if any(array_kind(a) == "host" for a in arrays):
        raise ValueError("update: p, g, m and v must be GPU arrays (CuPy or numba device arrays)")
    dtype = float_dtype(p, "update")
    for name, a in zip("pgmv", arrays):
        if tuple(a.shape) != tuple(p.shape) or np.dtype(a.dtype) != dtype:
            raise ValueError(f"update: {name} is {a.dtype} {tuple(a.shape)}, "
                             f"p is {dtype} {tuple(p.shape)}")
        if name != "g" and not _contiguous(a):
            raise ValueError(f"update: {name} must be C-contiguous (it is updated in place)")
    if not _contiguous(g):    # a gradient may be a transposed view (e.g. a head stored (out, in))
        g = _contiguous_copy(g)
    arrays = (p, g, m, v)
    if p.size == 0:
        return
    s = dtype.type
    blocks = min(MAX_BLOCKS, (p.size + THREADS - 1) // THREADS)
    _update_kernel[blocks, THREADS](*(_flat(a) for a in arrays), s(decay), s(1.0 - beta1), s(beta2),
                                    s(1.0 - beta2), s(-step_size), s(bias_correction2_sqrt), s(eps))
