"""BitNet b1.58 fake quantisation on the GPU: the NumPy references of kernels/ternary_quant.py run on CuPy arrays.

No numba.cuda kernels yet: each function is the array-module generic reference (CuPy elementwise and
reductions), i.e. the GPU path ternary training had before the CPU kernels were fused; the dispatch
(kernels.select("ternary_quant", like)) finds the same names here as in ternary_quant.py.

    weight_quant(w, eps) -> (w_q, s)         activation_quant(x, eps) -> (x_q, a)
    rescale(acc, s, a, b) -> y               weight_dequant(w_q, s)   activation_dequant(x_q, a)
"""

from minillm.kernels import ternary_quant as _ref


def weight_quant(w, eps):
    return _ref.weight_quant_reference(w, eps)


def activation_quant(x, eps):
    return _ref.activation_quant_reference(x, eps)


def rescale(acc, s, a, b=None):
    return _ref.rescale_reference(acc, s, a, b)


def weight_dequant(wq, s):
    return _ref.weight_dequant_reference(wq, s)


def activation_dequant(xq, a):
    return _ref.activation_dequant_reference(xq, a)
