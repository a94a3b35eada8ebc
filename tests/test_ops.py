"""ops.py: float64 finite-difference gradients of every pair, and values against torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_grads, weighted_sum
from minillm.nn import ops

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


def t(x):
    return torch.tensor(x)


def check_unary(fwd, bwd, x):
    y, cache = fwd(x)
    g = randn(*y.shape)
    dx = bwd(g, cache)
    check_grads(lambda: weighted_sum(fwd(x)[0], g), {"x": x}, {"x": dx})


@pytest.mark.parametrize(
    "name, torch_fn",
    [
        ("gelu", lambda x: F.gelu(x, approximate="tanh")),
        ("silu", F.silu),
        ("sigmoid", torch.sigmoid),
        ("softplus", F.softplus),
        ("relu_squared", lambda x: torch.relu(x) ** 2),
    ],
)
def test_activation(name, torch_fn):
    fwd, bwd = getattr(ops, f"{name}_forward"), getattr(ops, f"{name}_backward")
    x = randn(3, 7) * 3
    if name == "softplus":
        x[0, :3] = [25.0, 19.5, 20.5]  # both sides of torch's threshold 20
    if name == "relu_squared":
        x = np.where(np.abs(x) < 1e-3, 0.5, x)  # away from the kink at 0
    np.testing.assert_allclose(fwd(x)[0], torch_fn(t(x)).numpy(), rtol=1e-14, atol=1e-14)
    check_unary(fwd, bwd, x)


def test_sigmoid_extremes_do_not_overflow():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise"):
        y, _ = ops.sigmoid_forward(x)
    assert y.dtype == np.float32 and np.isfinite(y).all()


def test_linear():
    x, w, b = randn(2, 3, 5), randn(5, 4), randn(4)
    y, cache = ops.linear_forward(x, w, b)
    np.testing.assert_allclose(y, F.linear(t(x), t(w.T), t(b)).numpy(), rtol=1e-13)
    g = randn(*y.shape)
    dx, dw, db = ops.linear_backward(g, cache)
    check_grads(lambda: weighted_sum(ops.linear_forward(x, w, b)[0], g),
                {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db})
    assert ops.linear_backward(g, ops.linear_forward(x, w)[1])[2] is None


def test_embedding_accumulates_repeated_ids():
    w = randn(6, 3)
    ids = np.array([[1, 2, 1], [5, 1, 0]])
    y, cache = ops.embedding_forward(ids, w)
    g = randn(*y.shape)
    dw = ops.embedding_backward(g, cache)
    check_grads(lambda: weighted_sum(ops.embedding_forward(ids, w)[0], g), {"w": w}, {"w": dw})


def test_layernorm():
    x, w, b = randn(2, 3, 8) * 2 + 1, randn(8), randn(8)
    y, cache = ops.layernorm_forward(x, w, b)
    ref = F.layer_norm(t(x), (8,), t(w), t(b), eps=1e-5).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    g = randn(*y.shape)
    dx, dw, db = ops.layernorm_backward(g, cache)
    check_grads(lambda: weighted_sum(ops.layernorm_forward(x, w, b)[0], g),
                {"x": x, "w": w, "b": b}, {"x": dx, "w": dw, "b": db})


def test_rmsnorm():
    x, w = randn(4, 6), randn(6)
    y, cache = ops.rmsnorm_forward(x, w)
    ref = F.rms_norm(t(x), (6,), t(w), eps=1e-5).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    g = randn(*y.shape)
    dx, dw = ops.rmsnorm_backward(g, cache)
    check_grads(lambda: weighted_sum(ops.rmsnorm_forward(x, w)[0], g), {"x": x, "w": w}, {"x": dx, "w": dw})


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax(axis):
    x = randn(4, 5) * 3
    y, _ = ops.softmax_forward(x, axis=axis)
    np.testing.assert_allclose(y, torch.softmax(t(x), dim=axis).numpy(), rtol=1e-13)
    check_unary(lambda a: ops.softmax_forward(a, axis=axis), ops.softmax_backward, x)


def test_cross_entropy_matches_torch_and_ignores_index():
    logits = randn(2, 5, 7) * 2
    targets = rng.integers(0, 7, size=(2, 5))
    targets[1, 2] = -100
    loss, cache = ops.cross_entropy_forward(logits, targets)
    ref = F.cross_entropy(t(logits).reshape(-1, 7), t(targets).reshape(-1), ignore_index=-100)
    assert abs(loss - ref.item()) < 1e-13
    dlogits = ops.cross_entropy_backward(1.0, cache)
    assert np.all(dlogits[1, 2] == 0)
    check_grads(lambda: ops.cross_entropy_forward(logits, targets)[0], {"logits": logits}, {"logits": dlogits})


def test_cross_entropy_all_ignored_is_an_error():
    with pytest.raises(ValueError, match="ignore_index"):
        ops.cross_entropy_forward(randn(2, 3), np.array([-100, -100]))


def test_dtype_flows_from_inputs():
    x = randn(2, 4).astype(np.float32)
    w = np.ones(4, np.float32)
    for y in [ops.layernorm_forward(x, w, w)[0], ops.rmsnorm_forward(x, w)[0], ops.gelu_forward(x)[0],
              ops.silu_forward(x)[0], ops.softplus_forward(x)[0], ops.softmax_forward(x)[0]]:
        assert y.dtype == np.float32
    _, cache = ops.cross_entropy_forward(x, np.array([0, 1]))
    assert ops.cross_entropy_backward(1.0, cache).dtype == np.float32
