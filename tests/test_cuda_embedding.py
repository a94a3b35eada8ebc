"""numba.cuda embedding backward (kernels/embedding_cuda.py) against the NumPy reference (np.add.at in
kernels/embedding.py): on a real GPU when there is one, else in Numba's CUDA simulator (set here too for a
direct run)."""

import os

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from minillm.kernels import embedding  # noqa: E402
from minillm.kernels import embedding_cuda  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_reference_bit_for_bit(dtype):
    """Only additions, in the reference's order (repeats of an id in position order): exact equality."""
    rng = np.random.default_rng(0)
    V, C = 7, 5
    ids = rng.integers(0, V, (3, 11))
    ids[0, :6] = 2                                  # a long run of one id
    dy = rng.standard_normal((3, 11, C)).astype(dtype)
    want = embedding.backward_reference(dy, ids, (V, C))
    got = embedding_cuda.backward(dy, ids, (V, C))
    assert isinstance(got, np.ndarray) and got.dtype == dtype
    assert np.array_equal(got, want)
    base = rng.standard_normal((V, C)).astype(dtype)
    out = cuda.to_device(base)
    res = embedding_cuda.backward(cuda.to_device(dy), cuda.to_device(ids), (V, C), out=out)
    assert res is out
    assert np.array_equal(out.copy_to_host(), embedding.backward(dy, ids, (V, C), out=base.copy()))


def test_more_channels_than_a_block_and_unused_rows():
    rng = np.random.default_rng(1)
    V, C = 4, 130                                    # two channel blocks, the second nearly empty
    ids = np.array([3, 0, 3, 3])
    dy = rng.standard_normal((4, C))
    got = embedding_cuda.backward(dy, ids, (V, C))
    assert np.array_equal(got, embedding.backward_reference(dy, ids, (V, C)))
    assert not got[1].any() and not got[2].any()


def test_bad_inputs():
    dy = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"ids outside \[0, 4\)"):
        embedding_cuda.backward(dy, np.array([0, 4]), (4, 3))
    with pytest.raises(ValueError, match="ids.shape"):
        embedding_cuda.backward(dy, np.array([0, 1, 2]), (4, 3))
    with pytest.raises(ValueError, match="GPU array"):
        embedding_cuda.backward(dy, np.array([0, 1]), (4, 3), out=np.zeros((4, 3)))
