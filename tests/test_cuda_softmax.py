"""numba.cuda softmax and cross-entropy kernels (kernels/softmax_cuda.py) against the NumPy references
(kernels/softmax.py, ops.cross_entropy_*), on tiny shapes: on a real GPU when there is one, else in Numba's
CUDA simulator (set here too, before numba is first imported, in case this file runs on its own)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from minillm.nn import ops  # noqa: E402
from minillm.kernels import softmax as ref, softmax_cuda as sc  # noqa: E402


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, fast_simulator_threads):
    """Blocks of 4 threads, so that tiny rows are still longer than a block (one test keeps the real
    sizes). The simulator runs a block's threads as Python threads and polls them at every barrier: a
    short GIL switch interval makes that ~8x faster."""
    monkeypatch.setattr(sc, "MIN_THREADS", 4)
    monkeypatch.setattr(sc, "MAX_THREADS", 4)


# float64: the same operations as the reference, sums in another (fixed) order, libdevice's exp within
# 1 ulp of NumPy's: a few ulps relative. float32 against the float32 reference: a few float32 ulps.
RTOL = {np.float64: 1e-14, np.float32: 2e-6}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("T", [1, 3, 9])
def test_causal_softmax_and_backward_match_reference(dtype, T):
    rng = np.random.default_rng(T)
    s = (3 * rng.normal(size=(2, T, T))).astype(dtype)
    dp = rng.normal(size=s.shape).astype(dtype)
    p0 = ref.causal_reference(s.copy())
    p1 = sc.causal(s)
    assert p1 is s and s.dtype == dtype
    np.testing.assert_allclose(p1, p0, rtol=RTOL[dtype], atol=0)
    assert not p1[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].any()  # exactly 0
    ds0 = ref.causal_backward_reference(dp.copy(), p0)
    ds1 = sc.causal_backward(dp, p1)
    assert ds1 is dp
    # dp - sum(dp p) cancels: absolute error relative to the largest gradient
    np.testing.assert_allclose(ds1, ds0, rtol=RTOL[dtype], atol=4 * RTOL[dtype] * np.abs(ds0).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1,), (3, 2), (2, 1, 11)])
def test_softmax_rows_matches_reference(dtype, shape):
    s = (3 * np.random.default_rng(len(shape)).normal(size=shape)).astype(dtype)
    p0 = ref.rows_reference(s.copy())
    assert sc.rows(s) is s
    np.testing.assert_allclose(s, p0, rtol=RTOL[dtype], atol=0)


def test_in_place_on_non_contiguous_host_array():
    a = np.random.default_rng(4).normal(size=(3, 8))
    keep = a[:, 5:].copy()
    view = a[:, :5]
    p0 = ref.rows_reference(view.copy())
    assert sc.rows(view) is view
    np.testing.assert_allclose(a[:, :5], p0, rtol=1e-14)
    assert np.array_equal(a[:, 5:], keep)


def _ce_inputs(rng, shape, V, dtype, ignore_index=-100):
    logits = (2 * rng.normal(size=shape + (V,))).astype(dtype)
    targets = rng.integers(0, V, shape)
    targets.reshape(-1)[1::3] = ignore_index
    return logits, targets


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, V, ignore_index", [((5,), 1, -100), ((2, 3), 7, -100), ((4,), 10, 3)])
def test_cross_entropy_matches_ops(dtype, shape, V, ignore_index):
    rng = np.random.default_rng(V)
    logits, targets = _ce_inputs(rng, shape, V, dtype, ignore_index)
    loss0, c0 = ops.cross_entropy_forward(logits, targets, ignore_index)
    loss1, c1 = sc.cross_entropy_forward(logits, targets, ignore_index)
    assert isinstance(loss1, float)
    # the loss is summed in float64 here, in the logits' dtype by ops: float32 agrees to its precision
    np.testing.assert_allclose(loss1, loss0, rtol=RTOL[dtype])
    d0 = ops.cross_entropy_backward(0.7, c0)
    d1 = sc.cross_entropy_backward(0.7, c1)
    assert isinstance(d1, np.ndarray) and d1.dtype == dtype and d1.shape == logits.shape
    # softmax - onehot cancels at the target: absolute error relative to the largest entry
    np.testing.assert_allclose(d1, d0, rtol=RTOL[dtype], atol=2 * RTOL[dtype] * np.abs(d0).max())
    ignored = (targets == ignore_index)
    assert not d1[ignored].any()


def test_real_block_sizes(monkeypatch):
    """The module's own block sizes (256 threads): rows longer than a block, V not a multiple of it."""
    monkeypatch.undo()   # (the switch interval stays short: it is not a monkeypatch)
    rng = np.random.default_rng(5)
    logits, targets = _ce_inputs(rng, (2,), 300, np.float64)
    targets[1] = 299
    loss0, c0 = ops.cross_entropy_forward(logits, targets)
    loss1, c1 = sc.cross_entropy_forward(logits, targets)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-14)
    np.testing.assert_allclose(sc.cross_entropy_backward(1.0, c1), ops.cross_entropy_backward(1.0, c0),
                               rtol=1e-14, atol=1e-16)
    s = rng.normal(size=(1, 3, 3))
    np.testing.assert_allclose(sc.causal(s.copy()), ref.causal_reference(s), rtol=1e-14)


def test_device_arrays_in_device_out():
    rng = np.random.default_rng(6)
    s = rng.normal(size=(2, 4, 4))
    ds = cuda.to_device(s)
    assert sc.causal(ds) is ds
    p0 = ref.causal_reference(s.copy())
    np.testing.assert_allclose(ds.copy_to_host(), p0, rtol=1e-14)
    dp = rng.normal(size=s.shape)
    ddp = cuda.to_device(dp)
    assert sc.causal_backward(ddp, ds) is ddp
    np.testing.assert_allclose(ddp.copy_to_host(), ref.causal_backward_reference(dp, p0),
                               rtol=1e-13, atol=1e-15)
    logits, targets = _ce_inputs(rng, (2, 3), 5, np.float32)
    loss0, c0 = ops.cross_entropy_forward(logits, targets)
    loss1, c1 = sc.cross_entropy_forward(cuda.to_device(logits), cuda.to_device(targets))
    d1 = sc.cross_entropy_backward(1.0, c1)
    assert sc.array_kind(d1) == "device" and tuple(d1.shape) == logits.shape
    np.testing.assert_allclose(loss1, loss0, rtol=2e-6)
    np.testing.assert_allclose(d1.copy_to_host(), ops.cross_entropy_backward(1.0, c0), rtol=2e-6, atol=1e-7)


def test_deterministic():
    rng = np.random.default_rng(7)
    s = rng.normal(size=(1, 9, 9)).astype(np.float32)
    assert np.array_equal(sc.causal(s.copy()), sc.causal(s.copy()))
    logits, targets = _ce_inputs(rng, (6,), 13, np.float32)
    (l1, c1), (l2, c2) = (sc.cross_entropy_forward(logits, targets) for _ in range(2))
    assert l1 == l2
    assert np.array_equal(sc.cross_entropy_backward(1.0, c1), sc.cross_entropy_backward(1.0, c2))


def test_bad_input_raises():
    logits, targets = _ce_inputs(np.random.default_rng(8), (3,), 4, np.float64)
    with pytest.raises(ValueError, match="every target is ignore_index"):
        sc.cross_entropy_forward(logits, np.full(3, -100))
    with pytest.raises(ValueError, match="outside"):
        sc.cross_entropy_forward(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="targets"):
        sc.cross_entropy_forward(logits, targets[:2])
    with pytest.raises(ValueError, match="integers"):
        sc.cross_entropy_forward(logits, targets.astype(np.float64))
    with pytest.raises(ValueError, match="square"):
        sc.causal(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="dp is"):
        sc.causal_backward(np.zeros((3, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="float32 or float64"):
        sc.rows(np.zeros((2, 3), dtype=np.int64))
