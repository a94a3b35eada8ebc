"""attention.py and kernels/softmax.py: float64 gradient checks, values and gradients against torch,
exact causal masking, the KV-cache step, float32 flow, and the Numba kernels against their reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_grads, weighted_sum
from minillm import kernels
from minillm.nn import attention

CONFIG = {"n_head": 3, "d_model": 12, "context": 8}


def test_causal_blocks():
    assert attention._edges(64, True) == [(0, 64)]
    assert attention._edges(200, True) == [(0, 66), (66, 133), (133, 200)]
    assert attention._edges(1024, True) == [(0, 256), (256, 512), (512, 768), (768, 1024)]
    assert attention._edges(1024, False) == [(0, 1024)]


def make_params(rng, C, dtype=np.float64):
    return {
        "c_attn": {"weight": rng.standard_normal((C, 3 * C)).astype(dtype) * 0.5,
                   "bias": rng.standard_normal(3 * C).astype(dtype) * 0.1},
        "c_proj": {"weight": rng.standard_normal((C, C)).astype(dtype) * 0.5,
                   "bias": rng.standard_normal(C).astype(dtype) * 0.1},
    }


def torch_attention(x, p, n_head):
    """Reference: causal attention written with torch ops (float64)."""
    B, T, C = x.shape
    qkv = x @ p["c_attn"]["weight"] + p["c_attn"]["bias"]
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).reshape(B, T, C) @ p["c_proj"]["weight"] + p["c_proj"]["bias"]


@pytest.fixture(params=["numpy", "numba"])
def kernel(request):
    """Run a test with the NumPy softmax and again with the Numba kernel."""
    with kernels.forced("reference" if request.param == "numpy" else "numba"):
        yield request.param


@pytest.mark.parametrize("T", [5, 130])
def test_gradients(kernel, T):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, T, 12))
    p = make_params(rng, 12)
    y, cache = attention.attention_forward(x, p, CONFIG)
    g = rng.standard_normal(y.shape)
    dx, grads = attention.attention_backward(g, cache)
    loss = lambda: weighted_sum(attention.attention_forward(x, p, CONFIG)[0], g)  # noqa: E731
    check_grads(loss, {"x": x, "p": p}, {"x": dx, "p": grads})


@pytest.mark.parametrize("T", [7, 200])     # 200: three uneven row blocks of the causal products
def test_against_torch(kernel, T):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, T, 12))
    p = make_params(rng, 12)
    y, cache = attention.attention_forward(x, p, CONFIG)
    g = rng.standard_normal(y.shape)
    dx, grads = attention.attention_backward(g, cache)

    tx = torch.tensor(x, requires_grad=True)
    tp = {k: {n: torch.tensor(a, requires_grad=True) for n, a in d.items()} for k, d in p.items()}
    ty = torch_attention(tx, tp, CONFIG["n_head"])
    (ty * torch.tensor(g)).sum().backward()
    # float64 throughout; different summation orders only: agreement to ~1e-15 relative.
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-11, atol=1e-12)
    for k in p:
        for n in p[k]:
            np.testing.assert_allclose(grads[k][n], tp[k][n].grad.numpy(), rtol=1e-11, atol=1e-12)


def test_future_tokens_have_no_influence(kernel):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 6, 12))
    p = make_params(rng, 12)
    y, cache = attention.attention_forward(x, p, CONFIG)
    prob = cache[5]
    assert (prob[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0).all()
    np.testing.assert_allclose(prob.sum(-1), 1.0, rtol=1e-15)
    x2 = x.copy()
    x2[:, 4:] += 100.0                     # change the future of positions 0..3
    y2, _ = attention.attention_forward(x2, p, CONFIG)
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])


def test_huge_scores_stay_finite():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 5, 12)) * 1e3
    y, _ = attention.attention_forward(x, make_params(rng, 12), CONFIG)
    assert np.isfinite(y).all()


def test_kv_cache_step_equals_forward():
    rng = np.random.default_rng(4)
    B, T = 2, 6
    x = rng.standard_normal((B, T, 12))
    p = make_params(rng, 12)
    y, _ = attention.attention_forward(x, p, CONFIG)
    kv = attention.init_kv_cache(B, CONFIG, np.float64)
    assert kv["k"].shape == (B, 3, CONFIG["context"], 4)
    for t in range(T):
        y_t, kv = attention.attention_step(x[:, t], p, CONFIG, kv, t)
        np.testing.assert_allclose(y_t, y[:, t], rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError):
        attention.attention_step(x[:, 0], p, CONFIG, kv, CONFIG["context"])


def test_float32_flows(kernel):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    p = make_params(rng, 12, np.float32)
    y, cache = attention.attention_forward(x, p, CONFIG)
    dx, grads = attention.attention_backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32
    assert all(a.dtype == np.float32 for d in grads.values() for a in d.values())
    y64, _ = attention.attention_forward(x.astype(np.float64), p, CONFIG)
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)


def test_head_count_must_divide_width():
    x = np.zeros((1, 2, 12))
    with pytest.raises(ValueError):
        attention.attention_forward(x, make_params(np.random.default_rng(0), 12), {"n_head": 5})
