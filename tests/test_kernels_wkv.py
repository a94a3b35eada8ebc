"""WKV kernels: the NumPy reference against the closed form, float64 gradient checks of its backward,
the Numba kernels against the reference, HF's `rwkv_linear_attention_cpu` as the peer, carried state,
determinism, and stability at T = 4096 with extreme decays and large keys."""

import numba
import numpy as np
import pytest
import torch
from transformers.models.rwkv import modeling_rwkv

from gradcheck import check_grads, weighted_sum
from minillm.kernels import wkv


@pytest.fixture(autouse=True)
def _numba_forward_on_small_inputs(monkeypatch):
    """forward hands small inputs to the NumPy reference; these tests want the Numba kernel."""
    monkeypatch.setattr(wkv, "SMALL", 0)


def _inputs(rng, B, T, C, dtype=np.float64, kscale=1.0):
    k = (kscale * rng.normal(size=(B, T, C))).astype(dtype)
    v = rng.normal(size=(B, T, C)).astype(dtype)
    w = -np.exp(rng.normal(size=C)).astype(dtype)
    u = rng.normal(size=C).astype(dtype)
    return k, v, w, u


def _closed_form(k, v, w, u):
    """y_t straight from the definition (RWKV-4 eq. 14), no max tracking: small |k| only."""
    B, T, C = k.shape
    y = np.empty_like(k)
    for t in range(T):
        i = np.arange(t)
        e = np.exp((t - 1 - i)[None, :, None] * w + k[:, :t])
        bonus = np.exp(u + k[:, t])
        y[:, t] = ((e * v[:, :t]).sum(1) + bonus * v[:, t]) / (e.sum(1) + bonus)
    return y


def test_reference_matches_closed_form():
    k, v, w, u = _inputs(np.random.default_rng(0), 2, 9, 5)
    y, _ = wkv.forward_reference(k, v, w, u)
    np.testing.assert_allclose(y, _closed_form(k, v, w, u), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("impl", ["reference", "numba"])
def test_backward_gradcheck(impl):
    fwd, bwd = ((wkv.forward_reference, wkv.backward_reference) if impl == "reference"
                else (wkv.forward, wkv.backward))
    rng = np.random.default_rng(1)
    k, v, w, u = _inputs(rng, 2, 11, 6, kscale=2.0)
    g = rng.normal(size=k.shape)
    arrays = dict(k=k, v=v, w=w, u=u)
    y, cache = fwd(k, v, w, u)
    dk, dv, dw, du = bwd(g, cache)
    check_grads(lambda: weighted_sum(fwd(k, v, w, u)[0], g), arrays, dict(k=dk, v=dv, w=dw, u=du))


@pytest.fixture(params=["kernel", "small"])
def kernel(request, monkeypatch):
    """Runs a test with the Numba forward kernel, then with forward's small-input path."""
    monkeypatch.setattr(wkv, "SMALL", 0 if request.param == "kernel" else 1 << 62)
    return request.param


@pytest.mark.parametrize("B,T,C", [(2, 13, 37), (1, 1, 64), (3, 50, 5)])
def test_numba_matches_reference_float64(B, T, C, kernel):
    rng = np.random.default_rng(B * 100 + T)
    k, v, w, u = _inputs(rng, B, T, C, kscale=5.0)
    g = rng.normal(size=k.shape)
    y0, c0 = wkv.forward_reference(k, v, w, u)
    y1, c1 = wkv.forward(k, v, w, u)
    # the kernels' vectorised exp is within 1 ulp of np.exp: agreement to ~1e-14, not bitwise
    np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-13)
    for s0, s1 in zip(c0["state_out"], c1["state_out"]):
        np.testing.assert_allclose(s1, s0, rtol=1e-12, atol=1e-13)
    for a, b in zip(wkv.backward(g, c1), wkv.backward_reference(g, c0)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11 * np.abs(b).max())


def test_numba_matches_reference_float32(kernel):
    rng = np.random.default_rng(3)
    k, v, w, u = _inputs(rng, 2, 64, 40, np.float32, kscale=3.0)
    g = rng.normal(size=k.shape).astype(np.float32)
    y0, c0 = wkv.forward_reference(k, v, w, u)
    y1, c1 = wkv.forward(k, v, w, u)
    assert y1.dtype == np.float32
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(wkv.backward(g, c1), wkv.backward_reference(g, c0)):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_matches_hf_cpu_loop_and_autograd():
    """HF's `rwkv_linear_attention_cpu` (the peer) casts keys to float32 inside its loop, so it is
    compared in float32 (tolerance ~1e4 float32 ulps on sums over T = 40 steps)."""
    rng = np.random.default_rng(4)
    B, T, C = 2, 40, 24
    k, v, w, u = _inputs(rng, B, T, C, np.float32, kscale=3.0)
    td = np.log(-w)  # time_decay, since w = -exp(time_decay)
    g = rng.normal(size=k.shape).astype(np.float32)
    t_td, t_u, t_k, t_v = (torch.tensor(x, requires_grad=True) for x in (td, u, k, v))
    t_y, _ = modeling_rwkv.rwkv_linear_attention_cpu(t_td, t_u, t_k, t_v)
    (t_y * torch.tensor(g)).sum().backward()
    y, cache = wkv.forward(k, v, w, u)
    dk, dv, dw, du = wkv.backward(g, cache)
    np.testing.assert_allclose(y, t_y.detach().numpy(), rtol=1e-4, atol=1e-5)
    for ours, theirs in [(dk, t_k), (dv, t_v), (dw * w, t_td), (du, t_u)]:
        ref = theirs.grad.numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("forward", [wkv.forward_reference, wkv.forward])
def test_state_carries_over(forward, kernel):
    """Running [0, T) at once equals [0, T1) then [T1, T) from the returned state."""
    k, v, w, u = _inputs(np.random.default_rng(5), 2, 20, 9, kscale=4.0)
    y, cache = forward(k, v, w, u)
    y1, c1 = forward(k[:, :7], v[:, :7], w, u)
    y2, c2 = forward(k[:, 7:], v[:, 7:], w, u, state=c1["state_out"])
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), y, rtol=1e-12, atol=1e-13)
    for a, b in zip(c2["state_out"], cache["state_out"]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="inference only"):
        wkv.backward(y2, c2)


def test_numba_is_deterministic_across_thread_counts(kernel):
    rng = np.random.default_rng(6)
    k, v, w, u = _inputs(rng, 3, 30, 70, np.float32)
    g = rng.normal(size=k.shape).astype(np.float32)
    before = numba.get_num_threads()
    try:
        outs = []
        for n in sorted({1, before}):
            numba.set_num_threads(n)
            y, cache = wkv.forward(k, v, w, u)
            outs.append((y,) + wkv.backward(g, cache))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(outs[0], outs[-1]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stable_long_sequence_extreme_values(dtype):
    """T = 4096, decays from e^-20 to e^8 per step (w from -2e-9 to -3e3), |k| ~ 50, |u| up to 30."""
    rng = np.random.default_rng(7)
    B, T, C = 1, 4096, 24
    k = (50.0 * rng.choice([-1.0, 1.0], size=(B, T, C)) * rng.uniform(0.5, 1.0, (B, T, C))).astype(dtype)
    v = (10.0 * rng.normal(size=(B, T, C))).astype(dtype)
    w = -np.exp(np.linspace(-20.0, 8.0, C)).astype(dtype)
    u = np.linspace(-30.0, 30.0, C).astype(dtype)
    g = rng.normal(size=(B, T, C)).astype(dtype)
    y, cache = wkv.forward(k, v, w, u)
    grads = wkv.backward(g, cache)
    for x in (y,) + grads:
        assert np.isfinite(x).all()
    # y is a convex combination of the v's seen so far
    assert np.all(np.abs(y) <= np.maximum.accumulate(np.abs(v), axis=1) * (1 + 1e-5))
    y0, c0 = wkv.forward_reference(k, v, w, u)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(y, y0, rtol=tol, atol=tol * np.abs(v).max())
    for a, b in zip(grads, wkv.backward_reference(g, c0)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_bad_input_raises():
    k, v, w, u = _inputs(np.random.default_rng(8), 2, 4, 3)
    with pytest.raises(ValueError, match="k and v"):
        wkv.forward(k, v[:, :2], w, u)
    with pytest.raises(ValueError, match="w and u"):
        wkv.forward(k, v, w[:2], u)
    with pytest.raises(ValueError, match="float32 or float64"):
        wkv.forward(k.astype(np.float16), v, w, u)
