"""kernels/adamw.py: the one-pass Numba update against the NumPy reference (torch's op order), bit for bit."""

import numpy as np
import pytest
from boundscheck import assert_runs_with_boundscheck

from minillm.kernels import adamw

HYPER = dict(beta1=0.9, beta2=0.95, step_size=3e-3 / (1 - 0.9 ** 3), bias_correction2_sqrt=(1 - 0.95 ** 3) ** 0.5,
             eps=1e-8)


def _state(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p, g, m = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    v = (rng.standard_normal(shape) ** 2 * 1e-3).astype(dtype)
    v.reshape(-1)[:3] = 0.0                    # a moment still zero: the update divides by eps alone
    return p, g, m, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay", [1.0, 1.0 - 3e-3 * 0.1])
def test_the_kernel_gives_the_references_bits(dtype, decay):
    """Three steps on 70,000 elements (several parallel blocks and a ragged last one), with and without decay:
    p, m and v equal the reference's exactly (the same float ops in the same order, in the arrays' dtype)."""
    ours, ref = _state((350, 200), dtype), _state((350, 200), dtype)
    for _ in range(3):
        adamw.update(*ours, decay, **HYPER)
        adamw.update_reference(*ref, decay, **HYPER)
    for a, b, name in zip(ours, ref, "pgmv"):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert not np.array_equal(ours[0], _state((350, 200), dtype)[0])   # the step did move p


def test_strided_or_mixed_arrays_take_the_reference():
    """A transposed gradient (not C-contiguous) still updates correctly, through the reference."""
    ours, ref = _state((40, 30), np.float32), _state((40, 30), np.float32)
    g_t = np.ascontiguousarray(ours[1].T).T                       # same values, Fortran order
    adamw.update(ours[0], g_t, ours[2], ours[3], 1.0, **HYPER)
    adamw.update_reference(*ref, 1.0, **HYPER)
    for a, b in zip((ours[0], ours[2], ours[3]), (ref[0], ref[2], ref[3])):
        np.testing.assert_array_equal(a, b)


def test_the_kernel_with_boundscheck_on_empty_and_one_element_arrays(tmp_path):
    code = """
import numpy as np
from minillm.kernels import adamw
for n in (0, 1, 2, adamw.BLOCK + 1):
    p, g, m, v = (np.full(n, 0.5, np.float32) for _ in range(4))
    adamw.update(p, g, m, v, 0.999, 0.9, 0.95, 1e-3, 0.5, 1e-8)
    assert p.shape == (n,) and np.isfinite(p).all()
print("bounds ok")
"""
    assert_runs_with_boundscheck(code, tmp_path)
