"""2-bit ternary packing and the integer product y = x_q W^T: Numba kernels == NumPy reference, exactly;
the packing equals HF transformers' pack_weights / unpack_weights."""

import numba
import numpy as np
import pytest

from minillm.kernels import ternary as kt


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
