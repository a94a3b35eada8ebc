"""numba.cuda GELU kernels (kernels/gelu_cuda.py) against the NumPy reference (kernels/gelu.py), on tiny
shapes: on a real GPU when there is one, else in Numba's CUDA simulator (set here too, before numba is
first imported, in case this file runs on its own)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from minillm.nn import ops  # noqa: E402
from minillm.kernels import gelu as ref, gelu_cuda as gc  # noqa: E402


@pytest.fixture(autouse=True)
def small_grid(monkeypatch, fast_simulator_threads):
    """Blocks of 8 threads, at most 3 blocks: the grid-stride loop wraps around on tiny arrays. (A short
    GIL switch interval speeds up the simulator, which runs every thread as a Python thread.)"""
    monkeypatch.setattr(gc, "THREADS", 8)
    monkeypatch.setattr(gc, "MAX_BLOCKS", 3)


# Same operations in the same order as the reference; libdevice's tanh is within 1-2 ulps of NumPy's and
# the GPU compiler may fuse multiply-adds. For x << 0, t -> -1 and 1 + t, 1 - t^2 cancel: an error of a few
# ulps of 1 in t becomes an absolute error of ~|x| ulps in y and ~|x|^3 ulps in dx, hence the bounds:
# |got - want| <= rtol (|want| + scale), scale = |x| for y, 1 for t, |dy| (1 + |x|)^3 for dx.
RTOL = {np.float64: 1e-14, np.float32: 4e-6}


def assert_close(got, want, rtol, scale):
    err = np.abs(got.astype(np.float64) - want) - rtol * (np.abs(want) + scale)
    assert got.shape == want.shape and (err <= 0).all(), f"worst excess {err.max(initial=0)}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2, 0)])
def test_forward_backward_match_reference(dtype, shape):
    rng = np.random.default_rng(len(shape))
    x = (3 * rng.normal(size=shape)).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    y0, (_, t0) = ref.forward_reference(x)
    y1, c1 = gc.forward(x)
    assert isinstance(y1, np.ndarray) and y1.dtype == dtype
    assert c1[0] is x and c1[1].dtype == dtype
    rtol = RTOL[dtype]
    assert_close(y1, y0, rtol, np.abs(x))
    assert_close(c1[1], t0, rtol, 1.0)
    dx1 = gc.backward(dy, c1)
    assert dx1.dtype == dtype
    assert_close(dx1, ref.backward_reference(dy, (x, t0)), rtol, np.abs(dy) * (1 + np.abs(x)) ** 3)


def test_caches_interchange():
    """The CUDA backward takes ops' / the Numba kernel's cache and vice versa (host arrays)."""
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    _, c_ops = ops.gelu_forward(x)
    _, c_cuda = gc.forward(x)
    want = ops.gelu_backward(dy, c_ops)
    np.testing.assert_allclose(gc.backward(dy, c_ops), want, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ops.gelu_backward(dy, c_cuda), want, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ref.backward(dy, c_cuda), want, rtol=1e-14, atol=1e-15)


def test_device_arrays_in_device_out():
    rng = np.random.default_rng(2)
    x, dy = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    y0, c0 = ref.forward_reference(x)
    y1, c1 = gc.forward(cuda.to_device(x))
    assert gc.array_kind(y1) == "device" and gc.array_kind(c1[1]) == "device"
    np.testing.assert_allclose(y1.copy_to_host(), y0, rtol=1e-14, atol=1e-16)
    dx1 = gc.backward(cuda.to_device(dy), c1)
    assert gc.array_kind(dx1) == "device"
    np.testing.assert_allclose(dx1.copy_to_host(), ref.backward_reference(dy, c0), rtol=1e-14, atol=1e-16)


def test_deterministic():
    x = np.random.default_rng(3).normal(size=(50,)).astype(np.float32)
    (y1, c1), (y2, c2) = gc.forward(x), gc.forward(x)
    assert np.array_equal(y1, y2) and np.array_equal(c1[1], c2[1])
    assert np.array_equal(gc.backward(x, c1), gc.backward(x, c2))


def test_bad_input_raises():
    x = np.zeros((2, 3))
    _, cache = gc.forward(x)
    with pytest.raises(ValueError, match="dy is"):
        gc.backward(np.zeros((3, 2)), cache)
    with pytest.raises(ValueError, match="float32 or float64"):
        gc.forward(np.zeros(3, dtype=np.int32))
