"""The dense layer every block uses: one hook where LoRA adapters and ternary weights plug in.

    dense_forward(x, p, config, layout) -> (y, cache)
    dense_backward(dy, cache) -> (dx, grads)      grads keyed like p

p = {"weight": W, "bias": b (optional)}; layout "in_out" stores W as (I, O) (HF GPT-2 Conv1D,
y = x W + b), "out_in" as (O, I) (torch nn.Linear, y = x W^T + b). When `config["ternary"]` is true
the weight is quantised to {-1, 0, 1} (BitNet b1.58, see ternary.py). When p holds "lora_A" (r, I)
and "lora_B" (O, r), the low-rank update (alpha / r) x A^T B^T is added (see lora.py); the base weight
is then frozen and gets no gradient. When p holds "weight_scale", W is 2-bit packed ternary (quantize.py)
and the layer runs the packed integer kernel (inference only).
"""

from minillm.nn import ops


def _weight_in_out(w, layout):
    if layout == "in_out":
        return w
    if layout == "out_in":
        return w.T
    raise ValueError(f"unknown dense layout {layout!r}")


def dense_forward(x, p, config, layout):
    """x: (..., I) -> y: (..., O)."""
    if "weight_scale" in p:  # a packed ternary checkpoint (quantize.py): inference only
        from minillm.nn import ternary

        y = ternary.packed_linear_forward(x, p["weight"], p["weight_scale"], p["weight_shape"], p.get("bias"))
        return y, ("packed", None, None, layout, "bias" in p)
    if config.get("ternary"):
        from minillm.nn import ternary

        y, base_cache = ternary.bitlinear_forward(x, p["weight"], p.get("bias"), layout=layout)
        kind = "ternary"
    else:
        y, base_cache = ops.linear_forward(x, _weight_in_out(p["weight"], layout), p.get("bias"))
        kind = "linear"
    lora_cache = None
    if "lora_A" in p:
        from minillm.nn import lora

        dy_lora, lora_cache = lora.lora_delta_forward(x, p["lora_A"], p["lora_B"], config)
        y = y + dy_lora
    return y, (kind, base_cache, lora_cache, layout, "bias" in p)


def dense_backward(dy, cache):
    """dy: (..., O) -> (dx: (..., I), grads keyed like p)."""
    kind, base_cache, lora_cache, layout, has_bias = cache
    if kind == "packed":
        raise ValueError("a packed ternary checkpoint is for inference only; train from the unpacked checkpoint")
    if kind == "ternary":
        from minillm.nn import ternary

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
        from minillm.nn import lora

        dx_lora, grads["lora_A"], grads["lora_B"] = lora.lora_delta_backward(dy, lora_cache)
        dx = dx + dx_lora
    if has_bias:
        grads["bias"] = db
    return dx, grads


def embedding_backward(dy, cache, out=None):
    """dy: (..., C), cache from ops.embedding_forward -> dw: (V, C), added into `out` when given.

    The same sums as ops.embedding_backward, in a fixed order on both devices: the Numba kernel on host
    arrays, the numba.cuda kernel on the GPU (cupy.add.at adds repeated ids atomically, in a different
    order each run, so training would not be reproducible)."""
    ids, shape = cache
    if ops.array_module(dy).__name__ == "numpy":
        from minillm.kernels.embedding import embedding_backward_numba

        return embedding_backward_numba(dy, ids, shape, out=out)
    from minillm.kernels.embedding_cuda import embedding_backward_cuda

    return embedding_backward_cuda(dy, ids, shape, out=out)
