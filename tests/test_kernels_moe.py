"""MoE dispatch/combine and SwiGLU: the Numba kernels against the NumPy reference (the specification)."""

import numpy as np
import pytest

from minillm.kernels import moe as K


def routing(rng, N, E, k, dead=()):
    """(N, k) distinct expert ids per row, never using the experts in `dead`."""
    alive = np.array([e for e in range(E) if e not in dead])
    return np.stack([rng.choice(alive, k, replace=False) for _ in range(N)]).astype(np.int64)


CASES = [(16, 4, 2, ()), (16, 4, 1, ()), (9, 4, 4, ()), (12, 6, 2, (1, 5)), (1, 4, 2, ()),
         (1, 3, 3, ()), (257, 8, 2, ())]


@pytest.mark.parametrize("N,E,k,dead", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dispatch_combine_match_reference(N, E, k, dead, dtype):
    rng = np.random.default_rng(N * 100 + E * 10 + k)
    C = 7
    idx = routing(rng, N, E, k, dead)
    x = rng.standard_normal((N, C)).astype(dtype)
    ref = K.dispatch_reference(x, idx, E)
    got = K.dispatch(x, idx, E)
    for a, b in zip(got, ref):  # xs, order, offsets, pos: a permutation, so exactly equal
        assert a.dtype == b.dtype and np.array_equal(a, b)
    xs, order, offsets, pos = got
    counts = np.diff(offsets)
    assert counts.sum() == N * k and all(counts[e] == 0 for e in dead)
    assert np.array_equal(order[pos.reshape(-1)], np.arange(N * k))  # pos inverts order
    for e in range(E):  # expert e's block holds exactly its tokens, in ascending order
        toks = order[offsets[e]:offsets[e + 1]] // k
        assert np.array_equal(toks, np.nonzero((idx == e).any(axis=1))[0])

    ys = rng.standard_normal(xs.shape).astype(dtype)
    w = rng.random((N, k)).astype(dtype)
    # the same products summed in the same order (j ascending) and no FMA contraction without
    # fastmath: bitwise equal
    assert np.array_equal(K.combine(ys, pos, w), K.combine_reference(ys, pos, w))
    assert np.array_equal(K.combine(ys, pos), K.combine_reference(ys, pos))
    y = K.combine_reference(ys, pos, w)
    assert np.allclose(y, sum(w[:, j, None] * ys[pos[:, j]] for j in range(k)), rtol=0, atol=0)

    dy = rng.standard_normal((N, C)).astype(dtype)
    dys, dw = K.combine_backward(dy, ys, pos, w)
    rdys, rdw = K.combine_backward_reference(dy, ys, pos, w)
    assert np.array_equal(dys, rdys)
    # dw is a length-C dot product: the reference (NumPy's pairwise sum) may round differently
    tol = 1e-14 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(dw, rdw, rtol=tol, atol=tol)


def test_dispatch_backward_is_adjoint():
    # <dispatch(x), g> = <x, combine(g, pos)>: combine with unit weights is dispatch's transpose
    rng = np.random.default_rng(0)
    idx = routing(rng, 20, 5, 2)
    x = rng.standard_normal((20, 6))
    xs, _, _, pos = K.dispatch(x, idx, 5)
    g = rng.standard_normal(xs.shape)
    assert np.isclose((xs * g).sum(), (x * K.combine(g, pos)).sum(), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_swiglu_matches_reference(dtype):
    rng = np.random.default_rng(1)
    h1 = (rng.standard_normal((33, 19)) * 6).astype(dtype)
    h1[0, :4] = [0.0, -100.0, 100.0, -0.0]  # far tails of the sigmoid: no overflow
    h3 = rng.standard_normal((33, 19)).astype(dtype)
    da = rng.standard_normal((33, 19)).astype(dtype)
    # exp() of Numba (libm) and NumPy (its own SIMD routines) may differ by an ulp or so
    tol = 1e-14 if dtype == np.float64 else 2e-6
    a = K.swiglu(h1, h3)
    assert a.dtype == dtype
    np.testing.assert_allclose(a, K.swiglu_reference(h1, h3), rtol=tol, atol=tol)
    for got, ref in zip(K.swiglu_backward(da, h1, h3), K.swiglu_backward_reference(da, h1, h3)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    empty = np.zeros((0, 19), dtype)
    assert K.swiglu(empty, empty).shape == (0, 19)
    assert K.swiglu_backward(empty, empty, empty)[0].shape == (0, 19)


def test_swiglu_backward_numeric():
    rng = np.random.default_rng(2)
    h1, h3, da = (rng.standard_normal((4, 5)) * 3 for _ in range(3))
    dh1, dh3 = K.swiglu_backward(da, h1, h3)
    eps = 1e-6
    num1 = ((K.swiglu(h1 + eps, h3) - K.swiglu(h1 - eps, h3)) / (2 * eps)) * da
    num3 = ((K.swiglu(h1, h3 + eps) - K.swiglu(h1, h3 - eps)) / (2 * eps)) * da
    np.testing.assert_allclose(dh1, num1, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dh3, num3, rtol=1e-6, atol=1e-8)


def test_bad_expert_ids():
    with pytest.raises(ValueError, match="expert ids"):
        K.dispatch(np.zeros((2, 3)), np.array([[0, 4], [1, 2]]), 4)
    with pytest.raises(ValueError, match="expert ids"):
        K.dispatch_reference(np.zeros((2, 3)), np.array([[0, -1], [1, 2]]), 4)
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        K.sort(np.array([0, 1]), 4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(2, 1), (2, 7), (38, 19), (2 * 300, 70), (0, 5)])
def test_swiglu_pair_matches_reference_and_separate_halves(dtype, shape):
    """h = [h1; h3] stacked on the first axis: the pair kernels equal their reference (to the exp's ulp,
    as swiglu), and give exactly what the separate-halves kernels give on h1, h3."""
    rng = np.random.default_rng(shape[0] + shape[1])
    h = (rng.standard_normal(shape) * 6).astype(dtype)
    if h.size:
        h[0, 0] = 100.0
    F = shape[0] // 2
    da = rng.standard_normal((F,) + shape[1:]).astype(dtype)
    tol = 1e-14 if dtype == np.float64 else 2e-6
    a, dh = K.swiglu_pair(h), K.swiglu_pair_backward(da, h)
    assert a.shape == da.shape and dh.shape == h.shape and a.dtype == dh.dtype == dtype
    np.testing.assert_allclose(a, K.swiglu_pair_reference(h), rtol=tol, atol=tol)
    np.testing.assert_allclose(dh, K.swiglu_pair_backward_reference(da, h), rtol=tol, atol=tol)
    np.testing.assert_array_equal(a, K.swiglu(h[:F], h[F:]))
    np.testing.assert_array_equal(dh, np.concatenate(K.swiglu_backward(da, h[:F], h[F:])))


def test_swiglu_pair_bad_shape():
    with pytest.raises(ValueError, match="2F"):
        K.swiglu_pair(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="2F"):
        K.swiglu_pair_backward(np.zeros((1, 4)), np.zeros((3, 4)))
