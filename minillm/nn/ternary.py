"""BitLinear (BitNet b1.58, Ma et al. 2024): ternary weights, 8-bit activations, 2-bit inference.

Quantisers (as HF transformers' integrations/bitnet.py; rounding is half to even, like torch.round):

    weight_quant(W):      s = max(mean |W|, 1e-5)          W_q = clip(round(W (1/s)), -1, 1)   W ~ s W_q
    activation_quant(x):  a = 127 / max(max_j |x_j|, 1e-5)   x_q = clip(round(x a), -128, 127)   x ~ x_q / a
                          (per token: the max runs over the last axis; |x a| <= 127, so x_q >= -127)

BitLinear:  y = Q_a(x) Q_w(W)^T + b, computed as y = (x_q W_q^T) * (s / a) + b. x_q W_q^T is a product of
integers, exact in float32 while 127 * I < 2^24 (I < 132k inputs), so the training forward and the
packed integer kernel (`packed_linear_forward`) give bit-identical outputs: a model sampled from its
packed checkpoint produces the same tokens as the unpacked ternary model.

Backward: the straight-through estimator (BitNet; HF's WeightQuant / ActQuant return the incoming
gradient unchanged): both quantisers count as the identity, so with x~ = x_q / a and W~ = s W_q,

    dx = dy W~        dW = dy^T x~   (the latent full-precision W gets it; AdamW updates W)     db = sum dy

No normalisation inside the layer. The BitNet paper puts a LayerNorm in front of the activation
quantiser (SubLN); HF's BitLinear / AutoBitLinear apply an RMSNorm only when the quantisation config
says use_rms_norm=True (default False), and HF's BitNet model (microsoft/bitnet-b1.58-2B-4T) instead
has explicit attn_sub_norm / ffn_sub_norm RMSNorms before o_proj and down_proj. We match the HF
default: a model that wants SubLN adds the norm itself.

Scale direction (DESIGN.md): HF's `BitLinear` (offline, packed) divides its output by
weight_scale * a, so it expects weight_scale = 1 / s; `AutoBitLinear` multiplies by weight_scale, so
it expects s = mean |W|. The released microsoft/bitnet-b1.58-2B-4T checkpoint declares
linear_class "autobitlinear" (offline): its weight_scale is s, the direction we store (packing and
scale tensors load as they are; only the bias differs: AutoBitLinear offline scales the bias by s,
BitLinear and we add it unscaled; that checkpoint has no biases). Checkpoints made for BitLinear
carry 1 / s (mlx-lm and mlxcel invert the scale for any linear_class but "autobitlinear"). Read from
the peers' code and threads (transformers PR #46808 loads that model through the autobitlinear /
offline path), not from the checkpoint file itself: nothing is downloaded here.

Inference: `quantize_params` packs every dense layer of a trained params tree (2 bits per weight, the
layout of minillm/kernels/ternary.py) with its per-tensor scale s; `packed_linear_forward` runs the
Numba kernel on the packed bytes (int8 activations, int32 accumulation, then one rescale).
"""

import numpy as np

from minillm import kernels
from minillm.kernels import ternary as kt
from minillm.tree import flatten, unflatten

EPS = 1e-5          # both scales' floor (HF: clamp(min=1e-5))
QMIN, QMAX = -128, 127  # int8 activations
LAYOUTS = ("in_out", "out_in")


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dense layout {layout!r}; expected 'in_out' or 'out_in'")


# --- quantisers ---------------------------------------------------------------------------------


def weight_quant(w, eps=EPS):
    """w: any shape (float) -> (w_q: same shape and dtype, values in {-1, 0, 1}; s: scalar array of w's
    dtype) with w ~ s * w_q, s = max(mean |w|, eps) (per tensor). One fused kernel (kernels/ternary_quant.py)."""
    return kernels.pick("ternary_quant", "weight_quant", w)(w, eps)


def activation_quant(x, eps=EPS):
    """x: (..., C) float -> (x_q: (..., C) same dtype, integers in [-128, 127]; a: (..., 1)) with
    x ~ x_q / a, a = 127 / max(max |x| over the last axis, eps) (per token)."""
    return kernels.pick("ternary_quant", "activation_quant", x)(x, eps)


# --- BitLinear (training: fake quantisation + straight-through estimator) -----------------------------


def bitlinear_forward(x, w, b=None, layout="out_in"):
    """x: (..., I), w: (O, I) for "out_in" (nn.Linear) or (I, O) for "in_out" (Conv1D), b: (O,) or None
    -> (y: (..., O), cache). y = Q_a(x) Q_w(w)^T + b (see the module docstring)."""
    _check_layout(layout)
    if w.ndim != 2:
        raise ValueError(f"bitlinear: weight must be 2-D, got shape {w.shape}")
    n_in = w.shape[1] if layout == "out_in" else w.shape[0]
    if x.shape[-1] != n_in:
        raise ValueError(f"bitlinear: input has {x.shape[-1]} features, weight {w.shape} "
                         f"({layout}) expects {n_in}")
    wq, s = weight_quant(w)
    xq, a = activation_quant(x)
    acc = xq @ (wq.T if layout == "out_in" else wq)  # integer-valued: exact
    y = kernels.pick("ternary_quant", "rescale", acc)(acc, s, a, b)  # acc (s / a) + b, in place
    return y, (xq, a, wq, s, layout, b is not None)


def bitlinear_backward(dy, cache):
    """dy: (..., O) -> (dx: (..., I), dw: shaped like w (same layout), db: (O,) or None)."""
    xq, a, wq, s, layout, has_bias = cache
    K = kernels.select("ternary_quant", dy)
    w_deq = K.weight_dequant(wq, s)                           # W~ = s W_q in w's layout
    x_deq = K.activation_dequant(xq, a).reshape(-1, xq.shape[-1])  # x~ = x_q / a, (N, I)
    dy2 = dy.reshape(-1, dy.shape[-1])               # (N, O)
    if layout == "out_in":
        dx = dy @ w_deq
        dw = dy2.T @ x_deq
    else:
        dx = dy @ w_deq.T
        dw = x_deq.T @ dy2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dw, db


# --- packed inference ---------------------------------------------------------------------------------


def pack_weight(w, layout="out_in"):
    """Latent float weight -> (packed: (ceil(O/4), I) uint8, scale: (1,) array of w's dtype, shape (O, I)).
    The packed matrix is always in (out, in) orientation, whatever the source layout."""
    _check_layout(layout)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_weight expects a 2-D weight, got shape {w.shape}")
    wq, s = weight_quant(w)
    w_oi = wq if layout == "out_in" else wq.T
    packed, shape = kt.pack_ternary(w_oi.astype(np.int8))
    return packed, np.asarray(s, dtype=w.dtype).reshape(1), shape


def packed_linear_forward(x, packed, scale, shape, b=None):
    """x: (..., I) float, packed: (ceil(O/4), I) uint8, scale: s (scalar or (1,)), shape: (O, I),
    b: (O,) or None -> y: (..., O) in x's dtype. Inference only (no cache): int8 activations, the Numba
    kernel on the packed bytes, then y = acc * (s / a) + b, bit-identical to bitlinear_forward."""
    O, I = (int(d) for d in shape)
    if x.shape[-1] != I:
        raise ValueError(f"packed linear: input has {x.shape[-1]} features, weight expects {I}")
    xq, a = activation_quant(x)
    xq2 = xq.reshape(-1, I).astype(np.int8)
    K = kernels.select("ternary", packed)
    acc = K.matvec(xq2[0], packed, O)[None] if xq2.shape[0] == 1 else K.matmul(xq2, packed, O)
    s = np.asarray(scale, dtype=x.dtype).reshape(())
    y = acc.reshape(x.shape[:-1] + (O,)).astype(x.dtype) * (s / a)
    if b is not None:
        y = y + b
    return y


def dequantize_weight(packed, scale, shape, layout="out_in", dtype=np.float32):
    """Packed tensor -> the fake-quantised float weight s * W_q in the given layout (for checks)."""
    _check_layout(layout)
    w = kt.unpack_ternary(packed, shape).astype(dtype) * np.asarray(scale, dtype=dtype).reshape(())
    return w if layout == "out_in" else w.T


def quantize_params(params, config):
    """Trained params tree -> (packed, scales) for an inference checkpoint.

    Every dense layer of the blocks (a dict holding a 2-D "weight"; not embeddings / heads, the same
    rule as lora.dense_layers; layouts from lora.layout_of) is quantised with weight_quant and packed:
        packed[name + ".weight"]:  uint8 (ceil(O/4), I), (out, in) orientation for every layout
        scales[name + ".weight"]:  (1,) array of the param dtype, s = max(mean |W|, 1e-5)
    Keys are dotted names as in the checkpoint. The unpacked shape (O, I) is the latent weight's shape
    read in (out, in) orientation (`packed_shapes`); biases, norms and embeddings stay as they are.
    """
    from minillm.nn.lora import dense_layers, layout_of  # the one definition of "dense layer"

    packed, scales = {}, {}
    for name, (node, layout) in _dense_nodes(params, config, dense_layers, layout_of).items():
        packed[name + ".weight"], scales[name + ".weight"], _ = pack_weight(node["weight"], layout)
    return packed, scales


def packed_shapes(params, config):
    """{dotted weight name: (O, I)} for the tensors `quantize_params` packs."""
    from minillm.nn.lora import dense_layers, layout_of

    out = {}
    for name, (node, layout) in _dense_nodes(params, config, dense_layers, layout_of).items():
        r, c = node["weight"].shape
        out[name + ".weight"] = (r, c) if layout == "out_in" else (c, r)
    return out


def _dense_nodes(params, config, dense_layers, layout_of):
    nodes = {}
    for name in dense_layers(params):
        node = params
        for part in name.split("."):
            node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
        nodes[name] = (node, layout_of(name, config))
    return nodes


def pack_params(params, config):
    """Trained ternary params -> params whose dense weights are packed: each dense layer of the blocks gets
    "weight" (uint8, see quantize_params), "weight_scale" (1,) and "weight_shape" int64 (O, I)."""
    packed, scales = quantize_params(params, config)
    shapes = packed_shapes(params, config)
    flat = dict(flatten(params))
    for name, w in packed.items():
        layer = name[: -len(".weight")]
        flat[name] = w
        flat[layer + ".weight_scale"] = np.asarray(scales[name]).reshape(1)
        flat[layer + ".weight_shape"] = np.asarray(shapes[name], dtype=np.int64)
    return unflatten(flat)
