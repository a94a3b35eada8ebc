"""kernels/embedding.py: the Numba embedding backward equals the NumPy reference (repeated ids accumulate)."""

import numpy as np
import pytest

from minillm.kernels import embedding as embedding_kernels
from minillm.nn import ops


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_kernel_matches_reference(dtype):
    rng = np.random.default_rng(12)
    ids = rng.integers(0, 5, (3, 7))
    ids[0, :4] = 2                                  # repeats accumulate
    dy = rng.standard_normal((3, 7, 6)).astype(dtype)
    ref = embedding_kernels.backward_reference(dy, ids, (5, 6))
    got = embedding_kernels.backward(dy, ids, (5, 6))
    assert got.dtype == dtype
    np.testing.assert_allclose(got, ref, rtol=1e-6 if dtype == np.float32 else 1e-15, atol=1e-6)
    np.testing.assert_allclose(got, ops.embedding_backward(dy, ops.embedding_forward(ids, ref)[1]),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        embedding_kernels.backward(dy, ids + 3, (5, 6))
