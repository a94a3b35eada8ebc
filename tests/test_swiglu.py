"""nn/swiglu.py: Llama's MLP down(silu(gate(x)) * up(x)) against the formula, and its float64 gradients."""

import numpy as np

from gradcheck import check_grads, weighted_sum
from minillm.nn import swiglu


def test_swiglu_mlp_formula_and_gradients():
    rng = np.random.default_rng(0)
    C, F = 6, 10
    p = {"gate_proj": {"weight": rng.standard_normal((F, C))}, "up_proj": {"weight": rng.standard_normal((F, C))},
         "down_proj": {"weight": rng.standard_normal((C, F))}}
    x = rng.standard_normal((2, 3, C))
    y, cache = swiglu.swiglu_forward(x, p, {})
    g, u = x @ p["gate_proj"]["weight"].T, x @ p["up_proj"]["weight"].T
    want = (g / (1 + np.exp(-g)) * u) @ p["down_proj"]["weight"].T
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, grads = swiglu.swiglu_backward(dy, cache)
    check_grads(lambda: weighted_sum(swiglu.swiglu_forward(x, p, {})[0], dy),
                {"x": x, **{f"{k}.weight": v["weight"] for k, v in p.items()}},
                {"x": dx, **{f"{k}.weight": v["weight"] for k, v in grads.items()}})
