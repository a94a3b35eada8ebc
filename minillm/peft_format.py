"""LoRA adapter directories in peft's format, so that `peft.PeftModel.from_pretrained(hf_model, dir)` loads
what `minillm finetune` writes, and minillm loads what peft's save_pretrained writes.

    adapter_config.json         peft's LoraConfig: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
                                lora_dropout, target_modules = the adapted layers' full names (peft matches
                                a module whose name equals one), fan_in_fan_out (GPT-2's Conv1D layers),
                                bias "none", base_model_name_or_path
    adapter_model.safetensors   "base_model.model.<layer>.lora_A.weight" (r, in), ".lora_B.weight" (out, r):
                                peft's names; the arrays are minillm's lora_A / lora_B as they are
    minillm_adapter.json        minillm's own record (a side file: peft warns about keys it does not know,
                                telling the user to upgrade): the base's fingerprint and config, the
                                targets as given, the adapted layers

peft_meta(config) checks an adapter_config.json peft wrote: a value minillm does not implement (DoRA,
rsLoRA, trained biases, modules_to_save, per-layer rank / alpha patterns, another peft_type ...) is one
ValueError naming it. Adapters of MoE experts (experts.<e>.w1 ...) are written the same way, but
transformers 5 fuses a Mixtral layer's experts into one parameter, so peft finds no such modules there.
"""

import json

PREFIX, SUFFIX = "base_model.model.", ".weight"
SIDE_FILE = "minillm_adapter.json"
REFUSED = {  # peft key -> the only value minillm implements (absent counts as that value)
    "use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
    "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None, "layer_replication": None,
    "use_qalora": False, "trainable_token_indices": None, "alora_invocation_tokens": None,
}


def to_peft(flat, lora_config, base, in_out):
    """minillm adapters {"<layer>.lora_A": (r, in), ...} -> (peft tensors, adapter_config dict).
    in_out: the layers are GPT-2 Conv1D (peft's fan_in_fan_out)."""
    layers = sorted({n.rsplit(".", 1)[0] for n in flat})
    tensors = {PREFIX + n + SUFFIX: a for n, a in flat.items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": lora_config["rank"], "lora_alpha": lora_config["alpha"],
              "lora_dropout": lora_config.get("dropout", 0.0), "target_modules": layers,
              "fan_in_fan_out": bool(in_out), "bias": "none", "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    return tensors, config


def from_peft(tensors, where):
    """peft's adapter tensors -> minillm's {"<layer>.lora_A": array, ...}; anything but lora_A / lora_B
    weights (embedding adapters, DoRA magnitudes, saved modules) is refused."""
    out = {}
    for name, a in tensors.items():
        inner = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if not inner.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{where}: tensor {name} is not a LoRA A/B weight of a dense layer (minillm loads "
                             "plain LoRA adapters)")
        out[inner[: -len(SUFFIX)]] = a
    return out


def peft_meta(config, where):
    """An adapter_config.json peft wrote -> minillm's adapter meta {"base", "lora": {rank, alpha, dropout,
    targets}}; one ValueError for a setting minillm does not implement."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (minillm loads LoRA)")
    for key, only in REFUSED.items():
        value = config.get(key, only)
        if value != only and not (only is None and value in ([], {})) and not (only == {} and value is None):
            raise ValueError(f"{where}: {key} = {json.dumps(value)} is not supported by minillm (it implements "
                             f"{json.dumps(only)}); loading it would apply a different adapter")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{where}: r and lora_alpha must be numbers, got {rank!r} and {alpha!r}")
    return {"base": config.get("base_model_name_or_path"),
            "lora": {"rank": rank, "alpha": float(alpha), "dropout": float(config.get("lora_dropout") or 0.0),
                     "targets": None}}
