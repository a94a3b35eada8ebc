"""RWKV: the WKV kernel against HF's torch loop, and generation speed against the transformer.

    python benchmarks/rwkv.py [--batch 2] [--seq 1024] [--channels 512] [--repeats 20]
                              [--torch-repeats 3] [--gen-context 4096] [--gen-tokens 32] [--skip-gen]
                              [--cuda]

1. WKV, float32, k, v: (B, T, C): minillm's Numba kernels (forward; forward+backward giving dk, dv,
   dw, du) against HF's `rwkv_linear_attention_cpu` (its CPU path: a torch loop over time; forward
   under no_grad, backward by autograd through the loop), same inputs, in the same run; the NumPy
   reference forward for scale. Medians, ratio ours / torch (< 1: ours is faster).
2. Generation, batch 1, float32: tokens/s of `step` for minillm's RWKV (O(1) state) and GPT (KV cache)
   of the same width and depth, at the start of the context and after a prompt of gen-context -
   gen-tokens tokens (the GPT step attends over the whole prefix).
3. With --cuda: the numba.cuda kernels on CuPy arrays against the torch loop on the GPU.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillm.kernels import wkv  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_ms(fn, repeats):
    return 1e3 * float(np.median([timed(fn) for _ in range(repeats)]))


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
        wkv.wkv_forward(k, v, w, u)

    def ours_fwd_bwd():
        _, cache = wkv.wkv_forward(k, v, w, u)
        wkv.wkv_backward(dy, cache)

    def torch_fwd():
        with torch.no_grad():
            rwkv_linear_attention_cpu(ttd, tu, tk, tv)

    def torch_fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (ttd, tu, tk, tv)]
        y, _ = rwkv_linear_attention_cpu(*leaves)
        y.backward(tdy)

    with torch.no_grad():
        y_t = rwkv_linear_attention_cpu(ttd, tu, tk, tv)[0].numpy()
    err = float(np.abs(wkv.wkv_forward(k, v, w, u)[0] - y_t).max())
    ours_fwd_bwd()  # Numba compilation / cache load
    rows = [("forward", median_ms(ours_fwd, args.repeats), median_ms(torch_fwd, args.torch_repeats)),
            ("forward+backward", median_ms(ours_fwd_bwd, args.repeats),
             median_ms(torch_fwd_bwd, args.torch_repeats))]
    ref_ms = median_ms(lambda: wkv.wkv_forward_reference(k, v, w, u), 3)

    import numba

    print(f"WKV: B {B}, T {T}, C {C}, float32; threads: numba {numba.get_num_threads()}, torch "
          f"{torch.get_num_threads()}; medians of {args.repeats} (ours) / {args.torch_repeats} (torch)")
    print(f"max |y_ours - y_hf| = {err:.1e}; NumPy reference forward: {ref_ms:.1f} ms")
    print(f"{'':18}{'minillm ms':>12}{'HF torch loop ms':>18}{'ratio':>9}")
    for name, ours, theirs in rows:
        print(f"{name:18}{ours:12.2f}{theirs:18.1f}{ours / theirs:9.4f}")


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

    def sync_ms(fn, repeats):
        fn()
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            cp.cuda.Device().synchronize()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
        return 1e3 * float(np.median(out))

    def ours_fwd_bwd():
        _, cache = wkv_cuda.wkv_forward(ck, cv, cw, cu)
        wkv_cuda.wkv_backward(cdy, cache)

    def torch_fwd():
        with torch.no_grad():
            rwkv_linear_attention_cpu(ttd, tu, tk, tv)

    def torch_fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (ttd, tu, tk, tv)]
        rwkv_linear_attention_cpu(*leaves)[0].backward(tdy)

    y_ours = wkv_cuda.wkv_forward(ck, cv, cw, cu)[0].get()
    with torch.no_grad():
        err = float(np.abs(y_ours - rwkv_linear_attention_cpu(ttd, tu, tk, tv)[0].cpu().numpy()).max())
    rows = [("forward", sync_ms(lambda: wkv_cuda.wkv_forward(ck, cv, cw, cu), args.repeats),
             sync_ms(torch_fwd, args.torch_repeats)),
            ("forward+backward", sync_ms(ours_fwd_bwd, args.repeats), sync_ms(torch_fwd_bwd, args.torch_repeats))]
    print(f"\nWKV on the GPU ({torch.cuda.get_device_name()}): B {B}, T {T}, C {C}, float32, CuPy arrays; "
          f"max |y_ours - y_torch| = {err:.1e}")
    print(f"{'':18}{'numba.cuda ms':>14}{'torch loop ms':>15}{'ratio':>9}")
    for name, ours, theirs in rows:
        print(f"{name:18}{ours:14.3f}{theirs:15.1f}{ours / theirs:9.4f}")


def bench_generation(args):
    from minillm.models import gpt, rwkv

    base = dict(vocab_size=2048, context=args.gen_context, n_layer=4, n_head=4, d_model=256,
                dtype="float32")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, base["vocab_size"], (1, args.gen_context - args.gen_tokens))
    new = rng.integers(0, base["vocab_size"], (1, args.gen_tokens))
    print(f"\nGeneration: batch 1, {base['n_layer']} layers, d_model {base['d_model']}, vocab "
          f"{base['vocab_size']}, float32; tokens/s of `step` over {args.gen_tokens} tokens")
    print(f"{'':8}{'at position 0':>16}{f'at position {prompt.shape[1]}':>20}")
    for name, module, extra in (("rwkv", rwkv, {}), ("gpt", gpt, {})):
        config = {"arch": name, **base, **module.DEFAULTS, **extra}
        params = module.init(config, np.random.default_rng(1))

        def run_steps(state):
            t = time.perf_counter()
            for i in range(args.gen_tokens):
                _, state = module.step(params, new[:, i], state)
            return args.gen_tokens / (time.perf_counter() - t)

        run_steps(module.init_state(params, config, 1))  # warm-up
        short = run_steps(module.init_state(params, config, 1))
        state = module.init_state(params, config, 1)
        for i in range(prompt.shape[1]):  # prefill through step: the generic path of generate.py
            _, state = module.step(params, prompt[:, i], state)
        long = run_steps(state)
        print(f"{name:8}{short:16.0f}{long:20.0f}")


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
