"""LoRA fine-tuning at the checkpoint level: adapter directories, `finetune`, `merge_checkpoint`.

An adapter directory is a peft adapter (minillm.peft_format: `peft.PeftModel.from_pretrained(model, dir)`
loads it) plus minillm's own record:
    adapter_model.safetensors   the lora_A / lora_B tensors under peft's names
                                ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", ...)
    adapter_config.json         peft's LoraConfig (r, lora_alpha, target_modules = the adapted layers, ...)
    minillm_adapter.json        {"format": "minillm-lora", "version": 2, "minillm_version", "base": the base
                                checkpoint as given, "base_sha256": the sha256 of the base's
                                model.safetensors, "base_config": its config, "lora": {"rank", "alpha",
                                "targets", "dropout"}, "layers": [adapted layer names]}
All are one save of minillm.store (versioned, locked, checksummed: see checkpoint.py). Loading checks the
adapter against the base model (the fingerprint of the very weights it was trained on, architecture,
sizes, layer names, shapes, finite values) and says what does not fit. A merged checkpoint records the
sha256 of every adapter folded into it ("merged_adapters" in its config), so the same adapter is never
applied twice. Also loaded: adapters of earlier minillm versions (adapter_config.json with "format":
"minillm-lora" and minillm's tensor names; without "base_sha256" they are checked by size only) and
adapters peft wrote (checked by layer names and shapes; a peft setting minillm lacks is one error).
"""

import contextlib
import dataclasses
import json
import os

import numpy as np

from minillm.arrays import to_host
from minillm import __version__, checkpoint, models, peft_format, store, validate
from minillm.nn import lora
from minillm.tree import flatten

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SIDE_FILE = peft_format.SIDE_FILE
FORMAT = "minillm-lora"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, SIDE_FILE)


def save_adapter(out_dir, params, config, base=None, base_sha256=None):
    """Write the adapters of `params` as a peft adapter, with minillm's record naming `base` and its
    fingerprint, to out_dir."""
    from safetensors.numpy import save

    _, adapters = lora.split_adapters(params)
    flat = {n: np.ascontiguousarray(to_host(a)) for n, a in flatten(adapters).items()}
    if not flat:
        raise ValueError("save_adapter: the parameters hold no LoRA adapters")
    if not all(np.isfinite(a).all() for a in flat.values()):
        raise ValueError("refusing to save adapters with NaN/inf values")
    lc = {k: v for k, v in config["lora"].items() if k != "dropout_rng"}
    layers = sorted({n.rsplit(".", 1)[0] for n in flat})
    in_out = any(lora.layout_of(layer, config) == "in_out" for layer in layers)
    tensors, peft_config = peft_format.to_peft(flat, lc, None if base is None else str(base), in_out)
    meta = {"format": FORMAT, "version": 2, "minillm_version": __version__, "base": base,
            "base_sha256": base_sha256, "base_config": {k: v for k, v in config.items() if k != "lora"},
            "lora": lc, "layers": layers}
    dump = lambda obj: json.dumps(obj, indent=2) + "\n"   # noqa: E731  ASCII: json.dumps escapes the rest
    files = {ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"}), ADAPTER_CONFIG: dump(peft_config),
             SIDE_FILE: dump(meta)}
    try:
        store.publish(out_dir, files, known=ADAPTER_FILES, adoptable=_is_adapter_dir)
    except OSError as e:
        raise ValueError(f"could not save the adapter to '{out_dir}': {e.strerror or e}; nothing was "
                         "replaced") from None
    return out_dir


def _is_adapter_dir(directory):
    """An adapter minillm wrote: its side file, or (earlier versions) adapter_config.json of our format."""
    for name in (SIDE_FILE, ADAPTER_CONFIG):
        try:
            with open(os.path.join(directory, name), "rb") as f:
                if json.loads(f.read()).get("format") == FORMAT:
                    return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def load_adapter(adapter_dir):
    """-> (flat adapters {dotted name: array} in minillm's names, adapter meta dict: minillm's record, or for
    an adapter peft wrote {"base", "lora", "layers", "peft": True}); the meta gets "sha256": the fingerprint
    of adapter_model.safetensors."""
    from safetensors.numpy import load_file

    if not os.path.isdir(adapter_dir):
        raise ValueError(f"{adapter_dir!r} is not a LoRA adapter directory: it does not exist")

    def read(vdir, files):
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            if not os.path.isfile(os.path.join(vdir, name)):
                raise ValueError(f"{adapter_dir!r} is not a LoRA adapter directory: "
                                 f"{os.path.join(adapter_dir, name)} is missing")
        shown = os.path.join(adapter_dir, ADAPTER_CONFIG)
        side = os.path.isfile(os.path.join(vdir, SIDE_FILE))
        wpath = store.verify(adapter_dir, vdir, files, ADAPTER_WEIGHTS)
        try:
            with open(store.verify(adapter_dir, vdir, files, SIDE_FILE if side else ADAPTER_CONFIG), "rb") as f:
                meta = json.loads(f.read().decode("utf-8"))
            tensors = load_file(wpath)
        except Exception as e:  # OSError, bad JSON / UTF-8, safetensors' own errors
            raise ValueError(f"cannot read the adapter in {adapter_dir!r}: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{shown} is not a LoRA adapter config")
        if side or meta.get("format") != FORMAT:
            if side and (meta.get("format") != FORMAT or not isinstance(meta.get("lora"), dict)):
                raise ValueError(f"{os.path.join(adapter_dir, SIDE_FILE)} is not a minillm LoRA adapter record")
            if not side:       # peft wrote it
                if "peft_type" not in meta:
                    raise ValueError(f"{shown} is neither a minillm nor a peft LoRA adapter config")
                meta = {**peft_format.peft_meta(meta, shown), "peft": True}
            adapters = peft_format.from_peft(tensors, os.path.join(adapter_dir, ADAPTER_WEIGHTS))
        else:
            if not isinstance(meta.get("lora"), dict):
                raise ValueError(f"{shown} is not a minillm LoRA adapter config")
            adapters = tensors           # an earlier minillm's: our names as they are
        if meta.get("peft"):
            meta["layers"] = sorted({n.rsplit(".", 1)[0] for n in adapters})
            meta["lora"]["targets"] = meta["layers"]
        validate.check_values(adapters, os.path.join(adapter_dir, ADAPTER_WEIGHTS))
        sha = files[ADAPTER_WEIGHTS]["sha256"] if files else store.sha256_file(wpath)
        return adapters, {**meta, "sha256": sha}
    return store.read(adapter_dir, read)


def attach(params, config, adapters, meta, base_sha256=None):
    """Base params/config + a loaded adapter -> (params with adapters, config with "lora").

    ValueError when the adapter is already merged into this base, was trained on other base weights
    (base_sha256: the fingerprint of the base's model.safetensors), another architecture or model size,
    or its layers do not exist in / fit the base model."""
    if meta.get("sha256") and meta["sha256"] in (config.get("merged_adapters") or ()):
        raise ValueError("this adapter is already merged into the base checkpoint: applying it again would "
                         "add its update twice")
    bc = meta.get("base_config") or {}       # none for an adapter peft wrote: its layers and shapes are checked
    if bc and bc.get("arch") != config.get("arch"):
        raise ValueError(f"the adapter was trained on architecture {bc.get('arch')!r}, the base "
                         f"model is {config.get('arch')!r}")
    keys = ("vocab_size", "n_layer", "n_head", "d_model")
    diff = [f"{k} {bc[k]} vs {config.get(k)}" for k in keys if k in bc and bc[k] != config.get(k)]
    if diff:
        raise ValueError("the adapter was trained on a different base model (adapter vs base): "
                         + ", ".join(diff))
    if base_sha256 and meta.get("base_sha256") and meta["base_sha256"] != base_sha256:
        raise ValueError(f"the adapter was trained on other base weights (model.safetensors sha256 "
                         f"{meta['base_sha256'][:12]}..., this base has {base_sha256[:12]}...): "
                         f"use the base it was trained on ({meta.get('base')!r})")
    lc = meta["lora"]
    config = {**config, "lora": lora.lora_config(lc.get("rank"), lc.get("alpha"), lc.get("targets"),
                                                 lc.get("dropout", 0.0))}
    return lora.join(params, adapters, config), config


def _with_adapter(base_dir, adapter_dir):
    ckpt = checkpoint.load_checkpoint(base_dir)
    adapters, meta = load_adapter(adapter_dir)
    params, config = attach(ckpt.params, ckpt.config, adapters, meta, base_sha256=ckpt.fingerprint)
    return dataclasses.replace(ckpt, params=params, config=config, optimizer_state=None,
                               trainer_state=None), meta


def load_with_adapter(base_dir, adapter_dir):
    """-> checkpoint.Checkpoint of the base whose params / config carry the adapter (for sampling)."""
    return _with_adapter(base_dir, adapter_dir)[0]


def merge_checkpoint(base_dir, adapter_dir, out_dir):
    """Fold an adapter into its base and write a plain checkpoint (base tokenizer copied; the adapter's
    fingerprint added to "merged_adapters"). --out may be neither the base nor the adapter."""
    store.refuse_overwrite(out_dir, {"the base checkpoint": base_dir, "the adapter": adapter_dir})
    ckpt, meta = _with_adapter(base_dir, adapter_dir)
    merged = lora.merge(ckpt.params, ckpt.config)
    config = {k: v for k, v in ckpt.config.items() if k != "lora"}
    config["merged_adapters"] = list(config.get("merged_adapters") or []) + [meta["sha256"]]
    return checkpoint.save_checkpoint(out_dir, merged, config, tokenizer=ckpt.tokenizer_path)


def _prepare(base_dir, text_path, opts, rank, alpha, targets, log, held):
    """finetune's checks and set-up (rank 0 alone under MPI; the lock of opts.out is entered into `held`)
    -> (the base's fingerprint, {"config", "params", "train_ids", "val_ids"}, which rank 0 broadcasts)."""
    from minillm import textfile, train

    store.refuse_overwrite(opts.out, {"the base checkpoint": base_dir})
    store.check_target(opts.out, (ADAPTER_WEIGHTS, ADAPTER_CONFIG), _is_adapter_dir)   # before any work
    info = textfile.check(text_path)  # validates (missing, empty, binary, non-UTF-8) and hashes
    ckpt = checkpoint.load_checkpoint(base_dir)
    tokenizer = checkpoint.load_tokenizer(ckpt)
    config = {**ckpt.config, "lora": lora.lora_config(rank, alpha, targets)}
    params = lora.add_adapters(ckpt.params, config, np.random.default_rng(opts.seed),
                               default_targets=models.get_model(config["arch"]).LORA_TARGETS)
    train_ids, val_ids = train.prepare_tokens(text_path, tokenizer, opts, config["context"], info, log)
    held.enter_context(store.lock(opts.out))
    return ckpt.fingerprint, {"config": config, "params": params, "train_ids": train_ids, "val_ids": val_ids}


def finetune(base_dir, text_path, opts, rank, alpha=None, targets=None, log=print):
    """Train LoRA adapters on the text file at text_path on top of the checkpoint base_dir; the
    base weights stay bit-identical. opts: train.TrainOptions (opts.out is the adapter directory).
    -> {"params", "config", "val_loss", "trainable", "total", "fraction", "adapter_bytes",
    "base_bytes"}. Under MPI (as train): rank 0 alone reads the files and writes the adapter; the other
    ranks return no file sizes."""
    from minillm import data, distributed, train

    if opts.resume:
        raise ValueError("finetune does not resume; start again with a new --out")
    world = distributed.world()
    if world.rank:
        log, opts = train._silent, dataclasses.replace(opts, progress=False)
    with contextlib.ExitStack() as held:
        kept = {}

        def prepare():
            kept["fingerprint"], shared = _prepare(base_dir, text_path, opts, rank, alpha, targets, log, held)
            return shared

        run = world.on_root(prepare)
        config, params, train_ids, val_ids = run["config"], run["params"], run["train_ids"], run["val_ids"]
        model = models.get_model(config["arch"])
        trainable = lora.adapter_names(params)
        summary = lora.trainable_summary(params)
        log(lora.format_summary(params))
        val_batches = data.eval_batches(val_ids, opts.batch_size, config["context"], opts.eval_batches)
        log(f"step 0: val loss {train.evaluate(model, params, config, val_batches, world):.4f} (the base model)")

        def save(params_, _opt_state, _trainer_state):
            save_adapter(opts.out, params_, config, base=str(base_dir), base_sha256=kept["fingerprint"])

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
