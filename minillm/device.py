"""Where a model's arrays live: "cpu" (NumPy) or "cuda" (CuPy arrays: cuBLAS matrix products, CuPy
elementwise ops, and the numba.cuda kernels of minillm/kernels/*_cuda.py, which take CuPy arrays as they are).

Every forward/backward takes its array module from its inputs (ops.array_module), so moving the params and
the batches is all it takes. CuPy is optional: `pip install "minillm[cuda]"` (cupy-cuda13x; use
cupy-cuda12x for a CUDA 12 driver).
"""

import numpy as np

from minillm import arrays

DEVICES = ("cpu", "cuda")


def array_module_for(device, index=None):
    """"cpu" -> numpy, "cuda" -> cupy; a clear ValueError when no usable GPU is there. index: for cuda, make
    GPU `index` (modulo the number of GPUs) the current one (one GPU per MPI rank of a machine)."""
    if device == "cpu":
        return np
    if device != "cuda":
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    try:
        import cupy
    except ImportError:
        raise ValueError("--device cuda needs CuPy and an NVIDIA GPU: pip install \"minillm[cuda]\"") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        count = 0
    if count == 0:
        raise ValueError("--device cuda: CuPy is installed but no CUDA GPU is visible")
    if index is not None:
        cupy.cuda.Device(index % count).use()
    return cupy


def to_device(tree, xp):
    """Copy every array of a nested dict to array module xp (numbers and other leaves stay as they are)."""
    if isinstance(tree, dict):
        return {k: to_device(v, xp) for k, v in tree.items()}
    if hasattr(tree, "dtype") and hasattr(tree, "shape"):
        return xp.asarray(tree)
    return tree


to_host = arrays.to_host
