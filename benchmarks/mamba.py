"""Mamba: the selective scan and the mixer against torch / HF, and generation speed against the transformer.

    python benchmarks/mamba.py [--batch 2] [--seq 1024] [--channels 256] [--state 16] [--repeats 20]
                               [--torch-repeats 3] [--torch-bwd-repeats 1] [--gen-context 1024]
                               [--gen-tokens 32] [--skip-gen]

1. Selective scan, float32, x, dt: (B, L, D), A: (D, N), B, C: (B, L, N): minillm's Numba kernels (forward;
   forward+backward giving dx, ddt, dA, dB, dC, dD) against (a) a torch loop over time written like
   mamba_ssm's `selective_scan_ref` (discretise the whole sequence, then h = dA h + dBu step by step) and
   (b) HF's slow path `mamba_selective_scan` (what MambaMixer runs without the CUDA kernels); forward under
   no_grad, backward by autograd through the loop (slow: tens of seconds, so it runs once by default, without
   a warm-up). Same inputs, same run, the contestants' calls alternating; medians; ratio ours / torch
   (< 1: ours is faster).
2. The whole mixer (d_model = D / 2, expand 2, so its inner width is D): minillm's mixer_forward /
   mixer_backward against HF `MambaMixer` (slow path), same weights.
3. Generation, batch 1, float32: tokens/s of `step` for minillm's Mamba (O(1) state) and GPT (KV cache) of
   the same width and depth, at the start of the context and after a prompt of gen-context - gen-tokens
   tokens (the GPT step attends over the whole prefix; the Mamba step does not depend on it). It runs in a
   subprocess with OPENBLAS_NUM_THREADS=1: batch-1 steps are chains of tiny matmuls, and on a busy 2-core
   machine OpenBLAS threads waiting for each other made single steps 10-20x slower, at random.

Timings on a shared 2-core machine are fragile: spinning OpenMP workers of Numba, torch and OpenBLAS
steal each other's core (single calls then take multiples of the 4 ms scheduler tick). Run it on a quiet
machine; OMP_WAIT_POLICY=PASSIVE or OPENBLAS_NUM_THREADS=1 makes the mixer rows steadier.
"""

import argparse
import os
import subprocess
import sys

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np
import torch

from minillm.models import mamba
from minillm.kernels import scan


def medians_ms(fns, repeats, warmup=1):
    """Interleaved medians in ms; a warm-up call each (Numba compilation / cache load, torch allocator)
    unless warmup says 0 for a function (the slow torch backward runs only its timed calls)."""
    return [1e3 * t for t in harness.medians(fns, repeats, warmup=warmup)]


def torch_scan_loop(u, delta, A, B, C, D):
    """u, delta: (B, D, L), A: (D, N), B, C: (B, N, L) -> (B, D, L); mamba_ssm's reference layout."""
    dA = torch.exp(delta[..., None] * A[:, None, :])               # (B, D, L, N)
    dBu = (delta * u)[..., None] * B.transpose(1, 2)[:, None]      # (B, D, L, N)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return torch.stack(ys, dim=2) + u * D[:, None]


def bench_scan(args):
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    Bt, L, Dm, N = args.batch, args.seq, args.channels, args.state
    rng = np.random.default_rng(0)
    x = rng.standard_normal((Bt, L, Dm)).astype(np.float32)
    dt = np.log1p(np.exp(rng.uniform(-6, -1, (Bt, L, Dm)))).astype(np.float32)
    A = -np.tile(np.arange(1, N + 1, dtype=np.float32), (Dm, 1))
    B = rng.standard_normal((Bt, L, N)).astype(np.float32)
    C = rng.standard_normal((Bt, L, N)).astype(np.float32)
    D = np.ones(Dm, np.float32)
    dy = rng.standard_normal((Bt, L, Dm)).astype(np.float32)
    # torch layouts: channels before time
    tx, tdt = (torch.from_numpy(v.transpose(0, 2, 1).copy()) for v in (x, dt))
    tB, tC = (torch.from_numpy(v.transpose(0, 2, 1).copy()) for v in (B, C))
    tA, tD, tdy = torch.from_numpy(A), torch.from_numpy(D), torch.from_numpy(dy.transpose(0, 2, 1).copy())

    def ours_fwd():
        scan.forward(x, dt, A, B, C, D)

    def ours_fwd_bwd():
        _, cache = scan.forward(x, dt, A, B, C, D)
        scan.backward(dy, cache)

    def torch_run(fn, backward):
        if not backward:
            with torch.no_grad():
                return fn(tx, tdt, tA, tB, tC, tD)
        leaves = [v.detach().requires_grad_() for v in (tx, tdt, tA, tB, tC, tD)]
        fn(*leaves).backward(tdy)

    hf = lambda *a: mamba_selective_scan(*a[:5], D=a[5])  # noqa: E731
    y = scan.forward(x, dt, A, B, C, D)[0]
    errs = [float(np.abs(y - torch_run(f, False).numpy().transpose(0, 2, 1)).max()) for f in (torch_scan_loop, hf)]
    fwd = medians_ms([ours_fwd, lambda: torch_run(torch_scan_loop, False), lambda: torch_run(hf, False)],
                     [args.repeats, args.torch_repeats, args.torch_repeats])
    fwd_bwd = medians_ms([ours_fwd_bwd, lambda: torch_run(torch_scan_loop, True), lambda: torch_run(hf, True)],
                         [args.repeats, args.torch_bwd_repeats, args.torch_bwd_repeats], warmup=[1, 0, 0])
    rows = [("forward", *fwd), ("forward+backward", *fwd_bwd)]
    (ref_ms,) = medians_ms([lambda: scan.forward_reference(x, dt, A, B, C, D)], 2)

    import numba

    print(f"Selective scan: B {Bt}, L {L}, D {Dm}, N {N}, float32; threads: numba {numba.get_num_threads()}, "
          f"torch {torch.get_num_threads()}; medians of {args.repeats} (ours) / {args.torch_repeats} (torch forward) / "
          f"{args.torch_bwd_repeats} (torch forward+backward)")
    print(f"max |y_ours - y_torch| = {errs[0]:.1e} (loop), {errs[1]:.1e} (HF); NumPy reference forward: "
          f"{ref_ms:.0f} ms")
    harness.versus(rows, ["torch loop ms", "HF slow path ms"], title="")
    # the least a pass must move: forward reads x, dt, B, C and writes y; the backward reads them and dy
    # again and writes dx, ddt, dB, dC (float32)
    fwd_bytes = 4 * (3 * Bt * L * Dm + 2 * Bt * L * N)
    both_bytes = fwd_bytes + 4 * (6 * Bt * L * Dm + 4 * Bt * L * N)
    print(f"{harness.limits_line()}; minillm reaches {fwd_bytes / (fwd[0] / 1e3) / harness.copy_bandwidth():.3f} "
          f"(forward) and {both_bytes / (fwd_bwd[0] / 1e3) / harness.copy_bandwidth():.3f} (forward+backward) "
          f"of the copy bandwidth")


def bench_mixer(args):
    import peers

    d = args.channels // 2
    config = {"d_model": d, **mamba.DEFAULTS, "d_state": args.state}
    params = mamba.init_mixer(config, np.random.default_rng(0))
    mixer = peers.hf_mamba_mixer(params, config, torch.float32).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.batch, args.seq, d)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    tx, tg = torch.from_numpy(x), torch.from_numpy(g)

    def ours_fwd_bwd():
        out, cache = mamba.mixer_forward(x, params, config)
        mamba.mixer_backward(g, cache)

    def hf_fwd():
        with torch.no_grad():
            return mixer(tx)

    def hf_fwd_bwd():
        mixer.zero_grad()
        mixer(tx.clone().requires_grad_()).backward(tg)

    err = float(np.abs(mamba.mixer_forward(x, params, config)[0] - hf_fwd().numpy()).max())
    rows = [("forward", *medians_ms([lambda: mamba.mixer_forward(x, params, config), hf_fwd],
                                    [args.repeats, args.torch_repeats])),
            ("forward+backward", *medians_ms([ours_fwd_bwd, hf_fwd_bwd], [args.repeats, args.torch_bwd_repeats],
                                             warmup=[1, 0]))]
    print(f"\nMixer: B {args.batch}, L {args.seq}, d_model {d} (inner {2 * d}), N {args.state}, float32; "
          f"max |out_ours - out_hf| = {err:.1e}")
    harness.versus(rows, ["HF MambaMixer ms"], title="")


def bench_generation(args):
    from minillm.models import gpt

    harness.generation([("mamba", mamba), ("gpt", gpt)], args.gen_context, args.gen_tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--torch-repeats", type=int, default=3)
    ap.add_argument("--torch-bwd-repeats", type=int, default=1)
    ap.add_argument("--gen-context", type=int, default=1024)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--gen-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gen_only:
        return bench_generation(args)
    bench_scan(args)
    bench_mixer(args)
    if not args.skip_gen:
        sys.stdout.flush()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--gen-only",
                        f"--gen-context={args.gen_context}", f"--gen-tokens={args.gen_tokens}"],
                       env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, check=True)


if __name__ == "__main__":
    main()
