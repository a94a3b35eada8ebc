"""2-bit ternary packing and the integer product y = x_q W^T: Numba kernels == NumPy reference, exactly;
the packing equals HF transformers' pack_weights / unpack_weights. The training quantisers
(kernels/ternary_quant.py): Numba kernels == NumPy reference bit for bit, the mean |w| equal to NumPy's
own np.abs(w).mean(), the same bits for any thread count, and no out-of-bounds access (NUMBA_BOUNDSCHECK=1
in a child process)."""

import numba
import numpy as np
import pytest

from boundscheck import assert_runs_with_boundscheck
from minillm.kernels import ternary as kt
from minillm.kernels import ternary_quant as tq


def _w(rng, O, I):
    return rng.integers(-1, 2, size=(O, I)).astype(np.int8)


def _x(rng, *shape):
    return rng.integers(-128, 128, size=shape).astype(np.int8)


# --- packing --------------------------------------------------------------------------------------------


def test_pack_layout_by_hand():
    # O = 4 -> R = 1: byte (0, i) holds rows 0..3 of column i, row 0 in the low bits, code = w + 1
    w = np.array([[1, 0], [0, -1], [-1, 1], [1, 1]], np.int8)
    packed, shape = kt.pack_ternary(w)
    assert shape == (4, 2) and packed.dtype == np.uint8 and packed.shape == (1, 2)
    assert packed[0, 0] == 2 | (1 << 2) | (0 << 4) | (2 << 6)
    assert packed[0, 1] == 1 | (0 << 2) | (2 << 4) | (2 << 6)
    # O = 8 -> R = 2: byte (r, i) holds rows r, 2 + r, 4 + r, 6 + r
    w8 = np.zeros((8, 1), np.int8)
    w8[5, 0] = 1  # row 5 = 2 * R + 1 -> byte (1, 0), bits 4-5
    packed8, _ = kt.pack_ternary(w8)
    assert packed8[0, 0] == 0b01010101 and packed8[1, 0] == 0b01100101


@pytest.mark.parametrize("O,I", [(1, 1), (3, 5), (4, 7), (13, 70), (64, 3)])
def test_pack_unpack_roundtrip(O, I):
    rng = np.random.default_rng(O * 100 + I)
    w = _w(rng, O, I)
    packed, shape = kt.pack_ternary(w)
    assert packed.shape == (kt.packed_rows(O), I) and shape == (O, I)
    np.testing.assert_array_equal(kt.unpack_ternary(packed, shape), w)
    # padding rows (O % 4 != 0) hold code 1 = weight 0
    codes = np.stack([(packed >> (2 * s)) & 3 for s in range(4)]).reshape(-1, I)
    assert (codes[O:] == 1).all() and (codes != 3).all()


def test_pack_matches_hf():
    """Our layout is HF's: HF pack_weights gives the same bytes, HF unpack_weights the same matrix."""
    torch = pytest.importorskip("torch")  # always installed in the test env
    torch._dynamo.config.disable = True   # HF wraps unpack_weights in torch.compile; run it eagerly
    from transformers.integrations import bitnet as hf

    rng = np.random.default_rng(0)
    w = _w(rng, 16, 9)
    packed, shape = kt.pack_ternary(w)
    hf_packed = hf.pack_weights(torch.from_numpy(w.copy())).numpy()
    np.testing.assert_array_equal(hf_packed, packed)
    hf_w = hf.unpack_weights(torch.from_numpy(packed), dtype=torch.int16).numpy()
    np.testing.assert_array_equal(hf_w, w)


def test_pack_bad_input():
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        kt.pack_ternary(np.array([[2, 0]]))
    with pytest.raises(ValueError, match="2-D"):
        kt.pack_ternary(np.zeros(4, np.int8))
    packed, shape = kt.pack_ternary(np.zeros((8, 3), np.int8))
    with pytest.raises(ValueError, match="must be"):
        kt.unpack_ternary(packed, (12, 3))
    with pytest.raises(ValueError, match="uint8"):
        kt.unpack_ternary(packed.astype(np.int8), shape)
    bad = packed.copy()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match="code 3"):
        kt.unpack_ternary(bad, shape)
    with pytest.raises(ValueError, match="int8"):
        kt.matvec(np.zeros(3, np.int16), packed, 8)
    with pytest.raises(ValueError, match="features"):
        kt.matmul(np.zeros((2, 4), np.int8), packed, 8)


# --- the product ----------------------------------------------------------------------------------------


def test_reference_is_integer_matmul():
    rng = np.random.default_rng(1)
    w, x = _w(rng, 10, 33), _x(rng, 4, 33)
    packed, _ = kt.pack_ternary(w)
    y = kt.matmul_reference(x, packed, 10)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, x.astype(np.int64) @ w.T.astype(np.int64))


# I around the lane width (64) and past one int16 group (64 * 128 = 8192 inputs); O % 4 != 0
SHAPES = [(1, 1), (5, 3), (8, 64), (13, 65), (32, 200), (7, 8192 + 70), (40, 1000)]


@pytest.mark.parametrize("O,I", SHAPES)
def test_kernels_equal_reference(O, I):
    rng = np.random.default_rng(O * 7 + I)
    w = _w(rng, O, I)
    packed, _ = kt.pack_ternary(w)
    x = _x(rng, 5, I)
    ref = kt.matmul_reference(x, packed, O)
    y = kt.matmul(x, packed, O)
    assert y.dtype == np.int32 and y.shape == (5, O)
    np.testing.assert_array_equal(y, ref)
    for m in range(2):
        v = kt.matvec(x[m], packed, O)
        assert v.dtype == np.int32 and v.shape == (O,)
        np.testing.assert_array_equal(v, ref[m])


@pytest.mark.parametrize("wval,xval", [(1, 127), (1, -128), (-1, -128), (-1, 127), (0, -128)])
def test_kernels_extremes_do_not_overflow(wval, xval):
    """Constant W and x at the int8 limits: the int16 lane sums hit their worst case (code 2 or 0 times
    -128 or 127, GROUP tiles of them) and must still be exact."""
    O, I = 9, 64 * kt.GROUP * 2 + 5
    w = np.full((O, I), wval, np.int8)
    packed, _ = kt.pack_ternary(w)
    x = np.full((2, I), xval, np.int8)
    expect = np.full((2, O), wval * xval * I, np.int64)
    np.testing.assert_array_equal(kt.matmul(x, packed, O), expect)
    np.testing.assert_array_equal(kt.matvec(x[0], packed, O), expect[0])


def test_kernels_deterministic_across_threads():
    rng = np.random.default_rng(3)
    O, I = 50, 300
    packed, _ = kt.pack_ternary(_w(rng, O, I))
    x = _x(rng, 6, I)
    old = numba.get_num_threads()
    try:
        results = []
        for n in sorted({1, old}):
            numba.set_num_threads(n)
            results.append((kt.matmul(x, packed, O), kt.matvec(x[0], packed, O)))
    finally:
        numba.set_num_threads(old)
    for mm, mv in results[1:]:
        np.testing.assert_array_equal(mm, results[0][0])
        np.testing.assert_array_equal(mv, results[0][1])


def test_matmul_no_tokens():
    packed, _ = kt.pack_ternary(np.zeros((4, 3), np.int8))
    assert kt.matmul(np.zeros((0, 3), np.int8), packed, 4).shape == (0, 4)


# --- training quantisers (ternary_quant) -----------------------------------------------------------------

QUANT_SHAPES = [(0,), (1,), (1, 1), (3, 7), (2, 5, 9), (8, 127), (700, 333), (3, 40000)]


def _same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bitwise: -0.0 and NaN payloads included


def _quant_case(rng, shape, dtype, scale):
    a = (rng.standard_normal(shape) * scale).astype(dtype)
    if a.size > 3:  # exact halves: round half to even must agree
        a.reshape(-1)[:3] = [0.5, -1.5, 2.5]
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", QUANT_SHAPES)
def test_quantisers_equal_reference_bitwise(dtype, shape):
    rng = np.random.default_rng(len(shape) * 1000 + sum(shape))
    for scale in (0.02, 1.0, 1e-7):
        w = _quant_case(rng, shape, dtype, scale)
        with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning) if w.size == 0 else _nothing():
            want = tq.weight_quant_reference(w, 1e-5)
        got = tq.weight_quant(w, 1e-5)
        _same_bits(got[0], want[0])
        _same_bits(got[1], want[1])
        _same_bits(tq.weight_dequant(*want), tq.weight_dequant_reference(*want))
        if w.ndim == 0 or w.shape[-1] == 0:
            continue
        xq, a = tq.activation_quant_reference(w, 1e-5)
        got = tq.activation_quant(w, 1e-5)
        _same_bits(got[0], xq)
        _same_bits(got[1], a)
        _same_bits(tq.activation_dequant(xq, a), tq.activation_dequant_reference(xq, a))
        acc = xq @ rng.integers(-1, 2, (w.shape[-1], 6)).astype(dtype)  # integer-valued, like x_q W_q^T
        b = rng.standard_normal(6).astype(dtype)
        for bias in (None, b):
            _same_bits(tq.rescale(acc.copy(), want[1], a, bias), tq.rescale_reference(acc, want[1], a, bias))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_weight_mean_is_numpys_pairwise_sum():
    """The kernel's sum |w| is NumPy's own (pairwise, split in the recursion's places): lengths around
    the 8-way unroll, the 128 block and the parallel leaves, many seeds, against np.abs(w).mean()."""
    rng = np.random.default_rng(5)
    lengths = [1, 7, 8, 9, 127, 128, 129, 136, 1000, 8191, 8192, 8193, 2 * tq.MIN_LEAF + 1,
               tq.MIN_LEAF * 2 ** tq.DEPTH + 13, 300007]
    for n in lengths:
        for _ in range(3):
            w = (rng.standard_normal(n) * 0.02).astype(np.float32)
            _same_bits(tq.weight_quant(w, 1e-5)[1], np.maximum(np.abs(w).mean(), np.float32(1e-5)))
    starts, sizes = tq._leaves(300007)
    assert len(starts) > 1 and starts[0] == 0 and (starts[1:] == starts[:-1] + sizes[:-1]).all()
    assert starts[-1] + sizes[-1] == 300007


def test_quantisers_nan_inf_and_zero_rows():
    w = np.array([[0.1, np.nan, -0.2], [np.inf, 0.0, -0.0]], np.float32)
    for row in (w, w[1:], np.zeros((2, 3), np.float32), -np.zeros((1, 4), np.float32)):
        with np.errstate(invalid="ignore"):
            want, want_a = tq.weight_quant_reference(row, 1e-5), tq.activation_quant_reference(row, 1e-5)
            got, got_a = tq.weight_quant(row, 1e-5), tq.activation_quant(row, 1e-5)
        for g, r in zip(got + got_a, want + want_a):
            _same_bits(g, r)


def test_quantisers_fall_back_on_other_arrays():
    """Non-contiguous, integer or mixed-dtype inputs take the reference: the same values."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((9, 12)).astype(np.float32)
    for arr in (w.T, w[:, ::2]):
        _same_bits(tq.weight_quant(arr, 1e-5)[0], tq.weight_quant_reference(arr, 1e-5)[0])
        _same_bits(tq.activation_quant(arr, 1e-5)[0], tq.activation_quant_reference(arr, 1e-5)[0])
    xq, a = tq.activation_quant_reference(w, 1e-5)
    acc = xq.astype(np.float64) @ np.ones((12, 3))  # float64 acc with float32 scales
    _same_bits(tq.rescale(acc.copy(), np.float32(0.5), a), tq.rescale_reference(acc, np.float32(0.5), a))
    with pytest.raises(ValueError):
        tq.activation_quant(np.zeros((2, 0), np.float32), 1e-5)  # as NumPy: no max of no features


def test_quantisers_deterministic_across_threads():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((1024, 700)) * 0.02).astype(np.float32)  # 64 leaves of the parallel sum
    assert len(tq._leaves(w.size)[0]) == 2 ** tq.DEPTH
    old = numba.get_num_threads()
    try:
        results = []
        for n in sorted({1, 2, old}):
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            results.append(tq.weight_quant(w, 1e-5) + tq.activation_quant(w, 1e-5))
    finally:
        numba.set_num_threads(old)
    for r in results[1:]:
        for g, want in zip(r, results[0]):
            _same_bits(g, want)


def test_quant_kernels_with_boundscheck(tmp_path):
    """Every quantiser kernel on empty, one-element, ragged and multi-leaf inputs in a child process with
    NUMBA_BOUNDSCHECK=1 (its own Numba cache: compiled without bounds checks elsewhere)."""
    code = """
import numpy as np
from minillm.kernels import ternary_quant as tq
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    for shape in [(1,), (1, 1), (3, 7), (5, 9000), (2 * tq.MIN_LEAF * 2 ** tq.DEPTH + 9,)]:
        w = rng.standard_normal(shape).astype(dt)
        wq, s = tq.weight_quant(w, 1e-5)
        assert wq.tobytes() == tq.weight_quant_reference(w, 1e-5)[0].tobytes()
        tq.weight_dequant(wq, s)
        xq, a = tq.activation_quant(w, 1e-5)
        tq.activation_dequant(xq, a)
        acc = xq[..., :1] * np.ones(4, dt)
        tq.rescale(acc, s, a, np.ones(4, dt))
        tq.rescale(acc, s, a)
    z = np.zeros((0, 3), dt)
    tq.activation_dequant(*tq.activation_quant(z, 1e-5))
    tq.rescale(np.zeros((0, 4), dt), dt(1), np.zeros((0, 1), dt))
print("bounds ok")
"""
    assert_runs_with_boundscheck(code, tmp_path)
