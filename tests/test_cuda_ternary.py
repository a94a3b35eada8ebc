"""numba.cuda packed ternary product == the NumPy reference, exactly (simulator without a GPU)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba.cuda is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minillm.kernels import ternary as kt  # noqa: E402
from minillm.kernels import ternary_cuda as ktc  # noqa: E402

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _case(seed, O, I, M):
    rng = np.random.default_rng(seed)
    w = rng.integers(-1, 2, size=(O, I)).astype(np.int8)
    x = rng.integers(-128, 128, size=(M, I)).astype(np.int8)
    return kt.pack_ternary(w)[0], x


# the simulator runs every GPU thread as a Python thread: keep the grids tiny there
# I % 4 == 0 takes the 32-bit-word kernel (TOKENS = 8 tokens a block), other I the byte kernel
SHAPES = [(5, 3, 2), (6, 64, 2), (3, 8, 9), (8, 130, 1)]
if not SIM:
    SHAPES += [(13, 1000, 7), (64, 256, 20), (4096, 4096, 3)]


@pytest.mark.parametrize("O,I,M", SHAPES)
def test_cuda_matmul_equals_reference(O, I, M):
    packed, x = _case(O + I + M, O, I, M)
    y = ktc.matmul(x, packed, O)
    assert y.dtype == np.int32 and y.shape == (M, O)
    np.testing.assert_array_equal(y, kt.matmul_reference(x, packed, O))


def test_cuda_matvec_extremes():
    # x = -128 everywhere, W = +1: the largest magnitudes the int32 sums see
    O, I = 3, 200
    packed = kt.pack_ternary(np.ones((O, I), np.int8))[0]
    x = np.full(I, -128, np.int8)
    np.testing.assert_array_equal(ktc.matvec(x, packed, O), np.full(O, -128 * I))


def test_cuda_device_arrays():
    """Device inputs and a preallocated device output: the result stays on the device."""
    from numba import cuda

    packed, x = _case(9, 7, 40, 2)
    out = cuda.device_array((2, 7), dtype=np.int32)
    y = ktc.matmul(cuda.to_device(x), cuda.to_device(packed), 7, out=out)
    assert y is out
    np.testing.assert_array_equal(out.copy_to_host(), kt.matmul_reference(x, packed, 7))


def test_cuda_bad_input():
    packed = kt.pack_ternary(np.zeros((4, 3), np.int8))[0]
    with pytest.raises(ValueError, match="int8"):
        ktc.matmul(np.zeros((1, 4), np.int8), packed, 4)
    with pytest.raises(ValueError, match="rows"):
        ktc.matmul(np.zeros((1, 3), np.int8), packed, 8)


def test_quantisers_on_the_gpu_path_are_the_reference():
    """ternary_quant has no numba.cuda kernels: its CUDA twin runs the array-generic references (CuPy on a
    GPU), so forced("cuda") training gives the reference's values and every name the dispatch needs exists."""
    from minillm import kernels
    from minillm.kernels import ternary_quant as tq
    from minillm.kernels import ternary_quant_cuda as tqc
    from minillm.nn import ternary

    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    w = (rng.standard_normal((8, 16)) * 0.05).astype(np.float32)
    for name in ("weight_quant", "activation_quant", "rescale", "weight_dequant", "activation_dequant"):
        assert kernels.pick("ternary_quant", name, x) is getattr(tq, name)
        with kernels.forced("cuda", ops=("ternary_quant",)):
            assert kernels.pick("ternary_quant", name, x) is getattr(tqc, name)
    with kernels.forced("cuda", ops=("ternary_quant",)):
        y, cache = ternary.bitlinear_forward(x, w)
        grads = ternary.bitlinear_backward(np.ones_like(y), cache)
    with kernels.forced("reference", ops=("ternary_quant",)):
        y_ref, cache_ref = ternary.bitlinear_forward(x, w)
        grads_ref = ternary.bitlinear_backward(np.ones_like(y), cache_ref)
    np.testing.assert_array_equal(y, y_ref)
    for g, r in zip(grads[:2], grads_ref[:2]):
        np.testing.assert_array_equal(g, r)
