"""MoE layer: minillm (NumPy + Numba) vs transformers' MixtralSparseMoeBlock (eager), same run, float32.

    python benchmarks/moe.py [--tokens 4096] [--d-model 256] [--d-ff 1024] [--experts 8] [--top-k 2]
                             [--repeats 15] [--impl eager] [--device cpu|cuda]

Times the forward (HF under torch.no_grad, ours building its backward cache) and forward+backward
(gradients of x and every parameter; ours also adds the aux-loss gradient, HF's block has none).
Both sides use the same weights and inputs, and alternate within each repeat; medians are printed
with ratios ours / HF (< 1: ours is faster). "minillm, per-linear experts" is our layer with w1 and w3
as separate dense layers (the path LoRA and ternary experts take, and every expert took before the fused
[W1; W3] product): the before/after of the same run. The MFU column divides the layer's matmul FLOPs
(forward 2 N C E + 6 N k C F, backward twice that) per second by the float32 GEMM FLOP/s measured in the
same run (for HF too). With more threads than idle cores, run with
OMP_WAIT_POLICY=PASSIVE: Numba's OpenMP threads otherwise spin after each kernel and slow the BLAS
calls that follow (on a quiet 16-core Xeon, 16 threads: forward+backward 352 ms -> 79 ms). --device cuda runs ours on CuPy arrays (the numba.cuda
kernels of kernels/moe_cuda.py, matmuls by cuBLAS through CuPy) and HF's block on torch's CUDA device.
"""

import argparse
import os

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np
import peers
import torch

from minillm.nn import moe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--impl", default="eager", help="HF experts implementation (eager, batched_mm, ...)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--profile", action="store_true", help="also print where our time goes (cProfile)")
    args = ap.parse_args()

    config = {"d_model": args.d_model, "d_ff": args.d_ff, "n_experts": args.experts,
              "top_k": args.top_k, "n_layer": 4, "aux_loss_coef": 0.01, "router_z_loss_coef": 0.0}
    rng = np.random.default_rng(0)
    p = moe.init_ffn(config, rng, np.float32)
    p["gate"]["weight"] *= 10.0  # a router that is not uniform
    x = rng.standard_normal((1, args.tokens, args.d_model)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    block = peers.hf_mixtral_moe(p, config, torch.float32, experts_impl=args.impl)
    xt, dyt = torch.from_numpy(x.copy()), torch.from_numpy(dy)
    sync = lambda: None  # noqa: E731
    if args.device == "cuda":
        import cupy

        from minillm.device import to_device

        p, x, dy = to_device(p, cupy), cupy.asarray(x), cupy.asarray(dy)
        block, xt, dyt = block.cuda(), xt.cuda(), dyt.cuda()

        def sync():
            cupy.cuda.Device().synchronize()
            torch.cuda.synchronize()

    def ours_fwd():
        moe.moe_forward(x, p, config)

    def ours_fwd_bwd():
        y, cache = moe.moe_forward(x, p, config)
        moe.moe_backward(dy, cache)

    def unfused(fn):
        def run():
            fusable, moe._fusable = moe._fusable, lambda *a: False
            try:
                fn()
            finally:
                moe._fusable = fusable
        return run

    def hf_fwd():
        with torch.no_grad():
            block(xt)

    def hf_fwd_bwd():
        block.zero_grad(set_to_none=True)
        xg = xt.detach().requires_grad_()
        block(xg).backward(dyt)

    with torch.no_grad():
        y_ours = moe.moe_forward(x, p, config)[0]
        y_ours = y_ours.get() if hasattr(y_ours, "get") else y_ours
        err = np.abs(block(xt).cpu().numpy() - y_ours).max()
    # two warm-up rounds (Numba compilation / cache load, allocator), then all four alternate
    t = harness.medians([ours_fwd, unfused(ours_fwd), hf_fwd, ours_fwd_bwd, unfused(ours_fwd_bwd), hf_fwd_bwd],
                        args.repeats, warmup=2, sync=sync)

    import numba

    print(f"MoE layer: {args.tokens} tokens, d_model {args.d_model}, d_ff {args.d_ff}, "
          f"{args.experts} experts, top-{args.top_k}, float32, {args.device}; HF experts impl {args.impl!r}")
    print(f"threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()} "
          f"({numba.threading_layer()} layer), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"median of {args.repeats}; max |y_ours - y_hf| = {err:.2e}")
    N, C, F, E, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k
    flops = 2 * N * C * E + 6 * N * k * C * F
    limit = harness.gemm_flops() if args.device == "cpu" else None
    rows = []
    for name, (ours, before, hf), n_flops in (("forward", t[0:3], flops), ("forward+backward", t[3:6], 3 * flops)):
        mfu = [f"{n_flops / x / limit:.3f}" if limit else "-" for x in (ours, before, hf)]
        rows.append((name, f"{1e3 * ours:.1f}", f"{ours / hf:.2f}", mfu[0], f"{1e3 * before:.1f}", f"{before / hf:.2f}",
                     mfu[1], f"{1e3 * hf:.1f}", mfu[2]))
    if limit:
        print(harness.limits_line())
    harness.table(["", "minillm ms", "/ HF", "MFU", "per-linear experts ms", "/ HF", "MFU", "HF ms", "MFU"], rows)
    if args.profile:
        profile(ours_fwd_bwd, x, p, args)


def profile(fn, x, p, args):
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        fn()
    prof.disable()
    print("\nour forward+backward, 5 runs, by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    # one expert's GEMM at the average load (N k / E rows), NumPy's BLAS vs torch's
    n = args.tokens * args.top_k // args.experts
    xe = np.asarray(x).reshape(-1, args.d_model)[:n].copy()
    w = np.asarray(p["experts"]["0"]["w1"]["weight"])
    xt, wt = torch.from_numpy(xe), torch.from_numpy(w)
    names = ["numpy x @ W1.T", "torch x @ W1.T"]
    for name, t in zip(names, harness.medians([lambda: xe @ w.T, lambda: xt @ wt.T], 20)):
        print(f"{name} ({n} x {args.d_model} x {w.shape[0]}): {1e3 * t:.2f} ms")


if __name__ == "__main__":
    main()
