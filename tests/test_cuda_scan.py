"""numba.cuda selective scan (kernels/scan_cuda.py) against the NumPy reference (kernels/scan.py) on tiny
shapes: on a real GPU when there is one, else in Numba's CUDA simulator (tests/conftest.py switches it on;
set here too for a direct run)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minillm.kernels import scan  # noqa: E402

scan_cuda = pytest.importorskip("minillm.kernels.scan_cuda")
from numba import cuda  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D")


def make(Bt, L, Dm, N, seed=0, dt_max=0.5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    arrays = (rng.standard_normal((Bt, L, Dm)), rng.uniform(0.01, dt_max, (Bt, L, Dm)),
              -np.exp(rng.standard_normal((Dm, N))), rng.standard_normal((Bt, L, N)),
              rng.standard_normal((Bt, L, N)), rng.standard_normal(Dm))
    return [a.astype(dtype) for a in arrays]


def close(a, b, dtype):
    # the GPU fuses multiply-adds and its exp differs from NumPy's: a few ulps, relative to the array's scale
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-300)


# (1, 17, 3, 2): L spans a full backward chunk (CHUNK 16) and a partial one; Dm = 3 leaves most threads idle
@pytest.mark.parametrize("shape, dtype", [((2, 5, 3, 4), np.float64), ((2, 5, 3, 4), np.float32),
                                          ((1, 17, 3, 2), np.float64)])
def test_cuda_matches_reference(shape, dtype):
    a = make(*shape, dtype=dtype)
    a64 = [v.astype(np.float64) for v in a]
    y_ref, c_ref = scan.selective_scan_forward_ref(*a64)
    y, c = scan_cuda.selective_scan_forward(*a)
    assert isinstance(y, np.ndarray) and y.dtype == dtype
    close(y, y_ref, dtype)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    grads = scan_cuda.selective_scan_backward(dy.astype(dtype), c)
    for name, g, g_ref, v in zip(NAMES, grads, scan.selective_scan_backward_ref(dy, c_ref), a):
        assert g.shape == v.shape and g.dtype == dtype, name
        close(g, g_ref, dtype)


def test_cuda_device_arrays_stay_on_device_and_repeat_exactly():
    a = make(1, 4, 3, 2)
    dev = [cuda.to_device(v) for v in a]
    y, c = scan_cuda.selective_scan_forward(*dev)
    assert scan_cuda._kind(y) == "device"
    dy = cuda.to_device(np.random.default_rng(2).standard_normal((1, 4, 3)))
    first = [g.copy_to_host() for g in scan_cuda.selective_scan_backward(dy, c)]
    again = [g.copy_to_host() for g in scan_cuda.selective_scan_backward(dy, c)]
    assert all(np.array_equal(p, q) for p, q in zip(first, again))
    y_ref, c_ref = scan.selective_scan_forward_ref(*a)
    close(y.copy_to_host(), y_ref, np.float64)
    for g, g_ref in zip(first, scan.selective_scan_backward_ref(dy.copy_to_host(), c_ref)):
        close(g, g_ref, np.float64)


def test_cuda_bad_input():
    a = make(1, 3, 2, 2)
    with pytest.raises(ValueError, match="B and C"):
        scan_cuda.selective_scan_forward(a[0], a[1], a[2], a[3][:, :2], a[4], a[5])
    x, dt, A, B, C, D = make(1, 2, 2, scan_cuda.MAX_N + 1)
    with pytest.raises(ValueError, match="d_state is at most"):
        scan_cuda.selective_scan_forward(x, dt, A, B, C, D)
