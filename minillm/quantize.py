"""`minillm quantize`: a model trained with --ternary -> an inference checkpoint with 2-bit packed weights.

Each dense layer of the blocks becomes three tensors (the rest of the model is kept as it is):

    <layer>.weight        uint8 (ceil(O/4), I): four ternary weights per byte (layout: kernels/ternary.py)
    <layer>.weight_scale  (1,) the per-tensor scale s = mean |W|, so W ~ s * W_q (AutoBitLinear's direction)
    <layer>.weight_shape  int64 (2,): (O, I), which the packed shape cannot tell when O % 4 != 0

config.json gets "packed": true (and no model_type: Hugging Face cannot run these files as they are, see
hf_config.NO_HF_CLASS). For Llama, `bitnet_export` writes the directory transformers' bitnet
quantization_config runs (BitLinear, offline): the same packed bytes, HF's scale 1 / s, no weight_shape. `layers.dense_forward` runs such layers with the packed kernel, which is
bit-identical to the ternary training forward, so sampling gives the same tokens as the unpacked model.
The source is loaded with full validation (a missing or damaged tensor is refused), and --out may not be the
source itself (compared as files, so a symlink or another spelling of the same directory is caught).
"""

import json
import os

import numpy as np

from minillm import checkpoint, fileio, models, store
from minillm.tree import flatten
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


BITNET_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                 "modules_to_not_convert": ["lm_head"], "use_rms_norm": False}


def bitnet_export(src, out):
    """A packed Llama checkpoint -> a plain directory that transformers loads with its bitnet
    quantization_config (BitLinear divides by weight_scale: HF's scale is 1 / s; it unpacks 4 rows per byte,
    so every packed layer needs O % 4 == 0). minillm itself refuses such a quantization_config (it loads its
    own packed files); the result is for HF only. -> out."""
    store.refuse_overwrite(out, {"the packed checkpoint": src})
    ckpt = checkpoint.load_checkpoint(src)
    config = ckpt.config
    if not config.get("packed") or config["arch"] != "llama":
        raise ValueError(f"{src!r}: bitnet_export takes a packed llama checkpoint (minillm quantize of a --ternary "
                         f"--arch llama model), not a{' packed' if config.get('packed') else 'n unpacked'} "
                         f"{config['arch']} one")
    flat = {}
    for name, a in flatten(ckpt.params).items():
        if name.endswith(".weight_shape"):
            if int(a[0]) % 4:
                raise ValueError(f"{src!r}: {name} = {a.tolist()}: HF's BitLinear unpacks 4 rows per byte, so "
                                 "it cannot hold an output size that is not a multiple of 4")
            continue
        flat[name] = (1.0 / a).astype(np.float32) if name.endswith(".weight_scale") else a
    hf = models.get_model("llama").to_hf_config({k: v for k, v in config.items() if k not in ("packed", "ternary")})
    hf.update(dtype="float32", quantization_config=BITNET_CONFIG)
    os.makedirs(out, exist_ok=True)
    fileio.atomic_write(os.path.join(out, checkpoint.MODEL_FILE),
                        checkpoint._st_bytes({n: np.ascontiguousarray(a) for n, a in flat.items()},
                                             {"format": "pt"}, "parameters"))
    fileio.atomic_write(os.path.join(out, checkpoint.CONFIG_FILE), (json.dumps(hf, indent=2) + "\n").encode())
    if ckpt.tokenizer_path:
        with open(ckpt.tokenizer_path, "rb") as f:
            fileio.atomic_write(os.path.join(out, checkpoint.TOKENIZER_FILE), f.read())
    return out
