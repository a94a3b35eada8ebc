"""Ternary packed product y = x_q W^T on the GPU (numba.cuda), same layout and result as kernels/ternary.py.

Packed layout (see kernels/ternary.py): packed (R, I) uint8 with R = ceil(O / 4); byte (r, i) holds
column i of rows r, R + r, 2R + r, 3R + r as 2-bit codes c = w + 1 (row r in the low bits). With int8
activations x_q,

    y[m, s R + r] = sum_i c_s(packed[r, i]) x_q[m, i] - sum_i x_q[m, i]

One block of THREADS threads computes the four outputs of one packed row r for one token m
(grid = (R, M)): thread t sums inputs t, t + THREADS, ... (coalesced loads of the packed row and of
x), then the block adds its five partial sums (four rows and sum x) by a shared-memory tree. When
I % 4 == 0 the loads are 32-bit words (4 bytes of codes and 4 int8 activations each, host arrays
viewed as uint32 / int32, little-endian); otherwise single bytes. All
sums are int32 integers: exact, and the same whatever the order, so the result equals the NumPy
reference bit for bit (|sum| <= 256 I < 2^31 for I < 8M).

    matmul(xq, packed, out_features)   xq: (M, I) int8 -> (M, O) int32
    matvec(xq, packed, out_features)   xq: (I,) int8 -> (O,) int32

Host (NumPy) arguments are copied to the device and the result copied back; device arrays stay there.
Without a GPU the kernels run in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1; tiny shapes only).
This module imports nothing else of minillm.
"""

import numpy as np
from numba import cuda, int32

THREADS = 128  # threads per block (a power of two: the tree reduction halves it)
TOKENS = 8     # tokens per block in the 32-bit-word kernel


@cuda.jit(device=True, inline=True)
def _finish(part, out, a0, a1, a2, a3, sx, r, m, R, n_out):
    t = cuda.threadIdx.x
    part[0, t] = a0
    part[1, t] = a1
    part[2, t] = a2
    part[3, t] = a3
    part[4, t] = sx
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if t < half:
            for k in range(5):
                part[k, t] += part[k, t + half]
        cuda.syncthreads()
        half //= 2
    if t < 4:  # thread s writes output row s R + r (padding rows are dropped)
        o = t * R + r
        if o < n_out:
            out[m, o] = part[t, 0] - part[4, 0]


@cuda.jit
def _packed_rows_kernel(packed, xq, out, n_out):
    """Byte loads: packed (R, I) uint8, xq (M, I) int8."""
    r = cuda.blockIdx.x
    m = cuda.blockIdx.y
    part = cuda.shared.array((5, THREADS), dtype=int32)
    a0 = int32(0)
    a1 = int32(0)
    a2 = int32(0)
    a3 = int32(0)
    sx = int32(0)
    for i in range(cuda.threadIdx.x, packed.shape[1], THREADS):
        b = int32(packed[r, i])
        x = int32(xq[m, i])
        a0 += (b & 3) * x
        a1 += ((b >> 2) & 3) * x
        a2 += ((b >> 4) & 3) * x
        a3 += ((b >> 6) & 3) * x
        sx += x
    _finish(part, out, a0, a1, a2, a3, sx, r, m, packed.shape[0], n_out)


@cuda.jit
def _packed_words_kernel(packed, xq, out, n_out):
    """32-bit loads: packed (R, I/4) uint32 and xq (M, I/4) int32, four inputs per word (byte k of a
    word is input 4j + k). A block takes TOKENS tokens (grid = (R, ceil(M / TOKENS))), so each word
    of the packed row is read once for all of them."""
    r = cuda.blockIdx.x
    m0 = cuda.blockIdx.y * TOKENS
    nm = xq.shape[0] - m0
    if nm > TOKENS:   # (no 2-argument min in kernels: numba#10753)
        nm = TOKENS
    part = cuda.shared.array((5, THREADS), dtype=int32)
    acc = cuda.local.array((TOKENS, 5), dtype=int32)
    for mm in range(TOKENS):
        for k in range(5):
            acc[mm, k] = 0
    for j in range(cuda.threadIdx.x, packed.shape[1], THREADS):
        p = int32(packed[r, j])
        for mm in range(nm):
            w = int32(xq[m0 + mm, j])
            for k in range(4):
                b = (p >> (8 * k)) & 255
                x = int32(w << (24 - 8 * k)) >> 24  # byte k to the top, arithmetic shift back
                acc[mm, 0] += (b & 3) * x
                acc[mm, 1] += ((b >> 2) & 3) * x
                acc[mm, 2] += ((b >> 4) & 3) * x
                acc[mm, 3] += ((b >> 6) & 3) * x
                acc[mm, 4] += x
    for mm in range(nm):
        _finish(part, out, acc[mm, 0], acc[mm, 1], acc[mm, 2], acc[mm, 3], acc[mm, 4], r, m0 + mm,
                packed.shape[0], n_out)
        cuda.syncthreads()  # part is reused by the next token


def _check(xq, packed, out_features):
    if packed.dtype != np.uint8 or len(packed.shape) != 2:
        raise ValueError(f"packed ternary weights must be a 2-D uint8 array, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    O = int(out_features)
    if packed.shape[0] != (O + 3) // 4:
        raise ValueError(f"packed ternary weights for {O} outputs must have {(O + 3) // 4} rows, "
                         f"got {packed.shape[0]}")
    if xq.dtype != np.int8 or len(xq.shape) != 2 or xq.shape[1] != packed.shape[1]:
        raise ValueError(f"ternary product: activations must be int8 (M, {packed.shape[1]}), got "
                         f"{xq.dtype} {tuple(xq.shape)}")


def matmul(xq, packed, out_features, out=None):
    """xq: (M, I) int8, packed: (ceil(O/4), I) uint8 -> (M, O) int32 = xq W^T, exactly.

    Host arrays are copied in and the result is returned on the host; with device arrays the result
    stays on the device (in `out`, a device (M, O) int32 array, when given)."""
    _check(xq, packed, out_features)
    on_host = isinstance(xq, np.ndarray)
    M, I = xq.shape
    O = int(out_features)
    if isinstance(packed, np.ndarray):
        packed = np.ascontiguousarray(packed)
    if on_host:
        xq = np.ascontiguousarray(xq)
    try:  # 32-bit words need I % 4 == 0 and C-contiguous rows (host arrays always are)
        if I % 4 or not I:
            raise ValueError("bytes")
        p_in, x_in, kernel = packed.view(np.uint32), xq.view(np.int32), _packed_words_kernel
    except (ValueError, AttributeError, TypeError):
        p_in, x_in, kernel = packed, xq, _packed_rows_kernel
    p_in = cuda.to_device(p_in) if isinstance(p_in, np.ndarray) else p_in
    x_in = cuda.to_device(x_in) if isinstance(x_in, np.ndarray) else x_in
    if out is None:
        out = cuda.device_array((M, O), dtype=np.int32)
    if M and O:
        blocks_m = M if kernel is _packed_rows_kernel else (M + TOKENS - 1) // TOKENS
        kernel[(packed.shape[0], blocks_m), THREADS](p_in, x_in, out, O)
    return out.copy_to_host() if on_host else out


def matvec(xq, packed, out_features):
    """xq: (I,) int8, packed: (ceil(O/4), I) uint8 -> (O,) int32 = W xq, exactly."""
    if len(xq.shape) != 1:
        raise ValueError(f"ternary matvec: activations must be 1-D, got shape {tuple(xq.shape)}")
    y = matmul(xq.reshape(1, xq.shape[0]), packed, out_features)
    return y.reshape(y.shape[1])
