"""AdamW's update of one tensor, in place (torch.optim.AdamW's single-tensor path, op for op).

    p <- p * decay                                    decay = 1 - lr * weight_decay (1: no decay)
    m <- m + (1 - b1) (g - m)                         (torch's lerp)
    v <- b2 v + (1 - b2) g^2
    p <- p - step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps),   step_size = lr / (1 - b1^t)

The CPU form is one parallel pass over the elements (the reference makes seven, and allocates three
temporaries), the GPU form one fused kernel (adamw_cuda.py); both do the reference's arithmetic in its
order, in the parameters' dtype, with no fused multiply-adds, so all three give the same bits.
"""

import numba
import numpy as np

from minillm.arrays import array_module

BLOCK = 1 << 14              # elements per parallel job


def update_reference(p, g, m, v, decay, beta1, beta2, step_size, bias_correction2_sqrt, eps):
    """p, g, m, v: arrays of one shape (p, m, v updated in place); the rest are Python floats."""
    xp = array_module(p)
    if decay != 1.0:
        p *= decay
    tmp = g - m                       # m <- lerp(m, g, 1 - b1)
    tmp *= 1.0 - beta1
    m += tmp
    v *= beta2                        # v <- b2 v + (1 - b2) g^2
    tmp = g * (1.0 - beta2)
    tmp *= g
    v += tmp
    denom = xp.sqrt(v)
    denom /= bias_correction2_sqrt
    denom += eps
    tmp = m * (-step_size)
    tmp /= denom
    p += tmp


@numba.njit(cache=True, parallel=True, nogil=True)
def _update(p, g, m, v, decay, one_minus_b1, beta2, one_minus_b2, neg_step_size, bc2, eps, decayed):
    for block in numba.prange((p.size + BLOCK - 1) // BLOCK):
        for i in range(block * BLOCK, min(p.size, (block + 1) * BLOCK)):
            pi = p[i] * decay if decayed else p[i]
            mi = m[i] + (g[i] - m[i]) * one_minus_b1
            vi = v[i] * beta2 + g[i] * one_minus_b2 * g[i]
            p[i] = pi + mi * neg_step_size / (np.sqrt(vi) / bc2 + eps)
            m[i] = mi
            v[i] = vi


def update(p, g, m, v, decay, beta1, beta2, step_size, bias_correction2_sqrt, eps):
    """As update_reference, in one pass; arrays that are not all C-contiguous of one dtype take the reference."""
    arrays = (p, g, m, v)
    if not all(a.flags.c_contiguous and a.dtype == p.dtype for a in arrays) or p.dtype.kind != "f":
        return update_reference(p, g, m, v, decay, beta1, beta2, step_size, bias_correction2_sqrt, eps)
    t = p.dtype.type           # the reference's Python floats act in the arrays' dtype (NumPy's scalar rules)
    _update(*(a.reshape(-1) for a in arrays), t(decay), t(1.0 - beta1), t(beta2), t(1.0 - beta2),
            t(-step_size), t(bias_correction2_sqrt), t(eps), decay != 1.0)

