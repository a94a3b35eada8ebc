"""WKV forward and backward as numba.cuda kernels: one thread per (batch row, channel).

Same math, recurrences and contract as kernels/wkv.py (read its docstring first): forward keeps the
max-tracking state (num a, den b, max p) in registers and walks t = 0 .. T-1; backward walks back
from T-1 with the scaled sums Ga, Gb, Ha, Hb. Adjacent threads take adjacent channels, so every
load and store of k[b, t, :] is coalesced. dw and du are written per (b, c) and summed over b by a
second kernel in a fixed order: results are deterministic.

Arrays may be host NumPy arrays (copied to the GPU and the results copied back), CuPy arrays or
numba device arrays (the results are then of the same kind, and stay on the GPU).
"""

import math

import numpy as np
from numba import cuda

from minillm.kernels.cuda_arrays import array_kind as _kind, empty, on_device, to_kind

BIG = 1e38
THREADS = 128


@cuda.jit
def _forward_kernel(k, v, w, u, a0, b0, p0, y, q_out, dinv_out, a1, b1, p1, one):
    # `one` is 1 in k's dtype: a float literal would turn float32 arithmetic into float64
    B, T, C = k.shape
    i = cuda.grid(1)
    if i >= B * C:
        return
    bi = i // C
    c = i - bi * C
    a, b, p = a0[bi, c], b0[bi, c], p0[bi, c]
    wc, uc = w[c], u[c]
    for t in range(T):
        kt = k[bi, t, c]
        vt = v[bi, t, c]
        uk = uc + kt
        e = math.exp(-abs(uk - p))  # one of e^{p-q}, e^{uk-q} is 1, q = max(p, uk)
        e1 = e if uk > p else one
        e2 = one if uk > p else e
        dinv = one / (e1 * b + e2)
        y[bi, t, c] = (e1 * a + e2 * vt) * dinv
        q_out[bi, t, c] = uk if uk > p else p  # (no 2-argument max: numba#10753)
        dinv_out[bi, t, c] = dinv
        pw = p + wc
        e = math.exp(-abs(kt - pw))
        e1 = e if kt > pw else one
        e2 = one if kt > pw else e
        a = e1 * a + e2 * vt
        b = e1 * b + e2
        p = kt if kt > pw else pw
    a1[bi, c], b1[bi, c], p1[bi, c] = a, b, p


@cuda.jit
def _backward_kernel(k, v, w, u, y, q_in, dinv_in, dy, dk, dv, dw_part, du_part, one, big):
    B, T, C = k.shape
    i = cuda.grid(1)
    if i >= B * C:
        return
    bi = i // C
    c = i - bi * C
    wc, uc = w[c], u[c]
    zero = one - one
    ga, gb, ha, hb, dwa, dua = zero, zero, zero, zero, zero, zero
    r = -big
    for s in range(T):
        t = T - 1 - s
        kt = k[bi, t, c]
        vt = v[bi, t, c]
        yt = y[bi, t, c]
        qt = q_in[bi, t, c]
        gdinv = dy[bi, t, c] * dinv_in[bi, t, c]
        direct = gdinv * math.exp(uc + kt - qt)  # g_t e^{u+k_t} / D_t
        f = math.exp(kt + r)
        dk[bi, t, c] = direct * (vt - yt) + f * (vt * ga - gb)
        dv[bi, t, c] = direct + f * ga
        dwa += f * (vt * ha - hb)
        dua += direct * (vt - yt)
        rw = r + wc
        e = math.exp(-abs(qt + rw))  # r_{t-1} = max(r_t + w, -q_t)
        e_old = e if -qt > rw else one
        e_new = one if -qt > rw else e
        r = -qt if -qt > rw else rw
        gd = gdinv * e_new
        ha = e_old * (ha + ga)
        hb = e_old * (hb + gb)
        ga = e_old * ga + gd
        gb = e_old * gb + gd * yt
    dw_part[bi, c] = dwa
    du_part[bi, c] = dua


@cuda.jit
def _sum_rows_kernel(part, out):
    """out[c] = sum over b of part[b, c], b in increasing order."""
    c = cuda.grid(1)
    if c >= part.shape[1]:
        return
    acc = part[0, c]
    for b in range(1, part.shape[0]):
        acc += part[b, c]
    out[c] = acc


# --- host side ---------------------------------------------------------------------------------------


def _on_device(x, kind, dtype):
    return on_device(x, kind, dtype, check="wkv_cuda")


def _launch(n):
    return (n + THREADS - 1) // THREADS, THREADS


def forward(k, v, w, u, state=None):
    """k, v: (B, T, C), w, u: (C,), state: (num, den, max) each (B, C) or None -> (y, cache);
    the final state is cache["state_out"]. Same contract as kernels.wkv.forward."""
    if len(k.shape) != 3 or tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"wkv: k and v must both be (B, T, C), got {k.shape} and {v.shape}")
    B, T, C = k.shape
    if tuple(w.shape) != (C,) or tuple(u.shape) != (C,):
        raise ValueError(f"wkv: w and u must be ({C},), got {w.shape} and {u.shape}")
    dtype = np.dtype(k.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"wkv: k must be float32 or float64, got {dtype}")
    kind = _kind(k)
    k, v, w, u = (_on_device(x, kind, dtype) for x in (k, v, w, u))
    if state is None:
        if kind == "cupy":    # made on the GPU: no host-to-device copy per call
            import cupy as xp
        else:
            xp = np
        state = (xp.zeros((B, C), dtype), xp.zeros((B, C), dtype), xp.full((B, C), -BIG, dtype))
        has_state = False
    else:
        has_state = True
    a0, b0, p0 = (_on_device(x, kind, dtype) for x in state)
    y, q, dinv = (empty(kind, (B, T, C), dtype) for _ in range(3))
    a1, b1, p1 = (empty(kind, (B, C), dtype) for _ in range(3))
    _forward_kernel[_launch(B * C)](k, v, w, u, a0, b0, p0, y, q, dinv, a1, b1, p1, dtype.type(1))
    cache = dict(k=k, v=v, w=w, u=u, y=y, q=q, dinv=dinv, kind=kind, has_state=has_state,
                 state_out=tuple(to_kind(x, kind) for x in (a1, b1, p1)))
    return to_kind(y, kind), cache


def backward(dy, cache):
    """dy: (B, T, C) -> (dk, dv, dw: (C,), du: (C,)), of the kind of the forward's inputs."""
    if cache["has_state"]:
        raise ValueError("wkv backward: a forward started from a given state is for inference only")
    k, kind = cache["k"], cache["kind"]
    B, T, C = k.shape
    dtype = np.dtype(k.dtype)
    dy = _on_device(dy, kind, dtype)
    dk, dv = empty(kind, (B, T, C), dtype), empty(kind, (B, T, C), dtype)
    dw_part, du_part = empty(kind, (B, C), dtype), empty(kind, (B, C), dtype)
    _backward_kernel[_launch(B * C)](k, cache["v"], cache["w"], cache["u"], cache["y"], cache["q"],
                                     cache["dinv"], dy, dk, dv, dw_part, du_part, dtype.type(1),
                                     dtype.type(BIG))
    dw, du = empty(kind, (C,), dtype), empty(kind, (C,), dtype)
    _sum_rows_kernel[_launch(C)](dw_part, dw)
    _sum_rows_kernel[_launch(C)](du_part, du)
    return tuple(to_kind(x, kind) for x in (dk, dv, dw, du))
