"""kernels/gelu.py: the Numba GELU against the NumPy reference and against a long-double evaluation of the
formula (float32 and float64), the tails and special values, and determinism."""

import numpy as np
import pytest

from minillm.kernels import gelu as gelu_kernels
from minillm.nn import ops


def _truth(x, dy):
    """y and dx of the tanh GELU in long double (80-bit on x86): the yardstick for both forms."""
    xl = x.astype(np.longdouble)
    c, a = np.longdouble(gelu_kernels.C), np.longdouble(gelu_kernels.A)
    u = c * (xl + a * xl ** 3)
    t = np.tanh(u)
    y = xl / (1 + np.exp(-2 * u))           # = x (1 + t) / 2 without its cancellation in the negative tail
    dx = dy.astype(np.longdouble) * ((1 + t) / 2 + xl * (1 - t * t) * (c * (1 + 3 * a * xl * xl)) / 2)
    return y, dx


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_kernel_is_as_accurate_as_the_reference(dtype):
    """Absolute error within 2x the reference's own plus 2 eps per unit of |x| (both compute t = tanh u
    first, and 1 - t^2 cancels where |u| is large); the kernel's y also keeps its relative accuracy in the
    negative tail (x sigmoid(2u)), where the reference's x (1 + t) / 2 loses every digit."""
    eps = np.finfo(dtype).eps
    x = (np.random.default_rng(9).standard_normal((5, 333)) * 3).astype(dtype)
    dy = np.random.default_rng(10).standard_normal(x.shape).astype(dtype)
    y_true, dx_true = _truth(x, dy)
    y, cache = gelu_kernels.forward(x)
    y_ref, cache_ref = gelu_kernels.forward_reference(x)
    dx, dx_ref = gelu_kernels.backward(dy, cache), gelu_kernels.backward_reference(dy, cache_ref)
    assert y.dtype == dx.dtype == dtype
    scale = 2 * eps * np.maximum(1, np.abs(x))
    assert (np.abs(y - y_true) <= 2 * np.abs(y_ref - y_true).max() + scale).all()
    assert (np.abs(dx - dx_true) <= 2 * np.abs(dx_ref - dx_true).max() + scale).all()
    tail = x < -2
    rel = np.abs(y - y_true)[tail] / np.abs(y_true[tail])
    assert rel.max() <= 256 * eps, rel.max()
    np.testing.assert_array_equal(ops.gelu_forward(x)[0], y)           # ops runs the kernel
    np.testing.assert_array_equal(ops.gelu_backward(dy, cache), dx)
    np.testing.assert_array_equal(gelu_kernels.forward(x)[0], y)       # deterministic


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_kernel_special_values(dtype):
    x = np.array([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e30, -1e30, np.inf, -np.inf, np.nan], dtype)
    with np.errstate(all="ignore"):
        y, (_, t) = gelu_kernels.forward(x)
        y_ref, (_, t_ref) = gelu_kernels.forward_reference(x)
    # tanh: +-1 exactly in the tails, NaN for NaN; near 0 within an absolute eps (what 1 + t and 1 - t^2 use)
    np.testing.assert_allclose(t, t_ref, rtol=0, atol=np.finfo(dtype).eps)
    np.testing.assert_array_equal(t[4:], t_ref[4:])
    np.testing.assert_array_equal(y[2:], y_ref[2:])         # GELU(+-tiny) = x / 2, tails exact, inf, NaN
    assert y[0] == 0 and y[1] == 0


def test_gelu_kernel_empty_and_one_element():
    y, cache = gelu_kernels.forward(np.zeros(0, np.float32))
    assert y.shape == (0,) and gelu_kernels.backward(np.zeros(0, np.float32), cache).shape == (0,)
    y, cache = gelu_kernels.forward(np.array([[1.5]]))
    assert np.isclose(y[0, 0], gelu_kernels.forward_reference(np.array([[1.5]]))[0][0, 0], rtol=1e-15)
