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

NAMES = ("y", "dx", "ddt", "dA", "dB", "dC", "dD")


def make(Bt, L, Dm, N, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    arrays = (rng.standard_normal((Bt, L, Dm)), rng.uniform(0.01, 0.5, (Bt, L, Dm)),
              -np.exp(rng.standard_normal((Dm, N))), rng.standard_normal((Bt, L, N)),
              rng.standard_normal((Bt, L, N)), rng.standard_normal(Dm))
    dy = rng.standard_normal((Bt, L, Dm))
    return [a.astype(dtype) for a in arrays], dy.astype(dtype)


def reference(a, dy):
    """Forward output and the six gradients of the NumPy reference, in float64."""
    y, cache = scan.forward_reference(*(v.astype(np.float64) for v in a))
    return (y,) + scan.backward_reference(dy.astype(np.float64), cache)


def run(a, dy):
    y, cache = scan_cuda.forward(*a)
    return (y,) + scan_cuda.backward(dy, cache)


def assert_close(got, ref, dtype):
    # Normwise, relative to each array's largest entry. float64: both sides round differently (the GPU fuses
    # multiply-adds, its exp differs, the sums over n, channels, batch and time run in other orders), which
    # costs a few ulps (the simulator shows <= 3): 4e-15 is ~18 ulps of the largest entry.
    # float32: the same inputs in float32 arithmetic against the float64 reference: ~100 float32 ulps.
    tol = 4e-15 if dtype == np.float64 else 1e-5
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape and g.dtype == dtype, name
        scale = max(np.abs(r).max(initial=0.0), 1e-300)
        assert np.abs(g - r).max(initial=0.0) <= tol * scale, name


# Chunks are 8 steps in float64, 16 in float32. NP = the power of two >= N; channels per block 128 // NP
# (at most 32), so: (2, 19, 18, 5) two full chunks and a partial one, 16 channels per block, 2 in the last;
# (1, 9, 5, 32) 4 channels per block, 1 in the last; (2, 16, 3, 3) exactly two chunks; N = 1 and L = 1;
# (2, 35, 10, 16) float32, 8 channels per block, 2 in the last; N = 2: 64-thread blocks.
@pytest.mark.parametrize("shape, dtype", [((2, 19, 18, 5), np.float64), ((1, 9, 5, 32), np.float64),
                                          ((2, 16, 3, 3), np.float64), ((1, 1, 3, 1), np.float64),
                                          ((2, 35, 10, 16), np.float32), ((1, 5, 3, 2), np.float32)])
def test_cuda_matches_reference(shape, dtype):
    a, dy = make(*shape, dtype=dtype)
    got = run(a, dy)
    assert all(isinstance(g, np.ndarray) for g in got)
    assert_close(got, reference(a, dy), dtype)


def test_cuda_empty_shapes():
    for shape in ((1, 0, 3, 2), (2, 3, 2, 0)):   # no time steps; no state (y = D x)
        a, dy = make(*shape)
        assert_close(run(a, dy), reference(a, dy), np.float64)


def test_cuda_device_arrays_stay_on_device_and_repeat_exactly():
    a, dy = make(2, 10, 5, 3, seed=3)
    dev = [cuda.to_device(v) for v in a]
    first = run(dev, cuda.to_device(dy))
    assert all(scan_cuda._kind(g) == "device" for g in first)
    first = [g.copy_to_host() for g in first]
    again = run(dev, cuda.to_device(dy))
    assert all(np.array_equal(p, q.copy_to_host()) for p, q in zip(first, again))
    assert_close(first, reference(a, dy), np.float64)


def test_cuda_bad_input():
    (x, dt, A, B, C, D), dy = make(1, 3, 2, 2)
    f = scan_cuda.forward
    for args, match in [((x[0], dt[0], A, B, C, D), "x and dt"), ((x, dt[:, :2], A, B, C, D), "x and dt"),
                        ((x, dt, A[:1], B, C, D), "A must be"), ((x, dt, A, B[:, :2], C, D), "B and C"),
                        ((x, dt, A, B, C[..., :1], D), "B and C"), ((x, dt, A, B, C, D[:1]), "D must be"),
                        ((x.astype(np.int64), dt, A, B, C, D), "float32 or float64"),
                        ((cuda.to_device(x), dt, A, B, C, cuda.to_device(D.astype(np.float32))), "device arrays")]:
        with pytest.raises(ValueError, match=match):
            f(*args)
    with pytest.raises(ValueError, match="dy must be"):
        scan_cuda.backward(dy[:, :2], f(x, dt, A, B, C, D)[1])
    (x, dt, A, B, C, D), _ = make(1, 2, 2, scan_cuda.MAX_N + 1)
    with pytest.raises(ValueError, match="d_state is at most 32"):
        f(x, dt, A, B, C, D)
