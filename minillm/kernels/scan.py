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
`fast_exp` (kernels/fastexp.py), as accurate as libm (<= 2 ulp) but vectorisable without fastmath. dB and
dC are written per (b, block) and dA, dD per (b, d), then summed over blocks / batch rows by NumPy in a
fixed order: results do not depend on the number of threads.
"""

import numba
import numpy as np
from numba import prange

from minillm.kernels.fastexp import fast_exp

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


def forward_reference(x, dt, A, B, C, D):
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


def backward_reference(dy, cache):
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


# --- Numba kernels --------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, parallel=True, nogil=True)
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
                    hv = fast_exp(dtv[j] * At[n, j]) * h[n, j] + u[j] * bn
                    h[n, j] = hv
                    acc[j] += cn * hv
            for j in range(w):
                y[b, t, d0 + j] = acc[j]


@numba.njit(cache=True, parallel=True, nogil=True)
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
                    hs[t + 1, n, j] = fast_exp(dtv[j] * At[n, j]) * hs[t, n, j] + dtv[j] * xv[j] * bn
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
                    a = fast_exp(dtv[j] * At[n, j])
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


def forward(x, dt, A, B, C, D):
    """Numba kernel. x, dt: (Bt, L, Dm), A: (Dm, N), B, C: (Bt, L, N), D: (Dm,) -> (y: (Bt, L, Dm), cache).

    All arrays are cast to their common float dtype (float32 or float64). The cache holds only the inputs."""
    dtype = _check(x, dt, A, B, C, D)
    args = tuple(np.ascontiguousarray(v, dtype=dtype) for v in (x, dt, A, B, C, D))
    y = np.empty(x.shape, dtype=dtype)
    _forward_kernel(*args, y)
    return y, args


def backward(dy, cache):
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
