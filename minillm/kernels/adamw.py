"""AdamW's update of one tensor, in place (torch.optim.AdamW's single-tensor path, op for op).

    p <- p * decay                                    decay = 1 - lr * weight_decay (1: no decay)
    m <- m + (1 - b1) (g - m)                         (torch's lerp)
    v <- b2 v + (1 - b2) g^2
    p <- p - step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps),   step_size = lr / (1 - b1^t)

The CPU form is the NumPy reference itself (a handful of in-place passes, already memory-bound); the
GPU form is one fused kernel (adamw_cuda.py) with the same arithmetic.
"""

import numpy as np

from minillm.arrays import array_module


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


update = update_reference

