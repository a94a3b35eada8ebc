"""The numba.cuda AdamW update (kernels/adamw_cuda.py) against optim.adamw_step on NumPy arrays, which is
itself checked against torch.optim.AdamW in test_optim.py. Runs on a real GPU when there is one, else in
Numba's CUDA simulator (set here too, before numba is first imported, for a direct run)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from minillm import optim  # noqa: E402
from minillm.kernels import adamw_cuda  # noqa: E402

# The kernel does the NumPy path's operations in the same order, but the GPU compiler may fuse a
# multiply and an add into one rounding (FMA): a few ulps per step, compounding slowly over steps.
TOL = {np.float64: 1e-13, np.float32: 1e-5}


def _problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {"h": {"w": rng.standard_normal((5, 7)).astype(dtype),      # decayed (a matrix)
                    "bias": rng.standard_normal(7).astype(dtype)},       # not decayed
              "wte": rng.standard_normal((3, 4)).astype(dtype)}          # not decayed (embedding)
    grads = [{"h": {"w": rng.standard_normal((5, 7)).astype(dtype), "bias": rng.standard_normal(7).astype(dtype)},
              "wte": rng.standard_normal((3, 4)).astype(dtype)} for _ in range(3)]
    return params, grads


def _to_gpu(tree):
    return {k: _to_gpu(v) if isinstance(v, dict) else cuda.to_device(v) for k, v in tree.items()}


def _to_host(tree):
    return {k: _to_host(v) if isinstance(v, dict) else v.copy_to_host() for k, v in tree.items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_step_on_gpu_arrays_matches_numpy(dtype):
    """optim.adamw_step takes the kernel for GPU arrays; three steps, with and without weight decay."""
    params, grads = _problem(dtype)
    state = optim.adamw_init(params)
    gpu_params = _to_gpu(params)
    gpu_state = {"step": 0, "m": {n: cuda.to_device(a) for n, a in state["m"].items()},
                 "v": {n: cuda.to_device(a) for n, a in state["v"].items()}}
    mask = optim.decay_mask(optim.flatten(params))
    assert mask == {"h.w": True, "h.bias": False, "wte": False}
    for g in grads:
        optim.adamw_step(params, g, state, 3e-2, weight_decay=0.1, mask=mask)
        optim.adamw_step(gpu_params, _to_gpu(g), gpu_state, 3e-2, weight_decay=0.1, mask=mask)
    got = optim.flatten(_to_host(gpu_params))
    for name, want in optim.flatten(params).items():
        assert got[name].dtype == dtype
        np.testing.assert_allclose(got[name], want, rtol=TOL[dtype], atol=TOL[dtype], err_msg=name)
        np.testing.assert_allclose(gpu_state["m"][name].copy_to_host(), state["m"][name], rtol=TOL[dtype],
                                   atol=TOL[dtype])
        np.testing.assert_allclose(gpu_state["v"][name].copy_to_host(), state["v"][name], rtol=TOL[dtype],
                                   atol=TOL[dtype])
    assert gpu_state["step"] == 3


def test_a_transposed_gradient_is_fine():
    """RWKV's head gradient is a transposed view; p, m, v are updated in place so they must be contiguous."""
    rng = np.random.default_rng(2)
    p0, g = rng.standard_normal((4, 6)), rng.standard_normal((6, 4)).T
    want = {"w": p0.copy()}
    state = optim.adamw_init(want)
    optim.adamw_step(want, {"w": g}, state, 1e-2)
    p, m, v = cuda.to_device(p0), cuda.to_device(np.zeros((4, 6))), cuda.to_device(np.zeros((4, 6)))
    g_view = cuda.to_device(np.asfortranarray(g))
    assert not g_view.is_c_contiguous()
    optim.adamw_step({"w": p}, {"w": g_view}, {"step": 0, "m": {"w": m}, "v": {"w": v}}, 1e-2)
    np.testing.assert_allclose(p.copy_to_host(), want["w"], rtol=TOL[np.float64], atol=TOL[np.float64])
    with pytest.raises(ValueError, match="p must be C-contiguous"):
        adamw_cuda.update(g_view, cuda.to_device(g), m, v, 1.0, 0.9, 0.95, 1e-3, 1.0, 1e-8)


def test_update_is_deterministic_and_moves_params():
    rng = np.random.default_rng(1)
    p0, g = rng.standard_normal(300), rng.standard_normal(300)
    results = []
    for _ in range(2):
        p, m, v = cuda.to_device(p0), cuda.to_device(np.zeros(300)), cuda.to_device(np.zeros(300))
        adamw_cuda.update(p, cuda.to_device(g), m, v, 0.99, 0.9, 0.95, 1e-2, 0.2, 1e-8)
        results.append(p.copy_to_host())
    assert np.array_equal(results[0], results[1])
    assert not np.array_equal(results[0], p0)


def test_bad_calls():
    p = cuda.to_device(np.zeros(4))
    with pytest.raises(ValueError, match="GPU arrays"):
        adamw_cuda.update(np.zeros(4), p, p, p, 1.0, 0.9, 0.95, 1e-3, 1.0, 1e-8)
    with pytest.raises(ValueError, match="float32 or float64"):
        q = cuda.to_device(np.zeros(4, np.int32))
        adamw_cuda.update(q, q, q, q, 1.0, 0.9, 0.95, 1e-3, 1.0, 1e-8)
    with pytest.raises(ValueError, match="m is"):
        adamw_cuda.update(p, p, cuda.to_device(np.zeros(5)), p, 1.0, 0.9, 0.95, 1e-3, 1.0, 1e-8)
