"""kernels/layernorm.py: the Numba LayerNorm (forward, backward, rows) equals the NumPy reference (and ops)."""

import numpy as np
import pytest

from minillm.kernels import layernorm as layernorm_kernels
from minillm.nn import ops


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 2e-5)])
@pytest.mark.parametrize("C", [13, 64])        # 13: the tail after the 8-lane partial sums
def test_layernorm_kernel_matches_reference_and_ops(dtype, tol, C):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 7, C)) * 3 + 1).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    y, cache = layernorm_kernels.forward(x, w, b)
    y_ref, cache_ref = layernorm_kernels.forward_reference(x, w, b)
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(y, ops.layernorm_forward(x, w, b)[0], rtol=tol, atol=tol)
    np.testing.assert_array_equal(layernorm_kernels.rows(x, w, b), y)
    dy = rng.standard_normal(x.shape).astype(dtype)
    got = layernorm_kernels.backward(dy, cache)
    assert all(a.dtype == dtype for a in got) and got[0].shape == x.shape
    for a, r, o in zip(got, layernorm_kernels.backward_reference(dy, cache_ref),
                       ops.layernorm_backward(dy, ops.layernorm_forward(x, w, b)[1])):
        np.testing.assert_allclose(a, r, rtol=tol, atol=tol * np.abs(r).max())
        np.testing.assert_allclose(a, o, rtol=tol, atol=tol * np.abs(o).max())
    np.testing.assert_array_equal(layernorm_kernels.backward(dy, cache)[0], got[0])
