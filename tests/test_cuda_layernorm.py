"""numba.cuda LayerNorm kernels (kernels/layernorm_cuda.py) against the NumPy reference
(kernels/layernorm.py), on tiny shapes: on a real GPU when there is one, else in Numba's CUDA simulator
(set here too, before numba is first imported, in case this file runs on its own)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from minillm.nn import ops  # noqa: E402
from minillm.kernels import layernorm as ref, layernorm_cuda as lc, softmax_cuda  # noqa: E402


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, fast_simulator_threads):
    """Blocks of 4 threads (tiny rows are still longer than a block) and at most 2 row groups in the
    backward (several rows per group, the last group short). One test keeps the real sizes. The
    simulator runs a block's threads as Python threads and polls them at every barrier: a short GIL
    switch interval makes that ~8x faster."""
    monkeypatch.setattr(softmax_cuda, "MIN_THREADS", 4)
    monkeypatch.setattr(softmax_cuda, "MAX_THREADS", 4)
    monkeypatch.setattr(lc, "ROW_GROUPS", 2)


def _inputs(rng, shape, dtype):
    C = shape[-1]
    x = (2 * rng.normal(size=shape) + 0.5).astype(dtype)
    return x, rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype), rng.normal(size=shape).astype(dtype)


# float64: the same operations as the reference, sums in another fixed order (tree over the row; groups
# of rows for dw, db): a few ulps relative to the terms summed, so the bound is rtol (|want| + max |want|).
# float32 against the float32 reference: a few float32 ulps likewise.
RTOL = {np.float64: 1e-13, np.float32: 1e-5}


def assert_close(got, want, rtol):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max(initial=1e-300)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (2, 3, 9)])
def test_forward_backward_match_reference(dtype, shape):
    x, w, b, dy = _inputs(np.random.default_rng(shape[-1]), shape, dtype)
    y0, c0 = ref.forward_reference(x, w, b)
    y1, c1 = lc.forward(x, w, b)
    assert isinstance(y1, np.ndarray) and y1.dtype == dtype and y1.shape == shape
    assert c1[0].shape == shape and c1[1].shape == shape[:-1] + (1,) and c1[2] is w
    for got, want in zip((y1,) + c1[:2], (y0,) + c0[:2]):
        assert got.dtype == dtype
        assert_close(got, want, RTOL[dtype])
    for got, want in zip(lc.backward(dy, c1), ref.backward_reference(dy, c0)):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, RTOL[dtype])


def test_real_block_sizes(monkeypatch):
    """The module's own sizes: C = 40 in one block of 64 threads, one row per group."""
    monkeypatch.undo()   # (the switch interval stays short: it is not a monkeypatch)
    x, w, b, dy = _inputs(np.random.default_rng(0), (3, 40), np.float64)
    y0, c0 = ref.forward_reference(x, w, b)
    y1, c1 = lc.forward(x, w, b)
    assert_close(y1, y0, 1e-13)
    for got, want in zip(lc.backward(dy, c1), ref.backward_reference(dy, c0)):
        assert_close(got, want, 1e-13)


def test_caches_interchange():
    """The CUDA backward takes ops' and the Numba kernel's caches; ops' backward takes the CUDA one."""
    x, w, b, dy = _inputs(np.random.default_rng(1), (4, 6), np.float64)
    _, c_ops = ops.layernorm_forward(x, w, b)
    _, c_numba = ref.forward(x, w, b)
    _, c_cuda = lc.forward(x, w, b)
    want = ops.layernorm_backward(dy, c_ops)
    for got in (lc.backward(dy, c_ops), lc.backward(dy, c_numba),
                ops.layernorm_backward(dy, c_cuda), ref.backward(dy, c_cuda)):
        for g, w_ in zip(got, want):
            assert_close(g, w_, 1e-13)


def test_device_arrays_in_device_out():
    x, w, b, dy = _inputs(np.random.default_rng(2), (2, 2, 5), np.float32)
    y0, c0 = ref.forward_reference(x, w, b)
    y1, c1 = lc.forward(*(cuda.to_device(a) for a in (x, w, b)))
    assert all(lc.array_kind(a) == "device" for a in (y1,) + c1)
    assert tuple(y1.shape) == x.shape and tuple(c1[1].shape) == (2, 2, 1)
    assert_close(y1.copy_to_host(), y0, 1e-5)
    grads = lc.backward(cuda.to_device(dy), c1)
    for got, want in zip(grads, ref.backward_reference(dy, c0)):
        assert lc.array_kind(got) == "device" and tuple(got.shape) == want.shape
        assert_close(got.copy_to_host(), want, 1e-5)


def test_deterministic():
    x, w, b, dy = _inputs(np.random.default_rng(3), (7, 11), np.float32)
    (y1, c1), (y2, c2) = lc.forward(x, w, b), lc.forward(x, w, b)
    assert np.array_equal(y1, y2) and np.array_equal(c1[1], c2[1])
    for g1, g2 in zip(lc.backward(dy, c1), lc.backward(dy, c2)):
        assert np.array_equal(g1, g2)


def test_bad_input_raises():
    x, w, b, dy = _inputs(np.random.default_rng(4), (2, 3), np.float64)
    with pytest.raises(ValueError, match="w, b"):
        lc.forward(x, w[:2], b)
    with pytest.raises(ValueError, match="float32 or float64"):
        lc.forward(x.astype(np.int64), w, b)
    _, cache = lc.forward(x, w, b)
    with pytest.raises(ValueError, match="dy is"):
        lc.backward(dy[:1], cache)
