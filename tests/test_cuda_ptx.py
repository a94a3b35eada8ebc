"""Every numba.cuda kernel compiles for a real GPU (PTX for compute capability 9.0, float32 and float64).

The simulator tests run the kernels as plain Python, so they miss what only the CUDA compiler rejects
(numba 0.66-0.68, for one, cannot compile the built-in two-argument max/min in a kernel: numba#10753).
This test compiles each kernel with the argument types its host wrapper passes, in a subprocess without
the simulator. It needs NVVM (the CUDA toolkit's compiler library; no GPU or driver): where there is none
it is skipped, and says why.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
from numba import cuda, types as T
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    sys.exit(77)
import types
import numba.cuda.dispatcher
# device functions and shared arrays are compiled for the current device's compute capability; without
# a driver there is no current device: name one (the same 9.0 the kernels are compiled for)
numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
def _probe(a):
    a[0] = 1.0
try:      # the toolchain itself (NVVM, and NVRTC for numba-cuda) must work before the kernels are judged
    cuda.compile_ptx(_probe, (T.Array(T.float32, 1, "C"),), cc=(9, 0))
except Exception as e:
    print(" | ".join(str(e).strip().splitlines()[:2]))
    sys.exit(77)
from minillm.kernels import (adamw_cuda, embedding_cuda, gelu_cuda, layernorm_cuda, moe_cuda, scan_cuda,
                             softmax_cuda, ternary_cuda, wkv_cuda)

i32, i64 = T.int32, T.int64
def arr(dtype, ndim):
    return T.Array(dtype, ndim, "C")

def kernels(f):
    a1, a2, a3, a4 = (arr(f, n) for n in (1, 2, 3, 4))
    l1, l2 = arr(i64, 1), arr(i64, 2)
    name = str(f)
    s_fwd, s_bwd = scan_cuda._kernels(name)
    sm, sm_bwd, ce_rows, ce_bwd = softmax_cuda._kernels(name)
    ln_fwd, ln_bwd = layernorm_cuda._kernels(name)
    return {
        "scan forward": (s_fwd, (a3, a3, a2, a3, a3, a1, i64, a3, a4, f)),
        "scan backward": (s_bwd, (a3, a3, a2, a3, a3, a1, a3, i64, a4, a3, a3, a3, a4, a4, a2, f)),
        "scan sum": (scan_cuda._sum_middle_kernel, (a3, a2, f)),
        "wkv forward": (wkv_cuda._forward_kernel, (a3, a3, a1, a1, a2, a2, a2, a3, a3, a3, a2, a2, a2, f)),
        "wkv backward": (wkv_cuda._backward_kernel, (a3, a3, a1, a1, a3, a3, a3, a3, a3, a3, a2, a2, f, f)),
        "wkv sum": (wkv_cuda._sum_rows_kernel, (a2, a1)),
        "moe count": (moe_cuda._chunk_count_kernel, (l1, i64, l2)),
        "moe scan": (moe_cuda._scan_kernel, (l2, l2, l1)),
        "moe place": (moe_cuda._place_kernel, (l1, i64, l2, l1, l2)),
        "moe gather": (moe_cuda._gather_kernel, (a2, l1, i64, a2)),
        "moe combine": (moe_cuda._combine_kernel, (a2, l2, a2, a2)),
        "moe scatter": (moe_cuda._scatter_weighted_kernel, (a2, l2, a2, a2)),
        "moe dot": (moe_cuda._dot_kernel, (a2, a2, l2, a2)),
        "swiglu": (moe_cuda._swiglu_kernel, (a1, a1, a1, f)),
        "swiglu backward": (moe_cuda._swiglu_backward_kernel, (a1, a1, a1, a1, a1, f)),
        "softmax": (sm, (a2, i64, i64, f)),
        "causal softmax backward": (sm_bwd, (a2, a2, f)),
        "cross-entropy rows": (ce_rows, (a2, l1, i64, a1, a1, a1, arr(i32, 1), f)),
        "cross-entropy backward": (ce_bwd, (a2, l1, i64, a1, a1, f, a2, f)),
        "cross-entropy total": (softmax_cuda._ce_total, (a1, arr(i32, 1), arr(T.float64, 1))),
        "layernorm forward": (ln_fwd, (a2, a1, a1, f, f, a2, a2, a2, f)),
        "layernorm backward": (ln_bwd, (a2, a2, a2, a1, f, i64, a2, a2, a2, f)),
        "layernorm sum": (layernorm_cuda._sum_groups, (a2, a2, a1, a1)),
        "gelu forward": (gelu_cuda._forward_kernel, (a1, a1, a1, f, f, f, f)),
        "gelu backward": (gelu_cuda._backward_kernel, (a1, a1, a1, a1, f, f, f, f)),
        "embedding backward": (embedding_cuda._add_runs_kernel, (a2, l1, l1, a2)),
        "adamw": (adamw_cuda._update_kernel, (a1, a1, a1, a1) + (f,) * 7),
    }

jobs = [(str(f) + " " + n, k, sig) for f in (T.float32, T.float64) for n, (k, sig) in kernels(f).items()]
jobs += [("ternary bytes", ternary_cuda._packed_rows_kernel, (arr(T.uint8, 2), arr(T.int8, 2), arr(i32, 2), i64)),
         ("ternary words", ternary_cuda._packed_words_kernel, (arr(T.uint32, 2), arr(i32, 2), arr(i32, 2), i64))]
failed = 0
for name, kernel, sig in jobs:
    try:
        cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    except Exception as e:
        failed += 1
        print(f"{name}: " + " | ".join(str(e).strip().splitlines()[:3]))
print(f"compiled {len(jobs) - failed} of {len(jobs)} kernels")
sys.exit(1 if failed else 0)
"""


def test_every_cuda_kernel_compiles_to_ptx():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip("no working CUDA compiler toolchain (NVVM, and NVRTC for numba-cuda): kernels not "
                    "compiled: " + proc.stdout.strip()[-300:])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
