"""A vectorisable exp() for the Numba CPU kernels (selective scan, WKV, MoE's SwiGLU).

Why: inside a Numba loop, `math.exp` / `np.exp` is a call to libm's scalar exp, and LLVM does not
vectorise a loop containing it (that needs SVML, which Numba only uses with fastmath, which this project
does not allow). In the scan and WKV kernels the exp calls were most of the run time. `fast_exp` is
plain arithmetic, so the loops around it vectorise; use it in jitted code on float32 / float64 scalars:

    from minillm.kernels.fastexp import fast_exp
    e = fast_exp(-abs(h))        # inside an @numba.njit function

Outside Numba, `fast_exp` is NumPy's exp (a stand-in, so the NumPy references stay the specification).

Method: x = k ln2 + r with k = round(x / ln2) and |r| <= ln2 / 2 (Cody-Waite: ln2 split in a part whose
products with k are exact, plus a correction); e^r by its Taylor polynomial (degree 13 for float64,
7 for float32: truncation below half an ulp); 2^k built from its exponent bits (one multiply: building it
as two factors, so that the top half-binade stays finite, cost 10-15% more).

Accuracy: within 2 ulp of the correctly rounded exp (tested against np.exp over the whole normal range:
relative error < 4.5e-16 in float64, < 1.2e-7 in float32). Results differ from np.exp in the last bits,
so kernels using it match their NumPy references to a few ulps, not bitwise.

Special values:
- underflow: where exp(x) is below the smallest normal number (x < ln 2^-1022 = -708.396 in float64,
  x < ln 2^-126 = -87.337 in float32), the result is 0, also for -inf (no subnormals: "flush to zero";
  subnormal arithmetic would also be slow on x86).
- overflow: the result is inf from x > 1023.5 ln 2 = 709.437 in float64 (x > 127.5 ln 2 = 88.376 in
  float32), a little before the true threshold ln(max float) = 709.783 (88.723): there k = 1024 (128),
  and 2^k is not a finite float. +inf gives inf. (The kernels only take exp of exponents <= ~0.)
- NaN gives NaN.
Deterministic: no dependence on thread count or vector width (the same operations on every lane).

Note: Numba's cache (cache=True) of a kernel is not invalidated when only this file changes; after
editing it, delete the kernels' __pycache__ (or touch the kernels' files).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

# ln of the smallest normal number (below: result 0) and a clamp past the overflow threshold (so that
# the float -> int conversion of k never sees a huge value; at the clamp 2^k is inf, so +inf gives inf)
_LO64, _HI64 = -708.3964185322641, 710.0
_LO32, _HI32 = np.float32(-87.33654), np.float32(89.0)


@intrinsic
def _int_bits_as_float(typingctx, i):
    """Reinterpret an int32 / int64 as the float32 / float64 with the same bits."""
    if i == types.int32:
        sig, llty = types.float32(types.int32), ir.FloatType()
    elif i == types.int64:
        sig, llty = types.float64(types.int64), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llty)

    return sig, codegen


@register_jitable
def _exp64(x):
    c = min(max(x, _LO64), _HI64)  # (min, max let NaN through: r and the result are then NaN)
    k = np.floor(c * 1.4426950408889634 + 0.5)
    r = (c - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
    e = (1 / 6227020800 * r + 1 / 479001600) * r + 1 / 39916800  # 1/13!, 1/12!, 1/11!
    e = ((((e * r + 1 / 3628800) * r + 1 / 362880) * r + 1 / 40320) * r + 1 / 5040) * r
    e = ((((e + 1 / 720) * r + 1 / 120) * r + 1 / 24) * r + 1 / 6) * r
    e = ((e + 0.5) * r + 1.0) * r + 1.0
    y = e * _int_bits_as_float((np.int64(k) + np.int64(1023)) << np.int64(52))
    return 0.0 if x < _LO64 else y


@register_jitable
def _exp32(x):
    c = min(max(x, _LO32), _HI32)
    k = np.floor(c * np.float32(1.4426950408889634) + np.float32(0.5))
    r = (c - k * np.float32(0.693359375)) - k * np.float32(-2.12194440054690582e-4)
    e = np.float32(1 / 5040) * r + np.float32(1 / 720)
    e = (((e * r + np.float32(1 / 120)) * r + np.float32(1 / 24)) * r + np.float32(1 / 6)) * r
    e = ((e + np.float32(0.5)) * r + np.float32(1.0)) * r + np.float32(1.0)
    y = e * _int_bits_as_float(np.int32((np.int32(k) + np.int32(127)) << np.int32(23)))
    return np.float32(0.0) if x < _LO32 else y


def fast_exp(x):
    """exp(x) of a float32 / float64 scalar; in jitted code `_exp32` / `_exp64` (see the module doc)."""
    return np.exp(x)


@overload(fast_exp)
def _fast_exp_overload(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    if x == types.float64:
        return lambda x: _exp64(x)
    return None


@numba.njit(cache=True)
def fast_exp_array(v):
    """Elementwise `fast_exp` of a 1-D float32 / float64 array (for tests)."""
    out = np.empty_like(v)
    for i in range(v.size):
        out[i] = fast_exp(v[i])
    return out
