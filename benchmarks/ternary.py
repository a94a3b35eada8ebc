"""Ternary (BitNet b1.58) y = W x: the packed 2-bit Numba kernel vs float32 NumPy and torch, same run.

    python benchmarks/ternary.py [--out 4096] [--in 4096] [--tokens 64] [--repeats 200] [--cuda] [--no-cpu]

W is a random ternary (out, in) matrix. Contestants, each with 1 thread and with the default thread
count (Numba, OpenBLAS and torch all set alike):
  packed kernel   kernels.ternary.matvec on int8 activations (the kernel alone)
  packed layer    ternary.packed_linear_forward on float32 x (activation quantisation + kernel + rescale)
  numpy f32       W @ x with W as a float32 array (OpenBLAS sgemv)
  torch f32       torch.mv(W, x) on float32 tensors
Each contestant runs its repeats in one block (see `run`); medians are printed with ratios
peer / packed kernel (> 1: the packed kernel is faster), and the fastest repeat in brackets (on a
shared machine the 2-thread medians suffer whenever another process holds a core). A second table does the same for a prefill of --tokens tokens
(x: (M, in) -> (M, out)). Also printed: the bytes of W at each precision. The machine may be shared:
the load average is printed with the results. Each cell ends with the fraction of the machine's limit the
median reaches, both limits measured in the same run (harness): for y = W x (memory-bound) the bytes of W
read per second (packed: 2 bits a weight; float32: 4 bytes) over the copy bandwidth; for the prefill the
multiply-adds (2 M O I operations per second, integer or float) over the float32 GEMM FLOP/s. A
bandwidth fraction above 1 means W stayed in the caches (the copy is measured on 256 MB).
With --cuda (a GPU is needed) a third table times the numba.cuda packed kernel against torch float32 /
bfloat16 on the GPU (device arrays; each call is
synchronised, so launch overheads are included).
"""

import argparse
import ctypes
import glob
import math
import os

import harness  # first: puts the checkout and tests/ on sys.path
import numba
import numpy as np
import torch

from minillm.nn import ternary
from minillm.kernels import ternary as kt


def _openblas():
    """Handle on NumPy's bundled OpenBLAS (to set its thread count at run time), or None."""
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)
    return None


def set_threads(n, blas_setter):
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    if blas_setter is not None:
        blas_setter(n)


def run(contestants, repeats):
    """{name: fn} -> {name: (median, min) seconds}. Each contestant runs its repeats in one block after
    a pause: interleaving them on a 2-core machine lets one library's idle-spinning thread pool (torch's
    OpenMP, OpenBLAS, Numba's) steal the cores another one needs."""
    times = harness.time_calls(list(contestants.values()), repeats, warmup=2, interleave=False, pause=0.5)
    return {name: (float(np.median(ts)), float(np.min(ts))) for name, ts in zip(contestants, times)}


def table(title, results, base="packed kernel", fraction=None, unit=""):
    """Median ms, ratio of medians to the base, the fastest repeat (min ms), and fraction(name, median
    seconds) of the machine's limit (`unit` names it) per column."""
    head = [""] + [h + f": median, ratio, (min){', ' + unit if fraction else ''}" for h in results]
    rows = [[name] + [f"{res[name][0] * 1e3:.3f} ms  x{res[name][0] / res[base][0]:6.2f}  ({res[name][1] * 1e3:.3f})"
                      + (f"  {fraction(name, res[name][0]):.3f}" if fraction else "")
                      for res in results.values()] for name in next(iter(results.values()))]
    harness.table(head, rows, title=f"\n{title}")


def cuda_table(packed, O, w_f32, x, xs, xq, xsq, repeats):
    from numba import cuda

    from minillm.kernels import ternary_cuda as ktc

    d_packed, d_xs = cuda.to_device(packed), cuda.to_device(xsq)
    d_x = cuda.to_device(xq.reshape(1, -1).copy())
    out1, out_m = cuda.device_array((1, O), np.int32), cuda.device_array((xs.shape[0], O), np.int32)
    assert np.array_equal(ktc.matmul(d_x, d_packed, O).copy_to_host()[0],
                          kt.matvec(xq, packed, O))
    dev = torch.device("cuda")
    w32, x32, xs32 = (torch.from_numpy(a).to(dev) for a in (w_f32, x, xs))
    w16, x16, xs16 = w32.bfloat16(), x32.bfloat16(), xs32.bfloat16()

    def sync(fn):
        def run_once():
            fn()
            cuda.synchronize()
            torch.cuda.synchronize()
        return run_once

    res = {}
    for title, contestants in (
            ("batch 1", {"packed kernel": lambda: ktc.matmul(d_x, d_packed, O, out1),
                         "torch f32": lambda: torch.mv(w32, x32),
                         "torch bf16": lambda: torch.mv(w16, x16)}),
            (f"{xs.shape[0]} tokens",
             {"packed kernel": lambda: ktc.matmul(d_xs, d_packed, O, out_m),
              "torch f32": lambda: torch.nn.functional.linear(xs32, w32),
              "torch bf16": lambda: torch.nn.functional.linear(xs16, w16)})):
        res[title] = run({k: sync(v) for k, v in contestants.items()}, repeats)
    table(f"GPU ({torch.cuda.get_device_name()}), synchronised calls", res)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--cuda", action="store_true", help="also time the numba.cuda kernel on a GPU")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU tables")
    args = ap.parse_args()
    O, I = args.out, args.inp

    rng = np.random.default_rng(0)
    latent = (rng.standard_normal((O, I)) * 0.02).astype(np.float32)
    packed, scale, shape = ternary.pack_weight(latent)
    w_f32 = ternary.dequantize_weight(packed, scale, shape)           # s * W_q, float32 (O, I)
    x = rng.standard_normal(I).astype(np.float32)
    xs = rng.standard_normal((args.tokens, I)).astype(np.float32)
    xq = ternary.activation_quant(x)[0].astype(np.int8)
    xsq = ternary.activation_quant(xs)[0].astype(np.int8)
    wt, xt, xst = torch.from_numpy(w_f32), torch.from_numpy(x), torch.from_numpy(xs)

    # the kernel is exact: check it once against the reference before timing
    assert np.array_equal(kt.matvec(xq, packed, O), kt.matmul_reference(xq, packed, O))
    y_packed = ternary.packed_linear_forward(x, packed, scale, shape)
    assert np.allclose(y_packed, ternary.bitlinear_forward(x, latent)[0])

    matvec = {
        "packed kernel": lambda: kt.matvec(xq, packed, O),
        "packed layer": lambda: ternary.packed_linear_forward(x, packed, scale, shape),
        "numpy f32": lambda: w_f32 @ x,
        "torch f32": lambda: torch.mv(wt, xt),
    }
    prefill = {
        "packed kernel": lambda: kt.matmul(xsq, packed, O),
        "packed layer": lambda: ternary.packed_linear_forward(xs, packed, scale, shape),
        "numpy f32": lambda: xs @ w_f32.T,
        "torch f32": lambda: torch.nn.functional.linear(xst, wt),
    }
    blas = _openblas()
    default = numba.config.NUMBA_NUM_THREADS
    settings = [] if args.no_cpu else [1] + ([default] if default > 1 else [])
    res_mv, res_pf = {}, {}
    with torch.no_grad():
        for n in settings:
            set_threads(n, blas)
            res_mv[f"{n} thread{'s' if n > 1 else ''}"] = run(matvec, args.repeats)
            res_pf[f"{n} thread{'s' if n > 1 else ''}"] = run(prefill, max(5, args.repeats // 20))
    set_threads(default, blas)

    print(f"W: ({O}, {I}) ternary, batch 1; medians of {args.repeats} repeats; ratio = time / packed "
          f"kernel; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus"
          + ("" if blas else " (OpenBLAS threads not settable: numpy uses its default)"))
    if settings:
        w_bytes = {"packed kernel": packed.nbytes, "packed layer": packed.nbytes}

        def of_bandwidth(name, seconds):
            return w_bytes.get(name, 4 * O * I) / seconds / harness.copy_bandwidth()

        def of_gemm(name, seconds):
            return 2 * args.tokens * O * I / seconds / harness.gemm_flops()

        print(harness.limits_line())
        table("y = W x (generation)", res_mv, fraction=of_bandwidth, unit="of copy bw")
        table(f"Y = X W^T, {args.tokens} tokens (prefill)", res_pf, fraction=of_gemm, unit="of f32 GEMM")
    if args.cuda:
        cuda_table(packed, O, w_f32, x, xs, xq, xsq, args.repeats)
    n = O * I
    sizes = (("float32", 4 * n), ("bfloat16", 2 * n), ("int8", n), ("packed 2-bit + scale", packed.nbytes + 4),
             ("log2(3) bits (entropy bound)", math.ceil(n * math.log2(3) / 8)))
    harness.table(["", "bytes", "float32 / this"], [(name, f"{size:,d}", f"{4 * n / size:.2f}") for name, size in sizes],
                  title=f"\nbytes of W ({O} x {I})", indent="  ")


if __name__ == "__main__":
    main()
