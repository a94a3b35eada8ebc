"""WKV, the RWKV-4 time-mixing recurrence: NumPy reference and Numba CPU kernels, forward and backward.

For each batch row and channel, with decay w < 0 (w = -exp(time_decay)) and bonus u (time_first),

    y_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
        / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})                  (RWKV-4 paper, eq. 14)

Both sums are carried as a recurrent state (a, b, p) meaning num = a e^p, den = b e^p: the running
maximum p keeps every exponent <= 0 (the "max-tracking" form of HF `rwkv_linear_attention_cpu`; the
state starts at a = b = 0, p = -1e38). Since one of the two exponentials at each step is e^0 = 1, a
step costs two exp() calls. Writing D_t for the denominator above, forward also keeps, per (b, t, c),
q_t (the max at the output) and dinv_t with D_t = e^{q_t} / dinv_t for the backward, which uses
c_t = e^{u + k_t} / D_t = e^{u + k_t - q_t} dinv_t.

Backward (hand-derived, one reverse-time pass). With g_t = dL/dy_t and, for s > t,

    Ga_t = sum_{s>t} e^{(s-1-t) w} g_s / D_s          Gb_t = sum_{s>t} e^{(s-1-t) w} g_s y_s / D_s
    Ha_t = sum_{s>t} (s-1-t) e^{(s-1-t) w} g_s / D_s  Hb_t = same with g_s y_s / D_s

    dk_t = g_t c_t (v_t - y_t) + e^{k_t} (v_t Ga_t - Gb_t)
    dv_t = g_t c_t             + e^{k_t} Ga_t
    dw   = sum_t e^{k_t} (v_t Ha_t - Hb_t)        du = sum_t g_t c_t (v_t - y_t)

and going from t to t-1:  G_{t-1} = e^w G_t + (g_t or g_t y_t) / D_t,  H_{t-1} = e^w (H_t + G_t).
The G, H sums are kept scaled by e^{r_t}, r_t = max_{s>t} ((s-1-t) w - q_s) (r starts at -1e38), and
since k_t + (s-1-t) w <= q_s every factor e^{k_t + r_t} is <= 1: nothing overflows for any T.

Shapes: k, v, y: (B, T, C); w, u: (C,); state: three (B, C) arrays (num a, den b, max p).
The Numba kernels run in parallel over (batch, block of channels); the inner loop runs over the block
so k[b, t, c0:c1] is read contiguously and LLVM vectorises it (with the vectorisable exp of
kernels/fastexp.py: the Numba kernels equal the reference to a few ulps, not bitwise). dw and du are
written per (b, c) and summed over b in a fixed order: results do not depend on the thread count.
"""

import numba
import numpy as np

from minillm.kernels.fastexp import fast_exp

BIG = 1e38  # the max-tracking state starts at -BIG (as HF), so e^{p - q} = 0 on the first step
BLOCK = 32  # channels per parallel job
SMALL = 1 << 14  # forward on fewer elements runs the NumPy reference: no thread-pool start-up


def init_state(batch, channels, dtype=np.float32):
    """Empty WKV state: (num, den, max), each (batch, channels)."""
    return (np.zeros((batch, channels), dtype), np.zeros((batch, channels), dtype),
            np.full((batch, channels), -BIG, dtype))


def _check(k, v, w, u):
    if k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"wkv: k and v must both be (B, T, C), got {k.shape} and {v.shape}")
    if w.shape != (k.shape[2],) or u.shape != (k.shape[2],):
        raise ValueError(f"wkv: w and u must be ({k.shape[2]},), got {w.shape} and {u.shape}")


# --- NumPy reference (the specification) ------------------------------------------------------------


def forward_reference(k, v, w, u, state=None):
    """k, v: (B, T, C), w, u: (C,), state: (num, den, max) each (B, C) or None -> (y: (B, T, C), cache).

    The final state is cache["state_out"]."""
    _check(k, v, w, u)
    B, T, C = k.shape
    a, b, p = (x.copy() for x in state) if state is not None else init_state(B, C, k.dtype)
    y, q_all, dinv_all = (np.empty_like(k) for _ in range(3))
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        # output: the state plus the current token with its bonus u
        q = np.maximum(p, u + kt)
        e1, e2 = np.exp(p - q), np.exp(u + kt - q)
        dinv = 1.0 / (e1 * b + e2)
        y[:, t] = (e1 * a + e2 * vt) * dinv
        q_all[:, t], dinv_all[:, t] = q, dinv
        # state update: decay by e^w, add the current token without the bonus
        q = np.maximum(p + w, kt)
        e1, e2 = np.exp(p + w - q), np.exp(kt - q)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
    cache = dict(k=k, v=v, w=w, u=u, y=y, q=q_all, dinv=dinv_all,
                 has_state=state is not None, state_out=(a, b, p))
    return y, cache


def backward_reference(dy, cache):
    """dy: (B, T, C) -> (dk: (B, T, C), dv: (B, T, C), dw: (C,), du: (C,))."""
    k, v, w, u, y = (cache[n] for n in "kvwuy")
    if cache["has_state"]:
        raise ValueError("wkv backward: a forward started from a given state is for inference only")
    B, T, C = k.shape
    dk, dv = np.empty_like(k), np.empty_like(v)
    dw, du = np.zeros((B, C), k.dtype), np.zeros((B, C), k.dtype)
    ga, gb, ha, hb = (np.zeros((B, C), k.dtype) for _ in range(4))
    r = np.full((B, C), -BIG, k.dtype)
    for t in range(T - 1, -1, -1):
        kt, vt, yt, gt = k[:, t], v[:, t], y[:, t], dy[:, t]
        direct = gt * np.exp(u + kt - cache["q"][:, t]) * cache["dinv"][:, t]  # g_t e^{u+k_t} / D_t
        f = np.exp(kt + r)  # e^{k_t}, scaled by the G/H scale
        dk[:, t] = direct * (vt - yt) + f * (vt * ga - gb)
        dv[:, t] = direct + f * ga
        dw += f * (vt * ha - hb)
        du += direct * (vt - yt)
        # G, H for the sums over s > t-1: decay the old ones by e^w, add the s = t term g_t / D_t
        qt = -cache["q"][:, t]
        r_new = np.maximum(r + w, qt)
        e_old, e_new = np.exp(r + w - r_new), np.exp(qt - r_new)
        gd = gt * cache["dinv"][:, t] * e_new
        ha, hb = e_old * (ha + ga), e_old * (hb + gb)
        ga, gb = e_old * ga + gd, e_old * gb + gd * yt
        r = r_new
    return dk, dv, dw.sum(axis=0), du.sum(axis=0)


# --- Numba CPU kernels -------------------------------------------------------------------------------


@numba.njit(parallel=True, cache=True, nogil=True)
def _forward_kernel(k, v, w, u, a0, b0, p0, y, q_out, dinv_out, a1, b1, p1, one):
    # `one` is 1 in k's dtype: a float literal would promote float32 arithmetic to float64.
    # The body stays inside the prange loop: Numba then marks the arrays noalias, which LLVM needs to
    # vectorise the inner loop (moved into a helper function, it was vectorised on one CPU only).
    B, T, C = k.shape
    nblk = (C + BLOCK - 1) // BLOCK
    for job in numba.prange(B * nblk):
        bi = job // nblk
        c0 = (job % nblk) * BLOCK
        n = min(C, c0 + BLOCK) - c0
        # state copied in and out element by element: slice copies also cost the vectorisation
        a = np.empty(n, k.dtype)
        b = np.empty(n, k.dtype)
        p = np.empty(n, k.dtype)
        for j in range(n):
            a[j] = a0[bi, c0 + j]
            b[j] = b0[bi, c0 + j]
            p[j] = p0[bi, c0 + j]
        for t in range(T):
            for j in range(n):
                c = c0 + j
                kt = k[bi, t, c]
                vt = v[bi, t, c]
                uk = u[c] + kt
                pj = p[j]
                # one of e^{p-q}, e^{uk-q} is 1 (q = max(p, uk)): one exp, and selects, not branches
                e = fast_exp(-abs(uk - pj))
                e1 = e if uk > pj else one
                e2 = one if uk > pj else e
                dinv = one / (e1 * b[j] + e2)
                y[bi, t, c] = (e1 * a[j] + e2 * vt) * dinv
                q_out[bi, t, c] = max(pj, uk)
                dinv_out[bi, t, c] = dinv
                pw = pj + w[c]
                e = fast_exp(-abs(kt - pw))
                e1 = e if kt > pw else one
                e2 = one if kt > pw else e
                p[j] = max(pw, kt)
                a[j] = e1 * a[j] + e2 * vt
                b[j] = e1 * b[j] + e2
        for j in range(n):
            a1[bi, c0 + j] = a[j]
            b1[bi, c0 + j] = b[j]
            p1[bi, c0 + j] = p[j]


@numba.njit(parallel=True, cache=True, nogil=True)
def _backward_kernel(k, v, w, u, y, q_in, dinv_in, dy, dk, dv, dw_part, du_part, one):
    B, T, C = k.shape
    nblk = (C + BLOCK - 1) // BLOCK
    for job in numba.prange(B * nblk):
        bi = job // nblk
        c0 = (job % nblk) * BLOCK
        n = min(C, c0 + BLOCK) - c0
        ga = np.zeros(n, k.dtype)
        gb = np.zeros(n, k.dtype)
        ha = np.zeros(n, k.dtype)
        hb = np.zeros(n, k.dtype)
        dwa = np.zeros(n, k.dtype)
        dua = np.zeros(n, k.dtype)
        r = np.full(n, -BIG, k.dtype)
        for t in range(T - 1, -1, -1):
            for j in range(n):
                c = c0 + j
                kt = k[bi, t, c]
                vt = v[bi, t, c]
                yt = y[bi, t, c]
                gt = dy[bi, t, c]
                qt = q_in[bi, t, c]
                gdinv = gt * dinv_in[bi, t, c]
                direct = gdinv * fast_exp(u[c] + kt - qt)
                f = fast_exp(kt + r[j])
                dk[bi, t, c] = direct * (vt - yt) + f * (vt * ga[j] - gb[j])
                dv[bi, t, c] = direct + f * ga[j]
                dwa[j] += f * (vt * ha[j] - hb[j])
                dua[j] += direct * (vt - yt)
                rw = r[j] + w[c]
                e = fast_exp(-abs(qt + rw))  # r_{t-1} = max(r_t + w, -q_t)
                e_old = e if -qt > rw else one
                e_new = one if -qt > rw else e
                r[j] = max(rw, -qt)
                gd = gdinv * e_new
                ha[j] = e_old * (ha[j] + ga[j])
                hb[j] = e_old * (hb[j] + gb[j])
                ga[j] = e_old * ga[j] + gd
                gb[j] = e_old * gb[j] + gd * yt
        for j in range(n):  # element by element: see _forward_kernel
            dw_part[bi, c0 + j] = dwa[j]
            du_part[bi, c0 + j] = dua[j]


def _prep(k, v, w, u):
    _check(k, v, w, u)
    dt = k.dtype
    if dt not in (np.float32, np.float64):
        raise ValueError(f"wkv: k must be float32 or float64, got {dt}")
    return tuple(np.ascontiguousarray(x, dtype=dt) for x in (k, v, w, u))


def forward(k, v, w, u, state=None):
    """Numba kernel (NumPy reference for small inputs: generation steps); same contract as
    `forward_reference`."""
    k, v, w, u = _prep(k, v, w, u)
    if k.size < SMALL:
        return forward_reference(k, v, w, u, state)
    B, T, C = k.shape
    a0, b0, p0 = (np.ascontiguousarray(x, dtype=k.dtype) for x in state) if state is not None \
        else init_state(B, C, k.dtype)
    y, q, dinv = (np.empty_like(k) for _ in range(3))
    a1, b1, p1 = (np.empty((B, C), k.dtype) for _ in range(3))
    _forward_kernel(k, v, w, u, a0, b0, p0, y, q, dinv, a1, b1, p1, k.dtype.type(1))
    cache = dict(k=k, v=v, w=w, u=u, y=y, q=q, dinv=dinv,
                 has_state=state is not None, state_out=(a1, b1, p1))
    return y, cache


def backward(dy, cache):
    """Numba kernel; same contract as `backward_reference`."""
    if cache["has_state"]:
        raise ValueError("wkv backward: a forward started from a given state is for inference only")
    k = cache["k"]
    B, T, C = k.shape
    dy = np.ascontiguousarray(dy, dtype=k.dtype)
    dk, dv = np.empty_like(k), np.empty_like(k)
    dw_part, du_part = np.empty((B, C), k.dtype), np.empty((B, C), k.dtype)
    _backward_kernel(k, cache["v"], cache["w"], cache["u"], cache["y"], cache["q"], cache["dinv"],
                     dy, dk, dv, dw_part, du_part, k.dtype.type(1))
    return dk, dv, dw_part.sum(axis=0), du_part.sum(axis=0)
