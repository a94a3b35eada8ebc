"""The training loop: data, model, AdamW, progress bar, evaluation, checkpoints and resuming.

`train(text_path, options, config_overrides)` is what `minillm train` runs; `fit(...)` is the loop itself,
shared with LoRA fine-tuning (which passes the set of trainable names); one step is minillm.train_step.

Under `mpiexec -n N` (minillm.distributed) every rank runs the same loop on its own batches: rank 0 alone
prepares the run (checks, tokenizer, tokens, the checkpoint to resume) and hands it to the others, the
gradients are averaged over every rank before clipping, and rank 0 alone writes checkpoints, metrics.jsonl
and the progress bar.
"""

import contextlib
import dataclasses
import itertools
import lzma
import math
import os
import signal
import threading
import time

import numpy as np
from tqdm.auto import tqdm

from minillm import (batch_parts, checkpoint, data, device, distributed, heap, metrics, models, optim, resume, store,
                     textfile, train_step, validate)
from minillm.char_tokenizer import CharTokenizer, load_tokenizer
from minillm.errors import Interrupted
from minillm.nn import ops
from minillm.tokenizer import Tokenizer
from minillm.tree import flatten


@dataclasses.dataclass
class TrainOptions:
    steps: int = 1550
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
    batch_parts: int = 2     # each micro-batch computed as this many equal parts, a core each (batch_parts.py)
    documents: str = "lines"                                 # or "file" (see minillm.textfile)
    tokenizer_sample_bytes: int = data.TOKENIZER_SAMPLE_BYTES  # BPE training reads this much of FILE
    overwrite: bool = False          # replace a checkpoint in `out` instead of refusing to
    explicit: frozenset = None       # the options the user gave; --resume takes the others from the run
    #                                  (None, for library callers: every option as given, nothing checked)


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


def evaluate(model, params, config, batches, world=None):
    """Mean cross-entropy (nats/token) over the given (x, y) batches, weighted by token count. Under MPI
    (world: default distributed.world()) rank r scores batches r, r + N, ... and the sums are reduced."""
    world = world or distributed.world()
    total, count = 0.0, 0
    xp = train_step.params_array_module(params)

    def score(x, y):
        logits, _ = model.forward(params, xp.asarray(x), config)
        return ops.cross_entropy_forward(logits, xp.asarray(y))[0]

    mine = iter(itertools.islice(batches, world.rank, None, world.size))
    at_once = batch_parts.independent(TrainOptions.batch_parts, config, xp.empty(0))   # side by side
    while chunk := list(itertools.islice(mine, at_once)):
        for (_, y), loss in zip(chunk, batch_parts.run(score, chunk)):   # summed in batch order
            total += loss * y.size
            count += y.size
    if world.size > 1:
        total, count = world.sum_floats([total, count])
    return total / count


def _silent(message):
    """The log of ranks other than 0 under MPI."""


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
        trainable=None, opt_state=None, start_step=0, rng_state=None, save=None, metrics_path=None,
        trainer_state=None):
    """Train `params` in place for steps start_step..opts.steps-1; -> final validation loss (nats/token).

    trainable (as in optim.adamw_init: None for all, names, or a predicate on dotted names): only these are
    updated, and gradient clipping measures only their gradients (as torch does, whose frozen parameters
    have none). save(params, opt_state, trainer_state) writes a checkpoint; it runs at every evaluation and
    at the end (on rank 0 alone under MPI). metrics_path: the metrics.jsonl to append a line per step and
    per evaluation to (cut back to the steps before start_step first; see minillm.metrics).
    trainer_state: a resumed run's (its batch streams continue; see train_step.batch_rngs); rng_state: the
    older form, the single generator state of a one-process run.
    Under MPI every rank calls fit with the same params; each draws its own batches.
    """
    heap.keep_freed_memory()              # each step's arrays reuse the last step's memory (minillm/heap.py)
    world = distributed.world()
    if trainer_state is None and rng_state is not None:
        trainer_state = {"rng_state": rng_state}
    rngs = train_step.batch_rngs(opts, world, trainer_state)
    if world.rank:
        log = _silent
    mask = optim.decay_mask(flatten(params), no_decay=getattr(model, "NO_DECAY", optim.NO_DECAY_NAMES))
    if opt_state is None:
        opt_state = optim.adamw_init(params, trainable)
    val_batches = data.eval_batches(val_ids, opts.batch_size, config["context"], opts.eval_batches)
    tokens_per_step = opts.batch_size * config["context"] * len(rngs) * world.size
    val_loss = None
    log_file = None if metrics_path is None or world.rank else metrics.MetricsLog(metrics_path, start_step)
    recent = []          # training losses since the last evaluation
    saved = start_step if start_step else None   # the step of the checkpoint on disk for this run

    def save_now(step):
        nonlocal saved
        if save is not None:
            record = train_step.rng_record(rngs, world)     # a collective: every rank takes part
            world.on_root(lambda: save(params, opt_state, {"step": step, **record, "val_loss": val_loss}))
            saved = step

    def checkpoint_now(step):
        nonlocal val_loss
        val_loss = evaluate(model, params, config, val_batches, world)
        train_loss = float(np.mean(recent)) if recent else None
        recent.clear()
        shown = "" if train_loss is None else f"train loss {train_loss:.4f}, "
        log(f"step {step}: {shown}val loss {val_loss:.4f}")
        if log_file is not None:
            log_file.append(step=step, train_loss=train_loss, val_loss=val_loss)
        save_now(step)

    def one_step(step, interrupted):
        """-> True when the run is to stop after this step (Ctrl-C, agreed by every rank under MPI)."""
        try:
            result = train_step.train_step(model, params, config, train_ids, opts, rngs, opt_state, step, mask,
                                           trainable, world, stop_requested=lambda: bool(interrupted))
        except train_step.Diverged as e:
            kept = (f"the last good checkpoint, step {saved}, is kept in {opts.out!r}" if saved is not None
                    else "no checkpoint of this run had been saved yet")
            raise distributed.AllRanksError(f"{e}; stopped without saving ({kept}); try a lower --lr") from None
        loss, aux, stats, grad_norm, lr = result.loss, result.aux, result.stats, result.grad_norm, result.lr
        done = step + 1 - start_step
        tokens_per_s = done * tokens_per_step / (time.perf_counter() - started)
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:.0f}"}
        if aux:
            postfix["aux"] = f"{aux:.3f}"
        postfix.update({k: format_stat(v) for k, v in stats.items()})
        bar.set_postfix(postfix, refresh=False)
        recent.append(loss)
        if log_file is not None:
            log_file.append(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                            **({"aux_loss": aux} if aux else {}), **{k: device.to_host(v) for k, v in stats.items()})
        if (step + 1) % opts.eval_every == 0 and step + 1 < opts.steps:
            bar.clear()
            checkpoint_now(step + 1)
        return result.stop

    bar = tqdm(range(start_step, opts.steps), initial=start_step, total=opts.steps, desc="train",
               unit="step", disable=not opts.progress or world.rank != 0, dynamic_ncols=True)
    started = time.perf_counter()
    with _deferred_sigint() as interrupted:
        for step in bar:
            # Ctrl-C arrived during the step: keep the state after it, then stop. Under MPI (mpiexec passes
            # it to every rank, not necessarily within the same step) the ranks agree on the step in the
            # step's own loss reduction (train_step's stop_requested).
            if one_step(step, interrupted):
                bar.close()
                save_now(step + 1)
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
    tokenizer_path: a tokenizer.json, "char", or None (train a BPE; see make_tokenizer).

    Under MPI every rank calls it: rank 0 alone checks and reads the files, trains or loads the tokenizer,
    encodes the tokens, loads the checkpoint to resume and holds the lock of opts.out, then broadcasts the run
    to the others (only rank 0 needs the files). Rank 0 returns the summary, the others {"val_loss"}."""
    world = distributed.world()
    # on every rank: fails early without a GPU for --device cuda; under MPI each rank takes the GPU of its
    # local rank (modulo the GPUs of its machine)
    xp = world.every_rank(lambda: device.array_module_for(opts.device,
                                                          world.local_rank if world.size > 1 else None))
    if world.rank:
        log, opts = _silent, dataclasses.replace(opts, progress=False)
    with contextlib.ExitStack() as held:
        kept = {}

        def prepare():
            kept["tokenizer"], shared = _prepare(text_path, opts, config_overrides, tokenizer_path, log, held)
            return shared

        run = world.on_root(prepare)
        for key, value in run["options"].items():   # what rank 0 took from a resumed checkpoint
            setattr(opts, key, value)
        return _run(run, kept.get("tokenizer"), xp, opts, log, world)


def _prepare(text_path, opts, config_overrides, tokenizer_path, log, held):
    """train's checks and set-up (rank 0 alone under MPI; the lock of opts.out is entered into `held`)
    -> (tokenizer, {"config", "params", "opt_state", "trainer_state", "train_ids", "val_ids", "options"}:
    host arrays and JSON-able values, which rank 0 broadcasts)."""
    arch = config_overrides.pop("arch", None)
    textfile.check_documents(opts.documents)
    info = textfile.check(text_path)  # validates early (missing, empty, binary, non-UTF-8) and hashes
    checkpoint.check_writable(opts.out)   # before any work: --out holds no file minillm did not write
    if not opts.resume:
        arch = arch or "gpt"
        if os.path.exists(os.path.join(opts.out, checkpoint.CONFIG_FILE)) and not opts.overwrite:
            raise ValueError(f"{opts.out!r} holds a checkpoint already: --resume continues it, --overwrite "
                             "replaces it")
    held.enter_context(store.lock(opts.out))   # one writer per --out for the whole run
    trainer_state, opt_state, params = {}, None, None
    if opts.resume:
        ckpt, tokenizer = resume.load(opts, arch, config_overrides)
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
    options = {key: getattr(opts, key) for key in resume.SCHEDULE + ("documents",)}
    return tokenizer, {"config": config, "params": params, "opt_state": opt_state, "trainer_state": trainer_state,
                       "train_ids": train_ids, "val_ids": val_ids, "options": options}


def _run(run, tokenizer, xp, opts, log, world):
    """train's loop and report, on every rank (tokenizer: rank 0's; the others neither save nor report)."""
    config, params, opt_state = run["config"], run["params"], run["opt_state"]
    trainer_state, train_ids, val_ids = run["trainer_state"], run["train_ids"], run["val_ids"]
    model = models.get_model(config["arch"])
    params = device.to_device(params, xp)
    if opt_state is not None:
        opt_state = {**opt_state, "m": device.to_device(opt_state["m"], xp), "v": device.to_device(opt_state["v"], xp)}
    n_params = sum(p.size for p in flatten(params).values())
    processes = f" on {world.size} processes" if world.size > 1 else ""
    log(f"{config['arch']}: {n_params / 1e6:.2f}M parameters, {len(train_ids)} training and "
        f"{len(val_ids)} validation tokens{processes}")

    schedule = {key: getattr(opts, key) for key in resume.SCHEDULE}

    def save(params_, opt_state_, state):
        checkpoint.save_checkpoint(opts.out, params_, config, tokenizer=tokenizer,
                                   optimizer_state=opt_state_, trainer_state={**state, "schedule": schedule})

    start = int(trainer_state.get("step", 0))
    fit(model, params, config, train_ids, val_ids, opts, log=log, opt_state=opt_state,
        metrics_path=os.path.join(opts.out, "metrics.jsonl"),
        start_step=start, trainer_state=trainer_state, save=save)
    # The final report covers the whole validation split, not just the sampled eval batches.
    full = data.iter_eval_batches(val_ids, opts.batch_size, config["context"], max_batches=10**9)
    val_loss = evaluate(model, params, config, full, world)
    if world.rank:
        return {"val_loss": val_loss}
    val_text = val_text_bytes(val_ids, tokenizer)
    bpb = bits_per_byte(val_loss, len(val_ids), len(val_text))
    xz = xz_bits_per_byte(val_text)
    log(f"validation: {val_loss:.4f} nats/token, {bpb:.3f} bits/byte (xz -9 on the same text: {xz:.3f} bits/byte)")
    log(f"checkpoint written to {opts.out}/")
    return {"val_loss": val_loss, "bits_per_byte": bpb, "xz_bits_per_byte": xz}
