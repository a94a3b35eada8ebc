"""kernels/fastexp.py: the kernels' exp is within 2 ulp of np.exp, handles under/overflow, inf and NaN,
and a loop around it vectorises (the reason it exists)."""

import re

import numba
import numpy as np
import pytest

from minillm.kernels.fastexp import fast_exp, fast_exp_array


def test_accuracy_over_the_normal_range():
    v = np.concatenate([np.linspace(-708.39, 709.43, 200_001), np.linspace(-1, 1, 10_001)])
    assert np.abs(fast_exp_array(v) / np.exp(v) - 1).max() < 4.5e-16             # 2 ulp
    v32 = np.concatenate([np.linspace(-87.33, 88.37, 200_001), np.linspace(-1, 1, 10_001)]).astype(np.float32)
    e32 = fast_exp_array(v32)
    assert e32.dtype == np.float32
    assert np.abs(e32 / np.exp(v32.astype(np.float64)) - 1).max() < 1.2e-7       # 2 ulp of float32


@pytest.mark.parametrize("dtype, lo, hi", [(np.float64, -708.3964, 709.43), (np.float32, -87.336, 88.37)])
def test_special_values(dtype, lo, hi):
    x = np.array([np.nan, -np.inf, -1e30, lo - 0.01, lo, 0.0, -0.0, hi, hi + 0.01, 1e30, np.inf], dtype)
    e = fast_exp_array(x)
    assert np.isnan(e[0])
    assert (e[1:4] == 0).all()                         # below the smallest normal result: 0, not subnormal
    assert e[4] >= np.finfo(dtype).tiny and e[5] == 1 and e[6] == 1
    assert np.isfinite(e[7]) and e[7] > np.finfo(dtype).max / 2
    assert (e[8:] == np.inf).all()                     # overflow: inf (from 1023.5 ln 2, 127.5 ln 2)


def test_python_stand_in_is_numpy():
    assert fast_exp(0.5) == np.exp(0.5)


@numba.njit
def _exp_loop(v, out):
    for i in range(v.size):
        out[i] = fast_exp(v[i])


@pytest.mark.parametrize("dtype, llvm_type", [(np.float64, "double"), (np.float32, "float")])
def test_loop_vectorises(dtype, llvm_type):
    v = np.linspace(-5, 5, 64).astype(dtype)
    out = np.empty_like(v)
    _exp_loop(v, out)
    assert np.abs(out / np.exp(v.astype(np.float64)) - 1).max() < 1.2e-7
    ir = next(ir for sig, ir in _exp_loop.inspect_llvm().items() if sig[0].dtype == numba.from_dtype(dtype))
    assert re.search(rf"<\d+ x {llvm_type}>", ir), "LLVM did not vectorise the fast_exp loop"
