"""dense.py: the dense hook in both weight layouts, with and without bias, and its dispatch."""

import numpy as np
import pytest

from gradcheck import check_grads, weighted_sum
from minillm.nn import dense, ternary

rng = np.random.default_rng(0)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_gradients(layout, bias):
    x = rng.standard_normal((2, 3, 5))
    w = rng.standard_normal((5, 4) if layout == "in_out" else (4, 5))
    p = {"weight": w, **({"bias": rng.standard_normal(4)} if bias else {})}
    y, cache = dense.dense_forward(x, p, dense.mode({}, layout))
    g = rng.standard_normal(y.shape)
    dx, grads = dense.dense_backward(g, cache)
    assert set(grads) == set(p)
    check_grads(lambda: weighted_sum(dense.dense_forward(x, p, dense.mode({}, layout))[0], g),
                {"x": x, **p}, {"x": dx, **grads})


def test_layouts_are_transposes_of_each_other():
    x, w = rng.standard_normal((4, 5)), rng.standard_normal((5, 3))
    a, _ = dense.dense_forward(x, {"weight": w}, dense.mode({}, "in_out"))
    b, _ = dense.dense_forward(x, {"weight": w.T.copy()}, dense.mode({}, "out_in"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, x @ w, rtol=1e-13)
    with pytest.raises(ValueError, match="layout"):
        dense.dense_forward(x, {"weight": w}, dense.mode({}, "sideways"))


def test_ternary_config_routes_through_bitlinear():
    x, w = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    y, _ = dense.dense_forward(x, {"weight": w}, dense.mode({"ternary": True}, "out_in"))
    np.testing.assert_array_equal(y, ternary.bitlinear_forward(x, w, None, layout="out_in")[0])
    assert not np.allclose(y, x @ w.T)


def test_embedding_backward_equals_the_reference_and_adds_into_out():
    from minillm.kernels import embedding
    from minillm.nn import ops

    ids = rng.integers(0, 6, (3, 5))
    ids[0, :3] = 4                                           # repeated ids accumulate
    w, dy = rng.standard_normal((6, 4)), rng.standard_normal((3, 5, 4))
    _, cache = ops.embedding_forward(ids, w)
    want = embedding.backward_reference(dy, *cache)
    np.testing.assert_allclose(ops.embedding_backward(dy, cache), want, rtol=1e-14, atol=1e-14)
    base = rng.standard_normal((6, 4))
    out = base.copy()
    assert ops.embedding_backward(dy, cache, out=out) is out
    np.testing.assert_allclose(out, base + want, rtol=1e-14, atol=1e-14)
