"""GELU, tanh approximation (HF `gelu_new`), forward and backward: NumPy reference and Numba kernels.

    t = tanh(c (x + a x^3)),  c = sqrt(2 / pi),  a = 0.044715
    y = x (1 + t) / 2
    dy/dx = (1 + t) / 2 + x (1 - t^2) c (1 + 3 a x^2) / 2

The forward caches (x, t) so the backward needs no tanh. The Numba forward fuses the polynomial and
the output into one pass each and leaves tanh to NumPy, whose vectorised tanh is ~100x faster than a
scalar libm call per element (Numba has no SVML here); the backward is one fused pass. Arithmetic
stays in the input dtype (constants are cast to it). Serial, like kernels/softmax.py (see there why);
elementwise, so deterministic. No fastmath.
"""

import math

import numba
import numpy as np

from minillm.arrays import array_module

C = math.sqrt(2.0 / math.pi)
A = 0.044715


# --- NumPy reference (the specification) ------------------------------------------------------------


def forward_reference(x):
    """x: (...) -> (y, (x, t))."""
    t = array_module(x).tanh(C * (x + A * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def backward_reference(dy, cache):
    x, t = cache
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (C * (1.0 + 3.0 * A * x * x)))



# --- Numba CPU kernels ------------------------------------------------------------------------------


@numba.njit(cache=True)
def _inner(x, u, c, a):
    for i in range(x.size):
        v = x[i]
        u[i] = c * (v + a * v * v * v)


@numba.njit(cache=True)
def _outer(x, t, y, half, one):
    for i in range(x.size):
        y[i] = half * x[i] * (one + t[i])


@numba.njit(cache=True)
def _backward(dy, x, t, dx, half, one, c, a3):
    for i in range(x.size):
        v, th = x[i], t[i]
        dx[i] = dy[i] * (half * (one + th) + half * v * (one - th * th) * (c * (one + a3 * v * v)))


def _flat(a):
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(-1)


def forward(x):
    """x: (...) float32/float64 -> (y, (x, t)); as the reference."""
    x = np.ascontiguousarray(x)
    dt = x.dtype.type
    xf = x.reshape(-1)
    t = np.empty_like(xf)
    _inner(xf, t, dt(C), dt(A))
    np.tanh(t, out=t)
    y = np.empty_like(xf)
    _outer(xf, t, y, dt(0.5), dt(1.0))
    return y.reshape(x.shape), (x, t.reshape(x.shape))


def backward(dy, cache):
    x, t = cache
    if dy.shape != x.shape:
        raise ValueError(f"gelu backward: dy has shape {dy.shape}, x has {x.shape}")
    dt = x.dtype.type
    dx = np.empty(x.shape, dtype=x.dtype)
    _backward(_flat(dy.astype(x.dtype, copy=False)), x.reshape(-1), t.reshape(-1), dx.reshape(-1),
              dt(0.5), dt(1.0), dt(C), dt(3.0 * A))
    return dx
