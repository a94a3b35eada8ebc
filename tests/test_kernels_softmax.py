"""kernels/softmax.py: the Numba causal softmax and its backward equal the NumPy reference; bad input."""

import numpy as np
import pytest

from minillm.kernels import softmax as sk


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-14), (np.float32, 1e-6)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 5), (1, 2, 33, 33)])
def test_softmax_kernels_match_reference(dtype, tol, shape):
    rng = np.random.default_rng(6)
    s = (rng.standard_normal(shape) * 4).astype(dtype)
    ref = sk.causal_reference(s.copy())
    got = sk.causal(s.copy())
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    assert (np.triu(got[0, 0], 1) == 0).all()
    dp = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_allclose(sk.causal_backward(dp.copy(), got),
                               sk.causal_backward_reference(dp.copy(), got), rtol=tol, atol=tol)
    # deterministic: same input, same bits
    np.testing.assert_array_equal(sk.causal(s.copy()), got)


def test_softmax_kernel_rejects_bad_input():
    with pytest.raises(ValueError):
        sk.causal(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError):
        sk.causal(np.zeros((2, 4, 4))[:, ::2, ::2].copy().T)
