"""Selective scan (Mamba-1 S6): NumPy reference and Numba CPU kernels, forward and backward.

For each batch row b and channel d, with state h_t in R^N (Gu & Dao 2023, eq. 2a-2b and 4),

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t        (A discretised exactly, B by Euler, as the paper)
    y_t = C_t . h_t + D x_t                            h_0 = 0

Shapes: x, dt: (Bt, L, Dm); A: (Dm, N); B, C: (Bt, L, N); D: (Dm,) -> y: (Bt, L, Dm).
Nothing here applies softplus or a bias to dt: the caller does (see mamba.py).

Backward (hand-derived). With g_t = dL/dh_t, accumulated by a reverse-time scan

    g_t = dy_t C_t + a_{t+1} * g_{t+1},        a_t = exp(dt_t A),   q_t = g_t * h_{t-1} * a_t,

    dx_t  = D dy_t + dt_t sum_n g_t B_t           ddt_t = x_t sum_n g_t B_t + sum_n q_t A
    dB_t  = sum_d g_t dt_t x_t                    dC_t  = sum_d dy_t h_t
    dA    = sum_{b,t} q_t dt_t                    dD    = sum_{b,t} dy_t x_t

Numerics: a_t lies in (0, 1] whenever dt >= 0 and A <= 0 (as in Mamba), so h and g stay bounded for any L
and any dt: nothing overflows. The forward keeps no states; the backward kernel recomputes them per job.

The Numba kernels run in parallel over jobs (batch row, block of LANES channels); inside a job the time loop
is sequential and the inner loops run over the block's channels, so they vectorise. exp() is evaluated by
`_exp`, a polynomial of the same accuracy as libm (<= 2 ulp, tested) written so that LLVM can vectorise it
(no fastmath is needed). dB and dC are written per (b, block) and dA, dD per (b, d), then summed over
blocks / batch rows by NumPy in a fixed order: results do not depend on the number of threads.
"""

import math

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

LANES = 32  # channels per parallel job (the inner loops run over them; 16 made LLVM give up vectorising)


def _check(x, dt, A, B, C, D):
    """Validate shapes, return the common float dtype."""
    if x.ndim != 3 or dt.shape != x.shape:
        raise ValueError(f"selective scan: x and dt must both be (B, L, D), got {x.shape} and {dt.shape}")
    Bt, L, Dm = x.shape
    if A.ndim != 2 or A.shape[0] != Dm:
        raise ValueError(f"selective scan: A must be ({Dm}, N), got {A.shape}")
    N = A.shape[1]
    if B.shape != (Bt, L, N) or C.shape != (Bt, L, N):
        raise ValueError(f"selective scan: B and C must be ({Bt}, {L}, {N}), got {B.shape} and {C.shape}")
    if D.shape != (Dm,):
        raise ValueError(f"selective scan: D must be ({Dm},), got {D.shape}")
    dtype = np.result_type(x, dt, A, B, C, D)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"selective scan: needs float32 or float64 arrays, got {dtype}")
    return dtype


# --- NumPy reference (the specification) ------------------------------------------------------------


def selective_scan_forward_ref(x, dt, A, B, C, D):
    """x, dt: (Bt, L, Dm), A: (Dm, N), B, C: (Bt, L, N), D: (Dm,) -> (y: (Bt, L, Dm), cache).

    Readable and memory-hungry: it keeps every state h_t, (Bt, L + 1, Dm, N)."""
    _check(x, dt, A, B, C, D)
    Bt, L, Dm = x.shape
    a = np.exp(dt[..., None] * A)                         # (Bt, L, Dm, N)
    u = (dt * x)[..., None] * B[:, :, None, :]            # dt_t B_t x_t
    h = np.zeros((Bt, L + 1, Dm, A.shape[1]), dtype=a.dtype)  # h[:, t + 1] is the state after step t
    y = np.empty(x.shape, dtype=a.dtype)
    for t in range(L):
        h[:, t + 1] = a[:, t] * h[:, t] + u[:, t]
        y[:, t] = np.einsum("bdn,bn->bd", h[:, t + 1], C[:, t])
    y += D * x
    return y, (x, dt, A, B, C, D, a, h)


def selective_scan_backward_ref(dy, cache):
    """dy: (Bt, L, Dm) -> (dx, ddt, dA, dB, dC, dD), shaped like the forward's arguments."""
    x, dt, A, B, C, D, a, h = cache
    L = x.shape[1]
    dx, ddt = np.empty_like(dy), np.empty_like(dy)
    dB, dC = np.empty(B.shape, dy.dtype), np.empty(C.shape, dy.dtype)
    dA = np.zeros(A.shape, dy.dtype)
    g = np.zeros(h.shape[:1] + h.shape[2:], dy.dtype)     # dL/dh_t, (Bt, Dm, N)
    for t in reversed(range(L)):
        g = g + dy[:, t, :, None] * C[:, t, None, :]
        dC[:, t] = np.einsum("bd,bdn->bn", dy[:, t], h[:, t + 1])
        gB = (g * B[:, t, None, :]).sum(-1)               # sum_n g_t B_t, (Bt, Dm)
        q = g * h[:, t] * a[:, t]                         # dL/d(dt_t A) through a_t = exp(dt_t A)
        ddt[:, t] = x[:, t] * gB + (q * A).sum(-1)
        dx[:, t] = dt[:, t] * gB
        dA += (q * dt[:, t, :, None]).sum(0)
        dB[:, t] = np.einsum("bdn,bd->bn", g, dt[:, t] * x[:, t])
        g = g * a[:, t]                                    # carry a_t g_t back to step t - 1
    dx += D * dy
    dD = (dy * x).sum((0, 1))
    return dx, ddt, dA, dB, dC, dD


# --- a vectorisable exp -------------------------------------------------------------------------------


@intrinsic
def _f64_from_bits(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


def _exp(v):
    """exp(v) for a float32/float64 scalar, inside Numba only (see the overload below)."""
    return math.exp(v)


# exp(v) = 2^k exp(r), k = round(v / ln 2), r = v - k ln 2 (Cody-Waite: ln 2 split in a part whose products
# with k are exact, plus a correction), |r| <= ln2 / 2; exp(r) by its Taylor polynomial, whose truncation
# error is below half an ulp (degree 13 for float64, 7 for float32); 2^k built from its exponent bits. The
# argument is clamped to the normal range: below it the result is the smallest normal power instead of a
# denormal or 0 (a relative error no sum in this module can see), above it the largest finite power instead
# of inf. NaN propagates (through r).


@numba.njit(cache=True)
def _exp64(v):
    c = -708.0 if v < -708.0 else v  # (written so that NaN passes through)
    c = 709.0 if c > 709.0 else c
    k = np.floor(c * 1.4426950408889634 + 0.5)
    r = (c - k * 0.6931471803691238) - k * 1.9082149292705877e-10
    p = 1.6059043836821613e-10
    p = p * r + 2.08767569878681e-09
    p = p * r + 2.505210838544172e-08
    p = p * r + 2.755731922398589e-07
    p = p * r + 2.7557319223985893e-06
    p = p * r + 2.48015873015873e-05
    p = p * r + 0.0001984126984126984
    p = p * r + 0.001388888888888889
    p = p * r + 0.008333333333333333
    p = p * r + 0.041666666666666664
    p = p * r + 0.16666666666666666
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _f64_from_bits((np.int64(k) + 1023) << 52)


_F32 = np.float32


@numba.njit(cache=True)
def _exp32(v):
    c = _F32(-87.0) if v < _F32(-87.0) else v
    c = _F32(88.0) if c > _F32(88.0) else c
    k = np.floor(c * _F32(1.442695) + _F32(0.5))
    r = (c - k * _F32(0.693359375)) - k * _F32(-2.12194440e-4)
    p = _F32(1.9841270e-4)
    p = p * r + _F32(1.3888889e-3)
    p = p * r + _F32(8.3333333e-3)
    p = p * r + _F32(4.1666667e-2)
    p = p * r + _F32(0.16666667)
    p = p * r + _F32(0.5)
    p = p * r + _F32(1.0)
    p = p * r + _F32(1.0)
    return p * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@overload(_exp)
def _exp_impl(v):
    if v == types.float64:
        return lambda v: _exp64(v)
    if v == types.float32:
        return lambda v: _exp32(v)
    return None


@numba.njit(cache=True)
def exp_kernel(v):
    """Elementwise `_exp` of a 1-D array (exposed for tests)."""
    out = np.empty_like(v)
    for i in range(v.size):
        out[i] = _exp(v[i])
    return out


# --- Numba kernels --------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _load_block(A, D, d0, w):
    """A[d0:d0+w].T and D[d0:d0+w], zero-padded to LANES channels (padded lanes stay exactly 0)."""
    N = A.shape[1]
    At = np.zeros((N, LANES), dtype=A.dtype)
    Dv = np.zeros(LANES, dtype=A.dtype)
    for j in range(w):
        Dv[j] = D[d0 + j]
        for n in range(N):
            At[n, j] = A[d0 + j, n]
    return At, Dv


@numba.njit(cache=True, parallel=True)
def _forward_kernel(x, dt, A, B, C, D, y):
    Bt, L, Dm = x.shape
    N = A.shape[1]
    nblk = (Dm + LANES - 1) // LANES
    for job in prange(Bt * nblk):
        b, d0 = job // nblk, (job % nblk) * LANES
        w = min(LANES, Dm - d0)
        At, Dv = _load_block(A, D, d0, w)
        h = np.zeros((N, LANES), dtype=x.dtype)
        dtv = np.zeros(LANES, dtype=x.dtype)
        u = np.zeros(LANES, dtype=x.dtype)
        acc = np.zeros(LANES, dtype=x.dtype)
        for t in range(L):
            for j in range(w):
                dtv[j] = dt[b, t, d0 + j]
                u[j] = dtv[j] * x[b, t, d0 + j]
                acc[j] = Dv[j] * x[b, t, d0 + j]
            for n in range(N):
                bn, cn = B[b, t, n], C[b, t, n]
                for j in range(LANES):
                    hv = _exp(dtv[j] * At[n, j]) * h[n, j] + u[j] * bn
                    h[n, j] = hv
                    acc[j] += cn * hv
            for j in range(w):
                y[b, t, d0 + j] = acc[j]


@numba.njit(cache=True, parallel=True)
def _backward_kernel(x, dt, A, B, C, D, dy, dx, ddt, dA_part, dB_part, dC_part, dD_part):
    Bt, L, Dm = x.shape
    N = A.shape[1]
    nblk = (Dm + LANES - 1) // LANES
    for job in prange(Bt * nblk):
        b, blk = job // nblk, job % nblk
        d0 = blk * LANES
        w = min(LANES, Dm - d0)
        At, Dv = _load_block(A, D, d0, w)
        # recompute the states: hs[t + 1] = h_t, hs[0] = 0
        hs = np.empty((L + 1, N, LANES), dtype=x.dtype)
        hs[0] = 0.0
        dtv = np.zeros(LANES, dtype=x.dtype)
        xv = np.zeros(LANES, dtype=x.dtype)
        dyv = np.zeros(LANES, dtype=x.dtype)
        for t in range(L):
            for j in range(w):
                dtv[j] = dt[b, t, d0 + j]
                xv[j] = x[b, t, d0 + j]
            for n in range(N):
                bn = B[b, t, n]
                for j in range(LANES):
                    hs[t + 1, n, j] = _exp(dtv[j] * At[n, j]) * hs[t, n, j] + dtv[j] * xv[j] * bn
        # reverse-time scan
        g = np.zeros((N, LANES), dtype=x.dtype)
        dAacc = np.zeros((N, LANES), dtype=x.dtype)
        sB = np.zeros(LANES, dtype=x.dtype)
        sq = np.zeros(LANES, dtype=x.dtype)
        dDacc = np.zeros(LANES, dtype=x.dtype)
        pB, pC = np.zeros((N, LANES), dtype=x.dtype), np.zeros((N, LANES), dtype=x.dtype)
        for t in range(L - 1, -1, -1):
            for j in range(w):
                dtv[j] = dt[b, t, d0 + j]
                xv[j] = x[b, t, d0 + j]
                dyv[j] = dy[b, t, d0 + j]
            for j in range(LANES):
                sB[j] = 0.0
                sq[j] = 0.0
            for n in range(N):
                bn, cn = B[b, t, n], C[b, t, n]
                for j in range(LANES):
                    gv = g[n, j] + dyv[j] * cn
                    a = _exp(dtv[j] * At[n, j])
                    q = gv * hs[t, n, j] * a
                    sB[j] += gv * bn
                    sq[j] += q * At[n, j]
                    dAacc[n, j] += q * dtv[j]
                    pB[n, j] = gv * (dtv[j] * xv[j])
                    pC[n, j] = dyv[j] * hs[t + 1, n, j]
                    g[n, j] = a * gv
            for n in range(N):
                sb = pB[n, 0]
                sc = pC[n, 0]
                for j in range(1, w):
                    sb += pB[n, j]
                    sc += pC[n, j]
                dB_part[b, blk, t, n] = sb
                dC_part[b, blk, t, n] = sc
            for j in range(w):
                dx[b, t, d0 + j] = Dv[j] * dyv[j] + dtv[j] * sB[j]
                ddt[b, t, d0 + j] = xv[j] * sB[j] + sq[j]
                dDacc[j] += dyv[j] * xv[j]
        for j in range(w):
            dD_part[b, d0 + j] = dDacc[j]
            for n in range(N):
                dA_part[b, d0 + j, n] = dAacc[n, j]


# --- public entry points (the model uses these) ----------------------------------------------------------


def selective_scan_forward(x, dt, A, B, C, D):
    """Numba kernel. x, dt: (Bt, L, Dm), A: (Dm, N), B, C: (Bt, L, N), D: (Dm,) -> (y: (Bt, L, Dm), cache).

    All arrays are cast to their common float dtype (float32 or float64). The cache holds only the inputs."""
    dtype = _check(x, dt, A, B, C, D)
    args = tuple(np.ascontiguousarray(v, dtype=dtype) for v in (x, dt, A, B, C, D))
    y = np.empty(x.shape, dtype=dtype)
    _forward_kernel(*args, y)
    return y, args


def selective_scan_backward(dy, cache):
    """Numba kernel. dy: (Bt, L, Dm) -> (dx, ddt, dA, dB, dC, dD), shaped like the forward's arguments."""
    x, dt, A, B, C, D = cache
    if dy.shape != x.shape:
        raise ValueError(f"selective scan backward: dy must be {x.shape}, got {dy.shape}")
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    Bt, L, Dm = x.shape
    N = A.shape[1]
    nblk = (Dm + LANES - 1) // LANES
    dx, ddt = np.empty_like(x), np.empty_like(x)
    dA_part = np.empty((Bt, Dm, N), x.dtype)
    dB_part = np.empty((Bt, nblk, L, N), x.dtype)
    dC_part = np.empty((Bt, nblk, L, N), x.dtype)
    dD_part = np.empty((Bt, Dm), x.dtype)
    _backward_kernel(x, dt, A, B, C, D, dy, dx, ddt, dA_part, dB_part, dC_part, dD_part)
    return dx, ddt, dA_part.sum(0), dB_part.sum(1), dC_part.sum(1), dD_part.sum(0)
