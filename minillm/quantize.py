"""`minillm quantize`: a model trained with --ternary -> an inference checkpoint with 2-bit packed weights.

Each dense layer of the blocks becomes three tensors (the rest of the model is kept as it is):

    <layer>.weight        uint8 (ceil(O/4), I): four ternary weights per byte (layout: kernels/ternary.py)
    <layer>.weight_scale  (1,) the per-tensor scale s = mean |W|, so W ~ s * W_q (AutoBitLinear's direction)
    <layer>.weight_shape  int64 (2,): (O, I), which the packed shape cannot tell when O % 4 != 0

config.json gets "packed": true. `layers.dense_forward` runs such layers with the packed kernel, which is
bit-identical to the ternary training forward, so sampling gives the same tokens as the unpacked model.
The source is loaded with full validation (a missing or damaged tensor is refused), and --out may not be the
source itself (compared as files, so a symlink or another spelling of the same directory is caught).
"""

import os

from minillm import checkpoint, store
from minillm.nn.ternary import pack_params  # noqa: F401  (the transform; part of this module's API)


def quantize_checkpoint(src, out):
    """Read the checkpoint `src` (trained with --ternary) and write its packed twin to `out`.
    -> (bytes of src/model.safetensors, bytes of out/model.safetensors)."""
    store.refuse_overwrite(out, {"the checkpoint to quantize (quantizing in place would lose the latent "
                                 "weights)": src})
    ckpt = checkpoint.load_checkpoint(src)
    if ckpt.config.get("packed"):
        raise ValueError(f"{src!r} is already a packed checkpoint")
    if not ckpt.config.get("ternary"):
        raise ValueError(f"{src!r} was not trained with --ternary: rounding its weights to {{-1, 0, 1}} would "
                         "destroy it; train with --ternary first")
    config = dict(ckpt.config, packed=True)
    checkpoint.save_checkpoint(out, pack_params(ckpt.params, ckpt.config), config, tokenizer=ckpt.tokenizer_path)
    size = lambda d: os.path.getsize(os.path.join(d, checkpoint.MODEL_FILE))  # noqa: E731
    return size(src), size(out)
