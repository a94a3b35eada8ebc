"""LoRA fine-tuning at the checkpoint level: adapter directories, `finetune`, `merge_checkpoint`.

An adapter directory holds
    adapter_model.safetensors   only the lora_A / lora_B tensors, dotted names
                                ("transformer.h.0.attn.c_attn.lora_A", ...)
    adapter_config.json         {"format": "minillm-lora", "minillm_version", "base": the base
                                checkpoint as given, "base_config": its config, "lora": {"rank",
                                "alpha", "targets", "dropout"}, "layers": [adapted layer names]}
Both are written atomically (minillm.fileio.atomic_write). Loading checks the adapter against the base
model (architecture, sizes, layer names, shapes) and says what does not fit.
"""

import dataclasses
import json
import os

import numpy as np

from minillm.arrays import to_host
from minillm import __version__, checkpoint, models
from minillm.fileio import atomic_write
from minillm.nn import lora
from minillm.tree import flatten

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "minillm-lora"




def save_adapter(out_dir, params, config, base=None):
    """Write the adapters of `params` (and an adapter config naming `base`) to out_dir."""
    from safetensors.numpy import save_file

    _, adapters = lora.split_adapters(params)
    flat = {n: np.ascontiguousarray(to_host(a)) for n, a in flatten(adapters).items()}
    if not flat:
        raise ValueError("save_adapter: the parameters hold no LoRA adapters")
    if not all(np.isfinite(a).all() for a in flat.values()):
        raise ValueError("refusing to save adapters with NaN/inf values")
    meta = {"format": FORMAT, "minillm_version": __version__, "base": base,
            "base_config": {k: v for k, v in config.items() if k != "lora"},
            "lora": {k: v for k, v in config["lora"].items() if k != "dropout_rng"},
            "layers": sorted({n.rsplit(".", 1)[0] for n in flat})}
    text = json.dumps(meta, indent=2) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS), lambda p: save_file(flat, p))
    atomic_write(os.path.join(out_dir, ADAPTER_CONFIG), text)   # ASCII: json.dumps escapes the rest
    return out_dir


def load_adapter(adapter_dir):
    """-> (flat adapters {dotted name: array}, adapter config dict) as written by save_adapter."""
    from safetensors.numpy import load_file

    wpath = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    cpath = os.path.join(adapter_dir, ADAPTER_CONFIG)
    for p in (wpath, cpath):
        if not os.path.isfile(p):
            raise ValueError(f"{adapter_dir!r} is not a LoRA adapter directory: {p} is missing")
    try:
        with open(cpath) as f:
            meta = json.load(f)
        adapters = load_file(wpath)
    except Exception as e:  # OSError, bad JSON / UTF-8, safetensors' own errors
        raise ValueError(f"cannot read the adapter in {adapter_dir!r}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "lora" not in meta:
        raise ValueError(f"{cpath} is not a minillm LoRA adapter config")
    return adapters, meta


def attach(params, config, adapters, meta):
    """Base params/config + a loaded adapter -> (params with adapters, config with "lora").

    ValueError when the adapter was trained on another architecture or model size, or its layers
    do not exist in / fit the base model."""
    bc = meta.get("base_config") or {}
    if bc.get("arch") != config.get("arch"):
        raise ValueError(f"the adapter was trained on architecture {bc.get('arch')!r}, the base "
                         f"model is {config.get('arch')!r}")
    keys = ("vocab_size", "n_layer", "n_head", "d_model")
    diff = [f"{k} {bc[k]} vs {config.get(k)}" for k in keys if k in bc and bc[k] != config.get(k)]
    if diff:
        raise ValueError("the adapter was trained on a different base model (adapter vs base): "
                         + ", ".join(diff))
    lc = meta["lora"]
    config = {**config, "lora": lora.lora_config(lc.get("rank"), lc.get("alpha"), lc.get("targets"),
                                                 lc.get("dropout", 0.0))}
    return lora.join(params, adapters, config), config


def _load_base(base_dir):
    ckpt = checkpoint.load_checkpoint(base_dir)
    model = models.get_model(ckpt.config["arch"])
    expected = checkpoint.expected_from(model.init(ckpt.config, np.random.default_rng(0)))
    return checkpoint.load_checkpoint(base_dir, expected=expected), model


def load_with_adapter(base_dir, adapter_dir):
    """-> checkpoint.Checkpoint of the base whose params / config carry the adapter (for sampling)."""
    ckpt, _ = _load_base(base_dir)
    params, config = attach(ckpt.params, ckpt.config, *load_adapter(adapter_dir))
    return dataclasses.replace(ckpt, params=params, config=config, optimizer_state=None,
                               trainer_state=None)


def merge_checkpoint(base_dir, adapter_dir, out_dir):
    """Fold an adapter into its base and write a plain checkpoint (base tokenizer copied)."""
    ckpt = load_with_adapter(base_dir, adapter_dir)
    merged = lora.merge(ckpt.params, ckpt.config)
    config = {k: v for k, v in ckpt.config.items() if k != "lora"}
    return checkpoint.save_checkpoint(out_dir, merged, config, tokenizer=ckpt.tokenizer_path)


def _prepare(base_dir, text_path, opts, rank, alpha, targets):
    """finetune's set-up (on rank 0 alone under MPI) -> {"config", "params", "train_ids", "val_ids"}."""
    from minillm import train
    from minillm.tokenizer import Tokenizer, read_text_file

    text = read_text_file(text_path)
    ckpt, _ = _load_base(base_dir)
    if ckpt.tokenizer_path is None:
        raise ValueError(f"base checkpoint {base_dir!r} has no tokenizer.json")
    tokenizer = Tokenizer.load(ckpt.tokenizer_path)
    config = {**ckpt.config, "lora": lora.lora_config(rank, alpha, targets)}
    params = lora.add_adapters(ckpt.params, config, np.random.default_rng(opts.seed),
                               default_targets=models.get_model(config["arch"]).LORA_TARGETS)
    train_ids, val_ids = train.prepare_tokens(text, tokenizer, opts, config["context"])
    return {"config": config, "params": params, "train_ids": train_ids, "val_ids": val_ids}


def finetune(base_dir, text_path, opts, rank, alpha=None, targets=None, log=print):
    """Train LoRA adapters on the text file at text_path on top of the checkpoint base_dir; the
    base weights stay bit-identical. opts: train.TrainOptions (opts.out is the adapter directory).
    -> {"params", "config", "val_loss", "trainable", "total", "fraction", "adapter_bytes",
    "base_bytes"} (under MPI: rank 0 alone reads the files and writes the adapter; the other ranks
    return no file sizes)."""
    from minillm import data, distributed, train

    if opts.resume:
        raise ValueError("finetune does not resume; start again with a new --out")
    world = distributed.world()
    if world.rank:
        log = lambda message: None   # noqa: E731
    run = world.on_root(lambda: _prepare(base_dir, text_path, opts, rank, alpha, targets))
    config, params, train_ids, val_ids = run["config"], run["params"], run["train_ids"], run["val_ids"]
    model = models.get_model(config["arch"])
    trainable = lora.adapter_names(params)
    summary = lora.trainable_summary(params)
    log(lora.format_summary(params))
    val_batches = data.eval_batches(val_ids, opts.batch_size, config["context"], opts.eval_batches)
    log(f"step 0: val loss {train.evaluate(model, params, config, val_batches, world):.4f} (the base model)")

    def save(params_, _opt_state, _trainer_state):
        save_adapter(opts.out, params_, config, base=str(base_dir))

    val_loss = train.fit(model, params, config, train_ids, val_ids, opts,
                         log=log, trainable=trainable, save=save,
                         metrics_path=os.path.join(opts.out, "metrics.jsonl"))
    if world.rank:
        return {"params": params, "config": config, "val_loss": val_loss, **summary}
    sizes = {k: os.path.getsize(p) for k, p in
             (("adapter_bytes", os.path.join(opts.out, ADAPTER_WEIGHTS)),
              ("base_bytes", os.path.join(base_dir, checkpoint.MODEL_FILE)))}
    log(f"adapter written to {opts.out}/: {sizes['adapter_bytes']:,} bytes "
        f"(base model.safetensors {sizes['base_bytes']:,} bytes)")
    return {"params": params, "config": config, "val_loss": val_loss, **summary, **sizes}
