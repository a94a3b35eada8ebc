"""RWKV: the WKV kernel against HF's torch loop, and generation speed against the transformer.

    python benchmarks/rwkv.py [--batch 2] [--seq 1024] [--channels 512] [--repeats 20]
                              [--torch-repeats 3] [--gen-context 4096] [--gen-tokens 32] [--skip-gen]
                              [--cuda]

1. WKV, float32, k, v: (B, T, C): minillm's Numba kernels (forward; forward+backward giving dk, dv,
   dw, du) against HF's `rwkv_linear_attention_cpu` (its CPU path: a torch loop over time; forward
   under no_grad, backward by autograd through the loop), same inputs, in the same run; the NumPy
   reference forward for scale. The contestants' calls alternate; medians, ratio ours / torch (< 1: ours
   is faster).
2. Generation, batch 1, float32: tokens/s of `step` for minillm's RWKV (O(1) state) and GPT (KV cache)
   of the same width and depth, at the start of the context and after a prompt of gen-context -
   gen-tokens tokens (the GPT step attends over the whole prefix).
3. With --cuda: the numba.cuda kernels on CuPy arrays against the torch loop on the GPU.
"""

import argparse

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np
import torch

from minillm.kernels import wkv


def medians_ms(fns, repeats, warmup=0, sync=None):
    """Interleaved medians in ms (one repeat count per function)."""
    return [1e3 * t for t in harness.medians(fns, repeats, warmup=warmup, sync=sync)]


def bench_wkv(args):
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    B, T, C = args.batch, args.seq, args.channels
    rng = np.random.default_rng(0)
    k = rng.standard_normal((B, T, C)).astype(np.float32)
    v = rng.standard_normal((B, T, C)).astype(np.float32)
    time_decay = rng.uniform(-5, 3, C).astype(np.float32)
    u = rng.standard_normal(C).astype(np.float32)
    w = -np.exp(time_decay)
    dy = rng.standard_normal((B, T, C)).astype(np.float32)
    tk, tv, ttd, tu, tdy = (torch.from_numpy(x) for x in (k, v, time_decay, u, dy))

    def ours_fwd():
        wkv.forward(k, v, w, u)

    def ours_fwd_bwd():
        _, cache = wkv.forward(k, v, w, u)
        wkv.backward(dy, cache)

    def torch_fwd():
        with torch.no_grad():
            rwkv_linear_attention_cpu(ttd, tu, tk, tv)

    def torch_fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (ttd, tu, tk, tv)]
        y, _ = rwkv_linear_attention_cpu(*leaves)
        y.backward(tdy)

    with torch.no_grad():
        y_t = rwkv_linear_attention_cpu(ttd, tu, tk, tv)[0].numpy()
    err = float(np.abs(wkv.forward(k, v, w, u)[0] - y_t).max())
    ours_fwd_bwd()  # Numba compilation / cache load
    counts = [args.repeats, args.torch_repeats]
    rows = [("forward", *medians_ms([ours_fwd, torch_fwd], counts)),
            ("forward+backward", *medians_ms([ours_fwd_bwd, torch_fwd_bwd], counts))]
    (ref_ms,) = medians_ms([lambda: wkv.forward_reference(k, v, w, u)], 3)

    import numba

    print(f"WKV: B {B}, T {T}, C {C}, float32; threads: numba {numba.get_num_threads()}, torch "
          f"{torch.get_num_threads()}; medians of {args.repeats} (ours) / {args.torch_repeats} (torch)")
    print(f"max |y_ours - y_hf| = {err:.1e}; NumPy reference forward: {ref_ms:.1f} ms")
    harness.versus(rows, ["HF torch loop ms"])
    # the least a pass must move: forward reads k, v and writes y; the backward reads k, v, y, dy and
    # writes dk, dv (float32)
    fwd_bytes, both_bytes = 4 * 3 * B * T * C, 4 * 9 * B * T * C
    print(f"{harness.limits_line()}; minillm reaches {fwd_bytes / (rows[0][1] / 1e3) / harness.copy_bandwidth():.3f} "
          f"(forward) and {both_bytes / (rows[1][1] / 1e3) / harness.copy_bandwidth():.3f} (forward+backward) "
          f"of the copy bandwidth")


def bench_cuda(args):
    """numba.cuda kernels on CuPy arrays against the same torch loop on the GPU (HF's CUDA kernel is
    fetched from the Hub at run time, which the benchmark machines cannot reach)."""
    import cupy as cp
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    from minillm.kernels import wkv_cuda

    B, T, C = args.batch, args.seq, args.channels
    rng = np.random.default_rng(0)
    k, v, dy = (rng.standard_normal((B, T, C)).astype(np.float32) for _ in range(3))
    time_decay = rng.uniform(-5, 3, C).astype(np.float32)
    u = rng.standard_normal(C).astype(np.float32)
    ck, cv, cdy, cu = (cp.asarray(x) for x in (k, v, dy, u))
    cw = -cp.exp(cp.asarray(time_decay))
    dev = torch.device("cuda")
    tk, tv, ttd, tu, tdy = (torch.from_numpy(x).to(dev) for x in (k, v, time_decay, u, dy))

    def sync():
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()

    def ours_fwd_bwd():
        _, cache = wkv_cuda.forward(ck, cv, cw, cu)
        wkv_cuda.backward(cdy, cache)

    def torch_fwd():
        with torch.no_grad():
            rwkv_linear_attention_cpu(ttd, tu, tk, tv)

    def torch_fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (ttd, tu, tk, tv)]
        rwkv_linear_attention_cpu(*leaves)[0].backward(tdy)

    y_ours = wkv_cuda.forward(ck, cv, cw, cu)[0].get()
    with torch.no_grad():
        err = float(np.abs(y_ours - rwkv_linear_attention_cpu(ttd, tu, tk, tv)[0].cpu().numpy()).max())
    counts = [args.repeats, args.torch_repeats]   # a warm-up call each; every timed call synchronised
    rows = [("forward", *medians_ms([lambda: wkv_cuda.forward(ck, cv, cw, cu), torch_fwd], counts, 1, sync)),
            ("forward+backward", *medians_ms([ours_fwd_bwd, torch_fwd_bwd], counts, 1, sync))]
    print(f"\nWKV on the GPU ({torch.cuda.get_device_name()}): B {B}, T {T}, C {C}, float32, CuPy arrays; "
          f"max |y_ours - y_torch| = {err:.1e}")
    harness.versus(rows, ["torch loop ms"], ours="numba.cuda ms", formats=(".3f", ".1f", ".4f"))


def bench_generation(args):
    from minillm.models import gpt, rwkv

    harness.generation([("rwkv", rwkv), ("gpt", gpt)], args.gen_context, args.gen_tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--torch-repeats", type=int, default=3)
    ap.add_argument("--gen-context", type=int, default=4096)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--cuda", action="store_true", help="also time the numba.cuda kernels (needs CuPy)")
    args = ap.parse_args()
    bench_wkv(args)
    if args.cuda:
        bench_cuda(args)
    if not args.skip_gen:
        bench_generation(args)


if __name__ == "__main__":
    main()
