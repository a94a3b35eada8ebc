"""Selective scan forward and backward as numba.cuda kernels: one thread per (batch row, channel, state).

Same math and contract as kernels/scan.py (read its docstring first; its NumPy reference is the
specification): forward(x, dt, A, B, C, D) -> (y, cache) and
backward(dy, cache) -> (dx, ddt, dA, dB, dC, dD).

Layout: NP = the power of two >= N; a block of DB * NP threads (DB = min(THREADS // NP, DBMAX) channels)
serves DB consecutive channels of one batch row, grid (channel blocks, batch). Thread tid owns channel
d0 + tid // NP and state n = tid % NP, and keeps its one scalar h[b, d, n] in a register; threads with
n >= N or d >= Dm compute on zeros (A = B = C = x = 0: their h stays 0) and take part in every barrier.
Time is walked sequentially in chunks of CHUNK steps (16 in float32, 8 in float64: static shared memory is
48 KB). Per chunk the block first stages dt, x (dy), B, C of the chunk in shared memory with coalesced
loads (zero-padded past L, so every chunk runs exactly CHUNK steps: a padded step has exp(0) = 1 and a zero
input, so it leaves h and the adjoint unchanged), then each thread runs the recurrence over the chunk
writing its terms to shared buffers, and after a barrier the block reduces them: over n (y; dx, ddt) and
over the block's channels (dB, dC), each sum in increasing index order.

Forward: y = D x + sum_n C h. It also stores the state at the start of every chunk, ckpt: (Bt, L / CHUNK,
Dm, N) (N / CHUNK of the size of x), in the cache, so the backward never re-runs the recurrence from t = 0.
Backward: chunks from last to first; each thread reloads its checkpoint, recomputes the chunk's CHUNK states
(a local array that the fully unrolled chunk loops keep in registers) and runs the reverse-time scan over
them (kernels/scan.py), carrying the adjoint g in a register. dA is summed per thread over t, dD per
channel; dB, dC per (batch, channel block): (Bt, Dm / DB, L, N) partials, each about N NP / THREADS times
the size of x; a second kernel sums the partials over blocks / batch rows in increasing order.
The sums over n go through shared memory, not warp shuffles: the CUDA simulator has no shuffles.

No atomics, fixed reduction orders: results are bit-identical from run to run (they may differ from the CPU
kernels in the last bits: the GPU compiler fuses multiply-adds and its exp differs).

Arrays may be host NumPy arrays (copied to the GPU, results copied back), CuPy arrays or numba device
arrays (results are then of the same kind and stay on the GPU).
"""

import functools
import math

import numpy as np
from numba import cuda, float32, float64

from minillm.kernels.cuda_arrays import array_kind as _kind, empty, float_dtype, on_device, to_kind

THREADS = 128  # threads per block (32 * NP when N <= 2: a block holds at most DBMAX channels)
MAX_N = 32     # largest state size (so a block of THREADS holds at least 4 channels)
DBMAX = 32     # most channels per block
PW = THREADS + DBMAX + 1   # row of the n-reduced buffers: thread (j, n) writes at j * (NP + 1) + n (no
#                            bank conflicts when the block reads them back along j)
CHUNKS = {"float32": 16, "float64": 8}   # time steps per chunk (shared arrays need constant shapes)


@functools.lru_cache(maxsize=None)
def _kernels(dtype_name):
    """Compile the kernels for float32 or float64 (local and shared arrays need the type up front)."""
    nbt = {"float32": float32, "float64": float64}[dtype_name]
    CHUNK = CHUNKS[dtype_name]
    HS = CHUNK + 1   # (a shape must be a constant, not an expression)

    @cuda.jit(device=True)
    def stage(b, t0, d0, w, N, NP, tid, NT, src, dst, src_n, dst_n, zero):
        """dst[k][:, j] = src[k][b, t0 + k, d0 + j] (j < w), dst_n[k][:, n] = src_n[k][b, t0 + k, n] (n < N),
        zeros elsewhere (past L, past the last channel, n >= N)."""
        L = src[0].shape[1]
        DB = NT // NP
        for i in range(tid, CHUNK * DB, NT):
            k = i // DB
            j = i - k * DB
            ok = t0 + k < L and j < w
            for m in range(len(src)):
                dst[m][k, j] = src[m][b, t0 + k, d0 + j] if ok else zero
        for i in range(tid, CHUNK * NP, NT):
            k = i // NP
            n = i - k * NP
            ok = t0 + k < L and n < N
            for m in range(len(src_n)):
                dst_n[m][k, n] = src_n[m][b, t0 + k, n] if ok else zero

    @cuda.jit
    def forward(x, dt, A, B, C, D, NP, y, ckpt, zero):
        Bt, L, Dm = x.shape
        N = A.shape[1]
        tid = cuda.threadIdx.x
        NT = cuda.blockDim.x
        DB = NT // NP
        j = tid // NP
        n = tid - j * NP
        b = cuda.blockIdx.y
        d0 = cuda.blockIdx.x * DB
        d = d0 + j
        w = Dm - d0 if Dm - d0 < DB else DB   # channels of this block that exist
        valid = d < Dm and n < N
        Av = A[d, n] if valid else zero
        pi = j * (NP + 1) + n
        s_dt = cuda.shared.array((CHUNK, DBMAX), nbt)
        s_x = cuda.shared.array((CHUNK, DBMAX), nbt)
        s_B = cuda.shared.array((CHUNK, MAX_N), nbt)
        s_C = cuda.shared.array((CHUNK, MAX_N), nbt)
        p_y = cuda.shared.array((CHUNK, PW), nbt)
        h = zero
        for c in range((L + CHUNK - 1) // CHUNK):
            t0 = c * CHUNK
            if valid:
                ckpt[b, c, d, n] = h
            stage(b, t0, d0, w, N, NP, tid, NT, (dt, x), (s_dt, s_x), (B, C), (s_B, s_C), zero)
            cuda.syncthreads()
            for k in range(CHUNK):
                dtv = s_dt[k, j]
                h = math.exp(dtv * Av) * h + dtv * s_x[k, j] * s_B[k, n]
                p_y[k, pi] = s_C[k, n] * h
            cuda.syncthreads()
            for o in range(tid, CHUNK * DB, NT):   # output (k, jj); a thread keeps jj = tid % DB
                k = o // DB
                jj = o - k * DB
                if t0 + k < L and jj < w:
                    s = zero
                    for m in range(N):
                        s += p_y[k, jj * (NP + 1) + m]
                    y[b, t0 + k, d0 + jj] = D[d0 + jj] * s_x[k, jj] + s
            cuda.syncthreads()

    @cuda.jit
    def backward(x, dt, A, B, C, D, dy, NP, ckpt, dx, ddt, dA_part, dB_part, dC_part, dD_part, zero):
        Bt, L, Dm = x.shape
        N = A.shape[1]
        tid = cuda.threadIdx.x
        NT = cuda.blockDim.x
        DB = NT // NP
        j = tid // NP
        n = tid - j * NP
        blk = cuda.blockIdx.x
        b = cuda.blockIdx.y
        d0 = blk * DB
        d = d0 + j
        w = Dm - d0 if Dm - d0 < DB else DB   # channels of this block that exist
        valid = d < Dm and n < N
        Av = A[d, n] if valid else zero
        pi = j * (NP + 1) + n
        s_dt = cuda.shared.array((CHUNK, DBMAX), nbt)
        s_x = cuda.shared.array((CHUNK, DBMAX), nbt)
        s_dy = cuda.shared.array((CHUNK, DBMAX), nbt)
        s_B = cuda.shared.array((CHUNK, MAX_N), nbt)
        s_C = cuda.shared.array((CHUNK, MAX_N), nbt)
        p_gB = cuda.shared.array((CHUNK, PW), nbt)       # g B      (sum over n -> dx, ddt)
        p_qA = cuda.shared.array((CHUNK, PW), nbt)       # q A      (sum over n -> ddt)
        p_dB = cuda.shared.array((CHUNK, THREADS), nbt)  # g dt x   (sum over channels -> dB)
        p_dC = cuda.shared.array((CHUNK, THREADS), nbt)  # dy h     (sum over channels -> dC)
        hs = cuda.local.array(HS, nbt)            # hs[k]: state before step t0 + k
        g = zero
        dA_acc = zero
        dD_acc = zero
        for c in range((L + CHUNK - 1) // CHUNK - 1, -1, -1):
            t0 = c * CHUNK
            stage(b, t0, d0, w, N, NP, tid, NT, (dt, x, dy), (s_dt, s_x, s_dy), (B, C), (s_B, s_C), zero)
            cuda.syncthreads()
            hs[0] = ckpt[b, c, d, n] if valid else zero
            for k in range(CHUNK):
                dtv = s_dt[k, j]
                hs[k + 1] = math.exp(dtv * Av) * hs[k] + dtv * s_x[k, j] * s_B[k, n]
            for k in range(CHUNK - 1, -1, -1):
                dtv = s_dt[k, j]
                xv = s_x[k, j]
                dyv = s_dy[k, j]
                gv = g + dyv * s_C[k, n]                 # dL/dh_t
                a = math.exp(dtv * Av)
                q = gv * hs[k] * a                       # dL/d(dt_t A)
                p_gB[k, pi] = gv * s_B[k, n]
                p_qA[k, pi] = q * Av
                p_dB[k, tid] = gv * (dtv * xv)
                p_dC[k, tid] = dyv * hs[k + 1]
                dA_acc += q * dtv
                dD_acc += dyv * xv
                g = a * gv
            cuda.syncthreads()
            for o in range(tid, CHUNK * DB, NT):   # (k, jj) -> dx, ddt
                k = o // DB
                jj = o - k * DB
                if t0 + k < L and jj < w:
                    sb = zero
                    sq = zero
                    for m in range(N):
                        sb += p_gB[k, jj * (NP + 1) + m]
                        sq += p_qA[k, jj * (NP + 1) + m]
                    dx[b, t0 + k, d0 + jj] = D[d0 + jj] * s_dy[k, jj] + s_dt[k, jj] * sb
                    ddt[b, t0 + k, d0 + jj] = s_x[k, jj] * sb + sq
            for o in range(tid, CHUNK * N, NT):    # (k, m) -> partial dB, dC of this channel block
                k = o // N
                m = o - k * N
                if t0 + k < L:
                    sb = zero
                    sc = zero
                    for jj in range(w):
                        sb += p_dB[k, jj * NP + m]
                        sc += p_dC[k, jj * NP + m]
                    dB_part[b, blk, t0 + k, m] = sb
                    dC_part[b, blk, t0 + k, m] = sc
            cuda.syncthreads()
        if valid:
            dA_part[b, d, n] = dA_acc
        if d < Dm and n == 0:
            dD_part[b, d] = dD_acc

    return forward, backward


@cuda.jit
def _sum_middle_kernel(part, out, zero):
    """out[i, j] = sum over k of part[i, k, j], k in increasing order."""
    j = cuda.grid(1)
    i = cuda.blockIdx.y
    if j >= part.shape[2]:
        return
    acc = zero
    for k in range(part.shape[1]):
        acc += part[i, k, j]
    out[i, j] = acc


# --- host side ------------------------------------------------------------------------------------------


def _on_device(x, kind, dtype):
    return on_device(x, kind, dtype, check="selective scan (cuda)")


def _sum_middle(part, kind, dtype):
    """part: (I, K, J) -> (I, J), summed over K in order (zeros when K = 0)."""
    I, K, J = part.shape
    out = empty(kind, (I, J), dtype)
    if I * J:
        _sum_middle_kernel[((J + THREADS - 1) // THREADS, I), THREADS](part, out, dtype.type(0))
    return out


def _layout(Dm, N):
    """(NP, channels per block, threads per block, channel blocks)."""
    NP = 1 << max(N - 1, 0).bit_length()
    DB = min(THREADS // NP, DBMAX)
    return NP, DB, DB * NP, (Dm + DB - 1) // DB


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
    return float_dtype(x, "selective scan")


def forward(x, dt, A, B, C, D):
    """x, dt: (Bt, L, Dm), A: (Dm, N), B, C: (Bt, L, N), D: (Dm,) -> (y: (Bt, L, Dm), cache).
    Every array is cast to x's dtype; results are of the kind of x (host, CuPy or numba device).
    The cache holds the inputs on the GPU and the chunk-start states, (Bt, ceil(L / CHUNK), Dm, N)."""
    dtype = _check(x, dt, A, B, C, D)
    kind = _kind(x)
    args = tuple(_on_device(v, kind, dtype) for v in (x, dt, A, B, C, D))
    Bt, L, Dm = x.shape
    N = A.shape[1]
    NP, _, NT, nblk = _layout(Dm, N)
    chunk = CHUNKS[dtype.name]
    y = empty(kind, (Bt, L, Dm), dtype)
    ckpt = empty(kind, (Bt, max(1, (L + chunk - 1) // chunk), Dm, N), dtype)
    if y.size:
        forward, _ = _kernels(dtype.name)
        forward[(nblk, Bt), NT](*args, NP, y, ckpt, dtype.type(0))
    return to_kind(y, kind), (args, ckpt, kind)


def backward(dy, cache):
    """dy: (Bt, L, Dm) -> (dx, ddt, dA, dB, dC, dD), shaped like the forward's arguments."""
    (x, dt, A, B, C, D), ckpt, kind = cache
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"selective scan backward: dy must be {tuple(x.shape)}, got {tuple(dy.shape)}")
    dtype = np.dtype(x.dtype)
    dy = _on_device(dy, kind, dtype)
    Bt, L, Dm = x.shape
    N = A.shape[1]
    NP, _, NT, nblk = _layout(Dm, N)
    dx, ddt = empty(kind, (Bt, L, Dm), dtype), empty(kind, (Bt, L, Dm), dtype)
    dA_part, dD_part = empty(kind, (Bt, Dm, N), dtype), empty(kind, (Bt, Dm), dtype)
    dB_part, dC_part = empty(kind, (Bt, nblk, L, N), dtype), empty(kind, (Bt, nblk, L, N), dtype)
    if Bt * Dm:
        _, backward = _kernels(dtype.name)
        backward[(nblk, Bt), NT](x, dt, A, B, C, D, dy, NP, ckpt, dx, ddt, dA_part, dB_part, dC_part,
                                 dD_part, dtype.type(0))
    dA = _sum_middle(dA_part.reshape(1, Bt, Dm * N), kind, dtype).reshape(Dm, N)
    dB = _sum_middle(dB_part.reshape(Bt, nblk, L * N), kind, dtype).reshape(Bt, L, N)
    dC = _sum_middle(dC_part.reshape(Bt, nblk, L * N), kind, dtype).reshape(Bt, L, N)
    dD = _sum_middle(dD_part.reshape(1, Bt, Dm), kind, dtype).reshape(Dm)
    return tuple(to_kind(v, kind) for v in (dx, ddt, dA, dB, dC, dD))
