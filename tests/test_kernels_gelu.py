"""kernels/gelu.py: the Numba GELU equals the NumPy reference (and ops), float32 and float64, deterministic."""

import numpy as np
import pytest

from minillm.kernels import gelu as gelu_kernels
from minillm.nn import ops


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-15), (np.float32, 1e-6)])
def test_gelu_kernel_matches_reference_and_ops(dtype, tol):
    x = (np.random.default_rng(9).standard_normal((5, 333)) * 3).astype(dtype)
    y, cache = gelu_kernels.forward(x)
    y_ref, cache_ref = gelu_kernels.forward_reference(x)
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(y, ops.gelu_forward(x)[0], rtol=tol, atol=tol)
    dy = np.random.default_rng(10).standard_normal(x.shape).astype(dtype)
    dx = gelu_kernels.backward(dy, cache)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(dx, gelu_kernels.backward_reference(dy, cache_ref), rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, ops.gelu_backward(dy, ops.gelu_forward(x)[1]), rtol=tol, atol=tol)
    np.testing.assert_array_equal(gelu_kernels.forward(x)[0], y)    # deterministic
