"""kernels/cuda_arrays.py: the kind of an array, GPU copies that keep device arrays where they are, the
float dtype check (Numba's CUDA simulator without a GPU)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from minillm.kernels import cuda_arrays as ca  # noqa: E402


def test_kinds_and_round_trips():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = cuda.to_device(a)
    assert ca.array_kind(a) == "host" and ca.array_kind(d) == "device"
    assert ca.on_device(d, "device") is d                          # no copy of a device array
    moved = ca.on_device(a.T, "host", np.float64)                  # a strided host array: contiguous copy
    assert np.array_equal(ca.to_kind(moved, "host"), a.T.astype(np.float64))
    assert ca.to_kind(d, "device") is d
    assert tuple(ca.empty("device", (4,), np.float32).shape) == (4,)


def test_checks_name_the_caller():
    with pytest.raises(ValueError, match="my kernel: needs float32 or float64"):
        ca.float_dtype(np.zeros(3, np.int32), "my kernel")
    assert ca.float_dtype(np.zeros(3, np.float32), "x") == np.float32
    with pytest.raises(ValueError, match="my kernel: device arrays must be C-contiguous"):
        ca.on_device(cuda.to_device(np.zeros(3, np.float32)), "device", np.float64, check="my kernel")
