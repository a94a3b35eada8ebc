"""GPT training-step and sampling throughput: minillm (NumPy + Numba) vs PyTorch eager on the CPU.

Training: tokens/s of one full step (forward, cross-entropy loss, backward, AdamW) on the same model
(HF GPT2LMHeadModel built from a config, our initial weights copied by name) and the same batch,
float32. PyTorch runs eager and under torch.compile (default inductor mode, the model's forward compiled; the
backward is then compiled by AOTAutograd too) with torch.optim.AdamW (same hyper-parameters and
decay groups as minillm.optim) and as many threads as NumPy's BLAS uses; the PyTorch attention is
HF's default (scaled_dot_product_attention) and, for reference, HF's "eager" attention.

Sampling: tokens/s of greedy decoding, batch 1, 256 new tokens after a 1-token prompt, with a KV cache:
gpt.step in a loop vs a manual PyTorch loop over HF GPT2 with past_key_values, and HF `generate`.
The sampling model is the shakespeare-char size with a context of 512 (so 257 positions fit).

    python benchmarks/train_gpt.py [--repeats 5] [--only small|shakespeare] [--skip-sampling]
    python benchmarks/train_gpt.py --device cuda [--only shakespeare]  # on a GPU: CuPy vs torch eager CUDA

With --device cuda the training step runs on the GPU on both sides: minillm on CuPy arrays (cuBLAS matrix
products, the numba.cuda kernels for softmax, cross-entropy, LayerNorm, GELU and AdamW, CuPy elementwise
for the rest) against the same torch eager step on torch's CUDA device; each timed call ends with a
device synchronisation.
    python benchmarks/train_gpt.py --profile [--only ...]   # where a minillm step spends its time
"""

import argparse
import os
import time

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np
import peers
import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from minillm.models import gpt
from minillm.nn import ops
from minillm import batch_parts, optim, train
from minillm.device import array_module_for, to_device
from minillm.tree import flatten

CONFIGS = {
    "small": dict(vocab_size=512, context=64, d_model=128, n_layer=4, n_head=4, batch=32),
    "shakespeare": dict(vocab_size=65, context=256, d_model=384, n_layer=6, n_head=6, batch=16),
}
LR, BETAS, EPS, WD = 3e-4, (0.9, 0.95), 1e-8, 0.1


def numpy_threads():
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return os.cpu_count()


def _synchronize(device):
    """Wait for the GPU (both CuPy's and torch's queues) when timing on one."""
    if device == "cuda":
        import cupy

        cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()


def bench_train(name, repeats, device="cpu"):
    c = dict(CONFIGS[name])
    batch = c.pop("batch")
    config = {"arch": "gpt", **c, "dtype": "float32"}
    rng = np.random.default_rng(0)
    params = gpt.init(config, rng)
    data = rng.integers(0, config["vocab_size"], (batch, config["context"] + 1))
    x, y = data[:, :-1], data[:, 1:]
    tokens = x.size
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    if device == "cuda":
        params, x, y = (to_device(a, array_module_for("cuda")) for a in (params, x, y))
        tx, ty = tx.cuda(), ty.cuda()

    state = optim.adamw_init(params)

    parts = batch_parts.count(train.TrainOptions.batch_parts, batch, config, x)   # as harness.minillm_step

    def ours():
        loss = harness.minillm_step(gpt, params, config, x, y, state, LR, BETAS, EPS, WD)
        _synchronize(device)
        return loss

    labels, fns = ["minillm"], [ours]
    init_params = gpt.init(config, np.random.default_rng(0))
    mask = optim.decay_mask(flatten(init_params))
    for attn, compiled in (("sdpa", False), ("eager", False), ("sdpa", True)):
        model = peers.hf_gpt2(init_params, config, torch.float32, attn=attn).to(device)
        named = dict(model.named_parameters())
        groups = [{"params": [p for n, p in named.items() if mask[n]], "weight_decay": WD},
                  {"params": [p for n, p in named.items() if not mask[n]], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)

        forward = torch.compile(model) if compiled else model

        def theirs(model=forward, opt=opt):
            opt.zero_grad(set_to_none=True)
            logits = model(tx).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ty.reshape(-1))
            loss.backward()
            opt.step()
            _synchronize(device)
            return loss

        if compiled:
            try:
                theirs()            # compiles (a minute or more on the CPU); a failure is reported, not fatal
            except Exception as e:  # noqa: BLE001  (inductor needs a C++ compiler, among other things)
                print(f"  torch.compile does not compile here: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
        labels.append(f"torch.compile ({attn} attn)" if compiled else f"torch eager ({attn} attn)")
        fns.append(theirs)
    rows = list(zip(labels, harness.medians(fns, repeats, warmup=2)))   # interleaved
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\ntraining step on {where}, {name}: B={batch} T={config['context']} C={config['d_model']} "
          f"L={config['n_layer']} H={config['n_head']} V={config['vocab_size']}, float32, "
          f"median of {repeats} (interleaved); minillm in {parts} part(s) of the batch, "
          f"{'side by side' if batch_parts.side_by_side(parts) else 'one after the other'} (batch_parts.py)")
    n_params = sum(a.size for n, a in flatten(init_params).items() if "wpe" not in n)
    per_token = harness.gpt_flops_per_token(n_params, config["n_layer"], config["d_model"], config["context"])
    print(f"  {harness.limits_line()}; 6N + 12LdT = {per_token / 1e6:.2f} MFLOP/token")
    harness.table(["implementation", "s/step", "tokens/s", "MFU", "minillm speed-up"],
                  [(label, f"{t:.4f}", f"{tokens / t:.0f}", f"{harness.mfu(tokens / t, per_token):.3f}",
                    f"{t / rows[0][1]:.2f}x") for label, t in rows],
                  indent="  ")


def bench_sampling(repeats, new_tokens=256):
    c = dict(CONFIGS["shakespeare"])
    c.pop("batch")
    config = {"arch": "gpt", **c, "context": 512, "dtype": "float32"}
    params = gpt.init(config, np.random.default_rng(0))
    model = peers.hf_gpt2(params, config, torch.float32, attn="sdpa").eval()
    prompt = np.array([1], dtype=np.int64)

    def ours():
        state = gpt.init_state(params, config, 1)
        logits, state = gpt.step(params, prompt, state)
        out = []
        for _ in range(new_tokens):
            tok = np.argmax(logits, axis=-1)
            out.append(int(tok[0]))
            logits, state = gpt.step(params, tok, state)
        return out

    @torch.no_grad()
    def torch_loop():
        ids = torch.from_numpy(prompt)[None]
        res = model(ids, use_cache=True)
        out = []
        for _ in range(new_tokens):
            tok = res.logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(tok[0, 0]))
            res = model(tok, past_key_values=res.past_key_values, use_cache=True)
        return out

    @torch.no_grad()
    def hf_generate():
        ids = torch.from_numpy(prompt)[None]
        res = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        return res[0, 1:].tolist()

    agree = ours() == torch_loop()
    labels = ["minillm gpt.step loop", "torch loop, HF past_key_values", "HF generate (greedy)"]
    rows = list(zip(labels, harness.medians([ours, torch_loop, hf_generate], repeats, warmup=2)))
    print(f"\nsampling: batch 1, {new_tokens} new tokens (greedy, KV cache), C={config['d_model']} "
          f"L={config['n_layer']} H={config['n_head']} V={config['vocab_size']}, float32, median of "
          f"{repeats} (interleaved); greedy tokens identical to the torch loop: {agree}")
    n_params = sum(a.size for n, a in flatten(params).items() if "wpe" not in n)
    per_token = 2 * n_params + 2 * config["n_layer"] * config["d_model"] * new_tokens  # forward only, mean position
    harness.table(["implementation", "s", "tokens/s", "MFU (2N + 2LdT)", "minillm speed-up"],
                  [(label, f"{t:.4f}", f"{new_tokens / t:.0f}", f"{harness.mfu(new_tokens / t, per_token):.4f}",
                    f"{t / rows[0][1]:.2f}x") for label, t in rows],
                  indent="  ")


def profile_step(name, repeats):
    """Wall time per component of one minillm training step (best of `repeats`); nested rows include
    their children (attention_forward includes its two dense layers). What is timed is one part of the batch
    (B / batch_parts sequences) as each of batch_parts' threads computes it, on one core
    (`batch_parts.as_one_part`), then the AdamW update of the whole step on every core."""
    import collections

    from minillm.nn import attention, dense
    from minillm.kernels import gelu, layernorm, softmax

    c = dict(CONFIGS[name])
    batch = c.pop("batch")
    config = {"arch": "gpt", **c, "dtype": "float32"}
    rng = np.random.default_rng(0)
    params = gpt.init(config, rng)
    n_parts = batch_parts.count(train.TrainOptions.batch_parts, batch, config, np.empty(0))
    data = rng.integers(0, config["vocab_size"], (batch // n_parts, config["context"] + 1))
    state = optim.adamw_init(params)
    spent = collections.defaultdict(float)
    wrapped = [(gpt, ["forward", "backward"]), (attention, ["attention_forward", "attention_backward",
               "_bmm"]), (dense, ["dense_forward", "dense_backward"]),
               (layernorm, ["forward", "backward"]),
               (gelu, ["forward", "backward"]),
               (softmax, ["causal", "causal_backward"]),
               (ops, ["cross_entropy_forward", "cross_entropy_backward"]), (optim, ["adamw_step"])]
    saved = []
    for module, names in wrapped:
        for fn_name in names:
            fn = getattr(module, fn_name)
            saved.append((module, fn_name, fn))

            def timed(*a, _fn=fn, _name=f"{module.__name__.rsplit('.', 1)[-1]}.{fn_name}", **k):
                t0 = time.perf_counter()
                out = _fn(*a, **k)
                spent[_name] += time.perf_counter() - t0
                return out

            setattr(module, fn_name, timed)
    best = None
    try:
        for _ in range(repeats + 1):
            spent.clear()
            t0 = time.perf_counter()
            with batch_parts.as_one_part():
                logits, cache = gpt.forward(params, data[:, :-1], config)
                loss, lcache = ops.cross_entropy_forward(logits, data[:, 1:])
                grads = gpt.backward(ops.cross_entropy_backward(1.0, lcache), cache)
            optim.adamw_step(params, grads, state, LR, BETAS, EPS, WD)
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = (total, dict(spent))
    finally:
        for module, fn_name, fn in saved:
            setattr(module, fn_name, fn)
    total, parts = best
    print(f"\nprofile of one minillm step, {name} (best of {repeats}; one part of {batch // n_parts} sequences, "
          f"on one core, and AdamW): {total * 1e3:.1f} ms")
    for fn_name, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {fn_name:32s} {t * 1e3:8.1f} ms {100 * t / total:5.1f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=sorted(CONFIGS))
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--profile", action="store_true", help="time the parts of a minillm step instead")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: time the training step on the GPU (needs CuPy and torch with CUDA)")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    threads = numpy_threads()
    torch.set_num_threads(threads)
    import numba

    print(f"load average before: {os.getloadavg()[0]:.2f}; threads: NumPy BLAS {threads} "
          f"(OPENBLAS_NUM_THREADS / OMP_NUM_THREADS or all cores), Numba {numba.get_num_threads()}, torch.set_num_threads({torch.get_num_threads()}); "
          f"numpy {np.__version__}, torch {torch.__version__}")
    if args.profile:
        for name in ([args.only] if args.only else CONFIGS):
            profile_step(name, args.repeats)
        return
    for name in ([args.only] if args.only else CONFIGS):
        bench_train(name, args.repeats, args.device)
    if not args.skip_sampling and args.device == "cpu":
        bench_sampling(args.repeats)


if __name__ == "__main__":
    main()
