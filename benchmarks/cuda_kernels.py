"""The numba.cuda kernels against the PyTorch CUDA equivalent of their workload and the memory-bandwidth floor.

    python benchmarks/cuda_kernels.py [--repeats 20] [--only scan,wkv,ternary,moe,layernorm,gelu,softmax,
                                        cross_entropy,adamw,embedding]
    python benchmarks/cuda_kernels.py --smoke   # tiny shapes: checks the script (no GPU needed: Numba's
                                                  # CUDA simulator, torch on the CPU); its times mean nothing

One row per kernel and workload, all on one GPU in one run:
  ours      median ms of the numba.cuda kernel on CuPy arrays (numba device arrays without CuPy);
  torch     median ms of the PyTorch equivalent on the same GPU: a per-step torch loop for the scan and
            WKV (what HF runs without its custom kernels), float16 and int8 (torch._int_mm) matmuls for
            the packed ternary product, index gather / weighted sum for MoE dispatch / combine, torch's
            own fused kernels for LayerNorm, GELU, softmax, cross-entropy and AdamW (fused=True), and
            index_add_ (atomic adds) for the embedding backward; "fwd+bwd" rows time torch autograd;
  speed-up  torch / ours (> 1: ours is faster);
  floor     the least bytes the operation must move (every input read once, every output written once,
            nothing else) divided by the device-to-device copy bandwidth measured at the start of the run;
  ours/fl.  how far the kernel is from that floor (1.0 = as fast as memory allows);
  max diff  the largest |ours - torch| over the outputs, relative to the largest |torch| (agreement check).
Each timed call ends with a device synchronisation; calls of ours and of torch alternate.
"""

import argparse
import os
import sys

if "--smoke" in sys.argv and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import harness  # noqa: E402  (puts the checkout and tests/ on sys.path)
import minillm  # noqa: E402,F401  (first: it sets Numba's environment, see minillm/__init__.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from numba import cuda  # noqa: E402

from minillm.kernels import (adamw_cuda, embedding_cuda, gelu_cuda, layernorm_cuda, moe_cuda,  # noqa: E402
                             scan_cuda, softmax_cuda, ternary, ternary_cuda, wkv_cuda)

try:
    import cupy
except ImportError:
    cupy = None

SIZES = {  # full / smoke
    "scan": [dict(B=2, L=1024, D=256, N=16), dict(B=1, L=5, D=3, N=2)],
    "wkv": [dict(B=2, T=1024, C=512), dict(B=1, T=4, C=3)],
    "ternary": [dict(M=1, O=4096, I=4096), dict(M=1, O=8, I=8)],
    "ternary_mm": [dict(M=64, O=4096, I=4096), dict(M=2, O=8, I=8)],
    "moe": [dict(N=4096, k=2, E=8, C=512), dict(N=6, k=2, E=3, C=4)],
    "layernorm": [dict(R=4096, C=384), dict(R=3, C=5)],
    "gelu": [dict(R=4096, C=1536), dict(R=3, C=5)],
    "softmax": [dict(B=16, H=6, T=256), dict(B=1, H=1, T=4)],
    "cross_entropy": [dict(R=4096, V=65), dict(R=3, V=5)],
    "cross_entropy_gpt2": [dict(R=2048, V=50257), dict(R=2, V=7)],
    "adamw": [dict(P=10_000_000), dict(P=10)],
    "embedding": [dict(N=4096, V=65, C=384), dict(N=6, V=3, C=4)],
    "embedding_gpt2": [dict(N=4096, V=50257, C=768), dict(N=6, V=9, C=4)],
}


class Bench:
    def __init__(self, smoke, repeats):
        self.smoke, self.repeats = smoke, repeats
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
        self.rows = []
        self.bandwidth = self._copy_bandwidth()

    # arrays
    def ours(self, a):
        """A host array on the GPU, as the models hold it: CuPy when installed, else a numba device array."""
        a = np.ascontiguousarray(a)
        return cupy.asarray(a) if cupy is not None and not self.smoke else cuda.to_device(a)

    @staticmethod
    def copy(dst, src):
        """dst[...] = src, both GPU arrays of one shape."""
        if hasattr(dst, "copy_to_device"):
            dst.copy_to_device(src)
        else:
            dst[...] = src

    def torch(self, a, grad=False):
        return torch.tensor(np.asarray(a), device=self.dev, requires_grad=grad)

    @staticmethod
    def host(a):
        if isinstance(a, torch.Tensor):
            return a.detach().cpu().numpy()
        return a.get() if hasattr(a, "get") else (a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a))

    def sync(self):
        cuda.synchronize()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def _copy_bandwidth(self):
        """Bytes read + written per second by a device-to-device copy of 1 GiB (the floor's yardstick)."""
        n = (1 << 28) if self.dev.type == "cuda" else (1 << 16)
        a, b = torch.empty(n, device=self.dev), torch.empty(n, device=self.dev)
        t = self.median([lambda: b.copy_(a)])[0]
        return 2 * 4 * n / t

    def median(self, fns):
        """Interleaved medians, each timed call synchronised; a warm-up call each (compiles the kernels)."""
        return harness.medians(fns, self.repeats, warmup=1, sync=self.sync)

    def row(self, name, shape, ours_fn, torch_fn, nbytes, pairs):
        """pairs: [(our output, torch output)] to compare (computed once, before timing)."""
        diff = max(float(np.abs(self.host(a).astype(np.float64) - self.host(b).astype(np.float64)).max()) /
                   max(float(np.abs(self.host(b)).max()), 1e-30) for a, b in pairs) if pairs else float("nan")
        t_ours, t_torch = self.median([ours_fn, torch_fn])
        self.rows.append((name, shape, t_ours, t_torch, nbytes / self.bandwidth, diff))

    def print(self):
        where = torch.cuda.get_device_name() if self.dev.type == "cuda" else "CPU (smoke run: times mean nothing)"
        print(f"\nnumba.cuda kernels vs PyTorch on {where}; float32; median of {self.repeats}; copy bandwidth "
              f"{self.bandwidth / 1e9:.0f} GB/s; torch {torch.__version__}")
        harness.table(["kernel", "shape", "ours ms", "torch ms", "speed-up", "floor ms", "ours/fl.", "max diff"],
                      [(name, shape, f"{to * 1e3:.3f}", f"{tt * 1e3:.3f}", f"{tt / to:.2f}x", f"{fl * 1e3:.4f}",
                        f"{to / fl:.1f}", f"{diff:.1e}") for name, shape, to, tt, fl, diff in self.rows],
                      align="llrrrrrr")


def rng_arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def bench_scan(b, B, L, D, N):
    rng = np.random.default_rng(0)
    x, Bm, Cm, Dv, dy = rng_arrays(0, (B, L, D), (B, L, N), (B, L, N), (D,), (B, L, D))
    dt = rng.uniform(0.01, 0.1, (B, L, D)).astype(np.float32)
    A = -np.exp(rng.standard_normal((D, N))).astype(np.float32)
    ours = [b.ours(a) for a in (x, dt, A, Bm, Cm, Dv)]
    dy_o = b.ours(dy)
    tt = [b.torch(a, grad=True) for a in (x, dt, A, Bm, Cm, Dv)]
    dy_t = b.torch(dy)

    def torch_scan(x, dt, A, Bm, Cm, Dv):
        h = torch.zeros(x.shape[0], x.shape[2], A.shape[1], device=x.device)
        ys = []
        for t in range(x.shape[1]):
            d = dt[:, t, :, None]
            h = torch.exp(d * A) * h + (d * x[:, t, :, None]) * Bm[:, t, None, :]
            ys.append((h * Cm[:, t, None, :]).sum(-1))
        return torch.stack(ys, 1) + Dv * x

    def torch_both():
        y = torch_scan(*tt)
        return torch.autograd.grad(y, tt, dy_t)

    y_o, cache = scan_cuda.forward(*ours)
    grads_o = scan_cuda.backward(dy_o, cache)
    grads_t = torch_both()
    shape = f"B{B} L{L} D{D} N{N}"
    io = 4 * (3 * B * L * D + 2 * B * L * N + D * N + D)          # x, dt, B, C, A, D in; y out
    b.row("scan forward", shape, lambda: scan_cuda.forward(*ours),
          lambda: torch_scan(*tt), io, [(y_o, torch_scan(*tt))])
    both = io + 4 * (B * L * D + 2 * B * L * D + 2 * B * L * N + D * N + D)   # + dy in, six gradients out
    b.row("scan fwd+bwd", shape, lambda: scan_cuda.backward(
        dy_o, scan_cuda.forward(*ours)[1]), torch_both, both, list(zip(grads_o, grads_t)))


def bench_wkv(b, B, T, C):
    k, v, dy = rng_arrays(1, (B, T, C), (B, T, C), (B, T, C))
    rng = np.random.default_rng(1)
    w = -np.exp(rng.standard_normal(C)).astype(np.float32)
    u = rng.standard_normal(C).astype(np.float32)
    ours = [b.ours(a) for a in (k, v, w, u)]
    dy_o = b.ours(dy)
    tt = [b.torch(a, grad=True) for a in (k, v, w, u)]
    dy_t = b.torch(dy)

    def torch_wkv(k, v, w, u):     # the max-tracking recurrence, one step at a time (HF's CPU path)
        num = torch.zeros(k.shape[0], k.shape[2], device=k.device)
        den, mx = torch.zeros_like(num), torch.full_like(num, -1e38)
        ys = []
        for t in range(k.shape[1]):
            kt, vt = k[:, t], v[:, t]
            ww = u + kt
            q = torch.maximum(mx, ww)
            e1, e2 = torch.exp(mx - q), torch.exp(ww - q)
            ys.append((e1 * num + e2 * vt) / (e1 * den + e2))
            ww = mx + w
            q = torch.maximum(ww, kt)
            e1, e2 = torch.exp(ww - q), torch.exp(kt - q)
            num, den, mx = e1 * num + e2 * vt, e1 * den + e2, q
        return torch.stack(ys, 1)

    def torch_both():
        return torch.autograd.grad(torch_wkv(*tt), tt, dy_t)

    y_o, cache = wkv_cuda.forward(*ours)
    grads_o = wkv_cuda.backward(dy_o, cache)
    shape = f"B{B} T{T} C{C}"
    io = 4 * (3 * B * T * C + 2 * C)
    b.row("wkv forward", shape, lambda: wkv_cuda.forward(*ours), lambda: torch_wkv(*tt), io,
          [(y_o, torch_wkv(*tt))])
    b.row("wkv fwd+bwd", shape, lambda: wkv_cuda.backward(dy_o, wkv_cuda.forward(*ours)[1]), torch_both,
          io + 4 * (3 * B * T * C + 2 * C), list(zip(grads_o, torch_both())))


def bench_ternary(b, M, O, I, name):
    rng = np.random.default_rng(2)
    w = rng.integers(-1, 2, (O, I)).astype(np.int8)
    xq = rng.integers(-127, 128, (M, I)).astype(np.int8)
    packed_o, xq_o = b.ours(ternary.pack_ternary(w)[0]), b.ours(xq)
    out = b.ours(np.zeros((M, O), np.int32))
    half = torch.float16 if b.dev.type == "cuda" else torch.float32
    w16, x16 = b.torch(w).to(half), b.torch(xq).to(half)
    want = ternary_cuda.matmul(xq_o, packed_o, O, out=out)
    nbytes = O * ((I + 3) // 4 * 4) // 4 + M * I + 4 * M * O
    shape = f"M{M} O{O} I{I}"
    b.row(f"{name} vs fp16 matmul", shape, lambda: ternary_cuda.matmul(xq_o, packed_o, O, out=out),
          lambda: x16 @ w16.T, nbytes, [(want, (x16.float() @ w16.float().T))])
    if b.dev.type == "cuda" and M > 16 and I % 8 == 0 and O % 8 == 0:   # torch._int_mm's shape rules
        w8t, x8 = b.torch(w.T.copy()), b.torch(xq)
        b.row(f"{name} vs int8 _int_mm", shape,
              lambda: ternary_cuda.matmul(xq_o, packed_o, O, out=out),
              lambda: torch._int_mm(x8, w8t), nbytes, [(want, torch._int_mm(x8, w8t))])


def bench_moe(b, N, k, E, C):
    rng = np.random.default_rng(3)
    x, ys_h = rng_arrays(3, (N, C), (N * k, C))
    idx = np.argsort(rng.random((N, E)), axis=1)[:, :k].astype(np.int64)
    wts = rng.random((N, k)).astype(np.float32)
    x_o, idx_o, ys_o, w_o = b.ours(x), b.ours(idx), b.ours(ys_h), b.ours(wts)
    x_t, idx_t, ys_t, w_t = b.torch(x), b.torch(idx), b.torch(ys_h), b.torch(wts)
    xs_o, _, _, pos = moe_cuda.dispatch(x_o, idx_o, E)
    pos_t = b.torch(b.host(pos))

    def torch_dispatch():
        order = torch.argsort(idx_t.reshape(-1), stable=True)
        return x_t[order // k]

    shape = f"N{N} k{k} E{E} C{C}"
    b.row("moe dispatch", shape, lambda: moe_cuda.dispatch(x_o, idx_o, E), torch_dispatch,
          4 * (N * C + N * k * C) + 8 * N * k, [(xs_o, torch_dispatch())])
    pos_o = b.ours(b.host(pos))

    def torch_combine():
        return (ys_t[pos_t] * w_t[..., None]).sum(1)

    b.row("moe combine", shape, lambda: moe_cuda.combine(ys_o, pos_o, w_o), torch_combine,
          4 * (N * k * C + N * C + N * k) + 8 * N * k, [(moe_cuda.combine(ys_o, pos_o, w_o), torch_combine())])


def bench_layernorm(b, R, C):
    x, w, bias, dy = rng_arrays(4, (R, C), (C,), (C,), (R, C))
    o = [b.ours(a) for a in (x, w, bias)]
    dy_o = b.ours(dy)
    tt = [b.torch(a, grad=True) for a in (x, w, bias)]
    dy_t = b.torch(dy)

    def torch_fwd():
        return F.layer_norm(tt[0], (C,), tt[1], tt[2], 1e-5)

    def torch_both():
        return torch.autograd.grad(torch_fwd(), tt, dy_t)

    y_o, cache = layernorm_cuda.forward(*o, 1e-5)
    shape = f"rows {R} C{C}"
    b.row("layernorm forward", shape, lambda: layernorm_cuda.forward(*o, 1e-5), torch_fwd,
          4 * (2 * R * C + 2 * C), [(y_o, torch_fwd())])
    b.row("layernorm fwd+bwd", shape, lambda: layernorm_cuda.backward(
        dy_o, layernorm_cuda.forward(*o, 1e-5)[1]), torch_both, 4 * (4 * R * C + 4 * C),
        list(zip(layernorm_cuda.backward(dy_o, cache), torch_both())))


def bench_gelu(b, R, C):
    x, dy = rng_arrays(5, (R, C), (R, C))
    x_o, dy_o = b.ours(x), b.ours(dy)
    x_t, dy_t = b.torch(x, grad=True), b.torch(dy)
    y_o, cache = gelu_cuda.forward(x_o)
    shape = f"{R} x {C}"
    b.row("gelu forward", shape, lambda: gelu_cuda.forward(x_o),
          lambda: F.gelu(x_t, approximate="tanh"), 8 * R * C, [(y_o, F.gelu(x_t, approximate="tanh"))])

    def torch_both():
        return torch.autograd.grad(F.gelu(x_t, approximate="tanh"), x_t, dy_t)[0]

    b.row("gelu fwd+bwd", shape, lambda: gelu_cuda.backward(dy_o, gelu_cuda.forward(x_o)[1]),
          torch_both, 4 * 4 * R * C, [(gelu_cuda.backward(dy_o, cache), torch_both())])


def bench_softmax(b, B, H, T):
    s, dp = rng_arrays(6, (B, H, T, T), (B, H, T, T))
    s_o, dp_o = b.ours(s), b.ours(dp)
    s_t, dp_t = b.torch(s, grad=True), b.torch(dp)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=b.dev), 1)

    def torch_fwd():
        return torch.softmax(s_t.masked_fill(future, float("-inf")), -1)

    def torch_both():
        return torch.autograd.grad(torch_fwd(), s_t, dp_t)[0]

    def ours_fwd():       # in place: refill the scores first (a copy, timed on both sides' behalf)
        b.copy(work, s_o)
        return softmax_cuda.causal(work)

    def ours_both():
        p = ours_fwd()
        b.copy(g, dp_o)
        return softmax_cuda.causal_backward(g, p)

    work, g = b.ours(s), b.ours(dp)
    shape = f"B{B} H{H} T{T}"
    n = B * H * T * T
    b.row("causal softmax forward", shape, ours_fwd, torch_fwd, 8 * n, [(ours_fwd(), torch_fwd())])
    b.row("causal softmax fwd+bwd", shape, ours_both, torch_both, 4 * 4 * n, [(ours_both(), torch_both())])


def bench_cross_entropy(b, R, V, name):
    (logits,) = rng_arrays(7, (R, V))
    targets = np.random.default_rng(7).integers(0, V, R)
    l_o, t_o = b.ours(logits), b.ours(targets)
    l_t, t_t = b.torch(logits, grad=True), b.torch(targets)

    def ours_both():
        _, cache = softmax_cuda.cross_entropy_forward(l_o, t_o)
        return softmax_cuda.cross_entropy_backward(1.0, cache)

    def torch_both():
        return torch.autograd.grad(F.cross_entropy(l_t, t_t), l_t)[0]

    loss_o = softmax_cuda.cross_entropy_forward(l_o, t_o)[0]
    shape = f"rows {R} V{V}"
    l_fixed = l_t.detach()
    b.row(f"{name} forward", shape, lambda: softmax_cuda.cross_entropy_forward(l_o, t_o),
          lambda: float(F.cross_entropy(l_fixed, t_t)), 4 * R * V + 8 * R,
          [(np.array(loss_o), F.cross_entropy(l_fixed, t_t))])
    b.row(f"{name} fwd+bwd", shape, ours_both, torch_both, 4 * 2 * R * V + 8 * R, [(ours_both(), torch_both())])


def bench_adamw(b, P):
    p, g = rng_arrays(8, (P,), (P,))
    o = [b.ours(a) for a in (p, g, np.zeros(P, np.float32), np.zeros(P, np.float32))]
    p_t = b.torch(p)
    p_t.grad = b.torch(g)
    fused = b.dev.type == "cuda"
    opt = torch.optim.AdamW([p_t], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused)

    def ours(step=1):
        adamw_cuda.update(*o, 1.0 - 1e-3 * 0.1, 0.9, 0.95, 1e-3 / (1 - 0.9 ** step), (1 - 0.95 ** step) ** 0.5,
                                     1e-8)

    ours()              # the first step on both sides, compared; the timed steps repeat step 1's constants
    opt.step()
    b.row(f"adamw ({'torch fused' if fused else 'torch'})", f"{P:,} params", ours, opt.step, 28 * P,
          [(o[0], p_t)])


def bench_embedding(b, N, V, C, name):
    (dy,) = rng_arrays(9, (N, C))
    ids = np.random.default_rng(9).integers(0, V, N)
    dy_o, ids_o = b.ours(dy), b.ours(ids)
    dy_t, ids_t = b.torch(dy), b.torch(ids)

    def torch_backward():
        return torch.zeros(V, C, device=b.dev).index_add_(0, ids_t, dy_t)

    b.row(name, f"N{N} V{V} C{C}", lambda: embedding_cuda.backward(dy_o, ids_o, (V, C)),
          torch_backward, 4 * (N * C + V * C) + 8 * N,
          [(embedding_cuda.backward(dy_o, ids_o, (V, C)), torch_backward())])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated kernel names (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no GPU needed, times meaningless")
    args = ap.parse_args()
    b = Bench(args.smoke, 2 if args.smoke else args.repeats)
    pick = 1 if args.smoke else 0
    benches = {
        "scan": lambda: bench_scan(b, **SIZES["scan"][pick]),
        "wkv": lambda: bench_wkv(b, **SIZES["wkv"][pick]),
        "ternary": lambda: (bench_ternary(b, **SIZES["ternary"][pick], name="ternary matvec"),
                            bench_ternary(b, **SIZES["ternary_mm"][pick], name="ternary matmul")),
        "moe": lambda: bench_moe(b, **SIZES["moe"][pick]),
        "layernorm": lambda: bench_layernorm(b, **SIZES["layernorm"][pick]),
        "gelu": lambda: bench_gelu(b, **SIZES["gelu"][pick]),
        "softmax": lambda: bench_softmax(b, **SIZES["softmax"][pick]),
        "cross_entropy": lambda: (bench_cross_entropy(b, **SIZES["cross_entropy"][pick], name="cross-entropy"),
                                  bench_cross_entropy(b, **SIZES["cross_entropy_gpt2"][pick], name="cross-entropy")),
        "adamw": lambda: bench_adamw(b, **SIZES["adamw"][pick]),
        "embedding": lambda: (bench_embedding(b, **SIZES["embedding"][pick], name="embedding backward"),
                              bench_embedding(b, **SIZES["embedding_gpt2"][pick], name="embedding backward")),
    }
    chosen = [n for n in args.only.split(",") if n] or list(benches)
    unknown = sorted(set(chosen) - set(benches))
    if unknown:
        ap.error(f"unknown kernels {unknown}; choose from {', '.join(benches)}")
    for name in chosen:
        benches[name]()
    b.print()


if __name__ == "__main__":
    main()
