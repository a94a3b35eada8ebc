"""Hot loops, each in up to three forms with one set of function names, and the ONE dispatch between them.

    kernels/<op>.py        the NumPy reference (`<name>_reference`: the specification, written once) and the
                           Numba CPU kernel (`<name>`)
    kernels/<op>_cuda.py   the numba.cuda kernel (`<name>`, the same signature)

`pick(op, name, like)` (or `select(op, like).name`) returns the function to run on arrays like `like`: the CUDA kernel for GPU arrays
(CuPy, numba device arrays, the CUDA simulator's arrays), the Numba kernel for NumPy arrays. Nothing
else in minillm tests for CuPy or Numba to choose an implementation. Tests force one form for every
call with `forced("reference")` (the NumPy reference on host arrays) or `forced("cuda")` (the CUDA
kernels on host arrays, i.e. in Numba's CUDA simulator), for every op or for the ops they name.

The ops: gelu, layernorm, softmax (causal, rows, cross-entropy), embedding (backward), scan (Mamba's
selective scan), wkv (RWKV), moe (dispatch / combine / SwiGLU), ternary (packed matmul), ternary_quant (BitNet's
weight / activation quantisers of training; its CUDA form runs the references on CuPy), adamw (update).
The tokenizer's BPE kernels (bpe.py, bpe_train.py) are host-only and called directly.
This package imports nothing else of minillm but minillm.arrays.
"""

import contextlib
import importlib

IMPLEMENTATIONS = ("reference", "numba", "cuda")
_forced = None


def on_gpu(a):
    """True for arrays in GPU memory: CuPy and numba device arrays (__cuda_array_interface__) and the CUDA
    simulator's arrays (copy_to_host)."""
    return hasattr(a, "__cuda_array_interface__") or hasattr(a, "copy_to_host")


def implementation_for(like, op=None):
    """"reference", "numba" or "cuda": the form `pick` chooses for op `op` on arrays like `like`."""
    if _forced is not None and (_forced[1] is None or op in _forced[1]):
        return _forced[0]
    return "cuda" if on_gpu(like) else "numba"


class _Reference:
    """A kernel module seen through its NumPy reference: `.forward` is the module's `forward_reference`."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name + "_reference")


def select(op, like):
    """Kernel `op`'s functions for arrays like `like`, under the kernels' names (e.g. select("moe", x).combine)."""
    impl = implementation_for(like, op)
    if impl == "cuda":
        return importlib.import_module(f"minillm.kernels.{op}_cuda")
    module = importlib.import_module(f"minillm.kernels.{op}")
    return _Reference(module) if impl == "reference" else module


def pick(op, name, like):
    """The function `name` of kernel `op` for arrays like `like`, e.g. pick("layernorm", "forward", x)."""
    return getattr(select(op, like), name)


@contextlib.contextmanager
def forced(impl, ops=None):
    """Within the block, `pick` returns the `impl` form ("reference", "numba" or "cuda") for every op, or for
    the ops named in `ops` (e.g. ("layernorm", "gelu"))."""
    global _forced
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    saved, _forced = _forced, (impl, None if ops is None else frozenset(ops))
    try:
        yield
    finally:
        _forced = saved
