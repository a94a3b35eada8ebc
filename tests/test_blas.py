"""nn/blas.py: the threaded batched matmul equals np.matmul (into `out`, any strides), and
single_threaded_blas restores OpenBLAS's thread count."""

import numpy as np

from minillm.nn import blas


def test_bmm_equals_matmul_and_writes_into_out():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4, 5, 6)), rng.standard_normal((3, 4, 6, 7))
    np.testing.assert_allclose(blas.bmm(a, b), a @ b, rtol=1e-13, atol=1e-13)
    out = np.empty((3, 7, 4, 5)).transpose(0, 2, 3, 1)           # a strided destination
    assert blas.bmm(a, b, out=out) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-13, atol=1e-13)
    one = rng.standard_normal((1, 4, 5, 6))                        # batch 1: the heads are split instead
    np.testing.assert_allclose(blas.bmm(one, b[:1]), one @ b[:1], rtol=1e-13, atol=1e-13)


def test_single_threaded_blas_restores_the_thread_count():
    api = blas._openblas()
    before = api[0]() if api else None
    with blas.single_threaded_blas():
        if api:
            assert api[0]() == 1
    assert (api[0]() if api else None) == before
