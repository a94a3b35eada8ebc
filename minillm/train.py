"""The training loop: data, model, AdamW, progress bar, evaluation, checkpoints and resuming.

`train(text_path, options, config_overrides)` is what `minillm train` runs; `fit(...)` is the loop itself,
shared with LoRA fine-tuning (which passes the set of trainable names).
"""

import contextlib
import dataclasses
import lzma
import math
import os
import signal
import threading
import time

import numpy as np
from tqdm.auto import tqdm

from minillm import checkpoint, data, device, metrics, models, optim, store, textfile, validate
from minillm.char_tokenizer import CharTokenizer, load_tokenizer
from minillm.errors import Interrupted
from minillm.nn import ops
from minillm.tokenizer import Tokenizer
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
    documents: str = "lines"                                 # or "file" (see minillm.textfile)
    tokenizer_sample_bytes: int = data.TOKENIZER_SAMPLE_BYTES  # BPE training reads this much of FILE
    overwrite: bool = False          # replace a checkpoint in `out` instead of refusing to
    explicit: frozenset = None       # the options the user gave; --resume takes the others from the run
    #                                  (None, for library callers: every option as given, nothing checked)


# What --resume takes from the checkpoint's trainer_state.json ("schedule") unless given explicitly.
SCHEDULE = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip")


class _Flag:
    def __init__(self):
        self.raised = False

    def __bool__(self):
        return self.raised


@contextlib.contextmanager
def _deferred_sigint():
    """Within the block Ctrl-C (SIGINT) only raises a flag that fit checks between steps, so a step (and the
    in-place AdamW update) is never cut in half; a second Ctrl-C stops at once. Outside the main thread,
    where no signal handler can be set, Ctrl-C is left alone."""
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.raised:
            raise KeyboardInterrupt
        flag.raised = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def format_stat(value):
    """Progress-bar text for a model statistic: counts as integers (e.g. tokens per expert), else 3 digits."""
    value = device.to_host(value)
    if value.ndim:
        return "/".join(str(int(v)) for v in value.ravel())
    return f"{float(value):.3f}"


def params_array_module(params):
    """numpy or cupy: where the params live (the batches are moved there)."""
    return ops.array_module(next(iter(flatten(params).values())))


def evaluate(model, params, config, batches):
    """Mean cross-entropy (nats/token) over the given (x, y) batches, weighted by token count."""
    total, count = 0.0, 0
    xp = params_array_module(params)
    for x, y in batches:
        x, y = xp.asarray(x), xp.asarray(y)
        logits, _ = model.forward(params, x, config)
        loss, _ = ops.cross_entropy_forward(logits, y)
        total += loss * y.size
        count += y.size
    return total / count


def bits_per_byte(nats_per_token, n_tokens, n_bytes):
    """Convert a per-token loss to bits per byte of the text those tokens encode."""
    return nats_per_token * n_tokens / (n_bytes * math.log(2))


def val_text_bytes(ids, tokenizer, block=1 << 20):
    """The text `ids` encode, with each <|endoftext|> counted as the one newline it stands for. Decodes
    `block` tokens at a time, so only the validation text itself is held."""
    out, eot = [], tokenizer.eot_id
    for start in range(0, len(ids), block):
        part = np.asarray(ids[start:start + block])
        cuts = np.flatnonzero(part == eot).tolist()
        out.append(b"\n".join(tokenizer.decode_bytes(part[a:b])
                              for a, b in zip([0] + [c + 1 for c in cuts], cuts + [len(part)])))
    return b"".join(out)


def xz_bits_per_byte(text_bytes):
    """Size of `xz -9` output (LZMA2 preset 9, .xz container) in bits per input byte."""
    return 8 * len(lzma.compress(text_bytes, preset=9)) / len(text_bytes)


def fit(model, params, config, train_ids, val_ids, opts, log=print,
        trainable=None, opt_state=None, start_step=0, rng_state=None, save=None, metrics_path=None):
    """Train `params` in place for steps start_step..opts.steps-1; -> final validation loss (nats/token).

    trainable (as in optim.adamw_init: None for all, names, or a predicate on dotted names): only these are
    updated, and gradient clipping measures only their gradients (as torch does, whose frozen parameters
    have none). save(params, opt_state, trainer_state) writes a checkpoint; it runs at every evaluation and
    at the end. metrics_path: the metrics.jsonl to append a line per step and per evaluation to (cut back
    to the steps before start_step first; see minillm.metrics).
    """
    rng = np.random.default_rng(opts.seed) if rng_state is None else checkpoint.rng_from_state(rng_state)
    flat = flatten(params)
    xp = params_array_module(params)
    mask = optim.decay_mask(flat, no_decay=getattr(model, "NO_DECAY", optim.NO_DECAY_NAMES))
    is_trainable = optim.trainable_predicate(trainable)
    if opt_state is None:
        opt_state = optim.adamw_init(params, trainable)
    val_batches = data.eval_batches(val_ids, opts.batch_size, config["context"], opts.eval_batches)
    tokens_per_step = opts.batch_size * config["context"]
    val_loss = None
    log_file = None if metrics_path is None else metrics.MetricsLog(metrics_path, start_step)
    recent = []          # training losses since the last evaluation
    saved = start_step if start_step else None   # the step of the checkpoint on disk for this run

    def checkpoint_now(step):
        nonlocal val_loss, saved
        val_loss = evaluate(model, params, config, val_batches)
        train_loss = float(np.mean(recent)) if recent else None
        recent.clear()
        shown = "" if train_loss is None else f"train loss {train_loss:.4f}, "
        log(f"step {step}: {shown}val loss {val_loss:.4f}")
        if log_file is not None:
            log_file.append(step=step, train_loss=train_loss, val_loss=val_loss)
        if save is not None:
            save(params, opt_state, {"step": step, "rng_state": checkpoint.rng_state(rng),
                                     "val_loss": val_loss})
            saved = step

    def _step(step):
        nonlocal val_loss
        x, y = (xp.asarray(a) for a in data.get_batch(train_ids, opts.batch_size, config["context"], rng))
        logits, cache = model.forward(params, x, config)
        loss, loss_cache = ops.cross_entropy_forward(logits, y)
        aux = model.aux_loss(cache) if hasattr(model, "aux_loss") else 0.0
        if not math.isfinite(loss + aux):
            kept = (f"the last good checkpoint, step {saved}, is kept in {opts.out!r}" if saved is not None
                    else "no checkpoint of this run had been saved yet")
            raise ValueError(f"the loss became {loss + aux} at step {step}; stopped without saving "
                             f"({kept}); try a lower --lr")
        grads = model.backward(ops.cross_entropy_backward(1.0, loss_cache), cache)
        if trainable is not None:   # frozen params' gradients are neither clipped nor used (as torch)
            grads = {n: g for n, g in flatten(grads).items() if is_trainable(n)}
        grad_norm = optim.clip_grad_norm(grads, opts.grad_clip)
        lr = optim.lr_at(step, opts.lr, opts.warmup, opts.steps, opts.min_lr_ratio)
        optim.adamw_step(params, grads, opt_state, lr, weight_decay=opts.weight_decay, mask=mask,
                         trainable=trainable)
        done = step + 1 - start_step
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{done * tokens_per_step / (time.perf_counter() - started):.0f}"}
        if aux:
            postfix["aux"] = f"{aux:.3f}"
        stats = model.stats(cache) if hasattr(model, "stats") else {}
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

    bar = tqdm(range(start_step, opts.steps), initial=start_step, total=opts.steps, desc="train",
               unit="step", disable=not opts.progress, dynamic_ncols=True)
    started = time.perf_counter()
    with _deferred_sigint() as interrupted:
        for step in bar:
            _step(step)
            if interrupted:      # Ctrl-C arrived during the step: keep the state after it, then stop
                bar.close()
                if save is not None:
                    save(params, opt_state, {"step": step + 1, "rng_state": checkpoint.rng_state(rng),
                                             "val_loss": val_loss})
                raise Interrupted(step + 1, opts.out)
    bar.close()
    checkpoint_now(opts.steps)
    return val_loss


def prepare_tokens(text_path, tokenizer, opts, context, info=None, log=None):
    """Encode the file (once: the shared token cache, memory-mapped) -> (train_ids, val_ids), two views
    of it, each long enough for one sequence."""
    ids = data.load_tokens(text_path, tokenizer, opts.documents, info=info, progress=opts.progress, log=log)
    train_ids, val_ids = data.split(ids, opts.val_fraction)
    data.check_enough(train_ids, context, "training")
    data.check_enough(val_ids, context, "validation")
    return train_ids, val_ids


def _check_resume_config(saved, requested):
    for key, value in requested.items():
        if value is not None and key in saved and saved[key] != value:
            raise ValueError(f"--resume: the checkpoint has {key}={saved[key]!r} but {value!r} was asked for; "
                             "drop the flag or start a new --out")


def make_tokenizer(text_path, opts, vocab_size, tokenizer_path=None, log=print):
    """The tokenizer of a new run: "char" (minillm.char_tokenizer: the characters of the whole file), a
    tokenizer.json path, or None: a BPE trained on the first opts.tokenizer_sample_bytes of the file."""
    if tokenizer_path == "char":
        tokenizer = CharTokenizer.train(textfile.distinct_characters(text_path, opts.documents))
        log(f"char tokenizer: {tokenizer.vocab_size} tokens (the characters of {text_path} + <|endoftext|>)")
        return tokenizer
    if tokenizer_path:
        return load_tokenizer(tokenizer_path)
    items, truncated = textfile.sample(text_path, opts.tokenizer_sample_bytes, opts.documents)
    part = f" (its first {opts.tokenizer_sample_bytes / 2**20:g} MiB)" if truncated else ""
    log(f"training a {vocab_size}-token BPE tokenizer on {text_path}{part}")
    return Tokenizer.train(items, vocab_size, progress=opts.progress)


def train(text_path, opts, config_overrides, tokenizer_path=None, log=print):
    """Train a model on the text file at `text_path`; writes a checkpoint to opts.out. -> summary dict.
    tokenizer_path: a tokenizer.json, "char", or None (train a BPE; see make_tokenizer)."""
    arch = config_overrides.pop("arch", None)
    textfile.check_documents(opts.documents)
    info = textfile.check(text_path)  # validates early (missing, empty, binary, non-UTF-8) and hashes
    xp = device.array_module_for(opts.device)  # and fails early without a GPU for --device cuda
    checkpoint.check_writable(opts.out)   # before any work: --out holds no file minillm did not write
    if not opts.resume:
        arch = arch or "gpt"
        if os.path.exists(os.path.join(opts.out, checkpoint.CONFIG_FILE)) and not opts.overwrite:
            raise ValueError(f"{opts.out!r} holds a checkpoint already: --resume continues it, --overwrite "
                             "replaces it")
    with store.lock(opts.out):   # one writer per --out for the whole run
        return _train(info, text_path, arch, xp, opts, config_overrides, tokenizer_path, log)


def _resume_schedule(opts, saved):
    """opts with the schedule of the run being resumed (trainer_state "schedule"): an option the user did not
    give is taken from it, one given with another value is an error, except a larger --steps, which extends
    the run (the cosine decay is then recomputed to end at the new total: from this step on the learning
    rate follows the longer schedule, so it rises to where that schedule is)."""
    if opts.explicit is None:
        return
    for key in SCHEDULE:
        if key not in saved:
            continue
        if key not in opts.explicit:
            setattr(opts, key, type(getattr(opts, key))(saved[key]))
        elif getattr(opts, key) != saved[key] and not (key == "steps" and opts.steps > saved[key]):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: the run was trained with {flag} {saved[key]}, not {getattr(opts, key)}; "
                             f"drop {flag} (the schedule comes from the checkpoint) or start a new --out")


def _resume_state(opts, arch, config_overrides):
    """The checkpoint in opts.out, checked for resuming to opts.steps."""
    ckpt = checkpoint.load_checkpoint(opts.out, arch=arch)
    _check_resume_config(ckpt.config, config_overrides)
    tokenizer = checkpoint.load_tokenizer(ckpt)
    if ckpt.optimizer_state is None or ckpt.trainer_state is None:
        raise ValueError(f"{opts.out!r} has no optimizer and trainer state to resume from")
    step = ckpt.trainer_state.get("step", 0)
    if opts.steps < step:
        raise ValueError(f"--resume --steps {opts.steps}: the checkpoint in {opts.out!r} is already at step "
                         f"{step}; give --steps {step} or more")
    _resume_schedule(opts, ckpt.trainer_state.get("schedule") or {})
    saved_documents = ckpt.config.get("documents", "lines")
    if opts.documents != saved_documents:
        if opts.explicit is not None and "documents" not in opts.explicit:
            opts.documents = saved_documents
        else:
            raise ValueError(f"--resume: the run was trained with --documents {saved_documents}, not "
                             f"{opts.documents}")
    if ckpt.trainer_state.get("rng_state") is not None:   # garbage is refused before any work
        checkpoint.rng_from_state(ckpt.trainer_state["rng_state"],
                                  f"'{os.path.join(opts.out, checkpoint.TRAINER_FILE)}' (rng_state)")
    validate.check_memory(validate.training_bytes(ckpt.config, opts.batch_size),
                          f"training (--batch-size {opts.batch_size})")
    return ckpt, tokenizer


def _train(info, text_path, arch, xp, opts, config_overrides, tokenizer_path, log):
    trainer_state, opt_state, params = {}, None, None
    if opts.resume:
        ckpt, tokenizer = _resume_state(opts, arch, config_overrides)
        config = ckpt.config
        params, opt_state, trainer_state = ckpt.params, ckpt.optimizer_state, ckpt.trainer_state
    else:
        config = models.build_config(arch, **config_overrides)
        validate.validate_config(config, "the model options")
        validate.check_memory(validate.training_bytes(config, opts.batch_size),
                              f"training (--batch-size {opts.batch_size}, --context {config['context']}, "
                              f"--d-model {config['d_model']}, --layers {config['n_layer']}, "
                              f"--vocab-size {config['vocab_size']})")
        tokenizer = make_tokenizer(text_path, opts, config["vocab_size"], tokenizer_path, log)
        if opts.documents != "lines":      # sample and resume read it (a newline then is text, not an end)
            config["documents"] = opts.documents
        if tokenizer_path and tokenizer_path != "char":
            if tokenizer.eot_id is None:
                raise ValueError(f"--tokenizer {tokenizer_path}: it has no <|endoftext|> token, which "
                                 "separates the documents")
            asked = config_overrides.get("vocab_size")
            if asked is not None and asked != tokenizer.vocab_size:
                raise ValueError(f"--vocab-size {asked} contradicts --tokenizer {tokenizer_path} "
                                 f"({tokenizer.vocab_size} tokens); drop --vocab-size")
        config["vocab_size"] = tokenizer.vocab_size
    model = models.get_model(config["arch"])
    train_ids, val_ids = prepare_tokens(text_path, tokenizer, opts, config["context"], info, log)
    if params is None:
        params = model.init(config, np.random.default_rng(opts.seed))
    params = device.to_device(params, xp)
    if opt_state is not None:
        opt_state = {**opt_state, "m": device.to_device(opt_state["m"], xp), "v": device.to_device(opt_state["v"], xp)}
    n_params = sum(p.size for p in flatten(params).values())
    log(f"{config['arch']}: {n_params / 1e6:.2f}M parameters, {len(train_ids)} training and "
        f"{len(val_ids)} validation tokens")

    schedule = {key: getattr(opts, key) for key in SCHEDULE}

    def save(params_, opt_state_, state):
        checkpoint.save_checkpoint(opts.out, params_, config, tokenizer=tokenizer,
                                   optimizer_state=opt_state_, trainer_state={**state, "schedule": schedule})

    start = int(trainer_state.get("step", 0))
    fit(model, params, config, train_ids, val_ids, opts, log=log, opt_state=opt_state,
        metrics_path=os.path.join(opts.out, "metrics.jsonl"),
        start_step=start, rng_state=trainer_state.get("rng_state"), save=save)
    # The final report covers the whole validation split, not just the sampled eval batches.
    full = data.iter_eval_batches(val_ids, opts.batch_size, config["context"], max_batches=10**9)
    val_loss = evaluate(model, params, config, full)
    val_text = val_text_bytes(val_ids, tokenizer)
    bpb = bits_per_byte(val_loss, len(val_ids), len(val_text))
    xz = xz_bits_per_byte(val_text)
    log(f"validation: {val_loss:.4f} nats/token, {bpb:.3f} bits/byte (xz -9 on the same text: {xz:.3f} bits/byte)")
    log(f"checkpoint written to {opts.out}/")
    return {"val_loss": val_loss, "bits_per_byte": bpb, "xz_bits_per_byte": xz}
