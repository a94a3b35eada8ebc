"""Architecture registry: name -> model module, and building a full config from defaults + overrides.

A model module offers DEFAULTS (its own config keys), init(config, rng), forward(params, idx, config),
backward(dlogits, cache), init_state(params, config, batch), step(params, tokens, state) and optionally
aux_loss(cache) and stats(cache). It also declares its facts, which the rest of minillm reads instead of
naming architectures:

    HF_CLASS            the transformers class it matches (None: no HF twin)
    HF_MODEL_TYPES      the HF config model_type(s) it runs; with to_hf_config(config) -> HF config keys,
                        from_hf_config(reader) -> minillm config (reader: hf_config.HFReader, which refuses
                        values the module does not implement) and optionally from_hf_weights(flat, config)
                        (HF's tensors -> ours: buffers, tied heads, fused experts); see minillm/hf_config.py
    OPTIONS             config keys a user may set for it beyond the shared ones (cli checks flags with it)
    LORA_TARGETS        default LoRA targets (dotted-name patterns)
    NO_DECAY            name fragments of tensors that get no weight decay (train builds the mask with it)
    BOUNDED_POSITIONS   learned positions: a sequence holds at most `context` tokens (generate checks it);
                        False for recurrent models and RoPE (llama, mixtral: `context` is the trained length)

The packages below: models/ (this registry and the models), nn/ (layers), kernels/ (hot loops, one
dispatch), reference/ (golden cases).
"""

import importlib

import numpy as np

ARCHITECTURES = {
    "gpt": "minillm.models.gpt",
    "moe": "minillm.models.moe",
    "mamba": "minillm.models.mamba",
    "rwkv": "minillm.models.rwkv",
    "llama": "minillm.models.llama",
    "mixtral": "minillm.models.mixtral",
}

# Keys every architecture shares; each module's DEFAULTS adds its own.
BASE_DEFAULTS = {
    "vocab_size": 2048,
    "context": 64,
    "n_layer": 4,
    "n_head": 4,
    "d_model": 128,
    "dtype": "float32",
    "ternary": False,
}


def get_model(arch):
    """The module implementing architecture `arch` (a key of ARCHITECTURES)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return importlib.import_module(ARCHITECTURES[arch])


def build_config(arch, **overrides):
    """Defaults of `arch` updated by the overrides that are not None -> a JSON-able config dict."""
    module = get_model(arch)
    config = {"arch": arch, **BASE_DEFAULTS, **getattr(module, "DEFAULTS", {})}
    for key, value in overrides.items():
        if value is not None:
            config[key] = value
    if config["d_model"] % config["n_head"]:
        raise ValueError(f"--d-model {config['d_model']} is not divisible by --heads {config['n_head']}")
    for key in ("vocab_size", "context", "n_layer", "n_head", "d_model"):
        if int(config[key]) < 1:
            raise ValueError(f"{key} must be positive, got {config[key]}")
    return config


def param_dtype(config):
    """config["dtype"] ("float32" by default, or "float64") as a numpy dtype."""
    name = config.get("dtype", "float32")
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {name!r}")
    return np.dtype(name)


def check_token_ids(idx, config, what="idx"):
    """Integer ids in [0, vocab_size) -> idx (a list becomes a NumPy array; NumPy and CuPy arrays stay put)."""
    if not hasattr(idx, "dtype"):
        idx = np.asarray(idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{what} must hold integer token ids, got {idx.dtype}")
    V = int(config["vocab_size"])
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise ValueError(f"{what} holds token ids outside [0, {V})")
    return idx


def tied_head(flat, head, embedding):
    """Hugging Face tensors of a model whose head is tied: drop a stored copy of the head (some files keep
    one); a head that differs from the embedding is an untied model, which minillm would run otherwise."""
    if head not in flat:
        return flat
    if embedding in flat and not np.array_equal(flat[head], flat[embedding]):
        raise ValueError(f"{head} differs from {embedding}, but this architecture ties them "
                         "(tie_word_embeddings): minillm would run another model")
    return {n: a for n, a in flat.items() if n != head}
