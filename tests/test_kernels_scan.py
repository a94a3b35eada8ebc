"""kernels/scan.py: the Numba selective scan equals the NumPy reference; gradients; numerics; torch autograd."""

import numba
import numpy as np
import pytest
import torch

from gradcheck import check_grads, weighted_sum
from minillm.kernels import scan

NAMES = ("x", "dt", "A", "B", "C", "D")


def make(Bt, L, Dm, N, seed=0, dt_max=0.5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.standard_normal((Bt, L, Dm)),
        "dt": rng.uniform(0.01, dt_max, (Bt, L, Dm)),
        "A": -np.exp(rng.standard_normal((Dm, N))),
        "B": rng.standard_normal((Bt, L, N)),
        "C": rng.standard_normal((Bt, L, N)),
        "D": rng.standard_normal(Dm),
    }
    return {k: v.astype(dtype) for k, v in arrays.items()}


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("shape", [(2, 13, 37, 5), (1, 1, 1, 1), (3, 9, 64, 16)])
def test_numba_equals_reference(shape):
    # Dm = 37 leaves a partial block of channels; (1, 1, 1, 1) is the smallest case
    a = make(*shape)
    y_ref, c_ref = scan.forward_reference(*a.values())
    y, c = scan.forward(*a.values())
    # float64 rounding only (different summation order, exp polynomial within 2 ulp)
    assert rel(y, y_ref) < 1e-13
    dy = np.random.default_rng(1).standard_normal(y.shape)
    for name, g, g_ref in zip(NAMES, scan.backward(dy, c), scan.backward_reference(dy, c_ref)):
        assert g.shape == a[name].shape
        assert rel(g, g_ref) < 1e-12, name


def test_float32_kernel_close_to_float64():
    a = make(2, 50, 40, 8)
    a32 = {k: v.astype(np.float32) for k, v in a.items()}
    y, c = scan.forward(*a32.values())
    assert y.dtype == np.float32
    y_ref, c_ref = scan.forward_reference(*a.values())
    assert rel(y, y_ref) < 1e-5
    dy = np.random.default_rng(1).standard_normal(y.shape)
    for name, g, g_ref in zip(NAMES, scan.backward(dy.astype(np.float32), c),
                              scan.backward_reference(dy, c_ref)):
        assert g.dtype == np.float32
        assert rel(g, g_ref) < 1e-4, name


@pytest.mark.parametrize("impl", ["numba", "reference"])
def test_gradients(impl):
    fwd, bwd = {"numba": (scan.forward, scan.backward),
                "reference": (scan.forward_reference, scan.backward_reference)}[impl]
    a = make(2, 7, 5, 3)
    y, c = fwd(*a.values())
    g = np.random.default_rng(2).standard_normal(y.shape)
    grads = dict(zip(NAMES, bwd(g, c)))
    check_grads(lambda: weighted_sum(fwd(*a.values())[0], g), a, grads)


def torch_scan(x, dt, A, B, C, D):
    """The recurrence in torch, one step at a time (as mamba_ssm's selective_scan_ref)."""
    h = torch.zeros(x.shape[0], x.shape[2], A.shape[1], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1) + D * x


def test_matches_torch_autograd():
    a = make(2, 20, 24, 6)
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in a.items()}
    y_t = torch_scan(*ts.values())
    dy = np.random.default_rng(3).standard_normal(y_t.shape)
    y_t.backward(torch.tensor(dy))
    y, c = scan.forward(*a.values())
    assert rel(y, y_t.detach().numpy()) < 1e-13
    for name, g in zip(NAMES, scan.backward(dy, c)):
        assert rel(g, ts[name].grad.numpy()) < 1e-12, name


def test_long_sequence_and_large_dt_stay_finite():
    # L = 4096 with dt up to 100 (softplus is the identity above 20): exp(dt A) underflows towards 0, the
    # state stays bounded (|h| <= max |dt B x| / (1 - max a)); no overflow, no NaN, and still the reference.
    a = make(1, 4096, 40, 4, dt_max=100.0)
    a["dt"][0, ::97] = 0.0   # dt = 0 steps: a = 1, no input
    y, c = scan.forward(*a.values())
    y_ref, c_ref = scan.forward_reference(*a.values())
    assert np.isfinite(y).all()
    assert rel(y, y_ref) < 1e-12
    dy = np.random.default_rng(4).standard_normal(y.shape)
    for name, g, g_ref in zip(NAMES, scan.backward(dy, c), scan.backward_reference(dy, c_ref)):
        assert np.isfinite(g).all(), name
        assert rel(g, g_ref) < 1e-11, name
    a32 = {k: v.astype(np.float32) for k, v in a.items()}
    y32, c32 = scan.forward(*a32.values())
    assert np.isfinite(y32).all() and rel(y32, y_ref) < 1e-4
    assert all(np.isfinite(g).all() for g in scan.backward(dy.astype(np.float32), c32))


def test_deterministic_across_thread_counts():
    a = {k: v.astype(np.float32) for k, v in make(3, 33, 70, 16).items()}
    dy = np.random.default_rng(5).standard_normal((3, 33, 70)).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            y, c = scan.forward(*a.values())
            results.append((y, *scan.backward(dy, c)))
    finally:
        numba.set_num_threads(before)
    for r in results[1:]:
        assert all(np.array_equal(p, q) for p, q in zip(results[0], r))


def test_bad_shapes_raise():
    a = make(2, 5, 4, 3)
    with pytest.raises(ValueError, match="A must be"):
        scan.forward(a["x"], a["dt"], a["A"][:3], a["B"], a["C"], a["D"])
    with pytest.raises(ValueError, match="B and C"):
        scan.forward(a["x"], a["dt"], a["A"], a["B"][:, :4], a["C"], a["D"])
    with pytest.raises(ValueError, match="float32 or float64"):
        scan.forward(*(v.astype(np.int64) for v in a.values()))
    y, c = scan.forward(*a.values())
    with pytest.raises(ValueError, match="dy must be"):
        scan.backward(y[:, 1:], c)
