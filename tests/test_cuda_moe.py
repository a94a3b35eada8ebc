"""MoE numba.cuda kernels against the NumPy reference (tiny shapes: without a GPU they run in Numba's
CUDA simulator, which tests/conftest.py switches on; set here too for a direct run)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minillm.kernels import moe as K  # noqa: E402

KC = pytest.importorskip("minillm.kernels.moe_cuda")


def routing(rng, N, E, k, dead=()):
    alive = np.array([e for e in range(E) if e not in dead])
    return np.stack([rng.choice(alive, k, replace=False) for _ in range(N)]).astype(np.int64)


def close(a, b, dtype):
    # the GPU may fuse multiply-adds and its exp differs from NumPy's: a few ulps
    tol = 1e-13 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk", [1, 4, 7, 256])
def test_cuda_sort_chunks(chunk):
    # the counting sort in chunks of `chunk` assignments (the default, CHUNK = 256, is one chunk here)
    idx = routing(np.random.default_rng(chunk), 23, 5, 2, dead=(1,))
    for a, b in zip(KC.sort(idx, 5, chunk=chunk), K.sort_reference(idx, 5)):
        assert np.array_equal(a, b)


# (1, 3, 3): a single token with k = E
@pytest.mark.parametrize("N,E,k,dead", [(11, 5, 2, (3,)), (1, 3, 3, ()), (7, 4, 1, ())])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_matches_reference(N, E, k, dead, dtype):
    rng = np.random.default_rng(N + E + k)
    C = 3
    idx = routing(rng, N, E, k, dead)
    x = rng.standard_normal((N, C)).astype(dtype)
    for a, b in zip(KC.dispatch(x, idx, E), K.dispatch_reference(x, idx, E)):
        assert np.array_equal(a, b)  # a permutation and integer bookkeeping: exact
    _, _, _, pos = K.dispatch_reference(x, idx, E)
    ys = rng.standard_normal((N * k, C)).astype(dtype)
    w = rng.random((N, k)).astype(dtype)
    close(KC.combine(ys, pos, w), K.combine_reference(ys, pos, w), dtype)
    close(KC.combine(ys, pos), K.combine_reference(ys, pos), dtype)
    dy = rng.standard_normal((N, C)).astype(dtype)
    for a, b in zip(KC.combine_backward(dy, ys, pos, w), K.combine_backward_reference(dy, ys, pos, w)):
        assert a.dtype == dtype
        close(a, b, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_swiglu(dtype):
    rng = np.random.default_rng(0)
    h1 = (rng.standard_normal((5, 7)) * 5).astype(dtype)
    h1[0, :3] = [0.0, -90.0, 90.0]
    h3, da = (rng.standard_normal((5, 7)).astype(dtype) for _ in range(2))
    a = KC.swiglu(h1, h3)
    assert a.dtype == dtype
    close(a, K.swiglu_reference(h1, h3), dtype)
    for got, ref in zip(KC.swiglu_backward(da, h1, h3), K.swiglu_backward_reference(da, h1, h3)):
        close(got, ref, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_swiglu_pair(dtype):
    rng = np.random.default_rng(1)
    h = (rng.standard_normal((6, 5)) * 5).astype(dtype)
    h[0, :2] = [-90.0, 90.0]
    da = rng.standard_normal((3, 5)).astype(dtype)
    a = KC.swiglu_pair(h)
    assert a.dtype == dtype and a.shape == (3, 5)
    close(a, K.swiglu_pair_reference(h), dtype)
    close(KC.swiglu_pair_backward(da, h), K.swiglu_pair_backward_reference(da, h), dtype)
    with pytest.raises(ValueError, match="2F"):
        KC.swiglu_pair(np.zeros((3, 2), dtype))


def test_cuda_bad_ids():
    with pytest.raises(ValueError, match="expert ids"):
        KC.dispatch(np.zeros((2, 3)), np.array([[0, 4], [1, 2]]), 4)


def test_moe_layer_with_cuda_kernels_matches_numba(fast_simulator_threads):
    """The whole layer (fused experts) with every moe kernel forced to its CUDA form (the simulator
    without a GPU), on host arrays: the same outputs and gradients as the Numba kernels."""
    from minillm import kernels
    from minillm.nn import moe

    config = {"d_model": 6, "d_ff": 4, "n_experts": 3, "top_k": 2, "n_layer": 2,
              "aux_loss_coef": 0.1, "router_z_loss_coef": 0.05}
    rng = np.random.default_rng(3)
    p = moe.init_ffn(config, rng, np.float64)
    p["gate"]["weight"] *= 40.0
    x = rng.standard_normal((5, 6))
    g = rng.standard_normal(x.shape)
    y, cache = moe.moe_forward(x, p, config)
    dx, grads = moe.moe_backward(g, cache)
    with kernels.forced("cuda", ops=("moe",)):
        yc, cc = moe.moe_forward(x, p, config)
        dxc, gc = moe.moe_backward(g, cc)
    assert cache["fused"] and cc["fused"]
    np.testing.assert_allclose(yc, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dxc, dx, rtol=1e-12, atol=1e-12)
    for e in ("0", "1", "2"):
        for n in ("w1", "w2", "w3"):
            np.testing.assert_allclose(gc["experts"][e][n]["weight"], grads["experts"][e][n]["weight"],
                                       rtol=1e-12, atol=1e-12)


def test_moe_layer_on_cupy_matches_numpy():
    # the whole layer with CuPy arrays (real GPU only): the CUDA kernels inside moe_forward/backward
    cupy = pytest.importorskip("cupy")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("CuPy needs a real GPU")
    from minillm.nn import moe

    config = {"d_model": 12, "d_ff": 10, "n_experts": 4, "top_k": 2, "n_layer": 2,
              "aux_loss_coef": 0.1, "router_z_loss_coef": 0.05}
    rng = np.random.default_rng(0)
    p = moe.init_ffn(config, rng, np.float64)
    p["gate"]["weight"] *= 40.0
    x = rng.standard_normal((2, 9, 12))
    g = rng.standard_normal(x.shape)
    y, cache = moe.moe_forward(x, p, config)
    dx, grads = moe.moe_backward(g, cache)
    pd = {"gate": {"weight": cupy.asarray(p["gate"]["weight"])},
          "experts": {e: {n: {"weight": cupy.asarray(v["weight"])} for n, v in ex.items()}
                      for e, ex in p["experts"].items()}}
    yd, cd = moe.moe_forward(cupy.asarray(x), pd, config)
    dxd, gd = moe.moe_backward(cupy.asarray(g), cd)
    np.testing.assert_allclose(yd.get(), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dxd.get(), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gd["gate"]["weight"].get(), grads["gate"]["weight"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gd["experts"]["2"]["w1"]["weight"].get(), grads["experts"]["2"]["w1"]["weight"],
                               rtol=1e-12, atol=1e-12)
    assert np.array_equal(moe.stats_of(cd)["expert_tokens"], moe.stats_of(cache)["expert_tokens"])
    assert abs(moe.aux_loss_of(cd) - moe.aux_loss_of(cache)) < 1e-12
