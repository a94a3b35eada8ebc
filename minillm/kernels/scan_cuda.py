"""Selective scan forward and backward as numba.cuda kernels: one thread per (batch row, channel).

Same math and contract as kernels/scan.py (read its docstring first; its NumPy reference is the
specification): selective_scan_forward(x, dt, A, B, C, D) -> (y, cache) and
selective_scan_backward(dy, cache) -> (dx, ddt, dA, dB, dC, dD).

Layout: a block holds THREADS consecutive channels of one batch row (grid (channel blocks, batch)), so the
loads of x[b, t, d0:d0+THREADS] are coalesced and B[b, t, :], C[b, t, :] are the same for the whole block.
Each thread keeps its state h (N <= MAX_N values) in local memory and walks the time axis.

Backward: pass 1 re-runs the recurrence and stores the state at the start of every CHUNK steps; pass 2
walks the chunks from last to first, recomputes the CHUNK states of a chunk into local memory and runs the
reverse-time scan over them (memory: (B, L / CHUNK, D, N) checkpoints instead of every state).
dB and dC sum over channels: per time step the block reduces its threads' terms in shared memory by a
fixed binary tree, writes one partial per (batch, channel block), and a second kernel sums the partials in
increasing order; dA and dD are written per (batch, channel) and summed over the batch the same way. No
atomics: results are the same on every run (they may differ from the CPU kernels in the last bits, since
the GPU compiler fuses multiply-adds and its exp differs).

Arrays may be host NumPy arrays (copied to the GPU, results copied back), CuPy arrays or numba device
arrays (results are then of the same kind and stay on the GPU).
"""

import functools
import math

import numpy as np
from numba import cuda, float32, float64

from minillm.kernels.cuda_arrays import array_kind as _kind, empty, on_device, to_kind

THREADS = 64   # channels per block (a power of two: the tree reduction halves it)
MAX_N = 32     # largest state size (fixed-size local arrays; shared: 2 MAX_N x THREADS floats <= 32 KB)
CHUNK = 16     # time steps recomputed at once in the backward
_RED_ROWS = 2 * MAX_N              # (array shapes in kernels must be compile-time constants)
_HB_SIZE = (CHUNK + 1) * MAX_N


@functools.lru_cache(maxsize=None)
def _kernels(dtype_name):
    """Compile the kernels for float32 or float64 (local and shared arrays need the type up front)."""
    nbt = {"float32": float32, "float64": float64}[dtype_name]

    @cuda.jit
    def forward(x, dt, A, B, C, D, y, zero):
        Bt, L, Dm = x.shape
        N = A.shape[1]
        d = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        b = cuda.blockIdx.y
        if d >= Dm:
            return
        h = cuda.local.array(MAX_N, nbt)
        for n in range(N):
            h[n] = zero
        for t in range(L):
            dtv = dt[b, t, d]
            xv = x[b, t, d]
            u = dtv * xv
            acc = D[d] * xv
            for n in range(N):
                hv = math.exp(dtv * A[d, n]) * h[n] + u * B[b, t, n]
                h[n] = hv
                acc += C[b, t, n] * hv
            y[b, t, d] = acc

    @cuda.jit
    def backward(x, dt, A, B, C, D, dy, ckpt, dx, ddt, dA_part, dB_part, dC_part, dD_part, zero):
        Bt, L, Dm = x.shape
        N = A.shape[1]
        tid = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        b = cuda.blockIdx.y
        d = blk * THREADS + tid
        valid = d < Dm
        dd = d if valid else 0      # threads past the last channel read channel 0 but contribute zeros
        red = cuda.shared.array((_RED_ROWS, THREADS), nbt)
        h = cuda.local.array(MAX_N, nbt)
        g = cuda.local.array(MAX_N, nbt)
        dA_acc = cuda.local.array(MAX_N, nbt)
        hb = cuda.local.array(_HB_SIZE, nbt)   # hb[k * MAX_N + n]: state before step t0 + k
        # pass 1: checkpoints, ckpt[b, c, d] = state before step c * CHUNK
        for n in range(N):
            h[n] = zero
        for t in range(L):
            if t % CHUNK == 0 and valid:
                for n in range(N):
                    ckpt[b, t // CHUNK, d, n] = h[n]
            u = dt[b, t, dd] * x[b, t, dd]
            for n in range(N):
                h[n] = math.exp(dt[b, t, dd] * A[dd, n]) * h[n] + u * B[b, t, n]
        # pass 2: chunks from last to first
        for n in range(N):
            g[n] = zero
            dA_acc[n] = zero
        dD_acc = zero
        for c in range((L + CHUNK - 1) // CHUNK - 1, -1, -1):
            t0 = c * CHUNK
            t1 = min(t0 + CHUNK, L)
            for n in range(N):
                hb[n] = ckpt[b, c, d, n] if valid else zero
            for t in range(t0, t1):
                k = t - t0
                dtv = dt[b, t, dd] if valid else zero
                u = dtv * x[b, t, dd]
                for n in range(N):
                    hb[(k + 1) * MAX_N + n] = math.exp(dtv * A[dd, n]) * hb[k * MAX_N + n] + u * B[b, t, n]
            for t in range(t1 - 1, t0 - 1, -1):
                k = t - t0
                dtv = dt[b, t, dd] if valid else zero
                xv = x[b, t, dd] if valid else zero
                dyv = dy[b, t, dd] if valid else zero
                s_b = zero
                s_q = zero
                for n in range(N):
                    gv = g[n] + dyv * C[b, t, n]             # dL/dh_t
                    a = math.exp(dtv * A[dd, n])
                    q = gv * hb[k * MAX_N + n] * a            # dL/d(dt_t A)
                    s_b += gv * B[b, t, n]
                    s_q += q * A[dd, n]
                    dA_acc[n] += q * dtv
                    red[n, tid] = gv * (dtv * xv)
                    red[MAX_N + n, tid] = dyv * hb[(k + 1) * MAX_N + n]
                    g[n] = a * gv
                if valid:
                    dx[b, t, d] = D[d] * dyv + dtv * s_b
                    ddt[b, t, d] = xv * s_b + s_q
                dD_acc += dyv * xv
                cuda.syncthreads()
                stride = THREADS // 2
                while stride > 0:
                    if tid < stride:
                        for n in range(N):
                            red[n, tid] += red[n, tid + stride]
                            red[MAX_N + n, tid] += red[MAX_N + n, tid + stride]
                    cuda.syncthreads()
                    stride //= 2
                if tid < N:
                    dB_part[b, blk, t, tid] = red[tid, 0]
                    dC_part[b, blk, t, tid] = red[MAX_N + tid, 0]
                cuda.syncthreads()
        if valid:
            for n in range(N):
                dA_part[b, d, n] = dA_acc[n]
            dD_part[b, d] = dD_acc

    return forward, backward


@cuda.jit
def _sum_middle_kernel(part, out):
    """out[i, j] = sum over k of part[i, k, j], k in increasing order."""
    j = cuda.grid(1)
    i = cuda.blockIdx.y
    if j >= part.shape[2]:
        return
    acc = part[i, 0, j]
    for k in range(1, part.shape[1]):
        acc += part[i, k, j]
    out[i, j] = acc


# --- host side ------------------------------------------------------------------------------------------


def _on_device(x, kind, dtype):
    return on_device(x, kind, dtype, check="selective scan (cuda)")


def _sum_middle(part, kind, dtype):
    """part: (I, K, J) -> (I, J), summed over K in order."""
    I, K, J = part.shape
    out = empty(kind, (I, J), dtype)
    _sum_middle_kernel[((J + THREADS - 1) // THREADS, I), THREADS](part, out)
    return out


def _check(x, dt, A, B, C, D):
    if len(x.shape) != 3 or tuple(dt.shape) != tuple(x.shape):
        raise ValueError(f"selective scan: x and dt must both be (B, L, D), got {x.shape} and {dt.shape}")
    Bt, L, Dm = x.shape
    if len(A.shape) != 2 or A.shape[0] != Dm:
        raise ValueError(f"selective scan: A must be ({Dm}, N), got {A.shape}")
    N = A.shape[1]
    if tuple(B.shape) != (Bt, L, N) or tuple(C.shape) != (Bt, L, N):
        raise ValueError(f"selective scan: B and C must be ({Bt}, {L}, {N}), got {B.shape} and {C.shape}")
    if tuple(D.shape) != (Dm,):
        raise ValueError(f"selective scan: D must be ({Dm},), got {D.shape}")
    if N > MAX_N:
        raise ValueError(f"selective scan (cuda): d_state is at most {MAX_N}, got {N}")
    dtype = np.dtype(x.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"selective scan: needs float32 or float64 arrays, got {dtype}")
    return dtype


def selective_scan_forward(x, dt, A, B, C, D):
    """x, dt: (Bt, L, Dm), A: (Dm, N), B, C: (Bt, L, N), D: (Dm,) -> (y: (Bt, L, Dm), cache).
    Every array is cast to x's dtype; results are of the kind of x (host, CuPy or numba device)."""
    dtype = _check(x, dt, A, B, C, D)
    kind = _kind(x)
    args = tuple(_on_device(v, kind, dtype) for v in (x, dt, A, B, C, D))
    Bt, L, Dm = x.shape
    y = empty(kind, (Bt, L, Dm), dtype)
    if y.size:
        forward, _ = _kernels(dtype.name)
        forward[((Dm + THREADS - 1) // THREADS, Bt), THREADS](*args, y, dtype.type(0))
    return to_kind(y, kind), (args, kind)


def selective_scan_backward(dy, cache):
    """dy: (Bt, L, Dm) -> (dx, ddt, dA, dB, dC, dD), shaped like the forward's arguments."""
    (x, dt, A, B, C, D), kind = cache
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"selective scan backward: dy must be {tuple(x.shape)}, got {tuple(dy.shape)}")
    dtype = np.dtype(x.dtype)
    dy = _on_device(dy, kind, dtype)
    Bt, L, Dm = x.shape
    N = A.shape[1]
    nblk = (Dm + THREADS - 1) // THREADS
    ckpt = empty(kind, (Bt, max(1, (L + CHUNK - 1) // CHUNK), Dm, N), dtype)
    dx, ddt = empty(kind, (Bt, L, Dm), dtype), empty(kind, (Bt, L, Dm), dtype)
    dA_part, dD_part = empty(kind, (Bt, Dm, N), dtype), empty(kind, (Bt, Dm), dtype)
    dB_part, dC_part = empty(kind, (Bt, nblk, L, N), dtype), empty(kind, (Bt, nblk, L, N), dtype)
    _, backward = _kernels(dtype.name)
    backward[(nblk, Bt), THREADS](x, dt, A, B, C, D, dy, ckpt, dx, ddt, dA_part, dB_part, dC_part, dD_part,
                                  dtype.type(0))
    dA = _sum_middle(dA_part.reshape(1, Bt, Dm * N), kind, dtype).reshape(Dm, N)
    dB = _sum_middle(dB_part.reshape(Bt, nblk, L * N), kind, dtype).reshape(Bt, L, N)
    dC = _sum_middle(dC_part.reshape(Bt, nblk, L * N), kind, dtype).reshape(Bt, L, N)
    dD = _sum_middle(dD_part.reshape(1, Bt, Dm), kind, dtype).reshape(Dm)
    return tuple(to_kind(v, kind) for v in (dx, ddt, dA, dB, dC, dD))
