"""Time to quality: the default `minillm train` model and recipe, trained until a fixed validation loss on
the headlines, by minillm and by the same model and recipe in PyTorch eager (same initial weights, same
batches in the same order, same schedule, same AdamW and clipping, same evaluation batches).

    python benchmarks/time_to_quality.py [--target 4.5] [--eval-every 50] [--max-steps N]

The run: the default BPE tokenizer trained on data/headlines.txt (not timed), the default GPT (minillm's
initial weights, copied into HF's GPT2LMHeadModel with sdpa attention), batches drawn by data.get_batch from
default_rng(seed) on both sides, the learning rate of optim.lr_at for the default schedule. Every
--eval-every steps both score the same fixed validation batches (train.TrainOptions.eval_batches of them,
as `minillm train` evaluates); the clock (training and evaluations, on both sides) stops at the first
evaluation at or below --target. The two alternate step by step, so both see the same background load. Printed:
steps and seconds to the target, the ratio, the loss curve of both, and the machine (harness.limits_line).
"""

import argparse
import itertools
import os
import time

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np
import peers
import torch
import torch.nn.functional as F

from minillm import data, models, optim, train, train_step
from minillm.tokenizer import Tokenizer
from minillm.tree import flatten

HEADLINES = harness.ROOT + "/data/headlines.txt"


def prepared(opts, config):
    from minillm import textfile

    items, _ = textfile.sample(HEADLINES, opts.tokenizer_sample_bytes, opts.documents)
    tokenizer = Tokenizer.train(items, config["vocab_size"], progress=False)
    train_ids, val_ids = train.prepare_tokens(HEADLINES, tokenizer, opts, config["context"])
    val = data.eval_batches(val_ids, opts.batch_size, config["context"], opts.eval_batches)
    return np.asarray(train_ids), val


def minillm_steps(params, config, opts, train_ids, val, eval_every):
    """One minillm training step (train_step.train_step, as `minillm train` runs it) per next(): yields
    (seconds it took, validation loss or None)."""
    model = models.get_model("gpt")
    mask = optim.decay_mask(flatten(params), no_decay=model.NO_DECAY)
    state = optim.adamw_init(params)
    rngs = [np.random.default_rng(opts.seed)]       # stream 0: the batches of a one-process `minillm train`
    for step in itertools.count():
        started = time.perf_counter()
        train_step.train_step(model, params, config, train_ids, opts, rngs, state, step, mask)
        value = train.evaluate(model, params, config, val) if (step + 1) % eval_every == 0 else None
        yield time.perf_counter() - started, value


def torch_steps(params, config, opts, train_ids, val, eval_every):
    """The same step in PyTorch eager (HF GPT2LMHeadModel, sdpa attention, torch.optim.AdamW)."""
    model = peers.hf_gpt2(params, config, torch.float32, attn="sdpa")
    mask = optim.decay_mask(flatten(params))
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if mask[n]], "weight_decay": opts.weight_decay},
              {"params": [p for n, p in named.items() if not mask[n]], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(opts.seed)

    def evaluate():
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in val:
                logits = model(torch.from_numpy(x)).logits
                total += float(F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())) * y.size
                count += y.size
        return total / count

    for step in itertools.count():
        started = time.perf_counter()
        x, y = (torch.from_numpy(a) for a in data.get_batch(train_ids, opts.batch_size, config["context"], rng))
        for group in opt.param_groups:
            group["lr"] = optim.lr_at(step, opts.lr, opts.warmup, opts.steps, opts.min_lr_ratio)
        opt.zero_grad(set_to_none=True)
        logits = model(x).logits
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        opt.step()
        yield time.perf_counter() - started, (evaluate() if (step + 1) % eval_every == 0 else None)


def race(runs, target, max_steps):
    """Step the runs in turn (step 1 of each, then step 2 of each, ...: both see the same background load)
    until every one has reached the target or max_steps. -> per run ((steps, seconds) or None, curve)."""
    clocks, reached, curves = [0.0] * len(runs), [None] * len(runs), [[] for _ in runs]
    for step in range(1, max_steps + 1):
        for i, run in enumerate(runs):
            if reached[i] is not None:
                continue
            seconds, value = next(run)
            clocks[i] += seconds
            if value is not None:
                curves[i].append((step, value))
                if value <= target:
                    reached[i] = (step, clocks[i])
        if all(r is not None for r in reached):
            break
    return list(zip(reached, curves))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=4.5, help="validation loss (nats/token) to reach")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=None, help="default: the recipe's --steps")
    args = ap.parse_args()
    opts = train.TrainOptions()           # the defaults of `minillm train`
    config = models.build_config("gpt")
    max_steps = args.max_steps or opts.steps
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    train_ids, val = prepared(opts, config)
    init = models.get_model("gpt").init(config, np.random.default_rng(opts.seed))
    print(f"{harness.limits_line()}\ndefault GPT ({sum(a.size for a in flatten(init).values()):,} parameters), "
          f"recipe: {opts.steps} steps, batch {opts.batch_size}, lr {opts.lr:g}, warmup {opts.warmup}; "
          f"target val loss {args.target} on {len(val)} batches, evaluated every {args.eval_every} steps")
    torch_init = {k: v.copy() for k, v in flatten(init).items()}
    (ours, our_curve), (theirs, torch_curve) = race(
        [minillm_steps(init, config, opts, train_ids, val, args.eval_every),
         torch_steps(torch_init, config, opts, train_ids, val, args.eval_every)], args.target, max_steps)
    rows = [("minillm", *(ours or ("-", float("nan")))), ("torch eager (sdpa)", *(theirs or ("-", float("nan"))))]
    harness.table(["implementation", "steps to target", "seconds", "vs torch"],
                  [(n, s, f"{t:.1f}", f"{t / rows[1][2]:.2f}x") for n, s, t in rows])
    print("loss curve (step: minillm / torch):")
    torch_at = dict(torch_curve)
    print("  " + ", ".join(f"{s}: {v:.3f}/{torch_at[s]:.3f}" if s in torch_at else f"{s}: {v:.3f}"
                           for s, v in our_curve))


if __name__ == "__main__":
    main()
