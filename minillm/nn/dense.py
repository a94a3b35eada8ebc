"""The dense layer every block uses: one hook where LoRA adapters and ternary weights plug in.

    mode = dense.mode(config, layout)                 resolved once per forward: layout, ternary, LoRA settings
    dense_forward(x, p, mode) -> (y, cache)
    dense_backward(dy, cache) -> (dx, grads)          grads keyed like p

p = {"weight": W, "bias": b (optional)}; layout "in_out" stores W as (I, O) (HF GPT-2 Conv1D,
y = x W + b), "out_in" as (O, I) (torch nn.Linear, y = x W^T + b). With `mode.ternary` the weight is
quantised to {-1, 0, 1} (BitNet b1.58, see ternary.py). When p holds "lora_A" (r, I) and "lora_B" (O, r),
the low-rank update scale x A^T B^T is added (see lora.py; mode.lora carries the scale and dropout); the
base weight is then frozen and gets no gradient. When p holds "weight_scale", W is 2-bit packed ternary
(quantize.py) and the layer runs the packed integer kernel (inference only).
"""

from typing import NamedTuple

from minillm.nn import lora, ops, ternary

LAYOUTS = ("in_out", "out_in")


class Mode(NamedTuple):
    """How a dense layer computes: the weight's storage layout, BitLinear on or off, LoRA settings or None."""
    layout: str
    ternary: bool = False
    lora: "lora.Settings | None" = None


def mode(config, layout):
    """The Mode of the dense layers stored in `layout` under this model config."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dense layout {layout!r}")
    return Mode(layout, bool(config.get("ternary")), lora.settings(config) if config.get("lora") else None)


def _weight_in_out(w, layout):
    return w if layout == "in_out" else w.T


def dense_forward(x, p, mode):
    """x: (..., I) -> y: (..., O)."""
    if "weight_scale" in p:  # a packed ternary checkpoint (quantize.py): inference only
        y = ternary.packed_linear_forward(x, p["weight"], p["weight_scale"], p["weight_shape"], p.get("bias"))
        return y, ("packed", None, None, mode.layout, "bias" in p)
    if mode.ternary:
        y, base_cache = ternary.bitlinear_forward(x, p["weight"], p.get("bias"), layout=mode.layout)
        kind = "ternary"
    else:
        y, base_cache = ops.linear_forward(x, _weight_in_out(p["weight"], mode.layout), p.get("bias"))
        kind = "linear"
    lora_cache = None
    if "lora_A" in p:
        if mode.lora is None:
            raise ValueError("a dense layer holds a LoRA adapter but the config has no 'lora' section")
        dy_lora, lora_cache = lora.lora_delta_forward(x, p["lora_A"], p["lora_B"], mode.lora)
        y = y + dy_lora
    return y, (kind, base_cache, lora_cache, mode.layout, "bias" in p)


def dense_backward(dy, cache):
    """dy: (..., O) -> (dx: (..., I), grads keyed like p)."""
    kind, base_cache, lora_cache, layout, has_bias = cache
    if kind == "packed":
        raise ValueError("a packed ternary checkpoint is for inference only; train from the unpacked checkpoint")
    if kind == "ternary":
        dx, dw, db = ternary.bitlinear_backward(dy, base_cache)
    elif lora_cache is not None:  # the base weight is frozen: its gradient is never needed
        _, w, _ = base_cache
        dx, dw = dy @ w.T, None
        db = dy.reshape(-1, dy.shape[-1]).sum(axis=0) if has_bias else None
    else:
        dx, dw, db = ops.linear_backward(dy, base_cache)
        dw = dw if layout == "in_out" else dw.T
    grads = {}
    if lora_cache is None:
        grads["weight"] = dw
    else:
        dx_lora, grads["lora_A"], grads["lora_B"] = lora.lora_delta_backward(dy, lora_cache)
        dx = dx + dx_lora
    if has_bias:
        grads["bias"] = db
    return dx, grads
