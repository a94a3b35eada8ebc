"""config.json in Hugging Face's keys: minillm config <-> GPT2Config, LlamaConfig, MistralConfig, MixtralConfig,
MambaConfig, RwkvConfig.

What minillm writes (to_file): the architecture's HF keys (each model module's `to_hf_config`: model_type,
architectures, sizes, eps, activation ...), "dtype" (and "torch_dtype" for transformers 4), the end-of-text id
as bos/eos_token_id, and ONE key of minillm's own,

    "minillm": {"format": 2, "version": "...", "arch": "gpt", <the settings HF has no key for: context of
                a recurrent model, ternary, documents, merged_adapters, initialisation ranges ...>,
                "absent": [keys the HF keys imply that the config did not hold]}

so that `transformers.AutoModelForCausalLM.from_pretrained(dir)` builds the very model minillm trained. A
model HF has no class for (--arch moe: GPT-2 blocks with a Mixtral feed-forward; ternary and packed
models) gets no model_type at all, only the "minillm" section with the whole config and a "note" that says
why: HF then refuses the directory instead of building another model.

What minillm reads (from_file): its own files of format 2, the format-1 files of earlier minillm versions
(the minillm keys at the top level beside "minillm_version" and "format": 1), and a config.json that HF's
save_pretrained wrote (a model_type of some module's HF_MODEL_TYPES). Every HF key whose value minillm does
not implement (a bias, another activation, RoPE scaling, rescaling ...) is one ValueError naming the key and
its value (HFReader.only), never a silently different model. Keys that only matter to training in HF
(dropout, initialisation) or to HF's own code paths are ignored.
"""

import json
import os

from minillm import models

FORMAT = 2
SECTION = "minillm"
DTYPE_KEYS = ("dtype", "torch_dtype")        # transformers 5 / 4
NO_HF_CLASS = {
    "moe": "GPT-2 blocks with a Mixture-of-Experts feed-forward (--arch moe): transformers has no such class; "
           "train --arch mixtral for a model HF loads",
    "ternary": "ternary (BitNet b1.58) weights quantised on the fly: transformers has no GPT-2 / Mamba / RWKV "
               "ternary class, and its BitNet models (BitNetForCausalLM) add sub-norms minillm does not have",
    "packed": "2-bit packed ternary weights (minillm quantize): transformers' bitnet quantization_config needs "
              "BitNet's own layers and a scale of the other direction; load the unpacked --ternary checkpoint "
              "in minillm instead",
}
_MISSING = object()


class HFReader:
    """An HF config dict, read key by key by a model module's from_hf_config; errors name `where`."""

    def __init__(self, hf, where):
        self.hf, self.where = hf, where

    def get(self, key, default=None):
        return self.hf[key] if key in self.hf else default

    def need(self, key):
        value = self.hf.get(key)
        if value is None:
            raise ValueError(f"{self.where}: {key} is missing (a {self.hf.get('model_type')} config needs it)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.where}: {key} must be an integer, got {value!r}")
        return value

    def only(self, key, default, *allowed, value=_MISSING):
        """The value of `key` (HF's `default` when absent), which must be one of `allowed`."""
        value = self.get(key, default) if value is _MISSING else value
        if not any(_same(value, a) for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            self.refuse(key, value, f"minillm implements {shown}")
        return value

    def refuse(self, key, value, what):
        raise ValueError(f"{self.where}: {key} = {json.dumps(value)} is not supported by minillm ({what}); "
                         "loading it would run a different model")


def _same(value, allowed):
    if isinstance(value, bool) or isinstance(allowed, bool) or value is None or allowed is None:
        return value is allowed
    return value == allowed


def no_hf_reason(config):
    """Why HF cannot load this model (a line), or None."""
    if config["arch"] in NO_HF_CLASS:
        return NO_HF_CLASS[config["arch"]]
    for key in ("packed", "ternary"):
        if config.get(key):
            return NO_HF_CLASS[key]
    if getattr(models.get_model(config["arch"]), "to_hf_config", None) is None:
        return f"transformers has no class for minillm's {config['arch']!r} models"
    return None


def arch_of_model_type(model_type):
    for arch in models.ARCHITECTURES:
        if model_type in getattr(models.get_model(arch), "HF_MODEL_TYPES", ()):
            return arch
    return None


def from_hf(hf, where):
    """HF config keys -> minillm config (no "minillm" section needed). One ValueError for anything minillm
    does not implement."""
    model_type = hf.get("model_type")
    arch = arch_of_model_type(model_type)
    if arch is None:
        known = ", ".join(t for a in models.ARCHITECTURES for t in getattr(models.get_model(a), "HF_MODEL_TYPES", ()))
        raise ValueError(f"{where}: model_type {model_type!r} is not one minillm runs (it runs {known})")
    reader = HFReader(hf, where)
    if hf.get("quantization_config") is not None:
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
        reader.refuse("quantization_config.quant_method", method, "minillm loads unquantised float weights")
    for key in ("is_encoder_decoder", "add_cross_attention"):
        reader.only(key, False, False)
    try:
        config = models.get_model(arch).from_hf_config(reader)
    except (TypeError, AttributeError) as e:       # a value of the wrong type (null, a string ...)
        raise ValueError(f"{where}: a value has the wrong type for a {model_type} config ({e})") from None
    dtype = next((hf[k] for k in DTYPE_KEYS if hf.get(k) is not None), None)
    config["dtype"] = "float64" if dtype == "float64" else "float32"
    return config


def eot_id_of(tokenizer):
    """The <|endoftext|> id (HF's bos/eos_token_id) of what checkpoint.save_checkpoint takes as a tokenizer (an
    object, a tokenizer.json path, its bytes or JSON dict), or None."""
    from minillm.char_tokenizer import load_tokenizer, tokenizer_from_json

    try:
        if hasattr(tokenizer, "eot_id"):
            return tokenizer.eot_id
        if isinstance(tokenizer, (str, os.PathLike)):
            return load_tokenizer(tokenizer).eot_id
        if isinstance(tokenizer, bytes):
            return tokenizer_from_json(tokenizer.decode("utf-8")).eot_id
        if isinstance(tokenizer, dict):
            return tokenizer_from_json(json.dumps(tokenizer)).eot_id
    except (ValueError, OSError, AttributeError):
        pass
    return None


def to_file(config, version, eot_id=None):
    """A minillm config -> the config.json object (see the module docstring)."""
    arch = config["arch"]
    section = {"format": FORMAT, "version": version, "arch": arch}
    reason = no_hf_reason(config)
    if reason is None:
        try:
            hf = models.get_model(arch).to_hf_config(config)
            dtype = config.get("dtype", "float32")
            hf.update({"dtype": dtype, "torch_dtype": dtype, "bos_token_id": eot_id, "eos_token_id": eot_id,
                       "pad_token_id": None})
            core = from_hf(hf, "config")
        except (KeyError, TypeError, ValueError) as e:    # a partial config (a test's, a lone layer's)
            reason = f"the config does not describe a whole {arch} model ({type(e).__name__}: {e})"
    if reason is not None:
        return {SECTION: {**section, "note": "Hugging Face cannot load this model: " + reason, "config": config}}
    extras = {k: v for k, v in config.items() if k not in core or core[k] != v}
    absent = sorted(k for k in core if k not in config)
    return {**hf, SECTION: {**section, **extras, **({"absent": absent} if absent else {})}}


def from_file(obj, where):
    """A config.json object -> (minillm config, minillm version or None, kind): kind "minillm" for the files
    of this format, "minillm-1" for earlier minillm files, "hf" for a directory HF wrote."""
    section = obj.get(SECTION)
    fmt = obj.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and "arch" in obj:
        config = {k: v for k, v in obj.items() if k not in ("format", "minillm_version")}
        _check_format(fmt, where)
        return config, obj.get("minillm_version"), "minillm-1"
    if isinstance(section, dict) and "format" in section:
        _check_format(section["format"], where)
        version = section.get("version")
        if isinstance(section.get("config"), dict) and "model_type" not in obj:
            return dict(section["config"]), version, "minillm"
        core = from_hf({k: v for k, v in obj.items() if k != SECTION}, where)
        extras = {k: v for k, v in section.items() if k not in ("format", "version", "absent")}
        config = {**core, **extras}
        for key in section.get("absent") or ():
            config.pop(key, None)
        return config, version, "minillm"
    if "model_type" in obj:
        return from_hf(obj, where), None, "hf"
    raise ValueError(f"'{where}' is neither a minillm config (no \"{SECTION}\" section or \"format\") nor a "
                     "Hugging Face one (no model_type)")


def _check_format(fmt, where):
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise ValueError(f"'{where}': format must be an integer, got {fmt!r}")
    if fmt > FORMAT:
        raise ValueError(f"'{where}' has format {fmt}, written by a newer minillm (this one reads format "
                         f"{FORMAT} and older); upgrade minillm")
