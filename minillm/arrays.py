"""Where an array lives: the array module of an array (numpy or cupy) and copies to the host.
Imports nothing else of minillm; every module asks here instead of testing for CuPy itself."""

import numpy as np


def array_module(x):
    """numpy for host arrays, cupy for CuPy arrays (cupy is imported only if x is one of its arrays)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_host(a):
    """A NumPy array (CuPy arrays and numba device arrays are copied from the GPU)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):
        return a.get()
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)
