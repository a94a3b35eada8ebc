"""Host side of the numba.cuda kernels: accept NumPy, CuPy or numba device arrays, return the same kind.

The kind of a call is that of its first array argument:
    "host"   NumPy (or anything array-like): inputs are copied to the GPU, results copied back;
    "cupy"   CuPy: inputs become contiguous CuPy arrays, results are CuPy arrays;
    "device" numba device arrays (anything with __cuda_array_interface__, or the CUDA simulator's
             arrays, which only have copy_to_host): results are numba device arrays.
"""

import numpy as np
from numba import cuda


def is_numba_device(x):
    # (the CUDA simulator's arrays have copy_to_host but no __cuda_array_interface__)
    return hasattr(x, "copy_to_host") or hasattr(x, "__cuda_array_interface__")


def array_kind(x):
    """"cupy", "device" or "host" (see the module doc)."""
    if type(x).__module__.startswith("cupy"):
        return "cupy"
    return "device" if is_numba_device(x) else "host"


def empty(kind, shape, dtype):
    """An uninitialised GPU array: CuPy for kind "cupy", else a numba device array."""
    if kind == "cupy":
        import cupy

        return cupy.empty(shape, dtype)
    return cuda.device_array(shape, dtype)


def on_device(x, kind, dtype=None, check=None):
    """x as a C-contiguous GPU array of `dtype` (None: x's own), with no copy when it already is one.

    A numba device array is not converted: with `check` (the caller's name, for the message) it must
    already be C-contiguous and of `dtype`, else ValueError; without, it is passed on as it is."""
    if kind == "cupy":
        import cupy

        return cupy.ascontiguousarray(cupy.asarray(x, dtype=dtype))
    if array_kind(x) == "device":  # (also in a host call: it stays on the GPU)
        if check and ((dtype is not None and np.dtype(x.dtype) != dtype) or not x.is_c_contiguous()):
            raise ValueError(f"{check}: device arrays must be C-contiguous and all of one dtype")
        return x
    return cuda.to_device(np.ascontiguousarray(np.asarray(x), dtype=dtype))


def float_dtype(a, name):
    """a's dtype, which must be float32 or float64 (the kernels are compiled for those); else ValueError
    naming the caller."""
    dtype = np.dtype(a.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: needs float32 or float64 arrays, got {dtype}")
    return dtype


def to_kind(x, kind):
    """A result computed on the GPU, as the caller's kind: copied to a NumPy array for "host"."""
    return x.copy_to_host() if kind == "host" else x
