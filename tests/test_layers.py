"""layers.py: the dense hook in both weight layouts, with and without bias, and its dispatch."""

import numpy as np
import pytest

from gradcheck import check_grads, weighted_sum
from minillm import layers, ternary

rng = np.random.default_rng(0)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_gradients(layout, bias):
    x = rng.standard_normal((2, 3, 5))
    w = rng.standard_normal((5, 4) if layout == "in_out" else (4, 5))
    p = {"weight": w, **({"bias": rng.standard_normal(4)} if bias else {})}
    y, cache = layers.dense_forward(x, p, {}, layout)
    g = rng.standard_normal(y.shape)
    dx, grads = layers.dense_backward(g, cache)
    assert set(grads) == set(p)
    check_grads(lambda: weighted_sum(layers.dense_forward(x, p, {}, layout)[0], g),
                {"x": x, **p}, {"x": dx, **grads})


def test_layouts_are_transposes_of_each_other():
    x, w = rng.standard_normal((4, 5)), rng.standard_normal((5, 3))
    a, _ = layers.dense_forward(x, {"weight": w}, {}, "in_out")
    b, _ = layers.dense_forward(x, {"weight": w.T.copy()}, {}, "out_in")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, x @ w, rtol=1e-13)
    with pytest.raises(ValueError, match="layout"):
        layers.dense_forward(x, {"weight": w}, {}, "sideways")


def test_ternary_config_routes_through_bitlinear():
    x, w = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    y, _ = layers.dense_forward(x, {"weight": w}, {"ternary": True}, "out_in")
    np.testing.assert_array_equal(y, ternary.bitlinear_forward(x, w, None, layout="out_in")[0])
    assert not np.allclose(y, x @ w.T)
