"""The training loop: data, model, AdamW, progress bar, evaluation, checkpoints and resuming.

`train(text_path, options, config_overrides)` is what `minillm train` runs; `fit(...)` is the loop itself,
shared with LoRA fine-tuning (which passes the set of trainable names); `train_step` is one optimizer step.

Under `mpiexec -n N` (minillm.distributed) every rank runs the same loop on its own batches: rank 0 alone
prepares the run (tokenizer, tokens, checkpoint) and hands it to the others, the gradients are averaged over
every rank before clipping, and rank 0 alone writes checkpoints, metrics.jsonl and the progress bar.
"""

import dataclasses
import lzma
import math
import os
import time

import numpy as np
from tqdm.auto import tqdm

from minillm import checkpoint, data, device, distributed, metrics, models, optim
from minillm.nn import ops
from minillm.tokenizer import Tokenizer, read_text_file
from minillm.tree import flatten


@dataclasses.dataclass
class TrainOptions:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 8
    val_fraction: float = 0.05
    seed: int = 1337
    out: str = "out"
    resume: bool = False
    progress: bool = True
    device: str = "cpu"
    grad_accum: int = 1      # micro-batches of batch_size per optimizer step (per rank under MPI)


def format_stat(value):
    """Progress-bar text for a model statistic: counts as integers (e.g. tokens per expert), else 3 digits."""
    value = device.to_host(value)
    if value.ndim:
        return "/".join(str(int(v)) for v in value.ravel())
    return f"{float(value):.3f}"


def params_array_module(params):
    """numpy or cupy: where the params live (the batches are moved there)."""
    return ops.array_module(next(iter(flatten(params).values())))


def evaluate(model, params, config, batches, world=None):
    """Mean cross-entropy (nats/token) over the given (x, y) batches, weighted by token count. Under MPI
    (world: default distributed.world()) rank r scores batches r, r + N, ... and the sums are reduced."""
    world = world or distributed.world()
    total, count = 0.0, 0
    xp = params_array_module(params)
    for x, y in batches[world.rank::world.size]:
        x, y = xp.asarray(x), xp.asarray(y)
        logits, _ = model.forward(params, x, config)
        loss, _ = ops.cross_entropy_forward(logits, y)
        total += loss * y.size
        count += y.size
    if world.size > 1:
        total, count = world.sum_floats([total, count])
    return total / count


def bits_per_byte(nats_per_token, n_tokens, n_bytes):
    """Convert a per-token loss to bits per byte of the text those tokens encode."""
    return nats_per_token * n_tokens / (n_bytes * math.log(2))


def val_text_bytes(ids, tokenizer):
    """The text `ids` encode, with each <|endoftext|> counted as the one newline it stands for."""
    ids = np.asarray(ids)
    cuts = np.flatnonzero(ids == tokenizer.eot_id)
    pieces = np.split(ids, cuts)
    return b"\n".join(tokenizer.decode_bytes([int(t) for t in p if t != tokenizer.eot_id]) for p in pieces)


def xz_bits_per_byte(text_bytes):
    """Size of `xz -9` output (LZMA2 preset 9, .xz container) in bits per input byte."""
    return 8 * len(lzma.compress(text_bytes, preset=9)) / len(text_bytes)


def batch_rngs(opts, world, trainer_state=None):
    """This rank's generators, one per micro-batch of a step: micro-batch k of rank r draws its windows from
    stream s = r * grad_accum + k, np.random.default_rng([seed, s]) (data.batch_rngs; stream 0 is
    default_rng(seed), the stream of a single process). So N ranks x K micro-batches draw exactly the batches
    of one process with --grad-accum N K. trainer_state (a resumed run's): the streams continue where they
    stopped, which needs the same world size and --grad-accum (one clear error otherwise)."""
    k, n = opts.grad_accum, world.size
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"--grad-accum must be a positive integer, got {k!r}")
    mine = range(world.rank * k, (world.rank + 1) * k)
    state = trainer_state or {}
    if not state.get("rng_state"):
        return data.batch_rngs(opts.seed, mine)
    saved_n, saved_k = int(state.get("world_size", 1)), int(state.get("grad_accum", 1))
    if saved_n != n:
        raise distributed.AllRanksError(
            f"--resume: the checkpoint in {opts.out!r} was trained on {saved_n} MPI process(es), this run has {n}: "
            f"resume it with `mpiexec -n {saved_n}` (each rank continues its own batch stream)")
    if saved_k != k:
        raise distributed.AllRanksError(f"--resume: the checkpoint in {opts.out!r} was trained with --grad-accum "
                                        f"{saved_k}, this run asks for {k}: resume with --grad-accum {saved_k}")
    states = state.get("rng_states") or [state["rng_state"]]
    if len(states) != n * k:
        raise distributed.AllRanksError(f"--resume: {opts.out!r} has {len(states)} batch RNG states, "
                                        f"{n * k} needed")
    return [checkpoint.rng_from_state(states[s]) for s in mine]


def rng_record(rngs, world):
    """The trainer_state.json entries of the batch streams (a collective: every rank calls it): rng_state
    (stream 0, as a single process has always saved it), world_size, grad_accum, and with several streams
    rng_states (all of them, in stream order); rank 0 gets the record, the others None."""
    every = world.gather([checkpoint.rng_state(r) for r in rngs])
    if every is None:
        return None
    states = [s for rank in every for s in rank]
    record = {"rng_state": states[0], "world_size": world.size, "grad_accum": len(rngs)}
    if len(states) > 1:
        record["rng_states"] = states
    return record


def _check_finite(loss, step, opts):
    if not math.isfinite(loss):
        raise distributed.AllRanksError(f"the loss became {loss} at step {step}; stopped without saving "
                                        f"(the last good checkpoint in {opts.out!r} is kept); try a lower --lr")


def _summed_stats(all_stats):
    """Per-micro-batch model statistics -> one host vector (their sum) and a function back to a dict."""
    keys = list(all_stats[0])
    host = [[np.asarray(device.to_host(s[k])) for k in keys] for s in all_stats]
    shapes = [a.shape for a in host[0]]
    kinds = [a.dtype.kind for a in host[0]]
    vec = np.sum([np.concatenate([a.reshape(-1).astype(np.float64) for a in row]) for row in host], axis=0)

    def back(total, count):
        out, i = {}, 0
        for key, shape, kind in zip(keys, shapes, kinds):
            size = int(np.prod(shape))
            part = total[i:i + size].reshape(shape)
            out[key] = part.astype(np.int64) if kind in "iu" else part / count   # counts add up, losses average
            i += size
        return out

    return vec, back


def train_step(model, params, config, train_ids, opts, rngs, opt_state, step, mask, trainable=None, world=None):
    """One optimizer step: forward + backward of one micro-batch per generator in rngs, the gradients summed
    (in micro-batch order), averaged over every rank's micro-batches, clipped, AdamW.
    -> (loss, aux loss, model stats, grad norm, lr): loss, aux and stats are means over every micro-batch
    of every rank (integer stats, the MoE expert token counts, are sums)."""
    world = world or distributed.world()
    xp = params_array_module(params)
    keep = optim.trainable_predicate(trainable)
    total, losses, auxes, stats = None, [], [], []
    for rng in rngs:
        x, y = (xp.asarray(a) for a in data.get_batch(train_ids, opts.batch_size, config["context"], rng))
        logits, cache = model.forward(params, x, config)
        loss, loss_cache = ops.cross_entropy_forward(logits, y)
        aux = model.aux_loss(cache) if hasattr(model, "aux_loss") else 0.0
        if world.size == 1:   # under MPI the reduced loss is checked below, on every rank at once
            _check_finite(loss + aux, step, opts)
        grads = model.backward(ops.cross_entropy_backward(1.0, loss_cache), cache)
        # frozen params' gradients are neither clipped nor used (as torch)
        grads = {n: g for n, g in flatten(grads).items() if keep(n)}
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
        losses.append(loss)
        auxes.append(aux)
        stats.append(model.stats(cache) if hasattr(model, "stats") else {})
        del logits, cache, loss_cache
    count = len(rngs) * world.size
    if count == 1:
        loss, aux, stats = losses[0], auxes[0], stats[0]
    else:
        vec, back = _summed_stats(stats) if stats[0] else (np.zeros(0), None)
        summed = world.sum_floats(np.concatenate([[sum(losses), sum(auxes)], vec]))
        loss, aux = float(summed[0] / count), float(summed[1] / count)
        stats = back(summed[2:], count) if back else {}
        _check_finite(loss + aux, step, opts)
    grads = world.average_gradients(total, len(rngs))
    grad_norm = optim.clip_grad_norm(grads, opts.grad_clip)
    lr = optim.lr_at(step, opts.lr, opts.warmup, opts.steps, opts.min_lr_ratio)
    optim.adamw_step(params, grads, opt_state, lr, weight_decay=opts.weight_decay, mask=mask,
                     trainable=trainable)
    return loss, aux, stats, grad_norm, lr


def fit(model, params, config, train_ids, val_ids, opts, log=print,
        trainable=None, opt_state=None, start_step=0, rng_state=None, save=None, metrics_path=None,
        trainer_state=None):
    """Train `params` in place for steps start_step..opts.steps-1; -> final validation loss (nats/token).

    trainable (as in optim.adamw_init: None for all, names, or a predicate on dotted names): only these are
    updated, and gradient clipping measures only their gradients (as torch does, whose frozen parameters
    have none). save(params, opt_state, trainer_state) writes a checkpoint; it runs at every evaluation and
    at the end (on rank 0 alone under MPI). metrics_path: the metrics.jsonl to append a line per step and
    per evaluation to (cut back to the steps before start_step first; see minillm.metrics).
    trainer_state: a resumed run's (its batch streams continue; see batch_rngs); rng_state: the older form,
    the single generator state of a one-process run.
    Under MPI every rank calls fit with the same params; each draws its own batches (batch_rngs).
    """
    world = distributed.world()
    if trainer_state is None and rng_state is not None:
        trainer_state = {"rng_state": rng_state}
    rngs = batch_rngs(opts, world, trainer_state)
    if world.rank:
        log = lambda message: None   # noqa: E731
    flat = flatten(params)
    mask = optim.decay_mask(flat, no_decay=getattr(model, "NO_DECAY", optim.NO_DECAY_NAMES))
    if opt_state is None:
        opt_state = optim.adamw_init(params, trainable)
    val_batches = data.eval_batches(val_ids, opts.batch_size, config["context"], opts.eval_batches)
    tokens_per_step = opts.batch_size * config["context"] * len(rngs) * world.size
    val_loss = None
    log_file = None if metrics_path is None or world.rank else metrics.MetricsLog(metrics_path, start_step)
    recent = []          # training losses since the last evaluation

    def checkpoint_now(step):
        nonlocal val_loss
        val_loss = evaluate(model, params, config, val_batches, world)
        train_loss = float(np.mean(recent)) if recent else None
        recent.clear()
        shown = "" if train_loss is None else f"train loss {train_loss:.4f}, "
        log(f"step {step}: {shown}val loss {val_loss:.4f}")
        if log_file is not None:
            log_file.append(step=step, train_loss=train_loss, val_loss=val_loss)
        if save is not None:
            record = rng_record(rngs, world)
            world.on_root(lambda: save(params, opt_state, {"step": step, **record, "val_loss": val_loss}))

    bar = tqdm(range(start_step, opts.steps), initial=start_step, total=opts.steps, desc="train",
               unit="step", disable=not opts.progress or world.rank != 0, dynamic_ncols=True)
    started = time.perf_counter()
    for step in bar:
        loss, aux, stats, grad_norm, lr = train_step(model, params, config, train_ids, opts, rngs, opt_state,
                                                     step, mask, trainable, world)
        done = step + 1 - start_step
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{done * tokens_per_step / (time.perf_counter() - started):.0f}"}
        if aux:
            postfix["aux"] = f"{aux:.3f}"
        postfix.update({k: format_stat(v) for k, v in stats.items()})
        bar.set_postfix(postfix, refresh=False)
        recent.append(loss)
        if log_file is not None:
            log_file.append(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm,
                            tokens_per_s=done * tokens_per_step / (time.perf_counter() - started),
                            **({"aux_loss": aux} if aux else {}), **{k: device.to_host(v) for k, v in stats.items()})
        if (step + 1) % opts.eval_every == 0 and step + 1 < opts.steps:
            bar.clear()
            checkpoint_now(step + 1)
    bar.close()
    checkpoint_now(opts.steps)
    return val_loss


def prepare_tokens(text, tokenizer, opts, context):
    """Encode `text` (cached in opts.out/cache) -> (train_ids, val_ids), each long enough for one sequence."""
    ids = data.load_tokens(text, tokenizer, cache_dir=os.path.join(opts.out, "cache"), progress=opts.progress)
    train_ids, val_ids = data.split(ids, opts.val_fraction)
    data.check_enough(train_ids, context, "training")
    data.check_enough(val_ids, context, "validation")
    return train_ids, val_ids


def _check_resume_config(saved, requested):
    for key, value in requested.items():
        if value is not None and key in saved and saved[key] != value:
            raise ValueError(f"--resume: the checkpoint has {key}={saved[key]!r} but {value!r} was asked for; "
                             "drop the flag or start a new --out")


def _prepare(text_path, opts, config_overrides, tokenizer_path, log):
    """train's set-up (on rank 0 alone under MPI) -> (tokenizer, {"config", "params", "opt_state",
    "trainer_state", "train_ids", "val_ids"}: host arrays and JSON-able values, which rank 0 broadcasts)."""
    arch = config_overrides.pop("arch", None) or "gpt"
    text = read_text_file(text_path)  # validates early: missing, empty, binary, non-UTF-8
    trainer_state, opt_state, params = {}, None, None
    if opts.resume:
        ckpt = checkpoint.load_checkpoint(opts.out, arch=arch)
        _check_resume_config(ckpt.config, config_overrides)
        config = ckpt.config
        expected = checkpoint.expected_from(models.get_model(arch).init(config, np.random.default_rng(0)))
        checkpoint.check_expected(flatten(ckpt.params), expected, opts.out)
        tokenizer = Tokenizer.load(ckpt.tokenizer_path)
        params, opt_state, trainer_state = ckpt.params, ckpt.optimizer_state, ckpt.trainer_state or {}
        if opt_state is None:
            raise ValueError(f"{opts.out!r} has no optimizer state to resume from")
    else:
        config = models.build_config(arch, **config_overrides)
        if tokenizer_path:
            tokenizer = Tokenizer.load(tokenizer_path)
            asked = config_overrides.get("vocab_size")
            if asked is not None and asked != tokenizer.vocab_size:
                raise ValueError(f"--vocab-size {asked} contradicts --tokenizer {tokenizer_path} "
                                 f"({tokenizer.vocab_size} tokens); drop --vocab-size")
        else:
            log(f"training a {config['vocab_size']}-token BPE tokenizer on {text_path}")
            tokenizer = Tokenizer.train(data.documents(text), config["vocab_size"],
                                        progress=opts.progress)
        config["vocab_size"] = tokenizer.vocab_size
    model = models.get_model(config["arch"])
    train_ids, val_ids = prepare_tokens(text, tokenizer, opts, config["context"])
    if params is None:
        params = model.init(config, np.random.default_rng(opts.seed))
    return tokenizer, {"config": config, "params": params, "opt_state": opt_state, "trainer_state": trainer_state,
                       "train_ids": train_ids, "val_ids": val_ids}


def train(text_path, opts, config_overrides, tokenizer_path=None, log=print):
    """Train a model on the text file at `text_path`; writes a checkpoint to opts.out. -> summary dict.

    Under MPI every rank calls it: rank 0 alone reads the text, trains or loads the tokenizer, encodes the
    tokens (and their cache) and loads the checkpoint to resume, then broadcasts the run to the others; only
    rank 0 needs the files. Rank 0 returns the summary, the others {"val_loss"}."""
    world = distributed.world()
    # on every rank: fails early without a GPU for --device cuda; under MPI each rank takes the GPU of its
    # local rank (modulo the GPUs of its machine)
    xp = world.every_rank(lambda: device.array_module_for(opts.device,
                                                          world.local_rank if world.size > 1 else None))
    if world.rank:
        log, opts = (lambda message: None), dataclasses.replace(opts, progress=False)
    kept = {}

    def prepare():
        kept["tokenizer"], shared = _prepare(text_path, opts, config_overrides, tokenizer_path, log)
        return shared

    run = world.on_root(prepare)
    tokenizer = kept.get("tokenizer")          # rank 0 only: the others neither save nor report
    config, params, opt_state = run["config"], run["params"], run["opt_state"]
    trainer_state, train_ids, val_ids = run["trainer_state"], run["train_ids"], run["val_ids"]
    model = models.get_model(config["arch"])
    params = device.to_device(params, xp)
    if opt_state is not None:
        opt_state = {**opt_state, "m": device.to_device(opt_state["m"], xp), "v": device.to_device(opt_state["v"], xp)}
    n_params = sum(p.size for p in flatten(params).values())
    log(f"{config['arch']}: {n_params / 1e6:.2f}M parameters, {len(train_ids)} training and "
        f"{len(val_ids)} validation tokens")

    def save(params_, opt_state_, state):
        checkpoint.save_checkpoint(opts.out, params_, config, tokenizer=tokenizer,
                                   optimizer_state=opt_state_, trainer_state=state)

    start = int(trainer_state.get("step", 0))
    fit(model, params, config, train_ids, val_ids, opts, log=log, opt_state=opt_state,
        metrics_path=os.path.join(opts.out, "metrics.jsonl"),
        start_step=start, trainer_state=trainer_state, save=save)
    # The final report covers the whole validation split, not just the sampled eval batches.
    full = data.eval_batches(val_ids, opts.batch_size, config["context"], max_batches=10**9)
    val_loss = evaluate(model, params, config, full, world)
    if world.rank:
        return {"val_loss": val_loss}
    val_text = val_text_bytes(val_ids, tokenizer)
    bpb = bits_per_byte(val_loss, len(val_ids), len(val_text))
    xz = xz_bits_per_byte(val_text)
    log(f"validation: {val_loss:.4f} nats/token, {bpb:.3f} bits/byte (xz -9 on the same text: {xz:.3f} bits/byte)")
    log(f"checkpoint written to {opts.out}/")
    return {"val_loss": val_loss, "bits_per_byte": bpb, "xz_bits_per_byte": xz}
