"""The SwiGLU feed-forward of Llama (HF LlamaMLP, hidden_act="silu", mlp_bias=False).

    swiglu_forward(x, p, config) -> (y, MLPCache)       x, y: (..., C)
    swiglu_backward(dy, cache) -> (dx, grads)           grads keyed like p

    y = down_proj(silu(gate_proj(x)) * up_proj(x))      (Shazeer 2020, "GLU Variants", eq. 6)

p: gate_proj (F, C), up_proj (F, C), down_proj (C, F), nn.Linear (out, in) weights through the dense
hook (LoRA, ternary). The elementwise silu(g) * u and its backward are the fused SwiGLU kernel the MoE
experts use (kernels/moe.py; silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)). Mixtral's experts are this
MLP under the names w1 (gate), w3 (up), w2 (down) (nn/moe.py).
"""

from typing import NamedTuple

from minillm import kernels
from minillm.nn import dense


class MLPCache(NamedTuple):
    gate_proj: tuple
    up_proj: tuple
    down_proj: tuple
    g: object           # (N, F) gate_proj(x)
    u: object           # (N, F) up_proj(x)


def swiglu_forward(x, p, config):
    """x: (..., C) -> y: (..., C). Returns (y, MLPCache)."""
    linear = dense.mode(config, "out_in")
    x2 = x.reshape(-1, x.shape[-1])
    g, c_g = dense.dense_forward(x2, p["gate_proj"], linear)
    u, c_u = dense.dense_forward(x2, p["up_proj"], linear)
    a = kernels.pick("moe", "swiglu", g)(g, u)
    y, c_d = dense.dense_forward(a, p["down_proj"], linear)
    return y.reshape(x.shape[:-1] + y.shape[-1:]), MLPCache(c_g, c_u, c_d, g, u)


def swiglu_backward(dy, cache):
    """dy: (..., C) -> (dx: (..., C), grads keyed like p)."""
    da, g_down = dense.dense_backward(dy.reshape(-1, dy.shape[-1]), cache.down_proj)
    dg, du = kernels.pick("moe", "swiglu_backward", da)(da, cache.g, cache.u)
    dx, g_gate = dense.dense_backward(dg, cache.gate_proj)
    dxu, g_up = dense.dense_backward(du, cache.up_proj)
    dx += dxu
    return dx.reshape(dy.shape[:-1] + dx.shape[-1:]), {"gate_proj": g_gate, "up_proj": g_up, "down_proj": g_down}
