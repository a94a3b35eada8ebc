"""LayerNorm over the last axis (torch.nn.LayerNorm: biased variance), forward and backward:
NumPy reference and Numba kernels.

    xhat = (x - mean(x)) * rstd,   rstd = 1 / sqrt(var(x) + eps),   y = xhat * w + b
    backward (g = dy * w):  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
                            dw = sum over rows of dy * xhat,   db = sum over rows of dy

The forward caches (xhat, rstd, w) in every form, so any backward fits any forward. The reference works on
NumPy and CuPy arrays.
Row sums run in float64 over 8 interleaved partial sums (lane j % 8), combined in a fixed order:
without fastmath LLVM may not reorder a floating-point sum, and one running sum would serialise on
the adder's latency; eight independent ones vectorise. dw and db accumulate over rows in float64.
The forward runs in parallel blocks of rows, the backward serially (its dw, db sum over rows);
both are deterministic for any thread count. No fastmath.
"""

import math

import numba
import numpy as np

ROW_BLOCKS = 64      # parallel jobs of the forward: contiguous blocks of rows

# --- NumPy reference (the specification) ------------------------------------------------------------


def forward_reference(x, w, b, eps=1e-5):
    """x: (..., C), w, b: (C,) -> (y, (xhat, rstd, w))."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    rstd = 1.0 / ((xc * xc).mean(axis=-1, keepdims=True) + eps) ** 0.5
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd, w)


def backward_reference(dy, cache):
    """dy: (..., C) -> (dx, dw, db)."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    g = dy * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).reshape(-1, C).sum(axis=0), dy.reshape(-1, C).sum(axis=0)


def rows_reference(x, w, b, eps=1e-5):
    """Forward only, no cache (the decoding step): forward_reference's y."""
    return forward_reference(x, w, b, eps)[0]


# --- Numba CPU kernels ------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def sum8(a, c0, c1, mul):
    """sum_j a[j] (times mul[j] if mul has entries) for j in [c0, c1), as 8 interleaved partial sums
    (the row sums of kernels/softmax.py use it too)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    j = c0
    weighted = mul.size > 0
    while j + 8 <= c1:
        if weighted:
            s0 += a[j] * mul[j]
            s1 += a[j + 1] * mul[j + 1]
            s2 += a[j + 2] * mul[j + 2]
            s3 += a[j + 3] * mul[j + 3]
            s4 += a[j + 4] * mul[j + 4]
            s5 += a[j + 5] * mul[j + 5]
            s6 += a[j + 6] * mul[j + 6]
            s7 += a[j + 7] * mul[j + 7]
        else:
            s0 += a[j]
            s1 += a[j + 1]
            s2 += a[j + 2]
            s3 += a[j + 3]
            s4 += a[j + 4]
            s5 += a[j + 5]
            s6 += a[j + 6]
            s7 += a[j + 7]
        j += 8
    while j < c1:
        s0 += a[j] * mul[j] if weighted else a[j]
        j += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(cache=True, parallel=True, nogil=True)
def _forward(x, w, b, eps, y, xhat, rstd):
    N, C = x.shape
    for block in numba.prange(ROW_BLOCKS):       # rows are independent: any thread count, the same bits
        buf = np.empty(C)
        none = np.empty(0)
        for i in range(N * block // ROW_BLOCKS, N * (block + 1) // ROW_BLOCKS):
            row, xh, yr = x[i], xhat[i], y[i]
            mean = sum8(row, 0, C, none) / C
            for j in range(C):
                buf[j] = row[j] - mean
            r = 1.0 / math.sqrt(sum8(buf, 0, C, buf) / C + eps)
            rstd[i] = r
            for j in range(C):
                h = buf[j] * r
                xh[j] = h
                yr[j] = h * w[j] + b[j]


@numba.njit(cache=True, nogil=True)
def _backward(dy, xhat, rstd, w, dx, dw, db):
    N, C = dy.shape
    g = np.empty(C)
    none = np.empty(0)
    for i in range(N):
        d, h = dy[i], xhat[i]
        for j in range(C):
            g[j] = d[j] * w[j]
            dw[j] += d[j] * h[j]
            db[j] += d[j]
        mg = sum8(g, 0, C, none) / C
        mgx = sum8(g, 0, C, h) / C
        r = rstd[i]
        for j in range(C):
            dx[i, j] = r * (g[j] - mg - h[j] * mgx)


def forward(x, w, b, eps=1e-5):
    """As the reference; x: (..., C) float32/float64."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)
    y, xhat = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty((x2.shape[0], 1), dtype=x.dtype)
    _forward(x2, w, b, eps, y, xhat, rstd[:, 0])
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,)), w)


def backward(dy, cache):
    """As the reference."""
    xhat, rstd, w = cache
    if dy.shape != xhat.shape:
        raise ValueError(f"layernorm backward: dy has shape {dy.shape}, x has {xhat.shape}")
    C = xhat.shape[-1]
    dy2 = np.ascontiguousarray(dy, dtype=xhat.dtype).reshape(-1, C)
    dx = np.empty_like(dy2)
    dw, db = np.zeros(C), np.zeros(C)
    _backward(dy2, np.ascontiguousarray(xhat).reshape(-1, C), rstd.reshape(-1), w, dx, dw, db)
    return dx.reshape(dy.shape), dw.astype(xhat.dtype), db.astype(xhat.dtype)


def rows(x, w, b, eps=1e-5):
    """Forward only, no cache (the decoding step): as the reference's y."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)
    y, xhat = np.empty_like(x2), np.empty_like(x2)
    _forward(x2, w, b, eps, y, xhat, np.empty(x2.shape[0], dtype=x.dtype))
    return y.reshape(x.shape)
