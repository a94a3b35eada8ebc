"""arrays.py: the array module of an array and copies to the host."""

import numpy as np

from minillm import arrays


class FakeCupyArray:
    """Stands in for a CuPy array: its type's module starts with "cupy" and .get() copies to the host."""
    __module__ = "cupy._core.core"

    def __init__(self, a):
        self.a = a

    def get(self):
        return self.a.copy()


def test_numpy_arrays_stay_on_the_host():
    a = np.arange(3.0)
    assert arrays.array_module(a) is np
    assert arrays.to_host(a) is a
    assert np.array_equal(arrays.to_host([1, 2]), np.array([1, 2]))


def test_gpu_arrays_are_copied_to_the_host():
    a = np.arange(4.0)
    got = arrays.to_host(FakeCupyArray(a))
    assert isinstance(got, np.ndarray) and np.array_equal(got, a) and got is not a

    class FakeDeviceArray:        # numba's device arrays (and the CUDA simulator's) copy with copy_to_host
        def copy_to_host(self):
            return a + 1

    assert np.array_equal(arrays.to_host(FakeDeviceArray()), a + 1)
