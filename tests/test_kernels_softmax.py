"""kernels/softmax.py: the Numba causal softmax and backward, and the cross-entropy pair, equal the reference."""

import numpy as np
import pytest

from boundscheck import assert_runs_with_boundscheck
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


# --- cross-entropy: the Numba pair against the reference ---------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-14), (np.float32, 2e-6)])
@pytest.mark.parametrize("N, V", [(1, 1), (1, 2), (7, 5), (64, 17), (33, 1000)])   # V below / over the 8 partial sums
def test_cross_entropy_kernels_match_reference(dtype, tol, N, V):
    rng = np.random.default_rng(N * V)
    logits = (rng.standard_normal((N, V)) * 4).astype(dtype)
    targets = rng.integers(0, V, N)
    targets[1::3] = -100
    targets[0] = V - 1                              # at least one target kept
    loss, cache = sk.cross_entropy_forward(logits, targets)
    loss_ref, cache_ref = sk.cross_entropy_forward_reference(logits, targets)
    assert abs(loss - loss_ref) <= tol * abs(loss_ref) + tol
    d = sk.cross_entropy_backward(0.7, cache)
    assert d.dtype == dtype and d.shape == logits.shape
    np.testing.assert_allclose(d, sk.cross_entropy_backward_reference(0.7, cache_ref), rtol=tol, atol=tol)
    assert (d[1::3] == 0).all()                     # ignored rows get no gradient
    again, cache2 = sk.cross_entropy_forward(logits, targets)
    assert again == loss and np.array_equal(sk.cross_entropy_backward(0.7, cache2), d)   # deterministic


def test_cross_entropy_kernel_keeps_leading_axes_and_extreme_logits():
    logits = np.array([[[1e4, -1e4, 0.0], [-50.0, 80.0, 80.0]]], dtype=np.float32)   # exp overflows unshifted
    targets = np.array([[1, 2]])
    loss, cache = sk.cross_entropy_forward(logits, targets)
    ref, ref_cache = sk.cross_entropy_forward_reference(logits.astype(np.float64), targets)
    assert np.isclose(loss, ref, rtol=1e-6)
    d = sk.cross_entropy_backward(1.0, cache)
    assert d.shape == (1, 2, 3) and np.isfinite(d).all()
    np.testing.assert_allclose(d, sk.cross_entropy_backward_reference(1.0, ref_cache), atol=1e-6)


def test_cross_entropy_kernel_bad_input():
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="every target is ignore_index"):
        sk.cross_entropy_forward(logits, np.full(3, -100))
    with pytest.raises(ValueError, match="every target is ignore_index"):
        sk.cross_entropy_forward(np.zeros((0, 4)), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="1 targets outside"):
        sk.cross_entropy_forward(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="targets must be integers"):
        sk.cross_entropy_forward(logits, np.zeros(3))
    with pytest.raises(ValueError, match="needs logits"):
        sk.cross_entropy_forward(logits, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="float32 or float64"):
        sk.cross_entropy_forward(logits.astype(np.float16), np.zeros(3, np.int64))
    nan = logits.copy()
    nan[1, 2] = np.nan
    assert np.isnan(sk.cross_entropy_forward(nan, np.array([0, 1, 2]))[0])


def test_cross_entropy_kernels_with_boundscheck(tmp_path):
    """Empty, one-element and ragged (V not a multiple of 8) inputs in a child process with
    NUMBA_BOUNDSCHECK=1 (its own Numba cache: compiled without bounds checks elsewhere)."""
    code = """
import numpy as np
from minillm.kernels import softmax as sk
for dt in (np.float32, np.float64):
    for N, V in [(1, 1), (2, 15), (3, 16), (4, 33)]:
        z = np.random.default_rng(V).standard_normal((N, V)).astype(dt)
        t = np.arange(N) % V
        t[-1] = -100 if N > 1 else t[-1]
        loss, cache = sk.cross_entropy_forward(z, t)
        sk.cross_entropy_backward(1.0, cache)
    try:
        sk.cross_entropy_forward(np.zeros((0, 3), dt), np.zeros(0, np.int64))
    except ValueError:
        pass
print("bounds ok")
"""
    assert_runs_with_boundscheck(code, tmp_path)


def test_parallel_kernels_give_the_same_bits_for_any_thread_count():
    """Causal softmax, cross-entropy, GELU and LayerNorm forward run in parallel blocks of independent rows."""
    import numba

    from minillm.kernels import gelu, layernorm

    rng = np.random.default_rng(3)
    s = (rng.standard_normal((3, 2, 70, 70)) * 4).astype(np.float32)
    dp = rng.standard_normal(s.shape).astype(np.float32)
    z = (rng.standard_normal((300, 77)) * 3).astype(np.float32)
    t = rng.integers(0, 77, 300)
    x = rng.standard_normal((50, 333)).astype(np.float32)
    old = numba.get_num_threads()
    results = []
    try:
        for n in sorted({1, old}):
            numba.set_num_threads(n)
            p = sk.causal(s.copy())
            loss, cache = sk.cross_entropy_forward(z, t)
            results.append((p, sk.causal_backward(dp.copy(), p), np.float64(loss),
                            sk.cross_entropy_backward(1.0, cache), gelu.forward(x)[0],
                            *layernorm.forward(x, x[0], x[1])[:1], layernorm.forward(x, x[0], x[1])[1][1]))
    finally:
        numba.set_num_threads(old)
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
