"""`minillm quantize`: a model trained with --ternary -> an inference checkpoint with 2-bit packed weights.

Each dense layer of the blocks becomes three tensors (the rest of the model is kept as it is):

    <layer>.weight        uint8 (ceil(O/4), I): four ternary weights per byte (layout: kernels/ternary.py)
    <layer>.weight_scale  (1,) the per-tensor scale s = mean |W|, so W ~ s * W_q (AutoBitLinear's direction)
    <layer>.weight_shape  int64 (2,): (O, I), which the packed shape cannot tell when O % 4 != 0

config.json gets "packed": true. `layers.dense_forward` runs such layers with the packed kernel, which is
bit-identical to the ternary training forward, so sampling gives the same tokens as the unpacked model.
"""

import os

import numpy as np

from minillm import checkpoint
from minillm.nn import ternary
from minillm.tree import flatten, unflatten


def pack_params(params, config):
    """Trained ternary params -> params whose dense weights are packed (see the module docstring)."""
    packed, scales = ternary.quantize_params(params, config)
    shapes = ternary.packed_shapes(params, config)
    flat = dict(flatten(params))
    for name, w in packed.items():
        layer = name[: -len(".weight")]
        flat[name] = w
        flat[layer + ".weight_scale"] = np.asarray(scales[name]).reshape(1)
        flat[layer + ".weight_shape"] = np.asarray(shapes[name], dtype=np.int64)
    return unflatten(flat)


def quantize_checkpoint(src, out):
    """Read the checkpoint `src` (trained with --ternary) and write its packed twin to `out`.
    -> (bytes of src/model.safetensors, bytes of out/model.safetensors)."""
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("--out must differ from the checkpoint: quantizing in place would lose the latent weights")
    ckpt = checkpoint.load_checkpoint(src)
    if ckpt.config.get("packed"):
        raise ValueError(f"{src!r} is already a packed checkpoint")
    if not ckpt.config.get("ternary"):
        raise ValueError(f"{src!r} was not trained with --ternary: rounding its weights to {{-1, 0, 1}} would "
                         "destroy it; train with --ternary first")
    config = dict(ckpt.config, packed=True)
    checkpoint.save_checkpoint(out, pack_params(ckpt.params, ckpt.config), config, tokenizer=ckpt.tokenizer_path)
    size = lambda d: os.path.getsize(os.path.join(d, "model.safetensors"))  # noqa: E731
    return size(src), size(out)
