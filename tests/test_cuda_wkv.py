"""numba.cuda WKV kernels against the NumPy reference (kernels/wkv.py), on tiny shapes: on a real GPU
when there is one, else in Numba's CUDA simulator (set here too, before numba is first imported,
in case this file runs on its own without tests/conftest.py)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from minillm.kernels import wkv, wkv_cuda  # noqa: E402


def _inputs(rng, B, T, C, dtype):
    k = (4.0 * rng.normal(size=(B, T, C))).astype(dtype)
    v = rng.normal(size=(B, T, C)).astype(dtype)
    w = -np.exp(rng.normal(size=C)).astype(dtype)
    u = rng.normal(size=C).astype(dtype)
    return k, v, w, u


# float64: same operations in the same order as the reference; libdevice's exp is within 1 ulp
# of NumPy's, so ~1e-14 agreement. float32: ~1e-6, loosened to 1e-4 on gradients (sums over T).
TOL = {np.float64: 1e-11, np.float32: 1e-4}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_backward_match_reference(dtype):
    rng = np.random.default_rng(0)
    k, v, w, u = _inputs(rng, 2, 5, 3, dtype)
    g = rng.normal(size=k.shape).astype(dtype)
    y0, c0 = wkv.forward_reference(k, v, w, u)
    y1, c1 = wkv_cuda.forward(k, v, w, u)
    assert isinstance(y1, np.ndarray) and y1.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(y1, y0, rtol=tol, atol=tol)
    for a, b in zip(c1["state_out"], c0["state_out"]):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    for a, b in zip(wkv_cuda.backward(g, c1), wkv.backward_reference(g, c0)):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_device_arrays_and_state():
    """numba device arrays in -> device arrays out; a forward from a carried state."""
    rng = np.random.default_rng(1)
    k, v, w, u = _inputs(rng, 1, 6, 4, np.float64)
    y0, c0 = wkv.forward_reference(k, v, w, u)
    _, c_first = wkv.forward_reference(k[:, :2], v[:, :2], w, u)
    dk_, dv_ = cuda.to_device(np.ascontiguousarray(k[:, 2:])), cuda.to_device(np.ascontiguousarray(v[:, 2:]))
    state = tuple(cuda.to_device(x) for x in c_first["state_out"])
    y2, c2 = wkv_cuda.forward(dk_, dv_, cuda.to_device(w), cuda.to_device(u), state=state)
    assert wkv_cuda._kind(y2) == "device"
    np.testing.assert_allclose(y2.copy_to_host(), y0[:, 2:], rtol=1e-11, atol=1e-12)
    for a, b in zip(c2["state_out"], c0["state_out"]):
        np.testing.assert_allclose(a.copy_to_host(), b, rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="inference only"):
        wkv_cuda.backward(y2, c2)


def test_bad_input_raises():
    k, v, w, u = _inputs(np.random.default_rng(2), 1, 2, 3, np.float64)
    with pytest.raises(ValueError, match="w and u"):
        wkv_cuda.forward(k, v, w[:2], u)


def test_cupy_arrays_and_rwkv_model_on_gpu():
    """On a real GPU with CuPy: the kernels take and return CuPy arrays, and the RWKV model's
    forward/backward on CuPy parameters equals the NumPy one."""
    cp = pytest.importorskip("cupy")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("CuPy arrays need a real GPU")
    from minillm.models import rwkv
    from minillm.tree import flatten, unflatten

    rng = np.random.default_rng(3)
    k, v, w, u = _inputs(rng, 2, 64, 96, np.float64)
    g = rng.normal(size=k.shape)
    y0, c0 = wkv.forward_reference(k, v, w, u)
    y1, c1 = wkv_cuda.forward(*(cp.asarray(x) for x in (k, v, w, u)))
    assert isinstance(y1, cp.ndarray)
    np.testing.assert_allclose(y1.get(), y0, rtol=1e-11, atol=1e-12)
    for a, b in zip(wkv_cuda.backward(cp.asarray(g), c1), wkv.backward_reference(g, c0)):
        np.testing.assert_allclose(a.get(), b, rtol=1e-10, atol=1e-10 * np.abs(b).max())

    cfg = dict(arch="rwkv", vocab_size=40, context=16, n_layer=2, n_head=1, d_model=32, dtype="float64")
    params = rwkv.init(cfg, np.random.default_rng(0))
    idx = rng.integers(0, 40, (2, 12))
    logits, cache = rwkv.forward(params, idx, cfg)
    grads = flatten(rwkv.backward(np.ones_like(logits), cache))
    gparams = unflatten({n: cp.asarray(x) for n, x in flatten(params).items()})
    glogits, gcache = rwkv.forward(gparams, cp.asarray(idx), cfg)
    np.testing.assert_allclose(glogits.get(), logits, rtol=1e-10, atol=1e-12)
    ggrads = flatten(rwkv.backward(cp.ones_like(glogits), gcache))
    for name, x in grads.items():
        np.testing.assert_allclose(ggrads[name].get(), x, rtol=1e-9, atol=1e-10 * np.abs(x).max(),
                                   err_msg=name)
